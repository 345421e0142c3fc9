//! The fused BN op's training passes, channel by channel where a channel is large: its
//! statistics then its output, its sums then its input gradient, while its values are still in
//! cache. Elsewhere they hand over to the plane-major passes.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::planes::*;
use super::stats::{channel_stats, group_stats, ChannelStats};
use crate::norm::epilogue::Epilogue;
use crate::ops::cpu::{
    assume_init, assume_init_mut, channels_per_task, last_level_cache_bytes, uninit, Dims, Real,
};

/// `buf`'s planes of `plane` values, grouped by channel: group `c` holds channel `c`'s planes
/// in sample order.
fn by_channel<T>(buf: &mut [T], plane: usize, dims: Dims) -> Vec<Vec<&mut [T]>> {
    let mut groups: Vec<Vec<&mut [T]>> = (0..dims.c).map(|_| Vec::with_capacity(dims.n)).collect();
    for (i, p) in buf.chunks_mut(plane).enumerate() {
        groups[i % dims.c].push(p);
    }
    groups
}

/// `items` in groups of `size` (the last one shorter), in order.
fn grouped<T>(items: impl IntoIterator<Item = T>, size: usize) -> Vec<Vec<T>> {
    let mut groups: Vec<Vec<T>> = Vec::new();
    for (i, item) in items.into_iter().enumerate() {
        if i % size == 0 {
            groups.push(Vec::with_capacity(size));
        }
        groups.last_mut().expect("pushed above").push(item);
    }
    groups
}

/// Whether [`train_forward`] and [`train_backward`] go channel by channel. That keeps a
/// channel's values in cache between its two passes, which pays where a channel is large (W6's
/// BatchNorm2d(64), 100k values per channel), but leaves few tasks to balance over the threads,
/// which costs more than the cache saves on LeNet-BN's 6- and 16-channel layers (criterion
/// `lenet_bn_layers_fwd_bwd`; figures in docs/performance.md). Small channels gain nothing from
/// the cache, and `(N, C)` input has its own row passes.
fn channel_major(dims: Dims) -> bool {
    dims.s > 1 && dims.c >= 32 && dims.count() >= 32 * 1024
}

/// Whether the channel-major passes write BN's output and input gradient with stores that
/// bypass the cache ([`stream_plane`]): where the tensor is at least half the last-level
/// cache, so that it would not stay there beside its input anyway.
fn streams<E>(dims: Dims) -> bool {
    static LAST_LEVEL_CACHE: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    let cache = *LAST_LEVEL_CACHE.get_or_init(last_level_cache_bytes);
    dims.len() * std::mem::size_of::<E>() >= cache / 2
}

/// The training-mode forward, statistics included: `(stats, activations, pooled)` as
/// [`channel_stats`] then [`forward`] give them, bit for bit.
///
/// Channel-major: each task takes a channel's statistics and then writes its output planes
/// while its input (`N·S` values, 400 KB for W6's layer) is still in cache, where the two
/// separate passes read `x` from memory twice.
#[allow(clippy::type_complexity)]
pub fn train_forward<E: Real>(
    x: &[E],
    dims: Dims,
    plane: (usize, usize),
    eps: f64,
    gamma: &[E],
    beta: &[E],
    epilogue: Epilogue,
) -> (Vec<ChannelStats<E>>, Vec<E>, Option<Vec<E>>) {
    if !channel_major(dims) {
        let stats = channel_stats(x, dims, eps);
        let (activations, pooled) = forward(x, dims, plane, &stats, gamma, beta, epilogue);
        return (stats, activations, pooled);
    }
    let mut activations = uninit::<E>(dims.len());
    let k = epilogue.pool.window().unwrap_or(1);
    let pooled_plane = (plane.0 / k) * (plane.1 / k);
    let mut pooled = epilogue
        .pool
        .window()
        .map(|_| uninit::<E>(dims.n * dims.c * pooled_plane));
    let outputs = by_channel(&mut activations, dims.s, dims);
    let pooled_outputs: Vec<Option<Vec<&mut [MaybeUninit<E>]>>> = match pooled.as_mut() {
        Some(p) => by_channel(p, pooled_plane, dims)
            .into_iter()
            .map(Some)
            .collect(),
        None => (0..dims.c).map(|_| None).collect(),
    };
    let group = channels_per_task::<E>(dims);
    let stream = streams::<E>(dims) && epilogue.is_none();
    let stats = grouped(outputs.into_iter().zip(pooled_outputs), group)
        .into_par_iter()
        .enumerate()
        .flat_map_iter(|(t, task)| {
            let channels = t * group..t * group + task.len();
            let stats = group_stats(x, dims, dims.c * dims.s, channels.clone(), eps);
            let streams = StreamedStores::new();
            let mut task: Vec<_> = task
                .into_iter()
                .map(|(outs, pooled)| (outs.into_iter(), pooled.map(|p| p.into_iter())))
                .collect();
            for n in 0..dims.n {
                for (c, ((outs, pooled), &st)) in channels.clone().zip(task.iter_mut().zip(&stats))
                {
                    let out = outs.next().expect("one per image");
                    let input = &x[(n * dims.c + c) * dims.s..][..dims.s];
                    let scale = E::from_f64(gamma[c].to_f64() * st.inv_std.to_f64());
                    if stream && stream_plane(&streams, input, st, (scale, beta[c]), None, out) {
                        continue;
                    }
                    let pooled = pooled.as_mut().map(|p| p.next().expect("one per plane"));
                    forward_plane(input, st, scale, beta[c], epilogue, plane, out, pooled);
                }
            }
            stats
        })
        .collect();
    // SAFETY: every plane of both buffers was filled above.
    unsafe {
        (
            stats,
            assume_init(activations),
            pooled.map(|p| assume_init(p)),
        )
    }
}

/// The training-mode backward: per channel `(Σ dz, Σ dz·x̂)` and, if `need_dx`, the input
/// gradient, as [`grad_sums`] and [`input_grad`] give them (or, with an epilogue, as
/// [`epilogue_grad_sums`] and [`input_grad_in_place`] do), bit for bit.
///
/// Channel-major, like [`train_forward`]: a channel's sums and then its input gradient, while
/// its `x` and `dy` are still in cache.
#[allow(clippy::too_many_arguments)]
pub fn train_backward<E: Real>(
    x: &[E],
    dout: &[E],
    activations: Option<&[E]>,
    dims: Dims,
    plane: (usize, usize),
    stats: &[ChannelStats<E>],
    gamma: &[E],
    epilogue: Epilogue,
    need_dx: bool,
) -> (Vec<(f64, f64)>, Option<Vec<E>>) {
    if !channel_major(dims) {
        return match activations {
            None => {
                let sums = grad_sums(x, dout, dims, stats);
                let dx = need_dx.then(|| input_grad(x, dout, dims, stats, gamma, &sums));
                (sums, dx)
            }
            Some(a) => {
                let mut dz = uninit::<E>(dims.len());
                let sums = epilogue_grad_sums(x, a, dout, dims, plane, stats, epilogue, &mut dz);
                // SAFETY: epilogue_grad_sums writes every element of dz.
                let mut dz = unsafe { assume_init(dz) };
                let dx = need_dx.then(|| {
                    input_grad_in_place(x, &mut dz, dims, stats, gamma, &sums);
                    dz
                });
                (sums, dx)
            }
        };
    }
    // Without an epilogue and without dx nothing is written: the sums alone.
    if activations.is_none() && !need_dx {
        return (grad_sums(x, dout, dims, stats), None);
    }
    let out_plane = dout.len() / (dims.n * dims.c);
    let mut dx = uninit::<E>(dims.len());
    fn plane_of<E>(t: &[E], (n, c, channels): (usize, usize, usize), len: usize) -> &[E] {
        &t[(n * channels + c) * len..][..len]
    }
    let group = channels_per_task::<E>(dims);
    let stream = streams::<E>(dims);
    let sums = grouped(by_channel(&mut dx, dims.s, dims), group)
        .into_par_iter()
        .enumerate()
        .flat_map_iter(|(t, task)| {
            let channels = t * group..t * group + task.len();
            let stats = &stats[channels.clone()];
            let Some(a) = activations else {
                let sums = group_grad_sums(x, dims.c * dims.s, dout, dims, channels.clone(), stats);
                let coefficients: Vec<_> = channels
                    .clone()
                    .zip(stats.iter().zip(&sums))
                    .map(|(c, (&st, &sums))| input_grad_coefficient(dims, st, gamma[c], sums))
                    .collect();
                let mut task: Vec<_> = task.into_iter().map(Vec::into_iter).collect();
                let streams = StreamedStores::new();
                for n in 0..dims.n {
                    for (c, (outs, (&st, &coefficient))) in channels
                        .clone()
                        .zip(task.iter_mut().zip(stats.iter().zip(&coefficients)))
                    {
                        let out = outs.next().expect("one per image");
                        let at = (n, c, dims.c);
                        let (xs, gs) = (plane_of(x, at, dims.s), plane_of(dout, at, dims.s));
                        let (a, b, k) = coefficient;
                        if !(stream && stream_plane(&streams, xs, st, (b, k), Some((gs, a)), out)) {
                            input_grad_plane(xs, gs, st, coefficient, out);
                        }
                    }
                }
                return sums;
            };
            channels
                .zip(task)
                .zip(stats)
                .map(|((c, outs), &st)| {
                    let mut sums = (0.0, 0.0);
                    let mut written = Vec::with_capacity(dims.n);
                    for (n, dz) in outs.into_iter().enumerate() {
                        let at = (n, c, dims.c);
                        let (xs, a) = (plane_of(x, at, dims.s), plane_of(a, at, dims.s));
                        let g = plane_of(dout, at, out_plane);
                        let (s0, s1) = epilogue_plane_sums(xs, a, g, st, plane, epilogue, dz);
                        sums = (sums.0 + s0, sums.1 + s1);
                        // SAFETY: epilogue_plane_sums wrote every element of dz.
                        written.push(unsafe { assume_init_mut(dz) });
                    }
                    let sums = st.xhat_sums(sums);
                    let coefficient = input_grad_coefficient(dims, st, gamma[c], sums);
                    if need_dx {
                        for (n, dz) in written.into_iter().enumerate() {
                            let xs = plane_of(x, (n, c, dims.c), dims.s);
                            input_grad_plane_in_place(xs, st, coefficient, dz);
                        }
                    }
                    sums
                })
                .collect()
        })
        .collect();
    // SAFETY: every plane was written above (by the input gradient or the epilogue's).
    (sums, need_dx.then(|| unsafe { assume_init(dx) }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::norm::epilogue::{Activation, Pool};

    /// large enough to take them, with and without an epilogue: 32 channels of 96×96 planes,
    /// a task each, and 34 channels of 28×28 planes, in tasks of several channels (the last
    /// one shorter).
    #[test]
    fn channel_major_passes_equal_the_separate_ones() {
        let single = Dims {
            n: 8,
            c: 32,
            s: 96 * 96,
        };
        let several = Dims {
            n: 48,
            c: 34,
            s: 28 * 28,
        };
        assert_eq!(channels_per_task::<f32>(single), 1);
        assert!(
            channels_per_task::<f32>(several) > 1
                && !several.c.is_multiple_of(channels_per_task::<f32>(several))
        );
        for (dims, plane) in [(single, (96, 96)), (several, (28, 28))] {
            channel_major_case(dims, plane);
        }
    }

    fn channel_major_case(dims: Dims, plane: (usize, usize)) {
        assert!(channel_major(dims));
        let value = |i: usize, k: f64| ((i as f64 * k).sin() * 3.0) as f32;
        let x: Vec<f32> = (0..dims.len()).map(|i| value(i, 0.37) + 50.0).collect();
        let gamma: Vec<f32> = (0..dims.c).map(|c| 0.5 + c as f32 * 0.1).collect();
        let beta: Vec<f32> = (0..dims.c).map(|c| c as f32 * 0.05 - 1.0).collect();
        for epilogue in [
            Epilogue::NONE,
            Epilogue {
                activation: Activation::Sigmoid,
                pool: Pool::Avg(2),
            },
            Epilogue {
                activation: Activation::Relu,
                pool: Pool::Max(2),
            },
        ] {
            let (stats, act, pooled) =
                train_forward(&x, dims, plane, 1e-5, &gamma, &beta, epilogue);
            let want_stats = channel_stats(&x, dims, 1e-5);
            let (want_act, want_pooled) =
                forward(&x, dims, plane, &want_stats, &gamma, &beta, epilogue);
            for (a, b) in stats.iter().zip(&want_stats) {
                assert_eq!((a.mean, a.var, a.inv_std), (b.mean, b.var, b.inv_std));
            }
            assert!(
                act == want_act && pooled == want_pooled,
                "{epilogue:?} forward"
            );

            let out_len = pooled.as_ref().map_or(dims.len(), Vec::len);
            let dout: Vec<f32> = (0..out_len).map(|i| value(i, 0.11)).collect();
            let saved = (!epilogue.is_none()).then_some(&act[..]);
            for need_dx in [true, false] {
                let (sums, dx) = train_backward(
                    &x, &dout, saved, dims, plane, &stats, &gamma, epilogue, need_dx,
                );
                let (want_sums, want_dx) = match saved {
                    None => {
                        let sums = grad_sums(&x, &dout, dims, &stats);
                        let dx = input_grad(&x, &dout, dims, &stats, &gamma, &sums);
                        (sums, dx)
                    }
                    Some(a) => {
                        let mut dz = uninit(dims.len());
                        let sums = epilogue_grad_sums(
                            &x, a, &dout, dims, plane, &stats, epilogue, &mut dz,
                        );
                        let mut dz = unsafe { assume_init(dz) };
                        input_grad_in_place(&x, &mut dz, dims, &stats, &gamma, &sums);
                        (sums, dz)
                    }
                };
                assert_eq!(sums, want_sums, "{epilogue:?} sums");
                assert_eq!(dx, need_dx.then_some(want_dx), "{epilogue:?} dx");
            }
        }
    }
}
