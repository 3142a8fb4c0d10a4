//! The training configuration: one flat TOML table whose keys are the fields of
//! [`TrainConfig`], each also settable from the command line (`--lr 2e-4` sets `lr`).
//! Flat keys keep the file and the flags one vocabulary. Unknown keys are errors naming the
//! key and the file, so a typo never silently trains with a default.
//!
//! Relative paths in a file are relative to that file's folder; paths given on the command
//! line are relative to the working directory.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tigon_engine::schedule::Decay;
use tigon_train::{BadLinePolicy, DataFormat, TooLongPolicy};

use crate::error::{Result, TrainerError};

/// Learning-rate decay after the warm-up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DecayKind {
    #[default]
    Cosine,
    Linear,
    Constant,
}

impl From<DecayKind> for Decay {
    fn from(d: DecayKind) -> Decay {
        match d {
            DecayKind::Cosine => Decay::Cosine,
            DecayKind::Linear => Decay::Linear,
            DecayKind::Constant => Decay::Constant,
        }
    }
}

/// How the adapter path is computed over a bf16 base (the engine's `LoraPrecision`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LoraPrecisionChoice {
    /// Every rank-r product fp32-accurate, as PEFT computes fp32 adapters.
    #[default]
    Fp32,
    /// A, B and the rank-r activations rounded to bf16 (fewer kernel launches).
    Bf16,
}

/// Where to train.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    /// The first CUDA GPU if one is found (bf16 base weights), else the CPU (f32).
    #[default]
    Auto,
    Cpu,
    Cuda,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Hugging Face model folder: config.json, safetensors weights, tokenizer.json (and
    /// tokenizer_config.json for the chat template and special tokens).
    pub model: PathBuf,
    /// Training JSONL files.
    pub data: Vec<PathBuf>,
    /// auto (per line), alpaca, chat, text or prompt-completion.
    pub format: DataFormat,
    /// A held-out JSONL file; without one, `holdout` of the training examples are held out.
    pub eval_data: Option<PathBuf>,
    /// Fraction of the training examples held out for evaluation (0: none).
    pub holdout: f64,
    /// Tokens per row (the longest example).
    pub seq_len: usize,
    /// Rows per micro-batch.
    pub micro_batch: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Pack several examples per row (best fit).
    pub packing: bool,
    /// Train on the response only (the prompt's tokens are not in the loss).
    pub response_only: bool,
    pub too_long: TooLongPolicy,
    pub bad_lines: BadLinePolicy,
    /// Evaluate the held-out loss every this many steps (0: only at the end).
    pub eval_every: u64,
    /// Peak learning rate.
    pub lr: f64,
    /// Linear warm-up steps from 0 to `lr`.
    pub warmup_steps: u64,
    pub decay: DecayKind,
    /// The learning rate at the end of the decay, as a fraction of `lr`.
    pub min_lr_ratio: f64,
    /// AdamW's decoupled weight decay.
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Clip the global gradient norm to this (0: no clipping).
    pub max_grad_norm: f64,
    /// Optimizer steps; exactly one of `steps` and `epochs`.
    pub steps: Option<u64>,
    /// Passes over the training data (rounded up to whole steps).
    pub epochs: Option<f64>,
    pub seed: u64,
    pub lora_r: usize,
    pub lora_alpha: f64,
    /// PEFT's `lora_dropout` on each adapter's input in training, in [0, 1).
    pub lora_dropout: f64,
    /// Projection names (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj) or
    /// ["all-linear"].
    pub target_modules: Vec<String>,
    /// Scale by alpha / sqrt(r) instead of alpha / r.
    pub use_rslora: bool,
    /// Keep only each layer's input in the forward and recompute the rest in the backward.
    pub activation_checkpointing: bool,
    /// The adapter path over a bf16 base: "fp32" (as PEFT, the default) or "bf16".
    pub lora_precision: LoraPrecisionChoice,
    /// CPU offload: keep the embedding table in host memory and upload only each batch's
    /// rows (untied models; a tied table is also the LM head and stays on the GPU).
    pub offload_embedding: bool,
    /// CPU offload: stream this many layers' weights from page-locked host memory, spread
    /// evenly over the stack (0: none; at most the model's layer count). Saves about one
    /// layer of GPU memory per streamed layer, less two in flight; costs the copies' time
    /// where compute does not hide them. Results are bit-identical either way.
    pub offload_layers: usize,
    /// Save a checkpoint every this many steps (0: only at the end).
    pub save_every: u64,
    /// Output folder: checkpoints, the final adapter, metrics.jsonl, loss.png.
    pub output: PathBuf,
    pub device: DeviceChoice,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            model: PathBuf::new(),
            data: Vec::new(),
            format: DataFormat::Auto,
            eval_data: None,
            holdout: 0.0,
            seq_len: 2048,
            micro_batch: 1,
            grad_accum: 1,
            packing: true,
            response_only: true,
            too_long: TooLongPolicy::Truncate,
            bad_lines: BadLinePolicy::Stop,
            eval_every: 0,
            lr: 2e-4,
            warmup_steps: 0,
            decay: DecayKind::Cosine,
            min_lr_ratio: 0.0,
            weight_decay: 0.0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            max_grad_norm: 1.0,
            steps: None,
            epochs: None,
            seed: 0,
            lora_r: 16,
            lora_alpha: 32.0,
            lora_dropout: 0.0,
            target_modules: vec!["all-linear".into()],
            use_rslora: false,
            activation_checkpointing: false,
            lora_precision: LoraPrecisionChoice::Fp32,
            offload_embedding: false,
            offload_layers: 0,
            save_every: 0,
            output: PathBuf::from("tigon-out"),
            device: DeviceChoice::Auto,
        }
    }
}

/// 1-based line of byte offset `at` in `text`.
fn line_of(text: &str, at: usize) -> usize {
    text[..at.min(text.len())].matches('\n').count() + 1
}

fn toml_error(file: &str, text: Option<&str>, e: &toml::de::Error) -> TrainerError {
    TrainerError::Config {
        file: file.to_string(),
        line: text.and_then(|t| e.span().map(|s| line_of(t, s.start))),
        msg: e.message().trim().replace('\n', " "),
    }
}

impl TrainConfig {
    /// Parse TOML text; `file` names it in errors. Relative paths stay as written.
    pub fn from_toml_str(text: &str, file: &str) -> Result<TrainConfig> {
        toml::from_str(text).map_err(|e| toml_error(file, Some(text), &e))
    }

    /// Read a TOML file; relative paths in it are made relative to its folder.
    pub fn from_file(path: &Path) -> Result<TrainConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| TrainerError::io(path, e))?;
        let mut cfg = Self::from_toml_str(&text, &path.display().to_string())?;
        let base = path.parent().unwrap_or(Path::new(""));
        let fix = |p: &mut PathBuf| {
            if p.as_os_str() == "." {
                *p = base.to_path_buf();
            } else if p.is_relative() && !p.as_os_str().is_empty() {
                *p = base.join(&*p);
            }
        };
        fix(&mut cfg.model);
        cfg.data.iter_mut().for_each(fix);
        if let Some(p) = cfg.eval_data.as_mut() {
            fix(p);
        }
        fix(&mut cfg.output);
        Ok(cfg)
    }

    /// Set fields from `overrides` (key -> value, keys as in the file); `source` names where
    /// they came from in errors (e.g. "command line"). Unknown keys and wrong types fail.
    pub fn apply_overrides(&mut self, overrides: toml::Table, source: &str) -> Result<()> {
        if overrides.is_empty() {
            return Ok(());
        }
        let mut table = toml::Table::try_from(&*self).map_err(|e| TrainerError::Config {
            file: source.to_string(),
            line: None,
            msg: e.to_string(),
        })?;
        for (k, v) in overrides {
            table.insert(k, v);
        }
        *self = table
            .try_into()
            .map_err(|e: toml::de::Error| toml_error(source, None, &e))?;
        Ok(())
    }

    /// The config as TOML text (what `tigon demo` writes beside its outputs).
    pub fn to_toml_string(&self) -> String {
        toml::to_string(self).expect("a TrainConfig serializes to TOML")
    }

    /// Check values that parse but cannot train; `source` names the config in errors.
    pub fn validate(&self, source: &str) -> Result<()> {
        let bad = |msg: String| {
            Err(TrainerError::Config {
                file: source.to_string(),
                line: None,
                msg,
            })
        };
        if self.model.as_os_str().is_empty() {
            return bad("`model` (the model folder) is required".into());
        }
        if self.data.is_empty() {
            return bad("`data` (training JSONL files) is required".into());
        }
        if self.output.as_os_str().is_empty() {
            return bad("`output` must name a folder".into());
        }
        for (name, v) in [
            ("seq_len", self.seq_len),
            ("micro_batch", self.micro_batch),
            ("grad_accum", self.grad_accum),
            ("lora_r", self.lora_r),
        ] {
            if v == 0 {
                return bad(format!("`{name}` must be positive"));
            }
        }
        if !(0.0..1.0).contains(&self.holdout) {
            return bad(format!("`holdout` {} must be in [0, 1)", self.holdout));
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad(format!("`lr` {} must be a positive number", self.lr));
        }
        for (name, v) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&v) {
                return bad(format!("`{name}` {v} must be in [0, 1)"));
            }
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return bad(format!("`eps` {} must be positive", self.eps));
        }
        for (name, v) in [
            ("weight_decay", self.weight_decay),
            ("max_grad_norm", self.max_grad_norm),
            ("lora_alpha", self.lora_alpha),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return bad(format!("`{name}` {v} must be a non-negative number"));
            }
        }
        if !(0.0..=1.0).contains(&self.min_lr_ratio) {
            return bad(format!(
                "`min_lr_ratio` {} must be in [0, 1]",
                self.min_lr_ratio
            ));
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return bad(format!(
                "`lora_dropout` {} must be in [0, 1)",
                self.lora_dropout
            ));
        }
        if self.target_modules.is_empty() {
            return bad("`target_modules` is empty".into());
        }
        match (self.steps, self.epochs) {
            (None, None) => bad("set `steps` or `epochs`".into()),
            (Some(_), Some(_)) => bad("set only one of `steps` and `epochs`".into()),
            (Some(0), None) => bad("`steps` must be positive".into()),
            (None, Some(e)) if !(e.is_finite() && e > 0.0) => {
                bad(format!("`epochs` {e} must be positive"))
            }
            _ => Ok(()),
        }
    }

    /// A hash of everything that decides the training trajectory (not the output folder,
    /// how often to save or evaluate, the device choice's spelling, or the offload, which
    /// changes where weights wait but no value): a resumed run must match the run that
    /// wrote the checkpoint.
    pub fn trajectory_hash(&self) -> String {
        let mut c = self.clone();
        c.output = PathBuf::new();
        c.save_every = 0;
        c.eval_every = 0;
        c.offload_embedding = false;
        c.offload_layers = 0;
        let text = serde_json::to_string(&c).expect("a TrainConfig serializes to JSON");
        // FNV-1a, 64 bits: stable across Rust versions, unlike DefaultHasher.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in text.bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        format!("{h:016x}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
model = "models/tiny"
data = ["train.jsonl"]
format = "chat"
seq_len = 256
micro_batch = 4
grad_accum = 2
lr = 3e-4
warmup_steps = 10
decay = "linear"
steps = 100
lora_r = 8
target_modules = ["q_proj", "v_proj"]
too_long = "drop"
bad_lines = "skip"
device = "cpu"
"#;

    #[test]
    fn parses_with_defaults() {
        let c = TrainConfig::from_toml_str(EXAMPLE, "train.toml").unwrap();
        assert_eq!(c.model, PathBuf::from("models/tiny"));
        assert_eq!(c.format, DataFormat::Chat);
        assert_eq!((c.seq_len, c.micro_batch, c.grad_accum), (256, 4, 2));
        assert_eq!(c.lr, 3e-4);
        assert_eq!(c.decay, DecayKind::Linear);
        assert_eq!(c.steps, Some(100));
        assert_eq!(c.too_long, TooLongPolicy::Drop);
        assert_eq!(c.bad_lines, BadLinePolicy::Skip);
        assert_eq!(c.device, DeviceChoice::Cpu);
        // Defaults for what the file leaves out.
        assert_eq!(c.beta2, 0.999);
        assert!(c.packing && c.response_only);
        c.validate("train.toml").unwrap();
    }

    #[test]
    fn offload_keys_parse_and_default_off() {
        let c = TrainConfig::from_toml_str(EXAMPLE, "train.toml").unwrap();
        assert!(!c.offload_embedding);
        assert_eq!(c.offload_layers, 0);
        let text = format!("{EXAMPLE}offload_embedding = true\noffload_layers = 8\n");
        let c = TrainConfig::from_toml_str(&text, "train.toml").unwrap();
        assert!(c.offload_embedding);
        assert_eq!(c.offload_layers, 8);
        c.validate("train.toml").unwrap();
        let e = TrainConfig::from_toml_str(&format!("{EXAMPLE}offload_layers = -1\n"), "t.toml")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("t.toml:"), "{e}");
    }

    #[test]
    fn unknown_key_names_key_file_and_line() {
        let text = format!("{EXAMPLE}lrr = 1e-3\n");
        let e = TrainConfig::from_toml_str(&text, "train.toml")
            .unwrap_err()
            .to_string();
        let line = text.lines().position(|l| l.starts_with("lrr")).unwrap() + 1;
        assert!(e.starts_with(&format!("train.toml:{line}: ")), "{e}");
        assert!(e.contains("lrr"), "{e}");
        assert!(!e.contains('\n'), "{e}");
    }

    #[test]
    fn lora_precision_is_fp32_unless_asked_and_checked() {
        assert_eq!(
            TrainConfig::from_toml_str(EXAMPLE, "t.toml")
                .unwrap()
                .lora_precision,
            LoraPrecisionChoice::Fp32
        );
        let text = format!("{EXAMPLE}lora_precision = \"bf16\"\n");
        let c = TrainConfig::from_toml_str(&text, "t.toml").unwrap();
        assert_eq!(c.lora_precision, LoraPrecisionChoice::Bf16);
        let text = format!("{EXAMPLE}lora_precision = \"fp16\"\n");
        let e = TrainConfig::from_toml_str(&text, "t.toml")
            .unwrap_err()
            .to_string();
        let line = text
            .lines()
            .position(|l| l.starts_with("lora_precision"))
            .unwrap()
            + 1;
        assert!(
            e.starts_with(&format!("t.toml:{line}: ")) && e.contains("fp16"),
            "{e}"
        );
    }

    #[test]
    fn wrong_type_names_the_place() {
        let e = TrainConfig::from_toml_str("seq_len = \"long\"\n", "c.toml")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("c.toml:1: "), "{e}");
    }

    #[test]
    fn overrides_replace_fields_and_reject_unknown_keys() {
        let mut c = TrainConfig::from_toml_str(EXAMPLE, "train.toml").unwrap();
        let mut o = toml::Table::new();
        o.insert("lr".into(), toml::Value::Float(2e-4));
        o.insert("steps".into(), toml::Value::Integer(7));
        o.insert("packing".into(), toml::Value::Boolean(false));
        o.insert("output".into(), toml::Value::String("out2".into()));
        o.insert("decay".into(), toml::Value::String("cosine".into()));
        c.apply_overrides(o, "command line").unwrap();
        assert_eq!(c.lr, 2e-4);
        assert_eq!(c.steps, Some(7));
        assert!(!c.packing);
        assert_eq!(c.output, PathBuf::from("out2"));
        assert_eq!(c.decay, DecayKind::Cosine);
        // Untouched fields keep the file's values.
        assert_eq!(c.seq_len, 256);
        assert_eq!(c.target_modules, vec!["q_proj", "v_proj"]);

        let mut o = toml::Table::new();
        o.insert("learning_rate".into(), toml::Value::Float(1.0));
        let e = c
            .apply_overrides(o, "command line")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("command line: ") && e.contains("learning_rate"),
            "{e}"
        );
    }

    #[test]
    fn validation_names_the_field() {
        let c = TrainConfig::from_toml_str(EXAMPLE, "t.toml").unwrap();
        let check = |c: TrainConfig, field: &str| {
            let e = c.validate("t.toml").unwrap_err().to_string();
            assert!(e.starts_with("t.toml: ") && e.contains(field), "{e}");
        };
        check(
            TrainConfig {
                epochs: Some(1.0),
                ..c.clone()
            },
            "epochs",
        );
        check(
            TrainConfig {
                lora_dropout: 1.0,
                ..c.clone()
            },
            "lora_dropout",
        );
        check(
            TrainConfig {
                holdout: 1.5,
                ..c.clone()
            },
            "holdout",
        );
        check(
            TrainConfig {
                model: PathBuf::new(),
                ..c
            },
            "model",
        );
    }

    #[test]
    fn paths_in_a_file_are_relative_to_it_and_round_trip() {
        let dir = std::env::temp_dir().join(format!("tigon-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("train.toml");
        std::fs::write(&path, EXAMPLE).unwrap();
        let c = TrainConfig::from_file(&path).unwrap();
        assert_eq!(c.model, dir.join("models/tiny"));
        assert_eq!(c.data, vec![dir.join("train.jsonl")]);
        assert_eq!(c.output, dir.join("tigon-out"));
        let back = TrainConfig::from_toml_str(&c.to_toml_string(), "back").unwrap();
        assert_eq!(back, c);
        assert_eq!(back.trajectory_hash(), c.trajectory_hash());
        let other = TrainConfig {
            lr: 1e-3,
            ..c.clone()
        };
        assert_ne!(other.trajectory_hash(), c.trajectory_hash());
        let moved = TrainConfig {
            output: "elsewhere".into(),
            ..c.clone()
        };
        assert_eq!(moved.trajectory_hash(), c.trajectory_hash());
        // Offload is bit-identical: a run may resume with other offload settings.
        let offloaded = TrainConfig {
            offload_embedding: true,
            offload_layers: 3,
            ..c.clone()
        };
        assert_eq!(offloaded.trajectory_hash(), c.trajectory_hash());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
