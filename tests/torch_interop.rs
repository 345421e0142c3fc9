//! PyTorch state_dicts as safetensors: the keys are PyTorch's, a round trip changes nothing,
//! and every kind of bad file gets a one-line error naming the file and the key.
//!
//! `tests/fixtures/torch_state_dict_keys.json` holds the keys, shapes and dtypes PyTorch 2.15
//! gives each model's `state_dict()`, written by `tools/torch_crosscheck.py --dump-keys`.

use std::collections::HashMap;
use std::path::Path;

use bnlab::choice::Choice;
use bnlab::data::input_batch;
use bnlab::data::{FashionMnist, Split};
use bnlab::interop::torch::{
    export, export_with_metadata, import, import_file, metadata, state_dict_keys, Layout,
    TorchError, META_MODEL,
};
use bnlab::models::{Model, ModelKind, ModelSpec};
use bnlab::norm::{NormKind, NormLayer};
use bnlab::train::{eval_device, train_device};
use burn::module::Module;
use burn::tensor::Tensor;
use proptest::prelude::*;
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use serde::Deserialize;

const ALL_KINDS: [ModelKind; 5] = [
    ModelKind::Lenet,
    ModelKind::LenetBn,
    ModelKind::LenetGluon,
    ModelKind::Resnet18,
    ModelKind::Densenet,
];

fn data() -> FashionMnist {
    FashionMnist::load_default().expect("apt-get install dataset-fashion-mnist")
}

fn spec(kind: ModelKind, norm: NormKind) -> ModelSpec {
    ModelSpec::of(kind, norm)
}

/// A model whose running statistics have moved: one training-mode pass over four real images.
fn trained_a_little(spec: &ModelSpec, seed: u64, train: &Split) -> Model {
    let device = train_device();
    let model = spec.init(seed, &device);
    let size = spec.kind.min_image_size().max(28);
    let (x, _) = input_batch(train, &[0, 1, 2, 3], size, &device);
    let _ = model.forward(x);
    model.valid()
}

fn logits(model: &Model, test: &Split, kind: ModelKind) -> Vec<f32> {
    let size = kind.min_image_size().max(28);
    let (x, _) = input_batch(test, &[0, 1, 2, 3, 4, 5], size, &eval_device());
    model.forward(x).into_data().iter::<f32>().collect()
}

#[derive(Deserialize)]
struct KeyFixture {
    models: HashMap<String, Vec<(String, Vec<usize>, String)>>,
}

#[test]
fn every_models_keys_shapes_and_dtypes_are_pytorchs() {
    let fixture: KeyFixture =
        serde_json::from_str(include_str!("fixtures/torch_state_dict_keys.json")).unwrap();
    // Every model, and each with BN also without it (`KIND/none`).
    let with_bn = ModelKind::ALL.iter().filter(|k| k.has_batch_norm()).count();
    assert_eq!(fixture.models.len(), ModelKind::ALL.len() + with_bn);
    keys_shapes_and_dtypes_match(&fixture, Layout::D2l);
}

/// `tests/fixtures/torch_state_dict_keys_notebook.json`: the chapter notebooks' own ResNet-18
/// and DenseNet, which name their children (`tools/torch_crosscheck.py --dump-keys --layout
/// notebook`).
#[test]
fn the_notebook_layout_has_the_notebooks_keys_shapes_and_dtypes() {
    let fixture: KeyFixture =
        serde_json::from_str(include_str!("fixtures/torch_state_dict_keys_notebook.json")).unwrap();
    assert_eq!(fixture.models.len(), 4);
    keys_shapes_and_dtypes_match(&fixture, Layout::Notebook);
}

/// Each model's export in every layout reads back to the same model (the layout found from
/// the keys), and exports again to the same bytes; the two layouts hold the same tensors.
#[test]
fn every_layout_round_trips_bit_for_bit() {
    for kind in ALL_KINDS {
        let spec = spec(kind, NormKind::Scratch);
        let model = spec.init(3, &eval_device());
        let extra = std::collections::BTreeMap::new();
        let mut tensors = Vec::new();
        for layout in Layout::of(kind) {
            let bytes = export_with_metadata(&model, &spec, layout, &extra).unwrap();
            let again = import(&bytes, &spec).unwrap();
            let bytes_again = export_with_metadata(&again, &spec, layout, &extra).unwrap();
            assert!(bytes == bytes_again, "{kind} {layout}");
            assert_eq!(metadata(&bytes).unwrap()["layout"], layout.to_string());
            let file = SafeTensors::deserialize(&bytes).unwrap();
            let mut data: Vec<Vec<u8>> = file
                .tensors()
                .into_iter()
                .map(|(_, v)| v.data().to_vec())
                .collect();
            data.sort();
            tensors.push(data);
        }
        assert!(tensors.windows(2).all(|w| w[0] == w[1]), "{kind}");
        let layouts = Layout::of(kind).len();
        let named = matches!(kind, ModelKind::Resnet18 | ModelKind::Densenet);
        assert_eq!(layouts, if named { 2 } else { 1 }, "{kind}");
    }
}

fn keys_shapes_and_dtypes_match(fixture: &KeyFixture, layout: Layout) {
    for (name, want) in &fixture.models {
        let (kind, norm) = match name.split_once('/') {
            Some((kind, "none")) => (kind, NormKind::None),
            _ => (name.as_str(), NormKind::Scratch),
        };
        let kind: ModelKind = kind.parse().unwrap();
        let spec = spec(kind, norm);
        let got = state_dict_keys(&spec, layout);
        let want_keys: Vec<(String, Vec<usize>)> = want
            .iter()
            .map(|(k, s, _)| (k.clone(), s.clone()))
            .collect();
        assert_eq!(got, want_keys, "{name} {layout}");

        let extra = std::collections::BTreeMap::new();
        let bytes =
            export_with_metadata(&spec.init(1, &eval_device()), &spec, layout, &extra).unwrap();
        let file = SafeTensors::deserialize(&bytes).unwrap();
        for (key, shape, dtype) in want {
            let view = file.tensor(key).unwrap();
            let expected = match dtype.as_str() {
                "float32" => Dtype::F32,
                "int64" => Dtype::I64,
                other => panic!("{name}: {key}: fixture dtype {other}"),
            };
            assert_eq!(view.dtype(), expected, "{name}: {key}");
            assert_eq!(view.shape(), shape.as_slice(), "{name}: {key}");
        }
        assert_eq!(file.len(), want.len(), "{name}");
    }
}

/// The exact list of the brief: conv 0, bn 1, conv 4, bn 5, linear 9, bn 10, linear 12,
/// bn 13, linear 15 (2, 3, 6, 7, 8, 11, 14 are sigmoid, pool and flatten).
#[test]
fn lenet_bn_keys_are_those_of_the_chapters_sequential() {
    let bn = |i: usize| {
        [
            "weight",
            "bias",
            "running_mean",
            "running_var",
            "num_batches_tracked",
        ]
        .map(|s| format!("{i}.{s}"))
        .to_vec()
    };
    let wb = |i: usize| vec![format!("{i}.weight"), format!("{i}.bias")];
    let want: Vec<String> = [
        wb(0),
        bn(1),
        wb(4),
        bn(5),
        wb(9),
        bn(10),
        wb(12),
        bn(13),
        wb(15),
    ]
    .concat();
    let got: Vec<String> =
        state_dict_keys(&spec(ModelKind::LenetBn, NormKind::Scratch), Layout::D2l)
            .into_iter()
            .map(|(k, _)| k)
            .collect();
    assert_eq!(got, want);
}

/// Export, import, export again: the same bytes, and bit-identical logits on real test images.
#[test]
fn a_round_trip_keeps_every_weight_and_every_logit() {
    let data = data();
    let mut cases: Vec<ModelSpec> = ALL_KINDS
        .iter()
        .map(|&k| spec(k, NormKind::Scratch))
        .collect();
    cases.push(spec(ModelKind::LenetBn, NormKind::Burn));
    cases.push(spec(ModelKind::LenetGluon, NormKind::None));
    for spec in cases {
        let what = format!("{} --norm {:?}", spec.kind, spec.norm.kind);
        let model = trained_a_little(&spec, 7, &data.train);
        let bytes = export(&model, &spec).unwrap();
        let back = import(&bytes, &spec).unwrap();
        // Compared as a bool: a byte dump of a failure would be megabytes.
        assert!(export(&back, &spec).unwrap() == bytes, "{what}: weights");
        assert_eq!(
            logits(&back, &data.test, spec.kind),
            logits(&model, &data.test, spec.kind),
            "{what}: logits"
        );
        // The import is a different model from a fresh one of the same spec.
        let fresh = spec.init(0, &eval_device());
        assert_ne!(
            logits(&fresh, &data.test, spec.kind),
            logits(&back, &data.test, spec.kind),
            "{what}"
        );
        assert_eq!(
            metadata(&bytes).unwrap().get(META_MODEL),
            Some(&spec.kind.to_string())
        );
    }
}

fn read_f32(file: &SafeTensors<'_>, key: &str) -> Vec<f32> {
    file.tensor(key)
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

/// The values land where PyTorch expects them: linear weights transposed, BN buffers and the
/// batch count in their own keys.
#[test]
fn values_are_in_pytorchs_layout() {
    let data = data();
    let spec = spec(ModelKind::LenetBn, NormKind::Scratch);
    let mut model = trained_a_little(&spec, 3, &data.train);
    let bytes = export(&model, &spec).unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();

    let Model::LeNet(lenet) = &model else {
        unreachable!()
    };
    let burn_fc1: Vec<f32> = lenet.fc1.weight.val().into_data().iter::<f32>().collect();
    let torch_fc1 = read_f32(&file, "9.weight");
    // Burn [in=256, out=120], PyTorch [out=120, in=256].
    for (i, j) in [(0, 0), (3, 7), (255, 119), (100, 50)] {
        assert_eq!(torch_fc1[j * 256 + i], burn_fc1[i * 120 + j], "({i}, {j})");
    }
    let burn_conv2: Vec<f32> = lenet.conv2.weight.val().into_data().iter::<f32>().collect();
    assert_eq!(read_f32(&file, "4.weight"), burn_conv2);

    let (_, NormLayer::Scratch(bn1)) = &model.norms_mut()[0] else {
        unreachable!()
    };
    let (mean, var) = bn1.running_stats().unwrap();
    assert_eq!(
        read_f32(&file, "1.running_mean"),
        mean.into_data().iter::<f32>().collect::<Vec<_>>()
    );
    assert_eq!(
        read_f32(&file, "1.running_var"),
        var.into_data().iter::<f32>().collect::<Vec<_>>()
    );
    assert_ne!(
        read_f32(&file, "1.running_mean"),
        vec![0.0; 6],
        "stats moved"
    );
    let count = file.tensor("13.num_batches_tracked").unwrap();
    assert_eq!(count.shape(), &[] as &[usize]);
    assert_eq!(i64::from_le_bytes(count.data().try_into().unwrap()), 1);
}

/// A file from the scratch layer loads into a model with Burn's built-in layer and computes the
/// same function (Burn's layer ignores the batch count).
#[test]
fn a_file_loads_into_either_batch_norm() {
    let data = data();
    let scratch = spec(ModelKind::LenetBn, NormKind::Scratch);
    let builtin = spec(ModelKind::LenetBn, NormKind::Burn);
    let model = trained_a_little(&scratch, 5, &data.train);
    let bytes = export(&model, &scratch).unwrap();
    let other = import(&bytes, &builtin).unwrap();
    let (a, b) = (
        logits(&model, &data.test, ModelKind::LenetBn),
        logits(&other, &data.test, ModelKind::LenetBn),
    );
    for (x, y) in a.iter().zip(&b) {
        // Two implementations of the same eval formula: float32 rounding apart.
        assert!((x - y).abs() < 1e-5 * (1.0 + x.abs()), "{a:?} vs {b:?}");
    }
}

type Tensors = Vec<(String, Dtype, Vec<usize>, Vec<u8>)>;

fn tensors_of(bytes: &[u8]) -> Tensors {
    let file = SafeTensors::deserialize(bytes).unwrap();
    let mut all: Tensors = file
        .tensors()
        .into_iter()
        .map(|(k, v)| (k, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    all.sort_by(|a, b| a.0.cmp(&b.0));
    all
}

fn serialize(tensors: &Tensors) -> Vec<u8> {
    let views = tensors
        .iter()
        .map(|(k, d, s, b)| (k.clone(), TensorView::new(*d, s.clone(), b).unwrap()));
    safetensors::serialize(views, None).unwrap()
}

/// A valid lenet-bn file and its spec.
fn lenet_bn_file() -> (ModelSpec, Vec<u8>) {
    let spec = spec(ModelKind::LenetBn, NormKind::Scratch);
    let bytes = export(&spec.init(2, &eval_device()), &spec).unwrap();
    (spec, bytes)
}

/// Writes `bytes` to a temp file, imports it, and returns the error message.
fn import_error(bytes: &[u8], spec: &ModelSpec) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("weights.safetensors");
    std::fs::write(&path, bytes).unwrap();
    let err = match import_file(&path, spec, &[]) {
        Ok(_) => panic!("imported a bad file"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err.starts_with(&format!("{}: ", path.display())),
        "names the file: {err}"
    );
    assert!(!err.contains('\n'), "one line: {err}");
    err
}

#[test]
fn float64_files_are_accepted() {
    let data = data();
    let (spec, bytes) = lenet_bn_file();
    let wide: Tensors = tensors_of(&bytes)
        .into_iter()
        .map(|(k, d, s, b)| match d {
            Dtype::F32 => {
                let b = b
                    .chunks_exact(4)
                    .flat_map(|c| (f32::from_le_bytes(c.try_into().unwrap()) as f64).to_le_bytes())
                    .collect();
                (k, Dtype::F64, s, b)
            }
            _ => (k, d, s, b),
        })
        .collect();
    let a = import(&bytes, &spec).unwrap();
    let b = import(&serialize(&wide), &spec).unwrap();
    assert_eq!(
        logits(&a, &data.test, spec.kind),
        logits(&b, &data.test, spec.kind)
    );
}

#[test]
fn missing_keys_are_listed() {
    let (spec, bytes) = lenet_bn_file();
    let mut t = tensors_of(&bytes);
    t.retain(|(k, ..)| k != "5.running_var" && k != "0.bias");
    let err = import_error(&serialize(&t), &spec);
    assert!(err.contains("missing keys 0.bias, 5.running_var"), "{err}");
    assert!(!err.contains("unexpected"), "{err}");
}

#[test]
fn unexpected_keys_are_listed() {
    let (spec, bytes) = lenet_bn_file();
    let mut t = tensors_of(&bytes);
    // What nn.DataParallel's state_dict would hold for the first conv.
    for (k, ..) in t.iter_mut().filter(|(k, ..)| k.starts_with("0.")) {
        *k = format!("module.{k}");
    }
    let err = import_error(&serialize(&t), &spec);
    assert!(err.contains("missing keys 0.weight, 0.bias"), "{err}");
    assert!(
        err.contains(
            "unexpected keys module.0.bias (closest: 0.bias), module.0.weight (closest: 0.weight)"
        ),
        "{err}"
    );
    assert!(err.contains("lenet-bn"), "{err}");
}

#[test]
fn long_key_lists_are_cut_short() {
    // A ResNet file given for LeNet: 127 unexpected keys in one line.
    let resnet = spec(ModelKind::Resnet18, NormKind::Scratch);
    let bytes = export(&resnet.init(0, &eval_device()), &resnet).unwrap();
    let err = import_error(&bytes, &spec(ModelKind::LenetBn, NormKind::Scratch));
    assert!(err.contains(" more"), "{err}");
    assert!(err.len() < 1000, "{err}");
}

#[test]
fn a_wrong_shape_names_the_key_and_both_shapes() {
    let (spec, bytes) = lenet_bn_file();
    let mut t = tensors_of(&bytes);
    let conv = t.iter_mut().find(|(k, ..)| k == "0.weight").unwrap();
    conv.2 = vec![6, 1, 3, 3];
    conv.3.truncate(6 * 9 * 4);
    let err = import_error(&serialize(&t), &spec);
    assert!(
        err.contains("0.weight: shape [6,1,3,3] expected [6,1,5,5]"),
        "{err}"
    );
    // A transposed linear weight (a file that forgot the [out, in] layout).
    let mut t = tensors_of(&bytes);
    let fc = t.iter_mut().find(|(k, ..)| k == "15.weight").unwrap();
    fc.2 = vec![84, 10];
    let err = import_error(&serialize(&t), &spec);
    assert!(
        err.contains("15.weight: shape [84,10] expected [10,84]"),
        "{err}"
    );
}

#[test]
fn a_wrong_dtype_names_the_key() {
    let (spec, bytes) = lenet_bn_file();
    let mut t = tensors_of(&bytes);
    let bias = t.iter_mut().find(|(k, ..)| k == "4.bias").unwrap();
    bias.1 = Dtype::F16;
    bias.3.truncate(16 * 2);
    let err = import_error(&serialize(&t), &spec);
    assert!(
        err.contains("4.bias: dtype F16, expected F32 or F64"),
        "{err}"
    );

    let mut t = tensors_of(&bytes);
    let count = t
        .iter_mut()
        .find(|(k, ..)| k == "1.num_batches_tracked")
        .unwrap();
    count.1 = Dtype::F32;
    count.3 = 3.0f32.to_le_bytes().to_vec();
    let err = import_error(&serialize(&t), &spec);
    assert!(
        err.contains("1.num_batches_tracked: dtype F32, expected I64"),
        "{err}"
    );
}

#[test]
fn corrupt_and_truncated_files_are_named() {
    let (lenet, bytes) = lenet_bn_file();
    for (what, bad) in [
        ("empty", Vec::new()),
        ("truncated", bytes[..bytes.len() - 100].to_vec()),
        ("header cut", bytes[..40].to_vec()),
        ("not safetensors", b"PK\x03\x04 a zip file, say".to_vec()),
    ] {
        let err = import_error(&bad, &lenet);
        assert!(err.contains("truncated or corrupt"), "{what}: {err}");
    }
    let err = import_error(&bytes, &spec(ModelKind::Resnet18, NormKind::Scratch));
    assert!(
        err.contains("not a state_dict of bnlab's resnet18"),
        "{err}"
    );
    let missing = Path::new("/nonexistent/weights.safetensors");
    let err = format!("{:#}", import_file(missing, &lenet, &[]).err().unwrap());
    assert!(
        err.starts_with("/nonexistent/weights.safetensors: cannot read"),
        "{err}"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Whatever the bytes, import returns: a model or an error, never a panic.
    #[test]
    fn damaged_files_never_panic(
        cut in 0usize..4000,
        flips in prop::collection::vec((0usize..4000, any::<u8>()), 0..6),
    ) {
        let (spec, bytes) = lenet_bn_file();
        let mut bad = bytes.clone();
        for (at, value) in flips {
            let at = at % bad.len();
            bad[at] = value;
        }
        bad.truncate(bytes.len().saturating_sub(cut));
        match import(&bad, &spec) {
            Ok(model) => {
                // Only flips in the data (or harmless header bytes) leave a loadable file.
                prop_assert_eq!(bad.len(), bytes.len());
                let logits: Tensor<2> = model.forward(Tensor::zeros([1, 1, 28, 28], &eval_device()));
                prop_assert_eq!(logits.dims(), [1, 10]);
            }
            Err(e) => {
                let text = e.to_string();
                prop_assert!(!text.contains('\n'));
                let known = matches!(
                    e,
                    TorchError::Corrupt(_) | TorchError::Mismatch { .. } | TorchError::Dtype { .. }
                );
                prop_assert!(known, "{}", text);
            }
        }
    }
}

/// `eval --weights` rebuilds the architecture from bnlab's metadata, and the flags win over it.
#[test]
fn the_architecture_comes_from_the_flags_then_the_metadata() {
    use bnlab::interop::torch::{config_for, Architecture, META_IMAGE_SIZE};
    use bnlab::norm::epilogue::{Activation, Pool};
    let mut spec = spec(ModelKind::LenetBn, NormKind::Scratch);
    spec.pool = Pool::Max(2);
    spec.activation = Activation::Relu;
    let model = spec.init(0, &eval_device());
    let extra = std::collections::BTreeMap::from([(META_IMAGE_SIZE.to_string(), "32".into())]);
    let bytes = export_with_metadata(&model, &spec, Layout::D2l, &extra).unwrap();
    let meta = metadata(&bytes).unwrap();

    let config = config_for(&meta, Architecture::default());
    assert_eq!(config.model, ModelKind::LenetBn);
    assert_eq!(config.norm, Some(NormKind::Scratch.into()));
    assert_eq!(
        (config.pool, config.activation),
        (Some(Pool::Max(2)), Some(Activation::Relu))
    );
    assert_eq!(config.resize, Some(32));
    assert_eq!(config.model_spec().pool, spec.pool);

    let given = Architecture {
        activation: Some(Activation::Sigmoid),
        resize: Some(28),
        ..Default::default()
    };
    let config = config_for(&meta, given);
    assert_eq!(config.activation, Some(Activation::Sigmoid));
    assert_eq!(config.resize, None, "28 is the images' own size");
    // A file from elsewhere says nothing: the defaults.
    let config = config_for(&Default::default(), Architecture::default());
    assert_eq!(
        (config.model, config.norm, config.pool),
        (ModelKind::LenetBn, None, None)
    );
}
