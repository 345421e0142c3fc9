//! The chapter's experiments as data: the TOML files in `recipes/`, built into the binary so
//! that `bnlab run NAME` works from any directory; and its questions, the sweeps over them in
//! `sweeps/` (`bnlab sweep NAME`).

use crate::config::RunConfig;
use crate::train::sweep::SweepFile;

macro_rules! recipes {
    ($($name:literal),* $(,)?) => {
        /// `(name, TOML text)` of every shipped recipe.
        pub const RECIPES: &[(&str, &str)] =
            &[$(($name, include_str!(concat!("../recipes/", $name, ".toml")))),*];
    };
}

recipes!(
    "lenet-bn-scratch",
    "lenet-bn-concise",
    "lenet-bn-precise",
    "lenet",
    "lenet-sgdm",
    "lenet-adam",
    "lenet-bn-sgdm",
    "lenet-bn-adam",
    "lenet-bn-adam-128",
    "lenet-gluon-bn",
    "resnet18",
    "densenet",
    "densenet-15",
    "speedrun",
    "speedrun-long",
);

macro_rules! sweeps {
    ($($name:literal),* $(,)?) => {
        /// `(name, TOML text)` of every shipped sweep.
        pub const SWEEPS: &[(&str, &str)] =
            &[$(($name, include_str!(concat!("../sweeps/", $name, ".toml")))),*];
    };
}

sweeps!(
    "bn-learning-rates",
    "bn-eval-noise",
    "bn-lite",
    "bn-small-batches",
);

/// The names of the shipped sweeps, in the order `bnlab recipes` lists them.
pub fn sweep_names() -> Vec<&'static str> {
    SWEEPS.iter().map(|(name, _)| *name).collect()
}

/// The shipped sweep called `name`, if there is one.
///
/// # Errors
/// When its file does not parse (a defect the tests catch).
pub fn load_sweep(name: &str) -> Option<Result<SweepFile, crate::train::sweep::SweepError>> {
    SWEEPS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(n, text)| SweepFile::parse(n, text))
}

/// A recipe that cannot be had.
#[derive(Debug, thiserror::Error)]
pub enum RecipeError {
    /// No shipped recipe has this name.
    #[error("unknown recipe '{0}'{hint} (bnlab recipes lists them: {list})",
        hint = crate::choice::closest(.0, &names()).map(|n| format!(": did you mean {n}?")).unwrap_or_default(),
        list = names().join(", "))]
    Unknown(String),
    /// The recipe's TOML does not parse, or its settings do not validate.
    #[error("recipe {name}: {message}")]
    Invalid {
        /// The recipe.
        name: String,
        /// What is wrong.
        message: String,
    },
}

/// The names of the shipped recipes, in the order `bnlab recipes` lists them.
pub fn names() -> Vec<&'static str> {
    RECIPES.iter().map(|(name, _)| *name).collect()
}

/// Parses a recipe's TOML into a run config (unset fields take the defaults).
pub fn parse(name: &str, text: &str) -> Result<RunConfig, RecipeError> {
    let invalid = |message: String| RecipeError::Invalid {
        name: name.to_string(),
        message,
    };
    let config: RunConfig = toml::from_str(text).map_err(|e| invalid(e.message().to_string()))?;
    config.validate().map_err(|e| invalid(e.to_string()))?;
    Ok(config)
}

/// The shipped recipe called `name`.
pub fn load(name: &str) -> Result<RunConfig, RecipeError> {
    let (_, text) = RECIPES
        .iter()
        .find(|(n, _)| *n == name)
        .ok_or_else(|| RecipeError::Unknown(name.to_string()))?;
    parse(name, text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_recipe_parses_and_validates() {
        for (name, text) in RECIPES {
            let config = parse(name, text).unwrap_or_else(|e| panic!("{e}"));
            assert!(!config.description.is_empty(), "{name} has a description");
        }
    }

    #[test]
    fn every_sweep_parses_and_every_run_of_it_validates() {
        for (name, _) in SWEEPS {
            let file = load_sweep(name).unwrap().unwrap_or_else(|e| panic!("{e}"));
            assert!(!file.description.is_empty(), "{name} has a description");
            let grid = file.grid(None).unwrap();
            grid.check(&load(&grid.recipe).unwrap())
                .unwrap_or_else(|e| panic!("sweep {name}: {e}"));
        }
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("sweeps");
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let stem = path.file_stem().unwrap().to_str().unwrap().to_string();
            assert!(
                sweep_names().contains(&stem.as_str()),
                "sweeps/{stem}.toml is not in SWEEPS"
            );
        }
    }

    #[test]
    fn every_file_in_recipes_is_shipped() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes");
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let stem = path.file_stem().unwrap().to_str().unwrap().to_string();
            assert!(
                names().contains(&stem.as_str()),
                "recipes/{stem}.toml is not in RECIPES"
            );
        }
    }

    #[test]
    fn unknown_fields_and_names_are_errors() {
        let err = parse("x", "model = \"lenet-bn\"\nlearning_rate = 0.1\n").unwrap_err();
        assert!(err.to_string().contains("learning_rate"), "{err}");
        assert!(load("alexnet")
            .unwrap_err()
            .to_string()
            .contains("lenet-bn-scratch"));
    }

    /// The chapter's recipes say what the issue asked for.
    #[test]
    fn recipes_hold_the_chapter_settings() {
        use crate::config::OptimizerKind::*;
        use crate::models::ModelKind;
        use crate::norm::epilogue::Pool;
        let r = |n| load(n).unwrap();
        let sgdm = r("lenet-bn-sgdm");
        assert_eq!(
            (sgdm.optimizer, sgdm.lr, sgdm.momentum),
            (SgdMomentum, 0.5, 0.9)
        );
        assert_eq!(
            (sgdm.lr_step_size, sgdm.lr_gamma, sgdm.epochs),
            (Some(2), 0.9, 20)
        );
        assert_eq!(sgdm.pool, Some(Pool::Max(2)));
        assert_eq!(r("lenet-adam").optimizer, Adam);
        assert_eq!(r("lenet-sgdm").model, ModelKind::Lenet);
        assert_eq!(r("lenet-bn-adam-128").batch_size, 128);
        assert_eq!(r("densenet").resize, Some(96));
        assert_eq!(
            (r("densenet-15").epochs, r("densenet-15").resize),
            (15, Some(96))
        );
        assert_eq!((r("resnet18").batch_size, r("resnet18").epochs), (128, 5));
        assert_eq!(r("lenet-gluon-bn").lr, 0.2);
    }
}
