//! The tiled quantized product: four weight rows unpacked once, then multiplied by many
//! activation rows (DESIGN §13, "Several rows at once"), as llamafile's tinyBLAS and
//! llama.cpp's GEMM paths reuse a weight block across activation rows.
//!
//! Every output is computed with exactly the float operations of candle's AVX2 `vec_dot` for
//! that (weight row, activation row) pair, in the same order over blocks: per block the
//! integer dot product (`maddubs`, pairwise `madd`, conversion), the scale `d * dy` as one f32
//! product, one `fmadd` into eight lanes, and at the end candle's horizontal sum (plus, for
//! Q4_1, the separate running sum of `m * s`). Only the unpacking of the weight (nibbles to
//! bytes, |w| for the sign trick, f16 scales to f32) is hoisted out of the row loop, and that
//! produces the same bits. So a product's values do not depend on how many rows it has, or
//! on whether it ran here or in `vec_dot` (the server's rule, DESIGN §12; tested bit for bit
//! in `super::tests`).
//!
//! Types: Q4_0, Q4_1 and Q8_0 (the linear weights and the embedding of the GGUFs llama.cpp
//! writes by default). Others, and CPUs without AVX2/FMA/F16C, take the row-by-row path.
//! Where the CPU has AVX512-VNNI (+VL) each block's integer dot product is one `vpdpbusd`
//! instead of `maddubs` + `madd`: the same integers, so the same bits (the kernels are stamped
//! once per instruction set by `tiled_kernels!`; the row kernels in the patched candle follow
//! the same rule, vendor/candle-core/ITT-PATCH.md patch 6).

use candle_core::quantized::GgmlDType;

/// One tile: `kb` blocks of four weight rows (`w[c]` points at row c's first block) against
/// `m` activation rows of `kb` dot-type blocks each (`x`, contiguous), written to
/// `out[i * ld + c]`.
pub(super) type QuadFn =
    unsafe fn(kb: usize, w: [*const u8; 4], x: *const u8, m: usize, out: *mut f32, ld: usize, scratch: &mut Scratch);

/// Per-thread buffers for an unpacked quad of weight rows: (kb * 4) 32-byte vectors of quants
/// (and of their magnitudes) and kb groups of four scales (and minimums).
#[derive(Default)]
pub(super) struct Scratch {
    #[cfg(target_arch = "x86_64")]
    q: Vec<std::arch::x86_64::__m256i>,
    #[cfg(target_arch = "x86_64")]
    a: Vec<std::arch::x86_64::__m256i>,
    d: Vec<[f32; 4]>,
    m: Vec<[f32; 4]>,
}

/// Whether the VNNI twins run: AVX512-VNNI with VL on this CPU, and `ITT_VNNI` is not `0` (the
/// same rule as the row kernels', vendor/candle-core/ITT-PATCH.md patch 6; both paths give the
/// same bits, the switch is for timing one against the other).
#[cfg(target_arch = "x86_64")]
pub(super) fn vnni_available() -> bool {
    static VNNI: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *VNNI.get_or_init(|| {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512vnni")
            && std::env::var("ITT_VNNI").as_deref() != Ok("0")
    })
}

/// The AVX2 kernel for weights of `dtype` (the oracle of the VNNI twins in the tests).
#[cfg(target_arch = "x86_64")]
pub(super) fn avx2_kernel(dtype: GgmlDType) -> Option<QuadFn> {
    match dtype {
        GgmlDType::Q4_0 => Some(avx2::quad_q4_0),
        GgmlDType::Q4_1 => Some(avx2::quad_q4_1),
        GgmlDType::Q8_0 => Some(avx2::quad_q8_0),
        _ => None,
    }
}

impl Scratch {
    /// Room for a quad of `kb` blocks. Not inlined into the kernels: compiled there, with the
    /// VNNI twins' AVX-512 features, the zero fill became 512-bit stores, and on Intel a 512-bit
    /// instruction shuts the vector ALU of port 1 for a while, which slowed the 256-bit integer
    /// work of the whole tile (prefill 0.75x of the AVX2 twin's speed on a Sapphire Rapids Xeon).
    #[cfg(target_arch = "x86_64")]
    #[inline(never)]
    fn reserve(&mut self, kb: usize) {
        // SAFETY: an all-zero __m256i is a valid value.
        let zero: std::arch::x86_64::__m256i = unsafe { std::mem::zeroed() };
        self.q.resize(kb * 4, zero);
        self.a.resize(kb * 4, zero);
        self.d.resize(kb, [0.0; 4]);
        self.m.resize(kb, [0.0; 4]);
    }
}

/// The tiled kernel for weights of `dtype`, where this CPU can run it.
pub(super) fn kernel(dtype: GgmlDType) -> Option<QuadFn> {
    #[cfg(target_arch = "x86_64")]
    {
        if !(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")) {
            return None;
        }
        if vnni_available() {
            return match dtype {
                GgmlDType::Q4_0 => Some(vnni::quad_q4_0),
                GgmlDType::Q4_1 => Some(vnni::quad_q4_1),
                GgmlDType::Q8_0 => Some(vnni::quad_q8_0),
                _ => None,
            };
        }
        avx2_kernel(dtype)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = dtype;
        None
    }
}

/// The block's integer dot product (32 u8 x i8 products summed in fours into eight i32 lanes,
/// as f32): candle's AVX2 `maddubs` + `madd`, or one AVX512-VNNI `vpdpbusd`. The i16 pairs of
/// `maddubs` never saturate in these kernels (|u8 operand| <= 128, i8 operand >= -128: within
/// [-32768, 32512]), so both give the same integers and the same floats, bit for bit
/// (vendor/candle-core/ITT-PATCH.md, patch 6; tested in `super::tests`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn mul_sum_us8_avx2(ax: std::arch::x86_64::__m256i, sy: std::arch::x86_64::__m256i) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let dot = _mm256_maddubs_epi16(ax, sy);
    _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_set1_epi16(1), dot))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,avx512f,avx512vl,avx512vnni")]
fn mul_sum_us8_vnni(ax: std::arch::x86_64::__m256i, sy: std::arch::x86_64::__m256i) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    _mm256_cvtepi32_ps(_mm256_dpbusd_epi32(_mm256_setzero_si256(), ax, sy))
}

/// The kernels, stamped once per instruction set: `$features` for every function, `$mul_sum`
/// the block's integer dot product.
macro_rules! tiled_kernels {
    ($module:ident, $features:literal, $mul_sum:ident) => {
        #[cfg(target_arch = "x86_64")]
        mod $module {
            use super::Scratch;
            use candle_core::quantized::k_quants;
            use std::arch::x86_64::*;

            // The GGML block layouts (candle's `k_quants::Block*` with crate-private fields): f16 scales
            // as raw bits, then the quants.
            #[repr(C)]
            struct Q4_0 {
                d: u16,
                qs: [u8; 16],
            }
            #[repr(C)]
            struct Q4_1 {
                d: u16,
                m: u16,
                qs: [u8; 16],
            }
            #[repr(C)]
            struct Q8_0 {
                d: u16,
                qs: [i8; 32],
            }
            #[repr(C)]
            struct Q8_1 {
                d: u16,
                s: u16,
                qs: [i8; 32],
            }
            const _: () = assert!(std::mem::size_of::<Q4_0>() == std::mem::size_of::<k_quants::BlockQ4_0>());
            const _: () = assert!(std::mem::size_of::<Q4_1>() == std::mem::size_of::<k_quants::BlockQ4_1>());
            const _: () = assert!(std::mem::size_of::<Q8_0>() == std::mem::size_of::<k_quants::BlockQ8_0>());
            const _: () = assert!(std::mem::size_of::<Q8_1>() == std::mem::size_of::<k_quants::BlockQ8_1>());

            /// Four f16 values (raw bits) as f32 lanes; exact.
            #[target_feature(enable = $features)]
            fn f16x4(h: [u16; 4]) -> __m128 {
                let bits = (h[0] as u64) | (h[1] as u64) << 16 | (h[2] as u64) << 32 | (h[3] as u64) << 48;
                _mm_cvtph_ps(_mm_cvtsi64_si128(bits as i64))
            }

            /// One f16 (raw bits) as f32 in every lane; exact, the value of `half::f16::to_f32`.
            /// Broadcast, not inserted into a register: LLVM inserted it into whatever register
            /// it liked, there the Q4_1 loop's running `m * s` sum, so every block waited for the
            /// previous block's sum (a loop-carried chain that made the tiled kernels 1.4x slower
            /// when compiled with AVX-512 features).
            #[target_feature(enable = $features)]
            fn f16_splat(h: u16) -> __m128 {
                _mm_cvtph_ps(_mm_set1_epi16(h as i16))
            }

            // candle's `quantized::avx` helpers, the same instructions in the same order.
            use super::$mul_sum as mul_sum_us8_pairs_float;

            #[target_feature(enable = $features)]
            fn hsum_float_8(x: __m256) -> f32 {
                let res = _mm256_extractf128_ps(x, 1);
                let res = _mm_add_ps(res, _mm256_castps256_ps128(x));
                let res = _mm_add_ps(res, _mm_movehl_ps(res, res));
                let res = _mm_add_ss(res, _mm_movehdup_ps(res));
                _mm_cvtss_f32(res)
            }

            /// Ask for the cache line `ahead` bytes past `p`: the same block of the next quad of
            /// weight rows (rows are contiguous), so that the weights stream in while this quad
            /// is unpacked (docs/PERFORMANCE.md, "Software prefetch"). A hint only: an address
            /// past the weight's end is never read, so `wrapping_add` and no bounds.
            #[target_feature(enable = $features)]
            fn prefetch_ahead(p: *const u8, ahead: usize) {
                _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(ahead) as *const i8);
            }

            /// # Safety
            /// `p` must point to 16 readable bytes.
            #[target_feature(enable = $features)]
            unsafe fn bytes_from_nibbles_32(p: *const u8) -> __m256i {
                let tmp = unsafe { _mm_loadu_si128(p as *const __m128i) };
                let bytes = _mm256_insertf128_si256::<1>(_mm256_castsi128_si256(tmp), _mm_srli_epi16(tmp, 4));
                _mm256_and_si256(_mm256_set1_epi8(0xF), bytes)
            }

            /// Signed 8-bit weights against Q8_0 activations, candle's `mul_sum_i8_pairs_float(w, y)`
            /// with |w| (`a`) precomputed: per block `acc += (dw * dy) * sum(w * y)`.
            ///
            /// # Safety
            /// `x` holds `m * kb` Q8_0 blocks; `out[i * ld + c]` is writable for i < m, c < 4; the
            /// scratch holds the unpacked quad (`q` the signed quants, `a` their magnitudes, `d`).
            #[target_feature(enable = $features)]
            unsafe fn rows_i8(kb: usize, x: *const Q8_0, m: usize, out: *mut f32, ld: usize, s: &Scratch) {
                for i in 0..m {
                    let mut acc = [_mm256_setzero_ps(); 4];
                    for b in 0..kb {
                        let y = unsafe { &*x.add(i * kb + b) };
                        let dd = _mm_mul_ps(_mm_loadu_ps(s.d[b].as_ptr()), f16_splat(y.d));
                        let mut dds = [0f32; 4];
                        unsafe { _mm_storeu_ps(dds.as_mut_ptr(), dd) };
                        let by = unsafe { _mm256_loadu_si256(y.qs.as_ptr() as *const __m256i) };
                        for c in 0..4 {
                            let q = mul_sum_us8_pairs_float(s.a[b * 4 + c], _mm256_sign_epi8(by, s.q[b * 4 + c]));
                            acc[c] = _mm256_fmadd_ps(_mm256_set1_ps(dds[c]), q, acc[c]);
                        }
                    }
                    for (c, acc) in acc.iter().enumerate() {
                        unsafe { *out.add(i * ld + c) = hsum_float_8(*acc) };
                    }
                }
            }

            /// Q4_0 x Q8_0: candle's `vec_dot_q4_0_q8_0` (quants `nibble - 8`).
            ///
            /// # Safety
            /// `w[c]` point at `kb` Q4_0 blocks, `x` at `m * kb` Q8_0 blocks, `out` as in [`rows_i8`].
            #[target_feature(enable = $features)]
            pub(super) unsafe fn quad_q4_0(
                kb: usize,
                w: [*const u8; 4],
                x: *const u8,
                m: usize,
                out: *mut f32,
                ld: usize,
                s: &mut Scratch,
            ) {
                s.reserve(kb);
                let w = w.map(|p| p as *const Q4_0);
                let ahead = 4 * kb * std::mem::size_of::<Q4_0>();
                for b in 0..kb {
                    let blk = |c: usize| unsafe { &*w[c].add(b) };
                    for c in 0..4 {
                        prefetch_ahead(blk(c) as *const Q4_0 as *const u8, ahead);
                        let q =
                            _mm256_sub_epi8(unsafe { bytes_from_nibbles_32(blk(c).qs.as_ptr()) }, _mm256_set1_epi8(8));
                        s.q[b * 4 + c] = q;
                        s.a[b * 4 + c] = _mm256_sign_epi8(q, q);
                    }
                    s.d[b] = [0, 1, 2, 3].map(|c| _mm_cvtss_f32(f16_splat(blk(c).d)));
                }
                unsafe { rows_i8(kb, x as *const Q8_0, m, out, ld, s) }
            }

            /// Q8_0 x Q8_0: candle's `vec_dot_q8_0_q8_0` / `vec_dot_4_q8_0_q8_0`.
            ///
            /// # Safety
            /// As [`quad_q4_0`], with Q8_0 weight blocks.
            #[target_feature(enable = $features)]
            pub(super) unsafe fn quad_q8_0(
                kb: usize,
                w: [*const u8; 4],
                x: *const u8,
                m: usize,
                out: *mut f32,
                ld: usize,
                s: &mut Scratch,
            ) {
                s.reserve(kb);
                let w = w.map(|p| p as *const Q8_0);
                let ahead = 4 * kb * std::mem::size_of::<Q8_0>();
                for b in 0..kb {
                    let blk = |c: usize| unsafe { &*w[c].add(b) };
                    for c in 0..4 {
                        prefetch_ahead(blk(c) as *const Q8_0 as *const u8, ahead);
                        let q = unsafe { _mm256_loadu_si256(blk(c).qs.as_ptr() as *const __m256i) };
                        s.q[b * 4 + c] = q;
                        s.a[b * 4 + c] = _mm256_sign_epi8(q, q);
                    }
                    s.d[b] = [0, 1, 2, 3].map(|c| _mm_cvtss_f32(f16_splat(blk(c).d)));
                }
                unsafe { rows_i8(kb, x as *const Q8_0, m, out, ld, s) }
            }

            /// Q4_1 x Q8_1: the patched candle's `vec_dot_4_q4_1_q8_1` (ggml's AVX2 kernel): per block
            /// `acc += (d * dy) * sum(q * y)` over unsigned nibbles q, and separately `ms += m * s`
            /// (s = dy * sum(y), carried by the Q8_1 block); the output is `hsum(acc) + ms`.
            ///
            /// # Safety
            /// `w[c]` point at `kb` Q4_1 blocks, `x` at `m * kb` Q8_1 blocks, `out` as in [`rows_i8`].
            #[target_feature(enable = $features)]
            pub(super) unsafe fn quad_q4_1(
                kb: usize,
                w: [*const u8; 4],
                x: *const u8,
                m: usize,
                out: *mut f32,
                ld: usize,
                s: &mut Scratch,
            ) {
                s.reserve(kb);
                let w = w.map(|p| p as *const Q4_1);
                let ahead = 4 * kb * std::mem::size_of::<Q4_1>();
                for b in 0..kb {
                    let blk = |c: usize| unsafe { &*w[c].add(b) };
                    for c in 0..4 {
                        prefetch_ahead(blk(c) as *const Q4_1 as *const u8, ahead);
                        s.q[b * 4 + c] = unsafe { bytes_from_nibbles_32(blk(c).qs.as_ptr()) };
                    }
                    unsafe {
                        _mm_storeu_ps(s.d[b].as_mut_ptr(), f16x4([0, 1, 2, 3].map(|c| blk(c).d)));
                        _mm_storeu_ps(s.m[b].as_mut_ptr(), f16x4([0, 1, 2, 3].map(|c| blk(c).m)));
                    }
                }
                let x = x as *const Q8_1;
                for i in 0..m {
                    let mut acc = [_mm256_setzero_ps(); 4];
                    let mut ms = _mm_setzero_ps(); // lane c: the sum over blocks of m_c * s
                    for b in 0..kb {
                        let y = unsafe { &*x.add(i * kb + b) };
                        let dd = _mm_mul_ps(_mm_loadu_ps(s.d[b].as_ptr()), f16_splat(y.d));
                        ms = _mm_add_ps(ms, _mm_mul_ps(_mm_loadu_ps(s.m[b].as_ptr()), f16_splat(y.s)));
                        let mut dds = [0f32; 4];
                        unsafe { _mm_storeu_ps(dds.as_mut_ptr(), dd) };
                        let qy = unsafe { _mm256_loadu_si256(y.qs.as_ptr() as *const __m256i) };
                        for c in 0..4 {
                            let xy = mul_sum_us8_pairs_float(s.q[b * 4 + c], qy);
                            acc[c] = _mm256_fmadd_ps(_mm256_set1_ps(dds[c]), xy, acc[c]);
                        }
                    }
                    let mut mss = [0f32; 4];
                    unsafe { _mm_storeu_ps(mss.as_mut_ptr(), ms) };
                    for c in 0..4 {
                        unsafe { *out.add(i * ld + c) = hsum_float_8(acc[c]) + mss[c] };
                    }
                }
            }
        }
    };
}
tiled_kernels!(avx2, "avx2,fma,f16c", mul_sum_us8_avx2);
tiled_kernels!(vnni, "avx2,fma,f16c,avx512f,avx512vl,avx512vnni", mul_sum_us8_vnni);
