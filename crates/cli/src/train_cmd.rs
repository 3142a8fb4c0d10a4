//! `tigon train`: LoRA fine-tuning from a TOML config, any field overridden by a flag of the
//! same name (`lr` -> `--lr`, `seq_len` -> `--seq-len`). Progress shows as a bar on a
//! terminal and as plain lines otherwise; metrics, checkpoints, the final adapter and the
//! loss plot go to the output folder.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use tigon_trainer::{train, Observer, RunOptions, StepRecord, TrainConfig};
use toml::Value;

#[derive(Args, Debug, Default)]
pub struct TrainArgs {
    /// TOML config (keys are the flag names below with `_`); flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Continue from the output folder's latest checkpoint (same config).
    #[arg(long)]
    resume: bool,
    /// Start afresh even if the output folder holds checkpoints (they are removed).
    #[arg(long, conflicts_with = "resume")]
    overwrite: bool,

    /// Model folder (config.json, safetensors, tokenizer.json).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Training JSONL file (repeat for several).
    #[arg(long)]
    data: Vec<PathBuf>,
    /// auto, alpaca, chat, text or prompt-completion.
    #[arg(long)]
    format: Option<String>,
    /// Held-out JSONL file (instead of --holdout).
    #[arg(long)]
    eval_data: Option<PathBuf>,
    /// Fraction of training examples held out for evaluation.
    #[arg(long)]
    holdout: Option<f64>,
    /// Tokens per row (the longest example).
    #[arg(long)]
    seq_len: Option<usize>,
    /// Rows per micro-batch.
    #[arg(long)]
    micro_batch: Option<usize>,
    /// Micro-batches per optimizer step.
    #[arg(long)]
    grad_accum: Option<usize>,
    #[arg(long)]
    packing: Option<bool>,
    /// Loss on the response tokens only.
    #[arg(long)]
    response_only: Option<bool>,
    /// truncate or drop.
    #[arg(long)]
    too_long: Option<String>,
    /// skip or stop.
    #[arg(long)]
    bad_lines: Option<String>,
    /// Held-out evaluation every N steps (0: only at the end).
    #[arg(long)]
    eval_every: Option<u64>,
    /// Peak learning rate.
    #[arg(long)]
    lr: Option<f64>,
    /// Linear warm-up steps.
    #[arg(long)]
    warmup_steps: Option<u64>,
    /// cosine, linear or constant.
    #[arg(long)]
    decay: Option<String>,
    /// Learning rate at the end of the decay, as a fraction of --lr.
    #[arg(long)]
    min_lr_ratio: Option<f64>,
    /// AdamW decoupled weight decay.
    #[arg(long)]
    weight_decay: Option<f64>,
    /// AdamW beta1.
    #[arg(long)]
    beta1: Option<f64>,
    /// AdamW beta2.
    #[arg(long)]
    beta2: Option<f64>,
    /// AdamW epsilon.
    #[arg(long)]
    eps: Option<f64>,
    /// 0 turns clipping off.
    #[arg(long)]
    max_grad_norm: Option<f64>,
    /// Optimizer steps (or --epochs).
    #[arg(long, conflicts_with = "epochs")]
    steps: Option<u64>,
    /// Passes over the training data (or --steps).
    #[arg(long)]
    epochs: Option<f64>,
    /// Seed of the adapter init, holdout split and data order.
    #[arg(long)]
    seed: Option<u64>,
    /// LoRA rank.
    #[arg(long)]
    lora_r: Option<usize>,
    /// LoRA alpha (scaling alpha / r).
    #[arg(long)]
    lora_alpha: Option<f64>,
    /// LoRA dropout on each adapter's input in training (PEFT's lora_dropout), in [0, 1).
    #[arg(long)]
    lora_dropout: Option<f64>,
    /// Comma-separated projection names, or all-linear.
    #[arg(long, value_delimiter = ',')]
    target_modules: Vec<String>,
    /// rsLoRA scaling alpha / sqrt(r).
    #[arg(long)]
    use_rslora: Option<bool>,
    /// Recompute activations in the backward instead of keeping them.
    #[arg(long)]
    activation_checkpointing: Option<bool>,
    /// The adapter path over a bf16 base: fp32 (as PEFT, the default) or bf16.
    #[arg(long)]
    lora_precision: Option<String>,
    /// CPU offload: the embedding table in host memory (untied models).
    #[arg(long)]
    offload_embedding: Option<bool>,
    /// CPU offload: stream this many layers' weights from host memory.
    #[arg(long)]
    offload_layers: Option<usize>,
    /// Checkpoint every N steps (0: only at the end).
    #[arg(long)]
    save_every: Option<u64>,
    /// Output folder (checkpoints, adapter, metrics.jsonl, loss.png).
    #[arg(long)]
    output: Option<PathBuf>,
    /// auto, cpu or cuda.
    #[arg(long)]
    device: Option<String>,
}

fn path_value(p: &Path) -> Value {
    Value::String(p.display().to_string())
}

impl TrainArgs {
    /// The flags given, as config keys and values.
    fn overrides(&self) -> toml::Table {
        let mut t = toml::Table::new();
        let mut put = |k: &str, v: Option<Value>| {
            if let Some(v) = v {
                t.insert(k.to_string(), v);
            }
        };
        let int = |v: Option<u64>| v.map(|x| Value::Integer(x.min(i64::MAX as u64) as i64));
        let size = |v: Option<usize>| int(v.map(|x| x as u64));
        let float = |v: Option<f64>| v.map(Value::Float);
        let string = |v: &Option<String>| v.clone().map(Value::String);
        put("model", self.model.as_deref().map(path_value));
        if !self.data.is_empty() {
            put(
                "data",
                Some(Value::Array(
                    self.data.iter().map(|p| path_value(p)).collect(),
                )),
            );
        }
        put("format", string(&self.format));
        put("eval_data", self.eval_data.as_deref().map(path_value));
        put("holdout", float(self.holdout));
        put("seq_len", size(self.seq_len));
        put("micro_batch", size(self.micro_batch));
        put("grad_accum", size(self.grad_accum));
        put("packing", self.packing.map(Value::Boolean));
        put("response_only", self.response_only.map(Value::Boolean));
        put("too_long", string(&self.too_long));
        put("bad_lines", string(&self.bad_lines));
        put("eval_every", int(self.eval_every));
        put("lr", float(self.lr));
        put("warmup_steps", int(self.warmup_steps));
        put("decay", string(&self.decay));
        put("min_lr_ratio", float(self.min_lr_ratio));
        put("weight_decay", float(self.weight_decay));
        put("beta1", float(self.beta1));
        put("beta2", float(self.beta2));
        put("eps", float(self.eps));
        put("max_grad_norm", float(self.max_grad_norm));
        put("steps", int(self.steps));
        put("epochs", float(self.epochs));
        put("seed", int(self.seed));
        put("lora_r", size(self.lora_r));
        put("lora_alpha", float(self.lora_alpha));
        put("lora_dropout", float(self.lora_dropout));
        if !self.target_modules.is_empty() {
            put(
                "target_modules",
                Some(Value::Array(
                    self.target_modules
                        .iter()
                        .map(|s| Value::String(s.clone()))
                        .collect(),
                )),
            );
        }
        put("use_rslora", self.use_rslora.map(Value::Boolean));
        put(
            "activation_checkpointing",
            self.activation_checkpointing.map(Value::Boolean),
        );
        put("lora_precision", string(&self.lora_precision));
        put(
            "offload_embedding",
            self.offload_embedding.map(Value::Boolean),
        );
        put("offload_layers", size(self.offload_layers));
        put("save_every", int(self.save_every));
        put("output", self.output.as_deref().map(path_value));
        put("device", string(&self.device));
        t
    }

    /// The config file (if any) with the flags applied; `source` names it in errors.
    pub fn config(&self) -> Result<(TrainConfig, String)> {
        let (mut cfg, source) = match &self.config {
            Some(p) => (TrainConfig::from_file(p)?, p.display().to_string()),
            None => (TrainConfig::default(), "command line".to_string()),
        };
        // A run length on the command line replaces the file's, whichever kind it was.
        if self.steps.is_some() {
            cfg.epochs = None;
        }
        if self.epochs.is_some() {
            cfg.steps = None;
        }
        cfg.apply_overrides(self.overrides(), "command line")?;
        Ok((cfg, source))
    }
}

/// Progress: an indicatif bar on a terminal, else a plain line every few steps.
pub struct Progress {
    bar: Option<ProgressBar>,
    total: u64,
    every: u64,
}

impl Progress {
    pub fn new() -> Progress {
        Progress {
            bar: None,
            total: 0,
            every: 1,
        }
    }
}

impl Observer for Progress {
    fn info(&mut self, msg: &str) {
        match &self.bar {
            Some(b) => b.println(msg),
            None => eprintln!("{msg}"),
        }
    }

    fn start(&mut self, first: u64, total: u64) {
        self.total = total;
        self.every = (total / 20).max(1);
        if std::io::stderr().is_terminal() {
            let bar = ProgressBar::new(total);
            bar.set_style(
                ProgressStyle::with_template(
                    "{bar:30.cyan/blue} {pos}/{len} {msg} [{elapsed_precise} < {eta_precise}]",
                )
                .expect("valid progress template")
                .progress_chars("=> "),
            );
            bar.set_position(first.saturating_sub(1));
            bar.enable_steady_tick(Duration::from_millis(250));
            self.bar = Some(bar);
        }
    }

    fn step(&mut self, r: &StepRecord) {
        let eval = r
            .eval_loss
            .map(|e| format!(" eval {e:.4}"))
            .unwrap_or_default();
        let msg = format!(
            "loss {:.4}{eval} | {:.0} tok/s | lr {:.2e} | grad {:.3}",
            r.loss, r.tok_s, r.lr, r.grad_norm
        );
        match &self.bar {
            Some(b) => {
                b.set_position(r.step);
                b.set_message(msg.clone());
                if r.eval_loss.is_some() {
                    b.println(format!("step {}: {msg}", r.step));
                }
            }
            None => {
                if r.step.is_multiple_of(self.every)
                    || r.step == self.total
                    || r.eval_loss.is_some()
                {
                    eprintln!("step {}/{}: {msg} | {:.1}s", r.step, self.total, r.elapsed);
                }
            }
        }
    }

    fn saved(&mut self, step: u64, dir: &Path) {
        self.info(&format!("step {step}: saved {}", dir.display()));
    }

    fn finish(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish();
        }
    }
}

pub fn run(args: TrainArgs) -> Result<i32> {
    let (cfg, source) = args.config()?;
    let mut progress = Progress::new();
    let out = train(
        &cfg,
        &source,
        RunOptions {
            resume: args.resume,
            overwrite: args.overwrite,
        },
        &mut progress,
    )
    .with_context(|| format!("tigon train ({source})"))?;
    let last = out.records.last();
    println!(
        "trained {} steps on {}: loss {:.4}{}",
        out.total_steps,
        out.device,
        last.map(|r| r.loss).unwrap_or(f64::NAN),
        last.and_then(|r| r.eval_loss)
            .map(|e| format!(", held-out loss {e:.4}"))
            .unwrap_or_default()
    );
    println!(
        "adapter: {} (PEFT format); metrics: {}; plot: {}",
        out.adapter_dir.display(),
        out.adapter_dir.join(tigon_trainer::METRICS_FILE).display(),
        out.plot.display()
    );
    Ok(0)
}
