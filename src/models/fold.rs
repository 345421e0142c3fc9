//! BN folding for inference: an eval-mode BN right after a conv or linear layer is an affine
//! map per output channel, so it can be merged into that layer's weights and bias:
//! `W' = W · s`, `b' = b · s + t` with `s = γ / √(σ² + ε)` and `t = β − μ · s`.
//!
//! Folded: every BN layer a model lists with a partner, the conv or linear layer right before
//! it (all of LeNet-BN's and lenet-gluon's, all of ResNet-18's, DenseNet's stem). DenseNet's
//! other BN layers come *before* their conv (BN → ReLU → Conv), where there is nothing to fold
//! into; they stay.

use burn::module::Param;
use burn::nn::conv::Conv2d;
use burn::nn::Linear;
use burn::tensor::Tensor;

use super::{LayerMut, Model};
use crate::norm::NormLayer;

/// `model` (in eval mode) with every BN that has a partner (see [`super::NamedLayer`])
/// merged into it.
pub fn fold_bn(mut model: Model) -> Model {
    let mut layers = model.layers().layers;
    for i in 0..layers.len() {
        let Some(partner) = layers[i].partner else {
            continue;
        };
        // Partners are listed before their BN layer.
        let (before, from) = layers.split_at_mut(i);
        let LayerMut::Norm(norm) = &mut from[0].layer else {
            continue;
        };
        match &mut before[partner].layer {
            LayerMut::Conv(conv) => fold_conv(conv, norm),
            LayerMut::Linear(linear) => fold_linear(linear, norm),
            LayerMut::Norm(_) => {}
        }
    }
    drop(layers);
    model
}

fn folded_bias(bias: Option<&Param<Tensor<1>>>, scale: &Tensor<1>, shift: Tensor<1>) -> Tensor<1> {
    match bias {
        Some(b) => b.val() * scale.clone() + shift,
        None => shift,
    }
}

fn fold_conv(conv: &mut Conv2d, norm: &mut Option<NormLayer>) {
    let Some((scale, shift)) = norm.as_ref().and_then(NormLayer::eval_affine) else {
        return;
    };
    let out_channels = scale.dims()[0];
    // OIHW: one scale per output channel, axis 0.
    let weight = conv.weight.val() * scale.clone().reshape([out_channels, 1, 1, 1]);
    conv.bias = Some(Param::from_tensor(folded_bias(
        conv.bias.as_ref(),
        &scale,
        shift,
    )));
    conv.weight = Param::from_tensor(weight);
    *norm = None;
}

fn fold_linear(linear: &mut Linear, norm: &mut Option<NormLayer>) {
    let Some((scale, shift)) = norm.as_ref().and_then(NormLayer::eval_affine) else {
        return;
    };
    let out_features = scale.dims()[0];
    // Burn stores the weight as [in, out]: one scale per column.
    let weight = linear.weight.val() * scale.clone().reshape([1, out_features]);
    linear.bias = Some(Param::from_tensor(folded_bias(
        linear.bias.as_ref(),
        &scale,
        shift,
    )));
    linear.weight = Param::from_tensor(weight);
    *norm = None;
}
