//! `tigon demo`: fine-tune a LoRA adapter on a small built-in model and task, no download,
//! and report held-out exact-match accuracy before and after (see tigon_trainer::demo).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use tigon_train::DemoTask;
use tigon_trainer::demo::{run_demo, DemoOptions};
use tigon_trainer::DeviceChoice;

use crate::train_cmd::Progress;

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Output folder: base model, data, config, checkpoints, adapter, metrics, loss.png.
    #[arg(long, default_value = "demo-out")]
    output: PathBuf,
    /// Optimizer steps (default 500).
    #[arg(long)]
    steps: Option<u64>,
    /// auto (GPU if found, else CPU), cpu or cuda.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Seed of the base weights, data and adapter.
    #[arg(long)]
    seed: Option<u64>,
    /// addition or reversal.
    #[arg(long)]
    task: Option<String>,
    /// Decoder layers of the demo model.
    #[arg(long)]
    layers: Option<usize>,
    /// Hidden size of the demo model.
    #[arg(long)]
    hidden: Option<usize>,
    #[arg(long)]
    lora_r: Option<usize>,
    #[arg(long)]
    lr: Option<f64>,
    /// Training problems generated.
    #[arg(long)]
    train_examples: Option<usize>,
    /// Longest operand in digits (addition) or word in letters (reversal).
    #[arg(long)]
    max_len: Option<u32>,
}

pub fn run(args: DemoArgs) -> Result<i32> {
    let mut o = DemoOptions {
        output: args.output,
        ..DemoOptions::default()
    };
    o.device = match args.device.as_str() {
        "auto" => DeviceChoice::Auto,
        "cpu" => DeviceChoice::Cpu,
        "cuda" => DeviceChoice::Cuda,
        d => bail!("--device {d}: expected auto, cpu or cuda"),
    };
    if let Some(t) = args.task {
        o.task = match t.as_str() {
            "addition" => DemoTask::Addition,
            "reversal" => DemoTask::Reversal,
            _ => bail!("--task {t}: expected addition or reversal"),
        };
    }
    o.steps = args.steps.unwrap_or(o.steps);
    o.seed = args.seed.unwrap_or(o.seed);
    o.model.layers = args.layers.unwrap_or(o.model.layers);
    if let Some(h) = args.hidden {
        o.model.hidden = h;
        o.model.intermediate = 2 * h;
    }
    o.lora_r = args.lora_r.unwrap_or(o.lora_r);
    o.lr = args.lr.unwrap_or(o.lr);
    o.train_examples = args.train_examples.unwrap_or(o.train_examples);
    o.max_digits = args.max_len.unwrap_or(o.max_digits);
    if o.steps == 0 {
        bail!("--steps must be positive");
    }

    let mut progress = Progress::new();
    let r = run_demo(&o, &mut progress).context("tigon demo")?;
    println!(
        "demo: {} steps on {} in {:.1}s (training {:.1}s); train loss {:.3} -> {:.3}{}",
        r.steps,
        r.device,
        r.total_seconds,
        r.train_seconds,
        r.first_loss,
        r.last_loss,
        match (r.first_eval_loss, r.last_eval_loss) {
            (Some(a), Some(b)) => format!(", held-out loss {a:.3} -> {b:.3}"),
            _ => String::new(),
        }
    );
    for (p, want, got) in &r.samples {
        println!("  {p}{got:<6} (expected {want})");
    }
    println!(
        "held-out exact match: {:.1}% of {} (base model: {:.1}%)",
        100.0 * r.accuracy,
        r.heldout,
        100.0 * r.accuracy_before
    );
    println!(
        "adapter (PEFT): {}; metrics: {}; plot: {}",
        r.output.display(),
        r.output.join(tigon_trainer::METRICS_FILE).display(),
        r.plot.display()
    );
    Ok(0)
}
