//! d2l's DenseNet for 1-channel images:
//!
//! ```text
//! stem:   Conv 7×7/2, 64, pad 3 → BN → ReLU → MaxPool 3×3/2, pad 1
//! 4 dense blocks of 4 layers BN → ReLU → Conv 3×3 (growth rate 32), each layer's output
//!   concatenated to its input; between blocks a transition BN → ReLU → Conv 1×1 → AvgPool 2
//!   that halves the channels
//! head:   BN → ReLU → global average pool → Linear
//! ```
//! Channels: 64 → 192 → 96 → 224 → 112 → 240 → 120 → 248.

use burn::module::Module;
use burn::nn::conv::Conv2d;
use burn::nn::pool::{AdaptiveAvgPool2d, AdaptiveAvgPool2dConfig, AvgPool2d, AvgPool2dConfig};
use burn::nn::Linear;
use burn::tensor::{Device, Tensor};

use super::layers::{Initializer, LayerList, Sequential, Stem, Trace};
use super::{Facts, ModelKind, ModelSpec, Network};
use crate::norm::{
    norm_relu_avg_pool_conv, norm_relu_conv, norm_then, BatchNorm, Epilogue, NormLayer,
};

const GROWTH: usize = 32;
const LAYERS_PER_BLOCK: usize = 4;
const BLOCKS: usize = 4;

/// BN → ReLU → Conv 3×3: one layer of a dense block.
#[derive(Module, Debug)]
pub struct ConvBlock {
    /// BN over the layer's input: the block's input channels plus 32 for each earlier layer
    /// of the block. `None` in a model built without batch norm.
    pub bn: Option<NormLayer>,
    /// Conv(cin→32, 3×3, pad 1): the 32 channels the layer adds.
    pub conv: Conv2d,
}

impl ConvBlock {
    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        norm_relu_conv(&self.bn, x, &self.conv)
    }
}

/// A dense block: each layer's output concatenated to its input. In training with the fused
/// kernel, one op that keeps the block in one buffer ([`BatchNorm::dense_block`]).
fn dense_block(x: Tensor<4>, block: &[ConvBlock]) -> Tensor<4> {
    let fused: Option<Vec<(&BatchNorm, &Conv2d)>> = block
        .iter()
        .map(|layer| match &layer.bn {
            Some(NormLayer::Scratch(bn)) => Some((bn, &layer.conv)),
            _ => None,
        })
        .collect();
    if let Some(y) = fused.and_then(|layers| BatchNorm::dense_block(x.clone(), &layers)) {
        return y;
    }
    block.iter().fold(x, |x, layer| {
        let y = layer.forward(x.clone());
        Tensor::cat(vec![x, y], 1)
    })
}

/// BN → ReLU → Conv 1×1 → AvgPool 2: between two dense blocks, halves the channels and the
/// side, `(N, c, H, W)` → `(N, c/2, ⌊H/2⌋, ⌊W/2⌋)`.
#[derive(Module, Debug)]
pub struct Transition {
    /// BN over the `c` channels of the block before. `None` in a model built without batch
    /// norm.
    pub bn: Option<NormLayer>,
    /// Conv(c→c/2, 1×1).
    pub conv: Conv2d,
    /// AvgPool 2×2, stride 2: run before the convolution, with which it commutes (the
    /// convolution then has a quarter of the positions).
    pub pool: AvgPool2d,
}

impl Transition {
    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        norm_relu_avg_pool_conv(&self.bn, x, &self.conv)
    }
}

/// d2l's DenseNet (the layer order and channel counts are in the module docs).
#[derive(Module, Debug)]
pub struct DenseNet {
    /// Conv 7×7/2 (1→64) → BN → ReLU → MaxPool 3×3/2: `(N, 1, H, W)` → `(N, 64, ⌈H/4⌉,
    /// ⌈W/4⌉)`.
    pub stem: Stem,
    /// The 4 dense blocks of 4 [`ConvBlock`]s; each layer's 32 output channels are
    /// concatenated to its input, so a block adds 128 channels.
    pub blocks: Vec<Vec<ConvBlock>>,
    /// The 3 transitions, after dense blocks 1 to 3.
    pub transitions: Vec<Transition>,
    /// BN over the last block's 248 channels, before ReLU and the global pool. `None` in a
    /// model built without batch norm.
    pub bn: Option<NormLayer>,
    /// Global average pool: `(N, 248, h, w)` → `(N, 248, 1, 1)`.
    pub pool: AdaptiveAvgPool2d,
    /// Linear(248→10): the logits.
    pub fc: Linear,
}

impl Network for DenseNet {
    fn facts(_: ModelKind) -> Facts {
        // The stem divides the side by 4; each transition's 2×2 average pool needs 2 pixels.
        Facts {
            min_image_size: 32,
            recipe_image_size: 96,
            ..Facts::GLOBAL_POOL
        }
    }

    /// The network with `spec`'s batch norm (BN layers only if `spec.norm` has them), its
    /// weights drawn from a generator seeded with `seed`, on `device`.
    fn new(spec: &ModelSpec, seed: u64, device: &Device) -> Self {
        let mut init = Initializer::new(seed, spec.init, device);
        let stem = Stem::new(spec, &mut init, device);
        let norm = |c| NormLayer::new(&spec.norm, c, device);
        let (mut blocks, mut transitions) = (Vec::new(), Vec::new());
        let mut channels = 64;
        for b in 0..BLOCKS {
            let layers = (0..LAYERS_PER_BLOCK)
                .map(|i| {
                    let cin = channels + i * GROWTH;
                    ConvBlock {
                        bn: norm(cin),
                        conv: init.conv2d(cin, GROWTH, 3, 1, 1),
                    }
                })
                .collect();
            blocks.push(layers);
            channels += LAYERS_PER_BLOCK * GROWTH;
            if b + 1 < BLOCKS {
                transitions.push(Transition {
                    bn: norm(channels),
                    conv: init.conv2d(channels, channels / 2, 1, 1, 0),
                    pool: AvgPool2dConfig::new([2, 2]).init(),
                });
                channels /= 2;
            }
        }
        Self {
            stem,
            blocks,
            transitions,
            bn: norm(channels),
            pool: AdaptiveAvgPool2dConfig::new([1, 1]).init(),
            fc: init.linear(channels, 10),
        }
    }

    /// `(N, 1, H, W)` images (H, W ≥ 32) to `(N, 10)` logits, recording in `trace` the output
    /// shape of the stem, of each dense block (`dense1`..`dense4`) and transition
    /// (`transition1`..`transition3`), of the final BN → ReLU → pool and of the linear layer.
    fn forward_traced(&self, x: Tensor<4>, trace: &mut Trace) -> Tensor<2> {
        let mut x = self.stem.forward(x);
        trace.record("stem", &x.dims());
        for (b, block) in self.blocks.iter().enumerate() {
            x = dense_block(x, block);
            trace.record(&format!("dense{}", b + 1), &x.dims());
            if let Some(transition) = self.transitions.get(b) {
                x = transition.forward(x);
                trace.record(&format!("transition{}", b + 1), &x.dims());
            }
        }
        let x = self
            .pool
            .forward(norm_then(&self.bn, x, Epilogue::RELU))
            .flatten::<2>(1, 3);
        trace.record("bn-relu-global-avg-pool", &x.dims());
        let x = self.fc.forward(x);
        trace.record("fc", &x.dims());
        x
    }

    /// The layers with weights: the stem at `0`; dense block `b` at 1, 3, 5, 7 keeps layer `i`
    /// in `net.i` as `Sequential(bn, relu, conv)`; transitions at 2, 4, 6 are
    /// `Sequential(bn, relu, conv, avgpool)`; the final BN at 8 and the linear layer at 12. BN
    /// comes before its conv here: no partner to fold into.
    fn layers(&mut self) -> LayerList<'_> {
        let mut list = LayerList::default();
        self.stem.layers_into(&mut list);
        let mut top = Sequential::new("");
        top.skip(1); // the stem
        let mut transitions = self.transitions.iter_mut();
        for (b, block) in self.blocks.iter_mut().enumerate() {
            let net = format!("{}.net", top.next_key());
            for (i, layer) in block.iter_mut().enumerate() {
                let name = format!("dense{}.{i}", b + 1);
                let mut seq = Sequential::new(&format!("{net}.{i}."));
                list.norm_in(&mut seq, format!("{name}.bn"), &mut layer.bn, None);
                seq.skip(1); // relu
                list.conv(format!("{name}.conv"), seq.next_key(), &mut layer.conv);
            }
            if let Some(transition) = transitions.next() {
                let name = format!("transition{}", b + 1);
                let mut seq = Sequential::new(&format!("{}.", top.next_key()));
                list.norm_in(&mut seq, format!("{name}.bn"), &mut transition.bn, None);
                seq.skip(1); // relu
                list.conv(format!("{name}.conv"), seq.next_key(), &mut transition.conv);
            }
        }
        list.norm_in(&mut top, "bn", &mut self.bn, None);
        top.skip(3); // relu, global pool, flatten
        list.linear("fc", top.next_key(), &mut self.fc);
        list
    }

    /// The notebook's DenseNet names its children: the stem's conv and BN are `0` and `1` at
    /// the top level, dense block `k` is `DenseBlosk_k` (the notebook's spelling), transition
    /// `k` is `transition_block_k`, the last BN is `BN` and the linear layer `fc.1` (inside
    /// `nn.Sequential(Flatten, Linear)`).
    fn notebook_key(d2l: &str) -> Option<String> {
        let (top, rest) = d2l.split_once('.').unwrap_or((d2l, ""));
        let index: usize = top.parse().ok()?;
        let child = match index {
            0 => return Some(rest.to_string()),
            1 | 3 | 5 | 7 => format!("DenseBlosk_{}", (index - 1) / 2),
            2 | 4 | 6 => format!("transition_block_{}", (index - 2) / 2),
            // The last BN; without BN, index 8 is the ReLU and holds no keys.
            8 => "BN".to_string(),
            _ => "fc.1".to_string(),
        };
        Some(match rest {
            "" => child,
            _ => format!("{child}.{rest}"),
        })
    }
}
