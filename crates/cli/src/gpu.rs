//! `tigon gpu-check` and `tigon bench kernels`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Args;
use tigon_kernels::bench::{BenchConfig, BenchRow, H100_BF16_TFLOPS, H100_COPY_GBPS};
use tigon_kernels::check::CheckLine;
use tigon_kernels::cuda::gemm::{GemmSpec, Operand};
use tigon_kernels::ops::{all_benches, all_checks};
use tigon_kernels::rng::Rng;
use tigon_kernels::{DType, Device, Gpu, Tensor};

#[derive(Args)]
pub struct GpuCheckArgs {
    /// Print the names of the ops checked, and exit (works without a GPU).
    #[arg(long)]
    list: bool,
    /// Check only these ops (comma-separated names from --list).
    #[arg(long, value_delimiter = ',')]
    op: Vec<String>,
    /// Seed for the random inputs (default: from the clock, so each run draws fresh ones).
    #[arg(long)]
    seed: Option<u64>,
    /// Also write every line as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Args)]
pub struct BenchKernelsArgs {
    /// Benchmark only these ops (comma-separated).
    #[arg(long, value_delimiter = ',')]
    op: Vec<String>,
    /// Timed runs per measurement (the median is reported).
    #[arg(long, default_value_t = 30)]
    runs: usize,
    /// Untimed warm-up runs.
    #[arg(long, default_value_t = 5)]
    warmup: usize,
    /// Write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

fn open_gpu() -> Result<Arc<Gpu>> {
    Gpu::new(0).context("tigon needs a CUDA GPU for this command")
}

fn selected(filter: &[String], name: &str) -> bool {
    filter.is_empty() || filter.iter().any(|f| f == name)
}

fn check_filter(filter: &[String], known: &[&str]) -> Result<()> {
    for f in filter {
        if !known.contains(&f.as_str()) {
            anyhow::bail!("unknown op `{f}`; known ops: {}", known.join(", "));
        }
    }
    Ok(())
}

pub fn gpu_check(args: GpuCheckArgs) -> Result<i32> {
    let checks = all_checks();
    let names: Vec<&str> = checks.iter().map(|c| c.op).collect();
    if args.list {
        for n in &names {
            println!("{n}");
        }
        return Ok(0);
    }
    check_filter(&args.op, &names)?;
    let gpu = open_gpu()?;
    gpu.set_poison(true);
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
    });
    println!(
        "gpu-check on {} (sm_{}{}), seed {seed}",
        gpu.name(),
        gpu.arch().0,
        gpu.arch().1
    );
    let mut rng = Rng::new(seed);
    let mut all: Vec<CheckLine> = Vec::new();
    let mut errors = 0;
    for check in checks.iter().filter(|c| selected(&args.op, c.op)) {
        let t0 = std::time::Instant::now();
        match (check.run)(&gpu, &mut rng) {
            Ok(lines) => {
                for l in &lines {
                    println!(
                        "{:<28} {:<52} {:<8} {:<5} rel_err {:>10.3e} (tol {:.0e})  {}",
                        l.op,
                        l.case,
                        l.output,
                        l.dtype.to_string(),
                        l.rel_err,
                        l.tol,
                        if l.pass { "PASS" } else { "FAIL" }
                    );
                }
                all.extend(lines);
            }
            Err(e) => {
                errors += 1;
                println!("{:<28} ERROR: {e}", check.op);
            }
        }
        eprintln!("  [{} took {:.1} s]", check.op, t0.elapsed().as_secs_f64());
    }
    let failed = all.iter().filter(|l| !l.pass).count() + errors;
    let passed = all.iter().filter(|l| l.pass).count();
    if let Some(path) = &args.json {
        write_json(
            path,
            &serde_json::json!({ "gpu": gpu.name(), "seed": seed, "lines": all }),
        )?;
    }
    println!("{passed} passed, {failed} failed");
    Ok(if failed == 0 { 0 } else { 1 })
}

/// Write JSON to a temporary name, then rename: never a half-written file.
pub fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(value)?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    Ok(())
}

/// The two ceilings, measured: device copy bandwidth (bytes read + written) and the bf16
/// GEMM rate at 8192^3 through cuBLAS.
fn measure_ceilings(gpu: &Arc<Gpu>) -> Result<(f64, f64)> {
    let dev = Device::Cuda(gpu.clone());
    let bytes = 1usize << 31;
    let src = Tensor::zeros(&[bytes / 4], DType::F32, &dev)?;
    let dst = Tensor::zeros(&[bytes / 4], DType::F32, &dev)?;
    let (s, d) = (src.cuda_buffer().unwrap(), dst.cuda_buffer().unwrap());
    let t = gpu.time(3, 20, || gpu.copy_dtod(s, d, bytes))?;
    let copy_gbps = 2.0 * bytes as f64 / (t.median_ms / 1e3) / 1e9;
    drop((src, dst));
    let n = 8192;
    let mut rng = Rng::new(3);
    let a =
        Tensor::from_f32_as(&[n, n], rng.normal_vec(n * n, 1.0), DType::BF16)?.to_device(&dev)?;
    let b =
        Tensor::from_f32_as(&[n, n], rng.normal_vec(n * n, 1.0), DType::BF16)?.to_device(&dev)?;
    let c = Tensor::uninit_cuda(gpu, &[n, n], DType::BF16)?;
    let op = |t: &Tensor| Operand {
        ptr: t.cuda_buffer().unwrap().ptr(),
        dtype: DType::BF16,
        ld: n,
        trans: false,
        batch_stride: 0,
    };
    let spec = GemmSpec {
        m: n,
        n,
        k: n,
        a: op(&a),
        b: op(&b),
        c: op(&c),
        alpha: 1.0,
        beta: 0.0,
        batch: 1,
    };
    let t = gpu.time(3, 10, || gpu.gemm(&spec))?;
    let tflops = 2.0 * (n as f64).powi(3) / (t.median_ms / 1e3) / 1e12;
    Ok((copy_gbps, tflops))
}

pub fn bench_kernels(args: BenchKernelsArgs) -> Result<i32> {
    let benches = all_benches();
    let names: Vec<&str> = benches.iter().map(|b| b.op).collect();
    check_filter(&args.op, &names)?;
    let gpu = open_gpu()?;
    let (copy_gbps, gemm_tflops) =
        measure_ceilings(&gpu).context("measuring the device ceilings")?;
    eprintln!(
        "{}: copy {copy_gbps:.0} GB/s (H100 reference {H100_COPY_GBPS:.0}), bf16 GEMM {gemm_tflops:.0} TFLOP/s (reference {H100_BF16_TFLOPS:.0})",
        gpu.name()
    );
    let cfg = BenchConfig {
        warmup: args.warmup,
        runs: args.runs,
        copy_gbps,
        gemm_tflops,
    };
    let mut rows: Vec<BenchRow> = Vec::new();
    let mut failed = 0;
    for b in benches.iter().filter(|b| selected(&args.op, b.op)) {
        match (b.run)(&gpu, &cfg) {
            Ok(r) => rows.extend(r),
            Err(e) => {
                failed += 1;
                eprintln!("{}: ERROR: {e}", b.op);
            }
        }
    }
    if let Some(path) = &args.json {
        write_json(
            path,
            &serde_json::json!({ "gpu": gpu.name(), "copy_gbps": copy_gbps, "gemm_tflops": gemm_tflops, "rows": rows }),
        )?;
    }
    println!(
        "{:<28} {:<8} {:<34} {:>9} {:>11} {:>9} {:>9} {:>7}",
        "op", "variant", "shape", "ms", "extra MiB", "GB/s", "TFLOP/s", "of ceil"
    );
    for r in &rows {
        println!(
            "{:<28} {:<8} {:<34} {:>9.3} {:>11.1} {:>9.0} {:>9.1} {:>6.0}%",
            r.op,
            r.variant,
            r.shape,
            r.median_ms,
            r.peak_extra_mib,
            r.gbps,
            r.tflops,
            100.0 * r.frac_of_ceiling
        );
    }
    Ok(if failed == 0 { 0 } else { 1 })
}
