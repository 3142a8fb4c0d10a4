//! The trainable state: LoRA A and B per adapted projection, in fp32, with their gradients
//! and AdamW moments, on the training device. Only these carry gradients. It is built from
//! a [`tigon_model::Adapter`] (new or loaded from PEFT files) and written back into one to
//! be saved.

use tigon_kernels::ops::adamw::cast_multi_to_bf16_at;
use tigon_kernels::ops::lora_group_split::GroupSplits;
use tigon_kernels::ops::lora_linear::LoraLinear;
use tigon_kernels::ops::lora_split::{LoraSplit, SplitBatch};
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
    /// On the first adapted projection of a [`SHARED_INPUT_GROUPS`] group, when the compute
    /// copies were made grouped: the A of all the group's adapted projections stacked in
    /// projection order (`[sum r, in]`, compute dtype), for the grouped LoRA op. Those
    /// projections then have no `a_compute` of their own (the same bytes in one buffer).
    pub a_group: Option<Tensor>,
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
            a_group: None,
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

    /// This adapter's pieces for the grouped LoRA op's backward, borrowed together.
    pub fn group_parts(&mut self) -> GroupParts<'_> {
        let LoraTensors {
            a,
            b,
            a_compute,
            b_compute,
            a_group,
            scaling,
            da,
            db,
            ..
        } = self;
        GroupParts {
            a: a_compute.as_ref().unwrap_or(a),
            a_group: a_group.as_ref(),
            b: b_compute.as_ref().unwrap_or(b),
            scaling: *scaling,
            da,
            db,
        }
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

/// One adapter of a group as the grouped op's backward takes it: A in the compute dtype (or
/// the master; for stacking when the group holds no stacked copy), the group's stacked A if
/// this adapter holds it, B, the scaling and the dA, dB accumulators.
pub struct GroupParts<'l> {
    pub a: &'l Tensor,
    pub a_group: Option<&'l Tensor>,
    pub b: &'l Tensor,
    pub scaling: f32,
    pub da: &'l mut Tensor,
    pub db: &'l mut Tensor,
}

/// The projections whose adapters read one shared input, in projection order: q, k, v (the
/// normed layer input) and gate, up (the normed residual). The fused LoRA path batches each
/// group's rank-r products ([`tigon_kernels::ops::lora_group`]).
pub const SHARED_INPUT_GROUPS: [&[Projection]; 2] = [
    &[Projection::Q, Projection::K, Projection::V],
    &[Projection::Gate, Projection::Up],
];

/// LoRA on some projections of some layers, indexed `layers[i][projection as usize]`.
pub struct LoraState {
    pub layers: Vec<LayerLora>,
    /// The adapter's `lora_dropout`, applied to each adapter's input in training (PEFT's
    /// semantics, see [`crate::lora_dropout`]); evaluation ignores it (PEFT's eval mode).
    pub dropout: f64,
}

/// The LoRA tensors of one layer's seven projections, in [`Projection::ALL`] order.
pub type LayerLora = [Option<LoraTensors>; 7];

/// The adapters of `group`'s projections in `layer`, in projection order.
fn adapted<'l>(layer: &'l LayerLora, group: &[Projection]) -> Vec<&'l LoraTensors> {
    group
        .iter()
        .filter_map(|&p| layer[p as usize].as_ref())
        .collect()
}

/// One layer's adapters as hi/lo splits (see [`LoraPrecision::Fp32`]), made just before the
/// layer runs and dropped after: one layer's worth of memory at a time.
#[derive(Default)]
pub struct LayerSplits {
    /// Per projection, for the adapters that run on their own.
    pub each: [Option<LoraSplit>; 7],
    /// Per [`SHARED_INPUT_GROUPS`] group that runs through the grouped op: its adapters'
    /// splits with the A stacked.
    pub groups: [Option<GroupSplits>; 2],
}

/// The splits of every adapter of `layer`, in one launch on the GPU. With `grouped` (the
/// layer runs its q/k/v and gate/up through the grouped op: fused LoRA, no dropout), each
/// group whose adapters share one rank gets stacked [`GroupSplits`] (the grouped split op
/// needs one rank); other adapters get their own split.
pub fn layer_splits(layer: &LayerLora, grouped: bool) -> Result<LayerSplits> {
    let mut out = LayerSplits::default();
    let mut in_group = [false; 7];
    let mut group_pairs: [Vec<(&Tensor, &Tensor)>; 2] = Default::default();
    if grouped {
        for (gi, group) in SHARED_INPUT_GROUPS.iter().enumerate() {
            let members = adapted(layer, group);
            let Some(first) = members.first() else {
                continue;
            };
            if members.iter().any(|t| t.rank() != first.rank()) {
                continue;
            }
            let pairs: Vec<(&Tensor, &Tensor)> = members.iter().map(|t| (&t.a, &t.b)).collect();
            out.groups[gi] = Some(GroupSplits::alloc(&pairs)?);
            group_pairs[gi] = pairs;
            for &p in group.iter() {
                in_group[p as usize] = true;
            }
        }
    }
    for ((slot, t), &grouped) in out.each.iter_mut().zip(layer).zip(&in_group) {
        if let (Some(t), false) = (t, grouped) {
            *slot = Some(LoraSplit::alloc(&t.a, &t.b)?);
        }
    }
    let mut batch = SplitBatch::default();
    let LayerSplits { each, groups } = &mut out;
    for (sp, t) in each.iter_mut().zip(layer) {
        if let (Some(sp), Some(t)) = (sp, t) {
            sp.add_jobs(&t.a, &t.b, &mut batch);
        }
    }
    for (g, pairs) in groups.iter_mut().zip(&group_pairs) {
        if let Some(g) = g {
            g.add_jobs(pairs, &mut batch);
        }
    }
    batch.run()?;
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
    /// On the GPU all of them are rounded in one multi-tensor launch. Without dropout the
    /// A of each [`SHARED_INPUT_GROUPS`] group are stacked into one buffer
    /// ([`LoraTensors::a_group`]) for the grouped op; see
    /// [`LoraState::set_compute_copies_grouped`].
    pub fn set_compute_copies(&mut self, dtype: DType) -> Result<()> {
        let grouped = self.dropout == 0.0;
        self.set_compute_copies_grouped(dtype, grouped)
    }

    /// [`LoraState::set_compute_copies`], choosing whether grouped projections get one
    /// stacked A per group (`grouped`: what the fused path without dropout reads) or an A
    /// copy each (what the per-projection paths read: dropout, unfused LoRA). Either way
    /// every A and B is rounded once, into the same total bytes.
    pub fn set_compute_copies_grouped(&mut self, dtype: DType, grouped: bool) -> Result<()> {
        if dtype != DType::BF16 {
            return Ok(());
        }
        let alloc = |shape: &[usize], like: &Tensor| -> Result<Tensor> {
            Ok(match like.device() {
                Device::Cuda(g) => Tensor::uninit_cuda(&g, shape, dtype)?,
                Device::Cpu => Tensor::zeros(shape, dtype, &Device::Cpu)?,
            })
        };
        // Where each master goes: (destination index, element offset).
        let mut masters: Vec<&Tensor> = Vec::new();
        let mut at = Vec::new();
        let mut copies = Vec::new();
        for layer in &self.layers {
            let mut in_group = [false; 7];
            if grouped {
                for group in SHARED_INPUT_GROUPS {
                    let members = adapted(layer, group);
                    let Some(first) = members.first() else {
                        continue;
                    };
                    let rows: usize = members.iter().map(|t| t.rank()).sum();
                    let dst = copies.len();
                    copies.push(alloc(&[rows, first.a.shape()[1]], &first.a)?);
                    let mut offset = 0;
                    for t in members {
                        masters.push(&t.a);
                        at.push((dst, offset));
                        offset += t.a.elem_count();
                    }
                    for &p in group {
                        in_group[p as usize] = true;
                    }
                }
            }
            for (p, t) in layer.iter().enumerate() {
                let Some(t) = t else { continue };
                let own: &[&Tensor] = if in_group[p] { &[&t.b] } else { &[&t.a, &t.b] };
                for &m in own {
                    at.push((copies.len(), 0));
                    copies.push(alloc(m.shape(), m)?);
                    masters.push(m);
                }
            }
        }
        cast_multi_to_bf16_at(&masters, &mut copies, &at)?;
        // Hand the copies out in the order they were made.
        let mut copies = copies.into_iter();
        for layer in &mut self.layers {
            let mut in_group = [false; 7];
            if grouped {
                for group in SHARED_INPUT_GROUPS {
                    let first = group.iter().find(|&&p| layer[p as usize].is_some());
                    let Some(&first) = first else { continue };
                    let t = layer[first as usize].as_mut().expect("found above");
                    t.a_group = copies.next();
                    for &p in group {
                        in_group[p as usize] = true;
                    }
                }
            }
            for (p, t) in layer.iter_mut().enumerate() {
                let Some(t) = t else { continue };
                if !in_group[p] {
                    t.a_compute = copies.next();
                }
                t.b_compute = copies.next();
            }
        }
        Ok(())
    }

    /// Drop the copies [`LoraState::set_compute_copies`] made.
    pub fn clear_compute_copies(&mut self) {
        for (_, _, t) in self.iter_mut() {
            t.a_compute = None;
            t.b_compute = None;
            t.a_group = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tigon_kernels::rng::Rng;

    fn adapter(rng: &mut Rng, r: usize, inp: usize, out: usize) -> LoraTensors {
        let a = Tensor::from_f32(&[r, inp], rng.normal_vec(r * inp, 0.3)).unwrap();
        let b = Tensor::from_f32(&[out, r], rng.normal_vec(out * r, 0.3)).unwrap();
        LoraTensors::new(&a, &b, 2.0, &Device::Cpu).unwrap()
    }

    fn bf16_of(t: &Tensor) -> Vec<f32> {
        tigon_kernels::ops::elementwise::cast(t, DType::BF16)
            .unwrap()
            .to_f32_vec()
            .unwrap()
    }

    /// Grouped copies: each group's adapted A stacked in projection order on its first
    /// adapted projection (ranks may differ, members may be missing), no A copy of their
    /// own, B copies for all; projections outside the groups (o, down) keep their own A.
    /// Ungrouped: an A copy for everyone. The same bytes either way, and clearing drops all.
    #[test]
    fn compute_copies_stack_each_groups_a() {
        let mut rng = Rng::new(3);
        let (h, f) = (8, 12);
        let mut state = LoraState::empty(2);
        // Layer 0: k (r 2) and v (r 3) of q/k/v, o, and up (r 4) alone in gate/up.
        state.layers[0][Projection::K as usize] = Some(adapter(&mut rng, 2, h, 4));
        state.layers[0][Projection::V as usize] = Some(adapter(&mut rng, 3, h, 4));
        state.layers[0][Projection::O as usize] = Some(adapter(&mut rng, 2, h, h));
        state.layers[0][Projection::Up as usize] = Some(adapter(&mut rng, 4, h, f));
        // Layer 1: only down, outside every group.
        state.layers[1][Projection::Down as usize] = Some(adapter(&mut rng, 5, f, h));
        let bytes = |s: &LoraState| -> usize {
            s.iter()
                .map(|(_, _, t)| {
                    [&t.a_compute, &t.b_compute, &t.a_group]
                        .iter()
                        .filter_map(|c| c.as_ref().map(|c| c.size_in_bytes()))
                        .sum::<usize>()
                })
                .sum()
        };
        state
            .set_compute_copies_grouped(DType::BF16, false)
            .unwrap();
        let ungrouped = bytes(&state);
        for (_, _, t) in state.iter() {
            assert!(t.a_group.is_none());
            assert_eq!(
                t.a_compute.as_ref().unwrap().to_f32_vec().unwrap(),
                bf16_of(&t.a)
            );
            assert_eq!(
                t.b_compute.as_ref().unwrap().to_f32_vec().unwrap(),
                bf16_of(&t.b)
            );
        }
        state.clear_compute_copies();
        assert_eq!(bytes(&state), 0);
        state.set_compute_copies(DType::BF16).unwrap(); // no dropout: grouped
        assert_eq!(bytes(&state), ungrouped);
        let l0 = &state.layers[0];
        let (k, v) = (
            l0[Projection::K as usize].as_ref().unwrap(),
            l0[Projection::V as usize].as_ref().unwrap(),
        );
        let stacked = k.a_group.as_ref().unwrap();
        assert_eq!(stacked.shape(), &[5, h]);
        assert_eq!(
            stacked.to_f32_vec().unwrap(),
            [bf16_of(&k.a), bf16_of(&v.a)].concat()
        );
        assert!(k.a_compute.is_none() && v.a_compute.is_none() && v.a_group.is_none());
        let up = l0[Projection::Up as usize].as_ref().unwrap();
        assert_eq!(
            up.a_group.as_ref().unwrap().to_f32_vec().unwrap(),
            bf16_of(&up.a)
        );
        for p in [Projection::O, Projection::Down] {
            let layer = if p == Projection::O { 0 } else { 1 };
            let t = state.get(layer, p).unwrap();
            assert!(t.a_group.is_none());
            assert_eq!(
                t.a_compute.as_ref().unwrap().to_f32_vec().unwrap(),
                bf16_of(&t.a)
            );
        }
        for (_, _, t) in state.iter() {
            assert_eq!(
                t.b_compute.as_ref().unwrap().to_f32_vec().unwrap(),
                bf16_of(&t.b)
            );
        }
        // With dropout the per-projection paths run: no stacking.
        state.clear_compute_copies();
        state.dropout = 0.1;
        state.set_compute_copies(DType::BF16).unwrap();
        assert!(state
            .iter()
            .all(|(_, _, t)| t.a_group.is_none() && t.a_compute.is_some()));
        state.clear_compute_copies();
        assert_eq!(bytes(&state), 0);
    }
}
