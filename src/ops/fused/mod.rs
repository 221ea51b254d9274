//! Fused CPU kernels, each a candle custom op that carries its own backward pass.
//!
//! Every kernel here has a composed twin in `ops::composed` that is its test oracle (values and
//! gradients, `ops::tests`), and runs in f32 or f64 (f64 for the finite-difference checks of the
//! model). Work is split over rows, or (sequence, head) pairs for attention, on rayon's pool; the
//! split never depends on the number of threads and reductions are summed in a fixed order, so
//! results are bit-for-bit repeatable on any machine.
//!
//! Inner loops are plain Rust written so that LLVM vectorises them (fixed-width lane arrays
//! instead of float reductions, no calls in loops). The crate is built for baseline x86-64, so
//! each hot loop is also compiled for AVX2+FMA and AVX-512 and picked at run time
//! ([`simd_level`]); nothing needs `-C target-cpu`.

pub(crate) mod attention;
pub mod bf16_gemm;
mod cross_entropy;
mod linear;
mod rms_norm;
mod rope;
mod shell;
mod swiglu;
mod thinking;

pub use attention::{attention_varlen_limited, causal_attention_varlen, causal_sdpa};
pub use cross_entropy::cross_entropy;
pub use linear::{linear, FEW_ROWS};
pub use rms_norm::rms_norm;
pub use rope::apply_rope;
pub use swiglu::swiglu;
pub use thinking::{gather_rows, routed_update, router_logits, scale_columns};

use candle_core::{bail, CpuStorage, DType, Device, Layout, Result, Storage, Tensor, WithDType};
use std::cell::Cell;
use std::ops::{Add, AddAssign, Div, Mul, MulAssign, Neg, Sub, SubAssign};
use std::sync::OnceLock;

/// Whether the fused kernels handle tensors of this dtype on this device (f32/f64 on CPU).
pub fn supports(t: &Tensor) -> bool {
    matches!(t.device(), Device::Cpu) && matches!(t.dtype(), DType::F32 | DType::F64)
}

// ---------------------------------------------------------------------------------------------
// Element type

/// The float types the kernels run in. `exp` is a vectorisable polynomial for f32 (within 2 ulp
/// of libm's); f64, used only by gradient checks, keeps libm for accuracy.
pub(crate) trait Real:
    WithDType
    + Default
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + AddAssign
    + SubAssign
    + MulAssign
    + PartialOrd
{
    const ZERO: Self;
    const ONE: Self;
    const NEG_INF: Self;
    fn exp(self) -> Self;
    fn ln(self) -> Self;
    fn sqrt(self) -> Self;
    fn of(v: f64) -> Self;
    /// self * a + b, rounded once: only for code compiled with FMA (see `multiversion!`),
    /// elsewhere it is a slow library call.
    fn fma(self, a: Self, b: Self) -> Self;
    /// Larger of two values; written as a comparison so that it vectorises.
    #[inline(always)]
    fn maxv(self, o: Self) -> Self {
        if o > self {
            o
        } else {
            self
        }
    }
}

impl Real for f32 {
    const ZERO: f32 = 0.0;
    const ONE: f32 = 1.0;
    const NEG_INF: f32 = f32::NEG_INFINITY;
    #[inline(always)]
    fn exp(self) -> f32 {
        exp_f32(self)
    }
    #[inline(always)]
    fn ln(self) -> f32 {
        f32::ln(self)
    }
    #[inline(always)]
    fn sqrt(self) -> f32 {
        f32::sqrt(self)
    }
    #[inline(always)]
    fn of(v: f64) -> f32 {
        v as f32
    }
    #[inline(always)]
    fn fma(self, a: f32, b: f32) -> f32 {
        self.mul_add(a, b)
    }
}

impl Real for f64 {
    const ZERO: f64 = 0.0;
    const ONE: f64 = 1.0;
    const NEG_INF: f64 = f64::NEG_INFINITY;
    #[inline(always)]
    fn exp(self) -> f64 {
        f64::exp(self)
    }
    #[inline(always)]
    fn ln(self) -> f64 {
        f64::ln(self)
    }
    #[inline(always)]
    fn sqrt(self) -> f64 {
        f64::sqrt(self)
    }
    #[inline(always)]
    fn of(v: f64) -> f64 {
        v
    }
    #[inline(always)]
    fn fma(self, a: f64, b: f64) -> f64 {
        self.mul_add(a, b)
    }
}

/// e^x in f32 without a libm call, so loops over it vectorise (Cephes `expf`: e^x = 2^n e^r,
/// n = round(x / ln 2), |r| <= ln2 / 2, degree-6 polynomial; relative error < 2e-7).
/// Inputs are clamped to [-87.3, 88.37]: below, about 1e-38 rather than 0 (callers mask exact
/// zeros themselves); above, about 2.4e38 rather than inf. NaN stays NaN.
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 * 2^23: adding it rounds to an integer held in the low mantissa bits.
    const MAGIC: f32 = 12_582_912.0;
    let x = if x < -87.336_55 { -87.336_55 } else { x };
    let x = if x > 88.37 { 88.37 } else { x };
    let t = x * LOG2E + MAGIC;
    let n = t - MAGIC;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_1e-4_f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    // 2^n: the integer n sits in t's low mantissa bits as n + 0x400000 above 0x4B000000.
    let bits = t.to_bits().wrapping_sub(0x4B40_0000).wrapping_add(127) << 23;
    e * f32::from_bits(bits)
}

// ---------------------------------------------------------------------------------------------
// Lane-parallel helpers: 16 independent accumulators, so LLVM vectorises without reassociating.

pub(crate) const LANES: usize = 16;

/// The lanes summed pairwise (halves added until one is left); N a power of two.
#[inline(always)]
pub(crate) fn hsum<T: Real, const N: usize>(acc: [T; N]) -> T {
    let mut a = acc;
    let mut w = N / 2;
    while w > 0 {
        for i in 0..w {
            a[i] += a[i + w];
        }
        w /= 2;
    }
    a[0]
}

/// sum_i a_i b_i.
#[inline(always)]
pub(crate) fn dot<T: Real>(a: &[T], b: &[T]) -> T {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [T::ZERO; LANES];
    let mut ca = a.chunks_exact(LANES);
    let mut cb = b.chunks_exact(LANES);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    for (l, (&x, &y)) in ca.remainder().iter().zip(cb.remainder()).enumerate() {
        acc[l] += x * y;
    }
    hsum(acc)
}

/// sum_i a_i b_i c_i.
#[inline(always)]
pub(crate) fn dot3<T: Real>(a: &[T], b: &[T], c: &[T]) -> T {
    let n = a.len().min(b.len()).min(c.len());
    let (a, b, c) = (&a[..n], &b[..n], &c[..n]);
    let mut acc = [T::ZERO; LANES];
    let (mut ca, mut cb, mut cc) = (a.chunks_exact(LANES), b.chunks_exact(LANES), c.chunks_exact(LANES));
    for ((x, y), z) in (&mut ca).zip(&mut cb).zip(&mut cc) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l] * z[l];
        }
    }
    for (l, ((&x, &y), &z)) in ca.remainder().iter().zip(cb.remainder()).zip(cc.remainder()).enumerate() {
        acc[l] += x * y * z;
    }
    hsum(acc)
}

/// sum_i a_i.
#[inline(always)]
pub(crate) fn sum<T: Real>(a: &[T]) -> T {
    let mut acc = [T::ZERO; LANES];
    let mut ca = a.chunks_exact(LANES);
    for x in &mut ca {
        for l in 0..LANES {
            acc[l] += x[l];
        }
    }
    for (l, &x) in ca.remainder().iter().enumerate() {
        acc[l] += x;
    }
    hsum(acc)
}

/// max_i a_i (-inf for an empty slice).
#[inline(always)]
pub(crate) fn max<T: Real>(a: &[T]) -> T {
    let mut acc = [T::NEG_INF; LANES];
    let mut ca = a.chunks_exact(LANES);
    for x in &mut ca {
        for l in 0..LANES {
            acc[l] = acc[l].maxv(x[l]);
        }
    }
    for (l, &x) in ca.remainder().iter().enumerate() {
        acc[l] = acc[l].maxv(x);
    }
    let mut m = T::NEG_INF;
    for v in acc {
        m = m.maxv(v);
    }
    m
}

/// y += alpha * x (fused multiply-add where `FMA`).
#[inline(always)]
pub(crate) fn axpy<T: Real, const FMA: bool>(alpha: T, x: &[T], y: &mut [T]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y = madd::<T, FMA>(alpha, x, *y);
    }
}

/// a * b + c, as one fused multiply-add where `FMA` (code compiled for AVX2+FMA or AVX-512).
#[inline(always)]
pub(crate) fn madd<T: Real, const FMA: bool>(a: T, b: T, c: T) -> T {
    if FMA {
        a.fma(b, c)
    } else {
        a * b + c
    }
}

// ---------------------------------------------------------------------------------------------
// Run-time SIMD dispatch

/// The instruction sets a hot loop is compiled for; the best one the CPU has is used.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Simd {
    /// Baseline x86-64 (SSE2) or any other architecture.
    Portable,
    /// AVX2 + FMA.
    Avx2,
    /// AVX-512 F/BW/DQ/VL.
    Avx512,
}

fn detected_simd() -> Simd {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512dq")
            && std::arch::is_x86_feature_detected!("avx512vl")
        {
            return Simd::Avx512;
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            return Simd::Avx2;
        }
    }
    Simd::Portable
}

thread_local! {
    static SIMD_CAP: Cell<Option<Simd>> = const { Cell::new(None) };
}

/// The level kernels use: the CPU's best, capped by `ITT_SIMD=portable|avx2` (to measure or
/// test the fallbacks on a machine that has more) and by [`with_simd_cap`] on this thread.
pub fn simd_level() -> Simd {
    static LEVEL: OnceLock<Simd> = OnceLock::new();
    let level = *LEVEL.get_or_init(|| {
        let cpu = detected_simd();
        match std::env::var("ITT_SIMD").ok().as_deref() {
            Some("portable") => Simd::Portable,
            Some("avx2") => cpu.min(Simd::Avx2),
            _ => cpu,
        }
    });
    match SIMD_CAP.with(|c| c.get()) {
        Some(cap) => level.min(cap),
        None => level,
    }
}

/// Run `f` with kernels launched from this thread limited to `cap` (tests of the fallbacks).
pub fn with_simd_cap<R>(cap: Simd, f: impl FnOnce() -> R) -> R {
    let old = SIMD_CAP.with(|c| c.replace(Some(cap)));
    let r = f();
    SIMD_CAP.with(|c| c.set(old));
    r
}

/// Compile a generic hot function three times (baseline, AVX2+FMA, AVX-512) and add a leading
/// `simd: Simd` argument that picks one. The body is `#[inline(always)]` so that everything it
/// calls is compiled for the caller's instruction set; its `const FMA: bool` says whether fused
/// multiply-adds are available (Rust never contracts `a * b + c` on its own).
macro_rules! multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident<$T:ident: Real, const $F:ident: bool>($($a:ident: $t:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name<$T: Real>(simd: $crate::ops::fused::Simd, $($a: $t),*) $(-> $ret)? {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn imp<$T: Real, const $F: bool>($($a: $t),*) $(-> $ret)? $body

            /// # Safety
            /// The CPU has AVX-512 F/BW/DQ/VL (`Simd::Avx512`).
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
            #[allow(clippy::too_many_arguments)]
            unsafe fn avx512<$T: Real>($($a: $t),*) $(-> $ret)? {
                imp::<$T, true>($($a),*)
            }

            /// # Safety
            /// The CPU has AVX2 and FMA (`Simd::Avx2` or better).
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            #[allow(clippy::too_many_arguments)]
            unsafe fn avx2<$T: Real>($($a: $t),*) $(-> $ret)? {
                imp::<$T, true>($($a),*)
            }

            match simd {
                // SAFETY: `simd_level` only reports instruction sets the CPU has.
                #[cfg(target_arch = "x86_64")]
                $crate::ops::fused::Simd::Avx512 => unsafe { avx512::<$T>($($a),*) },
                #[cfg(target_arch = "x86_64")]
                $crate::ops::fused::Simd::Avx2 => unsafe { avx2::<$T>($($a),*) },
                _ => imp::<$T, false>($($a),*),
            }
        }
    };
}
pub(crate) use multiversion;

// ---------------------------------------------------------------------------------------------
// Storage access and parallel loops

/// The contiguous data of a custom op's argument.
pub(crate) fn cpu_data<'a, T: Real>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    let data = T::cpu_storage_as_slice(s)?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => bail!("fused kernel given a non-contiguous tensor (internal error)"),
    }
}

/// The contiguous data behind `Tensor::storage_and_layout`, for backward passes.
pub(crate) fn tensor_data<'a, T: Real>(s: &'a Storage, l: &Layout) -> Result<&'a [T]> {
    match s {
        Storage::Cpu(c) => cpu_data(c, l),
        _ => bail!("fused kernels run on CPU tensors only"),
    }
}

/// Borrow a contiguous tensor's data as `&[T]` for the duration of `f`.
pub(crate) fn with_data<T: Real, R>(t: &Tensor, f: impl FnOnce(&[T]) -> Result<R>) -> Result<R> {
    let t = t.contiguous()?;
    let (s, l) = t.storage_and_layout();
    f(tensor_data::<T>(&s, l)?)
}

/// A `*mut T` that work items on other threads may write through, each to its own part.
#[derive(Clone, Copy)]
pub(crate) struct SharedMut<T>(pub *mut T);
// SAFETY: users guarantee that concurrent work items write disjoint elements (each kernel
// states which ones it owns) and that the buffer outlives the parallel loop.
unsafe impl<T: Send> Send for SharedMut<T> {}
unsafe impl<T: Send> Sync for SharedMut<T> {}

impl<T> SharedMut<T> {
    /// # Safety
    /// `off + len` must lie in the buffer and no other thread may touch those elements now.
    #[inline(always)]
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slice(&self, off: usize, len: usize) -> &mut [T] {
        // SAFETY: the range lies in the buffer and no one else touches it (the contract).
        unsafe { std::slice::from_raw_parts_mut(self.0.add(off), len) }
    }

    /// The element at `off`, for kernels that write through strided raw pointers.
    ///
    /// # Safety
    /// As [`SharedMut::slice`] for every element written through the pointer.
    #[inline(always)]
    pub unsafe fn at(&self, off: usize) -> *mut T {
        // SAFETY: `off` lies in the buffer (the contract).
        unsafe { self.0.add(off) }
    }
}

/// An output buffer that a kernel writes completely (from several threads) before anyone reads
/// it, so it is not zeroed first: zeroing every output was a whole extra pass over memory.
pub(crate) struct Filled<T> {
    v: Vec<T>,
    n: usize,
}

impl<T> Filled<T> {
    pub fn new(n: usize) -> Self {
        Filled { v: Vec::with_capacity(n), n }
    }

    /// Where the kernel writes; valid while `self` lives.
    pub fn ptr(&mut self) -> SharedMut<T> {
        SharedMut(self.v.as_mut_ptr())
    }

    /// # Safety
    /// Every one of the `n` elements has been written through [`Filled::ptr`].
    pub unsafe fn assume_filled(mut self) -> Vec<T> {
        // SAFETY: the capacity is n (`new`) and all n elements are written (the contract).
        unsafe { self.v.set_len(self.n) };
        self.v
    }
}

/// Rows per parallel chunk for row-wise kernels: ~16K elements, at least one row. Fixed by the
/// shape alone, so per-chunk partial sums (and hence results) do not depend on the thread count.
pub(crate) fn rows_per_chunk(row_len: usize) -> usize {
    (16 * 1024 / row_len.max(1)).max(1)
}

/// Below this many elements a row kernel runs on the calling thread.
pub(crate) const PAR_MIN_ELEMS: usize = 32 * 1024;

/// Run `f` on consecutive chunks of [`rows_per_chunk`] rows (of `row_len` elements), in
/// parallel when there is enough work; the chunks' results come back in order.
pub(crate) fn for_row_chunks<R: Send>(
    rows: usize,
    row_len: usize,
    f: impl Fn(std::ops::Range<usize>) -> R + Sync + Send,
) -> Vec<R> {
    use rayon::prelude::*;
    let chunk = rows_per_chunk(row_len);
    let n_chunks = rows.div_ceil(chunk);
    let run = |c: usize| f(c * chunk..((c + 1) * chunk).min(rows));
    if rows * row_len < PAR_MIN_ELEMS {
        (0..n_chunks).map(run).collect()
    } else {
        (0..n_chunks).into_par_iter().map(run).collect()
    }
}
