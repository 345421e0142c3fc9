//! BN folding for inference: an eval-mode BN right after a conv or linear layer is an affine
//! map per output channel, so it can be merged into that layer's weights and bias:
//! `W' = W · s`, `b' = b · s + t` with `s = γ / √(σ² + ε)` and `t = β − μ · s`.
//!
//! Folded: every conv → BN and linear → BN pair (all of LeNet-BN's and lenet-gluon's, all of
//! ResNet-18's, DenseNet's stem). DenseNet's other BN layers come *before* their conv
//! (BN → ReLU → Conv), where there is nothing to fold into; they stay.

use burn::module::Param;
use burn::nn::conv::Conv2d;
use burn::nn::Linear;
use burn::tensor::Tensor;

use super::Model;
use crate::norm::NormLayer;

/// `model` (in eval mode) with every foldable BN merged into the layer before it.
pub fn fold_bn(mut model: Model) -> Model {
    match &mut model {
        Model::LeNet(m) => {
            fold_conv(&mut m.conv1, &mut m.bn1);
            fold_conv(&mut m.conv2, &mut m.bn2);
            fold_linear(&mut m.fc1, &mut m.bn3);
            fold_linear(&mut m.fc2, &mut m.bn4);
        }
        Model::Gluon(m) => {
            fold_conv(&mut m.conv1, &mut m.bn1);
            fold_conv(&mut m.conv2, &mut m.bn2);
        }
        Model::ResNet(m) => {
            fold_conv(&mut m.stem.conv, &mut m.stem.bn);
            for block in m.stages.iter_mut().flatten() {
                fold_conv(&mut block.conv1, &mut block.bn1);
                fold_conv(&mut block.conv2, &mut block.bn2);
            }
        }
        Model::DenseNet(m) => fold_conv(&mut m.stem.conv, &mut m.stem.bn),
    }
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
