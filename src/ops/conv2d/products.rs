//! The matrix products of the convolutions: strided views of slices, and `gemm`'s product
//! into them, with the count of their operations that `bnlab bench` reports.

use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::ops::cpu::{assume_init, uninit};
use crate::ops::flex::Element;

/// A matrix in a slice: element `(i, j)` at `i·row_stride + j·col_stride`.
#[derive(Clone, Copy)]
pub(super) struct Mat<P> {
    pub(super) ptr: P,
    pub(super) rows: usize,
    pub(super) cols: usize,
    pub(super) row_stride: usize,
    pub(super) col_stride: usize,
}

impl<P> Mat<P> {
    /// The largest offset, for the bounds checks that keep [`matmul`] sound.
    fn last(&self) -> usize {
        (self.rows.max(1) - 1) * self.row_stride + (self.cols.max(1) - 1) * self.col_stride
    }
}

pub(super) fn row_major<E>(data: &[E], rows: usize, cols: usize) -> Mat<&[E]> {
    Mat {
        ptr: data,
        rows,
        cols,
        row_stride: cols,
        col_stride: 1,
    }
}

pub(super) fn transposed<E>(m: Mat<&[E]>) -> Mat<&[E]> {
    Mat {
        rows: m.cols,
        cols: m.rows,
        row_stride: m.col_stride,
        col_stride: m.row_stride,
        ..m
    }
}

/// Floating-point operations of the matrix products run so far (see [`product_flops`]).
static PRODUCT_FLOPS: AtomicU64 = AtomicU64::new(0);

/// The floating-point operations (`2·m·n·k` per product) of every matrix product the
/// convolutions of this module have run in this process, forward and backward (and so those
/// of `ops::bn_relu_conv2d`): what `bnlab bench` divides by the time for the convolutions'
/// GFLOP/s.
pub fn product_flops() -> u64 {
    PRODUCT_FLOPS.load(Ordering::Relaxed)
}

/// `dst = a · b`, or `dst += a · b` with `accumulate`; `dst` is row-major `a.rows × b.cols`.
/// `parallel` lets gemm split the product over rayon's threads.
pub(super) fn matmul<E: Element>(
    dst: &mut [E],
    a: Mat<&[E]>,
    b: Mat<&[E]>,
    accumulate: bool,
    parallel: bool,
) {
    assert_eq!(dst.len(), a.rows * b.cols, "matmul: output size");
    let strides = (b.cols, 1);
    matmul_strided(dst, strides, a, b, accumulate, parallel);
}

/// [`matmul`] into the `a.rows × b.cols` matrix of `dst` whose element `(i, j)` is
/// `dst[i·strides.0 + j·strides.1]`.
pub(super) fn matmul_strided<E: Element>(
    dst: &mut [E],
    strides: (usize, usize),
    a: Mat<&[E]>,
    b: Mat<&[E]>,
    accumulate: bool,
    parallel: bool,
) {
    // SAFETY: `dst` is initialised, and gemm_into checks its bounds.
    unsafe {
        gemm_into(
            dst.as_mut_ptr(),
            dst.len(),
            strides,
            a,
            b,
            accumulate,
            parallel,
        )
    }
}

/// `a · b` in a new row-major buffer, which is not zeroed first: without accumulating, gemm
/// writes every element of its output and reads none.
pub(super) fn product<E: Element>(a: Mat<&[E]>, b: Mat<&[E]>, parallel: bool) -> Vec<E> {
    let mut dst = uninit::<E>(a.rows * b.cols);
    product_into(&mut dst, a, b, parallel);
    // SAFETY: product_into wrote every element.
    unsafe { assume_init(dst) }
}

/// `dst = a · b`, row-major `a.rows × b.cols`, every element written.
pub(super) fn product_into<E: Element>(
    dst: &mut [MaybeUninit<E>],
    a: Mat<&[E]>,
    b: Mat<&[E]>,
    parallel: bool,
) {
    assert_eq!(dst.len(), a.rows * b.cols, "product_into: output size");
    product_into_strided(dst, (b.cols, 1), a, b, parallel);
}

/// `a · b` written into the `a.rows × b.cols` matrix of `dst` whose element `(i, j)` is
/// `dst[i·strides.0 + j·strides.1]`: each of those elements is written, and no other.
pub(super) fn product_into_strided<E: Element>(
    dst: &mut [MaybeUninit<E>],
    strides: (usize, usize),
    a: Mat<&[E]>,
    b: Mat<&[E]>,
    parallel: bool,
) {
    // SAFETY: gemm_into checks the matrix's bounds against `len`; without `accumulate` it
    // writes each of its elements (gemm-common sets alpha to zero when it is not to read dst,
    // and its kernels then store without loading; k = 0 is filled there) and reads none.
    unsafe {
        gemm_into(
            dst.as_mut_ptr().cast::<E>(),
            dst.len(),
            strides,
            a,
            b,
            false,
            parallel,
        )
    }
}

/// Takes back operations counted by the products that went to columns thrown away (the
/// padded grid's, `conv2d::grid`): [`product_flops`] counts the convolutions' own.
pub(super) fn uncount(flops: u64) {
    PRODUCT_FLOPS.fetch_sub(flops, Ordering::Relaxed);
}

/// The product into the matrix at `dst` with the given (row, column) strides, within `len`
/// values.
///
/// # Safety
/// `dst` is valid for `len` writes, and for reads too (initialised) when `accumulate`.
unsafe fn gemm_into<E: Element>(
    dst: *mut E,
    len: usize,
    (row_stride, col_stride): (usize, usize),
    a: Mat<&[E]>,
    b: Mat<&[E]>,
    accumulate: bool,
    parallel: bool,
) {
    let (m, n, k) = (a.rows, b.cols, a.cols);
    PRODUCT_FLOPS.fetch_add(2 * (m * n * k) as u64, Ordering::Relaxed);
    assert_eq!(b.rows, k, "matmul: inner dimensions");
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        (m - 1) * row_stride + (n - 1) * col_stride < len,
        "matmul: output bounds"
    );
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                for j in 0..n {
                    dst.add(i * row_stride + j * col_stride).write(E::ZERO);
                }
            }
        }
        return;
    }
    assert!(
        a.last() < a.ptr.len() && b.last() < b.ptr.len(),
        "matmul: operand bounds"
    );
    let parallelism = match parallel {
        true => gemm::Parallelism::Rayon(rayon::current_num_threads()),
        false => gemm::Parallelism::None,
    };
    // SAFETY: the shapes and strides were checked against the slices above; gemm supports
    // f32 and f64, the only element types here.
    gemm::gemm(
        m,
        n,
        k,
        dst,
        col_stride as isize,
        row_stride as isize,
        accumulate,
        a.ptr.as_ptr(),
        a.col_stride as isize,
        a.row_stride as isize,
        b.ptr.as_ptr(),
        b.col_stride as isize,
        b.row_stride as isize,
        E::ONE,
        E::ONE,
        false,
        false,
        false,
        parallelism,
    )
}

/// The `(cols, rows)` transpose of the row-major `rows × cols` matrix `m`.
pub(super) fn transpose_rows<E: Element>(m: &[E], rows: usize, cols: usize) -> Vec<E> {
    assert_eq!(m.len(), rows * cols, "transpose_rows: size");
    let mut t = uninit::<E>(m.len());
    for (j, out) in t.chunks_mut(rows.max(1)).enumerate().take(cols) {
        for (i, o) in out.iter_mut().enumerate() {
            o.write(m[i * cols + j]);
        }
    }
    // SAFETY: each of the `cols` rows of `rows` values was written above.
    unsafe { assume_init(t) }
}
