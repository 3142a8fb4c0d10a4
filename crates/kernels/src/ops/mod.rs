//! The ops. One file per op: its CUDA launcher, its CPU reference, its GPU check, its
//! benchmark and its tests. Nothing here knows about models.

pub mod activation_mul;
pub mod adamw;
pub mod attention;
pub mod cross_entropy;
pub mod dropout;
pub mod eager;
pub mod elementwise;
pub mod embedding;
pub mod fused_linear_cross_entropy;
pub mod index_rows;
pub mod layer_norm;
pub mod lora_group;
pub mod lora_group_split;
pub mod lora_linear;
pub mod lora_split;
pub mod matmul;
pub mod rms_norm;
pub mod rope;

use std::sync::Arc;

use crate::bench::KernelBench;
use crate::check::GpuCheck;
use crate::cuda::{Gpu, KernelSource};
use crate::error::{KernelError, Result};
use crate::{DType, Tensor};

/// Every CUDA source in the repository (CI compiles each for sm_90).
pub const ALL_SOURCES: &[KernelSource] = &[
    eager::SOURCE,
    rms_norm::SOURCE,
    activation_mul::SOURCE,
    layer_norm::SOURCE,
    elementwise::SOURCE,
    embedding::SOURCE,
    rope::SOURCE,
    cross_entropy::SOURCE,
    lora_linear::SOURCE,
    adamw::SOURCE,
    attention::SOURCE,
    dropout::SOURCE,
    lora_split::SOURCE,
    index_rows::SOURCE,
];

/// The GPU checks, in the order `tigon gpu-check` runs them.
pub fn all_checks() -> Vec<GpuCheck> {
    vec![
        matmul::CHECK,
        rms_norm::CHECK,
        activation_mul::CHECK,
        layer_norm::CHECK,
        elementwise::CHECK,
        embedding::CHECK,
        rope::CHECK,
        cross_entropy::CHECK,
        index_rows::CHECK,
        fused_linear_cross_entropy::CHECK,
        lora_linear::CHECK,
        lora_linear::MERGE_CHECK,
        lora_group::CHECK,
        lora_group_split::CHECK,
        adamw::CHECK,
        attention::CHECK,
        dropout::CHECK,
        lora_split::CHECK,
        matmul::LT_CHECK,
    ]
}

/// The kernel benchmarks, in the order `tigon bench kernels` runs them.
pub fn all_benches() -> Vec<KernelBench> {
    vec![
        matmul::BENCH,
        rms_norm::BENCH,
        activation_mul::BENCH,
        layer_norm::BENCH,
        embedding::BENCH,
        rope::BENCH,
        cross_entropy::BENCH,
        fused_linear_cross_entropy::BENCH,
        lora_linear::BENCH,
        lora_group::BENCH,
        lora_group_split::BENCH,
        adamw::BENCH,
        attention::BENCH,
    ]
}

pub(crate) fn expect_dtype(
    op: &'static str,
    tensor: &'static str,
    t: &Tensor,
    allowed: &[DType],
) -> Result<()> {
    if allowed.contains(&t.dtype()) {
        return Ok(());
    }
    Err(KernelError::DType {
        op,
        tensor,
        expected: allowed
            .iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join(" or "),
        found: t.dtype(),
    })
}

pub(crate) fn expect_shape(
    op: &'static str,
    tensor: &'static str,
    t: &Tensor,
    shape: &[usize],
) -> Result<()> {
    if t.shape() == shape {
        return Ok(());
    }
    Err(KernelError::shape(
        op,
        format!("`{tensor}` has shape {:?}, expected {shape:?}", t.shape()),
    ))
}

/// All tensors on the CPU (None) or all on one GPU (Some); a mix is an error.
pub(crate) fn common_gpu(
    op: &'static str,
    tensors: &[(&'static str, &Tensor)],
) -> Result<Option<Arc<Gpu>>> {
    let mut gpu: Option<&Arc<Gpu>> = None;
    let mut cpu: Option<&str> = None;
    for (name, t) in tensors {
        match t.gpu() {
            Some(g) => {
                if let Some(prev) = gpu {
                    if !Arc::ptr_eq(prev, g) {
                        return Err(KernelError::Device {
                            op,
                            detail: format!("`{name}` is on another GPU"),
                        });
                    }
                }
                gpu = Some(g);
            }
            None => cpu = Some(name),
        }
        if let (Some(_), Some(c)) = (gpu, cpu) {
            return Err(KernelError::Device {
                op,
                detail: format!("`{c}` is on the CPU, `{name}` or another input on a GPU"),
            });
        }
    }
    Ok(gpu.cloned())
}

/// Grid size for a grid-stride loop over `rows` rows: enough blocks to fill the GPU a few
/// times over, never more than there are rows.
pub(crate) fn row_grid(gpu: &Gpu, rows: usize, blocks_per_sm: usize) -> u32 {
    rows.min(gpu.sm_count() * blocks_per_sm).max(1) as u32
}
