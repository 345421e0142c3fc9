//! Batch norm's gradients against central finite differences, in float64.
//!
//! For a scalar loss L = sum(y ⊙ w) with fixed random weights w, each input value, gamma and
//! beta is nudged by ±h and (L(+h) − L(−h)) / 2h compared with what backward gives.
//! With h = 1e-5 in float64 the difference quotient is good to about 1e-9; the test allows
//! 1e-6 relative to the largest gradient.
//!
//! Both training kernels are checked: the layer composed from tensor ops, and the fused Flex
//! kernel with its hand-derived backward (there the upstream gradient `w` is fed in directly
//! by `seeded_backward::backward_with`, which the W6 benchmark relies on). So is the fused kernel's
//! epilogue (BN, then sigmoid or ReLU, then a 2×2 average or max pool, in one op), against
//! finite differences of the same layers composed from Burn ops, and against the composed
//! layers in float32 on LeNet's shapes.

use bnlab::norm::epilogue::{Activation, Pool};
use bnlab::norm::functional::normalize_train;
use bnlab::norm::{compose_epilogue, BatchNormConfig, Epilogue, Kernel, Momentum};
use bnlab::ops::epilogue::try_epilogue_only;
use bnlab::ops::seeded_backward::backward_with;
use burn::module::{Param, RunningState};
use burn::tensor::{DType, Device, Tensor, TensorData};
use rand::{Rng, SeedableRng};

fn f64_tensor<const D: usize>(values: &[f64], shape: [usize; D], device: &Device) -> Tensor<D> {
    Tensor::from_data(
        TensorData::new(values.to_vec(), shape),
        (device, DType::F64),
    )
}

fn values<const D: usize>(t: Tensor<D>) -> Vec<f64> {
    t.into_data().iter::<f64>().collect()
}

fn random(n: usize, scale: f64, offset: f64, rng: &mut impl Rng) -> Vec<f64> {
    (0..n)
        .map(|_| offset + scale * rng.random_range(-1.0..1.0))
        .collect()
}

/// L(x, gamma, beta) through the functional form and the composed epilogue, on a plain
/// (non-autodiff) device.
fn loss<const D: usize>(
    x: &[f64],
    gamma: &[f64],
    beta: &[f64],
    w: &[f64],
    shape: [usize; D],
    epilogue: Epilogue,
) -> f64 {
    let d = Device::flex();
    let c = shape[1];
    let (y, _) = normalize_train(
        f64_tensor(x, shape, &d),
        Some(f64_tensor(gamma, [c], &d)),
        Some(f64_tensor(beta, [c], &d)),
        1e-5,
    )
    .unwrap();
    let y = compose_epilogue(y, epilogue);
    let w = f64_tensor(w, output_shape(shape, epilogue), &d);
    values((y * w).sum())[0]
}

fn output_shape<const D: usize>(shape: [usize; D], epilogue: Epilogue) -> [usize; D] {
    let mut out = [0; D];
    out.copy_from_slice(&epilogue.output_shape(&shape).unwrap());
    out
}

fn max_abs(v: &[f64]) -> f64 {
    v.iter().fold(0.0f64, |m, x| m.max(x.abs()))
}

fn check<const D: usize>(shape: [usize; D], seed: u64, kernel: Kernel) {
    check_with(shape, seed, kernel, Epilogue::NONE)
}

fn check_with<const D: usize>(shape: [usize; D], seed: u64, kernel: Kernel, epilogue: Epilogue) {
    let mut rng = rand_pcg::Pcg64::seed_from_u64(seed);
    let c = shape[1];
    let n: usize = shape.iter().product();
    let out_shape = output_shape(shape, epilogue);
    let x = random(n, 2.0, 0.5, &mut rng);
    let w = random(out_shape.iter().product(), 1.0, 0.0, &mut rng);
    let gamma = random(c, 0.5, 1.0, &mut rng);
    let beta = random(c, 0.5, 0.0, &mut rng);

    // Analytic gradients, through the BatchNorm module on the autodiff device.
    let device = Device::flex().autodiff();
    let mut bn = BatchNormConfig::new(c).with_kernel(kernel).init(&device);
    bn.gamma = Some(Param::from_tensor(f64_tensor(&gamma, [c], &device)));
    bn.beta = Some(Param::from_tensor(f64_tensor(&beta, [c], &device)));
    bn.running_mean = Some(RunningState::new(f64_tensor(&vec![0.0; c], [c], &device)));
    bn.running_var = Some(RunningState::new(f64_tensor(&vec![1.0; c], [c], &device)));
    bn.num_batches_tracked = Some(RunningState::new(f64_tensor(&[0.0], [1], &device)));
    let xt = f64_tensor(&x, shape, &device).require_grad();
    let y = bn.forward_then(xt.clone(), epilogue);
    let upstream = f64_tensor(&w, out_shape, &device);
    let grads = match kernel {
        Kernel::Composed => (y * upstream).sum().backward(),
        Kernel::Fused => backward_with(y, upstream).expect("Flex runs the fused kernel"),
    };
    let dx = values(xt.grad(&grads).unwrap());
    let dgamma = values(bn.gamma.as_ref().unwrap().val().grad(&grads).unwrap());
    let dbeta = values(bn.beta.as_ref().unwrap().val().grad(&grads).unwrap());

    let h = 1e-5;
    let numeric = |which: usize, i: usize| {
        let mut args = [x.clone(), gamma.clone(), beta.clone()];
        args[which][i] += h;
        let up = loss(&args[0], &args[1], &args[2], &w, shape, epilogue);
        args[which][i] -= 2.0 * h;
        let down = loss(&args[0], &args[1], &args[2], &w, shape, epilogue);
        (up - down) / (2.0 * h)
    };
    for (which, name, analytic) in [(0, "dx", &dx), (1, "dgamma", &dgamma), (2, "dbeta", &dbeta)] {
        assert_eq!(analytic.len(), [n, c, c][which]);
        let tol = 1e-6 * max_abs(analytic).max(1.0);
        for (i, a) in analytic.iter().enumerate() {
            let fd = numeric(which, i);
            assert!(
                (a - fd).abs() <= tol,
                "{shape:?} {epilogue:?} {name}[{i}]: backward {a}, finite difference {fd}"
            );
        }
    }
}

#[test]
fn gradients_match_finite_differences_2d() {
    check([6, 3], 1, Kernel::Composed);
    check([6, 3], 1, Kernel::Fused);
}

#[test]
fn gradients_match_finite_differences_4d() {
    check([3, 2, 3, 3], 2, Kernel::Composed);
    check([3, 2, 3, 3], 2, Kernel::Fused);
}

#[test]
fn gradients_match_finite_differences_5d() {
    check([2, 2, 2, 2, 3], 3, Kernel::Composed);
    check([2, 2, 2, 2, 3], 3, Kernel::Fused);
}

fn epilogue(activation: Activation, pool: Pool) -> Epilogue {
    Epilogue { activation, pool }
}

#[test]
fn epilogue_gradients_match_finite_differences() {
    use Activation::{Identity, Relu, Sigmoid};
    // 5 × 4 planes: the 2×2 pools drop the fifth row, as PyTorch's floor mode does.
    for (i, ep) in [
        epilogue(Sigmoid, Pool::Avg(2)),
        epilogue(Sigmoid, Pool::Max(2)),
        epilogue(Relu, Pool::Max(2)),
        epilogue(Identity, Pool::Avg(2)),
        epilogue(Identity, Pool::Max(2)),
        epilogue(Sigmoid, Pool::None),
        epilogue(Relu, Pool::None),
    ]
    .into_iter()
    .enumerate()
    {
        for kernel in [Kernel::Composed, Kernel::Fused] {
            check_with([3, 2, 5, 4], 10 + i as u64, kernel, ep);
        }
    }
    for ep in [epilogue(Sigmoid, Pool::None), epilogue(Relu, Pool::None)] {
        check_with([6, 3], 20, Kernel::Fused, ep);
    }
}

/// The epilogue op alone (what runs after a layer without BN, after a composed BN layer, and
/// in eval mode after a folded BN) against Burn's ops, for every activation and pool, on planes
/// the 2×2 pools do not divide (5 × 7): the output, with a NaN and values of both signs, and
/// the input gradient on an autodiff device. Float64 to 1e-12 and float32 to 1e-6 of the
/// largest value.
#[test]
fn epilogue_op_matches_burn_ops() {
    use Activation::{Identity, Relu, Sigmoid};
    let shape = [3, 4, 5, 7];
    let mut rng = rand_pcg::Pcg64::seed_from_u64(9);
    let x = random(shape.iter().product(), 6.0, 0.0, &mut rng);
    let mut with_nan = x.clone();
    with_nan[17] = f64::NAN;
    let close = |got: Vec<f64>, want: Vec<f64>, tol: f64, what: String| {
        assert_eq!(got.len(), want.len(), "{what}");
        let finite: Vec<f64> = want.iter().copied().filter(|v| v.is_finite()).collect();
        let tol = tol * max_abs(&finite).max(1e-3);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                (g.is_nan() && w.is_nan()) || (g - w).abs() <= tol,
                "{what} [{i}]: op {g}, Burn {w}"
            );
        }
    };
    let plain = Device::flex();
    let tracked = plain.clone().autodiff();
    for dtype in [DType::F64, DType::F32] {
        let tol = match dtype {
            DType::F64 => 1e-12,
            _ => 1e-6,
        };
        for ep in [
            epilogue(Sigmoid, Pool::Avg(2)),
            epilogue(Sigmoid, Pool::Max(2)),
            epilogue(Relu, Pool::Max(2)),
            epilogue(Relu, Pool::Avg(2)),
            epilogue(Identity, Pool::Max(2)),
            epilogue(Identity, Pool::Avg(3)),
            epilogue(Sigmoid, Pool::None),
            epilogue(Relu, Pool::None),
        ] {
            let input =
                Tensor::<4>::from_data(TensorData::new(with_nan.clone(), shape), (&plain, dtype));
            let op = try_epilogue_only(&input, ep).expect("the op applies");
            let what = format!("{ep:?} {dtype:?} output");
            close(values(op), values(compose_epilogue(input, ep)), tol, what);

            let out = output_shape(shape, ep);
            let upstream = random(out.iter().product(), 1.0, 0.0, &mut rng);
            let grad = |by_op: bool| {
                let x =
                    Tensor::<4>::from_data(TensorData::new(x.clone(), shape), (&tracked, dtype))
                        .require_grad();
                let y = match by_op {
                    true => try_epilogue_only(&x, ep).expect("the op applies"),
                    false => compose_epilogue(x.clone(), ep),
                };
                let g = Tensor::<4>::from_data(
                    TensorData::new(upstream.clone(), out),
                    (&tracked, dtype),
                );
                let grads = (y * g).sum().backward();
                values(x.grad(&grads).expect("a gradient"))
            };
            let what = format!("{ep:?} {dtype:?} input gradient");
            close(grad(true), grad(false), tol, what);
        }
    }
}

/// The fused epilogue against the composed layers in float32, on LeNet's first block:
/// (16, 6, 24, 24), BN then sigmoid then a 2×2 pool, and the MXNet LeNet's ReLU and max pool.
/// Tolerance 1e-5 of each tensor's largest value: float32 with different summation orders.
#[test]
fn fused_epilogue_matches_the_composed_layers_in_float32() {
    let shape = [16, 6, 24, 24];
    let mut rng = rand_pcg::Pcg64::seed_from_u64(5);
    let n: usize = shape.iter().product();
    let x32: Vec<f32> = random(n, 3.0, 0.2, &mut rng)
        .iter()
        .map(|&v| v as f32)
        .collect();
    let g32: Vec<f32> = random(n / 4, 1.0, 0.0, &mut rng)
        .iter()
        .map(|&v| v as f32)
        .collect();
    let device = Device::flex().autodiff();
    for ep in [
        epilogue(Activation::Sigmoid, Pool::Avg(2)),
        epilogue(Activation::Sigmoid, Pool::Max(2)),
        epilogue(Activation::Relu, Pool::Max(2)),
    ] {
        let run = |kernel| {
            let bn = BatchNormConfig::new(6).with_kernel(kernel).init(&device);
            let x =
                Tensor::<4>::from_data(TensorData::new(x32.clone(), shape), &device).require_grad();
            let g = Tensor::<4>::from_data(TensorData::new(g32.clone(), [16, 6, 12, 12]), &device);
            let y = bn.forward_then(x.clone(), ep);
            let grads = (y.clone() * g).sum().backward();
            let read = |t: Tensor<1>| t.into_data().iter::<f32>().map(f64::from).collect();
            let (mean, var) = bn.running_stats().unwrap();
            let out: [Vec<f64>; 6] = [
                y.into_data().iter::<f32>().map(f64::from).collect(),
                x.grad(&grads)
                    .unwrap()
                    .into_data()
                    .iter::<f32>()
                    .map(f64::from)
                    .collect(),
                read(bn.gamma.as_ref().unwrap().val().grad(&grads).unwrap()),
                read(bn.beta.as_ref().unwrap().val().grad(&grads).unwrap()),
                read(mean),
                read(var),
            ];
            out
        };
        let (fused, composed) = (run(Kernel::Fused), run(Kernel::Composed));
        for (name, (a, b)) in ["y", "dx", "dgamma", "dbeta", "running_mean", "running_var"]
            .iter()
            .zip(fused.iter().zip(&composed))
        {
            let scale = max_abs(b).max(1e-3);
            let worst = a
                .iter()
                .zip(b)
                .map(|(p, q)| (p - q).abs())
                .fold(0.0, f64::max);
            assert!(
                worst <= 1e-5 * scale,
                "{ep:?} {name}: off by {worst:e}, scale {scale:e}"
            );
        }
    }
}

#[test]
fn one_value_per_channel_is_an_error_not_nan() {
    let device = Device::flex().autodiff();
    let bn = BatchNormConfig::new(4).init(&device);
    let err = bn
        .try_forward(Tensor::<2>::ones([1, 4], &device))
        .unwrap_err();
    assert!(
        err.to_string().contains("more than one value per channel"),
        "{err}"
    );
    // (1, C, 1, 1) is one value per channel too, but (1, C, 2, 1) is not.
    assert!(bn
        .try_forward(Tensor::<4>::ones([1, 4, 1, 1], &device))
        .is_err());
    assert!(bn
        .try_forward(Tensor::<4>::ones([1, 4, 2, 1], &device))
        .is_ok());
    // Eval mode normalises a single example with the running statistics.
    let eval = burn::module::Module::valid(&bn);
    assert!(eval
        .try_forward(Tensor::<2>::ones([1, 4], &Device::flex()))
        .is_ok());
}

#[test]
fn invalid_settings_are_errors() {
    let device = Device::flex();
    assert!(BatchNormConfig::new(3)
        .with_eps(0.0)
        .try_init(&device)
        .is_err());
    assert!(BatchNormConfig::new(0).try_init(&device).is_err());
    // A momentum outside [0, 1] cannot be made, so no layer gets one.
    assert!(Momentum::new(1.5).is_err());
    assert!(Momentum::new(-0.1).is_err());
    assert!(Momentum::new(f64::NAN).is_err());
    let bn = BatchNormConfig::new(3).init(&device);
    let err = bn
        .try_forward(Tensor::<2>::ones([4, 5], &device))
        .unwrap_err();
    assert!(err.to_string().contains("C = 3"), "{err}");
}
