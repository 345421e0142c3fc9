//! Training-mode BN → ReLU → max pool as one op on Flex, for pools whose windows overlap
//! (the ResNet and DenseNet stem's 3×3 of stride 2 and padding 1), which the fused BN op's
//! epilogue does not take. The activations are never kept, only where each window's maximum
//! was (a byte per output): the backward recomputes them plane by plane and takes the gradient
//! back through the maxima, the ReLU and BN.
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
use super::cpu::{assume_init, assume_init_mut, simd_fn, uninit, Dims, Real};
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
    /// The output side for an input side `n`, if a window fits (and is at most 16 wide: each
    /// output keeps the place of its maximum in its window as one byte).
    pub fn output_side(&self, n: usize) -> Option<usize> {
        let padded = n + 2 * self.padding;
        (self.stride > 0
            && self.kernel > 0
            && self.kernel * self.kernel <= 256
            && padded >= self.kernel
            && 2 * self.padding <= self.kernel)
            .then(|| (padded - self.kernel) / self.stride + 1)
    }

    /// The window offsets `[lo, hi)` of output row (or column) `o` that fall inside the input
    /// (of side `n`), and the input row (or column) of offset 0, which may lie in the padding.
    fn span(&self, o: usize, n: usize) -> (usize, usize, isize) {
        let start = (o * self.stride) as isize - self.padding as isize;
        let lo = (-start).max(0) as usize;
        let hi = (n as isize - start).clamp(lo as isize, self.kernel as isize) as usize;
        (lo, hi, start)
    }

    /// Max-pools a `(h, w)` plane: each output's value, and where in its window it was taken
    /// from (`ky·k + kx`): the first maximum in row-major order, a NaN if there is one
    /// (PyTorch's rule).
    fn pool_plane<E: Real>(
        &self,
        a: &[E],
        plane: (usize, usize),
        values: &mut [MaybeUninit<E>],
        places: &mut [u8],
        scratch: &mut PoolScratch<E>,
    ) {
        max_pool_plane(*self, a, plane, values, places, scratch);
    }
    /// Adds each output's gradient `g` to `da` (a `(h, w)` plane) at its maximum, from its
    /// place in its window.
    fn unpool_plane<E: Real>(&self, places: &[u8], g: &[E], (h, w): (usize, usize), da: &mut [E]) {
        let (ho, wo) = (
            self.output_side(h).unwrap_or(0),
            self.output_side(w).unwrap_or(0),
        );
        let k = self.kernel;
        // A place's offset from its window's first (maybe padded) position.
        let offsets: Vec<isize> = (0..k * k).map(|p| ((p / k) * w + p % k) as isize).collect();
        let rows = places
            .chunks_exact(wo.max(1))
            .zip(g.chunks_exact(wo.max(1)));
        for (oy, (places, g)) in rows.take(ho).enumerate() {
            let y0 = (oy * self.stride) as isize - self.padding as isize;
            for (ox, (&place, &v)) in places.iter().zip(g).enumerate() {
                let x0 = (ox * self.stride) as isize - self.padding as isize;
                let at = (y0 * w as isize + x0 + offsets[place as usize]) as usize;
                da[at] = da[at].add(v);
            }
        }
    }

    /// The plane index of output `o`'s maximum, from its place in the window.
    #[cfg(test)]
    fn source(&self, o: usize, place: u8, (h, w): (usize, usize)) -> usize {
        let wo = self.output_side(w).unwrap_or(1);
        let (_, _, y0) = self.span(o / wo, h);
        let (_, _, x0) = self.span(o % wo, w);
        let (ky, kx) = (place as usize / self.kernel, place as usize % self.kernel);
        (y0 + ky as isize) as usize * w + (x0 + kx as isize) as usize
    }
}

/// The buffers [`max_pool_plane`] reuses from plane to plane, laid out for one window and
/// plane shape; another shape lays them out afresh.
#[derive(Debug, Default)]
pub(crate) struct PoolScratch<E> {
    /// The window and `(h, w)` the buffers below are laid out for.
    laid_out_for: Option<(MaxPoolWindow, (usize, usize))>,
    /// The plane padded with −∞ and split by row and column modulo the stride.
    phases: Vec<E>,
    /// The running maxima over the output grid, and their places.
    max: Vec<E>,
    best: Vec<u32>,
    /// Each output's first place inside the plane, where its search starts.
    first_inside: Vec<u32>,
}

simd_fn! {
    /// [`MaxPoolWindow::pool_plane`]. The plane, padded with −∞ (which never wins, so a
    /// window's first place inside the plane stays its place when nothing beats −∞), is split
    /// into its `s × s` phases by row and column modulo the stride, each `l` columns wide with
    /// `l = W_out + ⌊(k-1)/s⌋`: window position `(ky, kx)` of every output is then one run of
    /// phase `(ky mod s, kx mod s)`, from row `⌊ky/s⌋` and column `⌊kx/s⌋`, when the outputs are
    /// laid out `l` wide too (the `l - W_out` extra columns are dropped). So each window
    /// position is one vector pass over the whole output, in the same row-major order of
    /// positions as a window at a time.
    fn max_pool_plane<E: Real>(
        window: MaxPoolWindow,
        a: &[E],
        plane: (usize, usize),
        values: &mut [MaybeUninit<E>],
        places: &mut [u8],
        scratch: &mut PoolScratch<E>,
    ) {
        let (h, w) = plane;
        let (k, s, p) = (window.kernel, window.stride, window.padding);
        let (ho, wo) = (
            window.output_side(h).unwrap_or(0),
            window.output_side(w).unwrap_or(0),
        );
        if ho == 0 || wo == 0 {
            return;
        }
        let reach = (k - 1) / s;
        let l = wo + reach;
        // One row more than the outputs' windows reach: the extra columns' reads run past
        // a phase's last row.
        let phase_len = (ho + reach + 1) * l;
        let lowest = E::from_f64(f64::NEG_INFINITY);
        let PoolScratch {
            laid_out_for,
            phases,
            max,
            best,
            first_inside,
        } = scratch;
        if *laid_out_for != Some((window, plane)) {
            *laid_out_for = Some((window, plane));
            // Outside the plane stays −∞: only places inside are written below.
            *phases = vec![lowest; s * s * phase_len];
            *first_inside = (0..ho * l)
                .map(|o| {
                    let (ylo, _, _) = window.span(o / l, h);
                    let (xlo, _, _) = window.span((o % l).min(wo - 1), w);
                    (ylo * k + xlo) as u32
                })
                .collect();
        }
        for (y, row) in a[..h * w].chunks_exact(w).enumerate() {
            let (ry, rq) = ((y + p) / s, (y + p) % s);
            if ry > ho + reach {
                // Below every window: never read.
                continue;
            }
            for cq in 0..s {
                // Padded column `j·s + cq` is plane column `j·s + cq - p`.
                let first = p.saturating_sub(cq).div_ceil(s);
                let end = (p + w).saturating_sub(cq).div_ceil(s).min(l);
                if first >= end {
                    continue;
                }
                let at = (rq * s + cq) * phase_len + ry * l;
                let from = row[first * s + cq - p..].iter().step_by(s);
                for (t, &v) in phases[at + first..at + end].iter_mut().zip(from) {
                    *t = v;
                }
            }
        }
        max.clear();
        max.resize(ho * l, lowest);
        best.clear();
        best.extend_from_slice(first_inside);
        for ky in 0..k {
            for kx in 0..k {
                let at = ((ky % s) * s + kx % s) * phase_len + (ky / s) * l + kx / s;
                let from = &phases[at..][..ho * l];
                let place = (ky * k + kx) as u32;
                for ((m, b), &v) in max.iter_mut().zip(best.iter_mut()).zip(from) {
                    let take = (v > *m) | v.is_nan();
                    *m = if take { v } else { *m };
                    *b = if take { place } else { *b };
                }
            }
        }
        let rows = values.chunks_mut(wo).zip(places.chunks_mut(wo));
        for (oy, (values, places)) in rows.enumerate() {
            let (max, best) = (&max[oy * l..][..wo], &best[oy * l..][..wo]);
            for ((value, place), (&m, &b)) in values.iter_mut().zip(places).zip(max.iter().zip(best)) {
                value.write(m);
                *place = b as u8;
            }
        }
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
    /// Per output, where in its window the maximum was (see [`MaxPoolWindow::pool_plane`]).
    places: Vec<u8>,
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
    ) -> (FlexTensor, FlexTensor, FlexTensor, Vec<[f64; 3]>, Vec<u8>) {
        let shape = x.layout().shape().to_vec();
        let (dims, h, w) = (Dims::of(&shape), shape[2], shape[3]);
        let (ho, wo) = (
            window.output_side(h).expect("checked by the caller"),
            window.output_side(w).expect("checked by the caller"),
        );
        let (xs, gamma, beta) = (slice::<E>(x), slice::<E>(gamma), slice::<E>(beta));
        let st = channel_stats(xs, dims, eps);
        let mut pooled = uninit::<E>(dims.n * dims.c * ho * wo);
        let mut places = vec![0u8; pooled.len()];
        pooled
            .par_chunks_mut(ho * wo)
            .zip(places.par_chunks_mut(ho * wo))
            .enumerate()
            .for_each_init(
                || (uninit::<E>(dims.s), PoolScratch::default()),
                |(activated, scratch), (i, (out, places))| {
                    let c = i % dims.c;
                    let input = &xs[i * dims.s..][..dims.s];
                    let a = activations(input, st[c], gamma[c], beta[c], activated);
                    window.pool_plane(a, (h, w), out, places, scratch);
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
            places,
        )
    }
    let (x, gamma, beta) = (contiguous(&x), contiguous(&gamma), contiguous(&beta));
    let (y, mean, var, stats, places) = match x.dtype() {
        DType::F64 => typed::<f64>(&x, &gamma, &beta, eps, window),
        _ => typed::<f32>(&x, &gamma, &beta, eps, window),
    };
    let saved = Saved {
        x,
        gamma,
        beta,
        stats,
        window,
        places,
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
                    let places = &saved.places[i * out_plane..][..out_plane];
                    window.unpool_plane(places, g, (h, w), &mut da);
                    let (s0, s1) =
                        epilogue_plane_sums(input, a, &da, st[c], (h, w), Epilogue::RELU, dz);
                    sums = (sums.0 + s0, sums.1 + s1);
                    // SAFETY: epilogue_plane_sums writes every element of dz.
                    written.push(unsafe { assume_init_mut(dz) });
                }
                let sums = st[c].xhat_sums(sums);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// PyTorch's rule, written plainly: over the window's positions inside the plane in
    /// row-major order, a greater value or a NaN takes the place.
    fn naive(window: MaxPoolWindow, a: &[f64], (h, w): (usize, usize)) -> Vec<(f64, usize)> {
        let (ho, wo) = (
            window.output_side(h).unwrap(),
            window.output_side(w).unwrap(),
        );
        let mut out = Vec::new();
        for oy in 0..ho {
            for ox in 0..wo {
                let mut best = (f64::NEG_INFINITY, usize::MAX);
                for ky in 0..window.kernel {
                    for kx in 0..window.kernel {
                        let y = (oy * window.stride + ky) as isize - window.padding as isize;
                        let x = (ox * window.stride + kx) as isize - window.padding as isize;
                        if y < 0 || x < 0 || y >= h as isize || x >= w as isize {
                            continue;
                        }
                        let at = y as usize * w + x as usize;
                        if best.1 == usize::MAX || a[at] > best.0 || a[at].is_nan() {
                            best = (a[at], at);
                        }
                    }
                }
                out.push(best);
            }
        }
        out
    }

    #[test]
    fn pooled_planes_keep_pytorchs_maxima_and_their_places() {
        let windows = [(3, 2, 1), (2, 2, 0), (3, 1, 1), (5, 3, 2), (1, 1, 0)];
        for (kernel, stride, padding) in windows {
            let window = MaxPoolWindow {
                kernel,
                stride,
                padding,
            };
            for (h, w) in [(7, 7), (8, 5), (3, 4), (14, 14)] {
                if window.output_side(h).is_none() || window.output_side(w).is_none() {
                    continue;
                }
                // Few distinct values, so windows hold ties; a NaN and an infinity among them.
                let mut a: Vec<f64> = (0..h * w).map(|i| ((i * 7) % 5) as f64 - 2.0).collect();
                a[h * w / 2] = f64::NAN;
                a[h * w / 3] = f64::NEG_INFINITY;
                // A second NaN in the windows of the first: the last NaN read wins.
                a[h * w / 2 + 1] = f64::NAN;
                let expected = naive(window, &a, (h, w));
                let mut values = uninit::<f64>(expected.len());
                let mut places = vec![0u8; expected.len()];
                let scratch = &mut PoolScratch::default();
                window.pool_plane(&a, (h, w), &mut values, &mut places, scratch);
                let values = unsafe { assume_init(values) };
                for (o, &(value, at)) in expected.iter().enumerate() {
                    let what =
                        format!("{kernel}x{kernel}/{stride} pad {padding} on {h}x{w}, output {o}");
                    assert_eq!(values[o].to_bits(), value.to_bits(), "{what}: value");
                    assert_eq!(window.source(o, places[o], (h, w)), at, "{what}: place");
                }
                // The backward's scatter puts each output's gradient where `source` says.
                let g: Vec<f64> = (0..expected.len()).map(|o| (o + 1) as f64).collect();
                let mut da = vec![0.0; h * w];
                window.unpool_plane(&places, &g, (h, w), &mut da);
                let mut want = vec![0.0; h * w];
                for (o, &v) in g.iter().enumerate() {
                    want[window.source(o, places[o], (h, w))] += v;
                }
                assert_eq!(
                    da, want,
                    "{kernel}x{kernel}/{stride} pad {padding} on {h}x{w}: unpool"
                );
            }
        }
    }

    #[test]
    fn windows_wider_than_sixteen_are_declined() {
        let window = |kernel| MaxPoolWindow {
            kernel,
            stride: 1,
            padding: 0,
        };
        assert_eq!(window(16).output_side(20), Some(5));
        assert_eq!(window(17).output_side(20), None);
    }
}
