//! Gated activations of the MLP: SwiGLU `y = silu(g) * u` and GeGLU `y = gelu_tanh(g) * u`,
//! forward and backward, with HF's rounding (the activation is rounded to the storage dtype
//! before the product, as `act_fn(gate_proj(x)) * up_proj(x)` does in bf16).
//!
//! The backward recomputes the activation from `g` (nothing is saved besides `g` and `u`)
//! and writes the gradients in place: `dg` over `g`, `du` over `u`, so it needs no memory.
//! The `_fused` variants take gate and up as the two halves of one `[rows, 2I]` tensor, the
//! output of a single GEMM against the concatenated gate|up weights.

use std::sync::Arc;

use crate::bench::{measure, BenchConfig, BenchRow, KernelBench};
use crate::check::{compare, random_pair_par, CheckLine, GpuCheck};
use crate::cpu::par_rows;
use crate::cuda::{Gpu, KernelSource};
use crate::error::{KernelError, Result};
use crate::ops::eager::{self, BinaryOp, Broadcast, UnaryOp};
use crate::rng::Rng;
use crate::{launch, DType, Device, Tensor};

use super::{common_gpu, expect_dtype, expect_shape};

pub const SOURCE: KernelSource = KernelSource {
    name: "activation_mul",
    src: include_str!("../../kernels/activation_mul.cu"),
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GatedAct {
    /// SwiGLU: `silu(g) * u` (Llama, Mistral, Qwen).
    Silu,
    /// GeGLU: `gelu(g) * u` with the tanh approximation (Gemma's `gelu_pytorch_tanh`).
    GeluTanh,
}

impl GatedAct {
    /// The op's name in errors and reports.
    pub fn op_name(self) -> &'static str {
        match self {
            GatedAct::Silu => "swiglu",
            GatedAct::GeluTanh => "geglu",
        }
    }
    fn kernel_tag(self) -> &'static str {
        match self {
            GatedAct::Silu => "silu",
            GatedAct::GeluTanh => "gelu",
        }
    }
    /// The activation in f32, as the kernels compute it.
    pub fn apply(self, x: f32) -> f32 {
        match self {
            GatedAct::Silu => x / (1.0 + (-x).exp()),
            GatedAct::GeluTanh => 0.5 * x * (1.0 + (GELU_K * (x + GELU_C * x * x * x)).tanh()),
        }
    }
    /// Its derivative in f32, in the form torch's backward kernels use.
    pub fn grad(self, x: f32) -> f32 {
        match self {
            GatedAct::Silu => {
                let s = 1.0 / (1.0 + (-x).exp());
                s * (1.0 + x * (1.0 - s))
            }
            GatedAct::GeluTanh => {
                let x2 = x * x;
                let t = (GELU_K * (x + GELU_C * x2 * x)).tanh();
                0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * GELU_K * (1.0 + 3.0 * GELU_C * x2)
            }
        }
    }
}

/// sqrt(2 / pi) and the cubic coefficient of the tanh approximation of GELU.
const GELU_K: f32 = 0.797_884_6;
const GELU_C: f32 = 0.044715;

/// The kernels' launch bound.
const MAX_THREADS: usize = 512;
/// Chunks per thread (the kernels' U): all their loads are in flight together.
const UNROLL: usize = 4;

fn check_dtype(op: &'static str, name: &'static str, t: &Tensor) -> Result<()> {
    expect_dtype(op, name, t, &[DType::F32, DType::BF16])
}

/// The kernel for `rows` rows of `cols` elements (`_vec` when rows are whole 16-byte chunks)
/// and its launch: a block covers up to `UNROLL` x 512 chunks of a row (one block per row at
/// Llama sizes), `grid.x` the tiles of a row, `grid.y` the rows (looping past 65535).
fn kernel(
    dir: &str,
    act: GatedAct,
    dtype: DType,
    rows: usize,
    cols: usize,
    ptrs: &[u64],
) -> (String, (u32, u32, u32), u32) {
    let aligned = ptrs.iter().all(|p| p % 16 == 0);
    let w = if cols.is_multiple_of(8) && aligned {
        8
    } else {
        1
    };
    let name = format!(
        "gated_{dir}_{}_{}_{}",
        act.kernel_tag(),
        if w == 8 { "vec" } else { "any" },
        dtype.kernel_suffix()
    );
    let cpr = cols / w;
    let threads = (cpr.div_ceil(UNROLL).div_ceil(32) * 32).clamp(32, MAX_THREADS);
    let tiles = cpr.div_ceil(threads * UNROLL).min(i32::MAX as usize);
    let grid = (tiles as u32, rows.clamp(1, 65535) as u32, 1);
    (name, grid, threads as u32)
}

/// The forward's inputs checked; the GPU they are on (None: the CPU).
fn check_forward(act: GatedAct, gate: &Tensor, up: &Tensor) -> Result<Option<Arc<Gpu>>> {
    let op = act.op_name();
    check_dtype(op, "gate", gate)?;
    expect_dtype(op, "up", up, &[gate.dtype()])?;
    expect_shape(op, "up", up, gate.shape())?;
    common_gpu(op, &[("gate", gate), ("up", up)])
}

/// The backward's inputs checked; the GPU they are on (None: the CPU).
fn check_backward(
    act: GatedAct,
    dy: &Tensor,
    gate: &Tensor,
    up: &Tensor,
) -> Result<Option<Arc<Gpu>>> {
    let op = act.op_name();
    check_dtype(op, "gate", gate)?;
    expect_dtype(op, "up", up, &[gate.dtype()])?;
    expect_dtype(op, "dy", dy, &[gate.dtype()])?;
    expect_shape(op, "up", up, gate.shape())?;
    expect_shape(op, "dy", dy, gate.shape())?;
    common_gpu(op, &[("dy", dy), ("gate", gate), ("up", up)])
}

/// `y = act(gate) * up`, same shape and dtype as `gate`.
pub fn gated_act_forward(gate: &Tensor, up: &Tensor, act: GatedAct) -> Result<Tensor> {
    let n = gate.elem_count();
    match check_forward(act, gate, up)? {
        None => {
            let (rows, cols) = gate.rows_cols();
            let (g, u) = (gate.cpu_f32(), up.cpu_f32());
            let y = cpu_forward(&g, &u, cols, rows, cols, act, gate.dtype());
            Tensor::from_f32_as(gate.shape(), y, gate.dtype())
        }
        Some(gpu) => {
            let y = Tensor::uninit_cuda(&gpu, gate.shape(), gate.dtype())?;
            if n > 0 {
                // The two inputs and the output are contiguous alike: one long row.
                let ptrs = [gate.dptr(), up.dptr(), y.dptr()];
                let (name, grid, threads) = kernel("forward", act, gate.dtype(), 1, n, &ptrs);
                let f = gpu.function(&SOURCE, &name)?;
                launch!(gpu, f, grid, (threads, 1, 1), 0;
                    gate.dptr(), up.dptr(), n as i64, y.dptr(), n as i64, 1i64, n as i64)?;
            }
            Ok(y)
        }
    }
}

/// The backward in place: `gate` becomes `dgate` and `up` becomes `dup`.
pub fn gated_act_backward(
    dy: &Tensor,
    gate: &mut Tensor,
    up: &mut Tensor,
    act: GatedAct,
) -> Result<()> {
    let n = gate.elem_count();
    match check_backward(act, dy, gate, up)? {
        None => {
            let (rows, cols) = gate.rows_cols();
            let (dg, du) = {
                let (d, g, u) = (dy.cpu_f32(), gate.cpu_f32(), up.cpu_f32());
                cpu_backward(&d, &g, &u, cols, cols, rows, cols, act, gate.dtype())
            };
            gate.cpu_store_f32(&dg);
            up.cpu_store_f32(&du);
            Ok(())
        }
        Some(gpu) => {
            if n > 0 {
                let ptrs = [dy.dptr(), gate.dptr(), up.dptr()];
                let (name, grid, threads) = kernel("backward", act, gate.dtype(), 1, n, &ptrs);
                let f = gpu.function(&SOURCE, &name)?;
                launch!(gpu, f, grid, (threads, 1, 1), 0;
                    dy.dptr(), n as i64, gate.dptr(), up.dptr(), n as i64, 1i64, n as i64)?;
            }
            Ok(())
        }
    }
}

/// The activation's one-op kernel and its derivative's, as torch has them.
fn eager_act(act: GatedAct) -> (UnaryOp, eager::ActGrad) {
    match act {
        GatedAct::Silu => (UnaryOp::Silu, eager::ActGrad::Silu),
        GatedAct::GeluTanh => (UnaryOp::GeluTanh, eager::ActGrad::GeluTanh),
    }
}

/// [`gated_act_forward`] as HF's MLP runs it eagerly: `a = act(gate)` stored in the
/// activation dtype, then `a * up`. Same output. On the CPU this runs the reference.
pub fn gated_act_forward_unfused(gate: &Tensor, up: &Tensor, act: GatedAct) -> Result<Tensor> {
    if check_forward(act, gate, up)?.is_none() {
        return gated_act_forward(gate, up, act);
    }
    let dt = gate.dtype();
    let a = eager::unary(gate, eager_act(act).0, 0.0, dt)?;
    eager::binary(&a, up, Broadcast::None, BinaryOp::Mul, dt)
}

/// [`gated_act_backward`] as autograd runs it through the eager forward (the activation
/// recomputed, since only gate and up are kept): `du = dy * act(gate)`,
/// `dgate = act'(gate) * (dy * up)`, one kernel each. `gate` and `up` are replaced by
/// `dgate` and `dup`, the fused op's in-place contract. On the CPU this runs the reference.
pub fn gated_act_backward_unfused(
    dy: &Tensor,
    gate: &mut Tensor,
    up: &mut Tensor,
    act: GatedAct,
) -> Result<()> {
    if check_backward(act, dy, gate, up)?.is_none() {
        return gated_act_backward(dy, gate, up, act);
    }
    let dt = gate.dtype();
    let (unary, grad) = eager_act(act);
    let a = eager::unary(gate, unary, 0.0, dt)?;
    let du = eager::binary(dy, &a, Broadcast::None, BinaryOp::Mul, dt)?;
    drop(a);
    let da = eager::binary(dy, up, Broadcast::None, BinaryOp::Mul, dt)?;
    *up = du;
    *gate = eager::act_backward(&da, gate, grad, dt)?;
    Ok(())
}

/// `(rows, I)` of a fused `[..., 2I]` gate|up tensor.
fn fused_dims(op: &'static str, gate_up: &Tensor) -> Result<(usize, usize)> {
    check_dtype(op, "gate_up", gate_up)?;
    let (rows, cols) = gate_up.rows_cols();
    if gate_up.shape().is_empty() || !cols.is_multiple_of(2) {
        return Err(KernelError::shape(
            op,
            format!(
                "`gate_up` has shape {:?}: its last dim must be 2 * intermediate (gate | up)",
                gate_up.shape()
            ),
        ));
    }
    Ok((rows, cols / 2))
}

/// `y = act(gate_up[..., :I]) * gate_up[..., I:]`, shape `[..., I]`.
pub fn gated_act_forward_fused(gate_up: &Tensor, act: GatedAct) -> Result<Tensor> {
    let op = act.op_name();
    let (rows, inter) = fused_dims(op, gate_up)?;
    let mut shape = gate_up.shape().to_vec();
    *shape.last_mut().expect("checked non-empty") = inter;
    let dt = gate_up.dtype();
    match common_gpu(op, &[("gate_up", gate_up)])? {
        None => {
            let gu = gate_up.cpu_f32();
            let y = cpu_forward(&gu, &gu[inter..], 2 * inter, rows, inter, act, dt);
            Tensor::from_f32_as(&shape, y, dt)
        }
        Some(gpu) => {
            let y = Tensor::uninit_cuda(&gpu, &shape, dt)?;
            if rows * inter > 0 {
                let up = gate_up.dptr() + (inter * dt.size_in_bytes()) as u64;
                let ptrs = [gate_up.dptr(), up, y.dptr()];
                let (name, grid, threads) = kernel("forward", act, dt, rows, inter, &ptrs);
                let f = gpu.function(&SOURCE, &name)?;
                launch!(gpu, f, grid, (threads, 1, 1), 0;
                    gate_up.dptr(), up, (2 * inter) as i64, y.dptr(), inter as i64,
                    rows as i64, inter as i64)?;
            }
            Ok(y)
        }
    }
}

/// The fused backward in place: `gate_up` becomes `[dgate | dup]`.
pub fn gated_act_backward_fused(dy: &Tensor, gate_up: &mut Tensor, act: GatedAct) -> Result<()> {
    let op = act.op_name();
    let (rows, inter) = fused_dims(op, gate_up)?;
    expect_dtype(op, "dy", dy, &[gate_up.dtype()])?;
    let mut shape = gate_up.shape().to_vec();
    *shape.last_mut().expect("checked non-empty") = inter;
    expect_shape(op, "dy", dy, &shape)?;
    let dt = gate_up.dtype();
    match common_gpu(op, &[("dy", dy), ("gate_up", gate_up)])? {
        None => {
            let (dg, du) = {
                let (d, gu) = (dy.cpu_f32(), gate_up.cpu_f32());
                cpu_backward(
                    &d,
                    &gu,
                    &gu[inter..],
                    inter,
                    2 * inter,
                    rows,
                    inter,
                    act,
                    dt,
                )
            };
            let mut out = vec![0.0f32; rows * 2 * inter];
            par_rows(&mut out, 2 * inter, |r, o| {
                o[..inter].copy_from_slice(&dg[r * inter..(r + 1) * inter]);
                o[inter..].copy_from_slice(&du[r * inter..(r + 1) * inter]);
            });
            gate_up.cpu_store_f32(&out);
            Ok(())
        }
        Some(gpu) => {
            if rows * inter > 0 {
                let up = gate_up.dptr() + (inter * dt.size_in_bytes()) as u64;
                let ptrs = [dy.dptr(), gate_up.dptr(), up];
                let (name, grid, threads) = kernel("backward", act, dt, rows, inter, &ptrs);
                let f = gpu.function(&SOURCE, &name)?;
                launch!(gpu, f, grid, (threads, 1, 1), 0;
                    dy.dptr(), inter as i64, gate_up.dptr(), up, (2 * inter) as i64,
                    rows as i64, inter as i64)?;
            }
            Ok(())
        }
    }
}

fn round_to(dtype: DType, v: f32) -> f32 {
    match dtype {
        DType::BF16 => half::bf16::from_f32(v).to_f32(),
        _ => v,
    }
}

/// Forward over `rows` rows of `cols` elements, `g` and `u` rows at stride `gu_stride` (`u`
/// is a slice starting at the first up element). Unrounded: the caller rounds when it builds
/// the output tensor, as the kernels round when they store.
#[allow(clippy::too_many_arguments)]
fn cpu_forward(
    g: &[f32],
    u: &[f32],
    gu_stride: usize,
    rows: usize,
    cols: usize,
    act: GatedAct,
    dt: DType,
) -> Vec<f32> {
    let mut y = vec![0.0f32; rows * cols];
    par_rows(&mut y, cols, |r, out| {
        let (gr, ur) = (&g[r * gu_stride..], &u[r * gu_stride..]);
        for c in 0..cols {
            out[c] = round_to(dt, act.apply(gr[c])) * ur[c];
        }
    });
    y
}

/// Backward: `(dg, du)` as `[rows, cols]` each, unrounded; `dy` rows at stride `dy_stride`.
#[allow(clippy::too_many_arguments)]
fn cpu_backward(
    dy: &[f32],
    g: &[f32],
    u: &[f32],
    dy_stride: usize,
    gu_stride: usize,
    rows: usize,
    cols: usize,
    act: GatedAct,
    dt: DType,
) -> (Vec<f32>, Vec<f32>) {
    let mut dg = vec![0.0f32; rows * cols];
    let mut du = vec![0.0f32; rows * cols];
    par_rows(&mut dg, cols, |r, out| {
        let (dr, gr, ur) = (
            &dy[r * dy_stride..],
            &g[r * gu_stride..],
            &u[r * gu_stride..],
        );
        for c in 0..cols {
            out[c] = round_to(dt, dr[c] * ur[c]) * act.grad(gr[c]);
        }
    });
    par_rows(&mut du, cols, |r, out| {
        let (dr, gr) = (&dy[r * dy_stride..], &g[r * gu_stride..]);
        for c in 0..cols {
            out[c] = dr[c] * round_to(dt, act.apply(gr[c]));
        }
    });
    (dg, du)
}

pub const CHECK: GpuCheck = GpuCheck {
    op: "swiglu",
    run: gpu_check,
};

fn gpu_check(gpu: &Arc<Gpu>, rng: &mut Rng) -> Result<Vec<CheckLine>> {
    use GatedAct::{GeluTanh, Silu};
    let mut lines = Vec::new();
    // (act, dtype, rows, I, fused gate|up, gate std, what)
    let cases = [
        (Silu, DType::BF16, 8192, 14336, true, 1.0, "Llama-3-8B MLP"),
        (
            Silu,
            DType::BF16,
            512,
            14336,
            false,
            1.0,
            "separate gate, up",
        ),
        (Silu, DType::F32, 37, 1001, false, 3.0, "odd, scalar path"),
        (Silu, DType::F32, 33, 1000, true, 3.0, "odd rows"),
        (
            Silu,
            DType::BF16,
            129,
            1003,
            true,
            1.0,
            "odd I, scalar path",
        ),
        (
            GeluTanh,
            DType::BF16,
            2048,
            14336,
            true,
            1.0,
            "Gemma-like MLP",
        ),
        (
            GeluTanh,
            DType::BF16,
            300,
            16384,
            false,
            1.0,
            "separate gate, up",
        ),
        (
            GeluTanh,
            DType::F32,
            37,
            1001,
            true,
            3.0,
            "odd I, scalar path",
        ),
        (GeluTanh, DType::F32, 65, 2048, false, 3.0, "f32"),
    ];
    for (act, dt, rows, inter, fused, std, what) in cases {
        let op = act.op_name();
        let case = format!(
            "{dt} {rows}x{inter} {} ({what})",
            if fused { "gate|up" } else { "gate, up" }
        );
        let (dy, gdy) = random_pair_par(gpu, rng, &[rows, inter], dt, 1.0)?;
        if fused {
            // Gate and up halves with the gate's spread: the same std keeps the check simple.
            let (mut gu, mut ggu) = random_pair_par(gpu, rng, &[rows, 2 * inter], dt, std)?;
            let y = gated_act_forward_fused(&gu, act)?;
            let gy = gated_act_forward_fused(&ggu, act)?;
            lines.push(compare(op, &case, "y", &gy, &y)?);
            gated_act_backward_fused(&dy, &mut gu, act)?;
            gated_act_backward_fused(&gdy, &mut ggu, act)?;
            lines.push(compare(op, &case, "dg|du", &ggu, &gu)?);
        } else {
            let (mut g, mut gg) = random_pair_par(gpu, rng, &[rows, inter], dt, std)?;
            let (mut u, mut gu) = random_pair_par(gpu, rng, &[rows, inter], dt, 1.0)?;
            let y = gated_act_forward(&g, &u, act)?;
            let gy = gated_act_forward(&gg, &gu, act)?;
            lines.push(compare(op, &case, "y", &gy, &y)?);
            let dev = Device::Cuda(gpu.clone());
            let (mut ug, mut uu) = (gg.to_device(&dev)?, gu.to_device(&dev)?);
            let uy = gated_act_forward_unfused(&ug, &uu, act)?;
            lines.push(compare(op, &case, "y(unfused)", &uy, &y)?);
            gated_act_backward(&dy, &mut g, &mut u, act)?;
            gated_act_backward(&gdy, &mut gg, &mut gu, act)?;
            lines.push(compare(op, &case, "dg", &gg, &g)?);
            lines.push(compare(op, &case, "du", &gu, &u)?);
            gated_act_backward_unfused(&gdy, &mut ug, &mut uu, act)?;
            lines.push(compare(op, &case, "dg(unfused)", &ug, &g)?);
            lines.push(compare(op, &case, "du(unfused)", &uu, &u)?);
        }
    }
    Ok(lines)
}

pub const BENCH: KernelBench = KernelBench {
    op: "swiglu",
    run: bench,
};

/// 8192 tokens x 14336 (Llama-3-8B's intermediate size), bf16, forward + in-place backward,
/// SwiGLU and GeGLU, fused against the eager composition (act, mul; mul, mul, act-backward).
fn bench(gpu: &Arc<Gpu>, cfg: &BenchConfig) -> Result<Vec<BenchRow>> {
    let (rows, inter) = (8192, 14336);
    let n = rows * inter;
    let mut rng = Rng::new(9);
    let mut input = |shape: &[usize]| -> Result<Tensor> {
        random_pair_par(gpu, &mut rng, shape, DType::BF16, 1.0).map(|(_, d)| d)
    };
    let (mut g, mut u, dy) = (
        input(&[rows, inter])?,
        input(&[rows, inter])?,
        input(&[rows, inter])?,
    );
    let mut gate_up = input(&[rows, 2 * inter])?;
    let shape = format!("{rows}x{inter} bf16");
    // Forward reads g and u and writes y; backward reads dy, g and u and writes dg and du.
    // The in-place backward turns g and u into gradients run after run: the values drift,
    // the time does not (the arithmetic's speed does not depend on the values).
    let floor = (8 * n * 2) as f64;
    let mut rows_out = Vec::new();
    for act in [GatedAct::Silu, GatedAct::GeluTanh] {
        let op = act.op_name();
        rows_out.push(measure(gpu, cfg, op, "fused", &shape, floor, 0.0, || {
            let _y = gated_act_forward(&g, &u, act)?;
            gated_act_backward(&dy, &mut g, &mut u, act)
        })?);
        rows_out.push(measure(
            gpu,
            cfg,
            op,
            "fused-gu",
            &shape,
            floor,
            0.0,
            || {
                let _y = gated_act_forward_fused(&gate_up, act)?;
                gated_act_backward_fused(&dy, &mut gate_up, act)
            },
        )?);
        let fwd_floor = (3 * n * 2) as f64;
        rows_out.push(measure(
            gpu,
            cfg,
            op,
            "fwd",
            &shape,
            fwd_floor,
            0.0,
            || gated_act_forward(&g, &u, act).map(|_| ()),
        )?);
        // Eager, as HF's MLP runs under autograd: the activation is a bf16 tensor (recomputed
        // in the backward, as the engine keeps only gate and up), the product's backward
        // makes du and da, the activation's backward makes dg.
        rows_out.push(measure(
            gpu,
            cfg,
            op,
            "unfused",
            &shape,
            floor,
            0.0,
            || {
                let _y = gated_act_forward_unfused(&g, &u, act)?;
                gated_act_backward_unfused(&dy, &mut g, &mut u, act)
            },
        )?);
    }
    Ok(rows_out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::rel_err;

    fn silu64(x: f64) -> f64 {
        x / (1.0 + (-x).exp())
    }
    fn gelu64(x: f64) -> f64 {
        let k = (2.0 / std::f64::consts::PI).sqrt();
        0.5 * x * (1.0 + (k * (x + 0.044715 * x * x * x)).tanh())
    }
    fn act64(act: GatedAct, x: f64) -> f64 {
        match act {
            GatedAct::Silu => silu64(x),
            GatedAct::GeluTanh => gelu64(x),
        }
    }

    const ACTS: [GatedAct; 2] = [GatedAct::Silu, GatedAct::GeluTanh];

    #[test]
    fn forward_matches_f64() {
        let mut rng = Rng::new(21);
        for act in ACTS {
            let (rows, cols) = (7, 37);
            let gv = rng.normal_vec(rows * cols, 3.0);
            let uv = rng.normal_vec(rows * cols, 1.0);
            let g = Tensor::from_f32(&[rows, cols], gv.clone()).unwrap();
            let u = Tensor::from_f32(&[rows, cols], uv.clone()).unwrap();
            let y = gated_act_forward(&g, &u, act).unwrap();
            let want: Vec<f32> = gv
                .iter()
                .zip(&uv)
                .map(|(&g, &u)| (act64(act, g as f64) * u as f64) as f32)
                .collect();
            let e = rel_err(&y.to_f32_vec().unwrap(), &want);
            assert!(e < 1e-6, "{act:?}: {e}");
        }
    }

    /// dg and du against central differences of the f64 forward, for L = sum(y * dy).
    #[test]
    fn backward_matches_finite_differences() {
        let mut rng = Rng::new(22);
        for act in ACTS {
            let (rows, cols) = (5, 13);
            let n = rows * cols;
            let gv = rng.normal_vec(n, 3.0);
            let uv = rng.normal_vec(n, 1.0);
            let dv = rng.normal_vec(n, 1.0);
            let h = 1e-6;
            // y_i depends only on g_i and u_i, so the partials are per element.
            let fd_g: Vec<f32> = (0..n)
                .map(|i| {
                    let (g, u) = (gv[i] as f64, uv[i] as f64);
                    ((act64(act, g + h) - act64(act, g - h)) * u / (2.0 * h) * dv[i] as f64) as f32
                })
                .collect();
            let fd_u: Vec<f32> = (0..n)
                .map(|i| {
                    let (g, u) = (gv[i] as f64, uv[i] as f64);
                    let y = |u: f64| act64(act, g) * u;
                    ((y(u + h) - y(u - h)) / (2.0 * h) * dv[i] as f64) as f32
                })
                .collect();
            let dy = Tensor::from_f32(&[rows, cols], dv.clone()).unwrap();
            let mut g = Tensor::from_f32(&[rows, cols], gv.clone()).unwrap();
            let mut u = Tensor::from_f32(&[rows, cols], uv.clone()).unwrap();
            gated_act_backward(&dy, &mut g, &mut u, act).unwrap();
            let eg = rel_err(&g.to_f32_vec().unwrap(), &fd_g);
            let eu = rel_err(&u.to_f32_vec().unwrap(), &fd_u);
            assert!(eg < 1e-5 && eu < 1e-5, "{act:?}: dg err {eg}, du err {eu}");
            assert_eq!(g.shape(), &[rows, cols]);
            assert_eq!(g.dtype(), DType::F32);
        }
    }

    /// The fused [gate | up] layout gives exactly what the separate tensors give.
    #[test]
    fn fused_layout_matches_separate() {
        let mut rng = Rng::new(23);
        for act in ACTS {
            for dt in [DType::F32, DType::BF16] {
                let (rows, inter) = (6, 11);
                let gv = rng.normal_vec(rows * inter, 2.0);
                let uv = rng.normal_vec(rows * inter, 1.0);
                let dv = rng.normal_vec(rows * inter, 1.0);
                let mut guv = Vec::new();
                for r in 0..rows {
                    guv.extend_from_slice(&gv[r * inter..(r + 1) * inter]);
                    guv.extend_from_slice(&uv[r * inter..(r + 1) * inter]);
                }
                let mut g = Tensor::from_f32_as(&[rows, inter], gv, dt).unwrap();
                let mut u = Tensor::from_f32_as(&[rows, inter], uv, dt).unwrap();
                let mut gu = Tensor::from_f32_as(&[2, rows / 2, 2 * inter], guv, dt).unwrap();
                let dy = Tensor::from_f32_as(&[rows, inter], dv, dt).unwrap();
                let y = gated_act_forward(&g, &u, act).unwrap();
                let yf = gated_act_forward_fused(&gu, act).unwrap();
                assert_eq!(yf.shape(), &[2, rows / 2, inter]);
                assert_eq!(yf.dtype(), dt);
                assert_eq!(y.to_f32_vec().unwrap(), yf.to_f32_vec().unwrap());
                let dy3 = dy.to_cpu().unwrap().reshape(&[2, rows / 2, inter]).unwrap();
                gated_act_backward(&dy, &mut g, &mut u, act).unwrap();
                gated_act_backward_fused(&dy3, &mut gu, act).unwrap();
                let (dg, du, dgu) = (
                    g.to_f32_vec().unwrap(),
                    u.to_f32_vec().unwrap(),
                    gu.to_f32_vec().unwrap(),
                );
                for r in 0..rows {
                    let row = &dgu[r * 2 * inter..(r + 1) * 2 * inter];
                    assert_eq!(&row[..inter], &dg[r * inter..(r + 1) * inter]);
                    assert_eq!(&row[inter..], &du[r * inter..(r + 1) * inter]);
                }
            }
        }
    }

    /// bf16: the activation is rounded to bf16 before the product (HF's act_fn output is a
    /// bf16 tensor), the product rounded again; the backward rounds dy * u before act'.
    #[test]
    fn bf16_rounds_where_hf_does() {
        let bf = |v: f32| half::bf16::from_f32(v).to_f32();
        let (gv, uv, dv) = (
            vec![0.7f32, -1.3, 2.9, 0.05],
            vec![1.7f32, 0.33, -2.2, 5.0],
            vec![0.9f32, -1.1, 0.37, 2.5],
        );
        let t = |v: &Vec<f32>| Tensor::from_f32_as(&[4], v.clone(), DType::BF16).unwrap();
        for act in ACTS {
            let (mut g, mut u, dy) = (t(&gv), t(&uv), t(&dv));
            let y = gated_act_forward(&g, &u, act)
                .unwrap()
                .to_f32_vec()
                .unwrap();
            let (gb, ub, db): (Vec<f32>, Vec<f32>, Vec<f32>) = (
                gv.iter().map(|&v| bf(v)).collect(),
                uv.iter().map(|&v| bf(v)).collect(),
                dv.iter().map(|&v| bf(v)).collect(),
            );
            for i in 0..4 {
                assert_eq!(y[i], bf(bf(act.apply(gb[i])) * ub[i]), "{act:?} y[{i}]");
            }
            gated_act_backward(&dy, &mut g, &mut u, act).unwrap();
            let (dg, du) = (g.to_f32_vec().unwrap(), u.to_f32_vec().unwrap());
            for i in 0..4 {
                assert_eq!(du[i], bf(db[i] * bf(act.apply(gb[i]))), "{act:?} du[{i}]");
                assert_eq!(
                    dg[i],
                    bf(bf(db[i] * ub[i]) * act.grad(gb[i])),
                    "{act:?} dg[{i}]"
                );
            }
        }
    }

    #[test]
    fn extreme_gates_stay_finite() {
        let g = Tensor::from_f32(&[4], vec![-200.0, -30.0, 30.0, 200.0]).unwrap();
        let u = Tensor::from_f32(&[4], vec![1.0; 4]).unwrap();
        for act in ACTS {
            let y = gated_act_forward(&g, &u, act)
                .unwrap()
                .to_f32_vec()
                .unwrap();
            assert!(y.iter().all(|v| v.is_finite()), "{act:?} {y:?}");
            assert!(
                y[0].abs() < 1e-6 && (y[3] - 200.0).abs() < 1e-3,
                "{act:?} {y:?}"
            );
            for x in [-200.0f32, -30.0, 30.0, 200.0] {
                assert!(act.grad(x).is_finite(), "{act:?} grad({x})");
            }
        }
    }

    #[test]
    fn bad_inputs_name_the_op_and_shapes() {
        let g = Tensor::from_f32(&[2, 4], vec![1.0; 8]).unwrap();
        let u = Tensor::from_f32(&[2, 5], vec![1.0; 10]).unwrap();
        let e = gated_act_forward(&g, &u, GatedAct::Silu)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("swiglu") && e.contains("[2, 5]") && e.contains("[2, 4]"),
            "{e}"
        );
        let ub = Tensor::from_f32_as(&[2, 4], vec![1.0; 8], DType::BF16).unwrap();
        let e = gated_act_forward(&g, &ub, GatedAct::GeluTanh)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("geglu") && e.contains("bf16"), "{e}");
        let ids = Tensor::from_i32(&[2, 4], vec![1; 8]).unwrap();
        let e = gated_act_forward(&ids, &ids, GatedAct::Silu)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("swiglu") && e.contains("i32"), "{e}");
        let (mut g2, mut u2) = (g.to_cpu().unwrap(), g.to_cpu().unwrap());
        let dy = Tensor::from_f32(&[3, 4], vec![1.0; 12]).unwrap();
        let e = gated_act_backward(&dy, &mut g2, &mut u2, GatedAct::Silu)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("dy") && e.contains("[3, 4]"), "{e}");
        let odd = Tensor::from_f32(&[2, 5], vec![1.0; 10]).unwrap();
        let e = gated_act_forward_fused(&odd, GatedAct::Silu)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("swiglu") && e.contains("[2, 5]"), "{e}");
        let mut gu = Tensor::from_f32(&[2, 8], vec![1.0; 16]).unwrap();
        let e = gated_act_backward_fused(&ub, &mut gu, GatedAct::GeluTanh)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("geglu") && e.contains("dy") && e.contains("bf16"),
            "{e}"
        );
        let dy8 = Tensor::from_f32(&[2, 8], vec![1.0; 16]).unwrap();
        let e = gated_act_backward_fused(&dy8, &mut gu, GatedAct::GeluTanh)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("geglu") && e.contains("[2, 8]") && e.contains("[2, 4]"),
            "{e}"
        );
    }
}
