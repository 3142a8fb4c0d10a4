//! Training data for tigon: JSONL formats users bring (Alpaca, chat, prompt/completion, plain
//! text), the model's tokenizer and chat template, response-only labels, packing into
//! sequences with per-document boundaries, a resumable seeded data loader, and the built-in
//! demo task.
//!
//! Data flows one way: files -> [`data::Example`]s -> packed rows -> micro-batches.

pub mod data;
pub mod demo_data;
pub mod packing;
pub mod rng;
pub mod template;
pub mod tokenizer;

pub use data::{
    load_jsonl, load_jsonl_bytes, load_jsonl_files, split_holdout, BadLinePolicy, DataError,
    DataFormat, DataOptions, DataStats, Dataset, Example, TooLongPolicy, IGNORE_INDEX,
};
pub use demo_data::{build_demo, DemoConfig, DemoData, DemoStyle, DemoTask, EvalPrompt};
pub use packing::{
    pack_best_fit, DataLoader, LoaderOptions, LoaderPosition, PackError, PackedBatch,
};
pub use template::{ChatTemplate, Message, Role, TemplateError};
pub use tokenizer::{Tokenizer, TokenizerConfig, TokenizerError};
