mod cli;

use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = cli::parse();
    match cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is::<cli::Interrupted>() => {
            eprintln!("bnlab: {e}");
            ExitCode::from(130)
        }
        Err(e) => {
            // One line: the error and its causes, joined.
            eprintln!("bnlab: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
