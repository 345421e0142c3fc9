//! Exports a trained bnlab run for a PyTorch cross-check: the model as a PyTorch state_dict
//! (safetensors) and bnlab's own logits on the Fashion-MNIST test set (`.npy`).
//!
//! ```text
//! cargo run --release --example export_for_torch -- RUN_DIR OUT.safetensors LOGITS.npy \
//!     [--limit N] [--data DIR]
//! python tools/torch_crosscheck.py OUT.safetensors --logits LOGITS.npy
//! ```
//!
//! A stand-in until `bnlab export` exists; it trains nothing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use bnlab::data::{Split, DEFAULT_DATA_DIR};
use bnlab::interop::torch::{export_with_metadata, META_IMAGE_SIZE};
use bnlab::interop::{npy, predict};
use bnlab::report::write_atomically;
use bnlab::train::checkpoint::load_checkpoint;

const USAGE: &str =
    "usage: export_for_torch RUN_DIR OUT.safetensors LOGITS.npy [--limit N] [--data DIR]";

struct Args {
    checkpoint: PathBuf,
    out: PathBuf,
    logits: PathBuf,
    limit: Option<usize>,
    data: PathBuf,
}

fn parse(mut raw: impl Iterator<Item = String>) -> anyhow::Result<Args> {
    let mut positional = Vec::new();
    let (mut limit, mut data) = (None, PathBuf::from(DEFAULT_DATA_DIR));
    while let Some(arg) = raw.next() {
        match arg.as_str() {
            "--limit" => {
                let value = raw
                    .next()
                    .context("--limit needs a number of test images")?;
                let n: usize =
                    value.parse().ok().filter(|&n| n > 0).with_context(|| {
                        format!("--limit {value}: give a positive whole number")
                    })?;
                limit = Some(n);
            }
            "--data" => data = raw.next().context("--data needs a directory")?.into(),
            flag if flag.starts_with("--") => bail!("{flag}: unknown option ({USAGE})"),
            _ => positional.push(PathBuf::from(arg)),
        }
    }
    let [checkpoint, out, logits]: [PathBuf; 3] = positional
        .try_into()
        .map_err(|_| anyhow::anyhow!("expected three paths ({USAGE})"))?;
    Ok(Args {
        checkpoint,
        out,
        logits,
        limit,
        data,
    })
}

fn run(args: Args) -> anyhow::Result<()> {
    let checkpoint = load_checkpoint(&args.checkpoint)?;
    let config = &checkpoint.config;
    let spec = config.model_spec();
    let size = config.image_size();

    let extra = BTreeMap::from([(META_IMAGE_SIZE.to_string(), size.to_string())]);
    let bytes = export_with_metadata(&checkpoint.model, &spec, &extra)
        .with_context(|| format!("{}", args.out.display()))?;
    write_atomically(&args.out, &bytes)
        .with_context(|| format!("{}: cannot write", args.out.display()))?;

    let test = Split::load(Path::new(&args.data), "t10k")?;
    let predictions = predict(&checkpoint.model, &test, size, 250, args.limit);
    let n = predictions.len();
    npy::write(&args.logits, &predictions.logits, &[n, 10])?;
    println!(
        "{}: {} state_dict, {} bytes; {}: logits of {n} test images at {size}x{size}, \
         accuracy {:.4}",
        args.out.display(),
        spec.kind.name(),
        bytes.len(),
        args.logits.display(),
        predictions.correct(&test.labels) as f64 / n.max(1) as f64
    );
    Ok(())
}

fn main() -> ExitCode {
    match parse(std::env::args().skip(1)).and_then(run) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("export_for_torch: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
