//! What runs report: per-epoch metrics (JSON lines), comparison tables and training curves.

pub mod inspect;
pub mod metrics;
pub mod plot;
pub mod table;

pub use metrics::{read_jsonl, write_atomically, write_jsonl, EpochMetrics};
