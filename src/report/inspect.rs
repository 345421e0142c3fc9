//! What `bnlab inspect` shows: each BN layer's gamma, beta and running statistics.

use crate::models::Model;
use crate::norm::NormLayer;

/// One BN layer's state, as `bnlab inspect` prints it.
pub struct LayerReport {
    /// The layer's name in the model (`bn1`, `b2.0.bn1`, ...).
    pub name: String,
    /// Its number of channels.
    pub channels: usize,
    /// `(quantity, per-channel values)`: gamma, beta, running_mean, running_var.
    pub vectors: Vec<(&'static str, Vec<f32>)>,
}

fn values(t: burn::tensor::Tensor<1>) -> Vec<f32> {
    t.into_data().iter::<f32>().collect()
}

/// Reads every BN layer of `model` (a mutable borrow only because layers are listed that way).
pub fn describe(model: &mut Model) -> Vec<LayerReport> {
    model
        .norms_mut()
        .into_iter()
        .map(|(name, layer)| {
            let mut vectors = Vec::new();
            let channels = layer.num_features();
            let (gamma, beta, stats) = match layer {
                NormLayer::Scratch(bn) => (
                    bn.gamma.as_ref().map(|p| p.val()),
                    bn.beta.as_ref().map(|p| p.val()),
                    bn.running_stats(),
                ),
                NormLayer::Burn(bn) => (
                    Some(bn.gamma.val()),
                    Some(bn.beta.val()),
                    Some((bn.running_mean.value(), bn.running_var.value())),
                ),
                NormLayer::Group(norm) => (
                    norm.gamma.as_ref().map(|p| p.val()),
                    norm.beta.as_ref().map(|p| p.val()),
                    None,
                ),
            };
            vectors.extend(gamma.map(|t| ("gamma", values(t))));
            vectors.extend(beta.map(|t| ("beta", values(t))));
            if let Some((mean, var)) = stats {
                vectors.push(("running_mean", values(mean)));
                vectors.push(("running_var", values(var)));
            }
            LayerReport {
                name,
                channels,
                vectors,
            }
        })
        .collect()
}

/// All values, or a summary: mean, min, max and the first few.
pub fn format_values(values: &[f32], full: bool) -> String {
    let list = |v: &[f32]| {
        v.iter()
            .map(|x| format!("{x:.4}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    if full {
        return list(values);
    }
    let n = values.len().max(1) as f32;
    let mean = values.iter().sum::<f32>() / n;
    let min = values.iter().cloned().fold(f32::INFINITY, f32::min);
    let max = values.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let head = &values[..values.len().min(4)];
    let more = if values.len() > 4 { " ..." } else { "" };
    format!(
        "mean {mean:.4}  min {min:.4}  max {max:.4}  [{}{more}]",
        list(head)
    )
}
