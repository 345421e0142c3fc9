//! The chapter's networks.

pub mod check;
pub mod densenet;
pub mod fold;
pub mod gluon;
pub mod layers;
pub mod lenet;
pub mod resnet;

use burn::module::Module;
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};

pub use check::check_weights;
pub use densenet::DenseNet;
pub use fold::fold_bn;
pub use gluon::GluonLeNet;
pub use layers::{LayerList, LayerMut, NamedLayer, Trace, WeightInit};
pub use lenet::LeNet;
pub use resnet::ResNet18;

use crate::norm::epilogue::{Activation, Pool};
use crate::norm::{NormConfig, NormKind, NormLayer};

crate::choice_enum! {
    /// `--model`
    pub enum ModelKind {
        /// d2l's LeNet without batch norm (the baseline of the comparison).
        Lenet = "lenet",
        /// d2l's LeNet with batch norm after each conv and linear layer but the last.
        LenetBn = "lenet-bn",
        /// The MXNet notebook's LeNet: ReLU, 20 and 50 channels, max pooling, BN after the convs.
        LenetGluon = "lenet-gluon",
        /// d2l's ResNet-18.
        Resnet18 = "resnet18",
        /// d2l's DenseNet (4 dense blocks of 4 layers, growth rate 32).
        Densenet = "densenet",
    }
}

impl ModelKind {
    /// Whether the architecture has batch-norm layers: all but `lenet`, which
    /// [`ModelSpec::of`] builds with [`NormKind::None`] whatever norm is asked for.
    pub fn has_batch_norm(self) -> bool {
        self != Self::Lenet
    }

    /// How the model's conv and linear weights start unless told otherwise: Xavier-uniform for
    /// the LeNets (d2l's PyTorch notebooks), N(0, 0.01²) for the MXNet notebook's, PyTorch's
    /// default for ResNet and DenseNet.
    pub fn default_init(self) -> WeightInit {
        match self {
            Self::Lenet | Self::LenetBn => WeightInit::XavierUniform,
            Self::LenetGluon => WeightInit::Normal { std: 0.01 },
            Self::Resnet18 | Self::Densenet => WeightInit::PyTorchDefault,
        }
    }

    /// Whether `--pool` and `--activation` apply (the d2l LeNets).
    pub fn has_lenet_blocks(self) -> bool {
        matches!(self, Self::Lenet | Self::LenetBn)
    }

    /// The smallest input side the architecture accepts.
    pub fn min_image_size(self) -> usize {
        match self {
            Self::Lenet | Self::LenetBn | Self::LenetGluon => 28,
            Self::Resnet18 => 16,
            Self::Densenet => 32,
        }
    }

    /// The one input side the architecture takes, where its linear layers are sized for it
    /// (the LeNets: 28 × 28); `None` where a global pool comes before them.
    pub fn fixed_image_size(self) -> Option<usize> {
        match self {
            Self::Lenet | Self::LenetBn | Self::LenetGluon => Some(28),
            Self::Resnet18 | Self::Densenet => None,
        }
    }
}

/// Everything that fixes a model's architecture and initial weights (with a seed).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ModelSpec {
    /// The network.
    pub kind: ModelKind,
    /// Its batch-norm layers: which implementation ([`NormKind::None`] leaves them out) and
    /// their ε, momentum and running-statistics convention.
    pub norm: NormConfig,
    /// The pool after each conv block of the d2l LeNets (`lenet`, `lenet-bn`): 2 × 2 average
    /// or max. The other models have theirs fixed and ignore it.
    pub pool: Pool,
    /// The activation after every layer but the last of the d2l LeNets; the other models use
    /// ReLU and ignore it.
    pub activation: Activation,
    /// How conv and linear weights are drawn ([`ModelKind::default_init`] unless told
    /// otherwise); biases always get PyTorch's default U(±1/√fan_in).
    pub init: WeightInit,
}

impl ModelSpec {
    /// A model of `kind` with the chapter's defaults and PyTorch's batch-norm settings.
    pub fn of(kind: ModelKind, norm: NormKind) -> Self {
        Self {
            kind,
            norm: NormConfig::of(if kind.has_batch_norm() {
                norm
            } else {
                NormKind::None
            }),
            // The chapter's LeNet: sigmoid and 2 × 2 average pooling.
            pool: Pool::Avg(Pool::LENET_WINDOW),
            activation: Activation::Sigmoid,
            init: kind.default_init(),
        }
    }

    /// A new model on `device`, its conv and linear weights drawn from one generator seeded
    /// with `seed` (see [`layers::Initializer`]): the same spec and seed give the same weights
    /// on every backend.
    pub fn init(&self, seed: u64, device: &Device) -> Model {
        match self.kind {
            ModelKind::Lenet | ModelKind::LenetBn => Model::LeNet(LeNet::new(self, seed, device)),
            ModelKind::LenetGluon => Model::Gluon(GluonLeNet::new(self, seed, device)),
            ModelKind::Resnet18 => Model::ResNet(ResNet18::new(self, seed, device)),
            ModelKind::Densenet => Model::DenseNet(DenseNet::new(self, seed, device)),
        }
    }
}

/// Any of the chapter's networks. (The variants hold layer handles, not weights, so their
/// size difference is a few kilobytes at most.)
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum Model {
    /// `lenet` and `lenet-bn`: d2l's LeNet, without or with batch norm.
    LeNet(LeNet),
    /// `lenet-gluon`: the MXNet notebook's LeNet.
    Gluon(GluonLeNet),
    /// `resnet18`.
    ResNet(ResNet18),
    /// `densenet`.
    DenseNet(DenseNet),
}

impl Model {
    /// Images `(N, 1, H, W)` to logits `(N, 10)`.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<2> {
        self.forward_traced(x, &mut Trace::off())
    }

    /// The forward pass, recording each top-level block's output shape in `trace`.
    pub fn forward_traced(&self, x: Tensor<4>, trace: &mut Trace) -> Tensor<2> {
        match self {
            Self::LeNet(m) => m.forward_traced(x, trace),
            Self::Gluon(m) => m.forward_traced(x, trace),
            Self::ResNet(m) => m.forward_traced(x, trace),
            Self::DenseNet(m) => m.forward_traced(x, trace),
        }
    }

    /// Every layer with weights, in PyTorch's `state_dict` order, with its names and BN
    /// partner: what interop, folding and `inspect` walk.
    pub fn layers(&mut self) -> LayerList<'_> {
        match self {
            Self::LeNet(m) => m.layers(),
            Self::Gluon(m) => m.layers(),
            Self::ResNet(m) => m.layers(),
            Self::DenseNet(m) => m.layers(),
        }
    }

    /// Every batch-norm layer, with bnlab's name for it.
    pub fn norms_mut(&mut self) -> Vec<(String, &mut NormLayer)> {
        self.layers()
            .layers
            .into_iter()
            .filter_map(|l| match l.layer {
                LayerMut::Norm(norm) => norm.as_mut().map(|n| (l.name, n)),
                _ => None,
            })
            .collect()
    }
}
