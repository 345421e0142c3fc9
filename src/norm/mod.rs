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
    batch_norm, BnError, Convention, Mode, Momentum, RunningStats, RunningUpdate,
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
        }
    }

    /// Checks the settings before a model is built with them.
    ///
    /// # Errors
    /// [`BnError::InvalidSetting`] if `eps` is not a finite number > 0, or if [`NormKind::Burn`]
    /// is asked for the d2l convention or a cumulative average, which Burn's layer lacks.
    pub fn validate(&self) -> Result<(), BnError> {
        let layer = BatchNormConfig::new(1)
            .with_eps(self.eps)
            .with_momentum(self.momentum)
            .with_convention(self.convention);
        layer.validate()?;
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
}

impl NormLayer {
    /// The layer `config` describes, or `None` for [`NormKind::None`].
    ///
    /// # Panics
    /// On settings that [`NormConfig::validate`] rejects.
    pub fn new(config: &NormConfig, num_features: usize, device: &Device) -> Option<Self> {
        let own = |kernel| {
            Self::Scratch(
                BatchNormConfig::new(num_features)
                    .with_eps(config.eps)
                    .with_momentum(config.momentum)
                    .with_convention(config.convention)
                    .with_kernel(kernel)
                    .init(device),
            )
        };
        match config.kind {
            NormKind::Fused => Some(own(Kernel::Fused)),
            NormKind::Scratch => Some(own(Kernel::Composed)),
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

    /// How the running statistics move, in this project's terms.
    pub fn running_update(&self) -> RunningUpdate {
        match self {
            Self::Scratch(bn) => bn.update,
            Self::Burn(bn) => RunningUpdate::pytorch(
                Momentum::new(bn.momentum).expect("Burn's layer keeps a momentum in [0, 1]"),
            ),
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
        }
    }
}

impl NormLayer {
    /// The eval-mode layer as a per-channel affine map `y = scale * x + shift`, or `None` when
    /// eval mode uses batch statistics (no running statistics kept).
    pub fn eval_affine(&self) -> Option<(Tensor<1>, Tensor<1>)> {
        let (gamma, beta, mean, var, eps) = match self {
            Self::Scratch(bn) => {
                let (mean, var) = bn.running_stats()?;
                let gamma = bn.gamma.as_ref().map(|p| p.val());
                let beta = bn.beta.as_ref().map(|p| p.val());
                (gamma, beta, mean, var, bn.eps)
            }
            Self::Burn(bn) => (
                Some(bn.gamma.val()),
                Some(bn.beta.val()),
                bn.running_mean.value(),
                bn.running_var.value(),
                bn.epsilon,
            ),
        };
        let inv_std = var.add_scalar(eps).sqrt().recip();
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
