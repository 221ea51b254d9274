//! Commands that look at models, runs and the machine: info, tokenizer, bench, analyze,
//! report, convert, export.

use super::{ModelSource, RoutingArgs};
use crate::apps::{analysis, report};
use crate::base::config;
use crate::model::Routing;
use crate::ops::Precision;
use crate::{checkpoint, data, flops, Error, Result};
use clap::{Args, Subcommand};
use std::path::{Path, PathBuf};

#[derive(Args)]
pub struct InfoArgs {
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
    /// Print the run config as JSON, exactly what `--config FILE` accepts (figures stay in the text form).
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
pub enum TokenizerCmd {
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
pub struct BenchArgs {
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
    precision: Option<Precision>,
    /// Measure prefill and decode (with and without KV cache) for these presets instead of training,
    /// e.g. --decode tiny,tiny-loop4,tiny-itt4.
    #[arg(long, value_delimiter = ',')]
    decode: Option<Vec<String>>,
    /// Prompt tokens per sequence for --decode.
    #[arg(long, default_value_t = 128)]
    prompt_len: usize,
    /// Generated tokens per sequence for --decode and --gguf.
    #[arg(long, default_value_t = 64)]
    new_tokens: usize,
    /// Time `generate` (greedy, batch 1) on this model file instead: a .gguf (or a checkpoint
    /// folder); prefill and decode tokens/s, medians of --steps runs.
    #[arg(long)]
    gguf: Option<PathBuf>,
    /// With --gguf: the prompt (default: a 53-token paragraph, the one reference/llama_cpp_bench.py uses).
    #[arg(long)]
    prompt: Option<String>,
    /// With --gguf: quantized (products on the file's quantized weights) or f32.
    #[arg(long, value_enum, default_value = "quantized")]
    gguf_weights: crate::import::gguf::GgufWeights,
    /// With --gguf: llama-batched-bench's table instead, for these batch sizes (e.g. 1,4,16):
    /// B sequences of --prompt-len random tokens prefilled together, then --new-tokens steps of B tokens.
    #[arg(long, value_delimiter = ',')]
    batch: Option<Vec<usize>>,
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    serve: super::serve::ServeBenchArgs,
    #[command(flatten)]
    device: super::DeviceArg,
}

#[derive(Subcommand)]
pub enum AnalyzeCmd {
    /// Steps each token took in each thinking layer: HTML page, PNG heat map, JSON, terminal colours.
    Depth(DepthArgs),
    /// Router weights, shares, step overlap, phi norms and which tokens think more: PNG + JSON.
    Router(RouterArgs),
    /// The paper's section 2 study: attention-gradient nuclear norms, easy vs hard samples: PNG + JSON.
    GradSpikes(SpikeArgs),
}

#[derive(Args)]
pub struct DepthArgs {
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
pub struct RouterArgs {
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
pub struct SpikeArgs {
    /// Any checkpoint or run folder (dense, Loop or ITT), a .gguf file or a Hugging Face folder.
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
pub struct ReportArgs {
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
pub struct ConvertArgs {
    /// A .gguf file (llama architecture) or a Hugging Face LlamaForCausalLM folder.
    #[arg(long)]
    from: PathBuf,
    /// The checkpoint folder to write.
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
pub struct ExportArgs {
    /// An itt checkpoint or run folder (or a .gguf file / Hugging Face folder).
    #[arg(long)]
    checkpoint: PathBuf,
    #[arg(long)]
    out: PathBuf,
    /// itt (weights-only checkpoint), hf (Hugging Face LlamaForCausalLM) or gguf (llama); hf and gguf: dense models only.
    #[arg(long, default_value = "itt")]
    format: crate::import::ExportFormat,
    /// With --format gguf: the matrices' number format, f32 or quantized (q8_0, q4_0, q4_1,
    /// q4_k, q6_k; K-quant rows not a multiple of 256 long are written q8_0). Norms stay f32.
    #[arg(long, value_enum, default_value = "f32")]
    quantize: crate::import::gguf::GgufQuant,
}

pub fn info(a: InfoArgs) -> Result<()> {
    let (cfg, open_vocab) = match &a.checkpoint {
        Some(c) => (crate::import::open(c, &Default::default())?.info.config, false),
        None => a.model.load_vocab("tiny")?,
    };
    if let Some(r) = &a.ratios {
        config::check_ratios("--ratios", r)?;
    }
    let n = a.seq_len.unwrap_or(cfg.train.seq_len);
    let f = flops::flops_per_token(&cfg.model, n, a.steps, a.ratios.as_deref());
    if a.json {
        // A preset's vocabulary is its tokenizer's: written as null, so that `itt train
        // --config` of this file trains on any data as the preset does.
        println!("{}", if open_vocab { cfg.to_json_open_vocab() } else { cfg.to_json() });
    } else {
        println!("{}", report::info(&cfg, &f, n));
    }
    Ok(())
}

pub fn tokenizer(cmd: TokenizerCmd) -> Result<()> {
    let TokenizerCmd::Train { data, kind, vocab_size, jsonl_field, out } = cmd;
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

pub fn bench(a: BenchArgs) -> Result<()> {
    if a.steps == 0 {
        // A median of no runs: refused rather than quietly timing one.
        return Err(Error::usage("--steps must be at least 1 (the number of timed runs)"));
    }
    // Decoding needs a prompt to start from, and a batch of no sequences times nothing.
    if a.prompt_len == 0 && (a.decode.is_some() || a.batch.is_some()) {
        return Err(Error::usage("--prompt-len must be at least 1 (the prompt tokens of each sequence)"));
    }
    if a.batch.as_ref().is_some_and(|b| b.contains(&0)) || (a.decode.is_some() && a.batch_size == Some(0)) {
        return Err(Error::usage("batch sizes must be at least 1"));
    }
    let device = a.device.open()?;
    if let Some(checkpoint) = &a.serve.serve {
        if !device.is_cpu() {
            return Err(Error::usage(
                "--serve benchmarks the server on the CPU; for a GPU run `itt serve --device` and load it",
            ));
        }
        return super::serve::bench_serve(&a.serve, checkpoint, a.json);
    }
    if let Some(path) = &a.gguf {
        if a.decode.is_some() || a.precision.is_some() {
            return Err(Error::usage("--gguf times generation on a file; leave out --decode and --precision"));
        }
        if let Some(batches) = &a.batch {
            let (info, rows) = crate::apps::bench::batched_file(
                path,
                a.gguf_weights,
                batches,
                a.prompt_len,
                a.new_tokens,
                a.steps,
                &device,
            )?;
            if a.json {
                println!("{}", serde_json::json!({ "info": info, "rows": rows }));
            } else {
                println!(
                    "{} | weights {} | {} threads | loaded in {:.2} s | peak RSS {:.0} MiB | medians of {} runs",
                    info.model, info.quantized, info.threads, info.load_s, info.peak_rss_mb, a.steps
                );
                println!("{}", crate::apps::bench::BatchedRow::HEADER);
                for r in &rows {
                    println!("{}", r.row());
                }
            }
            return Ok(());
        }
        let prompt = a.prompt.as_deref().unwrap_or(crate::apps::bench::GENERATE_PROMPT);
        let r = crate::apps::bench::generate_file(path, a.gguf_weights, prompt, a.new_tokens, a.steps, &device)?;
        if a.json {
            println!("{}", serde_json::to_string(&r).unwrap());
        } else {
            println!("{}", r.table());
        }
        return Ok(());
    }
    if let Some(presets) = &a.decode {
        if a.precision.is_some() {
            return Err(Error::usage(
                "--precision applies to the training benchmark, not to --decode (decoding runs in f32)",
            ));
        }
        // Every name checked before the table starts, so that a typo gives one line, not a header.
        let configs = presets.iter().map(|p| config::preset(p)).collect::<Result<Vec<_>>>()?;
        println!("{}", crate::apps::bench::DecodeBench::HEADER);
        for mut cfg in configs {
            if let Some(v) = a.vocab {
                cfg.model.vocab_size = v;
            }
            let r = crate::apps::bench::decode(
                &cfg,
                a.batch_size.unwrap_or(1),
                a.prompt_len,
                a.new_tokens,
                a.serve.speculate,
                &device,
            )?;
            if a.json {
                println!("{}", serde_json::to_string(&r).unwrap());
            } else {
                println!("{}", r.row());
                if let Some(line) = r.speculate_line() {
                    println!("{line}");
                }
            }
        }
        return Ok(());
    }
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
    if let Some(p) = a.precision {
        cfg.train.precision = p;
    }
    cfg.validate()?;
    let r = crate::apps::bench::train_step(&cfg, a.steps, &device)?;
    if a.json {
        println!("{}", serde_json::to_string(&r).unwrap());
    } else {
        println!("{}", r.table());
    }
    Ok(())
}

pub fn analyze(cmd: AnalyzeCmd) -> Result<()> {
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

#[derive(Args)]
pub struct VerifyArgs {
    /// A checkpoint folder, or a run folder (all its checkpoints).
    pub path: PathBuf,
}

/// Whether checkpoint folder `d` of run `run` is gone and not the one `latest` names: pruned by
/// the run's writer (which never prunes that one) after it was listed. A missing folder that
/// `latest` names is damage.
fn pruned_meanwhile(run: &Path, d: &Path) -> bool {
    let latest = std::fs::read_to_string(run.join("latest")).ok().map(|rel| run.join(rel.trim()));
    !d.exists() && latest.is_none_or(|l| l != d)
}

/// Print each checkpoint's files as ok / BAD; fail if any is damaged.
pub fn verify(path: &Path) -> Result<()> {
    let dir = checkpoint::resolve(path);
    let dirs = match &dir {
        Ok(d) if d == path => vec![d.clone()],
        _ => checkpoint::run_checkpoints(path),
    };
    if dirs.is_empty() {
        return Err(dir.err().unwrap_or_else(|| Error::checkpoint(path, "holds no checkpoint")));
    }
    let mut damaged = vec![];
    let mut verified = 0;
    for d in &dirs {
        let result = checkpoint::verify(d, checkpoint::Check::Hashes);
        // Readers take no lock (DESIGN §14.1): a folder the writer pruned meanwhile is not damage.
        if dirs.len() > 1 && !matches!(&result, Ok(v) if v.is_intact()) && pruned_meanwhile(path, d) {
            println!("{}: removed while verifying (pruned by the run's writer)", d.display());
            continue;
        }
        verified += 1;
        match result {
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
    if verified == 0 {
        return Err(Error::checkpoint(path, "every checkpoint was removed while verifying; run it again"));
    }
    if damaged.is_empty() {
        return Ok(());
    }
    Err(Error::checkpoint(
        path,
        format!(
            "{} of {} checkpoint(s) damaged ({}); `itt train --resume` continues from the newest intact one",
            damaged.len(),
            verified,
            damaged.join(", ")
        ),
    ))
}

pub fn report(a: ReportArgs) -> Result<()> {
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

pub fn convert(a: ConvertArgs) -> Result<()> {
    println!("{}", crate::import::export(&a.from, &a.out, crate::import::ExportFormat::Itt, Default::default())?);
    Ok(())
}

pub fn export(a: ExportArgs) -> Result<()> {
    println!("{}", crate::import::export(&a.checkpoint, &a.out, a.format, a.quantize)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::pruned_meanwhile;

    #[test]
    fn a_folder_gone_is_pruned_unless_latest_names_it() {
        let tmp = tempfile::tempdir().unwrap();
        let run = tmp.path();
        let ck = |s: u32| run.join("checkpoints").join(format!("step-{s:08}"));
        std::fs::create_dir_all(ck(2)).unwrap();
        std::fs::write(run.join("latest"), "checkpoints/step-00000002\n").unwrap();
        assert!(pruned_meanwhile(run, &ck(1)), "an older folder that vanished was pruned");
        assert!(!pruned_meanwhile(run, &ck(2)), "a folder still there is not");
        std::fs::remove_dir_all(ck(2)).unwrap();
        assert!(!pruned_meanwhile(run, &ck(2)), "the folder latest names, missing, is damage");
    }
}
