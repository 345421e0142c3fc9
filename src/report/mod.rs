//! What runs report: per-epoch metrics (JSON lines), comparison tables and training curves.

pub mod inspect;
pub mod metrics;
pub mod output;
pub mod plot;
pub mod table;

pub use metrics::{read_jsonl, write_jsonl, EpochMetrics};
pub use output::{check_output, write_atomically, write_file, write_output, Existing};
