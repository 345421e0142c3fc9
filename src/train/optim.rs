//! Burn's optimizers, set up as PyTorch's. (The learning rate of each step is
//! [`RunConfig::lr_at_step`]: a closed form, so that a resumed run needs no scheduler state.)

use burn::optim::decay::WeightDecayConfig;
use burn::optim::momentum::MomentumConfig;
use burn::optim::{AdamConfig, ModuleOptimizer, SgdConfig};

use crate::config::{OptimizerKind, RunConfig};

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
        OptimizerKind::Adam => AdamConfig::new()
            .with_epsilon(1e-8)
            .with_weight_decay(decay)
            .init(),
    }
}
