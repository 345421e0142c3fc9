//! PyTorch `state_dict`s in and out: written as safetensors, read from safetensors or
//! `torch.save` files ([`super::state_dict`]).
//!
//! [`export`] writes a model's weights under the names PyTorch gives the same architecture;
//! [`import`] reads such a file back into a bnlab [`Model`]. The PyTorch side of each model is
//! the d2l chapter's `nn.Sequential` (for ResNet-18 and DenseNet the definitions in
//! `shared/bench/torch_bench.py`, mirrored in `tools/torch_crosscheck.py`; the key list
//! of every model is checked against PyTorch in `tests/torch_interop.rs`):
//!
//! | model | keys |
//! | --- | --- |
//! | `lenet-bn` | conv `0`, bn `1`, conv `4`, bn `5`, linear `9`, bn `10`, linear `12`, bn `13`, linear `15` |
//! | `lenet` | conv `0`, conv `3`, linear `7`, linear `9`, linear `11` |
//! | `lenet-gluon` | conv `0`, bn `1`, conv `4`, bn `5`, linear `9`, linear `11` |
//! | `resnet18` | stem conv `0.0`, bn `0.1`; block `j` of stage `s` (1..=4) `s.j.conv1`, `s.j.bn1`, `s.j.conv2`, `s.j.bn2`, shortcut `s.0.conv3` (s ≥ 2); linear `7` |
//! | `densenet` | stem conv `0.0`, bn `0.1`; dense block `b` (1, 3, 5, 7) layer `i`: bn `b.net.i.0`, conv `b.net.i.2`; transition `t` (2, 4, 6): bn `t.0`, conv `t.2`; bn `8`; linear `12` |
//!
//! That is [`Layout::D2l`]. [`Layout::Notebook`] names the layers as the chapter notebooks'
//! own ResNet-18 and DenseNet do (named children: `resnet_block1.0.conv1`,
//! `DenseBlosk_0.net.0.0`, `fc.1`); each model's file maps its d2l keys to those
//! (`Network::notebook_key`). An import finds the layout from the file's keys.
//!
//! Each conv and linear has `.weight` and `.bias`; each batch norm `.weight` (gamma), `.bias`
//! (beta), `.running_mean`, `.running_var` and `.num_batches_tracked`. A model built without batch
//! norm (`--norm none`) leaves its BN layers out of the Sequential, as d2l's plain LeNet does, so
//! the indices after them shift (this is how `lenet` gets its keys).
//!
//! Layouts: conv weights are `[out, in, kh, kw]` in both; Burn's linear weight is `[in, out]`
//! and PyTorch's `[out, in]`, so it is transposed both ways. Floats are written as F32 and read
//! from F32 or F64. `num_batches_tracked` is an I64 scalar in PyTorch; bnlab's own layer keeps
//! it as a float, Burn's built-in layer keeps none (it is written as 0 and ignored on import).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use anyhow::Context;
use burn::module::{Module, Param, RunningState};
use burn::tensor::{Tensor, TensorData};
use safetensors::tensor::{Dtype, TensorView};

pub use super::state_dict::{metadata, ShapeMismatch, TorchError, META_KEY};
use super::state_dict::{FileTensor, Rename, StateDict};
use crate::choice::Choice;

use crate::config::RunConfig;
use crate::models::{LayerMut, Model, ModelKind, ModelSpec, NamedLayer};
use crate::norm::epilogue::{Activation, Pool};
use crate::norm::NormLayer;
use crate::norm::{NormKind, NormName};

/// The network, as `--model` names it (`lenet-bn`).
pub const META_MODEL: &str = "model";
/// The batch-norm implementation, as `--norm` names it (`none` for a model without BN).
pub const META_NORM: &str = "norm";
/// Metadata key: `false` where the norm layers have no γ and β (`--freeze-affine`).
pub const META_AFFINE: &str = "norm_affine";
/// The BN layers' ε, in decimal (`--bn-eps`).
pub const META_EPS: &str = "bn_eps";
/// The pool after each conv block of the d2l LeNets, as `--pool` writes it (`avg`, `max`).
/// Written for every model; [`config_for`] reads it only for `lenet` and `lenet-bn`.
pub const META_POOL: &str = "pool";
/// The activation of the d2l LeNets, as `--activation` names it (`sigmoid`, `relu`).
/// Written for every model; [`config_for`] reads it only for `lenet` and `lenet-bn`.
pub const META_ACTIVATION: &str = "activation";
/// The image side the model was trained on, in decimal. Not among the fields [`export`]
/// writes: a caller adds it with [`export_with_metadata`] (`bnlab export` does); a file
/// without it is read as 28.
pub const META_IMAGE_SIZE: &str = "image_size";

/// The key layout the file was written in, as `--layout` names it. Written for every model.
pub const META_LAYOUT: &str = "layout";

crate::choice_enum! {
    /// Which PyTorch definition of a network the state_dict's keys are those of.
    pub enum Layout {
        /// d2l's `nn.Sequential` definitions, keyed by index (`0.0.weight`, `1.0.conv1.weight`).
        D2l = "d2l",
        /// The chapter notebooks' own definitions of ResNet-18 and DenseNet, which name their
        /// children (`resnet_block1.0.conv1.weight`, `DenseBlosk_0.net.0.0.weight`); for the
        /// LeNets the same as `d2l`.
        Notebook = "notebook",
    }
}

impl Layout {
    /// The layouts `kind`'s state_dict can be in: `d2l`, and `notebook` where it differs.
    pub fn of(kind: ModelKind) -> Vec<Layout> {
        match kind.notebook_key("0").is_some() {
            true => vec![Layout::D2l, Layout::Notebook],
            false => vec![Layout::D2l],
        }
    }

    /// A layer's key prefix in this layout, from its d2l key.
    fn key(self, kind: ModelKind, d2l: &str) -> String {
        match self {
            Layout::D2l => d2l.to_string(),
            Layout::Notebook => kind.notebook_key(d2l).unwrap_or_else(|| d2l.to_string()),
        }
    }
}

/// The model's key nearest to `key` by edit distance, among `candidates` (the first of
/// equals).
fn closest<'a>(key: &str, candidates: impl Iterator<Item = &'a str>) -> Option<String> {
    candidates
        .map(|c| (strsim::levenshtein(key, c), c))
        .min_by_key(|&(d, _)| d)
        .map(|(_, c)| c.to_string())
}

/// One tensor of the state_dict and where it lives in the Burn model.
enum Slot<'a> {
    Conv(&'a mut Param<Tensor<4>>),
    Vector(&'a mut Param<Tensor<1>>),
    /// Burn `[in, out]`, PyTorch `[out, in]`.
    LinearWeight(&'a mut Param<Tensor<2>>),
    Running(&'a mut RunningState<Tensor<1>>),
    /// bnlab's float counter; `None` for Burn's layer, which has no counter.
    Count(Option<&'a mut RunningState<Tensor<1>>>),
}

/// Every tensor of the state_dict of `kind`'s `model`, keyed by its PyTorch name in `layout`,
/// in PyTorch's order.
fn slots(model: &mut Model, kind: ModelKind, layout: Layout) -> Vec<(String, Slot<'_>)> {
    let mut out = Vec::new();
    for NamedLayer { torch, layer, .. } in model.layers().layers {
        let prefix = layout.key(kind, &torch);
        let key = |name: &str| format!("{prefix}.{name}");
        match layer {
            LayerMut::Conv(conv) => {
                out.push((key("weight"), Slot::Conv(&mut conv.weight)));
                if let Some(bias) = &mut conv.bias {
                    out.push((key("bias"), Slot::Vector(bias)));
                }
            }
            LayerMut::Linear(linear) => {
                out.push((key("weight"), Slot::LinearWeight(&mut linear.weight)));
                if let Some(bias) = &mut linear.bias {
                    out.push((key("bias"), Slot::Vector(bias)));
                }
            }
            LayerMut::Norm(Some(NormLayer::Scratch(bn))) => {
                if let Some(gamma) = &mut bn.gamma {
                    out.push((key("weight"), Slot::Vector(gamma)));
                }
                if let Some(beta) = &mut bn.beta {
                    out.push((key("bias"), Slot::Vector(beta)));
                }
                if let Some(mean) = &mut bn.running_mean {
                    out.push((key("running_mean"), Slot::Running(mean)));
                }
                if let Some(var) = &mut bn.running_var {
                    out.push((key("running_var"), Slot::Running(var)));
                }
                if let Some(count) = &mut bn.num_batches_tracked {
                    out.push((key("num_batches_tracked"), Slot::Count(Some(count))));
                }
            }
            LayerMut::Norm(Some(NormLayer::Burn(bn))) => {
                out.push((key("weight"), Slot::Vector(&mut bn.gamma)));
                out.push((key("bias"), Slot::Vector(&mut bn.beta)));
                out.push((key("running_mean"), Slot::Running(&mut bn.running_mean)));
                out.push((key("running_var"), Slot::Running(&mut bn.running_var)));
                out.push((key("num_batches_tracked"), Slot::Count(None)));
            }
            LayerMut::Norm(Some(NormLayer::Group(norm))) => {
                if let Some(gamma) = &mut norm.gamma {
                    out.push((key("weight"), Slot::Vector(gamma)));
                }
                if let Some(beta) = &mut norm.beta {
                    out.push((key("bias"), Slot::Vector(beta)));
                }
            }
            LayerMut::Norm(None) => {}
        }
    }
    out
}

/// A tensor as safetensors stores it: dtype, shape and little-endian bytes.
type Encoded = (Dtype, Vec<usize>, Vec<u8>);

impl Slot<'_> {
    /// The shape PyTorch gives this tensor.
    fn torch_shape(&self) -> Vec<usize> {
        match self {
            Slot::Conv(p) => p.val().dims().to_vec(),
            Slot::Vector(p) => p.val().dims().to_vec(),
            Slot::LinearWeight(p) => {
                let [d_in, d_out] = p.val().dims();
                vec![d_out, d_in]
            }
            Slot::Running(s) => s.value().dims().to_vec(),
            Slot::Count(_) => Vec::new(),
        }
    }

    fn is_count(&self) -> bool {
        matches!(self, Slot::Count(_))
    }

    /// The tensor in PyTorch's layout.
    fn export(&self) -> Encoded {
        let floats = |data: TensorData| -> Vec<u8> {
            data.iter::<f32>().flat_map(f32::to_le_bytes).collect()
        };
        let shape = self.torch_shape();
        match self {
            Slot::Conv(p) => (Dtype::F32, shape, floats(p.val().into_data())),
            Slot::Vector(p) => (Dtype::F32, shape, floats(p.val().into_data())),
            Slot::LinearWeight(p) => (Dtype::F32, shape, floats(p.val().transpose().into_data())),
            Slot::Running(s) => (Dtype::F32, shape, floats(s.value_sync().into_data())),
            Slot::Count(count) => {
                let n = count.as_ref().map_or(0.0, |c| {
                    c.value_sync()
                        .into_data()
                        .iter::<f64>()
                        .next()
                        .unwrap_or(0.0)
                });
                (Dtype::I64, shape, (n.round() as i64).to_le_bytes().to_vec())
            }
        }
    }

    /// Whether the file's tensor, of the slot's shape, has a dtype the slot takes.
    fn check_dtype(&self, key: &str, tensor: &FileTensor) -> Result<(), TorchError> {
        let dtype_error = |expected, fix| TorchError::Dtype {
            key: key.to_string(),
            found: format!("{:?}", tensor.dtype),
            expected,
            fix,
        };
        if self.is_count() {
            if tensor.dtype != Dtype::I64 {
                return Err(dtype_error(
                    "I64",
                    "PyTorch saves num_batches_tracked as int64: do not convert it",
                ));
            }
        } else if !matches!(tensor.dtype, Dtype::F32 | Dtype::F64) {
            return Err(dtype_error(
                "F32 or F64",
                "convert the weights with model.float() before saving",
            ));
        }
        let size = if tensor.dtype == Dtype::F32 { 4 } else { 8 };
        let count: usize = tensor.shape.iter().product();
        if tensor.bytes.len() != count * size {
            return Err(TorchError::Corrupt(format!(
                "{key}: {} bytes for {count} values",
                tensor.bytes.len()
            )));
        }
        Ok(())
    }

    /// Stores a tensor that passed [`Self::check_dtype`].
    fn store(self, tensor: &FileTensor) {
        let shape = self.torch_shape();
        let floats = || -> Vec<f32> {
            match tensor.dtype {
                Dtype::F64 => tensor
                    .bytes
                    .chunks_exact(8)
                    .map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")) as f32)
                    .collect(),
                _ => tensor
                    .bytes
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
                    .collect(),
            }
        };
        match self {
            Slot::Conv(p) => {
                let device = p.val().device();
                let value = Tensor::from_data(TensorData::new(floats(), shape), &device);
                replace_param(p, value);
            }
            Slot::Vector(p) => {
                let device = p.val().device();
                let value = Tensor::from_data(TensorData::new(floats(), shape), &device);
                replace_param(p, value);
            }
            Slot::LinearWeight(p) => {
                // Transposed here rather than with `Tensor::transpose`, whose strided result
                // makes the matmul round differently from a model that never left Burn.
                let (d_out, d_in) = (shape[0], shape[1]);
                let torch = floats();
                let burn: Vec<f32> = (0..d_in * d_out)
                    .map(|k| torch[(k % d_out) * d_in + k / d_out])
                    .collect();
                let device = p.val().device();
                let value = Tensor::from_data(TensorData::new(burn, [d_in, d_out]), &device);
                replace_param(p, value);
            }
            Slot::Running(s) => {
                let device = s.value().device();
                let value = Tensor::from_data(TensorData::new(floats(), shape), &device);
                *s = RunningState::new(value);
            }
            Slot::Count(Some(s)) => {
                let count = tensor.bytes[..].try_into().map_or(0, i64::from_le_bytes);
                let device = s.value().device();
                *s = RunningState::new(Tensor::from_data(
                    TensorData::new(vec![count as f32], [1]),
                    &device,
                ));
            }
            // Burn's layer has no counter to restore.
            Slot::Count(None) => {}
        }
    }
}

/// Replaces a parameter's value, keeping its id and whether it trains.
fn replace_param<const D: usize>(param: &mut Param<Tensor<D>>, value: Tensor<D>) {
    // Cloning a Param copies a handle, not the tensor.
    *param = param.clone().map(|_| value);
}

/// The state_dict keys of `spec`'s model in `layout` and their PyTorch shapes, in PyTorch's
/// order.
pub fn state_dict_keys(spec: &ModelSpec, layout: Layout) -> Vec<(String, Vec<usize>)> {
    let mut model = spec.init(0, &crate::device::inference_device());
    slots(&mut model, spec.kind, layout)
        .into_iter()
        .map(|(key, slot)| {
            let shape = slot.torch_shape();
            (key, shape)
        })
        .collect()
}

/// The metadata bnlab writes: what a tool needs to rebuild the PyTorch model.
fn spec_metadata(spec: &ModelSpec) -> BTreeMap<String, String> {
    BTreeMap::from([
        (META_MODEL.to_string(), spec.kind.to_string()),
        (META_NORM.to_string(), spec.norm.name().to_string()),
        (META_AFFINE.to_string(), spec.norm.affine.to_string()),
        (META_EPS.to_string(), spec.norm.eps.to_string()),
        (META_POOL.to_string(), spec.pool.to_string()),
        (META_ACTIVATION.to_string(), spec.activation.to_string()),
    ])
}

/// `model` as a safetensors file holding the PyTorch state_dict of the same architecture, in
/// d2l's layout.
pub fn export(model: &Model, spec: &ModelSpec) -> anyhow::Result<Vec<u8>> {
    export_with_metadata(model, spec, Layout::D2l, &BTreeMap::new())
}

/// [`export`] in `layout`, with extra metadata fields (such as [`META_IMAGE_SIZE`]).
pub fn export_with_metadata(
    model: &Model,
    spec: &ModelSpec,
    layout: Layout,
    extra: &BTreeMap<String, String>,
) -> anyhow::Result<Vec<u8>> {
    // `valid()` merges running-statistic updates still pending on any thread (Burn's
    // RunningState keeps them per thread until read) and copies handles, not weights.
    let mut model = model.valid();
    let tensors: Vec<(String, Encoded)> = slots(&mut model, spec.kind, layout)
        .into_iter()
        .map(|(key, slot)| (key, slot.export()))
        .collect();
    let views = tensors
        .iter()
        .map(|(key, (dtype, shape, bytes))| {
            TensorView::new(*dtype, shape.clone(), bytes)
                .map(|view| (key.clone(), view))
                .map_err(|e| anyhow::anyhow!("{key}: cannot encode: {e}"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut fields = spec_metadata(spec);
    fields.insert(META_LAYOUT.to_string(), layout.to_string());
    fields.extend(extra.iter().map(|(k, v)| (k.clone(), v.clone())));
    let json = serde_json::to_string(&fields).expect("a map of strings serializes");
    safetensors::serialize(views, Some(HashMap::from([(META_KEY.to_string(), json)])))
        .map_err(|e| anyhow::anyhow!("cannot encode the state_dict: {e}"))
}

/// Writes [`export`]'s file to `path` atomically, through the one output function that refuses
/// devices, FIFOs, links and directories, and an existing file unless `replace`.
pub fn export_file(
    model: &Model,
    spec: &ModelSpec,
    path: &Path,
    replace: bool,
) -> anyhow::Result<()> {
    let bytes = export(model, spec).with_context(|| format!("{}", path.display()))?;
    crate::report::output::write_file(
        path,
        &bytes,
        crate::report::output::Existing::replace_if(replace),
    )
    .with_context(|| format!("{}: cannot write", path.display()))
}

/// A model of `spec`'s architecture with the weights of a PyTorch state_dict in safetensors
/// form, on the evaluation device. Keys must match exactly, as `load_state_dict(strict=True)`.
pub fn import(bytes: &[u8], spec: &ModelSpec) -> Result<Model, TorchError> {
    import_state_dict(&StateDict::from_safetensors(bytes)?, spec)
}

/// A model of `spec`'s architecture with the weights of `dict`, on the evaluation device. As
/// `load_state_dict(strict=True)`: every key of the model must be in the file with its shape,
/// and the file must hold no other; all that differs is listed, and nothing is loaded then.
/// The layout is the one whose keys the file's are (for an error, the nearer one).
pub fn import_state_dict(dict: &StateDict, spec: &ModelSpec) -> Result<Model, TorchError> {
    let mut nearest: Option<TorchError> = None;
    let mut model = spec.init(0, &crate::device::inference_device());
    for layout in Layout::of(spec.kind) {
        let wanted = slots(&mut model, spec.kind, layout);
        match mismatch(dict, spec.kind, &wanted) {
            None => {
                // Check every tensor before storing any, so that the error reported is the
                // first in PyTorch's key order.
                for (key, slot) in &wanted {
                    slot.check_dtype(key, &dict.tensors[key])?;
                }
                for (key, slot) in wanted {
                    slot.store(&dict.tensors[&key]);
                }
                return Ok(model);
            }
            Some(err) => {
                if nearest
                    .as_ref()
                    .is_none_or(|n| differences(&err) < differences(n))
                {
                    nearest = Some(err);
                }
            }
        }
    }
    Err(nearest.expect("every model has a layout"))
}

fn differences(err: &TorchError) -> usize {
    match err {
        TorchError::Mismatch {
            missing,
            unexpected,
            shapes,
            ..
        } => missing.len() + unexpected.len() + shapes.len(),
        _ => 0,
    }
}

/// What keeps `dict` from being the state_dict whose tensors are `wanted`, if anything.
fn mismatch(
    dict: &StateDict,
    kind: ModelKind,
    wanted: &[(String, Slot<'_>)],
) -> Option<TorchError> {
    let want_keys: BTreeSet<&str> = wanted.iter().map(|(k, _)| k.as_str()).collect();
    let missing: Vec<String> = wanted
        .iter()
        .filter(|(k, _)| !dict.tensors.contains_key(k))
        .map(|(k, _)| k.clone())
        .collect();
    // The closest key among those the file lacks, if it lacks any: a renamed key's own.
    let candidates: Vec<&str> = match missing.is_empty() {
        true => want_keys.iter().copied().collect(),
        false => missing.iter().map(String::as_str).collect(),
    };
    let unexpected: Vec<(String, Option<String>)> = dict
        .tensors
        .keys()
        .filter(|k| !want_keys.contains(k.as_str()))
        .map(|k| (k.clone(), closest(k, candidates.iter().copied())))
        .collect();
    let shapes: Vec<ShapeMismatch> = wanted
        .iter()
        .filter_map(|(key, slot)| {
            let tensor = dict.tensors.get(key)?;
            let expected = slot.torch_shape();
            (tensor.shape != expected).then(|| ShapeMismatch {
                key: key.clone(),
                found: tensor.shape.clone(),
                expected,
            })
        })
        .collect();
    let fits = missing.is_empty() && unexpected.is_empty() && shapes.is_empty();
    (!fits).then(|| TorchError::Mismatch {
        model: kind.to_string(),
        missing,
        unexpected,
        shapes,
    })
}

/// [`import_state_dict`] from a file of either format, its keys renamed first; errors name
/// the file.
pub fn import_file(path: &Path, spec: &ModelSpec, renames: &[Rename]) -> anyhow::Result<Model> {
    let dict = StateDict::read(path)
        .and_then(|d| d.renamed(renames))
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    import_state_dict(&dict, spec).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// How far a state_dict is from one model's: what `load_state_dict(strict=True)` would list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fit {
    /// The model, as `--model` names it.
    pub model: ModelKind,
    /// Whether its batch-norm layers are in (`--norm none` leaves them out).
    pub batch_norm: bool,
    /// The key layout.
    pub layout: Layout,
    /// The model's keys the file lacks.
    pub missing: usize,
    /// The file's keys the model lacks.
    pub unexpected: usize,
    /// Keys of both with another shape.
    pub shapes: usize,
    /// The three together.
    pub differences: usize,
}

impl std::fmt::Display for Fit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "--model {}", self.model)?;
        if !self.batch_norm {
            write!(f, " --norm none")?;
        }
        if Layout::of(self.model).len() > 1 {
            write!(f, " (layout {})", self.layout)?;
        }
        Ok(())
    }
}

/// Every bnlab model, with and without batch norm, in each of its layouts, by how far `dict`
/// is from its state_dict, nearest first (the models' order among equals).
pub fn fitting_models(dict: &StateDict) -> Vec<Fit> {
    let mut fits: Vec<Fit> = Vec::new();
    for &model in ModelKind::ALL {
        for norm in [NormKind::Scratch, NormKind::None] {
            let batch_norm = norm != NormKind::None;
            if !batch_norm && !model.has_batch_norm() {
                continue;
            }
            for layout in Layout::of(model) {
                let keys = state_dict_keys(&ModelSpec::of(model, norm), layout);
                let known: BTreeSet<&str> = keys.iter().map(|(k, _)| k.as_str()).collect();
                let missing = keys
                    .iter()
                    .filter(|(k, _)| !dict.tensors.contains_key(k))
                    .count();
                let unexpected = dict
                    .tensors
                    .keys()
                    .filter(|k| !known.contains(k.as_str()))
                    .count();
                let shapes = keys
                    .iter()
                    .filter(|(k, shape)| dict.tensors.get(k).is_some_and(|t| &t.shape != shape))
                    .count();
                let fit = Fit {
                    model,
                    batch_norm,
                    layout,
                    missing,
                    unexpected,
                    shapes,
                    differences: missing + unexpected + shapes,
                };
                // The same keys with and without BN (a model whose BN is its own choice) once.
                if !fits
                    .iter()
                    .any(|f| f.model == model && f.differences == 0 && fit.differences == 0)
                {
                    fits.push(fit);
                }
            }
        }
    }
    fits.sort_by_key(|f| f.differences);
    fits
}

/// What a state_dict alone does not say about its architecture, as the command line gives it
/// (`eval --weights FILE --model ...`); `None` leaves it to the file's metadata.
#[derive(Debug, Clone, Copy, Default)]
pub struct Architecture {
    /// The network.
    pub model: Option<ModelKind>,
    /// Its norm.
    pub norm: Option<NormName>,
    /// The LeNets' pool.
    pub pool: Option<Pool>,
    /// The LeNets' activation.
    pub activation: Option<Activation>,
    /// The image side it expects.
    pub resize: Option<usize>,
}

/// The run config that rebuilds a state_dict's model: what `given` says, then what bnlab wrote
/// in the file's metadata ([`metadata`]), then the defaults. Unreadable metadata values count
/// as absent; the config is not validated here.
pub fn config_for(meta: &BTreeMap<String, String>, given: Architecture) -> RunConfig {
    fn parse<T: std::str::FromStr>(meta: &BTreeMap<String, String>, key: &str) -> Option<T> {
        meta.get(key).and_then(|v| v.parse().ok())
    }
    let mut config = RunConfig::default();
    config.model = given
        .model
        .or(parse(meta, META_MODEL))
        .unwrap_or(config.model);
    config.norm = given.norm.or(parse(meta, META_NORM));
    config.freeze_affine = parse(meta, META_AFFINE) == Some(false);
    if config.model.has_lenet_blocks() {
        config.pool = given.pool.or(parse(meta, META_POOL));
        config.activation = given.activation.or(parse(meta, META_ACTIVATION));
    }
    if let Some(eps) = parse(meta, META_EPS) {
        config.bn_eps = eps;
    }
    let size = given.resize.or(parse(meta, META_IMAGE_SIZE));
    config.resize = size.filter(|&s| s != 28);
    config
}
