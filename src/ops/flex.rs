//! The edge between Burn's Flex tensors and the kernels' plain slices.

use burn::backend::flex::FlexTensor;
use burn::tensor::TensorData;

use super::cpu::Real;

/// The element types the kernels run on, as Flex stores them.
pub(crate) trait Element: Real + burn::tensor::Element + bytemuck::Pod {}
impl<E: Real + burn::tensor::Element + bytemuck::Pod> Element for E {}

pub(crate) fn contiguous(t: &FlexTensor) -> FlexTensor {
    if t.is_contiguous() {
        t.clone()
    } else {
        t.to_contiguous()
    }
}

/// `t` as a tensor whose storage is exactly its elements in row-major order, so that
/// `storage_mut` edits it in place: no copy when `t` already is so and holds its buffer alone.
pub(crate) fn owned_contiguous<E: Element>(t: FlexTensor) -> FlexTensor {
    let whole = t.is_contiguous()
        && t.layout().start_offset() == 0
        && t.storage::<E>().len() == t.layout().num_elements();
    if whole {
        t
    } else {
        t.to_contiguous()
    }
}

pub(crate) fn slice<E: Element>(t: &FlexTensor) -> &[E] {
    t.as_slice::<E>()
        .expect("a contiguous Flex tensor of the expected dtype")
}

pub(crate) fn tensor<E: burn::tensor::Element>(values: Vec<E>, shape: Vec<usize>) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape))
}

/// `(H, W)` of a 4-d shape, what pooling works on; `(S, 1)` otherwise, where nothing pools.
pub(crate) fn plane_of(shape: &[usize]) -> (usize, usize) {
    match shape {
        [_, _, h, w] => (*h, *w),
        _ => (shape[2..].iter().product(), 1),
    }
}
