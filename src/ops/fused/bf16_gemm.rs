//! Mixed-precision matrix product for the CPU training path: C = A·B (or C += A·B) with A and B
//! rounded to bf16 (round to nearest even, as torch's autocast casts) and products summed in f32.
//!
//! Two implementations, picked at run time ([`amx_available`]):
//!
//! * **AMX** (Sapphire Rapids and later): A and B are packed into bf16 tiles, A as 16 rows x 32
//!   k-values, B in the "VNNI" pair layout `tdpbf16ps` wants (16 rows of k-pairs x 16 columns,
//!   each 32-bit lane holding B[2p][j] | B[2p+1][j] << 16), zero-padded to whole tiles so any
//!   m, n, k work. A micro-kernel keeps a 32x32 block of C in four accumulator tiles (tmm0-3)
//!   and runs over k with two A tiles (tmm4-5) and two B tiles (tmm6-7).
//! * **Fallback**: the same rounding, written back as f32, then an f32 product with the `gemm`
//!   crate. The two agree up to the order of f32 summation.
//!
//! `ITT_AMX=0` forces the fallback (tests, A/B timing).
//!
//! Determinism: C is split into blocks by the shape alone, each block is computed by one task in
//! a fixed k order, so results are bit-for-bit identical on any number of threads.
//!
//! The AMX instructions are written with `asm!` (stable Rust has no AMX intrinsics); the
//! assembler accepts them without target features. Tile registers are invisible to the compiler,
//! so they keep their contents between `asm!` blocks; every block is side-effecting (no `pure`),
//! so the compiler keeps them in program order.

use super::SharedMut;
use rayon::prelude::*;
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
    if amx_available() {
        gemm_amx(m, n, k, a, b, c, c_rs, accumulate);
    } else {
        gemm_fallback(m, n, k, a, b, c, c_rs, accumulate);
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

#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_fallback(
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

/// Packs one strip of 16 rows of A (rows r0..r0+16, zero beyond m) into `kbc` consecutive
/// tiles: tile kb, row r, column c = bf16(A[r0 + r][kb * 32 + c]), zero beyond k.
#[inline(always)]
fn pack_a_strip_imp(a: &MatRef, m: usize, k: usize, r0: usize, out: &mut [u16]) {
    let kbc = out.len() / TILE;
    let rows = m.saturating_sub(r0).min(16);
    if rows < 16 {
        out.fill(0);
    } else if k % TK != 0 {
        out[(kbc - 1) * TILE..].fill(0);
    }
    if rows == 0 {
        return;
    }
    if a.col_stride == 1 {
        // Row-major A: each tile row is 32 consecutive values.
        for r in 0..rows {
            let row = &a.data[(r0 + r) * a.row_stride..][..k];
            let mut chunks = row.chunks_exact(TK);
            for (kb, src) in (&mut chunks).enumerate() {
                let dst = &mut out[kb * TILE + r * TK..][..TK];
                for (d, &s) in dst.iter_mut().zip(src) {
                    *d = to_bf16_bits(s);
                }
            }
            let rem = chunks.remainder();
            if !rem.is_empty() {
                let dst = &mut out[(kbc - 1) * TILE + r * TK..][..rem.len()];
                for (d, &s) in dst.iter_mut().zip(rem) {
                    *d = to_bf16_bits(s);
                }
            }
        }
    } else if a.row_stride == 1 {
        // Transposed A (the weight gradient's X^T): the 16 rows of one k are consecutive.
        for kk in 0..k {
            let src = &a.data[kk * a.col_stride + r0..][..rows];
            let dst = &mut out[(kk / TK) * TILE + kk % TK..];
            for (r, &s) in src.iter().enumerate() {
                dst[r * TK] = to_bf16_bits(s);
            }
        }
    } else {
        for r in 0..rows {
            for kk in 0..k {
                out[(kk / TK) * TILE + r * TK + kk % TK] = to_bf16_bits(a.at(r0 + r, kk));
            }
        }
    }
}

/// Packs one strip of 16 columns of B (j0..j0+16, zero beyond n) in the pair layout: for
/// k-pair p (tile p / 16, tile row p % 16) and column j, the 32-bit lane
/// out[p * 16 + j] = bf16(B[2p][j0 + j]) | bf16(B[2p + 1][j0 + j]) << 16, zero beyond k.
#[inline(always)]
fn pack_b_strip_imp(b: &MatRef, k: usize, n: usize, j0: usize, out: &mut [u32]) {
    let pairs = out.len() / 16;
    let cols = n.saturating_sub(j0).min(16);
    if cols < 16 {
        out.fill(0);
    } else if k < 2 * pairs {
        out[(k / 2) * 16..].fill(0);
    }
    if cols == 0 {
        return;
    }
    let bits = |kk: usize, j: usize| if kk < k { to_bf16_bits(b.at(kk, j0 + j)) as u32 } else { 0 };
    if b.col_stride == 1 {
        // Row-major B: a tile row interleaves two consecutive rows of 16 columns.
        for p in 0..k / 2 {
            let lo = &b.data[2 * p * b.row_stride + j0..][..cols];
            let hi = &b.data[(2 * p + 1) * b.row_stride + j0..][..cols];
            let dst = &mut out[p * 16..][..cols];
            for ((d, &l), &h) in dst.iter_mut().zip(lo).zip(hi) {
                *d = to_bf16_bits(l) as u32 | (to_bf16_bits(h) as u32) << 16;
            }
        }
        if k % 2 == 1 {
            let p = k / 2;
            for j in 0..cols {
                out[p * 16 + j] = bits(2 * p, j);
            }
        }
    } else if b.row_stride == 1 {
        // B = W^T with W row-major: a column of B is consecutive in memory.
        for j in 0..cols {
            let col = &b.data[(j0 + j) * b.col_stride..][..k];
            let mut chunks = col.chunks_exact(2);
            for (p, s) in (&mut chunks).enumerate() {
                out[p * 16 + j] = to_bf16_bits(s[0]) as u32 | (to_bf16_bits(s[1]) as u32) << 16;
            }
            if let [last] = chunks.remainder() {
                out[(k / 2) * 16 + j] = to_bf16_bits(*last) as u32;
            }
        }
    } else {
        for p in 0..k.div_ceil(2) {
            for j in 0..cols {
                out[p * 16 + j] = bits(2 * p, j) | bits(2 * p + 1, j) << 16;
            }
        }
    }
}

/// The packers compiled for AVX-512 (every AMX CPU has it), where the conversions vectorise.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
unsafe fn pack_a_strip(a: &MatRef, m: usize, k: usize, r0: usize, out: &mut [u16]) {
    pack_a_strip_imp(a, m, k, r0, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
unsafe fn pack_b_strip(b: &MatRef, k: usize, n: usize, j0: usize, out: &mut [u32]) {
    pack_b_strip_imp(b, k, n, j0, out)
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

/// Task grid over C in 32 x 32 micro-blocks: (micro-rows, micro-columns) per task, chosen from
/// the shape alone. Aim for at least 16 tasks so that a few threads balance, without making the
/// tasks so small that the per-task tile setup shows.
fn amx_partition(m32: usize, n32: usize) -> (usize, usize) {
    let mut mb = 4usize.min(m32);
    let mut nb = 8usize.min(n32);
    while m32.div_ceil(mb) * n32.div_ceil(nb) < 16 && (mb > 1 || nb > 1) {
        if nb > 1 && (nb >= mb || mb == 1) {
            nb = nb.div_ceil(2);
        } else {
            mb = mb.div_ceil(2);
        }
    }
    (mb, nb)
}

thread_local! {
    /// Packing buffers kept between calls (a training step calls with the same shapes again and
    /// again): fresh multi-MiB buffers cost page faults on every call.
    static PACK_BUFS: std::cell::RefCell<(Vec<u16>, Vec<u32>)> = const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_amx(m: usize, n: usize, k: usize, a: MatRef, b: MatRef, c: &mut [f32], c_rs: usize, accumulate: bool) {
    assert!(amx_hardware(), "gemm_amx called without AMX");
    if trivial(m, n, k, &a, &b, c, c_rs, accumulate) {
        return;
    }
    // A nested call on this thread (a rayon task of an outer parallel loop that itself calls
    // gemm_bf16) finds the buffers borrowed and allocates its own.
    PACK_BUFS.with(|bufs| match bufs.try_borrow_mut() {
        Ok(mut bufs) => {
            let (pa, pb) = &mut *bufs;
            gemm_amx_with(m, n, k, a, b, c, c_rs, accumulate, pa, pb)
        }
        Err(_) => gemm_amx_with(m, n, k, a, b, c, c_rs, accumulate, &mut Vec::new(), &mut Vec::new()),
    })
}

#[allow(clippy::too_many_arguments)]
fn gemm_amx_with(
    m: usize,
    n: usize,
    k: usize,
    a: MatRef,
    b: MatRef,
    c: &mut [f32],
    c_rs: usize,
    accumulate: bool,
    pa: &mut Vec<u16>,
    pb: &mut Vec<u32>,
) {
    let (m32, n32, kbc) = (m.div_ceil(32), n.div_ceil(32), k.div_ceil(TK));
    let a_strip = kbc * TILE; // u16 per 16-row strip of A
    let b_strip = kbc * TILE / 2; // u32 per 16-column strip of B
    // Every element is written by the packers (zeros included), so old contents do not matter.
    if pa.len() < 2 * m32 * a_strip {
        pa.resize(2 * m32 * a_strip, 0);
    }
    if pb.len() < 2 * n32 * b_strip {
        pb.resize(2 * n32 * b_strip, 0);
    }
    let (pa, pb) = (&mut pa[..2 * m32 * a_strip], &mut pb[..2 * n32 * b_strip]);
    let par = m * n * k >= 1 << 18;
    // SAFETY (packers): amx_hardware checked AVX-512F/BW.
    let pack_a = |(s, out): (usize, &mut [u16])| unsafe { pack_a_strip(&a, m, k, s * 16, out) };
    let pack_b = |(s, out): (usize, &mut [u32])| unsafe { pack_b_strip(&b, k, n, s * 16, out) };
    if par {
        rayon::join(
            || pa.par_chunks_mut(a_strip).enumerate().for_each(pack_a),
            || pb.par_chunks_mut(b_strip).enumerate().for_each(pack_b),
        );
    } else {
        pa.chunks_mut(a_strip).enumerate().for_each(pack_a);
        pb.chunks_mut(b_strip).enumerate().for_each(pack_b);
    }
    let (pa, pb) = (&*pa, &*pb);

    let (mb, nb) = amx_partition(m32, n32);
    let (tm, tn) = (m32.div_ceil(mb), n32.div_ceil(nb));
    let pc = SharedMut(c.as_mut_ptr());
    let task = |t: usize| {
        let (bi, bj) = (t / tn, t % tn);
        // SAFETY: AMX permitted (amx_hardware); this task writes only C's micro-blocks
        // (bi * mb .. + mb) x (bj * nb .. + nb), which no other task touches.
        unsafe {
            let _tiles = TileGuard::new();
            let mut buf = Buf([0f32; 32 * 32]);
            for jj in bj * nb..((bj + 1) * nb).min(n32) {
                for ii in bi * mb..((bi + 1) * mb).min(m32) {
                    let a0 = pa.as_ptr().add(2 * ii * a_strip);
                    let b0 = pb.as_ptr().add(2 * jj * b_strip);
                    let (i0, j0) = (32 * ii, 32 * jj);
                    if i0 + 32 <= m && j0 + 32 <= n {
                        let cp = raw(&pc).add(i0 * c_rs + j0);
                        kernel_32x32(a0, a0.add(a_strip), b0, b0.add(b_strip), kbc, cp, c_rs * 4, accumulate);
                    } else {
                        // Edge block: go through a 32 x 32 buffer, copying C's valid part.
                        let (rows, cols) = ((m - i0).min(32), (n - j0).min(32));
                        if accumulate {
                            buf.0.fill(0.0);
                            for r in 0..rows {
                                let src = std::slice::from_raw_parts(raw(&pc).add((i0 + r) * c_rs + j0), cols);
                                buf.0[r * 32..r * 32 + cols].copy_from_slice(src);
                            }
                        }
                        let bp = buf.0.as_mut_ptr();
                        kernel_32x32(a0, a0.add(a_strip), b0, b0.add(b_strip), kbc, bp, 128, accumulate);
                        for r in 0..rows {
                            let dst = pc.slice((i0 + r) * c_rs + j0, cols);
                            dst.copy_from_slice(&buf.0[r * 32..r * 32 + cols]);
                        }
                    }
                }
            }
        }
    };
    if par {
        (0..tm * tn).into_par_iter().for_each(task);
    } else {
        (0..tm * tn).for_each(task);
    }
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

    #[test]
    fn smoke() {
        if !amx_available() {
            eprintln!("AMX not available");
            return;
        }
        let (m, n, k) = (33, 47, 70);
        let av: Vec<f32> = (0..m * k).map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.37).collect();
        let bv: Vec<f32> = (0..k * n).map(|i| ((i * 5 % 11) as f32 - 5.0) * 0.21).collect();
        let a = MatRef { data: &av, row_stride: k, col_stride: 1 };
        let b = MatRef { data: &bv, row_stride: n, col_stride: 1 };
        let mut c1 = vec![0f32; m * n];
        let mut c2 = vec![0f32; m * n];
        gemm_amx(m, n, k, a, b, &mut c1, n, false);
        gemm_fallback(m, n, k, a, b, &mut c2, n, false);
        let d = c1.iter().zip(&c2).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        assert!(d < 1e-3, "{d}");
    }
}
