//! `itt experiment NAME`: the paper's comparisons at small scale (ITT-SPEC §8), each a grid
//! of training runs over several seeds, written as `results.json`, a markdown table with
//! mean ± standard deviation, FLOPs per token and wall time, and PNG loss curves.
//!
//! - `table1`: dense vs Loop x4 vs ITT x4 at equal parameters and tokens (paper Table 1);
//! - `table2`: one ITT x4 per seed evaluated at the paper's ratio settings, plus Loop x4
//!   (paper Table 2, elastic inference);
//! - `table3`: ITT x4 vs without RTC / ATR / TSE, and dense (paper Table 3);
//! - `fig4`: validation loss against tokens seen; the share of tokens ITT x4 needs to reach
//!   the dense model's final loss (paper Figure 4: 56.8%);
//! - `scaling`: dense and ITT x4 at two or more sizes.
//!
//! Runs live in `OUT/runs/VARIANT-sSEED` and results in `OUT/NAME/`; a finished run is reused
//! and a partial one resumed, so an interrupted experiment continues where it stopped, and
//! experiments sharing an `OUT` train each configuration once.

use crate::config::{self, RunConfig};
use crate::error::IoContext;
use crate::flops::flops_per_token;
use crate::model::RoutingOptions;
use crate::train::{self, DataSpec, RunOptions, Trainer};
use crate::{checkpoint, data, eval, Error, Result};
use serde::Serialize;
use std::path::{Path, PathBuf};

pub const NAMES: [&str; 5] = ["table1", "table2", "table3", "fig4", "scaling"];

#[derive(Clone, Debug)]
pub struct ExperimentOptions {
    pub name: String,
    /// Model size, e.g. `tiny` (scaling: the sizes to compare).
    pub sizes: Vec<String>,
    pub data: DataSpec,
    pub seeds: usize,
    pub steps: Option<usize>,
    pub batch_size: Option<usize>,
    pub seq_len: Option<usize>,
    /// Validation batches per evaluation (0 = the whole split).
    pub eval_batches: usize,
    pub out: PathBuf,
    pub quiet: bool,
}

/// One trained configuration of the grid.
struct Variant {
    name: String,
    label: String,
    cfg: RunConfig,
    /// Inference settings evaluated on each trained model: (label, ratios override).
    evals: Vec<(String, Option<Vec<f64>>)>,
    /// The paper's number for this row, and what it is.
    paper: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct RunResult {
    pub variant: String,
    pub setting: String,
    pub seed: u64,
    pub val_loss: f64,
    pub train_loss: f64,
    pub params: usize,
    pub train_flops_per_token: f64,
    pub eval_flops_per_token: f64,
    pub wall_s: f64,
    pub tokens: u64,
    pub routed_share: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub label: String,
    pub setting: String,
    pub val_loss_mean: f64,
    pub val_loss_std: f64,
    pub val_ppl_mean: f64,
    pub params: usize,
    pub eval_flops_per_token: f64,
    pub flops_vs_dense: f64,
    pub wall_s_mean: f64,
    pub seeds: usize,
    pub paper: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ExperimentResults {
    pub name: String,
    pub paper_metric: String,
    pub rows: Vec<Row>,
    pub runs: Vec<RunResult>,
    /// fig4: share of the dense run's tokens ITT needs to reach dense's final loss.
    pub data_share_to_match_dense: Option<f64>,
    pub curves: Vec<Curve>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Curve {
    pub label: String,
    /// (tokens seen, validation loss) averaged over seeds.
    pub points: Vec<(f64, f64)>,
}

fn sized(size: &str, suffix: &str, opts: &ExperimentOptions) -> Result<RunConfig> {
    let mut cfg = config::preset(&format!("{size}{suffix}"))?;
    let t = &mut cfg.train;
    if let Some(s) = opts.steps {
        t.max_steps = s;
        t.warmup_steps = t.warmup_steps.min(s / 10 + 1);
    }
    if let Some(b) = opts.batch_size {
        t.batch_size = b;
    }
    if let Some(l) = opts.seq_len {
        t.seq_len = l;
    }
    // Ten validations per run give the loss curves of fig4.
    t.eval_interval = (t.max_steps / 10).max(1);
    t.eval_batches = opts.eval_batches;
    t.log_interval = (t.max_steps / 50).max(1);
    Ok(cfg)
}

const PAPER_T2: [(&str, [f64; 3], f64); 5] = [
    ("70/70/70", [0.7, 0.7, 0.7], 10.52),
    ("50/50/50", [0.5, 0.5, 0.5], 10.47),
    ("70/70/90", [0.7, 0.7, 0.9], 10.21),
    ("90/90/90", [0.9, 0.9, 0.9], 10.27),
    ("90/90/0", [0.9, 0.9, 0.0], 10.40),
];

fn variants(opts: &ExperimentOptions) -> Result<(Vec<Variant>, String)> {
    let size = opts.sizes.first().map(String::as_str).unwrap_or("tiny");
    let v = |name: &str, label: &str, cfg: RunConfig, paper: Option<f64>| Variant {
        name: name.into(),
        label: label.into(),
        cfg,
        evals: vec![("trained".into(), None)],
        paper,
    };
    Ok(match opts.name.as_str() {
        "table1" | "fig4" => (
            vec![
                v("dense", "Dense", sized(size, "", opts)?, Some(40.4)),
                v("loop4", "Loop x4", sized(size, "-loop4", opts)?, Some(40.7)),
                v("itt4", "ITT x4", sized(size, "-itt4", opts)?, Some(42.1)),
            ],
            "162M avg accuracy of 10 tasks (paper Table 1; higher is better)".into(),
        ),
        "table2" => {
            let mut itt = v("itt4", "ITT x4", sized(size, "-itt4", opts)?, None);
            itt.evals = PAPER_T2.iter().map(|(l, r, _)| (l.to_string(), Some(r.to_vec()))).collect();
            (
                vec![itt, v("loop4", "Loop x4 (100/100/100)", sized(size, "-loop4", opts)?, Some(10.78))],
                "162M validation PPL (paper Table 2; lower is better)".into(),
            )
        }
        "table3" => {
            let base = sized(size, "-itt4", opts)?;
            let mut no_rtc = base.clone();
            no_rtc.model.thinking.residual_connection = false;
            let mut no_atr = base.clone();
            no_atr.model.thinking.adaptive_routing = false;
            no_atr.model.thinking.ratios = vec![1.0; 3];
            let mut no_tse = base.clone();
            no_tse.model.thinking.step_encoding = false;
            (
                vec![
                    v("itt4", "ITT x4", base, Some(10.25)),
                    v("itt4-no-rtc", "without RTC", no_rtc, Some(11.02)),
                    v("itt4-no-atr", "without ATR", no_atr, Some(10.44)),
                    v("itt4-no-tse", "without TSE", no_tse, Some(10.56)),
                    v("dense", "Dense", sized(size, "", opts)?, Some(11.13)),
                ],
                "162M PPL (paper Table 3; lower is better)".into(),
            )
        }
        "scaling" => {
            let mut out = vec![];
            let paper = [("tiny", 0), ("small", 1)];
            let sizes = if opts.sizes.len() >= 2 { opts.sizes.clone() } else { vec!["tiny".into(), "small".into()] };
            for s in &sizes {
                let idx = paper.iter().find(|p| p.0 == s).map(|p| p.1);
                let (pd, pi) = match idx {
                    Some(0) => (Some(40.4), Some(42.1)),
                    Some(1) => (Some(41.8), Some(43.9)),
                    _ => (None, None),
                };
                out.push(v(&format!("{s}-dense"), &format!("{s} dense"), sized(s, "", opts)?, pd));
                out.push(v(&format!("{s}-itt4"), &format!("{s} ITT x4"), sized(s, "-itt4", opts)?, pi));
            }
            (out, "avg accuracy at 162M/230M (paper Table 1; sizes are not comparable)".into())
        }
        other => return Err(Error::usage(format!("unknown experiment '{other}'; known: {}", NAMES.join(", ")))),
    })
}

/// Train (or reuse, or resume) one run of a variant.
fn train_one(
    cfg: &RunConfig,
    run_dir: &Path,
    dataset: &data::Dataset,
    tok: &data::Tokenizer,
    quiet: bool,
) -> Result<Trainer> {
    if run_dir.join("latest").exists() {
        let mut t = Trainer::resume(run_dir, None)?;
        if t.cfg != *cfg {
            return Err(Error::usage(format!(
                "{} was trained with another configuration; remove it or choose another --out",
                run_dir.display()
            )));
        }
        if t.state.step < cfg.train.max_steps {
            train::run(&mut t, dataset, &RunOptions { quiet, stop_at: None })?;
        }
        return Ok(t);
    }
    let mut t = Trainer::new(cfg.clone(), tok, run_dir)?;
    train::run(&mut t, dataset, &RunOptions { quiet, stop_at: None })?;
    Ok(t)
}

fn val_curve(run_dir: &Path) -> Vec<(f64, f64)> {
    let Ok(text) = std::fs::read_to_string(run_dir.join("metrics.jsonl")) else { return vec![] };
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| Some((v.get("tokens_seen")?.as_f64()?, v.get("val_loss")?.as_f64()?)))
        .collect()
}

fn mean_std(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    let m = xs.iter().sum::<f64>() / n;
    let var = if xs.len() > 1 { xs.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / (n - 1.0) } else { 0.0 };
    (m, var.sqrt())
}

/// Tokens at which a curve first reaches `target` (linear interpolation), if it does.
fn tokens_to_reach(points: &[(f64, f64)], target: f64) -> Option<f64> {
    let mut prev: Option<(f64, f64)> = None;
    for &(t, l) in points {
        if l <= target {
            return Some(match prev {
                Some((t0, l0)) if l0 > l => t0 + (t - t0) * (l0 - target) / (l0 - l),
                _ => t,
            });
        }
        prev = Some((t, l));
    }
    None
}

pub fn run(opts: &ExperimentOptions) -> Result<ExperimentResults> {
    if opts.seeds == 0 {
        return Err(Error::usage("--seeds must be at least 1"));
    }
    let (variants, paper_metric) = variants(opts)?;
    std::fs::create_dir_all(&opts.out).at(&opts.out)?;
    // Every experiment in one --out folder shares its data and its runs: table1, table2,
    // table3 and fig4 train the same dense / Loop / ITT configurations once.
    let data_dir = opts.out.join("data");
    let (dataset, tok) = match data::Dataset::open(&data_dir) {
        Ok(ds) if ds.meta.source == opts.data.path => {
            let tok = ds.load_tokenizer()?;
            (ds, tok)
        }
        _ => train::prepare_data(&opts.data, &data_dir)?,
    };
    let mut runs = vec![];
    let mut rows = vec![];
    let mut curves = vec![];
    for var in &variants {
        let mut cfg = var.cfg.clone();
        cfg.model.vocab_size = tok.vocab_size();
        let mut per_setting: Vec<Vec<RunResult>> = vec![vec![]; var.evals.len()];
        let mut seed_curves = vec![];
        for s in 0..opts.seeds {
            let mut cfg = cfg.clone();
            cfg.train.seed = 1000 + s as u64;
            cfg.validate()?;
            let run_dir = opts.out.join("runs").join(format!("{}-s{}", var.name, s));
            if !opts.quiet {
                eprintln!("[{}] {} seed {}: {}", opts.name, var.label, s, run_dir.display());
            }
            let t = train_one(&cfg, &run_dir, &dataset, &tok, opts.quiet)?;
            seed_curves.push(val_curve(&run_dir));
            for (k, (setting, ratios)) in var.evals.iter().enumerate() {
                let routing = RoutingOptions { ratios: ratios.clone(), ..Default::default() };
                let mut rec = crate::model::ForwardRecord::default();
                let val = eval::shard_loss_recorded(
                    &t.model,
                    &dataset.val,
                    cfg.train.batch_size,
                    cfg.train.seq_len,
                    opts.eval_batches,
                    &routing,
                    &mut rec,
                )?;
                let routed = (!rec.stats.is_empty()).then(|| {
                    let (sel, cand) =
                        rec.stats.values().fold((0u64, 0u64), |a, s| (a.0 + s.selected, a.1 + s.candidates));
                    sel as f64 / cand.max(1) as f64
                });
                let f = flops_per_token(&cfg.model, cfg.train.seq_len, None, ratios.as_deref());
                per_setting[k].push(RunResult {
                    variant: var.label.clone(),
                    setting: setting.clone(),
                    seed: cfg.train.seed,
                    val_loss: val,
                    train_loss: t.state.last_train_loss.unwrap_or(f64::NAN),
                    params: t.model.n_params(),
                    train_flops_per_token: flops_per_token(&cfg.model, cfg.train.seq_len, None, None).train,
                    eval_flops_per_token: f.forward,
                    wall_s: t.state.elapsed_s,
                    tokens: t.state.tokens_seen,
                    routed_share: routed,
                });
            }
            let _ = checkpoint::resolve(&run_dir)?;
        }
        // Average the validation curves over seeds (same eval points in every seed).
        let n_pts = seed_curves.iter().map(Vec::len).min().unwrap_or(0);
        let points = (0..n_pts)
            .map(|i| (seed_curves[0][i].0, seed_curves.iter().map(|c| c[i].1).sum::<f64>() / seed_curves.len() as f64))
            .collect();
        curves.push(Curve { label: var.label.clone(), points });
        for (k, results) in per_setting.into_iter().enumerate() {
            let losses: Vec<f64> = results.iter().map(|r| r.val_loss).collect();
            let (m, sd) = mean_std(&losses);
            let paper = if opts.name == "table2" && var.name == "itt4" { Some(PAPER_T2[k].2) } else { var.paper };
            let ef = results[0].eval_flops_per_token;
            let ratios = var.evals[k].1.as_deref();
            let vs_dense = flops_per_token(&cfg.model, cfg.train.seq_len, None, ratios).ratio_to_dense;
            rows.push(Row {
                label: var.label.clone(),
                setting: results[0].setting.clone(),
                val_loss_mean: m,
                val_loss_std: sd,
                val_ppl_mean: losses.iter().map(|l| l.exp()).sum::<f64>() / losses.len() as f64,
                params: results[0].params,
                eval_flops_per_token: ef,
                flops_vs_dense: vs_dense,
                wall_s_mean: results.iter().map(|r| r.wall_s).sum::<f64>() / results.len() as f64,
                seeds: results.len(),
                paper,
            });
            runs.extend(results);
        }
    }
    let data_share = if opts.name == "fig4" || opts.name == "table1" {
        let dense = curves.iter().find(|c| c.label == "Dense");
        let itt = curves.iter().find(|c| c.label == "ITT x4");
        match (dense, itt) {
            (Some(d), Some(i)) => {
                d.points.last().and_then(|&(total, target)| tokens_to_reach(&i.points, target).map(|t| t / total))
            }
            _ => None,
        }
    } else {
        None
    };
    let results = ExperimentResults {
        name: opts.name.clone(),
        paper_metric,
        rows,
        runs,
        data_share_to_match_dense: data_share,
        curves,
    };
    write_outputs(&results, opts)?;
    Ok(results)
}

pub fn markdown(r: &ExperimentResults, opts: &ExperimentOptions) -> String {
    let mut s = format!(
        "## {} — {} on {}, {} seed(s)\n\n| model | setting | val loss (mean ± sd) | val PPL | params | forward FLOPs/token | vs dense | train wall s | paper: {} |\n|---|---|---|---|---|---|---|---|---|\n",
        r.name,
        opts.sizes.join(", "),
        opts.data.path,
        opts.seeds,
        r.paper_metric
    );
    for row in &r.rows {
        s.push_str(&format!(
            "| {} | {} | {:.4} ± {:.4} | {:.3} | {:.3}M | {:.2}M | {:.2}x | {:.0} | {} |\n",
            row.label,
            row.setting,
            row.val_loss_mean,
            row.val_loss_std,
            row.val_ppl_mean,
            row.params as f64 / 1e6,
            row.eval_flops_per_token / 1e6,
            row.flops_vs_dense,
            row.wall_s_mean,
            row.paper.map(|p| format!("{p}")).unwrap_or_else(|| "–".into())
        ));
    }
    if let Some(share) = r.data_share_to_match_dense {
        s.push_str(&format!(
            "\nITT x4 reaches the dense model's final validation loss after {:.1}% of the tokens (paper Figure 4: 56.8%).\n",
            100.0 * share
        ));
    } else if r.name == "fig4" {
        s.push_str("\nITT x4 did not reach the dense model's final validation loss within the run.\n");
    }
    s
}

fn write_outputs(r: &ExperimentResults, opts: &ExperimentOptions) -> Result<()> {
    let dir = opts.out.join(&r.name);
    std::fs::create_dir_all(&dir).at(&dir)?;
    let json = dir.join("results.json");
    std::fs::write(&json, serde_json::to_string_pretty(r).unwrap()).at(&json)?;
    let md = dir.join("results.md");
    std::fs::write(&md, markdown(r, opts)).at(&md)?;
    use crate::analysis::plot::{self, Panel, Series};
    let series: Vec<Series> = r
        .curves
        .iter()
        .enumerate()
        .map(|(i, c)| Series::new(&c.label, c.points.clone(), plot::color(i)).with_markers())
        .collect();
    let mut panels = vec![Panel::Line {
        title: format!("{}: validation loss (mean of {} seeds)", r.name, opts.seeds),
        x_label: "tokens seen".into(),
        y_label: "validation loss (nats/token)".into(),
        series,
        x_ticks: None,
    }];
    if r.name == "table2" {
        // Elastic inference: loss against inference FLOPs for each ratio setting.
        let mut pts: Vec<(f64, f64)> = r.rows.iter().map(|row| (row.flops_vs_dense, row.val_loss_mean)).collect();
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        panels.push(Panel::Line {
            title: "loss against compute (each point a ratio setting)".into(),
            x_label: "forward FLOPs / dense".into(),
            y_label: "validation loss".into(),
            series: vec![Series::new("settings", pts, plot::color(0)).with_markers()],
            x_ticks: None,
        });
    }
    let cols = panels.len();
    plot::grid(&format!("itt experiment {}", r.name), &panels, cols, (640, 400))?.write(&dir.join("loss.png"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reaching_a_target_interpolates() {
        let pts = [(0.0, 4.0), (100.0, 3.0), (200.0, 2.0)];
        assert_eq!(tokens_to_reach(&pts, 2.5), Some(150.0));
        assert_eq!(tokens_to_reach(&pts, 1.0), None);
        let (m, s) = mean_std(&[1.0, 2.0, 3.0]);
        assert_eq!((m, s), (2.0, 1.0));
    }
}
