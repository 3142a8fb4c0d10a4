//! Fused linear cross-entropy: the lm_head GEMM and the cross-entropy over token chunks, so
//! the full `[tokens, vocab]` logits never exist. Per chunk: `logits = h W^T` (cuBLAS, fp32
//! accumulation, stored in h's dtype as HF's lm_head does), the cross-entropy kernel in place
//! (loss per row, gradient over the logits), `dh = grad W`, and optionally `dW += grad^T h`
//! into a caller's buffer. The normalizer is the valid-token count over all chunks (counted
//! on the device before the loop) or `num_items`; the loop has no host synchronisation, and
//! the bad-label flag is read once at the end.
//!
//! Memory: one logits chunk (64 MiB by default) plus dh; no saved activations, since the
//! backward is done in the forward.

use std::sync::Arc;

use crate::bench::{measure, BenchConfig, BenchRow, KernelBench};
use crate::check::{rel_err, CheckLine, GpuCheck};
use crate::cuda::gemm::{GemmSpec, Operand};
use crate::cuda::gemm_lt::LtChoice;
use crate::cuda::Gpu;
use crate::error::{KernelError, Result};
use crate::ops::cross_entropy::{
    self as ce, check_labels, check_params, cpu_row_grads, cpu_row_stats, gpu_count_labels,
    gpu_reduce_loss, gpu_rows, inv_normalizer, read_status, CrossEntropy, RowsArgs,
};
use crate::ops::eager::{self, BinaryOp, Broadcast};
use crate::ops::matmul::{cpu_matmul, matmul, transpose};
use crate::rng::Rng;
use crate::{DType, Device, Tensor};

use super::{common_gpu, expect_dtype, expect_shape};

const OP: &str = "fused_linear_cross_entropy";

/// The default logits chunk: at most this many bytes.
pub const DEFAULT_CHUNK_BYTES: usize = 64 << 20;

#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct FusedLinearCrossEntropy {
    pub ce: CrossEntropy,
    /// Tokens per chunk; None: as many as fit a 64 MiB logits chunk (256 at vocab 128256
    /// in bf16). Larger chunks trade memory for GEMM efficiency, most of all with dW, whose
    /// f32 accumulation reads and writes all of dW once per chunk (8192 x 4096 x 128256 on an
    /// H100, 2026-11-23: 29.9 ms at 256 tokens, 28.6 ms at 512, 27.2 ms at 1024; with dW 59 ms
    /// at 512 and 46 ms at 1024).
    pub chunk_tokens: Option<usize>,
}

pub struct FlceOut {
    /// f32 `[1]` on the inputs' device: sum of token losses / normalizer.
    pub loss: Tensor,
    /// Tokens whose label is not `ignore_index`.
    pub n_valid: usize,
    /// Gradient with respect to `h`: same shape and dtype.
    pub dh: Tensor,
}

/// Tokens per chunk such that a chunk of logits takes at most [`DEFAULT_CHUNK_BYTES`],
/// rounded down to a multiple of 128 when that many fit (GEMM tiles): 256 at vocab 128256
/// in bf16.
pub fn default_chunk_tokens(vocab: usize, dtype: DType) -> usize {
    chunk_tokens_within(DEFAULT_CHUNK_BYTES, vocab, dtype)
}

/// Tokens per chunk such that a chunk of logits takes at most `bytes`, rounded down to a
/// multiple of 128 when that many fit (GEMM tiles), at least 1.
pub fn chunk_tokens_within(bytes: usize, vocab: usize, dtype: DType) -> usize {
    let t = (bytes / (vocab * dtype.size_in_bytes()).max(1)).max(1);
    if t >= 128 {
        t / 128 * 128
    } else {
        t
    }
}

/// Loss of `labels` under the logits `h W^T`, with `dh` and optionally `dW += ...` (`dw`
/// is f32 or bf16 `[vocab, hidden]`, accumulated into: zero it to get the gradient alone).
/// `h` is `[.., hidden]` (leading dims are tokens), `w` the lm_head weight `[vocab, hidden]`
/// in h's dtype, `labels` i32 with h's leading dims. The gradients are scaled like
/// [`cross_entropy_forward_backward`](ce::cross_entropy_forward_backward)'s.
pub fn fused_linear_cross_entropy(
    h: &Tensor,
    w: &Tensor,
    labels: &Tensor,
    p: &FusedLinearCrossEntropy,
    dw: Option<&mut Tensor>,
) -> Result<FlceOut> {
    let c = check(h, w, labels, p, dw.as_deref())?;
    let Call {
        n,
        hid,
        v,
        chunk,
        gpu,
    } = c;
    match gpu {
        Some(gpu) => gpu_flce(&gpu, h, w, labels, p, dw, n, hid, v, chunk),
        None => cpu_flce(h, w, labels, p, dw, n, hid, v, chunk),
    }
}

/// [`fused_linear_cross_entropy`] as the plain composition: the full `[tokens, vocab]`
/// logits in one GEMM (stored in h's dtype, as HF's lm_head), the unfused cross-entropy
/// (one kernel per torch op, see `cross_entropy`'s eager composition: ignore_index,
/// `num_items`, smoothing, z-loss and soft-cap as the fused op), then the two gradient GEMMs
/// `dh = grad W` and, when `dw` is given, `grad^T h` added to it by a separate add.
/// `chunk_tokens` is not used (one chunk of everything). Same outputs; on the CPU this runs
/// the reference.
pub fn linear_cross_entropy_unfused(
    h: &Tensor,
    w: &Tensor,
    labels: &Tensor,
    p: &FusedLinearCrossEntropy,
    dw: Option<&mut Tensor>,
) -> Result<FlceOut> {
    if check(h, w, labels, p, dw.as_deref())?.gpu.is_none() {
        return fused_linear_cross_entropy(h, w, labels, p, dw);
    }
    let dt = h.dtype();
    let logits = matmul(h, false, w, true, dt)?;
    let (out, grad) = ce::eager_cross_entropy(OP, &logits, labels, &p.ce)?;
    drop(logits);
    let dh = matmul(&grad, false, w, false, dt)?.reshape(h.shape())?;
    if let Some(dw) = dw {
        let fresh = matmul(&grad, true, h, false, dw.dtype())?;
        *dw = eager::binary(dw, &fresh, Broadcast::None, BinaryOp::Add, dw.dtype())?;
    }
    Ok(FlceOut {
        loss: out.loss,
        n_valid: out.n_valid,
        dh,
    })
}

/// Checked sizes of one call: tokens, hidden, vocab, tokens per chunk, and the GPU (None:
/// the CPU).
struct Call {
    n: usize,
    hid: usize,
    v: usize,
    chunk: usize,
    gpu: Option<Arc<Gpu>>,
}

fn check(
    h: &Tensor,
    w: &Tensor,
    labels: &Tensor,
    p: &FusedLinearCrossEntropy,
    dw: Option<&Tensor>,
) -> Result<Call> {
    expect_dtype(OP, "h", h, &[DType::F32, DType::BF16])?;
    expect_dtype(OP, "weight", w, &[h.dtype()])?;
    expect_dtype(OP, "labels", labels, &[DType::I32])?;
    let hs = h.shape();
    if hs.is_empty() || hs[hs.len() - 1] == 0 {
        return Err(KernelError::shape(
            OP,
            format!("h {hs:?} has no hidden dim"),
        ));
    }
    let (n, hid) = h.rows_cols();
    if w.shape().len() != 2 || w.shape()[1] != hid || w.shape()[0] == 0 {
        return Err(KernelError::shape(
            OP,
            format!("weight {:?} is not [vocab, {hid}] for h {hs:?}", w.shape()),
        ));
    }
    let v = w.shape()[0];
    expect_shape(OP, "labels", labels, &hs[..hs.len() - 1])?;
    if let Some(dw) = dw {
        // cuBLAS takes a bf16 output only with bf16 operands.
        let allowed: &[DType] = match h.dtype() {
            DType::BF16 => &[DType::F32, DType::BF16],
            _ => &[DType::F32],
        };
        expect_dtype(OP, "dw", dw, allowed)?;
        expect_shape(OP, "dw", dw, w.shape())?;
    }
    check_params(OP, &p.ce)?;
    let chunk = match p.chunk_tokens {
        Some(0) => {
            return Err(KernelError::invalid(OP, "chunk_tokens must be at least 1"));
        }
        Some(c) => c,
        None => default_chunk_tokens(v, h.dtype()),
    }
    .min(n.max(1));
    if n > i32::MAX as usize || v > i32::MAX as usize {
        return Err(KernelError::shape(
            OP,
            format!(
                "h {hs:?} x weight {:?} exceed the kernels' index range",
                w.shape()
            ),
        ));
    }
    let mut tensors = vec![("h", h), ("weight", w), ("labels", labels)];
    if let Some(dw) = dw {
        tensors.push(("dw", dw));
    }
    Ok(Call {
        n,
        hid,
        v,
        chunk,
        gpu: common_gpu(OP, &tensors)?,
    })
}

#[allow(clippy::too_many_arguments)]
fn gpu_flce(
    gpu: &Arc<Gpu>,
    h: &Tensor,
    w: &Tensor,
    labels: &Tensor,
    p: &FusedLinearCrossEntropy,
    dw: Option<&mut Tensor>,
    n: usize,
    hid: usize,
    v: usize,
    chunk: usize,
) -> Result<FlceOut> {
    let dt = h.dtype();
    let es = dt.size_in_bytes();
    let status = gpu_count_labels(gpu, labels.dptr(), n, v, p.ce.ignore_index)?;
    let row_loss = Tensor::uninit_cuda(gpu, &[n.max(1)], DType::F32)?;
    let dh = Tensor::uninit_cuda(gpu, h.shape(), dt)?;
    let logits = Tensor::uninit_cuda(gpu, &[chunk, v], dt)?;
    let dw = dw.map(|t| (t.dptr(), t.dtype()));
    let mut start = 0;
    while start < n {
        let rows = chunk.min(n - start);
        let g = ChunkGemms {
            h: h.dptr() + (start * hid * es) as u64,
            w: w.dptr(),
            logits: logits.dptr(),
            dtype: dt,
            rows,
            hid,
            v,
        };
        g.logits(gpu)?;
        gpu_rows(
            gpu,
            RowsArgs {
                logits: logits.dptr(),
                dtype: dt,
                labels: labels.dptr() + (start * 4) as u64,
                row_loss: row_loss.dptr() + (start * 4) as u64,
                status: status.dptr(),
                rows,
                v,
            },
            &p.ce,
            true,
        )?;
        g.dh(gpu, dh.dptr() + (start * hid * es) as u64)?;
        if let Some((dw_ptr, dw_dt)) = dw {
            g.dw(gpu, dw_ptr, dw_dt)?;
        }
        start += rows;
    }
    drop(logits);
    let loss = gpu_reduce_loss(gpu, &row_loss, n, &status, p.ce.num_items)?;
    let n_valid = read_status(OP, &status, v, p.ce.ignore_index)?;
    Ok(FlceOut { loss, n_valid, dh })
}

/// The three GEMMs of one chunk of `rows` tokens: device addresses of the chunk of h, the
/// weight and the logits buffer (which holds the gradient after the cross-entropy).
struct ChunkGemms {
    h: u64,
    w: u64,
    logits: u64,
    dtype: DType,
    rows: usize,
    hid: usize,
    v: usize,
}

fn operand(ptr: u64, dtype: DType, ld: usize, trans: bool) -> Operand {
    Operand {
        ptr,
        dtype,
        ld,
        trans,
        batch_stride: 0,
    }
}

impl ChunkGemms {
    /// logits[rows, V] = h W^T
    fn logits(&self, gpu: &Gpu) -> Result<()> {
        gpu.gemm(&self.logits_spec())
    }

    fn logits_spec(&self) -> GemmSpec {
        GemmSpec {
            m: self.rows,
            n: self.v,
            k: self.hid,
            a: operand(self.h, self.dtype, self.hid, false),
            b: operand(self.w, self.dtype, self.hid, true),
            c: operand(self.logits, self.dtype, self.v, false),
            alpha: 1.0,
            beta: 0.0,
            batch: 1,
        }
    }

    /// dh[rows, H] = grad W, written at `dh`.
    fn dh(&self, gpu: &Gpu, dh: u64) -> Result<()> {
        gpu.gemm(&self.dh_spec(dh))
    }

    fn dh_spec(&self, dh: u64) -> GemmSpec {
        GemmSpec {
            m: self.rows,
            n: self.hid,
            k: self.v,
            a: operand(self.logits, self.dtype, self.v, false),
            b: operand(self.w, self.dtype, self.hid, false),
            c: operand(dh, self.dtype, self.hid, false),
            alpha: 1.0,
            beta: 0.0,
            batch: 1,
        }
    }

    /// dW[V, H] += grad^T h
    fn dw(&self, gpu: &Gpu, dw: u64, dw_dtype: DType) -> Result<()> {
        gpu.gemm(&GemmSpec {
            m: self.v,
            n: self.hid,
            k: self.rows,
            a: operand(self.logits, self.dtype, self.v, true),
            b: operand(self.h, self.dtype, self.hid, false),
            c: operand(dw, dw_dtype, self.hid, false),
            alpha: 1.0,
            beta: 1.0,
            batch: 1,
        })
    }
}

fn round_vec(dtype: DType, v: &mut [f32]) {
    if dtype == DType::BF16 {
        for x in v {
            *x = half::bf16::from_f32(*x).to_f32();
        }
    }
}

/// The same chunked computation on the CPU, rounding where the GPU stores: logits and dh in
/// h's dtype, dW in its own dtype after each chunk's accumulation.
#[allow(clippy::too_many_arguments)]
fn cpu_flce(
    h: &Tensor,
    w: &Tensor,
    labels: &Tensor,
    p: &FusedLinearCrossEntropy,
    dw: Option<&mut Tensor>,
    n: usize,
    hid: usize,
    v: usize,
    chunk: usize,
) -> Result<FlceOut> {
    let dt = h.dtype();
    let labels = labels.cpu_i32();
    let n_valid = check_labels(OP, labels, v, p.ce.ignore_index)?;
    let inv = inv_normalizer(&p.ce, n_valid);
    let scale = p.ce.grad_scale as f64 * inv;
    let (hs, ws) = (h.cpu_f32(), w.cpu_f32());
    // W^T as [H, V] rows, so that dh = grad W is a product of contiguous rows.
    let wt = transpose(&ws, v, hid);
    let mut dh = vec![0.0f32; n * hid];
    let mut dw_acc = dw.as_ref().map(|t| t.cpu_f32().into_owned());
    let mut total = 0.0f64;
    let mut start = 0;
    while start < n {
        let rows = chunk.min(n - start);
        let hc = &hs[start * hid..(start + rows) * hid];
        let lc = &labels[start..start + rows];
        let mut logits = cpu_matmul(hc, false, &ws, true, rows, v, hid);
        round_vec(dt, &mut logits);
        let stats = cpu_row_stats(&logits, lc, v, &p.ce);
        total += stats.iter().map(|s| s.0).sum::<f64>();
        let mut grad = cpu_row_grads(&logits, lc, v, &p.ce, &stats, scale);
        round_vec(dt, &mut grad);
        let mut dhc = cpu_matmul(&grad, false, &wt, true, rows, hid, v);
        round_vec(dt, &mut dhc);
        dh[start * hid..(start + rows) * hid].copy_from_slice(&dhc);
        if let (Some(acc), Some(t)) = (dw_acc.as_mut(), dw.as_ref()) {
            let g = cpu_matmul(&grad, true, hc, false, v, hid, rows);
            for (a, d) in acc.iter_mut().zip(&g) {
                *a += d;
            }
            round_vec(t.dtype(), acc);
        }
        start += rows;
    }
    if let (Some(acc), Some(t)) = (dw_acc, dw) {
        t.cpu_store_f32(&acc);
    }
    Ok(FlceOut {
        loss: Tensor::from_f32(&[1], vec![(total * inv) as f32])?,
        n_valid,
        dh: Tensor::from_f32_as(h.shape(), dh, dt)?,
    })
}

// ---------------------------------------------------------------------------------------
// GPU check and benchmark

pub const CHECK: GpuCheck = GpuCheck {
    op: OP,
    run: gpu_check,
};

/// A CPU tensor of uniform values in [-a, a) (a = sqrt(3) std: the given standard deviation)
/// and its device copy. Uniform, not normal: the lm_head weight has half a billion entries.
fn uniform_pair(
    gpu: &Arc<Gpu>,
    rng: &mut Rng,
    shape: &[usize],
    dtype: DType,
    std: f32,
) -> Result<(Tensor, Tensor)> {
    let n = shape.iter().product();
    let a = std * 3f32.sqrt();
    let cpu = Tensor::from_f32_as(shape, rng.uniform_vec(n, -a, a), dtype)?;
    let dev = cpu.to_device(&Device::Cuda(gpu.clone()))?;
    Ok((cpu, dev))
}

/// Like `check::compare`, with the tolerance given: outputs downstream of a bf16 GEMM
/// inherit its rounding (see the check's comment).
fn compare_tol(
    case: &str,
    output: &str,
    out: &Tensor,
    reference: &Tensor,
    tol: f64,
) -> Result<CheckLine> {
    let err = if out.shape() != reference.shape() {
        f64::INFINITY
    } else {
        rel_err(&out.to_f32_vec()?, &reference.to_f32_vec()?)
    };
    Ok(CheckLine {
        op: OP.into(),
        case: case.into(),
        output: output.into(),
        dtype: out.dtype(),
        rel_err: err,
        tol,
        pass: err < tol,
    })
}

fn gpu_check(gpu: &Arc<Gpu>, rng: &mut Rng) -> Result<Vec<CheckLine>> {
    let dev = Device::Cuda(gpu.clone());
    let mut lines = Vec::new();
    let all = CrossEntropy {
        label_smoothing: 0.1,
        z_loss: 1e-4,
        softcap: Some(30.0),
        num_items: Some(500.0),
        grad_scale: 0.5,
        ..Default::default()
    };
    let d = CrossEntropy::default();
    // (dtype, tokens, hidden, vocab, chunk, dW dtype, params, what)
    type Case = (
        DType,
        usize,
        usize,
        usize,
        Option<usize>,
        Option<DType>,
        CrossEntropy,
        &'static str,
    );
    let cases: [Case; 5] = [
        (
            DType::BF16,
            256,
            4096,
            128256,
            None,
            None,
            d,
            "Llama-3-8B lm_head, one chunk",
        ),
        (
            DType::BF16,
            300,
            4096,
            128256,
            Some(128),
            Some(DType::F32),
            d,
            "3 chunks, f32 dW",
        ),
        (
            DType::BF16,
            77,
            200,
            1001,
            Some(30),
            Some(DType::BF16),
            all,
            "odd, all options, bf16 dW",
        ),
        (
            DType::F32,
            45,
            64,
            5003,
            Some(16),
            Some(DType::F32),
            all,
            "f32, odd vocab",
        ),
        (
            DType::BF16,
            5,
            96,
            1000,
            Some(2),
            Some(DType::F32),
            d,
            "every label ignored",
        ),
    ];
    for (dt, n, hid, v, chunk, dw_dt, ce_p, what) in cases {
        let case = format!("{dt} {n}x{hid}x{v} ({what})");
        let p = FusedLinearCrossEntropy {
            ce: ce_p,
            chunk_tokens: chunk,
        };
        let (h, gh) = uniform_pair(gpu, rng, &[n, hid], dt, 1.0)?;
        let (w, gw) = uniform_pair(gpu, rng, &[v, hid], dt, 0.05)?;
        let ignored = if what.contains("ignored") { 1.0 } else { 0.1 };
        let labels = Tensor::from_i32(&[n], ce::random_labels(rng, n, v, ignored))?;
        let glabels = labels.to_device(&dev)?;
        let (mut dw, mut gdw) = match dw_dt {
            Some(t) => {
                let (a, b) = uniform_pair(gpu, rng, &[v, hid], t, 0.01)?;
                (Some(a), Some(b))
            }
            None => (None, None),
        };
        let mut udw = match &gdw {
            Some(t) => Some(t.to_device(&dev)?),
            None => None,
        };
        let gf = fused_linear_cross_entropy(&gh, &gw, &glabels, &p, gdw.as_mut())?;
        let f = fused_linear_cross_entropy(&h, &w, &labels, &p, dw.as_mut())?;
        let uf = linear_cross_entropy_unfused(&gh, &gw, &glabels, &p, udw.as_mut())?;
        // With bf16 operands, cuBLAS and the CPU sum the GEMMs in different orders, so a few
        // logits round to the neighbouring bf16 value (a 2^-8 relative step); the loss and
        // the f32 dW move by that, far above f32 rounding. Their tolerance is then set by
        // the bf16 logits: 1e-4 for the loss (an average over tokens), 1e-2 for gradients.
        let bf = dt == DType::BF16;
        let loss_tol = if bf { 1e-4 } else { 1e-5 };
        lines.push(compare_tol(&case, "loss", &gf.loss, &f.loss, loss_tol)?);
        lines.push(ce::pass_line(OP, &case, "n_valid", gf.n_valid == f.n_valid));
        let grad_tol = if bf { 1e-2 } else { 1e-5 };
        lines.push(compare_tol(&case, "dh", &gf.dh, &f.dh, grad_tol)?);
        if let (Some(a), Some(b)) = (&gdw, &dw) {
            lines.push(compare_tol(&case, "dw", a, b, grad_tol)?);
        }
        lines.push(compare_tol(
            &case,
            "loss(unfused)",
            &uf.loss,
            &f.loss,
            loss_tol,
        )?);
        lines.push(ce::pass_line(
            OP,
            &case,
            "n_valid(unfused)",
            uf.n_valid == f.n_valid,
        ));
        lines.push(compare_tol(&case, "dh(unfused)", &uf.dh, &f.dh, grad_tol)?);
        if let (Some(a), Some(b)) = (&udw, &dw) {
            lines.push(compare_tol(&case, "dw(unfused)", a, b, grad_tol)?);
        }
    }
    // A label outside the vocabulary is an error naming the op, the row and the label.
    let (_, gh) = uniform_pair(gpu, rng, &[40, 64], DType::BF16, 1.0)?;
    let (_, gw) = uniform_pair(gpu, rng, &[500, 64], DType::BF16, 0.05)?;
    let mut lv = ce::random_labels(rng, 40, 500, 0.0);
    lv[33] = -7;
    let labels = Tensor::from_i32(&[40], lv)?.to_device(&dev)?;
    let p = FusedLinearCrossEntropy {
        chunk_tokens: Some(8),
        ..Default::default()
    };
    let ok = match fused_linear_cross_entropy(&gh, &gw, &labels, &p, None) {
        Err(e) => {
            let e = e.to_string();
            e.contains(OP) && e.contains("row 33") && e.contains("label -7")
        }
        Ok(_) => false,
    };
    lines.push(ce::pass_line(
        OP,
        "bf16 40x64x500 label -7 at row 33",
        "error",
        ok,
    ));
    Ok(lines)
}

pub const BENCH: KernelBench = KernelBench { op: OP, run: bench };

/// 8192 tokens, hidden 4096, vocab 128256, bf16: chunked fused op without and with dW, and
/// the unfused composition (full logits GEMM, eager cross-entropy, dh GEMM).
fn bench(gpu: &Arc<Gpu>, cfg: &BenchConfig) -> Result<Vec<BenchRow>> {
    let (n, hid, v) = (8192, 4096, 128256);
    let dev = Device::Cuda(gpu.clone());
    let mut rng = Rng::new(11);
    let (_, h) = uniform_pair(gpu, &mut rng, &[n, hid], DType::BF16, 1.0)?;
    let (_, w) = uniform_pair(gpu, &mut rng, &[v, hid], DType::BF16, 0.02)?;
    let labels = Tensor::from_i32(&[n], ce::random_labels(&mut rng, n, v, 0.0))?.to_device(&dev)?;
    let mut dw = Tensor::zeros(&[v, hid], DType::F32, &dev)?;
    let shape = format!("{n}x{hid}x{v} bf16");
    let two = 4.0 * (n * hid * v) as f64;
    let three = 6.0 * (n * hid * v) as f64;
    let mut rows = Vec::new();
    // The default (256-token chunks: Liger's memory), larger chunks (memory for speed; 768
    // tokens is the most whose logits and dh fit 256 MiB; 752 splits 8192 tokens into 11
    // chunks with no short last one), and with dW.
    for (variant, chunk, with_dw) in [
        ("fused", None, false),
        ("c512", Some(512), false),
        ("c752", Some(752), false),
        ("c768", Some(768), false),
        ("c1024", Some(1024), false),
        ("fused+dW", None, true),
        ("c1024+dW", Some(1024), true),
    ] {
        let p = FusedLinearCrossEntropy {
            chunk_tokens: chunk,
            ..Default::default()
        };
        let flops = if with_dw { three } else { two };
        rows.push(measure(gpu, cfg, OP, variant, &shape, 0.0, flops, || {
            let dw = if with_dw { Some(&mut dw) } else { None };
            fused_linear_cross_entropy(&h, &w, &labels, &p, dw)?;
            Ok(())
        })?);
    }
    drop(dw);
    // The parts alone, at the default chunk and at 768 tokens: the two GEMMs, each GEMM, and
    // (at 768) the cross-entropy pass over the chunks' logits, the loop with marks and the
    // loop with other GEMM algorithms: where the fused op's time goes.
    for (prefix, chunk) in [("", default_chunk_tokens(v, DType::BF16)), ("c768 ", 768)] {
        let logits = Tensor::uninit_cuda(gpu, &[chunk, v], DType::BF16)?;
        let dh = Tensor::uninit_cuda(gpu, &[n, hid], DType::BF16)?;
        let lb = LoopBench {
            status: gpu_count_labels(
                gpu,
                labels.dptr(),
                n,
                v,
                CrossEntropy::default().ignore_index,
            )?,
            row_loss: Tensor::uninit_cuda(gpu, &[n], DType::F32)?,
            gpu,
            cfg,
            shape: &shape,
            chunk,
            h: &h,
            w: &w,
            labels: &labels,
            logits: &logits,
            dh: &dh,
        };
        for (part, which) in [("gemms", 3), ("g-logits", 1), ("g-dh", 2)] {
            let flops = if which == 3 { two } else { two / 2.0 };
            let variant = format!("{prefix}{part}");
            rows.push(measure(gpu, cfg, OP, &variant, &shape, 0.0, flops, || {
                for start in (0..n).step_by(chunk) {
                    let (g, dh) = lb.gemms(start);
                    if which & 1 != 0 {
                        g.logits(gpu)?;
                    }
                    if which & 2 != 0 {
                        g.dh(gpu, dh)?;
                    }
                }
                Ok(())
            })?);
        }
        if !prefix.is_empty() {
            // Reads and rewrites each chunk's logits once from memory: 2 x 2 bytes x n x v.
            let bytes = 4.0 * (n * v) as f64;
            let variant = format!("{prefix}ce");
            rows.push(measure(gpu, cfg, OP, &variant, &shape, bytes, 0.0, || {
                for start in (0..n).step_by(chunk) {
                    lb.ce(start, chunk.min(n - start))?;
                }
                Ok(())
            })?);
            rows.extend(lb.in_loop_parts()?);
            rows.extend(lb.loop_algorithms()?);
        }
    }
    let p = FusedLinearCrossEntropy::default();
    rows.push(measure(gpu, cfg, OP, "unfused", &shape, 0.0, two, || {
        linear_cross_entropy_unfused(&h, &w, &labels, &p, None)?;
        Ok(())
    })?);
    Ok(rows)
}

/// What the chunk-loop benchmarks share: bf16 inputs, one logits chunk, dh, and the
/// cross-entropy's label count and row losses.
struct LoopBench<'a> {
    gpu: &'a Arc<Gpu>,
    cfg: &'a BenchConfig,
    shape: &'a str,
    chunk: usize,
    h: &'a Tensor,
    w: &'a Tensor,
    labels: &'a Tensor,
    logits: &'a Tensor,
    dh: &'a Tensor,
    status: Tensor,
    row_loss: Tensor,
}

impl LoopBench<'_> {
    /// The chunk starting at token `start`: its GEMMs, and where its dh rows go.
    fn gemms(&self, start: usize) -> (ChunkGemms, u64) {
        let (n, hid) = self.h.rows_cols();
        let g = ChunkGemms {
            h: self.h.dptr() + (start * hid * 2) as u64,
            w: self.w.dptr(),
            logits: self.logits.dptr(),
            dtype: DType::BF16,
            rows: self.chunk.min(n - start),
            hid,
            v: self.w.shape()[0],
        };
        (g, self.dh.dptr() + (start * hid * 2) as u64)
    }

    /// The cross-entropy pass over the chunk at `start` (default parameters, in place).
    fn ce(&self, start: usize, rows: usize) -> Result<()> {
        let args = RowsArgs {
            logits: self.logits.dptr(),
            dtype: DType::BF16,
            labels: self.labels.dptr() + (start * 4) as u64,
            row_loss: self.row_loss.dptr() + (start * 4) as u64,
            status: self.status.dptr(),
            rows,
            v: self.w.shape()[0],
        };
        gpu_rows(self.gpu, args, &CrossEntropy::default(), true)
    }

    /// The chunk loop as the fused op runs it, with a mark between every two kernels: each
    /// part's device time summed over the chunks (median over `cfg.runs` loops) and the
    /// whole loop's, so that a part slower inside the loop than alone shows, and so does
    /// time between the parts. Rows `c{chunk} loop logits|ce|dh|all`.
    fn in_loop_parts(&self) -> Result<Vec<BenchRow>> {
        let (gpu, cfg) = (self.gpu, self.cfg);
        let (n, hid) = self.h.rows_cols();
        let v = self.w.shape()[0];
        // Per run: [logits, ce, dh, whole loop] in ms.
        let mut runs: Vec<[f64; 4]> = Vec::new();
        for run in 0..cfg.warmup + cfg.runs.max(1) {
            let mut marks = vec![gpu.mark()?];
            for start in (0..n).step_by(self.chunk) {
                let (g, dh) = self.gemms(start);
                g.logits(gpu)?;
                marks.push(gpu.mark()?);
                self.ce(start, g.rows)?;
                marks.push(gpu.mark()?);
                g.dh(gpu, dh)?;
                marks.push(gpu.mark()?);
            }
            let mut sums = [0.0; 4];
            for (i, pair) in marks.windows(2).enumerate() {
                sums[i % 3] += pair[1].ms_since(&pair[0])?;
            }
            sums[3] = marks[marks.len() - 1].ms_since(&marks[0])?;
            if run >= cfg.warmup {
                runs.push(sums);
            }
        }
        let gemm_flops = 2.0 * (n * hid * v) as f64;
        let parts = [
            ("logits", gemm_flops, 0.0),
            ("ce", 0.0, 4.0 * (n * v) as f64),
            ("dh", gemm_flops, 0.0),
            ("all", 2.0 * gemm_flops, 0.0),
        ];
        let mut rows = Vec::new();
        for (i, (part, flops, bytes)) in parts.into_iter().enumerate() {
            let mut t: Vec<f64> = runs.iter().map(|r| r[i]).collect();
            t.sort_by(|a, b| a.total_cmp(b));
            let variant = format!("c{} loop {part}", self.chunk);
            let ms = t[t.len() / 2];
            rows.push(BenchRow::timed(
                self.cfg, OP, &variant, self.shape, ms, bytes, flops,
            ));
        }
        Ok(rows)
    }

    /// Each chunk GEMM (logits, dh) run back to back over the whole chunks of a call (the
    /// GPU held at its power limit, as in the fused loop) with cublasGemmEx and with each of
    /// cuBLASLt's first 16 algorithms (it offered 8 on the H100): whether another algorithm
    /// does more work per watt than the one that is fastest alone. Rows `c{chunk} loop-algo
    /// logits|dh cublas|lt#i`, then the whole loop with cublasGemmEx and with each part's
    /// winner (`loop-algo all`). On the H100 (session 8) the winners saved 0.4-0.6 ms each
    /// alone and 0.17 ms of 25.3 together: at the power cap what one GEMM saves the next
    /// one pays.
    fn loop_algorithms(&self) -> Result<Vec<BenchRow>> {
        let (gpu, cfg, chunk) = (self.gpu, self.cfg, self.chunk);
        let (n, hid) = self.h.rows_cols();
        let v = self.w.shape()[0];
        let whole = n / chunk;
        let flops = 2.0 * (whole * chunk * hid * v) as f64;
        let measure_loop = |variant: String, flops: f64, f: &dyn Fn() -> Result<()>| {
            measure(gpu, cfg, OP, &variant, self.shape, 0.0, flops, f)
        };
        let mut rows = Vec::new();
        // Per part: its choices and the index of the fastest in the loop (None: cublasGemmEx).
        let mut winners = Vec::new();
        for part in ["logits", "dh"] {
            let spec = |i: usize| {
                let (g, dh) = self.gemms(i * chunk);
                if part == "logits" {
                    g.logits_spec()
                } else {
                    g.dh_spec(dh)
                }
            };
            // Every chunk's spec has the same sizes and alignments, so one choice fits all.
            let choices = gpu.lt_choices(&spec(0), 16)?;
            let run = |variant: String, choice: Option<&LtChoice>| {
                measure_loop(variant, flops, &|| {
                    for i in 0..whole {
                        match choice {
                            Some(c) => gpu.gemm_with(&spec(i), c)?,
                            None => gpu.gemm(&spec(i))?,
                        }
                    }
                    Ok(())
                })
            };
            let base = run(format!("c{chunk} loop-algo {part} cublas"), None)?;
            let mut best = (base.median_ms, None);
            rows.push(base);
            for (i, c) in choices.iter().enumerate() {
                // An algorithm that cannot run the problem after all gets no row.
                if let Ok(row) = run(format!("c{chunk} loop-algo {part} lt#{i}"), Some(c)) {
                    if row.median_ms < best.0 {
                        best = (row.median_ms, Some(i));
                    }
                    rows.push(row);
                }
            }
            winners.push((choices, best.1));
        }
        // The whole loop (logits, cross-entropy, dh per whole chunk), cublasGemmEx for both
        // first, then each part's winner.
        let label = |w: Option<usize>| w.map_or("cublas".to_string(), |i| format!("lt#{i}"));
        for tuned in [false, true] {
            let idx = |k: usize| if tuned { winners[k].1 } else { None };
            let pick = |k: usize| idx(k).map(|i| &winners[k].0[i]);
            let variant = format!("c{chunk} loop-algo all {}+{}", label(idx(0)), label(idx(1)));
            rows.push(measure_loop(variant, 2.0 * flops, &|| {
                for i in 0..whole {
                    let (g, dh) = self.gemms(i * chunk);
                    match pick(0) {
                        Some(c) => gpu.gemm_with(&g.logits_spec(), c)?,
                        None => g.logits(gpu)?,
                    }
                    self.ce(i * chunk, chunk)?;
                    match pick(1) {
                        Some(c) => gpu.gemm_with(&g.dh_spec(dh), c)?,
                        None => g.dh(gpu, dh)?,
                    }
                }
                Ok(())
            })?);
        }
        Ok(rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::cross_entropy::{
        cross_entropy_forward_backward, tests::naive_loss, IGNORE_INDEX,
    };

    fn f64s(v: &[f32]) -> Vec<f64> {
        v.iter().map(|&x| x as f64).collect()
    }

    /// Naive f64: logits = h W^T, then the naive cross-entropy.
    fn naive(
        h: &[f64],
        w: &[f64],
        labels: &[i32],
        n: usize,
        hid: usize,
        v: usize,
        p: &CrossEntropy,
    ) -> f64 {
        let mut logits = vec![0.0; n * v];
        for i in 0..n {
            for j in 0..v {
                logits[i * v + j] = (0..hid).map(|k| h[i * hid + k] * w[j * hid + k]).sum();
            }
        }
        naive_loss(&logits, labels, v, p)
    }

    fn fd(f: impl Fn(&[f64]) -> f64, x: &[f64], scale: f64) -> Vec<f32> {
        let step = 1e-6;
        (0..x.len())
            .map(|i| {
                let (mut a, mut b) = (x.to_vec(), x.to_vec());
                a[i] += step;
                b[i] -= step;
                ((f(&a) - f(&b)) / (2.0 * step) * scale) as f32
            })
            .collect()
    }

    #[test]
    fn matches_f64_and_finite_differences_for_any_chunking() {
        let mut rng = Rng::new(21);
        let (n, hid, v) = (11, 6, 13);
        let params = [
            CrossEntropy::default(),
            CrossEntropy {
                label_smoothing: 0.1,
                z_loss: 0.02,
                softcap: Some(3.0),
                num_items: Some(17.0),
                grad_scale: 0.5,
                ..Default::default()
            },
        ];
        for ce_p in params {
            let hv = rng.normal_vec(n * hid, 1.0);
            let wv = rng.normal_vec(v * hid, 0.5);
            let mut lv = ce::random_labels(&mut rng, n, v, 0.0);
            lv[3] = IGNORE_INDEX;
            let h = Tensor::from_f32(&[n, hid], hv.clone()).unwrap();
            let w = Tensor::from_f32(&[v, hid], wv.clone()).unwrap();
            let labels = Tensor::from_i32(&[n], lv.clone()).unwrap();
            let (h64, w64) = (f64s(&hv), f64s(&wv));
            let want = naive(&h64, &w64, &lv, n, hid, v, &ce_p);
            let s = ce_p.grad_scale as f64;
            let fd_h = fd(|x| naive(x, &w64, &lv, n, hid, v, &ce_p), &h64, s);
            let fd_w = fd(|x| naive(&h64, x, &lv, n, hid, v, &ce_p), &w64, s);
            for chunk in [None, Some(1), Some(4), Some(100)] {
                let p = FusedLinearCrossEntropy {
                    ce: ce_p,
                    chunk_tokens: chunk,
                };
                let mut dw = Tensor::from_f32(&[v, hid], vec![0.0; v * hid]).unwrap();
                let out = fused_linear_cross_entropy(&h, &w, &labels, &p, Some(&mut dw)).unwrap();
                assert_eq!(out.n_valid, n - 1);
                let got = out.loss.to_f32_vec().unwrap()[0] as f64;
                assert!(
                    (got - want).abs() < 1e-6 * want.abs(),
                    "{chunk:?}: {got} vs {want}"
                );
                let eh = rel_err(&out.dh.to_f32_vec().unwrap(), &fd_h);
                let ew = rel_err(&dw.to_f32_vec().unwrap(), &fd_w);
                assert!(
                    eh < 1e-5 && ew < 1e-5,
                    "{chunk:?} {ce_p:?}: dh {eh}, dw {ew}"
                );
            }
        }
    }

    #[test]
    fn dw_accumulates_and_bf16_matches_the_composition() {
        // bf16: one chunk equals matmul -> cross_entropy -> matmul with the same roundings,
        // and dW is added to what the buffer held (gradient accumulation).
        let mut rng = Rng::new(22);
        let (n, hid, v) = (9, 16, 40);
        let h = Tensor::from_f32_as(&[n, hid], rng.normal_vec(n * hid, 1.0), DType::BF16).unwrap();
        let w = Tensor::from_f32_as(&[v, hid], rng.normal_vec(v * hid, 0.3), DType::BF16).unwrap();
        let labels = Tensor::from_i32(&[n], ce::random_labels(&mut rng, n, v, 0.2)).unwrap();
        let p = FusedLinearCrossEntropy::default();
        let dw0 = rng.normal_vec(v * hid, 1.0);
        let mut dw = Tensor::from_f32(&[v, hid], dw0.clone()).unwrap();
        let out = fused_linear_cross_entropy(&h, &w, &labels, &p, Some(&mut dw)).unwrap();
        let mut logits = matmul(&h, false, &w, true, DType::BF16).unwrap();
        let ce_out = cross_entropy_forward_backward(&mut logits, &labels, &p.ce).unwrap();
        assert_eq!(
            out.loss.to_f32_vec().unwrap(),
            ce_out.loss.to_f32_vec().unwrap()
        );
        let dh = matmul(&logits, false, &w, false, DType::BF16).unwrap();
        assert_eq!(out.dh.dtype(), DType::BF16);
        assert_eq!(out.dh.to_f32_vec().unwrap(), dh.to_f32_vec().unwrap());
        let g = matmul(&logits, true, &h, false, DType::F32)
            .unwrap()
            .to_f32_vec()
            .unwrap();
        let want: Vec<f32> = dw0.iter().zip(&g).map(|(a, b)| a + b).collect();
        assert_eq!(dw.to_f32_vec().unwrap(), want);
    }

    #[test]
    fn default_chunk_is_256_tokens_at_llama3_vocab() {
        assert_eq!(default_chunk_tokens(128256, DType::BF16), 256);
        assert_eq!(chunk_tokens_within(256 << 20, 128256, DType::BF16), 1024);
        assert_eq!(chunk_tokens_within(100, 128256, DType::BF16), 1);
        assert_eq!(default_chunk_tokens(128256, DType::F32), 128);
        assert_eq!(default_chunk_tokens(1 << 30, DType::F32), 1);
        assert!(default_chunk_tokens(151936, DType::BF16) * 151936 * 2 <= DEFAULT_CHUNK_BYTES);
    }

    #[test]
    fn bad_inputs_are_errors_naming_the_op() {
        let h = Tensor::from_f32(&[4, 3], vec![0.1; 12]).unwrap();
        let w = Tensor::from_f32(&[7, 3], vec![0.2; 21]).unwrap();
        let labels = Tensor::from_i32(&[4], vec![0, 1, 9, IGNORE_INDEX]).unwrap();
        let p = FusedLinearCrossEntropy::default();
        let e = fused_linear_cross_entropy(&h, &w, &labels, &p, None)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains(OP) && e.contains("label 9") && e.contains("row 2") && e.contains("[0, 7)"),
            "{e}"
        );
        let ok = Tensor::from_i32(&[4], vec![0, 1, 2, 3]).unwrap();
        let w4 = Tensor::from_f32(&[7, 4], vec![0.2; 28]).unwrap();
        let e = fused_linear_cross_entropy(&h, &w4, &ok, &p, None)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains(OP) && e.contains("[7, 4]") && e.contains("[4, 3]"),
            "{e}"
        );
        let mut dw = Tensor::from_f32(&[3, 7], vec![0.0; 21]).unwrap();
        let e = fused_linear_cross_entropy(&h, &w, &ok, &p, Some(&mut dw))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("dw") && e.contains("[3, 7]"), "{e}");
        let mut dwb = Tensor::from_f32_as(&[7, 3], vec![0.0; 21], DType::BF16).unwrap();
        let e = fused_linear_cross_entropy(&h, &w, &ok, &p, Some(&mut dwb))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("dw") && e.contains("bf16"), "{e}");
        let wb = Tensor::from_f32_as(&[7, 3], vec![0.2; 21], DType::BF16).unwrap();
        let e = fused_linear_cross_entropy(&h, &wb, &ok, &p, None)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("weight") && e.contains("bf16"), "{e}");
        let p0 = FusedLinearCrossEntropy {
            chunk_tokens: Some(0),
            ..Default::default()
        };
        let e = fused_linear_cross_entropy(&h, &w, &ok, &p0, None)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("chunk_tokens"), "{e}");
    }
}
