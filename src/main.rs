//! The `stockd` binary: the command line lives in the library (`stockd::cli`).

use std::process::ExitCode;

/// mimalloc rather than the system allocator: a request, a log record and a replayed
/// record each make many small allocations, and glibc's malloc/free were ~17 % of a
/// reserve's CPU and ~25 % of log replay's (perf; docs/PERFORMANCE.md#decision-mimalloc).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    stockd::cli::main()
}
