//! The models' 2-d convolution on Flex: im2col and matrix products per group of images, forward
//! and backward, as a backend-extension op with a hand-written backward.
//!
//! Burn's Flex convolution converts to channels-last and back around each call, and computes the
//! weight gradient as a convolution with the batch as channels and the output as the kernel.
//! Profiling LeNet-BN put a large share of the training step there (docs/performance.md). Here:
//!
//! - forward: `cols = im2col(x)` (`K = C_in·k_h·k_w` rows, one column per output position), then
//!   `y = W · cols + b`, written straight into NCHW; `cols` is formed and multiplied in chunks
//!   of whole input channels that the core's cache holds;
//! - backward: `dW = Σ dy · colsᵀ` (computed as its transpose, `cols · dyᵀ`, chunk by chunk),
//!   `db = Σ dy`; `dx` (only when `x` needs a gradient: never
//!   for the input images) is, for stride 1, the convolution of `dy` with the flipped,
//!   transposed weight, and otherwise `col2im(Wᵀ · dy)`;
//! - one image under a 1×1 kernel of stride 1 is its own `cols`: no im2col;
//! - a size-keeping window of stride 1 on wide maps (DenseNet's first block) runs without
//!   im2col, by taps over a zero-padded copy of each image (`grid.rs`); small maps, where most
//!   windows hang over the edge, by regions of taps (`regions.rs`).
//!
//! Images are taken in groups with at least [`MIN_COLUMNS`] output positions between them, so
//! that the products stay wide when the feature maps are small (ResNet-18 ends at 1×1). Groups
//! run in parallel; per-group weight gradients are summed in group order, so the result does not
//! depend on the number of threads. The matrix products are the `gemm` crate's.
//!
//! Other backends, dilation, groups and asymmetric padding use Burn's `Conv2d::forward`.

use std::mem::MaybeUninit;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::{Flex, FlexTensor};
use burn::backend::tensor::FloatTensor;
use burn::backend::{backend_extension, Autodiff, Backend, Dispatch};
use burn::nn::conv::Conv2d;
use burn::nn::PaddingConfig2d;
use burn::tensor::{DType, Tensor};
use rayon::prelude::*;

use super::cpu::{assume_init, sum, uninit};
use super::flex::{contiguous, slice, tensor, Element};
use super::{family, Family};

mod grid;
mod im2col;
mod products;
mod regions;

use im2col::{col2im, for_each_chunk};
pub(crate) use im2col::{Identity, Prologue};
pub use products::product_flops;
use products::{
    matmul, matmul_strided, product, product_into, row_major, transpose_rows, transposed, Mat,
};

/// Output positions per matrix product, at least (fewer only when the batch runs out).
pub const MIN_COLUMNS: usize = 256;

/// Stride and zero padding, the same along both axes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvGeometry {
    /// The step between windows, along each axis.
    pub stride: usize,
    /// Zeros added on every side.
    pub padding: usize,
}

/// The im2col convolution as a backend op: Flex, and autodiff over Flex with its own backward.
/// Reached through [`conv2d`].
#[backend_extension(Flex, Autodiff)]
pub trait Conv2dBackend: Backend {
    /// `y = conv2d(x, weight) + bias` for `x` `(N, C_in, H, W)` and `weight`
    /// `(C_out, C_in, k_h, k_w)`.
    fn im2col_conv2d(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        geometry: ConvGeometry,
    ) -> FloatTensor<Self>;
}

/// `conv.forward(x)`, by the kernel of this module where it applies.
pub fn conv2d(conv: &Conv2d, x: Tensor<4>) -> Tensor<4> {
    match geometry_of(conv, &x) {
        Some(geometry) => {
            let weight = conv.weight.val();
            let bias = match &conv.bias {
                Some(b) => b.val(),
                None => Tensor::zeros([weight.dims()[0]], (&x.device(), x.dtype())),
            };
            Tensor::from_dispatch(<Dispatch as Conv2dBackend>::im2col_conv2d(
                x.into_dispatch(),
                weight.into_dispatch(),
                bias.into_dispatch(),
                geometry,
            ))
        }
        None => conv.forward(x),
    }
}

/// Whether [`conv2d`] runs this module's kernel (not Burn's) for `conv` on `x`.
pub fn applies(conv: &Conv2d, x: &Tensor<4>) -> bool {
    geometry_of(conv, x).is_some()
}

/// The geometry when this module's kernel can run `conv` on `x`.
pub(crate) fn geometry_of(conv: &Conv2d, x: &Tensor<4>) -> Option<ConvGeometry> {
    let [s_h, s_w] = conv.stride;
    let padding = match conv.padding {
        PaddingConfig2d::Valid => 0,
        PaddingConfig2d::Explicit(a, b, c, d) if a == b && b == c && c == d => a,
        _ => return None,
    };
    let [_, _, h, w] = x.dims();
    let [k_h, k_w] = conv.kernel_size;
    let fits = h + 2 * padding >= k_h && w + 2 * padding >= k_w;
    let plain = conv.groups == 1 && conv.dilation == [1, 1] && s_h == s_w && s_h > 0;
    (plain
        && fits
        && family(&x.device()) == Some(Family::Flex)
        && matches!(x.dtype(), DType::F32 | DType::F64))
    .then_some(ConvGeometry {
        stride: s_h,
        padding,
    })
}

/// Sizes of one convolution.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Shape {
    n: usize,
    c_in: usize,
    h: usize,
    w: usize,
    c_out: usize,
    k_h: usize,
    k_w: usize,
    h_out: usize,
    w_out: usize,
    stride: usize,
    padding: usize,
    /// How far apart the images of `x` lie: `C_in·H·W` when `x` is its own tensor, more when
    /// it is the first `C_in` channels of a wider one (a dense block's buffer).
    x_image: usize,
}

impl Shape {
    pub(crate) fn of(x: &[usize], weight: &[usize], g: ConvGeometry) -> Self {
        let (h, w, k_h, k_w) = (x[2], x[3], weight[2], weight[3]);
        Self {
            n: x[0],
            c_in: x[1],
            h,
            w,
            c_out: weight[0],
            k_h,
            k_w,
            h_out: (h + 2 * g.padding - k_h) / g.stride + 1,
            w_out: (w + 2 * g.padding - k_w) / g.stride + 1,
            stride: g.stride,
            padding: g.padding,
            x_image: x[1] * h * w,
        }
    }

    /// The same convolution reading `x` as the first `C_in` channels of images `x_image`
    /// values apart (at least `C_in·H·W`).
    pub(crate) fn with_x_image(self, x_image: usize) -> Self {
        assert!(x_image >= self.image_len());
        Self { x_image, ..self }
    }

    /// Group `gi`'s `imgs` images of `x`: from its first value to the last of its last image.
    fn x_group<'a, E>(&self, x: &'a [E], gi: usize, imgs: usize) -> &'a [E] {
        self.x_images(x, gi * self.group(), imgs)
    }

    /// Images `first..first + imgs` of `x`: from the first one's first value to the last one's
    /// last.
    fn x_images<'a, E>(&self, x: &'a [E], first: usize, imgs: usize) -> &'a [E] {
        &x[first * self.x_image..][..(imgs - 1) * self.x_image + self.image_len()]
    }

    /// `(N, C_out, H_out, W_out)`.
    pub(crate) fn output_shape(&self) -> Vec<usize> {
        vec![self.n, self.c_out, self.h_out, self.w_out]
    }

    /// Output channels.
    pub(crate) fn c_out(&self) -> usize {
        self.c_out
    }

    /// Rows of `cols`: one per input channel and kernel position.
    fn k(&self) -> usize {
        self.c_in * self.k_h * self.k_w
    }

    /// Output positions per image.
    fn p(&self) -> usize {
        self.h_out * self.w_out
    }

    /// Images per group.
    fn group(&self) -> usize {
        MIN_COLUMNS.div_ceil(self.p()).clamp(1, self.n.max(1))
    }

    fn image_len(&self) -> usize {
        self.c_in * self.h * self.w
    }

    /// The valid output columns `[lo, hi)` for kernel column `kx`, and the first input column.
    fn columns(&self, kx: usize) -> (usize, usize) {
        // ix = ox·s - p + kx must lie within [0, w).
        let lo = (self.padding.saturating_sub(kx).div_ceil(self.stride)).min(self.w_out);
        let hi = (self.w + self.padding)
            .checked_sub(kx)
            .map_or(0, |end| end.div_ceil(self.stride))
            .min(self.w_out);
        (lo, hi.max(lo))
    }
}

/// The weight's columns `rows` (those of the input channels a chunk of [`for_each_chunk`]
/// holds), as a `C_out × rows.len()` matrix read in place.
fn weight_columns<E>(weight: &[E], s: Shape, rows: std::ops::Range<usize>) -> Mat<&[E]> {
    Mat {
        ptr: &weight[rows.start..],
        rows: s.c_out,
        cols: rows.len(),
        row_stride: s.k(),
        col_stride: 1,
    }
}

/// Whether gemm itself should use the threads: when there are too few groups to share out.
fn few_groups(groups: usize) -> bool {
    groups < 2 * rayon::current_num_threads()
}

/// Writes `values[r]` to every element of row `r` (rows of `len`) and returns `out` as
/// initialised.
fn fill_rows<'a, E: Element>(
    out: &'a mut [MaybeUninit<E>],
    values: &[E],
    len: usize,
) -> &'a mut [E] {
    assert_eq!(
        out.len(),
        values.len() * len,
        "fill_rows: one value per row"
    );
    for (row, &v) in out.chunks_mut(len).zip(values) {
        row.iter_mut().for_each(|o| {
            o.write(v);
        });
    }
    // SAFETY: every element was just written.
    unsafe { &mut *(out as *mut [MaybeUninit<E>] as *mut [E]) }
}

/// `y = conv(prologue(x)) + bias`, `(N, C_out, H_out, W_out)`.
pub(crate) fn forward_typed<E: Element, P: Prologue<E>>(
    x: &[E],
    weight: &[E],
    bias: &[E],
    s: Shape,
    prologue: &P,
) -> Vec<E> {
    if let Some(regions) = regions::plan(s) {
        let kernel = regions::Kernel::Plain(weight);
        return regions::forward(x, kernel, bias, s, prologue, &regions);
    }
    if let Some(grid) = grid::plan(s) {
        return grid::forward(x, weight, bias, s, prologue, grid);
    }
    let (p, g) = (s.p(), s.group());
    let mut y = uninit::<E>(s.n * s.c_out * p);
    let groups = s.n.div_ceil(g);
    let parallel = few_groups(groups);
    y.par_chunks_mut(g * s.c_out * p)
        .enumerate()
        .for_each(|(gi, out)| {
            let imgs = out.len() / (s.c_out * p);
            let x = s.x_group(x, gi, imgs);
            // Bias first, then each chunk of the columns' product added onto it.
            let add_products = |product: &mut [E]| {
                for_each_chunk(x, s, imgs, prologue, |rows, cols| {
                    let w = weight_columns(weight, s, rows.clone());
                    let cols = row_major(cols, rows.len(), imgs * p);
                    matmul(product, w, cols, true, parallel);
                });
            };
            if imgs == 1 {
                // (C_out, P) is already the image's layout.
                add_products(fill_rows(out, bias, p));
                return;
            }
            let mut buffer = uninit::<E>(s.c_out * imgs * p);
            let product = fill_rows(&mut buffer, bias, imgs * p);
            add_products(product);
            // (C_out, imgs·P) to (imgs, C_out, P).
            for (i, image) in out.chunks_mut(s.c_out * p).enumerate() {
                for (co, o) in image.chunks_mut(p).enumerate() {
                    let src = &product[co * imgs * p + i * p..][..p];
                    for (o, &v) in o.iter_mut().zip(src) {
                        o.write(v);
                    }
                }
            }
        });
    // SAFETY: every group of y was written above.
    unsafe { assume_init(y) }
}

/// `(dx, dweight, dbias)`, `dx` only if `need_dx`, of the convolution whose input is
/// `prologue` applied to `x` (as [`forward_typed`] took it): the weight gradient's columns
/// are formed through the prologue, so its output need not be kept or recomputed whole; `dx`
/// is the gradient at the prologue's output.
pub(crate) fn backward_typed<E: Element, P: Prologue<E>>(
    x: &[E],
    weight: &[E],
    dy: &[E],
    s: Shape,
    need_dx: bool,
    prologue: &P,
) -> (Option<Vec<E>>, Vec<E>, Vec<E>) {
    if let Some(regions) = regions::plan(s) {
        return regions::backward(x, weight, dy, s, need_dx, prologue, &regions);
    }
    if let Some(grid) = grid::plan(s) {
        return grid::backward(x, weight, dy, s, need_dx, prologue, grid);
    }
    let (p, g, k) = (s.p(), s.group(), s.k());
    let groups = s.n.div_ceil(g);
    let parallel = few_groups(groups);
    let w = row_major(weight, s.c_out, k);
    let group = |gi: usize, dx: Option<&mut [E]>| {
        let imgs = (s.n - gi * g).min(g);
        let x = s.x_group(x, gi, imgs);
        // dy of the group as (C_out, imgs·P): one image's dy already is.
        let dy = &dy[gi * g * s.c_out * p..][..imgs * s.c_out * p];
        let gathered: Vec<E>;
        let grads = match imgs {
            1 => dy,
            _ => {
                let mut rows = Vec::with_capacity(s.c_out * imgs * p);
                for co in 0..s.c_out {
                    for i in 0..imgs {
                        rows.extend_from_slice(&dy[(i * s.c_out + co) * p..][..p]);
                    }
                }
                gathered = rows;
                &gathered
            }
        };
        let grads_mat = row_major(grads, s.c_out, imgs * p);
        // dWᵀ = cols · dyᵀ, `(K, C_out)`: with the output channels contiguous, gemm makes them
        // its microkernel's rows and reads `cols` in place, where for `dy · colsᵀ` into
        // `(C_out, K)` it packs the whole of `cols` first. The groups' dWᵀ are summed as they
        // are and transposed once, below.
        let mut dweight_t = uninit::<E>(k * s.c_out);
        for_each_chunk(x, s, imgs, prologue, |rows, cols| {
            let cols = row_major(cols, rows.len(), imgs * p);
            let to = &mut dweight_t[rows.start * s.c_out..rows.end * s.c_out];
            product_into(to, cols, transposed(grads_mat), parallel);
        });
        // SAFETY: the chunks' rows cover all K rows.
        let dweight_t = unsafe { assume_init(dweight_t) };
        let dbias = bias_gradient(dy, s, imgs);
        if let Some(dx) = dx {
            let dcols = product(transposed(w), grads_mat, parallel);
            col2im(&dcols, s, imgs, dx);
        }
        (dweight_t, dbias)
    };
    let (dx, dweight_t, dbias) = backward_by_groups(weight, dy, s, g, need_dx, group);
    (dx, transpose_rows(&dweight_t, k, s.c_out), dbias)
}

/// The backward's driver: `group(gi, dx)` for each group of `g` images in parallel, their
/// `(dweight, dbias)` summed in group order (element by element, in whatever layout `group`
/// gives them); `dx` by [`dx_by_convolution`] where it applies,
/// otherwise each group adds into its slice of a zeroed `dx`, passed to it.
fn backward_by_groups<E: Element>(
    weight: &[E],
    dy: &[E],
    s: Shape,
    g: usize,
    need_dx: bool,
    group: impl Fn(usize, Option<&mut [E]>) -> (Vec<E>, Vec<E>) + Sync,
) -> (Option<Vec<E>>, Vec<E>, Vec<E>) {
    let by_convolution = match need_dx {
        true => dx_by_convolution(weight, dy, s),
        false => None,
    };
    if need_dx && by_convolution.is_none() {
        let mut dx = vec![E::ZERO; s.n * s.image_len()];
        let partials = dx
            .par_chunks_mut(g * s.image_len())
            .enumerate()
            .map(|(gi, dx)| group(gi, Some(dx)))
            .collect();
        let (dweight, dbias) = sum_partials(partials, s);
        return (Some(dx), dweight, dbias);
    }
    let partials = (0..s.n.div_ceil(g))
        .into_par_iter()
        .map(|gi| group(gi, None))
        .collect();
    let (dweight, dbias) = sum_partials(partials, s);
    (by_convolution, dweight, dbias)
}

/// `db` of one group's `imgs` images of `dy`: each channel summed image by image, position by
/// position.
fn bias_gradient<E: Element>(dy: &[E], s: Shape, imgs: usize) -> Vec<E> {
    let p = s.p();
    (0..s.c_out)
        .map(|co| {
            let images = (0..imgs).map(|i| sum(&dy[(i * s.c_out + co) * p..][..p]));
            E::from_f64(images.sum())
        })
        .collect()
}

/// The groups' `(dweight, dbias)` summed in group order: the same result for any number of
/// threads.
fn sum_partials<E: Element>(partials: Vec<(Vec<E>, Vec<E>)>, s: Shape) -> (Vec<E>, Vec<E>) {
    let mut partials = partials.into_iter();
    // The first group's sums are the start: no zeroed buffer to add them to.
    let (mut dweight, mut dbias) = partials
        .next()
        .unwrap_or_else(|| (vec![E::ZERO; s.c_out * s.k()], vec![E::ZERO; s.c_out]));
    for (dw, db) in partials {
        dweight.iter_mut().zip(dw).for_each(|(a, b)| *a = a.add(b));
        dbias.iter_mut().zip(db).for_each(|(a, b)| *a = a.add(b));
    }
    (dweight, dbias)
}

/// `dx` of a stride-1 convolution, computed as a convolution itself: of `dy`, padded by
/// `k - 1 - padding`, with the weight's two channel axes swapped and its window flipped.
/// Its matrix product has an inner dimension of `C_out·k_h·k_w`, where `Wᵀ · dy` followed by
/// [`col2im`] has only `C_out` and a scatter of `C_in·k_h·k_w` rows per position (DenseNet's
/// layers: 32 output channels, up to 248 input ones). `None` for the other geometries.
fn dx_by_convolution<E: Element>(weight: &[E], dy: &[E], s: Shape) -> Option<Vec<E>> {
    // Only where the input has no more positions than the output (a padding that keeps the
    // size): elsewhere the padded `dy` would cost more products than `Wᵀ · dy` (LeNet's 5×5
    // without padding: 2.25 times as many).
    let keeps_size = s.h * s.w <= s.h_out * s.w_out;
    if s.stride != 1 || s.k_h != s.k_w || s.padding >= s.k_h || !keeps_size {
        return None;
    }
    let geometry = ConvGeometry {
        stride: 1,
        padding: s.k_h - 1 - s.padding,
    };
    let t = Shape::of(
        &[s.n, s.c_out, s.h_out, s.w_out],
        &[s.c_in, s.c_out, s.k_h, s.k_w],
        geometry,
    );
    debug_assert_eq!((t.h_out, t.w_out), (s.h, s.w));
    let zeros = vec![E::ZERO; s.c_in];
    if let Some(regions) = regions::plan(t) {
        let kernel = regions::Kernel::Adjoint(weight);
        return Some(regions::forward(dy, kernel, &zeros, t, &Identity, &regions));
    }
    let window = s.k_h * s.k_w;
    let mut flipped = uninit::<E>(weight.len());
    flipped
        .par_chunks_mut(s.c_out * window)
        .enumerate()
        .for_each(|(ci, to)| {
            for (co, to) in to.chunks_mut(window).enumerate() {
                let from = &weight[(co * s.c_in + ci) * window..][..window];
                for (t, &v) in to.iter_mut().zip(from.iter().rev()) {
                    t.write(v);
                }
            }
        });
    // SAFETY: every (ci, co) window was written above.
    let flipped = unsafe { assume_init(flipped) };
    Some(forward_typed(dy, &flipped, &zeros, t, &Identity))
}

fn forward(x: FlexTensor, weight: FlexTensor, bias: FlexTensor, g: ConvGeometry) -> FlexTensor {
    let (x, weight, bias) = (contiguous(&x), contiguous(&weight), contiguous(&bias));
    let s = Shape::of(x.layout().shape(), weight.layout().shape(), g);
    let out_shape = vec![s.n, s.c_out, s.h_out, s.w_out];
    match x.dtype() {
        DType::F64 => tensor(
            forward_typed::<f64, _>(slice(&x), slice(&weight), slice(&bias), s, &Identity),
            out_shape,
        ),
        _ => tensor(
            forward_typed::<f32, _>(slice(&x), slice(&weight), slice(&bias), s, &Identity),
            out_shape,
        ),
    }
}

impl Conv2dBackend for Flex {
    fn im2col_conv2d(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        geometry: ConvGeometry,
    ) -> FloatTensor<Self> {
        forward(x, weight, bias, geometry)
    }
}

/// [`backward_typed`] on the saved tensors, as Flex tensors.
fn backward_tensors<E: Element>(
    saved: &Saved,
    dy: &FlexTensor,
    s: Shape,
    need_dx: bool,
) -> (Option<FlexTensor>, FlexTensor, FlexTensor) {
    let (dx, dw, db) = backward_typed::<E, _>(
        slice(&saved.x),
        slice(&saved.weight),
        slice(dy),
        s,
        need_dx,
        &Identity,
    );
    (
        dx.map(|v| tensor(v, vec![s.n, s.c_in, s.h, s.w])),
        tensor(dw, vec![s.c_out, s.c_in, s.k_h, s.k_w]),
        tensor(db, vec![s.c_out]),
    )
}

/// What the backward needs: the input, the weight and the geometry.
#[derive(Debug, Clone)]
pub struct Saved {
    x: FlexTensor,
    weight: FlexTensor,
    geometry: ConvGeometry,
}

#[derive(Debug)]
struct Conv2dBackward;

impl Backward<Flex, 3> for Conv2dBackward {
    type State = Saved;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_weight, node_bias] = ops.parents;
        let dy = contiguous(&grads.consume::<Flex>(&ops.node));
        let saved = &ops.state;
        let s = Shape::of(
            saved.x.layout().shape(),
            saved.weight.layout().shape(),
            saved.geometry,
        );
        let need_dx = node_x.is_some();
        let (dx, dweight, dbias) = match saved.x.dtype() {
            DType::F64 => backward_tensors::<f64>(saved, &dy, s, need_dx),
            _ => backward_tensors::<f32>(saved, &dy, s, need_dx),
        };
        if let (Some(node), Some(dx)) = (node_x, dx) {
            grads.register::<Flex>(node.id, dx);
        }
        if let Some(node) = node_weight {
            grads.register::<Flex>(node.id, dweight);
        }
        if let Some(node) = node_bias {
            grads.register::<Flex>(node.id, dbias);
        }
    }
}

impl<C: CheckpointStrategy> Conv2dBackend for Autodiff<Flex, C> {
    fn im2col_conv2d(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        geometry: ConvGeometry,
    ) -> FloatTensor<Self> {
        let prepared = Conv2dBackward
            .prepare::<C>([x.node(), weight.node(), bias.node()])
            .compute_bound()
            .stateful();
        let (x, weight) = (contiguous(x.primitive()), contiguous(weight.primitive()));
        let y = forward(
            x.clone(),
            weight.clone(),
            bias.primitive().clone(),
            geometry,
        );
        match prepared {
            OpsKind::Tracked(prep) => prep.finish(
                Saved {
                    x,
                    weight,
                    geometry,
                },
                y,
            ),
            OpsKind::UnTracked(prep) => prep.finish(y),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bias gradient adds in float64 and rounds once: 2^24 and 200 ones give 2^24 + 200
    /// (exact in float32), where adding in float32 would stop at 2^24 (2^24 + 1 rounds back).
    #[test]
    fn the_bias_gradient_adds_in_float64() {
        let geometry = ConvGeometry {
            stride: 1,
            padding: 0,
        };
        let s = Shape::of(&[3, 1, 67, 1], &[2, 1, 1, 1], geometry);
        let mut dy = vec![1.0f32; 3 * 2 * 67];
        dy[0] = 16_777_216.0;
        let dbias = bias_gradient(&dy, s, 3);
        assert_eq!(dbias, vec![16_777_416.0, 201.0]);
    }

    #[test]
    fn valid_output_columns_respect_padding_and_stride() {
        let s = Shape::of(
            &[1, 1, 7, 7],
            &[1, 1, 3, 3],
            ConvGeometry {
                stride: 2,
                padding: 1,
            },
        );
        assert_eq!((s.h_out, s.w_out), (4, 4));
        // kx = 0 reads ix = 2·ox - 1: ox = 0 falls in the padding.
        assert_eq!(s.columns(0), (1, 4));
        assert_eq!(s.columns(1), (0, 4));
        // kx = 2 reads ix = 2·ox + 1: ox = 3 gives 7, past the edge.
        assert_eq!(s.columns(2), (0, 3));
    }
}
