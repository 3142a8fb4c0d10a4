//! Elementwise helpers the engine needs between the fused ops: the residual add
//! `a += alpha * b` (f32 arithmetic, rounded once to `a`'s dtype, as torch's bf16 add) and
//! dtype casts (the fp32 LoRA master weights to bf16 for the GEMMs, and back).

use std::sync::Arc;

use crate::check::{compare, random_pair, CheckLine, GpuCheck};
use crate::cpu::par_rows;
use crate::cuda::{Gpu, KernelSource};
use crate::error::{KernelError, Result};
use crate::rng::Rng;
use crate::{launch, DType, Tensor};

use super::{common_gpu, expect_dtype};

pub const SOURCE: KernelSource = KernelSource {
    name: "elementwise",
    src: include_str!("../../kernels/elementwise.cu"),
};

fn grid(gpu: &Gpu, n: usize) -> u32 {
    n.div_ceil(256).clamp(1, gpu.sm_count() * 16) as u32
}

/// `a += alpha * b`, elementwise; `b` may be f32 or bf16 whatever `a` is.
pub fn add_inplace(a: &mut Tensor, b: &Tensor, alpha: f32) -> Result<()> {
    const OP: &str = "add";
    expect_dtype(OP, "a", a, &[DType::F32, DType::BF16])?;
    expect_dtype(OP, "b", b, &[DType::F32, DType::BF16])?;
    if a.elem_count() != b.elem_count() {
        return Err(KernelError::shape(
            OP,
            format!("a {:?} and b {:?} differ in size", a.shape(), b.shape()),
        ));
    }
    match common_gpu(OP, &[("a", a), ("b", b)])? {
        None => {
            let bs = b.cpu_f32().into_owned();
            let mut av = a.cpu_f32().into_owned();
            par_rows(&mut av, 4096, |r, chunk| {
                let off = r * 4096;
                for (i, v) in chunk.iter_mut().enumerate() {
                    *v += alpha * bs[off + i];
                }
            });
            a.cpu_store_f32(&av);
            Ok(())
        }
        Some(gpu) => {
            let n = a.elem_count();
            let name = |v: &str| {
                format!(
                    "add_inplace{v}_{}_{}",
                    a.dtype().kernel_suffix(),
                    b.dtype().kernel_suffix()
                )
            };
            if n.is_multiple_of(8) {
                let f = gpu.function(&SOURCE, &name("_vec8"))?;
                launch!(gpu, f, (grid(&gpu, n / 8), 1, 1), (256, 1, 1), 0;
                    a.dptr(), b.dptr(), alpha, (n / 8) as i64)?;
            } else {
                let f = gpu.function(&SOURCE, &name(""))?;
                launch!(gpu, f, (grid(&gpu, n), 1, 1), (256, 1, 1), 0;
                    a.dptr(), b.dptr(), alpha, n as i64)?;
            }
            Ok(())
        }
    }
}

/// A copy of `x` in `dtype` (round to nearest even for bf16); a plain copy when equal.
pub fn cast(x: &Tensor, dtype: DType) -> Result<Tensor> {
    const OP: &str = "cast";
    expect_dtype(OP, "x", x, &[DType::F32, DType::BF16])?;
    if !matches!(dtype, DType::F32 | DType::BF16) {
        return Err(KernelError::invalid(OP, format!("cannot cast to {dtype}")));
    }
    if x.dtype() == dtype {
        return x.to_device(&x.device());
    }
    match common_gpu(OP, &[("x", x)])? {
        None => Tensor::from_f32_as(x.shape(), x.cpu_f32().into_owned(), dtype),
        Some(gpu) => {
            let out = Tensor::uninit_cuda(&gpu, x.shape(), dtype)?;
            let n = x.elem_count();
            let f = gpu.function(
                &SOURCE,
                &format!(
                    "cast_{}_{}",
                    x.dtype().kernel_suffix(),
                    dtype.kernel_suffix()
                ),
            )?;
            launch!(gpu, f, (grid(&gpu, n), 1, 1), (256, 1, 1), 0;
                x.dptr(), out.dptr(), n as i64)?;
            Ok(out)
        }
    }
}

/// `y[r, c] += bias[c]` (rounded once to y's dtype); `bias` has y's dtype.
pub fn add_bias_inplace(y: &mut Tensor, bias: &Tensor) -> Result<()> {
    const OP: &str = "add_bias";
    expect_dtype(OP, "y", y, &[DType::F32, DType::BF16])?;
    expect_dtype(OP, "bias", bias, &[y.dtype()])?;
    let (rows, cols) = y.rows_cols();
    if bias.elem_count() != cols {
        return Err(KernelError::shape(
            OP,
            format!("bias {:?} does not match y {:?}", bias.shape(), y.shape()),
        ));
    }
    match common_gpu(OP, &[("y", y), ("bias", bias)])? {
        None => {
            let bs = bias.cpu_f32().into_owned();
            let mut yv = y.cpu_f32().into_owned();
            par_rows(&mut yv, cols, |_, row| {
                for (v, b) in row.iter_mut().zip(&bs) {
                    *v += b;
                }
            });
            y.cpu_store_f32(&yv);
            Ok(())
        }
        Some(gpu) => {
            let f = gpu.function(&SOURCE, &format!("add_bias_{}", y.dtype().kernel_suffix()))?;
            launch!(gpu, f, (grid(&gpu, rows * cols), 1, 1), (256, 1, 1), 0;
                y.dptr(), bias.dptr(), rows as i64, cols as i32)?;
            Ok(())
        }
    }
}

fn gpu_check(gpu: &Arc<Gpu>, rng: &mut Rng) -> Result<Vec<CheckLine>> {
    let mut lines = Vec::new();
    for (n, da, db) in [
        (4096 * 8192, DType::BF16, DType::BF16),
        (1001, DType::BF16, DType::F32),
        (1000, DType::F32, DType::BF16),
        (77777, DType::F32, DType::F32),
    ] {
        let case = format!("add n={n} {da}+={db}");
        let (mut a_cpu, mut a_gpu) = random_pair(gpu, rng, &[n], da, 1.0)?;
        let (b_cpu, b_gpu) = random_pair(gpu, rng, &[n], db, 1.0)?;
        add_inplace(&mut a_cpu, &b_cpu, 0.5)?;
        add_inplace(&mut a_gpu, &b_gpu, 0.5)?;
        lines.push(compare("elementwise", &case, "a", &a_gpu, &a_cpu)?);
    }
    for (rows, cols, dt) in [
        (37, 1000, DType::BF16),
        (8192, 1024, DType::BF16),
        (5, 33, DType::F32),
    ] {
        let (mut y_cpu, mut y_gpu) = random_pair(gpu, rng, &[rows, cols], dt, 1.0)?;
        let (b_cpu, b_gpu) = random_pair(gpu, rng, &[cols], dt, 1.0)?;
        add_bias_inplace(&mut y_cpu, &b_cpu)?;
        add_bias_inplace(&mut y_gpu, &b_gpu)?;
        lines.push(compare(
            "elementwise",
            &format!("add_bias {rows}x{cols} {dt}"),
            "y",
            &y_gpu,
            &y_cpu,
        )?);
    }
    for (n, from, to) in [
        (12345, DType::F32, DType::BF16),
        (999, DType::BF16, DType::F32),
    ] {
        let (x_cpu, x_gpu) = random_pair(gpu, rng, &[n], from, 1.0)?;
        let out = cast(&x_gpu, to)?;
        let reference = cast(&x_cpu, to)?;
        lines.push(compare(
            "elementwise",
            &format!("cast n={n} {from}->{to}"),
            "y",
            &out,
            &reference,
        )?);
    }
    Ok(lines)
}

pub const CHECK: GpuCheck = GpuCheck {
    op: "elementwise",
    run: gpu_check,
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_rounds_once_to_a_dtype() {
        let mut a = Tensor::from_f32_as(&[3], vec![1.0, 2.0, 3.0], DType::BF16).unwrap();
        let b = Tensor::from_f32(&[3], vec![0.001, 0.5, -3.0]).unwrap();
        add_inplace(&mut a, &b, 2.0).unwrap();
        let got = a.to_f32_vec().unwrap();
        let want: Vec<f32> = [1.002f32, 3.0, -3.0]
            .iter()
            .map(|&v| half::bf16::from_f32(v).to_f32())
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn add_rejects_size_mismatch() {
        let mut a = Tensor::from_f32(&[3], vec![0.0; 3]).unwrap();
        let b = Tensor::from_f32(&[4], vec![0.0; 4]).unwrap();
        let e = add_inplace(&mut a, &b, 1.0).unwrap_err().to_string();
        assert!(
            e.contains("add") && e.contains("[3]") && e.contains("[4]"),
            "{e}"
        );
    }

    #[test]
    fn bias_broadcasts_over_rows() {
        let mut y = Tensor::from_f32(&[2, 3], vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0]).unwrap();
        let b = Tensor::from_f32(&[3], vec![10.0, 20.0, 30.0]).unwrap();
        add_bias_inplace(&mut y, &b).unwrap();
        assert_eq!(
            y.to_f32_vec().unwrap(),
            vec![10.0, 21.0, 32.0, 13.0, 24.0, 35.0]
        );
        let bad = Tensor::from_f32(&[2], vec![0.0; 2]).unwrap();
        assert!(add_bias_inplace(&mut y, &bad).is_err());
    }

    #[test]
    fn cast_roundtrip() {
        let x = Tensor::from_f32(&[2, 2], vec![1.0, 1.003_906_3, -2.5, 3.0e-3]).unwrap();
        let y = cast(&x, DType::BF16).unwrap();
        assert_eq!(y.dtype(), DType::BF16);
        let z = cast(&y, DType::F32).unwrap();
        let want: Vec<f32> = x
            .to_f32_vec()
            .unwrap()
            .iter()
            .map(|&v| half::bf16::from_f32(v).to_f32())
            .collect();
        assert_eq!(z.to_f32_vec().unwrap(), want);
        assert!(cast(&Tensor::from_i32(&[1], vec![1]).unwrap(), DType::F32).is_err());
    }
}
