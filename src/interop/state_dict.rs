//! A state_dict file as read, before it meets a model: its tensors by key, each with its dtype,
//! shape and little-endian bytes.
//!
//! Two formats, told apart by their first bytes, not by the file's name:
//! - safetensors: bnlab's own exports, and `safetensors.torch.save_file(net.state_dict(), PATH)`;
//! - PyTorch's own `torch.save(net.state_dict(), PATH)` (`.pt`, `.pth`, d2l's `.params`): the
//!   zip format of PyTorch 1.6 and later and the legacy pickle stream before it, read without
//!   Python by burn-store's PyTorch reader (`burn_store::pytorch_reader`). A whole pickled
//!   module (`torch.save(net)`) is read as its state_dict by that reader.
//!
//! Keys can be renamed on the way in (`--rename 'REGEX=REPLACEMENT'`): the patterns are
//! burn-store's [`KeyRemapper`]'s, applied in order to every key as it applies them.
//!
//! What stays hand-written, in `torch.rs`: matching the keys to a model's layers. burn-store's
//! `PytorchStore::apply_to` matches tensors to a Burn module by its Burn field paths through its
//! PyTorch-to-Burn adapter; bnlab's models declare their PyTorch names once
//! ([`crate::models`]), one model's names differ by layout, and bnlab's BN layer keeps a
//! `num_batches_tracked` counter that Burn's has no field for.

use std::collections::BTreeMap;
use std::path::Path;

use burn_store::pytorch_reader::{DType as TorchDType, PytorchReader};
use burn_store::KeyRemapper;
use safetensors::tensor::Dtype;
use safetensors::SafeTensors;

/// The one `__metadata__` key bnlab writes: a JSON object of the fields `torch::META_*`, for tools
/// that rebuild the model. One key, because safetensors writes several in hash order and the
/// same model should give the same bytes.
pub const META_KEY: &str = "bnlab";

/// How many key names an error lists before it says "and N more".
const LISTED_KEYS: usize = 8;

/// What is wrong with a state_dict file. Each message is one line naming the key, and the
/// caller prefixes the file (`torch::import_file` does).
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum TorchError {
    /// The file cannot be read at all; holds the system's message.
    #[error("cannot read: {0}")]
    Io(String),
    /// The bytes are not a readable safetensors file; holds safetensors' own message.
    #[error(
        "not a safetensors file, or truncated or corrupt ({0}); write one with \
         safetensors.torch.save_file(model.state_dict(), PATH)"
    )]
    Corrupt(String),
    /// The file is neither safetensors nor a `torch.save` file bnlab can read; holds the
    /// PyTorch reader's message.
    #[error(
        "neither safetensors nor a readable torch.save file, or truncated or corrupt ({0}); \
         save the weights with torch.save(net.state_dict(), PATH)"
    )]
    Torch(String),
    /// A `--rename` that cannot apply.
    #[error("{0}")]
    Rename(String),
    /// The file's keys or shapes are not those of the model's state_dict: everything PyTorch's
    /// `load_state_dict(strict=True)` would list, each list cut short.
    #[error("{}", mismatch_message(.model, .missing, .unexpected, .shapes))]
    Mismatch {
        /// The expected architecture, as `--model` names it.
        model: String,
        /// Keys of the model that the file lacks, in PyTorch's order.
        missing: Vec<String>,
        /// Keys of the file that the model lacks, sorted, each with the model's closest key.
        unexpected: Vec<(String, Option<String>)>,
        /// Tensors whose shape in the file differs from the model's (PyTorch's layout).
        shapes: Vec<ShapeMismatch>,
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

/// A tensor whose shape in the file is not the model's.
#[derive(Debug, Clone, PartialEq)]
pub struct ShapeMismatch {
    /// The tensor's state_dict key.
    pub key: String,
    /// Its shape in the file.
    pub found: Vec<usize>,
    /// Its shape in the model, in PyTorch's layout.
    pub expected: Vec<usize>,
}

fn shape_text(shape: &[usize]) -> String {
    let dims: Vec<String> = shape.iter().map(usize::to_string).collect();
    format!("[{}]", dims.join(","))
}

fn cut_short(items: Vec<String>) -> String {
    let mut text = items
        .iter()
        .take(LISTED_KEYS)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if items.len() > LISTED_KEYS {
        text.push_str(&format!(" and {} more", items.len() - LISTED_KEYS));
    }
    text
}

fn mismatch_message(
    model: &str,
    missing: &[String],
    unexpected: &[(String, Option<String>)],
    shapes: &[ShapeMismatch],
) -> String {
    let mut parts = Vec::new();
    if !missing.is_empty() {
        parts.push(format!("missing keys {}", cut_short(missing.to_vec())));
    }
    if !unexpected.is_empty() {
        let listed = unexpected
            .iter()
            .map(|(key, closest)| match closest {
                Some(c) => format!("{key} (closest: {c})"),
                None => key.clone(),
            })
            .collect();
        parts.push(format!("unexpected keys {}", cut_short(listed)));
    }
    if !shapes.is_empty() {
        let listed = shapes
            .iter()
            .map(|m| {
                format!(
                    "{}: shape {} expected {}",
                    m.key,
                    shape_text(&m.found),
                    shape_text(&m.expected)
                )
            })
            .collect();
        parts.push(format!("size mismatches {}", cut_short(listed)));
    }
    format!(
        "not a state_dict of bnlab's {model}: {} (check --model and --norm, or map the \
         file's keys with --rename 'REGEX=REPLACEMENT'; keys must be exactly those of \
         model.state_dict())",
        parts.join("; ")
    )
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

/// One tensor of a state_dict file.
#[derive(Debug, Clone, PartialEq)]
pub struct FileTensor {
    /// Its dtype, as safetensors names it (`F32`, `I64`, ...).
    pub dtype: Dtype,
    /// Its shape.
    pub shape: Vec<usize>,
    /// Its values, row-major, little-endian.
    pub bytes: Vec<u8>,
}

/// The two formats bnlab reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// A safetensors file.
    Safetensors,
    /// A file of PyTorch's `torch.save`.
    Torch,
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Format::Safetensors => "safetensors",
            Format::Torch => "PyTorch (torch.save)",
        })
    }
}

/// A state_dict file's tensors by key (after any renaming), and the fields bnlab wrote in its
/// metadata (none for a file from elsewhere).
#[derive(Debug, Clone, PartialEq)]
pub struct StateDict {
    /// The file's format.
    pub format: Format,
    /// Its tensors by key.
    pub tensors: BTreeMap<String, FileTensor>,
    /// bnlab's metadata fields (under [`META_KEY`]; the fields are `torch::META_*`).
    pub metadata: BTreeMap<String, String>,
}

/// `--rename 'REGEX=REPLACEMENT'`: every match of the pattern in a key is replaced (`$1` and
/// `${name}` refer to its groups), as burn-store's key remapper does. The pattern ends at the
/// first `=`.
#[derive(Debug, Clone)]
pub struct Rename {
    pattern: String,
    replacement: String,
}

impl std::str::FromStr for Rename {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let (pattern, replacement) = text.split_once('=').ok_or_else(|| {
            format!("'{text}': expected REGEX=REPLACEMENT, such as '^module\\.='")
        })?;
        if pattern.is_empty() {
            return Err(format!("'{text}': the pattern before '=' is empty"));
        }
        if let Err(e) = KeyRemapper::new().add_pattern(pattern, replacement) {
            return Err(format!(
                "'{pattern}' is not a regular expression: {}",
                one_line(&e)
            ));
        }
        Ok(Self {
            pattern: pattern.to_string(),
            replacement: replacement.to_string(),
        })
    }
}

impl std::fmt::Display for Rename {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}={}", self.pattern, self.replacement)
    }
}

impl StateDict {
    /// Reads a state_dict file of either format.
    pub fn read(path: &Path) -> Result<Self, TorchError> {
        use std::io::Read;
        let io = |e: std::io::Error| TorchError::Io(e.to_string());
        let mut head = Vec::with_capacity(9);
        std::fs::File::open(path)
            .and_then(|file| file.take(9).read_to_end(&mut head))
            .map_err(io)?;
        if looks_like_safetensors(&head) {
            return Self::from_safetensors(&std::fs::read(path).map_err(io)?);
        }
        Self::from_torch_file(path)
    }

    /// A safetensors file's state_dict.
    pub fn from_safetensors(bytes: &[u8]) -> Result<Self, TorchError> {
        let file =
            SafeTensors::deserialize(bytes).map_err(|e| TorchError::Corrupt(e.to_string()))?;
        let tensors = file
            .tensors()
            .into_iter()
            .map(|(key, view)| {
                let tensor = FileTensor {
                    dtype: view.dtype(),
                    shape: view.shape().to_vec(),
                    bytes: view.data().to_vec(),
                };
                (key, tensor)
            })
            .collect();
        Ok(Self {
            format: Format::Safetensors,
            tensors,
            metadata: metadata(bytes)?,
        })
    }

    /// A `torch.save` file's state_dict.
    pub fn from_torch_file(path: &Path) -> Result<Self, TorchError> {
        let reader = PytorchReader::new(path).map_err(|e| TorchError::Torch(one_line(&e)))?;
        let mut tensors = BTreeMap::new();
        for (key, tensor) in reader.into_tensors() {
            let dtype = safetensors_dtype(tensor.dtype());
            let shape = tensor.shape().to_vec();
            let bytes = tensor
                .read()
                .map_err(|e| TorchError::Torch(format!("{key}: {}", one_line(&e))))?;
            tensors.insert(
                key,
                FileTensor {
                    dtype,
                    shape,
                    bytes,
                },
            );
        }
        Ok(Self {
            format: Format::Torch,
            tensors,
            metadata: BTreeMap::new(),
        })
    }

    /// The same tensors under the keys `renames` give them, in order; an error if two keys
    /// become one.
    pub fn renamed(self, renames: &[Rename]) -> Result<Self, TorchError> {
        if renames.is_empty() {
            return Ok(self);
        }
        let remapper = KeyRemapper::from_pattern_iter(
            renames
                .iter()
                .map(|r| (r.pattern.as_str(), r.replacement.as_str())),
        )
        .map_err(|e| TorchError::Rename(one_line(&e)))?;
        let patterns = remapper.to_regex_pairs();
        let mut tensors = BTreeMap::new();
        let mut sources: BTreeMap<String, String> = BTreeMap::new();
        for (key, tensor) in self.tensors {
            // Every pattern in order, every match replaced: as the remapper's own `remap`.
            let mut new = key.clone();
            for (pattern, replacement) in &patterns {
                new = pattern.replace_all(&new, replacement.as_str()).into_owned();
            }
            if let Some(first) = sources.insert(new.clone(), key.clone()) {
                return Err(TorchError::Rename(format!(
                    "--rename maps both {first} and {key} to {new}"
                )));
            }
            tensors.insert(new, tensor);
        }
        Ok(Self { tensors, ..self })
    }
}

/// A safetensors file starts with its header's length (8 bytes, little-endian) and then the
/// header, a JSON object.
fn looks_like_safetensors(head: &[u8]) -> bool {
    head.len() == 9 && head[8] == b'{'
}

fn safetensors_dtype(dtype: TorchDType) -> Dtype {
    match dtype {
        TorchDType::F64 => Dtype::F64,
        TorchDType::F32 => Dtype::F32,
        TorchDType::F16 => Dtype::F16,
        TorchDType::BF16 => Dtype::BF16,
        TorchDType::I64 => Dtype::I64,
        TorchDType::I32 => Dtype::I32,
        TorchDType::I16 => Dtype::I16,
        TorchDType::I8 => Dtype::I8,
        TorchDType::U64 => Dtype::U64,
        TorchDType::U32 => Dtype::U32,
        TorchDType::U16 => Dtype::U16,
        TorchDType::U8 => Dtype::U8,
        TorchDType::Bool => Dtype::BOOL,
    }
}

fn one_line(e: &dyn std::fmt::Display) -> String {
    e.to_string()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dict(keys: &[&str]) -> StateDict {
        let tensor = FileTensor {
            dtype: Dtype::F32,
            shape: vec![1],
            bytes: 1.0f32.to_le_bytes().to_vec(),
        };
        StateDict {
            format: Format::Safetensors,
            tensors: keys
                .iter()
                .map(|k| (k.to_string(), tensor.clone()))
                .collect(),
            metadata: BTreeMap::new(),
        }
    }

    fn keys(d: &StateDict) -> Vec<&str> {
        d.tensors.keys().map(String::as_str).collect()
    }

    #[test]
    fn renames_apply_in_order_with_groups() {
        let renames: Vec<Rename> = ["^module\\.=", "^features\\.(\\d+)=$1"]
            .iter()
            .map(|r| r.parse().unwrap())
            .collect();
        let d = dict(&["module.features.0.weight", "module.fc.bias"])
            .renamed(&renames)
            .unwrap();
        assert_eq!(keys(&d), ["0.weight", "fc.bias"]);
    }

    #[test]
    fn a_rename_that_merges_keys_is_refused() {
        let rename: Rename = "\\d+=N".parse().unwrap();
        let err = dict(&["0.weight", "1.weight"])
            .renamed(&[rename])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("maps both 0.weight and 1.weight to N.weight"),
            "{err}"
        );
    }

    #[test]
    fn bad_renames_say_what_is_wrong() {
        let err = "no-equals-sign".parse::<Rename>().unwrap_err();
        assert!(err.contains("expected REGEX=REPLACEMENT"), "{err}");
        let err = "=x".parse::<Rename>().unwrap_err();
        assert!(err.contains("pattern before '=' is empty"), "{err}");
        let err = "(unclosed=x".parse::<Rename>().unwrap_err();
        assert!(err.contains("not a regular expression"), "{err}");
        assert!(!err.contains('\n'), "{err}");
    }
}
