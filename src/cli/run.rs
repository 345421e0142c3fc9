//! `train`, `run` and `compare`: training in a run directory, resuming, Ctrl-C, the console.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};

use bnlab::config::RunConfig;
use bnlab::data::FashionMnist;
use bnlab::models::Model;
use bnlab::recipes;
use bnlab::report::{check_output, metrics, plot, table, write_jsonl, write_output, EpochMetrics};
use bnlab::train::checkpoint::{self, METRICS_FILE, MODEL_FILE};
use bnlab::train::rundir::RunDir;
use bnlab::train::{self, Observer, Progress, RunOptions};
use burn::optim::ModuleOptimizer;

use super::args::*;
use super::set_up;

/// Trains as `config` says, saving the run into its directory; returns the metrics.
pub(crate) fn train_and_save(
    config: RunConfig,
    name: &str,
    output: &OutputArgs,
) -> anyhow::Result<Vec<EpochMetrics>> {
    set_up(&output.env)?;
    config.validate()?;
    // Fail on unwritable places before training, not after the first epoch.
    check_metrics_path(output)?;
    let run = match &output.out {
        Some(dir) => RunDir::create(dir)?,
        None => RunDir::create_unique(Path::new("runs"), name)?,
    };
    let dir = run.path();
    let trained = FashionMnist::load(&output.env.data)
        .map_err(anyhow::Error::from)
        .and_then(|data| {
            // The model first: weights --init refuses leave no config.json behind.
            let model = train::initial_model(&config, &train::train_device())?;
            checkpoint::save_config(dir, &config)?;
            let optim = train::optim::optimizer(&config);
            let start = (model, optim, Progress::start());
            run_in_dir(&config, name, &data, dir, output, start)
        });
    if trained.is_err() {
        run.remove_if_unused();
    }
    trained
}

pub(crate) fn check_metrics_path(output: &OutputArgs) -> anyhow::Result<()> {
    match &output.metrics {
        Some(path) => check_output("--metrics", path, output.force),
        None => Ok(()),
    }
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
    check_metrics_path(output)?;
    let held = RunDir::open(dir)?;
    let dir = held.path();
    let (mut config, model, optim, progress) = if train::resume::has_resume_point(dir) {
        let r = train::resume::load(dir)?;
        (r.config, r.model, r.optim, r.progress)
    } else {
        // Stopped before its first resume point: there is no progress to lose, so the run
        // starts again in place from its config.json, unless something there would be
        // replaced (a run from before resume points existed, say).
        if let Some(file) = bnlab::train::rundir::first_result(dir) {
            anyhow::bail!(
                "--resume {}: has no resume point to continue from, and starting over would \
                 replace its {file}; train again with another --out",
                dir.display()
            );
        }
        let config = checkpoint::load_config(dir)?;
        eprintln!(
            "bnlab: {} has no resume point yet (it stopped before its first step ended): \
             starting it again from the beginning",
            dir.display()
        );
        let model = train::initial_model(&config, &train::train_device())?;
        let optim = train::optim::optimizer(&config);
        (config, model, optim, Progress::start())
    };
    let done = progress.metrics.len();
    if let Some(epochs) = run.epochs {
        if epochs < done {
            anyhow::bail!(
                "--epochs {epochs}: {} has already finished {done} epochs; give --epochs {done} \
                 or more",
                dir.display()
            );
        }
        config.epochs = epochs;
    }
    if let Some(lr) = run.lr {
        if lr > config.lr {
            anyhow::bail!(
                "--lr {lr}: a resumed run may only lower its learning rate (it is {})",
                config.lr
            );
        }
        eprintln!(
            "bnlab: learning rate {} -> {lr} from epoch {}, step {} on",
            config.lr, progress.epoch, progress.steps_done
        );
        config.lr = lr;
    }
    if run.epochs.is_some() || run.lr.is_some() {
        checkpoint::save_config(dir, &config)?;
    }
    let data = FashionMnist::load(&output.env.data)?;
    eprintln!(
        "bnlab: resuming {} at epoch {}, step {}",
        dir.display(),
        progress.epoch,
        progress.steps_done
    );
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    // The learning rate is not part of the optimizer: train::run schedules it from config.
    run_in_dir(&config, &name, &data, dir, output, (model, optim, progress))
}

/// The run stopped at the user's request (a signal) after saving its resume point.
#[derive(Debug, thiserror::Error)]
#[error("interrupted: progress saved in {dir} (continue with: bnlab train --resume {dir})")]
pub struct Interrupted {
    pub dir: String,
    /// The signal that asked for it; the exit code is 128 + it, as a shell reports.
    pub signal: i32,
}

pub(crate) fn run_in_dir(
    config: &RunConfig,
    name: &str,
    data: &FashionMnist,
    dir: &Path,
    output: &OutputArgs,
    (model, optim, progress): (Model, ModuleOptimizer, Progress),
) -> anyhow::Result<Vec<EpochMetrics>> {
    eprintln!(
        "bnlab: {name}: {} (norm {}), {} epochs, {} lr {}, batch {}, {} threads -> {}",
        config.model,
        config.norm_kind(),
        config.epochs,
        config.optimizer,
        config.lr,
        config.batch_size,
        rayon::current_num_threads(),
        dir.display(),
    );
    let mut console = Console {
        json: output.json,
        run_metrics: dir.join(METRICS_FILE),
        // The user's file may be replaced once this run has written it, or with --force.
        user_metrics: output.metrics.clone().map(|path| (path, output.force)),
        dir: dir.to_path_buf(),
        save_every: output.save_every,
        epochs: config.epochs,
        bar: None,
        history: progress.metrics.clone(),
    };
    let stop = stop_on_signals();
    let options = RunOptions {
        dir: Some(dir),
        stop: Some(stop),
    };
    let outcome = train::run(config, data, model, optim, progress, &options, &mut console)
        .map_err(|e| match e.is::<train::TrainError>() {
            true => anyhow::anyhow!("{e}{}", keep_last_good(dir)),
            false => e,
        })?;
    if outcome.interrupted {
        let signal = STOP_SIGNAL.load(Ordering::SeqCst);
        let dir = dir.display().to_string();
        return Err(Interrupted { dir, signal }.into());
    }
    let model_path = dir.join(MODEL_FILE);
    checkpoint::save_model(&outcome.model, &model_path)?;
    eprintln!("bnlab: saved {}", model_path.display());
    Ok(outcome.metrics)
}

/// After divergence: copies the model of the last resume point to `DIR/last-good.bpk`, where
/// `eval`, `export` and `inspect` open it, and says how to continue.
fn keep_last_good(dir: &Path) -> String {
    let Some((saved, at)) = train::resume::saved_model(dir) else {
        return String::new();
    };
    let kept = dir.join(checkpoint::LAST_GOOD_FILE);
    let copied = std::fs::read(&saved)
        .map_err(anyhow::Error::from)
        .and_then(|bytes| Ok(bnlab::report::write_atomically(&kept, &bytes)?));
    let point = match at.steps_done {
        0 => format!("after epoch {}", at.metrics.len()),
        s => format!("at epoch {}, step {s}", at.epoch),
    };
    match copied {
        Ok(()) => format!(
            "; the last good model, {point}, is saved as {} (continue with bnlab train \
             --resume {} --lr LOWER)",
            kept.display(),
            dir.display()
        ),
        Err(e) => format!(
            "; the last good state, {point}, is kept in {} ({}: {e})",
            dir.join(checkpoint::RESUME_DIR).display(),
            kept.display()
        ),
    }
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

/// Shows training on the terminal: a progress bar on stderr, one line (or JSON object) per
/// epoch on stdout; writes the metrics files and the per-epoch checkpoints.
pub(crate) struct Console {
    json: bool,
    run_metrics: PathBuf,
    /// `--metrics FILE`, and whether a regular file there may be replaced.
    user_metrics: Option<(PathBuf, bool)>,
    dir: PathBuf,
    save_every: Option<usize>,
    epochs: usize,
    bar: Option<ProgressBar>,
    history: Vec<EpochMetrics>,
}

impl Observer for Console {
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

    fn epoch_done(&mut self, m: &EpochMetrics, model: &Model) -> anyhow::Result<()> {
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
            .context("cannot write to stdout")?;
        self.history.push(m.clone());
        write_jsonl(&self.run_metrics, &self.history)
            .with_context(|| format!("{}: cannot write the metrics", self.run_metrics.display()))?;
        if let Some((path, replace)) = &mut self.user_metrics {
            let text = metrics::jsonl(&self.history);
            write_output("--metrics", path, text.as_bytes(), *replace)?;
            *replace = true;
        }
        if self.save_every.is_some_and(|n| m.epoch.is_multiple_of(n)) {
            checkpoint::save_model(model, &self.dir.join(checkpoint::epoch_file(m.epoch)))?;
        }
        Ok(())
    }
}

pub(crate) fn compare(
    names: &[String],
    run: &RunArgs,
    out: Option<&Path>,
    force: bool,
    env: &EnvArgs,
) -> anyhow::Result<()> {
    set_up(env)?;
    // Every recipe must exist and validate before the first one trains.
    let configs: Vec<RunConfig> = names
        .iter()
        .map(|name| {
            let config = run.apply(recipes::load(name)?);
            config
                .validate()
                .with_context(|| format!("recipe {name}"))?;
            run.check_against(&config)?;
            Ok(config)
        })
        .collect::<anyhow::Result<_>>()?;
    // The comparison directory is held like a run directory, so that two comparisons do not
    // share one; a recipe named twice gets a second directory (lenet, lenet-2).
    let held = match out {
        Some(dir) => RunDir::create(dir)?,
        None => RunDir::create_unique(Path::new("runs"), "compare")?,
    };
    let out = held.path();
    let table_path = out.join("comparison.md");
    let stem = out.join("curves");
    for path in [
        &table_path,
        &stem.with_extension("svg"),
        &stem.with_extension("png"),
    ] {
        check_output("--out", path, force)?;
    }
    let mut labels: Vec<String> = Vec::new();
    for name in names {
        let label = (1..)
            .map(|n| match n {
                1 => name.clone(),
                n => format!("{name}-{n}"),
            })
            .find(|l| !labels.contains(l))
            .expect("an unused label");
        labels.push(label);
    }
    let run_dirs = labels
        .iter()
        .map(|label| RunDir::create(&out.join(label)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let data = FashionMnist::load(&env.data)?;
    let mut runs = Vec::new();
    for ((label, config), held) in labels.iter().zip(configs).zip(&run_dirs) {
        let dir = held.path();
        let model = train::initial_model(&config, &train::train_device())?;
        checkpoint::save_config(dir, &config)?;
        let output = OutputArgs {
            env: env.clone(),
            json: false,
            metrics: None,
            out: Some(dir.to_path_buf()),
            save_every: None,
            force: false,
        };
        let start = (model, train::optim::optimizer(&config), Progress::start());
        let metrics = run_in_dir(&config, label, &data, dir, &output, start)?;
        runs.push((label.clone(), metrics));
    }
    let markdown = table::markdown(&runs);
    write_output("--out", &table_path, markdown.as_bytes(), force)?;
    let [svg, png] = plot::write_curves(&runs, &stem, "--out", force)?;
    println!("{markdown}");
    eprintln!(
        "bnlab: wrote {}, {} and {}",
        table_path.display(),
        svg.display(),
        png.display()
    );
    Ok(())
}
