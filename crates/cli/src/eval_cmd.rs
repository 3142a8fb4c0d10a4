//! `tigon eval`: the token-mean loss and perplexity of a model (with zero or more LoRA
//! adapters) on a JSONL file, forward only.
//!
//! The data goes through the same loading as training (format detection, tokenizer and chat
//! template of the model folder, response-only labels unless `--all-tokens`, truncation to
//! `--seq-len`). Examples are packed, whole and in file order, into micro-batches of at most
//! `--batch-tokens` tokens, each example its own attention segment with its own positions, so
//! the summed loss is exactly the sum of the per-example losses. The LM head stays fused into
//! the loss (`Decoder::eval_loss`), so no full logits are stored.
//!
//! Several adapters are applied together, as PEFT does with a list of active adapters: their
//! deltas add. In separate mode that is one LoRA of the summed rank, `A = [A_1; A_2; ..]`
//! and `B = [s_1 B_1, s_2 B_2, ..]` with scaling 1, which is exact.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use serde_json::{json, Value};
use tigon_engine::{Batch, Decoder, LoraState, LoraTensors};
use tigon_kernels::{DType, Device, Gpu, Tensor};
use tigon_model::{Adapter, ModelConfig, ModelWeights, Projection};
use tigon_train::{load_jsonl, DataFormat, DataOptions, Example, Tokenizer, TooLongPolicy};

/// Where to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DeviceChoice {
    /// The GPU in bf16 when one is usable, else the CPU in f32.
    Auto,
    /// The CPU, f32.
    Cpu,
    /// The GPU, bf16 (an error if there is none).
    Cuda,
}

/// The device and the dtype of the base weights for `choice`.
pub fn pick_device(choice: DeviceChoice) -> Result<(Device, DType)> {
    match choice {
        DeviceChoice::Cpu => Ok((Device::Cpu, DType::F32)),
        DeviceChoice::Cuda => {
            let gpu = Gpu::new(0).context("--device cuda: no usable CUDA GPU")?;
            Ok((Device::Cuda(gpu), DType::BF16))
        }
        DeviceChoice::Auto => match Gpu::new(0) {
            Ok(gpu) => Ok((Device::Cuda(gpu), DType::BF16)),
            Err(e) => {
                eprintln!("no usable GPU ({e}); running on the CPU in f32");
                Ok((Device::Cpu, DType::F32))
            }
        },
    }
}

#[derive(Args, Debug)]
pub struct EvalArgs {
    /// Hugging Face model folder (config.json, safetensors, tokenizer files).
    #[arg(long)]
    pub model: PathBuf,
    /// PEFT adapter folder; repeat to apply several at once (their deltas add).
    #[arg(long = "adapter")]
    pub adapters: Vec<PathBuf>,
    /// JSONL data (Alpaca, chat, prompt/completion or text lines).
    #[arg(long)]
    pub data: PathBuf,
    /// Line format (auto: decided per line from its keys).
    #[arg(long, default_value = "auto", value_parser = parse_format)]
    pub format: DataFormat,
    /// Longest example in tokens; longer ones are truncated (as in training).
    #[arg(long, default_value_t = 2048)]
    pub seq_len: usize,
    /// Tokens per forward pass (whole examples are packed up to this many).
    #[arg(long, default_value_t = 8192)]
    pub batch_tokens: usize,
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
    pub device: DeviceChoice,
    /// Score every token after the first, not only the responses.
    #[arg(long)]
    pub all_tokens: bool,
    /// Take the tokenizer from this folder instead of the model folder.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
}

fn parse_format(s: &str) -> std::result::Result<DataFormat, String> {
    s.parse()
}

/// One LoRA state for `adapters` applied together (see the module doc).
pub fn combined_lora(
    adapters: &[Adapter],
    config: &ModelConfig,
    device: &Device,
) -> Result<LoraState> {
    match adapters {
        [] => return Ok(LoraState::empty(config.num_hidden_layers)),
        [one] => return Ok(LoraState::from_adapter(one, config, device)?),
        _ => {}
    }
    // Check every adapter against the model first (shapes, layers).
    for a in adapters {
        LoraState::from_adapter(a, config, &Device::Cpu)
            .with_context(|| format!("adapter `{}`", a.name))?;
    }
    let mut state = LoraState::empty(config.num_hidden_layers);
    for (layer, slots) in state.layers.iter_mut().enumerate() {
        for p in Projection::ALL {
            let modules: Vec<_> = adapters.iter().filter_map(|a| a.find(layer, p)).collect();
            if modules.is_empty() {
                continue;
            }
            let (out, inp) = config.projection_shape(p);
            let rank: usize = modules.iter().map(|m| m.a.shape()[0]).sum();
            let mut a = Vec::with_capacity(rank * inp);
            let mut b = vec![0f32; out * rank];
            let mut col = 0;
            for m in &modules {
                let r = m.a.shape()[0];
                a.extend(m.a.to_f32_vec()?);
                let s = m.target.scaling as f32;
                let bm = m.b.to_f32_vec()?;
                for o in 0..out {
                    for k in 0..r {
                        b[o * rank + col + k] = s * bm[o * r + k];
                    }
                }
                col += r;
            }
            let a = Tensor::from_f32(&[rank, inp], a)?;
            let b = Tensor::from_f32(&[out, rank], b)?;
            slots[p as usize] = Some(LoraTensors::new(&a, &b, 1.0, device)?);
        }
    }
    Ok(state)
}

/// Load every adapter folder against `config`.
pub fn load_adapters(dirs: &[PathBuf], config: &ModelConfig) -> Result<Vec<Adapter>> {
    dirs.iter()
        .enumerate()
        .map(|(i, dir)| {
            Adapter::load(dir, &format!("adapter{i}"), config)
                .with_context(|| format!("loading the adapter {}", dir.display()))
        })
        .collect()
}

/// Whole examples in file order, packed greedily into batches of at most `batch_tokens`
/// tokens (an example longer than that gets a batch of its own).
pub fn eval_batches(examples: &[Example], batch_tokens: usize) -> Result<Vec<Batch>> {
    let mut batches = Vec::new();
    let mut rows: Vec<(Vec<i32>, Vec<i32>)> = Vec::new();
    let mut tokens = 0;
    for ex in examples {
        if !rows.is_empty() && tokens + ex.len() > batch_tokens {
            batches.push(Batch::from_rows(&rows)?);
            rows.clear();
            tokens = 0;
        }
        rows.push((
            ex.input_ids.iter().map(|&i| i as i32).collect(),
            ex.labels.clone(),
        ));
        tokens += ex.len();
    }
    if !rows.is_empty() {
        batches.push(Batch::from_rows(&rows)?);
    }
    Ok(batches)
}

/// A path list as JSON: null for none, a string for one, a list for several.
fn paths_json(paths: &[PathBuf]) -> Value {
    match paths {
        [] => Value::Null,
        [one] => json!(one.display().to_string()),
        many => json!(many
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()),
    }
}

/// Run the evaluation; returns the result object (`tigon eval` prints it as its last line).
pub fn evaluate(args: &EvalArgs) -> Result<Value> {
    if args.seq_len < 2 {
        bail!("--seq-len must be at least 2, got {}", args.seq_len);
    }
    if args.batch_tokens == 0 {
        bail!("--batch-tokens must be positive");
    }
    let config = ModelConfig::from_dir(&args.model)
        .with_context(|| format!("reading the model config in {}", args.model.display()))?;
    let tok_dir = args.tokenizer.as_deref().unwrap_or(&args.model);
    let tok = Tokenizer::from_dir(tok_dir)
        .with_context(|| format!("loading the tokenizer of {}", tok_dir.display()))?;
    let opts = DataOptions {
        format: args.format,
        max_len: args.seq_len,
        train_on_prompt: args.all_tokens,
        too_long: TooLongPolicy::Truncate,
        ..DataOptions::default()
    };
    let data = load_jsonl(&args.data, &tok, &opts)?;
    eprintln!("{}: {}", args.data.display(), data.stats);
    check_vocab(&data.examples, config.vocab_size, &args.data, tok_dir)?;
    let adapters = load_adapters(&args.adapters, &config)?;

    let (device, dtype) = pick_device(args.device)?;
    eprintln!(
        "loading {} on {} ({dtype:?})",
        args.model.display(),
        device.name()
    );
    let weights = ModelWeights::from_dir(&args.model, &device, dtype)
        .with_context(|| format!("loading {}", args.model.display()))?;
    let lora = combined_lora(&adapters, &weights.config, &device)?;
    let decoder = Decoder::new(weights, lora)?;

    let batches = eval_batches(&data.examples, args.batch_tokens)?;
    let (mut sum, mut n) = (0f64, 0usize);
    let t0 = std::time::Instant::now();
    for (i, batch) in batches.iter().enumerate() {
        let (s, k) = decoder
            .eval_loss(batch)
            .with_context(|| format!("batch {} of {}", i + 1, batches.len()))?;
        if !s.is_finite() {
            bail!("batch {} of {}: the loss is {s}", i + 1, batches.len());
        }
        sum += s;
        n += k;
    }
    if n == 0 {
        bail!("{}: no scored tokens", args.data.display());
    }
    let loss = sum / n as f64;
    eprintln!(
        "{} batches, {n} scored tokens in {:.2} s",
        batches.len(),
        t0.elapsed().as_secs_f64()
    );
    Ok(json!({
        "loss": loss,
        "perplexity": loss.exp(),
        "tokens": n,
        "examples": data.examples.len(),
        "model": args.model.display().to_string(),
        "adapter": paths_json(&args.adapters),
        "data": args.data.display().to_string(),
        "device": device.name(),
    }))
}

/// Every token id must have an embedding row.
fn check_vocab(examples: &[Example], vocab: usize, data: &Path, tok_dir: &Path) -> Result<()> {
    for (i, ex) in examples.iter().enumerate() {
        if let Some(&id) = ex.input_ids.iter().find(|&&id| id as usize >= vocab) {
            bail!(
                "{}: example {} has token id {id}, outside the model's vocabulary of {vocab} \
                 (is the tokenizer in {} the model's?)",
                data.display(),
                i + 1,
                tok_dir.display()
            );
        }
    }
    Ok(())
}

pub fn eval(args: EvalArgs) -> Result<i32> {
    let result = evaluate(&args)?;
    println!("{result}");
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../parity/fixtures")
            .join(name)
    }

    #[test]
    fn batches_pack_whole_examples_in_order() {
        let ex = |n: usize, base: u32| Example {
            input_ids: (base..base + n as u32).collect(),
            labels: (0..n as i32)
                .map(|i| if i == 0 { -100 } else { i })
                .collect(),
        };
        let examples = vec![ex(3, 10), ex(4, 20), ex(6, 30), ex(2, 40)];
        let b = eval_batches(&examples, 7).unwrap();
        // 3 + 4 fit in 7; 6 alone (6 + 2 > 7); then 2.
        let cu: Vec<Vec<i32>> = b.iter().map(|b| b.cu_seqlens.clone()).collect();
        assert_eq!(cu, vec![vec![0, 3, 7], vec![0, 6], vec![0, 2]]);
        assert_eq!(b[0].input_ids, vec![10, 11, 12, 20, 21, 22, 23]);
        assert_eq!(b[0].positions, vec![0, 1, 2, 0, 1, 2, 3]);
        // Targets shift within an example, never across the boundary.
        assert_eq!(b[0].targets, vec![1, 2, -100, 1, 2, 3, -100]);
        // An example longer than the budget still gets its own batch.
        assert_eq!(eval_batches(&examples, 1).unwrap().len(), 4);
    }

    /// Two adapters applied together in one concatenated LoRA give the model the sum of
    /// their deltas: the logits equal those of the base weights with both merged.
    #[test]
    fn combined_adapters_add_their_deltas() {
        let dir = fixture("tiny_llama");
        let config = ModelConfig::from_dir(&dir.join("model")).unwrap();
        let a1 = Adapter::load(&dir.join("adapter"), "one", &config).unwrap();
        // A second adapter: the same modules with B negated and halved on half of them.
        let mut a2 = Adapter::load(&dir.join("adapter"), "two", &config).unwrap();
        a2.modules.truncate(a2.modules.len() / 2);
        for m in &mut a2.modules {
            let v: Vec<f32> = m.b.to_f32_vec().unwrap().iter().map(|x| -0.5 * x).collect();
            m.b = Tensor::from_f32(m.b.shape(), v).unwrap();
        }
        let adapters = vec![a1, a2];
        let lora = combined_lora(&adapters, &config, &Device::Cpu).unwrap();
        let batch = tigon_engine::parity::read_batch(&dir.join("batch.json")).unwrap();
        let w = ModelWeights::from_dir(&dir.join("model"), &Device::Cpu, DType::F32).unwrap();
        let separate = Decoder::new(w, lora).unwrap().logits(&batch).unwrap();

        let mut w = ModelWeights::from_dir(&dir.join("model"), &Device::Cpu, DType::F32).unwrap();
        let mut set = tigon_model::AdapterSet::new();
        for a in adapters {
            set.add(a).unwrap();
        }
        set.set_active(&["one", "two"]).unwrap();
        set.merge(&mut w, true).unwrap();
        let merged = Decoder::new(w, LoraState::empty(config.num_hidden_layers))
            .unwrap()
            .logits(&batch)
            .unwrap();
        let err = tigon_kernels::check::rel_err(
            &separate.to_f32_vec().unwrap(),
            &merged.to_f32_vec().unwrap(),
        );
        assert!(err < 1e-5, "rel err {err:e}");
    }
}
