//! The whole decoder: embedding, layers, final norm, and the LM head fused into the loss.
//! One call runs the forward and the backward of a micro-batch and accumulates the LoRA
//! gradients; the optimizer step is separate so micro-batches can accumulate.

use tigon_kernels::ops::adamw::{AdamW, AdamWTensors};
use tigon_kernels::ops::attention::Docs;
use tigon_kernels::ops::cross_entropy::CrossEntropy;
use tigon_kernels::ops::dropout::mask_key;
use tigon_kernels::ops::embedding::embedding_forward;
use tigon_kernels::ops::fused_linear_cross_entropy::{
    chunk_tokens_within, FusedLinearCrossEntropy,
};

/// The logits chunk of the training step's fused LM head + loss without checkpointing.
const LARGE_LOSS_CHUNK_BYTES: usize = 256 << 20;
use tigon_kernels::ops::matmul::matmul;
use tigon_kernels::ops::rms_norm::{RmsNorm, RmsNormKind};
use tigon_kernels::{DType, Device, Tensor};

use crate::error::{EngineError, Result};
use crate::fusion::Fusion;
use crate::layer::{BatchCtx, Layer};
use crate::lora::{layer_splits, LayerLora, LayerSplits, LoraPrecision, LoraState};
use crate::lora_dropout::LayerDropout;
use crate::offload::{host_gather, LayerStream, Offload, OffloadState};
use crate::spec::DecoderSpec;
use tigon_model::weights::LayerWeights;
use tigon_model::ModelWeights;

/// A micro-batch: one stream of tokens holding one or more documents back to back.
#[derive(Clone, Debug, Default)]
pub struct Batch {
    pub input_ids: Vec<i32>,
    /// The token each position must predict, or -100 (already shifted: see
    /// [`Batch::from_rows`]).
    pub targets: Vec<i32>,
    /// Position within its document, restarting at 0.
    pub positions: Vec<i32>,
    /// Document boundaries over the token axis: `[0, len0, len0 + len1, ..., tokens]`.
    pub cu_seqlens: Vec<i32>,
}

impl Batch {
    /// From rows of HF-style `(input_ids, labels)` (labels aligned with inputs, as
    /// transformers takes them): each row is one document; the target at position t is
    /// label t+1 of the same row, and the last position of each row predicts nothing.
    pub fn from_rows(rows: &[(Vec<i32>, Vec<i32>)]) -> Result<Batch> {
        let mut b = Batch {
            cu_seqlens: vec![0],
            ..Default::default()
        };
        for (i, (ids, labels)) in rows.iter().enumerate() {
            if ids.len() != labels.len() || ids.is_empty() {
                return Err(EngineError::Batch(format!(
                    "row {i}: {} input ids and {} labels",
                    ids.len(),
                    labels.len()
                )));
            }
            b.input_ids.extend_from_slice(ids);
            b.targets.extend(labels[1..].iter().copied().chain([-100]));
            b.positions.extend(0..ids.len() as i32);
            b.cu_seqlens.push(b.input_ids.len() as i32);
        }
        Ok(b)
    }

    pub fn tokens(&self) -> usize {
        self.input_ids.len()
    }

    pub fn max_seqlen(&self) -> usize {
        self.cu_seqlens
            .windows(2)
            .map(|w| (w[1] - w[0]) as usize)
            .max()
            .unwrap_or(0)
    }

    /// Targets that count in the loss.
    pub fn n_valid(&self) -> usize {
        self.targets.iter().filter(|&&t| t != -100).count()
    }

    fn validate(&self, spec: &DecoderSpec) -> Result<()> {
        let vocab = spec.vocab;
        let n = self.tokens();
        if n == 0 {
            return Err(EngineError::Batch("empty batch".into()));
        }
        if self.targets.len() != n || self.positions.len() != n {
            return Err(EngineError::Batch(format!(
                "{n} input ids, {} targets, {} positions",
                self.targets.len(),
                self.positions.len()
            )));
        }
        if self.cu_seqlens.first() != Some(&0)
            || self.cu_seqlens.last() != Some(&(n as i32))
            || self.cu_seqlens.windows(2).any(|w| w[1] <= w[0])
        {
            return Err(EngineError::Batch(format!(
                "cu_seqlens {:?} must rise strictly from 0 to {n}",
                self.cu_seqlens
            )));
        }
        if let Some((i, &id)) = self
            .input_ids
            .iter()
            .enumerate()
            .find(|(_, &id)| id < 0 || id as usize >= vocab)
        {
            return Err(EngineError::Batch(format!(
                "token {i}: id {id} outside the vocabulary of {vocab}"
            )));
        }
        if let Some(w) = spec.sliding_window {
            if self.max_seqlen() > w {
                return Err(EngineError::Batch(format!(
                    "a document of {} tokens is longer than the model's sliding window of {w}, \
                     which the attention kernel does not implement",
                    self.max_seqlen()
                )));
            }
        }
        Ok(())
    }
}

pub struct Decoder {
    pub spec: DecoderSpec,
    /// What lives in host memory ([`Decoder::set_offload`]). Declared before `weights` so it
    /// is dropped first: it page-locks offloaded weights' memory.
    offload: Option<OffloadState>,
    /// The base weights; with an offload, the offloaded ones are host tensors. Do not
    /// replace those while the offload is on.
    pub weights: ModelWeights,
    pub lora: LoraState,
    pub device: Device,
    /// Keep only each layer's input in the forward and recompute the rest in the backward.
    pub checkpointing: bool,
    /// Which ops run as fused kernels and which as plain compositions (training, evaluation
    /// and the optimizer alike); [`Fusion::all`] by default.
    pub fusion: Fusion,
    /// How the adapter path is computed over a bf16 base: fp32-accurate as PEFT (the
    /// default) or in bf16. Only with the fused LoRA op; f32 models are exact either way.
    pub lora_precision: LoraPrecision,
    /// The fused LM head + loss computes only the rows that carry a label (its
    /// `skip_ignored`; same loss and gradients). On by default; off runs every row, the
    /// baseline of an A/B benchmark.
    pub loss_skips_unlabelled: bool,
    /// The seed of the LoRA dropout masks (training with `lora.dropout > 0` only); see
    /// [`Decoder::begin_dropout_step`].
    pub dropout_seed: u64,
    /// Micro-batches run since the seed was set: every one draws its own masks.
    micro_batch: u64,
    /// Layer weight copies host -> device of the last [`Decoder::forward_backward`].
    layer_copies: usize,
}

/// The result of one micro-batch: the loss stays on the device until asked for.
pub struct StepLoss {
    /// f32 `[1]`: sum of token losses / the normaliser.
    pub loss: Tensor,
    pub n_valid: usize,
}

impl Decoder {
    /// A decoder over loaded base weights with the LoRA state `lora` (or
    /// [`LoraState::empty`]), on the device the weights are on (that of the final norm:
    /// weights loaded for an offload may leave others on the host, see
    /// [`Decoder::set_offload`]).
    pub fn new(weights: ModelWeights, lora: LoraState) -> Result<Decoder> {
        let spec = DecoderSpec::from_config(&weights.config);
        if lora.layers.len() != spec.layers {
            return Err(EngineError::Lora(format!(
                "LoRA state for {} layers on a model of {}",
                lora.layers.len(),
                spec.layers
            )));
        }
        let device = weights.norm.device();
        Ok(Decoder {
            spec,
            offload: None,
            weights,
            lora,
            device,
            checkpointing: false,
            loss_skips_unlabelled: true,
            fusion: Fusion::all(),
            lora_precision: LoraPrecision::default(),
            dropout_seed: 0,
            micro_batch: 0,
            layer_copies: 0,
        })
    }

    /// Offload frozen data to host memory ([`Offload`]): the embedding table (untied models)
    /// and the weights of `offload.layers` layers, streamed to the device for each use. What
    /// the offload keeps on the host is moved there (and page-locked on a GPU); everything
    /// else is moved to the device, so weights loaded with
    /// [`ModelWeights::from_dir_placed`] and [`Offload::host_placement`] never hold device
    /// memory for offloaded tensors. `Offload::default()` turns offloading off. Results are
    /// bit-identical with and without: only where the data waits changes.
    pub fn set_offload(&mut self, offload: Offload) -> Result<()> {
        self.offload = None;
        let state = OffloadState::new(offload, &mut self.weights, &self.device)?;
        self.offload = offload.is_on().then_some(state);
        Ok(())
    }

    /// The offload settings in force (all off without [`Decoder::set_offload`]).
    pub fn offload(&self) -> Offload {
        self.offload.as_ref().map(|o| o.config).unwrap_or_default()
    }

    /// Whether the embedding table is on the host (asked for and untied).
    pub fn embedding_on_host(&self) -> bool {
        self.offload.as_ref().is_some_and(|o| o.embedding_on_host)
    }

    /// How many layers' weights the last [`Decoder::forward_backward`] copied from host
    /// memory: two per streamed layer, less one when the last layer is streamed (its
    /// forward copy serves its backward).
    pub fn layer_copies(&self) -> usize {
        self.layer_copies
    }

    /// The layers whose weights are streamed from host memory, ascending.
    pub fn streamed_layers(&self) -> Vec<usize> {
        self.offload
            .as_ref()
            .map(|o| (0..o.streamed.len()).filter(|&i| o.streamed[i]).collect())
            .unwrap_or_default()
    }

    /// Tokens per chunk of the training step's fused LM head + loss. Without checkpointing
    /// the step holds every layer's activations (gigabytes at the 8B shape), so a 256 MiB
    /// logits chunk instead of the default 64 MiB adds little to the peak and runs the two
    /// GEMMs faster (8192 tokens at Llama-3's vocab on the H100: 26.6 against 29.8 ms,
    /// bench/results/2026-11-23-h100-kernels/rerun-rms-flce); with checkpointing the peak
    /// is small and the default chunk keeps it so.
    fn loss_chunk_tokens(&self) -> Option<usize> {
        if self.checkpointing {
            return None;
        }
        Some(chunk_tokens_within(
            LARGE_LOSS_CHUNK_BYTES,
            self.spec.vocab,
            self.weights.embed_tokens.dtype(),
        ))
    }

    /// Whether the adapter path runs through hi/lo splits (fp32-accurate): bf16 weights,
    /// the fused LoRA op, and [`LoraPrecision::Fp32`].
    fn uses_splits(&self) -> bool {
        self.lora_precision == LoraPrecision::Fp32
            && self.fusion.lora_linear
            && self.weights.embed_tokens.dtype() == DType::BF16
    }

    /// Layer `i`'s adapter splits when [`Decoder::uses_splits`], made for one pass over it.
    fn splits(&self, i: usize) -> Result<Option<LayerSplits>> {
        if !self.uses_splits() {
            return Ok(None);
        }
        // Evaluation runs no dropout: grouped wherever the fused LoRA op runs.
        Ok(Some(layer_splits(
            &self.lora.layers[i],
            self.fusion.lora_linear,
        )?))
    }

    /// Seed the LoRA dropout masks of optimizer step `step` of a run seeded `run_seed`, and
    /// restart the micro-batch count: a step's masks depend only on (run_seed, step, its
    /// micro-batch index, layer, projection), so a resumed run draws the masks the
    /// uninterrupted one would have.
    pub fn begin_dropout_step(&mut self, run_seed: u64, step: u64) {
        self.dropout_seed = mask_key(run_seed, step);
        self.micro_batch = 0;
    }

    fn norm(&self) -> RmsNorm {
        RmsNorm {
            eps: self.spec.norm_eps,
            kind: RmsNormKind::Llama,
        }
    }

    fn ctx(&self, batch: &Batch) -> Result<BatchCtx> {
        batch.validate(&self.spec)?;
        let n = batch.tokens();
        Ok(BatchCtx {
            tokens: n,
            positions: Tensor::from_i32(&[n], batch.positions.clone())?.to_device(&self.device)?,
            docs: Docs::new(&batch.cu_seqlens, batch.max_seqlen(), &self.device)?,
        })
    }

    fn embed(&self, batch: &Batch) -> Result<Tensor> {
        if self.embedding_on_host() {
            // Gather on the host and upload only the rows.
            return Ok(host_gather(&batch.input_ids, &self.weights.embed_tokens)?
                .to_device(&self.device)?);
        }
        let ids = Tensor::from_i32(&[batch.tokens()], batch.input_ids.clone())?
            .to_device(&self.device)?;
        Ok(embedding_forward(&ids, &self.weights.embed_tokens)?)
    }

    /// The final hidden states (after the last norm), no gradients.
    pub fn hidden(&self, batch: &Batch) -> Result<Tensor> {
        let ctx = self.ctx(batch)?;
        let mut x = self.embed(batch)?;
        let mut stream = layer_stream(&self.offload, &self.weights, 0..self.spec.layers)?;
        for i in 0..self.spec.layers {
            let w = stream.take(i)?;
            let splits = self.splits(i)?;
            let layer = Layer {
                spec: &self.spec,
                w: w.get(),
                fusion: self.fusion,
                dropout: None,
                splits: splits.as_ref(),
            };
            x = layer.forward(&self.lora.layers[i], &x, &ctx, false)?.0;
            stream.give_back(i, w);
        }
        Ok(self
            .fusion
            .rms_norm_forward(&x, &self.weights.norm, self.norm())?
            .y)
    }

    /// Full logits `[tokens, vocab]` (in the compute dtype): for parity tests and small evals.
    pub fn logits(&self, batch: &Batch) -> Result<Tensor> {
        let h = self.hidden(batch)?;
        Ok(matmul(&h, false, self.weights.lm_head(), true, h.dtype())?)
    }

    /// The summed token loss of `batch` and the number of tokens it sums over, forward
    /// only (evaluation): the LM head stays fused into the loss, so the full logits are
    /// never stored, and no LoRA gradient is touched.
    pub fn eval_loss(&self, batch: &Batch) -> Result<(f64, usize)> {
        let h = self.hidden(batch)?;
        let targets = Tensor::from_i32(&[batch.tokens()], batch.targets.clone())?;
        let p = FusedLinearCrossEntropy {
            ce: CrossEntropy {
                num_items: Some(1.0),
                ..CrossEntropy::default()
            },
            chunk_tokens: None,
            skip_ignored: self.loss_skips_unlabelled,
        };
        let out = self
            .fusion
            .linear_cross_entropy(&h, self.weights.lm_head(), &targets, &p)?;
        Ok((out.loss.to_f32_vec()?[0] as f64, out.n_valid))
    }

    /// Forward and backward of one micro-batch. The loss is normalised by `num_items`
    /// (the non-ignored targets of every micro-batch of the step) and the LoRA gradients
    /// are accumulated onto what is there.
    pub fn forward_backward(&mut self, batch: &Batch, num_items: Option<f32>) -> Result<StepLoss> {
        // With splits the fused op reads the fp32 masters and each layer's splits; the
        // bf16 copies would only serve the other paths, which cast on their own.
        // Without splits: one stacked A per q/k/v and gate/up group when the layer runs
        // them through the grouped op (fused LoRA, no dropout), an A each otherwise.
        if !self.uses_splits() {
            let grouped = self.fusion.lora_linear && self.lora.dropout == 0.0;
            self.lora
                .set_compute_copies_grouped(self.weights.embed_tokens.dtype(), grouped)?;
        }
        let out = self.run_forward_backward(batch, num_items);
        self.lora.clear_compute_copies();
        out
    }

    fn run_forward_backward(&mut self, batch: &Batch, num_items: Option<f32>) -> Result<StepLoss> {
        let p = self.lora.dropout;
        if !(0.0..1.0).contains(&p) {
            return Err(EngineError::Lora(format!(
                "lora_dropout {p} must be in [0, 1)"
            )));
        }
        let micro_batch = self.micro_batch;
        self.micro_batch += 1;
        let (seed, spec, fusion) = (self.dropout_seed, &self.spec, self.fusion);
        let with_splits = self.uses_splits();
        // The layers run q/k/v and gate/up grouped with the fused LoRA op and no dropout.
        let grouped = fusion.lora_linear && p == 0.0;
        fn layer<'a>(
            spec: &'a DecoderSpec,
            w: &'a LayerWeights,
            fusion: Fusion,
            dropout: Option<LayerDropout>,
            splits: Option<&'a LayerSplits>,
        ) -> Layer<'a> {
            Layer {
                spec,
                w,
                fusion,
                dropout,
                splits,
            }
        }
        let dropout = |i: usize| LayerDropout::new(p, seed, micro_batch, i);
        let splits_of = |lora: &LayerLora| -> Result<Option<LayerSplits>> {
            Ok(if with_splits {
                Some(layer_splits(lora, grouped)?)
            } else {
                None
            })
        };
        let ctx = self.ctx(batch)?;
        let layers = self.spec.layers;
        // Every layer is visited twice: forward, then backward in reverse.
        let mut stream = layer_stream(
            &self.offload,
            &self.weights,
            (0..layers).chain((0..layers).rev()),
        )?;
        // Inputs of every layer (the checkpoints), and everything else unless recomputing.
        // With checkpointing the embedding output is not kept either: a gather from the
        // ids is cheaper than holding it through the step.
        let mut inputs: Vec<Option<Tensor>> = vec![Some(self.embed(batch)?)];
        let mut saved = Vec::with_capacity(self.spec.layers);
        for i in 0..self.spec.layers {
            let x = inputs[i].as_ref().expect("layer input");
            let w = stream.take(i)?;
            let splits = splits_of(&self.lora.layers[i])?;
            let (out, s) = layer(spec, w.get(), fusion, dropout(i), splits.as_ref()).forward(
                &self.lora.layers[i],
                x,
                &ctx,
                !self.checkpointing,
            )?;
            stream.give_back(i, w);
            saved.push(s);
            inputs.push(Some(out));
            if i == 0 && self.checkpointing {
                inputs[0] = None;
            }
        }
        let last = inputs
            .pop()
            .flatten()
            .expect("one input per layer plus the output");
        let fin = self
            .fusion
            .rms_norm_forward(&last, &self.weights.norm, self.norm())?;
        // On the host: the loss computes only the labelled rows (a prompt's tokens, each
        // document's last) and checks the labels there, with no wait for the device.
        let targets = Tensor::from_i32(&[batch.tokens()], batch.targets.clone())?;
        let p = FusedLinearCrossEntropy {
            ce: CrossEntropy {
                num_items,
                ..CrossEntropy::default()
            },
            chunk_tokens: self.loss_chunk_tokens(),
            skip_ignored: self.loss_skips_unlabelled,
        };
        let loss =
            self.fusion
                .linear_cross_entropy(&fin.y, self.weights.lm_head(), &targets, &p)?;
        drop(fin.y);
        let mut dx = loss.dh;
        self.fusion.rms_norm_backward_inplace(
            &mut dx,
            &last,
            &self.weights.norm,
            &fin.rstd,
            self.norm(),
            None,
        )?;
        drop(last);
        for i in (0..self.spec.layers).rev() {
            let x = match inputs.pop().flatten() {
                Some(x) => x,
                None => self.embed(batch)?,
            };
            let w = stream.take(i)?;
            let splits = splits_of(&self.lora.layers[i])?;
            let layer = layer(spec, w.get(), fusion, dropout(i), splits.as_ref());
            let s = match saved[i].take() {
                Some(s) => s,
                None => layer.recompute(&self.lora.layers[i], &x, &ctx)?,
            };
            dx = layer.backward(&mut self.lora.layers[i], dx, &x, s, &ctx)?;
            stream.give_back(i, w);
        }
        self.layer_copies = stream.copies();
        Ok(StepLoss {
            loss: loss.loss,
            n_valid: loss.n_valid,
        })
    }

    /// Zero every LoRA gradient (start of an accumulation window).
    pub fn zero_grads(&mut self) -> Result<()> {
        let device = self.device.clone();
        for (_, _, t) in self.lora.iter_mut() {
            t.da = Tensor::zeros(t.a.shape(), DType::F32, &device)?;
            t.db = Tensor::zeros(t.b.shape(), DType::F32, &device)?;
        }
        Ok(())
    }

    /// One AdamW step over every LoRA tensor, with optional clipping of the global
    /// gradient norm; returns the norm before clipping (a device scalar) and zeroes the grads.
    pub fn optimizer_step(
        &mut self,
        step: u64,
        p: &AdamW,
        max_grad_norm: Option<f32>,
    ) -> Result<Tensor> {
        let norm = {
            let grads: Vec<&Tensor> = self
                .lora
                .iter()
                .flat_map(|(_, _, t)| [&t.da, &t.db])
                .collect();
            self.fusion.grad_norm(&grads)?
        };
        let mut tensors = Vec::new();
        for (_, _, t) in self.lora.iter_mut() {
            tensors.push(AdamWTensors {
                param: &mut t.a,
                grad: &mut t.da,
                m: &mut t.ma,
                v: &mut t.va,
            });
            tensors.push(AdamWTensors {
                param: &mut t.b,
                grad: &mut t.db,
                m: &mut t.mb,
                v: &mut t.vb,
            });
        }
        let fusion = self.fusion;
        fusion.adamw_step(&mut tensors, step, p, max_grad_norm.map(|m| (m, &norm)))?;
        Ok(norm)
    }
}

/// The layers' weights for a pass that visits layers in `order` (a free function so that it
/// borrows only the offload and the weights, not the LoRA state the backward writes).
fn layer_stream<'w>(
    offload: &'w Option<OffloadState>,
    weights: &'w ModelWeights,
    order: impl IntoIterator<Item = usize>,
) -> Result<LayerStream<'w>> {
    match offload {
        Some(o) => o.stream(&weights.layers, order),
        None => Ok(LayerStream::resident(&weights.layers)),
    }
}
