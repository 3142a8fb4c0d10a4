//! Row copies by index, the gather and scatter behind fused linear cross-entropy's
//! `skip_ignored`: the rows of `h` that carry a label are gathered into a chunk for the
//! GEMMs, and the chunk's gradient rows are scattered back into `dh`. Crate-internal: the
//! callers build the indices themselves (in range and, for a scatter, distinct), so the
//! launch needs no check and no wait. The kernel still skips an index outside its tensor,
//! so that a bug there cannot write outside a buffer.

use std::sync::Arc;

use crate::check::{compare, random_pair_par, CheckLine, GpuCheck};
use crate::cuda::{Gpu, KernelSource};
use crate::error::Result;
use crate::rng::Rng;
use crate::{launch, DType, Device, Tensor};

use super::row_grid;

pub const SOURCE: KernelSource = KernelSource {
    name: "index_rows",
    src: include_str!("../../kernels/index_rows.cu"),
};

const OP: &str = "index_rows";

/// One launch: for `i < n`, row `dst_index[i]` (or `i`) of `dst` becomes row `src_index[i]`
/// (or `i`) of `src`. Addresses are device pointers; an index is a device array of `n` i32.
pub(crate) struct RowCopy {
    pub src: u64,
    pub src_index: Option<u64>,
    pub src_rows: usize,
    pub dst: u64,
    pub dst_index: Option<u64>,
    pub dst_rows: usize,
    pub n: usize,
    pub row_bytes: usize,
}

pub(crate) fn gpu_copy_rows(gpu: &Arc<Gpu>, c: &RowCopy) -> Result<()> {
    if c.n == 0 || c.row_bytes == 0 {
        return Ok(());
    }
    // The widest unit that divides a row and keeps every access aligned.
    let aligned = |a: usize| {
        c.row_bytes.is_multiple_of(a)
            && c.src.is_multiple_of(a as u64)
            && c.dst.is_multiple_of(a as u64)
    };
    let unit = [16usize, 4].into_iter().find(|&a| aligned(a)).unwrap_or(2);
    let units = c.row_bytes / unit;
    let f = gpu.function(&SOURCE, &format!("copy_rows_b{unit}"))?;
    let threads = units.div_ceil(32).clamp(1, 8) as u32 * 32;
    launch!(gpu, f, (row_grid(gpu, c.n, 16), 1, 1), (threads, 1, 1), 0;
        c.src, c.src_index.unwrap_or(0), c.src_rows as i64,
        c.dst, c.dst_index.unwrap_or(0), c.dst_rows as i64,
        c.n as i64, units as i64)
}

/// The CPU reference: the same copies on rows of `cols` values (an index outside its rows
/// is skipped, as on the GPU).
pub(crate) fn cpu_copy_rows<T: Copy>(
    src: &[T],
    src_index: Option<&[i32]>,
    dst: &mut [T],
    dst_index: Option<&[i32]>,
    n: usize,
    cols: usize,
) {
    let (src_rows, dst_rows) = (src.len() / cols.max(1), dst.len() / cols.max(1));
    for i in 0..n {
        let s = src_index.map_or(i as i64, |x| x[i] as i64);
        let d = dst_index.map_or(i as i64, |x| x[i] as i64);
        if s < 0 || s as usize >= src_rows || d < 0 || d as usize >= dst_rows {
            continue;
        }
        let (s, d) = (s as usize, d as usize);
        dst[d * cols..(d + 1) * cols].copy_from_slice(&src[s * cols..(s + 1) * cols]);
    }
}

pub const CHECK: GpuCheck = GpuCheck {
    op: OP,
    run: gpu_check,
};

/// `k` distinct row indices out of `rows`, in random order.
fn distinct_rows(rng: &mut Rng, rows: usize, k: usize) -> Vec<i32> {
    let mut all: Vec<i32> = (0..rows as i32).collect();
    for i in 0..k.min(rows) {
        let j = i + rng.below(rows - i);
        all.swap(i, j);
    }
    all.truncate(k);
    all
}

fn gpu_check(gpu: &Arc<Gpu>, rng: &mut Rng) -> Result<Vec<CheckLine>> {
    let dev = Device::Cuda(gpu.clone());
    let mut lines = Vec::new();
    // (dtype, src rows, cols, copied rows, what): 16-, 4- and 2-byte units.
    let cases = [
        (DType::BF16, 8192, 4096, 5000, "Llama-3-8B hidden rows"),
        (DType::F32, 1000, 77, 999, "f32, 4-byte units"),
        (DType::BF16, 300, 6, 120, "bf16, 4-byte units"),
        (DType::BF16, 257, 33, 200, "bf16, 2-byte units"),
    ];
    for (dt, rows, cols, n, what) in cases {
        let case = format!("{dt} {rows}x{cols}, {n} rows ({what})");
        let (src, gsrc) = random_pair_par(gpu, rng, &[rows, cols], dt, 1.0)?;
        let sv = src.to_f32_vec()?;
        let index = distinct_rows(rng, rows, n);
        let gindex = Tensor::from_i32(&[n], index.clone())?.to_device(&dev)?;
        let row_bytes = cols * dt.size_in_bytes();
        // Gather into a fresh (poisoned) buffer: every row must be written.
        let gathered = Tensor::uninit_cuda(gpu, &[n, cols], dt)?;
        let copy = RowCopy {
            src: gsrc.dptr(),
            src_index: Some(gindex.dptr()),
            src_rows: rows,
            dst: gathered.dptr(),
            dst_index: None,
            dst_rows: n,
            n,
            row_bytes,
        };
        gpu_copy_rows(gpu, &copy)?;
        let mut want = vec![0.0f32; n * cols];
        cpu_copy_rows(&sv, Some(&index), &mut want, None, n, cols);
        let want = Tensor::from_f32_as(&[n, cols], want, dt)?;
        lines.push(compare(OP, &case, "gather", &gathered, &want)?);
        // Scatter the gathered rows into a random destination: the other rows stay.
        let (dst, gdst) = random_pair_par(gpu, rng, &[rows, cols], dt, 1.0)?;
        let copy = RowCopy {
            src: gathered.dptr(),
            src_index: None,
            src_rows: n,
            dst: gdst.dptr(),
            dst_index: Some(gindex.dptr()),
            dst_rows: rows,
            n,
            row_bytes,
        };
        gpu_copy_rows(gpu, &copy)?;
        let mut want = dst.to_f32_vec()?;
        // From the GPU's gathered rows, so that this line checks the scatter alone.
        let rows_in = gathered.to_f32_vec()?;
        cpu_copy_rows(&rows_in, None, &mut want, Some(&index), n, cols);
        let want = Tensor::from_f32_as(&[rows, cols], want, dt)?;
        lines.push(compare(OP, &case, "scatter", &gdst, &want)?);
    }
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gathers_and_scatters_rows() {
        let src: Vec<i32> = (0..12).collect(); // 4 rows of 3
        let mut out = vec![-1; 6];
        cpu_copy_rows(&src, Some(&[3, 1]), &mut out, None, 2, 3);
        assert_eq!(out, [9, 10, 11, 3, 4, 5]);
        let mut dst = vec![0; 12];
        cpu_copy_rows(&out, None, &mut dst, Some(&[0, 2]), 2, 3);
        assert_eq!(dst, [9, 10, 11, 0, 0, 0, 3, 4, 5, 0, 0, 0]);
        // Both indexed; an index outside the rows is skipped.
        let mut dst = vec![0; 12];
        cpu_copy_rows(&src, Some(&[1, 7]), &mut dst, Some(&[3, 0]), 2, 3);
        assert_eq!(dst, [0, 0, 0, 0, 0, 0, 0, 0, 0, 3, 4, 5]);
    }

    #[test]
    fn distinct_rows_are_distinct_and_in_range() {
        let mut rng = Rng::new(5);
        let mut r = distinct_rows(&mut rng, 50, 30);
        assert_eq!(r.len(), 30);
        r.sort();
        r.dedup();
        assert_eq!(r.len(), 30);
        assert!(r.iter().all(|&x| (0..50).contains(&x)));
    }
}
