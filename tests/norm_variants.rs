//! The norms `--norm` offers besides batch norm, against references.
//!
//! - `mean-only`, `var-only`, `group:G`, `layer` and `instance` against PyTorch in float64
//!   (`tests/fixtures/norm_variants.json`, written by `tools/make_norm_variants_reference.py`):
//!   the training output, the gradients of `(y * g).sum()` for x, γ and β, the running
//!   statistics after the step and the eval output after it. To 1e-9 of the tensor's largest
//!   value in float64, 1e-4 in float32.
//! - `ghost:N` against batch norm applied to each chunk on its own, chunk after chunk: the
//!   outputs, input gradients and running statistics are the same bit for bit.
//! - `renorm` against batch renormalization written from torch ops in the same script: four
//!   steps through its schedule (plain BN for two, then clipped corrections), each step's
//!   output, gradients and running statistics.

mod common;

use bnlab::norm::{NormConfig, NormKind, NormLayer, NormName};
use burn::module::{Module, Param, RunningState};
use burn::tensor::{DType, Device, Tensor};
use common::{tensor, values};
use serde::Deserialize;

#[derive(Deserialize)]
struct Fixture {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    norm: String,
    shape: Vec<usize>,
    eps: f64,
    x: Vec<f64>,
    g: Vec<f64>,
    gamma: Vec<f64>,
    beta: Vec<f64>,
    y: Vec<f64>,
    dx: Vec<f64>,
    dgamma: Vec<f64>,
    dbeta: Vec<f64>,
    y_eval: Vec<f64>,
    running_mean_before: Option<Vec<f64>>,
    running_var_before: Option<Vec<f64>>,
    running_mean_after: Option<Vec<f64>>,
    running_var_after: Option<Vec<f64>>,
}

fn cases() -> Vec<Case> {
    let text = include_str!("fixtures/norm_variants.json");
    serde_json::from_str::<Fixture>(text)
        .expect("norm_variants.json parses")
        .cases
}

/// Asserts `|got - want| <= tol * max(1, max|want|)` elementwise.
fn assert_close(what: &str, got: &[f64], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(1.0f64, |m, v| m.max(v.abs()));
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tol * scale,
            "{what}[{i}] = {g} but PyTorch gives {w} (tolerance {:.1e})",
            tol * scale
        );
    }
}

fn vector(v: &[f64], dtype: DType, device: &Device) -> Tensor<1> {
    tensor(v, [v.len()], dtype, device)
}

/// The layer the case's `--norm` value makes, with the case's γ, β and running statistics.
fn layer(case: &Case, dtype: DType, device: &Device) -> NormLayer {
    let name: NormName = case.norm.parse().expect("a --norm value");
    let config = NormConfig {
        eps: case.eps,
        ..NormConfig::named(name)
    };
    let c = case.shape[1];
    let mut layer = NormLayer::new(&config, c, device).expect("a layer");
    let gamma = Param::from_tensor(vector(&case.gamma, dtype, device));
    let beta = Param::from_tensor(vector(&case.beta, dtype, device));
    match &mut layer {
        NormLayer::Scratch(bn) => {
            bn.gamma = Some(gamma);
            bn.beta = Some(beta);
            let mean = case.running_mean_before.as_ref().expect("BN case");
            let var = case.running_var_before.as_ref().expect("BN case");
            bn.running_mean = Some(RunningState::new(vector(mean, dtype, device)));
            bn.running_var = Some(RunningState::new(vector(var, dtype, device)));
        }
        NormLayer::Group(norm) => {
            norm.gamma = Some(gamma);
            norm.beta = Some(beta);
        }
        NormLayer::Burn(_) => unreachable!("no case uses Burn's BN"),
    }
    layer
}

fn run<const D: usize>(case: &Case, dtype: DType) {
    let tol = if dtype == DType::F64 { 1e-9 } else { 1e-4 };
    let label = |what: &str| format!("{} {what} ({dtype:?})", case.name);
    let backend = Device::flex();
    let device = backend.clone().autodiff();
    let layer = layer(case, dtype, &device);
    let shape: [usize; D] = case.shape.clone().try_into().expect("rank");
    let x: Tensor<D> = tensor(&case.x, shape, dtype, &device).require_grad();
    let y = layer.forward(x.clone());
    assert_close(&label("y"), &values(y.clone()), &case.y, tol);
    let grads = (y * tensor::<D>(&case.g, shape, dtype, &device))
        .sum()
        .backward();
    let dx = values(x.grad(&grads).expect("dx"));
    assert_close(&label("dx"), &dx, &case.dx, tol);
    let (gamma, beta) = match &layer {
        NormLayer::Scratch(bn) => (bn.gamma.clone(), bn.beta.clone()),
        NormLayer::Group(norm) => (norm.gamma.clone(), norm.beta.clone()),
        NormLayer::Burn(_) => unreachable!(),
    };
    let dgamma = values(gamma.expect("affine").val().grad(&grads).expect("dgamma"));
    let dbeta = values(beta.expect("affine").val().grad(&grads).expect("dbeta"));
    assert_close(&label("dgamma"), &dgamma, &case.dgamma, tol);
    assert_close(&label("dbeta"), &dbeta, &case.dbeta, tol);

    let eval = layer.valid();
    if let (NormLayer::Scratch(bn), Some(mean), Some(var)) =
        (&eval, &case.running_mean_after, &case.running_var_after)
    {
        let (got_mean, got_var) = bn.running_stats().expect("tracked");
        assert_close(&label("running_mean"), &values(got_mean), mean, tol);
        assert_close(&label("running_var"), &values(got_var), var, tol);
    }
    let x_eval: Tensor<D> = tensor(&case.x, shape, dtype, &backend);
    let y_eval = values(eval.forward(x_eval));
    assert_close(&label("y_eval"), &y_eval, &case.y_eval, tol);
}

#[test]
fn lite_batch_norm_and_group_norms_match_pytorch() {
    let cases = cases();
    let names: Vec<&str> = cases.iter().map(|c| c.norm.as_str()).collect();
    for norm in ["mean-only", "var-only", "group:2", "layer", "instance"] {
        assert!(names.contains(&norm), "no case for {norm}");
    }
    for case in &cases {
        for dtype in [DType::F64, DType::F32] {
            match case.shape.len() {
                2 => run::<2>(case, dtype),
                4 => run::<4>(case, dtype),
                rank => panic!("{}: rank {rank}", case.name),
            }
        }
    }
}

/// Ghost BN of `ghost` examples on `x` against BN (the same kernel) on each chunk in turn:
/// `chunks` are the chunk sizes ghost BN should cut the batch into.
fn ghost_equals_per_chunk_bn<const D: usize>(shape: [usize; D], ghost: usize, chunks: &[usize]) {
    let device = Device::flex().autodiff();
    let n: usize = shape.iter().product();
    let per_example = n / shape[0];
    let x: Vec<f64> = (0..n)
        .map(|i| ((i * 7919) % 103) as f64 / 10.0 + (i % 5) as f64)
        .collect();
    let g: Vec<f64> = (0..n).map(|i| ((i * 31) % 17) as f64 / 8.0 - 1.0).collect();
    let config = |kind: NormKind, size| NormConfig {
        size,
        ..NormConfig::of(kind)
    };
    let c = shape[1];
    let ghost_layer = NormLayer::new(&config(NormKind::Ghost, Some(ghost)), c, &device).unwrap();
    let plain = NormLayer::new(&config(NormKind::Fused, None), c, &device).unwrap();

    let x_all: Tensor<D> = tensor(&x, shape, DType::F32, &device).require_grad();
    let y = ghost_layer.forward(x_all.clone());
    let g_all: Tensor<D> = tensor(&g, shape, DType::F32, &device);
    let grads = (y.clone() * g_all).sum().backward();
    let (y, dx) = (values(y), values(x_all.grad(&grads).unwrap()));

    let mut start = 0;
    for &size in chunks {
        let mut chunk_shape = shape;
        chunk_shape[0] = size;
        let range = start * per_example..(start + size) * per_example;
        let xc: Tensor<D> = tensor(&x[range.clone()], chunk_shape, DType::F32, &device);
        let xc = xc.require_grad();
        let yc = plain.forward(xc.clone());
        let gc: Tensor<D> = tensor(&g[range.clone()], chunk_shape, DType::F32, &device);
        let grads = (yc.clone() * gc).sum().backward();
        assert_eq!(values(yc), y[range.clone()], "y of chunk at {start}");
        assert_eq!(
            values(xc.grad(&grads).unwrap()),
            dx[range],
            "dx of chunk at {start}"
        );
        start += size;
    }
    assert_eq!(start, shape[0], "the chunks cover the batch");
    let stats = |layer: NormLayer| match layer.valid() {
        NormLayer::Scratch(bn) => {
            let (mean, var) = bn.running_stats().unwrap();
            (values(mean), values(var))
        }
        _ => unreachable!(),
    };
    assert_eq!(
        stats(ghost_layer),
        stats(plain),
        "running statistics after {} chunks",
        chunks.len()
    );
}

#[test]
fn ghost_batch_norm_is_batch_norm_on_each_chunk_in_turn() {
    // 10 images in ghost batches of 4: chunks 4, 4, 2.
    ghost_equals_per_chunk_bn([10, 3, 4, 4], 4, &[4, 4, 2]);
    // 9 rows of features in ghost batches of 4: a last chunk of one row has one value per
    // channel, so it joins the chunk before: 4, 5.
    ghost_equals_per_chunk_bn([9, 5], 4, &[4, 5]);
    // A ghost batch as large as the batch is batch norm.
    ghost_equals_per_chunk_bn([6, 2, 3, 3], 8, &[6]);
}

#[test]
fn norm_names_parse_print_and_refuse_what_does_not_fit() {
    for text in [
        "fused",
        "mean-only",
        "ghost:32",
        "group:2",
        "layer",
        "instance",
    ] {
        let name: NormName = text.parse().unwrap();
        assert_eq!(name.to_string(), text);
    }
    let err = |text: &str| text.parse::<NormName>().unwrap_err();
    assert!(
        err("ghost").contains("needs its size: ghost:N"),
        "{}",
        err("ghost")
    );
    assert!(err("group:0").contains("whole number >= 1"));
    assert!(err("layer:2").contains("takes no size"));
    assert!(
        err("gost:2").contains("did you mean ghost?"),
        "{}",
        err("gost:2")
    );
}

#[derive(Deserialize)]
struct RenormFixture {
    renorm: Vec<RenormCase>,
}

#[derive(Deserialize)]
struct RenormCase {
    name: String,
    shape: Vec<usize>,
    eps: f64,
    schedule: bnlab::norm::RenormSchedule,
    gamma: Vec<f64>,
    beta: Vec<f64>,
    running_mean_before: Vec<f64>,
    running_var_before: Vec<f64>,
    steps: Vec<RenormStep>,
}

#[derive(Deserialize)]
struct RenormStep {
    x: Vec<f64>,
    g: Vec<f64>,
    y: Vec<f64>,
    dx: Vec<f64>,
    dgamma: Vec<f64>,
    dbeta: Vec<f64>,
    running_mean_after: Vec<f64>,
    running_var_after: Vec<f64>,
}

fn renorm_run<const D: usize>(case: &RenormCase, dtype: DType) {
    let tol = if dtype == DType::F64 { 1e-9 } else { 1e-4 };
    let device = Device::flex().autodiff();
    let config = NormConfig {
        eps: case.eps,
        renorm: case.schedule,
        ..NormConfig::of(NormKind::Renorm)
    };
    let mut layer = NormLayer::new(&config, case.shape[1], &device).unwrap();
    let NormLayer::Scratch(bn) = &mut layer else {
        panic!("renorm is this project's layer")
    };
    bn.gamma = Some(Param::from_tensor(vector(&case.gamma, dtype, &device)));
    bn.beta = Some(Param::from_tensor(vector(&case.beta, dtype, &device)));
    let (mean, var) = (&case.running_mean_before, &case.running_var_before);
    bn.running_mean = Some(RunningState::new(vector(mean, dtype, &device)));
    bn.running_var = Some(RunningState::new(vector(var, dtype, &device)));
    let shape: [usize; D] = case.shape.clone().try_into().expect("rank");
    for (i, step) in case.steps.iter().enumerate() {
        let label = |what: &str| format!("{} step {i} {what} ({dtype:?})", case.name);
        let x: Tensor<D> = tensor(&step.x, shape, dtype, &device).require_grad();
        let y = layer.forward(x.clone());
        let got = values(y.clone());
        assert_close(&label("y"), &got, &step.y, tol);
        if i >= 2 {
            // Past the warm-up the correction acts: the output is not batch norm's.
            let (plain, _) = bnlab::norm::functional::normalize_train(
                x.clone().detach(),
                Some(vector(&case.gamma, dtype, &device)),
                Some(vector(&case.beta, dtype, &device)),
                case.eps,
            )
            .unwrap();
            let apart = values(plain)
                .iter()
                .zip(&got)
                .fold(0.0f64, |m, (a, b)| m.max((a - b).abs()));
            assert!(apart > 1e-2, "{}: renorm = BN ({apart:e})", label("y"));
        }
        let grads = (y * tensor::<D>(&step.g, shape, dtype, &device))
            .sum()
            .backward();
        assert_close(
            &label("dx"),
            &values(x.grad(&grads).unwrap()),
            &step.dx,
            tol,
        );
        let NormLayer::Scratch(bn) = &layer else {
            unreachable!()
        };
        let grad =
            |p: &Option<Param<Tensor<1>>>| values(p.as_ref().unwrap().val().grad(&grads).unwrap());
        assert_close(&label("dgamma"), &grad(&bn.gamma), &step.dgamma, tol);
        assert_close(&label("dbeta"), &grad(&bn.beta), &step.dbeta, tol);
        let NormLayer::Scratch(eval) = layer.clone().valid() else {
            unreachable!()
        };
        let (mean, var) = eval.running_stats().unwrap();
        assert_close(
            &label("running_mean"),
            &values(mean),
            &step.running_mean_after,
            tol,
        );
        assert_close(
            &label("running_var"),
            &values(var),
            &step.running_var_after,
            tol,
        );
    }
}

#[test]
fn batch_renormalization_matches_a_pytorch_reference_through_its_schedule() {
    let fixture: RenormFixture =
        serde_json::from_str(include_str!("fixtures/norm_variants.json")).unwrap();
    assert_eq!(fixture.renorm.len(), 2);
    for case in &fixture.renorm {
        assert_eq!(case.steps.len(), 4, "{}", case.name);
        for dtype in [DType::F64, DType::F32] {
            match case.shape.len() {
                2 => renorm_run::<2>(case, dtype),
                4 => renorm_run::<4>(case, dtype),
                rank => panic!("{}: rank {rank}", case.name),
            }
        }
    }
}
