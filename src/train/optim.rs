//! Burn's optimizers, set up as PyTorch's. (The learning rate of each step is
//! [`RunConfig::lr_at_step`]: a closed form, so that a resumed run needs no scheduler state.)

use burn::optim::decay::WeightDecayConfig;
use burn::optim::momentum::MomentumConfig;
use burn::optim::{
    AdamConfig, AdamState, AdaptiveMomentumState, LearningRate, ModuleOptimizer, Optimizer,
    SgdConfig,
};
use burn::tensor::{Device, Tensor};

use crate::config::{OptimizerKind, RunConfig};
use crate::ops::adam::{self as fused, AdamFactors};

/// The run's optimizer. Burn's defaults differ from PyTorch's in two places, set here:
/// momentum dampening (Burn 0.1, PyTorch 0) and Adam's epsilon (Burn 1e-5, PyTorch 1e-8).
/// Weight decay is PyTorch's coupled L2 (added to the gradient before momentum or Adam).
pub fn optimizer(config: &RunConfig) -> ModuleOptimizer {
    let decay =
        (config.weight_decay > 0.0).then(|| WeightDecayConfig::new(config.weight_decay as f32));
    match config.optimizer {
        OptimizerKind::Sgd => SgdConfig::new().with_weight_decay(decay).init(),
        OptimizerKind::SgdMomentum => SgdConfig::new()
            .with_weight_decay(decay)
            .with_momentum(Some(
                MomentumConfig::new()
                    .with_momentum(config.momentum)
                    .with_dampening(0.0)
                    .with_nesterov(config.nesterov),
            ))
            .init(),
        OptimizerKind::Adam => ModuleOptimizer::from(Adam::new(
            (config.weight_decay > 0.0).then_some(config.weight_decay as f32),
        )),
    }
}

/// Burn's Adam (β = 0.9, 0.999; ε = 1e-8, as PyTorch), its update fused into one pass over
/// memory on Flex ([`crate::ops::adam`]): the same arithmetic, the same state (so checkpoints
/// are those of Burn's `Adam`), Burn's own step on other devices.
#[derive(Clone)]
pub struct Adam {
    burn: burn::optim::Adam,
    penalty: Option<f32>,
}

/// PyTorch's β₁, β₂ and ε.
const BETA_1: f32 = 0.9;
const BETA_2: f32 = 0.999;
const EPSILON: f32 = 1e-8;

impl Adam {
    /// With PyTorch's coupled weight decay `penalty`, if any.
    pub fn new(penalty: Option<f32>) -> Self {
        let burn = AdamConfig::new()
            .with_beta_1(BETA_1)
            .with_beta_2(BETA_2)
            .with_epsilon(EPSILON)
            .with_weight_decay(penalty.map(WeightDecayConfig::new))
            .build();
        Self { burn, penalty }
    }
}

impl Optimizer for Adam {
    type State<const D: usize> = AdamState<D>;

    fn step<const D: usize>(
        &self,
        lr: LearningRate,
        tensor: Tensor<D>,
        grad: Tensor<D>,
        state: Option<Self::State<D>>,
    ) -> (Tensor<D>, Option<Self::State<D>>) {
        let amsgrad = state
            .as_ref()
            .is_some_and(|s| s.momentum.max_moment_2.is_some());
        if amsgrad || !fused::applies(&tensor) {
            return self.burn.step(lr, tensor, grad, state);
        }
        let (time, moments) = match state {
            Some(s) => (
                s.momentum.time + 1,
                Some((s.momentum.moment_1, s.momentum.moment_2)),
            ),
            None => (1, None),
        };
        // Burn's bias corrections, in its float32.
        let t = time as i32;
        let root_2 = (1.0 - BETA_2.powi(t)).sqrt();
        let factors = AdamFactors {
            beta_1: BETA_1,
            beta_2: BETA_2,
            correction: root_2 / (1.0 - BETA_1.powi(t)),
            epsilon: EPSILON * root_2,
            lr,
            penalty: self.penalty,
        };
        let (tensor, moment_1, moment_2) = fused::step(tensor, grad, moments, factors);
        let momentum = AdaptiveMomentumState::new(time, moment_1, moment_2);
        (tensor, Some(AdamState::new(momentum)))
    }

    fn to_device<const D: usize>(state: Self::State<D>, device: &Device) -> Self::State<D> {
        burn::optim::Adam::to_device(state, device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{DType, TensorData};
    use rand::{Rng, SeedableRng};

    /// Pseudo-random values in [-1, 1), a fixed sequence per seed.
    fn values(len: usize, seed: u64) -> Vec<f64> {
        let mut rng = rand_pcg::Pcg64::seed_from_u64(seed);
        (0..len).map(|_| rng.random_range(-1.0..1.0)).collect()
    }

    fn tensor(len: usize, seed: u64, dtype: DType) -> Tensor<1> {
        let data = TensorData::new(values(len, seed), [len]).convert_dtype(dtype);
        Tensor::from_data(data, &Device::flex())
    }

    fn bits(t: &Tensor<1>) -> Vec<u64> {
        let data = t.to_data().convert::<f64>();
        data.as_slice::<f64>()
            .unwrap()
            .iter()
            .map(|x| x.to_bits())
            .collect()
    }

    /// Six steps of the fused Adam and of Burn's, from the same parameter and gradients: the
    /// parameters and both moments agree bit for bit after every step, in both float types, with
    /// and without weight decay, on a size that runs serially and one that runs in parallel.
    #[test]
    fn fused_adam_is_burns_adam_bit_for_bit() {
        for dtype in [DType::F32, DType::F64] {
            for penalty in [None, Some(5e-4)] {
                for len in [1000, 3 * 32768 + 17] {
                    let ours = Adam::new(penalty);
                    let burns = ours.burn.clone();
                    let mut a = tensor(len, 1, dtype);
                    let mut b = a.clone();
                    let (mut sa, mut sb) = (None, None);
                    for step in 0..6u64 {
                        let grad = tensor(len, 10 + step, dtype).mul_scalar(0.1);
                        assert!(fused::applies(&a));
                        (a, sa) = ours.step(1e-3, a, grad.clone(), sa);
                        (b, sb) = burns.step(1e-3, b, grad, sb);
                        let (ma, mb) = (
                            &sa.as_ref().unwrap().momentum,
                            &sb.as_ref().unwrap().momentum,
                        );
                        assert_eq!(ma.time, mb.time);
                        let what =
                            format!("{dtype:?}, penalty {penalty:?}, {len} values, step {step}");
                        assert!(bits(&a) == bits(&b), "parameters differ: {what}");
                        assert!(
                            bits(&ma.moment_1) == bits(&mb.moment_1),
                            "m differs: {what}"
                        );
                        assert!(
                            bits(&ma.moment_2) == bits(&mb.moment_2),
                            "v differs: {what}"
                        );
                    }
                }
            }
        }
    }
}
