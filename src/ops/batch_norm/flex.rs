//! The fused BN op on Flex tensors: the plain forward and backward that the op's impls for
//! `Flex` and `Autodiff<Flex>` run, around the slice passes of [`super::channels`].

use burn::backend::flex::{Flex, FlexTensor};
use burn::backend::tensor::FloatTensor;
use burn::tensor::DType;

use super::channels;
use super::stats::{batch_outputs, from_saved};
use super::{plain_fused_batch_norm, FusedBatchNormBackend, FusedKernels};
use crate::norm::epilogue::Epilogue;
use crate::ops::cpu::Dims;
use crate::ops::flex::{contiguous, plane_of, slice, tensor, Element};

/// What the backward needs: the input, gamma, each channel's statistics, and the epilogue
/// with the activations it saw.
#[derive(Debug, Clone)]
pub struct Saved {
    x: FlexTensor,
    gamma: FlexTensor,
    /// Per channel: pivot, shifted mean, inverse std (as float64, whatever the dtype).
    stats: Vec<[f64; 3]>,
    epilogue: Epilogue,
    /// The activations before the pool (full size); `None` for [`Epilogue::NONE`].
    activations: Option<FlexTensor>,
}

/// Forward on plain Flex tensors: `(y, mean, var, saved)`.
fn forward(
    x: FlexTensor,
    gamma: FlexTensor,
    beta: FlexTensor,
    eps: f64,
    epilogue: Epilogue,
) -> (FlexTensor, FlexTensor, FlexTensor, Saved) {
    fn typed<E: Element>(
        x: &FlexTensor,
        gamma: &FlexTensor,
        beta: &FlexTensor,
        eps: f64,
        epilogue: Epilogue,
    ) -> (
        FlexTensor,
        Option<FlexTensor>,
        FlexTensor,
        FlexTensor,
        Vec<[f64; 3]>,
    ) {
        let shape = x.layout().shape().to_vec();
        let dims = Dims::of(&shape);
        let (stats, activations, pooled) = channels::train_forward(
            slice::<E>(x),
            dims,
            plane_of(&shape),
            eps,
            slice(gamma),
            slice(beta),
            epilogue,
        );
        let activations = tensor(activations, shape.clone());
        let pooled = pooled.map(|p| {
            let out_shape = epilogue.output_shape(&shape).expect("checked by applies()");
            tensor(p, out_shape)
        });
        let (mean, var, saved) = batch_outputs(&stats);
        (
            activations,
            pooled,
            tensor(mean, vec![dims.c]),
            tensor(var, vec![dims.c]),
            saved,
        )
    }
    let (x, gamma, beta) = (contiguous(&x), contiguous(&gamma), contiguous(&beta));
    let (activations, pooled, mean, var, stats) = match x.dtype() {
        DType::F64 => typed::<f64>(&x, &gamma, &beta, eps, epilogue),
        _ => typed::<f32>(&x, &gamma, &beta, eps, epilogue),
    };
    let y = pooled.unwrap_or_else(|| activations.clone());
    let saved = Saved {
        x,
        gamma,
        stats,
        epilogue,
        activations: (!epilogue.is_none()).then_some(activations),
    };
    (y, mean, var, saved)
}

/// Backward on plain Flex tensors: `(dx, dgamma, dbeta)`, `dx` only if `need_dx`.
fn backward(
    saved: &Saved,
    dy: FlexTensor,
    need_dx: bool,
) -> (Option<FlexTensor>, FlexTensor, FlexTensor) {
    fn typed<E: Element>(
        saved: &Saved,
        dy: &FlexTensor,
        need_dx: bool,
    ) -> (Option<FlexTensor>, FlexTensor, FlexTensor) {
        let shape = saved.x.layout().shape().to_vec();
        let dims = Dims::of(&shape);
        let stats = from_saved::<E>(&saved.stats);
        let (xs, dys, gamma) = (slice::<E>(&saved.x), slice::<E>(dy), slice(&saved.gamma));
        let (sums, dx) = channels::train_backward(
            xs,
            dys,
            saved.activations.as_ref().map(slice::<E>),
            dims,
            plane_of(&shape),
            &stats,
            gamma,
            saved.epilogue,
            need_dx,
        );
        let dgamma = sums.iter().map(|s| E::from_f64(s.1)).collect();
        let dbeta = sums.iter().map(|s| E::from_f64(s.0)).collect();
        (
            dx.map(|dx| tensor(dx, shape)),
            tensor(dgamma, vec![dims.c]),
            tensor(dbeta, vec![dims.c]),
        )
    }
    let dy = contiguous(&dy);
    match saved.x.dtype() {
        DType::F64 => typed::<f64>(saved, &dy, need_dx),
        _ => typed::<f32>(saved, &dy, need_dx),
    }
}

impl FusedKernels for Flex {
    type Saved = Saved;

    fn forward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        eps: f64,
        epilogue: Epilogue,
    ) -> (FlexTensor, FlexTensor, FlexTensor, Saved) {
        forward(x, gamma, beta, eps, epilogue)
    }

    fn backward(
        saved: &Saved,
        dy: FlexTensor,
        need_dx: bool,
    ) -> (Option<FlexTensor>, FlexTensor, FlexTensor) {
        backward(saved, dy, need_dx)
    }
}

plain_fused_batch_norm!(Flex);
