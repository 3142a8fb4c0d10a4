//! Fused linear cross-entropy: the lm_head GEMM and the cross-entropy over token chunks, so
//! the full `[tokens, vocab]` logits never exist. Per chunk: `logits = h W^T` (cuBLAS, fp32
//! accumulation, stored in h's dtype as HF's lm_head does), the cross-entropy kernel in place
//! (loss per row, gradient over the logits), `dh = grad W`, and optionally `dW += grad^T h`
//! into a caller's buffer. The normalizer is the valid-token count over all chunks (counted
//! on the device before the loop) or `num_items`; the loop has no host synchronisation, and
//! the bad-label flag is read once at the end.
//!
//! With `skip_ignored` the chunks hold only the rows whose label is not `ignore_index`: a
//! row without a label adds nothing to the loss and its gradient is zero, so its two GEMM
//! rows are wasted work (the prompt of an instruction-tuning example, a packed document's
//! last token). The labels are then read on the host (no wait when they are there already),
//! which also replaces the device's label check and its wait at the end. A chunk whose rows
//! are consecutive in `h` is used in place; any other is gathered into a chunk buffer and
//! its gradient scattered back (`index_rows`).
//!
//! Memory: one logits chunk (64 MiB by default) plus dh, and with `skip_ignored` two
//! `[chunk, hidden]` buffers when some chunk is gathered; no saved activations, since the
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
use crate::ops::index_rows::{cpu_copy_rows, gpu_copy_rows, RowCopy};
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
    /// Compute only the rows whose label is not `ignore_index` (same results: those rows'
    /// loss and gradient are zero). The labels are read on the host: give them there
    /// (a CPU tensor, also when `h` is on a GPU) to avoid a wait for the device. Off by
    /// default, so that device labels never cost a wait unless asked.
    pub skip_ignored: bool,
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
/// in h's dtype, `labels` i32 with h's leading dims, on h's device or on the host (uploaded,
/// or read there with `skip_ignored`). The gradients are scaled like
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
/// `chunk_tokens` and `skip_ignored` are not used (one chunk of every row). Same outputs;
/// on the CPU this runs the reference.
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
    let uploaded;
    let labels = if labels.is_cuda() {
        labels
    } else {
        uploaded = labels.to_device(&h.device())?;
        &uploaded
    };
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
    // Labels on the host may go with h on a GPU; labels on a GPU must be on h's.
    let mut tensors = vec![("h", h), ("weight", w)];
    if labels.is_cuda() || !h.is_cuda() {
        tensors.push(("labels", labels));
    }
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

/// The rows a GPU call computes and their labels on the device.
struct GpuRows {
    /// Rows computed.
    m: usize,
    /// The computed rows' positions in h, ascending; None: every row in order.
    rows: Option<Vec<i32>>,
    /// The uploaded labels (i32: the m labels, then when `rows` is Some the m positions),
    /// held for `labels` to point into; None: the caller's device labels.
    _table: Option<Tensor>,
    /// Device address of the labels (in `table`, or the caller's tensor).
    labels: u64,
    /// The valid-label count when the labels were checked on the host.
    n_valid: Option<usize>,
}

impl GpuRows {
    fn new(
        gpu: &Arc<Gpu>,
        labels: &Tensor,
        p: &FusedLinearCrossEntropy,
        n: usize,
        v: usize,
    ) -> Result<GpuRows> {
        let dev = Device::Cuda(gpu.clone());
        let all = |table: Option<Tensor>, n_valid| {
            let ptr = table.as_ref().map_or(labels.dptr(), |t| t.dptr());
            GpuRows {
                m: n,
                rows: None,
                _table: table,
                labels: ptr,
                n_valid,
            }
        };
        let upload = || -> Result<Option<Tensor>> {
            Ok(match labels.is_cuda() {
                true => None,
                false => Some(labels.to_device(&dev)?),
            })
        };
        if !p.skip_ignored {
            return Ok(all(upload()?, None));
        }
        let host = labels.to_i32_vec()?;
        let ignore = p.ce.ignore_index;
        let n_valid = check_labels(OP, &host, v, ignore)?;
        if n_valid == n {
            return Ok(all(upload()?, Some(n)));
        }
        let rows: Vec<i32> = (0..n as i32)
            .filter(|&i| host[i as usize] != ignore)
            .collect();
        // One upload for both: labels first, so the cross-entropy reads them from the start.
        let mut table: Vec<i32> = rows.iter().map(|&i| host[i as usize]).collect();
        table.extend_from_slice(&rows);
        if table.is_empty() {
            // Nothing labelled: one unread entry, so the buffer has an address.
            table.push(ignore);
        }
        let table = Tensor::from_i32(&[table.len()], table)?.to_device(&dev)?;
        Ok(GpuRows {
            m: rows.len(),
            labels: table.dptr(),
            rows: Some(rows),
            _table: Some(table),
            n_valid: Some(n_valid),
        })
    }

    /// The first row in h of computed rows `s..s + r` when they are consecutive there.
    fn consecutive(&self, s: usize, r: usize) -> Option<usize> {
        match &self.rows {
            None => Some(s),
            Some(rows) => {
                let (a, b) = (rows[s] as usize, rows[s + r - 1] as usize);
                (b - a == r - 1).then_some(a)
            }
        }
    }

    /// Device address of the positions of computed rows from `s` on.
    fn positions(&self, s: usize) -> u64 {
        self.labels + ((self.m + s) * 4) as u64
    }
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
    let row_bytes = hid * dt.size_in_bytes();
    let plan = GpuRows::new(gpu, labels, p, n, v)?;
    let m = plan.m;
    let chunk = chunk.min(m.max(1));
    let status = gpu_count_labels(gpu, plan.labels, m, v, p.ce.ignore_index)?;
    let row_loss = Tensor::uninit_cuda(gpu, &[m.max(1)], DType::F32)?;
    // Rows left out get a zero gradient.
    let dh = match plan.rows {
        Some(_) => Tensor::zeros(h.shape(), dt, &Device::Cuda(gpu.clone()))?,
        None => Tensor::uninit_cuda(gpu, h.shape(), dt)?,
    };
    let logits = Tensor::uninit_cuda(gpu, &[chunk, v], dt)?;
    let gathers = (0..m)
        .step_by(chunk)
        .any(|s| plan.consecutive(s, chunk.min(m - s)).is_none());
    // Gathered chunks: their h rows, and their dh rows before the scatter.
    let bufs = match gathers {
        true => Some((
            Tensor::uninit_cuda(gpu, &[chunk, hid], dt)?,
            Tensor::uninit_cuda(gpu, &[chunk, hid], dt)?,
        )),
        false => None,
    };
    let dw = dw.map(|t| (t.dptr(), t.dtype()));
    let copy = |src, src_index, src_rows, dst, dst_index, dst_rows, rows| {
        let c = RowCopy {
            src,
            src_index,
            src_rows,
            dst,
            dst_index,
            dst_rows,
            n: rows,
            row_bytes,
        };
        gpu_copy_rows(gpu, &c)
    };
    let mut start = 0;
    while start < m {
        let rows = chunk.min(m - start);
        let first = plan.consecutive(start, rows);
        let (hc, dhc) = match (first, &bufs) {
            (Some(f), _) => (
                h.dptr() + (f * row_bytes) as u64,
                dh.dptr() + (f * row_bytes) as u64,
            ),
            (None, Some((hb, dhb))) => {
                let index = Some(plan.positions(start));
                copy(h.dptr(), index, n, hb.dptr(), None, chunk, rows)?;
                (hb.dptr(), dhb.dptr())
            }
            (None, None) => unreachable!("gathered chunks have buffers"),
        };
        let g = ChunkGemms {
            h: hc,
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
                labels: plan.labels + (start * 4) as u64,
                row_loss: row_loss.dptr() + (start * 4) as u64,
                status: status.dptr(),
                rows,
                v,
            },
            &p.ce,
            true,
        )?;
        g.dh(gpu, dhc)?;
        if let Some((dw_ptr, dw_dt)) = dw {
            g.dw(gpu, dw_ptr, dw_dt)?;
        }
        if first.is_none() {
            let index = Some(plan.positions(start));
            copy(dhc, None, chunk, dh.dptr(), index, n, rows)?;
        }
        start += rows;
    }
    drop((logits, bufs));
    let loss = gpu_reduce_loss(gpu, &row_loss, m, &status, p.ce.num_items)?;
    // Labels checked on the host need no wait for the device's verdict.
    let n_valid = match plan.n_valid {
        Some(k) => k,
        None => read_status(OP, &status, v, p.ce.ignore_index)?,
    };
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
/// h's dtype, dW in its own dtype after each chunk's accumulation. With `skip_ignored` the
/// chunks take the labelled rows only, as on the GPU.
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
    // The computed rows' positions in h.
    let rows: Vec<i32> = (0..n as i32)
        .filter(|&i| !p.skip_ignored || labels[i as usize] != p.ce.ignore_index)
        .collect();
    let mut dh = vec![0.0f32; n * hid];
    let mut dw_acc = dw.as_ref().map(|t| t.cpu_f32().into_owned());
    let mut total = 0.0f64;
    for index in rows.chunks(chunk) {
        let r = index.len();
        let mut hc = vec![0.0f32; r * hid];
        cpu_copy_rows(&hs, Some(index), &mut hc, None, r, hid);
        let lc: Vec<i32> = index.iter().map(|&i| labels[i as usize]).collect();
        let mut logits = cpu_matmul(&hc, false, &ws, true, r, v, hid);
        round_vec(dt, &mut logits);
        let stats = cpu_row_stats(&logits, &lc, v, &p.ce);
        total += stats.iter().map(|s| s.0).sum::<f64>();
        let mut grad = cpu_row_grads(&logits, &lc, v, &p.ce, &stats, scale);
        round_vec(dt, &mut grad);
        let mut dhc = cpu_matmul(&grad, false, &wt, true, r, hid, v);
        round_vec(dt, &mut dhc);
        cpu_copy_rows(&dhc, None, &mut dh, Some(index), r, hid);
        if let (Some(acc), Some(t)) = (dw_acc.as_mut(), dw.as_ref()) {
            let g = cpu_matmul(&grad, true, &hc, false, v, hid, r);
            for (a, d) in acc.iter_mut().zip(&g) {
                *a += d;
            }
            round_vec(t.dtype(), acc);
        }
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

/// Labels like an instruction-tuning batch: runs of 1 to `run` ignored tokens (prompts)
/// alternating with runs of 1 to `run` labelled ones (responses), about half of each. The
/// run lengths come from a 64-bit LCG seeded with `runs_seed` (`bench/torch_kernels.py`
/// draws the same runs for Liger from the same seed), the labels from `rng`.
pub(crate) fn prompt_like_labels(
    rng: &mut Rng,
    n: usize,
    v: usize,
    run: usize,
    runs_seed: u64,
) -> Vec<i32> {
    let mut state = runs_seed;
    let mut labels = Vec::with_capacity(n);
    let mut prompt = true;
    while labels.len() < n {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let len = (1 + (state >> 33) as usize % run).min(n - labels.len());
        for _ in 0..len {
            labels.push(match prompt {
                true => ce::IGNORE_INDEX,
                false => rng.below(v) as i32,
            });
        }
        prompt = !prompt;
    }
    labels
}

/// The run seed of the benchmark's prompt-like labels (shared with `bench/torch_kernels.py`).
const BENCH_RUNS_SEED: u64 = 1234;

/// Which labels a check case draws.
#[derive(Clone, Copy, PartialEq)]
enum CaseLabels {
    /// 10% ignored at random.
    Random,
    /// Every label ignored.
    AllIgnored,
    /// [`prompt_like_labels`] with runs up to this long, the first chunk all labelled (used
    /// in place; the later chunks are gathered).
    Prompts(usize),
}

/// Whether a check case runs with `skip_ignored`, and where the GPU call gets its labels.
#[derive(Clone, Copy, PartialEq)]
enum Skip {
    Off,
    LabelsOnHost,
    /// `skip_ignored` reads them back.
    LabelsOnDevice,
}

/// One check case: sizes, options, labels, and what it is for.
struct Case {
    dt: DType,
    n: usize,
    hid: usize,
    v: usize,
    chunk: Option<usize>,
    dw: Option<DType>,
    ce: CrossEntropy,
    labels: CaseLabels,
    skip: Skip,
    what: &'static str,
}

fn gpu_check(gpu: &Arc<Gpu>, rng: &mut Rng) -> Result<Vec<CheckLine>> {
    let all = CrossEntropy {
        label_smoothing: 0.1,
        z_loss: 1e-4,
        softcap: Some(30.0),
        num_items: Some(500.0),
        grad_scale: 0.5,
        ..Default::default()
    };
    let d = CrossEntropy::default();
    use CaseLabels::*;
    use Skip::*;
    let (bf, f32) = (DType::BF16, DType::F32);
    // ((dtype, tokens, hidden, vocab), chunk, dW dtype, params, labels, skip, what)
    type Row = (
        (DType, usize, usize, usize),
        Option<usize>,
        Option<DType>,
        CrossEntropy,
        CaseLabels,
        Skip,
        &'static str,
    );
    let rows: [Row; 9] = [
        (
            (bf, 256, 4096, 128256),
            None,
            None,
            d,
            Random,
            Off,
            "Llama-3-8B lm_head, one chunk",
        ),
        (
            (bf, 300, 4096, 128256),
            Some(128),
            Some(f32),
            d,
            Random,
            Off,
            "3 chunks, f32 dW",
        ),
        (
            (bf, 77, 200, 1001),
            Some(30),
            Some(bf),
            all,
            Random,
            Off,
            "odd, all options, bf16 dW",
        ),
        (
            (f32, 45, 64, 5003),
            Some(16),
            Some(f32),
            all,
            Random,
            Off,
            "f32, odd vocab",
        ),
        (
            (bf, 5, 96, 1000),
            Some(2),
            Some(f32),
            d,
            AllIgnored,
            Off,
            "every label ignored",
        ),
        (
            (bf, 600, 4096, 128256),
            Some(128),
            Some(f32),
            d,
            Prompts(160),
            LabelsOnHost,
            "skip ignored, Llama-3-8B lm_head, f32 dW",
        ),
        (
            (bf, 301, 200, 1001),
            Some(40),
            Some(bf),
            all,
            Prompts(25),
            LabelsOnDevice,
            "skip ignored, labels on the device, all options, bf16 dW",
        ),
        (
            (f32, 90, 64, 503),
            Some(7),
            Some(f32),
            all,
            Prompts(9),
            LabelsOnHost,
            "skip ignored, f32",
        ),
        (
            (bf, 6, 96, 1000),
            Some(2),
            Some(f32),
            d,
            AllIgnored,
            LabelsOnHost,
            "skip ignored, every label ignored",
        ),
    ];
    let cases = rows.map(
        |((dt, n, hid, v), chunk, dw, ce, labels, skip, what)| Case {
            dt,
            n,
            hid,
            v,
            chunk,
            dw,
            ce,
            labels,
            skip,
            what,
        },
    );
    let mut lines = Vec::new();
    for c in cases {
        lines.extend(check_case(gpu, rng, &c)?);
    }
    // A label outside the vocabulary is an error naming the op, the row and the label, with
    // the labels checked on the device and, with `skip_ignored`, on the host.
    let dev = Device::Cuda(gpu.clone());
    let (_, gh) = uniform_pair(gpu, rng, &[40, 64], DType::BF16, 1.0)?;
    let (_, gw) = uniform_pair(gpu, rng, &[500, 64], DType::BF16, 0.05)?;
    let mut lv = ce::random_labels(rng, 40, 500, 0.0);
    lv[33] = -7;
    let host_labels = Tensor::from_i32(&[40], lv)?;
    let labels = host_labels.to_device(&dev)?;
    for (skip, labels, place) in [(false, &labels, "device"), (true, &host_labels, "host")] {
        let p = FusedLinearCrossEntropy {
            chunk_tokens: Some(8),
            skip_ignored: skip,
            ..Default::default()
        };
        let ok = match fused_linear_cross_entropy(&gh, &gw, labels, &p, None) {
            Err(e) => {
                let e = e.to_string();
                e.contains(OP) && e.contains("row 33") && e.contains("label -7")
            }
            Ok(_) => false,
        };
        let case = format!("bf16 40x64x500 label -7 at row 33, labels on the {place}");
        lines.push(ce::pass_line(OP, &case, "error", ok));
    }
    Ok(lines)
}

/// One case: the fused op on the GPU and its unfused composition, each against the CPU
/// reference with the same options.
fn check_case(gpu: &Arc<Gpu>, rng: &mut Rng, c: &Case) -> Result<Vec<CheckLine>> {
    let dev = Device::Cuda(gpu.clone());
    let (dt, n, hid, v) = (c.dt, c.n, c.hid, c.v);
    let case = format!("{dt} {n}x{hid}x{v} ({})", c.what);
    let p = FusedLinearCrossEntropy {
        ce: c.ce,
        chunk_tokens: c.chunk,
        skip_ignored: c.skip != Skip::Off,
    };
    let (h, gh) = uniform_pair(gpu, rng, &[n, hid], dt, 1.0)?;
    let (w, gw) = uniform_pair(gpu, rng, &[v, hid], dt, 0.05)?;
    let lv = match c.labels {
        CaseLabels::Random => ce::random_labels(rng, n, v, 0.1),
        CaseLabels::AllIgnored => ce::random_labels(rng, n, v, 1.0),
        CaseLabels::Prompts(run) => {
            let runs_seed = rng.next_u64();
            let mut lv = prompt_like_labels(rng, n, v, run, runs_seed);
            // A labelled first chunk: its rows are used in place, the later ones gathered.
            let first = c.chunk.unwrap_or(n);
            if 2 * first <= n {
                for l in &mut lv[..first] {
                    *l = rng.below(v) as i32;
                }
            }
            lv
        }
    };
    let labels = Tensor::from_i32(&[n], lv)?;
    let glabels = labels.to_device(&dev)?;
    let (mut dw, mut gdw) = match c.dw {
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
    let gpu_labels = match c.skip {
        Skip::LabelsOnHost => &labels,
        _ => &glabels,
    };
    let gf = fused_linear_cross_entropy(&gh, &gw, gpu_labels, &p, gdw.as_mut())?;
    let f = fused_linear_cross_entropy(&h, &w, &labels, &p, dw.as_mut())?;
    let uf = linear_cross_entropy_unfused(&gh, &gw, gpu_labels, &p, udw.as_mut())?;
    // With bf16 operands, cuBLAS and the CPU sum the GEMMs in different orders, so a few
    // logits round to the neighbouring bf16 value (a 2^-8 relative step); the loss and the
    // f32 dW move by that, far above f32 rounding. Their tolerance is then set by the bf16
    // logits: 1e-4 for the loss (an average over tokens), 1e-2 for gradients.
    let bf = dt == DType::BF16;
    let loss_tol = if bf { 1e-4 } else { 1e-5 };
    let grad_tol = if bf { 1e-2 } else { 1e-5 };
    let mut lines = Vec::new();
    for (tag, out, out_dw) in [("", &gf, &gdw), ("(unfused)", &uf, &udw)] {
        let name = |what: &str| format!("{what}{tag}");
        lines.push(compare_tol(
            &case,
            &name("loss"),
            &out.loss,
            &f.loss,
            loss_tol,
        )?);
        let same = out.n_valid == f.n_valid;
        lines.push(ce::pass_line(OP, &case, &name("n_valid"), same));
        lines.push(compare_tol(&case, &name("dh"), &out.dh, &f.dh, grad_tol)?);
        if let (Some(a), Some(b)) = (out_dw, &dw) {
            lines.push(compare_tol(&case, &name("dw"), a, b, grad_tol)?);
        }
    }
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
    // An instruction-tuning batch: prompt runs (ignored) alternating with response runs, up
    // to 512 tokens each, about half the tokens labelled. Every row computed (labels on the
    // device) against `skip_ignored` (labels on the host), at the default chunk and at the
    // training step's 1024 tokens. The floor counts only the labelled rows' GEMMs: the work
    // the loss needs.
    let lv = prompt_like_labels(&mut rng, n, v, 512, BENCH_RUNS_SEED);
    let labelled = lv.iter().filter(|&&l| l != ce::IGNORE_INDEX).count();
    let host_labels = Tensor::from_i32(&[n], lv)?;
    let prompt_labels = host_labels.to_device(&dev)?;
    let prompt_shape = format!("{shape}, {labelled} labelled");
    let needed = 4.0 * (labelled * hid * v) as f64;
    for (variant, chunk, skip) in [
        ("prompts", None, false),
        ("prompts skip", None, true),
        ("c1024 prompts", Some(1024), false),
        ("c1024 prompts skip", Some(1024), true),
    ] {
        let p = FusedLinearCrossEntropy {
            chunk_tokens: chunk,
            skip_ignored: skip,
            ..Default::default()
        };
        let labels = if skip { &host_labels } else { &prompt_labels };
        rows.push(measure(
            gpu,
            cfg,
            OP,
            variant,
            &prompt_shape,
            0.0,
            needed,
            || {
                fused_linear_cross_entropy(&h, &w, labels, &p, None)?;
                Ok(())
            },
        )?);
    }
    drop(prompt_labels);
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
            for i in [3, 4, 8] {
                lv[i] = IGNORE_INDEX;
            }
            let h = Tensor::from_f32(&[n, hid], hv.clone()).unwrap();
            let w = Tensor::from_f32(&[v, hid], wv.clone()).unwrap();
            let labels = Tensor::from_i32(&[n], lv.clone()).unwrap();
            let (h64, w64) = (f64s(&hv), f64s(&wv));
            let want = naive(&h64, &w64, &lv, n, hid, v, &ce_p);
            let s = ce_p.grad_scale as f64;
            let fd_h = fd(|x| naive(x, &w64, &lv, n, hid, v, &ce_p), &h64, s);
            let fd_w = fd(|x| naive(&h64, x, &lv, n, hid, v, &ce_p), &w64, s);
            let chunks = [None, Some(1), Some(4), Some(100)];
            for (chunk, skip) in chunks.into_iter().flat_map(|c| [(c, false), (c, true)]) {
                let p = FusedLinearCrossEntropy {
                    ce: ce_p,
                    chunk_tokens: chunk,
                    skip_ignored: skip,
                };
                let mut dw = Tensor::from_f32(&[v, hid], vec![0.0; v * hid]).unwrap();
                let out = fused_linear_cross_entropy(&h, &w, &labels, &p, Some(&mut dw)).unwrap();
                assert_eq!(out.n_valid, n - 3);
                let got = out.loss.to_f32_vec().unwrap()[0] as f64;
                assert!(
                    (got - want).abs() < 1e-6 * want.abs(),
                    "{chunk:?}: {got} vs {want}"
                );
                let eh = rel_err(&out.dh.to_f32_vec().unwrap(), &fd_h);
                let ew = rel_err(&dw.to_f32_vec().unwrap(), &fd_w);
                assert!(
                    eh < 1e-5 && ew < 1e-5,
                    "{chunk:?} skip {skip} {ce_p:?}: dh {eh}, dw {ew}"
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
    fn skipping_ignored_rows_changes_nothing_but_the_work() {
        // bf16 with prompt-like labels: the loss and dh are the same bits with and without
        // skip_ignored (rows are independent), dh is zero on unlabelled rows, and the f32 dW
        // differs only by the order its chunks add up in.
        let mut rng = Rng::new(23);
        let (n, hid, v) = (70, 24, 50);
        let h = Tensor::from_f32_as(&[n, hid], rng.normal_vec(n * hid, 1.0), DType::BF16).unwrap();
        let w = Tensor::from_f32_as(&[v, hid], rng.normal_vec(v * hid, 0.3), DType::BF16).unwrap();
        let lv = prompt_like_labels(&mut rng, n, v, 9, 3);
        assert!(lv.contains(&IGNORE_INDEX) && lv.iter().any(|&l| l >= 0));
        let labels = Tensor::from_i32(&[n], lv.clone()).unwrap();
        let run = |skip: bool, chunk: usize| {
            let p = FusedLinearCrossEntropy {
                chunk_tokens: Some(chunk),
                skip_ignored: skip,
                ..Default::default()
            };
            let mut dw = Tensor::zeros(&[v, hid], DType::F32, &Device::Cpu).unwrap();
            let out = fused_linear_cross_entropy(&h, &w, &labels, &p, Some(&mut dw)).unwrap();
            let loss = out.loss.to_f32_vec().unwrap()[0];
            (loss, out.dh.to_f32_vec().unwrap(), dw.to_f32_vec().unwrap())
        };
        for chunk in [1, 8, 70] {
            let (l0, dh0, dw0) = run(false, chunk);
            let (l1, dh1, dw1) = run(true, chunk);
            assert_eq!(l0, l1);
            assert_eq!(dh0, dh1);
            assert!(rel_err(&dw1, &dw0) < 1e-6, "{}", rel_err(&dw1, &dw0));
            for (i, &l) in lv.iter().enumerate() {
                if l == IGNORE_INDEX {
                    assert!(dh1[i * hid..(i + 1) * hid].iter().all(|&x| x == 0.0));
                }
            }
        }
        // Nothing labelled: nothing computed, a zero loss and gradient.
        let none = Tensor::from_i32(&[n], vec![IGNORE_INDEX; n]).unwrap();
        let p = FusedLinearCrossEntropy {
            skip_ignored: true,
            ..Default::default()
        };
        let out = fused_linear_cross_entropy(&h, &w, &none, &p, None).unwrap();
        assert_eq!(out.n_valid, 0);
        assert_eq!(out.loss.to_f32_vec().unwrap(), [0.0]);
        assert!(out.dh.to_f32_vec().unwrap().iter().all(|&x| x == 0.0));
    }

    #[test]
    fn prompt_like_labels_alternate_runs() {
        let mut rng = Rng::new(24);
        let lv = prompt_like_labels(&mut rng, 1000, 77, 20, 4);
        assert_eq!(lv.len(), 1000);
        assert_eq!(lv[0], IGNORE_INDEX);
        let ignored = lv.iter().filter(|&&l| l == IGNORE_INDEX).count();
        assert!((300..700).contains(&ignored), "{ignored}");
        assert!(lv
            .iter()
            .all(|&l| l == IGNORE_INDEX || (0..77).contains(&l)));
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
