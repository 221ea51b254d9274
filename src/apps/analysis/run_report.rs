//! `itt report RUN_DIR`: one self-contained HTML page for a training run: its config, size
//! and FLOPs (DESIGN §7), loss and validation curves, learning rate, throughput, gradient
//! norm, the routers over training (share routed, mean weight, step overlap, phi norms; §3,
//! §10) and sample generations from the latest checkpoint with each generated token coloured
//! by the thinking depth that produced it. Pictures are PNGs embedded as `data:` URLs, so the
//! page is one file that can be mailed or attached to an issue.
//!
//! Generation routing: causal threshold routing with KV caches when the checkpoint stores
//! router thresholds (`router_calibration.json`, DESIGN §5); otherwise the paper's top-k
//! with no cache (the whole text re-run per token), which needs no thresholds.

use super::depth::BASE_CSS;
use super::plot::{self, Panel, Series};
use super::{depth_rgb, html_escape, visible};
use crate::base::config::RunConfig;
use crate::generate::{Event, GenerateOptions, SamplingParams};
use crate::model::{Routing, RoutingOptions};
use crate::{checkpoint, flops, Error, Result};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Clone, Debug)]
pub struct ReportOptions {
    /// Where to write the page (default RUN_DIR/report.html).
    pub out: Option<PathBuf>,
    /// Prompts for sample generations (default: a few synthetic tasks for runs on the builtin
    /// corpus, else a generic opening).
    pub prompts: Vec<String>,
    pub max_new_tokens: usize,
    /// Skip generation (e.g. for a run without a checkpoint yet).
    pub generate: bool,
}

impl Default for ReportOptions {
    fn default() -> Self {
        ReportOptions { out: None, prompts: vec![], max_new_tokens: 32, generate: true }
    }
}

/// The metrics of a run: training log lines and validation lines, in file order.
#[derive(Clone, Debug, Default)]
pub struct Metrics {
    pub train: Vec<Value>,
    pub val: Vec<Value>,
    /// Lines that were not JSON objects (a torn last line of a killed run).
    pub skipped: usize,
}

pub fn read_metrics(path: &Path) -> Result<Metrics> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::input(path, format!("cannot read: {e}")))?;
    let mut m = Metrics::default();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        match serde_json::from_str::<Value>(line) {
            Ok(v) if v.get("val_loss").is_some() => m.val.push(v),
            Ok(v) if v.get("loss").is_some() => m.train.push(v),
            _ => m.skipped += 1,
        }
    }
    Ok(m)
}

fn num(v: &Value, k: &str) -> Option<f64> {
    v.get(k).and_then(Value::as_f64)
}

fn series_of(lines: &[Value], key: &str) -> Vec<(f64, f64)> {
    lines.iter().filter_map(|v| Some((num(v, "step")?, num(v, key)?))).collect()
}

/// Per (layer, step) routing values over training, from the `routing` arrays.
fn routing_series(lines: &[Value], key: &str) -> BTreeMap<(u64, u64), Vec<(f64, f64)>> {
    let mut out: BTreeMap<(u64, u64), Vec<(f64, f64)>> = BTreeMap::new();
    for v in lines {
        let (Some(step), Some(items)) = (num(v, "step"), v.get("routing").and_then(Value::as_array)) else { continue };
        for it in items {
            if let (Some(l), Some(t), Some(x)) =
                (it.get("layer").and_then(Value::as_u64), it.get("step").and_then(Value::as_u64), num(it, key))
            {
                out.entry((l, t)).or_default().push((step, x));
            }
        }
    }
    out
}

/// phi RMS per (layer, t) over training, from the `phi_rms` arrays `[[layer, [rms per t]]]`.
fn phi_series(lines: &[Value]) -> BTreeMap<(u64, usize), Vec<(f64, f64)>> {
    let mut out: BTreeMap<(u64, usize), Vec<(f64, f64)>> = BTreeMap::new();
    for v in lines {
        let (Some(step), Some(items)) = (num(v, "step"), v.get("phi_rms").and_then(Value::as_array)) else { continue };
        for it in items {
            let (Some(l), Some(rms)) = (it.get(0).and_then(Value::as_u64), it.get(1).and_then(Value::as_array)) else {
                continue;
            };
            for (t, r) in rms.iter().enumerate() {
                if let Some(r) = r.as_f64() {
                    out.entry((l, t + 1)).or_default().push((step, r));
                }
            }
        }
    }
    out
}

/// A line panel over training steps.
fn line(title: &str, y: &str, series: Vec<Series>) -> Panel {
    Panel::Line { title: title.into(), x_label: "step".into(), y_label: y.into(), series, x_ticks: None }
}

fn training_panels(m: &Metrics) -> Vec<Panel> {
    let mut loss = vec![Series::new("train", series_of(&m.train, "loss"), plot::color(0))];
    let val = series_of(&m.val, "val_loss");
    if !val.is_empty() {
        loss.push(Series::new("validation", val, plot::color(3)).with_markers());
    }
    vec![
        line("Loss", "nats / token", loss),
        line("Learning rate", "lr", vec![Series::new("lr", series_of(&m.train, "lr"), plot::color(2))]),
        line(
            "Throughput",
            "tokens / s",
            vec![Series::new("tokens/s", series_of(&m.train, "tokens_per_s"), plot::color(4))],
        ),
        line(
            "Gradient norm (before clipping)",
            "L2 norm",
            vec![Series::new("grad norm", series_of(&m.train, "grad_norm"), plot::color(1))],
        ),
    ]
}

fn routing_panels(m: &Metrics) -> Vec<Panel> {
    let by_key = |key: &str, min_step: u64| -> Vec<Series> {
        routing_series(&m.train, key)
            .into_iter()
            .filter(|((_, t), _)| *t >= min_step)
            .enumerate()
            .map(|(i, ((l, t), pts))| Series::new(format!("L{l} t{t}"), pts, plot::color(i)))
            .collect()
    };
    let phi: Vec<Series> = phi_series(&m.train)
        .into_iter()
        .filter(|((_, t), _)| *t >= 2)
        .enumerate()
        .map(|(i, ((l, t), pts))| Series::new(format!("L{l} phi_{t}"), pts, plot::color(i)))
        .collect();
    let mut p = vec![
        line("Share of tokens routed per step", "share", by_key("share", 2)),
        line("Mean router weight w", "w", by_key("w_mean", 2)),
        line("Overlap with previous step's tokens", "|S_t ∩ S_t-1| / |S_t|", by_key("overlap_prev", 3)),
    ];
    p.push(if phi.is_empty() {
        Panel::Note { title: "Step vectors".into(), text: "no phi_t logged".into() }
    } else {
        line("Step vector RMS phi_t (t >= 2)", "rms", phi)
    });
    p
}

fn default_prompts(run_dir: &Path, cfg: &RunConfig) -> Vec<String> {
    let meta = std::fs::read_to_string(run_dir.join("data").join("meta.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok());
    let source = meta.as_ref().and_then(|m| m.get("source")).and_then(Value::as_str).unwrap_or("");
    if source.starts_with("builtin") || cfg.model.vocab_size < 100 {
        ["347+589=", "912-347=", "sort 5 3 9 1 =", "rev abcde =", "close ([{<>}]( =", "count b in abacbb ="]
            .map(String::from)
            .to_vec()
    } else {
        ["The ", "Once upon a time"].map(String::from).to_vec()
    }
}

/// Generated samples as HTML, each token coloured by its mean depth over thinking layers.
fn generations(run_dir: &Path, cfg: &RunConfig, opts: &ReportOptions) -> Result<String> {
    let crate::import::Opened { model, tokenizer: tok, info, .. } =
        crate::import::open(run_dir, &crate::import::OpenOptions::differentiable())?;
    let prompts = if opts.prompts.is_empty() { default_prompts(run_dir, cfg) } else { opts.prompts.clone() };
    let threshold = model.has_routers() && info.calibration.is_some();
    let use_cache = threshold || !model.has_routers();
    let routing = RoutingOptions {
        mode: if threshold { Routing::Threshold } else { Routing::TopK },
        calibration: info.calibration.clone().map(std::sync::Arc::new),
        ..Default::default()
    };
    let gen_opts = GenerateOptions {
        max_new_tokens: opts.max_new_tokens,
        stop: vec!["\n".into()],
        stop_ids: vec![],
        ignore_eot: false,
        sampling: SamplingParams::greedy(),
        routing,
        use_cache,
        prefill_chunk: 0,
        ..Default::default()
    };
    let max_depth = model.layer_steps().into_iter().max().unwrap_or(1) as u32;
    let gen = crate::generate::generate(&model, &tok, &prompts, gen_opts)?;
    let layers = gen.layers.clone();
    let mut toks: Vec<Vec<(String, Vec<u32>)>> = vec![vec![]; prompts.len()];
    for ev in gen {
        if let Event::Token(t) = ev? {
            toks[t.seq].push((t.text, t.depth));
        }
    }
    let mode = if !model.has_routers() {
        "no routers (every token takes every step of each layer)".to_string()
    } else if threshold {
        "causal threshold routing with KV caches (checkpoint's router thresholds)".to_string()
    } else {
        "top-k routing, no cache (the checkpoint has no router thresholds)".to_string()
    };
    let mut h = format!(
        "<p class=\"meta\">Greedy decoding from {}, up to {} tokens or a newline; {mode}. Generated tokens are coloured by the mean number of \
         steps over the thinking layers {:?} (1 to {max_depth}); hover for per-layer steps.</p>\n",
        html_escape(&info.dir.display().to_string()),
        opts.max_new_tokens,
        layers
    );
    h.push_str(&legend(max_depth));
    h.push_str("<div class=\"text\">");
    for (p, ts) in prompts.iter().zip(&toks) {
        h.push_str(&format!("<b>{}</b>", html_escape(&visible(p))));
        for (text, depth) in ts {
            let mean = if depth.is_empty() { 1.0 } else { depth.iter().sum::<u32>() as f64 / depth.len() as f64 };
            let (r, g, b) = depth_rgb(mean.round() as u32, max_depth);
            let fg = if super::depth_needs_light_text(mean.round() as u32, max_depth) { "color:#fff;" } else { "" };
            let per: Vec<String> = layers.iter().zip(depth).map(|(l, d)| format!("layer {l}: {d}")).collect();
            h.push_str(&format!(
                "<span class=\"t\" style=\"background:rgb({r},{g},{b});{fg}\">{}<span class=\"tip\">{}</span></span>",
                html_escape(&visible(text)),
                html_escape(&per.join("\n"))
            ));
        }
        h.push_str("<br>");
    }
    h.push_str("</div>\n");
    Ok(h)
}

fn legend(max: u32) -> String {
    let mut s = String::from("<div class=\"legend\">steps:");
    for d in 1..=max {
        let (r, g, b) = depth_rgb(d, max);
        s.push_str(&format!("<span class=\"sw\" style=\"background:rgb({r},{g},{b})\"></span>{d}"));
    }
    s.push_str("</div>\n");
    s
}

fn row(k: &str, v: impl std::fmt::Display) -> String {
    format!("<tr><th class=\"l\">{}</th><td class=\"l\">{}</td></tr>\n", html_escape(k), html_escape(&v.to_string()))
}

/// Write the report page for `run_dir`; returns its path.
pub fn run(run_dir: &Path, opts: &ReportOptions) -> Result<PathBuf> {
    if !run_dir.is_dir() {
        return Err(Error::input(run_dir, "is not a folder; give a training run folder (the --out of `itt train`)"));
    }
    let metrics_path = run_dir.join("metrics.jsonl");
    let cfg_path = run_dir.join("config.json");
    if !metrics_path.exists() || !cfg_path.exists() {
        return Err(Error::input(
            run_dir,
            "is not a training run folder: it needs config.json and metrics.jsonl (written by `itt train --out`)",
        ));
    }
    let cfg = RunConfig::load(&cfg_path)?;
    let m = read_metrics(&metrics_path)?;
    let seq_len = cfg.train.seq_len;
    let f = flops::flops_per_token(&cfg.model, seq_len, None, None);
    let state = checkpoint::load(run_dir).ok().and_then(|c| c.state);

    let mut h = String::from("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>ITT training report</title>\n<style>\n");
    h.push_str(BASE_CSS);
    h.push_str("pre{background:#f7f7f7;border:1px solid #ddd;padding:8px;font-size:12px;overflow:auto}\n</style>\n</head>\n<body>\n");
    h.push_str(&format!("<h1>Training report: {}</h1>\n", html_escape(&run_dir.display().to_string())));

    // Summary table.
    let last = m.train.last();
    let last_val = m.val.last();
    h.push_str("<h2>Run</h2>\n<table>\n");
    h.push_str(&row("preset", cfg.preset.as_deref().unwrap_or("custom")));
    h.push_str(&row(
        "model",
        crate::apps::report::info(&cfg, &f, seq_len).lines().nth(1).unwrap_or("").trim_start_matches("kind").trim(),
    ));
    h.push_str(&row("parameters", format!("{} ({:.2}M)", cfg.model.n_params(), cfg.model.n_params() as f64 / 1e6)));
    h.push_str(&row(
        "FLOPs per token",
        format!(
            "forward {:.3} M, training {:.3} M, {:.3}x dense (at {seq_len} tokens; step shares {:?})",
            f.forward / 1e6,
            f.train / 1e6,
            f.ratio_to_dense,
            f.step_shares
        ),
    ));
    if let Some(v) = last {
        h.push_str(&row("steps logged", format!("{} of {}", num(v, "step").unwrap_or(0.0), cfg.train.max_steps)));
        h.push_str(&row("tokens seen", format!("{:.0}", num(v, "tokens_seen").unwrap_or(0.0))));
        h.push_str(&row("final train loss", format!("{:.4}", num(v, "loss").unwrap_or(f64::NAN))));
        h.push_str(&row("wall time", format!("{:.1} s", num(v, "elapsed_s").unwrap_or(f64::NAN))));
        let tps: Vec<f64> = series_of(&m.train, "tokens_per_s").into_iter().map(|p| p.1).collect();
        h.push_str(&row("tokens / s (mean of logs)", format!("{:.0}", super::mean_std(&tps).0)));
    }
    if let Some(v) = last_val {
        h.push_str(&row(
            "final validation loss",
            format!(
                "{:.4} (perplexity {:.3})",
                num(v, "val_loss").unwrap_or(f64::NAN),
                num(v, "val_ppl").unwrap_or(f64::NAN)
            ),
        ));
    }
    if let Some(s) = &state {
        h.push_str(&row("latest checkpoint", format!("step {}, {} tokens", s.step, s.tokens_seen)));
    }
    if m.skipped > 0 {
        h.push_str(&row("metrics lines skipped", m.skipped));
    }
    h.push_str("</table>\n");

    // Curves.
    if m.train.is_empty() {
        h.push_str("<p>No training steps logged yet.</p>\n");
    } else {
        let png = plot::grid("Training", &training_panels(&m), 2, (560, 320))?;
        h.push_str(&format!("<h2>Training curves</h2>\n<img alt=\"training curves\" src=\"{}\">\n", png.data_url()));
        if !routing_series(&m.train, "share").is_empty() {
            let png = plot::grid("Routers over training", &routing_panels(&m), 2, (560, 320))?;
            h.push_str(&format!(
                "<h2>Routing over training</h2>\n<img alt=\"routing curves\" src=\"{}\">\n",
                png.data_url()
            ));
            h.push_str(&routing_table(&m));
        }
    }

    // Generations.
    if opts.generate {
        h.push_str("<h2>Sample generations</h2>\n");
        match generations(run_dir, &cfg, opts) {
            Ok(s) => h.push_str(&s),
            Err(e) => h.push_str(&format!("<p>No generations: {}</p>\n", html_escape(&e.to_string()))),
        }
    }

    h.push_str("<h2>Configuration</h2>\n<pre>");
    h.push_str(&html_escape(&cfg.to_json()));
    h.push_str("</pre>\n</body>\n</html>\n");
    let out = opts.out.clone().unwrap_or_else(|| run_dir.join("report.html"));
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        super::prepare_out(parent)?;
    }
    std::fs::write(&out, h).map_err(|e| Error::input(&out, format!("cannot write: {e}")))?;
    Ok(out)
}

/// The last logged window's routing numbers as a table.
fn routing_table(m: &Metrics) -> String {
    let Some(items) =
        m.train.iter().rev().find_map(|v| v.get("routing").and_then(Value::as_array).filter(|a| !a.is_empty()))
    else {
        return String::new();
    };
    let mut h = String::from("<table>\n<tr><th>layer</th><th>step</th><th>share</th><th>w mean</th><th>w std</th><th>overlap prev</th></tr>\n");
    for it in items {
        let f = |k: &str| num(it, k).map(|x| format!("{x:.3}")).unwrap_or_else(|| "-".into());
        h.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>\n",
            f("layer").trim_end_matches(".000"),
            f("step").trim_end_matches(".000"),
            f("share"),
            f("w_mean"),
            f("w_std"),
            f("overlap_prev")
        ));
    }
    h.push_str("</table>\n<p class=\"meta\">Last logged window. Overlap prev = |S_t ∩ S_t-1| / |S_t| (0 at t = 2, where it is not measured).</p>\n");
    h
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;
    use crate::base::config::ModelKind;

    #[test]
    fn report_pages_for_itt_and_dense_runs() {
        let dir = tempfile::tempdir().unwrap();
        for kind in [ModelKind::Itt, ModelKind::Dense] {
            let run_dir = dir.path().join(format!("{kind:?}"));
            tiny_run(&run_dir, kind, 4);
            let opts = ReportOptions {
                max_new_tokens: 6,
                prompts: vec!["12+3=".into(), "rev ab =".into()],
                ..Default::default()
            };
            let out = run(&run_dir, &opts).unwrap();
            let html = std::fs::read_to_string(&out).unwrap();
            assert_well_formed_html(&html);
            assert!(html.contains("Training curves") && html.contains("data:image/png;base64,"));
            assert!(html.contains("12+3=") && !html.contains("No generations"), "generation failed");
            assert_eq!(html.contains("Routing over training"), kind == ModelKind::Itt);
            if kind == ModelKind::Itt {
                assert!(html.contains("causal threshold routing"));
            }
            let imgs = html.matches("data:image/png;base64,").count();
            assert_eq!(imgs, if kind == ModelKind::Itt { 2 } else { 1 });
            assert!(html.len() > 20_000, "{}", html.len());
        }
        let e = run(dir.path(), &ReportOptions::default()).unwrap_err().to_string();
        assert!(e.contains("not a training run folder"), "{e}");
        let m = read_metrics(&dir.path().join("Itt/metrics.jsonl")).unwrap();
        assert_eq!((m.train.len(), m.val.len(), m.skipped), (10, 2, 0));
    }
}
