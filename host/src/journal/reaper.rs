//! Frees the embedded store's flushed memtables on a thread of their own.
//!
//! fjall drops a memtable once it is flushed, when it retires the version that
//! held it, and it does so holding that keyspace's version lock (lsm-tree's
//! `SuperVersions::maintenance`). Freeing a full 64 MiB memtable, hundreds of
//! thousands of entries, took 90–115 ms here, and every commit that writes to
//! that keyspace waited for the lock meanwhile: the longest stall of the 202 at
//! half rate (docs/benchmarks.md). So this thread keeps a reference to every
//! memtable it sees become active. fjall's drop then only decrements a count,
//! and the memory is freed here, once this thread holds the last reference, with
//! no lock held.

use std::any::Any;
use std::sync::Arc;
use std::time::Duration;

/// Anything whose last reference the reaper may drop (a memtable).
pub(super) type Held = Arc<dyn Any + Send + Sync>;

/// How often the reaper looks. A memtable is active for far longer than this
/// (filling 64 MiB takes over a second at full load), so none slips through;
/// one that did would only be freed by fjall, as before.
pub(super) const INTERVAL: Duration = Duration::from_millis(50);

/// The memtables the reaper holds.
#[derive(Default)]
pub(super) struct Reaper {
    held: Vec<Held>,
}

impl Reaper {
    /// Holds the memtables now active that it does not hold yet, and frees
    /// those only it still holds; returns how many it freed.
    pub(super) fn tick(&mut self, active: impl IntoIterator<Item = Held>) -> usize {
        for memtable in active {
            if !self.held.iter().any(|h| Arc::ptr_eq(h, &memtable)) {
                self.held.push(memtable);
            }
        }
        let before = self.held.len();
        // A count of 1 is ours alone: nothing can take a new reference to a
        // memtable the store has let go of.
        self.held.retain(|h| Arc::strong_count(h) > 1);
        before - self.held.len()
    }

    /// How many memtables it holds.
    #[cfg(test)]
    fn holding(&self) -> usize {
        self.held.len()
    }
}

/// Starts the reaper thread. `active` lists the store's active memtables, or
/// `None` once the store is gone, which stops the thread (freeing what it held).
/// `idle`: at idle CPU priority (`priority.rs`), else at `nice` 19.
pub(super) fn spawn(
    idle: bool,
    active: impl FnMut() -> Option<Vec<Held>> + Send + 'static,
) -> std::io::Result<()> {
    let mut active = active;
    std::thread::Builder::new()
        .name("memtable-reaper".into())
        .spawn(move || {
            if !idle || !super::priority::lower_this_thread() {
                lower_priority();
            }
            let mut reaper = Reaper::default();
            while let Some(memtables) = active() {
                let freed = reaper.tick(memtables);
                if freed > 0 {
                    tracing::trace!(freed, "flushed memtables freed");
                }
                std::thread::sleep(INTERVAL);
            }
        })
        .map(drop)
}

/// Freeing is background work: on a busy machine it should yield the CPU to
/// the threads answering requests (`nice` 19, the lowest). Under a minute of
/// full load the server's memory stayed flat with it (docs/benchmarks.md).
fn lower_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: gettid and setpriority take and return integers only. With
    // PRIO_PROCESS, a thread id names that thread alone on Linux; a failure
    // leaves the default priority.
    unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 19);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memtable() -> Held {
        Arc::new(vec![0u8; 16])
    }

    #[test]
    fn a_memtable_is_freed_here_only_after_the_store_lets_go_of_it() {
        let mut reaper = Reaper::default();
        let first = memtable();
        assert_eq!(reaper.tick([first.clone()]), 0);
        assert_eq!(reaper.holding(), 1);
        assert_eq!(Arc::strong_count(&first), 2, "the store's and the reaper's");

        // Rotated: the store holds the sealed one and a new active one.
        let second = memtable();
        assert_eq!(reaper.tick([second.clone()]), 0);
        assert_eq!(reaper.holding(), 2);

        // Flushed: the store drops the sealed memtable, which stays allocated
        // until the reaper's next look.
        let weak = Arc::downgrade(&first);
        drop(first);
        assert!(weak.upgrade().is_some(), "the store's drop did not free it");
        assert_eq!(reaper.tick([second.clone()]), 1);
        assert!(weak.upgrade().is_none(), "freed by the reaper");
        assert_eq!(reaper.holding(), 1);
    }

    #[test]
    fn a_memtable_seen_again_is_held_once() {
        let mut reaper = Reaper::default();
        let active = memtable();
        for _ in 0..3 {
            reaper.tick([active.clone()]);
        }
        assert_eq!(reaper.holding(), 1);
        assert_eq!(Arc::strong_count(&active), 2);
    }

    #[test]
    fn the_thread_stops_and_lets_go_when_the_store_is_gone() {
        let active = memtable();
        let (done, stopped) = std::sync::mpsc::channel();
        let mut store = Some(active.clone());
        spawn(true, move || match store.take() {
            Some(m) => Some(vec![m]),
            None => {
                let _ = done.send(());
                None
            }
        })
        .expect("the thread starts");
        stopped
            .recv_timeout(Duration::from_secs(10))
            .expect("the reaper looked twice");
        // Still in use here, so not freed on a tick: let go as the thread ends.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while Arc::strong_count(&active) > 1 {
            assert!(std::time::Instant::now() < deadline, "still held");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}
