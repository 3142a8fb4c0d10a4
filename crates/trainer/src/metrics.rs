//! Per-step metrics as JSON lines, appended and flushed as training goes, so a crashed run
//! keeps its curve and another process can watch the file. A checkpoint records the file's
//! length; a resumed run cuts the file back to it, so each step appears once.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainerError};

pub const METRICS_FILE: &str = "metrics.jsonl";

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    pub step: u64,
    /// Mean loss over the step's trained tokens (all micro-batches).
    pub loss: f64,
    /// The learning rate this step used.
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Non-padding tokens in the step.
    pub tokens: usize,
    /// Non-padding tokens per second of this step.
    pub tok_s: f64,
    /// Held-out token-mean loss, on steps that evaluate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_loss: Option<f64>,
    /// Seconds of training so far (across resumptions).
    pub elapsed: f64,
}

pub struct MetricsWriter {
    path: PathBuf,
    file: File,
    len: u64,
}

impl MetricsWriter {
    /// A new, empty file (replacing any old one).
    pub fn create(path: &Path) -> Result<MetricsWriter> {
        let file = File::create(path).map_err(|e| TrainerError::io(path, e))?;
        Ok(MetricsWriter {
            path: path.to_path_buf(),
            file,
            len: 0,
        })
    }

    /// Continue a file cut back to `len` bytes (the length a checkpoint recorded).
    pub fn resume(path: &Path, len: u64) -> Result<MetricsWriter> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| TrainerError::io(path, e))?;
        let have = file
            .metadata()
            .map_err(|e| TrainerError::io(path, e))?
            .len();
        if have < len {
            return Err(TrainerError::checkpoint(
                path,
                format!("has {have} bytes but the checkpoint recorded {len}"),
            ));
        }
        file.set_len(len).map_err(|e| TrainerError::io(path, e))?;
        let mut file = file;
        use std::io::Seek;
        file.seek(std::io::SeekFrom::Start(len))
            .map_err(|e| TrainerError::io(path, e))?;
        Ok(MetricsWriter {
            path: path.to_path_buf(),
            file,
            len,
        })
    }

    pub fn append(&mut self, rec: &StepRecord) -> Result<()> {
        let mut line = serde_json::to_string(rec).expect("a step record serializes");
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .map_err(|e| TrainerError::io(&self.path, e))?;
        self.len += line.len() as u64;
        Ok(())
    }

    /// Bytes written so far (the position a checkpoint records).
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn sync(&self) -> Result<()> {
        self.file
            .sync_data()
            .map_err(|e| TrainerError::io(&self.path, e))
    }
}

/// Every record of a metrics file, in order; a bad line is an error naming it.
pub fn read_metrics(path: &Path) -> Result<Vec<StepRecord>> {
    let text = std::fs::read_to_string(path).map_err(|e| TrainerError::io(path, e))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| TrainerError::Config {
                file: path.display().to_string(),
                line: Some(i + 1),
                msg: format!("not a metrics record: {e}"),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(step: u64, eval: Option<f64>) -> StepRecord {
        StepRecord {
            step,
            loss: 1.0 / step as f64,
            lr: 1e-3,
            grad_norm: 0.5,
            tokens: 100,
            tok_s: 1000.0,
            eval_loss: eval,
            elapsed: step as f64,
        }
    }

    #[test]
    fn append_cut_back_and_read() {
        let dir = std::env::temp_dir().join(format!("tigon-metrics-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(METRICS_FILE);
        let mut w = MetricsWriter::create(&path).unwrap();
        w.append(&rec(1, None)).unwrap();
        w.append(&rec(2, Some(0.7))).unwrap();
        let at = w.len();
        w.append(&rec(3, None)).unwrap();
        drop(w);
        assert_eq!(read_metrics(&path).unwrap().len(), 3);
        let mut w = MetricsWriter::resume(&path, at).unwrap();
        w.append(&rec(3, Some(0.5))).unwrap();
        drop(w);
        let got = read_metrics(&path).unwrap();
        assert_eq!(
            got,
            vec![rec(1, None), rec(2, Some(0.7)), rec(3, Some(0.5))]
        );
        assert!(MetricsWriter::resume(&path, 1 << 20).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
