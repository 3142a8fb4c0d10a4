//! The training loop: data -> micro-batches -> forward/backward (gradients accumulated over
//! `grad_accum` micro-batches, normalised by the step's total trained tokens) -> AdamW with
//! the schedule and clipping -> metrics, evaluation and checkpoints.
//!
//! Everything is seeded (adapter init, holdout split, data order), and a checkpoint holds
//! all the state there is, so a resumed run takes the same steps as an uninterrupted one.

use std::path::{Path, PathBuf};
use std::time::Instant;

use tigon_engine::lora::LoraPrecision;
use tigon_engine::schedule::Schedule;
use tigon_engine::{Batch, Decoder, LoraState, Offload};
use tigon_kernels::ops::adamw::AdamW;
use tigon_kernels::{DType, Device, Gpu};
use tigon_model::{Adapter, LoraConfig, ModelConfig, ModelWeights, TargetModules};
use tigon_train::{
    load_jsonl, load_jsonl_files, split_holdout, DataLoader, DataOptions, Example, LoaderOptions,
    PackedBatch, Tokenizer,
};

use crate::checkpoint::{self, TrainerState};
use crate::config::{DeviceChoice, LoraPrecisionChoice, TrainConfig};
use crate::error::{Result, TrainerError};
use crate::metrics::{read_metrics, MetricsWriter, StepRecord, METRICS_FILE};
use crate::plot::{plot_losses, PLOT_FILE};

/// What the loop reports as it goes (the command line shows a progress bar; tests stay
/// quiet).
pub trait Observer {
    fn info(&mut self, _msg: &str) {}
    /// Training is about to run steps `first..=total`.
    fn start(&mut self, _first: u64, _total: u64) {}
    fn step(&mut self, _rec: &StepRecord) {}
    fn saved(&mut self, _step: u64, _dir: &Path) {}
    fn finish(&mut self) {}
}

/// An observer that reports nothing.
pub struct Quiet;
impl Observer for Quiet {}

#[derive(Clone, Copy, Debug, Default)]
pub struct RunOptions {
    /// Continue from the output folder's latest checkpoint.
    pub resume: bool,
    /// Start afresh even if the output folder has checkpoints (they are removed).
    pub overwrite: bool,
}

pub struct TrainOutcome {
    /// The trained model (base + adapter), for evaluation after training.
    pub decoder: Decoder,
    pub tokenizer: Tokenizer,
    /// Every step's record, from the start of training (across resumptions).
    pub records: Vec<StepRecord>,
    pub total_steps: u64,
    /// The final adapter folder (the output folder itself).
    pub adapter_dir: PathBuf,
    pub plot: PathBuf,
    pub device: String,
    pub train_examples: usize,
    pub eval_examples: usize,
}

/// The device `choice` asks for, and the dtype the base weights take there.
pub fn pick_device(choice: DeviceChoice) -> Result<(Device, DType)> {
    match choice {
        DeviceChoice::Cpu => Ok((Device::Cpu, DType::F32)),
        DeviceChoice::Cuda => Ok((Device::Cuda(Gpu::new(0)?), DType::BF16)),
        DeviceChoice::Auto => Ok(match Gpu::new(0) {
            Ok(g) => (Device::Cuda(g), DType::BF16),
            Err(_) => (Device::Cpu, DType::F32),
        }),
    }
}

/// A packed micro-batch as the engine takes it.
pub fn to_engine_batch(pb: &PackedBatch) -> Batch {
    Batch {
        input_ids: pb.input_ids.iter().map(|&t| t as i32).collect(),
        targets: pb.targets(),
        positions: pb.position_ids.clone(),
        cu_seqlens: pb.cu_seqlens.clone(),
    }
}

/// Token-mean held-out loss over `batches` (forward only).
pub fn eval_loss(decoder: &Decoder, batches: &[Batch]) -> Result<f64> {
    let (mut sum, mut n) = (0.0f64, 0usize);
    for b in batches {
        let (s, k) = decoder.eval_loss(b)?;
        sum += s;
        n += k;
    }
    Ok(if n == 0 { f64::NAN } else { sum / n as f64 })
}

pub fn lora_config(cfg: &TrainConfig) -> LoraConfig {
    let targets = if cfg.target_modules.len() == 1
        && matches!(
            cfg.target_modules[0].as_str(),
            "all-linear" | "all_linear" | "all"
        ) {
        TargetModules::AllLinear
    } else {
        TargetModules::Names(cfg.target_modules.clone())
    };
    LoraConfig {
        r: cfg.lora_r,
        lora_alpha: cfg.lora_alpha,
        lora_dropout: cfg.lora_dropout,
        target_modules: Some(targets),
        use_rslora: cfg.use_rslora,
        base_model_name_or_path: Some(cfg.model.display().to_string()),
        ..LoraConfig::default()
    }
}

/// Optimizer steps for the config and a loader.
fn total_steps(cfg: &TrainConfig, loader: &DataLoader) -> u64 {
    match (cfg.steps, cfg.epochs) {
        (Some(s), _) => s,
        (None, Some(e)) => {
            let micro = (e * loader.batches_per_epoch() as f64).ceil() as u64;
            micro.div_ceil(cfg.grad_accum as u64).max(1)
        }
        (None, None) => unreachable!("validated: steps or epochs"),
    }
}

/// Train as `cfg` says; `source` names the config in errors.
pub fn train(
    cfg: &TrainConfig,
    source: &str,
    opts: RunOptions,
    obs: &mut dyn Observer,
) -> Result<TrainOutcome> {
    cfg.validate(source)?;
    let out = cfg.output.clone();
    std::fs::create_dir_all(&out).map_err(|e| TrainerError::io(&out, e))?;
    checkpoint::remove_stale_temps(&out)?;
    let resume_from = if opts.resume {
        Some(checkpoint::latest(&out)?.ok_or_else(|| {
            TrainerError::checkpoint(
                &out,
                "--resume: no checkpoint here yet (no `latest` pointer)",
            )
        })?)
    } else {
        if !opts.overwrite && out.join(checkpoint::LATEST).exists() {
            return Err(TrainerError::checkpoint(
                &out,
                "already holds checkpoints: pass --resume to continue that run or \
                 --overwrite to start again",
            ));
        }
        if opts.overwrite {
            checkpoint::remove_all(&out)?;
        }
        None
    };

    let (device, dtype) = pick_device(cfg.device)?;
    obs.info(&format!("device: {}", device.name()));

    // Tokenizer and data.
    let tokenizer = Tokenizer::from_dir(&cfg.model)?;
    let model_config = ModelConfig::from_dir(&cfg.model)?;
    if tokenizer.vocab_size() > model_config.vocab_size {
        return Err(TrainerError::Config {
            file: cfg.model.join("tokenizer.json").display().to_string(),
            line: None,
            msg: format!(
                "the tokenizer has {} tokens but the model's vocab_size is {}",
                tokenizer.vocab_size(),
                model_config.vocab_size
            ),
        });
    }
    let data_opts = DataOptions {
        format: cfg.format,
        max_len: cfg.seq_len,
        train_on_prompt: !cfg.response_only,
        bad_lines: cfg.bad_lines,
        too_long: cfg.too_long,
    };
    let ds = load_jsonl_files(&cfg.data, &tokenizer, &data_opts)?;
    obs.info(&format!("data: {}", ds.stats));
    for e in ds.skipped.iter().take(5) {
        obs.info(&format!("skipped: {e}"));
    }
    let (train_ex, eval_ex): (Vec<Example>, Vec<Example>) = match &cfg.eval_data {
        Some(p) => (ds.examples, load_jsonl(p, &tokenizer, &data_opts)?.examples),
        None => split_holdout(ds.examples, cfg.holdout, cfg.seed),
    };
    let (train_n, eval_n) = (train_ex.len(), eval_ex.len());
    let pad = tokenizer.pad_id();
    let mut loader = DataLoader::new(
        train_ex,
        pad,
        LoaderOptions {
            seq_len: cfg.seq_len,
            micro_batch: cfg.micro_batch,
            packing: cfg.packing,
            shuffle: true,
            seed: cfg.seed,
        },
    )?;
    let eval_batches: Vec<Batch> = if eval_ex.is_empty() {
        Vec::new()
    } else {
        let l = DataLoader::new(
            eval_ex,
            pad,
            LoaderOptions {
                seq_len: cfg.seq_len,
                micro_batch: cfg.micro_batch,
                packing: cfg.packing,
                shuffle: false,
                seed: cfg.seed,
            },
        )?;
        l.batches_once().map(|b| to_engine_batch(&b)).collect()
    };
    let total = total_steps(cfg, &loader);
    obs.info(&format!(
        "{train_n} training examples in {} rows ({:.0}% of tokens are data), {eval_n} held out; \
         {total} steps of {} x {} rows of {} tokens",
        loader.rows_per_epoch(),
        100.0 * loader.packing_efficiency(),
        cfg.grad_accum,
        cfg.micro_batch,
        cfg.seq_len
    ));

    // Model and adapter (new, or the checkpoint's).
    // Offloaded weights stay in host memory from the start (never on the GPU).
    let offload = Offload {
        embedding: cfg.offload_embedding,
        layers: cfg.offload_layers,
    };
    let on_host = offload.host_placement(&model_config)?;
    let weights = ModelWeights::from_dir_placed(&cfg.model, &device, dtype, &on_host)?;
    let hash = cfg.trajectory_hash();
    let (mut adapter, state) = match &resume_from {
        Some(dir) => {
            let state = checkpoint::load_state(dir)?;
            if state.config_hash != hash {
                return Err(TrainerError::checkpoint(
                    dir,
                    "was written by a run with a different config (model, data, optimizer, \
                     LoRA or step settings); resume with the same config",
                ));
            }
            (checkpoint::load_adapter(dir, &model_config)?, Some(state))
        }
        None => (
            Adapter::new(
                checkpoint::ADAPTER_NAME,
                lora_config(cfg),
                &model_config,
                cfg.seed,
            )?,
            None,
        ),
    };
    let mut lora = LoraState::from_adapter(&adapter, &model_config, &device)?;
    if let Some(dir) = &resume_from {
        checkpoint::load_optimizer(dir, &mut lora, &device)?;
    }
    obs.info(&format!(
        "LoRA r={} alpha={} on {} modules: {} trainable parameters",
        cfg.lora_r,
        cfg.lora_alpha,
        adapter.modules.len(),
        lora.param_count()
    ));
    let mut decoder = Decoder::new(weights, lora)?;
    decoder.checkpointing = cfg.activation_checkpointing;
    decoder.lora_precision = match cfg.lora_precision {
        LoraPrecisionChoice::Fp32 => LoraPrecision::Fp32,
        LoraPrecisionChoice::Bf16 => LoraPrecision::Bf16,
    };
    decoder.set_offload(offload)?;
    if offload.is_on() {
        obs.info(&format!(
            "offload: embedding {}, weights of layers {:?} streamed from host memory",
            if decoder.embedding_on_host() {
                "on the host"
            } else if offload.embedding {
                "on the GPU (tied: it is also the LM head)"
            } else {
                "on the GPU"
            },
            decoder.streamed_layers()
        ));
    }

    let metrics_path = out.join(METRICS_FILE);
    let (start, mut metrics, elapsed0) = match &state {
        Some(s) => {
            loader.set_position(s.loader)?;
            obs.info(&format!(
                "resuming from {} (step {})",
                resume_from.as_ref().expect("resuming").display(),
                s.step
            ));
            (
                s.step,
                MetricsWriter::resume(&metrics_path, s.metrics_bytes)?,
                s.elapsed_s,
            )
        }
        None => (0, MetricsWriter::create(&metrics_path)?, 0.0),
    };

    let schedule = Schedule {
        peak_lr: cfg.lr as f32,
        warmup_steps: cfg.warmup_steps,
        total_steps: total,
        decay: cfg.decay.into(),
        min_ratio: cfg.min_lr_ratio as f32,
    };
    let clip = (cfg.max_grad_norm > 0.0).then_some(cfg.max_grad_norm as f32);
    let t0 = Instant::now();
    obs.start(start + 1, total);
    for step in start + 1..=total {
        let ts = Instant::now();
        let batches: Vec<PackedBatch> = (0..cfg.grad_accum).map(|_| loader.next_batch()).collect();
        let engine: Vec<Batch> = batches.iter().map(to_engine_batch).collect();
        let num_items: usize = engine.iter().map(Batch::n_valid).sum();
        let tokens: usize = batches.iter().map(|b| b.tokens).sum();
        let mut loss = 0.0f64;
        decoder.begin_dropout_step(cfg.seed, step);
        for b in &engine {
            if b.n_valid() == 0 {
                continue;
            }
            let l = decoder.forward_backward(b, Some(num_items as f32))?;
            loss += l.loss.to_f32_vec()?[0] as f64;
        }
        if num_items == 0 {
            return Err(TrainerError::Config {
                file: source.to_string(),
                line: None,
                msg: format!("step {step}: no trained tokens in the step's batches"),
            });
        }
        if !loss.is_finite() {
            return Err(TrainerError::NonFinite {
                step,
                what: "training loss",
                value: loss,
            });
        }
        let lr = schedule.lr(step - 1);
        let opt = AdamW {
            lr,
            beta1: cfg.beta1 as f32,
            beta2: cfg.beta2 as f32,
            eps: cfg.eps as f32,
            weight_decay: cfg.weight_decay as f32,
        };
        let grad_norm = decoder.optimizer_step(step, &opt, clip)?.to_f32_vec()?[0] as f64;
        if !grad_norm.is_finite() {
            return Err(TrainerError::NonFinite {
                step,
                what: "gradient norm",
                value: grad_norm,
            });
        }
        let step_s = ts.elapsed().as_secs_f64();
        let eval_now = !eval_batches.is_empty()
            && ((cfg.eval_every > 0 && step % cfg.eval_every == 0) || step == total);
        let eval = if eval_now {
            let e = eval_loss(&decoder, &eval_batches)?;
            if !e.is_finite() {
                return Err(TrainerError::NonFinite {
                    step,
                    what: "held-out loss",
                    value: e,
                });
            }
            Some(e)
        } else {
            None
        };
        let rec = StepRecord {
            step,
            loss,
            lr: lr as f64,
            grad_norm,
            tokens,
            tok_s: tokens as f64 / step_s.max(1e-9),
            eval_loss: eval,
            elapsed: elapsed0 + t0.elapsed().as_secs_f64(),
        };
        metrics.append(&rec)?;
        obs.step(&rec);
        if (cfg.save_every > 0 && step % cfg.save_every == 0) || step == total {
            metrics.sync()?;
            let st = TrainerState {
                step,
                total_steps: total,
                loader: loader.position(),
                config_hash: hash.clone(),
                metrics_bytes: metrics.len(),
                elapsed_s: rec.elapsed,
            };
            let dir = checkpoint::save(&out, &mut adapter, &decoder.lora, &st)?;
            obs.saved(step, &dir);
        }
    }
    obs.finish();

    // The final adapter at the output folder's root, and the loss curves.
    decoder.lora.store_into(&mut adapter)?;
    adapter.save(&out)?;
    let records = read_metrics(&metrics_path)?;
    let plot = out.join(PLOT_FILE);
    plot_losses(&records, &plot)?;
    Ok(TrainOutcome {
        decoder,
        tokenizer,
        records,
        total_steps: total,
        adapter_dir: out,
        plot,
        device: device.name(),
        train_examples: train_n,
        eval_examples: eval_n,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::demo::{write_demo_model, DemoModel};
    use tigon_train::demo_data::{generate, to_jsonl, DemoConfig, DemoStyle, DemoTask};

    /// A tiny model folder and chat data (demo addition) under `dir`, and a config for them.
    fn tiny_setup(dir: &Path, layers: usize) -> TrainConfig {
        let _ = std::fs::remove_dir_all(dir);
        let model = DemoModel {
            hidden: 32,
            intermediate: 64,
            layers,
            heads: 2,
            kv_heads: 1,
        };
        write_demo_model(&dir.join("base"), &model, 64, 3).unwrap();
        let (train_set, held) = generate(&DemoConfig {
            task: DemoTask::Addition,
            style: DemoStyle::Chat,
            train: 300,
            heldout: 20,
            max_digits: 2,
            seed: 1,
        });
        std::fs::write(
            dir.join("train.jsonl"),
            to_jsonl(&train_set, DemoStyle::Chat),
        )
        .unwrap();
        std::fs::write(dir.join("held.jsonl"), to_jsonl(&held, DemoStyle::Chat)).unwrap();
        TrainConfig {
            model: dir.join("base"),
            data: vec![dir.join("train.jsonl")],
            eval_data: Some(dir.join("held.jsonl")),
            seq_len: 64,
            micro_batch: 4,
            lr: 1e-2,
            warmup_steps: 2,
            steps: Some(25),
            eval_every: 5,
            lora_r: 8,
            output: dir.join("out"),
            device: DeviceChoice::Cpu,
            ..TrainConfig::default()
        }
    }

    /// Two micro-batches of 2 rows accumulate to the step one micro-batch of the same 4 rows
    /// takes: the loss is normalised by the trained tokens of the whole step.
    #[test]
    fn accumulation_matches_one_big_batch() {
        let dir = std::env::temp_dir().join(format!("tigon-run-accum-{}", std::process::id()));
        let base = TrainConfig {
            steps: Some(4),
            eval_every: 0,
            eval_data: None,
            ..tiny_setup(&dir, 1)
        };
        let one = TrainConfig {
            output: dir.join("one"),
            ..base.clone()
        };
        let two = TrainConfig {
            micro_batch: 2,
            grad_accum: 2,
            output: dir.join("two"),
            ..base
        };
        let a = train(&one, "one", RunOptions::default(), &mut Quiet).unwrap();
        let b = train(&two, "two", RunOptions::default(), &mut Quiet).unwrap();
        assert_eq!((a.records.len(), b.records.len()), (4, 4));
        for (x, y) in a.records.iter().zip(&b.records) {
            assert_eq!(x.tokens, y.tokens);
            let close = |p: f64, q: f64| (p - q).abs() <= 1e-4 * p.abs().max(1e-3);
            assert!(
                close(x.loss, y.loss),
                "step {}: {} vs {}",
                x.step,
                x.loss,
                y.loss
            );
            assert!(
                close(x.grad_norm, y.grad_norm),
                "step {}: grad norm {} vs {}",
                x.step,
                x.grad_norm,
                y.grad_norm
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// LoRA dropout trains (its masks change the result) and its masks come from
    /// (seed, step, micro-batch): a run resumed from a middle checkpoint ends with the
    /// bit-identical adapter of the uninterrupted run.
    #[test]
    fn dropout_run_resumes_bit_identically() {
        let dir = std::env::temp_dir().join(format!("tigon-run-dropout-{}", std::process::id()));
        let base = TrainConfig {
            steps: Some(4),
            save_every: 2,
            micro_batch: 2,
            grad_accum: 2,
            eval_every: 0,
            eval_data: None,
            lora_dropout: 0.1,
            ..tiny_setup(&dir, 1)
        };
        let run = |name: &str, cfg: TrainConfig, opts: RunOptions| {
            let cfg = TrainConfig {
                output: dir.join(name),
                ..cfg
            };
            train(&cfg, name, opts, &mut Quiet).unwrap();
            std::fs::read(cfg.output.join("adapter_model.safetensors")).unwrap()
        };
        let full = run("full", base.clone(), RunOptions::default());
        let undropped = run(
            "plain",
            TrainConfig {
                lora_dropout: 0.0,
                ..base.clone()
            },
            RunOptions::default(),
        );
        assert_ne!(full, undropped, "dropout changed nothing");
        run("cut", base.clone(), RunOptions::default());
        let cut = dir.join("cut");
        std::fs::remove_dir_all(cut.join("checkpoint-4")).unwrap();
        std::fs::write(cut.join(checkpoint::LATEST), "checkpoint-2\n").unwrap();
        let resumed = run(
            "cut",
            base,
            RunOptions {
                resume: true,
                ..RunOptions::default()
            },
        );
        assert_eq!(resumed, full);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A NaN in the base weights makes the first loss NaN: training stops naming the step.
    #[test]
    fn non_finite_loss_stops_naming_the_step() {
        let dir = std::env::temp_dir().join(format!("tigon-run-nan-{}", std::process::id()));
        let cfg = tiny_setup(&dir, 1);
        let path = cfg.model.join(tigon_model::weights::SINGLE_FILE);
        let w = tigon_model::Weights::open_file(&path).unwrap();
        let mut tensors: Vec<(String, tigon_kernels::Tensor)> = w
            .names()
            .iter()
            .map(|n| (n.clone(), w.get_any_shape(n, DType::F32).unwrap()))
            .collect();
        drop(w);
        for (n, t) in tensors.iter_mut() {
            if n == "lm_head.weight" {
                let mut v = t.to_f32_vec().unwrap();
                v[0] = f32::NAN;
                *t = tigon_kernels::Tensor::from_f32(t.shape(), v).unwrap();
            }
        }
        let refs: Vec<(&str, &tigon_kernels::Tensor)> =
            tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        tigon_model::weights::write_safetensors(&path, &refs).unwrap();
        let e = train(&cfg, "t", RunOptions::default(), &mut Quiet)
            .err()
            .expect("a NaN loss must stop training")
            .to_string();
        assert!(e.starts_with("step 1: the training loss is NaN"), "{e}");
        assert!(!cfg.output.join("latest").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A demo-shaped run, scaled down: the training loss must fall well below its start.
    #[test]
    fn demo_size_training_loss_falls() {
        let dir = std::env::temp_dir().join(format!("tigon-run-falls-{}", std::process::id()));
        let cfg = tiny_setup(&dir, 1);
        let out = train(&cfg, "test", RunOptions::default(), &mut Quiet).unwrap();
        let losses: Vec<f64> = out.records.iter().map(|r| r.loss).collect();
        assert_eq!(losses.len(), 25);
        let first = losses[0];
        let tail = losses[20..].iter().sum::<f64>() / 5.0;
        // Uniform over the 103-token vocabulary is ln 103 = 4.63 nats; the answers' digits
        // and EOS are a tiny part of it.
        assert!(tail < 0.75 * first, "loss {first} -> {tail}: {losses:?}");
        let evals: Vec<f64> = out.records.iter().filter_map(|r| r.eval_loss).collect();
        assert_eq!(evals.len(), 5);
        assert!(evals[4] < evals[0], "held-out {evals:?}");
        // The outputs are there: PEFT adapter, checkpoint, metrics, plot.
        for f in [
            "adapter_config.json",
            "adapter_model.safetensors",
            "metrics.jsonl",
            "loss.png",
            "latest",
            "checkpoint-25/optimizer.safetensors",
            "checkpoint-25/trainer_state.json",
        ] {
            assert!(cfg.output.join(f).is_file(), "{f} missing");
        }
        // A second fresh run into the same folder must be asked for explicitly.
        let again = train(&cfg, "test", RunOptions::default(), &mut Quiet);
        assert!(again.is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
