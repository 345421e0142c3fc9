//! Per-channel batch statistics in one pass, as the fused BN op computes them.
//!
//! Accuracy: each channel is shifted by its first value (the pivot) before anything is summed,
//! and the sums are kept in float64. For data far from zero (the `conv2d_large_mean` case,
//! 1000 ± 0.01) the shifted values are small and exact, so the one-pass `E[d²] - E[d]²` loses
//! nothing to cancellation. Sums run over planes in a fixed order, so results do not depend on
//! the number of threads.

use std::ops::Range;

use rayon::prelude::*;

use crate::ops::cpu::{channels_per_task, simd_fn, sums_over_images, Centred, Dims, Real};

/// One channel's batch statistics, kept in the element type for the element-wise passes.
#[derive(Debug, Clone, Copy)]
pub struct ChannelStats<E> {
    /// The channel's first value: subtracted before anything else.
    pub pivot: E,
    /// The mean of `x - pivot`.
    pub shifted_mean: E,
    /// `1 / sqrt(var + eps)`.
    pub inv_std: E,
    /// The batch mean, for the running statistics.
    pub mean: f64,
    /// The biased batch variance, for the running statistics.
    pub var: f64,
}

impl<E: Real> ChannelStats<E> {
    /// `x - mean`, computed as `(x - pivot) - shifted_mean` so that it stays exact far from 0.
    #[inline(always)]
    pub(crate) fn centered(&self, x: E) -> E {
        x.sub(self.pivot).sub(self.shifted_mean)
    }

    /// The runs of BN's backward sums: `x` centred as [`Self::centered`] centres it, beside
    /// its gradient.
    #[inline(always)]
    pub(crate) fn gradient_runs(&self) -> Centred<E> {
        Centred::Gradient {
            pivot: self.pivot,
            shifted_mean: self.shifted_mean,
        }
    }

    /// BN's backward sums `(Σ dz, Σ dz·x̂)` from `(Σ dz, Σ dz·(x - mean))`.
    #[inline(always)]
    pub(crate) fn xhat_sums(&self, (sum, centred): (f64, f64)) -> (f64, f64) {
        (sum, centred * self.inv_std.to_f64())
    }
}

simd_fn! {
    /// Per channel of `channels`, `Σ (x - pivot)` and `Σ (x - pivot)²` (`pivots` in the same
    /// order), the images of `x` `image` values apart (`C·S` when `x` is its own tensor). Image
    /// by image (a few side by side), a run of each channel in turn: contiguous reads, where
    /// channel after channel reads runs an image apart; each channel's sum is still taken run
    /// by run in image order.
    pub(crate) fn shifted_sums<E: Real>(x: &[E], dims: Dims, image: usize, channels: Range<usize>, pivots: &[E]) -> Vec<(f64, f64)> {
        let mut sums = vec![(0.0, 0.0); channels.len()];
        if dims.s == 1 {
            // (N, C) input: a channel's values are a column.
            for (c, (sum, &pivot)) in channels.zip(sums.iter_mut().zip(pivots)) {
                let column = x[c..].iter().step_by(dims.c).map(|&v| v.sub(pivot).to_f64());
                *sum = column.fold((0.0, 0.0), |(s, q), d| (s + d, q + d * d));
            }
            return sums;
        }
        sums_over_images(dims.n, &mut sums, |n, j| {
            let run = &x[n * image + (channels.start + j) * dims.s..][..dims.s];
            (run, run, Centred::Shifted { pivot: pivots[j] })
        });
        sums
    }
}

/// Per-channel statistics of `x` in one pass.
pub fn channel_stats<E: Real>(x: &[E], dims: Dims, eps: f64) -> Vec<ChannelStats<E>> {
    debug_assert_eq!(x.len(), dims.len());
    channel_stats_in(x, dims, dims.c * dims.s, eps)
}

/// [`channel_stats`] of the first `dims.c` channels of images `image` values apart (a dense
/// block's buffer, whose layers each read its first channels).
pub(crate) fn channel_stats_in<E: Real>(
    x: &[E],
    dims: Dims,
    image: usize,
    eps: f64,
) -> Vec<ChannelStats<E>> {
    let group = channels_per_task::<E>(dims);
    (0..dims.c)
        .into_par_iter()
        .step_by(group)
        .flat_map_iter(|c| group_stats(x, dims, image, c..(c + group).min(dims.c), eps))
        .collect()
}

/// The statistics of `channels`, the images of `x` `image` values apart.
pub(crate) fn group_stats<E: Real>(
    x: &[E],
    dims: Dims,
    image: usize,
    channels: Range<usize>,
    eps: f64,
) -> Vec<ChannelStats<E>> {
    let m = dims.count() as f64;
    let pivots: Vec<E> = channels.clone().map(|c| x[c * dims.s]).collect();
    let sums = shifted_sums(x, dims, image, channels, &pivots);
    pivots
        .into_iter()
        .zip(sums)
        .map(|(pivot, (sum, sq))| {
            let shifted_mean = sum / m;
            let var = (sq / m - shifted_mean * shifted_mean).max(0.0);
            ChannelStats {
                pivot,
                shifted_mean: E::from_f64(shifted_mean),
                inv_std: E::from_f64(1.0 / (var + eps).sqrt()),
                mean: pivot.to_f64() + shifted_mean,
                var,
            }
        })
        .collect()
}

/// What a fused op hands on from its statistics: the batch means and biased variances (for
/// the running statistics), and per channel `[pivot, shifted mean, inverse std]` for its
/// backward, which [`from_saved`] turns back into the same statistics exactly.
#[allow(clippy::type_complexity)]
pub(crate) fn batch_outputs<E: Real>(stats: &[ChannelStats<E>]) -> (Vec<E>, Vec<E>, Vec<[f64; 3]>) {
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
    (mean, var, saved)
}

/// The statistics [`batch_outputs`] saved, for a backward (its mean and variance unused).
pub(crate) fn from_saved<E: Real>(saved: &[[f64; 3]]) -> Vec<ChannelStats<E>> {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The textbook two-pass formulas in float64, to check the one-pass kernels against.
    fn reference(x: &[f64], dims: Dims) -> Vec<(f64, f64)> {
        (0..dims.c)
            .map(|c| {
                let values: Vec<f64> = (0..dims.n)
                    .flat_map(|n| {
                        let start = (n * dims.c + c) * dims.s;
                        x[start..start + dims.s].to_vec()
                    })
                    .collect();
                let m = values.len() as f64;
                let mean = values.iter().sum::<f64>() / m;
                let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / m;
                (mean, var)
            })
            .collect()
    }

    #[test]
    fn one_pass_statistics_match_two_pass_ones_far_from_zero() {
        let dims = Dims { n: 3, c: 2, s: 37 };
        // 1000 + small values: the case a naive float32 sum gets wrong.
        let x64: Vec<f64> = (0..dims.len())
            .map(|i| 1000.0 + ((i * 7919 % 101) as f64 - 50.0) * 1e-4)
            .collect();
        let x32: Vec<f32> = x64.iter().map(|&v| v as f32).collect();
        let exact = reference(&x32.iter().map(|&v| v as f64).collect::<Vec<_>>(), dims);
        for (st, (mean, var)) in channel_stats(&x32, dims, 1e-5).iter().zip(exact) {
            assert!((st.mean - mean).abs() < 1e-9, "{} vs {mean}", st.mean);
            assert!((st.var - var).abs() < 1e-6 * var, "{} vs {var}", st.var);
        }
    }
}
