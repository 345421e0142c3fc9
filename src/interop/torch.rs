//! PyTorch `state_dict`s as safetensors files, in and out.
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
use safetensors::SafeTensors;

use crate::config::RunConfig;
use crate::models::{LayerMut, Model, ModelKind, ModelSpec, NamedLayer};
use crate::norm::epilogue::{Activation, Pool};
use crate::norm::NormKind;
use crate::norm::NormLayer;

/// The one `__metadata__` key bnlab writes: a JSON object of the fields below, for tools
/// that rebuild the model. One key, because safetensors writes several in hash order and the
/// same model should give the same bytes.
pub const META_KEY: &str = "bnlab";
/// The network, as `--model` names it (`lenet-bn`).
pub const META_MODEL: &str = "model";
/// The batch-norm implementation, as `--norm` names it (`none` for a model without BN).
pub const META_NORM: &str = "norm";
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

/// How many key names an error lists before it says "and N more".
const LISTED_KEYS: usize = 8;

/// What is wrong with a state_dict file. Each message is one line naming the key, and the
/// caller prefixes the file ([`import_file`] does).
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum TorchError {
    /// The bytes are not a readable safetensors file; holds safetensors' own message.
    #[error(
        "not a safetensors file, or truncated or corrupt ({0}); write one with \
         safetensors.torch.save_file(model.state_dict(), PATH)"
    )]
    Corrupt(String),
    /// The file's keys are not exactly those of the model's state_dict.
    #[error("{}", keys_message(.model, .missing, .unexpected))]
    Keys {
        /// The expected architecture, as `--model` names it.
        model: String,
        /// Keys of the model that the file lacks, in PyTorch's order.
        missing: Vec<String>,
        /// Keys of the file that the model lacks, sorted.
        unexpected: Vec<String>,
    },
    /// A tensor of the file has another shape than the model's.
    #[error(
        "{key}: shape {} expected {} (a state_dict of another architecture: check --model)",
        shape_text(.found),
        shape_text(.expected)
    )]
    Shape {
        /// The tensor's state_dict key.
        key: String,
        /// Its shape in the file.
        found: Vec<usize>,
        /// Its shape in the model, in PyTorch's layout.
        expected: Vec<usize>,
    },
    /// A tensor of the file has a dtype its slot cannot take: weights and running statistics
    /// must be F32 or F64, `num_batches_tracked` I64.
    #[error("{key}: dtype {found}, expected {expected} ({fix})")]
    Dtype {
        /// The tensor's state_dict key.
        key: String,
        /// Its dtype in the file, as safetensors names it (`F16`).
        found: String,
        /// The dtypes the slot takes (`F32 or F64`, `I64`).
        expected: &'static str,
        /// How to save the file so that it loads.
        fix: &'static str,
    },
}

fn shape_text(shape: &[usize]) -> String {
    let dims: Vec<String> = shape.iter().map(usize::to_string).collect();
    format!("[{}]", dims.join(","))
}

fn key_list(keys: &[String]) -> String {
    let mut text = keys
        .iter()
        .take(LISTED_KEYS)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if keys.len() > LISTED_KEYS {
        text.push_str(&format!(" and {} more", keys.len() - LISTED_KEYS));
    }
    text
}

fn keys_message(model: &str, missing: &[String], unexpected: &[String]) -> String {
    let mut parts = Vec::new();
    if !missing.is_empty() {
        parts.push(format!("missing keys {}", key_list(missing)));
    }
    if !unexpected.is_empty() {
        parts.push(format!("unexpected keys {}", key_list(unexpected)));
    }
    format!(
        "not a state_dict of bnlab's {model}: {} (check --model and --norm; keys must be \
         exactly those of model.state_dict(), with no prefix such as `module.`)",
        parts.join("; ")
    )
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

/// Every tensor of the state_dict, keyed by its PyTorch name, in PyTorch's order.
fn slots(model: &mut Model) -> Vec<(String, Slot<'_>)> {
    let mut out = Vec::new();
    for NamedLayer { torch, layer, .. } in model.layers().layers {
        let key = |name: &str| format!("{torch}.{name}");
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

    /// Whether the file's tensor can go into this slot: dtype, then shape.
    fn check(&self, key: &str, view: &TensorView<'_>) -> Result<(), TorchError> {
        let dtype_error = |expected, fix| TorchError::Dtype {
            key: key.to_string(),
            found: format!("{:?}", view.dtype()),
            expected,
            fix,
        };
        if self.is_count() {
            if view.dtype() != Dtype::I64 {
                return Err(dtype_error(
                    "I64",
                    "PyTorch saves num_batches_tracked as int64: do not convert it",
                ));
            }
        } else if !matches!(view.dtype(), Dtype::F32 | Dtype::F64) {
            return Err(dtype_error(
                "F32 or F64",
                "convert the weights with model.float() before saving",
            ));
        }
        let expected = self.torch_shape();
        if view.shape() != expected.as_slice() {
            return Err(TorchError::Shape {
                key: key.to_string(),
                found: view.shape().to_vec(),
                expected,
            });
        }
        Ok(())
    }

    /// Stores a tensor that passed [`Self::check`].
    fn store(self, view: &TensorView<'_>) {
        let shape = self.torch_shape();
        // Safetensors has checked that the byte count matches dtype and shape.
        let floats = || -> Vec<f32> {
            match view.dtype() {
                Dtype::F64 => view
                    .data()
                    .chunks_exact(8)
                    .map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")) as f32)
                    .collect(),
                _ => view
                    .data()
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
                let count = view.data().try_into().map_or(0, i64::from_le_bytes);
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

/// The state_dict keys of `spec`'s model and their PyTorch shapes, in PyTorch's order.
pub fn state_dict_keys(spec: &ModelSpec) -> Vec<(String, Vec<usize>)> {
    let mut model = spec.init(0, &crate::device::inference_device());
    slots(&mut model)
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
        (META_NORM.to_string(), spec.norm.kind.to_string()),
        (META_EPS.to_string(), spec.norm.eps.to_string()),
        (META_POOL.to_string(), spec.pool.to_string()),
        (META_ACTIVATION.to_string(), spec.activation.to_string()),
    ])
}

/// `model` as a safetensors file holding the PyTorch state_dict of the same architecture.
pub fn export(model: &Model, spec: &ModelSpec) -> anyhow::Result<Vec<u8>> {
    export_with_metadata(model, spec, &BTreeMap::new())
}

/// [`export`] with extra metadata fields (such as [`META_IMAGE_SIZE`]).
pub fn export_with_metadata(
    model: &Model,
    spec: &ModelSpec,
    extra: &BTreeMap<String, String>,
) -> anyhow::Result<Vec<u8>> {
    // `valid()` merges running-statistic updates still pending on any thread (Burn's
    // RunningState keeps them per thread until read) and copies handles, not weights.
    let mut model = model.valid();
    let tensors: Vec<(String, Encoded)> = slots(&mut model)
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
    let file = SafeTensors::deserialize(bytes).map_err(|e| TorchError::Corrupt(e.to_string()))?;
    let mut model = spec.init(0, &crate::device::inference_device());
    let wanted = slots(&mut model);

    let file_keys: BTreeSet<&str> = file.names().into_iter().collect();
    let want_keys: BTreeSet<&str> = wanted.iter().map(|(k, _)| k.as_str()).collect();
    let missing: Vec<String> = wanted
        .iter()
        .filter(|(k, _)| !file_keys.contains(k.as_str()))
        .map(|(k, _)| k.clone())
        .collect();
    let unexpected: Vec<String> = file_keys
        .difference(&want_keys)
        .map(|k| k.to_string())
        .collect();
    if !missing.is_empty() || !unexpected.is_empty() {
        return Err(TorchError::Keys {
            model: spec.kind.to_string(),
            missing,
            unexpected,
        });
    }

    // Check every tensor before storing any, so that the error reported is the first in
    // PyTorch's key order.
    let mut views = Vec::with_capacity(wanted.len());
    for (key, slot) in &wanted {
        let view = file
            .tensor(key)
            .map_err(|e| TorchError::Corrupt(e.to_string()))?;
        slot.check(key, &view)?;
        views.push(view);
    }
    for ((_, slot), view) in wanted.into_iter().zip(&views) {
        slot.store(view);
    }
    Ok(model)
}

/// [`import`] from a file; errors name it.
pub fn import_file(path: &Path, spec: &ModelSpec) -> anyhow::Result<Model> {
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    import(&bytes, spec).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// The fields bnlab wrote in a file's metadata (empty for a file from elsewhere).
pub fn metadata(bytes: &[u8]) -> Result<BTreeMap<String, String>, TorchError> {
    let (_, meta) =
        SafeTensors::read_metadata(bytes).map_err(|e| TorchError::Corrupt(e.to_string()))?;
    let json = meta.metadata().as_ref().and_then(|m| m.get(META_KEY));
    Ok(json
        .and_then(|j| serde_json::from_str(j).ok())
        .unwrap_or_default())
}

/// What a state_dict alone does not say about its architecture, as the command line gives it
/// (`eval --weights FILE --model ...`); `None` leaves it to the file's metadata.
#[derive(Debug, Clone, Copy, Default)]
pub struct Architecture {
    /// The network.
    pub model: Option<ModelKind>,
    /// Its batch norm.
    pub norm: Option<NormKind>,
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
