//! What follows a BN layer in the chapter's networks, an [`Epilogue`]: an activation, then a
//! `k × k` pool. The fast ops compute it in the same pass as BN ([`crate::ops`]);
//! [`compose_epilogue`] is the reference they are held to, composed from Burn ops.

use burn::tensor::activation::{relu, sigmoid};
use burn::tensor::module::{avg_pool2d, max_pool2d};
use burn::tensor::ops::{AvgPoolOptions, MaxPoolOptions};
use burn::tensor::Tensor;

crate::choice_enum! {
    /// The activation an [`Epilogue`] applies (`--activation` of the LeNets).
    pub enum Activation {
        /// None: the identity.
        Identity = "identity",
        /// The logistic sigmoid, as the chapter's LeNet.
        Sigmoid = "sigmoid",
        /// max(0, x); NaN passes through, as in PyTorch.
        Relu = "relu",
    }
}

// choice_enum! takes no #[default] on a variant.
#[allow(clippy::derivable_impls)]
impl Default for Activation {
    fn default() -> Self {
        Self::Identity
    }
}

/// The pooling an [`Epilogue`] applies: `k × k` windows with stride `k` and no padding over the
/// last two axes; rows or columns left over when `k` does not divide the size are dropped, as
/// PyTorch's default `floor` mode does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Pool {
    /// No pooling.
    #[default]
    None,
    /// The mean of each `k × k` window.
    Avg(usize),
    /// The largest value of each `k × k` window.
    Max(usize),
}

impl Pool {
    /// The chapter's LeNet pools: 2 × 2.
    pub const LENET_WINDOW: usize = 2;

    /// The window size `k`, or `None` for [`Pool::None`].
    pub fn window(self) -> Option<usize> {
        match self {
            Self::None => None,
            Self::Avg(k) | Self::Max(k) => Some(k),
        }
    }
}

/// The names `--pool`, recipes and `config.json` use: `avg` and `max` for the chapter's 2 × 2
/// windows, `avg:K` and `max:K` for others, `none`.
impl std::fmt::Display for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (kind, k) = match *self {
            Self::None => return f.write_str("none"),
            Self::Avg(k) => ("avg", k),
            Self::Max(k) => ("max", k),
        };
        match k == Self::LENET_WINDOW {
            true => f.write_str(kind),
            false => write!(f, "{kind}:{k}"),
        }
    }
}

impl std::str::FromStr for Pool {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (kind, window) = s.split_once(':').unwrap_or((s, ""));
        let k = match window {
            "" => Self::LENET_WINDOW,
            w => w.parse().ok().filter(|&k| k >= 1).ok_or_else(|| {
                format!("'{s}': the window after ':' must be a whole number >= 1")
            })?,
        };
        match (kind, window) {
            ("avg", _) => Ok(Self::Avg(k)),
            ("max", _) => Ok(Self::Max(k)),
            ("none", "") => Ok(Self::None),
            _ => Err(format!("'{s}' is not one of avg, max, avg:K, max:K, none")),
        }
    }
}

impl serde::Serialize for Pool {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Pool {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str> as serde::Deserialize>::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// What the layers right after a BN layer do, computed by the fused kernel in the same pass:
/// `pool(activation(bn(x)))`. [`BatchNorm::forward_then`](super::BatchNorm::forward_then) takes
/// one; the default, [`Epilogue::NONE`], is batch norm alone.
///
/// ```
/// use bnlab::norm::epilogue::{compose_epilogue, Activation, Epilogue, Pool};
/// use bnlab::norm::{BatchNormConfig, Kernel};
/// use burn::tensor::{Device, Distribution, Tensor};
///
/// let device = Device::flex().autodiff();
/// let bn = BatchNormConfig::new(4).with_kernel(Kernel::Fused).init(&device);
/// let x = Tensor::<4>::random([2, 4, 6, 6], Distribution::Default, &device);
/// let relu_max = Epilogue { activation: Activation::Relu, pool: Pool::Max(2) };
///
/// // BN, ReLU and the 2 × 2 max pool: one op on Flex in training mode...
/// let fused = bn.forward_then(x.clone(), relu_max);
/// assert_eq!(fused.dims(), [2, 4, 3, 3]);
/// // ...which gives what the three give one after the other.
/// let composed = compose_epilogue(bn.forward(x), relu_max);
/// assert!((fused - composed).abs().max().into_scalar::<f32>() < 1e-5);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Epilogue {
    /// Applied first, to every value.
    pub activation: Activation,
    /// Applied second, to the activations.
    pub pool: Pool,
}

impl Epilogue {
    /// Batch norm alone.
    pub const NONE: Self = Self {
        activation: Activation::Identity,
        pool: Pool::None,
    };

    /// Batch norm, then ReLU: the start of DenseNet's layers and the end of ResNet's.
    pub const RELU: Self = Self {
        activation: Activation::Relu,
        pool: Pool::None,
    };

    /// Batch norm, ReLU, then a 2×2 average pool: DenseNet's transition before its 1×1
    /// convolution.
    pub const RELU_AVG_POOL_2: Self = Self {
        activation: Activation::Relu,
        pool: Pool::Avg(2),
    };

    /// Whether this is [`Epilogue::NONE`]: the identity.
    pub fn is_none(&self) -> bool {
        *self == Self::NONE
    }

    /// The output shape for an input of shape `shape`, or why the epilogue cannot apply.
    pub fn output_shape(&self, shape: &[usize]) -> Result<Vec<usize>, String> {
        let Some(k) = self.pool.window() else {
            return Ok(shape.to_vec());
        };
        match shape {
            &[n, c, h, w] if k > 0 && h >= k && w >= k => Ok(vec![n, c, h / k, w / k]),
            _ => Err(format!(
                "a {k}x{k} pool needs (N, C, H, W) input of at least {k}x{k}, got {shape:?}"
            )),
        }
    }
}

/// `epilogue` from Burn ops: what the fused kernels compute in their own pass, and the
/// reference the tests hold them to. The output is `(N, C, H/k, W/k)` with a `k × k` pool (see
/// [`Epilogue::output_shape`]), else the shape of `x`.
///
/// # Panics
/// If `epilogue` pools and `x` is not `(N, C, H, W)` of at least `k × k`.
///
/// # Example
///
/// ```
/// use bnlab::norm::epilogue::{compose_epilogue, Activation, Epilogue, Pool};
/// use burn::tensor::{Device, Tensor};
///
/// // One image of one channel, 2 × 4.
/// let x = Tensor::<4>::from_floats([[[[-1.0, 2.0, -3.0, 0.5], [4.0, -5.0, 1.0, -2.0]]]], &Device::flex());
/// let values = |t: Tensor<4>| -> Vec<f32> { t.into_data().iter::<f32>().collect() };
///
/// let relu_max = Epilogue { activation: Activation::Relu, pool: Pool::Max(2) };
/// assert_eq!(relu_max.output_shape(&[1, 1, 2, 4]), Ok(vec![1, 1, 1, 2]));
/// assert_eq!(values(compose_epilogue(x.clone(), relu_max)), [4.0, 1.0]);
/// // ReLU, then the mean of each 2 × 2 window: (0 + 2 + 4 + 0) / 4 and (0 + 0.5 + 1 + 0) / 4.
/// let relu_avg = Epilogue { pool: Pool::Avg(2), ..relu_max };
/// assert_eq!(values(compose_epilogue(x.clone(), relu_avg)), [1.5, 0.375]);
/// assert_eq!(values(compose_epilogue(x.clone(), Epilogue::NONE)), values(x));
/// ```
pub fn compose_epilogue<const D: usize>(x: Tensor<D>, epilogue: Epilogue) -> Tensor<D> {
    let a = match epilogue.activation {
        Activation::Identity => x,
        Activation::Sigmoid => sigmoid(x),
        Activation::Relu => relu(x),
    };
    let Some(k) = epilogue.pool.window() else {
        return a;
    };
    let dims = a.dims();
    if let Err(e) = epilogue.output_shape(&dims) {
        panic!("{e}");
    }
    let dims: &[usize] = &dims; // rank 4, checked above
    let a: Tensor<4> = a.reshape([dims[0], dims[1], dims[2], dims[3]]);
    let pooled = match epilogue.pool {
        Pool::Avg(_) => avg_pool2d(a, AvgPoolOptions::new([k, k]).with_stride([k, k])),
        _ => max_pool2d(a, MaxPoolOptions::new([k, k]).with_stride([k, k])),
    };
    let mut dims = [0; D];
    dims.copy_from_slice(&pooled.dims());
    pooled.reshape(dims)
}
