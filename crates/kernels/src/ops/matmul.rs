//! Matrix products: cuBLAS on the GPU (bf16 or f32 operands, fp32 accumulation), and a
//! row-parallel f32 reference on the CPU. Row-major, with optional transposes of either
//! operand; leading dims of a tensor are folded into its rows.

use std::sync::Arc;

use crate::bench::{measure, BenchConfig, BenchRow, KernelBench};
use crate::check::{compare, random_pair, random_pair_par, CheckLine, GpuCheck};
use crate::cpu::par_rows;
use crate::cuda::gemm::{GemmSpec, Operand};
use crate::cuda::gemm_lt::GemmMode;
use crate::cuda::Gpu;
use crate::error::{KernelError, Result};
use crate::rng::Rng;
use crate::{DType, Tensor};

use super::{common_gpu, expect_dtype};

/// (rows, cols) of `op(t)` where `t` is seen as 2-D (leading dims folded).
fn op_dims(t: &Tensor, trans: bool) -> (usize, usize) {
    let (r, c) = t.rows_cols();
    if trans {
        (c, r)
    } else {
        (r, c)
    }
}

/// `C = op(A) op(B)` as a new tensor of `out` dtype, shape `[m, n]`.
pub fn matmul(a: &Tensor, trans_a: bool, b: &Tensor, trans_b: bool, out: DType) -> Result<Tensor> {
    let (m, _) = op_dims(a, trans_a);
    let (_, n) = op_dims(b, trans_b);
    let mut c = match common_gpu("matmul", &[("a", a), ("b", b)])? {
        Some(gpu) => Tensor::uninit_cuda(&gpu, &[m, n], out)?,
        None => Tensor::zeros(&[m, n], out, &crate::Device::Cpu)?,
    };
    matmul_into(a, trans_a, b, trans_b, &mut c, 1.0, 0.0)?;
    Ok(c)
}

/// `C = alpha op(A) op(B) + beta C` in place (beta = 1 accumulates a gradient).
pub fn matmul_into(
    a: &Tensor,
    trans_a: bool,
    b: &Tensor,
    trans_b: bool,
    c: &mut Tensor,
    alpha: f32,
    beta: f32,
) -> Result<()> {
    const OP: &str = "matmul";
    for (name, t) in [("a", a), ("b", b)] {
        expect_dtype(OP, name, t, &[DType::F32, DType::BF16])?;
    }
    expect_dtype(OP, "c", c, &[DType::F32, DType::BF16])?;
    let (m, k) = op_dims(a, trans_a);
    let (k2, n) = op_dims(b, trans_b);
    let (cm, cn) = c.rows_cols();
    if k != k2 || cm != m || cn != n {
        return Err(KernelError::shape(
            OP,
            format!(
                "op(a) {:?}{} x op(b) {:?}{} -> c {:?}: inner dims {k} vs {k2}, output needs [{m}, {n}]",
                a.shape(),
                if trans_a { "^T" } else { "" },
                b.shape(),
                if trans_b { "^T" } else { "" },
                c.shape()
            ),
        ));
    }
    match common_gpu(OP, &[("a", a), ("b", b), ("c", c)])? {
        Some(gpu) => gpu_gemm(&gpu, a, trans_a, b, trans_b, c, m, n, k, alpha, beta),
        None => {
            let r = cpu_matmul(&a.cpu_f32(), trans_a, &b.cpu_f32(), trans_b, m, n, k);
            let old = c.cpu_f32().into_owned();
            let vals: Vec<f32> = r
                .iter()
                .zip(&old)
                .map(|(&p, &o)| alpha * p + if beta == 0.0 { 0.0 } else { beta * o })
                .collect();
            c.cpu_store_f32(&vals);
            Ok(())
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn gpu_gemm(
    gpu: &Arc<Gpu>,
    a: &Tensor,
    trans_a: bool,
    b: &Tensor,
    trans_b: bool,
    c: &Tensor,
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    beta: f32,
) -> Result<()> {
    let operand = |t: &Tensor, trans: bool| Operand {
        ptr: t.dptr(),
        dtype: t.dtype(),
        ld: t.rows_cols().1,
        trans,
        batch_stride: 0,
    };
    gpu.gemm(&GemmSpec {
        m,
        n,
        k,
        a: operand(a, trans_a),
        b: operand(b, trans_b),
        c: operand(c, false),
        alpha,
        beta,
        batch: 1,
    })
}

/// Rows `[r0, r0 + rows)` and columns `[c0, c0 + cols)` of a tensor seen as 2-D
/// `[rows, ld]` (leading dims folded): a GEMM operand through its leading dimension and a
/// pointer offset, nothing copied.
#[derive(Clone, Copy)]
pub(crate) struct Cols<'t> {
    pub t: &'t Tensor,
    pub r0: usize,
    pub rows: usize,
    pub c0: usize,
    pub cols: usize,
}

impl<'t> Cols<'t> {
    pub fn all(t: &'t Tensor) -> Cols<'t> {
        let (rows, cols) = t.rows_cols();
        Cols {
            t,
            r0: 0,
            rows,
            c0: 0,
            cols,
        }
    }

    /// Columns `[c0, c0 + cols)`, every row.
    pub fn of(t: &'t Tensor, c0: usize, cols: usize) -> Cols<'t> {
        Cols {
            c0,
            cols,
            ..Cols::all(t)
        }
    }

    /// Rows `[r0, r0 + rows)`, every column.
    pub fn rows(t: &'t Tensor, r0: usize, rows: usize) -> Cols<'t> {
        Cols {
            r0,
            rows,
            ..Cols::all(t)
        }
    }

    /// (rows, cols) of op(block).
    fn op_dims(&self, trans: bool) -> (usize, usize) {
        if trans {
            (self.cols, self.rows)
        } else {
            (self.rows, self.cols)
        }
    }

    fn fits(&self) -> bool {
        let (rows, ld) = self.t.rows_cols();
        self.r0 + self.rows <= rows && self.c0 + self.cols <= ld
    }

    fn operand(&self, trans: bool) -> Operand {
        let ld = self.t.rows_cols().1;
        Operand {
            ptr: self.t.dptr() + ((self.r0 * ld + self.c0) * self.t.dtype().size_in_bytes()) as u64,
            dtype: self.t.dtype(),
            ld,
            trans,
            batch_stride: 0,
        }
    }

    /// The block's values, row-major `[rows, cols]` (CPU).
    fn values(&self) -> Vec<f32> {
        let (rows, ld) = self.t.rows_cols();
        let all = self.t.cpu_f32();
        if self.c0 == 0 && self.cols == ld && self.r0 == 0 && self.rows == rows {
            return all.into_owned();
        }
        all.chunks(ld)
            .skip(self.r0)
            .take(self.rows)
            .flat_map(|row| row[self.c0..self.c0 + self.cols].iter().copied())
            .collect()
    }
}

/// `C[:, c0 .. c0 + n] = alpha op(A) op(B) + beta C[:, c0 .. c0 + n]` on blocks: cuBLAS
/// with offset pointers on the GPU; on the CPU the CPU GEMM with the same rounding as
/// [`matmul_into`] (C's other columns untouched).
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_cols(
    gpu: &Option<Arc<Gpu>>,
    a: Cols,
    ta: bool,
    b: Cols,
    tb: bool,
    c: &mut Tensor,
    c0: usize,
    alpha: f32,
    beta: f32,
) -> Result<()> {
    const OP: &str = "matmul";
    let (m, k) = a.op_dims(ta);
    let (k2, n) = b.op_dims(tb);
    let (cm, cn) = c.rows_cols();
    if k != k2 || cm != m || c0 + n > cn || !a.fits() || !b.fits() {
        return Err(KernelError::shape(
            OP,
            format!(
                "block product [{m}, {k}] x [{k2}, {n}] of {:?} and {:?} into columns {c0}.. of {:?}",
                a.t.shape(),
                b.t.shape(),
                c.shape()
            ),
        ));
    }
    match gpu {
        Some(gpu) => {
            let cop = Cols::of(c, c0, n).operand(false);
            gpu.gemm(&GemmSpec {
                m,
                n,
                k,
                a: a.operand(ta),
                b: b.operand(tb),
                c: cop,
                alpha,
                beta,
                batch: 1,
            })
        }
        None => {
            let p = cpu_matmul(&a.values(), ta, &b.values(), tb, m, n, k);
            let mut vals = c.cpu_f32().into_owned();
            for (row, prow) in vals.chunks_mut(cn).zip(p.chunks(n.max(1))) {
                for (o, &pv) in row[c0..c0 + n].iter_mut().zip(prow) {
                    *o = alpha * pv + if beta == 0.0 { 0.0 } else { beta * *o };
                }
            }
            c.cpu_store_f32(&vals);
            Ok(())
        }
    }
}

/// Row-major `[m, n]` product in f32. Both operands are first laid out with `k` contiguous
/// (`A` as `[m, k]`, `B` as `[n, k]`), so the inner loop is a contiguous dot product that the
/// compiler vectorises; rows of C are spread over threads.
pub fn cpu_matmul(
    a: &[f32],
    trans_a: bool,
    b: &[f32],
    trans_b: bool,
    m: usize,
    n: usize,
    k: usize,
) -> Vec<f32> {
    let a_rows: std::borrow::Cow<[f32]> = if trans_a {
        transpose(a, k, m).into()
    } else {
        a.into()
    };
    let b_rows: std::borrow::Cow<[f32]> = if trans_b {
        b.into()
    } else {
        transpose(b, k, n).into()
    };
    let mut c = vec![0.0f32; m * n];
    par_rows(&mut c, n.max(1), |i, row| {
        let ai = &a_rows[i * k..(i + 1) * k];
        for (j, out) in row.iter_mut().enumerate() {
            *out = dot(ai, &b_rows[j * k..(j + 1) * k]);
        }
    });
    c
}

/// `[rows, cols]` -> `[cols, rows]`.
pub fn transpose(x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0.0f32; x.len()];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = x[r * cols + c];
        }
    }
    t
}

/// Dot product with 8 independent accumulators (vectorises; rounding close to a tree sum).
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let chunks = a.len() / 8;
    for i in 0..chunks {
        for l in 0..8 {
            acc[l] += a[i * 8 + l] * b[i * 8 + l];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for i in chunks * 8..a.len() {
        s += a[i] * b[i];
    }
    s
}

pub const CHECK: GpuCheck = GpuCheck {
    op: "matmul",
    run: gpu_check,
};

/// The same GEMMs through cuBLASLt (first heuristic choice, then tuned): its own op, run
/// last by `tigon gpu-check`, so that the opt-in library cannot cost the other ops' lines.
pub const LT_CHECK: GpuCheck = GpuCheck {
    op: "matmul_lt",
    run: gpu_check_lt,
};

fn gpu_check(gpu: &Arc<Gpu>, rng: &mut Rng) -> Result<Vec<CheckLine>> {
    check_in_modes(gpu, rng, &[GemmMode::Cublas])
}

fn gpu_check_lt(gpu: &Arc<Gpu>, rng: &mut Rng) -> Result<Vec<CheckLine>> {
    check_in_modes(gpu, rng, &[GemmMode::Lt, GemmMode::LtTuned])
}

/// The GEMM checks through each library of `modes`, against the CPU reference; the GPU's
/// own mode is restored after. A cuBLASLt mode that errs fails its own line.
fn check_in_modes(gpu: &Arc<Gpu>, rng: &mut Rng, modes: &[GemmMode]) -> Result<Vec<CheckLine>> {
    let before = gpu.gemm_mode();
    let mut lines = Vec::new();
    for &mode in modes {
        gpu.set_gemm_mode(mode);
        match check_mode(gpu, rng, mode.name()) {
            Ok(l) => lines.extend(l),
            Err(e) if mode != GemmMode::Cublas => lines.push(CheckLine {
                op: "matmul_lt".into(),
                case: format!("{}: {e}", mode.name()),
                output: "c".into(),
                dtype: DType::BF16,
                rel_err: f64::INFINITY,
                tol: 0.0,
                pass: false,
            }),
            Err(e) => {
                gpu.set_gemm_mode(before);
                return Err(e);
            }
        }
    }
    gpu.set_gemm_mode(before);
    Ok(lines)
}

fn check_mode(gpu: &Arc<Gpu>, rng: &mut Rng, mode: &str) -> Result<Vec<CheckLine>> {
    let mut lines = Vec::new();
    // Odd sizes, every transpose combination, both dtypes, and an accumulating product.
    for (dt, (m, n, k)) in [(DType::BF16, (131, 77, 259)), (DType::F32, (64, 129, 97))] {
        for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
            let ashape = if ta { [k, m] } else { [m, k] };
            let bshape = if tb { [n, k] } else { [k, n] };
            let (a, ga) = random_pair(gpu, rng, &ashape, dt, 1.0)?;
            let (b, gb) = random_pair(gpu, rng, &bshape, dt, 1.0)?;
            let (mut c, mut gc) = random_pair(gpu, rng, &[m, n], DType::F32, 1.0)?;
            matmul_into(&a, ta, &b, tb, &mut c, 0.5, 1.0)?;
            matmul_into(&ga, ta, &gb, tb, &mut gc, 0.5, 1.0)?;
            let case = format!("{mode} {dt} {m}x{n}x{k} ta={ta} tb={tb} beta=1");
            lines.push(compare("matmul", &case, "c", &gc, &c)?);
        }
        let (a, ga) = random_pair(gpu, rng, &[m, k], dt, 1.0)?;
        let (b, gb) = random_pair(gpu, rng, &[n, k], dt, 1.0)?;
        let c = matmul(&a, false, &b, true, dt)?;
        let gc = matmul(&ga, false, &gb, true, dt)?;
        lines.push(compare(
            "matmul",
            &format!("{mode} {dt} {m}x{n}x{k} out={dt}"),
            "c",
            &gc,
            &c,
        )?);
    }
    // Blocks at odd column offsets (operands aligned to 2 bytes only), written into the
    // middle columns of a wider output: the grouped LoRA ops' products.
    let (m, n, k) = (96, 40, 72);
    let (a, ga) = random_pair(gpu, rng, &[m, k + 3], DType::BF16, 1.0)?;
    let (b, gb) = random_pair(gpu, rng, &[n + 5, k], DType::BF16, 1.0)?;
    let (mut c, mut gc) = random_pair(gpu, rng, &[m, n + 7], DType::F32, 1.0)?;
    for (dev, a, b, c) in [
        (None, &a, &b, &mut c),
        (Some(gpu.clone()), &ga, &gb, &mut gc),
    ] {
        let (a, b) = (Cols::of(a, 3, k), Cols::rows(b, 5, n));
        gemm_cols(&dev, a, false, b, true, c, 7, 1.0, 1.0)?;
    }
    let case = format!("{mode} bf16 blocks {m}x{n}x{k} at odd offsets, beta=1");
    lines.push(compare("matmul", &case, "c", &gc, &c)?);
    Ok(lines)
}

pub const BENCH: KernelBench = KernelBench {
    op: "gemm",
    run: bench,
};

/// The frozen GEMMs of a Llama-3-8B step (4096 tokens: each projection's forward `x W^T` and
/// input gradient `dy W`) and fused linear cross-entropy's two GEMMs at a 1024-token chunk,
/// through cublasGemmEx, cuBLASLt's first heuristic choice and cuBLASLt tuned (the fastest
/// of its first eight, timed at first use): which library a step's GEMMs should use.
fn bench(gpu: &Arc<Gpu>, cfg: &BenchConfig) -> Result<Vec<BenchRow>> {
    let before = gpu.gemm_mode();
    let mut rows = Vec::new();
    let result = (|| {
        let t = 4096;
        // (name, rows, out, in, transposed weight): forward y = x W^T, backward dx = dy W.
        let shapes: [(&str, usize, usize, usize, bool); 12] = [
            ("q/o fwd", t, 4096, 4096, true),
            ("k/v fwd", t, 1024, 4096, true),
            ("gate/up fwd", t, 14336, 4096, true),
            ("down fwd", t, 4096, 14336, true),
            ("q/o dx", t, 4096, 4096, false),
            ("k/v dx", t, 4096, 1024, false),
            ("gate/up dx", t, 4096, 14336, false),
            ("down dx", t, 14336, 4096, false),
            ("lm_head logits c768", 768, 128256, 4096, true),
            ("lm_head dh c768", 768, 4096, 128256, false),
            ("lm_head logits c1024", 1024, 128256, 4096, true),
            ("lm_head dh c1024", 1024, 4096, 128256, false),
        ];
        let mut rng = Rng::new(5);
        for (name, m, n, k, tb) in shapes {
            let x = random_pair_par(gpu, &mut rng, &[m, k], DType::BF16, 1.0)?.1;
            let w = if tb { [n, k] } else { [k, n] };
            let w = random_pair_par(gpu, &mut rng, &w, DType::BF16, 0.02)?.1;
            let mut y = Tensor::uninit_cuda(gpu, &[m, n], DType::BF16)?;
            let flops = 2.0 * (m * n * k) as f64;
            let shape = format!("{m}x{n}x{k} bf16 ({name})");
            for mode in [GemmMode::Cublas, GemmMode::Lt, GemmMode::LtTuned] {
                gpu.set_gemm_mode(mode);
                rows.push(measure(
                    gpu,
                    cfg,
                    "gemm",
                    mode.name(),
                    &shape,
                    0.0,
                    flops,
                    || matmul_into(&x, false, &w, tb, &mut y, 1.0, 0.0),
                )?);
            }
        }
        Ok(())
    })();
    gpu.set_gemm_mode(before);
    result.map(|_| rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f32], ta: bool, b: &[f32], tb: bool, m: usize, n: usize, k: usize) -> Vec<f64> {
        let mut c = vec![0.0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0.0f64;
                for p in 0..k {
                    let av = if ta { a[p * m + i] } else { a[i * k + p] };
                    let bv = if tb { b[j * k + p] } else { b[p * n + j] };
                    s += av as f64 * bv as f64;
                }
                c[i * n + j] = s;
            }
        }
        c
    }

    #[test]
    fn cpu_matmul_matches_f64_for_every_transpose() {
        let mut rng = Rng::new(1);
        let (m, n, k) = (13, 7, 29);
        for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
            let a = rng.normal_vec(m * k, 1.0);
            let b = rng.normal_vec(n * k, 1.0);
            let c = cpu_matmul(&a, ta, &b, tb, m, n, k);
            let r: Vec<f32> = naive(&a, ta, &b, tb, m, n, k)
                .iter()
                .map(|&x| x as f32)
                .collect();
            assert!(crate::check::rel_err(&c, &r) < 1e-6, "ta={ta} tb={tb}");
        }
    }

    #[test]
    fn matmul_into_accumulates_and_checks_shapes() {
        let mut rng = Rng::new(2);
        let a = Tensor::from_f32(&[3, 5], rng.normal_vec(15, 1.0)).unwrap();
        let b = Tensor::from_f32(&[5, 4], rng.normal_vec(20, 1.0)).unwrap();
        let c0 = rng.normal_vec(12, 1.0);
        let mut c = Tensor::from_f32(&[3, 4], c0.clone()).unwrap();
        matmul_into(&a, false, &b, false, &mut c, 2.0, 1.0).unwrap();
        let p = naive(
            &a.to_f32_vec().unwrap(),
            false,
            &b.to_f32_vec().unwrap(),
            false,
            3,
            4,
            5,
        );
        let want: Vec<f32> = p
            .iter()
            .zip(&c0)
            .map(|(&p, &o)| (2.0 * p) as f32 + o)
            .collect();
        assert!(crate::check::rel_err(&c.to_f32_vec().unwrap(), &want) < 1e-6);
        let bad = Tensor::from_f32(&[4, 4], vec![1.0; 16]).unwrap();
        let err = matmul(&a, false, &bad, false, DType::F32)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("matmul") && err.contains("[3, 5]") && err.contains("[4, 4]"),
            "{err}"
        );
    }
}
