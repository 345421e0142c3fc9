//! `--norm fused`: training-mode batch norm as one hand-written op on the Flex backend, with a
//! hand-derived backward, through Burn's backend extension.
//!
//! The composed layer ([`crate::norm::functional::normalize_train`]) runs a dozen tensor ops, each a
//! full pass over memory, and autodiff keeps their intermediates for the backward. The fused op
//! makes two passes forward (statistics, output) and two backward (sums, input gradient), and
//! keeps only the input and three numbers per channel.
//!
//! Backward, for `x̂ = (x - μ)/σ`, `y = γ x̂ + β`, `M` values per channel:
//! - `dβ = Σ dy`, `dγ = Σ dy·x̂`;
//! - `dx = γ/σ · (dy - dβ/M - x̂ · dγ/M)`.
//!
//! The op can also apply what follows BN in a network (an [`Epilogue`]: sigmoid or ReLU, then
//! a `k × k` average or max pool) while it writes its output, and take the gradient back
//! through it before the sums above: `dy` is then the pool's backward of the upstream
//! gradient times the activation's derivative, computed from the saved activations. LeNet's
//! `conv → BN → sigmoid → pool` blocks thus cost one op instead of three, each a pass over
//! memory forward and backward.
//!
//! On Burn's CubeCL backend (wgpu, CUDA), `cube` (built with the `wgpu` or `cuda` feature)
//! implements the same op in float32 without the epilogue, which is then composed from Burn ops. Other backends, and
//! other dtypes, take the composed path: see [`try_normalize_train`].

pub mod channels;
#[cfg(any(feature = "wgpu", feature = "cuda"))]
pub mod cube;
pub mod flex;
pub mod planes;
pub mod rows;
pub mod stats;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;
#[cfg(any(feature = "wgpu", feature = "cuda"))]
#[allow(unused_imports)] // named by the generated dispatch
use burn::backend::Cube;
use burn::backend::{backend_extension, Autodiff, AutodiffBackend, Backend, Dispatch};
use std::marker::PhantomData;

use burn::tensor::{DType, Device, Tensor};

use super::{family, Family};
use crate::norm::epilogue::Epilogue;
use crate::norm::functional::{channels_of, BatchStats, BnError};

/// The fused training-mode batch norm as a backend op: implemented for Flex, for CubeCL (wgpu,
/// CUDA) and for autodiff over either, whose backward is hand-derived. Reached through
/// [`try_normalize_train`].
#[backend_extension(Flex, Cube: cfg(any(feature = "wgpu", feature = "cuda")), Autodiff)]
pub trait FusedBatchNormBackend: Backend {
    /// Training-mode batch norm over axis 1, then `epilogue`: the output, the batch mean and
    /// the biased batch variance (the last two carry no gradient).
    fn fused_batch_norm_train(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        eps: f64,
        epilogue: Epilogue,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
}

/// Whether the fused op has a kernel for `device` (with or without autodiff).
pub fn supports(device: &Device) -> bool {
    family(device).is_some()
}

/// Whether [`try_normalize_train`] runs the fused kernel for `x` and `epilogue`.
pub fn applies<const D: usize>(x: &Tensor<D>, epilogue: Epilogue) -> bool {
    let dtype_ok = match family(&x.device()) {
        Some(Family::Flex) => matches!(x.dtype(), DType::F32 | DType::F64),
        Some(Family::Cube) => x.dtype() == DType::F32,
        None => false,
    };
    dtype_ok && epilogue.output_shape(&x.dims()).is_ok()
}

/// Training-mode normalisation followed by `epilogue`, by the fused kernel, or `None` where it
/// does not apply (see [`applies`]): the caller then takes the composed path.
pub fn try_normalize_train<const D: usize>(
    x: Tensor<D>,
    gamma: Option<Tensor<1>>,
    beta: Option<Tensor<1>>,
    eps: f64,
    epilogue: Epilogue,
) -> Option<Result<(Tensor<D>, BatchStats), BnError>> {
    if !applies(&x, epilogue) {
        return None;
    }
    let dims = x.dims();
    let expected = gamma.as_ref().map(|g| g.dims()[0]);
    let channels = match channels_of(&dims, expected) {
        Ok(channels) => channels,
        Err(e) => return Some(Err(e)),
    };
    let count = dims.iter().product::<usize>() / channels;
    if count < 2 {
        return Some(Err(BnError::SingleValuePerChannel {
            shape: dims.to_vec(),
        }));
    }
    let device = x.device();
    let dtype = x.dtype();
    // Without affine parameters the op still takes them, as constants that carry no gradient.
    let gamma = gamma.unwrap_or_else(|| Tensor::ones([channels], (&device, dtype)));
    let beta = beta.unwrap_or_else(|| Tensor::zeros([channels], (&device, dtype)));
    // The CubeCL kernels normalise only; what follows BN is composed after them.
    let (in_kernel, after) = match family(&device) {
        Some(Family::Flex) => (epilogue, Epilogue::NONE),
        _ => (Epilogue::NONE, epilogue),
    };
    let (y, mean, var) = <Dispatch as FusedBatchNormBackend>::fused_batch_norm_train(
        x.into_dispatch(),
        gamma.into_dispatch(),
        beta.into_dispatch(),
        eps,
        in_kernel,
    );
    let stats = BatchStats {
        mean: Tensor::from_dispatch(mean),
        var: Tensor::from_dispatch(var),
        count,
    };
    let y = crate::ops::epilogue::apply_epilogue(Tensor::from_dispatch(y), after);
    Some(Ok((y, stats)))
}

/// The hand-written forward and backward of the fused op on one backend family; the plain and
/// autodiff impls of [`FusedBatchNormBackend`] are built on it.
pub(crate) trait FusedKernels: Backend {
    /// What the forward keeps for the backward.
    type Saved: Clone + Send + std::fmt::Debug + 'static;

    /// `(y, mean, var, saved)`.
    fn forward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        eps: f64,
        epilogue: Epilogue,
    ) -> (
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        Self::Saved,
    );

    /// `(dx, dgamma, dbeta)`, `dx` only if `need_dx`.
    fn backward(
        saved: &Self::Saved,
        dy: FloatTensor<Self>,
        need_dx: bool,
    ) -> (
        Option<FloatTensor<Self>>,
        FloatTensor<Self>,
        FloatTensor<Self>,
    );
}

/// The op on a plain (no autodiff) backend with [`FusedKernels`].
macro_rules! plain_fused_batch_norm {
    ($backend:ty) => {
        impl FusedBatchNormBackend for $backend {
            fn fused_batch_norm_train(
                x: FloatTensor<Self>,
                gamma: FloatTensor<Self>,
                beta: FloatTensor<Self>,
                eps: f64,
                epilogue: Epilogue,
            ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
                let (y, mean, var, _) =
                    <Self as FusedKernels>::forward(x, gamma, beta, eps, epilogue);
                (y, mean, var)
            }
        }
    };
}
pub(crate) use plain_fused_batch_norm;

#[derive(Debug)]
struct FusedBatchNormBackward<B>(PhantomData<B>);

impl<B: FusedKernels> Backward<B, 3> for FusedBatchNormBackward<B> {
    type State = B::Saved;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_gamma, node_beta] = ops.parents;
        let dy = grads.consume::<B>(&ops.node);
        let (dx, dgamma, dbeta) = B::backward(&ops.state, dy, node_x.is_some());
        if let (Some(node), Some(dx)) = (node_x, dx) {
            grads.register::<B>(node.id, dx);
        }
        if let Some(node) = node_gamma {
            grads.register::<B>(node.id, dgamma);
        }
        if let Some(node) = node_beta {
            grads.register::<B>(node.id, dbeta);
        }
    }
}

impl<B: FusedKernels, C: CheckpointStrategy> FusedBatchNormBackend for Autodiff<B, C> {
    fn fused_batch_norm_train(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        eps: f64,
        epilogue: Epilogue,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let prepared = FusedBatchNormBackward::<B>(PhantomData)
            .prepare::<C>([x.node(), gamma.node(), beta.node()])
            .compute_bound()
            .stateful();
        let (y, mean, var, saved) = B::forward(
            x.primitive().clone(),
            gamma.primitive().clone(),
            beta.primitive().clone(),
            eps,
            epilogue,
        );
        let y = match prepared {
            OpsKind::Tracked(prep) => prep.finish(saved, y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        };
        (y, Self::from_inner(mean), Self::from_inner(var))
    }
}
