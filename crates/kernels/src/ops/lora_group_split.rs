//! The grouped LoRA op ([`crate::ops::lora_group`]: projections that share one input, their
//! rank-r products batched) with the adapter path fp32-accurate through bf16 hi/lo splits
//! ([`crate::ops::lora_split`]), as the per-projection op computes it with
//! [`crate::ops::lora_linear::LoraLinear::split`].
//!
//! The group holds [`GroupSplits`]: the adapted members' `[A_hi; A_lo; A_hi]` stacked
//! (`a3_cat`, `[3 m r, in]`) and each member's `[B_hi | B_hi | B_lo]` (`[out, 3r]`). All
//! adapted members have one rank r, so that the group's rank-r activations `[n, m, 3, r]`
//! are split in one launch as `[n m, 3, r]`.
//!
//! Forward: `P = x a3_cat^T` (one GEMM, f32 `[n, 3mr]`), split into `xa3` (blocks 0 + 1 of
//! each member: `x A`), then per member the base GEMM and the update `s xa3_p b3_p^T` as the
//! plain grouped op orders them. Backward: per member `T_p = dy_p^T [xa_hi | xa_lo]` (for dB)
//! and `Q_p = s_p dy_p [B_hi | B_lo]` into its columns of one f32 `[n, 2mr]` buffer (the two
//! blocks of each split that differ, 2r wide rather than 3r); one split of all of Q (`s dy B`); one GEMM `D3^T x` for every dA; every dA and dB fold in one
//! launch ([`fold_multi`]); then `dx = D3 a3_cat + sum_p dy_p W_p`, one rank-r GEMM and
//! the base GEMMs in the plain grouped op's order. Per group that is one A GEMM, one split and one fold launch where the
//! per-projection path has one of each per member, and x is read once instead of per member.
//!
//! Rounding: every rank-r product is fp32-accurate as in the per-projection split path; the
//! forward is the same computation (`s` applied to the same f32 sums); dB likewise; `s dy B`
//! takes `s` inside the GEMM rather than in the split (the same value for a power-of-two
//! `s`); dx sums the members' adapter shares in f32 before its one rounding.

use std::sync::Arc;

use crate::bench::{measure, BenchConfig, BenchRow, KernelBench};
use crate::check::{compare, compare_with_tol, random_pair_par, CheckLine, GpuCheck};
use crate::cuda::Gpu;
use crate::error::{KernelError, Result};
use crate::ops::lora_group::{
    check_backward, check_group, group_gpu, group_input_grad, member_outputs, GroupForward,
    GroupMember, LoraGroup, MemberAdapter, Plan,
};
use crate::ops::lora_linear::{
    lora_linear_backward, lora_linear_backward_accumulate, lora_linear_forward, output, with_last,
    LoraLinear,
};
use crate::ops::lora_split::{
    check_pair, fold_multi, split3, split_buffer, FoldJob, LoraSplit, Parts3, SplitBatch,
};
use crate::ops::matmul::{gemm_cols, matmul, matmul_into, Cols};
use crate::rng::Rng;
use crate::{DType, Device, Tensor};

use super::expect_dtype;

const OP: &str = "lora_group_split";

/// A group's adapters as splits (see the module docs), for members of one rank r.
pub struct GroupSplits {
    /// The adapted members' `[A_hi; A_lo; A_hi]` stacked in member order, `[3 m r, in]`.
    pub a3_cat: Tensor,
    /// Each adapted member's `[B_hi | B_hi | B_lo]`, `[out_p, 3r]`, in member order.
    pub b3: Vec<Tensor>,
}

impl GroupSplits {
    /// Unfilled buffers for the splits of the adapted members' f32 `(A, B)` in member order,
    /// checked (one input size, one rank); [`GroupSplits::jobs`] fills them.
    pub fn alloc(pairs: &[(&Tensor, &Tensor)]) -> Result<GroupSplits> {
        let Some(&(a0, _)) = pairs.first() else {
            return Err(KernelError::invalid(
                OP,
                "a group needs at least one adapter",
            ));
        };
        let (r, inp, _) = check_pair(a0, pairs[0].1)?;
        let mut b3 = Vec::with_capacity(pairs.len());
        for (a, b) in pairs {
            let (ra, ia, o) = check_pair(a, b)?;
            if (ra, ia) != (r, inp) {
                return Err(KernelError::shape(
                    OP,
                    format!(
                        "grouped adapters need one rank and input size: a {:?} after {:?}",
                        a.shape(),
                        a0.shape()
                    ),
                ));
            }
            b3.push(split_buffer(a, &[o, 3 * r])?);
        }
        Ok(GroupSplits {
            a3_cat: split_buffer(a0, &[3 * r * pairs.len(), inp])?,
            b3,
        })
    }

    /// Add the jobs that fill these splits from the `pairs` they were allocated for to
    /// `batch` (each member's A into its rows of the stacked buffer).
    pub fn add_jobs<'s>(
        &'s mut self,
        pairs: &[(&'s Tensor, &'s Tensor)],
        batch: &mut SplitBatch<'s>,
    ) {
        let a3 = batch.dst(&mut self.a3_cat);
        let mut offset = 0;
        for ((a, b), b3) in pairs.iter().zip(self.b3.iter_mut()) {
            let ((r, inp), (o, _)) = (a.rows_cols(), b.rows_cols());
            batch.push(a, a3, offset, (1, r * inp), Parts3::HiLoHi);
            offset += 3 * r * inp;
            let d = batch.dst(b3);
            batch.push(b, d, 0, (o, r), Parts3::HiHiLo);
        }
    }

    /// The splits of the adapted members' `(A, B)`, in one launch on the GPU.
    pub fn new(pairs: &[(&Tensor, &Tensor)]) -> Result<GroupSplits> {
        let mut g = GroupSplits::alloc(pairs)?;
        let mut batch = SplitBatch::default();
        g.add_jobs(pairs, &mut batch);
        batch.run()?;
        Ok(g)
    }

    /// The members' rank r.
    pub fn rank(&self) -> usize {
        self.a3_cat.shape()[0] / (3 * self.b3.len())
    }
}

/// The shared rank r of the group's adapted members (their plan widths are 3r), checked
/// against x: bf16 x, a_cat and B (the splits are bf16).
fn split_rank(g: &LoraGroup, plan: &Plan, x: &Tensor) -> Result<usize> {
    expect_dtype(OP, "x", x, &[DType::BF16])?;
    expect_dtype(OP, "a3_cat", g.a_cat, &[DType::BF16])?;
    let widths: Vec<usize> = plan.ranks.iter().copied().filter(|&w| w > 0).collect();
    for m in &g.members {
        if let Some(ad) = &m.adapter {
            expect_dtype(OP, "b3", ad.b, &[DType::BF16])?;
        }
    }
    let w = widths[0];
    if !w.is_multiple_of(3) || widths.iter().any(|&v| v != w) {
        return Err(KernelError::shape(
            OP,
            format!("split members need one rank: B widths {widths:?} are not one 3r"),
        ));
    }
    Ok(w / 3)
}

/// Every member's `y_p = x W_p^T (+ bias_p) + s_p (x A_p^T) B_p^T` with the adapter path
/// fp32-accurate: `g.a_cat` is [`GroupSplits::a3_cat`] and each member's B its split
/// (`[out, 3r]`). Saves `xa3` (`[.., 3 m r]`, bf16), all the backward needs besides x.
pub fn lora_group_forward_split(g: &LoraGroup, x: &Tensor) -> Result<GroupForward> {
    let plan = check_group(g, x)?;
    let r = split_rank(g, &plan, x)?;
    let gpu = group_gpu(g, &[("x", x)])?;
    let m = plan.total / (3 * r);
    let p = matmul(x, false, g.a_cat, true, DType::F32)?;
    let n = p.elem_count() / plan.total;
    let xa = split3(
        &p,
        n * m,
        3,
        r,
        &[0, 1],
        1.0,
        Parts3::HiLoHi,
        &with_last(x, plan.total),
    )?;
    drop(p);
    let ys = member_outputs(g, &plan, &gpu, x, &xa)?;
    Ok(GroupForward { ys, xa })
}

/// From every member's `dy_p`: `dB_p += s_p dy_p^T xa_p`, `dA_p += (s_p dy_p B_p)^T x` (f32,
/// accumulated; `grads` holds `(dA, dB)` of the adapted members in order), and returns
/// `dx = sum_p (s_p dy_p B_p) A_p + sum_p dy_p W_p`, every rank-r product fp32-accurate.
/// `xa` is [`lora_group_forward_split`]'s.
pub fn lora_group_backward_split(
    g: &LoraGroup,
    dys: &[&Tensor],
    x: &Tensor,
    xa: &Tensor,
    grads: &mut [(&mut Tensor, &mut Tensor)],
) -> Result<Tensor> {
    let (plan, gpu) = check_backward(g, dys, x, xa, grads, 3)?;
    let r = split_rank(g, &plan, x)?;
    let m = plan.total / (3 * r);
    let n = x.elem_count() / plan.inp;
    // Q = [s_p dy_p [B_hi | B_lo]] in member k's columns 2rk.., and T_p = dy_p^T [xa_hi |
    // xa_lo] per member: the two blocks of each that hold different parts (lora_split.rs).
    let mut q = output(&gpu, &with_last(x, 2 * r * m), DType::F32)?;
    let mut ts = Vec::with_capacity(m);
    let mut scales = Vec::with_capacity(m);
    for (i, mem) in g.members.iter().enumerate() {
        let Some(ad) = &mem.adapter else { continue };
        let (c0, out) = (plan.offsets[i], plan.outs[i]);
        let k = c0 / (3 * r);
        let dy = Cols::all(dys[i]);
        let mut t = output(&gpu, &[out, 2 * r], DType::F32)?;
        gemm_cols(
            &gpu,
            dy,
            true,
            Cols::of(xa, c0, 2 * r),
            false,
            &mut t,
            0,
            1.0,
            0.0,
        )?;
        let b_hi_lo = Cols::of(ad.b, r, 2 * r);
        gemm_cols(
            &gpu,
            dy,
            false,
            b_hi_lo,
            false,
            &mut q,
            2 * r * k,
            ad.scaling,
            0.0,
        )?;
        ts.push(t);
        scales.push(ad.scaling);
    }
    // [hi | hi | lo] of s dy B for every member at once.
    let d3 = split3(
        &q,
        n * m,
        2,
        r,
        &[0, 1],
        1.0,
        Parts3::HiHiLo,
        &with_last(x, plan.total),
    )?;
    drop(q);
    // D3^T x: member k's rows 3rk .. 3r(k+1) hold [hi^T x; hi^T x; lo^T x].
    let ta = matmul(&d3, true, x, false, DType::F32)?;
    let mut jobs = Vec::with_capacity(2 * m);
    for (k, ((da, db), (t, &s))) in grads.iter_mut().zip(ts.iter().zip(&scales)).enumerate() {
        let out = t.shape()[0];
        jobs.push(FoldJob {
            dst: db,
            src: t,
            src_offset: 0,
            rows: out,
            blocks: 2,
            cols: r,
            sum: [0, 1],
            scale: s,
        });
        jobs.push(FoldJob {
            dst: da,
            src: &ta,
            src_offset: 3 * r * k * plan.inp,
            rows: 1,
            blocks: 3,
            cols: r * plan.inp,
            sum: [0, 2],
            scale: 1.0,
        });
    }
    fold_multi(&mut jobs)?;
    drop(jobs);
    drop((ts, ta));
    group_input_grad(g, &plan, &gpu, dys, x, &d3, g.a_cat)
}

/// One group's tensors on one device: the frozen weights, f32 adapters, their splits
/// (grouped and per projection), output gradients and f32 gradient accumulators.
struct Fixture {
    x: Tensor,
    ws: Vec<Tensor>,
    adapters: Vec<Option<(Tensor, Tensor)>>,
    dys: Vec<Tensor>,
    grads: Vec<(Tensor, Tensor)>,
}

/// Random bf16 x, W, dy and f32 A, B, dA, dB for `outs` (rank 0: no adapter), on the CPU
/// and, with a GPU, the same values there.
fn fixtures(
    gpu: Option<&Arc<Gpu>>,
    rng: &mut Rng,
    n: usize,
    inp: usize,
    outs: &[usize],
    ranks: &[usize],
) -> Result<(Fixture, Option<Fixture>)> {
    let mut pair = |shape: &[usize], dt: DType, std: f32| -> Result<(Tensor, Option<Tensor>)> {
        match gpu {
            Some(g) => {
                let (c, d) = random_pair_par(g, rng, shape, dt, std)?;
                Ok((c, Some(d)))
            }
            None => {
                let v = rng.normal_vec(shape.iter().product(), std);
                Ok((Tensor::from_f32_as(shape, v, dt)?, None))
            }
        }
    };
    let mut cpu = Fixture {
        x: Tensor::zeros(&[0], DType::BF16, &Device::Cpu)?,
        ws: Vec::new(),
        adapters: Vec::new(),
        dys: Vec::new(),
        grads: Vec::new(),
    };
    let mut dev = Fixture {
        x: Tensor::zeros(&[0], DType::BF16, &Device::Cpu)?,
        ws: Vec::new(),
        adapters: Vec::new(),
        dys: Vec::new(),
        grads: Vec::new(),
    };
    let on_dev = gpu.is_some();
    let take =
        |t: Option<Tensor>| t.unwrap_or(Tensor::zeros(&[0], DType::F32, &Device::Cpu).unwrap());
    let (x, gx) = pair(&[n, inp], DType::BF16, 1.0)?;
    cpu.x = x;
    dev.x = take(gx);
    for (&out, &r) in outs.iter().zip(ranks) {
        let (w, gw) = pair(&[out, inp], DType::BF16, 1.0 / (inp as f32).sqrt())?;
        cpu.ws.push(w);
        dev.ws.push(take(gw));
        if r > 0 {
            let (a, ga) = pair(&[r, inp], DType::F32, 1.0 / (inp as f32).sqrt())?;
            let (b, gb) = pair(&[out, r], DType::F32, 0.3)?;
            cpu.adapters.push(Some((a, b)));
            dev.adapters.push(Some((take(ga), take(gb))));
            let (da, gda) = pair(&[r, inp], DType::F32, 1.0)?;
            let (db, gdb) = pair(&[out, r], DType::F32, 1.0)?;
            cpu.grads.push((da, db));
            dev.grads.push((take(gda), take(gdb)));
        } else {
            cpu.adapters.push(None);
            dev.adapters.push(None);
        }
        let (dy, gdy) = pair(&[n, out], DType::BF16, 1.0)?;
        cpu.dys.push(dy);
        dev.dys.push(take(gdy));
    }
    Ok((cpu, on_dev.then_some(dev)))
}

/// What one run of an implementation produced: the outputs, xa, dx, and (dA, dB) per
/// adapter after accumulating onto the fixture's values.
struct Run {
    ys: Vec<Tensor>,
    xa: Option<Tensor>,
    dx: Tensor,
    grads: Vec<(Tensor, Tensor)>,
}

fn scalings(count: usize) -> Vec<f32> {
    // Powers of two, as alpha / r usually is: the grouped op's `s` inside the GEMM and the
    // per-projection op's `s` in the split then give the same values.
    (0..count).map(|i| [2.0, 0.5, 1.0][i % 3]).collect()
}

fn adapter_pairs(f: &Fixture) -> Vec<(&Tensor, &Tensor)> {
    f.adapters.iter().flatten().map(|(a, b)| (a, b)).collect()
}

/// The grouped split op, forward and backward.
fn run_grouped(f: &mut Fixture) -> Result<Run> {
    let gs = GroupSplits::new(&adapter_pairs(f))?;
    let s = scalings(f.ws.len());
    let mut k = 0;
    let members =
        f.ws.iter()
            .zip(&f.adapters)
            .zip(&s)
            .map(|((w, ad), &scaling)| GroupMember {
                w,
                bias: None,
                adapter: ad.as_ref().map(|_| {
                    k += 1;
                    MemberAdapter {
                        b: &gs.b3[k - 1],
                        scaling,
                    }
                }),
            })
            .collect();
    let g = LoraGroup {
        a_cat: &gs.a3_cat,
        members,
    };
    let fw = lora_group_forward_split(&g, &f.x)?;
    let dys: Vec<&Tensor> = f.dys.iter().collect();
    let mut grads: Vec<(&mut Tensor, &mut Tensor)> =
        f.grads.iter_mut().map(|(a, b)| (a, b)).collect();
    let dx = lora_group_backward_split(&g, &dys, &f.x, &fw.xa, &mut grads)?;
    Ok(Run {
        ys: fw.ys,
        xa: Some(fw.xa),
        dx,
        grads: f
            .grads
            .iter()
            .map(|(a, b)| Ok((a.to_cpu()?, b.to_cpu()?)))
            .collect::<Result<_>>()?,
    })
}

/// The same projections one by one through `lora_linear` with per-projection splits, the
/// input gradient accumulated as the layer did before grouping.
fn run_per_projection(f: &mut Fixture) -> Result<Run> {
    let s = scalings(f.ws.len());
    let splits = LoraSplit::many(&adapter_pairs(f))?;
    let mut sp = splits.iter();
    let mut ys = Vec::new();
    let mut dx: Option<Tensor> = None;
    let mut grads = f.grads.iter_mut();
    for (i, (w, ad)) in f.ws.iter().zip(&f.adapters).enumerate() {
        let dy = &f.dys[i];
        match ad {
            Some((a, b)) => {
                let layer = LoraLinear {
                    w,
                    bias: None,
                    a,
                    b,
                    scaling: s[i],
                    split: sp.next(),
                };
                let fw = lora_linear_forward(&layer, &f.x, None)?;
                ys.push(fw.y);
                let (da, db) = grads.next().expect("one per adapter");
                match &mut dx {
                    None => dx = lora_linear_backward(&layer, dy, &f.x, &fw.xa, da, db, true)?,
                    Some(acc) => {
                        lora_linear_backward_accumulate(&layer, dy, &f.x, &fw.xa, da, db, acc)?
                    }
                }
            }
            None => {
                ys.push(matmul(&f.x, false, w, true, DType::BF16)?);
                match &mut dx {
                    None => dx = Some(matmul(dy, false, w, false, DType::BF16)?),
                    Some(acc) => matmul_into(dy, false, w, false, acc, 1.0, 1.0)?,
                }
            }
        }
    }
    Ok(Run {
        ys,
        xa: None,
        dx: dx.expect("at least one member"),
        grads: f
            .grads
            .iter()
            .map(|(a, b)| Ok((a.to_cpu()?, b.to_cpu()?)))
            .collect::<Result<_>>()?,
    })
}

pub const CHECK: GpuCheck = GpuCheck {
    op: OP,
    run: gpu_check,
};

/// The grouped split op on the GPU against itself on the CPU, fresh random inputs: the
/// Llama-3-8B q/k/v and gate/up groups and an odd group with a plain member.
fn gpu_check(gpu: &Arc<Gpu>, rng: &mut Rng) -> Result<Vec<CheckLine>> {
    let mut lines = Vec::new();
    #[allow(clippy::type_complexity)]
    let cases: [(usize, usize, &[usize], &[usize], &str); 3] = [
        (61, 333, &[190, 77, 77], &[5, 0, 5], "odd, a plain member"),
        (
            300,
            4096,
            &[4096, 1024, 1024],
            &[16, 16, 16],
            "Llama-3-8B q/k/v",
        ),
        (300, 4096, &[14336, 14336], &[16, 16], "Llama-3-8B gate/up"),
    ];
    for (n, inp, outs, ranks, what) in cases {
        let case = format!("bf16 n={n} {inp}->{outs:?} r={ranks:?} ({what})");
        let (mut cpu, dev) = fixtures(Some(gpu), rng, n, inp, outs, ranks)?;
        let mut dev = dev.expect("made on the GPU");
        let want = run_grouped(&mut cpu)?;
        let got = run_grouped(&mut dev)?;
        for (i, (g, w)) in got.ys.iter().zip(&want.ys).enumerate() {
            lines.push(compare(OP, &case, &format!("y{i}"), g, w)?);
        }
        if let (Some(g), Some(w)) = (&got.xa, &want.xa) {
            lines.push(compare(OP, &case, "xa3", g, w)?);
        }
        lines.push(compare(OP, &case, "dx", &got.dx, &want.dx)?);
        for (i, ((gda, gdb), (da, db))) in got.grads.iter().zip(&want.grads).enumerate() {
            // dA and dB are fp32-accurate sums over n tokens; cuBLAS and the CPU sum in other
            // orders and the bf16 split parts may round differently by an ulp: 1e-4.
            lines.push(compare_with_tol(
                OP,
                &case,
                &format!("dA{i}"),
                gda,
                da,
                1e-4,
            )?);
            lines.push(compare_with_tol(
                OP,
                &case,
                &format!("dB{i}"),
                gdb,
                db,
                1e-4,
            )?);
        }
    }
    Ok(lines)
}

pub const BENCH: KernelBench = KernelBench { op: OP, run: bench };

/// 8192 tokens, Llama-3-8B q/k/v and gate/up, r = 16, the fp32-accurate adapter path:
/// forward + backward of the grouped split op against the same projections one by one
/// through `lora_linear` with per-projection splits (what the default training path ran
/// before grouping), splits made inside each.
fn bench(gpu: &Arc<Gpu>, cfg: &BenchConfig) -> Result<Vec<BenchRow>> {
    let (n, inp, r) = (8192, 4096, 16);
    let mut rows = Vec::new();
    for (outs, name) in [
        (&[4096, 1024, 1024][..], "qkv"),
        (&[14336, 14336][..], "gate_up"),
    ] {
        let mut rng = Rng::new(23);
        let ranks = vec![r; outs.len()];
        let (_, dev) = fixtures(Some(gpu), &mut rng, n, inp, outs, &ranks)?;
        let mut dev = dev.expect("made on the GPU");
        let total_out: usize = outs.iter().sum();
        let (nf, i, o, rf) = (n as f64, inp as f64, total_out as f64, r as f64);
        // The base GEMMs plus the split adapter products (3r wide).
        let flops = 4.0 * nf * i * o + 18.0 * nf * rf * (outs.len() as f64 * i + o);
        let shape = format!("{n}x{inp}->{outs:?} r={r} bf16, fp32-accurate adapters");
        let op = format!("{OP}_{name}");
        rows.push(measure(
            gpu,
            cfg,
            &op,
            "grouped",
            &shape,
            0.0,
            flops,
            || run_grouped(&mut dev).map(|_| ()),
        )?);
        rows.push(measure(
            gpu,
            cfg,
            &op,
            "per-projection",
            &shape,
            0.0,
            flops,
            || run_per_projection(&mut dev).map(|_| ()),
        )?);
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vals(t: &Tensor) -> Vec<f32> {
        t.to_f32_vec().unwrap()
    }

    /// The grouped split op computes what the per-projection split path computes: outputs,
    /// dA and dB bitwise (the same GEMM blocks and f32 sums, power-of-two scalings), dx to
    /// bf16 rounding (the group sums the adapters' shares in f32 before rounding once).
    #[test]
    fn grouped_split_matches_the_per_projection_split_path() {
        for (outs, ranks) in [
            (&[40usize, 24, 24][..], &[4usize, 4, 4][..]),
            (&[40, 24, 24], &[3, 0, 3]),
            (&[56, 56], &[5, 5]),
        ] {
            let mut rng = Rng::new(31);
            let (mut a, _) = fixtures(None, &mut rng, 23, 32, outs, ranks).unwrap();
            let mut rng = Rng::new(31);
            let (mut b, _) = fixtures(None, &mut rng, 23, 32, outs, ranks).unwrap();
            let g = run_grouped(&mut a).unwrap();
            let p = run_per_projection(&mut b).unwrap();
            for (gy, py) in g.ys.iter().zip(&p.ys) {
                assert_eq!(vals(gy), vals(py), "{outs:?} {ranks:?}: y");
            }
            for ((gda, gdb), (pda, pdb)) in g.grads.iter().zip(&p.grads) {
                assert_eq!(vals(gdb), vals(pdb), "{outs:?} {ranks:?}: dB");
                assert_eq!(vals(gda), vals(pda), "{outs:?} {ranks:?}: dA");
            }
            let err = crate::check::rel_err(&vals(&g.dx), &vals(&p.dx));
            assert!(err < 4e-3, "{outs:?} {ranks:?}: dx rel err {err}");
        }
    }

    /// Unequal ranks cannot share one split launch: an error naming the op, not garbage.
    #[test]
    fn unequal_ranks_are_an_error() {
        let mut rng = Rng::new(2);
        let (f, _) = fixtures(None, &mut rng, 5, 8, &[6, 6], &[2, 3]).unwrap();
        let err = GroupSplits::new(&adapter_pairs(&f))
            .err()
            .expect("an error");
        assert!(err.to_string().contains(OP), "{err}");
        assert!(err.to_string().contains("one rank"), "{err}");
    }
}
