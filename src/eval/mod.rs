//! Evaluation: loss, perplexity and bits per byte on token shards or any text, and the
//! paper's benchmarks by log-likelihood (`tasks`).

pub mod reasoning;
pub mod tasks;

use crate::data::{self, TokenShard, Tokenizer};
use crate::model::{Model, RoutingOptions, SeqLayout};
use crate::{ops, Error, Result};
use candle_core::Tensor;
use serde::Serialize;

/// Mean next-token loss over up to `max_batches` sequential batches of the shard (0 = all).
pub fn shard_loss(
    model: &Model,
    shard: &TokenShard,
    batch: usize,
    seq_len: usize,
    max_batches: usize,
    routing: &RoutingOptions,
) -> Result<f64> {
    shard_loss_recorded(model, shard, batch, seq_len, max_batches, routing, &mut crate::model::ForwardRecord::default())
}

/// `shard_loss`, also counting the tokens routed at each (layer, step) into `record`.
pub fn shard_loss_recorded(
    model: &Model,
    shard: &TokenShard,
    batch: usize,
    seq_len: usize,
    max_batches: usize,
    routing: &RoutingOptions,
    record: &mut crate::model::ForwardRecord,
) -> Result<f64> {
    let sums = batch_nll_sums(model, shard, (batch, seq_len, max_batches), routing, Some(record), |_| true)?;
    mean_nll(shard, seq_len, &sums)
}

/// `shard_loss` with the batches dealt round-robin over the ranks of `group` (batch i on rank
/// i mod P); the per-batch sums are gathered and added in batch order, so every rank gets the
/// single process's value, bit for bit (DESIGN §14).
pub fn shard_loss_in(
    model: &Model,
    shard: &TokenShard,
    batch: usize,
    seq_len: usize,
    max_batches: usize,
    routing: &RoutingOptions,
    group: &crate::base::dist::Group,
) -> Result<f64> {
    if !group.is_distributed() {
        return shard_loss(model, shard, batch, seq_len, max_batches, routing);
    }
    let (rank, ranks) = (group.rank(), group.size());
    let mine = batch_nll_sums(model, shard, (batch, seq_len, max_batches), routing, None, |i| i % ranks == rank)?;
    let bytes: Vec<u8> =
        mine.iter().flat_map(|&(i, sum, n)| [i as f64, sum, n as f64]).flat_map(f64::to_le_bytes).collect();
    let mut all = vec![];
    for theirs in group.all_gather_bytes(&bytes)? {
        for c in theirs.chunks_exact(24) {
            let f = |k: usize| f64::from_le_bytes(c[8 * k..8 * k + 8].try_into().expect("8 bytes"));
            all.push((f(0) as usize, f(1), f(2) as usize));
        }
    }
    all.sort_by_key(|b| b.0);
    mean_nll(shard, seq_len, &all)
}

/// (batch index, sum of token losses, tokens) of the sequential batches `keep` accepts, up to
/// `max_batches` (0 = all), in batches of `batch` rows of `seq_len` tokens.
fn batch_nll_sums(
    model: &Model,
    shard: &TokenShard,
    (batch, seq_len, max_batches): (usize, usize, usize),
    routing: &RoutingOptions,
    mut record: Option<&mut crate::model::ForwardRecord>,
    keep: impl Fn(usize) -> bool,
) -> Result<Vec<(usize, f64, usize)>> {
    let mut out = vec![];
    for (i, (inp, tgt)) in data::sequential_batches(shard, batch, seq_len).enumerate() {
        if max_batches > 0 && i >= max_batches {
            break;
        }
        if !keep(i) {
            continue;
        }
        let rows = inp.len() / seq_len;
        let x = Tensor::from_slice(&inp, inp.len(), model.device())?;
        let logits = model.forward(&x, &SeqLayout::uniform(rows, seq_len), routing, None, record.as_deref_mut())?;
        let nll = ops::token_nll(&logits, &tgt)?;
        out.push((i, nll.iter().sum::<f64>(), nll.len()));
    }
    Ok(out)
}

/// The mean token loss of per-batch sums, added in the order given.
fn mean_nll(shard: &TokenShard, seq_len: usize, sums: &[(usize, f64, usize)]) -> Result<f64> {
    let (mut total, mut count) = (0.0, 0usize);
    for &(_, sum, n) in sums {
        total += sum;
        count += n;
    }
    if count == 0 {
        return Err(Error::input(
            shard.path(),
            format!("too few tokens ({}) for one sequence of {seq_len}", shard.len()),
        ));
    }
    Ok(total / count as f64)
}

/// Loss, perplexity and bits per byte of a text.
#[derive(Clone, Debug, Serialize)]
pub struct TextEval {
    pub tokens: usize,
    pub bytes: usize,
    /// Mean negative log-likelihood per token, nats.
    pub loss: f64,
    pub perplexity: f64,
    /// Total negative log-likelihood in bits divided by the UTF-8 bytes of the text.
    pub bits_per_byte: f64,
}

/// Score every token of `text`: the text is preceded by the end-of-document token (as in
/// training, where documents follow one) and cut into windows of `seq_len` predicted tokens,
/// each window seeing only itself; so every token is predicted exactly once, and bits per
/// byte is exact: sum of NLL / ln 2 / bytes.
pub fn eval_text(
    model: &Model,
    tok: &Tokenizer,
    text: &str,
    seq_len: usize,
    batch: usize,
    routing: &RoutingOptions,
) -> Result<TextEval> {
    if text.trim().is_empty() {
        return Err(Error::usage("the text to evaluate is empty"));
    }
    let seq_len = seq_len.min(model.cfg.max_seq_len);
    let mut ids = vec![tok.eot_id()];
    ids.extend(tok.encode(text)?);
    let n_pred = ids.len() - 1;
    // Windows: inputs ids[s..s+L], targets ids[s+1..s+L+1]; the last window may be shorter.
    let mut windows: Vec<(usize, usize)> = vec![];
    let mut s = 0;
    while s < n_pred {
        let len = seq_len.min(n_pred - s);
        windows.push((s, len));
        s += len;
    }
    let mut total = 0.0;
    for group in windows.chunks(batch.max(1)) {
        let mut inp = vec![];
        let mut tgt = vec![];
        let mut lens = vec![];
        for &(s, len) in group {
            inp.extend_from_slice(&ids[s..s + len]);
            tgt.extend_from_slice(&ids[s + 1..s + len + 1]);
            lens.push(len);
        }
        let x = Tensor::from_slice(&inp, inp.len(), model.device())?;
        let layout = SeqLayout::with_past(&lens, &vec![0; lens.len()]);
        let logits = model.forward(&x, &layout, routing, None, None)?;
        total += ops::token_nll(&logits, &tgt)?.iter().sum::<f64>();
    }
    let loss = total / n_pred as f64;
    Ok(TextEval {
        tokens: n_pred,
        bytes: text.len(),
        loss,
        perplexity: loss.exp(),
        bits_per_byte: total / std::f64::consts::LN_2 / text.len() as f64,
    })
}

/// Router thresholds for causal routing measured on text (for checkpoints trained without
/// them): top-k forward passes over up to `batches` windows of `seq_len`, all router logits
/// pooled, quantiles taken once.
pub fn calibrate(
    model: &Model,
    tok: &Tokenizer,
    docs: &[String],
    seq_len: usize,
    batches: usize,
) -> Result<crate::model::RouterCalibration> {
    use crate::model::{ForwardRecord, RouterCalibration};
    if !model.has_routers() {
        return Err(Error::usage("this model has no routers (it is not an ITT model with adaptive routing)"));
    }
    let mut ids = vec![];
    for d in docs {
        ids.push(tok.eot_id());
        ids.extend(tok.encode(d)?);
        if ids.len() > (batches.max(1) * 8 + 1) * seq_len {
            break;
        }
    }
    let rows = (ids.len().saturating_sub(1)) / seq_len;
    if rows == 0 {
        return Err(Error::usage(format!(
            "the calibration text has {} tokens, fewer than one window of {seq_len}",
            ids.len()
        )));
    }
    let mut rec = ForwardRecord::with_scores();
    for chunk in (0..rows).collect::<Vec<_>>().chunks(8).take(batches.max(1)) {
        let inp: Vec<u32> = chunk.iter().flat_map(|&r| ids[r * seq_len..(r + 1) * seq_len].to_vec()).collect();
        let x = Tensor::from_slice(&inp, inp.len(), model.device())?;
        model.forward(
            &x,
            &SeqLayout::uniform(chunk.len(), seq_len),
            &RoutingOptions::default(),
            None,
            Some(&mut rec),
        )?;
    }
    let mut cal = RouterCalibration::new();
    cal.update(&mut rec, 0.0);
    Ok(cal)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::base::config::TestModel;
    use candle_core::Device;

    #[test]
    fn perplexity_is_exp_of_the_mean_token_loss_and_bpb_counts_bytes() {
        let text = "12+34=46\nsort 3 1 2 = 1 2 3\nrev abc = cba\n";
        let tok = Tokenizer::char_from_text(text);
        let cfg = TestModel::preset("tiny-itt2").vocab(tok.vocab_size()).width(16, 24).heads(2, 2).context(64).config();
        let model = Model::new(&cfg, 2, &Device::Cpu).unwrap();
        // Independent: one forward over [eot] + text, hand-written log-softmax, mean.
        let mut ids = vec![tok.eot_id()];
        ids.extend(tok.encode(text).unwrap());
        let x = Tensor::from_slice(&ids[..ids.len() - 1], ids.len() - 1, &Device::Cpu).unwrap();
        let logits: Vec<Vec<f32>> = model
            .forward(&x, &SeqLayout::uniform(1, ids.len() - 1), &RoutingOptions::default(), None, None)
            .unwrap()
            .to_vec2()
            .unwrap();
        let mut total = 0.0;
        for (i, row) in logits.iter().enumerate() {
            let m = row.iter().cloned().fold(f32::MIN, f32::max) as f64;
            let z: f64 = row.iter().map(|&v| (v as f64 - m).exp()).sum();
            total += m + z.ln() - row[ids[i + 1] as usize] as f64;
        }
        let mean = total / (ids.len() - 1) as f64;
        let r = eval_text(&model, &tok, text, 64, 4, &RoutingOptions::default()).unwrap();
        assert_eq!(r.tokens, ids.len() - 1);
        assert!((r.loss - mean).abs() < 1e-5, "{} vs {mean}", r.loss);
        assert!((r.perplexity - mean.exp()).abs() < 1e-4 * mean.exp());
        assert!((r.bits_per_byte - total / std::f64::consts::LN_2 / text.len() as f64).abs() < 1e-5);
        // Windows shorter than the text: every token is still predicted exactly once.
        let short = eval_text(&model, &tok, text, 8, 2, &RoutingOptions::default()).unwrap();
        assert_eq!(short.tokens, r.tokens);
        assert!(eval_text(&model, &tok, "  ", 8, 2, &RoutingOptions::default()).is_err());
    }
}
