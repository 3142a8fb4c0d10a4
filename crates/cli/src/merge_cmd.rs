//! `tigon merge`: fold one or more PEFT adapters into the base weights and write a Hugging
//! Face model folder that transformers loads with no adapter (bf16 safetensors, sharded above
//! 5 GB, config.json and tokenizer files copied).
//!
//! Each merged weight is `W + sum_i s_i B_i A_i`, computed in f32 from the stored base weight
//! and rounded once to bf16 (`tigon_model::lora::export_merged_checked`). The merge is safe
//! by default: a weight that would hold inf or NaN is refused, naming the module, and nothing
//! is written. `--unsafe` writes it anyway (PEFT's `safe_merge=False`).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use tigon_model::lora::export_merged_checked;
use tigon_model::weights::DEFAULT_MAX_SHARD_BYTES;
use tigon_model::ModelConfig;

use crate::eval_cmd::load_adapters;

#[derive(Args, Debug)]
pub struct MergeArgs {
    /// Base model folder (config.json + safetensors).
    #[arg(long)]
    pub model: PathBuf,
    /// PEFT adapter folder to merge; repeat to merge several (their deltas add).
    #[arg(long = "adapter", required = true)]
    pub adapters: Vec<PathBuf>,
    /// Output folder (created; must not be the model folder).
    #[arg(long)]
    pub output: PathBuf,
    /// Write merged weights even if they hold inf or NaN.
    #[arg(long = "unsafe")]
    pub unsafe_merge: bool,
    /// Largest safetensors shard, in bytes.
    #[arg(long, default_value_t = DEFAULT_MAX_SHARD_BYTES, hide = true)]
    pub max_shard_bytes: u64,
}

pub fn merge(args: MergeArgs) -> Result<i32> {
    if args.max_shard_bytes == 0 {
        bail!("--max-shard-bytes must be positive");
    }
    let config = ModelConfig::from_dir(&args.model)
        .with_context(|| format!("reading the model config in {}", args.model.display()))?;
    let adapters = load_adapters(&args.adapters, &config)?;
    for (a, dir) in adapters.iter().zip(&args.adapters) {
        eprintln!(
            "{}: r {}, alpha {}, {} modules",
            dir.display(),
            a.config.r,
            a.config.lora_alpha,
            a.modules.len()
        );
    }
    let refs: Vec<_> = adapters.iter().collect();
    export_merged_checked(
        &args.model,
        &refs,
        &args.output,
        args.max_shard_bytes,
        !args.unsafe_merge,
    )
    .with_context(|| {
        format!(
            "merging into {}{}",
            args.output.display(),
            if args.unsafe_merge {
                ""
            } else {
                " (safe merge; --unsafe writes non-finite weights anyway)"
            }
        )
    })?;
    println!(
        "merged {} adapter(s) into {} -> {} (bf16 safetensors)",
        adapters.len(),
        args.model.display(),
        args.output.display()
    );
    Ok(0)
}
