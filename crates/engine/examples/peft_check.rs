//! The reverse half of bench/peft_interop.py: adapters made and saved by Python PEFT, loaded
//! by tigon. For each architecture folder it checks that the PEFT adapter loads (keys,
//! shapes, rank/alpha patterns, rsLoRA), that tigon's merge equals PEFT's
//! `merge_and_unload()` in f32, and that tigon's logits with the adapter (separate, f32, CPU)
//! equal PEFT's on the same token ids.
//!
//!     cargo run --release -p tigon-engine --example peft_check -- FIXTURE OUT
//!
//! FIXTURE is the folder `tigon-model`'s `peft_fixture` example wrote (it holds each
//! architecture's `base/`); OUT is where peft_interop.py wrote `{tag}/peft_adapter/`,
//! `peft_merged_f32.safetensors` and `peft_logits.safetensors`. Exits non-zero on any
//! mismatch, and when it finds nothing to check.

use std::path::PathBuf;

use tigon_engine::{Batch, Decoder, LoraState};
use tigon_kernels::check::rel_err;
use tigon_kernels::{DType, Device};
use tigon_model::lora::{Adapter, AdapterSet};
use tigon_model::{ModelWeights, Weights};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1).map(PathBuf::from);
    let (fixture, out) = match (args.next(), args.next()) {
        (Some(f), Some(o)) => (f, o),
        _ => return Err("usage: peft_check FIXTURE OUT".into()),
    };
    let mut tags: Vec<_> = std::fs::read_dir(&out)?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("peft_adapter").is_dir())
        .map(|e| e.file_name())
        .collect();
    tags.sort();
    if tags.is_empty() {
        return Err(format!("no {{tag}}/peft_adapter folders in {}", out.display()).into());
    }
    let mut ok = true;
    for tag in tags {
        let (dir, base) = (out.join(&tag), fixture.join(&tag).join("base"));
        let weights = ModelWeights::from_dir(&base, &Device::Cpu, DType::F32)?;
        let config = weights.config.clone();
        let adapter = Adapter::load(&dir.join("peft_adapter"), "peft", &config)?;

        // Logits, adapter separate.
        let reference = Weights::open_file(&dir.join("peft_logits.safetensors"))?;
        // The ids are int32, which the weight reader (floats only) does not take.
        let bytes = std::fs::read(dir.join("peft_logits.safetensors"))?;
        let file = safetensors::SafeTensors::deserialize(&bytes)?;
        let view = file.tensor("ids")?;
        if view.dtype() != safetensors::Dtype::I32 || view.shape().len() != 2 {
            return Err(format!("ids: {:?} {:?}", view.dtype(), view.shape()).into());
        }
        let ids_shape = view.shape().to_vec();
        let ids: Vec<i32> = view
            .data()
            .chunks_exact(4)
            .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let rows: Vec<(Vec<i32>, Vec<i32>)> = ids
            .chunks(ids_shape[1])
            .map(|r| (r.to_vec(), r.to_vec()))
            .collect();
        let batch = Batch::from_rows(&rows)?;
        let lora = LoraState::from_adapter(&adapter, &config, &Device::Cpu)?;
        let decoder = Decoder::new(weights, lora)?;
        let ours = decoder.logits(&batch)?.to_f32_vec()?;
        let theirs = reference
            .get_any_shape("logits", DType::F32)?
            .to_f32_vec()?;
        let logits_err = rel_err(&ours, &theirs);

        // Merge, against PEFT's fp32 merge_and_unload().
        let mut weights = decoder.weights;
        let mut set = AdapterSet::new();
        set.add(adapter)?;
        set.activate("peft")?;
        set.merge(&mut weights, true)?;
        let merged = Weights::open_file(&dir.join("peft_merged_f32.safetensors"))?;
        let named = weights.named_tensors();
        let mut merge_err = 0f64;
        for name in merged.names() {
            let r = merged.get_any_shape(name, DType::F32)?.to_f32_vec()?;
            let t = named
                .iter()
                .find(|(n, _)| n == name)
                .ok_or(format!("{name} not in tigon's model"))?
                .1
                .to_f32_vec()?;
            merge_err = merge_err.max(rel_err(&t, &r));
        }
        let good = logits_err < 1e-5
            && merge_err < 1e-6
            && merged.names().len() == 7 * config.num_hidden_layers;
        ok &= good;
        println!(
            "{tag:?}: {:?} | logits with the PEFT adapter rel err {logits_err:.2e} | {} merged \
             projections, worst rel err {merge_err:.2e} | {}",
            config.architecture,
            merged.names().len(),
            if good { "OK" } else { "FAIL" },
        );
    }
    if !ok {
        return Err("mismatch against PEFT".into());
    }
    Ok(())
}
