//! Per-epoch metrics and the JSON-lines files that hold them.

use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// One epoch of training, as printed and as written with `--json` / `--metrics`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochMetrics {
    pub epoch: usize,
    /// Mean cross-entropy over the epoch's training examples.
    pub train_loss: f64,
    /// Fraction of training examples classified right while training (train mode).
    pub train_acc: f64,
    /// Fraction of test examples classified right in eval mode, after the epoch.
    pub test_acc: f64,
    /// Training examples per second of the training phase (the test pass excluded).
    pub examples_per_sec: f64,
    /// Wall time of the whole epoch, test pass included.
    pub seconds: f64,
}

impl EpochMetrics {
    /// The readable line printed per epoch.
    pub fn line(&self, epochs: usize) -> String {
        format!(
            "epoch {:>width$}/{epochs}  loss {:.4}  train acc {:.3}  test acc {:.3}  {:>7.0} examples/s  {:.1} s",
            self.epoch,
            self.train_loss,
            self.train_acc,
            self.test_acc,
            self.examples_per_sec,
            self.seconds,
            width = epochs.to_string().len(),
        )
    }

    pub fn json(&self) -> String {
        serde_json::to_string(self).expect("metrics serialize")
    }
}

/// Writes `bytes` to `path` through a temporary file in the same directory and a rename, so
/// that `path` always holds either the old content or the new, never a part.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(".bnlab-")
        .suffix(".tmp")
        .tempfile_in(dir)?;
    // tempfile makes owner-only (0600) files; results are meant to be read like any other.
    use std::os::unix::fs::PermissionsExt;
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(0o644))?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// Writes metrics as JSON lines, one object per epoch.
pub fn write_jsonl(path: &Path, metrics: &[EpochMetrics]) -> std::io::Result<()> {
    let mut text = String::new();
    for m in metrics {
        text.push_str(&m.json());
        text.push('\n');
    }
    write_atomically(path, text.as_bytes())
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
