//! The chapter's networks.

pub mod check;
pub mod densenet;
pub mod fold;
pub mod gluon;
pub mod layers;
pub mod lenet;
pub mod resnet;
pub mod speednet;

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
pub use speednet::SpeedNet;

use crate::norm::epilogue::{Activation, Pool};
use crate::norm::{NormConfig, NormKind, NormLayer};

/// What a network needs to be one of bnlab's models: how it is built, run and walked. A model's
/// file implements it; one entry in the `networks!` list below makes it a `--model`.
pub trait Network: Module + Sized {
    /// What the architecture takes and how it starts, for `kind` (one of the `--model` names
    /// registered with this network).
    fn facts(kind: ModelKind) -> Facts;

    /// The network `spec` describes (BN layers only if `spec.norm` has them), its conv and
    /// linear weights drawn from one generator seeded with `seed` (see
    /// [`layers::Initializer`]), on `device`.
    fn new(spec: &ModelSpec, seed: u64, device: &Device) -> Self;

    /// `(N, 1, H, W)` images to `(N, 10)` logits, recording each top-level block's output
    /// shape in `trace`.
    fn forward_traced(&self, x: Tensor<4>, trace: &mut Trace) -> Tensor<2>;

    /// Every layer with weights, in PyTorch's `state_dict` order, with its names and BN
    /// partner: what interop, folding and `inspect` walk.
    fn layers(&mut self) -> LayerList<'_>;

    /// A layer's key in the chapter notebook's own definition of the network, from its key in
    /// d2l's numeric `nn.Sequential` (as [`Self::layers`] names it): `None` where the notebook
    /// defines the network as d2l does (the LeNets).
    fn notebook_key(_d2l: &str) -> Option<String> {
        None
    }
}

/// The facts about an architecture that the configuration's checks and defaults need.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Facts {
    /// Whether it has batch-norm layers (all but `lenet`, which [`ModelSpec::of`] builds with
    /// [`NormKind::None`] whatever norm is asked for).
    pub batch_norm: bool,
    /// How its conv and linear weights start unless told otherwise.
    pub default_init: WeightInit,
    /// Whether `--pool` and `--activation` apply (the d2l LeNets).
    pub lenet_blocks: bool,
    /// The smallest input side it accepts.
    pub min_image_size: usize,
    /// The one input side it takes, where its linear layers are sized for it; `None` where a
    /// global pool comes before them.
    pub fixed_image_size: Option<usize>,
    /// The side its recipe trains on: what `bnlab shapes` shows unless told otherwise.
    pub recipe_image_size: usize,
}

impl Facts {
    /// A network whose linear layers are sized for 28 × 28 images, with batch norm and
    /// PyTorch's default initialisation.
    pub const LENET_SIZED: Self = Self {
        batch_norm: true,
        default_init: WeightInit::PyTorchDefault,
        lenet_blocks: false,
        min_image_size: 28,
        fixed_image_size: Some(28),
        recipe_image_size: 28,
    };

    /// A network with a global pool before its linear layer (any side from its minimum up),
    /// with batch norm and PyTorch's default initialisation.
    pub const GLOBAL_POOL: Self = Self {
        fixed_image_size: None,
        ..Self::LENET_SIZED
    };
}

/// Declares the models once: each entry names a [`Model`] variant, the [`Network`] type it
/// holds and the `--model` names (with their help) that build it. The variant names are part
/// of saved checkpoints.
macro_rules! networks {
    ($(
        $(#[doc = $variant_doc:literal])*
        $variant:ident($network:ty) => {
            $( $(#[doc = $kind_doc:literal])* $kind:ident = $name:literal, )+
        }
    )+) => {
        crate::choice_enum! {
            /// `--model`
            pub enum ModelKind {
                $($( $(#[doc = $kind_doc])* $kind = $name, )+)+
            }
        }

        /// Any of the chapter's networks. (The variants hold layer handles, not weights, so
        /// their size difference is a few kilobytes at most.)
        #[allow(clippy::large_enum_variant)]
        #[derive(Module, Debug)]
        pub enum Model {
            $( $(#[doc = $variant_doc])* $variant($network), )+
        }

        impl ModelKind {
            /// What the architecture takes and how it starts.
            pub fn facts(self) -> Facts {
                match self {
                    $( $(Self::$kind)|+ => <$network as Network>::facts(self), )+
                }
            }

            /// A layer's key in the chapter notebook's definition, from its d2l key (see
            /// [`Network::notebook_key`]); `None` where the two layouts are the same.
            pub fn notebook_key(self, d2l: &str) -> Option<String> {
                match self {
                    $( $(Self::$kind)|+ => <$network as Network>::notebook_key(d2l), )+
                }
            }
        }

        impl ModelSpec {
            /// A new model on `device`, its conv and linear weights drawn from one generator
            /// seeded with `seed` (see [`layers::Initializer`]): the same spec and seed give
            /// the same weights on every backend.
            pub fn init(&self, seed: u64, device: &Device) -> Model {
                match self.kind {
                    $( $(ModelKind::$kind)|+ => {
                        Model::$variant(<$network as Network>::new(self, seed, device))
                    } )+
                }
            }
        }

        impl Model {
            /// The forward pass, recording each top-level block's output shape in `trace`.
            pub fn forward_traced(&self, x: Tensor<4>, trace: &mut Trace) -> Tensor<2> {
                match self {
                    $( Self::$variant(m) => m.forward_traced(x, trace), )+
                }
            }

            /// Every layer with weights, in PyTorch's `state_dict` order, with its names and
            /// BN partner: what interop, folding and `inspect` walk.
            pub fn layers(&mut self) -> LayerList<'_> {
                match self {
                    $( Self::$variant(m) => m.layers(), )+
                }
            }
        }
    };
}

// The models: a network's file, and its entry here.
networks! {
    /// `lenet` and `lenet-bn`: d2l's LeNet, without or with batch norm.
    LeNet(LeNet) => {
        /// d2l's LeNet without batch norm (the baseline of the comparison).
        Lenet = "lenet",
        /// d2l's LeNet with batch norm after each conv and linear layer but the last.
        LenetBn = "lenet-bn",
    }
    /// `lenet-gluon`: the MXNet notebook's LeNet.
    Gluon(GluonLeNet) => {
        /// The MXNet notebook's LeNet: ReLU, 20 and 50 channels, max pooling, BN after the convs.
        LenetGluon = "lenet-gluon",
    }
    /// `resnet18`.
    ResNet(ResNet18) => {
        /// d2l's ResNet-18.
        Resnet18 = "resnet18",
    }
    /// `densenet`.
    DenseNet(DenseNet) => {
        /// d2l's DenseNet (4 dense blocks of 4 layers, growth rate 32).
        Densenet = "densenet",
    }
    /// `speednet`.
    Speed(SpeedNet) => {
        /// A small BN CNN for the speedrun recipe: four 3×3 convs (24 to 96 channels), BN after each.
        Speednet = "speednet",
        /// speednet with 32 to 128 channels.
        SpeednetWide = "speednet-wide",
        /// speednet-wide with a second conv at 7 × 7 (five convs), for speedrun-long.
        SpeednetDeep = "speednet-deep",
    }
}

impl ModelKind {
    /// Whether the architecture has batch-norm layers: all but `lenet`, which
    /// [`ModelSpec::of`] builds with [`NormKind::None`] whatever norm is asked for.
    pub fn has_batch_norm(self) -> bool {
        self.facts().batch_norm
    }

    /// How the model's conv and linear weights start unless told otherwise: Xavier-uniform for
    /// the LeNets (d2l's PyTorch notebooks), N(0, 0.01²) for the MXNet notebook's, PyTorch's
    /// default for ResNet and DenseNet.
    pub fn default_init(self) -> WeightInit {
        self.facts().default_init
    }

    /// Whether `--pool` and `--activation` apply (the d2l LeNets).
    pub fn has_lenet_blocks(self) -> bool {
        self.facts().lenet_blocks
    }

    /// The smallest input side the architecture accepts.
    pub fn min_image_size(self) -> usize {
        self.facts().min_image_size
    }

    /// The one input side the architecture takes, where its linear layers are sized for it
    /// (the LeNets: 28 × 28); `None` where a global pool comes before them.
    pub fn fixed_image_size(self) -> Option<usize> {
        self.facts().fixed_image_size
    }
}

crate::choice_enum! {
    /// Which of LeNet-BN's layers get a norm (`--bn-layers`).
    pub enum BnLayers {
        /// After both convs and both hidden linear layers, as the chapter.
        All = "all",
        /// After the two convs only.
        Conv = "conv",
        /// After the two hidden linear layers only.
        Fc = "fc",
    }
}

crate::choice_enum! {
    /// Where LeNet-BN's norm sits relative to the activation (`--bn-position`).
    pub enum BnPosition {
        /// layer → norm → activation, as the chapter (and the BN paper).
        BeforeAct = "before-act",
        /// layer → activation → norm (then the pool, after the convs).
        AfterAct = "after-act",
    }
}

// choice_enum! takes no #[default] on a variant.
#[allow(clippy::derivable_impls)]
impl Default for BnLayers {
    fn default() -> Self {
        Self::All
    }
}

#[allow(clippy::derivable_impls)]
impl Default for BnPosition {
    fn default() -> Self {
        Self::BeforeAct
    }
}

fn on() -> bool {
    true
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
    /// LeNet-BN: which layers get a norm.
    #[serde(default)]
    pub bn_layers: BnLayers,
    /// LeNet-BN: norm before or after the activation.
    #[serde(default)]
    pub bn_position: BnPosition,
    /// LeNet-BN: whether the layers a norm follows keep their bias (BN's β makes it
    /// redundant). Without, the other weights are drawn as with it.
    #[serde(default = "on")]
    pub conv_bias: bool,
    /// The LeNets: dropout's probability after each hidden linear layer's activation.
    #[serde(default)]
    pub dropout: f64,
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
            bn_layers: BnLayers::All,
            bn_position: BnPosition::BeforeAct,
            conv_bias: true,
            dropout: 0.0,
        }
    }
}

impl ModelSpec {
    /// Checks that the norm fits every layer it goes into: `group:G` needs G to divide each
    /// norm layer's channels, and `instance` cannot follow a linear layer (one value per
    /// channel and example: nothing to normalise over).
    ///
    /// # Errors
    /// A one-line message naming the layer and what to choose instead.
    pub fn check_norm(&self) -> Result<(), String> {
        let kind = self.norm.kind;
        if !matches!(kind, NormKind::Group | NormKind::Instance) {
            return Ok(());
        }
        // The layers and their channels, from the same model with batch norm before the
        // activations (where each norm layer lists the layer it follows).
        let probe = ModelSpec {
            norm: NormConfig::of(NormKind::Scratch),
            bn_position: BnPosition::BeforeAct,
            ..*self
        };
        let mut model = probe.init(0, &crate::device::inference_device());
        let layers = model.layers().layers;
        let after_linear: Vec<bool> = layers
            .iter()
            .map(|l| {
                l.partner
                    .is_some_and(|p| matches!(layers[p].layer, LayerMut::Linear(_)))
            })
            .collect();
        let mut channels = Vec::new();
        for (layer, after_linear) in layers.iter().zip(after_linear) {
            if let LayerMut::Norm(Some(NormLayer::Scratch(bn))) = &layer.layer {
                if kind == NormKind::Instance && after_linear {
                    return Err(format!(
                        "--norm instance: {} {} follows a linear layer, which has one value per \
                         channel to normalise (use --bn-layers conv, or another norm)",
                        self.kind, layer.name
                    ));
                }
                channels.push((layer.name.clone(), bn.num_features));
            }
        }
        if let (NormKind::Group, Some(groups)) = (kind, self.norm.size) {
            if let Some((name, c)) = channels.iter().find(|(_, c)| c % groups != 0) {
                let gcd = channels.iter().fold(0, |a, &(_, c)| gcd(a, c));
                return Err(format!(
                    "--norm group:{groups}: {} {name} has {c} channels, which {groups} groups do \
                     not divide (use a G that divides {gcd})",
                    self.kind
                ));
            }
        }
        Ok(())
    }
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

impl Model {
    /// Images `(N, 1, H, W)` to logits `(N, 10)`.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<2> {
        self.forward_traced(x, &mut Trace::off())
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::choice::Choice;

    #[test]
    fn every_registered_model_builds_and_runs_at_its_sizes() {
        let device = crate::device::inference_device();
        for &kind in ModelKind::ALL {
            let facts = kind.facts();
            assert!(facts.min_image_size <= facts.recipe_image_size, "{kind}");
            if let Some(side) = facts.fixed_image_size {
                assert_eq!(
                    (side, side),
                    (facts.min_image_size, facts.recipe_image_size)
                );
            }
            let spec = ModelSpec::of(kind, NormKind::Scratch);
            assert_eq!(spec.norm.kind != NormKind::None, facts.batch_norm, "{kind}");
            let mut model = spec.init(0, &device);
            for side in [facts.min_image_size, facts.recipe_image_size] {
                let logits = model.forward(Tensor::zeros([2, 1, side, side], &device));
                assert_eq!(logits.dims(), [2, 10], "{kind} at {side}");
            }
            let norms = model.norms_mut().len();
            assert_eq!(norms > 0, facts.batch_norm, "{kind}: {norms} BN layers");
        }
    }
}
