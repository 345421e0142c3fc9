//! The im2col convolution (`bnlab::ops::conv2d`) against Burn's own `Conv2d`, forward and
//! backward, in float64 (tolerance 1e-10 of each tensor's largest value: the same sums in a
//! different order) and float32 (1e-5), on the geometries the models use: LeNet's 5×5 without
//! padding, ResNet's 3×3 with padding 1 and stride 1 or 2 (on maps down to 1×1, where the
//! products run by regions of taps), 1×1 shortcuts of stride 2, the
//! 7×7 stem of stride 2 and padding 3, DenseNet's 3×3 and 1×1 layers of stride 1 (whose dx is a
//! convolution of dy), size-keeping windows on maps wide enough to run by taps over a padded
//! grid, and batches that do not fill a group evenly.

mod common;

use common::{random, tensor, values};

use bnlab::ops::conv2d::{applies, conv2d};
use burn::module::Param;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::PaddingConfig2d;
use burn::tensor::{DType, Device, Tensor};
use rand::SeedableRng;

fn assert_close(what: &str, got: &[f64], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(1e-3f64, |m, v| m.max(v.abs()));
    let worst = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(
        worst <= tol * scale,
        "{what}: off by {worst:e} (scale {scale:e})"
    );
}

/// `(y, dx, dw, db)` of `sum(conv(x) * g)`, by our kernel or by Burn's.
fn run(conv: &Conv2d, x: &Tensor<4>, g: &Tensor<4>, ours: bool) -> [Vec<f64>; 4] {
    let x = x.clone().require_grad();
    let y = if ours {
        conv2d(conv, x.clone())
    } else {
        conv.forward(x.clone())
    };
    let grads = (y.clone() * g.clone()).sum().backward();
    [
        values(y),
        values(x.grad(&grads).unwrap()),
        values(conv.weight.val().grad(&grads).unwrap()),
        values(conv.bias.as_ref().unwrap().val().grad(&grads).unwrap()),
    ]
}

fn check(n: usize, c_in: usize, hw: usize, c_out: usize, k: usize, stride: usize, pad: usize) {
    let mut rng = rand_pcg::Pcg64::seed_from_u64((n * 1000 + c_in * 100 + k * 10 + stride) as u64);
    let x = random(n * c_in * hw * hw, 1.0, 0.0, &mut rng);
    let w = random(c_out * c_in * k * k, 1.0, 0.0, &mut rng);
    let b = random(c_out, 1.0, 0.0, &mut rng);
    let h_out = (hw + 2 * pad - k) / stride + 1;
    let g = random(n * c_out * h_out * h_out, 1.0, 0.0, &mut rng);
    for (dtype, tol) in [(DType::F64, 1e-10), (DType::F32, 1e-5)] {
        let device = Device::flex().autodiff();
        let mut conv = Conv2dConfig::new([c_in, c_out], [k, k])
            .with_stride([stride, stride])
            .with_padding(PaddingConfig2d::Explicit(pad, pad, pad, pad))
            .init(&device);
        conv.weight = Param::from_tensor(tensor(&w, [c_out, c_in, k, k], dtype, &device));
        conv.bias = Some(Param::from_tensor(tensor(&b, [c_out], dtype, &device)));
        let xt = tensor(&x, [n, c_in, hw, hw], dtype, &device);
        let gt = tensor(&g, [n, c_out, h_out, h_out], dtype, &device);
        assert!(applies(&conv, &xt), "the im2col kernel runs here");
        let ours = run(&conv, &xt, &gt, true);
        let burn = run(&conv, &xt, &gt, false);
        for (i, name) in ["y", "dx", "dweight", "dbias"].iter().enumerate() {
            let what = format!(
                "{name} of {c_in}->{c_out} {k}x{k}/{stride} pad {pad} on {n}x{hw}x{hw} {dtype:?}"
            );
            assert_close(&what, &ours[i], &burn[i], tol);
        }
    }
}

#[test]
fn lenet_convolutions_match_burn() {
    check(5, 1, 28, 6, 5, 1, 0);
    check(9, 6, 12, 16, 5, 1, 0);
}

#[test]
fn resnet_convolutions_match_burn() {
    check(3, 1, 28, 8, 7, 2, 3); // stem
    check(7, 8, 7, 8, 3, 1, 1);
    check(7, 8, 7, 16, 3, 2, 1);
    check(7, 8, 7, 16, 1, 2, 0); // shortcut
    check(130, 4, 1, 6, 3, 1, 1); // 1×1 maps: the centre tap alone, one group of images
    check(6, 8, 2, 16, 3, 1, 1); // 2×2 maps: four corner regions of 2×2 taps
    check(6, 8, 2, 16, 3, 2, 1); // 2×2 → 1×1 with stride 2: dx scattered by region
}

#[test]
fn densenet_convolutions_match_burn() {
    // Dense layers (more input than output channels) and transitions, on maps of at least
    // 256 positions (one image per group, where a 1×1 kernel needs no im2col) and below.
    check(5, 24, 6, 8, 3, 1, 1);
    check(3, 24, 16, 12, 1, 1, 0);
    check(9, 24, 6, 12, 1, 1, 0);
    // Padding wider than the window allows no convolution for dx; windows wholly in the
    // padding (regions without taps) give the bias alone.
    check(2, 3, 8, 4, 3, 1, 3);
    // 20 channels of 32×32 maps under a 5×5 window: the columns in chunks of whole channels
    // (6, 6, 6 and 2 in float32), the weight gradient's rows written chunk by chunk.
    check(2, 20, 32, 8, 5, 1, 0);
    // Size-keeping windows on maps of 16 columns and more, with 16 input channels and more,
    // run by taps over a padded grid: 16×16 (dx by im2col: 8 channels of dy), DenseNet's
    // first block (24×24; dx on a grid too), and a 5×5 window with padding 2.
    check(3, 40, 16, 8, 3, 1, 1);
    check(2, 32, 24, 32, 3, 1, 1);
    check(2, 16, 28, 16, 5, 1, 2);
}

#[test]
fn eval_mode_convolution_matches_burn() {
    let device = Device::flex();
    let conv = Conv2dConfig::new([3, 4], [3, 3])
        .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
        .init(&device);
    let x = Tensor::<4>::random([2, 3, 9, 9], burn::tensor::Distribution::Default, &device);
    assert!(applies(&conv, &x));
    assert_close(
        "eval y",
        &values(conv2d(&conv, x.clone())),
        &values(conv.forward(x)),
        1e-5,
    );
}
