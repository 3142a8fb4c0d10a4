//! LoRA on projections that share one input (q, k, v read the same normed x; gate and up
//! read the same normed x2), with the adapters' rank-r products batched across the group.
//!
//! Per member `p`: `y_p = x W_p^T (+ bias_p) + s_p (x A_p^T) B_p^T`, the same math as
//! [`crate::ops::lora_linear`], but the adapted members' A are stacked into one
//! `a_cat = [A_q; A_k; A_v]` (`[sum r, in]`) so that
//! - the forward forms every `x A_p^T` in ONE GEMM, `xa = x a_cat^T` (`[n, sum r]`), and
//!   each update `s_p xa_p B_p^T` reads its column block of `xa` (ld = sum r);
//! - the backward writes each `dxa_p = s_p dy_p B_p` into its column block of one
//!   `[n, sum r]` buffer and forms the whole adapter share of the input gradient in ONE
//!   GEMM, `dxa a_cat`, with the base GEMMs `dy_p W_p` accumulating onto one another
//!   (beta = 1); the rank-r GEMM goes first (write-only) or last, as [`rank_r_first`]
//!   orders a single projection's.
//!
//! As in `lora_linear`, each output starts with its rank-r term (write-only) and the base
//! GEMM adds onto it, so no rank-r GEMM reads and rewrites a full-size output. Ranks may
//! differ between members, and members without an adapter (plain projections) take part
//! with their base GEMMs only. `xa` is the group's saved activation: the per-member `[n, r_p]`
//! tensors it replaces have the same total size.
//!
//! Rounding (bf16 x): as `lora_linear` per member, `y_p = bf16(x W_p^T + bf16(bias_p +
//! s_p xa_p B_p^T))`; the input gradient rounds once per GEMM, e.g. `dx = bf16(dy_m W_m +
//! ... bf16(dy_1 W_1 + bf16(dxa a_cat)))` with the rank-r GEMM first. dA, dB are the per-member ones exactly. The
//! CPU reference runs the same GEMMs on the same blocks through the CPU GEMM.

use std::sync::Arc;

use crate::bench::{measure, BenchConfig, BenchRow, KernelBench};
use crate::check::{compare, random_pair, random_pair_par, CheckLine, GpuCheck};
use crate::cuda::Gpu;
use crate::error::{KernelError, Result};
use crate::ops::lora_linear::{
    as_dtype, lora_linear_backward, lora_linear_backward_accumulate, lora_linear_forward, output,
    rank_r_first, rows_of, with_last, LoraLinear,
};
use crate::ops::matmul::{gemm_cols, matmul_into, Cols};
use crate::rng::Rng;
use crate::{DType, Device, Tensor};

use super::{common_gpu, expect_dtype, expect_shape};

const OP: &str = "lora_group";

/// A member's adapter: its B `[out, r]` (f32 or bf16) and scaling. Its A is rows
/// `[offset, offset + r)` of the group's `a_cat`, members in order.
pub struct MemberAdapter<'a> {
    pub b: &'a Tensor,
    pub scaling: f32,
}

/// One projection of the group: `w [out, in]` and `bias` in x's dtype.
pub struct GroupMember<'a> {
    pub w: &'a Tensor,
    pub bias: Option<&'a Tensor>,
    pub adapter: Option<MemberAdapter<'a>>,
}

pub struct LoraGroup<'a> {
    /// The adapted members' A stacked in member order, `[sum r, in]`, f32 or bf16 (cast to
    /// x's dtype for the GEMMs when it is not already).
    pub a_cat: &'a Tensor,
    pub members: Vec<GroupMember<'a>>,
}

pub struct GroupForward {
    /// One output per member, `[.., out_p]`, x's dtype.
    pub ys: Vec<Tensor>,
    /// `x a_cat^T`, `[.., sum r]`, x's dtype: all the backward needs besides x.
    pub xa: Tensor,
}

/// The group's sizes: the in dim, per member its out dim, rank (0: no adapter) and first
/// column in `xa`, and the total rank.
pub(crate) struct Plan {
    pub inp: usize,
    pub outs: Vec<usize>,
    pub ranks: Vec<usize>,
    pub offsets: Vec<usize>,
    pub total: usize,
}

pub(crate) fn check_group(g: &LoraGroup, x: &Tensor) -> Result<Plan> {
    expect_dtype(OP, "x", x, &[DType::F32, DType::BF16])?;
    expect_dtype(OP, "a_cat", g.a_cat, &[DType::F32, DType::BF16])?;
    let inp = *x.shape().last().unwrap_or(&0);
    if g.members.is_empty() || inp == 0 {
        return Err(KernelError::shape(
            OP,
            format!("{} members, x {:?}", g.members.len(), x.shape()),
        ));
    }
    let mut plan = Plan {
        inp,
        outs: Vec::new(),
        ranks: Vec::new(),
        offsets: Vec::new(),
        total: 0,
    };
    for m in &g.members {
        expect_dtype(OP, "w", m.w, &[x.dtype()])?;
        if m.w.shape().len() != 2 || m.w.shape()[1] != inp || m.w.shape()[0] == 0 {
            return Err(KernelError::shape(
                OP,
                format!(
                    "w {:?} is not [out, {inp}] for x {:?}",
                    m.w.shape(),
                    x.shape()
                ),
            ));
        }
        let out = m.w.shape()[0];
        if let Some(bias) = m.bias {
            expect_dtype(OP, "bias", bias, &[x.dtype()])?;
            expect_shape(OP, "bias", bias, &[out])?;
        }
        let r = match &m.adapter {
            Some(ad) => {
                expect_dtype(OP, "b", ad.b, &[DType::F32, DType::BF16])?;
                let r = ad.b.shape().get(1).copied().unwrap_or(0);
                if r == 0 {
                    return Err(KernelError::shape(
                        OP,
                        format!("b {:?} is not [{out}, r] with r > 0", ad.b.shape()),
                    ));
                }
                expect_shape(OP, "b", ad.b, &[out, r])?;
                if !ad.scaling.is_finite() {
                    return Err(KernelError::invalid(
                        OP,
                        format!("scaling must be finite, got {}", ad.scaling),
                    ));
                }
                r
            }
            None => 0,
        };
        plan.outs.push(out);
        plan.ranks.push(r);
        plan.offsets.push(plan.total);
        plan.total += r;
    }
    if plan.total == 0 {
        return Err(KernelError::invalid(OP, "no member has an adapter"));
    }
    expect_shape(OP, "a_cat", g.a_cat, &[plan.total, inp])?;
    Ok(plan)
}

/// Every tensor of the group and `extra`, on one device (None: the CPU).
pub(crate) fn group_gpu(
    g: &LoraGroup,
    extra: &[(&'static str, &Tensor)],
) -> Result<Option<Arc<Gpu>>> {
    let mut all = vec![("a_cat", g.a_cat)];
    for m in &g.members {
        all.push(("w", m.w));
        all.extend(m.bias.map(|t| ("bias", t)));
        all.extend(m.adapter.as_ref().map(|ad| ("b", ad.b)));
    }
    all.extend_from_slice(extra);
    common_gpu(OP, &all)
}

/// Every member's `y_p = x W_p^T (+ bias_p) + s_p (x A_p^T) B_p^T`, with one GEMM for all
/// the `x A_p^T`; saves them as one `[.., sum r]` tensor.
pub fn lora_group_forward(g: &LoraGroup, x: &Tensor) -> Result<GroupForward> {
    let plan = check_group(g, x)?;
    let gpu = group_gpu(g, &[("x", x)])?;
    let dt = x.dtype();
    let mut xa = output(&gpu, &with_last(x, plan.total), dt)?;
    {
        let mut a_slot = None;
        let a = as_dtype(g.a_cat, dt, &mut a_slot)?;
        matmul_into(x, false, a, true, &mut xa, 1.0, 0.0)?;
    }
    let ys = member_outputs(g, &plan, &gpu, x, &xa)?;
    Ok(GroupForward { ys, xa })
}

/// Every member's output from the group's rank-r activation `xa` (member `p`'s columns
/// `offsets[p] .. + ranks[p]`, multiplied by its B with K = its rank): the base GEMM and
/// the update in [`rank_r_first`]'s order. Shared with the split path, whose `xa` and B
/// are the three-block splits.
pub(crate) fn member_outputs(
    g: &LoraGroup,
    plan: &Plan,
    gpu: &Option<Arc<Gpu>>,
    x: &Tensor,
    xa: &Tensor,
) -> Result<Vec<Tensor>> {
    let dt = x.dtype();
    let mut ys = Vec::with_capacity(g.members.len());
    for (i, m) in g.members.iter().enumerate() {
        let shape = with_last(x, plan.outs[i]);
        let (mut y, mut beta) = match m.bias {
            Some(bias) => (rows_of(gpu, bias, &shape)?, 1.0),
            None => (output(gpu, &shape, dt)?, 0.0),
        };
        // The same order as the per-projection op (see `rank_r_first`), so that the two
        // round alike.
        let lora_first = m.adapter.is_some() && rank_r_first(plan.outs[i], m.w.shape()[1]);
        if !lora_first {
            matmul_into(x, false, m.w, true, &mut y, 1.0, beta)?;
            beta = 1.0;
        }
        if let Some(ad) = &m.adapter {
            let mut b_slot = None;
            let b = as_dtype(ad.b, dt, &mut b_slot)?;
            let xa_p = Cols::of(xa, plan.offsets[i], plan.ranks[i]);
            gemm_cols(
                gpu,
                xa_p,
                false,
                Cols::all(b),
                true,
                &mut y,
                0,
                ad.scaling,
                beta,
            )?;
            beta = 1.0;
        }
        if lora_first {
            matmul_into(x, false, m.w, true, &mut y, 1.0, beta)?;
        }
        ys.push(y);
    }
    Ok(ys)
}

/// From every member's `dy_p [.., out_p]`: `dB_p += s_p dy_p^T xa_p` and
/// `dA_p += (s_p dy_p B_p)^T x` (f32, accumulated; `grads` holds `(dA, dB)` of the adapted
/// members in order), and returns `dx = sum_p dy_p W_p + sum_p (s_p dy_p B_p) A_p`.
pub fn lora_group_backward(
    g: &LoraGroup,
    dys: &[&Tensor],
    x: &Tensor,
    xa: &Tensor,
    grads: &mut [(&mut Tensor, &mut Tensor)],
) -> Result<Tensor> {
    let (plan, gpu) = check_backward(g, dys, x, xa, grads, 1)?;
    let dt = x.dtype();

    let mut dxa = output(&gpu, &with_last(x, plan.total), dt)?;
    let mut grads = grads.iter_mut();
    for (i, m) in g.members.iter().enumerate() {
        let Some(ad) = &m.adapter else { continue };
        let (da, db) = grads.next().expect("counted above");
        let (c0, r, s) = (plan.offsets[i], plan.ranks[i], ad.scaling);
        let dy = Cols::all(dys[i]);
        gemm_cols(&gpu, dy, true, Cols::of(xa, c0, r), false, db, 0, s, 1.0)?;
        {
            let mut b_slot = None;
            let b = as_dtype(ad.b, dt, &mut b_slot)?;
            gemm_cols(&gpu, dy, false, Cols::all(b), false, &mut dxa, c0, s, 0.0)?;
        }
        let dxa_p = Cols::of(&dxa, c0, r);
        gemm_cols(&gpu, dxa_p, true, Cols::all(x), false, da, 0, 1.0, 1.0)?;
    }
    let mut a_slot = None;
    let a = as_dtype(g.a_cat, dt, &mut a_slot)?;
    group_input_grad(g, &plan, &gpu, dys, x, &dxa, a)
}

/// `dx = dxa a_cat + sum_p dy_p W_p`: the adapters' share in one GEMM and the base GEMMs,
/// each accumulating onto the last, in the order [`rank_r_first`] picks for the widest
/// member: the rank-r GEMM written first where dx is wider than the base reductions; else
/// the first base GEMM writes dx and the rank-r GEMM adds last (a base GEMM with K = 14336
/// pays ~50 us on the H100 for reading its beta, so gate/up keep one such read, not two).
pub(crate) fn group_input_grad(
    g: &LoraGroup,
    plan: &Plan,
    gpu: &Option<Arc<Gpu>>,
    dys: &[&Tensor],
    x: &Tensor,
    dxa: &Tensor,
    a_cat: &Tensor,
) -> Result<Tensor> {
    let mut dx = output(gpu, x.shape(), x.dtype())?;
    let widest = plan.outs.iter().copied().max().unwrap_or(0);
    let lora_first = rank_r_first(plan.inp, widest);
    let mut beta = 0.0;
    if lora_first {
        matmul_into(dxa, false, a_cat, false, &mut dx, 1.0, beta)?;
        beta = 1.0;
    }
    for (m, dy) in g.members.iter().zip(dys) {
        matmul_into(dy, false, m.w, false, &mut dx, 1.0, beta)?;
        beta = 1.0;
    }
    if !lora_first {
        matmul_into(dxa, false, a_cat, false, &mut dx, 1.0, 1.0)?;
    }
    Ok(dx)
}

/// The backward's inputs checked against the group (`xa` `[.., total]` in x's dtype, one
/// dy per member, one (dA, dB) per adapter); the plan and the GPU (None: the CPU). With
/// `blocks = 3` the group holds splits (B `[out, 3r]`, xa `[.., 3 sum r]`) and each
/// adapter's rank is a third of its plan width.
pub(crate) fn check_backward(
    g: &LoraGroup,
    dys: &[&Tensor],
    x: &Tensor,
    xa: &Tensor,
    grads: &[(&mut Tensor, &mut Tensor)],
    blocks: usize,
) -> Result<(Plan, Option<Arc<Gpu>>)> {
    let plan = check_group(g, x)?;
    let dt = x.dtype();
    let adapted = plan.ranks.iter().filter(|&&r| r > 0).count();
    if dys.len() != g.members.len() || grads.len() != adapted {
        return Err(KernelError::invalid(
            OP,
            format!(
                "{} members with {adapted} adapters, given {} dy and {} (dA, dB)",
                g.members.len(),
                dys.len(),
                grads.len()
            ),
        ));
    }
    let mut extra = vec![("x", x), ("xa", xa)];
    for (i, dy) in dys.iter().enumerate() {
        expect_dtype(OP, "dy", dy, &[dt])?;
        expect_shape(OP, "dy", dy, &with_last(x, plan.outs[i]))?;
        extra.push(("dy", dy));
    }
    expect_dtype(OP, "xa", xa, &[dt])?;
    expect_shape(OP, "xa", xa, &with_last(x, plan.total))?;
    let mut grad_i = 0;
    for (i, &r) in plan.ranks.iter().enumerate() {
        if r == 0 {
            continue;
        }
        let (da, db) = &grads[grad_i];
        grad_i += 1;
        let r = r / blocks;
        expect_dtype(OP, "da", da, &[DType::F32])?;
        expect_shape(OP, "da", da, &[r, plan.inp])?;
        expect_dtype(OP, "db", db, &[DType::F32])?;
        expect_shape(OP, "db", db, &[plan.outs[i], r])?;
    }
    for (da, db) in grads.iter() {
        extra.push(("da", da));
        extra.push(("db", db));
    }
    let gpu = group_gpu(g, &extra)?;
    drop(extra);
    Ok((plan, gpu))
}

/// `[sum rows, cols]` of `dtype` holding `parts` (2-D, one column count) stacked in order:
/// a group's `a_cat` when no stacked compute copy was made beforehand (evaluation, f32).
/// On the GPU parts of one dtype are copied into place and the stack is cast once (no
/// chunk table to upload, no synchronisation); mixed dtypes are cast part by part.
pub fn stack_rows(parts: &[&Tensor], dtype: DType) -> Result<Tensor> {
    const STACK: &str = "lora_group_stack";
    let cols = parts
        .first()
        .map(|t| t.shape().get(1).copied().unwrap_or(0))
        .unwrap_or(0);
    let mut rows = 0;
    let mut named = Vec::new();
    for t in parts {
        expect_dtype(STACK, "part", t, &[DType::F32, DType::BF16])?;
        if t.shape().len() != 2 || t.shape()[1] != cols {
            return Err(KernelError::shape(
                STACK,
                format!("part {:?} is not [rows, {cols}]", t.shape()),
            ));
        }
        rows += t.shape()[0];
        named.push(("part", *t));
    }
    let shape = [rows, cols];
    let Some(gpu) = common_gpu(STACK, &named)? else {
        let vals: Vec<f32> = parts
            .iter()
            .flat_map(|t| t.cpu_f32().into_owned())
            .collect();
        return Tensor::from_f32_as(&shape, vals, dtype);
    };
    let one_dtype = parts.iter().all(|t| t.dtype() == parts[0].dtype());
    let stack_dtype = if one_dtype && !parts.is_empty() {
        parts[0].dtype()
    } else {
        dtype
    };
    let out = Tensor::uninit_cuda(&gpu, &shape, stack_dtype)?;
    let size = stack_dtype.size_in_bytes();
    let mut offset = 0;
    for t in parts {
        let mut slot = None;
        let src = as_dtype(t, stack_dtype, &mut slot)?;
        let dst = out.dptr() + (offset * size) as u64;
        gpu.copy_dtod_raw(src.dptr(), dst, src.elem_count() * size)?;
        offset += t.elem_count();
    }
    if stack_dtype == dtype {
        Ok(out)
    } else {
        crate::ops::elementwise::cast(&out, dtype)
    }
}

pub const CHECK: GpuCheck = GpuCheck {
    op: OP,
    run: gpu_check,
};

/// One group: its members' out dims and ranks (0: no adapter), the dtype of x, and the dtype
/// of A and B (bf16: the training step's compute copies; f32: cast at use).
struct Case {
    n: usize,
    inp: usize,
    outs: &'static [usize],
    ranks: &'static [usize],
    dt: DType,
    ab: DType,
    bias: bool,
    what: &'static str,
}

/// CPU and GPU copies of one group's tensors.
struct Side {
    ws: Vec<Tensor>,
    biases: Vec<Tensor>,
    bs: Vec<Option<Tensor>>,
    a_cat: Tensor,
}

impl Side {
    fn group(&self, bias: bool, scalings: &[f32]) -> LoraGroup<'_> {
        LoraGroup {
            a_cat: &self.a_cat,
            members: self
                .ws
                .iter()
                .zip(&self.biases)
                .zip(&self.bs)
                .zip(scalings)
                .map(|(((w, b), bm), &scaling)| GroupMember {
                    w,
                    bias: bias.then_some(b),
                    adapter: bm.as_ref().map(|b| MemberAdapter { b, scaling }),
                })
                .collect(),
        }
    }
}

fn check_case(gpu: &Arc<Gpu>, rng: &mut Rng, c: &Case) -> Result<Vec<CheckLine>> {
    let (n, inp, dt) = (c.n, c.inp, c.dt);
    let dev = Device::Cuda(gpu.clone());
    let case = format!(
        "{dt} n={n} {inp}->{:?} r={:?} ab={}{} ({})",
        c.outs,
        c.ranks,
        c.ab,
        if c.bias { " bias" } else { "" },
        c.what
    );
    let (x, gx) = random_pair_par(gpu, rng, &[n, inp], dt, 1.0)?;
    let (mut cpu, mut dev_side) = (Vec::new(), Vec::new());
    let (mut dys, mut gdys) = (Vec::new(), Vec::new());
    let (mut grads, mut ggrads) = (Vec::new(), Vec::new());
    let (mut a_parts, mut ga_parts) = (Vec::new(), Vec::new());
    for (&out, &r) in c.outs.iter().zip(c.ranks) {
        let w = random_pair_par(gpu, rng, &[out, inp], dt, 1.0 / (inp as f32).sqrt())?;
        let bias = random_pair(gpu, rng, &[out], dt, 1.0)?;
        let b = if r > 0 {
            let (a, ga) = random_pair(gpu, rng, &[r, inp], DType::F32, 1.0 / (inp as f32).sqrt())?;
            a_parts.push(a);
            ga_parts.push(ga);
            let (da, gda) = random_pair(gpu, rng, &[r, inp], DType::F32, 1.0)?;
            let (db, gdb) = random_pair(gpu, rng, &[out, r], DType::F32, 1.0)?;
            grads.push((da, db));
            ggrads.push((gda, gdb));
            let (b, gb) = random_pair(gpu, rng, &[out, r], c.ab, 1.0 / (r as f32).sqrt())?;
            (Some(b), Some(gb))
        } else {
            (None, None)
        };
        let (dy, gdy) = random_pair_par(gpu, rng, &[n, out], dt, 1.0)?;
        dys.push(dy);
        gdys.push(gdy);
        cpu.push((w.0, bias.0, b.0));
        dev_side.push((w.1, bias.1, b.1));
    }
    // The stacked A from f32 parts, both sides: exact (a cast or a copy).
    let a_cat = stack_rows(&a_parts.iter().collect::<Vec<_>>(), c.ab)?;
    let ga_cat = stack_rows(&ga_parts.iter().collect::<Vec<_>>(), c.ab)?;
    let mut lines = vec![crate::check::compare_with_tol(
        OP,
        &case,
        "a_cat(stacked)",
        &ga_cat,
        &a_cat,
        f64::MIN_POSITIVE,
    )?];
    let split = |v: Vec<(Tensor, Tensor, Option<Tensor>)>, a_cat: Tensor| {
        let mut s = Side {
            ws: Vec::new(),
            biases: Vec::new(),
            bs: Vec::new(),
            a_cat,
        };
        for (w, bias, b) in v {
            s.ws.push(w);
            s.biases.push(bias);
            s.bs.push(b);
        }
        s
    };
    let (cpu, dev_side) = (split(cpu, a_cat), split(dev_side, ga_cat));
    let scalings: Vec<f32> = (0..c.outs.len()).map(|i| 2.0 - 0.5 * i as f32).collect();
    let (g, gg) = (
        cpu.group(c.bias, &scalings),
        dev_side.group(c.bias, &scalings),
    );
    let f = lora_group_forward(&g, &x)?;
    let gf = lora_group_forward(&gg, &gx)?;
    for (i, (gy, y)) in gf.ys.iter().zip(&f.ys).enumerate() {
        lines.push(compare(OP, &case, &format!("y{i}"), gy, y)?);
    }
    lines.push(compare(OP, &case, "xa", &gf.xa, &f.xa)?);
    // The backward on both sides reads the reference's xa, so that dB compares at the f32
    // tolerance (a 1-ulp flip in the forward's bf16 xa belongs to the forward's line).
    let ref_xa = f.xa.to_device(&dev)?;
    let dy_refs: Vec<&Tensor> = dys.iter().collect();
    let gdy_refs: Vec<&Tensor> = gdys.iter().collect();
    let mut grad_refs: Vec<(&mut Tensor, &mut Tensor)> =
        grads.iter_mut().map(|(a, b)| (a, b)).collect();
    let mut ggrad_refs: Vec<(&mut Tensor, &mut Tensor)> =
        ggrads.iter_mut().map(|(a, b)| (a, b)).collect();
    let dx = lora_group_backward(&g, &dy_refs, &x, &f.xa, &mut grad_refs)?;
    let gdx = lora_group_backward(&gg, &gdy_refs, &gx, &ref_xa, &mut ggrad_refs)?;
    lines.push(compare(OP, &case, "dx", &gdx, &dx)?);
    for (i, ((gda, gdb), (da, db))) in ggrads.iter().zip(&grads).enumerate() {
        lines.push(compare(OP, &case, &format!("dB{i}"), gdb, db)?);
        // dA = dxa^T x with dxa = s dy B stored in bf16: cuBLAS and the CPU sum dy B in
        // different orders, so a few dxa elements round to the neighbouring bf16 value;
        // each flip moves dA by ~1e-4 relative at these sizes (as in lora_linear's check).
        let mut l = compare(OP, &case, &format!("dA{i}"), gda, da)?;
        if dt == DType::BF16 {
            l.tol = 1e-3;
            l.pass = l.rel_err < l.tol;
        }
        lines.push(l);
    }
    Ok(lines)
}

fn gpu_check(gpu: &Arc<Gpu>, rng: &mut Rng) -> Result<Vec<CheckLine>> {
    let (bf, f32_) = (DType::BF16, DType::F32);
    #[rustfmt::skip]
    let cases = [
        Case { n: 37, inp: 100, outs: &[77, 50, 50], ranks: &[5, 0, 3], dt: f32_, ab: f32_, bias: true, what: "odd, f32, a plain member" },
        Case { n: 129, inp: 260, outs: &[190, 64, 64], ranks: &[16, 8, 4], dt: bf, ab: f32_, bias: true, what: "odd, mixed ranks, bias" },
        Case { n: 61, inp: 333, outs: &[555, 111], ranks: &[0, 7], dt: bf, ab: bf, bias: false, what: "odd, adapter on the last member only" },
        Case { n: 300, inp: 4096, outs: &[4096, 1024, 1024], ranks: &[16, 16, 16], dt: bf, ab: bf, bias: false, what: "Llama-3-8B q/k/v" },
        Case { n: 300, inp: 4096, outs: &[14336, 14336], ranks: &[16, 16], dt: bf, ab: bf, bias: false, what: "Llama-3-8B gate/up" },
    ];
    let mut lines = Vec::new();
    for c in &cases {
        lines.extend(check_case(gpu, rng, c)?);
    }
    // stack_rows from parts already in the target dtype (copies only) and from mixed
    // dtypes (cast part by part): exact.
    let (p1, g1) = random_pair(gpu, rng, &[16, 4096], bf, 0.02)?;
    let (p2, g2) = random_pair(gpu, rng, &[8, 4096], f32_, 0.02)?;
    let (p3, g3) = random_pair(gpu, rng, &[5, 4096], bf, 0.02)?;
    for (parts, gparts, what) in [
        ([&p1, &p3], [&g1, &g3], "bf16 parts -> bf16"),
        ([&p1, &p2], [&g1, &g2], "bf16 + f32 parts -> bf16"),
    ] {
        let want = stack_rows(&parts, bf)?;
        let got = stack_rows(&gparts, bf)?;
        lines.push(crate::check::compare_with_tol(
            OP,
            &format!("stack_rows {what}"),
            "stack",
            &got,
            &want,
            f64::MIN_POSITIVE,
        )?);
    }
    Ok(lines)
}

pub const BENCH: KernelBench = KernelBench { op: OP, run: bench };

/// 8192 tokens, bf16, Llama-3-8B q/k/v (4096 -> 4096, 1024, 1024) and gate/up (4096 ->
/// 14336 x 2), r = 16, bf16 A/B (the step's compute copies): forward + backward (dx, dA,
/// dB) of the group against the same projections through `lora_linear` one by one (the
/// input gradient accumulated, as the layer did before grouping).
fn bench(gpu: &Arc<Gpu>, cfg: &BenchConfig) -> Result<Vec<BenchRow>> {
    let (n, inp, r) = (8192, 4096, 16);
    let mut rows = Vec::new();
    for (outs, name) in [
        (&[4096, 1024, 1024][..], "qkv"),
        (&[14336, 14336][..], "gate_up"),
    ] {
        let mut rng = Rng::new(19);
        let mut input = |shape: &[usize], dt: DType, std: f32| -> Result<Tensor> {
            random_pair_par(gpu, &mut rng, shape, dt, std).map(|(_, d)| d)
        };
        let x = input(&[n, inp], DType::BF16, 1.0)?;
        let mut ws = Vec::new();
        let mut a_s = Vec::new();
        let mut bs = Vec::new();
        let mut dys = Vec::new();
        let mut grads = Vec::new();
        for &out in outs {
            ws.push(input(&[out, inp], DType::BF16, 0.02)?);
            a_s.push(input(&[r, inp], DType::BF16, 0.02)?);
            bs.push(input(&[out, r], DType::BF16, 0.02)?);
            dys.push(input(&[n, out], DType::BF16, 1.0)?);
            grads.push((
                input(&[r, inp], DType::F32, 1.0)?,
                input(&[out, r], DType::F32, 1.0)?,
            ));
        }
        let a_cat = stack_rows(&a_s.iter().collect::<Vec<_>>(), DType::BF16)?;
        let group = LoraGroup {
            a_cat: &a_cat,
            members: ws
                .iter()
                .zip(&bs)
                .map(|(w, b)| GroupMember {
                    w,
                    bias: None,
                    adapter: Some(MemberAdapter { b, scaling: 2.0 }),
                })
                .collect(),
        };
        let total_out: usize = outs.iter().sum();
        let (nf, i, o, rf) = (n as f64, inp as f64, total_out as f64, r as f64);
        let flops = 4.0 * nf * i * o + 6.0 * nf * rf * (outs.len() as f64 * i + o);
        let shape = format!("{n}x{inp}->{outs:?} r={r} bf16");
        let op = format!("{OP}_{name}");
        let dy_refs: Vec<&Tensor> = dys.iter().collect();
        rows.push(measure(
            gpu,
            cfg,
            &op,
            "grouped",
            &shape,
            0.0,
            flops,
            || {
                let f = lora_group_forward(&group, &x)?;
                let mut g: Vec<(&mut Tensor, &mut Tensor)> =
                    grads.iter_mut().map(|(a, b)| (a, b)).collect();
                lora_group_backward(&group, &dy_refs, &x, &f.xa, &mut g)?;
                Ok(())
            },
        )?);
        rows.push(measure(
            gpu,
            cfg,
            &op,
            "per-projection",
            &shape,
            0.0,
            flops,
            || {
                let layers: Vec<LoraLinear> = ws
                    .iter()
                    .zip(&a_s)
                    .zip(&bs)
                    .map(|((w, a), b)| LoraLinear {
                        w,
                        bias: None,
                        a,
                        b,
                        scaling: 2.0,
                        split: None,
                    })
                    .collect();
                let fs = layers
                    .iter()
                    .map(|l| lora_linear_forward(l, &x, None))
                    .collect::<Result<Vec<_>>>()?;
                let mut dx = None;
                for ((l, f), (dy, (da, db))) in
                    layers.iter().zip(&fs).zip(dys.iter().zip(grads.iter_mut()))
                {
                    match &mut dx {
                        None => dx = lora_linear_backward(l, dy, &x, &f.xa, da, db, true)?,
                        Some(acc) => {
                            lora_linear_backward_accumulate(l, dy, &x, &f.xa, da, db, acc)?
                        }
                    }
                }
                Ok(())
            },
        )?);
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::lora_linear::lora_linear_backward_accumulate;
    use crate::ops::matmul::cpu_matmul;

    struct Member {
        w: Tensor,
        bias: Tensor,
        ab: Option<(Tensor, Tensor)>,
        scaling: f32,
    }

    fn members(
        rng: &mut Rng,
        inp: usize,
        outs: &[usize],
        ranks: &[usize],
        dt: DType,
    ) -> Vec<Member> {
        outs.iter()
            .zip(ranks)
            .enumerate()
            .map(|(i, (&out, &r))| {
                let t = |shape: &[usize], v: Vec<f32>, d: DType| {
                    Tensor::from_f32_as(shape, v, d).unwrap()
                };
                Member {
                    w: t(&[out, inp], rng.normal_vec(out * inp, 0.3), dt),
                    bias: t(&[out], rng.normal_vec(out, 1.0), dt),
                    ab: (r > 0).then(|| {
                        (
                            t(&[r, inp], rng.normal_vec(r * inp, 0.3), DType::F32),
                            t(&[out, r], rng.normal_vec(out * r, 0.5), DType::F32),
                        )
                    }),
                    scaling: 1.5 - 0.25 * i as f32,
                }
            })
            .collect()
    }

    fn group<'a>(ms: &'a [Member], a_cat: &'a Tensor, bias: bool) -> LoraGroup<'a> {
        LoraGroup {
            a_cat,
            members: ms
                .iter()
                .map(|m| GroupMember {
                    w: &m.w,
                    bias: bias.then_some(&m.bias),
                    adapter: m.ab.as_ref().map(|(_, b)| MemberAdapter {
                        b,
                        scaling: m.scaling,
                    }),
                })
                .collect(),
        }
    }

    fn a_cat(ms: &[Member]) -> Tensor {
        let parts: Vec<&Tensor> = ms
            .iter()
            .filter_map(|m| m.ab.as_ref().map(|ab| &ab.0))
            .collect();
        stack_rows(&parts, DType::F32).unwrap()
    }

    /// The group gives every member's `lora_linear` output (a plain member its `x W^T +
    /// bias`), the per-member xa as column blocks of its one xa, and the same dA and dB;
    /// its dx is the sum of the members' input gradients. f32 and bf16, mixed ranks,
    /// a member without an adapter, with and without bias, leading dims.
    #[test]
    fn group_matches_the_projections_one_by_one() {
        let mut rng = Rng::new(31);
        let (bsz, seq, inp) = (2, 3, 12);
        let n = bsz * seq;
        let outs = [10, 6, 6];
        let ranks = [3, 0, 2];
        for (dt, bias) in [(DType::F32, false), (DType::F32, true), (DType::BF16, true)] {
            let ms = members(&mut rng, inp, &outs, &ranks, dt);
            let a_cat = a_cat(&ms);
            let g = group(&ms, &a_cat, bias);
            let x =
                Tensor::from_f32_as(&[bsz, seq, inp], rng.normal_vec(n * inp, 1.0), dt).unwrap();
            let f = lora_group_forward(&g, &x).unwrap();
            assert_eq!(f.xa.shape(), &[bsz, seq, 5]);
            let xa = f.xa.to_f32_vec().unwrap();
            let mut col = 0;
            let dys: Vec<Tensor> = outs
                .iter()
                .map(|&o| {
                    Tensor::from_f32_as(&[bsz, seq, o], rng.normal_vec(n * o, 1.0), dt).unwrap()
                })
                .collect();
            let zeros = |s: &[usize]| Tensor::zeros(s, DType::F32, &Device::Cpu).unwrap();
            let mut want_dx: Option<Tensor> = None;
            let mut want_grads = Vec::new();
            for (i, m) in ms.iter().enumerate() {
                let y = f.ys[i].to_f32_vec().unwrap();
                let Some((a, b)) = &m.ab else {
                    let mut want = crate::ops::matmul::matmul(&x, false, &m.w, true, dt).unwrap();
                    if bias {
                        let base = want.to_f32_vec().unwrap();
                        let bv = m.bias.to_f32_vec().unwrap();
                        let v = base
                            .iter()
                            .enumerate()
                            .map(|(e, &p)| p + bv[e % outs[i]])
                            .collect();
                        want = Tensor::from_f32_as(want.shape(), v, dt).unwrap();
                    }
                    if dt == DType::F32 || !bias {
                        assert!(crate::check::rel_err(&y, &want.to_f32_vec().unwrap()) < 1e-6);
                    }
                    match &mut want_dx {
                        None => {
                            want_dx = Some(
                                crate::ops::matmul::matmul(&dys[i], false, &m.w, false, dt)
                                    .unwrap(),
                            )
                        }
                        Some(acc) => {
                            matmul_into(&dys[i], false, &m.w, false, acc, 1.0, 1.0).unwrap()
                        }
                    }
                    continue;
                };
                let layer = LoraLinear {
                    w: &m.w,
                    bias: bias.then_some(&m.bias),
                    a,
                    b,
                    scaling: m.scaling,
                    split: None,
                };
                let one = lora_linear_forward(&layer, &x, None).unwrap();
                assert_eq!(y, one.y.to_f32_vec().unwrap(), "member {i} {dt}");
                let r = a.shape()[0];
                let block: Vec<f32> = xa
                    .chunks(5)
                    .flat_map(|row| row[col..col + r].to_vec())
                    .collect();
                assert_eq!(block, one.xa.to_f32_vec().unwrap());
                col += r;
                let (mut da, mut db) = (zeros(&[r, inp]), zeros(&[outs[i], r]));
                match &mut want_dx {
                    None => {
                        want_dx = lora_linear_backward(
                            &layer, &dys[i], &x, &one.xa, &mut da, &mut db, true,
                        )
                        .unwrap();
                    }
                    Some(acc) => {
                        lora_linear_backward_accumulate(
                            &layer, &dys[i], &x, &one.xa, &mut da, &mut db, acc,
                        )
                        .unwrap();
                    }
                }
                want_grads.push((da, db));
            }
            let mut grads: Vec<(Tensor, Tensor)> = want_grads
                .iter()
                .map(|(da, db)| (zeros(da.shape()), zeros(db.shape())))
                .collect();
            let mut grad_refs: Vec<(&mut Tensor, &mut Tensor)> =
                grads.iter_mut().map(|(a, b)| (a, b)).collect();
            let dy_refs: Vec<&Tensor> = dys.iter().collect();
            let dx = lora_group_backward(&g, &dy_refs, &x, &f.xa, &mut grad_refs).unwrap();
            assert_eq!(dx.shape(), x.shape());
            for ((da, db), (wa, wb)) in grads.iter().zip(&want_grads) {
                assert_eq!(da.to_f32_vec().unwrap(), wa.to_f32_vec().unwrap());
                assert_eq!(db.to_f32_vec().unwrap(), wb.to_f32_vec().unwrap());
            }
            // The same sum rounded at other places: f32 to its precision, bf16 to a few ulps.
            let tol = if dt == DType::F32 { 1e-6 } else { 1e-2 };
            let err = crate::check::rel_err(
                &dx.to_f32_vec().unwrap(),
                &want_dx.unwrap().to_f32_vec().unwrap(),
            );
            assert!(err < tol, "{dt} bias={bias}: dx {err}");
        }
    }

    /// In bf16 the input gradient is the adapters' share rounded once, then each base
    /// product added with one rounding: `bf16(dy_2 W_2 + bf16(dy_1 W_1 + bf16(dxa a_cat)))`.
    #[test]
    fn bf16_input_gradient_rounds_the_adapter_share_first() {
        let mut rng = Rng::new(32);
        let (n, inp) = (7, 16);
        let outs = [8, 5];
        let ms = members(&mut rng, inp, &outs, &[2, 3], DType::BF16);
        let a_cat = stack_rows(
            &ms.iter()
                .map(|m| &m.ab.as_ref().unwrap().0)
                .collect::<Vec<_>>(),
            DType::BF16,
        )
        .unwrap();
        let g = group(&ms, &a_cat, false);
        let x = Tensor::from_f32_as(&[n, inp], rng.normal_vec(n * inp, 1.0), DType::BF16).unwrap();
        let f = lora_group_forward(&g, &x).unwrap();
        let dys: Vec<Tensor> = outs
            .iter()
            .map(|&o| {
                Tensor::from_f32_as(&[n, o], rng.normal_vec(n * o, 1.0), DType::BF16).unwrap()
            })
            .collect();
        let mut grads: Vec<(Tensor, Tensor)> = ms
            .iter()
            .map(|m| {
                let (a, b) = m.ab.as_ref().unwrap();
                (
                    Tensor::zeros(a.shape(), DType::F32, &Device::Cpu).unwrap(),
                    Tensor::zeros(b.shape(), DType::F32, &Device::Cpu).unwrap(),
                )
            })
            .collect();
        let mut grad_refs: Vec<(&mut Tensor, &mut Tensor)> =
            grads.iter_mut().map(|(a, b)| (a, b)).collect();
        let dx = lora_group_backward(&g, &[&dys[0], &dys[1]], &x, &f.xa, &mut grad_refs).unwrap();
        let round = |v: Vec<f32>| -> Vec<f32> {
            v.into_iter()
                .map(|e| half::bf16::from_f32(e).to_f32())
                .collect()
        };
        let vals = |t: &Tensor| t.to_f32_vec().unwrap();
        let mut dxa = vec![0.0f32; n * 5];
        let mut col = 0;
        for (m, dy) in ms.iter().zip(&dys) {
            let (_, b) = m.ab.as_ref().unwrap();
            let (out, r) = (b.shape()[0], b.shape()[1]);
            let bv = round(vals(b));
            let p = round(
                cpu_matmul(&vals(dy), false, &bv, false, n, r, out)
                    .iter()
                    .map(|e| m.scaling * e)
                    .collect(),
            );
            for t in 0..n {
                dxa[t * 5 + col..t * 5 + col + r].copy_from_slice(&p[t * r..(t + 1) * r]);
            }
            col += r;
        }
        let mut want = round(cpu_matmul(&dxa, false, &vals(&a_cat), false, n, inp, 5));
        for (m, dy) in ms.iter().zip(&dys) {
            let out = m.w.shape()[0];
            let base = cpu_matmul(&vals(dy), false, &vals(&m.w), false, n, inp, out);
            want = round(base.iter().zip(&want).map(|(b, w)| b + w).collect());
        }
        assert_eq!(vals(&dx), want);
    }

    #[test]
    fn stack_rows_stacks_and_rounds() {
        let a = Tensor::from_f32(&[2, 3], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap();
        let b = Tensor::from_f32(&[1, 3], vec![1.001, 8.0, 9.0]).unwrap();
        let s = stack_rows(&[&a, &b], DType::BF16).unwrap();
        assert_eq!((s.shape(), s.dtype()), (&[3, 3][..], DType::BF16));
        let want: Vec<f32> = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 1.001, 8.0, 9.0]
            .iter()
            .map(|&v| half::bf16::from_f32(v).to_f32())
            .collect();
        assert_eq!(s.to_f32_vec().unwrap(), want);
        let c = Tensor::from_f32(&[1, 4], vec![0.0; 4]).unwrap();
        let e = stack_rows(&[&a, &c], DType::F32).unwrap_err().to_string();
        assert!(
            e.contains("lora_group_stack") && e.contains("[1, 4]"),
            "{e}"
        );
    }

    #[test]
    fn bad_groups_are_named_errors() {
        let mut rng = Rng::new(33);
        let ms = members(&mut rng, 6, &[4, 3], &[2, 2], DType::F32);
        let x = Tensor::from_f32(&[5, 6], rng.normal_vec(30, 1.0)).unwrap();
        // a_cat with the wrong number of rows.
        let short = Tensor::from_f32(&[3, 6], vec![0.1; 18]).unwrap();
        let e = lora_group_forward(&group(&ms, &short, false), &x)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("lora_group") && e.contains("a_cat") && e.contains("[4, 6]"),
            "{e}"
        );
        // No adapter at all.
        let plain = members(&mut rng, 6, &[4], &[0], DType::F32);
        let e = lora_group_forward(&group(&plain, &short, false), &x)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("no member has an adapter"), "{e}");
        // Backward with a missing (dA, dB) pair and with a wrong dy.
        let a_cat = a_cat(&ms);
        let g = group(&ms, &a_cat, false);
        let f = lora_group_forward(&g, &x).unwrap();
        let dys = [
            Tensor::from_f32(&[5, 4], vec![1.0; 20]).unwrap(),
            Tensor::from_f32(&[5, 3], vec![1.0; 15]).unwrap(),
        ];
        let (mut da, mut db) = (
            Tensor::zeros(&[2, 6], DType::F32, &Device::Cpu).unwrap(),
            Tensor::zeros(&[4, 2], DType::F32, &Device::Cpu).unwrap(),
        );
        let e = lora_group_backward(
            &g,
            &[&dys[0], &dys[1]],
            &x,
            &f.xa,
            &mut [(&mut da, &mut db)],
        )
        .err()
        .unwrap()
        .to_string();
        assert!(e.contains("2 adapters") && e.contains("1 (dA, dB)"), "{e}");
        let (mut da2, mut db2) = (
            Tensor::zeros(&[2, 6], DType::F32, &Device::Cpu).unwrap(),
            Tensor::zeros(&[3, 2], DType::F32, &Device::Cpu).unwrap(),
        );
        let e = lora_group_backward(
            &g,
            &[&dys[1], &dys[1]],
            &x,
            &f.xa,
            &mut [(&mut da, &mut db), (&mut da2, &mut db2)],
        )
        .err()
        .unwrap()
        .to_string();
        assert!(e.contains("dy") && e.contains("[5, 3]"), "{e}");
    }
}
