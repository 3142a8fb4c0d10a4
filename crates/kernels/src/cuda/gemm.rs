//! GEMMs through cuBLAS: bf16 or f32 operands, fp32 accumulation, row-major semantics.
//!
//! cuBLAS is column-major. A row-major matrix is the column-major view of its transpose, so
//! row-major `C = op(A) op(B)` is issued as column-major `C^T = op(B)^T op(A)^T`: swap the
//! operands and keep each one's transpose flag. Nothing is copied or transposed in memory.

use std::ffi::c_void;

use cudarc::cublas::{result as blas, sys};

use super::{libs, Gpu};
use crate::error::{KernelError, Result};
use crate::DType;

pub(crate) struct Blas {
    handle: sys::cublasHandle_t,
}

impl Blas {
    pub(crate) fn new(stream: cudarc::driver::sys::CUstream) -> Result<Blas> {
        libs::ensure_cublas()?;
        let handle = blas::create_handle().map_err(|e| KernelError::Cublas {
            call: "cublasCreate",
            detail: format!("{e:?}"),
        })?;
        unsafe { blas::set_stream(handle, stream as sys::cudaStream_t) }.map_err(|e| {
            KernelError::Cublas {
                call: "cublasSetStream",
                detail: format!("{e:?}"),
            }
        })?;
        Ok(Blas { handle })
    }
}

impl Drop for Blas {
    fn drop(&mut self) {
        unsafe {
            let _ = blas::destroy_handle(self.handle);
        }
    }
}

fn data_type(d: DType) -> Result<sys::cudaDataType> {
    match d {
        DType::F32 => Ok(sys::cudaDataType::CUDA_R_32F),
        DType::BF16 => Ok(sys::cudaDataType::CUDA_R_16BF),
        DType::I32 => Err(KernelError::invalid(
            "gemm",
            "i32 operands are not supported",
        )),
    }
}

/// One operand of a row-major GEMM: a device address, its dtype, its row-major leading
/// dimension (elements between consecutive rows as stored), whether it enters transposed,
/// and its stride between batch entries (elements; 0 for a single GEMM).
#[derive(Clone, Copy, Debug)]
pub struct Operand {
    pub ptr: u64,
    pub dtype: DType,
    pub ld: usize,
    pub trans: bool,
    pub batch_stride: usize,
}

/// Row-major `C[m,n] = alpha * op(A)[m,k] op(B)[k,n] + beta * C`, `batch` times.
#[derive(Clone, Copy, Debug)]
pub struct GemmSpec {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub a: Operand,
    pub b: Operand,
    pub c: Operand,
    pub alpha: f32,
    pub beta: f32,
    pub batch: usize,
}

impl GemmSpec {
    /// Whether there is anything to compute (an empty output is not an error), or an error
    /// when a dimension exceeds what cuBLAS takes.
    pub(crate) fn has_work(&self) -> Result<bool> {
        if self.m == 0 || self.n == 0 {
            return Ok(false);
        }
        let too_big = |x: usize| x > i32::MAX as usize;
        if [
            self.m, self.n, self.k, self.a.ld, self.b.ld, self.c.ld, self.batch,
        ]
        .iter()
        .any(|&x| too_big(x))
        {
            return Err(KernelError::invalid(
                "gemm",
                format!("dimensions exceed cuBLAS's 32-bit limit: {self:?}"),
            ));
        }
        Ok(true)
    }
}

fn op(trans: bool) -> sys::cublasOperation_t {
    if trans {
        sys::cublasOperation_t::CUBLAS_OP_T
    } else {
        sys::cublasOperation_t::CUBLAS_OP_N
    }
}

impl Gpu {
    /// Issue one (strided-batched) GEMM on the stream.
    pub fn gemm(&self, s: &GemmSpec) -> Result<()> {
        if !s.has_work()? {
            return Ok(());
        }
        let _t = self.host_time(super::HostCall::Gemm);
        let mode = self.gemm_mode();
        if s.batch <= 1
            && mode != super::gemm_lt::GemmMode::Cublas
            && self.lt()?.gemm(self, s, mode)?
        {
            return Ok(());
        }
        let (alpha, beta) = (s.alpha, s.beta);
        let h = self.blas().handle;
        let status = unsafe {
            if s.batch <= 1 {
                blas::gemm_ex(
                    h,
                    op(s.b.trans),
                    op(s.a.trans),
                    s.n as i32,
                    s.m as i32,
                    s.k as i32,
                    &alpha as *const f32 as *const c_void,
                    s.b.ptr as *const c_void,
                    data_type(s.b.dtype)?,
                    s.b.ld as i32,
                    s.a.ptr as *const c_void,
                    data_type(s.a.dtype)?,
                    s.a.ld as i32,
                    &beta as *const f32 as *const c_void,
                    s.c.ptr as *mut c_void,
                    data_type(s.c.dtype)?,
                    s.c.ld as i32,
                    sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                )
            } else {
                blas::gemm_strided_batched_ex(
                    h,
                    op(s.b.trans),
                    op(s.a.trans),
                    s.n as i32,
                    s.m as i32,
                    s.k as i32,
                    &alpha as *const f32 as *const c_void,
                    s.b.ptr as *const c_void,
                    data_type(s.b.dtype)?,
                    s.b.ld as i32,
                    s.b.batch_stride as i64,
                    s.a.ptr as *const c_void,
                    data_type(s.a.dtype)?,
                    s.a.ld as i32,
                    s.a.batch_stride as i64,
                    &beta as *const f32 as *const c_void,
                    s.c.ptr as *mut c_void,
                    data_type(s.c.dtype)?,
                    s.c.ld as i32,
                    s.c.batch_stride as i64,
                    s.batch as i32,
                    sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                )
            }
        };
        status.map_err(|e| KernelError::Cublas {
            call: if s.batch <= 1 {
                "cublasGemmEx"
            } else {
                "cublasGemmStridedBatchedEx"
            },
            detail: format!("{e:?} for {s:?}"),
        })
    }
}
