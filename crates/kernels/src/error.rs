//! Typed errors for every op and for the device layer.
//!
//! Each error names the op (or the CUDA call) and, where shapes are involved, the shapes,
//! so that a caller several layers up can report it without more context.

use crate::DType;

pub type Result<T, E = KernelError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// Shapes that do not fit together: `detail` says which and how.
    #[error("{op}: shape mismatch: {detail}")]
    Shape { op: &'static str, detail: String },

    #[error("{op}: tensor `{tensor}` has dtype {found}, expected {expected}")]
    DType {
        op: &'static str,
        tensor: &'static str,
        expected: String,
        found: DType,
    },

    #[error("{op}: tensors are on different devices ({detail})")]
    Device { op: &'static str, detail: String },

    /// A value that cannot be used: a label outside the vocabulary, a token id past the
    /// embedding table, a non-finite hyper-parameter.
    #[error("{op}: invalid input: {detail}")]
    Invalid { op: &'static str, detail: String },

    #[error("no CUDA GPU available: {0}")]
    NoGpu(String),

    #[error(
        "out of GPU memory: asked for {requested} bytes ({:.1} MiB) with {free} bytes ({:.1} MiB) free of {total} ({:.1} GiB); tigon holds {held} bytes live",
        *requested as f64 / 1048576.0, *free as f64 / 1048576.0, *total as f64 / 1073741824.0
    )]
    OutOfMemory {
        requested: usize,
        free: usize,
        total: usize,
        held: usize,
    },

    #[error("CUDA driver call {call} failed: {source}")]
    Driver {
        call: &'static str,
        #[source]
        source: cudarc::driver::DriverError,
    },

    #[error("cuBLAS call {call} failed: {detail}")]
    Cublas { call: &'static str, detail: String },

    #[error("NVRTC could not compile kernel source `{kernel}` for {arch}:\n{log}")]
    Compile {
        kernel: &'static str,
        arch: String,
        log: String,
    },

    #[error("NVRTC library not available: {0}")]
    NoNvrtc(String),

    #[error("kernel cache at {path}: {source}")]
    Cache {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl KernelError {
    pub(crate) fn shape(op: &'static str, detail: impl Into<String>) -> Self {
        KernelError::Shape {
            op,
            detail: detail.into(),
        }
    }
    pub(crate) fn invalid(op: &'static str, detail: impl Into<String>) -> Self {
        KernelError::Invalid {
            op,
            detail: detail.into(),
        }
    }
}
