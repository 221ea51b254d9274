//! `itt demo`, the main job: train a tiny ITT model on the built-in synthetic corpus, evaluate
//! it, let it solve held-out problems with cached causal decoding, and say what happened.

use crate::apps::report;
use crate::base::config;
use crate::base::error::IoContext;
use crate::data::{self, synthetic, Tokenizer};
use crate::eval::reasoning;
use crate::generate::{self, Event, GenerateOptions, SamplingParams};
use crate::model::{Routing, RoutingOptions};
use crate::train::{self, DataSpec, RunOptions, Trainer, TrainerOptions};
use crate::{Error, Result};
use std::path::PathBuf;
use std::sync::Arc;

pub struct DemoOptions {
    pub out: PathBuf,
    pub preset: String,
    pub steps: Option<usize>,
    pub seed: u64,
    /// Also train the dense model of equal parameters (the preset without `-ittT`) on the same
    /// data, seed and steps, and compare.
    pub dense: bool,
}

const MARKER: &str = ".itt-demo";

/// Unigram entropy (nats per token) of a shard: the loss of a model that knows only token
/// frequencies; a trained model must beat it by far.
fn unigram_entropy(shard: &data::TokenShard) -> f64 {
    let mut counts = vec![0u64; shard.vocab_size()];
    let all = shard.slice_to_vec(0, shard.len());
    for t in &all {
        counts[*t as usize] += 1;
    }
    let n = all.len() as f64;
    counts.iter().filter(|&&c| c > 0).map(|&c| -(c as f64 / n) * (c as f64 / n).ln()).sum()
}

pub fn run(opts: &DemoOptions) -> Result<()> {
    let out = &opts.out;
    if out.exists() && std::fs::read_dir(out).at(out)?.next().is_some() {
        if !out.join(MARKER).exists() {
            return Err(Error::usage(format!(
                "{} exists and is not an earlier demo run; choose another --out (nothing was changed)",
                out.display()
            )));
        }
        std::fs::remove_dir_all(out).at(out)?;
    }
    std::fs::create_dir_all(out).at(out)?;
    std::fs::write(out.join(MARKER), "written by itt demo; `itt demo` may replace this folder\n").at(out)?;

    println!("== itt demo: an Inner Thinking Transformer trained on the built-in synthetic corpus ==");
    let spec = DataSpec::default();
    let (dataset, tok) = train::prepare_data(&spec, &out.join("data"))?;
    let mut cfg = config::preset(&opts.preset)?;
    cfg.model.vocab_size = tok.vocab_size();
    cfg.train.seed = opts.seed;
    if let Some(s) = opts.steps {
        cfg.train.max_steps = s;
    }
    cfg.train.eval_interval = (cfg.train.max_steps / 4).max(1);
    cfg.validate()?;
    describe(opts, &cfg, &dataset, &tok);
    let mut trainer = Trainer::new(cfg.clone(), &tok, out, TrainerOptions::default())?;
    let initial = trainer.evaluate(&dataset.val, cfg.train.eval_batches)?;
    let summary = train::run(&mut trainer, &dataset, &RunOptions::default())?;
    let entropy = unigram_entropy(&dataset.train);
    let val_with = |routing: &RoutingOptions| {
        crate::eval::shard_loss(&trainer.model, &dataset.val, cfg.train.batch_size, cfg.train.seq_len, 0, routing)
    };
    let val = val_with(&RoutingOptions::default())?;
    println!(
        "         {} steps in {:.0} s ({:.0} tokens/s, peak RSS {:.0} MiB)",
        summary.steps, summary.seconds, summary.tokens_per_s, summary.peak_rss_mb
    );
    println!(
        "result   validation loss {val:.4} nats/token (perplexity {:.3}) on the whole validation split; before training {initial:.3}\n\
         \x20        unigram entropy of the data {entropy:.3} nats/token: the model is {:.0}% below it",
        val.exp(),
        100.0 * (1.0 - val / entropy)
    );
    let routing_line = last_routing_shares(out);
    if !routing_line.is_empty() {
        println!("routing  share of tokens taking each extra step (layer, step): {}", routing_line.join(", "));
    }

    // What the thinking buys: the same weights with the extra steps off (one step per layer).
    let calibration = trainer.calibration.clone().map(Arc::new);
    let mode = if calibration.is_some() { Routing::Threshold } else { Routing::TopK };
    let causal = RoutingOptions { mode, calibration: calibration.clone(), ..Default::default() };
    let off = RoutingOptions { steps: Some(1), ..Default::default() };
    let thinks = trainer.model.thinking_layers().next().is_some();
    let val_off = if thinks { Some(val_with(&off)?) } else { None };
    if let Some(val_off) = val_off {
        let val_causal = val_with(&causal)?;
        println!(
            "thinking validation loss {val_off:.4} with the extra steps off, {val:.4} on (top-k), {val_causal:.4} on (causal): \
             thinking gain {:.4} nats/token",
            val_off - val
        );
    }

    // Held-out problems, answered greedily with KV-cached, causally routed decoding.
    let problems = reasoning::default_problems();
    let on = reasoning::solve_rates(&trainer.model, &tok, &problems, &causal)?;
    println!("answers  held-out problems solved exactly (greedy, KV cache, causal routing): {}", on.line());
    let without = if thinks { Some(reasoning::solve_rates(&trainer.model, &tok, &problems, &off)?) } else { None };
    if let (Some(v), Some(w), Routing::Threshold) = (val_off, &without, mode) {
        dial(&trainer, &cfg, &tok, &problems, &causal, &val_with, (v, w))?;
    }
    let dense = match dense_preset(opts) {
        Some(name) => Some((train_dense(&name, &cfg, &dataset, &tok, &out.join("dense"), &problems)?, name)),
        None => None,
    };
    let mut table = vec![(format!("{}, thinking on", opts.preset), val, on)];
    if let (Some(v), Some(w)) = (val_off, without) {
        table.push((format!("{}, thinking off (same weights)", opts.preset), v, w));
    }
    if let Some((d, name)) = dense {
        table.push((format!("{name} (dense, {:.2}M parameters)", d.params as f64 / 1e6), d.val, d.rates));
    }
    compare(&table);
    show_sample(&trainer, &tok, calibration, mode)?;
    println!("files    {0}/metrics.jsonl, {0}/checkpoints/, {0}/data/, {0}/dense/ (the dense run)", out.display());
    println!("next     itt generate --checkpoint {} --prompt \"47+85=\" --show-depth --temperature 0", out.display());
    Ok(())
}

/// The compute dial (DESIGN §6): the same weights run at other shares of tokens per extra
/// step, chosen at inference by the causal thresholds tracked in training, so a user sees what
/// each share of thinking costs (FLOPs per token against the backbone run once) and buys.
fn dial(
    trainer: &Trainer,
    cfg: &config::RunConfig,
    tok: &Tokenizer,
    problems: &[reasoning::Problem],
    causal: &RoutingOptions,
    val_with: &dyn Fn(&RoutingOptions) -> Result<f64>,
    off: (f64, &reasoning::SolveRates),
) -> Result<()> {
    let th = &cfg.model.thinking;
    // The trained share when every step has the same one (the presets); otherwise no row is
    // the trained setting, which the comparison's "thinking on" row shows.
    let uniform = th.ratios.windows(2).all(|w| w[0] == w[1]);
    let trained = th.ratios.first().copied().filter(|_| uniform).unwrap_or(f64::NAN);
    let n = cfg.train.seq_len;
    let mut shares: Vec<f64> = DIAL_SHARES.to_vec();
    if trained.is_finite() && !shares.iter().any(|s| (s - trained).abs() < 1e-9) {
        shares.push(trained);
        shares.sort_by(f64::total_cmp);
    }
    println!(
        "dial     the same weights at other shares of tokens per extra step (causal routing, as generation runs):"
    );
    println!("         {:>13}  {:>15}  {:>8}  solved", "share", "FLOPs vs once", "val loss");
    for s in shares {
        // Share 0 is the backbone alone: one step per layer, no router run, as scored already
        // for the thinking-off comparison.
        let (steps, ratios) = if s > 0.0 { (None, Some(vec![s; th.ratios.len()])) } else { (Some(1), None) };
        let flops = crate::flops::flops_per_token(&cfg.model, n, steps, ratios.as_deref());
        let (val, rates) = if s > 0.0 {
            let routing = RoutingOptions { ratios, ..causal.clone() };
            (val_with(&routing)?, reasoning::solve_rates(&trainer.model, tok, problems, &routing)?)
        } else {
            (off.0, off.1.clone())
        };
        let label = match s {
            _ if (s - trained).abs() < 1e-9 => format!("{:.0}% (trained)", 100.0 * s),
            _ if s == 0.0 => "0% (off)".to_string(),
            _ => format!("{:.0}%", 100.0 * s),
        };
        println!(
            "         {label:>13}  {:>14.2}x  {val:8.4}  {:3}/{:<3}",
            flops.ratio_to_dense,
            rates.solved(),
            rates.asked()
        );
    }
    Ok(())
}

/// Shares the dial shows besides the trained one: none (the backbone alone), a few, all.
const DIAL_SHARES: [f64; 4] = [0.0, 0.3, 0.5, 1.0];

/// The dense preset of equal parameters for an ITT or Loop preset (`tiny-itt4` -> `tiny`), or
/// none when the demo's model is dense or the comparison is off.
fn dense_preset(opts: &DemoOptions) -> Option<String> {
    let (size, kind) = opts.preset.split_once('-')?;
    (opts.dense && !kind.is_empty()).then(|| size.to_string())
}

/// The dense twin's scores.
struct Scored {
    val: f64,
    rates: reasoning::SolveRates,
    params: usize,
}

/// Train the dense model on the same data, seed and steps (quietly), and score it as the ITT
/// model was: validation loss on the whole split, held-out problems greedily with a KV cache.
fn train_dense(
    name: &str,
    itt: &config::RunConfig,
    dataset: &crate::data::Dataset,
    tok: &Tokenizer,
    dir: &std::path::Path,
    problems: &[reasoning::Problem],
) -> Result<Scored> {
    let mut cfg = config::preset(name)?;
    cfg.model.vocab_size = itt.model.vocab_size;
    cfg.train = itt.train.clone();
    cfg.validate()?;
    println!(
        "dense    training {name} ({:.2}M parameters, no thinking) for the same {} steps, seed and data ...",
        cfg.model.n_params() as f64 / 1e6,
        cfg.train.max_steps
    );
    let mut trainer = Trainer::new(cfg.clone(), tok, dir, TrainerOptions::default())?;
    let summary = train::run(&mut trainer, dataset, &RunOptions { quiet: true, ..Default::default() })?;
    let val = crate::eval::shard_loss(
        &trainer.model,
        &dataset.val,
        cfg.train.batch_size,
        cfg.train.seq_len,
        0,
        &RoutingOptions::default(),
    )?;
    println!("         {} steps in {:.0} s ({:.0} tokens/s)", summary.steps, summary.seconds, summary.tokens_per_s);
    let rates = reasoning::solve_rates(&trainer.model, tok, problems, &RoutingOptions::default())?;
    Ok(Scored { val, rates, params: cfg.model.n_params() })
}

/// The comparison that matters, one line per model: validation loss and held-out problems
/// solved, in all and per kind.
fn compare(table: &[(String, f64, reasoning::SolveRates)]) {
    let kinds: Vec<String> = table.first().map(|t| t.2.by_kind.keys().cloned().collect()).unwrap_or_default();
    let width = table.iter().map(|t| t.0.len()).max().unwrap_or(0).max(5);
    let mut head = format!("compare  {:width$}  val loss  solved      ", "model");
    for k in &kinds {
        head.push_str(&format!(" {k:>6}"));
    }
    println!("{head}");
    for (name, val, rates) in table {
        let mut line = format!(
            "         {name:width$}  {val:8.4}  {:3}/{:<3} {:4.1}%",
            rates.solved(),
            rates.asked(),
            100.0 * rates.accuracy()
        );
        for k in &kinds {
            let (c, n) = rates.by_kind.get(k).copied().unwrap_or((0, 0));
            line.push_str(&format!(" {:>6}", format!("{c}/{n}")));
        }
        println!("{line}");
    }
}

/// The data, model and training settings, before training.
fn describe(opts: &DemoOptions, cfg: &config::RunConfig, dataset: &crate::data::Dataset, tok: &Tokenizer) {
    let m = &cfg.model;
    println!(
        "data     {:.2} MB of synthetic problems (arithmetic with carries, bracket closing, sorting, reversal, counting)\n\
         \x20        {} tokenizer, {} tokens | {} train / {} validation tokens",
        dataset.meta.train_tokens as f64 / 1e6 + dataset.meta.val_tokens as f64 / 1e6,
        tok.kind(),
        tok.vocab_size(),
        dataset.meta.train_tokens,
        dataset.meta.val_tokens
    );
    println!(
        "model    {}: {:.2}M parameters, {} layers; layers {:?} think for up to {} steps, {:?} of tokens per extra step",
        opts.preset,
        m.n_params() as f64 / 1e6,
        m.n_layers,
        m.thinking_layers(),
        m.thinking.steps,
        m.thinking.ratios
    );
    println!(
        "train    {} steps of {} x {} tokens, AdamW lr {} (warmup {}, cosine to 10%), seed {}",
        cfg.train.max_steps,
        cfg.train.batch_size,
        cfg.train.seq_len,
        cfg.train.lr,
        cfg.train.warmup_steps,
        cfg.train.seed
    );
}

/// The routed share and contribution of each (layer, step) in the run's last metrics line.
fn last_routing_shares(out: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .ok()
        .and_then(|t| t.lines().rev().find(|l| l.contains("\"routing\"")).map(str::to_string))
        .and_then(|l| serde_json::from_str::<serde_json::Value>(&l).ok())
        .and_then(|v| v.get("routing").cloned())
        .and_then(|r| r.as_array().cloned())
        .unwrap_or_default()
        .iter()
        .map(|r| {
            format!(
                "L{}s{} {:.0}% (adds {:.2} of |x|)",
                r["layer"],
                r["step"],
                100.0 * r["share"].as_f64().unwrap_or(0.0),
                r["contribution"].as_f64().unwrap_or(f64::NAN)
            )
        })
        .collect()
}

/// One problem answered with each token's thinking depth shown.
fn show_sample(
    trainer: &Trainer,
    tok: &Tokenizer,
    calibration: Option<Arc<crate::model::RouterCalibration>>,
    mode: Routing,
) -> Result<()> {
    let prompt = "12 13 14 15\n5837+2694=".to_string();
    let opts = GenerateOptions {
        max_new_tokens: 8,
        stop: vec!["\n".into()],
        stop_ids: vec![],
        ignore_eot: false,
        sampling: SamplingParams::greedy(),
        routing: RoutingOptions { mode, calibration, ..Default::default() },
        use_cache: true,
        prefill_chunk: 0,
        ..Default::default()
    };
    let max_depth = trainer.model.layer_steps().into_iter().max().unwrap_or(1) as u32;
    let mut text = String::new();
    for ev in generate::generate(&trainer.model, tok, std::slice::from_ref(&prompt), opts)? {
        if let Event::Token(t) = ev? {
            if t.text.is_empty() {
                continue;
            }
            text.push_str(&report::depth_mark(&t.text, &t.depth, max_depth, false));
        }
    }
    println!(
        "sample   {:?} -> {text}   (true answer {}; [a.b] = steps each thinking layer took to produce that token)",
        prompt.replace('\n', " "),
        synthetic::solve("5837+2694").unwrap_or_default()
    );
    Ok(())
}
