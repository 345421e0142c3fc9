//! The fused BN op's passes plane by plane (one `(n, c)` plane per call, planes spread over
//! rayon's pool): the forward (with the epilogue), the backward's sums (through the epilogue)
//! and the input gradient.

use std::mem::MaybeUninit;
use std::ops::Range;

use rayon::prelude::*;

use super::rows::{self, RowsOut};
use super::stats::ChannelStats;
use crate::norm::epilogue::{Activation, Epilogue, Pool};
use crate::ops::cpu::{
    assume_init, channels_per_task, fill, planes_per_task, product_sums, simd_fn, sums_over_images,
    uninit, Dims, Real,
};
use crate::ops::epilogue::kernels::{epilogue_grad_plane, pool_plane, unpool_max2};

/// The training-mode forward: `pool(activation(gamma · x̂ + beta))`.
///
/// Returns the activations (full size; the backward needs them unless the epilogue is
/// [`Epilogue::NONE`], where they are the output) and, with a pool, the pooled output.
/// `plane` is `(H, W)` for 4-d input; a pool needs it.
pub fn forward<E: Real>(
    x: &[E],
    dims: Dims,
    plane: (usize, usize),
    stats: &[ChannelStats<E>],
    gamma: &[E],
    beta: &[E],
    epilogue: Epilogue,
) -> (Vec<E>, Option<Vec<E>>) {
    if dims.s == 1 {
        // No pool fits one value per plane (`Epilogue::output_shape` says so).
        debug_assert_eq!(epilogue.pool, Pool::None);
        return (
            rows::forward(x, dims, stats, gamma, beta, epilogue.activation),
            None,
        );
    }
    let mut activations = uninit::<E>(dims.len());
    let (h, w) = plane;
    let k = epilogue.pool.window().unwrap_or(1);
    let pooled_plane = (h / k) * (w / k);
    let mut pooled = epilogue
        .pool
        .window()
        .map(|_| uninit::<E>(dims.n * dims.c * pooled_plane));
    let per_plane =
        |i: usize, out: &mut [MaybeUninit<E>], pooled: Option<&mut [MaybeUninit<E>]>| {
            let c = i % dims.c;
            let st = stats[c];
            let scale = E::from_f64(gamma[c].to_f64() * st.inv_std.to_f64());
            let input = &x[i * dims.s..][..dims.s];
            forward_plane(input, st, scale, beta[c], epilogue, plane, out, pooled);
        };
    let min_len = planes_per_task(dims);
    match pooled.as_mut() {
        None => activations
            .par_chunks_mut(dims.s)
            .with_min_len(min_len)
            .enumerate()
            .for_each(|(i, out)| per_plane(i, out, None)),
        Some(pooled) => activations
            .par_chunks_mut(dims.s)
            .zip(pooled.par_chunks_mut(pooled_plane))
            .with_min_len(min_len)
            .enumerate()
            .for_each(|(i, (out, pooled))| per_plane(i, out, Some(pooled))),
    }
    // SAFETY: every plane of both buffers was filled above.
    unsafe { (assume_init(activations), pooled.map(|p| assume_init(p))) }
}

simd_fn! {
    /// One `(n, c)` plane of [`forward`].
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn forward_plane<E: Real>(
        input: &[E],
        st: ChannelStats<E>,
        scale: E,
        shift: E,
        epilogue: Epilogue,
        plane: (usize, usize),
        out: &mut [MaybeUninit<E>],
        pooled: Option<&mut [MaybeUninit<E>]>,
    ) {
        let z = input
            .iter()
            .map(move |&v| st.centered(v).mul_add(scale, shift));
        // One loop per activation, so that each one vectorises.
        let a = match epilogue.activation {
            Activation::Identity => fill(out, z),
            Activation::Sigmoid => fill(out, z.map(Real::sigmoid)),
            Activation::Relu => fill(out, z.map(|z| Activation::Relu.apply(z))),
        };
        if let Some(pooled) = pooled {
            pool_plane(a, plane, epilogue.pool, pooled);
        }
    }
}

/// Writes `out[i] = g[i]·a + (((x[i] - pivot) - shifted mean)·b + k)`, or without `g`
/// `((x[i] - pivot) - shifted mean)·b + k` (BN's output: `b` the scale, `k` the shift), with
/// stores that bypass the cache, bit for bit what [`input_grad_plane`] and [`forward_plane`]
/// (without an epilogue) write. For outputs larger than the cache can keep beside their
/// input: an ordinary store first reads each line it writes, a seventh tensor's traffic in
/// W6's five. Returns false, writing nothing, where it has no kernel (not float32, no AVX2).
/// The stores are fenced when `_streams` ends.
pub(crate) fn stream_plane<E: Real>(
    _streams: &StreamedStores,
    x: &[E],
    st: ChannelStats<E>,
    (b, k): (E, E),
    g: Option<(&[E], E)>,
    out: &mut [MaybeUninit<E>],
) -> bool {
    #[cfg(target_arch = "x86_64")]
    if crate::ops::cpu::f32_with_avx2::<E>() {
        let f = |v: E| v.to_f64() as f32;
        // SAFETY: E is f32 (same type, same layout), and the CPU has AVX2.
        unsafe {
            let cast = |s: &[E]| std::slice::from_raw_parts(s.as_ptr().cast::<f32>(), s.len());
            let out = std::slice::from_raw_parts_mut(out.as_mut_ptr().cast(), out.len());
            let g = g.map(|(g, a)| (cast(g), f(a)));
            let centring = (f(st.pivot), f(st.shifted_mean));
            stream_plane_f32_avx2(cast(x), centring, (f(b), f(k)), g, out);
        }
        return true;
    }
    false
}

/// A scope of [`stream_plane`]'s stores: a store fence when it is dropped, on the thread that
/// made them (it cannot be sent to another), so that their output is in memory before any
/// other thread reads it. One fence for a task's planes, not one a plane: each fence waits
/// for the stores before it to drain.
pub(crate) struct StreamedStores(std::marker::PhantomData<*const ()>);

impl StreamedStores {
    pub(crate) fn new() -> Self {
        Self(std::marker::PhantomData)
    }
}

impl Drop for StreamedStores {
    fn drop(&mut self) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: SSE, sfence's one feature, is part of x86-64.
        unsafe {
            std::arch::x86_64::_mm_sfence()
        };
    }
}

/// [`stream_plane`] on float32 with AVX2: a scalar head up to a 32-byte boundary of `out`,
/// eight values a step with `vmovntps`, a scalar tail; unfenced.
///
/// # Safety
/// The CPU must have AVX2; `x` (and `g`) at least as long as `out`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn stream_plane_f32_avx2(
    x: &[f32],
    (pivot, shifted_mean): (f32, f32),
    (b, k): (f32, f32),
    g: Option<(&[f32], f32)>,
    out: &mut [MaybeUninit<f32>],
) {
    use std::arch::x86_64::*;
    let len = out.len();
    assert!(x.len() >= len && g.is_none_or(|(g, _)| g.len() >= len));
    let value = |i: usize| {
        let t = ((x[i] - pivot) - shifted_mean) * b + k;
        match g {
            Some((g, a)) => g[i] * a + t,
            None => t,
        }
    };
    let misalignment = (out.as_ptr() as usize % 32) / 4;
    let head = if misalignment == 0 {
        0
    } else {
        (8 - misalignment).min(len)
    };
    for (i, o) in out[..head].iter_mut().enumerate() {
        o.write(value(i));
    }
    let steps = (len - head) / 8;
    let (vp, vm) = (_mm256_set1_ps(pivot), _mm256_set1_ps(shifted_mean));
    let (vb, vk) = (_mm256_set1_ps(b), _mm256_set1_ps(k));
    let va = _mm256_set1_ps(g.map_or(0.0, |(_, a)| a));
    let dst = out.as_mut_ptr().cast::<f32>();
    for step in 0..steps {
        let i = head + step * 8;
        // SAFETY: i + 8 ≤ len ≤ x.len() (and g's), and dst + i is 32-byte aligned.
        let v = _mm256_loadu_ps(x.as_ptr().add(i));
        let centred = _mm256_sub_ps(_mm256_sub_ps(v, vp), vm);
        let t = _mm256_add_ps(_mm256_mul_ps(centred, vb), vk);
        let y = match g {
            Some((g, _)) => _mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(g.as_ptr().add(i)), va), t),
            None => t,
        };
        _mm256_stream_ps(dst.add(i), y);
    }
    let tail = head + steps * 8;
    for (i, o) in out[tail..].iter_mut().enumerate() {
        o.write(value(tail + i));
    }
}

simd_fn! {
    /// Per channel of `channels`, `Σ dy` and `Σ dy · (x - mean)` (`stats` theirs, in the same
    /// order), the images of `x` `image` values apart (`C·S` when `x` is its own tensor; `dy`
    /// is always). Image by image, a run of each channel in turn, as
    /// [`shifted_sums`](super::stats::shifted_sums) reads.
    pub(crate) fn dy_sums<E: Real>(x: &[E], image: usize, dy: &[E], dims: Dims, channels: Range<usize>, stats: &[ChannelStats<E>]) -> Vec<(f64, f64)> {
        let mut sums = vec![(0.0, 0.0); channels.len()];
        sums_over_images(dims.n, &mut sums, |n, j| {
            let c = channels.start + j;
            let xs = &x[n * image + c * dims.s..][..dims.s];
            (xs, &dy[(n * dims.c + c) * dims.s..][..dims.s], stats[j].gradient_runs())
        });
        sums
    }
}

/// `Σ g` and `Σ g · (x - mean)` over a run of `x` and its gradient `g`: BN's backward sums.
#[inline(always)]
pub(crate) fn dz_sums<E: Real>(x: &[E], g: &[E], st: ChannelStats<E>) -> (f64, f64) {
    product_sums(x, g, st.gradient_runs())
}

/// Per-channel `Σ dy` and `Σ dy · x̂`, the reductions of the backward pass, for BN alone.
pub fn grad_sums<E: Real>(
    x: &[E],
    dy: &[E],
    dims: Dims,
    stats: &[ChannelStats<E>],
) -> Vec<(f64, f64)> {
    if dims.s == 1 {
        return rows::grad_sums(x, dy, dims, stats, None);
    }
    grad_sums_in(x, dims.c * dims.s, dy, dims, stats)
}

/// [`grad_sums`] for planes (`S > 1`) with the images of `x` `image` values apart (the first
/// channels of a dense block's buffer).
pub(crate) fn grad_sums_in<E: Real>(
    x: &[E],
    image: usize,
    dy: &[E],
    dims: Dims,
    stats: &[ChannelStats<E>],
) -> Vec<(f64, f64)> {
    debug_assert!(dims.s > 1);
    let group = channels_per_task::<E>(dims);
    (0..dims.c)
        .into_par_iter()
        .step_by(group)
        .flat_map_iter(|c| {
            let channels = c..(c + group).min(dims.c);
            group_grad_sums(x, image, dy, dims, channels.clone(), &stats[channels])
        })
        .collect()
}

/// [`grad_sums_in`] of `channels` alone (`stats` theirs).
pub(crate) fn group_grad_sums<E: Real>(
    x: &[E],
    image: usize,
    dy: &[E],
    dims: Dims,
    channels: Range<usize>,
    stats: &[ChannelStats<E>],
) -> Vec<(f64, f64)> {
    let sums = dy_sums(x, image, dy, dims, channels, stats);
    sums.into_iter()
        .zip(stats)
        .map(|(sums, st)| st.xhat_sums(sums))
        .collect()
}

simd_fn! {
    /// One `(n, c)` plane of [`epilogue_grad_sums`]: writes `dz`, returns its two sums.
    pub(crate) fn epilogue_plane_sums<E: Real>(
        xs: &[E],
        a: &[E],
        dout: &[E],
        st: ChannelStats<E>,
        plane: (usize, usize),
        epilogue: Epilogue,
        dz: &mut [MaybeUninit<E>],
    ) -> (f64, f64) {
        if epilogue.pool == Pool::Max(2) && epilogue.activation != Activation::Sigmoid {
            return max2_plane_sums(xs, a, dout, st, plane, epilogue.activation, dz);
        }
        let dz = epilogue_grad_plane(a, dout, plane, epilogue, dz);
        dz_sums(xs, dz, st)
    }
}

simd_fn! {
    /// [`epilogue_plane_sums`] through a 2 × 2 max pool: one place per window has a gradient,
    /// so the sums take those places alone, gathered (with their x) a block of windows at a
    /// time. Its own function, so that the other epilogues' loops are compiled as before.
    fn max2_plane_sums<E: Real>(
        xs: &[E],
        a: &[E],
        dout: &[E],
        st: ChannelStats<E>,
        plane: (usize, usize),
        activation: Activation,
        dz: &mut [MaybeUninit<E>],
    ) -> (f64, f64) {
        const BLOCK: usize = 256;
        let (mut grads, mut at) = ([E::ZERO; BLOCK], [E::ZERO; BLOCK]);
        let (mut sums, mut filled) = ((0.0, 0.0), 0);
        let mut add = |grads: &[E], at: &[E]| {
            let (s0, s1) = dz_sums(at, grads, st);
            sums = (sums.0 + s0, sums.1 + s1);
        };
        unpool_max2(a, dout, plane, activation, dz, |place, g| {
            grads[filled] = g;
            at[filled] = xs[place];
            filled += 1;
            if filled == BLOCK {
                add(&grads, &at);
                filled = 0;
            }
        });
        add(&grads[..filled], &at[..filled]);
        sums
    }
}

/// The backward through the epilogue: writes `dz`, the gradient at BN's output, and returns
/// the per-channel `Σ dz` and `Σ dz · x̂` as [`grad_sums`] does.
#[allow(clippy::too_many_arguments)]
pub fn epilogue_grad_sums<E: Real>(
    x: &[E],
    activations: &[E],
    dout: &[E],
    dims: Dims,
    plane: (usize, usize),
    stats: &[ChannelStats<E>],
    epilogue: Epilogue,
    dz: &mut [MaybeUninit<E>],
) -> Vec<(f64, f64)> {
    if dims.s == 1 {
        debug_assert_eq!(epilogue.pool, Pool::None);
        return rows::grad_sums(x, dout, dims, stats, Some((activations, epilogue, dz)));
    }
    let out_plane = dout.len() / (dims.n * dims.c);
    let per_plane: Vec<(f64, f64)> = dz
        .par_chunks_mut(dims.s)
        .with_min_len(planes_per_task(dims))
        .enumerate()
        .map(|(i, dz)| {
            let st = stats[i % dims.c];
            let xs = &x[i * dims.s..][..dims.s];
            let a = &activations[i * dims.s..][..dims.s];
            let dout = &dout[i * out_plane..][..out_plane];
            epilogue_plane_sums(xs, a, dout, st, plane, epilogue, dz)
        })
        .collect();
    let mut sums = vec![(0.0, 0.0); dims.c];
    for (i, (s0, s1)) in per_plane.into_iter().enumerate() {
        sums[i % dims.c].0 += s0;
        sums[i % dims.c].1 += s1;
    }
    sums.iter()
        .zip(stats)
        .map(|(&sums, st)| st.xhat_sums(sums))
        .collect()
}

/// Per channel, `(a, b, k)` of `dx = a·dy + b·(x - mean) + k`, the input gradient
/// `dx = gamma·inv_std · (dy - mean(dy) - x̂ · mean(dy·x̂))`.
pub(crate) fn input_grad_coefficients<E: Real>(
    dims: Dims,
    stats: &[ChannelStats<E>],
    gamma: &[E],
    sums: &[(f64, f64)],
) -> Vec<(E, E, E)> {
    (0..dims.c)
        .map(|c| input_grad_coefficient(dims, stats[c], gamma[c], sums[c]))
        .collect()
}

/// One channel's `(a, b, k)` of [`input_grad_coefficients`].
pub(crate) fn input_grad_coefficient<E: Real>(
    dims: Dims,
    st: ChannelStats<E>,
    gamma: E,
    (sum_dy, sum_dy_xhat): (f64, f64),
) -> (E, E, E) {
    let m = dims.count() as f64;
    let inv_std = st.inv_std.to_f64();
    let a = gamma.to_f64() * inv_std;
    (
        E::from_f64(a),
        E::from_f64(-a * inv_std * sum_dy_xhat / m),
        E::from_f64(-a * sum_dy / m),
    )
}

simd_fn! {
    /// One `(n, c)` plane of [`input_grad`].
    pub(crate) fn input_grad_plane<E: Real>(
        xs: &[E],
        gs: &[E],
        st: ChannelStats<E>,
        coefficients: (E, E, E),
        out: &mut [MaybeUninit<E>],
    ) {
        let (a, b, k) = coefficients;
        let grads = gs.iter().zip(xs);
        fill(out, grads.map(|(&g, &v)| g.mul_add(a, st.centered(v).mul_add(b, k))));
    }
}

simd_fn! {
    /// One `(n, c)` plane of [`input_grad_in_place`].
    pub(crate) fn input_grad_plane_in_place<E: Real>(
        xs: &[E],
        st: ChannelStats<E>,
        coefficients: (E, E, E),
        run: &mut [E],
    ) {
        let (a, b, k) = coefficients;
        for (g, &v) in run.iter_mut().zip(xs) {
            *g = g.mul_add(a, st.centered(v).mul_add(b, k));
        }
    }
}

/// The input gradient, from `dy` into a new buffer.
pub fn input_grad<E: Real>(
    x: &[E],
    dy: &[E],
    dims: Dims,
    stats: &[ChannelStats<E>],
    gamma: &[E],
    sums: &[(f64, f64)],
) -> Vec<E> {
    let coefficients = input_grad_coefficients(dims, stats, gamma, sums);
    let mut dx = uninit::<E>(dims.len());
    if dims.s == 1 {
        let out = RowsOut::Fresh { dy, dx: &mut dx };
        rows::input_grad(x, dims, stats, &coefficients, out);
        // SAFETY: every row was filled above.
        return unsafe { assume_init(dx) };
    }
    dx.par_chunks_mut(dims.s)
        .with_min_len(planes_per_task(dims))
        .enumerate()
        .for_each(|(i, out)| {
            let st = stats[i % dims.c];
            let xs = &x[i * dims.s..][..dims.s];
            let gs = &dy[i * dims.s..][..dims.s];
            input_grad_plane(xs, gs, st, coefficients[i % dims.c], out);
        });
    // SAFETY: every plane was filled above.
    unsafe { assume_init(dx) }
}

/// The input gradient, overwriting `dz` (the gradient at BN's output) with it.
pub fn input_grad_in_place<E: Real>(
    x: &[E],
    dz: &mut [E],
    dims: Dims,
    stats: &[ChannelStats<E>],
    gamma: &[E],
    sums: &[(f64, f64)],
) {
    if dims.s == 1 {
        let coefficients = input_grad_coefficients(dims, stats, gamma, sums);
        rows::input_grad(x, dims, stats, &coefficients, RowsOut::InPlace(dz));
        return;
    }
    input_grad_in_place_in(x, dims.c * dims.s, dz, dims, stats, gamma, sums);
}

/// [`input_grad_in_place`] for planes (`S > 1`) with the images of `x` `image` values apart
/// (`dz` is its own tensor).
pub(crate) fn input_grad_in_place_in<E: Real>(
    x: &[E],
    image: usize,
    dz: &mut [E],
    dims: Dims,
    stats: &[ChannelStats<E>],
    gamma: &[E],
    sums: &[(f64, f64)],
) {
    debug_assert!(dims.s > 1);
    let coefficients = input_grad_coefficients(dims, stats, gamma, sums);
    dz.par_chunks_mut(dims.s)
        .with_min_len(planes_per_task(dims))
        .enumerate()
        .for_each(|(i, run)| {
            let (n, c) = (i / dims.c, i % dims.c);
            let xs = &x[n * image + c * dims.s..][..dims.s];
            input_grad_plane_in_place(xs, stats[c], coefficients[c], run);
        });
}

#[cfg(test)]
mod tests {
    use super::super::stats::{channel_stats, channel_stats_in, group_stats};
    use super::*;
    use crate::ops::cpu::assume_init_mut;

    /// Statistics and backward sums taken for several channels at once, image by image, equal
    /// those of each channel alone, bit for bit (each channel's planes are added in the same
    /// order), in tasks of several channels with a shorter last one, and for a dense block's
    /// first channels.
    #[test]
    fn channels_taken_together_sum_as_one_at_a_time() {
        let dims = Dims {
            n: 6,
            c: 43,
            s: 7 * 7,
        };
        let group = channels_per_task::<f32>(dims);
        assert!(
            group > 1 && !dims.c.is_multiple_of(group),
            "{group} channels per task"
        );
        let image = (dims.c + 5) * dims.s;
        let x: Vec<f32> = (0..dims.n * image)
            .map(|i| 20.0 + ((i * 7919) % 211) as f32 * 0.013)
            .collect();
        let dy: Vec<f32> = (0..dims.len())
            .map(|i| ((i * 104_729) % 97) as f32 * 0.01 - 0.5)
            .collect();
        let stats = channel_stats_in(&x, dims, image, 1e-5);
        let sums = grad_sums_in(&x, image, &dy, dims, &stats);
        for c in 0..dims.c {
            let alone = group_stats(&x, dims, image, c..c + 1, 1e-5)[0];
            let (a, b) = (stats[c], alone);
            assert_eq!(
                (a.pivot, a.shifted_mean, a.inv_std),
                (b.pivot, b.shifted_mean, b.inv_std)
            );
            assert_eq!((a.mean, a.var), (b.mean, b.var), "channel {c}");
            let sums_alone = group_grad_sums(&x, image, &dy, dims, c..c + 1, &stats[c..=c]);
            assert_eq!(sums[c], sums_alone[0], "channel {c}");
        }
    }

    /// The cache-bypassing stores write what the ordinary passes write, bit for bit, at every
    /// alignment of the output and with a tail.
    #[test]
    fn streamed_planes_equal_the_ordinary_ones() {
        let len = 203;
        let x: Vec<f32> = (0..len + 8)
            .map(|i| 50.0 + ((i * 37) % 101) as f32 * 0.031)
            .collect();
        let g: Vec<f32> = (0..len + 8)
            .map(|i| ((i * 53) % 97) as f32 * 0.021 - 1.0)
            .collect();
        let st = ChannelStats {
            pivot: 50.5f32,
            shifted_mean: 1.125,
            inv_std: 0.75,
            mean: 51.625,
            var: 1.0,
        };
        let (scale, shift, a) = (0.8125f32, -0.3f32, 1.7f32);
        for offset in 0..8 {
            let (x, g) = (&x[offset..][..len], &g[offset..][..len]);
            let mut want = uninit::<f32>(len + 8);
            let mut got = uninit::<f32>(len + 8);
            let (want_out, got_out) = (&mut want[offset..][..len], &mut got[offset..][..len]);
            let plane = (1, len);
            forward_plane(x, st, scale, shift, Epilogue::NONE, plane, want_out, None);
            if !stream_plane(&StreamedStores::new(), x, st, (scale, shift), None, got_out) {
                return; // no kernel on this CPU: nothing to compare
            }
            // SAFETY: both planes were written in full above.
            let (w, o) = unsafe { (assume_init_mut(want_out), assume_init_mut(got_out)) };
            assert_eq!(w, o, "forward at offset {offset}");
            let coefficients = (a, scale, shift);
            input_grad_plane(x, g, st, coefficients, want_out_of(w));
            assert!(stream_plane(
                &StreamedStores::new(),
                x,
                st,
                (scale, shift),
                Some((g, a)),
                want_out_of(o)
            ));
            assert_eq!(w, o, "input gradient at offset {offset}");
        }
    }

    /// An initialised slice as an output buffer again.
    fn want_out_of(s: &mut [f32]) -> &mut [MaybeUninit<f32>] {
        // SAFETY: `MaybeUninit<f32>` has f32's layout; writing through it only re-initialises.
        unsafe { &mut *(s as *mut [f32] as *mut [MaybeUninit<f32>]) }
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
        let dx = input_grad(&x, &dy, dims, &stats, &gamma, &sums);
        assert!(dx.iter().all(|v| v.abs() < 1e-12), "{dx:?}");
    }
}
