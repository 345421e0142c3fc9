//! Batch normalization as plain functions of Burn tensors.
//!
//! This is the chapter's `batch_norm(X, gamma, beta, moving_mean, moving_var, eps, momentum)`
//! split into its three steps, so that each can be tested and reused:
//! [`normalize_train`] (batch statistics), [`normalize_eval`] (given statistics) and
//! [`update_running`] (the exponential moving average). [`batch_norm`] strings them together.
//!
//! Shapes: `x` is `(N, C)`, `(N, C, L)`, `(N, C, H, W)` or `(N, C, D, H, W)`. Statistics are per
//! channel (axis 1), over every other axis. `gamma`, `beta` and the statistics have length `C`.
//!
//! The formula, per channel `c`, over the `m` values `x_i` of that channel:
//!
//! ```text
//! mean = (1/m) Σ x_i        var = (1/m) Σ (x_i - mean)²        (biased)
//! y_i  = gamma_c · (x_i - mean) / sqrt(var + eps) + beta_c
//! ```
//!
//! Training mode uses the batch's `mean` and `var`; eval mode uses the running statistics
//! instead, which training moves towards each batch's ([`update_running`], [`Convention`]).
//! Without `gamma` and `beta` (PyTorch's `affine=False`) the scale is 1 and the shift 0.

use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

/// Everything that can be wrong with a batch-norm call or configuration.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BnError {
    /// Training mode on an input with one value per channel (`N` times the spatial size is 1):
    /// its variance is 0, and the unbiased one that PyTorch's running variance averages is
    /// undefined.
    #[error(
        "batch norm in training mode needs more than one value per channel, got input of shape \
         {shape:?} (as PyTorch: use a batch of at least 2 examples)"
    )]
    SingleValuePerChannel {
        /// The input's shape.
        shape: Vec<usize>,
    },
    /// An input that is not `(N, C, ...)` of rank 2 to 5 with `C > 0`, or whose `C` differs
    /// from the layer's (or from the length of `gamma` or of the statistics).
    #[error(
        "batch norm expects input of shape (N, C, ...) with rank 2 to 5 and C = {channels}, got {shape:?}"
    )]
    Shape {
        /// The channel count expected, or 0 where nothing fixed it (no `gamma`, no layer).
        channels: usize,
        /// The input's shape.
        shape: Vec<usize>,
    },
    /// A setting out of range (eps not > 0, momentum outside `[0, 1]`, no channels, an epilogue
    /// that does not fit the input), with what is wrong.
    #[error("batch norm: {0}")]
    InvalidSetting(String),
}

crate::choice_enum! {
    /// Which convention moves the running statistics. The two differ in what `momentum` means and
    /// in which variance is averaged; both normalise with the biased batch variance in training.
    pub enum Convention {
        /// PyTorch: `running = (1 - m) * running + m * batch`, so `m = 0.1` is the weight of the
        /// new batch; the running variance averages the *unbiased* batch variance; momentum `None`
        /// is a cumulative average (`m = 1 / num_batches_tracked`).
        PyTorch = "pytorch",
        /// The d2l chapter's scratch layer: `moving = m * moving + (1 - m) * batch`, so `m = 0.9`
        /// is the weight of the *old* value; the moving variance averages the *biased* variance.
        D2l = "d2l",
    }
}

// choice_enum! takes no #[default] on a variant.
#[allow(clippy::derivable_impls)]
impl Default for Convention {
    fn default() -> Self {
        Self::PyTorch
    }
}

/// Batch norm's momentum: a weight in `[0, 1]`, which [`Convention`] reads as the new batch's
/// (PyTorch) or the old value's (d2l), or a cumulative average (`1 / num_batches_tracked`, as
/// PyTorch's `momentum=None`). Checked where it is made, so every `Momentum` is a valid one.
///
/// In files it is a number or the word `"cumulative"`.
///
/// ```
/// use bnlab::norm::Momentum;
/// assert_eq!(Momentum::new(0.1).unwrap().weight(), Some(0.1));
/// assert_eq!("cumulative".parse::<Momentum>().unwrap(), Momentum::CUMULATIVE);
/// assert!(Momentum::new(1.5).is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Momentum(Option<f64>);

impl Momentum {
    /// A cumulative average over every batch seen.
    pub const CUMULATIVE: Self = Self(None);
    /// PyTorch's default: the new batch weighs 0.1.
    pub const PYTORCH: Self = Self(Some(0.1));
    /// d2l's scratch layer: the old value weighs 0.9.
    pub const D2L: Self = Self(Some(0.9));

    /// A fixed weight `m`, which must lie in `[0, 1]`.
    pub fn new(m: f64) -> Result<Self, BnError> {
        match m.is_finite() && (0.0..=1.0).contains(&m) {
            true => Ok(Self(Some(m))),
            false => Err(BnError::InvalidSetting(format!(
                "momentum must be within [0, 1] or \"cumulative\", got {m}"
            ))),
        }
    }

    /// The fixed weight, or `None` for a cumulative average.
    pub fn weight(self) -> Option<f64> {
        self.0
    }
}

impl std::fmt::Display for Momentum {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(m) => write!(f, "{m}"),
            None => f.write_str("cumulative"),
        }
    }
}

impl std::str::FromStr for Momentum {
    type Err = BnError;
    fn from_str(s: &str) -> Result<Self, BnError> {
        match s {
            "cumulative" => Ok(Self::CUMULATIVE),
            _ => Self::new(s.parse().map_err(|_| {
                BnError::InvalidSetting(format!("'{s}' is neither a number nor \"cumulative\""))
            })?),
        }
    }
}

impl Serialize for Momentum {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            Some(m) => s.serialize_f64(m),
            None => s.serialize_str("cumulative"),
        }
    }
}

impl<'de> Deserialize<'de> for Momentum {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Written<'a> {
            Number(f64),
            Word(std::borrow::Cow<'a, str>),
        }
        let parsed = match Written::deserialize(d)? {
            Written::Number(m) => Self::new(m),
            Written::Word(w) => w.parse(),
        };
        parsed.map_err(serde::de::Error::custom)
    }
}

/// How the running statistics move after a training batch.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RunningUpdate {
    /// Read by `convention`.
    pub momentum: Momentum,
    /// Which weight `momentum` is, and which batch variance is averaged.
    pub convention: Convention,
}

impl Default for RunningUpdate {
    fn default() -> Self {
        Self::pytorch(Momentum::PYTORCH)
    }
}

impl RunningUpdate {
    /// PyTorch's convention with `momentum` the new batch's weight (the default:
    /// [`Momentum::PYTORCH`], 0.1).
    pub fn pytorch(momentum: Momentum) -> Self {
        Self {
            momentum,
            convention: Convention::PyTorch,
        }
    }

    /// d2l's scratch layer: `moving = 0.9 * moving + 0.1 * batch`, biased variance.
    pub fn d2l() -> Self {
        Self {
            momentum: Momentum::D2L,
            convention: Convention::D2l,
        }
    }

    /// The weight the new batch's statistic gets, once `num_batches_tracked` counts this batch.
    pub fn new_batch_weight(&self, num_batches_tracked: u64) -> f64 {
        match (self.momentum.weight(), self.convention) {
            (None, _) => 1.0 / num_batches_tracked.max(1) as f64,
            (Some(m), Convention::PyTorch) => m,
            (Some(m), Convention::D2l) => 1.0 - m,
        }
    }

    /// Whether the running variance averages the unbiased (n / (n - 1)) batch variance.
    pub fn unbiased_running_var(&self) -> bool {
        self.convention == Convention::PyTorch
    }
}

/// Statistics of one training batch, per channel.
#[derive(Debug, Clone)]
pub struct BatchStats {
    /// The mean, shape `(C)`.
    pub mean: Tensor<1>,
    /// The biased variance, shape `(C)`: the one training mode normalises with.
    pub var: Tensor<1>,
    /// How many values each channel's statistics average (N, N·L, N·H·W, ...).
    pub count: usize,
}

/// Running statistics as the functional form carries them.
#[derive(Debug, Clone)]
pub struct RunningStats {
    /// The running mean, shape `(C)`.
    pub mean: Tensor<1>,
    /// The running variance, shape `(C)`: unbiased batch variances averaged under
    /// [`Convention::PyTorch`], biased ones under [`Convention::D2l`].
    pub var: Tensor<1>,
    /// How many training batches have updated the statistics (what a cumulative average
    /// divides by).
    pub num_batches_tracked: u64,
}

impl RunningStats {
    /// PyTorch's (and the fixed d2l's) starting point: mean 0, variance 1.
    pub fn new(num_features: usize, device: &burn::tensor::Device) -> Self {
        Self {
            mean: Tensor::zeros([num_features], device),
            var: Tensor::ones([num_features], device),
            num_batches_tracked: 0,
        }
    }
}

/// Training or evaluation behaviour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Normalise with the batch's statistics and update the running ones.
    Train,
    /// Normalise with the running statistics, which stay as they are.
    Eval,
}

crate::choice_enum! {
    /// Which of the batch's statistics normalise: both (batch norm), or one of them, the
    /// chapter's "lite" variants (`--norm mean-only`, `--norm var-only`). The statistics and
    /// the running averages are the same for all three.
    pub enum Normalizer {
        /// `(x - mean) / sqrt(var + eps)`: batch norm.
        MeanAndVar = "mean-and-var",
        /// `x - mean`: centring only.
        MeanOnly = "mean-only",
        /// `x / sqrt(var + eps)`: scaling only (the variance is still taken about the mean).
        VarOnly = "var-only",
    }
}

/// Batch renormalization's schedule (Ioffe, 2017): plain batch norm (`r = 1`, `d = 0`) for
/// the first `warmup` training steps, then the limits on `r` and `d` widen linearly over
/// `ramp` steps to `r_max` and `d_max`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RenormSchedule {
    /// The final limit on `r`: `r` in `[1 / r_max, r_max]`; must be >= 1.
    pub r_max: f64,
    /// The final limit on `d`: `d` in `[-d_max, d_max]`; must be >= 0.
    pub d_max: f64,
    /// Steps of plain batch norm before the limits widen.
    pub warmup: u64,
    /// Steps over which they widen to `r_max` and `d_max` (0: at once).
    pub ramp: u64,
}

impl RenormSchedule {
    /// `(r_max, d_max)` at training step `step` (0 for the first).
    pub fn limits(&self, step: u64) -> (f64, f64) {
        if step < self.warmup {
            return (1.0, 0.0);
        }
        let t = match self.ramp {
            0 => 1.0,
            ramp => ((step - self.warmup) as f64 / ramp as f64).min(1.0),
        };
        (1.0 + t * (self.r_max - 1.0), t * self.d_max)
    }
}

/// Batch renormalization in training: `x̂ · r + d`, then γ and β, where `x̂` is batch norm's
/// normalised input and, per channel, `r = clip(σ_B / σ, 1/r_max, r_max)` and
/// `d = clip((μ_B - μ) / σ, -d_max, d_max)` with `σ = sqrt(running_var + eps)` and
/// `σ_B = sqrt(var_B + eps)`. `r` and `d` carry no gradient. With `r_max = 1` and `d_max = 0`
/// this is batch norm. The statistics returned update the running ones as batch norm's do.
///
/// # Errors
/// As [`normalize_train`].
pub fn normalize_train_renorm<const D: usize>(
    x: Tensor<D>,
    gamma: Option<Tensor<1>>,
    beta: Option<Tensor<1>>,
    eps: f64,
    (running_mean, running_var): (Tensor<1>, Tensor<1>),
    (r_max, d_max): (f64, f64),
) -> Result<(Tensor<D>, BatchStats), BnError> {
    let expected = gamma.as_ref().map(|g| g.dims()[0]);
    let channels = channels_of(&x.dims(), expected)?;
    let (normalized, stats) = normalize_train_with(x, None, None, eps, Normalizer::MeanAndVar)?;
    let sigma = running_var.add_scalar(eps).sqrt();
    let r = (stats.var.clone().add_scalar(eps).sqrt() / sigma.clone()).clamp(1.0 / r_max, r_max);
    let d = ((stats.mean.clone() - running_mean) / sigma).clamp(-d_max, d_max);
    let shape = channel_shape::<D>(channels);
    let corrected = normalized * r.detach().reshape(shape) + d.detach().reshape(shape);
    Ok((affine(corrected, gamma, beta, channels), stats))
}

/// Checks the input's rank and channel count and returns `C`.
///
/// # Errors
/// [`BnError::Shape`] unless `dims` is `(N, C, ...)` of rank 2 to 5 with `C > 0` and, if
/// `expected` is given, `C == expected`.
pub fn channels_of(dims: &[usize], expected: Option<usize>) -> Result<usize, BnError> {
    let shape_error = || BnError::Shape {
        channels: expected.unwrap_or(0),
        shape: dims.to_vec(),
    };
    if !(2..=5).contains(&dims.len()) {
        return Err(shape_error());
    }
    let channels = dims[1];
    if channels == 0 || expected.is_some_and(|e| e != channels) {
        return Err(shape_error());
    }
    Ok(channels)
}

/// `[1, C, 1, ...]`, the shape that broadcasts a per-channel vector over a rank-`D` input.
fn channel_shape<const D: usize>(channels: usize) -> [usize; D] {
    let mut shape = [1; D];
    shape[1] = channels;
    shape
}

fn reduce_axes<const D: usize>() -> Vec<usize> {
    (0..D).filter(|&axis| axis != 1).collect()
}

fn affine<const D: usize>(
    normalized: Tensor<D>,
    gamma: Option<Tensor<1>>,
    beta: Option<Tensor<1>>,
    channels: usize,
) -> Tensor<D> {
    let scaled = match gamma {
        Some(gamma) => normalized * gamma.reshape(channel_shape::<D>(channels)),
        None => normalized,
    };
    match beta {
        Some(beta) => scaled + beta.reshape(channel_shape::<D>(channels)),
        None => scaled,
    }
}

/// Training-mode normalisation: `gamma * (x - mean) / sqrt(var + eps) + beta` with the batch
/// mean and the biased batch variance. Returns the output (the shape of `x`) and the (detached)
/// batch statistics. The running statistics are not touched: [`update_running`] does that.
///
/// Accuracy: every value is first shifted by its channel's first value, a detached constant.
/// For data far from zero (the `conv2d_large_mean` case: 1000 ± 0.01) the shift is exact in
/// float32, and the sums that follow add small numbers, so neither the mean nor the variance
/// suffers the cancellation of a naive float32 `E[x²] - E[x]²` or `sum(x) / n`. The gradient is
/// unchanged, because batch norm's output does not depend on a constant shift.
///
/// # Errors
/// [`BnError::Shape`] if `x` is not `(N, C, ...)` of rank 2 to 5 or `gamma` is not of length
/// `C`; [`BnError::SingleValuePerChannel`] if each channel holds one value.
pub fn normalize_train<const D: usize>(
    x: Tensor<D>,
    gamma: Option<Tensor<1>>,
    beta: Option<Tensor<1>>,
    eps: f64,
) -> Result<(Tensor<D>, BatchStats), BnError> {
    normalize_train_with(x, gamma, beta, eps, Normalizer::MeanAndVar)
}

/// [`normalize_train`] with `normalizer` choosing which statistics normalise (the statistics
/// returned are the same whichever it is).
///
/// # Errors
/// As [`normalize_train`].
pub fn normalize_train_with<const D: usize>(
    x: Tensor<D>,
    gamma: Option<Tensor<1>>,
    beta: Option<Tensor<1>>,
    eps: f64,
    normalizer: Normalizer,
) -> Result<(Tensor<D>, BatchStats), BnError> {
    let dims = x.dims();
    let expected = gamma.as_ref().map(|g| g.dims()[0]);
    let channels = channels_of(&dims, expected)?;
    let count = dims.iter().product::<usize>() / channels;
    if count < 2 {
        return Err(BnError::SingleValuePerChannel {
            shape: dims.to_vec(),
        });
    }
    let axes = reduce_axes::<D>();

    let mut pivot = x.clone().detach();
    for &axis in &axes {
        pivot = pivot.narrow(axis, 0, 1);
    }
    // `mul_scalar(1 / n)`, not `div_scalar(n)`: Burn 0.22.1's div_scalar backward rounds the
    // scalar to float32, which costs float64 runs seven digits.
    let inv_count = 1.0 / count as f64;
    let x_for_scale = (normalizer == Normalizer::VarOnly).then(|| x.clone());
    let shifted = x - pivot.clone();
    let shifted_mean = shifted.clone().sum_dims(&axes).mul_scalar(inv_count);
    let centered = shifted - shifted_mean.clone();
    let var = centered
        .clone()
        .square()
        .sum_dims(&axes)
        .mul_scalar(inv_count);
    let inv_std = var.clone().add_scalar(eps).sqrt().recip();
    let mean = shifted_mean + pivot;
    let normalized = match normalizer {
        Normalizer::MeanAndVar => centered * inv_std,
        Normalizer::MeanOnly => centered,
        // x itself, not `centered + mean`: the gradient then flows to x through the variance
        // alone, as the formula says.
        Normalizer::VarOnly => x_for_scale.expect("kept for var-only") * inv_std,
    };
    let output = affine(normalized, gamma, beta, channels);

    let stats = BatchStats {
        mean: mean.detach().reshape([channels]),
        var: var.detach().reshape([channels]),
        count,
    };
    Ok((output, stats))
}

/// Eval-mode normalisation with given statistics (normally the running ones):
/// `gamma * (x - mean) / sqrt(var + eps) + beta`, a per-channel affine map of `x`.
///
/// # Errors
/// [`BnError::Shape`] if `x` is not `(N, C, ...)` of rank 2 to 5 with `C` the length of `mean`.
pub fn normalize_eval<const D: usize>(
    x: Tensor<D>,
    gamma: Option<Tensor<1>>,
    beta: Option<Tensor<1>>,
    mean: Tensor<1>,
    var: Tensor<1>,
    eps: f64,
) -> Result<Tensor<D>, BnError> {
    normalize_eval_with(x, gamma, beta, mean, var, eps, Normalizer::MeanAndVar)
}

/// [`normalize_eval`] with `normalizer` choosing which statistics normalise.
///
/// # Errors
/// As [`normalize_eval`].
pub fn normalize_eval_with<const D: usize>(
    x: Tensor<D>,
    gamma: Option<Tensor<1>>,
    beta: Option<Tensor<1>>,
    mean: Tensor<1>,
    var: Tensor<1>,
    eps: f64,
    normalizer: Normalizer,
) -> Result<Tensor<D>, BnError> {
    let channels = channels_of(&x.dims(), Some(mean.dims()[0]))?;
    let shape = channel_shape::<D>(channels);
    // Subtract first, then scale: for inputs far from zero, `x * scale + shift` would cancel
    // two large numbers in float32.
    let inv_std = || var.add_scalar(eps).sqrt().recip().reshape(shape);
    let normalized = match normalizer {
        Normalizer::MeanAndVar => (x - mean.reshape(shape)) * inv_std(),
        Normalizer::MeanOnly => x - mean.reshape(shape),
        Normalizer::VarOnly => x * inv_std(),
    };
    Ok(affine(normalized, gamma, beta, channels))
}

/// One step of the exponential moving average:
/// `running = (1 - w) * running + w * batch`, with `w` from [`RunningUpdate::new_batch_weight`].
/// `num_batches_tracked` must already count this batch.
///
/// The batch variance averaged is `stats.var · m / (m - 1)` (unbiased, `m = stats.count`) under
/// [`Convention::PyTorch`] and `stats.var` (biased) under [`Convention::D2l`]. Returns the new
/// running mean and variance.
pub fn update_running(
    running_mean: Tensor<1>,
    running_var: Tensor<1>,
    stats: &BatchStats,
    update: RunningUpdate,
    num_batches_tracked: u64,
) -> (Tensor<1>, Tensor<1>) {
    let weight = update.new_batch_weight(num_batches_tracked);
    let batch_var = if update.unbiased_running_var() {
        let n = stats.count as f64;
        stats.var.clone().mul_scalar(n / (n - 1.0))
    } else {
        stats.var.clone()
    };
    let mean = running_mean.mul_scalar(1.0 - weight) + stats.mean.clone().mul_scalar(weight);
    let var = running_var.mul_scalar(1.0 - weight) + batch_var.mul_scalar(weight);
    (mean, var)
}

/// The whole layer as one function, in the chapter's style.
///
/// - `Mode::Train`: normalise with batch statistics; if `running` is given, return it updated
///   (its `num_batches_tracked` one higher).
/// - `Mode::Eval`: normalise with `running`; without running statistics (PyTorch's
///   `track_running_stats=False`) the batch statistics are used, as PyTorch does.
///
/// # Errors
/// [`BnError::InvalidSetting`] if `eps` is not a finite number > 0, and the errors of
/// [`normalize_train`] and [`normalize_eval`].
///
/// # Example
///
/// ```
/// use bnlab::norm::functional::{batch_norm, Mode, RunningStats, RunningUpdate};
/// use burn::tensor::{Device, Tensor};
///
/// let device = Device::flex();
/// // 4 examples of 2 channels; channel 0 has mean 2.5 and biased variance 1.25.
/// let x = Tensor::<2>::from_floats([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0], [4.0, 40.0]], &device);
/// let per_channel = |t: Tensor<2>| -> Vec<f32> { t.into_data().iter::<f32>().collect() };
/// let update = RunningUpdate::default(); // PyTorch's: momentum 0.1, unbiased running variance
///
/// // Training mode: every channel comes out with mean 0 and variance 1.
/// let running = RunningStats::new(2, &device); // mean 0, variance 1
/// let (y, running) = batch_norm(x.clone(), None, None, Some(running), Mode::Train, 1e-5, update)?;
/// for (mean, var) in per_channel(y.clone().mean_dim(0)).iter().zip(per_channel(y.var_bias(0))) {
///     assert!(mean.abs() < 1e-5 && (var - 1.0).abs() < 1e-4);
/// }
/// // The running statistics moved a tenth of the way to the batch's: channel 0's mean to
/// // 0.9 · 0 + 0.1 · 2.5, its variance to 0.9 · 1 + 0.1 · 5/3 (the unbiased 1.25 · 4/3).
/// let running = running.unwrap();
/// assert_eq!(running.num_batches_tracked, 1);
/// let mean: Vec<f32> = running.mean.into_data().iter::<f32>().collect();
/// let var: Vec<f32> = running.var.into_data().iter::<f32>().collect();
/// assert!((mean[0] - 0.25).abs() < 1e-6 && (var[0] - (0.9 + 0.1 * 5.0 / 3.0)).abs() < 1e-6);
///
/// // Eval mode normalises with the statistics it is given: with the batch's own, it gives
/// // what training mode gave.
/// let batch = RunningStats {
///     mean: Tensor::from_floats([2.5, 25.0], &device),
///     var: Tensor::from_floats([1.25, 125.0], &device),
///     num_batches_tracked: 1,
/// };
/// let (y, _) = batch_norm(x, None, None, Some(batch), Mode::Eval, 1e-5, update)?;
/// for (mean, var) in per_channel(y.clone().mean_dim(0)).iter().zip(per_channel(y.var_bias(0))) {
///     assert!(mean.abs() < 1e-5 && (var - 1.0).abs() < 1e-4);
/// }
/// # Ok::<(), bnlab::norm::BnError>(())
/// ```
pub fn batch_norm<const D: usize>(
    x: Tensor<D>,
    gamma: Option<Tensor<1>>,
    beta: Option<Tensor<1>>,
    running: Option<RunningStats>,
    mode: Mode,
    eps: f64,
    update: RunningUpdate,
) -> Result<(Tensor<D>, Option<RunningStats>), BnError> {
    if !(eps.is_finite() && eps > 0.0) {
        return Err(BnError::InvalidSetting(format!(
            "eps must be > 0, got {eps}"
        )));
    }
    match (mode, running) {
        (Mode::Eval, Some(running)) => {
            let y = normalize_eval(
                x,
                gamma,
                beta,
                running.mean.clone(),
                running.var.clone(),
                eps,
            )?;
            Ok((y, Some(running)))
        }
        (Mode::Eval, None) => Ok((normalize_train(x, gamma, beta, eps)?.0, None)),
        (Mode::Train, running) => {
            let (y, stats) = normalize_train(x, gamma, beta, eps)?;
            let running = running.map(|r| {
                let tracked = r.num_batches_tracked + 1;
                let (mean, var) = update_running(r.mean, r.var, &stats, update, tracked);
                RunningStats {
                    mean,
                    var,
                    num_batches_tracked: tracked,
                }
            });
            Ok((y, running))
        }
    }
}
