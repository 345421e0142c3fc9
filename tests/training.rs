//! Short training runs on the real data: they learn, they are reproducible, and the scratch
//! layer trains like Burn's built-in one.

use bnlab::data::FashionMnist;
use bnlab::models::{ModelKind, ModelSpec};
use bnlab::norm::{NormConfig, NormKind};
use bnlab::train::{train, Quiet, TrainConfig};

fn data() -> FashionMnist {
    FashionMnist::load_default().expect("apt-get install dataset-fashion-mnist")
}

fn config(norm: NormKind, batches: usize) -> TrainConfig {
    TrainConfig {
        model: ModelSpec {
            kind: ModelKind::LenetBn,
            norm: NormConfig::of(norm),
        },
        epochs: 1,
        lr: 1.0,
        batch_size: 128,
        seed: 3,
        shuffle: true,
        limit_batches: Some(batches),
    }
}

#[test]
fn lenet_bn_learns_in_a_few_batches() {
    let data = data();
    let out = train(&config(NormKind::Scratch, 60), &data, &mut Quiet).unwrap();
    let m = &out.metrics[0];
    // 60 batches of 128 (an eighth of an epoch); chance is 0.1.
    assert!(m.test_acc > 0.6, "test accuracy {}", m.test_acc);
    assert!(m.train_loss < 1.6, "train loss {}", m.train_loss);
}

#[test]
fn the_same_seed_gives_the_same_run() {
    let data = data();
    let a = train(&config(NormKind::Scratch, 8), &data, &mut Quiet).unwrap();
    let b = train(&config(NormKind::Scratch, 8), &data, &mut Quiet).unwrap();
    assert_eq!(a.metrics[0].train_loss, b.metrics[0].train_loss);
    assert_eq!(a.metrics[0].test_acc, b.metrics[0].test_acc);
    let mut other = config(NormKind::Scratch, 8);
    other.seed = 4;
    let c = train(&other, &data, &mut Quiet).unwrap();
    assert_ne!(a.metrics[0].train_loss, c.metrics[0].train_loss);
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
