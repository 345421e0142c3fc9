//! bnlab's batch norm against PyTorch, case by case.
//!
//! The expected values are PyTorch's, in float64: `tests/fixtures/batchnorm_reference.json`,
//! written by `tools/make_bn_reference.py` (torch 2.15). The core of that script, for each case:
//!
//! ```python
//! bn = torch.nn.BatchNorm2d(c, momentum=momentum, eps=eps, affine=affine)   # 1d / 3d by rank
//! bn.weight, bn.bias, bn.running_mean, bn.running_var = (random values)      # saved as *_before
//! bn.train()
//! for _ in range(steps - 1):
//!     with torch.no_grad(): bn(x)                                             # only moves stats
//! y = bn(x); (y * g).sum().backward()                                         # y, dx, dgamma, dbeta
//! bn.eval(); y_eval = bn(x)                                                   # running_*_after too
//! ```
//!
//! Each case runs three times: through the [`BatchNorm`] module with each training kernel
//! (composed from tensor ops, and the fused Flex kernel of `--norm fused`) and through the
//! functional [`batch_norm`]; and in two precisions:
//!
//! - float64 (Flex computes in f64 too): the algorithm itself, to 1e-9 relative to the tensor's
//!   largest value;
//! - float32, what training uses: to `1e-4 + κ` relative to the tensor's largest value, where
//!   `κ = max|x| · 2⁻²⁴ / min σ` is how far rounding the *input* to float32 alone moves a
//!   normalised value. κ is below 1e-6 for every case but `conv2d_large_mean` (x = 1000 ± 0.01),
//!   where it is 6e-3: there no float32 algorithm can do better, and a naive float32
//!   `E[x²] - E[x]²` still misses by orders of magnitude more.

use std::collections::HashMap;

use bnlab::norm::{
    batch_norm, BatchNorm, BatchNormConfig, Convention, Kernel, Mode, Momentum, RunningStats,
    RunningUpdate,
};
use burn::module::{Module, Param, RunningState};
use burn::tensor::{DType, Device, Tensor, TensorData};
use serde::Deserialize;

#[derive(Deserialize, Debug)]
struct Fixture {
    cases: Vec<Case>,
}

#[derive(Deserialize, Debug, Clone)]
struct Case {
    name: String,
    shape: Vec<usize>,
    x: Vec<f64>,
    eps: f64,
    y: Vec<f64>,
    #[serde(default = "default_momentum")]
    momentum: Option<f64>,
    #[serde(default = "default_true")]
    affine: bool,
    #[serde(default = "one")]
    steps: usize,
    convention: Option<String>,
    gamma: Option<Vec<f64>>,
    beta: Option<Vec<f64>>,
    g: Option<Vec<f64>>,
    dx: Option<Vec<f64>>,
    dgamma: Option<Vec<f64>>,
    dbeta: Option<Vec<f64>>,
    running_mean_before: Option<Vec<f64>>,
    running_var_before: Option<Vec<f64>>,
    running_mean_after: Option<Vec<f64>>,
    running_var_after: Option<Vec<f64>>,
    num_batches_tracked: Option<u64>,
    y_eval: Option<Vec<f64>>,
}

fn default_momentum() -> Option<f64> {
    Some(0.1)
}
fn default_true() -> bool {
    true
}
fn one() -> usize {
    1
}

fn cases() -> Vec<Case> {
    let text = include_str!("fixtures/batchnorm_reference.json");
    let fixture: Fixture = serde_json::from_str(text).expect("fixture parses");
    assert_eq!(fixture.cases.len(), 12, "the fixture holds 12 cases");
    fixture.cases
}

impl Case {
    fn channels(&self) -> usize {
        self.shape[1]
    }

    /// The chapter's demos and the d2l scratch cases follow d2l's convention.
    fn is_d2l(&self) -> bool {
        self.convention.is_some() || self.name.starts_with("d2l_demo")
    }

    fn update(&self) -> RunningUpdate {
        match self.is_d2l() {
            true => RunningUpdate::d2l(),
            false => RunningUpdate::pytorch(match self.momentum {
                Some(m) => Momentum::new(m).expect("the fixture's momentum is valid"),
                None => Momentum::CUMULATIVE,
            }),
        }
    }

    /// How far rounding the input to float32 moves a normalised value (see the module docs).
    fn input_rounding(&self) -> f64 {
        let c = self.channels();
        let per = self.x.len() / c / self.shape[0];
        let mut min_std = f64::INFINITY;
        for ch in 0..c {
            let vals: Vec<f64> = (0..self.shape[0])
                .flat_map(|n| (0..per).map(move |m| (n * c + ch) * per + m))
                .map(|i| self.x[i])
                .collect();
            let mean = vals.iter().sum::<f64>() / vals.len() as f64;
            let var = vals.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / vals.len() as f64;
            min_std = min_std.min((var + self.eps).sqrt());
        }
        let max_abs = self.x.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        max_abs * 2f64.powi(-24) / min_std
    }

    fn tolerance(&self, dtype: DType) -> f64 {
        match dtype {
            DType::F64 => 1e-9,
            _ => 1e-4 + self.input_rounding(),
        }
    }
}

fn tensor<const D: usize>(
    values: &[f64],
    shape: &[usize],
    dtype: DType,
    device: &Device,
) -> Tensor<D> {
    Tensor::from_data(
        TensorData::new(values.to_vec(), shape.to_vec()),
        (device, dtype),
    )
}

fn vector(values: &[f64], dtype: DType, device: &Device) -> Tensor<1> {
    tensor(values, &[values.len()], dtype, device)
}

fn values<const D: usize>(t: Tensor<D>) -> Vec<f64> {
    t.into_data().iter::<f64>().collect()
}

/// Asserts `|got - want| <= tol * max(1, max|want|)` elementwise.
fn assert_close(case: &Case, what: &str, got: &[f64], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{}: {what} length", case.name);
    let scale = want.iter().fold(1.0f64, |m, v| m.max(v.abs()));
    let (worst, at) = got
        .iter()
        .zip(want)
        .map(|(g, w)| (g - w).abs())
        .enumerate()
        .fold(
            (0.0, 0),
            |(m, i), (j, e)| if e > m { (e, j) } else { (m, i) },
        );
    assert!(
        worst <= tol * scale,
        "{}: {what}[{at}] = {} but PyTorch gives {} (error {worst:.3e} > {:.3e})",
        case.name,
        got[at],
        want[at],
        tol * scale
    );
}

/// Everything a case produces, from either form of batch norm.
#[derive(Default)]
struct Outputs {
    y: Vec<f64>,
    dx: Option<Vec<f64>>,
    dgamma: Option<Vec<f64>>,
    dbeta: Option<Vec<f64>>,
    running_mean: Option<Vec<f64>>,
    running_var: Option<Vec<f64>>,
    num_batches_tracked: Option<u64>,
    y_eval: Option<Vec<f64>>,
}

fn check(case: &Case, got: &Outputs, dtype: DType) {
    let tol = case.tolerance(dtype);
    let label = |what: &str| format!("{what} ({dtype:?})");
    assert_close(case, &label("y"), &got.y, &case.y, tol);
    let pairs = [
        ("dx", &got.dx, &case.dx),
        ("dgamma", &got.dgamma, &case.dgamma),
        ("dbeta", &got.dbeta, &case.dbeta),
        ("running_mean", &got.running_mean, &case.running_mean_after),
        ("running_var", &got.running_var, &case.running_var_after),
        ("y_eval", &got.y_eval, &case.y_eval),
    ];
    for (what, got, want) in pairs {
        if let Some(want) = want {
            let got = got
                .as_ref()
                .unwrap_or_else(|| panic!("{}: {what} missing", case.name));
            assert_close(case, &label(what), got, want, tol);
        }
    }
    if let Some(want) = case.num_batches_tracked {
        assert_eq!(
            got.num_batches_tracked,
            Some(want),
            "{}: num_batches_tracked",
            case.name
        );
    }
}

fn run_module<const D: usize>(
    case: &Case,
    dtype: DType,
    kernel: Kernel,
    backend: &Device,
) -> Outputs {
    let device = backend.clone().autodiff();
    let c = case.channels();
    let config = BatchNormConfig::new(c)
        .with_eps(case.eps)
        .with_affine(case.affine || case.is_d2l())
        .with_momentum(case.update().momentum)
        .with_convention(case.update().convention)
        .with_kernel(kernel);
    let mut bn: BatchNorm = config.init(&device);
    if let (Some(gamma), Some(beta)) = (&case.gamma, &case.beta) {
        bn.gamma = Some(Param::from_tensor(vector(gamma, dtype, &device)));
        bn.beta = Some(Param::from_tensor(vector(beta, dtype, &device)));
    } else if bn.gamma.is_some() {
        bn.gamma = Some(Param::from_tensor(vector(&vec![1.0; c], dtype, &device)));
        bn.beta = Some(Param::from_tensor(vector(&vec![0.0; c], dtype, &device)));
    }
    let mean0 = case.running_mean_before.clone().unwrap_or(vec![0.0; c]);
    let var0 = case.running_var_before.clone().unwrap_or(vec![1.0; c]);
    bn.running_mean = Some(RunningState::new(vector(&mean0, dtype, &device)));
    bn.running_var = Some(RunningState::new(vector(&var0, dtype, &device)));
    bn.num_batches_tracked = Some(RunningState::new(vector(&[0.0], dtype, &device)));

    let x: Tensor<D> = tensor(&case.x, &case.shape, dtype, &device);
    for _ in 1..case.steps {
        let _ = bn.forward(x.clone());
    }
    let x = x.require_grad();
    let y = bn.forward(x.clone());
    let mut out = Outputs {
        y: values(y.clone()),
        ..Default::default()
    };
    if let Some(g) = &case.g {
        let grads = (y * tensor::<D>(g, &case.shape, dtype, &device))
            .sum()
            .backward();
        out.dx = x.grad(&grads).map(values);
        out.dgamma = bn
            .gamma
            .as_ref()
            .and_then(|p| p.val().grad(&grads))
            .map(values);
        out.dbeta = bn
            .beta
            .as_ref()
            .and_then(|p| p.val().grad(&grads))
            .map(values);
    }
    let eval = bn.valid();
    let (mean, var) = eval.running_stats().expect("tracked");
    out.running_mean = Some(values(mean));
    out.running_var = Some(values(var));
    let tracked = eval.num_batches_tracked.as_ref().expect("tracked").value();
    out.num_batches_tracked = Some(values(tracked)[0] as u64);
    let x_eval: Tensor<D> = tensor(&case.x, &case.shape, dtype, backend);
    out.y_eval = Some(values(eval.forward(x_eval)));
    out
}

fn run_functional<const D: usize>(case: &Case, dtype: DType, backend: &Device) -> Outputs {
    let device = backend.clone().autodiff();
    let c = case.channels();
    let gamma = case
        .gamma
        .as_ref()
        .map(|v| vector(v, dtype, &device).require_grad());
    let beta = case
        .beta
        .as_ref()
        .map(|v| vector(v, dtype, &device).require_grad());
    let mut running = Some(RunningStats {
        mean: vector(
            &case.running_mean_before.clone().unwrap_or(vec![0.0; c]),
            dtype,
            &device,
        ),
        var: vector(
            &case.running_var_before.clone().unwrap_or(vec![1.0; c]),
            dtype,
            &device,
        ),
        num_batches_tracked: 0,
    });
    let x: Tensor<D> = tensor(&case.x, &case.shape, dtype, &device);
    let update = case.update();
    for _ in 1..case.steps {
        running = batch_norm(
            x.clone(),
            gamma.clone(),
            beta.clone(),
            running,
            Mode::Train,
            case.eps,
            update,
        )
        .unwrap()
        .1;
    }
    let x = x.require_grad();
    let (y, running) = batch_norm(
        x.clone(),
        gamma.clone(),
        beta.clone(),
        running,
        Mode::Train,
        case.eps,
        update,
    )
    .unwrap();
    let mut out = Outputs {
        y: values(y.clone()),
        ..Default::default()
    };
    if let Some(g) = &case.g {
        let grads = (y * tensor::<D>(g, &case.shape, dtype, &device))
            .sum()
            .backward();
        out.dx = x.grad(&grads).map(values);
        out.dgamma = gamma.as_ref().and_then(|t| t.grad(&grads)).map(values);
        out.dbeta = beta.as_ref().and_then(|t| t.grad(&grads)).map(values);
    }
    let running = running.expect("running stats are returned");
    out.running_mean = Some(values(running.mean.clone()));
    out.running_var = Some(values(running.var.clone()));
    out.num_batches_tracked = Some(running.num_batches_tracked);
    let (y_eval, _) = batch_norm(
        x.detach(),
        gamma,
        beta,
        Some(running),
        Mode::Eval,
        case.eps,
        update,
    )
    .unwrap();
    out.y_eval = Some(values(y_eval));
    out
}

/// Which form of the layer runs a case.
#[derive(Clone, Copy)]
enum Form {
    /// The [`BatchNorm`] module, with either training kernel.
    Module(Kernel),
    /// The chapter-style function [`batch_norm`].
    Functional,
}

fn run(case: &Case, dtype: DType, form: Form, backend: &Device) -> Outputs {
    macro_rules! by_rank {
        ($f:ident $(, $arg:expr)?) => {
            match case.shape.len() {
                2 => $f::<2>(case, dtype $(, $arg)?, backend),
                3 => $f::<3>(case, dtype $(, $arg)?, backend),
                4 => $f::<4>(case, dtype $(, $arg)?, backend),
                5 => $f::<5>(case, dtype $(, $arg)?, backend),
                r => panic!("rank {r}"),
            }
        };
    }
    match form {
        Form::Functional => by_rank!(run_functional),
        Form::Module(kernel) => by_rank!(run_module, kernel),
    }
}

/// Runs every case on `backend` (Flex unless a backend test says otherwise).
fn check_all_on(backend: &Device, dtype: DType, form: Form) {
    let mut checked = HashMap::new();
    for case in cases() {
        let got = run(&case, dtype, form, backend);
        check(&case, &got, dtype);
        checked.insert(case.name.clone(), case.shape.len());
    }
    // Every rank the layer supports is covered by the fixture.
    for rank in 2..=5 {
        assert!(
            checked.values().any(|&r| r == rank),
            "no case of rank {rank}"
        );
    }
}

fn check_all(dtype: DType, form: Form) {
    check_all_on(&Device::flex(), dtype, form)
}

#[test]
fn module_matches_pytorch_in_float32() {
    check_all(DType::F32, Form::Module(Kernel::Composed));
}

#[test]
fn module_matches_pytorch_in_float64() {
    check_all(DType::F64, Form::Module(Kernel::Composed));
}

#[test]
fn functional_matches_pytorch_in_float32() {
    check_all(DType::F32, Form::Functional);
}

#[test]
fn functional_matches_pytorch_in_float64() {
    check_all(DType::F64, Form::Functional);
}

#[test]
fn fused_kernel_matches_pytorch_in_float32() {
    // Not a silent fallback: the kernel exists for the device the cases run on.
    assert!(bnlab::ops::batch_norm::supports(&Device::flex().autodiff()));
    check_all(DType::F32, Form::Module(Kernel::Fused));
}

#[test]
fn fused_kernel_matches_pytorch_in_float64() {
    check_all(DType::F64, Form::Module(Kernel::Fused));
}

/// The large-mean case is only worth having if it would catch the naive formula: this shows
/// that `E[x²] - E[x]²` in float32 is off by far more than the tolerance the case allows.
#[test]
fn large_mean_case_defeats_naive_float32_variance() {
    let case = cases()
        .into_iter()
        .find(|c| c.name == "conv2d_large_mean")
        .unwrap();
    let device = Device::flex();
    let x: Tensor<4> = tensor(&case.x, &case.shape, DType::F32, &device);
    let n = (case.x.len() / case.channels()) as f64;
    let mean = x.clone().sum_dims(&[0, 2, 3]).div_scalar(n);
    let mean_sq = x.square().sum_dims(&[0, 2, 3]).div_scalar(n);
    let naive_var = values(mean_sq - mean.clone().square());
    let stats = bnlab::norm::functional::normalize_train(
        tensor::<4>(&case.x, &case.shape, DType::F32, &device),
        None,
        None,
        case.eps,
    )
    .unwrap()
    .1;
    let good_var = values(stats.var);
    for (naive, good) in naive_var.iter().zip(&good_var) {
        // The true variance is about 1e-4.
        assert!((good - 1e-4).abs() < 3e-5, "two-pass variance {good}");
        assert!(
            (naive - good).abs() > 10.0 * case.tolerance(DType::F32) * good,
            "naive {naive}"
        );
    }
}

#[test]
fn convention_weights() {
    let pytorch = RunningUpdate::default();
    assert_eq!(pytorch.new_batch_weight(7), 0.1);
    assert!(pytorch.unbiased_running_var());
    let d2l = RunningUpdate::d2l();
    assert!((d2l.new_batch_weight(7) - 0.1).abs() < 1e-12);
    assert!(!d2l.unbiased_running_var());
    assert_eq!(d2l.convention, Convention::D2l);
    let cumulative = RunningUpdate::pytorch(Momentum::CUMULATIVE);
    assert_eq!(cumulative.new_batch_weight(4), 0.25);
}

/// The same cases on Burn's other backends, in float32 (what they train in): see
/// `tests/backends.rs` for the rest of the cross-backend checks. On wgpu, `fused` runs the CubeCL
/// kernels of `src/ops/batch_norm/cube.rs`; LibTorch has none, and runs the composed layer.
#[cfg(feature = "wgpu")]
mod on_wgpu {
    use super::*;

    #[test]
    fn module_matches_pytorch_in_float32_on_wgpu() {
        let device = Device::wgpu(burn::tensor::DeviceKind::DefaultDevice);
        check_all_on(&device, DType::F32, Form::Module(Kernel::Composed));
        // Not a silent fallback: the CubeCL kernel exists for this device.
        assert!(bnlab::ops::batch_norm::supports(&device.clone().autodiff()));
        check_all_on(&device, DType::F32, Form::Module(Kernel::Fused));
    }

    #[test]
    fn functional_matches_pytorch_in_float32_on_wgpu() {
        let device = Device::wgpu(burn::tensor::DeviceKind::DefaultDevice);
        check_all_on(&device, DType::F32, Form::Functional);
    }
}

#[cfg(feature = "libtorch")]
mod on_libtorch {
    use super::*;

    #[test]
    fn module_matches_pytorch_on_libtorch() {
        let device = Device::libtorch();
        for dtype in [DType::F32, DType::F64] {
            check_all_on(&device, dtype, Form::Module(Kernel::Composed));
            check_all_on(&device, dtype, Form::Functional);
        }
    }
}
