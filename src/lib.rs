//! bnlab: batch normalization written from scratch on Burn, with the networks and training
//! runs of the batch-norm chapter of *Dive into Deep Learning*.

pub mod bench;
pub mod config;
pub mod data;
pub mod device;
pub mod interop;
pub mod models;
pub mod norm;
pub mod ops;
pub mod recipes;
pub mod report;
pub mod train;

/// The name a value has on the command line and in recipes (`lenet-bn`, `scratch`, ...).
pub fn value_name(v: impl clap::ValueEnum) -> String {
    v.to_possible_value()
        .map(|p| p.get_name().to_string())
        .unwrap_or_default()
}
