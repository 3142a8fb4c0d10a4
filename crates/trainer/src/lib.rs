//! Tigon's trainer: a TOML config ([`TrainConfig`]) drives data loading (tigon-train), the
//! LoRA step (tigon-engine) with gradient accumulation, the learning-rate schedule,
//! clipping and AdamW, held-out evaluation, a metrics JSONL file, atomic resumable
//! checkpoints and a PNG of the loss curves. [`demo`] runs the whole pipeline on a built-in
//! model and task.

pub mod checkpoint;
pub mod config;
pub mod demo;
pub mod error;
mod fsutil;
pub mod metrics;
pub mod plot;
pub mod run;

pub use config::{DecayKind, DeviceChoice, TrainConfig};
pub use error::{Result, TrainerError};
pub use metrics::{read_metrics, StepRecord, METRICS_FILE};
pub use run::{train, Observer, Quiet, RunOptions, TrainOutcome};
