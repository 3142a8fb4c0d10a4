//! Helpers for the CPU reference ops: row-parallel loops over scoped threads.
//!
//! The references must be exact rather than fast, but gpu-check runs them at Llama-3-8B
//! sizes (a 8192 x 128256 logits matrix), so rows are spread over the machine's cores.

/// Threads to use: the machine's parallelism, overridable with TIGON_CPU_THREADS.
pub fn threads() -> usize {
    std::env::var("TIGON_CPU_THREADS")
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        })
}

/// Call `f(row, out_row)` for every `row_len`-sized row of `out`, rows split over threads.
pub fn par_rows<T: Send, F: Fn(usize, &mut [T]) + Sync>(out: &mut [T], row_len: usize, f: F) {
    if row_len == 0 || out.is_empty() {
        return;
    }
    let rows = out.len() / row_len;
    let t = threads().min(rows).max(1);
    if t == 1 {
        for (r, chunk) in out.chunks_mut(row_len).enumerate() {
            f(r, chunk);
        }
        return;
    }
    let per = rows.div_ceil(t);
    std::thread::scope(|s| {
        for (i, block) in out.chunks_mut(per * row_len).enumerate() {
            let f = &f;
            s.spawn(move || {
                for (j, chunk) in block.chunks_mut(row_len).enumerate() {
                    f(i * per + j, chunk);
                }
            });
        }
    });
}

/// Map rows `0..rows` to values in parallel, keeping order.
pub fn par_map<T: Send + Default + Clone, F: Fn(usize) -> T + Sync>(rows: usize, f: F) -> Vec<T> {
    let mut out = vec![T::default(); rows];
    par_rows(&mut out, 1, |r, o| o[0] = f(r));
    out
}
