//! The batch-norm layer as a Burn [`Module`], written from the functions in
//! [`super::functional`]. Burn's own `nn::BatchNorm` is not used here.

use burn::config::Config;
use burn::module::{Flag, Module, Param, RunningState};
use burn::nn::conv::Conv2d;
use burn::nn::pool::MaxPool2d;
use burn::nn::PaddingConfig2d;
use burn::tensor::{DType, Device, Tensor};

use std::sync::Once;

use super::epilogue::Epilogue;
use super::functional::{
    channels_of, normalize_eval_with, normalize_train_renorm, normalize_train_with, update_running,
    BatchStats, BnError, Convention, Momentum, Normalizer, RenormSchedule, RunningUpdate,
};
use crate::ops::batch_norm as fused;
use crate::ops::bn_relu_conv2d::try_bn_relu_conv2d;
use crate::ops::bn_relu_max_pool::{bn_relu_max_pool, MaxPoolWindow};
use crate::ops::conv2d::{conv2d, geometry_of};
use crate::ops::dense_block::BlockShape;
use crate::ops::epilogue::apply_epilogue;
use crate::ops::{family, Family};

/// Configuration of [`BatchNorm`]. The defaults are PyTorch's: eps 1e-5, momentum 0.1 on the
/// new batch, unbiased running variance, affine, running statistics kept.
///
/// ```
/// use bnlab::norm::{BatchNormConfig, Convention, Kernel, Momentum};
///
/// // PyTorch's `nn.BatchNorm2d(16)`, trained with the fused kernel where there is one.
/// let pytorch = BatchNormConfig::new(16).with_kernel(Kernel::Fused);
/// // The d2l chapter's scratch layer.
/// let d2l = BatchNormConfig::d2l(16);
/// assert_eq!((d2l.momentum, d2l.convention), (Momentum::D2L, Convention::D2l));
/// assert!(BatchNormConfig::new(16).with_eps(0.0).validate().is_err());
/// # let _ = pytorch;
/// ```
#[derive(Config, Debug)]
pub struct BatchNormConfig {
    /// `C`, the number of channels: the size of axis 1 of the input.
    pub num_features: usize,
    /// Added to the variance before its square root; must be > 0.
    #[config(default = 1e-5)]
    pub eps: f64,
    /// Weight of the new batch under [`Convention::PyTorch`], of the old value under
    /// [`Convention::D2l`], or a cumulative average.
    #[config(default = "Momentum::PYTORCH")]
    pub momentum: Momentum,
    /// How `momentum` is read, and whether the running variance averages unbiased (PyTorch) or
    /// biased (d2l) batch variances.
    #[config(default = "Convention::PyTorch")]
    pub convention: Convention,
    /// Learn a per-channel scale (gamma) and shift (beta).
    #[config(default = true)]
    pub affine: bool,
    /// Keep running statistics; without them, eval mode uses batch statistics too.
    #[config(default = true)]
    pub track_running_stats: bool,
    /// How training-mode batches are normalised.
    #[config(default = "Kernel::Composed")]
    pub kernel: Kernel,
    /// Which statistics normalise: both (batch norm), or only the mean or the variance.
    #[config(default = "Normalizer::MeanAndVar")]
    pub normalizer: Normalizer,
    /// Ghost batch norm: in training, the batch is normalised in consecutive chunks of this
    /// many examples, each with its own statistics, which update the running ones in turn.
    #[config(default = "None")]
    pub ghost_batch: Option<usize>,
    /// Batch renormalization: training corrects the batch statistics towards the running
    /// ones within limits this schedule widens ([`normalize_train_renorm`]).
    #[config(default = "None")]
    pub renorm: Option<RenormSchedule>,
}

/// How a [`BatchNorm`] computes training mode. Both give the same numbers (the reference tests
/// run both); eval mode is the same per-channel affine map either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum Kernel {
    /// Composed from Burn tensor ops: runs on every backend (`--norm scratch`).
    #[default]
    Composed,
    /// The hand-written kernels of [`crate::ops::batch_norm`] (`--norm fused`): Flex (float32
    /// and float64) and CubeCL on wgpu and CUDA (float32). Other backends and dtypes fall back
    /// to [`Kernel::Composed`], with a note on stderr the first time.
    Fused,
}

impl BatchNormConfig {
    /// The d2l chapter's scratch layer: momentum 0.9 on the old value, biased variance.
    pub fn d2l(num_features: usize) -> Self {
        Self::new(num_features)
            .with_momentum(Momentum::D2L)
            .with_convention(Convention::D2l)
    }

    fn running_update(&self) -> RunningUpdate {
        RunningUpdate {
            momentum: self.momentum,
            convention: self.convention,
        }
    }

    /// Checks the settings [`Self::try_init`] needs.
    ///
    /// # Errors
    /// [`BnError::InvalidSetting`] if `num_features` is 0 or `eps` is not a finite number > 0.
    /// (A [`Momentum`] is valid by construction.)
    pub fn validate(&self) -> Result<(), BnError> {
        if self.num_features == 0 {
            return Err(BnError::InvalidSetting("num_features must be > 0".into()));
        }
        if let Some(r) = self.renorm {
            if !(r.r_max >= 1.0 && r.r_max.is_finite() && r.d_max >= 0.0 && r.d_max.is_finite()) {
                return Err(BnError::InvalidSetting(format!(
                    "batch renormalization needs r_max >= 1 and d_max >= 0, got {} and {}",
                    r.r_max, r.d_max
                )));
            }
            if !self.track_running_stats {
                return Err(BnError::InvalidSetting(
                    "batch renormalization corrects towards running statistics: it needs them"
                        .into(),
                ));
            }
        }
        if self.ghost_batch.is_some_and(|n| n < 2) {
            return Err(BnError::InvalidSetting(
                "a ghost batch needs at least 2 examples".into(),
            ));
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return Err(BnError::InvalidSetting(format!(
                "eps must be > 0, got {}",
                self.eps
            )));
        }
        Ok(())
    }

    /// The layer on `device`: gamma 1, beta 0, running mean 0, running variance 1, in training
    /// mode. Give an autodiff device to train it (see [`BatchNorm`]).
    ///
    /// # Errors
    /// As [`Self::validate`].
    pub fn try_init(&self, device: &Device) -> Result<BatchNorm, BnError> {
        self.validate()?;
        let c = self.num_features;
        let param = |t: Tensor<1>| Param::from_tensor(t);
        let state = |t: Tensor<1>| RunningState::new(t);
        let (gamma, beta) = match self.affine {
            true => (
                Some(param(Tensor::ones([c], device))),
                Some(param(Tensor::zeros([c], device))),
            ),
            false => (None, None),
        };
        let (running_mean, running_var, num_batches_tracked) = match self.track_running_stats {
            // Variance starts at 1, not 0: the d2l notebook's zero start is a known bug.
            true => (
                Some(state(Tensor::zeros([c], device))),
                Some(state(Tensor::ones([c], device))),
                Some(state(Tensor::zeros([1], device))),
            ),
            false => (None, None, None),
        };
        Ok(BatchNorm {
            gamma,
            beta,
            running_mean,
            running_var,
            num_batches_tracked,
            training: Param::from_bool(true),
            num_features: c,
            eps: self.eps,
            update: self.running_update(),
            kernel: self.kernel,
            normalizer: self.normalizer,
            ghost_batch: self.ghost_batch,
            renorm: self.renorm,
        })
    }

    /// The layer on `device`, as [`Self::try_init`].
    ///
    /// # Panics
    /// On an invalid configuration; [`Self::try_init`] returns the error instead.
    pub fn init(&self, device: &Device) -> BatchNorm {
        self.try_init(device).unwrap_or_else(|e| panic!("{e}"))
    }
}

/// Batch normalization over axis 1 of `(N, C, ...)` input (rank 2 to 5): PyTorch's
/// `BatchNorm1d`, `2d` and `3d` in one layer, made with [`BatchNormConfig`].
///
/// Trains (batch statistics, running-statistics update) when the input is on an autodiff device
/// and the layer's `training` flag is on; `model.valid()` turns both off, which gives eval mode.
/// This is the rule Burn's built-in layer follows, so the two can be swapped in a model.
/// The formula and the conventions: [`super::functional`].
///
/// # Example
///
/// ```
/// use bnlab::norm::BatchNormConfig;
/// use burn::module::Module;
/// use burn::tensor::{Device, Distribution, Tensor};
///
/// let device = Device::flex();
/// let bn = BatchNormConfig::new(3).init(&device.clone().autodiff());
/// // 8 images of 3 channels, 4 × 4, with values around 5.
/// let x = Tensor::<4>::random([8, 3, 4, 4], Distribution::Normal(5.0, 2.0), &device);
/// // Each channel's values as a row: (C, N·H·W).
/// let rows = |t: Tensor<4>| -> Tensor<2> { t.swap_dims(0, 1).flatten(1, 3) };
/// let values = |t: Tensor<2>| -> Vec<f32> { t.into_data().iter::<f32>().collect() };
///
/// // Training mode (an autodiff input, training flag on): each channel is normalised with the
/// // batch's statistics, which also update the running ones. (`to_device` would keep `x`
/// // plain: `autodiff()` is what makes it autodiff.)
/// let y = rows(bn.forward(x.clone().autodiff()));
/// for (mean, var) in values(y.clone().mean_dim(1)).iter().zip(values(y.var_bias(1))) {
///     assert!(mean.abs() < 1e-4 && (var - 1.0).abs() < 1e-3);
/// }
///
/// // Eval mode: `valid()` leaves autodiff and turns the training flag off. The running mean
/// // has moved a tenth of the way from 0 to the batch's mean (PyTorch's momentum 0.1)...
/// let bn = bn.valid();
/// let (mean, var) = bn.running_stats().unwrap();
/// let batch_mean = values(rows(x.clone()).mean_dim(1));
/// let running_mean: Vec<f32> = mean.clone().into_data().iter::<f32>().collect();
/// for (running, batch) in running_mean.iter().zip(&batch_mean) {
///     assert!((running - 0.1 * batch).abs() < 1e-4);
/// }
/// // ...and eval mode normalises with the running statistics, leaving them as they are.
/// let y = bn.forward(x.clone());
/// let channel = [1, 3, 1, 1];
/// let want = (x - mean.reshape(channel)) / var.add_scalar(1e-5).sqrt().reshape(channel);
/// assert!((y - want).abs().max().into_scalar::<f32>() < 1e-5);
/// ```
#[derive(Module, Debug)]
pub struct BatchNorm {
    /// The learned per-channel scale, shape `(C)`; `None` without `affine`.
    pub gamma: Option<Param<Tensor<1>>>,
    /// The learned per-channel shift, shape `(C)`; `None` without `affine`.
    pub beta: Option<Param<Tensor<1>>>,
    /// The running mean, shape `(C)`; `None` without `track_running_stats`.
    pub running_mean: Option<RunningState<Tensor<1>>>,
    /// The running variance, shape `(C)`; `None` without `track_running_stats`.
    pub running_var: Option<RunningState<Tensor<1>>>,
    /// How many training batches have updated the running statistics, shape `(1)`. A float so
    /// that it lives in a `RunningState` with the other buffers.
    pub num_batches_tracked: Option<RunningState<Tensor<1>>>,
    /// On at creation; `valid()` turns it off, `train()` back on.
    pub training: Param<Flag>,
    /// `C`, the number of channels.
    pub num_features: usize,
    /// Added to the variance before its square root.
    pub eps: f64,
    /// How the running statistics move: momentum and convention.
    #[module(skip)]
    pub update: RunningUpdate,
    /// How training mode is computed.
    #[module(skip)]
    pub kernel: Kernel,
    /// Which statistics normalise ([`Normalizer`]).
    #[module(skip)]
    pub normalizer: Normalizer,
    /// The ghost batch's size, if the layer normalises training batches in chunks.
    #[module(skip)]
    pub ghost_batch: Option<usize>,
    /// Batch renormalization's schedule, if the layer renormalises.
    #[module(skip)]
    pub renorm: Option<RenormSchedule>,
}

impl BatchNorm {
    /// Whether a forward pass on `x` uses batch statistics.
    pub fn is_training_for<const D: usize>(&self, x: &Tensor<D>) -> bool {
        x.device().is_autodiff() && self.training.is_enabled()
    }

    /// The layer on `x` of shape `(N, C, ...)`: the output has the shape of `x`. In training mode
    /// the running statistics are updated in place (they are `RunningState`s).
    ///
    /// # Panics
    /// On a wrong input shape, or on one value per channel in training mode (PyTorch raises an
    /// error there too). [`Self::try_forward`] returns these as errors.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        self.forward_then(x, Epilogue::NONE)
    }

    /// The layer, then `epilogue` (an activation and a pool): `pool(activation(bn(x)))`, in one
    /// pass where the fused kernel trains on Flex. A pool makes the output `(N, C, H/k, W/k)`.
    ///
    /// # Panics
    /// As [`Self::forward`], and on an epilogue that cannot apply to the input's shape.
    pub fn forward_then<const D: usize>(&self, x: Tensor<D>, epilogue: Epilogue) -> Tensor<D> {
        self.try_forward_then(x, epilogue)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`Self::forward`], with the errors returned.
    ///
    /// # Errors
    /// [`BnError::Shape`] if `x` is not `(N, C, ...)` of rank 2 to 5 with `C = num_features`;
    /// [`BnError::SingleValuePerChannel`] in training mode on one value per channel.
    pub fn try_forward<const D: usize>(&self, x: Tensor<D>) -> Result<Tensor<D>, BnError> {
        self.try_forward_then(x, Epilogue::NONE)
    }

    /// The layer, then `epilogue`. With the fused kernel, in training mode on Flex, one op
    /// computes both; otherwise the epilogue is composed from Burn ops after the layer.
    ///
    /// # Errors
    /// As [`Self::try_forward`], and [`BnError::InvalidSetting`] if `epilogue` pools and `x` is
    /// not `(N, C, H, W)` of at least `k × k`.
    pub fn try_forward_then<const D: usize>(
        &self,
        x: Tensor<D>,
        epilogue: Epilogue,
    ) -> Result<Tensor<D>, BnError> {
        channels_of(&x.dims(), Some(self.num_features))?;
        epilogue
            .output_shape(&x.dims())
            .map_err(BnError::InvalidSetting)?;
        let gamma = self.gamma.as_ref().map(|p| p.val());
        let beta = self.beta.as_ref().map(|p| p.val());
        let running = self.running_mean.as_ref().zip(self.running_var.as_ref());

        match (self.is_training_for(&x), running) {
            (false, Some((mean, var))) => {
                let device = x.device();
                let y = normalize_eval_with(
                    x,
                    gamma,
                    beta,
                    mean.value().to_device(&device),
                    var.value().to_device(&device),
                    self.eps,
                    self.normalizer,
                )?;
                Ok(apply_epilogue(y, epilogue))
            }
            (false, None) => Ok(self.normalize_train(x, gamma, beta, epilogue)?.0),
            (true, _) => {
                let device = x.device();
                let mut outputs = Vec::new();
                for chunk in self.ghost_chunks(x) {
                    let (y, stats) =
                        self.normalize_train(chunk, gamma.clone(), beta.clone(), epilogue)?;
                    self.track(&stats, &device);
                    outputs.push(y);
                }
                Ok(match outputs.len() {
                    1 => outputs.pop().expect("one"),
                    _ => Tensor::cat(outputs, 0),
                })
            }
        }
    }

    /// The training batch as ghost batch norm normalises it: consecutive chunks of
    /// `ghost_batch` examples; a last, smaller chunk stands alone if it has at least two
    /// values per channel, else joins the chunk before. Without a ghost batch, the batch.
    fn ghost_chunks<const D: usize>(&self, x: Tensor<D>) -> Vec<Tensor<D>> {
        let dims = x.dims();
        let (n, per_example) = (dims[0], dims[2..].iter().product::<usize>());
        let Some(size) = self.ghost_batch.filter(|&size| size < n) else {
            return vec![x];
        };
        let mut starts: Vec<usize> = (0..n).step_by(size).collect();
        if (n - starts[starts.len() - 1]) * per_example < 2 {
            starts.pop();
        }
        let ends = starts.iter().skip(1).copied().chain([n]);
        starts
            .iter()
            .zip(ends)
            .map(|(&start, end)| x.clone().narrow(0, start, end - start))
            .collect()
    }

    /// Whether training mode can take the hand-written kernels: batch norm itself, on the whole
    /// batch, asked for with the fused kernel.
    fn fused_applies(&self) -> bool {
        self.kernel == Kernel::Fused
            && self.normalizer == Normalizer::MeanAndVar
            && self.ghost_batch.is_none()
            && self.renorm.is_none()
    }

    /// Training mode: the running statistics take in the batch's (if the layer keeps them).
    fn track(&self, stats: &BatchStats, device: &Device) {
        let running = self.running_mean.as_ref().zip(self.running_var.as_ref());
        if let (Some((mean, var)), Some(tracked)) = (running, &self.num_batches_tracked) {
            let tracked_now = tracked.value_sync().to_device(device).add_scalar(1.0);
            // The count reaches the host only for a cumulative average.
            let count = match self.update.momentum.weight() {
                None => tracked_now.clone().into_scalar::<f32>() as u64,
                Some(_) => 0,
            };
            let (new_mean, new_var) = update_running(
                mean.value_sync().to_device(device),
                var.value_sync().to_device(device),
                stats,
                self.update,
                count,
            );
            mean.update(new_mean.detach());
            var.update(new_var.detach());
            tracked.update(tracked_now.detach());
        }
    }

    /// DenseNet's dense block in training mode: layers `l = 0, 1, ...` of `layers` are BN →
    /// ReLU → `conv`, each adding its `G` output channels to its input, as one op
    /// ([`crate::ops::dense_block`]) that keeps the block in one buffer. `None` where the op
    /// does not apply (not every layer has the fused kernel and γ, β; not training on Flex in
    /// float32 or float64; convolutions that do not keep the side or do not chain as a dense
    /// block; fewer than two values per channel): run the layers one by one then.
    ///
    /// # Panics
    /// As [`Self::forward_then`].
    pub fn dense_block(x: Tensor<4>, layers: &[(&BatchNorm, &Conv2d)]) -> Option<Tensor<4>> {
        let (first, first_conv) = layers.first()?;
        let [n, c0, h, w] = x.dims();
        let [growth, _, k, _] = first_conv.weight.dims();
        let geometry = geometry_of(first_conv, &x)?;
        let fits = layers.iter().enumerate().all(|(l, (bn, conv))| {
            let c = c0 + l * growth;
            bn.fused_applies()
                && bn.gamma.is_some()
                && bn.beta.is_some()
                && bn.eps == first.eps
                && bn.num_features == c
                && conv.weight.dims() == [growth, c, k, k]
                && conv.kernel_size == [k, k]
                && conv.stride == first_conv.stride
                && conv.padding == first_conv.padding
        });
        let keeps_side = geometry.stride == 1 && 2 * geometry.padding + 1 == k;
        if !(fits && keeps_side && first.is_training_for(&x) && n * h * w >= 2) {
            return None;
        }
        let device = x.device();
        let cat = |f: &dyn Fn(&BatchNorm, &Conv2d) -> Tensor<1>| {
            Tensor::cat(layers.iter().map(|(bn, conv)| f(bn, conv)).collect(), 0)
        };
        let params = [
            cat(&|bn, _| bn.gamma.as_ref().expect("checked").val()),
            cat(&|bn, _| bn.beta.as_ref().expect("checked").val()),
            cat(&|_, conv| conv.weight.val().flatten(0, 3)),
            cat(&|_, conv| match &conv.bias {
                Some(b) => b.val(),
                None => Tensor::zeros([growth], (&device, x.dtype())),
            }),
        ];
        let shape = BlockShape {
            layers: layers.len(),
            growth,
            kernel: k,
            geometry,
        };
        let (y, means, vars) = crate::ops::dense_block::dense_block(x, params, first.eps, shape);
        let mut at = 0;
        for (bn, _) in layers {
            let c = bn.num_features;
            let stats = BatchStats {
                mean: means.clone().slice(at..at + c),
                var: vars.clone().slice(at..at + c),
                count: n * h * w,
            };
            bn.track(&stats, &device);
            at += c;
        }
        Some(y)
    }

    /// The layer, then ReLU, then `pool`: in training mode with the fused kernel on Flex, one
    /// op ([`crate::ops::bn_relu_max_pool`]) that keeps neither the activations nor the
    /// pool's indices; otherwise [`Self::forward_then`] and the pool.
    ///
    /// # Panics
    /// As [`Self::forward_then`].
    pub fn forward_relu_max_pool(&self, x: Tensor<4>, pool: &MaxPool2d) -> Tensor<4> {
        let [n, c, h, w] = x.dims();
        let window = match pool.padding {
            PaddingConfig2d::Explicit(a, b, c, d) if a == b && b == c && c == d => Some(a),
            PaddingConfig2d::Valid => Some(0),
            _ => None,
        }
        .filter(|_| {
            pool.kernel_size[0] == pool.kernel_size[1]
                && pool.stride[0] == pool.stride[1]
                && pool.dilation == [1, 1]
                && !pool.ceil_mode
        })
        .map(|padding| MaxPoolWindow {
            kernel: pool.kernel_size[0],
            stride: pool.stride[0],
            padding,
        })
        .filter(|window| window.output_side(h).is_some() && window.output_side(w).is_some());
        let applies = self.fused_applies()
            && self.is_training_for(&x)
            && c == self.num_features
            && n * h * w >= 2
            && family(&x.device()) == Some(Family::Flex)
            && matches!(x.dtype(), DType::F32 | DType::F64);
        if let (true, Some(window), Some(gamma), Some(beta)) =
            (applies, window, self.gamma.as_ref(), self.beta.as_ref())
        {
            let device = x.device();
            let (y, mean, var) = bn_relu_max_pool(x, gamma.val(), beta.val(), self.eps, window);
            let count = n * h * w;
            self.track(&BatchStats { mean, var, count }, &device);
            return y;
        }
        pool.forward(self.forward_then(x, Epilogue::RELU))
    }

    /// The layer, then ReLU, then `conv`: in training mode with the fused kernel on Flex, one
    /// op ([`crate::ops::bn_relu_conv2d`]) that never writes the normalised tensor; otherwise
    /// [`Self::forward_then`] and the convolution.
    ///
    /// # Panics
    /// As [`Self::forward_then`].
    pub fn forward_relu_conv(&self, x: Tensor<4>, conv: &Conv2d) -> Tensor<4> {
        self.relu_then_conv(x, conv, false)
    }

    /// The layer, then ReLU, then a 2×2 average pool of stride 2, then `conv`: DenseNet's
    /// transition with its pool moved before its 1×1 convolution, with which it commutes. In
    /// training mode with the fused kernel on Flex, one op ([`crate::ops::bn_relu_conv2d`])
    /// whose convolution runs on the pooled activations; otherwise [`Self::forward_then`]
    /// with the ReLU and the pool as its epilogue, and the convolution.
    ///
    /// # Panics
    /// As [`Self::forward_then`].
    pub fn forward_relu_avg_pool_conv(&self, x: Tensor<4>, conv: &Conv2d) -> Tensor<4> {
        self.relu_then_conv(x, conv, true)
    }

    /// [`Self::forward_relu_conv`], or with `avg_pool` [`Self::forward_relu_avg_pool_conv`].
    fn relu_then_conv(&self, x: Tensor<4>, conv: &Conv2d, avg_pool: bool) -> Tensor<4> {
        if self.fused_applies() && self.is_training_for(&x) {
            let device = x.device();
            let channels = x.dims()[1];
            let gamma = self.gamma.as_ref().map(|p| p.val());
            let beta = self.beta.as_ref().map(|p| p.val());
            // Without affine parameters the op still takes them, as constants.
            let gamma = gamma.unwrap_or_else(|| Tensor::ones([channels], (&device, x.dtype())));
            let beta = beta.unwrap_or_else(|| Tensor::zeros([channels], (&device, x.dtype())));
            if channels == self.num_features {
                let fused = try_bn_relu_conv2d(x.clone(), gamma, beta, self.eps, conv, avg_pool);
                if let Some((y, stats)) = fused {
                    self.track(&stats, &device);
                    return y;
                }
            }
        }
        let epilogue = match avg_pool {
            true => Epilogue::RELU_AVG_POOL_2,
            false => Epilogue::RELU,
        };
        conv2d(conv, self.forward_then(x, epilogue))
    }

    /// Training-mode normalisation with batch statistics, then `epilogue`.
    fn normalize_train<const D: usize>(
        &self,
        x: Tensor<D>,
        gamma: Option<Tensor<1>>,
        beta: Option<Tensor<1>>,
        epilogue: Epilogue,
    ) -> Result<(Tensor<D>, BatchStats), BnError> {
        let running = self.running_mean.as_ref().zip(self.running_var.as_ref());
        if let (Some(schedule), Some((mean, var)), Some(tracked)) =
            (self.renorm, running, &self.num_batches_tracked)
        {
            let device = x.device();
            let step = tracked.value_sync().into_scalar::<f32>() as u64;
            let running = (
                mean.value_sync().to_device(&device),
                var.value_sync().to_device(&device),
            );
            let (y, stats) =
                normalize_train_renorm(x, gamma, beta, self.eps, running, schedule.limits(step))?;
            return Ok((apply_epilogue(y, epilogue), stats));
        }
        if self.kernel == Kernel::Fused && self.normalizer == Normalizer::MeanAndVar {
            match fused::try_normalize_train(
                x.clone(),
                gamma.clone(),
                beta.clone(),
                self.eps,
                epilogue,
            ) {
                Some(result) => return result,
                None => {
                    static NOTE: Once = Once::new();
                    NOTE.call_once(|| {
                        eprintln!(
                            "note: --norm fused has no kernel for this backend or dtype; \
                             using the scratch layer"
                        )
                    });
                }
            }
        }
        let (y, stats) = normalize_train_with(x, gamma, beta, self.eps, self.normalizer)?;
        Ok((apply_epilogue(y, epilogue), stats))
    }

    /// The running mean and variance, as stored (eval reads them); `None` without
    /// `track_running_stats`. Burn's `RunningState` can hold back a training step's update
    /// until it is synchronised; `valid()` does that, so read them from the eval-mode layer.
    pub fn running_stats(&self) -> Option<(Tensor<1>, Tensor<1>)> {
        Some((
            self.running_mean.as_ref()?.value(),
            self.running_var.as_ref()?.value(),
        ))
    }
}
