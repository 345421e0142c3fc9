//! Size-keeping convolutions of stride 1 on wide maps without im2col.
//!
//! A `k×k` window with padding `(k - 1)/2` reads, for tap `(ky, kx)` and every output position,
//! the input shifted by that tap. With the image copied once into a zero-padded grid of
//! `W + 2p` columns, that shifted input is one run of the grid per channel: each tap is one
//! matrix product of the weight's `(C_out, C_in)` matrix for the tap (the weight laid out by
//! taps once per call) with the grid's runs from the tap's offset, read in place. The output
//! is computed on the grid's width, and the last `2p` columns of each row, which wrap around
//! into the next row, are dropped: on 24×24 maps that is 8% more products than im2col's,
//! against writing the nine shifted copies of the input that im2col forms and reading them
//! back. DenseNet's first dense block (24×24, 70% of its 3×3 products) and its input
//! gradients run here.

use rayon::prelude::*;

use super::im2col::zero_edge;
use super::products::{product_into_strided, uncount};
use super::{
    backward_by_groups, bias_gradient, few_groups, fill_rows, matmul, row_major, transpose_rows,
    Mat, Prologue, Shape, MIN_COLUMNS,
};
use crate::ops::cpu::{assume_init, uninit};
use crate::ops::flex::Element;

/// The largest share of the products that may fall on the dropped columns: `2p` of every
/// `W + 2p` (a 3×3 window on maps of 16 columns and more; 12×12 maps, at 1/7, run im2col).
const MAX_WASTE: f64 = 0.125;

/// The fewest input channels, the inner dimension of each tap's product: below it the nine
/// thin products cost more than im2col's one (LeNet's single input channel).
const MIN_DEPTH: usize = 16;

/// A cache line of float32 values: the grid's planes start on one when its buffer does.
const LINE: usize = 16;

/// How one image lies in the padded grid: `C_in` planes, each `(H + 2p)` rows of `width`
/// values with the input in the middle and zeros around, then zeros up to `plane` values, so
/// that the last tap's run stays in its own plane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Grid {
    width: usize,
    plane: usize,
}

/// The grid for `s`, where the convolution runs on one.
pub(super) fn plan(s: Shape) -> Option<Grid> {
    let k = s.k_h;
    let keeps_size = s.stride == 1
        && k > 1
        && s.k_w == k
        && 2 * s.padding + 1 == k
        && (s.h_out, s.w_out) == (s.h, s.w);
    let width = s.w + 2 * s.padding;
    let waste = (width - s.w_out) as f64 / width as f64;
    // One image per group (see Shape::group): its own products are wide enough.
    let wide = s.p() >= MIN_COLUMNS && waste <= MAX_WASTE;
    (keeps_size && wide && s.c_in >= MIN_DEPTH).then(|| {
        // The last tap's run ends k - 2 values past the grid's last row.
        let plane = ((s.h + 2 * s.padding) * width + k - 1).next_multiple_of(LINE);
        Grid { width, plane }
    })
}

impl Grid {
    /// The product's columns per image: the output's rows on the grid's width.
    fn columns(&self, s: Shape) -> usize {
        s.h_out * self.width
    }

    /// The operations of one image's products spent on the dropped columns, for one pass
    /// (forward, or the weight's gradient).
    fn wasted_flops(&self, s: Shape) -> u64 {
        let dropped = s.h_out * (self.width - s.w_out);
        (2 * s.c_out * s.k() * dropped) as u64
    }

    /// Tap `(ky, kx)`'s input, `C_in × columns`: each channel's run of the grid from the
    /// tap's offset.
    fn tap_input<'a, E>(&self, grid: &'a [E], s: Shape, ky: usize, kx: usize) -> Mat<&'a [E]> {
        Mat {
            ptr: &grid[ky * self.width + kx..],
            rows: s.c_in,
            cols: self.columns(s),
            row_stride: self.plane,
            col_stride: 1,
        }
    }

    /// One image of `x` (from its first value) in the grid, `prologue` applied to each value;
    /// the padding is zeros, as the convolution pads the prologue's output.
    fn fill<E: Element, P: Prologue<E>>(&self, x: &[E], s: Shape, prologue: &P) -> Vec<E> {
        let (w, p) = (s.w, s.padding);
        let mut out = uninit::<E>(s.c_in * self.plane);
        for (c, plane) in out.chunks_mut(self.plane).enumerate() {
            let f = prologue.channel(c);
            // The top rows and the first row's left padding.
            let (top, rest) = plane.split_at_mut(p * self.width + p);
            zero_edge(top);
            for (y, row) in x[c * s.h * w..][..s.h * w].chunks(w).enumerate() {
                // The row, then its right padding and the next row's left one: 2p zeros.
                let to = &mut rest[y * self.width..][..self.width];
                for (o, &v) in to.iter_mut().zip(row) {
                    o.write(f(v));
                }
                zero_edge(&mut to[w..]);
            }
            zero_edge(&mut rest[s.h * self.width..]);
        }
        // SAFETY: each plane was written whole above.
        unsafe { assume_init(out) }
    }
}

/// The weight by taps: `(k_h·k_w, C_out, C_in)`, each tap's matrix with its input channels
/// contiguous, which gemm reads as it is; in the weight's own layout they lie `k_h·k_w` apart
/// and gemm packed them for every image.
fn by_taps<E: Element>(weight: &[E], s: Shape) -> Vec<E> {
    let window = s.k_h * s.k_w;
    let mut out = uninit::<E>(weight.len());
    for (t, tap) in out.chunks_mut(s.c_out * s.c_in).enumerate() {
        for (o, &v) in tap.iter_mut().zip(weight[t..].iter().step_by(window)) {
            o.write(v);
        }
    }
    // SAFETY: each tap's C_out·C_in values were written above.
    unsafe { assume_init(out) }
}

/// Tap `t`'s `(C_out, C_in)` matrix of [`by_taps`]' weight.
fn tap_weight<E>(weight: &[E], s: Shape, t: usize) -> Mat<&[E]> {
    let len = s.c_out * s.c_in;
    row_major(&weight[t * len..][..len], s.c_out, s.c_in)
}

fn taps(s: Shape) -> impl Iterator<Item = (usize, usize)> {
    let k_w = s.k_w;
    (0..s.k_h * k_w).map(move |t| (t / k_w, t % k_w))
}

/// `y = conv(prologue(x)) + bias`, `(N, C_out, H, W)`, image by image in parallel.
pub(super) fn forward<E: Element, P: Prologue<E>>(
    x: &[E],
    weight: &[E],
    bias: &[E],
    s: Shape,
    prologue: &P,
    grid: Grid,
) -> Vec<E> {
    let (p, columns) = (s.p(), grid.columns(s));
    let parallel = few_groups(s.n);
    let weight = by_taps(weight, s);
    let mut y = uninit::<E>(s.n * s.c_out * p);
    y.par_chunks_mut(s.c_out * p)
        .enumerate()
        .for_each(|(i, out)| {
            let input = grid.fill(s.x_images(x, i, 1), s, prologue);
            let mut buffer = uninit::<E>(s.c_out * columns);
            // The bias first, then each tap's product added onto it.
            let product = fill_rows(&mut buffer, bias, columns);
            for (t, (ky, kx)) in taps(s).enumerate() {
                let tap = grid.tap_input(&input, s, ky, kx);
                matmul(product, tap_weight(&weight, s, t), tap, true, parallel);
            }
            uncount(grid.wasted_flops(s));
            // The grid's rows to the output's, without the columns that wrapped.
            for (o, row) in out.chunks_mut(s.w_out).zip(product.chunks(grid.width)) {
                for (o, &v) in o.iter_mut().zip(row) {
                    o.write(v);
                }
            }
        });
    // SAFETY: every output row of every image was written above.
    unsafe { assume_init(y) }
}

/// `(dx, dweight, dbias)` as [`super::backward_typed`] gives them: the weight's gradient tap by
/// tap, `dWᵀ` rows `c·k² + tap` = the tap's input times `dyᵀ` on the grid; `dx` is a
/// convolution of `dy` (size-keeping, stride 1), which runs on a grid of its own where it can.
pub(super) fn backward<E: Element, P: Prologue<E>>(
    x: &[E],
    weight: &[E],
    dy: &[E],
    s: Shape,
    need_dx: bool,
    prologue: &P,
    grid: Grid,
) -> (Option<Vec<E>>, Vec<E>, Vec<E>) {
    let (p, k, columns) = (s.p(), s.k(), grid.columns(s));
    let window = s.k_h * s.k_w;
    let parallel = few_groups(s.n);
    let image = |i: usize, dx: Option<&mut [E]>| {
        assert!(
            dx.is_none(),
            "a size-keeping convolution's dx is a convolution of dy"
        );
        let input = grid.fill(s.x_images(x, i, 1), s, prologue);
        let dy = &dy[i * s.c_out * p..][..s.c_out * p];
        // dyᵀ on the grid's width, `(columns, C_out)`, zeros in the wrapped columns (they add
        // nothing to dW). Transposed, gemm packs it by contiguous runs, as it does once per tap.
        let mut on_grid = uninit::<E>(columns * s.c_out);
        for (j, to) in on_grid.chunks_mut(s.c_out).enumerate() {
            let (y, x) = (j / grid.width, j % grid.width);
            if x < s.w_out {
                let from = dy[y * s.w_out + x..].iter().step_by(p);
                for (o, &v) in to.iter_mut().zip(from) {
                    o.write(v);
                }
            } else {
                zero_edge(to);
            }
        }
        // SAFETY: every position's C_out values were written above.
        let on_grid = unsafe { assume_init(on_grid) };
        let grads = row_major(&on_grid, columns, s.c_out);
        let mut dweight_t = uninit::<E>(k * s.c_out);
        for (t, (ky, kx)) in taps(s).enumerate() {
            let rows = (window * s.c_out, 1);
            let to = &mut dweight_t[t * s.c_out..];
            product_into_strided(to, rows, grid.tap_input(&input, s, ky, kx), grads, parallel);
        }
        uncount(grid.wasted_flops(s));
        // SAFETY: tap t wrote rows c·k² + t of every channel c: together, all K rows.
        let dweight_t = unsafe { assume_init(dweight_t) };
        (dweight_t, bias_gradient(dy, s, 1))
    };
    let (dx, dweight_t, dbias) = backward_by_groups(weight, dy, s, 1, need_dx, image);
    (dx, transpose_rows(&dweight_t, k, s.c_out), dbias)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::conv2d::{ConvGeometry, Identity};

    fn shape(n: usize, c_in: usize, hw: usize, c_out: usize, k: usize, pad: usize) -> Shape {
        let geometry = ConvGeometry {
            stride: 1,
            padding: pad,
        };
        Shape::of(&[n, c_in, hw, hw], &[c_out, c_in, k, k], geometry)
    }

    #[test]
    fn the_grid_runs_densenets_first_block_and_not_narrow_or_thin_maps() {
        // DenseNet's first block: 24×24, 64 to 192 channels; its dx: 32 channels.
        let grid = plan(shape(64, 64, 24, 32, 3, 1)).expect("24×24 runs on a grid");
        // 26×26 values and the last tap's 2 more, to a cache line.
        assert_eq!(
            grid,
            Grid {
                width: 26,
                plane: 688
            }
        );
        assert!(plan(shape(64, 32, 24, 192, 3, 1)).is_some());
        // 12×12 maps waste 2 columns of 14; LeNet's first layer has one input channel;
        // without padding the size is not kept; 1×1 windows need no grid.
        assert!(plan(shape(64, 96, 12, 32, 3, 1)).is_none());
        assert!(plan(shape(64, 1, 28, 6, 5, 2)).is_none());
        assert!(plan(shape(64, 64, 24, 32, 3, 0)).is_none());
        assert!(plan(shape(64, 64, 24, 32, 1, 0)).is_none());
    }

    /// The grid holds the image in its middle, zeros around and after it, and each tap's run
    /// reads, at output `(y, x)`, the input at `(y + ky - p, x + kx - p)` or a zero.
    #[test]
    fn each_taps_run_reads_the_shifted_input() {
        let s = shape(1, 16, 16, 1, 3, 1);
        let grid = plan(s).unwrap();
        let x: Vec<f32> = (0..s.image_len()).map(|v| v as f32 + 1.0).collect();
        let filled = grid.fill(&x, s, &Identity);
        for (ky, kx) in taps(s) {
            let run = grid.tap_input(&filled, s, ky, kx);
            for c in [0, 15] {
                for (y, xx) in [(0, 0), (0, 15), (7, 3), (15, 0), (15, 15)] {
                    let got = run.ptr[c * run.row_stride + y * grid.width + xx];
                    let (iy, ix) = ((y + ky).wrapping_sub(1), (xx + kx).wrapping_sub(1));
                    let want = match iy < 16 && ix < 16 {
                        true => x[(c * 16 + iy) * 16 + ix],
                        false => 0.0,
                    };
                    assert_eq!(
                        got, want,
                        "channel {c}, tap ({ky}, {kx}), output ({y}, {xx})"
                    );
                }
            }
        }
        // The top row, the bottom row and the plane's tail are zeros.
        let zeros = |r: std::ops::Range<usize>| filled[r].iter().all(|&v| v == 0.0);
        assert!(zeros(0..19) && zeros(17 * 18..grid.plane));
    }
}
