//! Writes folders for checking interop with transformers + PEFT (bench/peft_interop.py):
//! for each tiny architecture, a random base model, a tigon-made adapter in PEFT's format,
//! and the merged export.
//!
//!     cargo run -p tigon-model --example peft_fixture -- OUT_DIR

use std::path::PathBuf;

use tigon_model::lora::{export_merged, Adapter, LoraConfig, LoraInit, TargetModules};
use tigon_model::{random_model, ModelConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = PathBuf::from(
        std::env::args()
            .nth(1)
            .ok_or("usage: peft_fixture OUT_DIR")?,
    );
    for (tag, model) in [
        ("llama", ModelConfig::tiny_llama()),
        ("qwen2", ModelConfig::tiny_qwen2()),
        ("qwen3", ModelConfig::tiny_qwen3()),
    ] {
        let dir = out.join(tag);
        random_model(&model, 42, &dir.join("base"))?;
        let config = LoraConfig {
            r: 4,
            lora_alpha: 8.0,
            target_modules: Some(TargetModules::AllLinear),
            // Non-zero B so the adapter changes the model.
            init_lora_weights: LoraInit::Random,
            rank_pattern: vec![("o_proj".into(), 2)],
            alpha_pattern: vec![("layers.1.mlp.down_proj".into(), 3.0)],
            use_rslora: tag == "qwen3",
            ..Default::default()
        };
        let adapter = Adapter::new("tigon", config, &model, 7)?;
        adapter.save(&dir.join("adapter"))?;
        export_merged(&dir.join("base"), &[&adapter], &dir.join("merged"))?;
        println!("{tag}: {} LoRA parameters", adapter.num_parameters());
    }
    Ok(())
}
