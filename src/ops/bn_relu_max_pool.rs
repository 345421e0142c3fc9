//! Training-mode BN → ReLU → max pool as one op on Flex, for pools whose windows overlap
//! (the ResNet and DenseNet stem's 3×3 of stride 2 and padding 1), which the fused BN op's
//! epilogue does not take. The activations are never kept: the backward recomputes them plane
//! by plane, finds each window's maximum again and takes the gradient back through it, the
//! ReLU and BN.
//!
//! The pool is PyTorch's: windows of `k × k` at stride `s`, `p` of padding that no window
//! takes its maximum from, the output side `⌊(H + 2p - k) / s⌋ + 1`; within a window the first
//! maximum in row-major order wins, and NaN wins over any number. Outputs equal those of the
//! fused BN op with its ReLU epilogue followed by Burn's `MaxPool2d` (where the two pools
//! choose the same maxima: ties between positive activations aside, which random data does
//! not produce; ties at 0 get no gradient through the ReLU either way).

use std::mem::MaybeUninit;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::{Flex, FlexTensor};
use burn::backend::tensor::FloatTensor;
use burn::backend::{backend_extension, Autodiff, AutodiffBackend, Backend, Dispatch};
use burn::tensor::{DType, Tensor};
use rayon::prelude::*;

use super::batch_norm::planes::{
    epilogue_plane_sums, forward_plane, input_grad_coefficient, input_grad_plane_in_place,
};
use super::batch_norm::stats::{batch_outputs, channel_stats, from_saved, ChannelStats};
use super::cpu::{assume_init, assume_init_mut, uninit, Dims, Real};
use super::flex::{contiguous, slice, tensor, Element};
use crate::norm::epilogue::Epilogue;

/// A square max pool: window side, stride and padding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaxPoolWindow {
    /// The window's side.
    pub kernel: usize,
    /// The step between windows.
    pub stride: usize,
    /// The padding on every side; at most half the window.
    pub padding: usize,
}

impl MaxPoolWindow {
    /// The output side for an input side `n`, if a window fits.
    pub fn output_side(&self, n: usize) -> Option<usize> {
        let padded = n + 2 * self.padding;
        (self.stride > 0
            && self.kernel > 0
            && padded >= self.kernel
            && 2 * self.padding <= self.kernel)
            .then(|| (padded - self.kernel) / self.stride + 1)
    }

    /// The input rows (or columns) `[lo, hi)` of output row (or column) `o`.
    fn span(&self, o: usize, n: usize) -> (usize, usize) {
        let start = (o * self.stride) as isize - self.padding as isize;
        let lo = start.max(0) as usize;
        let hi = ((start + self.kernel as isize).max(0) as usize).min(n);
        (lo, hi)
    }

    /// Where each output of a `(h, w)` plane takes its maximum from, in row-major order: the
    /// first maximum of the window, a NaN if there is one (PyTorch's rule).
    fn argmax<'a, E: Real>(
        &'a self,
        a: &'a [E],
        (h, w): (usize, usize),
    ) -> impl Iterator<Item = usize> + 'a {
        let (ho, wo) = (
            self.output_side(h).unwrap_or(0),
            self.output_side(w).unwrap_or(0),
        );
        (0..ho * wo).map(move |o| {
            let ((ylo, yhi), (xlo, xhi)) = (self.span(o / wo, h), self.span(o % wo, w));
            let mut best = ylo * w + xlo;
            let mut max = E::from_f64(f64::NEG_INFINITY);
            for y in ylo..yhi {
                for x in xlo..xhi {
                    let v = a[y * w + x];
                    if v > max || v.is_nan() {
                        max = v;
                        best = y * w + x;
                    }
                }
            }
            best
        })
    }
}

/// BN → ReLU → max pool as a backend op: Flex, and autodiff over Flex with its own backward.
#[backend_extension(Flex, Autodiff)]
pub trait BnReluMaxPoolBackend: Backend {
    /// `max_pool(relu(γ·x̂ + β))` with batch statistics over axis 1 of `x` `(N, C, H, W)`, and
    /// the batch mean and biased variance (which carry no gradient).
    fn bn_relu_max_pool(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        eps: f64,
        window: MaxPoolWindow,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
}

/// The op on Burn tensors: `(pooled output, batch mean, biased batch variance)`. The caller
/// checks that it applies (a Flex device, float32 or float64, a window that fits, at least two
/// values per channel, one γ and β per channel).
pub fn bn_relu_max_pool(
    x: Tensor<4>,
    gamma: Tensor<1>,
    beta: Tensor<1>,
    eps: f64,
    window: MaxPoolWindow,
) -> (Tensor<4>, Tensor<1>, Tensor<1>) {
    let (y, mean, var) = <Dispatch as BnReluMaxPoolBackend>::bn_relu_max_pool(
        x.into_dispatch(),
        gamma.into_dispatch(),
        beta.into_dispatch(),
        eps,
        window,
    );
    (
        Tensor::from_dispatch(y),
        Tensor::from_dispatch(mean),
        Tensor::from_dispatch(var),
    )
}

/// One plane's activations `relu(γ·x̂ + β)`, as the fused BN op's forward computes them.
fn activations<'a, E: Real>(
    input: &[E],
    st: ChannelStats<E>,
    gamma: E,
    beta: E,
    out: &'a mut [MaybeUninit<E>],
) -> &'a mut [E] {
    let scale = E::from_f64(gamma.to_f64() * st.inv_std.to_f64());
    forward_plane(
        input,
        st,
        scale,
        beta,
        Epilogue::RELU,
        (input.len(), 1),
        out,
        None,
    );
    // SAFETY: forward_plane writes every element of `out`.
    unsafe { assume_init_mut(out) }
}

/// What the backward needs.
#[derive(Debug, Clone)]
pub struct Saved {
    x: FlexTensor,
    gamma: FlexTensor,
    beta: FlexTensor,
    /// Per channel: pivot, shifted mean, inverse std.
    stats: Vec<[f64; 3]>,
    window: MaxPoolWindow,
}

fn forward(
    x: FlexTensor,
    gamma: FlexTensor,
    beta: FlexTensor,
    eps: f64,
    window: MaxPoolWindow,
) -> (FlexTensor, FlexTensor, FlexTensor, Saved) {
    fn typed<E: Element>(
        x: &FlexTensor,
        gamma: &FlexTensor,
        beta: &FlexTensor,
        eps: f64,
        window: MaxPoolWindow,
    ) -> (FlexTensor, FlexTensor, FlexTensor, Vec<[f64; 3]>) {
        let shape = x.layout().shape().to_vec();
        let (dims, h, w) = (Dims::of(&shape), shape[2], shape[3]);
        let (ho, wo) = (
            window.output_side(h).expect("checked by the caller"),
            window.output_side(w).expect("checked by the caller"),
        );
        let (xs, gamma, beta) = (slice::<E>(x), slice::<E>(gamma), slice::<E>(beta));
        let st = channel_stats(xs, dims, eps);
        let mut pooled = uninit::<E>(dims.n * dims.c * ho * wo);
        pooled.par_chunks_mut(ho * wo).enumerate().for_each_init(
            || uninit::<E>(dims.s),
            |scratch, (i, out)| {
                let c = i % dims.c;
                let input = &xs[i * dims.s..][..dims.s];
                let a = activations(input, st[c], gamma[c], beta[c], scratch);
                for (o, at) in out.iter_mut().zip(window.argmax(a, (h, w))) {
                    o.write(a[at]);
                }
            },
        );
        // SAFETY: every output plane was written above.
        let pooled = unsafe { assume_init(pooled) };
        let (mean, var, saved) = batch_outputs(&st);
        (
            tensor(pooled, vec![dims.n, dims.c, ho, wo]),
            tensor(mean, vec![dims.c]),
            tensor(var, vec![dims.c]),
            saved,
        )
    }
    let (x, gamma, beta) = (contiguous(&x), contiguous(&gamma), contiguous(&beta));
    let (y, mean, var, stats) = match x.dtype() {
        DType::F64 => typed::<f64>(&x, &gamma, &beta, eps, window),
        _ => typed::<f32>(&x, &gamma, &beta, eps, window),
    };
    let saved = Saved {
        x,
        gamma,
        beta,
        stats,
        window,
    };
    (y, mean, var, saved)
}

/// `[dx, dgamma, dbeta]`, channel by channel: each channel's sums run over its planes in
/// batch order, as the fused BN op's backward runs them.
fn backward(saved: &Saved, dout: &FlexTensor) -> [FlexTensor; 3] {
    fn typed<E: Element>(saved: &Saved, dout: &FlexTensor) -> [FlexTensor; 3] {
        let shape = saved.x.layout().shape().to_vec();
        let (dims, h, w) = (Dims::of(&shape), shape[2], shape[3]);
        let window = saved.window;
        let out_plane = window.output_side(h).unwrap_or(0) * window.output_side(w).unwrap_or(0);
        let (xs, gamma, beta) = (
            slice::<E>(&saved.x),
            slice::<E>(&saved.gamma),
            slice::<E>(&saved.beta),
        );
        let dout = slice::<E>(dout);
        let st = from_saved::<E>(&saved.stats);
        let mut dx = uninit::<E>(dims.len());
        let mut planes: Vec<Vec<&mut [MaybeUninit<E>]>> = (0..dims.c).map(|_| Vec::new()).collect();
        for (i, plane) in dx.chunks_mut(dims.s).enumerate() {
            planes[i % dims.c].push(plane);
        }
        let sums: Vec<(f64, f64)> = planes
            .into_par_iter()
            .enumerate()
            .map(|(c, outs)| {
                let mut scratch = uninit::<E>(dims.s);
                let mut da = vec![E::ZERO; dims.s];
                let mut sums = (0.0, 0.0);
                let mut written = Vec::with_capacity(dims.n);
                for (n, dz) in outs.into_iter().enumerate() {
                    let i = n * dims.c + c;
                    let input = &xs[i * dims.s..][..dims.s];
                    let a = activations(input, st[c], gamma[c], beta[c], &mut scratch);
                    da.fill(E::ZERO);
                    let g = &dout[i * out_plane..][..out_plane];
                    for (at, &v) in window.argmax(a, (h, w)).zip(g) {
                        da[at] = da[at].add(v);
                    }
                    let (s0, s1) =
                        epilogue_plane_sums(input, a, &da, st[c], (h, w), Epilogue::RELU, dz);
                    sums = (sums.0 + s0, sums.1 + s1);
                    // SAFETY: epilogue_plane_sums writes every element of dz.
                    written.push(unsafe { assume_init_mut(dz) });
                }
                let sums = (sums.0, sums.1 * st[c].inv_std.to_f64());
                let coefficient = input_grad_coefficient(dims, st[c], gamma[c], sums);
                for (n, dz) in written.into_iter().enumerate() {
                    let input = &xs[(n * dims.c + c) * dims.s..][..dims.s];
                    input_grad_plane_in_place(input, st[c], coefficient, dz);
                }
                sums
            })
            .collect();
        // SAFETY: every plane of dx was written above.
        let dx = unsafe { assume_init(dx) };
        let dgamma = sums.iter().map(|s| E::from_f64(s.1)).collect();
        let dbeta = sums.iter().map(|s| E::from_f64(s.0)).collect();
        [
            tensor(dx, shape),
            tensor(dgamma, vec![dims.c]),
            tensor(dbeta, vec![dims.c]),
        ]
    }
    let dout = contiguous(dout);
    match saved.x.dtype() {
        DType::F64 => typed::<f64>(saved, &dout),
        _ => typed::<f32>(saved, &dout),
    }
}

impl BnReluMaxPoolBackend for Flex {
    fn bn_relu_max_pool(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        eps: f64,
        window: MaxPoolWindow,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let (y, mean, var, _) = forward(x, gamma, beta, eps, window);
        (y, mean, var)
    }
}

#[derive(Debug)]
struct BnReluMaxPoolBackward;

impl Backward<Flex, 3> for BnReluMaxPoolBackward {
    type State = Saved;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dout = grads.consume::<Flex>(&ops.node);
        let all = backward(&ops.state, &dout);
        for (node, grad) in ops.parents.into_iter().zip(all) {
            if let Some(node) = node {
                grads.register::<Flex>(node.id, grad);
            }
        }
    }
}

impl<C: CheckpointStrategy> BnReluMaxPoolBackend for Autodiff<Flex, C> {
    fn bn_relu_max_pool(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        eps: f64,
        window: MaxPoolWindow,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let prepared = BnReluMaxPoolBackward
            .prepare::<C>([x.node(), gamma.node(), beta.node()])
            .compute_bound()
            .stateful();
        let (y, mean, var, saved) = forward(
            x.primitive().clone(),
            gamma.primitive().clone(),
            beta.primitive().clone(),
            eps,
            window,
        );
        let y = match prepared {
            OpsKind::Tracked(prep) => prep.finish(saved, y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        };
        (y, Self::from_inner(mean), Self::from_inner(var))
    }
}
