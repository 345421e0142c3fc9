//! State_dicts as PyTorch users save them, read by bnlab: `torch.save` (zip and legacy), a whole
//! pickled module, and safetensors, each evaluating to PyTorch's own logits; renamed keys, and
//! the errors of a file that does not match.
//!
//! The files in `tests/fixtures/torch/` and PyTorch's logits of the first 64 test images were
//! written by `tools/make_torch_fixtures.py` (PyTorch 2.15): d2l's LeNet-BN after 20 SGD steps.

use std::path::{Path, PathBuf};
use std::process::Command;

use bnlab::data::FashionMnist;
use bnlab::interop::predict;
use bnlab::interop::state_dict::{Format, Rename, StateDict};
use bnlab::interop::torch::{export, import_file, import_state_dict, TorchError};
use bnlab::models::{Model, ModelKind, ModelSpec};
use bnlab::norm::NormKind;
use serde::Deserialize;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/torch")
        .join(name)
}

#[derive(Deserialize)]
struct Logits {
    test_images: usize,
    logits: Vec<Vec<f32>>,
}

fn torch_logits() -> Logits {
    let text = std::fs::read_to_string(fixture("lenet_bn_logits.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn lenet_bn(norm: NormKind) -> ModelSpec {
    ModelSpec::of(ModelKind::LenetBn, norm)
}

/// The model's logits against PyTorch's: no predicted class differs, and every logit is within
/// 1e-5 of the largest's magnitude.
fn assert_matches_pytorch(model: &Model, what: &str) {
    let want = torch_logits();
    let data = FashionMnist::load_default().expect("apt-get install dataset-fashion-mnist");
    let got = predict(model, &data.test, 28, 64, Some(want.test_images));
    let scale = want
        .logits
        .iter()
        .flatten()
        .fold(0f32, |m, v| m.max(v.abs()));
    let mut worst = 0f32;
    for (i, (row, got)) in want.logits.iter().zip(got.logits.chunks(10)).enumerate() {
        let argmax = |r: &[f32]| (0..10).fold(0, |b, j| if r[j] > r[b] { j } else { b });
        assert_eq!(
            argmax(row),
            argmax(got),
            "{what}: image {i}: {row:?} against {got:?}"
        );
        for (a, b) in row.iter().zip(got) {
            worst = worst.max((a - b).abs());
        }
    }
    assert!(
        worst <= 1e-5 * scale,
        "{what}: largest logit difference {worst}, scale {scale}"
    );
}

#[test]
fn pytorch_files_evaluate_to_pytorchs_logits() {
    for name in [
        "lenet_bn.pt",
        "lenet_bn_legacy.pt",
        "lenet_bn_module.pt",
        "lenet_bn.safetensors",
    ] {
        for norm in [NormKind::Fused, NormKind::Scratch] {
            let model = import_file(&fixture(name), &lenet_bn(norm), &[])
                .unwrap_or_else(|e| panic!("{name}: {e:#}"));
            assert_matches_pytorch(&model, &format!("{name} --norm {norm}"));
        }
    }
}

#[test]
fn every_format_gives_the_same_weights_bit_for_bit() {
    let spec = lenet_bn(NormKind::Scratch);
    let exported = |name: &str| {
        let model = import_file(&fixture(name), &spec, &[]).unwrap();
        export(&model, &spec).unwrap()
    };
    let reference = exported("lenet_bn.safetensors");
    for name in ["lenet_bn.pt", "lenet_bn_legacy.pt", "lenet_bn_module.pt"] {
        assert!(exported(name) == reference, "{name}");
    }
    let formats: Vec<Format> = ["lenet_bn.pt", "lenet_bn.safetensors"]
        .iter()
        .map(|n| StateDict::read(&fixture(n)).unwrap().format)
        .collect();
    assert_eq!(formats, [Format::Torch, Format::Safetensors]);
}

/// The fixture's tensors under other keys, as a safetensors file in a temporary directory.
fn renamed_copy(dir: &Path, rename: impl Fn(&str) -> String) -> PathBuf {
    let dict = StateDict::read(&fixture("lenet_bn.safetensors")).unwrap();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = dict
        .tensors
        .iter()
        .map(|(k, t)| {
            let view =
                safetensors::tensor::TensorView::new(t.dtype, t.shape.clone(), &t.bytes).unwrap();
            (rename(k), view)
        })
        .collect();
    let path = dir.join("renamed.safetensors");
    std::fs::write(&path, safetensors::serialize(views, None).unwrap()).unwrap();
    path
}

#[test]
fn renamed_keys_load_with_rename_and_are_listed_without() {
    let dir = tempfile::tempdir().unwrap();
    // A model wrapped in nn.DataParallel, saved under a key of its own.
    let path = renamed_copy(dir.path(), |k| format!("module.features.{k}"));
    let spec = lenet_bn(NormKind::Fused);
    let err = format!("{:#}", import_file(&path, &spec, &[]).unwrap_err());
    assert!(err.contains("missing keys 0.weight, 0.bias"), "{err}");
    assert!(
        err.contains("unexpected keys module.features.0.bias (closest: 0.bias)"),
        "{err}"
    );
    assert!(err.contains("--rename"), "{err}");
    assert!(!err.contains('\n'), "{err}");

    let renames: Vec<Rename> = ["^module\\.=", "^features\\.="]
        .iter()
        .map(|r| r.parse().unwrap())
        .collect();
    let model = import_file(&path, &spec, &renames).unwrap();
    assert_matches_pytorch(&model, "renamed");

    // A rename that misses part of the keys: the rest are listed, nothing is loaded.
    let partial: Rename = "^module\\.features\\.([0-4])\\.=$1.".parse().unwrap();
    let err = format!("{:#}", import_file(&path, &spec, &[partial]).unwrap_err());
    assert!(err.contains("missing keys 5.weight"), "{err}");
    assert!(
        err.contains("unexpected keys module.features.10.bias (closest: 10.bias)"),
        "{err}"
    );
}

#[test]
fn shape_mismatches_are_all_listed() {
    let dict = StateDict::read(&fixture("lenet_bn.pt")).unwrap();
    // LeNet-BN's file given for the Gluon LeNet: other channel counts throughout.
    let err = import_state_dict(
        &dict,
        &ModelSpec::of(ModelKind::LenetGluon, NormKind::Fused),
    )
    .err()
    .unwrap();
    let TorchError::Mismatch { shapes, .. } = &err else {
        panic!("{err}");
    };
    assert!(shapes.len() > 1, "{err}");
    let text = err.to_string();
    assert!(
        text.contains("size mismatches 0.weight: shape [6,1,5,5] expected [20,1,5,5]"),
        "{text}"
    );
}

#[test]
fn files_that_are_not_state_dicts_get_one_line_naming_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let spec = lenet_bn(NormKind::Fused);
    for (name, bytes) in [
        ("zip.pt", b"PK\x03\x04 not really a zip archive".to_vec()),
        ("text.pt", b"just some text, not a pickle".to_vec()),
        ("empty.pt", Vec::new()),
        (
            "cut.pt",
            std::fs::read(fixture("lenet_bn.pt")).unwrap()[..5000].to_vec(),
        ),
        (
            "cut_legacy.pt",
            std::fs::read(fixture("lenet_bn_legacy.pt")).unwrap()[..5000].to_vec(),
        ),
    ] {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        let err = format!("{:#}", import_file(&path, &spec, &[]).unwrap_err());
        assert!(
            err.starts_with(&path.display().to_string()),
            "{name}: {err}"
        );
        assert!(
            err.contains("torch.save(net.state_dict(), PATH)"),
            "{name}: {err}"
        );
        assert!(!err.contains('\n'), "{name}: {err}");
    }
}

#[test]
fn eval_reads_a_pt_file_and_renames_from_the_command_line() {
    let bnlab = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_bnlab"))
            .args(args)
            .output()
            .unwrap()
    };
    let pt = fixture("lenet_bn.pt");
    let out = bnlab(&[
        "eval",
        "--weights",
        pt.to_str().unwrap(),
        "--model",
        "lenet-bn",
        "--limit-batches",
        "1",
        "--json",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("\"test_acc\""), "{stdout}");

    let out = bnlab(&[
        "eval",
        "--weights",
        pt.to_str().unwrap(),
        "--rename",
        "(unclosed=x",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("--rename") && stderr.contains("not a regular expression"),
        "{stderr}"
    );
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
}
