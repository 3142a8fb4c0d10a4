//! The CUDA device layer: one context, one stream, a stream-ordered memory pool, a cuBLAS
//! handle and a cache of NVRTC-compiled modules.
//!
//! Everything runs on a single stream, so ordering between kernels, copies, allocations and
//! frees is the stream order and nothing else needs synchronising. The one exception is
//! [`transfer`]: host-to-device copies of offloaded data on a second stream, ordered against
//! the main one by events (allocations and frees stay on the main stream). All CUDA libraries are
//! loaded at run time (cudarc's dynamic loading): a machine without a driver builds and runs
//! the CPU path and gets [`KernelError::NoGpu`] when it asks for a GPU.

pub mod gemm;
pub mod gemm_lt;
pub mod libs;
pub mod nvrtc;
pub mod timing;
pub mod transfer;

use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{result as drv, sys, CudaContext, CudaStream};

use crate::error::{KernelError, Result};

/// Extends a driver result with the name of the call, for error messages.
pub(crate) trait DriverContext<T> {
    fn call(self, call: &'static str) -> Result<T>;
}

impl<T> DriverContext<T> for std::result::Result<T, cudarc::driver::DriverError> {
    fn call(self, call: &'static str) -> Result<T> {
        self.map_err(|source| KernelError::Driver { call, source })
    }
}

/// A CUDA source file of the repository: its name (for errors and the cache) and text.
#[derive(Clone, Copy, Debug)]
pub struct KernelSource {
    pub name: &'static str,
    pub src: &'static str,
}

/// The shared prelude every kernel source is compiled with: bf16 conversions and reductions.
pub const PRELUDE: &str = include_str!("../../kernels/common.cuh");

struct LoadedModule {
    module: sys::CUmodule,
    functions: HashMap<String, sys::CUfunction>,
}

/// A compiled kernel entry point, ready to launch.
#[derive(Clone, Copy)]
pub struct Function(sys::CUfunction);

/// One GPU: context, stream, pool accounting, cuBLAS and the module cache.
pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: gemm::Blas,
    name: String,
    arch: (i32, i32),
    sm_count: usize,
    total_mem: usize,
    modules: Mutex<HashMap<&'static str, LoadedModule>>,
    live_bytes: AtomicUsize,
    peak_bytes: AtomicUsize,
    poison: AtomicBool,
    /// [`gemm_lt::GemmMode`] as its code: which library runs the GEMMs.
    gemm_mode: AtomicU8,
    /// cuBLASLt, made at the first GEMM that asks for it (or why it could not be).
    lt: OnceLock<std::result::Result<gemm_lt::Lt, String>>,
    /// Host time in this layer's driver and library calls, by kind.
    host: HostClock,
}

// SAFETY: the raw handles (modules, functions, the cuBLAS handle) are only used on this
// GPU's one stream, and the context is bound to every thread that launches through `Gpu`.
unsafe impl Send for Gpu {}
unsafe impl Sync for Gpu {}

impl Gpu {
    /// Open GPU `ordinal`. Fails with [`KernelError::NoGpu`] when there is no driver or no
    /// such device, naming what was missing.
    pub fn new(ordinal: usize) -> Result<Arc<Gpu>> {
        libs::ensure_driver()?;
        drv::init().call("cuInit")?;
        let count = drv::device::get_count().call("cuDeviceGetCount")?;
        if count <= 0 {
            return Err(KernelError::NoGpu(
                "the CUDA driver is installed but reports no devices".into(),
            ));
        }
        if ordinal >= count as usize {
            return Err(KernelError::NoGpu(format!(
                "asked for device {ordinal}, the driver reports {count}"
            )));
        }
        let ctx = CudaContext::new(ordinal).call("cuDevicePrimaryCtxRetain")?;
        // One stream, one order: cudarc's per-buffer event tracking only costs time here.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().call("cuStreamCreate")?;
        let name = ctx.name().call("cuDeviceGetName")?;
        let arch = ctx.compute_capability().call("cuDeviceGetAttribute")?;
        let sm_count = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .call("cuDeviceGetAttribute")? as usize;
        let total_mem = ctx.total_mem().call("cuDeviceTotalMem")?;
        // Keep freed blocks in the pool instead of returning them to the driver at every
        // synchronisation: a training step frees and re-allocates the same sizes each time.
        unsafe {
            let pool = drv::device::get_default_mem_pool(ctx.cu_device())
                .call("cuDeviceGetDefaultMemPool")?;
            let mut threshold: u64 = u64::MAX;
            drv::mem_pool::set_attribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                &mut threshold as *mut u64 as *mut c_void,
            )
            .call("cuMemPoolSetAttribute")?;
        }
        let blas = gemm::Blas::new(stream.cu_stream())?;
        Ok(Arc::new(Gpu {
            ctx,
            stream,
            blas,
            name,
            arch,
            sm_count,
            total_mem,
            modules: Mutex::new(HashMap::new()),
            live_bytes: AtomicUsize::new(0),
            peak_bytes: AtomicUsize::new(0),
            poison: AtomicBool::new(false),
            gemm_mode: AtomicU8::new(gemm_lt::GemmMode::from_env().code()),
            lt: OnceLock::new(),
            host: HostClock::default(),
        }))
    }

    pub fn ordinal(&self) -> usize {
        self.ctx.ordinal()
    }
    pub fn name(&self) -> &str {
        &self.name
    }
    /// Compute capability, e.g. (9, 0) for an H100.
    pub fn arch(&self) -> (i32, i32) {
        self.arch
    }
    pub fn sm_count(&self) -> usize {
        self.sm_count
    }
    pub fn total_mem(&self) -> usize {
        self.total_mem
    }
    pub(crate) fn cu_stream(&self) -> sys::CUstream {
        self.stream.cu_stream()
    }
    pub(crate) fn blas(&self) -> &gemm::Blas {
        &self.blas
    }

    /// Which library runs this GPU's GEMMs (`TIGON_GEMM` at start, see [`gemm_lt`]).
    pub fn gemm_mode(&self) -> gemm_lt::GemmMode {
        gemm_lt::GemmMode::from_code(self.gemm_mode.load(Ordering::Relaxed))
    }

    /// Switch the GEMM library (benchmarks and checks compare them in one process).
    pub fn set_gemm_mode(&self, mode: gemm_lt::GemmMode) {
        self.gemm_mode.store(mode.code(), Ordering::Relaxed);
    }

    /// cuBLASLt, made on first use.
    pub(crate) fn lt(&self) -> Result<&gemm_lt::Lt> {
        self.bind()?;
        self.lt
            .get_or_init(|| gemm_lt::Lt::new().map_err(|e| e.to_string()))
            .as_ref()
            .map_err(|e| KernelError::Cublas {
                call: "cublasLtCreate",
                detail: e.clone(),
            })
    }

    /// cuBLASLt's first `count` algorithms for the GEMM `s`, for a caller that times them in
    /// its own setting.
    pub fn lt_choices(&self, s: &gemm::GemmSpec, count: usize) -> Result<Vec<gemm_lt::LtChoice>> {
        self.lt()?.choices(s, count)
    }

    /// Run the GEMM `s` through cuBLASLt with `choice`, made by [`Gpu::lt_choices`] for the
    /// same problem (sizes, layouts, dtypes, alignments).
    pub fn gemm_with(&self, s: &gemm::GemmSpec, choice: &gemm_lt::LtChoice) -> Result<()> {
        if !s.has_work()? {
            return Ok(());
        }
        let _t = self.host_time(HostCall::Gemm);
        self.lt()?.gemm_with(self, s, choice)
    }

    /// GEMM problems with a cuBLASLt plan, and those cuBLASLt left to cublasGemmEx.
    pub fn lt_plan_counts(&self) -> (usize, usize) {
        match self.lt.get() {
            Some(Ok(lt)) => lt.plan_counts(),
            _ => (0, 0),
        }
    }

    fn bind(&self) -> Result<()> {
        self.ctx.bind_to_thread().call("cuCtxSetCurrent")
    }

    /// Bytes tigon holds in live device buffers now, and the most it has held since the
    /// last [`Gpu::reset_peak`]. This is what "peak device memory" means in our reports:
    /// the pool may keep more reserved for reuse.
    pub fn live_bytes(&self) -> usize {
        self.live_bytes.load(Ordering::Relaxed)
    }
    pub fn peak_bytes(&self) -> usize {
        self.peak_bytes.load(Ordering::Relaxed)
    }
    pub fn reset_peak(&self) {
        self.peak_bytes
            .store(self.live_bytes.load(Ordering::Relaxed), Ordering::Relaxed);
    }

    /// In checking mode every new buffer is filled with 0xFF bytes (NaN in f32 and bf16) so
    /// that an element a kernel forgets to write shows up as NaN in the comparison.
    pub fn set_poison(&self, on: bool) {
        self.poison.store(on, Ordering::Relaxed);
    }

    /// (free, total) bytes as the driver reports them.
    pub fn mem_info(&self) -> Result<(usize, usize)> {
        self.bind()?;
        drv::mem_get_info().call("cuMemGetInfo")
    }

    /// A stream-ordered allocation from the device's pool.
    pub fn alloc(self: &Arc<Self>, bytes: usize) -> Result<DeviceBuffer> {
        if bytes == 0 {
            return Ok(DeviceBuffer {
                ptr: 0,
                bytes: 0,
                gpu: self.clone(),
            });
        }
        self.bind()?;
        let timer = self.host.time(HostCall::Alloc);
        let ptr = match unsafe { drv::malloc_async(self.cu_stream(), bytes) } {
            Ok(p) => p,
            Err(e) if e.0 == sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY => {
                let (free, total) = self.mem_info().unwrap_or((0, self.total_mem));
                return Err(KernelError::OutOfMemory {
                    requested: bytes,
                    free,
                    total,
                    held: self.live_bytes(),
                });
            }
            Err(source) => {
                return Err(KernelError::Driver {
                    call: "cuMemAllocAsync",
                    source,
                })
            }
        };
        drop(timer);
        let live = self.live_bytes.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.peak_bytes.fetch_max(live, Ordering::Relaxed);
        let buf = DeviceBuffer {
            ptr,
            bytes,
            gpu: self.clone(),
        };
        if self.poison.load(Ordering::Relaxed) {
            unsafe { drv::memset_d8_async(ptr, 0xFF, bytes, self.cu_stream()) }
                .call("cuMemsetD8Async")?;
        }
        Ok(buf)
    }

    pub fn memset_zero(&self, buf: &DeviceBuffer) -> Result<()> {
        if buf.bytes == 0 {
            return Ok(());
        }
        self.bind()?;
        let _t = self.host.time(HostCall::MemOp);
        unsafe { drv::memset_d8_async(buf.ptr, 0, buf.bytes, self.cu_stream()) }
            .call("cuMemsetD8Async")
    }

    /// Copy host values into `buf` (synchronously: the host slice may go away after).
    pub fn upload<T: Copy>(&self, buf: &DeviceBuffer, data: &[T]) -> Result<()> {
        assert_eq!(std::mem::size_of_val(data), buf.bytes, "upload size");
        if buf.bytes == 0 {
            return Ok(());
        }
        self.bind()?;
        // A copy from pageable memory returns only when the stream has reached it.
        let _t = self.host.time(HostCall::Wait);
        unsafe {
            drv::memcpy_htod_async(buf.ptr, data, self.cu_stream()).call("cuMemcpyHtoDAsync")?;
        }
        self.wait_for_stream()
    }

    /// Copy `n` values of `buf` to the host (waits for the stream).
    pub fn download<T: Copy + Default>(&self, buf: &DeviceBuffer, n: usize) -> Result<Vec<T>> {
        let mut out = vec![T::default(); n];
        assert!(
            std::mem::size_of_val(out.as_slice()) <= buf.bytes,
            "download size"
        );
        if n == 0 {
            return Ok(out);
        }
        self.bind()?;
        let _t = self.host.time(HostCall::Wait);
        unsafe {
            drv::memcpy_dtoh_async(&mut out, buf.ptr, self.cu_stream())
                .call("cuMemcpyDtoHAsync")?;
        }
        self.wait_for_stream()?;
        Ok(out)
    }

    pub fn copy_dtod(&self, src: &DeviceBuffer, dst: &DeviceBuffer, bytes: usize) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        self.bind()?;
        let _t = self.host.time(HostCall::MemOp);
        unsafe { drv::memcpy_dtod_async(dst.ptr, src.ptr, bytes, self.cu_stream()) }
            .call("cuMemcpyDtoDAsync")
    }

    /// Copy `bytes` between raw device addresses (parts of buffers), in stream order.
    pub(crate) fn copy_dtod_raw(&self, src: u64, dst: u64, bytes: usize) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        self.bind()?;
        let _t = self.host.time(HostCall::MemOp);
        unsafe { drv::memcpy_dtod_async(dst, src, bytes, self.cu_stream()) }
            .call("cuMemcpyDtoDAsync")
    }

    /// Wait for all work on the stream; surfaces any asynchronous kernel fault.
    pub fn synchronize(&self) -> Result<()> {
        self.bind()?;
        let _t = self.host.time(HostCall::Wait);
        self.wait_for_stream()
    }

    fn wait_for_stream(&self) -> Result<()> {
        unsafe { drv::stream::synchronize(self.cu_stream()) }.call("cuStreamSynchronize")
    }

    /// Calls and host seconds by kind of call since the GPU was opened (see [`HostCall`]).
    pub fn host_calls(&self) -> Vec<(HostCall, u64, f64)> {
        HostCall::ALL
            .iter()
            .map(|&c| {
                let (n, ns) = self.host.get(c);
                (c, n, ns as f64 * 1e-9)
            })
            .collect()
    }

    /// Start timing a host call of kind `call` (ends when the guard drops).
    pub(crate) fn host_time(&self, call: HostCall) -> HostTimer<'_> {
        self.host.time(call)
    }

    /// The entry point `function` of `source`, compiling (or loading from the disk cache)
    /// the module at first use.
    pub fn function(&self, source: &KernelSource, function: &str) -> Result<Function> {
        self.bind()?;
        let _t = self.host.time(HostCall::Lookup);
        let mut modules = self.modules.lock().expect("module cache poisoned");
        if !modules.contains_key(source.name) {
            let image = nvrtc::compile_cached(source, self.arch)?;
            let module = unsafe { drv::module::load_data(image.as_ptr() as *const c_void) }
                .call("cuModuleLoadData")?;
            modules.insert(
                source.name,
                LoadedModule {
                    module,
                    functions: HashMap::new(),
                },
            );
        }
        let loaded = modules.get_mut(source.name).expect("inserted above");
        if let Some(f) = loaded.functions.get(function) {
            return Ok(Function(*f));
        }
        let cname = CString::new(function).expect("kernel names have no NUL");
        let f = unsafe { drv::module::get_function(loaded.module, cname) }
            .call("cuModuleGetFunction")?;
        loaded.functions.insert(function.to_string(), f);
        Ok(Function(f))
    }

    /// Allow `f` to use more than the default 48 KiB of dynamic shared memory.
    pub fn set_max_dynamic_shared(&self, f: Function, bytes: usize) -> Result<()> {
        let _t = self.host.time(HostCall::Lookup);
        unsafe {
            drv::function::set_function_attribute(
                f.0,
                sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                bytes as i32,
            )
        }
        .call("cuFuncSetAttribute")
    }

    /// Launch `f` on the stream. `params` holds a pointer to each kernel argument in order;
    /// use the [`launch!`](crate::launch) macro rather than building it by hand.
    ///
    /// # Safety
    /// The argument types and count must match the kernel's signature, and every device
    /// address in them must be live for the kernel's duration (stream order guarantees the
    /// latter for buffers dropped after the launch call).
    pub unsafe fn launch_raw(
        &self,
        f: Function,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        shared_bytes: u32,
        params: &mut [*mut c_void],
    ) -> Result<()> {
        self.bind()?;
        let _t = self.host.time(HostCall::Launch);
        drv::launch_kernel(f.0, grid, block, shared_bytes, self.cu_stream(), params)
            .call("cuLaunchKernel")
    }
}

impl Drop for Gpu {
    fn drop(&mut self) {
        let _ = self.bind();
        let _ = self.synchronize();
        if let Ok(modules) = self.modules.get_mut() {
            for m in modules.values() {
                unsafe {
                    let _ = drv::module::unload(m.module);
                }
            }
        }
    }
}

/// Launch a kernel: `launch!(gpu, func, grid, block, shared_bytes; a, b, c)`. Each argument
/// is evaluated once into a local so that its address stays valid through the launch call.
#[macro_export]
macro_rules! launch {
    ($gpu:expr, $f:expr, $grid:expr, $block:expr, $shared:expr; $($arg:expr),* $(,)?) => {{
        #[allow(unused_mut)]
        let mut params: Vec<*mut ::std::ffi::c_void> = Vec::new();
        $crate::launch!(@bind params; $($arg),*);
        let (gpu, f, grid, block, shared) = (&$gpu, $f, $grid, $block, $shared);
        // SAFETY: the arguments live in locals until after the launch call, and the kernel
        // signature is the op file's contract with its .cu source.
        #[allow(unused_unsafe)]
        unsafe { gpu.launch_raw(f, grid, block, shared, &mut params) }
    }};
    (@bind $params:ident; $head:expr $(, $rest:expr)*) => {
        let arg = $head;
        $params.push(&arg as *const _ as *mut ::std::ffi::c_void);
        $crate::launch!(@bind $params; $($rest),*);
    };
    (@bind $params:ident;) => {};
}

/// A device allocation from the stream-ordered pool, freed (in stream order) on drop.
pub struct DeviceBuffer {
    ptr: sys::CUdeviceptr,
    bytes: usize,
    gpu: Arc<Gpu>,
}

impl DeviceBuffer {
    pub fn ptr(&self) -> u64 {
        self.ptr
    }
    pub fn bytes(&self) -> usize {
        self.bytes
    }
    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        if self.bytes == 0 {
            return;
        }
        let _ = self.gpu.bind();
        let _t = self.gpu.host.time(HostCall::Free);
        unsafe {
            let _ = drv::free_async(self.ptr, self.gpu.cu_stream());
        }
        self.gpu.live_bytes.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

/// Kinds of host call the device layer times: a step whose host time nearly equals its GPU
/// time is paced by these, not by its kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostCall {
    /// cuLaunchKernel.
    Launch,
    /// A cuBLAS or cuBLASLt GEMM call.
    Gemm,
    /// cuMemAllocAsync.
    Alloc,
    /// cuMemFreeAsync.
    Free,
    /// Finding a compiled kernel by name (the module cache) and setting its attributes.
    Lookup,
    /// cuMemsetD8Async and device-to-device copies.
    MemOp,
    /// Waiting for the stream: synchronize, and downloads and uploads whole (a copy to or
    /// from pageable memory returns only when the stream reaches it).
    Wait,
}

impl HostCall {
    pub const ALL: [HostCall; 7] = [
        HostCall::Launch,
        HostCall::Gemm,
        HostCall::Alloc,
        HostCall::Free,
        HostCall::Lookup,
        HostCall::MemOp,
        HostCall::Wait,
    ];
    pub fn name(self) -> &'static str {
        match self {
            HostCall::Launch => "launch",
            HostCall::Gemm => "gemm",
            HostCall::Alloc => "alloc",
            HostCall::Free => "free",
            HostCall::Lookup => "lookup",
            HostCall::MemOp => "memset_copy",
            HostCall::Wait => "wait",
        }
    }
}

#[derive(Default)]
struct HostClock {
    calls: [AtomicU64; 7],
    ns: [AtomicU64; 7],
}

impl HostClock {
    fn time(&self, call: HostCall) -> HostTimer<'_> {
        HostTimer {
            clock: self,
            call,
            start: std::time::Instant::now(),
        }
    }
    fn get(&self, call: HostCall) -> (u64, u64) {
        let i = call as usize;
        (
            self.calls[i].load(Ordering::Relaxed),
            self.ns[i].load(Ordering::Relaxed),
        )
    }
}

/// Adds the time from its making to its drop to one kind of host call.
pub(crate) struct HostTimer<'a> {
    clock: &'a HostClock,
    call: HostCall,
    start: std::time::Instant,
}

impl Drop for HostTimer<'_> {
    fn drop(&mut self) {
        let i = self.call as usize;
        self.clock.calls[i].fetch_add(1, Ordering::Relaxed);
        let ns = self.start.elapsed().as_nanos() as u64;
        self.clock.ns[i].fetch_add(ns, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_timers_count_calls_and_time_by_kind() {
        let clock = HostClock::default();
        for _ in 0..3 {
            let _t = clock.time(HostCall::Gemm);
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        drop(clock.time(HostCall::Wait));
        let (gemms, gemm_ns) = clock.get(HostCall::Gemm);
        assert_eq!(gemms, 3);
        assert!(gemm_ns >= 3_000_000, "{gemm_ns} ns");
        assert_eq!(clock.get(HostCall::Wait).0, 1);
        assert_eq!(clock.get(HostCall::Launch), (0, 0));
        // Every kind has its own slot and name.
        let names: std::collections::HashSet<_> = HostCall::ALL.iter().map(|c| c.name()).collect();
        assert_eq!(names.len(), HostCall::ALL.len());
        assert!(HostCall::ALL
            .iter()
            .enumerate()
            .all(|(i, &c)| c as usize == i));
    }
}
