//! LeNet with batch norm after every conv and linear layer but the last, as in d2l:
//!
//! ```text
//! Conv(1→6, 5) → BN → act → pool 2 → Conv(6→16, 5) → BN → act → pool 2 → Flatten →
//! Linear(256→120) → BN → act → Linear(120→84) → BN → act → Linear(84→10)
//! ```
//!
//! With [`crate::norm::NormKind::None`] the BN layers are left out: the plain LeNet of the comparison.

use crate::ops::conv2d::conv2d;
use burn::module::Module;
use burn::nn::conv::Conv2d;
use burn::nn::Linear;
use burn::tensor::{Device, Tensor};

use super::layers::{Initializer, LayerList, Sequential, Trace};
use super::{Facts, ModelKind, ModelSpec, Network, WeightInit};
use crate::norm::epilogue::{Activation, Pool};
use crate::norm::{norm_then, Epilogue, NormLayer};

/// d2l's LeNet, with or without batch norm (the layer order is in the module docs). The
/// shapes below are those of 28×28 images. Each BN layer is `None` in a model built without
/// batch norm.
#[derive(Module, Debug)]
pub struct LeNet {
    /// Conv(1→6, 5×5), no padding: `(N, 1, 28, 28)` → `(N, 6, 24, 24)`.
    pub conv1: Conv2d,
    /// BN over conv1's 6 channels.
    pub bn1: Option<NormLayer>,
    /// Conv(6→16, 5×5), no padding: `(N, 6, 12, 12)` → `(N, 16, 8, 8)`.
    pub conv2: Conv2d,
    /// BN over conv2's 16 channels.
    pub bn2: Option<NormLayer>,
    /// Linear(256→120): the pooled `(N, 16, 4, 4)` maps, flattened, in.
    pub fc1: Linear,
    /// BN over fc1's 120 features.
    pub bn3: Option<NormLayer>,
    /// Linear(120→84).
    pub fc2: Linear,
    /// BN over fc2's 84 features.
    pub bn4: Option<NormLayer>,
    /// Linear(84→10): the logits.
    pub fc3: Linear,
    /// After each conv block (2 × 2 windows).
    #[module(skip)]
    pub pool: Pool,
    /// After every layer but the last.
    #[module(skip)]
    pub activation: Activation,
}

impl Network for LeNet {
    fn facts(kind: ModelKind) -> Facts {
        Facts {
            batch_norm: kind != ModelKind::Lenet,
            default_init: WeightInit::XavierUniform,
            lenet_blocks: true,
            ..Facts::LENET_SIZED
        }
    }

    /// The LeNet `spec` describes (BN layers only if `spec.norm` has them; `spec.pool` and
    /// `spec.activation` between the layers), its weights drawn from a generator seeded with
    /// `seed`, on `device`.
    fn new(spec: &ModelSpec, seed: u64, device: &Device) -> Self {
        let mut init = Initializer::new(seed, spec.init, device);
        let norm = |c| NormLayer::new(&spec.norm, c, device);
        Self {
            conv1: init.conv2d(1, 6, 5, 1, 0),
            bn1: norm(6),
            conv2: init.conv2d(6, 16, 5, 1, 0),
            bn2: norm(16),
            fc1: init.linear(16 * 4 * 4, 120),
            bn3: norm(120),
            fc2: init.linear(120, 84),
            bn4: norm(84),
            fc3: init.linear(84, 10),
            pool: spec.pool,
            activation: spec.activation,
        }
    }

    /// `(N, 1, 28, 28)` images to `(N, 10)` logits.
    fn forward_traced(&self, x: Tensor<4>, trace: &mut Trace) -> Tensor<2> {
        // BN → activation (→ pool): one kernel per block under `--norm fused`.
        let act = Epilogue {
            activation: self.activation,
            pool: Pool::None,
        };
        let act_pool = Epilogue {
            pool: self.pool,
            ..act
        };
        let x = norm_then(&self.bn1, conv2d(&self.conv1, x), act_pool);
        trace.record("conv1-bn-act-pool", &x.dims());
        let x = norm_then(&self.bn2, conv2d(&self.conv2, x), act_pool);
        trace.record("conv2-bn-act-pool", &x.dims());
        let x: Tensor<2> = x.flatten(1, 3);
        trace.record("flatten", &x.dims());
        let x = norm_then(&self.bn3, self.fc1.forward(x), act);
        trace.record("fc1-bn-act", &x.dims());
        let x = norm_then(&self.bn4, self.fc2.forward(x), act);
        trace.record("fc2-bn-act", &x.dims());
        let x = self.fc3.forward(x);
        trace.record("fc3", &x.dims());
        x
    }

    /// The layers with weights, keyed as d2l's `nn.Sequential`: conv `0`, BN `1`, (act, pool),
    /// conv `4`, BN `5`, (act, pool, flatten), linear `9`, BN `10`, (act), linear `12`, BN `13`,
    /// (act), linear `15`; without BN the indices after each left-out layer shift.
    fn layers(&mut self) -> LayerList<'_> {
        let (mut list, mut seq) = (LayerList::default(), Sequential::new(""));
        let conv1 = list.conv("conv1", seq.next_key(), &mut self.conv1);
        list.norm_in(&mut seq, "bn1", &mut self.bn1, Some(conv1));
        seq.skip(2); // activation, pool
        let conv2 = list.conv("conv2", seq.next_key(), &mut self.conv2);
        list.norm_in(&mut seq, "bn2", &mut self.bn2, Some(conv2));
        seq.skip(3); // activation, pool, flatten
        let fc1 = list.linear("fc1", seq.next_key(), &mut self.fc1);
        list.norm_in(&mut seq, "bn3", &mut self.bn3, Some(fc1));
        seq.skip(1); // activation
        let fc2 = list.linear("fc2", seq.next_key(), &mut self.fc2);
        list.norm_in(&mut seq, "bn4", &mut self.bn4, Some(fc2));
        seq.skip(1); // activation
        list.linear("fc3", seq.next_key(), &mut self.fc3);
        list
    }
}
