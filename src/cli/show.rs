//! `recipes`, `plot` and `shapes`: commands that show things without training.

use std::path::{Path, PathBuf};

use bnlab::config::RunConfig;
use bnlab::models::{ModelKind, ModelSpec, Trace};
use bnlab::norm::NormKind;
use bnlab::recipes;
use bnlab::report::{plot, read_jsonl};
use bnlab::train::eval_device;

pub(crate) fn list_recipes() -> anyhow::Result<()> {
    let names = recipes::names().into_iter().chain(recipes::sweep_names());
    let width = names.map(str::len).max().unwrap_or(0);
    for name in recipes::names() {
        let config = recipes::load(name)?;
        println!("{name:width$}  {}", config.description);
    }
    println!("\nSweeps (bnlab sweep NAME --out DIR; runs over seeds, with error bars):");
    for name in recipes::sweep_names() {
        let file = recipes::load_sweep(name).expect("a listed sweep")?;
        let grid = file.grid(None)?;
        let runs = grid.points().len();
        println!("{name:width$}  {} [{runs} runs]", file.description);
    }
    Ok(())
}

pub(crate) fn plot_files(files: &[PathBuf], out: &Path, force: bool) -> anyhow::Result<()> {
    for path in [out.with_extension("svg"), out.with_extension("png")] {
        bnlab::report::check_output("--out", &path, force)?;
    }
    let runs = files
        .iter()
        .map(|path| Ok((run_label(path), read_jsonl(path)?)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let [svg, png] = plot::write_curves(&runs, out, "--out", force)?;
    eprintln!("bnlab: wrote {} and {}", svg.display(), png.display());
    Ok(())
}

/// A metrics file's label: its run directory's name for `DIR/metrics.jsonl`, else its stem.
pub(crate) fn run_label(path: &Path) -> String {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_default();
    match (stem.as_str(), path.parent().and_then(|p| p.file_name())) {
        ("metrics", Some(dir)) => dir.to_string_lossy().to_string(),
        _ => stem,
    }
}

pub(crate) fn shapes(model: ModelKind, resize: Option<usize>) -> anyhow::Result<()> {
    let size = resize.unwrap_or(model.facts().recipe_image_size);
    let config = RunConfig {
        model,
        resize: Some(size),
        ..Default::default()
    };
    config.validate()?;
    let device = eval_device();
    let spec = ModelSpec::of(model, NormKind::Scratch);
    let net = spec.init(0, &device);
    let x = burn::tensor::Tensor::<4>::zeros([1, 1, size, size], &device);
    let mut trace = Trace::recording();
    net.forward_traced(x, &mut trace);
    println!("{} on a 1x1x{size}x{size} input:", model);
    let width = trace.blocks.iter().map(|(n, _)| n.len()).max().unwrap_or(0);
    for (name, dims) in trace.blocks {
        println!("  {name:width$}  output shape {dims:?}");
    }
    Ok(())
}
