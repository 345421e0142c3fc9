//! `train`, `run` and `compare`: training in a run directory, resuming, Ctrl-C, the console.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};

use bnlab::config::RunConfig;
use bnlab::data::FashionMnist;
use bnlab::models::Model;
use bnlab::recipes;
use bnlab::report::{plot, table, write_atomically, write_jsonl, EpochMetrics};
use bnlab::train::checkpoint::{self, METRICS_FILE, MODEL_FILE};
use bnlab::train::{self, Observer, Progress, RunOptions};
use burn::optim::ModuleOptimizer;

use super::args::*;
use super::set_up;

pub(crate) fn default_run_dir(name: &str) -> PathBuf {
    let stamp = chrono::Local::now().format("%Y%m%d-%H%M%S");
    PathBuf::from("runs").join(format!("{name}-{stamp}"))
}

/// Trains as `config` says, saving the run into its directory; returns the metrics.
pub(crate) fn train_and_save(
    config: RunConfig,
    name: &str,
    output: &OutputArgs,
) -> anyhow::Result<Vec<EpochMetrics>> {
    set_up(&output.env)?;
    config.validate()?;
    let dir = output.out.clone().unwrap_or_else(|| default_run_dir(name));
    // Fail on unwritable places before training, not after the first epoch.
    checkpoint::prepare_dir(&dir)?;
    check_metrics_path(output)?;
    let data = FashionMnist::load(&output.env.data)?;
    checkpoint::save_config(&dir, &config)?;
    let model = train::initial_model(&config, &train::train_device())?;
    let optim = train::optim::optimizer(&config);
    let start = (model, optim, Progress::start());
    run_in_dir(&config, name, &data, &dir, output, start)
}

pub(crate) fn check_metrics_path(output: &OutputArgs) -> anyhow::Result<()> {
    if let Some(path) = &output.metrics {
        write_jsonl(path, &[])
            .with_context(|| format!("--metrics {}: cannot write", path.display()))?;
    }
    Ok(())
}

/// `train --resume DIR`: only `--epochs` may change (to extend a run).
pub(crate) fn resume_run(
    dir: &Path,
    run: &RunArgs,
    output: &OutputArgs,
) -> anyhow::Result<Vec<EpochMetrics>> {
    let only_epochs = RunArgs {
        epochs: None,
        ..run.clone()
    };
    if format!("{only_epochs:?}") != format!("{:?}", RunArgs::default()) {
        anyhow::bail!(
            "--resume {}: the run's settings come from its config.json; only --epochs may be given",
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
    let mut resumed = train::resume::load(dir)?;
    if let Some(epochs) = run.epochs {
        resumed.config.epochs = epochs;
        checkpoint::save_config(dir, &resumed.config)?;
    }
    let data = FashionMnist::load(&output.env.data)?;
    let p = &resumed.progress;
    eprintln!(
        "bnlab: resuming {} at epoch {}, step {}",
        dir.display(),
        p.epoch,
        p.steps_done
    );
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let start = (resumed.model, resumed.optim, resumed.progress);
    run_in_dir(&resumed.config, &name, &data, dir, output, start)
}

/// The run stopped at the user's request after saving its resume point.
#[derive(Debug, thiserror::Error)]
#[error("interrupted: progress saved in {0} (continue with: bnlab train --resume {0})")]
pub struct Interrupted(pub String);

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
        metrics_paths: [Some(dir.join(METRICS_FILE)), output.metrics.clone()]
            .into_iter()
            .flatten()
            .collect(),
        dir: dir.to_path_buf(),
        save_every: output.save_every,
        epochs: config.epochs,
        bar: None,
        history: progress.metrics.clone(),
    };
    let stop = stop_on_ctrl_c();
    let options = RunOptions {
        dir: Some(dir),
        stop: Some(stop),
    };
    let outcome = train::run(config, data, model, optim, progress, &options, &mut console)
        .map_err(|e| match train::resume::saved_epochs(dir) {
            Some(done) if e.is::<train::TrainError>() => {
                let kept = dir.join(train::resume::RESUME_DIR);
                anyhow::anyhow!(
                    "{e}; the last good state, after epoch {done}, is kept in {}",
                    kept.display()
                )
            }
            _ => e,
        })?;
    if outcome.interrupted {
        return Err(Interrupted(dir.display().to_string()).into());
    }
    let model_path = dir.join(MODEL_FILE);
    checkpoint::save_model(&outcome.model, &model_path)?;
    eprintln!("bnlab: saved {}", model_path.display());
    Ok(outcome.metrics)
}

/// The first Ctrl-C asks training to stop after the current step (and save); a second one
/// quits at once, which loses nothing saved, since every file is written atomically.
pub(crate) fn stop_on_ctrl_c() -> &'static AtomicBool {
    static STOP: AtomicBool = AtomicBool::new(false);
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    INSTALLED.call_once(|| {
        let _ = ctrlc::set_handler(|| {
            if STOP.swap(true, Ordering::SeqCst) {
                std::process::exit(130);
            }
            eprintln!("\nbnlab: stopping after this step (Ctrl-C again to quit at once)");
        });
    });
    &STOP
}

/// Shows training on the terminal: a progress bar on stderr, one line (or JSON object) per
/// epoch on stdout; writes the metrics files and the per-epoch checkpoints.
pub(crate) struct Console {
    json: bool,
    metrics_paths: Vec<PathBuf>,
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
        for path in &self.metrics_paths {
            write_jsonl(path, &self.history)
                .with_context(|| format!("{}: cannot write the metrics", path.display()))?;
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
    out: &Path,
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
            Ok(config)
        })
        .collect::<anyhow::Result<_>>()?;
    if out.join("comparison.md").exists() {
        anyhow::bail!(
            "--out {}: already holds a comparison; choose another --out",
            out.display()
        );
    }
    std::fs::create_dir_all(out)
        .with_context(|| format!("--out {}: cannot write there", out.display()))?;
    for name in names {
        checkpoint::prepare_dir(&out.join(name))?;
    }
    let data = FashionMnist::load(&env.data)?;
    let mut runs = Vec::new();
    for (name, config) in names.iter().zip(configs) {
        let dir = out.join(name);
        checkpoint::save_config(&dir, &config)?;
        let output = OutputArgs {
            env: env.clone(),
            json: false,
            metrics: None,
            out: Some(dir.clone()),
            save_every: None,
        };
        let model = train::initial_model(&config, &train::train_device())?;
        let start = (model, train::optim::optimizer(&config), Progress::start());
        let metrics = run_in_dir(&config, name, &data, &dir, &output, start)?;
        runs.push((name.clone(), metrics));
    }
    let markdown = table::markdown(&runs);
    let table_path = out.join("comparison.md");
    write_atomically(&table_path, markdown.as_bytes())
        .with_context(|| format!("{}: cannot write", table_path.display()))?;
    let [svg, png] = plot::write_curves(&runs, &out.join("curves"))?;
    println!("{markdown}");
    eprintln!(
        "bnlab: wrote {}, {} and {}",
        table_path.display(),
        svg.display(),
        png.display()
    );
    Ok(())
}
