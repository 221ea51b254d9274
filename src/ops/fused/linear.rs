//! Linear layer, x (N, in), W (out, in) -> y = x W^T (N, out), as one graph node whose backward
//! pass computes dx = dy W (N, in) and dW = dy^T x (out, in) with the operands read through
//! strides (no transposed copies, no zero-filled outputs).
//! - f32: the products run in gemm directly; composed twin `x.matmul(&w.t())`.
//! - bf16: both operands of every product (forward and backward) rounded to bfloat16 and the
//!   products summed in f32, as PyTorch's CPU autocast does for `linear`; the f32 master
//!   weights and the optimiser are untouched. The products run in `bf16_gemm` (AMX tiles, else
//!   AVX512_BF16 vectors, where the CPU has them). Oracle: f64 products of the bf16-rounded operands (`ops::tests`).

use super::bf16_gemm::{gemm_bf16, gemm_f32, MatRef};
use super::{cpu_data, multiversion, simd_level, with_data, Filled, Real};
use crate::ops::Precision;
use crate::{Error, Result};
use candle_core::{bail, CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};

struct Linear(Precision);

/// c (m, n) = a . b (row-major, c_rs = n) in `precision`, every element written.
fn product(precision: Precision, m: usize, n: usize, k: usize, a: MatRef, b: MatRef) -> Vec<f32> {
    if k == 0 || m == 0 || n == 0 {
        return vec![0.0; m * n];
    }
    let mut c = Filled::new(m * n);
    let pc = c.ptr();
    // SAFETY: the buffer holds m * n elements and nothing else touches it during the call.
    let cs = unsafe { pc.slice(0, m * n) };
    match precision {
        Precision::Bf16 => gemm_bf16(m, n, k, a, b, cs, n, false),
        Precision::F32 => gemm_f32(m, n, k, a, b, cs),
    }
    // SAFETY: both products, without `accumulate` / `read_dst`, write every element of c.
    unsafe { c.assume_filled() }
}

/// Rows of x at most for [`few_rows`]: decode steps (1 row per sequence) and speculative
/// verify passes (K + 1 rows).
pub const FEW_ROWS: usize = 16;

/// Lanes per dot-product accumulator of [`few_rows`], and W rows per block.
const DOT_LANES: usize = 8;
const W_BLOCK: usize = 8;

/// The whole chunks of lanes of the first `full` elements.
#[inline(always)]
fn lane_chunks<T>(v: &[T], full: usize) -> std::slice::ChunksExact<'_, T> {
    v[..full].chunks_exact(DOT_LANES)
}

/// a[l] += x[l] w[l] over one chunk of lanes.
#[inline(always)]
fn lanes<T: Real, const FMA: bool>(a: &mut [T; DOT_LANES], x: &[T], w: &[T]) {
    for l in 0..DOT_LANES {
        a[l] = if FMA { x[l].fma(w[l], a[l]) } else { a[l] + x[l] * w[l] };
    }
}

/// The tail (k mod lanes) into the first lanes, then the lanes summed pairwise.
#[inline(always)]
fn finish<T: Real, const FMA: bool>(mut a: [T; DOT_LANES], x: &[T], w: &[T]) -> T {
    for (l, (&xv, &wv)) in x.iter().zip(w).enumerate() {
        a[l] = if FMA { xv.fma(wv, a[l]) } else { a[l] + xv * wv };
    }
    super::hsum(a)
}

multiversion! {
    /// out[j * m + r] = x_r . w_j for the m rows x_r of x (m, k) and the rows w_j of w (n, k).
    /// Every dot product is summed the same way whatever m is and whichever block its row of W
    /// falls in (8 lanes over k in order, the tail, then the lanes pairwise), so a row's result
    /// does not depend on how many rows run with it: a verify pass scores each token as a
    /// one-token decode step would.
    fn dots_block<T: Real, const FMA: bool>(x: &[T], w: &[T], k: usize, out: &mut [T]) {
        let m = x.len() / k;
        let full = k / DOT_LANES * DOT_LANES;
        let blocks = w.len() / (W_BLOCK * k);
        let chunks = |v| lane_chunks(v, full);
        for (b, wb) in w.chunks_exact(W_BLOCK * k).enumerate() {
            let ws: [&[T]; W_BLOCK] = std::array::from_fn(|q| &wb[q * k..][..k]);
            let [w0, w1, w2, w3, w4, w5, w6, w7] = ws;
            for (r, xr) in x.chunks_exact(k).enumerate() {
                // Eight accumulator chains, one per row of W, enough to keep both FMA units
                // busy; separate locals so that LLVM keeps them in registers (an array of
                // them, or two rows of x against four of W, ran slower).
                let z = [T::ZERO; DOT_LANES];
                let (mut a0, mut a1, mut a2, mut a3, mut a4, mut a5, mut a6, mut a7) = (z, z, z, z, z, z, z, z);
                let it = chunks(xr)
                    .zip(chunks(w0))
                    .zip(chunks(w1))
                    .zip(chunks(w2))
                    .zip(chunks(w3))
                    .zip(chunks(w4))
                    .zip(chunks(w5))
                    .zip(chunks(w6))
                    .zip(chunks(w7));
                for ((((((((xc, c0), c1), c2), c3), c4), c5), c6), c7) in it {
                    lanes::<T, FMA>(&mut a0, xc, c0);
                    lanes::<T, FMA>(&mut a1, xc, c1);
                    lanes::<T, FMA>(&mut a2, xc, c2);
                    lanes::<T, FMA>(&mut a3, xc, c3);
                    lanes::<T, FMA>(&mut a4, xc, c4);
                    lanes::<T, FMA>(&mut a5, xc, c5);
                    lanes::<T, FMA>(&mut a6, xc, c6);
                    lanes::<T, FMA>(&mut a7, xc, c7);
                }
                for (q, (wq, a)) in ws.iter().zip([a0, a1, a2, a3, a4, a5, a6, a7]).enumerate() {
                    out[(b * W_BLOCK + q) * m + r] = finish::<T, FMA>(a, &xr[full..], &wq[full..]);
                }
            }
        }
        for (q, wq) in w.chunks_exact(k).enumerate().skip(blocks * W_BLOCK) {
            for (r, xr) in x.chunks_exact(k).enumerate() {
                let mut acc = [T::ZERO; DOT_LANES];
                for (xc, c) in xr[..full].chunks_exact(DOT_LANES).zip(wq[..full].chunks_exact(DOT_LANES)) {
                    lanes::<T, FMA>(&mut acc, xc, c);
                }
                out[q * m + r] = finish::<T, FMA>(acc, &xr[full..], &wq[full..]);
            }
        }
    }
}

/// y (m, n) = x (m, k) . W^T, W (n, k) row-major, for m <= [`FEW_ROWS`]: one pass over W with
/// every row of x at once, W rows split over threads when W is large. Through gemm a product
/// this short packs all of W for each call: a 5-row 128 -> 352 product took 20 us there and
/// 12 us here (1 row: 3.6 vs 3.5 us), and tiny-itt4's 5-token verify pass 3x a 1-token pass
/// instead of 2x (DESIGN §12, `examples/pass_cost.rs`).
fn few_rows(x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    use rayon::prelude::*;
    if m == 0 {
        return vec![];
    }
    let simd = simd_level();
    // (n, m) column blocks of y, transposed back below.
    let mut t = vec![0.0f32; n * m];
    let per_chunk = 32 * W_BLOCK;
    if n * k >= 1 << 18 && rayon::current_num_threads() > 1 {
        t.par_chunks_mut(per_chunk * m).zip(w.par_chunks(per_chunk * k)).for_each(|(o, wc)| {
            dots_block::<f32>(simd, &x[..m * k], wc, k, o);
        });
    } else {
        dots_block::<f32>(simd, &x[..m * k], &w[..n * k], k, &mut t);
    }
    if m == 1 {
        return t;
    }
    let mut y = vec![0.0f32; m * n];
    for (j, col) in t.chunks_exact(m).enumerate() {
        for (r, &v) in col.iter().enumerate() {
            y[r * n + j] = v;
        }
    }
    y
}

fn dims(x: &Layout, w: &Layout) -> candle_core::Result<(usize, usize, usize)> {
    let (n, k) = x.shape().dims2()?;
    let (o, k2) = w.shape().dims2()?;
    if k != k2 {
        bail!("linear: input has {k} features, weight expects {k2}");
    }
    Ok((n, k, o))
}

impl CustomOp2 for Linear {
    fn name(&self) -> &'static str {
        match self.0 {
            Precision::F32 => "itt-linear",
            Precision::Bf16 => "itt-linear-bf16",
        }
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, k, o) = dims(l1, l2)?;
        let (x, w) = (cpu_data::<f32>(s1, l1)?, cpu_data::<f32>(s2, l2)?);
        if self.0 == Precision::F32 && n <= FEW_ROWS && k > 0 {
            return Ok((CpuStorage::F32(few_rows(x, w, n, k, o)), Shape::from((n, o))));
        }
        // y (n, o) = x (n, k) . W^T, W^T[kk][j] = w[j * k + kk].
        let a = MatRef { data: x, row_stride: k, col_stride: 1 };
        let b = MatRef { data: w, row_stride: 1, col_stride: k };
        Ok((CpuStorage::F32(product(self.0, n, o, k, a, b)), Shape::from((n, o))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (n, k, o) = dims(x.layout(), w.layout())?;
        let (dx, dw) = with_data::<f32, _>(x, |xd| {
            with_data::<f32, _>(w, |wd| {
                with_data::<f32, _>(grad, |dy| {
                    // dx (n, k) = dy (n, o) . W (o, k)
                    let dx = product(
                        self.0,
                        n,
                        k,
                        o,
                        MatRef { data: dy, row_stride: o, col_stride: 1 },
                        MatRef { data: wd, row_stride: k, col_stride: 1 },
                    );
                    // dW (o, k) = dy^T (o, n) . x (n, k); dy^T[j][t] = dy[t * o + j].
                    let dw = product(
                        self.0,
                        o,
                        k,
                        n,
                        MatRef { data: dy, row_stride: 1, col_stride: o },
                        MatRef { data: xd, row_stride: k, col_stride: 1 },
                    );
                    Ok((dx, dw))
                })
            })
        })?;
        Ok((Some(Tensor::from_vec(dx, (n, k), x.device())?), Some(Tensor::from_vec(dw, (o, k), w.device())?)))
    }
}

/// y = x W^T for f32 CPU tensors x (N, in), W (out, in) -> (N, out), with the products in
/// `precision` (f32, or bf16 x bf16 -> f32).
pub fn linear(x: &Tensor, w: &Tensor, precision: Precision) -> Result<Tensor> {
    if x.dtype() != DType::F32 || w.dtype() != DType::F32 {
        return Err(Error::usage(format!("linear: f32 tensors expected, got {:?} and {:?}", x.dtype(), w.dtype())));
    }
    let (x_dims, w_dims) = (x.dims(), w.dims());
    if x_dims.len() != 2 || w_dims.len() != 2 || x_dims[1] != w_dims[1] {
        return Err(Error::usage(format!("linear: x {x_dims:?} and W {w_dims:?} do not fit x W^T")));
    }
    Ok(x.contiguous()?.apply_op2(&w.contiguous()?, Linear(precision))?)
}
