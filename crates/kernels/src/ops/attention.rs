//! Causal attention with grouped-query heads over packed variable-length documents, forward
//! and backward (FlashAttention's varlen semantics).
//!
//! `q` is `[tokens, Hq, d]`, `k` and `v` are `[tokens, Hkv, d]` (2-D `[tokens, heads * d]`
//! is accepted too); query head `h` reads kv head `h / (Hq / Hkv)`. `cu_seqlens` (i32,
//! `[docs + 1]`) marks the documents packed along the token axis: token `t` of document
//! `[s, e)` attends to keys `s..=t` and to nothing in other documents. The forward saves the
//! log-sum-exp of each score row (f32 `[Hq, tokens]`); the backward recomputes the scores from
//! it, so no `tokens x tokens` matrix is ever stored.
//!
//! CUDA: bf16 with head_dim 64 or 128 runs FlashAttention-2-style tensor-core kernels
//! (`mma.sync` m16n8k16, fp32 accumulation and softmax, P rounded to bf16 for the P V and
//! dS products as FlashAttention does); f32 runs the simple one-warp-per-row kernels, which
//! [`AttentionKernel::Simple`] also selects for bf16 as a GPU reference. Other head dims up to
//! 256 run the simple kernels (correct, not fast: tiny models such as the demo's); larger
//! ones are an error on the GPU. `cu_seqlens` is validated on the host at every call: when it lives on
//! the GPU that is one small download (a stream synchronisation); a host `cu_seqlens` is
//! accepted too and uploaded.
//!
//! The CPU reference computes scores in f32, sums in f64, and rounds only the outputs.

use std::sync::Arc;

use crate::bench::{measure, BenchConfig, BenchRow, KernelBench};
use crate::check::{compare, compare_with_tol, random_pair, tolerance, CheckLine, GpuCheck};
use crate::cpu::par_rows;
use crate::cuda::gemm::{GemmSpec, Operand};
use crate::cuda::{Gpu, KernelSource};
use crate::error::{KernelError, Result};
use crate::ops::eager;
use crate::ops::matmul::dot;
use crate::rng::Rng;
use crate::{launch, DType, Device, Tensor};

use super::{common_gpu, expect_dtype, expect_shape};

pub const SOURCE: KernelSource = KernelSource {
    name: "attention",
    src: include_str!("../../kernels/attention.cu"),
};

const OP: &str = "attention";

/// The attention's shape parameters. `softmax_scale` multiplies `q k^T` before the softmax;
/// [`Attention::new`] sets it to `1 / sqrt(head_dim)`.
#[derive(Clone, Copy, Debug)]
pub struct Attention {
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub softmax_scale: f32,
}

impl Attention {
    pub fn new(q_heads: usize, kv_heads: usize, head_dim: usize) -> Attention {
        Attention {
            q_heads,
            kv_heads,
            head_dim,
            softmax_scale: 1.0 / (head_dim as f32).sqrt(),
        }
    }
}

pub struct AttentionForward {
    /// Same shape and dtype as `q`.
    pub o: Tensor,
    /// f32 `[Hq, tokens]`: `log sum_j exp(scale * q_t . k_j)` over the keys token `t` sees.
    pub lse: Tensor,
}

pub struct AttentionBackward {
    /// Shaped like `q`, `k`, `v`.
    pub dq: Tensor,
    pub dk: Tensor,
    pub dv: Tensor,
}

/// Which CUDA kernels run. `Auto` picks the tensor-core kernels where they apply (bf16, head
/// dim 64 or 128) and the simple ones otherwise; `Simple` forces the one-warp-per-row fp32
/// kernels, a slow but obviously right GPU reference the check compares against too.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttentionKernel {
    Auto,
    Simple,
}

#[derive(Clone, Copy, Debug)]
struct Dims {
    tokens: usize,
    hq: usize,
    hkv: usize,
    d: usize,
}

impl Dims {
    fn group(&self) -> usize {
        self.hq / self.hkv
    }
}

/// Check `t` is `[tokens, heads, d]` or `[tokens, heads * d]`; return `tokens`.
fn expect_heads(name: &'static str, t: &Tensor, heads: usize, d: usize) -> Result<usize> {
    let s = t.shape();
    let ok = match s.len() {
        3 => s[1] == heads && s[2] == d,
        2 => s[1] == heads * d,
        _ => false,
    };
    if !ok {
        return Err(KernelError::shape(
            OP,
            format!(
                "`{name}` has shape {s:?}, expected [tokens, {heads}, {d}] or [tokens, {}]",
                heads * d
            ),
        ));
    }
    Ok(s[0])
}

fn check_params(p: &Attention) -> Result<()> {
    if p.q_heads == 0 || p.kv_heads == 0 || p.head_dim == 0 {
        return Err(KernelError::invalid(
            OP,
            format!("heads and head_dim must be positive, got {p:?}"),
        ));
    }
    if !p.q_heads.is_multiple_of(p.kv_heads) {
        return Err(KernelError::invalid(
            OP,
            format!(
                "q_heads {} is not a multiple of kv_heads {}",
                p.q_heads, p.kv_heads
            ),
        ));
    }
    if !p.softmax_scale.is_finite() {
        return Err(KernelError::invalid(
            OP,
            format!("softmax_scale must be finite, got {}", p.softmax_scale),
        ));
    }
    Ok(())
}

fn check_qkv(q: &Tensor, k: &Tensor, v: &Tensor, p: &Attention) -> Result<Dims> {
    check_params(p)?;
    expect_dtype(OP, "q", q, &[DType::F32, DType::BF16])?;
    expect_dtype(OP, "k", k, &[q.dtype()])?;
    expect_dtype(OP, "v", v, &[q.dtype()])?;
    let tokens = expect_heads("q", q, p.q_heads, p.head_dim)?;
    for (name, t) in [("k", k), ("v", v)] {
        let n = expect_heads(name, t, p.kv_heads, p.head_dim)?;
        if n != tokens {
            return Err(KernelError::shape(
                OP,
                format!(
                    "`{name}` {:?} has {n} tokens, `q` {:?} has {tokens}",
                    t.shape(),
                    q.shape()
                ),
            ));
        }
    }
    Ok(Dims {
        tokens,
        hq: p.q_heads,
        hkv: p.kv_heads,
        d: p.head_dim,
    })
}

/// `cu_seqlens` read and checked once: the document bounds on the host (they size the CUDA
/// grid and drive the CPU path) beside the tensor the kernels read. The engine makes one per
/// batch; the entry points that take a `cu_seqlens` tensor make one per call, which on a GPU
/// downloads it (a wait on the stream, twice per layer and step if the engine did that).
pub struct Docs<'a> {
    cu: CuSeqlens<'a>,
    bounds: Vec<i32>,
    max_seqlen: usize,
}

enum CuSeqlens<'a> {
    Borrowed(&'a Tensor),
    Owned(Tensor),
}

impl Docs<'static> {
    /// Document bounds held on the host (i32 `[docs + 1]`, from 0, never decreasing; empty
    /// documents are allowed; none longer than `max_seqlen`), checked and put on `device`.
    pub fn new(bounds: &[i32], max_seqlen: usize, device: &Device) -> Result<Docs<'static>> {
        check_bounds(bounds, max_seqlen)?;
        let cu = Tensor::from_i32(&[bounds.len()], bounds.to_vec())?.to_device(device)?;
        Ok(Docs {
            cu: CuSeqlens::Owned(cu),
            bounds: bounds.to_vec(),
            max_seqlen,
        })
    }
}

impl<'a> Docs<'a> {
    /// A `cu_seqlens` tensor (on the host or a GPU), read and checked as [`Docs::new`] does.
    pub fn from_tensor(cu: &'a Tensor, max_seqlen: usize) -> Result<Docs<'a>> {
        expect_dtype(OP, "cu_seqlens", cu, &[DType::I32])?;
        if cu.shape().len() != 1 || cu.shape()[0] < 2 {
            return Err(KernelError::shape(
                OP,
                format!(
                    "`cu_seqlens` has shape {:?}, expected [docs + 1] with docs >= 1",
                    cu.shape()
                ),
            ));
        }
        let bounds = cu.to_i32_vec()?;
        check_bounds(&bounds, max_seqlen)?;
        Ok(Docs {
            cu: CuSeqlens::Borrowed(cu),
            bounds,
            max_seqlen,
        })
    }

    /// The tensor the kernels read.
    pub fn cu_seqlens(&self) -> &Tensor {
        match &self.cu {
            CuSeqlens::Borrowed(t) => t,
            CuSeqlens::Owned(t) => t,
        }
    }

    pub fn max_seqlen(&self) -> usize {
        self.max_seqlen
    }

    /// Tokens covered (the last bound).
    pub fn tokens(&self) -> usize {
        *self.bounds.last().expect("checked: at least two bounds") as usize
    }

    /// The bounds, for inputs of `tokens` tokens (they must end there).
    fn bounds_for(&self, tokens: usize) -> Result<&[i32]> {
        if self.tokens() != tokens {
            return Err(KernelError::invalid(
                OP,
                format!(
                    "cu_seqlens {:?} for {tokens} tokens: must end at the token count {tokens}",
                    self.bounds
                ),
            ));
        }
        Ok(&self.bounds)
    }
}

/// At least two bounds, from 0, never decreasing, no document longer than `max_seqlen`.
fn check_bounds(b: &[i32], max_seqlen: usize) -> Result<()> {
    let bad = |why: String| Err(KernelError::invalid(OP, format!("cu_seqlens {b:?}: {why}")));
    if b.len() < 2 {
        return bad("expected [docs + 1] bounds with docs >= 1".into());
    }
    if b[0] != 0 {
        return bad("must start at 0".into());
    }
    if let Some(w) = b.windows(2).find(|w| w[1] < w[0]) {
        return bad(format!("decreases ({} then {})", w[0], w[1]));
    }
    let longest = b.windows(2).map(|w| (w[1] - w[0]) as usize).max().unwrap();
    if longest > max_seqlen {
        return bad(format!(
            "a document of {longest} tokens exceeds max_seqlen {max_seqlen}"
        ));
    }
    Ok(())
}

/// `cu_seqlens` on the GPU: the tensor itself, or an upload when the caller kept it on the host.
fn cu_on_gpu(gpu: &Arc<Gpu>, cu: &Tensor, bounds: &[i32]) -> Result<Option<Tensor>> {
    if cu.is_cuda() {
        return Ok(None);
    }
    Tensor::from_i32(&[bounds.len()], bounds.to_vec())?
        .to_device(&Device::Cuda(gpu.clone()))
        .map(Some)
}

/// The GPU of the float tensors; `cu_seqlens` may sit on that GPU or on the host.
fn gpu_of(tensors: &[(&'static str, &Tensor)], cu: &Tensor) -> Result<Option<Arc<Gpu>>> {
    let gpu = common_gpu(OP, tensors)?;
    match (&gpu, cu.gpu()) {
        (None, Some(_)) => Err(KernelError::Device {
            op: OP,
            detail: "`cu_seqlens` is on a GPU, the other inputs on the CPU".into(),
        }),
        (Some(g), Some(c)) if !Arc::ptr_eq(g, c) => Err(KernelError::Device {
            op: OP,
            detail: "`cu_seqlens` is on another GPU".into(),
        }),
        _ => Ok(gpu),
    }
}

/// The simple kernels hold a row in 8 registers per lane: any head dim up to 256.
const SIMPLE_MAX_HEAD_DIM: usize = 256;

fn gpu_head_dim(d: usize) -> Result<()> {
    if d <= SIMPLE_MAX_HEAD_DIM {
        return Ok(());
    }
    Err(KernelError::invalid(
        OP,
        format!("the CUDA kernels support head_dim up to {SIMPLE_MAX_HEAD_DIM}, got {d}"),
    ))
}

/// `o = softmax(scale * q k^T, causal within each document) v` and the row log-sum-exp.
/// `max_seqlen` bounds the longest document (it sizes the CUDA grid); a document longer than
/// it is an error.
pub fn attention_forward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cu_seqlens: &Tensor,
    max_seqlen: usize,
    p: &Attention,
) -> Result<AttentionForward> {
    attention_forward_with(q, k, v, cu_seqlens, max_seqlen, p, AttentionKernel::Auto)
}

/// [`attention_forward`] with a choice of CUDA kernels.
pub fn attention_forward_with(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cu_seqlens: &Tensor,
    max_seqlen: usize,
    p: &Attention,
    kernel: AttentionKernel,
) -> Result<AttentionForward> {
    let docs = Docs::from_tensor(cu_seqlens, max_seqlen)?;
    attention_forward_docs(q, k, v, &docs, p, kernel)
}

/// [`attention_forward_with`] over documents read and checked before (see [`Docs`]).
pub fn attention_forward_docs(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    docs: &Docs,
    p: &Attention,
    kernel: AttentionKernel,
) -> Result<AttentionForward> {
    let dims = check_qkv(q, k, v, p)?;
    let gpu = gpu_of(&[("q", q), ("k", k), ("v", v)], docs.cu_seqlens())?;
    let bounds = docs.bounds_for(dims.tokens)?;
    let Some(gpu) = gpu else {
        return cpu_forward(q, k, v, bounds, dims, p.softmax_scale);
    };
    gpu_head_dim(dims.d)?;
    let cu_up = cu_on_gpu(&gpu, docs.cu_seqlens(), bounds)?;
    let cu = cu_up.as_ref().unwrap_or(docs.cu_seqlens());
    let max_seqlen = docs.max_seqlen();
    let o = Tensor::uninit_cuda(&gpu, q.shape(), q.dtype())?;
    let lse = Tensor::uninit_cuda(&gpu, &[dims.hq, dims.tokens], DType::F32)?;
    if dims.tokens == 0 {
        return Ok(AttentionForward { o, lse });
    }
    let docs = bounds.len() - 1;
    if use_tensor_cores(q.dtype(), dims.d, kernel) {
        let grid = tc_grid(max_seqlen, FWD_BM, dims.hq, docs)?;
        let f = gpu.function(&SOURCE, &format!("attn_fwd_tc_d{}", dims.d))?;
        let smem = (FWD_BM + 4 * FWD_BN) * dims.d * 2;
        gpu.set_max_dynamic_shared(f, smem)?;
        launch!(gpu, f, grid, (FWD_THREADS, 1, 1), smem as u32;
            q.dptr(), k.dptr(), v.dptr(), cu.dptr(), o.dptr(), lse.dptr(),
            dims.tokens as i32, dims.hq as i32, dims.hkv as i32,
            p.softmax_scale * std::f32::consts::LOG2_E)?;
        return Ok(AttentionForward { o, lse });
    }
    let sfx = q.dtype().kernel_suffix();
    let f = gpu.function(&SOURCE, &format!("attn_fwd_simple_{sfx}"))?;
    launch!(gpu, f, (warp_grid(dims.tokens * dims.hq), 1, 1), (256, 1, 1), 0;
        q.dptr(), k.dptr(), v.dptr(), cu.dptr(), o.dptr(), lse.dptr(),
        dims.tokens as i32, dims.hq as i32, dims.hkv as i32, dims.d as i32, docs as i32,
        p.softmax_scale)?;
    Ok(AttentionForward { o, lse })
}

/// The kernels' tiling (mirrors attention.cu): query rows, keys per block and threads of a
/// forward CTA (4 warps of 2 x 16 rows); keys per backward CTA (8 warps of 16), query rows
/// per backward step.
const FWD_BM: usize = 128;
const FWD_BN: usize = 32;
const FWD_THREADS: u32 = 128;
const BWD_BN: usize = 128;
const BWD_BM: usize = 64;

fn use_tensor_cores(dtype: DType, d: usize, kernel: AttentionKernel) -> bool {
    kernel == AttentionKernel::Auto && dtype == DType::BF16 && (d == 64 || d == 128)
}

/// Grid of (heads, documents, tiles of `max_seqlen`): tiles outermost so that the kernels can
/// start the heaviest tiles first.
fn tc_grid(max_seqlen: usize, tile: usize, heads: usize, docs: usize) -> Result<(u32, u32, u32)> {
    let tiles = max_seqlen.div_ceil(tile).max(1);
    if docs > 65535 || tiles > 65535 {
        return Err(KernelError::invalid(
            OP,
            format!("{docs} documents x {tiles} tiles of {tile} exceed the CUDA grid (65535 each)"),
        ));
    }
    Ok((heads as u32, docs as u32, tiles as u32))
}

/// Blocks of 8 warps, one warp per row.
fn warp_grid(rows: usize) -> u32 {
    rows.div_ceil(8).max(1) as u32
}

/// The backward's inputs checked: sizes, the GPU (None: the CPU) and the documents' tokens.
#[allow(clippy::too_many_arguments)]
fn check_backward(
    dout: &Tensor,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    o: &Tensor,
    lse: &Tensor,
    docs: &Docs,
    p: &Attention,
) -> Result<(Dims, Option<Arc<Gpu>>)> {
    let dims = check_qkv(q, k, v, p)?;
    for (name, t) in [("dout", dout), ("o", o)] {
        expect_dtype(OP, name, t, &[q.dtype()])?;
        expect_shape(OP, name, t, q.shape())?;
    }
    expect_dtype(OP, "lse", lse, &[DType::F32])?;
    expect_shape(OP, "lse", lse, &[dims.hq, dims.tokens])?;
    let gpu = gpu_of(
        &[
            ("dout", dout),
            ("q", q),
            ("k", k),
            ("v", v),
            ("o", o),
            ("lse", lse),
        ],
        docs.cu_seqlens(),
    )?;
    docs.bounds_for(dims.tokens)?;
    Ok((dims, gpu))
}

/// dq, dk, dv from `dout`, the forward's inputs, its output `o` and its `lse`. dk and dv sum
/// the contributions of every query head of their kv group.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    dout: &Tensor,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    o: &Tensor,
    lse: &Tensor,
    cu_seqlens: &Tensor,
    max_seqlen: usize,
    p: &Attention,
) -> Result<AttentionBackward> {
    attention_backward_with(
        dout,
        q,
        k,
        v,
        o,
        lse,
        cu_seqlens,
        max_seqlen,
        p,
        AttentionKernel::Auto,
    )
}

/// [`attention_backward`] with a choice of CUDA kernels.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward_with(
    dout: &Tensor,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    o: &Tensor,
    lse: &Tensor,
    cu_seqlens: &Tensor,
    max_seqlen: usize,
    p: &Attention,
    kernel: AttentionKernel,
) -> Result<AttentionBackward> {
    let docs = Docs::from_tensor(cu_seqlens, max_seqlen)?;
    attention_backward_docs(dout, (q, k, v), (o, lse), &docs, p, kernel)
}

/// [`attention_backward_with`] over documents read and checked before (see [`Docs`]).
pub fn attention_backward_docs(
    dout: &Tensor,
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    (o, lse): (&Tensor, &Tensor),
    docs: &Docs,
    p: &Attention,
    kernel: AttentionKernel,
) -> Result<AttentionBackward> {
    let (dims, gpu) = check_backward(dout, q, k, v, o, lse, docs, p)?;
    let bounds = &docs.bounds;
    let Some(gpu) = gpu else {
        return cpu_backward(dout, q, k, v, o, lse, bounds, dims, p.softmax_scale);
    };
    gpu_head_dim(dims.d)?;
    let cu_up = cu_on_gpu(&gpu, docs.cu_seqlens(), bounds)?;
    let cu = cu_up.as_ref().unwrap_or(docs.cu_seqlens());
    let max_seqlen = docs.max_seqlen();
    let dq = Tensor::uninit_cuda(&gpu, q.shape(), q.dtype())?;
    let dk = Tensor::uninit_cuda(&gpu, k.shape(), k.dtype())?;
    let dv = Tensor::uninit_cuda(&gpu, v.shape(), v.dtype())?;
    if dims.tokens == 0 {
        return Ok(AttentionBackward { dq, dk, dv });
    }
    let docs = bounds.len() - 1;
    let (t, hq, hkv, d) = (
        dims.tokens as i32,
        dims.hq as i32,
        dims.hkv as i32,
        dims.d as i32,
    );
    let sfx = q.dtype().kernel_suffix();
    let delta = Tensor::uninit_cuda(&gpu, &[dims.hq, dims.tokens], DType::F32)?;
    if use_tensor_cores(q.dtype(), dims.d, kernel) {
        let f = gpu.function(&SOURCE, &format!("attn_bwd_delta_d{}", dims.d))?;
        let threads = dims.tokens * dims.hq * dims.d / 8;
        launch!(gpu, f, (threads.div_ceil(256) as u32, 1, 1), (256, 1, 1), 0;
            dout.dptr(), o.dptr(), delta.dptr(), t, hq)?;
        let grid = tc_grid(max_seqlen, BWD_BN, dims.hkv, docs)?;
        // dq is summed over key blocks with fp32 atomics, then rounded once.
        let dq_acc = Tensor::zeros(q.shape(), DType::F32, &Device::Cuda(gpu.clone()))?;
        let f = gpu.function(&SOURCE, &format!("attn_bwd_tc_d{}", dims.d))?;
        let smem = (2 * BWD_BN + 4 * BWD_BM) * dims.d * 2 + BWD_BN * BWD_BM * 2 + 4 * BWD_BM * 4;
        gpu.set_max_dynamic_shared(f, smem)?;
        launch!(gpu, f, grid, (256, 1, 1), smem as u32;
            dout.dptr(), q.dptr(), k.dptr(), v.dptr(), lse.dptr(), delta.dptr(), cu.dptr(),
            dq_acc.dptr(), dk.dptr(), dv.dptr(), t, hq, hkv, p.softmax_scale)?;
        let n = q.elem_count();
        let f = gpu.function(&SOURCE, "attn_dq_convert")?;
        let blocks = (n / 8).div_ceil(256).clamp(1, gpu.sm_count() * 16) as u32;
        launch!(gpu, f, (blocks, 1, 1), (256, 1, 1), 0; dq_acc.dptr(), dq.dptr(), n as i64)?;
        return Ok(AttentionBackward { dq, dk, dv });
    }
    let f = gpu.function(&SOURCE, &format!("attn_bwd_delta_{sfx}"))?;
    launch!(gpu, f, (warp_grid(dims.tokens * dims.hq), 1, 1), (256, 1, 1), 0;
        dout.dptr(), o.dptr(), delta.dptr(), t, hq, d)?;
    let f = gpu.function(&SOURCE, &format!("attn_bwd_dq_simple_{sfx}"))?;
    launch!(gpu, f, (warp_grid(dims.tokens * dims.hq), 1, 1), (256, 1, 1), 0;
        dout.dptr(), q.dptr(), k.dptr(), v.dptr(), lse.dptr(), delta.dptr(), cu.dptr(),
        dq.dptr(), t, hq, hkv, d, docs as i32, p.softmax_scale)?;
    let f = gpu.function(&SOURCE, &format!("attn_bwd_dkdv_simple_{sfx}"))?;
    launch!(gpu, f, (warp_grid(dims.tokens * dims.hkv), 1, 1), (256, 1, 1), 0;
        dout.dptr(), q.dptr(), k.dptr(), v.dptr(), lse.dptr(), delta.dptr(), cu.dptr(),
        dk.dptr(), dv.dptr(), t, hq, hkv, d, docs as i32, p.softmax_scale)?;
    Ok(AttentionBackward { dq, dk, dv })
}

/// The non-empty documents of `bounds` as (first token, length).
fn documents(bounds: &[i32]) -> Vec<(usize, usize)> {
    bounds
        .windows(2)
        .filter(|w| w[1] > w[0])
        .map(|w| (w[0] as usize, (w[1] - w[0]) as usize))
        .collect()
}

/// One operand of a GEMM batched over heads in the unfused attention.
#[derive(Clone, Copy)]
enum Heads<'a> {
    /// A `[heads, n, n]` stack of score-like matrices (one per head).
    Square(&'a Tensor, usize),
    /// Tokens `start..` of a `[tokens, heads, d]` activation: one head per batch entry.
    Tokens(&'a Tensor, usize, usize, usize),
}

impl Heads<'_> {
    fn operand(self, trans: bool) -> Operand {
        match self {
            Heads::Square(t, n) => Operand {
                ptr: t.dptr(),
                dtype: t.dtype(),
                ld: n,
                trans,
                batch_stride: n * n,
            },
            Heads::Tokens(t, start, heads, d) => Operand {
                ptr: t.dptr() + (start * heads * d * t.dtype().size_in_bytes()) as u64,
                dtype: t.dtype(),
                ld: heads * d,
                trans,
                batch_stride: d,
            },
        }
    }
}

/// `C = alpha op(A) op(B)` per head, one strided-batched GEMM over `heads`.
#[allow(clippy::too_many_arguments)]
fn heads_gemm(
    gpu: &Gpu,
    (m, n, k): (usize, usize, usize),
    (a, trans_a): (Heads, bool),
    (b, trans_b): (Heads, bool),
    c: Heads,
    alpha: f32,
    heads: usize,
) -> Result<()> {
    gpu.gemm(&GemmSpec {
        m,
        n,
        k,
        a: a.operand(trans_a),
        b: b.operand(trans_b),
        c: c.operand(false),
        alpha,
        beta: 0.0,
        batch: heads,
    })
}

/// One document's scores `scale q k^T` (`[heads, n, n]` in q's dtype, one batched GEMM over
/// the query heads of `kx`, the kv heads already repeated) and their causal softmax (with
/// the log-sum-exp written into `lse` when given); returns both.
fn doc_probs(
    gpu: &Arc<Gpu>,
    (q, kx): (&Tensor, &Tensor),
    (start, n): (usize, usize),
    p: &Attention,
    lse: Option<&Tensor>,
) -> Result<(Tensor, Tensor)> {
    let (hq, d, dt) = (p.q_heads, p.head_dim, q.dtype());
    let s = Tensor::uninit_cuda(gpu, &[hq, n, n], dt)?;
    heads_gemm(
        gpu,
        (n, n, d),
        (Heads::Tokens(q, start, hq, d), false),
        (Heads::Tokens(kx, start, hq, d), true),
        Heads::Square(&s, n),
        p.softmax_scale,
        hq,
    )?;
    let pr = eager::causal_softmax(&s, n, dt, lse.map(|l| (l, start)))?;
    Ok((s, pr))
}

/// [`attention_forward`] as HF's "eager" attention runs it: `repeat_kv` for the kv heads,
/// then per document (the per-document mask of `cu_seqlens`: no score across documents is
/// ever formed) the materialized `[heads, n, n]` scores `scale q k^T` (one batched GEMM,
/// stored in q's dtype), a causal softmax in f32 whose probabilities are stored in q's
/// dtype, and `P v` (a GEMM). The row log-sum-exp is written by the softmax kernel in the
/// fused op's layout. Same outputs; on the CPU this runs the reference.
pub fn attention_forward_unfused(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cu_seqlens: &Tensor,
    max_seqlen: usize,
    p: &Attention,
) -> Result<AttentionForward> {
    let docs = Docs::from_tensor(cu_seqlens, max_seqlen)?;
    attention_forward_unfused_docs(q, k, v, &docs, p)
}

/// [`attention_forward_unfused`] over documents read and checked before (see [`Docs`]).
pub fn attention_forward_unfused_docs(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    docs: &Docs,
    p: &Attention,
) -> Result<AttentionForward> {
    let dims = check_qkv(q, k, v, p)?;
    let gpu = gpu_of(&[("q", q), ("k", k), ("v", v)], docs.cu_seqlens())?;
    let bounds = docs.bounds_for(dims.tokens)?;
    let Some(gpu) = gpu else {
        return cpu_forward(q, k, v, bounds, dims, p.softmax_scale);
    };
    let Dims { tokens, hq, hkv, d } = dims;
    let dt = q.dtype();
    let kx = eager::repeat_kv(k, tokens, hkv, dims.group(), d)?;
    let vx = eager::repeat_kv(v, tokens, hkv, dims.group(), d)?;
    let o = Tensor::uninit_cuda(&gpu, q.shape(), dt)?;
    let lse = Tensor::uninit_cuda(&gpu, &[hq, tokens], DType::F32)?;
    let at = |t, start| Heads::Tokens(t, start, hq, d);
    for (start, n) in documents(bounds) {
        let (s, pr) = doc_probs(&gpu, (q, &kx), (start, n), p, Some(&lse))?;
        drop(s);
        heads_gemm(
            &gpu,
            (n, d, n),
            (Heads::Square(&pr, n), false),
            (at(&vx, start), false),
            at(&o, start),
            1.0,
            hq,
        )?;
    }
    Ok(AttentionForward { o, lse })
}

/// [`attention_backward`] as autograd runs it through the eager forward, per document: the
/// scores and probabilities recomputed (scores GEMM, causal softmax; the engine keeps only
/// `o` and `lse`, so `o` and `lse` are not read here), `dP = dout v^T`, the softmax
/// backward `dS = P (dP - rowsum(P dP))`, then `dq = scale dS k`, `dk = scale dS^T q`,
/// `dv = P^T dout` for every query head, and the group sums that are `repeat_kv`'s
/// backward. Same outputs; on the CPU this runs the reference.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward_unfused(
    dout: &Tensor,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    o: &Tensor,
    lse: &Tensor,
    cu_seqlens: &Tensor,
    max_seqlen: usize,
    p: &Attention,
) -> Result<AttentionBackward> {
    let docs = Docs::from_tensor(cu_seqlens, max_seqlen)?;
    attention_backward_unfused_docs(dout, (q, k, v), (o, lse), &docs, p)
}

/// [`attention_backward_unfused`] over documents read and checked before (see [`Docs`]).
pub fn attention_backward_unfused_docs(
    dout: &Tensor,
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    (o, lse): (&Tensor, &Tensor),
    docs: &Docs,
    p: &Attention,
) -> Result<AttentionBackward> {
    let (dims, gpu) = check_backward(dout, q, k, v, o, lse, docs, p)?;
    let bounds = &docs.bounds;
    let Some(gpu) = gpu else {
        return cpu_backward(dout, q, k, v, o, lse, bounds, dims, p.softmax_scale);
    };
    let Dims { tokens, hq, hkv, d } = dims;
    let (dt, group, scale) = (q.dtype(), dims.group(), p.softmax_scale);
    let kx = eager::repeat_kv(k, tokens, hkv, group, d)?;
    let vx = eager::repeat_kv(v, tokens, hkv, group, d)?;
    let dq = Tensor::uninit_cuda(&gpu, q.shape(), dt)?;
    let dkx = Tensor::uninit_cuda(&gpu, &[tokens, hq, d], dt)?;
    let dvx = Tensor::uninit_cuda(&gpu, &[tokens, hq, d], dt)?;
    let at = |t, start| Heads::Tokens(t, start, hq, d);
    for (start, n) in documents(bounds) {
        let (s, pr) = doc_probs(&gpu, (q, &kx), (start, n), p, None)?;
        // The scores' buffer takes dP.
        heads_gemm(
            &gpu,
            (n, n, d),
            (at(dout, start), false),
            (at(&vx, start), true),
            Heads::Square(&s, n),
            1.0,
            hq,
        )?;
        let ds = eager::softmax_backward(&pr, &s, n, dt)?;
        drop(s);
        let (sq_ds, sq_p) = (Heads::Square(&ds, n), Heads::Square(&pr, n));
        heads_gemm(
            &gpu,
            (n, d, n),
            (sq_ds, false),
            (at(&kx, start), false),
            at(&dq, start),
            scale,
            hq,
        )?;
        heads_gemm(
            &gpu,
            (n, d, n),
            (sq_ds, true),
            (at(q, start), false),
            at(&dkx, start),
            scale,
            hq,
        )?;
        heads_gemm(
            &gpu,
            (n, d, n),
            (sq_p, true),
            (at(dout, start), false),
            at(&dvx, start),
            1.0,
            hq,
        )?;
    }
    drop((kx, vx));
    let dk = eager::group_sum(&dkx, tokens, hkv, group, d)?.reshape(k.shape())?;
    let dv = eager::group_sum(&dvx, tokens, hkv, group, d)?.reshape(v.shape())?;
    Ok(AttentionBackward { dq, dk, dv })
}

/// For each token, the first and one-past-last token of its document.
fn token_docs(bounds: &[i32], tokens: usize) -> Vec<(usize, usize)> {
    let mut out = Vec::with_capacity(tokens);
    for w in bounds.windows(2) {
        for _ in w[0]..w[1] {
            out.push((w[0] as usize, w[1] as usize));
        }
    }
    out
}

/// The CPU reference forward: f32 scores (dot products with 8 accumulators), softmax with
/// f64 sums, outputs accumulated in f64, rounded once to the output dtype.
fn cpu_forward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bounds: &[i32],
    dims: Dims,
    scale: f32,
) -> Result<AttentionForward> {
    let (qs, ks, vs) = (q.cpu_f32(), k.cpu_f32(), v.cpu_f32());
    let Dims { tokens, hq, hkv, d } = dims;
    let group = dims.group();
    let docs = token_docs(bounds, tokens);
    // One row per (token, head): d outputs, then the lse.
    let mut rows = vec![0.0f32; tokens * hq * (d + 1)];
    par_rows(&mut rows, d + 1, |r, out| {
        let (t, h) = (r / hq, r % hq);
        let kvh = h / group;
        let start = docs[t].0;
        let qr = &qs[r * d..(r + 1) * d];
        let kv_row = |j: usize| (j * hkv + kvh) * d;
        let scores: Vec<f32> = (start..=t)
            .map(|j| dot(qr, &ks[kv_row(j)..kv_row(j) + d]) * scale)
            .collect();
        let m = scores.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let mut acc = vec![0.0f64; d];
        let mut l = 0.0f64;
        for (j, &s) in (start..=t).zip(&scores) {
            let pj = ((s - m) as f64).exp();
            l += pj;
            for (a, &x) in acc.iter_mut().zip(&vs[kv_row(j)..kv_row(j) + d]) {
                *a += pj * x as f64;
            }
        }
        for (o, a) in out[..d].iter_mut().zip(&acc) {
            *o = (a / l) as f32;
        }
        out[d] = (m as f64 + l.ln()) as f32;
    });
    let mut o = vec![0.0f32; tokens * hq * d];
    let mut lse = vec![0.0f32; hq * tokens];
    for (r, row) in rows.chunks(d + 1).enumerate() {
        o[r * d..(r + 1) * d].copy_from_slice(&row[..d]);
        lse[(r % hq) * tokens + r / hq] = row[d];
    }
    Ok(AttentionForward {
        o: Tensor::from_f32_as(q.shape(), o, q.dtype())?,
        lse: Tensor::from_f32(&[hq, tokens], lse)?,
    })
}

/// The CPU reference backward, in two passes that each recompute the probabilities from the
/// saved lse: dq by query rows, then dk and dv by key rows (summing the group's query heads).
#[allow(clippy::too_many_arguments)]
fn cpu_backward(
    dout: &Tensor,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    o: &Tensor,
    lse: &Tensor,
    bounds: &[i32],
    dims: Dims,
    scale: f32,
) -> Result<AttentionBackward> {
    let (dos, qs, ks, vs, os, lses) = (
        dout.cpu_f32(),
        q.cpu_f32(),
        k.cpu_f32(),
        v.cpu_f32(),
        o.cpu_f32(),
        lse.cpu_f32(),
    );
    let Dims { tokens, hq, hkv, d } = dims;
    let group = dims.group();
    let docs = token_docs(bounds, tokens);
    // delta[h * tokens + t] = do . o for row (t, h).
    let mut delta = vec![0.0f32; hq * tokens];
    par_rows(&mut delta, 1, |i, out| {
        let (h, t) = (i / tokens, i % tokens);
        let r = (t * hq + h) * d;
        out[0] = dos[r..r + d]
            .iter()
            .zip(&os[r..r + d])
            .map(|(&a, &b)| a as f64 * b as f64)
            .sum::<f64>() as f32;
    });
    let qrow = |t: usize, h: usize| (t * hq + h) * d;
    let kvrow = |j: usize, kvh: usize| (j * hkv + kvh) * d;
    // (p, ds) of query row (t, h) against key j.
    let p_ds = |t: usize, h: usize, j: usize| -> (f32, f32) {
        let (qr, kr) = (qrow(t, h), kvrow(j, h / group));
        let s = dot(&qs[qr..qr + d], &ks[kr..kr + d]) * scale;
        let p = (s - lses[h * tokens + t]).exp();
        let dp = dot(&dos[qr..qr + d], &vs[kr..kr + d]);
        (p, p * (dp - delta[h * tokens + t]))
    };
    let mut dq = vec![0.0f32; tokens * hq * d];
    par_rows(&mut dq, d, |r, out| {
        let (t, h) = (r / hq, r % hq);
        let mut acc = vec![0.0f64; d];
        for j in docs[t].0..=t {
            let (_, ds) = p_ds(t, h, j);
            let kr = kvrow(j, h / group);
            for (a, &x) in acc.iter_mut().zip(&ks[kr..kr + d]) {
                *a += ds as f64 * x as f64;
            }
        }
        for (o, a) in out.iter_mut().zip(&acc) {
            *o = (a * scale as f64) as f32;
        }
    });
    // One row per (key token, kv head): dk then dv.
    let mut dkv = vec![0.0f32; tokens * hkv * 2 * d];
    par_rows(&mut dkv, 2 * d, |r, out| {
        let (j, kvh) = (r / hkv, r % hkv);
        let mut ak = vec![0.0f64; d];
        let mut av = vec![0.0f64; d];
        // Token-major: the group's query rows of one token are adjacent in memory.
        for t in j..docs[j].1 {
            for h in kvh * group..(kvh + 1) * group {
                let (p, ds) = p_ds(t, h, j);
                let qr = qrow(t, h);
                for c in 0..d {
                    ak[c] += ds as f64 * qs[qr + c] as f64;
                    av[c] += p as f64 * dos[qr + c] as f64;
                }
            }
        }
        for c in 0..d {
            out[c] = (ak[c] * scale as f64) as f32;
            out[d + c] = av[c] as f32;
        }
    });
    let mut dk = vec![0.0f32; tokens * hkv * d];
    let mut dv = vec![0.0f32; tokens * hkv * d];
    for (r, row) in dkv.chunks(2 * d).enumerate() {
        dk[r * d..(r + 1) * d].copy_from_slice(&row[..d]);
        dv[r * d..(r + 1) * d].copy_from_slice(&row[d..]);
    }
    let dt = q.dtype();
    Ok(AttentionBackward {
        dq: Tensor::from_f32_as(q.shape(), dq, dt)?,
        dk: Tensor::from_f32_as(k.shape(), dk, dt)?,
        dv: Tensor::from_f32_as(v.shape(), dv, dt)?,
    })
}

pub const CHECK: GpuCheck = GpuCheck {
    op: OP,
    run: gpu_check,
};

/// `cu_seqlens` for documents of the given lengths.
pub fn cu_seqlens_of(lengths: &[usize]) -> Vec<i32> {
    let mut cu = vec![0i32];
    for &l in lengths {
        cu.push(cu.last().unwrap() + l as i32);
    }
    cu
}

fn gpu_check(gpu: &Arc<Gpu>, rng: &mut Rng) -> Result<Vec<CheckLine>> {
    let mut lines = Vec::new();
    let dev = Device::Cuda(gpu.clone());
    // (document lengths, q heads, kv heads, head dim, dtype, what the case is for)
    type Case = (&'static [usize], usize, usize, usize, DType, &'static str);
    let cases: &[Case] = &[
        (
            &[1, 37, 200],
            4,
            1,
            64,
            DType::BF16,
            "odd docs, MQA-like 4/1",
        ),
        (
            &[1, 37, 200],
            32,
            8,
            128,
            DType::BF16,
            "odd docs, Llama heads",
        ),
        (&[130, 1, 67, 64], 8, 2, 128, DType::BF16, "tile edges"),
        (&[5, 70, 33], 4, 2, 64, DType::F32, "f32"),
        (
            &[9, 100, 31],
            4,
            2,
            16,
            DType::BF16,
            "small head dim: simple kernels",
        ),
        (&[3, 77], 6, 2, 96, DType::F32, "head dim 96, f32"),
        (
            &[2048, 2048, 2048, 2048],
            32,
            8,
            128,
            DType::BF16,
            "Llama-3-8B 4x2048",
        ),
    ];
    for &(lengths, hq, hkv, d, dt, what) in cases {
        let tokens: usize = lengths.iter().sum();
        let p = Attention::new(hq, hkv, d);
        let cu_host = Tensor::from_i32(&[lengths.len() + 1], cu_seqlens_of(lengths))?;
        let cu_dev = cu_host.to_device(&dev)?;
        let max_seqlen = *lengths.iter().max().unwrap();
        let (q, gq) = random_pair(gpu, rng, &[tokens, hq, d], dt, 1.0)?;
        let (k, gk) = random_pair(gpu, rng, &[tokens, hkv, d], dt, 1.0)?;
        let (v, gv) = random_pair(gpu, rng, &[tokens, hkv, d], dt, 1.0)?;
        let (dout, gdout) = random_pair(gpu, rng, &[tokens, hq, d], dt, 1.0)?;
        let case = format!("{dt} docs {lengths:?} heads {hq}/{hkv} d {d} ({what})");
        let f = attention_forward(&q, &k, &v, &cu_host, max_seqlen, &p)?;
        // The backward sees the reference's o and lse on both sides, so that it is checked
        // on its own and not through the forward's rounding.
        let go = f.o.to_device(&dev)?;
        let glse = f.lse.to_device(&dev)?;
        let b = attention_backward(&dout, &q, &k, &v, &f.o, &f.lse, &cu_host, max_seqlen, &p)?;
        let kernels: &[AttentionKernel] = if dt == DType::BF16 && tokens < 4096 {
            &[AttentionKernel::Auto, AttentionKernel::Simple]
        } else {
            &[AttentionKernel::Auto]
        };
        for &kernel in kernels {
            let tag = |out: &str| match kernel {
                AttentionKernel::Auto => out.to_string(),
                AttentionKernel::Simple => format!("{out} (simple)"),
            };
            let gf = attention_forward_with(&gq, &gk, &gv, &cu_dev, max_seqlen, &p, kernel)?;
            lines.push(compare(OP, &case, &tag("o"), &gf.o, &f.o)?);
            lines.push(compare(OP, &case, &tag("lse"), &gf.lse, &f.lse)?);
            let gb = attention_backward_with(
                &gdout, &gq, &gk, &gv, &go, &glse, &cu_dev, max_seqlen, &p, kernel,
            )?;
            lines.push(compare(OP, &case, &tag("dq"), &gb.dq, &b.dq)?);
            lines.push(compare(OP, &case, &tag("dk"), &gb.dk, &b.dk)?);
            lines.push(compare(OP, &case, &tag("dv"), &gb.dv, &b.dv)?);
        }
        // The unfused composition (materialized scores per document), from the same inputs.
        let uf = attention_forward_unfused(&gq, &gk, &gv, &cu_dev, max_seqlen, &p)?;
        lines.push(compare(OP, &case, "o(unfused)", &uf.o, &f.o)?);
        // Its scores are stored in q's dtype (as eager attention stores them), so its f32
        // log-sum-exp is only as accurate as that dtype.
        lines.push(compare_with_tol(
            OP,
            &case,
            "lse(unfused)",
            &uf.lse,
            &f.lse,
            tolerance(dt),
        )?);
        let ub =
            attention_backward_unfused(&gdout, &gq, &gk, &gv, &go, &glse, &cu_dev, max_seqlen, &p)?;
        lines.push(compare(OP, &case, "dq(unfused)", &ub.dq, &b.dq)?);
        lines.push(compare(OP, &case, "dk(unfused)", &ub.dk, &b.dk)?);
        lines.push(compare(OP, &case, "dv(unfused)", &ub.dv, &b.dv)?);
    }
    Ok(lines)
}

pub const BENCH: KernelBench = KernelBench { op: OP, run: bench };

/// 4 sequences x 2048 tokens, 32 query / 8 kv heads, d 128, bf16, causal.
fn bench(gpu: &Arc<Gpu>, cfg: &BenchConfig) -> Result<Vec<BenchRow>> {
    let (seqs, seq, hq, hkv, d) = (4usize, 2048usize, 32usize, 8usize, 128usize);
    let tokens = seqs * seq;
    let dev = Device::Cuda(gpu.clone());
    let mut rng = Rng::new(7);
    let mut rand = |shape: &[usize]| -> Result<Tensor> {
        let n = shape.iter().product();
        Tensor::from_f32_as(shape, rng.normal_vec(n, 1.0), DType::BF16)?.to_device(&dev)
    };
    let q = rand(&[tokens, hq, d])?;
    let k_ = rand(&[tokens, hkv, d])?;
    let v = rand(&[tokens, hkv, d])?;
    let dout = rand(&[tokens, hq, d])?;
    let cu = Tensor::from_i32(&[seqs + 1], cu_seqlens_of(&vec![seq; seqs]))?.to_device(&dev)?;
    let p = Attention::new(hq, hkv, d);
    let shape = format!("{seqs}x{seq} heads {hq}/{hkv} d {d} bf16 causal");
    // Causal FLOPs: two GEMMs of 2 * S^2 * d per head, half of them masked away.
    let fwd_flops = (seqs * hq) as f64 * 4.0 * (seq * seq * d) as f64 / 2.0;
    let bwd_flops = 2.5 * fwd_flops;
    let fused = measure(
        gpu,
        cfg,
        OP,
        "fused",
        &shape,
        0.0,
        fwd_flops + bwd_flops,
        || {
            let f = attention_forward(&q, &k_, &v, &cu, seq, &p)?;
            attention_backward(&dout, &q, &k_, &v, &f.o, &f.lse, &cu, seq, &p)?;
            Ok(())
        },
    )?;
    let fused_fwd = measure(gpu, cfg, OP, "fused-fwd", &shape, 0.0, fwd_flops, || {
        attention_forward(&q, &k_, &v, &cu, seq, &p)?;
        Ok(())
    })?;
    let fused_simple = measure(
        gpu,
        cfg,
        OP,
        "simple-kernels",
        &shape,
        0.0,
        fwd_flops + bwd_flops,
        || {
            let k = AttentionKernel::Simple;
            let f = attention_forward_with(&q, &k_, &v, &cu, seq, &p, k)?;
            attention_backward_with(&dout, &q, &k_, &v, &f.o, &f.lse, &cu, seq, &p, k)?;
            Ok(())
        },
    )?;
    // HF eager attention: repeat_kv, then per sequence a strided-batched GEMM over heads for
    // the scores (bf16), a causal softmax kernel (f32 math, bf16 probabilities), a GEMM for
    // P V; the backward through the same graph, the scores and probabilities recomputed
    // (the engine's unfused mode keeps only o and lse).
    let unfused_fwd = measure(gpu, cfg, OP, "unfused-fwd", &shape, 0.0, fwd_flops, || {
        attention_forward_unfused(&q, &k_, &v, &cu, seq, &p)?;
        Ok(())
    })?;
    let unfused = measure(
        gpu,
        cfg,
        OP,
        "unfused",
        &shape,
        0.0,
        fwd_flops + bwd_flops,
        || {
            let f = attention_forward_unfused(&q, &k_, &v, &cu, seq, &p)?;
            attention_backward_unfused(&dout, &q, &k_, &v, &f.o, &f.lse, &cu, seq, &p)?;
            Ok(())
        },
    )?;
    Ok(vec![fused, fused_fwd, fused_simple, unfused, unfused_fwd])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Naive f64 attention over the full score matrix with an explicit mask.
    fn naive(
        q: &[f64],
        k: &[f64],
        v: &[f64],
        lengths: &[usize],
        p: &Attention,
    ) -> (Vec<f64>, Vec<f64>) {
        let (hq, hkv, d) = (p.q_heads, p.kv_heads, p.head_dim);
        let scale = p.softmax_scale as f64;
        let tokens: usize = lengths.iter().sum();
        let mut doc = Vec::new();
        for (i, &l) in lengths.iter().enumerate() {
            doc.extend(std::iter::repeat_n(i, l));
        }
        let mut o = vec![0.0; tokens * hq * d];
        let mut lse = vec![0.0; hq * tokens];
        for h in 0..hq {
            let kvh = h / (hq / hkv);
            for t in 0..tokens {
                let keys: Vec<usize> = (0..tokens)
                    .filter(|&j| j <= t && doc[j] == doc[t])
                    .collect();
                let s: Vec<f64> = keys
                    .iter()
                    .map(|&j| {
                        (0..d)
                            .map(|c| q[(t * hq + h) * d + c] * k[(j * hkv + kvh) * d + c])
                            .sum::<f64>()
                            * scale
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let l: f64 = s.iter().map(|x| (x - m).exp()).sum();
                lse[h * tokens + t] = m + l.ln();
                for (&j, &sj) in keys.iter().zip(&s) {
                    let pj = (sj - m).exp() / l;
                    for c in 0..d {
                        o[(t * hq + h) * d + c] += pj * v[(j * hkv + kvh) * d + c];
                    }
                }
            }
        }
        (o, lse)
    }

    fn f64s(v: &[f32]) -> Vec<f64> {
        v.iter().map(|&x| x as f64).collect()
    }
    fn f32s(v: &[f64]) -> Vec<f32> {
        v.iter().map(|&x| x as f32).collect()
    }

    struct Case {
        lengths: Vec<usize>,
        p: Attention,
        q: Vec<f32>,
        k: Vec<f32>,
        v: Vec<f32>,
    }

    impl Case {
        fn new(rng: &mut Rng, lengths: &[usize], hq: usize, hkv: usize, d: usize) -> Case {
            let tokens: usize = lengths.iter().sum();
            Case {
                lengths: lengths.to_vec(),
                p: Attention::new(hq, hkv, d),
                q: rng.normal_vec(tokens * hq * d, 1.0),
                k: rng.normal_vec(tokens * hkv * d, 1.0),
                v: rng.normal_vec(tokens * hkv * d, 1.0),
            }
        }
        fn tokens(&self) -> usize {
            self.lengths.iter().sum()
        }
        fn tensors(&self) -> (Tensor, Tensor, Tensor, Tensor) {
            let (t, p) = (self.tokens(), &self.p);
            (
                Tensor::from_f32(&[t, p.q_heads, p.head_dim], self.q.clone()).unwrap(),
                Tensor::from_f32(&[t, p.kv_heads, p.head_dim], self.k.clone()).unwrap(),
                Tensor::from_f32(&[t, p.kv_heads, p.head_dim], self.v.clone()).unwrap(),
                Tensor::from_i32(&[self.lengths.len() + 1], cu_seqlens_of(&self.lengths)).unwrap(),
            )
        }
        fn max_seqlen(&self) -> usize {
            *self.lengths.iter().max().unwrap()
        }
        fn naive(&self, q: &[f64], k: &[f64], v: &[f64]) -> (Vec<f64>, Vec<f64>) {
            naive(q, k, v, &self.lengths, &self.p)
        }
    }

    #[test]
    fn forward_matches_f64_over_packed_documents() {
        let mut rng = Rng::new(21);
        for (lengths, hq, hkv, d) in [
            (vec![1usize, 5, 9], 4usize, 2usize, 7usize),
            (vec![13], 3, 1, 16),
            (vec![4, 0, 6], 2, 2, 5),
        ] {
            let c = Case::new(&mut rng, &lengths, hq, hkv, d);
            let (q, k, v, cu) = c.tensors();
            let f = attention_forward(&q, &k, &v, &cu, c.max_seqlen(), &c.p).unwrap();
            let (o, lse) = c.naive(&f64s(&c.q), &f64s(&c.k), &f64s(&c.v));
            let eo = crate::check::rel_err(&f.o.to_f32_vec().unwrap(), &f32s(&o));
            let el = crate::check::rel_err(&f.lse.to_f32_vec().unwrap(), &f32s(&lse));
            assert!(
                eo < 1e-6 && el < 1e-6,
                "{lengths:?}: o err {eo}, lse err {el}"
            );
            assert_eq!(f.o.shape(), q.shape());
            assert_eq!(f.lse.shape(), &[hq, c.tokens()]);
        }
    }

    /// Packing: two documents in one call give exactly what two separate calls give.
    #[test]
    fn packed_documents_do_not_see_each_other() {
        let mut rng = Rng::new(22);
        let (hq, hkv, d) = (4, 2, 8);
        let c = Case::new(&mut rng, &[6, 9], hq, hkv, d);
        let (q, k, v, cu) = c.tensors();
        let whole = attention_forward(&q, &k, &v, &cu, 9, &c.p).unwrap();
        let wo = whole.o.to_f32_vec().unwrap();
        let mut from = 0;
        for len in [6usize, 9] {
            let part = |x: &[f32], h: usize| {
                Tensor::from_f32(&[len, h, d], x[from * h * d..(from + len) * h * d].to_vec())
                    .unwrap()
            };
            let cu1 = Tensor::from_i32(&[2], vec![0, len as i32]).unwrap();
            let f = attention_forward(
                &part(&c.q, hq),
                &part(&c.k, hkv),
                &part(&c.v, hkv),
                &cu1,
                len,
                &c.p,
            )
            .unwrap();
            assert_eq!(
                f.o.to_f32_vec().unwrap(),
                wo[from * hq * d..(from + len) * hq * d].to_vec()
            );
            from += len;
        }
    }

    /// The backward against central differences of the f64 forward, for L = sum(o * g).
    #[test]
    fn backward_matches_finite_differences() {
        let mut rng = Rng::new(23);
        for (lengths, hq, hkv, d) in [
            (vec![3usize, 1, 6], 4usize, 2usize, 5usize),
            (vec![7], 2, 1, 3),
        ] {
            let c = Case::new(&mut rng, &lengths, hq, hkv, d);
            let g = rng.normal_vec(c.q.len(), 1.0);
            let (q, k, v, cu) = c.tensors();
            let dout = Tensor::from_f32(q.shape(), g.clone()).unwrap();
            let f = attention_forward(&q, &k, &v, &cu, c.max_seqlen(), &c.p).unwrap();
            let b = attention_backward(&dout, &q, &k, &v, &f.o, &f.lse, &cu, c.max_seqlen(), &c.p)
                .unwrap();
            let (q64, k64, v64) = (f64s(&c.q), f64s(&c.k), f64s(&c.v));
            let loss = |q: &[f64], k: &[f64], v: &[f64]| -> f64 {
                c.naive(q, k, v)
                    .0
                    .iter()
                    .zip(&g)
                    .map(|(o, &g)| o * g as f64)
                    .sum()
            };
            let h = 1e-6;
            let fd = |which: usize| -> Vec<f32> {
                let base = [&q64, &k64, &v64][which];
                (0..base.len())
                    .map(|i| {
                        let mut args = [q64.clone(), k64.clone(), v64.clone()];
                        args[which][i] = base[i] + h;
                        let up = loss(&args[0], &args[1], &args[2]);
                        args[which][i] = base[i] - h;
                        let down = loss(&args[0], &args[1], &args[2]);
                        ((up - down) / (2.0 * h)) as f32
                    })
                    .collect()
            };
            for (which, (name, got)) in [("dq", &b.dq), ("dk", &b.dk), ("dv", &b.dv)]
                .into_iter()
                .enumerate()
            {
                let e = crate::check::rel_err(&got.to_f32_vec().unwrap(), &fd(which));
                assert!(e < 1e-5, "{lengths:?} {name}: err {e}");
            }
        }
    }

    #[test]
    fn two_dimensional_inputs_give_the_same_result() {
        let mut rng = Rng::new(24);
        let c = Case::new(&mut rng, &[5, 4], 4, 2, 6);
        let (q, k, v, cu) = c.tensors();
        let f3 = attention_forward(&q, &k, &v, &cu, 5, &c.p).unwrap();
        let t = c.tokens();
        let q2 = Tensor::from_f32(&[t, 24], c.q.clone()).unwrap();
        let k2 = Tensor::from_f32(&[t, 12], c.k.clone()).unwrap();
        let v2 = Tensor::from_f32(&[t, 12], c.v.clone()).unwrap();
        let f2 = attention_forward(&q2, &k2, &v2, &cu, 5, &c.p).unwrap();
        assert_eq!(f2.o.shape(), &[t, 24]);
        assert_eq!(f2.o.to_f32_vec().unwrap(), f3.o.to_f32_vec().unwrap());
        let b2 = attention_backward(&f2.o, &q2, &k2, &v2, &f2.o, &f2.lse, &cu, 5, &c.p).unwrap();
        assert_eq!(b2.dq.shape(), &[t, 24]);
        assert_eq!(b2.dk.shape(), &[t, 12]);
    }

    #[test]
    fn bad_inputs_are_errors_naming_the_problem() {
        let mut rng = Rng::new(25);
        let c = Case::new(&mut rng, &[3, 4], 4, 2, 8);
        let (q, k, v, _) = c.tensors();
        let cu = |b: Vec<i32>| Tensor::from_i32(&[b.len()], b).unwrap();
        let err = |r: Result<AttentionForward>| r.err().expect("should fail").to_string();
        let e = err(attention_forward(
            &q,
            &k,
            &v,
            &cu(vec![0, 4, 3, 7]),
            7,
            &c.p,
        ));
        assert!(e.contains("attention") && e.contains("decreases"), "{e}");
        let e = err(attention_forward(&q, &k, &v, &cu(vec![0, 3, 6]), 7, &c.p));
        assert!(e.contains("end at the token count 7"), "{e}");
        let e = err(attention_forward(&q, &k, &v, &cu(vec![1, 3, 7]), 7, &c.p));
        assert!(e.contains("start at 0"), "{e}");
        let e = err(attention_forward(&q, &k, &v, &cu(vec![0, 3, 7]), 3, &c.p));
        assert!(e.contains("max_seqlen 3"), "{e}");
        let e = err(attention_forward(&q, &k, &v, &cu(vec![7]), 7, &c.p));
        assert!(e.contains("cu_seqlens") && e.contains("[1]"), "{e}");
        let good = cu(vec![0, 3, 7]);
        let e = err(attention_forward(&q, &q, &v, &good, 7, &c.p));
        assert!(e.contains("`k`") && e.contains("[7, 4, 8]"), "{e}");
        let p5 = Attention::new(5, 2, 8);
        let e = err(attention_forward(&q, &k, &v, &good, 7, &p5));
        assert!(e.contains("not a multiple"), "{e}");
        let kb = Tensor::from_f32_as(k.shape(), c.k.clone(), DType::BF16).unwrap();
        let e = err(attention_forward(&q, &kb, &v, &good, 7, &c.p));
        assert!(e.contains("`k`") && e.contains("bf16"), "{e}");
        let f = attention_forward(&q, &k, &v, &good, 7, &c.p).unwrap();
        let short = Tensor::from_f32(&[4, 6], vec![0.0; 24]).unwrap();
        let e = attention_backward(&f.o, &q, &k, &v, &f.o, &short, &good, 7, &c.p)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("lse") && e.contains("[4, 6]"), "{e}");
    }

    /// Documents checked once (the engine's per-batch path) give the per-call results, and
    /// their checks name the problem just as the per-call entry points do.
    #[test]
    fn docs_checked_once_match_the_tensor_entry_points() {
        let mut rng = Rng::new(31);
        let lengths = [5, 0, 4];
        let c = Case::new(&mut rng, &lengths, 4, 2, 8);
        let (q, k, v, cu) = c.tensors();
        let dout = Tensor::from_f32(q.shape(), rng.normal_vec(q.elem_count(), 1.0)).unwrap();
        let bounds = cu_seqlens_of(&lengths);
        let docs = Docs::new(&bounds, 5, &Device::Cpu).unwrap();
        assert_eq!((docs.tokens(), docs.max_seqlen()), (9, 5));
        let want = attention_forward(&q, &k, &v, &cu, 5, &c.p).unwrap();
        let got = attention_forward_docs(&q, &k, &v, &docs, &c.p, AttentionKernel::Auto).unwrap();
        assert_eq!(got.o.to_f32_vec().unwrap(), want.o.to_f32_vec().unwrap());
        assert_eq!(
            got.lse.to_f32_vec().unwrap(),
            want.lse.to_f32_vec().unwrap()
        );
        let (o, lse) = (&want.o, &want.lse);
        let want_b = attention_backward(&dout, &q, &k, &v, o, lse, &cu, 5, &c.p).unwrap();
        let kernel = AttentionKernel::Auto;
        let got_b =
            attention_backward_docs(&dout, (&q, &k, &v), (o, lse), &docs, &c.p, kernel).unwrap();
        for (g, w) in [
            (&got_b.dq, &want_b.dq),
            (&got_b.dk, &want_b.dk),
            (&got_b.dv, &want_b.dv),
        ] {
            assert_eq!(g.to_f32_vec().unwrap(), w.to_f32_vec().unwrap());
        }
        let e = |b: &[i32], max: usize| Docs::new(b, max, &Device::Cpu).err().unwrap().to_string();
        assert!(e(&[0, 4, 2], 9).contains("decreases (4 then 2)"));
        assert!(e(&[0, 9], 5).contains("exceeds max_seqlen 5"));
        assert!(e(&[0], 5).contains("docs >= 1"));
        let other = Docs::new(&[0, 3, 7], 4, &Device::Cpu).unwrap();
        let e = attention_forward_docs(&q, &k, &v, &other, &c.p, kernel)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("for 9 tokens") && e.contains("end at the token count 9"),
            "{e}"
        );
    }
}
