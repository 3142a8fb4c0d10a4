//! Inverted dropout, `y = x * mask / (1 - p)`, with a mask that is never stored.
//!
//! The mask is a pure function of `(seed, stream, element index)`: a key is mixed from the
//! seed and the stream with splitmix64, and element `i` is kept iff the top 24 bits of
//! `splitmix64(key ^ i)` are at least `round(p * 2^24)`. So the backward (and a
//! recomputation under activation checkpointing) regenerates exactly the forward's mask
//! from the same two numbers instead of holding a `[n]` tensor through the step, and the
//! CPU reference and the CUDA kernel draw the same bits: the comparison is an integer one,
//! the scale `1 / (1 - p)` is computed once on the host, and a kept value is one f32
//! multiply rounded once to the tensor's dtype on both.
//!
//! The caller gives every independent mask its own `stream` (the engine: one per
//! micro-batch, layer and projection, as PEFT has one dropout module per projection).

use std::sync::Arc;

use crate::check::{compare_with_tol, random_pair, CheckLine, GpuCheck};
use crate::cpu::par_rows;
use crate::cuda::{Gpu, KernelSource};
use crate::error::{KernelError, Result};
use crate::rng::Rng;
use crate::{launch, DType, Tensor};

use super::{common_gpu, expect_dtype};

pub const SOURCE: KernelSource = KernelSource {
    name: "dropout",
    src: include_str!("../../kernels/dropout.cu"),
};

const OP: &str = "dropout";

/// The mask draws 24-bit uniforms: `p` is resolved to multiples of 2^-24.
const MASK_BITS: u32 = 24;

/// Sebastiano Vigna's splitmix64 step (the generator's state advance plus its output mix).
pub fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The per-mask key of `(seed, stream)`; the kernel gets this and mixes in the index.
pub fn mask_key(seed: u64, stream: u64) -> u64 {
    splitmix64(splitmix64(seed) ^ stream)
}

/// Whether element `index` survives under `key` and `threshold` (see [`Params`]).
pub fn keep(key: u64, index: u64, threshold: u32) -> bool {
    ((splitmix64(key ^ index) >> (64 - MASK_BITS)) as u32) >= threshold
}

/// `p` checked and turned into the integer threshold and the f32 scale of kept values.
#[derive(Clone, Copy, Debug)]
struct Params {
    threshold: u32,
    scale: f32,
}

fn params(p: f64) -> Result<Params> {
    if !(0.0..1.0).contains(&p) {
        return Err(KernelError::invalid(
            OP,
            format!("p must be in [0, 1), got {p}"),
        ));
    }
    Ok(Params {
        threshold: (p * (1u64 << MASK_BITS) as f64).round() as u32,
        scale: (1.0 / (1.0 - p)) as f32,
    })
}

/// The CPU reference: `v *= mask / (1 - p)` over the flat f32 values.
fn cpu_apply(v: &mut [f32], pr: Params, key: u64) {
    const CHUNK: usize = 4096;
    par_rows(v, CHUNK, |c, chunk| {
        let off = (c * CHUNK) as u64;
        for (i, e) in chunk.iter_mut().enumerate() {
            *e = if keep(key, off + i as u64, pr.threshold) {
                *e * pr.scale
            } else {
                0.0
            };
        }
    });
}

/// The kernel from `x` into the buffer at `y` (`x`'s own for the in-place backward).
fn gpu_apply(gpu: &Arc<Gpu>, x: &Tensor, y: u64, pr: Params, key: u64) -> Result<()> {
    let n = x.elem_count();
    let f = gpu.function(&SOURCE, &format!("dropout_{}", x.dtype().kernel_suffix()))?;
    let grid = n.div_ceil(256).clamp(1, gpu.sm_count() * 16) as u32;
    launch!(gpu, f, (grid, 1, 1), (256, 1, 1), 0;
        x.dptr(), y, n as i64, key, pr.threshold, pr.scale)?;
    Ok(())
}

/// A new tensor `x * mask / (1 - p)`, the mask being that of `(seed, stream)`. `p = 0`
/// is an exact copy.
pub fn dropout_forward(x: &Tensor, p: f64, seed: u64, stream: u64) -> Result<Tensor> {
    expect_dtype(OP, "x", x, &[DType::F32, DType::BF16])?;
    let pr = params(p)?;
    let key = mask_key(seed, stream);
    match common_gpu(OP, &[("x", x)])? {
        None => {
            let mut v = x.cpu_f32().into_owned();
            cpu_apply(&mut v, pr, key);
            Tensor::from_f32_as(x.shape(), v, x.dtype())
        }
        Some(gpu) => {
            let y = Tensor::uninit_cuda(&gpu, x.shape(), x.dtype())?;
            gpu_apply(&gpu, x, y.dptr(), pr, key)?;
            Ok(y)
        }
    }
}

/// `dy *= mask / (1 - p)` in place with the mask of `(seed, stream)`: the gradient of
/// [`dropout_forward`] with the same arguments, the mask regenerated rather than stored.
pub fn dropout_backward_inplace(dy: &mut Tensor, p: f64, seed: u64, stream: u64) -> Result<()> {
    expect_dtype(OP, "dy", dy, &[DType::F32, DType::BF16])?;
    let pr = params(p)?;
    let key = mask_key(seed, stream);
    match common_gpu(OP, &[("dy", dy)])? {
        None => {
            let mut v = dy.cpu_f32().into_owned();
            cpu_apply(&mut v, pr, key);
            dy.cpu_store_f32(&v);
            Ok(())
        }
        Some(gpu) => gpu_apply(&gpu, dy, dy.dptr(), pr, key),
    }
}

fn gpu_check(gpu: &Arc<Gpu>, rng: &mut Rng) -> Result<Vec<CheckLine>> {
    // Same mask bits and one f32 multiply rounded once on both sides: bit-exact, so the
    // only passing relative error is 0.
    let exact = f64::MIN_POSITIVE;
    let mut lines = Vec::new();
    for (n, dt, p) in [
        (4096 * 4096, DType::BF16, 0.05),
        (77777, DType::BF16, 0.5),
        (1001, DType::F32, 0.1),
        (12345, DType::F32, 0.0),
    ] {
        let seed = rng.next_u64();
        let stream = rng.next_u64();
        let (x_cpu, x_gpu) = random_pair(gpu, rng, &[n], dt, 1.0)?;
        let case = format!("n={n} {dt} p={p}");
        let y_gpu = dropout_forward(&x_gpu, p, seed, stream)?;
        let y_cpu = dropout_forward(&x_cpu, p, seed, stream)?;
        lines.push(compare_with_tol(OP, &case, "y", &y_gpu, &y_cpu, exact)?);
        let (mut dy_cpu, mut dy_gpu) = random_pair(gpu, rng, &[n], dt, 1.0)?;
        dropout_backward_inplace(&mut dy_gpu, p, seed, stream)?;
        dropout_backward_inplace(&mut dy_cpu, p, seed, stream)?;
        lines.push(compare_with_tol(OP, &case, "dx", &dy_gpu, &dy_cpu, exact)?);
    }
    Ok(lines)
}

pub const CHECK: GpuCheck = GpuCheck {
    op: OP,
    run: gpu_check,
};

#[cfg(test)]
mod tests {
    use super::*;

    fn random(n: usize, dt: DType, seed: u64) -> Tensor {
        // Normal draws are never exactly zero, so a zero output marks a dropped element.
        Tensor::from_f32_as(&[n], Rng::new(seed).normal_vec(n, 1.0), dt).unwrap()
    }

    /// The published first outputs of splitmix64 from state 0 (Vigna's splitmix64.c): the
    /// CUDA source spells the same constants, and the GPU check compares its output bit
    /// for bit with this reference.
    #[test]
    fn splitmix64_matches_the_reference_sequence() {
        let gamma = 0x9E37_79B9_7F4A_7C15u64;
        let got: Vec<u64> = (0..3u64)
            .map(|k| splitmix64(k.wrapping_mul(gamma)))
            .collect();
        assert_eq!(
            got,
            [
                0xE220_A839_7B1D_CDAF,
                0x6E78_9E6A_A1B9_65F4,
                0x06C4_5D18_8009_454F
            ]
        );
    }

    /// Each element is kept with probability 1 - p (within 5 standard deviations of a
    /// binomial draw), kept values are x / (1 - p) exactly, dropped ones are 0, and the
    /// parallel CPU path indexes elements as the scalar definition does.
    #[test]
    fn keeps_one_minus_p_and_scales_the_kept() {
        let n = 100_003;
        let x = random(n, DType::F32, 1);
        let xv = x.to_f32_vec().unwrap();
        for p in [0.05, 0.3, 0.5, 0.9] {
            let y = dropout_forward(&x, p, 7, 3).unwrap().to_f32_vec().unwrap();
            let pr = params(p).unwrap();
            let key = mask_key(7, 3);
            let mut kept = 0usize;
            for (i, (&a, &b)) in xv.iter().zip(&y).enumerate() {
                if keep(key, i as u64, pr.threshold) {
                    kept += 1;
                    assert_eq!(b, a * pr.scale, "p={p} i={i}");
                } else {
                    assert_eq!(b, 0.0, "p={p} i={i}");
                }
            }
            let frac = kept as f64 / n as f64;
            let sd = (p * (1.0 - p) / n as f64).sqrt();
            assert!((frac - (1.0 - p)).abs() < 5.0 * sd, "p={p}: kept {frac}");
        }
    }

    #[test]
    fn p_zero_is_the_identity() {
        for dt in [DType::F32, DType::BF16] {
            let x = random(5000, dt, 2);
            let y = dropout_forward(&x, 0.0, 11, 12).unwrap();
            assert_eq!(y.dtype(), dt);
            assert_eq!(y.to_f32_vec().unwrap(), x.to_f32_vec().unwrap());
            let mut dy = random(5000, dt, 3);
            let before = dy.to_f32_vec().unwrap();
            dropout_backward_inplace(&mut dy, 0.0, 11, 12).unwrap();
            assert_eq!(dy.to_f32_vec().unwrap(), before);
        }
    }

    /// The backward regenerates the forward's mask: on the same values it gives the
    /// forward's output, and it zeroes exactly where the forward dropped x.
    #[test]
    fn backward_applies_the_forward_mask() {
        for dt in [DType::F32, DType::BF16] {
            let x = random(9001, dt, 4);
            let y = dropout_forward(&x, 0.2, 99, 5)
                .unwrap()
                .to_f32_vec()
                .unwrap();
            let mut same = random(9001, dt, 4);
            dropout_backward_inplace(&mut same, 0.2, 99, 5).unwrap();
            assert_eq!(same.to_f32_vec().unwrap(), y);
            let mut dy = random(9001, dt, 5);
            dropout_backward_inplace(&mut dy, 0.2, 99, 5).unwrap();
            let dyv = dy.to_f32_vec().unwrap();
            let dropped = y.iter().filter(|v| **v == 0.0).count();
            assert!(dropped > 0);
            for (a, b) in y.iter().zip(&dyv) {
                assert_eq!(*a == 0.0, *b == 0.0);
            }
        }
    }

    /// A mask is a function of (seed, stream) only: equal arguments repeat it, another
    /// seed or another stream draws a different one.
    #[test]
    fn masks_depend_on_seed_and_stream() {
        let x = random(4000, DType::F32, 6);
        let run = |seed, stream| {
            dropout_forward(&x, 0.5, seed, stream)
                .unwrap()
                .to_f32_vec()
                .unwrap()
        };
        assert_eq!(run(1, 2), run(1, 2));
        assert_ne!(run(1, 2), run(2, 2));
        assert_ne!(run(1, 2), run(1, 3));
    }

    #[test]
    fn bad_p_is_an_error_naming_the_op() {
        let mut x = random(10, DType::F32, 7);
        for p in [1.0, -0.1, 1.5, f64::NAN] {
            let e = dropout_forward(&x, p, 0, 0).unwrap_err().to_string();
            assert!(
                e.contains("dropout") && e.contains("p must be in [0, 1)"),
                "{e}"
            );
            let e = dropout_backward_inplace(&mut x, p, 0, 0)
                .unwrap_err()
                .to_string();
            assert!(e.contains("dropout"), "{e}");
        }
    }
}
