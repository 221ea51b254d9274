//! The composed ops: built from candle primitives whose gradients candle gets right
//! (docs/DESIGN.md §11). They are the oracles of the fused kernels (`ops::tests`) and what
//! `ops::*` runs for other dtypes or devices, or when `ITT_COMPOSED_OPS` asks for them.

use super::{causal_mask, repeat_kv};
use crate::Result;
use candle_core::{Tensor, D};

/// RMSNorm over the last dimension: `x / sqrt(mean(x^2) + eps) * gain`.
/// x: (N, D), gain: (D,) -> (N, D).
pub fn rms_norm(x: &Tensor, gain: &Tensor, eps: f64) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?; // (N, 1)
    let inv = (ms + eps)?.sqrt()?.recip()?;
    Ok(x.broadcast_mul(&inv)?.broadcast_mul(gain)?)
}

/// Rotary embeddings, rotate-half pairs (i, i + hd/2). x: (N, H, hd); cos, sin: (N, hd/2),
/// already gathered at each token's own position.
pub fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (n, _h, hd) = x.dims3()?;
    let half = hd / 2;
    let cos = cos.reshape((n, 1, half))?;
    let sin = sin.reshape((n, 1, half))?;
    let x1 = x.narrow(2, 0, half)?;
    let x2 = x.narrow(2, half, half)?;
    let r1 = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
    let r2 = (x2.broadcast_mul(&cos)? + x1.broadcast_mul(&sin)?)?;
    Ok(Tensor::cat(&[r1, r2], 2)?)
}

/// SwiGLU gate: silu(gate) * up, elementwise.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    Ok((gate.silu()? * up)?)
}

/// Softmax over the last dimension, composed (max-subtracted for stability).
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?;
    let e = x.broadcast_sub(&max)?.exp()?;
    let s = e.sum_keepdim(D::Minus1)?;
    Ok(e.broadcast_div(&s)?)
}

/// Scaled dot-product attention with a causal mask.
/// q: (B, H, Lq, hd); k, v: (B, Hkv, Lk, hd) with Lk = past + Lq -> (B, H, Lq, hd).
pub fn causal_sdpa(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let (_b, h, lq, hd) = q.dims4()?;
    let (_, hkv, lk, _) = k.dims4()?;
    let k = repeat_kv(k, h / hkv)?;
    let v = repeat_kv(v, h / hkv)?;
    let scale = 1.0 / (hd as f64).sqrt();
    let scores = (q.matmul(&k.t()?)? * scale)?; // (B, H, Lq, Lk)
    let mask = causal_mask(lq, lk - lq, q.device())?.to_dtype(q.dtype())?;
    let p = softmax_last(&scores.broadcast_add(&mask)?)?;
    Ok(p.matmul(&v.contiguous()?)?)
}

/// Causal attention over packed sequences: sequence s has `lens_q[s]` queries that are the last
/// of its `lens_k[s]` keys. q: (sum lens_q, H, hd); k, v: (sum lens_k, Hkv, hd) -> like q.
/// Equal lengths run as one batched product, others one sequence at a time.
pub fn causal_attention_varlen(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    lens_q: &[usize],
    lens_k: &[usize],
) -> Result<Tensor> {
    let (nq, h, hd) = q.dims3()?;
    let hkv = k.dim(1)?;
    let t = lens_q.first().copied().unwrap_or(0);
    if lens_q == lens_k && lens_q.iter().all(|&n| n == t) && t > 0 {
        let b = lens_q.len();
        let to_bhtd =
            |z: &Tensor, heads| -> Result<Tensor> { Ok(z.reshape((b, t, heads, hd))?.transpose(1, 2)?.contiguous()?) };
        let o = causal_sdpa(&to_bhtd(q, h)?, &to_bhtd(k, hkv)?, &to_bhtd(v, hkv)?)?; // (B, H, T, hd)
        return Ok(o.transpose(1, 2)?.reshape((nq, h, hd))?);
    }
    per_sequence(q, k, v, lens_q, lens_k, |qs, ks, vs, _| causal_sdpa(qs, ks, vs))
}

/// Packed attention one sequence at a time: `attend(q, k, v, sq)` gets sequence s's queries
/// (1, H, lq, hd), keys and values (1, Hkv, lk, hd) and its first packed query row sq, and
/// returns (1, H, lq, hd); the results are packed again -> (sum lens_q, H, hd).
fn per_sequence(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    lens_q: &[usize],
    lens_k: &[usize],
    mut attend: impl FnMut(&Tensor, &Tensor, &Tensor, usize) -> Result<Tensor>,
) -> Result<Tensor> {
    let (nq, h, hd) = q.dims3()?;
    let hkv = k.dim(1)?;
    let part = |z: &Tensor, start, len, heads| -> Result<Tensor> {
        Ok(z.narrow(0, start, len)?.reshape((1, len, heads, hd))?.transpose(1, 2)?.contiguous()?)
    };
    let (mut sq, mut sk) = (0, 0);
    let mut outs = Vec::with_capacity(lens_q.len());
    for (&lq, &lk) in lens_q.iter().zip(lens_k) {
        if lq > 0 {
            let o = attend(&part(q, sq, lq, h)?, &part(k, sk, lk, hkv)?, &part(v, sk, lk, hkv)?, sq)?;
            outs.push(o.transpose(1, 2)?.reshape((lq, h, hd))?);
        }
        sq += lq;
        sk += lk;
    }
    if outs.is_empty() {
        return Ok(Tensor::zeros((nq, h, hd), q.dtype(), q.device())?);
    }
    Ok(Tensor::cat(&outs, 0)?)
}

/// Packed attention where query r of sequence s sees the first `limits[r]` keys of s (any
/// subset of positions; DESIGN §4.1): one masked softmax attention per sequence.
/// q: (sum lens_q, H, hd); k, v: (sum lens_k, Hkv, hd) -> (sum lens_q, H, hd).
pub fn attention_varlen_limited(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    lens_q: &[usize],
    lens_k: &[usize],
    limits: &[u32],
) -> Result<Tensor> {
    let (h, hkv, hd) = (q.dim(1)?, k.dim(1)?, q.dim(2)?);
    per_sequence(q, k, v, lens_q, lens_k, |qs, ks, vs, sq| {
        let (lq, lk) = (qs.dim(2)?, ks.dim(2)?);
        let rep = h / hkv;
        let (ks, vs) = (super::repeat_kv(ks, rep)?, super::repeat_kv(vs, rep)?);
        let scores = (qs.matmul(&ks.transpose(2, 3)?.contiguous()?)? / (hd as f64).sqrt())?; // (1, H, lq, lk)
        let mut mask = vec![0f32; lq * lk];
        for (i, &lim) in limits[sq..sq + lq].iter().enumerate() {
            mask[i * lk + lim as usize..(i + 1) * lk].fill(f32::NEG_INFINITY);
        }
        let mask = Tensor::from_vec(mask, (lq, lk), q.device())?.to_dtype(q.dtype())?;
        Ok(softmax_last(&scores.broadcast_add(&mask)?)?.matmul(&vs)?) // (1, H, lq, hd)
    })
}

/// Mean cross-entropy of `logits` (N, V) against `targets` (N,) u32.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let n = logits.dim(0)?;
    let max = logits.max_keepdim(D::Minus1)?;
    let shifted = logits.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?; // (N, 1)
    let picked = shifted.gather(&targets.reshape((n, 1))?, 1)?; // (N, 1)
    Ok((lse - picked)?.mean_all()?)
}

/// The state update of a routed thinking step (DESIGN §3): x (N, D) with (y * phi) * w added
/// to rows `idx`; y (M, D), phi (D,), w (M, 1) or (M,).
pub fn routed_update(x: &Tensor, idx: &[u32], y: &Tensor, phi: &Tensor, w: &Tensor) -> Result<Tensor> {
    let m = idx.len();
    let idx = Tensor::from_slice(idx, m, x.device())?;
    let delta = y.broadcast_mul(phi)?.broadcast_mul(&w.reshape((m, 1))?)?;
    Ok(x.index_add(&idx, &delta, 0)?)
}

/// A router's logits: x (N, D), w (1, D), b (1,) -> x w^T + b (N, 1).
pub fn router_logits(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    Ok(x.matmul(&w.t()?)?.broadcast_add(b)?)
}

/// Columns scaled by a vector: x (N, D) * phi (D,).
pub fn scale_columns(x: &Tensor, phi: &Tensor) -> Result<Tensor> {
    Ok(x.broadcast_mul(phi)?)
}

/// The rows `idx` of x (N, D) -> (M, D).
pub fn gather_rows(x: &Tensor, idx: &[u32]) -> Result<Tensor> {
    Ok(x.index_select(&Tensor::from_slice(idx, idx.len(), x.device())?, 0)?)
}
