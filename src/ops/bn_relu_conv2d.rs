//! Training-mode BN → ReLU → Conv as one op on Flex: the layer of DenseNet's dense blocks and
//! transitions. The normalised, rectified tensor is never written: [`super::conv2d`]'s im2col
//! applies `relu(γ·x̂ + β)` to each value as it forms the convolution's columns.
//!
//! A transition's BN → ReLU → Conv 1×1 → AvgPool 2 runs as BN → ReLU → AvgPool 2 → Conv 1×1
//! (`avg_pool`): a 1×1 convolution and an average pool commute (each output is
//! `W·mean(a) + b = mean(W·a + b)`), and pooled first the convolution has a quarter of the
//! positions. The op then writes the pooled activations (a quarter of `x`'s size) and the
//! convolution takes them as they are; the backward recomputes them from `x`.
//!
//! - forward: the batch statistics of `x` (one pass, as the fused BN op computes them), then
//!   the convolution of `x` through that prologue;
//! - backward: the convolution's backward forms its weight gradient's columns through the same
//!   prologue (the activations `a = relu(γ·x̂ + β)`, bit for bit what the forward used, are
//!   never written whole) and gives `da`, `dW` and `db`; the ReLU's mask is recomputed from
//!   `x`, and BN's backward turns `da` into `dx`, `dγ` and `dβ` in place.
//!
//! Between the forward and the backward the op keeps `x` (which the network keeps anyway: it
//! is the dense block's concatenation) and three numbers per channel, where BN then conv kept
//! the activations too; its backward holds one gradient buffer of `x`'s size. Outputs equal those of the fused BN op followed by the convolution
//! exactly: the same statistics, the same arithmetic per value, the same matrix products.

use std::mem::MaybeUninit;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::{Flex, FlexTensor};
use burn::backend::tensor::FloatTensor;
use burn::backend::{backend_extension, Autodiff, AutodiffBackend, Backend, Dispatch};
use burn::nn::conv::Conv2d;
use burn::tensor::{DType, Tensor};

use super::batch_norm::{planes, stats};
use super::conv2d::{
    backward_typed, forward_typed, geometry_of, ConvGeometry, Identity, Prologue, Shape,
};
use super::cpu::{assume_init, fill, simd_fn, uninit, Dims, Real};
use super::epilogue::kernels::{epilogue_grad_plane, pool_plane};
use super::flex::{contiguous, slice, tensor, Element};
use super::{family, Family};
use crate::norm::epilogue::{Activation, Epilogue, Pool};
use crate::norm::functional::BatchStats;

/// BN → ReLU → Conv as a backend op: Flex, and autodiff over Flex with its own backward.
/// Reached through [`try_bn_relu_conv2d`].
#[backend_extension(Flex, Autodiff)]
pub trait BnReluConv2dBackend: Backend {
    /// `conv(relu(γ·x̂ + β))` with batch statistics over axis 1 of `x` `(N, C, H, W)`, or
    /// with `avg_pool` `conv(avg_pool_2x2(relu(γ·x̂ + β)))`, and the batch mean and biased
    /// variance (which carry no gradient).
    #[allow(clippy::too_many_arguments)]
    fn bn_relu_conv2d(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        eps: f64,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        geometry: ConvGeometry,
        avg_pool: bool,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
}

/// Training-mode `conv(relu(bn(x)))` by the fused op, with the batch statistics for the
/// running ones, or with `avg_pool` `conv(avg_pool_2x2(relu(bn(x))))` (a 2×2 average pool of
/// stride 2, the side halved, rounding down); `None` where it does not apply (another backend
/// or dtype, a convolution the im2col kernel does not take, fewer than two values per channel,
/// a side shorter than the pool): the caller composes the layers then. `gamma` and `beta`
/// must have one value per channel of `x`.
pub fn try_bn_relu_conv2d(
    x: Tensor<4>,
    gamma: Tensor<1>,
    beta: Tensor<1>,
    eps: f64,
    conv: &Conv2d,
    avg_pool: bool,
) -> Option<(Tensor<4>, BatchStats)> {
    let geometry = geometry_of(conv, &x)?;
    let [n, c, h, w] = x.dims();
    let count = n * h * w;
    if family(&x.device()) != Some(Family::Flex) || count < 2 || gamma.dims() != [c] {
        return None;
    }
    let [k_h, k_w] = conv.kernel_size;
    let pooled_fits = h >= 2
        && w >= 2
        && h / 2 + 2 * geometry.padding >= k_h
        && w / 2 + 2 * geometry.padding >= k_w;
    if avg_pool && !pooled_fits {
        return None;
    }
    let weight = conv.weight.val();
    let bias = match &conv.bias {
        Some(b) => b.val(),
        None => Tensor::zeros([weight.dims()[0]], (&x.device(), x.dtype())),
    };
    let (y, mean, var) = <Dispatch as BnReluConv2dBackend>::bn_relu_conv2d(
        x.into_dispatch(),
        gamma.into_dispatch(),
        beta.into_dispatch(),
        eps,
        weight.into_dispatch(),
        bias.into_dispatch(),
        geometry,
        avg_pool,
    );
    let stats = BatchStats {
        mean: Tensor::from_dispatch(mean),
        var: Tensor::from_dispatch(var),
        count,
    };
    Some((Tensor::from_dispatch(y), stats))
}

/// BN → ReLU for input channel `c`, as the fused BN op's forward computes it per value.
pub(crate) struct BnRelu<E>(Vec<(stats::ChannelStats<E>, E, E)>);

impl<E: Real> BnRelu<E> {
    pub(crate) fn new(stats: &[stats::ChannelStats<E>], gamma: &[E], beta: &[E]) -> Self {
        Self(
            stats
                .iter()
                .zip(gamma.iter().zip(beta))
                .map(|(&st, (&g, &b))| (st, E::from_f64(g.to_f64() * st.inv_std.to_f64()), b))
                .collect(),
        )
    }
}

impl<E: Real> Prologue<E> for BnRelu<E> {
    const IDENTITY: bool = false;
    #[inline(always)]
    fn channel(&self, c: usize) -> impl Fn(E) -> E + Copy {
        let (st, scale, shift) = self.0[c];
        move |v| Activation::Relu.apply(st.centered(v).mul_add(scale, shift))
    }
}

impl<E: Real> BnRelu<E> {
    /// `da`, the gradient at the ReLU's output, taken through the ReLU in place: multiplied
    /// by its derivative at `relu(γ·x̂ + β)`, which is recomputed from `x` value by value as
    /// the forward computed it (the mask stored activations would give). `x` and `da` are
    /// `(N, C, S)`, the images of `x` `image` values apart.
    ///
    /// With `stats`, also BN's backward sums over the result, per channel `(Σ dz, Σ dz·x̂)`
    /// as [`planes::grad_sums_in`] gives them (planes, `S > 1`): each plane is summed right
    /// after it is taken through, while it is in cache, and the planes' sums are added in
    /// image order, as that pass adds them.
    fn through_relu(
        &self,
        x: &[E],
        image: usize,
        da: &mut [E],
        dims: Dims,
        stats: Option<&[stats::ChannelStats<E>]>,
    ) -> Option<Vec<(f64, f64)>> {
        use rayon::prelude::*;
        debug_assert!(stats.is_none() || dims.s > 1);
        let plane_sums: Vec<(f64, f64)> = da
            .par_chunks_mut(dims.c * dims.s)
            .enumerate()
            .flat_map_iter(|(n, da)| {
                let x = &x[n * image..][..dims.c * dims.s];
                let planes = da.chunks_mut(dims.s).zip(x.chunks(dims.s)).enumerate();
                planes
                    .filter_map(|(c, (da, x))| {
                        relu_through_plane(self.channel(c), x, da);
                        stats.map(|st| planes::dz_sums(x, da, st[c]))
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        let stats = stats?;
        let channel = |c: usize| {
            let planes = (0..dims.n).map(|n| plane_sums[n * dims.c + c]);
            let sums = planes.fold((0.0, 0.0), |(a, b), (p, q)| (a + p, b + q));
            stats[c].xhat_sums(sums)
        };
        Some((0..dims.c).map(channel).collect())
    }
}

simd_fn! {
    /// One plane of [`BnRelu::through_relu`], `f` its channel's BN → ReLU.
    fn relu_through_plane<E: Real>(f: impl Fn(E) -> E + Copy, x: &[E], da: &mut [E]) {
        for (g, &v) in da.iter_mut().zip(x) {
            *g = g.mul(Activation::Relu.derivative_from_output(f(v)));
        }
    }
}

impl<E: Element> BnRelu<E> {
    /// `avg_pool_2x2(relu(γ·x̂ + β))` of `x` `(N, C, H, W)`: `(N, C, ⌊H/2⌋, ⌊W/2⌋)`, as the
    /// fused BN op with its ReLU and average-pool epilogue computes it.
    fn pooled(&self, x: &[E], [n, c, h, w]: [usize; 4]) -> Vec<E> {
        use rayon::prelude::*;
        let (ho, wo) = (h / 2, w / 2);
        let mut out = uninit::<E>(n * c * ho * wo);
        out.par_chunks_mut(ho * wo)
            .zip(x.par_chunks(h * w))
            .enumerate()
            .for_each_init(
                || uninit::<E>(h * w),
                |activated, (plane, (out, x))| {
                    pool_activated(x, self.channel(plane % c), (h, w), activated, out);
                },
            );
        // SAFETY: every plane's ho × wo values were written above.
        unsafe { assume_init(out) }
    }
}

simd_fn! {
    /// One plane of [`BnRelu::pooled`]: `f` of each value into `activated`, then the fused BN
    /// op's 2 × 2 average-pool epilogue over them into `out`.
    fn pool_activated<E: Real>(
        x: &[E],
        f: impl Fn(E) -> E + Copy,
        plane: (usize, usize),
        activated: &mut [MaybeUninit<E>],
        out: &mut [MaybeUninit<E>],
    ) {
        let activated = fill(activated, x.iter().map(|&v| f(v)));
        pool_plane(activated, plane, Pool::Avg(2), out);
    }
}

/// The average pool's backward: `dpooled` `(N, C, ⌊H/2⌋, ⌊W/2⌋)` spread over `(N, C, H, W)`,
/// ¼ of each window's gradient to each of its four places and 0 to a last row or column no
/// window covers, as the fused BN op's average-pool epilogue takes it back.
fn unpool<E: Element>(dpooled: &[E], [n, c, h, w]: [usize; 4]) -> Vec<E> {
    use rayon::prelude::*;
    let (ho, wo) = (h / 2, w / 2);
    let pool_alone = Epilogue {
        activation: Activation::Identity,
        pool: Pool::Avg(2),
    };
    let mut da = uninit::<E>(n * c * h * w);
    da.par_chunks_mut(h * w)
        .zip(dpooled.par_chunks(ho * wo))
        .for_each(|(da, dp)| {
            // An average pool with no activation reads no activations.
            epilogue_grad_plane(&[], dp, (h, w), pool_alone, da);
        });
    // SAFETY: epilogue_grad_plane writes every value of every plane.
    unsafe { assume_init(da) }
}

/// BN → ReLU's backward in place: `da`, the gradient at the ReLU's output, becomes the input
/// gradient (left at BN's output gradient when `need_dx` is false); returns per channel
/// `(Σ dz, Σ dz·x̂)` (dβ, dγ). The activations are not needed: the ReLU's mask is recomputed
/// from `x`, so only `x` and one gradient buffer are alive. The images of `x` lie `image`
/// values apart: `C·S`, or more for the first channels of a dense block's buffer (then
/// `S > 1`); `da` is its own `(N, C, S)` tensor.
#[allow(clippy::too_many_arguments)]
pub(crate) fn bn_relu_backward_in_place<E: Real>(
    x: &[E],
    image: usize,
    da: &mut [E],
    dims: Dims,
    stats: &[stats::ChannelStats<E>],
    gamma: &[E],
    prologue: &BnRelu<E>,
    need_dx: bool,
) -> Vec<(f64, f64)> {
    if dims.s == 1 {
        // (N, C) planes of one value: BN's row passes, as the fused BN op takes them.
        prologue.through_relu(x, image, da, dims, None);
        let sums = planes::grad_sums(x, da, dims, stats);
        if need_dx {
            planes::input_grad_in_place(x, da, dims, stats, gamma, &sums);
        }
        return sums;
    }
    let sums = prologue
        .through_relu(x, image, da, dims, Some(stats))
        .expect("sums asked for");
    if need_dx {
        planes::input_grad_in_place_in(x, image, da, dims, stats, gamma, &sums);
    }
    sums
}

/// What the backward needs.
#[derive(Debug, Clone)]
pub struct Saved {
    x: FlexTensor,
    gamma: FlexTensor,
    beta: FlexTensor,
    weight: FlexTensor,
    /// Per channel: pivot, shifted mean, inverse std (as float64, whatever the dtype).
    stats: Vec<[f64; 3]>,
    geometry: ConvGeometry,
    /// Whether a 2×2 average pool comes between the ReLU and the convolution.
    avg_pool: bool,
}

/// The shape of the convolution's input: `x`'s, or with `avg_pool` the pooled one.
fn conv_input_shape(x: &[usize], avg_pool: bool) -> [usize; 4] {
    match avg_pool {
        true => [x[0], x[1], x[2] / 2, x[3] / 2],
        false => [x[0], x[1], x[2], x[3]],
    }
}

/// The forward on Flex tensors: `(y, mean, var, saved)`.
#[allow(clippy::too_many_arguments)]
fn forward(
    x: FlexTensor,
    gamma: FlexTensor,
    beta: FlexTensor,
    eps: f64,
    weight: FlexTensor,
    bias: FlexTensor,
    geometry: ConvGeometry,
    avg_pool: bool,
) -> (FlexTensor, FlexTensor, FlexTensor, Saved) {
    #[allow(clippy::too_many_arguments)]
    fn typed<E: Element>(
        x: &FlexTensor,
        gamma: &FlexTensor,
        beta: &FlexTensor,
        eps: f64,
        weight: &FlexTensor,
        bias: &FlexTensor,
        s: Shape,
        avg_pool: bool,
    ) -> (FlexTensor, FlexTensor, FlexTensor, Vec<[f64; 3]>) {
        let shape = x.layout().shape().to_vec();
        let dims = Dims::of(&shape);
        let xs = slice::<E>(x);
        let st = stats::channel_stats(xs, dims, eps);
        let prologue = BnRelu::new(&st, slice(gamma), slice(beta));
        let (weight, bias) = (slice(weight), slice(bias));
        let y = match avg_pool {
            true => {
                let pooled = prologue.pooled(xs, conv_input_shape(&shape, false));
                forward_typed(&pooled, weight, bias, s, &Identity)
            }
            false => forward_typed(xs, weight, bias, s, &prologue),
        };
        let (mean, var, saved) = stats::batch_outputs(&st);
        (
            tensor(y, s.output_shape()),
            tensor(mean, vec![dims.c]),
            tensor(var, vec![dims.c]),
            saved,
        )
    }
    let (x, gamma, beta) = (contiguous(&x), contiguous(&gamma), contiguous(&beta));
    let (weight, bias) = (contiguous(&weight), contiguous(&bias));
    let input = conv_input_shape(x.layout().shape(), avg_pool);
    let s = Shape::of(&input, weight.layout().shape(), geometry);
    let (y, mean, var, stats) = match x.dtype() {
        DType::F64 => typed::<f64>(&x, &gamma, &beta, eps, &weight, &bias, s, avg_pool),
        _ => typed::<f32>(&x, &gamma, &beta, eps, &weight, &bias, s, avg_pool),
    };
    let saved = Saved {
        x,
        gamma,
        beta,
        weight,
        stats,
        geometry,
        avg_pool,
    };
    (y, mean, var, saved)
}

/// The gradients `[dx, dgamma, dbeta, dweight, dbias]` of the op's output, `dx` only if
/// `need_dx`.
fn backward(
    saved: &Saved,
    dy: &FlexTensor,
    need_dx: bool,
) -> (Option<FlexTensor>, [FlexTensor; 4]) {
    fn typed<E: Element>(
        saved: &Saved,
        dy: &FlexTensor,
        need_dx: bool,
    ) -> (Option<FlexTensor>, [FlexTensor; 4]) {
        let shape = saved.x.layout().shape().to_vec();
        let dims = Dims::of(&shape);
        let st = stats::from_saved::<E>(&saved.stats);
        let (xs, gamma) = (slice::<E>(&saved.x), slice::<E>(&saved.gamma));
        let prologue = BnRelu::new(&st, gamma, slice(&saved.beta));
        let input = conv_input_shape(&shape, saved.avg_pool);
        let s = Shape::of(&input, saved.weight.layout().shape(), saved.geometry);
        let (weight, dy) = (slice(&saved.weight), slice(dy));
        let (da, dweight, dbias) = match saved.avg_pool {
            true => {
                let pooled = prologue.pooled(xs, conv_input_shape(&shape, false));
                let (dpooled, dweight, dbias) =
                    backward_typed(&pooled, weight, dy, s, true, &Identity);
                let da = dpooled.map(|dp| unpool(&dp, conv_input_shape(&shape, false)));
                (da, dweight, dbias)
            }
            false => backward_typed(xs, weight, dy, s, true, &prologue),
        };
        let mut da = da.expect("asked for");
        let image = dims.c * dims.s;
        let sums =
            bn_relu_backward_in_place(xs, image, &mut da, dims, &st, gamma, &prologue, need_dx);
        let dx = need_dx.then_some(da);
        let dgamma = sums.iter().map(|s| E::from_f64(s.1)).collect();
        let dbeta = sums.iter().map(|s| E::from_f64(s.0)).collect();
        let weight_shape = saved.weight.layout().shape().to_vec();
        (
            dx.map(|dx| tensor(dx, shape)),
            [
                tensor(dgamma, vec![dims.c]),
                tensor(dbeta, vec![dims.c]),
                tensor(dweight, weight_shape),
                tensor(dbias, vec![s.c_out()]),
            ],
        )
    }
    let dy = contiguous(dy);
    match saved.x.dtype() {
        DType::F64 => typed::<f64>(saved, &dy, need_dx),
        _ => typed::<f32>(saved, &dy, need_dx),
    }
}

impl BnReluConv2dBackend for Flex {
    fn bn_relu_conv2d(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        eps: f64,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        geometry: ConvGeometry,
        avg_pool: bool,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let (y, mean, var, _) = forward(x, gamma, beta, eps, weight, bias, geometry, avg_pool);
        (y, mean, var)
    }
}

#[derive(Debug)]
struct BnReluConv2dBackward;

impl Backward<Flex, 5> for BnReluConv2dBackward {
    type State = Saved;

    fn backward(self, ops: Ops<Self::State, 5>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, rest @ ..] = ops.parents;
        let dy = grads.consume::<Flex>(&ops.node);
        let (dx, others) = backward(&ops.state, &dy, node_x.is_some());
        if let (Some(node), Some(dx)) = (node_x, dx) {
            grads.register::<Flex>(node.id, dx);
        }
        for (node, grad) in rest.into_iter().zip(others) {
            if let Some(node) = node {
                grads.register::<Flex>(node.id, grad);
            }
        }
    }
}

impl<C: CheckpointStrategy> BnReluConv2dBackend for Autodiff<Flex, C> {
    fn bn_relu_conv2d(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        eps: f64,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        geometry: ConvGeometry,
        avg_pool: bool,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let prepared = BnReluConv2dBackward
            .prepare::<C>([
                x.node(),
                gamma.node(),
                beta.node(),
                weight.node(),
                bias.node(),
            ])
            .compute_bound()
            .stateful();
        let (y, mean, var, saved) = forward(
            x.primitive().clone(),
            gamma.primitive().clone(),
            beta.primitive().clone(),
            eps,
            weight.primitive().clone(),
            bias.primitive().clone(),
            geometry,
            avg_pool,
        );
        let y = match prepared {
            OpsKind::Tracked(prep) => prep.finish(saved, y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        };
        (y, Self::from_inner(mean), Self::from_inner(var))
    }
}
