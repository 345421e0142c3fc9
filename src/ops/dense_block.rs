//! A whole dense block of DenseNet in training mode, as one op on Flex: `L` layers BN → ReLU →
//! Conv (growth `G` channels each), each layer's output appended to its input along the
//! channels. The memory-efficient DenseNet of Pleiss et al. (2017):
//!
//! - one buffer `(N, C₀ + L·G, H, W)` holds the block: its input, then each layer's `G` new
//!   channels, written into their slice as the layer runs. It is the block's output, and all
//!   the backward keeps (with three numbers per BN channel), where the layer-by-layer path
//!   keeps every layer's concatenated input: `L` growing copies.
//! - Each layer runs as [`super::bn_relu_conv2d`] does: statistics of its input (the buffer's
//!   first `C₀ + l·G` channels, read in place: the kernels take images that lie
//!   `C_total·H·W` apart), then the convolution with BN → ReLU applied as im2col forms its
//!   columns.
//! - The backward goes through the layers in reverse with one gradient buffer of the block's
//!   size: each layer reads its input in place and runs the convolution's and BN → ReLU's
//!   backward as [`super::bn_relu_conv2d`] does (the activations recomputed as columns are formed, never
//!   whole; BN's backward in place, keeping fewer full-size buffers alive at once),
//!   and adds its input gradient into the buffer's first channels. The gradients are summed
//!   in the order autodiff sums them on the layer-by-layer path, so the results are equal bit
//!   for bit.
//!
//! The layers' parameters come in concatenated (γ and β of all layers one after another, the
//! weights flattened), so that the op has a fixed number of inputs.

use std::borrow::Cow;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::{Flex, FlexTensor};
use burn::backend::tensor::FloatTensor;
use burn::backend::{backend_extension, Autodiff, AutodiffBackend, Backend, Dispatch};
use burn::tensor::{DType, Tensor};

use super::batch_norm::stats;
use super::bn_relu_conv2d::{bn_relu_backward_in_place, BnRelu};
use super::conv2d::{backward_typed, forward_typed, ConvGeometry, Shape};
use super::cpu::Dims;
use super::flex::{contiguous, owned_contiguous, slice, tensor, Element};

/// The block's sizes: what the op needs besides its tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockShape {
    /// `L`, the layers.
    pub layers: usize,
    /// `G`, the channels each layer adds.
    pub growth: usize,
    /// The side of each layer's square kernel.
    pub kernel: usize,
    /// Each layer's stride (1) and padding (`(kernel - 1) / 2`, which keeps the side).
    pub geometry: ConvGeometry,
}

impl BlockShape {
    /// Input channels of layer `l`, for a block input of `c0` channels.
    fn channels(&self, c0: usize, l: usize) -> usize {
        c0 + l * self.growth
    }

    /// Where layer `l`'s γ (and β) start in the concatenation.
    fn norm_offset(&self, c0: usize, l: usize) -> usize {
        (0..l).map(|j| self.channels(c0, j)).sum()
    }

    /// Where layer `l`'s weight starts in the concatenation.
    fn weight_offset(&self, c0: usize, l: usize) -> usize {
        self.norm_offset(c0, l) * self.growth * self.kernel * self.kernel
    }

    /// Layer `l`'s convolution.
    fn conv(&self, [n, c0, h, w]: [usize; 4], l: usize) -> Shape {
        let c = self.channels(c0, l);
        Shape::of(
            &[n, c, h, w],
            &[self.growth, c, self.kernel, self.kernel],
            self.geometry,
        )
    }
}

/// The dense block as a backend op: Flex, and autodiff over Flex with its own backward.
#[backend_extension(Flex, Autodiff)]
pub trait DenseBlockBackend: Backend {
    /// The block on `x` `(N, C₀, H, W)`: `(output (N, C₀ + L·G, H, W), the layers' batch means,
    /// their biased batch variances)`, the statistics concatenated as `gammas` is (they carry
    /// no gradient). `gammas` and `betas` hold each layer's `C₀ + l·G` values one layer after
    /// another; `weights` the layers' `(G, C₀ + l·G, k, k)` weights flattened, likewise;
    /// `biases` the `L·G` biases.
    #[allow(clippy::too_many_arguments)]
    fn dense_block(
        x: FloatTensor<Self>,
        gammas: FloatTensor<Self>,
        betas: FloatTensor<Self>,
        weights: FloatTensor<Self>,
        biases: FloatTensor<Self>,
        eps: f64,
        shape: BlockShape,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
}

/// The dense block by the op, on Flex; see [`DenseBlockBackend::dense_block`] for the layout
/// of the parameters. The caller checks that the op applies (a Flex device, float32 or
/// float64, at least two values per channel).
pub fn dense_block(
    x: Tensor<4>,
    [gammas, betas, weights, biases]: [Tensor<1>; 4],
    eps: f64,
    shape: BlockShape,
) -> (Tensor<4>, Tensor<1>, Tensor<1>) {
    let (y, mean, var) = <Dispatch as DenseBlockBackend>::dense_block(
        x.into_dispatch(),
        gammas.into_dispatch(),
        betas.into_dispatch(),
        weights.into_dispatch(),
        biases.into_dispatch(),
        eps,
        shape,
    );
    (
        Tensor::from_dispatch(y),
        Tensor::from_dispatch(mean),
        Tensor::from_dispatch(var),
    )
}

/// Channels `from..to` of every image of `buf` (`n` images of `c_total` planes of `plane`
/// values), as a contiguous `(n, to - from, plane)` tensor.
/// Layer input: the buffer's first `c` channels, with how far apart its images lie. Read in
/// place (images `C_total·plane` apart) where the kernels take that; gathered into its own
/// tensor for 1×1 planes, whose BN kernels take only contiguous rows.
fn layer_input<E: Copy>(
    buf: &[E],
    n: usize,
    c_total: usize,
    c: usize,
    plane: usize,
) -> (Cow<'_, [E]>, usize) {
    match plane > 1 {
        true => (Cow::Borrowed(buf), c_total * plane),
        false => (
            Cow::Owned(gather(buf, n, c_total, (0, c), plane)),
            c * plane,
        ),
    }
}

fn gather<E: Copy>(
    buf: &[E],
    n: usize,
    c_total: usize,
    (from, to): (usize, usize),
    plane: usize,
) -> Vec<E> {
    let mut out = Vec::with_capacity(n * (to - from) * plane);
    for image in buf.chunks_exact(c_total * plane).take(n) {
        out.extend_from_slice(&image[from * plane..to * plane]);
    }
    out
}

/// What the backward needs.
#[derive(Debug, Clone)]
pub struct Saved {
    /// The block's buffer: its output.
    block: FlexTensor,
    gammas: FlexTensor,
    betas: FlexTensor,
    weights: FlexTensor,
    /// Per layer, per channel: pivot, shifted mean, inverse std.
    stats: Vec<Vec<[f64; 3]>>,
    input_shape: [usize; 4],
    shape: BlockShape,
}

/// The forward on Flex tensors: `(output, means, vars, saved)`.
fn forward(
    x: FlexTensor,
    params: [FlexTensor; 4],
    eps: f64,
    shape: BlockShape,
) -> (FlexTensor, FlexTensor, FlexTensor, Saved) {
    fn typed<E: Element>(
        x: &FlexTensor,
        [gammas, betas, weights, biases]: &[FlexTensor; 4],
        eps: f64,
        shape: BlockShape,
    ) -> (FlexTensor, FlexTensor, FlexTensor, Vec<Vec<[f64; 3]>>) {
        let dims = x.layout().shape().to_vec();
        let [n, c0, h, w] = [dims[0], dims[1], dims[2], dims[3]];
        let (plane, c_total) = (h * w, shape.channels(c0, shape.layers));
        let (gammas, betas) = (slice::<E>(gammas), slice::<E>(betas));
        let (weights, biases) = (slice::<E>(weights), slice::<E>(biases));
        let mut block = vec![E::ZERO; n * c_total * plane];
        for (image, input) in block
            .chunks_exact_mut(c_total * plane)
            .zip(slice::<E>(x).chunks_exact(c0 * plane))
        {
            image[..c0 * plane].copy_from_slice(input);
        }
        let (mut means, mut vars, mut saved) = (Vec::new(), Vec::new(), Vec::new());
        // A channel's values never change once written, so neither do its statistics: each
        // layer computes only its new channels' (the same numbers as over its whole input).
        let mut block_stats = Vec::new();
        for l in 0..shape.layers {
            let c = shape.channels(c0, l);
            let (input, x_image) = layer_input(&block, n, c_total, c, plane);
            match plane > 1 {
                true => {
                    let known = block_stats.len();
                    let new = Dims {
                        n,
                        c: c - known,
                        s: plane,
                    };
                    let from = &block[known * plane..];
                    block_stats.extend(stats::channel_stats_in(from, new, x_image, eps));
                }
                // 1×1 planes: the row kernels take the gathered input whole.
                false => {
                    block_stats =
                        stats::channel_stats_in(&input, Dims { n, c, s: plane }, x_image, eps)
                }
            }
            let st = &block_stats[..];
            let at = shape.norm_offset(c0, l);
            let prologue = BnRelu::new(st, &gammas[at..at + c], &betas[at..at + c]);
            let s = shape.conv([n, c0, h, w], l).with_x_image(x_image);
            let weight = &weights[shape.weight_offset(c0, l)..]
                [..shape.growth * c * shape.kernel * shape.kernel];
            let bias = &biases[l * shape.growth..][..shape.growth];
            let y = forward_typed(&input, weight, bias, s, &prologue);
            drop(input);
            let new = shape.growth * plane;
            for (image, out) in block
                .chunks_exact_mut(c_total * plane)
                .zip(y.chunks_exact(new))
            {
                image[c * plane..][..new].copy_from_slice(out);
            }
            let (mean, var, layer_saved) = stats::batch_outputs(st);
            means.extend(mean);
            vars.extend(var);
            saved.push(layer_saved);
        }
        let count = means.len();
        (
            tensor(block, vec![n, c_total, h, w]),
            tensor(means, vec![count]),
            tensor(vars, vec![count]),
            saved,
        )
    }
    let x = contiguous(&x);
    let params = params.map(|p| contiguous(&p));
    let (block, means, vars, stats) = match x.dtype() {
        DType::F64 => typed::<f64>(&x, &params, eps, shape),
        _ => typed::<f32>(&x, &params, eps, shape),
    };
    let dims = x.layout().shape();
    let [gammas, betas, weights, _] = params;
    let saved = Saved {
        block: block.clone(),
        gammas,
        betas,
        weights,
        stats,
        input_shape: [dims[0], dims[1], dims[2], dims[3]],
        shape,
    };
    (block, means, vars, saved)
}

/// The gradients `[dx, dgammas, dbetas, dweights, dbiases]` of the block's output.
/// `dy` is taken by value: the input gradients accumulate in its buffer (one block-sized
/// buffer fewer alive than a copy, at the block's peak).
fn backward(saved: &Saved, dy: FlexTensor) -> [FlexTensor; 5] {
    fn typed<E: Element>(saved: &Saved, dy: FlexTensor) -> [FlexTensor; 5] {
        let [n, c0, h, w] = saved.input_shape;
        let shape = saved.shape;
        let (plane, c_total) = (h * w, shape.channels(c0, shape.layers));
        let block = slice::<E>(&saved.block);
        let (gammas, betas) = (slice::<E>(&saved.gammas), slice::<E>(&saved.betas));
        let weights = slice::<E>(&saved.weights);
        let mut dy = owned_contiguous::<E>(dy);
        let grads = dy.storage_mut::<E>();
        let norm_len = shape.norm_offset(c0, shape.layers);
        let mut dgammas = vec![E::ZERO; norm_len];
        let mut dbetas = vec![E::ZERO; norm_len];
        let mut dweights = vec![E::ZERO; weights.len()];
        let mut dbiases = vec![E::ZERO; shape.layers * shape.growth];
        for l in (0..shape.layers).rev() {
            let c = shape.channels(c0, l);
            let dims = Dims { n, c, s: plane };
            let (input, x_image) = layer_input(block, n, c_total, c, plane);
            let st = stats::from_saved::<E>(&saved.stats[l]);
            let at = shape.norm_offset(c0, l);
            let (gamma, beta) = (&gammas[at..at + c], &betas[at..at + c]);
            let prologue = BnRelu::new(&st, gamma, beta);
            let s = shape.conv([n, c0, h, w], l).with_x_image(x_image);
            let wlen = shape.growth * c * shape.kernel * shape.kernel;
            let wat = shape.weight_offset(c0, l);
            let dout = gather(grads, n, c_total, (c, c + shape.growth), plane);
            let (da, dweight, dbias) =
                backward_typed(&input, &weights[wat..][..wlen], &dout, s, true, &prologue);
            let mut dx = da.expect("asked for");
            let sums = bn_relu_backward_in_place(
                &input, x_image, &mut dx, dims, &st, gamma, &prologue, true,
            );
            for (image, d) in grads
                .chunks_exact_mut(c_total * plane)
                .zip(dx.chunks_exact(c * plane))
            {
                for (g, &v) in image[..c * plane].iter_mut().zip(d) {
                    *g = g.add(v);
                }
            }
            for (i, &(s0, s1)) in sums.iter().enumerate() {
                dbetas[at + i] = E::from_f64(s0);
                dgammas[at + i] = E::from_f64(s1);
            }
            dweights[wat..][..wlen].copy_from_slice(&dweight);
            dbiases[l * shape.growth..][..shape.growth].copy_from_slice(&dbias);
        }
        let dx = gather(grads, n, c_total, (0, c0), plane);
        [
            tensor(dx, vec![n, c0, h, w]),
            tensor(dgammas, vec![norm_len]),
            tensor(dbetas, vec![norm_len]),
            tensor(dweights, vec![weights.len()]),
            tensor(dbiases, vec![shape.layers * shape.growth]),
        ]
    }
    match saved.block.dtype() {
        DType::F64 => typed::<f64>(saved, dy),
        _ => typed::<f32>(saved, dy),
    }
}

impl DenseBlockBackend for Flex {
    fn dense_block(
        x: FloatTensor<Self>,
        gammas: FloatTensor<Self>,
        betas: FloatTensor<Self>,
        weights: FloatTensor<Self>,
        biases: FloatTensor<Self>,
        eps: f64,
        shape: BlockShape,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let (y, means, vars, _) = forward(x, [gammas, betas, weights, biases], eps, shape);
        (y, means, vars)
    }
}

#[derive(Debug)]
struct DenseBlockBackward;

impl Backward<Flex, 5> for DenseBlockBackward {
    type State = Saved;

    fn backward(self, ops: Ops<Self::State, 5>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy = grads.consume::<Flex>(&ops.node);
        let all = backward(&ops.state, dy);
        for (node, grad) in ops.parents.into_iter().zip(all) {
            if let Some(node) = node {
                grads.register::<Flex>(node.id, grad);
            }
        }
    }
}

impl<C: CheckpointStrategy> DenseBlockBackend for Autodiff<Flex, C> {
    fn dense_block(
        x: FloatTensor<Self>,
        gammas: FloatTensor<Self>,
        betas: FloatTensor<Self>,
        weights: FloatTensor<Self>,
        biases: FloatTensor<Self>,
        eps: f64,
        shape: BlockShape,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let prepared = DenseBlockBackward
            .prepare::<C>([
                x.node(),
                gammas.node(),
                betas.node(),
                weights.node(),
                biases.node(),
            ])
            .compute_bound()
            .stateful();
        let params = [
            gammas.primitive().clone(),
            betas.primitive().clone(),
            weights.primitive().clone(),
            biases.primitive().clone(),
        ];
        let (y, means, vars, saved) = forward(x.primitive().clone(), params, eps, shape);
        let y = match prepared {
            OpsKind::Tracked(prep) => prep.finish(saved, y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        };
        (y, Self::from_inner(means), Self::from_inner(vars))
    }
}
