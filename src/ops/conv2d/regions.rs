//! Convolutions of small feature maps without the padding's products.
//!
//! On a small map most windows hang over the edge: a 3×3 window with padding 1 reads one value
//! and eight zeros of a 1×1 map, and four values of nine on a 2×2 one. im2col writes those
//! zeros and the matrix product multiplies them (in ResNet-18 on 28-pixel images, its 1×1 and
//! 2×2 maps, a third of its convolutions' products). Here the output positions are split into
//! regions whose windows read the same taps inside the input (corners, edges, interior), the
//! region's columns are gathered for those taps only, and each tap is one product with the
//! weight's `(C_out, C_in)` matrix of that tap, read in place. Gradients follow the same
//! regions: the weight's gradient is accumulated tap by tap in place.

use std::mem::MaybeUninit;
use std::ops::Range;

use rayon::prelude::*;

use super::{
    backward_by_groups, bias_gradient, few_groups, fill_rows, matmul, matmul_strided, row_major,
    transposed, Identity, Mat, Prologue, Shape, MIN_COLUMNS,
};
use crate::ops::cpu::{assume_init, uninit};
use crate::ops::flex::Element;

/// The share of the window's taps, over all output positions, that must fall inside the input
/// for im2col to run as it is: below it the regions' products run instead. A 3×3 window with
/// padding 1 has 11% of its taps inside on 1×1 maps and 44% on 2×2 ones, where the regions
/// win; on 4×4 maps (69%) their many small products ran slower than im2col's one in ResNet-18
/// (docs/performance.md).
const MIN_INSIDE: f64 = 0.5;

/// Output rows × columns whose windows all read taps `ky` × `kx` inside the input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Region {
    rows: Range<usize>,
    cols: Range<usize>,
    ky: Range<usize>,
    kx: Range<usize>,
}

impl Region {
    fn positions(&self) -> usize {
        self.rows.len() * self.cols.len()
    }

    fn taps(&self) -> usize {
        self.ky.len() * self.kx.len()
    }

    /// The output positions `(oy, ox)`, row by row.
    fn positions_iter(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        self.rows
            .clone()
            .flat_map(move |oy| self.cols.clone().map(move |ox| (oy, ox)))
    }

    /// The taps `(ky, kx)`, row by row.
    fn taps_iter(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        self.ky
            .clone()
            .flat_map(move |ky| self.kx.clone().map(move |kx| (ky, kx)))
    }
}

/// Along one axis: runs of output coordinates whose windows read the same taps inside the
/// input, with those taps.
fn runs(
    len_in: usize,
    len_out: usize,
    k: usize,
    stride: usize,
    padding: usize,
) -> Vec<(Range<usize>, Range<usize>)> {
    let mut runs: Vec<(Range<usize>, Range<usize>)> = Vec::new();
    for o in 0..len_out {
        // Tap t reads input o·stride + t - padding: inside when it lies in [0, len_in).
        let start = o * stride;
        let lo = padding.saturating_sub(start).min(k);
        let hi = (len_in + padding).saturating_sub(start).clamp(lo, k);
        match runs.last_mut() {
            Some((outs, taps)) if *taps == (lo..hi) => outs.end = o + 1,
            _ => runs.push((o..o + 1, lo..hi)),
        }
    }
    runs
}

/// The regions of `s`, when fewer than [`MIN_INSIDE`] of its taps fall inside the input.
pub(super) fn plan(s: Shape) -> Option<Vec<Region>> {
    let rows = runs(s.h, s.h_out, s.k_h, s.stride, s.padding);
    let cols = runs(s.w, s.w_out, s.k_w, s.stride, s.padding);
    let mut regions = Vec::with_capacity(rows.len() * cols.len());
    for (oy, ky) in &rows {
        for (ox, kx) in &cols {
            regions.push(Region {
                rows: oy.clone(),
                cols: ox.clone(),
                ky: ky.clone(),
                kx: kx.clone(),
            });
        }
    }
    let inside: usize = regions.iter().map(|r| r.positions() * r.taps()).sum();
    let all = s.p() * s.k_h * s.k_w;
    ((inside as f64) < MIN_INSIDE * all as f64).then_some(regions)
}

/// Images per group: enough that the smallest region's products have [`MIN_COLUMNS`] columns.
fn group(s: Shape, regions: &[Region]) -> usize {
    let fewest = regions.iter().map(Region::positions).min().unwrap_or(1);
    MIN_COLUMNS.div_ceil(fewest).clamp(1, s.n.max(1))
}

/// The weight's `(C_out, C_in)` matrix of tap `(ky, kx)`, read in place.
fn tap_weight<E>(weight: &[E], s: Shape, (ky, kx): (usize, usize)) -> Mat<&[E]> {
    Mat {
        ptr: &weight[ky * s.k_w + kx..],
        rows: s.c_out,
        cols: s.c_in,
        row_stride: s.k(),
        col_stride: s.k_h * s.k_w,
    }
}

/// The weight a [`forward`] by regions multiplies with.
#[derive(Clone, Copy)]
pub(super) enum Kernel<'a, E> {
    /// The convolution's own `(C_out, C_in, k_h, k_w)` weight.
    Plain(&'a [E]),
    /// The `(C_in, C_out, k_h, k_w)` weight of the convolution whose input gradient this one
    /// computes (`dx_by_convolution`): its channel axes swapped and its window flipped, read
    /// in place by strides instead of copied (ResNet-18's 1×1 and 2×2 maps hold most of its
    /// weights).
    Adjoint(&'a [E]),
}

impl<'a, E> Kernel<'a, E> {
    /// The `(C_out, C_in)` matrix of tap `(ky, kx)` of the convolution `s`.
    fn tap(self, s: Shape, (ky, kx): (usize, usize)) -> Mat<&'a [E]> {
        match self {
            Kernel::Plain(weight) => tap_weight(weight, s, (ky, kx)),
            Kernel::Adjoint(weight) => {
                // Tap (ky, kx) here is tap (k_h-1-ky, k_w-1-kx) of the given weight, whose
                // shape is `s` with C_in and C_out swapped; transposed.
                let given = Shape {
                    c_in: s.c_out,
                    c_out: s.c_in,
                    ..s
                };
                transposed(tap_weight(weight, given, (s.k_h - 1 - ky, s.k_w - 1 - kx)))
            }
        }
    }
}

/// The `(C_in, n)` rows of tap number `t` (`tap`) of a region's columns: of `cols`, the
/// columns [`input_columns`] copied, or, for a region of one position (which copies none),
/// read in place from the group's input `xt` in the [`images_last`] layout.
fn tap_rows<'a, E>(
    xt: &'a [E],
    cols: &'a [E],
    s: Shape,
    r: &Region,
    (t, tap): (usize, (usize, usize)),
    imgs: usize,
) -> Mat<&'a [E]> {
    let n = imgs * r.positions();
    match r.positions() {
        1 => {
            let position = (r.rows.start, r.cols.start);
            at_position(xt, (s.c_in, s.h * s.w), input_at(s, position, tap), imgs)
        }
        _ => Mat {
            ptr: &cols[t * n..],
            rows: s.c_in,
            cols: n,
            row_stride: r.taps() * n,
            col_stride: 1,
        },
    }
}

/// Where output position `(oy, ox)` reads tap `(ky, kx)` in a plane (inside it, by the
/// region's construction).
fn input_at(s: Shape, (oy, ox): (usize, usize), (ky, kx): (usize, usize)) -> usize {
    (oy * s.stride + ky - s.padding) * s.w + ox * s.stride + kx - s.padding
}

/// `imgs` images of `channels` planes of `plane` values, `image` values apart in `x`, as
/// `(channels, plane, imgs)`, each value through the prologue: the layout the regions' columns
/// are copied from, a run of `imgs` values at a time. Formed once per group, where gathering
/// each region's columns from the images read every value once per tap that reads it, one
/// value per cache line (`perf`: 4% of W4's samples).
fn images_last<E: Element, P: Prologue<E>>(
    x: &[E],
    (channels, plane, image): (usize, usize, usize),
    imgs: usize,
    prologue: &P,
) -> Vec<E> {
    let mut out = uninit::<E>(channels * plane * imgs);
    if out.is_empty() {
        return Vec::new();
    }
    out.par_chunks_mut(plane * imgs)
        .enumerate()
        .for_each(|(c, block)| {
            let f = prologue.channel(c);
            for i in 0..imgs {
                let from = &x[i * image + c * plane..][..plane];
                for (at, &v) in from.iter().enumerate() {
                    block[at * imgs + i].write(f(v));
                }
            }
        });
    // SAFETY: every channel's block was written above, each position for every image.
    unsafe { assume_init(out) }
}

/// The `(channels, imgs)` matrix of position `at` of `t`, `(channels, plane, imgs)` in the
/// [`images_last`] layout, read in place.
fn at_position<E>(t: &[E], (channels, plane): (usize, usize), at: usize, imgs: usize) -> Mat<&[E]> {
    Mat {
        ptr: &t[at * imgs..],
        rows: channels,
        cols: imgs,
        row_stride: plane * imgs,
        col_stride: 1,
    }
}

/// The group's input in the [`images_last`] layout.
fn input_images_last<E: Element, P: Prologue<E>>(
    x: &[E],
    s: Shape,
    imgs: usize,
    prologue: &P,
) -> Vec<E> {
    images_last(x, (s.c_in, s.h * s.w, s.x_image), imgs, prologue)
}

/// The region's columns from the group's [`images_last`] layout `xt`: row `(c, ky, kx)` of its
/// taps, column `(oy, ox, i)` of its positions. The images vary fastest: a region holds a few
/// positions of many images, so each copy is a run of the images.
fn input_columns<E: Element>(xt: &[E], s: Shape, imgs: usize, r: &Region) -> Vec<E> {
    let n = imgs * r.positions();
    let per_channel = r.taps() * n;
    // A single position's rows are read in place (`tap_rows`).
    if per_channel == 0 || r.positions() == 1 {
        return Vec::new();
    }
    let plane = s.h * s.w;
    let mut cols = uninit::<E>(s.c_in * per_channel);
    cols.par_chunks_mut(per_channel)
        .enumerate()
        .for_each(|(c, block)| {
            let xt = &xt[c * plane * imgs..][..plane * imgs];
            let mut rows = block.chunks_mut(n);
            for tap in r.taps_iter() {
                let row = rows.next().expect("one row per tap");
                for (position, out) in r.positions_iter().zip(row.chunks_mut(imgs)) {
                    let at = input_at(s, position, tap);
                    out.write_copy_of_slice(&xt[at * imgs..][..imgs]);
                }
            }
        });
    // SAFETY: every (channel, tap) row was written above, each position for every image.
    unsafe { assume_init(cols) }
}

/// The `(C_out, n)` output gradients of a region: `copied`, those [`output_columns`] copied,
/// or, for a region of one position (which copies none), read in place from the group's `dy`
/// in the [`images_last`] layout `dyt`, as [`tap_rows`] reads the input.
fn gradient_rows<'a, E>(
    dyt: &'a [E],
    copied: &'a [E],
    s: Shape,
    r: &Region,
    imgs: usize,
) -> Mat<&'a [E]> {
    match r.positions() {
        1 => {
            let at = r.rows.start * s.w_out + r.cols.start;
            at_position(dyt, (s.c_out, s.p()), at, imgs)
        }
        _ => row_major(copied, s.c_out, imgs * r.positions()),
    }
}

/// The region's output gradients from the group's `dy` in the [`images_last`] layout `dyt`:
/// `(C_out, positions·imgs)`, columns as [`input_columns`] orders them.
fn output_columns<E: Element>(dyt: &[E], s: Shape, imgs: usize, r: &Region) -> Vec<E> {
    let p = s.p();
    // A single position's gradients are read in place (`backward`).
    if r.positions() == 1 {
        return Vec::new();
    }
    let mut out = Vec::with_capacity(s.c_out * imgs * r.positions());
    for co in 0..s.c_out {
        for (oy, ox) in r.positions_iter() {
            let at = co * p + oy * s.w_out + ox;
            out.extend_from_slice(&dyt[at * imgs..][..imgs]);
        }
    }
    out
}

/// `y = conv(prologue(x)) + bias` by regions, `(N, C_out, H_out, W_out)`.
pub(super) fn forward<E: Element, P: Prologue<E>>(
    x: &[E],
    kernel: Kernel<'_, E>,
    bias: &[E],
    s: Shape,
    prologue: &P,
    regions: &[Region],
) -> Vec<E> {
    let (p, g) = (s.p(), group(s, regions));
    let parallel = few_groups(s.n.div_ceil(g));
    let mut y = uninit::<E>(s.n * s.c_out * p);
    y.par_chunks_mut(g * s.c_out * p)
        .enumerate()
        .for_each(|(gi, out)| {
            let imgs = out.len() / (s.c_out * p);
            let xt = input_images_last(s.x_images(x, gi * g, imgs), s, imgs, prologue);
            for r in regions {
                let n = imgs * r.positions();
                let cols = input_columns(&xt, s, imgs, r);
                let mut buffer = uninit::<E>(s.c_out * n);
                let product = fill_rows(&mut buffer, bias, n);
                // One product per tap, each reading its weights in place: gathering the
                // region's columns of the weight would read all of it for each region.
                for (t, tap) in r.taps_iter().enumerate() {
                    let (w, cols) = (
                        kernel.tap(s, tap),
                        tap_rows(&xt, &cols, s, r, (t, tap), imgs),
                    );
                    matmul(product, w, cols, true, parallel);
                }
                scatter(out, product, s, imgs, r);
            }
        });
    // SAFETY: the regions cover every output position of every image once.
    unsafe { assume_init(y) }
}

/// The region's `(C_out, positions·imgs)` product into the group's NCHW output, image by
/// image in parallel (each image's values lie `imgs` apart in the product).
fn scatter<E: Element>(
    out: &mut [MaybeUninit<E>],
    product: &[E],
    s: Shape,
    imgs: usize,
    r: &Region,
) {
    let (p, n) = (s.p(), imgs * r.positions());
    out.par_chunks_mut(s.c_out * p)
        .enumerate()
        .for_each(|(i, image)| {
            for (co, plane) in image.chunks_mut(p).enumerate() {
                let from = &product[co * n + i..];
                for (j, (oy, ox)) in r.positions_iter().enumerate() {
                    plane[oy * s.w_out + ox].write(from[j * imgs]);
                }
            }
        });
}

/// `(dx, dweight, dbias)` by regions, as `backward_typed` returns them.
pub(super) fn backward<E: Element, P: Prologue<E>>(
    x: &[E],
    weight: &[E],
    dy: &[E],
    s: Shape,
    need_dx: bool,
    prologue: &P,
    regions: &[Region],
) -> (Option<Vec<E>>, Vec<E>, Vec<E>) {
    let (p, g) = (s.p(), group(s, regions));
    let groups = s.n.div_ceil(g);
    let parallel = few_groups(groups);
    let group = |gi: usize, mut dx: Option<&mut [E]>| {
        let imgs = (s.n - gi * g).min(g);
        let xt = input_images_last(s.x_images(x, gi * g, imgs), s, imgs, prologue);
        let dy = &dy[gi * g * s.c_out * p..][..imgs * s.c_out * p];
        let dyt = images_last(dy, (s.c_out, p, s.c_out * p), imgs, &Identity);
        let mut dweight = vec![E::ZERO; s.c_out * s.k()];
        for r in regions {
            let n = imgs * r.positions();
            let cols = input_columns(&xt, s, imgs, r);
            let copied = output_columns(&dyt, s, imgs, r);
            let grads = gradient_rows(&dyt, &copied, s, r, imgs);
            let mut dcols = match dx {
                Some(_) => vec![E::ZERO; s.c_in * r.taps() * n],
                None => Vec::new(),
            };
            for (t, (ky, kx)) in r.taps_iter().enumerate() {
                // dW[:, :, ky, kx] += dy · colsᵀ of the tap, in place.
                let at = ky * s.k_w + kx;
                let rows = tap_rows(&xt, &cols, s, r, (t, (ky, kx)), imgs);
                let strides = (s.k(), s.k_h * s.k_w);
                matmul_strided(
                    &mut dweight[at..],
                    strides,
                    grads,
                    transposed(rows),
                    true,
                    parallel,
                );
                if dx.is_some() {
                    let w = transposed(tap_weight(weight, s, (ky, kx)));
                    let strides = (r.taps() * n, 1);
                    matmul_strided(&mut dcols[t * n..], strides, w, grads, false, parallel);
                }
            }
            if let Some(dx) = dx.as_deref_mut() {
                add_input_columns(dx, &dcols, s, imgs, r);
            }
        }
        (dweight, bias_gradient(dy, s, imgs))
    };
    backward_by_groups(weight, dy, s, g, need_dx, group)
}

/// Adds the region's input-column gradients (laid out as [`input_columns`]) into the group's
/// input gradient `dx`, `(imgs, C_in, H, W)`.
fn add_input_columns<E: Element>(dx: &mut [E], dcols: &[E], s: Shape, imgs: usize, r: &Region) {
    let n = imgs * r.positions();
    if r.taps() == 0 {
        return;
    }
    for (c, block) in dcols.chunks(r.taps() * n).enumerate() {
        let dx = &mut dx[c * s.h * s.w..];
        for (tap, row) in r.taps_iter().zip(block.chunks(n)) {
            for (position, grads) in r.positions_iter().zip(row.chunks(imgs)) {
                let at = input_at(s, position, tap);
                for (i, &g) in grads.iter().enumerate() {
                    let v = &mut dx[i * s.image_len() + at];
                    *v = v.add(g);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::conv2d::ConvGeometry;

    fn shape(hw: usize, k: usize, stride: usize, padding: usize) -> Shape {
        Shape::of(
            &[2, 3, hw, hw],
            &[4, 3, k, k],
            ConvGeometry { stride, padding },
        )
    }

    #[test]
    fn a_one_by_one_map_reads_only_the_centre_tap() {
        let regions = plan(shape(1, 3, 1, 1)).expect("8 of 9 taps are padding");
        assert_eq!(
            regions,
            vec![Region {
                rows: 0..1,
                cols: 0..1,
                ky: 1..2,
                kx: 1..2
            }]
        );
    }

    #[test]
    fn a_two_by_two_map_has_four_corner_regions() {
        let regions = plan(shape(2, 3, 1, 1)).expect("5 of 9 taps are padding");
        assert_eq!(regions.len(), 4);
        assert_eq!((regions[0].ky.clone(), regions[0].kx.clone()), (1..3, 1..3));
        assert_eq!((regions[3].ky.clone(), regions[3].kx.clone()), (0..2, 0..2));
    }

    #[test]
    fn larger_maps_keep_im2col() {
        assert!(plan(shape(4, 3, 1, 1)).is_none());
        assert!(plan(shape(7, 3, 1, 1)).is_none());
        assert!(plan(shape(28, 5, 1, 0)).is_none());
    }

    #[test]
    fn stride_two_runs_split_at_both_edges() {
        // 7 → 4 with stride 2 and padding 1: output 0 starts in the padding, output 3 ends
        // past the input's edge.
        assert_eq!(
            runs(7, 4, 3, 2, 1),
            vec![(0..1, 1..3), (1..3, 0..3), (3..4, 0..2)]
        );
    }
}
