//! The MXNet (Gluon) notebook's LeNet with batch norm, ReLU and max pooling:
//!
//! ```text
//! Conv 20@5×5 → BN → ReLU → MaxPool 2 → Conv 50@3×3 → BN → ReLU → MaxPool 2 →
//! Flatten → Dense 1250→128 → ReLU → Dense 128→10
//! ```

use burn::module::Module;
use burn::nn::conv::Conv2d;
use burn::nn::pool::{MaxPool2d, MaxPool2dConfig};
use burn::nn::Linear;
use burn::tensor::activation::relu;
use burn::tensor::{Device, Tensor};

use super::layers::{Initializer, LayerList, Sequential, Trace};
use super::{Facts, ModelKind, ModelSpec, Network, WeightInit};
use crate::norm::epilogue::Pool;
use crate::norm::{norm_then, Epilogue, NormLayer};
use crate::ops::conv2d::conv2d;

/// The MXNet notebook's LeNet (the layer order is in the module docs). The shapes below are
/// those of 28×28 images. Each BN layer is `None` in a model built without batch norm.
#[derive(Module, Debug)]
pub struct GluonLeNet {
    /// Conv(1→20, 5×5), no padding: `(N, 1, 28, 28)` → `(N, 20, 24, 24)`.
    pub conv1: Conv2d,
    /// BN over conv1's 20 channels.
    pub bn1: Option<NormLayer>,
    /// Conv(20→50, 3×3), no padding: `(N, 20, 12, 12)` → `(N, 50, 10, 10)`.
    pub conv2: Conv2d,
    /// BN over conv2's 50 channels.
    pub bn2: Option<NormLayer>,
    /// Linear(1250→128): the pooled `(N, 50, 5, 5)` maps, flattened, in; ReLU follows.
    pub fc1: Linear,
    /// Linear(128→10): the logits.
    pub fc2: Linear,
    /// MaxPool 2×2, stride 2, after each conv block; the forward pass applies it in the BN
    /// epilogue ([`Epilogue`]), taking only its window size from here.
    pub pool: MaxPool2d,
}

impl Network for GluonLeNet {
    fn facts(_: ModelKind) -> Facts {
        // The notebook draws conv and dense weights from N(0, 0.01²) (MXNet's default).
        Facts {
            default_init: WeightInit::Normal { std: 0.01 },
            ..Facts::LENET_SIZED
        }
    }

    /// The network with `spec`'s batch norm (BN layers only if `spec.norm` has them), its
    /// weights drawn from a generator seeded with `seed`, on `device`. It has ReLU and max
    /// pooling whatever `spec.pool` and `spec.activation` say.
    fn new(spec: &ModelSpec, seed: u64, device: &Device) -> Self {
        let mut init = Initializer::new(seed, spec.init, device);
        Self {
            conv1: init.conv2d(1, 20, 5, 1, 0),
            bn1: NormLayer::new(&spec.norm, 20, device),
            conv2: init.conv2d(20, 50, 3, 1, 0),
            bn2: NormLayer::new(&spec.norm, 50, device),
            fc1: init.linear(1250, 128),
            fc2: init.linear(128, 10),
            pool: MaxPool2dConfig::new([2, 2]).init(),
        }
    }

    /// `(N, 1, 28, 28)` images to `(N, 10)` logits, recording each block's output shape in
    /// `trace`.
    fn forward_traced(&self, x: Tensor<4>, trace: &mut Trace) -> Tensor<2> {
        // BN → ReLU → 2×2 max pool: one kernel per block under `--norm fused`.
        let relu_pool = Epilogue {
            pool: Pool::Max(self.pool.kernel_size[0]),
            ..Epilogue::RELU
        };
        let x = norm_then(&self.bn1, conv2d(&self.conv1, x), relu_pool);
        trace.record("conv1-bn-relu-pool", &x.dims());
        let x = norm_then(&self.bn2, conv2d(&self.conv2, x), relu_pool);
        trace.record("conv2-bn-relu-pool", &x.dims());
        let x = relu(self.fc1.forward(x.flatten::<2>(1, 3)));
        trace.record("dense1-relu", &x.dims());
        let x = self.fc2.forward(x);
        trace.record("dense2", &x.dims());
        x
    }

    /// The layers with weights, keyed as the notebook's `nn.Sequential` in PyTorch: conv `0`,
    /// BN `1`, (relu, pool), conv `4`, BN `5`, (relu, pool, flatten), linear `9`, (relu),
    /// linear `11`.
    fn layers(&mut self) -> LayerList<'_> {
        let (mut list, mut seq) = (LayerList::default(), Sequential::new(""));
        let conv1 = list.conv("conv1", seq.next_key(), &mut self.conv1);
        list.norm_in(&mut seq, "bn1", &mut self.bn1, Some(conv1));
        seq.skip(2); // relu, pool
        let conv2 = list.conv("conv2", seq.next_key(), &mut self.conv2);
        list.norm_in(&mut seq, "bn2", &mut self.bn2, Some(conv2));
        seq.skip(3); // relu, pool, flatten
        list.linear("fc1", seq.next_key(), &mut self.fc1);
        seq.skip(1); // relu
        list.linear("fc2", seq.next_key(), &mut self.fc2);
        list
    }
}
