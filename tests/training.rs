//! Short training runs on the real data: they learn, they are reproducible, the scratch layer
//! trains like Burn's built-in one, and precise BN computes the exact average it promises.

use bnlab::config::{OptimizerKind, RunConfig};
use bnlab::data::input_batch;
use bnlab::data::{batches, FashionMnist};
use bnlab::models::{Model, ModelKind};
use bnlab::norm::{NormKind, NormLayer};
use bnlab::train::{recalibrate_bn, train, train_device, Quiet};
use burn::module::Module;
use burn::tensor::Tensor;

fn data() -> FashionMnist {
    FashionMnist::load_default().expect("apt-get install dataset-fashion-mnist")
}

fn config(norm: NormKind, batches: usize) -> RunConfig {
    RunConfig {
        norm: Some(norm.into()),
        epochs: 1,
        batch_size: 128,
        seed: 3,
        limit_batches: Some(batches),
        ..Default::default()
    }
}

#[test]
fn lenet_bn_learns_in_a_few_batches() {
    let out = train(&config(NormKind::Scratch, 60), &data(), &mut Quiet).unwrap();
    let m = &out.metrics[0];
    // 60 batches of 128 (an eighth of an epoch); chance is 0.1.
    assert!(m.test_acc > Some(0.6), "test accuracy {:?}", m.test_acc);
    assert!(m.train_loss < 1.6, "train loss {}", m.train_loss);
}

#[test]
fn the_same_seed_gives_the_same_run() {
    let data = data();
    let a = train(&config(NormKind::Scratch, 8), &data, &mut Quiet).unwrap();
    let b = train(&config(NormKind::Scratch, 8), &data, &mut Quiet).unwrap();
    assert_eq!(a.metrics[0].train_loss, b.metrics[0].train_loss);
    assert_eq!(a.metrics[0].test_acc, b.metrics[0].test_acc);
    let other = RunConfig {
        seed: 4,
        ..config(NormKind::Scratch, 8)
    };
    let c = train(&other, &data, &mut Quiet).unwrap();
    assert_ne!(a.metrics[0].train_loss, c.metrics[0].train_loss);
}

#[test]
fn without_shuffling_two_runs_give_identical_metrics() {
    let data = data();
    let config = RunConfig {
        shuffle: false,
        epochs: 2,
        ..config(NormKind::Scratch, 5)
    };
    let a = train(&config, &data, &mut Quiet).unwrap();
    let b = train(&config, &data, &mut Quiet).unwrap();
    let learning = |m: &[bnlab::report::EpochMetrics]| {
        m.iter()
            .map(|e| (e.train_loss, e.train_acc, e.test_acc))
            .collect::<Vec<_>>()
    };
    assert_eq!(learning(&a.metrics), learning(&b.metrics));
    // File order is not the seeded shuffle.
    let shuffled = train(
        &RunConfig {
            shuffle: true,
            ..config
        },
        &data,
        &mut Quiet,
    )
    .unwrap();
    assert_ne!(learning(&a.metrics), learning(&shuffled.metrics));
}

/// From the same initial weights, this project's layer and Burn's built-in one compute the same
/// training-mode function, so the training losses agree to float32 rounding.
#[test]
fn scratch_and_builtin_batch_norm_train_alike() {
    let data = data();
    let scratch = train(&config(NormKind::Scratch, 10), &data, &mut Quiet).unwrap();
    let builtin = train(&config(NormKind::Burn, 10), &data, &mut Quiet).unwrap();
    let (a, b) = (scratch.metrics[0].train_loss, builtin.metrics[0].train_loss);
    assert!((a - b).abs() < 1e-3, "scratch {a} vs burn {b}");
    let plain = train(&config(NormKind::None, 10), &data, &mut Quiet).unwrap();
    assert!(
        (plain.metrics[0].train_loss - a).abs() > 1e-2,
        "without BN the run differs"
    );
}

/// Each optimizer trains: the loss of the last of 30 steps is well below the first's.
#[test]
fn every_optimizer_lowers_the_loss() {
    let data = data();
    for (optimizer, lr) in [
        (OptimizerKind::Sgd, 1.0),
        (OptimizerKind::SgdMomentum, 0.5),
        (OptimizerKind::Adam, 0.01),
    ] {
        let config = RunConfig {
            optimizer,
            lr,
            epochs: 2,
            ..config(NormKind::Scratch, 15)
        };
        let out = train(&config, &data, &mut Quiet).unwrap();
        let (first, second) = (out.metrics[0].train_loss, out.metrics[1].train_loss);
        assert!(
            second < first * 0.8,
            "{optimizer:?}: loss {first} then {second}"
        );
    }
}

/// Precise BN: after recalibration, bn1's running mean is the size-weighted average of conv1's
/// per-batch channel means over the training batches, computed here independently.
#[test]
fn recalibration_averages_batch_statistics_exactly() {
    let data = data();
    let (batch_size, limit) = (100, 7);
    let device = train_device();
    let model =
        bnlab::models::ModelSpec::of(ModelKind::LenetBn, NormKind::Scratch).init(1, &device);
    let Model::LeNet(lenet) = &model else {
        unreachable!()
    };
    let conv1 = lenet.conv1.valid();

    let order: Vec<usize> = (0..data.train.len()).collect();
    let mut want = Tensor::<1>::zeros([6], &bnlab::train::eval_device());
    let mut seen = 0;
    for indices in batches(&order, batch_size, true).into_iter().take(limit) {
        let (x, _) = input_batch(&data.train, indices, 28, &bnlab::train::eval_device());
        let mean: Tensor<1> = conv1.forward(x).mean_dims(&[0, 2, 3]).reshape([6]);
        want = want + mean.mul_scalar(indices.len() as f64);
        seen += indices.len();
    }
    let want: Vec<f32> = want
        .div_scalar(seen as f64)
        .into_data()
        .iter::<f32>()
        .collect();

    let mut recalibrated = recalibrate_bn(model, &data.train, batch_size, 28, Some(limit)).valid();
    let (_, NormLayer::Scratch(bn1)) = &recalibrated.norms_mut()[0] else {
        unreachable!()
    };
    let got: Vec<f32> = bn1
        .running_stats()
        .unwrap()
        .0
        .into_data()
        .iter::<f32>()
        .collect();
    for (g, w) in got.iter().zip(&want) {
        assert!(
            (g - w).abs() < 1e-4 * (1.0 + w.abs()),
            "running mean {got:?} vs {want:?}"
        );
    }
    // The momentum is restored afterwards.
    assert_eq!(bn1.update.momentum.weight(), Some(0.1));
}

/// Precise BN runs its forward passes without gradients (so that they keep no graph), and
/// hands back a model whose every parameter takes a gradient again, as before it: training
/// goes on after each test pass of a run with `recalibrate_bn`.
#[test]
fn recalibration_leaves_every_parameter_trainable() {
    use burn::optim::GradientsParams;
    let data = data();
    let device = train_device();
    let gradients = |model: &Model| {
        let (x, _) = input_batch(&data.train, &[0, 1, 2, 3], 28, &device);
        GradientsParams::from_grads(model.forward(x).sum().backward(), model).len()
    };
    let model = bnlab::models::ModelSpec::of(ModelKind::Speednet, NormKind::Fused).init(0, &device);
    let before = gradients(&model);
    assert!(before >= 14, "{before} parameters with a gradient");
    let recalibrated = recalibrate_bn(model, &data.train, 64, 28, Some(2));
    assert_eq!(gradients(&recalibrated), before);
}
