//! What the finished runs of a sweep say together: mean ± std, min and max over seeds per
//! setting, the mean curves, the Markdown table and the accuracy plot's series.

use super::{Grid, Point, VARIANT};
use crate::report::metrics::final_test_acc;
use crate::report::plot::BandSeries;
use crate::report::EpochMetrics;

/// Mean, sample standard deviation (0 for one value), min and max.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spread {
    /// The mean.
    pub mean: f64,
    /// The sample standard deviation (n − 1), 0 for a single value.
    pub std: f64,
    /// The smallest value.
    pub min: f64,
    /// The largest value.
    pub max: f64,
}

impl Spread {
    /// The spread of `values`, `None` if there are none.
    pub fn of(values: &[f64]) -> Option<Self> {
        let n = values.len();
        if n == 0 {
            return None;
        }
        let mean = values.iter().sum::<f64>() / n as f64;
        let var = match n {
            1 => 0.0,
            _ => values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64,
        };
        Some(Self {
            mean,
            std: var.sqrt(),
            min: values.iter().copied().fold(f64::INFINITY, f64::min),
            max: values.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        })
    }
}

/// What the finished runs of one setting say together.
#[derive(Debug, Clone, PartialEq)]
pub struct SettingSummary {
    /// The setting ([`Point::setting_name`]).
    pub setting: String,
    /// Its `(key, value)` pairs.
    pub settings: Vec<(String, String)>,
    /// Its finished runs, out of `planned`.
    pub runs: usize,
    /// Its runs in the grid.
    pub planned: usize,
    /// The last epoch's test accuracy.
    pub final_acc: Spread,
    /// The best epoch's test accuracy.
    pub best_acc: Spread,
    /// The first epoch reaching the threshold, over the runs that reached it.
    pub epoch_to_threshold: Option<Spread>,
    /// How many runs reached the threshold.
    pub reached: usize,
    /// Wall time of the run, test passes included.
    pub seconds: Spread,
}

/// The summaries of each setting from the runs' metrics (`None` for a run not finished), in
/// grid order; settings with no finished run are left out.
pub fn summarize(
    grid: &Grid,
    metrics: impl Fn(&Point) -> Option<Vec<EpochMetrics>>,
    threshold: f64,
) -> Vec<SettingSummary> {
    let points = grid.points();
    let per_setting = grid.seeds.len().max(1);
    points
        .chunks(per_setting)
        .filter_map(|group| {
            let runs: Vec<Vec<EpochMetrics>> = group
                .iter()
                .filter_map(&metrics)
                .filter(|m| !m.is_empty())
                .collect();
            let runs: Vec<Vec<EpochMetrics>> = runs
                .into_iter()
                .filter(|m| final_test_acc(m).is_some())
                .collect();
            let finals: Vec<f64> = runs.iter().filter_map(|m| final_test_acc(m)).collect();
            let bests: Vec<f64> = runs
                .iter()
                .map(|m| {
                    m.iter()
                        .filter_map(|e| e.test_acc)
                        .fold(f64::NEG_INFINITY, f64::max)
                })
                .collect();
            let firsts: Vec<f64> = runs
                .iter()
                .filter_map(|m| {
                    m.iter()
                        .find(|e| e.test_acc.is_some_and(|a| a >= threshold))
                })
                .map(|e| e.epoch as f64)
                .collect();
            let seconds: Vec<f64> = runs
                .iter()
                .map(|m| m.iter().map(|e| e.seconds).sum())
                .collect();
            Some(SettingSummary {
                setting: group[0].setting_name(),
                settings: group[0].settings.clone(),
                runs: runs.len(),
                planned: group.len(),
                final_acc: Spread::of(&finals)?,
                best_acc: Spread::of(&bests)?,
                epoch_to_threshold: Spread::of(&firsts),
                reached: firsts.len(),
                seconds: Spread::of(&seconds)?,
            })
        })
        .collect()
}

/// The runs' metrics averaged epoch by epoch (each epoch over the runs that have it): a
/// setting's curve.
pub fn mean_curve(runs: &[Vec<EpochMetrics>]) -> Vec<EpochMetrics> {
    let epochs = runs.iter().map(Vec::len).max().unwrap_or(0);
    (0..epochs)
        .map(|i| {
            let at: Vec<&EpochMetrics> = runs.iter().filter_map(|m| m.get(i)).collect();
            let mean = |f: fn(&EpochMetrics) -> f64| {
                at.iter().map(|m| f(m)).sum::<f64>() / at.len() as f64
            };
            EpochMetrics {
                epoch: i + 1,
                train_loss: mean(|m| m.train_loss),
                train_acc: mean(|m| m.train_acc),
                // Over the runs that tested this epoch.
                test_acc: {
                    let tested: Vec<f64> = at.iter().filter_map(|m| m.test_acc).collect();
                    (!tested.is_empty()).then(|| tested.iter().sum::<f64>() / tested.len() as f64)
                },
                examples_per_sec: mean(|m| m.examples_per_sec),
                seconds: mean(|m| m.seconds),
                elapsed: mean(|m| m.elapsed),
            }
        })
        .collect()
}

/// The Markdown table of [`summarize`]'s rows.
pub fn markdown(rows: &[SettingSummary], threshold: f64) -> String {
    let mut out = format!(
        "| setting | runs | final test acc | min | max | best test acc | min | max | \
         first epoch ≥ {threshold} | time, s |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    );
    let pm = |s: &Spread| format!("{:.4} ± {:.4}", s.mean, s.std);
    for r in rows {
        let first = match &r.epoch_to_threshold {
            Some(s) => format!("{:.1} ± {:.1} ({}/{})", s.mean, s.std, r.reached, r.runs),
            None => format!("never (0/{})", r.runs),
        };
        out.push_str(&format!(
            "| {} | {}/{} | {} | {:.4} | {:.4} | {} | {:.4} | {:.4} | {first} | {:.1} ± {:.1} |\n",
            r.setting,
            r.runs,
            r.planned,
            pm(&r.final_acc),
            r.final_acc.min,
            r.final_acc.max,
            pm(&r.best_acc),
            r.best_acc.min,
            r.best_acc.max,
            r.seconds.mean,
            r.seconds.std,
        ));
    }
    out
}

/// The final-accuracy plot's data: its x key, and per combination of the other settings the
/// points `(x, mean, std)` of final test accuracy over seeds. The x key is the grid's
/// `plot_against`, or else its first axis with more than one value, all of them numbers;
/// `None` when there is neither. A row whose variant sets the key takes the variant's value,
/// and the variant then names no series of its own.
pub fn band_series(grid: &Grid, rows: &[SettingSummary]) -> Option<(String, Vec<BandSeries>)> {
    let key = grid.plot_against.clone().or_else(|| {
        grid.axes
            .iter()
            .find(|(_, values)| {
                values.len() > 1
                    && values
                        .iter()
                        .all(|v| v.parse::<f64>().is_ok_and(f64::is_finite))
            })
            .map(|(k, _)| k.clone())
    })?;
    let variant_sets = |name: &str| {
        grid.variants
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, set)| set.iter().rev().find(|(k, _)| *k == key))
            .map(|(_, v)| v.clone())
    };
    let mut series: Vec<BandSeries> = Vec::new();
    for row in rows {
        let own = row.settings.iter().find(|(k, _)| *k == key);
        let from_variant = row
            .settings
            .iter()
            .find(|(k, _)| k == VARIANT)
            .and_then(|(_, name)| variant_sets(name));
        let Some(x) = own
            .map(|(_, v)| v.clone())
            .or(from_variant.clone())
            .and_then(|v| v.parse::<f64>().ok())
        else {
            continue;
        };
        let others: Vec<String> = row
            .settings
            .iter()
            .filter(|(k, _)| *k != key && !(k == VARIANT && own.is_none()))
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let name = match others.is_empty() {
            true => "mean ± std over seeds".to_string(),
            false => others.join(","),
        };
        let point = (x, row.final_acc.mean, row.final_acc.std);
        match series.iter_mut().find(|(n, _)| *n == name) {
            Some((_, pts)) => pts.push(point),
            None => series.push((name, vec![point])),
        }
    }
    (!series.is_empty()).then_some((key, series))
}

#[cfg(test)]
mod tests {
    use super::super::tests::pairs;
    use super::super::{parse_axis, Grid};
    use super::*;

    fn epoch(epoch: usize, test_acc: f64) -> EpochMetrics {
        EpochMetrics::example(epoch, test_acc)
    }

    #[test]
    fn a_mean_curve_averages_each_epoch_over_the_runs_that_have_it() {
        let curve = mean_curve(&[
            vec![epoch(1, 0.5), epoch(2, 0.7)],
            vec![epoch(1, 0.7), epoch(2, 0.9), epoch(3, 0.95)],
        ]);
        let accs: Vec<f64> = curve.iter().filter_map(|m| m.test_acc).collect();
        assert_eq!(accs.len(), 3);
        assert!((accs[0] - 0.6).abs() < 1e-12 && (accs[1] - 0.8).abs() < 1e-12);
        assert_eq!(accs[2], 0.95);
    }

    #[test]
    fn the_summary_is_the_hand_computed_one() {
        let grid = Grid {
            recipe: "lenet-bn-scratch".into(),
            axes: vec![parse_axis("lr=0.1,1.0").unwrap()],
            seeds: vec![0, 1, 2],
            ..Default::default()
        };
        let metrics = |p: &Point| -> Option<Vec<EpochMetrics>> {
            match (p.settings[0].1.as_str(), p.seed) {
                ("0.1", 0) => Some(vec![epoch(1, 0.80), epoch(2, 0.86)]),
                ("0.1", 1) => Some(vec![epoch(1, 0.86), epoch(2, 0.84)]),
                ("0.1", 2) => Some(vec![epoch(1, 0.70), epoch(2, 0.82)]),
                ("1.0", 0) => Some(vec![epoch(1, 0.50), epoch(2, 0.60), epoch(3, 0.90)]),
                _ => None, // not finished
            }
        };
        let rows = summarize(&grid, metrics, 0.85);
        assert_eq!(rows.len(), 2);
        let a = &rows[0];
        assert_eq!((a.setting.as_str(), a.runs, a.planned), ("lr=0.1", 3, 3));
        // Finals 0.86, 0.84, 0.82: mean 0.84, sample std 0.02.
        assert!((a.final_acc.mean - 0.84).abs() < 1e-12);
        assert!((a.final_acc.std - 0.02).abs() < 1e-12);
        assert_eq!((a.final_acc.min, a.final_acc.max), (0.82, 0.86));
        // Bests 0.86, 0.86, 0.82.
        assert!((a.best_acc.mean - 2.54 / 3.0).abs() < 1e-12);
        // Two runs reach 0.85: at epochs 2 and 1.
        assert_eq!(a.reached, 2);
        assert_eq!(a.epoch_to_threshold.unwrap().mean, 1.5);
        assert_eq!(a.seconds.mean, 4.0);
        let b = &rows[1];
        assert_eq!((b.runs, b.planned, b.reached), (1, 3, 1));
        assert_eq!((b.final_acc.mean, b.final_acc.std), (0.90, 0.0));
        assert_eq!(b.epoch_to_threshold.unwrap().mean, 3.0);
        let table = markdown(&rows, 0.85);
        assert!(
            table.contains("| lr=0.1 | 3/3 | 0.8400 ± 0.0200 | 0.8200 | 0.8600 |"),
            "{table}"
        );
        assert!(
            table.contains("| lr=1.0 | 1/3 | 0.9000 ± 0.0000 |"),
            "{table}"
        );
    }

    #[test]
    fn the_accuracy_plot_takes_its_x_from_a_numeric_axis_or_from_the_variants() {
        let row = |settings: &[(&str, &str)], mean: f64| SettingSummary {
            setting: String::new(),
            settings: pairs(settings),
            runs: 2,
            planned: 2,
            final_acc: Spread {
                mean,
                std: 0.01,
                min: mean,
                max: mean,
            },
            best_acc: Spread {
                mean,
                std: 0.01,
                min: mean,
                max: mean,
            },
            epoch_to_threshold: None,
            reached: 0,
            seconds: Spread {
                mean: 1.0,
                std: 0.0,
                min: 1.0,
                max: 1.0,
            },
        };
        // A numeric axis: one line per value of the other axis.
        let grid = Grid {
            axes: vec![
                parse_axis("norm=fused,none").unwrap(),
                parse_axis("lr=0.1,1.0").unwrap(),
            ],
            ..Default::default()
        };
        let rows = [
            row(&[("norm", "fused"), ("lr", "0.1")], 0.8),
            row(&[("norm", "fused"), ("lr", "1.0")], 0.9),
            row(&[("norm", "none"), ("lr", "0.1")], 0.5),
        ];
        let (key, series) = band_series(&grid, &rows).unwrap();
        assert_eq!(key, "lr");
        assert_eq!(
            series,
            [
                (
                    "norm=fused".to_string(),
                    vec![(0.1, 0.8, 0.01), (1.0, 0.9, 0.01)]
                ),
                ("norm=none".to_string(), vec![(0.1, 0.5, 0.01)]),
            ]
        );
        // No numeric axis and no plot_against: no plot.
        let words = Grid {
            axes: vec![parse_axis("norm=fused,none").unwrap()],
            ..Default::default()
        };
        assert!(band_series(&words, &rows[..1]).is_none());
        // plot_against a key the variants set: the variant names no line of its own.
        let grid = Grid {
            axes: vec![parse_axis("norm=fused,layer").unwrap()],
            variants: vec![
                (
                    "batch-2".into(),
                    pairs(&[("batch_size", "2"), ("lr", "0.0078125")]),
                ),
                (
                    "batch-256".into(),
                    pairs(&[("batch_size", "256"), ("lr", "1.0")]),
                ),
            ],
            plot_against: Some("batch_size".into()),
            ..Default::default()
        };
        let rows = [
            row(&[(VARIANT, "batch-2"), ("norm", "fused")], 0.53),
            row(&[(VARIANT, "batch-2"), ("norm", "layer")], 0.78),
            row(&[(VARIANT, "batch-256"), ("norm", "fused")], 0.71),
        ];
        let (key, series) = band_series(&grid, &rows).unwrap();
        assert_eq!(key, "batch_size");
        assert_eq!(
            series,
            [
                (
                    "norm=fused".to_string(),
                    vec![(2.0, 0.53, 0.01), (256.0, 0.71, 0.01)]
                ),
                ("norm=layer".to_string(), vec![(2.0, 0.78, 0.01)]),
            ]
        );
    }
}
