//! Compiling the repository's CUDA sources with NVRTC, for the device's own architecture,
//! with an on-disk cache so that only the first run pays for compilation.
//!
//! The kernels include no CUDA headers (bf16 conversion is a single PTX instruction, see
//! `kernels/common.cuh`), so libnvrtc alone is enough: no toolkit install, no include path.

use std::ffi::CString;
use std::path::PathBuf;

use cudarc::nvrtc::{result as nvrtc, sys};

use super::{libs, KernelSource, PRELUDE};
use crate::error::{KernelError, Result};

/// Options every kernel is compiled with. Changing them changes the cache key.
fn options(arch: (i32, i32)) -> Vec<String> {
    vec![
        format!("--gpu-architecture=sm_{}{}", arch.0, arch.1),
        "--std=c++17".into(),
        "-lineinfo".into(),
    ]
}

/// The full text NVRTC sees: the shared prelude, then the op's source.
fn full_source(source: &KernelSource) -> String {
    format!("{PRELUDE}\n#line 1 \"{}.cu\"\n{}", source.name, source.src)
}

fn nvrtc_version() -> Result<(i32, i32)> {
    libs::ensure_nvrtc()?;
    let (mut major, mut minor) = (0, 0);
    unsafe { sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| KernelError::NoNvrtc(format!("nvrtcVersion failed: {e:?}")))?;
    Ok((major, minor))
}

/// Compile `source` to a CUBIN for compute capability `arch`, without the cache.
pub fn compile(source: &KernelSource, arch: (i32, i32)) -> Result<Vec<u8>> {
    libs::ensure_nvrtc()?;
    let arch_name = format!("sm_{}{}", arch.0, arch.1);
    let text = CString::new(full_source(source)).expect("kernel sources have no NUL");
    let name = CString::new(format!("{}.cu", source.name)).expect("no NUL");
    let fail = |what: &str, e: cudarc::nvrtc::result::NvrtcError| KernelError::Compile {
        kernel: source.name,
        arch: arch_name.clone(),
        log: format!("{what}: {e:?}"),
    };
    let prog = nvrtc::create_program(&text, Some(&name)).map_err(|e| fail("create", e))?;
    let compiled = unsafe { nvrtc::compile_program(prog, &options(arch)) };
    let result = match compiled {
        Err(_) => {
            let log = unsafe { nvrtc::get_program_log(prog) }
                .map(|l| c_chars_to_string(&l))
                .unwrap_or_else(|e| format!("(no log: {e:?})"));
            Err(KernelError::Compile {
                kernel: source.name,
                arch: arch_name.clone(),
                log,
            })
        }
        Ok(()) => unsafe {
            let mut size = 0usize;
            sys::nvrtcGetCUBINSize(prog, &mut size)
                .result()
                .map_err(|e| fail("cubin size", e))?;
            let mut cubin = vec![0u8; size];
            sys::nvrtcGetCUBIN(prog, cubin.as_mut_ptr() as *mut std::ffi::c_char)
                .result()
                .map_err(|e| fail("cubin", e))?;
            Ok(cubin)
        },
    };
    unsafe {
        let _ = nvrtc::destroy_program(prog);
    }
    result
}

fn c_chars_to_string(v: &[std::ffi::c_char]) -> String {
    let bytes: Vec<u8> = v
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Where compiled kernels are kept: `$TIGON_KERNEL_CACHE`, else `$XDG_CACHE_HOME/tigon/kernels`,
/// else `~/.cache/tigon/kernels`.
pub fn cache_dir() -> Option<PathBuf> {
    if let Ok(d) = std::env::var("TIGON_KERNEL_CACHE") {
        return Some(PathBuf::from(d));
    }
    if let Ok(d) = std::env::var("XDG_CACHE_HOME") {
        return Some(PathBuf::from(d).join("tigon/kernels"));
    }
    std::env::var("HOME")
        .ok()
        .map(|h| PathBuf::from(h).join(".cache/tigon/kernels"))
}

/// FNV-1a: stable across Rust versions (unlike `DefaultHasher`), which a disk cache needs.
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for &b in *part {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Compile with the disk cache. The key covers the source text, the options and the NVRTC
/// version, so any change recompiles. A cache that cannot be read or written is skipped:
/// it only saves time.
pub fn compile_cached(source: &KernelSource, arch: (i32, i32)) -> Result<Vec<u8>> {
    let version = nvrtc_version()?;
    let text = full_source(source);
    let opts = options(arch).join(" ");
    let ver = format!("{}.{}", version.0, version.1);
    let key = fnv1a(&[text.as_bytes(), opts.as_bytes(), ver.as_bytes()]);
    let Some(dir) = cache_dir() else {
        return compile(source, arch);
    };
    let path = dir.join(format!(
        "{}-sm{}{}-{key:016x}.cubin",
        source.name, arch.0, arch.1
    ));
    if let Ok(bytes) = std::fs::read(&path) {
        // A CUBIN is an ELF file; anything else is a torn or foreign file: recompile.
        if bytes.len() > 4 && &bytes[..4] == b"\x7fELF" {
            return Ok(bytes);
        }
    }
    let cubin = compile(source, arch)?;
    let _ = write_atomic(&path, &cubin);
    Ok(cubin)
}

/// Write to a temporary name in the same folder, then rename: a reader never sees half a file.
fn write_atomic(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv_is_stable_and_separates_parts() {
        assert_eq!(fnv1a(&[b"ab", b"c"]), fnv1a(&[b"ab", b"c"]));
        assert_ne!(fnv1a(&[b"ab", b"c"]), fnv1a(&[b"a", b"bc"]));
    }

    /// Every CUDA source in the repository compiles for sm_90. Needs libnvrtc 13: CI
    /// installs it (see .ci/run) and sets TIGON_REQUIRE_NVRTC=1 so that a missing library
    /// fails the test there instead of skipping it.
    #[test]
    fn every_kernel_compiles_for_sm90() {
        if let Err(e) = libs::ensure_nvrtc() {
            if std::env::var("TIGON_REQUIRE_NVRTC").as_deref() == Ok("1") {
                panic!("{e}");
            }
            eprintln!("skipping NVRTC compile test: {e}");
            return;
        }
        let mut failures = Vec::new();
        let mut cubins = std::collections::HashMap::new();
        for source in crate::ops::ALL_SOURCES {
            match compile(source, (9, 0)) {
                Ok(cubin) => {
                    assert!(cubin.starts_with(b"\x7fELF"), "{} gave no ELF", source.name);
                    cubins.insert(source.name, cubin);
                }
                Err(e) => failures.push(e.to_string()),
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n\n"));
        // Every kernel an op asks for by a literal name is an entry point of its source's
        // CUBIN (a kernel renamed or dropped from a .cu would otherwise fail only on a GPU).
        let ops = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/ops");
        let mut checked = 0;
        for entry in std::fs::read_dir(&ops).unwrap() {
            let path = entry.unwrap().path();
            let text = std::fs::read_to_string(&path).unwrap();
            let Some(source) = own_source_name(&text) else {
                continue;
            };
            let cubin = &cubins[source.as_str()];
            for name in literal_kernel_names(&text) {
                let mut sym = name.clone().into_bytes();
                sym.push(0);
                assert!(
                    cubin.windows(sym.len()).any(|w| w == sym.as_slice()),
                    "{}: kernel `{name}` is not in {source}'s CUBIN",
                    path.display()
                );
                checked += 1;
            }
        }
        assert!(checked > 20, "only {checked} kernel names found in src/ops");
    }

    /// The `name` of the `pub const SOURCE: KernelSource` an op file declares.
    fn own_source_name(text: &str) -> Option<String> {
        let at = text.find("pub const SOURCE: KernelSource")?;
        let rest = &text[at..];
        let name = rest.find("name: \"")? + "name: \"".len();
        Some(rest[name..name + rest[name..].find('"')?].to_string())
    }

    /// The string literals in `function(&SOURCE, "...")` calls of an op file.
    fn literal_kernel_names(text: &str) -> Vec<String> {
        let mut out = Vec::new();
        for (at, _) in text.match_indices("function(") {
            let rest = text[at + "function(".len()..].trim_start();
            let Some(rest) = rest.strip_prefix("&SOURCE,") else {
                continue;
            };
            if let Some(lit) = rest.trim_start().strip_prefix('"') {
                if let Some(end) = lit.find('"') {
                    out.push(lit[..end].to_string());
                }
            }
        }
        out
    }
}
