//! Time one cached forward pass of M tokens (M = 1 decode, M = K+1 a speculative verify pass)
//! at a given position, on a checkpoint: what a verify pass costs against a decode step.
//!
//!     cargo run --release --example pass_cost -- RUN_FOLDER [POSITION] [REPS] [full|draft M]

use candle_core::{DType, Tensor};
use itt::import::{open, OpenOptions};
use itt::model::{Routing, RoutingOptions, SeqLayout};
use std::sync::Arc;

/// CPU seconds this thread has run: on a shared machine it leaves out the time other
/// processes held the core (run with RAYON_NUM_THREADS=1 so the work stays on this thread).
fn thread_cpu_s() -> f64 {
    let mut t = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec into the struct it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
    t.tv_sec as f64 + t.tv_nsec as f64 * 1e-9
}

/// x (m, 128) W^T for W (352, 128): the same W every time (in cache) or cycling through 24
/// (3.4 MB, out of L2): whether a decode step's products wait on memory.
fn mem_probe() {
    let dev = candle_core::Device::Cpu;
    let ws: Vec<Tensor> = (0..24)
        .map(|i| Tensor::randn(0f32, 1.0, (352, 128), &dev).unwrap() * (i as f64 + 1.0))
        .map(|t| t.unwrap())
        .collect();
    for m in [1usize, 5] {
        let x = Tensor::randn(0f32, 1.0, (m, 128), &dev).unwrap();
        for cycle in [false, true] {
            let t0 = thread_cpu_s();
            let n = 20000;
            for i in 0..n {
                let w = &ws[if cycle { i % ws.len() } else { 0 }];
                std::hint::black_box(itt::ops::linear(&x, w, itt::ops::Precision::F32).unwrap());
            }
            let ours = (thread_cpu_s() - t0) * 1e6 / n as f64;
            let t0 = thread_cpu_s();
            for i in 0..n {
                let w = &ws[if cycle { i % ws.len() } else { 0 }];
                std::hint::black_box(x.matmul(&w.t().unwrap()).unwrap());
            }
            let gemm = (thread_cpu_s() - t0) * 1e6 / n as f64;
            let what = if cycle { "24 weights" } else { "one weight" };
            println!("linear m={m} {what}: {ours:.2} us (candle's matmul, gemm: {gemm:.2} us)");
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args[1] == "mem" {
        return mem_probe();
    }
    let path = std::path::PathBuf::from(&args[1]);
    let pos: usize = args.get(2).map(|s| s.parse().unwrap()).unwrap_or(100);
    let reps: usize = args.get(3).map(|s| s.parse().unwrap()).unwrap_or(400);
    // Optional filter for profiling one case: "full" or "draft", and M.
    let only: Option<(bool, usize)> = args.get(4).map(|w| (w == "draft", args[5].parse().unwrap()));
    let o = open(&path, &OpenOptions::default()).unwrap();
    let (model, tok) = (o.model, o.tokenizer);
    let routing = RoutingOptions {
        mode: Routing::Threshold,
        calibration: o.info.calibration.map(Arc::new),
        ..Default::default()
    };
    let text = "12+34=46\n5+17=22\n".repeat(40);
    let ids = tok.encode(&text).unwrap();
    let dev = model.device().clone();
    itt::base::util::on_worker_thread(|| {
        for draft in [false, true] {
            let r = if draft { itt::speculate::draft_routing(&routing) } else { routing.clone() };
            for m in [1usize, 2, 3, 5, 8] {
                if only.is_some_and(|o| o != (draft, m)) {
                    continue;
                }
                let mut cache = model.new_cache_reserved(pos + 16);
                let x = Tensor::from_slice(&ids[..pos], pos, &dev).unwrap();
                model
                    .forward_hidden(&x, &SeqLayout::uniform(1, pos), &r, Some(std::slice::from_mut(&mut cache)), None)
                    .unwrap();
                let before = cache.lens();
                let feed = Tensor::from_slice(&ids[pos..pos + m], m, &dev).unwrap();
                let mut times = vec![];
                for _ in 0..reps {
                    let t0 = thread_cpu_s();
                    let layout = SeqLayout::with_past(&[m], &[pos]);
                    let h =
                        model.forward_hidden(&feed, &layout, &r, Some(std::slice::from_mut(&mut cache)), None).unwrap();
                    let l = model.logits(&h).unwrap().to_dtype(DType::F32).unwrap().to_vec2::<f32>().unwrap();
                    std::hint::black_box(l);
                    times.push((thread_cpu_s() - t0) * 1e3);
                    // Roll back to the prefix so every rep runs at the same position.
                    for (l, slots) in cache.slots.iter_mut().enumerate() {
                        for (s, c) in slots.iter_mut().enumerate() {
                            c.truncate(before[l][s]);
                        }
                    }
                    cache.seen = pos;
                }
                times.sort_by(|a, b| a.total_cmp(b));
                println!(
                    "{} M={m}: median {:.3} ms, p10 {:.3} ms (thread CPU time)",
                    if draft { "draft" } else { "full " },
                    times[reps / 2],
                    times[reps / 10]
                );
            }
        }
    });
}
