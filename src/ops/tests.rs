//! Every fused kernel against its composed twin (values and gradients through candle's
//! backprop, f32 and f64, odd sizes, every SIMD level the CPU has) and against central finite
//! differences in f64; plus repeatability across thread counts and a whole model both ways.

use super::fused::{self, simd_level, with_simd_cap, Simd};
use super::{composed, with_composed, Kernel};
use crate::base::rng::Rng;
use crate::Result;
use candle_core::{DType, Device, Tensor, Var};

type Op<'a> = &'a dyn Fn(&[Tensor]) -> Result<Tensor>;

fn randn(shape: &[usize], seed: u64, dtype: DType) -> Tensor {
    let mut r = Rng::new(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| r.normal()).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap().to_dtype(dtype).unwrap()
}

fn host(t: &Tensor) -> Vec<f64> {
    t.flatten_all().unwrap().to_dtype(DType::F64).unwrap().to_vec1().unwrap()
}

/// Output values and d/d(input) of L = sum(out * W), W a fixed random tensor.
fn value_and_grads(f: Op, inputs: &[Tensor]) -> (Vec<f64>, Vec<Vec<f64>>) {
    let vars: Vec<Var> = inputs.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let out = f(&ts).unwrap();
    let w = randn(out.dims(), 99, out.dtype());
    let grads = (&out * &w).unwrap().sum_all().unwrap().backward().unwrap();
    let g =
        vars.iter().map(|v| grads.get(v.as_tensor()).map(host).unwrap_or_else(|| vec![0.0; v.elem_count()])).collect();
    (host(&out), g)
}

fn loss(f: Op, inputs: &[Tensor]) -> f64 {
    let out = f(inputs).unwrap();
    let w = randn(out.dims(), 99, out.dtype());
    (&out * &w).unwrap().sum_all().unwrap().to_dtype(DType::F64).unwrap().to_scalar().unwrap()
}

/// max |a - b| relative to max |b|.
fn rel_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f64, |m, x| m.max(x.abs())).max(1e-30);
    a.iter().zip(b).fold(0f64, |m, (x, y)| m.max((x - y).abs())) / scale
}

fn levels() -> Vec<Simd> {
    [Simd::Portable, Simd::Avx2, Simd::Avx512].into_iter().filter(|&l| l <= simd_level()).collect()
}

/// Fused against composed on the same inputs, in f32 and f64 and at every SIMD level.
fn check_twins(name: &str, fused: Op, composed: Op, shapes: &[&[usize]], seed: u64) {
    for (dtype, tol) in [(DType::F32, 2e-5), (DType::F64, 1e-12)] {
        let inputs: Vec<Tensor> = shapes.iter().enumerate().map(|(i, s)| randn(s, seed + i as u64, dtype)).collect();
        let (want, want_g) = value_and_grads(composed, &inputs);
        for level in levels() {
            let (got, got_g) = with_simd_cap(level, || value_and_grads(fused, &inputs));
            let d = rel_diff(&got, &want);
            eprintln!("{name} {dtype:?} {level:?}: value max rel diff {d:e}");
            assert!(d < tol, "{name} {dtype:?} {level:?}: values differ by {d:e}");
            for (i, (g, w)) in got_g.iter().zip(&want_g).enumerate() {
                let d = rel_diff(g, w);
                eprintln!("{name} {dtype:?} {level:?}: grad {i} max rel diff {d:e}");
                assert!(d < tol * 10.0, "{name} {dtype:?} {level:?}: gradient of input {i} differs by {d:e}");
            }
        }
    }
}

/// The fused kernel's backprop gradient against central differences, f64, sampled elements.
fn check_finite_differences(name: &str, f: Op, shapes: &[&[usize]], seed: u64) {
    let inputs: Vec<Tensor> = shapes.iter().enumerate().map(|(i, s)| randn(s, seed + i as u64, DType::F64)).collect();
    let (_, grads) = value_and_grads(f, &inputs);
    let mut rng = Rng::new(seed);
    let mut worst = 0f64;
    for (i, x) in inputs.iter().enumerate() {
        let base = host(x);
        for _ in 0..12.min(base.len()) {
            let j = rng.below(base.len() as u64) as usize;
            let h = 1e-5;
            let at = |delta: f64| {
                let mut p = base.clone();
                p[j] += delta;
                let mut ins = inputs.clone();
                ins[i] = Tensor::from_vec(p, x.dims(), &Device::Cpu).unwrap();
                loss(f, &ins)
            };
            let num = (at(h) - at(-h)) / (2.0 * h);
            let err = (num - grads[i][j]).abs() / num.abs().max(grads[i][j].abs()).max(1e-3);
            worst = worst.max(err);
            assert!(err < 1e-6, "{name}: input {i}[{j}] numeric {num:e} vs analytic {:e}", grads[i][j]);
        }
    }
    eprintln!("{name}: worst finite-difference error {worst:e}");
}

#[test]
fn fast_exp_is_accurate() {
    let mut worst = 0f64;
    for i in -87_000..88_000 {
        let x = i as f32 / 1000.0 + 0.000_37;
        let want = (x as f64).exp();
        let got = fused::exp_f32(x) as f64;
        worst = worst.max((got - want).abs() / want);
    }
    assert!(worst < 3e-7, "relative error {worst:e}");
    assert!(fused::exp_f32(f32::NAN).is_nan());
    assert!(fused::exp_f32(-1e4) < 1e-37 && fused::exp_f32(-1e4) >= 0.0);
    assert!(fused::exp_f32(1e4).is_finite());
}

#[test]
fn rms_norm_matches_composed_and_finite_differences() {
    let fused = |t: &[Tensor]| fused::rms_norm(&t[0], &t[1], 1e-5);
    let composed = |t: &[Tensor]| composed::rms_norm(&t[0], &t[1], 1e-5);
    // (D = 1 is left out: its x-gradient is eps-sized, a cancellation neither version resolves in f32.)
    for (i, (n, d)) in [(1, 3), (7, 33), (300, 256)].into_iter().enumerate() {
        check_twins("rms_norm", &fused, &composed, &[&[n, d], &[d]], 10 + i as u64);
    }
    check_twins("rms_norm 3-d", &fused, &composed, &[&[2, 3, 17], &[17]], 20);
    check_finite_differences("rms_norm", &fused, &[&[5, 19], &[19]], 30);
}

#[test]
fn rope_matches_composed_and_finite_differences() {
    let fused = |t: &[Tensor]| fused::apply_rope(&t[0], &t[1], &t[2]);
    let composed = |t: &[Tensor]| composed::apply_rope(&t[0], &t[1], &t[2]);
    // cos and sin are free inputs here (not unit pairs), so their gradients are checked too.
    for (i, (n, h, hd)) in [(1, 1, 2), (5, 3, 6), (129, 4, 64)].into_iter().enumerate() {
        check_twins("rope", &fused, &composed, &[&[n, h, hd], &[n, hd / 2], &[n, hd / 2]], 40 + i as u64);
    }
    check_finite_differences("rope", &fused, &[&[4, 3, 10], &[4, 5], &[4, 5]], 50);
}

#[test]
fn rope_with_constant_tables_gives_no_table_gradient() {
    let x = Var::from_tensor(&randn(&[3, 2, 4], 1, DType::F32)).unwrap();
    let (cos, sin) = (randn(&[3, 2], 2, DType::F32), randn(&[3, 2], 3, DType::F32));
    let y = fused::apply_rope(x.as_tensor(), &cos, &sin).unwrap();
    let g = y.sum_all().unwrap().backward().unwrap();
    assert!(g.get(x.as_tensor()).is_some());
    assert!(g.get(&cos).is_none() && g.get(&sin).is_none());
}

#[test]
fn swiglu_matches_composed_and_finite_differences() {
    let fused = |t: &[Tensor]| fused::swiglu(&t[0], &t[1]);
    let composed = |t: &[Tensor]| composed::swiglu(&t[0], &t[1]);
    for (i, (n, f)) in [(1, 1), (3, 5), (70, 688)].into_iter().enumerate() {
        check_twins("swiglu", &fused, &composed, &[&[n, f], &[n, f]], 60 + i as u64);
    }
    check_finite_differences("swiglu", &fused, &[&[6, 7], &[6, 7]], 70);
}

#[test]
fn cross_entropy_matches_composed_and_finite_differences() {
    for (i, (n, v)) in [(1, 2), (9, 37), (40, 1000)].into_iter().enumerate() {
        let mut r = Rng::new(80 + i as u64);
        let t: Vec<u32> = (0..n).map(|_| r.below(v as u64) as u32).collect();
        let t = Tensor::from_vec(t, n, &Device::Cpu).unwrap();
        let fused = |x: &[Tensor]| fused::cross_entropy(&x[0], &t);
        let composed = |x: &[Tensor]| composed::cross_entropy(&x[0], &t);
        check_twins("cross_entropy", &fused, &composed, &[&[n, v]], 90 + i as u64);
        if i == 1 {
            check_finite_differences("cross_entropy", &fused, &[&[n, v]], 100);
        }
    }
    let bad = Tensor::new(&[5u32], &Device::Cpu).unwrap();
    assert!(fused::cross_entropy(&randn(&[1, 5], 1, DType::F32), &bad).is_err());
}

#[test]
fn attention_matches_composed_and_finite_differences() {
    let fused = |t: &[Tensor]| fused::causal_sdpa(&t[0], &t[1], &t[2]);
    let composed = |t: &[Tensor]| composed::causal_sdpa(&t[0], &t[1], &t[2]);
    // (B, H, Hkv, Lq, Lk, hd): plain, grouped-query with odd sizes across tile edges, cached
    // keys (past = Lk - Lq > 0), one-token decoding.
    let cases =
        [(2, 4, 4, 7, 7, 8), (1, 6, 2, 70, 70, 5), (2, 4, 2, 3, 130, 16), (3, 2, 1, 1, 9, 4), (1, 2, 2, 129, 200, 64)]
            .into_iter()
            // Heads of 32, 48 and 100 dimensions: the 32- and 16-column panels of the tile
            // products, and a remainder after all three panel widths.
            .chain([(1, 2, 1, 70, 70, 32), (2, 2, 2, 9, 67, 48), (1, 1, 1, 66, 66, 100)]);
    for (i, (b, h, hkv, lq, lk, hd)) in cases.enumerate() {
        let name = format!("attention B{b} H{h} Hkv{hkv} Lq{lq} Lk{lk} hd{hd}");
        check_twins(&name, &fused, &composed, &[&[b, h, lq, hd], &[b, hkv, lk, hd], &[b, hkv, lk, hd]], 110 + i as u64);
    }
    check_finite_differences("attention", &fused, &[&[2, 4, 5, 6], &[2, 2, 8, 6], &[2, 2, 8, 6]], 120);
}

#[test]
fn varlen_attention_matches_composed_and_finite_differences() {
    // Packed sequences of different lengths, an empty one, cached keys, GQA.
    // (query lengths, key lengths, H, Hkv, hd)
    type Case<'a> = (&'a [usize], &'a [usize], usize, usize, usize);
    // hd 16 with lengths across 16-row blocks: the register-transpose path of f32 on AVX-512.
    let cases: [Case; 4] = [
        (&[5, 0, 67, 1], &[5, 0, 70, 9], 4, 2, 6),
        (&[64, 64], &[64, 64], 2, 2, 8),
        (&[3, 7], &[3, 7], 3, 1, 4),
        (&[20, 33], &[20, 40], 2, 1, 16),
    ];
    for (i, &(lq, lk, h, hkv, hd)) in cases.iter().enumerate() {
        let (nq, nk) = (lq.iter().sum::<usize>(), lk.iter().sum::<usize>());
        let fused = |t: &[Tensor]| fused::causal_attention_varlen(&t[0], &t[1], &t[2], lq, lk);
        let composed = |t: &[Tensor]| composed::causal_attention_varlen(&t[0], &t[1], &t[2], lq, lk);
        let name = format!("varlen attention {lq:?}/{lk:?} H{h} Hkv{hkv} hd{hd}");
        check_twins(&name, &fused, &composed, &[&[nq, h, hd], &[nk, hkv, hd], &[nk, hkv, hd]], 130 + i as u64);
        if i == 0 {
            check_finite_differences("varlen attention", &fused, &[&[nq, h, hd], &[nk, hkv, hd], &[nk, hkv, hd]], 140);
        }
    }
}

#[test]
fn attention_over_cache_slices_equals_the_packed_kernel() {
    // Each sequence's keys in its own buffer (a KV cache read in place, views starting past
    // the buffer's beginning included), against the packed kernel on the concatenation.
    let (h, hkv, hd) = (4, 2, 8);
    for (lq, lk) in [(vec![1usize, 1, 1], vec![9usize, 1, 40]), (vec![5, 0, 3], vec![70, 4, 3])] {
        let nq: usize = lq.iter().sum();
        let q = randn(&[nq, h, hd], 170, DType::F32);
        let bufs: Vec<(Tensor, Tensor)> = lk
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                let k = randn(&[n + 3, hkv, hd], 171 + i as u64, DType::F32).narrow(0, 3, n).unwrap();
                let v = randn(&[n + 3, hkv, hd], 181 + i as u64, DType::F32).narrow(0, 3, n).unwrap();
                (k, v)
            })
            .collect();
        let ks: Vec<Tensor> = bufs.iter().map(|b| b.0.clone()).collect();
        let vs: Vec<Tensor> = bufs.iter().map(|b| b.1.clone()).collect();
        let got = fused::attention::causal_attention_kv_slices(&q, &ks, &vs, &lq).unwrap();
        let (k, v) = (Tensor::cat(&ks, 0).unwrap(), Tensor::cat(&vs, 0).unwrap());
        let want = fused::causal_attention_varlen(&q, &k, &v, &lq, &lk).unwrap();
        assert_eq!(host(&got), host(&want), "{lq:?}/{lk:?}: the same kernel on the same numbers");
    }
}

#[test]
fn attention_with_key_limits_matches_composed_and_finite_differences() {
    // Queries at arbitrary positions among their sequence's keys (a routed step's selected
    // tokens attending to every token up to their own position), several tiles long.
    // (query limits per sequence, key lengths, H, Hkv, hd)
    type Case = (Vec<Vec<u32>>, Vec<usize>, usize, usize, usize);
    let mut r = Rng::new(5);
    let mut subset =
        |lk: usize, share: u64| -> Vec<u32> { (1..=lk as u32).filter(|_| r.below(100) < share).collect::<Vec<_>>() };
    let cases: Vec<Case> = vec![
        (vec![vec![1, 3, 4], vec![], vec![2, 9]], vec![5, 4, 9], 4, 2, 6),
        (vec![subset(150, 50), subset(70, 30)], vec![150, 70], 2, 1, 16),
        (vec![vec![7]], vec![7], 3, 3, 8),
    ];
    for (i, (limits, lk, h, hkv, hd)) in cases.iter().enumerate() {
        let lq: Vec<usize> = limits.iter().map(Vec::len).collect();
        let flat: Vec<u32> = limits.concat();
        let (nq, nk) = (lq.iter().sum::<usize>(), lk.iter().sum::<usize>());
        let fused = |t: &[Tensor]| fused::attention_varlen_limited(&t[0], &t[1], &t[2], &lq, lk, &flat);
        let composed = |t: &[Tensor]| composed::attention_varlen_limited(&t[0], &t[1], &t[2], &lq, lk, &flat);
        let name = format!("limited attention {lq:?}/{lk:?} H{h} Hkv{hkv} hd{hd}");
        check_twins(&name, &fused, &composed, &[&[nq, *h, *hd], &[nk, *hkv, *hd], &[nk, *hkv, *hd]], 150 + i as u64);
        if i == 0 {
            check_finite_differences(
                "limited attention",
                &fused,
                &[&[nq, *h, *hd], &[nk, *hkv, *hd], &[nk, *hkv, *hd]],
                160,
            );
        }
    }
    // The last Lq queries of their keys: the same as causal attention with cached keys.
    let (lq, lk) = ([3usize, 2], [5usize, 2]);
    let limits = [3u32, 4, 5, 1, 2];
    let (q, k, v) =
        (randn(&[5, 2, 4], 1, DType::F32), randn(&[7, 2, 4], 2, DType::F32), randn(&[7, 2, 4], 3, DType::F32));
    let a = fused::attention_varlen_limited(&q, &k, &v, &lq, &lk, &limits).unwrap();
    let b = fused::causal_attention_varlen(&q, &k, &v, &lq, &lk).unwrap();
    assert_eq!(a.flatten_all().unwrap().to_vec1::<f32>().unwrap(), b.flatten_all().unwrap().to_vec1::<f32>().unwrap());
    // A query that sees no key, or more keys than its sequence has, is refused.
    assert!(fused::attention_varlen_limited(&q, &k, &v, &lq, &lk, &[0, 4, 5, 1, 2]).is_err());
    assert!(fused::attention_varlen_limited(&q, &k, &v, &lq, &lk, &[3, 4, 6, 1, 2]).is_err());
}

#[test]
fn router_logits_and_column_scaling_match_composed_and_finite_differences() {
    let router = |t: &[Tensor]| fused::router_logits(&t[0], &t[1], &t[2]);
    let router_c = |t: &[Tensor]| composed::router_logits(&t[0], &t[1], &t[2]);
    let scale = |t: &[Tensor]| fused::scale_columns(&t[0], &t[1]);
    let scale_c = |t: &[Tensor]| composed::scale_columns(&t[0], &t[1]);
    // One row (decoding), odd sizes, and enough rows for the parallel path.
    for (i, (n, d)) in [(1, 1), (7, 33), (1000, 64)].into_iter().enumerate() {
        check_twins(&format!("router N{n} D{d}"), &router, &router_c, &[&[n, d], &[1, d], &[1]], 170 + i as u64);
        check_twins(&format!("scale_columns N{n} D{d}"), &scale, &scale_c, &[&[n, d], &[d]], 180 + i as u64);
    }
    check_finite_differences("router", &router, &[&[9, 13], &[1, 13], &[1]], 190);
    check_finite_differences("scale_columns", &scale, &[&[9, 13], &[13]], 191);
    // Column scaling is the same product as the broadcast one: equal bits.
    let (x, phi) = (randn(&[5, 7], 1, DType::F32), randn(&[7], 2, DType::F32));
    let bits = |t: Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(bits(fused::scale_columns(&x, &phi).unwrap()), bits(composed::scale_columns(&x, &phi).unwrap()));
    assert!(fused::router_logits(&x, &randn(&[1, 6], 3, DType::F32), &randn(&[1], 4, DType::F32)).is_err());
    assert!(fused::scale_columns(&x, &randn(&[5], 5, DType::F32)).is_err());
}

#[test]
fn gather_rows_matches_composed_and_finite_differences() {
    let cases: [(usize, usize, &[u32]); 3] = [(4, 3, &[2]), (70, 33, &[69, 0, 5, 17, 40, 41, 3]), (1200, 64, &[])];
    for (i, &(n, d, sel)) in cases.iter().enumerate() {
        let every_other: Vec<u32> = (0..n as u32).step_by(2).collect();
        let sel = if i == 2 { &every_other[..] } else { sel };
        let fused = |t: &[Tensor]| fused::gather_rows(&t[0], sel);
        let composed = |t: &[Tensor]| composed::gather_rows(&t[0], sel);
        check_twins(&format!("gather_rows N{n} D{d} M{}", sel.len()), &fused, &composed, &[&[n, d]], 200 + i as u64);
    }
    let idx = [6u32, 0, 3];
    check_finite_differences("gather_rows", &|t: &[Tensor]| fused::gather_rows(&t[0], &idx), &[&[7, 5]], 210);
    let x = randn(&[4, 2], 1, DType::F32);
    assert!(fused::gather_rows(&x, &[1, 1]).is_err() && fused::gather_rows(&x, &[4]).is_err());
    assert_eq!(fused::gather_rows(&x, &[]).unwrap().dims(), &[0, 2]);
}

#[test]
fn routed_update_matches_composed_and_finite_differences() {
    // (N, D, selected rows): none, one, scattered and unordered, every row.
    let cases: [(usize, usize, &[u32]); 4] =
        [(5, 3, &[]), (4, 7, &[2]), (70, 33, &[69, 0, 5, 17, 40, 41, 3]), (300, 64, &[])];
    for (i, &(n, d, sel)) in cases.iter().enumerate() {
        let all: Vec<u32> = (0..n as u32).rev().collect();
        let sel = if i == 3 { &all[..] } else { sel };
        let m = sel.len();
        let fused = |t: &[Tensor]| fused::routed_update(&t[0], sel, &t[1], &t[2], &t[3]);
        let composed = |t: &[Tensor]| composed::routed_update(&t[0], sel, &t[1], &t[2], &t[3]);
        let name = format!("routed_update N{n} D{d} M{m}");
        check_twins(&name, &fused, &composed, &[&[n, d], &[m, d], &[d], &[m, 1]], 150 + i as u64);
        if i == 2 {
            check_finite_differences(&name, &fused, &[&[n, d], &[m, d], &[d], &[m, 1]], 160);
        }
    }
    // The forward pass and dy are the composed products in the same order: equal bits.
    let (x, y, phi, w) = (
        randn(&[9, 5], 1, DType::F32),
        randn(&[3, 5], 2, DType::F32),
        randn(&[5], 3, DType::F32),
        randn(&[3, 1], 4, DType::F32),
    );
    let sel = [7u32, 1, 4];
    let a = fused::routed_update(&x, &sel, &y, &phi, &w).unwrap();
    let b = composed::routed_update(&x, &sel, &y, &phi, &w).unwrap();
    assert_eq!(a.flatten_all().unwrap().to_vec1::<f32>().unwrap(), b.flatten_all().unwrap().to_vec1::<f32>().unwrap());
    // Repeated or out-of-range rows are refused (the kernel writes rows from several threads).
    assert!(fused::routed_update(&x, &[1, 1, 4], &y, &phi, &w).is_err());
    assert!(fused::routed_update(&x, &[1, 9, 4], &y, &phi, &w).is_err());
    assert!(fused::routed_update(&x, &[1, 2], &y, &phi, &w).is_err());
}

#[test]
fn fused_results_do_not_depend_on_the_thread_count() {
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| {
            let q = randn(&[2, 4, 100, 16], 1, DType::F32);
            let k = randn(&[2, 2, 100, 16], 2, DType::F32);
            let v = randn(&[2, 2, 100, 16], 3, DType::F32);
            let x = randn(&[300, 64], 4, DType::F32);
            let g = randn(&[64], 5, DType::F32);
            let (mut vals, mut grads) = value_and_grads(&|t| fused::causal_sdpa(&t[0], &t[1], &t[2]), &[q, k, v]);
            let (v2, g2) = value_and_grads(&|t| fused::rms_norm(&t[0], &t[1], 1e-5), &[x, g]);
            vals.extend(v2);
            grads.extend(g2);
            let sel: Vec<u32> = (0..1800).step_by(3).collect(); // 600 x 64 rows: the parallel path
            let upd = [[1800, 64], [600, 64]].iter().map(|s| randn(s, 6, DType::F32));
            let upd: Vec<Tensor> = upd.chain([randn(&[64], 7, DType::F32), randn(&[600, 1], 8, DType::F32)]).collect();
            let (v3, g3) = value_and_grads(&|t| fused::routed_update(&t[0], &sel, &t[1], &t[2], &t[3]), &upd);
            vals.extend(v3);
            grads.extend(g3);
            let (x, w, b, phi) = (
                randn(&[1800, 64], 9, DType::F32),
                randn(&[1, 64], 10, DType::F32),
                randn(&[1], 11, DType::F32),
                randn(&[64], 12, DType::F32),
            );
            let (v4, g4) = value_and_grads(&|t| fused::router_logits(&t[0], &t[1], &t[2]), &[x.clone(), w, b]);
            let (v5, g5) = value_and_grads(&|t| fused::scale_columns(&t[0], &t[1]), &[x, phi]);
            vals.extend(v4.into_iter().chain(v5));
            grads.extend(g4.into_iter().chain(g5));
            (vals, grads)
        })
    };
    let one = run(1);
    assert!(one == run(3), "results changed with the thread count");
    assert!(one == run(3), "results changed between runs");
}

#[test]
fn composed_switch_is_honoured() {
    let x = randn(&[4, 8], 1, DType::F32);
    let g = randn(&[8], 2, DType::F32);
    let fused_y = super::rms_norm(&Var::from_tensor(&x).unwrap(), &g, 1e-5).unwrap();
    let comp_y =
        with_composed(&[Kernel::RmsNorm], || super::rms_norm(&Var::from_tensor(&x).unwrap(), &g, 1e-5).unwrap());
    // The fused result is one graph node over x; the composed one a chain of ops.
    assert_eq!(fused_y.sorted_nodes().len(), 2);
    assert!(comp_y.sorted_nodes().len() > 2);
}

#[test]
fn model_with_fused_ops_matches_composed_ops() {
    use crate::base::config::{ModelConfig, ModelKind, ThinkingConfig};
    use crate::model::{Model, RoutingOptions};
    let mut cfg = ModelConfig {
        vocab_size: 37,
        d_model: 16,
        n_layers: 2,
        n_heads: 4,
        n_kv_heads: 2,
        mlp_hidden: 24,
        max_seq_len: 40,
        rope_theta: 10000.0,
        norm_eps: 1e-5,
        tie_embeddings: false,
        init_std: 0.2,
        thinking: ThinkingConfig { kind: ModelKind::Itt, steps: 3, ..Default::default() },
    };
    cfg.thinking.ratios = vec![0.6, 0.4];
    let model = Model::new(&cfg, 3, &Device::Cpu).unwrap();
    let (b, t) = (3, 33);
    let mut r = Rng::new(4);
    let inp: Vec<u32> = (0..b * t).map(|_| r.below(37) as u32).collect();
    let tgt: Vec<u32> = (0..b * t).map(|_| r.below(37) as u32).collect();
    let run = || {
        let loss = model.loss(&inp, &tgt, b, t, &RoutingOptions::default(), None).unwrap();
        let g = loss.backward().unwrap();
        let grads: Vec<f64> = model.params.iter().flat_map(|(_, v)| host(g.get(v.as_tensor()).unwrap())).collect();
        (loss.to_scalar::<f32>().unwrap() as f64, grads)
    };
    let (lf, gf) = run();
    let (lc, gc) = with_composed(&Kernel::ALL, run);
    eprintln!("model loss fused {lf} composed {lc}; gradient max rel diff {:e}", rel_diff(&gf, &gc));
    assert!((lf - lc).abs() < 1e-5 * lc.abs(), "loss {lf} vs {lc}");
    assert!(rel_diff(&gf, &gc) < 1e-4);
}

/// bf16-rounded copy of f64 values (round to nearest even, as `to_dtype(BF16)`).
fn bf16_round(v: &[f64]) -> Vec<f64> {
    v.iter().map(|&x| half::bf16::from_f32(x as f32).to_f64()).collect()
}

/// c (m, n) = a (m, k) . b (k, n) in f64, with element accessors.
fn product(m: usize, n: usize, k: usize, a: impl Fn(usize, usize) -> f64, b: impl Fn(usize, usize) -> f64) -> Vec<f64> {
    let mut c = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            c[i * n + j] = (0..k).map(|kk| a(i, kk) * b(kk, j)).sum();
        }
    }
    c
}

#[test]
fn linear_bf16_is_the_product_of_bf16_rounded_operands_forward_and_backward() {
    for (n, k, o) in [(37, 45, 29), (1, 1, 1), (64, 256, 96), (5, 70, 3)] {
        let (x, w) = (randn(&[n, k], 7, DType::F32), randn(&[o, k], 8, DType::F32));
        let f = |t: &[Tensor]| fused::linear(&t[0], &t[1], super::Precision::Bf16);
        let (y, g) = value_and_grads(&f, &[x.clone(), w.clone()]);
        // L = sum(y * R), so dy = R: the same fixed tensor `value_and_grads` uses.
        let r = bf16_round(&host(&randn(&[n, o], 99, DType::F32)));
        let (xr, wr) = (bf16_round(&host(&x)), bf16_round(&host(&w)));
        let want_y = product(n, o, k, |i, kk| xr[i * k + kk], |kk, j| wr[j * k + kk]);
        let want_dx = product(n, k, o, |i, j| r[i * o + j], |j, kk| wr[j * k + kk]);
        let want_dw = product(o, k, n, |j, i| r[i * o + j], |i, kk| xr[i * k + kk]);
        for (what, got, want) in [("y", &y, &want_y), ("dx", &g[0], &want_dx), ("dW", &g[1], &want_dw)] {
            let d = rel_diff(got, want);
            assert!(d < 1e-5, "linear_bf16 {n}x{k}x{o} {what}: relative difference {d:e}");
        }
        // And close to the f32 product (bf16 keeps 8 significant bits).
        let (y32, g32) = value_and_grads(&|t: &[Tensor]| Ok(t[0].matmul(&t[1].t()?)?), &[x, w]);
        assert!(rel_diff(&y, &y32) < 2e-2 && rel_diff(&g[0], &g32[0]) < 2e-2 && rel_diff(&g[1], &g32[1]) < 2e-2);
    }
}

#[test]
fn linear_runs_in_the_precision_asked_and_f64_stays_exact() {
    use super::{linear, Precision};
    let (x, w) = (randn(&[9, 33], 1, DType::F32), randn(&[5, 33], 2, DType::F32));
    let exact = x.matmul(&w.t().unwrap()).unwrap();
    // f32 within summation order of matmul: 9 rows take the few-rows path (8-lane dots), whose
    // order matches gemm's bit for bit only where gemm also sums in 8 lanes (AVX2); on AVX-512
    // gemm runs 16 lanes.
    let f32_out = linear(&x, &w, Precision::F32).unwrap();
    assert!(rel_diff(&host(&f32_out), &host(&exact)) < 1e-6);
    let bf16_out = linear(&x, &w, Precision::Bf16).unwrap();
    let d = rel_diff(&host(&bf16_out), &host(&exact));
    assert!(d > 1e-5 && d < 2e-2, "bf16 relative difference {d:e}");
    // f64 (finite-difference checks) never rounds.
    let (x64, w64) = (x.to_dtype(DType::F64).unwrap(), w.to_dtype(DType::F64).unwrap());
    let out64 = linear(&x64, &w64, Precision::Bf16).unwrap();
    assert_eq!(host(&out64), host(&x64.matmul(&w64.t().unwrap()).unwrap()));
}

#[test]
fn linear_f32_matches_matmul_values_and_gradients() {
    for (n, k, o) in [(37, 45, 29), (1, 1, 1), (64, 256, 96), (300, 70, 3)] {
        let (x, w) = (randn(&[n, k], 3, DType::F32), randn(&[o, k], 4, DType::F32));
        let fused = |t: &[Tensor]| fused::linear(&t[0], &t[1], super::Precision::F32);
        let composed = |t: &[Tensor]| Ok(t[0].matmul(&t[1].t()?)?);
        let (y, g) = value_and_grads(&fused, &[x.clone(), w.clone()]);
        let (want, want_g) = value_and_grads(&composed, &[x, w]);
        assert!(rel_diff(&y, &want) < 1e-6, "linear {n}x{k}x{o}: values");
        assert!(rel_diff(&g[0], &want_g[0]) < 1e-6 && rel_diff(&g[1], &want_g[1]) < 1e-6, "linear {n}x{k}x{o}: grads");
    }
}

#[test]
fn few_row_linear_matches_matmul_and_each_row_is_the_same_alone() {
    // Odd k (a tail past the lanes), n not a multiple of the W block, and a W large enough to
    // be split over threads; every SIMD level the CPU has.
    for (k, o) in [(37, 13), (128, 352), (130, 2100)] {
        let w = randn(&[o, k], 5, DType::F32);
        let x = randn(&[fused::FEW_ROWS, k], 6, DType::F32);
        for simd in [Simd::Portable, Simd::Avx2, Simd::Avx512].into_iter().filter(|&s| s <= simd_level()) {
            with_simd_cap(simd, || {
                let all = fused::linear(&x, &w, super::Precision::F32).unwrap();
                let want = x.matmul(&w.t().unwrap()).unwrap();
                assert!(rel_diff(&host(&all), &host(&want)) < 1e-6, "{k}x{o} at {simd:?}");
                // A decode step (1 row) and a verify pass (m rows) give a row the same bits.
                for m in [1, 2, 5, fused::FEW_ROWS] {
                    let some = fused::linear(&x.narrow(0, 0, m).unwrap(), &w, super::Precision::F32).unwrap();
                    assert_eq!(host(&some), host(&all.narrow(0, 0, m).unwrap()), "{k}x{o}, {m} rows, {simd:?}");
                }
                // No rows (an empty batch reaching a layer): an empty product, not a panic.
                let none = fused::linear(&x.narrow(0, 0, 0).unwrap(), &w, super::Precision::F32).unwrap();
                assert_eq!(none.dims(), &[0, o]);
            });
        }
    }
}
