//! Tensor operations of the model, each with a correct backward pass.
//!
//! candle-nn's fused `rms_norm`, `softmax_last_dim`, rotary and `sdpa` have no backward pass
//! and silently drop gradients (docs/DESIGN.md §11), so every op here is either
//! composed from primitives whose gradients candle gets right (`composed`), or a fused CPU
//! kernel that carries its own backward pass (`fused`) and has the composed version as its test
//! oracle (`tests`). The functions below pick the fused kernel for f32/f64 CPU tensors, the
//! composed op otherwise, or when asked: `ITT_COMPOSED_OPS=1` (or `all`) forces every composed
//! op, `ITT_COMPOSED_OPS=attention,rms_norm` only those named (see [`Kernel`]); [`with_composed`]
//! does the same for one thread, for tests. Timings: docs/PERFORMANCE.md.

pub mod composed;
pub mod fused;
pub mod quant;
#[cfg(test)]
mod tests;

pub use crate::base::config::Precision;
use crate::Result;
use candle_core::{DType, Device, Tensor};
use std::cell::Cell;
use std::sync::OnceLock;

/// The ops with a fused kernel; names as in `ITT_COMPOSED_OPS`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    Attention,
    RmsNorm,
    Rope,
    Swiglu,
    CrossEntropy,
    /// x W^T in f32 straight through gemm (no transposed-weight node, no zero-filled output);
    /// in bf16 precision the product is always the fused mixed-precision one.
    Linear,
    /// The thinking layer's element-wise ops: router logits, step-1 phi scaling, a routed
    /// step's gather x[idx] and update x[idx] += (y * phi) * w (`fused::thinking`).
    Thinking,
}

impl Kernel {
    pub const ALL: [Kernel; 7] = [
        Kernel::Attention,
        Kernel::RmsNorm,
        Kernel::Rope,
        Kernel::Swiglu,
        Kernel::CrossEntropy,
        Kernel::Linear,
        Kernel::Thinking,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kernel::Attention => "attention",
            Kernel::RmsNorm => "rms_norm",
            Kernel::Rope => "rope",
            Kernel::Swiglu => "swiglu",
            Kernel::CrossEntropy => "cross_entropy",
            Kernel::Linear => "linear",
            Kernel::Thinking => "thinking",
        }
    }

    fn bit(self) -> u32 {
        1 << self as u32
    }
}

thread_local! {
    static FORCE_COMPOSED: Cell<Option<u32>> = const { Cell::new(None) };
}

/// Kernels `ITT_COMPOSED_OPS` forces to their composed twins, as a bit set. An unknown name is
/// reported once on stderr and ignored.
fn composed_from_env() -> u32 {
    static MASK: OnceLock<u32> = OnceLock::new();
    *MASK.get_or_init(|| {
        let v = std::env::var("ITT_COMPOSED_OPS").unwrap_or_default();
        match v.trim() {
            "" | "0" => 0,
            "1" | "all" => Kernel::ALL.iter().fold(0, |m, k| m | k.bit()),
            list => {
                list.split(',').map(str::trim).fold(0, |m, name| match Kernel::ALL.iter().find(|k| k.name() == name) {
                    Some(k) => m | k.bit(),
                    None => {
                        let names: Vec<_> = Kernel::ALL.iter().map(|k| k.name()).collect();
                        eprintln!("ITT_COMPOSED_OPS: unknown op '{name}' ignored (use 1, all, or some of {names:?})");
                        m
                    }
                })
            }
        }
    })
}

/// Whether `kernel` runs fused for `t` (f32/f64 on CPU, not forced composed).
pub fn fused_enabled(kernel: Kernel, t: &Tensor) -> bool {
    let mask = FORCE_COMPOSED.with(|c| c.get()).unwrap_or_else(composed_from_env);
    mask & kernel.bit() == 0 && fused::supports(t)
}

/// Run `f` with `kernels` composed on this thread (all others fused), whatever the environment.
pub fn with_composed<R>(kernels: &[Kernel], f: impl FnOnce() -> R) -> R {
    let mask = kernels.iter().fold(0, |m, k| m | k.bit());
    let old = FORCE_COMPOSED.with(|c| c.replace(Some(mask)));
    let r = f();
    FORCE_COMPOSED.with(|c| c.set(old));
    r
}

/// What the machine does with a [`Precision`]: the bf16 hardware queries (the enum itself is
/// plain config data, `config::Precision`).
impl Precision {
    /// Whether this CPU computes bf16 products in hardware (AMX tiles or AVX512_BF16 vectors,
    /// `bf16_gemm::bf16_kernel`). Without it the bf16 path rounds the operands and multiplies in
    /// f32 (`bf16_gemm::gemm_fallback`): ~0.66x the speed of plain f32 on an AVX2 EPYC, so
    /// training falls back to f32 there (`train::Trainer::new`).
    pub fn bf16_in_hardware() -> bool {
        fused::bf16_gemm::bf16_kernel().in_hardware()
    }

    /// Whether a bf16 run should fall back to f32 products here: no bf16 hardware, and the
    /// emulation not asked for with `ITT_BF16_EMULATE=1` (to compare numerics on such a CPU).
    pub fn bf16_falls_back() -> bool {
        !Self::bf16_in_hardware() && std::env::var("ITT_BF16_EMULATE").as_deref() != Ok("1")
    }

    /// The precision a CPU run asked for `self` computes in: bf16 falls back to f32 where
    /// [`Self::bf16_falls_back`]. The one rule `itt train` and `itt bench` both follow, so a
    /// benchmark measures what training would run.
    pub fn on_this_cpu(self) -> Precision {
        match self {
            Precision::Bf16 if Self::bf16_falls_back() => Precision::F32,
            p => p,
        }
    }

    /// The kernels the products of this precision run on this machine, e.g. for `itt bench`.
    pub fn kernels(self) -> String {
        match self {
            Precision::Bf16 => fused::bf16_gemm::bf16_kernel().describe().into(),
            Precision::F32 => {
                #[cfg(target_arch = "x86_64")]
                let isa = if std::arch::is_x86_feature_detected!("avx512f") { "AVX-512" } else { "AVX2/FMA" };
                #[cfg(not(target_arch = "x86_64"))]
                let isa = "portable";
                format!("f32 gemm, {isa} micro-kernels")
            }
        }
    }
}

/// x W^T: x (N, in), W (out, in) -> (N, out). For f32 CPU tensors this is the fused op
/// (`fused::linear`): in bf16 precision (see [`Precision`]) the mixed-precision product (AMX
/// tiles where the CPU has them), in f32 gemm called directly. On a GPU candle's matmul, with
/// bf16 operands in bf16 precision. Otherwise candle's matmul.
/// The precision is the caller's (the model's, `Model::precision`), never ambient state.
pub fn linear(x: &Tensor, w: &Tensor, precision: Precision) -> Result<Tensor> {
    let f32_cpu = x.dtype() == DType::F32 && w.dtype() == DType::F32 && fused::supports(x);
    match precision {
        Precision::Bf16 if f32_cpu => fused::linear(x, w, Precision::Bf16),
        _ if f32_cpu && fused_enabled(Kernel::Linear, x) => fused::linear(x, w, Precision::F32),
        // On a GPU (DESIGN §15): both operands rounded to bf16, the product by cuBLAS (f32
        // accumulation), the result back in f32; composed from candle ops, so the backward
        // pass is candle's (its products in bf16 too).
        Precision::Bf16 if !x.device().is_cpu() && x.dtype() == DType::F32 => {
            let (xb, wb) = (x.to_dtype(DType::BF16)?, w.to_dtype(DType::BF16)?);
            Ok(xb.matmul(&wb.t()?)?.to_dtype(DType::F32)?)
        }
        _ => Ok(x.matmul(&w.t()?)?),
    }
}

/// RMSNorm over the last dimension: `x / sqrt(mean(x^2) + eps) * gain`.
/// x: (N, D), gain: (D,) -> (N, D).
pub fn rms_norm(x: &Tensor, gain: &Tensor, eps: f64) -> Result<Tensor> {
    if fused_enabled(Kernel::RmsNorm, x) && x.dtype() == gain.dtype() {
        fused::rms_norm(x, gain, eps)
    } else {
        composed::rms_norm(x, gain, eps)
    }
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
/// token's own position (so routed subsets keep their original positions, DESIGN §3).
pub fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if fused_enabled(Kernel::Rope, x) && cos.dtype() == x.dtype() && sin.dtype() == x.dtype() {
        fused::apply_rope(x, cos, sin)
    } else {
        composed::apply_rope(x, cos, sin)
    }
}

/// SwiGLU gate: silu(gate) * up, elementwise.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if fused_enabled(Kernel::Swiglu, gate) && up.dtype() == gate.dtype() {
        fused::swiglu(gate, up)
    } else {
        composed::swiglu(gate, up)
    }
}

/// Softmax over the last dimension, composed (max-subtracted for stability).
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    composed::softmax_last(x)
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

/// Scaled dot-product attention with a causal mask.
/// q: (B, H, Lq, hd); k, v: (B, Hkv, Lk, hd) with Lk = past + Lq -> (B, H, Lq, hd).
pub fn causal_sdpa(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    if fused_enabled(Kernel::Attention, q) && k.dtype() == q.dtype() && v.dtype() == q.dtype() {
        fused::causal_sdpa(q, k, v)
    } else {
        composed::causal_sdpa(q, k, v)
    }
}

/// Causal attention of packed queries over each sequence's own cached keys and values
/// (ks[s], vs[s]: (Lk_s, Hkv, hd), the queries the last `lens_q[s]` of them): the fused kernel
/// reads the cache buffers in place; otherwise they are concatenated for the composed path.
/// Inference only.
pub fn causal_attention_cached(q: &Tensor, ks: &[Tensor], vs: &[Tensor], lens_q: &[usize]) -> Result<Tensor> {
    let f32s = q.dtype() == DType::F32 && ks.iter().chain(vs).all(|t| t.dtype() == DType::F32);
    if fused_enabled(Kernel::Attention, q) && f32s && ks.len() > 1 {
        return fused::attention::causal_attention_kv_slices(q, ks, vs, lens_q);
    }
    let lens_k: Vec<usize> = ks.iter().map(|k| k.dim(0)).collect::<candle_core::Result<_>>()?;
    let (k, v) =
        if ks.len() == 1 { (ks[0].clone(), vs[0].clone()) } else { (Tensor::cat(ks, 0)?, Tensor::cat(vs, 0)?) };
    causal_attention_varlen(q, &k, &v, lens_q, &lens_k)
}

/// Causal attention over packed sequences, without padding or transposes: sequence s has
/// `lens_q[s]` queries, the last of its `lens_k[s]` keys (`lens_k[s] - lens_q[s]` cached keys
/// come first). q: (sum lens_q, H, hd); k, v: (sum lens_k, Hkv, hd) -> (sum lens_q, H, hd).
pub fn causal_attention_varlen(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    lens_q: &[usize],
    lens_k: &[usize],
) -> Result<Tensor> {
    if fused_enabled(Kernel::Attention, q) && k.dtype() == q.dtype() && v.dtype() == q.dtype() {
        fused::causal_attention_varlen(q, k, v, lens_q, lens_k)
    } else {
        composed::causal_attention_varlen(q, k, v, lens_q, lens_k)
    }
}

/// Packed attention with the queries at any positions: query r of sequence s sees the first
/// `limits[r]` keys of s. The selected tokens of a routed step attending to every token of
/// their sequence up to their own position (DESIGN §4.1, `routed_attention: all`).
/// q: (sum lens_q, H, hd); k, v: (sum lens_k, Hkv, hd) -> (sum lens_q, H, hd).
pub fn attention_varlen_limited(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    lens_q: &[usize],
    lens_k: &[usize],
    limits: &[u32],
) -> Result<Tensor> {
    if fused_enabled(Kernel::Attention, q) && k.dtype() == q.dtype() && v.dtype() == q.dtype() {
        fused::attention_varlen_limited(q, k, v, lens_q, lens_k, limits)
    } else {
        fused::attention::check_limits(lens_q, lens_k, limits)?;
        composed::attention_varlen_limited(q, k, v, lens_q, lens_k, limits)
    }
}

/// The state update of a routed thinking step (DESIGN §3, literal residual connection):
/// x (N, D) with (y * phi) * w added to the distinct rows `idx`; y (M, D), phi (D,), w (M, 1).
pub fn routed_update(x: &Tensor, idx: &[u32], y: &Tensor, phi: &Tensor, w: &Tensor) -> Result<Tensor> {
    let same = |t: &Tensor| t.dtype() == x.dtype();
    if fused_enabled(Kernel::Thinking, x) && same(y) && same(phi) && same(w) {
        fused::routed_update(x, idx, y, phi, w)
    } else {
        composed::routed_update(x, idx, y, phi, w)
    }
}

/// A router's logits R(x) = x w^T + b: x (N, D), w (1, D), b (1,) -> (N, 1).
pub fn router_logits(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    if fused_enabled(Kernel::Thinking, x) && w.dtype() == x.dtype() && b.dtype() == x.dtype() {
        fused::router_logits(x, w, b)
    } else {
        composed::router_logits(x, w, b)
    }
}

/// The distinct rows `idx` of x (N, D) -> (M, D): a routed step's gather.
pub fn gather_rows(x: &Tensor, idx: &[u32]) -> Result<Tensor> {
    if fused_enabled(Kernel::Thinking, x) && x.rank() == 2 {
        fused::gather_rows(x, idx)
    } else {
        composed::gather_rows(x, idx)
    }
}

/// x (N, D) with column d scaled by phi[d]: the step encoding of DESIGN §3.
pub fn scale_columns(x: &Tensor, phi: &Tensor) -> Result<Tensor> {
    if fused_enabled(Kernel::Thinking, x) && phi.dtype() == x.dtype() && x.rank() == 2 {
        fused::scale_columns(x, phi)
    } else {
        composed::scale_columns(x, phi)
    }
}

/// Mean cross-entropy of `logits` (N, V) against `targets` (N,) u32.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    if fused_enabled(Kernel::CrossEntropy, logits) && targets.dtype() == DType::U32 {
        fused::cross_entropy(logits, targets)
    } else {
        composed::cross_entropy(logits, targets)
    }
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
