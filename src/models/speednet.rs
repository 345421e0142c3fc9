//! speednet: a small BN CNN for the `speedrun` recipes, BN after every conv as in the chapter.
//!
//! ```text
//! Conv 3×3 (1→24) → BN → ReLU → MaxPool 2         28 → 14
//! Conv 3×3 (24→48) → BN → ReLU
//! Conv 3×3 (48→48) → BN → ReLU → MaxPool 2        14 → 7
//! Conv 3×3 (48→96) → BN → ReLU → MaxPool 2        7 → 3
//! Flatten → Linear 864→10
//! ```
//! `speednet-wide` has 32, 64, 64 and 128 channels (Linear 1152→10); `speednet-deep` is
//! `speednet-wide` with a second conv at 7 × 7 (64→128, then 128→128 before the last pool).
//! Every conv pads by 1, so the side changes only at the pools. In PyTorch each is one
//! `nn.Sequential` of those items in that order.

use burn::module::Module;
use burn::nn::conv::Conv2d;
use burn::nn::Linear;
use burn::tensor::{Device, Tensor};

use super::layers::{Initializer, LayerList, Sequential, Trace};
use super::{Facts, ModelKind, ModelSpec, Network};
use crate::norm::epilogue::Pool;
use crate::norm::{norm_then, Epilogue, NormLayer};
use crate::ops::conv2d::conv2d;

/// `(in channels, out channels, 2 × 2 max pool after it)` of each conv block of `speednet`.
pub const BLOCKS: [(usize, usize, bool); 4] = [
    (1, 24, true),
    (24, 48, false),
    (48, 48, true),
    (48, 96, true),
];

/// The blocks of `speednet-wide`.
pub const WIDE_BLOCKS: [(usize, usize, bool); 4] = [
    (1, 32, true),
    (32, 64, false),
    (64, 64, true),
    (64, 128, true),
];

/// The blocks of `speednet-deep`: `speednet-wide` with a second conv at 7 × 7.
pub const DEEP_BLOCKS: [(usize, usize, bool); 5] = [
    (1, 32, true),
    (32, 64, false),
    (64, 64, true),
    (64, 128, false),
    (128, 128, true),
];

/// The blocks of `kind`.
pub fn blocks(kind: ModelKind) -> &'static [(usize, usize, bool)] {
    match kind {
        ModelKind::SpeednetWide => &WIDE_BLOCKS,
        ModelKind::SpeednetDeep => &DEEP_BLOCKS,
        _ => &BLOCKS,
    }
}

/// The side of the last block's maps from 28 × 28 images (three pools: 28 → 14 → 7 → 3).
const LAST_SIDE: usize = 3;

/// One conv block: Conv 3×3 (pad 1) → BN → ReLU, then a 2 × 2 max pool where [`blocks`] says.
#[derive(Module, Debug)]
pub struct ConvBlock {
    /// Conv(cin→cout, 3×3, pad 1).
    pub conv: Conv2d,
    /// BN over the conv's channels; `None` in a model built without batch norm.
    pub bn: Option<NormLayer>,
    /// Whether a 2 × 2 max pool follows the ReLU.
    pub pooled: bool,
}

/// The speedrun network (the layer order is in the module docs).
#[derive(Module, Debug)]
pub struct SpeedNet {
    /// The conv blocks of [`blocks`]: `(N, 1, 28, 28)` → `(N, C, 3, 3)`.
    pub blocks: Vec<ConvBlock>,
    /// Linear(C·3·3 → 10): the logits.
    pub fc: Linear,
}

impl Network for SpeedNet {
    fn facts(_: ModelKind) -> Facts {
        Facts::LENET_SIZED
    }

    fn new(spec: &ModelSpec, seed: u64, device: &Device) -> Self {
        let mut init = Initializer::new(seed, spec.init, device);
        let plan = blocks(spec.kind);
        let blocks = plan
            .iter()
            .map(|&(cin, cout, pooled)| ConvBlock {
                conv: init.conv2d(cin, cout, 3, 1, 1),
                bn: NormLayer::new(&spec.norm, cout, device),
                pooled,
            })
            .collect();
        let channels = plan[plan.len() - 1].1;
        Self {
            blocks,
            fc: init.linear(channels * LAST_SIDE * LAST_SIDE, 10),
        }
    }

    fn forward_traced(&self, mut x: Tensor<4>, trace: &mut Trace) -> Tensor<2> {
        for (i, block) in self.blocks.iter().enumerate() {
            // BN → ReLU (→ 2×2 max pool): one kernel under `--norm fused`.
            let epilogue = Epilogue {
                pool: match block.pooled {
                    true => Pool::Max(2),
                    false => Pool::None,
                },
                ..Epilogue::RELU
            };
            x = norm_then(&block.bn, conv2d(&block.conv, x), epilogue);
            let name = match block.pooled {
                true => format!("conv{}-bn-relu-pool", i + 1),
                false => format!("conv{}-bn-relu", i + 1),
            };
            trace.record(&name, &x.dims());
        }
        let x = self.fc.forward(x.flatten::<2>(1, 3));
        trace.record("linear", &x.dims());
        x
    }

    /// The layers with weights, keyed as one PyTorch `nn.Sequential`: each block's conv, BN,
    /// (ReLU, pool), then (flatten) the linear layer.
    fn layers(&mut self) -> LayerList<'_> {
        let (mut list, mut seq) = (LayerList::default(), Sequential::new(""));
        for (i, block) in self.blocks.iter_mut().enumerate() {
            let conv = list.conv(format!("conv{}", i + 1), seq.next_key(), &mut block.conv);
            list.norm_in(&mut seq, format!("bn{}", i + 1), &mut block.bn, Some(conv));
            seq.skip(1 + block.pooled as usize); // ReLU, pool
        }
        seq.skip(1); // flatten
        list.linear("fc", seq.next_key(), &mut self.fc);
        list
    }
}
