//! PEFT's `lora_dropout` in training: `y = x W^T (+ bias) + s B(A(dropout(x)))`, one
//! dropout per adapted projection (q, k and v each draw their own mask although they share
//! an input), inverted (kept values scaled by `1 / (1 - p)`), the base path untouched.
//!
//! No mask is stored. Each one is a pure function of `(seed, stream)` (see
//! `tigon_kernels::ops::dropout`), the stream naming the micro-batch, the layer and the
//! projection, so the forward, the recomputation under activation checkpointing and the
//! backward all draw the same mask: the backward regenerates `dropout(x)` for `dA` and
//! applies the mask again to the adapter's share of `dx`.

use tigon_kernels::ops::dropout::{dropout_backward_inplace, dropout_forward};
use tigon_kernels::ops::elementwise::{add_inplace, cast};
use tigon_kernels::ops::lora_linear::LoraLinear;
use tigon_kernels::ops::matmul::{matmul, matmul_into};
use tigon_kernels::Tensor;
use tigon_model::Projection as Proj;

use crate::error::Result;

/// The dropout of one layer in one training micro-batch. Evaluation passes none.
#[derive(Clone, Copy, Debug)]
pub struct LayerDropout {
    /// In (0, 1): a zero dropout is no `LayerDropout` at all, so p = 0 keeps the plain path.
    pub p: f64,
    /// The step's seed.
    pub seed: u64,
    /// `(micro-batch << 32) | (layer << 3)`: the projection index fills the low 3 bits.
    pub stream_base: u64,
}

impl LayerDropout {
    /// The dropout of layer `layer` in micro-batch `micro_batch`, or None when `p` is 0.
    pub fn new(p: f64, seed: u64, micro_batch: u64, layer: usize) -> Option<LayerDropout> {
        (p != 0.0).then_some(LayerDropout {
            p,
            seed,
            stream_base: (micro_batch << 32) | ((layer as u64) << 3),
        })
    }

    fn stream(&self, p: Proj) -> u64 {
        self.stream_base | p as u64
    }

    /// `dropout(x)` as projection `p`'s adapter sees it: the same tensor every time it is
    /// asked for with the same arguments.
    pub fn adapter_input(&self, p: Proj, x: &Tensor) -> Result<Tensor> {
        Ok(dropout_forward(x, self.p, self.seed, self.stream(p))?)
    }

    /// `dx = dy W + mask/(1-p) * ((s dy B) A)`: the input gradient of projection `p`, the
    /// adapter's share through the mask (which `lora_linear_backward`'s `dx` cannot apply).
    pub fn backward_dx(&self, p: Proj, layer: &LoraLinear, dy: &Tensor) -> Result<Tensor> {
        let dt = dy.dtype();
        let (out, inp) = layer.w.rows_cols();
        let lead = &dy.shape()[..dy.shape().len() - 1];
        let as_dt = |t: &Tensor| -> Result<Option<Tensor>> {
            Ok((t.dtype() != dt).then(|| cast(t, dt)).transpose()?)
        };
        let (a16, b16) = (as_dt(layer.a)?, as_dt(layer.b)?);
        let (a, b) = (
            a16.as_ref().unwrap_or(layer.a),
            b16.as_ref().unwrap_or(layer.b),
        );
        // s (dy B): the scale folded into the GEMM (alpha), as the fused op does.
        let mut dxa = Tensor::zeros(
            &[dy.elem_count() / out, layer.b.shape()[1]],
            dt,
            &dy.device(),
        )?;
        matmul_into(dy, false, b, false, &mut dxa, layer.scaling, 0.0)?;
        let mut dx_lora = matmul(&dxa, false, a, false, dt)?;
        drop(dxa);
        dropout_backward_inplace(&mut dx_lora, self.p, self.seed, self.stream(p))?;
        let mut dx = matmul(dy, false, layer.w, false, dt)?;
        add_inplace(&mut dx, &dx_lora, 1.0)?;
        Ok(dx.reshape(&[lead, &[inp]].concat())?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decoder::{Batch, Decoder};
    use crate::fusion::Fusion;
    use crate::parity::tests::{fixture, fixture_decoder, loss_and_grads};

    /// PEFT's default is 0.05; a larger p makes the masks' effect on the loss plain.
    const P: f64 = 0.3;

    fn decoder(p: f64) -> (Decoder, Batch) {
        let (mut d, b) = fixture_decoder(&fixture("tiny_llama"));
        d.lora.dropout = p;
        (d, b)
    }

    /// Loss and every LoRA gradient of one micro-batch of step 1 under `seed`.
    fn step(d: &mut Decoder, b: &Batch, seed: u64) -> Vec<Vec<f32>> {
        d.zero_grads().unwrap();
        d.begin_dropout_step(seed, 1);
        loss_and_grads(d, b)
    }

    fn loss(d: &mut Decoder, b: &Batch, seed: u64) -> f64 {
        step(d, b, seed)[0][0] as f64
    }

    /// The gradients are those of the masked function: for every LoRA tensor of layer 0
    /// (whose gradients flow back through layer 1's masked adapter inputs) and layer 1's
    /// down projection (its own backward path), the central difference of the loss (same
    /// seed, so the same masks) along the normalised gradient matches the gradient's norm.
    /// The step is 1% of the tensor's norm: the f32 rounding of the loss (relative 1e-7,
    /// divided by h) and the O(h^2) truncation stay near 1e-3 relative, under the 1%
    /// tolerance; leaving the mask off the adapter's share of dx misses by 10-30%.
    #[test]
    fn gradients_match_finite_differences_of_the_masked_loss() {
        let (mut d, b) = decoder(P);
        let grads = step(&mut d, &b, 42);
        let keys: Vec<(usize, Proj)> = d.lora.iter().map(|(l, p, _)| (l, p)).collect();
        for (t, &(layer, proj)) in keys.iter().enumerate() {
            if layer != 0 && proj != Proj::Down {
                continue;
            }
            for which in 0..2 {
                let g = &grads[1 + 2 * t + which];
                let norm = g.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt();
                assert!(norm > 0.0, "layer {layer} {proj:?} {which}: zero gradient");
                let get = |d: &mut Decoder| {
                    let lt = d.lora.layers[layer][proj as usize].as_mut().unwrap();
                    if which == 0 { &mut lt.a } else { &mut lt.b }
                        .to_f32_vec()
                        .unwrap()
                };
                let theta = get(&mut d);
                let tnorm = theta
                    .iter()
                    .map(|v| (*v as f64).powi(2))
                    .sum::<f64>()
                    .sqrt();
                let h = 1e-2 * tnorm;
                let mut at = |sign: f64| {
                    let moved: Vec<f32> = theta
                        .iter()
                        .zip(g)
                        .map(|(x, gi)| (*x as f64 + sign * h * *gi as f64 / norm) as f32)
                        .collect();
                    let lt = d.lora.layers[layer][proj as usize].as_mut().unwrap();
                    let slot = if which == 0 { &mut lt.a } else { &mut lt.b };
                    let shape = slot.shape().to_vec();
                    *slot = tigon_kernels::Tensor::from_f32(&shape, moved).unwrap();
                    loss(&mut d, &b, 42)
                };
                let fd = (at(1.0) - at(-1.0)) / (2.0 * h);
                let lt = d.lora.layers[layer][proj as usize].as_mut().unwrap();
                let slot = if which == 0 { &mut lt.a } else { &mut lt.b };
                let shape = slot.shape().to_vec();
                *slot = tigon_kernels::Tensor::from_f32(&shape, theta).unwrap();
                let rel = (fd - norm).abs() / norm;
                assert!(
                    rel < 1e-2,
                    "layer {layer} {proj:?} {}: d/dh {fd} vs |grad| {norm}",
                    ["A", "B"][which]
                );
            }
        }
    }

    /// Dropout changes the training loss (the masks reach the adapters), and the recompute
    /// of activation checkpointing and every fusion switch draw the forward's masks again:
    /// loss and gradients are bitwise those of the run that saved everything.
    #[test]
    fn checkpointing_and_fusion_redraw_the_same_masks() {
        let (mut plain, b) = decoder(0.0);
        let undropped = step(&mut plain, &b, 7);
        let run = |fusion: Fusion, checkpointing: bool| {
            let (mut d, b) = decoder(P);
            d.fusion = fusion;
            d.checkpointing = checkpointing;
            step(&mut d, &b, 7)
        };
        let reference = run(Fusion::all(), false);
        assert_ne!(
            reference[0], undropped[0],
            "dropout left the loss unchanged"
        );
        for (fusion, ckpt) in [
            (Fusion::all(), true),
            (Fusion::none(), false),
            (Fusion::none(), true),
        ] {
            assert!(
                run(fusion, ckpt) == reference,
                "fusion {fusion}, checkpointing {ckpt}"
            );
        }
    }

    /// The same seed gives the same loss and gradients; another seed, or the next
    /// micro-batch of the same step, draws other masks. With p = 0 the seed is irrelevant.
    #[test]
    fn masks_follow_the_seed_and_the_micro_batch() {
        let (mut d, b) = decoder(P);
        let first = step(&mut d, &b, 1);
        assert_eq!(step(&mut d, &b, 1), first);
        assert_ne!(step(&mut d, &b, 2), first);
        // A second micro-batch without a new seed: its own masks, so the accumulated
        // gradients are not twice the first.
        d.zero_grads().unwrap();
        d.begin_dropout_step(1, 1);
        let once = loss_and_grads(&mut d, &b);
        let twice = loss_and_grads(&mut d, &b);
        assert_eq!(once, first);
        assert_ne!(twice[0], once[0]);
        let (mut z, b) = decoder(0.0);
        assert_eq!(step(&mut z, &b, 1), step(&mut z, &b, 2));
    }

    /// Evaluation applies no dropout: the evaluation loss and the logits are bitwise those
    /// of the same adapter with p = 0.
    #[test]
    fn evaluation_ignores_dropout() {
        let (mut d, b) = decoder(P);
        let (z, _) = decoder(0.0);
        d.begin_dropout_step(3, 1);
        assert_eq!(d.eval_loss(&b).unwrap(), z.eval_loss(&b).unwrap());
        assert_eq!(
            d.logits(&b).unwrap().to_f32_vec().unwrap(),
            z.logits(&b).unwrap().to_f32_vec().unwrap()
        );
        // And training still runs after evaluating.
        assert!(step(&mut d, &b, 3)[0][0].is_finite());
    }

    /// The base path never sees dropout: with every B zero the adapters add exactly 0, so
    /// the training loss is bitwise that without dropout, while dB (which reads the
    /// dropped-out input through `x_d A^T`) differs.
    #[test]
    fn base_path_is_not_dropped() {
        let zero_b = |p: f64| {
            let (mut d, b) = decoder(p);
            for layer in d.lora.layers.iter_mut() {
                for t in layer.iter_mut().flatten() {
                    let shape = t.b.shape().to_vec();
                    t.b = tigon_kernels::Tensor::zeros(&shape, t.b.dtype(), &t.b.device()).unwrap();
                }
            }
            step(&mut d, &b, 5)
        };
        let (with, without) = (zero_b(P), zero_b(0.0));
        assert_eq!(with[0], without[0]);
        assert_ne!(with[2], without[2], "dB of the first adapter");
    }

    /// q, k and v share their input but not their masks (one dropout per projection).
    #[test]
    fn each_projection_draws_its_own_mask() {
        let d = LayerDropout::new(0.5, 9, 0, 0).unwrap();
        let x = tigon_kernels::Tensor::from_f32(&[4, 64], (1..=256).map(|i| i as f32).collect())
            .unwrap();
        let masks: Vec<Vec<f32>> = [Proj::Q, Proj::K, Proj::V]
            .iter()
            .map(|&p| d.adapter_input(p, &x).unwrap().to_f32_vec().unwrap())
            .collect();
        assert_ne!(masks[0], masks[1]);
        assert_ne!(masks[0], masks[2]);
        assert_ne!(masks[1], masks[2]);
        assert!(LayerDropout::new(0.0, 9, 0, 0).is_none());
        // Other layers and other micro-batches have other streams.
        let other = [
            LayerDropout::new(0.5, 9, 0, 1),
            LayerDropout::new(0.5, 9, 1, 0),
        ];
        for o in other {
            let m = o
                .unwrap()
                .adapter_input(Proj::Q, &x)
                .unwrap()
                .to_f32_vec()
                .unwrap();
            assert_ne!(m, masks[0]);
        }
    }

    /// A p outside [0, 1) is refused by the training step with the config's name.
    #[test]
    fn bad_dropout_is_refused() {
        let (mut d, b) = decoder(1.0);
        let e = d.forward_backward(&b, None).err().unwrap().to_string();
        assert!(e.contains("lora_dropout 1 must be in [0, 1)"), "{e}");
    }
}
