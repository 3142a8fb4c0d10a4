//! Fused multi-tensor AdamW over fp32 master weights, fp32 gradients and fp32 moments, with
//! clipping by the global gradient norm.
//!
//! The update is torch.optim.AdamW's, in f32:
//! `p *= 1 - lr wd; m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2;
//! p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)`.
//! torch's fused CUDA kernel evaluates a few of these products in f64; the difference is at
//! f32 rounding level.
//!
//! Every tensor is cut into chunks of [`CHUNK`] elements, and one table of chunk descriptors
//! drives a single launch for all of them: a LoRA step over 448 small tensors is one kernel.
//! The table only changes when the tensors do, so it is uploaded once and reused from a small
//! cache: a training step issues no host-to-device copy and no host synchronisation.
//!
//! Clipping: [`grad_norm`] sums the squares of every gradient (a fixed grid of per-block f64
//! partials, then one block adds them in order: deterministic) into a device scalar; the
//! AdamW kernel reads it and applies `min(1, max_norm / (norm + 1e-6))` to each gradient as
//! torch's `clip_grad_norm_` does, so the host never waits for the norm. The gradients
//! themselves are left unscaled (or zeroed, on request).

use std::sync::{Arc, Mutex};

use crate::bench::{measure, BenchConfig, BenchRow, KernelBench};
use crate::check::{compare, compare_scalar, compare_with_tol, random_pair, CheckLine, GpuCheck};
use crate::cpu::{par_map, threads};
use crate::cuda::{DeviceBuffer, Gpu, KernelSource};
use crate::error::{KernelError, Result};
use crate::ops::eager::{self, BinaryOp, Broadcast, Reduce, UnaryOp};
use crate::ops::elementwise::cast;
use crate::rng::Rng;
use crate::tensor::{CpuData, Storage};
use crate::{launch, DType, Device, Tensor};

use super::{common_gpu, expect_dtype};

pub const SOURCE: KernelSource = KernelSource {
    name: "adamw",
    src: include_str!("../../kernels/adamw.cu"),
};

const OP: &str = "adamw";
const NORM_OP: &str = "grad_norm";

/// Hyper-parameters, as torch.optim.AdamW names them.
#[derive(Clone, Copy, Debug)]
pub struct AdamW {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
}

impl Default for AdamW {
    /// torch.optim.AdamW's defaults.
    fn default() -> Self {
        AdamW {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-2,
        }
    }
}

/// One trainable tensor and its state, all f32 and of one shape.
pub struct AdamWTensors<'a> {
    pub param: &'a mut Tensor,
    pub grad: &'a mut Tensor,
    pub m: &'a mut Tensor,
    pub v: &'a mut Tensor,
}

/// Elements per chunk of the multi-tensor table: a multiple of 4, so a chunk starts 16-byte
/// aligned whenever its tensor does (the kernels use 16-byte accesses there).
pub const CHUNK: usize = 16384;

/// `u64` words per chunk descriptor: param, grad, m, v addresses and the length, as the
/// kernels' `AdamChunk`.
const WORDS: usize = 5;

/// Append the chunk descriptors of one tensor of f32 slots (addresses 0 stay 0: unused slots).
fn push_chunks(table: &mut Vec<u64>, ptrs: [u64; 4], len: usize) {
    push_chunks_sized(table, ptrs, [4; 4], len)
}

/// [`push_chunks`] with each slot's element size in bytes.
fn push_chunks_sized(table: &mut Vec<u64>, ptrs: [u64; 4], elem_bytes: [u64; 4], len: usize) {
    let mut start = 0;
    while start < len {
        let n = CHUNK.min(len - start);
        table.extend(ptrs.iter().zip(elem_bytes).map(|(&p, b)| {
            if p == 0 {
                0
            } else {
                p + start as u64 * b
            }
        }));
        table.push(n as u64);
        start += n;
    }
}

const CAST_OP: &str = "cast_multi";

/// `dst[i] = src[i]` rounded to bf16 for every pair, in one launch on the GPU (one chunk
/// table, cached while the addresses stay the same): what [`crate::ops::elementwise::cast`]
/// gives tensor by tensor, without a launch per tensor. `src` are f32, `dst` bf16 of the
/// same shapes, all on one device.
pub fn cast_multi_to_bf16(src: &[&Tensor], dst: &mut [Tensor]) -> Result<()> {
    if src.len() != dst.len() {
        return Err(KernelError::invalid(
            CAST_OP,
            format!("{} sources and {} destinations", src.len(), dst.len()),
        ));
    }
    for (s, d) in src.iter().zip(dst.iter()) {
        if s.shape() != d.shape() {
            return Err(KernelError::shape(
                CAST_OP,
                format!("src {:?} and dst {:?}", s.shape(), d.shape()),
            ));
        }
    }
    let at: Vec<(usize, usize)> = (0..src.len()).map(|i| (i, 0)).collect();
    cast_multi_to_bf16_at(src, dst, &at)
}

/// [`cast_multi_to_bf16`] into parts of the destinations: `src[i]` is rounded into
/// `dst[at[i].0]` from element `at[i].1` on (row-major), so several tensors can be
/// stacked into one buffer in the same single launch (the LoRA A of projections that
/// share an input).
pub fn cast_multi_to_bf16_at(
    src: &[&Tensor],
    dst: &mut [Tensor],
    at: &[(usize, usize)],
) -> Result<()> {
    if src.len() != at.len() {
        return Err(KernelError::invalid(
            CAST_OP,
            format!("{} sources and {} destination places", src.len(), at.len()),
        ));
    }
    let mut named: Vec<(&'static str, &Tensor)> = Vec::with_capacity(src.len() + dst.len());
    for s in src {
        expect_dtype(CAST_OP, "src", s, &[DType::F32])?;
        named.push(("src", s));
    }
    for d in dst.iter() {
        expect_dtype(CAST_OP, "dst", d, &[DType::BF16])?;
        named.push(("dst", d));
    }
    for (s, &(j, off)) in src.iter().zip(at) {
        let fits = dst
            .get(j)
            .is_some_and(|d| off + s.elem_count() <= d.elem_count());
        if !fits {
            return Err(KernelError::shape(
                CAST_OP,
                format!(
                    "src {:?} does not fit destination {j} at element {off} ({} destinations)",
                    s.shape(),
                    dst.len()
                ),
            ));
        }
    }
    let Some(gpu) = common_gpu(CAST_OP, &named)? else {
        for (s, &(j, off)) in src.iter().zip(at) {
            let mut vals = dst[j].cpu_f32().into_owned();
            vals[off..off + s.elem_count()].copy_from_slice(&s.cpu_f32());
            dst[j].cpu_store_f32(&vals);
        }
        return Ok(());
    };
    let mut table = Vec::new();
    for (s, &(j, off)) in src.iter().zip(at) {
        push_chunks_sized(
            &mut table,
            [s.dptr(), dst[j].dptr() + 2 * off as u64, 0, 0],
            [4, 2, 0, 0],
            s.elem_count(),
        );
    }
    let chunks = chunk_count(CAST_OP, &table)?;
    if chunks == 0 {
        return Ok(());
    }
    let blocks = (chunks as usize).min(gpu.sm_count() * 8) as u32;
    let f = gpu.function(&SOURCE, "cast_multi_f32_bf16")?;
    with_table(
        &gpu,
        &table,
        |t| launch!(gpu, f, (blocks, 1, 1), (256, 1, 1), 0; t, chunks),
    )
}

/// Chunk tables already on a device, keyed by their exact contents. The same addresses and
/// lengths mean the same table whatever tensors they belong to now, so a hit is always right.
static TABLES: Mutex<Vec<(Vec<u64>, DeviceBuffer)>> = Mutex::new(Vec::new());
const CACHED_TABLES: usize = 8;

/// Run `f` with the device address of `table`, uploading it on a cache miss. The cache stays
/// locked during `f`, so a table is never evicted (freed) between lookup and launch; a
/// launch already queued keeps it alive in stream order after eviction.
fn with_table<T>(gpu: &Arc<Gpu>, table: &[u64], f: impl FnOnce(u64) -> Result<T>) -> Result<T> {
    let mut cache = TABLES.lock().unwrap_or_else(|e| e.into_inner());
    let hit = cache
        .iter()
        .position(|(words, buf)| Arc::ptr_eq(buf.gpu(), gpu) && words.as_slice() == table);
    let index = match hit {
        Some(i) => i,
        None => {
            let buf = gpu.alloc(std::mem::size_of_val(table))?;
            gpu.upload(&buf, table)?;
            if cache.len() >= CACHED_TABLES {
                cache.remove(0);
            }
            cache.push((table.to_vec(), buf));
            cache.len() - 1
        }
    };
    f(cache[index].1.ptr())
}

fn chunk_count(op: &'static str, table: &[u64]) -> Result<i32> {
    i32::try_from(table.len() / WORDS)
        .map_err(|_| KernelError::invalid(op, "more chunks than a launch can index"))
}

/// The global L2 norm of all `grads` (f32), as an f32 `[1]` tensor on their device.
pub fn grad_norm(grads: &[&Tensor]) -> Result<Tensor> {
    for g in grads {
        expect_dtype(NORM_OP, "grad", g, &[DType::F32])?;
    }
    let named: Vec<(&'static str, &Tensor)> = grads.iter().map(|g| ("grad", *g)).collect();
    let Some(gpu) = common_gpu(NORM_OP, &named)? else {
        let total: f64 = grads.iter().map(|g| cpu_sumsq(&g.cpu_f32())).sum();
        return Tensor::from_f32(&[1], vec![total.sqrt() as f32]);
    };
    let mut table = Vec::new();
    for g in grads {
        push_chunks(&mut table, [0, g.dptr(), 0, 0], g.elem_count());
    }
    let chunks = chunk_count(NORM_OP, &table)?;
    if chunks == 0 {
        return Tensor::zeros(&[1], DType::F32, &Device::Cuda(gpu));
    }
    let norm = Tensor::uninit_cuda(&gpu, &[1], DType::F32)?;
    // The grid depends only on the chunk count and the GPU: the same sums in the same order
    // on every run.
    let blocks = (chunks as usize).min(gpu.sm_count() * 4);
    let partials = gpu.alloc(blocks * 8)?;
    let partial_fn = gpu.function(&SOURCE, "adamw_sumsq_partials")?;
    with_table(
        &gpu,
        &table,
        |t| launch!(gpu, partial_fn, (blocks as u32, 1, 1), (256, 1, 1), 0; t, chunks, partials.ptr()),
    )?;
    let finish = gpu.function(&SOURCE, "adamw_norm_finish")?;
    launch!(gpu, finish, (1, 1, 1), (256, 1, 1), 0; partials.ptr(), blocks as i32, norm.dptr())?;
    Ok(norm)
}

/// Sum of squares in f64, chunks in parallel, added in order.
fn cpu_sumsq(g: &[f32]) -> f64 {
    let parts = par_map(g.len().div_ceil(CHUNK), |c| {
        g[c * CHUNK..((c + 1) * CHUNK).min(g.len())]
            .iter()
            .map(|&x| x as f64 * x as f64)
            .sum::<f64>()
    });
    parts.iter().sum()
}

/// The step's scalars, computed once on the host in f64.
#[derive(Clone, Copy, Debug)]
struct Scalars {
    decay: f32,
    beta1: f32,
    beta2: f32,
    step_size: f32,
    bc2_sqrt: f32,
    eps: f32,
}

fn scalars(p: &AdamW, step: u64) -> Result<Scalars> {
    let bad = |what: &str, v: f32| {
        Err(KernelError::invalid(
            OP,
            format!("{what} must be {}, got {v}", what_range(what)),
        ))
    };
    if !(p.lr.is_finite() && p.lr >= 0.0) {
        return bad("lr", p.lr);
    }
    for (name, b) in [("beta1", p.beta1), ("beta2", p.beta2)] {
        if !(0.0..1.0).contains(&b) {
            return bad(name, b);
        }
    }
    if !(p.eps.is_finite() && p.eps >= 0.0) {
        return bad("eps", p.eps);
    }
    if !(p.weight_decay.is_finite() && p.weight_decay >= 0.0) {
        return bad("weight_decay", p.weight_decay);
    }
    if step == 0 {
        return Err(KernelError::invalid(
            OP,
            "step counts from 1 (the bias corrections divide by 1 - beta^step)",
        ));
    }
    let t = step as f64;
    let bc1 = 1.0 - (p.beta1 as f64).powf(t);
    let bc2 = 1.0 - (p.beta2 as f64).powf(t);
    Ok(Scalars {
        decay: (1.0 - p.lr as f64 * p.weight_decay as f64) as f32,
        beta1: p.beta1,
        beta2: p.beta2,
        step_size: (p.lr as f64 / bc1) as f32,
        bc2_sqrt: bc2.sqrt() as f32,
        eps: p.eps,
    })
}

fn what_range(what: &str) -> &'static str {
    match what {
        "beta1" | "beta2" => "in [0, 1)",
        _ => "finite and >= 0",
    }
}

/// One AdamW step at `step` (counting from 1) over every tensor, in one launch on the GPU.
/// With `max_grad_norm = Some((max, norm))`, each gradient is scaled by
/// `min(1, max / (norm + 1e-6))` where `norm` is [`grad_norm`]'s device scalar. With
/// `zero_grads`, the gradients are zeroed as they are consumed (the next accumulation
/// window starts from zero at no extra pass).
pub fn adamw_step(
    tensors: &mut [AdamWTensors],
    step: u64,
    p: &AdamW,
    max_grad_norm: Option<(f32, &Tensor)>,
    zero_grads: bool,
) -> Result<()> {
    let s = scalars(p, step)?;
    let gpu = check_step(tensors, max_grad_norm)?;
    let Some(gpu) = gpu else {
        let clip = match max_grad_norm {
            Some((max_norm, norm)) => clip_coef(max_norm, norm.cpu_f32()[0]),
            None => 1.0,
        };
        for t in tensors.iter_mut() {
            cpu_update(t, &s, clip, zero_grads);
        }
        return Ok(());
    };
    let mut table = Vec::new();
    for t in tensors.iter() {
        let ptrs = [t.param.dptr(), t.grad.dptr(), t.m.dptr(), t.v.dptr()];
        push_chunks(&mut table, ptrs, t.param.elem_count());
    }
    let chunks = chunk_count(OP, &table)?;
    if chunks == 0 {
        return Ok(());
    }
    let blocks = (chunks as usize).min(gpu.sm_count() * 8) as u32;
    let (norm_ptr, max_norm) = max_grad_norm.map_or((0u64, 0.0f32), |(m, n)| (n.dptr(), m));
    let f = gpu.function(&SOURCE, "adamw_step_multi")?;
    with_table(&gpu, &table, |t| {
        launch!(gpu, f, (blocks, 1, 1), (256, 1, 1), 0;
            t, chunks, s.decay, s.beta1, s.beta2, s.step_size, s.bc2_sqrt, s.eps,
            norm_ptr, max_norm, zero_grads as i32)
    })
}

/// [`adamw_step`] as the plain composition torch's non-fused AdamW runs: per tensor, one
/// kernel per elementwise op with a temporary in between (decay, the two moment updates,
/// sqrt, bias correction, eps, divide, step), and for clipping `clip_grad_norm_`'s device
/// coefficient `min(1, max / (norm + 1e-6))` (three scalar ops) multiplied into a copy of
/// each gradient (the gradients stay unscaled, as the fused op leaves them). `param`, `m`,
/// `v` (and `grad`, zeroed, with `zero_grads`) are replaced by the new tensors. Same
/// results to f32 rounding; on the CPU this runs the reference.
pub fn adamw_step_unfused(
    tensors: &mut [AdamWTensors],
    step: u64,
    p: &AdamW,
    max_grad_norm: Option<(f32, &Tensor)>,
    zero_grads: bool,
) -> Result<()> {
    let s = scalars(p, step)?;
    let Some(gpu) = check_step(tensors, max_grad_norm)? else {
        return adamw_step(tensors, step, p, max_grad_norm, zero_grads);
    };
    let f = DType::F32;
    let coef = match max_grad_norm {
        Some((max_norm, norm)) => {
            let n1 = eager::unary(norm, UnaryOp::AddScalar, 1e-6, f)?;
            let c = eager::unary(&n1, UnaryOp::ScalarDiv, max_norm, f)?;
            Some(eager::unary(&c, UnaryOp::MinScalar, 1.0, f)?)
        }
        None => None,
    };
    let dev = Device::Cuda(gpu);
    for t in tensors.iter_mut() {
        let clipped = match &coef {
            Some(c) => Some(eager::binary(
                t.grad,
                c,
                Broadcast::Scalar,
                BinaryOp::Mul,
                f,
            )?),
            None => None,
        };
        let g = clipped.as_ref().unwrap_or(t.grad);
        let p1 = eager::unary(t.param, UnaryOp::Scale, s.decay, f)?;
        let m1 = eager::unary(t.m, UnaryOp::Scale, s.beta1, f)?;
        let g1 = eager::unary(g, UnaryOp::Scale, 1.0 - s.beta1, f)?;
        let m2 = eager::binary(&m1, &g1, Broadcast::None, BinaryOp::Add, f)?;
        drop((m1, g1));
        let v1 = eager::unary(t.v, UnaryOp::Scale, s.beta2, f)?;
        let g2 = eager::unary(g, UnaryOp::Square, 0.0, f)?;
        let g3 = eager::unary(&g2, UnaryOp::Scale, 1.0 - s.beta2, f)?;
        let v2 = eager::binary(&v1, &g3, Broadcast::None, BinaryOp::Add, f)?;
        drop((v1, g2, g3, clipped));
        let sq = eager::sqrt(&v2, f)?;
        let d1 = eager::unary(&sq, UnaryOp::Scale, 1.0 / s.bc2_sqrt, f)?;
        let d2 = eager::unary(&d1, UnaryOp::AddScalar, s.eps, f)?;
        let u = eager::binary(&m2, &d2, Broadcast::None, BinaryOp::Div, f)?;
        let u1 = eager::unary(&u, UnaryOp::Scale, s.step_size, f)?;
        *t.param = eager::binary(&p1, &u1, Broadcast::None, BinaryOp::Sub, f)?;
        *t.m = m2;
        *t.v = v2;
        if zero_grads {
            *t.grad = Tensor::zeros(t.grad.shape(), f, &dev)?;
        }
    }
    Ok(())
}

/// [`grad_norm`] as the plain composition: per gradient a square and two sum reductions
/// (rows, then the row sums), the sums added one tensor at a time, then a sqrt, each a
/// kernel (torch's per-tensor norms combined, here without the intermediate roots). An f32
/// `[1]` tensor on the gradients' device; on the CPU this runs the reference.
pub fn grad_norm_unfused(grads: &[&Tensor]) -> Result<Tensor> {
    for g in grads {
        expect_dtype(NORM_OP, "grad", g, &[DType::F32])?;
    }
    let named: Vec<(&'static str, &Tensor)> = grads.iter().map(|g| ("grad", *g)).collect();
    let Some(gpu) = common_gpu(NORM_OP, &named)? else {
        return grad_norm(grads);
    };
    let f = DType::F32;
    let mut total = Tensor::zeros(&[1], f, &Device::Cuda(gpu))?;
    for g in grads.iter().filter(|g| g.elem_count() > 0) {
        let sq = eager::unary(g, UnaryOp::Square, 0.0, f)?;
        let rows = eager::row_reduce(&sq, Reduce::Sum)?;
        drop(sq);
        let sum = eager::row_reduce(&rows, Reduce::Sum)?;
        total = eager::binary(&total, &sum, Broadcast::None, BinaryOp::Add, f)?;
    }
    eager::sqrt(&total, f)
}

/// The step's tensors checked (f32, one shape per group; the norm one f32 value); the GPU
/// they are on (None: the CPU).
fn check_step(
    tensors: &[AdamWTensors],
    max_grad_norm: Option<(f32, &Tensor)>,
) -> Result<Option<Arc<Gpu>>> {
    for (i, t) in tensors.iter().enumerate() {
        for (name, x) in [
            ("param", &*t.param),
            ("grad", &*t.grad),
            ("m", &*t.m),
            ("v", &*t.v),
        ] {
            expect_dtype(OP, name, x, &[DType::F32])?;
            if x.shape() != t.param.shape() {
                return Err(KernelError::shape(
                    OP,
                    format!(
                        "tensor {i}: `{name}` has shape {:?}, param has {:?}",
                        x.shape(),
                        t.param.shape()
                    ),
                ));
            }
        }
    }
    if let Some((max_norm, norm)) = max_grad_norm {
        if !(max_norm.is_finite() && max_norm > 0.0) {
            return Err(KernelError::invalid(
                OP,
                format!("max_grad_norm must be finite and > 0, got {max_norm}"),
            ));
        }
        expect_dtype(OP, "norm", norm, &[DType::F32])?;
        if norm.elem_count() != 1 {
            return Err(KernelError::shape(
                OP,
                format!("norm has shape {:?}, expected one value", norm.shape()),
            ));
        }
    }
    let gpu = {
        let mut named: Vec<(&'static str, &Tensor)> = Vec::with_capacity(4 * tensors.len() + 1);
        for t in tensors.iter() {
            named.extend([
                ("param", &*t.param),
                ("grad", &*t.grad),
                ("m", &*t.m),
                ("v", &*t.v),
            ]);
        }
        named.extend(max_grad_norm.map(|(_, n)| ("norm", n)));
        common_gpu(OP, &named)?
    };
    Ok(gpu)
}

/// torch's `clip_grad_norm_` coefficient, clamped to 1.
fn clip_coef(max_norm: f32, norm: f32) -> f32 {
    (max_norm / (norm + 1e-6)).min(1.0)
}

fn cpu_values(t: &mut Tensor) -> &mut [f32] {
    match t.storage_mut() {
        Storage::Cpu(CpuData::F32(v)) => v,
        _ => unreachable!("adamw checked for f32 CPU tensors"),
    }
}

/// The kernel's arithmetic, element by element, over ranges of the tensor in parallel.
fn cpu_update(t: &mut AdamWTensors, s: &Scalars, clip: f32, zero_grads: bool) {
    let (p, g, m, v) = (
        cpu_values(t.param),
        cpu_values(t.grad),
        cpu_values(t.m),
        cpu_values(t.v),
    );
    let update = |p: &mut [f32], g: &mut [f32], m: &mut [f32], v: &mut [f32]| {
        for i in 0..p.len() {
            let gi = g[i] * clip;
            let pi = p[i] * s.decay;
            m[i] = s.beta1 * m[i] + (1.0 - s.beta1) * gi;
            v[i] = s.beta2 * v[i] + (1.0 - s.beta2) * gi * gi;
            let denom = v[i].sqrt() / s.bc2_sqrt + s.eps;
            p[i] = pi - s.step_size * m[i] / denom;
            if zero_grads {
                g[i] = 0.0;
            }
        }
    };
    let per = p.len().div_ceil(threads()).max(CHUNK);
    if p.len() <= per {
        return update(p, g, m, v);
    }
    std::thread::scope(|scope| {
        let parts = p
            .chunks_mut(per)
            .zip(g.chunks_mut(per))
            .zip(m.chunks_mut(per))
            .zip(v.chunks_mut(per));
        for (((pc, gc), mc), vc) in parts {
            let update = &update;
            scope.spawn(move || update(pc, gc, mc, vc));
        }
    });
}

pub const CHECK: GpuCheck = GpuCheck {
    op: OP,
    run: gpu_check,
};

/// p, g, m, v of one tensor: on the CPU, on the GPU, and on the GPU for the unfused step.
struct State {
    cpu: [Tensor; 4],
    gpu: [Tensor; 4],
    unfused: [Tensor; 4],
}

/// Which copy of the states a view or a gather takes.
#[derive(Clone, Copy)]
enum Side {
    Cpu,
    Gpu,
    Unfused,
}

impl State {
    fn side(&mut self, side: Side) -> &mut [Tensor; 4] {
        match side {
            Side::Cpu => &mut self.cpu,
            Side::Gpu => &mut self.gpu,
            Side::Unfused => &mut self.unfused,
        }
    }
}

fn random_state(gpu: &Arc<Gpu>, rng: &mut Rng, shape: &[usize], fresh: bool) -> Result<State> {
    let n: usize = shape.iter().product();
    let dev = Device::Cuda(gpu.clone());
    let p = rng.normal_vec(n, 0.05);
    let g = rng.normal_vec(n, 1.0);
    // Fresh moments are zero (the first step of training); otherwise a state mid-training.
    let m = if fresh {
        vec![0.0; n]
    } else {
        rng.normal_vec(n, 0.1)
    };
    let v = if fresh {
        vec![0.0; n]
    } else {
        rng.uniform_vec(n, 0.0, 0.01)
    };
    let cpu = [p, g, m, v].map(|d| Tensor::from_f32(shape, d).expect("sized above"));
    let up = |cpu: &[Tensor; 4]| -> Result<[Tensor; 4]> {
        Ok([
            cpu[0].to_device(&dev)?,
            cpu[1].to_device(&dev)?,
            cpu[2].to_device(&dev)?,
            cpu[3].to_device(&dev)?,
        ])
    };
    let (gpu_t, unfused) = (up(&cpu)?, up(&cpu)?);
    Ok(State {
        cpu,
        gpu: gpu_t,
        unfused,
    })
}

fn views(states: &mut [State], side: Side) -> Vec<AdamWTensors<'_>> {
    states
        .iter_mut()
        .map(|s| {
            let [p, g, m, v] = s.side(side);
            AdamWTensors {
                param: p,
                grad: g,
                m,
                v,
            }
        })
        .collect()
}

/// All values of field `k` (0 p, 1 g, 2 m, 3 v) of every tensor, concatenated.
fn gather(states: &mut [State], k: usize, side: Side) -> Result<Tensor> {
    let mut all = Vec::new();
    for s in states {
        all.extend(s.side(side)[k].to_f32_vec()?);
    }
    let n = all.len();
    Tensor::from_f32(&[n], all)
}

/// The LoRA r=16 tensors of Llama-3-8B: A [16, in] and B [out, 16] for q, k, v, o, gate,
/// up, down in each of 32 layers (448 tensors, 41.9M parameters).
fn llama3_8b_lora_shapes(r: usize) -> Vec<[usize; 2]> {
    let projections = [
        (4096, 4096),
        (4096, 1024),
        (4096, 1024),
        (4096, 4096),
        (4096, 14336),
        (4096, 14336),
        (14336, 4096),
    ];
    let mut shapes = Vec::new();
    for _ in 0..32 {
        for (inp, out) in projections {
            shapes.push([r, inp]);
            shapes.push([out, r]);
        }
    }
    shapes
}

fn gpu_check(gpu: &Arc<Gpu>, rng: &mut Rng) -> Result<Vec<CheckLine>> {
    let mut lines = Vec::new();
    let odd: Vec<[usize; 2]> = [
        1, 3, 4, 5, 31, 1000, 4097, 16383, 16384, 16385, 65543, 229376, 100_001,
    ]
    .iter()
    .map(|&n| [1, n])
    .chain((0..28).map(|_| [1 + rng.below(7), 1 + rng.below(40000)]))
    .collect();
    let llama = llama3_8b_lora_shapes(16);
    // The multi-tensor cast against the CPU cast, tensor by tensor: bit-exact.
    for (shapes, what) in [(&odd, "41 odd tensors"), (&llama, "Llama-3-8B LoRA r=16")] {
        let mut cpu_src = Vec::new();
        let mut gpu_src = Vec::new();
        let mut dst = Vec::new();
        for s in shapes.iter() {
            let (c, g) = random_pair(gpu, rng, s, DType::F32, 0.05)?;
            dst.push(Tensor::uninit_cuda(gpu, s, DType::BF16)?);
            cpu_src.push(c);
            gpu_src.push(g);
        }
        let srcs: Vec<&Tensor> = gpu_src.iter().collect();
        cast_multi_to_bf16(&srcs, &mut dst)?;
        let mut out = Vec::new();
        let mut reference = Vec::new();
        for (c, d) in cpu_src.iter().zip(&dst) {
            reference.extend(cast(c, DType::BF16)?.to_f32_vec()?);
            out.extend(d.to_f32_vec()?);
        }
        let (n, m) = (out.len(), reference.len());
        let (out, reference) = (
            Tensor::from_f32(&[n], out)?,
            Tensor::from_f32(&[m], reference)?,
        );
        lines.push(compare_with_tol(
            CAST_OP,
            what,
            "bf16 copies",
            &out,
            &reference,
            f64::MIN_POSITIVE,
        )?);
    }
    // Stacked: odd-sized tensors into two buffers at running offsets (the LoRA A of q/k/v
    // with ranks 16, 8, 5 and of gate/up), against the CPU's stacking: bit-exact.
    {
        let parts: [(usize, [usize; 2]); 5] = [
            (0, [16, 4096]),
            (0, [8, 4096]),
            (0, [5, 4096]),
            (1, [7, 333]),
            (1, [16, 333]),
        ];
        let lens = [29 * 4096, 23 * 333];
        let (mut cpu_src, mut gpu_src, mut at) = (Vec::new(), Vec::new(), Vec::new());
        let mut next = [0usize; 2];
        for (j, s) in parts {
            let (c, g) = random_pair(gpu, rng, &s, DType::F32, 0.05)?;
            cpu_src.push(c);
            gpu_src.push(g);
            at.push((j, next[j]));
            next[j] += s[0] * s[1];
        }
        let mut cpu_dst = Vec::new();
        let mut gpu_dst = Vec::new();
        for n in lens {
            cpu_dst.push(Tensor::zeros(&[n], DType::BF16, &crate::Device::Cpu)?);
            gpu_dst.push(Tensor::uninit_cuda(gpu, &[n], DType::BF16)?);
        }
        cast_multi_to_bf16_at(&cpu_src.iter().collect::<Vec<_>>(), &mut cpu_dst, &at)?;
        cast_multi_to_bf16_at(&gpu_src.iter().collect::<Vec<_>>(), &mut gpu_dst, &at)?;
        for (j, (g, c)) in gpu_dst.iter().zip(&cpu_dst).enumerate() {
            lines.push(compare_with_tol(
                CAST_OP,
                &format!("stacked into buffer {j} (q/k/v, gate/up A)"),
                "bf16 stack",
                g,
                c,
                f64::MIN_POSITIVE,
            )?);
        }
    }
    // (shapes, steps, clipping max norm, zero grads, fresh moments, what)
    type Case<'s> = (&'s [[usize; 2]], u64, Option<f32>, bool, bool, &'static str);
    let cases: [Case; 4] = [
        (&odd, 3, None, false, false, "41 odd tensors"),
        (&odd, 3, Some(1.0), true, true, "41 odd tensors, clipped"),
        (
            &odd,
            2,
            Some(1e9),
            false,
            false,
            "41 odd tensors, clip inactive",
        ),
        (
            &llama,
            2,
            Some(1.0),
            true,
            true,
            "Llama-3-8B LoRA r=16, 448 tensors",
        ),
    ];
    let p = AdamW {
        lr: 1e-2,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.1,
    };
    for (shapes, steps, clip, zero, fresh, what) in cases {
        let mut states = shapes
            .iter()
            .map(|s| random_state(gpu, rng, s, fresh))
            .collect::<Result<Vec<_>>>()?;
        let case = format!("{what}, {steps} steps, clip={clip:?}, zero_grads={zero}");
        for step in 1..=steps {
            if step > 1 {
                // A fresh gradient each step, the same on both sides.
                for s in states.iter_mut() {
                    let shape = s.cpu[1].shape().to_vec();
                    let n = s.cpu[1].elem_count();
                    s.cpu[1] = Tensor::from_f32(&shape, rng.normal_vec(n, 1.0))?;
                    s.gpu[1] = s.cpu[1].to_device(&Device::Cuda(gpu.clone()))?;
                    s.unfused[1] = s.cpu[1].to_device(&Device::Cuda(gpu.clone()))?;
                }
            }
            let (norm_cpu, norm_gpu, norm_unfused) = {
                let gc: Vec<&Tensor> = states.iter().map(|s| &s.cpu[1]).collect();
                let gg: Vec<&Tensor> = states.iter().map(|s| &s.gpu[1]).collect();
                let gu: Vec<&Tensor> = states.iter().map(|s| &s.unfused[1]).collect();
                (grad_norm(&gc)?, grad_norm(&gg)?, grad_norm_unfused(&gu)?)
            };
            lines.push(compare_scalar(
                NORM_OP,
                &format!("{case}, step {step}"),
                "norm(unfused)",
                norm_unfused.to_f32_vec()?[0],
                norm_cpu.to_f32_vec()?[0],
            ));
            lines.push(compare_scalar(
                NORM_OP,
                &format!("{case}, step {step}"),
                "norm",
                norm_gpu.to_f32_vec()?[0],
                norm_cpu.to_f32_vec()?[0],
            ));
            let clip_cpu = clip.map(|m| (m, &norm_cpu));
            let clip_gpu = clip.map(|m| (m, &norm_gpu));
            let clip_unfused = clip.map(|m| (m, &norm_unfused));
            adamw_step(&mut views(&mut states, Side::Cpu), step, &p, clip_cpu, zero)?;
            adamw_step(&mut views(&mut states, Side::Gpu), step, &p, clip_gpu, zero)?;
            let mut unfused_views = views(&mut states, Side::Unfused);
            adamw_step_unfused(&mut unfused_views, step, &p, clip_unfused, zero)?;
        }
        for (k, name) in ["param", "grad", "m", "v"].iter().enumerate() {
            let c = gather(&mut states, k, Side::Cpu)?;
            for (side, tag) in [(Side::Gpu, ""), (Side::Unfused, "(unfused)")] {
                let g = gather(&mut states, k, side)?;
                let mut line = compare(OP, &case, &format!("{name}{tag}"), &g, &c)?;
                if k == 1 && zero {
                    // Zeroed gradients: the reference is all zeros, so demand exact zeros.
                    let all_zero = g.to_f32_vec()?.iter().all(|&x| x == 0.0);
                    line.rel_err = if all_zero { 0.0 } else { f64::INFINITY };
                    line.pass = all_zero;
                }
                lines.push(line);
            }
        }
    }
    Ok(lines)
}

/// `[param, grad, m, v]` groups as the step's views.
fn group_views(groups: &mut [[Tensor; 4]]) -> Vec<AdamWTensors<'_>> {
    groups
        .iter_mut()
        .map(|[p, g, m, v]| AdamWTensors {
            param: p,
            grad: g,
            m,
            v,
        })
        .collect()
}

pub const BENCH: KernelBench = KernelBench { op: OP, run: bench };

/// Llama-3-8B LoRA r=16: 448 tensors, 41.9M fp32 parameters. The fused step (one launch),
/// the fused step with global-norm clipping and zeroed grads, and the per-tensor eager
/// composition (one launch per tensor per elementwise op, temporaries in between).
fn bench(gpu: &Arc<Gpu>, cfg: &BenchConfig) -> Result<Vec<BenchRow>> {
    let shapes = llama3_8b_lora_shapes(16);
    let dev = Device::Cuda(gpu.clone());
    let mut rng = Rng::new(31);
    let mut groups: Vec<[Tensor; 4]> = Vec::with_capacity(shapes.len());
    let mut total = 0usize;
    for s in &shapes {
        let n = s[0] * s[1];
        total += n;
        let t = |v: Vec<f32>| -> Result<Tensor> { Tensor::from_f32(s, v)?.to_device(&dev) };
        groups.push([
            t(rng.normal_vec(n, 0.02))?,
            t(rng.normal_vec(n, 1e-3))?,
            t(rng.normal_vec(n, 1e-4))?,
            t(rng.uniform_vec(n, 0.0, 1e-6))?,
        ]);
    }
    let p = AdamW::default();
    let shape = format!(
        "{} tensors, {:.1}M params f32",
        shapes.len(),
        total as f64 / 1e6
    );
    // p, g, m, v read; p, m, v written.
    let floor = (7 * 4 * total) as f64;
    let mut rows = Vec::new();
    let mut step = 0u64;
    rows.push(measure(gpu, cfg, OP, "fused", &shape, floor, 0.0, || {
        step += 1;
        adamw_step(&mut group_views(&mut groups), step, &p, None, false)
    })?);
    rows.push(measure(
        gpu,
        cfg,
        OP,
        "fused+clip+zero",
        &shape,
        floor,
        0.0,
        || {
            step += 1;
            let norm = {
                let grads: Vec<&Tensor> = groups.iter().map(|g| &g[1]).collect();
                grad_norm(&grads)?
            };
            adamw_step(
                &mut group_views(&mut groups),
                step,
                &p,
                Some((1.0, &norm)),
                true,
            )
        },
    )?);
    rows.push(measure(
        gpu,
        cfg,
        OP,
        "unfused",
        &shape,
        floor,
        0.0,
        || {
            step += 1;
            adamw_step_unfused(&mut group_views(&mut groups), step, &p, None, false)
        },
    )?);
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// torch.optim.AdamW's single-tensor update in f64.
    #[allow(clippy::too_many_arguments)]
    fn naive_step(
        p: &mut [f64],
        g: &[f64],
        m: &mut [f64],
        v: &mut [f64],
        t: u64,
        h: &AdamW,
        clip: f64,
    ) {
        let (lr, b1, b2, eps, wd) = (
            h.lr as f64,
            h.beta1 as f64,
            h.beta2 as f64,
            h.eps as f64,
            h.weight_decay as f64,
        );
        let bc1 = 1.0 - b1.powi(t as i32);
        let bc2 = 1.0 - b2.powi(t as i32);
        for i in 0..p.len() {
            let gi = g[i] * clip;
            p[i] *= 1.0 - lr * wd;
            m[i] = b1 * m[i] + (1.0 - b1) * gi;
            v[i] = b2 * v[i] + (1.0 - b2) * gi * gi;
            p[i] -= lr / bc1 * m[i] / ((v[i] / bc2).sqrt() + eps);
        }
    }

    fn tensors(rng: &mut Rng, lens: &[usize]) -> Vec<[Tensor; 4]> {
        lens.iter()
            .map(|&n| {
                [
                    rng.normal_vec(n, 1.0),
                    rng.normal_vec(n, 1.0),
                    rng.normal_vec(n, 0.1),
                    rng.uniform_vec(n, 0.0, 0.01),
                ]
                .map(|d| Tensor::from_f32(&[n], d).unwrap())
            })
            .collect()
    }

    fn f64s(t: &Tensor) -> Vec<f64> {
        t.to_f32_vec().unwrap().iter().map(|&x| x as f64).collect()
    }

    fn rel(got: &Tensor, want: &[f64]) -> f64 {
        let w: Vec<f32> = want.iter().map(|&x| x as f32).collect();
        crate::check::rel_err(&got.to_f32_vec().unwrap(), &w)
    }

    #[test]
    fn steps_match_naive_f64_with_and_without_clipping() {
        let mut rng = Rng::new(41);
        let lens = [1, 7, 33, 40000];
        let h = AdamW {
            lr: 0.05,
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-6,
            weight_decay: 0.1,
        };
        for max_norm in [None, Some(2.0f32)] {
            let mut groups = tensors(&mut rng, &lens);
            let mut want: Vec<[Vec<f64>; 4]> = groups
                .iter()
                .map(|[p, g, m, v]| [f64s(p), f64s(g), f64s(m), f64s(v)])
                .collect();
            for step in 1..=4u64 {
                for (gr, w) in groups.iter_mut().zip(want.iter_mut()) {
                    let n = gr[1].elem_count();
                    gr[1] = Tensor::from_f32(&[n], rng.normal_vec(n, 1.0)).unwrap();
                    w[1] = f64s(&gr[1]);
                }
                let norm = {
                    let grads: Vec<&Tensor> = groups.iter().map(|g| &g[1]).collect();
                    grad_norm(&grads).unwrap()
                };
                let exact_norm = want
                    .iter()
                    .map(|w| w[1].iter().map(|x| x * x).sum::<f64>())
                    .sum::<f64>()
                    .sqrt();
                let got_norm = norm.to_f32_vec().unwrap()[0] as f64;
                assert!((got_norm - exact_norm).abs() <= 1e-6 * exact_norm);
                let clip = max_norm.map_or(1.0, |m| (m as f64 / (exact_norm + 1e-6)).min(1.0));
                for w in want.iter_mut() {
                    let [p, g, m, v] = w;
                    naive_step(p, g, m, v, step, &h, clip);
                }
                let clip_arg = max_norm.map(|m| (m, &norm));
                adamw_step(&mut group_views(&mut groups), step, &h, clip_arg, false).unwrap();
            }
            for (gr, w) in groups.iter().zip(&want) {
                for k in [0, 2, 3] {
                    let e = rel(&gr[k], &w[k]);
                    assert!(
                        e < 1e-5,
                        "clip={max_norm:?} field {k} len {}: {e}",
                        w[k].len()
                    );
                }
                // Gradients are consumed, not modified, without zero_grads.
                assert!(rel(&gr[1], &w[1]) == 0.0);
            }
        }
    }

    #[test]
    fn clipping_uses_the_global_norm_and_zeroing_clears_grads() {
        // Gradients (3, 4) and (12): global norm 13.
        let mk = |g: Vec<f32>| {
            let n = g.len();
            [
                Tensor::from_f32(&[n], vec![0.0; n]).unwrap(),
                Tensor::from_f32(&[n], g).unwrap(),
                Tensor::from_f32(&[n], vec![0.0; n]).unwrap(),
                Tensor::from_f32(&[n], vec![0.0; n]).unwrap(),
            ]
        };
        let mut groups = vec![mk(vec![3.0, 4.0]), mk(vec![12.0])];
        let norm = {
            let grads: Vec<&Tensor> = groups.iter().map(|g| &g[1]).collect();
            grad_norm(&grads).unwrap()
        };
        assert_eq!(norm.to_f32_vec().unwrap(), vec![13.0]);
        let h = AdamW {
            weight_decay: 0.0,
            ..AdamW::default()
        };
        adamw_step(
            &mut group_views(&mut groups),
            1,
            &h,
            Some((1.3, &norm)),
            true,
        )
        .unwrap();
        // m after one step = (1 - beta1) * clip * g, clip = 1.3 / (13 + 1e-6).
        let clip = 1.3f32 / (13.0 + 1e-6);
        let m0 = groups[0][2].to_f32_vec().unwrap();
        let want = 0.1f32 * (3.0 * clip);
        assert!((m0[0] - want).abs() <= 1e-6 * want, "{} vs {want}", m0[0]);
        for g in &groups {
            assert!(g[1].to_f32_vec().unwrap().iter().all(|&x| x == 0.0));
        }
        // A max norm the gradients never reach changes nothing, bit for bit.
        let mut a = tensors(&mut Rng::new(5), &[17, 3]);
        let mut b = tensors(&mut Rng::new(5), &[17, 3]);
        let big = Tensor::from_f32(&[1], vec![1.0]).unwrap();
        adamw_step(&mut group_views(&mut a), 3, &h, Some((1e6, &big)), false).unwrap();
        adamw_step(&mut group_views(&mut b), 3, &h, None, false).unwrap();
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(x[0].to_f32_vec().unwrap(), y[0].to_f32_vec().unwrap());
        }
    }

    #[test]
    fn bad_inputs_are_typed_errors() {
        let mut rng = Rng::new(6);
        let mut groups = tensors(&mut rng, &[5, 6]);
        groups[1][2] = Tensor::from_f32(&[7], vec![0.0; 7]).unwrap();
        let h = AdamW::default();
        let e = adamw_step(&mut group_views(&mut groups), 1, &h, None, false)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("adamw") && e.contains("[7]") && e.contains("[6]"),
            "{e}"
        );
        let mut groups = tensors(&mut rng, &[5]);
        groups[0][3] = Tensor::from_f32_as(&[5], vec![0.0; 5], DType::BF16).unwrap();
        let e = adamw_step(&mut group_views(&mut groups), 1, &h, None, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("adamw") && e.contains("bf16"), "{e}");
        let mut groups = tensors(&mut rng, &[5]);
        let e = adamw_step(&mut group_views(&mut groups), 0, &h, None, false).unwrap_err();
        assert!(e.to_string().contains("step"), "{e}");
        let bad = AdamW { beta1: 1.0, ..h };
        let e = adamw_step(&mut group_views(&mut groups), 1, &bad, None, false).unwrap_err();
        assert!(e.to_string().contains("beta1"), "{e}");
        let two = Tensor::from_f32(&[2], vec![1.0, 1.0]).unwrap();
        let e = adamw_step(
            &mut group_views(&mut groups),
            1,
            &h,
            Some((1.0, &two)),
            false,
        )
        .unwrap_err();
        assert!(e.to_string().contains("norm"), "{e}");
        let e = grad_norm(&[&Tensor::from_i32(&[1], vec![1]).unwrap()]).unwrap_err();
        assert!(e.to_string().contains("grad_norm"), "{e}");
        assert_eq!(grad_norm(&[]).unwrap().to_f32_vec().unwrap(), vec![0.0]);
    }

    #[test]
    fn chunk_table_covers_every_element_once() {
        let mut table = Vec::new();
        push_chunks(&mut table, [1000, 2000, 0, 4000], 2 * CHUNK + 3);
        push_chunks(&mut table, [8000, 0, 0, 0], 0);
        assert_eq!(table.len(), 3 * WORDS);
        let lens: Vec<u64> = table.chunks(WORDS).map(|c| c[4]).collect();
        assert_eq!(lens, vec![CHUNK as u64, CHUNK as u64, 3]);
        let second = &table[WORDS..2 * WORDS];
        let off = (CHUNK * 4) as u64;
        assert_eq!(second[..4], [1000 + off, 2000 + off, 0, 4000 + off]);
    }

    /// Casting into places of shared buffers stacks the tensors at their offsets and leaves
    /// the rest; a part that does not fit is a named error.
    #[test]
    fn cast_multi_at_stacks_into_offsets() {
        let mut rng = Rng::new(6);
        let src: Vec<Tensor> = [[2, 5], [3, 5], [1, 4]]
            .iter()
            .map(|s| Tensor::from_f32(s, rng.normal_vec(s[0] * s[1], 0.3)).unwrap())
            .collect();
        let refs: Vec<&Tensor> = src.iter().collect();
        let mut dst = vec![
            Tensor::from_f32_as(&[5, 5], vec![7.0; 25], DType::BF16).unwrap(),
            Tensor::from_f32_as(&[6], vec![7.0; 6], DType::BF16).unwrap(),
        ];
        cast_multi_to_bf16_at(&refs, &mut dst, &[(0, 0), (0, 10), (1, 1)]).unwrap();
        let rounded = |t: &Tensor| cast(t, DType::BF16).unwrap().to_f32_vec().unwrap();
        let first = dst[0].to_f32_vec().unwrap();
        assert_eq!(first[..10], rounded(&src[0])[..]);
        assert_eq!(first[10..25], rounded(&src[1])[..]);
        let second = dst[1].to_f32_vec().unwrap();
        assert_eq!(second[0], 7.0);
        assert_eq!(second[1..5], rounded(&src[2])[..]);
        assert_eq!(second[5], 7.0);
        let err = cast_multi_to_bf16_at(&refs[..1], &mut dst, &[(1, 0)])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("cast_multi") && err.contains("[2, 5]"),
            "{err}"
        );
    }

    /// On the CPU the multi-tensor cast is the per-tensor cast; bad pairs are named errors.
    #[test]
    fn cast_multi_matches_cast_and_checks_pairs() {
        let mut rng = Rng::new(5);
        let src: Vec<Tensor> = [[3, 7], [1, 16385], [16, 40]]
            .iter()
            .map(|s| Tensor::from_f32(s, rng.normal_vec(s[0] * s[1], 0.3)).unwrap())
            .collect();
        let refs: Vec<&Tensor> = src.iter().collect();
        let mut dst: Vec<Tensor> = src
            .iter()
            .map(|s| Tensor::zeros(s.shape(), DType::BF16, &Device::Cpu).unwrap())
            .collect();
        cast_multi_to_bf16(&refs, &mut dst).unwrap();
        for (s, d) in src.iter().zip(&dst) {
            assert_eq!(d.dtype(), DType::BF16);
            assert_eq!(
                d.to_f32_vec().unwrap(),
                cast(s, DType::BF16).unwrap().to_f32_vec().unwrap()
            );
        }
        let err = cast_multi_to_bf16(&refs[..2], &mut dst)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("cast_multi") && err.contains("2 sources and 3"),
            "{err}"
        );
        let mut wrong = vec![Tensor::zeros(&[3, 8], DType::BF16, &Device::Cpu).unwrap()];
        let err = cast_multi_to_bf16(&refs[..1], &mut wrong)
            .unwrap_err()
            .to_string();
        assert!(err.contains("[3, 7]") && err.contains("[3, 8]"), "{err}");
    }
}
