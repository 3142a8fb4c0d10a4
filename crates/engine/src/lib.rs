//! Tigon's training engine: the LoRA forward and backward of a Llama-family decoder on the
//! fused kernels of `tigon-kernels`. Base weights are frozen (bf16 on the GPU, f32 on the
//! CPU); only LoRA A and B carry gradients and optimizer state, in fp32.

pub mod decoder;
pub mod error;
pub mod layer;
pub mod lora;
pub mod schedule;
pub mod spec;
pub mod weights;

pub use decoder::{Batch, Decoder, StepLoss};
pub use error::{EngineError, Result};
pub use lora::{LoraState, LoraTensors};
pub use spec::{DecoderSpec, Proj};
pub use weights::{BaseWeights, LayerWeights};
