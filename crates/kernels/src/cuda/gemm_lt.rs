//! GEMMs through cuBLASLt, opt-in: `TIGON_GEMM=lt` takes cuBLASLt's first heuristic choice,
//! `TIGON_GEMM=lt-tuned` times its first [`CANDIDATES`] choices once per GEMM shape and
//! keeps the fastest (`tigon bench kernels --op gemm` compares the three). The default
//! stays `cublasGemmEx` until the H100 shows a gain at the shapes a step runs.
//!
//! The row-major to column-major mapping is [`super::gemm`]'s: `C^T = op(B)^T op(A)^T`, so
//! cuBLASLt's A is our B and its B our A. Each distinct GEMM (sizes, transposes, leading
//! dimensions, dtypes, whether beta is zero, pointer alignments) gets a plan: descriptors
//! and the chosen algorithm, made at its first call and kept. Tuning writes into a scratch
//! output, so the real output (which beta may read) is written once, by the chosen
//! algorithm. A GEMM cuBLASLt cannot run is left to `cublasGemmEx`.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::Mutex;

use cudarc::cublaslt::sys;
use cudarc::driver::result as drv;

use super::gemm::GemmSpec;
use super::{DriverContext, Gpu};
use crate::error::{KernelError, Result};
use crate::DType;

/// Heuristic choices timed per GEMM shape in tuned mode.
pub const CANDIDATES: usize = 8;
const WORKSPACE_BYTES: usize = 32 << 20;

/// Which library runs the GEMMs of a GPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GemmMode {
    /// `cublasGemmEx` (the default).
    Cublas,
    /// cuBLASLt, its first heuristic choice.
    Lt,
    /// cuBLASLt, the fastest of its first [`CANDIDATES`] choices, timed at first use.
    LtTuned,
}

impl GemmMode {
    /// From `TIGON_GEMM` (`cublas`, `lt`, `lt-tuned`); unset or unknown: cuBLAS.
    pub fn from_env() -> GemmMode {
        match std::env::var("TIGON_GEMM").as_deref() {
            Ok("lt") => GemmMode::Lt,
            Ok("lt-tuned") => GemmMode::LtTuned,
            _ => GemmMode::Cublas,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            GemmMode::Cublas => "cublas",
            GemmMode::Lt => "lt",
            GemmMode::LtTuned => "lt-tuned",
        }
    }

    pub(crate) fn code(self) -> u8 {
        self as u8
    }

    pub(crate) fn from_code(c: u8) -> GemmMode {
        match c {
            1 => GemmMode::Lt,
            2 => GemmMode::LtTuned,
            _ => GemmMode::Cublas,
        }
    }
}

/// Everything that makes two GEMM calls the same problem for cuBLASLt.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
struct Key {
    m: usize,
    n: usize,
    k: usize,
    ta: bool,
    tb: bool,
    lds: [usize; 3],
    dtypes: [u8; 3],
    beta_zero: bool,
    /// Alignment in bytes (a power of two up to 256) of A, B and C.
    align: [u32; 3],
    tuned: bool,
}

impl Key {
    fn of(s: &GemmSpec, tuned: bool) -> Key {
        let code = |d: DType| d as u8;
        Key {
            m: s.m,
            n: s.n,
            k: s.k,
            ta: s.a.trans,
            tb: s.b.trans,
            lds: [s.a.ld, s.b.ld, s.c.ld],
            dtypes: [code(s.a.dtype), code(s.b.dtype), code(s.c.dtype)],
            beta_zero: s.beta == 0.0,
            align: [alignment(s.a.ptr), alignment(s.b.ptr), alignment(s.c.ptr)],
            tuned,
        }
    }
}

/// One of cuBLASLt's algorithms for one GEMM problem, with its descriptors
/// ([`Gpu::lt_choices`], [`Gpu::gemm_with`]).
pub struct LtChoice {
    key: Key,
    plan: Plan,
}

// SAFETY: the descriptors are plain host structures, used on the GPU's one stream.
unsafe impl Send for LtChoice {}
unsafe impl Sync for LtChoice {}

/// A GEMM problem's descriptors and algorithm; None: cuBLASLt has none, use cublasGemmEx.
struct Plan {
    desc: sys::cublasLtMatmulDesc_t,
    layouts: [sys::cublasLtMatrixLayout_t; 3],
    algo: sys::cublasLtMatmulAlgo_t,
}

impl Drop for Plan {
    fn drop(&mut self) {
        unsafe {
            let _ = sys::cublasLtMatmulDescDestroy(self.desc);
            for l in self.layouts {
                let _ = sys::cublasLtMatrixLayoutDestroy(l);
            }
        }
    }
}

pub(crate) struct Lt {
    handle: sys::cublasLtHandle_t,
    workspace: u64,
    plans: Mutex<HashMap<Key, Option<Plan>>>,
}

// SAFETY: as for `Gpu`: the handle and descriptors are used on the GPU's one stream, under
// the plan map's lock while plans are made.
unsafe impl Send for Lt {}
unsafe impl Sync for Lt {}

impl Drop for Lt {
    fn drop(&mut self) {
        self.plans.lock().map(|mut p| p.clear()).ok();
        unsafe {
            let _ = sys::cublasLtDestroy(self.handle);
            let _ = drv::free_sync(self.workspace);
        }
    }
}

fn lt_err(call: &'static str, status: sys::cublasStatus_t) -> KernelError {
    KernelError::Cublas {
        call,
        detail: format!("{status:?}"),
    }
}

fn check(call: &'static str, status: sys::cublasStatus_t) -> Result<()> {
    match status {
        sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS => Ok(()),
        s => Err(lt_err(call, s)),
    }
}

fn lt_type(d: DType) -> Result<sys::cudaDataType> {
    match d {
        DType::F32 => Ok(sys::cudaDataType::CUDA_R_32F),
        DType::BF16 => Ok(sys::cudaDataType::CUDA_R_16BF),
        DType::I32 => Err(KernelError::invalid(
            "gemm",
            "i32 operands are not supported",
        )),
    }
}

/// The largest power of two up to 256 dividing `ptr` (bytes).
fn alignment(ptr: u64) -> u32 {
    1u32 << (ptr | 256).trailing_zeros()
}

fn set_desc<T>(
    desc: sys::cublasLtMatmulDesc_t,
    attr: sys::cublasLtMatmulDescAttributes_t,
    v: &T,
) -> Result<()> {
    check("cublasLtMatmulDescSetAttribute", unsafe {
        sys::cublasLtMatmulDescSetAttribute(
            desc,
            attr,
            v as *const T as *const c_void,
            std::mem::size_of::<T>(),
        )
    })
}

fn set_pref<T>(
    pref: sys::cublasLtMatmulPreference_t,
    attr: sys::cublasLtMatmulPreferenceAttributes_t,
    v: &T,
) -> Result<()> {
    check("cublasLtMatmulPreferenceSetAttribute", unsafe {
        sys::cublasLtMatmulPreferenceSetAttribute(
            pref,
            attr,
            v as *const T as *const c_void,
            std::mem::size_of::<T>(),
        )
    })
}

/// A column-major layout of `rows x cols` with leading dimension `ld`.
fn layout(d: DType, rows: usize, cols: usize, ld: usize) -> Result<sys::cublasLtMatrixLayout_t> {
    let mut l = std::ptr::null_mut();
    check("cublasLtMatrixLayoutCreate", unsafe {
        sys::cublasLtMatrixLayoutCreate(&mut l, lt_type(d)?, rows as u64, cols as u64, ld as i64)
    })?;
    Ok(l)
}

impl Lt {
    pub(crate) fn new() -> Result<Lt> {
        super::libs::ensure_cublas()?;
        if !unsafe { sys::is_culib_present() } {
            return Err(KernelError::Cublas {
                call: "cublasLtCreate",
                detail: "libcublasLt not found".into(),
            });
        }
        let mut handle = std::ptr::null_mut();
        check("cublasLtCreate", unsafe {
            sys::cublasLtCreate(&mut handle)
        })?;
        let workspace =
            unsafe { drv::malloc_sync(WORKSPACE_BYTES) }.call("cuMemAlloc (cuBLASLt workspace)")?;
        Ok(Lt {
            handle,
            workspace,
            plans: Mutex::new(HashMap::new()),
        })
    }

    /// The descriptors of `s` (cuBLASLt's A is our B, see the module docs) without an
    /// algorithm yet.
    fn describe(s: &GemmSpec) -> Result<Plan> {
        let mut desc = std::ptr::null_mut();
        check("cublasLtMatmulDescCreate", unsafe {
            sys::cublasLtMatmulDescCreate(
                &mut desc,
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                sys::cudaDataType::CUDA_R_32F,
            )
        })?;
        // From here the plan owns what it holds, so an error below frees it.
        let mut plan = Plan {
            desc,
            layouts: [std::ptr::null_mut(); 3],
            algo: sys::cublasLtMatmulAlgo_t { data: [0; 8] },
        };
        // cublasOperation_t: 0 = N, 1 = T.
        let (op_a, op_b) = (s.b.trans as i32, s.a.trans as i32);
        set_desc(
            desc,
            sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
            &op_a,
        )?;
        set_desc(
            desc,
            sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB,
            &op_b,
        )?;
        // Column-major: A (our B) is n x k, or k x n when transposed; B (our A) is k x m, or
        // m x k; C is n x m.
        let (ar, ac) = if s.b.trans { (s.k, s.n) } else { (s.n, s.k) };
        let (br, bc) = if s.a.trans { (s.m, s.k) } else { (s.k, s.m) };
        plan.layouts[0] = layout(s.b.dtype, ar, ac, s.b.ld)?;
        plan.layouts[1] = layout(s.a.dtype, br, bc, s.a.ld)?;
        plan.layouts[2] = layout(s.c.dtype, s.n, s.m, s.c.ld)?;
        Ok(plan)
    }

    /// Up to `count` algorithms for `plan`, cuBLASLt's order, for operands aligned as `key`.
    fn candidates(
        &self,
        plan: &Plan,
        key: &Key,
        count: usize,
    ) -> Result<Vec<sys::cublasLtMatmulAlgo_t>> {
        let mut pref = std::ptr::null_mut();
        check("cublasLtMatmulPreferenceCreate", unsafe {
            sys::cublasLtMatmulPreferenceCreate(&mut pref)
        })?;
        let result = (|| {
            use sys::cublasLtMatmulPreferenceAttributes_t as P;
            set_pref(
                pref,
                P::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &(WORKSPACE_BYTES as u64),
            )?;
            // cuBLASLt's A is our B.
            let [a, b, c] = key.align;
            set_pref(pref, P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &b)?;
            set_pref(pref, P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &a)?;
            set_pref(pref, P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &c)?;
            set_pref(pref, P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &c)?;
            let mut results: Vec<sys::cublasLtMatmulHeuristicResult_t> = Vec::with_capacity(count);
            let mut found = 0i32;
            check("cublasLtMatmulAlgoGetHeuristic", unsafe {
                let r = sys::cublasLtMatmulAlgoGetHeuristic(
                    self.handle,
                    plan.desc,
                    plan.layouts[0],
                    plan.layouts[1],
                    plan.layouts[2],
                    plan.layouts[2],
                    pref,
                    count as i32,
                    results.as_mut_ptr(),
                    &mut found,
                );
                results.set_len(found.clamp(0, count as i32) as usize);
                r
            })?;
            Ok(results
                .iter()
                .filter(|r| r.state == sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS)
                .filter(|r| r.workspaceSize <= WORKSPACE_BYTES)
                .map(|r| r.algo)
                .collect())
        })();
        unsafe {
            let _ = sys::cublasLtMatmulPreferenceDestroy(pref);
        }
        result
    }

    /// One cuBLASLt call of `s` with `algo`, its output to `d` (s.c's layout).
    fn launch(
        &self,
        gpu: &Gpu,
        plan: &Plan,
        algo: &sys::cublasLtMatmulAlgo_t,
        s: &GemmSpec,
        d: u64,
    ) -> Result<()> {
        let (alpha, beta) = (s.alpha, s.beta);
        check("cublasLtMatmul", unsafe {
            sys::cublasLtMatmul(
                self.handle,
                plan.desc,
                &alpha as *const f32 as *const c_void,
                s.b.ptr as *const c_void,
                plan.layouts[0],
                s.a.ptr as *const c_void,
                plan.layouts[1],
                &beta as *const f32 as *const c_void,
                s.c.ptr as *const c_void,
                plan.layouts[2],
                d as *mut c_void,
                plan.layouts[2],
                algo,
                self.workspace as *mut c_void,
                WORKSPACE_BYTES,
                gpu.cu_stream() as sys::cudaStream_t,
            )
        })
    }

    /// The fastest of `algos` for `s`, each run into a scratch output (two untimed runs,
    /// then the median of five between events).
    fn fastest(
        &self,
        gpu: &Gpu,
        plan: &Plan,
        algos: &[sys::cublasLtMatmulAlgo_t],
        s: &GemmSpec,
    ) -> Result<Option<sys::cublasLtMatmulAlgo_t>> {
        let c_bytes = (s.m.saturating_sub(1) * s.c.ld + s.n) * s.c.dtype.size_in_bytes();
        let scratch = unsafe { drv::malloc_sync(c_bytes.max(256)) }.call("cuMemAlloc (tuning)")?;
        let mut best: Option<(f64, sys::cublasLtMatmulAlgo_t)> = None;
        let result = (|| {
            for algo in algos {
                let run = || self.launch(gpu, plan, algo, s, scratch);
                if run().and_then(|_| run()).is_err() {
                    continue; // this algorithm cannot run the problem after all
                }
                let mut times = Vec::with_capacity(5);
                for _ in 0..5 {
                    let start = gpu.mark()?;
                    run()?;
                    times.push(gpu.mark()?.ms_since(&start)?);
                }
                times.sort_by(|a, b| a.total_cmp(b));
                if best.is_none_or(|(t, _)| times[2] < t) {
                    best = Some((times[2], *algo));
                }
            }
            Ok(())
        })();
        gpu.synchronize()?;
        unsafe {
            let _ = drv::free_sync(scratch);
        }
        result.map(|_| best.map(|(_, a)| a))
    }

    /// Run `s` through cuBLASLt in `mode`; false when cuBLASLt has no algorithm for it (the
    /// caller runs cublasGemmEx).
    pub(crate) fn gemm(&self, gpu: &Gpu, s: &GemmSpec, mode: GemmMode) -> Result<bool> {
        let key = Key::of(s, mode == GemmMode::LtTuned);
        let mut plans = self
            .plans
            .lock()
            .map_err(|_| KernelError::invalid("gemm", "cuBLASLt plan cache poisoned"))?;
        let plan = plans.entry(key).or_insert_with(|| {
            let made = (|| -> Result<Option<Plan>> {
                let mut plan = Lt::describe(s)?;
                let count = if key.tuned { CANDIDATES } else { 1 };
                let algos = self.candidates(&plan, &key, count)?;
                let chosen = if key.tuned {
                    self.fastest(gpu, &plan, &algos, s)?
                } else {
                    algos.first().copied()
                };
                Ok(chosen.map(|algo| {
                    plan.algo = algo;
                    plan
                }))
            })();
            // A problem cuBLASLt rejects (no algorithm, an unsupported layout) goes to
            // cublasGemmEx, remembered so that it is not asked again.
            made.unwrap_or(None)
        });
        match plan {
            Some(plan) => {
                self.launch(gpu, plan, &plan.algo, s, s.c.ptr)?;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// cuBLASLt's first `count` algorithms for `s`, each with its own descriptors, for a
    /// caller that times them in its own setting (a GEMM inside a loop that holds the GPU at
    /// its power limit can rank them differently than one GEMM alone).
    pub(crate) fn choices(&self, s: &GemmSpec, count: usize) -> Result<Vec<LtChoice>> {
        let key = Key::of(s, true);
        let plan = Lt::describe(s)?;
        let algos = self.candidates(&plan, &key, count)?;
        drop(plan);
        algos
            .into_iter()
            .map(|algo| {
                let mut plan = Lt::describe(s)?;
                plan.algo = algo;
                Ok(LtChoice { key, plan })
            })
            .collect()
    }

    /// Run `s` with a choice made for the same problem.
    pub(crate) fn gemm_with(&self, gpu: &Gpu, s: &GemmSpec, c: &LtChoice) -> Result<()> {
        if Key::of(s, true) != c.key {
            return Err(KernelError::invalid(
                "gemm",
                format!("a cuBLASLt choice made for another problem: {s:?}"),
            ));
        }
        self.launch(gpu, &c.plan, &c.plan.algo, s, s.c.ptr)
    }

    /// How many GEMM problems have a cuBLASLt plan, and how many went to cublasGemmEx.
    pub(crate) fn plan_counts(&self) -> (usize, usize) {
        self.plans
            .lock()
            .map(|p| {
                let lt = p.values().filter(|v| v.is_some()).count();
                (lt, p.len() - lt)
            })
            .unwrap_or((0, 0))
    }
}
