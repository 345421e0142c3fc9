//! d2l's ResNet-18 for 1-channel images:
//!
//! ```text
//! stem:  Conv 7×7/2, 64, pad 3 → BN → ReLU → MaxPool 3×3/2, pad 1
//! b2..b5: 2 residual blocks each, at 64, 128, 256, 512 channels; the first block of b3..b5
//!         halves the size and has a 1×1/2 conv shortcut
//! head:  global average pool → Linear 512→10
//! ```
//! A residual block: `relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))`.

use burn::module::Module;
use burn::nn::conv::Conv2d;
use burn::nn::pool::{AdaptiveAvgPool2d, AdaptiveAvgPool2dConfig};
use burn::nn::Linear;
use burn::tensor::activation::relu;
use burn::tensor::{Device, Tensor};

use super::layers::{Initializer, LayerList, Stem, Trace};
use super::{Facts, ModelKind, ModelSpec, Network};
use crate::norm::{norm_then, Epilogue, NormLayer};
use crate::ops::conv2d::conv2d;

/// d2l's `Residual` block, from `cin` to `cout` channels with stride `s` (2 in the first block
/// of b3..b5, 1 elsewhere): `relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))`. Each BN
/// layer is `None` in a model built without batch norm.
#[derive(Module, Debug)]
pub struct Residual {
    /// Conv(cin→cout, 3×3, stride s, pad 1).
    pub conv1: Conv2d,
    /// BN over conv1's `cout` channels.
    pub bn1: Option<NormLayer>,
    /// Conv(cout→cout, 3×3, stride 1, pad 1).
    pub conv2: Conv2d,
    /// BN over conv2's `cout` channels.
    pub bn2: Option<NormLayer>,
    /// The 1×1 conv shortcut of a block that changes the shape: Conv(cin→cout, 1×1, stride
    /// s). `None` in a block that keeps it, whose shortcut is the identity.
    pub conv3: Option<Conv2d>,
}

impl Residual {
    fn new(
        cin: usize,
        cout: usize,
        stride: usize,
        spec: &ModelSpec,
        init: &mut Initializer,
        device: &Device,
    ) -> Self {
        let shortcut = stride != 1 || cin != cout;
        Self {
            conv1: init.conv2d(cin, cout, 3, stride, 1),
            bn1: NormLayer::new(&spec.norm, cout, device),
            conv2: init.conv2d(cout, cout, 3, 1, 1),
            bn2: NormLayer::new(&spec.norm, cout, device),
            conv3: shortcut.then(|| init.conv2d(cin, cout, 1, stride, 0)),
        }
    }

    /// `(N, cin, H, W)` to `(N, cout, ⌈H/s⌉, ⌈W/s⌉)`.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let y = norm_then(&self.bn1, conv2d(&self.conv1, x.clone()), Epilogue::RELU);
        let y = norm_then(&self.bn2, conv2d(&self.conv2, y), Epilogue::NONE);
        let shortcut = match &self.conv3 {
            Some(conv) => conv2d(conv, x),
            None => x,
        };
        relu(y + shortcut)
    }
}

/// d2l's ResNet-18 (the layer order is in the module docs).
#[derive(Module, Debug)]
pub struct ResNet18 {
    /// Conv 7×7/2 (1→64) → BN → ReLU → MaxPool 3×3/2: `(N, 1, 28, 28)` → `(N, 64, 7, 7)`.
    pub stem: Stem,
    /// b2..b5, two blocks each, at 64, 128, 256 and 512 channels; the first block of b3, b4
    /// and b5 halves the side (7 → 4 → 2 → 1 from 28×28 images).
    pub stages: Vec<Vec<Residual>>,
    /// Global average pool: `(N, 512, h, w)` → `(N, 512, 1, 1)`.
    pub pool: AdaptiveAvgPool2d,
    /// Linear(512→10): the logits.
    pub fc: Linear,
}

impl Network for ResNet18 {
    fn facts(_: ModelKind) -> Facts {
        Facts {
            min_image_size: 16,
            ..Facts::GLOBAL_POOL
        }
    }

    /// The network with `spec`'s batch norm (BN layers only if `spec.norm` has them), its
    /// weights drawn from a generator seeded with `seed`, on `device`.
    fn new(spec: &ModelSpec, seed: u64, device: &Device) -> Self {
        let mut init = Initializer::new(seed, spec.init, device);
        let stem = Stem::new(spec, &mut init, device);
        let widths = [64, 128, 256, 512];
        let mut cin = 64;
        let stages = widths
            .iter()
            .enumerate()
            .map(|(i, &cout)| {
                let stride = if i == 0 { 1 } else { 2 };
                let first = Residual::new(cin, cout, stride, spec, &mut init, device);
                let second = Residual::new(cout, cout, 1, spec, &mut init, device);
                cin = cout;
                vec![first, second]
            })
            .collect();
        Self {
            stem,
            stages,
            pool: AdaptiveAvgPool2dConfig::new([1, 1]).init(),
            fc: init.linear(512, 10),
        }
    }

    /// `(N, 1, H, W)` images to `(N, 10)` logits, recording in `trace` the output shape of
    /// the stem, of each stage (`b2`..`b5`), of the pool and of the linear layer.
    fn forward_traced(&self, x: Tensor<4>, trace: &mut Trace) -> Tensor<2> {
        let mut x = self.stem.forward(x);
        trace.record("stem", &x.dims());
        for (i, stage) in self.stages.iter().enumerate() {
            for block in stage {
                x = block.forward(x);
            }
            trace.record(&format!("b{}", i + 2), &x.dims());
        }
        let x = self.pool.forward(x).flatten::<2>(1, 3);
        trace.record("global-avg-pool", &x.dims());
        let x = self.fc.forward(x);
        trace.record("fc", &x.dims());
        x
    }

    /// The layers with weights: the stem at `0`; stages at items 1..=4 of the top
    /// `nn.Sequential`, each a Sequential of Residual modules whose layers are attributes, in
    /// the order d2l's `Residual` registers them (`conv1`, `conv2`, `conv3`, `bn1`, `bn2`); the
    /// linear layer at `7` (after the pool at 5 and flatten at 6).
    fn layers(&mut self) -> LayerList<'_> {
        let mut list = LayerList::default();
        self.stem.layers_into(&mut list);
        for (s, stage) in self.stages.iter_mut().enumerate() {
            for (j, block) in stage.iter_mut().enumerate() {
                let (name, key) = (format!("b{}.{j}", s + 2), format!("{}.{j}", s + 1));
                let at = |layer: &str| (format!("{name}.{layer}"), format!("{key}.{layer}"));
                let (n, k) = at("conv1");
                let conv1 = list.conv(n, k, &mut block.conv1);
                let (n, k) = at("conv2");
                let conv2 = list.conv(n, k, &mut block.conv2);
                if let Some(conv3) = &mut block.conv3 {
                    let (n, k) = at("conv3");
                    list.conv(n, k, conv3);
                }
                let (n, k) = at("bn1");
                list.norm(n, k, &mut block.bn1, Some(conv1));
                let (n, k) = at("bn2");
                list.norm(n, k, &mut block.bn2, Some(conv2));
            }
        }
        list.linear("fc", "7".into(), &mut self.fc);
        list
    }

    /// The notebook's ResNet-18 names its children: the stem's conv and BN are `0` and `1` at
    /// the top level, stage `S` is `resnet_blockS`, and the linear layer is `fc.1` (inside
    /// `nn.Sequential(Flatten, Linear)`).
    fn notebook_key(d2l: &str) -> Option<String> {
        Some(match d2l.split_once('.') {
            Some(("0", stem)) => stem.to_string(),
            Some((stage, rest)) => format!("resnet_block{stage}.{rest}"),
            None => "fc.1".to_string(),
        })
    }
}
