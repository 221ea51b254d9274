//! Tensor operations of the model, each with a correct backward pass.
//!
//! candle-nn's fused `rms_norm`, `softmax_last_dim`, rotary and `sdpa` have no backward pass
//! and silently drop gradients (../shared/CANDLE-NOTES.md), so every op here is either
//! composed from primitives whose gradients candle gets right, or a fused kernel that
//! carries its own `bwd` and has the composed version as its test oracle.

use crate::Result;
use candle_core::{DType, Device, Tensor, D};

/// RMSNorm over the last dimension: `x / sqrt(mean(x^2) + eps) * gain`.
/// x: (N, D), gain: (D,) -> (N, D).
pub fn rms_norm(x: &Tensor, gain: &Tensor, eps: f64) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?; // (N, 1)
    let inv = (ms + eps)?.sqrt()?.recip()?;
    Ok(x.broadcast_mul(&inv)?.broadcast_mul(gain)?)
}

/// Rotary tables for positions 0..max_len: cos and sin of shape (max_len, head_dim / 2).
/// Frequencies `theta^(-2i/head_dim)` (LLaMA); pairs are (i, i + head_dim/2), the rotate-half
/// layout of Hugging Face checkpoints.
pub fn rope_tables(max_len: usize, head_dim: usize, theta: f64, device: &Device) -> Result<(Tensor, Tensor)> {
    let half = head_dim / 2;
    let mut cos = Vec::with_capacity(max_len * half);
    let mut sin = Vec::with_capacity(max_len * half);
    for p in 0..max_len {
        for i in 0..half {
            // Computed in f64 then rounded once, like reference implementations in f32 closely.
            let inv_freq = 1.0 / theta.powf((2 * i) as f64 / head_dim as f64);
            let inv_freq = inv_freq as f32 as f64;
            let angle = p as f64 * inv_freq;
            cos.push(angle.cos() as f32);
            sin.push(angle.sin() as f32);
        }
    }
    Ok((Tensor::from_vec(cos, (max_len, half), device)?, Tensor::from_vec(sin, (max_len, half), device)?))
}

/// Apply rotary embeddings. x: (N, H, hd); cos, sin: (N, hd/2), already gathered at each
/// token's own position (so routed subsets keep their original positions, ITT-SPEC §3).
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

/// Additive causal mask for `q_len` queries that come after `past` cached keys:
/// query i may see keys 0..=past+i. Shape (q_len, past + q_len), 0 or -inf.
pub fn causal_mask(q_len: usize, past: usize, device: &Device) -> Result<Tensor> {
    let k_len = past + q_len;
    let mut m = vec![0f32; q_len * k_len];
    for i in 0..q_len {
        for j in (past + i + 1)..k_len {
            m[i * k_len + j] = f32::NEG_INFINITY;
        }
    }
    Ok(Tensor::from_vec(m, (q_len, k_len), device)?)
}

/// Repeat key/value heads for grouped-query attention: (B, Hkv, L, hd) -> (B, Hkv*rep, L, hd).
pub fn repeat_kv(x: &Tensor, rep: usize) -> Result<Tensor> {
    if rep == 1 {
        return Ok(x.clone());
    }
    let (b, hkv, l, hd) = x.dims4()?;
    Ok(x.unsqueeze(2)?.broadcast_as((b, hkv, rep, l, hd))?.reshape((b, hkv * rep, l, hd))?)
}

/// Scaled dot-product attention with a causal mask, composed.
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

/// Mean cross-entropy of `logits` (N, V) against `targets` (N,) u32.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let n = logits.dim(0)?;
    let max = logits.max_keepdim(D::Minus1)?;
    let shifted = logits.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?; // (N, 1)
    let picked = shifted.gather(&targets.reshape((n, 1))?, 1)?; // (N, 1)
    Ok((lse - picked)?.mean_all()?)
}

/// Per-token negative log-likelihood in f64 for evaluation, no graph: (N, V), (N,) -> Vec.
pub fn token_nll(logits: &Tensor, targets: &[u32]) -> Result<Vec<f64>> {
    let logits = logits.to_dtype(DType::F32)?;
    let (n, v) = logits.dims2()?;
    let data = logits.flatten_all()?.to_vec1::<f32>()?;
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let row = &data[i * v..(i + 1) * v];
        let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
        let lse = row.iter().map(|&z| (z as f64 - max).exp()).sum::<f64>().ln() + max;
        out.push(lse - row[targets[i] as usize] as f64);
    }
    Ok(out)
}
