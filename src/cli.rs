//! The `bnlab` command line.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use bnlab::data::{FashionMnist, DEFAULT_DATA_DIR};
use bnlab::models::{ModelKind, ModelSpec};
use bnlab::norm::{Convention, NormConfig, NormKind};
use bnlab::report::{write_jsonl, EpochMetrics};
use bnlab::train::{train, Observer, TrainConfig};

#[derive(Parser, Debug)]
#[command(
    name = "bnlab",
    version,
    about = "Batch normalization from scratch in Rust: the d2l chapter's networks on Fashion-MNIST",
    long_about = "Batch normalization written from scratch on Burn (Flex CPU backend), with the \
                  networks and training runs of the batch-norm chapter of Dive into Deep Learning, \
                  on the real Fashion-MNIST (Debian package dataset-fashion-mnist)."
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Train a model on Fashion-MNIST, reporting loss and accuracy per epoch.
    Train(TrainArgs),
}

#[derive(Args, Debug)]
struct TrainArgs {
    /// Network to train.
    #[arg(long, value_enum, default_value = "lenet-bn")]
    model: ModelKind,
    /// Batch norm implementation: this project's (scratch), Burn's built-in (burn), or none.
    #[arg(long, value_enum, default_value = "scratch")]
    norm: NormKind,
    /// Batch norm's eps, added to the variance before the square root (> 0).
    #[arg(long, default_value_t = 1e-5, value_parser = positive_float)]
    bn_eps: f64,
    /// Batch norm's momentum, read by --bn-convention, or "cumulative" for a cumulative
    /// average [default: 0.1 for pytorch, 0.9 for d2l].
    #[arg(long, value_name = "M|cumulative", value_parser = momentum, allow_negative_numbers = true)]
    bn_momentum: Option<Momentum>,
    /// How running statistics move: pytorch (momentum weighs the new batch, unbiased variance)
    /// or d2l (momentum weighs the old value, biased variance).
    #[arg(long, value_enum, default_value = "pytorch")]
    bn_convention: Convention,
    /// Number of passes over the training set.
    #[arg(long, default_value_t = 10, value_parser = at_least_one)]
    epochs: usize,
    /// Learning rate of mini-batch SGD (> 0).
    #[arg(long, default_value_t = 1.0, value_parser = positive_float, allow_negative_numbers = true)]
    lr: f64,
    /// Examples per mini-batch (≥ 1; ≥ 2 with batch norm).
    #[arg(long, default_value_t = 256, value_parser = at_least_one)]
    batch_size: usize,
    /// Directory holding the Fashion-MNIST IDX files (.gz or plain).
    #[arg(long, value_name = "DIR", default_value = DEFAULT_DATA_DIR)]
    data: PathBuf,
    /// Seed for weight initialisation and shuffling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Worker threads for the CPU backend [default: all cores].
    #[arg(long, value_parser = at_least_one)]
    threads: Option<usize>,
    /// Print only JSON lines on stdout, one object per epoch.
    #[arg(long)]
    json: bool,
    /// Also write the per-epoch JSON lines to FILE (rewritten atomically after each epoch).
    #[arg(long, value_name = "FILE")]
    metrics: Option<PathBuf>,
    /// Stop each epoch after N training batches and N test batches (quick runs).
    #[arg(long, value_name = "N", value_parser = at_least_one)]
    limit_batches: Option<usize>,
    /// Visit the training set in file order instead of shuffling it.
    #[arg(long)]
    no_shuffle: bool,
}

/// The name a value has on the command line.
fn value_name(v: impl clap::ValueEnum) -> String {
    v.to_possible_value()
        .map(|p| p.get_name().to_string())
        .unwrap_or_default()
}

fn positive_float(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|_| format!("'{s}' is not a number"))?;
    if v.is_finite() && v > 0.0 {
        Ok(v)
    } else {
        Err(format!("must be > 0, got {s}"))
    }
}

/// A `--bn-momentum` value: a weight in [0, 1], or a cumulative average.
#[derive(Debug, Clone, Copy)]
enum Momentum {
    Weight(f64),
    Cumulative,
}

fn momentum(s: &str) -> Result<Momentum, String> {
    if s == "cumulative" {
        return Ok(Momentum::Cumulative);
    }
    let v: f64 = s
        .parse()
        .map_err(|_| format!("'{s}' is neither a number nor \"cumulative\""))?;
    if (0.0..=1.0).contains(&v) {
        Ok(Momentum::Weight(v))
    } else {
        Err(format!("must be within [0, 1], got {s}"))
    }
}

fn at_least_one(s: &str) -> Result<usize, String> {
    let v: usize = s
        .parse()
        .map_err(|_| format!("'{s}' is not a whole number"))?;
    if v >= 1 {
        Ok(v)
    } else {
        Err(format!("must be at least 1, got {s}"))
    }
}

/// Parses the command line; a usage error becomes one line on stderr and exit code 2.
pub fn parse() -> Cli {
    match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(), // --help and --version
        Err(e) => {
            eprintln!("bnlab: {}", one_line(&e.render().to_string()));
            std::process::exit(2);
        }
    }
}

/// Folds clap's multi-line message into one line, without the "try --help" tail.
fn one_line(message: &str) -> String {
    message
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("For more information"))
        .filter(|l| !l.starts_with("Usage:"))
        .collect::<Vec<_>>()
        .join("; ")
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Train(args) => train_command(args),
    }
}

fn set_threads(threads: Option<usize>) -> anyhow::Result<()> {
    if let Some(n) = threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .context("--threads: cannot set up the thread pool")?;
    }
    Ok(())
}

fn norm_config(args: &TrainArgs) -> NormConfig {
    let momentum = match (args.bn_momentum, args.bn_convention) {
        (Some(Momentum::Weight(m)), _) => Some(m),
        (Some(Momentum::Cumulative), _) => None,
        (None, Convention::PyTorch) => Some(0.1),
        (None, Convention::D2l) => Some(0.9),
    };
    NormConfig {
        kind: args.norm,
        eps: args.bn_eps,
        momentum,
        convention: args.bn_convention,
    }
}

fn train_command(args: TrainArgs) -> anyhow::Result<()> {
    set_threads(args.threads)?;
    let config = TrainConfig {
        model: ModelSpec {
            kind: args.model,
            norm: norm_config(&args),
        },
        epochs: args.epochs,
        lr: args.lr,
        batch_size: args.batch_size,
        seed: args.seed,
        shuffle: !args.no_shuffle,
        limit_batches: args.limit_batches,
    };
    config.validate()?;
    if let Some(path) = &args.metrics {
        // Fail before training, not after the first epoch.
        write_jsonl(path, &[])
            .with_context(|| format!("--metrics {}: cannot write", path.display()))?;
    }
    let data = FashionMnist::load(&args.data)?;
    eprintln!(
        "bnlab: training {} (norm {}) on {} images, testing on {}, {} epochs, lr {}, batch {}, {} threads",
        value_name(args.model),
        value_name(args.norm),
        data.train.len(),
        data.test.len(),
        args.epochs,
        args.lr,
        args.batch_size,
        rayon::current_num_threads(),
    );
    let mut observer = Console {
        json: args.json,
        metrics_path: args.metrics,
        epochs: args.epochs,
        ..Default::default()
    };
    train(&config, &data, &mut observer)?;
    Ok(())
}

/// Shows training on the terminal: a progress bar on stderr, one line (or JSON object) per
/// epoch on stdout, and the metrics file.
#[derive(Default)]
struct Console {
    json: bool,
    metrics_path: Option<PathBuf>,
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

    fn epoch_done(&mut self, m: &EpochMetrics) -> anyhow::Result<()> {
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
        if let Some(path) = &self.metrics_path {
            write_jsonl(path, &self.history)
                .with_context(|| format!("--metrics {}: cannot write", path.display()))?;
        }
        Ok(())
    }
}
