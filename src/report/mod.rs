//! What a run reports: per-epoch metrics as JSON lines, written atomically.

pub mod metrics;

pub use metrics::{write_atomically, write_jsonl, EpochMetrics};
