//! Training data from JSONL files: the formats users bring, tokenized with response-only
//! labels, with bad lines and over-long examples handled as the user chooses.
//!
//! Formats, detected per line unless forced:
//! - chat: `{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}`,
//!   rendered with the model's chat template; assistant turns are the response.
//! - Alpaca: `{"instruction": "...", "input": "..." (optional), "output": "..."}`, rendered with
//!   the standard Alpaca prompt; `output` is the response.
//! - prompt/completion: `{"prompt": "...", "completion": "..."}`, concatenated as is.
//! - text: `{"text": "..."}`, every token trained on.
//!
//! Labels follow the Hugging Face convention: `labels[i]` is aligned with `input_ids[i]`, -100
//! marks tokens not trained on, and the loss shifts (position i predicts token i + 1). The
//! first label of every example is -100 since no position predicts it; this also keeps a
//! packed row's loss from crossing from one document into the next.

use std::fmt;
use std::ops::Range;
use std::path::Path;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::rng::SplitMix64;
use crate::template::{ChatTemplate, Message, Role, TemplateError};
use crate::tokenizer::{Encoded, Tokenizer, TokenizerError};

/// Label of a token that is not trained on (PyTorch's cross-entropy ignore_index).
pub const IGNORE_INDEX: i32 = -100;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DataFormat {
    /// Decide per line from its keys.
    Auto,
    Alpaca,
    Chat,
    Text,
    PromptCompletion,
}

impl fmt::Display for DataFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DataFormat::Auto => "auto",
            DataFormat::Alpaca => "alpaca",
            DataFormat::Chat => "chat",
            DataFormat::Text => "text",
            DataFormat::PromptCompletion => "prompt-completion",
        })
    }
}

impl FromStr for DataFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(DataFormat::Auto),
            "alpaca" => Ok(DataFormat::Alpaca),
            "chat" | "messages" => Ok(DataFormat::Chat),
            "text" => Ok(DataFormat::Text),
            "prompt-completion" | "completion" => Ok(DataFormat::PromptCompletion),
            _ => Err(format!(
                "unknown data format '{s}' (expected auto, alpaca, chat, text or prompt-completion)"
            )),
        }
    }
}

/// What to do with a line that is not a usable example.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BadLinePolicy {
    /// Report it, count it and go on.
    Skip,
    /// Fail with its error.
    Stop,
}

impl FromStr for BadLinePolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "skip" => Ok(BadLinePolicy::Skip),
            "stop" => Ok(BadLinePolicy::Stop),
            _ => Err(format!(
                "unknown bad-line policy '{s}' (expected skip or stop)"
            )),
        }
    }
}

/// What to do with an example longer than the sequence limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TooLongPolicy {
    /// Keep its first `max_len` tokens (dropped instead if no trained token is left).
    Truncate,
    Drop,
}

impl FromStr for TooLongPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "truncate" => Ok(TooLongPolicy::Truncate),
            "drop" => Ok(TooLongPolicy::Drop),
            _ => Err(format!(
                "unknown too-long policy '{s}' (expected truncate or drop)"
            )),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DataOptions {
    pub format: DataFormat,
    /// Longest example in tokens (the packed sequence length).
    pub max_len: usize,
    /// Train on prompt tokens too (by default only the response is trained on).
    pub train_on_prompt: bool,
    pub bad_lines: BadLinePolicy,
    pub too_long: TooLongPolicy,
}

impl Default for DataOptions {
    fn default() -> Self {
        Self {
            format: DataFormat::Auto,
            max_len: 2048,
            train_on_prompt: false,
            bad_lines: BadLinePolicy::Stop,
            too_long: TooLongPolicy::Truncate,
        }
    }
}

/// One tokenized training example.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Example {
    pub input_ids: Vec<u32>,
    /// Aligned with `input_ids`; [`IGNORE_INDEX`] where not trained on.
    pub labels: Vec<i32>,
}

impl Example {
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }

    /// Tokens that contribute to the loss.
    pub fn label_tokens(&self) -> usize {
        self.labels.iter().filter(|&&l| l != IGNORE_INDEX).count()
    }
}

/// Counts for the log.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataStats {
    /// Non-blank lines read.
    pub lines: usize,
    /// Examples kept.
    pub examples: usize,
    /// Bad lines skipped (under [`BadLinePolicy::Skip`]).
    pub skipped_bad: usize,
    /// Examples cut to `max_len`.
    pub truncated: usize,
    /// Examples dropped as too long (or with nothing to train on left after truncation).
    pub dropped: usize,
    /// Tokens in the kept examples.
    pub tokens: usize,
    /// Of those, tokens trained on.
    pub label_tokens: usize,
}

impl DataStats {
    pub fn add(&mut self, other: &DataStats) {
        self.lines += other.lines;
        self.examples += other.examples;
        self.skipped_bad += other.skipped_bad;
        self.truncated += other.truncated;
        self.dropped += other.dropped;
        self.tokens += other.tokens;
        self.label_tokens += other.label_tokens;
    }
}

impl fmt::Display for DataStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} lines, {} examples, {} bad lines skipped, {} truncated, {} dropped as too long, \
             {} tokens ({} trained on)",
            self.lines,
            self.examples,
            self.skipped_bad,
            self.truncated,
            self.dropped,
            self.tokens,
            self.label_tokens
        )
    }
}

/// Errors name the file and, for a line's problem, the 1-based line number, on one line.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{file}: cannot read: {source}")]
    Io {
        file: String,
        source: std::io::Error,
    },
    #[error("{file}:{line}: not UTF-8 text")]
    NotUtf8 { file: String, line: usize },
    #[error("{file}:{line}: not JSON: {msg}")]
    NotJson {
        file: String,
        line: usize,
        msg: String,
    },
    #[error("{file}:{line}: expected a JSON object, found {found}")]
    NotObject {
        file: String,
        line: usize,
        found: &'static str,
    },
    #[error("{file}:{line}: missing field '{field}'")]
    MissingField {
        file: String,
        line: usize,
        field: String,
    },
    #[error("{file}:{line}: field '{field}' must be {expected}, found {found}")]
    WrongType {
        file: String,
        line: usize,
        field: String,
        expected: &'static str,
        found: &'static str,
    },
    #[error(
        "{file}:{line}: unknown format: expected a 'messages' (chat), 'instruction'/'output' \
         (Alpaca), 'prompt'/'completion' or 'text' field, found fields [{fields}]"
    )]
    UnknownFormat {
        file: String,
        line: usize,
        fields: String,
    },
    #[error("{file}:{line}: empty response: {what}")]
    EmptyResponse {
        file: String,
        line: usize,
        what: String,
    },
    #[error(
        "{file}:{line}: messages[{index}]: unknown role '{role}' (expected system, user or assistant)"
    )]
    UnknownRole {
        file: String,
        line: usize,
        index: usize,
        role: String,
    },
    #[error("{file}:{line}: chat data needs a chat template and the tokenizer has none")]
    NoChatTemplate { file: String, line: usize },
    #[error("{file}:{line}: {source}")]
    Template {
        file: String,
        line: usize,
        source: TemplateError,
    },
    #[error("{file}:{line}: {source}")]
    Tokenizer {
        file: String,
        line: usize,
        source: TokenizerError,
    },
    #[error("{file}: no training examples ({detail})")]
    EmptyDataset { file: String, detail: String },
}

/// One parsed line, before tokenization.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    Alpaca {
        instruction: String,
        input: String,
        output: String,
    },
    Chat(Vec<Message>),
    Text(String),
    PromptCompletion {
        prompt: String,
        completion: String,
    },
}

/// The standard Alpaca prompt, up to where the response starts.
pub fn alpaca_prompt(instruction: &str, input: &str) -> String {
    if input.trim().is_empty() {
        format!(
            "Below is an instruction that describes a task. Write a response that appropriately \
             completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
        )
    } else {
        format!(
            "Below is an instruction that describes a task, paired with an input that provides \
             further context. Write a response that appropriately completes the request.\n\n\
             ### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
        )
    }
}

fn kind_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Where a line is, for errors.
#[derive(Clone, Copy)]
struct Place<'a> {
    file: &'a str,
    line: usize,
}

impl Place<'_> {
    fn missing(&self, field: &str) -> DataError {
        DataError::MissingField {
            file: self.file.into(),
            line: self.line,
            field: field.into(),
        }
    }

    fn empty(&self, what: impl Into<String>) -> DataError {
        DataError::EmptyResponse {
            file: self.file.into(),
            line: self.line,
            what: what.into(),
        }
    }

    /// A string field; `None` when absent (or null, when `null_ok`).
    fn string(
        &self,
        obj: &serde_json::Map<String, Value>,
        field: &str,
        path: &str,
    ) -> Result<Option<String>, DataError> {
        match obj.get(field) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(DataError::WrongType {
                file: self.file.into(),
                line: self.line,
                field: path.into(),
                expected: "a string",
                found: kind_name(other),
            }),
        }
    }

    fn required(
        &self,
        obj: &serde_json::Map<String, Value>,
        field: &str,
    ) -> Result<String, DataError> {
        self.string(obj, field, field)?
            .ok_or_else(|| self.missing(field))
    }
}

/// Parse one JSONL line (already known to be non-blank) into a record.
pub fn parse_line(
    file: &str,
    line: usize,
    text: &str,
    format: DataFormat,
) -> Result<Record, DataError> {
    let at = Place { file, line };
    let value: Value = serde_json::from_str(text).map_err(|e| DataError::NotJson {
        file: file.into(),
        line,
        msg: e.to_string(),
    })?;
    let obj = match &value {
        Value::Object(o) => o,
        other => {
            return Err(DataError::NotObject {
                file: file.into(),
                line,
                found: kind_name(other),
            })
        }
    };
    let format = match format {
        DataFormat::Auto => {
            if obj.contains_key("messages") {
                DataFormat::Chat
            } else if obj.contains_key("instruction") || obj.contains_key("output") {
                DataFormat::Alpaca
            } else if obj.contains_key("prompt") || obj.contains_key("completion") {
                DataFormat::PromptCompletion
            } else if obj.contains_key("text") {
                DataFormat::Text
            } else {
                return Err(DataError::UnknownFormat {
                    file: file.into(),
                    line,
                    fields: obj
                        .keys()
                        .map(|k| format!("'{k}'"))
                        .collect::<Vec<_>>()
                        .join(", "),
                });
            }
        }
        f => f,
    };
    match format {
        DataFormat::Auto => unreachable!("resolved above"),
        DataFormat::Alpaca => {
            let instruction = at.required(obj, "instruction")?;
            let input = match obj.get("input") {
                Some(Value::Null) => String::new(),
                _ => at.string(obj, "input", "input")?.unwrap_or_default(),
            };
            let output = at.required(obj, "output")?;
            if output.trim().is_empty() {
                return Err(at.empty("'output' is empty"));
            }
            Ok(Record::Alpaca {
                instruction,
                input,
                output,
            })
        }
        DataFormat::PromptCompletion => {
            let prompt = at.required(obj, "prompt")?;
            let completion = at.required(obj, "completion")?;
            if completion.trim().is_empty() {
                return Err(at.empty("'completion' is empty"));
            }
            Ok(Record::PromptCompletion { prompt, completion })
        }
        DataFormat::Text => {
            let text = at.required(obj, "text")?;
            if text.trim().is_empty() {
                return Err(at.empty("'text' is empty"));
            }
            Ok(Record::Text(text))
        }
        DataFormat::Chat => {
            let list = match obj.get("messages") {
                None => return Err(at.missing("messages")),
                Some(Value::Array(a)) => a,
                Some(other) => {
                    return Err(DataError::WrongType {
                        file: file.into(),
                        line,
                        field: "messages".into(),
                        expected: "an array",
                        found: kind_name(other),
                    })
                }
            };
            let mut messages = Vec::with_capacity(list.len());
            for (i, m) in list.iter().enumerate() {
                let m = match m {
                    Value::Object(o) => o,
                    other => {
                        return Err(DataError::WrongType {
                            file: file.into(),
                            line,
                            field: format!("messages[{i}]"),
                            expected: "an object",
                            found: kind_name(other),
                        })
                    }
                };
                let role_text = at
                    .string(m, "role", &format!("messages[{i}].role"))?
                    .ok_or_else(|| at.missing(&format!("messages[{i}].role")))?;
                let role = Role::parse(&role_text).ok_or_else(|| DataError::UnknownRole {
                    file: file.into(),
                    line,
                    index: i,
                    role: role_text.clone(),
                })?;
                let content = at
                    .string(m, "content", &format!("messages[{i}].content"))?
                    .ok_or_else(|| at.missing(&format!("messages[{i}].content")))?;
                if role == Role::Assistant && content.trim().is_empty() {
                    return Err(at.empty(format!("messages[{i}] (assistant) has empty content")));
                }
                messages.push(Message { role, content });
            }
            if !messages.iter().any(|m| m.role == Role::Assistant) {
                return Err(at.empty("the conversation has no assistant message"));
            }
            Ok(Record::Chat(messages))
        }
    }
}

/// Labels for `enc`: a token is trained on when its byte span overlaps one of `spans`
/// (sorted, disjoint). Inserted special tokens (empty spans) are not.
fn labels_from_spans(enc: &Encoded, spans: &[Range<usize>]) -> Vec<i32> {
    let mut labels = vec![IGNORE_INDEX; enc.ids.len()];
    let mut k = 0;
    for (i, (&id, &(s, e))) in enc.ids.iter().zip(&enc.offsets).enumerate() {
        if e <= s {
            continue;
        }
        while k < spans.len() && spans[k].end <= s {
            k += 1;
        }
        if k < spans.len() && spans[k].start < e {
            labels[i] = id as i32;
        }
    }
    labels
}

/// Tokenize a record. The chat template is needed for chat records only.
// One trained span for the non-chat formats is a list of one range, not a range of indices.
#[allow(clippy::single_range_in_vec_init)]
pub fn tokenize_record(
    record: &Record,
    tok: &Tokenizer,
    template: Option<&ChatTemplate>,
    train_on_prompt: bool,
) -> Result<Example, RecordError> {
    let (enc, spans, append_eos) = match record {
        Record::Chat(messages) => {
            let template = template.ok_or(RecordError::NoChatTemplate)?;
            let r = template
                .render_with_assistant_spans(messages)
                .map_err(RecordError::Template)?;
            // The template writes BOS itself, as transformers' apply_chat_template assumes.
            let enc = tok.encode(&r.text, false).map_err(RecordError::Tokenizer)?;
            (enc, r.assistant_spans, false)
        }
        Record::Alpaca {
            instruction,
            input,
            output,
        } => {
            let prompt = alpaca_prompt(instruction, input);
            let full = prompt.clone() + output;
            let enc = tok.encode(&full, true).map_err(RecordError::Tokenizer)?;
            (enc, vec![prompt.len()..full.len()], true)
        }
        Record::PromptCompletion { prompt, completion } => {
            let full = prompt.clone() + completion;
            let enc = tok.encode(&full, true).map_err(RecordError::Tokenizer)?;
            (enc, vec![prompt.len()..full.len()], true)
        }
        Record::Text(text) => {
            let enc = tok.encode(text, true).map_err(RecordError::Tokenizer)?;
            (enc, vec![0..text.len()], true)
        }
    };
    let mut labels = if train_on_prompt {
        enc.ids.iter().map(|&id| id as i32).collect()
    } else {
        labels_from_spans(&enc, &spans)
    };
    let mut input_ids = enc.ids;
    if append_eos {
        if let Some(eos) = tok.eos() {
            if input_ids.last() != Some(&eos.id) {
                input_ids.push(eos.id);
                labels.push(eos.id as i32);
            }
        }
    }
    if let Some(first) = labels.first_mut() {
        *first = IGNORE_INDEX;
    }
    let example = Example { input_ids, labels };
    if example.label_tokens() == 0 {
        return Err(RecordError::NoResponseTokens);
    }
    Ok(example)
}

/// Why a record could not be tokenized (without the place, which the caller adds).
#[derive(Debug)]
pub enum RecordError {
    NoChatTemplate,
    Template(TemplateError),
    Tokenizer(TokenizerError),
    NoResponseTokens,
}

impl RecordError {
    fn at(self, file: &str, line: usize) -> DataError {
        let file = file.to_string();
        match self {
            RecordError::NoChatTemplate => DataError::NoChatTemplate { file, line },
            RecordError::Template(source) => DataError::Template { file, line, source },
            RecordError::Tokenizer(source) => DataError::Tokenizer { file, line, source },
            RecordError::NoResponseTokens => DataError::EmptyResponse {
                file,
                line,
                what: "the response has no tokens".into(),
            },
        }
    }
}

/// A loaded, tokenized dataset.
#[derive(Debug, Default)]
pub struct Dataset {
    pub examples: Vec<Example>,
    pub stats: DataStats,
    /// The bad lines skipped under [`BadLinePolicy::Skip`], to report.
    pub skipped: Vec<DataError>,
}

enum Outcome {
    Kept(Example, bool),
    Dropped,
}

fn process_line(
    file: &str,
    line: usize,
    text: &str,
    tok: &Tokenizer,
    template: Option<&ChatTemplate>,
    opts: &DataOptions,
) -> Result<Outcome, DataError> {
    let record = parse_line(file, line, text, opts.format)?;
    let mut ex = tokenize_record(&record, tok, template, opts.train_on_prompt)
        .map_err(|e| e.at(file, line))?;
    if ex.len() <= opts.max_len {
        return Ok(Outcome::Kept(ex, false));
    }
    match opts.too_long {
        TooLongPolicy::Drop => Ok(Outcome::Dropped),
        TooLongPolicy::Truncate => {
            ex.input_ids.truncate(opts.max_len);
            ex.labels.truncate(opts.max_len);
            if ex.label_tokens() == 0 {
                Ok(Outcome::Dropped)
            } else {
                Ok(Outcome::Kept(ex, true))
            }
        }
    }
}

/// Compile the tokenizer's chat template, if it has one.
pub fn chat_template_of(tok: &Tokenizer) -> Result<Option<ChatTemplate>, TemplateError> {
    tok.chat_template()
        .map(|src| {
            ChatTemplate::new(
                src,
                tok.bos().map(|t| t.text.as_str()).unwrap_or(""),
                tok.eos().map(|t| t.text.as_str()).unwrap_or(""),
                tok.special_token_texts(),
            )
        })
        .transpose()
}

/// Load a JSONL file.
pub fn load_jsonl(path: &Path, tok: &Tokenizer, opts: &DataOptions) -> Result<Dataset, DataError> {
    let file = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|source| DataError::Io {
        file: file.clone(),
        source,
    })?;
    load_jsonl_bytes(&file, &bytes, tok, opts)
}

/// Load JSONL from memory; `file` names it in errors.
pub fn load_jsonl_bytes(
    file: &str,
    bytes: &[u8],
    tok: &Tokenizer,
    opts: &DataOptions,
) -> Result<Dataset, DataError> {
    let template = match chat_template_of(tok) {
        Ok(t) => t,
        // A template that does not compile matters only if a chat line needs it; the error
        // then names that line.
        Err(e) => {
            return load_lines(file, bytes, tok, Err(e), opts);
        }
    };
    load_lines(file, bytes, tok, Ok(template), opts)
}

fn load_lines(
    file: &str,
    bytes: &[u8],
    tok: &Tokenizer,
    template: Result<Option<ChatTemplate>, TemplateError>,
    opts: &DataOptions,
) -> Result<Dataset, DataError> {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    let lines: Vec<(usize, &[u8])> = bytes
        .split(|&b| b == b'\n')
        .enumerate()
        .map(|(i, l)| (i + 1, l.strip_suffix(b"\r").unwrap_or(l)))
        .filter(|(_, l)| !l.iter().all(u8::is_ascii_whitespace))
        .collect();

    let work = |&(line, raw): &(usize, &[u8])| -> Result<Outcome, DataError> {
        let text = std::str::from_utf8(raw).map_err(|_| DataError::NotUtf8 {
            file: file.into(),
            line,
        })?;
        match &template {
            Ok(t) => process_line(file, line, text, tok, t.as_ref(), opts),
            Err(e) => {
                // Only chat lines need the template; others go through without it.
                let rec = parse_line(file, line, text, opts.format)?;
                if matches!(rec, Record::Chat(_)) {
                    return Err(DataError::Template {
                        file: file.into(),
                        line,
                        source: e.clone(),
                    });
                }
                process_line(file, line, text, tok, None, opts)
            }
        }
    };
    let outcomes = parallel_map(&lines, work);

    let mut ds = Dataset::default();
    ds.stats.lines = lines.len();
    for outcome in outcomes {
        match outcome {
            Ok(Outcome::Kept(ex, truncated)) => {
                ds.stats.truncated += truncated as usize;
                ds.stats.tokens += ex.len();
                ds.stats.label_tokens += ex.label_tokens();
                ds.examples.push(ex);
            }
            Ok(Outcome::Dropped) => ds.stats.dropped += 1,
            Err(e) => match opts.bad_lines {
                BadLinePolicy::Stop => return Err(e),
                BadLinePolicy::Skip => {
                    ds.stats.skipped_bad += 1;
                    ds.skipped.push(e);
                }
            },
        }
    }
    ds.stats.examples = ds.examples.len();
    if ds.examples.is_empty() {
        let s = &ds.stats;
        let detail = if s.lines == 0 {
            "the file has no data lines".to_string()
        } else {
            format!(
                "{} lines: {} bad, {} dropped as longer than {} tokens",
                s.lines, s.skipped_bad, s.dropped, opts.max_len
            )
        };
        return Err(DataError::EmptyDataset {
            file: file.into(),
            detail,
        });
    }
    Ok(ds)
}

/// Map in order over `items` on a few threads (tokenizing is the slow part of loading).
fn parallel_map<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(16);
    if threads <= 1 || items.len() < 64 {
        return items.iter().map(f).collect();
    }
    let chunk = items.len().div_ceil(threads);
    let f = &f;
    std::thread::scope(|s| {
        let handles: Vec<_> = items
            .chunks(chunk)
            .map(|c| s.spawn(move || c.iter().map(f).collect::<Vec<R>>()))
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("data loading thread panicked"))
            .collect()
    })
}

/// Load several JSONL files, each of which must yield examples; stats are summed.
pub fn load_jsonl_files(
    paths: &[impl AsRef<Path>],
    tok: &Tokenizer,
    opts: &DataOptions,
) -> Result<Dataset, DataError> {
    let mut all = Dataset::default();
    for p in paths {
        let ds = load_jsonl(p.as_ref(), tok, opts)?;
        all.stats.add(&ds.stats);
        all.examples.extend(ds.examples);
        all.skipped.extend(ds.skipped);
    }
    Ok(all)
}

/// Split off a held-out set: `round(fraction * n)` examples chosen by `seed` (at least one and
/// at most n - 1 when the fraction is positive and n >= 2). Both parts keep file order.
pub fn split_holdout(
    examples: Vec<Example>,
    fraction: f64,
    seed: u64,
) -> (Vec<Example>, Vec<Example>) {
    let n = examples.len();
    if fraction <= 0.0 || n < 2 {
        return (examples, Vec::new());
    }
    let held = ((fraction * n as f64).round() as usize).clamp(1, n - 1);
    let mut order: Vec<usize> = (0..n).collect();
    SplitMix64::for_stream(seed, 0x401D).shuffle(&mut order);
    let mut is_held = vec![false; n];
    for &i in &order[..held] {
        is_held[i] = true;
    }
    let (mut train, mut heldout) = (Vec::with_capacity(n - held), Vec::with_capacity(held));
    for (ex, h) in examples.into_iter().zip(is_held) {
        if h {
            heldout.push(ex);
        } else {
            train.push(ex);
        }
    }
    (train, heldout)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::template::tests::LLAMA3_TEMPLATE;
    use crate::tokenizer::tests::llama3_like_json;
    use crate::tokenizer::TokenizerConfig;

    fn char_tok() -> Tokenizer {
        Tokenizer::builtin_char()
    }

    fn load(text: &str, opts: &DataOptions) -> Result<Dataset, DataError> {
        load_jsonl_bytes("train.jsonl", text.as_bytes(), &char_tok(), opts)
    }

    /// The tokens of `ex` that are trained on, decoded.
    fn trained_text(tok: &Tokenizer, ex: &Example) -> String {
        let ids: Vec<u32> = ex
            .labels
            .iter()
            .filter(|&&l| l != IGNORE_INDEX)
            .map(|&l| l as u32)
            .collect();
        tok.decode(&ids, false).unwrap()
    }

    #[test]
    fn alpaca_with_and_without_input() {
        let tok = char_tok();
        let ds = load(
            "{\"instruction\": \"Add\", \"input\": \"2+3\", \"output\": \"5\"}\n\
             {\"instruction\": \"Say hi\", \"output\": \"hi\"}\n",
            &DataOptions::default(),
        )
        .unwrap();
        assert_eq!(ds.examples.len(), 2);
        let ex = &ds.examples[0];
        let text = tok.decode(&ex.input_ids, false).unwrap();
        assert_eq!(
            text,
            format!("<|bos|>{}5<|eos|>", alpaca_prompt("Add", "2+3"))
        );
        assert!(text.contains("### Input:\n2+3\n\n### Response:\n5"));
        assert_eq!(trained_text(&tok, ex), "5<|eos|>");
        assert_eq!(ex.label_tokens(), 2);
        // Labels sit exactly on the last two positions and equal the input ids there.
        let n = ex.len();
        assert!(ex.labels[..n - 2].iter().all(|&l| l == IGNORE_INDEX));
        assert_eq!(ex.labels[n - 2], ex.input_ids[n - 2] as i32);
        assert_eq!(ex.labels[n - 1], 2);
        let text = tok.decode(&ds.examples[1].input_ids, false).unwrap();
        assert!(!text.contains("### Input"));
        assert!(text.starts_with("<|bos|>Below is an instruction that describes a task. Write"));
        assert_eq!(trained_text(&tok, &ds.examples[1]), "hi<|eos|>");
        assert_eq!(ds.stats.label_tokens, 2 + 3);
        assert_eq!(
            ds.stats.tokens,
            ds.examples.iter().map(Example::len).sum::<usize>()
        );
    }

    #[test]
    fn train_on_prompt_labels_everything_but_the_first_token() {
        let tok = char_tok();
        let opts = DataOptions {
            train_on_prompt: true,
            ..Default::default()
        };
        let ds = load("{\"prompt\": \"ab\", \"completion\": \"c\"}", &opts).unwrap();
        let ex = &ds.examples[0];
        assert_eq!(
            tok.decode(&ex.input_ids, false).unwrap(),
            "<|bos|>abc<|eos|>"
        );
        assert_eq!(ex.labels[0], IGNORE_INDEX);
        for i in 1..ex.len() {
            assert_eq!(ex.labels[i], ex.input_ids[i] as i32);
        }
    }

    #[test]
    fn prompt_completion_and_text() {
        let tok = char_tok();
        let ds = load(
            "{\"prompt\": \"12+3=\", \"completion\": \"15\"}\n\n  \n{\"text\": \"hello\"}",
            &DataOptions::default(),
        )
        .unwrap();
        assert_eq!(ds.stats.lines, 2, "blank lines are not counted");
        assert_eq!(trained_text(&tok, &ds.examples[0]), "15<|eos|>");
        assert_eq!(trained_text(&tok, &ds.examples[1]), "hello<|eos|>");
        // Text: all but the BOS (position 0, which nothing predicts).
        assert_eq!(ds.examples[1].labels[0], IGNORE_INDEX);
        assert_eq!(ds.examples[1].label_tokens(), 6);
    }

    #[test]
    fn chat_with_builtin_template_labels_assistant_turns_only() {
        let tok = char_tok();
        let ds = load(
            r#"{"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "1+1="}, {"role": "assistant", "content": "2"}, {"role": "user", "content": "2+2="}, {"role": "assistant", "content": "4"}]}"#,
            &DataOptions::default(),
        )
        .unwrap();
        let ex = &ds.examples[0];
        assert_eq!(
            tok.decode(&ex.input_ids, false).unwrap(),
            "<|bos|><|system|>S<|user|>1+1=<|assistant|>2<|eos|><|user|>2+2=<|assistant|>4<|eos|>"
        );
        assert_eq!(trained_text(&tok, ex), "2<|eos|>4<|eos|>");
        let trained: Vec<usize> = (0..ex.len())
            .filter(|&i| ex.labels[i] != IGNORE_INDEX)
            .collect();
        assert_eq!(trained, [9, 10, 17, 18]);
    }

    #[test]
    fn chat_with_llama3_template_and_byte_level_tokenizer() {
        let config = TokenizerConfig {
            bos_token: Some("<|begin_of_text|>".into()),
            eos_token: Some("<|eot_id|>".into()),
            chat_template: Some(LLAMA3_TEMPLATE.into()),
            ..Default::default()
        };
        let tok = Tokenizer::from_json_str("tokenizer.json", &llama3_like_json(), config).unwrap();
        let ds = load_jsonl_bytes(
            "chat.jsonl",
            br#"{"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hello world"}]}"#,
            &tok,
            &DataOptions::default(),
        )
        .unwrap();
        let ex = &ds.examples[0];
        let text = tok.decode(&ex.input_ids, false).unwrap();
        assert_eq!(
            text,
            "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhello<|eot_id|>\
<|start_header_id|>assistant<|end_header_id|>\n\nhello world<|eot_id|>"
        );
        assert_eq!(
            ex.input_ids
                .iter()
                .filter(|&&i| i == tok.bos().unwrap().id)
                .count(),
            1,
            "BOS once: the template writes it, encoding adds none"
        );
        assert_eq!(trained_text(&tok, ex), "hello world<|eot_id|>");
        assert_eq!(ex.label_tokens(), 3, "'hello', 'Ġworld', '<|eot_id|>'");
    }

    /// A Mistral-style template (alternation check, `[INST]`, EOS after answers) on a
    /// sentencepiece-style tokenizer with byte fallback.
    #[test]
    fn chat_with_mistral_style_template_and_sentencepiece_tokenizer() {
        let template = "{{ bos_token }}{% for message in messages %}\
{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\
{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}\
{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}\
{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}";
        let config = TokenizerConfig {
            bos_token: Some("<s>".into()),
            eos_token: Some("</s>".into()),
            add_bos_token: Some(true),
            chat_template: Some(template.into()),
            ..Default::default()
        };
        let tok = Tokenizer::from_json_str(
            "tokenizer.json",
            &crate::tokenizer::tests::llama2_like_json(),
            config,
        )
        .unwrap();
        let ds = load_jsonl_bytes(
            "m.jsonl",
            br#"{"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hello world"}]}
{"messages": [{"role": "assistant", "content": "hello"}]}"#,
            &tok,
            &DataOptions {
                bad_lines: BadLinePolicy::Skip,
                ..Default::default()
            },
        )
        .unwrap();
        let ex = &ds.examples[0];
        assert_eq!(
            tok.decode(&ex.input_ids, false).unwrap(),
            // The normalizer's prepended '▁' shows as a space, as in transformers.
            "<s> [INST] hello [/INST]hello world</s>"
        );
        assert_eq!(
            ex.input_ids.iter().filter(|&&i| i == 1).count(),
            1,
            "one BOS"
        );
        assert_eq!(trained_text(&tok, ex), "hello world</s>");
        assert_eq!(
            ds.skipped[0].to_string(),
            "m.jsonl:2: chat template raised: Conversation roles must alternate user/assistant"
        );
    }

    #[test]
    fn truncate_and_drop_are_counted() {
        let tok = char_tok();
        let lines = "{\"prompt\": \"abc\", \"completion\": \"defgh\"}\n\
                     {\"prompt\": \"a\", \"completion\": \"b\"}\n\
                     {\"prompt\": \"abcdefghij\", \"completion\": \"k\"}\n";
        // Lengths with BOS and EOS: 10, 4, 13.
        let opts = DataOptions {
            max_len: 8,
            too_long: TooLongPolicy::Truncate,
            ..Default::default()
        };
        let ds = load(lines, &opts).unwrap();
        assert_eq!(ds.stats.truncated, 1);
        assert_eq!(
            ds.stats.dropped, 1,
            "the third loses its whole response to truncation"
        );
        assert_eq!(ds.examples.len(), 2);
        assert_eq!(ds.examples[0].len(), 8);
        assert_eq!(trained_text(&tok, &ds.examples[0]), "defg");
        assert_eq!(ds.stats.tokens, 8 + 4);
        let opts = DataOptions {
            too_long: TooLongPolicy::Drop,
            ..opts
        };
        let ds = load(lines, &opts).unwrap();
        assert_eq!((ds.stats.truncated, ds.stats.dropped), (0, 2));
        assert_eq!(ds.examples.len(), 1);
        assert!(ds.stats.to_string().contains("2 dropped as too long"));
    }

    fn err_of(line: &str) -> String {
        let text = format!("{{\"text\": \"ok\"}}\n{line}\n");
        load(&text, &DataOptions::default())
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn every_malformed_line_error_names_file_and_line() {
        let cases: &[(&str, &str)] = &[
            (
                "{not json",
                "train.jsonl:2: not JSON: key must be a string at line 1 column 2",
            ),
            ("[1, 2]", "train.jsonl:2: expected a JSON object, found an array"),
            (
                r#"{"instruction": "x"}"#,
                "train.jsonl:2: missing field 'output'",
            ),
            (
                r#"{"instruction": "x", "output": "  "}"#,
                "train.jsonl:2: empty response: 'output' is empty",
            ),
            (
                r#"{"instruction": "x", "output": 5}"#,
                "train.jsonl:2: field 'output' must be a string, found a number",
            ),
            (
                r#"{"prompt": "x"}"#,
                "train.jsonl:2: missing field 'completion'",
            ),
            (r#"{"text": ""}"#, "train.jsonl:2: empty response: 'text' is empty"),
            (
                r#"{"foo": 1, "bar": 2}"#,
                "train.jsonl:2: unknown format: expected a 'messages' (chat), 'instruction'/'output' \
                 (Alpaca), 'prompt'/'completion' or 'text' field, found fields ['bar', 'foo']",
            ),
            (
                r#"{"messages": [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]}"#,
                "train.jsonl:2: messages[1]: unknown role 'robot' (expected system, user or assistant)",
            ),
            (
                r#"{"messages": [{"role": "user", "content": "a"}]}"#,
                "train.jsonl:2: empty response: the conversation has no assistant message",
            ),
            (
                r#"{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}]}"#,
                "train.jsonl:2: empty response: messages[1] (assistant) has empty content",
            ),
            (
                r#"{"messages": [{"role": "user"}]}"#,
                "train.jsonl:2: missing field 'messages[0].content'",
            ),
            (
                r#"{"messages": "hi"}"#,
                "train.jsonl:2: field 'messages' must be an array, found a string",
            ),
        ];
        for (line, want) in cases {
            let got = err_of(line);
            assert_eq!(&got, want, "for line {line}");
            assert!(!got.contains('\n'));
        }
        let e = load("{\"text\": \"a\"}\n\u{FF}", &DataOptions::default());
        // (U+00FF is valid UTF-8 text; invalid bytes are checked below.)
        assert!(e
            .unwrap_err()
            .to_string()
            .starts_with("train.jsonl:2: not JSON"));
        let e = load_jsonl_bytes(
            "train.jsonl",
            b"{\"text\": \"a\"}\n\xff\n",
            &char_tok(),
            &DataOptions::default(),
        )
        .unwrap_err();
        assert_eq!(e.to_string(), "train.jsonl:2: not UTF-8 text");
    }

    #[test]
    fn chat_without_template_and_template_errors() {
        let tok = Tokenizer::from_json_str(
            "tokenizer.json",
            &crate::tokenizer::builtin_char_json(),
            TokenizerConfig::default(),
        )
        .unwrap();
        let line = r#"{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}"#;
        let e = load_jsonl_bytes(
            "c.jsonl",
            format!("\n{line}").as_bytes(),
            &tok,
            &DataOptions::default(),
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "c.jsonl:2: chat data needs a chat template and the tokenizer has none"
        );
        let config = TokenizerConfig {
            chat_template: Some(
                "{% for m in messages %}{{ raise_exception('no ' + m.role) }}{% endfor %}".into(),
            ),
            ..Default::default()
        };
        let tok =
            Tokenizer::from_json_str("t", &crate::tokenizer::builtin_char_json(), config).unwrap();
        let e = load_jsonl_bytes("c.jsonl", line.as_bytes(), &tok, &DataOptions::default())
            .unwrap_err();
        assert_eq!(e.to_string(), "c.jsonl:1: chat template raised: no user");
        // A template that does not compile fails chat lines only.
        let config = TokenizerConfig {
            chat_template: Some("{% if %}".into()),
            ..Default::default()
        };
        let tok =
            Tokenizer::from_json_str("t", &crate::tokenizer::builtin_char_json(), config).unwrap();
        let text = format!("{{\"text\": \"fine\"}}\n{line}");
        let e = load_jsonl_bytes("c.jsonl", text.as_bytes(), &tok, &DataOptions::default())
            .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("c.jsonl:2: chat template does not parse"),
            "{e}"
        );
    }

    #[test]
    fn skip_policy_counts_and_reports_bad_lines() {
        let opts = DataOptions {
            bad_lines: BadLinePolicy::Skip,
            ..Default::default()
        };
        let ds = load(
            "{\"text\": \"a\"}\nnope\n{\"text\": \"b\"}\n{\"output\": \"x\"}\n",
            &opts,
        )
        .unwrap();
        assert_eq!(ds.examples.len(), 2);
        assert_eq!(ds.stats.skipped_bad, 2);
        let msgs: Vec<String> = ds.skipped.iter().map(|e| e.to_string()).collect();
        assert!(msgs[0].starts_with("train.jsonl:2: not JSON"));
        assert_eq!(msgs[1], "train.jsonl:4: missing field 'instruction'");
    }

    #[test]
    fn empty_dataset_names_the_file() {
        let e = load("", &DataOptions::default()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "train.jsonl: no training examples (the file has no data lines)"
        );
        let opts = DataOptions {
            bad_lines: BadLinePolicy::Skip,
            max_len: 4,
            too_long: TooLongPolicy::Drop,
            ..Default::default()
        };
        let e = load("x\n{\"text\": \"long text\"}\n", &opts).unwrap_err();
        assert_eq!(
            e.to_string(),
            "train.jsonl: no training examples (2 lines: 1 bad, 1 dropped as longer than 4 tokens)"
        );
        let e = load_jsonl(
            Path::new("/nonexistent/x.jsonl"),
            &char_tok(),
            &DataOptions::default(),
        )
        .unwrap_err();
        assert!(e
            .to_string()
            .starts_with("/nonexistent/x.jsonl: cannot read"));
    }

    #[test]
    fn forced_format_and_parsing() {
        let r = parse_line("f", 1, r#"{"text": "t", "prompt": "p"}"#, DataFormat::Text).unwrap();
        assert_eq!(r, Record::Text("t".into()));
        let e = parse_line("f", 3, r#"{"text": "t"}"#, DataFormat::Chat).unwrap_err();
        assert_eq!(e.to_string(), "f:3: missing field 'messages'");
        let r = parse_line(
            "f",
            1,
            r#"{"instruction": "i", "input": null, "output": "o"}"#,
            DataFormat::Auto,
        )
        .unwrap();
        assert_eq!(
            r,
            Record::Alpaca {
                instruction: "i".into(),
                input: String::new(),
                output: "o".into()
            }
        );
        assert_eq!(
            "prompt-completion".parse(),
            Ok(DataFormat::PromptCompletion)
        );
        assert!("csv".parse::<DataFormat>().is_err());
    }

    #[test]
    fn many_lines_load_in_order_on_threads() {
        let tok = char_tok();
        let text: String = (0..500)
            .map(|i| format!("{{\"prompt\": \"{i}=\", \"completion\": \"{}\"}}\n", i * 2))
            .collect();
        let ds = load(&text, &DataOptions::default()).unwrap();
        assert_eq!(ds.examples.len(), 500);
        for (i, ex) in ds.examples.iter().enumerate() {
            assert_eq!(trained_text(&tok, ex), format!("{}<|eos|>", i * 2));
        }
    }

    #[test]
    fn holdout_split_is_seeded_and_disjoint() {
        let exs: Vec<Example> = (0..20)
            .map(|i| Example {
                input_ids: vec![i],
                labels: vec![IGNORE_INDEX],
            })
            .collect();
        let (train, held) = split_holdout(exs.clone(), 0.25, 9);
        assert_eq!((train.len(), held.len()), (15, 5));
        let (train2, held2) = split_holdout(exs.clone(), 0.25, 9);
        assert_eq!((&train, &held), (&train2, &held2));
        let mut ids: Vec<u32> = train.iter().chain(&held).map(|e| e.input_ids[0]).collect();
        ids.sort();
        assert_eq!(ids, (0..20).collect::<Vec<_>>());
        assert!(held
            .windows(2)
            .all(|w| w[0].input_ids[0] < w[1].input_ids[0]));
        let (_, held3) = split_holdout(exs.clone(), 0.25, 10);
        assert_ne!(held, held3);
        assert_eq!(split_holdout(exs.clone(), 0.0, 1).1.len(), 0);
        assert_eq!(split_holdout(exs.clone(), 0.001, 1).1.len(), 1);
        assert_eq!(split_holdout(exs, 1.0, 1).0.len(), 1);
    }
}
