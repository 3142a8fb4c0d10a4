//! LoRA adapters with PEFT's semantics and file format.
//!
//! - [`LoraConfig`] is PEFT's `adapter_config.json` for LoRA: which modules get an adapter
//!   (`target_modules` as a list of names, a regex, or "all-linear"; `exclude_modules`;
//!   `layers_to_transform`), their rank and alpha (`rank_pattern`, `alpha_pattern`, matched
//!   as PEFT matches them), the scaling (`alpha / r`, or `alpha / sqrt(r)` with rsLoRA) and
//!   the initialisation (A kaiming-uniform or gaussian, B zero).
//! - [`Adapter`] holds the A `[r, in]` and B `[out, r]` matrices per module, and saves and
//!   loads them as PEFT does (`adapter_model.safetensors`, keys
//!   `base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`).
//! - [`AdapterSet`] keeps several adapters for one model: activate one or a set (their
//!   deltas add), disable all, merge into the base weights and unmerge.
//! - [`export_merged`] writes a merged Hugging Face model folder.
//!
//! Features of PEFT that change the math and that we do not implement (DoRA, LoRA biases,
//! `modules_to_save`, fan_in_fan_out, layer replication, PiSSA/OLoRA-style inits that
//! rewrite the base) are refused with an error naming the field, never ignored.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};

use regex::Regex;
use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use tigon_kernels::rng::Rng;
use tigon_kernels::{cpu, DType, Device, Tensor};

use crate::config::{ModelConfig, Projection};
use crate::error::{ModelError, Result};
use crate::io;
use crate::weights::{
    save_sharded, MaybeOwned, ModelWeights, TensorSpec, Weights, DEFAULT_MAX_SHARD_BYTES,
    INDEX_FILE, SINGLE_FILE,
};

pub const ADAPTER_CONFIG_FILE: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// Which modules get LoRA, as PEFT's `target_modules`.
#[derive(Clone, Debug, PartialEq)]
pub enum TargetModules {
    /// Module names: a name matches a module whose full name equals it or ends with
    /// `.{name}`.
    Names(Vec<String>),
    /// A regex that must match the full module name (`model.layers.0.self_attn.q_proj`).
    Regex(String),
    /// Every linear layer but the output head: the seven projections of each layer.
    AllLinear,
}

/// Initialisation of new adapters, as PEFT's `init_lora_weights`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoraInit {
    /// `true`: A kaiming-uniform (a = sqrt(5), torch's nn.Linear default), B zero.
    KaimingUniform,
    /// `"gaussian"`: A normal with std 1/r, B zero.
    Gaussian,
    /// `false`: A and B both keep nn.Linear's default (kaiming-uniform), so the adapter
    /// starts non-zero. PEFT offers it for tests; so do we.
    Random,
}

/// PEFT's LoraConfig (the fields that matter for LoRA on linear layers).
#[derive(Clone, Debug, PartialEq)]
pub struct LoraConfig {
    pub r: usize,
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    /// None: PEFT's default for the architecture (q_proj and v_proj for every family here).
    pub target_modules: Option<TargetModules>,
    /// Modules never targeted (names or regex, as `target_modules`; not AllLinear).
    pub exclude_modules: Option<TargetModules>,
    pub use_rslora: bool,
    pub init_lora_weights: LoraInit,
    /// Per-module rank overrides, in file order: the first key `k` whose regex
    /// `(.*\.)?(k)$` matches the module's full name wins.
    pub rank_pattern: Vec<(String, usize)>,
    /// Per-module alpha overrides, matched as `rank_pattern`.
    pub alpha_pattern: Vec<(String, f64)>,
    /// Only these layer indices (with name-list targets, as in PEFT).
    pub layers_to_transform: Option<Vec<usize>>,
    /// The module-name segment before the layer index, for `layers_to_transform`.
    pub layers_pattern: Vec<String>,
    pub base_model_name_or_path: Option<String>,
    pub revision: Option<String>,
    pub task_type: Option<String>,
    pub inference_mode: bool,
}

impl Default for LoraConfig {
    /// PEFT's defaults (r 8, alpha 8, no dropout, default targets, kaiming init).
    fn default() -> Self {
        LoraConfig {
            r: 8,
            lora_alpha: 8.0,
            lora_dropout: 0.0,
            target_modules: None,
            exclude_modules: None,
            use_rslora: false,
            init_lora_weights: LoraInit::KaimingUniform,
            rank_pattern: vec![],
            alpha_pattern: vec![],
            layers_to_transform: None,
            layers_pattern: vec![],
            base_model_name_or_path: None,
            revision: None,
            task_type: Some("CAUSAL_LM".into()),
            inference_mode: false,
        }
    }
}

/// One module that carries LoRA, with its resolved rank, alpha and scaling.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraTarget {
    /// Full module name, `model.layers.{layer}.self_attn.q_proj`.
    pub module: String,
    pub layer: usize,
    pub projection: Projection,
    pub in_features: usize,
    pub out_features: usize,
    pub r: usize,
    pub alpha: f64,
    /// `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
    pub scaling: f64,
}

impl LoraTarget {
    /// PEFT's key of the A or B matrix in adapter_model.safetensors.
    pub fn peft_key(&self, matrix: LoraMatrix) -> String {
        format!("base_model.model.{}.{}.weight", self.module, matrix.name())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoraMatrix {
    A,
    B,
}

impl LoraMatrix {
    fn name(self) -> &'static str {
        match self {
            LoraMatrix::A => "lora_A",
            LoraMatrix::B => "lora_B",
        }
    }
}

/// A JSON object read with its keys in file order (PEFT's pattern matching takes the first
/// matching key, so the order is part of the meaning).
#[derive(Debug, Default)]
struct OrderedMap(Vec<(String, Value)>);

impl<'de> Deserialize<'de> for OrderedMap {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = OrderedMap;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut m: A,
            ) -> std::result::Result<OrderedMap, A::Error> {
                let mut out = vec![];
                while let Some((k, v)) = m.next_entry::<String, Value>()? {
                    out.push((k, v));
                }
                Ok(OrderedMap(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// adapter_config.json as written; every field optional so errors can name what is wrong.
#[derive(Deserialize, Default)]
#[serde(default)]
struct RawLoraConfig {
    peft_type: Option<Value>,
    r: Option<Value>,
    lora_alpha: Option<Value>,
    lora_dropout: Option<Value>,
    target_modules: Option<Value>,
    exclude_modules: Option<Value>,
    use_rslora: Option<Value>,
    init_lora_weights: Option<Value>,
    rank_pattern: Option<OrderedMap>,
    alpha_pattern: Option<OrderedMap>,
    layers_to_transform: Option<Value>,
    layers_pattern: Option<Value>,
    base_model_name_or_path: Option<Value>,
    revision: Option<Value>,
    task_type: Option<Value>,
    inference_mode: Option<Value>,
    // Refused unless at their neutral value.
    bias: Option<Value>,
    fan_in_fan_out: Option<Value>,
    modules_to_save: Option<Value>,
    use_dora: Option<Value>,
    lora_bias: Option<Value>,
    use_qalora: Option<Value>,
    layer_replication: Option<Value>,
    target_parameters: Option<Value>,
    trainable_token_indices: Option<Value>,
    alora_invocation_tokens: Option<Value>,
}

fn is_empty_value(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        Value::String(s) => s.is_empty(),
        _ => false,
    }
}

impl LoraConfig {
    /// Read `adapter_config.json` from an adapter folder.
    pub fn from_dir(dir: &Path) -> Result<LoraConfig> {
        Self::from_file(&dir.join(ADAPTER_CONFIG_FILE))
    }

    pub fn from_file(path: &Path) -> Result<LoraConfig> {
        let text = io::read_to_string(path)?;
        Self::from_json_str(&text, path)
    }

    /// Parse adapter_config.json text; `path` names the file in errors.
    pub fn from_json_str(text: &str, path: &Path) -> Result<LoraConfig> {
        let raw: RawLoraConfig = serde_json::from_str(text).map_err(|e| ModelError::Json {
            path: path.to_path_buf(),
            source: e,
        })?;
        let bad = |field: &str, detail: String| ModelError::invalid_field(path, field, detail);
        let defaults = LoraConfig::default();

        if let Some(t) = &raw.peft_type {
            if t.as_str() != Some("LORA") {
                return Err(bad(
                    "peft_type",
                    format!("{t} is not supported; supported: \"LORA\""),
                ));
            }
        }
        let as_bool = |field: &str, v: &Option<Value>, default: bool| -> Result<bool> {
            match v {
                None => Ok(default),
                Some(Value::Bool(b)) => Ok(*b),
                Some(v) => Err(bad(field, format!("expected true or false, found {v}"))),
            }
        };
        let as_f64 = |field: &str, v: &Value| -> Result<f64> {
            v.as_f64()
                .filter(|x| x.is_finite())
                .ok_or_else(|| bad(field, format!("expected a finite number, found {v}")))
        };
        let as_positive = |field: &str, v: &Value| -> Result<usize> {
            v.as_u64()
                .filter(|&n| n > 0)
                .and_then(|n| usize::try_from(n).ok())
                .ok_or_else(|| bad(field, format!("expected a positive integer, found {v}")))
        };
        let as_opt_string = |field: &str, v: &Option<Value>| -> Result<Option<String>> {
            match v {
                None => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(v) => Err(bad(field, format!("expected a string, found {v}"))),
            }
        };
        let as_targets = |field: &str, v: &Option<Value>| -> Result<Option<TargetModules>> {
            match v {
                None => Ok(None),
                Some(Value::String(s)) if s.eq_ignore_ascii_case("all-linear") => {
                    Ok(Some(TargetModules::AllLinear))
                }
                Some(Value::String(s)) => Ok(Some(TargetModules::Regex(s.clone()))),
                Some(Value::Array(items)) => {
                    let mut names = vec![];
                    for item in items {
                        match item.as_str() {
                            Some(s) => names.push(s.to_string()),
                            None => {
                                return Err(bad(
                                    field,
                                    format!("expected module names, found {item}"),
                                ))
                            }
                        }
                    }
                    Ok(Some(TargetModules::Names(names)))
                }
                Some(v) => Err(bad(
                    field,
                    format!("expected a list of module names or a regex string, found {v}"),
                )),
            }
        };

        // The fields whose non-default values change the math in ways we do not implement.
        if let Some(b) = &raw.bias {
            if b.as_str() != Some("none") {
                return Err(bad(
                    "bias",
                    format!("{b} is not supported; supported: \"none\""),
                ));
            }
        }
        for (field, v) in [
            ("fan_in_fan_out", &raw.fan_in_fan_out),
            ("use_dora", &raw.use_dora),
            ("lora_bias", &raw.lora_bias),
            ("use_qalora", &raw.use_qalora),
        ] {
            if as_bool(field, v, false)? {
                return Err(bad(field, "true is not supported".into()));
            }
        }
        for (field, v) in [
            ("modules_to_save", &raw.modules_to_save),
            ("layer_replication", &raw.layer_replication),
            ("target_parameters", &raw.target_parameters),
            ("trainable_token_indices", &raw.trainable_token_indices),
            ("alora_invocation_tokens", &raw.alora_invocation_tokens),
        ] {
            if let Some(v) = v {
                if !is_empty_value(v) {
                    return Err(bad(field, format!("{v} is not supported (only null)")));
                }
            }
        }

        let init_lora_weights = match &raw.init_lora_weights {
            None | Some(Value::Bool(true)) => LoraInit::KaimingUniform,
            Some(Value::Bool(false)) => LoraInit::Random,
            Some(Value::String(s)) if s.eq_ignore_ascii_case("gaussian") => LoraInit::Gaussian,
            Some(v) => {
                return Err(bad(
                    "init_lora_weights",
                    format!("{v} is not supported; supported: true, false, \"gaussian\""),
                ))
            }
        };

        let mut rank_pattern = vec![];
        for (k, v) in raw.rank_pattern.unwrap_or_default().0 {
            rank_pattern.push((k.clone(), as_positive(&format!("rank_pattern.{k}"), &v)?));
        }
        let mut alpha_pattern = vec![];
        for (k, v) in raw.alpha_pattern.unwrap_or_default().0 {
            alpha_pattern.push((k.clone(), as_f64(&format!("alpha_pattern.{k}"), &v)?));
        }

        let layers_to_transform = match &raw.layers_to_transform {
            None => None,
            Some(Value::Array(items)) if items.is_empty() => None,
            Some(Value::Array(items)) => {
                let mut out = vec![];
                for item in items {
                    out.push(
                        item.as_u64()
                            .and_then(|n| usize::try_from(n).ok())
                            .ok_or_else(|| {
                                bad(
                                    "layers_to_transform",
                                    format!("expected layer indices, found {item}"),
                                )
                            })?,
                    );
                }
                Some(out)
            }
            Some(v) => Some(vec![v
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .ok_or_else(|| {
                    bad(
                        "layers_to_transform",
                        format!("expected a layer index or a list of them, found {v}"),
                    )
                })?]),
        };
        let layers_pattern = match &raw.layers_pattern {
            None => vec![],
            Some(Value::String(s)) if s.is_empty() => vec![],
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(items)) => items
                .iter()
                .map(|i| {
                    i.as_str().map(str::to_string).ok_or_else(|| {
                        bad("layers_pattern", format!("expected strings, found {i}"))
                    })
                })
                .collect::<Result<_>>()?,
            Some(v) => {
                return Err(bad(
                    "layers_pattern",
                    format!("expected a string or list, found {v}"),
                ))
            }
        };
        let exclude_modules = match as_targets("exclude_modules", &raw.exclude_modules)? {
            Some(TargetModules::Names(n)) if n.is_empty() => None,
            Some(TargetModules::AllLinear) => {
                return Err(bad(
                    "exclude_modules",
                    "\"all-linear\" cannot be excluded".into(),
                ))
            }
            other => other,
        };

        let config = LoraConfig {
            r: match &raw.r {
                None => defaults.r,
                Some(v) => as_positive("r", v)?,
            },
            lora_alpha: match &raw.lora_alpha {
                None => defaults.lora_alpha,
                Some(v) => as_f64("lora_alpha", v)?,
            },
            lora_dropout: match &raw.lora_dropout {
                None => defaults.lora_dropout,
                Some(v) => as_f64("lora_dropout", v)?,
            },
            target_modules: as_targets("target_modules", &raw.target_modules)?,
            exclude_modules,
            use_rslora: as_bool("use_rslora", &raw.use_rslora, false)?,
            init_lora_weights,
            rank_pattern,
            alpha_pattern,
            layers_to_transform,
            layers_pattern,
            base_model_name_or_path: as_opt_string(
                "base_model_name_or_path",
                &raw.base_model_name_or_path,
            )?,
            revision: as_opt_string("revision", &raw.revision)?,
            task_type: as_opt_string("task_type", &raw.task_type)?,
            inference_mode: as_bool("inference_mode", &raw.inference_mode, false)?,
        };
        config.validate().map_err(|e| match e {
            ModelError::Lora { detail } => ModelError::invalid_field(path, "(lora config)", detail),
            other => other,
        })?;
        Ok(config)
    }

    /// Check values and compile every regex (target, exclude, patterns).
    pub fn validate(&self) -> Result<()> {
        self.matcher().map(|_| ())
    }

    fn matcher(&self) -> Result<Matcher> {
        if self.r == 0 {
            return Err(ModelError::lora("r must be positive"));
        }
        if !self.lora_alpha.is_finite() {
            return Err(ModelError::lora(format!(
                "lora_alpha {} is not finite",
                self.lora_alpha
            )));
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return Err(ModelError::lora(format!(
                "lora_dropout {} is outside [0, 1)",
                self.lora_dropout
            )));
        }
        let compile = |what: &str, re: String| {
            Regex::new(&re).map_err(|e| ModelError::lora(format!("{what}: invalid regex: {e}")))
        };
        let targets = match &self.target_modules {
            None => TargetModules::Names(vec!["q_proj".into(), "v_proj".into()]),
            Some(TargetModules::AllLinear) => TargetModules::Names(
                Projection::ALL
                    .iter()
                    .map(|p| p.name().to_string())
                    .collect(),
            ),
            Some(t) => t.clone(),
        };
        let target = match &targets {
            TargetModules::Regex(r) => {
                NameMatch::Regex(compile("target_modules", format!("^(?:{r})$"))?)
            }
            TargetModules::Names(n) => NameMatch::Names(n.clone()),
            TargetModules::AllLinear => unreachable!("expanded above"),
        };
        let exclude = match &self.exclude_modules {
            None => None,
            Some(TargetModules::Regex(r)) => Some(NameMatch::Regex(compile(
                "exclude_modules",
                format!("^(?:{r})$"),
            )?)),
            Some(TargetModules::Names(n)) => Some(NameMatch::Names(n.clone())),
            Some(TargetModules::AllLinear) => {
                return Err(ModelError::lora("exclude_modules cannot be \"all-linear\""))
            }
        };
        let pattern = |what: &str, key: &str| compile(what, format!(r"^(?:.*\.)?(?:{key})$"));
        let mut rank = vec![];
        for (k, r) in &self.rank_pattern {
            if *r == 0 {
                return Err(ModelError::lora(format!(
                    "rank_pattern `{k}`: rank must be positive"
                )));
            }
            rank.push((pattern(&format!("rank_pattern `{k}`"), k)?, *r));
        }
        let mut alpha = vec![];
        for (k, a) in &self.alpha_pattern {
            if !a.is_finite() {
                return Err(ModelError::lora(format!(
                    "alpha_pattern `{k}`: {a} is not finite"
                )));
            }
            alpha.push((pattern(&format!("alpha_pattern `{k}`"), k)?, *a));
        }
        let layer_index = if self.layers_pattern.is_empty() {
            vec![compile("layers_pattern", r"^.*?\.[^.]*\.(\d+)\.".into())?]
        } else {
            self.layers_pattern
                .iter()
                .map(|p| compile("layers_pattern", format!(r"^.*?\.{p}\.(\d+)\.")))
                .collect::<Result<_>>()?
        };
        Ok(Matcher {
            target,
            exclude,
            rank,
            alpha,
            layer_index,
        })
    }

    /// The modules of `model` that get LoRA, in layer order, with rank, alpha and scaling,
    /// by PEFT's matching rules. Errors if a target names a module that is not one of the
    /// seven projections (LoRA on embeddings or lm_head is not supported) or if nothing
    /// matches.
    pub fn resolve(&self, model: &ModelConfig) -> Result<Vec<LoraTarget>> {
        let m = self.matcher()?;
        let mut out = vec![];
        for name in module_names(model) {
            if m.exclude.as_ref().is_some_and(|e| e.matches(&name)) {
                continue;
            }
            let found = match &m.target {
                NameMatch::Regex(re) => re.is_match(&name),
                NameMatch::Names(list) if list.contains(&name) => true,
                NameMatch::Names(list) => {
                    let suffix = list.iter().any(|t| name.ends_with(&format!(".{t}")));
                    // PEFT applies layers_to_transform only to suffix matches.
                    match (&self.layers_to_transform, suffix) {
                        (Some(layers), true) => m
                            .layer_index
                            .iter()
                            .find_map(|re| re.captures(&name))
                            .and_then(|c| c[1].parse::<usize>().ok())
                            .is_some_and(|i| layers.contains(&i)),
                        (_, s) => s,
                    }
                }
            };
            if !found {
                continue;
            }
            let Some((layer, projection)) = parse_module(&name) else {
                return Err(ModelError::lora(format!(
                    "target_modules matches `{name}`, which is not a supported LoRA target \
                     (supported: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)"
                )));
            };
            let r = m
                .rank
                .iter()
                .find(|(re, _)| re.is_match(&name))
                .map_or(self.r, |&(_, r)| r);
            let alpha = m
                .alpha
                .iter()
                .find(|(re, _)| re.is_match(&name))
                .map_or(self.lora_alpha, |&(_, a)| a);
            let scaling = if self.use_rslora {
                alpha / (r as f64).sqrt()
            } else {
                alpha / r as f64
            };
            let (out_features, in_features) = model.projection_shape(projection);
            out.push(LoraTarget {
                module: name,
                layer,
                projection,
                in_features,
                out_features,
                r,
                alpha,
                scaling,
            });
        }
        if out.is_empty() {
            return Err(ModelError::lora(format!(
                "target_modules {:?} matched no module of this {} model",
                self.target_modules
                    .as_ref()
                    .unwrap_or(&TargetModules::Names(vec![
                        "q_proj".into(),
                        "v_proj".into()
                    ])),
                model.architecture.hf_class()
            )));
        }
        Ok(out)
    }

    /// adapter_config.json as PEFT writes it (its keys, sorted as PEFT sorts them). The
    /// targets are written as resolved names for "all-linear", as PEFT does.
    pub fn to_peft_json(&self) -> Value {
        let number = |x: f64| {
            if x.fract() == 0.0 && x.abs() < 1e15 {
                json!(x as i64)
            } else {
                json!(x)
            }
        };
        let targets = |t: &Option<TargetModules>| match t {
            None => Value::Null,
            Some(TargetModules::Regex(r)) => json!(r),
            Some(TargetModules::Names(n)) => {
                let mut n = n.clone();
                n.sort();
                n.dedup();
                json!(n)
            }
            Some(TargetModules::AllLinear) => {
                let mut n: Vec<&str> = Projection::ALL.iter().map(|p| p.name()).collect();
                n.sort();
                json!(n)
            }
        };
        let mut rank = Map::new();
        for (k, r) in &self.rank_pattern {
            rank.insert(k.clone(), json!(r));
        }
        let mut alpha = Map::new();
        for (k, a) in &self.alpha_pattern {
            alpha.insert(k.clone(), number(*a));
        }
        json!({
            "alpha_pattern": alpha,
            "auto_mapping": null,
            "base_model_name_or_path": self.base_model_name_or_path,
            "bias": "none",
            "exclude_modules": targets(&self.exclude_modules),
            "fan_in_fan_out": false,
            "inference_mode": self.inference_mode,
            "init_lora_weights": match self.init_lora_weights {
                LoraInit::KaimingUniform => json!(true),
                LoraInit::Gaussian => json!("gaussian"),
                LoraInit::Random => json!(false),
            },
            "layers_pattern": match self.layers_pattern.as_slice() {
                [] => Value::Null,
                [one] => json!(one),
                many => json!(many),
            },
            "layers_to_transform": self.layers_to_transform,
            "lora_alpha": number(self.lora_alpha),
            "lora_dropout": self.lora_dropout,
            "modules_to_save": null,
            "peft_type": "LORA",
            "r": self.r,
            "rank_pattern": rank,
            "revision": self.revision,
            "target_modules": targets(&self.target_modules),
            "task_type": self.task_type,
            "use_dora": false,
            "use_rslora": self.use_rslora,
        })
    }
}

enum NameMatch {
    Names(Vec<String>),
    Regex(Regex),
}

impl NameMatch {
    fn matches(&self, name: &str) -> bool {
        match self {
            NameMatch::Regex(re) => re.is_match(name),
            NameMatch::Names(list) => list
                .iter()
                .any(|t| name == t || name.ends_with(&format!(".{t}"))),
        }
    }
}

struct Matcher {
    target: NameMatch,
    exclude: Option<NameMatch>,
    rank: Vec<(Regex, usize)>,
    alpha: Vec<(Regex, f64)>,
    layer_index: Vec<Regex>,
}

/// Every module name of the transformers model, as `named_modules()` lists them (the
/// root excluded), so that target patterns see what they would see in PEFT.
fn module_names(model: &ModelConfig) -> Vec<String> {
    let mut out = vec![
        "model".into(),
        "model.embed_tokens".into(),
        "model.layers".into(),
    ];
    for l in 0..model.num_hidden_layers {
        let p = format!("model.layers.{l}");
        out.push(p.clone());
        out.push(format!("{p}.self_attn"));
        for proj in [Projection::Q, Projection::K, Projection::V, Projection::O] {
            out.push(ModelConfig::module_name(l, proj));
        }
        if model.qk_norm {
            out.push(format!("{p}.self_attn.q_norm"));
            out.push(format!("{p}.self_attn.k_norm"));
        }
        out.push(format!("{p}.mlp"));
        for proj in [Projection::Gate, Projection::Up, Projection::Down] {
            out.push(ModelConfig::module_name(l, proj));
        }
        out.push(format!("{p}.mlp.act_fn"));
        out.push(format!("{p}.input_layernorm"));
        out.push(format!("{p}.post_attention_layernorm"));
    }
    out.push("model.norm".into());
    out.push("model.rotary_emb".into());
    out.push("lm_head".into());
    out
}

/// `model.layers.{i}.{block}.{proj}` -> (i, proj).
fn parse_module(name: &str) -> Option<(usize, Projection)> {
    let rest = name.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (block, proj) = rest.split_once('.')?;
    let proj = Projection::from_name(proj)?;
    (proj.block() == block).then_some((layer, proj))
}

/// torch.nn.init.kaiming_uniform_(w, a=sqrt(5)) bound for `fan_in`, computed with the same
/// f64 operations as torch (gain = sqrt(2 / (1 + a^2)), std = gain / sqrt(fan_in),
/// bound = sqrt(3) * std), which comes to 1/sqrt(fan_in) up to rounding.
pub fn kaiming_uniform_bound(fan_in: usize) -> f64 {
    let a = 5f64.sqrt();
    let gain = (2.0 / (1.0 + a * a)).sqrt();
    let std = gain / (fan_in as f64).sqrt();
    3f64.sqrt() * std
}

/// The A and B matrices of one module.
#[derive(Debug)]
pub struct LoraModule {
    pub target: LoraTarget,
    /// `[r, in_features]`
    pub a: Tensor,
    /// `[out_features, r]`
    pub b: Tensor,
}

/// A named LoRA adapter for one model: its config and the matrices of every target.
#[derive(Debug)]
pub struct Adapter {
    pub name: String,
    pub config: LoraConfig,
    pub modules: Vec<LoraModule>,
}

impl Adapter {
    /// A new adapter for `model`, initialised as `config.init_lora_weights` says with a
    /// generator seeded by `seed` (f32 CPU tensors).
    pub fn new(name: &str, config: LoraConfig, model: &ModelConfig, seed: u64) -> Result<Adapter> {
        let targets = config.resolve(model)?;
        let mut rng = Rng::new(seed);
        let mut modules = Vec::with_capacity(targets.len());
        for t in targets {
            let kaiming = |rng: &mut Rng, n: usize, fan_in: usize| {
                let bound = kaiming_uniform_bound(fan_in) as f32;
                rng.uniform_vec(n, -bound, bound)
            };
            let a = match config.init_lora_weights {
                LoraInit::KaimingUniform | LoraInit::Random => {
                    kaiming(&mut rng, t.r * t.in_features, t.in_features)
                }
                LoraInit::Gaussian => rng.normal_vec(t.r * t.in_features, 1.0 / t.r as f32),
            };
            let b = match config.init_lora_weights {
                LoraInit::Random => kaiming(&mut rng, t.out_features * t.r, t.r),
                LoraInit::KaimingUniform | LoraInit::Gaussian => vec![0.0; t.out_features * t.r],
            };
            modules.push(LoraModule {
                a: Tensor::from_f32(&[t.r, t.in_features], a)?,
                b: Tensor::from_f32(&[t.out_features, t.r], b)?,
                target: t,
            });
        }
        Ok(Adapter {
            name: name.to_string(),
            config,
            modules,
        })
    }

    /// Load a PEFT adapter folder (adapter_config.json + adapter_model.safetensors) for
    /// `model`. Tensors may be f32, f16 or bf16 (kept as f32); keys may carry PEFT's
    /// in-memory adapter name (`lora_A.default.weight`) or not (`lora_A.weight`, as PEFT
    /// saves). Every targeted module must be present with A `[r, in]` and B `[out, r]`, and
    /// no other tensor may be: an adapter we would apply only in part is an error.
    pub fn load(dir: &Path, name: &str, model: &ModelConfig) -> Result<Adapter> {
        let config = LoraConfig::from_dir(dir)?;
        let targets = config.resolve(model)?;
        let path = dir.join(ADAPTER_WEIGHTS_FILE);
        if !path.is_file() && dir.join("adapter_model.bin").is_file() {
            return Err(ModelError::adapter(
                name,
                format!(
                    "{} holds pickled weights (adapter_model.bin), which are not read; save the adapter with safe_serialization=True",
                    dir.display()
                ),
            ));
        }
        let file = Weights::open_file(&path)?;
        // Canonical key (without adapter name) -> key in the file.
        let mut keys: HashMap<String, String> = HashMap::new();
        for key in file.names() {
            let mut canonical = key.clone();
            for m in ["lora_A", "lora_B"] {
                for tag in ["default", name] {
                    let with = format!(".{m}.{tag}.weight");
                    if let Some(stem) = key.strip_suffix(&with) {
                        canonical = format!("{stem}.{m}.weight");
                    }
                }
            }
            if let Some(other) = keys.insert(canonical.clone(), key.clone()) {
                return Err(ModelError::malformed(
                    &path,
                    format!("`{other}` and `{key}` are the same tensor `{canonical}`"),
                ));
            }
        }
        let mut modules = Vec::with_capacity(targets.len());
        for t in targets {
            let mut take = |m: LoraMatrix, shape: [usize; 2]| -> Result<Tensor> {
                let canonical = t.peft_key(m);
                let Some(key) = keys.remove(&canonical) else {
                    return Err(ModelError::MissingTensor {
                        name: canonical,
                        searched: path.display().to_string(),
                    });
                };
                file.get(&key, &shape, DType::F32)
            };
            let a = take(LoraMatrix::A, [t.r, t.in_features])?;
            let b = take(LoraMatrix::B, [t.out_features, t.r])?;
            modules.push(LoraModule { target: t, a, b });
        }
        if !keys.is_empty() {
            let mut extra: Vec<&String> = keys.values().collect();
            extra.sort();
            let shown: Vec<&str> = extra.iter().take(4).map(|s| s.as_str()).collect();
            return Err(ModelError::adapter(
                name,
                format!(
                    "{} has {} tensor(s) that adapter_config.json does not target: {}{}",
                    path.display(),
                    extra.len(),
                    shown.join(", "),
                    if extra.len() > shown.len() {
                        ", ..."
                    } else {
                        ""
                    }
                ),
            ));
        }
        Ok(Adapter {
            name: name.to_string(),
            config,
            modules,
        })
    }

    /// Save as PEFT does: adapter_config.json and adapter_model.safetensors (f32), keys
    /// without the adapter name. Both files are written atomically.
    pub fn save(&self, dir: &Path) -> Result<()> {
        self.save_as(dir, DType::F32)
    }

    /// [`Adapter::save`] with the tensors stored as `dtype` (f32 or bf16).
    pub fn save_as(&self, dir: &Path, dtype: DType) -> Result<()> {
        if dtype == DType::I32 {
            return Err(ModelError::adapter(
                &self.name,
                "adapters are saved as f32 or bf16",
            ));
        }
        io::create_dir_all(dir)?;
        let mut tensors: Vec<(String, &Tensor)> = vec![];
        for m in &self.modules {
            tensors.push((m.target.peft_key(LoraMatrix::A), &m.a));
            tensors.push((m.target.peft_key(LoraMatrix::B), &m.b));
        }
        tensors.sort_by(|x, y| x.0.cmp(&y.0));
        let specs: Vec<TensorSpec> = tensors
            .iter()
            .map(|(n, t)| TensorSpec::new(n.clone(), t.shape(), dtype))
            .collect();
        crate::weights::write_safetensors_streaming(
            &dir.join(ADAPTER_WEIGHTS_FILE),
            &specs,
            |i, _| {
                let t = tensors[i].1;
                if t.dtype() == dtype {
                    Ok(MaybeOwned::Borrowed(t))
                } else {
                    Ok(MaybeOwned::Owned(Tensor::from_f32_as(
                        t.shape(),
                        t.to_f32_vec()?,
                        dtype,
                    )?))
                }
            },
        )?;
        io::write_json_atomic(&dir.join(ADAPTER_CONFIG_FILE), &self.config.to_peft_json())
    }

    pub fn module(&self, module: &str) -> Option<&LoraModule> {
        self.modules.iter().find(|m| m.target.module == module)
    }

    pub fn find(&self, layer: usize, projection: Projection) -> Option<&LoraModule> {
        self.modules
            .iter()
            .find(|m| m.target.layer == layer && m.target.projection == projection)
    }

    /// Trainable parameters (A and B of every module).
    pub fn num_parameters(&self) -> usize {
        self.modules
            .iter()
            .map(|m| m.a.elem_count() + m.b.elem_count())
            .sum()
    }

    /// A copy with every matrix on `device`.
    pub fn to_device(&self, device: &Device) -> Result<Adapter> {
        let mut modules = Vec::with_capacity(self.modules.len());
        for m in &self.modules {
            modules.push(LoraModule {
                target: m.target.clone(),
                a: m.a.to_device(device)?,
                b: m.b.to_device(device)?,
            });
        }
        Ok(Adapter {
            name: self.name.clone(),
            config: self.config.clone(),
            modules,
        })
    }
}

/// `W + sign * sum_i s_i B_i A_i` for a weight `[out, in]`, computed in f32 (the weight
/// widened exactly, each delta accumulated in f32) and not yet rounded. The modules'
/// shapes are checked against the weight.
fn merged_values(
    weight: &Tensor,
    modules: &[&LoraModule],
    sign: f32,
    what: &str,
) -> Result<Vec<f32>> {
    let [out_f, in_f] = *weight.shape() else {
        return Err(ModelError::lora(format!(
            "{what}: the weight has shape {:?}, not [out, in]",
            weight.shape()
        )));
    };
    struct Delta {
        scale: f32,
        r: usize,
        a: Vec<f32>,
        b: Vec<f32>,
    }
    let mut deltas = Vec::with_capacity(modules.len());
    for m in modules {
        let t = &m.target;
        if (t.out_features, t.in_features) != (out_f, in_f)
            || m.a.shape() != [t.r, in_f]
            || m.b.shape() != [out_f, t.r]
        {
            return Err(ModelError::ShapeMismatch {
                name: format!("{what} (LoRA A {:?}, B {:?})", m.a.shape(), m.b.shape()),
                file: PathBuf::from("(in memory)"),
                expected: vec![t.out_features, t.in_features],
                found: weight.shape().to_vec(),
            });
        }
        deltas.push(Delta {
            scale: sign * t.scaling as f32,
            r: t.r,
            a: m.a.to_f32_vec()?,
            b: m.b.to_f32_vec()?,
        });
    }
    let mut out = weight.to_f32_vec()?;
    cpu::par_rows(&mut out, in_f, |o, row| {
        let mut acc = vec![0f32; in_f];
        for d in &deltas {
            for k in 0..d.r {
                let c = d.scale * d.b[o * d.r + k];
                if c != 0.0 {
                    let a_row = &d.a[k * in_f..(k + 1) * in_f];
                    for (x, &a) in acc.iter_mut().zip(a_row) {
                        *x += c * a;
                    }
                }
            }
        }
        for (w, d) in row.iter_mut().zip(&acc) {
            *w += d;
        }
    });
    Ok(out)
}

fn check_finite(values: &[f32], module: &str) -> Result<()> {
    let bad = values.iter().filter(|x| !x.is_finite()).count();
    if bad > 0 {
        let first = values.iter().position(|x| !x.is_finite()).unwrap_or(0);
        return Err(ModelError::NonFinite {
            module: module.to_string(),
            detail: format!(
                "{bad} of {} values, first at flat index {first}",
                values.len()
            ),
        });
    }
    Ok(())
}

/// Replace `weight` (CPU or device, f32 or bf16) by `values` rounded once to its dtype.
fn store(weight: &mut Tensor, values: Vec<f32>) -> Result<()> {
    let device = weight.device();
    let t = Tensor::from_f32_as(weight.shape(), values, weight.dtype())?;
    *weight = match device {
        Device::Cpu => t,
        Device::Cuda(_) => t.to_device(&device)?,
    };
    Ok(())
}

fn module_label(modules: &[&LoraModule]) -> String {
    modules
        .first()
        .map_or_else(|| "(no module)".into(), |m| m.target.module.clone())
}

/// `W += sum_i s_i B_i A_i`, computed in f32 and rounded once to W's dtype. With `safe`,
/// a result with any non-finite value is refused and W is left unchanged.
pub fn merge_into(weight: &mut Tensor, modules: &[&LoraModule], safe: bool) -> Result<()> {
    let label = module_label(modules);
    let values = merged_values(weight, modules, 1.0, &label)?;
    if safe {
        check_finite(&values, &label)?;
    }
    store(weight, values)
}

/// `W -= sum_i s_i B_i A_i`: undoes [`merge_into`] up to one rounding of W's dtype.
pub fn unmerge_from(weight: &mut Tensor, modules: &[&LoraModule]) -> Result<()> {
    let label = module_label(modules);
    let values = merged_values(weight, modules, -1.0, &label)?;
    store(weight, values)
}

/// Several adapters on one model: which are active (their deltas add, as in PEFT with a
/// list of active adapters) and which are merged into the base weights.
#[derive(Debug, Default)]
pub struct AdapterSet {
    adapters: Vec<Adapter>,
    active: Vec<String>,
    merged: Vec<String>,
}

impl AdapterSet {
    pub fn new() -> AdapterSet {
        AdapterSet::default()
    }

    /// Add an adapter (inactive). Names are unique.
    pub fn add(&mut self, adapter: Adapter) -> Result<()> {
        if self.get(&adapter.name).is_some() {
            return Err(ModelError::adapter(
                &adapter.name,
                "an adapter with this name is already loaded",
            ));
        }
        self.adapters.push(adapter);
        Ok(())
    }

    /// Load a PEFT adapter folder under `name` (inactive).
    pub fn load(&mut self, dir: &Path, name: &str, model: &ModelConfig) -> Result<()> {
        if self.get(name).is_some() {
            return Err(ModelError::adapter(
                name,
                "an adapter with this name is already loaded",
            ));
        }
        self.adapters.push(Adapter::load(dir, name, model)?);
        Ok(())
    }

    /// Remove an adapter that is not merged.
    pub fn remove(&mut self, name: &str) -> Result<Adapter> {
        if self.merged.iter().any(|m| m == name) {
            return Err(ModelError::adapter(
                name,
                "is merged into the base weights; unmerge first",
            ));
        }
        let i = self
            .adapters
            .iter()
            .position(|a| a.name == name)
            .ok_or_else(|| self.unknown(name))?;
        self.active.retain(|a| a != name);
        Ok(self.adapters.remove(i))
    }

    fn unknown(&self, name: &str) -> ModelError {
        ModelError::adapter(
            name,
            format!("no such adapter (loaded: {})", self.names().join(", ")),
        )
    }

    pub fn names(&self) -> Vec<&str> {
        self.adapters.iter().map(|a| a.name.as_str()).collect()
    }

    pub fn get(&self, name: &str) -> Option<&Adapter> {
        self.adapters.iter().find(|a| a.name == name)
    }

    pub fn get_mut(&mut self, name: &str) -> Option<&mut Adapter> {
        self.adapters.iter_mut().find(|a| a.name == name)
    }

    fn refuse_while_merged(&self, what: &str) -> Result<()> {
        match self.merged.first() {
            Some(m) => Err(ModelError::adapter(
                m,
                format!("is merged into the base weights; unmerge before you {what}"),
            )),
            None => Ok(()),
        }
    }

    /// Make exactly `names` active (an empty list disables all).
    pub fn set_active(&mut self, names: &[&str]) -> Result<()> {
        self.refuse_while_merged("change the active adapters")?;
        for n in names {
            if self.get(n).is_none() {
                return Err(self.unknown(n));
            }
        }
        self.active = names.iter().map(|s| s.to_string()).collect();
        self.active.dedup();
        Ok(())
    }

    /// Make `name` the only active adapter.
    pub fn activate(&mut self, name: &str) -> Result<()> {
        self.set_active(&[name])
    }

    /// No adapter active: the model computes with its base weights only.
    pub fn disable_all(&mut self) -> Result<()> {
        self.set_active(&[])
    }

    pub fn active_names(&self) -> &[String] {
        &self.active
    }

    pub fn merged_names(&self) -> &[String] {
        &self.merged
    }

    pub fn active(&self) -> Vec<&Adapter> {
        self.active.iter().filter_map(|n| self.get(n)).collect()
    }

    /// The modules to apply in separate mode at one projection: those of the active
    /// adapters that are not merged.
    pub fn active_modules(&self, layer: usize, projection: Projection) -> Vec<&LoraModule> {
        self.active()
            .into_iter()
            .filter(|a| !self.merged.contains(&a.name))
            .filter_map(|a| a.find(layer, projection))
            .collect()
    }

    /// Merge every active, not yet merged adapter into `weights` (W += s B A per module,
    /// in f32, rounded once). With `safe`, every merged weight is computed and checked
    /// finite before any is changed, so a refusal leaves the model untouched.
    pub fn merge(&mut self, weights: &mut ModelWeights, safe: bool) -> Result<()> {
        let to_merge: Vec<String> = self
            .active
            .iter()
            .filter(|n| !self.merged.contains(n))
            .cloned()
            .collect();
        let groups = self.groups(&to_merge, weights)?;
        if safe {
            for ((layer, p), modules) in &groups {
                let w = weights
                    .projection(*layer, *p)
                    .ok_or_else(|| ModelError::lora("layer vanished"))?;
                let label = module_label(modules);
                check_finite(&merged_values(w, modules, 1.0, &label)?, &label)?;
            }
        }
        for ((layer, p), modules) in &groups {
            let w = weights
                .projection_mut(*layer, *p)
                .ok_or_else(|| ModelError::lora("layer vanished"))?;
            merge_into(w, modules, false)?;
        }
        self.merged.extend(to_merge);
        Ok(())
    }

    /// Subtract every merged adapter from `weights`, restoring the base up to one rounding.
    pub fn unmerge(&mut self, weights: &mut ModelWeights) -> Result<()> {
        let merged = self.merged.clone();
        let groups = self.groups(&merged, weights)?;
        for ((layer, p), modules) in &groups {
            let w = weights
                .projection_mut(*layer, *p)
                .ok_or_else(|| ModelError::lora("layer vanished"))?;
            unmerge_from(w, modules)?;
        }
        self.merged.clear();
        Ok(())
    }

    /// The modules of `names` grouped by the projection they change, each checked to fit
    /// `weights` before anything is modified.
    #[allow(clippy::type_complexity)]
    fn groups(
        &self,
        names: &[String],
        weights: &ModelWeights,
    ) -> Result<BTreeMap<(usize, Projection), Vec<&LoraModule>>> {
        let mut groups: BTreeMap<(usize, Projection), Vec<&LoraModule>> = BTreeMap::new();
        for n in names {
            let a = self.get(n).ok_or_else(|| self.unknown(n))?;
            for m in &a.modules {
                let t = &m.target;
                let w = weights.projection(t.layer, t.projection).ok_or_else(|| {
                    ModelError::adapter(
                        n,
                        format!(
                            "targets `{}` but the model has {} layers",
                            t.module,
                            weights.layers.len()
                        ),
                    )
                })?;
                if w.shape() != [t.out_features, t.in_features] {
                    return Err(ModelError::ShapeMismatch {
                        name: format!("{}.weight (adapter `{n}`)", t.module),
                        file: PathBuf::from("(model in memory)"),
                        expected: vec![t.out_features, t.in_features],
                        found: w.shape().to_vec(),
                    });
                }
                groups.entry((t.layer, t.projection)).or_default().push(m);
            }
        }
        Ok(groups)
    }
}

/// Files copied beside the merged weights when the base folder has them.
const COPIED_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
];

/// Write the base model of `model_dir` with `adapters` merged (their deltas added) as a
/// Hugging Face folder at `out_dir` that transformers loads: bf16 safetensors (sharded
/// above 5 GB), config.json and tokenizer files copied. See [`export_merged_with`].
pub fn export_merged(model_dir: &Path, adapters: &[&Adapter], out_dir: &Path) -> Result<()> {
    export_merged_with(model_dir, adapters, out_dir, DEFAULT_MAX_SHARD_BYTES)
}

/// [`export_merged`] with a shard size. Each merged weight is computed in f32 from the
/// base weight and rounded once to bf16; a non-finite result is an error (safe merge).
/// Tensors are produced one at a time. Everything is written into a temporary folder
/// inside `out_dir` and moved into place at the end (config.json last), so a failure
/// leaves `out_dir` as it was.
pub fn export_merged_with(
    model_dir: &Path,
    adapters: &[&Adapter],
    out_dir: &Path,
    max_shard_bytes: u64,
) -> Result<()> {
    export_merged_checked(model_dir, adapters, out_dir, max_shard_bytes, true)
}

/// [`export_merged_with`] with the safety check optional: with `safe = false` (PEFT's
/// `safe_merge=False`) a merged weight is written even if it holds inf or NaN.
pub fn export_merged_checked(
    model_dir: &Path,
    adapters: &[&Adapter],
    out_dir: &Path,
    max_shard_bytes: u64,
    safe: bool,
) -> Result<()> {
    io::create_dir_all(out_dir)?;
    let same = match (model_dir.canonicalize(), out_dir.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if same {
        return Err(ModelError::lora(format!(
            "export_merged: the output folder {} is the model folder",
            out_dir.display()
        )));
    }
    // Reading the config checks the architecture is one we understand.
    ModelConfig::from_dir(model_dir)?;
    let weights = Weights::open(model_dir)?;

    let mut by_weight: HashMap<String, Vec<&LoraModule>> = HashMap::new();
    for a in adapters {
        for m in &a.modules {
            let t = &m.target;
            let name = format!("{}.weight", t.module);
            let shape = weights
                .shape(&name)
                .ok_or_else(|| ModelError::MissingTensor {
                    name: name.clone(),
                    searched: format!("{} (targeted by adapter `{}`)", model_dir.display(), a.name),
                })?;
            if shape != [t.out_features, t.in_features] {
                return Err(ModelError::ShapeMismatch {
                    name: format!("{name} (adapter `{}`)", a.name),
                    file: weights.file_of(&name).unwrap_or(model_dir).to_path_buf(),
                    expected: vec![t.out_features, t.in_features],
                    found: shape.to_vec(),
                });
            }
            by_weight.entry(name).or_default().push(m);
        }
    }

    let specs: Vec<TensorSpec> = weights
        .names()
        .iter()
        .map(|n| TensorSpec::new(n.clone(), weights.shape(n).unwrap_or(&[]), DType::BF16))
        .collect();

    let staging = out_dir.join(format!(".tigon-export-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    io::create_dir_all(&staging)?;
    let result = (|| {
        let written = save_sharded(&staging, &specs, max_shard_bytes, |_, spec| match by_weight
            .get(&spec.name)
        {
            Some(modules) => {
                let base = weights.get_any_shape(&spec.name, DType::F32)?;
                let values = merged_values(&base, modules, 1.0, &spec.name)?;
                if safe {
                    check_finite(&values, &spec.name)?;
                }
                Ok(MaybeOwned::Owned(Tensor::from_f32_as(
                    &spec.shape,
                    values,
                    DType::BF16,
                )?))
            }
            None => Ok(MaybeOwned::Owned(
                weights.get_any_shape(&spec.name, DType::BF16)?,
            )),
        })?;
        let mut names: Vec<String> = written
            .iter()
            .filter_map(|p| p.file_name().map(|f| f.to_string_lossy().into_owned()))
            .collect();
        for f in COPIED_FILES {
            let src = model_dir.join(f);
            if src.is_file() {
                io::copy_atomic(&src, &staging.join(f))?;
                names.push(f.to_string());
            }
        }
        io::copy_atomic(&model_dir.join("config.json"), &staging.join("config.json"))?;
        names.push("config.json".into());
        // The layout not written must not linger: transformers prefers model.safetensors.
        let stale = if names.iter().any(|n| n == INDEX_FILE) {
            SINGLE_FILE
        } else {
            INDEX_FILE
        };
        match std::fs::remove_file(out_dir.join(stale)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(ModelError::io(&out_dir.join(stale), e))
            }
            _ => {}
        }
        for n in &names {
            std::fs::rename(staging.join(n), out_dir.join(n))
                .map_err(|e| ModelError::io(&out_dir.join(n), e))?;
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&staging);
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::test_dir::TestDir;
    use crate::weights::random_model;
    use half::bf16;
    use safetensors::SafeTensors;

    fn parse(text: &str) -> Result<LoraConfig> {
        LoraConfig::from_json_str(text, Path::new("/a/adapter_config.json"))
    }

    fn cfg(targets: TargetModules) -> LoraConfig {
        LoraConfig {
            r: 4,
            lora_alpha: 8.0,
            target_modules: Some(targets),
            ..Default::default()
        }
    }

    fn names(list: &[&str]) -> TargetModules {
        TargetModules::Names(list.iter().map(|s| s.to_string()).collect())
    }

    /// An adapter_config.json as PEFT 0.1x writes it, with fields we ignore.
    const PEFT_CONFIG: &str = r#"{
      "alpha_pattern": {},
      "auto_mapping": null,
      "base_model_name_or_path": "meta-llama/Llama-3.2-1B",
      "bias": "none",
      "corda_config": null,
      "eva_config": null,
      "exclude_modules": null,
      "fan_in_fan_out": false,
      "inference_mode": true,
      "init_lora_weights": true,
      "layer_replication": null,
      "layers_pattern": null,
      "layers_to_transform": null,
      "loftq_config": {},
      "lora_alpha": 32,
      "lora_bias": false,
      "lora_dropout": 0.05,
      "megatron_config": null,
      "megatron_core": "megatron.core",
      "modules_to_save": null,
      "peft_type": "LORA",
      "r": 16,
      "rank_pattern": {},
      "revision": null,
      "target_modules": ["v_proj", "q_proj", "down_proj"],
      "task_type": "CAUSAL_LM",
      "trainable_token_indices": null,
      "use_dora": false,
      "use_rslora": false
    }"#;

    #[test]
    fn parses_a_peft_written_config() {
        let c = parse(PEFT_CONFIG).unwrap();
        assert_eq!((c.r, c.lora_alpha, c.lora_dropout), (16, 32.0, 0.05));
        assert_eq!(
            c.target_modules,
            Some(names(&["v_proj", "q_proj", "down_proj"]))
        );
        assert_eq!(c.init_lora_weights, LoraInit::KaimingUniform);
        assert_eq!(
            c.base_model_name_or_path.as_deref(),
            Some("meta-llama/Llama-3.2-1B")
        );
        assert!(c.inference_mode && !c.use_rslora);
        // Our own output parses back to the same config.
        let again = parse(&c.to_peft_json().to_string()).unwrap();
        assert_eq!(
            again,
            LoraConfig {
                target_modules: Some(names(&["down_proj", "q_proj", "v_proj"])),
                ..c
            }
        );
        let t =
            parse(r#"{"target_modules": "ALL-LINEAR", "init_lora_weights": "gaussian"}"#).unwrap();
        assert_eq!(t.target_modules, Some(TargetModules::AllLinear));
        assert_eq!(t.init_lora_weights, LoraInit::Gaussian);
        assert_eq!((t.r, t.lora_alpha), (8, 8.0));
    }

    #[test]
    fn unsupported_peft_features_are_refused_by_name() {
        for (json, field) in [
            (r#"{"use_dora": true}"#, "use_dora"),
            (r#"{"bias": "all"}"#, "bias"),
            (r#"{"fan_in_fan_out": true}"#, "fan_in_fan_out"),
            (r#"{"modules_to_save": ["lm_head"]}"#, "modules_to_save"),
            (r#"{"init_lora_weights": "pissa"}"#, "init_lora_weights"),
            (r#"{"peft_type": "IA3"}"#, "peft_type"),
            (r#"{"r": 0}"#, "r"),
            (r#"{"lora_alpha": "big"}"#, "lora_alpha"),
            (r#"{"rank_pattern": {"q_proj": -2}}"#, "rank_pattern.q_proj"),
            (r#"{"target_modules": 3}"#, "target_modules"),
            (r#"{"target_modules": "(unclosed"}"#, "(lora config)"),
            (r#"{"lora_dropout": 1.5}"#, "(lora config)"),
        ] {
            match parse(json) {
                Err(ModelError::InvalidField { field: f, path, .. }) => {
                    assert_eq!(f, field, "{json}");
                    assert!(path.ends_with("adapter_config.json"));
                }
                other => panic!("{json}: {other:?}"),
            }
        }
        assert!(matches!(parse("{"), Err(ModelError::Json { .. })));
    }

    #[test]
    fn target_matching_follows_peft() {
        let model = ModelConfig::tiny_qwen3();
        let modules = |c: &LoraConfig| -> Vec<String> {
            c.resolve(&model)
                .unwrap()
                .into_iter()
                .map(|t| t.module)
                .collect()
        };
        // Default targets: q_proj and v_proj.
        assert_eq!(
            modules(&LoraConfig::default()),
            [
                "model.layers.0.self_attn.q_proj",
                "model.layers.0.self_attn.v_proj",
                "model.layers.1.self_attn.q_proj",
                "model.layers.1.self_attn.v_proj"
            ]
        );
        assert_eq!(modules(&cfg(TargetModules::AllLinear)).len(), 14);
        // A full module name matches itself only.
        assert_eq!(
            modules(&cfg(names(&["model.layers.1.mlp.up_proj"]))),
            ["model.layers.1.mlp.up_proj"]
        );
        // A partial path matches as a dotted suffix, never inside a segment.
        assert_eq!(modules(&cfg(names(&["mlp.down_proj"]))).len(), 2);
        assert!(cfg(names(&["own_proj"])).resolve(&model).is_err());
        // A regex must match the whole name.
        assert_eq!(
            modules(&cfg(TargetModules::Regex(
                r".*\.0\.self_attn\.(k|o)_proj".into()
            ))),
            [
                "model.layers.0.self_attn.k_proj",
                "model.layers.0.self_attn.o_proj"
            ]
        );
        assert!(cfg(TargetModules::Regex("q_proj".into()))
            .resolve(&model)
            .is_err());
        // exclude_modules and layers_to_transform.
        let mut c = cfg(TargetModules::AllLinear);
        c.exclude_modules = Some(names(&["mlp.gate_proj", "o_proj"]));
        c.layers_to_transform = Some(vec![1]);
        assert_eq!(
            modules(&c),
            [
                "model.layers.1.self_attn.q_proj",
                "model.layers.1.self_attn.k_proj",
                "model.layers.1.self_attn.v_proj",
                "model.layers.1.mlp.up_proj",
                "model.layers.1.mlp.down_proj"
            ]
        );
        c.layers_pattern = vec!["blocks".into()];
        assert!(
            c.resolve(&model).is_err(),
            "no module has a `blocks` segment"
        );
        // LoRA on the head, embeddings or norms is refused by name.
        for bad in ["lm_head", "embed_tokens", "q_norm"] {
            let e = cfg(names(&[bad])).resolve(&model).unwrap_err();
            assert!(e.to_string().contains(bad), "{e}");
        }
    }

    #[test]
    fn rank_and_alpha_patterns_first_match_in_file_order() {
        let model = ModelConfig::tiny_llama();
        let c = parse(
            r#"{"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj", "down_proj"],
                "rank_pattern": {"model.layers.1.self_attn.q_proj": 2, "q_proj": 4,
                                 "layers\\.[01]\\.mlp\\.down_proj": 6},
                "alpha_pattern": {"v_proj": 3.5}}"#,
        )
        .unwrap();
        let t = c.resolve(&model).unwrap();
        let get = |m: &str| t.iter().find(|x| x.module == m).unwrap();
        let q0 = get("model.layers.0.self_attn.q_proj");
        assert_eq!((q0.r, q0.alpha, q0.scaling), (4, 16.0, 4.0));
        let q1 = get("model.layers.1.self_attn.q_proj");
        assert_eq!((q1.r, q1.scaling), (2, 8.0));
        let v0 = get("model.layers.0.self_attn.v_proj");
        assert_eq!((v0.r, v0.alpha, v0.scaling), (8, 3.5, 3.5 / 8.0));
        let d1 = get("model.layers.1.mlp.down_proj");
        assert_eq!(d1.r, 6);
        assert_eq!((d1.in_features, d1.out_features), (168, 96));
        // Key order in the file decides: with the generic key first, it wins for layer 1.
        let c2 = parse(
            r#"{"target_modules": ["q_proj"],
                "rank_pattern": {"q_proj": 4, "model.layers.1.self_attn.q_proj": 2}}"#,
        )
        .unwrap();
        assert!(c2.resolve(&model).unwrap().iter().all(|t| t.r == 4));
        // A key matches whole dotted segments only: "proj" is not a suffix match.
        let c3 = parse(r#"{"target_modules": ["q_proj"], "rank_pattern": {"proj": 2}}"#).unwrap();
        assert!(c3.resolve(&model).unwrap().iter().all(|t| t.r == 8));
        // rsLoRA: alpha / sqrt(r).
        let mut c4 = cfg(names(&["q_proj"]));
        c4.use_rslora = true;
        c4.r = 16;
        assert_eq!(c4.resolve(&model).unwrap()[0].scaling, 8.0 / 4.0);
    }

    #[test]
    fn kaiming_bound_and_init_statistics() {
        // torch: bound = sqrt(3) * sqrt(2 / (1 + 5)) / sqrt(fan_in) = 1 / sqrt(fan_in).
        for fan_in in [1usize, 96, 4096] {
            let b = kaiming_uniform_bound(fan_in);
            assert!((b - 1.0 / (fan_in as f64).sqrt()).abs() < 1e-15 * b.max(1.0));
        }
        let model = ModelConfig::llama_3_2_1b();
        let c = LoraConfig {
            r: 16,
            target_modules: Some(names(&["model.layers.0.mlp.down_proj"])),
            ..Default::default()
        };
        let a = Adapter::new("x", c.clone(), &model, 3).unwrap();
        let m = &a.modules[0];
        assert_eq!(m.a.shape(), &[16, 8192]);
        assert_eq!(m.b.shape(), &[2048, 16]);
        let av = m.a.to_f32_vec().unwrap();
        let bound = 1.0 / (8192f64).sqrt();
        let n = av.len() as f64;
        let mean = av.iter().map(|&x| x as f64).sum::<f64>() / n;
        let var = av.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
        let max = av.iter().fold(0f64, |m, &x| m.max((x as f64).abs()));
        // bound rounds to f32 before sampling, hence the 1e-6 slack.
        assert!(
            max <= bound * (1.0 + 1e-6) && max > 0.999 * bound,
            "max {max} bound {bound}"
        );
        // U(-b, b): mean 0 (sd b/sqrt(3n)), variance b^2/3.
        assert!(mean.abs() < 4.0 * bound / (3.0 * n).sqrt(), "mean {mean}");
        assert!(
            (var / (bound * bound / 3.0) - 1.0).abs() < 0.02,
            "var {var}"
        );
        assert!(m.b.to_f32_vec().unwrap().iter().all(|&x| x == 0.0));

        // Gaussian: std 1/r.
        let g = Adapter::new(
            "g",
            LoraConfig {
                init_lora_weights: LoraInit::Gaussian,
                ..c.clone()
            },
            &model,
            3,
        )
        .unwrap();
        let gv = g.modules[0].a.to_f32_vec().unwrap();
        let sd = (gv.iter().map(|&x| (x as f64).powi(2)).sum::<f64>() / gv.len() as f64).sqrt();
        assert!((sd * 16.0 - 1.0).abs() < 0.02, "sd {sd}");
        // init false: B kaiming with fan_in r.
        let r = Adapter::new(
            "r",
            LoraConfig {
                init_lora_weights: LoraInit::Random,
                ..c
            },
            &model,
            3,
        )
        .unwrap();
        let bv = r.modules[0].b.to_f32_vec().unwrap();
        let bmax = bv.iter().fold(0f32, |m, &x| m.max(x.abs()));
        assert!(bmax <= 0.25 && bmax > 0.24);
        // Same seed, same adapter.
        let again = Adapter::new("y", a.config.clone(), &model, 3).unwrap();
        assert_eq!(again.modules[0].a.to_f32_vec().unwrap(), av);
    }

    fn random_adapter(
        name: &str,
        model: &ModelConfig,
        targets: TargetModules,
        seed: u64,
    ) -> Adapter {
        let c = LoraConfig {
            r: 3,
            lora_alpha: 5.0,
            target_modules: Some(targets),
            init_lora_weights: LoraInit::Random,
            rank_pattern: vec![("o_proj".into(), 2)],
            ..Default::default()
        };
        Adapter::new(name, c, model, seed).unwrap()
    }

    #[test]
    fn save_load_roundtrip_with_peft_key_names() {
        let model = ModelConfig::tiny_qwen2();
        let a = random_adapter("first", &model, TargetModules::AllLinear, 11);
        let dir = TestDir::new("adapter");
        a.save(dir.path()).unwrap();

        let bytes = std::fs::read(dir.path().join(ADAPTER_WEIGHTS_FILE)).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let mut keys: Vec<String> = st.names().into_iter().map(String::from).collect();
        keys.sort();
        assert_eq!(keys.len(), 2 * 7 * 2);
        assert_eq!(
            keys[0],
            "base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"
        );
        assert!(keys.contains(
            &"base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight".to_string()
        ));
        let qa = st
            .tensor("base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight")
            .unwrap();
        assert_eq!(qa.shape(), &[3, 64]);
        assert_eq!(format!("{:?}", qa.dtype()), "F32");
        let ob = st
            .tensor("base_model.model.model.layers.0.self_attn.o_proj.lora_B.weight")
            .unwrap();
        assert_eq!(ob.shape(), &[64, 2]);

        let cfg: Value = serde_json::from_str(
            &std::fs::read_to_string(dir.path().join(ADAPTER_CONFIG_FILE)).unwrap(),
        )
        .unwrap();
        assert_eq!(cfg["peft_type"], json!("LORA"));
        assert_eq!(cfg["r"], json!(3));
        assert_eq!(cfg["lora_alpha"], json!(5));
        assert_eq!(cfg["rank_pattern"], json!({"o_proj": 2}));
        assert_eq!(cfg["init_lora_weights"], json!(false));
        assert_eq!(cfg["target_modules"].as_array().unwrap().len(), 7);
        assert_eq!(cfg["task_type"], json!("CAUSAL_LM"));

        let b = Adapter::load(dir.path(), "second", &model).unwrap();
        assert_eq!(b.name, "second");
        assert_eq!(b.modules.len(), a.modules.len());
        for (x, y) in a.modules.iter().zip(&b.modules) {
            assert_eq!(x.target, y.target);
            assert_eq!(x.a.to_f32_vec().unwrap(), y.a.to_f32_vec().unwrap());
            assert_eq!(x.b.to_f32_vec().unwrap(), y.b.to_f32_vec().unwrap());
        }
    }

    /// Write adapter tensors under arbitrary keys and dtypes, as other tools might.
    fn write_adapter_file(dir: &Path, tensors: &[(String, Tensor)]) {
        let refs: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        crate::weights::write_safetensors(&dir.join(ADAPTER_WEIGHTS_FILE), &refs).unwrap();
    }

    #[test]
    fn load_accepts_default_keys_and_bf16_and_names_bad_tensors() {
        let model = ModelConfig::tiny_llama();
        let a = random_adapter("x", &model, names(&["k_proj"]), 2);
        let dir = TestDir::new("adapter2");
        a.save(dir.path()).unwrap();
        let entries = |rename: &dyn Fn(&str) -> String, dtype: DType| -> Vec<(String, Tensor)> {
            let mut out = vec![];
            for m in &a.modules {
                for (mat, t) in [(LoraMatrix::A, &m.a), (LoraMatrix::B, &m.b)] {
                    let v = t.to_f32_vec().unwrap();
                    out.push((
                        rename(&m.target.peft_key(mat)),
                        Tensor::from_f32_as(t.shape(), v, dtype).unwrap(),
                    ));
                }
            }
            out
        };
        // In-memory PEFT names (".default") and bf16 storage.
        let with_default = |k: &str| k.replace(".weight", ".default.weight");
        write_adapter_file(dir.path(), &entries(&with_default, DType::BF16));
        let b = Adapter::load(dir.path(), "x", &model).unwrap();
        let want: Vec<f32> = a.modules[1]
            .a
            .to_f32_vec()
            .unwrap()
            .iter()
            .map(|&x| bf16::from_f32(x).to_f32())
            .collect();
        assert_eq!(b.modules[1].a.to_f32_vec().unwrap(), want);
        assert_eq!(b.modules[1].a.dtype(), DType::F32);

        // A missing B names the key and the file.
        let mut e = entries(&|k: &str| k.to_string(), DType::F32);
        e.retain(|(n, _)| n != "base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight");
        write_adapter_file(dir.path(), &e);
        let err = Adapter::load(dir.path(), "x", &model).unwrap_err();
        assert!(
            matches!(err, ModelError::MissingTensor { ref name, .. } if name == "base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight"),
            "{err}"
        );
        assert!(err.to_string().contains(ADAPTER_WEIGHTS_FILE));

        // A rank that disagrees with adapter_config.json: expected vs found shapes.
        let mut e = entries(&|k: &str| k.to_string(), DType::F32);
        e[0].1 = Tensor::from_f32(&[5, 96], vec![0.1; 5 * 96]).unwrap();
        write_adapter_file(dir.path(), &e);
        match Adapter::load(dir.path(), "x", &model).unwrap_err() {
            ModelError::ShapeMismatch {
                name,
                expected,
                found,
                ..
            } => {
                assert_eq!(
                    name,
                    "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"
                );
                assert_eq!((expected, found), (vec![3, 96], vec![5, 96]));
            }
            other => panic!("{other}"),
        }

        // A tensor the config does not target.
        let mut e = entries(&|k: &str| k.to_string(), DType::F32);
        e.push((
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight".into(),
            Tensor::from_f32(&[3, 96], vec![0.0; 288]).unwrap(),
        ));
        write_adapter_file(dir.path(), &e);
        let err = Adapter::load(dir.path(), "x", &model).unwrap_err();
        assert!(matches!(err, ModelError::Adapter { .. }), "{err}");
        assert!(err.to_string().contains("q_proj.lora_A"), "{err}");
    }

    fn naive_merge(w: &[f32], modules: &[&LoraModule], sign: f64) -> Vec<f64> {
        let (out_f, in_f) = (
            modules[0].target.out_features,
            modules[0].target.in_features,
        );
        let mut res: Vec<f64> = w.iter().map(|&x| x as f64).collect();
        for m in modules {
            let a = m.a.to_f32_vec().unwrap();
            let b = m.b.to_f32_vec().unwrap();
            let r = m.target.r;
            for o in 0..out_f {
                for i in 0..in_f {
                    let mut s = 0f64;
                    for k in 0..r {
                        s += b[o * r + k] as f64 * a[k * in_f + i] as f64;
                    }
                    res[o * in_f + i] += sign * m.target.scaling * s;
                }
            }
        }
        res
    }

    #[test]
    fn merge_matches_naive_f64_and_unmerge_restores() {
        let model = ModelConfig::tiny_llama();
        let a1 = random_adapter("a1", &model, names(&["o_proj", "up_proj"]), 4);
        let a2 = random_adapter("a2", &model, names(&["up_proj"]), 5);
        let mut rng = Rng::new(9);
        let (out_f, in_f) = model.projection_shape(Projection::Up);
        let w0 = rng.normal_vec(out_f * in_f, 0.05);
        let mods = [
            a1.find(1, Projection::Up).unwrap(),
            a2.find(1, Projection::Up).unwrap(),
        ];
        let reference = naive_merge(&w0, &mods, 1.0);

        // f32 weight: close to the f64 result at f32 precision.
        let mut w = Tensor::from_f32(&[out_f, in_f], w0.clone()).unwrap();
        merge_into(&mut w, &mods, true).unwrap();
        let got = w.to_f32_vec().unwrap();
        let max_ref = reference.iter().fold(0f64, |m, x| m.max(x.abs()));
        for (g, r) in got.iter().zip(&reference) {
            assert!((*g as f64 - r).abs() <= 2e-6 * max_ref, "{g} vs {r}");
        }
        let delta_norm = reference
            .iter()
            .zip(&w0)
            .map(|(r, w)| (r - *w as f64).abs())
            .fold(0f64, f64::max);
        assert!(
            delta_norm > 1e-3,
            "the adapter must change W for the test to mean anything"
        );
        unmerge_from(&mut w, &mods).unwrap();
        for (g, w) in w.to_f32_vec().unwrap().iter().zip(&w0) {
            assert!((g - w).abs() <= 2e-6 * max_ref as f32);
        }

        // bf16 weight: the f64 result rounded once, within one bf16 rounding of it.
        let w_bf: Vec<f32> = w0.iter().map(|&x| bf16::from_f32(x).to_f32()).collect();
        let reference = naive_merge(&w_bf, &mods, 1.0);
        let mut w = Tensor::from_f32_as(&[out_f, in_f], w_bf.clone(), DType::BF16).unwrap();
        merge_into(&mut w, &mods, true).unwrap();
        let got = w.to_f32_vec().unwrap();
        let mut exact = 0;
        for (g, r) in got.iter().zip(&reference) {
            // Half a bf16 ulp of the result, plus the f32 arithmetic's absolute error, which
            // shows where W and the delta nearly cancel.
            let ulp = 2f64.powi((r.abs().max(1e-30)).log2().floor() as i32 - 7);
            assert!(
                (*g as f64 - r).abs() <= 0.5 * ulp + 1e-6 * max_ref,
                "{g} vs {r}"
            );
            exact += (*g == bf16::from_f64(*r).to_f32()) as usize;
        }
        // Rounding the f32 sum instead of the f64 one may differ only at exact ties.
        assert!(
            exact as f64 >= 0.999 * got.len() as f64,
            "{exact} of {}",
            got.len()
        );
        unmerge_from(&mut w, &mods).unwrap();
        for ((g, w), m) in w.to_f32_vec().unwrap().iter().zip(&w_bf).zip(&got) {
            // Two roundings, each at most half a bf16 ulp (2^-8 relative) of its result:
            // the merged value, then the restored one.
            let bound = 2f32.powi(-8) * (m.abs() * 1.01 + g.abs()) + 1e-7;
            assert!((g - w).abs() <= bound, "{g} vs {w} (merged {m})");
        }
    }

    #[test]
    fn safe_merge_refuses_non_finite_and_leaves_w_unchanged() {
        let model = ModelConfig::tiny_llama();
        let mut a = random_adapter("big", &model, names(&["q_proj"]), 1);
        a.modules[0].b = Tensor::from_f32(&[96, 3], vec![1e30; 288]).unwrap();
        a.modules[0].a = Tensor::from_f32(&[3, 96], vec![1e10; 288]).unwrap();
        let w0: Vec<f32> = (0..96 * 96).map(|i| i as f32 * 1e-3).collect();
        let mut w = Tensor::from_f32(&[96, 96], w0.clone()).unwrap();
        let e = merge_into(&mut w, &[&a.modules[0]], true).unwrap_err();
        assert!(
            matches!(e, ModelError::NonFinite { ref module, .. } if module == "model.layers.0.self_attn.q_proj"),
            "{e}"
        );
        assert_eq!(w.to_f32_vec().unwrap(), w0);
        // Unsafe merge goes through.
        merge_into(&mut w, &[&a.modules[0]], false).unwrap();
        assert!(w.to_f32_vec().unwrap().iter().any(|x| !x.is_finite()));
        // A module that does not fit the weight is a shape error.
        let mut small = Tensor::from_f32(&[4, 4], vec![0.0; 16]).unwrap();
        assert!(matches!(
            merge_into(&mut small, &[&a.modules[0]], true),
            Err(ModelError::ShapeMismatch { .. })
        ));
    }

    #[test]
    fn adapter_set_activation_merge_and_unmerge() {
        let model = ModelConfig::tiny_qwen2();
        let dir = TestDir::new("set");
        random_model(&model, 3, dir.path()).unwrap();
        let mut weights = ModelWeights::from_dir(dir.path(), &Device::Cpu, DType::F32).unwrap();
        let base_q = weights.layers[0].q_proj.to_f32_vec().unwrap();
        let base_up = weights.layers[1].up_proj.to_f32_vec().unwrap();

        let mut set = AdapterSet::new();
        set.add(random_adapter("a", &model, names(&["q_proj"]), 1))
            .unwrap();
        let bdir = TestDir::new("setb");
        random_adapter("b", &model, names(&["q_proj", "up_proj"]), 2)
            .save(bdir.path())
            .unwrap();
        set.load(bdir.path(), "b", &model).unwrap();
        assert!(
            set.load(bdir.path(), "b", &model).is_err(),
            "duplicate name"
        );
        assert!(set.activate("nope").is_err());
        assert!(set.active_modules(0, Projection::Q).is_empty());

        set.set_active(&["a", "b"]).unwrap();
        assert_eq!(set.active_modules(0, Projection::Q).len(), 2);
        assert_eq!(set.active_modules(1, Projection::Up).len(), 1);
        set.activate("a").unwrap();
        assert_eq!(set.active_modules(1, Projection::Up).len(), 0);
        set.disable_all().unwrap();
        assert!(set.active_modules(0, Projection::Q).is_empty());

        // Merge both: W += delta_a + delta_b; separate-mode modules are then empty.
        set.set_active(&["a", "b"]).unwrap();
        let expected_q = {
            let mods = [
                set.get("a").unwrap().find(0, Projection::Q).unwrap(),
                set.get("b").unwrap().find(0, Projection::Q).unwrap(),
            ];
            naive_merge(&base_q, &mods, 1.0)
        };
        set.merge(&mut weights, true).unwrap();
        assert_eq!(set.merged_names(), ["a", "b"]);
        assert!(set.active_modules(0, Projection::Q).is_empty());
        for (g, r) in weights.layers[0]
            .q_proj
            .to_f32_vec()
            .unwrap()
            .iter()
            .zip(&expected_q)
        {
            assert!((*g as f64 - r).abs() < 1e-6);
        }
        assert!(
            set.activate("a").is_err(),
            "activation changes are refused while merged"
        );
        assert!(set.remove("a").is_err());
        set.unmerge(&mut weights).unwrap();
        assert!(set.merged_names().is_empty());
        for (g, w) in weights.layers[0]
            .q_proj
            .to_f32_vec()
            .unwrap()
            .iter()
            .zip(&base_q)
        {
            assert!((g - w).abs() < 1e-6);
        }
        for (g, w) in weights.layers[1]
            .up_proj
            .to_f32_vec()
            .unwrap()
            .iter()
            .zip(&base_up)
        {
            assert!((g - w).abs() < 1e-6);
        }
        // A failing safe merge leaves every weight untouched, even those it would merge first.
        set.get_mut("b").unwrap().modules[3].b =
            Tensor::from_f32(&[136, 3], vec![f32::INFINITY; 408]).unwrap();
        let before = weights.layers[0].q_proj.to_f32_vec().unwrap();
        assert!(matches!(
            set.merge(&mut weights, true),
            Err(ModelError::NonFinite { .. })
        ));
        assert!(set.merged_names().is_empty());
        assert_eq!(weights.layers[0].q_proj.to_f32_vec().unwrap(), before);
        set.remove("b").unwrap();
        assert_eq!(set.names(), ["a"]);
        assert_eq!(set.active_names(), ["a"]);
    }

    #[test]
    fn export_merged_writes_a_loadable_bf16_folder() {
        let model = ModelConfig::tiny_llama();
        let base = TestDir::new("exp-base");
        random_model(&model, 8, base.path()).unwrap();
        std::fs::write(base.path().join("tokenizer.json"), b"{\"tok\": 1}").unwrap();
        let a = random_adapter("a", &model, TargetModules::AllLinear, 6);
        let b = random_adapter("b", &model, names(&["v_proj"]), 7);
        let out = TestDir::new("exp-out");
        // A stale single file from an earlier export must go when we write shards.
        std::fs::write(out.path().join(SINGLE_FILE), b"stale").unwrap();
        export_merged_with(base.path(), &[&a, &b], out.path(), 40_000).unwrap();

        assert!(!out.path().join(SINGLE_FILE).exists());
        assert!(out.path().join(INDEX_FILE).exists());
        assert_eq!(
            std::fs::read(out.path().join("config.json")).unwrap(),
            std::fs::read(base.path().join("config.json")).unwrap()
        );
        assert_eq!(
            std::fs::read(out.path().join("tokenizer.json")).unwrap(),
            b"{\"tok\": 1}"
        );
        let leftovers: Vec<_> = std::fs::read_dir(out.path())
            .unwrap()
            .filter_map(|e| {
                let n = e.unwrap().file_name().to_string_lossy().into_owned();
                n.starts_with('.').then_some(n)
            })
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");

        let merged = ModelWeights::from_dir(out.path(), &Device::Cpu, DType::F32).unwrap();
        let basew = ModelWeights::from_dir(base.path(), &Device::Cpu, DType::F32).unwrap();
        // Untouched tensors are copied exactly.
        assert_eq!(
            merged.embed_tokens.to_f32_vec().unwrap(),
            basew.embed_tokens.to_f32_vec().unwrap()
        );
        // v_proj of layer 1 carries both adapters, rounded once to bf16.
        let mods = [
            a.find(1, Projection::V).unwrap(),
            b.find(1, Projection::V).unwrap(),
        ];
        let reference = naive_merge(&basew.layers[1].v_proj.to_f32_vec().unwrap(), &mods, 1.0);
        let max_ref = reference.iter().fold(0f64, |m, x| m.max(x.abs()));
        for (g, r) in merged.layers[1]
            .v_proj
            .to_f32_vec()
            .unwrap()
            .iter()
            .zip(&reference)
        {
            let ulp = 2f64.powi((r.abs().max(1e-30)).log2().floor() as i32 - 7);
            assert!(
                (*g as f64 - r).abs() <= 0.5 * ulp + 1e-6 * max_ref,
                "{g} vs {r}"
            );
        }
        // An adapter for a different model is refused before anything is written.
        let other = random_adapter("o", &ModelConfig::tiny_qwen2(), names(&["q_proj"]), 1);
        let out2 = TestDir::new("exp-out2");
        let e = export_merged(base.path(), &[&other], out2.path()).unwrap_err();
        assert!(matches!(e, ModelError::ShapeMismatch { .. }), "{e}");
        assert_eq!(std::fs::read_dir(out2.path()).unwrap().count(), 0);
        assert!(export_merged(base.path(), &[&a], base.path()).is_err());
    }

    /// adapter_config.json as PEFT 0.21 writes it: target_modules expanded to full module
    /// names, many fields we ignore.
    #[test]
    fn parses_peft_0_21_config_with_full_module_names() {
        let c = parse(PEFT_0_21_CONFIG).unwrap();
        let t = c.resolve(&ModelConfig::tiny_qwen2()).unwrap();
        assert_eq!(t.len(), 14);
        let get = |m: &str| t.iter().find(|x| x.module == m).unwrap();
        assert_eq!(get("model.layers.0.self_attn.o_proj").r, 2);
        assert_eq!(get("model.layers.1.mlp.down_proj").alpha, 3.0);
        assert_eq!(get("model.layers.0.mlp.down_proj").alpha, 8.0);
        assert_eq!(c.init_lora_weights, LoraInit::Random);
    }

    const PEFT_0_21_CONFIG: &str = r#"{
  "alora_invocation_tokens": null,
  "alpha_pattern": {
    "layers.1.mlp.down_proj": 3.0
  },
  "arrow_config": null,
  "auto_mapping": null,
  "base_model_name_or_path": "qwen2/base",
  "bias": "none",
  "corda_config": null,
  "ensure_weight_tying": false,
  "eva_config": null,
  "exclude_modules": null,
  "fan_in_fan_out": false,
  "inference_mode": true,
  "init_lora_weights": false,
  "kasa_config": null,
  "layer_replication": null,
  "layers_pattern": null,
  "layers_to_transform": null,
  "loftq_config": {},
  "lora_alpha": 8,
  "lora_bias": false,
  "lora_dropout": 0.0,
  "lora_ga_config": null,
  "megatron_config": null,
  "megatron_core": "megatron.core",
  "modules_to_save": null,
  "monteclora_config": null,
  "peft_type": "LORA",
  "peft_version": "0.21.0",
  "qalora_group_size": 16,
  "r": 4,
  "rank_pattern": {
    "o_proj": 2
  },
  "revision": null,
  "target_modules": [
    "model.layers.0.self_attn.k_proj",
    "model.layers.1.mlp.up_proj",
    "model.layers.1.mlp.down_proj",
    "model.layers.0.mlp.up_proj",
    "model.layers.1.mlp.gate_proj",
    "model.layers.0.mlp.gate_proj",
    "model.layers.0.self_attn.q_proj",
    "model.layers.1.self_attn.k_proj",
    "model.layers.1.self_attn.v_proj",
    "model.layers.0.self_attn.v_proj",
    "model.layers.1.self_attn.q_proj",
    "model.layers.0.self_attn.o_proj",
    "model.layers.1.self_attn.o_proj",
    "model.layers.0.mlp.down_proj"
  ],
  "target_parameters": null,
  "task_type": "CAUSAL_LM",
  "trainable_token_indices": null,
  "use_bdlora": null,
  "use_dora": false,
  "use_qalora": false,
  "use_rslora": false,
  "velora_config": null
}"#;
}
