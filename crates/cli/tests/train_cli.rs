//! `tigon train` through the real binary: a run killed with SIGKILL and resumed ends
//! bit-identical to an uninterrupted one, and malformed inputs fail with one line naming the
//! file and the place.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use tigon_train::demo_data::{generate, to_jsonl, DemoConfig, DemoStyle, DemoTask};
use tigon_trainer::demo::{write_demo_model, DemoModel};
use tigon_trainer::read_metrics;

const BIN: &str = env!("CARGO_BIN_EXE_tigon");

/// A fresh folder under the temp dir, removed on drop.
struct TestDir(PathBuf);

impl TestDir {
    fn new(tag: &str) -> TestDir {
        let p = std::env::temp_dir().join(format!("tigon-cli-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TestDir(p)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A tiny model folder (char tokenizer), tiny chat JSONL and a config under `dir`.
fn setup(dir: &Path, steps: u64, save_every: u64) -> PathBuf {
    let model = DemoModel {
        hidden: 32,
        intermediate: 64,
        layers: 2,
        heads: 2,
        kv_heads: 1,
    };
    write_demo_model(&dir.join("model"), &model, 64, 5).unwrap();
    let (train, _) = generate(&DemoConfig {
        task: DemoTask::Addition,
        style: DemoStyle::Chat,
        train: 200,
        heldout: 0,
        max_digits: 2,
        seed: 2,
    });
    std::fs::write(dir.join("train.jsonl"), to_jsonl(&train, DemoStyle::Chat)).unwrap();
    let config = format!(
        "model = \"model\"\ndata = [\"train.jsonl\"]\nformat = \"chat\"\nholdout = 0.1\n\
         seq_len = 64\nmicro_batch = 2\ngrad_accum = 2\nlr = 5e-3\nwarmup_steps = 3\n\
         weight_decay = 0.01\nsteps = {steps}\nsave_every = {save_every}\neval_every = 4\n\
         lora_r = 4\nseed = 9\ndevice = \"cpu\"\n"
    );
    let path = dir.join("train.toml");
    std::fs::write(&path, config).unwrap();
    path
}

fn tigon(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

fn lines_in(path: &Path) -> usize {
    std::fs::read_to_string(path)
        .map(|t| t.lines().count())
        .unwrap_or(0)
}

/// Per-step (step, loss, grad_norm, eval_loss) bits of a metrics file.
fn trajectory(out: &Path) -> Vec<(u64, u64, u64, Option<u64>)> {
    read_metrics(&out.join("metrics.jsonl"))
        .unwrap()
        .iter()
        .map(|r| {
            (
                r.step,
                r.loss.to_bits(),
                r.grad_norm.to_bits(),
                r.eval_loss.map(f64::to_bits),
            )
        })
        .collect()
}

#[test]
fn sigkill_and_resume_match_an_uninterrupted_run() {
    let dir = TestDir::new("resume");
    let steps = 24u64;
    let config = setup(&dir.0, steps, 3);
    let cfg = config.to_str().unwrap();
    let (a, b) = (dir.0.join("a"), dir.0.join("b"));

    let run = tigon(&["train", "--config", cfg, "--output", a.to_str().unwrap()]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert_eq!(trajectory(&a).len(), steps as usize);

    // Kill at a step drawn from the clock, after the first checkpoint exists.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64;
    let kill_after = 4 + nanos % (steps - 10);
    eprintln!("killing after {kill_after} metric lines");
    let mut child = Command::new(BIN)
        .args(["train", "--config", cfg, "--output", b.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let metrics = b.join("metrics.jsonl");
    let start = Instant::now();
    loop {
        if b.join("latest").is_file() && lines_in(&metrics) as u64 >= kill_after {
            break;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the run ended ({status}) before it could be killed");
        }
        assert!(start.elapsed() < Duration::from_secs(120), "run stalled");
        std::thread::sleep(Duration::from_millis(1));
    }
    child.kill().unwrap(); // SIGKILL on Unix
    let status = child.wait().unwrap();
    assert!(!status.success());
    let done_before = lines_in(&metrics);
    assert!(
        done_before < steps as usize,
        "killed too late ({done_before} steps)"
    );

    let run = tigon(&[
        "train",
        "--config",
        cfg,
        "--output",
        b.to_str().unwrap(),
        "--resume",
    ]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(String::from_utf8_lossy(&run.stderr).contains("resuming from"));

    assert_eq!(trajectory(&a), trajectory(&b));
    for f in ["adapter_model.safetensors", "adapter_config.json"] {
        let (x, y) = (
            std::fs::read(a.join(f)).unwrap(),
            std::fs::read(b.join(f)).unwrap(),
        );
        assert!(x == y, "{f} differs after resume");
    }
    let last = format!("checkpoint-{steps}");
    let opt = "optimizer.safetensors";
    assert_eq!(
        std::fs::read(a.join(&last).join(opt)).unwrap(),
        std::fs::read(b.join(&last).join(opt)).unwrap()
    );
    assert!(b.join("loss.png").is_file());
}

/// Run `tigon train` expecting failure; its stderr must be one line containing each of
/// `needles`.
fn fails_with(args: &[&str], needles: &[&str]) {
    let out = tigon(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "should fail: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(lines.len(), 1, "one error line expected: {err}");
    assert!(!lines[0].contains("panicked"), "{err}");
    for n in needles {
        assert!(lines[0].contains(n), "`{n}` missing from: {}", lines[0]);
    }
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn malformed_inputs_fail_with_one_line_naming_file_and_place() {
    let dir = TestDir::new("malformed");
    let config = setup(&dir.0, 2, 0);
    let cfg = config.to_str().unwrap();
    let out = dir.0.join("out");
    let base = ["train", "--config", cfg, "--output", out.to_str().unwrap()];
    let with = |extra: &[&str]| -> Vec<String> {
        base.iter()
            .chain(extra)
            .map(|s| s.to_string())
            .collect::<Vec<_>>()
    };
    let run = |extra: &[&str], needles: &[&str]| {
        let args = with(extra);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        fails_with(&refs, needles);
    };
    let write = |name: &str, text: &str| {
        let p = dir.0.join(name);
        std::fs::write(&p, text).unwrap();
        p.to_str().unwrap().to_string()
    };
    let good = r#"{"messages": [{"role": "user", "content": "1+2="}, {"role": "assistant", "content": "3"}]}"#;

    // A JSONL line that is not JSON.
    let p = write("bad.jsonl", &format!("{good}\n{{\"messages\": [\n{good}\n"));
    run(&["--data", &p], &["bad.jsonl:2", "not JSON"]);
    // A chat message with an unknown role.
    let p = write(
        "role.jsonl",
        &format!(
            "{good}\n{good}\n{}\n",
            good.replace("\"user\"", "\"robot\"")
        ),
    );
    run(&["--data", &p], &["role.jsonl:3", "robot"]);
    // An empty dataset.
    let p = write("empty.jsonl", "\n\n");
    run(&["--data", &p], &["empty.jsonl", "no training examples"]);
    // An unknown config key, through the file.
    let p = write(
        "typo.toml",
        &format!("{}lrr = 1e-3\n", std::fs::read_to_string(&config).unwrap()),
    );
    let typo = ["train", "--config", &p, "--output", out.to_str().unwrap()];
    fails_with(&typo, &["typo.toml:", "lrr"]);

    // A config.json missing a field.
    let model = dir.0.join("model");
    let broken = dir.0.join("model-noconfig");
    std::fs::create_dir_all(&broken).unwrap();
    for e in std::fs::read_dir(&model).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), broken.join(e.file_name())).unwrap();
    }
    let cj = broken.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cj).unwrap()).unwrap();
    v.as_object_mut().unwrap().remove("hidden_size");
    std::fs::write(&cj, v.to_string()).unwrap();
    run(
        &["--model", broken.to_str().unwrap()],
        &["config.json", "hidden_size"],
    );

    // A truncated safetensors file.
    let trunc = dir.0.join("model-trunc");
    std::fs::create_dir_all(&trunc).unwrap();
    for e in std::fs::read_dir(&model).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), trunc.join(e.file_name())).unwrap();
    }
    let st = trunc.join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    std::fs::write(&st, &bytes[..bytes.len() / 2]).unwrap();
    run(
        &["--model", trunc.to_str().unwrap()],
        &["model.safetensors"],
    );
    assert!(!out.join("latest").exists());
}

#[test]
fn flags_override_the_config() {
    let dir = TestDir::new("override");
    let config = setup(&dir.0, 50, 0);
    let out = dir.0.join("out");
    // The file says 50 steps and lr 5e-3; the flags say 3 steps, lr 1e-3 and no holdout.
    let run = tigon(&[
        "train",
        "--config",
        config.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--steps",
        "3",
        "--lr",
        "1e-3",
        "--holdout",
        "0",
        "--decay",
        "constant",
        "--warmup-steps",
        "0",
    ]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let recs = read_metrics(&out.join("metrics.jsonl")).unwrap();
    assert_eq!(recs.len(), 3);
    assert!(recs.iter().all(|r| (r.lr - 1e-3).abs() < 1e-9));
    assert!(recs.iter().all(|r| r.eval_loss.is_none()));
    // A second fresh run into the same folder is refused unless asked for.
    fails_with(
        &[
            "train",
            "--config",
            config.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
            "--steps",
            "3",
        ],
        &["--resume", "--overwrite"],
    );
}

/// `--offload-embedding` and `--offload-layers` (or the config keys) keep weights in host
/// memory and change no value: the metrics are bitwise those of the plain run. Streaming
/// more layers than the model has fails with one line naming both numbers.
#[test]
fn offload_flags_train_the_same_trajectory() {
    let dir = TestDir::new("offload");
    let config = setup(&dir.0, 4, 0);
    let cfg = config.to_str().unwrap();
    let (a, b) = (dir.0.join("a"), dir.0.join("b"));
    let plain = tigon(&["train", "--config", cfg, "--output", a.to_str().unwrap()]);
    assert!(
        plain.status.success(),
        "{}",
        String::from_utf8_lossy(&plain.stderr)
    );
    let off = tigon(&[
        "train",
        "--config",
        cfg,
        "--output",
        b.to_str().unwrap(),
        "--activation-checkpointing",
        "true",
        "--offload-embedding",
        "true",
        "--offload-layers",
        "2",
    ]);
    assert!(
        off.status.success(),
        "{}",
        String::from_utf8_lossy(&off.stderr)
    );
    assert_eq!(trajectory(&a), trajectory(&b));
    let log =
        String::from_utf8_lossy(&off.stdout).to_string() + &String::from_utf8_lossy(&off.stderr);
    assert!(log.contains("offload: embedding"), "{log}");
    let c = dir.0.join("c");
    fails_with(
        &[
            "train",
            "--config",
            cfg,
            "--output",
            c.to_str().unwrap(),
            "--offload-layers",
            "3",
        ],
        &["offload_layers = 3 but the model has 2 layers"],
    );
}
