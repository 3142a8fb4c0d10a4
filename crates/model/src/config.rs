//! `config.json` of a Hugging Face model folder, for the Llama family of decoders.
//!
//! Fields are read by hand from the JSON (not with a derived deserializer) so that every
//! error can name config.json and the field, and so that the per-architecture defaults of
//! transformers (Qwen2's q/k/v biases, Qwen3's q/k norms and head_dim 128, ...) live in one
//! place.

use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

use crate::error::{ModelError, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Architecture {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
}

impl Architecture {
    /// The class name in `architectures`.
    pub fn hf_class(self) -> &'static str {
        match self {
            Architecture::Llama => "LlamaForCausalLM",
            Architecture::Mistral => "MistralForCausalLM",
            Architecture::Qwen2 => "Qwen2ForCausalLM",
            Architecture::Qwen3 => "Qwen3ForCausalLM",
        }
    }

    pub fn model_type(self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Mistral => "mistral",
            Architecture::Qwen2 => "qwen2",
            Architecture::Qwen3 => "qwen3",
        }
    }

    const ALL: [Architecture; 4] = [
        Architecture::Llama,
        Architecture::Mistral,
        Architecture::Qwen2,
        Architecture::Qwen3,
    ];

    fn from_class(name: &str) -> Option<Architecture> {
        Self::ALL.into_iter().find(|a| a.hf_class() == name)
    }

    fn from_model_type(name: &str) -> Option<Architecture> {
        Self::ALL.into_iter().find(|a| a.model_type() == name)
    }
}

/// RoPE frequency scaling, as `rope_scaling` (or `rope_parameters`) describes it.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    /// Llama 3.1/3.2: low frequencies divided by `factor`, high ones kept, a smooth ramp
    /// between.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
    /// Position interpolation: every frequency divided by `factor`.
    Linear { factor: f64 },
}

/// The seven linear projections of a decoder layer, the modules LoRA can target.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Projection {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Projection {
    pub const ALL: [Projection; 7] = [
        Projection::Q,
        Projection::K,
        Projection::V,
        Projection::O,
        Projection::Gate,
        Projection::Up,
        Projection::Down,
    ];

    /// The module's own name: `q_proj`, ..., `down_proj`.
    pub fn name(self) -> &'static str {
        match self {
            Projection::Q => "q_proj",
            Projection::K => "k_proj",
            Projection::V => "v_proj",
            Projection::O => "o_proj",
            Projection::Gate => "gate_proj",
            Projection::Up => "up_proj",
            Projection::Down => "down_proj",
        }
    }

    /// The submodule of the layer that holds it: `self_attn` or `mlp`.
    pub fn block(self) -> &'static str {
        match self {
            Projection::Q | Projection::K | Projection::V | Projection::O => "self_attn",
            Projection::Gate | Projection::Up | Projection::Down => "mlp",
        }
    }

    pub fn from_name(name: &str) -> Option<Projection> {
        Self::ALL.into_iter().find(|p| p.name() == name)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Biases on q_proj, k_proj and v_proj (Qwen2 always; Llama/Qwen3 with attention_bias).
    pub qkv_bias: bool,
    /// A bias on o_proj (Llama/Qwen3 with attention_bias; never Qwen2).
    pub o_bias: bool,
    /// RMSNorm over head_dim on q and k before RoPE (Qwen3).
    pub qk_norm: bool,
    /// Sliding-window attention span when the model uses one (Mistral v0.1; Qwen with
    /// use_sliding_window). It changes nothing for sequences no longer than the window.
    pub sliding_window: Option<usize>,
    /// `torch_dtype` (or `dtype`) as written, e.g. "bfloat16".
    pub torch_dtype: Option<String>,
    pub bos_token_id: Vec<u32>,
    pub eos_token_id: Vec<u32>,
    pub pad_token_id: Option<u32>,
}

/// Typed access to the fields of one JSON object, with errors naming the file and field.
struct Fields<'a> {
    path: &'a Path,
    obj: &'a Map<String, Value>,
    /// Prefix for nested objects ("rope_scaling."), so errors name the full field.
    prefix: &'a str,
}

impl<'a> Fields<'a> {
    fn field_name(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// The value of `name`, treating JSON null as absent (transformers writes null for
    /// "use the default").
    fn get(&self, name: &str) -> Option<&'a Value> {
        self.obj.get(name).filter(|v| !v.is_null())
    }

    fn invalid(&self, name: &str, detail: impl Into<String>) -> ModelError {
        ModelError::invalid_field(self.path, self.field_name(name), detail)
    }

    fn missing(&self, name: &str) -> ModelError {
        ModelError::MissingField {
            path: self.path.to_path_buf(),
            field: self.field_name(name),
        }
    }

    fn opt_usize(&self, name: &str) -> Result<Option<usize>> {
        match self.get(name) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .map(Some)
                .ok_or_else(|| {
                    self.invalid(name, format!("expected a non-negative integer, found {v}"))
                }),
        }
    }

    fn req_usize(&self, name: &str) -> Result<usize> {
        self.opt_usize(name)?.ok_or_else(|| self.missing(name))
    }

    /// A positive integer: a zero-sized dimension would make every later shape check vacuous.
    fn req_positive(&self, name: &str) -> Result<usize> {
        let n = self.req_usize(name)?;
        if n == 0 {
            return Err(self.invalid(name, "must be positive, found 0"));
        }
        Ok(n)
    }

    fn opt_f64(&self, name: &str) -> Result<Option<f64>> {
        match self.get(name) {
            None => Ok(None),
            Some(v) => match v.as_f64() {
                Some(x) if x.is_finite() => Ok(Some(x)),
                _ => Err(self.invalid(name, format!("expected a finite number, found {v}"))),
            },
        }
    }

    fn req_f64(&self, name: &str) -> Result<f64> {
        self.opt_f64(name)?.ok_or_else(|| self.missing(name))
    }

    fn opt_bool(&self, name: &str) -> Result<Option<bool>> {
        match self.get(name) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| self.invalid(name, format!("expected true or false, found {v}"))),
        }
    }

    fn opt_str(&self, name: &str) -> Result<Option<&'a str>> {
        match self.get(name) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| self.invalid(name, format!("expected a string, found {v}"))),
        }
    }

    /// A token id or a list of them. Negative ids (some old configs write -1 for "none")
    /// are dropped: they cannot index a vocabulary.
    fn token_ids(&self, name: &str) -> Result<Vec<u32>> {
        let one = |v: &Value| -> Result<Option<u32>> {
            match v.as_i64() {
                Some(n) if n < 0 => Ok(None),
                Some(n) => u32::try_from(n)
                    .map(Some)
                    .map_err(|_| self.invalid(name, format!("token id {n} is too large"))),
                None => Err(self.invalid(
                    name,
                    format!("expected an integer or a list of integers, found {v}"),
                )),
            }
        };
        match self.get(name) {
            None => Ok(vec![]),
            Some(Value::Array(items)) => {
                let mut ids = vec![];
                for item in items {
                    ids.extend(one(item)?);
                }
                Ok(ids)
            }
            Some(v) => Ok(one(v)?.into_iter().collect()),
        }
    }
}

impl ModelConfig {
    /// Read `config.json` in a model folder.
    pub fn from_dir(dir: &Path) -> Result<ModelConfig> {
        Self::from_file(&dir.join("config.json"))
    }

    pub fn from_file(path: &Path) -> Result<ModelConfig> {
        let text = crate::io::read_to_string(path)?;
        Self::from_json_str(&text, path)
    }

    /// Parse config.json text; `path` is only used to name the file in errors.
    pub fn from_json_str(text: &str, path: &Path) -> Result<ModelConfig> {
        let value: Value = serde_json::from_str(text).map_err(|e| ModelError::Json {
            path: path.to_path_buf(),
            source: e,
        })?;
        let Value::Object(obj) = &value else {
            return Err(ModelError::invalid_field(
                path,
                "(top level)",
                "expected a JSON object",
            ));
        };
        Self::from_object(obj, path)
    }

    fn from_object(obj: &Map<String, Value>, path: &Path) -> Result<ModelConfig> {
        let f = Fields {
            path,
            obj,
            prefix: "",
        };
        let architecture = parse_architecture(&f)?;

        let hidden_size = f.req_positive("hidden_size")?;
        let intermediate_size = f.req_positive("intermediate_size")?;
        let num_hidden_layers = f.req_positive("num_hidden_layers")?;
        let num_attention_heads = f.req_positive("num_attention_heads")?;
        let vocab_size = f.req_positive("vocab_size")?;
        let num_key_value_heads = f
            .opt_usize("num_key_value_heads")?
            .unwrap_or(num_attention_heads);
        if num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
            return Err(f.invalid(
                "num_key_value_heads",
                format!(
                    "{num_key_value_heads} does not divide num_attention_heads {num_attention_heads}"
                ),
            ));
        }
        // transformers: Qwen3Config defaults head_dim to 128; the others to hidden/heads.
        let head_dim = match f.opt_usize("head_dim")? {
            Some(d) => d,
            None if architecture == Architecture::Qwen3 => 128,
            None => {
                if hidden_size % num_attention_heads != 0 {
                    return Err(f.invalid(
                        "hidden_size",
                        format!(
                            "{hidden_size} is not a multiple of num_attention_heads {num_attention_heads} and head_dim is not given"
                        ),
                    ));
                }
                hidden_size / num_attention_heads
            }
        };
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(f.invalid(
                "head_dim",
                format!("{head_dim} must be positive and even (RoPE rotates pairs)"),
            ));
        }

        let act = f.opt_str("hidden_act")?.unwrap_or("silu");
        if act != "silu" && act != "swish" {
            return Err(f.invalid(
                "hidden_act",
                format!("`{act}` is not supported; supported: silu"),
            ));
        }
        if f.opt_bool("mlp_bias")?.unwrap_or(false) {
            return Err(f.invalid(
                "mlp_bias",
                "biases on the MLP projections are not supported",
            ));
        }

        let attention_bias = f.opt_bool("attention_bias")?.unwrap_or(false);
        let (qkv_bias, o_bias) = match architecture {
            // Qwen2Attention hard-codes bias=True on q/k/v and False on o.
            Architecture::Qwen2 => (true, false),
            // MistralAttention has no biases.
            Architecture::Mistral => (false, false),
            Architecture::Llama | Architecture::Qwen3 => (attention_bias, attention_bias),
        };
        let qk_norm = architecture == Architecture::Qwen3;

        // Newer transformers writes rope_theta and the scaling inside `rope_parameters`.
        let rope_params = match f.get("rope_parameters") {
            None => None,
            Some(Value::Object(m)) => Some(m),
            Some(v) => {
                return Err(f.invalid("rope_parameters", format!("expected an object, found {v}")))
            }
        };
        let rope_theta = match rope_params {
            Some(m) => Fields {
                path,
                obj: m,
                prefix: "rope_parameters.",
            }
            .opt_f64("rope_theta")?,
            None => None,
        }
        .or(f.opt_f64("rope_theta")?)
        .unwrap_or(10000.0);
        if rope_theta <= 0.0 {
            return Err(f.invalid(
                "rope_theta",
                format!("must be positive, found {rope_theta}"),
            ));
        }
        let rope_scaling = match (rope_params, f.get("rope_scaling")) {
            (Some(m), _) => parse_rope_scaling(&Fields {
                path,
                obj: m,
                prefix: "rope_parameters.",
            })?,
            (None, Some(Value::Object(m))) => parse_rope_scaling(&Fields {
                path,
                obj: m,
                prefix: "rope_scaling.",
            })?,
            (None, None) => None,
            (None, Some(v)) => {
                return Err(f.invalid(
                    "rope_scaling",
                    format!("expected an object or null, found {v}"),
                ))
            }
        };

        let default_max_pos = match architecture {
            Architecture::Llama => 2048,
            Architecture::Mistral => 4096 * 32,
            Architecture::Qwen2 | Architecture::Qwen3 => 32768,
        };
        let sliding_window = match architecture {
            Architecture::Mistral => f.opt_usize("sliding_window")?,
            Architecture::Qwen2 | Architecture::Qwen3 => {
                if f.opt_bool("use_sliding_window")?.unwrap_or(false) {
                    f.opt_usize("sliding_window")?
                } else {
                    None
                }
            }
            Architecture::Llama => None,
        };

        let torch_dtype = match f.opt_str("torch_dtype")? {
            Some(s) => Some(s),
            None => f.opt_str("dtype")?,
        }
        .map(str::to_string);

        let pad: Vec<u32> = f.token_ids("pad_token_id")?;
        Ok(ModelConfig {
            architecture,
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            vocab_size,
            rms_norm_eps: f.opt_f64("rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            max_position_embeddings: f
                .opt_usize("max_position_embeddings")?
                .unwrap_or(default_max_pos),
            tie_word_embeddings: f.opt_bool("tie_word_embeddings")?.unwrap_or(false),
            qkv_bias,
            o_bias,
            qk_norm,
            sliding_window,
            torch_dtype,
            bos_token_id: f.token_ids("bos_token_id")?,
            eos_token_id: f.token_ids("eos_token_id")?,
            pad_token_id: pad.first().copied(),
        })
    }

    /// The model as a Hugging Face `config.json` object that transformers loads.
    pub fn to_hf_json(&self) -> Value {
        let ids = |v: &[u32]| match v {
            [] => Value::Null,
            [one] => json!(one),
            many => json!(many),
        };
        let mut m = Map::new();
        m.insert(
            "architectures".into(),
            json!([self.architecture.hf_class()]),
        );
        m.insert("model_type".into(), json!(self.architecture.model_type()));
        m.insert("hidden_size".into(), json!(self.hidden_size));
        m.insert("intermediate_size".into(), json!(self.intermediate_size));
        m.insert("num_hidden_layers".into(), json!(self.num_hidden_layers));
        m.insert(
            "num_attention_heads".into(),
            json!(self.num_attention_heads),
        );
        m.insert(
            "num_key_value_heads".into(),
            json!(self.num_key_value_heads),
        );
        m.insert("head_dim".into(), json!(self.head_dim));
        m.insert("vocab_size".into(), json!(self.vocab_size));
        m.insert("hidden_act".into(), json!("silu"));
        m.insert("rms_norm_eps".into(), json!(self.rms_norm_eps));
        m.insert("rope_theta".into(), json!(self.rope_theta));
        m.insert(
            "rope_scaling".into(),
            match &self.rope_scaling {
                None => Value::Null,
                Some(RopeScaling::Linear { factor }) => {
                    json!({"rope_type": "linear", "factor": factor})
                }
                Some(RopeScaling::Llama3 {
                    factor,
                    low_freq_factor,
                    high_freq_factor,
                    original_max_position_embeddings,
                }) => json!({
                    "rope_type": "llama3",
                    "factor": factor,
                    "low_freq_factor": low_freq_factor,
                    "high_freq_factor": high_freq_factor,
                    "original_max_position_embeddings": original_max_position_embeddings,
                }),
            },
        );
        m.insert(
            "max_position_embeddings".into(),
            json!(self.max_position_embeddings),
        );
        m.insert(
            "tie_word_embeddings".into(),
            json!(self.tie_word_embeddings),
        );
        match self.architecture {
            Architecture::Llama | Architecture::Qwen3 => {
                m.insert("attention_bias".into(), json!(self.qkv_bias));
            }
            Architecture::Qwen2 | Architecture::Mistral => {}
        }
        if self.architecture == Architecture::Llama {
            m.insert("mlp_bias".into(), json!(false));
        }
        match self.architecture {
            Architecture::Mistral => {
                m.insert("sliding_window".into(), json!(self.sliding_window));
            }
            Architecture::Qwen2 | Architecture::Qwen3 => {
                m.insert(
                    "use_sliding_window".into(),
                    json!(self.sliding_window.is_some()),
                );
                m.insert("sliding_window".into(), json!(self.sliding_window));
            }
            Architecture::Llama => {}
        }
        m.insert("attention_dropout".into(), json!(0.0));
        m.insert("initializer_range".into(), json!(0.02));
        m.insert(
            "torch_dtype".into(),
            json!(self.torch_dtype.as_deref().unwrap_or("bfloat16")),
        );
        m.insert("bos_token_id".into(), ids(&self.bos_token_id));
        m.insert("eos_token_id".into(), ids(&self.eos_token_id));
        if let Some(p) = self.pad_token_id {
            m.insert("pad_token_id".into(), json!(p));
        }
        m.insert("use_cache".into(), json!(true));
        Value::Object(m)
    }

    /// Write `config.json` into `dir` (atomically).
    pub fn save(&self, dir: &Path) -> Result<PathBuf> {
        let path = dir.join("config.json");
        crate::io::write_json_atomic(&path, &self.to_hf_json())?;
        Ok(path)
    }

    /// Width of the query projection output (heads x head_dim).
    pub fn q_dim(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    /// Width of each of the key and value projection outputs.
    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }

    /// `(out_features, in_features)` of a projection, the shape of its weight.
    pub fn projection_shape(&self, p: Projection) -> (usize, usize) {
        let (h, i) = (self.hidden_size, self.intermediate_size);
        match p {
            Projection::Q => (self.q_dim(), h),
            Projection::K | Projection::V => (self.kv_dim(), h),
            Projection::O => (h, self.q_dim()),
            Projection::Gate | Projection::Up => (i, h),
            Projection::Down => (h, i),
        }
    }

    /// The module path of a projection: `model.layers.{layer}.self_attn.q_proj`.
    pub fn module_name(layer: usize, p: Projection) -> String {
        format!("model.layers.{layer}.{}.{}", p.block(), p.name())
    }

    /// Every tensor of the checkpoint with its Hugging Face name and shape, in the order
    /// transformers' state dict lists them.
    pub fn tensor_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let h = self.hidden_size;
        let mut out = vec![(
            "model.embed_tokens.weight".to_string(),
            vec![self.vocab_size, h],
        )];
        for l in 0..self.num_hidden_layers {
            for p in [Projection::Q, Projection::K, Projection::V, Projection::O] {
                let (o, i) = self.projection_shape(p);
                out.push((format!("{}.weight", Self::module_name(l, p)), vec![o, i]));
                let bias = if p == Projection::O {
                    self.o_bias
                } else {
                    self.qkv_bias
                };
                if bias {
                    out.push((format!("{}.bias", Self::module_name(l, p)), vec![o]));
                }
            }
            if self.qk_norm {
                for n in ["q_norm", "k_norm"] {
                    out.push((
                        format!("model.layers.{l}.self_attn.{n}.weight"),
                        vec![self.head_dim],
                    ));
                }
            }
            for p in [Projection::Gate, Projection::Up, Projection::Down] {
                let (o, i) = self.projection_shape(p);
                out.push((format!("{}.weight", Self::module_name(l, p)), vec![o, i]));
            }
            out.push((format!("model.layers.{l}.input_layernorm.weight"), vec![h]));
            out.push((
                format!("model.layers.{l}.post_attention_layernorm.weight"),
                vec![h],
            ));
        }
        out.push(("model.norm.weight".to_string(), vec![h]));
        if !self.tie_word_embeddings {
            out.push(("lm_head.weight".to_string(), vec![self.vocab_size, h]));
        }
        out
    }

    /// Number of parameters (a tied lm_head counted once).
    pub fn num_parameters(&self) -> usize {
        self.tensor_shapes()
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum()
    }

    /// RoPE inverse frequencies, `head_dim / 2` of them, scaled as the config says; the
    /// same computation as transformers' rope init functions (default, linear, llama3),
    /// in f32 as it does.
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        let dim = self.head_dim;
        let base = self.rope_theta as f32;
        let inv: Vec<f32> = (0..dim)
            .step_by(2)
            .map(|i| 1.0 / base.powf(i as f32 / dim as f32))
            .collect();
        match &self.rope_scaling {
            None => inv,
            Some(RopeScaling::Linear { factor }) => {
                inv.into_iter().map(|f| f / *factor as f32).collect()
            }
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }) => {
                let (factor, low, high) = (
                    *factor as f32,
                    *low_freq_factor as f32,
                    *high_freq_factor as f32,
                );
                let old_ctx = *original_max_position_embeddings as f32;
                let low_freq_wavelen = old_ctx / low;
                let high_freq_wavelen = old_ctx / high;
                inv.into_iter()
                    .map(|f| {
                        let wavelen = 2.0 * std::f32::consts::PI / f;
                        if wavelen > low_freq_wavelen {
                            f / factor
                        } else if wavelen < high_freq_wavelen {
                            f
                        } else {
                            let smooth = (old_ctx / wavelen - low) / (high - low);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        }
    }

    /// A two-layer Llama with odd sizes and Llama-3 RoPE scaling, for tests.
    pub fn tiny_llama() -> ModelConfig {
        preset(TINY_LLAMA)
    }

    /// A two-layer Qwen2 (q/k/v biases, tied embeddings), for tests.
    pub fn tiny_qwen2() -> ModelConfig {
        preset(TINY_QWEN2)
    }

    /// A two-layer Qwen3 (q/k norms, head_dim not hidden/heads), for tests.
    pub fn tiny_qwen3() -> ModelConfig {
        preset(TINY_QWEN3)
    }

    /// meta-llama/Llama-3.2-1B, as its config.json says.
    pub fn llama_3_2_1b() -> ModelConfig {
        preset(LLAMA_3_2_1B)
    }

    /// meta-llama/Meta-Llama-3-8B, as its config.json says.
    pub fn llama_3_8b() -> ModelConfig {
        preset(LLAMA_3_8B)
    }
}

fn preset(json: &str) -> ModelConfig {
    // The presets are constants checked by the tests below, not user input.
    ModelConfig::from_json_str(json, Path::new("<preset config.json>"))
        .expect("built-in preset config parses")
}

fn parse_architecture(f: &Fields) -> Result<Architecture> {
    let unsupported = |found: &str| ModelError::UnsupportedArchitecture {
        path: f.path.to_path_buf(),
        found: found.to_string(),
    };
    match f.get("architectures") {
        Some(Value::Array(list)) if !list.is_empty() => {
            let Some(name) = list[0].as_str() else {
                return Err(f.invalid(
                    "architectures",
                    format!("expected a list of class names, found {}", list[0]),
                ));
            };
            Architecture::from_class(name).ok_or_else(|| unsupported(name))
        }
        Some(Value::Array(_)) | None => match f.opt_str("model_type")? {
            Some(t) => Architecture::from_model_type(t).ok_or_else(|| unsupported(t)),
            None => Err(f.missing("architectures")),
        },
        Some(v) => Err(f.invalid(
            "architectures",
            format!("expected a list of class names, found {v}"),
        )),
    }
}

fn parse_rope_scaling(f: &Fields) -> Result<Option<RopeScaling>> {
    // Older configs say "type", newer "rope_type".
    let kind = match f.opt_str("rope_type")? {
        Some(k) => Some(k),
        None => f.opt_str("type")?,
    };
    let positive = |name: &str| -> Result<f64> {
        let x = f.req_f64(name)?;
        if x <= 0.0 {
            return Err(f.invalid(name, format!("must be positive, found {x}")));
        }
        Ok(x)
    };
    match kind {
        None | Some("default") => Ok(None),
        Some("linear") => Ok(Some(RopeScaling::Linear {
            factor: positive("factor")?,
        })),
        Some("llama3") => {
            let low = positive("low_freq_factor")?;
            let high = positive("high_freq_factor")?;
            if high <= low {
                return Err(f.invalid(
                    "high_freq_factor",
                    format!("{high} must exceed low_freq_factor {low}"),
                ));
            }
            Ok(Some(RopeScaling::Llama3 {
                factor: positive("factor")?,
                low_freq_factor: low,
                high_freq_factor: high,
                original_max_position_embeddings: f
                    .req_positive("original_max_position_embeddings")?,
            }))
        }
        Some(other) => Err(f.invalid(
            "rope_type",
            format!("`{other}` is not supported; supported: default, linear, llama3"),
        )),
    }
}

const LLAMA_3_2_1B: &str = r#"{
  "architectures": ["LlamaForCausalLM"],
  "attention_bias": false,
  "attention_dropout": 0.0,
  "bos_token_id": 128000,
  "eos_token_id": 128001,
  "head_dim": 64,
  "hidden_act": "silu",
  "hidden_size": 2048,
  "initializer_range": 0.02,
  "intermediate_size": 8192,
  "max_position_embeddings": 131072,
  "mlp_bias": false,
  "model_type": "llama",
  "num_attention_heads": 32,
  "num_hidden_layers": 16,
  "num_key_value_heads": 8,
  "pretraining_tp": 1,
  "rms_norm_eps": 1e-05,
  "rope_scaling": {
    "factor": 32.0,
    "high_freq_factor": 4.0,
    "low_freq_factor": 1.0,
    "original_max_position_embeddings": 8192,
    "rope_type": "llama3"
  },
  "rope_theta": 500000.0,
  "tie_word_embeddings": true,
  "torch_dtype": "bfloat16",
  "use_cache": true,
  "vocab_size": 128256
}"#;

const LLAMA_3_8B: &str = r#"{
  "architectures": ["LlamaForCausalLM"],
  "attention_bias": false,
  "attention_dropout": 0.0,
  "bos_token_id": 128000,
  "eos_token_id": 128001,
  "hidden_act": "silu",
  "hidden_size": 4096,
  "initializer_range": 0.02,
  "intermediate_size": 14336,
  "max_position_embeddings": 8192,
  "model_type": "llama",
  "num_attention_heads": 32,
  "num_hidden_layers": 32,
  "num_key_value_heads": 8,
  "pretraining_tp": 1,
  "rms_norm_eps": 1e-05,
  "rope_scaling": null,
  "rope_theta": 500000.0,
  "tie_word_embeddings": false,
  "torch_dtype": "bfloat16",
  "use_cache": true,
  "vocab_size": 128256
}"#;

const TINY_LLAMA: &str = r#"{
  "architectures": ["LlamaForCausalLM"],
  "model_type": "llama",
  "hidden_size": 96,
  "intermediate_size": 168,
  "num_hidden_layers": 2,
  "num_attention_heads": 6,
  "num_key_value_heads": 2,
  "vocab_size": 251,
  "rms_norm_eps": 1e-05,
  "rope_theta": 500000.0,
  "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
  "max_position_embeddings": 512,
  "tie_word_embeddings": false,
  "hidden_act": "silu",
  "torch_dtype": "bfloat16",
  "bos_token_id": 1,
  "eos_token_id": 2
}"#;

const TINY_QWEN2: &str = r#"{
  "architectures": ["Qwen2ForCausalLM"],
  "model_type": "qwen2",
  "hidden_size": 64,
  "intermediate_size": 136,
  "num_hidden_layers": 2,
  "num_attention_heads": 4,
  "num_key_value_heads": 2,
  "vocab_size": 211,
  "rms_norm_eps": 1e-06,
  "rope_theta": 1000000.0,
  "max_position_embeddings": 512,
  "tie_word_embeddings": true,
  "use_sliding_window": false,
  "sliding_window": 512,
  "hidden_act": "silu",
  "torch_dtype": "bfloat16",
  "bos_token_id": 1,
  "eos_token_id": [2, 3]
}"#;

const TINY_QWEN3: &str = r#"{
  "architectures": ["Qwen3ForCausalLM"],
  "model_type": "qwen3",
  "hidden_size": 64,
  "intermediate_size": 120,
  "num_hidden_layers": 2,
  "num_attention_heads": 4,
  "num_key_value_heads": 2,
  "head_dim": 32,
  "vocab_size": 199,
  "rms_norm_eps": 1e-06,
  "rope_theta": 1000000.0,
  "max_position_embeddings": 512,
  "tie_word_embeddings": false,
  "attention_bias": false,
  "hidden_act": "silu",
  "torch_dtype": "bfloat16",
  "bos_token_id": 1,
  "eos_token_id": 2
}"#;

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ModelConfig> {
        ModelConfig::from_json_str(text, Path::new("/m/config.json"))
    }

    #[test]
    fn presets_have_the_published_shapes() {
        let c = ModelConfig::llama_3_2_1b();
        assert_eq!(c.architecture, Architecture::Llama);
        assert_eq!((c.hidden_size, c.intermediate_size), (2048, 8192));
        assert_eq!((c.num_hidden_layers, c.num_attention_heads), (16, 32));
        assert_eq!((c.num_key_value_heads, c.head_dim), (8, 64));
        assert!(c.tie_word_embeddings);
        assert_eq!(c.rms_norm_eps, 1e-5);
        assert_eq!(c.rope_theta, 500000.0);
        assert_eq!(
            c.rope_scaling,
            Some(RopeScaling::Llama3 {
                factor: 32.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192
            })
        );
        assert_eq!(c.bos_token_id, vec![128000]);
        assert_eq!(c.eos_token_id, vec![128001]);
        // 1.236B parameters, lm_head tied.
        assert_eq!(c.num_parameters(), 1_235_814_400);

        let c = ModelConfig::llama_3_8b();
        assert_eq!((c.hidden_size, c.intermediate_size), (4096, 14336));
        assert_eq!(
            (c.num_hidden_layers, c.num_key_value_heads, c.head_dim),
            (32, 8, 128)
        );
        assert_eq!(c.vocab_size, 128256);
        assert!(!c.tie_word_embeddings && c.rope_scaling.is_none());
        assert_eq!(c.num_parameters(), 8_030_261_248);

        for c in [
            ModelConfig::tiny_llama(),
            ModelConfig::tiny_qwen2(),
            ModelConfig::tiny_qwen3(),
        ] {
            assert_eq!(c.num_hidden_layers, 2);
        }
    }

    #[test]
    fn llama_defaults_and_rope_scaling() {
        let c = parse(
            r#"{"architectures": ["LlamaForCausalLM"], "hidden_size": 64,
                "intermediate_size": 100, "num_hidden_layers": 3, "num_attention_heads": 4,
                "vocab_size": 50, "rope_scaling": {"type": "linear", "factor": 2.0},
                "bos_token_id": 1, "eos_token_id": [2, 7], "pad_token_id": -1}"#,
        )
        .unwrap();
        assert_eq!(c.num_key_value_heads, 4);
        assert_eq!(c.head_dim, 16);
        assert_eq!(c.rms_norm_eps, 1e-6);
        assert_eq!(c.rope_theta, 10000.0);
        assert_eq!(c.max_position_embeddings, 2048);
        assert_eq!(c.rope_scaling, Some(RopeScaling::Linear { factor: 2.0 }));
        assert!(!c.qkv_bias && !c.o_bias && !c.qk_norm && !c.tie_word_embeddings);
        assert_eq!(c.eos_token_id, vec![2, 7]);
        assert_eq!(c.pad_token_id, None);
        // Round trip through our own config.json, which always names a dtype.
        let again = parse(&c.to_hf_json().to_string()).unwrap();
        assert_eq!(
            again,
            ModelConfig {
                torch_dtype: Some("bfloat16".into()),
                ..c
            }
        );
    }

    #[test]
    fn llama2_attention_bias_adds_all_four_biases() {
        let c = parse(
            r#"{"model_type": "llama", "hidden_size": 32, "intermediate_size": 40,
                "num_hidden_layers": 1, "num_attention_heads": 2, "vocab_size": 10,
                "attention_bias": true, "rope_scaling": null}"#,
        )
        .unwrap();
        assert!(c.qkv_bias && c.o_bias);
        let names: Vec<String> = c.tensor_shapes().into_iter().map(|(n, _)| n).collect();
        assert!(names.contains(&"model.layers.0.self_attn.o_proj.bias".to_string()));
    }

    #[test]
    fn rope_parameters_as_newer_transformers_writes_them() {
        let c = parse(
            r#"{"architectures": ["LlamaForCausalLM"], "hidden_size": 64,
                "intermediate_size": 100, "num_hidden_layers": 1, "num_attention_heads": 4,
                "vocab_size": 50, "dtype": "bfloat16",
                "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0,
                  "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192}}"#,
        )
        .unwrap();
        assert_eq!(c.rope_theta, 500000.0);
        assert!(
            matches!(c.rope_scaling, Some(RopeScaling::Llama3 { factor, .. }) if factor == 32.0)
        );
        assert_eq!(c.torch_dtype.as_deref(), Some("bfloat16"));
        let d = parse(
            r#"{"architectures": ["LlamaForCausalLM"], "hidden_size": 64,
                "intermediate_size": 100, "num_hidden_layers": 1, "num_attention_heads": 4,
                "vocab_size": 50, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}"#,
        )
        .unwrap();
        assert_eq!((d.rope_theta, d.rope_scaling), (1e6, None));
    }

    #[test]
    fn mistral_sliding_window_and_no_biases() {
        let c = parse(
            r#"{"architectures": ["MistralForCausalLM"], "hidden_size": 4096,
                "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                "num_key_value_heads": 8, "vocab_size": 32000, "rms_norm_eps": 1e-05,
                "rope_theta": 10000.0, "sliding_window": 4096, "attention_bias": true,
                "max_position_embeddings": 32768}"#,
        )
        .unwrap();
        assert_eq!(c.architecture, Architecture::Mistral);
        assert_eq!(c.sliding_window, Some(4096));
        assert!(!c.qkv_bias && !c.o_bias);
        assert_eq!(c.head_dim, 128);
    }

    #[test]
    fn qwen2_has_qkv_bias_and_tied_or_untied_embeddings() {
        let tied = parse(
            r#"{"architectures": ["Qwen2ForCausalLM"], "hidden_size": 896,
                "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
                "num_key_value_heads": 2, "vocab_size": 151936, "rms_norm_eps": 1e-06,
                "rope_theta": 1000000.0, "tie_word_embeddings": true,
                "use_sliding_window": false, "sliding_window": 32768}"#,
        )
        .unwrap();
        assert!(tied.qkv_bias && !tied.o_bias && tied.tie_word_embeddings);
        assert_eq!(tied.sliding_window, None);
        assert_eq!(tied.head_dim, 64);
        let names: Vec<String> = tied.tensor_shapes().into_iter().map(|(n, _)| n).collect();
        assert!(names.contains(&"model.layers.0.self_attn.k_proj.bias".to_string()));
        assert!(!names.contains(&"model.layers.0.self_attn.o_proj.bias".to_string()));
        assert!(!names.contains(&"lm_head.weight".to_string()));

        let untied = parse(
            r#"{"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 100,
                "num_hidden_layers": 1, "num_attention_heads": 4, "vocab_size": 50,
                "tie_word_embeddings": false}"#,
        )
        .unwrap();
        let names: Vec<String> = untied.tensor_shapes().into_iter().map(|(n, _)| n).collect();
        assert!(names.contains(&"lm_head.weight".to_string()));
    }

    #[test]
    fn qwen3_has_qk_norm_and_head_dim_default_128() {
        let c = parse(
            r#"{"architectures": ["Qwen3ForCausalLM"], "hidden_size": 1024,
                "intermediate_size": 3072, "num_hidden_layers": 28, "num_attention_heads": 16,
                "num_key_value_heads": 8, "vocab_size": 151936, "tie_word_embeddings": true}"#,
        )
        .unwrap();
        assert!(c.qk_norm && !c.qkv_bias);
        assert_eq!(c.head_dim, 128);
        assert_eq!(c.q_dim(), 2048);
        assert_eq!(c.projection_shape(Projection::O), (1024, 2048));
        let shapes = c.tensor_shapes();
        assert!(shapes.contains(&("model.layers.3.self_attn.q_norm.weight".into(), vec![128])));
    }

    #[test]
    fn unsupported_architecture_names_it_and_the_supported_ones() {
        let e = parse(
            r#"{"architectures": ["GemmaForCausalLM"], "hidden_size": 64,
                "intermediate_size": 100, "num_hidden_layers": 1, "num_attention_heads": 4,
                "vocab_size": 50}"#,
        )
        .unwrap_err();
        let msg = e.to_string();
        assert!(
            matches!(e, ModelError::UnsupportedArchitecture { ref found, .. } if found == "GemmaForCausalLM")
        );
        assert!(
            msg.contains("GemmaForCausalLM") && msg.contains("Qwen3ForCausalLM"),
            "{msg}"
        );
        assert!(msg.contains("/m/config.json"), "{msg}");
        let e = parse(r#"{"model_type": "phi3"}"#).unwrap_err();
        assert!(e.to_string().contains("phi3"));
    }

    #[test]
    fn missing_and_invalid_fields_are_named() {
        let e = parse(
            r#"{"architectures": ["LlamaForCausalLM"], "hidden_size": 64,
                "num_hidden_layers": 1, "num_attention_heads": 4, "vocab_size": 50}"#,
        )
        .unwrap_err();
        assert!(
            matches!(e, ModelError::MissingField { ref field, .. } if field == "intermediate_size")
        );
        assert!(e.to_string().contains("config.json"), "{e}");

        let base = r#""architectures": ["LlamaForCausalLM"], "hidden_size": 64,
                "intermediate_size": 100, "num_hidden_layers": 1, "num_attention_heads": 4,
                "vocab_size": 50"#;
        let cases = [
            (r#""hidden_act": "gelu""#, "hidden_act"),
            (r#""num_key_value_heads": 3"#, "num_key_value_heads"),
            (
                r#""rope_scaling": {"rope_type": "yarn", "factor": 4.0}"#,
                "rope_scaling.rope_type",
            ),
            (
                r#""rope_scaling": {"rope_type": "llama3", "factor": 4.0}"#,
                "rope_scaling.low_freq_factor",
            ),
            (r#""rms_norm_eps": "small""#, "rms_norm_eps"),
            (r#""mlp_bias": true"#, "mlp_bias"),
            (r#""eos_token_id": "x""#, "eos_token_id"),
        ];
        for (extra, field) in cases {
            let e = parse(&format!("{{{base}, {extra}}}")).unwrap_err();
            match &e {
                ModelError::InvalidField { field: f, .. }
                | ModelError::MissingField { field: f, .. } => {
                    assert_eq!(f, field, "{e}")
                }
                other => panic!("{extra}: unexpected error {other}"),
            }
        }
        assert!(matches!(
            parse("[1, 2]"),
            Err(ModelError::InvalidField { .. })
        ));
        assert!(matches!(parse("{not json"), Err(ModelError::Json { .. })));
        let e = parse(&format!(
            "{{{}}}",
            base.replace(r#""hidden_size": 64"#, r#""hidden_size": 0"#)
        ))
        .unwrap_err();
        assert!(e.to_string().contains("hidden_size"), "{e}");
    }

    #[test]
    fn rope_inv_freq_matches_llama3_formula() {
        let c = ModelConfig::llama_3_2_1b();
        let f = c.rope_inv_freq();
        assert_eq!(f.len(), 32);
        // Highest frequency untouched (wavelength 2*pi << 8192/4).
        assert_eq!(f[0], 1.0);
        // Lowest frequency: wavelength > 8192, divided by 32.
        let plain = 1.0 / 500000f64.powf(62.0 / 64.0);
        assert!(((f[31] as f64) - plain / 32.0).abs() / (plain / 32.0) < 1e-5);
        // Every value lies between the unscaled and the fully scaled frequency.
        for (i, &x) in f.iter().enumerate() {
            let p = 1.0 / 500000f64.powf((2 * i) as f64 / 64.0);
            assert!(x as f64 <= p * (1.0 + 1e-6) && x as f64 >= p / 32.0 * (1.0 - 1e-6));
        }
        let c = ModelConfig::llama_3_8b();
        let f = c.rope_inv_freq();
        assert_eq!(f.len(), 64);
        assert!(((f[1] as f64) - 1.0 / 500000f64.powf(2.0 / 128.0)).abs() < 1e-6);
    }

    /// config.json files as transformers 5.17 writes them (`dtype`, `rope_parameters`,
    /// `layer_types`, null token ids).
    #[test]
    fn transformers_v5_configs_parse() {
        let c = parse(TRANSFORMERS_V5_LLAMA).unwrap();
        assert_eq!(c.rope_theta, 500000.0);
        assert_eq!(
            c.rope_scaling,
            Some(RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 64
            })
        );
        assert_eq!(
            (c.head_dim, c.torch_dtype.as_deref()),
            (16, Some("bfloat16"))
        );
        assert_eq!(c.pad_token_id, None);
        let q = parse(TRANSFORMERS_V5_QWEN2).unwrap();
        assert_eq!(q.architecture, Architecture::Qwen2);
        assert!(q.tie_word_embeddings && q.qkv_bias && q.bos_token_id.is_empty());
        assert_eq!((q.rope_theta, q.rope_scaling.clone()), (10000.0, None));
        assert_eq!(q.sliding_window, None);
    }

    const TRANSFORMERS_V5_LLAMA: &str = r#"{
  "architectures": [
    "LlamaForCausalLM"
  ],
  "attention_bias": false,
  "attention_dropout": 0.0,
  "bos_token_id": 1,
  "dtype": "bfloat16",
  "eos_token_id": 2,
  "head_dim": 16,
  "hidden_act": "silu",
  "hidden_size": 96,
  "initializer_range": 0.02,
  "intermediate_size": 168,
  "max_position_embeddings": 512,
  "mlp_bias": false,
  "model_type": "llama",
  "num_attention_heads": 6,
  "num_hidden_layers": 2,
  "num_key_value_heads": 2,
  "pad_token_id": null,
  "pretraining_tp": 1,
  "rms_norm_eps": 1e-06,
  "rope_parameters": {
    "factor": 8.0,
    "high_freq_factor": 4.0,
    "low_freq_factor": 1.0,
    "original_max_position_embeddings": 64,
    "rope_theta": 500000.0,
    "rope_type": "llama3"
  },
  "tie_word_embeddings": false,
  "transformers_version": "5.17.0",
  "use_cache": true,
  "vocab_size": 251
}"#;

    const TRANSFORMERS_V5_QWEN2: &str = r#"{
  "architectures": [
    "Qwen2ForCausalLM"
  ],
  "attention_dropout": 0.0,
  "bos_token_id": null,
  "dtype": "bfloat16",
  "eos_token_id": null,
  "hidden_act": "silu",
  "hidden_size": 64,
  "initializer_range": 0.02,
  "intermediate_size": 136,
  "layer_types": [
    "full_attention",
    "full_attention"
  ],
  "max_position_embeddings": 32768,
  "max_window_layers": 28,
  "model_type": "qwen2",
  "num_attention_heads": 4,
  "num_hidden_layers": 2,
  "num_key_value_heads": 2,
  "pad_token_id": null,
  "rms_norm_eps": 1e-06,
  "rope_parameters": {
    "rope_theta": 10000.0,
    "rope_type": "default"
  },
  "sliding_window": null,
  "tie_word_embeddings": true,
  "transformers_version": "5.17.0",
  "use_cache": true,
  "use_sliding_window": false,
  "vocab_size": 211
}"#;
}
