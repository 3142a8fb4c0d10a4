//! RMSNorm, forward and backward, with HF's rounding: Llama-style (`w * bf16(x * rstd)`)
//! and Gemma-style (`x * rstd * (1 + w)`, rounded once). Only `rstd` (one f32 per row) is
//! saved for the backward; the weight gradient is optional because under LoRA the norm
//! weights are frozen.

use std::sync::Arc;

use crate::bench::{measure, BenchConfig, BenchRow, KernelBench};
use crate::check::{compare, random_pair, CheckLine, GpuCheck};
use crate::cpu::par_rows;
use crate::cuda::{Gpu, KernelSource};
use crate::error::{KernelError, Result};
use crate::ops::eager::{self, BinaryOp, Broadcast, Reduce, UnaryOp};
use crate::rng::Rng;
use crate::{launch, DType, Device, Tensor};

use super::{common_gpu, expect_dtype, expect_shape, row_grid};

pub const SOURCE: KernelSource = KernelSource {
    name: "rms_norm",
    src: include_str!("../../kernels/rms_norm.cu"),
};

const OP: &str = "rms_norm";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RmsNormKind {
    /// `y = w * bf16(x * rstd)`: Llama, Mistral, Qwen.
    Llama,
    /// `y = x * rstd * (1 + w)`: Gemma.
    Gemma,
}

#[derive(Clone, Copy, Debug)]
pub struct RmsNorm {
    pub eps: f32,
    pub kind: RmsNormKind,
}

pub struct RmsNormForward {
    /// Same shape and dtype as `x`.
    pub y: Tensor,
    /// `rsqrt(mean(x^2) + eps)`, f32, one per row: all the backward needs besides x.
    pub rstd: Tensor,
}

pub struct RmsNormBackward {
    pub dx: Tensor,
    /// f32 `[cols]`, when asked for.
    pub dw: Option<Tensor>,
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

fn check_eps(p: RmsNorm) -> Result<()> {
    if !(p.eps >= 0.0 && p.eps.is_finite()) {
        return Err(KernelError::invalid(
            OP,
            format!("eps must be finite and >= 0, got {}", p.eps),
        ));
    }
    Ok(())
}

/// The backward's inputs checked; the GPU they are on (None: the CPU), rows and cols.
fn check_backward(
    dy: &Tensor,
    x: &Tensor,
    weight: &Tensor,
    rstd: &Tensor,
) -> Result<(Option<Arc<Gpu>>, usize, usize)> {
    let (rows, cols) = check_x_w(x, weight)?;
    expect_dtype(OP, "dy", dy, &[x.dtype()])?;
    expect_shape(OP, "dy", dy, x.shape())?;
    expect_dtype(OP, "rstd", rstd, &[DType::F32])?;
    expect_shape(OP, "rstd", rstd, &[rows])?;
    let gpu = common_gpu(
        OP,
        &[("dy", dy), ("x", x), ("weight", weight), ("rstd", rstd)],
    )?;
    Ok((gpu, rows, cols))
}

pub fn rms_norm_forward(x: &Tensor, weight: &Tensor, p: RmsNorm) -> Result<RmsNormForward> {
    let (rows, cols) = check_x_w(x, weight)?;
    check_eps(p)?;
    match common_gpu(OP, &[("x", x), ("weight", weight)])? {
        None => cpu_forward(x, weight, p, rows, cols),
        Some(gpu) => {
            let y = Tensor::uninit_cuda(&gpu, x.shape(), x.dtype())?;
            let rstd = Tensor::uninit_cuda(&gpu, &[rows], DType::F32)?;
            let (name, threads) = variant(cols, "forward", "", x.dtype());
            let f = gpu.function(&SOURCE, &name)?;
            launch!(gpu, f, (row_grid(&gpu, rows, 8), 1, 1), (threads, 1, 1), 0;
                x.dptr(), weight.dptr(), y.dptr(), rstd.dptr(),
                rows as i32, cols as i32, p.eps, (p.kind == RmsNormKind::Gemma) as i32)?;
            Ok(RmsNormForward { y, rstd })
        }
    }
}

pub fn rms_norm_backward(
    dy: &Tensor,
    x: &Tensor,
    weight: &Tensor,
    rstd: &Tensor,
    p: RmsNorm,
    weight_grad: bool,
) -> Result<RmsNormBackward> {
    let (gpu, rows, cols) = check_backward(dy, x, weight, rstd)?;
    let Some(gpu) = gpu else {
        return cpu_backward(dy, x, weight, rstd, p, weight_grad, None, rows, cols);
    };
    let dx = Tensor::uninit_cuda(&gpu, x.shape(), x.dtype())?;
    let dw = launch_backward(
        &gpu,
        dy.dptr(),
        x,
        weight,
        rstd,
        dx.dptr(),
        p,
        weight_grad,
        None,
    )?;
    Ok(RmsNormBackward { dx, dw })
}

/// The backward for dx only, written over `dy` (the weight is frozen under LoRA, and the
/// caller has no further use for dy): no extra activation-sized buffer, as Liger-Kernel's
/// in-place RMSNorm backward.
pub fn rms_norm_backward_inplace(
    dy: &mut Tensor,
    x: &Tensor,
    weight: &Tensor,
    rstd: &Tensor,
    p: RmsNorm,
) -> Result<()> {
    backward_inplace(dy, x, weight, rstd, p, None)
}

/// [`rms_norm_backward_inplace`] with `residual` added: `dy <- dx + residual`, where
/// `residual` is the gradient that reaches the norm's input along the residual stream. One
/// kernel instead of the backward and an add that reads and rewrites dx; in bf16 the sum
/// is rounded once (`bf16(dx + residual)`, where the two-kernel form rounds dx first).
pub fn rms_norm_backward_add_inplace(
    dy: &mut Tensor,
    x: &Tensor,
    weight: &Tensor,
    rstd: &Tensor,
    p: RmsNorm,
    residual: &Tensor,
) -> Result<()> {
    backward_inplace(dy, x, weight, rstd, p, Some(residual))
}

fn backward_inplace(
    dy: &mut Tensor,
    x: &Tensor,
    weight: &Tensor,
    rstd: &Tensor,
    p: RmsNorm,
    residual: Option<&Tensor>,
) -> Result<()> {
    let (gpu, rows, cols) = check_backward(dy, x, weight, rstd)?;
    if let Some(res) = residual {
        expect_dtype(OP, "residual", res, &[x.dtype()])?;
        expect_shape(OP, "residual", res, x.shape())?;
        common_gpu(OP, &[("dy", dy), ("residual", res)])?;
    }
    let Some(gpu) = gpu else {
        *dy = cpu_backward(dy, x, weight, rstd, p, false, residual, rows, cols)?.dx;
        return Ok(());
    };
    launch_backward(
        &gpu,
        dy.dptr(),
        x,
        weight,
        rstd,
        dy.dptr(),
        p,
        false,
        residual,
    )?;
    Ok(())
}

/// [`rms_norm_forward`] as the plain composition of one-op kernels that HF's
/// `LlamaRMSNorm` / `GemmaRMSNorm` run eagerly: upcast, square, mean, rsqrt, scale, then
/// (Llama) downcast and weight multiply, or (Gemma) multiply by `1 + w` and downcast. Same
/// outputs (y in x's dtype, f32 rstd). It exists to measure what the fused kernel saves and
/// to take it out of the picture when debugging. On the CPU there is one implementation,
/// the reference, which this runs.
pub fn rms_norm_forward_unfused(x: &Tensor, weight: &Tensor, p: RmsNorm) -> Result<RmsNormForward> {
    check_x_w(x, weight)?;
    check_eps(p)?;
    if common_gpu(OP, &[("x", x), ("weight", weight)])?.is_none() {
        return rms_norm_forward(x, weight, p);
    }
    let f = DType::F32;
    let xf = eager::unary(x, UnaryOp::Cast, 0.0, f)?;
    let sq = eager::unary(&xf, UnaryOp::Square, 0.0, f)?;
    let ms = eager::row_reduce(&sq, Reduce::Mean)?;
    drop(sq);
    let rstd = eager::unary(&ms, UnaryOp::RsqrtAdd, p.eps, f)?;
    let xn = eager::binary(&xf, &rstd, Broadcast::PerRow, BinaryOp::Mul, f)?;
    drop(xf);
    let y = match p.kind {
        RmsNormKind::Llama => {
            let xnr = eager::unary(&xn, UnaryOp::Cast, 0.0, x.dtype())?;
            drop(xn);
            eager::binary(&xnr, weight, Broadcast::Row, BinaryOp::Mul, x.dtype())?
        }
        RmsNormKind::Gemma => {
            let w1 = eager::unary(weight, UnaryOp::AddScalar, 1.0, f)?;
            eager::binary(&xn, &w1, Broadcast::Row, BinaryOp::Mul, x.dtype())?
        }
    };
    Ok(RmsNormForward { y, rstd })
}

/// [`rms_norm_backward`] as the plain composition autograd runs through the eager forward:
/// `xn = x * rstd` recomputed (upcast, multiply), `g = dy * w` (or `1 + w`), then
/// `dx = rstd * (g - xn * mean(g * xn))` one op at a time, and `dw` as the column sum of
/// `dy * xn` (xn rounded as the forward rounds it). Same outputs; the CPU runs the reference.
pub fn rms_norm_backward_unfused(
    dy: &Tensor,
    x: &Tensor,
    weight: &Tensor,
    rstd: &Tensor,
    p: RmsNorm,
    weight_grad: bool,
) -> Result<RmsNormBackward> {
    if check_backward(dy, x, weight, rstd)?.0.is_none() {
        return rms_norm_backward(dy, x, weight, rstd, p, weight_grad);
    }
    let f = DType::F32;
    let xf = eager::unary(x, UnaryOp::Cast, 0.0, f)?;
    let xn = eager::binary(&xf, rstd, Broadcast::PerRow, BinaryOp::Mul, f)?;
    drop(xf);
    let g = match p.kind {
        RmsNormKind::Llama => eager::binary(dy, weight, Broadcast::Row, BinaryOp::Mul, f)?,
        RmsNormKind::Gemma => {
            let w1 = eager::unary(weight, UnaryOp::AddScalar, 1.0, f)?;
            eager::binary(dy, &w1, Broadcast::Row, BinaryOp::Mul, f)?
        }
    };
    let gx = eager::binary(&g, &xn, Broadcast::None, BinaryOp::Mul, f)?;
    let dot = eager::row_reduce(&gx, Reduce::Mean)?;
    drop(gx);
    let t = eager::binary(&xn, &dot, Broadcast::PerRow, BinaryOp::Mul, f)?;
    let d = eager::binary(&g, &t, Broadcast::None, BinaryOp::Sub, f)?;
    drop((g, t));
    let dx = eager::binary(&d, rstd, Broadcast::PerRow, BinaryOp::Mul, x.dtype())?;
    drop(d);
    let dw = if weight_grad {
        let xn = match p.kind {
            RmsNormKind::Llama => eager::unary(&xn, UnaryOp::Cast, 0.0, x.dtype())?,
            RmsNormKind::Gemma => xn,
        };
        let prod = eager::binary(dy, &xn, Broadcast::None, BinaryOp::Mul, f)?;
        Some(eager::col_sum(&prod)?)
    } else {
        None
    };
    Ok(RmsNormBackward { dx, dw })
}

/// Launch the backward kernel reading `dy` and writing `dx` (which may be `dy`, without
/// the weight gradient) plus `residual` when given, and reduce the weight gradient's
/// partials when asked.
#[allow(clippy::too_many_arguments)]
fn launch_backward(
    gpu: &Arc<Gpu>,
    dy: u64,
    x: &Tensor,
    weight: &Tensor,
    rstd: &Tensor,
    dx: u64,
    p: RmsNorm,
    weight_grad: bool,
    residual: Option<&Tensor>,
) -> Result<Option<Tensor>> {
    let (rows, cols) = x.rows_cols();
    // With dw each block writes one partial row, so fewer blocks; without, fill the GPU.
    let grid = row_grid(gpu, rows, if weight_grad { 4 } else { 8 });
    let partial = if weight_grad {
        Some(Tensor::uninit_cuda(
            gpu,
            &[grid as usize, cols],
            DType::F32,
        )?)
    } else {
        None
    };
    let (name, threads) = variant(
        cols,
        "backward",
        if weight_grad { "_dw" } else { "" },
        x.dtype(),
    );
    let f = gpu.function(&SOURCE, &name)?;
    launch!(gpu, f, (grid, 1, 1), (threads, 1, 1), 0;
        dy, x.dptr(), weight.dptr(), rstd.dptr(), dx,
        partial.as_ref().map_or(0u64, |t| t.dptr()),
        rows as i32, cols as i32, (p.kind == RmsNormKind::Gemma) as i32,
        residual.map_or(0u64, |t| t.dptr()))?;
    let dw = match partial {
        None => None,
        Some(partial) => {
            let dw = Tensor::uninit_cuda(gpu, &[cols], DType::F32)?;
            let f = gpu.function(&SOURCE, "rms_norm_dw_reduce")?;
            launch!(gpu, f, (cols.div_ceil(256) as u32, 1, 1), (256, 1, 1), 0;
                partial.dptr(), dw.dptr(), grid as i32, cols as i32)?;
            Some(dw)
        }
    };
    Ok(dw)
}

/// The kernel variant and block size for a row length: whole rows in registers when the row
/// is a multiple of 8 elements and fits (2 chunks of 8 per thread, or 4 for long rows), plain
/// loops otherwise. `dw` ("" or "_dw") picks the backward with weight-gradient partials;
/// the plain-loop kernels take it as a null pointer instead.
fn variant(cols: usize, dir: &str, dw: &str, dtype: DType) -> (String, u32) {
    let chunks = cols / 8;
    let sfx = dtype.kernel_suffix();
    // Thread caps keep a block within the SM's 64K registers: the vec2 kernels use up to
    // ~100 registers per thread, the vec4 ones up to ~170.
    for (v, max_threads) in [(2usize, 512usize), (4, 256)] {
        if cols.is_multiple_of(8) && chunks.div_ceil(v) <= max_threads {
            let threads = chunks.div_ceil(v).div_ceil(32) * 32;
            return (format!("rms_norm_{dir}_vec{v}{dw}_{sfx}"), threads as u32);
        }
    }
    let threads = cols.div_ceil(32).clamp(1, 8) * 32;
    (format!("rms_norm_{dir}_any_{sfx}"), threads as u32)
}

fn round_to(dtype: DType, v: f32) -> f32 {
    match dtype {
        DType::BF16 => half::bf16::from_f32(v).to_f32(),
        _ => v,
    }
}

fn cpu_forward(
    x: &Tensor,
    w: &Tensor,
    p: RmsNorm,
    rows: usize,
    cols: usize,
) -> Result<RmsNormForward> {
    let xs = x.cpu_f32();
    let ws = w.cpu_f32();
    let dt = x.dtype();
    let mut rstd = vec![0.0f32; rows];
    par_rows(&mut rstd, 1, |r, o| {
        let row = &xs[r * cols..(r + 1) * cols];
        let ss: f64 = row.iter().map(|&v| v as f64 * v as f64).sum();
        o[0] = 1.0 / ((ss / cols as f64) as f32 + p.eps).sqrt();
    });
    let mut y = vec![0.0f32; rows * cols];
    par_rows(&mut y, cols, |r, out| {
        let row = &xs[r * cols..(r + 1) * cols];
        for c in 0..cols {
            out[c] = match p.kind {
                RmsNormKind::Llama => ws[c] * round_to(dt, row[c] * rstd[r]),
                RmsNormKind::Gemma => row[c] * rstd[r] * (1.0 + ws[c]),
            };
        }
    });
    Ok(RmsNormForward {
        y: Tensor::from_f32_as(x.shape(), y, dt)?,
        rstd: Tensor::from_f32(&[rows], rstd)?,
    })
}

#[allow(clippy::too_many_arguments)]
fn cpu_backward(
    dy: &Tensor,
    x: &Tensor,
    w: &Tensor,
    rstd: &Tensor,
    p: RmsNorm,
    weight_grad: bool,
    residual: Option<&Tensor>,
    rows: usize,
    cols: usize,
) -> Result<RmsNormBackward> {
    let (dys, xs, ws, rs) = (dy.cpu_f32(), x.cpu_f32(), w.cpu_f32(), rstd.cpu_f32());
    let res = residual.map(|t| t.cpu_f32());
    let dt = x.dtype();
    let gemma = p.kind == RmsNormKind::Gemma;
    let weff: Vec<f32> = ws
        .iter()
        .map(|&v| if gemma { 1.0 + v } else { v })
        .collect();
    let mut dx = vec![0.0f32; rows * cols];
    par_rows(&mut dx, cols, |r, out| {
        let (xr, gr) = (
            &xs[r * cols..(r + 1) * cols],
            &dys[r * cols..(r + 1) * cols],
        );
        let rr = rs[r];
        let dot: f64 = (0..cols)
            .map(|c| (gr[c] * weff[c]) as f64 * (xr[c] * rr) as f64)
            .sum::<f64>()
            / cols as f64;
        for c in 0..cols {
            out[c] = rr * (gr[c] * weff[c] - xr[c] * rr * dot as f32);
        }
        if let Some(res) = &res {
            for (o, &v) in out.iter_mut().zip(&res[r * cols..(r + 1) * cols]) {
                *o += v;
            }
        }
    });
    let dw = if weight_grad {
        let mut dw = vec![0.0f32; cols];
        par_rows(&mut dw, 1, |c, o| {
            let mut s = 0.0f64;
            for r in 0..rows {
                let xn = xs[r * cols + c] * rs[r];
                let xn = if gemma { xn } else { round_to(dt, xn) };
                s += dys[r * cols + c] as f64 * xn as f64;
            }
            o[0] = s as f32;
        });
        Some(Tensor::from_f32(&[cols], dw)?)
    } else {
        None
    };
    Ok(RmsNormBackward {
        dx: Tensor::from_f32_as(x.shape(), dx, dt)?,
        dw,
    })
}

pub const CHECK: GpuCheck = GpuCheck {
    op: OP,
    run: gpu_check,
};

fn gpu_check(gpu: &Arc<Gpu>, rng: &mut Rng) -> Result<Vec<CheckLine>> {
    let mut lines = Vec::new();
    let cases = [
        (
            RmsNormKind::Llama,
            DType::BF16,
            8192,
            4096,
            "Llama-3-8B hidden",
        ),
        (
            RmsNormKind::Llama,
            DType::F32,
            37,
            1000,
            "odd rows, row not /8",
        ),
        (RmsNormKind::Llama, DType::BF16, 129, 3000, "odd rows"),
        (RmsNormKind::Gemma, DType::BF16, 19, 2056, "gemma"),
        (
            RmsNormKind::Gemma,
            DType::F32,
            33,
            40000,
            "row too long for registers",
        ),
        (
            RmsNormKind::Llama,
            DType::BF16,
            300,
            128,
            "qk-norm head_dim",
        ),
        (
            RmsNormKind::Llama,
            DType::BF16,
            64,
            8192,
            "70B hidden (vec2, 512 threads)",
        ),
        (
            RmsNormKind::Llama,
            DType::BF16,
            40,
            16384,
            "long row (plain loops)",
        ),
    ];
    for (kind, dt, rows, cols, what) in cases {
        let p = RmsNorm { eps: 1e-6, kind };
        let (x, gx) = random_pair(gpu, rng, &[rows, cols], dt, 1.0)?;
        let (w, gw) = random_pair(gpu, rng, &[cols], dt, 0.5)?;
        let (dy, gdy) = random_pair(gpu, rng, &[rows, cols], dt, 1.0)?;
        let case = format!("{kind:?} {dt} {rows}x{cols} ({what})");
        let f = rms_norm_forward(&x, &w, p)?;
        let gf = rms_norm_forward(&gx, &gw, p)?;
        lines.push(compare(OP, &case, "y", &gf.y, &f.y)?);
        lines.push(compare(OP, &case, "rstd", &gf.rstd, &f.rstd)?);
        // The backward sees the reference's rstd on both sides: with its own, a 1-ulp rstd
        // difference flips the bf16 rounding of x * rstd for a few elements, which is the
        // forward's rounding, not a backward error.
        let rstd = f.rstd.to_device(&Device::Cuda(gpu.clone()))?;
        let b = rms_norm_backward(&dy, &x, &w, &f.rstd, p, true)?;
        let gb = rms_norm_backward(&gdy, &gx, &gw, &rstd, p, true)?;
        let gb_nodw = rms_norm_backward(&gdy, &gx, &gw, &rstd, p, false)?;
        lines.push(compare(OP, &case, "dx(no dw)", &gb_nodw.dx, &b.dx)?);
        let mut gdx = gdy.to_device(&Device::Cuda(gpu.clone()))?;
        rms_norm_backward_inplace(&mut gdx, &gx, &gw, &rstd, p)?;
        lines.push(compare(OP, &case, "dx(in place)", &gdx, &b.dx)?);
        // With the residual stream's gradient added in the same kernel, against the CPU's
        // same composition (one rounding of the sum).
        let (res, gres) = random_pair(gpu, rng, &[rows, cols], dt, 1.0)?;
        let mut dx_res = dy.to_cpu()?;
        rms_norm_backward_add_inplace(&mut dx_res, &x, &w, &f.rstd, p, &res)?;
        let mut gdx_res = gdy.to_device(&Device::Cuda(gpu.clone()))?;
        rms_norm_backward_add_inplace(&mut gdx_res, &gx, &gw, &rstd, p, &gres)?;
        lines.push(compare(
            OP,
            &case,
            "dx(in place + residual)",
            &gdx_res,
            &dx_res,
        )?);
        lines.push(compare(OP, &case, "dx", &gb.dx, &b.dx)?);
        lines.push(compare(
            OP,
            &case,
            "dw",
            gb.dw.as_ref().unwrap(),
            b.dw.as_ref().unwrap(),
        )?);
        let uf = rms_norm_forward_unfused(&gx, &gw, p)?;
        lines.push(compare(OP, &case, "y(unfused)", &uf.y, &f.y)?);
        lines.push(compare(OP, &case, "rstd(unfused)", &uf.rstd, &f.rstd)?);
        let ub = rms_norm_backward_unfused(&gdy, &gx, &gw, &rstd, p, true)?;
        lines.push(compare(OP, &case, "dx(unfused)", &ub.dx, &b.dx)?);
        lines.push(compare(
            OP,
            &case,
            "dw(unfused)",
            ub.dw.as_ref().unwrap(),
            b.dw.as_ref().unwrap(),
        )?);
    }
    Ok(lines)
}

pub const BENCH: KernelBench = KernelBench { op: OP, run: bench };

/// 8192 tokens x 4096, bf16, forward + backward for dx only (frozen weight under LoRA).
fn bench(gpu: &Arc<Gpu>, cfg: &BenchConfig) -> Result<Vec<BenchRow>> {
    let (rows, cols) = (8192, 4096);
    let dev = Device::Cuda(gpu.clone());
    let mut rng = Rng::new(7);
    let x = Tensor::from_f32_as(&[rows, cols], rng.normal_vec(rows * cols, 1.0), DType::BF16)?
        .to_device(&dev)?;
    let w =
        Tensor::from_f32_as(&[cols], rng.normal_vec(cols, 0.5), DType::BF16)?.to_device(&dev)?;
    let mut dy = Tensor::from_f32_as(&[rows, cols], rng.normal_vec(rows * cols, 1.0), DType::BF16)?
        .to_device(&dev)?;
    let p = RmsNorm {
        eps: 1e-6,
        kind: RmsNormKind::Llama,
    };
    let shape = format!("{rows}x{cols} bf16");
    // Forward reads x, writes y; backward reads dy and x, writes dx. rstd and w are tiny.
    let floor = (5 * rows * cols * 2 + 2 * rows * 4) as f64;
    let fused = measure(gpu, cfg, OP, "fused", &shape, floor, 0.0, || {
        let f = rms_norm_forward(&x, &w, p)?;
        // dx over dy, as the engine runs it (dy's values drift from run to run; the
        // kernel's time does not depend on them).
        rms_norm_backward_inplace(&mut dy, &x, &w, &f.rstd, p)?;
        Ok(())
    })?;
    let fwd_floor = (2 * rows * cols * 2 + rows * 4) as f64;
    let fused_fwd = measure(gpu, cfg, OP, "fused-fwd", &shape, fwd_floor, 0.0, || {
        rms_norm_forward(&x, &w, p)?;
        Ok(())
    })?;
    // Eager composition, as HF's LlamaRMSNorm runs under autograd (the backward recomputes
    // x * rstd from the saved rstd, as the engine's unfused mode does).
    let unfused = measure(gpu, cfg, OP, "unfused", &shape, floor, 0.0, || {
        let f = rms_norm_forward_unfused(&x, &w, p)?;
        rms_norm_backward_unfused(&dy, &x, &w, &f.rstd, p, false)?;
        Ok(())
    })?;
    // The layer backward's norm with the residual stream's gradient: added in the kernel
    // (reads dy, x, res; writes dx) against the in-place backward and a separate add (which
    // reads dx and res again and rewrites dx).
    let res = Tensor::from_f32_as(&[rows, cols], rng.normal_vec(rows * cols, 1.0), DType::BF16)?
        .to_device(&dev)?;
    let rstd = rms_norm_forward(&x, &w, p)?.rstd;
    let res_floor = (4 * rows * cols * 2 + rows * 4) as f64;
    let op = format!("{OP}_bwd_residual");
    let with_res = measure(gpu, cfg, &op, "fused", &shape, res_floor, 0.0, || {
        rms_norm_backward_add_inplace(&mut dy, &x, &w, &rstd, p, &res)
    })?;
    let separate = measure(
        gpu,
        cfg,
        &op,
        "separate-add",
        &shape,
        res_floor,
        0.0,
        || {
            rms_norm_backward_inplace(&mut dy, &x, &w, &rstd, p)?;
            crate::ops::elementwise::add_inplace(&mut dy, &res, 1.0)
        },
    )?;
    Ok(vec![fused, fused_fwd, unfused, with_res, separate])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Naive f64 forward, without bf16 rounding (tests run f32).
    fn naive(x: &[f64], w: &[f64], rows: usize, cols: usize, eps: f64, gemma: bool) -> Vec<f64> {
        let mut y = vec![0.0; rows * cols];
        for r in 0..rows {
            let row = &x[r * cols..(r + 1) * cols];
            let rstd = 1.0 / (row.iter().map(|v| v * v).sum::<f64>() / cols as f64 + eps).sqrt();
            for c in 0..cols {
                let wc = if gemma { 1.0 + w[c] } else { w[c] };
                y[r * cols + c] = row[c] * rstd * wc;
            }
        }
        y
    }

    fn f64s(v: &[f32]) -> Vec<f64> {
        v.iter().map(|&x| x as f64).collect()
    }

    #[test]
    fn forward_matches_f64() {
        let mut rng = Rng::new(11);
        for kind in [RmsNormKind::Llama, RmsNormKind::Gemma] {
            let (rows, cols) = (7, 37);
            let xv = rng.normal_vec(rows * cols, 1.0);
            let wv = rng.normal_vec(cols, 1.0);
            let x = Tensor::from_f32(&[rows, cols], xv.clone()).unwrap();
            let w = Tensor::from_f32(&[cols], wv.clone()).unwrap();
            let f = rms_norm_forward(&x, &w, RmsNorm { eps: 1e-5, kind }).unwrap();
            let want = naive(
                &f64s(&xv),
                &f64s(&wv),
                rows,
                cols,
                1e-5,
                kind == RmsNormKind::Gemma,
            );
            let want: Vec<f32> = want.iter().map(|&v| v as f32).collect();
            assert!(
                crate::check::rel_err(&f.y.to_f32_vec().unwrap(), &want) < 1e-6,
                "{kind:?}"
            );
        }
    }

    /// The backward against central differences of the f64 forward, for L = sum(y * g).
    #[test]
    fn backward_matches_finite_differences() {
        let mut rng = Rng::new(12);
        for kind in [RmsNormKind::Llama, RmsNormKind::Gemma] {
            let (rows, cols) = (5, 13);
            let gemma = kind == RmsNormKind::Gemma;
            let xv = rng.normal_vec(rows * cols, 1.0);
            let wv = rng.normal_vec(cols, 1.0);
            let gv = rng.normal_vec(rows * cols, 1.0);
            let loss = |x: &[f64], w: &[f64]| -> f64 {
                naive(x, w, rows, cols, 1e-5, gemma)
                    .iter()
                    .zip(&gv)
                    .map(|(y, &g)| y * g as f64)
                    .sum()
            };
            let p = RmsNorm { eps: 1e-5, kind };
            let x = Tensor::from_f32(&[rows, cols], xv.clone()).unwrap();
            let w = Tensor::from_f32(&[cols], wv.clone()).unwrap();
            let dy = Tensor::from_f32(&[rows, cols], gv.clone()).unwrap();
            let f = rms_norm_forward(&x, &w, p).unwrap();
            let b = rms_norm_backward(&dy, &x, &w, &f.rstd, p, true).unwrap();
            let h = 1e-6;
            let (x64, w64) = (f64s(&xv), f64s(&wv));
            let fd_x: Vec<f32> = (0..x64.len())
                .map(|i| {
                    let (mut a, mut b) = (x64.clone(), x64.clone());
                    a[i] += h;
                    b[i] -= h;
                    ((loss(&a, &w64) - loss(&b, &w64)) / (2.0 * h)) as f32
                })
                .collect();
            let fd_w: Vec<f32> = (0..w64.len())
                .map(|i| {
                    let (mut a, mut b) = (w64.clone(), w64.clone());
                    a[i] += h;
                    b[i] -= h;
                    ((loss(&x64, &a) - loss(&x64, &b)) / (2.0 * h)) as f32
                })
                .collect();
            let ex = crate::check::rel_err(&b.dx.to_f32_vec().unwrap(), &fd_x);
            let ew = crate::check::rel_err(&b.dw.unwrap().to_f32_vec().unwrap(), &fd_w);
            assert!(ex < 1e-5 && ew < 1e-5, "{kind:?}: dx err {ex}, dw err {ew}");
        }
    }

    /// The residual form is the in-place backward plus the residual, summed in f32 and
    /// rounded once; a residual of the wrong shape is a named error.
    #[test]
    fn backward_add_inplace_adds_the_residual_once() {
        let mut rng = Rng::new(9);
        let (rows, cols) = (5, 24);
        for (dt, kind) in [
            (DType::F32, RmsNormKind::Llama),
            (DType::BF16, RmsNormKind::Gemma),
        ] {
            let p = RmsNorm { eps: 1e-6, kind };
            let t = |v: Vec<f32>, shape: &[usize]| Tensor::from_f32_as(shape, v, dt).unwrap();
            let x = t(rng.normal_vec(rows * cols, 1.0), &[rows, cols]);
            let w = t(rng.normal_vec(cols, 0.5), &[cols]);
            let dy = t(rng.normal_vec(rows * cols, 1.0), &[rows, cols]);
            let res = t(rng.normal_vec(rows * cols, 1.0), &[rows, cols]);
            let f = rms_norm_forward(&x, &w, p).unwrap();
            let plain = cpu_backward(&dy, &x, &w, &f.rstd, p, false, None, rows, cols).unwrap();
            // The unrounded dx (f32 dy copy, so nothing is rounded on the way).
            let f32_of = |t: &Tensor| Tensor::from_f32(t.shape(), t.to_f32_vec().unwrap()).unwrap();
            let (dy32, x32, w32) = (f32_of(&dy), f32_of(&x), f32_of(&w));
            let exact =
                cpu_backward(&dy32, &x32, &w32, &f.rstd, p, false, None, rows, cols).unwrap();
            let want: Vec<f32> = exact
                .dx
                .to_f32_vec()
                .unwrap()
                .iter()
                .zip(res.to_f32_vec().unwrap())
                .map(|(d, r)| round_to(dt, d + r))
                .collect();
            let mut got = dy.to_cpu().unwrap();
            rms_norm_backward_add_inplace(&mut got, &x, &w, &f.rstd, p, &res).unwrap();
            assert_eq!(got.to_f32_vec().unwrap(), want, "{dt}");
            let mut inplace = dy.to_cpu().unwrap();
            rms_norm_backward_inplace(&mut inplace, &x, &w, &f.rstd, p).unwrap();
            assert_eq!(
                inplace.to_f32_vec().unwrap(),
                plain.dx.to_f32_vec().unwrap()
            );
            let bad = t(vec![0.0; rows * (cols - 1)], &[rows, cols - 1]);
            let e = rms_norm_backward_add_inplace(&mut got, &x, &w, &f.rstd, p, &bad)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("residual") && e.contains(&format!("{}", cols - 1)),
                "{e}"
            );
        }
    }

    #[test]
    fn bf16_forward_rounds_where_hf_does() {
        // Llama: y = bf16(w * bf16(x * rstd)). With w = 1 the output is bf16(x*rstd) exactly.
        let x = Tensor::from_f32_as(&[1, 3], vec![1.0, 2.0, 3.0], DType::BF16).unwrap();
        let w = Tensor::from_f32_as(&[3], vec![1.0; 3], DType::BF16).unwrap();
        let f = rms_norm_forward(
            &x,
            &w,
            RmsNorm {
                eps: 0.0,
                kind: RmsNormKind::Llama,
            },
        )
        .unwrap();
        let rstd = 1.0 / (14.0f32 / 3.0).sqrt();
        let want: Vec<f32> = [1.0f32, 2.0, 3.0]
            .iter()
            .map(|v| half::bf16::from_f32(v * rstd).to_f32())
            .collect();
        assert_eq!(f.y.to_f32_vec().unwrap(), want);
    }

    #[test]
    fn bad_inputs_name_the_op_and_shapes() {
        let x = Tensor::from_f32(&[2, 4], vec![1.0; 8]).unwrap();
        let w = Tensor::from_f32(&[5], vec![1.0; 5]).unwrap();
        let p = RmsNorm {
            eps: 1e-6,
            kind: RmsNormKind::Llama,
        };
        let e = rms_norm_forward(&x, &w, p).err().unwrap().to_string();
        assert!(
            e.contains("rms_norm") && e.contains("[5]") && e.contains("[4]"),
            "{e}"
        );
        let wb = Tensor::from_f32_as(&[4], vec![1.0; 4], DType::BF16).unwrap();
        let e = rms_norm_forward(&x, &wb, p).err().unwrap().to_string();
        assert!(e.contains("rms_norm") && e.contains("bf16"), "{e}");
        let w4 = Tensor::from_f32(&[4], vec![1.0; 4]).unwrap();
        let rstd = Tensor::from_f32(&[3], vec![1.0; 3]).unwrap();
        let e = rms_norm_backward(&x, &x, &w4, &rstd, p, false)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("rstd") && e.contains("[3]"), "{e}");
    }
}
