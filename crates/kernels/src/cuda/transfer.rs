//! Host-to-device transfers beside the compute stream, for offloading frozen data.
//!
//! Everything else in tigon runs on the [`Gpu`]'s one stream. Offloading needs copies that
//! overlap with compute, so this file adds exactly three things, each ordered by events:
//!
//! - [`CopyStream`]: a second stream that only ever copies host data into device buffers;
//! - [`CopyStream::upload`]: the device buffers are allocated on the **main** stream (the
//!   stream-ordered pool), an event recorded there after the allocations makes the copy stream
//!   wait before writing them, and an event recorded on the copy stream after the copies is
//!   what the main stream waits on ([`Upload::ready`]) before anything reads them. Buffers are
//!   freed on the main stream as always, which is after that wait, so after the copies;
//! - [`HostPin`]: a CPU tensor's memory page-locked (`cuMemHostRegister`) so the copy engine
//!   reads it directly and the copy is truly asynchronous; unregistered on drop.
//!
//! Kernels, allocations and frees stay on the main stream, so the single-stream guarantees of
//! the rest of the device layer hold unchanged.

use std::ffi::c_void;
use std::sync::Arc;

use cudarc::driver::{result as drv, sys};

use super::{DriverContext, Gpu};
use crate::error::{KernelError, Result};
use crate::tensor::{CpuData, Storage};
use crate::Tensor;

/// A CUDA event used only for ordering (timing disabled: cheaper to record and wait on).
struct SyncEvent(sys::CUevent);

impl SyncEvent {
    fn new() -> Result<SyncEvent> {
        drv::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING)
            .call("cuEventCreate")
            .map(SyncEvent)
    }

    fn record(&self, stream: sys::CUstream) -> Result<()> {
        unsafe { drv::event::record(self.0, stream) }.call("cuEventRecord")
    }

    /// Make `stream` wait (on the device, not the host) for the work before the record.
    fn wait_on(&self, stream: sys::CUstream) -> Result<()> {
        unsafe {
            drv::stream::wait_event(
                stream,
                self.0,
                sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
            )
        }
        .call("cuStreamWaitEvent")
    }
}

impl Drop for SyncEvent {
    fn drop(&mut self) {
        // Destroying an event whose work is pending is allowed: the driver releases it once
        // the work completes.
        unsafe {
            let _ = drv::event::destroy(self.0);
        }
    }
}

/// A second stream of a [`Gpu`] that carries host-to-device copies only.
pub struct CopyStream {
    gpu: Arc<Gpu>,
    stream: sys::CUstream,
}

// SAFETY: the stream handle is only used through the GPU's context, bound on every call.
unsafe impl Send for CopyStream {}
unsafe impl Sync for CopyStream {}

impl Gpu {
    /// A new copy stream (non-blocking, as the main stream is).
    pub fn copy_stream(self: &Arc<Self>) -> Result<CopyStream> {
        self.bind()?;
        let stream =
            drv::stream::create(drv::stream::StreamKind::NonBlocking).call("cuStreamCreate")?;
        Ok(CopyStream {
            gpu: self.clone(),
            stream,
        })
    }
}

impl CopyStream {
    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    /// Start copying each host tensor into a new device tensor of the same shape and dtype.
    /// The copies run on this stream, after everything already queued on the main stream
    /// (so after the allocations), and overlap with whatever the main stream does next. The
    /// device tensors are handed over by [`Upload::ready`], which orders the main stream
    /// after the copies. The host tensors must stay alive and unchanged until then, which
    /// the borrow of `'h` guarantees.
    pub fn upload<'h>(&self, hosts: &[&'h Tensor]) -> Result<Upload<'h>> {
        let gpu = &self.gpu;
        gpu.bind()?;
        let mut tensors = Vec::with_capacity(hosts.len());
        for h in hosts {
            if h.is_cuda() {
                return Err(KernelError::Device {
                    op: "upload",
                    detail: format!(
                        "{h:?} is already on a device; the source must be a host tensor"
                    ),
                });
            }
            tensors.push(Tensor::uninit_cuda(gpu, h.shape(), h.dtype())?);
        }
        let allocated = SyncEvent::new()?;
        allocated.record(gpu.cu_stream())?;
        allocated.wait_on(self.stream)?;
        for (h, d) in hosts.iter().zip(&tensors) {
            let dst = d
                .cuda_buffer()
                .expect("allocated on the device above")
                .ptr();
            if h.size_in_bytes() == 0 {
                continue;
            }
            let r = unsafe {
                match h.storage() {
                    Storage::Cpu(CpuData::F32(v)) => drv::memcpy_htod_async(dst, v, self.stream),
                    Storage::Cpu(CpuData::BF16(v)) => drv::memcpy_htod_async(dst, v, self.stream),
                    Storage::Cpu(CpuData::I32(v)) => drv::memcpy_htod_async(dst, v, self.stream),
                    Storage::Cuda(_) => unreachable!("checked above"),
                }
            };
            r.call("cuMemcpyHtoDAsync")?;
        }
        let copied = SyncEvent::new()?;
        copied.record(self.stream)?;
        Ok(Upload {
            tensors: Some(tensors),
            copied,
            gpu: gpu.clone(),
            _hosts: std::marker::PhantomData,
        })
    }
}

impl Drop for CopyStream {
    fn drop(&mut self) {
        let _ = self.gpu.bind();
        unsafe {
            let _ = drv::stream::synchronize(self.stream);
            let _ = drv::stream::destroy(self.stream);
        }
    }
}

/// Copies in flight on a [`CopyStream`]: the device tensors, not yet safe to read.
pub struct Upload<'h> {
    tensors: Option<Vec<Tensor>>,
    copied: SyncEvent,
    gpu: Arc<Gpu>,
    _hosts: std::marker::PhantomData<&'h Tensor>,
}

impl Upload<'_> {
    /// Order the main stream after the copies and hand the device tensors over (in the
    /// order of the hosts given to [`CopyStream::upload`]). Does not block the host.
    pub fn ready(mut self) -> Result<Vec<Tensor>> {
        self.gpu.bind()?;
        self.copied.wait_on(self.gpu.cu_stream())?;
        Ok(self.tensors.take().expect("taken only here"))
    }
}

impl Drop for Upload<'_> {
    fn drop(&mut self) {
        // Dropped before `ready` (an error on the way): the buffers are freed on the main
        // stream, which must not hand their memory out again while the copies still write it.
        if self.tensors.is_some() {
            let _ = self.gpu.bind();
            let _ = self.copied.wait_on(self.gpu.cu_stream());
        }
    }
}

/// The page-locking (`cuMemHostRegister`) of one CPU tensor's memory for a GPU, so copies
/// from it run on the copy engine without a staging buffer and truly overlap with compute.
/// Unregistered on drop, after waiting for the context so that no copy still reads it.
pub struct HostPin {
    ptr: usize,
    gpu: Arc<Gpu>,
}

// SAFETY: the address is only handed back to the driver, under the GPU's context.
unsafe impl Send for HostPin {}
unsafe impl Sync for HostPin {}

impl Gpu {
    /// Page-lock the memory of CPU tensor `tensor`: `None` for an empty one, or one whose
    /// pages are already page-locked by another registration.
    ///
    /// # Safety
    /// The tensor's memory must stay allocated, at the same address, until the returned
    /// [`HostPin`] is dropped: do not drop, replace or resize the tensor before then.
    pub unsafe fn pin_host(self: &Arc<Self>, tensor: &Tensor) -> Result<Option<HostPin>> {
        let (ptr, bytes) = match tensor.storage() {
            Storage::Cpu(CpuData::F32(v)) => (v.as_ptr() as usize, std::mem::size_of_val(&v[..])),
            Storage::Cpu(CpuData::BF16(v)) => (v.as_ptr() as usize, std::mem::size_of_val(&v[..])),
            Storage::Cpu(CpuData::I32(v)) => (v.as_ptr() as usize, std::mem::size_of_val(&v[..])),
            Storage::Cuda(_) => {
                return Err(KernelError::Device {
                    op: "pin_host",
                    detail: format!("{tensor:?} is on a device, only host memory is page-locked"),
                })
            }
        };
        if bytes == 0 {
            return Ok(None);
        }
        self.bind()?;
        // The driver page-locks whole pages: a range sharing a page with one registered
        // before is refused as already registered. Copies from it are still correct (staged
        // through the driver's own pinned buffer), so that is no error: it stays pageable.
        match sys::cuMemHostRegister_v2(ptr as *mut c_void, bytes, 0).result() {
            Ok(()) => {}
            Err(e) if e.0 == sys::CUresult::CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED => {
                return Ok(None)
            }
            Err(e) => return Err(e).call("cuMemHostRegister"),
        }
        Ok(Some(HostPin {
            ptr,
            gpu: self.clone(),
        }))
    }
}

impl Drop for HostPin {
    fn drop(&mut self) {
        // [`Upload::ready`] orders the main stream, not the host, after the copies: wait for
        // the whole context before the memory stops being page-locked (this happens once, when
        // the offloaded weights go away).
        let _ = self.gpu.bind();
        let _ = drv::ctx::synchronize();
        unsafe {
            let _ = sys::cuMemHostUnregister(self.ptr as *mut c_void);
        }
    }
}
