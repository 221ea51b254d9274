//! Where the thinking steps help and where they hurt (docs/EXPERIMENTS.md, "Adaptive depth on
//! natural text"): the per-token loss of a model minus a baseline's on the same tokens, by
//! token class.
//!
//! Both models score the same sequential validation windows (`data::sequential_batches`), so
//! position i of one trace and of the other predict the same target from the same context. A
//! position's classes:
//! - `frequency`: the target token's place in the training set's frequency order: `head` the
//!   most frequent tokens that together make half of the training tokens, `body` the next 40%,
//!   `tail` the last 10% (vocabulary-agnostic: the same rule for characters and BPE pieces);
//! - `word`: whether the target starts a word (its text, a leading space stripped, starts with
//!   a letter or digit and the input token does not end with one, or the target carries the
//!   word's leading space), continues one (letter or digit after letter or digit), or is
//!   whitespace / punctuation;
//! - `L{layer} step {t}`: whether the model routed the *input* position i through that step
//!   (the step's state update is what predicts target i);
//! - `extra steps`: how many routed steps position i took in all thinking layers together.
//!
//! The difference per class is reported with the class's share of tokens and its contribution
//! (share x difference) to the whole difference, so the rows of one group add up to it.

use crate::data::{self, TokenShard, Tokenizer};
use crate::model::{ForwardRecord, Model, RoutingOptions, SeqLayout};
use crate::{ops, Result};
use candle_core::Tensor;
use serde::Serialize;
use std::collections::BTreeMap;

/// One model's per-position losses and routing over a shard's sequential windows.
#[derive(Clone, Debug, Default)]
pub struct TokenTrace {
    pub input: Vec<u32>,
    pub target: Vec<u32>,
    /// Negative log-likelihood of each target, nats.
    pub nll: Vec<f32>,
    /// Per routed (layer, step): whether each position took it.
    pub took: BTreeMap<(usize, usize), Vec<bool>>,
}

/// Score up to `max_batches` (0 = all) sequential batches of `shard`, keeping every position's
/// loss and routing decisions.
pub fn trace(
    model: &Model,
    shard: &TokenShard,
    batch: usize,
    seq_len: usize,
    max_batches: usize,
    routing: &RoutingOptions,
) -> Result<TokenTrace> {
    let mut out = TokenTrace::default();
    for (i, (inp, tgt)) in data::sequential_batches(shard, batch, seq_len).enumerate() {
        if max_batches > 0 && i >= max_batches {
            break;
        }
        let rows = inp.len() / seq_len;
        let x = Tensor::from_slice(&inp, inp.len(), model.device())?;
        let mut rec = ForwardRecord::with_detail();
        let logits = model.forward(&x, &SeqLayout::uniform(rows, seq_len), routing, None, Some(&mut rec))?;
        let base = out.input.len();
        for (&key, sel) in &rec.selections {
            let took = out.took.entry(key).or_insert_with(|| vec![false; base]);
            took.resize(base + inp.len(), false);
            for &j in sel {
                took[base + j as usize] = true;
            }
        }
        // A step no token took in this batch still needs its positions marked as passed over.
        for took in out.took.values_mut() {
            took.resize(base + inp.len(), false);
        }
        out.nll.extend(ops::token_nll(&logits, &tgt)?.into_iter().map(|v| v as f32));
        out.input.extend_from_slice(&inp);
        out.target.extend_from_slice(&tgt);
    }
    Ok(out)
}

/// What a position is, for every grouping of `compare`.
pub struct Classifier {
    /// Frequency bucket of each token id.
    bucket: Vec<&'static str>,
    /// Whether a token's text starts with a letter or digit, after a leading space.
    starts_alnum: Vec<bool>,
    /// Whether it starts with a space followed by a letter or digit (a BPE word start).
    spaced_word: Vec<bool>,
    /// Whether its text ends with a letter or digit.
    ends_alnum: Vec<bool>,
}

impl Classifier {
    /// Buckets from the token counts of the training shard.
    pub fn new(tok: &Tokenizer, train: &TokenShard) -> Classifier {
        let v = tok.vocab_size();
        let mut counts = vec![0u64; v];
        for i in 0..train.len() {
            if let Some(c) = counts.get_mut(train.get(i) as usize) {
                *c += 1;
            }
        }
        Classifier::from_counts(tok, &counts)
    }

    pub fn from_counts(tok: &Tokenizer, counts: &[u64]) -> Classifier {
        let v = tok.vocab_size();
        let total: u64 = counts.iter().sum::<u64>().max(1);
        let mut order: Vec<usize> = (0..v).collect();
        // Most frequent first; ties by id so the buckets are deterministic.
        order.sort_by(|&a, &b| counts.get(b).cmp(&counts.get(a)).then(a.cmp(&b)));
        let mut bucket = vec!["tail"; v];
        let mut before = 0u64;
        for &id in &order {
            let share = before as f64 / total as f64;
            bucket[id] = if share < 0.5 {
                "head"
            } else if share < 0.9 {
                "body"
            } else {
                "tail"
            };
            before += counts.get(id).copied().unwrap_or(0);
        }
        let text: Vec<String> = (0..v as u32).map(|id| tok.token_text(id)).collect();
        let alnum = |c: Option<char>| c.is_some_and(char::is_alphanumeric);
        Classifier {
            bucket,
            starts_alnum: text.iter().map(|t| alnum(t.trim_start_matches(' ').chars().next())).collect(),
            spaced_word: text.iter().map(|t| t.starts_with(' ') && alnum(t.chars().nth(1))).collect(),
            ends_alnum: text.iter().map(|t| alnum(t.chars().last())).collect(),
        }
    }

    fn frequency(&self, target: u32) -> &'static str {
        self.bucket.get(target as usize).copied().unwrap_or("tail")
    }

    fn word(&self, input: u32, target: u32) -> &'static str {
        let (i, t) = (input as usize, target as usize);
        let get = |v: &[bool], k: usize| v.get(k).copied().unwrap_or(false);
        if !get(&self.starts_alnum, t) {
            "whitespace / punctuation"
        } else if get(&self.spaced_word, t) || !get(&self.ends_alnum, i) {
            "word start"
        } else {
            "inside a word"
        }
    }
}

/// One class of positions: the two models' mean losses on it.
#[derive(Clone, Debug, Serialize)]
pub struct ClassRow {
    /// The grouping, e.g. `frequency`, `word`, `L1 step 2`, `extra steps`.
    pub group: String,
    pub class: String,
    pub tokens: usize,
    /// Share of all scored positions.
    pub share: f64,
    pub base_loss: f64,
    pub loss: f64,
    /// loss - base_loss (negative: the model is better on these tokens).
    pub diff: f64,
    /// share x diff: this class's part of the whole difference.
    pub contribution: f64,
}

/// The per-class losses of `model` against `base` over the same positions. Routing classes
/// come from `model`'s trace.
pub fn compare(base: &TokenTrace, model: &TokenTrace, classes: &Classifier) -> Vec<ClassRow> {
    let n = base.nll.len().min(model.nll.len());
    let mut groups: Vec<(String, Vec<String>)> = vec![
        ("all".into(), vec!["all".into(); n]),
        ("frequency".into(), (0..n).map(|i| classes.frequency(model.target[i]).to_string()).collect()),
        ("word".into(), (0..n).map(|i| classes.word(model.input[i], model.target[i]).to_string()).collect()),
    ];
    for (&(layer, step), took) in &model.took {
        let names = (0..n).map(|i| if took[i] { "took it" } else { "passed over" }.to_string()).collect();
        groups.push((format!("L{layer} step {step}"), names));
    }
    if !model.took.is_empty() {
        let extra = (0..n).map(|i| model.took.values().filter(|t| t[i]).count().to_string()).collect();
        groups.push(("extra steps".into(), extra));
    }
    let mut rows = vec![];
    for (group, names) in groups {
        let mut acc: BTreeMap<&str, (usize, f64, f64)> = BTreeMap::new();
        for i in 0..n {
            let e = acc.entry(names[i].as_str()).or_default();
            e.0 += 1;
            e.1 += base.nll[i] as f64;
            e.2 += model.nll[i] as f64;
        }
        for (class, (count, b, m)) in acc {
            let share = count as f64 / n.max(1) as f64;
            let (bl, ml) = (b / count as f64, m / count as f64);
            rows.push(ClassRow {
                group: group.clone(),
                class: class.to_string(),
                tokens: count,
                share,
                base_loss: bl,
                loss: ml,
                diff: ml - bl,
                contribution: share * (ml - bl),
            });
        }
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_split_the_whole_difference() {
        let tok = Tokenizer::char_from_text("ab c.");
        // Ids: 0 eot, 1 unk, then the text's characters in sorted order: ' ', '.', 'a', 'b', 'c'.
        let id = |c: char| tok.encode(&c.to_string()).unwrap()[0];
        let mut counts = vec![0u64; tok.vocab_size()];
        counts[id(' ') as usize] = 60;
        counts[id('a') as usize] = 30;
        counts[id('b') as usize] = 10;
        let classes = Classifier::from_counts(&tok, &counts);
        assert_eq!(classes.frequency(id(' ')), "head");
        assert_eq!(classes.frequency(id('a')), "body");
        assert_eq!(classes.frequency(id('b')), "tail");
        assert_eq!(classes.word(id(' '), id('a')), "word start");
        assert_eq!(classes.word(id('a'), id('b')), "inside a word");
        assert_eq!(classes.word(id('b'), id('.')), "whitespace / punctuation");

        // Positions: " a", "ab", "b ", " c"; the model gains 0.4 on the word starts only.
        let input = vec![id(' '), id('a'), id('b'), id(' ')];
        let target = vec![id('a'), id('b'), id(' '), id('c')];
        let base = TokenTrace {
            input: input.clone(),
            target: target.clone(),
            nll: vec![2.0, 1.0, 0.5, 3.0],
            ..Default::default()
        };
        let mut took = BTreeMap::new();
        took.insert((1, 2), vec![true, false, false, true]);
        let model = TokenTrace { input, target, nll: vec![1.6, 1.0, 0.5, 2.6], took };
        let rows = compare(&base, &model, &classes);
        let whole = rows.iter().find(|r| r.group == "all").unwrap().diff;
        assert!((whole + 0.2).abs() < 1e-6);
        for group in ["frequency", "word", "L1 step 2", "extra steps"] {
            let sum: f64 = rows.iter().filter(|r| r.group == group).map(|r| r.contribution).sum();
            assert!((sum - whole).abs() < 1e-6, "{group}: {sum} vs {whole}");
        }
        let start = rows.iter().find(|r| r.group == "word" && r.class == "word start").unwrap();
        assert_eq!(start.tokens, 2);
        assert!((start.diff + 0.4).abs() < 1e-6);
        let took = rows.iter().find(|r| r.group == "L1 step 2" && r.class == "took it").unwrap();
        assert!((took.diff + 0.4).abs() < 1e-6);
        let passed = rows.iter().find(|r| r.group == "L1 step 2" && r.class == "passed over").unwrap();
        assert!(passed.diff.abs() < 1e-6);
    }
}
