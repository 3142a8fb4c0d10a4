//! Typed errors for model folders, weights and adapters.
//!
//! Every error names the file it came from and, where tensors are involved, the tensor and
//! the shapes, so the `tigon` command can print it as is.

use std::path::{Path, PathBuf};

use tigon_kernels::KernelError;

pub type Result<T, E = ModelError> = std::result::Result<T, E>;

/// The architectures this crate reads, as they appear in `config.json`.
pub const SUPPORTED_ARCHITECTURES: &str = "LlamaForCausalLM (model_type llama), \
     MistralForCausalLM (mistral), Qwen2ForCausalLM (qwen2), Qwen3ForCausalLM (qwen3)";

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{}: invalid JSON: {source}", path.display())]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    #[error("{}: missing required field `{field}`", path.display())]
    MissingField { path: PathBuf, field: String },

    /// A field that is present but unusable: wrong type, out of range, or a feature that
    /// is not supported (named in `detail`).
    #[error("{}: field `{field}`: {detail}", path.display())]
    InvalidField {
        path: PathBuf,
        field: String,
        detail: String,
    },

    #[error("{}: unsupported architecture `{found}`; supported: {SUPPORTED_ARCHITECTURES}", path.display())]
    UnsupportedArchitecture { path: PathBuf, found: String },

    #[error("{}: no model weights found (expected model.safetensors or model.safetensors.index.json)", dir.display())]
    NoWeights { dir: PathBuf },

    #[error("tensor `{name}` not found in {searched}")]
    MissingTensor { name: String, searched: String },

    #[error("tensor `{name}` in {}: expected shape {expected:?}, found {found:?}", file.display())]
    ShapeMismatch {
        name: String,
        file: PathBuf,
        expected: Vec<usize>,
        found: Vec<usize>,
    },

    #[error("tensor `{name}` in {}: {detail}", file.display())]
    TensorDType {
        name: String,
        file: PathBuf,
        detail: String,
    },

    /// A safetensors file (or shard index) that cannot be parsed: truncated, bad header,
    /// offsets that do not cover the data.
    #[error("{}: malformed safetensors file: {detail}", path.display())]
    Malformed { path: PathBuf, detail: String },

    /// A LoRA configuration that cannot be applied to this model.
    #[error("LoRA config: {detail}")]
    Lora { detail: String },

    #[error("adapter `{adapter}`: {detail}")]
    Adapter { adapter: String, detail: String },

    /// A safe merge whose result would not be finite; the weight was left unchanged.
    #[error(
        "merging into `{module}` gives non-finite values ({detail}); the weight was left unchanged"
    )]
    NonFinite { module: String, detail: String },

    #[error(transparent)]
    Kernel(#[from] KernelError),
}

impl ModelError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        ModelError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
    pub(crate) fn invalid_field(
        path: &Path,
        field: impl Into<String>,
        detail: impl Into<String>,
    ) -> Self {
        ModelError::InvalidField {
            path: path.to_path_buf(),
            field: field.into(),
            detail: detail.into(),
        }
    }
    pub(crate) fn malformed(path: &Path, detail: impl Into<String>) -> Self {
        ModelError::Malformed {
            path: path.to_path_buf(),
            detail: detail.into(),
        }
    }
    pub(crate) fn lora(detail: impl Into<String>) -> Self {
        ModelError::Lora {
            detail: detail.into(),
        }
    }
    pub(crate) fn adapter(adapter: &str, detail: impl Into<String>) -> Self {
        ModelError::Adapter {
            adapter: adapter.to_string(),
            detail: detail.into(),
        }
    }
}
