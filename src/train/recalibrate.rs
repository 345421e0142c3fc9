//! Precise BN: running statistics re-estimated over the training set.
//!
//! The exponential moving average lags behind weights that change fast (lr 1.0 in the
//! chapter), and eval-mode accuracy then jumps from epoch to epoch (d2l-en issue 2108). Here
//! each BN layer's running mean and variance become the size-weighted average of the batch
//! statistics over one pass of the training set in training mode, with the weights fixed: for
//! batch k of n_k examples after N_k examples in all, the new batch weighs n_k / N_k, which makes
//! the result the exact average. No gradient is taken and no parameter changes.

use crate::data::{batches, Split};
use crate::models::Model;

use super::train_device;
use crate::data::input_batch;

/// Returns `model` (on the training device) with recalibrated running statistics.
pub fn recalibrate_bn(
    model: Model,
    split: &Split,
    batch_size: usize,
    size: usize,
    limit: Option<usize>,
) -> Model {
    let device = train_device();
    let mut model = burn::module::Module::train(model);
    let saved: Vec<_> = model
        .norms_mut()
        .iter()
        .map(|(_, l)| l.running_update())
        .collect();
    // Group, layer and instance norm keep no running statistics: nothing to re-estimate.
    if saved.iter().all(Option::is_none) {
        return model;
    }
    // Without gradients the forward passes build no graph: Burn's autodiff frees a dropped
    // graph (and the activations it saved) only at a backward pass, and speedrun's ten passes
    // of precise BN held about 1.75 GB until then. Every parameter of bnlab's models takes a
    // gradient, so they all take one again at the end.
    let mut model = burn::module::Module::no_grad(model);
    let order: Vec<usize> = (0..split.len()).collect();
    let mut chunks = batches(&order, batch_size, true);
    if let Some(limit) = limit {
        chunks.truncate(limit);
    }
    let mut seen = 0usize;
    for indices in chunks {
        seen += indices.len();
        let weight = indices.len() as f64 / seen as f64;
        for (_, layer) in model.norms_mut() {
            layer.set_new_batch_weight(weight);
        }
        let (images, _) = input_batch(split, indices, size, &device);
        // Training-mode forward: it updates the running statistics; the graph is dropped.
        drop(model.forward(images));
    }
    for ((_, layer), update) in model.norms_mut().into_iter().zip(saved) {
        if let Some(update) = update {
            layer.set_running_update(update);
        }
    }
    burn::module::Module::set_require_grad(model, true)
}
