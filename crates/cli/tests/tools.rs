//! `tigon eval`, `tigon merge` and `tigon parity` run as a user runs them (the built binary),
//! on the CPU, over the tiny HF+PEFT fixtures in parity/fixtures.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use tigon_engine::{Batch, Decoder, LoraState};
use tigon_kernels::check::rel_err;
use tigon_kernels::{DType, Device, Tensor};
use tigon_model::lora::export_merged;
use tigon_model::{Adapter, ModelConfig, ModelWeights};
use tigon_train::tokenizer::{builtin_char_json, CHAR_BOS, CHAR_CHAT_TEMPLATE, CHAR_EOS, CHAR_PAD};
use tigon_train::{load_jsonl, DataOptions, Tokenizer};

/// A scratch folder removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let p = std::env::temp_dir().join(format!("tigon-cli-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Scratch(p)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../parity/fixtures")
        .join(name)
}

fn tigon(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tigon"))
        .args(args)
        .output()
        .expect("run the tigon binary")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// The tiny Llama fixture model with the built-in character tokenizer beside it (its 103
/// ids fit the model's vocabulary of 320).
fn model_with_tokenizer(dir: &Path) -> PathBuf {
    let model = dir.join("model");
    std::fs::create_dir_all(&model).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture("tiny_llama").join("model").join(f), model.join(f)).unwrap();
    }
    std::fs::write(model.join("tokenizer.json"), builtin_char_json()).unwrap();
    let cfg = serde_json::json!({
        "bos_token": CHAR_BOS, "eos_token": CHAR_EOS, "pad_token": CHAR_PAD,
        "chat_template": CHAR_CHAT_TEMPLATE,
    });
    std::fs::write(model.join("tokenizer_config.json"), cfg.to_string()).unwrap();
    model
}

const DATA: &str = r#"{"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}
{"text": "the quick brown fox jumps over the lazy dog"}

{"prompt": "Capital of France? ", "completion": "Paris."}
{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]}
{"instruction": "Reverse: abc", "output": "cba"}
"#;

fn last_json(out: &Output) -> serde_json::Value {
    let stdout = text(&out.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last).unwrap_or_else(|e| panic!("last line {last:?}: {e}"))
}

/// The token-mean loss from full logits, one example at a time, in f64: log-sum-exp of the
/// row minus the target's logit, over every scored target.
fn reference_loss(model: &Path, adapter: &Path, data: &Path, all_tokens: bool) -> (f64, usize) {
    let tok = Tokenizer::from_dir(model).unwrap();
    let opts = DataOptions {
        train_on_prompt: all_tokens,
        ..DataOptions::default()
    };
    let ds = load_jsonl(data, &tok, &opts).unwrap();
    let weights = ModelWeights::from_dir(model, &Device::Cpu, DType::F32).unwrap();
    let a = Adapter::load(adapter, "default", &weights.config).unwrap();
    let lora = LoraState::from_adapter(&a, &weights.config, &Device::Cpu).unwrap();
    let vocab = weights.config.vocab_size;
    let decoder = Decoder::new(weights, lora).unwrap();
    let (mut sum, mut n) = (0f64, 0usize);
    for ex in &ds.examples {
        let ids: Vec<i32> = ex.input_ids.iter().map(|&i| i as i32).collect();
        let batch = Batch::from_rows(&[(ids, ex.labels.clone())]).unwrap();
        let logits = decoder.logits(&batch).unwrap().to_f32_vec().unwrap();
        for (t, &target) in batch.targets.iter().enumerate() {
            if target < 0 {
                continue;
            }
            let row = &logits[t * vocab..(t + 1) * vocab];
            let max = row.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
            let lse = max
                + row
                    .iter()
                    .map(|&x| (x as f64 - max).exp())
                    .sum::<f64>()
                    .ln();
            sum += lse - row[target as usize] as f64;
            n += 1;
        }
    }
    (sum / n as f64, n)
}

#[test]
fn eval_prints_the_loss_of_full_logits() {
    let s = Scratch::new("eval");
    let model = model_with_tokenizer(&s.0);
    let adapter = fixture("tiny_llama").join("adapter");
    let data = s.0.join("data.jsonl");
    std::fs::write(&data, DATA).unwrap();
    for all_tokens in [false, true] {
        let mut args = vec![
            "eval",
            "--model",
            p(&model),
            "--adapter",
            p(&adapter),
            "--data",
            p(&data),
            "--device",
            "cpu",
            // Small batches: several micro-batches, several examples in some of them.
            "--batch-tokens",
            "300",
        ];
        if all_tokens {
            args.push("--all-tokens");
        }
        let out = tigon(&args);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let j = last_json(&out);
        let (want, n) = reference_loss(&model, &adapter, &data, all_tokens);
        let loss = j["loss"].as_f64().unwrap();
        assert!(
            (loss - want).abs() <= 1e-5 * want,
            "all_tokens {all_tokens}: eval loss {loss} vs full-logits {want}"
        );
        assert_eq!(j["tokens"].as_u64(), Some(n as u64));
        assert_eq!(j["examples"].as_u64(), Some(5));
        let ppl = j["perplexity"].as_f64().unwrap();
        assert!((ppl - loss.exp()).abs() <= 1e-12 * ppl);
        assert_eq!(j["adapter"].as_str(), Some(p(&adapter)));
        assert_eq!(j["model"].as_str(), Some(p(&model)));
    }
    // Without the adapter the loss changes (the adapter is applied, not ignored).
    let out = tigon(&[
        "eval",
        "--model",
        p(&model),
        "--data",
        p(&data),
        "--device",
        "cpu",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let j = last_json(&out);
    assert!(j["adapter"].is_null());
    let (want, _) = reference_loss(&model, &adapter, &data, false);
    assert!((j["loss"].as_f64().unwrap() - want).abs() > 1e-3 * want);
}

#[test]
fn eval_names_the_bad_line() {
    let s = Scratch::new("eval-bad");
    let model = model_with_tokenizer(&s.0);
    let data = s.0.join("bad.jsonl");
    std::fs::write(&data, "{\"text\": \"fine\"}\n{\"text\": \"broken\n").unwrap();
    let out = tigon(&[
        "eval",
        "--model",
        p(&model),
        "--data",
        p(&data),
        "--device",
        "cpu",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("bad.jsonl:2"), "{err}");
    // A model folder without a tokenizer is named.
    let bare = fixture("tiny_llama").join("model");
    let out = tigon(&[
        "eval",
        "--model",
        p(&bare),
        "--data",
        p(&data),
        "--device",
        "cpu",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("tokenizer.json"),
        "{}",
        text(&out.stderr)
    );
}

fn logits(model: &Path, adapter: Option<&Path>) -> Vec<f32> {
    let weights = ModelWeights::from_dir(model, &Device::Cpu, DType::F32).unwrap();
    let lora = match adapter {
        Some(a) => {
            let a = Adapter::load(a, "default", &weights.config).unwrap();
            LoraState::from_adapter(&a, &weights.config, &Device::Cpu).unwrap()
        }
        None => LoraState::empty(weights.config.num_hidden_layers),
    };
    let batch =
        tigon_engine::parity::read_batch(&fixture("tiny_llama").join("batch.json")).unwrap();
    Decoder::new(weights, lora)
        .unwrap()
        .logits(&batch)
        .unwrap()
        .to_f32_vec()
        .unwrap()
}

/// The merged model, loaded back with no adapter, computes what the base model with the
/// adapter computes, up to the one bf16 rounding of each merged weight.
#[test]
fn merge_writes_a_model_equal_to_base_plus_adapter() {
    let s = Scratch::new("merge");
    let base = fixture("tiny_llama").join("model");
    let adapter = fixture("tiny_llama").join("adapter");
    let merged = s.0.join("merged");
    let out = tigon(&[
        "merge",
        "--model",
        p(&base),
        "--adapter",
        p(&adapter),
        "--output",
        p(&merged),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    for f in ["config.json", "model.safetensors", "generation_config.json"] {
        assert!(merged.join(f).is_file(), "{f} missing");
    }
    assert_eq!(
        ModelConfig::from_dir(&merged).unwrap(),
        ModelConfig::from_dir(&base).unwrap()
    );
    // The merged file is bf16, so compare with the base rounded to bf16 the same way
    // (an export with no adapter) plus the adapter in separate mode.
    let base16 = s.0.join("base16");
    export_merged(&base, &[], &base16).unwrap();
    let separate = logits(&base16, Some(&adapter));
    let merged_logits = logits(&merged, None);
    let plain = logits(&base16, None);
    let err = rel_err(&merged_logits, &separate);
    let effect = rel_err(&plain, &separate);
    eprintln!("merged vs separate {err:e}; adapter's effect {effect:e}");
    assert!(err < 1e-2, "merged vs separate: rel err {err:e}");
    assert!(err < effect / 10.0, "err {err:e} vs effect {effect:e}");
}

#[test]
fn merge_refuses_non_finite_weights_unless_unsafe() {
    let s = Scratch::new("merge-inf");
    let base = fixture("tiny_llama").join("model");
    let config = ModelConfig::from_dir(&base).unwrap();
    let mut a = Adapter::load(&fixture("tiny_llama").join("adapter"), "x", &config).unwrap();
    let module = a.modules[0].target.module.clone();
    let shape = a.modules[0].b.shape().to_vec();
    a.modules[0].b = Tensor::from_f32(&shape, vec![f32::MAX; shape.iter().product()]).unwrap();
    let bad = s.0.join("bad-adapter");
    a.save(&bad).unwrap();
    let out_dir = s.0.join("out");
    let args = [
        "merge",
        "--model",
        p(&base),
        "--adapter",
        p(&bad),
        "--output",
        p(&out_dir),
    ];
    let out = tigon(&args);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("non-finite") && err.contains(&module), "{err}");
    assert!(!out_dir.join("config.json").exists());
    assert!(!out_dir.join("model.safetensors").exists());

    let mut unsafe_args = args.to_vec();
    unsafe_args.push("--unsafe");
    let out = tigon(&unsafe_args);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let w = ModelWeights::from_dir(&out_dir, &Device::Cpu, DType::F32).unwrap();
    let t = &a.modules[0].target;
    let v = w
        .projection(t.layer, t.projection)
        .unwrap()
        .to_f32_vec()
        .unwrap();
    assert!(v.iter().any(|x| !x.is_finite()));
}

#[test]
fn parity_passes_on_the_cpu_fixtures() {
    let s = Scratch::new("parity");
    let json = s.0.join("parity.json");
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../parity/fixtures");
    let out = tigon(&[
        "parity",
        "--fixtures",
        p(&fixtures),
        "--device",
        "cpu",
        "--json",
        p(&json),
    ]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    for name in ["tiny_llama", "tiny_qwen2"] {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no line for {name}: {stdout}"));
        assert!(line.ends_with("PASS"), "{line}");
    }
    assert!(stdout.contains("2 passed, 0 failed"), "{stdout}");
    let j: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(j["fixtures"].as_array().unwrap().len(), 2);

    // A fixture that disagrees with its reference fails the run.
    let broken = s.0.join("fixtures/broken");
    std::fs::create_dir_all(&broken).unwrap();
    for f in ["batch.json", "expected.safetensors"] {
        std::fs::copy(fixture("tiny_llama").join(f), broken.join(f)).unwrap();
    }
    let copy_dir = |from: &Path, to: &Path| {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    };
    copy_dir(&fixture("tiny_llama").join("model"), &broken.join("model"));
    // Another fixture's adapter with the right shapes: the tiny_llama adapter with B halved.
    let config = ModelConfig::from_dir(&broken.join("model")).unwrap();
    let mut a = Adapter::load(&fixture("tiny_llama").join("adapter"), "d", &config).unwrap();
    for m in &mut a.modules {
        let v: Vec<f32> = m.b.to_f32_vec().unwrap().iter().map(|x| 0.5 * x).collect();
        m.b = Tensor::from_f32(m.b.shape(), v).unwrap();
    }
    a.save(&broken.join("adapter")).unwrap();
    let out = tigon(&["parity", "--fixtures", p(&s.0.join("fixtures"))]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = text(&out.stdout);
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("broken") && l.ends_with("FAIL")),
        "{stdout}"
    );
    assert!(stdout.contains("0 passed, 1 failed"), "{stdout}");
}

#[test]
fn argument_errors_are_reported() {
    // clap: missing required flags and bad values exit with 2 and name the flag.
    for (args, needle) in [
        (vec!["eval", "--model", "m"], "--data"),
        (
            vec!["eval", "--model", "m", "--data", "d", "--format", "csv"],
            "unknown data format",
        ),
        (
            vec!["eval", "--model", "m", "--data", "d", "--device", "tpu"],
            "tpu",
        ),
        (vec!["merge", "--model", "m", "--output", "o"], "--adapter"),
        (vec!["parity", "--device", "metal"], "metal"),
        (vec!["bench", "lora", "--ranks", "x"], "--ranks"),
    ] {
        let out = tigon(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = text(&out.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    // Our own checks exit with 1 and one line.
    let s = Scratch::new("args");
    for (args, needle) in [
        (
            vec![
                "eval",
                "--model",
                "/nonexistent/m",
                "--data",
                "d",
                "--device",
                "cpu",
            ],
            "/nonexistent/m",
        ),
        (
            vec!["parity", "--fixtures", "/nonexistent/f"],
            "/nonexistent/f",
        ),
        (vec!["parity", "--fixtures", p(&s.0)], "no fixture folders"),
        (vec!["bench", "lora", "--ranks", "0"], "positive ranks"),
        (vec!["bench", "lora", "--shape", "gpt-9"], "unknown --shape"),
        (
            vec![
                "merge",
                "--model",
                "/nonexistent/m",
                "--adapter",
                "a",
                "--output",
                "o",
            ],
            "/nonexistent/m",
        ),
    ] {
        let out = tigon(&args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = text(&out.stderr);
        assert!(
            err.starts_with("error: ") && err.contains(needle),
            "{args:?}: {err}"
        );
    }
    // bench lora needs a GPU: with none it says so; with one, a minimal run succeeds.
    let out = tigon(&[
        "bench",
        "lora",
        "--shape",
        "llama-3.2-1b",
        "--tokens",
        "16",
        "--ranks",
        "1",
        "--runs",
        "1",
        "--warmup",
        "0",
        "--no-e2e",
    ]);
    if !out.status.success() {
        assert!(
            text(&out.stderr).contains("needs a CUDA GPU"),
            "{}",
            text(&out.stderr)
        );
    }
}
