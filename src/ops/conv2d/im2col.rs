//! The convolution's data movement: im2col (with a [`Prologue`] applied as it reads, which is
//! how BN → ReLU fuses into the convolution) and col2im, its adjoint.

use std::mem::MaybeUninit;
use std::ops::Range;

use super::Shape;
use crate::ops::cpu::{assume_init, assume_init_mut, uninit};
use crate::ops::flex::Element;

/// What [`im2col`] applies to each input value as it reads it: nothing ([`Identity`]), or the
/// BN → ReLU that precedes a convolution (`ops::bn_relu_conv2d`), so that its output is never
/// written.
pub(crate) trait Prologue<E>: Sync {
    /// Whether values pass unchanged (then one image under a 1×1 kernel is its own `cols`).
    const IDENTITY: bool;
    /// The map for input channel `c`.
    fn channel(&self, c: usize) -> impl Fn(E) -> E + Copy;
}

/// The plain convolution's prologue: values pass unchanged.
pub(crate) struct Identity;

impl<E> Prologue<E> for Identity {
    const IDENTITY: bool = true;
    #[inline(always)]
    fn channel(&self, _: usize) -> impl Fn(E) -> E + Copy {
        |v| v
    }
}

/// `cols[r][i·P + p]` for input `channels` of the `imgs` images of `x` (a group,
/// contiguous), from `cols`' first row: row `r = ((c - channels.start)·k_h + ky)·k_w + kx`,
/// `p = oy·W_out + ox`.
pub(super) fn im2col<E: Element, P: Prologue<E>>(
    x: &[E],
    s: Shape,
    imgs: usize,
    cols: &mut [MaybeUninit<E>],
    prologue: &P,
    channels: Range<usize>,
) {
    let (p, width) = (s.p(), imgs * s.p());
    for c in channels.clone() {
        let f = prologue.channel(c);
        for ky in 0..s.k_h {
            for kx in 0..s.k_w {
                let r = ((c - channels.start) * s.k_h + ky) * s.k_w + kx;
                let row = &mut cols[r * width..][..width];
                let (lo, hi) = s.columns(kx);
                for i in 0..imgs {
                    let plane = &x[i * s.x_image + c * s.h * s.w..][..s.h * s.w];
                    if s.stride == 1 && s.w_out == s.w {
                        same_width_row(plane, s, ky, kx, &mut row[i * p..][..p], f);
                        continue;
                    }
                    for oy in 0..s.h_out {
                        let out = &mut row[i * p + oy * s.w_out..][..s.w_out];
                        let iy = (oy * s.stride + ky).wrapping_sub(s.padding);
                        if iy >= s.h {
                            out.iter_mut().for_each(|o| {
                                o.write(E::ZERO);
                            });
                            continue;
                        }
                        let input = &plane[iy * s.w..][..s.w];
                        zero_edge(&mut out[..lo]);
                        zero_edge(&mut out[hi..]);
                        let first = lo * s.stride + kx - s.padding;
                        // Every column in [lo, hi) reads inside the row (see Shape::columns),
                        // so the loops below write all of them.
                        assert!(hi == lo || first + (hi - lo - 1) * s.stride < s.w);
                        if s.stride == 1 {
                            for (o, &v) in out[lo..hi].iter_mut().zip(&input[first..]) {
                                o.write(f(v));
                            }
                        } else {
                            let strided = input[first..].iter().step_by(s.stride);
                            for (o, &v) in out[lo..hi].iter_mut().zip(strided) {
                                o.write(f(v));
                            }
                        }
                    }
                }
            }
        }
    }
}

/// The bytes of [`im2col`]'s matrix that [`for_each_chunk`] forms at a time: a chunk that
/// the core's own cache holds while the matrix product reads it, where a whole matrix (3.3 MB
/// for a DenseNet layer of 160 channels at 24×24) is written out to the shared cache and read
/// back from there.
const CHUNK_BYTES: usize = 512 << 10;

/// The group's [`im2col`] matrix in chunks of whole input channels, in order: `f(rows, cols)`
/// for each, `cols` the rows `rows` of the matrix (`rows.len() × imgs·P`, row-major). One
/// image under a 1×1 kernel of stride 1 without padding is its own matrix, borrowed whole.
/// The prologue is applied once per value: as the columns are formed under a 1×1 kernel,
/// otherwise into the group's own copy first.
pub(super) fn for_each_chunk<E: Element, P: Prologue<E>>(
    x: &[E],
    s: Shape,
    imgs: usize,
    prologue: &P,
    mut f: impl FnMut(Range<usize>, &[E]),
) {
    let window = s.k_h * s.k_w;
    let pointwise = window == 1 && s.stride == 1 && s.padding == 0;
    if P::IDENTITY && imgs == 1 && pointwise {
        return f(0..s.k(), &x[..s.image_len()]);
    }
    let per_channel = window * imgs * s.p();
    let channel_bytes = (per_channel * std::mem::size_of::<E>()).max(1);
    let step = (CHUNK_BYTES / channel_bytes).clamp(1, s.c_in.max(1));
    let mapped = (!P::IDENTITY && window > 1).then(|| mapped(x, s, imgs, prologue));
    let mut buffer = uninit::<E>(step.min(s.c_in) * per_channel);
    for first in (0..s.c_in).step_by(step) {
        let channels = first..(first + step).min(s.c_in);
        let cols = &mut buffer[..channels.len() * per_channel];
        match &mapped {
            Some(m) => {
                let own = s.with_x_image(s.image_len());
                im2col(m, own, imgs, cols, &Identity, channels.clone());
            }
            None => im2col(x, s, imgs, cols, prologue, channels.clone()),
        }
        // SAFETY: im2col wrote every element of the chunk.
        let cols = unsafe { assume_init_mut(cols) };
        f(channels.start * window..channels.end * window, cols);
    }
}

/// The group's `imgs` images with `prologue` applied to each value.
fn mapped<E: Element, P: Prologue<E>>(x: &[E], s: Shape, imgs: usize, prologue: &P) -> Vec<E> {
    let plane = s.h * s.w;
    let mut out = uninit::<E>(imgs * s.image_len());
    for (i, image) in out.chunks_mut(s.image_len()).enumerate() {
        let from = &x[i * s.x_image..][..s.image_len()];
        for (c, (to, from)) in image.chunks_mut(plane).zip(from.chunks(plane)).enumerate() {
            let f = prologue.channel(c);
            for (o, &v) in to.iter_mut().zip(from) {
                o.write(f(v));
            }
        }
    }
    // SAFETY: every plane was written above.
    unsafe { assume_init(out) }
}

/// One image's row `(ky, kx)` of [`im2col`] for a stride-1 convolution that keeps the width
/// (`W_out = W`: a 3×3 window with padding 1, a 1×1 without): the valid output rows read one
/// run of the plane, shifted by `(ky - padding)·W + kx - padding`, so they are one copy, after
/// which the columns that fall in the padding are zeroed (the copy put the neighbouring row's
/// edge there).
fn same_width_row<E: Element>(
    plane: &[E],
    s: Shape,
    ky: usize,
    kx: usize,
    out: &mut [MaybeUninit<E>],
    f: impl Fn(E) -> E,
) {
    let w = s.w;
    // iy = oy + ky - padding must lie within [0, h).
    let first_row = s.padding.saturating_sub(ky).min(s.h_out);
    let end_row = (s.h + s.padding)
        .saturating_sub(ky)
        .clamp(first_row, s.h_out);
    let (lo, hi) = s.columns(kx);
    let zero = |o: &mut MaybeUninit<E>| {
        o.write(E::ZERO);
    };
    out[..first_row * w].iter_mut().for_each(zero);
    out[end_row * w..].iter_mut().for_each(zero);
    if first_row == end_row || lo == hi {
        out[first_row * w..end_row * w].iter_mut().for_each(zero);
        return;
    }
    // Output (oy, ox) reads plane[(oy + ky - padding)·W + ox + kx - padding]: one offset.
    let start = first_row * w + lo;
    let end = (end_row - 1) * w + hi;
    let from = (first_row + ky - s.padding) * w + lo + kx - s.padding;
    let run = &plane[from..from + (end - start)];
    for (o, &v) in out[start..end].iter_mut().zip(run) {
        o.write(f(v));
    }
    for row in out[first_row * w..end_row * w].chunks_mut(w) {
        zero_edge(&mut row[..lo]);
        zero_edge(&mut row[hi..]);
    }
}

/// Zeros for a row's columns under the padding: as many values as the padding is wide. Plain
/// stores, because the compiler turns a zeroing loop into a call to `memset`, and one such
/// call per edge of every row cost more than the row's copy (`perf`, docs/performance.md).
#[inline(always)]
pub(super) fn zero_edge<E: Element>(out: &mut [MaybeUninit<E>]) {
    for o in out {
        // SAFETY: `o` is a valid, aligned element of the slice; the volatile store only keeps
        // the loop from becoming a `memset` call.
        unsafe { std::ptr::write_volatile(o.as_mut_ptr(), E::ZERO) }
    }
}

/// Adds `dcols` (laid out as [`im2col`]'s output) back into the group's input gradient `dx`.
pub(super) fn col2im<E: Element>(dcols: &[E], s: Shape, imgs: usize, dx: &mut [E]) {
    let (p, width) = (s.p(), imgs * s.p());
    for c in 0..s.c_in {
        for ky in 0..s.k_h {
            for kx in 0..s.k_w {
                let r = (c * s.k_h + ky) * s.k_w + kx;
                let row = &dcols[r * width..][..width];
                let (lo, hi) = s.columns(kx);
                for i in 0..imgs {
                    let plane = &mut dx[i * s.image_len() + c * s.h * s.w..][..s.h * s.w];
                    for oy in 0..s.h_out {
                        let iy = (oy * s.stride + ky).wrapping_sub(s.padding);
                        if iy >= s.h || lo == hi {
                            continue;
                        }
                        let grads = &row[i * p + oy * s.w_out..][lo..hi];
                        let first = lo * s.stride + kx - s.padding;
                        let input = &mut plane[iy * s.w..][first..];
                        for (j, &g) in grads.iter().enumerate() {
                            let v = &mut input[j * s.stride];
                            *v = v.add(g);
                        }
                    }
                }
            }
        }
    }
}
