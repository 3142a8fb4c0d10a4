//! The loss curves as a PNG: training loss per step and held-out loss where evaluated.
//! Text uses a bundled ASCII subset of DejaVu Sans (assets/, Bitstream Vera license), so the
//! plot renders the same on a machine with no system fonts (CI has no fontconfig).

use std::path::Path;
use std::sync::Once;

use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};

use crate::error::{Result, TrainerError};
use crate::metrics::StepRecord;

pub const PLOT_FILE: &str = "loss.png";

static FONT: &[u8] = include_bytes!("../assets/DejaVuSans-ascii.ttf");
static REGISTER: Once = Once::new();

fn register() {
    REGISTER.call_once(|| {
        // The bundled font is a valid TrueType file (checked by the test below).
        if register_font("sans-serif", FontStyle::Normal, FONT).is_err() {
            panic!("the bundled font does not parse");
        }
    });
}

/// Draw the curves of `records` into `path` (written under a temporary name, then renamed).
pub fn plot_losses(records: &[StepRecord], path: &Path) -> Result<()> {
    register();
    let err = |msg: String| TrainerError::Plot {
        path: path.to_path_buf(),
        msg,
    };
    let train: Vec<(f64, f64)> = records
        .iter()
        .filter(|r| r.loss.is_finite())
        .map(|r| (r.step as f64, r.loss))
        .collect();
    let eval: Vec<(f64, f64)> = records
        .iter()
        .filter_map(|r| r.eval_loss.map(|e| (r.step as f64, e)))
        .filter(|(_, e)| e.is_finite())
        .collect();
    if train.is_empty() {
        return Err(err("no finite losses to plot".into()));
    }
    let x_max = train.last().map(|p| p.0).unwrap_or(1.0).max(2.0);
    let ys = train.iter().chain(&eval).map(|p| p.1);
    let (lo, hi) = ys.fold((f64::MAX, f64::MIN), |(a, b), y| (a.min(y), b.max(y)));
    let pad = ((hi - lo) * 0.05).max(1e-3);
    let (y_lo, y_hi) = ((lo - pad).max(0.0), hi + pad);

    let temp = path.with_file_name(format!(".loss.tmp-{}.png", std::process::id()));
    {
        let root = BitMapBackend::new(&temp, (900, 540)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
        let mut chart = ChartBuilder::on(&root)
            .caption("tigon: loss", ("sans-serif", 24))
            .margin(16)
            .x_label_area_size(44)
            .y_label_area_size(64)
            .build_cartesian_2d(1f64..x_max, y_lo..y_hi)
            .map_err(|e| err(e.to_string()))?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc("loss (nats / token)")
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(|e| err(e.to_string()))?;
        chart
            .draw_series(LineSeries::new(train, BLUE.stroke_width(2)))
            .map_err(|e| err(e.to_string()))?
            .label("train")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE.stroke_width(2)));
        if !eval.is_empty() {
            let pts = eval.clone();
            chart
                .draw_series(LineSeries::new(eval, RED.stroke_width(2)))
                .map_err(|e| err(e.to_string()))?
                .label("held-out")
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED.stroke_width(2)));
            chart
                .draw_series(pts.into_iter().map(|p| Circle::new(p, 3, RED.filled())))
                .map_err(|e| err(e.to_string()))?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .draw()
            .map_err(|e| err(e.to_string()))?;
        root.present().map_err(|e| err(e.to_string()))?;
    }
    std::fs::rename(&temp, path).map_err(|e| TrainerError::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_a_png_with_both_curves() {
        let records: Vec<StepRecord> = (1..=30)
            .map(|s| StepRecord {
                step: s,
                loss: 3.0 / s as f64 + 0.5,
                lr: 1e-3,
                grad_norm: 1.0,
                tokens: 10,
                tok_s: 100.0,
                eval_loss: (s % 10 == 0).then(|| 3.2 / s as f64 + 0.6),
                elapsed: s as f64,
            })
            .collect();
        let dir = std::env::temp_dir().join(format!("tigon-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(PLOT_FILE);
        plot_losses(&records, &path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        // IHDR: width and height, big-endian, right after the signature and chunk header.
        assert_eq!(&bytes[12..16], b"IHDR");
        assert_eq!(u32::from_be_bytes(bytes[16..20].try_into().unwrap()), 900);
        assert_eq!(u32::from_be_bytes(bytes[20..24].try_into().unwrap()), 540);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
