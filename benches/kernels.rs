//! Per-kernel timings, fused vs composed, at the shapes of preset `small` (d 256, 4 heads of 64,
//! SwiGLU 688, vocab 4096, batch 8x256): forward alone, and forward + backward of
//! sum(out * W). Prints a markdown table of medians; nothing is asserted.
//!
//!     cargo bench --bench kernels            (ITT_SIMD=avx2|portable to cap the SIMD level)

use candle_core::{Device, Tensor, Var};
use itt::base::rng::Rng;
use itt::ops::{self, with_composed, Kernel};
use std::time::Instant;

fn randn(shape: &[usize], seed: u64) -> Tensor {
    let mut r = Rng::new(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| r.normal() as f32).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// CPU seconds used by the whole process so far (all threads), from getrusage.
fn cpu_s() -> f64 {
    // SAFETY: rusage is plain integers (all-zero is a valid value), and getrusage writes one
    // into the struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    tv(u.ru_utime) + tv(u.ru_stime)
}

/// Median wall and CPU milliseconds of `f` over `reps` runs after one warm-up. On a shared
/// machine the CPU time (work done, all threads) is the steadier of the two.
fn time(reps: usize, mut f: impl FnMut()) -> (f64, f64) {
    f();
    let (wall, cpu): (Vec<f64>, Vec<f64>) = (0..reps)
        .map(|_| {
            let (t, c) = (Instant::now(), cpu_s());
            f();
            (t.elapsed().as_secs_f64() * 1e3, (cpu_s() - c) * 1e3)
        })
        .unzip();
    (median(wall), median(cpu))
}

type Op = Box<dyn Fn(&[Tensor]) -> itt::Result<Tensor>>;

fn main() {
    // As the CLI does: keep freed buffers in the heap, element-wise ops on one thread.
    itt::base::util::tune_allocator();
    itt::base::util::tune_threads();
    let (b, t, d, h, hd, f, v) = (8, 256, 256, 4, 64, 688, 4096);
    let n = b * t;
    let reps = std::env::var("REPS").ok().and_then(|s| s.parse().ok()).unwrap_or(15);
    let targets: Vec<u32> = {
        let mut r = Rng::new(7);
        (0..n).map(|_| r.below(v as u64) as u32).collect()
    };
    let targets = Tensor::from_vec(targets, n, &Device::Cpu).unwrap();
    let lens = vec![t; b];
    let lens2 = lens.clone();
    let cases: Vec<(&str, Kernel, Vec<Vec<usize>>, Op)> = vec![
        (
            "rms_norm (2048, 256)",
            Kernel::RmsNorm,
            vec![vec![n, d], vec![d]],
            Box::new(|x| ops::rms_norm(&x[0], &x[1], 1e-5)),
        ),
        (
            "rope (2048, 4, 64)",
            Kernel::Rope,
            vec![vec![n, h, hd], vec![n, hd / 2], vec![n, hd / 2]],
            Box::new(|x| ops::apply_rope(&x[0], &x[1], &x[2])),
        ),
        ("swiglu (2048, 688)", Kernel::Swiglu, vec![vec![n, f], vec![n, f]], Box::new(|x| ops::swiglu(&x[0], &x[1]))),
        (
            "attention (8, 4, 256, 64)",
            Kernel::Attention,
            vec![vec![b, h, t, hd], vec![b, h, t, hd], vec![b, h, t, hd]],
            Box::new(|x| ops::causal_sdpa(&x[0], &x[1], &x[2])),
        ),
        (
            "attention varlen (2048, 4, 64)",
            Kernel::Attention,
            vec![vec![n, h, hd], vec![n, h, hd], vec![n, h, hd]],
            Box::new(move |x| ops::causal_attention_varlen(&x[0], &x[1], &x[2], &lens, &lens2)),
        ),
        (
            "cross_entropy (2048, 4096)",
            Kernel::CrossEntropy,
            vec![vec![n, v]],
            Box::new(move |x| ops::cross_entropy(&x[0], &targets)),
        ),
    ];
    println!("wall ms (CPU ms, all threads), medians of {reps}");
    println!("| kernel | composed fwd | fused fwd | composed fwd+bwd | fused fwd+bwd | speed-up fwd+bwd (wall, CPU) |");
    println!("|---|---:|---:|---:|---:|---:|");
    for (name, kernel, shapes, op) in &cases {
        let inputs: Vec<Tensor> = shapes.iter().enumerate().map(|(i, s)| randn(s, i as u64 + 1)).collect();
        let vars: Vec<Var> = inputs.iter().map(|x| Var::from_tensor(x).unwrap()).collect();
        let tracked: Vec<Tensor> = vars.iter().map(|x| x.as_tensor().clone()).collect();
        let w = randn(op(&inputs).unwrap().dims(), 99);
        let fwd = |x: &[Tensor]| {
            op(x).unwrap();
        };
        let fwd_bwd = |x: &[Tensor]| {
            let out = op(x).unwrap();
            (&out * &w).unwrap().sum_all().unwrap().backward().unwrap();
        };
        let composed = [*kernel];
        let cf = with_composed(&composed, || time(reps, || fwd(&inputs)));
        let ff = with_composed(&[], || time(reps, || fwd(&inputs)));
        let cb = with_composed(&composed, || time(reps, || fwd_bwd(&tracked)));
        let fb = with_composed(&[], || time(reps, || fwd_bwd(&tracked)));
        let ms = |(w, c): (f64, f64)| format!("{w:.2} ({c:.2})");
        println!(
            "| {name} | {} | {} | {} | {} | {:.1}x, {:.1}x |",
            ms(cf),
            ms(ff),
            ms(cb),
            ms(fb),
            cb.0 / fb.0,
            cb.1 / fb.1
        );
    }
}
