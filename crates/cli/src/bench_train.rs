//! `tigon bench train`: LoRA training throughput on a model folder and a fixed set of token
//! batches, as `bench/hf_compare.py` measures Hugging Face + PEFT (and Liger-Kernel) on the
//! same folder and the same batches, so tokens/s, peak memory and the loss at every step
//! compare one to one.
//!
//! Method: base weights bf16 on the GPU; LoRA on all seven projections (A, B, gradients and
//! AdamW moments in fp32), either new (PEFT's default init, seeded) or loaded from the PEFT
//! folder the script saved so both sides start from the same adapter; one optimizer step
//! per batch (torch.optim.AdamW's update and defaults, no clipping). The first `warmup`
//! steps are untimed; each later step is bracketed by two CUDA events (forward, backward,
//! optimizer; the loss read-back that follows is outside, as in the script), and the
//! median gives tokens/s. Peak memory is the most tigon held in live device buffers from
//! the first step to the last, the weights included (torch's `max_memory_allocated`).
//! With `--offload-embedding` / `--offload-layers N` the offloaded weights stay in host
//! memory (never on the GPU, not even while loading) and the JSON gets an `offload` object.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::{json, Value};
use tigon_engine::lora::LoraPrecision;
use tigon_engine::{Batch, Decoder, EngineError, Fusion, LoraState, Offload};
use tigon_kernels::cuda::timing::Mark;
use tigon_kernels::cuda::HostCall;
use tigon_kernels::ops::adamw::AdamW;
use tigon_kernels::ops::cross_entropy::IGNORE_INDEX;
use tigon_kernels::{DType, Device, Gpu, KernelError};
use tigon_model::{Adapter, LoraConfig, ModelConfig, ModelWeights, Projection, TargetModules};

use crate::gpu::write_json;

/// The dense bf16 rate MFU is quoted against (issue 5: an H100's achievable GEMM rate).
pub const MFU_PEAK_TFLOPS: f64 = 790.0;

#[derive(Args)]
pub struct BenchTrainArgs {
    /// Hugging Face model folder (config.json + safetensors).
    #[arg(long)]
    model: PathBuf,
    /// Token batches: a safetensors file with `input_ids`, int32 `[steps, batch, seq]`.
    /// Labels are the inputs (the target at position t is token t+1 of the same row);
    /// each row is one document.
    #[arg(long)]
    batches: PathBuf,
    /// Timed optimizer steps (after the warm-up).
    #[arg(long, default_value_t = 8)]
    steps: usize,
    /// Untimed optimizer steps first (they train too: their losses are reported).
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// The first N positions of every row are a prompt: their labels are -100, as
    /// instruction tuning with `response_only` masks them (0: every token is trained).
    #[arg(long, default_value_t = 0)]
    prompt_tokens: usize,
    /// Run the fused LM head + loss on every row, the labelled or not (the baseline for
    /// what skipping the unlabelled rows saves).
    #[arg(long)]
    loss_all_rows: bool,
    /// Activation checkpointing: keep each layer's input, recompute the rest in backward.
    #[arg(long)]
    checkpointing: bool,
    /// Which ops run as fused kernels: `all` (default), `none` (every op as the plain
    /// composition of one-op kernels and GEMMs), a list of the ops to fuse
    /// (`rms_norm,swiglu`), or `all,-op,...`. Ops: rms_norm, rope, swiglu, attention,
    /// linear_cross_entropy, lora_linear, adamw.
    #[arg(long, default_value = "all")]
    fusion: Fusion,
    /// The adapter path over the bf16 base: `fp32` (default, as PEFT computes it) or `bf16`.
    #[arg(long, default_value = "fp32")]
    lora_precision: LoraPrecision,
    /// CPU offload: keep the embedding table in host memory, gather there and upload only
    /// the batch's rows (untied models; a tied table is the LM head and stays on the GPU).
    #[arg(long)]
    offload_embedding: bool,
    /// CPU offload: stream this many layers' weights from page-locked host memory, spread
    /// evenly over the stack, copied to the GPU beside the compute (0: none).
    #[arg(long, default_value_t = 0)]
    offload_layers: usize,
    /// Start from this PEFT adapter folder instead of a new adapter (same start as the
    /// Python side).
    #[arg(long)]
    adapter: Option<PathBuf>,
    #[arg(long, default_value_t = 16)]
    lora_r: usize,
    #[arg(long, default_value_t = 32.0)]
    lora_alpha: f64,
    #[arg(long, default_value_t = 1e-4)]
    lr: f32,
    /// AdamW weight decay (torch.optim.AdamW's default).
    #[arg(long, default_value_t = 0.01)]
    weight_decay: f32,
    /// Seed of a new adapter's initialisation.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Also time the phases of each step: forward (a separate no-grad forward of the same
    /// batch, outside the timed step), forward+backward, and the optimizer.
    #[arg(long)]
    profile: bool,
    /// A name for the model shape, copied into the JSON (e.g. llama-3.2-1b).
    #[arg(long)]
    shape: Option<String>,
    /// The rate MFU is computed against, in TFLOP/s.
    #[arg(long, default_value_t = MFU_PEAK_TFLOPS)]
    peak_tflops: f64,
    /// Write the result as one JSON object to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Run on the CPU in f32 (for tests on tiny models; no memory statistics).
    #[arg(long, hide = true)]
    cpu: bool,
}

/// Token batches: `input_ids[step][row][position]`.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenBatches {
    pub steps: usize,
    pub batch: usize,
    pub seq: usize,
    ids: Vec<i32>,
}

impl TokenBatches {
    /// Read `input_ids` (int32 or int64, `[steps, batch, seq]`) from a safetensors file.
    pub fn read(path: &Path) -> Result<TokenBatches> {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .with_context(|| format!("{}: not a safetensors file", path.display()))?;
        let t = st.tensor("input_ids").with_context(|| {
            format!(
                "{}: no tensor `input_ids` (found: {})",
                path.display(),
                st.names().join(", ")
            )
        })?;
        let &[steps, batch, seq] = t.shape() else {
            bail!(
                "{}: `input_ids` has shape {:?}, expected [steps, batch, seq]",
                path.display(),
                t.shape()
            );
        };
        if steps == 0 || batch == 0 || seq < 2 {
            bail!(
                "{}: `input_ids` has shape {:?}: need at least one step, one row and two tokens a row",
                path.display(),
                t.shape()
            );
        }
        let data = t.data();
        let ids: Vec<i32> = match t.dtype() {
            safetensors::Dtype::I32 => data
                .chunks_exact(4)
                .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            safetensors::Dtype::I64 => data
                .chunks_exact(8)
                .map(|b| {
                    let v = i64::from_le_bytes(b.try_into().expect("8-byte chunk"));
                    i32::try_from(v).map_err(|_| {
                        anyhow::anyhow!("{}: token id {v} does not fit in i32", path.display())
                    })
                })
                .collect::<Result<_>>()?,
            d => bail!(
                "{}: `input_ids` has dtype {d:?}, expected I32 or I64",
                path.display()
            ),
        };
        if let Some((i, id)) = ids.iter().enumerate().find(|(_, &id)| id < 0) {
            let (s, rest) = (i / (batch * seq), i % (batch * seq));
            bail!(
                "{}: step {s} row {} position {}: negative token id {id}",
                path.display(),
                rest / seq,
                rest % seq
            );
        }
        Ok(TokenBatches {
            steps,
            batch,
            seq,
            ids,
        })
    }

    /// The engine batch of step `step`: labels = inputs, one document per row, the first
    /// `prompt` labels of each row -100.
    pub fn batch(&self, step: usize, prompt: usize) -> Result<Batch> {
        let per = self.batch * self.seq;
        let rows: Vec<(Vec<i32>, Vec<i32>)> = self.ids[step * per..(step + 1) * per]
            .chunks_exact(self.seq)
            .map(|r| {
                let mut labels = r.to_vec();
                labels[..prompt.min(r.len())].fill(IGNORE_INDEX);
                (r.to_vec(), labels)
            })
            .collect();
        Ok(Batch::from_rows(&rows)?)
    }

    pub fn max_id(&self) -> i32 {
        self.ids.iter().copied().max().unwrap_or(0)
    }
}

/// Model FLOPs per trained token, the formula `bench/hf_compare.py` uses too:
/// `4 N + 6 seq d_attn L`. N counts the parameters that multiply activations (the seven
/// projections of every layer and the LM head; the embedding is a lookup): 2N for the
/// forward and 2N for the gradients of the activations in the backward (the base weights
/// are frozen; LoRA's own FLOPs, under 1% at r=16, are left out). Attention, causal, a
/// document of `seq` tokens: each query meets seq/2 keys on average, so QK^T and PV cost
/// 2 x 2 (seq/2) d_attn per token and layer forward, and the backward twice that
/// (dQ, dK, dV, dP). Recomputation (checkpointing, flash attention's backward) is not
/// counted: MFU counts the model's FLOPs, not the hardware's.
pub fn flops_per_token(c: &ModelConfig, seq: usize) -> f64 {
    let per_layer: usize = Projection::ALL
        .iter()
        .map(|&p| {
            let (o, i) = c.projection_shape(p);
            o * i
        })
        .sum();
    let n = (per_layer * c.num_hidden_layers + c.vocab_size * c.hidden_size) as f64;
    let attn = 6.0 * seq as f64 * c.q_dim() as f64 * c.num_hidden_layers as f64;
    4.0 * n + attn
}

/// The seven projections, rank r, alpha, no dropout, PEFT's default init (B = 0).
pub fn lora_config(r: usize, alpha: f64) -> LoraConfig {
    LoraConfig {
        r,
        lora_alpha: alpha,
        target_modules: Some(TargetModules::Names(
            Projection::ALL
                .iter()
                .map(|p| p.name().to_string())
                .collect(),
        )),
        ..LoraConfig::default()
    }
}

fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        0.5 * (s[n / 2 - 1] + s[n / 2])
    }
}

/// An f32 flag value as the f64 with the same shortest decimal form (1e-4, not
/// 0.00009999999747), so the JSON shows what was typed.
fn shortest(x: f32) -> f64 {
    x.to_string().parse().unwrap_or(x as f64)
}

/// Today's UTC date, `YYYY-MM-DD`.
pub fn utc_date() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    civil_date((secs / 86_400) as i64)
}

/// The proleptic Gregorian date `days` after 1970-01-01 (days counted in 400-year eras
/// of 146097 days, each starting on a 1 March so the leap day falls last).
fn civil_date(days: i64) -> String {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

/// Device time on the GPU (events), host time on the CPU.
enum Clock {
    Gpu(Arc<Gpu>),
    Cpu,
}

enum Tick {
    Gpu(Mark),
    Cpu(Instant),
}

impl Clock {
    fn tick(&self) -> Result<Tick> {
        Ok(match self {
            Clock::Gpu(g) => Tick::Gpu(g.mark()?),
            Clock::Cpu => Tick::Cpu(Instant::now()),
        })
    }

    fn ms(&self, from: &Tick, to: &Tick) -> Result<f64> {
        Ok(match (from, to) {
            (Tick::Gpu(a), Tick::Gpu(b)) => b.ms_since(a)?,
            (Tick::Cpu(a), Tick::Cpu(b)) => b.duration_since(*a).as_secs_f64() * 1e3,
            _ => unreachable!("ticks of one clock"),
        })
    }
}

/// Is this error, anywhere in its chain, the device running out of memory?
fn is_oom(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        matches!(
            c.downcast_ref::<KernelError>(),
            Some(KernelError::OutOfMemory { .. })
        ) || matches!(
            c.downcast_ref::<EngineError>(),
            Some(EngineError::Kernel(KernelError::OutOfMemory { .. }))
        )
    })
}

pub fn bench_train(args: BenchTrainArgs) -> Result<i32> {
    let batches = TokenBatches::read(&args.batches)?;
    if args.steps == 0 {
        bail!("--steps must be at least 1");
    }
    if args.prompt_tokens + 1 >= batches.seq {
        bail!(
            "--prompt-tokens {} leaves no token to train in rows of {} ({})",
            args.prompt_tokens,
            batches.seq,
            args.batches.display()
        );
    }
    let needed = args.warmup + args.steps;
    if batches.steps < needed {
        bail!(
            "{} holds {} batches; --warmup {} + --steps {} need {needed}",
            args.batches.display(),
            batches.steps,
            args.warmup,
            args.steps
        );
    }
    let config = ModelConfig::from_dir(&args.model)?;
    offload(&args).validate(&config)?;
    if batches.max_id() as usize >= config.vocab_size {
        bail!(
            "{}: token id {} outside the vocabulary of {} ({})",
            args.batches.display(),
            batches.max_id(),
            config.vocab_size,
            args.model.display()
        );
    }
    let (device, clock, dtype) = if args.cpu {
        (Device::Cpu, Clock::Cpu, DType::F32)
    } else {
        let gpu = Gpu::new(0).context("tigon bench train needs a CUDA GPU")?;
        (Device::Cuda(gpu.clone()), Clock::Gpu(gpu), DType::BF16)
    };
    let gpu = match &clock {
        Clock::Gpu(g) => Some(g.clone()),
        Clock::Cpu => None,
    };
    let mut result = json!({
        "system": "tigon",
        "shape": args.shape,
        "model": args.model.display().to_string(),
        "batch": batches.batch,
        "seq": batches.seq,
        "checkpointing": args.checkpointing,
        "prompt_tokens": args.prompt_tokens,
        "loss_all_rows": args.loss_all_rows,
        "fusion": args.fusion.to_string(),
        "lora_precision": args.lora_precision.to_string(),
        "gpu": gpu.as_ref().map(|g| g.name().to_string()).unwrap_or_else(|| "cpu".into()),
        "date": utc_date(),
        "warmup": args.warmup,
        "steps": args.steps,
        "lora_r": args.lora_r,
        "lora_alpha": args.lora_alpha,
        "lr": shortest(args.lr),
        "weight_decay": shortest(args.weight_decay),
        "peak_tflops": args.peak_tflops,
    });
    match run(&args, &batches, &device, &clock, dtype, &mut result) {
        Ok(()) => {
            result["status"] = "ok".into();
            print_summary(&result);
            if let Some(p) = &args.json {
                write_json(p, &result)?;
            }
            Ok(0)
        }
        Err(e) if is_oom(&e) => {
            result["status"] = "oom".into();
            result["error"] = format!("{e:#}").into();
            eprintln!("tigon bench train: out of memory: {e:#}");
            if let Some(p) = &args.json {
                write_json(p, &result)?;
            }
            Ok(3)
        }
        Err(e) => Err(e),
    }
}

fn run(
    args: &BenchTrainArgs,
    batches: &TokenBatches,
    device: &Device,
    clock: &Clock,
    dtype: DType,
    out: &mut Value,
) -> Result<()> {
    let t_load = Instant::now();
    let offload = offload(args);
    let config = ModelConfig::from_dir(&args.model)?;
    let on_host = offload.host_placement(&config)?;
    let weights = ModelWeights::from_dir_placed(&args.model, device, dtype, &on_host)
        .with_context(|| format!("loading {}", args.model.display()))?;
    let config = weights.config.clone();
    let adapter = match &args.adapter {
        Some(dir) => Adapter::load(dir, "default", &config)
            .with_context(|| format!("loading the adapter {}", dir.display()))?,
        None => Adapter::new(
            "default",
            lora_config(args.lora_r, args.lora_alpha),
            &config,
            args.seed,
        )?,
    };
    // What was trained: a loaded adapter brings its own rank and alpha.
    out["lora_r"] = json!(adapter.config.r);
    out["lora_alpha"] = json!(adapter.config.lora_alpha);
    let lora = LoraState::from_adapter(&adapter, &config, device)?;
    let trainable = lora.param_count();
    let mut decoder = Decoder::new(weights, lora)?;
    decoder.checkpointing = args.checkpointing;
    decoder.loss_skips_unlabelled = !args.loss_all_rows;
    decoder.fusion = args.fusion;
    decoder.lora_precision = args.lora_precision;
    decoder.set_offload(offload)?;
    let load_s = t_load.elapsed().as_secs_f64();
    let all: Vec<Batch> = (0..args.warmup + args.steps)
        .map(|s| batches.batch(s, args.prompt_tokens))
        .collect::<Result<_>>()?;

    let adamw = AdamW {
        lr: args.lr,
        weight_decay: args.weight_decay,
        ..AdamW::default()
    };
    let gpu = match clock {
        Clock::Gpu(g) => {
            g.synchronize()?;
            g.reset_peak();
            Some(g.clone())
        }
        Clock::Cpu => None,
    };
    let mut losses = Vec::new();
    let (mut step_ms, mut fwd_ms, mut fwd_bwd_ms, mut opt_ms) = (vec![], vec![], vec![], vec![]);
    // Host side of each timed step: the waits on the stream, the time in each kind of driver
    // or library call, and the time outside them (tigon's own code). Long waits and little
    // time outside the calls mean the host runs ahead and the kernels set the pace (a call
    // such as a GEMM blocks while the GPU's queue is full, so busy time alone cannot say).
    let (mut host_busy_ms, mut host_wait_ms, mut host_waits) = (vec![], vec![], vec![]);
    let mut host_other_ms = vec![];
    let host_calls = || gpu.as_ref().map(|g| g.host_calls()).unwrap_or_default();
    let waits_of = |calls: &[(HostCall, u64, f64)]| {
        calls
            .iter()
            .find(|c| c.0 == HostCall::Wait)
            .map(|c| (c.1, c.2))
            .unwrap_or((0, 0.0))
    };
    let mut timed_calls: Vec<(HostCall, u64, f64)> = Vec::new();
    let wall = Instant::now();
    let mut timed_wall_s = 0.0;
    for (i, batch) in all.iter().enumerate() {
        let timed = i >= args.warmup;
        if timed && i == args.warmup {
            if let Some(g) = &gpu {
                g.synchronize()?;
            }
            timed_wall_s = wall.elapsed().as_secs_f64();
        }
        if args.profile && timed {
            let a = clock.tick()?;
            decoder.eval_loss(batch)?;
            let b = clock.tick()?;
            fwd_ms.push(clock.ms(&a, &b)?);
        }
        let (c0, host0) = (host_calls(), Instant::now());
        let t0 = clock.tick()?;
        let step = decoder
            .forward_backward(batch, None)
            .with_context(|| format!("step {i}: forward and backward"))?;
        let t1 = clock.tick()?;
        decoder
            .optimizer_step(i as u64 + 1, &adamw, None)
            .with_context(|| format!("step {i}: optimizer"))?;
        let t2 = clock.tick()?;
        let (c1, host_s) = (host_calls(), host0.elapsed().as_secs_f64());
        let loss = step.loss.to_f32_vec()?[0];
        if !loss.is_finite() {
            bail!("step {i}: loss is {loss}");
        }
        losses.push(loss as f64);
        if timed {
            step_ms.push(clock.ms(&t0, &t2)?);
            fwd_bwd_ms.push(clock.ms(&t0, &t1)?);
            opt_ms.push(clock.ms(&t1, &t2)?);
            let ((n0, s0), (n1, s1)) = (waits_of(&c0), waits_of(&c1));
            host_busy_ms.push((host_s - (s1 - s0)) * 1e3);
            let in_calls: f64 = c1.iter().zip(&c0).map(|(b, a)| b.2 - a.2).sum();
            host_other_ms.push((host_s - in_calls) * 1e3);
            host_wait_ms.push((s1 - s0) * 1e3);
            host_waits.push((n1 - n0) as f64);
            for (kind, (b, a)) in c1.iter().zip(&c0).enumerate() {
                if timed_calls.len() <= kind {
                    timed_calls.push((b.0, 0, 0.0));
                }
                timed_calls[kind].1 += b.1 - a.1;
                timed_calls[kind].2 += b.2 - a.2;
            }
        }
    }
    if let Some(g) = &gpu {
        g.synchronize()?;
    }
    timed_wall_s = wall.elapsed().as_secs_f64() - timed_wall_s;

    let tokens = (batches.batch * batches.seq) as f64;
    let med = median(&step_ms);
    let tok_s = tokens / (med / 1e3);
    let fpt = flops_per_token(&config, batches.seq);
    let mfu = tok_s * fpt / (args.peak_tflops * 1e12);
    let peak = gpu.as_ref().map(|g| g.peak_bytes());
    out["tokens_per_step"] = json!(tokens as usize);
    out["trainable_params"] = json!(trainable);
    out["flops_per_token"] = json!(fpt);
    out["load_s"] = json!(load_s);
    out["median_step_ms"] = json!(med);
    out["tok_s"] = json!(tok_s);
    out["tok_s_wall"] = json!(tokens * args.steps as f64 / timed_wall_s);
    out["mfu"] = json!(mfu);
    out["peak_bytes"] = json!(peak);
    out["peak_gib"] = json!(peak.map(|b| b as f64 / (1u64 << 30) as f64));
    out["losses"] = json!(losses);
    out["step_ms"] = json!(step_ms);
    if gpu.is_some() {
        out["host"] = json!({
            "note": "per timed step, host side: busy = step wall minus waits on the stream (synchronisations and pageable copies); outside_calls = time not in any timed driver or library call (tigon's own code); calls_per_step: count and host time of each kind of call",
            "median_busy_ms": median(&host_busy_ms),
            "median_wait_ms": median(&host_wait_ms),
            "waits_per_step": median(&host_waits),
            "median_outside_calls_ms": median(&host_other_ms),
            "calls_per_step": timed_calls
                .iter()
                .map(|c| (c.0.name().to_string(), json!({
                    "calls": c.1 as f64 / args.steps as f64,
                    "ms": c.2 * 1e3 / args.steps as f64,
                })))
                .collect::<serde_json::Map<_, _>>(),
        });
    }
    if let Some(g) = &gpu {
        // The GEMM library (TIGON_GEMM); with cuBLASLt, how many GEMM problems it planned
        // and how many it left to cublasGemmEx.
        out["gemm"] = json!(g.gemm_mode().name());
        if g.gemm_mode() != tigon_kernels::cuda::gemm_lt::GemmMode::Cublas {
            out["gemm_lt_plans"] = json!(g.lt_plan_counts());
        }
    }
    if offload.is_on() {
        out["offload"] = json!({
            "embedding": offload.embedding,
            "embedding_on_host": decoder.embedding_on_host(),
            "layers": offload.layers,
            "streamed_layers": decoder.streamed_layers(),
            "layer_copies_per_step": decoder.layer_copies(),
        });
    }
    if args.profile {
        let bwd: Vec<f64> = fwd_bwd_ms
            .iter()
            .zip(&fwd_ms)
            .map(|(fb, f)| fb - f)
            .collect();
        out["profile"] = json!({
            "note": "forward: a separate no-grad forward of the same batch (LM head fused into the loss); backward = forward_backward - forward (includes the recomputation with checkpointing); optimizer: grad norm + fused AdamW",
            "forward_ms": fwd_ms,
            "forward_backward_ms": fwd_bwd_ms,
            "optimizer_ms": opt_ms,
            "median_forward_ms": median(&fwd_ms),
            "median_backward_ms": median(&bwd),
            "median_optimizer_ms": median(&opt_ms),
        });
    }
    Ok(())
}

fn offload(args: &BenchTrainArgs) -> Offload {
    Offload {
        embedding: args.offload_embedding,
        layers: args.offload_layers,
    }
}

fn print_summary(r: &Value) {
    let f = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
    let peak = match r["peak_gib"].as_f64() {
        Some(g) => format!("{g:.2} GiB"),
        None => "- (no pool statistics on the CPU)".into(),
    };
    println!(
        "tigon {} batch {} x seq {} checkpointing {} fusion {}: {:.0} tok/s (median step {:.1} ms), peak {peak}, MFU {:.1}%",
        r["shape"].as_str().unwrap_or("-"),
        r["batch"],
        r["seq"],
        if r["checkpointing"].as_bool() == Some(true) { "on" } else { "off" },
        r["fusion"].as_str().unwrap_or("all"),
        f("tok_s"),
        f("median_step_ms"),
        100.0 * f("mfu"),
    );
    if let Some(n) = r["prompt_tokens"].as_u64().filter(|&n| n > 0) {
        let rows = match r["loss_all_rows"].as_bool() {
            Some(true) => "every row",
            _ => "the labelled rows",
        };
        println!("prompt: the first {n} tokens of every row unlabelled; the loss ran on {rows}");
    }
    if let Some(o) = r.get("offload") {
        println!(
            "offload: embedding {}, {} streamed layers {} ({} layer copies per step)",
            if o["embedding_on_host"].as_bool() == Some(true) {
                "on the host"
            } else {
                "on the GPU"
            },
            o["layers"],
            o["streamed_layers"],
            o["layer_copies_per_step"],
        );
    }
    if let Some(losses) = r["losses"].as_array() {
        let l: Vec<String> = losses
            .iter()
            .map(|x| format!("{:.5}", x.as_f64().unwrap_or(f64::NAN)))
            .collect();
        println!("losses: {}", l.join(" "));
    }
    if let Some(p) = r.get("profile") {
        println!(
            "phases (median ms): forward {:.1}, backward {:.1}, optimizer {:.2}",
            p["median_forward_ms"].as_f64().unwrap_or(f64::NAN),
            p["median_backward_ms"].as_f64().unwrap_or(f64::NAN),
            p["median_optimizer_ms"].as_f64().unwrap_or(f64::NAN),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use tigon_kernels::rng::Rng;
    use tigon_kernels::Tensor;
    use tigon_model::weights::write_safetensors;

    /// A scratch folder removed on drop.
    struct Scratch(PathBuf);
    impl Scratch {
        fn new(tag: &str) -> Scratch {
            let p = std::env::temp_dir().join(format!(
                "tigon-bench-train-{tag}-{}-{:?}",
                std::process::id(),
                std::thread::current().id()
            ));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            Scratch(p)
        }
    }
    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: BenchTrainArgs,
    }

    fn args(list: &[&str]) -> BenchTrainArgs {
        let mut v = vec!["bench-train"];
        v.extend_from_slice(list);
        Cli::try_parse_from(v).unwrap().args
    }

    fn write_ids(path: &Path, shape: [usize; 3], ids: Vec<i32>) {
        let t = Tensor::from_i32(&shape, ids).unwrap();
        write_safetensors(path, &[("input_ids", &t)]).unwrap();
    }

    /// A tiny random model and `steps` random batches of 2 x 12 tokens.
    fn fixture(dir: &Path, steps: usize) -> (PathBuf, PathBuf) {
        let config = ModelConfig::tiny_llama();
        let model = dir.join("model");
        tigon_model::weights::random_model_as(&config, 5, &model, DType::F32, u64::MAX).unwrap();
        let mut rng = Rng::new(9);
        let n = steps * 2 * 12;
        let ids = (0..n)
            .map(|_| (rng.uniform() * config.vocab_size as f32) as i32)
            .map(|i| i.min(config.vocab_size as i32 - 1))
            .collect();
        let batches = dir.join("batches.safetensors");
        write_ids(&batches, [steps, 2, 12], ids);
        (model, batches)
    }

    #[test]
    fn reads_batches_as_hf_shifted_rows() {
        let s = Scratch::new("read");
        let p = s.0.join("b.safetensors");
        let ids: Vec<i32> = (0..2 * 2 * 3).collect();
        write_ids(&p, [2, 2, 3], ids);
        let b = TokenBatches::read(&p).unwrap();
        assert_eq!((b.steps, b.batch, b.seq), (2, 2, 3));
        let step1 = b.batch(1, 0).unwrap();
        assert_eq!(step1.input_ids, vec![6, 7, 8, 9, 10, 11]);
        // Target t is token t+1 of the same row; a row's last token predicts nothing.
        assert_eq!(step1.targets, vec![7, 8, -100, 10, 11, -100]);
        assert_eq!(step1.positions, vec![0, 1, 2, 0, 1, 2]);
        assert_eq!(step1.cu_seqlens, vec![0, 3, 6]);
        // A 2-token prompt per row: only the token after it is a target.
        let prompted = b.batch(1, 2).unwrap();
        assert_eq!(prompted.input_ids, step1.input_ids);
        assert_eq!(prompted.targets, vec![-100, 8, -100, -100, 11, -100]);
    }

    #[test]
    fn refuses_bad_batch_files() {
        let s = Scratch::new("bad");
        let p = s.0.join("b.safetensors");
        let t = Tensor::from_i32(&[2, 3], vec![1; 6]).unwrap();
        write_safetensors(&p, &[("input_ids", &t)]).unwrap();
        let e = TokenBatches::read(&p).unwrap_err().to_string();
        assert!(e.contains("expected [steps, batch, seq]"), "{e}");
        let t = Tensor::from_f32(&[1, 1, 3], vec![1.0; 3]).unwrap();
        write_safetensors(&p, &[("input_ids", &t)]).unwrap();
        let e = TokenBatches::read(&p).unwrap_err().to_string();
        assert!(e.contains("expected I32 or I64"), "{e}");
        let t = Tensor::from_i32(&[1, 1, 3], vec![1, -4, 2]).unwrap();
        write_safetensors(&p, &[("input_ids", &t)]).unwrap();
        let e = TokenBatches::read(&p).unwrap_err().to_string();
        assert!(
            e.contains("step 0 row 0 position 1: negative token id -4"),
            "{e}"
        );
        write_safetensors(&p, &[("ids", &t)]).unwrap();
        let e = TokenBatches::read(&p).unwrap_err().to_string();
        assert!(e.contains("no tensor `input_ids` (found: ids)"), "{e}");
        std::fs::write(&p, b"not safetensors").unwrap();
        assert!(TokenBatches::read(&p).is_err());
    }

    #[test]
    fn flops_per_token_of_llama_3_2_1b() {
        let c = ModelConfig::llama_3_2_1b();
        // Per layer: q 2048x2048, k and v 512x2048, o 2048x2048, gate/up/down 3x8192x2048;
        // 16 layers, plus the (tied) LM head 128256x2048.
        let n = 16.0 * (2.0 * 2048.0 * 2048.0 + 2.0 * 512.0 * 2048.0 + 3.0 * 8192.0 * 2048.0)
            + 128256.0 * 2048.0;
        let attn = 6.0 * 2048.0 * 2048.0 * 16.0;
        assert_eq!(flops_per_token(&c, 2048), 4.0 * n + attn);
        assert!((flops_per_token(&c, 2048) / 5.35e9 - 1.0).abs() < 0.01);
    }

    #[test]
    fn civil_dates() {
        assert_eq!(civil_date(0), "1970-01-01");
        assert_eq!(civil_date(59), "1970-03-01");
        assert_eq!(civil_date(11_016), "2000-02-29");
        assert_eq!(civil_date(20_454), "2026-01-01");
        assert_eq!(civil_date(-1), "1969-12-31");
        assert_eq!(utc_date().len(), 10);
    }

    #[test]
    fn refuses_without_a_gpu() {
        if Gpu::new(0).is_ok() {
            return; // this machine has one: nothing to check here
        }
        let s = Scratch::new("nogpu");
        let (model, batches) = fixture(&s.0, 2);
        let a = args(&[
            "--model",
            model.to_str().unwrap(),
            "--batches",
            batches.to_str().unwrap(),
            "--steps",
            "1",
            "--warmup",
            "1",
        ]);
        let e = format!("{:#}", bench_train(a).unwrap_err());
        assert!(e.contains("needs a CUDA GPU"), "{e}");
    }

    #[test]
    fn too_few_batches_is_an_error() {
        let s = Scratch::new("few");
        let (model, batches) = fixture(&s.0, 2);
        let a = args(&[
            "--model",
            model.to_str().unwrap(),
            "--batches",
            batches.to_str().unwrap(),
            "--steps",
            "2",
            "--warmup",
            "1",
            "--cpu",
        ]);
        let e = format!("{:#}", bench_train(a).unwrap_err());
        assert!(
            e.contains("holds 2 batches; --warmup 1 + --steps 2 need 3"),
            "{e}"
        );
    }

    fn run_cpu(model: &Path, batches: &Path, json: &Path, extra: &[&str]) -> Value {
        let mut v = vec![
            "--model",
            model.to_str().unwrap(),
            "--batches",
            batches.to_str().unwrap(),
            "--steps",
            "3",
            "--warmup",
            "2",
            "--json",
            json.to_str().unwrap(),
            "--cpu",
        ];
        v.extend_from_slice(extra);
        assert_eq!(bench_train(args(&v)).unwrap(), 0);
        serde_json::from_slice(&std::fs::read(json).unwrap()).unwrap()
    }

    #[test]
    fn cpu_run_writes_the_result_object() {
        let s = Scratch::new("cpu");
        let (model, batches) = fixture(&s.0, 5);
        let json = s.0.join("r.json");
        let r = run_cpu(
            &model,
            &batches,
            &json,
            &["--profile", "--shape", "tiny", "--lr", "1e-2"],
        );
        assert_eq!(r["system"], "tigon");
        assert_eq!(r["status"], "ok");
        assert_eq!(r["shape"], "tiny");
        assert_eq!(
            (r["batch"].as_u64(), r["seq"].as_u64()),
            (Some(2), Some(12))
        );
        assert_eq!(r["checkpointing"], false);
        assert_eq!(r["fusion"], "all");
        assert_eq!(r["gpu"], "cpu");
        assert_eq!(r["tokens_per_step"], 24);
        let losses = r["losses"].as_array().unwrap();
        assert_eq!(losses.len(), 5, "one loss per step, warm-up included");
        for l in losses {
            let l = l.as_f64().unwrap();
            // Random tokens on a random model: close to ln(vocab).
            let ln_v = (ModelConfig::tiny_llama().vocab_size as f64).ln();
            assert!(
                l.is_finite() && (l - ln_v).abs() < 1.5,
                "{l} vs ln V {ln_v}"
            );
        }
        // LoRA trains: the adapter moves, so the losses are not all equal.
        assert!(losses.windows(2).any(|w| w[0] != w[1]));
        let steps = r["step_ms"].as_array().unwrap();
        assert_eq!(steps.len(), 3);
        assert!(steps.iter().all(|t| t.as_f64().unwrap() > 0.0));
        let tok_s = r["tok_s"].as_f64().unwrap();
        let med = r["median_step_ms"].as_f64().unwrap();
        assert!((tok_s - 24.0 / (med / 1e3)).abs() < 1e-6 * tok_s);
        let fpt = flops_per_token(&ModelConfig::tiny_llama(), 12);
        assert_eq!(r["flops_per_token"].as_f64().unwrap(), fpt);
        let mfu = r["mfu"].as_f64().unwrap();
        assert!((mfu - tok_s * fpt / 790e12).abs() < 1e-9 * mfu.max(1e-30));
        assert!(r["peak_gib"].is_null(), "no pool statistics on the CPU");
        let p = &r["profile"];
        assert_eq!(p["forward_ms"].as_array().unwrap().len(), 3);
        assert_eq!(p["optimizer_ms"].as_array().unwrap().len(), 3);
        // 7 projections x 2 layers, A [16, in] and B [out, 16] each.
        let c = ModelConfig::tiny_llama();
        let per_layer: usize = Projection::ALL
            .iter()
            .map(|&p| {
                let (o, i) = c.projection_shape(p);
                16 * (o + i)
            })
            .sum();
        assert_eq!(
            r["trainable_params"].as_u64().unwrap() as usize,
            per_layer * c.num_hidden_layers
        );
    }

    #[test]
    fn adapter_folder_gives_the_same_run_as_the_same_new_adapter() {
        let s = Scratch::new("adapter");
        let (model, batches) = fixture(&s.0, 5);
        let config = ModelConfig::tiny_llama();
        let adapter = Adapter::new("default", lora_config(16, 32.0), &config, 77).unwrap();
        let dir = s.0.join("adapter");
        adapter.save(&dir).unwrap();
        let a = run_cpu(
            &model,
            &batches,
            &s.0.join("a.json"),
            &["--adapter", dir.to_str().unwrap(), "--checkpointing"],
        );
        let b = run_cpu(&model, &batches, &s.0.join("b.json"), &["--seed", "77"]);
        let c = run_cpu(&model, &batches, &s.0.join("c.json"), &["--seed", "78"]);
        assert_eq!(a["checkpointing"], true);
        assert_eq!(
            (a["lora_r"].as_u64(), a["lora_alpha"].as_f64()),
            (Some(16), Some(32.0))
        );
        assert_eq!(a["lr"].as_f64(), Some(1e-4));
        // Checkpointing recomputes the same values: the losses are identical.
        assert_eq!(a["losses"], b["losses"]);
        // A different A initialisation changes the run after the first step (B starts at
        // zero, so step 0 is the base model either way).
        assert_eq!(a["losses"][0], c["losses"][0]);
        assert_ne!(a["losses"], c["losses"]);
    }

    /// `--prompt-tokens` masks each row's first labels; the loss skipping the unlabelled rows
    /// (the default) and `--loss-all-rows` train the same: identical losses at every step.
    /// A prompt that leaves nothing to train is refused.
    #[test]
    fn prompt_tokens_train_the_same_with_and_without_skipping() {
        let s = Scratch::new("prompt");
        let (model, batches) = fixture(&s.0, 5);
        let all = run_cpu(&model, &batches, &s.0.join("a.json"), &[]);
        let skip = run_cpu(
            &model,
            &batches,
            &s.0.join("b.json"),
            &["--prompt-tokens", "7"],
        );
        let rows = run_cpu(
            &model,
            &batches,
            &s.0.join("c.json"),
            &["--prompt-tokens", "7", "--loss-all-rows"],
        );
        assert_eq!(
            (
                skip["prompt_tokens"].as_u64(),
                rows["loss_all_rows"].as_bool()
            ),
            (Some(7), Some(true))
        );
        assert_eq!(skip["losses"], rows["losses"]);
        assert_ne!(skip["losses"], all["losses"]);
        let mut v = vec!["--model", model.to_str().unwrap(), "--batches"];
        v.extend([batches.to_str().unwrap(), "--prompt-tokens", "11", "--cpu"]);
        let e = bench_train(args(&v)).unwrap_err().to_string();
        assert!(
            e.contains("--prompt-tokens 11") && e.contains("rows of 12"),
            "{e}"
        );
    }

    /// `--offload-embedding` and `--offload-layers` reach the decoder and the JSON, and
    /// change no loss (offload moves data, not arithmetic); offloading more layers than the
    /// model has is refused before anything loads.
    #[test]
    fn offload_flags_are_recorded_and_change_no_loss() {
        let s = Scratch::new("offload");
        let (model, batches) = fixture(&s.0, 5);
        let plain = run_cpu(&model, &batches, &s.0.join("a.json"), &["--checkpointing"]);
        assert!(plain.get("offload").is_none());
        let off = run_cpu(
            &model,
            &batches,
            &s.0.join("b.json"),
            &[
                "--checkpointing",
                "--offload-embedding",
                "--offload-layers",
                "1",
            ],
        );
        assert_eq!(off["losses"], plain["losses"]);
        let o = &off["offload"];
        assert_eq!(o["embedding"], true);
        let tied = ModelConfig::tiny_llama().tie_word_embeddings;
        assert_eq!(o["embedding_on_host"], !tied);
        assert_eq!(o["layers"], 1);
        assert_eq!(o["streamed_layers"], json!([1]));
        assert_eq!(
            o["layer_copies_per_step"], 1,
            "the last layer's copy serves both passes"
        );
        let mut v = vec![
            "--model",
            model.to_str().unwrap(),
            "--batches",
            batches.to_str().unwrap(),
            "--cpu",
            "--offload-layers",
            "3",
        ];
        v.extend_from_slice(&["--steps", "1"]);
        let e = format!("{:#}", bench_train(args(&v)).unwrap_err());
        assert!(
            e.contains("offload_layers = 3 but the model has 2 layers"),
            "{e}"
        );
    }

    /// `--fusion` reaches the decoder and the JSON; on the CPU every op has one
    /// implementation, so an unfused run gives the same losses.
    #[test]
    fn fusion_spec_is_recorded_and_bad_specs_are_refused() {
        let s = Scratch::new("fusion");
        let (model, batches) = fixture(&s.0, 5);
        let all = run_cpu(&model, &batches, &s.0.join("a.json"), &[]);
        let none = run_cpu(
            &model,
            &batches,
            &s.0.join("n.json"),
            &["--fusion", "none", "--checkpointing"],
        );
        let some = run_cpu(
            &model,
            &batches,
            &s.0.join("s.json"),
            &["--fusion", "all,-attention,-adamw"],
        );
        assert_eq!(none["fusion"], "none");
        assert_eq!(some["fusion"], "all,-attention,-adamw");
        assert_eq!(all["losses"], none["losses"]);
        assert_eq!(all["losses"], some["losses"]);
        let m = model.to_str().unwrap();
        let b = batches.to_str().unwrap();
        let e = Cli::try_parse_from(["x", "--model", m, "--batches", b, "--fusion", "all,-flash"])
            .err()
            .expect("an unknown op is refused")
            .to_string();
        assert!(
            e.contains("unknown op `flash`") && e.contains("lora_linear"),
            "{e}"
        );
    }
}
