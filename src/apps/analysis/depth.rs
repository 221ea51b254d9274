//! `itt analyze depth`: how many steps each token took in each thinking layer (DESIGN §3),
//! under top-k routing (the paper's rule) or causal threshold routing (§5), at the trained or
//! elastic ratios and steps (§6). Written as JSON, a self-contained HTML page (tokens coloured
//! by depth, per-layer detail on hover), a PNG heat map (tokens x layers) and terminal text.
//!
//! The text is preceded by the end-of-document token, as every document is in training, and
//! cut into windows of the training sequence length; each window is routed on its own (top-k
//! picks per sequence), exactly as `eval_text` scores it. The numbers are the thinking layers'
//! own `ForwardRecord` of that pass: `depth` is its per-token step count, the per-step flags
//! its selections, the weights its router weights w = sigmoid(R_t(x_{t-1})).

use super::plot::{self, Png};
use super::{html_escape, visible, write_json};
use crate::data::Tokenizer;
use crate::model::{ForwardRecord, Model, Routing, RoutingOptions, SeqLayout};
use crate::{Error, Result};
use candle_core::Tensor;
use serde::Serialize;
use std::path::{Path, PathBuf};

/// Settings of one depth analysis.
#[derive(Clone, Debug)]
pub struct DepthOptions {
    /// Routing mode, elastic ratios and steps; the checkpoint's thresholds are filled in by
    /// `run` when threshold routing is asked for.
    pub routing: RoutingOptions,
    /// Window length (default: the checkpoint's training sequence length).
    pub seq_len: Option<usize>,
    /// Analyse at most this many tokens of the text (the rest is dropped, and said so).
    pub max_tokens: usize,
    /// Windows per forward call.
    pub batch: usize,
}

impl Default for DepthOptions {
    fn default() -> Self {
        DepthOptions { routing: RoutingOptions::default(), seq_len: None, max_tokens: 2048, batch: 8 }
    }
}

/// One token of the text and what each thinking layer did with it.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct TokenDepth {
    pub id: u32,
    pub text: String,
    /// Window the token was routed in, and its position there.
    pub window: usize,
    pub position: usize,
    /// Steps taken per thinking layer (1 = only the full first pass).
    pub depth: Vec<u32>,
    /// Per thinking layer, per routed step t = 2..=T: the router weight (None where no router
    /// ran: a skipped step, a Loop layer, ITT without routing).
    pub weights: Vec<Vec<Option<f32>>>,
    /// Per thinking layer, per routed step: whether the token took that step.
    pub selected: Vec<Vec<bool>>,
}

/// Summary of one thinking layer over the text.
#[derive(Clone, Debug, Serialize)]
pub struct LayerSummary {
    pub layer: usize,
    pub mean_depth: f64,
    /// Share of tokens that took each routed step t = 2..=T.
    pub step_share: Vec<f64>,
    /// Mean router weight at each routed step (None where no router ran).
    pub step_weight_mean: Vec<Option<f64>>,
    /// Tokens per depth 1..=T.
    pub depth_histogram: Vec<usize>,
}

#[derive(Clone, Debug, Serialize)]
pub struct DepthMap {
    pub model_kind: crate::base::config::ModelKind,
    /// "topk" or "threshold".
    pub routing: Routing,
    /// Ratios in effect per routed step (elastic or trained).
    pub ratios: Vec<f64>,
    /// Steps in effect (at most the trained T).
    pub steps: usize,
    pub seq_len: usize,
    /// The thinking layers, in order; `TokenDepth::depth[i]` is layer `layers[i]`.
    pub layers: Vec<usize>,
    pub max_depth: u32,
    pub tokens: Vec<TokenDepth>,
    /// Tokens of the text left out (beyond `max_tokens`).
    pub dropped_tokens: usize,
    pub summary: Vec<LayerSummary>,
}

/// Route `text` through `model` and record every token's depth.
pub fn depth_map(model: &Model, tok: &Tokenizer, text: &str, opts: &DepthOptions) -> Result<DepthMap> {
    if text.trim().is_empty() {
        return Err(Error::usage("the text to analyse is empty"));
    }
    let layers: Vec<usize> = model.thinking_layers().map(|t| t.layer).collect();
    if layers.is_empty() {
        return Err(Error::usage(
            "this is a dense model: it has no thinking layers, every token takes exactly one step, so there is no depth \
             to map; give an ITT checkpoint (e.g. trained with --preset tiny-itt4)",
        ));
    }
    let seq_len = opts.seq_len.unwrap_or(model.cfg.max_seq_len).clamp(1, model.cfg.max_seq_len);
    let trained = model.thinking_layers().next().map(|t| (t.steps, t.ratios.clone())).unwrap_or((1, vec![]));
    let steps = opts.routing.steps.unwrap_or(trained.0);
    let ratios = opts
        .routing
        .ratios
        .clone()
        .unwrap_or_else(|| trained.1.iter().take(steps.saturating_sub(1)).copied().collect());
    let routed = steps.saturating_sub(1);

    let text_ids = tok.encode(text)?;
    if text_ids.is_empty() {
        return Err(Error::usage("the text encodes to no tokens"));
    }
    let keep = text_ids.len().min(opts.max_tokens.max(1));
    let dropped = text_ids.len() - keep;
    let mut stream = vec![tok.eot_id()];
    stream.extend_from_slice(&text_ids[..keep]);
    // Windows over the stream: (start, len).
    let windows: Vec<(usize, usize)> =
        (0..stream.len()).step_by(seq_len).map(|s| (s, seq_len.min(stream.len() - s))).collect();

    let n_layers = layers.len();
    let mut depth: Vec<Vec<u32>> = vec![vec![]; n_layers];
    let mut weights: Vec<Vec<Vec<Option<f32>>>> = vec![vec![]; n_layers];
    let mut selected: Vec<Vec<Vec<bool>>> = vec![vec![]; n_layers];
    for group in windows.chunks(opts.batch.max(1)) {
        let ids: Vec<u32> = group.iter().flat_map(|&(s, n)| stream[s..s + n].iter().copied()).collect();
        let lens: Vec<usize> = group.iter().map(|w| w.1).collect();
        let layout = SeqLayout::with_past(&lens, &vec![0; lens.len()]);
        let x = Tensor::from_slice(&ids, ids.len(), model.device())?;
        let mut rec = ForwardRecord::with_detail();
        model.forward_hidden(&x, &layout, &opts.routing, None, Some(&mut rec))?;
        let n = ids.len();
        for (li, &layer) in layers.iter().enumerate() {
            let d = rec.depth.get(&layer).cloned().unwrap_or_else(|| vec![1; n]);
            depth[li].extend_from_slice(&d);
            for i in 0..n {
                let mut w = Vec::with_capacity(routed);
                let mut s = Vec::with_capacity(routed);
                for t in 2..=steps {
                    w.push(rec.weights.get(&(layer, t)).map(|v| v[i]));
                    s.push(match rec.selections.get(&(layer, t)) {
                        Some(sel) => sel.binary_search(&(i as u32)).is_ok(),
                        // No selection recorded: every token ran the step (Loop, no ATR) unless
                        // the step was skipped (ratio 0).
                        None => d[i] as usize >= t,
                    });
                }
                weights[li].push(w);
                selected[li].push(s);
            }
        }
    }

    // Drop the leading end-of-document token: it is context, not text.
    let mut tokens = Vec::with_capacity(keep);
    for (w, &(start, len)) in windows.iter().enumerate() {
        for p in 0..len {
            let g = start + p;
            if g == 0 {
                continue;
            }
            let id = stream[g];
            tokens.push(TokenDepth {
                id,
                text: tok.token_text(id),
                window: w,
                position: p,
                depth: (0..n_layers).map(|l| depth[l][g]).collect(),
                weights: (0..n_layers).map(|l| weights[l][g].clone()).collect(),
                selected: (0..n_layers).map(|l| selected[l][g].clone()).collect(),
            });
        }
    }
    let max_depth = model.layer_steps().into_iter().max().unwrap_or(1) as u32;
    let summary = layer_summaries(&layers, &tokens, max_depth, routed);
    Ok(DepthMap {
        model_kind: model.kind(),
        routing: opts.routing.mode,
        ratios,
        steps,
        seq_len,
        layers,
        max_depth,
        tokens,
        dropped_tokens: dropped,
        summary,
    })
}

/// Per thinking layer: mean depth, share selected and mean weight at each routed step, and the
/// depth histogram over `tokens`.
fn layer_summaries(layers: &[usize], tokens: &[TokenDepth], max_depth: u32, routed: usize) -> Vec<LayerSummary> {
    layers
        .iter()
        .enumerate()
        .map(|(li, &layer)| {
            let n = tokens.len().max(1) as f64;
            let mut hist = vec![0; max_depth as usize];
            for t in tokens {
                hist[(t.depth[li] as usize).clamp(1, max_depth as usize) - 1] += 1;
            }
            LayerSummary {
                layer,
                mean_depth: tokens.iter().map(|t| t.depth[li] as f64).sum::<f64>() / n,
                step_share: (0..routed)
                    .map(|s| tokens.iter().filter(|t| t.selected[li][s]).count() as f64 / n)
                    .collect(),
                step_weight_mean: (0..routed)
                    .map(|s| {
                        let ws: Vec<f64> = tokens.iter().filter_map(|t| t.weights[li][s]).map(f64::from).collect();
                        (!ws.is_empty()).then(|| ws.iter().sum::<f64>() / ws.len() as f64)
                    })
                    .collect(),
                depth_histogram: hist,
            }
        })
        .collect()
}

/// The text with each token marked by its depth: ANSI colours (deeper = warmer) when `color`,
/// else `token[a.b]` with the steps per thinking layer (see `report::depth_mark`).
pub fn render_terminal(map: &DepthMap, color: bool) -> String {
    let mut out = String::new();
    for t in &map.tokens {
        out.push_str(&crate::apps::report::depth_mark(&t.text, &t.depth, map.max_depth, color));
    }
    if !out.ends_with('\n') {
        out.push('\n');
    }
    let layers: Vec<String> = map.layers.iter().map(|l| format!("layer {l}")).collect();
    out.push_str(&format!(
        "({} tokens, {} routing{}; {} per token: steps in {}; 1 = first pass only, {} = every step)\n",
        map.tokens.len(),
        if map.routing == Routing::TopK { "top-k" } else { "threshold" },
        if map.dropped_tokens > 0 {
            format!(", {} more tokens not analysed", map.dropped_tokens)
        } else {
            String::new()
        },
        if color { "colour" } else { "[a.b]" },
        layers.join(", "),
        map.max_depth
    ));
    for s in &map.summary {
        let share: Vec<String> = s.step_share.iter().map(|x| format!("{:.0}%", 100.0 * x)).collect();
        out.push_str(&format!(
            "layer {}: mean depth {:.2}, share per routed step {}\n",
            s.layer,
            s.mean_depth,
            share.join(" / ")
        ));
    }
    out
}

/// The heat map: tokens (columns, up to 1024, wrapped) x thinking layers (rows).
pub fn heatmap(map: &DepthMap) -> Result<Png> {
    let n = map.tokens.len().min(1024);
    let labels: Vec<String> = map.tokens[..n].iter().map(|t| t.text.clone()).collect();
    let depth: Vec<Vec<u32>> =
        (0..map.layers.len()).map(|l| map.tokens[..n].iter().map(|t| t.depth[l]).collect()).collect();
    let more = if map.tokens.len() > n { format!(" (first {n} of {})", map.tokens.len()) } else { String::new() };
    let title = format!(
        "Thinking steps per token and layer{more}: {} routing, ratios {:?}",
        routing_name(map.routing),
        map.ratios
    );
    plot::depth_heatmap(&title, &labels, &map.layers, &depth, map.max_depth)
}

fn routing_name(r: Routing) -> &'static str {
    match r {
        Routing::TopK => "top-k",
        Routing::Threshold => "threshold",
    }
}

fn css_rgb(d: u32, max: u32) -> String {
    let (r, g, b) = super::depth_rgb(d, max);
    format!("rgb({r},{g},{b})")
}

/// Spans for tokens, coloured by depth, each with a hover box of per-layer detail. Classes:
/// `m{d}` = rounded mean depth over layers, `l{layer}d{d}` = depth in one layer; the page's
/// view switch picks which class colours. Shared with the training report's sample texts.
pub fn token_spans(map: &DepthMap) -> String {
    let mut out = String::new();
    for (i, t) in map.tokens.iter().enumerate() {
        let mean = t.depth.iter().sum::<u32>() as f64 / t.depth.len().max(1) as f64;
        let mut classes = format!("t m{}", mean.round() as u32);
        for (l, d) in map.layers.iter().zip(&t.depth) {
            classes.push_str(&format!(" l{l}d{d}"));
        }
        let mut tip = format!(
            "token {i}: {} (id {}), window {} position {}\n",
            html_escape(&format!("{:?}", t.text)),
            t.id,
            t.window,
            t.position
        );
        for (li, l) in map.layers.iter().enumerate() {
            let steps: Vec<String> = t.weights[li]
                .iter()
                .zip(&t.selected[li])
                .enumerate()
                .map(|(s, (w, sel))| {
                    let w = w.map(|w| format!("{w:.3}")).unwrap_or_else(|| "-".into());
                    format!("t{}: w {w}{}", s + 2, if *sel { " ✓" } else { "" })
                })
                .collect();
            tip.push_str(&format!(
                "layer {l}: {} step{} | {}\n",
                t.depth[li],
                if t.depth[li] == 1 { "" } else { "s" },
                steps.join(", ")
            ));
        }
        let shown = html_escape(&visible(&t.text));
        out.push_str(&format!("<span class=\"{classes}\">{shown}<span class=\"tip\">{}</span></span>", tip.trim_end()));
        if t.text.contains('\n') {
            out.push_str("<br>");
        }
    }
    out
}

/// CSS colouring the classes of `token_spans` under the view classes `v-mean` / `v-l{layer}`.
pub fn depth_css(layers: &[usize], max: u32) -> String {
    let mut css = String::new();
    for d in 1..=max {
        css.push_str(&format!(".v-mean .m{d}{{background:{}}}\n", css_rgb(d, max)));
        for l in layers {
            css.push_str(&format!(".v-l{l} .l{l}d{d}{{background:{}}}\n", css_rgb(d, max)));
        }
    }
    for d in (1..=max).filter(|&d| super::depth_needs_light_text(d, max)) {
        css.push_str(&format!(".v-mean .m{d}{{color:#fff}}\n"));
        for l in layers {
            css.push_str(&format!(".v-l{l} .l{l}d{d}{{color:#fff}}\n"));
        }
    }
    css
}

/// Shared page styling for the analysis pages.
pub const BASE_CSS: &str = "body{font-family:'DejaVu Sans',Verdana,sans-serif;margin:24px;color:#222;max-width:1150px}\
h1{font-size:22px}h2{font-size:17px;margin-top:28px}.meta{color:#555;font-size:13px}\
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}\
th{background:#f2f2f2}td.l,th.l{text-align:left}img{max-width:100%;border:1px solid #ddd}\
.text{font-family:'DejaVu Sans Mono',Menlo,monospace;font-size:15px;line-height:1.9;white-space:pre-wrap;\
border:1px solid #ddd;padding:12px;background:#fff}\
.t{position:relative;border-radius:2px;padding:1px 0;cursor:default}\
.t .tip{display:none;position:absolute;left:0;top:1.6em;z-index:5;background:#222;color:#fff;\
font-size:12px;line-height:1.4;white-space:pre;padding:5px 8px;border-radius:4px;box-shadow:0 2px 6px #0005}\
.t:hover .tip{display:block}.t:hover{outline:2px solid #000}\
.legend span.sw{display:inline-block;width:26px;height:14px;margin:0 4px 0 12px;vertical-align:middle;border:1px solid #aaa}\
.controls{margin:10px 0;font-size:14px}.controls label{margin-right:14px}\n";

fn legend(max: u32) -> String {
    let mut s = String::from("<div class=\"legend\">steps taken:");
    for d in 1..=max {
        s.push_str(&format!("<span class=\"sw\" style=\"background:{}\"></span>{d}", css_rgb(d, max)));
    }
    s.push_str("</div>\n");
    s
}

/// A self-contained HTML page: coloured text (view: mean over layers or one layer), hover
/// detail, per-layer table and the heat map embedded as a PNG.
pub fn render_html(map: &DepthMap, source: &str, heatmap: Option<&Png>) -> String {
    let mut h = String::from("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>ITT thinking depth</title>\n<style>\n");
    h.push_str(BASE_CSS);
    h.push_str(&depth_css(&map.layers, map.max_depth));
    h.push_str("</style>\n</head>\n<body class=\"v-mean\">\n<h1>Thinking depth per token</h1>\n");
    h.push_str(&format!(
        "<p class=\"meta\">{} | {:?} model | {} routing | ratios {:?} | {} steps | windows of {} tokens | {} tokens{}</p>\n",
        html_escape(source),
        map.model_kind,
        routing_name(map.routing),
        map.ratios,
        map.steps,
        map.seq_len,
        map.tokens.len(),
        if map.dropped_tokens > 0 { format!(" ({} more not analysed)", map.dropped_tokens) } else { String::new() }
    ));
    h.push_str("<div class=\"controls\">Colour by: <label><input type=\"radio\" name=\"v\" value=\"mean\" checked onchange=\"document.body.className='v-'+this.value\"> mean over thinking layers</label>");
    for l in &map.layers {
        h.push_str(&format!("<label><input type=\"radio\" name=\"v\" value=\"l{l}\" onchange=\"document.body.className='v-'+this.value\"> layer {l}</label>"));
    }
    h.push_str("</div>\n");
    h.push_str(&legend(map.max_depth));
    h.push_str("<p class=\"meta\">Hover a token for its steps in every thinking layer, the router weight w at each routed step t and whether it was selected (✓).</p>\n");
    h.push_str("<div class=\"text\">");
    h.push_str(&token_spans(map));
    h.push_str("</div>\n<h2>Per thinking layer</h2>\n<table>\n<tr><th class=\"l\">layer</th><th>mean depth</th>");
    for t in 2..=map.steps {
        h.push_str(&format!("<th>share t={t}</th><th>mean w t={t}</th>"));
    }
    h.push_str("<th class=\"l\">tokens per depth 1..T</th></tr>\n");
    for s in &map.summary {
        h.push_str(&format!("<tr><td class=\"l\">{}</td><td>{:.3}</td>", s.layer, s.mean_depth));
        for (sh, w) in s.step_share.iter().zip(&s.step_weight_mean) {
            h.push_str(&format!(
                "<td>{:.1}%</td><td>{}</td>",
                100.0 * sh,
                w.map(|w| format!("{w:.3}")).unwrap_or_else(|| "-".into())
            ));
        }
        h.push_str(&format!("<td class=\"l\">{:?}</td></tr>\n", s.depth_histogram));
    }
    h.push_str("</table>\n");
    if let Some(png) = heatmap {
        h.push_str(&format!("<h2>Heat map</h2>\n<img alt=\"depth heat map\" src=\"{}\">\n", png.data_url()));
    }
    h.push_str("</body>\n</html>\n");
    h
}

/// What `run` wrote.
#[derive(Clone, Debug)]
pub struct DepthOutputs {
    pub map: DepthMap,
    pub json: PathBuf,
    pub png: PathBuf,
    pub html: PathBuf,
}

/// Load a checkpoint, map the depth of `text`, write depth.json, depth.png and depth.html.
pub fn run(ckpt: &Path, text: &str, opts: &DepthOptions, out: &Path) -> Result<DepthOutputs> {
    if text.trim().is_empty() {
        return Err(Error::usage(
            "the text to analyse is empty; give some text with --text or a non-empty --data file",
        ));
    }
    let crate::import::Opened { model, tokenizer: tok, info, .. } =
        crate::import::open(ckpt, &crate::import::OpenOptions::differentiable())?;
    if model.thinking_layers().next().is_none() {
        return Err(Error::checkpoint(
            &info.dir,
            "is a dense model: it has no thinking layers, every token takes exactly one step, so there is no depth to map; \
             give an ITT checkpoint (e.g. trained with --preset tiny-itt4)",
        ));
    }
    let mut opts = opts.clone();
    if opts.routing.mode == Routing::Threshold && opts.routing.calibration.is_none() {
        opts.routing.calibration = info.calibration.clone().map(std::sync::Arc::new);
        if opts.routing.calibration.is_none() && model.has_routers() {
            return Err(Error::checkpoint(
                &info.dir,
                format!("has no router thresholds for threshold routing; run `itt calibrate --checkpoint {}` or use --routing topk", ckpt.display()),
            ));
        }
    }
    opts.seq_len = Some(opts.seq_len.unwrap_or(info.config.train.seq_len));
    let map = depth_map(&model, &tok, text, &opts)?;
    super::prepare_out(out)?;
    let png = heatmap(&map)?;
    let paths =
        DepthOutputs { json: out.join("depth.json"), png: out.join("depth.png"), html: out.join("depth.html"), map };
    write_json(&paths.json, &paths.map)?;
    png.write(&paths.png)?;
    let html = render_html(&paths.map, &info.dir.display().to_string(), Some(&png));
    std::fs::write(&paths.html, html).map_err(|e| Error::input(&paths.html, format!("cannot write: {e}")))?;
    Ok(paths)
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;
    use crate::base::config::ModelKind;

    #[test]
    fn depth_agrees_with_the_models_own_record() {
        let dir = tempfile::tempdir().unwrap();
        let (ck, model, tok) = tiny_run(dir.path(), ModelKind::Itt, 5);
        let text = "347+589=936\nsort 5 3 9 1 = 1 3 5 9\nrev abcde = edcba\n";
        let opts = DepthOptions { seq_len: Some(16), ..Default::default() };
        let map = depth_map(&model, &tok, text, &opts).unwrap();
        assert_eq!(map.tokens.len(), text.chars().count());
        assert_eq!(map.layers, vec![1, 3]);
        // The same windows through the model directly: [eot] + text in windows of 16.
        let mut stream = vec![tok.eot_id()];
        stream.extend(tok.encode(text).unwrap());
        let lens: Vec<usize> = stream.chunks(16).map(|c| c.len()).collect();
        let layout = SeqLayout::with_past(&lens, &vec![0; lens.len()]);
        let x = Tensor::from_slice(&stream, stream.len(), model.device()).unwrap();
        let mut rec = ForwardRecord::with_detail();
        model.forward(&x, &layout, &RoutingOptions::default(), None, Some(&mut rec)).unwrap();
        for (li, l) in map.layers.iter().enumerate() {
            let want = &rec.depth[l][1..];
            let got: Vec<u32> = map.tokens.iter().map(|t| t.depth[li]).collect();
            assert_eq!(got, want, "layer {l}");
            // depth = 1 + the routed steps taken, and the selections are the record's.
            for (i, t) in map.tokens.iter().enumerate() {
                assert_eq!(t.depth[li], 1 + t.selected[li].iter().filter(|&&s| s).count() as u32);
                for s in 0..3 {
                    let in_rec = rec.selections[&(*l, s + 2)].contains(&(i as u32 + 1));
                    assert_eq!(t.selected[li][s], in_rec);
                    assert_eq!(t.weights[li][s], Some(rec.weights[&(*l, s + 2)][i + 1]));
                }
            }
        }
        // Top-k at 0.7 per window: each window of 16 sends ceil(11.2) = 12 tokens on.
        assert!(map.summary.iter().all(|s| s.step_share.iter().all(|&x| (0.6..0.8).contains(&x))), "{:?}", map.summary);
        // Elastic: fewer steps and a skipped step.
        let el = DepthOptions {
            routing: RoutingOptions { ratios: Some(vec![0.5, 0.0]), steps: Some(3), ..Default::default() },
            ..opts.clone()
        };
        let m2 = depth_map(&model, &tok, text, &el).unwrap();
        assert!(m2.tokens.iter().all(|t| t.depth.iter().all(|&d| d <= 2) && t.weights[0][1].is_none()));
        // Terminal text: plain marks when not a terminal, ANSI otherwise.
        let plain = render_terminal(&map, false);
        assert!(plain.starts_with(&format!("3[{}.{}]", map.tokens[0].depth[0], map.tokens[0].depth[1])), "{plain}");
        assert!(!plain.contains('\x1b'));
        assert!(render_terminal(&map, true).contains("\x1b[38;5;"));
        drop(ck);
    }

    #[test]
    fn run_writes_json_png_html_and_rejects_bad_input() {
        let dir = tempfile::tempdir().unwrap();
        let (ck, _, _) = tiny_run(&dir.path().join("itt"), ModelKind::Itt, 1);
        let out = dir.path().join("out");
        let text = "12+34=46\n<b>&\"quotes\"</b> count a in abc = 1\n";
        for routing in [Routing::TopK, Routing::Threshold] {
            let opts =
                DepthOptions { routing: RoutingOptions { mode: routing, ..Default::default() }, ..Default::default() };
            let r = run(&ck, text, &opts, &out).unwrap();
            assert_eq!(r.map.routing, routing);
            assert_png(&r.png, 2000);
            let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&r.json).unwrap()).unwrap();
            assert_eq!(json["layers"], serde_json::json!([1, 3]));
            let toks = json["tokens"].as_array().unwrap();
            assert_eq!(toks.len(), text.len());
            for t in toks {
                assert!(t["id"].is_u64() && t["text"].is_string());
                assert_eq!(t["depth"].as_array().unwrap().len(), 2);
                assert_eq!(t["weights"][0].as_array().unwrap().len(), 3);
            }
            let html = std::fs::read_to_string(&r.html).unwrap();
            assert_well_formed_html(&html);
            assert!(html.contains("data:image/png;base64,") && html.contains("&lt;") && !html.contains("<b>"));
        }
        // Empty text, and a dense checkpoint, are refused with a reason.
        let e = run(&ck, " \n", &DepthOptions::default(), &out).unwrap_err().to_string();
        assert!(e.contains("empty"), "{e}");
        let (dense, _, _) = tiny_run(&dir.path().join("dense"), ModelKind::Dense, 1);
        let e = run(&dense, "12+34=46", &DepthOptions::default(), &out).unwrap_err().to_string();
        assert!(e.contains("dense model") && e.contains("ITT checkpoint"), "{e}");
    }
}
