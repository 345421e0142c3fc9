//! Loads a state_dict that PyTorch saved (safetensors) into a bnlab model and writes bnlab's
//! logits on the Fashion-MNIST test set, for `tools/torch_crosscheck.py` to compare with
//! PyTorch's own.
//!
//! ```text
//! cargo run --release --example predict_from_torch -- MODEL FILE.safetensors LOGITS.npy \
//!     [--norm scratch|burn|none] [--resize N] [--limit N] [--data DIR]
//! ```
//!
//! A stand-in until `bnlab eval --weights FILE` exists.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use bnlab::data::{Split, DEFAULT_DATA_DIR};
use bnlab::interop::torch::import_file;
use bnlab::interop::{npy, predict};
use bnlab::models::{ModelKind, ModelSpec};
use bnlab::norm::NormKind;
use clap::ValueEnum;

const USAGE: &str = "usage: predict_from_torch MODEL FILE.safetensors LOGITS.npy \
                     [--norm KIND] [--resize N] [--limit N] [--data DIR]";

fn number(flag: &str, value: Option<String>) -> anyhow::Result<usize> {
    let value = value.with_context(|| format!("{flag} needs a number ({USAGE})"))?;
    value
        .parse()
        .ok()
        .filter(|&n| n > 0)
        .with_context(|| format!("{flag} {value}: give a positive whole number"))
}

fn run() -> anyhow::Result<()> {
    let mut raw = std::env::args().skip(1);
    let mut positional = Vec::new();
    let (mut norm, mut resize, mut limit) = (NormKind::Scratch, None, None);
    let mut data = PathBuf::from(DEFAULT_DATA_DIR);
    while let Some(arg) = raw.next() {
        match arg.as_str() {
            "--norm" => {
                let value = raw.next().context("--norm needs scratch, burn or none")?;
                norm = NormKind::from_str(&value, false)
                    .map_err(|_| anyhow::anyhow!("--norm {value}: use scratch, burn or none"))?;
            }
            "--resize" => resize = Some(number("--resize", raw.next())?),
            "--limit" => limit = Some(number("--limit", raw.next())?),
            "--data" => data = raw.next().context("--data needs a directory")?.into(),
            flag if flag.starts_with("--") => bail!("{flag}: unknown option ({USAGE})"),
            _ => positional.push(arg),
        }
    }
    let [model, file, logits]: [String; 3] = positional
        .try_into()
        .map_err(|_| anyhow::anyhow!("expected MODEL and two paths ({USAGE})"))?;
    let kind = ModelKind::from_str(&model, false).map_err(|_| {
        anyhow::anyhow!("{model}: not a model (lenet, lenet-bn, lenet-gluon, resnet18, densenet)")
    })?;
    let size = resize.unwrap_or(kind.min_image_size().max(28));

    let spec = ModelSpec::of(kind, norm);
    let model = import_file(Path::new(&file), &spec)?;
    let test = Split::load(&data, "t10k")?;
    let predictions = predict(&model, &test, size, 250, limit);
    let n = predictions.len();
    npy::write(Path::new(&logits), &predictions.logits, &[n, 10])?;
    println!(
        "{file}: {} imported; {logits}: logits of {n} test images at {size}x{size}, \
         accuracy {:.4}",
        kind.name(),
        predictions.correct(&test.labels) as f64 / n.max(1) as f64
    );
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("predict_from_torch: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
