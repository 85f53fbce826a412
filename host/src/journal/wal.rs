//! The commit log in front of the embedded store (ADR 0002).
//!
//! The writer thread appends one frame per group-commit batch and needs it
//! durable as cheaply as possible: an `O_DIRECT | O_DSYNC` overwrite of a file
//! that was filled with zeros and synced when it was created costs one data
//! write and no metadata, where fjall's append plus `fdatasync` also writes the
//! inode. The file is a ring of fixed size. An applier makes the store durable
//! up to some frame and then releases the log space before it ([`WalSpace`]);
//! the writer never overwrites what is not released, and waits when the ring is
//! full. At open, the frames after the store's recorded position are read back
//! ([`Wal::recover`]) to be applied again.
//!
//! Frame layout, little-endian, padded with zeros to whole 4 KiB blocks:
//!
//! | bytes  | field                                          |
//! |--------|------------------------------------------------|
//! | 0..4   | magic `SYWL`                                   |
//! | 4..12  | LSN                                            |
//! | 12..16 | payload length                                 |
//! | 16..20 | CRC-32 of the LSN bytes, length bytes, payload |
//! | 20..32 | reserved, zero                                 |
//!
//! Positions are monotonic byte counts that never wrap; a position's offset in
//! the file is `pos % size`. A frame that does not fit before the end of the
//! file goes to offset 0 of the next lap, and the skipped tail counts as used.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

/// Direct I/O needs the buffer, the offset and the length aligned to the
/// device's logical block; 4096 covers every common one.
const BLOCK: u64 = 4096;
/// The same, for buffer arithmetic.
const BLOCK_USIZE: usize = BLOCK as usize;
/// "SYWL" read as a little-endian `u32`: zeros (a fresh ring) never match.
const MAGIC: u32 = 0x5359_574C;
/// Header bytes before the payload.
const HEADER: usize = 32;
/// The smallest ring `open` creates: a smaller one would hold few batches.
const MIN_SIZE: u64 = 64 * 1024;
/// Zeros are written in chunks of this size when the file is created.
const ZERO_CHUNK: usize = 1 << 20;

/// The position just after a frame: its LSN and the monotonic byte position
/// where the next frame may start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WalPos {
    /// The frame's log sequence number (0: before the first frame).
    pub lsn: u64,
    /// The monotonic byte position just after the frame.
    pub end: u64,
}

/// Errors of the commit log.
#[derive(Debug, thiserror::Error)]
pub enum WalError {
    /// Reading, writing, syncing or creating the file failed.
    #[error("commit log I/O error on {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The existing file cannot be a ring this module wrote.
    #[error("commit log {path} has length {len}, not a positive multiple of 4096")]
    BadLength { path: String, len: u64 },
    /// The payload exceeds [`Wal::max_payload`]: the caller must cap its batches.
    #[error("a batch of {bytes} bytes does not fit the commit log ({limit} bytes at most)")]
    TooLarge { bytes: usize, limit: usize },
    /// [`WalSpace::close`] was called.
    #[error("the commit log is closed")]
    Closed,
}

/// What the writer and the applier share.
#[derive(Debug, Default)]
struct SpaceState {
    /// Everything before this position may be overwritten.
    released: u64,
    closed: bool,
}

/// Shared with the applier thread: where the log's space is free again.
#[derive(Clone, Debug, Default)]
pub struct WalSpace {
    inner: Arc<(Mutex<SpaceState>, Condvar)>,
}

impl WalSpace {
    /// Everything before `end` is durable elsewhere: the writer may reuse it.
    /// Monotonic (a smaller value is ignored).
    pub fn release(&self, end: u64) {
        let mut state = self.lock();
        if end > state.released {
            state.released = end;
            self.inner.1.notify_all();
        }
    }

    /// Where the reusable part of the log ends: everything before it is
    /// durable elsewhere.
    #[cfg(test)]
    pub fn released(&self) -> u64 {
        self.lock().released
    }

    /// Wakes a writer waiting for space and makes that and later appends fail
    /// with [`WalError::Closed`] (for shutdown).
    pub fn close(&self) {
        self.lock().closed = true;
        self.inner.1.notify_all();
    }

    fn lock(&self) -> MutexGuard<'_, SpaceState> {
        // The state is two plain fields, each written whole: a panic elsewhere
        // cannot leave it half-updated, so poisoning carries no meaning here.
        self.inner.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sets the released position outright (recovery resets it).
    fn reset(&self, released: u64) {
        self.lock().released = released;
        self.inner.1.notify_all();
    }

    /// Waits until positions up to `end` may be written in a ring of `size`.
    fn wait_for(&self, end: u64, size: u64) -> Result<(), WalError> {
        let mut state = self.lock();
        loop {
            if state.closed {
                return Err(WalError::Closed);
            }
            if end.saturating_sub(state.released) <= size {
                return Ok(());
            }
            state = self
                .inner
                .1
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }
}

/// A ring-shaped write-ahead log in one preallocated file.
///
/// [`Wal::recover`] must be called once after [`Wal::open`], before the first
/// [`Wal::append`]: it is what sets the writer's position.
#[derive(Debug)]
pub struct Wal {
    /// The write handle: `O_DIRECT | O_DSYNC` when `direct`.
    file: File,
    path: PathBuf,
    size: u64,
    /// Reused for every frame; over-allocated by a block so that an aligned
    /// window of it can be found without `unsafe`.
    buf: Vec<u8>,
    /// The position after the last frame appended or recovered.
    next: WalPos,
    space: WalSpace,
    direct: bool,
    recovered: bool,
}

impl Wal {
    /// Opens or creates the log file at `path`.
    ///
    /// A new file gets `size` bytes (rounded up to a multiple of 4096, at least
    /// 64 KiB) of zeros, synced along with its directory, so that later writes
    /// change no metadata. It is built under a temporary name and renamed into
    /// place, so a crash during creation cannot leave a short ring behind. An
    /// existing file keeps its own length (`size` is ignored); that length
    /// must be a positive multiple of 4096.
    pub fn open(path: &Path, size: u64) -> Result<Wal, WalError> {
        Self::open_with(path, size, true)
    }

    /// [`Wal::open`], with direct I/O optional so that tests can take the
    /// fallback on any file system.
    fn open_with(path: &Path, size: u64, try_direct: bool) -> Result<Wal, WalError> {
        let io_err = |source| WalError::Io {
            path: path.display().to_string(),
            source,
        };
        let len = match std::fs::metadata(path) {
            Ok(meta) => meta.len(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let size = size.max(MIN_SIZE).next_multiple_of(BLOCK);
                create_zeroed(path, size).map_err(io_err)?;
                size
            }
            Err(e) => return Err(io_err(e)),
        };
        if len == 0 || !len.is_multiple_of(BLOCK) {
            return Err(WalError::BadLength {
                path: path.display().to_string(),
                len,
            });
        }
        let (file, direct) = open_for_writes(path, try_direct).map_err(io_err)?;
        Ok(Wal {
            file,
            path: path.to_path_buf(),
            size: len,
            buf: Vec::new(),
            next: WalPos::default(),
            space: WalSpace::default(),
            direct,
            recovered: false,
        })
    }

    /// The file's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether writes go through `O_DIRECT | O_DSYNC` (false: buffered write
    /// plus `fdatasync`, where the file system refuses direct I/O).
    pub fn direct(&self) -> bool {
        self.direct
    }

    /// Reads back the frames that follow `after` (the position the store has
    /// applied through).
    ///
    /// At `after.end % size`, a frame with a valid magic, CRC and LSN
    /// `after.lsn + 1` is taken, then the next, and so on. Where no such frame
    /// is at the current position, one is looked for at offset 0 of the next
    /// lap (a wrapped frame); the first position where neither qualifies ends
    /// the log. Frames from an earlier lap carry smaller LSNs, so they never
    /// qualify. A length that would run past the end of the file is not a
    /// frame.
    ///
    /// Returns the payloads with their LSNs, in order. Sets the writer's
    /// position to just after the last valid frame (or to `after` if none) and
    /// the released position to `after.end`: everything before it is already
    /// in the store.
    pub fn recover(&mut self, after: WalPos) -> Result<Vec<(u64, Vec<u8>)>, WalError> {
        // Buffered reads: alignment does not matter here, and this runs once.
        let reader = File::open(&self.path).map_err(|e| self.io_err(e))?;
        let mut frames = Vec::new();
        let mut pos = after;
        loop {
            let want = pos.lsn + 1;
            let here = pos.end;
            let next_lap = here.next_multiple_of(self.size);
            let found = match self.read_frame(&reader, here, want)? {
                Some(frame) => Some((here, frame)),
                // At an offset of 0, the next lap's offset 0 is this one.
                None if next_lap != here => self
                    .read_frame(&reader, next_lap, want)?
                    .map(|frame| (next_lap, frame)),
                None => None,
            };
            let Some((start, (payload, frame_len))) = found else {
                break;
            };
            pos = WalPos {
                lsn: want,
                end: start + frame_len,
            };
            frames.push((want, payload));
        }
        self.next = pos;
        self.space.reset(after.end);
        self.scrub(&reader, pos.end, after.end + self.size)?;
        self.recovered = true;
        Ok(frames)
    }

    /// Zeroes whatever is not zero in positions `[from, to)`: everything
    /// after the log's end up to the part still in use. A frame torn by a
    /// crash may leave blocks there that a later, shorter frame does not
    /// overwrite; those blocks hold a payload (event bodies), which must never
    /// be read back as a frame after the next crash.
    fn scrub(&mut self, reader: &File, from: u64, to: u64) -> Result<(), WalError> {
        let from = from.next_multiple_of(BLOCK);
        let mut pos = from;
        let mut chunk = vec![0u8; ZERO_CHUNK];
        while pos < to {
            let offset = pos % self.size;
            let len = (to - pos).min(self.size - offset).min(ZERO_CHUNK as u64) as usize;
            let len = len / BLOCK_USIZE * BLOCK_USIZE;
            if len == 0 {
                break;
            }
            reader
                .read_exact_at(&mut chunk[..len], offset)
                .map_err(|e| self.io_err(e))?;
            if chunk[..len].iter().any(|&b| b != 0) {
                let Some(zeros) = aligned(&mut self.buf, len) else {
                    return Err(self.io_err(io::Error::other("cannot align the zero buffer")));
                };
                zeros.fill(0);
                self.file
                    .write_all_at(zeros, offset)
                    .map_err(|e| self.io_err(e))?;
                if !self.direct {
                    self.file.sync_data().map_err(|e| self.io_err(e))?;
                }
            }
            pos += len as u64;
        }
        Ok(())
    }

    /// Appends one frame with the next LSN; durable when it returns. Blocks
    /// while the ring lacks room. Returns the position after it.
    pub fn append(&mut self, payload: &[u8]) -> Result<WalPos, WalError> {
        debug_assert!(self.recovered, "Wal::recover must run before Wal::append");
        let limit = self.max_payload();
        if payload.len() > limit {
            return Err(WalError::TooLarge {
                bytes: payload.len(),
                limit,
            });
        }
        let frame_len = frame_len(payload.len());
        let mut start = self.next.end;
        if start % self.size + frame_len as u64 > self.size {
            // Does not fit before the end of the file: the next lap's offset 0.
            start = start.next_multiple_of(self.size);
        }
        let end = start + frame_len as u64;
        self.space.wait_for(end, self.size)?;

        let lsn = self.next.lsn + 1;
        let Some(frame) = aligned(&mut self.buf, frame_len) else {
            return Err(self.io_err(io::Error::other("cannot align the frame buffer")));
        };
        encode(frame, lsn, payload);
        let offset = start % self.size;
        self.file
            .write_all_at(frame, offset)
            .map_err(|e| self.io_err(e))?;
        if !self.direct {
            // O_DSYNC made the direct write durable; a buffered one needs this.
            self.file.sync_data().map_err(|e| self.io_err(e))?;
        }
        self.next = WalPos { lsn, end };
        Ok(self.next)
    }

    /// The position after the last frame appended or recovered.
    pub fn position(&self) -> WalPos {
        self.next
    }

    /// The handle the applier uses to release space.
    pub fn space(&self) -> WalSpace {
        self.space.clone()
    }

    /// The most payload bytes one frame may carry: a frame (header and
    /// padding included) takes at most half the ring, so the writer can always
    /// make progress once the older half is released.
    pub fn max_payload(&self) -> usize {
        let frame_limit = usize::try_from(self.size / 2 / BLOCK * BLOCK).unwrap_or(usize::MAX);
        frame_limit
            .saturating_sub(HEADER)
            .min(u32::MAX as usize - HEADER)
    }

    /// Reads the frame at monotonic position `pos` if it is one with LSN
    /// `want`; returns its payload and its length in the file.
    fn read_frame(
        &self,
        reader: &File,
        pos: u64,
        want: u64,
    ) -> Result<Option<(Vec<u8>, u64)>, WalError> {
        let offset = pos % self.size;
        if offset + HEADER as u64 > self.size {
            return Ok(None);
        }
        let mut header = [0u8; HEADER];
        reader
            .read_exact_at(&mut header, offset)
            .map_err(|e| self.io_err(e))?;
        let field = |at: usize| [header[at], header[at + 1], header[at + 2], header[at + 3]];
        let magic = u32::from_le_bytes(field(0));
        let mut lsn = [0u8; 8];
        lsn.copy_from_slice(&header[4..12]);
        let lsn = u64::from_le_bytes(lsn);
        let len = u32::from_le_bytes(field(12));
        let crc = u32::from_le_bytes(field(16));
        if magic != MAGIC || lsn != want {
            return Ok(None);
        }
        // A corrupt length must not run past the end of the file (nor make us
        // allocate gigabytes): such a header is not a frame.
        let frame_len = (HEADER as u64 + u64::from(len)).next_multiple_of(BLOCK);
        if offset + frame_len > self.size {
            return Ok(None);
        }
        let mut payload = vec![0u8; len as usize];
        reader
            .read_exact_at(&mut payload, offset + HEADER as u64)
            .map_err(|e| self.io_err(e))?;
        if checksum(lsn, len, &payload) != crc {
            // A torn or corrupt frame: the log ends here.
            return Ok(None);
        }
        Ok(Some((payload, frame_len)))
    }

    fn io_err(&self, source: io::Error) -> WalError {
        WalError::Io {
            path: self.path.display().to_string(),
            source,
        }
    }
}

/// Header plus payload, rounded up to whole blocks.
fn frame_len(payload: usize) -> usize {
    (HEADER + payload).next_multiple_of(BLOCK_USIZE)
}

/// CRC-32 of the LSN, the length and the payload.
fn checksum(lsn: u64, len: u32, payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&lsn.to_le_bytes());
    hasher.update(&len.to_le_bytes());
    hasher.update(payload);
    hasher.finalize()
}

/// Writes a whole frame into `frame` (exactly `frame_len(payload.len())`
/// bytes): header, payload, zero padding. The buffer is reused, so every byte
/// is written.
/// A window of `len` bytes of `buf` aligned for direct I/O. `buf` grows
/// once to the largest window asked for; a reallocation moves the data, so
/// the window is found again each time. `None` only if `align_offset` gives
/// up, which it may in principle (never seen at run time).
fn aligned(buf: &mut Vec<u8>, len: usize) -> Option<&mut [u8]> {
    if buf.len() < len + BLOCK_USIZE {
        buf.resize(len + BLOCK_USIZE, 0);
    }
    let skip = buf.as_ptr().align_offset(BLOCK_USIZE);
    (skip < BLOCK_USIZE).then(move || &mut buf[skip..skip + len])
}

fn encode(frame: &mut [u8], lsn: u64, payload: &[u8]) {
    // Fits: `append` checked the payload against `max_payload`.
    let len = payload.len() as u32;
    frame[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    frame[4..12].copy_from_slice(&lsn.to_le_bytes());
    frame[12..16].copy_from_slice(&len.to_le_bytes());
    frame[16..20].copy_from_slice(&checksum(lsn, len, payload).to_le_bytes());
    frame[20..HEADER].fill(0);
    frame[HEADER..HEADER + payload.len()].copy_from_slice(payload);
    frame[HEADER + payload.len()..].fill(0);
}

/// Creates the ring at `path`: `size` zero bytes, synced, renamed into place,
/// directory synced.
fn create_zeroed(path: &Path, size: u64) -> io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".creating");
    let tmp = PathBuf::from(tmp);
    let result = (|| {
        // `truncate`: a leftover from a crash during an earlier creation is
        // simply rebuilt.
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        let zeros = vec![0u8; ZERO_CHUNK];
        let mut left = size;
        while left > 0 {
            let n = left.min(ZERO_CHUNK as u64) as usize;
            file.write_all(&zeros[..n])?;
            left -= n as u64;
        }
        file.sync_all()?;
        drop(file);
        std::fs::rename(&tmp, path)?;
        // The rename, and the file's existence, are durable only once the
        // directory is.
        let dir = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        // Best effort: the error that matters is the one returned.
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Opens the write handle, with `O_DIRECT | O_DSYNC` where the file system
/// accepts it; returns whether it did.
fn open_for_writes(path: &Path, try_direct: bool) -> io::Result<(File, bool)> {
    if try_direct {
        match open_direct(path) {
            Ok(file) => return Ok((file, true)),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                // tmpfs (and some others) refuse O_DIRECT: one log line per
                // process, since tests open many rings there.
                static FALLBACK: std::sync::Once = std::sync::Once::new();
                FALLBACK.call_once(|| {
                    tracing::info!(
                        path = %path.display(),
                        "commit log: O_DIRECT refused, using buffered writes plus fdatasync"
                    );
                });
            }
            Err(e) => return Err(e),
        }
    }
    let file = OpenOptions::new().read(true).write(true).open(path)?;
    Ok((file, false))
}

/// Opens `path` for `O_DIRECT | O_DSYNC` writes and checks with one aligned
/// read that direct I/O works there: some file systems accept the flag at open
/// and refuse the I/O with EINVAL.
#[cfg(target_os = "linux")]
fn open_direct(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT | libc::O_DSYNC)
        .open(path)?;
    let mut buf = vec![0u8; 2 * BLOCK_USIZE];
    let skip = buf.as_ptr().align_offset(BLOCK_USIZE);
    if skip >= BLOCK_USIZE {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    file.read_exact_at(&mut buf[skip..skip + BLOCK_USIZE], 0)?;
    Ok(file)
}

/// No O_DIRECT outside Linux: always the buffered fallback.
#[cfg(not(target_os = "linux"))]
fn open_direct(_path: &Path) -> io::Result<File> {
    Err(io::Error::from_raw_os_error(libc::EINVAL))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    const RING: u64 = 64 * 1024;

    fn payload(tag: u8, len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| tag.wrapping_mul(31).wrapping_add(i as u8))
            .collect()
    }

    fn fresh(dir: &Path) -> Wal {
        let mut wal = Wal::open(&dir.join("wal"), RING).unwrap();
        assert_eq!(wal.recover(WalPos::default()).unwrap(), vec![]);
        wal
    }

    /// Appends frames of 100 bytes (one block each) until the ring is full.
    fn fill(wal: &mut Wal) {
        while wal.position().end + BLOCK <= wal.size() {
            wal.append(&[7; 100]).unwrap();
        }
    }

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wal");
        let sizes = [1, 5000, 4096 - HEADER];
        let mut wal = fresh(dir.path());
        assert_eq!(std::fs::metadata(&path).unwrap().len(), RING);
        let mut last = WalPos::default();
        for (i, &n) in sizes.iter().enumerate() {
            last = wal.append(&payload(i as u8, n)).unwrap();
        }
        assert_eq!(
            last,
            WalPos {
                lsn: 3,
                end: 4096 + 8192 + 4096
            }
        );
        drop(wal);

        // The existing length wins over the size asked for.
        let mut wal = Wal::open(&path, 2 * RING).unwrap();
        assert_eq!(wal.size(), RING);
        let frames = wal.recover(WalPos::default()).unwrap();
        let expected: Vec<_> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| (i as u64 + 1, payload(i as u8, n)))
            .collect();
        assert_eq!(frames, expected);
        assert_eq!(wal.position(), last);
    }

    /// A fresh ring in `dir` holding frames 1–3 of these payload lengths;
    /// returns the file and the position after each frame.
    fn three_frames(dir: &Path, lens: [usize; 3]) -> (PathBuf, [WalPos; 3]) {
        let mut wal = fresh(dir);
        let mut at = [WalPos::default(); 3];
        for (i, len) in lens.into_iter().enumerate() {
            at[i] = wal.append(&payload(i as u8 + 1, len)).unwrap();
        }
        (dir.join("wal"), at)
    }

    #[test]
    fn recover_from_middle() {
        let dir = tempfile::tempdir().unwrap();
        let (_, [first, _, last]) = three_frames(dir.path(), [10, 6000, 20]);

        let mut wal = Wal::open(&dir.path().join("wal"), RING).unwrap();
        let frames = wal.recover(first).unwrap();
        assert_eq!(frames, vec![(2, payload(2, 6000)), (3, payload(3, 20))]);
        assert_eq!(wal.position(), last);
    }

    #[test]
    fn torn_tail_ends_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let (path, [_, second, _]) = three_frames(dir.path(), [10, 5000, 300]);

        // Flip one byte of frame 3's payload.
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let at = second.end % RING + HEADER as u64 + 100;
        let mut byte = [0u8; 1];
        file.read_exact_at(&mut byte, at).unwrap();
        file.write_all_at(&[byte[0] ^ 0xff], at).unwrap();
        drop(file);

        let mut wal = Wal::open(&path, RING).unwrap();
        let frames = wal.recover(WalPos::default()).unwrap();
        assert_eq!(frames, vec![(1, payload(1, 10)), (2, payload(2, 5000))]);
        assert_eq!(wal.position(), second);
        let again = wal.append(&payload(9, 40)).unwrap();
        assert_eq!(
            again,
            WalPos {
                lsn: 3,
                end: second.end + BLOCK
            }
        );
        drop(wal);

        let mut wal = Wal::open(&path, RING).unwrap();
        let frames = wal.recover(second).unwrap();
        assert_eq!(frames, vec![(3, payload(9, 40))]);
    }

    /// A crash tears a long frame: its first block never lands, its later
    /// ones do, and one of them holds bytes that form a valid frame with the
    /// LSN that comes next (a payload can hold anything). The next start
    /// writes a shorter frame in its place; after another crash, recovery
    /// must not take the planted frame. `recover` zeroes what follows the log.
    #[test]
    fn blocks_left_by_a_torn_frame_are_not_taken_later() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wal");
        let mut wal = fresh(dir.path());
        let first = wal.append(&payload(1, 10)).unwrap();
        wal.append(&payload(2, 3 * BLOCK_USIZE)).unwrap();
        drop(wal);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        // The torn frame's header block is lost...
        file.write_all_at(&[0u8; BLOCK_USIZE], first.end % RING)
            .unwrap();
        // ...and its third block holds a frame with LSN 3.
        let mut planted = vec![0u8; BLOCK_USIZE];
        encode(&mut planted, 3, &payload(7, 100));
        let third = first.end + 2 * BLOCK;
        file.write_all_at(&planted, third % RING).unwrap();
        drop(file);

        let mut wal = Wal::open(&path, RING).unwrap();
        assert_eq!(wal.recover(first).unwrap(), vec![]);
        // A short frame 2 ends where the planted frame begins.
        let p2 = payload(8, 2 * BLOCK_USIZE - HEADER);
        let second = wal.append(&p2).unwrap();
        assert_eq!(second.end, third);
        drop(wal);

        let mut wal = Wal::open(&path, RING).unwrap();
        assert_eq!(wal.recover(first).unwrap(), vec![(2, p2)]);
        assert_eq!(wal.position(), second);
    }

    #[test]
    fn corrupt_length_ends_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let (path, [_, second, _]) = three_frames(dir.path(), [10, 20, 30]);

        // Frame 3's length now runs past the end of the file.
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        let at = second.end % RING + 12;
        file.write_all_at(&(RING as u32).to_le_bytes(), at).unwrap();
        drop(file);

        let mut wal = Wal::open(&path, RING).unwrap();
        let frames = wal.recover(WalPos::default()).unwrap();
        assert_eq!(frames, vec![(1, payload(1, 10)), (2, payload(2, 20))]);
        assert_eq!(wal.position(), second);
    }

    /// Frames of 3 blocks in a 16-block ring: frames 1–5 fill offsets 0–60 KiB,
    /// frame 6 does not fit in the last 4 KiB and goes to the next lap's offset
    /// 0; frames 7 and 8 follow it, over frames 2 and 3.
    fn wrapped(dir: &Path) -> Vec<WalPos> {
        let mut wal = fresh(dir);
        let space = wal.space();
        let mut positions = Vec::new();
        for lsn in 1..=8u8 {
            let pos = wal.append(&payload(lsn, 10_000)).unwrap();
            positions.push(pos);
            // Keep the last three frames unreleased, as a slow applier would.
            if lsn >= 4 {
                space.release(positions[usize::from(lsn) - 4].end);
            }
        }
        // Frame 6 wrapped: it starts at the next lap's offset 0.
        assert_eq!(positions[4].end, 5 * 12288);
        assert_eq!(positions[5].end, RING + 12288);
        assert_eq!(positions[7].end, RING + 3 * 12288);
        positions
    }

    #[test]
    fn wrap_to_offset_zero() {
        let dir = tempfile::tempdir().unwrap();
        let positions = wrapped(dir.path());

        let mut wal = Wal::open(&dir.path().join("wal"), RING).unwrap();
        // From after frame 4: frame 5 at the end of lap 0, then 6–8 in lap 1.
        let frames = wal.recover(positions[3]).unwrap();
        let expected: Vec<_> = (5..=8u8)
            .map(|lsn| (u64::from(lsn), payload(lsn, 10_000)))
            .collect();
        assert_eq!(frames, expected);
        assert_eq!(wal.position(), positions[7]);
        // The writer continues in lap 1, after frame 8.
        let next = wal.append(&payload(9, 10)).unwrap();
        assert_eq!(
            next,
            WalPos {
                lsn: 9,
                end: positions[7].end + BLOCK
            }
        );
    }

    #[test]
    fn stale_frames_from_an_earlier_lap_are_not_taken() {
        let dir = tempfile::tempdir().unwrap();
        let positions = wrapped(dir.path());

        // After frame 8 lies frame 4 of lap 0, intact, with a valid CRC; the
        // next lap's offset 0 holds frame 6. Neither is frame 9.
        let mut wal = Wal::open(&dir.path().join("wal"), RING).unwrap();
        assert_eq!(wal.recover(positions[7]).unwrap(), vec![]);
        assert_eq!(wal.position(), positions[7]);
        // And from after frame 3, frame 4 (lap 0) is taken: the stale one is
        // a valid frame, refused for its LSN alone. (On a ring of its own:
        // `recover` zeroed everything after frame 8 in this one.)
        let dir = tempfile::tempdir().unwrap();
        let positions = wrapped(dir.path());
        let mut wal = Wal::open(&dir.path().join("wal"), RING).unwrap();
        let frames = wal.recover(positions[2]).unwrap();
        assert_eq!(frames.len(), 5);
        assert_eq!(frames[0], (4, payload(4, 10_000)));
    }

    #[test]
    fn full_ring_blocks_until_released() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = fresh(dir.path());
        fill(&mut wal);
        assert_eq!(wal.position().end, RING);
        let space = wal.space();

        let (tx, rx) = mpsc::channel();
        let writer = std::thread::spawn(move || {
            let result = wal.append(b"late");
            tx.send(result.map_err(|e| e.to_string())).unwrap();
            wal
        });
        assert_eq!(
            rx.recv_timeout(Duration::from_millis(200)),
            Err(mpsc::RecvTimeoutError::Timeout),
            "append did not wait for space"
        );
        space.release(BLOCK);
        let pos = rx.recv_timeout(Duration::from_secs(10)).unwrap().unwrap();
        assert_eq!(
            pos,
            WalPos {
                lsn: 17,
                end: RING + BLOCK
            }
        );

        let mut wal = writer.join().unwrap();
        let frames = wal.recover(WalPos { lsn: 16, end: RING }).unwrap();
        assert_eq!(frames, vec![(17, b"late".to_vec())]);
    }

    #[test]
    fn too_large_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = fresh(dir.path());
        let max = wal.max_payload();
        assert_eq!(max, RING as usize / 2 - HEADER);
        match wal.append(&vec![1; max + 1]) {
            Err(WalError::TooLarge { bytes, limit }) => {
                assert_eq!((bytes, limit), (max + 1, max));
            }
            other => panic!("expected TooLarge, got {other:?}"),
        }
        assert_eq!(wal.position(), WalPos::default());
        let pos = wal.append(&vec![2; max]).unwrap();
        assert_eq!(
            pos,
            WalPos {
                lsn: 1,
                end: RING / 2
            }
        );
    }

    #[test]
    fn close_fails_a_blocked_append() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = fresh(dir.path());
        fill(&mut wal);
        let space = wal.space();

        let (tx, rx) = mpsc::channel();
        let writer = std::thread::spawn(move || {
            let result = wal.append(b"late");
            tx.send(result.map(|_| ())).unwrap();
            wal
        });
        assert!(matches!(
            rx.recv_timeout(Duration::from_millis(200)),
            Err(mpsc::RecvTimeoutError::Timeout)
        ));
        space.close();
        let result = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert!(matches!(result, Err(WalError::Closed)), "{result:?}");

        // Later appends fail too, even with room.
        let mut wal = writer.join().unwrap();
        space.release(RING);
        assert!(matches!(wal.append(b"x"), Err(WalError::Closed)));
    }

    #[test]
    fn bad_length_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wal");
        std::fs::write(&path, vec![0u8; 5000]).unwrap();
        match Wal::open(&path, RING) {
            Err(WalError::BadLength { len, .. }) => assert_eq!(len, 5000),
            other => panic!("expected BadLength, got {other:?}"),
        }
        std::fs::write(&path, b"").unwrap();
        assert!(matches!(
            Wal::open(&path, RING),
            Err(WalError::BadLength { len: 0, .. })
        ));
    }

    #[test]
    fn buffered_fallback_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wal");
        let mut wal = Wal::open_with(&path, RING, false).unwrap();
        assert!(!wal.direct());
        wal.recover(WalPos::default()).unwrap();
        wal.append(&payload(1, 3)).unwrap();
        let last = wal.append(&payload(2, 9000)).unwrap();
        drop(wal);

        let mut wal = Wal::open(&path, RING).unwrap();
        let frames = wal.recover(WalPos::default()).unwrap();
        assert_eq!(frames, vec![(1, payload(1, 3)), (2, payload(2, 9000))]);
        assert_eq!(wal.position(), last);
    }

    #[test]
    fn new_ring_is_rounded_up() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wal");
        let wal = Wal::open(&path, RING + 1).unwrap();
        assert_eq!(wal.size(), RING + BLOCK);
        let small = dir.path().join("small");
        assert_eq!(Wal::open(&small, 4096).unwrap().size(), MIN_SIZE);
        // No temporary file is left behind.
        let mut names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        assert_eq!(names, ["small", "wal"]);
    }
}
