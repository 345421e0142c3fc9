//! What several test files share: random values, tensors from them, values back.

#![allow(dead_code)] // each test file uses its own part

use burn::tensor::{DType, Device, Tensor, TensorData};
use rand::Rng;

/// `n` values uniform in `offset ± scale`.
pub fn random(n: usize, scale: f64, offset: f64, rng: &mut impl Rng) -> Vec<f64> {
    (0..n)
        .map(|_| offset + scale * rng.random_range(-1.0..1.0))
        .collect()
}

/// `v` as a tensor of `shape` and `dtype` on `device`.
pub fn tensor<const D: usize>(
    v: &[f64],
    shape: [usize; D],
    dtype: DType,
    device: &Device,
) -> Tensor<D> {
    Tensor::from_data(
        TensorData::new(v.to_vec(), shape).convert_dtype(dtype),
        (device, dtype),
    )
}

/// A tensor's values, as float64.
pub fn values<const D: usize>(t: Tensor<D>) -> Vec<f64> {
    t.into_data().convert::<f64>().iter::<f64>().collect()
}
