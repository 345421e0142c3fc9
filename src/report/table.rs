//! The comparison table `bnlab compare` writes.

use super::EpochMetrics;

/// Test accuracy a run must reach to count as converged, in the table's "epoch to" column.
pub const TARGET_ACC: f64 = 0.85;

/// One row's figures.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    /// The last epoch's test accuracy.
    pub final_test_acc: f64,
    /// The highest test accuracy of any epoch.
    pub best_test_acc: f64,
    /// The epoch that reached it.
    pub best_epoch: usize,
    /// The first epoch whose test accuracy reached [`TARGET_ACC`].
    pub epoch_to_target: Option<usize>,
    /// The epochs' wall time added up.
    pub wall_seconds: f64,
    /// Training examples per second over the whole run.
    pub examples_per_sec: f64,
}

/// The row of a run with these epochs' metrics, or `None` for no tested epoch.
pub fn summarize(metrics: &[EpochMetrics]) -> Option<Summary> {
    let tested = || metrics.iter().filter_map(|m| Some((m.epoch, m.test_acc?)));
    let final_test_acc = super::metrics::final_test_acc(metrics)?;
    let (best_epoch, best_test_acc) = tested().max_by(|a, b| a.1.total_cmp(&b.1))?;
    let wall_seconds: f64 = metrics.iter().map(|m| m.seconds).sum();
    // Harmonic mean: total examples over total training time.
    let train_seconds: f64 = metrics.iter().map(|m| 1.0 / m.examples_per_sec).sum();
    Some(Summary {
        final_test_acc,
        best_test_acc,
        best_epoch,
        epoch_to_target: tested()
            .find(|&(_, acc)| acc >= TARGET_ACC)
            .map(|(epoch, _)| epoch),
        wall_seconds,
        examples_per_sec: metrics.len() as f64 / train_seconds,
    })
}

/// A Markdown table, one row per `(name, metrics)`.
pub fn markdown(runs: &[(String, Vec<EpochMetrics>)]) -> String {
    let mut out = format!(
        "| run | epochs | final test acc | best test acc (epoch) | first epoch ≥ {TARGET_ACC} | wall time | examples/s |\n\
         |---|---:|---:|---:|---:|---:|---:|\n"
    );
    for (name, metrics) in runs {
        let Some(s) = summarize(metrics) else {
            out.push_str(&format!(
                "| {name} | {} | – | – | – | – | – |\n",
                metrics.len()
            ));
            continue;
        };
        let reached = s
            .epoch_to_target
            .map_or("never".to_string(), |e| e.to_string());
        out.push_str(&format!(
            "| {name} | {} | {:.4} | {:.4} ({}) | {reached} | {:.0} s | {:.0} |\n",
            metrics.len(),
            s.final_test_acc,
            s.best_test_acc,
            s.best_epoch,
            s.wall_seconds,
            s.examples_per_sec,
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn epoch(epoch: usize, test_acc: f64) -> EpochMetrics {
        EpochMetrics::example(epoch, test_acc)
    }

    #[test]
    fn summary_figures() {
        let m = vec![epoch(1, 0.7), epoch(2, 0.86), epoch(3, 0.84)];
        let s = summarize(&m).unwrap();
        assert_eq!(
            (s.final_test_acc, s.best_test_acc, s.best_epoch),
            (0.84, 0.86, 2)
        );
        assert_eq!(s.epoch_to_target, Some(2));
        assert_eq!(s.wall_seconds, 6.0);
        // 3 epochs of equal size at 1000, 2000, 3000 examples/s.
        assert!(
            (s.examples_per_sec - 3.0 / (1.0 / 1000.0 + 1.0 / 2000.0 + 1.0 / 3000.0)).abs() < 1e-9
        );
        let table = markdown(&[("a".into(), m), ("b".into(), vec![epoch(1, 0.5)])]);
        assert!(
            table.contains("| a | 3 | 0.8400 | 0.8600 (2) | 2 |"),
            "{table}"
        );
        assert!(
            table.contains("| b | 1 | 0.5000 | 0.5000 (1) | never |"),
            "{table}"
        );
    }
}
