//! The embedded store's background threads run at the lowest CPU priority:
//! fjall's flush and compaction workers and the memtable reaper.
//!
//! They work in bursts: a memtable flush compresses 64 MiB, freeing one takes
//! ≈ 100 ms. On a machine with two cores each burst takes a core for as long
//! as it lasts, and the threads that answer the 202 (the HTTP workers and the
//! journal writer) queue behind it: at half the journal's full load that
//! queueing was a large part of the 202's tail (docs/benchmarks.md, "the load
//! tool's stalls and the background's bursts").
//!
//! `SCHED_IDLE` runs a thread only on CPU time no ordinary thread wants, and
//! an ordinary thread that wakes preempts it at once; RocksDB lowers its
//! compaction pool the same way. Neither is needed for an answer, and if
//! flushes fall behind, fjall stalls the applier, the commit log fills and
//! ingest slows to their pace. Any thread may lower itself; no privilege is
//! needed. Their I/O keeps its ordinary class (see `set_idle`).
//!
//! The applier stays ordinary. Lowered too, it gave the best tail without
//! deliveries, but with a route the deliveries kept the cores busy, the
//! applier starved, the log filled and commits waited for it: full load fell
//! from 25–31k to 17k req/s and the p99 at 8,000 req/s rose from 2–3 to
//! 31–43 ms. `[server] background_priority = "normal"` leaves all of them
//! ordinary (the reaper at `nice` 19), for a machine shared with busy work,
//! beside which idle threads would fall behind.

/// Lowers the calling thread to `SCHED_IDLE`. Returns whether it took.
pub(super) fn lower_this_thread() -> bool {
    #[cfg(target_os = "linux")]
    {
        set_idle(0)
    }
    #[cfg(not(target_os = "linux"))]
    {
        false
    }
}

/// Lowers every thread of this process whose name is `name` (threads that
/// the store's library starts itself); returns how many it lowered.
pub(super) fn lower_threads_named(name: &str) -> usize {
    #[cfg(target_os = "linux")]
    {
        let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
            return 0;
        };
        let mut lowered = 0;
        for task in tasks.flatten() {
            let named = std::fs::read_to_string(task.path().join("comm"))
                .is_ok_and(|comm| comm.trim_end() == name);
            let tid = task.file_name().to_str().and_then(|t| t.parse().ok());
            if let (true, Some(tid)) = (named, tid)
                && set_idle(tid)
            {
                lowered += 1;
            }
        }
        lowered
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = name;
        0
    }
}

/// `ioprio_set`'s "who": one thread (or 0, the calling one).
#[cfg(target_os = "linux")]
const IOPRIO_WHO_PROCESS: libc::c_long = 1;
/// Best effort, level 4: what a thread at `nice` 0 gets by default.
#[cfg(target_os = "linux")]
const IOPRIO_BEST_EFFORT_4: libc::c_long = (2 << 13) | 4;

#[cfg(target_os = "linux")]
fn set_idle(tid: libc::pid_t) -> bool {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is a valid sched_param that outlives the call; on Linux
    // a thread id names that thread alone, and 0 the calling thread.
    let lowered = unsafe { libc::sched_setscheduler(tid, libc::SCHED_IDLE, &param) == 0 };
    // A SCHED_IDLE thread's I/O would fall into the idle I/O class too, and
    // there a table's writes wait behind the log's steady ones until the
    // memtables behind them stall the applier. Only the CPU is lowered: the
    // I/O stays best effort (with the idle class the 202's tail was wider,
    // and full load lower). A failure leaves the class derived from the CPU.
    // SAFETY: ioprio_set takes integers only.
    unsafe {
        libc::syscall(
            libc::SYS_ioprio_set,
            IOPRIO_WHO_PROCESS,
            libc::c_long::from(tid),
            IOPRIO_BEST_EFFORT_4,
        );
    }
    lowered
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    fn policy(tid: libc::pid_t) -> i32 {
        // SAFETY: takes and returns integers only.
        unsafe { libc::sched_getscheduler(tid) }
    }

    /// The thread's I/O class (the top bits of its I/O priority).
    fn io_class(tid: libc::pid_t) -> libc::c_long {
        // SAFETY: takes and returns integers only.
        let prio = unsafe {
            libc::syscall(
                libc::SYS_ioprio_get,
                IOPRIO_WHO_PROCESS,
                libc::c_long::from(tid),
            )
        };
        prio >> 13
    }

    #[test]
    fn a_thread_lowers_itself() {
        let (policy, io_class) = std::thread::spawn(|| {
            assert!(lower_this_thread());
            (policy(0), io_class(0))
        })
        .join()
        .expect("the thread ran");
        assert_eq!(policy, libc::SCHED_IDLE);
        assert_eq!(io_class, 2, "best effort, not the idle I/O class");
    }

    #[test]
    fn threads_are_lowered_by_name_and_others_are_not() {
        let (tids, tid) = std::sync::mpsc::channel();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let spawn = |name: &'static str| {
            let tids = tids.clone();
            let stop = stop.clone();
            std::thread::Builder::new()
                .name(name.into())
                .spawn(move || {
                    // SAFETY: gettid takes nothing and returns an integer.
                    let _ = tids.send((name, unsafe { libc::gettid() }));
                    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                        std::thread::park();
                    }
                })
                .expect("the thread starts")
        };
        let threads = [spawn("prio-test:bg"), spawn("prio-test:fg")];
        let mut named = std::collections::HashMap::new();
        for _ in 0..2 {
            let (name, id) = tid.recv().expect("each thread says who it is");
            named.insert(name, id);
        }
        assert_eq!(lower_threads_named("prio-test:bg"), 1);
        assert_eq!(policy(named["prio-test:bg"]), libc::SCHED_IDLE);
        assert_eq!(policy(named["prio-test:fg"]), libc::SCHED_OTHER);
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        for t in threads {
            t.thread().unpark();
            t.join().expect("the thread ends");
        }
    }
}
