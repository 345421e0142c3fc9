//! bnlab: batch normalization written from scratch on Burn, with the networks and training
//! runs of the batch-norm chapter of *Dive into Deep Learning*.

#![warn(missing_docs)]

pub mod bench;
pub mod choice;
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
