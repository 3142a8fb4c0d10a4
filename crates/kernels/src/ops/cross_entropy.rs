//! Cross-entropy over the vocabulary, with the gradient written in the same pass, in place of
//! the logits (so the backward costs nothing and no second logits-sized buffer exists).
//!
//! Semantics (HF / torch, computed in fp32 from the stored logits): `ignore_index` rows are
//! skipped; the loss is the sum of token losses over the normalizer (by default the number of
//! non-ignored tokens of this call; gradient accumulation passes the count over all its
//! micro-batches as `num_items`); label smoothing as in torch
//! (`(1 - eps) * nll + eps * mean over classes of -log p`); optional z-loss `coef * lse^2`
//! per token; optional logit soft-cap `c * tanh(x / c)` before the softmax, with its chain
//! rule factor in the gradient. With no valid token and no `num_items`, the loss and the
//! gradient are 0 (not NaN): a micro-batch whose labels are all masked must not poison a step.
//!
//! The loss reduction is deterministic: one loss per row, then a fixed-order sum.

use std::sync::Arc;

use crate::bench::{measure, BenchConfig, BenchRow, KernelBench};
use crate::check::{compare, compare_scalar, random_pair, CheckLine, GpuCheck};
use crate::cpu::{par_map, par_rows};
use crate::cuda::{Gpu, KernelSource};
use crate::error::{KernelError, Result};
use crate::ops::eager::{self, BinaryOp, Broadcast, Reduce, UnaryOp};
use crate::rng::Rng;
use crate::{launch, DType, Device, Tensor};

use super::{common_gpu, expect_dtype, expect_shape};

pub const SOURCE: KernelSource = KernelSource {
    name: "cross_entropy",
    src: include_str!("../../kernels/cross_entropy.cu"),
};

const OP: &str = "cross_entropy";

/// The torch / HF default label that marks a token without a loss.
pub const IGNORE_INDEX: i32 = -100;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CrossEntropy {
    /// Labels equal to this are skipped (no loss, zero gradient).
    pub ignore_index: i32,
    /// Torch's `label_smoothing`, in [0, 1].
    pub label_smoothing: f32,
    /// Coefficient of the z-loss `lse^2` added per token (0 for none).
    pub z_loss: f32,
    /// Logit soft-cap `c`: logits become `c * tanh(logits / c)` before the softmax.
    pub softcap: Option<f32>,
    /// The normalizer of the loss and the gradient; None: this call's non-ignored tokens.
    pub num_items: Option<f32>,
    /// Extra factor on the gradient only (loss scaling, or 1 / accumulation steps).
    pub grad_scale: f32,
}

impl Default for CrossEntropy {
    fn default() -> Self {
        CrossEntropy {
            ignore_index: IGNORE_INDEX,
            label_smoothing: 0.0,
            z_loss: 0.0,
            softcap: None,
            num_items: None,
            grad_scale: 1.0,
        }
    }
}

pub struct CrossEntropyOut {
    /// f32 `[1]` on the logits' device: sum of token losses / normalizer.
    pub loss: Tensor,
    /// Tokens whose label is not `ignore_index`.
    pub n_valid: usize,
}

/// Loss, and the gradient with respect to the logits written over the logits (same dtype),
/// already scaled by `grad_scale / normalizer`. On a label error the logits' contents are
/// unspecified (on the GPU the check reads a device flag after the kernel has run).
pub fn cross_entropy_forward_backward(
    logits: &mut Tensor,
    labels: &Tensor,
    p: &CrossEntropy,
) -> Result<CrossEntropyOut> {
    let (rows, v) = check_inputs(OP, logits, labels, p)?;
    match common_gpu(OP, &[("logits", logits), ("labels", labels)])? {
        Some(gpu) => gpu_cross_entropy(&gpu, logits, labels, p, rows, v, true),
        None => {
            let n_valid = check_labels(OP, labels.cpu_i32(), v, p.ignore_index)?;
            let xs = logits.cpu_f32().into_owned();
            let (loss, grad) = cpu_cross_entropy(&xs, labels.cpu_i32(), v, p, n_valid, true);
            logits.cpu_store_f32(&grad.expect("asked for the gradient"));
            Ok(CrossEntropyOut {
                loss: Tensor::from_f32(&[1], vec![loss])?,
                n_valid,
            })
        }
    }
}

/// The loss alone (evaluation): the logits are left untouched. `grad_scale` is ignored.
pub fn cross_entropy_loss(
    logits: &Tensor,
    labels: &Tensor,
    p: &CrossEntropy,
) -> Result<CrossEntropyOut> {
    let (rows, v) = check_inputs(OP, logits, labels, p)?;
    match common_gpu(OP, &[("logits", logits), ("labels", labels)])? {
        Some(gpu) => gpu_cross_entropy(&gpu, logits, labels, p, rows, v, false),
        None => {
            let n_valid = check_labels(OP, labels.cpu_i32(), v, p.ignore_index)?;
            let (loss, _) =
                cpu_cross_entropy(&logits.cpu_f32(), labels.cpu_i32(), v, p, n_valid, false);
            Ok(CrossEntropyOut {
                loss: Tensor::from_f32(&[1], vec![loss])?,
                n_valid,
            })
        }
    }
}

/// Dtypes, shapes (labels have the logits' leading dims) and parameters; (rows, vocab).
fn check_inputs(
    op: &'static str,
    logits: &Tensor,
    labels: &Tensor,
    p: &CrossEntropy,
) -> Result<(usize, usize)> {
    expect_dtype(op, "logits", logits, &[DType::F32, DType::BF16])?;
    expect_dtype(op, "labels", labels, &[DType::I32])?;
    let shape = logits.shape();
    if shape.is_empty() || shape[shape.len() - 1] == 0 {
        return Err(KernelError::shape(
            op,
            format!("logits {shape:?} have no vocabulary dim"),
        ));
    }
    expect_shape(op, "labels", labels, &shape[..shape.len() - 1])?;
    let (rows, v) = logits.rows_cols();
    if rows > i32::MAX as usize || v > i32::MAX as usize {
        return Err(KernelError::shape(
            op,
            format!("logits {shape:?} exceed the kernels' 32-bit row and vocab indices"),
        ));
    }
    check_params(op, p)?;
    Ok((rows, v))
}

pub(crate) fn check_params(op: &'static str, p: &CrossEntropy) -> Result<()> {
    let bad = |what: String| Err(KernelError::invalid(op, what));
    if !(0.0..=1.0).contains(&p.label_smoothing) {
        return bad(format!(
            "label_smoothing must be in [0, 1], got {}",
            p.label_smoothing
        ));
    }
    if !(p.z_loss >= 0.0 && p.z_loss.is_finite()) {
        return bad(format!("z_loss must be finite and >= 0, got {}", p.z_loss));
    }
    if let Some(c) = p.softcap {
        if !(c > 0.0 && c.is_finite()) {
            return bad(format!("softcap must be finite and > 0, got {c}"));
        }
    }
    if let Some(n) = p.num_items {
        if !(n > 0.0 && n.is_finite()) {
            return bad(format!(
                "num_items must be finite and > 0 (skip a step with no labelled token), got {n}"
            ));
        }
    }
    if !p.grad_scale.is_finite() {
        return bad(format!("grad_scale must be finite, got {}", p.grad_scale));
    }
    Ok(())
}

fn bad_label(op: &'static str, row: usize, label: i32, v: usize, ignore: i32) -> KernelError {
    KernelError::invalid(
        op,
        format!(
            "label {label} at row {row} is outside the vocabulary [0, {v}) and is not ignore_index {ignore}"
        ),
    )
}

/// Number of labels that are not `ignore`, or an error naming the first one out of range.
pub(crate) fn check_labels(
    op: &'static str,
    labels: &[i32],
    v: usize,
    ignore: i32,
) -> Result<usize> {
    let mut n = 0;
    for (row, &l) in labels.iter().enumerate() {
        if l == ignore {
            continue;
        }
        if l < 0 || l as usize >= v {
            return Err(bad_label(op, row, l, v, ignore));
        }
        n += 1;
    }
    Ok(n)
}

// ---------------------------------------------------------------------------------------
// CUDA

fn gpu_cross_entropy(
    gpu: &Arc<Gpu>,
    logits: &Tensor,
    labels: &Tensor,
    p: &CrossEntropy,
    rows: usize,
    v: usize,
    grad: bool,
) -> Result<CrossEntropyOut> {
    let status = gpu_count_labels(gpu, labels.dptr(), rows, v, p.ignore_index)?;
    let row_loss = Tensor::uninit_cuda(gpu, &[rows.max(1)], DType::F32)?;
    gpu_rows(
        gpu,
        RowsArgs {
            logits: logits.dptr(),
            dtype: logits.dtype(),
            labels: labels.dptr(),
            row_loss: row_loss.dptr(),
            status: status.dptr(),
            rows,
            v,
        },
        p,
        grad,
    )?;
    let loss = gpu_reduce_loss(gpu, &row_loss, rows, &status, p.num_items)?;
    let n_valid = read_status(OP, &status, v, p.ignore_index)?;
    Ok(CrossEntropyOut { loss, n_valid })
}

/// A device status `[count of valid labels, first bad row or -1, its label]` (i32 `[3]`).
pub(crate) fn gpu_count_labels(
    gpu: &Arc<Gpu>,
    labels: u64,
    n: usize,
    v: usize,
    ignore: i32,
) -> Result<Tensor> {
    let status = Tensor::uninit_cuda(gpu, &[3], DType::I32)?;
    let f = gpu.function(&SOURCE, "ce_count_labels")?;
    launch!(gpu, f, (1, 1, 1), (1024, 1, 1), 0;
        labels, n as i32, v as i32, ignore, status.dptr())?;
    Ok(status)
}

/// Waits for the stream, then the valid-label count or the first bad label as an error.
pub(crate) fn read_status(
    op: &'static str,
    status: &Tensor,
    v: usize,
    ignore: i32,
) -> Result<usize> {
    let s = status.to_i32_vec()?;
    if s[1] >= 0 {
        return Err(bad_label(op, s[1] as usize, s[2], v, ignore));
    }
    Ok(s[0] as usize)
}

/// f32 `[1]`: the sum of `row_loss[..rows]` over the normalizer, in a fixed order.
pub(crate) fn gpu_reduce_loss(
    gpu: &Arc<Gpu>,
    row_loss: &Tensor,
    rows: usize,
    status: &Tensor,
    num_items: Option<f32>,
) -> Result<Tensor> {
    let loss = Tensor::uninit_cuda(gpu, &[1], DType::F32)?;
    let f = gpu.function(&SOURCE, "ce_reduce_loss")?;
    launch!(gpu, f, (1, 1, 1), (1024, 1, 1), 0;
        row_loss.dptr(), rows as i32, status.dptr(), num_items.unwrap_or(0.0), loss.dptr())?;
    Ok(loss)
}

/// Device addresses of one launch over `rows` rows of `v` logits (FLCE passes a chunk).
pub(crate) struct RowsArgs {
    pub logits: u64,
    pub dtype: DType,
    pub labels: u64,
    pub row_loss: u64,
    pub status: u64,
    pub rows: usize,
    pub v: usize,
}

/// (max dynamic shared memory of one block, shared memory of one SM), in bytes.
fn smem_limits(gpu: &Gpu) -> Result<(usize, usize)> {
    use cudarc::driver::{result as drv, sys};
    let get = |attr| -> Result<usize> {
        let dev = drv::device::get(gpu.ordinal() as i32).map_err(|source| KernelError::Driver {
            call: "cuDeviceGet",
            source,
        })?;
        // SAFETY: `dev` comes from cuDeviceGet.
        let v = unsafe { drv::device::get_attribute(dev, attr) }.map_err(|source| {
            KernelError::Driver {
                call: "cuDeviceGetAttribute",
                source,
            }
        })?;
        Ok(v.max(0) as usize)
    };
    Ok((
        get(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)?,
        get(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR)?,
    ))
}

/// Block size, blocks per SM, and how many 8-element chunks of a row each block parks in
/// shared memory between its two passes.
#[derive(Debug, PartialEq)]
struct RowsLaunch {
    threads: usize,
    blocks_per_sm: usize,
    cache_chunks: usize,
}

/// About 4 chunks per thread. With the gradient, a block parks its row in shared memory:
/// short rows fit whole and several blocks share an SM; a long row (bf16 at vocab 128256 is
/// 256 KB) gets one block per SM and all of its shared memory, and the rest of the row is
/// re-read from L2, where ~one row per SM in flight keeps it.
fn rows_launch(
    v: usize,
    dtype: DType,
    grad: bool,
    smem_per_block: usize,
    smem_per_sm: usize,
) -> RowsLaunch {
    let chunks = v / 8;
    let threads = (chunks.div_ceil(4).div_ceil(32) * 32).clamp(64, 1024);
    let max_blocks = 2048 / threads;
    if !grad {
        return RowsLaunch {
            threads,
            blocks_per_sm: max_blocks,
            cache_chunks: 0,
        };
    }
    // Per block: 1 KiB the hardware reserves, plus the kernel's static scratch and slack.
    const RESERVED: usize = 1024 + 256;
    let chunk_bytes = 8 * dtype.size_in_bytes();
    let row_bytes = chunks * chunk_bytes;
    let blocks_per_sm = (smem_per_sm / (row_bytes + RESERVED)).clamp(1, max_blocks);
    let budget = (smem_per_sm / blocks_per_sm)
        .saturating_sub(RESERVED)
        .min(smem_per_block.saturating_sub(256));
    RowsLaunch {
        threads,
        blocks_per_sm,
        cache_chunks: (budget / chunk_bytes).min(chunks),
    }
}

/// One cross-entropy launch over `a.rows` rows. `status[0]` (device) must hold the number of
/// valid labels (the default normalizer) when it runs.
pub(crate) fn gpu_rows(gpu: &Arc<Gpu>, a: RowsArgs, p: &CrossEntropy, grad: bool) -> Result<()> {
    if a.rows == 0 {
        return Ok(());
    }
    let (per_block, per_sm) = smem_limits(gpu)?;
    let cfg = rows_launch(a.v, a.dtype, grad, per_block, per_sm);
    let smem = cfg.cache_chunks * 8 * a.dtype.size_in_bytes();
    let name = format!(
        "cross_entropy_{}{}_{}",
        if grad { "grad" } else { "loss" },
        if p.softcap.is_some() { "_cap" } else { "" },
        a.dtype.kernel_suffix()
    );
    let f = gpu.function(&SOURCE, &name)?;
    if smem > 48 * 1024 {
        gpu.set_max_dynamic_shared(f, smem)?;
    }
    let grid = a.rows.min(gpu.sm_count() * cfg.blocks_per_sm).max(1) as u32;
    launch!(gpu, f, (grid, 1, 1), (cfg.threads as u32, 1, 1), smem as u32;
        a.logits, a.labels, a.row_loss, a.status, a.rows as i32, a.v as i32,
        p.ignore_index, p.label_smoothing, p.z_loss, p.softcap.unwrap_or(0.0),
        p.num_items.unwrap_or(0.0), p.grad_scale, cfg.cache_chunks as i32)
}

// ---------------------------------------------------------------------------------------
// CPU reference: f64 per row from the f32 values of the logits.

fn capped(x: f32, p: &CrossEntropy) -> f64 {
    match p.softcap {
        Some(c) => c as f64 * (x as f64 / c as f64).tanh(),
        None => x as f64,
    }
}

/// (loss, lse) of each row; (0, 0) for ignored rows. Labels are already checked.
pub(crate) fn cpu_row_stats(
    xs: &[f32],
    labels: &[i32],
    v: usize,
    p: &CrossEntropy,
) -> Vec<(f64, f64)> {
    let eps = p.label_smoothing as f64;
    par_map(labels.len(), |r| {
        let y = labels[r];
        if y == p.ignore_index {
            return (0.0, 0.0);
        }
        let row = &xs[r * v..(r + 1) * v];
        let m = row
            .iter()
            .map(|&x| capped(x, p))
            .fold(f64::NEG_INFINITY, f64::max);
        let (mut s, mut sz) = (0.0f64, 0.0f64);
        for &x in row {
            let z = capped(x, p);
            s += (z - m).exp();
            sz += z;
        }
        let lse = m + s.ln();
        let zy = capped(row[y as usize], p);
        let loss =
            (1.0 - eps) * (lse - zy) + eps * (lse - sz / v as f64) + p.z_loss as f64 * lse * lse;
        (loss, lse)
    })
}

/// The gradient of `sum of row losses * scale` with respect to the logits.
pub(crate) fn cpu_row_grads(
    xs: &[f32],
    labels: &[i32],
    v: usize,
    p: &CrossEntropy,
    stats: &[(f64, f64)],
    scale: f64,
) -> Vec<f32> {
    let eps = p.label_smoothing as f64;
    let mut grad = vec![0.0f32; xs.len()];
    par_rows(&mut grad, v, |r, out| {
        let y = labels[r];
        if y == p.ignore_index {
            out.fill(0.0);
            return;
        }
        let lse = stats[r].1;
        let a = scale * (1.0 + 2.0 * p.z_loss as f64 * lse);
        for (j, (o, &x)) in out.iter_mut().zip(&xs[r * v..(r + 1) * v]).enumerate() {
            let z = capped(x, p);
            let mut g = a * (z - lse).exp() - scale * eps / v as f64;
            if j == y as usize {
                g -= scale * (1.0 - eps);
            }
            if let Some(c) = p.softcap {
                let t = z / c as f64;
                g *= 1.0 - t * t;
            }
            *o = g as f32;
        }
    });
    grad
}

/// The normalizer's reciprocal (0 when there is nothing to normalise by).
pub(crate) fn inv_normalizer(p: &CrossEntropy, n_valid: usize) -> f64 {
    let norm = p.num_items.map_or(n_valid as f64, |n| n as f64);
    if norm > 0.0 {
        1.0 / norm
    } else {
        0.0
    }
}

/// (loss, gradient if asked) for labels already checked, `n_valid` of them not ignored.
fn cpu_cross_entropy(
    xs: &[f32],
    labels: &[i32],
    v: usize,
    p: &CrossEntropy,
    n_valid: usize,
    grad: bool,
) -> (f32, Option<Vec<f32>>) {
    let stats = cpu_row_stats(xs, labels, v, p);
    let inv = inv_normalizer(p, n_valid);
    let loss = (stats.iter().map(|s| s.0).sum::<f64>() * inv) as f32;
    let g = grad.then(|| cpu_row_grads(xs, labels, v, p, &stats, p.grad_scale as f64 * inv));
    (loss, g)
}

// ---------------------------------------------------------------------------------------
// GPU check and benchmark

pub const CHECK: GpuCheck = GpuCheck {
    op: OP,
    run: gpu_check,
};

/// Random labels in [0, v), with about `ignored` of them set to ignore_index.
pub(crate) fn random_labels(rng: &mut Rng, n: usize, v: usize, ignored: f32) -> Vec<i32> {
    (0..n)
        .map(|_| {
            if rng.uniform() < ignored {
                IGNORE_INDEX
            } else {
                rng.below(v) as i32
            }
        })
        .collect()
}

/// A check line that passes when `ok` (for outcomes that are not numbers, like an error).
pub(crate) fn pass_line(op: &str, case: &str, output: &str, ok: bool) -> CheckLine {
    CheckLine {
        op: op.into(),
        case: case.into(),
        output: output.into(),
        dtype: DType::I32,
        rel_err: if ok { 0.0 } else { f64::INFINITY },
        tol: 0.0,
        pass: ok,
    }
}

fn gpu_check(gpu: &Arc<Gpu>, rng: &mut Rng) -> Result<Vec<CheckLine>> {
    let dev = Device::Cuda(gpu.clone());
    let mut lines = Vec::new();
    let all = CrossEntropy {
        label_smoothing: 0.1,
        z_loss: 1e-4,
        softcap: Some(30.0),
        num_items: Some(1000.0),
        grad_scale: 0.5,
        ..Default::default()
    };
    let smooth = CrossEntropy {
        label_smoothing: 0.1,
        ..Default::default()
    };
    let zcap = CrossEntropy {
        z_loss: 1e-4,
        softcap: Some(30.0),
        ..Default::default()
    };
    let d = CrossEntropy::default();
    let cases: [(DType, usize, usize, f32, CrossEntropy, &str); 8] = [
        (
            DType::BF16,
            8192,
            128256,
            0.1,
            d,
            "Llama-3 vocab, 8k tokens",
        ),
        (
            DType::BF16,
            300,
            128256,
            0.2,
            all,
            "smoothing+z-loss+softcap, num_items, scale",
        ),
        (
            DType::F32,
            64,
            128256,
            0.1,
            zcap,
            "f32 long rows (L2 re-read)",
        ),
        (
            DType::F32,
            37,
            1001,
            0.1,
            smooth,
            "odd vocab, unaligned rows",
        ),
        (
            DType::BF16,
            129,
            32001,
            0.1,
            zcap,
            "odd vocab, z-loss, softcap",
        ),
        (DType::BF16, 19, 7, 0.0, d, "vocab under one chunk"),
        (DType::BF16, 5, 1000, 1.0, d, "every label ignored"),
        (DType::BF16, 3, 151936, 0.0, smooth, "Qwen vocab, 3 rows"),
    ];
    for (dt, rows, v, ignored, p, what) in cases {
        let case = format!("{dt} {rows}x{v} ({what})");
        let (x, gx) = random_pair(gpu, rng, &[rows, v], dt, 3.0)?;
        let labels = Tensor::from_i32(&[rows], random_labels(rng, rows, v, ignored))?;
        let glabels = labels.to_device(&dev)?;
        let gl = cross_entropy_loss(&gx, &glabels, &p)?;
        let mut ux = gx.to_device(&dev)?;
        let uf = cross_entropy_forward_backward_unfused(&mut ux, &glabels, &p)?;
        let mut gx = gx;
        let gf = cross_entropy_forward_backward(&mut gx, &glabels, &p)?;
        let mut x = x;
        let f = cross_entropy_forward_backward(&mut x, &labels, &p)?;
        let (lg, lc) = (gf.loss.to_f32_vec()?[0], f.loss.to_f32_vec()?[0]);
        lines.push(compare_scalar(OP, &case, "loss", lg, lc));
        lines.push(compare_scalar(
            OP,
            &case,
            "loss(eval)",
            gl.loss.to_f32_vec()?[0],
            lc,
        ));
        lines.push(pass_line(
            OP,
            &case,
            "n_valid",
            gf.n_valid == f.n_valid && gl.n_valid == f.n_valid,
        ));
        lines.push(compare(OP, &case, "dlogits", &gx, &x)?);
        lines.push(compare_scalar(
            OP,
            &case,
            "loss(unfused)",
            uf.loss.to_f32_vec()?[0],
            lc,
        ));
        lines.push(pass_line(
            OP,
            &case,
            "n_valid(unfused)",
            uf.n_valid == f.n_valid,
        ));
        lines.push(compare(OP, &case, "dlogits(unfused)", &ux, &x)?);
    }
    // The loss-only mode leaves the logits alone.
    let (x, gx) = random_pair(gpu, rng, &[33, 5000], DType::BF16, 2.0)?;
    let labels = Tensor::from_i32(&[33], random_labels(rng, 33, 5000, 0.1))?.to_device(&dev)?;
    cross_entropy_loss(&gx, &labels, &d)?;
    lines.push(compare(OP, "bf16 33x5000 eval", "logits kept", &gx, &x)?);
    // A label outside the vocabulary is an error naming the row and the label.
    let mut lv = random_labels(rng, 40, 1000, 0.0);
    lv[17] = 1000;
    let labels = Tensor::from_i32(&[40], lv)?.to_device(&dev)?;
    let (_, mut gx) = random_pair(gpu, rng, &[40, 1000], DType::BF16, 1.0)?;
    let ok = match cross_entropy_forward_backward(&mut gx, &labels, &d) {
        Err(e) => {
            let e = e.to_string();
            e.contains("row 17") && e.contains("label 1000") && e.contains("[0, 1000)")
        }
        Ok(_) => false,
    };
    lines.push(pass_line(
        OP,
        "bf16 40x1000 label 1000 at row 17",
        "error",
        ok,
    ));
    Ok(lines)
}

/// [`cross_entropy_forward_backward`] as the plain composition of one-op kernels torch runs
/// for `F.cross_entropy(logits.float(), labels, ignore_index, reduction="sum") / num_items`
/// and its backward (see [`eager_cross_entropy`]); the gradient replaces `logits` (the fused
/// op's in-place contract). The labels are read on the host once (for the valid count and
/// the row mask), as the fused op reads its label count once. On the CPU this runs the
/// reference.
pub fn cross_entropy_forward_backward_unfused(
    logits: &mut Tensor,
    labels: &Tensor,
    p: &CrossEntropy,
) -> Result<CrossEntropyOut> {
    check_inputs(OP, logits, labels, p)?;
    if common_gpu(OP, &[("logits", logits), ("labels", labels)])?.is_none() {
        return cross_entropy_forward_backward(logits, labels, p);
    }
    let (out, grad) = eager_cross_entropy(OP, logits, labels, p)?;
    *logits = grad;
    Ok(out)
}

/// 1 for a row whose label counts, 0 for an ignored one: the row mask of the unfused loss.
pub(crate) fn label_mask(labels: &[i32], ignore: i32) -> Vec<f32> {
    labels
        .iter()
        .map(|&l| if l == ignore { 0.0 } else { 1.0 })
        .collect()
}

/// The unfused cross-entropy on the GPU, one elementwise or row-reduction kernel per torch
/// op, all in f32 from the stored logits: upcast, (soft-cap: scale, tanh, scale), max,
/// shift, exp, sum, log, log-softmax, gather of the target log-probabilities, the per-row
/// loss `(1 - eps) nll + eps mean(-log p) + z lse^2` masked by the label mask, its sum over
/// the normalizer; then the gradient `(1 + 2 z lse) softmax - eps / V - (1 - eps) onehot`,
/// times the soft-cap's `1 - tanh^2`, times `mask * grad_scale / normalizer`, cast to the
/// logits' dtype. Labels are checked on the host (the error names `op`, the row and the
/// label). Returns the loss and the gradient.
pub(crate) fn eager_cross_entropy(
    op: &'static str,
    logits: &Tensor,
    labels: &Tensor,
    p: &CrossEntropy,
) -> Result<(CrossEntropyOut, Tensor)> {
    let (rows, v) = logits.rows_cols();
    let host = labels.to_i32_vec()?;
    let n_valid = check_labels(op, &host, v, p.ignore_index)?;
    let inv = inv_normalizer(p, n_valid) as f32;
    let dev = logits.device();
    let mask = Tensor::from_f32(&[rows], label_mask(&host, p.ignore_index))?.to_device(&dev)?;
    let f = DType::F32;
    let eps = p.label_smoothing;
    let xf = eager::unary(logits, UnaryOp::Cast, 0.0, f)?;
    // z = c tanh(x / c) with the soft-cap; tanh kept for the gradient.
    let (z, th) = match p.softcap {
        Some(c) => {
            let xs = eager::unary(&xf, UnaryOp::Scale, 1.0 / c, f)?;
            drop(xf);
            let th = eager::unary(&xs, UnaryOp::Tanh, 0.0, f)?;
            drop(xs);
            (eager::unary(&th, UnaryOp::Scale, c, f)?, Some(th))
        }
        None => (xf, None),
    };
    let m = eager::row_reduce(&z, Reduce::Max)?;
    let sh = eager::binary(&z, &m, Broadcast::PerRow, BinaryOp::Sub, f)?;
    drop(z);
    let e = eager::unary(&sh, UnaryOp::Exp, 0.0, f)?;
    let s = eager::row_reduce(&e, Reduce::Sum)?;
    drop(e);
    let ls = eager::unary(&s, UnaryOp::Log, 0.0, f)?;
    let logp = eager::binary(&sh, &ls, Broadcast::PerRow, BinaryOp::Sub, f)?;
    drop(sh);
    let lse = eager::binary(&m, &ls, Broadcast::None, BinaryOp::Add, f)?;
    // Per-row loss.
    let picked = eager::gather_rows(&logp, labels)?;
    let mut row = eager::unary(&picked, UnaryOp::Scale, -(1.0 - eps), f)?;
    if eps > 0.0 {
        let mean = eager::row_reduce(&logp, Reduce::Mean)?;
        let smooth = eager::unary(&mean, UnaryOp::Scale, -eps, f)?;
        row = eager::binary(&row, &smooth, Broadcast::None, BinaryOp::Add, f)?;
    }
    if p.z_loss > 0.0 {
        let sq = eager::unary(&lse, UnaryOp::Square, 0.0, f)?;
        let zl = eager::unary(&sq, UnaryOp::Scale, p.z_loss, f)?;
        row = eager::binary(&row, &zl, Broadcast::None, BinaryOp::Add, f)?;
    }
    let row = eager::binary(&row, &mask, Broadcast::None, BinaryOp::Mul, f)?.reshape(&[1, rows])?;
    let total = eager::row_reduce(&row, Reduce::Sum)?;
    let loss = eager::unary(&total, UnaryOp::Scale, inv, f)?;
    // Gradient.
    let mut prob = eager::unary(&logp, UnaryOp::Exp, 0.0, f)?;
    drop(logp);
    if p.z_loss > 0.0 {
        let a = eager::unary(&lse, UnaryOp::Scale, 2.0 * p.z_loss, f)?;
        let a = eager::unary(&a, UnaryOp::AddScalar, 1.0, f)?;
        prob = eager::binary(&prob, &a, Broadcast::PerRow, BinaryOp::Mul, f)?;
    }
    if eps > 0.0 {
        prob = eager::unary(&prob, UnaryOp::AddScalar, -eps / v as f32, f)?;
    }
    eager::scatter_add_rows(&mut prob, labels, -(1.0 - eps))?;
    if let Some(th) = th {
        let t2 = eager::unary(&th, UnaryOp::Square, 0.0, f)?;
        drop(th);
        let neg = eager::unary(&t2, UnaryOp::Scale, -1.0, f)?;
        let cap = eager::unary(&neg, UnaryOp::AddScalar, 1.0, f)?;
        prob = eager::binary(&prob, &cap, Broadcast::None, BinaryOp::Mul, f)?;
    }
    let coef = eager::unary(&mask, UnaryOp::Scale, p.grad_scale * inv, f)?;
    let grad = eager::binary(
        &prob,
        &coef,
        Broadcast::PerRow,
        BinaryOp::Mul,
        logits.dtype(),
    )?;
    Ok((CrossEntropyOut { loss, n_valid }, grad))
}

pub const BENCH: KernelBench = KernelBench { op: OP, run: bench };

/// 8192 tokens x vocab 128256, bf16: loss + gradient in place, the loss alone, and the
/// unfused composition.
fn bench(gpu: &Arc<Gpu>, cfg: &BenchConfig) -> Result<Vec<BenchRow>> {
    let (rows, v) = (8192, 128256);
    let dev = Device::Cuda(gpu.clone());
    let mut rng = Rng::new(9);
    let mut x = Tensor::from_f32_as(
        &[rows, v],
        rng.uniform_vec(rows * v, -4.0, 4.0),
        DType::BF16,
    )?
    .to_device(&dev)?;
    let labels =
        Tensor::from_i32(&[rows], random_labels(&mut rng, rows, v, 0.0))?.to_device(&dev)?;
    let p = CrossEntropy::default();
    let shape = format!("{rows}x{v} bf16");
    // Read the logits once, write the gradient once; labels are negligible.
    let floor = (2 * rows * v * 2) as f64;
    // In place: each run sees the previous run's gradient as logits, which costs the same.
    let fused = measure(gpu, cfg, OP, "fused", &shape, floor, 0.0, || {
        cross_entropy_forward_backward(&mut x, &labels, &p)?;
        Ok(())
    })?;
    let eval = measure(gpu, cfg, OP, "loss", &shape, floor / 2.0, 0.0, || {
        cross_entropy_loss(&x, &labels, &p)?;
        Ok(())
    })?;
    let unfused = measure(gpu, cfg, OP, "unfused", &shape, floor, 0.0, || {
        eager_cross_entropy(OP, &x, &labels, &p)?;
        Ok(())
    })?;
    Ok(vec![fused, eval, unfused])
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::check::rel_err;

    /// Naive f64 loss (sum of token losses / normalizer), straight from the definition.
    pub(crate) fn naive_loss(x: &[f64], labels: &[i32], v: usize, p: &CrossEntropy) -> f64 {
        let cap = |z: f64| p.softcap.map_or(z, |c| c as f64 * (z / c as f64).tanh());
        let eps = p.label_smoothing as f64;
        let mut total = 0.0;
        let mut n = 0usize;
        for (r, &y) in labels.iter().enumerate() {
            if y == p.ignore_index {
                continue;
            }
            n += 1;
            let z: Vec<f64> = x[r * v..(r + 1) * v].iter().map(|&t| cap(t)).collect();
            let lse = z.iter().map(|t| t.exp()).sum::<f64>().ln();
            let logp: Vec<f64> = z.iter().map(|t| t - lse).collect();
            let smooth = -logp.iter().sum::<f64>() / v as f64;
            total += (1.0 - eps) * -logp[y as usize] + eps * smooth + p.z_loss as f64 * lse * lse;
        }
        let norm = p.num_items.map_or(n as f64, |n| n as f64);
        if norm > 0.0 {
            total / norm
        } else {
            0.0
        }
    }

    fn options() -> Vec<CrossEntropy> {
        vec![
            CrossEntropy::default(),
            CrossEntropy {
                label_smoothing: 0.2,
                ..Default::default()
            },
            CrossEntropy {
                z_loss: 0.01,
                ..Default::default()
            },
            CrossEntropy {
                softcap: Some(2.5),
                ..Default::default()
            },
            CrossEntropy {
                label_smoothing: 0.1,
                z_loss: 0.02,
                softcap: Some(4.0),
                num_items: Some(23.0),
                grad_scale: 0.75,
                ..Default::default()
            },
        ]
    }

    fn f64s(v: &[f32]) -> Vec<f64> {
        v.iter().map(|&x| x as f64).collect()
    }

    #[test]
    fn loss_and_gradient_match_f64_and_finite_differences() {
        let mut rng = Rng::new(3);
        let (rows, v) = (9, 13);
        for p in options() {
            let xv = rng.normal_vec(rows * v, 2.0);
            let mut lv = random_labels(&mut rng, rows, v, 0.0);
            lv[4] = IGNORE_INDEX;
            let labels = Tensor::from_i32(&[rows], lv.clone()).unwrap();
            let mut x = Tensor::from_f32(&[rows, v], xv.clone()).unwrap();
            let out = cross_entropy_forward_backward(&mut x, &labels, &p).unwrap();
            assert_eq!(out.n_valid, rows - 1);
            let x64 = f64s(&xv);
            let want = naive_loss(&x64, &lv, v, &p);
            let got = out.loss.to_f32_vec().unwrap()[0] as f64;
            assert!(
                (got - want).abs() < 1e-6 * want.abs(),
                "{p:?}: {got} vs {want}"
            );
            let h = 1e-6;
            let fd: Vec<f32> = (0..x64.len())
                .map(|i| {
                    let (mut a, mut b) = (x64.clone(), x64.clone());
                    a[i] += h;
                    b[i] -= h;
                    let d = (naive_loss(&a, &lv, v, &p) - naive_loss(&b, &lv, v, &p)) / (2.0 * h);
                    (d * p.grad_scale as f64) as f32
                })
                .collect();
            let g = x.to_f32_vec().unwrap();
            let e = rel_err(&g, &fd);
            assert!(e < 1e-5, "{p:?}: gradient rel err {e}");
            // The ignored row's gradient is exactly zero.
            assert!(g[4 * v..5 * v].iter().all(|&t| t == 0.0));
        }
    }

    #[test]
    fn loss_only_matches_and_leaves_logits() {
        let mut rng = Rng::new(4);
        let (rows, v) = (6, 29);
        for p in options() {
            let xv = rng.normal_vec(rows * v, 1.5);
            let labels = Tensor::from_i32(&[rows], random_labels(&mut rng, rows, v, 0.3)).unwrap();
            let x = Tensor::from_f32(&[rows, v], xv.clone()).unwrap();
            let eval = cross_entropy_loss(&x, &labels, &p).unwrap();
            assert_eq!(x.to_f32_vec().unwrap(), xv);
            let mut y = Tensor::from_f32(&[rows, v], xv).unwrap();
            let train = cross_entropy_forward_backward(&mut y, &labels, &p).unwrap();
            assert_eq!(eval.n_valid, train.n_valid);
            assert_eq!(
                eval.loss.to_f32_vec().unwrap(),
                train.loss.to_f32_vec().unwrap()
            );
        }
    }

    #[test]
    fn bf16_gradient_is_the_rounded_f32_gradient() {
        let mut rng = Rng::new(5);
        let (rows, v) = (4, 50);
        let xv: Vec<f32> = rng
            .normal_vec(rows * v, 2.0)
            .into_iter()
            .map(|t| half::bf16::from_f32(t).to_f32())
            .collect();
        let labels = Tensor::from_i32(&[rows], random_labels(&mut rng, rows, v, 0.0)).unwrap();
        let p = CrossEntropy {
            label_smoothing: 0.1,
            ..Default::default()
        };
        let mut xf = Tensor::from_f32(&[rows, v], xv.clone()).unwrap();
        let mut xb = Tensor::from_f32_as(&[rows, v], xv, DType::BF16).unwrap();
        let lf = cross_entropy_forward_backward(&mut xf, &labels, &p).unwrap();
        let lb = cross_entropy_forward_backward(&mut xb, &labels, &p).unwrap();
        assert_eq!(xb.dtype(), DType::BF16);
        assert_eq!(lf.loss.to_f32_vec().unwrap(), lb.loss.to_f32_vec().unwrap());
        let want: Vec<f32> = xf
            .to_f32_vec()
            .unwrap()
            .iter()
            .map(|&t| half::bf16::from_f32(t).to_f32())
            .collect();
        assert_eq!(xb.to_f32_vec().unwrap(), want);
    }

    #[test]
    fn batched_leading_dims_and_num_items() {
        // [2, 3, V] logits with [2, 3] labels equal the flattened call; num_items rescales
        // loss and gradient alike.
        let mut rng = Rng::new(6);
        let v = 11;
        let xv = rng.normal_vec(6 * v, 1.0);
        let lv = random_labels(&mut rng, 6, v, 0.2);
        let mut a = Tensor::from_f32(&[2, 3, v], xv.clone()).unwrap();
        let la = Tensor::from_i32(&[2, 3], lv.clone()).unwrap();
        let oa = cross_entropy_forward_backward(&mut a, &la, &CrossEntropy::default()).unwrap();
        let n = oa.n_valid as f32;
        let p = CrossEntropy {
            num_items: Some(4.0 * n),
            ..Default::default()
        };
        let mut b = Tensor::from_f32(&[6, v], xv).unwrap();
        let lb = Tensor::from_i32(&[6], lv).unwrap();
        let ob = cross_entropy_forward_backward(&mut b, &lb, &p).unwrap();
        let (la_, lb_) = (
            oa.loss.to_f32_vec().unwrap()[0],
            ob.loss.to_f32_vec().unwrap()[0],
        );
        assert!((la_ - 4.0 * lb_).abs() < 1e-6 * la_.abs());
        let ga: Vec<f32> = a.to_f32_vec().unwrap().iter().map(|t| t / 4.0).collect();
        assert!(rel_err(&b.to_f32_vec().unwrap(), &ga) < 1e-6);
    }

    #[test]
    fn all_ignored_gives_zero_not_nan() {
        let mut x = Tensor::from_f32(&[3, 5], vec![1.0; 15]).unwrap();
        let labels = Tensor::from_i32(&[3], vec![IGNORE_INDEX; 3]).unwrap();
        let out =
            cross_entropy_forward_backward(&mut x, &labels, &CrossEntropy::default()).unwrap();
        assert_eq!(out.n_valid, 0);
        assert_eq!(out.loss.to_f32_vec().unwrap(), vec![0.0]);
        assert!(x.to_f32_vec().unwrap().iter().all(|&t| t == 0.0));
    }

    #[test]
    fn bad_inputs_are_errors_naming_the_op() {
        let mut x = Tensor::from_f32(&[4, 10], vec![0.5; 40]).unwrap();
        let labels = Tensor::from_i32(&[4], vec![1, IGNORE_INDEX, 10, 2]).unwrap();
        let e = cross_entropy_forward_backward(&mut x, &labels, &CrossEntropy::default())
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("cross_entropy")
                && e.contains("label 10")
                && e.contains("row 2")
                && e.contains("[0, 10)"),
            "{e}"
        );
        // Nothing was written before the error.
        assert!(x.to_f32_vec().unwrap().iter().all(|&t| t == 0.5));
        let neg = Tensor::from_i32(&[4], vec![1, -1, 0, 2]).unwrap();
        let e = cross_entropy_loss(&x, &neg, &CrossEntropy::default())
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("label -1") && e.contains("row 1"), "{e}");
        let short = Tensor::from_i32(&[3], vec![1, 2, 3]).unwrap();
        let e = cross_entropy_loss(&x, &short, &CrossEntropy::default())
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("[3]") && e.contains("[4]"), "{e}");
        let fl = Tensor::from_f32(&[4], vec![1.0; 4]).unwrap();
        let e = cross_entropy_loss(&x, &fl, &CrossEntropy::default())
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("labels") && e.contains("i32"), "{e}");
        let ok = Tensor::from_i32(&[4], vec![1, 2, 3, 4]).unwrap();
        for p in [
            CrossEntropy {
                label_smoothing: 1.5,
                ..Default::default()
            },
            CrossEntropy {
                softcap: Some(0.0),
                ..Default::default()
            },
            CrossEntropy {
                num_items: Some(0.0),
                ..Default::default()
            },
            CrossEntropy {
                z_loss: f32::NAN,
                ..Default::default()
            },
        ] {
            let e = cross_entropy_loss(&x, &ok, &p).err().unwrap().to_string();
            assert!(e.contains("cross_entropy: invalid input"), "{e}");
        }
    }

    #[test]
    fn launch_plan_fits_shared_memory() {
        // H100: 227 KiB per block, 228 KiB per SM.
        let (blk, sm) = (232448, 233472);
        let l = rows_launch(128256, DType::BF16, true, blk, sm);
        assert_eq!((l.threads, l.blocks_per_sm), (1024, 1));
        assert!(
            l.cache_chunks * 16 <= blk - 256 && l.cache_chunks > 14000,
            "{l:?}"
        );
        // A 32000-vocab bf16 row (64 KB) fits whole, two blocks per SM.
        let l = rows_launch(32000, DType::BF16, true, blk, sm);
        assert_eq!((l.blocks_per_sm, l.cache_chunks), (2, 4000));
        assert!(l.blocks_per_sm * (l.cache_chunks * 16 + 1280) <= sm);
        let l = rows_launch(7, DType::F32, true, blk, sm);
        assert_eq!((l.threads, l.cache_chunks), (64, 0));
        let l = rows_launch(128256, DType::BF16, false, blk, sm);
        assert_eq!(l.cache_chunks, 0);
    }

    /// The unfused loss's row mask: ignore_index rows 0, every other row 1, whatever the
    /// ignore value (a class id used as ignore_index is masked too).
    #[test]
    fn label_mask_marks_ignored_rows() {
        assert_eq!(
            label_mask(&[3, IGNORE_INDEX, 0, IGNORE_INDEX, 7], IGNORE_INDEX),
            vec![1.0, 0.0, 1.0, 0.0, 1.0]
        );
        assert_eq!(label_mask(&[5, 2, 5], 5), vec![0.0, 1.0, 0.0]);
        assert!(label_mask(&[], IGNORE_INDEX).is_empty());
    }

    /// On the CPU the unfused entry point is the reference itself.
    #[test]
    fn unfused_on_the_cpu_is_the_reference() {
        let mut rng = Rng::new(44);
        let (rows, v) = (9, 31);
        let xs = rng.normal_vec(rows * v, 2.0);
        let labels = Tensor::from_i32(&[rows], random_labels(&mut rng, rows, v, 0.3)).unwrap();
        for p in options() {
            let mut a = Tensor::from_f32(&[rows, v], xs.clone()).unwrap();
            let mut b = Tensor::from_f32(&[rows, v], xs.clone()).unwrap();
            let fa = cross_entropy_forward_backward(&mut a, &labels, &p).unwrap();
            let fb = cross_entropy_forward_backward_unfused(&mut b, &labels, &p).unwrap();
            assert_eq!(fa.loss.to_f32_vec().unwrap(), fb.loss.to_f32_vec().unwrap());
            assert_eq!(fa.n_valid, fb.n_valid);
            assert_eq!(a.to_f32_vec().unwrap(), b.to_f32_vec().unwrap());
        }
    }
}
