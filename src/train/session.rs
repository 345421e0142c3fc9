//! A run in a directory of its own, as `bnlab train`, `run`, `compare` and `train --resume`
//! drive it: the directory created and held ([`RunDir`]), the model trained with its metrics
//! and checkpoints written after every epoch, a stopped run resumed, and after divergence the
//! last good model kept where `eval`, `export` and `inspect` open it. What a caller shows
//! (progress, one line per epoch) is its [`Observer`]'s business.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use anyhow::Context;
use burn::optim::ModuleOptimizer;

use super::checkpoint::{self, LAST_GOOD_FILE, METRICS_FILE, MODEL_FILE, RESUME_DIR};
use super::rundir::{first_result, RunDir};
use super::{initial_model, optim, resume, train_device, Observer, Progress, RunOptions};
use crate::config::RunConfig;
use crate::data::FashionMnist;
use crate::models::Model;
use crate::report::{check_output, metrics, plot, table, write_atomically, write_jsonl};
use crate::report::{write_output, EpochMetrics};

/// What a run writes besides its directory's own files.
#[derive(Debug, Clone, Default)]
pub struct Outputs {
    /// A copy of the per-epoch metrics (`--metrics FILE`).
    pub metrics: Option<PathBuf>,
    /// Whether an existing regular file at `metrics` may be replaced (`--force`).
    pub force: bool,
    /// Also save the model every N epochs, as `DIR/epoch-NNN.bpk`.
    pub save_every: Option<usize>,
}

impl Outputs {
    /// Refuses, before any work, an output that would replace what it must not.
    pub fn check(&self) -> anyhow::Result<()> {
        match &self.metrics {
            Some(path) => check_output("--metrics", path, self.force),
            None => Ok(()),
        }
    }
}

/// How a run ended.
#[derive(Debug)]
pub struct Finished {
    /// The run directory.
    pub dir: PathBuf,
    /// Every finished epoch's metrics, those before a resume included.
    pub metrics: Vec<EpochMetrics>,
    /// It stopped at the caller's request (`stop`) with a resume point saved.
    pub interrupted: bool,
}

/// Where a session reads its data and what it writes and watches.
pub struct Session<'a> {
    /// The Fashion-MNIST directory.
    pub data_dir: &'a Path,
    /// Files written besides the run directory's.
    pub outputs: Outputs,
    /// Shown what happens (progress, epochs).
    pub observer: &'a mut dyn Observer,
    /// Set to finish the current step, save a resume point and return.
    pub stop: Option<&'a AtomicBool>,
}

impl Session<'_> {
    /// Trains `config` in a new run directory: `out`, or a fresh `runs/NAME-TIME`. A failed
    /// start removes the directory it made.
    pub fn start(
        &mut self,
        config: &RunConfig,
        name: &str,
        out: Option<&Path>,
    ) -> anyhow::Result<Finished> {
        config.validate()?;
        // Fail on unwritable places before training, not after the first epoch.
        self.outputs.check()?;
        let run = match out {
            Some(dir) => RunDir::create(dir)?,
            None => RunDir::create_unique(Path::new("runs"), name)?,
        };
        let dir = run.path();
        let trained = FashionMnist::load(self.data_dir)
            .map_err(anyhow::Error::from)
            .and_then(|data| {
                // The model first: weights --init refuses leave no config.json behind.
                let model = initial_model(config, &train_device())?;
                checkpoint::save_config(dir, config)?;
                let start = (model, optim::optimizer(config), Progress::start());
                self.run_in(config, name, &data, dir, start)
            });
        if trained.is_err() {
            run.remove_if_unused();
        }
        trained
    }

    /// Continues the run in `dir` where it stopped; `epochs` may extend it and `lr` lower its
    /// learning rate. A run stopped before its first resume point starts again in place.
    pub fn resume(
        &mut self,
        dir: &Path,
        epochs: Option<usize>,
        lr: Option<f64>,
    ) -> anyhow::Result<Finished> {
        self.outputs.check()?;
        let held = RunDir::open(dir)?;
        let dir = held.path();
        let (mut config, model, optim, progress) = if resume::has_resume_point(dir) {
            let r = resume::load(dir)?;
            (r.config, r.model, r.optim, r.progress)
        } else {
            // There is no progress to lose, so the run starts again from its config.json,
            // unless something there would be replaced (a run from before resume points).
            if let Some(file) = first_result(dir) {
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
            let model = initial_model(&config, &train_device())?;
            let optim = optim::optimizer(&config);
            (config, model, optim, Progress::start())
        };
        let done = progress.metrics.len();
        if let Some(epochs) = epochs {
            if epochs < done {
                anyhow::bail!(
                    "--epochs {epochs}: {} has already finished {done} epochs; give --epochs \
                     {done} or more",
                    dir.display()
                );
            }
            config.epochs = epochs;
        }
        if let Some(lr) = lr {
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
        if epochs.is_some() || lr.is_some() {
            checkpoint::save_config(dir, &config)?;
        }
        let data = FashionMnist::load(self.data_dir)?;
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
        self.run_in(&config, &name, &data, dir, (model, optim, progress))
    }

    /// Trains each `(label, config)` in a directory of its own under `out` (or a fresh
    /// `runs/compare-TIME`), then writes `comparison.md` and the curves (`curves.svg`,
    /// `curves.png`) there, replacing them only if `force`. Returns the directory and the table.
    pub fn compare(
        &mut self,
        configs: &[(String, RunConfig)],
        out: Option<&Path>,
        force: bool,
    ) -> anyhow::Result<(PathBuf, String)> {
        for (name, config) in configs {
            config
                .validate()
                .with_context(|| format!("recipe {name}"))?;
        }
        // Held like a run directory, so that two comparisons do not share one.
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
        // A recipe named twice gets a second directory (lenet, lenet-2).
        let mut labels: Vec<String> = Vec::new();
        for (name, _) in configs {
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
        let data = FashionMnist::load(self.data_dir)?;
        let mut runs = Vec::new();
        for ((label, (_, config)), held) in labels.iter().zip(configs).zip(&run_dirs) {
            let dir = held.path();
            let model = initial_model(config, &train_device())?;
            checkpoint::save_config(dir, config)?;
            let start = (model, optim::optimizer(config), Progress::start());
            let finished = self.run_in(config, label, &data, dir, start)?;
            if finished.interrupted {
                return Ok((finished.dir, String::new()));
            }
            runs.push((label.clone(), finished.metrics));
        }
        let markdown = table::markdown(&runs);
        write_output("--out", &table_path, markdown.as_bytes(), force)?;
        plot::write_curves(&runs, &stem, "--out", force)?;
        Ok((out.to_path_buf(), markdown))
    }

    /// Trains in `dir` from `start` to the end of `config.epochs`, writing the metrics and
    /// checkpoints after every epoch and the final model at the end.
    fn run_in(
        &mut self,
        config: &RunConfig,
        name: &str,
        data: &FashionMnist,
        dir: &Path,
        (model, optim, progress): (Model, ModuleOptimizer, Progress),
    ) -> anyhow::Result<Finished> {
        self.observer.run_started(name, config, dir);
        let mut files = RunFiles {
            inner: &mut *self.observer,
            run_metrics: dir.join(METRICS_FILE),
            // The user's file may be replaced once this run has written it, or with --force.
            user_metrics: self
                .outputs
                .metrics
                .clone()
                .map(|p| (p, self.outputs.force)),
            dir: dir.to_path_buf(),
            save_every: self.outputs.save_every,
            history: progress.metrics.clone(),
        };
        let options = RunOptions {
            dir: Some(dir),
            stop: self.stop,
        };
        let outcome = super::run(config, data, model, optim, progress, &options, &mut files)
            .map_err(|e| match e.is::<super::TrainError>() {
                true => anyhow::anyhow!("{e}{}", keep_last_good(dir)),
                false => e,
            })?;
        if !outcome.interrupted {
            let model_path = dir.join(MODEL_FILE);
            checkpoint::save_model(&outcome.model, &model_path)?;
            eprintln!("bnlab: saved {}", model_path.display());
        }
        Ok(Finished {
            dir: dir.to_path_buf(),
            metrics: outcome.metrics,
            interrupted: outcome.interrupted,
        })
    }
}

/// After divergence: copies the model of the last resume point to `DIR/last-good.bpk`, where
/// `eval`, `export` and `inspect` open it, and says how to continue.
fn keep_last_good(dir: &Path) -> String {
    let Some((saved, at)) = resume::saved_model(dir) else {
        return String::new();
    };
    let kept = dir.join(LAST_GOOD_FILE);
    let copied = std::fs::read(&saved)
        .map_err(anyhow::Error::from)
        .and_then(|bytes| Ok(write_atomically(&kept, &bytes)?));
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
            dir.join(RESUME_DIR).display(),
            kept.display()
        ),
    }
}

/// Writes the run's files after each epoch, then lets the caller's observer show it.
struct RunFiles<'a> {
    inner: &'a mut dyn Observer,
    run_metrics: PathBuf,
    /// `--metrics FILE`, and whether a regular file there may be replaced.
    user_metrics: Option<(PathBuf, bool)>,
    dir: PathBuf,
    save_every: Option<usize>,
    history: Vec<EpochMetrics>,
}

impl Observer for RunFiles<'_> {
    fn epoch_started(&mut self, epoch: usize, steps: usize) {
        self.inner.epoch_started(epoch, steps);
    }

    fn step_done(&mut self) {
        self.inner.step_done();
    }

    fn epoch_done(&mut self, m: &EpochMetrics, model: &Model) -> anyhow::Result<()> {
        self.inner.epoch_done(m, model)?;
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
