//! `itt experiment NAME`: the paper's comparisons at small scale (docs/DESIGN.md §8), each a
//! grid of training runs over several seeds, written as `results.json`, a markdown table and
//! PNG loss curves.
//!
//! - `table1`: dense vs Loop x4 vs ITT x4 at equal parameters and tokens (paper Table 1);
//! - `table2`: one ITT x4 per seed evaluated at the paper's ratio settings, plus Loop x4
//!   (paper Table 2, elastic inference);
//! - `table3`: ITT x4 vs without RTC / ATR / TSE, and dense (paper Table 3);
//! - `fig4`: validation loss against tokens seen; the share of tokens each model needs to
//!   reach the dense model's final loss (paper Figure 4: 56.8% for ITT);
//! - `scaling`: dense and ITT x4 at two or more sizes;
//! - `steps`: dense, Loop x2/x3/x4 and ITT x2/x3/x4 (paper Figure 5, Table 1's step rows);
//! - `recipe`: the thinking-recipe search of DESIGN §9 (residual form, step scale, router
//!   input, optimiser group, capacity warm-up, router auxiliary loss) against dense and Loop.
//!
//! Every model with thinking layers is also scored with its thinking off (same weights, one
//! step: the routed steps skipped), giving the *thinking gain* loss(off) - loss(on); ITT with
//! routers is scored both with the paper's top-k (not causal) and with causal threshold
//! routing. Against dense, each row reports the paired per-seed difference with its 95%
//! t-interval (runs of one seed share the backbone's initial weights and the data order). On
//! the built-in corpus each model also answers held-out problems (`eval::reasoning`).
//!
//! Runs live in `OUT/runs/VARIANT-sSEED` and results in `OUT/NAME/`; a finished run is reused
//! and a partial one resumed, so an interrupted experiment continues where it stopped, and
//! experiments sharing an `OUT` train each configuration once.

use crate::base::config::{self, ModelKind, ResidualForm, RoutedAttention, RunConfig};
use crate::base::error::IoContext;
use crate::base::util::write_atomic;
use crate::eval::reasoning::{self, SolveRates};
use crate::flops::{flops_per_token, Flops};
use crate::model::{Routing, RoutingOptions};
use crate::train::{self, DataSpec, RunOptions, Trainer};
use crate::{checkpoint, data, eval, Error, Result};
use serde::Serialize;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub const NAMES: [&str; 7] = ["table1", "table2", "table3", "fig4", "scaling", "steps", "recipe"];

#[derive(Clone, Debug)]
pub struct ExperimentOptions {
    pub name: String,
    /// Model size, e.g. `tiny` (scaling: the sizes to compare).
    pub sizes: Vec<String>,
    /// The corpora (each with its tokenizer). With one, its data and runs live in `OUT/data`
    /// and `OUT/runs`; with several, each in `OUT/CORPUS` (`Corpus::name`), and the results
    /// hold a table per corpus and one pooled over them.
    pub data: Vec<DataSpec>,
    pub seeds: usize,
    pub steps: Option<usize>,
    pub batch_size: Option<usize>,
    pub seq_len: Option<usize>,
    /// Validation batches per evaluation (0 = the whole split).
    pub eval_batches: usize,
    /// Held-out problems of each kind for the reasoning column (built-in data only; 0 = none).
    pub problems: usize,
    /// Run only the variants of these names (empty: the whole grid).
    pub variants: Vec<String>,
    /// Learning-rate multipliers (of each variant's preset rate); several make a sweep in which
    /// every model is also reported at its own best rate.
    pub lr_scales: Vec<f64>,
    pub out: PathBuf,
    /// Runs trained at once, each on its share of rayon's threads (CPU only; 1 = one after
    /// another on all threads). Results do not depend on it.
    pub jobs: usize,
    pub quiet: bool,
    /// Where the runs train and are scored (DESIGN §15).
    pub device: candle_core::Device,
    /// The command line that ran this, written into results.md.
    pub command: String,
}

impl Default for ExperimentOptions {
    fn default() -> Self {
        ExperimentOptions {
            name: "table1".into(),
            sizes: vec!["tiny".into()],
            data: vec![DataSpec::default()],
            seeds: 3,
            steps: None,
            batch_size: None,
            seq_len: None,
            eval_batches: 0,
            problems: 40,
            variants: vec![],
            lr_scales: vec![1.0],
            out: PathBuf::from("runs/experiments"),
            jobs: 1,
            quiet: false,
            device: candle_core::Device::Cpu,
            command: String::new(),
        }
    }
}

/// One corpus of an experiment: its data spec, a short name, and the folder of its data and runs.
#[derive(Clone, Debug)]
pub struct Corpus {
    /// File stem and tokenizer, e.g. `moby-dick-char`, `sotu-bpe1024`, `builtin`.
    pub name: String,
    pub spec: DataSpec,
    pub dir: PathBuf,
}

impl Corpus {
    /// The corpora of `opts`, each with its folder.
    pub fn all(opts: &ExperimentOptions) -> Result<Vec<Corpus>> {
        if opts.data.is_empty() {
            return Err(Error::usage("--data needs at least one corpus"));
        }
        let mut out: Vec<Corpus> = vec![];
        for spec in &opts.data {
            // A missing corpus is named before the output folder is made (reading it comes later).
            let path = Path::new(&spec.path);
            if !spec.path.starts_with("builtin") && !path.exists() {
                return Err(crate::data::corpus::missing_corpus(path));
            }
            let name = corpus_name(spec);
            if out.iter().any(|c| c.name == name) {
                return Err(Error::usage(format!("corpus '{name}' is given twice in --data / --tokenizer")));
            }
            let dir = if opts.data.len() == 1 { opts.out.clone() } else { opts.out.join(&name) };
            out.push(Corpus { name, spec: spec.clone(), dir });
        }
        Ok(out)
    }
}

/// `builtin`, or the corpus's file or folder stem followed by its tokenizer (`bpe:1024` ->
/// `bpe1024`, a tokenizer file -> its stem).
pub fn corpus_name(spec: &DataSpec) -> String {
    if spec.path == "builtin" {
        return "builtin".into();
    }
    let stem = |p: &str| -> String {
        let name = Path::new(p.trim_end_matches('/')).file_name().map(|n| n.to_string_lossy().into_owned());
        let name = name.unwrap_or_else(|| p.to_string());
        let mut s = name.as_str();
        for ext in [".gz", ".jsonl", ".txt", ".json"] {
            s = s.strip_suffix(ext).unwrap_or(s);
        }
        s.to_string()
    };
    let tok = match spec.tokenizer.as_str() {
        t @ ("char" | "byte") => t.to_string(),
        t if t.starts_with("bpe:") => t.replace(':', ""),
        t => stem(t),
    };
    format!("{}-{tok}", stem(&spec.path))
}

/// What a setting measures, for the derived columns.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// As trained (ITT: the paper's top-k routing).
    Trained,
    /// ITT with causal threshold routing at the trained ratios.
    Causal,
    /// Same weights, thinking off: one step, the routed (or looped) steps skipped.
    Off,
    /// ITT at other ratios (paper Table 2).
    Elastic,
}

/// One way of scoring a trained model.
#[derive(Clone, Debug)]
struct Setting {
    label: String,
    role: Role,
    routing: RoutingOptions,
    /// Paper Table 2's number for this setting.
    paper: Option<f64>,
}

/// One trained configuration of the grid.
#[derive(Clone)]
struct Variant {
    name: String,
    /// The name without a learning-rate suffix (what `--variants` selects).
    model: String,
    lr_scale: f64,
    label: String,
    cfg: RunConfig,
    /// Extra settings (elastic ratios) beyond the standard trained / causal / off.
    extra: Vec<Setting>,
    /// The paper's number for this row.
    paper: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct RunResult {
    pub corpus: String,
    pub variant: String,
    /// The variant's name without its learning-rate suffix.
    pub model: String,
    pub lr_scale: f64,
    pub setting: String,
    pub role: Role,
    pub seed: u64,
    pub val_loss: f64,
    pub train_loss: f64,
    pub params: usize,
    pub train_flops_per_token: f64,
    pub eval_flops_per_token: f64,
    pub wall_s: f64,
    pub tokens: u64,
    pub routed_share: Option<f64>,
    /// Held-out problems solved (built-in data, settings Trained for dense/Loop, Causal for
    /// ITT, and Off).
    pub solved: Option<SolveRates>,
}

/// A mean with the half-width of its 95% t-interval over seeds (None with one seed).
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Estimate {
    pub mean: f64,
    pub sd: f64,
    pub n: usize,
    pub ci95: Option<f64>,
}

impl Estimate {
    pub fn of(xs: &[f64]) -> Estimate {
        let (mean, sd) = mean_std(xs);
        let ci95 = (xs.len() > 1).then(|| t_975(xs.len() - 1) * sd / (xs.len() as f64).sqrt());
        Estimate { mean, sd, n: xs.len(), ci95 }
    }
    /// Whether the 95% interval excludes 0.
    pub fn excludes_zero(&self) -> bool {
        self.ci95.is_some_and(|h| self.mean.abs() > h)
    }
    fn text(&self, digits: usize) -> String {
        match self.ci95 {
            Some(h) => {
                format!("{:+.*} [{:+.*}, {:+.*}]", digits, self.mean, digits, self.mean - h, digits, self.mean + h)
            }
            None => format!("{:+.*}", digits, self.mean),
        }
    }
}

/// The 0.975 quantile of Student's t with `df` degrees of freedom.
pub fn t_975(df: usize) -> f64 {
    const T: [f64; 30] = [
        12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
    ];
    match df {
        0 => f64::NAN,
        1..=30 => T[df - 1],
        _ => 1.96,
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Row {
    /// The corpus, or `pooled` for the rows pooled over corpora.
    pub corpus: String,
    pub variant: String,
    pub label: String,
    pub setting: String,
    pub role: Role,
    pub val_loss_mean: f64,
    pub val_loss_std: f64,
    pub val_ppl_mean: f64,
    /// Paired per-seed loss difference to dense (this - dense), when the grid has dense.
    pub vs_dense: Option<Estimate>,
    /// Paired per-seed thinking gain loss(off) - loss(this), for Trained and Causal rows.
    pub thinking_gain: Option<Estimate>,
    /// Mean share of held-out problems solved (built-in data).
    pub solved: Option<f64>,
    pub params: usize,
    pub eval_flops_per_token: f64,
    pub flops_vs_dense: f64,
    pub wall_s_mean: f64,
    /// Share of the dense run's tokens this model needed to reach dense's final validation
    /// loss (seed-averaged curves; Trained rows).
    pub tokens_to_dense: Option<f64>,
    pub seeds: usize,
    pub paper: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ExperimentResults {
    pub name: String,
    pub command: String,
    pub paper_metric: String,
    pub rows: Vec<Row>,
    pub runs: Vec<RunResult>,
    /// fig4 / table1: share of the dense run's tokens ITT x4 needs to reach dense's final loss.
    pub data_share_to_match_dense: Option<f64>,
    pub curves: Vec<Curve>,
    pub corpora: Vec<String>,
    /// With a learning-rate sweep: every model at its own best rate, per corpus and pooled.
    pub best_lr: Vec<BestLr>,
    /// Each thinking model's per-token loss minus dense's, by token class (paired seeds).
    pub token_classes: Vec<ClassSummary>,
}

/// A model at the learning rate that gave it the lowest mean validation loss on a corpus.
#[derive(Clone, Debug, Serialize)]
pub struct BestLr {
    pub corpus: String,
    pub model: String,
    pub label: String,
    pub lr_scale: f64,
    pub lr: f64,
    pub val_loss_mean: f64,
    /// Paired per-seed difference to dense at dense's own best rate (pooled: over every
    /// corpus and seed).
    pub vs_dense: Option<Estimate>,
    pub flops_vs_dense: f64,
}

/// One token class's loss difference (thinking model - dense of the same seed), over seeds.
#[derive(Clone, Debug, Serialize)]
pub struct ClassSummary {
    pub corpus: String,
    pub variant: String,
    pub group: String,
    pub class: String,
    /// Mean share of the validation positions in this class.
    pub share: f64,
    pub dense_loss: f64,
    pub loss: f64,
    pub diff: Estimate,
    /// share x diff, averaged over seeds: the class's part of the whole difference.
    pub contribution: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Curve {
    pub corpus: String,
    pub variant: String,
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
    // Ten validations per run give the loss curves of fig4; a checkpoint at each (the newest
    // kept) lets a killed grid continue where it stopped instead of retraining the run.
    t.eval_interval = (t.max_steps / 10).max(1);
    t.checkpoint_interval = t.eval_interval;
    t.keep_checkpoints = 1;
    t.eval_batches = opts.eval_batches;
    t.log_interval = (t.max_steps / 50).max(1);
    Ok(cfg)
}

/// Dense at about ITT x4's FLOPs per token: twice the layers (and parameters), the
/// equal-compute baseline of Mixture-of-Recursions' comparisons.
fn deeper(size: &str, opts: &ExperimentOptions) -> Result<RunConfig> {
    let mut cfg = sized(size, "", opts)?;
    cfg.model.n_layers *= 2;
    Ok(cfg)
}

const PAPER_T2: [(&str, [f64; 3], f64); 5] = [
    ("70/70/70", [0.7, 0.7, 0.7], 10.52),
    ("50/50/50", [0.5, 0.5, 0.5], 10.47),
    ("70/70/90", [0.7, 0.7, 0.9], 10.21),
    ("90/90/90", [0.9, 0.9, 0.9], 10.27),
    ("90/90/0", [0.9, 0.9, 0.0], 10.40),
];

/// A recipe of the search (DESIGN §9), every field set explicitly so that the variant does not
/// move when the presets' defaults do.
struct Recipe {
    name: &'static str,
    label: &'static str,
    form: ResidualForm,
    phi_init: f64,
    ratio: f64,
    router_norm: bool,
    attention: RoutedAttention,
    lr_scale: f64,
    warmup: f64,
    aux: f64,
    /// The layers that think; `None` = every other layer (DESIGN §2).
    layers: Option<&'static [usize]>,
    /// alpha, the fixed factor beside the router weight (DESIGN §3.3).
    step_scale: f64,
}

const fn recipe(name: &'static str, label: &'static str, ratio: f64) -> Recipe {
    Recipe {
        name,
        label,
        form: ResidualForm::Update,
        phi_init: 1.0,
        ratio,
        router_norm: false,
        attention: RoutedAttention::Selected,
        lr_scale: 1.0,
        warmup: 0.0,
        aux: 0.0,
        layers: None,
        step_scale: 1.0,
    }
}

/// r-norm70 with one thing changed (the text search of DESIGN §9).
const fn normed(name: &'static str, label: &'static str, ratio: f64) -> Recipe {
    Recipe { router_norm: true, ..recipe(name, label, ratio) }
}

const RECIPES: [Recipe; 18] = [
    Recipe {
        form: ResidualForm::Literal,
        phi_init: 0.1,
        ..recipe("r-literal", "literal, φ 0.1, 70% (the old default)", 0.7)
    },
    recipe("r-update50", "update, φ 1, 50%", 0.5),
    recipe("r-update70", "update, φ 1, 70%", 0.7),
    recipe("r-update100", "update, φ 1, 100% (routers weigh, all tokens)", 1.0),
    Recipe {
        attention: RoutedAttention::All,
        ..recipe("r-all70", "update, φ 1, 70%, routed tokens attend to all", 0.7)
    },
    Recipe { router_norm: true, ..recipe("r-norm70", "update, φ 1, 70%, router RMSNorm", 0.7) },
    Recipe { router_norm: true, aux: 0.1, ..recipe("r-aux70", "... + router aux loss 0.1", 0.7) },
    Recipe { router_norm: true, warmup: 0.25, ..recipe("r-warm70", "... + capacity warm-up 25%", 0.7) },
    Recipe { router_norm: true, lr_scale: 5.0, ..recipe("r-lr70", "... + thinking lr x5", 0.7) },
    // The text search (docs/EXPERIMENTS.md, "Adaptive depth on natural text"): r-norm70 with
    // one change each.
    normed("r-norm30", "r-norm70 at 30%", 0.3),
    normed("r-norm50", "r-norm70 at 50%", 0.5),
    normed("r-norm90", "r-norm70 at 90%", 0.9),
    Recipe { attention: RoutedAttention::All, ..normed("r-normall70", "... + routed tokens attend to all", 0.7) },
    Recipe { step_scale: 2.0, ..normed("r-scale2", "... + step scale 2 (w phi = 1 at init)", 0.7) },
    Recipe { layers: Some(&[1, 2]), ..normed("r-mid70", "... thinking in the middle layers 1, 2", 0.7) },
    Recipe { layers: Some(&[1]), ..normed("r-one70", "... thinking in layer 1 only", 0.7) },
    Recipe { layers: Some(&[0, 1, 2, 3]), ..normed("r-every70", "... thinking in every layer", 0.7) },
    // The steps start as a near-no-op (ReZero-like): the model begins as its dense backbone and
    // grows each step's update only where it lowers the loss.
    Recipe { phi_init: 0.1, ..normed("r-phi01", "... + step vectors phi initialised at 0.1", 0.7) },
];

fn recipe_config(size: &str, r: &Recipe, opts: &ExperimentOptions) -> Result<RunConfig> {
    let mut cfg = sized(size, "-itt4", opts)?;
    let th = &mut cfg.model.thinking;
    th.residual_form = r.form;
    th.phi_init = r.phi_init;
    th.ratios = vec![r.ratio; 3];
    th.router_norm = r.router_norm;
    th.routed_attention = r.attention;
    th.step_scale = r.step_scale;
    th.layers = r.layers.map(<[usize]>::to_vec);
    th.residual_connection = true;
    th.adaptive_routing = true;
    th.step_encoding = true;
    let t = &mut cfg.train;
    t.thinking_lr_scale = r.lr_scale;
    t.capacity_warmup = r.warmup;
    t.router_aux_weight = r.aux;
    Ok(cfg)
}

fn variants(opts: &ExperimentOptions) -> Result<(Vec<Variant>, String)> {
    let size = opts.sizes.first().map(String::as_str).unwrap_or("tiny");
    let v = |name: &str, label: &str, cfg: RunConfig, paper: Option<f64>| Variant {
        name: name.into(),
        model: name.into(),
        lr_scale: 1.0,
        label: label.into(),
        cfg,
        extra: vec![],
        paper,
    };
    Ok(match opts.name.as_str() {
        "table1" | "fig4" => (
            vec![
                v("dense", "Dense", sized(size, "", opts)?, Some(40.4)),
                v("loop4", "Loop x4", sized(size, "-loop4", opts)?, Some(40.7)),
                v("itt4", "ITT x4", sized(size, "-itt4", opts)?, Some(42.1)),
                v("dense2x", "Dense, 2x layers (equal FLOPs)", deeper(size, opts)?, None),
            ],
            "162M avg accuracy of 10 tasks (paper Table 1; higher is better)".into(),
        ),
        "table2" => {
            let mut itt = v("itt4", "ITT x4", sized(size, "-itt4", opts)?, None);
            itt.extra = PAPER_T2
                .iter()
                .map(|(l, r, p)| Setting {
                    label: l.to_string(),
                    role: Role::Elastic,
                    routing: RoutingOptions { ratios: Some(r.to_vec()), ..Default::default() },
                    paper: Some(*p),
                })
                .collect();
            // Extended thinking: steps the model was not trained with, reusing its last step's
            // router, step vector and share (DESIGN §6).
            for extra in 1..=2 {
                itt.extra.push(Setting {
                    label: format!("x{} (+{extra} untrained step{})", 4 + extra, if extra > 1 { "s" } else { "" }),
                    role: Role::Elastic,
                    routing: RoutingOptions { steps: Some(4 + extra), ..Default::default() },
                    paper: None,
                });
            }
            (
                vec![
                    v("dense", "Dense", sized(size, "", opts)?, Some(11.13)),
                    itt,
                    v("loop4", "Loop x4 (100/100/100)", sized(size, "-loop4", opts)?, Some(10.78)),
                ],
                "162M validation PPL (paper Table 2; lower is better)".into(),
            )
        }
        "table3" => {
            let base = sized(size, "-itt4", opts)?;
            let mut no_rtc = base.clone();
            // Replacement is defined in the literal form only (DESIGN §4.5).
            no_rtc.model.thinking.residual_connection = false;
            no_rtc.model.thinking.residual_form = ResidualForm::Literal;
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
            let sizes = if opts.sizes.len() >= 2 { opts.sizes.clone() } else { vec!["tiny".into(), "small".into()] };
            for s in &sizes {
                let (pd, pi) = match s.as_str() {
                    "tiny" => (Some(40.4), Some(42.1)),
                    "small" => (Some(41.8), Some(43.9)),
                    _ => (None, None),
                };
                out.push(v(&format!("{s}-dense"), &format!("{s} dense"), sized(s, "", opts)?, pd));
                out.push(v(&format!("{s}-itt4"), &format!("{s} ITT x4"), sized(s, "-itt4", opts)?, pi));
            }
            (out, "avg accuracy at 162M/230M (paper Table 1; sizes are not comparable)".into())
        }
        "steps" => {
            let mut out = vec![v("dense", "Dense", sized(size, "", opts)?, Some(40.4))];
            for t in 2..=4 {
                let paper = (t == 4).then_some(40.7);
                out.push(v(
                    &format!("loop{t}"),
                    &format!("Loop x{t}"),
                    sized(size, &format!("-loop{t}"), opts)?,
                    paper,
                ));
            }
            for t in 2..=4 {
                let paper = (t == 4).then_some(42.1);
                out.push(v(&format!("itt{t}"), &format!("ITT x{t}"), sized(size, &format!("-itt{t}"), opts)?, paper));
            }
            (out, "162M avg accuracy of 10 tasks (paper Table 1 / Figure 5)".into())
        }
        "recipe" => {
            let mut out = vec![
                v("dense", "Dense", sized(size, "", opts)?, None),
                v("loop4", "Loop x4", sized(size, "-loop4", opts)?, None),
                v("dense2x", "Dense, 2x layers (equal FLOPs)", deeper(size, opts)?, None),
            ];
            for r in &RECIPES {
                out.push(v(r.name, &format!("ITT x4 {}", r.label), recipe_config(size, r, opts)?, None));
            }
            (out, "none (the recipe search is this project's, DESIGN §9)".into())
        }
        other => return Err(Error::usage(format!("unknown experiment '{other}'; known: {}", NAMES.join(", ")))),
    })
}

/// The settings a trained variant is scored in: as trained, causal (ITT with routers), with
/// thinking off (models that think), and the variant's extra ones.
fn settings(var: &Variant, calibration: Option<Arc<crate::model::RouterCalibration>>) -> Vec<Setting> {
    let th = &var.cfg.model.thinking;
    let mut out = vec![Setting {
        label: if th.kind == ModelKind::Itt && th.adaptive_routing { "top-k" } else { "trained" }.into(),
        role: Role::Trained,
        routing: RoutingOptions::default(),
        paper: None,
    }];
    if th.kind == ModelKind::Itt && th.adaptive_routing {
        out.push(Setting {
            label: "causal".into(),
            role: Role::Causal,
            routing: RoutingOptions { mode: Routing::Threshold, calibration, ..Default::default() },
            paper: None,
        });
    }
    out.extend(var.extra.iter().cloned());
    if th.kind != ModelKind::Dense {
        out.push(Setting {
            label: "thinking off".into(),
            role: Role::Off,
            routing: RoutingOptions { steps: Some(1), ..Default::default() },
            paper: None,
        });
    }
    out
}

/// Train (or reuse, or resume) one run of a variant.
fn train_one(
    cfg: &RunConfig,
    run_dir: &Path,
    dataset: &data::Dataset,
    tok: &data::Tokenizer,
    quiet: bool,
    device: &candle_core::Device,
) -> Result<Trainer> {
    if run_dir.join("latest").exists() {
        let mut t =
            Trainer::resume(run_dir, None, train::TrainerOptions { device: device.clone(), ..Default::default() })?;
        if !same_training(&t.cfg, cfg) {
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
    let mut t = Trainer::new(
        cfg.clone(),
        tok,
        run_dir,
        train::TrainerOptions { device: device.clone(), ..Default::default() },
    )?;
    train::run(&mut t, dataset, &RunOptions { quiet, stop_at: None })?;
    Ok(t)
}

/// Whether two configurations train the same run: how often checkpoints are written and how
/// many are kept change no value (resume is bit-exact), so runs made before grids wrote
/// checkpoints, or trained by hand with `itt train --config` and another cadence, are reused.
fn same_training(a: &RunConfig, b: &RunConfig) -> bool {
    let cadence_free = |c: &RunConfig| {
        let mut c = c.clone();
        c.train.checkpoint_interval = 0;
        c.train.keep_checkpoints = 0;
        c
    };
    cadence_free(a) == cadence_free(b)
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

/// Per-seed paired differences a - b over the (corpus, seed) pairs both have.
fn paired(a: &[&RunResult], b: &[&RunResult], f: impl Fn(&RunResult, &RunResult) -> f64) -> Option<Estimate> {
    let d: Vec<f64> =
        a.iter().filter_map(|x| b.iter().find(|y| y.seed == x.seed && y.corpus == x.corpus).map(|y| f(x, y))).collect();
    (!d.is_empty()).then(|| Estimate::of(&d))
}

/// The first item of `items` that an earlier one equals.
fn first_repeat<T: PartialEq>(items: &[T]) -> Option<&T> {
    items.iter().enumerate().find(|(i, x)| items[..*i].contains(x)).map(|(_, x)| x)
}

/// The grid to train: the experiment's variants (filtered by `--variants`), each at every
/// learning-rate multiplier (`name-lrS` for S != 1).
fn grid(opts: &ExperimentOptions) -> Result<(Vec<Variant>, String)> {
    if opts.seeds == 0 {
        return Err(Error::usage("--seeds must be at least 1"));
    }
    if opts.steps == Some(0) {
        return Err(Error::usage("--steps must be at least 1"));
    }
    if opts.jobs == 0 {
        return Err(Error::usage("--jobs must be at least 1"));
    }
    if opts.lr_scales.is_empty() || opts.lr_scales.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
        return Err(Error::usage("--lr-scales must be positive numbers, e.g. 0.5,1,2"));
    }
    // A name or rate given twice would be one column of the table, or two runs in one folder.
    if let Some(n) = first_repeat(&opts.variants) {
        return Err(Error::usage(format!("--variants gives '{n}' twice")));
    }
    if let Some(s) = first_repeat(&opts.lr_scales) {
        return Err(Error::usage(format!("--lr-scales gives {s} twice")));
    }
    let (mut variants, paper_metric) = variants(opts)?;
    if !opts.variants.is_empty() {
        if let Some(bad) = opts.variants.iter().find(|n| !variants.iter().any(|v| &v.name == *n)) {
            let known: Vec<&str> = variants.iter().map(|v| v.name.as_str()).collect();
            return Err(Error::usage(format!("{} has no variant '{bad}'; known: {}", opts.name, known.join(", "))));
        }
        variants.retain(|v| opts.variants.contains(&v.name));
    }
    let mut out = vec![];
    for var in variants {
        for &scale in &opts.lr_scales {
            let mut v = Variant { lr_scale: scale, ..var.clone() };
            if scale != 1.0 {
                v.name = format!("{}-lr{scale}", var.name);
                v.label = format!("{} (lr x{scale})", var.label);
                v.cfg.train.lr *= scale;
            }
            out.push(v);
        }
    }
    Ok((out, paper_metric))
}

/// The corpus's prepared data, made on first use; data made from another source or with
/// another tokenizer is refused rather than silently reused or overwritten.
fn corpus_data(corpus: &Corpus) -> Result<(data::Dataset, data::Tokenizer)> {
    std::fs::create_dir_all(&corpus.dir).at(&corpus.dir)?;
    let data_dir = corpus.dir.join("data");
    match data::Dataset::open(&data_dir) {
        Ok(ds) => {
            let spec = &corpus.spec;
            let family = spec.tokenizer.split(':').next().unwrap_or("");
            let builtin_or_prepared = spec.path == "builtin" || Path::new(&spec.path).join("meta.json").exists();
            let same_tok = builtin_or_prepared
                || !matches!(family, "char" | "byte" | "bpe")
                || (ds.meta.tokenizer_kind == family
                    && (family != "bpe" || spec.tokenizer[4..].parse::<usize>().ok() == Some(ds.meta.vocab_size)));
            if ds.meta.source != spec.path || !same_tok {
                return Err(Error::usage(format!(
                    "{} holds {} tokenized by {} ({} tokens); this experiment asks for {} with {}: choose another --out",
                    data_dir.display(),
                    ds.meta.source,
                    ds.meta.tokenizer_kind,
                    ds.meta.vocab_size,
                    spec.path,
                    spec.tokenizer
                )));
            }
            let tok = ds.load_tokenizer()?;
            Ok((ds, tok))
        }
        Err(_) => train::prepare_data(&corpus.spec, &data_dir),
    }
}

/// Everything one corpus's grid produced.
struct CorpusRuns {
    runs: Vec<RunResult>,
    curves: Vec<Curve>,
    classes: Vec<ClassSummary>,
    vocab_size: usize,
}

/// One run of the grid: its variant (index into the grid), configuration and folder.
struct PlannedRun {
    variant: usize,
    cfg: RunConfig,
    run_dir: PathBuf,
    /// "VARIANT LABEL seed S: FOLDER", for progress lines.
    title: String,
}

/// Every run of the grid on one corpus, variant by variant, seeds 1000, 1001, ...
fn plan_runs(corpus: &Corpus, variants: &[Variant], opts: &ExperimentOptions, vocab: usize) -> Result<Vec<PlannedRun>> {
    let mut plan = vec![];
    for (vi, var) in variants.iter().enumerate() {
        for s in 0..opts.seeds {
            let mut cfg = var.cfg.clone();
            cfg.model.vocab_size = vocab;
            cfg.train.seed = 1000 + s as u64;
            cfg.validate()?;
            let run_dir = corpus.dir.join("runs").join(format!("{}-s{}", var.name, s));
            let title = format!("{} seed {s}: {}", var.label, run_dir.display());
            plan.push(PlannedRun { variant: vi, cfg, run_dir, title });
        }
    }
    Ok(plan)
}

/// Train (or reuse, or resume) the planned runs `opts.jobs` at a time, each job on a rayon pool
/// of its share of the threads (two one-thread runs side by side train faster on two cores than
/// one two-thread run after another: small products scale poorly over threads). Each run is
/// the same computation whichever job trains it. The first failure stops the jobs from taking
/// new runs and is returned once the runs in flight end; a preemption signal stops every run in
/// flight at a checkpoint.
fn train_concurrently(
    plan: &[PlannedRun],
    dataset: &data::Dataset,
    tok: &data::Tokenizer,
    opts: &ExperimentOptions,
) -> Result<()> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;
    if !opts.device.is_cpu() {
        return Err(Error::usage("--jobs above 1 trains on the CPU only; on a GPU run the grid with --jobs 1"));
    }
    let per_job = (rayon::current_num_threads() / opts.jobs).max(1);
    let next = AtomicUsize::new(0);
    let failure: Mutex<Option<Error>> = Mutex::new(None);
    let failed = || failure.lock().map(|f| f.is_some()).unwrap_or(true);
    std::thread::scope(|scope| {
        for _ in 0..opts.jobs.min(plan.len()) {
            scope.spawn(|| {
                let fail = |e: Error| {
                    if let Ok(mut f) = failure.lock() {
                        f.get_or_insert(e);
                    }
                };
                let pool = match rayon::ThreadPoolBuilder::new().num_threads(per_job).build() {
                    Ok(p) => p,
                    Err(e) => return fail(Error::usage(format!("--jobs: could not start a thread pool: {e}"))),
                };
                while !failed() {
                    let Some(p) = plan.get(next.fetch_add(1, Ordering::SeqCst)) else { break };
                    if !opts.quiet {
                        eprintln!("[{}] {} ({} thread(s))", opts.name, p.title, per_job);
                    }
                    // Runs side by side log no step lines (they would interleave; each run's
                    // metrics.jsonl has them), only when each starts and ends.
                    match pool.install(|| train_one(&p.cfg, &p.run_dir, dataset, tok, true, &opts.device)) {
                        Ok(t) if !opts.quiet => {
                            let val = val_curve(&p.run_dir).last().map(|v| format!(", val loss {:.4}", v.1));
                            eprintln!(
                                "[{}] {}: step {}{}, {:.0} s",
                                opts.name,
                                p.title,
                                t.state.step,
                                val.unwrap_or_default(),
                                t.state.elapsed_s
                            );
                        }
                        Ok(_) => {}
                        Err(e) => fail(e),
                    }
                }
            });
        }
    });
    match failure.into_inner() {
        Ok(None) => Ok(()),
        Ok(Some(e)) => Err(e),
        Err(_) => Err(Error::usage("--jobs: a training job panicked")),
    }
}

/// Train (or reuse) every run of the grid on one corpus and score each in its settings.
fn train_corpus(corpus: &Corpus, variants: &[Variant], opts: &ExperimentOptions) -> Result<CorpusRuns> {
    let (dataset, tok) = corpus_data(corpus)?;
    let builtin = corpus.spec.path == "builtin";
    let problems = if builtin && opts.problems > 0 { reasoning::held_out_problems(50, opts.problems) } else { vec![] };
    let on = ScoreOn { corpus, dataset: &dataset, tok: &tok, problems: &problems, opts };
    let plan = plan_runs(corpus, variants, opts, tok.vocab_size())?;
    if opts.jobs > 1 {
        train_concurrently(&plan, &dataset, &tok, opts)?;
    }
    let mut runs: Vec<RunResult> = vec![];
    let mut curves = vec![];
    for (vi, var) in variants.iter().enumerate() {
        let mut seed_curves = vec![];
        for planned in plan.iter().filter(|p| p.variant == vi) {
            let (cfg, run_dir) = (&planned.cfg, &planned.run_dir);
            if !opts.quiet && opts.jobs <= 1 {
                eprintln!("[{} {}] {}", opts.name, corpus.name, planned.title);
            }
            let t = train_one(cfg, run_dir, &dataset, &tok, opts.quiet, &opts.device)?;
            seed_curves.push(val_curve(run_dir));
            for st in settings(var, t.calibration.clone().map(Arc::new)) {
                runs.push(score(on, var, cfg, &t, &st)?);
            }
            let _ = checkpoint::resolve(run_dir)?;
        }
        // Average the validation curves over seeds (same eval points in every seed).
        let n_pts = seed_curves.iter().map(Vec::len).min().unwrap_or(0);
        let points = (0..n_pts)
            .map(|i| (seed_curves[0][i].0, seed_curves.iter().map(|c| c[i].1).sum::<f64>() / seed_curves.len() as f64))
            .collect();
        curves.push(Curve { corpus: corpus.name.clone(), variant: var.name.clone(), label: var.label.clone(), points });
    }
    let classes = token_classes(corpus, variants, &dataset, &tok, opts)?;
    Ok(CorpusRuns { runs, curves, classes, vocab_size: tok.vocab_size() })
}

/// What every run of one corpus is scored on: its validation shard, its tokenizer, and the
/// held-out problems (built-in data only).
#[derive(Clone, Copy)]
struct ScoreOn<'a> {
    corpus: &'a Corpus,
    dataset: &'a data::Dataset,
    tok: &'a data::Tokenizer,
    problems: &'a [reasoning::Problem],
    opts: &'a ExperimentOptions,
}

/// One trained run scored in one setting.
fn score(on: ScoreOn, var: &Variant, cfg: &RunConfig, t: &Trainer, st: &Setting) -> Result<RunResult> {
    let ScoreOn { corpus, dataset, tok, problems, opts } = on;
    let mut rec = crate::model::ForwardRecord::default();
    let val = eval::shard_loss_recorded(
        &t.model,
        &dataset.val,
        cfg.train.batch_size,
        cfg.train.seq_len,
        opts.eval_batches,
        &st.routing,
        &mut rec,
    )?;
    let routed = (!rec.stats.is_empty()).then(|| {
        let (sel, cand) = rec.stats.values().fold((0u64, 0u64), |a, s| (a.0 + s.selected, a.1 + s.candidates));
        sel as f64 / cand.max(1) as f64
    });
    // Answers are generated causally: ITT with routers in threshold mode.
    let answers_here = match st.role {
        Role::Off | Role::Causal => true,
        Role::Trained => !(cfg.model.thinking.kind == ModelKind::Itt && t.model.has_routers()),
        Role::Elastic => false,
    };
    let solved = if !problems.is_empty() && answers_here {
        Some(reasoning::solve_rates(&t.model, tok, problems, &st.routing)?)
    } else {
        None
    };
    let f = flops_per_token(&cfg.model, cfg.train.seq_len, st.routing.steps, st.routing.ratios.as_deref());
    Ok(RunResult {
        corpus: corpus.name.clone(),
        variant: var.name.clone(),
        model: var.model.clone(),
        lr_scale: var.lr_scale,
        setting: st.label.clone(),
        role: st.role,
        seed: cfg.train.seed,
        val_loss: val,
        train_loss: t.state.last_train_loss.unwrap_or(f64::NAN),
        params: t.model.n_params(),
        train_flops_per_token: flops_per_token(&cfg.model, cfg.train.seq_len, None, None).train,
        eval_flops_per_token: f.forward,
        wall_s: t.state.elapsed_s,
        tokens: t.state.tokens_seen,
        routed_share: routed,
        solved,
    })
}

/// Per-token loss of each thinking variant minus the dense run of the same seed and learning
/// rate, by token class (`analysis::tokens`), as trained (top-k), over seeds.
fn token_classes(
    corpus: &Corpus,
    variants: &[Variant],
    dataset: &data::Dataset,
    tok: &data::Tokenizer,
    opts: &ExperimentOptions,
) -> Result<Vec<ClassSummary>> {
    use crate::apps::analysis::tokens::{self, Classifier};
    let dense_of = |scale: f64| {
        variants
            .iter()
            .find(|v| v.cfg.model.thinking.kind == ModelKind::Dense && v.model == "dense" && v.lr_scale == scale)
    };
    let thinkers: Vec<&Variant> = variants
        .iter()
        .filter(|v| v.cfg.model.thinking.kind != ModelKind::Dense && dense_of(v.lr_scale).is_some())
        .collect();
    if thinkers.is_empty() {
        return Ok(vec![]);
    }
    let classes = Classifier::new(tok, &dataset.train);
    let routing = RoutingOptions::default();
    let trace_of = |var: &Variant, s: usize| -> Result<tokens::TokenTrace> {
        let run_dir = corpus.dir.join("runs").join(format!("{}-s{}", var.name, s));
        let (model, _, _) = checkpoint::load_model(&run_dir)?;
        let model = model.to_device(&opts.device)?;
        let (b, l) = (var.cfg.train.batch_size, var.cfg.train.seq_len);
        tokens::trace(&model, &dataset.val, b, l, opts.eval_batches, &routing)
    };
    // (variant, group, class) -> per seed (share, dense loss, loss, diff, contribution)
    // (variant, group, class) -> per seed [share, dense loss, loss, diff, contribution].
    type PerSeed = Vec<[f64; 5]>;
    let mut acc: Vec<((String, String, String), PerSeed)> = vec![];
    for s in 0..opts.seeds {
        let mut dense_traces: Vec<(f64, tokens::TokenTrace)> = vec![];
        for var in &thinkers {
            let dense = dense_of(var.lr_scale).expect("filtered above");
            if !dense_traces.iter().any(|(sc, _)| *sc == var.lr_scale) {
                dense_traces.push((var.lr_scale, trace_of(dense, s)?));
            }
            let base = &dense_traces.iter().find(|(sc, _)| *sc == var.lr_scale).expect("just pushed").1;
            for row in tokens::compare(base, &trace_of(var, s)?, &classes) {
                let key = (var.name.clone(), row.group, row.class);
                let v = [row.share, row.base_loss, row.loss, row.diff, row.contribution];
                match acc.iter_mut().find(|(k, _)| *k == key) {
                    Some((_, xs)) => xs.push(v),
                    None => acc.push((key, vec![v])),
                }
            }
        }
    }
    Ok(acc
        .into_iter()
        .map(|((variant, group, class), xs)| {
            let mean = |k: usize| xs.iter().map(|x| x[k]).sum::<f64>() / xs.len() as f64;
            // A class absent from a seed (e.g. no position took 0 extra steps) has share 0
            // there: shares and contributions average over every seed, so a group's rows still
            // add up to the whole.
            let over_seeds = |k: usize| xs.iter().map(|x| x[k]).sum::<f64>() / opts.seeds as f64;
            ClassSummary {
                corpus: corpus.name.clone(),
                variant,
                group,
                class,
                share: over_seeds(0),
                dense_loss: mean(1),
                loss: mean(2),
                diff: Estimate::of(&xs.iter().map(|x| x[3]).collect::<Vec<_>>()),
                contribution: over_seeds(4),
            }
        })
        .collect())
}

/// The table rows of one corpus's runs (or, with `corpus` = `pooled`, of every corpus's runs
/// together: paired differences over every (corpus, seed) pair).
fn summarize(
    corpus: &str,
    variants: &[Variant],
    row_keys: &[(usize, String, Role, Option<f64>)],
    runs: &[&RunResult],
    curves: &[&Curve],
    vocab_size: usize,
) -> Vec<Row> {
    let of = |variant: &str, setting: &str| -> Vec<&RunResult> {
        runs.iter().copied().filter(|r| r.variant == variant && r.setting == setting).collect()
    };
    // Dense at the same learning-rate multiplier is each row's partner.
    let dense_of = |scale: f64| {
        variants
            .iter()
            .find(|v| v.cfg.model.thinking.kind == ModelKind::Dense && v.model == "dense" && v.lr_scale == scale)
            .or_else(|| variants.iter().find(|v| v.cfg.model.thinking.kind == ModelKind::Dense && v.lr_scale == scale))
    };
    let mut rows = vec![];
    for (vi, setting, role, paper) in row_keys {
        let var = &variants[*vi];
        let results = of(&var.name, setting);
        if results.is_empty() {
            continue;
        }
        let losses: Vec<f64> = results.iter().map(|r| r.val_loss).collect();
        let (m, sd) = mean_std(&losses);
        let dense = dense_of(var.lr_scale);
        let is_dense = dense.is_some_and(|d| d.name == var.name);
        let dense_runs = dense.map(|d| of(&d.name, "trained")).unwrap_or_default();
        let vs_dense = (!is_dense && !dense_runs.is_empty())
            .then(|| paired(&results, &dense_runs, |a, b| a.val_loss - b.val_loss))
            .flatten();
        let thinking_gain = matches!(role, Role::Trained | Role::Causal)
            .then(|| paired(&of(&var.name, "thinking off"), &results, |off, on| off.val_loss - on.val_loss))
            .flatten();
        let solved: Vec<f64> = results.iter().filter_map(|r| r.solved.as_ref().map(SolveRates::accuracy)).collect();
        let routing = match var.extra.iter().find(|e| &e.label == setting) {
            Some(e) => e.routing.clone(),
            None => RoutingOptions { steps: if *role == Role::Off { Some(1) } else { None }, ..Default::default() },
        };
        let mut cfg = var.cfg.clone();
        cfg.model.vocab_size = vocab_size;
        let f = flops_per_token(&cfg.model, cfg.train.seq_len, routing.steps, routing.ratios.as_deref());
        let flops_vs_dense = flops_against(&f, dense, vocab_size);
        let dense_curve = dense.and_then(|d| curves.iter().find(|c| c.variant == d.name));
        let tokens_to_dense = match (dense_curve, *role == Role::Trained && !is_dense) {
            (Some(d), true) => {
                let mine = curves.iter().find(|c| c.variant == var.name).map(|c| c.points.as_slice()).unwrap_or(&[]);
                d.points.last().and_then(|&(total, target)| tokens_to_reach(mine, target).map(|t| t / total))
            }
            _ => None,
        };
        rows.push(Row {
            corpus: corpus.to_string(),
            variant: var.name.clone(),
            label: var.label.clone(),
            setting: setting.clone(),
            role: *role,
            val_loss_mean: m,
            val_loss_std: sd,
            val_ppl_mean: losses.iter().map(|l| l.exp()).sum::<f64>() / losses.len() as f64,
            vs_dense,
            thinking_gain,
            solved: (!solved.is_empty()).then(|| solved.iter().sum::<f64>() / solved.len() as f64),
            params: results[0].params,
            eval_flops_per_token: f.forward,
            flops_vs_dense,
            wall_s_mean: results.iter().map(|r| r.wall_s).sum::<f64>() / results.len() as f64,
            tokens_to_dense,
            seeds: results.len(),
            paper: *paper,
        });
    }
    rows
}

/// Forward FLOPs per token against the experiment's dense baseline (at `vocab_size`), not
/// against the model's own layer count: a deeper dense model (dense2x) costs about twice the
/// baseline, not 1.00x. Without a dense variant, against the model's own dense equivalent.
fn flops_against(f: &Flops, dense: Option<&Variant>, vocab_size: usize) -> f64 {
    match dense {
        Some(d) => {
            let mut base = d.cfg.model.clone();
            base.vocab_size = vocab_size;
            f.forward / flops_per_token(&base, d.cfg.train.seq_len, None, None).forward
        }
        None => f.ratio_to_dense,
    }
}

/// A variant's label without the learning-rate suffix `grid` adds: the best-rate table names
/// the model, and its chosen multiplier has a column of its own.
fn model_label(v: &Variant) -> String {
    if v.lr_scale == 1.0 {
        return v.label.clone();
    }
    let suffix = format!(" (lr x{})", v.lr_scale);
    v.label.strip_suffix(&suffix).unwrap_or(&v.label).to_string()
}

/// With a learning-rate sweep: each model at the multiplier with its lowest mean validation
/// loss (as trained) on each corpus, against dense at dense's own best; then pooled over the
/// corpora (each corpus at its own best rates).
/// `vocabs[i]` is corpus i's vocabulary size: the FLOPs of the head depend on it, and the ratio
/// to dense must be the one the main table gives (pooled: the first corpus's, as there).
fn best_rates(
    variants: &[Variant],
    corpora: &[Corpus],
    vocabs: &[usize],
    runs: &[RunResult],
    opts: &ExperimentOptions,
) -> Vec<BestLr> {
    if opts.lr_scales.len() < 2 {
        return vec![];
    }
    let mut models: Vec<&Variant> = vec![];
    for v in variants {
        if !models.iter().any(|m| m.model == v.model) {
            models.push(v);
        }
    }
    let trained = |c: &str, variant: &str| -> Vec<&RunResult> {
        runs.iter().filter(|r| r.corpus == c && r.variant == variant && r.role == Role::Trained).collect()
    };
    // The best variant of `model` on corpus c: (variant, mean loss).
    let best = |c: &str, model: &str| -> Option<(&Variant, f64)> {
        variants
            .iter()
            .filter(|v| v.model == model)
            .filter_map(|v| {
                let rs = trained(c, &v.name);
                (!rs.is_empty()).then(|| (v, rs.iter().map(|r| r.val_loss).sum::<f64>() / rs.len() as f64))
            })
            .min_by(|a, b| a.1.total_cmp(&b.1))
    };
    let dense_model = variants.iter().find(|v| v.cfg.model.thinking.kind == ModelKind::Dense).map(|v| v.model.clone());
    let dense_base = variants.iter().find(|v| v.cfg.model.thinking.kind == ModelKind::Dense && v.model == "dense");
    let flops_vs_dense = |v: &Variant, vocab_size: usize| {
        let mut model = v.cfg.model.clone();
        model.vocab_size = vocab_size;
        let f = flops_per_token(&model, v.cfg.train.seq_len, None, None);
        flops_against(&f, dense_base, vocab_size)
    };
    let mut out = vec![];
    for m in &models {
        let mut pooled_mine: Vec<&RunResult> = vec![];
        let mut pooled_dense: Vec<&RunResult> = vec![];
        for (c, &vocab_size) in corpora.iter().zip(vocabs) {
            let Some((v, loss)) = best(&c.name, &m.model) else { continue };
            let mine = trained(&c.name, &v.name);
            let dense = dense_model.as_deref().and_then(|d| best(&c.name, d)).map(|(d, _)| trained(&c.name, &d.name));
            let is_dense = dense_model.as_deref() == Some(m.model.as_str());
            let vs_dense = match (&dense, is_dense) {
                (Some(d), false) => paired(&mine, d, |a, b| a.val_loss - b.val_loss),
                _ => None,
            };
            pooled_mine.extend(&mine);
            pooled_dense.extend(dense.unwrap_or_default());
            out.push(BestLr {
                corpus: c.name.clone(),
                model: m.model.clone(),
                label: model_label(m),
                lr_scale: v.lr_scale,
                lr: v.cfg.train.lr,
                val_loss_mean: loss,
                vs_dense,
                flops_vs_dense: flops_vs_dense(v, vocab_size),
            });
        }
        if corpora.len() > 1 {
            let is_dense = dense_model.as_deref() == Some(m.model.as_str());
            out.push(BestLr {
                corpus: "pooled".into(),
                model: m.model.clone(),
                label: model_label(m),
                lr_scale: f64::NAN,
                lr: f64::NAN,
                val_loss_mean: f64::NAN,
                vs_dense: if is_dense {
                    None
                } else {
                    paired(&pooled_mine, &pooled_dense, |a, b| a.val_loss - b.val_loss)
                },
                flops_vs_dense: flops_vs_dense(m, vocabs[0]),
            });
        }
    }
    out
}

/// The whole experiment: the grid, trained and scored on every corpus, summarised into the
/// tables and written to `opts.out`.
pub fn run(opts: &ExperimentOptions) -> Result<ExperimentResults> {
    let (variants, paper_metric) = grid(opts)?;
    let corpora = Corpus::all(opts)?;
    std::fs::create_dir_all(&opts.out).at(&opts.out)?;
    // One experiment writes a folder at a time (its runs, results and shared data).
    let _lock = crate::train::lock::RunLock::acquire(&opts.out)?;
    let per_corpus = corpora.iter().map(|c| train_corpus(c, &variants, opts)).collect::<Result<Vec<_>>>()?;
    let rows = table_rows(&corpora, &variants, &per_corpus);
    let data_share_to_match_dense = data_share(&rows, &corpora[0].name);
    let vocabs: Vec<usize> = per_corpus.iter().map(|d| d.vocab_size).collect();
    let (mut runs, mut curves, mut token_classes) = (vec![], vec![], vec![]);
    for done in per_corpus {
        runs.extend(done.runs);
        curves.extend(done.curves);
        token_classes.extend(done.classes);
    }
    let results = ExperimentResults {
        name: opts.name.clone(),
        command: opts.command.clone(),
        paper_metric,
        best_lr: best_rates(&variants, &corpora, &vocabs, &runs, opts),
        rows,
        runs,
        data_share_to_match_dense,
        curves,
        corpora: corpora.iter().map(|c| c.name.clone()).collect(),
        token_classes,
    };
    write_outputs(&results, opts)?;
    Ok(results)
}

/// Every table row: each corpus's, then (with several corpora) the pooled ones, each corpus in
/// the order of the variants and their settings.
fn table_rows(corpora: &[Corpus], variants: &[Variant], per_corpus: &[CorpusRuns]) -> Vec<Row> {
    // Rows in table order: (variant index, setting label, role, paper), from the first seed.
    let mut row_keys: Vec<(usize, String, Role, Option<f64>)> = vec![];
    for (vi, var) in variants.iter().enumerate() {
        for st in settings(var, None) {
            row_keys.push((vi, st.label.clone(), st.role, st.paper.or(var.paper)));
        }
    }
    let mut rows = vec![];
    for (corpus, done) in corpora.iter().zip(per_corpus) {
        let mine: Vec<&RunResult> = done.runs.iter().collect();
        let cs: Vec<&Curve> = done.curves.iter().collect();
        rows.extend(summarize(&corpus.name, variants, &row_keys, &mine, &cs, done.vocab_size));
    }
    if corpora.len() > 1 {
        let all: Vec<&RunResult> = per_corpus.iter().flat_map(|d| &d.runs).collect();
        rows.extend(summarize("pooled", variants, &row_keys, &all, &[], per_corpus[0].vocab_size));
    }
    rows
}

/// The share of dense's training tokens that ITT x4 (as trained) needed to reach dense's final
/// validation loss, on the first corpus.
fn data_share(rows: &[Row], first_corpus: &str) -> Option<f64> {
    rows.iter()
        .find(|r| r.corpus == first_corpus && r.variant == "itt4" && r.role == Role::Trained)
        .and_then(|r| r.tokens_to_dense)
}

fn table(r: &ExperimentResults, corpus: &str) -> String {
    let mut s = format!(
        "| model | setting | val loss (mean ± sd) | vs dense, paired (95% CI) | thinking gain (95% CI) | solved | params | forward FLOPs/token | vs dense | tokens to dense's loss | train wall s | paper: {} |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|\n",
        r.paper_metric
    );
    let dash = || "–".to_string();
    for row in r.rows.iter().filter(|row| row.corpus == corpus) {
        s.push_str(&format!(
            "| {} | {} | {:.4} ± {:.4} | {} | {} | {} | {:.3}M | {:.2}M | {:.2}x | {} | {:.0} | {} |\n",
            row.label,
            row.setting,
            row.val_loss_mean,
            row.val_loss_std,
            row.vs_dense.map(|e| e.text(4)).unwrap_or_else(dash),
            row.thinking_gain.map(|e| e.text(4)).unwrap_or_else(dash),
            row.solved.map(|a| format!("{:.1}%", 100.0 * a)).unwrap_or_else(dash),
            row.params as f64 / 1e6,
            row.eval_flops_per_token / 1e6,
            row.flops_vs_dense,
            row.tokens_to_dense.map(|t| format!("{:.1}%", 100.0 * t)).unwrap_or_else(dash),
            row.wall_s_mean,
            row.paper.map(|p| format!("{p}")).unwrap_or_else(dash)
        ));
    }
    s
}

/// The pooled rows: the paired differences over every (corpus, seed), and each corpus's mean.
fn pooled_table(r: &ExperimentResults) -> String {
    let mut s = String::from("| model | setting | vs dense, pooled (95% CI) | thinking gain, pooled (95% CI) |");
    for c in &r.corpora {
        s.push_str(&format!(" {c}: vs dense |"));
    }
    s.push_str(" forward FLOPs vs dense |\n|---|---|---|---|");
    s.push_str(&"---|".repeat(r.corpora.len() + 1));
    s.push('\n');
    let dash = || "–".to_string();
    for row in r.rows.iter().filter(|row| row.corpus == "pooled") {
        s.push_str(&format!(
            "| {} | {} | {} | {} |",
            row.label,
            row.setting,
            row.vs_dense.map(|e| e.text(4)).unwrap_or_else(dash),
            row.thinking_gain.map(|e| e.text(4)).unwrap_or_else(dash)
        ));
        for c in &r.corpora {
            let here = r.rows.iter().find(|x| &x.corpus == c && x.variant == row.variant && x.setting == row.setting);
            s.push_str(&format!(
                " {} |",
                here.and_then(|x| x.vs_dense).map(|e| format!("{:+.4}", e.mean)).unwrap_or_else(dash)
            ));
        }
        s.push_str(&format!(" {:.2}x |\n", row.flops_vs_dense));
    }
    s
}

fn best_lr_table(r: &ExperimentResults) -> String {
    let mut s = String::from(
        "| corpus | model | best lr multiplier | lr | val loss | vs dense at its own best (95% CI) | FLOPs vs dense |\n\
         |---|---|---|---|---|---|---|\n",
    );
    let dash = || "–".to_string();
    for b in &r.best_lr {
        let num = |x: f64, d: usize| if x.is_finite() { format!("{x:.d$}") } else { dash() };
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {:.2}x |\n",
            b.corpus,
            b.label,
            num(b.lr_scale, 2),
            if b.lr.is_finite() { format!("{:.1e}", b.lr) } else { dash() },
            num(b.val_loss_mean, 4),
            b.vs_dense.map(|e| e.text(4)).unwrap_or_else(dash),
            b.flops_vs_dense
        ));
    }
    s
}

fn class_table(r: &ExperimentResults) -> String {
    let mut s = String::from(
        "| corpus | model | group | class | share | dense loss | loss | minus dense (95% CI over seeds) | contribution |\n\
         |---|---|---|---|---|---|---|---|---|\n",
    );
    for c in &r.token_classes {
        s.push_str(&format!(
            "| {} | {} | {} | {} | {:.1}% | {:.4} | {:.4} | {} | {:+.4} |\n",
            c.corpus,
            c.variant,
            c.group,
            c.class,
            100.0 * c.share,
            c.dense_loss,
            c.loss,
            c.diff.text(4),
            c.contribution
        ));
    }
    s
}

pub fn markdown(r: &ExperimentResults, opts: &ExperimentOptions) -> String {
    let mut s = format!(
        "## {} — {} on {}, {} seed(s)\n\n`{}`\n\n",
        r.name,
        opts.sizes.join(", "),
        opts.data.iter().map(|d| d.path.as_str()).collect::<Vec<_>>().join(", "),
        opts.seeds,
        r.command,
    );
    if r.corpora.len() == 1 {
        s.push_str(&table(r, &r.corpora[0]));
    } else {
        for c in &r.corpora {
            s.push_str(&format!("### {c}\n\n{}\n", table(r, c)));
        }
        s.push_str(&format!(
            "### Pooled over {} corpora\n\nPaired differences over every (corpus, seed) pair; the corpus columns are \
             each corpus's mean paired difference.\n\n{}",
            r.corpora.len(),
            pooled_table(r)
        ));
    }
    s.push_str(
        "\n`vs dense`: per-seed difference to the dense run of the same seed (same initial backbone weights and \
         data order) and learning-rate multiplier, mean and 95% t-interval over seeds; negative = lower loss than \
         dense. `thinking gain`: loss with thinking off (one step, same weights) minus loss in this setting, paired \
         per seed. `top-k` is the paper's routing (not causal); `causal` routes by the thresholds tracked in \
         training, as generation does. `solved`: exact answers to held-out problems of the built-in corpus, \
         greedy, KV cache, causal routing.\n",
    );
    if !r.best_lr.is_empty() {
        s.push_str(&format!(
            "\n### Each model at its own best learning rate\n\nThe multiplier (of the preset's rate) with the lowest \
             mean validation loss on each corpus, chosen on the validation split it is reported on.\n\n{}",
            best_lr_table(r)
        ));
    }
    if !r.token_classes.is_empty() {
        s.push_str(&format!(
            "\n### Where the thinking steps help and hurt: per-token loss minus dense, by class\n\nSame validation \
             positions for both models of a seed; classes of the predicted token (frequency: head = the most \
             frequent tokens making half of the training tokens, body the next 40%, tail the last 10%; word \
             position), or of the input position (routed steps taken, top-k as trained). `contribution` = share x \
             difference: a group's rows add up to the whole difference.\n\n{}",
            class_table(r)
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
    let per_kind: Vec<String> = r
        .rows
        .iter()
        .filter(|row| row.solved.is_some() && row.corpus != "pooled")
        .map(|row| {
            let mut by_kind: std::collections::BTreeMap<String, (usize, usize)> = Default::default();
            for run in
                r.runs.iter().filter(|x| x.corpus == row.corpus && x.variant == row.variant && x.setting == row.setting)
            {
                for (k, (c, n)) in run.solved.iter().flat_map(|s| s.by_kind.iter()) {
                    let e = by_kind.entry(k.clone()).or_default();
                    e.0 += c;
                    e.1 += n;
                }
            }
            let parts: Vec<String> = by_kind.iter().map(|(k, (c, n))| format!("{k} {c}/{n}")).collect();
            format!("- {} ({}): {}", row.label, row.setting, parts.join(", "))
        })
        .collect();
    if !per_kind.is_empty() {
        s.push_str("\nHeld-out problems solved, per kind, all seeds together:\n\n");
        s.push_str(&per_kind.join("\n"));
        s.push('\n');
    }
    s
}

fn write_outputs(r: &ExperimentResults, opts: &ExperimentOptions) -> Result<()> {
    let dir = opts.out.join(&r.name);
    std::fs::create_dir_all(&dir).at(&dir)?;
    let json = dir.join("results.json");
    let body = serde_json::to_string_pretty(r).unwrap();
    write_atomic(&json, |w| w.write_all(body.as_bytes()))?;
    let md = dir.join("results.md");
    let body = markdown(r, opts);
    write_atomic(&md, |w| w.write_all(body.as_bytes()))?;
    use crate::apps::analysis::plot::{self, Panel, Series};
    let mut panels = vec![];
    for c in &r.corpora {
        let series: Vec<Series> = r
            .curves
            .iter()
            .filter(|cv| &cv.corpus == c)
            .enumerate()
            .map(|(i, cv)| Series::new(&cv.label, cv.points.clone(), plot::color(i)).with_markers())
            .collect();
        let title = if r.corpora.len() == 1 {
            format!("{}: validation loss (mean of {} seeds)", r.name, opts.seeds)
        } else {
            format!("{} on {c}: validation loss (mean of {} seeds)", r.name, opts.seeds)
        };
        panels.push(Panel::Line {
            title,
            x_label: "tokens seen".into(),
            y_label: "validation loss (nats/token)".into(),
            series,
            x_ticks: None,
        });
    }
    if r.name == "table2" {
        // Elastic inference: loss against inference FLOPs for each ratio setting of ITT.
        let first = &r.corpora[0];
        let mut pts: Vec<(f64, f64)> = r
            .rows
            .iter()
            .filter(|row| &row.corpus == first && row.variant == "itt4" && row.role != Role::Causal)
            .map(|row| (row.flops_vs_dense, row.val_loss_mean))
            .collect();
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        panels.push(Panel::Line {
            title: "ITT x4: loss against compute (each point a ratio setting)".into(),
            x_label: "forward FLOPs / dense".into(),
            y_label: "validation loss".into(),
            series: vec![Series::new("settings", pts, plot::color(0)).with_markers()],
            x_ticks: None,
        });
    }
    let cols = panels.len().min(3);
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

    #[test]
    fn t_intervals() {
        // Differences 1, 2, 3: mean 2, sd 1, half-width t(2) / sqrt(3) = 2.48 > 2: includes 0.
        let e = Estimate::of(&[1.0, 2.0, 3.0]);
        assert!((e.ci95.unwrap() - 4.303 / 3f64.sqrt()).abs() < 1e-9);
        assert!(!e.excludes_zero());
        // 1.9, 2, 2.1: half-width 0.248, excludes 0 (and so does its negative).
        assert!(Estimate::of(&[1.9, 2.0, 2.1]).excludes_zero());
        assert!(Estimate::of(&[-1.9, -2.0, -2.1]).excludes_zero());
        assert!(Estimate::of(&[0.5]).ci95.is_none() && !Estimate::of(&[0.5]).excludes_zero());
        assert_eq!(t_975(40), 1.96);
    }
}
