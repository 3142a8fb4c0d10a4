//! One-op CUDA kernels (cast, square, add, mul with broadcast, row reductions...), the
//! building blocks of the "unfused" side of the kernel benchmarks: each reads its inputs
//! from device memory and writes its output back, like one eager framework op.
//! GPU only: they exist to measure what fusion saves, and the fused ops' CPU references
//! are what the tests check.

use std::sync::Arc;

use crate::cuda::{Gpu, KernelSource};
use crate::error::{KernelError, Result};
use crate::{launch, DType, Tensor};

pub const SOURCE: KernelSource = KernelSource {
    name: "eager",
    src: include_str!("../../kernels/eager.cu"),
};

#[derive(Clone, Copy, Debug)]
pub enum UnaryOp {
    Cast = 0,
    Square = 1,
    RsqrtAdd = 2,
    Silu = 3,
    Exp = 4,
    Scale = 5,
    Sigmoid = 6,
    Log = 7,
    GeluTanh = 8,
    AddScalar = 9,
    Tanh = 10,
    /// `min(x, s)`: torch's `clamp(max=s)`.
    MinScalar = 11,
    /// `s / x`.
    ScalarDiv = 12,
}

#[derive(Clone, Copy, Debug)]
pub enum BinaryOp {
    Add = 0,
    Sub = 1,
    Mul = 2,
    Div = 3,
}

/// How `b` is broadcast against `a` in [`binary`].
#[derive(Clone, Copy, Debug)]
pub enum Broadcast {
    /// Same shape.
    None = 0,
    /// `b` is one row `[cols]`, repeated for every row of `a`.
    Row = 1,
    /// `b` holds one value per row of `a`.
    PerRow = 2,
    /// `b` is one value (a device scalar).
    Scalar = 3,
}

#[derive(Clone, Copy, Debug)]
pub enum Reduce {
    Sum = 0,
    Max = 1,
    Mean = 2,
}

fn gpu_of(op: &'static str, t: &Tensor) -> Result<Arc<Gpu>> {
    t.gpu().cloned().ok_or_else(|| KernelError::Device {
        op,
        detail: "eager kernels run on the GPU only".into(),
    })
}

fn is_bf16(t: &Tensor) -> i32 {
    (t.dtype() == DType::BF16) as i32
}

fn grid(gpu: &Gpu, n: usize) -> u32 {
    n.div_ceil(256).min(gpu.sm_count() * 16).max(1) as u32
}

pub fn unary(x: &Tensor, op: UnaryOp, s: f32, out: DType) -> Result<Tensor> {
    let gpu = gpu_of("eager_unary", x)?;
    let y = Tensor::uninit_cuda(&gpu, x.shape(), out)?;
    let n = x.elem_count();
    let f = gpu.function(&SOURCE, "eager_unary")?;
    launch!(gpu, f, (grid(&gpu, n), 1, 1), (256, 1, 1), 0;
        x.dptr(), is_bf16(x), y.dptr(), is_bf16(&y), n as i64, op as i32, s)?;
    Ok(y)
}

pub fn binary(
    a: &Tensor,
    b: &Tensor,
    bcast: Broadcast,
    op: BinaryOp,
    out: DType,
) -> Result<Tensor> {
    let gpu = gpu_of("eager_binary", a)?;
    let (rows, cols) = a.rows_cols();
    let need = match bcast {
        Broadcast::None => a.elem_count(),
        Broadcast::Row => cols,
        Broadcast::PerRow => rows,
        Broadcast::Scalar => 1,
    };
    if b.elem_count() != need {
        return Err(KernelError::shape(
            "eager_binary",
            format!(
                "b {:?} does not broadcast to a {:?} as {bcast:?}",
                b.shape(),
                a.shape()
            ),
        ));
    }
    let y = Tensor::uninit_cuda(&gpu, a.shape(), out)?;
    let n = a.elem_count();
    let f = gpu.function(&SOURCE, "eager_binary")?;
    launch!(gpu, f, (grid(&gpu, n), 1, 1), (256, 1, 1), 0;
        a.dptr(), is_bf16(a), b.dptr(), is_bf16(b), y.dptr(), is_bf16(&y),
        n as i64, cols as i64, bcast as i32, op as i32)?;
    Ok(y)
}

/// One f32 value per row.
pub fn row_reduce(x: &Tensor, op: Reduce) -> Result<Tensor> {
    let gpu = gpu_of("eager_row_reduce", x)?;
    let (rows, cols) = x.rows_cols();
    let y = Tensor::uninit_cuda(&gpu, &[rows], DType::F32)?;
    let f = gpu.function(&SOURCE, "eager_row_reduce")?;
    let blocks = rows.clamp(1, gpu.sm_count() * 8) as u32;
    launch!(gpu, f, (blocks, 1, 1), (256, 1, 1), 0;
        x.dptr(), is_bf16(x), y.dptr(), rows as i64, cols as i64, op as i32)?;
    Ok(y)
}

/// Sum over rows: one f32 value per column.
pub fn col_sum(x: &Tensor) -> Result<Tensor> {
    let gpu = gpu_of("eager_col_sum", x)?;
    let (rows, cols) = x.rows_cols();
    let y = Tensor::uninit_cuda(&gpu, &[cols], DType::F32)?;
    let f = gpu.function(&SOURCE, "eager_col_sum")?;
    launch!(gpu, f, (cols.div_ceil(256).max(1) as u32, 1, 1), (256, 1, 1), 0;
        x.dptr(), is_bf16(x), y.dptr(), rows as i64, cols as i64)?;
    Ok(y)
}

/// The activation whose derivative [`act_backward`] applies.
#[derive(Clone, Copy, Debug)]
pub enum ActGrad {
    Silu = 0,
    GeluTanh = 1,
}

/// `dy * act'(x)`, one kernel (torch's `silu_backward` / `gelu_backward`).
pub fn act_backward(dy: &Tensor, x: &Tensor, act: ActGrad, out: DType) -> Result<Tensor> {
    let gpu = gpu_of("eager_act_backward", x)?;
    if dy.elem_count() != x.elem_count() {
        return Err(KernelError::shape(
            "eager_act_backward",
            format!("dy {:?} vs x {:?}", dy.shape(), x.shape()),
        ));
    }
    let y = Tensor::uninit_cuda(&gpu, x.shape(), out)?;
    let n = x.elem_count();
    let f = gpu.function(&SOURCE, "eager_act_backward")?;
    launch!(gpu, f, (grid(&gpu, n), 1, 1), (256, 1, 1), 0;
        dy.dptr(), is_bf16(dy), x.dptr(), is_bf16(x), y.dptr(), is_bf16(&y), n as i64, act as i32)?;
    Ok(y)
}

// ---- RoPE pieces (the unfused side of the rope bench).

/// `[tokens, 2 * half]` f32 angles `positions[t] * inv_freq[j % half]`: HF's outer product of
/// the positions (i32 `[tokens]`) and inv_freq (f32 `[half]`) and its cat, in one kernel.
pub fn rope_angles(positions: &Tensor, inv_freq: &Tensor) -> Result<Tensor> {
    let gpu = gpu_of("eager_rope_angles", positions)?;
    let (tokens, half) = (positions.elem_count(), inv_freq.elem_count());
    let y = Tensor::uninit_cuda(&gpu, &[tokens, 2 * half], DType::F32)?;
    let f = gpu.function(&SOURCE, "eager_rope_angles")?;
    launch!(gpu, f, (grid(&gpu, tokens * 2 * half), 1, 1), (256, 1, 1), 0;
        positions.dptr(), inv_freq.dptr(), y.dptr(), tokens as i64, half as i64)?;
    Ok(y)
}

#[derive(Clone, Copy, Debug)]
pub enum TrigOp {
    Cos = 0,
    Sin = 1,
}

/// `cos` or `sin` of an f32 tensor, cast to `out`.
pub fn trig(x: &Tensor, op: TrigOp, out: DType) -> Result<Tensor> {
    let gpu = gpu_of("eager_trig", x)?;
    let y = Tensor::uninit_cuda(&gpu, x.shape(), out)?;
    let n = x.elem_count();
    let f = gpu.function(&SOURCE, "eager_trig")?;
    launch!(gpu, f, (grid(&gpu, n), 1, 1), (256, 1, 1), 0;
        x.dptr(), y.dptr(), is_bf16(&y), n as i64, op as i32)?;
    Ok(y)
}

/// `sign * rotate_half(x)` over rows of `head_dim`: `[-x2, x1]`; `sign = -1` is its backward.
pub fn rotate_half(x: &Tensor, head_dim: usize, sign: f32) -> Result<Tensor> {
    let gpu = gpu_of("eager_rotate_half", x)?;
    let y = Tensor::uninit_cuda(&gpu, x.shape(), x.dtype())?;
    let n = x.elem_count();
    let f = gpu.function(&SOURCE, "eager_rotate_half")?;
    launch!(gpu, f, (grid(&gpu, n), 1, 1), (256, 1, 1), 0;
        x.dptr(), y.dptr(), is_bf16(x), n as i64, (head_dim / 2) as i64, sign)?;
    Ok(y)
}

/// `a (op) b` with `b` `[tokens, cols]` repeated over the heads of `a` `[tokens, heads, cols]`
/// (HF's cos/sin unsqueezed over the head dim).
pub fn binary_per_token(a: &Tensor, b: &Tensor, op: BinaryOp, out: DType) -> Result<Tensor> {
    let gpu = gpu_of("eager_binary_per_token", a)?;
    let (tokens, cols) = b.rows_cols();
    let n = a.elem_count();
    if tokens == 0 || cols == 0 || !n.is_multiple_of(tokens * cols) {
        return Err(KernelError::shape(
            "eager_binary_per_token",
            format!(
                "b {:?} does not repeat over the heads of a {:?}",
                b.shape(),
                a.shape()
            ),
        ));
    }
    let heads = n / (tokens * cols);
    let y = Tensor::uninit_cuda(&gpu, a.shape(), out)?;
    let f = gpu.function(&SOURCE, "eager_binary_per_token")?;
    launch!(gpu, f, (grid(&gpu, n), 1, 1), (256, 1, 1), 0;
        a.dptr(), is_bf16(a), b.dptr(), is_bf16(b), y.dptr(), is_bf16(&y),
        n as i64, cols as i64, heads as i64, op as i32)?;
    Ok(y)
}

/// `y[row] = x[row, idx[row]]` in f32 (0 where `idx[row]` is outside the row, as for an
/// ignored label): the gather of a loss's target logits.
pub fn gather_rows(x: &Tensor, idx: &Tensor) -> Result<Tensor> {
    let gpu = gpu_of("eager_gather_rows", x)?;
    let (rows, cols) = x.rows_cols();
    if idx.dtype() != DType::I32 || idx.elem_count() != rows {
        return Err(KernelError::shape(
            "eager_gather_rows",
            format!(
                "idx {:?} is not one i32 per row of x {:?}",
                idx.shape(),
                x.shape()
            ),
        ));
    }
    let y = Tensor::uninit_cuda(&gpu, &[rows], DType::F32)?;
    let f = gpu.function(&SOURCE, "eager_gather_rows")?;
    launch!(gpu, f, (rows.div_ceil(256).max(1) as u32, 1, 1), (256, 1, 1), 0;
        x.dptr(), is_bf16(x), idx.dptr(), y.dptr(), rows as i64, cols as i64)?;
    Ok(y)
}

/// `x[row, idx[row]] += s` in place, skipping indices outside the row: a one-hot update.
pub fn scatter_add_rows(x: &mut Tensor, idx: &Tensor, s: f32) -> Result<()> {
    let gpu = gpu_of("eager_scatter_add_rows", x)?;
    let (rows, cols) = x.rows_cols();
    if idx.dtype() != DType::I32 || idx.elem_count() != rows {
        return Err(KernelError::shape(
            "eager_scatter_add_rows",
            format!(
                "idx {:?} is not one i32 per row of x {:?}",
                idx.shape(),
                x.shape()
            ),
        ));
    }
    let f = gpu.function(&SOURCE, "eager_scatter_add_rows")?;
    launch!(gpu, f, (rows.div_ceil(256).max(1) as u32, 1, 1), (256, 1, 1), 0;
        x.dptr(), is_bf16(x), idx.dptr(), rows as i64, cols as i64, s)?;
    Ok(())
}

/// `sqrt(x)`, one kernel (the unfused AdamW's denominator).
pub fn sqrt(x: &Tensor, out: DType) -> Result<Tensor> {
    let gpu = gpu_of("eager_sqrt", x)?;
    let y = Tensor::uninit_cuda(&gpu, x.shape(), out)?;
    let n = x.elem_count();
    let f = gpu.function(&SOURCE, "eager_sqrt")?;
    launch!(gpu, f, (grid(&gpu, n), 1, 1), (256, 1, 1), 0;
        x.dptr(), is_bf16(x), y.dptr(), is_bf16(&y), n as i64)?;
    Ok(y)
}

/// `[tokens, hkv, d]` -> `[tokens, hkv * group, d]`, each kv head repeated for its query
/// heads (HF's `repeat_kv`).
pub fn repeat_kv(x: &Tensor, tokens: usize, hkv: usize, group: usize, d: usize) -> Result<Tensor> {
    let gpu = gpu_of("eager_repeat_kv", x)?;
    let y = Tensor::uninit_cuda(&gpu, &[tokens, hkv * group, d], x.dtype())?;
    let f = gpu.function(&SOURCE, "eager_repeat_kv")?;
    launch!(gpu, f, (grid(&gpu, y.elem_count()), 1, 1), (256, 1, 1), 0;
        x.dptr(), is_bf16(x), y.dptr(), is_bf16(&y), tokens as i64, hkv as i32, group as i32,
        d as i32)?;
    Ok(y)
}

/// The backward of [`repeat_kv`]: `[tokens, hkv * group, d]` -> `[tokens, hkv, d]`, summing
/// each group's heads.
pub fn group_sum(x: &Tensor, tokens: usize, hkv: usize, group: usize, d: usize) -> Result<Tensor> {
    let gpu = gpu_of("eager_group_sum", x)?;
    let y = Tensor::uninit_cuda(&gpu, &[tokens, hkv, d], x.dtype())?;
    let f = gpu.function(&SOURCE, "eager_group_sum")?;
    launch!(gpu, f, (grid(&gpu, y.elem_count()), 1, 1), (256, 1, 1), 0;
        x.dptr(), is_bf16(x), y.dptr(), is_bf16(&y), tokens as i64, hkv as i32, group as i32,
        d as i32)?;
    Ok(y)
}

/// Causal softmax over a stack of square `[n, n]` score matrices (rows folded), in f32,
/// output in `out`. With `lse = Some((lse, start))`, the stack is one document's
/// `[heads, n, n]` scores and each row's log-sum-exp is written to the f32 `[heads, tokens]`
/// tensor `lse` at column `start + row` (the fused attention's layout).
pub fn causal_softmax(
    s: &Tensor,
    n: usize,
    out: DType,
    lse: Option<(&Tensor, usize)>,
) -> Result<Tensor> {
    let gpu = gpu_of("eager_causal_softmax", s)?;
    let p = Tensor::uninit_cuda(&gpu, s.shape(), out)?;
    let rows = s.elem_count() / n.max(1);
    let (lse_ptr, lse_ld) = match lse {
        None => (0u64, 0usize),
        Some((t, start)) => {
            let (heads, tokens) = t.rows_cols();
            if t.dtype() != DType::F32 || heads * n != rows || start + n > tokens {
                return Err(KernelError::shape(
                    "eager_causal_softmax",
                    format!(
                        "lse {} {:?} cannot take {rows} rows of {n} from token {start}",
                        t.dtype(),
                        t.shape()
                    ),
                ));
            }
            (t.dptr() + (start * 4) as u64, tokens)
        }
    };
    let f = gpu.function(&SOURCE, "eager_causal_softmax")?;
    let blocks = rows.clamp(1, gpu.sm_count() * 16) as u32;
    launch!(gpu, f, (blocks, 1, 1), (256, 1, 1), 0;
        s.dptr(), is_bf16(s), p.dptr(), is_bf16(&p), rows as i64, n as i64, lse_ptr,
        lse_ld as i64)?;
    Ok(p)
}

/// Softmax backward by rows of length `n`: `ds = p * (dp - rowsum(p * dp))`.
pub fn softmax_backward(p: &Tensor, dp: &Tensor, n: usize, out: DType) -> Result<Tensor> {
    let gpu = gpu_of("eager_softmax_backward", p)?;
    let ds = Tensor::uninit_cuda(&gpu, p.shape(), out)?;
    let rows = p.elem_count() / n.max(1);
    let f = gpu.function(&SOURCE, "eager_softmax_backward")?;
    let blocks = rows.clamp(1, gpu.sm_count() * 16) as u32;
    launch!(gpu, f, (blocks, 1, 1), (256, 1, 1), 0;
        p.dptr(), is_bf16(p), dp.dptr(), is_bf16(dp), ds.dptr(), is_bf16(&ds), rows as i64,
        n as i64)?;
    Ok(ds)
}
