//! `itt serve` and `itt bench --serve`.

use crate::import::gguf::GgufWeights;
use crate::import::{Format, OpenOptions, Opened};
use crate::serve::engine::EngineConfig;
use crate::serve::{bench, template::ChatTemplate, ServeOptions, Server};
use crate::{Error, Result};
use clap::Args;
use serde_json::json;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

#[derive(Args)]
pub struct ServeArgs {
    /// An itt checkpoint or run folder, a GGUF file, or a Hugging Face model folder.
    #[arg(long)]
    checkpoint: PathBuf,
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, default_value_t = 8080)]
    port: u16,
    #[command(flatten)]
    engine: EngineArgs,
    /// For a .gguf checkpoint: run the products on its quantized weights, or dequantize to f32.
    #[arg(long, value_enum, default_value_t = GgufWeights::Quantized)]
    gguf_weights: GgufWeights,
    /// The model name clients pass in `model` (default: the checkpoint's file or folder name).
    #[arg(long)]
    name: Option<String>,
    /// A Jinja chat template file, instead of the model's own.
    #[arg(long)]
    chat_template: Option<PathBuf>,
    /// Seed of requests that give none (each request gets its own, counted from this).
    #[arg(long, default_value_t = 1234)]
    seed: u64,
    /// Seconds running requests get to finish after SIGTERM before they end with
    /// finish_reason "shutdown".
    #[arg(long, default_value_t = 30.0)]
    grace: f64,
    /// Self-speculative decoding for requests that do not set `thinking.speculate`: draft K
    /// tokens with the routed steps off, verify them in one pass of the full model (same
    /// output; DESIGN §12). Needs a model with thinking steps; 0 = off.
    #[arg(long, value_name = "K", default_value_t = 0)]
    speculate: usize,
    #[command(flatten)]
    device: super::DeviceArg,
}

/// How the engine schedules (shared by `serve` and `bench --serve`).
#[derive(Args, Clone)]
pub struct EngineArgs {
    /// Sequences decoded together at most (continuous batching).
    #[arg(long, default_value_t = 16)]
    max_batch: usize,
    /// Requests waiting for a place at most; more get HTTP 429.
    #[arg(long, default_value_t = 64)]
    max_queue: usize,
    /// Prompt tokens fed per sequence and step at most (0 = whole prompts).
    #[arg(long, default_value_t = 256)]
    prefill_chunk: usize,
    /// The latency valve: when the time per output token climbs past this many milliseconds,
    /// lower the routed shares of requests that did not pin their own; raise them as load falls.
    #[arg(long)]
    latency_target: Option<f64>,
    /// The valve never scales the trained shares below this fraction.
    #[arg(long, default_value_t = 0.25)]
    share_floor: f64,
    /// Keep the KV caches of prompt prefixes, up to this many MB (LRU), for later requests that
    /// start with the same tokens; 0 = off.
    #[arg(long, default_value_t = 0)]
    prefix_cache_mb: usize,
}

impl EngineArgs {
    fn config(&self) -> Result<EngineConfig> {
        let latency_target = match self.latency_target {
            None => None,
            Some(ms) if ms.is_finite() && ms > 0.0 => Some(Duration::from_secs_f64(ms / 1000.0)),
            Some(ms) => return Err(Error::usage(format!("--latency-target must be > 0 milliseconds (got {ms})"))),
        };
        Ok(EngineConfig {
            max_batch: self.max_batch,
            max_queue: self.max_queue,
            prefill_chunk: self.prefill_chunk,
            latency_target,
            share_floor: self.share_floor,
            prefix_cache_bytes: self.prefix_cache_mb << 20,
        })
    }
}

/// How `start` serves a model, besides how it opens it.
pub struct StartOptions<'a> {
    pub engine: EngineConfig,
    /// The model name clients pass (default: the checkpoint's file or folder name).
    pub name: Option<String>,
    /// A Jinja chat template file, instead of the model's own.
    pub chat_template: Option<&'a Path>,
    pub seed: u64,
    pub grace: Duration,
    /// Drafted tokens per verify pass of requests that set none (0 = no speculation).
    pub speculate: usize,
}

/// Open a model for serving and start the server on `addr`; returns it and where its chat
/// template came from.
pub fn start(checkpoint: &Path, open: &OpenOptions, opts: StartOptions, addr: SocketAddr) -> Result<(Server, String)> {
    // A GGUF keeps its quantized weights (DESIGN §13); other formats load as they train.
    let opened = crate::import::open(checkpoint, open)?;
    let Opened { model, tokenizer: tok, info, format } = opened;
    if format == Format::Gguf {
        // The loader kept no f32 copies of quantized weights (DESIGN §13); give back what
        // reading the file freed.
        crate::base::util::release_free_memory();
    }
    let calibration = info.calibration.map(Arc::new);
    let template = ChatTemplate::find(checkpoint, opts.chat_template, &tok)?;
    let name = opts.name.unwrap_or_else(|| model_name(checkpoint));
    let origin = template.origin.clone();
    let serve = ServeOptions {
        engine: opts.engine,
        name,
        template,
        calibration,
        seed: opts.seed,
        grace: opts.grace,
        speculate: opts.speculate,
    };
    Ok((Server::start(model, tok, serve, addr)?, origin))
}

fn model_name(path: &Path) -> String {
    let p = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let stem = p.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_default();
    // A checkpoint folder (step-000300) names its run.
    if stem.starts_with("step-") || stem == "latest" {
        if let Some(run) = p.parent().and_then(|q| q.parent()).and_then(|q| q.file_name()) {
            return run.to_string_lossy().to_string();
        }
    }
    if stem.is_empty() {
        "model".into()
    } else {
        stem
    }
}

pub fn serve(a: ServeArgs) -> Result<()> {
    if !(a.grace.is_finite() && a.grace >= 0.0) {
        return Err(Error::usage(format!("--grace must be >= 0 seconds (got {})", a.grace)));
    }
    let addr = (a.host.as_str(), a.port)
        .to_socket_addrs()
        .map_err(|e| Error::usage(format!("--host {}: {e}", a.host)))?
        .next()
        .ok_or_else(|| Error::usage(format!("--host {} resolves to no address", a.host)))?;
    let open = OpenOptions { gguf_weights: a.gguf_weights, device: a.device.open()? };
    let opts = StartOptions {
        engine: a.engine.config()?,
        name: a.name,
        chat_template: a.chat_template.as_deref(),
        seed: a.seed,
        grace: Duration::from_secs_f64(a.grace),
        speculate: a.speculate,
    };
    let (server, template_origin) = start(&a.checkpoint, &open, opts, addr)?;
    eprintln!("chat template: {template_origin}");
    eprintln!("serving on http://{} (OpenAI API under /v1, web page at /, metrics at /metrics)", server.addr);
    server.wait()?;
    eprintln!("server stopped");
    Ok(())
}

/// `itt bench --serve`: the load benchmark.
#[derive(Args)]
pub struct ServeBenchArgs {
    /// Benchmark the server on this checkpoint (started in-process on a loopback port).
    #[arg(long = "serve")]
    pub serve: Option<PathBuf>,
    /// Concurrent streaming clients to measure at.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
    clients: Vec<usize>,
    /// Requests per client at each level.
    #[arg(long, default_value_t = 4)]
    requests: usize,
    /// Tokens generated per request.
    #[arg(long, default_value_t = 32)]
    max_tokens: usize,
    /// The prompt of every request.
    #[arg(long, default_value = "12+34=46\n5+17=")]
    bench_prompt: String,
    /// Run every level once without and once with the latency valve at this target (ms).
    #[arg(long)]
    valve_target: Option<f64>,
    /// Self-speculative decoding with K drafted tokens: with --serve the server's default,
    /// with --decode timed against plain decoding, with its acceptance rate.
    #[arg(long, value_name = "K")]
    pub speculate: Option<usize>,
    /// Instead of the load levels: time to first token of --requests requests that share an
    /// N-token prefix (the bench prompt's tokens repeated, as a system prompt) and differ
    /// after it, on the server without and with its prefix cache.
    #[arg(long, value_name = "N")]
    shared_prefix: Option<usize>,
}

pub fn bench_serve(a: &ServeBenchArgs, checkpoint: &Path, json_out: bool) -> Result<()> {
    if a.clients.is_empty() || a.clients.contains(&0) || a.requests == 0 {
        return Err(Error::usage("--clients and --requests must be at least 1"));
    }
    if let Some(n) = a.shared_prefix {
        return bench_shared_prefix(a, checkpoint, json_out, n);
    }
    let max_batch = a.clients.iter().copied().max().unwrap_or(1);
    let mut settings: Vec<Option<f64>> = vec![None];
    if let Some(t) = a.valve_target {
        settings.push(Some(t));
    }
    // Fixed-length requests: every one generates max_tokens (ignore_eos).
    let body = json!({"prompt": a.bench_prompt, "max_tokens": a.max_tokens, "temperature": 0.0, "ignore_eos": true});
    if !json_out {
        println!(
            "{:>7} {:>6} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10} {:>10} {:>6}",
            "clients",
            "valve",
            "reqs/s",
            "tokens/s",
            "lat p50",
            "lat p99",
            "ttft p50",
            "ttft p99",
            "tpot p50",
            "tpot p99",
            "share"
        );
    }
    for valve in settings {
        let engine = EngineConfig {
            max_batch,
            max_queue: 1024,
            prefill_chunk: 256,
            latency_target: valve.map(|ms| Duration::from_secs_f64(ms / 1000.0)),
            share_floor: 0.25,
            prefix_cache_bytes: 0,
        };
        let (server, url) = start_bench_server(checkpoint, engine, a.speculate.unwrap_or(0))?;
        // Warm up (first-touch allocations, thread pools).
        bench::load(&url, 1, 1, &body);
        for &c in &a.clients {
            let r = bench::load(&url, c, a.requests, &body);
            if let Some(e) = &r.first_error {
                eprintln!("warning: {} of {} requests failed; first: {e}", r.errors, r.requests);
            }
            if json_out {
                let mut v = serde_json::to_value(&r).map_err(|e| Error::usage(e.to_string()))?;
                v["valve_ms"] = json!(valve);
                println!("{v}");
            } else {
                let ms = |s: f64| format!("{:.1}ms", s * 1000.0);
                println!(
                    "{:>7} {:>6} {:>8.2} {:>9.1} {:>9} {:>9} {:>9} {:>9} {:>10} {:>10} {:>6}",
                    c,
                    valve.map(|v| format!("{v}ms")).unwrap_or("off".into()),
                    r.requests_per_s,
                    r.tokens_per_s,
                    ms(r.latency_p50),
                    ms(r.latency_p99),
                    ms(r.ttft_p50),
                    ms(r.ttft_p99),
                    ms(r.time_per_token_p50),
                    ms(r.time_per_token_p99),
                    r.mean_share.map(|s| format!("{s:.2}")).unwrap_or("-".into())
                );
            }
        }
        server.stop()?;
    }
    Ok(())
}

/// The benchmarks' server: `checkpoint` on the CPU (a GGUF on its quantized weights) on a
/// loopback port; returns it and its URL.
fn start_bench_server(checkpoint: &Path, engine: EngineConfig, speculate: usize) -> Result<(Server, String)> {
    let open = OpenOptions { gguf_weights: GgufWeights::Quantized, device: candle_core::Device::Cpu };
    let opts =
        StartOptions { engine, name: None, chat_template: None, seed: 1234, grace: Duration::from_secs(5), speculate };
    let (server, _) = start(checkpoint, &open, opts, "127.0.0.1:0".parse().expect("an address"))?;
    let url = format!("http://{}", server.addr);
    Ok((server, url))
}

/// POST `body` to `url` + `path` and read the JSON reply.
fn post_json(url: &str, path: &str, body: &serde_json::Value) -> Result<serde_json::Value> {
    let resp = ureq::post(&format!("{url}{path}"))
        .send_json(body.clone())
        .map_err(|e| Error::usage(format!("{path}: {}", e.to_string().lines().next().unwrap_or(""))))?;
    resp.into_json().map_err(|e| Error::usage(format!("{path}: reply is not JSON: {e}")))
}

/// One counter of the server's /metrics, 0 when absent.
fn metric(url: &str, name: &str) -> Result<f64> {
    let text = ureq::get(&format!("{url}/metrics"))
        .call()
        .map_err(|e| Error::usage(format!("/metrics: {e}")))?
        .into_string()
        .map_err(|e| Error::usage(format!("/metrics: {e}")))?;
    Ok(text.lines().find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok())).unwrap_or(0.0))
}

/// `itt bench --serve CKPT --shared-prefix N` (DESIGN §12, "Prefix cache"): requests made of
/// one N-token prefix and a question of their own, sent one after another, streamed, first to a
/// server without the prefix cache and then to one with it (after one request that fills it).
/// Prints the time to first token of each, their ratio, and the tokens the cache supplied.
fn bench_shared_prefix(a: &ServeBenchArgs, checkpoint: &Path, json_out: bool, n: usize) -> Result<()> {
    let mut rows = vec![];
    for cache_mb in [0usize, 1024] {
        let engine = EngineConfig {
            max_batch: 1,
            max_queue: 16,
            prefill_chunk: 256,
            latency_target: None,
            share_floor: 0.25,
            prefix_cache_bytes: cache_mb << 20,
        };
        let (server, url) = start_bench_server(checkpoint, engine, 0)?;
        let tokenize = |text: &str| -> Result<(Vec<u64>, usize)> {
            let v = post_json(&url, "/tokenize", &json!({ "prompt": text }))?;
            let ids = v["tokens"].as_array().map(|a| a.iter().filter_map(|t| t.as_u64()).collect()).unwrap_or_default();
            Ok((ids, v["max_model_len"].as_u64().unwrap_or(0) as usize))
        };
        let (unit, ctx) = tokenize(&a.bench_prompt)?;
        if unit.is_empty() {
            return Err(Error::usage("--bench-prompt gives no tokens to build the shared prefix from"));
        }
        let prefix: Vec<u64> = unit.iter().copied().cycle().take(n).collect();
        let question = |k: usize| -> Result<Vec<u64>> {
            let mut ids = prefix.clone();
            ids.extend(tokenize(&format!("\nQuestion {k}: what comes next?"))?.0);
            Ok(ids)
        };
        let longest = question(a.requests)?.len() + a.max_tokens;
        if longest > ctx {
            return Err(Error::usage(format!(
                "--shared-prefix {n}: a request needs {longest} tokens but the model's context is {ctx}"
            )));
        }
        let body =
            |ids: Vec<u64>| json!({"prompt": ids, "max_tokens": a.max_tokens, "temperature": 0.0, "ignore_eos": true});
        // Warm up (and, with the cache, fill it) with a question no timed request asks.
        bench::stream_completion(&url, &body(question(a.requests + 1)?), Duration::from_secs(600))?;
        let reused_before = metric(&url, "itt_prefix_cache_reused_tokens_total")?;
        let mut ttft = vec![];
        for k in 0..a.requests {
            let st = bench::stream_completion(&url, &body(question(k)?), Duration::from_secs(600))?;
            ttft.push(st.time_to_first_token.unwrap_or(st.latency));
        }
        let reused = (metric(&url, "itt_prefix_cache_reused_tokens_total")? - reused_before) / a.requests as f64;
        server.stop()?;
        ttft.sort_by(f64::total_cmp);
        rows.push((cache_mb, ttft[ttft.len() / 2], ttft, reused));
    }
    let (cold, warm) = (rows[0].1, rows[1].1);
    if json_out {
        let v = json!({
            "shared_prefix_tokens": n,
            "requests": a.requests,
            "ttft_p50_cold": cold,
            "ttft_p50_cached": warm,
            "ratio": warm / cold,
            "ttft_cold": rows[0].2,
            "ttft_cached": rows[1].2,
            "reused_tokens_per_request": rows[1].3,
        });
        println!("{v}");
    } else {
        println!(
            "{:>14} {:>9} {:>10} {:>10} {:>16}",
            "prefix cache", "requests", "ttft p50", "x cold", "reused/request"
        );
        for (mb, p50, _, reused) in &rows {
            let label = if *mb == 0 { "off".to_string() } else { format!("{mb} MB") };
            println!("{label:>14} {:>9} {:>8.1}ms {:>10.3} {:>16.0}", a.requests, p50 * 1000.0, p50 / cold, reused);
        }
        println!("shared prefix {n} tokens: time to first token with the cache {:.3}x the cold one", warm / cold);
    }
    Ok(())
}
