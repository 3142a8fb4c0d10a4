//! Rotary position embedding, in place on q and k, in Hugging Face's rotate_half convention:
//! element `i < d/2` of a head pairs with `i + d/2`, and
//! `x' = x * cos + rotate_half(x) * sin` with `rotate_half(x) = [-x2, x1]` and cos/sin of
//! `position * inv_freq[i]` repeated over both halves. The backward is the rotation by the
//! opposite angle, also in place (on dq and dk).
//!
//! Numerics, as transformers: inv_freq is computed on the host with transformers' f32
//! operations (default, linear and Llama-3 frequency scaling); the angle is one f32 product
//! of the position (explicit ids, one per token, so packed documents restart at 0) and
//! inv_freq; cos and sin are accurate f32 values rounded to the activation dtype, as HF casts
//! its tables before multiplying. The rotation itself is f32 with one rounding at the store
//! (HF's eager bf16 rounds the two products and the sum separately; the difference is within
//! a bf16 ulp).
//!
//! Layout: q `[tokens, q_heads, head_dim]` and k `[tokens, kv_heads, head_dim]` (or 2-D
//! `[tokens, heads * head_dim]`, or any leading dims folded into tokens), contiguous, f32 or
//! bf16; positions i32 with one entry per token.

use std::sync::Arc;

use crate::bench::{measure, BenchConfig, BenchRow, KernelBench};
use crate::check::{compare, random_pair, CheckLine, GpuCheck};
use crate::cpu::par_rows;
use crate::cuda::{Gpu, KernelSource};
use crate::error::{KernelError, Result};
use crate::ops::eager::{self, BinaryOp, Broadcast, TrigOp};
use crate::rng::Rng;
use crate::{launch, DType, Device, Tensor};

use super::{common_gpu, expect_dtype};

pub const SOURCE: KernelSource = KernelSource {
    name: "rope",
    src: include_str!("../../kernels/rope.cu"),
};

const OP: &str = "rope";

/// inv_freq travels to the kernel as a by-value parameter of this many floats (rope.cu's
/// ROPE_MAX_HALF), so head_dim is at most twice this.
const MAX_HALF: usize = 256;

/// How the base frequencies are rescaled for long context (transformers' `rope_type`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RopeScaling {
    /// `rope_type: "default"`.
    None,
    /// `rope_type: "linear"`: every frequency divided by `factor`.
    Linear { factor: f32 },
    /// `rope_type: "llama3"`: low frequencies divided by `factor`, high ones kept, a smooth
    /// blend in between.
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_max_position: usize,
    },
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RopeConfig {
    pub head_dim: usize,
    /// `rope_theta`, the base.
    pub theta: f32,
    pub scaling: RopeScaling,
}

impl RopeConfig {
    /// The `head_dim / 2` inverse frequencies, computed as transformers computes them: in f32
    /// tensor arithmetic, operation by operation (`a / b` on tensors with a Python number is
    /// f32; `number / tensor` is `reciprocal(tensor) * number`). The one transcendental,
    /// `theta ** (2i / d)`, is evaluated in f64 and rounded, i.e. the correctly rounded f32
    /// power, which torch's f32 pow matches to within its last bit.
    pub fn inv_freq(&self) -> Vec<f32> {
        let dim = self.head_dim as f32;
        let base: Vec<f32> = (0..self.head_dim / 2)
            .map(|i| {
                let exponent = (2 * i) as f32 / dim;
                1.0f32 / (self.theta as f64).powf(exponent as f64) as f32
            })
            .collect();
        match self.scaling {
            RopeScaling::None => base,
            RopeScaling::Linear { factor } => base.iter().map(|&f| f / factor).collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor: low,
                high_freq_factor: high,
                original_max_position,
            } => {
                let old_len = original_max_position as f64;
                let low_wavelen = (old_len / low as f64) as f32;
                let high_wavelen = (old_len / high as f64) as f32;
                let two_pi = (2.0 * std::f64::consts::PI) as f32;
                let band = (high as f64 - low as f64) as f32;
                base.iter()
                    .map(|&f| {
                        let wavelen = (1.0f32 / f) * two_pi;
                        let scaled = if wavelen > low_wavelen { f / factor } else { f };
                        let smooth = ((1.0f32 / wavelen) * old_len as f32 - low) / band;
                        let smoothed = (1.0f32 - smooth) * scaled / factor + smooth * scaled;
                        // HF: ~(wavelen < high) * ~(wavelen > low); wavelen is never NaN.
                        let medium = wavelen >= high_wavelen && wavelen <= low_wavelen;
                        if medium {
                            smoothed
                        } else {
                            scaled
                        }
                    })
                    .collect()
            }
        }
    }

    /// The factor HF multiplies cos and sin by: 1 for every scaling supported here (YaRN and
    /// LongRoPE, which change it, are not).
    pub fn attention_scaling(&self) -> f32 {
        1.0
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |why: String| Err(KernelError::invalid(OP, why));
        let d = self.head_dim;
        if d == 0 || !d.is_multiple_of(2) || d > 2 * MAX_HALF {
            return bad(format!(
                "head_dim must be even and in 2..={}, got {d}",
                2 * MAX_HALF
            ));
        }
        if !(self.theta.is_finite() && self.theta > 0.0) {
            return bad(format!("theta must be finite and > 0, got {}", self.theta));
        }
        let positive = |v: f32| v.is_finite() && v > 0.0;
        match self.scaling {
            RopeScaling::None => Ok(()),
            RopeScaling::Linear { factor } if !positive(factor) => bad(format!(
                "linear scaling factor must be finite and > 0, got {factor}"
            )),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position,
            } if !(positive(factor)
                && positive(low_freq_factor)
                && high_freq_factor.is_finite()
                && high_freq_factor > low_freq_factor
                && original_max_position > 0) =>
            {
                bad(format!(
                    "llama3 scaling needs factor > 0, 0 < low_freq_factor < high_freq_factor and \
                     original_max_position > 0, got {:?}",
                    self.scaling
                ))
            }
            _ => Ok(()),
        }
    }
}

/// Rotate q and k in place by their tokens' positions.
pub fn rope_forward(
    q: &mut Tensor,
    k: &mut Tensor,
    positions: &Tensor,
    cfg: &RopeConfig,
) -> Result<()> {
    rope_apply(("q", q), Some(("k", k)), positions, cfg, false)
}

/// The backward of [`rope_forward`]: rotate dq and dk in place by the opposite angles.
pub fn rope_backward(
    dq: &mut Tensor,
    dk: &mut Tensor,
    positions: &Tensor,
    cfg: &RopeConfig,
) -> Result<()> {
    rope_apply(("dq", dq), Some(("dk", dk)), positions, cfg, true)
}

/// One tensor alone (q or k, or a gradient): forward, or backward when `inverse`.
pub fn rope_forward_one(
    x: &mut Tensor,
    positions: &Tensor,
    cfg: &RopeConfig,
    inverse: bool,
) -> Result<()> {
    rope_apply(("x", x), None, positions, cfg, inverse)
}

/// (tokens, heads) of a q- or k-like tensor: `[tokens, heads * head_dim]`, or
/// `[..., heads, head_dim]` with the leading dims as tokens.
fn tokens_heads(name: &'static str, t: &Tensor, d: usize) -> Result<(usize, usize)> {
    let s = t.shape();
    let bad = |why: &str| {
        Err(KernelError::shape(
            OP,
            format!("`{name}` has shape {s:?}, {why} (head_dim {d})"),
        ))
    };
    match s.len() {
        0 | 1 => bad("expected [tokens, heads * head_dim] or [tokens, heads, head_dim]"),
        2 if s[1] == 0 || !s[1].is_multiple_of(d) => {
            bad("its last dim is not a positive multiple of head_dim")
        }
        2 => Ok((s[0], s[1] / d)),
        r if s[r - 1] != d || s[r - 2] == 0 => {
            bad("expected [tokens, heads, head_dim] with heads > 0")
        }
        r => Ok((s[..r - 2].iter().product(), s[r - 2])),
    }
}

/// Checked sizes of one call: tokens, q heads, k heads (0 without k), and the GPU the
/// tensors are on (None: the CPU).
struct Call {
    tokens: usize,
    q_heads: usize,
    k_heads: usize,
    gpu: Option<Arc<Gpu>>,
}

fn check_call(
    (q_name, q): (&'static str, &Tensor),
    k: Option<(&'static str, &Tensor)>,
    positions: &Tensor,
    cfg: &RopeConfig,
) -> Result<Call> {
    cfg.validate()?;
    let d = cfg.head_dim;
    expect_dtype(OP, q_name, q, &[DType::F32, DType::BF16])?;
    let (tokens, q_heads) = tokens_heads(q_name, q, d)?;
    let mut k_heads = 0;
    if let Some((k_name, k)) = &k {
        expect_dtype(OP, k_name, k, &[q.dtype()])?;
        let (k_tokens, heads) = tokens_heads(k_name, k, d)?;
        if k_tokens != tokens {
            return Err(KernelError::shape(
                OP,
                format!(
                    "`{q_name}` {:?} has {tokens} tokens, `{k_name}` {:?} has {k_tokens}",
                    q.shape(),
                    k.shape()
                ),
            ));
        }
        k_heads = heads;
    }
    expect_dtype(OP, "positions", positions, &[DType::I32])?;
    if positions.elem_count() != tokens {
        return Err(KernelError::shape(
            OP,
            format!(
                "`positions` {:?} must hold one id per token of `{q_name}` {:?} ({tokens})",
                positions.shape(),
                q.shape()
            ),
        ));
    }
    if tokens > i32::MAX as usize || q_heads + k_heads > i32::MAX as usize {
        return Err(KernelError::invalid(
            OP,
            format!(
                "{tokens} tokens x {} heads is past the kernel's 32-bit counts",
                q_heads + k_heads
            ),
        ));
    }
    let gpu = {
        let mut on: Vec<(&'static str, &Tensor)> = vec![(q_name, q), ("positions", positions)];
        if let Some((k_name, k)) = k {
            on.push((k_name, k));
        }
        common_gpu(OP, &on)?
    };
    Ok(Call {
        tokens,
        q_heads,
        k_heads,
        gpu,
    })
}

fn rope_apply(
    (q_name, q): (&'static str, &mut Tensor),
    k: Option<(&'static str, &mut Tensor)>,
    positions: &Tensor,
    cfg: &RopeConfig,
    inverse: bool,
) -> Result<()> {
    let d = cfg.head_dim;
    let Call {
        tokens,
        q_heads,
        k_heads,
        gpu,
    } = check_call(
        (q_name, &*q),
        k.as_ref().map(|(n, t)| (*n, &**t)),
        positions,
        cfg,
    )?;
    if tokens == 0 {
        return Ok(());
    }
    let inv_freq = cfg.inv_freq();
    match gpu {
        None => {
            let pos = positions.cpu_i32();
            cpu_rotate(q, q_heads, d, pos, &inv_freq, inverse);
            if let Some((_, k)) = k {
                cpu_rotate(k, k_heads, d, pos, &inv_freq, inverse);
            }
            Ok(())
        }
        Some(gpu) => {
            let k = k.map(|(_, k)| k as &Tensor);
            let dims = Dims {
                tokens,
                q_heads,
                k_heads,
                half: d / 2,
            };
            launch_rope(&gpu, q, k, positions, dims, &inv_freq, inverse)
        }
    }
}

/// [`rope_forward`] as the plain composition HF's `LlamaRotaryEmbedding` and
/// `apply_rotary_pos_emb` run eagerly: the cos/sin tables (angles = outer product of the
/// positions and inv_freq and its cat, cos, sin, cast to the activation dtype), then per
/// tensor `x * cos + rotate_half(x) * sin`, each product and the sum rounded to the
/// activation dtype. q and k are replaced by the results (the in-place contract of the fused
/// op: the caller's bindings hold the rotated tensors). On the CPU this runs the reference.
pub fn rope_forward_unfused(
    q: &mut Tensor,
    k: &mut Tensor,
    positions: &Tensor,
    cfg: &RopeConfig,
) -> Result<()> {
    rope_unfused(("q", q), ("k", k), positions, cfg, false)
}

/// [`rope_backward`] as autograd runs it through the eager forward:
/// `g * cos + rotate_half^T(g * sin)` with `rotate_half^T = -rotate_half`, one op at a time;
/// dq and dk replaced by the results. On the CPU this runs the reference.
pub fn rope_backward_unfused(
    dq: &mut Tensor,
    dk: &mut Tensor,
    positions: &Tensor,
    cfg: &RopeConfig,
) -> Result<()> {
    rope_unfused(("dq", dq), ("dk", dk), positions, cfg, true)
}

fn rope_unfused(
    (q_name, q): (&'static str, &mut Tensor),
    (k_name, k): (&'static str, &mut Tensor),
    positions: &Tensor,
    cfg: &RopeConfig,
    inverse: bool,
) -> Result<()> {
    let call = check_call((q_name, &*q), Some((k_name, &*k)), positions, cfg)?;
    let Some(gpu) = call.gpu else {
        return rope_apply((q_name, q), Some((k_name, k)), positions, cfg, inverse);
    };
    if call.tokens == 0 {
        return Ok(());
    }
    let d = cfg.head_dim;
    let dt = q.dtype();
    let inv_freq = Tensor::from_f32(&[d / 2], cfg.inv_freq())?.to_device(&Device::Cuda(gpu))?;
    let angles = eager::rope_angles(positions, &inv_freq)?;
    let cos = eager::trig(&angles, TrigOp::Cos, dt)?;
    let sin = eager::trig(&angles, TrigOp::Sin, dt)?;
    drop(angles);
    let rotate = |x: &Tensor| -> Result<Tensor> {
        let a = eager::binary_per_token(x, &cos, BinaryOp::Mul, dt)?;
        let b = if inverse {
            let xs = eager::binary_per_token(x, &sin, BinaryOp::Mul, dt)?;
            eager::rotate_half(&xs, d, -1.0)?
        } else {
            let r = eager::rotate_half(x, d, 1.0)?;
            eager::binary_per_token(&r, &sin, BinaryOp::Mul, dt)?
        };
        eager::binary(&a, &b, Broadcast::None, BinaryOp::Add, dt)
    };
    *q = rotate(q)?;
    *k = rotate(k)?;
    Ok(())
}

#[derive(Clone, Copy)]
struct Dims {
    tokens: usize,
    q_heads: usize,
    k_heads: usize,
    half: usize,
}

const BLOCK: usize = 256;

fn grid(gpu: &Gpu, threads: usize) -> u32 {
    threads.div_ceil(BLOCK).clamp(1, gpu.sm_count() * 64) as u32
}

fn launch_rope(
    gpu: &Arc<Gpu>,
    q: &Tensor,
    k: Option<&Tensor>,
    positions: &Tensor,
    dims: Dims,
    inv_freq: &[f32],
    inverse: bool,
) -> Result<()> {
    let Dims {
        tokens,
        q_heads,
        k_heads,
        half,
    } = dims;
    let mut freqs = [0.0f32; MAX_HALF];
    freqs[..half].copy_from_slice(inv_freq);
    let sin_sign: f32 = if inverse { -1.0 } else { 1.0 };
    let k_ptr = k.map_or(0u64, |t| t.dptr());
    let sfx = q.dtype().kernel_suffix();
    let heads = q_heads + k_heads;
    // 16-byte chunks need each half row to be a whole number of chunks (and aligned bases,
    // which pool allocations are; checked anyway).
    let per_chunk = 16 / q.dtype().size_in_bytes();
    let aligned = q.dptr().is_multiple_of(16) && k_ptr.is_multiple_of(16);
    if half.is_multiple_of(per_chunk) && aligned {
        let chunks = half / per_chunk;
        // Split each token's heads over `groups` threads per chunk: as few as fill the GPU
        // (2048 threads per SM), so that each thread reuses its cos/sin over many heads.
        let groups = (gpu.sm_count() * 2048)
            .div_ceil(tokens * chunks)
            .clamp(1, heads);
        let threads = tokens * chunks * groups;
        let f = gpu.function(&SOURCE, &format!("rope_vec_{sfx}"))?;
        launch!(gpu, f, (grid(gpu, threads), 1, 1), (BLOCK as u32, 1, 1), 0;
            q.dptr(), k_ptr, positions.dptr(), freqs,
            tokens as i32, q_heads as i32, k_heads as i32, half as i32, groups as i32, sin_sign)
    } else {
        let f = gpu.function(&SOURCE, &format!("rope_any_{sfx}"))?;
        launch!(gpu, f, (grid(gpu, tokens * heads * half), 1, 1), (BLOCK as u32, 1, 1), 0;
            q.dptr(), k_ptr, positions.dptr(), freqs,
            tokens as i32, q_heads as i32, k_heads as i32, half as i32, sin_sign)
    }
}

fn round_to(dtype: DType, v: f32) -> f32 {
    match dtype {
        DType::BF16 => half::bf16::from_f32(v).to_f32(),
        _ => v,
    }
}

/// cos and sin of one position's angles (f32 product, accurate f32 trig), rounded to the
/// activation dtype as HF rounds its tables; sin negated for the backward.
fn cos_sin(pos: i32, inv_freq: &[f32], dtype: DType, inverse: bool) -> (Vec<f32>, Vec<f32>) {
    let sign = if inverse { -1.0f32 } else { 1.0 };
    inv_freq
        .iter()
        .map(|&f| {
            let (s, c) = (pos as f32 * f).sin_cos();
            (round_to(dtype, c), sign * round_to(dtype, s))
        })
        .unzip()
}

fn cpu_rotate(
    x: &mut Tensor,
    heads: usize,
    d: usize,
    positions: &[i32],
    inv_freq: &[f32],
    inverse: bool,
) {
    let dtype = x.dtype();
    let half = d / 2;
    let row = heads * d;
    let src = x.cpu_f32().into_owned();
    let mut out = vec![0.0f32; src.len()];
    par_rows(&mut out, row, |t, o| {
        let (c, s) = cos_sin(positions[t], inv_freq, dtype, inverse);
        let xr = &src[t * row..(t + 1) * row];
        for h in 0..heads {
            let b = h * d;
            for i in 0..half {
                let (x1, x2) = (xr[b + i], xr[b + half + i]);
                o[b + i] = x1 * c[i] - x2 * s[i];
                o[b + half + i] = x2 * c[i] + x1 * s[i];
            }
        }
    });
    x.cpu_store_f32(&out);
}

/// Position ids of packed documents: each document restarts at 0, lengths uniform in
/// 1..=max_doc, the last one cut at `tokens`.
pub fn packed_positions(rng: &mut Rng, tokens: usize, max_doc: usize) -> Vec<i32> {
    let mut v = Vec::with_capacity(tokens);
    while v.len() < tokens {
        let len = 1 + rng.below(max_doc);
        v.extend((0..len as i32).take(tokens - v.len()));
    }
    v
}

pub const LLAMA3_8B_SCALING: RopeScaling = RopeScaling::Llama3 {
    factor: 8.0,
    low_freq_factor: 1.0,
    high_freq_factor: 4.0,
    original_max_position: 8192,
};

pub const CHECK: GpuCheck = GpuCheck {
    op: OP,
    run: gpu_check,
};

enum Positions {
    /// Packed documents of up to this many tokens.
    Packed(usize),
    /// Independent uniform ids below this.
    Random(usize),
}

struct Case {
    dtype: DType,
    tokens: usize,
    q_heads: usize,
    /// 0: q alone, through `rope_forward_one`.
    k_heads: usize,
    head_dim: usize,
    theta: f32,
    scaling: RopeScaling,
    positions: Positions,
    /// q and k as 2-D `[tokens, heads * head_dim]`.
    flat: bool,
    what: &'static str,
}

fn gpu_check(gpu: &Arc<Gpu>, rng: &mut Rng) -> Result<Vec<CheckLine>> {
    use DType::{BF16, F32};
    use Positions::{Packed, Random};
    let l3 = LLAMA3_8B_SCALING;
    let l32 = RopeScaling::Llama3 {
        factor: 32.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position: 8192,
    };
    let none = RopeScaling::None;
    let lin = |factor| RopeScaling::Linear { factor };
    // dims: [tokens, q heads, k heads (0: q alone), head_dim]
    let c = |dtype, dims: [usize; 4], theta, scaling, positions, what| Case {
        dtype,
        tokens: dims[0],
        q_heads: dims[1],
        k_heads: dims[2],
        head_dim: dims[3],
        theta,
        scaling,
        positions,
        flat: false,
        what,
    };
    #[rustfmt::skip]
    let cases = [
        c(BF16, [8192, 32, 8, 128], 5e5, l3, Packed(2048), "Llama-3-8B, packed docs"),
        c(F32, [8192, 32, 8, 128], 5e5, l3, Packed(2048), "Llama-3-8B, packed docs"),
        c(F32, [257, 5, 3, 128], 5e5, l32, Random(131072), "positions up to 128k"),
        c(BF16, [257, 5, 3, 128], 5e5, l32, Random(131072), "positions up to 128k"),
        c(F32, [37, 3, 1, 6], 1e4, lin(2.0), Packed(5), "head_dim 6, scalar path"),
        c(F32, [61, 7, 3, 36], 1e4, none, Packed(40), "head_dim 36, scalar path in f32"),
        Case { flat: true, ..c(BF16, [129, 5, 1, 80], 1e4, none, Packed(50), "head_dim 80, 2-D") },
        c(BF16, [19, 2, 1, 256], 1e6, lin(4.0), Random(32768), "head_dim 256"),
        c(F32, [100, 3, 1, 512], 1e4, none, Random(4096), "head_dim 512, the largest"),
        c(F32, [301, 4, 1, 64], 1e4, none, Packed(100), "head_dim 64"),
        c(BF16, [4097, 6, 0, 128], 5e5, l3, Packed(1000), "q alone"),
    ];
    let dev = Device::Cuda(gpu.clone());
    let mut lines = Vec::new();
    for c in cases {
        let cfg = RopeConfig {
            head_dim: c.head_dim,
            theta: c.theta,
            scaling: c.scaling,
        };
        let pos = match c.positions {
            Positions::Packed(max_doc) => packed_positions(rng, c.tokens, max_doc),
            Positions::Random(max) => (0..c.tokens).map(|_| rng.below(max) as i32).collect(),
        };
        let pos = Tensor::from_i32(&[c.tokens], pos)?;
        let gpos = pos.to_device(&dev)?;
        let shape = |heads: usize| {
            if c.flat {
                vec![c.tokens, heads * c.head_dim]
            } else {
                vec![c.tokens, heads, c.head_dim]
            }
        };
        let name = format!(
            "{} {} q{:?} k{:?} {:?} ({})",
            c.dtype,
            c.tokens,
            shape(c.q_heads),
            shape(c.k_heads),
            c.scaling,
            c.what
        );
        for (dir, inverse) in [("fwd", false), ("bwd", true)] {
            let (mut q, mut gq) = random_pair(gpu, rng, &shape(c.q_heads), c.dtype, 1.0)?;
            let q0 = q.to_cpu()?;
            if c.k_heads == 0 {
                rope_forward_one(&mut q, &pos, &cfg, inverse)?;
                rope_forward_one(&mut gq, &gpos, &cfg, inverse)?;
            } else {
                let (mut k, mut gk) = random_pair(gpu, rng, &shape(c.k_heads), c.dtype, 1.0)?;
                let k0 = k.to_cpu()?;
                if inverse {
                    rope_backward(&mut q, &mut k, &pos, &cfg)?;
                    rope_backward(&mut gq, &mut gk, &gpos, &cfg)?;
                } else {
                    rope_forward(&mut q, &mut k, &pos, &cfg)?;
                    rope_forward(&mut gq, &mut gk, &gpos, &cfg)?;
                }
                lines.push(compare(OP, &name, &format!("{dir} k"), &gk, &k)?);
                // The unfused composition from the same inputs.
                let (mut uq, mut uk) = (q0.to_device(&dev)?, k0.to_device(&dev)?);
                if inverse {
                    rope_backward_unfused(&mut uq, &mut uk, &gpos, &cfg)?;
                } else {
                    rope_forward_unfused(&mut uq, &mut uk, &gpos, &cfg)?;
                }
                lines.push(compare(OP, &name, &format!("{dir} q(unfused)"), &uq, &q)?);
                lines.push(compare(OP, &name, &format!("{dir} k(unfused)"), &uk, &k)?);
            }
            lines.push(compare(OP, &name, &format!("{dir} q"), &gq, &q)?);
            // In f32 the backward undoes the forward on the GPU (the cos/sin round trip
            // leaves ~1e-7): a check of the two directions against each other.
            if c.dtype == DType::F32 {
                rope_forward_one(&mut gq, &gpos, &cfg, !inverse)?;
                lines.push(compare(
                    OP,
                    &name,
                    &format!("{dir} q round trip"),
                    &gq,
                    &q0,
                )?);
            }
        }
    }
    Ok(lines)
}

pub const BENCH: KernelBench = KernelBench { op: OP, run: bench };

/// The bar's shape: q `[8192, 32, 128]`, k `[8192, 8, 128]` bf16 (4 x 2048 tokens of
/// Llama-3-8B), Llama-3 scaling, packed documents; forward on q/k then backward on dq/dk.
fn bench(gpu: &Arc<Gpu>, cfg: &BenchConfig) -> Result<Vec<BenchRow>> {
    let (tokens, q_heads, k_heads, d) = (8192, 32, 8, 128);
    let rope = RopeConfig {
        head_dim: d,
        theta: 500000.0,
        scaling: LLAMA3_8B_SCALING,
    };
    let dev = Device::Cuda(gpu.clone());
    let mut rng = Rng::new(7);
    let mut input = |heads: usize| {
        Tensor::from_f32_as(
            &[tokens, heads, d],
            rng.normal_vec(tokens * heads * d, 1.0),
            DType::BF16,
        )?
        .to_device(&dev)
    };
    let (mut q, mut k, mut dq, mut dk) = (
        input(q_heads)?,
        input(k_heads)?,
        input(q_heads)?,
        input(k_heads)?,
    );
    let pos =
        Tensor::from_i32(&[tokens], packed_positions(&mut rng, tokens, 2048))?.to_device(&dev)?;
    let shape = format!("q {tokens}x{q_heads}x{d} k {tokens}x{k_heads}x{d} bf16 llama3");
    // Each direction reads and writes q and k once; positions are read once per direction.
    let qk_bytes = (q.size_in_bytes() + k.size_in_bytes()) as f64;
    let pos_bytes = (tokens * 4) as f64;
    let floor = 2.0 * (2.0 * qk_bytes + pos_bytes);
    let fused = measure(gpu, cfg, OP, "fused", &shape, floor, 0.0, || {
        rope_forward(&mut q, &mut k, &pos, &rope)?;
        rope_backward(&mut dq, &mut dk, &pos, &rope)
    })?;
    let fwd_floor = 2.0 * qk_bytes + pos_bytes;
    let fused_fwd = measure(gpu, cfg, OP, "fused-fwd", &shape, fwd_floor, 0.0, || {
        rope_forward(&mut q, &mut k, &pos, &rope)
    })?;
    // Eager, as HF runs it: cos/sin tables (outer product + cat, cos, sin, cast), then per
    // tensor q*cos, rotate_half(q), *sin, add; the autograd backward g*cos + rotate_half^T(g*sin)
    // with rotate_half^T = -rotate_half. The tables are built in each direction (the
    // backward does not keep the forward's).
    let unfused = measure(gpu, cfg, OP, "unfused", &shape, floor, 0.0, || {
        rope_forward_unfused(&mut q, &mut k, &pos, &rope)?;
        rope_backward_unfused(&mut dq, &mut dk, &pos, &rope)
    })?;
    Ok(vec![fused, fused_fwd, unfused])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::rel_err;

    fn llama3_cfg(d: usize) -> RopeConfig {
        RopeConfig {
            head_dim: d,
            theta: 500000.0,
            scaling: LLAMA3_8B_SCALING,
        }
    }

    /// Naive f64 rotation with HF's angle (one f32 product), f64 trig and arithmetic.
    fn naive(
        x: &[f64],
        heads: usize,
        d: usize,
        pos: &[i32],
        inv: &[f32],
        inverse: bool,
    ) -> Vec<f64> {
        let half = d / 2;
        let mut y = x.to_vec();
        for (t, &p) in pos.iter().enumerate() {
            for h in 0..heads {
                let b = (t * heads + h) * d;
                for i in 0..half {
                    let (s, c) = ((p as f32 * inv[i]) as f64).sin_cos();
                    let s = if inverse { -s } else { s };
                    let (x1, x2) = (x[b + i], x[b + half + i]);
                    y[b + i] = x1 * c - x2 * s;
                    y[b + half + i] = x2 * c + x1 * s;
                }
            }
        }
        y
    }

    fn f64s(v: &[f32]) -> Vec<f64> {
        v.iter().map(|&x| x as f64).collect()
    }
    fn f32s(v: &[f64]) -> Vec<f32> {
        v.iter().map(|&x| x as f32).collect()
    }

    #[test]
    fn inv_freq_default_and_linear() {
        let mut cfg = RopeConfig {
            head_dim: 4,
            theta: 10000.0,
            scaling: RopeScaling::None,
        };
        assert_eq!(cfg.inv_freq(), vec![1.0, 1.0f32 / 100.0]);
        cfg.scaling = RopeScaling::Linear { factor: 4.0 };
        assert_eq!(cfg.inv_freq(), vec![0.25, 1.0f32 / 100.0 / 4.0]);
        assert_eq!(cfg.attention_scaling(), 1.0);
        // Llama-3-8B's first and last default frequencies: theta^0 and theta^(-126/128).
        let d = RopeConfig {
            scaling: RopeScaling::None,
            ..llama3_cfg(128)
        }
        .inv_freq();
        assert_eq!(d.len(), 64);
        assert_eq!(d[0], 1.0);
        let last = 500000f64.powf(-126.0 / 128.0);
        assert!(((d[63] as f64 - last) / last).abs() < 1e-6, "{}", d[63]);
    }

    /// Llama-3 scaling against the formula of the Llama 3.1 release evaluated in f64:
    /// wavelengths under original/high_freq_factor keep their frequency, those over
    /// original/low_freq_factor are divided by factor, and the band between is blended.
    #[test]
    fn inv_freq_llama3_matches_f64_formula() {
        let cfg = llama3_cfg(128);
        let got = cfg.inv_freq();
        let base = RopeConfig {
            scaling: RopeScaling::None,
            ..cfg
        }
        .inv_freq();
        let (factor, low, high, old) = (8.0f64, 1.0f64, 4.0f64, 8192.0f64);
        let (mut n_high, mut n_mid, mut n_low) = (0, 0, 0);
        for i in 0..64 {
            let f = 500000f64.powf(-((2 * i) as f64) / 128.0);
            let wavelen = 2.0 * std::f64::consts::PI / f;
            let want = if wavelen < old / high {
                n_high += 1;
                assert_eq!(got[i], base[i], "high frequency {i} must be kept exactly");
                f
            } else if wavelen > old / low {
                n_low += 1;
                assert_eq!(got[i], base[i] / 8.0, "low frequency {i} must be divided");
                f / factor
            } else {
                n_mid += 1;
                let s = (old / wavelen - low) / (high - low);
                (1.0 - s) * f / factor + s * f
            };
            let err = ((got[i] as f64 - want) / want).abs();
            assert!(err < 1e-6, "inv_freq[{i}] = {}, want {want}", got[i]);
        }
        assert!(
            n_high > 0 && n_mid > 0 && n_low > 0,
            "{n_high} {n_mid} {n_low}"
        );
    }

    #[test]
    fn forward_matches_f64() {
        let mut rng = Rng::new(21);
        for (d, scaling) in [
            (10, RopeScaling::None),
            (128, LLAMA3_8B_SCALING),
            (36, RopeScaling::Linear { factor: 3.0 }),
        ] {
            let cfg = RopeConfig {
                head_dim: d,
                theta: 500000.0,
                scaling,
            };
            let (tokens, qh, kh) = (13, 3, 2);
            let mut pos = packed_positions(&mut rng, tokens - 3, 6);
            pos.extend([8191, 40000, 131071]);
            let qv = rng.normal_vec(tokens * qh * d, 1.0);
            let kv = rng.normal_vec(tokens * kh * d, 1.0);
            let mut q = Tensor::from_f32(&[tokens, qh, d], qv.clone()).unwrap();
            let mut k = Tensor::from_f32(&[tokens, kh, d], kv.clone()).unwrap();
            let p = Tensor::from_i32(&[tokens], pos.clone()).unwrap();
            rope_forward(&mut q, &mut k, &p, &cfg).unwrap();
            let inv = cfg.inv_freq();
            let wq = f32s(&naive(&f64s(&qv), qh, d, &pos, &inv, false));
            let wk = f32s(&naive(&f64s(&kv), kh, d, &pos, &inv, false));
            let eq = rel_err(&q.to_f32_vec().unwrap(), &wq);
            let ek = rel_err(&k.to_f32_vec().unwrap(), &wk);
            assert!(eq < 1e-6 && ek < 1e-6, "d {d}: q err {eq}, k err {ek}");
        }
    }

    /// For L = sum(g * rope(x)), dL/dx by central differences of the f64 forward against
    /// rope_backward(g).
    #[test]
    fn backward_matches_finite_differences() {
        let mut rng = Rng::new(22);
        let (tokens, heads, d) = (5, 2, 14);
        let cfg = RopeConfig {
            head_dim: d,
            theta: 10000.0,
            scaling: RopeScaling::Linear { factor: 2.0 },
        };
        let pos = vec![0, 1, 2, 0, 3000];
        let inv = cfg.inv_freq();
        let xv = f64s(&rng.normal_vec(tokens * heads * d, 1.0));
        let gv = rng.normal_vec(tokens * heads * d, 1.0);
        let loss = |x: &[f64]| -> f64 {
            naive(x, heads, d, &pos, &inv, false)
                .iter()
                .zip(&gv)
                .map(|(y, &g)| y * g as f64)
                .sum()
        };
        let h = 1e-6;
        let fd: Vec<f32> = (0..xv.len())
            .map(|i| {
                let (mut a, mut b) = (xv.clone(), xv.clone());
                a[i] += h;
                b[i] -= h;
                ((loss(&a) - loss(&b)) / (2.0 * h)) as f32
            })
            .collect();
        let mut g = Tensor::from_f32(&[tokens, heads * d], gv.clone()).unwrap();
        let p = Tensor::from_i32(&[tokens], pos.clone()).unwrap();
        rope_forward_one(&mut g, &p, &cfg, true).unwrap();
        let err = rel_err(&g.to_f32_vec().unwrap(), &fd);
        assert!(err < 1e-5, "dx err {err}");
        // And rope_backward on a (dq, dk) pair gives the same as one tensor at a time.
        let mut dq = Tensor::from_f32(&[tokens, heads, d], gv.clone()).unwrap();
        let mut dk = Tensor::from_f32(&[tokens, 1, d], gv[..tokens * d].to_vec()).unwrap();
        rope_backward(&mut dq, &mut dk, &p, &cfg).unwrap();
        assert_eq!(dq.to_f32_vec().unwrap(), g.to_f32_vec().unwrap());
    }

    #[test]
    fn backward_inverts_forward() {
        let mut rng = Rng::new(23);
        let cfg = llama3_cfg(64);
        let (tokens, qh, kh) = (9, 4, 2);
        let qv = rng.normal_vec(tokens * qh * 64, 1.0);
        let kv = rng.normal_vec(tokens * kh * 64, 1.0);
        let mut q = Tensor::from_f32(&[tokens, qh, 64], qv.clone()).unwrap();
        let mut k = Tensor::from_f32(&[tokens, kh * 64], kv.clone()).unwrap();
        let p = Tensor::from_i32(&[tokens], packed_positions(&mut rng, tokens, 4)).unwrap();
        rope_forward(&mut q, &mut k, &p, &cfg).unwrap();
        assert!(
            rel_err(&q.to_f32_vec().unwrap(), &qv) > 1e-2,
            "forward did nothing"
        );
        rope_backward(&mut q, &mut k, &p, &cfg).unwrap();
        assert!(rel_err(&q.to_f32_vec().unwrap(), &qv) < 1e-6);
        assert!(rel_err(&k.to_f32_vec().unwrap(), &kv) < 1e-6);
    }

    /// The rotate_half pairing: element i rotates with i + d/2, not with its neighbour.
    #[test]
    fn rotate_half_pairs_i_with_i_plus_half() {
        let cfg = RopeConfig {
            head_dim: 4,
            theta: 10000.0,
            scaling: RopeScaling::None,
        };
        let mut x = Tensor::from_f32(&[1, 1, 4], vec![1.0, 2.0, 3.0, 4.0]).unwrap();
        let p = Tensor::from_i32(&[1], vec![1]).unwrap();
        rope_forward_one(&mut x, &p, &cfg, false).unwrap();
        let (s0, c0) = 1.0f64.sin_cos();
        let (s1, c1) = (0.01f32 as f64).sin_cos();
        let want = [
            1.0 * c0 - 3.0 * s0,
            2.0 * c1 - 4.0 * s1,
            3.0 * c0 + 1.0 * s0,
            4.0 * c1 + 2.0 * s1,
        ];
        for (g, w) in x.to_f32_vec().unwrap().iter().zip(want) {
            assert!((*g as f64 - w).abs() < 2e-6, "{g} vs {w}");
        }
    }

    /// Rotation follows the position ids, not the token index: packed documents restart.
    #[test]
    fn positions_are_ids_not_token_indices() {
        let cfg = llama3_cfg(8);
        let row: Vec<f32> = (0..16).map(|i| i as f32 * 0.25 - 1.0).collect();
        let mut x =
            Tensor::from_f32(&[3, 2, 8], [row.clone(), row.clone(), row.clone()].concat()).unwrap();
        let p = Tensor::from_i32(&[3], vec![5, 0, 5]).unwrap();
        rope_forward_one(&mut x, &p, &cfg, false).unwrap();
        let y = x.to_f32_vec().unwrap();
        assert_eq!(&y[0..16], &y[32..48], "same position, same rotation");
        assert_eq!(&y[16..32], &row[..], "position 0 is the identity");
        assert_ne!(&y[0..16], &row[..]);
    }

    /// bf16: the reference (bf16 cos/sin, f32 rotation, one rounding) against HF's eager
    /// bf16 arithmetic (q*cos, rotate_half(q)*sin and their sum each rounded to bf16).
    #[test]
    fn bf16_is_close_to_hf_eager() {
        let mut rng = Rng::new(24);
        let cfg = llama3_cfg(128);
        let (tokens, heads, d) = (64, 3, 128);
        let xs = Tensor::from_f32_as(
            &[tokens, heads, d],
            rng.normal_vec(tokens * heads * d, 1.0),
            DType::BF16,
        )
        .unwrap();
        let xv = xs.to_f32_vec().unwrap();
        let pos = packed_positions(&mut rng, tokens, 40);
        let mut x = xs;
        rope_forward_one(
            &mut x,
            &Tensor::from_i32(&[tokens], pos.clone()).unwrap(),
            &cfg,
            false,
        )
        .unwrap();
        let bf = |v: f32| half::bf16::from_f32(v).to_f32();
        let inv = cfg.inv_freq();
        let mut hf = vec![0.0f32; xv.len()];
        for (t, &p) in pos.iter().enumerate() {
            for h in 0..heads {
                let b = (t * heads + h) * d;
                for i in 0..d / 2 {
                    let (s, c) = (p as f32 * inv[i]).sin_cos();
                    let (s, c) = (bf(s), bf(c));
                    let (x1, x2) = (xv[b + i], xv[b + d / 2 + i]);
                    hf[b + i] = bf(bf(x1 * c) + bf(-x2 * s));
                    hf[b + d / 2 + i] = bf(bf(x2 * c) + bf(x1 * s));
                }
            }
        }
        let err = rel_err(&x.to_f32_vec().unwrap(), &hf);
        assert!(err > 0.0 && err < 5e-3, "err vs HF eager {err}");
    }

    #[test]
    fn layouts_agree() {
        let mut rng = Rng::new(25);
        let cfg = llama3_cfg(16);
        let v = rng.normal_vec(6 * 4 * 16, 1.0);
        let p = Tensor::from_i32(&[6], vec![3, 0, 1, 2, 9, 10]).unwrap();
        let mut a = Tensor::from_f32(&[6, 4, 16], v.clone()).unwrap();
        let mut b = Tensor::from_f32(&[6, 64], v.clone()).unwrap();
        let mut c = Tensor::from_f32(&[2, 3, 4, 16], v.clone()).unwrap();
        rope_forward_one(&mut a, &p, &cfg, false).unwrap();
        rope_forward_one(&mut b, &p, &cfg, false).unwrap();
        let p2 = Tensor::from_i32(&[2, 3], vec![3, 0, 1, 2, 9, 10]).unwrap();
        rope_forward_one(&mut c, &p2, &cfg, false).unwrap();
        let a = a.to_f32_vec().unwrap();
        assert_eq!(a, b.to_f32_vec().unwrap());
        assert_eq!(a, c.to_f32_vec().unwrap());
    }

    #[test]
    fn bad_inputs_name_the_op_and_shapes() {
        let cfg = llama3_cfg(8);
        let p = Tensor::from_i32(&[2], vec![0, 1]).unwrap();
        let f =
            |shape: &[usize]| Tensor::from_f32(shape, vec![1.0; shape.iter().product()]).unwrap();
        let err = |r: Result<()>| r.expect_err("must fail").to_string();

        let e = err(rope_forward(
            &mut f(&[2, 4, 6]),
            &mut f(&[2, 1, 8]),
            &p,
            &cfg,
        ));
        assert!(
            e.contains("rope") && e.contains("[2, 4, 6]") && e.contains("head_dim 8"),
            "{e}"
        );
        let e = err(rope_forward(
            &mut f(&[2, 4, 8]),
            &mut f(&[3, 1, 8]),
            &p,
            &cfg,
        ));
        assert!(
            e.contains("rope") && e.contains("[3, 1, 8]") && e.contains("[2, 4, 8]"),
            "{e}"
        );
        let e = err(rope_forward(&mut f(&[2, 20]), &mut f(&[2, 8]), &p, &cfg));
        assert!(e.contains("rope") && e.contains("[2, 20]"), "{e}");
        let e = err(rope_forward_one(&mut f(&[8]), &p, &cfg, false));
        assert!(e.contains("rope") && e.contains("[8]"), "{e}");
        let p3 = Tensor::from_i32(&[3], vec![0, 1, 2]).unwrap();
        let e = err(rope_forward(
            &mut f(&[2, 4, 8]),
            &mut f(&[2, 1, 8]),
            &p3,
            &cfg,
        ));
        assert!(
            e.contains("positions") && e.contains("[3]") && e.contains("[2, 4, 8]"),
            "{e}"
        );
        let pf = Tensor::from_f32(&[2], vec![0.0, 1.0]).unwrap();
        let e = err(rope_forward(
            &mut f(&[2, 4, 8]),
            &mut f(&[2, 1, 8]),
            &pf,
            &cfg,
        ));
        assert!(
            e.contains("positions") && e.contains("i32") && e.contains("f32"),
            "{e}"
        );
        let mut kb = Tensor::from_f32_as(&[2, 1, 8], vec![1.0; 16], DType::BF16).unwrap();
        let e = err(rope_backward(&mut f(&[2, 4, 8]), &mut kb, &p, &cfg));
        assert!(
            e.contains("rope") && e.contains("dk") && e.contains("bf16"),
            "{e}"
        );

        let bad_cfgs = [
            RopeConfig { head_dim: 7, ..cfg },
            RopeConfig {
                head_dim: 1024,
                ..cfg
            },
            RopeConfig { theta: 0.0, ..cfg },
            RopeConfig {
                scaling: RopeScaling::Linear { factor: 0.0 },
                ..cfg
            },
            RopeConfig {
                scaling: RopeScaling::Llama3 {
                    factor: 8.0,
                    low_freq_factor: 4.0,
                    high_freq_factor: 4.0,
                    original_max_position: 8192,
                },
                ..cfg
            },
        ];
        for bad in bad_cfgs {
            let e = err(rope_forward_one(
                &mut f(&[2, 1, bad.head_dim]),
                &p,
                &bad,
                false,
            ));
            assert!(e.contains("rope") && e.contains("invalid"), "{bad:?}: {e}");
        }
        // No tokens: nothing to do, and no error.
        let p0 = Tensor::from_i32(&[0], vec![]).unwrap();
        rope_forward(&mut f(&[0, 4, 8]), &mut f(&[0, 1, 8]), &p0, &cfg).unwrap();
    }
}
