//! Per-epoch metrics and the JSON-lines files that hold them.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::write_atomically;

/// One epoch of training, as printed and as written with `--json` / `--metrics`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochMetrics {
    /// 1-based.
    pub epoch: usize,
    /// Mean cross-entropy over the epoch's training examples.
    pub train_loss: f64,
    /// Fraction of training examples classified right while training (train mode).
    pub train_acc: f64,
    /// Fraction of test examples classified right in eval mode, after the epoch; `None` (null)
    /// for an epoch `--test-every` left untested.
    pub test_acc: Option<f64>,
    /// Training examples per second of the training phase (the test pass excluded).
    pub examples_per_sec: f64,
    /// Wall time of the whole epoch, test pass included.
    pub seconds: f64,
    /// Wall time of the run up to the end of this epoch, test passes included (0 in files
    /// written before bnlab recorded it).
    #[serde(default)]
    pub elapsed: f64,
}

impl EpochMetrics {
    /// The readable line printed per epoch.
    pub fn line(&self, epochs: usize) -> String {
        let test_acc = self
            .test_acc
            .map_or("  –  ".to_string(), |a| format!("{a:.3}"));
        format!(
            "epoch {:>width$}/{epochs}  loss {:.4}  train acc {:.3}  test acc {test_acc}  {:>7.0} examples/s  {:.1} s  elapsed {:.1} s",
            self.epoch,
            self.train_loss,
            self.train_acc,
            self.examples_per_sec,
            self.seconds,
            self.elapsed,
            width = epochs.to_string().len(),
        )
    }

    /// The JSON object written per epoch (one line).
    pub fn json(&self) -> String {
        serde_json::to_string(self).expect("metrics serialize")
    }
}

#[cfg(test)]
impl EpochMetrics {
    /// An epoch for the tests of tables and sweeps: loss 1, train accuracy 0.5, 1000 × epoch
    /// examples/s, 2 s per epoch.
    pub(crate) fn example(epoch: usize, test_acc: f64) -> Self {
        Self {
            epoch,
            train_loss: 1.0,
            train_acc: 0.5,
            test_acc: Some(test_acc),
            examples_per_sec: 1000.0 * epoch as f64,
            seconds: 2.0,
            elapsed: 2.0 * epoch as f64,
        }
    }
}

/// The last tested epoch's test accuracy (the run's result), if any epoch was tested.
pub fn final_test_acc(metrics: &[EpochMetrics]) -> Option<f64> {
    metrics.iter().rev().find_map(|m| m.test_acc)
}

/// Metrics as JSON lines, one object per epoch.
pub fn jsonl(metrics: &[EpochMetrics]) -> String {
    metrics.iter().map(|m| m.json() + "\n").collect()
}

/// Writes [`jsonl`] to `path`, a file of bnlab's own (see [`write_atomically`]).
pub fn write_jsonl(path: &Path, metrics: &[EpochMetrics]) -> std::io::Result<()> {
    write_atomically(path, jsonl(metrics).as_bytes())
}

/// Reads a metrics file written by [`write_jsonl`]; an error names the file and the line.
pub fn read_jsonl(path: &Path) -> anyhow::Result<Vec<EpochMetrics>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("{}: cannot read: {e}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(i, line)| {
            serde_json::from_str(line).map_err(|e| {
                anyhow::anyhow!(
                    "{}:{}: not a bnlab metrics line ({e})",
                    path.display(),
                    i + 1
                )
            })
        })
        .collect()
}
