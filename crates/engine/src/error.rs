use tigon_kernels::KernelError;
use tigon_model::ModelError;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("batch: {0}")]
    Batch(String),
    #[error("weights: {0}")]
    Weights(String),
    #[error("lora: {0}")]
    Lora(String),
    #[error("fusion: {0}")]
    Fusion(String),
    #[error("offload: {0}")]
    Offload(String),
}

pub type Result<T> = std::result::Result<T, EngineError>;
