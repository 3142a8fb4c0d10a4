//! A training-step smoke test and timing on the GPU (or the CPU for tiny presets):
//! random weights at a preset shape, LoRA r=16 on all seven projections, a learnable
//! synthetic batch (each row repeats a random segment, so the second half is predictable
//! from the first), a few AdamW steps with the loss and step time printed per step.
//!
//!     engine_smoke [preset=llama-3.2-1b] [batch=4] [seq=2048] [steps=10] [ckpt=0|1] [fusion=all]
//!
//! `fusion` picks the fused kernels (see `tigon_engine::Fusion`): `all`, `none` (every op as
//! its plain composition), a list of the ops to fuse, or `all,-op,...`.

use std::time::Instant;

use tigon_engine::{Batch, Decoder, Fusion, LoraState};
use tigon_kernels::ops::adamw::AdamW;
use tigon_kernels::rng::Rng;
use tigon_kernels::{DType, Device, Gpu};
use tigon_model::{random_model, Adapter, LoraConfig, ModelConfig, ModelWeights, TargetModules};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, d: &str| args.get(i).cloned().unwrap_or_else(|| d.to_string());
    let preset = arg(0, "llama-3.2-1b");
    let (batch, seq, steps): (usize, usize, usize) = (
        arg(1, "4").parse()?,
        arg(2, "2048").parse()?,
        arg(3, "10").parse()?,
    );
    let checkpointing = arg(4, "0") == "1";
    let fusion: Fusion = arg(5, "all").parse()?;
    let config = match preset.as_str() {
        "llama-3.2-1b" => ModelConfig::llama_3_2_1b(),
        "llama-3-8b" => ModelConfig::llama_3_8b(),
        "tiny-llama" => ModelConfig::tiny_llama(),
        other => return Err(format!("unknown preset {other}").into()),
    };
    let dir = std::env::temp_dir().join(format!("tigon-smoke-{preset}"));
    if !dir.join("config.json").is_file() {
        let t = Instant::now();
        random_model(&config, 7, &dir)?;
        println!(
            "random weights written to {} in {:.1?}",
            dir.display(),
            t.elapsed()
        );
    }
    let (device, dtype) = match Gpu::new(0) {
        Ok(g) => (Device::Cuda(g), DType::BF16),
        Err(_) => (Device::Cpu, DType::F32),
    };
    let t = Instant::now();
    let weights = ModelWeights::from_dir(&dir, &device, dtype)?;
    println!("loaded on {} in {:.1?}", device.name(), t.elapsed());
    let lora_config = LoraConfig {
        r: 16,
        lora_alpha: 32.0,
        target_modules: Some(TargetModules::AllLinear),
        ..LoraConfig::default()
    };
    let adapter = Adapter::new("default", lora_config, &weights.config, 1)?;
    let lora = LoraState::from_adapter(&adapter, &weights.config, &device)?;
    let mut decoder = Decoder::new(weights, lora)?;
    decoder.checkpointing = checkpointing;
    decoder.fusion = fusion;
    println!("fusion {fusion}, checkpointing {checkpointing}");

    let mut rng = Rng::new(3);
    let vocab = decoder.spec.vocab;
    let rows: Vec<(Vec<i32>, Vec<i32>)> = (0..batch)
        .map(|_| {
            let half = seq / 2;
            let seg: Vec<i32> = (0..half).map(|_| rng.below(vocab) as i32).collect();
            let ids: Vec<i32> = seg.iter().chain(seg.iter()).copied().take(seq).collect();
            (ids.clone(), ids)
        })
        .collect();
    let b = Batch::from_rows(&rows)?;
    let opt = AdamW {
        lr: 1e-3,
        weight_decay: 0.0,
        ..AdamW::default()
    };
    let gpu = match &device {
        Device::Cuda(g) => Some(g.clone()),
        Device::Cpu => None,
    };
    for step in 1..=steps {
        if let Some(g) = &gpu {
            g.synchronize()?;
            g.reset_peak();
        }
        let t = Instant::now();
        let loss = decoder.forward_backward(&b, None)?;
        let norm = decoder.optimizer_step(step as u64, &opt, Some(1.0))?;
        let loss = loss.loss.to_f32_vec()?[0];
        let norm = norm.to_f32_vec()?[0];
        let ms = t.elapsed().as_secs_f64() * 1e3;
        let peak = gpu.as_ref().map(|g| g.peak_bytes()).unwrap_or(0) as f64 / (1u64 << 30) as f64;
        println!(
            "step {step:3}  loss {loss:.4}  grad_norm {norm:.3}  {ms:8.1} ms  {:7.0} tok/s  peak {peak:.2} GiB",
            (batch * seq) as f64 / (ms / 1e3)
        );
        if !loss.is_finite() {
            return Err(format!("non-finite loss at step {step}").into());
        }
    }
    Ok(())
}
