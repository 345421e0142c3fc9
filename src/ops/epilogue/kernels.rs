//! The epilogue's loops over plain slices: the activation and the `k × k` pool forward, and the
//! gradient back through them. The fused BN passes call these per plane too.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use crate::norm::epilogue::{Activation, Epilogue, Pool};
use crate::ops::cpu::{
    assume_init, assume_init_mut, fill, planes_per_task, simd_fn, uninit, Dims, Real,
};

// The activation's maths on the kernels' element types.
impl Activation {
    #[inline(always)]
    pub(crate) fn apply<E: Real>(self, z: E) -> E {
        match self {
            Self::Identity => z,
            Self::Sigmoid => z.sigmoid(),
            // `z < 0`, not `z > 0`: NaN passes through, as in PyTorch.
            Self::Relu => {
                if z < E::ZERO {
                    E::ZERO
                } else {
                    z
                }
            }
        }
    }

    /// The derivative, from the activation's output `a`.
    #[inline(always)]
    pub(crate) fn derivative_from_output<E: Real>(self, a: E) -> E {
        match self {
            Self::Identity => E::ONE,
            Self::Sigmoid => a.mul(E::ONE.sub(a)),
            Self::Relu => {
                if a > E::ZERO {
                    E::ONE
                } else {
                    E::ZERO
                }
            }
        }
    }
}

/// Pools one `(h, w)` plane into `out`, `(h / k) × (w / k)`.
#[inline(always)]
pub(crate) fn pool_plane<E: Real>(
    a: &[E],
    plane: (usize, usize),
    pool: Pool,
    out: &mut [MaybeUninit<E>],
) {
    // A literal `k` per arm lets the window loops unroll (LeNet's pools are 2×2).
    match pool {
        Pool::None => {}
        Pool::Avg(2) => pool_rows(a, plane, 2, true, out),
        Pool::Max(2) => pool_rows(a, plane, 2, false, out),
        Pool::Avg(k) => pool_rows(a, plane, k, true, out),
        Pool::Max(k) => pool_rows(a, plane, k, false, out),
    }
}

/// [`pool_plane`], one output row at a time (no division per output value).
#[inline(always)]
fn pool_rows<E: Real>(
    a: &[E],
    (h, w): (usize, usize),
    k: usize,
    average: bool,
    out: &mut [MaybeUninit<E>],
) {
    let (ho, wo) = (h / k, w / k);
    let inv_area = E::from_f64(1.0 / (k * k) as f64);
    for (r, out_row) in out[..ho * wo].chunks_exact_mut(wo).enumerate() {
        let rows = &a[r * k * w..][..k * w];
        let window = |j: usize| {
            let c0 = j * k;
            let mut acc = if average { E::ZERO } else { rows[c0] };
            for dh in 0..k {
                for &v in &rows[dh * w + c0..][..k] {
                    acc = match average {
                        true => acc.add(v),
                        // NaN wins, as in PyTorch.
                        false if v > acc || v.is_nan() => v,
                        false => acc,
                    };
                }
            }
            if average {
                acc.mul(inv_area)
            } else {
                acc
            }
        };
        fill(out_row, (0..wo).map(window));
    }
}

/// The gradient with respect to BN's output `z` of one `(h, w)` plane, from the gradient of
/// the epilogue's output `dout` and the saved activations `a`, written to `dz`.
#[inline(always)]
pub(crate) fn epilogue_grad_plane<'a, E: Real>(
    a: &[E],
    dout: &[E],
    (h, w): (usize, usize),
    epilogue: Epilogue,
    dz: &'a mut [MaybeUninit<E>],
) -> &'a mut [E] {
    let act = epilogue.activation;
    let (k, dz) = match epilogue.pool {
        // The activation matched once, not per value, so that each loop vectorises.
        Pool::None => {
            return match act {
                Activation::Identity => through(a, dout, dz, |g, _| g),
                Activation::Sigmoid => through(a, dout, dz, |g, a| {
                    g.mul(Activation::Sigmoid.derivative_from_output(a))
                }),
                Activation::Relu => through(a, dout, dz, |g, a| {
                    g.mul(Activation::Relu.derivative_from_output(a))
                }),
            };
        }
        // ReLU (or nothing) then a 2 × 2 max pool, the chapter's and speednet's block: each
        // window's four gradients are written at once, with no zeroing or second pass. (Their
        // derivative is finite, so the zeros off the maximum stay zeros, as below.)
        Pool::Max(2) if act != Activation::Sigmoid => {
            return unpool_max2(a, dout, (h, w), act, dz, |_, _| {});
        }
        Pool::Avg(k) | Pool::Max(k) => (k, fill(dz, std::iter::repeat(E::ZERO))),
    };
    // A literal `k` per arm lets the window loops unroll (LeNet's pools are 2×2).
    match epilogue.pool {
        Pool::Avg(2) => unpool_rows(a, dout, (h, w), 2, true, dz),
        Pool::Max(2) => unpool_rows(a, dout, (h, w), 2, false, dz),
        Pool::Avg(_) => unpool_rows(a, dout, (h, w), k, true, dz),
        _ => unpool_rows(a, dout, (h, w), k, false, dz),
    }
    if act != Activation::Identity {
        for (d, &av) in dz.iter_mut().zip(a) {
            *d = d.mul(act.derivative_from_output(av));
        }
    }
    dz
}

/// `dz = grad(dout, a)` value by value.
#[inline(always)]
fn through<'a, E: Real>(
    a: &[E],
    dout: &[E],
    dz: &'a mut [MaybeUninit<E>],
    grad: impl Fn(E, E) -> E,
) -> &'a mut [E] {
    let (a, dout) = (&a[..dz.len()], &dout[..dz.len()]);
    for ((d, &g), &av) in dz.iter_mut().zip(dout).zip(a) {
        d.write(grad(g, av));
    }
    // SAFETY: the loop wrote every element of dz (a and dout are at least as long).
    unsafe { assume_init_mut(dz) }
}

/// The backward of `act` then a 2 × 2 max pool over one `(h, w)` plane: the gradient goes to
/// each window's first maximum in row-major order (NaN first), times the activation's
/// derivative there; every other place, leftover rows and columns included, gets 0.
///
/// `at_max(place, grad)` is told the place of each window's maximum in the plane and its
/// gradient: the only values of `dz` that are not 0, so that BN's sums over `dz` can take those
/// alone.
#[inline(always)]
pub(crate) fn unpool_max2<'a, E: Real>(
    a: &[E],
    dout: &[E],
    plane: (usize, usize),
    act: Activation,
    dz: &'a mut [MaybeUninit<E>],
    at_max: impl FnMut(usize, E),
) -> &'a mut [E] {
    // The activation matched once, not per window.
    match act {
        Activation::Identity => unpool_max2_through(a, dout, plane, dz, at_max, |_| E::ONE),
        Activation::Sigmoid => unpool_max2_through(a, dout, plane, dz, at_max, |v| {
            Activation::Sigmoid.derivative_from_output(v)
        }),
        Activation::Relu => unpool_max2_through(a, dout, plane, dz, at_max, |v| {
            Activation::Relu.derivative_from_output(v)
        }),
    }
}

/// [`unpool_max2`] with the activation's derivative `derivative`.
#[inline(always)]
fn unpool_max2_through<'a, E: Real>(
    a: &[E],
    dout: &[E],
    (h, w): (usize, usize),
    dz: &'a mut [MaybeUninit<E>],
    mut at_max: impl FnMut(usize, E),
    derivative: impl Fn(E) -> E,
) -> &'a mut [E] {
    let (ho, wo) = (h / 2, w / 2);
    let zero = MaybeUninit::new(E::ZERO);
    for (r, dout_row) in dout[..ho * wo].chunks_exact(wo).enumerate() {
        let (top, bottom) = dz[2 * r * w..(2 * r + 2) * w].split_at_mut(w);
        let (a_top, a_bottom) = a[2 * r * w..(2 * r + 2) * w].split_at(w);
        for (j, &g) in dout_row.iter().enumerate() {
            let c = 2 * j;
            let v = [a_top[c], a_top[c + 1], a_bottom[c], a_bottom[c + 1]];
            let (mut best, mut max) = (0, v[0]);
            for (i, &vi) in v.iter().enumerate().skip(1) {
                if vi > max || (vi.is_nan() && !max.is_nan()) {
                    (best, max) = (i, vi);
                }
            }
            let grad = g.mul(derivative(max));
            at_max(2 * r * w + c + (best >> 1) * w + (best & 1), grad);
            let at = |i: usize| MaybeUninit::new(if i == best { grad } else { E::ZERO });
            top[c] = at(0);
            top[c + 1] = at(1);
            bottom[c] = at(2);
            bottom[c + 1] = at(3);
        }
        if w % 2 == 1 {
            top[w - 1] = zero;
            bottom[w - 1] = zero;
        }
    }
    debug_assert_eq!(dz.len(), h * w);
    dz[2 * ho * w..].fill(zero);
    // SAFETY: the loops above wrote every element of the plane.
    unsafe { assume_init_mut(dz) }
}

/// The pool's backward into `dz` (zeroed): each output's gradient spread over its `k × k`
/// window (average) or routed to the window's maximum, one output row at a time.
#[inline(always)]
fn unpool_rows<E: Real>(
    a: &[E],
    dout: &[E],
    (h, w): (usize, usize),
    k: usize,
    average: bool,
    dz: &mut [E],
) {
    let (ho, wo) = (h / k, w / k);
    let share_of = E::from_f64(1.0 / (k * k) as f64);
    for (r, dout_row) in dout[..ho * wo].chunks_exact(wo).enumerate() {
        let base = r * k * w;
        for (j, &g) in dout_row.iter().enumerate() {
            let c0 = base + j * k;
            if average {
                let share = g.mul(share_of);
                for dh in 0..k {
                    dz[c0 + dh * w..][..k].fill(share);
                }
            } else {
                // The first maximum in row-major order, the one the forward took.
                let mut best = c0;
                for dh in 0..k {
                    for i in c0 + dh * w..c0 + dh * w + k {
                        if a[i] > a[best] || (a[i].is_nan() && !a[best].is_nan()) {
                            best = i;
                        }
                    }
                }
                dz[best] = g;
            }
        }
    }
}

simd_fn! {
    /// [`epilogue_grad_plane`] over one plane, or over a block of values when nothing pools.
    fn epilogue_grad_block<E: Real>(
        a: &[E],
        dout: &[E],
        plane: (usize, usize),
        epilogue: Epilogue,
        dz: &mut [MaybeUninit<E>],
    ) {
        epilogue_grad_plane(a, dout, plane, epilogue, dz);
    }
}

/// The backward of an epilogue alone (no BN before it): the gradient at its input from the
/// gradient at its output `dout` and its saved activations.
pub fn epilogue_grad<E: Real>(
    activations: &[E],
    dout: &[E],
    dims: Dims,
    plane: (usize, usize),
    epilogue: Epilogue,
) -> Vec<E> {
    let mut dz = uninit::<E>(dims.len());
    match epilogue.pool {
        // Element-wise: any blocks will do.
        Pool::None => dz
            .par_chunks_mut(4096)
            .zip(activations.par_chunks(4096).zip(dout.par_chunks(4096)))
            .for_each(|(dz, (a, g))| epilogue_grad_block(a, g, (1, 1), epilogue, dz)),
        _ => {
            let out_plane = dout.len() / (dims.n * dims.c);
            dz.par_chunks_mut(dims.s)
                .with_min_len(planes_per_task(dims))
                .enumerate()
                .for_each(|(i, dz)| {
                    let a = &activations[i * dims.s..][..dims.s];
                    let g = &dout[i * out_plane..][..out_plane];
                    epilogue_grad_block(a, g, plane, epilogue, dz)
                })
        }
    }
    // SAFETY: every block was filled above.
    unsafe { assume_init(dz) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pooled_output_and_its_gradient_follow_the_first_maximum() {
        // One 2x4 plane, 2x2 max pool: windows [1, 5; 5, 2] and [3, 3; 0, 3].
        let a = [1.0f64, 5.0, 3.0, 3.0, 5.0, 2.0, 0.0, 3.0];
        let mut out = uninit(2);
        pool_plane(&a, (2, 4), Pool::Max(2), &mut out);
        let out: Vec<f64> = out.iter().map(|v| unsafe { v.assume_init() }).collect();
        assert_eq!(out, [5.0, 3.0]);
        let ep = Epilogue {
            activation: Activation::Identity,
            pool: Pool::Max(2),
        };
        let mut dz = uninit(8);
        let dz = epilogue_grad_plane(&a, &[10.0, 20.0], (2, 4), ep, &mut dz).to_vec();
        assert_eq!(dz, [0.0, 10.0, 20.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
    }
}
