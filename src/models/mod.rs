//! The chapter's networks.

pub mod layers;
pub mod lenet;

use burn::module::Module;
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};

pub use layers::{ActivationKind, PoolKind, WeightInit};
pub use lenet::{LeNet, LeNetConfig};

use crate::norm::NormConfig;

/// `--model`
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum ModelKind {
    /// d2l's LeNet with batch norm after each conv and linear layer but the last.
    LenetBn,
}

/// Everything that fixes a model's architecture.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ModelSpec {
    pub kind: ModelKind,
    pub norm: NormConfig,
}

/// Any of the chapter's networks.
#[derive(Module, Debug)]
pub enum Model {
    LeNet(LeNet),
}

impl ModelSpec {
    pub fn init(&self, seed: u64, device: &Device) -> Model {
        match self.kind {
            ModelKind::LenetBn => Model::LeNet(
                LeNetConfig {
                    norm: self.norm,
                    ..Default::default()
                }
                .init(seed, device),
            ),
        }
    }
}

impl Model {
    /// Images `(N, 1, H, W)` to logits `(N, 10)`.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<2> {
        match self {
            Self::LeNet(m) => m.forward(x),
        }
    }
}
