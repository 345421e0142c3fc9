//! `eval`, `export` and `inspect`: commands on a saved model.

use std::path::{Path, PathBuf};

use burn::module::Module;

use bnlab::config::RunConfig;
use bnlab::data::FashionMnist;
use bnlab::models::Model;
use bnlab::report::{check_output, write_output};
use bnlab::train::checkpoint;
use bnlab::train::{evaluate, recalibrate_bn, EvalOptions};

use super::args::*;
use super::set_up;

pub(crate) struct EvalCommand {
    pub(crate) recalibrate: bool,
    pub(crate) recalibrate_batches: Option<usize>,
    pub(crate) tta_flip: Option<bool>,
    pub(crate) fold: bool,
    pub(crate) limit: Option<usize>,
    pub(crate) json: bool,
    pub(crate) logits: Option<PathBuf>,
    pub(crate) force: bool,
}

/// Where `eval` gets its model.
pub(crate) enum Source {
    Checkpoint(PathBuf),
    Weights(PathBuf, ArchArgs),
}

/// A model from a PyTorch state_dict (safetensors or torch.save), its keys renamed by
/// `--rename`, its architecture from the flags and the file's metadata.
pub(crate) fn from_weights(path: &Path, arch: &ArchArgs) -> anyhow::Result<(RunConfig, Model)> {
    use bnlab::interop::state_dict::StateDict;
    use bnlab::interop::torch::{self, Architecture};
    let named = |e: torch::TorchError| anyhow::anyhow!("--weights {}: {e}", path.display());
    let dict = StateDict::read(path)
        .and_then(|d| d.renamed(&arch.rename))
        .map_err(named)?;
    let given = Architecture {
        model: arch.model,
        norm: arch.norm,
        pool: arch.pool,
        activation: arch.activation,
        resize: arch.resize,
    };
    let config = torch::config_for(&dict.metadata, given);
    config.validate()?;
    let model = torch::import_state_dict(&dict, &config.model_spec()).map_err(named)?;
    bnlab::models::check_weights(&model)
        .map_err(|e| anyhow::anyhow!("--weights {}: unusable weights: {e}", path.display()))?;
    Ok((config, model))
}

pub(crate) fn eval(source: Source, options: &EvalCommand, env: &EnvArgs) -> anyhow::Result<()> {
    set_up(env)?;
    if let Some(out) = &options.logits {
        check_output("--logits", out, options.force)?;
    }
    let (config, mut model, path) = match source {
        Source::Checkpoint(path) => {
            let ckpt = checkpoint::load_checkpoint(&path)?;
            (ckpt.config, ckpt.model, ckpt.path)
        }
        Source::Weights(path, arch) => {
            let (config, model) = from_weights(&path, &arch)?;
            (config, model, path)
        }
    };
    let data = FashionMnist::load(&env.data)?;
    let (size, limit) = (config.image_size(), options.limit);
    if options.recalibrate {
        let batches = options.recalibrate_batches.or(limit);
        model = recalibrate_bn(model, &data.train, config.batch_size, size, batches).valid();
    }
    if options.fold {
        model = bnlab::models::fold_bn(model);
    }
    let tta_flip = options.tta_flip.unwrap_or(config.tta_flip);
    let eval_options = EvalOptions {
        limit,
        tta_flip,
        ..EvalOptions::of(&config)
    };
    let acc = evaluate(&model, &data.test, &eval_options);
    let examples = limit.map_or(data.test.len(), |l| {
        (l * config.batch_size).min(data.test.len())
    });
    if let Some(out) = &options.logits {
        let p =
            bnlab::interop::predict(&model, &data.test, size, config.batch_size, Some(examples));
        let npy = bnlab::interop::npy::encode(&p.logits, &[examples, 10]);
        write_output("--logits", out, &npy, options.force)?;
    }
    if options.json {
        let v = serde_json::json!({
            "model": path, "test_acc": acc, "examples": examples,
            "recalibrate_bn": options.recalibrate, "folded": options.fold, "tta_flip": tta_flip,
        });
        println!("{v}");
    } else {
        println!(
            "{}: test accuracy {acc:.4} on {examples} images",
            path.display()
        );
    }
    Ok(())
}

pub(crate) fn export_torch(
    path: &Path,
    out: &Path,
    layout: bnlab::interop::torch::Layout,
    force: bool,
) -> anyhow::Result<()> {
    check_output("--out", out, force)?;
    use bnlab::interop::torch::{export_with_metadata, META_IMAGE_SIZE};
    let ckpt = checkpoint::load_checkpoint(path)?;
    let size = ckpt.config.image_size().to_string();
    let extra = std::collections::BTreeMap::from([(META_IMAGE_SIZE.to_string(), size)]);
    let spec = ckpt.config.model_spec();
    let bytes = export_with_metadata(&ckpt.model, &spec, layout, &extra)?;
    write_output("--out", out, &bytes, force)?;
    eprintln!(
        "bnlab: wrote {} (PyTorch state_dict of {})",
        out.display(),
        ckpt.config.model
    );
    Ok(())
}

pub(crate) fn inspect(path: &Path, full: bool) -> anyhow::Result<()> {
    let ckpt = checkpoint::load_checkpoint(path)?;
    let mut model = ckpt.model;
    let layers = bnlab::report::inspect::describe(&mut model);
    if layers.is_empty() {
        println!(
            "{}: the model has no batch-norm layers",
            ckpt.path.display()
        );
    }
    for layer in layers {
        println!("{} ({} channels)", layer.name, layer.channels);
        for (what, values) in layer.vectors {
            println!(
                "  {what:<12} {}",
                bnlab::report::inspect::format_values(&values, full)
            );
        }
    }
    Ok(())
}

/// `inspect --weights`: the file's keys, shapes and dtypes, then the models they fit.
pub(crate) fn inspect_weights(
    path: &Path,
    renames: &[bnlab::interop::state_dict::Rename],
) -> anyhow::Result<()> {
    use bnlab::interop::state_dict::StateDict;
    use bnlab::interop::torch;
    let dict = StateDict::read(path)
        .and_then(|d| d.renamed(renames))
        .map_err(|e| anyhow::anyhow!("--weights {}: {e}", path.display()))?;
    println!(
        "{}: {}, {} tensors",
        path.display(),
        dict.format,
        dict.tensors.len()
    );
    let width = dict.tensors.keys().map(String::len).max().unwrap_or(0);
    for (key, t) in &dict.tensors {
        let dims: Vec<String> = t.shape.iter().map(usize::to_string).collect();
        println!(
            "  {key:<width$}  {:<4} [{}]",
            format!("{:?}", t.dtype),
            dims.join(",")
        );
    }
    let fits = torch::fitting_models(&dict);
    match fits.first() {
        Some(best) if best.differences == 0 => {
            let names: Vec<String> = fits
                .iter()
                .filter(|f| f.differences == 0)
                .map(|f| f.to_string())
                .collect();
            println!("the state_dict of: {}", names.join("; "));
        }
        Some(best) => println!(
            "the state_dict of no bnlab model; closest: {best} ({} keys missing, {} unexpected, \
             {} of another shape; `eval --weights` lists them)",
            best.missing, best.unexpected, best.shapes
        ),
        None => println!("the state_dict of no bnlab model"),
    }
    Ok(())
}
