//! Reads folders written by transformers + PEFT (see bench/peft_interop.py, "reverse"
//! part) and checks tigon-model against them: config.json and the base weights load, the
//! PEFT adapter loads (keys, shapes, rank/alpha patterns, rsLoRA), and tigon's merge
//! equals PEFT's merge_and_unload() in f32.
//!
//!     cargo run -p tigon-model --example peft_check -- DIR   (DIR/{llama,qwen2,qwen3}/...)

use std::path::PathBuf;

use tigon_kernels::{DType, Device};
use tigon_model::lora::{Adapter, AdapterSet};
use tigon_model::{ModelConfig, ModelWeights, Weights};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::args().nth(1).ok_or("usage: peft_check DIR")?);
    let mut ok = true;
    let mut tags: Vec<_> = std::fs::read_dir(&root)?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("base").is_dir())
        .map(|e| e.file_name())
        .collect();
    tags.sort();
    for tag in tags {
        let dir = root.join(&tag);
        let config = ModelConfig::from_dir(&dir.join("base"))?;
        let mut weights = ModelWeights::from_dir(&dir.join("base"), &Device::Cpu, DType::F32)?;
        let adapter = Adapter::load(&dir.join("adapter"), "peft", &config)?;
        let summary: Vec<String> = adapter
            .modules
            .iter()
            .filter(|m| m.target.layer == 1)
            .map(|m| {
                format!(
                    "{} r={} s={:.4}",
                    m.target.projection.name(),
                    m.target.r,
                    m.target.scaling
                )
            })
            .collect();
        let mut set = AdapterSet::new();
        set.add(adapter)?;
        set.activate("peft")?;
        set.merge(&mut weights, true)?;
        let reference = Weights::open_file(&dir.join("merged_f32.safetensors"))?;
        let mut worst = 0f64;
        let mut compared = 0;
        for name in reference.names() {
            let r = reference.get_any_shape(name, DType::F32)?.to_f32_vec()?;
            let ours = weights
                .named_tensors()
                .into_iter()
                .find(|(n, _)| n == name)
                .ok_or(format!("{name} not in tigon's model"))?
                .1
                .to_f32_vec()?;
            let scale = r.iter().fold(0f32, |m, x| m.max(x.abs())) as f64;
            for (a, b) in ours.iter().zip(&r) {
                worst = worst.max((*a as f64 - *b as f64).abs() / scale);
            }
            compared += 1;
        }
        let good = worst < 1e-6 && compared == 7 * config.num_hidden_layers;
        ok &= good;
        println!(
            "{:?}: {:?} rope={:?} tied={} | {} projections merged, max rel diff vs PEFT {worst:.2e} {} | layer 1: {}",
            tag,
            config.architecture,
            config.rope_scaling,
            config.tie_word_embeddings,
            compared,
            if good { "OK" } else { "FAIL" },
            summary.join(", ")
        );
    }
    if !ok {
        return Err("mismatch against PEFT".into());
    }
    Ok(())
}
