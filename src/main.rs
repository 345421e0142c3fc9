mod cli;

use std::process::ExitCode;

fn main() -> ExitCode {
    // A closed pipe ends bnlab quietly, as it ends other Unix tools (`bnlab inspect | head`),
    // instead of a panic in println!.
    // SAFETY: called before any other thread exists; SIG_DFL is a valid disposition.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    keep_freed_memory();
    let cli = cli::parse();
    match cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is::<cli::Interrupted>() => {
            eprintln!("bnlab: {e}");
            let signal = e.downcast_ref::<cli::Interrupted>().map_or(2, |i| i.signal);
            ExitCode::from(128 + signal.clamp(0, 127) as u8)
        }
        Err(e) => {
            // One line: the error and its causes, joined.
            eprintln!("bnlab: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Training frees and allocates the same large buffers every step. glibc's malloc hands each
/// one above its mmap threshold back to the kernel, which then faults it in again, zeroed, on
/// the next step; kept in the heap, the pages are reused (W5: 8% more examples/s, the same
/// peak RSS; docs/performance.md).
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes malloc's tuning; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}
