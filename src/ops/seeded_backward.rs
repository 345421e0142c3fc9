//! W6's backward from a given upstream gradient, as `torch.autograd.grad(y, params, g)`.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::{Flex, FlexTensor};
use burn::backend::tensor::FloatTensor;
use burn::backend::{backend_extension, Autodiff, Backend, Dispatch};
use burn::tensor::Tensor;

use super::{family, Family};

/// Backward from a given upstream gradient, as `torch.autograd.grad(y, params, g)` does: the W6
/// benchmark feeds `g` straight in, where `(y * g).sum().backward()` would add three passes over
/// memory to what it times.
#[backend_extension(Flex, Autodiff)]
pub trait SeededBackwardBackend: Backend {
    /// A scalar (zero: its value means nothing) whose backward gives `y` the gradient `upstream`.
    fn seed_backward(y: FloatTensor<Self>, upstream: FloatTensor<Self>) -> FloatTensor<Self>;
}

impl SeededBackwardBackend for Flex {
    fn seed_backward(y: FloatTensor<Self>, _upstream: FloatTensor<Self>) -> FloatTensor<Self> {
        FlexTensor::zeros(vec![1].into(), y.dtype())
    }
}

#[derive(Debug)]
struct SeedBackward;

impl Backward<Flex, 1> for SeedBackward {
    type State = FlexTensor;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_y] = ops.parents;
        // The scalar's own gradient (1) is consumed and replaced by the given upstream gradient.
        let _ = grads.consume::<Flex>(&ops.node);
        if let Some(node) = node_y {
            grads.register::<Flex>(node.id, ops.state);
        }
    }
}

impl<C: CheckpointStrategy> SeededBackwardBackend for Autodiff<Flex, C> {
    fn seed_backward(y: FloatTensor<Self>, upstream: FloatTensor<Self>) -> FloatTensor<Self> {
        let out = FlexTensor::zeros(vec![1].into(), y.primitive().dtype());
        match SeedBackward
            .prepare::<C>([y.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish(upstream.primitive().clone(), out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        }
    }
}

/// The gradients of everything `y` depends on, for the upstream gradient `upstream` (same shape
/// as `y`); `None` off Flex, where the caller can use `(y * upstream).sum().backward()` (one
/// fused multiply-and-sum kernel on a GPU, where this would save little).
pub fn backward_with<const D: usize>(
    y: Tensor<D>,
    upstream: Tensor<D>,
) -> Option<burn::tensor::Gradients> {
    if family(&y.device()) != Some(Family::Flex) || y.dims() != upstream.dims() {
        return None;
    }
    let seed = <Dispatch as SeededBackwardBackend>::seed_backward(
        y.into_dispatch(),
        upstream.into_dispatch(),
    );
    Some(Tensor::<1>::from_dispatch(seed).backward())
}
