//! Tigon's model layer: Hugging Face model folders (config.json and safetensors weights)
//! for the Llama family, and LoRA adapters with PEFT's semantics and file format.
//!
//! - [`config`]: `ModelConfig` from config.json (Llama 2/3/3.x, Mistral, Qwen2/2.5, Qwen3);
//! - [`weights`]: memory-mapped safetensors (single file or sharded), typed tensor loading,
//!   the per-layer `ModelWeights`, and an atomic, sharding safetensors writer;
//! - [`lora`]: `LoraConfig` (PEFT's adapter_config.json), adapters, several adapters per
//!   model, merge/unmerge and export of a merged model.

pub mod config;
pub mod error;
mod io;
pub mod lora;
pub mod weights;

pub use config::{Architecture, ModelConfig, Projection, RopeScaling};
pub use error::{ModelError, Result};
pub use lora::{
    export_merged, merge_into, unmerge_from, Adapter, AdapterSet, LoraConfig, LoraInit, LoraModule,
    LoraTarget, TargetModules,
};
pub use weights::{random_model, ModelWeights, Weights};
