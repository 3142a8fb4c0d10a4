//! Tigon's kernel library: the ops that dominate LLM fine-tuning time and memory, forward
//! and backward, as CUDA kernels (compiled at run time by NVRTC) and as exact CPU references,
//! behind one tensor type. Nothing here knows about models.
//!
//! Conventions shared by every op:
//! - tensors are contiguous and row-major; "rows" are all leading dims folded together;
//! - activations are bf16 or f32, arithmetic is f32, reductions and losses are f32, and
//!   outputs round to their dtype where Hugging Face transformers rounds;
//! - every op checks its inputs and returns a [`KernelError`] naming the op and the shapes;
//! - an op runs on the GPU when its inputs are there and on the CPU otherwise.

pub mod bench;
pub mod check;
pub mod cpu;
pub mod cuda;
pub mod error;
pub mod ops;
pub mod rng;
pub mod tensor;

pub use cuda::Gpu;
pub use error::{KernelError, Result};
pub use tensor::{DType, Device, Tensor};
