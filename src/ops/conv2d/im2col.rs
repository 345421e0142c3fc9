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
    match s.w_out {
        0..=4 => narrow::<E, P, 4>(x, s, imgs, cols, prologue, channels),
        5..=8 => narrow::<E, P, 8>(x, s, imgs, cols, prologue, channels),
        9..=16 => narrow::<E, P, 16>(x, s, imgs, cols, prologue, channels),
        _ => by_rows(x, s, imgs, cols, prologue, channels),
    }
}

/// [`im2col`] row by row of the matrix: each row `(c, ky, kx)` is formed image by image from
/// the input plane, its columns under the padding zeroed.
fn by_rows<E: Element, P: Prologue<E>>(
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
                        if lo == hi {
                            // No column of this row reads inside: `first` may lie past it.
                        } else if s.stride == 1 {
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

/// [`im2col`] on maps whose output rows are at most `RUN` values wide (ResNet-18's 14×14 stem
/// and its 7×7 and smaller maps, DenseNet's 12×12 and smaller). There, [`by_rows`] spent its
/// time on the bookkeeping of runs of a few values and on their edges (`perf`,
/// docs/performance.md). Here each image's plane is copied once into a zero-bordered one (the
/// padding included), its columns split by their remainder modulo the stride, so that output
/// row `oy` of matrix row `(c, ky, kx)` is one run of that plane: column `⌊kx/s⌋` of the row
/// `oy·s + ky` of phase `kx mod s`. Each run is moved as one block of `RUN` values, whose tail
/// lands on values written after it (the next output row, or the next image's), and only where
/// no such values follow is a run copied to its exact length.
fn narrow<E: Element, P: Prologue<E>, const RUN: usize>(
    x: &[E],
    s: Shape,
    imgs: usize,
    cols: &mut [MaybeUninit<E>],
    prologue: &P,
    channels: Range<usize>,
) {
    let (p, width) = (s.p(), imgs * s.p());
    let (h_pad, w_pad, stride) = (s.h + 2 * s.padding, s.w + 2 * s.padding, s.stride);
    debug_assert!(s.w_out <= RUN && s.w_out == (w_pad - s.k_w) / stride + 1);
    // Phase `q` holds the bordered plane's columns `q, q + s, …`: `h_pad` rows of `w_phase`.
    let w_phase = w_pad.div_ceil(stride);
    let at = |y: usize, col: usize| ((col % stride) * h_pad + y) * w_phase + col / stride;
    // The border stays zero: only the interior is written, plane after plane. The `RUN`
    // values after the last phase keep the last run's block inside.
    let mut bordered = vec![E::ZERO; stride * h_pad * w_phase + RUN];
    // Where each tap's runs start, and how many runs go as whole blocks (see `copy_runs`):
    // worked out once, not per plane (a division each).
    let window = s.k_h * s.k_w;
    let tap_starts: Vec<usize> = (0..window).map(|t| at(t / s.k_w, t % s.k_w)).collect();
    let blocks_full = whole_blocks::<RUN>(p + RUN, (s.h_out, s.w_out));
    for c in channels.clone() {
        let f = prologue.channel(c);
        for i in 0..imgs {
            let plane = &x[i * s.x_image + c * s.h * s.w..][..s.h * s.w];
            for (y, row) in plane.chunks_exact(s.w).enumerate() {
                let y = y + s.padding;
                if stride == 1 {
                    let to = &mut bordered[at(y, s.padding)..][..s.w];
                    for (t, &v) in to.iter_mut().zip(row) {
                        *t = f(v);
                    }
                } else {
                    // Column `padding + col` is column `j` of phase `q`, counted without a
                    // division per value.
                    let (mut q, mut j) = (s.padding % stride, s.padding / stride);
                    for &v in row {
                        bordered[(q * h_pad + y) * w_phase + j] = f(v);
                        q += 1;
                        if q == stride {
                            (q, j) = (0, j + 1);
                        }
                    }
                }
            }
            // Values after this image's part of a row that are written later: the next
            // images' parts of the same row.
            let later = ((imgs - 1 - i) * p).min(RUN);
            let blocks = if later == RUN {
                blocks_full
            } else {
                whole_blocks::<RUN>(p + later, (s.h_out, s.w_out))
            };
            let first_row = (c - channels.start) * window;
            for (t, &start) in tap_starts.iter().enumerate() {
                let out = &mut cols[(first_row + t) * width + i * p..][..p + later];
                let from = &bordered[start..];
                copy_runs::<E, RUN>(from, stride * w_phase, out, (s.h_out, s.w_out), blocks);
            }
        }
    }
}

/// How many of the `h` runs of `w` values that start `w` apart in a slice of `len` values can
/// be moved as whole blocks of `RUN` values without leaving it.
fn whole_blocks<const RUN: usize>(len: usize, (h, w): (usize, usize)) -> usize {
    match len.checked_sub(RUN) {
        Some(room) => (room / w.max(1) + 1).min(h),
        None => 0,
    }
}

/// `out[oy·w + ox] = from[oy·stride + ox]` for the `h × w` values at the start of `out`: the
/// first `blocks` runs (at most [`whole_blocks`] of `out`'s length) as blocks of `RUN` values
/// (what a block writes past its run the next run, or the caller, overwrites), the rest to
/// their exact length.
#[inline(always)]
fn copy_runs<E: Copy, const RUN: usize>(
    from: &[E],
    stride: usize,
    out: &mut [MaybeUninit<E>],
    (h, w): (usize, usize),
    blocks: usize,
) {
    for oy in 0..blocks {
        let src: &[E; RUN] = from[oy * stride..][..RUN].try_into().expect("RUN values");
        let dst: &mut [MaybeUninit<E>; RUN] =
            (&mut out[oy * w..][..RUN]).try_into().expect("RUN values");
        // One move of the whole block (a value at a time, the compiler kept scalar stores).
        *dst = src.map(MaybeUninit::new);
    }
    for oy in blocks..h {
        out[oy * w..][..w].write_copy_of_slice(&from[oy * stride..][..w]);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::conv2d::ConvGeometry;

    /// A prologue that changes every value, differently per channel.
    struct Affine;

    impl<E: Element> Prologue<E> for Affine {
        const IDENTITY: bool = false;
        fn channel(&self, c: usize) -> impl Fn(E) -> E + Copy {
            move |v: E| v.mul(E::from_f64(0.5 + c as f64)).add(E::ONE)
        }
    }

    fn formed<E: Element, P: Prologue<E>>(
        x: &[E],
        s: Shape,
        imgs: usize,
        prologue: &P,
        channels: Range<usize>,
        narrow_path: bool,
    ) -> Vec<E> {
        let len = channels.len() * s.k_h * s.k_w * imgs * s.p();
        let mut cols = uninit::<E>(len);
        match narrow_path {
            true => im2col(x, s, imgs, &mut cols, prologue, channels),
            false => by_rows(x, s, imgs, &mut cols, prologue, channels),
        }
        // SAFETY: both paths write every element (checked against each other below).
        unsafe { assume_init(cols) }
    }

    /// The narrow maps' path gives the same matrix as the row-by-row one, value for value,
    /// for windows of 1 to 5 with and without padding, from 1 to 4 images (images further
    /// apart than their size, as a dense block's are), and a part of the channels.
    fn narrow_equals_by_rows<E: Element>() {
        for (side, k, padding, stride) in geometries() {
            let geometry = ConvGeometry { stride, padding };
            let s = Shape::of(&[4, 3, side, side], &[2, 3, k, k], geometry);
            if s.w_out > 16 {
                continue;
            }
            let s = s.with_x_image(s.image_len() + 5);
            let x: Vec<E> = (0..4 * s.x_image)
                .map(|v| E::from_f64(((v * 37) % 101) as f64 - 50.0))
                .collect();
            for imgs in 1..=4 {
                for channels in [0..3, 1..3] {
                    let what = format!("side {side}, k {k}, padding {padding}, stride {stride}");
                    assert_paths_agree(&x, s, imgs, &Affine, channels.clone(), &what);
                    assert_paths_agree(&x, s, imgs, &Identity, channels, &what);
                }
            }
        }
    }

    fn assert_paths_agree<E: Element, P: Prologue<E>>(
        x: &[E],
        s: Shape,
        imgs: usize,
        prologue: &P,
        channels: Range<usize>,
        what: &str,
    ) {
        let narrow = formed(x, s, imgs, prologue, channels.clone(), true);
        let rows = formed(x, s, imgs, prologue, channels, false);
        let same = narrow
            .iter()
            .zip(&rows)
            .all(|(u, v)| u.to_f64() == v.to_f64());
        assert!(same, "{what}, {imgs} images");
    }

    /// `(side, window, padding, stride)`: windows of 1 to 7 (the stem's), with and without
    /// padding, at strides 1 to 3, on maps from 1 to 28 wide.
    fn geometries() -> impl Iterator<Item = (usize, usize, usize, usize)> {
        let sides = [1, 2, 3, 4, 5, 7, 8, 9, 12, 14, 16, 28];
        sides.into_iter().flat_map(|side| {
            [1, 2, 3, 5, 7].into_iter().flat_map(move |k| {
                (0..k.min(4)).flat_map(move |padding| {
                    (1..=3)
                        .filter(move |_| side + 2 * padding >= k)
                        .map(move |stride| (side, k, padding, stride))
                })
            })
        })
    }

    #[test]
    fn narrow_maps_form_the_same_columns_f32() {
        narrow_equals_by_rows::<f32>();
    }

    #[test]
    fn narrow_maps_form_the_same_columns_f64() {
        narrow_equals_by_rows::<f64>();
    }
}
