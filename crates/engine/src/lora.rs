//! The trainable state: LoRA A and B per adapted projection, in fp32, with their gradients
//! and AdamW moments, on the training device. Only these carry gradients.

use tigon_kernels::{DType, Device, Tensor};

use crate::error::{EngineError, Result};
use crate::spec::{DecoderSpec, Proj};

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
}

impl LoraTensors {
    /// From CPU or device tensors `a` [r, in] and `b` [out, r] (any float dtype).
    pub fn new(a: &Tensor, b: &Tensor, scaling: f32, device: &Device) -> Result<LoraTensors> {
        let (r, _) = a.rows_cols();
        let (_, rb) = b.rows_cols();
        if r != rb || a.shape().len() != 2 || b.shape().len() != 2 {
            return Err(EngineError::Lora(format!(
                "lora_A {:?} and lora_B {:?} do not share a rank",
                a.shape(),
                b.shape()
            )));
        }
        let f32_on = |t: &Tensor| -> Result<Tensor> {
            let v = t.to_f32_vec()?;
            Ok(Tensor::from_f32(t.shape(), v)?.to_device(device)?)
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
        })
    }

    pub fn rank(&self) -> usize {
        self.a.shape()[0]
    }

    pub fn param_count(&self) -> usize {
        self.a.elem_count() + self.b.elem_count()
    }
}

/// LoRA on some projections of some layers: `layers[i][proj.index()]`.
pub struct LoraState {
    pub layers: Vec<[Option<LoraTensors>; 7]>,
}

impl LoraState {
    pub fn empty(spec: &DecoderSpec) -> LoraState {
        LoraState {
            layers: (0..spec.layers).map(|_| Default::default()).collect(),
        }
    }

    pub fn get(&self, layer: usize, p: Proj) -> Option<&LoraTensors> {
        self.layers.get(layer)?[p.index()].as_ref()
    }

    /// Attach `t` to projection `p` of `layer`, checking its shapes against the spec.
    pub fn insert(
        &mut self,
        spec: &DecoderSpec,
        layer: usize,
        p: Proj,
        t: LoraTensors,
    ) -> Result<()> {
        let (fin, fout) = spec.proj_dims(p);
        let r = t.rank();
        if t.a.shape() != [r, fin] || t.b.shape() != [fout, r] {
            return Err(EngineError::Lora(format!(
                "layer {layer} {}: lora_A {:?} / lora_B {:?}, expected [{r}, {fin}] / [{fout}, {r}]",
                p.name(),
                t.a.shape(),
                t.b.shape()
            )));
        }
        let slot = self.layers.get_mut(layer).ok_or_else(|| {
            EngineError::Lora(format!("layer {layer} out of range ({} layers)", spec.layers))
        })?;
        slot[p.index()] = Some(t);
        Ok(())
    }

    pub fn iter(&self) -> impl Iterator<Item = (usize, Proj, &LoraTensors)> {
        self.layers.iter().enumerate().flat_map(|(i, l)| {
            Proj::ALL
                .iter()
                .filter_map(move |&p| l[p.index()].as_ref().map(|t| (i, p, t)))
        })
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = (usize, Proj, &mut LoraTensors)> {
        self.layers.iter_mut().enumerate().flat_map(|(i, l)| {
            l.iter_mut()
                .zip(Proj::ALL)
                .filter_map(move |(t, p)| t.as_mut().map(|t| (i, p, t)))
        })
    }

    pub fn param_count(&self) -> usize {
        self.iter().map(|(_, _, t)| t.param_count()).sum()
    }
}
