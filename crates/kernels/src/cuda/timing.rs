//! CUDA-event timing for benchmarks: warm up, then time each run between two events and
//! report the median. Events measure device time only, so launch overhead between runs is
//! not counted unless it stalls the GPU. Before each timed run a 256 MiB buffer is written,
//! so every run starts with a cold L2 (50 MB on an H100) as it would inside a training step,
//! and as the torch/Liger baseline script measures.

use cudarc::driver::{result as drv, sys};

use super::{DriverContext, Gpu};
use crate::error::Result;

pub struct Timing {
    pub median_ms: f64,
    pub min_ms: f64,
    pub runs: usize,
}

struct Event(sys::CUevent);

impl Event {
    fn new() -> Result<Event> {
        drv::event::create(sys::CUevent_flags::CU_EVENT_DEFAULT)
            .call("cuEventCreate")
            .map(Event)
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        unsafe {
            let _ = drv::event::destroy(self.0);
        }
    }
}

impl Gpu {
    /// Run `f` `warmup` times untimed, then `runs` times each between CUDA events.
    pub fn time<F: FnMut() -> Result<()>>(
        self: &std::sync::Arc<Self>,
        warmup: usize,
        runs: usize,
        mut f: F,
    ) -> Result<Timing> {
        self.bind()?;
        for _ in 0..warmup {
            f()?;
        }
        let flush = self.alloc(256 << 20)?;
        self.synchronize()?;
        let mut times = Vec::with_capacity(runs);
        for _ in 0..runs.max(1) {
            let (start, stop) = (Event::new()?, Event::new()?);
            self.memset_zero(&flush)?;
            unsafe { drv::event::record(start.0, self.cu_stream()) }.call("cuEventRecord")?;
            f()?;
            unsafe { drv::event::record(stop.0, self.cu_stream()) }.call("cuEventRecord")?;
            unsafe { drv::event::synchronize(stop.0) }.call("cuEventSynchronize")?;
            let ms = unsafe { drv::event::elapsed(start.0, stop.0) }.call("cuEventElapsedTime")?;
            times.push(ms as f64);
        }
        times.sort_by(|a, b| a.total_cmp(b));
        Ok(Timing {
            median_ms: times[times.len() / 2],
            min_ms: times[0],
            runs: times.len(),
        })
    }
}

/// A point in the GPU's stream, for timing the parts of a longer run (the phases of a
/// training step) without synchronising between them.
pub struct Mark(Event);

impl Gpu {
    /// Record a mark on the stream now, in stream order with the work around it.
    pub fn mark(&self) -> Result<Mark> {
        self.bind()?;
        let e = Event::new()?;
        unsafe { drv::event::record(e.0, self.cu_stream()) }.call("cuEventRecord")?;
        Ok(Mark(e))
    }
}

impl Mark {
    /// Milliseconds of device time from `earlier` to this mark (waits until the GPU has
    /// reached this mark).
    pub fn ms_since(&self, earlier: &Mark) -> Result<f64> {
        unsafe { drv::event::synchronize(self.0 .0) }.call("cuEventSynchronize")?;
        let ms =
            unsafe { drv::event::elapsed(earlier.0 .0, self.0 .0) }.call("cuEventElapsedTime")?;
        Ok(ms as f64)
    }
}
