//! The shape of a decoder, as the engine needs it: everything the forward and backward
//! read, nothing about files. `tigon-model` builds one from a Hugging Face config.json.

use tigon_kernels::ops::rope::RopeConfig;

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
    /// The LM head is the embedding matrix (Qwen2 small models, Llama-3.2).
    pub tie_embeddings: bool,
    /// Biases on q, k and v (Qwen2).
    pub qkv_bias: bool,
    /// RMSNorm over each head of q and k before RoPE (Qwen3).
    pub qk_norm: bool,
}

impl DecoderSpec {
    pub fn q_dim(&self) -> usize {
        self.q_heads * self.head_dim
    }
    pub fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim
    }

    /// (in, out) features of a projection.
    pub fn proj_dims(&self, p: Proj) -> (usize, usize) {
        match p {
            Proj::Q => (self.hidden, self.q_dim()),
            Proj::K | Proj::V => (self.hidden, self.kv_dim()),
            Proj::O => (self.q_dim(), self.hidden),
            Proj::Gate | Proj::Up => (self.hidden, self.intermediate),
            Proj::Down => (self.intermediate, self.hidden),
        }
    }

    /// Parameters of the base model (embedding and head counted once when tied).
    pub fn param_count(&self) -> usize {
        let per_layer: usize = Proj::ALL
            .iter()
            .map(|&p| {
                let (i, o) = self.proj_dims(p);
                i * o
            })
            .sum::<usize>()
            + 2 * self.hidden;
        let head = if self.tie_embeddings {
            0
        } else {
            self.vocab * self.hidden
        };
        self.layers * per_layer + self.vocab * self.hidden + head + self.hidden
    }
}

/// The seven linear projections of a decoder layer, in PEFT's order of mention.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Proj {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Proj {
    pub const ALL: [Proj; 7] = [
        Proj::Q,
        Proj::K,
        Proj::V,
        Proj::O,
        Proj::Gate,
        Proj::Up,
        Proj::Down,
    ];

    /// The module name as Hugging Face and PEFT spell it (`q_proj`).
    pub fn name(self) -> &'static str {
        match self {
            Proj::Q => "q_proj",
            Proj::K => "k_proj",
            Proj::V => "v_proj",
            Proj::O => "o_proj",
            Proj::Gate => "gate_proj",
            Proj::Up => "up_proj",
            Proj::Down => "down_proj",
        }
    }

    /// The module path inside a layer (`self_attn.q_proj`).
    pub fn path(self) -> &'static str {
        match self {
            Proj::Q => "self_attn.q_proj",
            Proj::K => "self_attn.k_proj",
            Proj::V => "self_attn.v_proj",
            Proj::O => "self_attn.o_proj",
            Proj::Gate => "mlp.gate_proj",
            Proj::Up => "mlp.up_proj",
            Proj::Down => "mlp.down_proj",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}
