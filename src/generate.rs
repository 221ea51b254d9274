//! Text generation: batched prompts, KV caches, seeded sampling, streaming, and the depth each
//! token was given by the thinking layers. The CLI and the server use this one API.
//!
//! Prompts of different lengths are packed (see `model::SeqLayout`) rather than left-padded,
//! so a prompt gives the same tokens alone or in a batch. With `use_cache`, each sequence keeps
//! its own KV caches per (layer, step); for ITT this needs causal (threshold) routing, so that
//! a token's steps depend only on its past (DESIGN §5). Without the cache every new token
//! re-runs the whole text, which also allows the paper's top-k routing.

use crate::base::rng::Rng;
use crate::data::Tokenizer;
use crate::model::{ForwardRecord, Model, RouterCalibration, Routing, RoutingOptions, SeqCache, SeqLayout};
use crate::speculate::{SpecStats, Speculator};
use crate::{Error, Result};
use candle_core::{DType, Tensor};
use serde::Serialize;
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

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
    /// OpenAI's penalties over the generated tokens: logit -= presence * [count > 0] +
    /// frequency * count. 0 = off.
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// llama.cpp's / Hugging Face's, over prompt and generated tokens: a positive logit is
    /// divided by it, a negative one multiplied. 1 = off.
    pub repetition_penalty: f32,
    /// Added to the logits of these token ids (OpenAI's `logit_bias`, -100 bans, +100 forces).
    pub logit_bias: Vec<(u32, f32)>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.8,
            top_k: 0,
            top_p: 1.0,
            seed: 1234,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            logit_bias: vec![],
        }
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
        for (name, v) in [("presence_penalty", self.presence_penalty), ("frequency_penalty", self.frequency_penalty)] {
            if !(-2.0..=2.0).contains(&v) {
                return Err(Error::usage(format!("{name} must be between -2 and 2 (got {v})")));
            }
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return Err(Error::usage(format!("repetition_penalty must be > 0 (got {})", self.repetition_penalty)));
        }
        if let Some((id, b)) = self.logit_bias.iter().find(|(_, b)| !(-100.0..=100.0).contains(b)) {
            return Err(Error::usage(format!("logit_bias of token {id} must be between -100 and 100 (got {b})")));
        }
        Ok(())
    }

    /// Whether the logits are changed before sampling (penalties or biases set).
    pub fn adjusts(&self) -> bool {
        self.presence_penalty != 0.0
            || self.frequency_penalty != 0.0
            || self.repetition_penalty != 1.0
            || !self.logit_bias.is_empty()
    }

    /// Apply the penalties and biases to one row of logits, in llama.cpp's order: repetition
    /// (over `prompt` and `generated`), then presence and frequency (over `generated`), then
    /// the biases. Log-probabilities are reported before this (DESIGN §12).
    pub fn adjust(&self, logits: &mut [f32], prompt: &[u32], generated: &[u32]) {
        if self.repetition_penalty != 1.0 {
            let mut seen = vec![false; logits.len()];
            for &id in prompt.iter().chain(generated) {
                let i = id as usize;
                if i < logits.len() && !std::mem::replace(&mut seen[i], true) {
                    let z = &mut logits[i];
                    *z = if *z > 0.0 { *z / self.repetition_penalty } else { *z * self.repetition_penalty };
                }
            }
        }
        if self.presence_penalty != 0.0 || self.frequency_penalty != 0.0 {
            let mut count: std::collections::HashMap<u32, f32> = std::collections::HashMap::new();
            for &id in generated {
                *count.entry(id).or_default() += 1.0;
            }
            for (id, c) in count {
                if let Some(z) = logits.get_mut(id as usize) {
                    *z -= self.presence_penalty + self.frequency_penalty * c;
                }
            }
        }
        for &(id, b) in &self.logit_bias {
            if let Some(z) = logits.get_mut(id as usize) {
                *z += b;
            }
        }
    }
}

#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    /// Stop a sequence when its generated text ends with one of these (not included).
    pub stop: Vec<String>,
    /// Stop a sequence when it draws one of these token ids (not included): e.g. a chat
    /// template's end-of-turn token.
    pub stop_ids: Vec<u32>,
    /// Go on past the end-of-text token (benchmarks that need a fixed length).
    pub ignore_eot: bool,
    pub sampling: SamplingParams,
    /// Routing mode, elastic ratios/steps, early exit (DESIGN §5, §6).
    pub routing: RoutingOptions,
    pub use_cache: bool,
    /// Prefill prompts in chunks of at most this many tokens (0 = whole prompt at once).
    pub prefill_chunk: usize,
    /// Report each generated token's log-probability with this many most likely alternatives
    /// (`None`: no log-probabilities). They are the model's log-softmax, before temperature and
    /// every other sampling transform (DESIGN §12, as OpenAI reports them).
    pub logprobs: Option<usize>,
    /// Also report the log-probability of every prompt token after the first
    /// ([`Event::Prompt`]): the scoring path of `echo` (lm-evaluation-harness).
    pub prompt_logprobs: bool,
    /// Self-speculative decoding with this many drafted tokens per verify pass (0 = off;
    /// `crate::speculate`). Needs a model with thinking layers and a KV cache.
    pub speculate: usize,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_new_tokens: 64,
            stop: vec![],
            stop_ids: vec![],
            ignore_eot: false,
            sampling: SamplingParams::default(),
            routing: RoutingOptions::default(),
            use_cache: true,
            prefill_chunk: 0,
            logprobs: None,
            prompt_logprobs: false,
            speculate: 0,
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
    /// With `GenerateOptions::logprobs`.
    pub logprob: Option<TokenLogprob>,
}

/// A token's log-probability under the model (log-softmax of the raw logits) and the `top`
/// most likely tokens at that position, most likely first (ties to the lower id).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TokenLogprob {
    pub id: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

impl TokenLogprob {
    /// Token `id`'s entry in one row of logits, with the `top_n` most likely tokens.
    pub fn from_logits(logits: &[f32], id: u32, top_n: usize) -> Self {
        // log-sum-exp in f64: the scores are summed over hundreds of tokens by scorers.
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let lse = max + logits.iter().map(|&z| (z as f64 - max).exp()).sum::<f64>().ln();
        let lp = |i: usize| (logits[i] as f64 - lse) as f32;
        let top = top_ids(logits, top_n).into_iter().map(|i| (i as u32, lp(i))).collect();
        TokenLogprob { id, logprob: lp(id as usize), top }
    }
}

/// The `n` largest logits' ids, largest first, ties to the lower id.
fn top_ids(logits: &[f32], n: usize) -> Vec<usize> {
    let desc = |a: &usize, b: &usize| logits[*b].total_cmp(&logits[*a]).then(a.cmp(b));
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    let n = n.min(idx.len());
    if n == 0 {
        return vec![];
    }
    if n < idx.len() {
        idx.select_nth_unstable_by(n - 1, desc);
        idx.truncate(n);
    }
    idx.sort_unstable_by(desc);
    idx
}

#[derive(Clone, Debug, Serialize)]
pub enum Event {
    Token(GeneratedToken),
    /// With `GenerateOptions::prompt_logprobs`, once the prompt is fed: the log-probability of
    /// prompt tokens 2.. given the ones before (the first has no context to be scored in).
    Prompt {
        seq: usize,
        logprobs: Vec<TokenLogprob>,
    },
    Finished {
        seq: usize,
        reason: FinishReason,
        text: String,
        usage: SeqUsage,
    },
}

/// A sequence whose text is all fed: its id, next-token logits and depth at its last position.
type Ready = (usize, Vec<f32>, Vec<u32>);

/// What one sequence has cost: tokens, and the extra (routed) block steps its tokens took.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct SeqUsage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Sum over every token run through the model (prompt and generated) and every thinking
    /// layer of (steps taken - 1): the block applications thinking added to the dense pass.
    pub extra_block_steps: u64,
    /// Self-speculative decoding: tokens drafted, and how many of them were kept.
    pub drafted: usize,
    pub accepted: usize,
}

struct SeqState {
    ids: Vec<u32>,
    prompt_len: usize,
    /// Tokens already run through the model (and in the cache).
    fed: usize,
    cache: SeqCache,
    rng: Rng,
    opts: GenerateOptions,
    /// Decoded generated text, and how much of it has been emitted.
    text: String,
    emitted: usize,
    extra_block_steps: u64,
    done: Option<FinishReason>,
    /// With `prompt_logprobs`: the prompt tokens scored so far (chunked prefill), and whether
    /// they were sent.
    prompt_logprobs: Vec<TokenLogprob>,
    prompt_sent: bool,
    /// With `opts.speculate`: the draft's caches, made at the first round.
    spec: Option<Speculator>,
    drafted: usize,
    accepted: usize,
    /// With a prefix cache, while the prompt is prefilled: the positions each cache slot holds
    /// (`SlotPositions`), so the entry this prompt leaves can be cut to a shorter prefix. None
    /// when not tracked (no prefix cache, or a slot grew in a way the record did not explain).
    positions: Option<SlotPositions>,
}

impl SeqState {
    fn usage(&self) -> SeqUsage {
        SeqUsage {
            prompt_tokens: self.prompt_len,
            completion_tokens: self.ids.len() - self.prompt_len,
            extra_block_steps: self.extra_block_steps,
            drafted: self.drafted,
            accepted: self.accepted,
        }
    }
}

/// The token positions each cache slot of a sequence holds, indexed [layer][step] like
/// `SeqCache::slots`, in cache order (ascending): every position for a slot that takes every
/// token, the selected ones for a routed step's slot.
type SlotPositions = Vec<Vec<Vec<u32>>>;

/// Shortest shared prefix, in tokens, that a request reuses from an entry that is not wholly a
/// prefix of its prompt: below it, copying the entry's buffers costs about what running the
/// tokens would.
pub const MIN_PARTIAL_PREFIX: usize = 16;

/// KV caches of prompt prefixes kept for later requests that start with the same tokens
/// (DESIGN §12, "Prefix cache"): a system prompt shared by every request is computed once.
/// With causal routing a prefix's caches (every layer and thinking step) do not depend on what
/// follows it. An entry holds a prompt's first `len - 1` tokens (the last prompt token runs
/// with the request, whose logits it gives). A request reuses the entry sharing the longest
/// prefix with its prompt, cut to that prefix (each routed slot to the tokens it selected
/// before the cut), as llama.cpp's slots keep their common prefix; entries are evicted least
/// recently used first when their bytes pass `limit_bytes`.
#[derive(Default)]
pub struct PrefixCache {
    pub limit_bytes: usize,
    entries: Vec<PrefixEntry>,
    clock: u64,
    pub hits: u64,
    pub misses: u64,
    pub evictions: u64,
    /// Prompt tokens taken from the cache instead of being run, over all hits.
    pub reused_tokens: u64,
}

struct PrefixEntry {
    ids: Vec<u32>,
    /// Routing the caches were made with: reused only by sequences routed the same way.
    routing: RoutingOptions,
    cache: SeqCache,
    /// What each slot holds, to cut the entry to a shorter prefix; None: reused only whole.
    positions: Option<SlotPositions>,
    bytes: usize,
    used: u64,
}

/// Tokens `a` and `b` share from the start.
fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// A copy of `cache` (holding the tokens of `positions`) cut to its first `n` tokens: each slot
/// keeps its entries at positions below `n`.
fn cut_cache(cache: &SeqCache, positions: &SlotPositions, n: usize) -> (SeqCache, SlotPositions) {
    let mut cache = cache.clone();
    let mut kept = positions.clone();
    for (slots, pos) in cache.slots.iter_mut().zip(kept.iter_mut()) {
        for (c, p) in slots.iter_mut().zip(pos.iter_mut()) {
            p.truncate(p.partition_point(|&x| (x as usize) < n));
            c.truncate(p.len());
        }
    }
    cache.seen = n;
    (cache, kept)
}

impl PrefixCache {
    pub fn new(limit_bytes: usize) -> Self {
        PrefixCache { limit_bytes, ..Default::default() }
    }

    /// Bytes held by the entries.
    pub fn bytes(&self) -> usize {
        self.entries.iter().map(|e| e.bytes).sum()
    }

    /// The entry under the same routing that shares the longest prefix with `prompt`, leaving
    /// at least its last token to run: a copy of its caches cut to that prefix, what the cut
    /// caches hold, and the prefix's length. An entry is reused whole when it is a prefix of
    /// the prompt, and in part when they share at least [`MIN_PARTIAL_PREFIX`] tokens.
    fn lookup(&mut self, prompt: &[u32], routing: &RoutingOptions) -> Option<(SeqCache, Option<SlotPositions>, usize)> {
        self.clock += 1;
        let limit = prompt.len().saturating_sub(1);
        let best = self
            .entries
            .iter_mut()
            .filter(|e| same_routing(&e.routing, routing))
            .map(|e| (common_prefix(&e.ids, prompt).min(limit), e))
            .filter(|(n, e)| *n > 0 && (*n == e.ids.len() || (*n >= MIN_PARTIAL_PREFIX && e.positions.is_some())))
            .max_by_key(|(n, _)| *n);
        match best {
            Some((n, e)) => {
                e.used = self.clock;
                self.hits += 1;
                self.reused_tokens += n as u64;
                match &e.positions {
                    Some(p) => {
                        let (cache, kept) = cut_cache(&e.cache, p, n);
                        Some((cache, Some(kept), n))
                    }
                    None => Some((e.cache.clone(), None, n)),
                }
            }
            None => {
                self.misses += 1;
                None
            }
        }
    }

    /// Keep a copy of `cache`, which holds exactly `ids` (its slots the tokens of `positions`,
    /// when known); evict least recently used entries past the limit (an entry larger than the
    /// limit is not kept).
    fn insert(&mut self, ids: &[u32], routing: &RoutingOptions, cache: &SeqCache, positions: Option<&SlotPositions>) {
        if self.entries.iter().any(|e| e.ids == ids && same_routing(&e.routing, routing)) {
            return;
        }
        let bytes = cache.bytes();
        if bytes > self.limit_bytes {
            return;
        }
        self.clock += 1;
        self.entries.push(PrefixEntry {
            ids: ids.to_vec(),
            routing: routing.clone(),
            cache: cache.clone(),
            positions: positions.cloned(),
            bytes,
            used: self.clock,
        });
        while self.bytes() > self.limit_bytes {
            let oldest = (0..self.entries.len()).min_by_key(|&i| self.entries[i].used).expect("over the limit");
            self.entries.swap_remove(oldest);
            self.evictions += 1;
        }
    }
}

/// A changing set of sequences generated together: sequences join ([`Batch::add`]) and leave
/// ([`Batch::remove`], or when they finish) between steps, each with its own options. Each
/// [`Batch::step`] runs one packed forward per group of sequences that share their routing
/// settings: prefill (in chunks) and decode in the same call, no padding (DESIGN §5). A
/// sequence's tokens do not depend on what else is in the batch. `generate` and the server
/// (`crate::serve`) both run on this.
pub struct Batch<'a> {
    model: &'a Model,
    tok: &'a Tokenizer,
    /// Indexed by sequence id; `None` once removed.
    seqs: Vec<Option<SeqState>>,
    /// The thinking layers' indices, the order of `GeneratedToken::depth`.
    pub layers: Vec<usize>,
    /// Routing statistics over everything run so far.
    pub record: ForwardRecord,
    /// Caches of prompt prefixes for later sequences (the server's `--prefix-cache-mb`).
    pub prefix_cache: Option<PrefixCache>,
    /// What speculation did, over every sequence so far.
    pub spec: SpecStats,
}

impl<'a> Batch<'a> {
    pub fn new(model: &'a Model, tok: &'a Tokenizer) -> Result<Self> {
        if tok.vocab_size() != model.cfg.vocab_size {
            return Err(Error::usage(format!(
                "the tokenizer has {} tokens but the model {}; they do not belong together",
                tok.vocab_size(),
                model.cfg.vocab_size
            )));
        }
        let layers = model.thinking_layers().map(|t| t.layer).collect();
        Ok(Batch {
            model,
            tok,
            seqs: vec![],
            layers,
            record: ForwardRecord::default(),
            prefix_cache: None,
            spec: SpecStats::default(),
        })
    }

    /// Check that `opts` can run on this model (sampling values, causal routing with a cache).
    pub fn check_options(&self, opts: &GenerateOptions) -> Result<()> {
        opts.sampling.validate()?;
        self.model.check_routing(&opts.routing)?;
        // With one step, or every routed share 0, nothing is routed and top-k is trivially causal.
        let routes =
            opts.routing.steps != Some(1) && !opts.routing.ratios.as_ref().is_some_and(|r| r.iter().all(|&x| x == 0.0));
        if opts.use_cache && self.model.has_routers() && opts.routing.mode == Routing::TopK && routes {
            return Err(Error::usage(
                "top-k routing is not causal, so it cannot decode with a KV cache; use threshold routing or disable the cache",
            ));
        }
        if opts.speculate > 0 {
            if let Some(why) = crate::speculate::unsupported(self.model, &opts.routing, opts.use_cache) {
                return Err(Error::usage(format!("speculative decoding cannot run: {why}")));
            }
        }
        Ok(())
    }

    /// Encode a prompt and check that it fits the model's context.
    pub fn encode_prompt(&self, prompt: &str) -> Result<Vec<u32>> {
        if prompt.is_empty() {
            return Err(Error::usage("the prompt is empty"));
        }
        let ids = self.tok.encode(prompt)?;
        if ids.is_empty() {
            return Err(Error::usage("the prompt encodes to no tokens"));
        }
        Ok(ids)
    }

    /// Add a sequence continuing the token ids `prompt`; returns its id (ids count up from 0 in
    /// the order sequences are added). The KV caches get room for the prompt and
    /// `max_new_tokens` up front.
    pub fn add(&mut self, prompt: Vec<u32>, opts: GenerateOptions) -> Result<usize> {
        self.check_options(&opts)?;
        let ctx = self.model.cfg.max_seq_len;
        if prompt.is_empty() {
            return Err(Error::usage("the prompt is empty"));
        }
        // Scoring only (max_new_tokens 0) may fill the context; generating needs a free place.
        let room = usize::from(opts.max_new_tokens > 0);
        if prompt.len() + room > ctx {
            return Err(Error::usage(format!(
                "the prompt has {} tokens; the model's context is {ctx}, leaving no room to generate",
                prompt.len()
            )));
        }
        if let Some(&bad) = prompt.iter().find(|&&id| id as usize >= self.model.cfg.vocab_size) {
            return Err(Error::usage(format!(
                "token id {bad} is outside the vocabulary of {}",
                self.model.cfg.vocab_size
            )));
        }
        let reserve = if opts.use_cache { (prompt.len() + opts.max_new_tokens).min(ctx) } else { 0 };
        // Prompt scoring needs the prompt's own rows, so it does not start from a cached prefix.
        let cached = match &mut self.prefix_cache {
            Some(pc) if opts.use_cache && !opts.prompt_logprobs => pc.lookup(&prompt, &opts.routing),
            _ => None,
        };
        let tracks = self.prefix_cache.is_some() && opts.use_cache && !opts.prompt_logprobs;
        let (cache, positions, fed) = match cached {
            Some((cache, positions, fed)) => (cache, positions.filter(|_| tracks), fed),
            None => {
                let cache = self.model.new_cache_reserved(reserve);
                let empty = cache.slots.iter().map(|l| vec![vec![]; l.len()]).collect();
                (cache, Some(empty).filter(|_| tracks), 0)
            }
        };
        self.seqs.push(Some(SeqState {
            prompt_len: prompt.len(),
            ids: prompt,
            fed,
            cache,
            rng: Rng::derive(opts.sampling.seed, "sample"),
            opts,
            text: String::new(),
            emitted: 0,
            extra_block_steps: 0,
            done: None,
            prompt_logprobs: vec![],
            prompt_sent: false,
            spec: None,
            drafted: 0,
            accepted: 0,
            positions,
        }));
        Ok(self.seqs.len() - 1)
    }

    /// Drop sequence `id` (finished or not) and free its caches.
    pub fn remove(&mut self, id: usize) {
        if let Some(s) = self.seqs.get_mut(id) {
            *s = None;
        }
    }

    /// Change the routing of a running sequence from its next token on (the server's load
    /// valve). Causal routing keeps the cache valid: each token's steps depend on its past only.
    pub fn set_routing(&mut self, id: usize, routing: RoutingOptions) {
        if let Some(Some(s)) = self.seqs.get_mut(id) {
            s.opts.routing = routing;
        }
    }

    /// The routing a sequence runs with now.
    pub fn routing(&self, id: usize) -> Option<&RoutingOptions> {
        self.seqs.get(id)?.as_ref().map(|s| &s.opts.routing)
    }

    pub fn usage(&self, id: usize) -> Option<SeqUsage> {
        Some(self.seqs.get(id)?.as_ref()?.usage())
    }

    /// Sequences added and not yet finished or removed.
    pub fn running(&self) -> usize {
        self.seqs.iter().flatten().filter(|s| s.done.is_none()).count()
    }

    /// KV-cache bytes held now, over all sequences.
    pub fn cache_bytes(&self) -> usize {
        self.seqs.iter().flatten().map(|s| s.cache.bytes()).sum()
    }

    /// Cached tokens per (layer, step) of sequence `id`.
    pub fn cache_lens(&self, id: usize) -> Vec<Vec<usize>> {
        self.seqs.get(id).and_then(|s| s.as_ref()).map(|s| s.cache.lens()).unwrap_or_default()
    }

    /// Run the model once for every running sequence: feed what it has not fed yet (a prompt
    /// chunk, or its last token) and, where its text is all fed, sample its next token.
    /// Returns the events in sequence order. A failed step finishes no sequence.
    pub fn step(&mut self) -> Result<Vec<Event>> {
        // Speculating sequences past their first token run a round of their own instead
        // (`crate::speculate`): their passes are single-sequence, so their tokens do not
        // depend on what else is in the batch either.
        let (spec, active): (Vec<usize>, Vec<usize>) = (0..self.seqs.len())
            .filter(|&i| self.seqs[i].as_ref().is_some_and(|s| s.done.is_none()))
            .partition(|&i| self.spec_draft_len(i) > 0);
        // Sequences with the same routing settings and cache use share one packed call.
        let mut groups: Vec<Vec<usize>> = vec![];
        for &i in &active {
            let o = &self.seq(i).opts;
            match groups.iter_mut().find(|g| {
                let p = &self.seqs[g[0]].as_ref().expect("active").opts;
                p.use_cache == o.use_cache && same_routing(&p.routing, &o.routing)
            }) {
                Some(g) => g.push(i),
                None => groups.push(vec![i]),
            }
        }
        let mut ready: Vec<Ready> = vec![];
        for g in groups {
            ready.extend(self.run_group(&g)?);
        }
        ready.sort_by_key(|r| r.0);
        let mut events = vec![];
        for (i, logits, depth) in ready {
            let s = self.seqs[i].as_mut().expect("active");
            if s.opts.prompt_logprobs && !s.prompt_sent {
                s.prompt_sent = true;
                events.push(Event::Prompt { seq: i, logprobs: std::mem::take(&mut s.prompt_logprobs) });
            }
            if s.opts.max_new_tokens == 0 {
                // Scoring only (`echo` with max_tokens 0): the prompt was all there was to run.
                self.finish(i, FinishReason::Length, &mut events);
                continue;
            }
            let id = if s.opts.sampling.adjusts() {
                let mut adjusted = logits.clone();
                s.opts.sampling.adjust(&mut adjusted, &s.ids[..s.prompt_len], &s.ids[s.prompt_len..]);
                sample(&adjusted, &s.opts.sampling, &mut s.rng)
            } else {
                sample(&logits, &s.opts.sampling, &mut s.rng)
            };
            let logprob = s.opts.logprobs.map(|n| TokenLogprob::from_logits(&logits, id, n));
            self.push_token(i, id, depth, logprob, &mut events)?;
        }
        for i in spec {
            self.speculate(i, &mut events)?;
        }
        Ok(events)
    }

    /// Tokens sequence `i` drafts if it speculates this step: 0 when it does not speculate, is
    /// still in its prompt, or has room for one more token only (the verify pass adds one
    /// token of its own to the drafts it keeps).
    fn spec_draft_len(&self, i: usize) -> usize {
        let s = self.seq(i);
        let generated = s.ids.len() - s.prompt_len;
        if s.opts.speculate == 0 || generated == 0 || s.fed + 1 != s.ids.len() {
            return 0;
        }
        let left = s.opts.max_new_tokens.saturating_sub(generated + 1);
        let room = self.model.cfg.max_seq_len.saturating_sub(s.ids.len() + 1);
        s.opts.speculate.min(left).min(room)
    }

    /// One speculative round of sequence `i`: draft, verify, then emit the kept tokens one by
    /// one as plain decoding would (stop strings, end of text and limits end it at the right
    /// token; what follows is dropped with the finished sequence's caches).
    fn speculate(&mut self, i: usize, events: &mut Vec<Event>) -> Result<()> {
        let k = self.spec_draft_len(i);
        let model = self.model;
        let s = self.seqs[i].as_mut().expect("active");
        let reserve = (s.prompt_len + s.opts.max_new_tokens + s.opts.speculate + 1).min(model.cfg.max_seq_len + k + 1);
        let mut sp = s.spec.take().unwrap_or_else(|| Speculator::new(model, s.opts.speculate, reserve));
        let ctx = crate::speculate::Context {
            ids: &s.ids,
            prompt_len: s.prompt_len,
            routing: &s.opts.routing,
            sampling: &s.opts.sampling,
        };
        let round = sp.round(model, &ctx, &mut s.cache, &mut s.rng, k);
        s.spec = Some(sp);
        let round = round?;
        s.extra_block_steps += round.extra_block_steps;
        s.drafted += round.stats.drafted;
        s.accepted += round.stats.accepted;
        let top = s.opts.logprobs;
        // The full cache holds the kept tokens but the last: as after a plain step's feed.
        s.fed = s.ids.len() + round.tokens.len() - 1;
        self.spec.add(&round.stats);
        self.record.merge_stats(&round.record);
        for t in round.tokens {
            let logprob = top.map(|n| TokenLogprob::from_logits(&t.logits, t.id, n));
            self.push_token(i, t.id, t.depth, logprob, events)?;
            if self.seq(i).done.is_some() {
                break;
            }
        }
        Ok(())
    }

    fn seq(&self, i: usize) -> &SeqState {
        self.seqs[i].as_ref().expect("a running sequence")
    }

    /// One packed forward of the sequences `group` (same routing and cache use). Returns, for
    /// each sequence whose text is now all fed, its next-token logits and the depth per
    /// thinking layer at its last position.
    fn run_group(&mut self, group: &[usize]) -> Result<Vec<Ready>> {
        let opts = self.seq(group[0]).opts.clone();
        let mut detail = ForwardRecord { keep_detail: true, ..Default::default() };
        let (lens, past): (Vec<usize>, Vec<usize>) = group
            .iter()
            .map(|&i| {
                let s = self.seq(i);
                if s.opts.use_cache {
                    let mut chunk = if s.opts.prefill_chunk == 0 { usize::MAX } else { s.opts.prefill_chunk };
                    if self.prefix_cache.is_some() && s.fed + 1 < s.prompt_len && !s.opts.prompt_logprobs {
                        // Stop before the last prompt token, so the caches then hold a prefix
                        // the prefix cache can keep (`PrefixCache`).
                        chunk = chunk.min(s.prompt_len - 1 - s.fed);
                    }
                    ((s.ids.len() - s.fed).min(chunk), s.fed)
                } else {
                    // No cache: the whole text so far, every time.
                    (s.ids.len(), 0)
                }
            })
            .unzip();
        let ids: Vec<u32> = group
            .iter()
            .zip(lens.iter().zip(&past))
            .flat_map(|(&i, (&n, &p))| self.seq(i).ids[p..p + n].to_vec())
            .collect();
        let layout = SeqLayout::with_past(&lens, &past);
        let x = Tensor::from_slice(&ids, ids.len(), self.model.device())?;
        let hidden = if opts.use_cache {
            let mut caches: Vec<SeqCache> = group
                .iter()
                .map(|&i| std::mem::replace(&mut self.seqs[i].as_mut().expect("active").cache, empty_cache()))
                .collect();
            let before: Vec<Vec<Vec<usize>>> = caches.iter().map(SeqCache::lens).collect();
            let hidden = self.model.forward_hidden(&x, &layout, &opts.routing, Some(&mut caches), Some(&mut detail));
            let starts = layout.starts();
            for (k, (&i, c)) in group.iter().zip(caches).enumerate() {
                let s = self.seqs[i].as_mut().expect("active");
                if let Some(pos) = &mut s.positions {
                    let call = CallRows { start: starts[k], past: past[k], n: lens[k] };
                    if hidden.is_err() || !track_positions(pos, &c, &before[k], call, &detail.selections) {
                        s.positions = None;
                    }
                }
                s.cache = c;
            }
            hidden?
        } else {
            self.model.forward_hidden(&x, &layout, &opts.routing, None, Some(&mut detail))?
        };
        self.record.merge_stats(&detail);
        let depth_at = |row: usize| -> Vec<u32> {
            self.layers.iter().map(|l| detail.depth.get(l).map(|d| d[row]).unwrap_or(1)).collect()
        };
        let starts = layout.starts();
        let (mut rows, mut out) = (vec![], vec![]);
        // Rows whose next token is a prompt token to score: (sequence, row, that token).
        let mut scored: Vec<(usize, usize, u32)> = vec![];
        for (k, &i) in group.iter().enumerate() {
            let s = self.seq(i);
            if s.opts.prompt_logprobs {
                // Row r holds position past[k] + (r - starts[k]) and predicts the token after it.
                let first_new = s.fed.max(past[k]);
                for p in first_new..(past[k] + lens[k]).min(s.prompt_len - 1) {
                    scored.push((i, starts[k] + p - past[k], s.ids[p + 1]));
                }
            }
        }
        for (k, &i) in group.iter().enumerate() {
            // Charge the rows of tokens not run before: all of a cached call's rows, the new
            // tail of an uncached one (which re-runs the whole text from position 0).
            let s = self.seqs[i].as_mut().expect("active");
            let first_new = starts[k] + s.fed - past[k];
            let end = starts[k] + lens[k];
            s.extra_block_steps +=
                (first_new..end).flat_map(&depth_at).map(|d| d.saturating_sub(1) as u64).sum::<u64>();
            s.fed = past[k] + lens[k];
            if s.opts.use_cache && s.fed + 1 == s.prompt_len && s.fed > past[k] && !s.opts.prompt_logprobs {
                if let Some(pc) = &mut self.prefix_cache {
                    pc.insert(&s.ids[..s.fed], &s.opts.routing, &s.cache, s.positions.as_ref());
                }
            }
            if s.fed + 1 >= s.prompt_len {
                // Past the prompt's prefix nothing is kept for the prefix cache.
                s.positions = None;
            }
            if s.fed == s.ids.len() {
                let row = starts[k] + lens[k] - 1;
                rows.push(hidden.narrow(0, row, 1)?);
                out.push((i, depth_at(row)));
            }
        }
        for &(_, row, _) in &scored {
            rows.push(hidden.narrow(0, row, 1)?);
        }
        if rows.is_empty() {
            return Ok(vec![]);
        }
        let mut logits = self.model.logits(&Tensor::cat(&rows, 0)?)?.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        for ((i, _, id), l) in scored.into_iter().zip(logits.drain(out.len()..)) {
            let s = self.seqs[i].as_mut().expect("active");
            let n = s.opts.logprobs.unwrap_or(0);
            s.prompt_logprobs.push(TokenLogprob::from_logits(&l, id, n));
        }
        Ok(out.into_iter().zip(logits).map(|((i, d), l)| (i, l, d)).collect())
    }

    /// End sequence `i` for `reason`: it keeps its tokens and usage, not its caches.
    fn finish(&mut self, i: usize, reason: FinishReason, events: &mut Vec<Event>) {
        let s = self.seqs[i].as_mut().expect("active");
        s.done = Some(reason);
        s.cache = empty_cache();
        events.push(Event::Finished { seq: i, reason, text: s.text.clone(), usage: s.usage() });
    }

    fn push_token(
        &mut self,
        i: usize,
        id: u32,
        depth: Vec<u32>,
        logprob: Option<TokenLogprob>,
        events: &mut Vec<Event>,
    ) -> Result<()> {
        let max_seq_len = self.model.cfg.max_seq_len;
        let s = self.seqs[i].as_mut().expect("active");
        let mut finished = None;
        if id == self.tok.eot_id() && !s.opts.ignore_eot {
            finished = Some(FinishReason::EndOfText);
            // With log-probabilities the end-of-text token is reported like any other (no
            // text, not in the sequence), as OpenAI and vLLM do: lm-evaluation-harness scores
            // `echo` + `max_tokens: 1` by dropping the last entry, taking it for the generated
            // token, so without it the continuation's last token would go missing.
            if logprob.is_some() {
                events.push(Event::Token(GeneratedToken { seq: i, id, text: String::new(), depth, logprob }));
            }
        } else if s.opts.stop_ids.contains(&id) {
            finished = Some(FinishReason::Stop);
        } else {
            s.ids.push(id);
            // Decode the whole generated part so multi-byte characters split over tokens come
            // out whole; emit only what is new and stable.
            let full = self.tok.decode(&s.ids[s.prompt_len..])?;
            let mut visible = full.clone();
            if let Some(stop) = s.opts.stop.iter().filter(|st| !st.is_empty()).find_map(|st| full.find(st.as_str())) {
                visible.truncate(stop);
                finished = Some(FinishReason::Stop);
            }
            let new_text = visible.get(s.emitted..).unwrap_or("").trim_end_matches('\u{FFFD}').to_string();
            s.emitted += new_text.len();
            s.text = visible;
            events.push(Event::Token(GeneratedToken { seq: i, id, text: new_text, depth, logprob }));
            let generated = s.ids.len() - s.prompt_len;
            if finished.is_none() && generated >= s.opts.max_new_tokens {
                finished = Some(FinishReason::Length);
            }
            if finished.is_none() && s.ids.len() >= max_seq_len {
                finished = Some(FinishReason::Context);
            }
        }
        if let Some(reason) = finished {
            self.finish(i, reason, events);
        }
        Ok(())
    }

    /// The token ids generated so far for sequence `id`.
    pub fn generated_ids(&self, id: usize) -> Option<&[u32]> {
        let s = self.seqs.get(id)?.as_ref()?;
        Some(&s.ids[s.prompt_len..])
    }
}

/// Whether two routing settings route every token the same way (so their sequences can share a
/// packed call).
/// Where one sequence's tokens sit in a packed call: its first row, the tokens before them,
/// and how many.
struct CallRows {
    start: usize,
    past: usize,
    n: usize,
}

/// Add to `positions` the tokens a call appended to each slot of `cache` (lengths `before`
/// the call): every token of the call where a slot grew by all of them, none where it did not
/// grow, and the call's selections at a routed step (packed rows, keyed (layer, step) with
/// step t in slot t - 1). False when a slot grew in any other way.
fn track_positions(
    positions: &mut SlotPositions,
    cache: &SeqCache,
    before: &[Vec<usize>],
    call: CallRows,
    selections: &BTreeMap<(usize, usize), Vec<u32>>,
) -> bool {
    let rows = call.start..call.start + call.n;
    for (l, slots) in cache.slots.iter().enumerate() {
        for (st, c) in slots.iter().enumerate() {
            let grown = c.len() - before[l][st];
            let p = &mut positions[l][st];
            if grown == call.n {
                p.extend((call.past..call.past + call.n).map(|x| x as u32));
            } else if grown > 0 {
                let Some(sel) = selections.get(&(l, st + 1)) else { return false };
                let mine = sel.iter().filter(|&&r| rows.contains(&(r as usize)));
                let at = p.len();
                p.extend(mine.map(|&r| (call.past + r as usize - call.start) as u32));
                if p.len() - at != grown {
                    return false;
                }
            }
        }
    }
    true
}

fn same_routing(a: &RoutingOptions, b: &RoutingOptions) -> bool {
    let same_arc = |x: &Option<Arc<RouterCalibration>>, y: &Option<Arc<RouterCalibration>>| match (x, y) {
        (None, None) => true,
        (Some(x), Some(y)) => Arc::ptr_eq(x, y),
        _ => false,
    };
    a.mode == b.mode
        && a.ratios == b.ratios
        && a.steps == b.steps
        && a.early_exit.map(f32::to_bits) == b.early_exit.map(f32::to_bits)
        && same_arc(&a.calibration, &b.calibration)
        && a.forced.is_none()
        && b.forced.is_none()
}

/// A streaming generation of a fixed set of prompts: iterate to get events in order.
pub struct Generation<'a> {
    batch: Batch<'a>,
    pending: VecDeque<Event>,
    /// The thinking layers' indices, the order of `GeneratedToken::depth`.
    pub layers: Vec<usize>,
}

/// Start generating continuations of `prompts`.
pub fn generate<'a>(
    model: &'a Model,
    tok: &'a Tokenizer,
    prompts: &[String],
    opts: GenerateOptions,
) -> Result<Generation<'a>> {
    if prompts.is_empty() {
        return Err(Error::usage("no prompt given"));
    }
    let mut batch = Batch::new(model, tok)?;
    batch.check_options(&opts)?;
    for (i, p) in prompts.iter().enumerate() {
        let ids = batch.encode_prompt(p).map_err(|e| Error::usage(format!("prompt {}: {e}", i + 1)))?;
        batch.add(ids, opts.clone()).map_err(|e| Error::usage(format!("prompt {}: {e}", i + 1)))?;
    }
    let layers = batch.layers.clone();
    Ok(Generation { batch, pending: VecDeque::new(), layers })
}

impl Generation<'_> {
    /// Routing statistics over the whole generation.
    pub fn record(&self) -> &ForwardRecord {
        &self.batch.record
    }

    /// Run to the end and return each sequence's generated text, finish reason and token ids.
    pub fn collect_all(mut self) -> Result<Vec<(String, FinishReason, Vec<u32>)>> {
        let n = self.batch.seqs.len();
        let mut out: Vec<Option<(String, FinishReason)>> = vec![None; n];
        for ev in self.by_ref() {
            if let Event::Finished { seq, reason, text, .. } = ev? {
                out[seq] = Some((text, reason));
            }
        }
        Ok(out
            .into_iter()
            .enumerate()
            .map(|(i, o)| {
                let (t, r) = o.expect("every sequence finishes");
                (t, r, self.batch.generated_ids(i).unwrap_or_default().to_vec())
            })
            .collect())
    }

    /// KV-cache bytes held now, over all sequences.
    pub fn cache_bytes(&self) -> usize {
        self.batch.cache_bytes()
    }

    /// Cached tokens per (layer, step) of sequence `i`.
    pub fn cache_lens(&self, i: usize) -> Vec<Vec<usize>> {
        self.batch.cache_lens(i)
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
            if self.batch.running() == 0 {
                return None;
            }
            match self.batch.step() {
                Ok(evs) => self.pending.extend(evs),
                Err(e) => {
                    let ids: Vec<usize> = (0..self.batch.seqs.len()).collect();
                    for i in ids {
                        self.batch.remove(i);
                    }
                    return Some(Err(e));
                }
            }
        }
    }
}

/// The largest logit's id, ties to the lower id.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &z) in logits.iter().enumerate() {
        if z > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Draw a token id from one row of logits.
pub fn sample(logits: &[f32], p: &SamplingParams, rng: &mut Rng) -> u32 {
    if p.temperature == 0.0 {
        return argmax(logits);
    }
    let (idx, probs) = distribution(logits, p);
    draw(&idx, &probs, rng)
}

/// Draw one of `idx` with probabilities `probs` (summing to 1).
pub fn draw(idx: &[usize], probs: &[f64], rng: &mut Rng) -> u32 {
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

/// The distribution `sample` draws from at temperature > 0: candidate ids and their
/// probabilities after temperature, top-k and top-p.
pub fn distribution(logits: &[f32], p: &SamplingParams) -> (Vec<usize>, Vec<f64>) {
    // Candidates in descending order of logit (ties to the lower id) when top-k or top-p cut
    // them; without either every token is a candidate and no sort is needed (a full sort of a
    // 49k vocabulary per token was a measurable share of a decode step).
    let mut idx: Vec<usize> = if p.top_k > 0 || p.top_p < 1.0 {
        top_ids(logits, if p.top_k > 0 { p.top_k } else { logits.len() })
    } else {
        (0..logits.len()).collect()
    };
    let max = idx.iter().map(|&i| logits[i]).fold(f32::NEG_INFINITY, f32::max) as f64;
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
    (idx, probs)
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

    #[test]
    fn penalties_and_biases_match_a_hand_computation() {
        let p = SamplingParams {
            presence_penalty: 0.5,
            frequency_penalty: 0.25,
            repetition_penalty: 2.0,
            logit_bias: vec![(2, 1.0), (4, -100.0)],
            ..SamplingParams::greedy()
        };
        let mut logits = [2.0f32, -1.0, 0.5, 3.0, 0.0];
        p.adjust(&mut logits, &[0, 1], &[3, 3, 1]);
        // Repetition over {0, 1, 3}: 2/2, -1*2, 3/2. Generated counts {3: 2, 1: 1}:
        // z3 = 1.5 - 0.5 - 2*0.25, z1 = -2 - 0.5 - 0.25. Biases: z2 = 0.5 + 1, z4 = 0 - 100.
        assert_eq!(logits, [1.0, -2.75, 1.5, 0.5, -100.0]);
        assert_eq!(sample(&logits, &p, &mut Rng::new(1)), 2);
        assert!(!SamplingParams::default().adjusts() && p.adjusts());
        assert!(SamplingParams { presence_penalty: 3.0, ..Default::default() }.validate().is_err());
        assert!(SamplingParams { repetition_penalty: 0.0, ..Default::default() }.validate().is_err());
        assert!(SamplingParams { logit_bias: vec![(0, 101.0)], ..Default::default() }.validate().is_err());
    }

    #[test]
    fn token_logprobs_are_the_log_softmax_with_the_top_sorted() {
        let logits = [1.0f32, 3.0, 2.0, 3.0];
        let lse = (1f64.exp() + 2.0 * 3f64.exp() + 2f64.exp()).ln();
        let lp = TokenLogprob::from_logits(&logits, 2, 3);
        assert!((lp.logprob as f64 - (2.0 - lse)).abs() < 1e-6);
        let ids: Vec<u32> = lp.top.iter().map(|t| t.0).collect();
        assert_eq!(ids, [1, 3, 2], "most likely first, ties to the lower id");
        assert!((lp.top[0].1 as f64 - (3.0 - lse)).abs() < 1e-6);
        assert!(TokenLogprob::from_logits(&logits, 0, 0).top.is_empty());
    }
}

#[cfg(test)]
pub(crate) mod generation_tests {
    use super::*;
    use crate::base::config::TestModel;
    use crate::model::{RouterCalibration, SeqLayout};
    use candle_core::Device;
    use std::sync::Arc;

    /// A small random tiny-itt4 with causal thresholds from one pass (also `speculate`'s tests).
    pub(crate) fn setup() -> (Model, Tokenizer, Arc<RouterCalibration>) {
        let tok = Tokenizer::char_from_text("0123456789+-= \nabcdefghij");
        let cfg = TestModel::preset("tiny-itt4")
            .vocab(tok.vocab_size())
            .width(32, 48)
            .heads(2, 1)
            .context(64)
            .init_std(0.2)
            .router_init_std(0.5)
            .config();
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
        for sampling in [
            SamplingParams::greedy(),
            SamplingParams { temperature: 1.0, top_k: 5, top_p: 0.9, seed: 3, ..Default::default() },
        ] {
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

    /// The server's rule on quantized weights (DESIGN §12, §13): batched prefill and decode run
    /// the tiled quantized product (several rows per unpacked weight quad), a sequence alone
    /// decodes one row at a time through candle's block dot; its tokens are the same.
    #[test]
    fn quantized_batch_equals_alone() {
        use candle_core::quantized::{GgmlDType, QTensor};
        let tok = Tokenizer::char_from_text("0123456789+-= \nabcdefghij");
        let cfg = TestModel::preset("tiny")
            .vocab(tok.vocab_size())
            .width(64, 96)
            .heads(2, 1)
            .context(64)
            .init_std(0.2)
            .config();
        let mut model = Model::new(&cfg, 7, &Device::Cpu).unwrap();
        let mut quant = std::collections::HashMap::new();
        for (name, var) in &model.params {
            let dtype = match name.as_str() {
                "embed.weight" if cfg.tie_embeddings => GgmlDType::Q8_0,
                n if n.contains(".attn.w") || n.contains(".mlp.w") => GgmlDType::Q4_1,
                _ => continue,
            };
            quant.insert(name.clone(), Arc::new(QTensor::quantize(var.as_tensor(), dtype).unwrap()));
        }
        model.set_quantized(quant).unwrap();
        assert!(model.quantized_summary().contains("Q4_1"), "{}", model.quantized_summary());
        let prompts = ["12+34=", "9", "abc def ghij\n77-", "5+5="];
        let opts = GenerateOptions { max_new_tokens: 12, sampling: SamplingParams::greedy(), ..Default::default() };
        let batch = run(&model, &tok, &prompts, &opts);
        for (i, p) in prompts.iter().enumerate() {
            assert_eq!(run(&model, &tok, &[p], &opts)[0], batch[i], "prompt {p:?} alone vs in a batch");
        }
    }

    #[test]
    fn sequences_joining_and_leaving_a_running_batch_keep_their_tokens() {
        let (model, tok, cal) = setup();
        let routing = RoutingOptions { mode: Routing::Threshold, calibration: Some(cal), ..Default::default() };
        let opts =
            GenerateOptions { max_new_tokens: 10, sampling: SamplingParams::greedy(), routing, ..Default::default() };
        let elastic = GenerateOptions {
            routing: RoutingOptions { ratios: Some(vec![0.3, 0.3, 0.3]), ..opts.routing.clone() },
            prefill_chunk: 3,
            sampling: SamplingParams { temperature: 0.9, top_k: 0, top_p: 1.0, seed: 5, ..Default::default() },
            ..opts.clone()
        };
        let (p1, p2, p3) = ("12+34=", "abc def ghij\n77-", "5+5=");
        let alone1 = run(&model, &tok, &[p1], &opts)[0].clone();
        let alone2 = run(&model, &tok, &[p2], &elastic)[0].clone();
        let mut b = Batch::new(&model, &tok).unwrap();
        let mut got: Vec<Vec<u32>> = vec![vec![]; 3];
        let mut usage = vec![None; 3];
        let mut take = |evs: Vec<Event>, got: &mut Vec<Vec<u32>>| {
            for ev in evs {
                match ev {
                    Event::Token(t) => got[t.seq].push(t.id),
                    Event::Finished { seq, usage: u, .. } => usage[seq] = Some(u),
                    Event::Prompt { .. } => {}
                }
            }
        };
        let a = b.add(tok.encode(p1).unwrap(), opts.clone()).unwrap();
        for _ in 0..3 {
            take(b.step().unwrap(), &mut got);
        }
        let c = b.add(tok.encode(p2).unwrap(), elastic.clone()).unwrap();
        let d = b.add(tok.encode(p3).unwrap(), opts.clone()).unwrap();
        take(b.step().unwrap(), &mut got);
        b.remove(d);
        assert!(b.cache_lens(d).is_empty(), "a removed sequence frees its caches");
        while b.running() > 0 {
            take(b.step().unwrap(), &mut got);
        }
        assert_eq!((a, c, d), (0, 1, 2));
        assert_eq!(got[a], alone1, "a sequence's tokens change when others join");
        assert_eq!(got[c], alone2, "a sequence joining a running batch (other routing, chunked) differs");
        let u = usage[c].clone().unwrap();
        assert_eq!((u.prompt_tokens, u.completion_tokens), (tok.encode(p2).unwrap().len(), got[c].len()));
        assert!(u.extra_block_steps > 0, "the thinking layers took routed steps");
        assert!(usage[d].is_none(), "a removed sequence does not finish");
    }

    /// A prompt that shares only part of a cached entry (a system text, then another question)
    /// starts from the entry cut to the shared tokens, each routed slot to what it selected
    /// before the cut: the same tokens and the same cache sizes as without the cache.
    #[test]
    fn a_shared_prefix_is_reused_from_a_longer_entry_with_the_same_tokens() {
        let (model, tok, cal) = setup();
        let routing = RoutingOptions { mode: Routing::Threshold, calibration: Some(cal), ..Default::default() };
        let system = "abc def ghij\n".repeat(2);
        let asks = ["12+34=", "5+5=10\n7", "901-3="];
        for (sampling, chunk) in [
            (SamplingParams::greedy(), 0),
            (SamplingParams { temperature: 0.9, top_k: 0, top_p: 1.0, seed: 5, ..Default::default() }, 3),
        ] {
            let opts = GenerateOptions {
                max_new_tokens: 8,
                sampling,
                routing: routing.clone(),
                prefill_chunk: chunk,
                ..Default::default()
            };
            let mut cached = Batch::new(&model, &tok).unwrap();
            cached.prefix_cache = Some(PrefixCache::new(64 << 20));
            for (n, ask) in asks.iter().enumerate() {
                let prompt = tok.encode(&format!("{system}{ask}")).unwrap();
                let mut plain = Batch::new(&model, &tok).unwrap();
                let (a, b) =
                    (plain.add(prompt.clone(), opts.clone()).unwrap(), cached.add(prompt, opts.clone()).unwrap());
                let (mut want, mut got) = (vec![], vec![]);
                let tokens = |evs: Vec<Event>, out: &mut Vec<u32>| {
                    out.extend(evs.into_iter().filter_map(|e| if let Event::Token(t) = e { Some(t.id) } else { None }))
                };
                while want.is_empty() {
                    tokens(plain.step().unwrap(), &mut want);
                }
                while got.is_empty() {
                    tokens(cached.step().unwrap(), &mut got);
                }
                assert_eq!(cached.cache_lens(b), plain.cache_lens(a), "cache sizes after the prompt, ask {ask:?}");
                while plain.running() > 0 {
                    tokens(plain.step().unwrap(), &mut want);
                }
                while cached.running() > 0 {
                    tokens(cached.step().unwrap(), &mut got);
                }
                assert_eq!(got, want, "tokens with and without the prefix cache, ask {ask:?}");
                let pc = cached.prefix_cache.as_ref().unwrap();
                // The first prompt finds nothing; each later one shares the system text and its
                // question's first characters with nothing cached, so exactly the system text.
                assert_eq!((pc.hits, pc.misses), (n as u64, 1), "ask {ask:?}");
                assert_eq!(pc.reused_tokens, (n * system.len()) as u64, "ask {ask:?}");
            }
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
