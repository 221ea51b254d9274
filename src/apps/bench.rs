//! Benchmarks that print numbers (never asserted in tests): training step throughput and
//! peak memory for a configuration, on random tokens.

use crate::base::config::RunConfig;
use crate::base::rng::Rng;
use crate::flops::flops_per_token;
use crate::import::OpenOptions;
use crate::model::{Model, RoutingOptions};
use crate::optim::{AdamW, Optimizer};
use crate::{Error, Result};
use candle_core::Device;
use serde::Serialize;
use std::time::Instant;

#[derive(Clone, Debug, Serialize)]
pub struct TrainBench {
    pub preset: Option<String>,
    pub params: usize,
    pub batch: usize,
    pub seq_len: usize,
    pub steps: usize,
    /// Median seconds per optimiser step (forward + backward + AdamW).
    pub step_s_median: f64,
    pub step_s_min: f64,
    /// Median seconds of the step's phases: forward (loss included), backward, and gradient
    /// accumulation + clipping norm + AdamW.
    pub forward_s_median: f64,
    pub backward_s_median: f64,
    pub optimizer_s_median: f64,
    pub tokens_per_s: f64,
    /// Analytic training FLOPs per token and the rate they imply at the median step time.
    pub train_flops_per_token: f64,
    pub gflops_per_s: f64,
    pub peak_rss_mb: f64,
    pub threads: usize,
    /// Number format of the matrix products (`ops::Precision`).
    pub precision: crate::ops::Precision,
    /// Which kernels the products ran on (`Precision::kernels`).
    pub kernels: String,
    /// Rate of one large square matrix product (2048^3) in that precision on this machine, and
    /// the model FLOP utilisation against it (`gflops_per_s / gemm_gflops_per_s`).
    pub gemm_gflops_per_s: f64,
    pub mfu: f64,
    /// Where it ran ("cpu", "cuda:0").
    pub device: String,
    /// On a GPU: the most device memory in use after any step (MiB, cuMemGetInfo), and model
    /// FLOP utilisation against the GPU's dense peak (`ITT_GPU_PEAK_TFLOPS`, default the
    /// H200's 989 bf16 TFLOP/s) rather than against the measured 2048^3 product.
    pub gpu_memory_mb: Option<f64>,
    pub gpu_peak_tflops: Option<f64>,
    pub mfu_of_peak: Option<f64>,
}

/// The GPU's dense peak in TFLOP/s for model FLOP utilisation: `ITT_GPU_PEAK_TFLOPS`, else
/// the H200's bf16 dense figure (989; its f32 figure without tensor cores is ~67).
pub fn gpu_peak_tflops() -> f64 {
    std::env::var("ITT_GPU_PEAK_TFLOPS").ok().and_then(|v| v.parse().ok()).filter(|v: &f64| *v > 0.0).unwrap_or(989.0)
}

impl TrainBench {
    pub fn table(&self) -> String {
        format!(
            "preset {} | {:.2}M params | batch {}x{} | {} steps\n\
             step {:.3} s median ({:.3} min) | {:.0} tokens/s | {:.1} GFLOP/s | peak RSS {:.0} MiB | {} threads\n\
             phases (medians): forward {:.3} s | backward {:.3} s | gradients + AdamW {:.3} s\n\
             {} products ({}); a 2048^3 product runs at {:.0} GFLOP/s here, so model FLOP utilisation {:.0}%",
            self.preset.as_deref().unwrap_or("custom"),
            self.params as f64 / 1e6,
            self.batch,
            self.seq_len,
            self.steps,
            self.step_s_median,
            self.step_s_min,
            self.tokens_per_s,
            self.gflops_per_s,
            self.peak_rss_mb,
            self.threads,
            self.forward_s_median,
            self.backward_s_median,
            self.optimizer_s_median,
            self.precision.name(),
            self.kernels,
            self.gemm_gflops_per_s,
            100.0 * self.mfu
        ) + &match (self.gpu_memory_mb, self.mfu_of_peak, self.gpu_peak_tflops) {
            (Some(mem), Some(mfu), Some(peak)) => format!(
                "\n{}: peak GPU memory {mem:.0} MiB | model FLOP utilisation {:.1}% of {peak:.0} TFLOP/s",
                self.device,
                100.0 * mfu
            ),
            _ => String::new(),
        }
    }
}

/// Time `steps` training steps (after one warm-up step) of the configuration on `device`
/// (on a GPU with the device optimiser, as training runs there; DESIGN §15).
pub fn train_step(cfg: &RunConfig, steps: usize, device: &Device) -> Result<TrainBench> {
    // What training would run here (bf16 falls back to f32 without bf16 hardware, as in
    // `Trainer::new`), so the benchmark never times a path no run takes.
    let precision = if device.is_cpu() { cfg.train.precision.on_this_cpu() } else { cfg.train.precision };
    let fell_back = precision != cfg.train.precision;
    let mut model = Model::new(&cfg.model, cfg.train.seed, device)?;
    model.precision = precision;
    let (b, t) = (cfg.train.batch_size, cfg.train.seq_len);
    let mut rng = Rng::new(cfg.train.seed);
    let state = AdamW::new(&model.params);
    let mut opt = Optimizer::new(&model.params, cfg.train.trainable, state, !device.is_cpu())?;
    let mut gpu_memory_mb = crate::base::util::gpu_memory_used_mb(device);
    let (mut times, mut fwd, mut bwd, mut opt_times) = (vec![], vec![], vec![], vec![]);
    for i in 0..steps.max(1) + 1 {
        let v = cfg.model.vocab_size as u64;
        let inp: Vec<u32> = (0..b * t).map(|_| rng.below(v) as u32).collect();
        let tgt: Vec<u32> = (0..b * t).map(|_| rng.below(v) as u32).collect();
        let sync = || crate::base::util::synchronize(device);
        sync()?;
        let t0 = Instant::now();
        let loss = model.loss(&inp, &tgt, b, t, &RoutingOptions::default(), None)?;
        sync()?;
        let t1 = Instant::now();
        // Each linear node carries its precision into the backward pass.
        let grads = loss.backward()?;
        sync()?;
        let t2 = Instant::now();
        opt.zero();
        opt.accumulate(&model.params, &grads)?;
        drop(grads);
        let norm = opt.finish()?;
        opt.update(&model.params, norm, 1e-4, &cfg.train)?;
        sync()?;
        if let Some(used) = crate::base::util::gpu_memory_used_mb(device) {
            gpu_memory_mb = Some(gpu_memory_mb.unwrap_or(0.0).max(used));
        }
        if i > 0 {
            let t3 = Instant::now();
            times.push((t3 - t0).as_secs_f64());
            fwd.push((t1 - t0).as_secs_f64());
            bwd.push((t2 - t1).as_secs_f64());
            opt_times.push((t3 - t2).as_secs_f64());
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let med = median(&mut times);
    let f = flops_per_token(&cfg.model, t, None, None);
    let gemm_rate = gemm_gflops(precision, device)?;
    let rate = f.train * (b * t) as f64 / med / 1e9;
    let gpu_peak_tflops = (!device.is_cpu()).then(gpu_peak_tflops);
    Ok(TrainBench {
        preset: cfg.preset.clone(),
        params: model.n_params(),
        batch: b,
        seq_len: t,
        steps: times.len(),
        step_s_median: med,
        step_s_min: times[0],
        forward_s_median: median(&mut fwd),
        backward_s_median: median(&mut bwd),
        optimizer_s_median: median(&mut opt_times),
        tokens_per_s: (b * t) as f64 / med,
        train_flops_per_token: f.train,
        gflops_per_s: rate,
        peak_rss_mb: crate::base::util::peak_rss_mb(),
        threads: candle_core::utils::get_num_threads(),
        precision,
        kernels: match (device.is_cpu(), precision) {
            (true, p) if fell_back => format!(
                "{}; bf16 asked, but with no bf16 kernel faster than f32 here (AMX; AVX512_BF16 on AMD) training runs f32, as timed (ITT_BF16_EMULATE=1 emulates bf16)",
                p.kernels()
            ),
            (true, p) => p.kernels(),
            (false, crate::ops::Precision::Bf16) => "bf16 operands, cuBLAS with f32 accumulation".into(),
            (false, crate::ops::Precision::F32) => "f32 cuBLAS".into(),
        },
        gemm_gflops_per_s: gemm_rate,
        mfu: rate / gemm_rate,
        device: device_name(device),
        gpu_memory_mb,
        gpu_peak_tflops,
        mfu_of_peak: gpu_peak_tflops.map(|peak| rate / (peak * 1e3)),
    })
}

/// "cpu" or "cuda:N", for reports.
pub fn device_name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// GFLOP/s of a 2048 x 2048 x 2048 product through `ops::linear` in `precision` (best of 3),
/// the yardstick for model FLOP utilisation.
pub fn gemm_gflops(precision: crate::ops::Precision, device: &Device) -> Result<f64> {
    let n = 2048;
    let x = candle_core::Tensor::randn(0f32, 1.0, (n, n), device)?;
    let w = candle_core::Tensor::randn(0f32, 1.0, (n, n), device)?;
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        crate::base::util::synchronize(device)?;
        let t0 = Instant::now();
        let y = crate::ops::linear(&x, &w, precision)?;
        crate::base::util::synchronize(device)?;
        drop(y);
        best = best.min(t0.elapsed().as_secs_f64());
    }
    Ok(2.0 * (n * n * n) as f64 / best / 1e9)
}

#[derive(Clone, Debug, Serialize)]
pub struct DecodeBench {
    pub preset: Option<String>,
    pub params: usize,
    pub batch: usize,
    pub prompt_len: usize,
    pub new_tokens: usize,
    /// Prompt tokens per second, all prompts in one packed call.
    pub prefill_tokens_per_s: f64,
    /// Generated tokens per second with KV caches (threshold routing for ITT).
    pub decode_cached_tokens_per_s: f64,
    /// Generated tokens per second re-running the whole text for every token.
    pub decode_uncached_tokens_per_s: f64,
    /// KV-cache bytes after the last token, all sequences.
    pub cache_bytes: usize,
    /// The same if every (layer, step) cached every token (what routing saves).
    pub cache_bytes_if_unrouted: usize,
    /// With `--speculate K`: greedy decoding of the first sequence with and without it.
    pub speculate: Option<SpecBench>,
}

/// Greedy decoding of one sequence, plain and self-speculative (`crate::speculate`).
#[derive(Clone, Debug, Serialize)]
pub struct SpecBench {
    pub k: usize,
    pub tokens: usize,
    pub plain_tokens_per_s: f64,
    pub speculative_tokens_per_s: f64,
    /// Share of drafted tokens the full model kept.
    pub acceptance: f64,
    pub verify_passes: usize,
    /// Whether both gave the same tokens (greedy speculation must).
    pub identical: bool,
}

/// Prefill and decode throughput of a freshly initialised model on random tokens.
pub fn decode(
    cfg: &RunConfig,
    batch: usize,
    prompt_len: usize,
    new_tokens: usize,
    speculate: Option<usize>,
    dev: &Device,
) -> Result<DecodeBench> {
    use crate::model::{ForwardRecord, RouterCalibration, Routing, SeqLayout};
    use candle_core::Tensor;
    use std::sync::Arc;
    let model = Model::new(&cfg.model, cfg.train.seed, dev)?;
    let sync = || crate::base::util::synchronize(dev);
    let mut rng = Rng::new(7);
    let v = cfg.model.vocab_size as u64;
    let mut draw = |n: usize| -> Vec<u32> { (0..n).map(|_| rng.below(v) as u32).collect() };
    let mut routing = RoutingOptions::default();
    if model.has_routers() {
        // Thresholds from a top-k pass over random text, as `itt calibrate` would.
        let ids = draw(4 * prompt_len);
        let mut rec = ForwardRecord::with_scores();
        model.forward(
            &Tensor::from_slice(&ids, ids.len(), dev)?,
            &SeqLayout::uniform(4, prompt_len),
            &routing,
            None,
            Some(&mut rec),
        )?;
        let mut cal = RouterCalibration::new();
        cal.update(&mut rec, 0.0);
        routing = RoutingOptions { mode: Routing::Threshold, calibration: Some(Arc::new(cal)), ..Default::default() };
    }
    let prompts = draw(batch * prompt_len);
    let mut caches: Vec<_> = (0..batch).map(|_| model.new_cache()).collect();
    // Warm-up (allocator, thread pool), not timed.
    let warm = Tensor::from_slice(&prompts, prompts.len(), dev)?;
    model.forward_hidden(&warm, &SeqLayout::uniform(batch, prompt_len), &routing, None, None)?;
    sync()?;
    let t0 = Instant::now();
    let x = Tensor::from_slice(&prompts, prompts.len(), dev)?;
    model.forward_hidden(&x, &SeqLayout::uniform(batch, prompt_len), &routing, Some(&mut caches), None)?;
    sync()?;
    let prefill = t0.elapsed().as_secs_f64();
    let next = draw(batch * new_tokens);
    let t0 = Instant::now();
    for i in 0..new_tokens {
        let ids: Vec<u32> = (0..batch).map(|b| next[b * new_tokens + i]).collect();
        let layout = SeqLayout::with_past(&vec![1; batch], &vec![prompt_len + i; batch]);
        let h =
            model.forward_hidden(&Tensor::from_slice(&ids, batch, dev)?, &layout, &routing, Some(&mut caches), None)?;
        model.logits(&h)?;
    }
    sync()?;
    let cached = t0.elapsed().as_secs_f64();
    let cache_bytes = caches.iter().map(|c| c.bytes()).sum();
    let per_token: usize = 2 * cfg.model.n_kv_heads * cfg.model.head_dim() * 4;
    let slots: usize = model.layer_steps().iter().sum();
    let cache_bytes_if_unrouted = batch * (prompt_len + new_tokens) * per_token * slots;
    // Uncached: re-run the whole text for a few tokens (it grows; extrapolating is unfair).
    let uncached_n = new_tokens.min(8);
    let t0 = Instant::now();
    for i in 0..uncached_n {
        let len = prompt_len + i + 1;
        let mut ids = Vec::with_capacity(batch * len);
        for b in 0..batch {
            ids.extend_from_slice(&prompts[b * prompt_len..(b + 1) * prompt_len]);
            ids.extend((0..=i).map(|j| next[b * new_tokens + j]));
        }
        let h = model.forward_hidden(
            &Tensor::from_slice(&ids, ids.len(), dev)?,
            &SeqLayout::uniform(batch, len),
            &routing,
            None,
            None,
        )?;
        model.logits(&h)?;
    }
    sync()?;
    let uncached = t0.elapsed().as_secs_f64();
    let speculate = match speculate {
        Some(k) => Some(speculate_bench(&model, &prompts[..prompt_len], &routing, new_tokens, k)?),
        None => None,
    };
    Ok(DecodeBench {
        preset: cfg.preset.clone(),
        params: model.n_params(),
        batch,
        prompt_len,
        new_tokens,
        prefill_tokens_per_s: (batch * prompt_len) as f64 / prefill,
        decode_cached_tokens_per_s: (batch * new_tokens) as f64 / cached,
        decode_uncached_tokens_per_s: (batch * uncached_n) as f64 / uncached,
        cache_bytes,
        cache_bytes_if_unrouted,
        speculate,
    })
}

/// Greedy decoding of `n` tokens after `prompt`, plain then with `k` drafted tokens per verify
/// pass; each timed after the prompt's prefill and its first token.
fn speculate_bench(model: &Model, prompt: &[u32], routing: &RoutingOptions, n: usize, k: usize) -> Result<SpecBench> {
    use crate::generate::{argmax, SamplingParams};
    use crate::model::SeqLayout;
    use crate::speculate::{unsupported, Context, SpecStats, Speculator};
    use candle_core::{DType, Tensor};
    if k == 0 || n < 2 {
        return Err(Error::usage("--speculate needs K >= 1 and --new-tokens >= 2"));
    }
    if let Some(why) = unsupported(model, routing, true) {
        return Err(Error::usage(format!("--speculate: {why}")));
    }
    let dev = model.device();
    let last_logits = |ids: &[u32], cache: &mut crate::model::SeqCache| -> Result<Vec<f32>> {
        let layout = SeqLayout::with_past(&[ids.len()], &[cache.seen]);
        let x = Tensor::from_slice(ids, ids.len(), dev)?;
        let h = model.forward_hidden(&x, &layout, routing, Some(std::slice::from_mut(cache)), None)?;
        let h = h.narrow(0, ids.len() - 1, 1)?;
        Ok(model.logits(&h)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
    };
    let reserve = prompt.len() + n + k + 1;
    let run = |spec: bool| -> Result<(Vec<u32>, f64, SpecStats)> {
        let mut cache = model.new_cache_reserved(reserve);
        let mut ids = prompt.to_vec();
        ids.push(argmax(&last_logits(prompt, &mut cache)?));
        let mut stats = SpecStats::default();
        let mut sp = Speculator::new(model, k, reserve);
        let sampling = SamplingParams::greedy();
        let mut rng = Rng::new(0);
        let t0 = Instant::now();
        while ids.len() < prompt.len() + n {
            let left = prompt.len() + n - ids.len();
            if spec && left > 1 {
                let ctx = Context { ids: &ids, prompt_len: prompt.len(), routing, sampling: &sampling };
                let r = sp.round(model, &ctx, &mut cache, &mut rng, k.min(left - 1))?;
                stats.add(&r.stats);
                ids.extend(r.tokens.iter().map(|t| t.id));
            } else {
                let last = *ids.last().expect("non-empty");
                ids.push(argmax(&last_logits(&[last], &mut cache)?));
            }
        }
        crate::base::util::synchronize(dev)?;
        Ok((ids, t0.elapsed().as_secs_f64(), stats))
    };
    let (plain, plain_s, _) = run(false)?;
    let (spec, spec_s, stats) = run(true)?;
    let timed = (n - 1) as f64;
    Ok(SpecBench {
        k,
        tokens: n,
        plain_tokens_per_s: timed / plain_s,
        speculative_tokens_per_s: timed / spec_s,
        acceptance: stats.acceptance(),
        verify_passes: stats.verify_passes,
        identical: plain == spec,
    })
}

impl DecodeBench {
    pub fn row(&self) -> String {
        format!(
            "| {} | {:.2}M | {}x{} | {:.0} | {:.1} | {:.1} | {:.2} MiB ({:.0}% of unrouted) |",
            self.preset.as_deref().unwrap_or("custom"),
            self.params as f64 / 1e6,
            self.batch,
            self.prompt_len,
            self.prefill_tokens_per_s,
            self.decode_cached_tokens_per_s,
            self.decode_uncached_tokens_per_s,
            self.cache_bytes as f64 / (1 << 20) as f64,
            100.0 * self.cache_bytes as f64 / self.cache_bytes_if_unrouted as f64
        )
    }
    /// The speculation line under the row, when measured.
    pub fn speculate_line(&self) -> Option<String> {
        let s = self.speculate.as_ref()?;
        Some(format!(
            "  speculate k={}: {:.1} tokens/s vs {:.1} plain ({:.2}x), acceptance {:.1}%, {} verify passes for {} tokens, text {}",
            s.k,
            s.speculative_tokens_per_s,
            s.plain_tokens_per_s,
            s.speculative_tokens_per_s / s.plain_tokens_per_s,
            100.0 * s.acceptance,
            s.verify_passes,
            s.tokens,
            if s.identical { "identical" } else { "DIFFERENT" }
        ))
    }
    pub const HEADER: &'static str = "| preset | params | batch x prompt | prefill tok/s | decode tok/s (cache) | decode tok/s (no cache) | KV cache |\n|---|---|---|---|---|---|---|";
}

/// The default prompt of `itt bench --gguf`: plain prose (no chat template), 53 tokens with
/// SmolLM2's tokenizer, the prompt `reference/llama_cpp_bench.py` gives llama.cpp.
pub const GENERATE_PROMPT: &str = "The old lighthouse keeper climbed the spiral stairs every evening at dusk, \
carrying a lantern and a small notebook in which he recorded the ships that passed. One stormy night in \
November, he noticed a strange green light far out at sea that did not move with the waves.";

/// Prefill and decode speed of `generate` (greedy, batch 1, KV cache) on a model read for
/// inference (`import::open`), `runs` times; medians are reported.
#[derive(Clone, Debug, Serialize)]
pub struct GenerateBench {
    pub model: String,
    /// The products' weights: "f32" or the quantized types, e.g. "Q4_1 x210, Q8_0 x1".
    pub quantized: String,
    pub threads: usize,
    pub prompt_tokens: usize,
    /// Tokens generated per run (fewer than asked when the model ends its text).
    pub new_tokens: usize,
    /// Time to the first generated token: the prompt's forward pass, the head, the sampling.
    pub prefill_s_median: f64,
    pub prefill_tokens_per_s: f64,
    /// Tokens after the first over the time after the first.
    pub decode_tokens_per_s: f64,
    pub decode_tokens_per_s_runs: Vec<f64>,
    pub load_s: f64,
    pub peak_rss_mb: f64,
    /// Resident memory on transparent huge pages at the end, MiB, and the kernel's policy for
    /// them (`util::huge_pages`).
    pub huge_pages_mb: f64,
    pub huge_pages_mode: String,
    /// The generated text of the last run, to compare with another implementation's.
    pub text: String,
}

/// Routing for timing generation on a model file with its KV cache: a model that routes
/// decodes causally on its stored thresholds, as `itt generate` does (top-k is not causal);
/// the others take the default.
fn file_routing(opened: &crate::import::Opened, path: &std::path::Path) -> Result<RoutingOptions> {
    if !opened.model.has_routers() {
        return Ok(RoutingOptions::default());
    }
    let calibration = opened.info.calibration.clone().ok_or_else(|| {
        Error::usage(format!(
            "{} has no stored router thresholds, needed to decode causally with a KV cache; run `itt calibrate --checkpoint {}`",
            path.display(),
            path.display()
        ))
    })?;
    Ok(RoutingOptions {
        mode: crate::model::Routing::Threshold,
        calibration: Some(std::sync::Arc::new(calibration)),
        ..Default::default()
    })
}

pub fn generate_file(
    path: &std::path::Path,
    weights: crate::import::gguf::GgufWeights,
    prompt: &str,
    new_tokens: usize,
    runs: usize,
    device: &Device,
) -> Result<GenerateBench> {
    use crate::generate::{Event, GenerateOptions, SamplingParams};
    let t0 = Instant::now();
    let opened = crate::import::open(path, &OpenOptions { gguf_weights: weights, device: device.clone() })?;
    let routing = file_routing(&opened, path)?;
    let (model, tok) = (opened.model, opened.tokenizer);
    let load_s = t0.elapsed().as_secs_f64();
    let prompt_tokens = tok.encode(prompt)?.len();
    let (mut prefill, mut decode, mut count, mut text) = (vec![], vec![], 0, String::new());
    // One run more than asked: the first warms caches and pages, and is not counted.
    for run in 0..runs.max(1) + 1 {
        let opts = GenerateOptions {
            max_new_tokens: new_tokens,
            sampling: SamplingParams { temperature: 0.0, ..Default::default() },
            routing: routing.clone(),
            ..Default::default()
        };
        let t0 = Instant::now();
        let (mut first, mut n) = (None, 0);
        text.clear();
        for ev in crate::generate::generate(&model, &tok, &[prompt.to_string()], opts)? {
            if let Event::Token(t) = ev? {
                first.get_or_insert_with(|| t0.elapsed().as_secs_f64());
                text.push_str(&t.text);
                n += 1;
            }
        }
        let total = t0.elapsed().as_secs_f64();
        if run > 0 {
            if let Some(f) = first {
                prefill.push(f);
                if n > 1 {
                    decode.push((n - 1) as f64 / (total - f));
                }
            }
            count = n;
        }
    }
    let prefill_s = median(&prefill);
    let (huge_pages_mb, huge_pages_mode) = crate::base::util::huge_pages();
    let quantized = if model.is_quantized() { model.quantized_summary() } else { "f32".into() };
    Ok(GenerateBench {
        model: path.display().to_string(),
        quantized,
        threads: rayon::current_num_threads(),
        prompt_tokens,
        new_tokens: count,
        prefill_s_median: prefill_s,
        prefill_tokens_per_s: prompt_tokens as f64 / prefill_s,
        decode_tokens_per_s: median(&decode),
        decode_tokens_per_s_runs: decode,
        load_s,
        peak_rss_mb: crate::base::util::peak_rss_mb(),
        huge_pages_mb,
        huge_pages_mode,
        text,
    })
}

/// One row of `itt bench --gguf FILE --batch ...`, the columns of llama.cpp's
/// `llama-batched-bench`: B sequences of PP prompt tokens prefilled in one packed call (logits
/// of each sequence's last token), then TG steps of B tokens (logits of every row), medians
/// over runs.
#[derive(Clone, Debug, Serialize)]
pub struct BatchedRow {
    pub prompt_tokens: usize,
    pub new_tokens: usize,
    pub batch: usize,
    /// Tokens in the caches at the end, all sequences: B * (PP + TG).
    pub kv_tokens: usize,
    pub prefill_s: f64,
    pub prefill_tokens_per_s: f64,
    pub generate_s: f64,
    pub generate_tokens_per_s: f64,
    pub total_s: f64,
    pub total_tokens_per_s: f64,
}

/// `llama-batched-bench -npp PP -ntg TG -npl B1,B2,..` on a model file read for inference (the
/// quantized products for a GGUF by default): random prompt tokens, no sampling, as llama.cpp's
/// tool does. Rows go through the same packed forward as `itt serve`'s batches.
pub fn batched_file(
    path: &std::path::Path,
    weights: crate::import::gguf::GgufWeights,
    batches: &[usize],
    prompt_len: usize,
    new_tokens: usize,
    runs: usize,
    device: &Device,
) -> Result<(GenerateBench, Vec<BatchedRow>)> {
    use crate::model::SeqLayout;
    use candle_core::Tensor;
    let t0 = Instant::now();
    let opened = crate::import::open(path, &OpenOptions { gguf_weights: weights, device: device.clone() })?;
    let routing = file_routing(&opened, path)?;
    let model = opened.model;
    let load_s = t0.elapsed().as_secs_f64();
    let sync = || crate::base::util::synchronize(device);
    let vocab = opened.tokenizer.vocab_size() as u64;
    let mut rng = Rng::new(7);
    let mut rows = vec![];
    for &b in batches {
        let (mut pp, mut tg) = (vec![], vec![]);
        // One run more than asked: the first warms caches and pages, and is not counted.
        for run in 0..runs.max(1) + 1 {
            let prompts: Vec<u32> = (0..b * prompt_len).map(|_| rng.below(vocab) as u32).collect();
            let mut caches: Vec<_> = (0..b).map(|_| model.new_cache_reserved(prompt_len + new_tokens)).collect();
            let t0 = Instant::now();
            let x = Tensor::from_slice(&prompts, prompts.len(), device)?;
            let h = model.forward_hidden(&x, &SeqLayout::uniform(b, prompt_len), &routing, Some(&mut caches), None)?;
            let last: Vec<u32> = (0..b).map(|i| ((i + 1) * prompt_len - 1) as u32).collect();
            model.logits(&h.index_select(&Tensor::from_slice(&last, b, device)?, 0)?)?;
            sync()?;
            let t_pp = t0.elapsed().as_secs_f64();
            let t0 = Instant::now();
            for i in 0..new_tokens {
                let ids: Vec<u32> = (0..b).map(|_| rng.below(vocab) as u32).collect();
                let layout = SeqLayout::with_past(&vec![1; b], &vec![prompt_len + i; b]);
                let h = model.forward_hidden(
                    &Tensor::from_slice(&ids, b, device)?,
                    &layout,
                    &routing,
                    Some(&mut caches),
                    None,
                )?;
                model.logits(&h)?;
            }
            sync()?;
            if run > 0 {
                pp.push(t_pp);
                tg.push(t0.elapsed().as_secs_f64());
            }
        }
        let (t_pp, t_tg) = (median(&pp), median(&tg));
        rows.push(BatchedRow {
            prompt_tokens: prompt_len,
            new_tokens,
            batch: b,
            kv_tokens: b * (prompt_len + new_tokens),
            prefill_s: t_pp,
            prefill_tokens_per_s: (b * prompt_len) as f64 / t_pp,
            generate_s: t_tg,
            generate_tokens_per_s: (b * new_tokens) as f64 / t_tg,
            total_s: t_pp + t_tg,
            total_tokens_per_s: (b * (prompt_len + new_tokens)) as f64 / (t_pp + t_tg),
        });
    }
    let quantized = if model.is_quantized() { model.quantized_summary() } else { "f32".into() };
    let (huge_pages_mb, huge_pages_mode) = crate::base::util::huge_pages();
    let info = GenerateBench {
        model: path.display().to_string(),
        quantized,
        threads: rayon::current_num_threads(),
        prompt_tokens: prompt_len,
        new_tokens,
        prefill_s_median: f64::NAN,
        prefill_tokens_per_s: f64::NAN,
        decode_tokens_per_s: f64::NAN,
        decode_tokens_per_s_runs: vec![],
        load_s,
        peak_rss_mb: crate::base::util::peak_rss_mb(),
        huge_pages_mb,
        huge_pages_mode,
        text: String::new(),
    };
    Ok((info, rows))
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

impl BatchedRow {
    /// llama-batched-bench's header, its column names.
    pub const HEADER: &'static str = "|    PP |     TG |    B |   N_KV |   T_PP s | S_PP t/s |   T_TG s | S_TG t/s |      T s |    S t/s |\n\
                                      |-------|--------|------|--------|----------|----------|----------|----------|----------|----------|";
    pub fn row(&self) -> String {
        format!(
            "| {:5} | {:6} | {:4} | {:6} | {:8.3} | {:8.2} | {:8.3} | {:8.2} | {:8.3} | {:8.2} |",
            self.prompt_tokens,
            self.new_tokens,
            self.batch,
            self.kv_tokens,
            self.prefill_s,
            self.prefill_tokens_per_s,
            self.generate_s,
            self.generate_tokens_per_s,
            self.total_s,
            self.total_tokens_per_s
        )
    }
}

impl GenerateBench {
    pub fn table(&self) -> String {
        let runs: Vec<String> = self.decode_tokens_per_s_runs.iter().map(|r| format!("{r:.1}")).collect();
        format!(
            "{} | weights {} | {} threads | loaded in {:.2} s | peak RSS {:.0} MiB ({:.0} MiB on huge pages, THP {})\n\
             prefill {} tokens: {:.3} s median ({:.0} tokens/s) | decode {} tokens: {:.1} tokens/s median (runs {})",
            self.model,
            self.quantized,
            self.threads,
            self.load_s,
            self.peak_rss_mb,
            self.huge_pages_mb,
            self.huge_pages_mode,
            self.prompt_tokens,
            self.prefill_s_median,
            self.prefill_tokens_per_s,
            self.new_tokens,
            self.decode_tokens_per_s,
            runs.join(", ")
        )
    }
}
