//! PyTorch state_dict import on arbitrary bytes: a model or an error, never a panic.
#![no_main]

use bnlab::interop::torch::import;
use bnlab::models::{ModelKind, ModelSpec};
use bnlab::norm::NormKind;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The smallest model with every kind of tensor (conv, linear, BN buffers, the I64 count).
    let spec = ModelSpec::of(ModelKind::LenetBn, NormKind::Scratch);
    let _ = import(data, &spec);
});
