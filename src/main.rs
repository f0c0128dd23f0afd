use clap::Parser;

fn main() -> std::process::ExitCode {
    limit_malloc_arenas();
    return_freed_memory();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let cli = switchboard::cli::Cli::parse();
    let outcome = runtime.block_on(switchboard::cli::run(cli));
    // The log lines still buffered go out before the error line and the exit.
    switchboard::telemetry::flush();
    match outcome {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Caps glibc's malloc at two arenas, before any thread exists, unless `MALLOC_ARENA_MAX` is
/// set (then glibc uses that). By default glibc gives threads up to 8 arenas per core and
/// keeps what they freed: with the worker threads that SQLite's commits and the blocking
/// pool add, the gateway's resident memory under load was 175 MB with the default and 105 MB
/// with two arenas, for the same throughput within noise (docs/BENCHMARKS.md).
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only changes allocator settings; called before any other thread runs.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
    }
}

/// Hands memory that glibc's malloc holds free back to the system every 2 s
/// (`malloc_trim(0)`: top-of-heap trimming plus `MADV_DONTNEED` on free pages inside the
/// heaps). A burst of load leaves large free areas in the arenas that glibc otherwise keeps
/// resident; a trim of an idle heap costs well under a millisecond.
fn return_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let spawned = std::thread::Builder::new().name("malloc-trim".into()).spawn(|| loop {
            std::thread::sleep(std::time::Duration::from_secs(2));
            // SAFETY: malloc_trim only releases free memory; it is thread-safe.
            unsafe {
                libc::malloc_trim(0);
            }
        });
        if let Err(e) = spawned {
            eprintln!("warning: could not start the malloc trim thread: {e}");
        }
    }
}
