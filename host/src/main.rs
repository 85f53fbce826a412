// glibc's malloc showed as ≈14 % of an ingest profile, much of it arena-lock
// waits between the HTTP workers and the journal writer (docs/benchmarks.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    switchyard::cli::main()
}
