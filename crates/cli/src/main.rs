//! The `tigon` command.

mod bench_train;
mod demo_cmd;
mod gpu;
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
}

fn main() {
    let cli = Cli::parse();
    let result: Result<i32> = match cli.command {
        Command::GpuCheck(args) => gpu::gpu_check(args),
        Command::Train(args) => train_cmd::run(*args),
        Command::Demo(args) => demo_cmd::run(args),
        Command::Bench { what } => match what {
            BenchCommand::Kernels(args) => gpu::bench_kernels(args),
            BenchCommand::Train(args) => bench_train::bench_train(args),
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
