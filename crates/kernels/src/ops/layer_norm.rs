//! LayerNorm with bias, forward and backward, with torch's numerics: statistics in f32
//! (population variance), `y = (x - mean) * rstd * w + b` rounded once to the storage dtype.
//! The forward saves `mean` and `rstd` (one f32 each per row); the backward gives `dx` and
//! the parameter gradients `dw`, `db` (f32), summed over rows deterministically (per-block
//! partial rows, then a second kernel that adds them in a fixed order).

use std::sync::Arc;

use crate::bench::{measure, BenchConfig, BenchRow, KernelBench};
use crate::check::{compare, random_pair, random_pair_par, CheckLine, GpuCheck};
use crate::cpu::par_rows;
use crate::cuda::{Gpu, KernelSource};
use crate::error::{KernelError, Result};
use crate::ops::eager::{self, BinaryOp, Broadcast, Reduce, UnaryOp};
use crate::rng::Rng;
use crate::{launch, DType, Device, Tensor};

use super::{common_gpu, expect_dtype, expect_shape, row_grid};

pub const SOURCE: KernelSource = KernelSource {
    name: "layer_norm",
    src: include_str!("../../kernels/layer_norm.cu"),
};

const OP: &str = "layer_norm";

#[derive(Clone, Copy, Debug)]
pub struct LayerNorm {
    pub eps: f32,
}

pub struct LayerNormForward {
    /// Same shape and dtype as `x`.
    pub y: Tensor,
    /// f32, one per row.
    pub mean: Tensor,
    /// `rsqrt(var + eps)`, f32, one per row.
    pub rstd: Tensor,
}

pub struct LayerNormBackward {
    /// Same shape and dtype as `x`.
    pub dx: Tensor,
    /// f32 `[cols]`.
    pub dw: Tensor,
    /// f32 `[cols]`.
    pub db: Tensor,
}

fn check_x_w(x: &Tensor, w: &Tensor) -> Result<(usize, usize)> {
    expect_dtype(OP, "x", x, &[DType::F32, DType::BF16])?;
    expect_dtype(OP, "weight", w, &[x.dtype()])?;
    let (rows, cols) = x.rows_cols();
    if x.shape().is_empty() || cols == 0 {
        return Err(KernelError::shape(
            OP,
            format!("x {:?} has no feature dim", x.shape()),
        ));
    }
    expect_shape(OP, "weight", w, &[cols])?;
    Ok((rows, cols))
}

pub fn layer_norm_forward(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    p: LayerNorm,
) -> Result<LayerNormForward> {
    let (rows, cols) = check_x_w(x, weight)?;
    expect_dtype(OP, "bias", bias, &[x.dtype()])?;
    expect_shape(OP, "bias", bias, &[cols])?;
    if !(p.eps >= 0.0 && p.eps.is_finite()) {
        return Err(KernelError::invalid(
            OP,
            format!("eps must be finite and >= 0, got {}", p.eps),
        ));
    }
    match common_gpu(OP, &[("x", x), ("weight", weight), ("bias", bias)])? {
        None => cpu_forward(x, weight, bias, p, rows, cols),
        Some(gpu) => {
            let y = Tensor::uninit_cuda(&gpu, x.shape(), x.dtype())?;
            let mean = Tensor::uninit_cuda(&gpu, &[rows], DType::F32)?;
            let rstd = Tensor::uninit_cuda(&gpu, &[rows], DType::F32)?;
            let (name, threads) = variant(cols, "forward", x.dtype());
            let f = gpu.function(&SOURCE, &name)?;
            launch!(gpu, f, (row_grid(&gpu, rows, 8), 1, 1), (threads, 1, 1), 0;
                x.dptr(), weight.dptr(), bias.dptr(), y.dptr(), mean.dptr(), rstd.dptr(),
                rows as i32, cols as i32, p.eps)?;
            Ok(LayerNormForward { y, mean, rstd })
        }
    }
}

pub fn layer_norm_backward(
    dy: &Tensor,
    x: &Tensor,
    weight: &Tensor,
    mean: &Tensor,
    rstd: &Tensor,
) -> Result<LayerNormBackward> {
    let (rows, cols) = check_x_w(x, weight)?;
    expect_dtype(OP, "dy", dy, &[x.dtype()])?;
    expect_shape(OP, "dy", dy, x.shape())?;
    for (name, t) in [("mean", mean), ("rstd", rstd)] {
        expect_dtype(OP, name, t, &[DType::F32])?;
        expect_shape(OP, name, t, &[rows])?;
    }
    let gpu = common_gpu(
        OP,
        &[
            ("dy", dy),
            ("x", x),
            ("weight", weight),
            ("mean", mean),
            ("rstd", rstd),
        ],
    )?;
    let Some(gpu) = gpu else {
        return cpu_backward(dy, x, weight, mean, rstd, rows, cols);
    };
    let dx = Tensor::uninit_cuda(&gpu, x.shape(), x.dtype())?;
    // Each block writes one partial row of dw and of db: a few blocks per SM fill the GPU
    // while keeping the partials (and the reduce that reads them) small.
    let grid = row_grid(&gpu, rows, 4);
    let dw_partial = Tensor::uninit_cuda(&gpu, &[grid as usize, cols], DType::F32)?;
    let db_partial = Tensor::uninit_cuda(&gpu, &[grid as usize, cols], DType::F32)?;
    let (name, threads) = variant(cols, "backward", x.dtype());
    let f = gpu.function(&SOURCE, &name)?;
    launch!(gpu, f, (grid, 1, 1), (threads, 1, 1), 0;
        dy.dptr(), x.dptr(), weight.dptr(), mean.dptr(), rstd.dptr(), dx.dptr(),
        dw_partial.dptr(), db_partial.dptr(), rows as i32, cols as i32)?;
    let dw = Tensor::uninit_cuda(&gpu, &[cols], DType::F32)?;
    let db = Tensor::uninit_cuda(&gpu, &[cols], DType::F32)?;
    let f = gpu.function(&SOURCE, "layer_norm_param_reduce")?;
    launch!(gpu, f, (cols.div_ceil(256) as u32, 1, 1), (256, 1, 1), 0;
        dw_partial.dptr(), db_partial.dptr(), dw.dptr(), db.dptr(), grid as i32, cols as i32)?;
    Ok(LayerNormBackward { dx, dw, db })
}

/// The kernel variant and block size for a row length: the whole row in registers when it is
/// a multiple of 8 elements and fits (2 chunks of 8 per thread, or 4 for long rows), plain
/// loops otherwise.
fn variant(cols: usize, dir: &str, dtype: DType) -> (String, u32) {
    let chunks = cols / 8;
    let sfx = dtype.kernel_suffix();
    for v in [2usize, 4] {
        if cols.is_multiple_of(8) && chunks.div_ceil(v) <= 1024 {
            let threads = chunks.div_ceil(v).div_ceil(32) * 32;
            return (format!("layer_norm_{dir}_vec{v}_{sfx}"), threads as u32);
        }
    }
    let threads = cols.div_ceil(32).clamp(1, 8) * 32;
    (format!("layer_norm_{dir}_any_{sfx}"), threads as u32)
}

fn cpu_forward(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    p: LayerNorm,
    rows: usize,
    cols: usize,
) -> Result<LayerNormForward> {
    let (xs, ws, bs) = (x.cpu_f32(), w.cpu_f32(), b.cpu_f32());
    // (mean, rstd) per row: exact two-pass statistics in f64, rstd taken in f32 as torch does.
    let mut stats = vec![0.0f32; 2 * rows];
    par_rows(&mut stats, 2, |r, o| {
        let row = &xs[r * cols..(r + 1) * cols];
        let mean = row.iter().map(|&v| v as f64).sum::<f64>() / cols as f64;
        let var = row
            .iter()
            .map(|&v| (v as f64 - mean) * (v as f64 - mean))
            .sum::<f64>()
            / cols as f64;
        o[0] = mean as f32;
        o[1] = 1.0 / (var as f32 + p.eps).sqrt();
    });
    let mut y = vec![0.0f32; rows * cols];
    par_rows(&mut y, cols, |r, out| {
        let row = &xs[r * cols..(r + 1) * cols];
        let (mean, rstd) = (stats[2 * r], stats[2 * r + 1]);
        for c in 0..cols {
            out[c] = (row[c] - mean) * rstd * ws[c] + bs[c];
        }
    });
    let mean: Vec<f32> = stats.iter().step_by(2).copied().collect();
    let rstd: Vec<f32> = stats.iter().skip(1).step_by(2).copied().collect();
    Ok(LayerNormForward {
        y: Tensor::from_f32_as(x.shape(), y, x.dtype())?,
        mean: Tensor::from_f32(&[rows], mean)?,
        rstd: Tensor::from_f32(&[rows], rstd)?,
    })
}

fn cpu_backward(
    dy: &Tensor,
    x: &Tensor,
    w: &Tensor,
    mean: &Tensor,
    rstd: &Tensor,
    rows: usize,
    cols: usize,
) -> Result<LayerNormBackward> {
    let (dys, xs, ws) = (dy.cpu_f32(), x.cpu_f32(), w.cpu_f32());
    let (ms, rs) = (mean.cpu_f32(), rstd.cpu_f32());
    let xhat = |r: usize, c: usize| (xs[r * cols + c] - ms[r]) * rs[r];
    let mut dx = vec![0.0f32; rows * cols];
    par_rows(&mut dx, cols, |r, out| {
        let gr = &dys[r * cols..(r + 1) * cols];
        let (mut sg, mut sgx) = (0.0f64, 0.0f64);
        for c in 0..cols {
            let g = gr[c] * ws[c];
            sg += g as f64;
            sgx += g as f64 * xhat(r, c) as f64;
        }
        let (mg, mgx) = ((sg / cols as f64) as f32, (sgx / cols as f64) as f32);
        for c in 0..cols {
            out[c] = rs[r] * (gr[c] * ws[c] - mg - xhat(r, c) * mgx);
        }
    });
    // dw and db interleaved per column, so one parallel pass makes both.
    let mut dwb = vec![0.0f32; 2 * cols];
    par_rows(&mut dwb, 2, |c, o| {
        let (mut sw, mut sb) = (0.0f64, 0.0f64);
        for r in 0..rows {
            let d = dys[r * cols + c] as f64;
            sw += d * xhat(r, c) as f64;
            sb += d;
        }
        o[0] = sw as f32;
        o[1] = sb as f32;
    });
    let dw: Vec<f32> = dwb.iter().step_by(2).copied().collect();
    let db: Vec<f32> = dwb.iter().skip(1).step_by(2).copied().collect();
    Ok(LayerNormBackward {
        dx: Tensor::from_f32_as(x.shape(), dx, x.dtype())?,
        dw: Tensor::from_f32(&[cols], dw)?,
        db: Tensor::from_f32(&[cols], db)?,
    })
}

pub const CHECK: GpuCheck = GpuCheck {
    op: OP,
    run: gpu_check,
};

fn gpu_check(gpu: &Arc<Gpu>, rng: &mut Rng) -> Result<Vec<CheckLine>> {
    let mut lines = Vec::new();
    let cases = [
        (DType::BF16, 8192, 4096, "Llama-3-8B hidden"),
        (DType::F32, 37, 1000, "odd rows, row not /8"),
        (DType::BF16, 129, 3000, "odd rows"),
        (DType::F32, 1000, 4096, "f32"),
        (DType::BF16, 64, 20000, "4 chunks per thread"),
        (DType::F32, 33, 40000, "row too long for registers"),
        (DType::BF16, 300, 128, "short rows"),
        (DType::BF16, 17, 77, "tiny odd"),
    ];
    let dev = Device::Cuda(gpu.clone());
    for (dt, rows, cols, what) in cases {
        let p = LayerNorm { eps: 1e-5 };
        // An offset mean, so that the centring matters.
        let (x, gx) = {
            let (x, _) = random_pair_par(gpu, rng, &[rows, cols], dt, 1.0)?;
            let shifted: Vec<f32> = x.to_f32_vec()?.iter().map(|v| v + 0.5).collect();
            let x = Tensor::from_f32_as(&[rows, cols], shifted, dt)?;
            let gx = x.to_device(&dev)?;
            (x, gx)
        };
        let (w, gw) = random_pair(gpu, rng, &[cols], dt, 0.5)?;
        let (b, gb) = random_pair(gpu, rng, &[cols], dt, 0.5)?;
        let (dy, gdy) = random_pair_par(gpu, rng, &[rows, cols], dt, 1.0)?;
        let case = format!("{dt} {rows}x{cols} ({what})");
        let f = layer_norm_forward(&x, &w, &b, p)?;
        let gf = layer_norm_forward(&gx, &gw, &gb, p)?;
        lines.push(compare(OP, &case, "y", &gf.y, &f.y)?);
        lines.push(compare(OP, &case, "mean", &gf.mean, &f.mean)?);
        lines.push(compare(OP, &case, "rstd", &gf.rstd, &f.rstd)?);
        // The backward sees the reference's statistics on both sides, so that it is checked
        // on its own (the forward's are checked above).
        let (mean, rstd) = (f.mean.to_device(&dev)?, f.rstd.to_device(&dev)?);
        let bw = layer_norm_backward(&dy, &x, &w, &f.mean, &f.rstd)?;
        let gbw = layer_norm_backward(&gdy, &gx, &gw, &mean, &rstd)?;
        lines.push(compare(OP, &case, "dx", &gbw.dx, &bw.dx)?);
        lines.push(compare(OP, &case, "dw", &gbw.dw, &bw.dw)?);
        lines.push(compare(OP, &case, "db", &gbw.db, &bw.db)?);
    }
    Ok(lines)
}

pub const BENCH: KernelBench = KernelBench { op: OP, run: bench };

/// 8192 tokens x 4096, bf16, forward + backward with dw and db (as Liger's and torch's
/// layer_norm rows in bench/torch_kernels.py).
fn bench(gpu: &Arc<Gpu>, cfg: &BenchConfig) -> Result<Vec<BenchRow>> {
    let (rows, cols) = (8192, 4096);
    let mut rng = Rng::new(8);
    let (_, x) = random_pair_par(gpu, &mut rng, &[rows, cols], DType::BF16, 1.0)?;
    let (_, dy) = random_pair_par(gpu, &mut rng, &[rows, cols], DType::BF16, 1.0)?;
    let (_, w) = random_pair(gpu, &mut rng, &[cols], DType::BF16, 0.5)?;
    let (_, b) = random_pair(gpu, &mut rng, &[cols], DType::BF16, 0.5)?;
    let p = LayerNorm { eps: 1e-5 };
    let shape = format!("{rows}x{cols} bf16");
    let (e, h, m) = (rows * cols, cols, rows);
    // Forward reads x, w, b and writes y, mean, rstd; backward reads dy, x, w, mean, rstd and
    // writes dx, dw, db (f32).
    let fwd_floor = (2 * e + 4 * h + 2 * e + 8 * m) as f64;
    let floor = fwd_floor + (2 * e + 2 * e + 2 * h + 8 * m + 2 * e + 8 * h) as f64;
    let fused = measure(gpu, cfg, OP, "fused", &shape, floor, 0.0, || {
        let f = layer_norm_forward(&x, &w, &b, p)?;
        layer_norm_backward(&dy, &x, &w, &f.mean, &f.rstd)?;
        Ok(())
    })?;
    let fused_fwd = measure(gpu, cfg, OP, "fwd", &shape, fwd_floor, 0.0, || {
        layer_norm_forward(&x, &w, &b, p).map(|_| ())
    })?;
    // The same math as a composition of one-op kernels, each through device memory.
    let unfused = measure(gpu, cfg, OP, "unfused", &shape, floor, 0.0, || {
        use {BinaryOp::*, Broadcast::*};
        let f32_ = DType::F32;
        let xf = eager::unary(&x, UnaryOp::Cast, 0.0, f32_)?;
        let mean = eager::row_reduce(&xf, Reduce::Mean)?;
        let xc = eager::binary(&xf, &mean, PerRow, Sub, f32_)?;
        let sq = eager::unary(&xc, UnaryOp::Square, 0.0, f32_)?;
        let var = eager::row_reduce(&sq, Reduce::Mean)?;
        let r = eager::unary(&var, UnaryOp::RsqrtAdd, p.eps, f32_)?;
        let xh = eager::binary(&xc, &r, PerRow, Mul, f32_)?;
        let t = eager::binary(&xh, &w, Row, Mul, f32_)?;
        let _y = eager::binary(&t, &b, Row, Add, DType::BF16)?;
        let g = eager::binary(&dy, &w, Row, Mul, f32_)?;
        let mg = eager::row_reduce(&g, Reduce::Mean)?;
        let gx = eager::binary(&g, &xh, None, Mul, f32_)?;
        let mgx = eager::row_reduce(&gx, Reduce::Mean)?;
        let t1 = eager::binary(&g, &mg, PerRow, Sub, f32_)?;
        let t2 = eager::binary(&xh, &mgx, PerRow, Mul, f32_)?;
        let t3 = eager::binary(&t1, &t2, None, Sub, f32_)?;
        let _dx = eager::binary(&t3, &r, PerRow, Mul, DType::BF16)?;
        let dyxh = eager::binary(&dy, &xh, None, Mul, f32_)?;
        let _dw = eager::col_sum(&dyxh)?;
        let _db = eager::col_sum(&dy)?;
        Ok(())
    })?;
    Ok(vec![fused, fused_fwd, unfused])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::rel_err;

    /// Naive f64 forward.
    fn naive(x: &[f64], w: &[f64], b: &[f64], rows: usize, cols: usize, eps: f64) -> Vec<f64> {
        let mut y = vec![0.0; rows * cols];
        for r in 0..rows {
            let row = &x[r * cols..(r + 1) * cols];
            let mean = row.iter().sum::<f64>() / cols as f64;
            let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / cols as f64;
            let rstd = 1.0 / (var + eps).sqrt();
            for c in 0..cols {
                y[r * cols + c] = (row[c] - mean) * rstd * w[c] + b[c];
            }
        }
        y
    }

    fn f64s(v: &[f32]) -> Vec<f64> {
        v.iter().map(|&x| x as f64).collect()
    }

    fn shifted(rng: &mut Rng, n: usize) -> Vec<f32> {
        rng.normal_vec(n, 1.0).iter().map(|v| v + 0.7).collect()
    }

    #[test]
    fn forward_matches_f64() {
        let mut rng = Rng::new(31);
        let (rows, cols) = (7, 37);
        let xv = shifted(&mut rng, rows * cols);
        let wv = rng.normal_vec(cols, 1.0);
        let bv = rng.normal_vec(cols, 1.0);
        let t = |shape: &[usize], v: &Vec<f32>| Tensor::from_f32(shape, v.clone()).unwrap();
        let f = layer_norm_forward(
            &t(&[rows, cols], &xv),
            &t(&[cols], &wv),
            &t(&[cols], &bv),
            LayerNorm { eps: 1e-5 },
        )
        .unwrap();
        let want = naive(&f64s(&xv), &f64s(&wv), &f64s(&bv), rows, cols, 1e-5);
        let want: Vec<f32> = want.iter().map(|&v| v as f32).collect();
        assert!(rel_err(&f.y.to_f32_vec().unwrap(), &want) < 1e-6);
        let m = f.mean.to_f32_vec().unwrap();
        for r in 0..rows {
            let mean = xv[r * cols..(r + 1) * cols].iter().sum::<f32>() / cols as f32;
            assert!((m[r] - mean).abs() < 1e-5, "row {r}: {} vs {mean}", m[r]);
        }
    }

    /// dx, dw and db against central differences of the f64 forward, for L = sum(y * dy).
    #[test]
    fn backward_matches_finite_differences() {
        let mut rng = Rng::new(32);
        let (rows, cols) = (5, 13);
        let xv = shifted(&mut rng, rows * cols);
        let wv = rng.normal_vec(cols, 1.0);
        let bv = rng.normal_vec(cols, 1.0);
        let gv = rng.normal_vec(rows * cols, 1.0);
        let loss = |x: &[f64], w: &[f64], b: &[f64]| -> f64 {
            naive(x, w, b, rows, cols, 1e-5)
                .iter()
                .zip(&gv)
                .map(|(y, &g)| y * g as f64)
                .sum()
        };
        let p = LayerNorm { eps: 1e-5 };
        let t = |shape: &[usize], v: &Vec<f32>| Tensor::from_f32(shape, v.clone()).unwrap();
        let (x, w, b) = (t(&[rows, cols], &xv), t(&[cols], &wv), t(&[cols], &bv));
        let f = layer_norm_forward(&x, &w, &b, p).unwrap();
        let bw = layer_norm_backward(&t(&[rows, cols], &gv), &x, &w, &f.mean, &f.rstd).unwrap();
        let h = 1e-6;
        let (x64, w64, b64) = (f64s(&xv), f64s(&wv), f64s(&bv));
        // Central difference of the loss in coordinate i of argument `which` (0 x, 1 w, 2 b).
        let fd = |which: usize, len: usize| -> Vec<f32> {
            (0..len)
                .map(|i| {
                    let mut args = [x64.clone(), w64.clone(), b64.clone()];
                    args[which][i] += h;
                    let up = loss(&args[0], &args[1], &args[2]);
                    args[which][i] -= 2.0 * h;
                    let down = loss(&args[0], &args[1], &args[2]);
                    ((up - down) / (2.0 * h)) as f32
                })
                .collect()
        };
        let ex = rel_err(&bw.dx.to_f32_vec().unwrap(), &fd(0, rows * cols));
        let ew = rel_err(&bw.dw.to_f32_vec().unwrap(), &fd(1, cols));
        let eb = rel_err(&bw.db.to_f32_vec().unwrap(), &fd(2, cols));
        assert!(
            ex < 1e-5 && ew < 1e-5 && eb < 1e-5,
            "dx err {ex}, dw err {ew}, db err {eb}"
        );
        assert_eq!(bw.dw.dtype(), DType::F32);
        assert_eq!(bw.db.shape(), &[cols]);
    }

    #[test]
    fn bf16_forward_rounds_once() {
        // y = bf16(xh * w + b) with xh, w, b in f32: no rounding of xh in between.
        let xv = vec![1.0f32, 2.0, 4.0];
        let (wv, bv) = (vec![1.5f32, -0.75, 0.3], vec![0.1f32, 0.2, -0.3]);
        let bf =
            |v: &Vec<f32>, s: &[usize]| Tensor::from_f32_as(s, v.clone(), DType::BF16).unwrap();
        let f = layer_norm_forward(
            &bf(&xv, &[1, 3]),
            &bf(&wv, &[3]),
            &bf(&bv, &[3]),
            LayerNorm { eps: 0.0 },
        )
        .unwrap();
        let round = |v: f32| half::bf16::from_f32(v).to_f32();
        let mean = 7.0f32 / 3.0;
        let var = xv.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / 3.0;
        let rstd = 1.0 / var.sqrt();
        let want: Vec<f32> = (0..3)
            .map(|c| round((xv[c] - mean) * rstd * round(wv[c]) + round(bv[c])))
            .collect();
        assert_eq!(f.y.to_f32_vec().unwrap(), want);
        assert_eq!(f.y.dtype(), DType::BF16);
    }

    #[test]
    fn bad_inputs_name_the_op_and_shapes() {
        let x = Tensor::from_f32(&[2, 4], vec![1.0; 8]).unwrap();
        let w = Tensor::from_f32(&[4], vec![1.0; 4]).unwrap();
        let b5 = Tensor::from_f32(&[5], vec![1.0; 5]).unwrap();
        let p = LayerNorm { eps: 1e-5 };
        let e = layer_norm_forward(&x, &w, &b5, p)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("layer_norm")
                && e.contains("bias")
                && e.contains("[5]")
                && e.contains("[4]"),
            "{e}"
        );
        let e = layer_norm_forward(&x, &b5, &w, p)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("weight") && e.contains("[5]"), "{e}");
        let wb = Tensor::from_f32_as(&[4], vec![1.0; 4], DType::BF16).unwrap();
        let e = layer_norm_forward(&x, &w, &wb, p)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("layer_norm") && e.contains("bf16"), "{e}");
        let e = layer_norm_forward(&x, &w, &w, LayerNorm { eps: f32::NAN })
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("layer_norm") && e.contains("eps"), "{e}");
        let stats = Tensor::from_f32(&[3], vec![1.0; 3]).unwrap();
        let ok = Tensor::from_f32(&[2], vec![1.0; 2]).unwrap();
        let e = layer_norm_backward(&x, &x, &w, &stats, &ok)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("mean") && e.contains("[3]") && e.contains("[2]"),
            "{e}"
        );
        let e = layer_norm_backward(&x, &x, &w, &ok, &stats)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("rstd") && e.contains("[3]"), "{e}");
        let dy = Tensor::from_f32(&[4, 2], vec![1.0; 8]).unwrap();
        let e = layer_norm_backward(&dy, &x, &w, &ok, &ok)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("dy") && e.contains("[4, 2]"), "{e}");
    }
}
