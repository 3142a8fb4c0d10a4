//! Model weights: memory-mapped safetensors files (one `model.safetensors`, or shards listed
//! by `model.safetensors.index.json`), typed loading with shape checks and dtype conversion,
//! the per-layer [`ModelWeights`] of a decoder, and a safetensors writer (atomic, sharded
//! above a size, streaming one tensor at a time so a merged 8B export never holds the whole
//! model in memory).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::tensor::{Dtype as StDtype, Metadata, SafeTensors, TensorInfo};
use serde_json::{json, Map, Value};
use tigon_kernels::rng::Rng;
use tigon_kernels::tensor::{CpuData, Storage};
use tigon_kernels::{cpu, DType, Device, Tensor};

use crate::config::{ModelConfig, Projection};
use crate::error::{ModelError, Result};
use crate::io;

pub const SINGLE_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// Shards above this size start a new file (the size transformers' save_pretrained uses).
pub const DEFAULT_MAX_SHARD_BYTES: u64 = 5_000_000_000;

/// Elements converted per task when decoding a tensor on several threads.
const CONVERT_CHUNK: usize = 1 << 18;

/// One memory-mapped safetensors file with its parsed header.
pub struct SafetensorsFile {
    path: PathBuf,
    mmap: Mmap,
    /// Byte offset of the data section (8-byte length + header).
    data_start: usize,
    meta: Metadata,
}

impl std::fmt::Debug for SafetensorsFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SafetensorsFile({})", self.path.display())
    }
}

impl SafetensorsFile {
    pub fn open(path: &Path) -> Result<SafetensorsFile> {
        let file = File::open(path).map_err(|e| ModelError::io(path, e))?;
        let len = file.metadata().map_err(|e| ModelError::io(path, e))?.len();
        if len < 8 {
            return Err(ModelError::malformed(
                path,
                format!("the file is {len} bytes, shorter than the 8-byte header length"),
            ));
        }
        // SAFETY: the map is read-only and we only read it. As with every memory-mapped
        // checkpoint loader, another process truncating the file while it is mapped is
        // outside what we can guard against.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| ModelError::io(path, e))?;
        let (header_len, meta) = SafeTensors::read_metadata(&mmap).map_err(|e| {
            ModelError::malformed(
                path,
                format!("{e} (the file is {len} bytes: truncated, or not a safetensors file?)"),
            )
        })?;
        Ok(SafetensorsFile {
            path: path.to_path_buf(),
            mmap,
            data_start: 8 + header_len,
            meta,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tensor names in the order of their data in the file.
    pub fn names(&self) -> Vec<String> {
        self.meta.offset_keys()
    }

    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.meta.info(name)
    }

    fn data(&self, info: &TensorInfo) -> &[u8] {
        // read_metadata checked that the offsets tile the data section exactly.
        &self.mmap[self.data_start + info.data_offsets.0..self.data_start + info.data_offsets.1]
    }

    /// Decode tensor `name` as `dtype`, converting from F32/F16/BF16/F64.
    fn load(&self, name: &str, info: &TensorInfo, dtype: DType) -> Result<Tensor> {
        let bytes = self.data(info);
        let n: usize = info.shape.iter().product();
        let src = info.dtype;
        let dtype_error = |detail: String| ModelError::TensorDType {
            name: name.to_string(),
            file: self.path.clone(),
            detail,
        };
        if !matches!(
            src,
            StDtype::F32 | StDtype::F16 | StDtype::BF16 | StDtype::F64
        ) {
            return Err(dtype_error(format!(
                "dtype {src:?} is not a supported floating-point type (F32, F16, BF16, F64)"
            )));
        }
        match dtype {
            DType::F32 => {
                let mut out = vec![0f32; n];
                cpu::par_rows(&mut out, CONVERT_CHUNK, |chunk, dst| {
                    decode_into(
                        bytes,
                        src,
                        chunk * CONVERT_CHUNK,
                        dst,
                        |x| x as f32,
                        |x| x,
                        |b| bf16::from_bits(b).to_f32(),
                    )
                });
                Ok(Tensor::from_f32(&info.shape, out)?)
            }
            DType::BF16 => {
                let mut out = vec![bf16::ZERO; n];
                cpu::par_rows(&mut out, CONVERT_CHUNK, |chunk, dst| {
                    decode_into(
                        bytes,
                        src,
                        chunk * CONVERT_CHUNK,
                        dst,
                        bf16::from_f64,
                        bf16::from_f32,
                        bf16::from_bits,
                    )
                });
                Ok(Tensor::from_bf16(&info.shape, out)?)
            }
            DType::I32 => Err(dtype_error(
                "cannot be loaded as i32 (weights load as f32 or bf16)".into(),
            )),
        }
    }
}

/// Decode elements `start..start + dst.len()` of a little-endian float buffer of dtype `src`
/// (one of F32/F16/BF16/F64) into `dst`. Each source type has its own conversion so that
/// nothing rounds twice: bf16 to bf16 copies bits, f64 to bf16 rounds once.
fn decode_into<T>(
    bytes: &[u8],
    src: StDtype,
    start: usize,
    dst: &mut [T],
    from_f64: impl Fn(f64) -> T,
    from_f32: impl Fn(f32) -> T,
    from_bf16_bits: impl Fn(u16) -> T,
) {
    let width = match src {
        StDtype::F64 => 8,
        StDtype::F32 => 4,
        _ => 2,
    };
    let src_bytes = &bytes[width * start..width * (start + dst.len())];
    let pairs = dst.iter_mut().zip(src_bytes.chunks_exact(width));
    match src {
        StDtype::F32 => pairs.for_each(|(d, b)| {
            *d = from_f32(f32::from_le_bytes([b[0], b[1], b[2], b[3]]));
        }),
        StDtype::F16 => pairs.for_each(|(d, b)| {
            *d = from_f32(f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32());
        }),
        StDtype::BF16 => pairs.for_each(|(d, b)| {
            *d = from_bf16_bits(u16::from_le_bytes([b[0], b[1]]));
        }),
        StDtype::F64 => pairs.for_each(|(d, b)| {
            let mut a = [0u8; 8];
            a.copy_from_slice(b);
            *d = from_f64(f64::from_le_bytes(a));
        }),
        // Callers check the dtype first.
        _ => {}
    }
}

/// The tensors of a model folder (or any set of safetensors files), by name.
pub struct Weights {
    files: Vec<SafetensorsFile>,
    /// Tensor name -> index into `files`.
    map: HashMap<String, usize>,
    /// Names in file order, then data order within each file.
    order: Vec<String>,
}

impl std::fmt::Debug for Weights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Weights({} tensors in {:?})",
            self.order.len(),
            self.files
        )
    }
}

impl Weights {
    /// Open a Hugging Face model folder: `model.safetensors` if present (as transformers
    /// prefers it), else the shards named by `model.safetensors.index.json`.
    pub fn open(dir: &Path) -> Result<Weights> {
        let single = dir.join(SINGLE_FILE);
        if single.is_file() {
            return Self::open_files(&[single]);
        }
        let index = dir.join(INDEX_FILE);
        if !index.is_file() {
            return Err(ModelError::NoWeights {
                dir: dir.to_path_buf(),
            });
        }
        let weight_map = read_index(&index)?;
        let mut shards: Vec<String> = vec![];
        for shard in weight_map.values() {
            if !shards.contains(shard) {
                shards.push(shard.clone());
            }
        }
        let paths: Vec<PathBuf> = shards.iter().map(|s| dir.join(s)).collect();
        let weights = Self::open_files(&paths)?;
        // Every tensor the index promises must be in the shard it names.
        for (name, shard) in &weight_map {
            let path = dir.join(shard);
            let found = weights
                .map
                .get(name)
                .is_some_and(|&i| weights.files[i].path == path);
            if !found {
                return Err(ModelError::MissingTensor {
                    name: name.clone(),
                    searched: format!("{} (where {} says it is)", path.display(), index.display()),
                });
            }
        }
        Ok(weights)
    }

    /// Open a single safetensors file.
    pub fn open_file(path: &Path) -> Result<Weights> {
        Self::open_files(&[path.to_path_buf()])
    }

    /// Open one or more safetensors files as one set of tensors. A name in two files is an
    /// error (which one is meant would be a guess).
    pub fn open_files(paths: &[PathBuf]) -> Result<Weights> {
        let mut files = vec![];
        let mut map = HashMap::new();
        let mut order = vec![];
        for (i, path) in paths.iter().enumerate() {
            let file = SafetensorsFile::open(path)?;
            for name in file.names() {
                if let Some(&j) = map.get(&name) {
                    let other: &SafetensorsFile = &files[j];
                    return Err(ModelError::malformed(
                        path,
                        format!("tensor `{name}` is also in {}", other.path.display()),
                    ));
                }
                map.insert(name.clone(), i);
                order.push(name);
            }
            files.push(file);
        }
        Ok(Weights { files, map, order })
    }

    /// Tensor names, in file order and data order within each file.
    pub fn names(&self) -> &[String] {
        &self.order
    }

    pub fn contains(&self, name: &str) -> bool {
        self.map.contains_key(name)
    }

    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.locate(name)
            .ok()
            .map(|(_, info)| info.shape.as_slice())
    }

    /// The file that holds `name`.
    pub fn file_of(&self, name: &str) -> Option<&Path> {
        self.map.get(name).map(|&i| self.files[i].path())
    }

    pub fn files(&self) -> impl Iterator<Item = &Path> {
        self.files.iter().map(|f| f.path())
    }

    fn searched(&self) -> String {
        let names: Vec<String> = self
            .files
            .iter()
            .map(|f| f.path.display().to_string())
            .collect();
        names.join(", ")
    }

    fn locate(&self, name: &str) -> Result<(&SafetensorsFile, &TensorInfo)> {
        let missing = || ModelError::MissingTensor {
            name: name.to_string(),
            searched: self.searched(),
        };
        let &i = self.map.get(name).ok_or_else(missing)?;
        let file = &self.files[i];
        let info = file.info(name).ok_or_else(missing)?;
        Ok((file, info))
    }

    /// Load tensor `name` as `dtype` (a CPU tensor), checking it has `expected_shape`.
    pub fn get(&self, name: &str, expected_shape: &[usize], dtype: DType) -> Result<Tensor> {
        let (file, info) = self.locate(name)?;
        if info.shape != expected_shape {
            return Err(ModelError::ShapeMismatch {
                name: name.to_string(),
                file: file.path.clone(),
                expected: expected_shape.to_vec(),
                found: info.shape.clone(),
            });
        }
        file.load(name, info, dtype)
    }

    /// Load tensor `name` as `dtype` with whatever shape the file gives it.
    pub fn get_any_shape(&self, name: &str, dtype: DType) -> Result<Tensor> {
        let (file, info) = self.locate(name)?;
        file.load(name, info, dtype)
    }
}

/// The `weight_map` of a shard index: tensor name -> shard file name.
fn read_index(path: &Path) -> Result<BTreeMap<String, String>> {
    let text = io::read_to_string(path)?;
    let value: Value = serde_json::from_str(&text).map_err(|e| ModelError::Json {
        path: path.to_path_buf(),
        source: e,
    })?;
    let Some(Value::Object(map)) = value.get("weight_map") else {
        return Err(ModelError::MissingField {
            path: path.to_path_buf(),
            field: "weight_map".into(),
        });
    };
    let mut out = BTreeMap::new();
    for (name, shard) in map {
        let Some(shard) = shard.as_str() else {
            return Err(ModelError::invalid_field(
                path,
                format!("weight_map.{name}"),
                format!("expected a file name, found {shard}"),
            ));
        };
        // Shards are siblings of the index; anything else is not a Hugging Face folder.
        if shard.contains('/') || shard.contains('\\') || shard == ".." {
            return Err(ModelError::invalid_field(
                path,
                format!("weight_map.{name}"),
                format!("`{shard}` is not a file name in the model folder"),
            ));
        }
        out.insert(name.clone(), shard.to_string());
    }
    Ok(out)
}

/// The weights of one decoder layer, with their Hugging Face names in the comments.
#[derive(Debug)]
pub struct LayerWeights {
    /// `model.layers.{i}.input_layernorm.weight` [hidden]
    pub input_layernorm: Tensor,
    /// `...self_attn.q_proj.weight` [heads*head_dim, hidden]
    pub q_proj: Tensor,
    /// `...self_attn.k_proj.weight` [kv_heads*head_dim, hidden]
    pub k_proj: Tensor,
    pub v_proj: Tensor,
    /// `...self_attn.o_proj.weight` [hidden, heads*head_dim]
    pub o_proj: Tensor,
    /// `...self_attn.{q,k,v}_proj.bias` (Qwen2; Llama/Qwen3 with attention_bias)
    pub q_bias: Option<Tensor>,
    pub k_bias: Option<Tensor>,
    pub v_bias: Option<Tensor>,
    /// `...self_attn.o_proj.bias` (Llama/Qwen3 with attention_bias)
    pub o_bias: Option<Tensor>,
    /// `...self_attn.{q,k}_norm.weight` [head_dim] (Qwen3)
    pub q_norm: Option<Tensor>,
    pub k_norm: Option<Tensor>,
    /// `model.layers.{i}.post_attention_layernorm.weight` [hidden]
    pub post_attention_layernorm: Tensor,
    /// `...mlp.{gate,up}_proj.weight` [intermediate, hidden]
    pub gate_proj: Tensor,
    pub up_proj: Tensor,
    /// `...mlp.down_proj.weight` [hidden, intermediate]
    pub down_proj: Tensor,
}

impl LayerWeights {
    pub fn projection(&self, p: Projection) -> &Tensor {
        match p {
            Projection::Q => &self.q_proj,
            Projection::K => &self.k_proj,
            Projection::V => &self.v_proj,
            Projection::O => &self.o_proj,
            Projection::Gate => &self.gate_proj,
            Projection::Up => &self.up_proj,
            Projection::Down => &self.down_proj,
        }
    }

    pub fn projection_mut(&mut self, p: Projection) -> &mut Tensor {
        match p {
            Projection::Q => &mut self.q_proj,
            Projection::K => &mut self.k_proj,
            Projection::V => &mut self.v_proj,
            Projection::O => &mut self.o_proj,
            Projection::Gate => &mut self.gate_proj,
            Projection::Up => &mut self.up_proj,
            Projection::Down => &mut self.down_proj,
        }
    }
}

/// All weights of a decoder, on one device, in one dtype.
#[derive(Debug)]
pub struct ModelWeights {
    pub config: ModelConfig,
    /// `model.embed_tokens.weight` [vocab, hidden]
    pub embed_tokens: Tensor,
    pub layers: Vec<LayerWeights>,
    /// `model.norm.weight` [hidden]
    pub norm: Tensor,
    /// `lm_head.weight` [vocab, hidden]; None when tied to the embedding.
    pub lm_head: Option<Tensor>,
}

impl ModelWeights {
    /// Read config.json and the weights of a model folder onto `device` as `dtype`.
    pub fn from_dir(dir: &Path, device: &Device, dtype: DType) -> Result<ModelWeights> {
        let config = ModelConfig::from_dir(dir)?;
        let weights = Weights::open(dir)?;
        Self::load(&weights, &config, device, dtype)
    }

    /// Load every tensor `config` calls for from `weights`, checking names and shapes.
    /// Tensors the config does not use (a tied `lm_head.weight`, old `rotary_emb.inv_freq`
    /// buffers) are ignored, as transformers ignores them.
    pub fn load(
        weights: &Weights,
        config: &ModelConfig,
        device: &Device,
        dtype: DType,
    ) -> Result<ModelWeights> {
        Self::load_placed(weights, config, device, dtype, &|_| false)
    }

    /// [`ModelWeights::from_dir`], keeping the tensors whose Hugging Face name `on_host`
    /// accepts in host memory (CPU tensors of `dtype`) instead of copying them to `device`:
    /// offloaded weights never take device memory, not even while loading.
    pub fn from_dir_placed(
        dir: &Path,
        device: &Device,
        dtype: DType,
        on_host: &dyn Fn(&str) -> bool,
    ) -> Result<ModelWeights> {
        let config = ModelConfig::from_dir(dir)?;
        let weights = Weights::open(dir)?;
        Self::load_placed(&weights, &config, device, dtype, on_host)
    }

    /// [`ModelWeights::load`] with the placement of [`ModelWeights::from_dir_placed`].
    pub fn load_placed(
        weights: &Weights,
        config: &ModelConfig,
        device: &Device,
        dtype: DType,
        on_host: &dyn Fn(&str) -> bool,
    ) -> Result<ModelWeights> {
        let mut shapes: HashMap<String, Vec<usize>> = config.tensor_shapes().into_iter().collect();
        let mut take = |name: String| -> Result<Tensor> {
            let shape = shapes.remove(&name).unwrap_or_default();
            let t = weights.get(&name, &shape, dtype)?;
            match device {
                Device::Cpu => Ok(t),
                Device::Cuda(_) if on_host(&name) => Ok(t),
                Device::Cuda(_) => Ok(t.to_device(device)?),
            }
        };
        let embed_tokens = take("model.embed_tokens.weight".into())?;
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for l in 0..config.num_hidden_layers {
            let attn = |n: &str| format!("model.layers.{l}.self_attn.{n}");
            let mlp = |n: &str| format!("model.layers.{l}.mlp.{n}");
            let opt = |take: &mut dyn FnMut(String) -> Result<Tensor>, on: bool, name: String| {
                if on {
                    take(name).map(Some)
                } else {
                    Ok(None)
                }
            };
            layers.push(LayerWeights {
                input_layernorm: take(format!("model.layers.{l}.input_layernorm.weight"))?,
                q_proj: take(attn("q_proj.weight"))?,
                k_proj: take(attn("k_proj.weight"))?,
                v_proj: take(attn("v_proj.weight"))?,
                o_proj: take(attn("o_proj.weight"))?,
                q_bias: opt(&mut take, config.qkv_bias, attn("q_proj.bias"))?,
                k_bias: opt(&mut take, config.qkv_bias, attn("k_proj.bias"))?,
                v_bias: opt(&mut take, config.qkv_bias, attn("v_proj.bias"))?,
                o_bias: opt(&mut take, config.o_bias, attn("o_proj.bias"))?,
                q_norm: opt(&mut take, config.qk_norm, attn("q_norm.weight"))?,
                k_norm: opt(&mut take, config.qk_norm, attn("k_norm.weight"))?,
                post_attention_layernorm: take(format!(
                    "model.layers.{l}.post_attention_layernorm.weight"
                ))?,
                gate_proj: take(mlp("gate_proj.weight"))?,
                up_proj: take(mlp("up_proj.weight"))?,
                down_proj: take(mlp("down_proj.weight"))?,
            });
        }
        let norm = take("model.norm.weight".into())?;
        let lm_head = if config.tie_word_embeddings {
            None
        } else {
            Some(take("lm_head.weight".into())?)
        };
        Ok(ModelWeights {
            config: config.clone(),
            embed_tokens,
            layers,
            norm,
            lm_head,
        })
    }

    /// The output projection: `lm_head.weight`, or the embedding when tied.
    pub fn lm_head(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.embed_tokens)
    }

    pub fn projection(&self, layer: usize, p: Projection) -> Option<&Tensor> {
        self.layers.get(layer).map(|l| l.projection(p))
    }

    pub fn projection_mut(&mut self, layer: usize, p: Projection) -> Option<&mut Tensor> {
        self.layers.get_mut(layer).map(|l| l.projection_mut(p))
    }

    /// Every tensor with its Hugging Face name, in the order of
    /// [`ModelConfig::tensor_shapes`].
    pub fn named_tensors(&self) -> Vec<(String, &Tensor)> {
        let mut out: Vec<(String, &Tensor)> =
            vec![("model.embed_tokens.weight".into(), &self.embed_tokens)];
        for (l, w) in self.layers.iter().enumerate() {
            let attn = |n: &str| format!("model.layers.{l}.self_attn.{n}");
            for (p, bias) in [
                (Projection::Q, &w.q_bias),
                (Projection::K, &w.k_bias),
                (Projection::V, &w.v_bias),
                (Projection::O, &w.o_bias),
            ] {
                out.push((attn(&format!("{}.weight", p.name())), w.projection(p)));
                if let Some(b) = bias {
                    out.push((attn(&format!("{}.bias", p.name())), b));
                }
            }
            if let (Some(q), Some(k)) = (&w.q_norm, &w.k_norm) {
                out.push((attn("q_norm.weight"), q));
                out.push((attn("k_norm.weight"), k));
            }
            for p in [Projection::Gate, Projection::Up, Projection::Down] {
                out.push((
                    format!("model.layers.{l}.mlp.{}.weight", p.name()),
                    w.projection(p),
                ));
            }
            out.push((
                format!("model.layers.{l}.input_layernorm.weight"),
                &w.input_layernorm,
            ));
            out.push((
                format!("model.layers.{l}.post_attention_layernorm.weight"),
                &w.post_attention_layernorm,
            ));
        }
        out.push(("model.norm.weight".into(), &self.norm));
        if let Some(h) = &self.lm_head {
            out.push(("lm_head.weight".into(), h));
        }
        out
    }

    /// Write a Hugging Face model folder: config.json and the weights (sharded above
    /// `max_shard_bytes`), every file atomically.
    pub fn save(&self, dir: &Path, max_shard_bytes: u64) -> Result<Vec<PathBuf>> {
        io::create_dir_all(dir)?;
        let tensors = self.named_tensors();
        let specs: Vec<TensorSpec> = tensors.iter().map(|(n, t)| TensorSpec::of(n, t)).collect();
        let files = save_sharded(dir, &specs, max_shard_bytes, |i, _| {
            Ok(MaybeOwned::Borrowed(tensors[i].1))
        })?;
        self.config.save(dir)?;
        Ok(files)
    }
}

/// Name, shape and dtype of a tensor to be written.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: DType,
}

impl TensorSpec {
    pub fn new(name: impl Into<String>, shape: &[usize], dtype: DType) -> TensorSpec {
        TensorSpec {
            name: name.into(),
            shape: shape.to_vec(),
            dtype,
        }
    }

    pub fn of(name: &str, t: &Tensor) -> TensorSpec {
        TensorSpec::new(name, t.shape(), t.dtype())
    }

    pub fn size_in_bytes(&self) -> u64 {
        self.shape.iter().product::<usize>() as u64 * self.dtype.size_in_bytes() as u64
    }

    fn st_dtype(&self) -> &'static str {
        match self.dtype {
            DType::F32 => "F32",
            DType::BF16 => "BF16",
            DType::I32 => "I32",
        }
    }
}

/// A tensor handed to the writer, owned or borrowed.
pub enum MaybeOwned<'a> {
    Owned(Tensor),
    Borrowed(&'a Tensor),
}

impl MaybeOwned<'_> {
    fn get(&self) -> &Tensor {
        match self {
            MaybeOwned::Owned(t) => t,
            MaybeOwned::Borrowed(t) => t,
        }
    }
}

/// Write named tensors (CPU or device) as one safetensors file, atomically.
pub fn write_safetensors(path: &Path, tensors: &[(&str, &Tensor)]) -> Result<()> {
    let specs: Vec<TensorSpec> = tensors.iter().map(|(n, t)| TensorSpec::of(n, t)).collect();
    write_safetensors_streaming(path, &specs, |i, _| Ok(MaybeOwned::Borrowed(tensors[i].1)))
}

/// Write one safetensors file at `path` (atomically), asking `produce(i, spec)` for each
/// tensor in turn so that only one tensor need be in memory. Each produced tensor must
/// match its spec's shape and dtype.
pub fn write_safetensors_streaming<'a>(
    path: &Path,
    specs: &[TensorSpec],
    mut produce: impl FnMut(usize, &TensorSpec) -> Result<MaybeOwned<'a>>,
) -> Result<()> {
    check_unique(path, specs)?;
    // Wider dtypes first, so every tensor's data starts aligned to its element size (the
    // header is padded to 8 bytes), as the safetensors library lays files out.
    let mut order: Vec<usize> = (0..specs.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(specs[i].dtype.size_in_bytes()));

    let mut header = Map::new();
    header.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut offset = 0u64;
    for &i in &order {
        let s = &specs[i];
        let end = offset + s.size_in_bytes();
        header.insert(
            s.name.clone(),
            json!({"dtype": s.st_dtype(), "shape": s.shape, "data_offsets": [offset, end]}),
        );
        offset = end;
    }
    let mut header = serde_json::to_vec(&Value::Object(header)).map_err(|e| ModelError::Json {
        path: path.to_path_buf(),
        source: e,
    })?;
    header.resize((8 + header.len()).next_multiple_of(8) - 8, b' ');

    io::write_atomic(path, |w| {
        let io_err = |e| ModelError::io(path, e);
        w.write_all(&(header.len() as u64).to_le_bytes())
            .map_err(io_err)?;
        w.write_all(&header).map_err(io_err)?;
        for &i in &order {
            let spec = &specs[i];
            let t = produce(i, spec)?;
            let t = t.get();
            if t.shape() != spec.shape.as_slice() || t.dtype() != spec.dtype {
                return Err(ModelError::ShapeMismatch {
                    name: format!(
                        "{} ({} expected, {} given)",
                        spec.name,
                        spec.dtype,
                        t.dtype()
                    ),
                    file: path.to_path_buf(),
                    expected: spec.shape.clone(),
                    found: t.shape().to_vec(),
                });
            }
            write_tensor_bytes(w, t).map_err(|e| match e {
                WriteError::Io(e) => io_err(e),
                WriteError::Model(e) => e,
            })?;
        }
        Ok(())
    })
}

enum WriteError {
    Io(std::io::Error),
    Model(ModelError),
}

fn write_tensor_bytes(w: &mut impl Write, t: &Tensor) -> std::result::Result<(), WriteError> {
    let cpu_copy;
    let t = if t.is_cuda() {
        cpu_copy = t
            .to_cpu()
            .map_err(|e| WriteError::Model(ModelError::from(e)))?;
        &cpu_copy
    } else {
        t
    };
    const CHUNK: usize = 1 << 16;
    let mut buf = Vec::with_capacity(CHUNK * 4);
    match t.storage() {
        Storage::Cpu(CpuData::F32(v)) => {
            for c in v.chunks(CHUNK) {
                buf.clear();
                buf.extend(c.iter().flat_map(|x| x.to_le_bytes()));
                w.write_all(&buf).map_err(WriteError::Io)?;
            }
        }
        Storage::Cpu(CpuData::BF16(v)) => {
            for c in v.chunks(CHUNK) {
                buf.clear();
                buf.extend(c.iter().flat_map(|x| x.to_bits().to_le_bytes()));
                w.write_all(&buf).map_err(WriteError::Io)?;
            }
        }
        Storage::Cpu(CpuData::I32(v)) => {
            for c in v.chunks(CHUNK) {
                buf.clear();
                buf.extend(c.iter().flat_map(|x| x.to_le_bytes()));
                w.write_all(&buf).map_err(WriteError::Io)?;
            }
        }
        Storage::Cuda(_) => unreachable!("copied to the CPU above"),
    }
    Ok(())
}

fn check_unique(path: &Path, specs: &[TensorSpec]) -> Result<()> {
    let mut seen = HashSet::new();
    for s in specs {
        if !seen.insert(s.name.as_str()) {
            return Err(ModelError::malformed(
                path,
                format!("tensor `{}` given twice", s.name),
            ));
        }
    }
    Ok(())
}

/// Write tensors into `dir` as transformers does: one `model.safetensors` when they fit in
/// `max_shard_bytes`, else `model-0000i-of-0000n.safetensors` shards plus
/// `model.safetensors.index.json`. Tensors are taken in order, a new shard starting when
/// the next tensor would pass the limit. The file of the other layout, if left from an
/// earlier save, is removed (transformers would otherwise prefer it). Returns the files
/// written, the index last.
pub fn save_sharded<'a>(
    dir: &Path,
    specs: &[TensorSpec],
    max_shard_bytes: u64,
    mut produce: impl FnMut(usize, &TensorSpec) -> Result<MaybeOwned<'a>>,
) -> Result<Vec<PathBuf>> {
    io::create_dir_all(dir)?;
    check_unique(&dir.join(INDEX_FILE), specs)?;
    let mut shards: Vec<Vec<usize>> = vec![];
    let mut current = 0u64;
    for (i, s) in specs.iter().enumerate() {
        let size = s.size_in_bytes();
        match shards.last_mut() {
            Some(shard) if current + size <= max_shard_bytes => shard.push(i),
            _ => {
                shards.push(vec![i]);
                current = 0;
            }
        }
        current += size;
    }
    if shards.len() <= 1 {
        let path = dir.join(SINGLE_FILE);
        write_safetensors_streaming(&path, specs, produce)?;
        remove_if_present(&dir.join(INDEX_FILE))?;
        return Ok(vec![path]);
    }
    let n = shards.len();
    let mut written = vec![];
    let mut weight_map = Map::new();
    for (k, members) in shards.iter().enumerate() {
        let file_name = format!("model-{:05}-of-{n:05}.safetensors", k + 1);
        let path = dir.join(&file_name);
        let shard_specs: Vec<TensorSpec> = members.iter().map(|&i| specs[i].clone()).collect();
        write_safetensors_streaming(&path, &shard_specs, |j, s| produce(members[j], s))?;
        for s in &shard_specs {
            weight_map.insert(s.name.clone(), json!(file_name));
        }
        written.push(path);
    }
    let total: u64 = specs.iter().map(TensorSpec::size_in_bytes).sum();
    let index = dir.join(INDEX_FILE);
    io::write_json_atomic(
        &index,
        &json!({"metadata": {"total_size": total}, "weight_map": weight_map}),
    )?;
    remove_if_present(&dir.join(SINGLE_FILE))?;
    written.push(index);
    Ok(written)
}

fn remove_if_present(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(ModelError::io(path, e)),
    }
}

/// Write a model folder with random weights for `config` (config.json + bf16 safetensors),
/// deterministic in `seed`. Linear and embedding weights are N(0, 0.02) (transformers'
/// initializer_range), biases N(0, 0.02), norm weights 1 + N(0, 0.1) so a wrong norm
/// weight shows in tests. Tensors are generated one at a time, in parallel chunks, so a
/// Llama-3-8B-sized folder needs no more memory than its largest tensor.
pub fn random_model(config: &ModelConfig, seed: u64, dir: &Path) -> Result<()> {
    random_model_as(config, seed, dir, DType::BF16, DEFAULT_MAX_SHARD_BYTES)
}

/// [`random_model`] with a choice of dtype (bf16 or f32) and shard size.
pub fn random_model_as(
    config: &ModelConfig,
    seed: u64,
    dir: &Path,
    dtype: DType,
    max_shard_bytes: u64,
) -> Result<()> {
    if dtype == DType::I32 {
        return Err(ModelError::TensorDType {
            name: "(every tensor)".into(),
            file: dir.to_path_buf(),
            detail: "random weights are f32 or bf16, not i32".into(),
        });
    }
    io::create_dir_all(dir)?;
    let specs: Vec<TensorSpec> = config
        .tensor_shapes()
        .into_iter()
        .map(|(n, s)| TensorSpec::new(n, &s, dtype))
        .collect();
    save_sharded(dir, &specs, max_shard_bytes, |i, spec| {
        let n: usize = spec.shape.iter().product();
        let is_norm = spec.name.ends_with("norm.weight");
        let (mean, std) = if is_norm { (1.0, 0.1) } else { (0.0, 0.02) };
        let mut values = vec![0f32; n];
        const CHUNK: usize = 1 << 16;
        cpu::par_rows(&mut values, CHUNK, |c, out| {
            // One stream per (tensor, chunk): the same values whatever the thread count.
            let mut rng = Rng::new(
                seed ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)
                    ^ (c as u64).wrapping_mul(0xc2b2_ae3d_27d4_eb4f),
            );
            for v in out {
                *v = mean + std * rng.normal();
            }
        });
        Ok(MaybeOwned::Owned(Tensor::from_f32_as(
            &spec.shape,
            values,
            dtype,
        )?))
    })?;
    config.save(dir)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::test_dir::TestDir;

    fn small_tensors() -> Vec<(String, Tensor)> {
        let mut rng = Rng::new(7);
        vec![
            (
                "a.bf16".into(),
                Tensor::from_f32_as(&[3, 5], rng.normal_vec(15, 1.0), DType::BF16).unwrap(),
            ),
            (
                "b.f32".into(),
                Tensor::from_f32(&[7], rng.normal_vec(7, 1.0)).unwrap(),
            ),
            (
                "c.odd".into(),
                Tensor::from_f32_as(&[1, 3], rng.normal_vec(3, 1.0), DType::BF16).unwrap(),
            ),
        ]
    }

    #[test]
    fn write_then_read_roundtrip_with_conversion() {
        let dir = TestDir::new("st");
        let path = dir.path().join("x.safetensors");
        let tensors = small_tensors();
        let refs: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        write_safetensors(&path, &refs).unwrap();
        // The standard library reads what we wrote, with format "pt" metadata.
        let bytes = std::fs::read(&path).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.len(), 3);
        let (n, meta) = SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!((8 + n) % 8, 0);
        assert_eq!(
            meta.metadata()
                .as_ref()
                .and_then(|m| m.get("format"))
                .map(String::as_str),
            Some("pt")
        );
        // f32 data first, so it is 4-byte aligned.
        assert_eq!(meta.info("b.f32").unwrap().data_offsets.0, 0);

        let w = Weights::open_file(&path).unwrap();
        for (name, t) in &tensors {
            let back = w.get(name, t.shape(), t.dtype()).unwrap();
            assert_eq!(
                back.to_f32_vec().unwrap(),
                t.to_f32_vec().unwrap(),
                "{name}"
            );
            // Converted to the other float type: bf16 widens exactly, f32 rounds to bf16.
            let other = if t.dtype() == DType::F32 {
                DType::BF16
            } else {
                DType::F32
            };
            let conv = w.get(name, t.shape(), other).unwrap();
            let expect: Vec<f32> = t
                .to_f32_vec()
                .unwrap()
                .into_iter()
                .map(|x| {
                    if other == DType::BF16 {
                        bf16::from_f32(x).to_f32()
                    } else {
                        x
                    }
                })
                .collect();
            assert_eq!(conv.to_f32_vec().unwrap(), expect, "{name}");
        }
    }

    /// A hand-made file with F16 and F64 tensors, as other tools write them.
    #[test]
    fn reads_f16_and_f64_and_rejects_integer_weights() {
        let dir = TestDir::new("st16");
        let path = dir.path().join("m.safetensors");
        let h: Vec<f16> = [0.5f32, -1.25, 3.0]
            .iter()
            .map(|&x| f16::from_f32(x))
            .collect();
        let d = [1.0f64 + 2f64.powi(-9), -2.0];
        let mut data = vec![];
        data.extend(d.iter().flat_map(|x| x.to_le_bytes()));
        data.extend(h.iter().flat_map(|x| x.to_bits().to_le_bytes()));
        data.extend([1i64].iter().flat_map(|x| x.to_le_bytes()));
        let header = r#"{"d":{"dtype":"F64","shape":[2],"data_offsets":[0,16]},"h":{"dtype":"F16","shape":[3],"data_offsets":[16,22]},"i":{"dtype":"I64","shape":[1],"data_offsets":[22,30]}}"#;
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend(header.as_bytes());
        bytes.extend(&data);
        std::fs::write(&path, bytes).unwrap();
        let w = Weights::open_file(&path).unwrap();
        assert_eq!(
            w.get("h", &[3], DType::F32).unwrap().to_f32_vec().unwrap(),
            vec![0.5, -1.25, 3.0]
        );
        // 1 + 2^-9 is a bf16 tie: rounds to even (1.0) directly from f64.
        assert_eq!(
            w.get("d", &[2], DType::BF16).unwrap().to_f32_vec().unwrap(),
            vec![1.0, -2.0]
        );
        let e = w.get("i", &[1], DType::F32).unwrap_err();
        assert!(matches!(e, ModelError::TensorDType { .. }), "{e}");
        assert!(
            e.to_string().contains("I64") && e.to_string().contains("`i`"),
            "{e}"
        );
    }

    #[test]
    fn missing_tensor_and_wrong_shape_are_named() {
        let dir = TestDir::new("stshape");
        let path = dir.path().join("x.safetensors");
        let tensors = small_tensors();
        let refs: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        write_safetensors(&path, &refs).unwrap();
        let w = Weights::open_file(&path).unwrap();
        let e = w.get("a.bf16", &[5, 3], DType::BF16).unwrap_err();
        match &e {
            ModelError::ShapeMismatch {
                name,
                expected,
                found,
                file,
            } => {
                assert_eq!(name, "a.bf16");
                assert_eq!(
                    (expected.as_slice(), found.as_slice()),
                    (&[5, 3][..], &[3, 5][..])
                );
                assert!(file.ends_with("x.safetensors"));
            }
            other => panic!("{other}"),
        }
        let msg = e.to_string();
        assert!(msg.contains("[5, 3]") && msg.contains("[3, 5]"), "{msg}");
        let e = w.get("nope", &[1], DType::F32).unwrap_err();
        assert!(matches!(e, ModelError::MissingTensor { .. }));
        assert!(e.to_string().contains("nope") && e.to_string().contains("x.safetensors"));
    }

    #[test]
    fn truncated_and_garbage_files_are_errors_naming_the_file() {
        let dir = TestDir::new("sttrunc");
        let path = dir.path().join("x.safetensors");
        let tensors = small_tensors();
        let refs: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        write_safetensors(&path, &refs).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        for cut in [bytes.len() - 1, bytes.len() / 2, 12, 3, 0] {
            std::fs::write(&path, &bytes[..cut]).unwrap();
            let e = Weights::open_file(&path).unwrap_err();
            assert!(matches!(e, ModelError::Malformed { .. }), "cut {cut}: {e}");
            assert!(e.to_string().contains("x.safetensors"), "{e}");
        }
        let mut garbage = 20u64.to_le_bytes().to_vec();
        garbage.extend(b"this is not json....");
        std::fs::write(&path, garbage).unwrap();
        assert!(matches!(
            Weights::open_file(&path),
            Err(ModelError::Malformed { .. })
        ));
        // A header length beyond any sane file.
        std::fs::write(&path, u64::MAX.to_le_bytes()).unwrap();
        assert!(matches!(
            Weights::open_file(&path),
            Err(ModelError::Malformed { .. })
        ));
        let e = Weights::open(dir.path()).unwrap_err();
        assert!(matches!(e, ModelError::NoWeights { .. }), "{e}");
    }

    #[test]
    fn sharded_save_writes_index_and_loads_back() {
        let dir = TestDir::new("shard");
        let tensors = small_tensors();
        let specs: Vec<TensorSpec> = tensors.iter().map(|(n, t)| TensorSpec::of(n, t)).collect();
        // 30 bytes + 28 bytes + 6 bytes with a 40-byte limit: [a], [b, c].
        let files = save_sharded(dir.path(), &specs, 40, |i, _| {
            Ok(MaybeOwned::Borrowed(&tensors[i].1))
        })
        .unwrap();
        assert_eq!(files.len(), 3);
        assert!(files[0].ends_with("model-00001-of-00002.safetensors"));
        assert!(files[2].ends_with(INDEX_FILE));
        let index: Value =
            serde_json::from_str(&std::fs::read_to_string(&files[2]).unwrap()).unwrap();
        assert_eq!(index["metadata"]["total_size"], json!(64));
        assert_eq!(
            index["weight_map"]["c.odd"],
            json!("model-00002-of-00002.safetensors")
        );
        let w = Weights::open(dir.path()).unwrap();
        assert_eq!(w.names().len(), 3);
        for (name, t) in &tensors {
            let back = w.get(name, t.shape(), DType::F32).unwrap();
            assert_eq!(back.to_f32_vec().unwrap(), t.to_f32_vec().unwrap());
        }
        // Saving again unsharded replaces the index with a single file.
        save_sharded(dir.path(), &specs, u64::MAX, |i, _| {
            Ok(MaybeOwned::Borrowed(&tensors[i].1))
        })
        .unwrap();
        assert!(!dir.path().join(INDEX_FILE).exists());
        assert!(dir.path().join(SINGLE_FILE).exists());

        // An index naming a tensor its shard lacks is an error naming both.
        let dir2 = TestDir::new("shard2");
        save_sharded(dir2.path(), &specs, 40, |i, _| {
            Ok(MaybeOwned::Borrowed(&tensors[i].1))
        })
        .unwrap();
        let idx = dir2.path().join(INDEX_FILE);
        let text = std::fs::read_to_string(&idx).unwrap().replace(
            r#""c.odd": "model-00002-of-00002.safetensors""#,
            r#""c.odd": "model-00001-of-00002.safetensors""#,
        );
        std::fs::write(&idx, text).unwrap();
        let e = Weights::open(dir2.path()).unwrap_err();
        assert!(
            matches!(e, ModelError::MissingTensor { ref name, .. } if name == "c.odd"),
            "{e}"
        );
    }

    #[test]
    fn writer_rejects_duplicates_and_mismatched_tensors_without_leaving_files() {
        let dir = TestDir::new("stdup");
        let path = dir.path().join("x.safetensors");
        let t = Tensor::from_f32(&[2], vec![1.0, 2.0]).unwrap();
        assert!(write_safetensors(&path, &[("a", &t), ("a", &t)]).is_err());
        let specs = [TensorSpec::new("a", &[3], DType::F32)];
        let e = write_safetensors_streaming(&path, &specs, |_, _| Ok(MaybeOwned::Borrowed(&t)))
            .unwrap_err();
        assert!(e.to_string().contains("[3]"), "{e}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn random_model_loads_for_each_architecture() {
        for config in [
            ModelConfig::tiny_llama(),
            ModelConfig::tiny_qwen2(),
            ModelConfig::tiny_qwen3(),
        ] {
            let dir = TestDir::new("rand");
            random_model(&config, 5, dir.path()).unwrap();
            let m = ModelWeights::from_dir(dir.path(), &Device::Cpu, DType::BF16).unwrap();
            assert_eq!(m.config, config);
            assert_eq!(m.layers.len(), config.num_hidden_layers);
            assert_eq!(m.lm_head.is_none(), config.tie_word_embeddings);
            assert_eq!(m.layers[1].q_bias.is_some(), config.qkv_bias);
            assert_eq!(m.layers[1].q_norm.is_some(), config.qk_norm);
            assert_eq!(
                m.lm_head().shape(),
                &[config.vocab_size, config.hidden_size]
            );
            let names: Vec<String> = m.named_tensors().into_iter().map(|(n, _)| n).collect();
            let expected: Vec<String> =
                config.tensor_shapes().into_iter().map(|(n, _)| n).collect();
            assert_eq!(names, expected);
            // Norms near 1, linear weights near N(0, 0.02).
            let norm = m.norm.to_f32_vec().unwrap();
            assert!(norm.iter().all(|&x| (x - 1.0).abs() < 0.6));
            let q = m.layers[0].q_proj.to_f32_vec().unwrap();
            let var = q.iter().map(|&x| (x as f64).powi(2)).sum::<f64>() / q.len() as f64;
            assert!((var.sqrt() - 0.02).abs() < 0.003, "std {}", var.sqrt());
            // Same seed, same weights; the f32 load of a bf16 file is exact.
            let dir2 = TestDir::new("rand2");
            random_model(&config, 5, dir2.path()).unwrap();
            let m2 = ModelWeights::from_dir(dir2.path(), &Device::Cpu, DType::F32).unwrap();
            assert_eq!(m2.layers[0].q_proj.to_f32_vec().unwrap(), q);
        }
    }

    #[test]
    fn model_load_names_the_missing_or_misshapen_tensor() {
        let config = ModelConfig::tiny_llama();
        let dir = TestDir::new("loadbad");
        random_model(&config, 1, dir.path()).unwrap();
        // A config whose intermediate size disagrees with the file.
        let mut wrong = config.clone();
        wrong.intermediate_size += 1;
        let w = Weights::open(dir.path()).unwrap();
        let e = ModelWeights::load(&w, &wrong, &Device::Cpu, DType::BF16).unwrap_err();
        match &e {
            ModelError::ShapeMismatch {
                name,
                expected,
                found,
                ..
            } => {
                assert_eq!(name, "model.layers.0.mlp.gate_proj.weight");
                assert_eq!(expected, &vec![169, 96]);
                assert_eq!(found, &vec![168, 96]);
            }
            other => panic!("{other}"),
        }
        // One more layer than the file has.
        let mut deeper = config.clone();
        deeper.num_hidden_layers = 3;
        let e = ModelWeights::load(&w, &deeper, &Device::Cpu, DType::BF16).unwrap_err();
        assert!(
            matches!(e, ModelError::MissingTensor { ref name, .. } if name == "model.layers.2.input_layernorm.weight"),
            "{e}"
        );
        // Untied config against a tied checkpoint: lm_head is missing.
        let qdir = TestDir::new("loadbad2");
        let q = ModelConfig::tiny_qwen2();
        random_model(&q, 1, qdir.path()).unwrap();
        let mut untied = q.clone();
        untied.tie_word_embeddings = false;
        let w = Weights::open(qdir.path()).unwrap();
        let e = ModelWeights::load(&w, &untied, &Device::Cpu, DType::BF16).unwrap_err();
        assert!(
            matches!(e, ModelError::MissingTensor { ref name, .. } if name == "lm_head.weight")
        );
    }

    #[test]
    fn model_save_roundtrips_sharded() {
        let config = ModelConfig::tiny_qwen3();
        let dir = TestDir::new("msave");
        random_model(&config, 9, dir.path()).unwrap();
        let m = ModelWeights::from_dir(dir.path(), &Device::Cpu, DType::BF16).unwrap();
        let out = TestDir::new("msave2");
        let files = m.save(out.path(), 20_000).unwrap();
        assert!(files.len() > 3);
        let back = ModelWeights::from_dir(out.path(), &Device::Cpu, DType::BF16).unwrap();
        for ((n1, a), (n2, b)) in m.named_tensors().into_iter().zip(back.named_tensors()) {
            assert_eq!(n1, n2);
            assert_eq!(a.to_f32_vec().unwrap(), b.to_f32_vec().unwrap(), "{n1}");
        }
    }
}
