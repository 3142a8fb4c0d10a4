use std::path::PathBuf;

use tigon_engine::EngineError;
use tigon_kernels::KernelError;
use tigon_model::ModelError;
use tigon_train::demo_data::DemoError;
use tigon_train::{DataError, PackError, TokenizerError};

/// Every message is one line naming the file (and line or step) it is about.
#[derive(Debug, thiserror::Error)]
pub enum TrainerError {
    #[error("{file}{}: {msg}", line.map(|l| format!(":{l}")).unwrap_or_default())]
    Config {
        file: String,
        line: Option<usize>,
        msg: String,
    },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Data(#[from] DataError),
    #[error("packing the training data: {0}")]
    Pack(#[from] PackError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error("tokenizer: {0}")]
    Tokenizer(#[from] TokenizerError),
    #[error(transparent)]
    Demo(#[from] DemoError),
    #[error("step {step}: the {what} is {value}; training stopped (lower the learning rate or check the data)")]
    NonFinite {
        step: u64,
        what: &'static str,
        value: f64,
    },
    #[error("{}: {msg}", path.display())]
    Checkpoint { path: PathBuf, msg: String },
    #[error("loss plot {}: {msg}", path.display())]
    Plot { path: PathBuf, msg: String },
}

impl TrainerError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> TrainerError {
        TrainerError::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn checkpoint(path: impl Into<PathBuf>, msg: impl Into<String>) -> TrainerError {
        TrainerError::Checkpoint {
            path: path.into(),
            msg: msg.into(),
        }
    }
}

pub type Result<T> = std::result::Result<T, TrainerError>;
