mod cli;

use std::process::ExitCode;

fn main() -> ExitCode {
    // A closed pipe ends bnlab quietly, as it ends other Unix tools (`bnlab inspect | head`),
    // instead of a panic in println!.
    // SAFETY: called before any other thread exists; SIG_DFL is a valid disposition.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
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
