//! `tigon bench kernels`: each fused op against the unfused composition of simple kernels
//! (ops/eager.rs), same inputs, same binary. Time is the median over CUDA-event-timed runs
//! after warm-up; memory is the peak of live device bytes above what the inputs hold.

use std::sync::Arc;

use crate::cuda::Gpu;
use crate::error::Result;

/// H100 SXM ceilings used when nothing was measured: the copy bandwidth (bytes read plus
/// written) and the dense bf16 GEMM rate seen on the H100 we benchmark on.
pub const H100_COPY_GBPS: f64 = 3000.0;
pub const H100_BF16_TFLOPS: f64 = 790.0;

#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchRow {
    pub op: String,
    pub variant: String,
    pub shape: String,
    pub median_ms: f64,
    /// Peak live device memory above the inputs, during one forward + backward.
    pub peak_extra_mib: f64,
    /// The fewest bytes the op must move (each input read once, each output written once).
    pub floor_bytes: f64,
    /// FLOPs for the GEMM-bound ops, 0 for memory-bound ones.
    pub flops: f64,
    pub gbps: f64,
    pub tflops: f64,
    /// Achieved fraction of the relevant ceiling (copy bandwidth, or GEMM rate).
    pub frac_of_ceiling: f64,
}

pub struct BenchConfig {
    pub warmup: usize,
    pub runs: usize,
    /// Measured device copy bandwidth in GB/s (read + write), the memory-bound ceiling.
    pub copy_gbps: f64,
    pub gemm_tflops: f64,
}

/// Time `f` and record its peak memory above what is live now. `f` runs the whole
/// forward + backward and drops its temporaries before returning.
#[allow(clippy::too_many_arguments)]
pub fn measure<F: FnMut() -> Result<()>>(
    gpu: &Arc<Gpu>,
    cfg: &BenchConfig,
    op: &str,
    variant: &str,
    shape: &str,
    floor_bytes: f64,
    flops: f64,
    mut f: F,
) -> Result<BenchRow> {
    gpu.synchronize()?;
    let base = gpu.live_bytes();
    gpu.reset_peak();
    f()?;
    gpu.synchronize()?;
    let peak_extra = gpu.peak_bytes().saturating_sub(base);
    let t = gpu.time(cfg.warmup, cfg.runs, &mut f)?;
    let mut row = BenchRow::timed(cfg, op, variant, shape, t.median_ms, floor_bytes, flops);
    row.peak_extra_mib = peak_extra as f64 / 1048576.0;
    Ok(row)
}

impl BenchRow {
    /// A row for `median_ms` of device time (timed by the caller), its rates against
    /// `cfg`'s ceilings; no peak memory.
    pub fn timed(
        cfg: &BenchConfig,
        op: &str,
        variant: &str,
        shape: &str,
        median_ms: f64,
        floor_bytes: f64,
        flops: f64,
    ) -> BenchRow {
        let secs = median_ms / 1e3;
        let gbps = floor_bytes / secs / 1e9;
        let tflops = flops / secs / 1e12;
        BenchRow {
            op: op.into(),
            variant: variant.into(),
            shape: shape.into(),
            median_ms,
            peak_extra_mib: 0.0,
            floor_bytes,
            flops,
            gbps,
            tflops,
            frac_of_ceiling: if flops > 0.0 {
                tflops / cfg.gemm_tflops
            } else {
                gbps / cfg.copy_gbps
            },
        }
    }
}

/// One op's benchmark: returns its fused row and its unfused row (and any variants).
pub struct KernelBench {
    pub op: &'static str,
    pub run: fn(&Arc<Gpu>, &BenchConfig) -> Result<Vec<BenchRow>>,
}
