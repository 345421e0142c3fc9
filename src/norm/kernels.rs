//! The fused batch-norm kernels: plain loops over `(N, C, S)` slices, with no Burn types.
//!
//! `S` is the product of the spatial axes (1 for `(N, C)` input), so channel `c` of sample `n`
//! is the contiguous plane `x[(n * C + c) * S ..][.. S]`.
//!
//! Besides batch norm itself, the kernels can apply what follows it in a network (an
//! [`Epilogue`]: sigmoid or ReLU, then a `k × k` average or max pool) in the same pass, and
//! take the gradient back through it, so that those layers cost no pass over memory of their
//! own.
//!
//! Accuracy: each channel is shifted by its first value (the pivot) before anything is summed,
//! and the sums are kept in float64. For data far from zero (the `conv2d_large_mean` case,
//! 1000 ± 0.01) the shifted values are small and exact, so the one-pass `E[d²] - E[d]²` loses
//! nothing to cancellation. Sums run over planes in a fixed order, so results do not depend on
//! the number of threads.
//!
//! Speed: one read of `x` for the statistics and one read plus one write for the output; the
//! backward reads `x` and `dy` twice and writes `dx` once. Outputs are written into
//! uninitialised memory (zeroing a buffer first is a pass of its own). Work is split over
//! channels or planes on rayon's pool, and every loop is compiled for AVX2 too, chosen at run
//! time ([`simd_fn!`]).

use std::mem::MaybeUninit;

use rayon::prelude::*;

/// The float types the kernels run on.
pub trait Real: Copy + Send + Sync + PartialEq + PartialOrd + 'static {
    const ZERO: Self;
    const ONE: Self;
    fn to_f64(self) -> f64;
    fn from_f64(value: f64) -> Self;
    fn add(self, other: Self) -> Self;
    fn sub(self, other: Self) -> Self;
    fn mul(self, other: Self) -> Self;
    /// `self * a + b`, rounded twice (no FMA: results stay the same on CPUs without it).
    fn mul_add(self, a: Self, b: Self) -> Self;
    fn sigmoid(self) -> Self;
    fn is_nan(self) -> bool;
}

/// `Real` for a primitive float type, with its sigmoid (`$exp` is the `e^x` it uses).
macro_rules! impl_real {
    ($t:ty, $exp:expr) => {
        impl Real for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            #[inline(always)]
            fn to_f64(self) -> f64 {
                self as f64
            }
            #[inline(always)]
            fn from_f64(value: f64) -> Self {
                value as $t
            }
            #[inline(always)]
            fn add(self, other: Self) -> Self {
                self + other
            }
            #[inline(always)]
            fn sub(self, other: Self) -> Self {
                self - other
            }
            #[inline(always)]
            fn mul(self, other: Self) -> Self {
                self * other
            }
            #[inline(always)]
            fn mul_add(self, a: Self, b: Self) -> Self {
                self * a + b
            }
            #[inline(always)]
            fn is_nan(self) -> bool {
                <$t>::is_nan(self)
            }
            #[inline(always)]
            fn sigmoid(self) -> Self {
                let exp: fn($t) -> $t = $exp;
                1.0 / (1.0 + exp(-self))
            }
        }
    };
}
// float32 takes the vectorisable exp below; float64 (tests, references) libm's.
impl_real!(f32, exp_f32);
impl_real!(f64, f64::exp);

/// `e^x` in float32, written so that it vectorises (libm's `expf` is a call per value).
///
/// Cephes' `expf`: `e^x = 2^n · e^r` with `n = round(x · log2 e)` and `|r| ≤ ln 2 / 2`, and
/// `e^r = 1 + r + r² p(r)` with a degree-5 `p`; within 2 ulp of the exact value on `[-87, 88]`,
/// where the input is clamped (`e^-87` is already below float32's smallest normal number).
#[inline(always)]
#[allow(clippy::excessive_precision)] // Cephes' constants, digit for digit
pub fn exp_f32(x: f32) -> f32 {
    // Adding 1.5·2²³ rounds to an integer in the low mantissa bits, without SSE4.1's `roundps`.
    const ROUND: f32 = 12_582_912.0;
    const LN2_HI: f32 = 0.693_359_375;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.0, 88.0);
    let t = x * std::f32::consts::LOG2_E + ROUND;
    let n = t - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 5.000_000_1e-1;
    let e_r = p * r * r + r + 1.0;
    // 2^n, built in the exponent bits; n lies within [-126, 127] after the clamp.
    let n_bits = (t.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    e_r * f32::from_bits(((n_bits + 127) << 23) as u32)
}

/// Defines a kernel function that runs compiled for AVX2 when the CPU has it, and for
/// baseline x86-64 (SSE2, what Rust targets unless told otherwise) when not: the loops then
/// run in 256-bit lanes on any x86-64 machine that has them.
///
/// The body becomes an `#[inline(always)]` function called from an AVX2 twin and from the
/// baseline path, so that it is compiled inside each. (A closure handed to an AVX2 wrapper
/// is not reliably inlined, and then runs without AVX2.) Closures in the body should stay
/// small, so that they are inlined where they are called.
macro_rules! simd_fn {
    ($(#[$m:meta])* fn $name:ident<E: Real>($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        fn $name<E: Real>($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn generic<E: Real>($($arg: $ty),*) $(-> $ret)? $body

            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2")]
            unsafe fn avx2<E: Real>($($arg: $ty),*) $(-> $ret)? {
                generic($($arg),*)
            }

            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU has AVX2, the one feature `avx2` is compiled for.
                return unsafe { avx2($($arg),*) };
            }
            generic($($arg),*)
        }
    };
}

/// The `(N, C, S)` view of an `(N, C, ...)` tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dims {
    pub n: usize,
    pub c: usize,
    pub s: usize,
}

impl Dims {
    pub fn of(shape: &[usize]) -> Self {
        Self {
            n: shape[0],
            c: shape[1],
            s: shape[2..].iter().product(),
        }
    }

    /// Values per channel: the `M` that the statistics average over.
    pub fn count(&self) -> usize {
        self.n * self.s
    }

    pub fn len(&self) -> usize {
        self.n * self.c * self.s
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The activation an [`Epilogue`] applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Activation {
    #[default]
    Identity,
    Sigmoid,
    Relu,
}

impl Activation {
    #[inline(always)]
    fn apply<E: Real>(self, z: E) -> E {
        match self {
            Self::Identity => z,
            Self::Sigmoid => z.sigmoid(),
            // `z < 0`, not `z > 0`: NaN passes through, as in PyTorch.
            Self::Relu => {
                if z < E::ZERO {
                    E::ZERO
                } else {
                    z
                }
            }
        }
    }

    /// The derivative, from the activation's output `a`.
    #[inline(always)]
    fn derivative_from_output<E: Real>(self, a: E) -> E {
        match self {
            Self::Identity => E::ONE,
            Self::Sigmoid => a.mul(E::ONE.sub(a)),
            Self::Relu => {
                if a > E::ZERO {
                    E::ONE
                } else {
                    E::ZERO
                }
            }
        }
    }
}

/// The pooling an [`Epilogue`] applies: `k × k` windows with stride `k` and no padding over the
/// last two axes; rows or columns left over when `k` does not divide the size are dropped, as
/// PyTorch's default `floor` mode does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Pool {
    #[default]
    None,
    Avg(usize),
    Max(usize),
}

impl Pool {
    pub fn window(self) -> Option<usize> {
        match self {
            Self::None => None,
            Self::Avg(k) | Self::Max(k) => Some(k),
        }
    }
}

/// What the layers right after a BN layer do, computed by the fused kernel in the same pass:
/// `pool(activation(bn(x)))`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Epilogue {
    pub activation: Activation,
    pub pool: Pool,
}

impl Epilogue {
    /// Batch norm alone.
    pub const NONE: Self = Self {
        activation: Activation::Identity,
        pool: Pool::None,
    };

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

/// One channel's batch statistics, kept in the element type for the element-wise passes.
#[derive(Debug, Clone, Copy)]
pub struct ChannelStats<E> {
    /// The channel's first value: subtracted before anything else.
    pub pivot: E,
    /// The mean of `x - pivot`.
    pub shifted_mean: E,
    /// `1 / sqrt(var + eps)`.
    pub inv_std: E,
    /// The batch mean and the biased batch variance, for the running statistics.
    pub mean: f64,
    pub var: f64,
}

impl<E: Real> ChannelStats<E> {
    /// `x - mean`, computed as `(x - pivot) - shifted_mean` so that it stays exact far from 0.
    #[inline(always)]
    fn centered(&self, x: E) -> E {
        x.sub(self.pivot).sub(self.shifted_mean)
    }
}

/// A buffer of `len` values that the kernels write before anything reads them.
pub fn uninit<E>(len: usize) -> Vec<MaybeUninit<E>> {
    let mut v = Vec::with_capacity(len);
    // SAFETY: `MaybeUninit` needs no initialisation; the capacity is `len`.
    unsafe { v.set_len(len) };
    v
}

/// # Safety
/// Every element of `v` has been written.
pub unsafe fn assume_init<E>(v: Vec<MaybeUninit<E>>) -> Vec<E> {
    let mut v = std::mem::ManuallyDrop::new(v);
    // SAFETY: same layout; the caller vouches that every element is initialised.
    unsafe { Vec::from_raw_parts(v.as_mut_ptr() as *mut E, v.len(), v.capacity()) }
}

/// Writes `values` to every element of `out` and returns it as initialised.
///
/// # Panics
/// If `values` runs out first.
#[inline(always)]
fn fill<E: Copy>(out: &mut [MaybeUninit<E>], values: impl Iterator<Item = E>) -> &mut [E] {
    let mut written = 0;
    for (o, v) in out.iter_mut().zip(values) {
        o.write(v);
        written += 1;
    }
    assert_eq!(
        written,
        out.len(),
        "a kernel left part of its output unwritten"
    );
    // SAFETY: every element was just written.
    unsafe { &mut *(out as *mut [MaybeUninit<E>] as *mut [E]) }
}

/// Lanes of independent partial sums: they let the compiler vectorise the float64 sums, which
/// it may not reorder on its own.
const LANES: usize = 8;

/// `(Σ f(a_i, b_i), Σ g(a_i, b_i))` over two equally long runs, in float64 lanes kept in
/// registers.
#[inline(always)]
fn lane_sums<E: Real>(
    a: &[E],
    b: &[E],
    f: impl Fn(E, E) -> f64,
    g: impl Fn(E, E) -> f64,
) -> (f64, f64) {
    let (mut sf, mut sg) = ([0.0f64; LANES], [0.0f64; LANES]);
    let (ac, bc) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (at, bt) = (ac.remainder(), bc.remainder());
    for (av, bv) in ac.zip(bc) {
        for lane in 0..LANES {
            sf[lane] += f(av[lane], bv[lane]);
            sg[lane] += g(av[lane], bv[lane]);
        }
    }
    for (lane, (&av, &bv)) in at.iter().zip(bt).enumerate() {
        sf[lane] += f(av, bv);
        sg[lane] += g(av, bv);
    }
    (sf.iter().sum(), sg.iter().sum())
}

simd_fn! {
    /// `Σ (x - pivot)` and `Σ (x - pivot)²` over channel `c`.
    fn shifted_sums<E: Real>(x: &[E], dims: Dims, c: usize, pivot: E) -> (f64, f64) {
        if dims.s == 1 {
            // (N, C) input: the channel's values are a column.
            let column = x[c..].iter().step_by(dims.c).map(|&v| v.sub(pivot).to_f64());
            return column.fold((0.0, 0.0), |(s, q), d| (s + d, q + d * d));
        }
        let mut sums = (0.0, 0.0);
        for n in 0..dims.n {
            let run = &x[(n * dims.c + c) * dims.s..][..dims.s];
            let d = |v: E| v.sub(pivot).to_f64();
            let (s, q) = lane_sums(run, run, |v, _| d(v), |v, _| d(v) * d(v));
            sums = (sums.0 + s, sums.1 + q);
        }
        sums
    }
}

/// Per-channel statistics of `x` in one pass.
pub fn channel_stats<E: Real>(x: &[E], dims: Dims, eps: f64) -> Vec<ChannelStats<E>> {
    debug_assert_eq!(x.len(), dims.len());
    (0..dims.c)
        .into_par_iter()
        .map(|c| channel_stat(x, dims, c, eps))
        .collect()
}

/// Channel `c`'s statistics.
fn channel_stat<E: Real>(x: &[E], dims: Dims, c: usize, eps: f64) -> ChannelStats<E> {
    let m = dims.count() as f64;
    let pivot = x[c * dims.s];
    let (sum, sq) = shifted_sums(x, dims, c, pivot);
    let shifted_mean = sum / m;
    let var = (sq / m - shifted_mean * shifted_mean).max(0.0);
    ChannelStats {
        pivot,
        shifted_mean: E::from_f64(shifted_mean),
        inv_std: E::from_f64(1.0 / (var + eps).sqrt()),
        mean: pivot.to_f64() + shifted_mean,
        var,
    }
}

/// Planes per rayon task, so that each task has a few thousand values to work on.
fn planes_per_task(dims: Dims) -> usize {
    (4096 / dims.s.max(1)).max(1)
}

/// The training-mode forward: `pool(activation(gamma · x̂ + beta))`.
///
/// Returns the activations (full size; the backward needs them unless the epilogue is
/// [`Epilogue::NONE`], where they are the output) and, with a pool, the pooled output.
/// `plane` is `(H, W)` for 4-d input; a pool needs it.
pub fn forward<E: Real>(
    x: &[E],
    dims: Dims,
    plane: (usize, usize),
    stats: &[ChannelStats<E>],
    gamma: &[E],
    beta: &[E],
    epilogue: Epilogue,
) -> (Vec<E>, Option<Vec<E>>) {
    if dims.s == 1 {
        // No pool fits one value per plane (`Epilogue::output_shape` says so).
        debug_assert_eq!(epilogue.pool, Pool::None);
        return (
            rows::forward(x, dims, stats, gamma, beta, epilogue.activation),
            None,
        );
    }
    let mut activations = uninit::<E>(dims.len());
    let (h, w) = plane;
    let k = epilogue.pool.window().unwrap_or(1);
    let pooled_plane = (h / k) * (w / k);
    let mut pooled = epilogue
        .pool
        .window()
        .map(|_| uninit::<E>(dims.n * dims.c * pooled_plane));
    let per_plane =
        |i: usize, out: &mut [MaybeUninit<E>], pooled: Option<&mut [MaybeUninit<E>]>| {
            let c = i % dims.c;
            let st = stats[c];
            let scale = E::from_f64(gamma[c].to_f64() * st.inv_std.to_f64());
            let input = &x[i * dims.s..][..dims.s];
            forward_plane(input, st, scale, beta[c], epilogue, plane, out, pooled);
        };
    let min_len = planes_per_task(dims);
    match pooled.as_mut() {
        None => activations
            .par_chunks_mut(dims.s)
            .with_min_len(min_len)
            .enumerate()
            .for_each(|(i, out)| per_plane(i, out, None)),
        Some(pooled) => activations
            .par_chunks_mut(dims.s)
            .zip(pooled.par_chunks_mut(pooled_plane))
            .with_min_len(min_len)
            .enumerate()
            .for_each(|(i, (out, pooled))| per_plane(i, out, Some(pooled))),
    }
    // SAFETY: every plane of both buffers was filled above.
    unsafe { (assume_init(activations), pooled.map(|p| assume_init(p))) }
}

simd_fn! {
    /// One `(n, c)` plane of [`forward`].
    #[allow(clippy::too_many_arguments)]
    fn forward_plane<E: Real>(
        input: &[E],
        st: ChannelStats<E>,
        scale: E,
        shift: E,
        epilogue: Epilogue,
        plane: (usize, usize),
        out: &mut [MaybeUninit<E>],
        pooled: Option<&mut [MaybeUninit<E>]>,
    ) {
        let z = input
            .iter()
            .map(move |&v| st.centered(v).mul_add(scale, shift));
        // One loop per activation, so that each one vectorises.
        let a = match epilogue.activation {
            Activation::Identity => fill(out, z),
            Activation::Sigmoid => fill(out, z.map(Real::sigmoid)),
            Activation::Relu => fill(out, z.map(|z| Activation::Relu.apply(z))),
        };
        if let Some(pooled) = pooled {
            pool_plane(a, plane, epilogue.pool, pooled);
        }
    }
}

/// Pools one `(h, w)` plane into `out`, `(h / k) × (w / k)`.
#[inline(always)]
fn pool_plane<E: Real>(a: &[E], plane: (usize, usize), pool: Pool, out: &mut [MaybeUninit<E>]) {
    // A literal `k` per arm lets the window loops unroll (LeNet's pools are 2×2).
    match pool {
        Pool::None => {}
        Pool::Avg(2) => pool_rows(a, plane, 2, true, out),
        Pool::Max(2) => pool_rows(a, plane, 2, false, out),
        Pool::Avg(k) => pool_rows(a, plane, k, true, out),
        Pool::Max(k) => pool_rows(a, plane, k, false, out),
    }
}

/// [`pool_plane`], one output row at a time (no division per output value).
#[inline(always)]
fn pool_rows<E: Real>(
    a: &[E],
    (h, w): (usize, usize),
    k: usize,
    average: bool,
    out: &mut [MaybeUninit<E>],
) {
    let (ho, wo) = (h / k, w / k);
    let inv_area = E::from_f64(1.0 / (k * k) as f64);
    for (r, out_row) in out[..ho * wo].chunks_exact_mut(wo).enumerate() {
        let rows = &a[r * k * w..][..k * w];
        let window = |j: usize| {
            let c0 = j * k;
            let mut acc = if average { E::ZERO } else { rows[c0] };
            for dh in 0..k {
                for &v in &rows[dh * w + c0..][..k] {
                    acc = match average {
                        true => acc.add(v),
                        // NaN wins, as in PyTorch.
                        false if v > acc || v.is_nan() => v,
                        false => acc,
                    };
                }
            }
            if average {
                acc.mul(inv_area)
            } else {
                acc
            }
        };
        fill(out_row, (0..wo).map(window));
    }
}

/// The gradient with respect to BN's output `z` of one `(h, w)` plane, from the gradient of
/// the epilogue's output `dout` and the saved activations `a`, written to `dz`.
#[inline(always)]
fn epilogue_grad_plane<'a, E: Real>(
    a: &[E],
    dout: &[E],
    (h, w): (usize, usize),
    epilogue: Epilogue,
    dz: &'a mut [MaybeUninit<E>],
) -> &'a mut [E] {
    let act = epilogue.activation;
    let (k, dz) = match epilogue.pool {
        Pool::None => {
            let grads = dout.iter().zip(a);
            return fill(
                dz,
                grads.map(|(&g, &a)| g.mul(act.derivative_from_output(a))),
            );
        }
        Pool::Avg(k) | Pool::Max(k) => (k, fill(dz, std::iter::repeat(E::ZERO))),
    };
    // A literal `k` per arm lets the window loops unroll (LeNet's pools are 2×2).
    match epilogue.pool {
        Pool::Avg(2) => unpool_rows(a, dout, (h, w), 2, true, dz),
        Pool::Max(2) => unpool_rows(a, dout, (h, w), 2, false, dz),
        Pool::Avg(_) => unpool_rows(a, dout, (h, w), k, true, dz),
        _ => unpool_rows(a, dout, (h, w), k, false, dz),
    }
    if act != Activation::Identity {
        for (d, &av) in dz.iter_mut().zip(a) {
            *d = d.mul(act.derivative_from_output(av));
        }
    }
    dz
}

/// The pool's backward into `dz` (zeroed): each output's gradient spread over its `k × k`
/// window (average) or routed to the window's maximum, one output row at a time.
#[inline(always)]
fn unpool_rows<E: Real>(
    a: &[E],
    dout: &[E],
    (h, w): (usize, usize),
    k: usize,
    average: bool,
    dz: &mut [E],
) {
    let (ho, wo) = (h / k, w / k);
    let share_of = E::from_f64(1.0 / (k * k) as f64);
    for (r, dout_row) in dout[..ho * wo].chunks_exact(wo).enumerate() {
        let base = r * k * w;
        for (j, &g) in dout_row.iter().enumerate() {
            let c0 = base + j * k;
            if average {
                let share = g.mul(share_of);
                for dh in 0..k {
                    dz[c0 + dh * w..][..k].fill(share);
                }
            } else {
                // The first maximum in row-major order, the one the forward took.
                let mut best = c0;
                for dh in 0..k {
                    for i in c0 + dh * w..c0 + dh * w + k {
                        if a[i] > a[best] || (a[i].is_nan() && !a[best].is_nan()) {
                            best = i;
                        }
                    }
                }
                dz[best] = g;
            }
        }
    }
}

simd_fn! {
    /// `Σ dy` and `Σ dy · (x - mean)` over channel `c`.
    fn dy_sums<E: Real>(x: &[E], dy: &[E], dims: Dims, c: usize, st: ChannelStats<E>) -> (f64, f64) {
        let mut sums = (0.0, 0.0);
        for n in 0..dims.n {
            let start = (n * dims.c + c) * dims.s;
            let (a, b) = lane_sums(
                &x[start..][..dims.s],
                &dy[start..][..dims.s],
                |_, g| g.to_f64(),
                |v, g| g.to_f64() * st.centered(v).to_f64(),
            );
            sums = (sums.0 + a, sums.1 + b);
        }
        sums
    }
}

/// Per-channel `Σ dy` and `Σ dy · x̂`, the reductions of the backward pass, for BN alone.
pub fn grad_sums<E: Real>(
    x: &[E],
    dy: &[E],
    dims: Dims,
    stats: &[ChannelStats<E>],
) -> Vec<(f64, f64)> {
    if dims.s == 1 {
        return rows::grad_sums(x, dy, dims, stats, None);
    }
    (0..dims.c)
        .into_par_iter()
        .map(|c| {
            let st = stats[c];
            let (sum_dy, sum_dy_d) = dy_sums(x, dy, dims, c, st);
            (sum_dy, sum_dy_d * st.inv_std.to_f64())
        })
        .collect()
}

simd_fn! {
    /// One `(n, c)` plane of [`epilogue_grad_sums`]: writes `dz`, returns its two sums.
    fn epilogue_plane_sums<E: Real>(
        xs: &[E],
        a: &[E],
        dout: &[E],
        st: ChannelStats<E>,
        plane: (usize, usize),
        epilogue: Epilogue,
        dz: &mut [MaybeUninit<E>],
    ) -> (f64, f64) {
        let dz = epilogue_grad_plane(a, dout, plane, epilogue, dz);
        lane_sums(
            xs,
            dz,
            |_, g| g.to_f64(),
            |v, g| g.to_f64() * st.centered(v).to_f64(),
        )
    }
}

/// The backward through the epilogue: writes `dz`, the gradient at BN's output, and returns
/// the per-channel `Σ dz` and `Σ dz · x̂` as [`grad_sums`] does.
#[allow(clippy::too_many_arguments)]
pub fn epilogue_grad_sums<E: Real>(
    x: &[E],
    activations: &[E],
    dout: &[E],
    dims: Dims,
    plane: (usize, usize),
    stats: &[ChannelStats<E>],
    epilogue: Epilogue,
    dz: &mut [MaybeUninit<E>],
) -> Vec<(f64, f64)> {
    if dims.s == 1 {
        debug_assert_eq!(epilogue.pool, Pool::None);
        return rows::grad_sums(x, dout, dims, stats, Some((activations, epilogue, dz)));
    }
    let out_plane = dout.len() / (dims.n * dims.c);
    let per_plane: Vec<(f64, f64)> = dz
        .par_chunks_mut(dims.s)
        .with_min_len(planes_per_task(dims))
        .enumerate()
        .map(|(i, dz)| {
            let st = stats[i % dims.c];
            let xs = &x[i * dims.s..][..dims.s];
            let a = &activations[i * dims.s..][..dims.s];
            let dout = &dout[i * out_plane..][..out_plane];
            epilogue_plane_sums(xs, a, dout, st, plane, epilogue, dz)
        })
        .collect();
    let mut sums = vec![(0.0, 0.0); dims.c];
    for (i, (s0, s1)) in per_plane.into_iter().enumerate() {
        sums[i % dims.c].0 += s0;
        sums[i % dims.c].1 += s1;
    }
    sums.iter()
        .zip(stats)
        .map(|(&(s0, s1), st)| (s0, s1 * st.inv_std.to_f64()))
        .collect()
}

simd_fn! {
    /// [`epilogue_grad_plane`] over one plane, or over a block of values when nothing pools.
    fn epilogue_grad_block<E: Real>(
        a: &[E],
        dout: &[E],
        plane: (usize, usize),
        epilogue: Epilogue,
        dz: &mut [MaybeUninit<E>],
    ) {
        epilogue_grad_plane(a, dout, plane, epilogue, dz);
    }
}

/// The backward of an epilogue alone (no BN before it): the gradient at its input from the
/// gradient at its output `dout` and its saved activations.
pub fn epilogue_grad<E: Real>(
    activations: &[E],
    dout: &[E],
    dims: Dims,
    plane: (usize, usize),
    epilogue: Epilogue,
) -> Vec<E> {
    let mut dz = uninit::<E>(dims.len());
    match epilogue.pool {
        // Element-wise: any blocks will do.
        Pool::None => dz
            .par_chunks_mut(4096)
            .zip(activations.par_chunks(4096).zip(dout.par_chunks(4096)))
            .for_each(|(dz, (a, g))| epilogue_grad_block(a, g, (1, 1), epilogue, dz)),
        _ => {
            let out_plane = dout.len() / (dims.n * dims.c);
            dz.par_chunks_mut(dims.s)
                .with_min_len(planes_per_task(dims))
                .enumerate()
                .for_each(|(i, dz)| {
                    let a = &activations[i * dims.s..][..dims.s];
                    let g = &dout[i * out_plane..][..out_plane];
                    epilogue_grad_block(a, g, plane, epilogue, dz)
                })
        }
    }
    // SAFETY: every block was filled above.
    unsafe { assume_init(dz) }
}

/// Per channel, `(a, b, k)` of `dx = a·dy + b·(x - mean) + k`, the input gradient
/// `dx = gamma·inv_std · (dy - mean(dy) - x̂ · mean(dy·x̂))`.
fn input_grad_coefficients<E: Real>(
    dims: Dims,
    stats: &[ChannelStats<E>],
    gamma: &[E],
    sums: &[(f64, f64)],
) -> Vec<(E, E, E)> {
    (0..dims.c)
        .map(|c| input_grad_coefficient(dims, stats[c], gamma[c], sums[c]))
        .collect()
}

/// One channel's `(a, b, k)` of [`input_grad_coefficients`].
fn input_grad_coefficient<E: Real>(
    dims: Dims,
    st: ChannelStats<E>,
    gamma: E,
    (sum_dy, sum_dy_xhat): (f64, f64),
) -> (E, E, E) {
    let m = dims.count() as f64;
    let inv_std = st.inv_std.to_f64();
    let a = gamma.to_f64() * inv_std;
    (
        E::from_f64(a),
        E::from_f64(-a * inv_std * sum_dy_xhat / m),
        E::from_f64(-a * sum_dy / m),
    )
}

simd_fn! {
    /// One `(n, c)` plane of [`input_grad`].
    fn input_grad_plane<E: Real>(
        xs: &[E],
        gs: &[E],
        st: ChannelStats<E>,
        coefficients: (E, E, E),
        out: &mut [MaybeUninit<E>],
    ) {
        let (a, b, k) = coefficients;
        let grads = gs.iter().zip(xs);
        fill(out, grads.map(|(&g, &v)| g.mul_add(a, st.centered(v).mul_add(b, k))));
    }
}

simd_fn! {
    /// One `(n, c)` plane of [`input_grad_in_place`].
    fn input_grad_plane_in_place<E: Real>(
        xs: &[E],
        st: ChannelStats<E>,
        coefficients: (E, E, E),
        run: &mut [E],
    ) {
        let (a, b, k) = coefficients;
        for (g, &v) in run.iter_mut().zip(xs) {
            *g = g.mul_add(a, st.centered(v).mul_add(b, k));
        }
    }
}

/// The input gradient, from `dy` into a new buffer.
pub fn input_grad<E: Real>(
    x: &[E],
    dy: &[E],
    dims: Dims,
    stats: &[ChannelStats<E>],
    gamma: &[E],
    sums: &[(f64, f64)],
) -> Vec<E> {
    let coefficients = input_grad_coefficients(dims, stats, gamma, sums);
    let mut dx = uninit::<E>(dims.len());
    if dims.s == 1 {
        let out = RowsOut::Fresh { dy, dx: &mut dx };
        rows::input_grad(x, dims, stats, &coefficients, out);
        // SAFETY: every row was filled above.
        return unsafe { assume_init(dx) };
    }
    dx.par_chunks_mut(dims.s)
        .with_min_len(planes_per_task(dims))
        .enumerate()
        .for_each(|(i, out)| {
            let st = stats[i % dims.c];
            let xs = &x[i * dims.s..][..dims.s];
            let gs = &dy[i * dims.s..][..dims.s];
            input_grad_plane(xs, gs, st, coefficients[i % dims.c], out);
        });
    // SAFETY: every plane was filled above.
    unsafe { assume_init(dx) }
}

/// The input gradient, overwriting `dz` (the gradient at BN's output) with it.
pub fn input_grad_in_place<E: Real>(
    x: &[E],
    dz: &mut [E],
    dims: Dims,
    stats: &[ChannelStats<E>],
    gamma: &[E],
    sums: &[(f64, f64)],
) {
    let coefficients = input_grad_coefficients(dims, stats, gamma, sums);
    if dims.s == 1 {
        rows::input_grad(x, dims, stats, &coefficients, RowsOut::InPlace(dz));
        return;
    }
    dz.par_chunks_mut(dims.s)
        .with_min_len(planes_per_task(dims))
        .enumerate()
        .for_each(|(i, run)| {
            let xs = &x[i * dims.s..][..dims.s];
            input_grad_plane_in_place(xs, stats[i % dims.c], coefficients[i % dims.c], run);
        });
}

/// `buf`'s planes of `plane` values, grouped by channel: group `c` holds channel `c`'s planes
/// in sample order.
fn by_channel<T>(buf: &mut [T], plane: usize, dims: Dims) -> Vec<Vec<&mut [T]>> {
    let mut groups: Vec<Vec<&mut [T]>> = (0..dims.c).map(|_| Vec::with_capacity(dims.n)).collect();
    for (i, p) in buf.chunks_mut(plane).enumerate() {
        groups[i % dims.c].push(p);
    }
    groups
}

/// A slice that was just written in full, as initialised.
///
/// # Safety
/// Every element of `s` must have been written.
unsafe fn assume_init_mut<E>(s: &mut [MaybeUninit<E>]) -> &mut [E] {
    // SAFETY: the caller wrote every element; `MaybeUninit<E>` has `E`'s layout.
    unsafe { &mut *(s as *mut [MaybeUninit<E>] as *mut [E]) }
}

/// Whether [`train_forward`] and [`train_backward`] go channel by channel. That keeps a
/// channel's values in cache between its two passes, which pays where a channel is large
/// (W6's BatchNorm2d(64), 100k values per channel: 13.5 → 11.9 ms), but leaves few tasks to
/// balance over the threads: it cost 8–11% on LeNet-BN's 6- and 16-channel layers (criterion
/// `lenet_bn_layers`). Small channels gain nothing from the cache, and `(N, C)` input has its
/// own row passes.
fn channel_major(dims: Dims) -> bool {
    dims.s > 1 && dims.c >= 32 && dims.count() >= 32 * 1024
}

/// The training-mode forward, statistics included: `(stats, activations, pooled)` as
/// [`channel_stats`] then [`forward`] give them, bit for bit.
///
/// Channel-major: each task takes a channel's statistics and then writes its output planes
/// while its input (`N·S` values, 400 KB for W6's layer) is still in cache, where the two
/// separate passes read `x` from memory twice.
#[allow(clippy::type_complexity)]
pub fn train_forward<E: Real>(
    x: &[E],
    dims: Dims,
    plane: (usize, usize),
    eps: f64,
    gamma: &[E],
    beta: &[E],
    epilogue: Epilogue,
) -> (Vec<ChannelStats<E>>, Vec<E>, Option<Vec<E>>) {
    if !channel_major(dims) {
        let stats = channel_stats(x, dims, eps);
        let (activations, pooled) = forward(x, dims, plane, &stats, gamma, beta, epilogue);
        return (stats, activations, pooled);
    }
    let mut activations = uninit::<E>(dims.len());
    let k = epilogue.pool.window().unwrap_or(1);
    let pooled_plane = (plane.0 / k) * (plane.1 / k);
    let mut pooled = epilogue
        .pool
        .window()
        .map(|_| uninit::<E>(dims.n * dims.c * pooled_plane));
    let outputs = by_channel(&mut activations, dims.s, dims);
    let pooled_outputs: Vec<Option<Vec<&mut [MaybeUninit<E>]>>> = match pooled.as_mut() {
        Some(p) => by_channel(p, pooled_plane, dims)
            .into_iter()
            .map(Some)
            .collect(),
        None => (0..dims.c).map(|_| None).collect(),
    };
    let stats = outputs
        .into_par_iter()
        .zip(pooled_outputs)
        .enumerate()
        .map(|(c, (outs, pooled))| {
            let st = channel_stat(x, dims, c, eps);
            let scale = E::from_f64(gamma[c].to_f64() * st.inv_std.to_f64());
            let mut pooled = pooled.map(|p| p.into_iter());
            for (n, out) in outs.into_iter().enumerate() {
                let input = &x[(n * dims.c + c) * dims.s..][..dims.s];
                let pooled = pooled.as_mut().map(|p| p.next().expect("one per plane"));
                forward_plane(input, st, scale, beta[c], epilogue, plane, out, pooled);
            }
            st
        })
        .collect();
    // SAFETY: every plane of both buffers was filled above.
    unsafe {
        (
            stats,
            assume_init(activations),
            pooled.map(|p| assume_init(p)),
        )
    }
}

/// The training-mode backward: per channel `(Σ dz, Σ dz·x̂)` and, if `need_dx`, the input
/// gradient, as [`grad_sums`] and [`input_grad`] give them (or, with an epilogue, as
/// [`epilogue_grad_sums`] and [`input_grad_in_place`] do), bit for bit.
///
/// Channel-major, like [`train_forward`]: a channel's sums and then its input gradient, while
/// its `x` and `dy` are still in cache.
#[allow(clippy::too_many_arguments)]
pub fn train_backward<E: Real>(
    x: &[E],
    dout: &[E],
    activations: Option<&[E]>,
    dims: Dims,
    plane: (usize, usize),
    stats: &[ChannelStats<E>],
    gamma: &[E],
    epilogue: Epilogue,
    need_dx: bool,
) -> (Vec<(f64, f64)>, Option<Vec<E>>) {
    if !channel_major(dims) {
        return match activations {
            None => {
                let sums = grad_sums(x, dout, dims, stats);
                let dx = need_dx.then(|| input_grad(x, dout, dims, stats, gamma, &sums));
                (sums, dx)
            }
            Some(a) => {
                let mut dz = uninit::<E>(dims.len());
                let sums = epilogue_grad_sums(x, a, dout, dims, plane, stats, epilogue, &mut dz);
                // SAFETY: epilogue_grad_sums writes every element of dz.
                let mut dz = unsafe { assume_init(dz) };
                let dx = need_dx.then(|| {
                    input_grad_in_place(x, &mut dz, dims, stats, gamma, &sums);
                    dz
                });
                (sums, dx)
            }
        };
    }
    // Without an epilogue and without dx nothing is written: the sums alone.
    if activations.is_none() && !need_dx {
        return (grad_sums(x, dout, dims, stats), None);
    }
    let out_plane = dout.len() / (dims.n * dims.c);
    let mut dx = uninit::<E>(dims.len());
    let sums = by_channel(&mut dx, dims.s, dims)
        .into_par_iter()
        .enumerate()
        .map(|(c, outs)| {
            let st = stats[c];
            fn plane_of<E>(t: &[E], (n, c, channels): (usize, usize, usize), len: usize) -> &[E] {
                &t[(n * channels + c) * len..][..len]
            }
            let sums = match activations {
                None => {
                    let (s0, s1) = dy_sums(x, dout, dims, c, st);
                    let sums = (s0, s1 * st.inv_std.to_f64());
                    let coefficient = input_grad_coefficient(dims, st, gamma[c], sums);
                    for (n, out) in outs.into_iter().enumerate() {
                        let at = (n, c, dims.c);
                        let (xs, gs) = (plane_of(x, at, dims.s), plane_of(dout, at, dims.s));
                        input_grad_plane(xs, gs, st, coefficient, out);
                    }
                    sums
                }
                Some(a) => {
                    let mut sums = (0.0, 0.0);
                    let mut written = Vec::with_capacity(dims.n);
                    for (n, dz) in outs.into_iter().enumerate() {
                        let at = (n, c, dims.c);
                        let (xs, a) = (plane_of(x, at, dims.s), plane_of(a, at, dims.s));
                        let g = plane_of(dout, at, out_plane);
                        let (s0, s1) = epilogue_plane_sums(xs, a, g, st, plane, epilogue, dz);
                        sums = (sums.0 + s0, sums.1 + s1);
                        // SAFETY: epilogue_plane_sums wrote every element of dz.
                        written.push(unsafe { assume_init_mut(dz) });
                    }
                    let sums = (sums.0, sums.1 * st.inv_std.to_f64());
                    let coefficient = input_grad_coefficient(dims, st, gamma[c], sums);
                    if need_dx {
                        for (n, dz) in written.into_iter().enumerate() {
                            let xs = plane_of(x, (n, c, dims.c), dims.s);
                            input_grad_plane_in_place(xs, st, coefficient, dz);
                        }
                    }
                    sums
                }
            };
            sums
        })
        .collect();
    // SAFETY: every plane was written above (by the input gradient or the epilogue's).
    (sums, need_dx.then(|| unsafe { assume_init(dx) }))
}

/// What [`rows::input_grad`] reads and writes: `dy` into a new buffer `dx`, or the gradient
/// at BN's output, overwritten with the input gradient.
enum RowsOut<'a, E> {
    Fresh {
        dy: &'a [E],
        dx: &'a mut [MaybeUninit<E>],
    },
    InPlace(&'a mut [E]),
}

/// The passes for `(N, C)` input (one value per plane: the linear layers' BN). The per-plane
/// loops above would make one call per value there, 15× slower per value than on a conv
/// layer's planes; these take blocks of rows (examples), each channel's parameters in arrays.
mod rows {
    use super::*;

    /// Rows per rayon task, so that each task has a few thousand values to work on.
    fn per_task(dims: Dims) -> usize {
        (4096 / dims.c.max(1)).max(1)
    }

    /// Each channel's pivot and shifted mean, as arrays: `x - mean = (x - pivot) - shifted`.
    fn centering<E: Real>(stats: &[ChannelStats<E>]) -> (Vec<E>, Vec<E>) {
        stats.iter().map(|st| (st.pivot, st.shifted_mean)).unzip()
    }

    simd_fn! {
        /// `activation(scale · (x - mean) + beta)` over a block of rows.
        #[allow(clippy::too_many_arguments)]
        fn forward_block<E: Real>(
            x: &[E],
            pivot: &[E],
            shifted: &[E],
            scale: &[E],
            beta: &[E],
            activation: Activation,
            out: &mut [MaybeUninit<E>],
        ) {
            let c = pivot.len();
            for (row, out) in x.chunks_exact(c).zip(out.chunks_exact_mut(c)) {
                let z = row
                    .iter()
                    .zip(pivot.iter().zip(shifted))
                    .zip(scale.iter().zip(beta))
                    .map(|((&v, (&p, &m)), (&s, &b))| v.sub(p).sub(m).mul_add(s, b));
                match activation {
                    Activation::Identity => fill(out, z),
                    Activation::Sigmoid => fill(out, z.map(Real::sigmoid)),
                    Activation::Relu => fill(out, z.map(|z| Activation::Relu.apply(z))),
                };
            }
        }
    }

    pub(super) fn forward<E: Real>(
        x: &[E],
        dims: Dims,
        stats: &[ChannelStats<E>],
        gamma: &[E],
        beta: &[E],
        activation: Activation,
    ) -> Vec<E> {
        let (pivot, shifted) = centering(stats);
        let scale: Vec<E> = stats
            .iter()
            .zip(gamma)
            .map(|(st, g)| E::from_f64(g.to_f64() * st.inv_std.to_f64()))
            .collect();
        let mut out = uninit::<E>(dims.len());
        let block = per_task(dims) * dims.c;
        out.par_chunks_mut(block)
            .zip(x.par_chunks(block))
            .for_each(|(out, x)| forward_block(x, &pivot, &shifted, &scale, beta, activation, out));
        // SAFETY: every row was filled above.
        unsafe { assume_init(out) }
    }

    simd_fn! {
        /// Adds each channel's `Σ g` and `Σ g · (x - mean)` over a block of rows to `sums`.
        fn sums_block<E: Real>(
            x: &[E],
            g: &[E],
            pivot: &[E],
            shifted: &[E],
            sums: &mut [(f64, f64)],
        ) {
            let c = pivot.len();
            for (row, grads) in x.chunks_exact(c).zip(g.chunks_exact(c)) {
                let terms = row.iter().zip(grads).zip(pivot.iter().zip(shifted));
                for (sum, ((&v, &g), (&p, &m))) in sums.iter_mut().zip(terms) {
                    let g = g.to_f64();
                    *sum = (sum.0 + g, sum.1 + g * v.sub(p).sub(m).to_f64());
                }
            }
        }
    }

    /// What [`super::grad_sums`] returns, for BN's own output gradient `g`, or with
    /// `epilogue = Some((activations, epilogue, dz))` what [`super::epilogue_grad_sums`] does:
    /// `g` is then the epilogue's output gradient, taken back through the activation into `dz`.
    #[allow(clippy::type_complexity)]
    pub(super) fn grad_sums<E: Real>(
        x: &[E],
        g: &[E],
        dims: Dims,
        stats: &[ChannelStats<E>],
        epilogue: Option<(&[E], Epilogue, &mut [MaybeUninit<E>])>,
    ) -> Vec<(f64, f64)> {
        let (pivot, shifted) = centering(stats);
        let block = per_task(dims) * dims.c;
        let block_sums = |x: &[E], g: &[E]| {
            let mut sums = vec![(0.0, 0.0); dims.c];
            sums_block(x, g, &pivot, &shifted, &mut sums);
            sums
        };
        // Per block, then added in block order: the same sums on every run.
        let per_block: Vec<Vec<(f64, f64)>> = match epilogue {
            None => x
                .par_chunks(block)
                .zip(g.par_chunks(block))
                .map(|(x, g)| block_sums(x, g))
                .collect(),
            Some((activations, epilogue, dz)) => dz
                .par_chunks_mut(block)
                .zip(x.par_chunks(block))
                .zip(g.par_chunks(block).zip(activations.par_chunks(block)))
                .map(|((dz, x), (g, a))| {
                    // Without a pool the epilogue's backward is element-wise.
                    let dz = epilogue_grad_plane(a, g, (1, 1), epilogue, dz);
                    block_sums(x, dz)
                })
                .collect(),
        };
        let mut sums = vec![(0.0, 0.0); dims.c];
        for block in per_block {
            for (sum, (s0, s1)) in sums.iter_mut().zip(block) {
                *sum = (sum.0 + s0, sum.1 + s1);
            }
        }
        sums.iter()
            .zip(stats)
            .map(|(&(s0, s1), st)| (s0, s1 * st.inv_std.to_f64()))
            .collect()
    }

    simd_fn! {
        /// `dx = a·g + b·(x - mean) + k` over a block of rows.
        fn input_grad_block<E: Real>(
            x: &[E],
            pivot: &[E],
            shifted: &[E],
            coefficients: &[(E, E, E)],
            out: RowsOut<'_, E>,
        ) {
            let c = pivot.len();
            let per_channel = || pivot.iter().zip(shifted).zip(coefficients);
            let grad = |v: E, g: E, ((&p, &m), &(a, b, k)): ((&E, &E), &(E, E, E))| {
                g.mul_add(a, v.sub(p).sub(m).mul_add(b, k))
            };
            match out {
                RowsOut::Fresh { dy, dx } => {
                    let rows = x.chunks_exact(c).zip(dy.chunks_exact(c));
                    for ((row, gs), out) in rows.zip(dx.chunks_exact_mut(c)) {
                        let values = row.iter().zip(gs).zip(per_channel());
                        fill(out, values.map(|((&v, &g), ch)| grad(v, g, ch)));
                    }
                }
                RowsOut::InPlace(gs) => {
                    for (row, gs) in x.chunks_exact(c).zip(gs.chunks_exact_mut(c)) {
                        for ((&v, g), ch) in row.iter().zip(gs).zip(per_channel()) {
                            *g = grad(v, *g, ch);
                        }
                    }
                }
            }
        }
    }

    pub(super) fn input_grad<E: Real>(
        x: &[E],
        dims: Dims,
        stats: &[ChannelStats<E>],
        coefficients: &[(E, E, E)],
        out: RowsOut<'_, E>,
    ) {
        let (pivot, shifted) = centering(stats);
        let block = per_task(dims) * dims.c;
        let run = |x: &[E], out| input_grad_block(x, &pivot, &shifted, coefficients, out);
        match out {
            RowsOut::Fresh { dy, dx } => dx
                .par_chunks_mut(block)
                .zip(x.par_chunks(block).zip(dy.par_chunks(block)))
                .for_each(|(dx, (x, dy))| run(x, RowsOut::Fresh { dy, dx })),
            RowsOut::InPlace(gs) => gs
                .par_chunks_mut(block)
                .zip(x.par_chunks(block))
                .for_each(|(gs, x)| run(x, RowsOut::InPlace(gs))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The textbook two-pass formulas in float64, to check the one-pass kernels against.
    fn reference(x: &[f64], dims: Dims) -> Vec<(f64, f64)> {
        (0..dims.c)
            .map(|c| {
                let values: Vec<f64> = (0..dims.n)
                    .flat_map(|n| {
                        let start = (n * dims.c + c) * dims.s;
                        x[start..start + dims.s].to_vec()
                    })
                    .collect();
                let m = values.len() as f64;
                let mean = values.iter().sum::<f64>() / m;
                let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / m;
                (mean, var)
            })
            .collect()
    }

    #[test]
    fn one_pass_statistics_match_two_pass_ones_far_from_zero() {
        let dims = Dims { n: 3, c: 2, s: 37 };
        // 1000 + small values: the case a naive float32 sum gets wrong.
        let x64: Vec<f64> = (0..dims.len())
            .map(|i| 1000.0 + ((i * 7919 % 101) as f64 - 50.0) * 1e-4)
            .collect();
        let x32: Vec<f32> = x64.iter().map(|&v| v as f32).collect();
        let exact = reference(&x32.iter().map(|&v| v as f64).collect::<Vec<_>>(), dims);
        for (st, (mean, var)) in channel_stats(&x32, dims, 1e-5).iter().zip(exact) {
            assert!((st.mean - mean).abs() < 1e-9, "{} vs {mean}", st.mean);
            assert!((st.var - var).abs() < 1e-6 * var, "{} vs {var}", st.var);
        }
    }

    #[test]
    fn input_gradient_is_zero_for_a_constant_upstream_gradient() {
        // y's per-channel mean does not depend on x, so dy = const gives dx = 0.
        let dims = Dims { n: 4, c: 3, s: 5 };
        let x: Vec<f64> = (0..dims.len()).map(|i| (i as f64 * 0.37).sin()).collect();
        let dy = vec![0.25; dims.len()];
        let stats = channel_stats(&x, dims, 1e-5);
        let gamma = vec![1.5, -0.5, 2.0];
        let sums = grad_sums(&x, &dy, dims, &stats);
        let dx = input_grad(&x, &dy, dims, &stats, &gamma, &sums);
        assert!(dx.iter().all(|v| v.abs() < 1e-12), "{dx:?}");
    }

    /// The channel-major passes give the separate passes' results bit for bit, on a shape
    /// large enough to take them (32 channels of 32k values), with and without an epilogue.
    #[test]
    fn channel_major_passes_equal_the_separate_ones() {
        let dims = Dims {
            n: 8,
            c: 32,
            s: 64 * 64,
        };
        assert!(channel_major(dims));
        let plane = (64, 64);
        let value = |i: usize, k: f64| ((i as f64 * k).sin() * 3.0) as f32;
        let x: Vec<f32> = (0..dims.len()).map(|i| value(i, 0.37) + 50.0).collect();
        let gamma: Vec<f32> = (0..dims.c).map(|c| 0.5 + c as f32 * 0.1).collect();
        let beta: Vec<f32> = (0..dims.c).map(|c| c as f32 * 0.05 - 1.0).collect();
        for epilogue in [
            Epilogue::NONE,
            Epilogue {
                activation: Activation::Sigmoid,
                pool: Pool::Avg(2),
            },
            Epilogue {
                activation: Activation::Relu,
                pool: Pool::Max(2),
            },
        ] {
            let (stats, act, pooled) =
                train_forward(&x, dims, plane, 1e-5, &gamma, &beta, epilogue);
            let want_stats = channel_stats(&x, dims, 1e-5);
            let (want_act, want_pooled) =
                forward(&x, dims, plane, &want_stats, &gamma, &beta, epilogue);
            for (a, b) in stats.iter().zip(&want_stats) {
                assert_eq!((a.mean, a.var, a.inv_std), (b.mean, b.var, b.inv_std));
            }
            assert!(
                act == want_act && pooled == want_pooled,
                "{epilogue:?} forward"
            );

            let out_len = pooled.as_ref().map_or(dims.len(), Vec::len);
            let dout: Vec<f32> = (0..out_len).map(|i| value(i, 0.11)).collect();
            let saved = (!epilogue.is_none()).then_some(&act[..]);
            for need_dx in [true, false] {
                let (sums, dx) = train_backward(
                    &x, &dout, saved, dims, plane, &stats, &gamma, epilogue, need_dx,
                );
                let (want_sums, want_dx) = match saved {
                    None => {
                        let sums = grad_sums(&x, &dout, dims, &stats);
                        let dx = input_grad(&x, &dout, dims, &stats, &gamma, &sums);
                        (sums, dx)
                    }
                    Some(a) => {
                        let mut dz = uninit(dims.len());
                        let sums = epilogue_grad_sums(
                            &x, a, &dout, dims, plane, &stats, epilogue, &mut dz,
                        );
                        let mut dz = unsafe { assume_init(dz) };
                        input_grad_in_place(&x, &mut dz, dims, &stats, &gamma, &sums);
                        (sums, dz)
                    }
                };
                assert_eq!(sums, want_sums, "{epilogue:?} sums");
                assert_eq!(dx, need_dx.then_some(want_dx), "{epilogue:?} dx");
            }
        }
    }

    #[test]
    fn fast_exp_is_within_two_ulp_of_the_exact_value() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x <= 88.0 {
            let exact = (x as f64).exp();
            let ulp = (exact as f32).to_bits().abs_diff(exp_f32(x).to_bits());
            worst = worst.max(ulp as f64);
            x += 0.000_97;
        }
        assert!(worst <= 2.0, "{worst} ulp");
        assert!(exp_f32(f32::NAN).is_nan());
        assert_eq!(exp_f32(-1000.0), exp_f32(-87.0));
    }

    #[test]
    fn pooled_output_and_its_gradient_follow_the_first_maximum() {
        // One 2x4 plane, 2x2 max pool: windows [1, 5; 5, 2] and [3, 3; 0, 3].
        let a = [1.0f64, 5.0, 3.0, 3.0, 5.0, 2.0, 0.0, 3.0];
        let mut out = uninit(2);
        pool_plane(&a, (2, 4), Pool::Max(2), &mut out);
        let out: Vec<f64> = out.iter().map(|v| unsafe { v.assume_init() }).collect();
        assert_eq!(out, [5.0, 3.0]);
        let ep = Epilogue {
            activation: Activation::Identity,
            pool: Pool::Max(2),
        };
        let mut dz = uninit(8);
        let dz = epilogue_grad_plane(&a, &[10.0, 20.0], (2, 4), ep, &mut dz).to_vec();
        assert_eq!(dz, [0.0, 10.0, 20.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
    }
}
