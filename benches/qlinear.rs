//! Microseconds and integer-op rate of the quantized product (`ops::quant::qlinear`)
//! at the shapes of a SmolLM2-135M decoding step (d 576, MLP 1536, vocabulary 49152): one
//! activation row (decode at batch 1: the row kernels, `vec_dot_4`) and 53 rows (a prefill:
//! the tiled kernels), for Q4_0, Q4_1 and Q8_0 weights. Median of REPS runs (default 20) after
//! a warm-up; nothing is asserted. The block kernels are chosen once per process, so compare
//! instruction sets by running it twice (vendor/candle-core/ITT-PATCH.md, patch 6):
//!
//!     RAYON_NUM_THREADS=1 ITT_VNNI=0 cargo bench --bench qlinear    (AVX2 + F16C)
//!     RAYON_NUM_THREADS=1 cargo bench --bench qlinear               (AVX512-VNNI where present)

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use itt::ops::quant::qlinear;
use std::time::Instant;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn seeded(rows: usize, cols: usize, seed: u64) -> Tensor {
    let mut rng = itt::base::rng::Rng::new(seed);
    let v: Vec<f32> = (0..rows * cols).map(|_| rng.normal() as f32).collect();
    Tensor::from_vec(v, (rows, cols), &Device::Cpu).unwrap()
}

fn main() {
    let reps: usize = std::env::var("REPS").ok().and_then(|r| r.parse().ok()).unwrap_or(20);
    let vnni = std::is_x86_feature_detected!("avx512vnni") && std::env::var("ITT_VNNI").as_deref() != Ok("0");
    println!(
        "block kernels: {} (RAYON_NUM_THREADS={})",
        if vnni { "AVX512-VNNI" } else { "AVX2" },
        std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "unset".into())
    );
    println!("| type | rows | weight (N x K) | us (median) | GOP/s (2 M N K / time) |");
    println!("|---|---|---|---|---|");
    for dt in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
        for (n, k) in [(1536, 576), (576, 1536), (49152, 576)] {
            if n == 49152 && dt != GgmlDType::Q8_0 {
                continue; // the tied head is the Q8_0 embedding
            }
            let w = QTensor::quantize(&seeded(n, k, 1), dt).unwrap();
            for m in [1, 53] {
                let x = seeded(m, k, 2);
                let _ = qlinear(&x, &w).unwrap();
                let us = median(
                    (0..reps)
                        .map(|_| {
                            let t = Instant::now();
                            std::hint::black_box(qlinear(&x, &w).unwrap());
                            t.elapsed().as_secs_f64() * 1e6
                        })
                        .collect(),
                );
                println!("| {dt:?} | {m} | {n} x {k} | {us:.1} | {:.1} |", 2.0 * (m * n * k) as f64 / us * 1e-3);
            }
        }
    }
}
