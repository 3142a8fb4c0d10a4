//! Durable file writes: data goes to a temporary sibling, is synced, then renamed over the
//! target, and the folder is synced so the rename itself survives a crash. A reader (or a
//! resumed run) sees the old file or the new one, never half of one.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Result, TrainerError};

/// `.{name}.tmp-{pid}` beside `path`.
pub(crate) fn temp_sibling(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// Sync a folder's entries (renames and new files in it) to disk. Not every platform can
/// open a folder for syncing; there the rename is as durable as the OS makes it.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    match File::open(dir) {
        Ok(f) => match f.sync_all() {
            Ok(()) => Ok(()),
            // Some filesystems refuse fsync on a directory handle; nothing more to do there.
            Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => Ok(()),
            Err(e) => Err(TrainerError::io(dir, e)),
        },
        Err(e) => Err(TrainerError::io(dir, e)),
    }
}

/// Write `bytes` to `path` atomically and durably.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let temp = temp_sibling(path);
    let result = (|| {
        let mut f = File::create(&temp).map_err(|e| TrainerError::io(&temp, e))?;
        f.write_all(bytes).map_err(|e| TrainerError::io(&temp, e))?;
        f.sync_all().map_err(|e| TrainerError::io(&temp, e))?;
        std::fs::rename(&temp, path).map_err(|e| TrainerError::io(path, e))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&temp);
        return result;
    }
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

/// Sync an existing file's contents to disk (files written by other crates' atomic writers).
pub(crate) fn sync_file(path: &Path) -> Result<()> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| TrainerError::io(path, e))
}
