//! Finding the CUDA shared libraries at run time.
//!
//! cudarc opens libcuda, libnvrtc and libcublas by soname through the dynamic loader, and
//! panics if the loader cannot find them. We check first, so a missing library becomes an
//! error, and we look in the usual install folders too: a library opened once by its full
//! path is found again by soname, so preloading it is enough for cudarc.

use std::path::PathBuf;
use std::sync::OnceLock;

use crate::error::{KernelError, Result};

/// Folders where CUDA toolkits and the PyPI `nvidia-*` wheels put their libraries.
fn candidate_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Ok(d) = std::env::var("TIGON_CUDA_LIB_DIR") {
        dirs.extend(std::env::split_paths(&d));
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Ok(d) = std::env::var(var) {
            dirs.push(PathBuf::from(&d).join("lib64"));
            dirs.push(PathBuf::from(&d).join("lib"));
        }
    }
    dirs.push("/usr/local/cuda/lib64".into());
    dirs.push("/usr/local/cuda/targets/x86_64-linux/lib".into());
    // A Python environment with the nvidia wheels (torch's, or the one CI installs).
    for venv in ["/opt/torch/.venv", ".ci/venv"] {
        if let Ok(entries) = std::fs::read_dir(format!("{venv}/lib")) {
            for e in entries.flatten() {
                dirs.push(e.path().join("site-packages/nvidia/cu13/lib"));
            }
        }
    }
    dirs
}

/// Try the loader's own search, then each candidate folder. Returns where it was found.
fn preload(sonames: &[&str]) -> std::result::Result<String, Vec<String>> {
    let mut looked = Vec::new();
    for name in sonames {
        // SAFETY: loading a CUDA library runs its initialisers, which is what cudarc does too.
        if unsafe { libloading::Library::new(*name) }.is_ok() {
            return Ok(format!("{name} (loader path)"));
        }
        looked.push(format!("{name} on the loader path"));
    }
    for dir in candidate_dirs() {
        for name in sonames {
            let path = dir.join(name);
            if path.exists() {
                if let Ok(lib) = unsafe { libloading::Library::new(&path) } {
                    // Keep it loaded for the life of the process.
                    std::mem::forget(lib);
                    return Ok(path.display().to_string());
                }
            }
            looked.push(path.display().to_string());
        }
    }
    Err(looked)
}

fn cached(
    cell: &'static OnceLock<std::result::Result<String, String>>,
    sonames: &[&str],
) -> std::result::Result<String, String> {
    cell.get_or_init(|| preload(sonames).map_err(|looked| looked.join(", ")))
        .clone()
}

pub fn ensure_driver() -> Result<()> {
    static CELL: OnceLock<std::result::Result<String, String>> = OnceLock::new();
    cached(&CELL, &["libcuda.so.1", "libcuda.so"])
        .map(|_| ())
        .map_err(|looked| {
            KernelError::NoGpu(format!(
                "no NVIDIA driver library (libcuda) on this machine; looked for {looked}"
            ))
        })
}

pub fn ensure_nvrtc() -> Result<String> {
    static CELL: OnceLock<std::result::Result<String, String>> = OnceLock::new();
    cached(&CELL, &["libnvrtc.so.13", "libnvrtc.so"]).map_err(|looked| {
        KernelError::NoNvrtc(format!(
            "libnvrtc 13 not found; looked for {looked}. Install `nvidia-cuda-nvrtc==13.0.*` from PyPI and set TIGON_CUDA_LIB_DIR to its nvidia/cu13/lib folder"
        ))
    })
}

pub fn ensure_cublas() -> Result<()> {
    static CELL: OnceLock<std::result::Result<String, String>> = OnceLock::new();
    // cuBLAS opens cuBLASLt itself: preload it from the same folders first.
    static LT: OnceLock<std::result::Result<String, String>> = OnceLock::new();
    let _ = cached(&LT, &["libcublasLt.so.13", "libcublasLt.so"]);
    cached(&CELL, &["libcublas.so.13", "libcublas.so"])
        .map(|_| ())
        .map_err(|looked| KernelError::Cublas {
            call: "load",
            detail: format!("libcublas 13 not found; looked for {looked}"),
        })
}
