//! The passes for `(N, C)` input (one value per plane: the linear layers' BN). The plane-major
//! passes ([`super::planes`]) would make one call per value there, many times slower per value
//! than on a conv layer's planes (docs/performance.md); these take blocks of rows (examples),
//! each channel's parameters in arrays.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::stats::ChannelStats;
use crate::norm::epilogue::{Activation, Epilogue};
use crate::ops::cpu::{assume_init, fill, simd_fn, uninit, Dims, Real};
use crate::ops::epilogue::kernels::epilogue_grad_plane;

/// What [`input_grad`] reads and writes: `dy` into a new buffer `dx`, or the gradient
/// at BN's output, overwritten with the input gradient.
pub(crate) enum RowsOut<'a, E> {
    Fresh {
        dy: &'a [E],
        dx: &'a mut [MaybeUninit<E>],
    },
    InPlace(&'a mut [E]),
}

/// Rows per rayon task, so that each task has a few thousand values to work on.
fn per_task(dims: Dims) -> usize {
    (4096 / dims.c.max(1)).max(1)
}

/// Each channel's pivot and shifted mean, as arrays: `x - mean = (x - pivot) - shifted`.
fn centering<E: Real>(stats: &[ChannelStats<E>]) -> (Vec<E>, Vec<E>) {
    stats.iter().map(|st| (st.pivot, st.shifted_mean)).unzip()
}

simd_fn! {
    /// `activation(scale · (x - mean) + beta)` over a block of rows.
    #[allow(clippy::too_many_arguments)]
    fn forward_block<E: Real>(
        x: &[E],
        pivot: &[E],
        shifted: &[E],
        scale: &[E],
        beta: &[E],
        activation: Activation,
        out: &mut [MaybeUninit<E>],
    ) {
        let c = pivot.len();
        for (row, out) in x.chunks_exact(c).zip(out.chunks_exact_mut(c)) {
            let z = row
                .iter()
                .zip(pivot.iter().zip(shifted))
                .zip(scale.iter().zip(beta))
                .map(|((&v, (&p, &m)), (&s, &b))| v.sub(p).sub(m).mul_add(s, b));
            match activation {
                Activation::Identity => fill(out, z),
                Activation::Sigmoid => fill(out, z.map(Real::sigmoid)),
                Activation::Relu => fill(out, z.map(|z| Activation::Relu.apply(z))),
            };
        }
    }
}

pub(super) fn forward<E: Real>(
    x: &[E],
    dims: Dims,
    stats: &[ChannelStats<E>],
    gamma: &[E],
    beta: &[E],
    activation: Activation,
) -> Vec<E> {
    let (pivot, shifted) = centering(stats);
    let scale: Vec<E> = stats
        .iter()
        .zip(gamma)
        .map(|(st, g)| E::from_f64(g.to_f64() * st.inv_std.to_f64()))
        .collect();
    let mut out = uninit::<E>(dims.len());
    let block = per_task(dims) * dims.c;
    out.par_chunks_mut(block)
        .zip(x.par_chunks(block))
        .for_each(|(out, x)| forward_block(x, &pivot, &shifted, &scale, beta, activation, out));
    // SAFETY: every row was filled above.
    unsafe { assume_init(out) }
}

simd_fn! {
    /// Adds each channel's `Σ g` and `Σ g · (x - mean)` over a block of rows to `sums`.
    fn sums_block<E: Real>(
        x: &[E],
        g: &[E],
        pivot: &[E],
        shifted: &[E],
        sums: &mut [(f64, f64)],
    ) {
        let c = pivot.len();
        for (row, grads) in x.chunks_exact(c).zip(g.chunks_exact(c)) {
            let terms = row.iter().zip(grads).zip(pivot.iter().zip(shifted));
            for (sum, ((&v, &g), (&p, &m))) in sums.iter_mut().zip(terms) {
                let g = g.to_f64();
                *sum = (sum.0 + g, sum.1 + g * v.sub(p).sub(m).to_f64());
            }
        }
    }
}

/// What [`super::grad_sums`] returns, for BN's own output gradient `g`, or with
/// `epilogue = Some((activations, epilogue, dz))` what [`super::epilogue_grad_sums`] does:
/// `g` is then the epilogue's output gradient, taken back through the activation into `dz`.
#[allow(clippy::type_complexity)]
pub(super) fn grad_sums<E: Real>(
    x: &[E],
    g: &[E],
    dims: Dims,
    stats: &[ChannelStats<E>],
    epilogue: Option<(&[E], Epilogue, &mut [MaybeUninit<E>])>,
) -> Vec<(f64, f64)> {
    let (pivot, shifted) = centering(stats);
    let block = per_task(dims) * dims.c;
    let block_sums = |x: &[E], g: &[E]| {
        let mut sums = vec![(0.0, 0.0); dims.c];
        sums_block(x, g, &pivot, &shifted, &mut sums);
        sums
    };
    // Per block, then added in block order: the same sums on every run.
    let per_block: Vec<Vec<(f64, f64)>> = match epilogue {
        None => x
            .par_chunks(block)
            .zip(g.par_chunks(block))
            .map(|(x, g)| block_sums(x, g))
            .collect(),
        Some((activations, epilogue, dz)) => dz
            .par_chunks_mut(block)
            .zip(x.par_chunks(block))
            .zip(g.par_chunks(block).zip(activations.par_chunks(block)))
            .map(|((dz, x), (g, a))| {
                // Without a pool the epilogue's backward is element-wise.
                let dz = epilogue_grad_plane(a, g, (1, 1), epilogue, dz);
                block_sums(x, dz)
            })
            .collect(),
    };
    let mut sums = vec![(0.0, 0.0); dims.c];
    for block in per_block {
        for (sum, (s0, s1)) in sums.iter_mut().zip(block) {
            *sum = (sum.0 + s0, sum.1 + s1);
        }
    }
    sums.iter()
        .zip(stats)
        .map(|(&sums, st)| st.xhat_sums(sums))
        .collect()
}

simd_fn! {
    /// `dx = a·g + b·(x - mean) + k` over a block of rows.
    fn input_grad_block<E: Real>(
        x: &[E],
        pivot: &[E],
        shifted: &[E],
        coefficients: &[(E, E, E)],
        out: RowsOut<'_, E>,
    ) {
        let c = pivot.len();
        let per_channel = || pivot.iter().zip(shifted).zip(coefficients);
        let grad = |v: E, g: E, ((&p, &m), &(a, b, k)): ((&E, &E), &(E, E, E))| {
            g.mul_add(a, v.sub(p).sub(m).mul_add(b, k))
        };
        match out {
            RowsOut::Fresh { dy, dx } => {
                let rows = x.chunks_exact(c).zip(dy.chunks_exact(c));
                for ((row, gs), out) in rows.zip(dx.chunks_exact_mut(c)) {
                    let values = row.iter().zip(gs).zip(per_channel());
                    fill(out, values.map(|((&v, &g), ch)| grad(v, g, ch)));
                }
            }
            RowsOut::InPlace(gs) => {
                for (row, gs) in x.chunks_exact(c).zip(gs.chunks_exact_mut(c)) {
                    for ((&v, g), ch) in row.iter().zip(gs).zip(per_channel()) {
                        *g = grad(v, *g, ch);
                    }
                }
            }
        }
    }
}

pub(super) fn input_grad<E: Real>(
    x: &[E],
    dims: Dims,
    stats: &[ChannelStats<E>],
    coefficients: &[(E, E, E)],
    out: RowsOut<'_, E>,
) {
    let (pivot, shifted) = centering(stats);
    let block = per_task(dims) * dims.c;
    let run = |x: &[E], out| input_grad_block(x, &pivot, &shifted, coefficients, out);
    match out {
        RowsOut::Fresh { dy, dx } => dx
            .par_chunks_mut(block)
            .zip(x.par_chunks(block).zip(dy.par_chunks(block)))
            .for_each(|(dx, (x, dy))| run(x, RowsOut::Fresh { dy, dx })),
        RowsOut::InPlace(gs) => gs
            .par_chunks_mut(block)
            .zip(x.par_chunks(block))
            .for_each(|(gs, x)| run(x, RowsOut::InPlace(gs))),
    }
}
