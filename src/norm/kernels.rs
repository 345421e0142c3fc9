//! The fused batch-norm kernels: plain loops over `(N, C, S)` slices, with no Burn types.
//!
//! `S` is the product of the spatial axes (1 for `(N, C)` input), so channel `c` of sample `n`
//! is the contiguous run `x[(n * C + c) * S ..][.. S]`.
//!
//! Accuracy: each channel is shifted by its first value (the pivot) before anything is summed,
//! and the sums are kept in float64. For data far from zero (the `conv2d_large_mean` case,
//! 1000 ± 0.01) the shifted values are small and exact, so the one-pass `E[d²] - E[d]²` loses
//! nothing to cancellation.
//!
//! Speed: one read of `x` for the statistics and one read plus one write for the output; the
//! backward reads `x` and `dy` twice and writes `dx` once. Work is split over channels (for
//! the sums) and over `(n, c)` runs (for the element-wise passes), on rayon's pool.

use rayon::prelude::*;

/// The float types the kernels run on.
pub trait Real: Copy + Send + Sync + PartialEq + 'static {
    fn to_f64(self) -> f64;
    fn from_f64(value: f64) -> Self;
    fn sub(self, other: Self) -> Self;
    fn mul_add(self, a: Self, b: Self) -> Self;
}

macro_rules! impl_real {
    ($t:ty) => {
        impl Real for $t {
            #[inline(always)]
            fn to_f64(self) -> f64 {
                self as f64
            }
            #[inline(always)]
            fn from_f64(value: f64) -> Self {
                value as $t
            }
            #[inline(always)]
            fn sub(self, other: Self) -> Self {
                self - other
            }
            /// `self * a + b`, rounded twice (no FMA: it would not vectorise without AVX2).
            #[inline(always)]
            fn mul_add(self, a: Self, b: Self) -> Self {
                self * a + b
            }
        }
    };
}
impl_real!(f32);
impl_real!(f64);

/// The `(N, C, S)` view of an `(N, C, ...)` tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dims {
    pub n: usize,
    pub c: usize,
    pub s: usize,
}

impl Dims {
    pub fn of(shape: &[usize]) -> Self {
        Self {
            n: shape[0],
            c: shape[1],
            s: shape[2..].iter().product(),
        }
    }

    /// Values per channel: the `M` that the statistics average over.
    pub fn count(&self) -> usize {
        self.n * self.s
    }

    pub fn len(&self) -> usize {
        self.n * self.c * self.s
    }
}

/// One channel's batch statistics, kept in the element type for the element-wise passes.
#[derive(Debug, Clone, Copy)]
pub struct ChannelStats<E> {
    /// The channel's first value: subtracted before anything else.
    pub pivot: E,
    /// The mean of `x - pivot`.
    pub shifted_mean: E,
    /// `1 / sqrt(var + eps)`.
    pub inv_std: E,
    /// The batch mean and the biased batch variance, for the running statistics.
    pub mean: f64,
    pub var: f64,
}

/// Lanes of independent partial sums: they let the compiler vectorise the float64 sums, which
/// it may not reorder on its own.
const LANES: usize = 8;

/// `Σ (x - pivot)` and `Σ (x - pivot)²` over one contiguous run, in float64.
#[inline]
fn shifted_sums<E: Real>(run: &[E], pivot: E, sum: &mut [f64; LANES], sq: &mut [f64; LANES]) {
    let chunks = run.chunks_exact(LANES);
    let tail = chunks.remainder();
    for chunk in chunks {
        for lane in 0..LANES {
            let d = chunk[lane].sub(pivot).to_f64();
            sum[lane] += d;
            sq[lane] += d * d;
        }
    }
    for (lane, &v) in tail.iter().enumerate() {
        let d = v.sub(pivot).to_f64();
        sum[lane] += d;
        sq[lane] += d * d;
    }
}

/// Per-channel statistics of `x` in one pass.
pub fn channel_stats<E: Real>(x: &[E], dims: Dims, eps: f64) -> Vec<ChannelStats<E>> {
    debug_assert_eq!(x.len(), dims.len());
    let m = dims.count() as f64;
    (0..dims.c)
        .into_par_iter()
        .map(|c| {
            let pivot = x[c * dims.s];
            let (mut sum, mut sq) = ([0.0; LANES], [0.0; LANES]);
            for n in 0..dims.n {
                let start = (n * dims.c + c) * dims.s;
                shifted_sums(&x[start..start + dims.s], pivot, &mut sum, &mut sq);
            }
            let shifted_mean = sum.iter().sum::<f64>() / m;
            let var = (sq.iter().sum::<f64>() / m - shifted_mean * shifted_mean).max(0.0);
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

/// Runs `f(channel, out_run, in_runs)` over every `(n, c)` run, in parallel. Small runs are
/// grouped so that each task has enough work.
fn for_each_run<E: Real, F>(out: &mut [E], dims: Dims, f: F)
where
    F: Fn(usize, usize, &mut [E]) + Sync,
{
    // `f(c, offset, run)`: `offset` is where `run` starts in the flat tensor.
    let min_runs = (4096 / dims.s.max(1)).max(1);
    out.par_chunks_mut(dims.s)
        .with_min_len(min_runs)
        .enumerate()
        .for_each(|(i, run)| f(i % dims.c, i * dims.s, run));
}

/// Training-mode output `y = ((x - pivot) - shifted_mean) * gamma * inv_std + beta`.
pub fn normalize<E: Real>(
    x: &[E],
    dims: Dims,
    stats: &[ChannelStats<E>],
    gamma: &[E],
    beta: &[E],
    y: &mut [E],
) {
    for_each_run(y, dims, |c, offset, out| {
        let st = stats[c];
        let scale = E::from_f64(gamma[c].to_f64() * st.inv_std.to_f64());
        let input = &x[offset..offset + out.len()];
        for (o, &v) in out.iter_mut().zip(input) {
            *o = v.sub(st.pivot).sub(st.shifted_mean).mul_add(scale, beta[c]);
        }
    });
}

/// Per-channel `Σ dy` and `Σ dy · x̂`, the reductions of the backward pass.
pub fn grad_sums<E: Real>(
    x: &[E],
    dy: &[E],
    dims: Dims,
    stats: &[ChannelStats<E>],
) -> Vec<(f64, f64)> {
    (0..dims.c)
        .into_par_iter()
        .map(|c| {
            let st = stats[c];
            let (mut sum_dy, mut sum_dy_d) = ([0.0f64; LANES], [0.0f64; LANES]);
            for n in 0..dims.n {
                let start = (n * dims.c + c) * dims.s;
                let xs = &x[start..start + dims.s];
                let gs = &dy[start..start + dims.s];
                let (xc, gc) = (xs.chunks_exact(LANES), gs.chunks_exact(LANES));
                let (xt, gt) = (xc.remainder(), gc.remainder());
                for (xv, gv) in xc.zip(gc) {
                    for lane in 0..LANES {
                        let d = xv[lane].sub(st.pivot).sub(st.shifted_mean).to_f64();
                        let g = gv[lane].to_f64();
                        sum_dy[lane] += g;
                        sum_dy_d[lane] += g * d;
                    }
                }
                for (lane, (&xv, &gv)) in xt.iter().zip(gt).enumerate() {
                    let d = xv.sub(st.pivot).sub(st.shifted_mean).to_f64();
                    sum_dy[lane] += gv.to_f64();
                    sum_dy_d[lane] += gv.to_f64() * d;
                }
            }
            let sum_dy: f64 = sum_dy.iter().sum();
            let sum_dy_xhat = sum_dy_d.iter().sum::<f64>() * st.inv_std.to_f64();
            (sum_dy, sum_dy_xhat)
        })
        .collect()
}

/// The input gradient:
/// `dx = gamma·inv_std · (dy - mean(dy) - x̂ · mean(dy·x̂))`, written as
/// `dx = a·dy + b·(x - mean) + c` with per-channel `a`, `b`, `c`.
pub fn input_grad<E: Real>(
    x: &[E],
    dy: &[E],
    dims: Dims,
    stats: &[ChannelStats<E>],
    gamma: &[E],
    sums: &[(f64, f64)],
    dx: &mut [E],
) {
    let m = dims.count() as f64;
    let coefficients: Vec<(E, E, E)> = (0..dims.c)
        .map(|c| {
            let inv_std = stats[c].inv_std.to_f64();
            let a = gamma[c].to_f64() * inv_std;
            let (sum_dy, sum_dy_xhat) = sums[c];
            (
                E::from_f64(a),
                E::from_f64(-a * inv_std * sum_dy_xhat / m),
                E::from_f64(-a * sum_dy / m),
            )
        })
        .collect();
    for_each_run(dx, dims, |c, offset, out| {
        let st = stats[c];
        let (a, b, k) = coefficients[c];
        let xs = &x[offset..offset + out.len()];
        let gs = &dy[offset..offset + out.len()];
        for ((o, &xv), &gv) in out.iter_mut().zip(xs).zip(gs) {
            let d = xv.sub(st.pivot).sub(st.shifted_mean);
            *o = gv.mul_add(a, d.mul_add(b, k));
        }
    });
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

    #[test]
    fn input_gradient_is_zero_for_a_constant_upstream_gradient() {
        // y's per-channel mean does not depend on x, so dy = const gives dx = 0.
        let dims = Dims { n: 4, c: 3, s: 5 };
        let x: Vec<f64> = (0..dims.len()).map(|i| (i as f64 * 0.37).sin()).collect();
        let dy = vec![0.25; dims.len()];
        let stats = channel_stats(&x, dims, 1e-5);
        let gamma = vec![1.5, -0.5, 2.0];
        let sums = grad_sums(&x, &dy, dims, &stats);
        let mut dx = vec![f64::NAN; dims.len()];
        input_grad(&x, &dy, dims, &stats, &gamma, &sums, &mut dx);
        assert!(dx.iter().all(|v| v.abs() < 1e-12), "{dx:?}");
    }
}
