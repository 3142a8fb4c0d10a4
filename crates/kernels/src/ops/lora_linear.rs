//! A linear layer with a LoRA adapter, `y = x W^T (+ bias) + s (x_d A^T) B^T`, forward and
//! backward, and the weight merge `W += s B A` (and unmerge) for inference.
//!
//! Shapes follow PEFT: `W [out, in]` (frozen, x's dtype), `A [r, in]`, `B [out, r]`, `x [.., in]`.
//! `x_d` is x or a dropout of x the caller made. Every product is a GEMM (cuBLAS on the GPU,
//! bf16 or f32 in, fp32 accumulate) and `W + s B A` is never formed: the forward saves only
//! `xa = x_d A^T [n, r]`. The rank-r term is written first (beta = 0, a write-only GEMM) and
//! the compute-bound base GEMM then adds onto it (beta = 1), which reads C nearly for free;
//! the other order would make the rank-r GEMM a read-modify-write of the whole output,
//! pure memory traffic. The backward's input gradient is ordered the same way, and dA, dB
//! accumulate into the caller's buffers with beta = 1 instead of `[n, out]` temporaries.
//! No gradient is computed for W.
//!
//! A and B are usually fp32 master weights while x is bf16: they are cast to x's dtype for
//! the GEMMs (r x (in + out) elements, negligible), and the gradients `dA`, `dB` come out of
//! bf16-input GEMMs with fp32 outputs, accumulated into the caller's fp32 buffers so that
//! micro-batches add up without a separate add.
//!
//! With [`LoraLinear::split`] (bf16 x; what the engine uses by default), the four rank-r
//! products are computed to fp32 accuracy, as PEFT's fp32 adapter path over a bf16 base is,
//! through bf16 hi/lo splits of A, B and the rank-r activations ([`crate::ops::lora_split`]);
//! the saved `xa` is then the `[.., 3r]` split. Without a split (bf16 x), `xa` and
//! `dxa = s dy B` are bf16 intermediates.
//!
//! Rounding (bf16 x): `y` and `dx` are stored in bf16, each GEMM rounding once, in the order
//! [`rank_r_first`] picks: for an output wider than the reduction (gate/up forward, down's
//! input gradient) the rank-r term is written first and the base GEMM adds onto it,
//! `y = bf16(x W^T + bf16(bias + s xa B^T))`; otherwise the base product first,
//! `y = bf16(bf16(x W^T + bias) + s xa B^T)`, and the same for `dx` with `dy W` and `dxa A`.
//! The CPU reference is the same composition through the CPU GEMM, so it rounds at exactly
//! the same places.

use std::sync::Arc;

use crate::bench::{measure, BenchConfig, BenchRow, KernelBench};
use crate::check::{compare, random_pair, random_pair_par, CheckLine, GpuCheck};
use crate::cpu::par_rows;
use crate::cuda::{Gpu, KernelSource};
use crate::error::{KernelError, Result};
use crate::ops::eager::{self, BinaryOp, Broadcast, UnaryOp};
use crate::ops::elementwise::cast;
use crate::ops::lora_split::{
    split_adapter_grads, split_dxa, split_input_grad_into, split_update_into, split_xa, LoraSplit,
};
use crate::ops::matmul::{matmul, matmul_into};
use crate::rng::Rng;
use crate::{launch, DType, Device, Tensor};

use super::{common_gpu, expect_dtype, expect_shape};

pub const SOURCE: KernelSource = KernelSource {
    name: "lora_linear",
    src: include_str!("../../kernels/lora_linear.cu"),
};

const OP: &str = "lora_linear";

/// One adapted projection. `w` and `bias` have x's dtype; `a` and `b` are f32 or bf16.
pub struct LoraLinear<'a> {
    pub w: &'a Tensor,
    pub bias: Option<&'a Tensor>,
    pub a: &'a Tensor,
    pub b: &'a Tensor,
    /// `alpha / r` (or `alpha / sqrt(r)` for rsLoRA), as the caller chooses.
    pub scaling: f32,
    /// A and B as bf16 hi/lo splits: with bf16 x the fused ops then compute the adapter
    /// path fp32-accurately and save `xa` as its `[.., 3r]` split. Ignored for f32 x and by
    /// the unfused compositions.
    pub split: Option<&'a LoraSplit>,
}

impl<'a> LoraLinear<'a> {
    /// The split to use for input dtype `dt`, if any.
    fn split_for(&self, dt: DType) -> Option<&'a LoraSplit> {
        self.split.filter(|_| dt == DType::BF16)
    }
}

pub struct LoraForward {
    /// `[.., out]`, x's dtype.
    pub y: Tensor,
    /// `x_d A^T`, `[.., r]`, x's dtype (`[.., 3r]`, its split, with [`LoraLinear::split`]):
    /// all the backward needs besides x_d.
    pub xa: Tensor,
}

/// Sizes of one call: `n` rows of x (leading dims folded), `inp -> out`, rank `r`.
#[derive(Clone, Copy, Debug)]
struct Dims {
    inp: usize,
    out: usize,
    r: usize,
}

fn check_layer(layer: &LoraLinear, x: &Tensor) -> Result<Dims> {
    expect_dtype(OP, "x", x, &[DType::F32, DType::BF16])?;
    expect_dtype(OP, "w", layer.w, &[x.dtype()])?;
    expect_dtype(OP, "a", layer.a, &[DType::F32, DType::BF16])?;
    expect_dtype(OP, "b", layer.b, &[DType::F32, DType::BF16])?;
    if layer.w.shape().len() != 2 {
        return Err(KernelError::shape(
            OP,
            format!("w {:?} is not [out, in]", layer.w.shape()),
        ));
    }
    let (out, inp) = (layer.w.shape()[0], layer.w.shape()[1]);
    let r = layer.a.shape().first().copied().unwrap_or(0);
    if out == 0 || inp == 0 || r == 0 {
        return Err(KernelError::shape(
            OP,
            format!(
                "empty layer: w {:?}, a {:?}",
                layer.w.shape(),
                layer.a.shape()
            ),
        ));
    }
    if x.shape().last() != Some(&inp) {
        return Err(KernelError::shape(
            OP,
            format!("x {:?} does not end in w's in dim {inp}", x.shape()),
        ));
    }
    expect_shape(OP, "a", layer.a, &[r, inp])?;
    expect_shape(OP, "b", layer.b, &[out, r])?;
    if let Some(sp) = layer.split {
        expect_dtype(OP, "a3", &sp.a3, &[DType::BF16])?;
        expect_shape(OP, "a3", &sp.a3, &[3 * r, inp])?;
        expect_shape(OP, "b3", &sp.b3, &[out, 3 * r])?;
    }
    if let Some(bias) = layer.bias {
        expect_dtype(OP, "bias", bias, &[x.dtype()])?;
        expect_shape(OP, "bias", bias, &[out])?;
    }
    if !layer.scaling.is_finite() {
        return Err(KernelError::invalid(
            OP,
            format!("scaling must be finite, got {}", layer.scaling),
        ));
    }
    Ok(Dims { inp, out, r })
}

/// x's shape with the last dim replaced.
pub(crate) fn with_last(x: &Tensor, last: usize) -> Vec<usize> {
    let mut s = x.shape().to_vec();
    *s.last_mut().expect("x has a feature dim") = last;
    s
}

/// An output buffer on the inputs' device: uninitialised on the GPU (every element is
/// written by a GEMM with beta = 0), zeros on the CPU.
pub(crate) fn output(gpu: &Option<Arc<Gpu>>, shape: &[usize], dtype: DType) -> Result<Tensor> {
    match gpu {
        Some(g) => Tensor::uninit_cuda(g, shape, dtype),
        None => Tensor::zeros(shape, dtype, &Device::Cpu),
    }
}

/// `t` itself when it already has `dtype`, else a rounded copy held in `slot`.
pub(crate) fn as_dtype<'t>(
    t: &'t Tensor,
    dtype: DType,
    slot: &'t mut Option<Tensor>,
) -> Result<&'t Tensor> {
    if t.dtype() == dtype {
        return Ok(t);
    }
    Ok(slot.insert(cast(t, dtype)?))
}

/// `y[r, :] = bias` for every row.
pub(crate) fn rows_of(gpu: &Option<Arc<Gpu>>, bias: &Tensor, shape: &[usize]) -> Result<Tensor> {
    let cols = bias.elem_count();
    let rows = shape.iter().product::<usize>() / cols;
    match gpu {
        None => {
            let b = bias.cpu_f32();
            let mut v = vec![0.0f32; rows * cols];
            par_rows(&mut v, cols, |_, row| row.copy_from_slice(&b));
            Tensor::from_f32_as(shape, v, bias.dtype())
        }
        Some(gpu) => {
            let y = Tensor::uninit_cuda(gpu, shape, bias.dtype())?;
            let n = rows * cols;
            let f = gpu.function(
                &SOURCE,
                &format!("lora_fill_rows_{}", bias.dtype().kernel_suffix()),
            )?;
            let grid = n.div_ceil(256).clamp(1, gpu.sm_count() * 16) as u32;
            launch!(gpu, f, (grid, 1, 1), (256, 1, 1), 0;
                y.dptr(), bias.dptr(), rows as i64, cols as i32)?;
            Ok(y)
        }
    }
}

/// The forward's inputs checked: the layer's sizes and the GPU (None: the CPU).
fn check_forward(
    layer: &LoraLinear,
    x: &Tensor,
    x_lora: Option<&Tensor>,
) -> Result<(Dims, Option<Arc<Gpu>>)> {
    let d = check_layer(layer, x)?;
    if let Some(xl) = x_lora {
        expect_dtype(OP, "x_lora", xl, &[x.dtype()])?;
        expect_shape(OP, "x_lora", xl, x.shape())?;
    }
    let mut tensors = vec![("x", x), ("w", layer.w), ("a", layer.a), ("b", layer.b)];
    tensors.extend(layer.bias.map(|t| ("bias", t)));
    tensors.extend(x_lora.map(|t| ("x_lora", t)));
    Ok((d, common_gpu(OP, &tensors)?))
}

/// `y = x W^T (+ bias) + s (x_d A^T) B^T` with `x_d = x_lora.unwrap_or(x)`; saves `x_d A^T`.
pub fn lora_linear_forward(
    layer: &LoraLinear,
    x: &Tensor,
    x_lora: Option<&Tensor>,
) -> Result<LoraForward> {
    let (d, gpu) = check_forward(layer, x, x_lora)?;
    let dt = x.dtype();
    let y_shape = with_last(x, d.out);
    // The output starts as the bias rows (added onto, beta 1) or uninitialised (beta 0).
    let (mut y, beta) = match layer.bias {
        Some(bias) => (rows_of(&gpu, bias, &y_shape)?, 1.0),
        None => (output(&gpu, &y_shape, dt)?, 0.0),
    };
    let lora_first = rank_r_first(d.out, d.inp);
    let base = |y: &mut Tensor, beta: f32| matmul_into(x, false, layer.w, true, y, 1.0, beta);
    if let Some(sp) = layer.split_for(dt) {
        let xa = split_xa(x_lora.unwrap_or(x), sp)?;
        let update = |y: &mut Tensor, beta: f32| split_update_into(&xa, sp, y, layer.scaling, beta);
        if lora_first {
            update(&mut y, beta)?;
            base(&mut y, 1.0)?;
        } else {
            base(&mut y, beta)?;
            update(&mut y, 1.0)?;
        }
        return Ok(LoraForward { y, xa });
    }
    let (mut a_slot, mut b_slot) = (None, None);
    let a = as_dtype(layer.a, dt, &mut a_slot)?;
    let b = as_dtype(layer.b, dt, &mut b_slot)?;
    let mut xa = output(&gpu, &with_last(x, d.r), dt)?;
    matmul_into(x_lora.unwrap_or(x), false, a, true, &mut xa, 1.0, 0.0)?;
    let update =
        |y: &mut Tensor, beta: f32| matmul_into(&xa, false, b, true, y, layer.scaling, beta);
    if lora_first {
        update(&mut y, beta)?;
        base(&mut y, 1.0)?;
    } else {
        base(&mut y, beta)?;
        update(&mut y, 1.0)?;
    }
    Ok(LoraForward { y, xa })
}

/// From `dy [.., out]`: `dB += s dy^T xa`, `dA += (s dy B)^T x_d` (both f32, accumulated),
/// and, when `need_dx`, returns `dx = dy W + (s dy B) A`.
///
/// `x` is the tensor the adapter saw in the forward (`x_lora` when one was given): it is
/// read only for `dA`. The returned `dx` treats the adapter's input as x itself; under
/// dropout the adapter's share `(s dy B) A` would need the dropout mask, which this op does
/// not know, so callers with dropout take `dx` from elsewhere.
pub fn lora_linear_backward(
    layer: &LoraLinear,
    dy: &Tensor,
    x: &Tensor,
    xa: &Tensor,
    da: &mut Tensor,
    db: &mut Tensor,
    need_dx: bool,
) -> Result<Option<Tensor>> {
    let (dxa, gpu) = backward_adapter(layer, dy, x, xa, da, db)?;
    if !need_dx {
        return Ok(None);
    }
    let mut dx = output(&gpu, x.shape(), x.dtype())?;
    input_grad_into(layer, dy, &dxa, &mut dx, 0.0)?;
    Ok(Some(dx))
}

/// `dB += s dy^T xa`, `dA += (s dy B)^T x`; returns `s dy B` for the input gradient.
fn backward_adapter(
    layer: &LoraLinear,
    dy: &Tensor,
    x: &Tensor,
    xa: &Tensor,
    da: &mut Tensor,
    db: &mut Tensor,
) -> Result<(Tensor, Option<Arc<Gpu>>)> {
    let (d, gpu) = check_backward(layer, dy, x, xa, da, db)?;
    let dt = x.dtype();
    let s = layer.scaling;
    if let Some(sp) = layer.split_for(dt) {
        return Ok((split_adapter_grads(dy, x, xa, sp, da, db, s)?, gpu));
    }
    matmul_into(dy, true, xa, false, db, s, 1.0)?;
    let mut dxa = output(&gpu, &with_last(x, d.r), dt)?;
    {
        let mut b_slot = None;
        let b = as_dtype(layer.b, dt, &mut b_slot)?;
        matmul_into(dy, false, b, false, &mut dxa, s, 0.0)?;
    }
    matmul_into(&dxa, true, x, false, da, 1.0, 1.0)?;
    Ok((dxa, gpu))
}

/// `dx = dy W + dxa A + beta dx`: two GEMMs in the order [`rank_r_first`] picks, the second
/// accumulating onto the first (`dxa` is the `[.., 3r]` split with [`LoraLinear::split`]).
fn input_grad_into(
    layer: &LoraLinear,
    dy: &Tensor,
    dxa: &Tensor,
    dx: &mut Tensor,
    beta: f32,
) -> Result<()> {
    let (out, inp) = layer.w.rows_cols();
    let base = |dx: &mut Tensor, beta: f32| matmul_into(dy, false, layer.w, false, dx, 1.0, beta);
    let mut a_slot = None;
    let mut update = |dx: &mut Tensor, beta: f32| -> Result<()> {
        match layer.split_for(dy.dtype()) {
            Some(sp) => split_input_grad_into(dxa, sp, dx, beta),
            None => {
                let a = as_dtype(layer.a, dy.dtype(), &mut a_slot)?;
                matmul_into(dxa, false, a, false, dx, 1.0, beta)
            }
        }
    };
    if rank_r_first(inp, out) {
        update(dx, beta)?;
        base(dx, 1.0)
    } else {
        base(dx, beta)?;
        update(dx, 1.0)
    }
}

/// Whether to write a rank-r update of an `[n, width]` output before the base GEMM (whose
/// reduction is `k` long) and let the base GEMM add onto it with beta = 1, instead of the
/// other way round. Measured on the H100 at the Llama-3-8B shapes (4096 tokens, r = 16;
/// bench/results/2026-11-23-h100-probes): the rank-r GEMM added onto a 14336-wide output
/// costs twice what it costs written (148.9 against 69.5 us) while the base GEMM pays
/// 10-12 us for its beta, so writing first saves ~67 us; at 4096-wide outputs the rank-r
/// GEMM costs the same either way (32-39 us, latency-bound) and the base GEMM's beta costs
/// 4-50 us (50 for down's forward, K = 14336). So: first exactly when the output is wider
/// than the reduction.
pub(crate) fn rank_r_first(width: usize, k: usize) -> bool {
    width > k
}

/// [`lora_linear_backward`] adding its input gradient onto `dx_acc` (`dx_acc += dy W +
/// (s dy B) A`) through the GEMMs' beta instead of a new tensor and an add: for inputs
/// shared by several projections (q, k, v; gate, up). The sum is rounded once per GEMM.
/// Here the rank-r GEMM accumulates too (a read-modify-write of dx_acc);
/// [`crate::ops::lora_group`] batches such projections so that it is written once instead.
pub fn lora_linear_backward_accumulate(
    layer: &LoraLinear,
    dy: &Tensor,
    x: &Tensor,
    xa: &Tensor,
    da: &mut Tensor,
    db: &mut Tensor,
    dx_acc: &mut Tensor,
) -> Result<()> {
    expect_dtype(OP, "dx_acc", dx_acc, &[x.dtype()])?;
    expect_shape(OP, "dx_acc", dx_acc, x.shape())?;
    common_gpu(OP, &[("x", x), ("dx_acc", dx_acc)])?;
    let (dxa, _) = backward_adapter(layer, dy, x, xa, da, db)?;
    input_grad_into(layer, dy, &dxa, dx_acc, 1.0)
}

/// `x A^T`, the adapter's rank-r activation that the backward reads (for dB): what
/// [`lora_linear_forward`] saves, without the base GEMM, for a recomputation that needs
/// no output.
pub fn lora_linear_xa(layer: &LoraLinear, x: &Tensor) -> Result<Tensor> {
    let d = check_layer(layer, x)?;
    let gpu = common_gpu(OP, &[("x", x), ("a", layer.a)])?;
    let dt = x.dtype();
    if let Some(sp) = layer.split_for(dt) {
        return split_xa(x, sp);
    }
    let mut a_slot = None;
    let a = as_dtype(layer.a, dt, &mut a_slot)?;
    let mut xa = output(&gpu, &with_last(x, d.r), dt)?;
    matmul_into(x, false, a, true, &mut xa, 1.0, 0.0)?;
    Ok(xa)
}

/// `dx = dy W + (s dy B) A` alone: for callers that took dA and dB with
/// `need_dx = false` and freed the forward input before allocating dx (it recomputes the
/// rank-r `s dy B`, a GEMM of `2 tokens out r` FLOPs, to hold nothing in between).
pub fn lora_linear_backward_dx(layer: &LoraLinear, dy: &Tensor) -> Result<Tensor> {
    let (r, inp, gpu) = check_backward_dx(layer, dy)?;
    let dt = dy.dtype();
    if let Some(sp) = layer.split_for(dt) {
        let d3 = split_dxa(dy, sp, layer.scaling)?;
        let mut dx = output(&gpu, &with_last(dy, inp), dt)?;
        input_grad_into(layer, dy, &d3, &mut dx, 0.0)?;
        return Ok(dx);
    }
    let mut b_slot = None;
    let b = as_dtype(layer.b, dt, &mut b_slot)?;
    let lead = &dy.shape()[..dy.shape().len() - 1];
    let mut dxa = output(&gpu, &[lead, &[r]].concat(), dt)?;
    matmul_into(dy, false, b, false, &mut dxa, layer.scaling, 0.0)?;
    let mut dx = output(&gpu, &[lead, &[inp]].concat(), dt)?;
    input_grad_into(layer, dy, &dxa, &mut dx, 0.0)?;
    Ok(dx)
}

/// The rank-r input-gradient factor `s dy B` (`[.., r]`, or its `[.., 3r]` split with
/// [`LoraLinear::split`]) that [`lora_linear_backward_adapter`] leaves for
/// [`lora_linear_finish_dx`]: a few hundred KB, so a caller can free the forward input
/// between the two without recomputing it.
pub struct PendingDx {
    dxa: Tensor,
}

/// [`lora_linear_backward`] without `dx`: `dB += s dy^T xa`, `dA += (s dy B)^T x`, and
/// the factor [`lora_linear_finish_dx`] needs for `dx`.
pub fn lora_linear_backward_adapter(
    layer: &LoraLinear,
    dy: &Tensor,
    x: &Tensor,
    xa: &Tensor,
    da: &mut Tensor,
    db: &mut Tensor,
) -> Result<PendingDx> {
    let (dxa, _) = backward_adapter(layer, dy, x, xa, da, db)?;
    Ok(PendingDx { dxa })
}

/// `dx = dy W + (s dy B) A` from [`lora_linear_backward_adapter`]'s factor: what
/// [`lora_linear_backward_dx`] computes, without forming `s dy B` again.
pub fn lora_linear_finish_dx(layer: &LoraLinear, dy: &Tensor, p: PendingDx) -> Result<Tensor> {
    let (_, inp, gpu) = check_backward_dx(layer, dy)?;
    let want = with_last(dy, p.dxa.shape().last().copied().unwrap_or(0));
    if p.dxa.shape() != want.as_slice() {
        return Err(KernelError::shape(
            OP,
            format!(
                "pending dx factor {:?} does not match dy {:?}",
                p.dxa.shape(),
                dy.shape()
            ),
        ));
    }
    let mut dx = output(&gpu, &with_last(dy, inp), dy.dtype())?;
    input_grad_into(layer, dy, &p.dxa, &mut dx, 0.0)?;
    Ok(dx)
}

/// [`lora_linear_backward`]'s inputs checked: the layer's sizes and the GPU (None: the CPU).
fn check_backward(
    layer: &LoraLinear,
    dy: &Tensor,
    x: &Tensor,
    xa: &Tensor,
    da: &Tensor,
    db: &Tensor,
) -> Result<(Dims, Option<Arc<Gpu>>)> {
    let d = check_layer(layer, x)?;
    let dt = x.dtype();
    expect_dtype(OP, "dy", dy, &[dt])?;
    expect_shape(OP, "dy", dy, &with_last(x, d.out))?;
    expect_dtype(OP, "xa", xa, &[dt])?;
    let xa_cols = if layer.split_for(dt).is_some() {
        3 * d.r
    } else {
        d.r
    };
    expect_shape(OP, "xa", xa, &with_last(x, xa_cols))?;
    expect_dtype(OP, "da", da, &[DType::F32])?;
    expect_shape(OP, "da", da, &[d.r, d.inp])?;
    expect_dtype(OP, "db", db, &[DType::F32])?;
    expect_shape(OP, "db", db, &[d.out, d.r])?;
    let gpu = common_gpu(
        OP,
        &[
            ("dy", dy),
            ("x", x),
            ("xa", xa),
            ("w", layer.w),
            ("a", layer.a),
            ("b", layer.b),
            ("da", da),
            ("db", db),
        ],
    )?;
    Ok((d, gpu))
}

/// [`lora_linear_backward_dx`]'s inputs checked: rank, in dim and the GPU.
fn check_backward_dx(layer: &LoraLinear, dy: &Tensor) -> Result<(usize, usize, Option<Arc<Gpu>>)> {
    let (out, inp) = layer.w.rows_cols();
    let dt = dy.dtype();
    expect_dtype(OP, "dy", dy, &[DType::F32, DType::BF16])?;
    expect_dtype(OP, "w", layer.w, &[dt])?;
    let (_, cols) = dy.rows_cols();
    if cols != out || layer.a.shape() != [layer.b.shape()[1], inp] {
        return Err(KernelError::shape(
            OP,
            format!(
                "dy {:?}, w {:?}, a {:?}, b {:?}",
                dy.shape(),
                layer.w.shape(),
                layer.a.shape(),
                layer.b.shape()
            ),
        ));
    }
    let r = layer.a.shape()[0];
    let gpu = common_gpu(
        OP,
        &[("dy", dy), ("w", layer.w), ("a", layer.a), ("b", layer.b)],
    )?;
    Ok((r, inp, gpu))
}

// ---- The unfused compositions: what autograd runs for PEFT's eager `Linear` with a LoRA
// adapter. Each product is its own GEMM writing a fresh tensor; the scaling, the bias, the
// sum of the two branches and the accumulation of dA and dB onto the caller's buffers are
// separate elementwise kernels (the fused path folds all of them into GEMM alpha/beta
// epilogues). On the CPU each runs the reference (the same GEMMs).

/// [`lora_linear_forward`], unfused: `x W^T`, `+ bias`, `xa = x_d A^T`, `xa B^T`, `* s`,
/// `+`. Same outputs.
pub fn lora_linear_forward_unfused(
    layer: &LoraLinear,
    x: &Tensor,
    x_lora: Option<&Tensor>,
) -> Result<LoraForward> {
    let (d, gpu) = check_forward(layer, x, x_lora)?;
    if gpu.is_none() {
        return lora_linear_forward(layer, x, x_lora);
    }
    let dt = x.dtype();
    let (mut a_slot, mut b_slot) = (None, None);
    let a = as_dtype(layer.a, dt, &mut a_slot)?;
    let b = as_dtype(layer.b, dt, &mut b_slot)?;
    let mut base = matmul(x, false, layer.w, true, dt)?;
    if let Some(bias) = layer.bias {
        base = eager::binary(&base, bias, Broadcast::Row, BinaryOp::Add, dt)?;
    }
    let xa = matmul(x_lora.unwrap_or(x), false, a, true, dt)?;
    let u = matmul(&xa, false, b, true, dt)?;
    let us = eager::unary(&u, UnaryOp::Scale, layer.scaling, dt)?;
    drop(u);
    let y = eager::binary(&base, &us, Broadcast::None, BinaryOp::Add, dt)?;
    Ok(LoraForward {
        y: y.reshape(&with_last(x, d.out))?,
        xa: xa.reshape(&with_last(x, d.r))?,
    })
}

/// [`lora_linear_backward`], unfused: `du = s dy`, `dB += du^T xa` and `dA += (du B)^T x_d`
/// (fresh f32 products, then adds that replace `da` and `db`), and when `need_dx`,
/// `dx = dy W + (du B) A` as two GEMMs and an add. Same outputs.
pub fn lora_linear_backward_unfused(
    layer: &LoraLinear,
    dy: &Tensor,
    x: &Tensor,
    xa: &Tensor,
    da: &mut Tensor,
    db: &mut Tensor,
    need_dx: bool,
) -> Result<Option<Tensor>> {
    if check_backward(layer, dy, x, xa, da, db)?.1.is_none() {
        return lora_linear_backward(layer, dy, x, xa, da, db, need_dx);
    }
    let dt = x.dtype();
    let f = DType::F32;
    let du = eager::unary(dy, UnaryOp::Scale, layer.scaling, dt)?;
    let db_new = matmul(&du, true, xa, false, f)?;
    *db = eager::binary(db, &db_new, Broadcast::None, BinaryOp::Add, f)?;
    drop(db_new);
    let dxa = {
        let mut b_slot = None;
        let b = as_dtype(layer.b, dt, &mut b_slot)?;
        matmul(&du, false, b, false, dt)?
    };
    drop(du);
    let da_new = matmul(&dxa, true, x, false, f)?;
    *da = eager::binary(da, &da_new, Broadcast::None, BinaryOp::Add, f)?;
    drop(da_new);
    if !need_dx {
        return Ok(None);
    }
    Ok(Some(unfused_dx(layer, dy, &dxa)?.reshape(x.shape())?))
}

/// [`lora_linear_backward_dx`], unfused: `du = s dy`, `dxa = du B`, then
/// `dx = dy W + dxa A` as two GEMMs and an add. Same output.
pub fn lora_linear_backward_dx_unfused(layer: &LoraLinear, dy: &Tensor) -> Result<Tensor> {
    let (_, inp, gpu) = check_backward_dx(layer, dy)?;
    if gpu.is_none() {
        return lora_linear_backward_dx(layer, dy);
    }
    let dt = dy.dtype();
    let du = eager::unary(dy, UnaryOp::Scale, layer.scaling, dt)?;
    let dxa = {
        let mut b_slot = None;
        let b = as_dtype(layer.b, dt, &mut b_slot)?;
        matmul(&du, false, b, false, dt)?
    };
    drop(du);
    let lead = &dy.shape()[..dy.shape().len() - 1];
    unfused_dx(layer, dy, &dxa)?.reshape(&[lead, &[inp]].concat())
}

/// `dy W + dxa A`: two GEMMs into fresh tensors and an add.
fn unfused_dx(layer: &LoraLinear, dy: &Tensor, dxa: &Tensor) -> Result<Tensor> {
    let dt = dy.dtype();
    let mut a_slot = None;
    let a = as_dtype(layer.a, dt, &mut a_slot)?;
    let dx0 = matmul(dy, false, layer.w, false, dt)?;
    let dx1 = matmul(dxa, false, a, false, dt)?;
    eager::binary(&dx0, &dx1, Broadcast::None, BinaryOp::Add, dt)
}

/// `W += s B A` in place: the rank-r product in fp32, W rounded once to its dtype. With
/// `safe`, nothing is written if any merged value would be non-finite (an error instead).
pub fn lora_merge(w: &mut Tensor, a: &Tensor, b: &Tensor, scaling: f32, safe: bool) -> Result<()> {
    merge_scaled("lora_merge", w, a, b, scaling, safe)
}

/// `W -= s B A`, the inverse of [`lora_merge`] up to W's rounding (a bf16 W merged and
/// unmerged can differ from the original by an ulp).
pub fn lora_unmerge(
    w: &mut Tensor,
    a: &Tensor,
    b: &Tensor,
    scaling: f32,
    safe: bool,
) -> Result<()> {
    merge_scaled("lora_unmerge", w, a, b, -scaling, safe)
}

fn merge_scaled(
    op: &'static str,
    w: &mut Tensor,
    a: &Tensor,
    b: &Tensor,
    s: f32,
    safe: bool,
) -> Result<()> {
    expect_dtype(op, "w", w, &[DType::F32, DType::BF16])?;
    expect_dtype(op, "a", a, &[DType::F32, DType::BF16])?;
    expect_dtype(op, "b", b, &[DType::F32, DType::BF16])?;
    if w.shape().len() != 2 || a.shape().len() != 2 {
        return Err(KernelError::shape(
            op,
            format!("w {:?} and a {:?} must be 2-D", w.shape(), a.shape()),
        ));
    }
    let (out, inp, r) = (w.shape()[0], w.shape()[1], a.shape()[0]);
    expect_shape(op, "a", a, &[r, inp])?;
    expect_shape(op, "b", b, &[out, r])?;
    if !s.is_finite() {
        return Err(KernelError::invalid(
            op,
            format!("scaling must be finite, got {s}"),
        ));
    }
    if out == 0 || inp == 0 || r == 0 {
        return Ok(());
    }
    let refuse = || {
        KernelError::invalid(
            op,
            format!(
                "W {:?} + s B A has non-finite values; W left unchanged",
                w.shape()
            ),
        )
    };
    match common_gpu(op, &[("w", w), ("a", a), ("b", b)])? {
        None => {
            let merged = cpu_merged(w, a, b, s, inp, r);
            let merged = Tensor::from_f32_as(w.shape(), merged, w.dtype())?;
            if safe && merged.cpu_f32().iter().any(|v| !v.is_finite()) {
                return Err(refuse());
            }
            w.cpu_store_f32(&merged.cpu_f32());
            Ok(())
        }
        Some(gpu) => {
            let tiles_y = out.div_ceil(32);
            if tiles_y > 65535 || inp > i32::MAX as usize || out > i32::MAX as usize {
                return Err(KernelError::invalid(
                    op,
                    format!("w {:?} is too large for the merge kernel's grid", w.shape()),
                ));
            }
            let name = format!(
                "lora_merge_{}_{}_{}",
                w.dtype().kernel_suffix(),
                a.dtype().kernel_suffix(),
                b.dtype().kernel_suffix()
            );
            let f = gpu.function(&SOURCE, &name)?;
            let grid = (inp.div_ceil(128) as u32, tiles_y as u32, 1);
            let run = |apply: i32, flag: u64| {
                launch!(gpu, f, grid, (256, 1, 1), 0;
                    w.dptr(), a.dptr(), b.dptr(), out as i32, inp as i32, r as i32, s, apply, flag)
            };
            if safe {
                // A dry pass that only looks for non-finite results, then the real one: the
                // rank-r product is cheap next to moving W, and W stays untouched on refusal.
                let flag = Tensor::zeros(&[1], DType::I32, &Device::Cuda(gpu.clone()))?;
                run(0, flag.dptr())?;
                if flag.to_i32_vec()?[0] != 0 {
                    return Err(refuse());
                }
            }
            run(1, 0)
        }
    }
}

/// `W + s B A` as f32 values: per row of W, `sum_k B[i, k] A[k, :]` accumulated in f32 over
/// k in order.
fn cpu_merged(w: &Tensor, a: &Tensor, b: &Tensor, s: f32, inp: usize, r: usize) -> Vec<f32> {
    let (wv, av, bv) = (w.cpu_f32(), a.cpu_f32(), b.cpu_f32());
    let mut merged = vec![0.0f32; wv.len()];
    par_rows(&mut merged, inp, |i, row| {
        for (k, &bik) in bv[i * r..(i + 1) * r].iter().enumerate() {
            for (o, &akj) in row.iter_mut().zip(&av[k * inp..(k + 1) * inp]) {
                *o += bik * akj;
            }
        }
        for (o, &wij) in row.iter_mut().zip(&wv[i * inp..(i + 1) * inp]) {
            *o = wij + s * *o;
        }
    });
    merged
}

pub const CHECK: GpuCheck = GpuCheck {
    op: OP,
    run: gpu_check,
};

/// Random LoRA layer inputs on the CPU and their GPU copies, scaled so y and the gradients
/// are O(1).
struct Case {
    n: usize,
    inp: usize,
    out: usize,
    r: usize,
    dt: DType,
    ab: DType,
    bias: bool,
    x_lora: bool,
    what: &'static str,
}

fn check_case(gpu: &Arc<Gpu>, rng: &mut Rng, c: &Case) -> Result<Vec<CheckLine>> {
    let (n, inp, out, r, dt) = (c.n, c.inp, c.out, c.r, c.dt);
    let (x, gx) = random_pair_par(gpu, rng, &[n, inp], dt, 1.0)?;
    let (w, gw) = random_pair_par(gpu, rng, &[out, inp], dt, 1.0 / (inp as f32).sqrt())?;
    let (a, ga) = random_pair(gpu, rng, &[r, inp], c.ab, 1.0 / (inp as f32).sqrt())?;
    let (b, gb) = random_pair(gpu, rng, &[out, r], c.ab, 1.0 / (r as f32).sqrt())?;
    let (dy, gdy) = random_pair_par(gpu, rng, &[n, out], dt, 1.0)?;
    let (bias, gbias) = random_pair(gpu, rng, &[out], dt, 1.0)?;
    let (xl, gxl) = random_pair_par(gpu, rng, &[n, inp], dt, 1.0)?;
    let (mut da, mut gda) = random_pair(gpu, rng, &[r, inp], DType::F32, 1.0)?;
    let (mut db, mut gdb) = random_pair(gpu, rng, &[out, r], DType::F32, 1.0)?;
    let scaling = 2.0;
    let layer = LoraLinear {
        w: &w,
        bias: c.bias.then_some(&bias),
        a: &a,
        b: &b,
        scaling,
        split: None,
    };
    let glayer = LoraLinear {
        w: &gw,
        bias: c.bias.then_some(&gbias),
        a: &ga,
        b: &gb,
        scaling,
        split: None,
    };
    let case = format!(
        "{dt} n={n} {inp}->{out} r={r} ab={}{}{} ({})",
        c.ab,
        if c.bias { " bias" } else { "" },
        if c.x_lora { " x_lora" } else { "" },
        c.what
    );
    let f = lora_linear_forward(&layer, &x, c.x_lora.then_some(&xl))?;
    let gf = lora_linear_forward(&glayer, &gx, c.x_lora.then_some(&gxl))?;
    let mut lines = vec![
        compare(OP, &case, "y", &gf.y, &f.y)?,
        compare(OP, &case, "xa", &gf.xa, &f.xa)?,
    ];
    // Both backwards see the reference's xa, so that dB compares at the f32 tolerance: a
    // 1-ulp difference in the forward's bf16 rounding of xa is the forward's, not dB's.
    let ref_xa = f.xa.to_device(&Device::Cuda(gpu.clone()))?;
    let (x_d, gx_d) = if c.x_lora { (&xl, &gxl) } else { (&x, &gx) };
    let dev = Device::Cuda(gpu.clone());
    let (mut uda, mut udb) = (gda.to_device(&dev)?, gdb.to_device(&dev)?);
    let dx = lora_linear_backward(&layer, &dy, x_d, &f.xa, &mut da, &mut db, true)?;
    let gdx = lora_linear_backward(&glayer, &gdy, gx_d, &ref_xa, &mut gda, &mut gdb, true)?;
    lines.push(compare(
        OP,
        &case,
        "dx",
        gdx.as_ref().unwrap(),
        dx.as_ref().unwrap(),
    )?);
    lines.push(compare(OP, &case, "dB", &gdb, &db)?);
    if !c.x_lora {
        let gdx_only = lora_linear_backward_dx(&glayer, &gdy)?;
        lines.push(compare(
            OP,
            &case,
            "dx(alone)",
            &gdx_only,
            dx.as_ref().unwrap(),
        )?);
        // The accumulating form, onto zeros, with its own dA/dB accumulators.
        let mut acc = Tensor::zeros(gx_d.shape(), dt, &dev)?;
        let mut ada = Tensor::zeros(&[r, inp], DType::F32, &dev)?;
        let mut adb = Tensor::zeros(&[out, r], DType::F32, &dev)?;
        lora_linear_backward_accumulate(
            &glayer, &gdy, gx_d, &ref_xa, &mut ada, &mut adb, &mut acc,
        )?;
        lines.push(compare(
            OP,
            &case,
            "dx(accumulated)",
            &acc,
            dx.as_ref().unwrap(),
        )?);
    }
    let gxa_only = lora_linear_xa(&glayer, gx_d)?;
    let xa_ref = if c.x_lora {
        lora_linear_xa(&layer, x_d)?
    } else {
        f.xa.to_cpu()?
    };
    lines.push(compare(OP, &case, "xa(alone)", &gxa_only, &xa_ref)?);
    lines.push(da_line(&case, "dA", &gda, &da, dt)?);
    // The unfused composition from the same inputs (the reference's xa again).
    let uf = lora_linear_forward_unfused(&glayer, &gx, c.x_lora.then_some(&gxl))?;
    lines.push(compare(OP, &case, "y(unfused)", &uf.y, &f.y)?);
    lines.push(compare(OP, &case, "xa(unfused)", &uf.xa, &f.xa)?);
    let udx = lora_linear_backward_unfused(&glayer, &gdy, gx_d, &ref_xa, &mut uda, &mut udb, true)?;
    let dx = dx.as_ref().unwrap();
    lines.push(compare(
        OP,
        &case,
        "dx(unfused)",
        udx.as_ref().unwrap(),
        dx,
    )?);
    lines.push(compare(OP, &case, "dB(unfused)", &udb, &db)?);
    lines.push(da_line(&case, "dA(unfused)", &uda, &da, dt)?);
    if !c.x_lora {
        let udx_only = lora_linear_backward_dx_unfused(&glayer, &gdy)?;
        lines.push(compare(OP, &case, "dx(alone, unfused)", &udx_only, dx)?);
    }
    Ok(lines)
}

/// dA's check line. In bf16, dA = dxa^T x_d where dxa = s dy B is stored in bf16: cuBLAS
/// and the CPU sum dy B in different orders, so a few dxa elements round to neighbouring
/// bf16 values (a 2^-8 step); each such flip moves dA by ~1e-4 relative at these sizes. Both
/// are correct roundings; a wrong index would be off by O(1).
fn da_line(
    case: &str,
    output: &str,
    out: &Tensor,
    reference: &Tensor,
    dt: DType,
) -> Result<CheckLine> {
    let mut l = compare(OP, case, output, out, reference)?;
    if dt == DType::BF16 {
        l.tol = 1e-3;
        l.pass = l.rel_err < l.tol;
    }
    Ok(l)
}

/// Merge and unmerge, GPU against the CPU reference, and safe mode's refusal.
pub const MERGE_CHECK: GpuCheck = GpuCheck {
    op: "lora_merge",
    run: merge_check,
};

fn merge_check(gpu: &Arc<Gpu>, rng: &mut Rng) -> Result<Vec<CheckLine>> {
    let mut lines = Vec::new();
    for (out, inp, r, wdt, adt, bdt, what) in [
        (77, 1000, 7, DType::F32, DType::BF16, DType::F32, "odd"),
        (
            131,
            333,
            40,
            DType::BF16,
            DType::F32,
            DType::BF16,
            "rank > tile",
        ),
        (
            14336,
            4096,
            16,
            DType::BF16,
            DType::F32,
            DType::F32,
            "Llama-3-8B gate",
        ),
    ] {
        let case = format!("merge w={wdt} {out}x{inp} r={r} a={adt} b={bdt} ({what})");
        let (mut w, mut gw) = random_pair_par(gpu, rng, &[out, inp], wdt, 0.05)?;
        let (a, ga) = random_pair(gpu, rng, &[r, inp], adt, 0.1)?;
        let (b, gb) = random_pair(gpu, rng, &[out, r], bdt, 0.1)?;
        lora_merge(&mut w, &a, &b, 2.0, true)?;
        lora_merge(&mut gw, &ga, &gb, 2.0, true)?;
        lines.push(compare("lora_merge", &case, "w", &gw, &w)?);
        lora_unmerge(&mut w, &a, &b, 2.0, false)?;
        lora_unmerge(&mut gw, &ga, &gb, 2.0, false)?;
        lines.push(compare("lora_merge", &case, "w(unmerged)", &gw, &w)?);
    }
    // Safe mode refuses a product that overflows and leaves W as it was.
    let (w0, mut gw) = random_pair(gpu, rng, &[45, 70], DType::BF16, 1.0)?;
    let mut av = rng.normal_vec(3 * 70, 1.0);
    av[100] = 3.0e38;
    let ga = Tensor::from_f32(&[3, 70], av)?.to_device(&Device::Cuda(gpu.clone()))?;
    let (_, gb) = random_pair(gpu, rng, &[45, 3], DType::F32, 10.0)?;
    let refused = lora_merge(&mut gw, &ga, &gb, 2.0, true).is_err();
    let mut l = compare(
        "lora_merge",
        "safe merge of an overflowing product",
        "w",
        &gw,
        &w0,
    )?;
    l.pass &= refused;
    if !refused {
        l.rel_err = f64::INFINITY;
    }
    lines.push(l);
    Ok(lines)
}

fn gpu_check(gpu: &Arc<Gpu>, rng: &mut Rng) -> Result<Vec<CheckLine>> {
    let (bf, f32_) = (DType::BF16, DType::F32);
    #[rustfmt::skip]
    let cases = [
        Case { n: 37, inp: 100, out: 77, r: 5, dt: f32_, ab: f32_, bias: true, x_lora: true, what: "odd, f32" },
        Case { n: 129, inp: 260, out: 190, r: 16, dt: bf, ab: f32_, bias: true, x_lora: false, what: "odd, bias" },
        Case { n: 61, inp: 333, out: 555, r: 7, dt: bf, ab: bf, bias: false, x_lora: true, what: "odd, dropout input" },
        Case { n: 300, inp: 4096, out: 14336, r: 16, dt: bf, ab: f32_, bias: false, x_lora: false, what: "Llama-3-8B gate/up" },
        Case { n: 300, inp: 4096, out: 1024, r: 64, dt: bf, ab: f32_, bias: true, x_lora: false, what: "Llama-3-8B k/v" },
        Case { n: 300, inp: 14336, out: 4096, r: 16, dt: bf, ab: f32_, bias: false, x_lora: false, what: "Llama-3-8B down" },
        Case { n: 300, inp: 4096, out: 4096, r: 64, dt: bf, ab: f32_, bias: false, x_lora: false, what: "Llama-3-8B q/o" },
    ];
    let mut lines = Vec::new();
    for c in &cases {
        lines.extend(check_case(gpu, rng, c)?);
    }
    for (n, inp, out, r, bias, what) in [
        (129, 260, 190, 16, true, "odd, bias"),
        (300, 4096, 14336, 16, false, "Llama-3-8B gate/up"),
        (300, 14336, 4096, 16, false, "Llama-3-8B down"),
        (300, 4096, 1024, 64, true, "Llama-3-8B k/v"),
    ] {
        lines.extend(check_split_case(gpu, rng, n, inp, out, r, bias, what)?);
    }
    Ok(lines)
}

/// The fp32-accurate path ([`LoraLinear::split`], bf16 x, f32 A and B): every fused entry
/// point on the GPU against the same on the CPU. dA and dB are fp32-accurate on both
/// sides (held to 1e-3: the split of `s dy B` may round its low part differently where
/// the two sum in different orders); y, xa's split and dx are bf16 outputs.
#[allow(clippy::too_many_arguments)]
fn check_split_case(
    gpu: &Arc<Gpu>,
    rng: &mut Rng,
    n: usize,
    inp: usize,
    out: usize,
    r: usize,
    with_bias: bool,
    what: &str,
) -> Result<Vec<CheckLine>> {
    let (bf, f32_) = (DType::BF16, DType::F32);
    let dev = Device::Cuda(gpu.clone());
    let (x, gx) = random_pair_par(gpu, rng, &[n, inp], bf, 1.0)?;
    let (w, gw) = random_pair_par(gpu, rng, &[out, inp], bf, 1.0 / (inp as f32).sqrt())?;
    let (a, ga) = random_pair(gpu, rng, &[r, inp], f32_, 1.0 / (inp as f32).sqrt())?;
    let (b, gb) = random_pair(gpu, rng, &[out, r], f32_, 1.0 / (r as f32).sqrt())?;
    let (dy, gdy) = random_pair_par(gpu, rng, &[n, out], bf, 1.0)?;
    let (bias, gbias) = random_pair(gpu, rng, &[out], bf, 1.0)?;
    let sp = LoraSplit::many(&[(&a, &b)])?.pop().expect("one split");
    let gsp = LoraSplit::many(&[(&ga, &gb)])?.pop().expect("one split");
    let layer = LoraLinear {
        w: &w,
        bias: with_bias.then_some(&bias),
        a: &a,
        b: &b,
        scaling: 2.0,
        split: Some(&sp),
    };
    let glayer = LoraLinear {
        w: &gw,
        bias: with_bias.then_some(&gbias),
        a: &ga,
        b: &gb,
        scaling: 2.0,
        split: Some(&gsp),
    };
    let case = format!(
        "bf16 n={n} {inp}->{out} r={r}{} split ({what})",
        if with_bias { " bias" } else { "" }
    );
    let f = lora_linear_forward(&layer, &x, None)?;
    let gf = lora_linear_forward(&glayer, &gx, None)?;
    let mut lines = vec![
        compare(OP, &case, "y", &gf.y, &f.y)?,
        compare(OP, &case, "xa", &gf.xa, &f.xa)?,
        compare(
            OP,
            &case,
            "xa(alone)",
            &lora_linear_xa(&glayer, &gx)?,
            &f.xa,
        )?,
    ];
    let ref_xa = f.xa.to_device(&dev)?;
    let mut da = Tensor::zeros(&[r, inp], f32_, &Device::Cpu)?;
    let mut db = Tensor::zeros(&[out, r], f32_, &Device::Cpu)?;
    let mut gda = Tensor::zeros(&[r, inp], f32_, &dev)?;
    let mut gdb = Tensor::zeros(&[out, r], f32_, &dev)?;
    let dx = lora_linear_backward(&layer, &dy, &x, &f.xa, &mut da, &mut db, true)?.expect("dx");
    let gdx =
        lora_linear_backward(&glayer, &gdy, &gx, &ref_xa, &mut gda, &mut gdb, true)?.expect("dx");
    lines.push(compare(OP, &case, "dx", &gdx, &dx)?);
    lines.push(da_line(&case, "dA", &gda, &da, bf)?);
    lines.push(da_line(&case, "dB", &gdb, &db, bf)?);
    lines.push(compare(
        OP,
        &case,
        "dx(alone)",
        &lora_linear_backward_dx(&glayer, &gdy)?,
        &dx,
    )?);
    let mut acc = Tensor::zeros(&[n, inp], bf, &dev)?;
    let mut ada = Tensor::zeros(&[r, inp], f32_, &dev)?;
    let mut adb = Tensor::zeros(&[out, r], f32_, &dev)?;
    lora_linear_backward_accumulate(&glayer, &gdy, &gx, &ref_xa, &mut ada, &mut adb, &mut acc)?;
    lines.push(compare(OP, &case, "dx(accumulated)", &acc, &dx)?);
    lines.push(da_line(&case, "dA(accumulated)", &ada, &da, bf)?);
    Ok(lines)
}

pub const BENCH: KernelBench = KernelBench { op: OP, run: bench };

/// 8192 tokens, bf16, 4096 -> 4096 and 4096 -> 14336, r = 16, fp32 A/B: forward + backward
/// (dx, dA, dB), our ordering against the eager composition autograd would run (separate
/// products, a scale, an add, fresh gradients added to the accumulated ones).
fn bench(gpu: &Arc<Gpu>, cfg: &BenchConfig) -> Result<Vec<BenchRow>> {
    let n = 8192;
    let r = 16;
    let mut rows = Vec::new();
    for (inp, out) in [(4096, 4096), (4096, 14336)] {
        let mut rng = Rng::new(17);
        let mut input = |shape: &[usize], dt: DType, std: f32| -> Result<Tensor> {
            random_pair_par(gpu, &mut rng, shape, dt, std).map(|(_, d)| d)
        };
        let x = input(&[n, inp], DType::BF16, 1.0)?;
        let w = input(&[out, inp], DType::BF16, 0.02)?;
        let a = input(&[r, inp], DType::F32, 0.02)?;
        let b = input(&[out, r], DType::F32, 0.02)?;
        let dy = input(&[n, out], DType::BF16, 1.0)?;
        let mut da = input(&[r, inp], DType::F32, 1.0)?;
        let mut db = input(&[out, r], DType::F32, 1.0)?;
        let layer = LoraLinear {
            w: &w,
            bias: None,
            a: &a,
            b: &b,
            scaling: 2.0,
            split: None,
        };
        let (nf, i, o, rf) = (n as f64, inp as f64, out as f64, r as f64);
        // Forward x W^T and backward dy W (no dW), plus the six rank-r products.
        let flops = 4.0 * nf * i * o + 6.0 * nf * rf * (i + o);
        let shape = format!("{n}x{inp}->{out} r={r} bf16");
        // One row name per shape: the comparison table keys rows by (op, variant).
        let op = if out == inp {
            OP.to_string()
        } else {
            format!("{OP}_{inp}x{out}")
        };
        rows.push(measure(gpu, cfg, &op, "fused", &shape, 0.0, flops, || {
            let f = lora_linear_forward(&layer, &x, None)?;
            lora_linear_backward(&layer, &dy, &x, &f.xa, &mut da, &mut db, true)?;
            Ok(())
        })?);
        let base_flops = 4.0 * nf * i * o;
        rows.push(measure(
            gpu,
            cfg,
            &op,
            "base-only",
            &shape,
            0.0,
            base_flops,
            || {
                let _y = matmul(&x, false, &w, true, DType::BF16)?;
                let _dx = matmul(&dy, false, &w, false, DType::BF16)?;
                Ok(())
            },
        )?);
        rows.push(measure(
            gpu,
            cfg,
            &op,
            "unfused",
            &shape,
            0.0,
            flops,
            || {
                let f = lora_linear_forward_unfused(&layer, &x, None)?;
                lora_linear_backward_unfused(&layer, &dy, &x, &f.xa, &mut da, &mut db, true)?;
                Ok(())
            },
        )?);
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With a split (bf16 x, f32 A and B), every fused entry point is the lora_split
    /// composition, its rank-r products fp32-accurate: dA and dB within 2e-5 of f64 math on
    /// the same bf16 inputs, where the plain bf16 path is ~1e-3 off.
    #[test]
    fn split_path_gives_fp32_accurate_adapter_gradients() {
        let (n, inp, out, r, s) = (40, 96, 72, 8, 1.5f32);
        let mut rng = Rng::new(21);
        let bf = |v: Vec<f32>, shape: &[usize]| Tensor::from_f32_as(shape, v, DType::BF16).unwrap();
        let x = bf(rng.normal_vec(n * inp, 1.0), &[n, inp]);
        let w = bf(rng.normal_vec(out * inp, 0.1), &[out, inp]);
        let dy = bf(rng.normal_vec(n * out, 1.0), &[n, out]);
        let a = Tensor::from_f32(&[r, inp], rng.normal_vec(r * inp, 0.1)).unwrap();
        let b = Tensor::from_f32(&[out, r], rng.normal_vec(out * r, 0.1)).unwrap();
        let sp = LoraSplit::many(&[(&a, &b)]).unwrap().pop().unwrap();
        let grads = |split: Option<&LoraSplit>| {
            let layer = LoraLinear {
                w: &w,
                bias: None,
                a: &a,
                b: &b,
                scaling: s,
                split,
            };
            let f = lora_linear_forward(&layer, &x, None).unwrap();
            let mut da = Tensor::zeros(&[r, inp], DType::F32, &Device::Cpu).unwrap();
            let mut db = Tensor::zeros(&[out, r], DType::F32, &Device::Cpu).unwrap();
            let dx = lora_linear_backward(&layer, &dy, &x, &f.xa, &mut da, &mut db, true).unwrap();
            let dx_alone = lora_linear_backward_dx(&layer, &dy).unwrap();
            let dx = dx.unwrap().to_f32_vec().unwrap();
            assert_eq!(dx, dx_alone.to_f32_vec().unwrap());
            // The two-phase backward: the same gradients, dx without recomputing s dy B.
            let mut da2 = Tensor::zeros(&[r, inp], DType::F32, &Device::Cpu).unwrap();
            let mut db2 = Tensor::zeros(&[out, r], DType::F32, &Device::Cpu).unwrap();
            let pending =
                lora_linear_backward_adapter(&layer, &dy, &x, &f.xa, &mut da2, &mut db2).unwrap();
            let dx2 = lora_linear_finish_dx(&layer, &dy, pending).unwrap();
            assert_eq!(dx2.to_f32_vec().unwrap(), dx);
            assert_eq!(da2.to_f32_vec().unwrap(), da.to_f32_vec().unwrap());
            assert_eq!(db2.to_f32_vec().unwrap(), db.to_f32_vec().unwrap());
            let xa = lora_linear_xa(&layer, &x).unwrap();
            assert_eq!(xa.to_f32_vec().unwrap(), f.xa.to_f32_vec().unwrap());
            (
                f.xa.shape().to_vec(),
                da.to_f32_vec().unwrap(),
                db.to_f32_vec().unwrap(),
            )
        };
        let (xv, dyv, av, bv) = (
            x.to_f32_vec().unwrap(),
            dy.to_f32_vec().unwrap(),
            a.to_f32_vec().unwrap(),
            b.to_f32_vec().unwrap(),
        );
        let xa: Vec<f64> = (0..n * r)
            .map(|e| {
                (0..inp)
                    .map(|i| xv[e / r * inp + i] as f64 * av[e % r * inp + i] as f64)
                    .sum()
            })
            .collect();
        let dxa: Vec<f64> = (0..n * r)
            .map(|e| {
                s as f64
                    * (0..out)
                        .map(|o| dyv[e / r * out + o] as f64 * bv[o * r + e % r] as f64)
                        .sum::<f64>()
            })
            .collect();
        let db_want: Vec<f64> = (0..out * r)
            .map(|e| {
                s as f64
                    * (0..n)
                        .map(|t| dyv[t * out + e / r] as f64 * xa[t * r + e % r])
                        .sum::<f64>()
            })
            .collect();
        let da_want: Vec<f64> = (0..r * inp)
            .map(|e| {
                (0..n)
                    .map(|t| dxa[t * r + e / inp] * xv[t * inp + e % inp] as f64)
                    .sum()
            })
            .collect();
        let rel = |g: &[f32], w: &[f64]| {
            let num: f64 = g.iter().zip(w).map(|(a, b)| (*a as f64 - b).powi(2)).sum();
            (num / w.iter().map(|b| b * b).sum::<f64>()).sqrt()
        };
        let (shape, da, db) = grads(Some(&sp));
        assert_eq!(shape, [n, 3 * r]);
        assert!(
            rel(&da, &da_want) < 2e-5,
            "split dA {:e}",
            rel(&da, &da_want)
        );
        assert!(
            rel(&db, &db_want) < 2e-5,
            "split dB {:e}",
            rel(&db, &db_want)
        );
        let (shape, da, db) = grads(None);
        assert_eq!(shape, [n, r]);
        assert!(rel(&da, &da_want) > 5e-4 && rel(&db, &db_want) > 5e-4);
        // A split of the wrong rank is an error naming the op.
        let other = LoraSplit::many(&[(
            &Tensor::from_f32(&[r + 1, inp], vec![0.0; (r + 1) * inp]).unwrap(),
            &Tensor::from_f32(&[out, r + 1], vec![0.0; out * (r + 1)]).unwrap(),
        )])
        .unwrap()
        .pop()
        .unwrap();
        let bad = LoraLinear {
            w: &w,
            bias: None,
            a: &a,
            b: &b,
            scaling: s,
            split: Some(&other),
        };
        let e = lora_linear_forward(&bad, &x, None)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains(OP) && e.contains("a3"), "{e}");
    }

    fn f64s(v: &[f32]) -> Vec<f64> {
        v.iter().map(|&x| x as f64).collect()
    }

    /// Naive f64 `y = x W^T + bias + s (x_d A^T) B^T`.
    #[allow(clippy::too_many_arguments)]
    fn naive(
        x: &[f64],
        xd: &[f64],
        w: &[f64],
        bias: Option<&[f64]>,
        a: &[f64],
        b: &[f64],
        s: f64,
        n: usize,
        inp: usize,
        out: usize,
        r: usize,
    ) -> Vec<f64> {
        let mut y = vec![0.0; n * out];
        for t in 0..n {
            let xa: Vec<f64> = (0..r)
                .map(|k| (0..inp).map(|i| xd[t * inp + i] * a[k * inp + i]).sum())
                .collect();
            for o in 0..out {
                let base: f64 = (0..inp).map(|i| x[t * inp + i] * w[o * inp + i]).sum();
                let lora: f64 = (0..r).map(|k| xa[k] * b[o * r + k]).sum();
                y[t * out + o] = base + bias.map_or(0.0, |bv| bv[o]) + s * lora;
            }
        }
        y
    }

    struct Inputs {
        x: Vec<f32>,
        xl: Vec<f32>,
        w: Vec<f32>,
        bias: Vec<f32>,
        a: Vec<f32>,
        b: Vec<f32>,
    }

    fn inputs(rng: &mut Rng, n: usize, inp: usize, out: usize, r: usize) -> Inputs {
        Inputs {
            x: rng.normal_vec(n * inp, 1.0),
            xl: rng.normal_vec(n * inp, 1.0),
            w: rng.normal_vec(out * inp, 0.3),
            bias: rng.normal_vec(out, 1.0),
            a: rng.normal_vec(r * inp, 0.3),
            b: rng.normal_vec(out * r, 0.5),
        }
    }

    #[test]
    fn forward_matches_f64_with_bias_dropout_input_and_leading_dims() {
        let mut rng = Rng::new(21);
        let (bsz, seq, inp, out, r) = (2, 3, 13, 11, 3);
        let n = bsz * seq;
        let v = inputs(&mut rng, n, inp, out, r);
        let t = |shape: &[usize], d: &[f32]| Tensor::from_f32(shape, d.to_vec()).unwrap();
        let (x, xl) = (t(&[bsz, seq, inp], &v.x), t(&[bsz, seq, inp], &v.xl));
        let (w, bias, a, b) = (
            t(&[out, inp], &v.w),
            t(&[out], &v.bias),
            t(&[r, inp], &v.a),
            t(&[out, r], &v.b),
        );
        for (use_bias, use_xl) in [(false, false), (true, false), (true, true)] {
            let layer = LoraLinear {
                w: &w,
                bias: use_bias.then_some(&bias),
                a: &a,
                b: &b,
                scaling: 1.5,
                split: None,
            };
            let f = lora_linear_forward(&layer, &x, use_xl.then_some(&xl)).unwrap();
            assert_eq!(f.y.shape(), &[bsz, seq, out]);
            assert_eq!(f.xa.shape(), &[bsz, seq, r]);
            let xd = if use_xl { &v.xl } else { &v.x };
            let want = naive(
                &f64s(&v.x),
                &f64s(xd),
                &f64s(&v.w),
                use_bias.then(|| f64s(&v.bias)).as_deref(),
                &f64s(&v.a),
                &f64s(&v.b),
                1.5,
                n,
                inp,
                out,
                r,
            );
            let want: Vec<f32> = want.iter().map(|&v| v as f32).collect();
            let err = crate::check::rel_err(&f.y.to_f32_vec().unwrap(), &want);
            assert!(err < 1e-6, "bias={use_bias} x_lora={use_xl}: {err}");
        }
    }

    /// dx, dA, dB against central differences of the f64 forward for L = sum(y * g), with
    /// dA and dB accumulated onto nonzero buffers.
    /// The accumulating backward adds `dy W + (s dy B) A` onto what is there, with the
    /// same dA and dB as the plain one.
    #[test]
    fn backward_accumulate_adds_the_input_gradient() {
        let mut rng = Rng::new(23);
        let (n, inp, out, r) = (6, 10, 8, 4);
        let v = inputs(&mut rng, n, inp, out, r);
        let t = |shape: &[usize], d: Vec<f32>| Tensor::from_f32(shape, d).unwrap();
        let (x, w) = (t(&[n, inp], v.x.clone()), t(&[out, inp], v.w.clone()));
        let (a, b) = (t(&[r, inp], v.a.clone()), t(&[out, r], v.b.clone()));
        let dy = t(&[n, out], rng.normal_vec(n * out, 1.0));
        let acc0 = rng.normal_vec(n * inp, 1.0);
        let layer = LoraLinear {
            w: &w,
            bias: None,
            a: &a,
            b: &b,
            scaling: 0.5,
            split: None,
        };
        let xa = lora_linear_forward(&layer, &x, None).unwrap().xa;
        let zeros = |s: &[usize]| Tensor::zeros(s, DType::F32, &Device::Cpu).unwrap();
        let (mut da1, mut db1) = (zeros(&[r, inp]), zeros(&[out, r]));
        let dx = lora_linear_backward(&layer, &dy, &x, &xa, &mut da1, &mut db1, true)
            .unwrap()
            .unwrap()
            .to_f32_vec()
            .unwrap();
        let (mut da2, mut db2) = (zeros(&[r, inp]), zeros(&[out, r]));
        let mut acc = t(&[n, inp], acc0.clone());
        lora_linear_backward_accumulate(&layer, &dy, &x, &xa, &mut da2, &mut db2, &mut acc)
            .unwrap();
        assert_eq!(da1.to_f32_vec().unwrap(), da2.to_f32_vec().unwrap());
        assert_eq!(db1.to_f32_vec().unwrap(), db2.to_f32_vec().unwrap());
        let want: Vec<f32> = acc0.iter().zip(&dx).map(|(a, d)| a + d).collect();
        assert!(crate::check::rel_err(&acc.to_f32_vec().unwrap(), &want) < 1e-6);
        let mut wrong = zeros(&[n, inp + 1]);
        let err =
            lora_linear_backward_accumulate(&layer, &dy, &x, &xa, &mut da2, &mut db2, &mut wrong)
                .unwrap_err()
                .to_string();
        assert!(err.contains("dx_acc"), "{err}");
    }

    #[test]
    fn backward_matches_finite_differences_and_accumulates() {
        let mut rng = Rng::new(22);
        let (n, inp, out, r) = (5, 9, 7, 3);
        let s = 0.75;
        let v = inputs(&mut rng, n, inp, out, r);
        let g = rng.normal_vec(n * out, 1.0);
        let da0 = rng.normal_vec(r * inp, 1.0);
        let db0 = rng.normal_vec(out * r, 1.0);
        for use_xl in [false, true] {
            let xd = if use_xl { &v.xl } else { &v.x };
            let loss = |x: &[f64], xd: &[f64], a: &[f64], b: &[f64]| -> f64 {
                naive(x, xd, &f64s(&v.w), None, a, b, s, n, inp, out, r)
                    .iter()
                    .zip(&g)
                    .map(|(y, &gv)| y * gv as f64)
                    .sum()
            };
            let t = |shape: &[usize], d: &[f32]| Tensor::from_f32(shape, d.to_vec()).unwrap();
            let (x, xdt) = (t(&[n, inp], &v.x), t(&[n, inp], xd));
            let (w, a, b) = (t(&[out, inp], &v.w), t(&[r, inp], &v.a), t(&[out, r], &v.b));
            let dy = t(&[n, out], &g);
            let (mut da, mut db) = (t(&[r, inp], &da0), t(&[out, r], &db0));
            let layer = LoraLinear {
                w: &w,
                bias: None,
                a: &a,
                b: &b,
                scaling: s as f32,
                split: None,
            };
            let f = lora_linear_forward(&layer, &x, use_xl.then_some(&xdt)).unwrap();
            let dx = lora_linear_backward(&layer, &dy, &xdt, &f.xa, &mut da, &mut db, true)
                .unwrap()
                .unwrap();
            let h = 1e-6;
            let fd = |len: usize, which: usize| -> Vec<f32> {
                (0..len)
                    .map(|i| {
                        let eval = |delta: f64| {
                            let mut args = [f64s(&v.x), f64s(xd), f64s(&v.a), f64s(&v.b)];
                            if which == 0 && !use_xl {
                                args[1][i] += delta; // x feeds both paths without dropout
                            }
                            args[which][i] += delta;
                            loss(&args[0], &args[1], &args[2], &args[3])
                        };
                        ((eval(h) - eval(-h)) / (2.0 * h)) as f32
                    })
                    .collect()
            };
            let minus = |got: Vec<f32>, init: &[f32]| -> Vec<f32> {
                got.iter().zip(init).map(|(g, i)| g - i).collect()
            };
            let e_da =
                crate::check::rel_err(&minus(da.to_f32_vec().unwrap(), &da0), &fd(v.a.len(), 2));
            let e_db =
                crate::check::rel_err(&minus(db.to_f32_vec().unwrap(), &db0), &fd(v.b.len(), 3));
            assert!(
                e_da < 1e-5 && e_db < 1e-5,
                "x_lora={use_xl}: dA {e_da}, dB {e_db}"
            );
            if !use_xl {
                let e_dx = crate::check::rel_err(&dx.to_f32_vec().unwrap(), &fd(v.x.len(), 0));
                assert!(e_dx < 1e-5, "dx {e_dx}");
            }
            let none = lora_linear_backward(&layer, &dy, &xdt, &f.xa, &mut da, &mut db, false);
            assert!(none.unwrap().is_none());
            // The split calls give the same numbers as the joint ones.
            let xa = lora_linear_xa(&layer, &xdt).unwrap();
            assert_eq!(xa.to_f32_vec().unwrap(), f.xa.to_f32_vec().unwrap());
            if !use_xl {
                let dx_alone = lora_linear_backward_dx(&layer, &dy).unwrap();
                assert_eq!(dx_alone.to_f32_vec().unwrap(), dx.to_f32_vec().unwrap());
            }
        }
    }

    #[test]
    fn bf16_layer_with_f32_adapter_stays_close_to_f64() {
        let mut rng = Rng::new(23);
        let (n, inp, out, r) = (17, 40, 24, 4);
        let v = inputs(&mut rng, n, inp, out, r);
        let x = Tensor::from_f32_as(&[n, inp], v.x.clone(), DType::BF16).unwrap();
        let w = Tensor::from_f32_as(&[out, inp], v.w.clone(), DType::BF16).unwrap();
        let a = Tensor::from_f32(&[r, inp], v.a.clone()).unwrap();
        let b = Tensor::from_f32(&[out, r], v.b.clone()).unwrap();
        let layer = LoraLinear {
            w: &w,
            bias: None,
            a: &a,
            b: &b,
            scaling: 2.0,
            split: None,
        };
        let f = lora_linear_forward(&layer, &x, None).unwrap();
        assert_eq!((f.y.dtype(), f.xa.dtype()), (DType::BF16, DType::BF16));
        let (xv, wv) = (x.to_f32_vec().unwrap(), w.to_f32_vec().unwrap());
        let want = naive(
            &f64s(&xv),
            &f64s(&xv),
            &f64s(&wv),
            None,
            &f64s(&v.a),
            &f64s(&v.b),
            2.0,
            n,
            inp,
            out,
            r,
        );
        let want: Vec<f32> = want.iter().map(|&v| v as f32).collect();
        let err = crate::check::rel_err(&f.y.to_f32_vec().unwrap(), &want);
        assert!(err < 1e-2, "{err}");
        let dy = Tensor::from_f32_as(&[n, out], rng.normal_vec(n * out, 1.0), DType::BF16).unwrap();
        let mut da = Tensor::zeros(&[r, inp], DType::F32, &Device::Cpu).unwrap();
        let mut db = Tensor::zeros(&[out, r], DType::F32, &Device::Cpu).unwrap();
        let dx = lora_linear_backward(&layer, &dy, &x, &f.xa, &mut da, &mut db, true)
            .unwrap()
            .unwrap();
        assert_eq!(dx.dtype(), DType::BF16);
        // dB = s dy^T xa exactly as f32 sums of the bf16 operands.
        let (dyv, xav) = (dy.to_f32_vec().unwrap(), f.xa.to_f32_vec().unwrap());
        let want_db: Vec<f32> = (0..out * r)
            .map(|e| {
                let (o, k) = (e / r, e % r);
                (2.0 * (0..n)
                    .map(|t| dyv[t * out + o] as f64 * xav[t * r + k] as f64)
                    .sum::<f64>()) as f32
            })
            .collect();
        assert!(crate::check::rel_err(&db.to_f32_vec().unwrap(), &want_db) < 1e-6);
    }

    /// In bf16 each GEMM rounds once, in the order `rank_r_first` picks: for an output
    /// wider than the reduction the rank-r term is rounded on its own and the base product
    /// added onto it (`y = bf16(x W^T + bf16(s xa B^T))`), otherwise the base product is
    /// rounded first (`y = bf16(bf16(x W^T) + s xa B^T)`); the same for `dx` with `dy W`
    /// and `dxa A`. Element for element (the CPU GEMM is deterministic), both shapes.
    #[test]
    fn bf16_rounds_in_the_order_the_widths_pick() {
        use crate::ops::matmul::cpu_matmul;
        for (inp, out) in [(24, 20), (20, 24)] {
            let mut rng = Rng::new(25);
            let (n, r) = (9, 4);
            let s = 1.5f32;
            let v = inputs(&mut rng, n, inp, out, r);
            let bf = |shape: &[usize], d: &[f32]| {
                Tensor::from_f32_as(shape, d.to_vec(), DType::BF16).unwrap()
            };
            let (x, w) = (bf(&[n, inp], &v.x), bf(&[out, inp], &v.w));
            let (a, b) = (bf(&[r, inp], &v.a), bf(&[out, r], &v.b));
            let dy = bf(&[n, out], &rng.normal_vec(n * out, 1.0));
            let round = |v: Vec<f32>| -> Vec<f32> {
                v.into_iter()
                    .map(|e| half::bf16::from_f32(e).to_f32())
                    .collect()
            };
            // The sum of two products as the second GEMM forms it: the first one as
            // stored (rounded), the second exact in f32, then one rounding.
            let sum = |first: Vec<f32>, second: Vec<f32>| -> Vec<f32> {
                round(
                    round(first)
                        .iter()
                        .zip(&second)
                        .map(|(f, s)| f + s)
                        .collect(),
                )
            };
            let vals = |t: &Tensor| t.to_f32_vec().unwrap();
            let (xv, wv, av, bv, dyv) = (vals(&x), vals(&w), vals(&a), vals(&b), vals(&dy));
            let layer = LoraLinear {
                w: &w,
                bias: None,
                a: &a,
                b: &b,
                scaling: s,
                split: None,
            };
            let f = lora_linear_forward(&layer, &x, None).unwrap();
            let xa = round(cpu_matmul(&xv, false, &av, true, n, r, inp));
            assert_eq!(vals(&f.xa), xa);
            let lora: Vec<f32> = cpu_matmul(&xa, false, &bv, true, n, out, r)
                .iter()
                .map(|e| s * e)
                .collect();
            let base = cpu_matmul(&xv, false, &wv, true, n, out, inp);
            let want_y = if out > inp {
                sum(lora, base)
            } else {
                sum(base, lora)
            };
            assert_eq!(vals(&f.y), want_y, "{inp} -> {out}");
            let dx = lora_linear_backward_dx(&layer, &dy).unwrap();
            let dxa = round(
                cpu_matmul(&dyv, false, &bv, false, n, r, out)
                    .iter()
                    .map(|e| s * e)
                    .collect(),
            );
            let lora_dx = cpu_matmul(&dxa, false, &av, false, n, inp, r);
            let base_dx = cpu_matmul(&dyv, false, &wv, false, n, inp, out);
            let want_dx = if inp > out {
                sum(lora_dx, base_dx)
            } else {
                sum(base_dx, lora_dx)
            };
            assert_eq!(vals(&dx), want_dx, "{inp} -> {out}");
        }
    }

    #[test]
    fn merge_adds_the_product_and_unmerge_removes_it() {
        let mut rng = Rng::new(24);
        let (out, inp, r) = (13, 37, 5);
        let wv = rng.normal_vec(out * inp, 1.0);
        let av = rng.normal_vec(r * inp, 0.5);
        let bv = rng.normal_vec(out * r, 0.5);
        let a = Tensor::from_f32(&[r, inp], av.clone()).unwrap();
        let b = Tensor::from_f32_as(&[out, r], bv.clone(), DType::BF16).unwrap();
        let bq = b.to_f32_vec().unwrap();
        let product: Vec<f64> = (0..out * inp)
            .map(|e| {
                let (i, j) = (e / inp, e % inp);
                (0..r)
                    .map(|k| bq[i * r + k] as f64 * av[k * inp + j] as f64)
                    .sum()
            })
            .collect();
        let exact: Vec<f64> = product
            .iter()
            .zip(&wv)
            .map(|(p, &w)| w as f64 + 0.5 * p)
            .collect();
        // f32 W: the merged values are the f64 ones to f32 precision, and unmerge undoes it.
        let mut w = Tensor::from_f32(&[out, inp], wv.clone()).unwrap();
        lora_merge(&mut w, &a, &b, 0.5, true).unwrap();
        let ex32: Vec<f32> = exact.iter().map(|&v| v as f32).collect();
        assert!(crate::check::rel_err(&w.to_f32_vec().unwrap(), &ex32) < 1e-6);
        lora_unmerge(&mut w, &a, &b, 0.5, true).unwrap();
        assert!(crate::check::rel_err(&w.to_f32_vec().unwrap(), &wv) < 1e-6);
        // bf16 W: rounded once, so every element is within half a bf16 ulp of the exact sum
        // (plus f32 noise); rounding the product first and then the sum would not be.
        let mut w = Tensor::from_f32_as(&[out, inp], wv.clone(), DType::BF16).unwrap();
        let w0 = w.to_f32_vec().unwrap();
        lora_merge(&mut w, &a, &b, 0.5, false).unwrap();
        for ((&got, &base), &p) in w.to_f32_vec().unwrap().iter().zip(&w0).zip(&product) {
            let want = base as f64 + 0.5 * p;
            let ulp = (want.abs().log2().floor() - 7.0).exp2();
            assert!(
                (got as f64 - want).abs() <= 0.5 * ulp * 1.001 + 1e-6,
                "{got} vs {want}"
            );
        }
    }

    #[test]
    fn safe_merge_refuses_non_finite_results_and_leaves_w() {
        let (out, inp, r) = (3, 4, 2);
        let w0 = vec![1.0f32; out * inp];
        let mut av = vec![0.5f32; r * inp];
        av[5] = f32::NAN;
        let a = Tensor::from_f32(&[r, inp], av).unwrap();
        let b = Tensor::from_f32(&[out, r], vec![1.0; out * r]).unwrap();
        let mut w = Tensor::from_f32_as(&[out, inp], w0.clone(), DType::BF16).unwrap();
        let e = lora_merge(&mut w, &a, &b, 1.0, true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("lora_merge") && e.contains("non-finite"), "{e}");
        assert_eq!(w.to_f32_vec().unwrap(), w0);
        // Overflow counts too: finite inputs whose merged value does not fit.
        let big = Tensor::from_f32(&[r, inp], vec![3.0e38; r * inp]).unwrap();
        assert!(lora_merge(&mut w, &big, &b, 1.0, true).is_err());
        assert_eq!(w.to_f32_vec().unwrap(), w0);
        lora_merge(&mut w, &a, &b, 1.0, false).unwrap();
        assert!(w.to_f32_vec().unwrap().iter().any(|v| v.is_nan()));
    }

    #[test]
    fn bad_inputs_name_the_op_and_shapes() {
        let t =
            |shape: &[usize]| Tensor::from_f32(shape, vec![0.5; shape.iter().product()]).unwrap();
        let (x, w, a, b) = (t(&[4, 6]), t(&[5, 6]), t(&[2, 6]), t(&[5, 2]));
        let bad_a = t(&[2, 7]);
        let layer = LoraLinear {
            w: &w,
            bias: None,
            a: &bad_a,
            b: &b,
            scaling: 1.0,
            split: None,
        };
        let e = lora_linear_forward(&layer, &x, None)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("lora_linear") && e.contains("[2, 7]") && e.contains("[2, 6]"),
            "{e}"
        );
        let bf_w = Tensor::from_f32_as(&[5, 6], vec![0.5; 30], DType::BF16).unwrap();
        let layer = LoraLinear {
            w: &bf_w,
            bias: None,
            a: &a,
            b: &b,
            scaling: 1.0,
            split: None,
        };
        let e = lora_linear_forward(&layer, &x, None)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("lora_linear") && e.contains("bf16"), "{e}");
        let layer = LoraLinear {
            w: &w,
            bias: None,
            a: &a,
            b: &b,
            scaling: 1.0,
            split: None,
        };
        let f = lora_linear_forward(&layer, &x, None).unwrap();
        let dy = t(&[4, 5]);
        let mut da_bf = Tensor::from_f32_as(&[2, 6], vec![0.0; 12], DType::BF16).unwrap();
        let mut db = t(&[5, 2]);
        let e = lora_linear_backward(&layer, &dy, &x, &f.xa, &mut da_bf, &mut db, true)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("da") && e.contains("f32"), "{e}");
        let mut da = t(&[2, 6]);
        let e = lora_linear_backward(&layer, &t(&[4, 3]), &x, &f.xa, &mut da, &mut db, true)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("dy") && e.contains("[4, 3]"), "{e}");
        let mut wm = t(&[5, 6]);
        let e = lora_merge(&mut wm, &bad_a, &b, 1.0, true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("lora_merge") && e.contains("[2, 7]"), "{e}");
    }
}
