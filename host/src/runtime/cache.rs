//! Compiled components cached on disk, keyed by the component's hash and the
//! engine's configuration. A cache file carries a checksum of its own bytes: a
//! corrupt or mismatched entry is compiled again, never trusted.
//!
//! A loaded component is a read-only mapping of its cache file (wasmtime's
//! `deserialize_file`), not a copy on the heap: its code and data pages are
//! the page cache's (shared by plugins with the same bytes, reclaimable), and
//! an idle plugin's private memory is its metadata, not a copy of its whole
//! artifact. Loading maps in only the pages it reads, and gives those back
//! once the plugin is linked (`forget_cached_file`, `release_idle_pages`;
//! "Idle memory per plugin" in `docs/benchmarks.md`).

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

/// Ends a cache file, after the payload (wasmtime's serialized component)
/// and the payload's sha256. At the end, not the start, so that the file
/// itself is a loadable artifact for `Component::deserialize_file` (which
/// ignores bytes after the ELF sections).
const MAGIC: &[u8; 8] = b"SWYDCW02";

/// Returns the component for `wasm` and the hex sha256 of `wasm`.
pub fn load_or_compile(
    engine: &Engine,
    cache_dir: &Path,
    wasm: &[u8],
) -> wasmtime::Result<(Component, String)> {
    let hash = hex::encode(Sha256::digest(wasm));
    let path = entry_path(engine, cache_dir, &hash);
    if let Some(component) = load(engine, &path) {
        return Ok((component, hash));
    }
    let component = Component::from_binary(engine, wasm)?;
    if let Err(e) = store(&component, &path) {
        // A cache that cannot be written only costs a compile next time.
        tracing::warn!(path = %path.display(), error = %e, "cannot write compiled component to cache");
        return Ok((component, hash));
    }
    // Run from the file just written, as after a restart: the compiled copy
    // on the heap is freed.
    Ok((load(engine, &path).unwrap_or(component), hash))
}

/// Deletes the temporary files of writes that a killed process left behind
/// (`<entry>.tmp<pid>`). Call it before this process writes any. Hosts on the
/// NATS engine may share a data dir, so a file of a process that still runs
/// is left alone.
pub fn sweep(cache_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(cache_dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let leftover = path
            .extension()
            .and_then(|e| e.to_str())
            .and_then(|e| e.strip_prefix("tmp"))
            .is_some_and(|pid| !writer_alive(pid));
        if leftover && std::fs::remove_file(&path).is_ok() {
            tracing::debug!(path = %path.display(), "removed a leftover cache temp file");
        }
    }
}

/// Whether the process that named a temp file `tmp<pid>` still runs (and is
/// not this one, which has written nothing yet). Where `/proc` is missing,
/// every writer counts as gone.
fn writer_alive(pid: &str) -> bool {
    match pid.parse::<u32>() {
        Ok(p) if p != std::process::id() => Path::new("/proc").join(p.to_string()).exists(),
        _ => false,
    }
}

fn entry_path(engine: &Engine, cache_dir: &Path, wasm_hash: &str) -> PathBuf {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut h);
    cache_dir.join(format!("{wasm_hash}-{:016x}.cwasm", h.finish()))
}

fn load(engine: &Engine, path: &Path) -> Option<Component> {
    let bytes = std::fs::read(path).ok()?;
    if verified_payload(&bytes).is_none() {
        // The first format put its tag at the start; an entry of it is not
        // corrupt, just older than this binary.
        if bytes.starts_with(b"SWYDCW01") {
            tracing::info!(path = %path.display(), "compiled component in an older cache format; recompiling");
        } else {
            tracing::warn!(path = %path.display(), "corrupt compiled component in cache; recompiling");
        }
        return None;
    }
    drop(bytes);
    forget_cached_file(path);
    // SAFETY: the file holds bytes this host wrote with `Component::serialize`
    // for an engine of the same configuration (the file name says so), and
    // their checksum matches, so they are not truncated or altered. Cache
    // files are never written in place, only replaced by a rename (see
    // `store`), so the file mapped is the one just checked (or one with the
    // same bytes, another host's), and it does not change while mapped.
    match unsafe { Component::deserialize_file(engine, path) } {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "unusable compiled component in cache; recompiling");
            None
        }
    }
}

/// Lets the kernel take back the pages of a loaded component that are
/// clean copies of its cache file: the checks at load (and the kernel's
/// read-around) touch far more of it than an idle plugin needs. Pages come
/// back from the page cache on the first delivery (minor faults); private
/// (written) pages are never dropped, since there is no swap to put them in
/// and `MADV_PAGEOUT` only reclaims what it can without losing data.
pub fn release_idle_pages(component: &Component) {
    #[cfg(target_os = "linux")]
    {
        let range = component.image_range();
        let page = 4096usize;
        let start = (range.start as usize).next_multiple_of(page);
        let end = range.end as usize & !(page - 1);
        if end > start {
            // SAFETY: advice only (MADV_PAGEOUT never discards data), on
            // whole pages inside the component's own mapping, which lives as
            // long as `component`.
            let rc = unsafe {
                libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_PAGEOUT)
            };
            if rc != 0 {
                tracing::debug!(error = %std::io::Error::last_os_error(), "madvise(MADV_PAGEOUT) on a component image");
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = component;
}

/// Drops a file's pages from the page cache (after the checksum read them
/// all), so that mapping it brings in only the pages loading touches, not
/// the whole file by fault-around.
fn forget_cached_file(path: &Path) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        if let Ok(f) = std::fs::File::open(path) {
            // SAFETY: advice on an open file descriptor; no memory is touched.
            unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = path;
}

fn verified_payload(bytes: &[u8]) -> Option<&[u8]> {
    let rest = bytes.strip_suffix(MAGIC)?;
    let (payload, sum) = rest.split_at_checked(rest.len().checked_sub(32)?)?;
    (Sha256::digest(payload).as_slice() == sum).then_some(payload)
}

fn store(component: &Component, path: &Path) -> anyhow::Result<()> {
    let payload = component.serialize().map_err(|e| anyhow::anyhow!("{e}"))?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut bytes = payload;
    let sum = Sha256::digest(&bytes);
    bytes.extend_from_slice(&sum);
    bytes.extend_from_slice(MAGIC);
    // Write then rename, so a reader never sees half a file.
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, &bytes)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_checksum_rejects_tampering() {
        let mut bytes = b"hello".to_vec();
        bytes.extend_from_slice(&Sha256::digest(b"hello"));
        bytes.extend_from_slice(MAGIC);
        assert_eq!(verified_payload(&bytes), Some(&b"hello"[..]));
        let mut flipped = bytes.clone();
        flipped[0] ^= 1;
        assert_eq!(verified_payload(&flipped), None);
        assert_eq!(verified_payload(b"SWYD"), None);
        assert_eq!(verified_payload(MAGIC), None);
        assert_eq!(verified_payload(&bytes[1..]), None);
        assert_eq!(verified_payload(&bytes[..bytes.len() - 1]), None);
    }

    #[test]
    fn sweep_removes_only_leftover_temp_files() {
        let dir = tempfile::tempdir().unwrap();
        // PIDs above the kernel's pid_max (4194304) belong to no process;
        // pid 1 always runs (another host's write in progress).
        for name in [
            "a-1.cwasm",
            "a-1.tmp4294967001",
            "b-2.tmp4294967002",
            "c-3.tmp1",
        ] {
            std::fs::write(dir.path().join(name), b"x").unwrap();
        }
        sweep(dir.path());
        let mut left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, ["a-1.cwasm", "c-3.tmp1"]);
        sweep(&dir.path().join("missing"));
    }
}
