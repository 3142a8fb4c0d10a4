//! Tigon's training engine: the LoRA forward and backward of a Llama-family decoder on the
//! fused kernels of `tigon-kernels`. Base weights ([`tigon_model::ModelWeights`]) are frozen
//! (bf16 on the GPU, f32 on the CPU); only LoRA A and B carry gradients and optimizer
//! state, in fp32.

pub mod decoder;
pub mod error;
pub mod fusion;
pub mod layer;
pub mod lora;
pub mod lora_dropout;
pub mod offload;
pub mod parity;
pub mod schedule;
pub mod spec;

pub use decoder::{Batch, Decoder, StepLoss};
pub use error::{EngineError, Result};
pub use fusion::Fusion;
pub use lora::{LayerLora, LoraState, LoraTensors};
pub use offload::Offload;
pub use spec::DecoderSpec;
