//! DenseNet's dense block as one op (`bnlab::ops::dense_block`, what `BatchNorm::dense_block`
//! runs in training mode with the fused kernel on Flex):
//!
//! - against the same layers run one by one (BN → ReLU → Conv as one op, then Burn's
//!   concatenation): the output, the gradients of the block input and of every layer's γ, β,
//!   weight and bias, and every layer's running statistics after the step, equal bit for bit in
//!   float32 and float64;
//! - against central finite differences in float64 of `sum(block(x) ⊙ g)`: every gradient
//!   within 1e-6 of the largest (h = 1e-6);
//! - and it declines what it does not take (the caller then runs the layers one by one).

mod common;

use common::{random, tensor, values};

use bnlab::norm::{BatchNorm, BatchNormConfig, Kernel};
use burn::module::{Param, RunningState};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::PaddingConfig2d;
use burn::tensor::{DType, Device, Tensor};
use rand::SeedableRng;

/// Per layer: γ, β, weight, bias.
type Params = Vec<[Vec<f64>; 4]>;

/// A block of `layers` layers of growth `growth` on `(n, c0, hw, hw)`, with its values.
struct Case {
    shape: [usize; 4],
    growth: usize,
    x: Vec<f64>,
    params: Params,
    g: Vec<f64>,
}

impl Case {
    fn new(n: usize, c0: usize, hw: usize, growth: usize, layers: usize, seed: u64) -> Self {
        let mut rng = rand_pcg::Pcg64::seed_from_u64(seed);
        let params = (0..layers)
            .map(|l| {
                let c = c0 + l * growth;
                [
                    random(c, 0.5, 1.0, &mut rng),
                    random(c, 0.5, 0.0, &mut rng),
                    random(growth * c * 9, 0.5, 0.0, &mut rng),
                    random(growth, 0.5, 0.0, &mut rng),
                ]
            })
            .collect();
        let c_out = c0 + layers * growth;
        Self {
            shape: [n, c0, hw, hw],
            growth,
            x: random(n * c0 * hw * hw, 2.0, 0.5, &mut rng),
            params,
            g: random(n * c_out * hw * hw, 1.0, 0.0, &mut rng),
        }
    }

    fn out_shape(&self) -> [usize; 4] {
        let [n, c0, hw, _] = self.shape;
        [n, c0 + self.params.len() * self.growth, hw, hw]
    }

    fn layers(&self, params: &Params, dtype: DType, device: &Device) -> Vec<(BatchNorm, Conv2d)> {
        params
            .iter()
            .enumerate()
            .map(|(l, [gamma, beta, weight, bias])| {
                let c = self.shape[1] + l * self.growth;
                let mut bn: BatchNorm = BatchNormConfig::new(c)
                    .with_kernel(Kernel::Fused)
                    .init(device);
                bn.gamma = Some(Param::from_tensor(tensor(gamma, [c], dtype, device)));
                bn.beta = Some(Param::from_tensor(tensor(beta, [c], dtype, device)));
                let filled =
                    |v: f64, k: usize| RunningState::new(tensor(&vec![v; k], [k], dtype, device));
                bn.running_mean = Some(filled(0.0, c));
                bn.running_var = Some(filled(1.0, c));
                bn.num_batches_tracked = Some(filled(0.0, 1));
                let mut conv = Conv2dConfig::new([c, self.growth], [3, 3])
                    .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                    .init(device);
                conv.weight =
                    Param::from_tensor(tensor(weight, [self.growth, c, 3, 3], dtype, device));
                conv.bias = Some(Param::from_tensor(tensor(
                    bias,
                    [self.growth],
                    dtype,
                    device,
                )));
                (bn, conv)
            })
            .collect()
    }

    /// Output, dx, then per layer dγ, dβ, dW, db, running mean, running var.
    fn run(&self, dtype: DType, fused: bool) -> Vec<Vec<f64>> {
        let device = Device::flex().autodiff();
        let layers = self.layers(&self.params, dtype, &device);
        let x = tensor(&self.x, self.shape, dtype, &device).require_grad();
        let refs: Vec<(&BatchNorm, &Conv2d)> = layers.iter().map(|(b, c)| (b, c)).collect();
        let y = if fused {
            BatchNorm::dense_block(x.clone(), &refs).expect("the op applies")
        } else {
            layers.iter().fold(x.clone(), |x, (bn, conv)| {
                let y = bn.forward_relu_conv(x.clone(), conv);
                Tensor::cat(vec![x, y], 1)
            })
        };
        let grads = (y.clone() * tensor(&self.g, self.out_shape(), dtype, &device))
            .sum()
            .backward();
        let mut out = vec![values(y), values(x.grad(&grads).unwrap())];
        for (bn, conv) in &layers {
            let grad = |t: Tensor<1>| values(t.grad(&grads).unwrap());
            out.push(grad(bn.gamma.as_ref().unwrap().val()));
            out.push(grad(bn.beta.as_ref().unwrap().val()));
            out.push(values(conv.weight.val().grad(&grads).unwrap()));
            out.push(grad(conv.bias.as_ref().unwrap().val()));
            let (mean, var) = bn.running_stats().unwrap();
            out.push(values(mean));
            out.push(values(var));
        }
        out
    }

    /// `sum(block(x) ⊙ g)` by the op on a plain device, in float64.
    fn loss(&self, x: &[f64], params: &Params) -> f64 {
        let device = Device::flex().autodiff();
        let layers = self.layers(params, DType::F64, &device);
        let refs: Vec<(&BatchNorm, &Conv2d)> = layers.iter().map(|(b, c)| (b, c)).collect();
        let x = tensor(x, self.shape, DType::F64, &device);
        let y = BatchNorm::dense_block(x, &refs).expect("the op applies");
        values((y * tensor(&self.g, self.out_shape(), DType::F64, &device)).sum())[0]
    }
}

fn cases() -> Vec<(&'static str, Case)> {
    vec![
        ("3 layers on 6x6", Case::new(3, 5, 6, 3, 3, 1)),
        // 1x1 planes: the layers' inputs are gathered, not read in place.
        ("3 layers on 1x1", Case::new(4, 3, 1, 2, 3, 7)),
        (
            "2 layers on 16x16 (one image per group)",
            Case::new(2, 4, 16, 2, 2, 2),
        ),
        // 24×24 maps of 16 channels and more: each layer's convolution by taps over a padded
        // grid, filled from the block's buffer, images wider apart than the layer's input.
        ("2 layers on 24x24 grids", Case::new(2, 16, 24, 4, 2, 8)),
        // 32 channels of 32k values: the layer-by-layer path's BN goes channel by channel.
        (
            "channel-major BN: 32 channels of 2x128x128",
            Case::new(2, 32, 128, 2, 1, 5),
        ),
    ]
}

#[test]
fn dense_block_equals_the_layers_one_by_one_bit_for_bit() {
    for (name, case) in cases() {
        for dtype in [DType::F32, DType::F64] {
            let fused = case.run(dtype, true);
            let layers = case.run(dtype, false);
            assert_eq!(fused.len(), layers.len());
            for (i, (a, b)) in fused.iter().zip(&layers).enumerate() {
                assert_eq!(a, b, "{name} {dtype:?}: output {i}");
            }
        }
    }
}

#[test]
fn dense_block_gradients_match_finite_differences() {
    let h = 1e-6;
    let (name, case) = cases().remove(0);
    let got = case.run(DType::F64, true);
    let scale_of = |v: &[f64]| v.iter().fold(1e-3f64, |m, a| m.max(a.abs()));
    let check = |analytic: &[f64], numeric: f64, what: String| {
        let scale = scale_of(analytic);
        let i: usize = what.rsplit(' ').next().unwrap().parse().unwrap();
        assert!(
            (numeric - analytic[i]).abs() <= 1e-6 * scale,
            "{name}: {what}: {} by backward, {numeric} by differences",
            analytic[i]
        );
    };
    for i in (0..case.x.len()).step_by(7) {
        let nudged = |d: f64| {
            let mut x = case.x.clone();
            x[i] += d;
            case.loss(&x, &case.params)
        };
        check(
            &got[1],
            (nudged(h) - nudged(-h)) / (2.0 * h),
            format!("dx {i}"),
        );
    }
    for l in 0..case.params.len() {
        for p in 0..4 {
            let len = case.params[l][p].len();
            for i in (0..len).step_by((len / 8).max(1)) {
                let nudged = |d: f64| {
                    let mut params = case.params.clone();
                    params[l][p][i] += d;
                    case.loss(&case.x, &params)
                };
                let numeric = (nudged(h) - nudged(-h)) / (2.0 * h);
                check(
                    &got[2 + 6 * l + p],
                    numeric,
                    format!("layer {l} param {p} {i}"),
                );
            }
        }
    }
}

#[test]
fn dense_block_declines_what_it_does_not_take() {
    let case = Case::new(2, 4, 5, 2, 2, 3);
    let device = Device::flex().autodiff();
    let x = tensor(&case.x, case.shape, DType::F32, &device);
    let mut layers = case.layers(&case.params, DType::F32, &device);
    let run = |layers: &[(BatchNorm, Conv2d)], x: Tensor<4>| {
        let r: Vec<(&BatchNorm, &Conv2d)> = layers.iter().map(|(b, c)| (b, c)).collect();
        BatchNorm::dense_block(x, &r).is_some()
    };
    assert!(run(&layers, x.clone()), "the block as built");
    // Not training (a plain device), and a layer on the composed kernel.
    let plain = tensor(&case.x, case.shape, DType::F32, &Device::flex());
    assert!(!run(&layers, plain));
    layers[1].0.kernel = Kernel::Composed;
    assert!(!run(&layers, x.clone()));
    // Layers that do not chain: the second sees 4 channels, not 6.
    let other = Case::new(2, 4, 5, 2, 1, 4);
    let mut broken = case.layers(&case.params, DType::F32, &device);
    broken[1] = other.layers(&other.params, DType::F32, &device).remove(0);
    assert!(!run(&broken, x));
}
