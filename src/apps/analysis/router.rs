//! `itt analyze router`: what the routers of an ITT model do over a corpus (DESIGN §3, §10):
//! the distribution of router weights w = sigmoid(R_t(x)) per layer and step (split into
//! selected and passed-over tokens), the share selected, the overlap between consecutive
//! steps' selections against the overlap independent choices would give, the step vectors'
//! norms, and which kinds of token get more steps: by character class, by frequency band,
//! and on the synthetic corpus answer vs prompt tokens and per task (`answer_spans`,
//! `line_kind`).
//!
//! The paper reports that roughly 30–50% of tokens get extra steps and that consecutive steps
//! tend to pick different tokens (§10); the `overlap_prev` / `overlap_random` pair measures
//! the second claim: |S_t ∩ S_{t-1}| / |S_t| against the share of S_{t-1}.
//!
//! Routing is the paper's top-k over windows of the training sequence length, the setting
//! the routers were trained in.

use super::plot::{self, Panel, Png, Series};
use super::{encode_with_offsets, write_json, CharClass};
use crate::data::{answer_byte_mask, line_kind, Tokenizer};
use crate::model::{ForwardRecord, Model, RoutingOptions, SeqLayout};
use crate::{Error, Result};
use candle_core::{DType, Tensor};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

#[derive(Clone, Debug)]
pub struct RouterOptions {
    /// Window length (default: the checkpoint's training sequence length).
    pub seq_len: Option<usize>,
    /// Tokens to route, in all.
    pub max_tokens: usize,
    /// Windows per forward call.
    pub batch: usize,
    /// Histogram bins of router weights.
    pub bins: usize,
    /// Batches of windows whose loss is back-propagated for the gradient norms.
    pub grad_batches: usize,
}

impl Default for RouterOptions {
    fn default() -> Self {
        RouterOptions { seq_len: None, max_tokens: 16384, batch: 8, bins: 40, grad_batches: 4 }
    }
}

/// One (layer, routed step).
#[derive(Clone, Debug, Serialize)]
pub struct StepStat {
    pub layer: usize,
    pub step: usize,
    /// The trained rho_t.
    pub ratio: f64,
    pub selected: u64,
    pub candidates: u64,
    pub share: f64,
    pub w_mean: f64,
    pub w_std: f64,
    /// Mean router weight of the selected and of the passed-over tokens.
    pub w_mean_selected: f64,
    pub w_mean_unselected: f64,
    /// |S_t ∩ S_{t-1}| / |S_t| (None at t = 2, where S_1 is every token).
    pub overlap_prev: Option<f64>,
    /// The same if S_t were drawn independently of S_{t-1}: the share of step t-1.
    pub overlap_random: Option<f64>,
    /// ||alpha w phi_t delta|| / ||x_{t-1}|| over the selected tokens: how much the step
    /// changes the state of the tokens it takes (docs/DESIGN.md §7).
    pub contribution: Option<f64>,
    /// L2 norm of the loss gradient reaching this step's router (weight and bias) and phi_t,
    /// averaged over the first `grad_batches` batches of windows.
    pub grad_router: Option<f64>,
    pub grad_phi: Option<f64>,
    /// Histogram of w over [lo, hi] in equal bins.
    pub hist_lo: f64,
    pub hist_hi: f64,
    pub hist_selected: Vec<u64>,
    pub hist_unselected: Vec<u64>,
}

/// Step vector phi_t of one thinking layer (DESIGN §3, TSE).
#[derive(Clone, Debug, Serialize)]
pub struct PhiNorm {
    pub layer: usize,
    pub step: usize,
    pub rms: f64,
    pub mean: f64,
    pub min: f64,
    pub max: f64,
}

/// Mean extra steps (depth - 1) of a group of tokens, per thinking layer.
#[derive(Clone, Debug, Serialize)]
pub struct GroupDepth {
    /// "class", "frequency", "synthetic" or "task".
    pub family: String,
    pub group: String,
    pub tokens: u64,
    pub mean_extra_steps: Vec<f64>,
    /// Over all thinking layers.
    pub mean_extra_steps_all: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct RouterReport {
    pub model_kind: crate::base::config::ModelKind,
    pub data: String,
    pub synthetic: bool,
    pub tokens: usize,
    pub windows: usize,
    pub seq_len: usize,
    pub layers: Vec<usize>,
    pub steps: Vec<StepStat>,
    pub phi: Vec<PhiNorm>,
    pub groups: Vec<GroupDepth>,
}

/// Per-token labels used for grouping.
struct TokenInfo {
    class: CharClass,
    id: u32,
    /// Synthetic corpus: "answer", "prompt", "filler"; and the line's task.
    role: Option<&'static str>,
    task: Option<&'static str>,
    /// Whether the next token is an answer token (this position predicts the answer).
    predicts_answer: bool,
}

fn token_stream(
    tok: &Tokenizer,
    docs: &[String],
    synthetic: bool,
    max_tokens: usize,
) -> Result<(Vec<u32>, Vec<Option<TokenInfo>>)> {
    let mut ids = vec![];
    let mut info: Vec<Option<TokenInfo>> = vec![];
    for doc in docs {
        if ids.len() >= max_tokens {
            break;
        }
        ids.push(tok.eot_id());
        info.push(None);
        let (doc_ids, ranges) = encode_with_offsets(tok, doc)?;
        let mask = if synthetic { answer_byte_mask(doc) } else { vec![] };
        // Line start offsets, to find each token's line.
        let mut line_starts = vec![0];
        line_starts.extend(doc.match_indices('\n').map(|(i, _)| i + 1));
        for (id, r) in doc_ids.iter().zip(&ranges) {
            let text = tok.token_text(*id);
            let (role, task) = if synthetic {
                let li = line_starts.partition_point(|&s| s <= r.start).saturating_sub(1);
                let line_end = line_starts.get(li + 1).copied().unwrap_or(doc.len());
                let line = &doc[line_starts[li]..line_end];
                let answer = mask[r.clone()].iter().any(|&m| m);
                let role = if answer {
                    "answer"
                } else if crate::data::answer_spans(line).is_some() {
                    "prompt"
                } else {
                    "filler"
                };
                (Some(role), Some(line_kind(line).name()))
            } else {
                (None, None)
            };
            ids.push(*id);
            info.push(Some(TokenInfo { class: CharClass::of(&text), id: *id, role, task, predicts_answer: false }));
        }
    }
    ids.truncate(max_tokens);
    info.truncate(max_tokens);
    for i in 0..info.len().saturating_sub(1) {
        let next_answer = matches!(&info[i + 1], Some(t) if t.role == Some("answer"));
        if let Some(t) = info[i].as_mut() {
            t.predicts_answer = next_answer;
        }
    }
    Ok((ids, info))
}

/// Frequency band of each token id by its share of occurrences: the most frequent types that
/// make up the first half of all occurrences are "head", the next 40% "body", the last 10%
/// "tail" (so the bands mean the same for a 49-char and a 32k-BPE vocabulary).
fn frequency_bands(info: &[Option<TokenInfo>]) -> HashMap<u32, &'static str> {
    let mut counts: HashMap<u32, u64> = HashMap::new();
    for t in info.iter().flatten() {
        *counts.entry(t.id).or_default() += 1;
    }
    let total: u64 = counts.values().sum();
    let mut types: Vec<(u32, u64)> = counts.into_iter().collect();
    types.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut cum = 0u64;
    types
        .into_iter()
        .map(|(id, c)| {
            let before = cum as f64 / total.max(1) as f64;
            cum += c;
            (
                id,
                if before < 0.5 {
                    "head (top 50% of occurrences)"
                } else if before < 0.9 {
                    "body (next 40%)"
                } else {
                    "tail (last 10%)"
                },
            )
        })
        .collect()
}

/// Route `docs` (top-k, windows of `seq_len`) and gather the router statistics.
pub fn analyze(
    model: &Model,
    tok: &Tokenizer,
    docs: &[String],
    synthetic: bool,
    data: &str,
    opts: &RouterOptions,
) -> Result<RouterReport> {
    let layers: Vec<usize> = model.thinking_layers().map(|t| t.layer).collect();
    if !model.has_routers() {
        return Err(Error::usage(format!(
            "this {} model has no routers, so there are no router statistics; give an ITT checkpoint with adaptive routing",
            format!("{:?}", model.kind()).to_lowercase()
        )));
    }
    let seq_len = opts.seq_len.unwrap_or(model.cfg.max_seq_len).clamp(2, model.cfg.max_seq_len);
    let (ids, info) = token_stream(tok, docs, synthetic, opts.max_tokens.max(seq_len))?;
    if ids.len() < 2 {
        return Err(Error::input(data, "has too little text to route"));
    }
    let windows: Vec<(usize, usize)> =
        (0..ids.len()).step_by(seq_len).map(|s| (s, seq_len.min(ids.len() - s))).collect();
    let routed = route_windows(model, &ids, &windows, &layers, opts)?;
    let trained: BTreeMap<usize, Vec<f64>> = model.thinking_layers().map(|t| (t.layer, t.ratios.clone())).collect();
    Ok(RouterReport {
        model_kind: model.kind(),
        data: data.to_string(),
        synthetic,
        tokens: ids.len(),
        windows: windows.len(),
        seq_len,
        steps: step_stats(&routed, &trained, opts.bins.max(2)),
        phi: phi_norms(model)?,
        groups: depth_by_group(&info, &layers, &routed.depth),
        layers,
    })
}

/// What routing the windows recorded, over all of them.
#[derive(Default)]
struct Routed {
    /// Per (layer, step): each token's router weight and whether it was selected.
    weights: BTreeMap<(usize, usize), Vec<(f32, bool)>>,
    /// Per (layer, step >= 3): tokens selected at this step and the one before, and at this one.
    overlap: BTreeMap<(usize, usize), (u64, u64)>,
    /// Per thinking layer: each token's depth.
    depth: BTreeMap<usize, Vec<u32>>,
    /// The forward passes' step statistics (contribution).
    measured: ForwardRecord,
    /// Squared gradient norms of the thinking parameters per (layer, step): (router, phi).
    grad_sq: BTreeMap<(usize, usize), (f64, f64)>,
    /// Batches those gradients were summed over.
    grad_batches: usize,
}

/// Route the windows in batches of `opts.batch`, recording weights, selections and depths; the
/// first `opts.grad_batches` batches also take the next-token loss's gradient.
fn route_windows(
    model: &Model,
    ids: &[u32],
    windows: &[(usize, usize)],
    layers: &[usize],
    opts: &RouterOptions,
) -> Result<Routed> {
    let mut r = Routed::default();
    for group in windows.chunks(opts.batch.max(1)) {
        let chunk: Vec<u32> = group.iter().flat_map(|&(s, n)| ids[s..s + n].iter().copied()).collect();
        let lens: Vec<usize> = group.iter().map(|w| w.1).collect();
        let layout = SeqLayout::with_past(&lens, &vec![0; lens.len()]);
        let x = Tensor::from_slice(&chunk, chunk.len(), model.device())?;
        let mut rec = ForwardRecord { measure: true, ..ForwardRecord::with_detail() };
        let hidden = model.forward_hidden(&x, &layout, &RoutingOptions::default(), None, Some(&mut rec))?;
        r.measured.merge_stats(&rec);
        // The gradient reaching routers and phi: next-token loss of the windows that have a
        // next token for every position.
        let end = group.last().map(|&(s, n)| s + n).unwrap_or(0);
        if r.grad_batches < opts.grad_batches && end < ids.len() {
            let targets: Vec<u32> = group.iter().flat_map(|&(s, n)| ids[s + 1..s + n + 1].iter().copied()).collect();
            let targets = Tensor::from_slice(&targets, targets.len(), model.device())?;
            let loss = crate::ops::cross_entropy(&model.logits(&hidden)?, &targets)?;
            add_thinking_grads(model, &loss.backward()?, &mut r.grad_sq)?;
            r.grad_batches += 1;
        }
        for (&key, w) in &rec.weights {
            let sel = rec.selections.get(&key).cloned().unwrap_or_default();
            let mut flags = vec![false; w.len()];
            sel.iter().for_each(|&i| flags[i as usize] = true);
            r.weights.entry(key).or_default().extend(w.iter().copied().zip(flags));
            if key.1 >= 3 {
                if let Some(prev) = rec.selections.get(&(key.0, key.1 - 1)) {
                    let both = sel.iter().filter(|i| prev.binary_search(i).is_ok()).count() as u64;
                    let e = r.overlap.entry(key).or_default();
                    e.0 += both;
                    e.1 += sel.len() as u64;
                }
            }
        }
        for &l in layers {
            r.depth.entry(l).or_default().extend(rec.depth.get(&l).cloned().unwrap_or_else(|| vec![1; chunk.len()]));
        }
    }
    Ok(r)
}

/// Add the squared norms of the thinking parameters' gradients per (layer, step).
fn add_thinking_grads(
    model: &Model,
    grads: &candle_core::backprop::GradStore,
    grad_sq: &mut BTreeMap<(usize, usize), (f64, f64)>,
) -> Result<()> {
    for (name, var) in &model.params {
        let (Some((layer, step, router)), Some(g)) = (crate::train::thinking_param(name), grads.get(var.as_tensor()))
        else {
            continue;
        };
        let sq = g.sqr()?.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let e = grad_sq.entry((layer, step)).or_default();
        if router {
            e.0 += sq;
        } else {
            e.1 += sq;
        }
    }
    Ok(())
}

/// Shares, weights (all, selected, passed over, histogram in `bins`), overlap, contribution and
/// gradient norms per (layer, routed step).
fn step_stats(r: &Routed, trained: &BTreeMap<usize, Vec<f64>>, bins: usize) -> Vec<StepStat> {
    let mut stats = vec![];
    for (&(layer, step), v) in &r.weights {
        let n = v.len() as u64;
        let selected = v.iter().filter(|x| x.1).count() as u64;
        let ws: Vec<f64> = v.iter().map(|x| x.0 as f64).collect();
        let (w_mean, w_std) = super::mean_std(&ws);
        let mean_of = |want: bool| {
            let s: Vec<f64> = v.iter().filter(|x| x.1 == want).map(|x| x.0 as f64).collect();
            super::mean_std(&s).0
        };
        let lo = ws.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = ws.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let pad = ((hi - lo) * 0.02).max(1e-4);
        let (lo, hi) = ((lo - pad).max(0.0), (hi + pad).min(1.0));
        let mut hs = vec![0u64; bins];
        let mut hu = vec![0u64; bins];
        for &(w, s) in v {
            let b = (((w as f64 - lo) / (hi - lo)) * bins as f64).floor().clamp(0.0, (bins - 1) as f64) as usize;
            if s {
                hs[b] += 1;
            } else {
                hu[b] += 1;
            }
        }
        let prev_share =
            r.weights.get(&(layer, step - 1)).map(|p| p.iter().filter(|x| x.1).count() as f64 / p.len().max(1) as f64);
        let grad = |part: fn(&(f64, f64)) -> f64| {
            r.grad_sq.get(&(layer, step)).map(|g| (part(g) / r.grad_batches.max(1) as f64).sqrt())
        };
        stats.push(StepStat {
            layer,
            step,
            ratio: trained.get(&layer).and_then(|r| r.get(step - 2)).copied().unwrap_or(f64::NAN),
            selected,
            candidates: n,
            share: selected as f64 / n.max(1) as f64,
            w_mean,
            w_std,
            w_mean_selected: mean_of(true),
            w_mean_unselected: mean_of(false),
            overlap_prev: r.overlap.get(&(layer, step)).map(|&(b, s)| b as f64 / s.max(1) as f64),
            overlap_random: if step >= 3 { prev_share } else { None },
            contribution: r.measured.stats.get(&(layer, step)).and_then(|s| s.contribution()),
            grad_router: grad(|g| g.0),
            grad_phi: grad(|g| g.1),
            hist_lo: lo,
            hist_hi: hi,
            hist_selected: hs,
            hist_unselected: hu,
        });
    }
    stats
}

/// Norms of every thinking layer's step vectors phi_t.
fn phi_norms(model: &Model) -> Result<Vec<PhiNorm>> {
    let mut phi = vec![];
    for th in model.thinking_layers() {
        for (t, p) in th.phis.iter().enumerate() {
            let v: Vec<f64> = p.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
            let n = v.len().max(1) as f64;
            phi.push(PhiNorm {
                layer: th.layer,
                step: t + 1,
                rms: (v.iter().map(|x| x * x).sum::<f64>() / n).sqrt(),
                mean: v.iter().sum::<f64>() / n,
                min: v.iter().copied().fold(f64::INFINITY, f64::min),
                max: v.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            });
        }
    }
    Ok(phi)
}

/// Mean extra steps (depth - 1) per thinking layer of each group of tokens: character class,
/// frequency band, and on the synthetic corpus answer vs prompt and task. The end-of-document
/// tokens are left out.
fn depth_by_group(info: &[Option<TokenInfo>], layers: &[usize], depth: &BTreeMap<usize, Vec<u32>>) -> Vec<GroupDepth> {
    let bands = frequency_bands(info);
    let mut acc: BTreeMap<(String, String), (u64, Vec<f64>)> = BTreeMap::new();
    for (i, t) in info.iter().enumerate() {
        let Some(t) = t else { continue };
        let mut keys = vec![
            ("class".to_string(), t.class.name().to_string()),
            ("frequency".to_string(), bands[&t.id].to_string()),
        ];
        if let Some(role) = t.role {
            keys.push(("synthetic".into(), role.into()));
            if t.predicts_answer {
                keys.push(("synthetic".into(), "predicts answer (next is answer)".into()));
            }
        }
        if let Some(task) = t.task {
            keys.push(("task".into(), task.into()));
        }
        for k in keys {
            let e = acc.entry(k).or_insert_with(|| (0, vec![0.0; layers.len()]));
            e.0 += 1;
            for (li, l) in layers.iter().enumerate() {
                e.1[li] += depth[l][i] as f64 - 1.0;
            }
        }
    }
    acc.into_iter()
        .map(|((family, group), (n, sums))| {
            let means: Vec<f64> = sums.iter().map(|s| s / n as f64).collect();
            GroupDepth {
                family,
                group,
                tokens: n,
                mean_extra_steps_all: means.iter().sum::<f64>() / means.len().max(1) as f64,
                mean_extra_steps: means,
            }
        })
        .collect()
}

/// The three pictures: router weight histograms, routing statistics, depth by token group.
pub fn pictures(r: &RouterReport) -> Result<Vec<(&'static str, Png)>> {
    Ok(vec![
        ("router_weights.png", weights_picture(r)?),
        ("router_stats.png", stats_picture(r)?),
        ("token_depth.png", depth_picture(r)?),
    ])
}

/// Histograms of the router weights, selected and passed over, one panel per layer and step.
fn weights_picture(r: &RouterReport) -> Result<Png> {
    let hist_panels: Vec<Panel> = r
        .steps
        .iter()
        .map(|s| {
            let bw = (s.hist_hi - s.hist_lo) / s.hist_selected.len().max(1) as f64;
            Panel::Hist {
                title: format!("layer {} step {}: w (share {:.0}%)", s.layer, s.step, 100.0 * s.share),
                x_label: format!("router weight w (bin {:.3})", bw),
                y_label: "tokens".into(),
                lo: s.hist_lo,
                hi: s.hist_hi,
                stacks: vec![
                    ("selected".into(), s.hist_selected.iter().map(|&c| c as f64).collect()),
                    ("passed over".into(), s.hist_unselected.iter().map(|&c| c as f64).collect()),
                ],
            }
        })
        .collect();
    let steps_per_layer = r.steps.iter().filter(|s| s.layer == r.layers[0]).count().max(1);
    plot::grid(
        &format!("Router weights per thinking layer and step ({} tokens of {}, top-k)", r.tokens, r.data),
        &hist_panels,
        steps_per_layer,
        (400, 280),
    )
}

/// Share selected, mean weights, what each step adds, overlap between steps, and phi_t.
fn stats_picture(r: &RouterReport) -> Result<Png> {
    let cats: Vec<String> = r.steps.iter().map(|s| format!("L{} t{}", s.layer, s.step)).collect();
    let overlap_steps: Vec<&StepStat> = r.steps.iter().filter(|s| s.overlap_prev.is_some()).collect();
    let mut panels = vec![
        Panel::Bars {
            title: "Share of tokens selected".into(),
            x_label: "layer, step".into(),
            y_label: "share".into(),
            categories: cats.clone(),
            groups: vec![
                ("measured".into(), r.steps.iter().map(|s| s.share).collect()),
                ("trained rho".into(), r.steps.iter().map(|s| s.ratio).collect()),
            ],
        },
        Panel::Bars {
            title: "Mean router weight".into(),
            x_label: "layer, step".into(),
            y_label: "w".into(),
            categories: cats,
            groups: vec![
                ("selected".into(), r.steps.iter().map(|s| s.w_mean_selected).collect()),
                ("passed over".into(), r.steps.iter().map(|s| s.w_mean_unselected).collect()),
            ],
        },
    ];
    panels.push(Panel::Bars {
        title: "What each step adds: ||alpha w phi delta|| / ||x||".into(),
        x_label: "layer, step".into(),
        y_label: "contribution".into(),
        categories: r.steps.iter().map(|s| format!("L{} t{}", s.layer, s.step)).collect(),
        groups: vec![("selected tokens".into(), r.steps.iter().map(|s| s.contribution.unwrap_or(f64::NAN)).collect())],
    });
    if overlap_steps.is_empty() {
        panels.push(Panel::Note { title: "Overlap with previous step".into(), text: "needs at least 3 steps".into() });
    } else {
        panels.push(Panel::Bars {
            title: "Overlap with the previous step's selection".into(),
            x_label: "layer, step".into(),
            y_label: "|S_t ∩ S_t-1| / |S_t|".into(),
            categories: overlap_steps.iter().map(|s| format!("L{} t{}", s.layer, s.step)).collect(),
            groups: vec![
                ("measured".into(), overlap_steps.iter().map(|s| s.overlap_prev.unwrap_or(f64::NAN)).collect()),
                ("independent".into(), overlap_steps.iter().map(|s| s.overlap_random.unwrap_or(f64::NAN)).collect()),
            ],
        });
    }
    let phi_series: Vec<Series> = r
        .layers
        .iter()
        .enumerate()
        .map(|(k, &l)| {
            Series::new(
                format!("layer {l}"),
                r.phi.iter().filter(|p| p.layer == l).map(|p| (p.step as f64, p.rms)).collect(),
                plot::color(k),
            )
            .with_markers()
        })
        .collect();
    panels.push(if r.phi.is_empty() {
        Panel::Note { title: "Step vectors phi_t".into(), text: "step encoding is off (phi = 1)".into() }
    } else {
        let max_t = r.phi.iter().map(|p| p.step).max().unwrap_or(1);
        Panel::Line {
            title: "Step vector RMS, phi_t".into(),
            x_label: "step t".into(),
            y_label: "rms(phi_t)".into(),
            series: phi_series,
            x_ticks: Some((1..=max_t).map(|t| (t as f64, format!("t={t}"))).collect()),
        }
    });
    plot::grid("Routing statistics", &panels, 2, (520, 330))
}

/// Mean extra steps by token group (class, frequency, synthetic role, task), per layer.
fn depth_picture(r: &RouterReport) -> Result<Png> {
    let mut group_panels = vec![];
    for (family, title) in [
        ("class", "Extra steps by character class"),
        ("frequency", "Extra steps by frequency band"),
        ("synthetic", "Extra steps: answer vs prompt tokens"),
        ("task", "Extra steps by synthetic task"),
    ] {
        let gs: Vec<&GroupDepth> = r.groups.iter().filter(|g| g.family == family).collect();
        if gs.is_empty() {
            continue;
        }
        group_panels.push(Panel::Bars {
            title: title.into(),
            x_label: "token group".into(),
            y_label: "mean extra steps (depth - 1)".into(),
            categories: gs.iter().map(|g| short_group(&g.group)).collect(),
            groups: r
                .layers
                .iter()
                .enumerate()
                .map(|(li, l)| (format!("layer {l}"), gs.iter().map(|g| g.mean_extra_steps[li]).collect()))
                .collect(),
        });
    }
    plot::grid("Which tokens think more (top-k routing)", &group_panels, 2, (560, 330))
}

fn short_group(g: &str) -> String {
    g.split(" (").next().unwrap_or(g).to_string()
}

/// Load a checkpoint, analyse `data`, write router.json and the pictures into `out`.
pub fn run(ckpt: &Path, data: &str, opts: &RouterOptions, out: &Path) -> Result<(RouterReport, Vec<PathBuf>)> {
    let crate::import::Opened { model, tokenizer: tok, info, .. } =
        crate::import::open(ckpt, &crate::import::OpenOptions::differentiable())?;
    if !model.has_routers() {
        return Err(Error::checkpoint(
            &info.dir,
            format!(
                "is a {:?} model without routers, so it has no router statistics; give an ITT checkpoint",
                model.kind()
            ),
        ));
    }
    let (docs, synthetic) = super::read_docs(data)?;
    let opts = RouterOptions { seq_len: Some(opts.seq_len.unwrap_or(info.config.train.seq_len)), ..opts.clone() };
    let report = analyze(&model, &tok, &docs, synthetic, data, &opts)?;
    super::prepare_out(out)?;
    let mut paths = vec![out.join("router.json")];
    write_json(&paths[0], &report)?;
    for (name, png) in pictures(&report)? {
        let p = out.join(name);
        png.write(&p)?;
        paths.push(p);
    }
    Ok((report, paths))
}

/// A terminal summary of the report.
pub fn summary(r: &RouterReport) -> String {
    let mut s = format!("{} tokens in {} windows of {}\n", r.tokens, r.windows, r.seq_len);
    s.push_str(
        "layer step  rho   share  w_mean (sel / other)   contribution  grad router / phi   overlap_prev (independent)\n",
    );
    let opt = |v: Option<f64>, d: usize| v.map(|x| format!("{x:.d$}")).unwrap_or_else(|| "-".into());
    for st in &r.steps {
        let ov = match (st.overlap_prev, st.overlap_random) {
            (Some(a), Some(b)) => format!("{a:.3} ({b:.3})"),
            _ => "-".into(),
        };
        s.push_str(&format!(
            "{:>5} {:>4}  {:.2}  {:.3}  {:.3} ({:.3} / {:.3})  {:>12}  {:>8} / {:<8}  {ov}\n",
            st.layer,
            st.step,
            st.ratio,
            st.share,
            st.w_mean,
            st.w_mean_selected,
            st.w_mean_unselected,
            opt(st.contribution, 4),
            opt(st.grad_router.map(|g| g * 1e3), 3),
            opt(st.grad_phi.map(|g| g * 1e3), 3),
        ));
    }
    s.push_str("(contribution: ||alpha w phi delta|| / ||x|| over the selected tokens; gradient norms x 1e-3)\n");
    for g in &r.groups {
        let per: Vec<String> = g.mean_extra_steps.iter().map(|x| format!("{x:.2}")).collect();
        s.push_str(&format!(
            "{:<10} {:<34} {:>7} tokens  extra steps {:.3} (per layer {})\n",
            g.family,
            g.group,
            g.tokens,
            g.mean_extra_steps_all,
            per.join(" / ")
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;
    use crate::base::config::ModelKind;

    #[test]
    fn router_report_files_and_schema() {
        let dir = tempfile::tempdir().unwrap();
        let (ck, _, _) = tiny_run(&dir.path().join("itt"), ModelKind::Itt, 2);
        let data = dir.path().join("lines.txt");
        std::fs::write(&data, "347+589=936\nsort 5 3 9 1 = 1 3 5 9\nrev abcde = edcba\nho ho ho ho\n".repeat(8))
            .unwrap();
        let out = dir.path().join("out");
        let opts = RouterOptions { max_tokens: 600, ..Default::default() };
        let (r, paths) = run(&ck, data.to_str().unwrap(), &opts, &out).unwrap();
        assert_eq!(paths.len(), 4);
        for p in &paths[1..] {
            assert_png(p, 3000);
        }
        let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&paths[0]).unwrap()).unwrap();
        let steps = json["steps"].as_array().unwrap();
        assert_eq!(steps.len(), 2 * 3);
        for s in steps {
            let share = s["share"].as_f64().unwrap();
            assert!((0.6..0.8).contains(&share), "{s}");
            let h: u64 = s["hist_selected"]
                .as_array()
                .unwrap()
                .iter()
                .chain(s["hist_unselected"].as_array().unwrap())
                .map(|x| x.as_u64().unwrap())
                .sum();
            assert_eq!(h, s["candidates"].as_u64().unwrap());
            assert_eq!(s["overlap_prev"].is_null(), s["step"] == 2);
            // The step's contribution and the gradients reaching its router and phi are measured.
            let c = s["contribution"].as_f64().unwrap();
            assert!(c > 0.0 && c.is_finite(), "{s}");
            assert!(s["grad_router"].as_f64().unwrap() > 0.0 && s["grad_phi"].as_f64().unwrap() > 0.0, "{s}");
        }
        assert_eq!(json["phi"].as_array().unwrap().len(), 2 * 4);
        assert!(!r.synthetic);
        let classes: Vec<&str> = r.groups.iter().filter(|g| g.family == "class").map(|g| g.group.as_str()).collect();
        assert!(
            classes.contains(&"digits") && classes.contains(&"letters") && classes.contains(&"whitespace"),
            "{classes:?}"
        );
        // Selected tokens are exactly those with the higher weights, per window (top-k).
        for s in &r.steps {
            assert!(s.w_mean_selected >= s.w_mean_unselected, "{s:?}");
        }
        // The synthetic labels: answer vs prompt, from answer_spans.
        let (model, tok, _) = crate::checkpoint::load_model(&ck).unwrap();
        let docs = vec!["12+34=46\nla la la\n".to_string()];
        let r = analyze(&model, &tok, &docs, true, "builtin", &RouterOptions { seq_len: Some(8), ..opts }).unwrap();
        let n =
            |g: &str| r.groups.iter().find(|x| x.family == "synthetic" && x.group == g).map(|x| x.tokens).unwrap_or(0);
        assert_eq!((n("answer"), n("prompt"), n("filler")), (2, 7, 9));
        assert_eq!(n("predicts answer (next is answer)"), 2);
        // A dense checkpoint is refused.
        let (dense, _, _) = tiny_run(&dir.path().join("dense"), ModelKind::Dense, 1);
        assert!(run(&dense, data.to_str().unwrap(), &RouterOptions::default(), &out)
            .unwrap_err()
            .to_string()
            .contains("without routers"));
    }
}
