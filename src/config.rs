//! A run, fully described: what `bnlab train` builds from flags, what a recipe file holds, and
//! what a run directory records in `config.json`.

use serde::{Deserialize, Serialize};

use crate::models::{BnLayers, BnPosition, ModelKind, ModelSpec, WeightInit};
use crate::norm::epilogue::{Activation, Pool};
use crate::norm::{Convention, Momentum, NormConfig, NormKind, NormName, RenormSchedule};

crate::choice_enum! {
    /// `optimizer`
    pub enum OptimizerKind {
        /// Plain mini-batch SGD.
        Sgd = "sgd",
        /// SGD with momentum (PyTorch's form: v = μv + g, no dampening).
        SgdMomentum = "sgd-momentum",
        /// Adam (β = 0.9, 0.999; ε = 1e-8, as PyTorch).
        Adam = "adam",
    }
}

crate::choice_enum! {
    /// `lr_schedule`: how the learning rate moves within the run, step by step.
    pub enum LrSchedule {
        /// PyTorch's OneCycleLR (cosine, two phases, `cycle_momentum=False`): from lr/25 up to
        /// lr over the first `lr_warmup` of the steps, then down to lr/25e4 at the last.
        OneCycle = "one-cycle",
        /// A linear warm-up from 0 to lr over the first `lr_warmup` of the steps, then a
        /// cosine down to 0 at the end.
        Cosine = "cosine",
        /// None: lr throughout (or StepLR's steps, with `lr_step_size`).
        Constant = "constant",
    }
}

crate::choice_enum! {
    /// `init`: how conv and linear weights start.
    pub enum InitKind {
        /// Xavier-uniform, as the d2l PyTorch notebooks.
        XavierUniform = "xavier-uniform",
        /// N(0, init_std²), as the MXNet notebook.
        Normal = "normal",
        /// PyTorch's default, U(±1/√fan_in).
        PytorchDefault = "pytorch-default",
    }
}

/// Every setting of a run. Options left `None` take the model's or the convention's default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunConfig {
    /// One line on what the run shows (recipes fill it in).
    pub description: String,
    /// The network.
    pub model: ModelKind,
    /// Default: `fused` for models with batch norm, `none` for `lenet`.
    pub norm: Option<NormName>,
    /// Keep the norm layers' γ at 1 and β at 0 instead of learning them.
    pub freeze_affine: bool,
    /// LeNet only. Default: avg (2 × 2).
    pub pool: Option<Pool>,
    /// LeNet only. Default: sigmoid.
    pub activation: Option<Activation>,
    /// Default: xavier-uniform for LeNet, normal for lenet-gluon, pytorch-default otherwise.
    pub init: Option<InitKind>,
    /// Standard deviation for `init = "normal"`.
    pub init_std: f64,
    /// SGD, SGD with momentum or Adam.
    pub optimizer: OptimizerKind,
    /// The (initial) learning rate.
    pub lr: f64,
    /// Momentum of `sgd-momentum`.
    pub momentum: f64,
    /// StepLR: multiply the learning rate by `lr_gamma` every `lr_step_size` epochs.
    pub lr_step_size: Option<usize>,
    /// StepLR's factor.
    pub lr_gamma: f64,
    /// A learning rate that moves every step, instead of StepLR's per-epoch steps (or a
    /// constant rate).
    pub lr_schedule: Option<LrSchedule>,
    /// The fraction of the steps `lr_schedule` spends rising. Default: 0.3 for one-cycle (as
    /// PyTorch's `pct_start`), 0 for cosine.
    pub lr_warmup: Option<f64>,
    /// L2 penalty added to each weight's gradient (PyTorch's `weight_decay`: BN's γ and β and
    /// the biases included).
    pub weight_decay: f64,
    /// Nesterov momentum for `sgd-momentum` (PyTorch's `nesterov=True`).
    pub nesterov: bool,
    /// Label smoothing of the cross-entropy: the target puts `label_smoothing / 10` on every
    /// class and the rest on the right one (PyTorch's `label_smoothing`).
    pub label_smoothing: f64,
    /// Random crop: pad each training image by this many zero pixels and cut a 28 × 28 window
    /// at a random offset (0: off).
    pub augment_crop: usize,
    /// Mirror each training image left to right with probability 1/2.
    pub augment_flip: bool,
    /// Examples per training (and test) batch.
    pub batch_size: usize,
    /// Passes over the training set.
    pub epochs: usize,
    /// Bilinear resize of the 28×28 images to N×N.
    pub resize: Option<usize>,
    /// Batch norm's eps, added to the variance before its square root.
    pub bn_eps: f64,
    /// Default: 0.1 under the pytorch convention, 0.9 under d2l.
    pub bn_momentum: Option<Momentum>,
    /// How the running statistics move ([`Convention`]).
    pub bn_convention: Convention,
    /// Seeds the initial weights and the shuffles.
    pub seed: u64,
    /// Visit the training set in a new seeded order each epoch (else file order).
    pub shuffle: bool,
    /// `--norm renorm`: the final limit on r (>= 1).
    pub renorm_r_max: f64,
    /// `--norm renorm`: the final limit on d (>= 0).
    pub renorm_d_max: f64,
    /// `--norm renorm`: training steps of plain batch norm before the limits widen.
    pub renorm_warmup: u64,
    /// `--norm renorm`: steps over which the limits widen to their final values.
    pub renorm_ramp: u64,
    /// LeNet-BN: which layers get a norm.
    pub bn_layers: BnLayers,
    /// LeNet-BN: the norm before the activation or after it.
    pub bn_position: BnPosition,
    /// LeNet-BN: whether the layers a norm follows keep their bias.
    pub conv_bias: bool,
    /// The LeNets: dropout's probability after each hidden linear layer's activation.
    pub dropout: f64,
    /// At most this many training and test batches per epoch (quick runs).
    pub limit_batches: Option<usize>,
    /// Re-estimate BN statistics over the training set before each evaluation (precise BN).
    pub recalibrate_bn: bool,
    /// Precise BN over the first N training batches only (default: all of them).
    pub recalibrate_batches: Option<usize>,
    /// Test on each image and its mirror image, summing the two logits.
    pub tta_flip: bool,
    /// Test after every N-th epoch only (and always after the last, and when the time budget
    /// ends the run): test passes are time a wall-time budget could train with.
    pub test_every: usize,
    /// Stop training when another step and the last test pass (taken to last a quarter longer
    /// than the one before, or guessed from the step time before the first) would pass this
    /// many seconds of wall time, then test.
    pub time_budget: Option<f64>,
    /// Start from the weights of this PyTorch state_dict (safetensors or torch.save) instead
    /// of a seeded initialisation.
    pub init_weights: Option<std::path::PathBuf>,
    /// `REGEX=REPLACEMENT` renames applied in order to `init_weights`' keys (`--rename`).
    pub init_renames: Vec<String>,
}

impl Default for RunConfig {
    /// The chapter's LeNet-BN run: this project's BN (`fused`), SGD lr 1.0, batch 256, 10
    /// epochs.
    fn default() -> Self {
        Self {
            description: String::new(),
            model: ModelKind::LenetBn,
            norm: None,
            freeze_affine: false,
            pool: None,
            activation: None,
            init: None,
            init_std: 0.01,
            optimizer: OptimizerKind::Sgd,
            lr: 1.0,
            momentum: 0.9,
            lr_step_size: None,
            lr_gamma: 0.1,
            lr_schedule: None,
            lr_warmup: None,
            weight_decay: 0.0,
            nesterov: false,
            label_smoothing: 0.0,
            augment_crop: 0,
            augment_flip: false,
            batch_size: 256,
            epochs: 10,
            resize: None,
            bn_eps: 1e-5,
            bn_momentum: None,
            bn_convention: Convention::PyTorch,
            seed: 0,
            shuffle: true,
            renorm_r_max: NormConfig::default_renorm().r_max,
            renorm_d_max: NormConfig::default_renorm().d_max,
            renorm_warmup: NormConfig::default_renorm().warmup,
            renorm_ramp: NormConfig::default_renorm().ramp,
            bn_layers: BnLayers::All,
            bn_position: BnPosition::BeforeAct,
            conv_bias: true,
            dropout: 0.0,
            limit_batches: None,
            recalibrate_bn: false,
            recalibrate_batches: None,
            tta_flip: false,
            test_every: 1,
            time_budget: None,
            init_weights: None,
            init_renames: Vec::new(),
        }
    }
}

/// A setting that does not make sense; the message names the flag and the fix.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

fn err<T>(msg: impl Into<String>) -> Result<T, ConfigError> {
    Err(ConfigError(msg.into()))
}

impl RunConfig {
    /// The norm after defaults: `none` for the model without batch norm.
    pub fn norm_kind(&self) -> NormKind {
        self.norm
            .map(|n| n.kind)
            .unwrap_or(match self.model.has_batch_norm() {
                true => NormKind::Fused,
                false => NormKind::None,
            })
    }

    /// The batch-norm settings after defaults (the momentum follows the convention).
    pub fn norm_config(&self) -> NormConfig {
        let momentum = self.bn_momentum.unwrap_or(match self.bn_convention {
            Convention::PyTorch => Momentum::PYTORCH,
            Convention::D2l => Momentum::D2L,
        });
        NormConfig {
            kind: self.norm_kind(),
            eps: self.bn_eps,
            momentum,
            convention: self.bn_convention,
            size: self.norm.and_then(|n| n.size),
            affine: !self.freeze_affine,
            renorm: RenormSchedule {
                r_max: self.renorm_r_max,
                d_max: self.renorm_d_max,
                warmup: self.renorm_warmup,
                ramp: self.renorm_ramp,
            },
        }
    }

    /// How the weights start, after the model's default.
    pub fn weight_init(&self) -> WeightInit {
        match self.init {
            None => self.model.default_init(),
            Some(InitKind::XavierUniform) => WeightInit::XavierUniform,
            Some(InitKind::Normal) => WeightInit::Normal { std: self.init_std },
            Some(InitKind::PytorchDefault) => WeightInit::PyTorchDefault,
        }
    }

    /// The architecture this run trains: the model's defaults, with what the run sets.
    pub fn model_spec(&self) -> ModelSpec {
        let defaults = ModelSpec::of(self.model, self.norm_kind());
        ModelSpec {
            norm: self.norm_config(),
            pool: self.pool.unwrap_or(defaults.pool),
            activation: self.activation.unwrap_or(defaults.activation),
            init: self.weight_init(),
            bn_layers: self.bn_layers,
            bn_position: self.bn_position,
            conv_bias: self.conv_bias,
            dropout: self.dropout,
            ..defaults
        }
    }

    /// The side length of the images the model sees.
    pub fn image_size(&self) -> usize {
        self.resize.unwrap_or(28)
    }

    /// The learning rate of 1-based `epoch`, after StepLR.
    pub fn lr_at(&self, epoch: usize) -> f64 {
        match self.lr_step_size {
            Some(step) => self.lr * self.lr_gamma.powi(((epoch - 1) / step) as i32),
            None => self.lr,
        }
    }

    /// The learning rate of 0-based `step` of 1-based `epoch`, in a run of `steps_per_epoch`
    /// steps per epoch: [`Self::lr_at`] unless `lr_schedule` is set.
    pub fn lr_at_step(&self, epoch: usize, step: usize, steps_per_epoch: usize) -> f64 {
        let schedule = match self.lr_schedule {
            None | Some(LrSchedule::Constant) => return self.lr_at(epoch),
            Some(schedule) => schedule,
        };
        let total = (self.epochs * steps_per_epoch).max(1);
        let t = ((epoch - 1) * steps_per_epoch + step).min(total - 1);
        let warmup = self.warmup_fraction();
        // cos_anneal of PyTorch's OneCycleLR: from `start` at pct 0 to `end` at pct 1.
        let anneal = |start: f64, end: f64, pct: f64| {
            end + (start - end) / 2.0 * ((std::f64::consts::PI * pct).cos() + 1.0)
        };
        match schedule {
            LrSchedule::OneCycle => {
                // PyTorch: phase ends at step pct_start·total − 1 and total − 1.
                let initial = self.lr / 25.0;
                let min = initial / 1e4;
                let end_up = warmup * total as f64 - 1.0;
                let end_down = total as f64 - 1.0;
                let t = t as f64;
                if end_up > 0.0 && t <= end_up {
                    anneal(initial, self.lr, t / end_up)
                } else {
                    anneal(self.lr, min, (t - end_up) / (end_down - end_up))
                }
            }
            LrSchedule::Constant => unreachable!("returned above"),
            LrSchedule::Cosine => {
                let up = (warmup * total as f64).round() as usize;
                if t < up {
                    self.lr * (t + 1) as f64 / up as f64
                } else {
                    let span = (total - up).max(1) as f64;
                    anneal(self.lr, 0.0, (t - up) as f64 / span)
                }
            }
        }
    }

    /// The schedule that moves the learning rate every step, if any.
    pub fn per_step_schedule(&self) -> Option<LrSchedule> {
        self.lr_schedule.filter(|s| *s != LrSchedule::Constant)
    }

    /// `lr_warmup` after its default.
    pub fn warmup_fraction(&self) -> f64 {
        self.lr_warmup.unwrap_or(match self.lr_schedule {
            Some(LrSchedule::OneCycle) => 0.3,
            _ => 0.0,
        })
    }

    /// Rejects settings that make no sense, naming the flag.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let positive = |v: f64| v.is_finite() && v > 0.0;
        if !positive(self.lr) {
            return err(format!("--lr must be > 0, got {}", self.lr));
        }
        if self.batch_size == 0 {
            return err("--batch-size must be at least 1");
        }
        if self.epochs == 0 {
            return err("--epochs must be at least 1");
        }
        if self.limit_batches == Some(0) {
            return err("--limit-batches must be at least 1");
        }
        if !(0.0..=1.0).contains(&self.momentum) {
            return err(format!(
                "--momentum must be within [0, 1], got {}",
                self.momentum
            ));
        }
        if self.lr_step_size == Some(0) {
            return err("--lr-step-size must be at least 1");
        }
        if !positive(self.lr_gamma) {
            return err(format!("--lr-gamma must be > 0, got {}", self.lr_gamma));
        }
        if let (Some(schedule), Some(_)) = (self.per_step_schedule(), self.lr_step_size) {
            return err(format!(
                "--lr-step-size and --lr-schedule {schedule} both move the learning rate: keep one"
            ));
        }
        if let Some(w) = self.lr_warmup {
            if !(0.0..1.0).contains(&w)
                || (self.lr_schedule == Some(LrSchedule::OneCycle) && w == 0.0)
            {
                return err(format!(
                    "--lr-warmup is a fraction of the steps, within (0, 1) for one-cycle and [0, 1) for cosine; got {w}"
                ));
            }
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return err(format!(
                "--weight-decay must be >= 0, got {}",
                self.weight_decay
            ));
        }
        if self.nesterov && self.optimizer != OptimizerKind::SgdMomentum {
            return err(format!(
                "--nesterov applies to --optimizer sgd-momentum (this run uses {})",
                self.optimizer
            ));
        }
        if !(0.0..1.0).contains(&self.label_smoothing) {
            return err(format!(
                "--label-smoothing must be within [0, 1), got {}",
                self.label_smoothing
            ));
        }
        if self.augment_crop > 8 {
            return err(format!(
                "--augment-crop pads by at most 8 pixels, got {}",
                self.augment_crop
            ));
        }
        if self.test_every == 0 {
            return err("--test-every must be at least 1 (1 tests after every epoch)");
        }
        if self.recalibrate_batches == Some(0) {
            return err("--recalibrate-batches must be at least 1");
        }
        if let Some(t) = self.time_budget {
            if !(t.is_finite() && t > 0.0) {
                return err(format!("--time-budget must be > 0 seconds, got {t}"));
            }
        }
        if !positive(self.init_std) {
            return err(format!("--init-std must be > 0, got {}", self.init_std));
        }
        if let Some(size) = self.resize {
            if !(8..=512).contains(&size) {
                return err(format!("--resize must be within 8..=512, got {size}"));
            }
        }
        if let Some(size) = self.model.fixed_image_size() {
            if self.image_size() != size {
                return err(format!(
                    "--resize {}: --model {} takes {size}x{size} images (its linear layers are \
                     sized for them); drop --resize",
                    self.image_size(),
                    self.model
                ));
            }
        }
        let min_size = self.model.min_image_size();
        if self.image_size() < min_size {
            return err(format!(
                "--model {} needs images of at least {min_size}x{min_size}, got {} (use --resize)",
                self.model,
                self.image_size()
            ));
        }
        let lenet_only = !self.model.has_lenet_blocks();
        if lenet_only && self.pool.is_some() {
            return err(format!(
                "--pool applies to lenet and lenet-bn, not {}",
                self.model
            ));
        }
        if let Some(pool) = self.pool.filter(|p| p.window() != Some(Pool::LENET_WINDOW)) {
            return err(format!(
                "--pool {pool}: LeNet's conv blocks pool 2x2 windows (use avg or max)"
            ));
        }
        let switched = [
            (self.bn_layers != BnLayers::All, "--bn-layers"),
            (self.bn_position != BnPosition::BeforeAct, "--bn-position"),
            (!self.conv_bias, "--conv-bias off"),
        ];
        if let Some((_, flag)) = switched.iter().find(|(on, _)| *on) {
            if self.model != ModelKind::LenetBn {
                return err(format!(
                    "{flag} applies to lenet-bn, not {} (its layers are fixed)",
                    self.model
                ));
            }
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return err(format!("--dropout must be in [0, 1), got {}", self.dropout));
        }
        if self.dropout > 0.0 && !matches!(self.model, ModelKind::Lenet | ModelKind::LenetBn) {
            return err(format!(
                "--dropout applies to lenet and lenet-bn, not {}",
                self.model
            ));
        }
        if lenet_only && self.activation.is_some() {
            return err(format!(
                "--activation applies to lenet and lenet-bn, not {}",
                self.model
            ));
        }
        if !self.model.has_batch_norm() && self.norm.is_some_and(|n| n.kind != NormKind::None) {
            return err(format!(
                "--model {} has no batch norm: use --model lenet-bn for --norm {}",
                self.model,
                self.norm_kind()
            ));
        }
        if !positive(self.bn_eps) {
            return err(format!("--bn-eps must be > 0, got {}", self.bn_eps));
        }
        let norm = self.norm_config();
        norm.validate().map_err(|e| ConfigError(e.to_string()))?;
        self.model_spec().check_norm().map_err(ConfigError)?;
        if self.batch_size == 1 && norm.kind.is_batch_norm() {
            return err(
                "--batch-size 1: batch norm needs at least 2 examples per batch to train \
                 (use --batch-size 2 or more, or --norm none)",
            );
        }
        Ok(())
    }
}
