//! The same computation on Flex and on Burn's other backends (`--features wgpu`, `libtorch`),
//! from the same initial weights and the same batch of real Fashion-MNIST images.
//!
//! - One LeNet-BN training step (batch 64, SGD lr 1): logits, loss, and every tensor of the
//!   state_dict after the step. With lr 1 and no momentum, a weight after the step is the weight
//!   before minus its gradient, so this compares every gradient too, and the running statistics.
//!   On wgpu the step runs twice: with `--norm fused` (the CubeCL kernels of
//!   `src/ops/batch_norm/cube.rs`) and with `--norm scratch` (the composed layer). LibTorch has no
//!   fused kernel and runs the composed layer for both, as users get it. Flex's side is its
//!   fused kernel (tested against PyTorch and finite differences elsewhere).
//! - The case that stock Debian 12 Mesa (22.3.6) gets wrong on lavapipe: the composed BN on a
//!   conv output (NHWC-strided on wgpu), then a sigmoid. Its gamma gradient was 44–95% off there;
//!   with Mesa 25 (bookworm-backports) it matches Flex.
//!
//! Tolerance: float32 on both sides, with different summation orders (GPU reductions are
//! trees, Flex's are blocked loops), so `1e-4` relative to the tensor's largest value; the loss
//! to `1e-5` relative. The BN reference cases run on these backends in
//! `tests/batchnorm_reference.rs`.
//!
//! Without those features this file holds no tests: the README's test command builds with
//! `--features wgpu`, so the wgpu half always runs in CI (`.ci/run` installs lavapipe).
#![cfg(any(feature = "wgpu", feature = "libtorch"))]

use std::collections::BTreeMap;

use bnlab::data::input_batch;
use bnlab::data::FashionMnist;
use bnlab::interop::torch::export;
use bnlab::models::{ModelKind, ModelSpec};
use bnlab::norm::{BatchNormConfig, NormKind};
use bnlab::ops::{self, Family};
use burn::module::{Module, Param};
use burn::nn::conv::Conv2dConfig;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::{GradientsParams, SgdConfig};
use burn::tensor::activation::sigmoid;
use burn::tensor::{Device, Tensor, TensorData};
use rand::{Rng, SeedableRng};
use safetensors::SafeTensors;

const TOLERANCE: f64 = 1e-4;

fn data() -> FashionMnist {
    FashionMnist::load_default().expect("apt-get install dataset-fashion-mnist")
}

fn values<const D: usize>(t: Tensor<D>) -> Vec<f64> {
    t.into_data()
        .convert::<f32>()
        .iter::<f32>()
        .map(f64::from)
        .collect()
}

/// Asserts `|got - want| <= tol * max(1, max|want|)` elementwise.
fn assert_close(what: &str, got: &[f64], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(1.0f64, |m, v| m.max(v.abs()));
    let (i, worst) = got
        .iter()
        .zip(want)
        .map(|(g, w)| (g - w).abs())
        .enumerate()
        .fold(
            (0, 0.0),
            |(bi, b), (i, d)| if d > b { (i, d) } else { (bi, b) },
        );
    assert!(
        worst <= tol * scale,
        "{what}: [{i}] is {} on this backend, {} on Flex (off by {worst:.3e}, allowed {:.3e})",
        got[i],
        want[i],
        tol * scale
    );
}

/// What one training step of LeNet-BN gives on `device` (the plain device; autodiff is added).
struct Step {
    logits: Vec<f64>,
    loss: f64,
    state_after: BTreeMap<String, Vec<f64>>,
}

fn lenet_step(data: &FashionMnist, device: &Device, norm: NormKind) -> Step {
    let spec = ModelSpec::of(ModelKind::LenetBn, norm);
    let train_device = device.clone().autodiff();
    // The initialiser draws on the host, so every backend starts from the same weights.
    let model = spec.init(0, &train_device);
    let indices: Vec<usize> = (0..64).collect();
    let (images, labels) = input_batch(&data.train, &indices, 28, &train_device);
    let logits = model.forward(images);
    let loss = CrossEntropyLossConfig::new()
        .init(&train_device)
        .forward(logits.clone(), labels);
    let loss_value = values(loss.clone())[0];
    let grads = GradientsParams::from_grads(loss.backward(), &model);
    let mut sgd = SgdConfig::new().init();
    let model = sgd.step(1.0, model, grads);

    let bytes = export(&model.valid(), &spec).expect("export");
    let file = SafeTensors::deserialize(&bytes).expect("a safetensors file");
    let state_after = file
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            let values = match view.dtype() {
                safetensors::Dtype::F32 => view
                    .data()
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes(b.try_into().unwrap()) as f64)
                    .collect(),
                safetensors::Dtype::I64 => view
                    .data()
                    .chunks_exact(8)
                    .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as f64)
                    .collect(),
                other => panic!("{name}: dtype {other:?}"),
            };
            (name, values)
        })
        .collect();
    Step {
        logits: values(logits),
        loss: loss_value,
        state_after,
    }
}

fn check_lenet_step(device: &Device, norm: NormKind) {
    let data = data();
    let want = lenet_step(&data, &Device::flex(), NormKind::Fused);
    let got = lenet_step(&data, device, norm);
    assert_close("logits", &got.logits, &want.logits, TOLERANCE);
    assert_close("loss", &[got.loss], &[want.loss], 1e-5);
    assert_eq!(
        got.state_after.keys().collect::<Vec<_>>(),
        want.state_after.keys().collect::<Vec<_>>()
    );
    for (name, want_values) in &want.state_after {
        assert_close(name, &got.state_after[name], want_values, TOLERANCE);
    }
}

/// conv → composed BN → sigmoid → weighted sum; returns the gradients of gamma, beta and the
/// conv weight, and the output.
fn sigmoid_after_bn(data: &FashionMnist, device: &Device) -> [Vec<f64>; 4] {
    let device = device.clone().autodiff();
    let mut rng = rand_pcg::Pcg64::seed_from_u64(7);
    let mut random = |n: usize, scale: f32| -> Vec<f32> {
        (0..n).map(|_| rng.random_range(-scale..scale)).collect()
    };
    let mut conv = Conv2dConfig::new([1, 6], [5, 5]).init(&device);
    conv.weight = Param::from_tensor(Tensor::from_data(
        TensorData::new(random(6 * 25, 0.4), [6, 1, 5, 5]),
        &device,
    ));
    conv.bias = Some(Param::from_tensor(Tensor::from_data(
        TensorData::new(random(6, 0.4), [6]),
        &device,
    )));
    let mut bn = BatchNormConfig::new(6).init(&device);
    bn.gamma = Some(Param::from_tensor(Tensor::from_data(
        TensorData::new(random(6, 1.0).iter().map(|g| 1.0 + g).collect(), [6]),
        &device,
    )));
    let weights: Tensor<4> = Tensor::from_data(
        TensorData::new(random(32 * 6 * 24 * 24, 1.0), [32, 6, 24, 24]),
        &device,
    );
    let indices: Vec<usize> = (0..32).collect();
    let (images, _) = input_batch(&data.train, &indices, 28, &device);
    let y = sigmoid(bn.forward(conv.forward(images)));
    let grads = (y.clone() * weights).sum().backward();
    let grad = |p: &Param<Tensor<1>>| values(p.val().grad(&grads).expect("a gradient"));
    [
        grad(bn.gamma.as_ref().unwrap()),
        grad(bn.beta.as_ref().unwrap()),
        values(conv.weight.val().grad(&grads).expect("a gradient")),
        values(y),
    ]
}

fn check_sigmoid_after_bn(device: &Device) {
    let data = data();
    let want = sigmoid_after_bn(&data, &Device::flex());
    let got = sigmoid_after_bn(&data, device);
    for (i, what) in ["dgamma", "dbeta", "dconv_weight", "output"]
        .iter()
        .enumerate()
    {
        assert_close(what, &got[i], &want[i], TOLERANCE);
    }
}

#[cfg(feature = "wgpu")]
mod wgpu {
    use super::*;

    fn device() -> Device {
        Device::wgpu(burn::tensor::DeviceKind::DefaultDevice)
    }

    #[test]
    fn lenet_bn_step_with_the_cubecl_kernel_matches_flex_on_wgpu() {
        // Not a silent fallback: wgpu has a fused kernel of its own.
        let device = device();
        assert_eq!(ops::family(&device.clone().autodiff()), Some(Family::Cube));
        check_lenet_step(&device, NormKind::Fused);
    }

    #[test]
    fn lenet_bn_step_with_the_composed_layer_matches_flex_on_wgpu() {
        check_lenet_step(&device(), NormKind::Scratch);
    }

    #[test]
    fn sigmoid_after_bn_gradients_match_flex_on_wgpu() {
        check_sigmoid_after_bn(&device());
    }
}

#[cfg(feature = "libtorch")]
mod libtorch {
    use super::*;

    #[test]
    fn lenet_bn_step_matches_flex_on_libtorch() {
        check_lenet_step(&Device::libtorch(), NormKind::Fused);
    }

    #[test]
    fn sigmoid_after_bn_gradients_match_flex_on_libtorch() {
        check_sigmoid_after_bn(&Device::libtorch());
    }
}
