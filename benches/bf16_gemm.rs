//! GFLOP/s of the bf16 gemm (`ops::fused::bf16_gemm`) at the training shapes of preset `small`
//! (batch 8 x 256 tokens, d 256, SwiGLU 688, vocab 4096; 1024 rows: a routed step at ratio
//! 0.5): the AMX path, the AVX512_BF16 (`vdpbf16ps`) path, the fallback (bf16 rounding + f32 gemm), the f32 product `ops::linear`
//! uses (`gemm_f32`: C's rows shared out over the threads) and the same product with gemm's
//! own thread split (`Parallelism::Rayon`, as candle calls it). Median of REPS runs (default
//! 10) after a warm-up; nothing is asserted. A path the CPU lacks prints "-".
//!
//!     cargo bench --bench bf16_gemm            (REPS=n to change the count)

use itt::ops::fused::bf16_gemm::{
    amx_available, avx512bf16_hardware, gemm_amx, gemm_avx512bf16, gemm_f32, gemm_f32_gemm_split, gemm_fallback, MatRef,
};
use std::time::Instant;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Median seconds of `f` over `reps` runs after one warm-up.
fn time(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    median(
        (0..reps)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64()
            })
            .collect(),
    )
}

fn data(n: usize, seed: u32) -> Vec<f32> {
    // A cheap deterministic spread of values in [-1, 1).
    (0..n as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8) as f32 / (1 << 23) as f32 - 1.0)
        .collect()
}

fn main() {
    let reps = std::env::var("REPS").ok().and_then(|s| s.parse().ok()).unwrap_or(10);
    // (m, n, k, A transposed, B transposed, what)
    let shapes = [
        (2048, 256, 256, false, true, "x W^T (attention projections)"),
        (2048, 688, 256, false, true, "x W^T (SwiGLU up)"),
        (2048, 256, 688, false, true, "h W^T (SwiGLU down)"),
        (1024, 256, 256, false, true, "x W^T, routed step"),
        (1024, 688, 256, false, true, "x W^T up, routed step"),
        (1440, 688, 256, false, true, "x W^T up, routed step at 70%"),
        (2048, 256, 256, false, false, "dY W (input gradient)"),
        (256, 256, 2048, true, false, "dY^T X (weight gradient)"),
        (256, 688, 2048, true, false, "dY^T X (weight gradient, down)"),
        (256, 256, 1024, true, false, "dY^T X (weight gradient, routed)"),
        (688, 256, 1440, true, false, "dY^T X (weight gradient, up, routed at 70%)"),
        (2048, 4096, 256, false, true, "x E^T (logits)"),
        (4096, 256, 2048, true, false, "dZ^T X (embedding gradient)"),
        (2048, 2048, 2048, false, false, "square"),
    ];
    let (amx, dp) = (amx_available(), avx512bf16_hardware());
    let on = |b: bool| if b { "on" } else { "off" };
    println!("threads {}, AMX {}, AVX512_BF16 {}, median of {reps}\n", rayon::current_num_threads(), on(amx), on(dp));
    println!(
        "| m x n x k | operands | AMX GFLOP/s | AVX512_BF16 GFLOP/s | fallback GFLOP/s | f32 gemm GFLOP/s | gemm's split GFLOP/s | AMX / f32 | AVX512_BF16 / f32 |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for (m, n, k, at, bt, what) in shapes {
        let (av, bv) = (data(m * k, 1), data(k * n, 2));
        // Transposed operands are views of the stored (k x m) or (n x k) row-major matrix.
        let a = if at {
            MatRef { data: &av, row_stride: 1, col_stride: m }
        } else {
            MatRef { data: &av, row_stride: k, col_stride: 1 }
        };
        let b = if bt {
            MatRef { data: &bv, row_stride: 1, col_stride: k }
        } else {
            MatRef { data: &bv, row_stride: n, col_stride: 1 }
        };
        let mut c = vec![0f32; m * n];
        let flop = 2.0 * (m * n * k) as f64 * 1e-9;
        let amx_gf = if amx { Some(flop / time(reps, || gemm_amx(m, n, k, a, b, &mut c, n, false))) } else { None };
        let dp_gf =
            if dp { Some(flop / time(reps, || gemm_avx512bf16(m, n, k, a, b, &mut c, n, false))) } else { None };
        let fb_gf = flop / time(reps, || gemm_fallback(m, n, k, a, b, &mut c, n, false));
        let f32_gf = flop / time(reps, || gemm_f32(m, n, k, a, b, &mut c));
        let own_gf = flop / time(reps, || gemm_f32_gemm_split(m, n, k, a, b, &mut c));
        let t = |at: bool| if at { "T" } else { "N" };
        let rate = |g: Option<f64>| g.map_or("-".into(), |g| format!("{g:.0}"));
        let ratio = |g: Option<f64>| g.map_or("-".into(), |g| format!("{:.1}x", g / f32_gf));
        println!(
            "| {m}x{n}x{k} | A{} B{} {what} | {} | {} | {fb_gf:.0} | {f32_gf:.0} | {own_gf:.0} | {} | {} |",
            t(at),
            t(bt),
            rate(amx_gf),
            rate(dp_gf),
            ratio(amx_gf),
            ratio(dp_gf)
        );
    }
}
