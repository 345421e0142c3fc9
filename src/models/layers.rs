//! Pieces the models share: seeded weight initialisation, the stem of ResNet and DenseNet,
//! block tracing.

use burn::module::{Module, Param};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::pool::{MaxPool2d, MaxPool2dConfig};
use burn::nn::{Linear, LinearConfig, PaddingConfig2d};
use burn::tensor::{Device, Tensor, TensorData};
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};
use serde::{Deserialize, Serialize};

use crate::norm::{norm_relu_max_pool, NormLayer};
use crate::ops::conv2d::conv2d;

/// How conv and linear weights are drawn.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WeightInit {
    /// `nn.init.xavier_uniform_`, as the d2l PyTorch notebooks apply to every conv and linear.
    XavierUniform,
    /// N(0, std²), as the MXNet notebook's `init.Normal(sigma=0.01)`.
    Normal {
        /// The standard deviation; finite and > 0.
        std: f64,
    },
    /// PyTorch's default: U(±1/√fan_in).
    PyTorchDefault,
}

/// Draws every initial weight from one seeded generator, so that a seed fixes the whole model
/// whatever the backend's own RNG does. Biases get PyTorch's default U(±1/√fan_in) (Burn's
/// Xavier initializer would apply to the conv bias too, unlike PyTorch).
pub struct Initializer {
    rng: rand_pcg::Pcg64,
    scheme: WeightInit,
    device: Device,
}

impl Initializer {
    /// Draws weights by `scheme` from a generator seeded with `seed`, making the layers on
    /// `device`. Layers drawn in the same order from the same seed get the same values.
    pub fn new(seed: u64, scheme: WeightInit, device: &Device) -> Self {
        Self {
            rng: rand_pcg::Pcg64::seed_from_u64(seed),
            scheme,
            device: device.clone(),
        }
    }

    fn tensor<const D: usize>(&self, values: Vec<f32>, shape: [usize; D]) -> Tensor<D> {
        Tensor::from_data(TensorData::new(values, shape), &self.device)
    }

    fn uniform<const D: usize>(&mut self, shape: [usize; D], bound: f64) -> Tensor<D> {
        let n = shape.iter().product();
        let values = (0..n)
            .map(|_| self.rng.random_range(-bound..bound) as f32)
            .collect();
        self.tensor(values, shape)
    }

    fn weight<const D: usize>(
        &mut self,
        shape: [usize; D],
        fan_in: usize,
        fan_out: usize,
    ) -> Tensor<D> {
        match self.scheme {
            WeightInit::XavierUniform => {
                self.uniform(shape, (6.0 / (fan_in + fan_out) as f64).sqrt())
            }
            WeightInit::PyTorchDefault => self.uniform(shape, 1.0 / (fan_in as f64).sqrt()),
            WeightInit::Normal { std } => {
                let normal = Normal::new(0.0, std).expect("std is finite and positive");
                let n = shape.iter().product();
                let values = (0..n)
                    .map(|_| normal.sample(&mut self.rng) as f32)
                    .collect();
                self.tensor(values, shape)
            }
        }
    }

    /// A `k × k` convolution with the given stride and symmetric padding.
    pub fn conv2d(
        &mut self,
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        pad: usize,
    ) -> Conv2d {
        let mut conv = Conv2dConfig::new([cin, cout], [k, k])
            .with_stride([stride, stride])
            .with_padding(PaddingConfig2d::Explicit(pad, pad, pad, pad))
            .init(&self.device);
        let (fan_in, fan_out) = (cin * k * k, cout * k * k);
        conv.weight = Param::from_tensor(self.weight([cout, cin, k, k], fan_in, fan_out));
        conv.bias = Some(Param::from_tensor(
            self.uniform([cout], 1.0 / (fan_in as f64).sqrt()),
        ));
        conv
    }

    /// A linear layer; Burn stores its weight as `[in, out]` (PyTorch: `[out, in]`).
    pub fn linear(&mut self, d_in: usize, d_out: usize) -> Linear {
        let mut linear = LinearConfig::new(d_in, d_out).init(&self.device);
        linear.weight = Param::from_tensor(self.weight([d_in, d_out], d_in, d_out));
        linear.bias = Some(Param::from_tensor(
            self.uniform([d_out], 1.0 / (d_in as f64).sqrt()),
        ));
        linear
    }
}

/// Collects `(block name, output shape)` as a model runs, for `bnlab shapes`.
#[derive(Debug, Default)]
pub struct Trace {
    /// Whether [`Trace::record`] keeps anything.
    pub enabled: bool,
    /// `(block name, output shape)` of each block, in the order they ran.
    pub blocks: Vec<(String, Vec<usize>)>,
}

impl Trace {
    /// A trace that records.
    pub fn recording() -> Self {
        Self {
            enabled: true,
            blocks: Vec::new(),
        }
    }

    /// A trace that records nothing: the normal forward pass.
    pub fn off() -> Self {
        Self::default()
    }

    /// Notes that block `name` output a tensor of shape `dims`, if the trace is enabled.
    pub fn record(&mut self, name: &str, dims: &[usize]) {
        if self.enabled {
            self.blocks.push((name.to_string(), dims.to_vec()));
        }
    }
}

/// The stem ResNet and DenseNet share: Conv 7×7/2 (64, pad 3) → BN → ReLU → MaxPool 3×3/2 (pad 1).
#[derive(Module, Debug)]
pub struct Stem {
    /// Conv(1→64, 7×7, stride 2, pad 3).
    pub conv: Conv2d,
    /// BN over conv's 64 channels; `None` in a model built without batch norm.
    pub bn: Option<crate::norm::NormLayer>,
    /// MaxPool 3×3, stride 2, pad 1.
    pub pool: MaxPool2d,
}

impl Stem {
    /// The stem with `spec`'s batch norm, its conv weights drawn from `init`, on `device`.
    pub fn new(spec: &super::ModelSpec, init: &mut Initializer, device: &Device) -> Self {
        Self {
            conv: init.conv2d(1, 64, 7, 2, 3),
            bn: crate::norm::NormLayer::new(&spec.norm, 64, device),
            pool: MaxPool2dConfig::new([3, 3])
                .with_strides([2, 2])
                .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                .init(),
        }
    }

    /// The stem's layers: d2l's `Sequential(conv, bn, relu, maxpool)` at key `0`.
    pub fn layers_into<'a>(&'a mut self, list: &mut LayerList<'a>) {
        let mut seq = Sequential::new("0.");
        let conv = list.conv("stem.conv", seq.next_key(), &mut self.conv);
        list.norm_in(&mut seq, "stem.bn", &mut self.bn, Some(conv));
    }

    /// `(N, 1, H, W)` to `(N, 64, ⌈H/4⌉, ⌈W/4⌉)`: each of the conv and the pool halves the
    /// side, rounding up.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        norm_relu_max_pool(&self.bn, conv2d(&self.conv, x), &self.pool)
    }
}

/// A layer with weights, borrowed from a model.
pub enum LayerMut<'a> {
    /// A convolution: weight `[out, in, kh, kw]` (as in PyTorch) and bias `[out]`.
    Conv(&'a mut Conv2d),
    /// A linear layer: weight `[in, out]` (PyTorch's is `[out, in]`) and bias `[out]`.
    Linear(&'a mut Linear),
    /// A BN layer the model has (entries are listed only for those present).
    Norm(&'a mut Option<NormLayer>),
}

/// One layer of a model with weights: what bnlab and PyTorch call it, and for a BN layer
/// that directly follows a conv or linear layer, which one (its partner, into which eval
/// mode can fold it).
pub struct NamedLayer<'a> {
    /// bnlab's name for it (`bn1`, `b2.0.conv1`): what `inspect` prints.
    pub name: String,
    /// Its key prefix in d2l's PyTorch `state_dict`, without the final dot (`1`, `1.0.conv1`).
    pub torch: String,
    /// The layer itself.
    pub layer: LayerMut<'a>,
    /// For a BN layer right after a conv or linear layer: that layer's index in the list.
    pub partner: Option<usize>,
}

/// Each model lists its layers once, in PyTorch's `state_dict` order: interop, folding and
/// `inspect` walk this list.
#[derive(Default)]
pub struct LayerList<'a> {
    /// The layers, in PyTorch's `state_dict` order.
    pub layers: Vec<NamedLayer<'a>>,
}

impl<'a> LayerList<'a> {
    fn push(
        &mut self,
        name: String,
        torch: String,
        layer: LayerMut<'a>,
        partner: Option<usize>,
    ) -> usize {
        self.layers.push(NamedLayer {
            name,
            torch,
            layer,
            partner,
        });
        self.layers.len() - 1
    }

    /// Adds a conv layer; returns its index (a BN layer's partner).
    pub fn conv(&mut self, name: impl Into<String>, torch: String, conv: &'a mut Conv2d) -> usize {
        self.push(name.into(), torch, LayerMut::Conv(conv), None)
    }

    /// Adds a linear layer; returns its index.
    pub fn linear(
        &mut self,
        name: impl Into<String>,
        torch: String,
        linear: &'a mut Linear,
    ) -> usize {
        self.push(name.into(), torch, LayerMut::Linear(linear), None)
    }

    /// Adds a BN layer if the model has it; `partner` is the layer it directly follows.
    pub fn norm(
        &mut self,
        name: impl Into<String>,
        torch: String,
        norm: &'a mut Option<NormLayer>,
        partner: Option<usize>,
    ) {
        if norm.is_some() {
            self.push(name.into(), torch, LayerMut::Norm(norm), partner);
        }
    }

    /// A BN layer at the next index of `seq`, which it takes only if the model has it (d2l's
    /// plain LeNet leaves its BN layers out of the `nn.Sequential`, so the indices shift).
    pub fn norm_in(
        &mut self,
        seq: &mut Sequential,
        name: impl Into<String>,
        norm: &'a mut Option<NormLayer>,
        partner: Option<usize>,
    ) {
        if norm.is_some() {
            let torch = seq.next_key();
            self.norm(name, torch, norm, partner);
        }
    }
}

/// Walks a PyTorch `nn.Sequential`: each item takes the next index, parameterless ones too.
pub struct Sequential {
    prefix: String,
    index: usize,
}

impl Sequential {
    /// The items of the `nn.Sequential` at key prefix `prefix` (`""` for the top level).
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_string(),
            index: 0,
        }
    }

    /// The key of the next item.
    pub fn next_key(&mut self) -> String {
        let name = format!("{}{}", self.prefix, self.index);
        self.index += 1;
        name
    }

    /// Steps over parameterless items (activations, pools, flatten).
    pub fn skip(&mut self, items: usize) {
        self.index += items;
    }
}
