//! Exact-match accuracy on held-out problems of the built-in corpus (addition and subtraction
//! with carries, bracket closing, sorting, reversal, counting): the paper's claim is that the
//! extra thinking steps help the tokens that need reasoning, so every comparison on the
//! built-in data reports how many held-out problems each model solves (docs/DESIGN.md §8).
//!
//! A problem is a line of a validation document cut before its answer, with the two lines
//! before it as context (as the model saw lines in training); the model answers greedily,
//! with KV caches, and, for ITT, causal threshold routing, so the answer is what `itt
//! generate` would print. The answer counts when it equals the true one exactly.

use crate::data::{synthetic, Tokenizer};
use crate::generate::{self, GenerateOptions, SamplingParams};
use crate::model::{Model, RoutingOptions};
use crate::Result;
use serde::Serialize;
use std::collections::BTreeMap;

/// One held-out problem.
#[derive(Clone, Debug)]
pub struct Problem {
    /// Two context lines and the problem line up to its answer.
    pub prompt: String,
    pub answer: String,
    /// `add`, `sub`, `close`, `sort`, `rev` or `count`.
    pub kind: &'static str,
}

/// Up to `per_kind` problems of each kind from the last `n_docs` documents of the built-in
/// corpus, which are in the validation split of `--data builtin` (the last 5% of 1000
/// documents) whenever `n_docs` <= 50.
pub fn held_out_problems(n_docs: usize, per_kind: usize) -> Vec<Problem> {
    let docs = synthetic::synthetic_corpus(&synthetic::SyntheticOptions::default());
    let mut by_kind: BTreeMap<&'static str, usize> = BTreeMap::new();
    let mut out = vec![];
    for doc in docs.iter().rev().take(n_docs) {
        let lines: Vec<&str> = doc.lines().collect();
        for (i, line) in lines.iter().enumerate().skip(2) {
            let Some(span) = synthetic::answer_spans(line) else { continue };
            let kind = synthetic::line_kind(line).name();
            let c = by_kind.entry(kind).or_default();
            if *c >= per_kind {
                continue;
            }
            *c += 1;
            let prompt = format!("{}\n{}\n{}", lines[i - 2], lines[i - 1], &line[..span.start]);
            out.push(Problem { prompt, answer: line[span].to_string(), kind });
        }
    }
    out
}

/// The default problem set of comparisons and the demo: 40 of each kind.
pub fn default_problems() -> Vec<Problem> {
    held_out_problems(50, 40)
}

/// Problems solved per kind.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SolveRates {
    /// kind -> (solved, asked).
    pub by_kind: BTreeMap<String, (usize, usize)>,
}

impl SolveRates {
    pub fn solved(&self) -> usize {
        self.by_kind.values().map(|v| v.0).sum()
    }
    pub fn asked(&self) -> usize {
        self.by_kind.values().map(|v| v.1).sum()
    }
    /// Share of all problems solved.
    pub fn accuracy(&self) -> f64 {
        self.solved() as f64 / self.asked().max(1) as f64
    }
    /// `add 12/40, close 40/40, ...`
    pub fn line(&self) -> String {
        let parts: Vec<String> = self.by_kind.iter().map(|(k, (c, n))| format!("{k} {c}/{n}")).collect();
        parts.join(", ")
    }
}

/// Answer every problem greedily with KV caches under `routing` and count exact matches.
pub fn solve_rates(
    model: &Model,
    tok: &Tokenizer,
    problems: &[Problem],
    routing: &RoutingOptions,
) -> Result<SolveRates> {
    let prompts: Vec<String> = problems.iter().map(|p| p.prompt.clone()).collect();
    let opts = GenerateOptions {
        max_new_tokens: 24,
        stop: vec!["\n".into()],
        stop_ids: vec![],
        ignore_eot: false,
        sampling: SamplingParams::greedy(),
        routing: routing.clone(),
        use_cache: true,
        prefill_chunk: 0,
        ..Default::default()
    };
    let answers = generate::generate(model, tok, &prompts, opts)?.collect_all()?;
    let mut rates = SolveRates::default();
    for (p, (got, _, _)) in problems.iter().zip(&answers) {
        let e = rates.by_kind.entry(p.kind.to_string()).or_default();
        e.1 += 1;
        if got.trim() == p.answer.trim() {
            e.0 += 1;
        }
    }
    Ok(rates)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problems_cover_every_kind_and_their_answers_are_right() {
        let ps = held_out_problems(50, 5);
        let kinds: std::collections::BTreeSet<_> = ps.iter().map(|p| p.kind).collect();
        assert_eq!(kinds.len(), 6, "{kinds:?}");
        for p in &ps {
            assert!(p.prompt.matches('\n').count() == 2 && !p.answer.is_empty());
            // Where the corpus has a solver for the line, it gives the held-out answer.
            let line = p.prompt.rsplit('\n').next().unwrap();
            if let Some(want) = synthetic::solve(line.trim_end_matches('=')) {
                assert_eq!(want, p.answer.trim(), "{line}");
            }
        }
    }
}
