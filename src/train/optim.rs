//! Burn's optimizers and learning-rate schedulers, set up as PyTorch's.

use burn::lr_scheduler::module_lr_scheduler::ModuleLrScheduler;
use burn::lr_scheduler::step::StepLrSchedulerConfig;
use burn::optim::momentum::MomentumConfig;
use burn::optim::{AdamConfig, ModuleOptimizer, SgdConfig};

use crate::config::{OptimizerKind, RunConfig};

/// The run's optimizer. Burn's defaults differ from PyTorch's in two places, set here:
/// momentum dampening (Burn 0.1, PyTorch 0) and Adam's epsilon (Burn 1e-5, PyTorch 1e-8).
pub fn optimizer(config: &RunConfig) -> ModuleOptimizer {
    match config.optimizer {
        OptimizerKind::Sgd => SgdConfig::new().init(),
        OptimizerKind::SgdMomentum => SgdConfig::new()
            .with_momentum(Some(
                MomentumConfig::new()
                    .with_momentum(config.momentum)
                    .with_dampening(0.0),
            ))
            .init(),
        OptimizerKind::Adam => AdamConfig::new().with_epsilon(1e-8).init(),
    }
}

/// The learning-rate schedule, stepped once per epoch: StepLR or a constant.
pub fn scheduler(config: &RunConfig) -> ModuleLrScheduler {
    match config.lr_step_size {
        Some(step) => StepLrSchedulerConfig::new(config.lr, step)
            .with_gamma(config.lr_gamma)
            .init()
            .expect("validated: the step size is at least 1"),
        None => ModuleLrScheduler::new(config.lr),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Burn's StepLR, stepped once per epoch, gives PyTorch's StepLR(step_size, gamma).
    #[test]
    fn step_lr_per_epoch_matches_the_closed_form() {
        let config = RunConfig {
            lr: 0.5,
            lr_step_size: Some(2),
            lr_gamma: 0.9,
            ..Default::default()
        };
        let mut schedule = scheduler(&config);
        for epoch in 1..=7 {
            let lr = schedule.step().base();
            let want = 0.5 * 0.9f64.powi(((epoch - 1) / 2) as i32);
            assert!((lr - want).abs() < 1e-12, "epoch {epoch}: {lr} vs {want}");
            assert!((config.lr_at(epoch) - want).abs() < 1e-12);
        }
        let mut constant = scheduler(&RunConfig::default());
        assert_eq!(constant.step().base(), 1.0);
        assert_eq!(constant.step().base(), 1.0);
    }
}
