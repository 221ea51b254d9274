//! Commands that train: demo, train, retrofit, experiment.

use super::ModelSource;
use crate::apps::{demo, report};
use crate::base::config::{OnNonFinite, ResidualForm, Trainable};
use crate::ops::Precision;
use crate::train::{preempt, DataSpec, LaunchOptions, RunOptions, Start};
use crate::{data, Result};
use clap::Args;
use std::path::PathBuf;

#[derive(Args)]
pub struct DemoArgs {
    /// Run folder (replaced if it holds an earlier demo).
    #[arg(long, default_value = "runs/demo")]
    out: PathBuf,
    #[arg(long, default_value = "tiny-itt4")]
    preset: String,
    /// Optimiser steps (about 3 minutes on 2 cores).
    #[arg(long, default_value_t = 300)]
    steps: usize,
    #[arg(long, default_value_t = 1337)]
    seed: u64,
    /// Skip the dense model of equal parameters (trained on the same data, seed and steps
    /// for the comparison at the end).
    #[arg(long)]
    no_dense: bool,
}

#[derive(Args)]
pub struct TrainArgs {
    #[command(flatten)]
    model: ModelSource,
    /// Corpus: `builtin`, a text/.gz/.jsonl file, a folder, or a prepared dataset folder.
    #[arg(long, default_value = "builtin")]
    data: String,
    /// Tokenizer for a raw corpus: char, byte, bpe:N, or a tokenizer file.
    #[arg(long, default_value = "char")]
    tokenizer: String,
    /// JSONL field holding the text.
    #[arg(long, default_value = "text")]
    jsonl_field: String,
    /// Share of documents held out for validation.
    #[arg(long, default_value_t = 0.05)]
    val_fraction: f64,
    /// Run folder.
    #[arg(long, default_value = "runs/train")]
    out: PathBuf,
    /// Continue the run in --out from its latest checkpoint (or from --checkpoint).
    #[arg(long)]
    resume: bool,
    /// With --resume: the checkpoint to resume from.
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    #[arg(long)]
    seed: Option<u64>,
    /// Optimiser steps. With --resume: continue a run past its end to step N (the learning
    /// rate then stays at its final value; recorded in config.json and metrics.jsonl).
    #[arg(long)]
    steps: Option<usize>,
    /// Stop after this step (the schedule still runs to --steps); resume later.
    #[arg(long)]
    stop_at: Option<usize>,
    #[arg(long)]
    batch_size: Option<usize>,
    #[arg(long)]
    seq_len: Option<usize>,
    #[arg(long)]
    grad_accum: Option<usize>,
    #[arg(long)]
    lr: Option<f64>,
    #[arg(long)]
    warmup: Option<usize>,
    #[arg(long)]
    eval_interval: Option<usize>,
    /// Write a metrics line (and the progress message) every this many steps.
    #[arg(long)]
    log_interval: Option<usize>,
    #[arg(long)]
    checkpoint_interval: Option<usize>,
    /// Matrix products in f32, or bf16 (bf16 operands, f32 sums, f32 master weights).
    #[arg(long)]
    precision: Option<Precision>,
    /// On a NaN or infinite loss or gradient norm: stop (default; the last checkpoint is kept)
    /// or skip the batch (no update; counted in metrics.jsonl). Also applies with --resume.
    #[arg(long)]
    on_nonfinite: Option<OnNonFinite>,
    /// No progress output.
    #[arg(long)]
    quiet: bool,
    /// Signals that stop training at the next step boundary with a checkpoint and exit status
    /// 75 (comma-separated names or numbers, or none; default $ITT_PREEMPT_SIGNALS, else
    /// TERM,INT,USR1). A second signal exits at once.
    #[arg(long)]
    preempt_signals: Option<String>,
    #[command(flatten)]
    device: super::DeviceArg,
}

#[derive(Args)]
pub struct RetrofitArgs {
    /// The pretrained dense model: an itt checkpoint, a .gguf file or a Hugging Face folder.
    #[arg(long)]
    from: PathBuf,
    /// Fine-tuning corpus (file, folder, .gz, .jsonl, builtin) or a dataset prepared with the model's tokenizer.
    #[arg(long)]
    data: String,
    #[arg(long, default_value_t = 0.1)]
    val_fraction: f64,
    /// Run folder.
    #[arg(long, default_value = "runs/retrofit")]
    out: PathBuf,
    /// Thinking steps T of the ITT layers; 1 fine-tunes the dense model as it is (the baseline).
    #[arg(long, default_value_t = 4)]
    steps: usize,
    /// Share of tokens per routed step (T - 1 values; default 0.7 each).
    #[arg(long, value_delimiter = ',')]
    ratios: Option<Vec<f64>>,
    /// Layers that think (default every other layer: 1, 3, 5, ...).
    #[arg(long, value_delimiter = ',')]
    layers: Option<Vec<usize>>,
    /// Initial phi_t of the routed steps (0, the default: the retrofit model equals the pretrained one exactly).
    #[arg(long, default_value_t = 0.0)]
    phi_init: f64,
    /// What the routed steps accumulate: literal (f(x), the paper's Eq. 4) or update (f(x) - x).
    #[arg(long, default_value = "literal")]
    residual_form: ResidualForm,
    /// What to fine-tune: thinking (alias routers: step vectors and routers only) or all.
    #[arg(long, default_value = "thinking")]
    train: Trainable,
    /// Optimiser steps.
    #[arg(long, default_value_t = 200)]
    max_steps: usize,
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    #[arg(long, default_value_t = 128)]
    seq_len: usize,
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    #[arg(long, default_value_t = 10)]
    warmup: usize,
    /// Decoupled weight decay of matrices (0: keep the pretrained weights where they are).
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    #[arg(long, default_value_t = 50)]
    eval_interval: usize,
    /// Validation batches per evaluation (the same ones each time).
    #[arg(long, default_value_t = 8)]
    eval_batches: usize,
    #[arg(long, default_value_t = 1337)]
    seed: u64,
    #[arg(long)]
    quiet: bool,
}

#[derive(Args)]
pub struct ExperimentArgs {
    /// table1, table2, table3, fig4, scaling, steps or recipe.
    name: String,
    /// Model size(s): tiny, small, ... (scaling takes several, comma-separated).
    #[arg(long, default_value = "tiny", value_delimiter = ',')]
    preset: Vec<String>,
    /// Corpora (comma-separated): several give a table per corpus and one pooled over them,
    /// each corpus's data and runs in OUT/NAME (file stem and tokenizer, e.g. moby-dick-char).
    #[arg(long, default_value = "builtin", value_delimiter = ',')]
    data: Vec<String>,
    /// Tokenizer(s) for raw corpora (comma-separated: every corpus with each, e.g. char,bpe:1024).
    #[arg(long, default_value = "char", value_delimiter = ',')]
    tokenizer: Vec<String>,
    #[arg(long, default_value_t = 3)]
    seeds: usize,
    /// Learning-rate multipliers of every model (comma-separated, e.g. 0.5,1,2): a sweep that
    /// also reports each model at its own best rate.
    #[arg(long, default_value = "1", value_delimiter = ',')]
    lr_scales: Vec<f64>,
    /// Optimiser steps per run (default: the preset's).
    #[arg(long)]
    steps: Option<usize>,
    #[arg(long)]
    batch_size: Option<usize>,
    #[arg(long)]
    seq_len: Option<usize>,
    /// Validation batches per evaluation (0 = whole split).
    #[arg(long, default_value_t = 0)]
    eval_batches: usize,
    /// Held-out problems of each kind every model answers (built-in data; 0 = none).
    #[arg(long, default_value_t = 40)]
    problems: usize,
    /// Only these variants of the grid (comma-separated run names, e.g. dense,itt4; default all).
    #[arg(long, value_delimiter = ',')]
    variants: Vec<String>,
    /// Output folder (runs are reused/resumed when present).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Runs trained at once, each on its share of the threads (e.g. 2 on two cores: two
    /// one-thread runs side by side). CPU only; the results do not depend on it.
    #[arg(long, default_value_t = 1)]
    jobs: usize,
    #[arg(long)]
    quiet: bool,
    /// Signals that stop training at the next step boundary with a checkpoint and exit status
    /// 75 (comma-separated names or numbers, or none; default $ITT_PREEMPT_SIGNALS, else
    /// TERM,INT,USR1). A second signal exits at once.
    #[arg(long)]
    preempt_signals: Option<String>,
    #[command(flatten)]
    device: super::DeviceArg,
}

pub fn demo(a: DemoArgs) -> Result<()> {
    demo::run(&demo::DemoOptions {
        out: a.out,
        preset: a.preset,
        steps: Some(a.steps),
        seed: a.seed,
        dense: !a.no_dense,
    })
}

pub fn train(a: TrainArgs) -> Result<()> {
    preempt::install(&preempt::signals_from(a.preempt_signals.as_deref())?)?;
    let start = if a.resume {
        Start::Resume { from: a.checkpoint, steps: a.steps }
    } else {
        let (mut config, vocab_from_tokenizer) = a.model.load_vocab("tiny")?;
        let t = &mut config.train;
        macro_rules! set {
            ($field:ident, $v:expr) => {
                if let Some(v) = $v {
                    t.$field = v;
                }
            };
        }
        set!(seed, a.seed);
        set!(max_steps, a.steps);
        set!(batch_size, a.batch_size);
        set!(seq_len, a.seq_len);
        set!(grad_accum, a.grad_accum);
        set!(lr, a.lr);
        set!(warmup_steps, a.warmup);
        set!(eval_interval, a.eval_interval);
        set!(log_interval, a.log_interval);
        set!(checkpoint_interval, a.checkpoint_interval);
        set!(precision, a.precision);
        let ranks = crate::base::dist::launched_size().unwrap_or(1);
        let (accum, note) = crate::train::grad_accum_for_ranks(t.grad_accum, a.grad_accum.is_some(), ranks);
        t.grad_accum = accum;
        // Without the `mpi` feature an mpirun launch is refused next, in one line of its own.
        if let (Some(note), 0, true) = (note, crate::base::dist::launched_rank(), cfg!(feature = "mpi")) {
            eprintln!("{note}");
        }
        // Presets, and config files with a null vocab_size, take their vocabulary from the
        // tokenizer; a config file that gives a number must match it.
        Start::New { config: Box::new(config), vocab_from_tokenizer }
    };
    let opts = LaunchOptions {
        out: a.out,
        start,
        data: DataSpec {
            path: a.data,
            tokenizer: a.tokenizer,
            corpus: data::CorpusOptions { jsonl_field: a.jsonl_field, ..Default::default() },
            val_fraction: a.val_fraction,
        },
        on_nonfinite: a.on_nonfinite,
        device: a.device.device,
        device_optimizer: std::env::var("ITT_DEVICE_OPTIMIZER").is_ok_and(|v| v == "1"),
        run: RunOptions { quiet: a.quiet, stop_at: a.stop_at },
    };
    if let Some(summary) = crate::train::launch(&opts)? {
        println!("{}", report::train_summary(&summary));
    }
    Ok(())
}

pub fn retrofit(a: RetrofitArgs) -> Result<()> {
    use crate::base::config::{ModelKind, ThinkingConfig, TrainConfig};
    let thinking = if a.steps <= 1 {
        ThinkingConfig::default()
    } else {
        ThinkingConfig {
            kind: ModelKind::Itt,
            steps: a.steps,
            ratios: a.ratios.clone().unwrap_or_else(|| vec![0.7; a.steps - 1]),
            layers: a.layers.clone(),
            phi_init: a.phi_init,
            residual_form: a.residual_form,
            ..Default::default()
        }
    };
    let train = TrainConfig {
        batch_size: a.batch_size,
        seq_len: a.seq_len,
        max_steps: a.max_steps,
        lr: a.lr,
        warmup_steps: a.warmup,
        weight_decay: a.weight_decay,
        eval_interval: a.eval_interval,
        eval_batches: a.eval_batches,
        seed: a.seed,
        trainable: a.train,
        ..TrainConfig::default()
    };
    let opts = crate::import::retrofit::RetrofitOptions {
        from: a.from,
        data: a.data,
        val_fraction: a.val_fraction,
        out: a.out,
        thinking,
        train,
        quiet: a.quiet,
    };
    let report = crate::import::retrofit::run(&opts)?;
    println!("{}", report.table());
    Ok(())
}

pub fn experiment(a: ExperimentArgs) -> Result<()> {
    // The run in flight checkpoints and stops; the same command later resumes the grid there.
    preempt::install(&preempt::signals_from(a.preempt_signals.as_deref())?)?;
    let opts = crate::apps::experiment::ExperimentOptions {
        out: a.out.clone().unwrap_or_else(|| PathBuf::from("runs/experiments")),
        name: a.name,
        sizes: a.preset,
        data: a
            .data
            .iter()
            .flat_map(|path| {
                a.tokenizer.iter().map(|tok| DataSpec {
                    path: path.clone(),
                    tokenizer: tok.clone(),
                    ..Default::default()
                })
            })
            .collect(),
        lr_scales: a.lr_scales,
        seeds: a.seeds,
        steps: a.steps,
        batch_size: a.batch_size,
        seq_len: a.seq_len,
        eval_batches: a.eval_batches,
        problems: a.problems,
        variants: a.variants,
        jobs: a.jobs,
        quiet: a.quiet,
        device: a.device.open()?,
        command: format!("itt {}", std::env::args().skip(1).collect::<Vec<_>>().join(" ")),
    };
    let r = crate::apps::experiment::run(&opts)?;
    println!("{}", crate::apps::experiment::markdown(&r, &opts));
    println!("written: {}/{}/results.json, results.md, loss.png", opts.out.display(), opts.name);
    Ok(())
}
