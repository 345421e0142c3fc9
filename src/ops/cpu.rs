//! What every hand-written CPU kernel shares: the float types they run on ([`Real`]), a
//! vectorisable `exp`, run-time AVX2 dispatch (`simd_fn!`), the `(N, C, S)` view of a tensor
//! ([`Dims`]), uninitialised output buffers and float64 lane sums. No Burn types here: the ops
//! take plain slices.

use std::mem::MaybeUninit;

/// The float types the kernels run on.
pub trait Real: Copy + Send + Sync + PartialEq + PartialOrd + 'static {
    /// 0.
    const ZERO: Self;
    /// 1.
    const ONE: Self;
    /// The value as a float64 (exact).
    fn to_f64(self) -> f64;
    /// The float64 rounded to this type.
    fn from_f64(value: f64) -> Self;
    /// `self + other`.
    fn add(self, other: Self) -> Self;
    /// `self - other`.
    fn sub(self, other: Self) -> Self;
    /// `self * other`.
    fn mul(self, other: Self) -> Self;
    /// `self / other`.
    fn div(self, other: Self) -> Self;
    /// The square root (correctly rounded, as IEEE 754 has it).
    fn sqrt(self) -> Self;
    /// `self * a + b`, rounded twice (no FMA: results stay the same on CPUs without it).
    fn mul_add(self, a: Self, b: Self) -> Self;
    /// `1 / (1 + e^-self)`.
    fn sigmoid(self) -> Self;
    /// Whether the value is NaN.
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
            fn div(self, other: Self) -> Self {
                self / other
            }
            #[inline(always)]
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
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
    ($(#[$m:meta])* $vis:vis fn $name:ident<E: Real>($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        $vis fn $name<E: Real>($($arg: $ty),*) $(-> $ret)? {
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
pub(crate) use simd_fn;

/// The `(N, C, S)` view of an `(N, C, ...)` tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dims {
    /// The batch size, axis 0.
    pub n: usize,
    /// The channels, axis 1.
    pub c: usize,
    /// The product of the remaining axes (1 for `(N, C)` input).
    pub s: usize,
}

impl Dims {
    /// The view of a tensor of shape `shape` (rank at least 2).
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

    /// All values: `N · C · S`.
    pub fn len(&self) -> usize {
        self.n * self.c * self.s
    }

    /// Whether the tensor holds no values.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
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
pub(crate) fn fill<E: Copy>(
    out: &mut [MaybeUninit<E>],
    values: impl Iterator<Item = E>,
) -> &mut [E] {
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
pub(crate) const LANES: usize = 8;

/// `(Σ f(a_i, b_i), Σ g(a_i, b_i))` over two equally long runs, in float64 lanes kept in
/// registers.
#[inline(always)]
pub(crate) fn lane_sums<E: Real>(
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

/// `Σ a` in float64 lanes: [`product_sums`]' first sum, with nothing subtracted.
#[inline(always)]
pub(crate) fn sum<E: Real>(a: &[E]) -> f64 {
    product_sums(a, a, Centred::Shifted { pivot: E::ZERO }).0
}

/// Whether `E` is float32 and the CPU has AVX2: where the explicit float32 kernels
/// ([`product_sums`], BN's streamed stores) run, their slices cast to `f32`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) fn f32_with_avx2<E: 'static>() -> bool {
    std::any::TypeId::of::<E>() == std::any::TypeId::of::<f32>()
        && std::arch::is_x86_feature_detected!("avx2")
}

/// The two centred runs [`product_sums`] reduces.
#[derive(Clone, Copy)]
pub(crate) enum Centred<E> {
    /// `u = w = a - pivot` (`b` unused): the statistics' `Σ d` and `Σ d²`.
    Shifted { pivot: E },
    /// `u = b`, `w = (a - pivot) - shifted_mean`: BN's backward sums `Σ g` and `Σ g·(x - μ)`
    /// for `a = x`, `b = g`.
    Gradient { pivot: E, shifted_mean: E },
}

impl<E: Real> Centred<E> {
    /// The same runs' parameters in float32, for the float32 kernels (`E` is float32 there,
    /// so nothing is rounded).
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    fn as_f32(self) -> Centred<f32> {
        match self {
            Centred::Shifted { pivot } => Centred::Shifted {
                pivot: pivot.to_f64() as f32,
            },
            Centred::Gradient {
                pivot,
                shifted_mean,
            } => Centred::Gradient {
                pivot: pivot.to_f64() as f32,
                shifted_mean: shifted_mean.to_f64() as f32,
            },
        }
    }
}

/// `s` as float32.
///
/// # Safety
/// `E` must be `f32`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn as_f32<E>(s: &[E]) -> &[f32] {
    // SAFETY: E is f32, so the slice is one of f32 already.
    unsafe { std::slice::from_raw_parts(s.as_ptr().cast::<f32>(), s.len()) }
}

impl Centred<f32> {
    /// `(pivot, shifted mean, whether u is b)`: [`Centred::Shifted`] subtracts a mean of 0.
    #[inline(always)]
    fn parts(self) -> (f32, f32, bool) {
        match self {
            Centred::Shifted { pivot } => (pivot, 0.0, false),
            Centred::Gradient {
                pivot,
                shifted_mean,
            } => (pivot, shifted_mean, true),
        }
    }
}

/// `(Σ u, Σ u·w)` in float64 for the runs `u`, `w` of [`Centred`] over `a` and `b` (`u` and
/// `w` formed in `E`, then widened): [`lane_sums`] with those functions, bit for bit (the same
/// lanes, the same order, a product and a sum rounded apart). Float32 on a CPU with AVX2 runs
/// an explicit kernel: LLVM leaves the widening lane loop mostly scalar, and these are the
/// passes that read BN's inputs from memory.
#[inline(always)]
pub(crate) fn product_sums<E: Real>(a: &[E], b: &[E], centred: Centred<E>) -> (f64, f64) {
    // Short runs (ResNet-18's 2×2 and 4×4 maps) stay in the inlined loop: the kernel's call
    // and its lanes' final sum would outweigh them.
    #[cfg(target_arch = "x86_64")]
    if a.len() >= 8 * LANES && f32_with_avx2::<E>() {
        // SAFETY: E is f32 (same type, same layout), and the CPU has AVX2 (and AVX-512F
        // where that kernel runs).
        unsafe {
            let (a, b, centred) = (as_f32(a), as_f32(b), centred.as_f32());
            if std::arch::is_x86_feature_detected!("avx512f") {
                return product_sums_f32_avx512([a], [b], centred)[0];
            }
            return product_sums_f32_avx2([a], [b], centred)[0];
        }
    }
    match centred {
        Centred::Shifted { pivot } => {
            let d = |v: E| v.sub(pivot).to_f64();
            lane_sums(a, a, |v, _| d(v), |v, _| d(v) * d(v))
        }
        Centred::Gradient {
            pivot,
            shifted_mean,
        } => lane_sums(
            a,
            b,
            |_, g| g.to_f64(),
            |v, g| g.to_f64() * v.sub(pivot).sub(shifted_mean).to_f64(),
        ),
    }
}

/// [`product_sums`] on float32 with AVX2, over `K` equally long runs side by side: eight
/// values a step, their `u` and `w` formed in float32, widened in two halves of four, and
/// summed into each run's own eight float64 lanes as [`lane_sums`] sums them (lanes 0–3 the
/// low half); the tail goes to the first lanes, as there.
///
/// # Safety
/// The CPU must have AVX2; every `a[k]` must be as long as `a[0]`, and `b[k]` at least as
/// long for [`Centred::Gradient`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn product_sums_f32_avx2<const K: usize>(
    a: [&[f32]; K],
    b: [&[f32]; K],
    centred: Centred<f32>,
) -> [(f64, f64); K] {
    use std::arch::x86_64::*;
    let (pivot, shifted_mean, gradient) = centred.parts();
    let len = a[0].len();
    for k in 0..K {
        assert!(a[k].len() == len && (!gradient || b[k].len() >= len));
    }
    let steps = len / LANES;
    let (vp, vm) = (_mm256_set1_ps(pivot), _mm256_set1_ps(shifted_mean));
    let (mut su_lo, mut su_hi) = ([_mm256_setzero_pd(); K], [_mm256_setzero_pd(); K]);
    let (mut sw_lo, mut sw_hi) = ([_mm256_setzero_pd(); K], [_mm256_setzero_pd(); K]);
    for i in 0..steps {
        for k in 0..K {
            // SAFETY: i·8 + 8 ≤ len, the length of a[k] (and of b[k] when read).
            let va = _mm256_loadu_ps(a[k].as_ptr().add(i * LANES));
            let d = _mm256_sub_ps(va, vp);
            let (u, w) = match gradient {
                true => (
                    _mm256_loadu_ps(b[k].as_ptr().add(i * LANES)),
                    _mm256_sub_ps(d, vm),
                ),
                false => (d, d),
            };
            let (u_lo, u_hi) = (
                _mm256_cvtps_pd(_mm256_castps256_ps128(u)),
                _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(u)),
            );
            let (w_lo, w_hi) = (
                _mm256_cvtps_pd(_mm256_castps256_ps128(w)),
                _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(w)),
            );
            su_lo[k] = _mm256_add_pd(su_lo[k], u_lo);
            su_hi[k] = _mm256_add_pd(su_hi[k], u_hi);
            sw_lo[k] = _mm256_add_pd(sw_lo[k], _mm256_mul_pd(u_lo, w_lo));
            sw_hi[k] = _mm256_add_pd(sw_hi[k], _mm256_mul_pd(u_hi, w_hi));
        }
    }
    let mut sums = [(0.0, 0.0); K];
    for k in 0..K {
        let (mut su, mut sw) = ([0.0f64; LANES], [0.0f64; LANES]);
        _mm256_storeu_pd(su.as_mut_ptr(), su_lo[k]);
        _mm256_storeu_pd(su.as_mut_ptr().add(4), su_hi[k]);
        _mm256_storeu_pd(sw.as_mut_ptr(), sw_lo[k]);
        _mm256_storeu_pd(sw.as_mut_ptr().add(4), sw_hi[k]);
        sums[k] = finish_lanes(a[k], b[k], steps * LANES, centred, (su, sw));
    }
    sums
}

/// The kernels' last step: the values from `from` on (fewer than [`LANES`]) added to the
/// first lanes, as [`lane_sums`] adds its tail, then each sum's lanes in order.
#[inline(always)]
fn finish_lanes(
    a: &[f32],
    b: &[f32],
    from: usize,
    centred: Centred<f32>,
    (mut su, mut sw): ([f64; LANES], [f64; LANES]),
) -> (f64, f64) {
    let (pivot, shifted_mean, gradient) = centred.parts();
    for (lane, i) in (from..a.len()).enumerate() {
        let d = a[i] - pivot;
        let (u, w) = match gradient {
            true => (b[i] as f64, (d - shifted_mean) as f64),
            false => (d as f64, d as f64),
        };
        su[lane] += u;
        sw[lane] += u * w;
    }
    (su.iter().sum(), sw.iter().sum())
}

/// [`product_sums_f32_avx2`] with AVX-512 over `K` equally long runs side by side: the same
/// eight float64 lanes per run, now one register per sum, so each step widens eight values in
/// one conversion, where AVX2 takes two halves and an extract (the conversions bound the AVX2
/// kernel). Each run's sums are bit for bit those of [`lane_sums`] over it alone; the runs
/// only share the loop, so that their reads from memory are in flight together.
///
/// # Safety
/// The CPU must have AVX-512F; every `a[k]` must be as long as `a[0]`, and `b[k]` at least as
/// long for [`Centred::Gradient`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn product_sums_f32_avx512<const K: usize>(
    a: [&[f32]; K],
    b: [&[f32]; K],
    centred: Centred<f32>,
) -> [(f64, f64); K] {
    use std::arch::x86_64::*;
    let (pivot, shifted_mean, gradient) = centred.parts();
    let len = a[0].len();
    for k in 0..K {
        assert!(a[k].len() == len && (!gradient || b[k].len() >= len));
    }
    let steps = len / LANES;
    let (vp, vm) = (_mm256_set1_ps(pivot), _mm256_set1_ps(shifted_mean));
    let (mut su, mut sw) = ([_mm512_setzero_pd(); K], [_mm512_setzero_pd(); K]);
    for i in 0..steps {
        for k in 0..K {
            // SAFETY: i·8 + 8 ≤ len, the length of a[k] (and of b[k] when read).
            let d = _mm256_sub_ps(_mm256_loadu_ps(a[k].as_ptr().add(i * LANES)), vp);
            let (u, w) = match gradient {
                true => {
                    let u = _mm512_cvtps_pd(_mm256_loadu_ps(b[k].as_ptr().add(i * LANES)));
                    (u, _mm512_cvtps_pd(_mm256_sub_ps(d, vm)))
                }
                false => {
                    let d = _mm512_cvtps_pd(d);
                    (d, d)
                }
            };
            su[k] = _mm512_add_pd(su[k], u);
            sw[k] = _mm512_add_pd(sw[k], _mm512_mul_pd(u, w));
        }
    }
    // A loop, not a closure over the registers: a closure takes them by reference, and the
    // loop above then stores them to memory at every step.
    let mut sums = [(0.0, 0.0); K];
    for k in 0..K {
        let (mut lanes_u, mut lanes_w) = ([0.0f64; LANES], [0.0f64; LANES]);
        _mm512_storeu_pd(lanes_u.as_mut_ptr(), su[k]);
        _mm512_storeu_pd(lanes_w.as_mut_ptr(), sw[k]);
        sums[k] = finish_lanes(a[k], b[k], steps * LANES, centred, (lanes_u, lanes_w));
    }
    sums
}

/// Per item `j` of `sums`, adds `Σ_n product_sums(a, b, centred)` over the images `n` in
/// `0..images`, in image order, where `run(n, j)` gives image `n`'s `(a, b, centred)` (the
/// same `centred` and run length for every image). Each run's sums and the order they are
/// added in are those of one [`product_sums`] call per run, bit for bit; on float32 the runs
/// of a few images (four with AVX-512, two with AVX2, as many as the registers hold), an image
/// apart in memory, go through one kernel, so that the core reads several streams at once
/// where a lone run's reads wait on memory.
#[inline(always)]
pub(crate) fn sums_over_images<'a, E: Real>(
    images: usize,
    sums: &mut [(f64, f64)],
    run: impl Fn(usize, usize) -> (&'a [E], &'a [E], Centred<E>),
) {
    #[cfg(target_arch = "x86_64")]
    if f32_with_avx2::<E>() {
        return match std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F.
            true => sums_through::<_, 4>(images, sums, &run, |a, b, c| unsafe {
                product_sums_f32_avx512(a, b, c)
            }),
            // SAFETY: the CPU has AVX2.
            false => sums_through::<_, 2>(images, sums, &run, |a, b, c| unsafe {
                product_sums_f32_avx2(a, b, c)
            }),
        };
    }
    add_runs_from(0, images, sums, &run);
}

#[inline(always)]
fn add_sums(sum: &mut (f64, f64), (s, q): (f64, f64)) {
    *sum = (sum.0 + s, sum.1 + q);
}

/// [`sums_over_images`]' images from `first` on, one run at a time.
#[inline(always)]
fn add_runs_from<'a, E: Real>(
    first: usize,
    images: usize,
    sums: &mut [(f64, f64)],
    run: &impl Fn(usize, usize) -> (&'a [E], &'a [E], Centred<E>),
) {
    for n in first..images {
        for (j, sum) in sums.iter_mut().enumerate() {
            let (a, b, centred) = run(n, j);
            add_sums(sum, product_sums(a, b, centred));
        }
    }
}

/// [`sums_over_images`] on float32: the images `K` at a time through `kernel` as far as whole
/// groups of `K` go, the rest one by one. Short runs (ResNet-18's small maps) all go one by
/// one, as [`product_sums`] takes them.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn sums_through<'a, E: Real, const K: usize>(
    images: usize,
    sums: &mut [(f64, f64)],
    run: &impl Fn(usize, usize) -> (&'a [E], &'a [E], Centred<E>),
    kernel: impl Fn([&[f32]; K], [&[f32]; K], Centred<f32>) -> [(f64, f64); K],
) {
    let mut first = 0;
    let long = images > 0 && !sums.is_empty() && run(0, 0).0.len() >= 8 * LANES;
    while long && first + K <= images {
        for (j, sum) in sums.iter_mut().enumerate() {
            let runs: [_; K] = std::array::from_fn(|k| run(first + k, j));
            // SAFETY: E is f32 (sums_over_images checked); the runs are equally long.
            let (a, b) = unsafe { (runs.map(|r| as_f32(r.0)), runs.map(|r| as_f32(r.1))) };
            for sums in kernel(a, b, runs[0].2.as_f32()) {
                add_sums(sum, sums);
            }
        }
        first += K;
    }
    add_runs_from(first, images, sums, run);
}

/// Planes per rayon task, so that each task has a few thousand values to work on.
pub(crate) fn planes_per_task(dims: Dims) -> usize {
    (4096 / dims.s.max(1)).max(1)
}

/// How many neighbouring channels a task of BN's per-channel passes takes: enough that each
/// image's runs of them together span 24 KB (a lone channel's run in W6 is 3 KB, an image
/// apart from the next, and its reads wait on memory), but few enough to leave each thread
/// four tasks to balance.
pub(crate) fn channels_per_task<E>(dims: Dims) -> usize {
    let run = dims.s * std::mem::size_of::<E>();
    let wanted = (24usize << 10).div_ceil(run.max(1)).next_power_of_two();
    let most = dims.c / (4 * rayon::current_num_threads());
    wanted.min(most).max(1)
}

/// The size of the CPU's last-level cache as Linux reports it (the highest-level cache of CPU
/// 0 in sysfs), or 32 MB where it cannot be read.
pub(crate) fn last_level_cache_bytes() -> usize {
    const FALLBACK: usize = 32 << 20;
    let dir = std::path::Path::new("/sys/devices/system/cpu/cpu0/cache");
    let sizes = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let read = |name: &str| std::fs::read_to_string(entry.path().join(name)).ok();
            let level: usize = read("level")?.trim().parse().ok()?;
            let size = read("size")?;
            let size = size.trim();
            let bytes = match size.strip_suffix('K') {
                Some(k) => k.parse::<usize>().ok()? << 10,
                None => match size.strip_suffix('M') {
                    Some(m) => m.parse::<usize>().ok()? << 20,
                    None => size.parse().ok()?,
                },
            };
            Some((level, bytes))
        });
    sizes.max().map_or(FALLBACK, |(_, bytes)| bytes)
}

/// A slice that was just written in full, as initialised.
///
/// # Safety
/// Every element of `s` must have been written.
pub(crate) unsafe fn assume_init_mut<E>(s: &mut [MaybeUninit<E>]) -> &mut [E] {
    // SAFETY: the caller wrote every element; `MaybeUninit<E>` has `E`'s layout.
    unsafe { &mut *(s as *mut [MaybeUninit<E>] as *mut [E]) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The AVX2 and AVX-512 kernels against the lane loop they replace, on runs with and
    /// without a tail, values far from 0 (where widening after the subtraction matters) and
    /// both sums.
    #[test]
    fn product_sums_equal_the_lane_loop_bit_for_bit() {
        for len in [0, 1, 5, 8, 13, 64, 787] {
            let a: Vec<f32> = (0..len)
                .map(|i| 1000.0 + ((i * 37) % 101) as f32 * 0.013)
                .collect();
            let b: Vec<f32> = (0..len)
                .map(|i| ((i * 53) % 97) as f32 * 0.021 - 1.0)
                .collect();
            let (pivot, shifted_mean) = (1000.25f32, 0.37f32);
            let d = |v: f32| (v - pivot) as f64;
            let shifted = lane_sums(&a, &a, |v, _| d(v), |v, _| d(v) * d(v));
            assert_eq!(
                product_sums(&a, &a, Centred::Shifted { pivot }),
                shifted,
                "{len}"
            );
            let gradient = lane_sums(
                &a,
                &b,
                |_, g| g as f64,
                |v, g| g as f64 * ((v - pivot) - shifted_mean) as f64,
            );
            let centred = Centred::Gradient {
                pivot,
                shifted_mean,
            };
            assert_eq!(product_sums(&a, &b, centred), gradient, "{len}");
            // Each kernel this CPU can run, whichever product_sums picks.
            #[cfg(target_arch = "x86_64")]
            for (has, kernel) in [
                (
                    std::arch::is_x86_feature_detected!("avx2"),
                    (|a, b, c| unsafe { product_sums_f32_avx2([a], [b], c)[0] })
                        as unsafe fn(&[f32], &[f32], Centred<f32>) -> _,
                ),
                (
                    std::arch::is_x86_feature_detected!("avx512f"),
                    |a, b, c| unsafe { product_sums_f32_avx512([a], [b], c)[0] },
                ),
            ] {
                if has {
                    // SAFETY: the CPU has the kernel's features; b is as long as a.
                    let run = |c| unsafe { kernel(&a, &b, c) };
                    let shifted_here = run(Centred::Shifted { pivot });
                    assert_eq!((shifted_here, run(centred)), (shifted, gradient), "{len}");
                }
            }
        }
    }

    /// Runs of several images through one kernel add up as one lane loop per run does, in
    /// image order, bit for bit: seven images (groups of four or two, and the rest alone),
    /// runs long enough for the kernels (with a tail) and too short for them, both kinds of
    /// sums, through each kernel this CPU has.
    #[test]
    fn sums_over_images_equal_one_lane_loop_per_run() {
        let images = 7;
        for len in [13, 787] {
            let a: Vec<f32> = (0..images * len)
                .map(|i| 1000.0 + ((i * 37) % 101) as f32 * 0.013)
                .collect();
            let b: Vec<f32> = (0..images * len)
                .map(|i| ((i * 53) % 97) as f32 * 0.021 - 1.0)
                .collect();
            // Two items: the second reads its runs shifted by one value.
            let run = |t: &'static [f32], n: usize, j: usize| &t[n * len + j..][..len - 1];
            let (a, b): (&'static [f32], &'static [f32]) = (a.leak(), b.leak());
            let (pivot, shifted_mean) = (1000.25f32, 0.37f32);
            let d = |v: f32| (v - pivot) as f64;
            for gradient in [false, true] {
                let centred = match gradient {
                    false => Centred::Shifted { pivot },
                    true => Centred::Gradient {
                        pivot,
                        shifted_mean,
                    },
                };
                let mut got = [(0.0, 0.0); 2];
                sums_over_images(images, &mut got, |n, j| {
                    (run(a, n, j), run(b, n, j), centred)
                });
                let mut want = [(0.0, 0.0); 2];
                for n in 0..images {
                    for (j, sum) in want.iter_mut().enumerate() {
                        let (x, g) = (run(a, n, j), run(b, n, j));
                        let (s, q) = match gradient {
                            false => lane_sums(x, x, |v, _| d(v), |v, _| d(v) * d(v)),
                            true => lane_sums(
                                x,
                                g,
                                |_, g| g as f64,
                                |v, g| g as f64 * ((v - pivot) - shifted_mean) as f64,
                            ),
                        };
                        add_sums(sum, (s, q));
                    }
                }
                assert_eq!(got, want, "runs of {len}, gradient {gradient}");
                // Each kernel this CPU can run, whichever sums_over_images picks.
                #[cfg(target_arch = "x86_64")]
                {
                    let runs = |n, j| (run(a, n, j), run(b, n, j), centred);
                    if std::arch::is_x86_feature_detected!("avx2") {
                        let mut two = [(0.0, 0.0); 2];
                        // SAFETY: the CPU has AVX2.
                        sums_through(images, &mut two, &runs, |a, b, c| unsafe {
                            product_sums_f32_avx2::<2>(a, b, c)
                        });
                        assert_eq!(two, want, "AVX2, runs of {len}, gradient {gradient}");
                    }
                    if std::arch::is_x86_feature_detected!("avx512f") {
                        let mut four = [(0.0, 0.0); 2];
                        // SAFETY: the CPU has AVX-512F.
                        sums_through(images, &mut four, &runs, |a, b, c| unsafe {
                            product_sums_f32_avx512::<4>(a, b, c)
                        });
                        assert_eq!(four, want, "AVX-512, runs of {len}, gradient {gradient}");
                    }
                }
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
}
