//! Adam's update of one parameter as one pass over memory (Flex).
//!
//! Burn's `Adam` runs the update as a dozen element-wise tensor ops, each a pass over the
//! parameter's size and most of them into a fresh buffer, one thread each; on ResNet-18's 11 M
//! parameters that is a tenth of a training step. Here each value of the parameter, its gradient
//! and its two moments is read once and written once, on all cores, in the same float
//! operations in the same order as Burn's, so the results are Burn's bit for bit.

use burn::backend::flex::{Flex, FlexTensor};
use burn::backend::tensor::FloatTensor;
use burn::backend::{backend_extension, Backend, Dispatch};
use burn::tensor::{DType, Tensor};
use rayon::prelude::*;

use super::cpu::Real;
use super::flex::{owned_contiguous, slice, Element};
use super::{family, Family};

/// The factors of one Adam step as Burn's `Adam` forms them: in float32 (its configuration's
/// type), the learning rate in float64, whatever the parameter's float type.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamFactors {
    /// β₁, the first moment's decay.
    pub beta_1: f32,
    /// β₂, the second moment's decay.
    pub beta_2: f32,
    /// `√(1 − β₂ᵗ) / (1 − β₁ᵗ)`: both bias corrections in one factor on the first moment.
    pub correction: f32,
    /// `ε √(1 − β₂ᵗ)`, added to `√v`.
    pub epsilon: f32,
    /// The learning rate.
    pub lr: f64,
    /// PyTorch's coupled weight decay, added to the gradient as `penalty · θ`.
    pub penalty: Option<f32>,
}

/// Adam's step as one Flex op.
#[backend_extension(Flex)]
pub trait AdamBackend: Backend {
    /// The first step, from no moments: `(θ, m, v)` after it.
    fn adam_first_step(
        param: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        factors: AdamFactors,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);

    /// A later step, from the moments `m` and `v`: `(θ, m, v)` after it.
    fn adam_step(
        param: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        moment_1: FloatTensor<Self>,
        moment_2: FloatTensor<Self>,
        factors: AdamFactors,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
}

impl AdamBackend for Flex {
    fn adam_first_step(
        param: FlexTensor,
        grad: FlexTensor,
        factors: AdamFactors,
    ) -> (FlexTensor, FlexTensor, FlexTensor) {
        flex_step(param, grad, None, factors)
    }

    fn adam_step(
        param: FlexTensor,
        grad: FlexTensor,
        moment_1: FlexTensor,
        moment_2: FlexTensor,
        factors: AdamFactors,
    ) -> (FlexTensor, FlexTensor, FlexTensor) {
        flex_step(param, grad, Some((moment_1, moment_2)), factors)
    }
}

/// The step on Flex tensors, in place where a tensor holds its buffer alone; the first step
/// (`moments` none) writes fresh moments without reading them.
fn flex_step(
    param: FlexTensor,
    grad: FlexTensor,
    moments: Option<(FlexTensor, FlexTensor)>,
    factors: AdamFactors,
) -> (FlexTensor, FlexTensor, FlexTensor) {
    fn typed<E: Element>(
        param: FlexTensor,
        grad: FlexTensor,
        moments: Option<(FlexTensor, FlexTensor)>,
        factors: AdamFactors,
    ) -> (FlexTensor, FlexTensor, FlexTensor) {
        let first = moments.is_none();
        let (moment_1, moment_2) = moments.unwrap_or_else(|| {
            let zeros = || FlexTensor::zeros(param.layout().shape().clone(), param.dtype());
            (zeros(), zeros())
        });
        let mut param = owned_contiguous::<E>(param);
        let grad = owned_contiguous::<E>(grad);
        let mut moment_1 = owned_contiguous::<E>(moment_1);
        let mut moment_2 = owned_contiguous::<E>(moment_2);
        let run = if first {
            update::<E, true>
        } else {
            update::<E, false>
        };
        run(
            param.storage_mut::<E>(),
            slice::<E>(&grad),
            moment_1.storage_mut::<E>(),
            moment_2.storage_mut::<E>(),
            factors,
        );
        (param, moment_1, moment_2)
    }
    match param.dtype() {
        DType::F64 => typed::<f64>(param, grad, moments, factors),
        _ => typed::<f32>(param, grad, moments, factors),
    }
}

/// Values per parallel task: large enough that a task outweighs its scheduling.
const CHUNK: usize = 1 << 15;

/// The update in place, on all cores. With `FIRST` the moments' old values are not read: Burn
/// starts them from `(1 − β₁) g` and `(1 − β₂) g²`, not from a sum with zero (which can turn a
/// `-0` into `+0`).
fn update<E: Real, const FIRST: bool>(
    param: &mut [E],
    grad: &[E],
    moment_1: &mut [E],
    moment_2: &mut [E],
    factors: AdamFactors,
) {
    assert!(grad.len() == param.len() && moment_1.len() == param.len());
    assert!(moment_2.len() == param.len());
    let scalars = Scalars::<E>::of(factors);
    let run = |p: &mut [E], g: &[E], m: &mut [E], v: &mut [E]| match factors.penalty {
        Some(_) => update_chunk::<E, FIRST, true>(p, g, m, v, &scalars),
        None => update_chunk::<E, FIRST, false>(p, g, m, v, &scalars),
    };
    if param.len() <= CHUNK {
        run(param, grad, moment_1, moment_2);
    } else {
        param
            .par_chunks_mut(CHUNK)
            .zip(grad.par_chunks(CHUNK))
            .zip(moment_1.par_chunks_mut(CHUNK))
            .zip(moment_2.par_chunks_mut(CHUNK))
            .for_each(|(((p, g), m), v)| run(p, g, m, v));
    }
}

/// The factors in the parameter's float type; `1 − β` in float32, as Burn forms it.
struct Scalars<E> {
    beta_1: E,
    beta_2: E,
    rest_1: E,
    rest_2: E,
    correction: E,
    epsilon: E,
    lr: E,
    penalty: E,
}

impl<E: Real> Scalars<E> {
    fn of(f: AdamFactors) -> Self {
        let real = |x: f32| E::from_f64(x as f64);
        Self {
            beta_1: real(f.beta_1),
            beta_2: real(f.beta_2),
            rest_1: real(1.0 - f.beta_1),
            rest_2: real(1.0 - f.beta_2),
            correction: real(f.correction),
            epsilon: real(f.epsilon),
            lr: E::from_f64(f.lr),
            penalty: real(f.penalty.unwrap_or(0.0)),
        }
    }
}

/// Burn's expressions, element by element: `g ← θ·λ + g`; `m ← m·β₁ + g·(1 − β₁)`;
/// `v ← v·β₂ + (g·g)·(1 − β₂)`; `θ ← θ − (m·c) / (√v + ε′) · lr`.
#[inline(always)]
fn update_chunk<E: Real, const FIRST: bool, const DECAY: bool>(
    param: &mut [E],
    grad: &[E],
    moment_1: &mut [E],
    moment_2: &mut [E],
    s: &Scalars<E>,
) {
    let values = param
        .iter_mut()
        .zip(grad)
        .zip(moment_1.iter_mut())
        .zip(moment_2.iter_mut());
    for (((p, &g), m), v) in values {
        let g = if DECAY { p.mul(s.penalty).add(g) } else { g };
        let (new_m, new_v) = if FIRST {
            (g.mul(s.rest_1), g.mul(g).mul(s.rest_2))
        } else {
            (
                m.mul(s.beta_1).add(g.mul(s.rest_1)),
                v.mul(s.beta_2).add(g.mul(g).mul(s.rest_2)),
            )
        };
        *m = new_m;
        *v = new_v;
        let step = new_m.mul(s.correction).div(new_v.sqrt().add(s.epsilon));
        *p = p.sub(step.mul(s.lr));
    }
}

/// Whether the fused step runs for `param`: a float32 or float64 Flex tensor without autodiff.
pub fn applies<const D: usize>(param: &Tensor<D>) -> bool {
    let device = param.device();
    family(&device) == Some(Family::Flex)
        && !device.is_autodiff()
        && matches!(param.dtype(), DType::F32 | DType::F64)
}

/// One Adam step of `param` with `grad`, from the moments `(m, v)` of the steps before (none on
/// the first): the parameter and the moments after it. Call only where [`applies`] holds.
pub fn step<const D: usize>(
    param: Tensor<D>,
    grad: Tensor<D>,
    moments: Option<(Tensor<D>, Tensor<D>)>,
    factors: AdamFactors,
) -> (Tensor<D>, Tensor<D>, Tensor<D>) {
    let (p, m, v) = match moments {
        None => <Dispatch as AdamBackend>::adam_first_step(
            param.into_dispatch(),
            grad.into_dispatch(),
            factors,
        ),
        Some((m, v)) => <Dispatch as AdamBackend>::adam_step(
            param.into_dispatch(),
            grad.into_dispatch(),
            m.into_dispatch(),
            v.into_dispatch(),
            factors,
        ),
    };
    (
        Tensor::from_dispatch(p),
        Tensor::from_dispatch(m),
        Tensor::from_dispatch(v),
    )
}
