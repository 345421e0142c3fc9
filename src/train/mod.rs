//! The training loop: mini-batch SGD with cross-entropy, one test pass in eval mode per epoch.

use std::time::Instant;

use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::{GradientsParams, SgdConfig};
use burn::tensor::{Device, Int, Tensor};
use serde::{Deserialize, Serialize};

use crate::data::{batches, epoch_order, FashionMnist, Split};
use crate::models::{Model, ModelSpec};
use crate::report::EpochMetrics;

/// Everything that fixes a training run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub model: ModelSpec,
    pub epochs: usize,
    pub lr: f64,
    pub batch_size: usize,
    pub seed: u64,
    /// Shuffle the training set each epoch (seeded by `seed`); off means file order.
    pub shuffle: bool,
    /// At most this many training batches and this many test batches per epoch.
    pub limit_batches: Option<usize>,
}

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(
        "training diverged at epoch {epoch}, step {step}: the loss is {loss} (try a lower --lr)"
    )]
    Diverged {
        epoch: usize,
        step: usize,
        loss: f64,
    },
    #[error("{0}")]
    Invalid(String),
}

/// What a run ends with.
pub struct TrainOutcome {
    pub model: Model,
    pub metrics: Vec<EpochMetrics>,
}

/// Hooks for what a caller shows while training runs.
pub trait Observer {
    /// An epoch of `steps` training batches begins.
    fn epoch_started(&mut self, _epoch: usize, _steps: usize) {}
    /// One training step finished.
    fn step_done(&mut self) {}
    /// An epoch finished; an error stops training.
    fn epoch_done(&mut self, _metrics: &EpochMetrics) -> anyhow::Result<()> {
        Ok(())
    }
}

/// An observer that shows nothing.
pub struct Quiet;
impl Observer for Quiet {}

impl TrainConfig {
    pub fn validate(&self) -> Result<(), TrainError> {
        let invalid = |m: String| Err(TrainError::Invalid(m));
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return invalid(format!("--lr must be > 0, got {}", self.lr));
        }
        if self.batch_size == 0 {
            return invalid("--batch-size must be at least 1".into());
        }
        if self.batch_size == 1 && self.model.norm.kind != crate::norm::NormKind::None {
            return invalid(
                "--batch-size 1: batch norm needs at least 2 examples per batch to train \
                 (use --batch-size 2 or more, or --norm none)"
                    .into(),
            );
        }
        self.model
            .norm
            .validate()
            .map_err(|e| TrainError::Invalid(e.to_string()))?;
        if self.epochs == 0 {
            return invalid("--epochs must be at least 1".into());
        }
        if self.limit_batches == Some(0) {
            return invalid("--limit-batches must be at least 1".into());
        }
        Ok(())
    }
}

/// The training device: Flex with autodiff.
pub fn train_device() -> Device {
    Device::flex().autodiff()
}

/// Trains a freshly initialised model on `data`.
pub fn train(
    config: &TrainConfig,
    data: &FashionMnist,
    observer: &mut dyn Observer,
) -> Result<TrainOutcome, anyhow::Error> {
    config.validate()?;
    let device = train_device();
    let mut model = config.model.init(config.seed, &device);
    let mut optim = SgdConfig::new().init();
    let loss_fn = CrossEntropyLossConfig::new().init(&device);
    let mut metrics = Vec::with_capacity(config.epochs);

    for epoch in 1..=config.epochs {
        let started = Instant::now();
        let order = epoch_order(data.train.len(), config.seed, epoch, config.shuffle);
        let mut train_batches = batches(&order, config.batch_size, true);
        if let Some(limit) = config.limit_batches {
            train_batches.truncate(limit);
        }
        observer.epoch_started(epoch, train_batches.len());

        let (mut loss_sum, mut correct, mut seen) = (0.0f64, 0usize, 0usize);
        for (step, indices) in train_batches.iter().enumerate() {
            let (images, labels) = data.train.batch(indices, &device);
            let logits = model.forward(images);
            let loss = loss_fn.forward(logits.clone(), labels.clone());
            let loss_value: f64 = loss.clone().into_scalar::<f32>() as f64;
            if !loss_value.is_finite() {
                return Err(TrainError::Diverged {
                    epoch,
                    step: step + 1,
                    loss: loss_value,
                }
                .into());
            }
            loss_sum += loss_value * indices.len() as f64;
            correct += count_correct(logits.detach(), labels);
            seen += indices.len();

            let grads = GradientsParams::from_grads(loss.backward(), &model);
            model = optim.step(config.lr, model, grads);
            observer.step_done();
        }
        let train_seconds = started.elapsed().as_secs_f64();

        let test_acc = evaluate(
            &model.valid(),
            &data.test,
            config.batch_size,
            config.limit_batches,
        );
        let m = EpochMetrics {
            epoch,
            train_loss: loss_sum / seen as f64,
            train_acc: correct as f64 / seen as f64,
            test_acc,
            examples_per_sec: seen as f64 / train_seconds,
            seconds: started.elapsed().as_secs_f64(),
        };
        observer.epoch_done(&m)?;
        metrics.push(m);
    }
    Ok(TrainOutcome { model, metrics })
}

/// How many rows of `logits` pick the right label.
pub fn count_correct(logits: Tensor<2>, labels: Tensor<1, Int>) -> usize {
    let n = labels.dims()[0];
    let predicted: Tensor<1, Int> = logits.argmax(1).reshape([n]);
    predicted.equal(labels).int().sum().into_scalar::<i64>() as usize
}

/// Accuracy of an eval-mode model on `split` (the first `limit` batches if given).
pub fn evaluate(model: &Model, split: &Split, batch_size: usize, limit: Option<usize>) -> f64 {
    let device = Device::flex();
    let order: Vec<usize> = (0..split.len()).collect();
    let mut chunks = batches(&order, batch_size, false);
    if let Some(limit) = limit {
        chunks.truncate(limit);
    }
    let (mut correct, mut seen) = (0usize, 0usize);
    for indices in chunks {
        let (images, labels) = split.batch(indices, &device);
        correct += count_correct(model.forward(images), labels);
        seen += indices.len();
    }
    correct as f64 / seen.max(1) as f64
}
