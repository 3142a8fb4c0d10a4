use tigon_kernels::KernelError;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error("batch: {0}")]
    Batch(String),
    #[error("weights: {0}")]
    Weights(String),
    #[error("lora: {0}")]
    Lora(String),
}

pub type Result<T> = std::result::Result<T, EngineError>;
