//! The bundled data of `tigon demo`: a learnable task generated in code from a seed, so the
//! demo fine-tunes with no download. Examples are written as JSONL and loaded through the
//! same path as a user's file; the held-out problems come with their expected answers for an
//! exact-match accuracy after greedy generation.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::data::{load_jsonl_bytes, DataError, DataOptions, Dataset};
use crate::rng::SplitMix64;
use crate::template::{ChatTemplate, Message, Role, TemplateError};
use crate::tokenizer::{Tokenizer, TokenizerError};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DemoTask {
    /// `"47+385="` -> `"432"`: operands of 1 to `max_digits` digits.
    Addition,
    /// `"hello:"` -> `"olleh"`: lowercase words of 2 to `max_digits` letters.
    Reversal,
}

/// How the examples are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DemoStyle {
    /// `{"messages": [user, assistant]}`, rendered with the chat template.
    Chat,
    /// `{"prompt": ..., "completion": ...}`.
    PromptCompletion,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DemoConfig {
    pub task: DemoTask,
    pub style: DemoStyle,
    pub train: usize,
    pub heldout: usize,
    /// Digits per operand (addition) or letters per word (reversal), at most.
    pub max_digits: u32,
    pub seed: u64,
}

impl Default for DemoConfig {
    fn default() -> Self {
        Self {
            task: DemoTask::Addition,
            style: DemoStyle::Chat,
            train: 4000,
            heldout: 200,
            max_digits: 2,
            seed: 0,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DemoExample {
    pub prompt: String,
    pub answer: String,
}

fn draw(task: DemoTask, max_digits: u32, g: &mut SplitMix64) -> DemoExample {
    let max_digits = max_digits.max(1);
    match task {
        DemoTask::Addition => {
            let operand = |g: &mut SplitMix64| {
                let digits = g.range_inclusive(1, max_digits as u64) as u32;
                let lo = if digits == 1 {
                    0
                } else {
                    10u64.pow(digits - 1)
                };
                g.range_inclusive(lo, 10u64.pow(digits) - 1)
            };
            let a = operand(g);
            let b = operand(g);
            DemoExample {
                prompt: format!("{a}+{b}="),
                answer: (a + b).to_string(),
            }
        }
        DemoTask::Reversal => {
            let len = g.range_inclusive(2, max_digits.max(2) as u64) as usize;
            let word: String = (0..len)
                .map(|_| char::from(b'a' + g.below(26) as u8))
                .collect();
            DemoExample {
                prompt: format!("{word}:"),
                answer: word.chars().rev().collect(),
            }
        }
    }
}

/// Generate (train, held-out) problems: all distinct, the held-out set disjoint from the
/// training set. If the task has fewer distinct problems than asked for, fewer are returned
/// (held-out first).
pub fn generate(cfg: &DemoConfig) -> (Vec<DemoExample>, Vec<DemoExample>) {
    let mut g = SplitMix64::for_stream(cfg.seed, 0xDE30);
    let mut seen = HashSet::new();
    let want = cfg.train + cfg.heldout;
    let mut all = Vec::with_capacity(want);
    // Bounded tries: a space smaller than `want` ends the search instead of looping forever.
    let mut tries = 0usize;
    while all.len() < want && tries < want * 50 + 1000 {
        tries += 1;
        let ex = draw(cfg.task, cfg.max_digits, &mut g);
        if seen.insert(ex.prompt.clone()) {
            all.push(ex);
        }
    }
    let heldout_n = cfg.heldout.min(all.len());
    let train = all.split_off(heldout_n);
    (train, all)
}

/// The examples as JSONL, one per line.
pub fn to_jsonl(examples: &[DemoExample], style: DemoStyle) -> String {
    let mut out = String::new();
    for ex in examples {
        let line = match style {
            DemoStyle::Chat => json!({"messages": [
                {"role": "user", "content": ex.prompt},
                {"role": "assistant", "content": ex.answer},
            ]}),
            DemoStyle::PromptCompletion => {
                json!({"prompt": ex.prompt, "completion": ex.answer})
            }
        };
        out.push_str(&line.to_string());
        out.push('\n');
    }
    out
}

/// A held-out problem ready for greedy generation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EvalPrompt {
    /// The prompt as the model saw it in training, up to where the answer starts.
    pub prompt_ids: Vec<u32>,
    pub expected: String,
    /// Enough new tokens for the expected answer and the end token; generation may stop
    /// earlier at EOS.
    pub max_new_tokens: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error(transparent)]
    Data(#[from] DataError),
    #[error("demo prompt: {0}")]
    Template(#[from] TemplateError),
    #[error("demo prompt: {0}")]
    Tokenizer(#[from] TokenizerError),
    #[error("chat-style demo data needs a tokenizer with a chat template")]
    NoChatTemplate,
}

/// Tokenize held-out problems as prompts (chat: the user turn plus the generation prompt).
pub fn eval_prompts(
    tok: &Tokenizer,
    examples: &[DemoExample],
    style: DemoStyle,
) -> Result<Vec<EvalPrompt>, DemoError> {
    let template = match style {
        DemoStyle::Chat => {
            Some(crate::data::chat_template_of(tok)?.ok_or(DemoError::NoChatTemplate)?)
        }
        DemoStyle::PromptCompletion => None,
    };
    examples
        .iter()
        .map(|ex| {
            let prompt_ids = match &template {
                Some(t) => tok.encode(&render_prompt(t, &ex.prompt)?, false)?.ids,
                None => tok.encode(&ex.prompt, true)?.ids,
            };
            let answer_tokens = tok.encode(&ex.answer, false)?.ids.len();
            Ok(EvalPrompt {
                prompt_ids,
                expected: ex.answer.clone(),
                max_new_tokens: answer_tokens + 1,
            })
        })
        .collect()
}

fn render_prompt(t: &ChatTemplate, prompt: &str) -> Result<String, TemplateError> {
    t.render(&[Message::new(Role::User, prompt)], true)
}

/// The answer in generated tokens: everything before the first EOS, special tokens dropped,
/// surrounding whitespace trimmed.
pub fn answer_text(tok: &Tokenizer, generated: &[u32]) -> Result<String, TokenizerError> {
    let end = tok
        .eos()
        .and_then(|eos| generated.iter().position(|&t| t == eos.id))
        .unwrap_or(generated.len());
    Ok(tok.decode(&generated[..end], true)?.trim().to_string())
}

/// Exact match: the generated answer (up to EOS) equals the expected one.
pub fn exact_match(tok: &Tokenizer, generated: &[u32], expected: &str) -> bool {
    answer_text(tok, generated).is_ok_and(|a| a == expected.trim())
}

/// Fraction of prompts answered exactly (`generations[i]` are the new tokens for
/// `prompts[i]`).
pub fn exact_match_accuracy(
    tok: &Tokenizer,
    prompts: &[EvalPrompt],
    generations: &[Vec<u32>],
) -> f64 {
    assert_eq!(prompts.len(), generations.len());
    if prompts.is_empty() {
        return 0.0;
    }
    let hits = prompts
        .iter()
        .zip(generations)
        .filter(|(p, g)| exact_match(tok, g, &p.expected))
        .count();
    hits as f64 / prompts.len() as f64
}

/// Everything the demo needs: training and held-out datasets (through the JSONL path) and the
/// held-out prompts for accuracy.
#[derive(Debug)]
pub struct DemoData {
    pub train: Dataset,
    pub heldout: Dataset,
    pub eval: Vec<EvalPrompt>,
}

pub fn build_demo(
    tok: &Tokenizer,
    cfg: &DemoConfig,
    opts: &DataOptions,
) -> Result<DemoData, DemoError> {
    let (train, heldout) = generate(cfg);
    let train_ds = load_jsonl_bytes(
        "<built-in demo data: train>",
        to_jsonl(&train, cfg.style).as_bytes(),
        tok,
        opts,
    )?;
    let heldout_ds = load_jsonl_bytes(
        "<built-in demo data: held-out>",
        to_jsonl(&heldout, cfg.style).as_bytes(),
        tok,
        opts,
    )?;
    let eval = eval_prompts(tok, &heldout, cfg.style)?;
    Ok(DemoData {
        train: train_ds,
        heldout: heldout_ds,
        eval,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::IGNORE_INDEX;

    #[test]
    fn addition_problems_are_right_distinct_and_seeded() {
        let cfg = DemoConfig {
            train: 500,
            heldout: 50,
            max_digits: 3,
            ..Default::default()
        };
        let (train, held) = generate(&cfg);
        assert_eq!((train.len(), held.len()), (500, 50));
        for ex in train.iter().chain(&held) {
            let (a, b) = ex.prompt.trim_end_matches('=').split_once('+').unwrap();
            let (a, b): (u64, u64) = (a.parse().unwrap(), b.parse().unwrap());
            assert!(a < 1000 && b < 1000);
            assert_eq!(ex.answer, (a + b).to_string());
        }
        let prompts: HashSet<&str> = train.iter().map(|e| e.prompt.as_str()).collect();
        assert_eq!(prompts.len(), 500);
        assert!(held.iter().all(|e| !prompts.contains(e.prompt.as_str())));
        assert_eq!(generate(&cfg), (train.clone(), held));
        let other = generate(&DemoConfig { seed: 1, ..cfg });
        assert_ne!(other.0, train);
        // Operands of every length up to max_digits occur.
        assert!(train.iter().any(|e| e.prompt.len() == "1+2=".len()));
        assert!(train.iter().any(|e| e.prompt.len() == "123+456=".len()));
    }

    #[test]
    fn reversal_and_small_spaces() {
        let cfg = DemoConfig {
            task: DemoTask::Reversal,
            train: 100,
            heldout: 10,
            max_digits: 5,
            ..Default::default()
        };
        let (train, _) = generate(&cfg);
        for ex in &train {
            let word = ex.prompt.trim_end_matches(':');
            assert!((2..=5).contains(&word.len()));
            assert_eq!(ex.answer, word.chars().rev().collect::<String>());
        }
        // One-digit addition has 100 problems: asking for more returns all of them.
        let (train, held) = generate(&DemoConfig {
            train: 500,
            heldout: 10,
            max_digits: 1,
            ..Default::default()
        });
        assert_eq!((train.len(), held.len()), (90, 10));
    }

    #[test]
    fn demo_data_goes_through_the_jsonl_path() {
        let tok = Tokenizer::builtin_char();
        let cfg = DemoConfig {
            train: 64,
            heldout: 8,
            ..Default::default()
        };
        let demo = build_demo(&tok, &cfg, &DataOptions::default()).unwrap();
        assert_eq!(demo.train.examples.len(), 64);
        assert_eq!(demo.heldout.examples.len(), 8);
        assert_eq!(demo.eval.len(), 8);
        let (train, held) = generate(&cfg);
        for (ex, src) in demo.train.examples.iter().zip(&train) {
            let text = tok.decode(&ex.input_ids, false).unwrap();
            assert_eq!(
                text,
                format!(
                    "<|bos|><|user|>{}<|assistant|>{}<|eos|>",
                    src.prompt, src.answer
                )
            );
            let trained: Vec<u32> = ex
                .labels
                .iter()
                .filter(|&&l| l != IGNORE_INDEX)
                .map(|&l| l as u32)
                .collect();
            assert_eq!(
                tok.decode(&trained, false).unwrap(),
                format!("{}<|eos|>", src.answer)
            );
        }
        let p = &demo.eval[0];
        assert_eq!(
            tok.decode(&p.prompt_ids, false).unwrap(),
            format!("<|bos|><|user|>{}<|assistant|>", held[0].prompt)
        );
        assert_eq!(p.expected, held[0].answer);
        assert_eq!(p.max_new_tokens, held[0].answer.len() + 1);
        // The prompt is exactly the training sequence up to the answer.
        let ex = &demo.heldout.examples[0];
        assert_eq!(&ex.input_ids[..p.prompt_ids.len()], p.prompt_ids.as_slice());

        let pc = eval_prompts(&tok, &held[..1], DemoStyle::PromptCompletion).unwrap();
        assert_eq!(
            tok.decode(&pc[0].prompt_ids, false).unwrap(),
            format!("<|bos|>{}", held[0].prompt)
        );
        let jsonl = to_jsonl(&held[..1], DemoStyle::PromptCompletion);
        assert_eq!(
            jsonl,
            format!(
                "{{\"completion\":\"{}\",\"prompt\":\"{}\"}}\n",
                held[0].answer, held[0].prompt
            )
        );
    }

    #[test]
    fn exact_match_scoring() {
        let tok = Tokenizer::builtin_char();
        let ids = |s: &str| tok.encode(s, false).unwrap().ids;
        let eos = tok.eos().unwrap().id;
        let mut right = ids("357");
        right.push(eos);
        right.extend(ids("junk after eos"));
        assert!(exact_match(&tok, &right, "357"));
        assert!(
            !exact_match(&tok, &ids("3571"), "357"),
            "no EOS: extra digit counts"
        );
        assert!(!exact_match(&tok, &ids("35"), "357"));
        assert!(
            exact_match(&tok, &ids("357"), "357"),
            "cut at max_new_tokens"
        );
        let prompts = vec![
            EvalPrompt {
                prompt_ids: vec![],
                expected: "1".into(),
                max_new_tokens: 2
            };
            4
        ];
        let gens = vec![ids("1"), ids("2"), vec![eos], ids("1")];
        assert_eq!(exact_match_accuracy(&tok, &prompts, &gens), 0.5);
    }
}
