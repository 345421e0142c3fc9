//! The hand-written backend ops, through Burn's backend extension: Burn tensors at the edge,
//! plain slices inside.
//!
//! - [`batch_norm`]: training-mode batch norm as one op with a hand-derived backward (Flex,
//!   and CubeCL for wgpu and CUDA), optionally with the [`epilogue`] in the same pass;
//! - [`epilogue`]: an activation and a `k × k` pool as one op (Flex);
//! - [`conv2d`]: the models' im2col convolution (Flex);
//! - [`bn_relu_conv2d`]: training-mode BN → ReLU → convolution as one op (Flex), DenseNet's
//!   layer, with the normalised tensor never written;
//! - [`bn_relu_max_pool`]: training-mode BN → ReLU → an overlapping max pool as one op
//!   (Flex), the stem of ResNet and DenseNet, keeping neither activations nor indices;
//! - [`dense_block`]: a whole dense block of such layers in one buffer (Flex), its
//!   concatenations never copied into tensors of their own;
//! - [`adam`]: Adam's update of a parameter in one pass (Flex), Burn's arithmetic fused;
//! - [`seeded_backward`]: a backward from a given upstream gradient (W6's benchmark);
//! - [`cpu`] and [`flex`]: what the CPU kernels share.

pub mod adam;
pub mod batch_norm;
pub mod bn_relu_conv2d;
pub mod bn_relu_max_pool;
pub mod conv2d;
pub mod cpu;
pub mod dense_block;
pub mod epilogue;
pub mod flex;
pub mod seeded_backward;

use burn::backend::DispatchDevice;
use burn::tensor::Device;

/// Which kernel family runs the fused op on a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// The Flex CPU kernels: float32 and float64, with the epilogue in the same pass.
    Flex,
    /// The CubeCL kernels (wgpu, CUDA): float32, the epilogue composed after.
    Cube,
}

/// The kernel family of the fused op on `device` (with or without autodiff), if it has one.
pub fn family(device: &Device) -> Option<Family> {
    fn of(device: &DispatchDevice) -> Option<Family> {
        match device {
            DispatchDevice::Flex(_) => Some(Family::Flex),
            #[cfg(any(feature = "wgpu", feature = "cuda"))]
            DispatchDevice::Cube(_) => Some(Family::Cube),
            DispatchDevice::Autodiff(inner) => of(inner),
            #[allow(unreachable_patterns)]
            _ => None,
        }
    }
    of(device.as_dispatch())
}
