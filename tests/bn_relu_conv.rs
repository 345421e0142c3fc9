//! BN → ReLU → Conv as one op (`bnlab::ops::bn_relu_conv2d`, what `BatchNorm::forward_relu_conv`
//! runs in training mode with the fused kernel on Flex), on DenseNet's geometries, with and
//! without a 2×2 average pool before the convolution (its transition, pool first:
//! `BatchNorm::forward_relu_avg_pool_conv`), and BN →
//! ReLU → an overlapping max pool as one op (`bnlab::ops::bn_relu_max_pool`, the ResNet and
//! DenseNet stem's 3×3/2 pad 1, what `BatchNorm::forward_relu_max_pool` runs):
//!
//! - against the same layers composed (the fused BN op with its ReLU epilogue, or its ReLU and
//!   average-pool epilogue, then the im2col convolution, or Burn's `MaxPool2d`): output, the gradients of x, γ, β (and the weight and
//!   the bias), and the running statistics after the step, equal bit for bit in float32 and
//!   float64 (the ops run the same arithmetic per value and the same sums in the same order;
//!   they only skip keeping the BN output);
//! - against central finite differences in float64, for the loss `sum(y ⊙ g)`: every gradient
//!   within 1e-6 of the largest (h = 1e-6; a nudge that crosses a ReLU kink or changes a
//!   window's maximum would show, and the random data keeps both far more than h away).

mod common;

use common::{random, tensor, values};

use bnlab::norm::{BatchNorm, BatchNormConfig, Epilogue, Kernel};
use bnlab::ops::bn_relu_conv2d::try_bn_relu_conv2d;
use bnlab::ops::bn_relu_max_pool::{bn_relu_max_pool, MaxPoolWindow};
use bnlab::ops::conv2d::conv2d;
use burn::module::{Param, RunningState};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::pool::{AvgPool2dConfig, MaxPool2d, MaxPool2dConfig};
use burn::nn::PaddingConfig2d;
use burn::tensor::{DType, Device, Tensor};
use rand::SeedableRng;

/// A DenseNet-like case: `c_in` channels of `hw × hw`, a `k × k` conv with padding `pad` to
/// `c_out` channels, and the values every run starts from.
struct Case {
    shape: [usize; 4],
    c_out: usize,
    k: usize,
    pad: usize,
    x: Vec<f64>,
    gamma: Vec<f64>,
    beta: Vec<f64>,
    weight: Vec<f64>,
    bias: Vec<f64>,
    g: Vec<f64>,
    /// A 2×2 average pool of stride 2 between the ReLU and the convolution.
    avg_pool: bool,
}

impl Case {
    fn new(
        n: usize,
        c_in: usize,
        hw: usize,
        c_out: usize,
        k: usize,
        pad: usize,
        seed: u64,
    ) -> Self {
        let mut rng = rand_pcg::Pcg64::seed_from_u64(seed);
        // Long enough for the pooled cases' smaller output too.
        let out = hw + 2 * pad - k + 1;
        Self {
            shape: [n, c_in, hw, hw],
            c_out,
            k,
            pad,
            x: random(n * c_in * hw * hw, 2.0, 0.5, &mut rng),
            gamma: random(c_in, 0.5, 1.0, &mut rng),
            beta: random(c_in, 0.5, 0.0, &mut rng),
            weight: random(c_out * c_in * k * k, 0.5, 0.0, &mut rng),
            bias: random(c_out, 0.5, 0.0, &mut rng),
            g: random(n * c_out * out * out, 1.0, 0.0, &mut rng),
            avg_pool: false,
        }
    }

    /// The same case with a 2×2 average pool before the convolution.
    fn pooled(self) -> Self {
        Self {
            avg_pool: true,
            ..self
        }
    }

    fn out_shape(&self) -> [usize; 4] {
        let [n, _, hw, _] = self.shape;
        let side = if self.avg_pool { hw / 2 } else { hw };
        let out = side + 2 * self.pad - self.k + 1;
        [n, self.c_out, out, out]
    }

    /// The output's share of `g`.
    fn g(&self) -> &[f64] {
        &self.g[..self.out_shape().iter().product()]
    }

    fn layers(&self, dtype: DType, device: &Device) -> (BatchNorm, Conv2d) {
        let c_in = self.shape[1];
        let mut bn: BatchNorm = BatchNormConfig::new(c_in)
            .with_kernel(Kernel::Fused)
            .init(device);
        bn.gamma = Some(Param::from_tensor(tensor(
            &self.gamma,
            [c_in],
            dtype,
            device,
        )));
        bn.beta = Some(Param::from_tensor(tensor(
            &self.beta,
            [c_in],
            dtype,
            device,
        )));
        // Running statistics in the test's dtype, as a model in that dtype has them.
        let filled = |v: f64, n: usize| RunningState::new(tensor(&vec![v; n], [n], dtype, device));
        bn.running_mean = Some(filled(0.0, c_in));
        bn.running_var = Some(filled(1.0, c_in));
        bn.num_batches_tracked = Some(filled(0.0, 1));
        let mut conv = Conv2dConfig::new([c_in, self.c_out], [self.k, self.k])
            .with_padding(PaddingConfig2d::Explicit(
                self.pad, self.pad, self.pad, self.pad,
            ))
            .init(device);
        let shape = [self.c_out, c_in, self.k, self.k];
        conv.weight = Param::from_tensor(tensor(&self.weight, shape, dtype, device));
        conv.bias = Some(Param::from_tensor(tensor(
            &self.bias,
            [self.c_out],
            dtype,
            device,
        )));
        (bn, conv)
    }

    /// `[y, dx, dγ, dβ, dW, db, running mean, running var]` of one training step.
    fn run(&self, dtype: DType, path: Path) -> Vec<Vec<f64>> {
        let device = Device::flex().autodiff();
        let (bn, conv) = self.layers(dtype, &device);
        let x = tensor(&self.x, self.shape, dtype, &device).require_grad();
        let y = match (path, self.avg_pool) {
            (Path::Fused, false) => bn.forward_relu_conv(x.clone(), &conv),
            (Path::Fused, true) => bn.forward_relu_avg_pool_conv(x.clone(), &conv),
            (Path::Composed, false) => conv2d(&conv, bn.forward_then(x.clone(), Epilogue::RELU)),
            (Path::Composed, true) => {
                conv2d(&conv, bn.forward_then(x.clone(), Epilogue::RELU_AVG_POOL_2))
            }
            (Path::PoolAfterConv, _) => AvgPool2dConfig::new([2, 2])
                .init()
                .forward(conv2d(&conv, bn.forward_then(x.clone(), Epilogue::RELU))),
        };
        let grads = (y.clone() * tensor(self.g(), self.out_shape(), dtype, &device))
            .sum()
            .backward();
        let grad = |t: Tensor<1>| values(t.grad(&grads).expect("a gradient"));
        let (mean, var) = bn.running_stats().expect("kept");
        vec![
            values(y),
            values(x.grad(&grads).expect("a gradient")),
            grad(bn.gamma.as_ref().unwrap().val()),
            grad(bn.beta.as_ref().unwrap().val()),
            values(conv.weight.val().grad(&grads).expect("a gradient")),
            grad(conv.bias.as_ref().unwrap().val()),
            values(mean),
            values(var),
        ]
    }

    /// `sum(conv(relu(bn(x))) ⊙ g)` by the fused op on a plain device, in float64.
    fn loss(&self, x: &[f64], gamma: &[f64], beta: &[f64], weight: &[f64], bias: &[f64]) -> f64 {
        let device = Device::flex();
        let c_in = self.shape[1];
        let mut conv = Conv2dConfig::new([c_in, self.c_out], [self.k, self.k])
            .with_padding(PaddingConfig2d::Explicit(
                self.pad, self.pad, self.pad, self.pad,
            ))
            .init(&device);
        let shape = [self.c_out, c_in, self.k, self.k];
        conv.weight = Param::from_tensor(tensor(weight, shape, DType::F64, &device));
        conv.bias = Some(Param::from_tensor(tensor(
            bias,
            [self.c_out],
            DType::F64,
            &device,
        )));
        let (y, _) = try_bn_relu_conv2d(
            tensor(x, self.shape, DType::F64, &device),
            tensor(gamma, [c_in], DType::F64, &device),
            tensor(beta, [c_in], DType::F64, &device),
            1e-5,
            &conv,
            self.avg_pool,
        )
        .expect("the fused op applies on Flex");
        let g = tensor(self.g(), self.out_shape(), DType::F64, &device);
        values((y * g).sum())[0]
    }
}

/// How [`Case::run`] computes the layers.
#[derive(Clone, Copy)]
enum Path {
    /// The fused op.
    Fused,
    /// The fused BN op with its epilogue (ReLU, or ReLU and the average pool), then the
    /// convolution.
    Composed,
    /// The fused BN op with its ReLU, the convolution, then Burn's `AvgPool2d` 2×2: the
    /// transition's order in d2l and PyTorch.
    PoolAfterConv,
}

const NAMES: [&str; 8] = [
    "y",
    "dx",
    "dgamma",
    "dbeta",
    "dweight",
    "dbias",
    "running mean",
    "running var",
];

fn cases() -> Vec<(&'static str, Case)> {
    vec![
        ("dense layer 3x3", Case::new(4, 24, 8, 8, 3, 1, 1)),
        // 20 channels of 32×32 under a 5×5 window without padding: the columns formed in
        // chunks of whole channels (6, 6, 6 and 2 in float32, 3 at a time in float64), each
        // chunk's product added onto the last.
        (
            "5x5 layer, columns in chunks",
            Case::new(2, 20, 32, 8, 5, 0, 9),
        ),
        // 16 channels of 24×24 (DenseNet's first block): the convolution, its weight gradient
        // and its dx (a convolution of dy's 16 channels) by taps over a padded grid.
        (
            "dense layer 3x3 on a grid",
            Case::new(2, 16, 24, 16, 3, 1, 10),
        ),
        ("transition 1x1", Case::new(3, 16, 16, 8, 1, 0, 2)),
        (
            "small maps, grouped images",
            Case::new(9, 12, 3, 8, 3, 1, 3),
        ),
        // 2×2 maps: four regions, each a product over its own taps (ops::conv2d's regions).
        ("2x2 maps by regions", Case::new(5, 6, 2, 4, 3, 1, 4)),
        // DenseNet's transition, pool first.
        (
            "transition 1x1, pooled",
            Case::new(3, 16, 16, 8, 1, 0, 6).pooled(),
        ),
        // An odd side: the last row and column are in no window, their gradient is BN's alone.
        ("odd side, pooled", Case::new(4, 6, 7, 5, 1, 0, 7).pooled()),
        // Pooled to 2×2, then a 3×3 convolution by regions.
        (
            "3x3 after the pool",
            Case::new(3, 5, 4, 4, 3, 1, 8).pooled(),
        ),
    ]
}

#[test]
fn fused_op_equals_the_composed_layers_bit_for_bit() {
    for (name, case) in cases() {
        for dtype in [DType::F32, DType::F64] {
            let fused = case.run(dtype, Path::Fused);
            let composed = case.run(dtype, Path::Composed);
            for (i, what) in NAMES.iter().enumerate() {
                assert_eq!(fused[i], composed[i], "{name} {dtype:?}: {what}");
            }
        }
    }
}

/// The transition pools before its 1×1 convolution, where d2l pools after it: the two orders
/// are equal in exact arithmetic (`mean(W·a + b) = W·mean(a) + b`) and differ by rounding
/// alone: within 1e-12 of the largest value in float64 and 1e-5 in float32.
#[test]
fn pooling_before_the_1x1_conv_equals_pooling_after_it() {
    for (name, case) in cases().into_iter().filter(|(_, c)| c.avg_pool && c.k == 1) {
        for (dtype, tolerance) in [(DType::F64, 1e-12), (DType::F32, 1e-5)] {
            let first = case.run(dtype, Path::Fused);
            let after = case.run(dtype, Path::PoolAfterConv);
            for (i, what) in NAMES.iter().enumerate() {
                let scale = after[i].iter().fold(1.0f64, |m, v| m.max(v.abs()));
                for (j, (a, b)) in first[i].iter().zip(&after[i]).enumerate() {
                    assert!(
                        (a - b).abs() <= tolerance * scale,
                        "{name} {dtype:?}: {what}[{j}]: {a} pooled first, {b} after"
                    );
                }
                assert_eq!(first[i].len(), after[i].len(), "{name}: {what}");
            }
        }
    }
}

#[test]
fn fused_op_gradients_match_finite_differences() {
    let h = 1e-6;
    for (name, case) in cases() {
        let got = case.run(DType::F64, Path::Fused);
        let params = [&case.x, &case.gamma, &case.beta, &case.weight, &case.bias];
        for (p, analytic) in params.iter().zip(&got[1..6]) {
            let scale = analytic.iter().fold(1e-3f64, |m, v| m.max(v.abs()));
            // Every value of the small tensors, a spread of the large ones.
            let step = (p.len() / 40).max(1);
            for i in (0..p.len()).step_by(step) {
                let nudged = |d: f64| {
                    let mut args: Vec<Vec<f64>> = params.iter().map(|v| v.to_vec()).collect();
                    let which = params.iter().position(|q| std::ptr::eq(*q, *p)).unwrap();
                    args[which][i] += d;
                    case.loss(&args[0], &args[1], &args[2], &args[3], &args[4])
                };
                let numeric = (nudged(h) - nudged(-h)) / (2.0 * h);
                assert!(
                    (numeric - analytic[i]).abs() <= 1e-6 * scale,
                    "{name}: gradient {i}: {} by backward, {numeric} by differences",
                    analytic[i]
                );
            }
        }
    }
}

#[test]
fn the_op_declines_what_it_does_not_take() {
    let case = Case::new(2, 4, 6, 4, 3, 1, 4);
    let device = Device::flex();
    let (_, conv) = case.layers(DType::F32, &device);
    let x = tensor(&case.x, case.shape, DType::F32, &device);
    let one = |n: usize| Tensor::<1>::ones([n], (&device, DType::F32));
    // γ of the wrong length, and one value per channel: the caller composes the layers.
    assert!(try_bn_relu_conv2d(x.clone(), one(3), one(4), 1e-5, &conv, false).is_none());
    let single = x.clone().slice([0..1, 0..4, 0..1, 0..1]);
    let (_, conv1) = Case::new(1, 4, 1, 4, 1, 0, 5).layers(DType::F32, &device);
    assert!(try_bn_relu_conv2d(single, one(4), one(4), 1e-5, &conv1, false).is_none());
    // A 1×1 side has no 2×2 window to pool.
    let row = x.slice([0..2, 0..4, 0..1, 0..6]);
    assert!(try_bn_relu_conv2d(row, one(4), one(4), 1e-5, &conv1, true).is_none());
}

/// The stem's pool: 3×3, stride 2, padding 1.
fn stem_pool() -> MaxPool2d {
    MaxPool2dConfig::new([3, 3])
        .with_strides([2, 2])
        .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
        .init()
}

const STEM_WINDOW: MaxPoolWindow = MaxPoolWindow {
    kernel: 3,
    stride: 2,
    padding: 1,
};

/// `[y, dx, dγ, dβ, running mean, running var]` of one step of BN → ReLU → the stem's pool.
fn pool_step(case: &Case, dtype: DType, fused: bool) -> Vec<Vec<f64>> {
    let device = Device::flex().autodiff();
    let (bn, _) = case.layers(dtype, &device);
    let x = tensor(&case.x, case.shape, dtype, &device).require_grad();
    let pool = stem_pool();
    let y = if fused {
        bn.forward_relu_max_pool(x.clone(), &pool)
    } else {
        pool.forward(bn.forward_then(x.clone(), Epilogue::RELU))
    };
    let g = pool_g(case, &y.dims());
    let grads = (y.clone() * tensor(&g, y.dims(), dtype, &device))
        .sum()
        .backward();
    let grad = |t: Tensor<1>| values(t.grad(&grads).expect("a gradient"));
    let (mean, var) = bn.running_stats().expect("kept");
    vec![
        values(y),
        values(x.grad(&grads).expect("a gradient")),
        grad(bn.gamma.as_ref().unwrap().val()),
        grad(bn.beta.as_ref().unwrap().val()),
        values(mean),
        values(var),
    ]
}

/// The upstream gradient of the pooled output: the case's `g`, cycled to the pooled size.
fn pool_g(case: &Case, dims: &[usize; 4]) -> Vec<f64> {
    case.g
        .iter()
        .cycle()
        .take(dims.iter().product())
        .copied()
        .collect()
}

fn pool_cases() -> Vec<(&'static str, Case)> {
    vec![
        ("stem 3x3/2 on 12x12", Case::new(3, 4, 12, 1, 1, 0, 11)),
        (
            "stem 3x3/2 on 7x7 (odd side)",
            Case::new(2, 3, 7, 1, 1, 0, 12),
        ),
    ]
}

#[test]
fn fused_max_pool_equals_the_composed_layers_bit_for_bit() {
    for (name, case) in pool_cases() {
        for dtype in [DType::F32, DType::F64] {
            let fused = pool_step(&case, dtype, true);
            let composed = pool_step(&case, dtype, false);
            let names = ["y", "dx", "dgamma", "dbeta", "running mean", "running var"];
            for (i, what) in names.iter().enumerate() {
                assert_eq!(fused[i], composed[i], "{name} {dtype:?}: {what}");
            }
        }
    }
}

#[test]
fn fused_max_pool_gradients_match_finite_differences() {
    let h = 1e-6;
    for (name, case) in pool_cases() {
        let got = pool_step(&case, DType::F64, true);
        let device = Device::flex();
        let loss = |x: &[f64], gamma: &[f64], beta: &[f64]| {
            let c = case.shape[1];
            let (y, _, _) = bn_relu_max_pool(
                tensor(x, case.shape, DType::F64, &device),
                tensor(gamma, [c], DType::F64, &device),
                tensor(beta, [c], DType::F64, &device),
                1e-5,
                STEM_WINDOW,
            );
            let g = pool_g(&case, &y.dims());
            values((y.clone() * tensor(&g, y.dims(), DType::F64, &device)).sum())[0]
        };
        let params = [&case.x, &case.gamma, &case.beta];
        for (which, analytic) in got[1..4].iter().enumerate() {
            let scale = analytic.iter().fold(1e-3f64, |m, v| m.max(v.abs()));
            let len = params[which].len();
            for i in (0..len).step_by((len / 40).max(1)) {
                let nudged = |d: f64| {
                    let mut args: Vec<Vec<f64>> = params.iter().map(|v| v.to_vec()).collect();
                    args[which][i] += d;
                    loss(&args[0], &args[1], &args[2])
                };
                let numeric = (nudged(h) - nudged(-h)) / (2.0 * h);
                assert!(
                    (numeric - analytic[i]).abs() <= 1e-6 * scale,
                    "{name}: gradient {which}/{i}: {} by backward, {numeric} by differences",
                    analytic[i]
                );
            }
        }
    }
}
