//! A plugin's stdout and stderr: kept in memory, only the last bytes.
//!
//! wasmtime-wasi's `MemoryOutputPipe` keeps the *first* bytes and then closes
//! the stream, and a Rust guest whose `println!` finds stdout closed panics
//! ("failed printing to stdout") and aborts: a plugin that printed a few KiB
//! of debug output failed its delivery, with its own output as the "reason".
//! This pipe accepts everything, keeps the tail (where a panic message is) and
//! counts the rest as dropped.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

/// Most bytes one `write` may hand over (a permit, not a cap: the pipe takes
/// any number of writes).
const WRITE_PERMIT: usize = 64 << 10;

/// Output kept in memory: the last `capacity` bytes written.
#[derive(Debug, Clone)]
pub struct TailPipe {
    inner: Arc<Mutex<Tail>>,
}

#[derive(Debug)]
struct Tail {
    capacity: usize,
    /// The last bytes written: up to twice the capacity, so that trimming
    /// the front (a memmove) happens once per `capacity` bytes, not per write.
    buf: Vec<u8>,
    written: u64,
}

impl TailPipe {
    pub fn new(capacity: usize) -> TailPipe {
        TailPipe {
            inner: Arc::new(Mutex::new(Tail {
                capacity,
                buf: Vec::new(),
                written: 0,
            })),
        }
    }

    /// The last bytes written (at most the capacity).
    pub fn contents(&self) -> Vec<u8> {
        let tail = self.lock();
        tail.buf[tail.buf.len().saturating_sub(tail.capacity)..].to_vec()
    }

    /// Forgets what was written (for the next call of a reused instance).
    pub fn clear(&self) {
        let mut tail = self.lock();
        tail.buf.clear();
        tail.written = 0;
    }

    /// How many bytes were written but not kept.
    pub fn dropped(&self) -> u64 {
        let tail = self.lock();
        tail.written - tail.buf.len().min(tail.capacity) as u64
    }

    fn push(&self, bytes: &[u8]) {
        let mut tail = self.lock();
        let capacity = tail.capacity;
        tail.written += bytes.len() as u64;
        if bytes.len() >= capacity {
            // Only this write's own end survives it.
            tail.buf.clear();
            tail.buf.extend_from_slice(&bytes[bytes.len() - capacity..]);
            return;
        }
        if tail.buf.len() + bytes.len() > 2 * capacity {
            let keep = capacity - bytes.len();
            let start = tail.buf.len() - keep.min(tail.buf.len());
            tail.buf.drain(..start);
        }
        tail.buf.extend_from_slice(bytes);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Tail> {
        // A panic while holding the lock leaves the buffer consistent.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl OutputStream for TailPipe {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.push(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(WRITE_PERMIT)
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for TailPipe {
    async fn ready(&mut self) {}
}

impl tokio::io::AsyncWrite for TailPipe {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.push(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl IsTerminal for TailPipe {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for TailPipe {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_last_bytes_and_counts_the_rest() {
        let pipe = TailPipe::new(8);
        pipe.push(b"hello ");
        assert_eq!(pipe.contents(), b"hello ");
        assert_eq!(pipe.dropped(), 0);
        pipe.push(b"world");
        assert_eq!(pipe.contents(), b"lo world");
        assert_eq!(pipe.dropped(), 3);
        // Many small writes: the buffer is trimmed, the tail stays right.
        for _ in 0..10 {
            pipe.push(b"abc");
        }
        assert_eq!(pipe.contents(), b"bcabcabc");
        assert_eq!(pipe.dropped(), 41 - 8);
        // A write longer than the capacity keeps its own end; clones share.
        pipe.clone().push(b"0123456789abc");
        assert_eq!(pipe.contents(), b"56789abc");
        assert_eq!(pipe.dropped(), 54 - 8);
    }
}
