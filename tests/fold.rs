//! BN folding: a folded model computes the same logits as the eval-mode model it came from.

use bnlab::config::{OptimizerKind, RunConfig};
use bnlab::data::input_batch;
use bnlab::data::FashionMnist;
use bnlab::models::{fold_bn, ModelKind};
use bnlab::norm::NormKind;
use bnlab::train::{eval_device, train, Quiet};
use burn::module::Module;

fn values(t: burn::tensor::Tensor<2>) -> Vec<f32> {
    t.into_data().iter::<f32>().collect()
}

/// Trains a few batches (so that the running statistics are not the initial 0 and 1), then
/// compares the logits of 64 test images before and after folding.
fn check(model: ModelKind, norm: NormKind, resize: Option<usize>, bn_layers_left: usize) {
    let data = FashionMnist::load_default().unwrap();
    let config = RunConfig {
        model,
        norm: Some(norm.into()),
        resize,
        optimizer: OptimizerKind::Adam,
        lr: 1e-3,
        epochs: 1,
        batch_size: 32,
        limit_batches: Some(4),
        ..Default::default()
    };
    let trained = train(&config, &data, &mut Quiet).unwrap().model.valid();
    let indices: Vec<usize> = (0..64).collect();
    let (x, _) = input_batch(&data.test, &indices, config.image_size(), &eval_device());
    let before = values(trained.forward(x.clone()));
    let mut folded = fold_bn(trained);
    assert_eq!(
        folded.norms_mut().len(),
        bn_layers_left,
        "{model:?}: BN layers left after folding"
    );
    let after = values(folded.forward(x));
    let worst = before
        .iter()
        .zip(&after)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(
        worst <= 1e-5,
        "{model:?} {norm:?}: logits move by {worst:e} after folding"
    );
}

#[test]
fn folding_keeps_lenet_bn_outputs() {
    check(ModelKind::LenetBn, NormKind::Scratch, None, 0);
    check(ModelKind::LenetBn, NormKind::Burn, None, 0);
}

#[test]
fn folding_keeps_gluon_and_resnet_outputs() {
    check(ModelKind::LenetGluon, NormKind::Scratch, None, 0);
    check(ModelKind::Resnet18, NormKind::Scratch, None, 0);
}

#[test]
fn densenet_folds_only_its_stem() {
    // 1 final BN + 16 dense-layer BNs + 3 transition BNs stay: each sits before its conv.
    check(ModelKind::Densenet, NormKind::Scratch, Some(32), 20);
}
