//! Products against quantized weights, for inference only (DESIGN §13).
//!
//! y = x W^T, x (M, K) f32, W (N, K) kept in its GGML blocks (Q4_0, Q4_1, Q8_0, the K-quants,
//! ...) as read from a GGUF file or made by `QTensor::quantize`. Each row of x is quantized once
//! to the blocks' dot type (Q8_0, Q8_1 or Q8_K, as llama.cpp and candle's `QMatMul` do) and every
//! output is one of candle's block dot products (`GgmlType::vec_dot`, AVX2 where candle has it).
//! The work is split over output columns on rayon's pool: candle's own quantized matmul runs
//! on its barrier pool, which `util::tune_threads` sizes to one thread (DESIGN §11), and each
//! output being a single dot product, the split never changes a value.
//!
//! No backward pass, and no graph node: the model uses these products only when it does not
//! train (`Model::is_quantized`; the trainer refuses such a model). Oracle: the f32 product with
//! the dequantized weight (`tests`), within the activation rounding of the dot type.

mod tiled;

use super::fused::{with_data, Filled};
use crate::{Error, Result};
use candle_core::quantized::k_quants::{self, GgmlType};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Tensor;

/// The weight types that run quantized here (the GGUF names as llama.cpp writes them). F32,
/// F16 and BF16 tensors stay dense: candle's `QMatMul` dequantizes those too.
pub const QUANTIZED_TYPES: &str = "Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K";

/// Whether tensors of this type are kept quantized for the products.
pub fn is_quantized(dtype: GgmlDType) -> bool {
    !matches!(dtype, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 | GgmlDType::Q8_1 | GgmlDType::Q8K)
}

/// x W^T: x (M, K), W (N, K) quantized -> (M, N) f32.
pub fn qlinear(x: &Tensor, w: &QTensor) -> Result<Tensor> {
    let mut out = qlinear_many(x, &[w])?;
    Ok(out.pop().expect("one product per weight"))
}

/// x W_i^T for several weights of one input (attention's Q, K, V; the MLP's gate and up): the
/// activations are quantized once and every weight's column tiles run in one parallel region,
/// where separate products would quantize x and wake the thread pool once each (a decoding
/// step of SmolLM2-135M makes 211 such regions, issue 27). Each output is the same dot product
/// over the same tiles as [`qlinear`] computes alone, so the values are identical bit for bit.
pub fn qlinear_many(x: &Tensor, ws: &[&QTensor]) -> Result<Vec<Tensor>> {
    let (m, k) = x.dims2()?;
    let mut ns = Vec::with_capacity(ws.len());
    for w in ws {
        let (n, wk) = w.shape().dims2()?;
        if k != wk {
            return Err(Error::usage(format!("quantized linear: input has {k} features, the weight {wk}")));
        }
        ns.push(n);
    }
    if !x.device().is_cpu() {
        // The block kernels read host memory; on a GPU the product runs on the dequantized
        // weight (a model moved there is dequantized once, `Model::to_device`, DESIGN §15).
        let x = x.to_dtype(candle_core::DType::F32)?;
        return ws
            .iter()
            .map(|w| {
                let dense = w.dequantize(&candle_core::Device::Cpu)?.to_device(x.device())?;
                Ok(x.matmul(&dense.t()?)?)
            })
            .collect();
    }
    if let Some(first) = ws.first() {
        if ws.iter().any(|w| w.dtype() != first.dtype()) {
            // Different block types quantize the activations differently: one at a time.
            return ws.iter().map(|w| qlinear(x, w)).collect();
        }
    } else {
        return Ok(vec![]);
    }
    let x = x.to_dtype(candle_core::DType::F32)?;
    let bytes = ws.iter().map(|w| w.data()).collect::<candle_core::Result<Vec<_>>>()?;
    let weights: Vec<(&[u8], usize)> = bytes.iter().map(|b| &b[..]).zip(ns.iter().copied()).collect();
    let outs = with_data::<f32, _>(&x, |xs| {
        Ok(match ws[0].dtype() {
            GgmlDType::Q4_0 => products::<k_quants::BlockQ4_0>(xs, m, k, &weights),
            GgmlDType::Q4_1 => products::<k_quants::BlockQ4_1>(xs, m, k, &weights),
            GgmlDType::Q5_0 => products::<k_quants::BlockQ5_0>(xs, m, k, &weights),
            GgmlDType::Q5_1 => products::<k_quants::BlockQ5_1>(xs, m, k, &weights),
            GgmlDType::Q8_0 => products::<k_quants::BlockQ8_0>(xs, m, k, &weights),
            GgmlDType::Q2K => products::<k_quants::BlockQ2K>(xs, m, k, &weights),
            GgmlDType::Q3K => products::<k_quants::BlockQ3K>(xs, m, k, &weights),
            GgmlDType::Q4K => products::<k_quants::BlockQ4K>(xs, m, k, &weights),
            GgmlDType::Q5K => products::<k_quants::BlockQ5K>(xs, m, k, &weights),
            GgmlDType::Q6K => products::<k_quants::BlockQ6K>(xs, m, k, &weights),
            other => Err(format!("weights of type {other:?} are not run quantized (types: {QUANTIZED_TYPES})")),
        })
    })?
    .map_err(|e| Error::usage(format!("quantized linear: {e}")))?;
    outs.into_iter().zip(ns).map(|(o, n)| Ok(Tensor::from_vec(o, (m, n), x.device())?)).collect()
}

/// Below this many weight values times rows a product runs on the calling thread: a rayon
/// region costs a few microseconds, as much as a 192 x 576 Q4_1 product (measured with
/// `itt bench --gguf`, docs/PERFORMANCE.md).
const PAR_MIN_WORK: usize = 64 * 1024;

/// From this many activation rows on, a product of a tiled type unpacks its weights once for
/// all rows (`tiled`); one row (decode at batch 1) reads them straight into `vec_dot_4`.
const TILED_MIN_ROWS: usize = 2;

/// Activation rows per block of the product's row loop: 32 rows of 1536 values in Q8_1 are
/// 55 KB, well inside L2.
const ROW_BLOCK: usize = 32;

/// (M, K) x (N_i, K)^T -> (M, N_i) for each weight W_i, given as N_i rows of K / BLCK_SIZE
/// blocks of `T`: x quantized once, all weights' column tiles in one parallel region.
fn products<T: GgmlType>(
    x: &[f32],
    m: usize,
    k: usize,
    weights: &[(&[u8], usize)],
) -> std::result::Result<Vec<Vec<f32>>, String> {
    use rayon::prelude::*;
    let bs = T::BLCK_SIZE;
    if !k.is_multiple_of(bs) || <T::VecDotType as GgmlType>::BLCK_SIZE != bs {
        return Err(format!("rows of {k} values do not split into {:?} blocks of {bs}", T::DTYPE));
    }
    let kb = k / bs;
    let ws = weights.iter().map(|&(b, n)| blocks::<T>(b, n * kb)).collect::<std::result::Result<Vec<_>, _>>()?;
    // The activations in the dot type: (M, kb) blocks.
    let mut xq: Vec<T::VecDotType> = (0..m * kb).map(|_| T::VecDotType::zeros()).collect();
    for (row, q) in x.chunks_exact(k).zip(xq.chunks_exact_mut(kb.max(1))) {
        T::VecDotType::from_float(row, q);
    }
    let mut outs: Vec<Filled<f32>> = weights.iter().map(|&(_, n)| Filled::new(m * n)).collect();
    if m == 0 {
        // SAFETY: empty buffers.
        return Ok(outs.into_iter().map(|o| unsafe { o.assume_filled() }).collect());
    }
    let dsts: Vec<_> = outs.iter_mut().map(|o| o.ptr()).collect();
    // Column tiles of each weight, a multiple of 4 wide (candle's 4-row dot products share one
    // activation load): ~32 tiles per product, so two threads stay balanced on the narrow K/V
    // products. A tile never spans two weights.
    let tiles: Vec<(usize, usize, usize)> = weights
        .iter()
        .enumerate()
        .flat_map(|(i, &(_, n))| {
            let tile = ((n / 32) & !3).clamp(4, 256);
            (0..n.div_ceil(tile)).map(move |t| (i, t * tile, ((t + 1) * tile).min(n)))
        })
        .collect();
    // Several activation rows (prefill, batched decode): unpack each quad of weight rows once
    // and run it against every row (`tiled`); the same float operations per output as
    // `vec_dot`, so the values are those of the row-by-row path, bit for bit.
    let tiled = if m >= TILED_MIN_ROWS { tiled::kernel(T::DTYPE) } else { None };
    let xq = &xq[..];
    let run = |&(i, c0, c1): &(usize, usize, usize)| {
        let (w, n, dst) = (ws[i], weights[i].1, dsts[i]);
        let row = |c: usize| &w[c * kb..(c + 1) * kb];
        let mut c = c0;
        if let Some(quad) = tiled {
            let mut scratch = tiled::Scratch::default();
            while c + 4 <= c1 {
                let w4 = [0, 1, 2, 3].map(|j| row(c + j).as_ptr() as *const u8);
                // SAFETY: each w4[j] is a row of kb blocks, xq holds m rows of kb blocks, and
                // this tile owns columns c..c+4 of every row of weight i's m * n output.
                unsafe { quad(kb, w4, xq.as_ptr() as *const u8, m, dst.at(c), n, &mut scratch) };
                c += 4;
            }
        } else {
            // Rows in blocks of ROW_BLOCK, columns in quads, rows innermost: a quad of weight
            // rows stays in L1 while a block of activation rows (L2-sized) passes over it.
            // Without the row blocks a long prefill streamed every activation row from memory
            // once per quad.
            for r0 in (0..m).step_by(ROW_BLOCK) {
                let rows = r0..(r0 + ROW_BLOCK).min(m);
                let mut c = c0;
                while c + 4 <= c1 {
                    for i in rows.clone() {
                        let xi = &xq[i * kb..(i + 1) * kb];
                        let (a, b, e, f) = T::vec_dot_4(k, row(c), row(c + 1), row(c + 2), row(c + 3), xi);
                        // SAFETY: the tile owns columns c0..c1 of every row; the buffer holds m * n.
                        unsafe { dst.slice(i * n + c, 4) }.copy_from_slice(&[a, b, e, f]);
                    }
                    c += 4;
                }
            }
            c = c0 + (c1 - c0) / 4 * 4;
        }
        for c in c..c1 {
            for i in 0..m {
                let d = T::vec_dot(k, row(c), &xq[i * kb..(i + 1) * kb]);
                // SAFETY: as above.
                unsafe { dst.slice(i * n + c, 1) }.copy_from_slice(&[d]);
            }
        }
    };
    let work: usize = weights.iter().map(|&(_, n)| m * n * k).sum();
    if work < PAR_MIN_WORK {
        tiles.iter().for_each(run);
    } else {
        tiles.par_iter().for_each(run);
    }
    // SAFETY: the tiles cover every column of every row of every weight.
    Ok(outs.into_iter().map(|o| unsafe { o.assume_filled() }).collect())
}

/// A quantized tensor's bytes as its blocks (candle's CPU storage is a `Vec` of them, so the
/// alignment holds; checked anyway).
fn blocks<T>(bytes: &[u8], count: usize) -> std::result::Result<&[T], String> {
    let size = std::mem::size_of::<T>();
    if bytes.len() != count * size || !(bytes.as_ptr() as usize).is_multiple_of(std::mem::align_of::<T>()) {
        return Err(format!("weight storage of {} bytes does not hold {count} blocks of {size}", bytes.len()));
    }
    // SAFETY: length and alignment checked; the blocks are plain old data.
    Ok(unsafe { std::slice::from_raw_parts(bytes.as_ptr() as *const T, count) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    /// Every type that runs quantized (`QUANTIZED_TYPES`).
    const ALL_TYPES: [GgmlDType; 10] = [
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q5_0,
        GgmlDType::Q5_1,
        GgmlDType::Q8_0,
        GgmlDType::Q2K,
        GgmlDType::Q3K,
        GgmlDType::Q4K,
        GgmlDType::Q5K,
        GgmlDType::Q6K,
    ];

    fn rand(shape: (usize, usize), seed: u64) -> Tensor {
        let mut rng = crate::base::rng::Rng::new(seed);
        let v: Vec<f32> = (0..shape.0 * shape.1).map(|_| rng.normal() as f32).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// ||a - b|| / ||b||.
    fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
        let d = (a - b).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        (d / b.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap()).sqrt()
    }

    /// The quantized product equals the f32 product with the dequantized weight up to the
    /// rounding of x to 8 bits per block (32 values, 256 for the K-quants' Q8_K): an error of
    /// at most max|x_block| / 254 per value, uniform, so ~0.3-0.4% of |x| in RMS for Gaussian
    /// x, and the same relative error in the output (relative L2). Bound: 1.5%; the largest
    /// seen is printed. Shapes cover tails (N not a multiple of 4), one row (decode), many rows
    /// (prefill) and both the serial and the parallel split.
    #[test]
    fn quantized_product_matches_the_dequantized_f32_product() {
        let mut worst = 0f32;
        for (m, n, k) in [(1, 7, 256), (3, 130, 512), (53, 192, 512), (1, 1030, 768)] {
            let w = rand((n, k), 1);
            let x = rand((m, k), 2);
            for dt in ALL_TYPES {
                let q = QTensor::quantize(&w, dt).unwrap();
                let dense = x.matmul(&q.dequantize(&Device::Cpu).unwrap().t().unwrap()).unwrap();
                let got = qlinear(&x, &q).unwrap();
                assert_eq!(got.dims(), [m, n]);
                let e = rel_err(&got, &dense);
                assert!(e < 0.015, "{dt:?} ({m}, {n}, {k}): relative error {e}");
                worst = worst.max(e);
            }
        }
        println!("largest relative L2 error: {worst:.4}");
    }

    /// The server's rule (DESIGN §12): a row's outputs do not depend on how many rows share
    /// the product. Products of 1, 3, 4 and 16 rows (the tiled path from 2 rows on, for the
    /// types that have one) equal the same rows multiplied one at a time (candle's `vec_dot_4`
    /// / `vec_dot`, the oracle) bit for bit, for every quantized type; N = 130 leaves a tail of
    /// two columns, K = 768 is 24 blocks of 32 and 3 of 256.
    #[test]
    fn rows_together_equal_rows_one_at_a_time_bit_for_bit() {
        let (n, k) = (130, 768);
        let w = rand((n, k), 7);
        for dt in ALL_TYPES {
            let q = QTensor::quantize(&w, dt).unwrap();
            for m in [1, 3, 4, 16] {
                let x = rand((m, k), 8 + m as u64);
                let together: Vec<f32> = qlinear(&x, &q).unwrap().flatten_all().unwrap().to_vec1().unwrap();
                for i in 0..m {
                    let one: Vec<f32> =
                        qlinear(&x.narrow(0, i, 1).unwrap(), &q).unwrap().flatten_all().unwrap().to_vec1().unwrap();
                    let row = &together[i * n..(i + 1) * n];
                    let same = row.iter().zip(&one).all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "{dt:?}: row {i} of {m} differs from the row alone");
                }
            }
            println!(
                "{dt:?}: tiled kernel {}",
                if tiled::kernel(dt).is_some() { "ran" } else { "not run (row by row)" }
            );
        }
    }

    /// Products of one input against several weights at once equal the products one by one,
    /// bit for bit (mixed types fall back to one at a time; shapes checked per weight).
    #[test]
    fn several_weights_at_once_equal_one_at_a_time_bit_for_bit() {
        let k = 256;
        for dt in [GgmlDType::Q4_1, GgmlDType::Q8_0, GgmlDType::Q4K, GgmlDType::Q6K] {
            let ws: Vec<QTensor> =
                [(64, 1), (24, 2), (130, 3)].map(|(n, s)| QTensor::quantize(&rand((n, k), s), dt).unwrap()).into();
            for m in [1, 5] {
                let x = rand((m, k), 40 + m as u64);
                let refs: Vec<&QTensor> = ws.iter().collect();
                let many = qlinear_many(&x, &refs).unwrap();
                assert_eq!(many.len(), 3);
                for (w, got) in ws.iter().zip(&many) {
                    let want: Vec<f32> = qlinear(&x, w).unwrap().flatten_all().unwrap().to_vec1().unwrap();
                    let got: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
                    assert!(want.iter().zip(&got).all(|(a, b)| a.to_bits() == b.to_bits()), "{dt:?} m {m}");
                }
            }
        }
        let (a, b) = (
            QTensor::quantize(&rand((8, 64), 1), GgmlDType::Q8_0).unwrap(),
            QTensor::quantize(&rand((8, 64), 2), GgmlDType::Q4_0).unwrap(),
        );
        let x = rand((2, 64), 3);
        let mixed = qlinear_many(&x, &[&a, &b]).unwrap();
        let alone: Vec<f32> = qlinear(&x, &b).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(mixed[1].flatten_all().unwrap().to_vec1::<f32>().unwrap(), alone);
        let short = QTensor::quantize(&rand((8, 32), 4), GgmlDType::Q8_0).unwrap();
        assert!(qlinear_many(&x, &[&a, &short]).is_err());
    }

    /// Random blocks of `dtype` as raw bytes, every quant byte drawn from all 256 values (so
    /// Q8_0's -128 and both ends of every nibble occur), scales f16 values in [0.01, 0.5).
    #[cfg(target_arch = "x86_64")]
    fn random_blocks(dtype: GgmlDType, count: usize, rng: &mut crate::base::rng::Rng) -> Vec<u8> {
        let (size, scales) = match dtype {
            GgmlDType::Q4_0 => (18, 1),
            GgmlDType::Q4_1 | GgmlDType::Q8_1 => (if dtype == GgmlDType::Q4_1 { 20 } else { 36 }, 2),
            GgmlDType::Q8_0 => (34, 1),
            other => panic!("no raw blocks for {other:?}"),
        };
        let mut out = Vec::with_capacity(count * size);
        for _ in 0..count {
            for _ in 0..scales {
                let v = half::f16::from_f32(0.01 + 0.49 * rng.uniform() as f32);
                out.extend_from_slice(&v.to_bits().to_le_bytes());
            }
            out.extend((0..size - 2 * scales).map(|_| rng.below(256) as u8));
        }
        out
    }

    /// The AVX512-VNNI kernels (one `vpdpbusd` per block) give the bits of the AVX2 kernels
    /// (`maddubs` and `madd`): the tiled twins against each other on 1, 3 and 16 rows, and the
    /// row kernels that decode at batch 1 runs (the patched candle's `vec_dot_4` / `vec_dot`)
    /// against the AVX2 tiled kernel, which computes the same floats. Blocks are random bytes,
    /// extremes included.
    #[test]
    #[cfg_attr(not(itt_avx512vnni), ignore = "this CPU has no AVX512-VNNI: the VNNI kernels cannot run here")]
    fn vnni_kernels_give_the_avx2_kernels_bits() {
        #[cfg(target_arch = "x86_64")]
        {
            assert!(tiled::vnni_available(), "AVX512-VNNI detected at build time but not at run time");
            let mut rng = crate::base::rng::Rng::new(11);
            let (kb, n) = (24, 8);
            for (dt, dot) in [
                (GgmlDType::Q4_0, GgmlDType::Q8_0),
                (GgmlDType::Q4_1, GgmlDType::Q8_1),
                (GgmlDType::Q8_0, GgmlDType::Q8_0),
            ] {
                let w = random_blocks(dt, n * kb, &mut rng);
                let row_bytes = w.len() / n;
                let (vnni, avx2) = (tiled::kernel(dt).unwrap(), tiled::avx2_kernel(dt).unwrap());
                for m in [1, 3, 16] {
                    let x = random_blocks(dot, m * kb, &mut rng);
                    let run = |quad: tiled::QuadFn| {
                        let mut out = vec![0f32; m * n];
                        let mut scratch = tiled::Scratch::default();
                        for c in (0..n).step_by(4) {
                            let w4 = [0, 1, 2, 3].map(|j| w[(c + j) * row_bytes..].as_ptr());
                            // SAFETY: w4 rows hold kb blocks, x holds m rows of kb, out m x n.
                            unsafe { quad(kb, w4, x.as_ptr(), m, out.as_mut_ptr().add(c), n, &mut scratch) };
                        }
                        out
                    };
                    let (a, b) = (run(vnni), run(avx2));
                    assert!(a.iter().zip(&b).all(|(a, b)| a.to_bits() == b.to_bits()), "{dt:?} tiled, {m} rows");
                    assert!(b.iter().all(|v| v.is_finite()));
                    if m == 1 {
                        let rows = row_kernel_outputs(dt, &w, &x, n, kb);
                        assert!(rows.iter().zip(&b).all(|(a, b)| a.to_bits() == b.to_bits()), "{dt:?} row kernels");
                    }
                }
            }
        }
    }

    /// The patched candle's row kernels (`vec_dot_4` for column quads, `vec_dot` one column at
    /// a time) on raw blocks: one activation row against n weight rows.
    #[cfg(target_arch = "x86_64")]
    fn row_kernel_outputs(dt: GgmlDType, w: &[u8], x: &[u8], n: usize, kb: usize) -> Vec<f32> {
        fn go<T: GgmlType>(w: &[u8], x: &[u8], n: usize, kb: usize) -> Vec<f32> {
            let ws = copy_blocks::<T>(w, n * kb);
            let xs = copy_blocks::<T::VecDotType>(x, kb);
            let k = kb * T::BLCK_SIZE;
            let row = |c: usize| &ws[c * kb..(c + 1) * kb];
            let mut out = vec![];
            for c in (0..n).step_by(4) {
                let (a, b, e, f) = T::vec_dot_4(k, row(c), row(c + 1), row(c + 2), row(c + 3), &xs);
                out.extend([a, b, e, f]);
            }
            // One column alone takes `vec_dot`: the same value as in its quad.
            assert_eq!(T::vec_dot(k, row(1), &xs).to_bits(), out[1].to_bits(), "{:?} vec_dot", T::DTYPE);
            out
        }
        match dt {
            GgmlDType::Q4_0 => go::<k_quants::BlockQ4_0>(w, x, n, kb),
            GgmlDType::Q4_1 => go::<k_quants::BlockQ4_1>(w, x, n, kb),
            GgmlDType::Q8_0 => go::<k_quants::BlockQ8_0>(w, x, n, kb),
            other => panic!("{other:?}"),
        }
    }

    /// Raw bytes as `count` blocks of `T` (a `Vec<u8>` is only byte-aligned).
    #[cfg(target_arch = "x86_64")]
    fn copy_blocks<T>(bytes: &[u8], count: usize) -> Vec<T> {
        assert_eq!(bytes.len(), count * std::mem::size_of::<T>());
        let mut v = Vec::<T>::with_capacity(count);
        // SAFETY: the blocks are plain old data (f16 bits and quant bytes), any bytes are valid.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), v.as_mut_ptr() as *mut u8, bytes.len());
            v.set_len(count);
        }
        v
    }

    /// Activation rows quantized to Q8_0 / Q8_1 (the patched candle's eight-lane `from_float`,
    /// ITT-PATCH.md patch 7, where the CPU has AVX2) give the bytes of candle's scalar loop,
    /// written out here: exact halves (round away from zero), zeros, NaN, infinities, values
    /// whose 1/d overflows, and random rows. On a CPU without AVX2 this checks candle's own loop.
    #[test]
    fn activation_quantization_gives_the_scalar_bytes() {
        use half::f16;
        fn scalar(xs: &[f32], q8_1: bool) -> Vec<u8> {
            let mut out = vec![];
            for x in xs.chunks_exact(32) {
                let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
                let d = amax / 127.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                let q: Vec<i8> = x.iter().map(|v| f32::round(v * id) as i8).collect();
                let dh = f16::from_f32(d);
                out.extend(dh.to_le_bytes());
                if q8_1 {
                    let sum: i32 = q.iter().map(|&v| v as i32).sum();
                    out.extend((f16::from_f32(sum as f32) * dh).to_le_bytes());
                }
                out.extend(q.iter().map(|&v| v as u8));
            }
            out
        }
        fn vectorised<T: GgmlType>(xs: &[f32]) -> Vec<u8> {
            let mut ys: Vec<T> = (0..xs.len() / 32).map(|_| T::zeros()).collect();
            T::from_float(xs, &mut ys);
            let bytes = std::mem::size_of_val(&ys[..]);
            // SAFETY: the blocks are plain old data (f16 bits and quant bytes).
            unsafe { std::slice::from_raw_parts(ys.as_ptr() as *const u8, bytes) }.to_vec()
        }
        let mut rng = crate::base::rng::Rng::new(17);
        let mut rows: Vec<Vec<f32>> =
            (0..40).map(|i| (0..96).map(|_| rng.normal() as f32 * (i as f32 + 0.5)).collect()).collect();
        // Exact halves: amax 127 makes d = 1, so x * id is x itself.
        rows.push((0..32).map(|i| if i == 0 { 127.0 } else { (i as f32 - 16.0) + 0.5 }).collect());
        rows.push((0..32).map(|i| if i == 0 { -127.0 } else { -(i as f32) * 0.5 }).collect());
        rows.push(vec![0.0; 32]);
        rows.push((0..32).map(|i| if i % 3 == 0 { f32::NAN } else { i as f32 }).collect());
        rows.push((0..32).map(|i| if i == 5 { f32::INFINITY } else { i as f32 - 3.0 }).collect());
        rows.push((0..32).map(|i| if i == 7 { f32::NEG_INFINITY } else { 1.0 }).collect());
        rows.push((0..32).map(|i| (i as f32 - 15.5) * 1e-40).collect()); // 1/d overflows to inf
        rows.push((0..32).map(|i| (i as f32 - 15.5) * 1e-44).collect()); // d underflows to 0
        for (i, row) in rows.iter().enumerate() {
            assert_eq!(vectorised::<k_quants::BlockQ8_0>(row), scalar(row, false), "Q8_0, row {i}");
            assert_eq!(vectorised::<k_quants::BlockQ8_1>(row), scalar(row, true), "Q8_1, row {i}");
        }
    }

    #[test]
    fn splitting_over_threads_changes_no_value() {
        let (w, x) = (rand((300, 512), 3), rand((5, 512), 4));
        let q = QTensor::quantize(&w, GgmlDType::Q4_1).unwrap();
        let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
        let a: Vec<f32> = one.install(|| qlinear(&x, &q)).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = qlinear(&x, &q).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn mismatched_shapes_are_an_error_not_a_panic() {
        let q = QTensor::quantize(&rand((8, 64), 5), GgmlDType::Q8_0).unwrap();
        let e = qlinear(&rand((2, 32), 6), &q).unwrap_err().to_string();
        assert!(e.contains("input has 32 features, the weight 64"), "{e}");
        let dense = QTensor::quantize(&rand((8, 64), 5), GgmlDType::F32).unwrap();
        assert!(qlinear(&rand((2, 64), 6), &dense).unwrap_err().to_string().contains("not run quantized"));
    }
}
