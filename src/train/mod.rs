//! The training loop: mini-batches, cross-entropy, SGD / momentum / Adam with StepLR, and one
//! test pass in eval mode per epoch.

pub mod checkpoint;
pub mod optim;
pub mod recalibrate;
pub mod resume;
pub mod rundir;
pub mod session;
pub mod sweep;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::{GradientsParams, ModuleOptimizer};
use burn::tensor::{Device, Int, Tensor};

use crate::config::RunConfig;
use crate::data::{augmented_input_batch, batches, epoch_order, input_batch, Augment};
use crate::data::{FashionMnist, Split};
use crate::models::Model;
use crate::report::EpochMetrics;

pub use recalibrate::recalibrate_bn;
pub use resume::{Partial, Progress};

/// Why training stopped with an error of its own.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A batch's loss was not finite (NaN or infinite).
    #[error(
        "training diverged at epoch {epoch}, step {step}: the loss is {loss:e} (try a lower --lr)"
    )]
    Diverged {
        /// The epoch, 1-based.
        epoch: usize,
        /// The step within it, 1-based.
        step: usize,
        /// The loss.
        loss: f64,
    },
}

/// A mean cross-entropy above this has diverged, finite or not: guessing among 10 classes
/// costs ln 10 ≈ 2.3, and a loss of 1e4 puts the right class at probability e^-10000. Runs
/// past it (BN with a huge --lr) used to go on to losses of 1e30 without a word.
pub const MAX_SANE_LOSS: f64 = 1e4;

/// Hooks for what a caller shows or saves while training runs.
pub trait Observer {
    /// A run called `name` starts (or resumes) in `dir`.
    fn run_started(&mut self, _name: &str, _config: &RunConfig, _dir: &std::path::Path) {}
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

/// The training device: the chosen backend (`--device`, Flex by default) with autodiff.
pub fn train_device() -> Device {
    crate::device::training_device()
}

/// The evaluation device: the chosen backend without autodiff.
pub fn eval_device() -> Device {
    crate::device::inference_device()
}

/// The model training starts from, on `device`: seeded, or read from `config.init_weights`.
pub fn initial_model(config: &RunConfig, device: &Device) -> anyhow::Result<Model> {
    match &config.init_weights {
        None => Ok(config.model_spec().init(config.seed, device)),
        Some(path) => {
            let renames = config
                .init_renames
                .iter()
                .map(|r| r.parse())
                .collect::<Result<Vec<crate::interop::state_dict::Rename>, String>>()
                .map_err(|e| anyhow::anyhow!("--rename {e}"))?;
            let model = crate::interop::torch::import_file(path, &config.model_spec(), &renames)
                .map_err(|e| anyhow::anyhow!("--init {e:#}"))?;
            crate::models::check_weights(&model)
                .map_err(|e| anyhow::anyhow!("--init {}: unusable weights: {e}", path.display()))?;
            // The import lands on the evaluation device; training wants autodiff.
            let model = match device.is_autodiff() {
                true => model.train(),
                false => model,
            };
            Ok(model)
        }
    }
}

/// Where a run saves its resume points, and what stops it early.
#[derive(Default)]
pub struct RunOptions<'a> {
    /// Run directory: a resume point is saved here after every epoch and on a stop.
    pub dir: Option<&'a std::path::Path>,
    /// Set (by Ctrl-C) to finish the current step, save and return.
    pub stop: Option<&'a AtomicBool>,
}

/// What a run ends with.
pub struct TrainOutcome {
    /// The trained model, on the training device.
    pub model: Model,
    /// Every finished epoch's metrics, those before a resume included.
    pub metrics: Vec<EpochMetrics>,
    /// The run stopped early at the caller's request (its resume point is saved).
    pub interrupted: bool,
}

/// Trains a freshly initialised model as `config` says, saving nothing.
pub fn train(
    config: &RunConfig,
    data: &FashionMnist,
    observer: &mut dyn Observer,
) -> anyhow::Result<TrainOutcome> {
    config.validate()?;
    let model = initial_model(config, &train_device())?;
    let optim = optim::optimizer(config);
    run(
        config,
        data,
        model,
        optim,
        Progress::start(),
        &RunOptions::default(),
        observer,
    )
}

/// Trains `model` from the point `progress` describes to the end of `config.epochs`.
pub fn run(
    config: &RunConfig,
    data: &FashionMnist,
    mut model: Model,
    mut optim: ModuleOptimizer,
    mut progress: Progress,
    options: &RunOptions,
    observer: &mut dyn Observer,
) -> anyhow::Result<TrainOutcome> {
    let device = train_device();
    let smoothing = (config.label_smoothing > 0.0).then_some(config.label_smoothing as f32);
    let loss_fn = CrossEntropyLossConfig::new()
        .with_smoothing(smoothing)
        .init(&device);
    let size = config.image_size();
    let augment = Augment {
        crop: config.augment_crop,
        flip: config.augment_flip,
    };
    // The time budget counts the epochs before a resume too.
    let clock = Clock {
        start: Instant::now(),
        before: progress.metrics.iter().map(|m| m.seconds).sum::<f64>()
            + progress.partial.train_seconds,
        budget: config.time_budget,
        reserve: std::cell::Cell::new(None),
        test_steps: test_pass_in_steps(config, data),
        last_check: std::cell::Cell::new(None),
        step: std::cell::Cell::new(0.0),
    };
    let stop_signalled = || options.stop.is_some_and(|s| s.load(Ordering::SeqCst));
    let stop_requested = || stop_signalled() || clock.spent();

    while progress.epoch <= config.epochs {
        let epoch = progress.epoch;
        let started = Instant::now();
        let order = epoch_order(data.train.len(), config.seed, epoch, config.shuffle);
        let mut train_batches = batches(&order, config.batch_size, true);
        if let Some(limit) = config.limit_batches {
            train_batches.truncate(limit);
        }
        observer.epoch_started(epoch, train_batches.len());
        clock.last_check.set(None);

        let steps = Steps {
            epoch,
            config,
            batches: &train_batches,
            first: progress.steps_done,
        };
        let (trained, mut sums, stopped) = std::thread::scope(|scope| {
            // The next batch is decoded (and resized) on another thread while a step runs.
            let (tx, rx) = std::sync::mpsc::sync_channel(2);
            let first = progress.steps_done;
            let pending = &train_batches[first..];
            scope.spawn(move || {
                for (step, indices) in (first..).zip(pending) {
                    let seed = augment_seed(config.seed, epoch, step);
                    let batch = augmented_input_batch(
                        &data.train,
                        indices,
                        size,
                        augment,
                        seed,
                        &eval_device(),
                    );
                    if tx.send(batch).is_err() {
                        break; // the steps ended early
                    }
                }
            });
            let next = || rx.recv().expect("the batch thread outlives the steps");
            run_steps(
                model,
                &mut optim,
                &loss_fn,
                &steps,
                progress.partial,
                next,
                observer,
                &stop_requested,
            )
        })?;
        model = trained;
        // Out of time: the epoch ends here, and the run after its test pass.
        let out_of_time = clock.spent();
        if let Some(steps_done) = stopped.filter(|_| !out_of_time) {
            sums.train_seconds += started.elapsed().as_secs_f64();
            progress.steps_done = steps_done;
            progress.partial = sums;
            if let Some(dir) = options.dir {
                resume::save(dir, &progress, &model, &optim)?;
            }
            return Ok(TrainOutcome {
                model,
                metrics: progress.metrics,
                interrupted: true,
            });
        }
        sums.train_seconds += started.elapsed().as_secs_f64();

        let tested =
            epoch.is_multiple_of(config.test_every) || epoch == config.epochs || out_of_time;
        let mut test_acc = None;
        if tested {
            let testing = Instant::now();
            if config.recalibrate_bn {
                let limit = match (config.recalibrate_batches, config.limit_batches) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                model = recalibrate_bn(model, &data.train, config.batch_size, size, limit);
            }
            test_acc = Some(evaluate(
                &model.valid(),
                &data.test,
                &EvalOptions::of(config),
            ));
            clock.reserve.set(Some(testing.elapsed().as_secs_f64()));
        }
        let seconds = started.elapsed().as_secs_f64();
        let m = EpochMetrics {
            epoch,
            train_loss: sums.loss_sum / sums.seen as f64,
            train_acc: sums.correct as f64 / sums.seen as f64,
            test_acc,
            examples_per_sec: sums.seen as f64 / sums.train_seconds,
            seconds,
            elapsed: clock.before + clock.start.elapsed().as_secs_f64(),
        };
        progress.metrics.push(m.clone());
        progress.epoch += 1;
        progress.steps_done = 0;
        progress.partial = Partial::default();
        if let Some(dir) = options.dir {
            resume::save(dir, &progress, &model, &optim)?;
        }
        observer.epoch_done(&m, &model)?;
        if out_of_time {
            break;
        }
        if stop_signalled() && progress.epoch <= config.epochs {
            return Ok(TrainOutcome {
                model,
                metrics: progress.metrics,
                interrupted: true,
            });
        }
    }
    Ok(TrainOutcome {
        model,
        metrics: progress.metrics,
        interrupted: false,
    })
}

/// Wall time against `--time-budget`.
struct Clock {
    /// When this process started training.
    start: Instant,
    /// Seconds spent on the run before (a resumed run's finished epochs).
    before: f64,
    budget: Option<f64>,
    /// Seconds the last test pass took: kept back from the budget for the last one.
    reserve: std::cell::Cell<Option<f64>>,
    /// Before any test pass, its time guessed in training steps.
    test_steps: f64,
    /// When [`Self::spent`] was last asked in this epoch (it is asked after every step).
    last_check: std::cell::Cell<Option<Instant>>,
    /// The longest time between two asks: a step, which may still run before a stop.
    step: std::cell::Cell<f64>,
}

impl Clock {
    /// Whether training must stop now to finish within the budget: whether another step and
    /// a test pass would pass it.
    fn spent(&self) -> bool {
        let Some(budget) = self.budget else {
            return false;
        };
        let now = Instant::now();
        if let Some(last) = self.last_check.replace(Some(now)) {
            self.step
                .set(self.step.get().max((now - last).as_secs_f64()));
        }
        let elapsed = self.before + (now - self.start).as_secs_f64();
        // A quarter more for the last test pass: on a shared machine one pass can take longer
        // than the one before (a run of speedrun-long ended 0.9 s past its 600 s without it).
        let test_pass = match self.reserve.get() {
            Some(seconds) => seconds,
            None => self.test_steps * self.step.get(),
        };
        elapsed + self.step.get() + 1.25 * test_pass >= budget
    }
}

/// A test pass (and the precise-BN pass before it) in training steps: each of its batches is a
/// forward pass, about a third of a training step's work.
fn test_pass_in_steps(config: &RunConfig, data: &FashionMnist) -> f64 {
    let batch = config.batch_size.max(1);
    let limit = |n: usize| config.limit_batches.map_or(n, |l| n.min(l));
    let test = limit(data.test.len().div_ceil(batch)) * (1 + config.tta_flip as usize);
    let recalibrate = match config.recalibrate_bn {
        true => limit(
            config
                .recalibrate_batches
                .map_or(data.train.len().div_ceil(batch), |b| b),
        ),
        false => 0,
    };
    (test + recalibrate) as f64 / 3.0
}

/// The seed of the augmentation of step `step` (0-based) of `epoch`: a function of the three
/// alone, so that a resumed epoch sees the same images.
fn augment_seed(seed: u64, epoch: usize, step: usize) -> u64 {
    let stream = seed ^ 0xA076_1D64_78BD_642F;
    stream
        .wrapping_add((epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15))
        .wrapping_add((step as u64).wrapping_mul(0xE703_7ED1_A0B4_28DB))
}

/// The training steps of one epoch.
struct Steps<'a> {
    epoch: usize,
    config: &'a RunConfig,
    batches: &'a [&'a [usize]],
    /// Steps already done (on resume).
    first: usize,
}

/// Runs the steps of an epoch from `steps.first`, taking batches from `next`. Returns the
/// model, the epoch's sums, and, if a stop was requested before the last step, how many steps
/// are done.
#[allow(clippy::too_many_arguments)]
fn run_steps(
    mut model: Model,
    optim: &mut ModuleOptimizer,
    loss_fn: &burn::nn::loss::CrossEntropyLoss,
    steps: &Steps,
    mut sums: Partial,
    mut next: impl FnMut() -> (Tensor<4>, Tensor<1, Int>),
    observer: &mut dyn Observer,
    stop_requested: &dyn Fn() -> bool,
) -> anyhow::Result<(Model, Partial, Option<usize>)> {
    let device = train_device();
    let per_epoch = steps.batches.len();
    for step in steps.first..per_epoch {
        let lr = steps.config.lr_at_step(steps.epoch, step, per_epoch);
        let (images, labels) = next();
        let (images, labels) = (images.to_device(&device), labels.to_device(&device));
        let batch = labels.dims()[0];
        let logits = model.forward(images);
        let loss = loss_fn.forward(logits.clone(), labels.clone());
        let loss_value = loss.clone().into_scalar::<f32>() as f64;
        if loss_value.is_nan() || loss_value > MAX_SANE_LOSS {
            let diverged = TrainError::Diverged {
                epoch: steps.epoch,
                step: step + 1,
                loss: loss_value,
            };
            return Err(diverged.into());
        }
        sums.loss_sum += loss_value * batch as f64;
        sums.correct += count_correct(logits.detach(), labels);
        sums.seen += batch;

        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(lr, model, grads);
        observer.step_done();
        if stop_requested() && step + 1 < steps.batches.len() {
            return Ok((model, sums, Some(step + 1)));
        }
    }
    Ok((model, sums, None))
}

/// How many rows of `logits` pick the right label.
pub fn count_correct(logits: Tensor<2>, labels: Tensor<1, Int>) -> usize {
    let n = labels.dims()[0];
    let predicted: Tensor<1, Int> = logits.argmax(1).reshape([n]);
    predicted.equal(labels).int().sum().into_scalar::<i64>() as usize
}

/// How a test pass runs.
#[derive(Debug, Clone, Copy)]
pub struct EvalOptions {
    /// Examples per batch.
    pub batch_size: usize,
    /// The image side the model takes.
    pub size: usize,
    /// Only the first `limit` batches.
    pub limit: Option<usize>,
    /// Sum the logits of each image and of its mirror image (test-time augmentation).
    pub tta_flip: bool,
}

impl EvalOptions {
    /// The test pass of a run with `config`.
    pub fn of(config: &RunConfig) -> Self {
        Self {
            batch_size: config.batch_size,
            size: config.image_size(),
            limit: config.limit_batches,
            tta_flip: config.tta_flip,
        }
    }
}

/// Accuracy of an eval-mode model on `split`.
pub fn evaluate(model: &Model, split: &Split, options: &EvalOptions) -> f64 {
    let device = eval_device();
    let order: Vec<usize> = (0..split.len()).collect();
    let mut chunks = batches(&order, options.batch_size, false);
    if let Some(limit) = options.limit {
        chunks.truncate(limit);
    }
    let (mut correct, mut seen) = (0usize, 0usize);
    for indices in chunks {
        let (images, labels) = input_batch(split, indices, options.size, &device);
        let logits = match options.tta_flip {
            true => model.forward(images.clone()) + model.forward(images.flip([3])),
            false => model.forward(images),
        };
        correct += count_correct(logits, labels);
        seen += indices.len();
    }
    correct as f64 / seen.max(1) as f64
}
