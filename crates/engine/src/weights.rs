//! The frozen base weights of a decoder, on one device, under their Hugging Face names.

use tigon_kernels::{DType, Tensor};

use crate::error::{EngineError, Result};
use crate::spec::{DecoderSpec, Proj};

pub struct LayerWeights {
    pub input_norm: Tensor,
    /// q, k, v, o, gate, up, down in [`Proj`] order; each `[out, in]` as HF stores them.
    pub proj: [Tensor; 7],
    /// q, k, v biases (Qwen2).
    pub qkv_bias: Option<[Tensor; 3]>,
    /// q and k head norms (Qwen3), `[head_dim]` each.
    pub qk_norm: Option<[Tensor; 2]>,
    pub post_norm: Tensor,
}

pub struct BaseWeights {
    pub embed: Tensor,
    pub layers: Vec<LayerWeights>,
    pub final_norm: Tensor,
    /// None when tied to the embedding.
    pub lm_head: Option<Tensor>,
}

impl BaseWeights {
    /// Load every tensor through `get(name, shape)`, which returns it on the target device
    /// in the compute dtype (or an error naming the tensor).
    pub fn load(
        spec: &DecoderSpec,
        mut get: impl FnMut(&str, &[usize]) -> Result<Tensor>,
    ) -> Result<BaseWeights> {
        let h = spec.hidden;
        let mut layers = Vec::with_capacity(spec.layers);
        for i in 0..spec.layers {
            let pre = format!("model.layers.{i}");
            let mut proj = Vec::with_capacity(7);
            for p in Proj::ALL {
                let (fin, fout) = spec.proj_dims(p);
                proj.push(get(&format!("{pre}.{}.weight", p.path()), &[fout, fin])?);
            }
            let qkv_bias = if spec.qkv_bias {
                Some([
                    get(&format!("{pre}.self_attn.q_proj.bias"), &[spec.q_dim()])?,
                    get(&format!("{pre}.self_attn.k_proj.bias"), &[spec.kv_dim()])?,
                    get(&format!("{pre}.self_attn.v_proj.bias"), &[spec.kv_dim()])?,
                ])
            } else {
                None
            };
            let qk_norm = if spec.qk_norm {
                Some([
                    get(&format!("{pre}.self_attn.q_norm.weight"), &[spec.head_dim])?,
                    get(&format!("{pre}.self_attn.k_norm.weight"), &[spec.head_dim])?,
                ])
            } else {
                None
            };
            layers.push(LayerWeights {
                input_norm: get(&format!("{pre}.input_layernorm.weight"), &[h])?,
                proj: proj
                    .try_into()
                    .map_err(|_| EngineError::Weights("seven projections".into()))?,
                qkv_bias,
                qk_norm,
                post_norm: get(&format!("{pre}.post_attention_layernorm.weight"), &[h])?,
            });
        }
        Ok(BaseWeights {
            embed: get("model.embed_tokens.weight", &[spec.vocab, h])?,
            layers,
            final_norm: get("model.norm.weight", &[h])?,
            lm_head: if spec.tie_embeddings {
                None
            } else {
                Some(get("lm_head.weight", &[spec.vocab, h])?)
            },
        })
    }

    pub fn lm_head(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    pub fn dtype(&self) -> DType {
        self.embed.dtype()
    }
}
