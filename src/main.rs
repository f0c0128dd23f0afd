use clap::Parser;

fn main() -> std::process::ExitCode {
    limit_malloc_arenas();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let cli = switchboard::cli::Cli::parse();
    match runtime.block_on(switchboard::cli::run(cli)) {
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
