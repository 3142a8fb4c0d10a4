//! The `tigon` command.

mod bench_lora;
mod bench_train;
mod demo_cmd;
mod eval_cmd;
mod gpu;
mod merge_cmd;
mod parity_cmd;
mod train_cmd;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "tigon",
    version,
    about = "Fused-kernel LoRA fine-tuning of Llama-family models"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run every CUDA op against its CPU reference on fresh random inputs (outputs poisoned
    /// first) and print one line per output with its relative error and PASS/FAIL.
    GpuCheck(gpu::GpuCheckArgs),
    /// Token-mean loss and perplexity of a model (with optional LoRA adapters) on a JSONL
    /// file, forward only; the last stdout line is a JSON object with loss, perplexity,
    /// tokens and examples.
    Eval(eval_cmd::EvalArgs),
    /// Merge PEFT adapters into the base weights and write a Hugging Face model folder
    /// (bf16 safetensors, config, tokenizer files); refuses non-finite results unless --unsafe.
    Merge(merge_cmd::MergeArgs),
    /// Compare logits, loss and every LoRA gradient with HF transformers + PEFT on the
    /// fixtures of parity/hf_reference.py; one PASS/FAIL line per fixture.
    Parity(parity_cmd::ParityArgs),
    /// Fine-tune a LoRA adapter from a TOML config and/or flags (every config key is also a
    /// flag): JSONL data, checkpoints, --resume, metrics.jsonl and loss.png in --output.
    Train(Box<train_cmd::TrainArgs>),
    /// Fine-tune a LoRA adapter on a small built-in model and task (no download) and print
    /// its held-out exact-match accuracy; writes the adapter, metrics and loss.png.
    Demo(demo_cmd::DemoArgs),
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        what: BenchCommand,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Each fused kernel against the unfused composition of simple kernels, same inputs:
    /// median time, peak extra device memory, and achieved bandwidth or FLOP/s.
    Kernels(gpu::BenchKernelsArgs),
    /// LoRA training throughput, peak memory, MFU and the loss at every step on a model
    /// folder and fixed token batches (the tigon side of bench/hf_compare.py).
    Train(bench_train::BenchTrainArgs),
    /// Base GEMM against the LoRA adapter path per projection and rank at a model shape,
    /// and the whole model's forward merged against separate (GPU only).
    Lora(bench_lora::BenchLoraArgs),
}

fn main() {
    let cli = Cli::parse();
    let result: Result<i32> = match cli.command {
        Command::GpuCheck(args) => gpu::gpu_check(args),
        Command::Eval(args) => eval_cmd::eval(args),
        Command::Merge(args) => merge_cmd::merge(args),
        Command::Parity(args) => parity_cmd::parity(args),
        Command::Train(args) => train_cmd::run(*args),
        Command::Demo(args) => demo_cmd::run(args),
        Command::Bench { what } => match what {
            BenchCommand::Kernels(args) => gpu::bench_kernels(args),
            BenchCommand::Train(args) => bench_train::bench_train(args),
            BenchCommand::Lora(args) => bench_lora::bench_lora(args),
        },
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    }
}
