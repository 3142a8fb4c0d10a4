//! `tigon gpu-check`: every CUDA op against its CPU reference on fresh random inputs.
//!
//! The GPU is put in poison mode first, so every buffer an op allocates starts as NaN; an
//! element the kernel fails to write therefore fails the comparison. The measure is the
//! relative error `||out - ref|| / ||ref||` in f64; NaN or infinity never passes.

use std::sync::Arc;

use crate::cuda::Gpu;
use crate::error::Result;
use crate::rng::Rng;
use crate::{DType, Device, Tensor};

/// The tolerance for an output of `dtype`: f32 arithmetic lands far under 1e-5; bf16
/// storage rounds each element by up to 2^-9 relative.
pub fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F32 | DType::I32 => 1e-5,
        DType::BF16 => 1e-2,
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct CheckLine {
    pub op: String,
    pub case: String,
    pub output: String,
    pub dtype: DType,
    pub rel_err: f64,
    pub tol: f64,
    pub pass: bool,
}

/// `||out - ref|| / ||ref||` in f64; infinity if any value is not finite or lengths differ.
pub fn rel_err(out: &[f32], reference: &[f32]) -> f64 {
    if out.len() != reference.len() {
        return f64::INFINITY;
    }
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&o, &r) in out.iter().zip(reference) {
        if !o.is_finite() || !r.is_finite() {
            return f64::INFINITY;
        }
        let d = o as f64 - r as f64;
        num += d * d;
        den += (r as f64) * (r as f64);
    }
    if den == 0.0 {
        return if num == 0.0 { 0.0 } else { f64::INFINITY };
    }
    (num / den).sqrt()
}

/// Compare a device output with its CPU reference; the tolerance follows the output dtype.
pub fn compare(
    op: &str,
    case: &str,
    output: &str,
    out: &Tensor,
    reference: &Tensor,
) -> Result<CheckLine> {
    compare_with_tol(op, case, output, out, reference, tolerance(out.dtype()))
}

/// [`compare`] with the tolerance of another dtype: for an f32 output computed from
/// values the op stores in bf16 on the way (so bf16-accurate by design).
pub fn compare_with_tol(
    op: &str,
    case: &str,
    output: &str,
    out: &Tensor,
    reference: &Tensor,
    tol: f64,
) -> Result<CheckLine> {
    let o = out.to_f32_vec()?;
    let r = reference.to_f32_vec()?;
    let err = if out.shape() != reference.shape() {
        f64::INFINITY
    } else {
        rel_err(&o, &r)
    };
    Ok(CheckLine {
        op: op.into(),
        case: case.into(),
        output: output.into(),
        dtype: out.dtype(),
        rel_err: err,
        tol,
        pass: err < tol,
    })
}

/// Compare two f32 scalars (a loss) with the f32 tolerance.
pub fn compare_scalar(op: &str, case: &str, output: &str, out: f32, reference: f32) -> CheckLine {
    let err = rel_err(&[out], &[reference]);
    CheckLine {
        op: op.into(),
        case: case.into(),
        output: output.into(),
        dtype: DType::F32,
        rel_err: err,
        tol: 1e-5,
        pass: err < 1e-5,
    }
}

/// A random CPU tensor of `dtype` with normal(0, std) values (rounded to bf16 if asked), and
/// its copy on the GPU: the reference and the kernel see exactly the same numbers.
pub fn random_pair(
    gpu: &Arc<Gpu>,
    rng: &mut Rng,
    shape: &[usize],
    dtype: DType,
    std: f32,
) -> Result<(Tensor, Tensor)> {
    let n = shape.iter().product();
    let cpu = Tensor::from_f32_as(shape, rng.normal_vec(n, std), dtype)?;
    let dev = cpu.to_device(&Device::Cuda(gpu.clone()))?;
    Ok((cpu, dev))
}

/// One op's GPU check: runs all its cases and returns one line per output compared.
pub struct GpuCheck {
    pub op: &'static str,
    pub run: fn(&Arc<Gpu>, &mut Rng) -> Result<Vec<CheckLine>>,
}

/// Like [`random_pair`], for large tensors: the values are drawn on all cores (each row of
/// `row_len` elements from its own generator seeded by `rng`), so multi-GB Llama-size inputs
/// take a second rather than a minute.
pub fn random_pair_par(
    gpu: &Arc<Gpu>,
    rng: &mut Rng,
    shape: &[usize],
    dtype: DType,
    std: f32,
) -> Result<(Tensor, Tensor)> {
    let n: usize = shape.iter().product();
    let row_len = shape.last().copied().unwrap_or(1).max(1);
    let seed = rng.next_u64();
    let mut v = vec![0.0f32; n];
    crate::cpu::par_rows(&mut v, row_len, |r, out| {
        let mut g = Rng::new(seed ^ (r as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        for x in out.iter_mut() {
            *x = g.normal() * std;
        }
    });
    let cpu = Tensor::from_f32_as(shape, v, dtype)?;
    let dev = cpu.to_device(&Device::Cuda(gpu.clone()))?;
    Ok((cpu, dev))
}
