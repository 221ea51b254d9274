//! What a parallel kernel costs right after a stretch of sequential work on the calling
//! thread, i.e. with the pool's other worker idle (vendor/rayon-core/ITT-PATCH.md): a routed
//! step's row gather (2048 x 256 f32 -> 1024 rows) and an empty `rayon::join`, on a 2-thread
//! pool, median and 90th percentile of 300 calls. Nothing is asserted.
//!
//!     cargo run --release --example idle_wake              (ITT_SPIN_US=0: upstream rayon)

use candle_core::{Device, Tensor};
use std::time::Instant;

fn spin(us: u128) {
    let t0 = Instant::now();
    while t0.elapsed().as_micros() < us {
        std::hint::spin_loop();
    }
}

/// Median and 90th percentile (us) of `f` timed after `work_us` of spinning each time.
fn probe(work_us: u128, f: &dyn Fn()) -> (f64, f64) {
    let mut v: Vec<f64> = (0..300)
        .map(|_| {
            spin(work_us);
            let t0 = Instant::now();
            f();
            t0.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    v.sort_by(|a, b| a.total_cmp(b));
    (v[150], v[270])
}

fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build()?;
    pool.install(|| -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let x = Tensor::randn(0f32, 1.0, (2048, 256), &Device::Cpu)?;
        let idx: Vec<u32> = (0..2048).step_by(2).collect();
        let gather = || {
            itt::ops::gather_rows(&x, &idx).expect("gather");
        };
        let join = || {
            rayon::join(|| std::hint::black_box(1), || std::hint::black_box(2));
        };
        println!("| sequential work before (us) | gather median / p90 (us) | empty join median / p90 (us) |");
        println!("|---|---|---|");
        for work in [0, 20, 50, 200, 500, 2000] {
            let (gm, gp) = probe(work, &gather);
            let (jm, jp) = probe(work, &join);
            println!("| {work} | {gm:.1} / {gp:.1} | {jm:.1} / {jp:.1} |");
        }
        Ok(())
    })
}
