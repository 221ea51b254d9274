//! Self-speculative decoding for ITT models (DESIGN §12, "Speculative decoding"; not in the
//! paper). The same weights with every routed step off (`steps: 1`) are a cheaper model that
//! agrees with the full one on most tokens: it drafts `k` tokens one by one with its own KV
//! caches (its states differ from the full model's after the first thinking layer), then ONE
//! causal pass of the full model over the last accepted token and the drafts scores them all.
//! Greedy keeps the agreeing prefix plus the full model's own next token; sampling keeps draft x
//! with probability min(1, p(x)/q(x)) and otherwise draws from norm(max(0, p - q)) (Leviathan
//! et al. 2023, Chen et al. 2023), so the output is distributed exactly as the full model's.
//! Penalties and logit biases change p and q alike (each row adjusted with the tokens before
//! it), which the rule allows: it needs only that q is what the draft drew from. Rejected
//! tokens are rolled back from both models' caches. Causal routing makes this sound: a token's
//! routing depends only on its past, so the verify pass routes the accepted tokens as
//! token-by-token decoding would (DESIGN §5).
//!
//! [`Speculator::round`] is one draft-and-verify step of one sequence; `generate::Batch` runs it
//! for every sequence with `GenerateOptions::speculate` once its first token is out, so the
//! CLI, `itt bench` and the server share it.

use crate::base::rng::Rng;
use crate::data::Tokenizer;
use crate::generate::{argmax, distribution, draw, GenerateOptions, SamplingParams};
use crate::model::{ForwardRecord, Model, RoutingOptions, SeqCache, SeqLayout};
use crate::{Error, Result};
use candle_core::{DType, Tensor};
use serde::Serialize;
use std::borrow::Cow;
use std::collections::BTreeMap;

/// What speculation did: tokens drafted and accepted, and the passes of each model.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct SpecStats {
    pub drafted: usize,
    pub accepted: usize,
    pub verify_passes: usize,
    pub draft_passes: usize,
}

impl SpecStats {
    /// Share of drafted tokens the full model kept.
    pub fn acceptance(&self) -> f64 {
        self.accepted as f64 / self.drafted.max(1) as f64
    }

    pub fn add(&mut self, o: &SpecStats) {
        self.drafted += o.drafted;
        self.accepted += o.accepted;
        self.verify_passes += o.verify_passes;
        self.draft_passes += o.draft_passes;
    }
}

/// The routing of the draft: the same settings with every routed step off.
pub fn draft_routing(full: &RoutingOptions) -> RoutingOptions {
    RoutingOptions { steps: Some(1), ratios: None, early_exit: None, ..full.clone() }
}

/// Why speculation cannot run on `model` with `routing` and `use_cache`, if it cannot: the
/// draft is the model with one step per thinking layer, so there must be more than one.
pub fn unsupported(model: &Model, routing: &RoutingOptions, use_cache: bool) -> Option<&'static str> {
    if model.thinking_layers().next().is_none() {
        return Some("this model is dense (no thinking layers), so it has no cheaper draft of itself");
    }
    if routing.steps == Some(1) || model.thinking_layers().all(|t| t.steps <= 1) {
        return Some("with one thinking step the draft (routed steps off) is the model itself");
    }
    if !use_cache {
        return Some("it decodes with KV caches, so it needs causal (threshold) routing");
    }
    None
}

/// Run `ids` (continuing `cache`) through the model; logits of every row, (n, V).
fn pass(
    model: &Model,
    ids: &[u32],
    routing: &RoutingOptions,
    cache: &mut SeqCache,
    record: Option<&mut ForwardRecord>,
) -> Result<Vec<Vec<f32>>> {
    let layout = SeqLayout::with_past(&[ids.len()], &[cache.seen]);
    let x = Tensor::from_slice(ids, ids.len(), model.device())?;
    let hidden = model.forward_hidden(&x, &layout, routing, Some(std::slice::from_mut(cache)), record)?;
    Ok(model.logits(&hidden)?.to_dtype(DType::F32)?.to_vec2::<f32>()?)
}

/// Keep the first `keep` of the `fed` tokens the last pass appended to `cache`. A slot that took
/// every token keeps `keep` of them; a routed slot that took only its selected tokens keeps
/// those among the first `keep` (`selections`, packed rows of that pass, keyed (layer, step)
/// with step t stored in slot t - 1).
fn roll_back(
    cache: &mut SeqCache,
    before: &[Vec<usize>],
    fed: usize,
    keep: usize,
    selections: &BTreeMap<(usize, usize), Vec<u32>>,
) -> Result<()> {
    for (l, slots) in cache.slots.iter_mut().enumerate() {
        for (st, c) in slots.iter_mut().enumerate() {
            let b = before.get(l).and_then(|s| s.get(st)).copied().unwrap_or(0);
            let grown = c.len() - b;
            let kept = if grown == fed {
                keep
            } else if grown == 0 {
                0
            } else {
                match selections.get(&(l, st + 1)) {
                    Some(sel) if sel.len() == grown => sel.iter().filter(|&&r| (r as usize) < keep).count(),
                    _ => return Err(Error::usage(format!("cannot roll back the cache of layer {l} step {}", st + 1))),
                }
            };
            c.truncate(b + kept);
        }
    }
    cache.seen = cache.seen - fed + keep;
    Ok(())
}

/// Keep the first `keep` tokens of a cache whose used slots hold every token (the draft runs
/// no routed step; its routed slots stay empty).
fn roll_back_all(cache: &mut SeqCache, keep: usize) {
    for c in cache.slots.iter_mut().flatten() {
        c.truncate(keep);
    }
    cache.seen = keep;
}

/// The sequence a round continues and how its tokens are drawn.
pub struct Context<'a> {
    /// Prompt and generated tokens so far; the full model's cache holds all but the last.
    pub ids: &'a [u32],
    pub prompt_len: usize,
    pub routing: &'a RoutingOptions,
    pub sampling: &'a SamplingParams,
}

impl Context<'_> {
    /// One row of logits with the penalties and biases applied, given the tokens drafted
    /// before it (penalties count the generated tokens, which include them).
    fn adjusted<'r>(&self, row: &'r [f32], drafted: &[u32]) -> Cow<'r, [f32]> {
        if !self.sampling.adjusts() {
            return Cow::Borrowed(row);
        }
        let generated: Vec<u32> = self.ids[self.prompt_len..].iter().chain(drafted).copied().collect();
        let mut z = row.to_vec();
        self.sampling.adjust(&mut z, &self.ids[..self.prompt_len], &generated);
        Cow::Owned(z)
    }
}

/// A token a round produced: its id, the full model's raw logits row that chose it (for
/// log-probabilities) and the steps each thinking layer took at that row.
pub struct RoundToken {
    pub id: u32,
    pub logits: Vec<f32>,
    pub depth: Vec<u32>,
}

/// What one round produced: the accepted drafts and then the full model's own token, in order.
pub struct Round {
    pub tokens: Vec<RoundToken>,
    pub stats: SpecStats,
    /// (steps - 1) summed over the thinking layers and the kept rows of the verify pass.
    pub extra_block_steps: u64,
    /// The verify pass's record (routing statistics, rejected rows included).
    pub record: ForwardRecord,
}

/// The draft's side of one sequence's speculation: `k` and the draft model's own caches.
pub struct Speculator {
    pub k: usize,
    draft: SeqCache,
}

impl Speculator {
    /// `reserve`: tokens the draft caches take room for when first written.
    pub fn new(model: &Model, k: usize, reserve: usize) -> Self {
        Speculator { k, draft: model.new_cache_reserved(reserve) }
    }

    /// Draft `k` tokens after `ctx.ids`, verify them with one pass of the full model over the
    /// last token and the drafts (appending to `full`, which must hold every token but the
    /// last), and roll both caches back to the kept tokens. Afterwards `full` holds every token
    /// of `ctx.ids` and the accepted drafts; the full model's own last token is not fed.
    pub fn round(
        &mut self,
        model: &Model,
        ctx: &Context,
        full: &mut SeqCache,
        rng: &mut Rng,
        k: usize,
    ) -> Result<Round> {
        let ids = ctx.ids;
        if full.seen + 1 != ids.len() || self.draft.seen > ids.len() || k == 0 {
            return Err(Error::usage("speculate: the caches do not continue the sequence"));
        }
        let p = ctx.sampling;
        let greedy = p.temperature == 0.0;
        let vocab = model.cfg.vocab_size;
        let dense = |idx: &[usize], probs: &[f64]| {
            let mut d = vec![0.0; vocab];
            idx.iter().zip(probs).for_each(|(&i, &q)| d[i] = q);
            d
        };
        let draft_r = draft_routing(ctx.routing);
        let mut stats = SpecStats::default();
        let mut drafts: Vec<u32> = vec![];
        let mut qs: Vec<Vec<f64>> = vec![];
        for _ in 0..k {
            let fed = self.draft.seen;
            let tail: Vec<u32> = ids.iter().chain(&drafts).skip(fed).copied().collect();
            let logits = pass(model, &tail, &draft_r, &mut self.draft, None)?;
            stats.draft_passes += 1;
            let row = ctx.adjusted(logits.last().expect("one row per token"), &drafts);
            let d = if greedy {
                argmax(&row)
            } else {
                let (idx, probs) = distribution(&row, p);
                let d = draw(&idx, &probs, rng);
                qs.push(dense(&idx, &probs));
                d
            };
            drafts.push(d);
        }
        // One full pass over the last token and the drafts: row i predicts the token after
        // the i-th fed token.
        let before = full.lens();
        let fed: Vec<u32> = std::iter::once(*ids.last().expect("non-empty")).chain(drafts.iter().copied()).collect();
        let mut rec = ForwardRecord::with_detail();
        let mut rows = pass(model, &fed, ctx.routing, full, Some(&mut rec))?;
        stats.verify_passes += 1;
        stats.drafted = drafts.len();
        let mut accepted = 0;
        let mut next = None;
        for (i, &d) in drafts.iter().enumerate() {
            let row = ctx.adjusted(&rows[i], &drafts[..i]);
            if greedy {
                let t = argmax(&row);
                if t != d {
                    next = Some(t);
                    break;
                }
            } else {
                let (idx, probs) = distribution(&row, p);
                let pd = dense(&idx, &probs);
                let q = &qs[i];
                if rng.uniform() >= (pd[d as usize] / q[d as usize]).min(1.0) {
                    // Rejected: draw from the residual norm(max(0, p - q)).
                    let resid: Vec<f64> = pd.iter().zip(q).map(|(a, b)| (a - b).max(0.0)).collect();
                    let total: f64 = resid.iter().sum();
                    next = Some(if total > 0.0 {
                        let all: Vec<usize> = (0..vocab).collect();
                        let probs: Vec<f64> = resid.iter().map(|r| r / total).collect();
                        draw(&all, &probs, rng)
                    } else {
                        draw(&idx, &probs, rng)
                    });
                    break;
                }
            }
            accepted += 1;
        }
        let next = match next {
            Some(t) => t,
            None => {
                let row = ctx.adjusted(&rows[accepted], &drafts);
                if greedy {
                    argmax(&row)
                } else {
                    let (idx, probs) = distribution(&row, p);
                    draw(&idx, &probs, rng)
                }
            }
        };
        stats.accepted = accepted;
        // Keep the last token and the accepted drafts in the full cache; the draft cache keeps
        // what is still on the accepted path.
        roll_back(full, &before, fed.len(), accepted + 1, &rec.selections)?;
        let keep_draft = self.draft.seen.min(ids.len() + accepted);
        roll_back_all(&mut self.draft, keep_draft);
        let layers: Vec<usize> = model.thinking_layers().map(|t| t.layer).collect();
        let depth_at =
            |row: usize| -> Vec<u32> { layers.iter().map(|l| rec.depth.get(l).map(|d| d[row]).unwrap_or(1)).collect() };
        let extra_block_steps = (0..=accepted).flat_map(&depth_at).map(|d| d.saturating_sub(1) as u64).sum::<u64>();
        rows.truncate(accepted + 1);
        let tokens = drafts[..accepted]
            .iter()
            .chain(std::iter::once(&next))
            .zip(rows)
            .enumerate()
            .map(|(i, (&id, logits))| RoundToken { id, logits, depth: depth_at(i) })
            .collect();
        Ok(Round { tokens, stats, extra_block_steps, record: rec })
    }
}

/// Generate a continuation of `prompt` speculatively with `k` drafted tokens per verify pass,
/// through `generate::Batch` (every option of `opts` applies). Returns the generated ids
/// (without the end-of-text token) and what speculation did.
pub fn generate(
    model: &Model,
    tok: &Tokenizer,
    prompt: &[u32],
    opts: &GenerateOptions,
    k: usize,
) -> Result<(Vec<u32>, SpecStats)> {
    if k == 0 {
        return Err(Error::usage("--speculate needs k >= 1 drafted tokens"));
    }
    let mut batch = crate::generate::Batch::new(model, tok)?;
    let id = batch.add(prompt.to_vec(), GenerateOptions { speculate: k, ..opts.clone() })?;
    while batch.running() > 0 {
        batch.step()?;
    }
    let out = batch.generated_ids(id).unwrap_or_default().to_vec();
    Ok((out, batch.spec.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generate::SamplingParams;
    use crate::model::Routing;

    fn setup() -> (Model, Tokenizer, RoutingOptions) {
        let (model, tok, cal) = crate::generate::generation_tests::setup();
        (model, tok, RoutingOptions { mode: Routing::Threshold, calibration: Some(cal), ..Default::default() })
    }

    #[test]
    fn greedy_speculation_gives_the_full_models_tokens() {
        let (model, tok, routing) = setup();
        let opts = GenerateOptions {
            max_new_tokens: 16,
            sampling: SamplingParams::greedy(),
            routing,
            ignore_eot: true,
            ..Default::default()
        };
        let mut stats = SpecStats::default();
        for i in 0..20 {
            let prompt = format!("{}+{}=", i * 7 % 13, i * 3 + 1);
            let want = crate::generate::generate(&model, &tok, std::slice::from_ref(&prompt), opts.clone())
                .unwrap()
                .collect_all()
                .unwrap()
                .remove(0)
                .2;
            let k = 1 + i % 4;
            let (got, s) = generate(&model, &tok, &tok.encode(&prompt).unwrap(), &opts, k).unwrap();
            assert_eq!(got, want, "prompt {prompt:?} k {k}");
            stats.drafted += s.drafted;
            stats.accepted += s.accepted;
        }
        // The draft disagrees sometimes (else the rollback went untested) and agrees sometimes.
        assert!(stats.accepted > 0 && stats.accepted < stats.drafted, "{stats:?}");
    }

    /// Chi-square statistic of `counts` against probabilities `p` over `n` draws, bins with
    /// an expected count under 5 merged; and its degrees of freedom.
    fn chi_square(counts: &[usize], p: &[f64], n: usize) -> (f64, usize) {
        let (mut stat, mut df, mut rest_o, mut rest_e) = (0.0, 0, 0.0, 0.0);
        for (&c, &q) in counts.iter().zip(p) {
            let e = q * n as f64;
            if e < 5.0 {
                rest_o += c as f64;
                rest_e += e;
            } else {
                stat += (c as f64 - e).powi(2) / e;
                df += 1;
            }
        }
        if rest_e > 0.0 {
            stat += (rest_o - rest_e).powi(2) / rest_e.max(1e-9);
            df += 1;
        }
        (stat, df - 1)
    }

    #[test]
    fn sampled_speculation_keeps_the_full_models_distribution() {
        let (model, tok, routing) = setup();
        let sampling = SamplingParams { temperature: 1.0, ..Default::default() };
        // The first token comes from the plain sampler, the second from a round (k_now = 1).
        let opts = GenerateOptions {
            max_new_tokens: 3,
            sampling: sampling.clone(),
            routing: routing.clone(),
            ignore_eot: true,
            ..Default::default()
        };
        let prompt = tok.encode("12+3").unwrap();
        let v = model.cfg.vocab_size;
        // Exact first-token probabilities p1 and second-token marginal sum_x p1(x) p2(. | x).
        let probs = |ids: &[u32]| -> Vec<f64> {
            let mut c = model.new_cache();
            let rows = pass(&model, ids, &routing, &mut c, None).unwrap();
            let (idx, pr) = distribution(rows.last().unwrap(), &sampling);
            let mut d = vec![0.0; v];
            idx.iter().zip(&pr).for_each(|(&i, &q)| d[i] = q);
            d
        };
        let p1 = probs(&prompt);
        let mut p2 = vec![0.0; v];
        for (x, &px) in p1.iter().enumerate() {
            let mut ids = prompt.clone();
            ids.push(x as u32);
            for (y, q) in probs(&ids).into_iter().enumerate() {
                p2[y] += px * q;
            }
        }
        let n = 1500;
        let (mut c1, mut c2) = (vec![0; v], vec![0; v]);
        for seed in 0..n {
            let o =
                GenerateOptions { sampling: SamplingParams { seed: seed as u64, ..sampling.clone() }, ..opts.clone() };
            let (got, _) = generate(&model, &tok, &prompt, &o, 2).unwrap();
            c1[got[0] as usize] += 1;
            c2[got[1] as usize] += 1;
        }
        for (name, c, p) in [("first", &c1, &p1), ("second", &c2, &p2)] {
            let (stat, df) = chi_square(c, p, n);
            // The 0.999 quantile of chi-square(df) (Wilson-Hilferty): seeds are fixed, so this
            // either always passes or always fails.
            let d = df as f64;
            let crit = d * (1.0 - 2.0 / (9.0 * d) + 3.09 * (2.0 / (9.0 * d)).sqrt()).powi(3);
            println!("{name} token: chi-square {stat:.1} on {df} df (0.999 quantile {crit:.1})");
            assert!(stat < crit, "{name} token: chi-square {stat:.1} >= {crit:.1} on {df} df");
        }
    }
}
