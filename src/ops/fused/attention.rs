//! Causal attention, flash-attention style: tiled, online softmax, and the logsumexp of every
//! query row saved so that the backward pass recomputes probabilities tile by tile instead of
//! storing the (Lq, Lk) matrix (Dao et al., FlashAttention-2, Alg. 1 and 2).
//!
//! Shapes. Per sequence s and query head h (kv head g = h / (H / Hkv), grouped-query attention):
//!   Q (Lq_s, hd); K, V (Lk_s, hd) with Lq_s <= Lk_s. Queries are the last Lq_s positions: the
//!   first past_s = Lk_s - Lq_s keys are cached, and query i sees keys 0..=past_s + i.
//!   O = softmax(Q K^T / sqrt(hd) + mask) V: (Lq_s, hd);  lse (Lq_s,) = logsumexp of each row.
//! Memory layouts ([`Side`]): (B, H, L, hd) batches for `causal_sdpa`, and packed tokens
//! (N, H, hd) with per-sequence lengths for `causal_attention_varlen`; no transposes either way.
//!
//! Work items are (sequence, query head) in the forward pass and (sequence, kv head) in the
//! backward pass, so each item owns the gradient rows it writes (dK, dV of its kv head and dQ of
//! the query heads in its group) and no atomics or reductions across threads are needed.

use super::shell::{Grad, Kernel, Shell};
use super::{axpy, dot, madd, max, multiversion, simd_level, sum, with_data, Filled, Real, SharedMut, Simd};
use crate::ops::composed;
use crate::{Error, Result};
use candle_core::{bail, CpuStorage, Shape, Tensor};
use rayon::prelude::*;
use std::sync::{Arc, Mutex};

/// Key columns per tile; query rows per tile.
const BK: usize = 64;
const BQ: usize = 64;

/// Where one operand lives: element (sequence s, head h, row l, d) is at
/// `base[s] + h * head + l * row + d`.
#[derive(Clone, Debug)]
struct Side {
    lens: Vec<usize>,
    base: Vec<usize>,
    head: usize,
    row: usize,
    elems: usize,
}

impl Side {
    /// (B, heads, L, hd) contiguous.
    fn bhld(b: usize, heads: usize, l: usize, hd: usize) -> Side {
        Side {
            lens: vec![l; b],
            base: (0..b).map(|s| s * heads * l * hd).collect(),
            head: l * hd,
            row: hd,
            elems: b * heads * l * hd,
        }
    }

    /// (sum(lens), heads, hd) contiguous, sequences one after another.
    fn packed(lens: &[usize], heads: usize, hd: usize) -> Side {
        let mut base = Vec::with_capacity(lens.len());
        let mut acc = 0;
        for &n in lens {
            base.push(acc * heads * hd);
            acc += n;
        }
        Side { lens: lens.to_vec(), base, head: hd, row: heads * hd, elems: acc * heads * hd }
    }

    #[inline(always)]
    fn at(&self, s: usize, h: usize, l: usize) -> usize {
        self.base[s] + h * self.head + l * self.row
    }
}

#[derive(Clone, Debug)]
struct Geometry {
    h: usize,
    hkv: usize,
    hd: usize,
    q: Side,
    k: Side,
    /// lse of (s, h, i) at `lse_base[s] + h * Lq_s + i`.
    lse_base: Vec<usize>,
    lse_len: usize,
    /// Keys visible to each query, packed over sequences (query i of sequence s at
    /// `q_start[s] + i`), when the queries are not the last Lq of the keys: a routed step
    /// whose selected tokens attend to every token (DESIGN §4.1). `None`: past + i + 1.
    limits: Option<Vec<u32>>,
    q_start: Vec<usize>,
}

impl Geometry {
    fn new(h: usize, hkv: usize, hd: usize, q: Side, k: Side) -> Result<Geometry> {
        if hkv == 0 || !h.is_multiple_of(hkv) {
            return Err(Error::usage(format!("attention: {h} query heads is not a multiple of {hkv} kv heads")));
        }
        if let Some((a, b)) = q.lens.iter().zip(&k.lens).find(|(a, b)| a > b) {
            return Err(Error::usage(format!("attention: {a} queries but only {b} keys in a sequence")));
        }
        let mut lse_base = Vec::with_capacity(q.lens.len());
        let mut q_start = Vec::with_capacity(q.lens.len());
        let (mut acc, mut rows) = (0, 0);
        for &n in &q.lens {
            lse_base.push(acc);
            q_start.push(rows);
            acc += h * n;
            rows += n;
        }
        Ok(Geometry { h, hkv, hd, q, k, lse_base, lse_len: acc, limits: None, q_start })
    }

    /// Keys visible to query i of sequence s.
    #[inline(always)]
    fn limit(&self, s: usize, i: usize) -> usize {
        match &self.limits {
            Some(l) => l[self.q_start[s] + i] as usize,
            None => self.k.lens[s] - self.q.lens[s] + i + 1,
        }
    }

    /// Keys a block of queries i0..i0+bq of sequence s scans: the largest of their limits.
    #[inline(always)]
    fn block_end(&self, s: usize, i0: usize, bq: usize) -> usize {
        (i0..i0 + bq).map(|i| self.limit(s, i)).max().unwrap_or(0)
    }

    /// Too little work to be worth waking other threads (one-token decoding steps): about
    /// sum_s Lq_s * Lk_s * H * hd multiply-adds below 256K.
    fn small(&self) -> bool {
        let work: usize = self.q.lens.iter().zip(&self.k.lens).map(|(&a, &b)| a * b).sum::<usize>() * self.h * self.hd;
        work < 256 * 1024
    }
}

/// Per-thread buffers, reused across work items.
#[derive(Default)]
struct Scratch<T> {
    /// K^T, V^T of the item's kv head: (hd, ld), ld = Lk rounded up to a whole tile.
    kt: Vec<T>,
    vt: Vec<T>,
    /// K of the item's kv head, contiguous (backward): (Lk, hd).
    kc: Vec<T>,
    /// Query tile, pre-scaled: (BQ, hd); dO tile (BQ, hd).
    qs: Vec<T>,
    dot: Vec<T>,
    /// Score / probability tile (BQ, BK) and dP / dS tile (BQ, BK).
    st: Vec<T>,
    dpt: Vec<T>,
    /// Output accumulator (forward) or dQ accumulator (backward): (BQ, hd).
    acc: Vec<T>,
    /// dK, dV accumulators of the kv head: (Lk, hd).
    dk: Vec<T>,
    dv: Vec<T>,
    /// Running max and sum (forward) or lse and delta (backward) of the tile's rows: (BQ,).
    m: Vec<T>,
    l: Vec<T>,
    /// The (sequence, kv head) whose K^T `kt` holds (forward): the query heads of
    /// one group run one after another on a thread and share them, instead of transposing the
    /// same keys once per query head (SmolLM2: 9 query heads on 3 kv heads).
    kv_of: Option<(usize, usize)>,
}

impl<T: Real> Scratch<T> {
    /// Buffers for the backward pass: query tiles of BQ rows.
    fn new(hd: usize) -> Self {
        let z = |n| vec![T::ZERO; n];
        Scratch { dot: z(BQ * hd), dpt: z(BQ * BK), ..Self::forward(hd, BQ) }
    }

    /// Buffers for the forward pass of query tiles of at most `rows` rows. A decode step or a
    /// verify pass has a few queries per sequence: sizing the tiles to them instead of BQ
    /// saves zeroing ~56 KiB per call (48 calls per token of tiny-itt4).
    fn forward(hd: usize, rows: usize) -> Self {
        let z = |n| vec![T::ZERO; n];
        let rows = rows.clamp(1, BQ);
        Scratch { qs: z(rows * hd), st: z(rows * BK), acc: z(rows * hd), m: z(rows), l: z(rows), ..Default::default() }
    }
}

/// X^T of one (sequence, head), blocked by key tile: rows (L, hd) of `x` -> `xt` holding, for
/// each tile of BK keys, its (hd, BK) transpose, contiguous and zero-padded; element (d, j) is
/// at `(j / BK) * hd * BK + d * BK + j % BK`, so tile j0 starts at `j0 * hd` with row stride BK.
/// A row stride of L (the unblocked layout) put the 64 rows a tile product reads 1 KiB apart
/// at L = 256, onto a quarter of L1's sets: the product ran at ~75% of its rate on a 256-byte
/// stride (examples in docs/PERFORMANCE.md).
/// In f32 on AVX-512, whole 16 x 16 blocks go through registers (`transpose16`): the element
/// by element version was ~15% of the forward kernel's time (strided scalar stores).
#[inline(always)]
fn transpose_into<T: Real>(level: Simd, x: &[T], side: &Side, s: usize, h: usize, hd: usize, xt: &mut Vec<T>) {
    let l = side.lens[s];
    xt.clear();
    xt.resize(hd * l.div_ceil(BK) * BK, T::ZERO);
    let at = |d: usize, j: usize| (j / BK) * hd * BK + d * BK + j % BK;
    let mut j0 = 0;
    #[cfg(target_arch = "x86_64")]
    if T::DTYPE == candle_core::DType::F32 && hd.is_multiple_of(16) && level == Simd::Avx512 {
        // SAFETY: T is f32 (checked above), so the slices reinterpret f32 data as f32.
        let (xf, xtf) = unsafe {
            (
                std::slice::from_raw_parts(x.as_ptr() as *const f32, x.len()),
                std::slice::from_raw_parts_mut(xt.as_mut_ptr() as *mut f32, xt.len()),
            )
        };
        while j0 + 16 <= l {
            for d0 in (0..hd).step_by(16) {
                let rows: [&[f32]; 16] = std::array::from_fn(|r| &xf[side.at(s, h, j0 + r) + d0..][..16]);
                // SAFETY: AVX-512 is present (`level` comes from simd_level); rows are 16 floats each; BK is a
                // multiple of 16, so keys j0..j0 + 16 share a tile and the 16 output rows at (d0 + c, j0), c < 16,
                // lie inside xt.
                unsafe { transpose_block_f32(rows, &mut xtf[at(d0, j0)..], BK) };
            }
            j0 += 16;
        }
    }
    #[cfg(target_arch = "x86_64")]
    if T::DTYPE == candle_core::DType::F32 && hd.is_multiple_of(8) && level >= Simd::Avx2 {
        // SAFETY: T is f32 (checked above).
        let (xf, xtf) = unsafe {
            (
                std::slice::from_raw_parts(x.as_ptr() as *const f32, x.len()),
                std::slice::from_raw_parts_mut(xt.as_mut_ptr() as *mut f32, xt.len()),
            )
        };
        while j0 + 8 <= l {
            for d0 in (0..hd).step_by(8) {
                let rows: [&[f32]; 8] = std::array::from_fn(|r| &xf[side.at(s, h, j0 + r) + d0..][..8]);
                // SAFETY: AVX2 is present (`level`); rows are 8 floats each; BK is a multiple
                // of 8, so keys j0..j0 + 8 share a tile and the 8 output rows at (d0 + c, j0),
                // c < 8, lie inside xt.
                unsafe { transpose_block8_f32(rows, &mut xtf[at(d0, j0)..], BK) };
            }
            j0 += 8;
        }
    }
    for j in j0..l {
        let row = &x[side.at(s, h, j)..][..hd];
        for (d, &v) in row.iter().enumerate() {
            xt[at(d, j)] = v;
        }
    }
}

/// out[c * ld + r] = rows[r][c] for a 16 x 16 block.
///
/// # Safety
/// The CPU has AVX-512F/BW; every row holds at least 16 values (both are what the caller
/// checks; the output's length is asserted).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn transpose_block_f32(rows: [&[f32]; 16], out: &mut [f32], ld: usize) {
    use std::arch::x86_64::*;
    assert!(out.len() >= 15 * ld + 16);
    // SAFETY: each row holds 16 f32 (the caller's contract), one unaligned 64-byte load.
    let r: [__m512i; 16] = std::array::from_fn(|i| unsafe { _mm512_loadu_si512(rows[i].as_ptr() as *const __m512i) });
    let t = super::bf16_gemm::simd::transpose16(r);
    for (c, v) in t.into_iter().enumerate() {
        // SAFETY: out.len() >= 15 * ld + 16 (asserted above), so the 16 floats at c * ld, c < 16,
        // lie inside `out`.
        unsafe { _mm512_storeu_si512(out.as_mut_ptr().add(c * ld) as *mut __m512i, v) };
    }
}

/// out[c * ld + r] = rows[r][c] for an 8 x 8 block (AVX2): the element by element copy it
/// replaces was, with one query per head, as much work as the attention itself (a decoding
/// step transposes every cached key of every layer).
///
/// # Safety
/// The CPU has AVX2; every row holds at least 8 values (the output's length is asserted).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn transpose_block8_f32(rows: [&[f32]; 8], out: &mut [f32], ld: usize) {
    use std::arch::x86_64::*;
    assert!(out.len() >= 7 * ld + 8);
    // SAFETY: each row holds 8 f32 (the caller's contract), one unaligned 32-byte load.
    let r: [__m256; 8] = std::array::from_fn(|i| unsafe { _mm256_loadu_ps(rows[i].as_ptr()) });
    let t0 = _mm256_unpacklo_ps(r[0], r[1]);
    let t1 = _mm256_unpackhi_ps(r[0], r[1]);
    let t2 = _mm256_unpacklo_ps(r[2], r[3]);
    let t3 = _mm256_unpackhi_ps(r[2], r[3]);
    let t4 = _mm256_unpacklo_ps(r[4], r[5]);
    let t5 = _mm256_unpackhi_ps(r[4], r[5]);
    let t6 = _mm256_unpacklo_ps(r[6], r[7]);
    let t7 = _mm256_unpackhi_ps(r[6], r[7]);
    let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
    let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
    let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
    let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
    let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
    let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
    let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
    let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
    let cols = [
        _mm256_permute2f128_ps::<0x20>(u0, u4),
        _mm256_permute2f128_ps::<0x20>(u1, u5),
        _mm256_permute2f128_ps::<0x20>(u2, u6),
        _mm256_permute2f128_ps::<0x20>(u3, u7),
        _mm256_permute2f128_ps::<0x31>(u0, u4),
        _mm256_permute2f128_ps::<0x31>(u1, u5),
        _mm256_permute2f128_ps::<0x31>(u2, u6),
        _mm256_permute2f128_ps::<0x31>(u3, u7),
    ];
    for (c, v) in cols.into_iter().enumerate() {
        // SAFETY: out.len() >= 7 * ld + 8 (asserted above).
        unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(c * ld), v) };
    }
}

/// Rows (L, hd) of one (sequence, head) of `x`, copied contiguous into `out`.
#[inline(always)]
fn gather_into<T: Real>(x: &[T], side: &Side, s: usize, h: usize, hd: usize, out: &mut Vec<T>) {
    out.clear();
    for j in 0..side.lens[s] {
        out.extend_from_slice(&x[side.at(s, h, j)..][..hd]);
    }
}

/// Widest register panel of [`Tile::gemm_acc`] per instruction set: 64 columns (four AVX-512 vectors
/// of f32) where there are 32 vector registers of 16 lanes; 16 columns (two AVX2 vectors, or four
/// 128-bit ones) elsewhere. A 6-row block keeps 6 x W / lanes accumulators in registers: 24 of
/// AVX-512's 32, 12 of AVX2's 16. With W = 64 under AVX2 that was 48 accumulators for 16
/// registers, spilled to the stack at every multiply-add: the AVX2 tile product took 15% of a
/// `small-itt4` step against AVX-512's 6% (`perf`, `ITT_SIMD=avx2` on an Intel Xeon), where the
/// vector width alone accounts for 2x.
const NR_AVX512: usize = 64;
const NR_NARROW: usize = 16;

/// The operands of one tile product, c (m, n) += a (m, k) . b (k, n), row-major with leading
/// dimensions lda and ldb (c's ldc is given with c). With `a_transposed`, a is stored (k, m):
/// element (i, kk) at `a[kk * lda + i]`, so P^T dO and dS^T Q need no transposed copy of the tile.
#[derive(Clone, Copy)]
struct Tile<'a, T> {
    m: usize,
    n: usize,
    k: usize,
    a: &'a [T],
    lda: usize,
    a_transposed: bool,
    b: &'a [T],
    ldb: usize,
}

impl<T: Real> Tile<'_, T> {
    /// c += a . b: every product of the kernel, `TA` standing for `a_transposed`. Columns go in
    /// panels of `W`, then `W2` = W / 2, then `W4` = W / 4 (a head of 32 or 96 dimensions, whose
    /// products with n = hd would otherwise run row by row under AVX-512), the last < W / 4 row
    /// by row with axpy (the widths are three parameters because a const expression of a generic
    /// one is not stable Rust); within a panel, rows go in register blocks of 6, then 4, then one
    /// at a time. A 6 x 64 block under AVX-512 keeps its 24 accumulators in registers while k
    /// runs (24 FMAs per 4 loads of b and 6 broadcasts of a): ~1.15x the 4-row block's rate on a
    /// 64 x 64 x 64 product in L1. Every path adds the k products into each element of c in the
    /// same order with the same multiply-add, so neither the blocking nor `W` changes any bits.
    #[inline(always)]
    fn gemm_acc<const FMA: bool, const TA: bool, const W: usize, const W2: usize, const W4: usize>(
        &self,
        c: &mut [T],
        ldc: usize,
    ) {
        let Tile { m, n, k, a, lda, b, ldb, .. } = *self;
        let a_at = |i: usize, kk: usize| if TA { a[kk * lda + i] } else { a[i * lda + kk] };
        let mut j0 = 0;
        while j0 + W <= n {
            self.panel::<FMA, TA, W>(j0, c, ldc);
            j0 += W;
        }
        if j0 + W2 <= n {
            self.panel::<FMA, TA, W2>(j0, c, ldc);
            j0 += W2;
        }
        if j0 + W4 <= n {
            self.panel::<FMA, TA, W4>(j0, c, ldc);
            j0 += W4;
        }
        if j0 < n {
            let w = n - j0;
            for i in 0..m {
                let cr = &mut c[i * ldc + j0..][..w];
                for kk in 0..k {
                    axpy::<T, FMA>(a_at(i, kk), &b[kk * ldb + j0..][..w], cr);
                }
            }
        }
    }

    /// Columns j0..j0 + C of [`Tile::gemm_acc`], every row: blocks of 6 rows, then 4, then 1.
    #[inline(always)]
    fn panel<const FMA: bool, const TA: bool, const C: usize>(&self, j0: usize, c: &mut [T], ldc: usize) {
        let mut i = 0;
        while i + 6 <= self.m {
            self.block::<FMA, TA, 6, C>(i, j0, c, ldc);
            i += 6;
        }
        if i + 4 <= self.m {
            self.block::<FMA, TA, 4, C>(i, j0, c, ldc);
            i += 4;
        }
        while i < self.m {
            self.block::<FMA, TA, 1, C>(i, j0, c, ldc);
            i += 1;
        }
    }

    /// Rows i..i + R, columns j0..j0 + C of [`Tile::gemm_acc`], accumulators in registers.
    #[inline(always)]
    fn block<const FMA: bool, const TA: bool, const R: usize, const C: usize>(
        &self,
        i: usize,
        j0: usize,
        c: &mut [T],
        ldc: usize,
    ) {
        let Tile { k, a, lda, b, ldb, .. } = *self;
        if k == 0 {
            return; // c += nothing
        }
        let mut acc = [[T::ZERO; C]; R];
        for (r, row) in acc.iter_mut().enumerate() {
            row.copy_from_slice(&c[(i + r) * ldc + j0..][..C]);
        }
        // A function, not a closure: a closure here was not always inlined into the caller's
        // target features and then ran `fmaf` in software (6x slower at hd 32).
        #[inline(always)]
        fn step<T: Real, const FMA: bool, const R: usize, const C: usize>(
            acc: &mut [[T; C]; R],
            xs: [T; R],
            bv: &[T; C],
        ) {
            for r in 0..R {
                let x = xs[r];
                for j in 0..C {
                    acc[r][j] = madd::<T, FMA>(x, bv[j], acc[r][j]);
                }
            }
        }
        // Every index the loop reads is checked once here, not per k: with a bounds check on
        // each of the 6 rows' loads and on the row of b, the AVX2 loop held 6 slice lengths in
        // general registers, spilled its pointers to the stack and ran ~30 instructions around
        // its 12 FMAs (perf annotate, AMD Zen 3); the checks below cover the same reads.
        assert!((k - 1) * ldb + j0 + C <= b.len(), "tile product: b too short");
        if TA {
            assert!((k - 1) * lda + i + R <= a.len(), "tile product: a too short");
        } else {
            assert!((i + R - 1) * lda + k <= a.len(), "tile product: a too short");
        }
        let (ap, bp) = (a.as_ptr(), b.as_ptr());
        if TA {
            for kk in 0..k {
                // SAFETY: kk < k, so kk * ldb + j0 + C and kk * lda + i + R are within the
                // bounds asserted above; [T; C] and [T; R] have T's alignment.
                let (bv, xs) =
                    unsafe { (&*(bp.add(kk * ldb + j0) as *const [T; C]), *(ap.add(kk * lda + i) as *const [T; R])) };
                step::<T, FMA, R, C>(&mut acc, xs, bv);
            }
        } else {
            for kk in 0..k {
                // SAFETY: kk < k and r < R, so (i + r) * lda + kk and kk * ldb + j0 + C are
                // within the bounds asserted above; [T; C] has T's alignment.
                let (bv, xs) = unsafe {
                    (&*(bp.add(kk * ldb + j0) as *const [T; C]), std::array::from_fn(|r| *ap.add((i + r) * lda + kk)))
                };
                step::<T, FMA, R, C>(&mut acc, xs, bv);
            }
        }
        for (r, row) in acc.iter().enumerate() {
            c[(i + r) * ldc + j0..][..C].copy_from_slice(row);
        }
    }

    /// The product with panels `W`, `W2`, `W4` wide ([`Tile::gemm_acc`]).
    #[inline(always)]
    fn run<const FMA: bool, const W: usize, const W2: usize, const W4: usize>(&self, c: &mut [T], ldc: usize) {
        if self.a_transposed {
            self.gemm_acc::<FMA, true, W, W2, W4>(c, ldc)
        } else {
            self.gemm_acc::<FMA, false, W, W2, W4>(c, ldc)
        }
    }

    /// Under 16 vector registers: narrow panels for blocks of 4 and 6 rows, the wide ones when
    /// every row goes alone (m < 4: a decoding step's one query, whose 1 x 64 block holds 8
    /// accumulators; narrow panels there read that row four times and were ~6% slower).
    #[inline(always)]
    fn run_narrow<const FMA: bool>(&self, c: &mut [T], ldc: usize) {
        if self.m < 4 {
            self.run::<FMA, NR_AVX512, { NR_AVX512 / 2 }, { NR_AVX512 / 4 }>(c, ldc)
        } else {
            self.run::<FMA, NR_NARROW, { NR_NARROW / 2 }, { NR_NARROW / 4 }>(c, ldc)
        }
    }
}

/// One tile product ([`Tile::gemm_acc`]) in a function of its own: inlined into the attention items,
/// the 16 accumulators competed with the exp constants for registers and LLVM kept them on the
/// stack (perf annotate: spills around every FMA of the backward kernel). Dispatched by hand
/// rather than with `multiversion!`, whose copies share one body: the panel width differs by
/// instruction set ([`NR_AVX512`], [`NR_NARROW`]).
#[inline(never)]
#[allow(clippy::too_many_arguments)]
fn tile_product<T: Real>(
    simd: Simd,
    m: usize,
    n: usize,
    k: usize,
    a: &[T],
    lda: usize,
    a_transposed: bool,
    b: &[T],
    ldb: usize,
    c: &mut [T],
    ldc: usize,
) {
    /// # Safety
    /// The CPU has AVX-512 F/BW/DQ/VL (`Simd::Avx512`).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
    unsafe fn avx512<T: Real>(t: &Tile<T>, c: &mut [T], ldc: usize) {
        t.run::<true, NR_AVX512, { NR_AVX512 / 2 }, { NR_AVX512 / 4 }>(c, ldc)
    }

    /// # Safety
    /// The CPU has AVX2 and FMA (`Simd::Avx2` or better).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn avx2<T: Real>(t: &Tile<T>, c: &mut [T], ldc: usize) {
        t.run_narrow::<true>(c, ldc)
    }

    let t = Tile { m, n, k, a, lda, a_transposed, b, ldb };
    match simd {
        // SAFETY: `simd_level` only reports instruction sets the CPU has.
        #[cfg(target_arch = "x86_64")]
        Simd::Avx512 => unsafe { avx512(&t, c, ldc) },
        #[cfg(target_arch = "x86_64")]
        Simd::Avx2 => unsafe { avx2(&t, c, ldc) },
        _ => t.run_narrow::<false>(c, ldc),
    }
}

multiversion! {
    /// Forward pass of one (sequence s, query head h): writes its rows of `out` and `lse`.
    fn fwd_item<T: Real, const FMA: bool>(
        level: Simd,
        g: &Geometry,
        s: usize,
        h: usize,
        scale: T,
        q: &[T],
        k: &[T],
        v: &[T],
        out: SharedMut<T>,
        lse: SharedMut<T>,
        scr: &mut Scratch<T>,
    ) {
        let (lq, hd) = (g.q.lens[s], g.hd);
        let kvh = h / (g.h / g.hkv);
        if scr.kv_of != Some((s, kvh)) {
            transpose_into(level, k, &g.k, s, kvh, hd, &mut scr.kt);
            scr.kv_of = Some((s, kvh));
        }
        let Scratch { kt, qs, st, acc, m, l, .. } = scr;
        for i0 in (0..lq).step_by(BQ) {
            let bq = BQ.min(lq - i0);
            for i in 0..bq {
                let row = &q[g.q.at(s, h, i0 + i)..][..hd];
                for (o, &x) in qs[i * hd..][..hd].iter_mut().zip(row) {
                    *o = x * scale;
                }
            }
            m[..bq].fill(T::NEG_INF);
            l[..bq].fill(T::ZERO);
            acc[..bq * hd].fill(T::ZERO);
            let kend = g.block_end(s, i0, bq);
            for j0 in (0..kend).step_by(BK) {
                let kc = BK.min(kend - j0);
                st[..bq * BK].fill(T::ZERO);
                tile_product::<T>(level, bq, BK, hd, qs, hd, false, &kt[j0 * hd..], BK, st, BK); // S = Qs K^T: (bq, BK)
                for i in 0..bq {
                    let row = &mut st[i * BK..][..BK];
                    // Keys < lim are visible to this query; masked entries become p = 0.
                    let lim = g.limit(s, i0 + i);
                    if lim <= j0 {
                        row.fill(T::ZERO);
                        continue;
                    }
                    let c = BK.min(lim - j0);
                    let m_new = m[i].maxv(max(&row[..c]));
                    let alpha = if m[i] == T::NEG_INF { T::ZERO } else { (m[i] - m_new).exp() };
                    for x in row[..c].iter_mut() {
                        *x = (*x - m_new).exp();
                    }
                    row[c..].fill(T::ZERO);
                    l[i] = l[i] * alpha + sum(&row[..c]);
                    m[i] = m_new;
                    if alpha != T::ONE {
                        acc[i * hd..][..hd].iter_mut().for_each(|x| *x *= alpha);
                    }
                }
                // O += P V, V read in place (row stride of its layout): a contiguous copy per
                // head was ~4% of a SmolLM2 decoding step (memmove, perf).
                let vr = &v[g.k.at(s, kvh, j0)..];
                tile_product::<T>(level, bq, hd, kc, st, BK, false, vr, g.k.row, acc, hd);
            }
            for i in 0..bq {
                let inv = T::ONE / l[i];
                // SAFETY: rows (s, h, i0 + i) of `out` and `lse` belong to this work item only.
                let o = unsafe { out.slice(g.q.at(s, h, i0 + i), hd) };
                for (o, &a) in o.iter_mut().zip(&acc[i * hd..][..hd]) {
                    *o = a * inv;
                }
                unsafe { lse.slice(g.lse_base[s] + h * lq + i0 + i, 1)[0] = m[i] + l[i].ln() };
            }
        }
    }
}

multiversion! {
    /// Backward pass of one (sequence s, kv head g): dK, dV of that head and dQ of the query
    /// heads that share it.
    fn bwd_item<T: Real, const FMA: bool>(
        level: Simd,
        g: &Geometry,
        s: usize,
        kvh: usize,
        scale: T,
        q: &[T],
        k: &[T],
        v: &[T],
        o: &[T],
        d_o: &[T],
        lse: &[T],
        dq: SharedMut<T>,
        dk: SharedMut<T>,
        dv: SharedMut<T>,
        scr: &mut Scratch<T>,
    ) {
        let (lq, lk, hd) = (g.q.lens[s], g.k.lens[s], g.hd);
        let rep = g.h / g.hkv;
        transpose_into(level, k, &g.k, s, kvh, hd, &mut scr.kt);
        transpose_into(level, v, &g.k, s, kvh, hd, &mut scr.vt);
        gather_into(k, &g.k, s, kvh, hd, &mut scr.kc);
        scr.dk.clear();
        scr.dk.resize(lk * hd, T::ZERO);
        scr.dv.clear();
        scr.dv.resize(lk * hd, T::ZERO);
        let Scratch { kt, vt, kc: kcont, qs, dot: dot_t, st, dpt, acc: dq_t, dk: dk_acc, dv: dv_acc, m: lse_t, l: delta, .. } = scr;
        for h in kvh * rep..(kvh + 1) * rep {
            for i0 in (0..lq).step_by(BQ) {
                let bq = BQ.min(lq - i0);
                for i in 0..bq {
                    let at = g.q.at(s, h, i0 + i);
                    for (o, &x) in qs[i * hd..][..hd].iter_mut().zip(&q[at..][..hd]) {
                        *o = x * scale;
                    }
                    dot_t[i * hd..][..hd].copy_from_slice(&d_o[at..][..hd]);
                    // delta_i = rowsum(dO * O) = sum_j P_ij dP_ij.
                    delta[i] = dot(&d_o[at..][..hd], &o[at..][..hd]);
                    lse_t[i] = lse[g.lse_base[s] + h * lq + i0 + i];
                }
                dq_t[..bq * hd].fill(T::ZERO);
                let kend = g.block_end(s, i0, bq);
                for j0 in (0..kend).step_by(BK) {
                    let kc = BK.min(kend - j0);
                    st[..bq * BK].fill(T::ZERO);
                    dpt[..bq * BK].fill(T::ZERO);
                    tile_product::<T>(level, bq, BK, hd, qs, hd, false, &kt[j0 * hd..], BK, st, BK); // S = Qs K^T
                    tile_product::<T>(level, bq, BK, hd, dot_t, hd, false, &vt[j0 * hd..], BK, dpt, BK); // dP = dO V^T
                    for i in 0..bq {
                        let (p, ds) = (&mut st[i * BK..][..BK], &mut dpt[i * BK..][..BK]);
                        let lim = g.limit(s, i0 + i);
                        let c = if lim <= j0 { 0 } else { BK.min(lim - j0) };
                        let (li, di) = (lse_t[i], delta[i]);
                        for (p, ds) in p[..c].iter_mut().zip(ds[..c].iter_mut()) {
                            *p = (*p - li).exp();
                            *ds = *p * (*ds - di);
                        }
                        p[c..].fill(T::ZERO);
                        ds[c..].fill(T::ZERO);
                    }
                    tile_product::<T>(level, kc, hd, bq, st, BK, true, dot_t, hd, &mut dv_acc[j0 * hd..], hd); // dV += P^T dO
                    tile_product::<T>(level, kc, hd, bq, dpt, BK, true, qs, hd, &mut dk_acc[j0 * hd..], hd); // dK += dS^T Qs
                    tile_product::<T>(level, bq, hd, kc, dpt, BK, false, &kcont[j0 * hd..], hd, dq_t, hd); // dQ += dS K
                }
                for i in 0..bq {
                    // SAFETY: query head h is in this item's group, so its dQ rows are ours.
                    let dst = unsafe { dq.slice(g.q.at(s, h, i0 + i), hd) };
                    for (d, &x) in dst.iter_mut().zip(&dq_t[i * hd..][..hd]) {
                        *d = x * scale;
                    }
                }
            }
        }
        for j in 0..lk {
            let at = g.k.at(s, kvh, j);
            // SAFETY: rows of kv head (s, kvh) in dK and dV belong to this item.
            unsafe {
                dk.slice(at, hd).copy_from_slice(&dk_acc[j * hd..][..hd]);
                dv.slice(at, hd).copy_from_slice(&dv_acc[j * hd..][..hd]);
            }
        }
    }
}

struct FlashAttention {
    g: Arc<Geometry>,
    scale: f64,
    /// logsumexp per query row, (lse_len,), set by the forward pass for the backward pass.
    lse: Mutex<Option<CpuStorage>>,
}

impl FlashAttention {
    /// (O, lse).
    fn attend<T: Real>(&self, q: &[T], k: &[T], v: &[T]) -> candle_core::Result<(Vec<T>, Vec<T>)> {
        let g = &*self.g;
        if q.len() != g.q.elems || k.len() != g.k.elems || v.len() != g.k.elems {
            bail!("attention: tensor sizes do not match the sequence lengths");
        }
        let (mut out, mut lse) = (Filled::new(g.q.elems), Filled::new(g.lse_len));
        let (po, pl) = (out.ptr(), lse.ptr());
        let simd = simd_level();
        let scale = T::of(self.scale);
        let items: Vec<(usize, usize)> =
            (0..g.q.lens.len()).filter(|&s| g.q.lens[s] > 0).flat_map(|s| (0..g.h).map(move |h| (s, h))).collect();
        let run = |scr: &mut Scratch<T>, &(s, h): &(usize, usize)| {
            fwd_item::<T>(simd, simd, g, s, h, scale, q, k, v, po, pl, scr)
        };
        let rows = g.q.lens.iter().copied().max().unwrap_or(1);
        if g.small() {
            let mut scr = Scratch::forward(g.hd, rows);
            items.iter().for_each(|it| run(&mut scr, it));
        } else {
            items.par_iter().for_each_init(|| Scratch::forward(g.hd, rows), run);
        }
        // SAFETY: the items cover every (sequence, head) with queries, hence every query row.
        Ok(unsafe { (out.assume_filled(), lse.assume_filled()) })
    }

    /// (dQ, dK, dV).
    #[allow(clippy::type_complexity)]
    fn grads<T: Real>(
        &self,
        q: &[T],
        k: &[T],
        v: &[T],
        o: &[T],
        d_o: &[T],
    ) -> candle_core::Result<(Vec<T>, Vec<T>, Vec<T>)> {
        let g = &*self.g;
        let guard = self.lse.lock().unwrap();
        let Some(lse) = guard.as_ref() else { bail!("attention backward before its forward pass") };
        let lse = T::cpu_storage_as_slice(lse)?;
        // dK and dV stay zero for keys of sequences without queries; dQ is written everywhere.
        let mut dq = Filled::new(g.q.elems);
        let mut dk = vec![T::ZERO; g.k.elems];
        let mut dv = vec![T::ZERO; g.k.elems];
        let (pq, pk, pv) = (dq.ptr(), SharedMut(dk.as_mut_ptr()), SharedMut(dv.as_mut_ptr()));
        let simd = simd_level();
        let scale = T::of(self.scale);
        let items: Vec<(usize, usize)> =
            (0..g.q.lens.len()).filter(|&s| g.q.lens[s] > 0).flat_map(|s| (0..g.hkv).map(move |h| (s, h))).collect();
        let run = |scr: &mut Scratch<T>, &(s, h): &(usize, usize)| {
            bwd_item::<T>(simd, simd, g, s, h, scale, q, k, v, o, d_o, lse, pq, pk, pv, scr)
        };
        if g.small() {
            let mut scr = Scratch::new(g.hd);
            items.iter().for_each(|it| run(&mut scr, it));
        } else {
            items.par_iter().for_each_init(|| Scratch::new(g.hd), run);
        }
        // SAFETY: each query head's rows are written by the item of its kv head.
        Ok((unsafe { dq.assume_filled() }, dk, dv))
    }
}

impl Kernel<3> for FlashAttention {
    const NAME: &'static str = "itt-flash-attention";
    const WHAT: &'static str = "attention";

    fn forward<T: Real>(&self, [q, k, v]: [&[T]; 3], shapes: [&Shape; 3]) -> candle_core::Result<(Vec<T>, Shape)> {
        let (out, lse) = self.attend(q, k, v)?;
        *self.lse.lock().unwrap() = Some(T::to_cpu_storage_owned(lse));
        Ok((out, shapes[0].clone()))
    }

    fn backward<T: Real>(
        &self,
        _: [&Tensor; 3],
        [q, k, v]: [&[T]; 3],
        out: &[T],
        d_out: &[T],
    ) -> candle_core::Result<[Grad<T>; 3]> {
        let (dq, dk, dv) = self.grads(q, k, v, out, d_out)?;
        Ok([Grad::Values(dq), Grad::Values(dk), Grad::Values(dv)])
    }
}

fn apply(q: &Tensor, k: &Tensor, v: &Tensor, g: Geometry) -> Result<Tensor> {
    let scale = 1.0 / (g.hd as f64).sqrt();
    let op = FlashAttention { g: Arc::new(g), scale, lse: Mutex::new(None) };
    Ok(q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, Shell(op))?)
}

/// Fused twin of `composed::causal_sdpa`.
/// q: (B, H, Lq, hd); k, v: (B, Hkv, Lk, hd) with Lk = past + Lq -> (B, H, Lq, hd).
pub fn causal_sdpa(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let (b, h, lq, hd) = q.dims4()?;
    let (bk, hkv, lk, hdk) = k.dims4()?;
    if bk != b || hdk != hd || v.dims() != k.dims() || lk < lq {
        return Err(Error::usage(format!(
            "attention: q {:?}, k {:?}, v {:?} do not fit (B, H, Lq, hd), (B, Hkv, Lk >= Lq, hd)",
            q.dims(),
            k.dims(),
            v.dims()
        )));
    }
    if q.elem_count() == 0 {
        return composed::causal_sdpa(q, k, v);
    }
    apply(q, k, v, Geometry::new(h, hkv, hd, Side::bhld(b, h, lq, hd), Side::bhld(b, hkv, lk, hd))?)
}

/// Fused twin of `composed::causal_attention_varlen`: packed sequences, each with its queries
/// the last `lens_q[s]` of its `lens_k[s]` keys.
/// q: (sum lens_q, H, hd); k, v: (sum lens_k, Hkv, hd) -> (sum lens_q, H, hd).
pub fn causal_attention_varlen(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    lens_q: &[usize],
    lens_k: &[usize],
) -> Result<Tensor> {
    let (nq, h, hkv, hd) = check_varlen(q, k, v, lens_q, lens_k)?;
    if nq == 0 {
        return Ok(Tensor::zeros((0, h, hd), q.dtype(), q.device())?);
    }
    apply(q, k, v, Geometry::new(h, hkv, hd, Side::packed(lens_q, h, hd), Side::packed(lens_k, hkv, hd))?)
}

/// Causal attention of packed queries over per-sequence keys and values read where they lie
/// (each sequence's KV-cache buffers), with no gather into one packed tensor: the decode path
/// of a batch (DESIGN §12). Inference only (no backward pass); its oracle is
/// `causal_attention_varlen` on the concatenated keys and values.
/// q: (sum lens_q, H, hd) f32; ks[s], vs[s]: (Lk_s, Hkv, hd), the queries of sequence s being
/// the last `lens_q[s]` of its keys -> (sum lens_q, H, hd).
pub fn causal_attention_kv_slices(q: &Tensor, ks: &[Tensor], vs: &[Tensor], lens_q: &[usize]) -> Result<Tensor> {
    let (nq, h, hd) = q.dims3()?;
    if ks.len() != lens_q.len() || vs.len() != lens_q.len() || lens_q.iter().sum::<usize>() != nq {
        return Err(Error::usage("attention: keys, values and query lengths do not match (internal error)"));
    }
    let mut lens_k = Vec::with_capacity(ks.len());
    let mut hkv = 0;
    for (k, v) in ks.iter().zip(vs) {
        let (lk, hk, hdk) = k.dims3()?;
        if v.dims() != k.dims() || hdk != hd || (hkv != 0 && hk != hkv) {
            return Err(Error::usage(format!(
                "attention: cached keys {:?} and values {:?} do not match",
                k.dims(),
                v.dims()
            )));
        }
        hkv = hk;
        lens_k.push(lk);
    }
    if nq == 0 {
        return Ok(Tensor::zeros((0, h, hd), q.dtype(), q.device())?);
    }
    let mut k_side = Side::packed(&lens_k, hkv, hd);
    // Every sequence's keys start at the beginning of its own buffer.
    k_side.base = vec![0; lens_k.len()];
    let g = Geometry::new(h, hkv, hd, Side::packed(lens_q, h, hd), k_side)?;
    let (ks, vs): (Vec<Tensor>, Vec<Tensor>) = (
        ks.iter().map(|t| t.contiguous()).collect::<candle_core::Result<_>>()?,
        vs.iter().map(|t| t.contiguous()).collect::<candle_core::Result<_>>()?,
    );
    let kg: Vec<_> = ks.iter().map(|t| t.storage_and_layout()).collect();
    let vg: Vec<_> = vs.iter().map(|t| t.storage_and_layout()).collect();
    let kd: Vec<&[f32]> =
        kg.iter().map(|(s, l)| super::tensor_data::<f32>(s, l)).collect::<candle_core::Result<_>>()?;
    let vd: Vec<&[f32]> =
        vg.iter().map(|(s, l)| super::tensor_data::<f32>(s, l)).collect::<candle_core::Result<_>>()?;
    let out = with_data::<f32, _>(q, |qd| {
        let (mut out, mut lse) = (Filled::new(g.q.elems), Filled::new(g.lse_len));
        let (po, pl) = (out.ptr(), lse.ptr());
        let simd = simd_level();
        let scale = (1.0 / (hd as f64).sqrt()) as f32;
        let items: Vec<(usize, usize)> =
            (0..lens_q.len()).filter(|&s| lens_q[s] > 0).flat_map(|s| (0..h).map(move |hh| (s, hh))).collect();
        let run = |scr: &mut Scratch<f32>, &(s, hh): &(usize, usize)| {
            fwd_item::<f32>(simd, simd, &g, s, hh, scale, qd, kd[s], vd[s], po, pl, scr)
        };
        let rows = lens_q.iter().copied().max().unwrap_or(1);
        if g.small() {
            let mut scr = Scratch::forward(hd, rows);
            items.iter().for_each(|it| run(&mut scr, it));
        } else {
            items.par_iter().for_each_init(|| Scratch::forward(hd, rows), run);
        }
        // SAFETY: the items cover every (sequence, head) with queries, hence every query row.
        Ok(unsafe { out.assume_filled() })
    })?;
    Ok(Tensor::from_vec(out, (nq, h, hd), q.device())?)
}

/// Shapes of packed attention: (queries, heads, kv heads, head dim).
fn check_varlen(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    lens_q: &[usize],
    lens_k: &[usize],
) -> Result<(usize, usize, usize, usize)> {
    let (nq, h, hd) = q.dims3()?;
    let (nk, hkv, hdk) = k.dims3()?;
    if lens_q.len() != lens_k.len()
        || lens_q.iter().sum::<usize>() != nq
        || lens_k.iter().sum::<usize>() != nk
        || hdk != hd
        || v.dims() != k.dims()
    {
        return Err(Error::usage(format!(
            "attention: q {:?}, k {:?}, v {:?} do not match {} query and {} key lengths",
            q.dims(),
            k.dims(),
            v.dims(),
            lens_q.len(),
            lens_k.len()
        )));
    }
    Ok((nq, h, hkv, hd))
}

/// Fused twin of `composed::attention_varlen_limited`: packed sequences whose queries see the
/// first `limits[r]` keys of their sequence (query row r, packed), any subset of positions:
/// the selected tokens of a routed step attending to every token before them (DESIGN §4.1).
/// q: (sum lens_q, H, hd); k, v: (sum lens_k, Hkv, hd); limits: (sum lens_q,), each in
/// 1..=lens_k[s] -> (sum lens_q, H, hd).
pub fn attention_varlen_limited(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    lens_q: &[usize],
    lens_k: &[usize],
    limits: &[u32],
) -> Result<Tensor> {
    let (nq, h, hkv, hd) = check_varlen(q, k, v, lens_q, lens_k)?;
    check_limits(lens_q, lens_k, limits)?;
    if nq == 0 {
        return Ok(Tensor::zeros((0, h, hd), q.dtype(), q.device())?);
    }
    let mut g = Geometry::new(h, hkv, hd, Side::packed(lens_q, h, hd), Side::packed(lens_k, hkv, hd))?;
    g.limits = Some(limits.to_vec());
    apply(q, k, v, g)
}

/// Each query sees at least one key and at most its sequence's keys.
pub fn check_limits(lens_q: &[usize], lens_k: &[usize], limits: &[u32]) -> Result<()> {
    if limits.len() != lens_q.iter().sum::<usize>() || lens_q.len() != lens_k.len() {
        return Err(Error::usage(format!(
            "attention: {} key limits for {} queries",
            limits.len(),
            lens_q.iter().sum::<usize>()
        )));
    }
    let mut r = 0;
    for (&lq, &lk) in lens_q.iter().zip(lens_k) {
        for &l in &limits[r..r + lq] {
            if l == 0 || l as usize > lk {
                return Err(Error::usage(format!("attention: a query sees {l} of its sequence's {lk} keys")));
            }
        }
        r += lq;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::Tile;

    /// c += a b with each element's products added in k order by one multiply-add each: what
    /// every panel and block of `Tile::gemm_acc` must reproduce bit for bit.
    #[allow(clippy::too_many_arguments)]
    fn reference<const FMA: bool>(m: usize, n: usize, k: usize, a: &[f32], ta: bool, b: &[f32], c: &mut [f32]) {
        for i in 0..m {
            for j in 0..n {
                for kk in 0..k {
                    let x = if ta { a[kk * m + i] } else { a[i * k + kk] };
                    c[i * n + j] =
                        if FMA { x.mul_add(b[kk * n + j], c[i * n + j]) } else { x * b[kk * n + j] + c[i * n + j] };
                }
            }
        }
    }

    #[test]
    fn panels_and_blocks_add_in_the_reference_order() {
        let mut seed = 7u64;
        let mut rnd = move || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        };
        for &(m, n, k) in
            &[(7, 64, 9), (13, 32, 5), (6, 48, 3), (11, 100, 17), (5, 16, 64), (9, 15, 4), (64, 96, 32), (1, 129, 2)]
        {
            for ta in [false, true] {
                let a: Vec<f32> = (0..m * k).map(|_| rnd()).collect();
                let b: Vec<f32> = (0..k * n).map(|_| rnd()).collect();
                let c0: Vec<f32> = (0..m * n).map(|_| rnd()).collect();
                let (lda, ldb, ldc) = (if ta { m } else { k }, n, n);
                let mut want = c0.clone();
                reference::<true>(m, n, k, &a, ta, &b, &mut want);
                // Both panel widths (AVX-512's and the narrow one), either layout of a.
                let tile = Tile { m, n, k, a: &a, lda, a_transposed: ta, b: &b, ldb };
                let wide = |got: &mut [f32]| tile.run::<true, 64, 32, 16>(got, ldc);
                let narrow = |got: &mut [f32]| tile.run::<true, 16, 8, 4>(got, ldc);
                for (name, run) in [("wide", &wide as &dyn Fn(&mut [f32])), ("narrow", &narrow)] {
                    let mut got = c0.clone();
                    run(&mut got);
                    let same = got.iter().zip(&want).all(|(x, y)| x.to_bits() == y.to_bits());
                    assert!(same, "fma {name} {m}x{n}x{k} ta {ta}");
                }
                let plain = a_plain(&a, m, k, ta);
                let tile = Tile { a: &plain, lda: k, a_transposed: false, ..tile };
                let (mut got, mut want) = (c0.clone(), c0.clone());
                tile.run::<false, 64, 32, 16>(&mut got, ldc);
                reference::<false>(m, n, k, &plain, false, &b, &mut want);
                assert!(got.iter().zip(&want).all(|(x, y)| x.to_bits() == y.to_bits()), "mul+add {m}x{n}x{k}");
                let mut got = c0;
                tile.run::<false, 16, 8, 4>(&mut got, ldc);
                assert!(got.iter().zip(&want).all(|(x, y)| x.to_bits() == y.to_bits()), "mul+add narrow {m}x{n}x{k}");
            }
        }
    }

    /// a as (m, k) row-major whether it was stored that way or transposed.
    fn a_plain(a: &[f32], m: usize, k: usize, ta: bool) -> Vec<f32> {
        if !ta {
            return a.to_vec();
        }
        (0..m * k).map(|x| a[(x % k) * m + x / k]).collect()
    }
}
