//! Two-part bf16 splits: fp32-accurate rank-r LoRA products on bf16 tensor cores.
//!
//! PEFT computes the adapter path in fp32 (fp32 A and B, the bf16 input cast up) over a bf16
//! base, and parity with it shows the difference: rounding A, B and the rank-r activations to
//! bf16 costs 10-70% more gradient error against fp32 (bench/results/2026-11-23-h100-probes).
//! cuBLAS has no bf16 x f32 GEMM, and fp32 GEMMs would read the large bf16 operands (x, dy)
//! as f32 copies. Instead each small fp32 operand v is split into `hi = bf16(v)` and
//! `lo = bf16(v - hi)` (about 16 bits of v together), and laid out in three K-blocks:
//!
//! ```text
//! [a_hi | a_lo | a_hi] . [b_hi | b_hi | b_lo]^T = a_hi b_hi + a_lo b_hi + a_hi b_lo
//! ```
//!
//! one bf16 GEMM with fp32 accumulation, exact to ~2^-16 relative (only `a_lo b_lo` is
//! dropped). When one side is an exact bf16 tensor (x, dy), the split side's three blocks
//! produce three partial products in the output, of which two are summed ([`split3`] with a
//! `sum` mask, or [`fold_into`] into an fp32 gradient).
//!
//! Layouts: a source is f32 `[rows, blocks, cols]`; a split is bf16 `[rows, 3, cols]` whose
//! block `b` holds the part `parts[b]`. A `[r, in]` matrix split along its rows (`[3r, in]`)
//! is `rows = 1, cols = r * in`; a `[n, r]` one split along its columns (`[n, 3r]`) is
//! `rows = n, cols = r`.

use std::sync::Arc;

use crate::check::{compare_with_tol, CheckLine, GpuCheck};
use crate::cpu::par_rows;
use crate::cuda::{Gpu, KernelSource};
use crate::error::{KernelError, Result};
use crate::rng::Rng;
use crate::{launch, DType, Device, Tensor};

use super::{common_gpu, expect_dtype};
use crate::ops::matmul::{gemm_cols, matmul_into, Cols};

pub const SOURCE: KernelSource = KernelSource {
    name: "lora_split",
    src: include_str!("../../kernels/lora_split.cu"),
};

const OP: &str = "lora_split";

/// Which part (bf16 high or low half) each of a split's three blocks holds. A product pairs
/// one operand in [`Parts3::HiLoHi`] with the other in [`Parts3::HiHiLo`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parts3 {
    HiLoHi,
    HiHiLo,
}

impl Parts3 {
    /// Bit `b` set: block `b` holds the low part.
    fn mask(self) -> i32 {
        match self {
            Parts3::HiLoHi => 0b010,
            Parts3::HiHiLo => 0b100,
        }
    }
}

/// `v`'s two bf16 parts as f32 values: `hi = bf16(v)`, `lo = bf16(v - hi)`.
pub fn split_parts(v: f32) -> (f32, f32) {
    let hi = half::bf16::from_f32(v).to_f32();
    (hi, half::bf16::from_f32(v - hi).to_f32())
}

/// The sizes of a `[rows, blocks, cols]` view of `t`, checked.
fn check_view(name: &str, t: &Tensor, rows: usize, blocks: usize, cols: usize) -> Result<()> {
    if rows * blocks * cols != t.elem_count() || cols == 0 || cols > i32::MAX as usize {
        return Err(KernelError::shape(
            OP,
            format!(
                "{name} {:?} is not [{rows}, {blocks}, {cols}] ({} elements)",
                t.shape(),
                rows * blocks * cols
            ),
        ));
    }
    Ok(())
}

fn sum_mask(sum: &[usize], blocks: usize) -> Result<i32> {
    if sum.is_empty() || blocks > 30 || sum.iter().any(|&b| b >= blocks) {
        return Err(KernelError::invalid(
            OP,
            format!("sum blocks {sum:?} must be some of 0..{blocks}"),
        ));
    }
    Ok(sum.iter().fold(0, |m, &b| m | (1 << b)))
}

/// The bf16 split `[rows, 3, cols]` (shaped `out_shape`) of `scale * Σ_{b in sum}
/// src[rows, b, cols]`, `src` f32 viewed as `[rows, blocks, cols]`. The sum and the scale
/// are taken in f32 in the order of `sum`'s blocks, ascending.
#[allow(clippy::too_many_arguments)]
pub fn split3(
    src: &Tensor,
    rows: usize,
    blocks: usize,
    cols: usize,
    sum: &[usize],
    scale: f32,
    parts: Parts3,
    out_shape: &[usize],
) -> Result<Tensor> {
    expect_dtype(OP, "src", src, &[DType::F32])?;
    check_view("src", src, rows, blocks, cols)?;
    let mask = sum_mask(sum, blocks)?;
    if out_shape.iter().product::<usize>() != rows * 3 * cols {
        return Err(KernelError::shape(
            OP,
            format!("output shape {out_shape:?} does not hold [{rows}, 3, {cols}]"),
        ));
    }
    match common_gpu(OP, &[("src", src)])? {
        None => {
            let s = src.cpu_f32();
            let mut out = vec![0.0f32; rows * 3 * cols];
            par_rows(&mut out, 3 * cols, |row, o| {
                let base = row * blocks * cols;
                for col in 0..cols {
                    let mut v = 0.0f32;
                    for k in 0..blocks {
                        if (mask >> k) & 1 == 1 {
                            v += s[base + k * cols + col];
                        }
                    }
                    let (hi, lo) = split_parts(v * scale);
                    for b in 0..3 {
                        o[b * cols + col] = if (parts.mask() >> b) & 1 == 1 { lo } else { hi };
                    }
                }
            });
            Tensor::from_f32_as(out_shape, out, DType::BF16)
        }
        Some(gpu) => {
            let out = Tensor::uninit_cuda(&gpu, out_shape, DType::BF16)?;
            let f = gpu.function(&SOURCE, "lora_split3")?;
            let grid = (rows * cols).div_ceil(256).clamp(1, gpu.sm_count() * 16) as u32;
            launch!(gpu, f, (grid, 1, 1), (256, 1, 1), 0;
                src.dptr(), out.dptr(), rows as i64, cols as i32, blocks as i32, mask, scale,
                parts.mask())?;
            Ok(out)
        }
    }
}

/// `dst[rows, cols] += scale * (src[rows, i, cols] + src[rows, j, cols])`, f32, `src`
/// viewed as `[rows, blocks, cols]`: the two wanted partial products of a split GEMM folded
/// into a gradient accumulator.
#[allow(clippy::too_many_arguments)]
pub fn fold_into(
    dst: &mut Tensor,
    src: &Tensor,
    rows: usize,
    blocks: usize,
    cols: usize,
    sum: [usize; 2],
    scale: f32,
) -> Result<()> {
    expect_dtype(OP, "dst", dst, &[DType::F32])?;
    expect_dtype(OP, "src", src, &[DType::F32])?;
    check_view("dst", dst, rows, 1, cols)?;
    check_view("src", src, rows, blocks, cols)?;
    let [i, j] = sum;
    if i >= blocks || j >= blocks {
        return Err(KernelError::invalid(
            OP,
            format!("fold blocks {sum:?} must be in 0..{blocks}"),
        ));
    }
    match common_gpu(OP, &[("dst", dst), ("src", src)])? {
        None => {
            let s = src.cpu_f32().into_owned();
            let mut d = dst.cpu_f32().into_owned();
            par_rows(&mut d, cols, |row, o| {
                let base = row * blocks * cols;
                for (col, e) in o.iter_mut().enumerate() {
                    *e += scale * (s[base + i * cols + col] + s[base + j * cols + col]);
                }
            });
            dst.cpu_store_f32(&d);
            Ok(())
        }
        Some(gpu) => {
            let f = gpu.function(&SOURCE, "lora_fold3")?;
            let grid = (rows * cols).div_ceil(256).clamp(1, gpu.sm_count() * 16) as u32;
            launch!(gpu, f, (grid, 1, 1), (256, 1, 1), 0;
                dst.dptr(), src.dptr(), rows as i64, cols as i32, blocks as i32, i as i32,
                j as i32, scale)?;
            Ok(())
        }
    }
}

/// [`fold_into`]`(dst, t, rows, 2, cols, [0, 1], fold_scale)` and
/// [`split3`]`(q, n, 2, r, &[0, 1], split_scale, HiHiLo)` (returned, shaped `d3_shape`) in
/// one launch on the GPU: the backward's dB fold and dxa split, which are independent.
#[allow(clippy::too_many_arguments)]
pub fn fold_and_split(
    dst: &mut Tensor,
    t: &Tensor,
    rows: usize,
    cols: usize,
    fold_scale: f32,
    q: &Tensor,
    split_rows: usize,
    split_cols: usize,
    split_scale: f32,
    d3_shape: &[usize],
) -> Result<Tensor> {
    let Some(gpu) = common_gpu(OP, &[("dst", dst), ("t", t), ("q", q)])? else {
        fold_into(dst, t, rows, 2, cols, [0, 1], fold_scale)?;
        return split3(
            q,
            split_rows,
            2,
            split_cols,
            &[0, 1],
            split_scale,
            Parts3::HiHiLo,
            d3_shape,
        );
    };
    expect_dtype(OP, "dst", dst, &[DType::F32])?;
    expect_dtype(OP, "t", t, &[DType::F32])?;
    expect_dtype(OP, "q", q, &[DType::F32])?;
    check_view("dst", dst, rows, 1, cols)?;
    check_view("t", t, rows, 2, cols)?;
    check_view("q", q, split_rows, 2, split_cols)?;
    if d3_shape.iter().product::<usize>() != split_rows * 3 * split_cols {
        return Err(KernelError::shape(
            OP,
            format!("output shape {d3_shape:?} does not hold [{split_rows}, 3, {split_cols}]"),
        ));
    }
    let d3 = Tensor::uninit_cuda(&gpu, d3_shape, DType::BF16)?;
    let f = gpu.function(&SOURCE, "lora_fold_split")?;
    let n = rows * cols + split_rows * split_cols;
    let grid = n.div_ceil(256).clamp(1, gpu.sm_count() * 16) as u32;
    launch!(gpu, f, (grid, 1, 1), (256, 1, 1), 0;
        dst.dptr(), t.dptr(), rows as i64, cols as i32, fold_scale,
        q.dptr(), d3.dptr(), split_rows as i64, split_cols as i32, split_scale)?;
    Ok(d3)
}

/// One tensor of [`split3_multi`]: f32 `src` split (no sum, no scale) into the bf16
/// destination `dst` (an index into the launch's destinations), both viewed as in [`split3`]
/// with one source block; the split starts `dst_offset` elements into the destination (a
/// member's rows of a group's stacked A: several jobs may fill one buffer).
pub struct SplitJob<'a> {
    pub src: &'a Tensor,
    pub dst: usize,
    pub dst_offset: usize,
    pub rows: usize,
    pub cols: usize,
    pub parts: Parts3,
}

/// Splits to make in one [`split3_multi`] launch: the jobs and the buffers they fill.
#[derive(Default)]
pub struct SplitBatch<'a> {
    pub jobs: Vec<SplitJob<'a>>,
    pub dsts: Vec<&'a mut Tensor>,
}

impl<'a> SplitBatch<'a> {
    /// Register a destination buffer; jobs name it by the returned index.
    pub fn dst(&mut self, t: &'a mut Tensor) -> usize {
        self.dsts.push(t);
        self.dsts.len() - 1
    }

    /// Add the split of `src` (`[rows, cols]` f32) into destination `dst` from element
    /// `dst_offset` on.
    pub fn push(
        &mut self,
        src: &'a Tensor,
        dst: usize,
        dst_offset: usize,
        (rows, cols): (usize, usize),
        parts: Parts3,
    ) {
        self.jobs.push(SplitJob {
            src,
            dst,
            dst_offset,
            rows,
            cols,
            parts,
        });
    }

    pub fn run(mut self) -> Result<()> {
        split3_multi(&self.jobs, &mut self.dsts)
    }
}

/// Table entries per multi-tensor launch (lora_split.cu's LORA_MULTI_CAP): the table is a
/// by-value kernel parameter, so launching needs no upload and no host synchronisation.
const MULTI_CAP: usize = 64;

/// lora_split.cu's `SplitJob`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct SplitEntry {
    src: u64,
    dst: u64,
    cols: i64,
    parts: i64,
    start: i64,
    n: i64,
}

/// lora_split.cu's `FoldJob`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct FoldEntry {
    dst: u64,
    src: u64,
    rows: i64,
    cols: i64,
    i: i32,
    j: i32,
    scale: f32,
    blocks: i32,
}

/// A kernel's by-value table of `MULTI_CAP` entries.
#[repr(C)]
#[derive(Clone, Copy)]
struct Table<E: Copy> {
    entries: [E; MULTI_CAP],
}

/// [`split3`] of many tensors into existing buffers (every adapter's A and B of a layer), in
/// one launch per 64 tensors on the GPU (each tensor spread over the whole GPU).
pub fn split3_multi(jobs: &[SplitJob], dsts: &mut [&mut Tensor]) -> Result<()> {
    let mut named: Vec<(&'static str, &Tensor)> = Vec::with_capacity(jobs.len() + dsts.len());
    for j in jobs {
        expect_dtype(OP, "src", j.src, &[DType::F32])?;
        check_view("src", j.src, j.rows, 1, j.cols)?;
        let Some(dst) = dsts.get(j.dst) else {
            return Err(KernelError::invalid(
                OP,
                format!("split job names destination {} of {}", j.dst, dsts.len()),
            ));
        };
        expect_dtype(OP, "dst", dst, &[DType::BF16])?;
        if j.dst_offset + j.rows * 3 * j.cols > dst.elem_count() {
            return Err(KernelError::shape(
                OP,
                format!(
                    "dst {:?} cannot hold [{}, 3, {}] at element {}",
                    dst.shape(),
                    j.rows,
                    j.cols,
                    j.dst_offset
                ),
            ));
        }
        named.push(("src", j.src));
    }
    named.extend(dsts.iter().map(|d| ("dst", &**d)));
    let Some(gpu) = common_gpu(OP, &named)? else {
        for j in jobs {
            let shape = [j.rows, 3 * j.cols];
            let split = split3(j.src, j.rows, 1, j.cols, &[0], 1.0, j.parts, &shape)?;
            let dst = &mut dsts[j.dst];
            let mut all = dst.cpu_f32().into_owned();
            all[j.dst_offset..j.dst_offset + split.elem_count()].copy_from_slice(&split.cpu_f32());
            dst.cpu_store_f32(&all);
        }
        return Ok(());
    };
    let entries: Vec<SplitEntry> = jobs
        .iter()
        .map(|j| SplitEntry {
            src: j.src.dptr(),
            dst: dsts[j.dst].dptr() + (j.dst_offset * DType::BF16.size_in_bytes()) as u64,
            cols: j.cols as i64,
            parts: j.parts.mask() as i64,
            start: 0,
            n: (j.rows * j.cols) as i64,
        })
        .collect();
    let f = gpu.function(&SOURCE, "lora_split3_multi")?;
    for chunk in entries.chunks(MULTI_CAP) {
        let mut table = Table {
            entries: [SplitEntry::default(); MULTI_CAP],
        };
        table.entries[..chunk.len()].copy_from_slice(chunk);
        let most = chunk.iter().map(|e| e.n as usize).max().unwrap_or(0);
        let grid_x = most.div_ceil(256).clamp(1, gpu.sm_count() * 4) as u32;
        launch!(gpu, f, (grid_x, chunk.len() as u32, 1), (256, 1, 1), 0; table)?;
    }
    Ok(())
}

/// One fold of [`fold_multi`]: `dst[rows, cols] += scale * (src[rows, i, cols] +
/// src[rows, j, cols])`, `src` viewed as `[rows, blocks, cols]` from element `src_offset` on.
pub struct FoldJob<'a> {
    pub dst: &'a mut Tensor,
    pub src: &'a Tensor,
    pub src_offset: usize,
    pub rows: usize,
    pub blocks: usize,
    pub cols: usize,
    pub sum: [usize; 2],
    pub scale: f32,
}

/// [`fold_into`] of many gradients in one launch per 64 (a group's dA and dB folds).
pub fn fold_multi(jobs: &mut [FoldJob]) -> Result<()> {
    let mut named: Vec<(&'static str, &Tensor)> = Vec::with_capacity(2 * jobs.len());
    for j in jobs.iter() {
        expect_dtype(OP, "dst", j.dst, &[DType::F32])?;
        expect_dtype(OP, "src", j.src, &[DType::F32])?;
        check_view("dst", j.dst, j.rows, 1, j.cols)?;
        if j.src_offset + j.rows * j.blocks * j.cols > j.src.elem_count()
            || j.sum.iter().any(|&b| b >= j.blocks)
        {
            return Err(KernelError::shape(
                OP,
                format!(
                    "fold of blocks {:?} of [{}, {}, {}] at element {} of src {:?}",
                    j.sum,
                    j.rows,
                    j.blocks,
                    j.cols,
                    j.src_offset,
                    j.src.shape()
                ),
            ));
        }
        named.push(("dst", &*j.dst));
        named.push(("src", j.src));
    }
    let Some(gpu) = common_gpu(OP, &named)? else {
        for j in jobs.iter_mut() {
            let [i, k] = j.sum;
            let s = j.src.cpu_f32();
            let s = &s[j.src_offset..j.src_offset + j.rows * j.blocks * j.cols];
            let mut d = j.dst.cpu_f32().into_owned();
            let (cols, blocks) = (j.cols, j.blocks);
            par_rows(&mut d, cols, |row, o| {
                let base = row * blocks * cols;
                for (col, e) in o.iter_mut().enumerate() {
                    *e += j.scale * (s[base + i * cols + col] + s[base + k * cols + col]);
                }
            });
            j.dst.cpu_store_f32(&d);
        }
        return Ok(());
    };
    let f = gpu.function(&SOURCE, "lora_fold3_multi")?;
    for chunk in jobs.chunks(MULTI_CAP) {
        let mut table = Table {
            entries: [FoldEntry::default(); MULTI_CAP],
        };
        let mut most = 0;
        for (e, j) in table.entries.iter_mut().zip(chunk) {
            if j.cols > i32::MAX as usize {
                return Err(KernelError::invalid(OP, "fold columns exceed i32"));
            }
            *e = FoldEntry {
                dst: j.dst.dptr(),
                src: j.src.dptr() + (j.src_offset * DType::F32.size_in_bytes()) as u64,
                rows: j.rows as i64,
                cols: j.cols as i64,
                i: j.sum[0] as i32,
                j: j.sum[1] as i32,
                scale: j.scale,
                blocks: j.blocks as i32,
            };
            most = most.max(j.rows * j.cols);
        }
        let grid_x = most.div_ceil(256).clamp(1, gpu.sm_count() * 4) as u32;
        launch!(gpu, f, (grid_x, chunk.len() as u32, 1), (256, 1, 1), 0; table)?;
    }
    Ok(())
}

/// One adapter's A `[r, in]` and B `[out, r]` as splits: `a3 = [A_hi; A_lo; A_hi]`
/// (`[3r, in]`) and `b3 = [B_hi | B_hi | B_lo]` (`[out, 3r]`), bf16. With x or dy exact in
/// bf16, every LoRA product below is fp32-accurate, as PEFT's fp32 adapter path is.
pub struct LoraSplit {
    pub a3: Tensor,
    pub b3: Tensor,
}

impl LoraSplit {
    /// The splits of many adapters' f32 `(A, B)` in one launch on the GPU.
    pub fn many(pairs: &[(&Tensor, &Tensor)]) -> Result<Vec<LoraSplit>> {
        let mut out = pairs
            .iter()
            .map(|(a, b)| LoraSplit::alloc(a, b))
            .collect::<Result<Vec<_>>>()?;
        let mut batch = SplitBatch::default();
        for ((a, b), sp) in pairs.iter().zip(out.iter_mut()) {
            sp.add_jobs(a, b, &mut batch);
        }
        batch.run()?;
        Ok(out)
    }

    /// Unfilled buffers for the split of f32 `a` `[r, in]` and `b` `[out, r]`, checked;
    /// [`LoraSplit::add_jobs`] fills them.
    pub fn alloc(a: &Tensor, b: &Tensor) -> Result<LoraSplit> {
        let (r, inp, o) = check_pair(a, b)?;
        Ok(LoraSplit {
            a3: split_buffer(a, &[3 * r, inp])?,
            b3: split_buffer(a, &[o, 3 * r])?,
        })
    }

    /// Add the jobs that fill this split from `a` and `b` (the ones it was allocated for)
    /// to `batch`.
    pub fn add_jobs<'s>(&'s mut self, a: &'s Tensor, b: &'s Tensor, batch: &mut SplitBatch<'s>) {
        let ((r, inp), (o, _)) = (a.rows_cols(), b.rows_cols());
        let da = batch.dst(&mut self.a3);
        let db = batch.dst(&mut self.b3);
        batch.push(a, da, 0, (1, r * inp), Parts3::HiLoHi);
        batch.push(b, db, 0, (o, r), Parts3::HiHiLo);
    }

    /// The rank r.
    pub fn rank(&self) -> usize {
        self.a3.shape()[0] / 3
    }

    fn in_features(&self) -> usize {
        self.a3.shape()[1]
    }
}

/// `(r, in, out)` of an adapter's f32 `a` `[r, in]` and `b` `[out, r]`, checked.
pub(crate) fn check_pair(a: &Tensor, b: &Tensor) -> Result<(usize, usize, usize)> {
    expect_dtype(OP, "a", a, &[DType::F32])?;
    expect_dtype(OP, "b", b, &[DType::F32])?;
    let ((r, inp), (o, rb)) = (a.rows_cols(), b.rows_cols());
    if r != rb || r == 0 || a.shape().len() != 2 || b.shape().len() != 2 {
        return Err(KernelError::shape(
            OP,
            format!(
                "a {:?} and b {:?} are not [r, in] and [out, r]",
                a.shape(),
                b.shape()
            ),
        ));
    }
    Ok((r, inp, o))
}

/// A bf16 buffer on `like`'s device for a split (every element is written by the split:
/// no zeroing on the GPU).
pub(crate) fn split_buffer(like: &Tensor, shape: &[usize]) -> Result<Tensor> {
    match like.device() {
        Device::Cuda(g) => Tensor::uninit_cuda(&g, shape, DType::BF16),
        Device::Cpu => Tensor::zeros(shape, DType::BF16, &Device::Cpu),
    }
}

/// `shape` with its last dim replaced by `last`.
fn with_last(shape: &[usize], last: usize) -> Vec<usize> {
    let mut s = shape.to_vec();
    if let Some(l) = s.last_mut() {
        *l = last;
    }
    s
}

/// `op(a) op(b)` of two blocks as a new f32 tensor `[m, n]` on their device.
fn block_product(a: Cols, ta: bool, b: Cols, tb: bool) -> Result<Tensor> {
    let m = if ta { a.cols } else { a.rows };
    let n = if tb { b.rows } else { b.cols };
    let gpu = common_gpu(OP, &[("a", a.t), ("b", b.t)])?;
    let mut c = match &gpu {
        Some(g) => Tensor::uninit_cuda(g, &[m, n], DType::F32)?,
        None => Tensor::zeros(&[m, n], DType::F32, &Device::Cpu)?,
    };
    gemm_cols(&gpu, a, ta, b, tb, &mut c, 0, 1.0, 0.0)?;
    Ok(c)
}

// Every product below multiplies an exact bf16 tensor (x or dy) by two of a split's three
// blocks, the two that hold different parts; the layouts put those two next to each other:
// rows [0, 2r) of a3 = [A_hi; A_lo], columns [0, 2r) of xa3 = [hi | lo], columns [r, 3r) of
// b3 = [B_hi | B_lo] and of d3 = [hi | lo]. Only the rank-r updates use all three blocks.

/// `x A^T` `[.., r]` as the split `[xa_hi | xa_lo | xa_hi]` `[.., 3r]` (bf16): the forward's
/// saved activation. One GEMM `x [A_hi; A_lo]^T` gives `[x A_hi | x A_lo]` in f32, whose sum
/// is `x A` to ~2^-16, which is then split.
pub fn split_xa(x: &Tensor, sp: &LoraSplit) -> Result<Tensor> {
    let r = sp.rank();
    let p = block_product(Cols::all(x), false, Cols::rows(&sp.a3, 0, 2 * r), true)?;
    let n = p.elem_count() / (2 * r);
    split3(
        &p,
        n,
        2,
        r,
        &[0, 1],
        1.0,
        Parts3::HiLoHi,
        &with_last(x.shape(), 3 * r),
    )
}

/// `y = alpha (xa B^T) + beta y` from [`split_xa`]'s output: the rank-r update, its inner
/// products fp32-accurate, rounded once into y's dtype.
pub fn split_update_into(
    xa3: &Tensor,
    sp: &LoraSplit,
    y: &mut Tensor,
    alpha: f32,
    beta: f32,
) -> Result<()> {
    matmul_into(xa3, false, &sp.b3, true, y, alpha, beta)
}

/// `dy [B_hi | B_lo]` `[n, 2r]` f32: its two blocks sum to `dy B`.
fn dy_b(dy: &Tensor, sp: &LoraSplit) -> Result<Tensor> {
    let r = sp.rank();
    block_product(Cols::all(dy), false, Cols::of(&sp.b3, r, 2 * r), false)
}

/// `scale dy B` `[.., r]` as the split `[hi | hi | lo]` `[.., 3r]` (bf16), for dA and dx.
pub fn split_dxa(dy: &Tensor, sp: &LoraSplit, scale: f32) -> Result<Tensor> {
    let r = sp.rank();
    let q = dy_b(dy, sp)?;
    let n = q.elem_count() / (2 * r);
    split3(
        &q,
        n,
        2,
        r,
        &[0, 1],
        scale,
        Parts3::HiHiLo,
        &with_last(dy.shape(), 3 * r),
    )
}

/// The adapter's gradients from `dy [.., out]`, its input `x [.., in]` and [`split_xa`]'s
/// `xa3`: `dB += scale dy^T xa` and `dA += (scale dy B)^T x` (f32 accumulators, each
/// product fp32-accurate); returns [`split_dxa`] for the input gradient.
pub fn split_adapter_grads(
    dy: &Tensor,
    x: &Tensor,
    xa3: &Tensor,
    sp: &LoraSplit,
    da: &mut Tensor,
    db: &mut Tensor,
    scale: f32,
) -> Result<Tensor> {
    let r = sp.rank();
    let out = db.shape()[0];
    // dy^T [xa_hi | xa_lo]: its two blocks sum to dy^T xa.
    let t = block_product(Cols::all(dy), true, Cols::of(xa3, 0, 2 * r), false)?;
    let q = dy_b(dy, sp)?;
    let n = q.elem_count() / (2 * r);
    let d3 = fold_and_split(
        db,
        &t,
        out,
        r,
        scale,
        &q,
        n,
        r,
        scale,
        &with_last(dy.shape(), 3 * r),
    )?;
    drop((t, q));
    // [hi | lo]^T x (row blocks of r x in): their sum is dxa^T x.
    let t = block_product(Cols::of(&d3, r, 2 * r), true, Cols::all(x), false)?;
    fold_into(da, &t, 1, 2, r * sp.in_features(), [0, 1], 1.0)?;
    Ok(d3)
}

/// `dx = dxa A + beta dx` from [`split_dxa`]'s output (`[hi|hi|lo] [A_hi; A_lo; A_hi]`).
pub fn split_input_grad_into(
    d3: &Tensor,
    sp: &LoraSplit,
    dx: &mut Tensor,
    beta: f32,
) -> Result<()> {
    matmul_into(d3, false, &sp.a3, false, dx, 1.0, beta)
}

fn gpu_check(gpu: &Arc<Gpu>, rng: &mut Rng) -> Result<Vec<CheckLine>> {
    // The same f32 additions in the same order and the same round-to-nearest-even on both
    // sides: bit-exact, so the only passing relative error is 0.
    let exact = f64::MIN_POSITIVE;
    let mut lines = Vec::new();
    let to_gpu = |t: &Tensor| t.to_device(&Device::Cuda(gpu.clone()));
    for (rows, blocks, cols, sum, scale, parts) in [
        (
            4096usize,
            3usize,
            16usize,
            vec![0usize, 1],
            1.0f32,
            Parts3::HiLoHi,
        ),
        (4093, 3, 8, vec![0, 2], 0.125, Parts3::HiHiLo),
        (1, 1, 16 * 4096, vec![0], 1.0, Parts3::HiLoHi),
        (14336, 1, 16, vec![0], 1.0, Parts3::HiHiLo),
    ] {
        let src = Tensor::from_f32(
            &[rows, blocks * cols],
            rng.normal_vec(rows * blocks * cols, 1.0),
        )?;
        let shape = [rows, 3 * cols];
        let case = format!("[{rows}, {blocks}, {cols}] sum {sum:?} x{scale} {parts:?}");
        let want = split3(&src, rows, blocks, cols, &sum, scale, parts, &shape)?;
        let got = split3(
            &to_gpu(&src)?,
            rows,
            blocks,
            cols,
            &sum,
            scale,
            parts,
            &shape,
        )?;
        lines.push(compare_with_tol(OP, &case, "split", &got, &want, exact)?);
    }
    for (rows, blocks, cols, sum, scale) in [
        (14336usize, 2usize, 16usize, [0usize, 1usize], 0.5f32),
        (1, 2, 16 * 4093, [0, 1], 1.0),
        (1, 3, 16 * 4093, [0, 2], 1.0),
    ] {
        let n = rows * blocks * cols;
        let src = Tensor::from_f32(&[rows, blocks * cols], rng.normal_vec(n, 1.0))?;
        let dst = Tensor::from_f32(&[rows, cols], rng.normal_vec(rows * cols, 1.0))?;
        let (mut want, mut got) = (dst.to_cpu()?, to_gpu(&dst)?);
        fold_into(&mut want, &src, rows, blocks, cols, sum, scale)?;
        fold_into(&mut got, &to_gpu(&src)?, rows, blocks, cols, sum, scale)?;
        let case = format!("[{rows}, {blocks}, {cols}] {sum:?} x{scale}");
        lines.push(compare_with_tol(OP, &case, "fold", &got, &want, exact)?);
    }
    {
        let (rows, cols, n, r) = (14336usize, 16usize, 3001usize, 16usize);
        let t = Tensor::from_f32(&[rows, 2 * cols], rng.normal_vec(rows * 2 * cols, 1.0))?;
        let q = Tensor::from_f32(&[n, 2 * r], rng.normal_vec(n * 2 * r, 1.0))?;
        let dst = Tensor::from_f32(&[rows, cols], rng.normal_vec(rows * cols, 1.0))?;
        let (mut want, mut got) = (dst.to_cpu()?, to_gpu(&dst)?);
        let d3_want = fold_and_split(&mut want, &t, rows, cols, 0.5, &q, n, r, 2.0, &[n, 3 * r])?;
        let d3_got = fold_and_split(
            &mut got,
            &to_gpu(&t)?,
            rows,
            cols,
            0.5,
            &to_gpu(&q)?,
            n,
            r,
            2.0,
            &[n, 3 * r],
        )?;
        let case = format!("fold [{rows}, 2, {cols}] + split [{n}, 2, {r}]");
        lines.push(compare_with_tol(OP, &case, "fold", &got, &want, exact)?);
        lines.push(compare_with_tol(
            OP, &case, "split", &d3_got, &d3_want, exact,
        )?);
    }
    // The multi-tensor launch over an adapter's A ([r, in] split along rows) and B ([out, r]
    // along columns), a second A written after the first into one stacked buffer (a group's
    // stacked A), and 70 small tensors into one buffer: more than one table's worth of jobs.
    let (r, inp, out) = (16, 4096, 14336);
    let (small_rows, small_cols, smalls) = (37, 5, 70);
    let a = Tensor::from_f32(&[r, inp], rng.normal_vec(r * inp, 0.02))?;
    let a2 = Tensor::from_f32(&[r, inp], rng.normal_vec(r * inp, 0.02))?;
    let b = Tensor::from_f32(&[out, r], rng.normal_vec(out * r, 0.02))?;
    let small: Vec<Tensor> = (0..smalls)
        .map(|_| {
            let v = rng.normal_vec(small_rows * small_cols, 1.0);
            Tensor::from_f32(&[small_rows, small_cols], v)
        })
        .collect::<Result<_>>()?;
    let (ag, a2g, bg) = (to_gpu(&a)?, to_gpu(&a2)?, to_gpu(&b)?);
    let small_g: Vec<Tensor> = small.iter().map(to_gpu).collect::<Result<_>>()?;
    let dev = Device::Cuda(gpu.clone());
    let mut a3 = Tensor::zeros(&[6 * r, inp], DType::BF16, &dev)?;
    let mut b3 = Tensor::zeros(&[out, 3 * r], DType::BF16, &dev)?;
    let small_shape = [smalls * small_rows, 3 * small_cols];
    let mut small3 = Tensor::zeros(&small_shape, DType::BF16, &dev)?;
    let mut batch = SplitBatch::default();
    let (ia3, ib3, ismall) = (
        batch.dst(&mut a3),
        batch.dst(&mut b3),
        batch.dst(&mut small3),
    );
    let mut jobs = vec![
        (&ag, ia3, 0, 1, r * inp, Parts3::HiLoHi),
        (&bg, ib3, 0, out, r, Parts3::HiHiLo),
        (&a2g, ia3, 3 * r * inp, 1, r * inp, Parts3::HiLoHi),
    ];
    for (k, t) in small_g.iter().enumerate() {
        let at = k * small_rows * 3 * small_cols;
        jobs.push((t, ismall, at, small_rows, small_cols, Parts3::HiHiLo));
    }
    for (src, dst, dst_offset, rows, cols, parts) in jobs {
        batch.push(src, dst, dst_offset, (rows, cols), parts);
    }
    batch.run()?;
    let stacked = |parts: Vec<Tensor>, shape: &[usize]| -> Result<Tensor> {
        let vals = parts
            .iter()
            .map(|t| t.to_f32_vec())
            .collect::<Result<Vec<_>>>()?;
        Tensor::from_f32_as(shape, vals.concat(), DType::BF16)
    };
    let a3_want = stacked(
        [&a, &a2]
            .iter()
            .map(|a| split3(a, 1, 1, r * inp, &[0], 1.0, Parts3::HiLoHi, &[3 * r, inp]))
            .collect::<Result<_>>()?,
        &[6 * r, inp],
    )?;
    let b3_want = split3(&b, out, 1, r, &[0], 1.0, Parts3::HiHiLo, &[out, 3 * r])?;
    let small_parts = small
        .iter()
        .map(|t| {
            let shape = [small_rows, 3 * small_cols];
            split3(
                t,
                small_rows,
                1,
                small_cols,
                &[0],
                1.0,
                Parts3::HiHiLo,
                &shape,
            )
        })
        .collect::<Result<_>>()?;
    let small3_want = stacked(small_parts, &small_shape)?;
    for (case, got, want) in [
        ("multi 2 x A [16, 4096] stacked", &a3, &a3_want),
        ("multi B [14336, 16]", &b3, &b3_want),
        ("multi 70 x [37, 5] (two tables)", &small3, &small3_want),
    ] {
        lines.push(compare_with_tol(OP, case, "split", got, want, exact)?);
    }
    // Several folds in one launch, one reading from an offset into its source.
    let src = Tensor::from_f32(&[2 * 3 * r, inp], rng.normal_vec(6 * r * inp, 1.0))?;
    let tb = Tensor::from_f32(&[out, 3 * r], rng.normal_vec(out * 3 * r, 1.0))?;
    let da = Tensor::from_f32(&[r, inp], rng.normal_vec(r * inp, 1.0))?;
    let db = Tensor::from_f32(&[out, r], rng.normal_vec(out * r, 1.0))?;
    let (srcg, tbg) = (to_gpu(&src)?, to_gpu(&tb)?);
    let (mut da_want, mut db_want) = (da.to_cpu()?, db.to_cpu()?);
    let (mut da_got, mut db_got) = (to_gpu(&da)?, to_gpu(&db)?);
    let folds = |da: &mut Tensor, db: &mut Tensor, src: &Tensor, tb: &Tensor| -> Result<()> {
        fold_multi(&mut [
            FoldJob {
                dst: da,
                src,
                src_offset: 3 * r * inp,
                rows: 1,
                blocks: 3,
                cols: r * inp,
                sum: [0, 2],
                scale: 1.0,
            },
            FoldJob {
                dst: db,
                src: tb,
                src_offset: 0,
                rows: out,
                blocks: 3,
                cols: r,
                sum: [0, 1],
                scale: 0.5,
            },
        ])
    };
    folds(&mut da_want, &mut db_want, &src, &tb)?;
    folds(&mut da_got, &mut db_got, &srcg, &tbg)?;
    lines.push(compare_with_tol(
        OP,
        "multi fold dA [16, 4096] at offset",
        "fold",
        &da_got,
        &da_want,
        exact,
    )?);
    lines.push(compare_with_tol(
        OP,
        "multi fold dB [14336, 16]",
        "fold",
        &db_got,
        &db_want,
        exact,
    )?);
    Ok(lines)
}

pub const CHECK: GpuCheck = GpuCheck {
    op: OP,
    run: gpu_check,
};

#[cfg(test)]
mod tests {
    use super::*;

    fn f32s(t: &Tensor) -> Vec<f32> {
        t.to_f32_vec().unwrap()
    }

    /// hi + lo recovers v to about 2^-16 relative, far better than bf16's 2^-9.
    #[test]
    fn two_parts_carry_sixteen_bits() {
        let mut rng = Rng::new(7);
        for v in rng.normal_vec(10_000, 3.0) {
            let (hi, lo) = split_parts(v);
            assert!(
                ((hi + lo) - v).abs() <= v.abs() * 2f32.powi(-16),
                "{v}: {hi} + {lo}"
            );
            assert_eq!(hi, half::bf16::from_f32(v).to_f32());
        }
    }

    /// A product of a [hi|lo|hi] split with a [hi|hi|lo] split, as one bf16 GEMM computes it
    /// (exact bf16 products, f32 sums), matches the f64 product to ~1e-5 where plain bf16
    /// operands are off by ~1e-3.
    #[test]
    fn split_product_is_fp32_accurate() {
        let (n, k, m) = (37, 16, 29);
        let mut rng = Rng::new(3);
        let x = rng.normal_vec(n * k, 1.0);
        let w = rng.normal_vec(m * k, 1.0);
        let xs = split3(
            &Tensor::from_f32(&[n, k], x.clone()).unwrap(),
            n,
            1,
            k,
            &[0],
            1.0,
            Parts3::HiLoHi,
            &[n, 3 * k],
        )
        .unwrap();
        let ws = split3(
            &Tensor::from_f32(&[m, k], w.clone()).unwrap(),
            m,
            1,
            k,
            &[0],
            1.0,
            Parts3::HiHiLo,
            &[m, 3 * k],
        )
        .unwrap();
        let (xs, ws) = (f32s(&xs), f32s(&ws));
        let (mut err_split, mut err_bf16, mut norm) = (0f64, 0f64, 0f64);
        for i in 0..n {
            for j in 0..m {
                let exact: f64 = (0..k)
                    .map(|t| x[i * k + t] as f64 * w[j * k + t] as f64)
                    .sum();
                let split: f32 = (0..3 * k)
                    .map(|t| xs[i * 3 * k + t] * ws[j * 3 * k + t])
                    .sum();
                let bf: f32 = (0..k)
                    .map(|t| split_parts(x[i * k + t]).0 * split_parts(w[j * k + t]).0)
                    .sum();
                err_split += (split as f64 - exact).powi(2);
                err_bf16 += (bf as f64 - exact).powi(2);
                norm += exact * exact;
            }
        }
        let (es, eb) = ((err_split / norm).sqrt(), (err_bf16 / norm).sqrt());
        assert!(es < 2e-5, "split {es:e}");
        assert!(eb > 1e-3, "plain bf16 {eb:e}");
    }

    /// split3 sums the chosen source blocks, scales, and lays the parts out as asked.
    #[test]
    fn split3_sums_scales_and_lays_out() {
        let (rows, cols) = (5, 3);
        let src: Vec<f32> = (0..rows * 3 * cols)
            .map(|i| i as f32 * 0.37 - 4.0)
            .collect();
        let t = Tensor::from_f32(&[rows, 3 * cols], src.clone()).unwrap();
        let out = f32s(
            &split3(
                &t,
                rows,
                3,
                cols,
                &[0, 2],
                0.5,
                Parts3::HiHiLo,
                &[rows, 3 * cols],
            )
            .unwrap(),
        );
        for r in 0..rows {
            for c in 0..cols {
                let v = 0.5 * (src[r * 3 * cols + c] + src[r * 3 * cols + 2 * cols + c]);
                let (hi, lo) = split_parts(v);
                let o = |b: usize| out[r * 3 * cols + b * cols + c];
                assert_eq!((o(0), o(1), o(2)), (hi, hi, lo));
            }
        }
    }

    #[test]
    fn fold_adds_two_blocks_into_the_accumulator() {
        let (rows, cols) = (4, 6);
        let src: Vec<f32> = (0..rows * 3 * cols).map(|i| i as f32).collect();
        let mut dst = Tensor::from_f32(&[rows, cols], vec![1.0; rows * cols]).unwrap();
        fold_into(
            &mut dst,
            &Tensor::from_f32(&[rows * 3 * cols], src.clone()).unwrap(),
            rows,
            3,
            cols,
            [0, 1],
            2.0,
        )
        .unwrap();
        let d = f32s(&dst);
        for r in 0..rows {
            for c in 0..cols {
                let want = 1.0 + 2.0 * (src[r * 3 * cols + c] + src[r * 3 * cols + cols + c]);
                assert_eq!(d[r * cols + c], want);
            }
        }
    }

    #[test]
    fn multi_equals_single_splits_on_the_cpu() {
        let a = Tensor::from_f32(&[4, 10], Rng::new(1).normal_vec(40, 0.1)).unwrap();
        let a2 = Tensor::from_f32(&[4, 10], Rng::new(3).normal_vec(40, 0.1)).unwrap();
        let b = Tensor::from_f32(&[7, 4], Rng::new(2).normal_vec(28, 0.1)).unwrap();
        let mut a3 = Tensor::zeros(&[24, 10], DType::BF16, &Device::Cpu).unwrap();
        let mut b3 = Tensor::zeros(&[7, 12], DType::BF16, &Device::Cpu).unwrap();
        // The second A first: each job writes only its own rows of the stacked buffer.
        let mut batch = SplitBatch::default();
        let (ia3, ib3) = (batch.dst(&mut a3), batch.dst(&mut b3));
        batch.push(&b, ib3, 0, (7, 4), Parts3::HiHiLo);
        batch.push(&a2, ia3, 120, (1, 40), Parts3::HiLoHi);
        batch.push(&a, ia3, 0, (1, 40), Parts3::HiLoHi);
        batch.run().unwrap();
        let want_a: Vec<f32> = [&a, &a2]
            .iter()
            .flat_map(|a| f32s(&split3(a, 1, 1, 40, &[0], 1.0, Parts3::HiLoHi, &[12, 10]).unwrap()))
            .collect();
        let want_b = split3(&b, 7, 1, 4, &[0], 1.0, Parts3::HiHiLo, &[7, 12]).unwrap();
        assert_eq!(f32s(&a3), want_a);
        assert_eq!(f32s(&b3), f32s(&want_b));
        // A buffer too short for the job, or a job naming no buffer, is an error naming
        // it, not a panic.
        let one_job = |dst, dst_offset, b3: &mut Tensor| {
            let mut batch = SplitBatch::default();
            batch.dst(b3);
            batch.push(&a, dst, dst_offset, (1, 40), Parts3::HiLoHi);
            batch.run().unwrap_err()
        };
        let err = one_job(0, 80, &mut b3);
        let missing = one_job(1, 0, &mut b3);
        assert!(
            missing.to_string().contains("destination 1 of 1"),
            "{missing}"
        );
        assert!(err.to_string().contains("cannot hold"), "{err}");
    }

    /// Folds in one call equal single folds, reading their source from an offset.
    #[test]
    fn multi_fold_equals_single_folds_on_the_cpu() {
        let mut rng = Rng::new(5);
        let src = Tensor::from_f32(&[2, 3, 12], rng.normal_vec(72, 1.0)).unwrap();
        let start = Tensor::from_f32(&[4, 3], rng.normal_vec(12, 1.0)).unwrap();
        let tail = Tensor::from_f32(&[36], f32s(&src)[36..].to_vec()).unwrap();
        let mut want = start.to_cpu().unwrap();
        fold_into(&mut want, &tail, 4, 3, 3, [0, 2], 0.5).unwrap();
        let mut got = start.to_cpu().unwrap();
        fold_multi(&mut [FoldJob {
            dst: &mut got,
            src: &src,
            src_offset: 36,
            rows: 4,
            blocks: 3,
            cols: 3,
            sum: [0, 2],
            scale: 0.5,
        }])
        .unwrap();
        assert_eq!(f32s(&got), f32s(&want));
        assert!(fold_multi(&mut [FoldJob {
            dst: &mut got,
            src: &src,
            src_offset: 40,
            rows: 4,
            blocks: 3,
            cols: 3,
            sum: [0, 2],
            scale: 0.5,
        }])
        .is_err());
    }

    /// The whole adapter path through the splits against f64 math on the same bf16 x, dy and
    /// f32 A, B: the update, dA, dB and the adapter's input gradient all within ~1e-5
    /// (plain bf16 operands: ~3e-3).
    #[test]
    fn adapter_path_through_splits_is_fp32_accurate() {
        let (n, inp, out, r, scale) = (45, 70, 33, 6, 0.7f32);
        let mut rng = Rng::new(11);
        let bf = |v: Vec<f32>, shape: &[usize]| Tensor::from_f32_as(shape, v, DType::BF16).unwrap();
        let x = bf(rng.normal_vec(n * inp, 1.0), &[3, n / 3, inp]);
        let dy = bf(rng.normal_vec(n * out, 1.0), &[3, n / 3, out]);
        let a = Tensor::from_f32(&[r, inp], rng.normal_vec(r * inp, 0.1)).unwrap();
        let b = Tensor::from_f32(&[out, r], rng.normal_vec(out * r, 0.1)).unwrap();
        let sp = LoraSplit::many(&[(&a, &b)]).unwrap().pop().unwrap();
        assert_eq!(sp.rank(), r);

        let xa3 = split_xa(&x, &sp).unwrap();
        assert_eq!(xa3.shape(), &[3, n / 3, 3 * r]);
        let mut y = Tensor::zeros(&[n, out], DType::F32, &Device::Cpu).unwrap();
        split_update_into(&xa3, &sp, &mut y, scale, 0.0).unwrap();
        let mut da = Tensor::zeros(&[r, inp], DType::F32, &Device::Cpu).unwrap();
        let mut db = Tensor::zeros(&[out, r], DType::F32, &Device::Cpu).unwrap();
        let d3 = split_adapter_grads(&dy, &x, &xa3, &sp, &mut da, &mut db, scale).unwrap();
        let mut dx = Tensor::zeros(&[n, inp], DType::F32, &Device::Cpu).unwrap();
        split_input_grad_into(&d3, &sp, &mut dx, 0.0).unwrap();

        let (xv, dyv, av, bv) = (f32s(&x), f32s(&dy), f32s(&a), f32s(&b));
        let dot = |f: &dyn Fn(usize) -> f64, k: usize| (0..k).map(f).sum::<f64>();
        let xa: Vec<f64> = (0..n * r)
            .map(|e| {
                dot(
                    &|t| xv[e / r * inp + t] as f64 * av[e % r * inp + t] as f64,
                    inp,
                )
            })
            .collect();
        let dxa: Vec<f64> = (0..n * r)
            .map(|e| {
                scale as f64
                    * dot(
                        &|t| dyv[e / r * out + t] as f64 * bv[t * r + e % r] as f64,
                        out,
                    )
            })
            .collect();
        let y_want: Vec<f64> = (0..n * out)
            .map(|e| scale as f64 * dot(&|k| xa[e / out * r + k] * bv[e % out * r + k] as f64, r))
            .collect();
        let db_want: Vec<f64> = (0..out * r)
            .map(|e| scale as f64 * dot(&|t| dyv[t * out + e / r] as f64 * xa[t * r + e % r], n))
            .collect();
        let da_want: Vec<f64> = (0..r * inp)
            .map(|e| dot(&|t| dxa[t * r + e / inp] * xv[t * inp + e % inp] as f64, n))
            .collect();
        let dx_want: Vec<f64> = (0..n * inp)
            .map(|e| dot(&|k| dxa[e / inp * r + k] * av[k * inp + e % inp] as f64, r))
            .collect();
        let rel = |got: &Tensor, want: &[f64]| {
            let g = f32s(got);
            let num: f64 = g
                .iter()
                .zip(want)
                .map(|(a, b)| (*a as f64 - b).powi(2))
                .sum();
            (num / want.iter().map(|b| b * b).sum::<f64>()).sqrt()
        };
        for (name, got, want) in [
            ("y", &y, &y_want),
            ("dB", &db, &db_want),
            ("dA", &da, &da_want),
            ("dx", &dx, &dx_want),
        ] {
            let e = rel(got, want);
            assert!(e < 2e-5, "{name}: {e:e}");
        }
    }

    #[test]
    fn bad_inputs_are_errors_naming_the_op() {
        let t = Tensor::from_f32(&[4, 6], vec![0.0; 24]).unwrap();
        for e in [
            split3(&t, 4, 3, 3, &[0], 1.0, Parts3::HiLoHi, &[4, 9]).unwrap_err(),
            split3(&t, 4, 3, 2, &[3], 1.0, Parts3::HiLoHi, &[4, 6]).unwrap_err(),
            split3(&t, 4, 3, 2, &[0], 1.0, Parts3::HiLoHi, &[4, 7]).unwrap_err(),
            fold_into(&mut t.to_cpu().unwrap(), &t, 4, 3, 2, [0, 3], 1.0).unwrap_err(),
        ] {
            assert!(e.to_string().contains(OP), "{e}");
        }
        let bf = Tensor::zeros(&[4, 6], DType::BF16, &Device::Cpu).unwrap();
        let e = split3(&bf, 4, 3, 2, &[0], 1.0, Parts3::HiLoHi, &[4, 6]).unwrap_err();
        assert!(e.to_string().contains("src"), "{e}");
    }
}
