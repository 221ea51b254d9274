//! Model tests: finite-difference gradients, reductions of ITT to dense and Loop, routing
//! properties, and cached decoding against the full pass.

use super::*;
use crate::base::config::{preset, ModelConfig, ModelKind, ResidualForm, RoutedAttention, ThinkingConfig};
use crate::base::rng::Rng;
use crate::ops::Precision;
use candle_core::{DType, Device, Tensor};
use std::collections::BTreeMap;
use std::sync::Arc;

fn small_cfg(kind: ModelKind, steps: usize) -> ModelConfig {
    let mut c = ModelConfig {
        vocab_size: 13,
        d_model: 8,
        n_layers: 4,
        n_heads: 2,
        n_kv_heads: 1,
        mlp_hidden: 12,
        max_seq_len: 32,
        rope_theta: 10000.0,
        norm_eps: 1e-5,
        tie_embeddings: false,
        init_std: 0.3,
        thinking: ThinkingConfig { kind, steps, ..Default::default() },
    };
    if kind == ModelKind::Itt {
        c.thinking.ratios = vec![0.5; steps - 1];
        c.thinking.phi_init = 0.7;
        c.thinking.router_init_std = 0.5;
    }
    c
}

fn tokens(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut r = Rng::new(seed);
    (0..n).map(|_| r.below(vocab as u64) as u32).collect()
}

/// The training objective ce + aux_weight * router_aux as a graph node.
fn objective(
    model: &Model,
    batch: &TokenBatch,
    opts: &RoutingOptions,
    record: Option<&mut ForwardRecord>,
    aux_weight: f64,
) -> Tensor {
    let parts = model.train_loss(batch, opts, record, aux_weight > 0.0).unwrap();
    match parts.router_aux {
        Some(aux) => (parts.ce + (aux * aux_weight).unwrap()).unwrap(),
        None => parts.ce,
    }
}

/// Finite differences on a sample of elements of every parameter, selection held fixed.
fn grad_check(cfg: &ModelConfig) {
    grad_check_objective(cfg, 0.0, "")
}

/// `grad_check` of cross-entropy plus `aux_weight` times the router auxiliary loss, on the
/// parameters whose names contain `only`.
fn grad_check_objective(cfg: &ModelConfig, aux_weight: f64, only: &str) {
    let dev = Device::Cpu;
    let model = Model::new_with_dtype(cfg, 5, &dev, DType::F64).unwrap();
    let (b, t) = (2, 7);
    let inp = tokens(b * t, cfg.vocab_size, 1);
    let tgt = tokens(b * t, cfg.vocab_size, 2);
    let mut rec = ForwardRecord::with_detail();
    let batch = TokenBatch { inputs: &inp, targets: &tgt, b, t };
    let loss = objective(&model, &batch, &RoutingOptions::default(), Some(&mut rec), aux_weight);
    let grads = loss.backward().unwrap();
    let forced = RoutingOptions { forced: Some(Arc::new(rec.selections.clone())), ..Default::default() };
    let mut rng = Rng::new(9);
    let mut worst = 0f64;
    for (name, var) in model.params.iter().filter(|(n, _)| n.contains(only)) {
        let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{name} has no gradient"));
        let g = g.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let base = var.as_tensor().flatten_all().unwrap().to_vec1::<f64>().unwrap();
        for _ in 0..3 {
            let j = rng.below(base.len() as u64) as usize;
            let eps = 1e-5;
            let eval = |delta: f64| {
                let mut p = base.clone();
                p[j] += delta;
                var.set(&Tensor::from_vec(p, var.dims(), &dev).unwrap()).unwrap();
                objective(&model, &batch, &forced, None, aux_weight).to_scalar::<f64>().unwrap()
            };
            let num = (eval(eps) - eval(-eps)) / (2.0 * eps);
            var.set(&Tensor::from_vec(base.clone(), var.dims(), &dev).unwrap()).unwrap();
            let err = (num - g[j]).abs() / (num.abs() + g[j].abs()).max(1e-6);
            worst = worst.max(err);
            assert!(err < 1e-5, "{name}[{j}]: numeric {num:e} vs analytic {:e}", g[j]);
        }
    }
    eprintln!("max relative gradient error: {worst:e}");
}

#[test]
fn gradients_match_finite_differences_dense() {
    grad_check(&small_cfg(ModelKind::Dense, 1));
    let mut tied = small_cfg(ModelKind::Dense, 1);
    tied.tie_embeddings = true;
    grad_check(&tied);
}

#[test]
fn gradients_match_finite_differences_itt_and_loop() {
    grad_check(&small_cfg(ModelKind::Itt, 3));
    let mut upd = small_cfg(ModelKind::Itt, 3);
    upd.thinking.residual_form = ResidualForm::Update;
    grad_check(&upd);
    let mut no_rtc = small_cfg(ModelKind::Itt, 3);
    no_rtc.thinking.residual_connection = false;
    grad_check(&no_rtc);
    grad_check(&small_cfg(ModelKind::Loop, 2));
}

#[test]
fn gradients_match_finite_differences_with_the_recipe_knobs() {
    // Normalised router input, a step scale, the update form: every parameter, routers included.
    let mut cfg = small_cfg(ModelKind::Itt, 3);
    cfg.thinking.router_norm = true;
    cfg.thinking.step_scale = 0.6;
    cfg.thinking.residual_form = ResidualForm::Update;
    grad_check(&cfg);
    // Selected tokens attending to every token (keys and values of all rows reach the loss).
    cfg.thinking.routed_attention = RoutedAttention::All;
    grad_check(&cfg);
    // No step encoding with a step scale (the composed path scales by alpha itself).
    cfg.thinking.step_encoding = false;
    grad_check(&cfg);
    // The router auxiliary loss, a large weight so that its part of the gradient dominates the
    // routers' (selection held fixed: the targets are the top-k memberships). The loss reads x
    // detached (it trains the routers only, DESIGN §4.6), so the routers' gradients are the true
    // derivatives of the objective only where no later router reads a state they changed: one
    // thinking layer, the last, with one routed step.
    let mut aux = small_cfg(ModelKind::Itt, 2);
    aux.thinking.router_norm = true;
    aux.thinking.layers = Some(vec![3]);
    grad_check_objective(&aux, 5.0, ".router.");
}

#[test]
fn router_aux_loss_is_the_mean_bce_of_logits_against_topk_membership() {
    let cfg = small_cfg(ModelKind::Itt, 2);
    let model = Model::new_with_dtype(&cfg, 3, &Device::Cpu, DType::F64).unwrap();
    let (b, t) = (2, 6);
    let (inp, tgt) = (tokens(b * t, 13, 1), tokens(b * t, 13, 2));
    let mut rec = ForwardRecord::with_detail();
    let parts = model
        .train_loss(&TokenBatch { inputs: &inp, targets: &tgt, b, t }, &RoutingOptions::default(), Some(&mut rec), true)
        .unwrap();
    let got = parts.router_aux.unwrap().to_scalar::<f64>().unwrap();
    // By hand: per (layer, step), mean over tokens of softplus(z) - [selected] z; then the mean.
    let mut terms = vec![];
    for (&key, w) in &rec.weights {
        let sel = &rec.selections[&key];
        let n = w.len();
        let mut sum = 0.0;
        for (i, &wi) in w.iter().enumerate() {
            let z = (wi as f64 / (1.0 - wi as f64)).ln(); // logit from the recorded weight
            let y = if sel.contains(&(i as u32)) { 1.0 } else { 0.0 };
            sum += (1.0 + z.exp()).ln() - y * z;
        }
        terms.push(sum / n as f64);
    }
    assert_eq!(terms.len(), 2, "two thinking layers, one routed step each");
    let want = terms.iter().sum::<f64>() / terms.len() as f64;
    assert!((got - want).abs() < 1e-5, "{got} vs {want}");
    // Without the flag, or for a model without routers, there is no auxiliary term.
    let plain = model
        .train_loss(&TokenBatch { inputs: &inp, targets: &tgt, b, t }, &RoutingOptions::default(), None, false)
        .unwrap();
    assert!(plain.router_aux.is_none());
    let dense = Model::new(&small_cfg(ModelKind::Dense, 1), 3, &Device::Cpu).unwrap();
    assert!(dense
        .train_loss(&TokenBatch { inputs: &inp, targets: &tgt, b, t }, &RoutingOptions::default(), None, true)
        .unwrap()
        .router_aux
        .is_none());
}

#[test]
fn every_parameter_gets_a_nonzero_gradient() {
    let mut cfg = preset("tiny-itt4").unwrap().model;
    cfg.vocab_size = 40;
    let model = Model::new(&cfg, 3, &Device::Cpu).unwrap();
    let (b, t) = (2, 32);
    let loss =
        model.loss(&tokens(b * t, 40, 4), &tokens(b * t, 40, 5), b, t, &RoutingOptions::default(), None).unwrap();
    let grads = loss.backward().unwrap();
    for (name, var) in &model.params {
        let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{name}: no gradient"));
        let norm = g.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(norm > 0.0 && norm.is_finite(), "{name}: gradient norm {norm}");
    }
}

fn logits(model: &Model, toks: &[u32], layout: &SeqLayout, opts: &RoutingOptions) -> Vec<f32> {
    let x = Tensor::from_slice(toks, toks.len(), model.device()).unwrap();
    model.forward(&x, layout, opts, None, None).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn itt_with_one_step_and_loop_with_one_step_equal_dense_bit_for_bit() {
    let dense = Model::new(&small_cfg(ModelKind::Dense, 1), 11, &Device::Cpu).unwrap();
    let mut itt1 = small_cfg(ModelKind::Itt, 1);
    itt1.thinking.ratios = vec![];
    let itt1 = Model::new(&itt1, 11, &Device::Cpu).unwrap();
    let loop1 = Model::new(&small_cfg(ModelKind::Loop, 1), 11, &Device::Cpu).unwrap();
    let toks = tokens(2 * 9, 13, 3);
    let layout = SeqLayout::uniform(2, 9);
    let d = logits(&dense, &toks, &layout, &RoutingOptions::default());
    assert_eq!(d, logits(&itt1, &toks, &layout, &RoutingOptions::default()));
    assert_eq!(d, logits(&loop1, &toks, &layout, &RoutingOptions::default()));
}

/// The spec's equations written out naively, one sequence and one step at a time, as the
/// oracle for the packed, batched implementation.
fn reference_forward(model: &Model, toks: &[u32], lens: &[usize], ratios: &[f64]) -> Vec<f32> {
    let dev = model.device();
    let mut out = vec![];
    let mut start = 0;
    for &n in lens {
        let seq = Tensor::from_slice(&toks[start..start + n], n, dev).unwrap();
        let pos = model.positions(&SeqLayout::uniform(1, n)).unwrap();
        let f32 = Precision::F32;
        let mut x = model.embed.index_select(&seq, 0).unwrap();
        for Layer { block, thinking } in &model.layers {
            let Some(th) = thinking else {
                x = block.forward(&x, &pos, f32, None).unwrap();
                continue;
            };
            // x1 = phi_1 * f(x0)
            x = block.forward(&x, &pos, f32, None).unwrap().broadcast_mul(&th.phis[0]).unwrap();
            for t in 2..=th.steps {
                let w: Vec<f32> = th.routers[t - 2].logits(&x).unwrap().flatten_all().unwrap().to_vec1().unwrap();
                let w: Vec<f32> = w.iter().map(|z| 1.0 / (1.0 + (-z).exp())).collect();
                let k = (ratios[t - 2] * n as f64 - 1e-9).ceil() as usize;
                let mut order: Vec<usize> = (0..n).collect();
                order.sort_by(|&a, &b| w[b].total_cmp(&w[a]).then(a.cmp(&b)));
                let mut sel: Vec<usize> = order[..k].to_vec();
                sel.sort();
                if sel.is_empty() {
                    continue;
                }
                let rows: Vec<Tensor> = sel.iter().map(|&i| x.narrow(0, i, 1).unwrap()).collect();
                let xs = Tensor::cat(&rows, 0).unwrap();
                let sub = SeqLayout { lens: vec![sel.len()], positions: sel.iter().map(|&i| i as u32).collect() };
                let y = match th.routed_attention {
                    // The selected tokens among themselves, at their own positions.
                    RoutedAttention::Selected => {
                        block.forward(&xs, &model.positions(&sub).unwrap(), f32, None).unwrap()
                    }
                    // Each selected token as the full block would compute it over every token.
                    RoutedAttention::All => {
                        let full = block.forward(&x, &pos, f32, None).unwrap();
                        Tensor::cat(&sel.iter().map(|&i| full.narrow(0, i, 1).unwrap()).collect::<Vec<_>>(), 0).unwrap()
                    }
                };
                let mut new_rows: Vec<Tensor> = (0..n).map(|i| x.narrow(0, i, 1).unwrap()).collect();
                for (r, &i) in sel.iter().enumerate() {
                    let upd =
                        (y.narrow(0, r, 1).unwrap().broadcast_mul(&th.phis[t - 1]).unwrap() * w[i] as f64).unwrap();
                    new_rows[i] = (&new_rows[i] + upd).unwrap();
                }
                x = Tensor::cat(&new_rows, 0).unwrap();
            }
        }
        let h = model.norm.forward(&x).unwrap();
        out.extend(model.logits(&h).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap());
        start += n;
    }
    out
}

fn randomise(model: &Model, names_containing: &str, seed: u64) {
    let mut r = Rng::new(seed);
    for (name, var) in &model.params {
        if name.contains(names_containing) {
            let v: Vec<f32> = (0..var.elem_count()).map(|_| (0.5 + r.uniform()) as f32).collect();
            var.set(&Tensor::from_vec(v, var.dims(), &Device::Cpu).unwrap()).unwrap();
        }
    }
}

#[test]
fn itt_matches_the_spec_equations_per_sequence() {
    let mut cfg = small_cfg(ModelKind::Itt, 4);
    cfg.thinking.ratios = vec![0.5, 0.7, 0.3];
    let model = Model::new(&cfg, 21, &Device::Cpu).unwrap();
    randomise(&model, ".phi.", 2);
    let toks = tokens(3 * 10, 13, 8);
    let got = logits(&model, &toks, &SeqLayout::uniform(3, 10), &RoutingOptions::default());
    let want = reference_forward(&model, &toks, &[10, 10, 10], &[0.5, 0.7, 0.3]);
    assert!(max_diff(&got, &want) < 1e-5, "{}", max_diff(&got, &want));
    // Sequences of different lengths packed together.
    let toks = tokens(6 + 11, 13, 9);
    let layout = SeqLayout::with_past(&[6, 11], &[0, 0]);
    let got = logits(&model, &toks, &layout, &RoutingOptions::default());
    let want = reference_forward(&model, &toks, &[6, 11], &[0.5, 0.7, 0.3]);
    assert!(max_diff(&got, &want) < 1e-5, "{}", max_diff(&got, &want));
}

#[test]
fn routed_steps_attending_to_every_token_match_the_full_block_on_the_selected_rows() {
    let mut cfg = small_cfg(ModelKind::Itt, 4);
    cfg.thinking.ratios = vec![0.5, 0.7, 0.3];
    cfg.thinking.routed_attention = RoutedAttention::All;
    let model = Model::new(&cfg, 21, &Device::Cpu).unwrap();
    randomise(&model, ".phi.", 2);
    let toks = tokens(6 + 11, 13, 9);
    let layout = SeqLayout::with_past(&[6, 11], &[0, 0]);
    let got = logits(&model, &toks, &layout, &RoutingOptions::default());
    let want = reference_forward(&model, &toks, &[6, 11], &[0.5, 0.7, 0.3]);
    assert!(max_diff(&got, &want) < 1e-5, "{}", max_diff(&got, &want));
    // And it differs from attending among the selected tokens only.
    cfg.thinking.routed_attention = RoutedAttention::Selected;
    let sel_only = Model::new(&cfg, 21, &Device::Cpu).unwrap();
    randomise(&sel_only, ".phi.", 2);
    assert!(max_diff(&got, &logits(&sel_only, &toks, &layout, &RoutingOptions::default())) > 1e-4);
}

#[test]
fn itt_with_zero_ratios_is_dense_with_step_one_scaled_by_phi1() {
    let mut cfg = small_cfg(ModelKind::Itt, 4);
    cfg.thinking.ratios = vec![0.0; 3];
    let model = Model::new(&cfg, 4, &Device::Cpu).unwrap();
    randomise(&model, ".phi.1", 3);
    let toks = tokens(2 * 8, 13, 1);
    let got = logits(&model, &toks, &SeqLayout::uniform(2, 8), &RoutingOptions::default());
    let want = reference_forward(&model, &toks, &[8, 8], &[0.0; 3]);
    assert_eq!(got, want);
}

#[test]
fn itt_without_routing_and_step_encoding_sums_block_outputs() {
    // x_T = sum_t f(x_{t-1}) for every token (DESIGN §3, Eq. 4 literal).
    let mut cfg = small_cfg(ModelKind::Itt, 3);
    cfg.thinking.ratios = vec![1.0; 2];
    cfg.thinking.adaptive_routing = false;
    cfg.thinking.step_encoding = false;
    cfg.thinking.layers = Some(vec![1]);
    cfg.n_layers = 2;
    let model = Model::new(&cfg, 6, &Device::Cpu).unwrap();
    let n = 9;
    let x0 = Tensor::randn(0f32, 1.0, (n, 8), &Device::Cpu).unwrap();
    let pos = model.positions(&SeqLayout::uniform(1, n)).unwrap();
    let layer = &model.layers[1];
    let opts = RoutingOptions::default();
    let mut call = Call {
        pos: pos.clone(),
        routing: &opts,
        precision: Precision::F32,
        caches: None,
        record: None,
        router_aux: None,
    };
    let got = layer.forward(1, &x0, &mut call).unwrap();
    let (block, f32) = (&layer.block, Precision::F32);
    let f0 = block.forward(&x0, &pos, f32, None).unwrap();
    let x1 = f0.clone();
    let f1 = block.forward(&x1, &pos, f32, None).unwrap();
    let x2 = (&x1 + &f1).unwrap();
    let f2 = block.forward(&x2, &pos, f32, None).unwrap();
    let want = ((f0 + f1).unwrap() + f2).unwrap();
    let d = (got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(d < 1e-5, "{d}");
}

#[test]
fn selection_of_a_sequence_does_not_depend_on_the_batch() {
    let model = Model::new(&small_cfg(ModelKind::Itt, 3), 8, &Device::Cpu).unwrap();
    let a = tokens(12, 13, 1);
    let b = tokens(12, 13, 2);
    let run = |toks: &[u32], nseq: usize| {
        let mut rec = ForwardRecord::with_detail();
        let x = Tensor::from_slice(toks, toks.len(), &Device::Cpu).unwrap();
        let l =
            model.forward(&x, &SeqLayout::uniform(nseq, 12), &RoutingOptions::default(), None, Some(&mut rec)).unwrap();
        (l.flatten_all().unwrap().to_vec1::<f32>().unwrap(), rec.selections)
    };
    let (alone, sel_alone) = run(&a, 1);
    let both: Vec<u32> = a.iter().chain(&b).copied().collect();
    let (together, sel_together) = run(&both, 2);
    for (k, s) in &sel_alone {
        let first: Vec<u32> = sel_together[k].iter().copied().filter(|&i| i < 12).collect();
        assert_eq!(&first, s, "{k:?}");
    }
    assert!(max_diff(&alone, &together[..alone.len()]) < 1e-5);
    // Repeatable, ties included.
    let (again, sel_again) = run(&both, 2);
    assert_eq!(again, together);
    assert_eq!(sel_again, sel_together);
}

fn calibrated(model: &Model) -> Arc<RouterCalibration> {
    let mut rec = ForwardRecord::with_scores();
    let toks = tokens(4 * 16, 13, 77);
    let x = Tensor::from_slice(&toks, toks.len(), &Device::Cpu).unwrap();
    model.forward(&x, &SeqLayout::uniform(4, 16), &RoutingOptions::default(), None, Some(&mut rec)).unwrap();
    let mut cal = RouterCalibration::new();
    cal.update(&mut rec, 0.0);
    Arc::new(cal)
}

/// Token-by-token and chunked decoding with KV caches equals the full forward pass.
fn check_cached_decoding(cfg: &ModelConfig) {
    let model = Model::new(cfg, 31, &Device::Cpu).unwrap();
    let opts = RoutingOptions { mode: Routing::Threshold, calibration: Some(calibrated(&model)), ..Default::default() };
    let n = 14;
    let toks = tokens(n, 13, 5);
    let full = logits(&model, &toks, &SeqLayout::uniform(1, n), &opts);
    let mut rec = ForwardRecord::default();
    let x = Tensor::from_slice(&toks, n, &Device::Cpu).unwrap();
    model.forward(&x, &SeqLayout::uniform(1, n), &opts, None, Some(&mut rec)).unwrap();
    let v = cfg.vocab_size;
    for chunk in [1usize, 3, 5, 14] {
        let mut cache = vec![model.new_cache()];
        let mut got = vec![];
        let mut i = 0;
        while i < n {
            let m = chunk.min(n - i);
            let x = Tensor::from_slice(&toks[i..i + m], m, &Device::Cpu).unwrap();
            let layout = SeqLayout::with_past(&[m], &[i]);
            let l = model.forward(&x, &layout, &opts, Some(&mut cache), None).unwrap();
            got.extend(l.flatten_all().unwrap().to_vec1::<f32>().unwrap());
            i += m;
        }
        assert_eq!(got.len(), n * v);
        // The cache of a routed step holds exactly the tokens routed there, and routing is
        // not trivial (some tokens take the step, some do not).
        for ((layer, step), st) in &rec.stats {
            let cached = cache[0].slots[*layer][step - 1].len() as u64;
            // Attending to every token, a routed step caches every token.
            let want = if cfg.thinking.routed_attention == RoutedAttention::All { n as u64 } else { st.selected };
            assert_eq!(cached, want, "layer {layer} step {step}");
            assert!(st.selected > 0 && st.selected < n as u64, "layer {layer} step {step}: {}", st.selected);
        }
        let d = max_diff(&got, &full);
        assert!(d <= 1e-4, "{:?} chunk {chunk}: max diff {d}", cfg.thinking.kind);
    }
}

#[test]
fn cached_decoding_equals_full_pass() {
    check_cached_decoding(&small_cfg(ModelKind::Dense, 1));
    check_cached_decoding(&small_cfg(ModelKind::Loop, 3));
    check_cached_decoding(&small_cfg(ModelKind::Itt, 4));
    let mut all = small_cfg(ModelKind::Itt, 4);
    all.thinking.routed_attention = RoutedAttention::All;
    check_cached_decoding(&all);
}

#[test]
fn threshold_mode_without_calibration_is_a_clear_error() {
    let model = Model::new(&small_cfg(ModelKind::Itt, 2), 1, &Device::Cpu).unwrap();
    let x = Tensor::from_slice(&[1u32, 2, 3], 3, &Device::Cpu).unwrap();
    let opts = RoutingOptions { mode: Routing::Threshold, ..Default::default() };
    let e = model.forward(&x, &SeqLayout::uniform(1, 3), &opts, None, None).err().unwrap().to_string();
    assert!(e.contains("itt calibrate"), "{e}");
    let _ = BTreeMap::<u8, u8>::new();
}

#[test]
fn early_exit_stops_a_token_at_the_step_its_weight_falls_below_the_cut() {
    let mut cfg = small_cfg(ModelKind::Itt, 4);
    cfg.thinking.ratios = vec![0.9; 3];
    cfg.thinking.router_init_std = 1.0;
    let model = Model::new(&cfg, 12, &Device::Cpu).unwrap();
    let toks = tokens(2 * 12, 13, 4);
    let x = Tensor::from_slice(&toks, toks.len(), &Device::Cpu).unwrap();
    // The cut: the median router weight of the first routed step of layer 1.
    let mut probe = ForwardRecord::with_detail();
    model.forward(&x, &SeqLayout::uniform(2, 12), &RoutingOptions::default(), None, Some(&mut probe)).unwrap();
    let mut w = probe.weights[&(1, 2)].clone();
    w.sort_by(f32::total_cmp);
    let cut = w[w.len() / 2];
    let opts = RoutingOptions { early_exit: Some(cut), ..Default::default() };
    let mut rec = ForwardRecord::with_detail();
    model.forward(&x, &SeqLayout::uniform(2, 12), &opts, None, Some(&mut rec)).unwrap();
    let mut stopped_somewhere = false;
    for layer in [1, 3] {
        let mut stopped = vec![false; toks.len()];
        for t in 2..=4 {
            let (w, sel) = (&rec.weights[&(layer, t)], &rec.selections[&(layer, t)]);
            for i in 0..toks.len() {
                stopped[i] |= w[i] < cut;
            }
            for &i in sel {
                assert!(!stopped[i as usize], "layer {layer} step {t}: token {i} below the cut took the step");
            }
            stopped_somewhere |= stopped.iter().any(|&s| s);
        }
    }
    assert!(stopped_somewhere);
}

#[test]
fn measured_contribution_scales_with_the_step_scale_and_vanishes_with_phi() {
    let contribution = |alpha: f64, phi: f64| {
        let mut cfg = small_cfg(ModelKind::Itt, 3);
        cfg.thinking.step_scale = alpha;
        cfg.thinking.phi_init = phi;
        let model = Model::new(&cfg, 2, &Device::Cpu).unwrap();
        let toks = tokens(2 * 10, 13, 6);
        let x = Tensor::from_slice(&toks, toks.len(), &Device::Cpu).unwrap();
        let mut rec = ForwardRecord { measure: true, ..Default::default() };
        model.forward(&x, &SeqLayout::uniform(2, 10), &RoutingOptions::default(), None, Some(&mut rec)).unwrap();
        let s = &rec.stats[&(1, 2)];
        assert!(s.weight_mean_selected().unwrap() >= s.weight_mean_passed().unwrap(), "top-k picks the heavier");
        s.contribution().unwrap()
    };
    let (one, two) = (contribution(1.0, 0.5), contribution(2.0, 0.5));
    assert!(one > 0.0 && ((two / one) - 2.0).abs() < 1e-4, "{one} {two}");
    assert!(contribution(1.0, 0.0) == 0.0);
    // Not measured unless asked: no cost on ordinary steps.
    let model = Model::new(&small_cfg(ModelKind::Itt, 3), 2, &Device::Cpu).unwrap();
    let x = Tensor::from_slice(&tokens(8, 13, 1), 8, &Device::Cpu).unwrap();
    let mut rec = ForwardRecord::default();
    model.forward(&x, &SeqLayout::uniform(1, 8), &RoutingOptions::default(), None, Some(&mut rec)).unwrap();
    assert!(rec.stats.values().all(|s| s.contribution().is_none()));
}

#[test]
fn extended_steps_reuse_the_last_router_step_vector_and_share() {
    // T = 3 run at 4 steps equals a T = 4 model whose step 4 is a copy of step 3.
    let mut c3 = small_cfg(ModelKind::Itt, 3);
    c3.thinking.ratios = vec![0.5, 0.7];
    let mut c4 = small_cfg(ModelKind::Itt, 4);
    c4.thinking.ratios = vec![0.5, 0.7, 0.7];
    let (m3, m4) = (Model::new(&c3, 8, &Device::Cpu).unwrap(), Model::new(&c4, 8, &Device::Cpu).unwrap());
    randomise(&m3, ".phi.", 4);
    let value = |m: &Model, name: &str| m.params.iter().find(|(n, _)| n == name).unwrap().1.as_tensor().copy().unwrap();
    for (name, var) in &m4.params {
        // Same names start the same (per-name init); step 4 copies step 3.
        let from = name.replace("router.4", "router.3").replace("phi.4", "phi.3");
        var.set(&value(&m3, &from)).unwrap();
    }
    let toks = tokens(2 * 12, 13, 3);
    let layout = SeqLayout::uniform(2, 12);
    let extended = RoutingOptions { steps: Some(4), ..Default::default() };
    let got = logits(&m3, &toks, &layout, &extended);
    assert_eq!(got, logits(&m4, &toks, &layout, &RoutingOptions::default()));
    assert_ne!(got, logits(&m3, &toks, &layout, &RoutingOptions::default()));
    // Cached decoding with the extended step equals the full pass (its caches grow on use).
    let cal = calibrated(&m3);
    let opts =
        RoutingOptions { mode: Routing::Threshold, calibration: Some(cal), steps: Some(4), ..Default::default() };
    let full = logits(&m3, &toks[..12], &SeqLayout::uniform(1, 12), &opts);
    let mut cache = vec![m3.new_cache()];
    let mut got = vec![];
    for i in 0..12 {
        let x = Tensor::from_slice(&toks[i..i + 1], 1, &Device::Cpu).unwrap();
        let l = m3.forward(&x, &SeqLayout::with_past(&[1], &[i]), &opts, Some(&mut cache), None).unwrap();
        got.extend(l.flatten_all().unwrap().to_vec1::<f32>().unwrap());
    }
    assert!(max_diff(&got, &full) <= 1e-4);
    assert_eq!(cache[0].slots[1].len(), 4);
    // Past the limit: a clear error.
    let too_many = RoutingOptions { steps: Some(3 + thinking::MAX_EXTRA_STEPS + 1), ..Default::default() };
    let x = Tensor::from_slice(&toks[..4], 4, &Device::Cpu).unwrap();
    let e = m3.forward(&x, &SeqLayout::uniform(1, 4), &too_many, None, None).err().unwrap().to_string();
    assert!(e.contains("steps must be between"), "{e}");
}
