//! Text generation: batched prompts, KV caches, seeded sampling, streaming, and the depth each
//! token was given by the thinking layers. The CLI and the server use this one API.
//!
//! Prompts of different lengths are packed (see `model::SeqLayout`) rather than left-padded,
//! so a prompt gives the same tokens alone or in a batch. With `use_cache`, each sequence keeps
//! its own KV caches per (layer, step); for ITT this needs causal (threshold) routing, so that
//! a token's steps depend only on its past (DESIGN §5). Without the cache every new token
//! re-runs the whole text, which also allows the paper's top-k routing.

use crate::data::Tokenizer;
use crate::model::{ForwardRecord, Model, Routing, RoutingOptions, SeqCache, SeqLayout};
use crate::rng::Rng;
use crate::{Error, Result};
use candle_core::{DType, Tensor};
use serde::Serialize;
use std::collections::VecDeque;

/// How the next token is drawn from the logits.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 = greedy (argmax, ties to the lower id).
    pub temperature: f64,
    /// Keep the k most likely tokens; 0 = off.
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p; 1 = off.
    pub top_p: f64,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams { temperature: 0.8, top_k: 0, top_p: 1.0, seed: 1234 }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        SamplingParams { temperature: 0.0, ..Default::default() }
    }
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(Error::usage(format!("temperature must be >= 0 (got {})", self.temperature)));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::usage(format!("top_p must be in (0, 1] (got {})", self.top_p)));
        }
        Ok(())
    }
}

#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    /// Stop a sequence when its generated text ends with one of these (not included).
    pub stop: Vec<String>,
    pub sampling: SamplingParams,
    /// Routing mode, elastic ratios/steps, early exit (DESIGN §5, §6).
    pub routing: RoutingOptions,
    pub use_cache: bool,
    /// Prefill prompts in chunks of at most this many tokens (0 = whole prompt at once).
    pub prefill_chunk: usize,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_new_tokens: 64,
            stop: vec![],
            sampling: SamplingParams::default(),
            routing: RoutingOptions::default(),
            use_cache: true,
            prefill_chunk: 0,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// The end-of-document token.
    EndOfText,
    Stop,
    /// `max_new_tokens` reached.
    Length,
    /// The model's context is full.
    Context,
}

/// A generated token. `depth[i]` is the number of steps the thinking layer `layers[i]` ran at
/// the position that produced this token (the computation that chose it).
#[derive(Clone, Debug, Serialize)]
pub struct GeneratedToken {
    pub seq: usize,
    pub id: u32,
    pub text: String,
    pub depth: Vec<u32>,
}

#[derive(Clone, Debug, Serialize)]
pub enum Event {
    Token(GeneratedToken),
    Finished { seq: usize, reason: FinishReason, text: String },
}

struct SeqState {
    ids: Vec<u32>,
    prompt_len: usize,
    /// Tokens already run through the model (and in the cache).
    fed: usize,
    cache: SeqCache,
    rng: Rng,
    /// Decoded generated text, and how much of it has been emitted.
    text: String,
    emitted: usize,
    done: Option<FinishReason>,
}

/// A streaming generation: iterate to get events in order.
pub struct Generation<'a> {
    model: &'a Model,
    tok: &'a Tokenizer,
    opts: GenerateOptions,
    seqs: Vec<SeqState>,
    pending: VecDeque<Event>,
    /// The thinking layers' indices, the order of `GeneratedToken::depth`.
    pub layers: Vec<usize>,
    /// Routing statistics over the whole generation.
    pub record: ForwardRecord,
}

/// Start generating continuations of `prompts`.
pub fn generate<'a>(
    model: &'a Model,
    tok: &'a Tokenizer,
    prompts: &[String],
    opts: GenerateOptions,
) -> Result<Generation<'a>> {
    opts.sampling.validate()?;
    if prompts.is_empty() {
        return Err(Error::usage("no prompt given"));
    }
    if tok.vocab_size() != model.cfg.vocab_size {
        return Err(Error::usage(format!(
            "the tokenizer has {} tokens but the model {}; they do not belong together",
            tok.vocab_size(),
            model.cfg.vocab_size
        )));
    }
    // With one step, or every routed share 0, nothing is routed and top-k is trivially causal.
    let routes =
        opts.routing.steps != Some(1) && !opts.routing.ratios.as_ref().is_some_and(|r| r.iter().all(|&x| x == 0.0));
    if opts.use_cache && model.has_routers() && opts.routing.mode == Routing::TopK && routes {
        return Err(Error::usage(
            "top-k routing is not causal, so it cannot decode with a KV cache; use threshold routing or disable the cache",
        ));
    }
    let ctx = model.cfg.max_seq_len;
    let mut seqs = vec![];
    for (i, p) in prompts.iter().enumerate() {
        if p.is_empty() {
            return Err(Error::usage(format!("prompt {} is empty", i + 1)));
        }
        let ids = tok.encode(p)?;
        if ids.is_empty() {
            return Err(Error::usage(format!("prompt {} encodes to no tokens", i + 1)));
        }
        if ids.len() >= ctx {
            return Err(Error::usage(format!(
                "prompt {} has {} tokens; the model's context is {ctx}, leaving no room to generate",
                i + 1,
                ids.len()
            )));
        }
        seqs.push(SeqState {
            prompt_len: ids.len(),
            ids,
            fed: 0,
            cache: model.new_cache(),
            rng: Rng::derive(opts.sampling.seed, "sample"),
            text: String::new(),
            emitted: 0,
            done: None,
        });
    }
    let layers = model.thinking_layers().map(|t| t.layer).collect();
    Ok(Generation { model, tok, opts, seqs, pending: VecDeque::new(), layers, record: ForwardRecord::default() })
}

impl Generation<'_> {
    /// Run the model once for every unfinished sequence and sample one token each.
    fn advance(&mut self) -> Result<()> {
        let active: Vec<usize> = (0..self.seqs.len()).filter(|&i| self.seqs[i].done.is_none()).collect();
        if active.is_empty() {
            return Ok(());
        }
        let mut detail = ForwardRecord { keep_detail: true, ..Default::default() };
        let (logits, depth) = if self.opts.use_cache {
            // Feed what is not cached yet (the prompt, possibly in chunks, or the last token).
            let mut last_rows: Vec<Option<Tensor>> = vec![None; active.len()];
            let mut depth_rows: Vec<Vec<u32>> = vec![Vec::new(); active.len()];
            loop {
                let chunk = if self.opts.prefill_chunk == 0 { usize::MAX } else { self.opts.prefill_chunk };
                let lens: Vec<usize> =
                    active.iter().map(|&i| (self.seqs[i].ids.len() - self.seqs[i].fed).min(chunk)).collect();
                if lens.iter().all(|&n| n == 0) {
                    break;
                }
                let past: Vec<usize> = active.iter().map(|&i| self.seqs[i].fed).collect();
                let ids: Vec<u32> = active
                    .iter()
                    .zip(&lens)
                    .flat_map(|(&i, &n)| self.seqs[i].ids[self.seqs[i].fed..self.seqs[i].fed + n].to_vec())
                    .collect();
                let mut caches: Vec<SeqCache> =
                    active.iter().map(|&i| std::mem::replace(&mut self.seqs[i].cache, empty_cache())).collect();
                let layout = SeqLayout::with_past(&lens, &past);
                let x = Tensor::from_slice(&ids, ids.len(), self.model.device())?;
                let hidden =
                    self.model.forward_hidden(&x, &layout, &self.opts.routing, Some(&mut caches), Some(&mut detail));
                for (&i, c) in active.iter().zip(caches) {
                    self.seqs[i].cache = c;
                }
                let hidden = hidden?;
                let starts = layout.starts();
                for (k, &i) in active.iter().enumerate() {
                    self.seqs[i].fed += lens[k];
                    if lens[k] > 0 && self.seqs[i].fed == self.seqs[i].ids.len() {
                        let row = starts[k] + lens[k] - 1;
                        last_rows[k] = Some(hidden.narrow(0, row, 1)?);
                        depth_rows[k] =
                            self.layers.iter().map(|l| detail.depth.get(l).map(|d| d[row]).unwrap_or(1)).collect();
                    }
                }
                self.record.merge_stats(&detail);
                detail.stats.clear();
            }
            let rows: Vec<Tensor> = last_rows.into_iter().map(|r| r.expect("every prompt was fed")).collect();
            let h = Tensor::cat(&rows, 0)?;
            (self.model.logits(&h)?, depth_rows)
        } else {
            // No cache: the whole text so far, every time.
            let lens: Vec<usize> = active.iter().map(|&i| self.seqs[i].ids.len()).collect();
            let ids: Vec<u32> = active.iter().flat_map(|&i| self.seqs[i].ids.clone()).collect();
            let layout = SeqLayout::with_past(&lens, &vec![0; lens.len()]);
            let x = Tensor::from_slice(&ids, ids.len(), self.model.device())?;
            let hidden = self.model.forward_hidden(&x, &layout, &self.opts.routing, None, Some(&mut detail))?;
            let starts = layout.starts();
            let mut rows = vec![];
            let mut depth_rows = vec![];
            for (k, _) in active.iter().enumerate() {
                let row = starts[k] + lens[k] - 1;
                rows.push(hidden.narrow(0, row, 1)?);
                depth_rows.push(self.layers.iter().map(|l| detail.depth.get(l).map(|d| d[row]).unwrap_or(1)).collect());
            }
            self.record.merge_stats(&detail);
            (self.model.logits(&Tensor::cat(&rows, 0)?)?, depth_rows)
        };
        let logits = logits.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        for (k, &i) in active.iter().enumerate() {
            let id = sample(&logits[k], &self.opts.sampling, &mut self.seqs[i].rng);
            self.push_token(i, id, depth[k].clone())?;
        }
        Ok(())
    }

    fn push_token(&mut self, i: usize, id: u32, depth: Vec<u32>) -> Result<()> {
        let s = &mut self.seqs[i];
        if id == self.tok.eot_id() {
            s.done = Some(FinishReason::EndOfText);
            let text = s.text.clone();
            self.pending.push_back(Event::Finished { seq: i, reason: FinishReason::EndOfText, text });
            return Ok(());
        }
        s.ids.push(id);
        // Decode the whole generated part so multi-byte characters split over tokens come out
        // whole; emit only what is new and stable.
        let full = self.tok.decode(&s.ids[s.prompt_len..])?;
        let mut finished = None;
        let mut visible = full.clone();
        if let Some(stop) = self.opts.stop.iter().filter(|st| !st.is_empty()).find_map(|st| full.find(st.as_str())) {
            visible.truncate(stop);
            finished = Some(FinishReason::Stop);
        }
        let new_text = visible.get(s.emitted..).unwrap_or("").trim_end_matches('\u{FFFD}').to_string();
        s.emitted += new_text.len();
        s.text = visible;
        self.pending.push_back(Event::Token(GeneratedToken { seq: i, id, text: new_text, depth }));
        let generated = s.ids.len() - s.prompt_len;
        if finished.is_none() && generated >= self.opts.max_new_tokens {
            finished = Some(FinishReason::Length);
        }
        if finished.is_none() && s.ids.len() >= self.model.cfg.max_seq_len {
            finished = Some(FinishReason::Context);
        }
        if let Some(reason) = finished {
            s.done = Some(reason);
            let text = s.text.clone();
            self.pending.push_back(Event::Finished { seq: i, reason, text });
        }
        Ok(())
    }

    /// Run to the end and return each sequence's generated text and finish reason.
    pub fn collect_all(mut self) -> Result<Vec<(String, FinishReason, Vec<u32>)>> {
        let mut out: Vec<Option<(String, FinishReason)>> = vec![None; self.seqs.len()];
        for ev in self.by_ref() {
            if let Event::Finished { seq, reason, text } = ev? {
                out[seq] = Some((text, reason));
            }
        }
        Ok(out
            .into_iter()
            .zip(&self.seqs)
            .map(|(o, s)| {
                let (t, r) = o.expect("every sequence finishes");
                (t, r, s.ids[s.prompt_len..].to_vec())
            })
            .collect())
    }

    /// KV-cache bytes held now, over all sequences.
    pub fn cache_bytes(&self) -> usize {
        self.seqs.iter().map(|s| s.cache.bytes()).sum()
    }

    /// Cached tokens per (layer, step) of sequence `i`.
    pub fn cache_lens(&self, i: usize) -> Vec<Vec<usize>> {
        self.seqs[i].cache.lens()
    }
}

fn empty_cache() -> SeqCache {
    SeqCache { slots: vec![], seen: 0 }
}

impl Iterator for Generation<'_> {
    type Item = Result<Event>;
    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(ev) = self.pending.pop_front() {
                return Some(Ok(ev));
            }
            if self.seqs.iter().all(|s| s.done.is_some()) {
                return None;
            }
            if let Err(e) = self.advance() {
                for s in &mut self.seqs {
                    s.done.get_or_insert(FinishReason::Length);
                }
                return Some(Err(e));
            }
        }
    }
}

/// Draw a token id from one row of logits.
pub fn sample(logits: &[f32], p: &SamplingParams, rng: &mut Rng) -> u32 {
    if p.temperature == 0.0 {
        let mut best = 0;
        for (i, &z) in logits.iter().enumerate() {
            if z > logits[best] {
                best = i;
            }
        }
        return best as u32;
    }
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    if p.top_k > 0 {
        idx.truncate(p.top_k);
    }
    let max = logits[idx[0]] as f64;
    let mut probs: Vec<f64> = idx.iter().map(|&i| ((logits[i] as f64 - max) / p.temperature).exp()).collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|q| *q /= total);
    if p.top_p < 1.0 {
        let mut cum = 0.0;
        let mut keep = probs.len();
        for (j, q) in probs.iter().enumerate() {
            cum += q;
            if cum >= p.top_p {
                keep = j + 1;
                break;
            }
        }
        probs.truncate(keep);
        idx.truncate(keep);
        let t: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|q| *q /= t);
    }
    let u = rng.uniform();
    let mut cum = 0.0;
    for (j, q) in probs.iter().enumerate() {
        cum += q;
        if u < cum {
            return idx[j] as u32;
        }
    }
    idx[probs.len() - 1] as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampling_rules() {
        let logits = [1.0f32, 3.0, 2.0, 3.0];
        let mut r = Rng::new(1);
        assert_eq!(sample(&logits, &SamplingParams::greedy(), &mut r), 1);
        let top1 = SamplingParams { temperature: 1.0, top_k: 1, ..Default::default() };
        assert_eq!(sample(&logits, &top1, &mut r), 1);
        let nucleus = SamplingParams { temperature: 1.0, top_p: 0.5, ..Default::default() };
        for _ in 0..20 {
            assert!([1, 3].contains(&sample(&logits, &nucleus, &mut r)));
        }
        let hot = SamplingParams { temperature: 1.0, ..Default::default() };
        let mut seen = [0; 4];
        for _ in 0..2000 {
            seen[sample(&logits, &hot, &mut r) as usize] += 1;
        }
        // p = softmax([1, 3, 2, 3]) = [0.047, 0.35, 0.129, 0.35] (rounded)
        assert!((seen[0] as f64 / 2000.0 - 0.0466).abs() < 0.02, "{seen:?}");
        assert!((seen[2] as f64 / 2000.0 - 0.1288).abs() < 0.03, "{seen:?}");
    }
}

#[cfg(test)]
mod generation_tests {
    use super::*;
    use crate::config::preset;
    use crate::model::{RouterCalibration, SeqLayout};
    use candle_core::Device;
    use std::sync::Arc;

    fn setup() -> (Model, Tokenizer, Arc<RouterCalibration>) {
        let tok = Tokenizer::char_from_text("0123456789+-= \nabcdefghij");
        let mut cfg = preset("tiny-itt4").unwrap().model;
        cfg.vocab_size = tok.vocab_size();
        cfg.d_model = 32;
        cfg.n_heads = 2;
        cfg.n_kv_heads = 1;
        cfg.mlp_hidden = 48;
        cfg.max_seq_len = 64;
        cfg.init_std = 0.2;
        cfg.thinking.router_init_std = 0.5;
        let model = Model::new(&cfg, 7, &Device::Cpu).unwrap();
        let ids = tok.encode("12+34=46\n5+5=10\nabc def ghij\n901-3=898\n").unwrap();
        let x = Tensor::from_slice(&ids, ids.len(), &Device::Cpu).unwrap();
        let mut rec = ForwardRecord::with_scores();
        model.forward(&x, &SeqLayout::uniform(1, ids.len()), &RoutingOptions::default(), None, Some(&mut rec)).unwrap();
        let mut cal = RouterCalibration::new();
        cal.update(&mut rec, 0.0);
        (model, tok, Arc::new(cal))
    }

    fn run(model: &Model, tok: &Tokenizer, prompts: &[&str], opts: &GenerateOptions) -> Vec<Vec<u32>> {
        let prompts: Vec<String> = prompts.iter().map(|s| s.to_string()).collect();
        generate(model, tok, &prompts, opts.clone()).unwrap().collect_all().unwrap().into_iter().map(|r| r.2).collect()
    }

    #[test]
    fn batch_equals_alone_cached_equals_uncached_and_seeds_repeat() {
        let (model, tok, cal) = setup();
        let routing = RoutingOptions { mode: Routing::Threshold, calibration: Some(cal), ..Default::default() };
        let prompts = ["12+34=", "9", "abc def ghij\n77-"];
        for sampling in [SamplingParams::greedy(), SamplingParams { temperature: 1.0, top_k: 5, top_p: 0.9, seed: 3 }] {
            let opts = GenerateOptions { max_new_tokens: 12, sampling, routing: routing.clone(), ..Default::default() };
            let batch = run(&model, &tok, &prompts, &opts);
            for (i, p) in prompts.iter().enumerate() {
                assert_eq!(run(&model, &tok, &[p], &opts)[0], batch[i], "prompt {p:?} alone vs in a batch");
            }
            assert_eq!(run(&model, &tok, &prompts, &opts), batch, "seeded generation repeats");
            let uncached = GenerateOptions { use_cache: false, ..opts.clone() };
            assert_eq!(run(&model, &tok, &prompts, &uncached), batch, "cache changes the tokens");
            let chunked = GenerateOptions { prefill_chunk: 2, ..opts.clone() };
            assert_eq!(run(&model, &tok, &prompts, &chunked), batch, "chunked prefill changes the tokens");
        }
    }

    #[test]
    fn early_exit_keeps_cached_equal_to_full_and_saves_steps() {
        let (model, tok, cal) = setup();
        let base = RoutingOptions { mode: Routing::Threshold, calibration: Some(cal), ..Default::default() };
        let exit = RoutingOptions { early_exit: Some(0.5), ..base.clone() };
        let opts = GenerateOptions {
            max_new_tokens: 10,
            sampling: SamplingParams::greedy(),
            routing: exit,
            ..Default::default()
        };
        let cached = run(&model, &tok, &["12+34=", "abc"], &opts);
        let full = run(&model, &tok, &["12+34=", "abc"], &GenerateOptions { use_cache: false, ..opts.clone() });
        assert_eq!(cached, full);
        let count = |r: &RoutingOptions| {
            let ids = tok.encode("12+34=46\n5+5=10\n").unwrap();
            let x = Tensor::from_slice(&ids, ids.len(), &Device::Cpu).unwrap();
            let mut rec = ForwardRecord::default();
            model.forward(&x, &SeqLayout::uniform(1, ids.len()), r, None, Some(&mut rec)).unwrap();
            rec.routed_tokens()
        };
        assert!(count(&opts.routing) < count(&base), "early exit should route fewer tokens");
    }

    #[test]
    fn stop_sequences_and_limits() {
        let (model, tok, cal) = setup();
        let routing = RoutingOptions { mode: Routing::Threshold, calibration: Some(cal), ..Default::default() };
        let opts =
            GenerateOptions { max_new_tokens: 30, sampling: SamplingParams::greedy(), routing, ..Default::default() };
        let free = generate(&model, &tok, &["12+".to_string()], opts.clone()).unwrap().collect_all().unwrap();
        let text = &free[0].0;
        assert!(text.chars().count() >= 2, "{text:?}");
        let stop: String = text.chars().skip(1).take(1).collect();
        let stopped =
            generate(&model, &tok, &["12+".to_string()], GenerateOptions { stop: vec![stop.clone()], ..opts.clone() })
                .unwrap()
                .collect_all()
                .unwrap();
        assert_eq!(stopped[0].1, FinishReason::Stop);
        assert!(!stopped[0].0.contains(&stop) && text.starts_with(&stopped[0].0));
        let short = GenerateOptions { max_new_tokens: 3, ..opts };
        let r = generate(&model, &tok, &["1".to_string()], short).unwrap().collect_all().unwrap();
        assert!(r[0].2.len() <= 3);
        assert!(generate(&model, &tok, &[String::new()], GenerateOptions::default()).is_err());
        let topk_cached = GenerateOptions { routing: RoutingOptions::default(), ..GenerateOptions::default() };
        assert!(generate(&model, &tok, &["1".to_string()], topk_cached).err().unwrap().to_string().contains("causal"));
    }
}
