//! The `bnlab` command line.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;
use burn::module::Module;
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use bnlab::config::{BnMomentum, InitKind, OptimizerKind, RunConfig};
use bnlab::data::{FashionMnist, DEFAULT_DATA_DIR};
use bnlab::models::{ActivationKind, Model, ModelKind, ModelSpec, PoolKind, Trace};
use bnlab::norm::{Convention, NormKind};
use bnlab::recipes;
use bnlab::report::{plot, read_jsonl, table, write_atomically, write_jsonl, EpochMetrics};
use bnlab::train::checkpoint::{self, METRICS_FILE, MODEL_FILE};
use bnlab::train::{self, eval_device, evaluate, recalibrate_bn, Observer, Progress, RunOptions};
use bnlab::value_name;
use burn::optim::ModuleOptimizer;

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
    Train {
        #[command(flatten)]
        run: RunArgs,
        #[command(flatten)]
        output: OutputArgs,
        #[command(flatten)]
        resume: ResumeArgs,
    },
    /// Run one of the chapter's experiments by name; any setting can be overridden.
    Run {
        /// Recipe name (see `bnlab recipes`).
        recipe: String,
        #[command(flatten)]
        run: RunArgs,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// List the recipes with what each shows.
    Recipes,
    /// Run several recipes and write a comparison table and training-curve plots.
    Compare {
        /// Recipe names (see `bnlab recipes`).
        #[arg(required = true, num_args = 1..)]
        recipes: Vec<String>,
        #[command(flatten)]
        run: RunArgs,
        /// Directory for the table, the plots and one run directory per recipe
        /// [default: runs/compare-TIME].
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
        #[command(flatten)]
        env: EnvArgs,
    },
    /// Redraw training-curve plots (SVG and PNG) from metrics files.
    Plot {
        /// Metrics files (JSON lines, as `--metrics` and run directories hold).
        #[arg(required = true, num_args = 1..)]
        metrics: Vec<PathBuf>,
        /// Output path without extension: writes STEM.svg and STEM.png.
        #[arg(long, value_name = "STEM", default_value = "curves")]
        out: PathBuf,
    },
    /// Print the output shape of each top-level block of a model for one input image.
    Shapes {
        /// Network whose blocks to show.
        #[arg(value_enum)]
        model: ModelKind,
        /// Input side length [default: 28, or 96 for densenet].
        #[arg(long, value_name = "N", value_parser = at_least_one)]
        resize: Option<usize>,
    },
    /// Evaluate a saved model on the test set.
    #[command(group(clap::ArgGroup::new("source").required(true).args(["checkpoint", "weights"])))]
    Eval {
        /// A run directory (its final model) or a .bpk file inside one.
        #[arg(long, value_name = "PATH")]
        checkpoint: Option<PathBuf>,
        /// A PyTorch state_dict saved as safetensors; the architecture comes from the file's
        /// bnlab metadata, or from --model and the other flags below.
        #[arg(long, value_name = "FILE.safetensors")]
        weights: Option<PathBuf>,
        #[command(flatten)]
        arch: ArchArgs,
        /// Also write the test-set logits (N×10 float32) to FILE.npy.
        #[arg(long, value_name = "FILE.npy")]
        logits: Option<PathBuf>,
        /// Re-estimate the BN statistics over the training set first (precise BN).
        #[arg(long)]
        recalibrate_bn: bool,
        /// Keep BN layers as they are instead of folding them into the conv or linear layer
        /// before them (folding changes no output beyond 1e-5 and is faster).
        #[arg(long)]
        no_fold: bool,
        /// Evaluate only the first N test batches.
        #[arg(long, value_name = "N", value_parser = at_least_one)]
        limit_batches: Option<usize>,
        /// Print the result as one JSON object.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        env: EnvArgs,
    },
    /// Time the chapter's workloads (W1 LeNet-BN training, W4 ResNet-18 steps, W6 one BN
    /// layer, W7 inference, peak memory), as ../shared/bench/torch_bench.py times PyTorch's.
    Bench {
        /// Print one JSON object per workload.
        #[arg(long)]
        json: bool,
        /// Tiny sizes that only check the plumbing (the figures mean nothing).
        #[arg(long)]
        quick: bool,
        /// Run only these workloads (comma-separated: W1,W4,W6,W7,RSS).
        #[arg(long, value_delimiter = ',', value_name = "LIST")]
        only: Vec<String>,
        /// Time W1 and W6 only with these norms (comma-separated) [default: fused,scratch,burn].
        #[arg(long, value_delimiter = ',', value_name = "LIST")]
        norm: Vec<NormKind>,
        #[command(flatten)]
        env: EnvArgs,
    },
    /// Write a saved model as a PyTorch state_dict (safetensors), for load_state_dict.
    Export {
        /// A run directory (its final model) or a .bpk file inside one.
        checkpoint: PathBuf,
        /// The format to write; `torch` is the one there is.
        #[arg(long, value_enum, default_value = "torch")]
        format: ExportFormat,
        /// The file to write.
        #[arg(long, value_name = "FILE.safetensors")]
        out: PathBuf,
    },
    /// Print gamma, beta and the running statistics of each BN layer of a saved model.
    Inspect {
        /// A run directory (its final model) or a .bpk file inside one.
        path: PathBuf,
        /// Print every value instead of a summary.
        #[arg(long)]
        full: bool,
    },
}

/// Settings of a run. Unset ones come from the recipe, or for `train` from the defaults shown.
#[derive(Args, Debug, Default, Clone)]
struct RunArgs {
    /// Network to train [default: lenet-bn].
    #[arg(long, value_enum)]
    model: Option<ModelKind>,
    /// Batch norm: this project's with its fused CPU kernel (fused), the same layer composed
    /// from tensor ops (scratch), Burn's built-in (burn), or none [default: fused].
    #[arg(long, value_enum)]
    norm: Option<NormKind>,
    /// Pooling in LeNet's conv blocks [default: avg].
    #[arg(long, value_enum)]
    pool: Option<PoolKind>,
    /// Activation in LeNet's layers [default: sigmoid].
    #[arg(long, value_enum)]
    activation: Option<ActivationKind>,
    /// Weight initialisation [default: xavier-uniform for LeNet, normal for lenet-gluon,
    /// pytorch-default for resnet18 and densenet].
    #[arg(long, value_enum)]
    weight_init: Option<InitKind>,
    /// Standard deviation of `--weight-init normal` [default: 0.01].
    #[arg(long, value_name = "STD", value_parser = positive_float)]
    init_std: Option<f64>,
    /// Optimizer that updates the weights [default: sgd].
    #[arg(long, value_enum)]
    optimizer: Option<OptimizerKind>,
    /// Learning rate of the optimizer, > 0 [default: 1].
    #[arg(long, value_parser = positive_float, allow_negative_numbers = true)]
    lr: Option<f64>,
    /// Momentum of `--optimizer sgd-momentum`, in [0, 1] [default: 0.9].
    #[arg(long, value_parser = unit_interval, allow_negative_numbers = true)]
    momentum: Option<f64>,
    /// StepLR: multiply the learning rate by --lr-gamma every N epochs [default: off].
    #[arg(long, value_name = "N", value_parser = at_least_one)]
    lr_step_size: Option<usize>,
    /// The factor StepLR multiplies the learning rate by [default: 0.1].
    #[arg(long, value_name = "GAMMA", value_parser = positive_float)]
    lr_gamma: Option<f64>,
    /// Examples per mini-batch, ≥ 1 (≥ 2 with batch norm) [default: 256].
    #[arg(long, value_parser = at_least_one)]
    batch_size: Option<usize>,
    /// Number of passes over the training set [default: 10].
    #[arg(long, value_parser = at_least_one)]
    epochs: Option<usize>,
    /// Resize the 28×28 images to N×N, bilinearly [default: no resize].
    #[arg(long, value_name = "N", value_parser = at_least_one)]
    resize: Option<usize>,
    /// Batch norm's eps, added to the variance before the square root, > 0 [default: 1e-5].
    #[arg(long, value_parser = positive_float)]
    bn_eps: Option<f64>,
    /// Batch norm's momentum, read by --bn-convention, or "cumulative" for a cumulative
    /// average [default: 0.1 for pytorch, 0.9 for d2l].
    #[arg(long, value_name = "M|cumulative", allow_negative_numbers = true)]
    bn_momentum: Option<BnMomentum>,
    /// How running statistics move: pytorch (momentum weighs the new batch, unbiased variance)
    /// or d2l (momentum weighs the old value, biased variance) [default: pytorch].
    #[arg(long, value_enum)]
    bn_convention: Option<Convention>,
    /// Seed for weight initialisation and shuffling [default: 0].
    #[arg(long)]
    seed: Option<u64>,
    /// Visit the training set in file order instead of shuffling it.
    #[arg(long)]
    no_shuffle: bool,
    /// Stop each epoch after N training batches and N test batches (quick runs).
    #[arg(long, value_name = "N", value_parser = at_least_one)]
    limit_batches: Option<usize>,
    /// Re-estimate BN statistics over the training set before each test pass (precise BN).
    #[arg(long)]
    recalibrate_bn: bool,
    /// Start from the weights of a PyTorch state_dict saved as safetensors (see
    /// `bnlab export`) instead of a seeded initialisation.
    #[arg(long, value_name = "FILE.safetensors")]
    init: Option<PathBuf>,
}

impl RunArgs {
    /// `config` with every flag that was given written over it.
    fn apply(&self, mut config: RunConfig) -> RunConfig {
        macro_rules! set {
            ($($field:ident),*) => { $(if let Some(v) = self.$field { config.$field = v; })* };
        }
        macro_rules! set_option {
            ($($field:ident),*) => { $(if self.$field.is_some() { config.$field = self.$field; })* };
        }
        set!(model, init_std, optimizer, lr, momentum, lr_gamma, batch_size, epochs, bn_eps);
        set!(bn_convention, seed);
        set_option!(
            norm,
            pool,
            activation,
            lr_step_size,
            resize,
            bn_momentum,
            limit_batches
        );
        if self.weight_init.is_some() {
            config.init = self.weight_init;
        }
        if self.init.is_some() {
            config.init_weights = self.init.clone();
        }
        config.shuffle &= !self.no_shuffle;
        config.recalibrate_bn |= self.recalibrate_bn;
        config
    }
}

/// The architecture of `eval --weights` when the file does not name it.
#[derive(Args, Debug, Clone, Default)]
struct ArchArgs {
    /// Network the weights belong to (with --weights) [default: the file's, or lenet-bn].
    #[arg(long, value_enum)]
    model: Option<ModelKind>,
    /// Its batch norm (with --weights) [default: the file's, or fused].
    #[arg(long, value_enum)]
    norm: Option<NormKind>,
    /// Its LeNet pooling (with --weights) [default: the file's, or avg].
    #[arg(long, value_enum)]
    pool: Option<PoolKind>,
    /// Its LeNet activation (with --weights) [default: the file's, or sigmoid].
    #[arg(long, value_enum)]
    activation: Option<ActivationKind>,
    /// The image side it expects (with --weights) [default: the file's, or 28].
    #[arg(long, value_name = "N", value_parser = at_least_one)]
    resize: Option<usize>,
}

/// `export --format`
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum ExportFormat {
    /// A PyTorch state_dict of d2l's nn.Sequential definitions, as safetensors.
    Torch,
}

/// Where data comes from and how much of the machine to use.
#[derive(Args, Debug, Clone)]
struct EnvArgs {
    /// Directory holding the Fashion-MNIST IDX files (.gz or plain).
    #[arg(long, value_name = "DIR", default_value = DEFAULT_DATA_DIR)]
    data: PathBuf,
    /// Worker threads for the CPU backend [default: all cores].
    #[arg(long, value_parser = at_least_one)]
    threads: Option<usize>,
    /// Backend that runs the tensors: flex (pure-Rust CPU), wgpu, cuda or libtorch[:N]; all
    /// but flex need a build with the Cargo feature of that name.
    #[arg(long, value_name = "DEVICE", default_value = "flex")]
    device: bnlab::device::DeviceChoice,
}

#[derive(Args, Debug, Clone)]
struct OutputArgs {
    #[command(flatten)]
    env: EnvArgs,
    /// Print only JSON lines on stdout, one object per epoch.
    #[arg(long)]
    json: bool,
    /// Also write the per-epoch JSON lines to FILE (rewritten atomically after each epoch).
    #[arg(long, value_name = "FILE")]
    metrics: Option<PathBuf>,
    /// Run directory for config.json, metrics.jsonl and the model [default: runs/NAME-TIME].
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Also save the model every N epochs (DIR/epoch-NNN.bpk).
    #[arg(long, value_name = "N", value_parser = at_least_one)]
    save_every: Option<usize>,
}

/// `train --resume DIR`: continue a stopped run exactly.
#[derive(Args, Debug, Clone)]
struct ResumeArgs {
    /// Continue the run saved in DIR where it stopped (Ctrl-C, or a finished run with a
    /// larger --epochs); its settings come from DIR/config.json.
    #[arg(long, value_name = "DIR")]
    resume: Option<PathBuf>,
}

fn positive_float(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|_| format!("'{s}' is not a number"))?;
    if v.is_finite() && v > 0.0 {
        Ok(v)
    } else {
        Err(format!("must be > 0, got {s}"))
    }
}

fn unit_interval(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|_| format!("'{s}' is not a number"))?;
    if (0.0..=1.0).contains(&v) {
        Ok(v)
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

/// Folds clap's multi-line message into one line, without the usage and "try --help" tail.
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
        Command::Train {
            run,
            output,
            resume: ResumeArgs { resume: Some(dir) },
        } => resume_run(&dir, &run, &output).map(|_| ()),
        Command::Train {
            run,
            output,
            resume: ResumeArgs { resume: None },
        } => {
            let config = run.apply(RunConfig::default());
            let name = config.model.name();
            train_and_save(config, &name, &output).map(|_| ())
        }
        Command::Run {
            recipe,
            run,
            output,
        } => {
            let config = run.apply(recipes::load(&recipe)?);
            train_and_save(config, &recipe, &output).map(|_| ())
        }
        Command::Recipes => list_recipes(),
        Command::Compare {
            recipes,
            run,
            out,
            env,
        } => {
            let out = out.unwrap_or_else(|| default_run_dir("compare"));
            compare(&recipes, &run, &out, &env)
        }
        Command::Plot { metrics, out } => plot_files(&metrics, &out),
        Command::Shapes { model, resize } => shapes(model, resize),
        Command::Eval {
            checkpoint,
            weights,
            arch,
            logits,
            recalibrate_bn,
            no_fold,
            limit_batches,
            json,
            env,
        } => {
            let options = EvalOptions {
                recalibrate: recalibrate_bn,
                fold: !no_fold,
                limit: limit_batches,
                json,
                logits,
            };
            let source = match (checkpoint, weights) {
                (Some(path), _) => Source::Checkpoint(path),
                (None, Some(path)) => Source::Weights(path, arch),
                (None, None) => unreachable!("clap requires one of them"),
            };
            eval(source, &options, &env)
        }
        Command::Export {
            checkpoint,
            format: ExportFormat::Torch,
            out,
        } => export_torch(&checkpoint, &out),
        Command::Inspect { path, full } => inspect(&path, full),
        Command::Bench {
            json,
            quick,
            only,
            norm,
            env,
        } => bench(json, quick, &only, &norm, &env),
    }
}

/// Applies --threads and --device, before any tensor exists.
fn set_up(env: &EnvArgs) -> anyhow::Result<()> {
    bnlab::device::select(env.device).map_err(anyhow::Error::msg)?;
    if let Some(n) = env.threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .context("--threads: cannot set up the thread pool")?;
    }
    Ok(())
}

fn default_run_dir(name: &str) -> PathBuf {
    let stamp = chrono::Local::now().format("%Y%m%d-%H%M%S");
    PathBuf::from("runs").join(format!("{name}-{stamp}"))
}

/// Trains as `config` says, saving the run into its directory; returns the metrics.
fn train_and_save(
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
    let model = config.initial_model(&train::train_device())?;
    let optim = train::optim::optimizer(&config);
    let start = (model, optim, Progress::start());
    run_in_dir(&config, name, &data, &dir, output, start)
}

fn check_metrics_path(output: &OutputArgs) -> anyhow::Result<()> {
    if let Some(path) = &output.metrics {
        write_jsonl(path, &[])
            .with_context(|| format!("--metrics {}: cannot write", path.display()))?;
    }
    Ok(())
}

/// `train --resume DIR`: only `--epochs` may change (to extend a run).
fn resume_run(dir: &Path, run: &RunArgs, output: &OutputArgs) -> anyhow::Result<Vec<EpochMetrics>> {
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

fn run_in_dir(
    config: &RunConfig,
    name: &str,
    data: &FashionMnist,
    dir: &Path,
    output: &OutputArgs,
    (model, optim, progress): (Model, ModuleOptimizer, Progress),
) -> anyhow::Result<Vec<EpochMetrics>> {
    eprintln!(
        "bnlab: {name}: {} (norm {}), {} epochs, {} lr {}, batch {}, {} threads -> {}",
        config.model.name(),
        value_name(config.norm_kind()),
        config.epochs,
        value_name(config.optimizer),
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
fn stop_on_ctrl_c() -> &'static AtomicBool {
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
struct Console {
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

fn list_recipes() -> anyhow::Result<()> {
    let width = recipes::names().iter().map(|n| n.len()).max().unwrap_or(0);
    for name in recipes::names() {
        let config = recipes::load(name)?;
        println!("{name:width$}  {}", config.description);
    }
    Ok(())
}

fn compare(names: &[String], run: &RunArgs, out: &Path, env: &EnvArgs) -> anyhow::Result<()> {
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
        let model = config.initial_model(&train::train_device())?;
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

fn plot_files(files: &[PathBuf], out: &Path) -> anyhow::Result<()> {
    let runs = files
        .iter()
        .map(|path| Ok((run_label(path), read_jsonl(path)?)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let [svg, png] = plot::write_curves(&runs, out)?;
    eprintln!("bnlab: wrote {} and {}", svg.display(), png.display());
    Ok(())
}

/// A metrics file's label: its run directory's name for `DIR/metrics.jsonl`, else its stem.
fn run_label(path: &Path) -> String {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_default();
    match (stem.as_str(), path.parent().and_then(|p| p.file_name())) {
        ("metrics", Some(dir)) => dir.to_string_lossy().to_string(),
        _ => stem,
    }
}

fn shapes(model: ModelKind, resize: Option<usize>) -> anyhow::Result<()> {
    let size = resize.unwrap_or(if model == ModelKind::Densenet { 96 } else { 28 });
    let config = RunConfig {
        model,
        resize: Some(size),
        ..Default::default()
    };
    config.validate()?;
    let device = eval_device();
    let spec = ModelSpec::of(model, NormKind::Scratch);
    let net = spec.init(0, &device);
    let x = burn::tensor::Tensor::<4>::zeros([1, 1, size, size], &device);
    let mut trace = Trace::recording();
    net.forward_traced(x, &mut trace);
    println!("{} on a 1x1x{size}x{size} input:", model.name());
    let width = trace.blocks.iter().map(|(n, _)| n.len()).max().unwrap_or(0);
    for (name, dims) in trace.blocks {
        println!("  {name:width$}  output shape {dims:?}");
    }
    Ok(())
}

struct EvalOptions {
    recalibrate: bool,
    fold: bool,
    limit: Option<usize>,
    json: bool,
    logits: Option<PathBuf>,
}

/// Where `eval` gets its model.
enum Source {
    Checkpoint(PathBuf),
    Weights(PathBuf, ArchArgs),
}

/// A model from a PyTorch state_dict, its architecture from the file's metadata and flags.
fn from_weights(path: &Path, arch: &ArchArgs) -> anyhow::Result<(RunConfig, Model)> {
    use bnlab::interop::torch::{
        self, META_ACTIVATION, META_EPS, META_IMAGE_SIZE, META_MODEL, META_NORM, META_POOL,
    };
    use clap::ValueEnum;
    let bytes = std::fs::read(path)
        .with_context(|| format!("--weights {}: cannot read", path.display()))?;
    let meta = torch::metadata(&bytes)
        .map_err(|e| anyhow::anyhow!("--weights {}: {e}", path.display()))?;
    let named = |key: &str| meta.get(key).map(String::as_str);
    fn parse<T: ValueEnum>(value: Option<&str>) -> Option<T> {
        value.and_then(|v| T::from_str(v, false).ok())
    }
    let mut config = RunConfig::default();
    config.model = arch
        .model
        .or(parse(named(META_MODEL)))
        .unwrap_or(config.model);
    config.norm = arch.norm.or(parse(named(META_NORM)));
    let lenet = matches!(config.model, ModelKind::Lenet | ModelKind::LenetBn);
    if lenet {
        config.pool = arch.pool.or(parse(named(META_POOL)));
        config.activation = arch.activation.or(parse(named(META_ACTIVATION)));
    }
    if let Some(eps) = named(META_EPS).and_then(|e| e.parse().ok()) {
        config.bn_eps = eps;
    }
    let size = arch
        .resize
        .or(named(META_IMAGE_SIZE).and_then(|s| s.parse().ok()));
    config.resize = size.filter(|&s| s != 28);
    config.validate()?;
    let model = torch::import(&bytes, &config.model_spec())
        .map_err(|e| anyhow::anyhow!("--weights {}: {e}", path.display()))?;
    Ok((config, model))
}

fn eval(source: Source, options: &EvalOptions, env: &EnvArgs) -> anyhow::Result<()> {
    set_up(env)?;
    let (config, mut model, path) = match source {
        Source::Checkpoint(path) => {
            let ckpt = checkpoint::load_checkpoint(&path)?;
            (ckpt.config, ckpt.model, ckpt.path)
        }
        Source::Weights(path, arch) => {
            let (config, model) = from_weights(&path, &arch)?;
            (config, model, path)
        }
    };
    let data = FashionMnist::load(&env.data)?;
    let (size, limit) = (config.image_size(), options.limit);
    if options.recalibrate {
        model = recalibrate_bn(model, &data.train, config.batch_size, size, limit).valid();
    }
    if options.fold {
        model = bnlab::models::fold_bn(model);
    }
    let acc = evaluate(&model, &data.test, config.batch_size, size, limit);
    let examples = limit.map_or(data.test.len(), |l| {
        (l * config.batch_size).min(data.test.len())
    });
    if let Some(out) = &options.logits {
        let p =
            bnlab::interop::predict(&model, &data.test, size, config.batch_size, Some(examples));
        bnlab::interop::npy::write(out, &p.logits, &[examples, 10])
            .with_context(|| format!("--logits {}", out.display()))?;
    }
    if options.json {
        let v = serde_json::json!({
            "model": path, "test_acc": acc, "examples": examples,
            "recalibrate_bn": options.recalibrate, "folded": options.fold,
        });
        println!("{v}");
    } else {
        println!(
            "{}: test accuracy {acc:.4} on {examples} images",
            path.display()
        );
    }
    Ok(())
}

fn export_torch(path: &Path, out: &Path) -> anyhow::Result<()> {
    use bnlab::interop::torch::{export_with_metadata, META_IMAGE_SIZE};
    let ckpt = checkpoint::load_checkpoint(path)?;
    let size = ckpt.config.image_size().to_string();
    let extra = std::collections::BTreeMap::from([(META_IMAGE_SIZE.to_string(), size)]);
    let bytes = export_with_metadata(&ckpt.model, &ckpt.config.model_spec(), &extra)?;
    write_atomically(out, &bytes)
        .with_context(|| format!("--out {}: cannot write", out.display()))?;
    eprintln!(
        "bnlab: wrote {} (PyTorch state_dict of {})",
        out.display(),
        ckpt.config.model.name()
    );
    Ok(())
}

fn inspect(path: &Path, full: bool) -> anyhow::Result<()> {
    let ckpt = checkpoint::load_checkpoint(path)?;
    let mut model = ckpt.model;
    let layers = bnlab::report::inspect::describe(&mut model);
    if layers.is_empty() {
        println!(
            "{}: the model has no batch-norm layers",
            ckpt.path.display()
        );
    }
    for layer in layers {
        println!("{} ({} channels)", layer.name, layer.channels);
        for (what, values) in layer.vectors {
            println!(
                "  {what:<12} {}",
                bnlab::report::inspect::format_values(&values, full)
            );
        }
    }
    Ok(())
}

fn bench(
    json: bool,
    quick: bool,
    only: &[String],
    norms: &[NormKind],
    env: &EnvArgs,
) -> anyhow::Result<()> {
    use bnlab::bench::{self, Scale, NORMS};
    const ALL: [&str; 5] = ["W1", "W4", "W6", "W7", "RSS"];
    let only: Vec<String> = only.iter().map(|w| w.trim().to_uppercase()).collect();
    if let Some(bad) = only.iter().find(|w| !ALL.contains(&w.as_str())) {
        anyhow::bail!(
            "--only {bad}: unknown workload (choose from {})",
            ALL.join(", ")
        );
    }
    let wanted = |w: &str| only.is_empty() || only.iter().any(|o| o == w);
    if let Some(bad) = norms.iter().find(|n| !NORMS.contains(n)) {
        anyhow::bail!(
            "--norm {}: bench times only BN layers (choose from fused, scratch, burn)",
            bnlab::value_name(*bad)
        );
    }
    let norms = if norms.is_empty() { &NORMS[..] } else { norms };
    set_up(env)?;
    let scale = if quick { Scale::quick() } else { Scale::full() };
    let data = FashionMnist::load(&env.data)?;
    let emit = |r: bench::Record| {
        if json {
            println!("{}", serde_json::to_string(&r).expect("record serializes"));
        } else {
            let figure = match (r.examples_per_sec, r.ms_per_fwd_bwd, r.peak_rss_mb) {
                (Some(x), _, _) => format!("{x:>9.1} examples/s"),
                (_, Some(ms), _) => format!("{ms:>9.2} ms per fwd+bwd"),
                (_, _, Some(mb)) => format!("{mb:>9.0} MB peak RSS"),
                _ => String::new(),
            };
            let norm = match (&r.norm, r.folded) {
                (Some(n), _) => format!(" --norm {n}"),
                (None, Some(true)) => " folded".into(),
                (None, Some(false)) => " unfolded".into(),
                (None, None) => String::new(),
            };
            println!(
                "{:<34} {figure}   ({}, {} threads)",
                format!("{}{norm}", r.workload),
                r.detail,
                r.threads
            );
        }
    };
    if wanted("W1") {
        for &norm in norms {
            emit(bench::lenet_training(&data, norm, scale)?);
        }
    }
    if wanted("W4") {
        emit(bench::resnet_training(&data, NormKind::Fused, scale)?);
    }
    if wanted("W6") {
        for &norm in norms {
            emit(bench::bn_layer(norm, scale));
        }
    }
    if wanted("W7") {
        for kind in [ModelKind::LenetBn, ModelKind::Resnet18] {
            for folded in [false, true] {
                emit(bench::inference(&data, kind, folded, scale));
            }
        }
    }
    if wanted("RSS") {
        emit(peak_rss_of_training(quick, env)?);
    }
    Ok(())
}

/// Peak RSS of a separate `bnlab train --epochs 1` process (LeNet-BN).
fn peak_rss_of_training(quick: bool, env: &EnvArgs) -> anyhow::Result<bnlab::bench::Record> {
    let tmp = tempfile::tempdir().context("cannot make a temporary directory")?;
    let exe = std::env::current_exe().context("cannot find the bnlab executable")?;
    let mut cmd = std::process::Command::new(exe);
    cmd.args(["train", "--epochs", "1", "--json", "--out"])
        .arg(tmp.path().join("run"));
    cmd.arg("--data").arg(&env.data);
    cmd.args(["--threads", &rayon::current_num_threads().to_string()]);
    cmd.args(["--device", &env.device.to_string()]);
    if quick {
        cmd.args(["--limit-batches", "3"]);
    }
    let started = std::time::Instant::now();
    let out = cmd.output().context("cannot run bnlab train")?;
    if !out.status.success() {
        anyhow::bail!(
            "the measured training run failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let mut r = bnlab::bench::Record::new(
        "RSS lenet_bn_train",
        started.elapsed().as_secs_f64(),
        "peak RSS of bnlab train --epochs 1 (LeNet-BN, batch 256)".into(),
    );
    r.peak_rss_mb = Some(bnlab::bench::children_peak_rss_mb());
    Ok(r)
}
