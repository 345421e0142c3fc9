//! The `bnlab` command line: the clap definitions and dispatch here, each command group in a
//! file of its own.

mod args;
mod bench;
mod eval;
mod run;
mod show;
mod sweep;

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

use bnlab::config::RunConfig;
use bnlab::models::ModelKind;
use bnlab::norm::NormKind;
use bnlab::recipes;

use args::*;
use bench::*;
use eval::*;
pub use run::Interrupted;
use run::*;
use show::*;
use sweep::*;

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
        /// Replace an existing table and plots in --out (never a link, FIFO or device).
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        env: EnvArgs,
    },
    /// Run a recipe over a grid of settings and seeds, several runs at a time, and write the
    /// table of each setting's mean ± std, min and max over seeds (DIR/table.md).
    Sweep(SweepCommand),
    /// Redraw training-curve plots (SVG and PNG) from metrics files.
    Plot {
        /// Metrics files (JSON lines, as `--metrics` and run directories hold).
        #[arg(required = true, num_args = 1..)]
        metrics: Vec<PathBuf>,
        /// Output path without extension: writes STEM.svg and STEM.png.
        #[arg(long, value_name = "STEM", default_value = "curves")]
        out: PathBuf,
        /// Replace existing STEM.svg and STEM.png (never a link, FIFO or device).
        #[arg(long)]
        force: bool,
    },
    /// Print the output shape of each top-level block of a model for one input image.
    Shapes {
        /// Network whose blocks to show.
        #[arg(value_parser = choice::<ModelKind>())]
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
        /// A PyTorch state_dict: safetensors, or torch.save's .pt/.pth; the architecture comes from the file's
        /// bnlab metadata, or from --model and the other flags below.
        #[arg(long, value_name = "FILE.safetensors")]
        weights: Option<PathBuf>,
        #[command(flatten)]
        arch: ArchArgs,
        /// Also write the test-set logits (N×10 float32) to FILE.npy.
        #[arg(long, value_name = "FILE.npy")]
        logits: Option<PathBuf>,
        /// Replace an existing --logits file (never a link, FIFO or device).
        #[arg(long)]
        force: bool,
        /// Re-estimate the BN statistics over the training set first (precise BN).
        #[arg(long)]
        recalibrate_bn: bool,
        /// Precise BN over the first N training batches only [default: all, or
        /// --limit-batches].
        #[arg(long, value_name = "N", value_parser = at_least_one, requires = "recalibrate_bn")]
        recalibrate_batches: Option<usize>,
        /// Sum the logits of each test image and of its mirror image [default: the run's
        /// setting, for a checkpoint; off for --weights].
        #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
        tta_flip: Option<bool>,
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
    /// Time the chapter's workloads (W0 the best matrix product here, W1 LeNet-BN training, W4
    /// ResNet-18 steps, W5 DenseNet steps, W6 one BN layer, W7 inference, W8 DenseNet at batch
    /// 256, peak memory), as ../shared/bench/torch_bench.py times PyTorch's.
    Bench {
        /// Print one JSON object per workload.
        #[arg(long)]
        json: bool,
        /// Tiny sizes that only check the plumbing (the figures mean nothing).
        #[arg(long)]
        quick: bool,
        /// Run only these workloads (comma-separated: W0,W1,W4,W5,W6,W7,W8,RSS).
        #[arg(long, value_delimiter = ',', value_name = "LIST")]
        only: Vec<String>,
        /// Time W1 and W6 only with these norms (comma-separated) [default: fused,scratch,burn].
        #[arg(long, value_delimiter = ',', value_name = "LIST", value_parser = choice_of(&bnlab::bench::NORMS))]
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
        /// The keys' names: d2l's nn.Sequential indices, or the chapter notebooks' named
        /// children (ResNet-18 and DenseNet; the same for the LeNets).
        #[arg(long, default_value = "d2l", value_parser = choice::<bnlab::interop::torch::Layout>())]
        layout: bnlab::interop::torch::Layout,
        /// Replace an existing --out file (never a link, FIFO or device).
        #[arg(long)]
        force: bool,
    },
    /// Print gamma, beta and the running statistics of each BN layer of a saved model, or the
    /// keys of a state_dict file and the model they fit.
    #[command(group(clap::ArgGroup::new("inspected").required(true).args(["path", "weights"])))]
    Inspect {
        /// A run directory (its final model) or a .bpk file inside one.
        path: Option<PathBuf>,
        /// A PyTorch state_dict (safetensors or torch.save's .pt/.pth): list its keys, shapes
        /// and dtypes, and the bnlab models whose state_dict they are.
        #[arg(long, value_name = "FILE", conflicts_with = "path")]
        weights: Option<PathBuf>,
        /// Rename the file's keys first, as `eval --rename` does (with --weights; repeatable).
        #[arg(long, value_name = "REGEX=REPLACEMENT", requires = "weights")]
        rename: Vec<bnlab::interop::state_dict::Rename>,
        /// Print every value instead of a summary.
        #[arg(long)]
        full: bool,
    },
}

/// Parses the command line; a usage error becomes one line on stderr and exit code 2.
pub fn parse() -> Cli {
    match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(), // --help and --version
        // `bnlab` alone: the help as clap lays it out, not folded into one line.
        Err(e) if e.kind() == clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            e.exit()
        }
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
            let config = run.configure(RunConfig::default())?;
            let name = config.model.to_string();
            train_and_save(config, &name, &output).map(|_| ())
        }
        Command::Run {
            recipe,
            run,
            output,
        } => {
            let config = run.configure(recipes::load(&recipe)?)?;
            train_and_save(config, &recipe, &output).map(|_| ())
        }
        Command::Recipes => list_recipes(),
        Command::Compare {
            recipes,
            run,
            out,
            force,
            env,
        } => compare(&recipes, &run, out.as_deref(), force, &env),
        Command::Sweep(command) => sweep(command),
        Command::Plot {
            metrics,
            out,
            force,
        } => plot_files(&metrics, &out, force),
        Command::Shapes { model, resize } => shapes(model, resize),
        Command::Eval {
            checkpoint,
            weights,
            arch,
            logits,
            force,
            recalibrate_bn,
            recalibrate_batches,
            tta_flip,
            no_fold,
            limit_batches,
            json,
            env,
        } => {
            let options = EvalCommand {
                recalibrate: recalibrate_bn,
                recalibrate_batches,
                tta_flip,
                fold: !no_fold,
                limit: limit_batches,
                json,
                logits,
                force,
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
            layout,
            force,
        } => export_torch(&checkpoint, &out, layout, force),
        Command::Inspect {
            path,
            weights,
            rename,
            full,
        } => match (path, weights) {
            (_, Some(weights)) => inspect_weights(&weights, &rename),
            (Some(path), None) => inspect(&path, full),
            (None, None) => unreachable!("clap requires one of them"),
        },
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
pub(crate) fn set_up(env: &EnvArgs) -> anyhow::Result<()> {
    bnlab::device::select(env.device).map_err(anyhow::Error::msg)?;
    if let Some(asked) = env.threads {
        // More threads than cores only slows the kernels down (and a huge count takes minutes
        // to spawn), so the pool is capped at the cores there are.
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let n = asked.min(cores);
        if n < asked {
            eprintln!("bnlab: --threads {asked}: this machine has {cores} cores; using {n}");
        }
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .context("--threads: cannot set up the thread pool")?;
    }
    Ok(())
}
