//! bnlab: batch normalization written from scratch on Burn, with the networks and training
//! runs of the batch-norm chapter of *Dive into Deep Learning*.

pub mod data;
pub mod models;
pub mod norm;
pub mod report;
pub mod train;
