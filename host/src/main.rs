// glibc's malloc showed as ≈14 % of an ingest profile, much of it arena-lock
// waits between the HTTP workers and the journal writer (docs/benchmarks.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    no_transparent_huge_pages();
    switchyard::cli::main()
}

/// mimalloc asks for transparent huge pages (`MADV_HUGEPAGE`) on its segments,
/// so a thread that touches fresh heap zeroes 2 MiB in one page fault: ≈ 6 ms
/// in a VM, measured on the journal writer, where every request of a group
/// commit waits on it (p99 of the 202 at half rate, docs/benchmarks.md). With
/// 4 KiB pages the same cost is spread thin. Set before any thread starts;
/// children (plugin builds) inherit it, which does them no harm.
fn no_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    // SAFETY: PR_SET_THP_DISABLE takes integer arguments only and touches no
    // memory of ours; a failure (an old kernel) leaves the default in place.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}
