//! The training options of `train`/`run` (schedules, weight decay, Nesterov, label smoothing,
//! augmentation, flip TTA, the time budget) against PyTorch's values where PyTorch has them
//! (tests/fixtures/train_options.json, from tools/make_train_options_reference.py).

use std::path::Path;

use bnlab::config::{LrSchedule, OptimizerKind, RunConfig};
use bnlab::data::{FashionMnist, Split};
use bnlab::models::ModelKind;
use bnlab::train::{evaluate, optim, train, train_device, EvalOptions, Quiet};
use burn::module::{Module, Param};
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::{Linear, LinearConfig};
use burn::optim::GradientsParams;
use burn::tensor::{Int, Tensor, TensorData};
use serde_json::Value;

fn fixture() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/train_options.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn floats(v: &Value) -> Vec<f64> {
    match v {
        Value::Array(items) => items.iter().flat_map(floats).collect(),
        v => vec![v.as_f64().unwrap()],
    }
}

fn schedule(name: &str) -> LrSchedule {
    name.parse().unwrap()
}

/// OneCycleLR and CosineAnnealingLR, step by step, whether the steps are one epoch's or one
/// per epoch.
#[test]
fn schedules_match_pytorch_step_by_step() {
    for case in fixture()["schedules"].as_array().unwrap() {
        let total = case["total"].as_u64().unwrap() as usize;
        let want = floats(&case["lrs"]);
        if case["schedule"] == "step" {
            // StepLR steps once per epoch, whatever the steps within it.
            let config = RunConfig {
                lr: case["lr"].as_f64().unwrap(),
                lr_step_size: Some(case["step_size"].as_u64().unwrap() as usize),
                lr_gamma: case["gamma"].as_f64().unwrap(),
                epochs: total,
                ..Default::default()
            };
            for (epoch, &want) in (1..).zip(&want) {
                for step in [0, 5] {
                    let got = config.lr_at_step(epoch, step, 10);
                    assert!(
                        (got - want).abs() < 1e-12 * want,
                        "StepLR epoch {epoch}: {got} vs {want}"
                    );
                }
            }
            continue;
        }
        let config = |epochs| RunConfig {
            lr: case["lr"].as_f64().unwrap(),
            lr_schedule: Some(schedule(case["schedule"].as_str().unwrap())),
            lr_warmup: Some(case["warmup"].as_f64().unwrap()),
            epochs,
            ..Default::default()
        };
        let (one_epoch, per_epoch) = (config(1), config(total));
        for (t, &want) in want.iter().enumerate() {
            for (what, got) in [
                ("one epoch", one_epoch.lr_at_step(1, t, total)),
                ("a step per epoch", per_epoch.lr_at_step(t + 1, 0, 1)),
            ] {
                let err = (got - want).abs() / want.abs().max(1e-12);
                assert!(err < 1e-9, "{case}\nstep {t} ({what}): {got} vs {want}");
            }
        }
    }
}

/// Three steps of SGD with Nesterov momentum and of Adam, both with weight decay, on a label-
/// smoothed cross-entropy, the learning rate moving by one-cycle: PyTorch's weights after each
/// step, within float32 rounding.
#[test]
fn optimizer_steps_match_pytorch() {
    let device = train_device();
    for case in fixture()["steps"].as_array().unwrap() {
        let config = RunConfig {
            optimizer: case["optimizer"].as_str().unwrap().parse().unwrap(),
            lr: case["lr"].as_f64().unwrap(),
            momentum: case["momentum"].as_f64().unwrap(),
            nesterov: case["nesterov"].as_bool().unwrap(),
            weight_decay: case["weight_decay"].as_f64().unwrap(),
            label_smoothing: case["label_smoothing"].as_f64().unwrap(),
            lr_schedule: Some(LrSchedule::OneCycle),
            lr_warmup: Some(case["warmup"].as_f64().unwrap()),
            epochs: 1,
            ..Default::default()
        };
        config.validate().unwrap();
        let total = case["total"].as_u64().unwrap() as usize;
        // PyTorch's weight is [out, in]; Burn's Linear holds [in, out].
        let torch_weight = |v: &Value| {
            let w = floats(v);
            Tensor::<2>::from_data(TensorData::new(w, [3, 4]), &device).transpose()
        };
        let mut layer: Linear = LinearConfig::new(4, 3).init(&device);
        layer.weight = Param::from_tensor(torch_weight(&case["start"]["weight"]));
        let bias = floats(&case["start"]["bias"]);
        layer.bias = Some(Param::from_tensor(Tensor::from_data(
            TensorData::new(bias, [3]),
            &device,
        )));
        let x = Tensor::<2>::from_data(TensorData::new(floats(&case["x"]), [6, 4]), &device);
        let y: Vec<i64> = floats(&case["y"]).iter().map(|&v| v as i64).collect();
        let y = Tensor::<1, Int>::from_data(TensorData::new(y, [6]), &device);
        let loss_fn = CrossEntropyLossConfig::new()
            .with_smoothing(Some(config.label_smoothing as f32))
            .init(&device);
        let mut optim = optim::optimizer(&config);
        for (step, after) in case["after"].as_array().unwrap().iter().enumerate() {
            let loss = loss_fn.forward(layer.forward(x.clone()), y.clone());
            let loss_value = loss.clone().into_scalar::<f32>() as f64;
            let want_loss = after["loss"].as_f64().unwrap();
            assert!(
                (loss_value - want_loss).abs() < 1e-5,
                "{}: step {step} loss {loss_value} vs {want_loss}",
                config.optimizer
            );
            let grads = GradientsParams::from_grads(loss.backward(), &layer);
            layer = optim.step(config.lr_at_step(1, step, total), layer, grads);
            let got_w = floats(
                &serde_json::to_value(
                    layer
                        .weight
                        .val()
                        .transpose()
                        .into_data()
                        .try_to_vec::<f32>()
                        .unwrap(),
                )
                .unwrap(),
            );
            let got_b = layer
                .bias
                .as_ref()
                .unwrap()
                .val()
                .into_data()
                .try_to_vec::<f32>()
                .unwrap();
            let want_w = floats(&after["weight"]);
            let want_b = floats(&after["bias"]);
            for (i, (g, w)) in got_w.iter().zip(&want_w).enumerate() {
                assert!(
                    (g - w).abs() < 2e-5 * w.abs().max(1.0),
                    "{}: step {step} weight {i}: {g} vs {w}",
                    config.optimizer
                );
            }
            for (i, (&g, w)) in got_b.iter().zip(&want_b).enumerate() {
                assert!(
                    (g as f64 - w).abs() < 2e-5 * w.abs().max(1.0),
                    "{}: step {step} bias {i}: {g} vs {w}",
                    config.optimizer
                );
            }
        }
        // The run moved the weights: a test that passes on unchanged weights proves nothing.
        let start = floats(&case["start"]["weight"]);
        let end = floats(&case["after"][total - 1]["weight"]);
        assert!(start.iter().zip(&end).any(|(a, b)| (a - b).abs() > 1e-3));
    }
}

/// Held by the tests here that train: the time-budget test measures wall time, which a
/// training run beside it on the same cores would stretch.
static TRAINING: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn data() -> FashionMnist {
    FashionMnist::load_default().expect("apt-get install dataset-fashion-mnist")
}

/// Every image of `split` mirrored left to right.
fn mirrored(split: &Split) -> Split {
    let mut out = split.clone();
    for (image, src) in out
        .images
        .chunks_mut(split.cols)
        .zip(split.images.chunks(split.cols))
    {
        for (d, s) in image.iter_mut().zip(src.iter().rev()) {
            *d = *s;
        }
    }
    out
}

/// Flip TTA sums the logits of an image and its mirror, so it scores a test set and its mirror
/// image the same; without it the two differ.
#[test]
fn flip_tta_sees_an_image_and_its_mirror_alike() {
    let _alone = TRAINING.lock().unwrap_or_else(|e| e.into_inner());
    let data = data();
    let config = RunConfig {
        model: ModelKind::LenetBn,
        epochs: 1,
        seed: 3,
        limit_batches: Some(60),
        batch_size: 128,
        ..Default::default()
    };
    let model = train(&config, &data, &mut Quiet).unwrap().model;
    let model = model.valid();
    let test = data.test.take(1024);
    let flipped = mirrored(&test);
    let options = |tta_flip| EvalOptions {
        tta_flip,
        limit: None,
        ..EvalOptions::of(&config)
    };
    let tta = evaluate(&model, &test, &options(true));
    assert_eq!(tta, evaluate(&model, &flipped, &options(true)));
    assert!(tta > 0.5, "{tta}");
    let plain = evaluate(&model, &test, &options(false));
    assert_ne!(plain, evaluate(&model, &flipped, &options(false)));
}

/// A run told to stop after 2 s stops in its first epoch, tests, and ends at the budget.
#[test]
fn the_time_budget_ends_training_and_still_tests() {
    let _alone = TRAINING.lock().unwrap_or_else(|e| e.into_inner());
    let config = RunConfig {
        epochs: 50,
        // The run's end is tested even between the epochs `test_every` names.
        test_every: 100,
        time_budget: Some(2.0),
        augment_crop: 2,
        augment_flip: true,
        ..Default::default()
    };
    let started = std::time::Instant::now();
    let out = train(&config, &data(), &mut Quiet).unwrap();
    let wall = started.elapsed().as_secs_f64();
    assert!(
        out.metrics.len() < 50 && !out.interrupted,
        "{} epochs",
        out.metrics.len()
    );
    let last = out.metrics.last().unwrap();
    // The last epoch's test accuracy is the trained model's (how far 2 s of training gets
    // depends on the machine's load, so not a fixed figure).
    let model = out.model.valid();
    let tested = evaluate(&model, &data().test, &EvalOptions::of(&config));
    assert_eq!(last.test_acc, Some(tested), "{last:?}");
    // The first test pass is guessed from the step time (a third of a step per batch), so the
    // run ends at the budget, give or take that guess.
    assert!(last.elapsed > 1.0 && last.elapsed < 2.5, "{last:?}");
    assert!(wall < 2.0 + 10.0, "{wall} s");
}

/// `test_every: 2` over 5 epochs tests after epochs 2, 4 and 5 (the last), and only those
/// lines carry a test accuracy; what the other epochs report is unchanged by it.
#[test]
fn test_every_tests_every_nth_epoch_and_the_last() {
    let _alone = TRAINING.lock().unwrap_or_else(|e| e.into_inner());
    let config = |test_every| RunConfig {
        epochs: 5,
        limit_batches: Some(3),
        test_every,
        ..Default::default()
    };
    let sparse = train(&config(2), &data(), &mut Quiet).unwrap();
    let tested: Vec<bool> = sparse
        .metrics
        .iter()
        .map(|m| m.test_acc.is_some())
        .collect();
    assert_eq!(tested, [false, true, false, true, true]);
    let every = train(&config(1), &data(), &mut Quiet).unwrap();
    for (a, b) in sparse.metrics.iter().zip(&every.metrics) {
        assert_eq!((a.train_loss, a.train_acc), (b.train_loss, b.train_acc));
        if a.test_acc.is_some() {
            assert_eq!(a.test_acc, b.test_acc, "epoch {}", a.epoch);
        }
    }
    assert!(sparse.metrics[0].line(5).contains("test acc   –  "));
    let line = sparse.metrics[0].json();
    assert!(line.contains("\"test_acc\":null"), "{line}");
}

/// Every option the speedrun recipe uses is refused where it would be ignored or meaningless,
/// with the flag named.
#[test]
fn options_out_of_place_are_refused_by_name() {
    let bad = [
        (
            RunConfig {
                nesterov: true,
                ..Default::default()
            },
            "--nesterov",
        ),
        (
            RunConfig {
                lr_schedule: Some(LrSchedule::OneCycle),
                lr_warmup: Some(1.5),
                ..Default::default()
            },
            "--lr-warmup",
        ),
        (
            RunConfig {
                lr_schedule: Some(LrSchedule::Cosine),
                lr_step_size: Some(2),
                ..Default::default()
            },
            "--lr-step-size",
        ),
        (
            RunConfig {
                label_smoothing: 1.0,
                ..Default::default()
            },
            "--label-smoothing",
        ),
        (
            RunConfig {
                weight_decay: -1.0,
                ..Default::default()
            },
            "--weight-decay",
        ),
        (
            RunConfig {
                augment_crop: 20,
                ..Default::default()
            },
            "--augment-crop",
        ),
        (
            RunConfig {
                recalibrate_batches: Some(0),
                ..Default::default()
            },
            "--recalibrate-batches",
        ),
        (
            RunConfig {
                test_every: 0,
                ..Default::default()
            },
            "--test-every",
        ),
        (
            RunConfig {
                time_budget: Some(0.0),
                ..Default::default()
            },
            "--time-budget",
        ),
    ];
    for (config, flag) in bad {
        let e = config.validate().expect_err(flag).to_string();
        assert!(e.contains(flag), "{flag}: {e}");
    }
    let fine = RunConfig {
        optimizer: OptimizerKind::SgdMomentum,
        nesterov: true,
        lr_schedule: Some(LrSchedule::OneCycle),
        recalibrate_bn: true,
        recalibrate_batches: Some(4),
        ..Default::default()
    };
    fine.validate().unwrap();
}
