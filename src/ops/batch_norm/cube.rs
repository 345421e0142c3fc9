//! `--norm fused` on Burn's CubeCL backend (wgpu, CUDA): training-mode batch norm as two CubeCL
//! kernels, one forward and one backward, with the same hand-derived backward as the Flex op
//! ([`super`]).
//!
//! The composed layer launches about a dozen kernels forward and as many backward, each a pass
//! over memory, and autodiff keeps their intermediates. Here one workgroup ("cube") takes one
//! channel: forward it reduces the shifted sum, then the centred sum of squares, then writes
//! the output; backward it reduces `Σ dy` and `Σ dy·x̂`, then writes `dx`. Only the input and
//! four numbers per channel are kept for the backward.
//!
//! Float32 only (WGSL has no float64). To survive a large mean in float32, sums are taken of
//! `x - pivot`, the pivot being the channel's first value, and `x̂` is computed as
//! `((x - pivot) - shift) / σ`: `x - pivot` is exact for values near the mean, where
//! `x - (pivot + shift)` would round the mean to the input's own precision.
//!
//! The activation and pooling that follow BN (an [`Epilogue`]) are
//! not part of these kernels: the caller composes them from Burn ops.

use burn::backend::ops::FloatTensorOps;
use burn::backend::tensor::FloatTensor;
use burn::backend::Cube;
use burn::tensor::{DType, Shape};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;

use super::{plain_fused_batch_norm, FusedBatchNormBackend, FusedKernels};
use crate::norm::epilogue::Epilogue;

/// Units per cube: each reduces a strided share of its channel, then a tree in shared memory
/// combines the partial sums.
const UNITS: u32 = 256;

/// Halves `partial` until `partial[0]` holds the sum of its entries, one per unit (a power of
/// two of them).
#[cube]
fn tree_sum(partial: &mut Shared<[f32]>, unit: usize) {
    let mut stride = CUBE_DIM_X as usize / 2;
    while stride > 0 {
        if unit < stride {
            let sum = partial[unit] + partial[unit + stride];
            partial[unit] = sum;
        }
        sync_cube();
        stride /= 2;
    }
}

/// Where the `i`-th of channel `c`'s `N·S` values sits in a contiguous `(N, C, S)` tensor.
#[cube]
fn channel_index(i: usize, c: usize, channels: usize, plane: usize) -> usize {
    (i / plane * channels + c) * plane + i % plane
}

/// Forward for channel `CUBE_POS_X` of a contiguous `(N, C, S)` input: `y`, and per channel the
/// pivot, the shifted mean, the biased variance and `1/σ`.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn forward_kernel(
    x: &Tensor<f32>,
    gamma: &Tensor<f32>,
    beta: &Tensor<f32>,
    y: &mut Tensor<f32>,
    pivot_out: &mut Tensor<f32>,
    shift_out: &mut Tensor<f32>,
    var_out: &mut Tensor<f32>,
    inv_std_out: &mut Tensor<f32>,
    channels: u32,
    plane: u32,
    count: u32,
    eps: f32,
    #[comptime] units: usize,
) {
    let c = CUBE_POS_X as usize;
    let unit = UNIT_POS_X as usize;
    let step = CUBE_DIM_X as usize;
    let channels_n = channels as usize;
    let plane_n = plane as usize;
    let total = f32::cast_from(count);
    let count_n = count as usize;
    let mut partial = Shared::new_slice(units);

    let pivot = x[c * plane_n];
    let mut sum = 0.0f32;
    let mut i = unit;
    while i < count_n {
        sum += x[channel_index(i, c, channels_n, plane_n)] - pivot;
        i += step;
    }
    partial[unit] = sum;
    sync_cube();
    tree_sum(&mut partial, unit);
    let shift = partial[0] / total;
    sync_cube();

    let mut squares = 0.0f32;
    let mut i = unit;
    while i < count_n {
        let d = (x[channel_index(i, c, channels_n, plane_n)] - pivot) - shift;
        squares += d * d;
        i += step;
    }
    partial[unit] = squares;
    sync_cube();
    tree_sum(&mut partial, unit);
    let var = partial[0] / total;
    let inv_std = f32::inverse_sqrt(var + eps);

    let scale = gamma[c] * inv_std;
    let offset = beta[c];
    let mut i = unit;
    while i < count_n {
        let at = channel_index(i, c, channels_n, plane_n);
        y[at] = ((x[at] - pivot) - shift) * scale + offset;
        i += step;
    }
    if unit == 0 {
        pivot_out[c] = pivot;
        shift_out[c] = shift;
        var_out[c] = var;
        inv_std_out[c] = inv_std;
    }
}

/// Backward for channel `CUBE_POS_X`: `dβ = Σ dy`, `dγ = Σ dy·x̂`, then
/// `dx = γ/σ · (dy - dβ/M - x̂ · dγ/M)`.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn backward_kernel(
    x: &Tensor<f32>,
    dy: &Tensor<f32>,
    gamma: &Tensor<f32>,
    pivot: &Tensor<f32>,
    shift: &Tensor<f32>,
    inv_std: &Tensor<f32>,
    dx: &mut Tensor<f32>,
    dgamma: &mut Tensor<f32>,
    dbeta: &mut Tensor<f32>,
    channels: u32,
    plane: u32,
    count: u32,
    #[comptime] units: usize,
) {
    let c = CUBE_POS_X as usize;
    let unit = UNIT_POS_X as usize;
    let step = CUBE_DIM_X as usize;
    let channels_n = channels as usize;
    let plane_n = plane as usize;
    let per = 1.0f32 / f32::cast_from(count);
    let count_n = count as usize;
    let mut sum_dy = Shared::new_slice(units);
    let mut sum_dy_xhat = Shared::new_slice(units);

    let p = pivot[c];
    let m = shift[c];
    let s = inv_std[c];
    let mut acc_dy = 0.0f32;
    let mut acc_dy_xhat = 0.0f32;
    let mut i = unit;
    while i < count_n {
        let at = channel_index(i, c, channels_n, plane_n);
        let g = dy[at];
        acc_dy += g;
        acc_dy_xhat += g * (((x[at] - p) - m) * s);
        i += step;
    }
    sum_dy[unit] = acc_dy;
    sum_dy_xhat[unit] = acc_dy_xhat;
    sync_cube();
    tree_sum(&mut sum_dy, unit);
    tree_sum(&mut sum_dy_xhat, unit);
    let db = sum_dy[0];
    let dg = sum_dy_xhat[0];

    let scale = gamma[c] * s;
    let mut i = unit;
    while i < count_n {
        let at = channel_index(i, c, channels_n, plane_n);
        let xhat = ((x[at] - p) - m) * s;
        dx[at] = scale * (dy[at] - db * per - xhat * dg * per);
        i += step;
    }
    if unit == 0 {
        dgamma[c] = dg;
        dbeta[c] = db;
    }
}

/// `(N, C, S)` of an input of shape `(N, C, ...)`.
fn layout(shape: &Shape) -> (usize, usize, usize) {
    let dims: &[usize] = shape;
    let plane = dims[2..].iter().product::<usize>();
    (dims[0], dims[1], plane)
}

fn empty_like(reference: &CubeTensor, shape: Shape) -> CubeTensor {
    empty_device_contiguous_dtype(
        reference.client.clone(),
        reference.device.clone(),
        shape,
        DType::F32,
    )
}

/// What the backward needs: the input, gamma, and per channel the pivot, shifted mean and `1/σ`.
#[derive(Debug, Clone)]
pub struct Saved {
    x: CubeTensor,
    gamma: CubeTensor,
    pivot: CubeTensor,
    shift: CubeTensor,
    inv_std: CubeTensor,
}

/// Forward on plain cube tensors: `(y, mean, var, saved)`.
fn forward(
    x: CubeTensor,
    gamma: CubeTensor,
    beta: CubeTensor,
    eps: f64,
) -> (CubeTensor, CubeTensor, CubeTensor, Saved) {
    let x = into_contiguous(x);
    let gamma = into_contiguous(gamma);
    let beta = into_contiguous(beta);
    let shape = x.meta.shape().clone();
    let (n, channels, plane) = layout(&shape);
    let per_channel = || empty_like(&x, Shape::new([channels]));
    let y = empty_like(&x, shape);
    let (pivot, shift, var, inv_std) = (per_channel(), per_channel(), per_channel(), per_channel());
    forward_kernel::launch(
        &x.client,
        CubeCount::Static(channels as u32, 1, 1),
        CubeDim::new_1d(UNITS),
        x.clone().into_tensor_arg(),
        gamma.clone().into_tensor_arg(),
        beta.into_tensor_arg(),
        y.clone().into_tensor_arg(),
        pivot.clone().into_tensor_arg(),
        shift.clone().into_tensor_arg(),
        var.clone().into_tensor_arg(),
        inv_std.clone().into_tensor_arg(),
        channels as u32,
        plane as u32,
        (n * plane) as u32,
        eps as f32,
        UNITS as usize,
    );
    // The mean handed back (for the running statistics) is pivot + shift, rounded once.
    let mean = <Cube as FloatTensorOps<Cube>>::float_add(pivot.clone(), shift.clone());
    let saved = Saved {
        x,
        gamma,
        pivot,
        shift,
        inv_std,
    };
    (y, mean, var, saved)
}

/// Backward on plain cube tensors: `(dx, dgamma, dbeta)`.
fn backward(saved: &Saved, dy: CubeTensor) -> (CubeTensor, CubeTensor, CubeTensor) {
    let dy = into_contiguous(dy);
    let shape = saved.x.meta.shape().clone();
    let (n, channels, plane) = layout(&shape);
    let dx = empty_like(&saved.x, shape);
    let dgamma = empty_like(&saved.x, Shape::new([channels]));
    let dbeta = empty_like(&saved.x, Shape::new([channels]));
    backward_kernel::launch(
        &saved.x.client,
        CubeCount::Static(channels as u32, 1, 1),
        CubeDim::new_1d(UNITS),
        saved.x.clone().into_tensor_arg(),
        dy.into_tensor_arg(),
        saved.gamma.clone().into_tensor_arg(),
        saved.pivot.clone().into_tensor_arg(),
        saved.shift.clone().into_tensor_arg(),
        saved.inv_std.clone().into_tensor_arg(),
        dx.clone().into_tensor_arg(),
        dgamma.clone().into_tensor_arg(),
        dbeta.clone().into_tensor_arg(),
        channels as u32,
        plane as u32,
        (n * plane) as u32,
        UNITS as usize,
    );
    (dx, dgamma, dbeta)
}

impl FusedKernels for Cube {
    type Saved = Saved;

    fn forward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        eps: f64,
        epilogue: Epilogue,
    ) -> (CubeTensor, CubeTensor, CubeTensor, Saved) {
        debug_assert_eq!(epilogue, Epilogue::NONE, "the caller composes the epilogue");
        forward(x, gamma, beta, eps)
    }

    fn backward(
        saved: &Saved,
        dy: CubeTensor,
        _need_dx: bool,
    ) -> (Option<CubeTensor>, CubeTensor, CubeTensor) {
        // dx comes with the sums' second pass; a GPU gains little from skipping it.
        let (dx, dgamma, dbeta) = backward(saved, dy);
        (Some(dx), dgamma, dbeta)
    }
}

plain_fused_batch_norm!(Cube);
