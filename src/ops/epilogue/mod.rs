//! An [`Epilogue`] alone (an activation, then a `k × k` pool) as one Flex op with its own
//! backward; its loops are in [`kernels`], which the fused BN op calls too.

pub mod kernels;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::{Flex, FlexTensor};
use burn::backend::tensor::FloatTensor;
use burn::backend::{backend_extension, Autodiff, Backend, Dispatch};
use burn::tensor::{DType, Tensor};

use super::batch_norm::stats::ChannelStats;
use super::cpu::Dims;
use super::flex::{contiguous, plane_of, slice, tensor, Element};
use super::{family, Family};
use crate::norm::epilogue::{compose_epilogue, Epilogue};

/// `epilogue` (an activation, then a `k × k` pool of stride `k`): on Flex by one op with its
/// own backward ([`try_epilogue_only`]), elsewhere by [`compose_epilogue`].
///
/// # Panics
/// If `epilogue` pools and `x` is not `(N, C, H, W)` of at least `k × k`.
pub fn apply_epilogue<const D: usize>(x: Tensor<D>, epilogue: Epilogue) -> Tensor<D> {
    match try_epilogue_only(&x, epilogue) {
        Some(y) => y,
        None => compose_epilogue(x, epilogue),
    }
}

/// An [`Epilogue`] alone (the activation, then the pool) as one Flex op, with its backward:
/// what runs after a layer that has no BN (plain LeNet), after a composed BN layer, and in eval
/// mode after a BN folded into its conv. Burn's ops would take a pass for each layer, forward
/// and backward, and compute the sigmoid with scalar `expf`.
#[backend_extension(Flex, Autodiff)]
pub trait EpilogueBackend: Backend {
    /// `epilogue` on `x` (`(N, C, H, W)` when it pools).
    fn epilogue_only(x: FloatTensor<Self>, epilogue: Epilogue) -> FloatTensor<Self>;
}

/// What the epilogue's backward needs: its activations (full size) and itself.
#[derive(Debug, Clone)]
pub struct EpilogueSaved {
    activations: FlexTensor,
    epilogue: Epilogue,
}

/// The epilogue's forward on a plain Flex tensor: the output, and what the backward needs.
fn epilogue_forward(x: FlexTensor, epilogue: Epilogue) -> (FlexTensor, EpilogueSaved) {
    fn typed<E: Element>(x: &FlexTensor, epilogue: Epilogue) -> (FlexTensor, FlexTensor) {
        let shape = x.layout().shape().to_vec();
        let dims = Dims::of(&shape);
        // The fused forward with the identity for BN: x̂ = x, gamma 1, beta 0.
        let identity = ChannelStats {
            pivot: E::ZERO,
            shifted_mean: E::ZERO,
            inv_std: E::ONE,
            mean: 0.0,
            var: 0.0,
        };
        let (activations, pooled) = crate::ops::batch_norm::planes::forward(
            slice::<E>(x),
            dims,
            plane_of(&shape),
            &vec![identity; dims.c],
            &vec![E::ONE; dims.c],
            &vec![E::ZERO; dims.c],
            epilogue,
        );
        let activations = tensor(activations, shape.clone());
        let out_shape = epilogue
            .output_shape(&shape)
            .expect("checked by the caller");
        let y = pooled.map_or_else(|| activations.clone(), |p| tensor(p, out_shape));
        (y, activations)
    }
    let x = contiguous(&x);
    let (y, activations) = match x.dtype() {
        DType::F64 => typed::<f64>(&x, epilogue),
        _ => typed::<f32>(&x, epilogue),
    };
    let saved = EpilogueSaved {
        activations,
        epilogue,
    };
    (y, saved)
}

/// The epilogue's backward: the gradient at its input, from the gradient at its output.
fn epilogue_backward(saved: &EpilogueSaved, dout: FlexTensor) -> FlexTensor {
    fn typed<E: Element>(saved: &EpilogueSaved, dout: &FlexTensor) -> FlexTensor {
        let shape = saved.activations.layout().shape().to_vec();
        let dz = kernels::epilogue_grad(
            slice::<E>(&saved.activations),
            slice::<E>(dout),
            Dims::of(&shape),
            plane_of(&shape),
            saved.epilogue,
        );
        tensor(dz, shape)
    }
    let dout = contiguous(&dout);
    match dout.dtype() {
        DType::F64 => typed::<f64>(saved, &dout),
        _ => typed::<f32>(saved, &dout),
    }
}

impl EpilogueBackend for Flex {
    fn epilogue_only(x: FlexTensor, epilogue: Epilogue) -> FlexTensor {
        epilogue_forward(x, epilogue).0
    }
}

#[derive(Debug)]
struct EpilogueBackward;

impl Backward<Flex, 1> for EpilogueBackward {
    type State = EpilogueSaved;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x] = ops.parents;
        let dout = grads.consume::<Flex>(&ops.node);
        if let Some(node) = node_x {
            grads.register::<Flex>(node.id, epilogue_backward(&ops.state, dout));
        }
    }
}

impl<C: CheckpointStrategy> EpilogueBackend for Autodiff<Flex, C> {
    fn epilogue_only(x: FloatTensor<Self>, epilogue: Epilogue) -> FloatTensor<Self> {
        let prepared = EpilogueBackward
            .prepare::<C>([x.node()])
            .compute_bound()
            .stateful();
        let (y, saved) = epilogue_forward(x.primitive().clone(), epilogue);
        match prepared {
            OpsKind::Tracked(prep) => prep.finish(saved, y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        }
    }
}

/// `epilogue` applied to `x` by the Flex op, or `None` where it does not apply: off Flex, for
/// other dtypes, or for an epilogue that does nothing.
pub fn try_epilogue_only<const D: usize>(x: &Tensor<D>, epilogue: Epilogue) -> Option<Tensor<D>> {
    let applies = family(&x.device()) == Some(Family::Flex)
        && !epilogue.is_none()
        && matches!(x.dtype(), DType::F32 | DType::F64)
        && epilogue.output_shape(&x.dims()).is_ok();
    applies.then(|| {
        Tensor::from_dispatch(<Dispatch as EpilogueBackend>::epilogue_only(
            x.clone().into_dispatch(),
            epilogue,
        ))
    })
}
