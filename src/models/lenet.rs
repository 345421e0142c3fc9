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
use super::{BnLayers, BnPosition, Facts, ModelKind, ModelSpec, Network, WeightInit};
use crate::norm::epilogue::{Activation, Pool};
use crate::norm::{norm_then, Epilogue, NormLayer};
use crate::ops::epilogue::apply_epilogue;
use rand::{Rng, SeedableRng};

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
    /// Whether each norm comes before the activation or after it.
    #[module(skip)]
    pub bn_position: BnPosition,
    /// Dropout's probability after each hidden linear layer's activation (0: none).
    #[module(skip)]
    pub dropout: f64,
    /// The run's seed, which with the layer and its input seeds each dropout mask.
    #[module(skip)]
    pub seed: u64,
}

impl LeNet {
    /// Dropout in training (on an autodiff device): each value zeroed with probability
    /// `dropout`, the rest scaled by `1 / (1 - dropout)`. The mask comes from a generator
    /// seeded by the run's seed, the layer and the bits of `x` itself, so that a run, and a
    /// resumed run, draws the same masks without a generator state to save.
    fn drop(&self, x: Tensor<2>, layer: u64) -> Tensor<2> {
        if self.dropout == 0.0 || !x.device().is_autodiff() {
            return x;
        }
        let data = x.clone().detach().into_data().convert::<f32>();
        let values: &[f32] = data.as_slice().expect("float32 values");
        // FNV-1a over the bit patterns: stable across Rust releases, unlike std's hasher.
        let hash = values.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, v| {
            (h ^ u64::from(v.to_bits())).wrapping_mul(0x0100_0000_01b3)
        });
        let mut rng = rand_pcg::Pcg64::seed_from_u64(hash ^ self.seed.rotate_left(17) ^ layer);
        let keep = 1.0 - self.dropout;
        let mask: Vec<f32> = values
            .iter()
            .map(|_| match rng.random_bool(keep) {
                true => (1.0 / keep) as f32,
                false => 0.0,
            })
            .collect();
        let mask = Tensor::<2>::from_data(
            burn::tensor::TensorData::new(mask, x.dims()),
            (&x.device(), x.dtype()),
        );
        x * mask
    }

    /// A layer's output through its norm, activation and pool (`epilogue`), the norm where
    /// `bn_position` puts it.
    fn block<const D: usize>(
        &self,
        norm: &Option<NormLayer>,
        x: Tensor<D>,
        epilogue: Epilogue,
    ) -> Tensor<D> {
        match self.bn_position {
            BnPosition::BeforeAct => norm_then(norm, x, epilogue),
            BnPosition::AfterAct => {
                let activation = Epilogue {
                    pool: Pool::None,
                    ..epilogue
                };
                let pool = Epilogue {
                    activation: Activation::Identity,
                    ..epilogue
                };
                norm_then(norm, apply_epilogue(x, activation), pool)
            }
        }
    }
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
        let (conv_norms, fc_norms) = match spec.bn_layers {
            BnLayers::All => (true, true),
            BnLayers::Conv => (true, false),
            BnLayers::Fc => (false, true),
        };
        let norm = |c, here: bool| {
            here.then(|| NormLayer::new(&spec.norm, c, device))
                .flatten()
        };
        let (bn1, bn2) = (norm(6, conv_norms), norm(16, conv_norms));
        let (bn3, bn4) = (norm(120, fc_norms), norm(84, fc_norms));
        // Every bias is drawn, kept or not, so that the weights are the same either way.
        let biased = |norm: &Option<NormLayer>| spec.conv_bias || norm.is_none();
        let mut conv1 = init.conv2d(1, 6, 5, 1, 0);
        let mut conv2 = init.conv2d(6, 16, 5, 1, 0);
        let mut fc1 = init.linear(16 * 4 * 4, 120);
        let mut fc2 = init.linear(120, 84);
        if !biased(&bn1) {
            conv1.bias = None;
        }
        if !biased(&bn2) {
            conv2.bias = None;
        }
        if !biased(&bn3) {
            fc1.bias = None;
        }
        if !biased(&bn4) {
            fc2.bias = None;
        }
        Self {
            conv1,
            bn1,
            conv2,
            bn2,
            fc1,
            bn3,
            fc2,
            bn4,
            fc3: init.linear(84, 10),
            pool: spec.pool,
            activation: spec.activation,
            bn_position: spec.bn_position,
            dropout: spec.dropout,
            seed,
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
        let x = self.block(&self.bn1, conv2d(&self.conv1, x), act_pool);
        trace.record("conv1-bn-act-pool", &x.dims());
        let x = self.block(&self.bn2, conv2d(&self.conv2, x), act_pool);
        trace.record("conv2-bn-act-pool", &x.dims());
        let x: Tensor<2> = x.flatten(1, 3);
        trace.record("flatten", &x.dims());
        let x = self.drop(self.block(&self.bn3, self.fc1.forward(x), act), 3);
        trace.record("fc1-bn-act", &x.dims());
        let x = self.drop(self.block(&self.bn4, self.fc2.forward(x), act), 4);
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
        // After the activation, a norm cannot fold into the layer before it.
        let before_act = self.bn_position == BnPosition::BeforeAct;
        let partner = |layer: usize| before_act.then_some(layer);
        let conv1 = list.conv("conv1", seq.next_key(), &mut self.conv1);
        list.norm_in(&mut seq, "bn1", &mut self.bn1, partner(conv1));
        seq.skip(2); // activation, pool
        let conv2 = list.conv("conv2", seq.next_key(), &mut self.conv2);
        list.norm_in(&mut seq, "bn2", &mut self.bn2, partner(conv2));
        seq.skip(3); // activation, pool, flatten
        let fc1 = list.linear("fc1", seq.next_key(), &mut self.fc1);
        list.norm_in(&mut seq, "bn3", &mut self.bn3, partner(fc1));
        seq.skip(1); // activation
        let fc2 = list.linear("fc2", seq.next_key(), &mut self.fc2);
        list.norm_in(&mut seq, "bn4", &mut self.bn4, partner(fc2));
        seq.skip(1); // activation
        list.linear("fc3", seq.next_key(), &mut self.fc3);
        list
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::norm::NormKind;
    use burn::module::{Param, RunningState};
    use burn::tensor::activation::sigmoid;
    use burn::tensor::Distribution;

    fn lenet(spec: ModelSpec) -> LeNet {
        LeNet::new(&spec, 7, &crate::device::inference_device())
    }

    fn spec() -> ModelSpec {
        ModelSpec::of(ModelKind::LenetBn, NormKind::Scratch)
    }

    #[test]
    fn dropping_the_biases_keeps_the_weights_and_only_where_a_norm_follows() {
        let with = lenet(spec());
        let conv_only = ModelSpec {
            conv_bias: false,
            bn_layers: BnLayers::Conv,
            ..spec()
        };
        let without = lenet(conv_only);
        let same =
            |a: &Tensor<4>, b: &Tensor<4>| a.clone().equal(b.clone()).all().into_scalar::<bool>();
        assert!(same(&with.conv2.weight.val(), &without.conv2.weight.val()));
        assert!(without.conv1.bias.is_none() && without.conv2.bias.is_none());
        // No norm after the linear layers here: they keep theirs.
        assert!(without.fc1.bias.is_some() && without.bn3.is_none());
        let fc3 = |m: &LeNet| m.fc3.weight.val().into_data();
        assert_eq!(fc3(&with), fc3(&without), "later draws are unchanged");
    }

    #[test]
    fn dropout_zeroes_about_p_of_the_values_the_same_way_for_the_same_input() {
        let spec = ModelSpec {
            dropout: 0.25,
            ..spec()
        };
        let device = crate::device::training_device();
        let model = LeNet::new(&spec, 3, &device);
        let x = Tensor::<2>::random([64, 120], Distribution::Default, &device);
        let kept =
            |y: Tensor<2>| -> Vec<f32> { y.into_data().convert::<f32>().iter::<f32>().collect() };
        let (a, b) = (
            kept(model.drop(x.clone(), 3)),
            kept(model.drop(x.clone(), 3)),
        );
        assert!(a == b, "the same input and layer, the same mask");
        assert!(
            a != kept(model.drop(x.clone(), 4)),
            "another layer, another mask"
        );
        let x_values = kept(x.clone());
        let zeroed = a.iter().filter(|&&v| v == 0.0).count() as f64 / a.len() as f64;
        assert!((zeroed - 0.25).abs() < 0.03, "{zeroed} zeroed");
        for (y, x) in a.iter().zip(&x_values) {
            assert!(*y == 0.0 || (y - x / 0.75).abs() < 1e-6, "{y} from {x}");
        }
        // Eval mode (no autodiff): the identity.
        let plain = crate::device::inference_device();
        let model = LeNet::new(&spec, 3, &plain);
        let x = Tensor::<2>::from_data(burn::tensor::TensorData::new(x_values, [64, 120]), &plain);
        assert!(
            kept(model.drop(x.clone(), 3)) == kept(x),
            "eval mode drops nothing"
        );
    }

    #[test]
    fn after_act_puts_the_norm_between_the_activation_and_the_pool() {
        let mut model = lenet(ModelSpec {
            bn_position: BnPosition::AfterAct,
            ..spec()
        });
        let device = crate::device::inference_device();
        // γ 2, β 0.5 and running mean 0.3: the norm's place then changes the output.
        for bn in [
            &mut model.bn1,
            &mut model.bn2,
            &mut model.bn3,
            &mut model.bn4,
        ] {
            let Some(NormLayer::Scratch(bn)) = bn else {
                panic!("BN")
            };
            let c = bn.num_features;
            bn.gamma = Some(Param::from_tensor(Tensor::full([c], 2.0, &device)));
            bn.beta = Some(Param::from_tensor(Tensor::full([c], 0.5, &device)));
            bn.running_mean = Some(RunningState::new(Tensor::full([c], 0.3, &device)));
        }
        let x = Tensor::<4>::random([3, 1, 28, 28], Distribution::Default, &device);
        let (bn1, bn2, bn3, bn4) = (&model.bn1, &model.bn2, &model.bn3, &model.bn4);
        let norm = |bn: &Option<NormLayer>, x| bn.as_ref().expect("BN").forward(x);
        // 2 × 2 windows averaged, by reshaping.
        let pool = |x: Tensor<4>| {
            let [n, c, h, w] = x.dims();
            let windows: Tensor<6> = x.reshape([n, c, h / 2, 2, w / 2, 2]);
            windows
                .mean_dim(5)
                .mean_dim(3)
                .reshape([n, c, h / 2, w / 2])
        };
        let h = pool(norm(bn1, sigmoid(conv2d(&model.conv1, x.clone()))));
        let h = pool(norm(bn2, sigmoid(conv2d(&model.conv2, h))));
        let h: Tensor<2> = h.flatten(1, 3);
        let h = bn3.as_ref().unwrap().forward(sigmoid(model.fc1.forward(h)));
        let h = bn4.as_ref().unwrap().forward(sigmoid(model.fc2.forward(h)));
        let want = model.fc3.forward(h);
        let got = model.forward_traced(x, &mut Trace::off());
        let diff = (got - want).abs().max().into_scalar::<f32>();
        assert!(diff < 1e-6, "largest difference {diff}");
    }
}
