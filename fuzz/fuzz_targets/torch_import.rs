//! PyTorch state_dict import on arbitrary bytes, in either format bnlab reads (safetensors, and
//! torch.save's zip and legacy pickle files, which the PyTorch reader takes only from a file):
//! a model or an error, never a panic.
#![no_main]

use bnlab::interop::state_dict::StateDict;
use bnlab::interop::torch::{import, import_state_dict};
use bnlab::models::{ModelKind, ModelSpec};
use bnlab::norm::NormKind;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The smallest model with every kind of tensor (conv, linear, BN buffers, the I64 count).
    let spec = ModelSpec::of(ModelKind::LenetBn, NormKind::Scratch);
    let _ = import(data, &spec);
    let path = std::env::temp_dir().join(format!("bnlab-fuzz-{}.pt", std::process::id()));
    std::fs::write(&path, data).expect("a temporary file");
    if let Ok(dict) = StateDict::read(&path) {
        let _ = import_state_dict(&dict, &spec);
    }
    let _ = std::fs::remove_file(&path);
});
