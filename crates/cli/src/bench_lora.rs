//! `tigon bench lora`: what LoRA costs on top of the base model, at a real model shape with
//! random bf16 weights generated in memory (no files).
//!
//! 1. Per projection (q, k, v, o, gate, up, down) and rank, on `--tokens` rows of x:
//!    - base: `y = x W^T` (one cuBLAS GEMM);
//!    - adapter: `xa = x A^T; y += s xa B^T` (the two rank-r GEMMs, the add fused into the
//!      second through beta = 1), A and B in bf16;
//!    - op: `lora_linear_forward` as the engine calls it (base + adapter, fp32 master A/B cast
//!      to bf16 per call, outputs allocated);
//!    - and the backward the same way: base `dx = dy W`; adapter `dB += s dy^T xa`,
//!      `dxa = s dy B`, `dA += dxa^T x`, `dx += dxa A`; op `lora_linear_backward` (dx, dA, dB).
//!
//!    Times are CUDA-event medians after warm-up with a cold L2 before each run
//!    (`Gpu::time`); FLOPs are `2 n in out` for the base and `2 n r (in + out)` (forward) or
//!    `4 n r (in + out)` (backward) for the adapter.
//! 2. End to end: the forward of the whole model (embedding, every layer, final norm and the
//!    LM head fused into the loss, `Decoder::eval_loss`) on a batch of `--e2e-batch` x
//!    `--e2e-seq` tokens, per rank with LoRA on all seven projections of every layer:
//!    separate (the Decoder applies `W x + s B (A x)`) against merged (the same LoRA folded
//!    into W on the GPU with `lora_merge`, then the plain forward; unmerged afterwards). The
//!    merge itself is timed too. Each rank's LoRA is freed before the next is built.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::{json, Value};
use tigon_engine::{Batch, Decoder, LoraState, LoraTensors};
use tigon_kernels::cpu::par_rows;
use tigon_kernels::ops::lora_linear::{
    lora_linear_backward, lora_linear_forward, lora_merge, lora_unmerge, LoraLinear,
};
use tigon_kernels::ops::lora_split::LoraSplit;
use tigon_kernels::ops::matmul::matmul_into;
use tigon_kernels::rng::Rng;
use tigon_kernels::{DType, Device, Gpu, Tensor};
use tigon_model::weights::LayerWeights;
use tigon_model::{ModelConfig, ModelWeights, Projection};

use crate::bench_train::utc_date;
use crate::gpu::write_json;

#[derive(Args, Debug)]
pub struct BenchLoraArgs {
    /// Model shape: llama-3-8b, llama-3.2-1b, or a folder with a config.json.
    #[arg(long, default_value = "llama-3-8b")]
    pub shape: String,
    /// Rows of x (tokens) in the per-projection timings.
    #[arg(long, default_value_t = 4096)]
    pub tokens: usize,
    /// LoRA ranks.
    #[arg(long, value_delimiter = ',', default_value = "8,16,64,256")]
    pub ranks: Vec<usize>,
    /// Timed runs per measurement (median reported).
    #[arg(long, default_value_t = 20)]
    pub runs: usize,
    /// Untimed warm-up runs.
    #[arg(long, default_value_t = 5)]
    pub warmup: usize,
    /// Rows of the end-to-end batch.
    #[arg(long, default_value_t = 2)]
    pub e2e_batch: usize,
    /// Tokens per row of the end-to-end batch.
    #[arg(long, default_value_t = 2048)]
    pub e2e_seq: usize,
    /// Skip the end-to-end forward (which holds the whole model on the GPU).
    #[arg(long)]
    pub no_e2e: bool,
    /// Write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// The config named by `--shape`.
pub fn shape_config(shape: &str) -> Result<ModelConfig> {
    match shape {
        "llama-3-8b" => Ok(ModelConfig::llama_3_8b()),
        "llama-3.2-1b" => Ok(ModelConfig::llama_3_2_1b()),
        other if Path::new(other).join("config.json").is_file() => {
            Ok(ModelConfig::from_dir(Path::new(other))?)
        }
        other => bail!(
            "unknown --shape `{other}` (expected llama-3-8b, llama-3.2-1b or a folder with a config.json)"
        ),
    }
}

/// `n` values `mean + std * N(0, 1)`, filled in parallel, the same for any thread count.
fn random_values(n: usize, mean: f32, std: f32, seed: u64) -> Vec<f32> {
    let mut v = vec![0f32; n];
    par_rows(&mut v, 1 << 16, |c, out| {
        let mut rng = Rng::new(seed ^ (c as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        for x in out {
            *x = mean + std * rng.normal();
        }
    });
    v
}

fn random_on(
    shape: &[usize],
    std: f32,
    dtype: DType,
    seed: u64,
    device: &Device,
) -> Result<Tensor> {
    let n = shape.iter().product();
    Ok(Tensor::from_f32_as(shape, random_values(n, 0.0, std, seed), dtype)?.to_device(device)?)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn ms_of(
    gpu: &Arc<Gpu>,
    args: &BenchLoraArgs,
    f: impl FnMut() -> tigon_kernels::Result<()>,
) -> Result<f64> {
    Ok(gpu.time(args.warmup, args.runs, f)?.median_ms)
}

fn tflops(flops: f64, ms: f64) -> f64 {
    flops / (ms / 1e3) / 1e12
}

/// Part 1: one row per (projection, rank).
fn projections(gpu: &Arc<Gpu>, args: &BenchLoraArgs, config: &ModelConfig) -> Result<Vec<Value>> {
    let mut rows = Vec::new();
    println!(
        "{:<5} {:>13} {:>4} | {:>8} {:>8} {:>6} {:>8} {:>6} | {:>8} {:>8} {:>6} {:>8} {:>6} | {:>7} | {:>7} {:>7}",
        "proj", "in -> out", "r", "base ms", "lora ms", "ratio", "op ms", "over",
        "bwd base", "bwd lora", "ratio", "bwd op", "over", "lora TF/s", "fp32 fw", "fp32 bw"
    );
    for (pi, p) in Projection::ALL.into_iter().enumerate() {
        // A failure in one projection is reported and the others still run.
        if let Err(e) = projection(gpu, args, config, pi, p, &mut rows) {
            println!("{:<5} ERROR: {e:#}", p.name());
            rows.push(json!({"projection": p.name(), "error": format!("{e:#}")}));
        }
    }
    Ok(rows)
}

/// The rows of one projection type, every rank.
fn projection(
    gpu: &Arc<Gpu>,
    args: &BenchLoraArgs,
    config: &ModelConfig,
    pi: usize,
    p: Projection,
    rows: &mut Vec<Value>,
) -> Result<()> {
    let dev = Device::Cuda(gpu.clone());
    let n = args.tokens;
    {
        let (out, inp) = config.projection_shape(p);
        let seed = 100 + pi as u64;
        let x = random_on(&[n, inp], 1.0, DType::BF16, seed, &dev)?;
        let w = random_on(&[out, inp], 0.02, DType::BF16, seed + 10, &dev)?;
        let dy = random_on(&[n, out], 1.0, DType::BF16, seed + 20, &dev)?;
        let mut y = Tensor::uninit_cuda(gpu, &[n, out], DType::BF16)?;
        let mut dx = Tensor::uninit_cuda(gpu, &[n, inp], DType::BF16)?;
        let base_flops = 2.0 * (n * inp * out) as f64;
        let base_fwd = ms_of(gpu, args, || {
            matmul_into(&x, false, &w, true, &mut y, 1.0, 0.0)
        })?;
        let base_bwd = ms_of(gpu, args, || {
            matmul_into(&dy, false, &w, false, &mut dx, 1.0, 0.0)
        })?;
        for &r in &args.ranks {
            let s = 2.0f32; // alpha = 2 r
            let a32 = random_on(
                &[r, inp],
                1.0 / (inp as f32).sqrt(),
                DType::F32,
                seed + 30,
                &dev,
            )?;
            let b32 = random_on(&[out, r], 0.01, DType::F32, seed + 40, &dev)?;
            let a16 = random_on(
                &[r, inp],
                1.0 / (inp as f32).sqrt(),
                DType::BF16,
                seed + 30,
                &dev,
            )?;
            let b16 = random_on(&[out, r], 0.01, DType::BF16, seed + 40, &dev)?;
            let mut xa = Tensor::uninit_cuda(gpu, &[n, r], DType::BF16)?;
            let mut dxa = Tensor::uninit_cuda(gpu, &[n, r], DType::BF16)?;
            let mut da = Tensor::zeros(&[r, inp], DType::F32, &dev)?;
            let mut db = Tensor::zeros(&[out, r], DType::F32, &dev)?;
            let lora_fwd_flops = 2.0 * (n * r * (inp + out)) as f64;
            let lora_bwd_flops = 2.0 * lora_fwd_flops;

            let lora_fwd = ms_of(gpu, args, || {
                matmul_into(&x, false, &a16, true, &mut xa, 1.0, 0.0)?;
                matmul_into(&xa, false, &b16, true, &mut y, s, 1.0)
            })?;
            let layer = LoraLinear {
                w: &w,
                bias: None,
                a: &a32,
                b: &b32,
                scaling: s,
                split: None,
            };
            let op_fwd = ms_of(gpu, args, || {
                lora_linear_forward(&layer, &x, None).map(drop)
            })?;
            let saved = lora_linear_forward(&layer, &x, None)?;
            let lora_bwd = ms_of(gpu, args, || {
                matmul_into(&dy, true, &xa, false, &mut db, s, 1.0)?;
                matmul_into(&dy, false, &b16, false, &mut dxa, s, 0.0)?;
                matmul_into(&dxa, true, &x, false, &mut da, 1.0, 1.0)?;
                matmul_into(&dxa, false, &a16, false, &mut dx, 1.0, 1.0)
            })?;
            let op_bwd = ms_of(gpu, args, || {
                lora_linear_backward(&layer, &dy, &x, &saved.xa, &mut da, &mut db, true).map(drop)
            })?;
            drop(saved);
            // The same op with the fp32-accurate adapter path (the engine's default over a
            // bf16 base): A and B split once, as the engine does per layer pass.
            let split = LoraSplit::many(&[(&a32, &b32)])?
                .pop()
                .expect("one adapter, one split");
            let exact = LoraLinear {
                split: Some(&split),
                ..layer
            };
            let exact_fwd = ms_of(gpu, args, || {
                lora_linear_forward(&exact, &x, None).map(drop)
            })?;
            let saved = lora_linear_forward(&exact, &x, None)?;
            let exact_bwd = ms_of(gpu, args, || {
                lora_linear_backward(&exact, &dy, &x, &saved.xa, &mut da, &mut db, true).map(drop)
            })?;
            drop(saved);
            println!(
                "{:<5} {:>13} {:>4} | {:>8.3} {:>8.3} {:>5.1}% {:>8.3} {:>5.1}% | {:>8.3} {:>8.3} {:>5.1}% {:>8.3} {:>5.1}% | {:>7.1} | {:>6.1}% {:>6.1}%",
                p.name().trim_end_matches("_proj"),
                format!("{inp} -> {out}"),
                r,
                base_fwd,
                lora_fwd,
                100.0 * lora_fwd / base_fwd,
                op_fwd,
                100.0 * (op_fwd / base_fwd - 1.0),
                base_bwd,
                lora_bwd,
                100.0 * lora_bwd / base_bwd,
                op_bwd,
                100.0 * (op_bwd / base_bwd - 1.0),
                tflops(lora_fwd_flops, lora_fwd),
                100.0 * (exact_fwd / base_fwd - 1.0),
                100.0 * (exact_bwd / base_bwd - 1.0),
            );
            rows.push(json!({
                "projection": p.name(), "in": inp, "out": out, "r": r, "tokens": n,
                "base_fwd_ms": base_fwd, "adapter_fwd_ms": lora_fwd, "op_fwd_ms": op_fwd,
                "base_bwd_ms": base_bwd, "adapter_bwd_ms": lora_bwd, "op_bwd_ms": op_bwd,
                "fwd_ratio": lora_fwd / base_fwd, "bwd_ratio": lora_bwd / base_bwd,
                "op_fwd_overhead": op_fwd / base_fwd - 1.0, "op_bwd_overhead": op_bwd / base_bwd - 1.0,
                "op_fp32_fwd_ms": exact_fwd, "op_fp32_bwd_ms": exact_bwd,
                "op_fp32_fwd_overhead": exact_fwd / base_fwd - 1.0,
                "op_fp32_bwd_overhead": exact_bwd / base_bwd - 1.0,
                "base_flops": base_flops, "adapter_fwd_flops": lora_fwd_flops,
                "adapter_bwd_flops": lora_bwd_flops,
                "flop_ratio": lora_fwd_flops / base_flops,
                "base_fwd_tflops": tflops(base_flops, base_fwd),
                "adapter_fwd_tflops": tflops(lora_fwd_flops, lora_fwd),
                "adapter_bwd_tflops": tflops(lora_bwd_flops, lora_bwd),
            }));
        }
    }
    Ok(())
}

/// Random bf16 base weights of `config` on the GPU, built in memory: one random CPU tensor
/// per distinct (shape, kind), uploaded separately for every layer so each layer holds its
/// own device memory as a loaded model does.
fn random_weights(config: &ModelConfig, dev: &Device) -> Result<ModelWeights> {
    let shapes: HashMap<String, Vec<usize>> = config.tensor_shapes().into_iter().collect();
    let mut cache: HashMap<(Vec<usize>, bool), Tensor> = HashMap::new();
    let mut get = |name: &str| -> Result<Tensor> {
        let shape = shapes
            .get(name)
            .with_context(|| format!("the config has no tensor `{name}`"))?
            .clone();
        let norm = name.ends_with("norm.weight");
        let key = (shape.clone(), norm);
        if !cache.contains_key(&key) {
            let n = shape.iter().product();
            let (mean, std) = if norm { (1.0, 0.1) } else { (0.0, 0.02) };
            let values = random_values(n, mean, std, 7 + cache.len() as u64);
            cache.insert(
                key.clone(),
                Tensor::from_f32_as(&shape, values, DType::BF16)?,
            );
        }
        Ok(cache[&key].to_device(dev)?)
    };
    let mut layers = Vec::with_capacity(config.num_hidden_layers);
    for l in 0..config.num_hidden_layers {
        let attn = |n: &str| format!("model.layers.{l}.self_attn.{n}");
        let mlp = |n: &str| format!("model.layers.{l}.mlp.{n}");
        let mut opt = |on: bool, name: String| -> Result<Option<Tensor>> {
            if on {
                get(&name).map(Some)
            } else {
                Ok(None)
            }
        };
        let q_bias = opt(config.qkv_bias, attn("q_proj.bias"))?;
        let k_bias = opt(config.qkv_bias, attn("k_proj.bias"))?;
        let v_bias = opt(config.qkv_bias, attn("v_proj.bias"))?;
        let o_bias = opt(config.o_bias, attn("o_proj.bias"))?;
        let q_norm = opt(config.qk_norm, attn("q_norm.weight"))?;
        let k_norm = opt(config.qk_norm, attn("k_norm.weight"))?;
        layers.push(LayerWeights {
            input_layernorm: get(&format!("model.layers.{l}.input_layernorm.weight"))?,
            q_proj: get(&attn("q_proj.weight"))?,
            k_proj: get(&attn("k_proj.weight"))?,
            v_proj: get(&attn("v_proj.weight"))?,
            o_proj: get(&attn("o_proj.weight"))?,
            q_bias,
            k_bias,
            v_bias,
            o_bias,
            q_norm,
            k_norm,
            post_attention_layernorm: get(&format!(
                "model.layers.{l}.post_attention_layernorm.weight"
            ))?,
            gate_proj: get(&mlp("gate_proj.weight"))?,
            up_proj: get(&mlp("up_proj.weight"))?,
            down_proj: get(&mlp("down_proj.weight"))?,
        });
    }
    let embed_tokens = get("model.embed_tokens.weight")?;
    let norm = get("model.norm.weight")?;
    let lm_head = if config.tie_word_embeddings {
        None
    } else {
        Some(get("lm_head.weight")?)
    };
    Ok(ModelWeights {
        config: config.clone(),
        embed_tokens,
        layers,
        norm,
        lm_head,
    })
}

/// LoRA of rank `r` (alpha = 2r) on all seven projections of every layer, random A and B
/// (B not zero, so the adapter path computes real values), one random pair per projection
/// type shared by the layers, each layer with its own device copy.
fn random_lora(config: &ModelConfig, r: usize, dev: &Device) -> Result<LoraState> {
    let mut state = LoraState::empty(config.num_hidden_layers);
    for (pi, p) in Projection::ALL.into_iter().enumerate() {
        let (out, inp) = config.projection_shape(p);
        let seed = 1000 + 10 * pi as u64 + r as u64;
        let a = Tensor::from_f32(
            &[r, inp],
            random_values(r * inp, 0.0, 1.0 / (inp as f32).sqrt(), seed),
        )?;
        let b = Tensor::from_f32(&[out, r], random_values(out * r, 0.0, 0.01, seed + 1))?;
        for slots in state.layers.iter_mut() {
            slots[p as usize] = Some(LoraTensors::new(&a, &b, 2.0, dev)?);
        }
    }
    Ok(state)
}

/// Device time of `f` over `warmup + runs` calls (median of the timed ones), with marks.
fn time_forward(
    gpu: &Arc<Gpu>,
    warmup: usize,
    runs: usize,
    mut f: impl FnMut() -> Result<()>,
) -> Result<f64> {
    for _ in 0..warmup {
        f()?;
    }
    let mut t = Vec::with_capacity(runs);
    for _ in 0..runs.max(1) {
        let a = gpu.mark()?;
        f()?;
        let b = gpu.mark()?;
        t.push(b.ms_since(&a)?);
    }
    Ok(median(t))
}

/// Part 2: the whole model's forward, separate against merged, per rank.
fn end_to_end(gpu: &Arc<Gpu>, args: &BenchLoraArgs, config: &ModelConfig) -> Result<Vec<Value>> {
    let dev = Device::Cuda(gpu.clone());
    let t0 = std::time::Instant::now();
    let weights = random_weights(config, &dev).context("building random weights on the GPU")?;
    gpu.synchronize()?;
    eprintln!(
        "random bf16 weights on the GPU in {:.1} s ({:.2} GiB live)",
        t0.elapsed().as_secs_f64(),
        gpu.live_bytes() as f64 / (1u64 << 30) as f64
    );
    let layers = config.num_hidden_layers;
    let mut decoder = Decoder::new(weights, LoraState::empty(layers))?;
    let mut rng = Rng::new(5);
    let rows: Vec<(Vec<i32>, Vec<i32>)> = (0..args.e2e_batch)
        .map(|_| {
            let ids: Vec<i32> = (0..args.e2e_seq)
                .map(|_| rng.below(config.vocab_size) as i32)
                .collect();
            (ids.clone(), ids)
        })
        .collect();
    let batch = Batch::from_rows(&rows)?;
    let (warm, runs) = (2, args.runs.clamp(3, 10));
    let fwd = |d: &Decoder| -> Result<()> {
        let (loss, _) = d.eval_loss(&batch)?;
        if !loss.is_finite() {
            bail!("the forward's loss is {loss}");
        }
        Ok(())
    };
    let base_ms = time_forward(gpu, warm, runs, || fwd(&decoder))?;
    let tokens = batch.tokens() as f64;
    println!(
        "\nwhole-model forward, {} x {} tokens (LM head fused into the loss): base {base_ms:.2} ms ({:.0} tok/s)",
        args.e2e_batch,
        args.e2e_seq,
        tokens / (base_ms / 1e3)
    );
    println!(
        "{:>4} {:>12} {:>12} {:>12} {:>9} {:>10}",
        "r", "lora params", "separate ms", "merged ms", "sep/mrg", "merge ms"
    );
    let mut out = Vec::new();
    for &r in &args.ranks {
        let result = (|| -> Result<Value> {
            decoder.lora = random_lora(config, r, &dev)?;
            let params = decoder.lora.param_count();
            let separate_ms = time_forward(gpu, warm, runs, || fwd(&decoder))?;
            // Fold the same LoRA into W on the GPU, then run with no adapter.
            let a = gpu.mark()?;
            {
                let Decoder { weights, lora, .. } = &mut decoder;
                for (l, p, t) in lora.iter() {
                    let w = weights.projection_mut(l, p).context("layer")?;
                    lora_merge(w, &t.a, &t.b, t.scaling, false)?;
                }
            }
            let merge_ms = gpu.mark()?.ms_since(&a)?;
            let lora = std::mem::replace(&mut decoder.lora, LoraState::empty(layers));
            let merged_ms = time_forward(gpu, warm, runs, || fwd(&decoder))?;
            for (l, p, t) in lora.iter() {
                let w = decoder.weights.projection_mut(l, p).context("layer")?;
                lora_unmerge(w, &t.a, &t.b, t.scaling, false)?;
            }
            drop(lora);
            println!(
                "{r:>4} {params:>12} {separate_ms:>12.2} {merged_ms:>12.2} {:>9.3} {merge_ms:>10.2}",
                separate_ms / merged_ms
            );
            Ok(json!({
                "r": r, "lora_params": params, "batch": args.e2e_batch, "seq": args.e2e_seq,
                "base_ms": base_ms, "separate_ms": separate_ms, "merged_ms": merged_ms,
                "separate_over_merged": separate_ms / merged_ms, "merge_ms": merge_ms,
                "separate_tok_s": tokens / (separate_ms / 1e3),
                "merged_tok_s": tokens / (merged_ms / 1e3),
            }))
        })();
        // Free this rank's LoRA (and whatever a failure left) before the next.
        decoder.lora = LoraState::empty(layers);
        gpu.synchronize()?;
        match result {
            Ok(v) => out.push(v),
            Err(e) => {
                println!("{r:>4} ERROR: {e:#}");
                out.push(json!({"r": r, "error": format!("{e:#}")}));
            }
        }
    }
    Ok(out)
}

pub fn bench_lora(args: BenchLoraArgs) -> Result<i32> {
    let config = shape_config(&args.shape)?;
    if args.ranks.is_empty() || args.ranks.contains(&0) {
        bail!("--ranks must list positive ranks, got {:?}", args.ranks);
    }
    if args.tokens == 0 || args.runs == 0 || args.e2e_batch == 0 || args.e2e_seq < 2 {
        bail!("--tokens, --runs and --e2e-batch must be positive and --e2e-seq at least 2");
    }
    let gpu = Gpu::new(0).context(
        "tigon bench lora times CUDA kernels and needs a CUDA GPU (there is no CPU mode)",
    )?;
    println!(
        "bench lora on {}: shape {}, {} tokens, ranks {:?}, median of {} runs after {} warm-up, bf16",
        gpu.name(),
        args.shape,
        args.tokens,
        args.ranks,
        args.runs,
        args.warmup
    );
    println!(
        "lora = the adapter path alone (A, B bf16), ratio = lora / base; op = lora_linear as the engine \
         calls it (base + adapter, fp32 A/B cast per call), over = op / base - 1"
    );
    let proj = projections(&gpu, &args, &config)?;
    let mut failed = 0;
    let e2e = if args.no_e2e {
        Vec::new()
    } else {
        match end_to_end(&gpu, &args, &config) {
            Ok(v) => {
                failed += v.iter().filter(|r| r.get("error").is_some()).count();
                v
            }
            Err(e) => {
                failed += 1;
                println!("end to end: ERROR: {e:#}");
                vec![json!({"error": format!("{e:#}")})]
            }
        }
    };
    if let Some(p) = &args.json {
        write_json(
            p,
            &json!({
                "gpu": gpu.name(), "date": utc_date(), "shape": args.shape,
                "tokens": args.tokens, "ranks": args.ranks, "runs": args.runs,
                "warmup": args.warmup, "projections": proj, "end_to_end": e2e,
            }),
        )?;
    }
    Ok(if failed == 0 { 0 } else { 1 })
}
