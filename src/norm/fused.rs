//! `--norm fused`: training-mode batch norm as one hand-written op on the Flex backend, with a
//! hand-derived backward, through Burn's backend extension.
//!
//! The composed layer ([`super::functional::normalize_train`]) runs a dozen tensor ops, each a
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
//! On Burn's CubeCL backend (wgpu, CUDA), [`super::fused_cube`] implements the same op in
//! float32 without the epilogue, which is then composed from Burn ops. Other backends, and
//! other dtypes, take the composed path: see [`try_normalize_train`].

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::{Flex, FlexTensor};
use burn::backend::tensor::FloatTensor;
#[cfg(any(feature = "wgpu", feature = "cuda"))]
#[allow(unused_imports)] // named by the generated dispatch
use burn::backend::Cube;
use burn::backend::{
    backend_extension, Autodiff, AutodiffBackend, Backend, Dispatch, DispatchDevice,
};
use std::marker::PhantomData;

use burn::tensor::{DType, Device, Tensor, TensorData};

use super::functional::{channels_of, BatchStats, BnError};
use super::kernels::{self, ChannelStats, Dims, Epilogue, Real};

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

/// Which kernel family runs the fused op on a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// The Flex CPU kernels: float32 and float64, with the epilogue in the same pass.
    Flex,
    /// The CubeCL kernels (wgpu, CUDA): float32, the epilogue composed after.
    Cube,
}

/// The kernel family of the fused op on `device` (with or without autodiff), if it has one.
pub fn family(device: &Device) -> Option<Family> {
    fn of(device: &DispatchDevice) -> Option<Family> {
        match device {
            DispatchDevice::Flex(_) => Some(Family::Flex),
            #[cfg(any(feature = "wgpu", feature = "cuda"))]
            DispatchDevice::Cube(_) => Some(Family::Cube),
            DispatchDevice::Autodiff(inner) => of(inner),
            #[allow(unreachable_patterns)]
            _ => None,
        }
    }
    of(device.as_dispatch())
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
    let y = super::functional::apply_epilogue(Tensor::from_dispatch(y), after);
    Some(Ok((y, stats)))
}

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

/// The element types the kernels run on, as Flex stores them.
pub(crate) trait Element: Real + burn::tensor::Element + bytemuck::Pod {}
impl<E: Real + burn::tensor::Element + bytemuck::Pod> Element for E {}

pub(crate) fn contiguous(t: &FlexTensor) -> FlexTensor {
    if t.is_contiguous() {
        t.clone()
    } else {
        t.to_contiguous()
    }
}

pub(crate) fn slice<E: Element>(t: &FlexTensor) -> &[E] {
    t.as_slice::<E>()
        .expect("a contiguous Flex tensor of the expected dtype")
}

pub(crate) fn tensor<E: burn::tensor::Element>(values: Vec<E>, shape: Vec<usize>) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape))
}

fn stats_from<E: Real>(saved: &[[f64; 3]]) -> Vec<ChannelStats<E>> {
    saved
        .iter()
        .map(|&[pivot, shifted_mean, inv_std]| ChannelStats {
            pivot: E::from_f64(pivot),
            shifted_mean: E::from_f64(shifted_mean),
            inv_std: E::from_f64(inv_std),
            mean: 0.0,
            var: 0.0,
        })
        .collect()
}

/// `(H, W)` of a 4-d shape, what pooling works on; `(S, 1)` otherwise, where nothing pools.
fn plane_of(shape: &[usize]) -> (usize, usize) {
    match shape {
        [_, _, h, w] => (*h, *w),
        _ => (shape[2..].iter().product(), 1),
    }
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
        let (stats, activations, pooled) = kernels::train_forward(
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
        let mean = stats.iter().map(|s| E::from_f64(s.mean)).collect();
        let var = stats.iter().map(|s| E::from_f64(s.var)).collect();
        let saved = stats
            .iter()
            .map(|s| {
                [
                    s.pivot.to_f64(),
                    s.shifted_mean.to_f64(),
                    s.inv_std.to_f64(),
                ]
            })
            .collect();
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
        let stats = stats_from::<E>(&saved.stats);
        let (xs, dys, gamma) = (slice::<E>(&saved.x), slice::<E>(dy), slice(&saved.gamma));
        let (sums, dx) = kernels::train_backward(
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
#[cfg(any(feature = "wgpu", feature = "cuda"))]
pub(crate) use plain_fused_batch_norm;

plain_fused_batch_norm!(Flex);

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

/// An [`Epilogue`] alone (the activation, then the pool) as one Flex op, with its backward:
/// what runs after a layer that has no BN (plain LeNet), after a composed BN layer, and in eval
/// mode after a BN folded into its conv. Burn's ops would take a pass for each layer, forward
/// and backward, and compute the sigmoid with scalar `expf`.
#[backend_extension(Flex, Autodiff)]
pub trait EpilogueBackend: Backend {
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
        let (activations, pooled) = kernels::forward(
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
