//! Batch normalization: the heart of bnlab.
//!
//! - [`functional`]: batch norm as functions of tensors, the chapter's `batch_norm`.
//! - [`layer`]: [`BatchNorm`], the same as a Burn module with parameters and running state: the
//!   layer to put in a model of your own, made with [`BatchNormConfig`] (`examples/own_model.rs`
//!   trains one in a small CNN).
//! - [`NormLayer`]: what a model puts after a conv or linear layer, chosen by [`NormKind`].
//! - [`epilogue`]: what follows BN in the models ([`Epilogue`]: an activation and a pool).
//! - The hand-written op of `--norm fused` (Flex, and CubeCL for wgpu and CUDA) is in
//!   [`crate::ops::batch_norm`]; it can compute the epilogue in the same pass.

pub mod epilogue;
pub mod functional;
pub mod layer;

use burn::module::Module;
use burn::nn::conv::Conv2d;
use burn::nn::pool::MaxPool2d;
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::ops::conv2d::conv2d;
use crate::ops::epilogue::apply_epilogue;

pub use epilogue::{compose_epilogue, Epilogue};
pub use functional::{
    batch_norm, BnError, Convention, Mode, Momentum, Normalizer, RenormSchedule, RunningStats,
    RunningUpdate,
};
pub use layer::{BatchNorm, BatchNormConfig, Kernel};

crate::choice_enum! {
    /// Which batch norm a model uses (`--norm`).
    pub enum NormKind {
        /// This project's layer with its hand-written kernels: Flex on the CPU, CubeCL on wgpu and
        /// CUDA; the scratch layer on LibTorch.
        Fused = "fused",
        /// This project's layer, built from Burn tensor ops ([`BatchNorm`]).
        Scratch = "scratch",
        /// Burn's built-in `nn::BatchNorm`: the chapter's "concise implementation".
        Burn = "burn",
        /// No normalisation.
        None = "none",
        /// The chapter's "lite" BN that only centres: `x - mean`, then γ and β.
        MeanOnly = "mean-only",
        /// The "lite" BN that only scales: `x / sqrt(var + eps)`, then γ and β.
        VarOnly = "var-only",
        /// Ghost BN, `ghost:N`: each training batch normalised in chunks of N examples, each
        /// with its own statistics (Hoffer et al., 2017).
        Ghost = "ghost",
        /// Group norm, `group:G`: per example, over G groups of channels (Burn's GroupNorm);
        /// the same in training and eval, no running statistics.
        Group = "group",
        /// Layer norm for conv nets: per example, over all channels and positions (GroupNorm
        /// with one group, PyTorch's `GroupNorm(1, C)`).
        Layer = "layer",
        /// Instance norm: per example and channel (GroupNorm with a group per channel); not
        /// for linear layers, which have one value per channel.
        Instance = "instance",
        /// Batch renormalization (Ioffe, 2017): the batch statistics corrected towards the
        /// running ones, within limits that widen over training (`renorm_*` settings).
        Renorm = "renorm",
    }
}

impl NormKind {
    /// Whether the name takes a size: `ghost:N`, `group:G`.
    pub fn takes_size(self) -> bool {
        matches!(self, Self::Ghost | Self::Group)
    }

    /// Whether it is batch norm: statistics over the batch, kept as running averages for eval.
    pub fn is_batch_norm(self) -> bool {
        !matches!(
            self,
            Self::None | Self::Group | Self::Layer | Self::Instance
        )
    }
}

/// What `--norm` names: a [`NormKind`] with, for `ghost` and `group`, its size (`ghost:32`,
/// `group:2`). Written and read as that text in recipes and `config.json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NormName {
    /// Which norm.
    pub kind: NormKind,
    /// The ghost batch's examples or the groups; `None` for the kinds without a size.
    pub size: Option<usize>,
}

impl From<NormKind> for NormName {
    fn from(kind: NormKind) -> Self {
        Self { kind, size: None }
    }
}

impl std::fmt::Display for NormName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.size {
            Some(size) => write!(f, "{}:{size}", self.kind),
            None => write!(f, "{}", self.kind),
        }
    }
}

impl std::str::FromStr for NormName {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let (name, size) = match text.split_once(':') {
            Some((name, size)) => (name, Some(size)),
            None => (text, None),
        };
        let kind: NormKind = name.parse().map_err(|e| format!("{e}"))?;
        let example = if kind == NormKind::Ghost { 32 } else { 2 };
        let size = match (kind.takes_size(), size) {
            (true, Some(size)) => match size.parse::<usize>() {
                Ok(n) if n >= 1 => Some(n),
                _ => {
                    return Err(format!(
                        "'{text}': the size after '{kind}:' must be a whole number >= 1"
                    ))
                }
            },
            (true, None) => {
                return Err(format!(
                    "'{text}' needs its size: {kind}:N (for example {kind}:{example})"
                ))
            }
            (false, Some(_)) => {
                return Err(format!("'{text}': {kind} takes no size (write {kind})"))
            }
            (false, None) => None,
        };
        Ok(Self { kind, size })
    }
}

impl Serialize for NormName {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for NormName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str> as Deserialize>::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Which batch norm, and its settings (`--norm`, `--bn-eps`, `--bn-momentum`, `--bn-convention`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct NormConfig {
    /// Which layer, or none.
    pub kind: NormKind,
    /// Added to the variance before its square root; must be > 0.
    pub eps: f64,
    /// Read by `convention`.
    pub momentum: Momentum,
    /// How the running statistics move ([`Convention`]).
    pub convention: Convention,
    /// `ghost:N`'s N or `group:G`'s G; `None` for the other kinds.
    #[serde(default)]
    pub size: Option<usize>,
    /// Whether γ and β are learned; without (`--freeze-affine`), they stay 1 and 0.
    #[serde(default = "learned")]
    pub affine: bool,
    /// `renorm`'s schedule of limits.
    #[serde(default = "NormConfig::default_renorm")]
    pub renorm: RenormSchedule,
}

fn learned() -> bool {
    true
}

impl Default for NormConfig {
    /// This project's layer with PyTorch's settings.
    fn default() -> Self {
        Self::of(NormKind::Scratch)
    }
}

impl NormConfig {
    /// `kind` with PyTorch's settings: eps 1e-5, momentum 0.1 on the new batch.
    pub fn of(kind: NormKind) -> Self {
        Self {
            kind,
            eps: 1e-5,
            momentum: Momentum::PYTORCH,
            convention: Convention::PyTorch,
            size: None,
            affine: true,
            renorm: Self::default_renorm(),
        }
    }

    /// The paper's final limits (r_max 3, d_max 5), reached sooner than its 40,000 steps,
    /// for runs of a few thousand: plain BN for 500 steps, then widening over 1,500.
    pub fn default_renorm() -> RenormSchedule {
        RenormSchedule {
            r_max: 3.0,
            d_max: 5.0,
            warmup: 500,
            ramp: 1500,
        }
    }

    /// `name`'s kind and size with PyTorch's settings.
    pub fn named(name: NormName) -> Self {
        Self {
            size: name.size,
            ..Self::of(name.kind)
        }
    }

    /// The `--norm` value these settings came from.
    pub fn name(&self) -> NormName {
        NormName {
            kind: self.kind,
            size: self.size,
        }
    }

    /// Checks the settings before a model is built with them.
    ///
    /// # Errors
    /// [`BnError::InvalidSetting`] if `eps` is not a finite number > 0, or if [`NormKind::Burn`]
    /// is asked for the d2l convention or a cumulative average, which Burn's layer lacks.
    pub fn validate(&self) -> Result<(), BnError> {
        let layer = BatchNormConfig::new(1)
            .with_renorm((self.kind == NormKind::Renorm).then_some(self.renorm))
            .with_eps(self.eps)
            .with_momentum(self.momentum)
            .with_convention(self.convention);
        layer.validate()?;
        let kind = self.kind;
        if kind.takes_size() != self.size.is_some() {
            return Err(BnError::InvalidSetting(match kind.takes_size() {
                true => format!("--norm {kind} needs its size: {kind}:N"),
                false => format!("--norm {kind} takes no size"),
            }));
        }
        if kind == NormKind::Ghost && self.size < Some(2) {
            return Err(BnError::InvalidSetting(
                "--norm ghost:N needs N >= 2 examples per ghost batch".into(),
            ));
        }
        if !self.affine && kind == NormKind::Burn {
            return Err(BnError::InvalidSetting(
                "--freeze-affine: Burn's built-in layer always learns gamma and beta; use \
                 --norm fused or scratch"
                    .into(),
            ));
        }
        if self.kind == NormKind::Burn
            && (self.convention != Convention::PyTorch || self.momentum.weight().is_none())
        {
            return Err(BnError::InvalidSetting(
                "--norm burn (Burn's built-in layer) supports only the pytorch convention with a \
                 fixed momentum: use --norm scratch for --bn-convention d2l or a cumulative average"
                    .into(),
            ));
        }
        Ok(())
    }
}

/// A batch-norm layer of either implementation.
#[derive(Module, Debug)]
pub enum NormLayer {
    /// This project's layer ([`NormKind::Fused`] and [`NormKind::Scratch`], which differ in its
    /// [`Kernel`]).
    Scratch(BatchNorm),
    /// Burn's built-in layer ([`NormKind::Burn`]).
    Burn(burn::nn::BatchNorm),
    /// Burn's GroupNorm: [`NormKind::Group`], [`NormKind::Layer`] (one group) and
    /// [`NormKind::Instance`] (a group per channel).
    Group(burn::nn::GroupNorm),
}

impl NormLayer {
    /// The layer `config` describes, or `None` for [`NormKind::None`].
    ///
    /// # Panics
    /// On settings that [`NormConfig::validate`] rejects, and on `group:G` with a G that does
    /// not divide `num_features` (`ModelSpec::check_norm` in `crate::models` says so first).
    pub fn new(config: &NormConfig, num_features: usize, device: &Device) -> Option<Self> {
        let renorm = (config.kind == NormKind::Renorm).then_some(config.renorm);
        let own = |kernel, normalizer, ghost_batch| {
            Self::Scratch(
                BatchNormConfig::new(num_features)
                    .with_eps(config.eps)
                    .with_momentum(config.momentum)
                    .with_convention(config.convention)
                    .with_affine(config.affine)
                    .with_kernel(kernel)
                    .with_normalizer(normalizer)
                    .with_ghost_batch(ghost_batch)
                    .with_renorm(renorm)
                    .init(device),
            )
        };
        let groups = |groups| {
            Self::Group(
                burn::nn::GroupNormConfig::new(groups, num_features)
                    .with_epsilon(config.eps)
                    .with_affine(config.affine)
                    .init(device),
            )
        };
        let plain = Normalizer::MeanAndVar;
        match config.kind {
            NormKind::Fused => Some(own(Kernel::Fused, plain, None)),
            NormKind::Scratch => Some(own(Kernel::Composed, plain, None)),
            NormKind::MeanOnly => Some(own(Kernel::Fused, Normalizer::MeanOnly, None)),
            NormKind::VarOnly => Some(own(Kernel::Fused, Normalizer::VarOnly, None)),
            NormKind::Ghost => Some(own(Kernel::Fused, plain, config.size)),
            NormKind::Renorm => Some(own(Kernel::Fused, plain, None)),
            NormKind::Group => Some(groups(config.size.expect("validated: group:G"))),
            NormKind::Layer => Some(groups(1)),
            NormKind::Instance => Some(groups(num_features)),
            NormKind::Burn => Some(Self::Burn(
                burn::nn::BatchNormConfig::new(num_features)
                    .with_epsilon(config.eps)
                    .with_momentum(
                        config
                            .momentum
                            .weight()
                            .expect("validated: a fixed momentum"),
                    )
                    .init(device),
            )),
            NormKind::None => None,
        }
    }

    /// `C`, the channels the layer normalises.
    pub fn num_features(&self) -> usize {
        match self {
            Self::Scratch(bn) => bn.num_features,
            Self::Burn(bn) => bn.gamma.dims()[0],
            Self::Group(norm) => norm.num_channels,
        }
    }

    /// How the running statistics move, in this project's terms; `None` for a norm that keeps
    /// none (group, layer, instance).
    pub fn running_update(&self) -> Option<RunningUpdate> {
        match self {
            Self::Scratch(bn) => Some(bn.update),
            Self::Burn(bn) => Some(RunningUpdate::pytorch(
                Momentum::new(bn.momentum).expect("Burn's layer keeps a momentum in [0, 1]"),
            )),
            Self::Group(_) => None,
        }
    }

    /// Restores a setting that [`Self::running_update`] returned.
    pub fn set_running_update(&mut self, update: RunningUpdate) {
        match self {
            Self::Scratch(bn) => bn.update = update,
            Self::Burn(bn) => {
                bn.momentum = update
                    .momentum
                    .weight()
                    .expect("Burn's layer has a fixed momentum")
            }
            Self::Group(_) => {}
        }
    }

    /// Makes the next training batch weigh `weight` in the running statistics (under the
    /// layer's own convention), as precise BN needs.
    pub fn set_new_batch_weight(&mut self, weight: f64) {
        match self {
            Self::Scratch(bn) => {
                let m = match bn.update.convention {
                    Convention::PyTorch => weight,
                    Convention::D2l => 1.0 - weight,
                };
                bn.update.momentum = Momentum::new(m).expect("a batch weight lies in [0, 1]")
            }
            Self::Burn(bn) => bn.momentum = weight,
            Self::Group(_) => {}
        }
    }

    /// The layer on `(N, C, ...)` input; the output has the input's shape.
    ///
    /// # Panics
    /// As [`BatchNorm::forward`] (and Burn's layer on a shape it does not take).
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        self.forward_then(x, Epilogue::NONE)
    }

    /// The layer, then `epilogue`: in one kernel where `--norm fused` trains on Flex.
    pub fn forward_then<const D: usize>(&self, x: Tensor<D>, epilogue: Epilogue) -> Tensor<D> {
        match self {
            Self::Scratch(bn) => bn.forward_then(x, epilogue),
            Self::Burn(bn) => apply_epilogue(bn.forward(x), epilogue),
            Self::Group(norm) => apply_epilogue(norm.forward(x), epilogue),
        }
    }
}

impl NormLayer {
    /// The eval-mode layer as a per-channel affine map `y = scale * x + shift`, or `None` when
    /// eval mode uses batch statistics (no running statistics kept).
    pub fn eval_affine(&self) -> Option<(Tensor<1>, Tensor<1>)> {
        let (gamma, beta, mean, var, eps, normalizer) = match self {
            Self::Scratch(bn) => {
                let (mean, var) = bn.running_stats()?;
                let gamma = bn.gamma.as_ref().map(|p| p.val());
                let beta = bn.beta.as_ref().map(|p| p.val());
                (gamma, beta, mean, var, bn.eps, bn.normalizer)
            }
            Self::Burn(bn) => (
                Some(bn.gamma.val()),
                Some(bn.beta.val()),
                bn.running_mean.value(),
                bn.running_var.value(),
                bn.epsilon,
                Normalizer::MeanAndVar,
            ),
            Self::Group(_) => return None,
        };
        // The lite variants leave out the division or the subtraction.
        let inv_std = match normalizer {
            Normalizer::MeanOnly => var.ones_like(),
            _ => var.add_scalar(eps).sqrt().recip(),
        };
        let mean = match normalizer {
            Normalizer::VarOnly => mean.zeros_like(),
            _ => mean,
        };
        let scale = match gamma {
            Some(gamma) => gamma * inv_std,
            None => inv_std,
        };
        let shift = mean.neg() * scale.clone();
        let shift = match beta {
            Some(beta) => shift + beta,
            None => shift,
        };
        Some((scale, shift))
    }
}

/// Applies an optional norm layer (the identity when the model has none), then ReLU, then
/// `conv`: one op where `--norm fused` trains on Flex ([`BatchNorm::forward_relu_conv`]).
pub fn norm_relu_conv(norm: &Option<NormLayer>, x: Tensor<4>, conv: &Conv2d) -> Tensor<4> {
    match norm {
        Some(NormLayer::Scratch(bn)) => bn.forward_relu_conv(x, conv),
        _ => conv2d(conv, norm_then(norm, x, Epilogue::RELU)),
    }
}

/// Applies an optional norm layer (the identity when the model has none), then ReLU, then a
/// 2×2 average pool of stride 2, then `conv`: one op where `--norm fused` trains on Flex
/// ([`BatchNorm::forward_relu_avg_pool_conv`]).
pub fn norm_relu_avg_pool_conv(norm: &Option<NormLayer>, x: Tensor<4>, conv: &Conv2d) -> Tensor<4> {
    match norm {
        Some(NormLayer::Scratch(bn)) => bn.forward_relu_avg_pool_conv(x, conv),
        _ => conv2d(conv, norm_then(norm, x, Epilogue::RELU_AVG_POOL_2)),
    }
}

/// Applies an optional norm layer (the identity when the model has none), then ReLU, then
/// `pool`: one op where `--norm fused` trains on Flex ([`BatchNorm::forward_relu_max_pool`]).
pub fn norm_relu_max_pool(norm: &Option<NormLayer>, x: Tensor<4>, pool: &MaxPool2d) -> Tensor<4> {
    match norm {
        Some(NormLayer::Scratch(bn)) => bn.forward_relu_max_pool(x, pool),
        _ => pool.forward(norm_then(norm, x, Epilogue::RELU)),
    }
}

/// Applies an optional norm layer (the identity when the model has none), then `epilogue`:
/// the activation and pooling that follow it, computed in the same kernel where `--norm fused`
/// trains on Flex.
pub fn norm_then<const D: usize>(
    norm: &Option<NormLayer>,
    x: Tensor<D>,
    epilogue: Epilogue,
) -> Tensor<D> {
    match norm {
        Some(layer) => layer.forward_then(x, epilogue),
        None => apply_epilogue(x, epilogue),
    }
}
