//! Mixed-precision matrix product for the CPU training path: C = A·B (or C += A·B) with A and B
//! rounded to bf16 (round to nearest even, as torch's autocast casts) and products summed in f32.
//!
//! Three implementations, one picked at run time by one rule ([`bf16_kernel`]: AMX, else
//! AVX512_BF16, else the fallback):
//!
//! * **AMX** (Sapphire Rapids and later): A and B are packed into bf16 tiles, A as 16 rows x 32
//!   k-values, B in the "VNNI" pair layout `tdpbf16ps` wants (16 rows of k-pairs x 16 columns,
//!   each 32-bit lane holding B[2p][j] | B[2p+1][j] << 16), zero-padded to whole tiles so any
//!   m, n, k work. A micro-kernel keeps a 32x32 block of C in four accumulator tiles (tmm0-3)
//!   and runs over k with two A tiles (tmm4-5) and two B tiles (tmm6-7).
//! * **AVX512_BF16** (AMD Zen 4/5; on Intel only with `ITT_AVX512BF16=1`, see
//!   [`avx512bf16_available`]): the same packed operands and the same 32 x 32 blocks of C,
//!   multiplied with `vdpbf16ps`, which adds one k-pair's two products into each f32 lane: a B
//!   tile row is already one vector of 16 column pairs, an A pair is broadcast. 8 rows x 32
//!   columns of C stay in 16 registers.
//! * **Fallback**: the same rounding, written back as f32, then an f32 product with the `gemm`
//!   crate. The paths agree up to the order of f32 summation.
//!
//! `ITT_AMX=0` rules out AMX, `ITT_AVX512BF16=0` the `vdpbf16ps` kernel and `=1` allows it on
//! Intel CPUs (tests, A/B timing).
//!
//! Determinism: C is split into blocks by the shape alone, each block is computed by one task in
//! a fixed k order, so results are bit-for-bit identical on any number of threads.
//!
//! One difference between the paths besides summation order: `tdpbf16ps` and `vdpbf16ps` treat
//! bf16 subnormal inputs (|x| < 2^-126) as zero and flush subnormal results, the fallback keeps
//! them. Training values that small contribute nothing measurable.
//!
//! Speed (`cargo bench --bench bf16_gemm`, 2 cores, shared machine): the AMX path runs at
//! 2.4-3.5x the f32 `gemm` at the training shapes. A lone 32x32 kernel with its tiles in L1 reaches
//! ~2.4 TFLOP/s per core, so what remains is memory traffic: reading f32 A and B, writing f32 C.
//!
//! The AMX instructions are written with `asm!` (stable Rust has no AMX intrinsics); the
//! assembler accepts them without target features. Tile registers are invisible to the compiler,
//! so they keep their contents between `asm!` blocks; every block is side-effecting (no `pure`),
//! so the compiler keeps them in program order.

use super::SharedMut;
use rayon::prelude::*;
use std::cell::RefCell;
use std::sync::OnceLock;

/// One operand: f32 data with explicit strides (elements), so transposed views cost nothing.
#[derive(Clone, Copy)]
pub struct MatRef<'a> {
    pub data: &'a [f32],
    pub row_stride: usize,
    pub col_stride: usize,
}

impl MatRef<'_> {
    #[inline(always)]
    fn at(&self, i: usize, j: usize) -> f32 {
        self.data[i * self.row_stride + j * self.col_stride]
    }

    /// Panics unless every element of a rows x cols view lies in `data`.
    fn check(&self, rows: usize, cols: usize, what: &str) {
        if rows == 0 || cols == 0 {
            return;
        }
        let last = (rows - 1) * self.row_stride + (cols - 1) * self.col_stride;
        assert!(
            last < self.data.len(),
            "gemm_bf16: {what} ({rows} x {cols}, strides {} {}) reaches element {last} of {}",
            self.row_stride,
            self.col_stride,
            self.data.len()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// bf16 rounding

/// f32 -> bf16 bits, round to nearest even (as torch converts, subnormals kept). NaN stays NaN
/// (quieted, sign and top payload kept) rather than rounding up into infinity.
#[inline(always)]
pub fn to_bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    let rounded = b.wrapping_add(0x7FFF + ((b >> 16) & 1)) >> 16;
    let nan = (b & 0x7FFF_FFFF) > 0x7F80_0000;
    (if nan { (b >> 16) | 0x40 } else { rounded }) as u16
}

/// x rounded to the nearest bf16 value, as an f32.
#[inline(always)]
pub fn round_bf16(x: f32) -> f32 {
    f32::from_bits((to_bf16_bits(x) as u32) << 16)
}

// ---------------------------------------------------------------------------------------------
// Public entry points

/// C (m x n, row-major with row stride c_rs) = A (m x k) · B (k x n)  [or C += ... when
/// accumulate], with A and B rounded to bf16 (round to nearest even, as torch's autocast casts)
/// and products summed in f32.
#[allow(clippy::too_many_arguments)]
pub fn gemm_bf16(m: usize, n: usize, k: usize, a: MatRef, b: MatRef, c: &mut [f32], c_rs: usize, accumulate: bool) {
    match bf16_kernel() {
        Bf16Kernel::Amx => gemm_amx(m, n, k, a, b, c, c_rs, accumulate),
        Bf16Kernel::Avx512Bf16 => gemm_avx512bf16(m, n, k, a, b, c, c_rs, accumulate),
        Bf16Kernel::Emulated => gemm_fallback(m, n, k, a, b, c, c_rs, accumulate),
    }
}

/// Which implementation computes bf16 products on this machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bf16Kernel {
    /// AMX tiles (`tdpbf16ps`).
    Amx,
    /// AVX-512 vectors (`vdpbf16ps`).
    Avx512Bf16,
    /// Operands rounded to bf16, products by the f32 `gemm` (no bf16 hardware).
    Emulated,
}

impl Bf16Kernel {
    /// Whether the CPU multiplies bf16 itself (not emulated).
    pub fn in_hardware(self) -> bool {
        self != Bf16Kernel::Emulated
    }

    /// For `itt bench` and `itt train`: what ran.
    pub fn describe(self) -> &'static str {
        match self {
            Bf16Kernel::Amx => "bf16 operands on AMX tiles, f32 sums",
            Bf16Kernel::Avx512Bf16 => "bf16 operands in AVX512_BF16 vectors (vdpbf16ps), f32 sums",
            Bf16Kernel::Emulated => {
                "bf16 emulated: operands rounded to bf16, products in f32 (no AMX or AVX512_BF16 here)"
            }
        }
    }
}

/// The one rule for bf16 products: AMX where usable ([`amx_available`]), else AVX512_BF16
/// ([`avx512bf16_available`]), else the emulation. Decided once.
pub fn bf16_kernel() -> Bf16Kernel {
    static KERNEL: OnceLock<Bf16Kernel> = OnceLock::new();
    *KERNEL.get_or_init(|| {
        if amx_available() {
            Bf16Kernel::Amx
        } else if avx512bf16_available() {
            Bf16Kernel::Avx512Bf16
        } else {
            Bf16Kernel::Emulated
        }
    })
}

/// Whether the `vdpbf16ps` path runs here: the CPU has AVX-512F/BW and AVX512_BF16 and is an
/// AMD one, or `ITT_AVX512BF16=1` asks for it on any CPU with the instructions;
/// `ITT_AVX512BF16=0` rules it out. Decided once.
///
/// Why the vendor: on an Intel Xeon (Sapphire Rapids, the only Intel part measured) `vdpbf16ps`
/// zmm retires one every ~2 cycles, half the rate of f32 FMAs for the same 2 flops per 16-bit
/// element, so it moves no more flops than f32 does, and with the rounding and packing on top
/// `small` trains at 0.69x its f32 speed (docs/PERFORMANCE.md); there AMX is the bf16 unit. On
/// AMD Zen 4 PyTorch's bf16 autocast, which runs on these instructions, trains `small` at 1.36x
/// its fp32 (issue 27's measurement), so that is where this path pays.
pub fn avx512bf16_available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| match std::env::var("ITT_AVX512BF16").as_deref() {
        Ok("0") => false,
        Ok("1") => avx512bf16_hardware(),
        _ => avx512bf16_hardware() && cpu_is_amd(),
    })
}

/// CPUID leaf 0's vendor string is "AuthenticAMD".
fn cpu_is_amd() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        let r = std::arch::x86_64::__cpuid_count(0, 0);
        let vendor: Vec<u8> = [r.ebx, r.edx, r.ecx].iter().flat_map(|w| w.to_le_bytes()).collect();
        vendor == b"AuthenticAMD"
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether the CPU has what the `vdpbf16ps` kernel needs (AVX-512F/BW and AVX512_BF16),
/// whatever the vendor or the environment say.
pub fn avx512bf16_hardware() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether the AMX path is in use on this machine: the CPU has AMX-BF16 and AMX-TILE (CPUID),
/// Linux granted the process the tile-data state (arch_prctl ARCH_REQ_XCOMP_PERM), and
/// `ITT_AMX=0` is not set. Decided once.
pub fn amx_available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| std::env::var("ITT_AMX").as_deref() != Ok("0") && amx_hardware())
}

/// CPUID says AMX-BF16 + AMX-TILE (and the AVX-512 the packing code is compiled for), and the
/// kernel lets this process use the tile registers. Linux (5.16+) keeps the 8 KiB tile-data
/// state out of every thread's signal frame unless the process asks for it; a tile instruction
/// without that permission dies with SIGILL. The permission is process-wide, so asking once
/// covers every thread, including rayon's.
fn amx_hardware() -> bool {
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    {
        use std::arch::x86_64::__cpuid_count;
        if !(std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512bw")) {
            return false;
        }
        // Leaf 7 exists when the highest leaf is at least 7.
        let max_leaf = __cpuid_count(0, 0).eax;
        if max_leaf < 7 {
            return false;
        }
        let edx = __cpuid_count(7, 0).edx;
        let (amx_bf16, amx_tile) = (edx & (1 << 22) != 0, edx & (1 << 24) != 0);
        if !(amx_bf16 && amx_tile) {
            return false;
        }
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        // SAFETY: a plain syscall with integer arguments; on failure it returns -1.
        let r = unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) };
        r == 0
    }
    #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
    {
        false
    }
}

/// Checks the arguments and handles the empty cases; true when there is nothing left to do.
#[allow(clippy::too_many_arguments)]
fn trivial(m: usize, n: usize, k: usize, a: &MatRef, b: &MatRef, c: &mut [f32], c_rs: usize, accumulate: bool) -> bool {
    check_args(m, n, k, a, b, c, c_rs);
    if k == 0 && !accumulate {
        for i in 0..m {
            c[i * c_rs..i * c_rs + n].fill(0.0);
        }
    }
    m == 0 || n == 0 || k == 0
}

#[allow(clippy::too_many_arguments)]
fn check_args(m: usize, n: usize, k: usize, a: &MatRef, b: &MatRef, c: &[f32], c_rs: usize) {
    a.check(m, k, "A");
    b.check(k, n, "B");
    if m > 1 {
        // Rows of C must not overlap: blocks of rows are written from different threads.
        assert!(c_rs >= n, "gemm_bf16: C row stride {c_rs} < n {n}");
    }
    if m > 0 && n > 0 {
        assert!((m - 1) * c_rs + n <= c.len(), "gemm_bf16: C ({m} x {n}, row stride {c_rs}) exceeds {}", c.len());
    }
}

// ---------------------------------------------------------------------------------------------
// Fallback: round, then an f32 gemm

/// Rows of C per fallback task; fixed by the shape (about 16 tasks, at least 16 rows) so that
/// the `gemm` calls, and hence the summation order, do not depend on the thread count.
fn fallback_rows_per_task(m: usize) -> usize {
    m.div_ceil(16).max(16)
}

/// Rows of C per thread when [`gemm_f32`] splits the rows itself: the rows shared out evenly,
/// rounded up to `tile`, the height of gemm's micro-tile on this CPU ([`f32_tile_rows`]), so
/// no thread gets a ragged edge tile it would not have had anyway. `None` on one thread or
/// below 128 rows a thread, where gemm's own split is kept: it also splits columns, so short
/// products (a 256-row weight gradient on 16 threads) still use every thread.
fn f32_rows_per_thread(m: usize, threads: usize, tile: usize) -> Option<usize> {
    (threads > 1 && m.div_ceil(threads) >= 128).then(|| m.div_ceil(threads).div_ceil(tile) * tile)
}

/// Height of gemm's f32 micro-tile on this CPU: 4 x 16 lanes under AVX-512, 2 x 8 under AVX2
/// (gemm picks its kernels from the CPU, whatever `ITT_SIMD` says). Rounding every thread's
/// rows up to 64 under AVX2 as well gave one thread 768 of a routed step's 1440 rows and the
/// other 672, and 384 / 304 of a 688-row weight gradient; the 16-row tile splits them 720 /
/// 720 and 352 / 336.
fn f32_tile_rows() -> usize {
    // Read once: every f32 product of a training step asks.
    static ROWS: OnceLock<usize> = OnceLock::new();
    *ROWS.get_or_init(|| if super::detected_simd() == super::Simd::Avx512 { 64 } else { 16 })
}

/// c (m, n) = a (m, k) . b (k, n) in f32 through gemm (the same call candle's matmul makes,
/// minus its zero-filled output): `ops::linear` in f32 and the yardstick in
/// `benches/bf16_gemm.rs`.
///
/// Threads: C's rows are shared out, one block of [`f32_rows_per_thread`] rows per rayon
/// thread, each block one single-threaded gemm call that packs all of B for itself. gemm's
/// own split (`Parallelism::Rayon`) was up to 10-25% slower at the training shapes
/// (`benches/bf16_gemm.rs`, last two columns): most at the weight gradients (256 x 688 x 2048:
/// 260 vs 328 GFLOP/s) and at the 1024-row products of a routed step (1024 x 256 x 256: 329 vs
/// 410); it is kept where B is large (2048 x 2048 x 2048: 426 vs 391, each thread packing all
/// of B). The bound on B is 2M elements: at 1M the down projection's weight gradient of `small`
/// (256 x 688 x 2048, B 1.4M) took gemm's split, 238 GFLOP/s against 276 with the rows shared
/// out (2026-12-07, Intel Xeon Sapphire Rapids, `cargo bench --bench bf16_gemm`). Every element
/// is the same dot product either way (gemm's k blocking depends on k and the caches only), so
/// the result does not depend on the split or the thread count.
pub fn gemm_f32(m: usize, n: usize, k: usize, a: MatRef, b: MatRef, c: &mut [f32]) {
    if !check_f32(m, n, k, &a, &b, c) {
        return;
    }
    match f32_rows_per_thread(m, rayon::current_num_threads(), f32_tile_rows()) {
        Some(rows) if m * n * k >= 1 << 16 && k * n <= 1 << 21 => {
            c[..m * n].par_chunks_mut(rows * n).enumerate().for_each(|(i, block)| {
                let (r0, mi) = (i * rows, block.len() / n);
                let ai = MatRef { data: &a.data[r0 * a.row_stride..], ..a };
                gemm_f32_call(mi, n, k, ai, b, block, gemm::Parallelism::None)
            })
        }
        _ => gemm_f32_call(m, n, k, a, b, c, gemm_split(m, n, k)),
    }
}

/// [`gemm_f32`] with gemm's own thread split throughout, as candle calls it: the yardstick the
/// row split is measured against (`benches/bf16_gemm.rs`).
pub fn gemm_f32_gemm_split(m: usize, n: usize, k: usize, a: MatRef, b: MatRef, c: &mut [f32]) {
    if check_f32(m, n, k, &a, &b, c) {
        gemm_f32_call(m, n, k, a, b, c, gemm_split(m, n, k))
    }
}

/// Panics unless the views and C fit m, n, k; false when there is nothing to compute.
fn check_f32(m: usize, n: usize, k: usize, a: &MatRef, b: &MatRef, c: &[f32]) -> bool {
    assert!(c.len() >= m * n, "gemm_f32: C ({m} x {n}) exceeds {}", c.len());
    a.check(m, k, "A");
    b.check(k, n, "B");
    m > 0 && n > 0
}

/// gemm's own split over rayon's threads, or none for small products.
fn gemm_split(m: usize, n: usize, k: usize) -> gemm::Parallelism {
    let threads = rayon::current_num_threads();
    if threads > 1 && m * n * k >= 1 << 16 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    }
}

/// One gemm call, c (m, n) row-major = a . b, c written and not read; shapes checked by the
/// caller ([`check_f32`]).
fn gemm_f32_call(m: usize, n: usize, k: usize, a: MatRef, b: MatRef, c: &mut [f32], par: gemm::Parallelism) {
    // SAFETY: `a` and `b` hold every (row, col) their strides reach for these m, n, k (checked
    // by `check_f32`; a block's A starts at its first row), c holds m * n elements.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.data.as_ptr(),
            a.col_stride as isize,
            a.row_stride as isize,
            b.data.as_ptr(),
            b.col_stride as isize,
            b.row_stride as isize,
            0.0f32,
            1.0f32,
            false,
            false,
            false,
            par,
        )
    }
}

/// [`gemm_bf16`] without AMX: bf16-rounded copies of A and B, then an f32 `gemm` (for tests and
/// A/B timing; [`gemm_bf16`] picks it by itself where AMX is missing or `ITT_AMX=0`).
#[allow(clippy::too_many_arguments)]
pub fn gemm_fallback(m: usize, n: usize, k: usize, a: MatRef, b: MatRef, c: &mut [f32], c_rs: usize, accumulate: bool) {
    if trivial(m, n, k, &a, &b, c, c_rs, accumulate) {
        return;
    }
    // Rounded copies, contiguous: A (m x k) and B (k x n), row-major.
    let mut ar = vec![0f32; m * k];
    ar.par_chunks_mut(k * 64).enumerate().for_each(|(blk, out)| {
        for (r, row) in out.chunks_mut(k).enumerate() {
            let i = blk * 64 + r;
            for (kk, v) in row.iter_mut().enumerate() {
                *v = round_bf16(a.at(i, kk));
            }
        }
    });
    let mut br = vec![0f32; k * n];
    br.par_chunks_mut(n * 64).enumerate().for_each(|(blk, out)| {
        for (r, row) in out.chunks_mut(n).enumerate() {
            let kk = blk * 64 + r;
            for (j, v) in row.iter_mut().enumerate() {
                *v = round_bf16(b.at(kk, j));
            }
        }
    });
    let rows = fallback_rows_per_task(m);
    let pc = SharedMut(c.as_mut_ptr());
    let (ar, br) = (&ar, &br);
    (0..m.div_ceil(rows)).into_par_iter().for_each(|t| {
        let (i0, i1) = (t * rows, ((t + 1) * rows).min(m));
        // SAFETY: this task owns rows i0..i1 of C (rows do not overlap: c_rs >= n, checked),
        // all inside `c` (checked); the inputs are live, contiguous buffers of the stated sizes.
        unsafe {
            gemm::gemm(
                i1 - i0,
                n,
                k,
                raw(&pc).add(i0 * c_rs),
                1,
                c_rs as isize,
                accumulate,
                ar.as_ptr().add(i0 * k),
                1,
                k as isize,
                br.as_ptr(),
                1,
                n as isize,
                1.0f32,
                1.0f32,
                false,
                false,
                false,
                gemm::Parallelism::None,
            )
        }
    });
}

// ---------------------------------------------------------------------------------------------
// AMX

/// bf16 values per tile row (64 bytes) = the k extent of one A tile.
const TK: usize = 32;
/// Elements (u16) in one 16 x 32 bf16 tile.
const TILE: usize = 512;

// Packed layouts. A: strip s (rows 16s..16s+16) is a run of kbc tiles, tile kb holding
// bf16(A[16s + r][32kb + c]) at row r, column c. B: strip s (columns 16s..16s+16) is a run of
// kbc tiles, tile kb holding, as 32-bit lane (p, j), bf16(B[32kb + 2p][16s + j]) in the low and
// bf16(B[32kb + 2p + 1][16s + j]) in the high half. Zeros beyond m, n, k.

/// One A tile element by element (edge tiles, or strides the vector code does not cover).
fn pack_a_tile_scalar(a: &MatRef, m: usize, k: usize, r0: usize, k0: usize, out: &mut [u16]) {
    for r in 0..16 {
        for c in 0..TK {
            let (i, kk) = (r0 + r, k0 + c);
            out[r * TK + c] = if i < m && kk < k { to_bf16_bits(a.at(i, kk)) } else { 0 };
        }
    }
}

/// One B tile element by element.
fn pack_b_tile_scalar(b: &MatRef, k: usize, n: usize, j0: usize, k0: usize, out: &mut [u32]) {
    let bits = |kk: usize, j: usize| if kk < k && j < n { to_bf16_bits(b.at(kk, j)) as u32 } else { 0 };
    for p in 0..16 {
        for j in 0..16 {
            out[p * 16 + j] = bits(k0 + 2 * p, j0 + j) | bits(k0 + 2 * p + 1, j0 + j) << 16;
        }
    }
}

/// AVX-512 pieces of the packers: whole tiles of row- or column-major operands.
#[cfg(target_arch = "x86_64")]
pub(crate) mod simd {
    use super::TK;
    use std::arch::x86_64::*;

    /// 16 f32 -> their bf16 bits in the low half of each 32-bit lane ([`super::to_bf16_bits`]).
    ///
    /// # Safety
    /// AVX-512F/BW; 16 f32 are readable at `p`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn cvt16(p: *const f32) -> __m512i {
        // SAFETY: 16 f32 (64 bytes) are readable at p (the contract); the load is unaligned.
        let x = unsafe { _mm512_loadu_si512(p as *const __m512i) };
        let lsb = _mm512_and_si512(_mm512_srli_epi32::<16>(x), _mm512_set1_epi32(1));
        let rounded = _mm512_srli_epi32::<16>(_mm512_add_epi32(x, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))));
        let abs = _mm512_and_si512(x, _mm512_set1_epi32(0x7FFF_FFFF));
        let nan = _mm512_cmpgt_epu32_mask(abs, _mm512_set1_epi32(0x7F80_0000));
        let quiet = _mm512_or_si512(_mm512_srli_epi32::<16>(x), _mm512_set1_epi32(0x40));
        _mm512_mask_mov_epi32(rounded, nan, quiet)
    }

    /// Lanes (lo[i], hi[i]) as one 32-bit lane: a k-pair of B, or two k of A.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    fn pair(lo: __m512i, hi: __m512i) -> __m512i {
        _mm512_or_si512(lo, _mm512_slli_epi32::<16>(hi))
    }

    /// 32 consecutive f32 -> 32 consecutive bf16.
    ///
    /// # Safety
    /// AVX-512F/BW; 32 f32 are readable at `p`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn cvt32(p: *const f32) -> __m512i {
        // SAFETY: the 32 values at p are the two runs of 16 that `cvt16` reads.
        let (lo, hi) = unsafe { (cvt16(p), cvt16(p.add(16))) };
        // The low 16 bits of every 32-bit lane of lo, then of hi: words 0, 2, ..., 62.
        let idx = _mm512_set_epi16(
            62, 60, 58, 56, 54, 52, 50, 48, 46, 44, 42, 40, 38, 36, 34, 32, 30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10,
            8, 6, 4, 2, 0,
        );
        _mm512_permutex2var_epi16(lo, idx, hi)
    }

    /// Transpose of a 16 x 16 matrix of 32-bit lanes (rows in, rows out).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(crate) fn transpose16(r: [__m512i; 16]) -> [__m512i; 16] {
        // t: 2x2 blocks; u[4g + q]: within each 128-bit lane L, column 4L + q of rows 4g..4g+4.
        let mut u = [_mm512_setzero_si512(); 16];
        for g in 0..4 {
            let t0 = _mm512_unpacklo_epi32(r[4 * g], r[4 * g + 1]);
            let t1 = _mm512_unpackhi_epi32(r[4 * g], r[4 * g + 1]);
            let t2 = _mm512_unpacklo_epi32(r[4 * g + 2], r[4 * g + 3]);
            let t3 = _mm512_unpackhi_epi32(r[4 * g + 2], r[4 * g + 3]);
            u[4 * g] = _mm512_unpacklo_epi64(t0, t2);
            u[4 * g + 1] = _mm512_unpackhi_epi64(t0, t2);
            u[4 * g + 2] = _mm512_unpacklo_epi64(t1, t3);
            u[4 * g + 3] = _mm512_unpackhi_epi64(t1, t3);
        }
        // Gather the four row groups' lane L of column 4L + q across 128-bit lanes.
        let mut out = [_mm512_setzero_si512(); 16];
        for q in 0..4 {
            let v0 = _mm512_shuffle_i32x4::<0x88>(u[q], u[4 + q]);
            let v4 = _mm512_shuffle_i32x4::<0xDD>(u[q], u[4 + q]);
            let v8 = _mm512_shuffle_i32x4::<0x88>(u[8 + q], u[12 + q]);
            let v12 = _mm512_shuffle_i32x4::<0xDD>(u[8 + q], u[12 + q]);
            out[q] = _mm512_shuffle_i32x4::<0x88>(v0, v8);
            out[8 + q] = _mm512_shuffle_i32x4::<0xDD>(v0, v8);
            out[4 + q] = _mm512_shuffle_i32x4::<0x88>(v4, v12);
            out[12 + q] = _mm512_shuffle_i32x4::<0xDD>(v4, v12);
        }
        out
    }

    /// The 16 rows of a tile (64 bytes each) to `out`, rows TK bf16 apart.
    ///
    /// # Safety
    /// AVX-512F/BW; `out` holds a whole tile (16 x TK u16) that this thread may write.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn store_rows(rows: [__m512i; 16], out: *mut u16) {
        for (r, v) in rows.into_iter().enumerate() {
            // SAFETY: row r of the tile, 64 bytes at r * TK u16, lies inside it (the contract).
            unsafe { _mm512_storeu_si512(out.add(r * TK) as *mut __m512i, v) };
        }
    }

    /// A tile from row-major A: row r is 32 consecutive values at `src + r * rs`.
    ///
    /// # Safety
    /// AVX-512F/BW; the 16 x 32 values exist; `out` holds a tile.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn a_tile_rows(src: *const f32, rs: usize, out: *mut u16) {
        // SAFETY: row r's 32 values at src + r * rs exist, and `out` holds a tile (the contract).
        let rows: [__m512i; 16] = std::array::from_fn(|r| unsafe { cvt32(src.add(r * rs)) });
        unsafe { store_rows(rows, out) }
    }

    /// A tile from column-major A (A^T row-major): the 16 rows of one k are consecutive at
    /// `src + kk * cs`. Pairs of k become 32-bit lanes, then a transpose makes them tile rows.
    ///
    /// # Safety
    /// As [`a_tile_rows`].
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn a_tile_cols(src: *const f32, cs: usize, out: *mut u16) {
        // SAFETY: the 16 values of each k at src + kk * cs, kk < 32, exist, and `out` holds a
        // tile (the contract).
        let pairs: [__m512i; 16] =
            std::array::from_fn(|p| unsafe { pair(cvt16(src.add(2 * p * cs)), cvt16(src.add((2 * p + 1) * cs))) });
        unsafe { store_rows(transpose16(pairs), out) }
    }

    /// A B tile from row-major B: tile row p interleaves rows 2p and 2p + 1 (16 values each,
    /// at `src + kk * rs`).
    ///
    /// # Safety
    /// As [`a_tile_rows`], for 32 x 16 values of B.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn b_tile_rows(src: *const f32, rs: usize, out: *mut u32) {
        // SAFETY: rows kk < 32 of 16 values at src + kk * rs exist, and `out` holds a tile (the
        // contract; a tile of u32 pairs is the same 1 KiB as one of u16).
        let rows: [__m512i; 16] =
            std::array::from_fn(|p| unsafe { pair(cvt16(src.add(2 * p * rs)), cvt16(src.add((2 * p + 1) * rs))) });
        unsafe { store_rows(rows, out as *mut u16) }
    }

    /// A B tile from column-major B (B = W^T, W row-major): column j is 32 consecutive k at
    /// `src + j * cs`, which as bf16 are already the 16 k-pairs of that column; a transpose
    /// makes them tile rows.
    ///
    /// # Safety
    /// As [`b_tile_rows`].
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn b_tile_cols(src: *const f32, cs: usize, out: *mut u32) {
        // SAFETY: column j's 32 values at src + j * cs exist, and `out` holds a tile (the
        // contract; a tile of u32 pairs is the same 1 KiB as one of u16).
        let cols: [__m512i; 16] = std::array::from_fn(|j| unsafe { cvt32(src.add(j * cs)) });
        unsafe { store_rows(transpose16(cols), out as *mut u16) }
    }
}

/// Strips per B packing work item, and k-tiles per work item: a unit of 4 x 16 tiles (64 KiB of
/// bf16), enough work to amortise the task, small enough that short dimensions still split.
const PACK_STRIPS: usize = 4;
const PACK_KTILES: usize = 16;

/// Packs strips s0.. of A (16 rows each, zero beyond m) into `out` (`kbc` tiles per strip).
/// K-tiles outer and strips inner, so that a column-major A is read in runs of
/// (strips x 64 bytes) per k.
fn pack_a_block(a: &MatRef, m: usize, k: usize, s0: usize, out: &mut [u16]) {
    let kbc = k.div_ceil(TK);
    let strips = out.len() / (kbc * TILE);
    for kb in 0..kbc {
        for s in 0..strips {
            let tile = &mut out[(s * kbc + kb) * TILE..][..TILE];
            let (r0, k0) = (16 * (s0 + s), TK * kb);
            let full = r0 + 16 <= m && k0 + TK <= k;
            // SAFETY: AVX-512F/BW present (amx_hardware); a full tile's elements all lie in
            // `a.data` (check_args covers the whole view).
            #[cfg(target_arch = "x86_64")]
            unsafe {
                let src = a.data.as_ptr().add(r0 * a.row_stride + k0 * a.col_stride);
                if full && a.col_stride == 1 {
                    simd::a_tile_rows(src, a.row_stride, tile.as_mut_ptr());
                    continue;
                } else if full && a.row_stride == 1 {
                    simd::a_tile_cols(src, a.col_stride, tile.as_mut_ptr());
                    continue;
                }
            }
            pack_a_tile_scalar(a, m, k, r0, k0, tile);
        }
    }
}

/// Packs B (strips of 16 columns, `kbc` tiles each) into `pb`, in parallel when `par`. Work
/// items are (strip group, k-tile range), k-tiles outer and strips inner within one.
fn pack_b(b: &MatRef, k: usize, n: usize, pb: &mut [u32], par: bool) {
    let kbc = k.div_ceil(TK);
    let strips = pb.len() / (kbc * TILE / 2);
    let out = SharedMut(pb.as_mut_ptr());
    let (ng, nk) = (strips.div_ceil(PACK_STRIPS), kbc.div_ceil(PACK_KTILES));
    let item = |w: usize| {
        let (g, kg) = (w / nk, w % nk);
        for kb in kg * PACK_KTILES..((kg + 1) * PACK_KTILES).min(kbc) {
            for s in g * PACK_STRIPS..((g + 1) * PACK_STRIPS).min(strips) {
                // SAFETY: each (strip, k-tile) tile belongs to one work item.
                let tile = unsafe { out.slice((s * kbc + kb) * TILE / 2, TILE / 2) };
                let (j0, k0) = (16 * s, TK * kb);
                let full = j0 + 16 <= n && k0 + TK <= k;
                // SAFETY: as in pack_a_block.
                #[cfg(target_arch = "x86_64")]
                unsafe {
                    let src = b.data.as_ptr().add(k0 * b.row_stride + j0 * b.col_stride);
                    if full && b.col_stride == 1 {
                        simd::b_tile_rows(src, b.row_stride, tile.as_mut_ptr());
                        continue;
                    } else if full && b.row_stride == 1 {
                        simd::b_tile_cols(src, b.col_stride, tile.as_mut_ptr());
                        continue;
                    }
                }
                pack_b_tile_scalar(b, k, n, j0, k0, tile);
            }
        }
    };
    if par {
        (0..ng * nk).into_par_iter().for_each(item);
    } else {
        (0..ng * nk).for_each(item);
    }
}

/// Tile configuration (palette 1): all eight tiles 16 rows x 64 bytes.
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

impl TileConfig {
    const fn new() -> Self {
        let mut c = [0u8; 64];
        c[0] = 1;
        let mut t = 0;
        while t < 8 {
            c[16 + 2 * t] = 64; // bytes per row (u16, little endian)
            c[48 + t] = 16; // rows
            t += 1;
        }
        TileConfig(c)
    }
}

static TILE_CONFIG: TileConfig = TileConfig::new();

/// Loads the tile configuration on this thread for the guard's lifetime. The configuration (and
/// the tile registers) are per-thread state, so every task that uses tiles loads it itself:
/// rayon runs tasks on whichever worker is free. Dropping it releases the tiles (`tilerelease`),
/// which returns the thread to the init state so that context switches stop saving 8 KiB.
#[cfg(target_arch = "x86_64")]
struct TileGuard;

#[cfg(target_arch = "x86_64")]
impl TileGuard {
    /// # Safety
    /// [`amx_hardware`] must have returned true.
    unsafe fn new() -> Self {
        // SAFETY: the CPU has AMX and Linux granted the tile state (the contract); TILE_CONFIG
        // is a static, 64-byte aligned palette-1 configuration, the 64 bytes ldtilecfg reads.
        unsafe { std::arch::asm!("ldtilecfg [{}]", in(reg) TILE_CONFIG.0.as_ptr(), options(nostack)) };
        TileGuard
    }
}

#[cfg(target_arch = "x86_64")]
impl Drop for TileGuard {
    fn drop(&mut self) {
        // SAFETY: tiles were configured by `new`.
        unsafe { std::arch::asm!("tilerelease", options(nostack, nomem)) };
    }
}

/// One 32 x 32 block of C over `kbc` k-tiles: tmm0..3 = C rows 0-15 / 16-31 x columns 0-15 /
/// 16-31, A tiles from `a0` (rows 0-15) and `a1` (rows 16-31), B tiles from `b0` (columns 0-15)
/// and `b1` (16-31), each a run of consecutive 1 KiB tiles. C is read (when `load`) and written
/// at `c`, rows `c_stride` bytes apart.
///
/// # Safety
/// Tiles configured on this thread ([`TileGuard`]); the four tile runs hold `kbc` tiles each;
/// `c` points to 32 rows of 32 f32 at `c_stride` bytes apart that this thread may write.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn kernel_32x32(
    a0: *const u16,
    a1: *const u16,
    b0: *const u32,
    b1: *const u32,
    kbc: usize,
    c: *mut f32,
    c_stride: usize,
    load: bool,
) {
    use std::arch::asm;
    // SAFETY: tiles are configured (the contract); every address below is in one of the four
    // tile runs (kb < kbc) or in C's 32 x 32 block, which the contract says exist and are ours.
    unsafe {
        let c1 = c.add(16);
        let c2 = c.byte_add(16 * c_stride);
        let c3 = c2.add(16);
        if load {
            asm!(
                "tileloadd tmm0, [{c0} + {s}*1]",
                "tileloadd tmm1, [{c1} + {s}*1]",
                "tileloadd tmm2, [{c2} + {s}*1]",
                "tileloadd tmm3, [{c3} + {s}*1]",
                c0 = in(reg) c, c1 = in(reg) c1, c2 = in(reg) c2, c3 = in(reg) c3, s = in(reg) c_stride,
                options(nostack)
            );
        } else {
            asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3", options(nostack, nomem));
        }
        for kb in 0..kbc {
            asm!(
                "tileloadd tmm4, [{a0} + {s}*1]",
                "tileloadd tmm6, [{b0} + {s}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tileloadd tmm7, [{b1} + {s}*1]",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tileloadd tmm5, [{a1} + {s}*1]",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                a0 = in(reg) a0.add(kb * TILE),
                a1 = in(reg) a1.add(kb * TILE),
                b0 = in(reg) b0.add(kb * TILE / 2),
                b1 = in(reg) b1.add(kb * TILE / 2),
                s = in(reg) 64usize,
                options(nostack)
            );
        }
        asm!(
            "tilestored [{c0} + {s}*1], tmm0",
            "tilestored [{c1} + {s}*1], tmm1",
            "tilestored [{c2} + {s}*1], tmm2",
            "tilestored [{c3} + {s}*1], tmm3",
            c0 = in(reg) c, c1 = in(reg) c1, c2 = in(reg) c2, c3 = in(reg) c3, s = in(reg) c_stride,
            options(nostack)
        );
    }
}

/// The AVX512_BF16 twin of [`kernel_32x32`]: the same packed tiles and the same 32 x 32 block
/// of C, by `vdpbf16ps` (each f32 lane += a0 * b0 + a1 * b1 over one bf16 k-pair). A B tile row
/// p is one vector: the k-pair p of 16 columns; the A pair (row r, pair p) is broadcast. C is
/// done 8 rows at a time (16 accumulators, 2 B vectors, 1 broadcast: 19 of 32 registers), the
/// k order fixed, so the result does not depend on threads.
///
/// # Safety
/// AVX-512F/BW and AVX512_BF16 present; otherwise as [`kernel_32x32`] (no tile configuration).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
#[allow(clippy::too_many_arguments)]
unsafe fn kernel_32x32_dp(
    a0: *const u16,
    a1: *const u16,
    b0: *const u32,
    b1: *const u32,
    kbc: usize,
    c: *mut f32,
    c_stride: usize,
    load: bool,
) {
    use std::arch::x86_64::*;
    const ROWS: usize = 8;
    const PAIRS: usize = TK / 2;
    // SAFETY: every address is in one of the four tile runs (kb < kbc; row < 16, pair < 16 of a
    // tile) or in C's 32 x 32 block, which the contract says exist and are ours. The bf16
    // vector type is 64 bytes of bits, as the integer vectors transmuted into it.
    unsafe {
        for (half, a) in [a0, a1].into_iter().enumerate() {
            for g in 0..16 / ROWS {
                let row0 = 16 * half + ROWS * g;
                let crow = |r: usize| c.byte_add((row0 + r) * c_stride);
                let mut acc = [[_mm512_setzero_ps(); 2]; ROWS];
                if load {
                    for (r, acc) in acc.iter_mut().enumerate() {
                        *acc = [_mm512_loadu_ps(crow(r)), _mm512_loadu_ps(crow(r).add(16))];
                    }
                }
                for kb in 0..kbc {
                    // Row r of this group, as k-pairs: at[r * PAIRS + p].
                    let at = a.add(kb * TILE + ROWS * g * TK) as *const i32;
                    let (bt0, bt1) = (b0.add(kb * TILE / 2), b1.add(kb * TILE / 2));
                    for p in 0..PAIRS {
                        let vb0: __m512bh = std::mem::transmute(_mm512_loadu_si512(bt0.add(16 * p) as *const __m512i));
                        let vb1: __m512bh = std::mem::transmute(_mm512_loadu_si512(bt1.add(16 * p) as *const __m512i));
                        for (r, acc) in acc.iter_mut().enumerate() {
                            let va: __m512bh = std::mem::transmute(_mm512_set1_epi32(*at.add(r * PAIRS + p)));
                            acc[0] = _mm512_dpbf16_ps(acc[0], va, vb0);
                            acc[1] = _mm512_dpbf16_ps(acc[1], va, vb1);
                        }
                    }
                }
                for (r, acc) in acc.iter().enumerate() {
                    _mm512_storeu_ps(crow(r), acc[0]);
                    _mm512_storeu_ps(crow(r).add(16), acc[1]);
                }
            }
        }
    }
}

/// Other architectures never reach the AMX code (`amx_hardware` is false there); these stand-ins
/// keep it compiling.
#[cfg(not(target_arch = "x86_64"))]
struct TileGuard;

#[cfg(not(target_arch = "x86_64"))]
impl TileGuard {
    /// # Safety
    /// Never called (see above).
    unsafe fn new() -> Self {
        unreachable!("AMX is x86_64 only")
    }
}

/// # Safety
/// Never called (see above).
#[cfg(not(target_arch = "x86_64"))]
#[allow(clippy::too_many_arguments)]
unsafe fn kernel_32x32(
    _: *const u16,
    _: *const u16,
    _: *const u32,
    _: *const u32,
    _: usize,
    _: *mut f32,
    _: usize,
    _: bool,
) {
    unreachable!("AMX and AVX512_BF16 are x86_64 only")
}

// Never called either (AVX512_BF16 is x86_64 only): the AMX stand-in serves.
#[cfg(not(target_arch = "x86_64"))]
use self::kernel_32x32 as kernel_32x32_dp;

/// Task grid over C in 32 x 32 micro-blocks: (micro-rows, micro-columns) per task, chosen from
/// the shape alone. Tasks take whole rows of C where there are enough of them (each task packs
/// its own rows of A, so splitting columns would pack them again): up to 4 micro-rows (128 rows)
/// per task while that leaves at least 32 tasks; columns are split only when that leaves fewer
/// than 8. Smaller row tasks (32 instead of 8 at least) measured faster wherever they do not
/// split columns: with C fresh and caches flushed between calls, 1024 x 688 x 256 350 vs
/// 523 us and 2048 x 688 x 256 600 vs 974 us (more, shorter tasks balance the two threads and
/// keep a task's C rows and packed A in L2); splitting columns to get there slowed the 256-row
/// weight gradients (586 -> 521 GFLOP/s at 256 x 256 x 2048, `benches/bf16_gemm.rs`).
fn amx_partition(m32: usize, n32: usize) -> (usize, usize) {
    const ROW_TASKS: usize = 32;
    const MIN_TASKS: usize = 8;
    let mut mb = 4usize.min(m32);
    while mb > 1 && m32.div_ceil(mb) < ROW_TASKS {
        mb /= 2;
    }
    let mut nb = n32;
    while nb > 4 && m32.div_ceil(mb) * n32.div_ceil(nb) < MIN_TASKS {
        nb = nb.div_ceil(2);
    }
    (mb, nb)
}

thread_local! {
    /// Packing buffers kept between calls (a training step calls with the same shapes again and
    /// again): fresh multi-MiB buffers cost page faults on every call. B's is the calling
    /// thread's; A's is per task, so per worker thread.
    static B_BUF: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
    static A_BUF: RefCell<Vec<u16>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` on this thread's `buf`, at least `len` long, or on a fresh one if the thread's is
/// in use (a nested call: a rayon task of an outer parallel loop that itself calls gemm_bf16).
/// Old contents are left in place: the packers write every element, zeros included.
fn with_buf<T: Copy + Default, R>(
    buf: &'static std::thread::LocalKey<RefCell<Vec<T>>>,
    len: usize,
    f: impl FnOnce(&mut [T]) -> R,
) -> R {
    buf.with(|b| match b.try_borrow_mut() {
        Ok(mut v) => {
            if v.len() < len {
                v.resize(len, T::default());
            }
            f(&mut v[..len])
        }
        Err(_) => f(&mut vec![T::default(); len]),
    })
}

/// [`gemm_bf16`] on AMX, whatever `ITT_AMX` says (tests, A/B timing).
///
/// # Panics
/// Where the CPU or the kernel does not allow AMX.
#[allow(clippy::too_many_arguments)]
pub fn gemm_amx(m: usize, n: usize, k: usize, a: MatRef, b: MatRef, c: &mut [f32], c_rs: usize, accumulate: bool) {
    assert!(amx_hardware(), "gemm_amx called without AMX");
    gemm_packed(true, m, n, k, a, b, c, c_rs, accumulate)
}

/// [`gemm_bf16`] with `vdpbf16ps`, whatever `ITT_AVX512BF16` says (tests, A/B timing).
///
/// # Panics
/// Where the CPU lacks AVX-512F/BW or AVX512_BF16.
#[allow(clippy::too_many_arguments)]
pub fn gemm_avx512bf16(
    m: usize,
    n: usize,
    k: usize,
    a: MatRef,
    b: MatRef,
    c: &mut [f32],
    c_rs: usize,
    accumulate: bool,
) {
    assert!(avx512bf16_hardware(), "gemm_avx512bf16 called without AVX512_BF16");
    gemm_packed(false, m, n, k, a, b, c, c_rs, accumulate)
}

/// The packed-operand product shared by AMX (`amx`) and AVX512_BF16: same packing, same task
/// grid, same 32 x 32 micro-blocks; only the micro-kernel differs.
#[allow(clippy::too_many_arguments)]
fn gemm_packed(
    amx: bool,
    m: usize,
    n: usize,
    k: usize,
    a: MatRef,
    b: MatRef,
    c: &mut [f32],
    c_rs: usize,
    accumulate: bool,
) {
    if trivial(m, n, k, &a, &b, c, c_rs, accumulate) {
        return;
    }
    let (m32, n32, kbc) = (m.div_ceil(32), n.div_ceil(32), k.div_ceil(TK));
    let a_strip = kbc * TILE; // u16 per 16-row strip of A
    let b_strip = kbc * TILE / 2; // u32 per 16-column strip of B
    let par = m * n * k >= 1 << 18;
    // B is packed once, up front, and shared by every task; each task packs its own rows of A
    // (into its thread's buffer, where it stays in cache) and runs them against all of B.
    with_buf(&B_BUF, 2 * n32 * b_strip, |pb| {
        pack_b(&b, k, n, pb, par);
        let pb = &*pb;
        let (mb, nb) = amx_partition(m32, n32);
        let (tm, tn) = (m32.div_ceil(mb), n32.div_ceil(nb));
        let pc = SharedMut(c.as_mut_ptr());
        let task = |t: usize| {
            let (bi, bj) = (t / tn, t % tn);
            let (ii0, ii1) = (bi * mb, ((bi + 1) * mb).min(m32));
            with_buf(&A_BUF, 2 * (ii1 - ii0) * a_strip, |pa| {
                pack_a_block(&a, m, k, 2 * ii0, pa);
                // SAFETY: AMX permitted (amx_hardware) when `amx`, AVX512_BF16 present otherwise
                // (the callers check); this task writes only C's micro-blocks ii0..ii1 x
                // (bj * nb .. + nb), which no other task touches.
                unsafe {
                    let _tiles = if amx { Some(TileGuard::new()) } else { None };
                    let kernel = |a0, a1, b0, b1, cp, cs, load| {
                        if amx {
                            kernel_32x32(a0, a1, b0, b1, kbc, cp, cs, load)
                        } else {
                            kernel_32x32_dp(a0, a1, b0, b1, kbc, cp, cs, load)
                        }
                    };
                    for jj in bj * nb..((bj + 1) * nb).min(n32) {
                        let b0 = pb.as_ptr().add(2 * jj * b_strip);
                        for ii in ii0..ii1 {
                            let a0 = pa.as_ptr().add(2 * (ii - ii0) * a_strip);
                            let (i0, j0) = (32 * ii, 32 * jj);
                            let (a1, b1) = (a0.add(a_strip), b0.add(b_strip));
                            if i0 + 32 <= m && j0 + 32 <= n {
                                let cp = raw(&pc).add(i0 * c_rs + j0);
                                kernel(a0, a1, b0, b1, cp, c_rs * 4, accumulate);
                            } else {
                                // Edge block: through a 32 x 32 buffer holding C's valid part.
                                let mut buf = Buf([0f32; 32 * 32]);
                                let (rows, cols) = ((m - i0).min(32), (n - j0).min(32));
                                if accumulate {
                                    for r in 0..rows {
                                        let src = pc.slice((i0 + r) * c_rs + j0, cols);
                                        buf.0[r * 32..r * 32 + cols].copy_from_slice(src);
                                    }
                                }
                                kernel(a0, a1, b0, b1, buf.0.as_mut_ptr(), 128, accumulate);
                                for r in 0..rows {
                                    pc.slice((i0 + r) * c_rs + j0, cols).copy_from_slice(&buf.0[r * 32..][..cols]);
                                }
                            }
                        }
                    }
                }
            })
        };
        if par {
            (0..tm * tn).into_par_iter().for_each(task);
        } else {
            (0..tm * tn).for_each(task);
        }
    })
}

/// The pointer inside a `SharedMut` (a function, so closures capture the `Sync` wrapper rather
/// than the bare pointer field).
#[inline(always)]
fn raw<T>(p: &SharedMut<T>) -> *mut T {
    p.0
}

#[repr(C, align(64))]
struct Buf([f32; 32 * 32]);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::base::rng::Rng;

    type Gemm = fn(usize, usize, usize, MatRef, MatRef, &mut [f32], usize, bool);

    /// A rows x cols operand in one of five layouts (row-major, padded rows, transposed,
    /// padded transposed, neither stride 1), NaN wherever the view has no element: a read
    /// outside the view poisons the result.
    struct Operand {
        data: Vec<f32>,
        rs: usize,
        cs: usize,
        rows: usize,
        cols: usize,
    }

    impl Operand {
        fn new(rows: usize, cols: usize, layout: usize, rng: &mut Rng) -> Self {
            let (rs, cs) = match layout % 5 {
                0 => (cols, 1),
                1 => (cols + 3, 1),
                2 => (1, rows),
                3 => (1, rows + 5),
                _ => (2 * cols + 1, 2),
            };
            let len = (rows - 1) * rs + (cols - 1) * cs + 1;
            let mut data = vec![f32::NAN; len];
            for i in 0..rows {
                for j in 0..cols {
                    data[i * rs + j * cs] = rng.normal() as f32;
                }
            }
            Operand { data, rs, cs, rows, cols }
        }

        fn view(&self) -> MatRef<'_> {
            MatRef { data: &self.data, row_stride: self.rs, col_stride: self.cs }
        }

        /// The bf16-rounded values, row-major, in f64.
        fn rounded(&self) -> Vec<f64> {
            let v = self.view();
            (0..self.rows * self.cols).map(|e| round_bf16(v.at(e / self.cols, e % self.cols)) as f64).collect()
        }
    }

    /// Runs `f` on one case and checks every element against the f64 product of the rounded
    /// inputs: |error| <= 1e-5 * (|c0| + sum_k |a||b|), far below bf16's own 4e-3, so unrounded
    /// or wrongly rounded inputs fail. C's row gaps (c_rs > n) must come back untouched.
    #[allow(clippy::too_many_arguments)]
    fn check_case(f: Gemm, m: usize, n: usize, k: usize, la: usize, lb: usize, pad: usize, acc: bool, seed: u64) {
        let mut rng = Rng::new(seed);
        let a = Operand::new(m, k, la, &mut rng);
        let b = Operand::new(k, n, lb, &mut rng);
        let c_rs = n + pad;
        let gap = f32::from_bits(0x7FC0_1234);
        let c0: Vec<f32> =
            (0..(m - 1) * c_rs + n).map(|e| if e % c_rs < n { rng.normal() as f32 } else { gap }).collect();
        let mut c = c0.clone();
        f(m, n, k, a.view(), b.view(), &mut c, c_rs, acc);
        let (ar, br) = (a.rounded(), b.rounded());
        for i in 0..m {
            for j in 0..n {
                let c0 = c0[i * c_rs + j] as f64;
                let (mut want, mut mag) = if acc { (c0, c0.abs()) } else { (0.0, 0.0) };
                for kk in 0..k {
                    want += ar[i * k + kk] * br[kk * n + j];
                    mag += (ar[i * k + kk] * br[kk * n + j]).abs();
                }
                let got = c[i * c_rs + j] as f64;
                assert!(
                    (got - want).abs() <= 1e-5 * mag + 1e-30,
                    "{m}x{n}x{k} layouts {la},{lb} pad {pad} acc {acc}: C[{i}][{j}] = {got}, want {want} (scale {mag})"
                );
            }
            if i + 1 < m {
                for j in n..c_rs {
                    assert_eq!(c[i * c_rs + j].to_bits(), gap.to_bits(), "row gap written at [{i}][{j}]");
                }
            }
        }
    }

    const SIZES: [usize; 11] = [1, 15, 16, 17, 31, 32, 33, 64, 100, 256, 688];

    /// Shapes: the named odd ones, then every size in each position with varied partners
    /// (products kept small enough for the f64 reference).
    fn cases() -> Vec<(usize, usize, usize)> {
        let mut v = vec![(1, 1, 1), (17, 33, 45), (31, 1, 70), (9, 13, 1), (1, 64, 33), (70, 70, 70)];
        for (i, &d) in SIZES.iter().enumerate() {
            let p = SIZES[(i + 4) % 11].min(100);
            let q = SIZES[(i + 8) % 11].min(64);
            v.push((d, p, q));
            v.push((q, d, p));
            v.push((p, q, d));
        }
        v.push((64, 256, 688));
        v.push((100, 33, 256));
        v
    }

    /// Every case, each with its own operand layouts, C row padding and accumulate flag.
    fn check_all(f: Gemm) {
        for (t, &(m, n, k)) in cases().iter().enumerate() {
            check_case(f, m, n, k, t, t / 5 + t, [0, 7][t % 2], t % 3 == 1, t as u64);
        }
    }

    /// Where AMX is usable, or a clear failure: built on an AMX CPU (build.rs) but unusable
    /// here (`ITT_AMX=0`, or the kernel refused the tile state) must not pass unnoticed.
    fn require_amx() {
        assert!(
            amx_available(),
            "these tests were built on a CPU with AMX, but AMX is not usable here (ITT_AMX=0, or Linux \
             refused the tile state); run them where it is, or without ITT_AMX=0"
        );
    }

    /// The AMX path: every case against the f64 reference, zero-length k, and the same bits on
    /// a second call and on 1 and 3 threads.
    #[test]
    #[cfg_attr(not(itt_amx), ignore = "no AMX on the CPU these tests were built on")]
    fn amx_matches_reference_and_repeats() {
        require_amx();
        check_all(gemm_amx);
        check_empty_k(gemm_amx);
        check_deterministic("amx", gemm_amx);
    }

    /// The `vdpbf16ps` path: as the AMX test. It runs wherever the CPU has AVX512_BF16, of
    /// any vendor, whatever `ITT_AVX512BF16` says (that only steers [`gemm_bf16`]).
    #[test]
    #[cfg_attr(not(itt_avx512bf16), ignore = "no AVX512_BF16 on the CPU these tests were built on")]
    fn avx512bf16_matches_reference_and_repeats() {
        assert!(
            avx512bf16_hardware(),
            "these tests were built on a CPU with AVX512_BF16 but run on one without: run them where they were built"
        );
        check_all(gemm_avx512bf16);
        check_empty_k(gemm_avx512bf16);
        check_deterministic("avx512bf16", gemm_avx512bf16);
    }

    #[test]
    fn fallback_matches_reference() {
        check_all(gemm_fallback);
    }

    #[test]
    fn public_entry_matches_reference() {
        check_case(gemm_bf16, 65, 40, 77, 0, 2, 3, true, 9);
        check_case(gemm_bf16, 40, 65, 77, 2, 0, 0, false, 10);
    }

    /// k = 0: C kept when accumulating, zeroed otherwise.
    fn check_empty_k(f: Gemm) {
        let a = MatRef { data: &[], row_stride: 0, col_stride: 1 };
        let b = MatRef { data: &[], row_stride: 3, col_stride: 1 };
        let mut c = vec![5.0f32; 6];
        f(2, 3, 0, a, b, &mut c, 3, true);
        assert_eq!(c, vec![5.0; 6]);
        f(2, 3, 0, a, b, &mut c, 3, false);
        assert_eq!(c, vec![0.0; 6]);
    }

    #[test]
    fn empty_k_zeroes_or_keeps_c() {
        check_empty_k(gemm_bf16);
        check_empty_k(gemm_fallback);
    }

    /// Same call twice, then on a 1-thread and a 3-thread pool: identical bits. Shapes with
    /// many tasks and edge blocks, transposed A.
    fn check_deterministic(name: &str, f: Gemm) {
        let mut rng = Rng::new(3);
        for (m, n, k, la) in [(300, 200, 150, 0), (257, 129, 300, 2)] {
            let a = Operand::new(m, k, la, &mut rng);
            let b = Operand::new(k, n, 0, &mut rng);
            let c0: Vec<f32> = (0..m * n).map(|_| rng.normal() as f32).collect();
            let run = || {
                let mut c = c0.clone();
                f(m, n, k, a.view(), b.view(), &mut c, n, true);
                c.iter().map(|x| x.to_bits()).collect::<Vec<u32>>()
            };
            let first = run();
            assert_eq!(first, run(), "{name}: second call differs");
            for threads in [1, 3] {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                assert_eq!(first, pool.install(run), "{name}: differs on {threads} thread(s)");
            }
        }
    }

    #[test]
    fn fallback_is_bit_for_bit_deterministic() {
        check_deterministic("fallback", gemm_fallback);
    }

    /// `gemm_f32` sharing C's rows out over the threads gives, bit for bit, what one
    /// single-threaded gemm call over the whole of C gives, on 1 to 4 threads (ragged last
    /// blocks, too few rows to split, every operand layout), and agrees with an f64 product.
    #[test]
    fn f32_row_split_matches_one_call() {
        let mut rng = Rng::new(4);
        for (m, n, k, layout) in [
            (300, 70, 90, 0),
            (1000, 64, 33, 2),
            (700, 30, 50, 1),
            (129, 5, 300, 3),
            (100, 40, 40, 4),
            (256, 256, 1, 1),
            (130, 2100, 600, 0),
            (256, 1100, 2048, 0), // B beyond the row split's bound: gemm's own split
        ] {
            let a = Operand::new(m, k, layout, &mut rng);
            let b = Operand::new(k, n, layout + 2, &mut rng);
            let mut whole = vec![0f32; m * n];
            gemm_f32_call(m, n, k, a.view(), b.view(), &mut whole, gemm::Parallelism::None);
            for i in 0..m {
                for j in 0..n {
                    let exact: f64 = (0..k).map(|kk| a.view().at(i, kk) as f64 * b.view().at(kk, j) as f64).sum();
                    let got = whole[i * n + j] as f64;
                    assert!((got - exact).abs() <= 1e-4 * (1.0 + exact.abs()), "({i}, {j}): {got} vs {exact}");
                }
            }
            for threads in 1..=4 {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                let mut c = vec![f32::NAN; m * n];
                pool.install(|| gemm_f32(m, n, k, a.view(), b.view(), &mut c));
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
                assert_eq!(bits(&whole), bits(&c), "{m}x{n}x{k}: differs on {threads} thread(s)");
            }
        }
        assert_eq!(f32_rows_per_thread(1024, 2, 64), Some(512));
        assert_eq!(f32_rows_per_thread(256, 2, 64), Some(128));
        assert_eq!(f32_rows_per_thread(1000, 3, 64), Some(384));
        assert_eq!(f32_rows_per_thread(1000, 3, 16), Some(336));
        assert_eq!(f32_rows_per_thread(1440, 2, 16), Some(720));
        assert_eq!(f32_rows_per_thread(688, 2, 16), Some(352));
        assert_eq!(f32_rows_per_thread(254, 2, 16), None);
        assert_eq!(f32_rows_per_thread(256, 16, 64), None);
        assert_eq!(f32_rows_per_thread(2048, 1, 16), None);
    }

    /// The vector packers (row- and column-major tiles, with their transposes) against the
    /// element-by-element ones, on every layout, with edge tiles in both directions.
    #[test]
    #[cfg_attr(not(itt_avx512), ignore = "no AVX-512 on the CPU these tests were built on")]
    fn packers_match_scalar() {
        #[cfg(target_arch = "x86_64")]
        assert!(
            std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512bw"),
            "built on a CPU with AVX-512 but run on one without: run the tests where they were built"
        );
        let (rows, cols) = (72, 100);
        let mut rng = Rng::new(11);
        for layout in 0..5 {
            let (mut x, mut xt) =
                (Operand::new(rows, cols, layout, &mut rng), Operand::new(cols, rows, layout, &mut rng));
            // Special values (ties, NaNs, infinities, subnormals) among the random ones.
            let special =
                [0x3F80_8000u32, 0x3F81_8000, 0x7F80_0001, 0xFFFF_FFFF, 0xFF80_0000, 0x0001_8000, 0x7F7F_FFFF];
            for op in [&mut x, &mut xt] {
                for e in (0..rows * cols).step_by(5) {
                    let (i, j) = (e / op.cols, e % op.cols);
                    op.data[i * op.rs + j * op.cs] = f32::from_bits(special[e % special.len()]);
                }
            }
            // x as A (m = 72, k = 100), xt as B (k = 100, n = 72).
            let (kbc, strips) = (cols.div_ceil(TK), rows.div_ceil(16));
            let mut pa = vec![7u16; strips * kbc * TILE];
            pack_a_block(&x.view(), rows, cols, 0, &mut pa);
            let mut pb = vec![7u32; strips * kbc * TILE / 2];
            pack_b(&xt.view(), cols, rows, &mut pb, true);
            let (mut ta, mut tb) = (vec![0u16; TILE], vec![0u32; TILE / 2]);
            for s in 0..strips {
                for kb in 0..kbc {
                    pack_a_tile_scalar(&x.view(), rows, cols, 16 * s, TK * kb, &mut ta);
                    assert_eq!(&pa[(s * kbc + kb) * TILE..][..TILE], &ta[..], "A layout {layout} tile {s},{kb}");
                    pack_b_tile_scalar(&xt.view(), cols, rows, 16 * s, TK * kb, &mut tb);
                    assert_eq!(
                        &pb[(s * kbc + kb) * TILE / 2..][..TILE / 2],
                        &tb[..],
                        "B layout {layout} tile {s},{kb}"
                    );
                }
            }
        }
    }

    #[test]
    fn rne_rounding() {
        let cases: [(u32, u16); 20] = [
            (0x3F80_0000, 0x3F80), // 1.0
            (0x3F80_8000, 0x3F80), // tie, even below: down
            (0x3F81_8000, 0x3F82), // tie, odd below: up
            (0x3F80_8001, 0x3F81), // just above the tie
            (0x3F80_7FFF, 0x3F80), // just below the tie
            (0xBF81_8000, 0xBF82), // negative tie rounds the magnitude
            (0x3FFF_8000, 0x4000), // carry into the exponent
            (0x7F7F_FFFF, 0x7F80), // f32::MAX rounds to infinity
            (0x7F7F_7FFF, 0x7F7F), // largest value that stays finite
            (0x7F80_0000, 0x7F80), // +inf
            (0xFF80_0000, 0xFF80), // -inf
            (0x7FC0_0000, 0x7FC0), // quiet NaN
            (0x7F80_0001, 0x7FC0), // signalling NaN, payload only in the low half: stays NaN
            (0xFFFF_FFFF, 0xFFFF), // all-ones NaN does not wrap to zero
            (0x8000_0000, 0x8000), // -0
            (0x0000_8000, 0x0000), // subnormal tie, even: down to 0
            (0x0001_8000, 0x0002), // subnormal tie, odd: up
            (0x0000_8001, 0x0001), // rounds up to the smallest bf16 subnormal
            (0x0000_0001, 0x0000), // smallest f32 subnormal
            (0x007F_FFFF, 0x0080), // largest subnormal rounds to the smallest normal
        ];
        for (x, want) in cases {
            let got = to_bf16_bits(f32::from_bits(x));
            assert_eq!(got, want, "{x:#010x}: got {got:#06x}, want {want:#06x}");
        }
        assert!(round_bf16(f32::NAN).is_nan());
        // Against the `half` crate on random bit patterns (it also rounds to nearest even).
        let mut rng = Rng::new(5);
        for _ in 0..100_000 {
            let x = f32::from_bits(rng.next_u64() as u32);
            let want = half::bf16::from_f32(x).to_bits();
            assert_eq!(to_bf16_bits(x), want, "{:#010x}", x.to_bits());
        }
    }
}
