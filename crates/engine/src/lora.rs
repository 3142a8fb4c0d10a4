//! The trainable state: LoRA A and B per adapted projection, in fp32, with their gradients
//! and AdamW moments, on the training device. Only these carry gradients. It is built from
//! a [`tigon_model::Adapter`] (new or loaded from PEFT files) and written back into one to
//! be saved.

use tigon_kernels::ops::adamw::cast_multi_to_bf16;
use tigon_kernels::ops::lora_linear::LoraLinear;
use tigon_kernels::ops::lora_split::LoraSplit;
use tigon_kernels::{DType, Device, Tensor};
use tigon_model::{Adapter, ModelConfig, Projection};

use crate::error::{EngineError, Result};

pub struct LoraTensors {
    /// `[r, in]`, fp32 master weights.
    pub a: Tensor,
    /// `[out, r]`.
    pub b: Tensor,
    pub scaling: f32,
    pub da: Tensor,
    pub db: Tensor,
    /// AdamW first and second moments of a and b.
    pub ma: Tensor,
    pub va: Tensor,
    pub mb: Tensor,
    pub vb: Tensor,
    /// `a` and `b` in the compute dtype (bf16 on the GPU) for the span of one micro-batch,
    /// made once by [`LoraState::set_compute_copies`]: the GEMMs would otherwise cast the
    /// fp32 masters at every use (four casts per adapter per step). `None` outside a
    /// training step, so they are never stale.
    pub a_compute: Option<Tensor>,
    pub b_compute: Option<Tensor>,
}

impl LoraTensors {
    /// From CPU or device tensors `a` [r, in] and `b` [out, r] (any float dtype).
    pub fn new(a: &Tensor, b: &Tensor, scaling: f32, device: &Device) -> Result<LoraTensors> {
        if a.shape().len() != 2 || b.shape().len() != 2 || a.shape()[0] != b.shape()[1] {
            return Err(EngineError::Lora(format!(
                "lora_A {:?} and lora_B {:?} do not share a rank",
                a.shape(),
                b.shape()
            )));
        }
        let f32_on = |t: &Tensor| -> Result<Tensor> {
            Ok(Tensor::from_f32(t.shape(), t.to_f32_vec()?)?.to_device(device)?)
        };
        let zeros = |t: &Tensor| Tensor::zeros(t.shape(), DType::F32, device);
        Ok(LoraTensors {
            da: zeros(a)?,
            db: zeros(b)?,
            ma: zeros(a)?,
            va: zeros(a)?,
            mb: zeros(b)?,
            vb: zeros(b)?,
            a: f32_on(a)?,
            b: f32_on(b)?,
            scaling,
            a_compute: None,
            b_compute: None,
        })
    }

    /// This adapter on the frozen `w` as the LoRA op takes it: A and B in the compute dtype
    /// while a training step holds copies of them, the fp32 masters otherwise.
    pub fn on<'l>(&'l self, w: &'l Tensor, bias: Option<&'l Tensor>) -> LoraLinear<'l> {
        LoraLinear {
            w,
            bias,
            a: self.a_compute.as_ref().unwrap_or(&self.a),
            b: self.b_compute.as_ref().unwrap_or(&self.b),
            scaling: self.scaling,
            split: None,
        }
    }

    /// [`LoraTensors::on`] and the dA, dB accumulators, borrowed together for a backward.
    pub fn on_with_grads<'l>(
        &'l mut self,
        w: &'l Tensor,
        bias: Option<&'l Tensor>,
    ) -> (LoraLinear<'l>, &'l mut Tensor, &'l mut Tensor) {
        let LoraTensors {
            a,
            b,
            a_compute,
            b_compute,
            scaling,
            da,
            db,
            ..
        } = self;
        let layer = LoraLinear {
            w,
            bias,
            a: a_compute.as_ref().unwrap_or(a),
            b: b_compute.as_ref().unwrap_or(b),
            scaling: *scaling,
            split: None,
        };
        (layer, da, db)
    }

    pub fn rank(&self) -> usize {
        self.a.shape()[0]
    }

    /// [`LoraTensors::on`] with the split of A and B that makes the fused op's adapter
    /// path fp32-accurate (see [`LoraPrecision`]).
    pub fn on_split<'l>(
        &'l self,
        w: &'l Tensor,
        bias: Option<&'l Tensor>,
        split: Option<&'l LoraSplit>,
    ) -> LoraLinear<'l> {
        LoraLinear {
            split,
            ..self.on(w, bias)
        }
    }

    pub fn param_count(&self) -> usize {
        self.a.elem_count() + self.b.elem_count()
    }
}

/// LoRA on some projections of some layers, indexed `layers[i][projection as usize]`.
pub struct LoraState {
    pub layers: Vec<LayerLora>,
    /// The adapter's `lora_dropout`, applied to each adapter's input in training (PEFT's
    /// semantics, see [`crate::lora_dropout`]); evaluation ignores it (PEFT's eval mode).
    pub dropout: f64,
}

/// The LoRA tensors of one layer's seven projections, in [`Projection::ALL`] order.
pub type LayerLora = [Option<LoraTensors>; 7];

/// One layer's adapters as hi/lo splits (see [`LoraPrecision::Fp32`]), made just before the
/// layer runs and dropped after: one layer's worth of memory at a time.
pub type LayerSplits = [Option<LoraSplit>; 7];

/// The splits of every adapter of `layer`, in one launch on the GPU.
pub fn layer_splits(layer: &LayerLora) -> Result<LayerSplits> {
    let pairs: Vec<(&Tensor, &Tensor)> = layer.iter().flatten().map(|t| (&t.a, &t.b)).collect();
    let mut made = LoraSplit::many(&pairs)?.into_iter();
    let mut out: LayerSplits = Default::default();
    for (slot, t) in out.iter_mut().zip(layer) {
        if t.is_some() {
            *slot = made.next();
        }
    }
    Ok(out)
}

/// How the adapter path is computed over a bf16 base.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LoraPrecision {
    /// As PEFT computes it (fp32 adapters over a bf16 base): every rank-r product
    /// fp32-accurate, through bf16 hi/lo splits of A, B and the rank-r activations
    /// (`tigon_kernels::ops::lora_split`), the sum rounded once into the bf16 output.
    #[default]
    Fp32,
    /// A, B and the rank-r activations rounded to bf16 (one GEMM per product, fewer
    /// launches; about 20% more gradient error against fp32 on the parity fixtures).
    Bf16,
}

impl std::str::FromStr for LoraPrecision {
    type Err = EngineError;
    fn from_str(s: &str) -> Result<LoraPrecision> {
        match s {
            "fp32" => Ok(LoraPrecision::Fp32),
            "bf16" => Ok(LoraPrecision::Bf16),
            other => Err(EngineError::Lora(format!(
                "lora precision `{other}`: expected fp32 or bf16"
            ))),
        }
    }
}

impl std::fmt::Display for LoraPrecision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LoraPrecision::Fp32 => "fp32",
            LoraPrecision::Bf16 => "bf16",
        })
    }
}

impl LoraState {
    /// No adapter: the plain base model.
    pub fn empty(layers: usize) -> LoraState {
        LoraState {
            layers: (0..layers).map(|_| Default::default()).collect(),
            dropout: 0.0,
        }
    }

    /// Every module of `adapter` on `device`, checked against the model's shapes.
    pub fn from_adapter(
        adapter: &Adapter,
        config: &ModelConfig,
        device: &Device,
    ) -> Result<LoraState> {
        let mut state = LoraState::empty(config.num_hidden_layers);
        state.dropout = adapter.config.lora_dropout;
        for m in &adapter.modules {
            let (layer, p) = (m.target.layer, m.target.projection);
            let (out, inp) = config.projection_shape(p);
            let r = m.a.shape().first().copied().unwrap_or(0);
            if m.a.shape() != [r, inp] || m.b.shape() != [out, r] {
                return Err(EngineError::Lora(format!(
                    "{}: lora_A {:?} / lora_B {:?}, expected [{r}, {inp}] / [{out}, {r}]",
                    m.target.module,
                    m.a.shape(),
                    m.b.shape()
                )));
            }
            let slot = state.layers.get_mut(layer).ok_or_else(|| {
                EngineError::Lora(format!(
                    "{}: layer {layer} out of range ({} layers)",
                    m.target.module, config.num_hidden_layers
                ))
            })?;
            slot[p as usize] = Some(LoraTensors::new(
                &m.a,
                &m.b,
                m.target.scaling as f32,
                device,
            )?);
        }
        Ok(state)
    }

    /// Copy the trained A and B back into `adapter` (as f32 CPU tensors), for saving.
    pub fn store_into(&self, adapter: &mut Adapter) -> Result<()> {
        for m in &mut adapter.modules {
            let t = self
                .get(m.target.layer, m.target.projection)
                .ok_or_else(|| {
                    EngineError::Lora(format!("{}: not in the training state", m.target.module))
                })?;
            m.a = Tensor::from_f32(t.a.shape(), t.a.to_f32_vec()?)?;
            m.b = Tensor::from_f32(t.b.shape(), t.b.to_f32_vec()?)?;
        }
        Ok(())
    }

    pub fn get(&self, layer: usize, p: Projection) -> Option<&LoraTensors> {
        self.layers.get(layer)?[p as usize].as_ref()
    }

    pub fn iter(&self) -> impl Iterator<Item = (usize, Projection, &LoraTensors)> {
        self.layers.iter().enumerate().flat_map(|(i, l)| {
            Projection::ALL
                .iter()
                .filter_map(move |&p| l[p as usize].as_ref().map(|t| (i, p, t)))
        })
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = (usize, Projection, &mut LoraTensors)> {
        self.layers.iter_mut().enumerate().flat_map(|(i, l)| {
            l.iter_mut()
                .zip(Projection::ALL)
                .filter_map(move |(t, p)| t.as_mut().map(|t| (i, p, t)))
        })
    }

    pub fn param_count(&self) -> usize {
        self.iter().map(|(_, _, t)| t.param_count()).sum()
    }

    /// Round every A and B once to `dtype` for the GEMMs of one micro-batch (nothing to do
    /// for f32). The values are exactly what casting at each use gives.
    /// On the GPU all of them are rounded in one multi-tensor launch.
    pub fn set_compute_copies(&mut self, dtype: DType) -> Result<()> {
        if dtype != DType::BF16 {
            return Ok(());
        }
        let mut copies = Vec::new();
        let mut masters = Vec::new();
        for (_, _, t) in self.iter() {
            for m in [&t.a, &t.b] {
                copies.push(match m.device() {
                    Device::Cuda(g) => Tensor::uninit_cuda(&g, m.shape(), dtype)?,
                    Device::Cpu => Tensor::zeros(m.shape(), dtype, &Device::Cpu)?,
                });
                masters.push(m);
            }
        }
        cast_multi_to_bf16(&masters, &mut copies)?;
        let mut copies = copies.into_iter();
        for (_, _, t) in self.iter_mut() {
            t.a_compute = copies.next();
            t.b_compute = copies.next();
        }
        Ok(())
    }

    /// Drop the copies [`LoraState::set_compute_copies`] made.
    pub fn clear_compute_copies(&mut self) {
        for (_, _, t) in self.iter_mut() {
            t.a_compute = None;
            t.b_compute = None;
        }
    }
}
