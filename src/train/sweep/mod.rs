//! Sweeps: a recipe run over a grid of settings and seeds, one run directory per point, and
//! what the runs say together ([`summary`]: mean ± std, min and max over seeds, per setting).
//!
//! The grid lives in `DIR/sweep.json`; run `i` of the grid lives in `DIR/runs/NAME`, where
//! NAME spells its settings and seed. A run is finished when its directory holds `model.bpk`
//! (the session writes it last), so a killed sweep knows what is left, and runs made elsewhere
//! (a scheduler running `--plan`'s commands on a shared filesystem) count the same.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::RunConfig;

pub mod summary;

pub use summary::*;

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

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
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
}
