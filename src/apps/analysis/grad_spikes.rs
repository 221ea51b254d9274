//! `itt analyze grad-spikes`: the paper's motivating study (§2; DESIGN §10) on any checkpoint.
//! Samples are split into "easy" (the model predicts the targets) and "hard" (it does not);
//! for each sample, the loss on its targets is differentiated, and per layer the nuclear norm
//! ||dL/dW||_* of each attention projection W in {wq, wk, wv, wo} is taken; the norms are
//! averaged over each class and compared across layers. The paper's claim: hard samples show
//! spikes (much larger norms in some layers), which motivates giving hard tokens more depth.
//!
//! Samples and their split:
//! - `builtin` (the synthetic corpus): one task line each, `[eot] + line`; the targets are the
//!   answer tokens (`answer_spans`); easy = every answer token is the greedy prediction.
//! - JSONL with `prompt` and `answer` fields: the same, the answer's tokens being the targets.
//! - JSONL with a `label` field ("easy" / "hard"): the given label; every token a target.
//! - any other text: windows of `window` tokens, every token a target; split at the median of
//!   per-window greedy accuracy (ties by loss), the lower half hard.
//!   If a rule leaves a class with fewer than two samples, the split falls back to the median
//!   of target accuracy over the samples measured, and the report says so.
//!
//! The forward pass uses top-k routing (as in training); in an ITT layer the gradient of a
//! shared weight sums over the layer's steps, which is the gradient the optimiser sees.
//! Nuclear norms come from a Jacobi eigen-solver in f64 (`linalg`).

use super::linalg::nuclear_norm;
use super::plot::{self, Panel, Png, Series};
use super::{encode_with_offsets, write_json};
use crate::data::{answer_spans, Tokenizer};
use crate::model::{Model, RoutingOptions, SeqLayout};
use crate::{ops, Error, Result};
use candle_core::{DType, Tensor};
use plotters::style::colors::BLACK;
use serde::Serialize;
use std::path::{Path, PathBuf};

pub const PROJECTIONS: [&str; 4] = ["wq", "wk", "wv", "wo"];

#[derive(Clone, Debug)]
pub struct SpikeOptions {
    /// Samples wanted per class.
    pub samples: usize,
    /// Window length for plain text.
    pub window: usize,
    /// Candidate samples to look at, at most (a class may be rare).
    pub max_scan: usize,
    /// JSONL field holding a sample's text (when it has no prompt/answer fields).
    pub jsonl_field: String,
}

impl Default for SpikeOptions {
    fn default() -> Self {
        SpikeOptions { samples: 24, window: 64, max_scan: 1500, jsonl_field: "text".into() }
    }
}

/// One scored sample: `ids` are the model inputs, `targets[j]` the token after `ids[j]`,
/// `mask[j]` whether position j counts.
#[derive(Clone, Debug)]
pub struct Sample {
    pub ids: Vec<u32>,
    pub targets: Vec<u32>,
    pub mask: Vec<bool>,
    /// Some(true) = hard, Some(false) = easy when the data says so.
    pub label: Option<bool>,
    pub preview: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct SampleResult {
    pub hard: bool,
    /// Greedy accuracy on the targets.
    pub accuracy: f64,
    /// Mean cross-entropy on the targets (nats).
    pub loss: f64,
    pub targets: usize,
    pub preview: String,
    /// Per layer: nuclear norms of the gradients of wq, wk, wv, wo.
    pub norms: Vec<[f64; 4]>,
}

#[derive(Clone, Debug, Serialize)]
pub struct LayerSpikes {
    pub layer: usize,
    /// Whether this layer is a thinking (ITT/Loop) layer.
    pub thinking: bool,
    /// Mean and standard deviation over the class, per projection (order `PROJECTIONS`).
    pub easy_mean: [f64; 4],
    pub easy_std: [f64; 4],
    pub hard_mean: [f64; 4],
    pub hard_std: [f64; 4],
    /// hard_mean / easy_mean.
    pub ratio: [f64; 4],
}

#[derive(Clone, Debug, Serialize)]
pub struct SpikeReport {
    pub model_kind: crate::base::config::ModelKind,
    pub data: String,
    /// How samples were split into easy and hard.
    pub rule: String,
    pub projections: [&'static str; 4],
    pub scanned: usize,
    pub n_easy: usize,
    pub n_hard: usize,
    pub mean_loss_easy: f64,
    pub mean_loss_hard: f64,
    pub mean_accuracy_easy: f64,
    pub mean_accuracy_hard: f64,
    pub layers: Vec<LayerSpikes>,
    pub samples: Vec<SampleResult>,
}

/// How samples of a data source are split.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum SplitRule {
    /// Easy iff every target is predicted (greedy).
    AllCorrect,
    /// The data's own labels.
    Given,
    /// Median of per-sample accuracy.
    Median,
}

/// Samples of a data source (see the module header) and the rule that splits them.
pub fn build_samples(
    tok: &Tokenizer,
    data: &str,
    max_len: usize,
    opts: &SpikeOptions,
) -> Result<(Vec<Sample>, SplitRule)> {
    let builtin = matches!(data, "builtin" | "builtin:synthetic");
    let path = Path::new(data);
    let is_jsonl = !builtin && path.extension().is_some_and(|e| e == "jsonl");
    if builtin {
        let (docs, _) = super::read_docs(data)?;
        let mut out = vec![];
        'docs: for doc in &docs {
            for line in doc.split_inclusive('\n') {
                if let Some(span) = answer_spans(line) {
                    out.push(answer_sample(tok, line, span, None, max_len)?);
                    if out.len() >= opts.max_scan {
                        break 'docs;
                    }
                }
            }
        }
        return Ok((out, SplitRule::AllCorrect));
    }
    if is_jsonl {
        let text = std::fs::read_to_string(path).map_err(|e| Error::input(path, format!("cannot read: {e}")))?;
        let mut out = vec![];
        let mut rule = None;
        for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            let v: serde_json::Value =
                serde_json::from_str(line).map_err(|e| Error::input(path, format!("line {}: not JSON: {e}", n + 1)))?;
            let field = |k: &str| v.get(k).and_then(|x| x.as_str());
            let label = match v.get("label") {
                None => None,
                Some(l) => match l.as_str().map(str::to_lowercase).as_deref() {
                    Some("easy") => Some(false),
                    Some("hard") => Some(true),
                    _ => {
                        return Err(Error::input(
                            path,
                            format!("line {}: label must be \"easy\" or \"hard\", got {l}", n + 1),
                        ))
                    }
                },
            };
            let sample = match (field("prompt"), field("answer"), field(&opts.jsonl_field)) {
                (Some(p), Some(a), _) => {
                    let text = format!("{p}{a}");
                    answer_sample(tok, &text, p.len()..text.len(), label, max_len)?
                }
                (_, _, Some(t)) => {
                    let mut s = answer_sample(tok, t, 0..t.len(), label, max_len)?;
                    s.mask.iter_mut().for_each(|m| *m = true);
                    s
                }
                _ => {
                    return Err(Error::input(
                        path,
                        format!(
                            "line {}: needs \"prompt\" and \"answer\" fields, or a \"{}\" field",
                            n + 1,
                            opts.jsonl_field
                        ),
                    ))
                }
            };
            let this = if sample.label.is_some() { SplitRule::Given } else { SplitRule::AllCorrect };
            if rule.is_some_and(|r| r != this) {
                return Err(Error::input(
                    path,
                    format!("line {}: either every line has a \"label\" or none does", n + 1),
                ));
            }
            rule = Some(this);
            if sample.mask.iter().any(|&m| m) {
                out.push(sample);
            }
            if out.len() >= opts.max_scan {
                break;
            }
        }
        return match rule {
            Some(r) if !out.is_empty() => Ok((out, r)),
            _ => Err(Error::input(path, "has no usable samples")),
        };
    }
    // Plain text: windows over the documents, each preceded by end-of-document as in training.
    let docs = crate::data::read_corpus(
        path,
        &crate::data::CorpusOptions { jsonl_field: opts.jsonl_field.clone(), ..Default::default() },
    )?;
    let w = opts.window.clamp(2, max_len);
    let mut stream = vec![];
    for d in &docs {
        stream.push(tok.eot_id());
        stream.extend(tok.encode(d)?);
        if stream.len() > (2 * opts.samples + 1) * (w + 1) {
            break;
        }
    }
    let out: Vec<Sample> = stream
        .chunks(w + 1)
        .filter(|c| c.len() == w + 1)
        .take(2 * opts.samples)
        .map(|c| Sample {
            ids: c[..w].to_vec(),
            targets: c[1..].to_vec(),
            mask: vec![true; w],
            label: None,
            preview: tok.decode(&c[..w.min(40)]).unwrap_or_default(),
        })
        .collect();
    if out.len() < 2 {
        return Err(Error::input(path, format!("has too little text for two windows of {w} tokens")));
    }
    Ok((out, SplitRule::Median))
}

/// `[eot] + text`, the targets those tokens overlapping `span` (bytes of `text`).
fn answer_sample(
    tok: &Tokenizer,
    text: &str,
    span: std::ops::Range<usize>,
    label: Option<bool>,
    max_len: usize,
) -> Result<Sample> {
    let (ids, ranges) = encode_with_offsets(tok, text)?;
    let mut stream = vec![tok.eot_id()];
    stream.extend(&ids);
    let mut in_span = vec![false];
    in_span.extend(ranges.iter().map(|r| r.start < span.end && r.end > span.start));
    let n = (stream.len() - 1).min(max_len);
    Ok(Sample {
        ids: stream[..n].to_vec(),
        targets: stream[1..=n].to_vec(),
        mask: in_span[1..=n].to_vec(),
        label,
        preview: text.trim_end().chars().take(60).collect(),
    })
}

/// Per layer: nuclear norms of the gradients of wq, wk, wv, wo.
type LayerNorms = Vec<[f64; 4]>;

/// Accuracy and loss on the targets and, when `grads`, the per-layer nuclear norms.
fn measure(model: &Model, s: &Sample, grads: bool) -> Result<(f64, f64, Option<LayerNorms>)> {
    let dev = model.device();
    let n = s.ids.len();
    let x = Tensor::from_slice(&s.ids, n, dev)?;
    let logits = model.forward(&x, &SeqLayout::uniform(1, n), &RoutingOptions::default(), None, None)?; // (n, V)
    let rows: Vec<u32> = (0..n as u32).filter(|&j| s.mask[j as usize]).collect();
    let tgt: Vec<u32> = rows.iter().map(|&j| s.targets[j as usize]).collect();
    let sel = logits.index_select(&Tensor::from_slice(&rows, rows.len(), dev)?, 0)?; // (M, V)
    let host: Vec<Vec<f32>> = sel.to_dtype(DType::F32)?.to_vec2()?;
    let correct = host
        .iter()
        .zip(&tgt)
        .filter(|(row, &t)| {
            let best = row.iter().enumerate().fold(0, |b, (i, &z)| if z > row[b] { i } else { b });
            best as u32 == t
        })
        .count();
    let loss = ops::cross_entropy(&sel, &Tensor::from_slice(&tgt, tgt.len(), dev)?)?;
    let loss_v = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    let acc = correct as f64 / rows.len().max(1) as f64;
    if !grads {
        return Ok((acc, loss_v, None));
    }
    let g = loss.backward()?;
    let mut norms = Vec::with_capacity(model.layers.len());
    for b in model.layers.iter().map(|l| &l.block) {
        let mut row = [0.0; 4];
        for (k, w) in
            [&b.attn.wq.weight, &b.attn.wk.weight, &b.attn.wv.weight, &b.attn.wo.weight].into_iter().enumerate()
        {
            row[k] = match g.get(w) {
                Some(gw) => {
                    let (r, c) = gw.dims2()?;
                    let v: Vec<f64> = gw.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
                    nuclear_norm(&v, r, c)
                }
                None => 0.0,
            };
        }
        norms.push(row);
    }
    Ok((acc, loss_v, Some(norms)))
}

/// Measure samples until each class has `opts.samples` (or the samples run out), then split.
pub fn analyze(
    model: &Model,
    samples: &[Sample],
    rule: SplitRule,
    data: &str,
    opts: &SpikeOptions,
) -> Result<SpikeReport> {
    let want = opts.samples.max(1);
    let mut results: Vec<SampleResult> = vec![];
    let (mut easy, mut hard) = (0usize, 0usize);
    let mut scanned = 0;
    for s in samples {
        if rule != SplitRule::Median && easy >= want && hard >= want {
            break;
        }
        if !s.mask.iter().any(|&m| m) {
            continue;
        }
        scanned += 1;
        // Class first (a forward pass), then gradients only if that class still needs samples.
        let (acc, loss, _) = measure(model, s, false)?;
        let is_hard = match rule {
            SplitRule::AllCorrect => acc < 1.0,
            SplitRule::Given => s.label.unwrap_or(false),
            SplitRule::Median => false,
        };
        if rule != SplitRule::Median && ((is_hard && hard >= want) || (!is_hard && easy >= want)) {
            continue;
        }
        let (acc, loss2, norms) = measure(model, s, true)?;
        debug_assert!((loss - loss2).abs() < 1e-4);
        if is_hard {
            hard += 1;
        } else {
            easy += 1;
        }
        results.push(SampleResult {
            hard: is_hard,
            accuracy: acc,
            loss,
            targets: s.mask.iter().filter(|&&m| m).count(),
            preview: s.preview.clone(),
            norms: norms.unwrap_or_default(),
        });
    }
    if results.len() < 2 {
        return Err(Error::input(data, "gave fewer than two usable samples"));
    }
    let mut rule_text = match rule {
        SplitRule::AllCorrect => "easy = every target (answer) token is the greedy prediction".to_string(),
        SplitRule::Given => "the samples' own easy/hard labels".to_string(),
        SplitRule::Median => "per-window greedy accuracy: lower half hard (ties: higher loss harder)".to_string(),
    };
    if rule == SplitRule::Median || easy < 2 || hard < 2 {
        if rule != SplitRule::Median {
            rule_text =
                format!("median split of target accuracy (the rule '{rule_text}' left {easy} easy / {hard} hard)");
        }
        let mut order: Vec<usize> = (0..results.len()).collect();
        order.sort_by(|&a, &b| {
            results[a].accuracy.total_cmp(&results[b].accuracy).then(results[b].loss.total_cmp(&results[a].loss))
        });
        let half = results.len() / 2;
        for (rank, &i) in order.iter().enumerate() {
            results[i].hard = rank < half;
        }
    }
    let class = |h: bool| results.iter().filter(|r| r.hard == h).collect::<Vec<_>>();
    let (e, h) = (class(false), class(true));
    let thinking: Vec<bool> = model.layers.iter().map(|l| l.thinking.is_some()).collect();
    let stat = |rs: &[&SampleResult], l: usize, k: usize| {
        super::mean_std(&rs.iter().map(|r| r.norms[l][k]).collect::<Vec<_>>())
    };
    let layers = (0..model.layers.len())
        .map(|l| {
            let mut ls = LayerSpikes {
                layer: l,
                thinking: thinking[l],
                easy_mean: [0.0; 4],
                easy_std: [0.0; 4],
                hard_mean: [0.0; 4],
                hard_std: [0.0; 4],
                ratio: [0.0; 4],
            };
            for k in 0..4 {
                (ls.easy_mean[k], ls.easy_std[k]) = stat(&e, l, k);
                (ls.hard_mean[k], ls.hard_std[k]) = stat(&h, l, k);
                ls.ratio[k] = ls.hard_mean[k] / ls.easy_mean[k];
            }
            ls
        })
        .collect();
    let mean = |rs: &[&SampleResult], f: fn(&SampleResult) -> f64| {
        super::mean_std(&rs.iter().map(|r| f(r)).collect::<Vec<_>>()).0
    };
    Ok(SpikeReport {
        model_kind: model.kind(),
        data: data.to_string(),
        rule: rule_text,
        projections: PROJECTIONS,
        scanned,
        n_easy: e.len(),
        n_hard: h.len(),
        mean_loss_easy: mean(&e, |r| r.loss),
        mean_loss_hard: mean(&h, |r| r.loss),
        mean_accuracy_easy: mean(&e, |r| r.accuracy),
        mean_accuracy_hard: mean(&h, |r| r.accuracy),
        layers,
        samples: results,
    })
}

/// Easy vs hard across layers, one panel per projection, and the hard/easy ratios.
pub fn picture(r: &SpikeReport, title: &str) -> Result<Png> {
    let ticks: Vec<(f64, String)> = r
        .layers
        .iter()
        .map(|l| (l.layer as f64, format!("L{}{}", l.layer, if l.thinking { "*" } else { "" })))
        .collect();
    let x_label = if r.layers.iter().any(|l| l.thinking) { "layer (* = thinking layer)" } else { "layer" };
    let mut panels: Vec<Panel> = PROJECTIONS
        .iter()
        .enumerate()
        .map(|(k, p)| Panel::Line {
            title: format!("||dL/d{p}||_* (nuclear norm)"),
            x_label: x_label.into(),
            y_label: "mean over samples".into(),
            series: vec![
                Series::new(
                    format!("easy (n={})", r.n_easy),
                    r.layers.iter().map(|l| (l.layer as f64, l.easy_mean[k])).collect(),
                    plot::color(0),
                )
                .with_markers(),
                Series::new(
                    format!("hard (n={})", r.n_hard),
                    r.layers.iter().map(|l| (l.layer as f64, l.hard_mean[k])).collect(),
                    plot::color(3),
                )
                .with_markers(),
            ],
            x_ticks: Some(ticks.clone()),
        })
        .collect();
    panels.push(Panel::Line {
        title: "hard / easy".into(),
        x_label: x_label.into(),
        y_label: "ratio of means".into(),
        series: PROJECTIONS
            .iter()
            .enumerate()
            .map(|(k, p)| {
                Series::new(*p, r.layers.iter().map(|l| (l.layer as f64, l.ratio[k])).collect(), plot::color(k + 4))
                    .with_markers()
            })
            .chain(std::iter::once(
                Series::new("equal (1)", r.layers.iter().map(|l| (l.layer as f64, 1.0)).collect(), BLACK).dashed(),
            ))
            .collect(),
        x_ticks: Some(ticks),
    });
    panels.push(Panel::Note {
        title: "Samples".into(),
        text: format!(
            "{}\neasy: {} samples, loss {:.3}, accuracy {:.2}\nhard: {} samples, loss {:.3}, accuracy {:.2}\nsplit: {}",
            r.data,
            r.n_easy,
            r.mean_loss_easy,
            r.mean_accuracy_easy,
            r.n_hard,
            r.mean_loss_hard,
            r.mean_accuracy_hard,
            wrap(&r.rule, 52)
        ),
    });
    plot::grid(title, &panels, 3, (400, 290))
}

fn wrap(s: &str, width: usize) -> String {
    let mut out = String::new();
    let mut line = 0;
    for w in s.split(' ') {
        if line > 0 && line + w.len() > width {
            out.push('\n');
            line = 0;
        } else if line > 0 {
            out.push(' ');
            line += 1;
        }
        out.push_str(w);
        line += w.len();
    }
    out
}

/// Load a checkpoint, run the study on `data`, write grad_spikes.json and grad_spikes.png.
pub fn run(ckpt: &Path, data: &str, opts: &SpikeOptions, out: &Path) -> Result<(SpikeReport, Vec<PathBuf>)> {
    let crate::import::Opened { model, tokenizer: tok, info, .. } =
        crate::import::open(ckpt, &crate::import::OpenOptions::differentiable())?;
    let max_len = info.config.train.seq_len.min(model.cfg.max_seq_len);
    let (samples, rule) = build_samples(&tok, data, max_len, opts)?;
    let report = analyze(&model, &samples, rule, data, opts)?;
    super::prepare_out(out)?;
    let preset = info.config.preset.clone().unwrap_or_else(|| format!("{:?}", model.kind()));
    let png =
        picture(&report, &format!("Attention-weight gradient norms, easy vs hard: {preset} ({})", info.dir.display()))?;
    let paths = vec![out.join("grad_spikes.json"), out.join("grad_spikes.png")];
    write_json(&paths[0], &report)?;
    png.write(&paths[1])?;
    Ok((report, paths))
}

/// A terminal table of the report.
pub fn summary(r: &SpikeReport) -> String {
    let mut s = format!(
        "{} easy / {} hard samples of {} scanned ({}); loss easy {:.3} hard {:.3}\nlayer       {}\n",
        r.n_easy,
        r.n_hard,
        r.scanned,
        r.rule,
        r.mean_loss_easy,
        r.mean_loss_hard,
        PROJECTIONS.map(|p| format!("{p:>6} easy / hard (ratio)  ")).join("")
    );
    for l in &r.layers {
        s.push_str(&format!("{:>3}{:<8}", l.layer, if l.thinking { " think" } else { "" }));
        for k in 0..4 {
            s.push_str(&format!(" {:>9.4} / {:>9.4} ({:>4.2})", l.easy_mean[k], l.hard_mean[k], l.ratio[k]));
        }
        s.push('\n');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;
    use crate::base::config::ModelKind;

    #[test]
    fn nuclear_norms_of_real_gradients_and_all_split_rules() {
        let dir = tempfile::tempdir().unwrap();
        let (ck, model, tok) = tiny_run(&dir.path().join("itt"), ModelKind::Itt, 3);
        // The norm equals the sum of singular values of the gradient the optimiser would see.
        let s = answer_sample(&tok, "12+34=46\n", 6..8, None, 32).unwrap();
        assert_eq!(s.mask, vec![false, false, false, false, false, false, true, true, false]);
        let (_, _, norms) = measure(&model, &s, true).unwrap();
        let norms = norms.unwrap();
        assert_eq!(norms.len(), 4);
        assert!(norms.iter().flatten().all(|&x| x > 0.0 && x.is_finite()), "{norms:?}");

        // Plain text: median split, equal halves.
        let text = dir.path().join("t.txt");
        std::fs::write(&text, "sort 5 3 9 1 = 1 3 5 9\nrev abc = cba\n".repeat(20)).unwrap();
        let opts = SpikeOptions { samples: 3, window: 16, ..Default::default() };
        let out = dir.path().join("out");
        let (r, paths) = run(&ck, text.to_str().unwrap(), &opts, &out).unwrap();
        assert_eq!((r.n_easy, r.n_hard), (3, 3));
        assert!(r.mean_accuracy_easy >= r.mean_accuracy_hard);
        assert_png(&paths[1], 5000);
        let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&paths[0]).unwrap()).unwrap();
        assert_eq!(json["layers"].as_array().unwrap().len(), 4);
        assert_eq!(json["layers"][1]["thinking"], true);
        assert_eq!(json["layers"][0]["easy_mean"].as_array().unwrap().len(), 4);
        assert_eq!(json["samples"].as_array().unwrap().len(), 6);

        // JSONL with labels, and with prompt/answer; a random model gets answers wrong, so the
        // all-correct rule falls back to the median split and says so.
        let jl = dir.path().join("s.jsonl");
        std::fs::write(
            &jl,
            "{\"text\":\"12+34=46\",\"label\":\"easy\"}\n{\"text\":\"rev abc = cba\",\"label\":\"hard\"}\n",
        )
        .unwrap();
        let (r, _) = run(&ck, jl.to_str().unwrap(), &opts, &out).unwrap();
        assert_eq!((r.n_easy, r.n_hard), (1, 1));
        assert!(r.rule.contains("median"), "{}", r.rule);
        std::fs::write(
            &jl,
            "{\"prompt\":\"12+34=\",\"answer\":\"46\"}\n{\"prompt\":\"rev ab = \",\"answer\":\"ba\"}\n".repeat(3),
        )
        .unwrap();
        let (r, _) = run(&ck, jl.to_str().unwrap(), &SpikeOptions { samples: 6, ..opts.clone() }, &out).unwrap();
        assert_eq!((r.n_easy, r.n_hard), (3, 3));
        assert!(r.samples.iter().all(|s| s.targets == 2));
        std::fs::write(&jl, "{\"text\":\"a\",\"label\":\"maybe\"}\n").unwrap();
        assert!(run(&ck, jl.to_str().unwrap(), &opts, &out).unwrap_err().to_string().contains("label must be"));

        // A dense model works too (the study is about any checkpoint).
        let (dense, _, _) = tiny_run(&dir.path().join("dense"), ModelKind::Dense, 3);
        let (r, _) = run(&dense, text.to_str().unwrap(), &opts, &out).unwrap();
        assert!(r.layers.iter().all(|l| !l.thinking));
    }
}
