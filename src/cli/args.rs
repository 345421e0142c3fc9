//! The flags that several commands share, and their value parsers.

use std::path::PathBuf;

use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};
use clap::Args;

use bnlab::choice::Choice;
use bnlab::config::{InitKind, LrSchedule, OptimizerKind, RunConfig};
use bnlab::data::DEFAULT_DATA_DIR;
use bnlab::models::{BnLayers, BnPosition, ModelKind};
use bnlab::norm::epilogue::{Activation, Pool};
use bnlab::norm::{Convention, Momentum, NormKind, NormName};

/// Settings of a run. Unset ones come from the recipe, or for `train` from the defaults shown.
#[derive(Args, Debug, Default, Clone)]
pub(crate) struct RunArgs {
    /// Network to train [default: lenet-bn].
    #[arg(long, value_parser = choice::<ModelKind>())]
    pub(crate) model: Option<ModelKind>,
    /// Batch norm: this project's with its fused CPU kernel (fused), the same layer composed
    /// from tensor ops (scratch), Burn's built-in (burn), none, or a variant or another norm to
    /// compare with [default: fused].
    #[arg(long, value_parser = NormNameParser)]
    pub(crate) norm: Option<NormName>,
    /// LeNet-BN: which layers get a norm [default: all].
    #[arg(long, value_parser = choice::<BnLayers>())]
    pub(crate) bn_layers: Option<BnLayers>,
    /// LeNet-BN: the norm before the activation, as the chapter, or after it [default:
    /// before-act].
    #[arg(long, value_parser = choice::<BnPosition>())]
    pub(crate) bn_position: Option<BnPosition>,
    /// LeNet-BN: keep (on) or drop (off) the bias of the layers a norm follows [default: on].
    #[arg(long, value_name = "on|off", value_parser = clap::builder::BoolishValueParser::new())]
    pub(crate) conv_bias: Option<bool>,
    /// LeNet and LeNet-BN: dropout's probability after each hidden linear layer's activation,
    /// in [0, 1) [default: 0].
    #[arg(long, value_name = "P", value_parser = unit_interval)]
    pub(crate) dropout: Option<f64>,
    /// Keep the norm layers' gamma at 1 and beta at 0 instead of learning them.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub(crate) freeze_affine: Option<bool>,
    /// Pooling in LeNet's conv blocks [default: avg].
    #[arg(long, value_name = "avg|max", value_parser = parse_pool)]
    pub(crate) pool: Option<Pool>,
    /// Activation in LeNet's layers [default: sigmoid].
    #[arg(long, value_parser = choice::<Activation>())]
    pub(crate) activation: Option<Activation>,
    /// Weight initialisation [default: xavier-uniform for LeNet, normal for lenet-gluon,
    /// pytorch-default for resnet18 and densenet].
    #[arg(long, value_parser = choice::<InitKind>())]
    pub(crate) weight_init: Option<InitKind>,
    /// Standard deviation of `--weight-init normal` [default: 0.01].
    #[arg(long, value_name = "STD", value_parser = positive_float)]
    pub(crate) init_std: Option<f64>,
    /// Optimizer that updates the weights [default: sgd].
    #[arg(long, value_parser = choice::<OptimizerKind>())]
    pub(crate) optimizer: Option<OptimizerKind>,
    /// Learning rate of the optimizer, > 0 [default: 1].
    #[arg(long, value_parser = positive_float, allow_negative_numbers = true)]
    pub(crate) lr: Option<f64>,
    /// Momentum of `--optimizer sgd-momentum`, in [0, 1] [default: 0.9].
    #[arg(long, value_parser = unit_interval, allow_negative_numbers = true)]
    pub(crate) momentum: Option<f64>,
    /// StepLR: multiply the learning rate by --lr-gamma every N epochs [default: off].
    #[arg(long, value_name = "N", value_parser = at_least_one)]
    pub(crate) lr_step_size: Option<usize>,
    /// The factor StepLR multiplies the learning rate by [default: 0.1].
    #[arg(long, value_name = "GAMMA", value_parser = positive_float)]
    pub(crate) lr_gamma: Option<f64>,
    /// Move the learning rate every step: one-cycle (PyTorch's OneCycleLR) or cosine (linear
    /// warm-up, then cosine to 0); constant turns a recipe's off [default: constant, or StepLR
    /// with --lr-step-size].
    #[arg(long, value_parser = choice::<LrSchedule>())]
    pub(crate) lr_schedule: Option<LrSchedule>,
    /// Fraction of the steps --lr-schedule spends rising [default: 0.3 for one-cycle, 0 for
    /// cosine].
    #[arg(long, value_name = "FRACTION", value_parser = unit_interval)]
    pub(crate) lr_warmup: Option<f64>,
    /// L2 penalty added to the gradients, as PyTorch's weight_decay [default: 0].
    #[arg(long, value_name = "WD", value_parser = unit_interval)]
    pub(crate) weight_decay: Option<f64>,
    /// Nesterov momentum for --optimizer sgd-momentum (=false to turn a recipe's off).
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub(crate) nesterov: Option<bool>,
    /// Label smoothing of the cross-entropy, in [0, 1) [default: 0].
    #[arg(long, value_name = "EPS", value_parser = unit_interval)]
    pub(crate) label_smoothing: Option<f64>,
    /// Shift training images by up to N pixels each way (pad, random crop; 0 = off) [default: 0].
    #[arg(long, value_name = "N")]
    pub(crate) augment_crop: Option<usize>,
    /// Mirror training images left to right at random (=false to turn a recipe's off).
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub(crate) augment_flip: Option<bool>,
    /// Test each image and its mirror image, summing the logits (=false to turn a recipe's
    /// off).
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub(crate) tta_flip: Option<bool>,
    /// Test after every N-th epoch only, and after the last [default: 1, every epoch].
    #[arg(long, value_name = "N", value_parser = at_least_one)]
    pub(crate) test_every: Option<usize>,
    /// Stop training after this many seconds of wall time, keeping time for the last test
    /// pass [default: none].
    #[arg(long, value_name = "SECONDS", value_parser = positive_float)]
    pub(crate) time_budget: Option<f64>,
    /// Examples per mini-batch, ≥ 1 (≥ 2 with batch norm) [default: 256].
    #[arg(long, value_parser = at_least_one)]
    pub(crate) batch_size: Option<usize>,
    /// Number of passes over the training set [default: 10].
    #[arg(long, value_parser = at_least_one)]
    pub(crate) epochs: Option<usize>,
    /// Resize the 28×28 images to N×N, bilinearly [default: no resize].
    #[arg(long, value_name = "N", value_parser = at_least_one)]
    pub(crate) resize: Option<usize>,
    /// Batch norm's eps, added to the variance before the square root, > 0 [default: 1e-5].
    #[arg(long, value_parser = positive_float)]
    pub(crate) bn_eps: Option<f64>,
    /// Batch norm's momentum, read by --bn-convention, or "cumulative" for a cumulative
    /// average [default: 0.1 for pytorch, 0.9 for d2l].
    #[arg(long, value_name = "M|cumulative", allow_negative_numbers = true)]
    pub(crate) bn_momentum: Option<Momentum>,
    /// How running statistics move: pytorch (momentum weighs the new batch, unbiased variance)
    /// or d2l (momentum weighs the old value, biased variance) [default: pytorch].
    #[arg(long, value_parser = choice::<Convention>())]
    pub(crate) bn_convention: Option<Convention>,
    /// Seed for weight initialisation and shuffling [default: 0].
    #[arg(long)]
    pub(crate) seed: Option<u64>,
    /// Visit the training set in file order instead of shuffling it.
    #[arg(long)]
    pub(crate) no_shuffle: bool,
    /// Stop each epoch after N training batches and N test batches (quick runs).
    #[arg(long, value_name = "N", value_parser = at_least_one)]
    pub(crate) limit_batches: Option<usize>,
    /// Re-estimate BN statistics over the training set before each test pass (precise BN;
    /// =false to turn a recipe's off).
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub(crate) recalibrate_bn: Option<bool>,
    /// Precise BN over the first N training batches only [default: all].
    #[arg(long, value_name = "N", value_parser = at_least_one)]
    pub(crate) recalibrate_batches: Option<usize>,
    /// Start from the weights of a PyTorch state_dict (safetensors, as `bnlab export` writes,
    /// or torch.save's .pt/.pth) instead of a seeded initialisation.
    #[arg(long, value_name = "FILE")]
    pub(crate) init: Option<PathBuf>,
    /// Set any setting by its recipe-file name, as a line of a recipe would (repeatable;
    /// applied before the flags above): --set lr=0.5 --set norm=none.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub(crate) set: Vec<String>,
    /// Rename the --init file's keys before matching them (repeatable, applied in order), as
    /// `eval --rename` does.
    #[arg(long, value_name = "REGEX=REPLACEMENT", requires = "init")]
    pub(crate) rename: Vec<bnlab::interop::state_dict::Rename>,
}

impl RunArgs {
    /// The run's settings: `base` (a recipe or the defaults), then `--set`, then the flags;
    /// refuses flags the result would ignore.
    pub(crate) fn configure(&self, base: RunConfig) -> anyhow::Result<RunConfig> {
        let settings = self
            .set
            .iter()
            .map(|s| {
                s.split_once('=')
                    .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                    .ok_or_else(|| anyhow::anyhow!("--set {s}: expected KEY=VALUE (--set lr=0.5)"))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let config = self.apply(bnlab::train::sweep::with_settings(&base, &settings)?);
        self.check_against(&config)?;
        Ok(config)
    }

    /// `config` with every flag that was given written over it.
    pub(crate) fn apply(&self, mut config: RunConfig) -> RunConfig {
        macro_rules! set {
            ($($field:ident),*) => { $(if let Some(v) = self.$field { config.$field = v; })* };
        }
        macro_rules! set_option {
            ($($field:ident),*) => { $(if self.$field.is_some() { config.$field = self.$field; })* };
        }
        set!(model, init_std, optimizer, lr, momentum, lr_gamma, batch_size, epochs, bn_eps);
        set!(
            bn_convention,
            seed,
            weight_decay,
            nesterov,
            label_smoothing,
            augment_crop
        );
        set!(
            augment_flip,
            tta_flip,
            recalibrate_bn,
            freeze_affine,
            test_every
        );
        set!(bn_layers, bn_position, conv_bias, dropout);
        set_option!(
            norm,
            pool,
            activation,
            lr_step_size,
            resize,
            bn_momentum,
            limit_batches,
            lr_schedule,
            lr_warmup,
            recalibrate_batches,
            time_budget
        );
        if self.weight_init.is_some() {
            config.init = self.weight_init;
        }
        if self.init.is_some() {
            config.init_weights = self.init.clone();
            config.init_renames = self.rename.iter().map(|r| r.to_string()).collect();
        }
        config.shuffle &= !self.no_shuffle;
        config
    }

    /// Refuses a flag that `config` (after [`Self::apply`]) would silently ignore.
    pub(crate) fn check_against(&self, config: &RunConfig) -> anyhow::Result<()> {
        if self.momentum.is_some() && config.optimizer != OptimizerKind::SgdMomentum {
            anyhow::bail!(
                "--momentum: only --optimizer sgd-momentum uses it (this run uses {}); add \
                 --optimizer sgd-momentum or drop --momentum",
                config.optimizer
            );
        }
        if self.lr_warmup.is_some() && config.per_step_schedule().is_none() {
            anyhow::bail!(
                "--lr-warmup: only --lr-schedule one-cycle or cosine uses it; add one or drop \
                 --lr-warmup"
            );
        }
        if self.recalibrate_batches.is_some() && !config.recalibrate_bn {
            anyhow::bail!(
                "--recalibrate-batches: only precise BN uses it; add --recalibrate-bn or drop \
                 --recalibrate-batches"
            );
        }
        Ok(())
    }
}

/// The architecture of `eval --weights` when the file does not name it.
#[derive(Args, Debug, Clone, Default)]
pub(crate) struct ArchArgs {
    /// Network the weights belong to (with --weights) [default: the file's, or lenet-bn].
    #[arg(long, conflicts_with = "checkpoint", value_parser = choice::<ModelKind>())]
    pub(crate) model: Option<ModelKind>,
    /// Its batch norm (with --weights) [default: the file's, or fused].
    #[arg(long, conflicts_with = "checkpoint", value_parser = NormNameParser)]
    pub(crate) norm: Option<NormName>,
    /// Its LeNet pooling (with --weights) [default: the file's, or avg].
    #[arg(long, conflicts_with = "checkpoint", value_name = "avg|max", value_parser = parse_pool)]
    pub(crate) pool: Option<Pool>,
    /// Its LeNet activation (with --weights) [default: the file's, or sigmoid].
    #[arg(long, conflicts_with = "checkpoint", value_parser = choice::<Activation>())]
    pub(crate) activation: Option<Activation>,
    /// The image side it expects (with --weights) [default: the file's, or 28].
    #[arg(long, value_name = "N", value_parser = at_least_one, conflicts_with = "checkpoint")]
    pub(crate) resize: Option<usize>,
    /// Rename the file's keys before matching them (with --weights; repeatable, applied in
    /// order): every match of REGEX is replaced, `$1` naming its first group
    /// ('^module\.=' drops nn.DataParallel's prefix).
    #[arg(long, value_name = "REGEX=REPLACEMENT", conflicts_with = "checkpoint")]
    pub(crate) rename: Vec<bnlab::interop::state_dict::Rename>,
}

/// `export --format`
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub(crate) enum ExportFormat {
    /// A PyTorch state_dict of d2l's nn.Sequential definitions, as safetensors.
    Torch,
}

/// Where data comes from and how much of the machine to use.
#[derive(Args, Debug, Clone)]
pub(crate) struct EnvArgs {
    /// Directory holding the Fashion-MNIST IDX files (.gz or plain).
    #[arg(long, value_name = "DIR", default_value = DEFAULT_DATA_DIR)]
    pub(crate) data: PathBuf,
    /// Worker threads for the CPU backend [default: all cores].
    #[arg(long, value_parser = at_least_one)]
    pub(crate) threads: Option<usize>,
    /// Backend that runs the tensors: flex (pure-Rust CPU), wgpu, cuda or libtorch[:N]; all
    /// but flex need a build with the Cargo feature of that name.
    #[arg(long, value_name = "DEVICE", default_value = "flex")]
    pub(crate) device: bnlab::device::DeviceChoice,
}

#[derive(Args, Debug, Clone)]
pub(crate) struct OutputArgs {
    #[command(flatten)]
    pub(crate) env: EnvArgs,
    /// Print only JSON lines on stdout, one object per epoch.
    #[arg(long)]
    pub(crate) json: bool,
    /// Also write the per-epoch JSON lines to FILE (rewritten atomically after each epoch).
    #[arg(long, value_name = "FILE")]
    pub(crate) metrics: Option<PathBuf>,
    /// Run directory for config.json, metrics.jsonl and the model [default: runs/NAME-TIME].
    #[arg(long, value_name = "DIR")]
    pub(crate) out: Option<PathBuf>,
    /// Also save the model every N epochs (DIR/epoch-NNN.bpk).
    #[arg(long, value_name = "N", value_parser = at_least_one)]
    pub(crate) save_every: Option<usize>,
    /// Replace an existing --metrics file (never a directory, link, FIFO or device).
    #[arg(long)]
    pub(crate) force: bool,
}

/// `train --resume DIR`: continue a stopped run exactly.
#[derive(Args, Debug, Clone)]
pub(crate) struct ResumeArgs {
    /// Continue the run saved in DIR where it stopped (Ctrl-C, SIGTERM, divergence, or a
    /// finished run with a larger --epochs); its settings come from DIR/config.json, but a
    /// lower --lr may be given.
    #[arg(long, value_name = "DIR")]
    pub(crate) resume: Option<PathBuf>,
}

pub(crate) fn positive_float(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|_| format!("'{s}' is not a number"))?;
    if !(v.is_finite() && v > 0.0) {
        return Err(format!("must be > 0, got {s}"));
    }
    // The tensors are float32: a value beyond its range would become inf or 0 there.
    let single = v as f32;
    if single.is_infinite() || single == 0.0 {
        return Err(format!(
            "{s} is outside float32's range (about 1e-45 to 3.4e38), which the model computes in"
        ));
    }
    Ok(v)
}

pub(crate) fn unit_interval(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|_| format!("'{s}' is not a number"))?;
    if (0.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("must be within [0, 1], got {s}"))
    }
}

pub(crate) fn at_least_one(s: &str) -> Result<usize, String> {
    let v: usize = s
        .parse()
        .map_err(|_| format!("'{s}' is not a whole number"))?;
    if v >= 1 {
        Ok(v)
    } else {
        Err(format!("must be at least 1, got {s}"))
    }
}

/// A parser for a library enum of named values: its names, each with its doc comment, are the
/// flag's possible values.
pub(crate) fn choice<T: Choice + Send + Sync>() -> impl TypedValueParser<Value = T> {
    choice_of(T::ALL)
}

/// [`choice`] restricted to `allowed`: the others are neither accepted nor listed.
pub(crate) fn choice_of<T: Choice + Send + Sync>(
    allowed: &'static [T],
) -> impl TypedValueParser<Value = T> {
    let values = allowed.iter().map(|v| {
        let help: Vec<&str> = v.help().split_whitespace().collect();
        PossibleValue::new(v.name()).help(help.join(" "))
    });
    PossibleValuesParser::new(values)
        .map(|name| T::from_name(&name).expect("clap checked the name"))
}

/// `--norm`'s parser: a [`NormKind`] name, with `:N` after the names that take a size; the
/// names and their doc comments are listed as the possible values.
#[derive(Clone)]
pub(crate) struct NormNameParser;

impl TypedValueParser for NormNameParser {
    type Value = NormName;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<NormName, clap::Error> {
        let flag = arg.map_or("--norm".to_string(), |a| format!("--{}", a.get_id()));
        let text = value.to_string_lossy();
        text.parse().map_err(|e: String| {
            clap::Error::raw(
                clap::error::ErrorKind::ValueValidation,
                format!("invalid value for '{flag}': {e}\n"),
            )
            .with_cmd(cmd)
        })
    }

    fn possible_values(&self) -> Option<Box<dyn Iterator<Item = PossibleValue> + '_>> {
        Some(Box::new(NormKind::ALL.iter().map(|&kind| {
            let help: Vec<&str> = kind.help().split_whitespace().collect();
            let name = match kind {
                NormKind::Ghost => "ghost:N",
                NormKind::Group => "group:G",
                other => other.name(),
            };
            PossibleValue::new(name).help(help.join(" "))
        })))
    }
}

fn parse_pool(s: &str) -> Result<Pool, String> {
    s.parse()
}
