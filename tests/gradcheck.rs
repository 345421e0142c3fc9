//! Batch norm's gradients against central finite differences, in float64.
//!
//! For a scalar loss L = sum(y ⊙ w) with fixed random weights w, each input value, gamma and
//! beta is nudged by ±h and (L(+h) − L(−h)) / 2h compared with what backward gives.
//! With h = 1e-5 in float64 the difference quotient is good to about 1e-9; the test allows
//! 1e-6 relative to the largest gradient.
//!
//! Both training kernels are checked: the layer composed from tensor ops, and the fused Flex
//! kernel with its hand-derived backward (there the upstream gradient `w` is fed in directly
//! by `fused::backward_with`, which the W6 benchmark relies on).

use bnlab::norm::functional::normalize_train;
use bnlab::norm::{fused, BatchNormConfig, Kernel, RunningUpdate};
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

/// L(x, gamma, beta) through the functional form, on a plain (non-autodiff) device.
fn loss<const D: usize>(
    x: &[f64],
    gamma: &[f64],
    beta: &[f64],
    w: &[f64],
    shape: [usize; D],
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
    values((y * f64_tensor(w, shape, &d)).sum())[0]
}

fn max_abs(v: &[f64]) -> f64 {
    v.iter().fold(0.0f64, |m, x| m.max(x.abs()))
}

fn check<const D: usize>(shape: [usize; D], seed: u64, kernel: Kernel) {
    let mut rng = rand_pcg::Pcg64::seed_from_u64(seed);
    let c = shape[1];
    let n: usize = shape.iter().product();
    let x = random(n, 2.0, 0.5, &mut rng);
    let w = random(n, 1.0, 0.0, &mut rng);
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
    let y = bn.forward(xt.clone());
    let upstream = f64_tensor(&w, shape, &device);
    let grads = match kernel {
        Kernel::Composed => (y * upstream).sum().backward(),
        Kernel::Fused => fused::backward_with(y, upstream).expect("Flex runs the fused kernel"),
    };
    let dx = values(xt.grad(&grads).unwrap());
    let dgamma = values(bn.gamma.as_ref().unwrap().val().grad(&grads).unwrap());
    let dbeta = values(bn.beta.as_ref().unwrap().val().grad(&grads).unwrap());

    let h = 1e-5;
    let numeric = |which: usize, i: usize| {
        let mut args = [x.clone(), gamma.clone(), beta.clone()];
        args[which][i] += h;
        let up = loss(&args[0], &args[1], &args[2], &w, shape);
        args[which][i] -= 2.0 * h;
        let down = loss(&args[0], &args[1], &args[2], &w, shape);
        (up - down) / (2.0 * h)
    };
    for (which, name, analytic) in [(0, "dx", &dx), (1, "dgamma", &dgamma), (2, "dbeta", &dbeta)] {
        assert_eq!(analytic.len(), [n, c, c][which]);
        let tol = 1e-6 * max_abs(analytic).max(1.0);
        for (i, a) in analytic.iter().enumerate() {
            let fd = numeric(which, i);
            assert!(
                (a - fd).abs() <= tol,
                "{shape:?} {name}[{i}]: backward {a}, finite difference {fd}"
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
    assert!(BatchNormConfig::new(3)
        .with_momentum(Some(1.5))
        .try_init(&device)
        .is_err());
    assert!(BatchNormConfig::new(0).try_init(&device).is_err());
    assert!(RunningUpdate::pytorch(Some(-0.1)).validate().is_err());
    let bn = BatchNormConfig::new(3).init(&device);
    let err = bn
        .try_forward(Tensor::<2>::ones([4, 5], &device))
        .unwrap_err();
    assert!(err.to_string().contains("C = 3"), "{err}");
}
