//! Checkpoints: everything a run needs to continue exactly where it was.
//!
//! `checkpoint-{step}/` holds
//! - the adapter in PEFT's format (adapter_config.json + adapter_model.safetensors, f32:
//!   the training master weights, bit for bit);
//! - `optimizer.safetensors`: AdamW's first and second moments of every A and B (fp32),
//!   named `{module}.lora_{A,B}.exp_avg` / `.exp_avg_sq`;
//! - `trainer_state.json`: the step, the data loader's position, the config hash and the
//!   metrics file's length at that step.
//!
//! The folder is written under a temporary name, every file synced, then renamed into place;
//! only then is the `latest` pointer (a one-line file naming the folder) replaced, itself
//! through a synced temporary file and a rename. A crash at any point leaves `latest`
//! naming a complete checkpoint (or no `latest` at all before the first one).
//!
//! There is no random state to save: data order comes from (seed, epoch) through the
//! loader's position, and the LoRA dropout masks from (seed, step) (see
//! `Decoder::begin_dropout_step`).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tigon_engine::LoraState;
use tigon_kernels::{DType, Device, Tensor};
use tigon_model::weights::write_safetensors;
use tigon_model::{Adapter, ModelConfig, Weights};
use tigon_train::LoaderPosition;

use crate::error::{Result, TrainerError};
use crate::fsutil::{sync_dir, sync_file, write_atomic};

pub const LATEST: &str = "latest";
pub const STATE_FILE: &str = "trainer_state.json";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// The adapter's name inside tigon (PEFT's default).
pub const ADAPTER_NAME: &str = "default";

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps done.
    pub step: u64,
    pub total_steps: u64,
    /// Where the training data loader continues.
    pub loader: LoaderPosition,
    /// [`crate::TrainConfig::trajectory_hash`] of the run that wrote it.
    pub config_hash: String,
    /// Length of metrics.jsonl after this step's record.
    pub metrics_bytes: u64,
    /// Seconds of training so far.
    pub elapsed_s: f64,
}

pub fn checkpoint_name(step: u64) -> String {
    format!("checkpoint-{step}")
}

fn moment_names(module: &str) -> [String; 4] {
    [
        format!("{module}.lora_A.exp_avg"),
        format!("{module}.lora_A.exp_avg_sq"),
        format!("{module}.lora_B.exp_avg"),
        format!("{module}.lora_B.exp_avg_sq"),
    ]
}

/// Write `checkpoint-{state.step}` under `out` and point `latest` at it. `adapter` is the
/// run's adapter (its config and module list); the trained values are copied into it.
pub fn save(
    out: &Path,
    adapter: &mut Adapter,
    lora: &LoraState,
    state: &TrainerState,
) -> Result<PathBuf> {
    let name = checkpoint_name(state.step);
    let dir = out.join(&name);
    let temp = out.join(format!(".{name}.tmp-{}", std::process::id()));
    if temp.exists() {
        std::fs::remove_dir_all(&temp).map_err(|e| TrainerError::io(&temp, e))?;
    }
    std::fs::create_dir_all(&temp).map_err(|e| TrainerError::io(&temp, e))?;

    lora.store_into(adapter)?;
    adapter.save(&temp)?;
    for f in [
        tigon_model::lora::ADAPTER_CONFIG_FILE,
        tigon_model::lora::ADAPTER_WEIGHTS_FILE,
    ] {
        sync_file(&temp.join(f))?;
    }

    let mut moments: Vec<(String, Tensor)> = Vec::new();
    for (layer, p, t) in lora.iter() {
        let module = ModelConfig::module_name(layer, p);
        for (n, m) in moment_names(&module)
            .into_iter()
            .zip([&t.ma, &t.va, &t.mb, &t.vb])
        {
            moments.push((n, m.to_cpu()?));
        }
    }
    let refs: Vec<(&str, &Tensor)> = moments.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let opt_path = temp.join(OPTIMIZER_FILE);
    write_safetensors(&opt_path, &refs)?;
    sync_file(&opt_path)?;

    let json = serde_json::to_string_pretty(state).expect("trainer state serializes");
    write_atomic(&temp.join(STATE_FILE), json.as_bytes())?;
    sync_dir(&temp)?;

    // A checkpoint of this step from an earlier, interrupted attempt is replaced.
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(|e| TrainerError::io(&dir, e))?;
    }
    std::fs::rename(&temp, &dir).map_err(|e| TrainerError::io(&dir, e))?;
    sync_dir(out)?;
    write_atomic(&out.join(LATEST), format!("{name}\n").as_bytes())?;
    Ok(dir)
}

/// The checkpoint `latest` names under `out`, if any; an error if it names a folder that is
/// missing or incomplete.
pub fn latest(out: &Path) -> Result<Option<PathBuf>> {
    let pointer = out.join(LATEST);
    let text = match std::fs::read_to_string(&pointer) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(TrainerError::io(&pointer, e)),
    };
    let name = text.trim();
    if name.is_empty() || name.contains('/') || name.contains('\\') || name.starts_with('.') {
        return Err(TrainerError::checkpoint(
            &pointer,
            format!("does not name a checkpoint folder ({name:?})"),
        ));
    }
    let dir = out.join(name);
    if !dir.join(STATE_FILE).is_file() {
        return Err(TrainerError::checkpoint(
            &dir,
            format!("named by {} but has no {STATE_FILE}", pointer.display()),
        ));
    }
    Ok(Some(dir))
}

pub fn load_state(dir: &Path) -> Result<TrainerState> {
    let path = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| TrainerError::io(&path, e))?;
    serde_json::from_str(&text).map_err(|e| TrainerError::checkpoint(&path, e.to_string()))
}

/// The checkpoint's adapter (for `model`).
pub fn load_adapter(dir: &Path, model: &ModelConfig) -> Result<Adapter> {
    Ok(Adapter::load(dir, ADAPTER_NAME, model)?)
}

/// Put the checkpoint's AdamW moments into `lora` (already built from its adapter).
pub fn load_optimizer(dir: &Path, lora: &mut LoraState, device: &Device) -> Result<()> {
    let path = dir.join(OPTIMIZER_FILE);
    let file = Weights::open_file(&path)?;
    let expected = lora.iter().count() * 4;
    if file.names().len() != expected {
        return Err(TrainerError::checkpoint(
            &path,
            format!(
                "holds {} tensors, the adapter needs {expected}",
                file.names().len()
            ),
        ));
    }
    for (layer, p, t) in lora.iter_mut() {
        let module = ModelConfig::module_name(layer, p);
        let [ma, va, mb, vb] = moment_names(&module);
        let (a_shape, b_shape) = (t.a.shape().to_vec(), t.b.shape().to_vec());
        t.ma = file.get(&ma, &a_shape, DType::F32)?.to_device(device)?;
        t.va = file.get(&va, &a_shape, DType::F32)?.to_device(device)?;
        t.mb = file.get(&mb, &b_shape, DType::F32)?.to_device(device)?;
        t.vb = file.get(&vb, &b_shape, DType::F32)?.to_device(device)?;
    }
    Ok(())
}

/// Remove temporary checkpoint folders an interrupted save left behind.
pub fn remove_stale_temps(out: &Path) -> Result<()> {
    let entries = match std::fs::read_dir(out) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(TrainerError::io(out, e)),
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(".checkpoint-") && name.contains(".tmp-") {
            let p = entry.path();
            std::fs::remove_dir_all(&p).map_err(|e| TrainerError::io(&p, e))?;
        }
    }
    Ok(())
}

/// Every `checkpoint-*` folder and the `latest` pointer under `out` (for a fresh run told to
/// overwrite an old one).
pub fn remove_all(out: &Path) -> Result<()> {
    remove_stale_temps(out)?;
    let entries = match std::fs::read_dir(out) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(TrainerError::io(out, e)),
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let p = entry.path();
        if name.starts_with("checkpoint-") && p.is_dir() {
            std::fs::remove_dir_all(&p).map_err(|e| TrainerError::io(&p, e))?;
        }
    }
    let latest = out.join(LATEST);
    if latest.exists() {
        std::fs::remove_file(&latest).map_err(|e| TrainerError::io(&latest, e))?;
    }
    Ok(())
}
