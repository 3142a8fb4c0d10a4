//! Token embedding: the forward gathers rows of a `[vocab, hidden]` table by i32 token id;
//! the backward scatter-adds `dy` into a caller-provided f32 `[vocab, hidden]` gradient
//! (accumulating, so several micro-batches can add into one buffer). Under LoRA the table is
//! frozen and the backward is not run.
//!
//! An id outside `[0, vocab)` is an error naming the op, the id, its position and the
//! vocabulary size. On the GPU the kernel records the first bad id in a small device buffer
//! (and touches no memory for it), which the launcher reads back after the kernel: one
//! synchronisation per call, the price of never returning garbage.

use std::sync::Arc;

use crate::bench::{measure, BenchConfig, BenchRow, KernelBench};
use crate::check::{compare, random_pair_par, CheckLine, GpuCheck};
use crate::cpu::par_rows;
use crate::cuda::{Gpu, KernelSource};
use crate::error::{KernelError, Result};
use crate::rng::Rng;
use crate::{launch, DType, Device, Tensor};

use super::{common_gpu, expect_dtype};

pub const SOURCE: KernelSource = KernelSource {
    name: "embedding",
    src: include_str!("../../kernels/embedding.cu"),
};

const OP: &str = "embedding";
const BWD: &str = "embedding_backward";

/// `(vocab, hidden)` of a 2-D table or gradient.
fn table_dims(op: &'static str, name: &str, t: &Tensor) -> Result<(usize, usize)> {
    match *t.shape() {
        [vocab, hidden] => Ok((vocab, hidden)),
        _ => Err(KernelError::shape(
            op,
            format!(
                "`{name}` has shape {:?}, expected [vocab, hidden]",
                t.shape()
            ),
        )),
    }
}

fn bad_id(op: &'static str, id: i32, pos: usize, vocab: usize) -> KernelError {
    KernelError::invalid(
        op,
        format!("token id {id} at position {pos} is outside the vocabulary [0, {vocab})"),
    )
}

fn cpu_check_ids(op: &'static str, ids: &[i32], vocab: usize) -> Result<()> {
    match ids.iter().position(|&id| id < 0 || id as usize >= vocab) {
        Some(pos) => Err(bad_id(op, ids[pos], pos, vocab)),
        None => Ok(()),
    }
}

/// Read back the kernel's {flag, id, position} record.
fn gpu_check_ids(op: &'static str, bad: &Tensor, vocab: usize) -> Result<()> {
    let rec = bad.to_i32_vec()?;
    if rec[0] != 0 {
        return Err(bad_id(op, rec[1], rec[2] as usize, vocab));
    }
    Ok(())
}

/// `out[..., :] = table[ids[...], :]`: shape `ids.shape + [hidden]`, the table's dtype.
pub fn embedding_forward(ids: &Tensor, table: &Tensor) -> Result<Tensor> {
    expect_dtype(OP, "ids", ids, &[DType::I32])?;
    expect_dtype(OP, "table", table, &[DType::F32, DType::BF16])?;
    let (vocab, hidden) = table_dims(OP, "table", table)?;
    let n = ids.elem_count();
    let mut shape = ids.shape().to_vec();
    shape.push(hidden);
    let dt = table.dtype();
    match common_gpu(OP, &[("ids", ids), ("table", table)])? {
        None => {
            let idv = ids.cpu_i32();
            cpu_check_ids(OP, idv, vocab)?;
            let t = table.cpu_f32();
            let mut out = vec![0.0f32; n * hidden];
            par_rows(&mut out, hidden, |i, o| {
                let id = idv[i] as usize;
                o.copy_from_slice(&t[id * hidden..(id + 1) * hidden]);
            });
            Tensor::from_f32_as(&shape, out, dt)
        }
        Some(gpu) => {
            let out = Tensor::uninit_cuda(&gpu, &shape, dt)?;
            if n * hidden == 0 {
                return Ok(out);
            }
            let bad = Tensor::zeros(&[3], DType::I32, &Device::Cuda(gpu.clone()))?;
            // The widest unit that divides a row and keeps every access aligned.
            let row_bytes = hidden * dt.size_in_bytes();
            let aligned = |a: usize| {
                row_bytes.is_multiple_of(a)
                    && table.dptr().is_multiple_of(a as u64)
                    && out.dptr().is_multiple_of(a as u64)
            };
            let unit = [16usize, 4, 2]
                .into_iter()
                .find(|&a| aligned(a))
                .unwrap_or(2);
            let units = row_bytes / unit;
            let f = gpu.function(&SOURCE, &format!("embedding_forward_b{unit}"))?;
            let threads = units.div_ceil(32).clamp(1, 8) as u32 * 32;
            let grid = n.min(gpu.sm_count() * 16) as u32;
            launch!(gpu, f, (grid, 1, 1), (threads, 1, 1), 0;
                ids.dptr(), table.dptr(), out.dptr(), bad.dptr(),
                n as i64, vocab as i64, units as i64)?;
            gpu_check_ids(OP, &bad, vocab)?;
            Ok(out)
        }
    }
}

/// `dtable[ids[i], :] += dy[i, :]` for every token `i` (dtable f32 `[vocab, hidden]`; `dy`
/// bf16 or f32 with `ids.elem_count()` rows of `hidden`). Nothing is added when an id is
/// out of range on the CPU; on the GPU the other tokens' rows are still added.
pub fn embedding_backward(ids: &Tensor, dy: &Tensor, dtable: &mut Tensor) -> Result<()> {
    expect_dtype(BWD, "ids", ids, &[DType::I32])?;
    expect_dtype(BWD, "dy", dy, &[DType::F32, DType::BF16])?;
    expect_dtype(BWD, "dtable", dtable, &[DType::F32])?;
    let (vocab, hidden) = table_dims(BWD, "dtable", dtable)?;
    let n = ids.elem_count();
    let (dy_rows, dy_cols) = dy.rows_cols();
    if dy.shape().is_empty() || dy_cols != hidden || dy_rows != n {
        return Err(KernelError::shape(
            BWD,
            format!(
                "dy {:?} must hold one row of hidden = {hidden} per id: ids {:?}, dtable {:?}",
                dy.shape(),
                ids.shape(),
                dtable.shape()
            ),
        ));
    }
    match common_gpu(BWD, &[("ids", ids), ("dy", dy), ("dtable", dtable)])? {
        None => {
            let idv = ids.cpu_i32();
            cpu_check_ids(BWD, idv, vocab)?;
            // Tokens grouped by id, in order, so each table row is summed by one thread in
            // f64 (from its current value), independent of the thread count.
            let mut order: Vec<usize> = (0..n).collect();
            order.sort_by_key(|&i| idv[i]);
            let mut start = vec![0usize; vocab + 1];
            for &i in &order {
                start[idv[i] as usize + 1] += 1;
            }
            for v in 0..vocab {
                start[v + 1] += start[v];
            }
            let new = {
                let (d, t) = (dy.cpu_f32(), dtable.cpu_f32());
                let mut new = t.to_vec();
                par_rows(&mut new, hidden, |v, row| {
                    let tokens = &order[start[v]..start[v + 1]];
                    if tokens.is_empty() {
                        return;
                    }
                    for (c, out) in row.iter_mut().enumerate() {
                        let s: f64 = tokens.iter().map(|&i| d[i * hidden + c] as f64).sum();
                        *out = (*out as f64 + s) as f32;
                    }
                });
                new
            };
            dtable.cpu_store_f32(&new);
            Ok(())
        }
        Some(gpu) => {
            if n * hidden == 0 {
                return Ok(());
            }
            let bad = Tensor::zeros(&[3], DType::I32, &Device::Cuda(gpu.clone()))?;
            let vec4 = hidden.is_multiple_of(4)
                && dtable.dptr().is_multiple_of(16)
                && dy
                    .dptr()
                    .is_multiple_of(4 * dy.dtype().size_in_bytes() as u64);
            let name = format!(
                "embedding_backward_{}_{}",
                if vec4 { "vec4" } else { "any" },
                dy.dtype().kernel_suffix()
            );
            let per_thread = if vec4 { 4 } else { 1 };
            let threads = hidden.div_ceil(per_thread).div_ceil(32).clamp(1, 8) as u32 * 32;
            let grid = n.min(gpu.sm_count() * 16) as u32;
            let f = gpu.function(&SOURCE, &name)?;
            launch!(gpu, f, (grid, 1, 1), (threads, 1, 1), 0;
                ids.dptr(), dy.dptr(), dtable.dptr(), bad.dptr(),
                n as i64, vocab as i64, hidden as i64)?;
            gpu_check_ids(BWD, &bad, vocab)
        }
    }
}

pub const CHECK: GpuCheck = GpuCheck {
    op: OP,
    run: gpu_check,
};

/// Ids like text: half from a small set of frequent tokens (so rows repeat and the backward
/// adds several tokens into one row), half uniform over the vocabulary.
fn random_ids(rng: &mut Rng, n: usize, vocab: usize) -> Vec<i32> {
    (0..n)
        .map(|i| {
            let range = if i % 2 == 0 { vocab.min(64) } else { vocab };
            rng.below(range) as i32
        })
        .collect()
}

fn gpu_check(gpu: &Arc<Gpu>, rng: &mut Rng) -> Result<Vec<CheckLine>> {
    let dev = Device::Cuda(gpu.clone());
    let mut lines = Vec::new();
    // (dtype of table and dy, vocab, hidden, tokens, start dtable from random values, what)
    let cases = [
        (DType::BF16, 128256, 4096, 8192, false, "Llama-3-8B"),
        (DType::F32, 1000, 77, 5000, true, "odd hidden, accumulate"),
        (DType::BF16, 517, 100, 999, true, "4-byte rows units"),
        (DType::BF16, 300, 33, 257, true, "odd bf16 rows"),
        (DType::F32, 5000, 2048, 3000, true, "f32"),
    ];
    for (dt, vocab, hidden, n, accumulate, what) in cases {
        let case = format!("{dt} vocab {vocab} x {hidden}, {n} ids ({what})");
        let ids = Tensor::from_i32(&[n], random_ids(rng, n, vocab))?;
        let gids = ids.to_device(&dev)?;
        let (table, gtable) = random_pair_par(gpu, rng, &[vocab, hidden], dt, 1.0)?;
        let y = embedding_forward(&ids, &table)?;
        let gy = embedding_forward(&gids, &gtable)?;
        lines.push(compare(OP, &case, "y", &gy, &y)?);
        drop((table, gtable));
        let (dy, gdy) = random_pair_par(gpu, rng, &[n, hidden], dt, 1.0)?;
        // From zeros, the error measures only the rows the tokens touch.
        let (mut dt_cpu, mut dt_gpu) = if accumulate {
            random_pair_par(gpu, rng, &[vocab, hidden], DType::F32, 1.0)?
        } else {
            let z = Tensor::zeros(&[vocab, hidden], DType::F32, &Device::Cpu)?;
            let gz = Tensor::zeros(&[vocab, hidden], DType::F32, &dev)?;
            (z, gz)
        };
        embedding_backward(&ids, &dy, &mut dt_cpu)?;
        embedding_backward(&gids, &gdy, &mut dt_gpu)?;
        lines.push(compare(OP, &case, "dtable", &dt_gpu, &dt_cpu)?);
    }
    // A bad id must come back as an error naming it, in both directions.
    let (vocab, hidden) = (1000, 64);
    let mut idv = random_ids(rng, 300, vocab);
    idv[123] = vocab as i32;
    idv[200] = -5;
    let gids = Tensor::from_i32(&[300], idv)?.to_device(&dev)?;
    let (_, gtable) = random_pair_par(gpu, rng, &[vocab, hidden], DType::BF16, 1.0)?;
    let (_, gdy) = random_pair_par(gpu, rng, &[300, hidden], DType::BF16, 1.0)?;
    let mut gdt = Tensor::zeros(&[vocab, hidden], DType::F32, &dev)?;
    let outcomes = [
        ("forward", embedding_forward(&gids, &gtable).map(|_| ())),
        ("backward", embedding_backward(&gids, &gdy, &mut gdt)),
    ];
    for (dir, outcome) in outcomes {
        let named = match outcome {
            Err(KernelError::Invalid { detail, .. }) => {
                (detail.contains("1000") && detail.contains("position 123"))
                    || (detail.contains("-5") && detail.contains("position 200"))
            }
            _ => false,
        };
        lines.push(CheckLine {
            op: OP.into(),
            case: format!("ids with {vocab} and -5, vocab {vocab}"),
            output: format!("{dir} error"),
            dtype: DType::I32,
            rel_err: if named { 0.0 } else { f64::INFINITY },
            tol: 1e-5,
            pass: named,
        });
    }
    Ok(lines)
}

pub const BENCH: KernelBench = KernelBench { op: OP, run: bench };

/// Llama-3-8B: 8192 tokens, vocab 128256 x 4096, bf16 table, f32 gradient table.
fn bench(gpu: &Arc<Gpu>, cfg: &BenchConfig) -> Result<Vec<BenchRow>> {
    let (vocab, hidden, n) = (128256, 4096, 8192);
    let dev = Device::Cuda(gpu.clone());
    let mut rng = Rng::new(10);
    let ids = Tensor::from_i32(&[n], random_ids(&mut rng, n, vocab))?.to_device(&dev)?;
    let (_, table) = random_pair_par(gpu, &mut rng, &[vocab, hidden], DType::BF16, 1.0)?;
    let (_, dy) = random_pair_par(gpu, &mut rng, &[n, hidden], DType::BF16, 1.0)?;
    let mut dtable = Tensor::zeros(&[vocab, hidden], DType::F32, &dev)?;
    let shape = format!("{n} ids, {vocab}x{hidden} bf16");
    // Forward reads ids and n table rows and writes n rows; backward reads dy and
    // reads + writes n rows of the f32 gradient.
    let fwd_floor = (4 * n + 2 * 2 * n * hidden) as f64;
    let floor = fwd_floor + (2 * n * hidden + 2 * 4 * n * hidden) as f64;
    let fwd = measure(gpu, cfg, OP, "fwd", &shape, fwd_floor, 0.0, || {
        embedding_forward(&ids, &table).map(|_| ())
    })?;
    let both = measure(gpu, cfg, OP, "fwd+bwd", &shape, floor, 0.0, || {
        let _y = embedding_forward(&ids, &table)?;
        embedding_backward(&ids, &dy, &mut dtable)
    })?;
    Ok(vec![fwd, both])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forward_gathers_rows() {
        let mut rng = Rng::new(41);
        let (vocab, hidden) = (11, 7);
        let tv = rng.normal_vec(vocab * hidden, 1.0);
        for dt in [DType::F32, DType::BF16] {
            let table = Tensor::from_f32_as(&[vocab, hidden], tv.clone(), dt).unwrap();
            let ids = Tensor::from_i32(&[2, 3], vec![3, 0, 10, 3, 7, 1]).unwrap();
            let y = embedding_forward(&ids, &table).unwrap();
            assert_eq!(y.shape(), &[2, 3, hidden]);
            assert_eq!(y.dtype(), dt);
            let (yv, tq) = (y.to_f32_vec().unwrap(), table.to_f32_vec().unwrap());
            for (i, &id) in [3usize, 0, 10, 3, 7, 1].iter().enumerate() {
                assert_eq!(
                    &yv[i * hidden..(i + 1) * hidden],
                    &tq[id * hidden..(id + 1) * hidden]
                );
            }
        }
    }

    /// The backward is the transpose of the gather: for L = sum(y * dy), dL/dtable[v, c] is
    /// the sum of dy[i, c] over the tokens i with id v; checked in f64 against that, added on
    /// top of the existing gradient.
    #[test]
    fn backward_scatter_adds_into_the_gradient() {
        let mut rng = Rng::new(42);
        let (vocab, hidden, n) = (9, 13, 40);
        let idv = random_ids(&mut rng, n, vocab);
        let dv = rng.normal_vec(n * hidden, 1.0);
        let start = rng.normal_vec(vocab * hidden, 1.0);
        let ids = Tensor::from_i32(&[n], idv.clone()).unwrap();
        let dy = Tensor::from_f32(&[n, hidden], dv.clone()).unwrap();
        let mut dtable = Tensor::from_f32(&[vocab, hidden], start.clone()).unwrap();
        embedding_backward(&ids, &dy, &mut dtable).unwrap();
        let mut want: Vec<f64> = start.iter().map(|&v| v as f64).collect();
        for i in 0..n {
            for c in 0..hidden {
                want[idv[i] as usize * hidden + c] += dv[i * hidden + c] as f64;
            }
        }
        let want: Vec<f32> = want.iter().map(|&v| v as f32).collect();
        assert_eq!(dtable.to_f32_vec().unwrap(), want);
        // A second call accumulates again.
        embedding_backward(&ids, &dy, &mut dtable).unwrap();
        let twice = dtable.to_f32_vec().unwrap();
        let row = idv[0] as usize * hidden;
        let sum0: f64 = (0..n)
            .filter(|&i| idv[i] == idv[0])
            .map(|i| dv[i * hidden] as f64)
            .sum();
        assert!((twice[row] as f64 - (start[row] as f64 + 2.0 * sum0)).abs() < 1e-5);
    }

    #[test]
    fn backward_takes_bf16_dy() {
        let ids = Tensor::from_i32(&[3], vec![1, 1, 0]).unwrap();
        let dy = Tensor::from_f32_as(&[3, 2], vec![0.5, 1.5, 0.25, -1.0, 2.0, 3.0], DType::BF16)
            .unwrap();
        let mut dt = Tensor::zeros(&[2, 2], DType::F32, &Device::Cpu).unwrap();
        embedding_backward(&ids, &dy, &mut dt).unwrap();
        assert_eq!(dt.to_f32_vec().unwrap(), vec![2.0, 3.0, 0.75, 0.5]);
    }

    #[test]
    fn bad_ids_name_the_op_the_id_and_vocab() {
        let table = Tensor::from_f32(&[5, 2], vec![1.0; 10]).unwrap();
        let ids = Tensor::from_i32(&[3], vec![0, 5, 1]).unwrap();
        let e = embedding_forward(&ids, &table).err().unwrap().to_string();
        assert!(
            e.contains("embedding") && e.contains("id 5") && e.contains("[0, 5)"),
            "{e}"
        );
        let neg = Tensor::from_i32(&[2], vec![-1, 0]).unwrap();
        let e = embedding_forward(&neg, &table).err().unwrap().to_string();
        assert!(e.contains("id -1") && e.contains("position 0"), "{e}");
        // The backward refuses before adding anything.
        let dy = Tensor::from_f32(&[3, 2], vec![1.0; 6]).unwrap();
        let mut dt = Tensor::zeros(&[5, 2], DType::F32, &Device::Cpu).unwrap();
        let e = embedding_backward(&ids, &dy, &mut dt)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("embedding_backward") && e.contains("id 5") && e.contains("[0, 5)"),
            "{e}"
        );
        assert!(dt.to_f32_vec().unwrap().iter().all(|&v| v == 0.0));
    }

    #[test]
    fn bad_shapes_and_dtypes_name_the_op() {
        let table = Tensor::from_f32(&[5, 2], vec![1.0; 10]).unwrap();
        let fids = Tensor::from_f32(&[2], vec![0.0, 1.0]).unwrap();
        let e = embedding_forward(&fids, &table).err().unwrap().to_string();
        assert!(
            e.contains("embedding") && e.contains("ids") && e.contains("i32"),
            "{e}"
        );
        let flat = Tensor::from_f32(&[10], vec![1.0; 10]).unwrap();
        let ids = Tensor::from_i32(&[2], vec![0, 1]).unwrap();
        let e = embedding_forward(&ids, &flat).err().unwrap().to_string();
        assert!(e.contains("embedding") && e.contains("[10]"), "{e}");
        let dy = Tensor::from_f32(&[3, 2], vec![1.0; 6]).unwrap();
        let mut dt = Tensor::zeros(&[5, 2], DType::F32, &Device::Cpu).unwrap();
        let e = embedding_backward(&ids, &dy, &mut dt)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("embedding_backward") && e.contains("[3, 2]") && e.contains("[2]"),
            "{e}"
        );
        let dy2 = Tensor::from_f32(&[2, 2], vec![1.0; 4]).unwrap();
        let mut dtb = Tensor::zeros(&[5, 2], DType::BF16, &Device::Cpu).unwrap();
        let e = embedding_backward(&ids, &dy2, &mut dtb)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("dtable") && e.contains("bf16"), "{e}");
    }
}
