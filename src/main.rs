//! The `meterd` binary: parse arguments and hand them to [`meterd::cli::main`].

use clap::Parser;

fn main() -> std::process::ExitCode {
    limit_malloc_arenas();
    meterd::cli::main(meterd::cli::Cli::parse())
}

/// One glibc malloc arena for the whole process (issue 15, memory): by default glibc gives each thread that
/// allocates concurrently an arena of its own (up to 8 per core), and each arena keeps its own freed memory, so
/// the tokio workers, the blocking readers and the journal writer each held their own high-water mark. Measured
/// at 256 connections: peak RSS 28.3-28.5 MB with one arena against 32.2-32.6 MB by default (docs/performance.md,
/// ingest-speed). `MALLOC_ARENA_MAX` in the environment still decides when it is set.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn limit_malloc_arenas() {
    use std::ffi::c_int;
    unsafe extern "C" {
        fn mallopt(param: c_int, value: c_int) -> c_int;
    }
    /// glibc's `M_ARENA_MAX` (malloc.h).
    const M_ARENA_MAX: c_int = -8;
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets a tuning parameter of glibc's allocator; it is called before any other thread
        // exists, and a refused value (a return of 0) leaves the default in force.
        unsafe {
            mallopt(M_ARENA_MAX, 1);
        }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn limit_malloc_arenas() {}
