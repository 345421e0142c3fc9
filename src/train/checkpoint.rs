//! Run directories: the config, the metrics and the model weights, each written atomically.
//!
//! ```text
//! DIR/config.json      the RunConfig the run used
//! DIR/metrics.jsonl    one JSON object per epoch
//! DIR/model.bpk        the final model (Burn's burnpack format)
//! DIR/epoch-003.bpk    the model after epoch 3 (with --save-every)
//! DIR/last-good.bpk    after divergence: the model of the last resume point
//! ```
//!
//! Every `.bpk` bnlab writes (the optimizer state of a resume point too) ends in a 12-byte
//! seal: the CRC-32 of what precedes it and the tag `bnlab\0ck`, so a damaged block is caught
//! on load. A file without the seal (written before it existed) still loads, unverified.

use std::path::{Path, PathBuf};

use anyhow::Context;
use burn::module::Module;
use burn::store::ModuleRecord;
use burn::tensor::Bytes;

use crate::config::RunConfig;
use crate::models::Model;
use crate::report::write_atomically;

/// A run directory's settings file.
pub const CONFIG_FILE: &str = "config.json";
/// A run directory's metrics file, one JSON object per epoch.
pub const METRICS_FILE: &str = "metrics.jsonl";
/// A run directory's final model.
pub const MODEL_FILE: &str = "model.bpk";
/// The subdirectory of a run directory that holds its resume point.
pub const RESUME_DIR: &str = "resume";
/// The last model a run saved before it diverged: eval, export and inspect open it.
pub const LAST_GOOD_FILE: &str = "last-good.bpk";

/// The name of the model file saved after `epoch` (`--save-every`).
pub fn epoch_file(epoch: usize) -> String {
    format!("epoch-{epoch:03}.bpk")
}

/// Writes `config` to `dir/config.json`, atomically.
pub fn save_config(dir: &Path, config: &RunConfig) -> anyhow::Result<()> {
    let path = dir.join(CONFIG_FILE);
    let json = serde_json::to_string_pretty(config).expect("config serializes");
    write_atomically(&path, json.as_bytes())
        .with_context(|| format!("{}: cannot write", path.display()))
}

/// Writes `model` (its eval-mode record) to `path` in Burn's burnpack format, atomically.
pub fn save_model(model: &Model, path: &Path) -> anyhow::Result<()> {
    // A running statistic's last update can still be pending (Burn's RunningState keeps it per
    // thread until read); `valid()` merges it, so the record holds the current values.
    let bytes = model
        .valid()
        .into_record()
        .into_bytes()
        .map_err(|e| anyhow::anyhow!("{}: cannot encode the model: {e}", path.display()))?;
    write_atomically(path, &seal(&bytes))
        .with_context(|| format!("{}: cannot write", path.display()))
}

const SEAL_TAG: &[u8; 8] = b"bnlab\0ck";
const SEAL_LEN: usize = 4 + SEAL_TAG.len();

/// `bytes` followed by their CRC-32 (little-endian) and the 8-byte tag `bnlab\0ck`.
pub fn seal(bytes: &[u8]) -> Vec<u8> {
    let mut sealed = Vec::with_capacity(bytes.len() + SEAL_LEN);
    sealed.extend_from_slice(bytes);
    sealed.extend_from_slice(&crc32fast::hash(bytes).to_le_bytes());
    sealed.extend_from_slice(SEAL_TAG);
    sealed
}

/// What [`seal`] sealed, if the checksum matches; an unsealed file as it is.
pub fn unseal(mut bytes: Vec<u8>, path: &Path) -> anyhow::Result<Vec<u8>> {
    if bytes.len() < SEAL_LEN || !bytes.ends_with(SEAL_TAG) {
        return Ok(bytes);
    }
    let body = bytes.len() - SEAL_LEN;
    let stored = u32::from_le_bytes(bytes[body..body + 4].try_into().expect("4 bytes"));
    if crc32fast::hash(&bytes[..body]) != stored {
        anyhow::bail!(
            "{}: corrupt checkpoint (its checksum does not match: the file was damaged after \
             bnlab wrote it)",
            path.display()
        );
    }
    bytes.truncate(body);
    Ok(bytes)
}

/// The `config.json` of run directory `dir`, validated.
pub fn load_config(dir: &Path) -> anyhow::Result<RunConfig> {
    let config_path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&config_path).with_context(|| {
        format!(
            "{}: cannot read the run's config (is {} a bnlab run?)",
            config_path.display(),
            dir.display()
        )
    })?;
    let config: RunConfig = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a bnlab run config", config_path.display()))?;
    config
        .validate()
        .with_context(|| format!("{}", config_path.display()))?;
    Ok(config)
}

/// A saved model and the config that built it.
pub struct Checkpoint {
    /// The settings the model was built with.
    pub config: RunConfig,
    /// The model.
    pub model: Model,
    /// The `.bpk` file it was read from.
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
    if path.is_dir() && !path.join(MODEL_FILE).exists() {
        let last_good = path.join(LAST_GOOD_FILE);
        let hint = match last_good.is_file() {
            true => format!(
                "it diverged; its last good model is {}",
                last_good.display()
            ),
            false => format!("continue it with bnlab train --resume {}", path.display()),
        };
        anyhow::bail!(
            "{}: the run has no final {MODEL_FILE} yet ({hint})",
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
    // A resume point's model (DIR/resume/model-E-S.bpk) belongs to the run in DIR.
    let in_resume = dir.file_name() == Some(std::ffi::OsStr::new(RESUME_DIR));
    let dir = match in_resume && !dir.join(CONFIG_FILE).exists() {
        true => dir.parent().unwrap_or(Path::new(".")).to_path_buf(),
        false => dir,
    };
    let config = load_config(&dir)?;
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
    let bytes = unseal(bytes, path)?;
    let record = ModuleRecord::from_bytes(Bytes::from_bytes_vec(bytes)).map_err(|e| {
        anyhow::anyhow!("{}: truncated or corrupt checkpoint ({e})", path.display())
    })?;
    let model = config.model_spec().init(config.seed, &super::eval_device());
    let model = model.try_load_record(record).map_err(|e| {
        // Burn lists every tensor it could not place; the first line says enough.
        let first = e.to_string();
        let first = first.lines().next().unwrap_or_default();
        let first = match first.char_indices().nth(160) {
            Some((cut, _)) => format!("{}…", &first[..cut]),
            None => first.to_string(),
        };
        anyhow::anyhow!(
            "{}: does not fit the model its run config describes ({}, norm {}); it was saved \
             by another run or another bnlab ({first})",
            path.display(),
            config.model,
            config.norm_config().name(),
        )
    })?;
    crate::models::check_weights(&model)
        .map_err(|e| anyhow::anyhow!("{}: unusable weights: {e}", path.display()))?;
    Ok(model)
}
