//! Batch normalization: the heart of bnlab.
//!
//! - [`functional`]: batch norm as functions of tensors, the chapter's `batch_norm`.
//! - [`layer`]: [`BatchNorm`], the same as a Burn module with parameters and running state.
//! - [`NormLayer`]: what a model puts after a conv or linear layer, chosen by [`NormKind`].

pub mod functional;
pub mod layer;

use burn::module::Module;
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};

pub use functional::{batch_norm, BnError, Convention, Mode, RunningStats, RunningUpdate};
pub use layer::{BatchNorm, BatchNormConfig};

/// Which batch norm a model uses (`--norm`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum NormKind {
    /// This project's layer, built from Burn tensor ops ([`BatchNorm`]).
    Scratch,
    /// Burn's built-in `nn::BatchNorm`: the chapter's "concise implementation".
    Burn,
    /// No normalisation.
    None,
}

/// A batch-norm layer of either implementation.
#[derive(Module, Debug)]
pub enum NormLayer {
    Scratch(BatchNorm),
    Burn(burn::nn::BatchNorm),
}

impl NormLayer {
    /// The layer for `kind` with PyTorch's defaults, or `None` for [`NormKind::None`].
    pub fn new(kind: NormKind, num_features: usize, device: &Device) -> Option<Self> {
        match kind {
            NormKind::Scratch => Some(Self::Scratch(
                BatchNormConfig::new(num_features).init(device),
            )),
            NormKind::Burn => Some(Self::Burn(
                burn::nn::BatchNormConfig::new(num_features).init(device),
            )),
            NormKind::None => None,
        }
    }

    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        match self {
            Self::Scratch(bn) => bn.forward(x),
            Self::Burn(bn) => bn.forward(x),
        }
    }
}

/// Applies an optional norm layer: the identity when the model has none.
pub fn apply_norm<const D: usize>(norm: &Option<NormLayer>, x: Tensor<D>) -> Tensor<D> {
    match norm {
        Some(layer) => layer.forward(x),
        None => x,
    }
}
