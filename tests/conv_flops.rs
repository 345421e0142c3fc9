//! The count of the convolutions' matrix-product operations that `bnlab bench` turns into
//! GFLOP/s (`bnlab::ops::conv2d::product_flops`), on a convolution whose products are known:
//! one test in its own binary, so that no other convolution runs while it counts.

use bnlab::ops::conv2d::{conv2d, product_flops};
use burn::nn::conv::Conv2dConfig;
use burn::nn::PaddingConfig2d;
use burn::tensor::{Device, Distribution, Tensor};

#[test]
fn forward_and_backward_products_are_counted() {
    let device = Device::flex().autodiff();
    // 2 images of 3 × 8 × 8, 3×3 to 4 channels, padding 1: 128 output positions (one group),
    // K = 27 rows of im2col.
    let conv = Conv2dConfig::new([3, 4], [3, 3])
        .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
        .init(&device);
    let x = Tensor::<4>::random([2, 3, 8, 8], Distribution::Default, &device).require_grad();
    let before = product_flops();
    let y = conv2d(&conv, x.clone());
    let forward = product_flops() - before;
    // y = W (4 × 27) · cols (27 × 128).
    assert_eq!(forward, 2 * 4 * 27 * 128);
    let _grads = y.sum().backward();
    // dW = dy (4 × 128) · colsᵀ (128 × 27); dx as a convolution of dy with the flipped
    // weight: (3 × 36) · (36 × 128).
    assert_eq!(
        product_flops() - before,
        forward + 2 * 4 * 128 * 27 + 2 * 3 * 36 * 128
    );
}
