//! Run directories: the config, the metrics and the model weights, each written atomically.
//!
//! ```text
//! DIR/config.json      the RunConfig the run used
//! DIR/metrics.jsonl    one JSON object per epoch
//! DIR/model.bpk        the final model (Burn's burnpack format)
//! DIR/epoch-003.bpk    the model after epoch 3 (with --save-every)
//! ```

use std::path::{Path, PathBuf};

use anyhow::Context;
use burn::module::Module;
use burn::store::ModuleRecord;
use burn::tensor::Bytes;

use crate::config::RunConfig;
use crate::models::Model;
use crate::report::write_atomically;

pub const CONFIG_FILE: &str = "config.json";
pub const METRICS_FILE: &str = "metrics.jsonl";
pub const MODEL_FILE: &str = "model.bpk";

pub fn epoch_file(epoch: usize) -> String {
    format!("epoch-{epoch:03}.bpk")
}

/// Creates `dir` for a new run and checks that files can be written in it. A directory that
/// already holds a run is refused, so that nothing of that run is overwritten.
pub fn prepare_dir(dir: &Path) -> anyhow::Result<()> {
    if dir.join(CONFIG_FILE).exists() {
        anyhow::bail!(
            "--out {0}: already holds a run (continue it with bnlab train --resume {0}, or choose \
             another --out)",
            dir.display()
        );
    }
    let fail = || format!("--out {}: cannot write there", dir.display());
    std::fs::create_dir_all(dir).with_context(fail)?;
    tempfile::tempfile_in(dir).with_context(fail)?;
    Ok(())
}

pub fn save_config(dir: &Path, config: &RunConfig) -> anyhow::Result<()> {
    let path = dir.join(CONFIG_FILE);
    let json = serde_json::to_string_pretty(config).expect("config serializes");
    write_atomically(&path, json.as_bytes())
        .with_context(|| format!("{}: cannot write", path.display()))
}

pub fn save_model(model: &Model, path: &Path) -> anyhow::Result<()> {
    // A running statistic's last update can still be pending (Burn's RunningState keeps it per
    // thread until read); `valid()` merges it, so the record holds the current values.
    let bytes = model
        .valid()
        .into_record()
        .into_bytes()
        .map_err(|e| anyhow::anyhow!("{}: cannot encode the model: {e}", path.display()))?;
    write_atomically(path, &bytes).with_context(|| format!("{}: cannot write", path.display()))
}

/// A saved model and the config that built it.
pub struct Checkpoint {
    pub config: RunConfig,
    pub model: Model,
    pub path: PathBuf,
}

/// Loads a checkpoint: a run directory (its final `model.bpk`) or a `.bpk` file inside one.
/// The model is rebuilt from the run's `config.json` on the evaluation device.
pub fn load_checkpoint(path: &Path) -> anyhow::Result<Checkpoint> {
    if !path.exists() {
        anyhow::bail!(
            "{}: no such run directory or checkpoint file",
            path.display()
        );
    }
    let (dir, model_path) = match path.is_dir() {
        true => (path.to_path_buf(), path.join(MODEL_FILE)),
        false => (
            path.parent().unwrap_or(Path::new(".")).to_path_buf(),
            path.to_path_buf(),
        ),
    };
    let config_path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&config_path).with_context(|| {
        format!(
            "{}: cannot read the run's config (is {} a bnlab run?)",
            config_path.display(),
            path.display()
        )
    })?;
    let config: RunConfig = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a bnlab run config", config_path.display()))?;
    config
        .validate()
        .with_context(|| format!("{}", config_path.display()))?;
    let model = load_weights(&config, &model_path)?;
    Ok(Checkpoint {
        config,
        model,
        path: model_path,
    })
}

/// Builds the model `config` describes and loads the weights at `path` into it.
pub fn load_weights(config: &RunConfig, path: &Path) -> anyhow::Result<Model> {
    let bytes = std::fs::read(path)
        .with_context(|| format!("{}: cannot read the checkpoint", path.display()))?;
    let corrupt =
        |e: String| anyhow::anyhow!("{}: truncated or corrupt checkpoint ({e})", path.display());
    let record = ModuleRecord::from_bytes(Bytes::from_bytes_vec(bytes))
        .map_err(|e| corrupt(e.to_string()))?;
    let model = config.model_spec().init(config.seed, &super::eval_device());
    model
        .try_load_record(record)
        .map_err(|e| corrupt(e.to_string()))
}
