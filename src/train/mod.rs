//! The training loop: mini-batches, cross-entropy, SGD / momentum / Adam with StepLR, and one
//! test pass in eval mode per epoch.

pub mod checkpoint;
pub mod optim;
pub mod recalibrate;

use std::time::Instant;

use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::GradientsParams;
use burn::tensor::module::interpolate;
use burn::tensor::ops::{InterpolateMode, InterpolateOptions};
use burn::tensor::{Device, Int, Tensor};

use crate::config::RunConfig;
use crate::data::{batches, epoch_order, FashionMnist, Split};
use crate::models::Model;
use crate::report::EpochMetrics;

pub use recalibrate::recalibrate_bn;

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
}

/// What a run ends with.
pub struct TrainOutcome {
    pub model: Model,
    pub metrics: Vec<EpochMetrics>,
}

/// Hooks for what a caller shows or saves while training runs.
pub trait Observer {
    /// An epoch of `steps` training batches begins.
    fn epoch_started(&mut self, _epoch: usize, _steps: usize) {}
    /// One training step finished.
    fn step_done(&mut self) {}
    /// An epoch finished; an error stops training.
    fn epoch_done(&mut self, _metrics: &EpochMetrics, _model: &Model) -> anyhow::Result<()> {
        Ok(())
    }
}

/// An observer that shows nothing.
pub struct Quiet;
impl Observer for Quiet {}

/// The training device: Flex with autodiff.
pub fn train_device() -> Device {
    Device::flex().autodiff()
}

/// The evaluation device: Flex without autodiff.
pub fn eval_device() -> Device {
    Device::flex()
}

/// Examples `indices` of `split` as model input: `(n, 1, size, size)` after a bilinear resize
/// (half-pixel centres, as PyTorch's `align_corners=False`) when `size` is not 28.
pub fn input_batch(
    split: &Split,
    indices: &[usize],
    size: usize,
    device: &Device,
) -> (Tensor<4>, Tensor<1, Int>) {
    if size == split.rows {
        return split.batch(indices, device);
    }
    // Resize on the plain device: nothing of it needs a gradient.
    let (images, labels) = split.batch(indices, &eval_device());
    let options = InterpolateOptions::new(InterpolateMode::Bilinear)
        .with_align_corners(false)
        .with_output_size([size, size]);
    let images = interpolate(images, options);
    (images.to_device(device), labels.to_device(device))
}

/// Trains a freshly initialised model as `config` says.
pub fn train(
    config: &RunConfig,
    data: &FashionMnist,
    observer: &mut dyn Observer,
) -> anyhow::Result<TrainOutcome> {
    config.validate()?;
    let device = train_device();
    let model = config.model_spec().init(config.seed, &device);
    train_from(config, data, model, 1, observer)
}

/// Trains `model` from 1-based `first_epoch` to `config.epochs`.
pub fn train_from(
    config: &RunConfig,
    data: &FashionMnist,
    mut model: Model,
    first_epoch: usize,
    observer: &mut dyn Observer,
) -> anyhow::Result<TrainOutcome> {
    let device = train_device();
    let mut optim = optim::optimizer(config);
    let mut schedule = optim::scheduler(config);
    for _ in 1..first_epoch {
        schedule.step();
    }
    let loss_fn = CrossEntropyLossConfig::new().init(&device);
    let size = config.image_size();
    let mut metrics = Vec::with_capacity(config.epochs);

    for epoch in first_epoch..=config.epochs {
        let started = Instant::now();
        let lr = schedule.step().base();
        let order = epoch_order(data.train.len(), config.seed, epoch, config.shuffle);
        let mut train_batches = batches(&order, config.batch_size, true);
        if let Some(limit) = config.limit_batches {
            train_batches.truncate(limit);
        }
        observer.epoch_started(epoch, train_batches.len());

        let (mut loss_sum, mut correct, mut seen) = (0.0f64, 0usize, 0usize);
        for (step, indices) in train_batches.iter().enumerate() {
            let (images, labels) = input_batch(&data.train, indices, size, &device);
            let logits = model.forward(images);
            let loss = loss_fn.forward(logits.clone(), labels.clone());
            let loss_value = loss.clone().into_scalar::<f32>() as f64;
            if !loss_value.is_finite() {
                let diverged = TrainError::Diverged {
                    epoch,
                    step: step + 1,
                    loss: loss_value,
                };
                return Err(diverged.into());
            }
            loss_sum += loss_value * indices.len() as f64;
            correct += count_correct(logits.detach(), labels);
            seen += indices.len();

            let grads = GradientsParams::from_grads(loss.backward(), &model);
            model = optim.step(lr, model, grads);
            observer.step_done();
        }
        let train_seconds = started.elapsed().as_secs_f64();

        if config.recalibrate_bn {
            model = recalibrate_bn(
                model,
                &data.train,
                config.batch_size,
                size,
                config.limit_batches,
            );
        }
        let limit = config.limit_batches;
        let test_acc = evaluate(&model.valid(), &data.test, config.batch_size, size, limit);
        let m = EpochMetrics {
            epoch,
            train_loss: loss_sum / seen as f64,
            train_acc: correct as f64 / seen as f64,
            test_acc,
            examples_per_sec: seen as f64 / train_seconds,
            seconds: started.elapsed().as_secs_f64(),
        };
        observer.epoch_done(&m, &model)?;
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
pub fn evaluate(
    model: &Model,
    split: &Split,
    batch_size: usize,
    size: usize,
    limit: Option<usize>,
) -> f64 {
    let device = eval_device();
    let order: Vec<usize> = (0..split.len()).collect();
    let mut chunks = batches(&order, batch_size, false);
    if let Some(limit) = limit {
        chunks.truncate(limit);
    }
    let (mut correct, mut seen) = (0usize, 0usize);
    for indices in chunks {
        let (images, labels) = input_batch(split, indices, size, &device);
        correct += count_correct(model.forward(images), labels);
        seen += indices.len();
    }
    correct as f64 / seen.max(1) as f64
}
