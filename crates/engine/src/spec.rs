//! The shape of a decoder as the forward and backward read it, derived once from a
//! Hugging Face config ([`ModelConfig`]): head counts, the norm epsilon, and the RoPE
//! frequencies in the form the kernel takes.

use tigon_kernels::ops::rope::{RopeConfig, RopeScaling as KernelRopeScaling};
use tigon_model::{ModelConfig, RopeScaling};

#[derive(Clone, Debug)]
pub struct DecoderSpec {
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub vocab: usize,
    pub norm_eps: f32,
    pub rope: RopeConfig,
    /// Mistral's sliding window: documents longer than this would need a banded mask,
    /// which the attention kernel does not implement, so such batches are refused.
    pub sliding_window: Option<usize>,
}

impl DecoderSpec {
    pub fn from_config(c: &ModelConfig) -> DecoderSpec {
        let scaling = match &c.rope_scaling {
            None => KernelRopeScaling::None,
            Some(RopeScaling::Linear { factor }) => KernelRopeScaling::Linear {
                factor: *factor as f32,
            },
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }) => KernelRopeScaling::Llama3 {
                factor: *factor as f32,
                low_freq_factor: *low_freq_factor as f32,
                high_freq_factor: *high_freq_factor as f32,
                original_max_position: *original_max_position_embeddings,
            },
        };
        DecoderSpec {
            hidden: c.hidden_size,
            intermediate: c.intermediate_size,
            layers: c.num_hidden_layers,
            q_heads: c.num_attention_heads,
            kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
            vocab: c.vocab_size,
            norm_eps: c.rms_norm_eps as f32,
            rope: RopeConfig {
                head_dim: c.head_dim,
                theta: c.rope_theta as f32,
                scaling,
            },
            sliding_window: c.sliding_window,
        }
    }
}
