//! The model's tokenizer: Hugging Face `tokenizer.json` through the `tokenizers` crate, plus the
//! special tokens and chat template from `tokenizer_config.json` / `chat_template.jinja`.
//!
//! Also a built-in character-level tokenizer for `tigon demo`, generated as a `tokenizer.json`
//! document and loaded through the same path as a real model's.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: cannot load tokenizer: {msg}")]
    Load { path: String, msg: String },
    #[error("{path}: not valid JSON: {msg}")]
    Config { path: String, msg: String },
    #[error("{path}: {field} is '{token}', which the tokenizer's vocabulary does not contain")]
    UnknownSpecialToken {
        path: String,
        field: &'static str,
        token: String,
    },
    #[error("cannot tokenize: {0}")]
    Encode(String),
    #[error("cannot decode: {0}")]
    Decode(String),
}

/// What `tokenizer_config.json` says beyond `tokenizer.json`: special tokens and chat template.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TokenizerConfig {
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub pad_token: Option<String>,
    pub unk_token: Option<String>,
    /// Prepend BOS when the tokenizer's post-processor does not already (Mistral-style configs).
    pub add_bos_token: Option<bool>,
    pub chat_template: Option<String>,
}

impl TokenizerConfig {
    /// Parse the text of a `tokenizer_config.json`. `name` only labels errors.
    pub fn from_json_str(name: &str, text: &str) -> Result<Self, TokenizerError> {
        let v: Value = serde_json::from_str(text).map_err(|e| TokenizerError::Config {
            path: name.to_string(),
            msg: e.to_string(),
        })?;
        let token = |key: &str| -> Option<String> {
            match v.get(key)? {
                Value::String(s) => Some(s.clone()),
                // AddedToken form: {"content": "<s>", "lstrip": false, ...}
                Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
                _ => None,
            }
        };
        let chat_template = match v.get("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            // A list of named templates: the one named "default", else the first.
            Some(Value::Array(list)) => {
                let named = |n: &str| {
                    list.iter()
                        .find(|t| t.get("name").and_then(Value::as_str) == Some(n))
                };
                named("default")
                    .or_else(|| list.first())
                    .and_then(|t| t.get("template"))
                    .and_then(Value::as_str)
                    .map(str::to_string)
            }
            _ => None,
        };
        Ok(Self {
            bos_token: token("bos_token"),
            eos_token: token("eos_token"),
            pad_token: token("pad_token"),
            unk_token: token("unk_token"),
            add_bos_token: v.get("add_bos_token").and_then(Value::as_bool),
            chat_template,
        })
    }
}

/// A token and its id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpecialToken {
    pub text: String,
    pub id: u32,
}

/// Token ids with the byte range of the input each token came from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Encoded {
    pub ids: Vec<u32>,
    /// Byte offsets `(start, end)` into the encoded text; `(0, 0)` for inserted special tokens.
    pub offsets: Vec<(usize, usize)>,
}

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos: Option<SpecialToken>,
    eos: Option<SpecialToken>,
    pad: Option<SpecialToken>,
    add_bos_token: bool,
    chat_template: Option<String>,
    /// Texts of the special added tokens (end-of-turn markers and the like).
    special_texts: Vec<String>,
    vocab_size: usize,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size)
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("pad", &self.pad)
            .field("has_chat_template", &self.chat_template.is_some())
            .finish()
    }
}

impl Tokenizer {
    /// Load a model directory: `tokenizer.json`, and when present `tokenizer_config.json` and
    /// `chat_template.jinja` (which, as in transformers, takes precedence over the config's
    /// template).
    pub fn from_dir(dir: &Path) -> Result<Self, TokenizerError> {
        let read = |p: PathBuf| -> Result<Option<String>, TokenizerError> {
            match std::fs::read_to_string(&p) {
                Ok(s) => Ok(Some(s)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(source) => Err(TokenizerError::Io { path: p, source }),
            }
        };
        let tok_path = dir.join("tokenizer.json");
        let tok_json = read(tok_path.clone())?.ok_or_else(|| TokenizerError::Io {
            path: tok_path.clone(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "file not found"),
        })?;
        let cfg_path = dir.join("tokenizer_config.json");
        let mut config = match read(cfg_path.clone())? {
            Some(text) => TokenizerConfig::from_json_str(&cfg_path.display().to_string(), &text)?,
            None => TokenizerConfig::default(),
        };
        if let Some(t) = read(dir.join("chat_template.jinja"))? {
            config.chat_template = Some(t);
        }
        Self::from_json_str(&tok_path.display().to_string(), &tok_json, config)
    }

    /// Build from the text of a `tokenizer.json` and a parsed config. `name` labels errors.
    pub fn from_json_str(
        name: &str,
        tokenizer_json: &str,
        config: TokenizerConfig,
    ) -> Result<Self, TokenizerError> {
        let mut inner =
            tokenizers::Tokenizer::from_bytes(tokenizer_json.as_bytes()).map_err(|e| {
                TokenizerError::Load {
                    path: name.to_string(),
                    msg: e.to_string(),
                }
            })?;
        // Some tokenizer.json files carry truncation/padding settings; lengths are ours to
        // decide, so they are switched off.
        inner
            .with_truncation(None)
            .map_err(|e| TokenizerError::Load {
                path: name.to_string(),
                msg: e.to_string(),
            })?;
        inner.with_padding(None);

        let lookup = |field: &'static str,
                      token: &Option<String>|
         -> Result<Option<SpecialToken>, TokenizerError> {
            match token {
                None => Ok(None),
                Some(t) => match inner.token_to_id(t) {
                    Some(id) => Ok(Some(SpecialToken {
                        text: t.clone(),
                        id,
                    })),
                    None => Err(TokenizerError::UnknownSpecialToken {
                        path: name.to_string(),
                        field,
                        token: t.clone(),
                    }),
                },
            }
        };
        let bos = lookup("bos_token", &config.bos_token)?;
        let eos = lookup("eos_token", &config.eos_token)?;
        let pad = lookup("pad_token", &config.pad_token)?;
        let vocab = inner.get_vocab(true);
        let vocab_size = vocab.values().map(|&id| id as usize + 1).max().unwrap_or(0);
        let mut specials: Vec<(u32, String)> = inner
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special)
            .map(|(id, t)| (id, t.content))
            .collect();
        specials.sort();
        Ok(Self {
            inner,
            bos,
            eos,
            pad,
            add_bos_token: config.add_bos_token.unwrap_or(false),
            chat_template: config.chat_template,
            special_texts: specials.into_iter().map(|(_, t)| t).collect(),
            vocab_size,
        })
    }

    /// The built-in character-level tokenizer of `tigon demo` (see [`builtin_char_json`]).
    pub fn builtin_char() -> Self {
        let config = TokenizerConfig {
            bos_token: Some(CHAR_BOS.into()),
            eos_token: Some(CHAR_EOS.into()),
            pad_token: Some(CHAR_PAD.into()),
            unk_token: Some(CHAR_UNK.into()),
            add_bos_token: None,
            chat_template: Some(CHAR_CHAT_TEMPLATE.into()),
        };
        Self::from_json_str("<built-in char tokenizer>", &builtin_char_json(), config)
            .expect("the built-in tokenizer is valid")
    }

    /// Tokenize `text`. With `add_special_tokens` the tokenizer's post-processor runs (BOS for
    /// Llama-style tokenizers), and BOS is prepended if the config asks for it and the
    /// post-processor did not add it.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Encoded, TokenizerError> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        let mut ids = enc.get_ids().to_vec();
        let mut offsets = enc.get_offsets().to_vec();
        if add_special_tokens && self.add_bos_token {
            if let Some(bos) = &self.bos {
                if ids.first() != Some(&bos.id) {
                    ids.insert(0, bos.id);
                    offsets.insert(0, (0, 0));
                }
            }
        }
        Ok(Encoded { ids, offsets })
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, TokenizerError> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| TokenizerError::Decode(e.to_string()))
    }

    /// Embedding rows the vocabulary needs: largest token id + 1 (added tokens included).
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn bos(&self) -> Option<&SpecialToken> {
        self.bos.as_ref()
    }

    pub fn eos(&self) -> Option<&SpecialToken> {
        self.eos.as_ref()
    }

    /// The padding id: the pad token, else EOS, else 0. Padding positions are never trained
    /// on (label -100) and sit in their own attention segment, so any valid id does.
    pub fn pad_id(&self) -> u32 {
        self.pad
            .as_ref()
            .or(self.eos.as_ref())
            .map(|t| t.id)
            .unwrap_or(0)
    }

    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// Texts of the tokenizer's special added tokens, by id.
    pub fn special_token_texts(&self) -> &[String] {
        &self.special_texts
    }
}

pub const CHAR_PAD: &str = "<|pad|>";
pub const CHAR_BOS: &str = "<|bos|>";
pub const CHAR_EOS: &str = "<|eos|>";
pub const CHAR_UNK: &str = "<|unk|>";
pub const CHAR_SYSTEM: &str = "<|system|>";
pub const CHAR_USER: &str = "<|user|>";
pub const CHAR_ASSISTANT: &str = "<|assistant|>";

/// Special tokens of the built-in tokenizer, ids 0.. in this order.
pub const CHAR_SPECIALS: [&str; 7] = [
    CHAR_PAD,
    CHAR_BOS,
    CHAR_EOS,
    CHAR_UNK,
    CHAR_SYSTEM,
    CHAR_USER,
    CHAR_ASSISTANT,
];

/// The built-in chat template: `<|bos|><|user|>question<|assistant|>answer<|eos|>`, no
/// newlines, so demo sequences stay short.
pub const CHAR_CHAT_TEMPLATE: &str = "{{ bos_token }}{% for message in messages %}\
{% if message['role'] == 'system' %}<|system|>{{ message['content'] }}\
{% elif message['role'] == 'user' %}<|user|>{{ message['content'] }}\
{% elif message['role'] == 'assistant' %}<|assistant|>{{ message['content'] }}{{ eos_token }}\
{% else %}{{ raise_exception('unknown role ' ~ message['role']) }}{% endif %}{% endfor %}\
{% if add_generation_prompt %}<|assistant|>{% endif %}";

/// The built-in tokenizer as a `tokenizer.json` document: a BPE model with one token per
/// character and no merges (so every character is its own token), the special tokens above,
/// newline and printable ASCII; BOS added by a template post-processor like Llama's; the Fuse
/// decoder joins characters back without spaces.
pub fn builtin_char_json() -> String {
    let mut vocab = serde_json::Map::new();
    let mut added = Vec::new();
    for (id, t) in CHAR_SPECIALS.iter().enumerate() {
        vocab.insert(t.to_string(), json!(id));
        added.push(json!({
            "id": id, "content": t, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true
        }));
    }
    let chars = std::iter::once('\n').chain((0x20u8..0x7f).map(char::from));
    for c in chars {
        let id = vocab.len();
        vocab.insert(c.to_string(), json!(id));
    }
    let bos_id = 1;
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": null,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [
                {"SpecialToken": {"id": CHAR_BOS, "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}}
            ],
            "pair": [
                {"SpecialToken": {"id": CHAR_BOS, "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": CHAR_BOS, "type_id": 1}},
                {"Sequence": {"id": "B", "type_id": 1}}
            ],
            "special_tokens": {
                CHAR_BOS: {"id": CHAR_BOS, "ids": [bos_id], "tokens": [CHAR_BOS]}
            }
        },
        "decoder": {"type": "Fuse"},
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": CHAR_UNK,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": false,
            "vocab": vocab,
            "merges": []
        }
    })
    .to_string()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn builtin_char_tokenizer_round_trips() {
        let tok = Tokenizer::builtin_char();
        assert_eq!(tok.vocab_size(), 7 + 1 + 95);
        assert_eq!(tok.bos().unwrap().id, 1);
        assert_eq!(tok.eos().unwrap().id, 2);
        assert_eq!(tok.pad_id(), 0);
        let text = "12+345=357 Hello, World!\n~";
        let enc = tok.encode(text, false).unwrap();
        assert_eq!(enc.ids.len(), text.len(), "one token per character");
        for (i, &(s, e)) in enc.offsets.iter().enumerate() {
            assert_eq!((s, e), (i, i + 1));
        }
        assert_eq!(tok.decode(&enc.ids, false).unwrap(), text);
        let with_bos = tok.encode(text, true).unwrap();
        assert_eq!(with_bos.ids[0], 1);
        assert_eq!(&with_bos.ids[1..], &enc.ids[..]);
        // Special tokens in text are recognised as single tokens.
        let enc = tok
            .encode("<|user|>ab<|assistant|>c<|eos|>", false)
            .unwrap();
        assert_eq!(enc.ids.len(), 6);
        assert_eq!(enc.ids[0], tok.token_to_id(CHAR_USER).unwrap());
        assert_eq!(enc.ids[5], 2);
        assert_eq!(enc.offsets[3], (10, 23));
        assert_eq!(tok.decode(&enc.ids, true).unwrap(), "abc");
    }

    /// A small tokenizer.json shaped like Llama-3's (byte-level BPE, the Llama-3 split regex
    /// with look-ahead, which needs fancy-regex; BOS via TemplateProcessing).
    pub(crate) fn llama3_like_json() -> String {
        // Byte-level alphabet: printable ASCII maps to itself, space to 'Ġ', newline to 'Ċ'.
        let mut vocab = serde_json::Map::new();
        for c in (0x21u8..0x7f).map(char::from).chain(['Ġ', 'Ċ']) {
            let id = vocab.len();
            vocab.insert(c.to_string(), json!(id));
        }
        let merges = [
            ("h", "e"),
            ("l", "l"),
            ("he", "ll"),
            ("hell", "o"),
            ("Ġ", "w"),
            ("o", "r"),
            ("Ġw", "or"),
            ("Ġwor", "l"),
            ("Ġworl", "d"),
            ("Ċ", "Ċ"),
        ];
        for (a, b) in merges {
            let id = vocab.len();
            vocab.insert(format!("{a}{b}"), json!(id));
        }
        let n = vocab.len();
        let specials = [
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
        ];
        let added: Vec<Value> = specials
            .iter()
            .enumerate()
            .map(|(i, t)| {
                json!({"id": n + i, "content": t, "single_word": false, "lstrip": false,
                       "rstrip": false, "normalized": false, "special": true})
            })
            .collect();
        let pattern = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
        json!({
            "version": "1.0", "truncation": null, "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false},
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}
            ]},
            "post_processor": {"type": "Sequence", "processors": [
                {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
                {"type": "TemplateProcessing",
                 "single": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}},
                            {"Sequence": {"id": "A", "type_id": 0}}],
                 "pair": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}},
                          {"Sequence": {"id": "A", "type_id": 0}},
                          {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 1}},
                          {"Sequence": {"id": "B", "type_id": 1}}],
                 "special_tokens": {"<|begin_of_text|>": {"id": "<|begin_of_text|>",
                     "ids": [n], "tokens": ["<|begin_of_text|>"]}}}
            ]},
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null,
                      "continuing_subword_prefix": null, "end_of_word_suffix": null,
                      "fuse_unk": false, "byte_fallback": false, "ignore_merges": true,
                      "vocab": vocab, "merges": merges.iter().map(|(a, b)| format!("{a} {b}")).collect::<Vec<_>>()}
        })
        .to_string()
    }

    pub(crate) fn llama3_like() -> Tokenizer {
        let config = TokenizerConfig::from_json_str(
            "tokenizer_config.json",
            r#"{"bos_token": "<|begin_of_text|>", "eos_token": {"content": "<|eot_id|>", "lstrip": false},
                "chat_template": [{"name": "tool_use", "template": "x"},
                                  {"name": "default", "template": "{{ bos_token }}"}]}"#,
        )
        .unwrap();
        Tokenizer::from_json_str("tokenizer.json", &llama3_like_json(), config).unwrap()
    }

    #[test]
    fn llama3_like_byte_level_bpe() {
        let tok = llama3_like();
        assert_eq!(
            tok.chat_template(),
            Some("{{ bos_token }}"),
            "the default template"
        );
        assert_eq!(tok.eos().unwrap().text, "<|eot_id|>");
        let text = "hello world\n\nhi";
        let enc = tok.encode(text, true).unwrap();
        let pieces: Vec<String> = enc
            .ids
            .iter()
            .map(|&i| tok.inner.id_to_token(i).unwrap())
            .collect();
        assert_eq!(
            pieces,
            ["<|begin_of_text|>", "hello", "Ġworld", "ĊĊ", "h", "i"]
        );
        assert_eq!(enc.offsets[1], (0, 5));
        assert_eq!(tok.decode(&enc.ids, true).unwrap(), text);
    }

    /// A tokenizer.json shaped like Llama-2 / Mistral's: sentencepiece-style BPE on '▁' with
    /// byte fallback, normalizer Prepend + Replace, decoder Replace/ByteFallback/Fuse/Strip.
    pub(crate) fn llama2_like_json() -> String {
        let mut vocab = serde_json::Map::new();
        for t in ["<unk>", "<s>", "</s>"] {
            let id = vocab.len();
            vocab.insert(t.into(), json!(id));
        }
        for b in 0..=255u8 {
            let id = vocab.len();
            vocab.insert(format!("<0x{b:02X}>"), json!(id));
        }
        for c in ['▁', 'h', 'e', 'l', 'o', 'w', 'r', 'd'] {
            let id = vocab.len();
            vocab.insert(c.to_string(), json!(id));
        }
        let merges = [
            ("▁", "h"),
            ("e", "l"),
            ("▁h", "el"),
            ("l", "o"),
            ("▁hel", "lo"),
        ];
        for (a, b) in merges {
            let id = vocab.len();
            vocab.insert(format!("{a}{b}"), json!(id));
        }
        json!({
            "version": "1.0", "truncation": null, "padding": null,
            "added_tokens": [
                {"id": 0, "content": "<unk>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
                {"id": 1, "content": "<s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
                {"id": 2, "content": "</s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}
            ],
            "normalizer": {"type": "Sequence", "normalizers": [
                {"type": "Prepend", "prepend": "▁"},
                {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}
            ]},
            "pre_tokenizer": null,
            "post_processor": {"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"SpecialToken": {"id": "<s>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}},
            "decoder": {"type": "Sequence", "decoders": [
                {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0}
            ]},
            "model": {"type": "BPE", "dropout": null, "unk_token": "<unk>",
                      "continuing_subword_prefix": null, "end_of_word_suffix": null,
                      "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                      "vocab": vocab, "merges": merges.iter().map(|(a, b)| [a, b]).collect::<Vec<_>>()}
        })
        .to_string()
    }

    #[test]
    fn llama2_like_sentencepiece_bpe_with_byte_fallback() {
        let config = TokenizerConfig::from_json_str(
            "tokenizer_config.json",
            r#"{"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": true, "pad_token": null}"#,
        )
        .unwrap();
        let tok = Tokenizer::from_json_str("tokenizer.json", &llama2_like_json(), config).unwrap();
        assert_eq!(tok.pad_id(), 2, "no pad token: EOS pads");
        let text = "hello wé";
        let enc = tok.encode(text, true).unwrap();
        let pieces: Vec<String> = enc
            .ids
            .iter()
            .map(|&i| tok.inner.id_to_token(i).unwrap())
            .collect();
        // 'é' is not in the vocabulary: its two UTF-8 bytes become byte tokens.
        assert_eq!(pieces, ["<s>", "▁hello", "▁", "w", "<0xC3>", "<0xA9>"]);
        assert_eq!(enc.offsets[1], (0, 5));
        assert_eq!(enc.offsets[4], (7, 9));
        assert_eq!(tok.decode(&enc.ids, true).unwrap(), text);
    }

    #[test]
    fn config_errors_name_the_file() {
        let e = TokenizerConfig::from_json_str("m/tokenizer_config.json", "{oops").unwrap_err();
        assert!(e
            .to_string()
            .starts_with("m/tokenizer_config.json: not valid JSON"));
        let config = TokenizerConfig {
            eos_token: Some("<nope>".into()),
            ..Default::default()
        };
        let e =
            Tokenizer::from_json_str("m/tokenizer.json", &builtin_char_json(), config).unwrap_err();
        assert_eq!(
            e.to_string(),
            "m/tokenizer.json: eos_token is '<nope>', which the tokenizer's vocabulary does not contain"
        );
        let e = Tokenizer::from_json_str("m/tokenizer.json", "{}", TokenizerConfig::default())
            .unwrap_err();
        assert!(e
            .to_string()
            .starts_with("m/tokenizer.json: cannot load tokenizer"));
    }

    #[test]
    fn from_dir_prefers_chat_template_jinja() {
        let dir = std::env::temp_dir().join(format!("tigon-tok-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("tokenizer.json"), builtin_char_json()).unwrap();
        std::fs::write(
            dir.join("tokenizer_config.json"),
            r#"{"bos_token": "<|bos|>", "eos_token": "<|eos|>", "chat_template": "from config"}"#,
        )
        .unwrap();
        let tok = Tokenizer::from_dir(&dir).unwrap();
        assert_eq!(tok.chat_template(), Some("from config"));
        std::fs::write(dir.join("chat_template.jinja"), "from jinja file").unwrap();
        let tok = Tokenizer::from_dir(&dir).unwrap();
        assert_eq!(tok.chat_template(), Some("from jinja file"));
        assert_eq!(tok.eos().unwrap().id, 2);
        std::fs::remove_dir_all(&dir).unwrap();
        let e = Tokenizer::from_dir(&dir).unwrap_err();
        assert!(e.to_string().contains("tokenizer.json"), "{e}");
    }
}
