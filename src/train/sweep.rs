//! Sweeps: a recipe run over a grid of settings and seeds, one run directory per point, and
//! what the runs say together (mean ± std, min and max over seeds, per setting).
//!
//! The grid lives in `DIR/sweep.json`; run `i` of the grid lives in `DIR/runs/NAME`, where
//! NAME spells its settings and seed. A run is finished when its directory holds `model.bpk`
//! (the session writes it last), so a killed sweep knows what is left, and runs made elsewhere
//! (a scheduler running `--plan`'s commands on a shared filesystem) count the same.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::RunConfig;
use crate::report::plot::BandSeries;
use crate::report::EpochMetrics;

/// The file in a sweep directory that records its grid.
pub const SWEEP_FILE: &str = "sweep.json";

/// A recipe, the settings to vary and the seeds to run each with.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Grid {
    /// The recipe every run starts from.
    pub recipe: String,
    /// `(key, values)` per swept setting, as `--set KEY=V1,V2` gave them: the keys are those
    /// of a recipe file, the values TOML values written as on the command line.
    pub axes: Vec<(String, Vec<String>)>,
    /// The seeds each setting runs with.
    pub seeds: Vec<u64>,
    /// Settings every run takes over the recipe's (a sweep file's `[set]`).
    #[serde(default)]
    pub base: Vec<(String, String)>,
    /// Named variants, each a set of settings, crossed with the axes as if they were the
    /// first axis, `variant` (a sweep file's `[[variant]]`s).
    #[serde(default)]
    pub variants: Vec<(String, Vec<(String, String)>)>,
    /// The "first epoch ≥" column's accuracy, if the sweep file names one.
    #[serde(default)]
    pub threshold: Option<f64>,
    /// The shipped sweep the grid came from, if any.
    #[serde(default)]
    pub name: Option<String>,
    /// The setting the final-accuracy plot takes as its x axis (a sweep file's
    /// `plot_against`), when it is not a numeric axis: a key each variant sets to a number.
    #[serde(default)]
    pub plot_against: Option<String>,
}

/// The key under which a point names its variant.
pub const VARIANT: &str = "variant";

/// One point of the grid: a value for each swept key, and a seed.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    /// `(key, value)` in the grid's key order.
    pub settings: Vec<(String, String)>,
    /// The seed.
    pub seed: u64,
}

impl Point {
    /// The settings as `key=value` joined by `,` (`lr=0.5,batch_size=64`): the setting's name
    /// in tables, `default` where nothing is swept.
    pub fn setting_name(&self) -> String {
        match self.settings.is_empty() {
            true => "default".to_string(),
            false => self
                .settings
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(","),
        }
    }

    /// The run directory's name: the setting and the seed, with characters a path should not
    /// hold replaced.
    pub fn dir_name(&self) -> String {
        let name = format!("{},seed={}", self.setting_name(), self.seed);
        name.chars()
            .map(|c| match c.is_ascii_alphanumeric() || "=,.-_".contains(c) {
                true => c,
                false => '_',
            })
            .collect()
    }
}

/// What is wrong with a sweep's arguments.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SweepError(pub String);

/// Parses `KEY=V1,V2,...`.
pub fn parse_axis(text: &str) -> Result<(String, Vec<String>), SweepError> {
    let (key, values) = text.split_once('=').ok_or_else(|| {
        SweepError(format!(
            "--set {text}: expected KEY=V1,V2,... (--set lr=0.1,1.0)"
        ))
    })?;
    let values: Vec<String> = values.split(',').map(|v| v.trim().to_string()).collect();
    if key.trim().is_empty() || values.iter().any(String::is_empty) {
        return Err(SweepError(format!(
            "--set {text}: expected KEY=V1,V2,... with no empty key or value"
        )));
    }
    Ok((key.trim().to_string(), values))
}

/// Parses seeds: `0-4`, `0,3,7`, or a mix (`0-2,9`).
pub fn parse_seeds(text: &str) -> Result<Vec<u64>, SweepError> {
    let bad = || {
        SweepError(format!(
            "--seeds {text}: expected A-B or A,B,C (--seeds 0-4)"
        ))
    };
    let mut seeds = Vec::new();
    for part in text.split(',') {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (u64, u64) = (
                    a.trim().parse().map_err(|_| bad())?,
                    b.trim().parse().map_err(|_| bad())?,
                );
                if a > b || b - a >= 10_000 {
                    return Err(bad());
                }
                seeds.extend(a..=b);
            }
            None => seeds.push(part.trim().parse().map_err(|_| bad())?),
        }
    }
    seeds.dedup();
    Ok(seeds)
}

impl Grid {
    /// Every point: the settings' product (the first key varying slowest), each with every
    /// seed.
    pub fn points(&self) -> Vec<Point> {
        let mut settings: Vec<Vec<(String, String)>> = vec![Vec::new()];
        let variants = (VARIANT.to_string(), self.variant_names());
        let variant_axis = (!self.variants.is_empty()).then_some(&variants);
        for (key, values) in variant_axis.into_iter().chain(&self.axes) {
            settings = settings
                .into_iter()
                .flat_map(|s| {
                    values.iter().map(move |v| {
                        let mut s = s.clone();
                        s.push((key.clone(), v.clone()));
                        s
                    })
                })
                .collect();
        }
        settings
            .into_iter()
            .flat_map(|s| {
                self.seeds.iter().map(move |&seed| Point {
                    settings: s.clone(),
                    seed,
                })
            })
            .collect()
    }

    /// Whether `other` runs the same settings (its seeds and threshold may differ).
    pub fn same_runs_as(&self, other: &Grid) -> bool {
        (&self.recipe, &self.axes, &self.base, &self.variants)
            == (&other.recipe, &other.axes, &other.base, &other.variants)
    }

    fn variant_names(&self) -> Vec<String> {
        self.variants.iter().map(|(name, _)| name.clone()).collect()
    }

    /// What a point's run sets over the recipe: the grid's base settings, then its variant's,
    /// then its axes' values.
    pub fn settings_of(&self, point: &Point) -> Vec<(String, String)> {
        let mut out = self.base.clone();
        for (key, value) in &point.settings {
            match key == VARIANT {
                true => out.extend(
                    self.variants
                        .iter()
                        .filter(|(name, _)| name == value)
                        .flat_map(|(_, set)| set.iter().cloned()),
                ),
                false => out.push((key.clone(), value.clone())),
            }
        }
        out
    }

    /// Checks that every point makes a valid run of the recipe, so that a bad value fails
    /// before the first run starts.
    pub fn check(&self, recipe: &RunConfig) -> Result<(), SweepError> {
        if self.seeds.is_empty() {
            return Err(SweepError("--seeds names no seed".into()));
        }
        for point in self.points() {
            let config = with_settings(recipe, &self.settings_of(&point))?;
            config
                .validate()
                .map_err(|e| SweepError(format!("{}: {e}", point.setting_name())))?;
        }
        Ok(())
    }

    /// Reads `DIR/sweep.json`.
    pub fn load(dir: &Path) -> anyhow::Result<Self> {
        let path = dir.join(SWEEP_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| {
            anyhow::anyhow!(
                "{}: {e} (is {} a sweep directory? bnlab sweep RECIPE --out DIR makes one)",
                path.display(),
                dir.display()
            )
        })?;
        serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    }
}

/// A shipped sweep file (`sweeps/NAME.toml`): a recipe, settings over it, the axes and
/// variants to cross, and the seeds.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SweepFile {
    /// Its name (the file's stem), set by [`SweepFile::parse`].
    #[serde(skip)]
    pub name: String,
    /// One line on the question the sweep answers.
    pub description: String,
    /// The recipe every run starts from.
    pub recipe: String,
    /// Seeds, as `--seeds` takes them (`0-4`).
    pub seeds: String,
    /// The "first epoch ≥" column's accuracy.
    #[serde(default)]
    pub threshold: Option<f64>,
    /// Settings every run takes.
    #[serde(default)]
    pub set: toml::Table,
    /// The axes, crossed in order (the first varies slowest).
    #[serde(default)]
    pub axis: Vec<AxisEntry>,
    /// Named variants.
    #[serde(default)]
    pub variant: Vec<VariantEntry>,
    /// The key the final-accuracy plot is drawn against, when the variants set it.
    #[serde(default)]
    pub plot_against: Option<String>,
}

/// One `[[axis]]` of a sweep file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AxisEntry {
    /// A recipe-file key.
    pub key: String,
    /// Its values.
    pub values: Vec<toml::Value>,
}

/// One `[[variant]]` of a sweep file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VariantEntry {
    /// Its name in tables and plots.
    pub name: String,
    /// What it sets.
    #[serde(default)]
    pub set: toml::Table,
}

/// A TOML value as `--set` writes it: strings bare, the rest as TOML.
fn as_setting(value: &toml::Value) -> String {
    match value {
        toml::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn settings(table: &toml::Table) -> Vec<(String, String)> {
    table
        .iter()
        .map(|(k, v)| (k.clone(), as_setting(v)))
        .collect()
}

impl SweepFile {
    /// Parses a sweep file's text (`name` for the errors).
    ///
    /// # Errors
    /// When the TOML does not parse or its seeds do not.
    pub fn parse(name: &str, text: &str) -> Result<Self, SweepError> {
        let mut file: Self = toml::from_str(text)
            .map_err(|e| SweepError(format!("sweep {name}: {}", e.message())))?;
        file.name = name.to_string();
        parse_seeds(&file.seeds).map_err(|e| SweepError(format!("sweep {name}: {e}")))?;
        if let Some(key) = &file.plot_against {
            let on_axis = file.axis.iter().any(|a| a.key == *key);
            let by_variants =
                !file.variant.is_empty() && file.variant.iter().all(|v| v.set.contains_key(key));
            if !on_axis && !by_variants {
                return Err(SweepError(format!(
                    "sweep {name}: plot_against = \"{key}\" is neither an axis nor set by \
                     every variant; name one of those keys or leave it out"
                )));
            }
        }
        Ok(file)
    }

    /// The grid, with `seeds` instead of the file's if given.
    ///
    /// # Errors
    /// When `seeds` does not parse.
    pub fn grid(&self, seeds: Option<&str>) -> Result<Grid, SweepError> {
        Ok(Grid {
            recipe: self.recipe.clone(),
            axes: self
                .axis
                .iter()
                .map(|a| (a.key.clone(), a.values.iter().map(as_setting).collect()))
                .collect(),
            seeds: parse_seeds(seeds.unwrap_or(&self.seeds))?,
            base: settings(&self.set),
            variants: self
                .variant
                .iter()
                .map(|v| (v.name.clone(), settings(&v.set)))
                .collect(),
            threshold: self.threshold,
            name: Some(self.name.clone()),
            plot_against: self.plot_against.clone(),
        })
    }
}

/// `recipe` with `settings` written over it, as a recipe file's `key = value` lines would:
/// each value is read as TOML (`0.5`, `true`, `none`), a bare word as a string.
pub fn with_settings(
    recipe: &RunConfig,
    settings: &[(String, String)],
) -> Result<RunConfig, SweepError> {
    let mut table =
        toml::Value::try_from(recipe).map_err(|e| SweepError(format!("the recipe: {e}")))?;
    let map = table.as_table_mut().expect("a config is a table");
    for (key, value) in settings {
        let parsed = toml::from_str::<toml::Table>(&format!("v = {value}"))
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| toml::Value::String(value.clone()));
        map.insert(key.clone(), parsed);
    }
    table.try_into().map_err(|e: toml::de::Error| {
        let names: Vec<(String, String)> = settings.to_vec();
        SweepError(format!(
            "--set {}: {}",
            names
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(" "),
            e.message()
        ))
    })
}

/// Where a point's run lives in sweep directory `dir`.
pub fn run_dir(dir: &Path, point: &Point) -> PathBuf {
    dir.join("runs").join(point.dir_name())
}

/// Whether the run in `run_dir` finished (its final model is written last).
pub fn finished(run_dir: &Path) -> bool {
    run_dir.join("model.bpk").is_file()
}

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
            let finals: Vec<f64> = runs.iter().map(|m| m[m.len() - 1].test_acc).collect();
            let bests: Vec<f64> = runs
                .iter()
                .map(|m| {
                    m.iter()
                        .map(|e| e.test_acc)
                        .fold(f64::NEG_INFINITY, f64::max)
                })
                .collect();
            let firsts: Vec<f64> = runs
                .iter()
                .filter_map(|m| m.iter().find(|e| e.test_acc >= threshold))
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
                test_acc: mean(|m| m.test_acc),
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
    use super::*;

    fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn epoch(epoch: usize, test_acc: f64) -> EpochMetrics {
        EpochMetrics::example(epoch, test_acc)
    }

    #[test]
    fn a_mean_curve_averages_each_epoch_over_the_runs_that_have_it() {
        let curve = mean_curve(&[
            vec![epoch(1, 0.5), epoch(2, 0.7)],
            vec![epoch(1, 0.7), epoch(2, 0.9), epoch(3, 0.95)],
        ]);
        let accs: Vec<f64> = curve.iter().map(|m| m.test_acc).collect();
        assert_eq!(accs.len(), 3);
        assert!((accs[0] - 0.6).abs() < 1e-12 && (accs[1] - 0.8).abs() < 1e-12);
        assert_eq!(accs[2], 0.95);
    }

    #[test]
    fn the_grid_is_the_product_of_the_settings_times_the_seeds() {
        let grid = Grid {
            recipe: "lenet-bn-scratch".into(),
            axes: vec![
                parse_axis("lr=0.1,1.0").unwrap(),
                parse_axis("norm=fused,none").unwrap(),
            ],
            seeds: parse_seeds("0-1").unwrap(),
            ..Default::default()
        };
        let names: Vec<String> = grid.points().iter().map(Point::dir_name).collect();
        assert_eq!(
            names,
            [
                "lr=0.1,norm=fused,seed=0",
                "lr=0.1,norm=fused,seed=1",
                "lr=0.1,norm=none,seed=0",
                "lr=0.1,norm=none,seed=1",
                "lr=1.0,norm=fused,seed=0",
                "lr=1.0,norm=fused,seed=1",
                "lr=1.0,norm=none,seed=0",
                "lr=1.0,norm=none,seed=1",
            ]
        );
        assert_eq!(parse_seeds("0-2,9").unwrap(), [0, 1, 2, 9]);
        assert!(parse_seeds("4-1").is_err() && parse_seeds("x").is_err());
        assert!(parse_axis("lr").is_err() && parse_axis("lr=0.1,").is_err());
    }

    #[test]
    fn settings_are_read_as_a_recipe_file_reads_them() {
        let base = RunConfig::default();
        let set = |k: &str, v: &str| with_settings(&base, &[(k.into(), v.into())]);
        assert_eq!(set("lr", "0.25").unwrap().lr, 0.25);
        assert_eq!(set("batch_size", "64").unwrap().batch_size, 64);
        assert!(set("recalibrate_bn", "true").unwrap().recalibrate_bn);
        assert_eq!(
            set("norm", "none").unwrap().norm,
            Some(crate::norm::NormKind::None.into())
        );
        let e = set("learning_rate", "0.1").unwrap_err().to_string();
        assert!(e.contains("learning_rate"), "{e}");
        let e = set("norm", "nonsense").unwrap_err().to_string();
        assert!(e.contains("norm=nonsense"), "{e}");
    }

    /// The table's figures, against values worked out by hand.
    #[test]
    fn a_sweep_file_crosses_its_variants_with_its_axes_over_its_settings() {
        let file = SweepFile::parse(
            "test",
            r#"
            description = "two variants, one axis"
            recipe = "lenet-bn-scratch"
            seeds = "3-4"
            threshold = 0.7
            set = { epochs = 2 }
            [[variant]]
            name = "plain"
            [[variant]]
            name = "small"
            set = { batch_size = 8, lr = 0.03125 }
            [[axis]]
            key = "norm"
            values = ["fused", "ghost:4"]
            "#,
        )
        .unwrap();
        let grid = file.grid(None).unwrap();
        assert_eq!(
            (grid.seeds.clone(), grid.threshold),
            (vec![3, 4], Some(0.7))
        );
        let points = grid.points();
        let names: Vec<String> = points.iter().step_by(2).map(Point::setting_name).collect();
        assert_eq!(
            names,
            [
                "variant=plain,norm=fused",
                "variant=plain,norm=ghost:4",
                "variant=small,norm=fused",
                "variant=small,norm=ghost:4",
            ]
        );
        assert_eq!(
            grid.settings_of(&points[6]),
            pairs(&[
                ("epochs", "2"),
                ("batch_size", "8"),
                ("lr", "0.03125"),
                ("norm", "ghost:4")
            ])
        );
        let recipe = crate::recipes::load("lenet-bn-scratch").unwrap();
        let config = with_settings(&recipe, &grid.settings_of(&points[6])).unwrap();
        assert_eq!(
            (config.batch_size, config.lr, config.epochs),
            (8, 0.03125, 2)
        );
        assert_eq!(config.norm.unwrap().to_string(), "ghost:4");
        assert!(file.grid(Some("0,9")).unwrap().seeds == [0, 9]);
        let stray =
            "description = \"d\"\nrecipe = \"lenet\"\nseeds = \"0\"\nplot_against = \"lr\"\n";
        let err = SweepFile::parse("stray", stray).unwrap_err().0;
        assert!(err.contains("plot_against = \"lr\""), "{err}");
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
