//! What it takes to continue a run exactly where it stopped: the model, the optimizer state,
//! how far the run got (epoch and step) with the partial sums of that epoch, and the metrics so
//! far. The learning-rate schedule and the shuffling need no state of their own: both follow
//! from the epoch number and the seed.
//!
//! ```text
//! DIR/resume/state.json          written last; names the files below
//! DIR/resume/model-E-S.bpk       model after epoch E, step S
//! DIR/resume/optimizer-E-S.bpk   optimizer state at the same point
//! ```
//! Each file is written atomically and `state.json` only after the files it names, so the
//! directory always describes one consistent point; older files are removed afterwards.

use std::path::{Path, PathBuf};

use anyhow::Context;
use burn::module::Module;
use burn::optim::{ModuleOptimizer, OptimizerRecord};
use burn::tensor::Bytes;
use serde::{Deserialize, Serialize};

use super::checkpoint::RESUME_DIR;
use crate::config::RunConfig;
use crate::models::Model;
use crate::report::{write_atomically, EpochMetrics};

const STATE_FILE: &str = "state.json";

/// Sums of an epoch in progress.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Partial {
    /// Cross-entropy summed over the examples seen.
    pub loss_sum: f64,
    /// Examples classified right while training.
    pub correct: usize,
    /// Training examples seen.
    pub seen: usize,
    /// Time spent training so far.
    pub train_seconds: f64,
}

/// Where a run stands.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// The epoch in progress (1-based).
    pub epoch: usize,
    /// How many of its training steps are done.
    pub steps_done: usize,
    /// Its sums so far.
    pub partial: Partial,
    /// Metrics of the finished epochs.
    pub metrics: Vec<EpochMetrics>,
}

impl Progress {
    /// The start of a run: epoch 1, nothing done.
    pub fn start() -> Self {
        Self {
            epoch: 1,
            steps_done: 0,
            partial: Partial::default(),
            metrics: Vec::new(),
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct State {
    progress: Progress,
    model: String,
    optimizer: String,
}

/// Saves the point `progress` describes.
pub fn save(
    dir: &Path,
    progress: &Progress,
    model: &Model,
    optim: &ModuleOptimizer,
) -> anyhow::Result<()> {
    let resume = dir.join(RESUME_DIR);
    std::fs::create_dir_all(&resume)
        .with_context(|| format!("{}: cannot create", resume.display()))?;
    let tag = format!("{:03}-{:05}", progress.epoch, progress.steps_done);
    let model_name = format!("model-{tag}.bpk");
    let optim_name = format!("optimizer-{tag}.bpk");
    super::checkpoint::save_model(model, &resume.join(&model_name))?;
    let optim_bytes = optim
        .to_record()
        .into_bytes()
        .map_err(|e| anyhow::anyhow!("cannot encode the optimizer state: {e}"))?;
    let optim_path = resume.join(&optim_name);
    write_atomically(&optim_path, &super::checkpoint::seal(&optim_bytes))
        .with_context(|| format!("{}: cannot write", optim_path.display()))?;
    let state = State {
        progress: progress.clone(),
        model: model_name.clone(),
        optimizer: optim_name.clone(),
    };
    let state_path = resume.join(STATE_FILE);
    write_atomically(
        &state_path,
        serde_json::to_string_pretty(&state)?.as_bytes(),
    )
    .with_context(|| format!("{}: cannot write", state_path.display()))?;
    // Only now are the older files unneeded.
    for entry in std::fs::read_dir(&resume)?.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        if name.ends_with(".bpk") && name != model_name && name != optim_name {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    Ok(())
}

/// A run brought back: its config, where it stood, its model (on the training device) and
/// its optimizer.
pub struct Resumed {
    /// The run's settings, from its `config.json`.
    pub config: RunConfig,
    /// Where it stood.
    pub progress: Progress,
    /// Its model, on the training device.
    pub model: Model,
    /// Its optimizer, with its state (momentum, Adam's moments).
    pub optim: ModuleOptimizer,
}

/// Loads what [`save`] wrote in run directory `dir`.
pub fn load(dir: &Path) -> anyhow::Result<Resumed> {
    let state_path: PathBuf = dir.join(RESUME_DIR).join(STATE_FILE);
    let text = std::fs::read_to_string(&state_path).with_context(|| {
        format!(
            "{}: cannot read (is {} a bnlab run directory?)",
            state_path.display(),
            dir.display()
        )
    })?;
    let state: State = serde_json::from_str(&text)
        .with_context(|| format!("{}: corrupt resume state", state_path.display()))?;
    let config = super::checkpoint::load_config(dir)?;

    let resume = dir.join(RESUME_DIR);
    // Loading keeps the saved parameter ids, which the optimizer state is keyed by.
    let model = super::checkpoint::load_weights(&config, &resume.join(&state.model))?.train();
    let optim_path = resume.join(&state.optimizer);
    let bytes = std::fs::read(&optim_path)
        .with_context(|| format!("{}: cannot read", optim_path.display()))?;
    let bytes = super::checkpoint::unseal(bytes, &optim_path)?;
    let record = OptimizerRecord::from_bytes(Bytes::from_bytes_vec(bytes)).map_err(|e| {
        anyhow::anyhow!(
            "{}: truncated or corrupt optimizer state ({e})",
            optim_path.display()
        )
    })?;
    let optim = super::optim::optimizer(&config).load_record(record);
    Ok(Resumed {
        config,
        progress: state.progress,
        model,
        optim,
    })
}

fn saved_state(dir: &Path) -> Option<State> {
    let text = std::fs::read_to_string(dir.join(RESUME_DIR).join(STATE_FILE)).ok()?;
    serde_json::from_str(&text).ok()
}

/// How many epochs the saved resume point in `dir` has finished, if there is one.
pub fn saved_epochs(dir: &Path) -> Option<usize> {
    saved_state(dir).map(|state| state.progress.metrics.len())
}

/// `dir` has a resume point (a `state.json`, readable or not).
pub fn has_resume_point(dir: &Path) -> bool {
    dir.join(RESUME_DIR).join(STATE_FILE).exists()
}

/// The model file of the saved resume point in `dir`, and where it stands.
pub fn saved_model(dir: &Path) -> Option<(PathBuf, Progress)> {
    let state = saved_state(dir)?;
    Some((dir.join(RESUME_DIR).join(state.model), state.progress))
}
