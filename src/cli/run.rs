//! `train`, `run` and `compare` on the terminal: the library's [`Session`] does the work; here
//! are the flags it takes, the signals that stop it and the console that shows it.

use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};

use bnlab::config::RunConfig;
use bnlab::models::Model;
use bnlab::recipes;
use bnlab::report::EpochMetrics;
use bnlab::train::session::{Finished, Outputs, Session};
use bnlab::train::Observer;

use super::args::*;
use super::set_up;

/// Trains as `config` says, saving the run into its directory; returns the metrics.
pub(crate) fn train_and_save(
    config: RunConfig,
    name: &str,
    output: &OutputArgs,
) -> anyhow::Result<Vec<EpochMetrics>> {
    set_up(&output.env)?;
    let mut console = Console::new(output.json);
    let finished = session(&output.env, outputs(output), &mut console).start(
        &config,
        name,
        output.out.as_deref(),
    )?;
    interrupted_is_an_error(finished)
}

/// `train --resume DIR`: `--epochs` may extend the run and `--lr` lower its learning rate.
pub(crate) fn resume_run(
    dir: &Path,
    run: &RunArgs,
    output: &OutputArgs,
) -> anyhow::Result<Vec<EpochMetrics>> {
    let others = RunArgs {
        epochs: None,
        lr: None,
        ..run.clone()
    };
    if format!("{others:?}") != format!("{:?}", RunArgs::default()) {
        anyhow::bail!(
            "--resume {}: the run's settings come from its config.json; only --epochs and a \
             lower --lr may be given",
            dir.display()
        );
    }
    if output.out.as_ref().is_some_and(|out| out != dir) {
        anyhow::bail!(
            "--resume {} continues in that directory: drop --out",
            dir.display()
        );
    }
    set_up(&output.env)?;
    let mut console = Console::new(output.json);
    let finished =
        session(&output.env, outputs(output), &mut console).resume(dir, run.epochs, run.lr)?;
    interrupted_is_an_error(finished)
}

/// `compare`: every recipe must exist and validate before the first one trains.
pub(crate) fn compare(
    names: &[String],
    run: &RunArgs,
    out: Option<&Path>,
    force: bool,
    env: &EnvArgs,
) -> anyhow::Result<()> {
    set_up(env)?;
    let configs: Vec<(String, RunConfig)> = names
        .iter()
        .map(|name| {
            let config = run.configure(recipes::load(name)?)?;
            config
                .validate()
                .with_context(|| format!("recipe {name}"))?;
            Ok((name.clone(), config))
        })
        .collect::<anyhow::Result<_>>()?;
    let mut console = Console::new(false);
    let (dir, markdown) =
        session(env, Outputs::default(), &mut console).compare(&configs, out, force)?;
    if STOP_SIGNAL.load(Ordering::SeqCst) != 0 {
        return interrupted_is_an_error(Finished {
            dir,
            metrics: Vec::new(),
            interrupted: true,
        })
        .map(|_| ());
    }
    println!("{markdown}");
    eprintln!(
        "bnlab: wrote {}, {}.svg and .png",
        dir.join("comparison.md").display(),
        dir.join("curves").display()
    );
    Ok(())
}

fn outputs(output: &OutputArgs) -> Outputs {
    Outputs {
        metrics: output.metrics.clone(),
        force: output.force,
        save_every: output.save_every,
    }
}

fn session<'a>(env: &'a EnvArgs, outputs: Outputs, console: &'a mut Console) -> Session<'a> {
    Session {
        data_dir: &env.data,
        outputs,
        observer: console,
        stop: Some(stop_on_signals()),
    }
}

/// A run a signal stopped is an [`Interrupted`] error, which exits 128 + the signal.
fn interrupted_is_an_error(finished: Finished) -> anyhow::Result<Vec<EpochMetrics>> {
    if finished.interrupted {
        let signal = STOP_SIGNAL.load(Ordering::SeqCst);
        let dir = finished.dir.display().to_string();
        return Err(Interrupted { dir, signal }.into());
    }
    Ok(finished.metrics)
}

/// The run stopped at the user's request (a signal) after saving its resume point.
#[derive(Debug, thiserror::Error)]
#[error("interrupted: progress saved in {dir} (continue with: bnlab train --resume {dir})")]
pub struct Interrupted {
    pub dir: String,
    /// The signal that asked for it; the exit code is 128 + it, as a shell reports.
    pub signal: i32,
}

/// The signal that asked the run to stop (0 before one came).
static STOP_SIGNAL: AtomicI32 = AtomicI32::new(0);

/// A second signal in this window counts as part of the first: a terminal sends SIGINT to
/// every process of its group, and `timeout -s INT` and some supervisors send two at once.
const QUIT_AFTER: Duration = Duration::from_secs(1);

/// SIGINT (Ctrl-C) and SIGTERM (`kill`, systemd, docker, Slurm) ask training to stop after
/// the current step and save a resume point; another one at least [`QUIT_AFTER`] later quits
/// at once, which loses nothing saved, since every file is written atomically.
pub(crate) fn stop_on_signals() -> &'static AtomicBool {
    use signal_hook::consts::{SIGINT, SIGTERM};
    static STOP: AtomicBool = AtomicBool::new(false);
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    INSTALLED.call_once(|| {
        let Ok(mut signals) = signal_hook::iterator::Signals::new([SIGINT, SIGTERM]) else {
            return; // then the signals keep their default action, as without this
        };
        std::thread::spawn(move || {
            let mut first: Option<Instant> = None;
            for signal in signals.forever() {
                match first {
                    None => {
                        first = Some(Instant::now());
                        STOP_SIGNAL.store(signal, Ordering::SeqCst);
                        STOP.store(true, Ordering::SeqCst);
                        eprintln!(
                            "\nbnlab: stopping after this step (the same signal again, a \
                             second or more from now, quits at once)"
                        );
                    }
                    Some(at) if at.elapsed() >= QUIT_AFTER => std::process::exit(128 + signal),
                    Some(_) => {}
                }
            }
        });
    });
    &STOP
}

/// Shows training on the terminal: which run starts, a progress bar on stderr, and one line
/// (or JSON object) per epoch on stdout.
pub(crate) struct Console {
    json: bool,
    epochs: usize,
    bar: Option<ProgressBar>,
}

impl Console {
    fn new(json: bool) -> Self {
        Self {
            json,
            epochs: 0,
            bar: None,
        }
    }
}

impl Observer for Console {
    fn run_started(&mut self, name: &str, config: &RunConfig, dir: &Path) {
        self.epochs = config.epochs;
        eprintln!(
            "bnlab: {name}: {} (norm {}), {} epochs, {} lr {}, batch {}, {} threads -> {}",
            config.model,
            config.norm_config().name(),
            config.epochs,
            config.optimizer,
            config.lr,
            config.batch_size,
            rayon::current_num_threads(),
            dir.display(),
        );
    }

    fn epoch_started(&mut self, epoch: usize, steps: usize) {
        // indicatif draws nothing when stderr is not a terminal.
        let bar = ProgressBar::new(steps as u64);
        bar.set_style(
            ProgressStyle::with_template("epoch {msg} [{bar:30}] {pos}/{len} batches, {eta} left")
                .expect("valid template")
                .progress_chars("=> "),
        );
        bar.set_message(format!("{epoch}/{}", self.epochs));
        self.bar = Some(bar);
    }

    fn step_done(&mut self) {
        if let Some(bar) = &self.bar {
            bar.inc(1);
        }
    }

    fn epoch_done(&mut self, m: &EpochMetrics, _model: &Model) -> anyhow::Result<()> {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        let line = if self.json {
            m.json()
        } else {
            m.line(self.epochs)
        };
        let mut out = std::io::stdout().lock();
        writeln!(out, "{line}")
            .and_then(|_| out.flush())
            .context("cannot write to stdout")
    }
}
