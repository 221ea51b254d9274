//! The LLaMA-style decoder (DESIGN §2), read top to bottom: parameters, norm, attention,
//! MLP, block, model. The thinking layers (ITT, Loop) live in `thinking.rs`; the per-request
//! state they use (KV caches, routing settings, the record of what was routed) is passed in.
//!
//! Tokens travel *packed*: a call's input is `(N,)` token ids, the concatenation of one or
//! more sequences described by a [`SeqLayout`]. Training batches are B sequences of T tokens;
//! a routed thinking step is the subset of selected tokens of each sequence, still packed;
//! batched generation packs prompts of different lengths without padding tokens. So nothing
//! inside the model ever sees a pad, and "padded positions are never selected" holds by
//! construction.

pub mod thinking;

use crate::base::config::{ModelConfig, ModelKind};
use crate::base::rng::Rng;
use crate::ops::{self, Precision};
use crate::{Error, Result};
use candle_core::quantized::QTensor;
use candle_core::{DType, Device, Tensor, Var};
use std::collections::HashMap;
use std::sync::Arc;

pub use thinking::{ForwardRecord, RouterCalibration, Routing, RoutingOptions, StepStats, ThinkingLayer};

// ---------------------------------------------------------------------------------------------
// Parameters

/// How a parameter starts when a model is created from scratch.
#[derive(Clone, Copy, Debug)]
pub enum Init {
    Normal(f64),
    Const(f64),
}

/// Where parameters come from: fresh (seeded init) or loaded tensors (checkpoint, safetensors,
/// GGUF). Every parameter the model asks for is recorded, in order, as a trainable `Var`.
pub struct ParamStore {
    source: ParamSource,
    device: Device,
    /// F32 normally; F64 for finite-difference gradient checks.
    pub dtype: DType,
    pub names: Vec<String>,
    pub vars: Vec<Var>,
}

enum ParamSource {
    /// Each parameter draws from its own stream, derived from the seed and its name: a
    /// parameter starts the same in every model that has it, so dense, Loop and ITT runs of
    /// one seed share their backbone's initial weights (paired comparisons, DESIGN §8).
    Fresh(u64),
    Loaded {
        tensors: HashMap<String, Tensor>,
        origin: String,
        /// Weights read only as quantized blocks (DESIGN §13): no f32 values, no parameter;
        /// a zero-stride stand-in of the right shape takes their place.
        blocks_only: std::collections::HashSet<String>,
    },
}

impl ParamStore {
    pub fn fresh(seed: u64, device: &Device) -> Self {
        ParamStore {
            source: ParamSource::Fresh(seed),
            device: device.clone(),
            dtype: DType::F32,
            names: vec![],
            vars: vec![],
        }
    }

    /// `origin` names the file the tensors came from, for error messages.
    pub fn loaded(tensors: HashMap<String, Tensor>, origin: &str, device: &Device) -> Self {
        ParamStore {
            source: ParamSource::Loaded { tensors, origin: origin.to_string(), blocks_only: Default::default() },
            device: device.clone(),
            dtype: DType::F32,
            names: vec![],
            vars: vec![],
        }
    }

    pub fn get(&mut self, name: &str, shape: &[usize], init: Init) -> Result<Tensor> {
        let t = match &mut self.source {
            ParamSource::Fresh(seed) => {
                let mut rng = Rng::derive(*seed, &format!("init/{name}"));
                let n: usize = shape.iter().product();
                let data: Vec<f32> = match init {
                    Init::Normal(std) => (0..n).map(|_| (rng.normal() * std) as f32).collect(),
                    Init::Const(c) => vec![c as f32; n],
                };
                Tensor::from_vec(data, shape, &self.device)?.to_dtype(self.dtype)?
            }
            ParamSource::Loaded { blocks_only, .. } if blocks_only.contains(name) => {
                return Ok(Tensor::zeros(1, self.dtype, &self.device)?.broadcast_as(shape)?);
            }
            ParamSource::Loaded { tensors, origin, .. } => {
                let t = tensors.remove(name).ok_or_else(|| {
                    Error::checkpoint(
                        origin.as_str(),
                        format!("tensor '{name}' is missing (was it written by another model or config?)"),
                    )
                })?;
                if t.dims() != shape {
                    return Err(Error::checkpoint(
                        origin.as_str(),
                        format!("tensor '{name}' has shape {:?}, the config needs {:?}", t.dims(), shape),
                    ));
                }
                t.to_dtype(self.dtype)?.to_device(&self.device)?
            }
        };
        let var = Var::from_tensor(&t)?;
        let out = var.as_tensor().clone();
        self.names.push(name.to_string());
        self.vars.push(var);
        Ok(out)
    }

    /// After building: a loaded source must have no tensors left over.
    pub fn finish(self) -> Result<Vec<(String, Var)>> {
        if let ParamSource::Loaded { tensors, origin, .. } = &self.source {
            if let Some(extra) = tensors.keys().min() {
                return Err(Error::checkpoint(
                    origin.as_str(),
                    format!(
                        "unexpected tensor '{extra}' ({} extra in all): the file does not match this config",
                        tensors.len()
                    ),
                ));
            }
        }
        Ok(self.names.into_iter().zip(self.vars).collect())
    }
}

// ---------------------------------------------------------------------------------------------
// Packed sequences

/// The sequences packed into one call: their lengths in this call and every token's absolute
/// position (its index in its sequence, counting cached tokens), used by RoPE.
#[derive(Clone, Debug, PartialEq)]
pub struct SeqLayout {
    pub lens: Vec<usize>,
    pub positions: Vec<u32>,
}

impl SeqLayout {
    /// B sequences of T tokens at positions 0..T.
    pub fn uniform(b: usize, t: usize) -> Self {
        SeqLayout { lens: vec![t; b], positions: (0..b).flat_map(|_| 0..t as u32).collect() }
    }

    /// Sequences of the given lengths, each continuing after `past[i]` cached tokens.
    pub fn with_past(lens: &[usize], past: &[usize]) -> Self {
        let positions = lens.iter().zip(past).flat_map(|(&n, &p)| (p..p + n).map(|x| x as u32)).collect();
        SeqLayout { lens: lens.to_vec(), positions }
    }

    pub fn n_tokens(&self) -> usize {
        self.positions.len()
    }

    pub fn starts(&self) -> Vec<usize> {
        let mut s = Vec::with_capacity(self.lens.len());
        let mut acc = 0;
        for &n in &self.lens {
            s.push(acc);
            acc += n;
        }
        s
    }
}

/// Rotary cos/sin gathered at the positions of one call's tokens: (N, hd/2) each.
#[derive(Clone)]
pub struct RopeAt {
    pub cos: Tensor,
    pub sin: Tensor,
}

impl RopeAt {
    /// The rows of the selected tokens (routed steps keep their original positions).
    /// `selected`: distinct packed token indices.
    pub fn select(&self, selected: &[u32]) -> Result<RopeAt> {
        Ok(RopeAt { cos: ops::gather_rows(&self.cos, selected)?, sin: ops::gather_rows(&self.sin, selected)? })
    }
}

/// The tokens of a routed step: their rows among the call's tokens (distinct, ascending) and
/// their positions (`Positions::select` of those rows).
#[derive(Clone, Copy)]
pub struct Routed<'a> {
    pub rows: &'a [u32],
    pub pos: &'a Positions,
}

/// Where one call's tokens sit: their packed layout and the rotary rows at their positions.
#[derive(Clone)]
pub struct Positions {
    pub layout: SeqLayout,
    pub rope: RopeAt,
}

impl Positions {
    /// The selected tokens (distinct packed indices, ascending) at their original positions:
    /// the tokens of a routed step (docs/DESIGN.md §3.4).
    pub fn select(&self, selected: &[u32]) -> Result<Positions> {
        Ok(Positions { layout: thinking::sub_layout(&self.layout, selected), rope: self.rope.select(selected)? })
    }
}

/// The per-call context every layer sees: where the tokens are, the request's routing settings,
/// the number format of the products, the KV caches to extend, the record of what was routed,
/// and (training) the router auxiliary-loss terms. Per-request state is passed in, never kept
/// in the model.
pub struct Call<'a> {
    pub pos: Positions,
    pub routing: &'a RoutingOptions,
    pub precision: Precision,
    pub caches: Option<&'a mut [SeqCache]>,
    pub record: Option<&'a mut ForwardRecord>,
    /// `Some` when the caller trains with the router auxiliary loss: one mean binary
    /// cross-entropy per routed (layer, step) (docs/DESIGN.md §4.6).
    pub router_aux: Option<Vec<Tensor>>,
}

impl Call<'_> {
    /// The KV caches of (layer, step), when this call extends caches.
    pub fn slot(&mut self, layer: usize, step: usize) -> Option<CacheSlot<'_>> {
        self.pos_and_slot(layer, step).1
    }

    /// The call's positions together with the caches of (layer, step). Steps past the trained
    /// ones (extended thinking) get their caches when first used.
    pub fn pos_and_slot(&mut self, layer: usize, step: usize) -> (&Positions, Option<CacheSlot<'_>>) {
        let slot = self.caches.as_deref_mut().map(|seqs| {
            for s in seqs.iter_mut() {
                if s.slots[layer].len() <= step {
                    let reserve = s.slots[layer].first().map(|c| c.reserve).unwrap_or(0);
                    s.slots[layer].resize_with(step + 1, || KvCache::with_reserve(reserve));
                }
            }
            CacheSlot { seqs, layer, step }
        });
        (&self.pos, slot)
    }
}

// ---------------------------------------------------------------------------------------------
// KV cache

/// One sequence's keys and values at one (layer, step), RoPE applied, in buffers of
/// (capacity, Hkv, hd) written in place: a decode step copies only its own token's keys, not
/// the whole cache (DESIGN §5). A routed step's cache holds only the tokens selected at that
/// step. Cloning copies the buffers (they are written in place, so they cannot be shared).
#[derive(Debug, Default)]
pub struct KvCache {
    k: Option<Tensor>,
    v: Option<Tensor>,
    len: usize,
    /// Tokens to make room for when the buffers are first allocated.
    reserve: usize,
}

impl Clone for KvCache {
    fn clone(&self) -> Self {
        let copy = |t: &Option<Tensor>| t.as_ref().map(|t| t.copy().expect("copying a CPU tensor"));
        KvCache { k: copy(&self.k), v: copy(&self.v), len: self.len, reserve: self.reserve }
    }
}

impl KvCache {
    fn with_reserve(reserve: usize) -> Self {
        KvCache { reserve, ..Default::default() }
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Tokens the buffers hold room for.
    pub fn capacity(&self) -> usize {
        self.k.as_ref().map(|k| k.dim(0).unwrap_or(0)).unwrap_or(0)
    }

    /// Append keys and values k, v (n, Hkv, hd) and return all cached ones, (len, Hkv, hd)
    /// each (views of the buffers). The buffers grow by doubling when full.
    pub fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let n = k.dim(0)?;
        let need = self.len + n;
        if need == 0 {
            return Ok((k.clone(), v.clone()));
        }
        if need > self.capacity() {
            let cap = need.max(self.reserve).max(2 * self.capacity());
            let grow = |old: &Option<Tensor>, like: &Tensor| -> Result<Tensor> {
                let (_, hkv, hd) = like.dims3()?;
                let buf = Tensor::zeros((cap, hkv, hd), like.dtype(), like.device())?;
                if let Some(old) = old {
                    if self.len > 0 {
                        buf.slice_set(&old.narrow(0, 0, self.len)?.contiguous()?, 0, 0)?;
                    }
                }
                Ok(buf)
            };
            let (nk, nv) = (grow(&self.k, k)?, grow(&self.v, v)?);
            self.k = Some(nk);
            self.v = Some(nv);
        }
        let (bk, bv) = (self.k.as_ref().expect("allocated above"), self.v.as_ref().expect("allocated above"));
        if n > 0 {
            bk.slice_set(&k.contiguous()?, 0, self.len)?;
            bv.slice_set(&v.contiguous()?, 0, self.len)?;
        }
        self.len = need;
        Ok((bk.narrow(0, 0, need)?, bv.narrow(0, 0, need)?))
    }

    /// Forget every entry past the first `len` (speculative decoding's rollback of rejected
    /// tokens); the buffers stay, the next append overwrites them.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Bytes held by the key and value buffers.
    pub fn bytes(&self) -> usize {
        [&self.k, &self.v].iter().filter_map(|t| t.as_ref()).map(|t| t.elem_count() * t.dtype().size_in_bytes()).sum()
    }
}

/// All caches of one sequence, indexed [layer][step], and the number of tokens seen.
#[derive(Clone, Debug)]
pub struct SeqCache {
    pub slots: Vec<Vec<KvCache>>,
    pub seen: usize,
}

impl SeqCache {
    /// Cached tokens at each (layer, step), in the same [layer][step] shape.
    pub fn lens(&self) -> Vec<Vec<usize>> {
        self.slots.iter().map(|l| l.iter().map(|c| c.len()).collect()).collect()
    }

    /// Bytes held by the key and value buffers (allocated, not only filled).
    pub fn bytes(&self) -> usize {
        self.slots.iter().flatten().map(|c| c.bytes()).sum()
    }
}

/// Caches of the sequences packed in a call, and which (layer, step) slot is in use.
pub struct CacheSlot<'a> {
    pub seqs: &'a mut [SeqCache],
    pub layer: usize,
    pub step: usize,
}

// ---------------------------------------------------------------------------------------------
// Layers

/// y = x W^T. Weight (out, in); no bias (DESIGN §2).
#[derive(Clone, Debug)]
pub struct Linear {
    pub weight: Tensor,
    /// The weight's quantized form (GGUF blocks, (out, in)), when the model was loaded for
    /// inference from a quantized file: the product then runs on it (`ops::quant`) and
    /// `weight` holds its dequantized values for anything else (DESIGN §13).
    pub quant: Option<Arc<QTensor>>,
}

impl Linear {
    fn load(ps: &mut ParamStore, name: &str, out_dim: usize, in_dim: usize, std: f64) -> Result<Self> {
        Ok(Linear { weight: ps.get(&format!("{name}.weight"), &[out_dim, in_dim], Init::Normal(std))?, quant: None })
    }
    /// x: (N, in) -> (N, out), the product in `precision`, or against the quantized weight.
    pub fn forward(&self, x: &Tensor, precision: Precision) -> Result<Tensor> {
        match &self.quant {
            Some(q) => ops::quant::qlinear(x, q),
            None => ops::linear(x, &self.weight, precision),
        }
    }

    /// x through several linears of the same input (Q, K, V; gate, up): quantized weights go
    /// through one grouped product (`ops::quant::qlinear_many`: x quantized once, one parallel
    /// region), with values identical to one product each.
    pub fn forward_many<const N: usize>(
        linears: [&Linear; N],
        x: &Tensor,
        precision: Precision,
    ) -> Result<[Tensor; N]> {
        let quants: Vec<&QTensor> = linears.iter().filter_map(|l| l.quant.as_deref()).collect();
        let outs: Vec<Tensor> = if quants.len() == N {
            ops::quant::qlinear_many(x, &quants)?
        } else {
            linears.iter().map(|l| l.forward(x, precision)).collect::<Result<_>>()?
        };
        Ok(outs.try_into().expect("one output per linear"))
    }
}

#[derive(Clone, Debug)]
pub struct RmsNorm {
    pub gain: Tensor,
    pub eps: f64,
}

impl RmsNorm {
    fn load(ps: &mut ParamStore, name: &str, dim: usize, eps: f64) -> Result<Self> {
        Ok(RmsNorm { gain: ps.get(&format!("{name}.weight"), &[dim], Init::Const(1.0))?, eps })
    }
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::rms_norm(x, &self.gain, self.eps)
    }
}

/// Causal multi-head attention with rotary positions and grouped-query heads.
#[derive(Clone, Debug)]
pub struct Attention {
    pub wq: Linear,
    pub wk: Linear,
    pub wv: Linear,
    pub wo: Linear,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

impl Attention {
    fn load(ps: &mut ParamStore, name: &str, cfg: &ModelConfig) -> Result<Self> {
        let (d, hd) = (cfg.d_model, cfg.head_dim());
        let out_std = cfg.init_std / (2.0 * cfg.n_layers as f64).sqrt();
        Ok(Attention {
            wq: Linear::load(ps, &format!("{name}.wq"), cfg.n_heads * hd, d, cfg.init_std)?,
            wk: Linear::load(ps, &format!("{name}.wk"), cfg.n_kv_heads * hd, d, cfg.init_std)?,
            wv: Linear::load(ps, &format!("{name}.wv"), cfg.n_kv_heads * hd, d, cfg.init_std)?,
            wo: Linear::load(ps, &format!("{name}.wo"), d, cfg.n_heads * hd, out_std)?,
            n_heads: cfg.n_heads,
            n_kv_heads: cfg.n_kv_heads,
            head_dim: hd,
        })
    }

    /// x: (N, D) normalised input of the packed sequences -> (N, D).
    pub fn forward(&self, x: &Tensor, pos: &Positions, prec: Precision, cache: Option<CacheSlot>) -> Result<Tensor> {
        let n = x.dim(0)?;
        let (h, hkv, hd) = (self.n_heads, self.n_kv_heads, self.head_dim);
        let (layout, rope) = (&pos.layout, &pos.rope);
        let [q, k, v] = Linear::forward_many([&self.wq, &self.wk, &self.wv], x, prec)?;
        let q = ops::apply_rope(&q.reshape((n, h, hd))?, &rope.cos, &rope.sin)?;
        let k = ops::apply_rope(&k.reshape((n, hkv, hd))?, &rope.cos, &rope.sin)?;
        let v = v.reshape((n, hkv, hd))?;
        // One path for training, scoring, prefill and decode: every packed sequence at once
        // (equal lengths or not, routed subsets included), no transposes; with a cache each
        // sequence's cached keys come before its new ones. (N, H, hd)
        let out = match cache {
            None => ops::causal_attention_varlen(&q, &k, &v, &layout.lens, &layout.lens)?,
            Some(c) => {
                let (ks, vs) = self.extend_cache(&k, &v, layout, c)?;
                ops::causal_attention_cached(&q, &ks, &vs, &layout.lens)?
            }
        };
        let out = out.reshape((n, h * hd))?;
        self.wo.forward(&out, prec)
    }

    /// A routed step whose selected tokens attend to every token (DESIGN §4.1,
    /// `routed_attention: all`): queries from the selected rows `hs` (M, D) at positions
    /// `routed.pos`, keys and values from every token's normalised state `hn` (N, D) at `pos`.
    /// With a KV cache the step's cache holds every token. -> (M, D).
    pub fn forward_routed(
        &self,
        hn: &Tensor,
        hs: &Tensor,
        routed: Routed,
        pos: &Positions,
        prec: Precision,
        cache: Option<CacheSlot>,
    ) -> Result<Tensor> {
        let Routed { rows: selected, pos: sub } = routed;
        let (n, m) = (hn.dim(0)?, hs.dim(0)?);
        let (h, hkv, hd) = (self.n_heads, self.n_kv_heads, self.head_dim);
        let q = ops::apply_rope(&self.wq.forward(hs, prec)?.reshape((m, h, hd))?, &sub.rope.cos, &sub.rope.sin)?;
        let k = ops::apply_rope(&self.wk.forward(hn, prec)?.reshape((n, hkv, hd))?, &pos.rope.cos, &pos.rope.sin)?;
        let v = self.wv.forward(hn, prec)?.reshape((n, hkv, hd))?;
        // Each selected token sees the keys of its sequence up to its own place among them.
        let starts = pos.layout.starts();
        let mut seq = 0;
        let mut limits = Vec::with_capacity(m);
        let past: Vec<usize> = match &cache {
            Some(c) => (0..pos.layout.lens.len()).map(|i| c.seqs[i].slots[c.layer][c.step].len()).collect(),
            None => vec![0; pos.layout.lens.len()],
        };
        for &i in selected {
            while seq + 1 < starts.len() && i as usize >= starts[seq + 1] {
                seq += 1;
            }
            limits.push((past[seq] + i as usize - starts[seq] + 1) as u32);
        }
        let out = match cache {
            None => ops::attention_varlen_limited(&q, &k, &v, &sub.layout.lens, &pos.layout.lens, &limits)?,
            Some(c) => {
                let (ks, vs) = self.extend_cache(&k, &v, &pos.layout, c)?;
                let lens_k: Vec<usize> = ks.iter().map(|k| k.dim(0)).collect::<candle_core::Result<_>>()?;
                let (k_all, v_all) = (Tensor::cat(&ks, 0)?, Tensor::cat(&vs, 0)?);
                ops::attention_varlen_limited(&q, &k_all, &v_all, &sub.layout.lens, &lens_k, &limits)?
            }
        };
        self.wo.forward(&out.reshape((m, h * hd))?, prec)
    }

    /// Append every token's keys and values k, v (N, Hkv, hd) to their sequences' caches and
    /// return each sequence's cached keys and values, (Lk_s, Hkv, hd) views of its buffers.
    fn extend_cache(
        &self,
        k: &Tensor,
        v: &Tensor,
        layout: &SeqLayout,
        c: CacheSlot,
    ) -> Result<(Vec<Tensor>, Vec<Tensor>)> {
        let (mut ks, mut vs) = (vec![], vec![]);
        for (i, (&start, &len)) in layout.starts().iter().zip(&layout.lens).enumerate() {
            let slot = &mut c.seqs[i].slots[c.layer][c.step];
            let (ki, vi) = slot.append(&k.narrow(0, start, len)?, &v.narrow(0, start, len)?)?;
            ks.push(ki);
            vs.push(vi);
        }
        Ok((ks, vs))
    }

    /// A routed step (`routed_attention: all`) that selected no token of this call still
    /// caches every token's keys and values, for the tokens that come later.
    pub fn cache_only(&self, hn: &Tensor, pos: &Positions, prec: Precision, cache: CacheSlot) -> Result<()> {
        let (n, hkv, hd) = (hn.dim(0)?, self.n_kv_heads, self.head_dim);
        let k = ops::apply_rope(&self.wk.forward(hn, prec)?.reshape((n, hkv, hd))?, &pos.rope.cos, &pos.rope.sin)?;
        let v = self.wv.forward(hn, prec)?.reshape((n, hkv, hd))?;
        self.extend_cache(&k, &v, &pos.layout, cache)?;
        Ok(())
    }
}

/// SwiGLU MLP: W_down (silu(W_gate x) * W_up x).
#[derive(Clone, Debug)]
pub struct Mlp {
    pub w_gate: Linear,
    pub w_up: Linear,
    pub w_down: Linear,
}

impl Mlp {
    fn load(ps: &mut ParamStore, name: &str, cfg: &ModelConfig) -> Result<Self> {
        let out_std = cfg.init_std / (2.0 * cfg.n_layers as f64).sqrt();
        Ok(Mlp {
            w_gate: Linear::load(ps, &format!("{name}.w_gate"), cfg.mlp_hidden, cfg.d_model, cfg.init_std)?,
            w_up: Linear::load(ps, &format!("{name}.w_up"), cfg.mlp_hidden, cfg.d_model, cfg.init_std)?,
            w_down: Linear::load(ps, &format!("{name}.w_down"), cfg.d_model, cfg.mlp_hidden, out_std)?,
        })
    }
    pub fn forward(&self, x: &Tensor, prec: Precision) -> Result<Tensor> {
        let [gate, up] = Linear::forward_many([&self.w_gate, &self.w_up], x, prec)?;
        self.w_down.forward(&ops::swiglu(&gate, &up)?, prec)
    }
}

/// The decoder block `f` of DESIGN §3, residual paths included:
/// h = x + Attn(norm(x)); f(x) = h + MLP(norm(h)).
#[derive(Clone, Debug)]
pub struct Block {
    pub attn_norm: RmsNorm,
    pub attn: Attention,
    pub mlp_norm: RmsNorm,
    pub mlp: Mlp,
}

impl Block {
    fn load(ps: &mut ParamStore, name: &str, cfg: &ModelConfig) -> Result<Self> {
        Ok(Block {
            attn_norm: RmsNorm::load(ps, &format!("{name}.attn_norm"), cfg.d_model, cfg.norm_eps)?,
            attn: Attention::load(ps, &format!("{name}.attn"), cfg)?,
            mlp_norm: RmsNorm::load(ps, &format!("{name}.mlp_norm"), cfg.d_model, cfg.norm_eps)?,
            mlp: Mlp::load(ps, &format!("{name}.mlp"), cfg)?,
        })
    }

    /// x: (N, D) -> (N, D).
    pub fn forward(&self, x: &Tensor, pos: &Positions, prec: Precision, cache: Option<CacheSlot>) -> Result<Tensor> {
        let h = (x + self.attn.forward(&self.attn_norm.forward(x)?, pos, prec, cache)?)?;
        Ok((&h + self.mlp.forward(&self.mlp_norm.forward(&h)?, prec)?)?)
    }
}

impl Block {
    /// `f` on the selected rows `xs` = x[S] (M, D) of a routed step whose tokens attend to every
    /// token (DESIGN §4.1, `routed_attention: all`); x (N, D) is every token's state. -> (M, D).
    pub fn forward_routed(
        &self,
        x: &Tensor,
        xs: &Tensor,
        routed: Routed,
        pos: &Positions,
        prec: Precision,
        cache: Option<CacheSlot>,
    ) -> Result<Tensor> {
        let hn = self.attn_norm.forward(x)?; // (N, D)
        let hs = ops::gather_rows(&hn, routed.rows)?; // (M, D): the norm is per row
        let h = (xs + self.attn.forward_routed(&hn, &hs, routed, pos, prec, cache)?)?;
        Ok((&h + self.mlp.forward(&self.mlp_norm.forward(&h)?, prec)?)?)
    }
}

/// One decoder layer: its block `f`, and for the layers that think, the thinking (ITT or Loop)
/// wrapped around it.
#[derive(Clone, Debug)]
pub struct Layer {
    pub block: Block,
    pub thinking: Option<ThinkingLayer>,
}

impl Layer {
    /// Steps this layer runs: T when it thinks, 1 otherwise.
    pub fn steps(&self) -> usize {
        self.thinking.as_ref().map(|t| t.steps).unwrap_or(1)
    }

    /// x: (N, D) -> (N, D), one step or T.
    pub fn forward(&self, index: usize, x: &Tensor, call: &mut Call) -> Result<Tensor> {
        match &self.thinking {
            None => {
                let prec = call.precision;
                let (pos, slot) = call.pos_and_slot(index, 0);
                self.block.forward(x, pos, prec, slot)
            }
            Some(t) => t.forward(&self.block, x, call),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Model

pub struct Model {
    pub cfg: ModelConfig,
    pub embed: Tensor,
    pub layers: Vec<Layer>,
    pub norm: RmsNorm,
    /// Untied output head (V, D); `None` when tied to `embed`.
    pub head: Option<Linear>,
    /// The embedding's quantized form, for the tied head's product (DESIGN §13); lookups read
    /// `embed`, which holds the same values dequantized.
    pub embed_quant: Option<Arc<QTensor>>,
    rope_cos: Tensor,
    rope_sin: Tensor,
    /// Every parameter, named, in creation order.
    pub params: Vec<(String, Var)>,
    /// Number format of the matrix products (`ops::Precision`): f32 unless the caller asks
    /// for bf16, e.g. a run trained in bf16 (`Trainer` sets the run's), or `itt eval --precision`.
    pub precision: Precision,
    /// The f32 copies of quantized linear weights were freed (`drop_dense_copies`).
    dense_dropped: bool,
}

/// B sequences of T tokens, row-major, and their next tokens: one training micro-batch.
#[derive(Clone, Copy, Debug)]
pub struct TokenBatch<'a> {
    pub inputs: &'a [u32],
    pub targets: &'a [u32],
    pub b: usize,
    pub t: usize,
}

/// The losses of one training forward pass.
pub struct TrainLoss {
    /// Mean next-token cross-entropy: the loss reported and validated.
    pub ce: Tensor,
    /// Mean over routed (layer, step) of the router auxiliary loss, when asked for and the
    /// model has routed steps (docs/DESIGN.md §4.6).
    pub router_aux: Option<Tensor>,
}

impl Model {
    /// A fresh model, initialised from `seed`.
    pub fn new(cfg: &ModelConfig, seed: u64, device: &Device) -> Result<Model> {
        Model::build(cfg, ParamStore::fresh(seed, device), device)
    }

    /// A fresh model in another dtype (F64 for finite-difference checks); same draws as `new`.
    pub fn new_with_dtype(cfg: &ModelConfig, seed: u64, device: &Device, dtype: DType) -> Result<Model> {
        let mut ps = ParamStore::fresh(seed, device);
        ps.dtype = dtype;
        Model::build(cfg, ps, device)
    }

    /// A model from named tensors (checkpoint, safetensors or converted GGUF).
    pub fn from_tensors(
        cfg: &ModelConfig,
        tensors: HashMap<String, Tensor>,
        origin: &str,
        device: &Device,
    ) -> Result<Model> {
        Model::build(cfg, ParamStore::loaded(tensors, origin, device), device)
    }

    /// `from_tensors` for a model read for inference from quantized blocks: the linear weights
    /// named in `blocks_only` have no f32 values (`tensors` lacks them) and get stand-ins until
    /// `set_quantized` gives them their blocks; the model is then as after
    /// `drop_dense_copies`, without ever holding the f32 copies (DESIGN §13).
    pub fn from_tensors_blocks_only(
        cfg: &ModelConfig,
        tensors: HashMap<String, Tensor>,
        blocks_only: std::collections::HashSet<String>,
        origin: &str,
        device: &Device,
    ) -> Result<Model> {
        let dropped = !blocks_only.is_empty();
        let mut ps = ParamStore::loaded(tensors, origin, device);
        if let ParamSource::Loaded { blocks_only: b, .. } = &mut ps.source {
            *b = blocks_only;
        }
        let mut model = Model::build(cfg, ps, device)?;
        model.dense_dropped = dropped;
        Ok(model)
    }

    fn build(cfg: &ModelConfig, mut ps: ParamStore, device: &Device) -> Result<Model> {
        cfg.validate()?;
        let embed = ps.get("embed.weight", &[cfg.vocab_size, cfg.d_model], Init::Normal(cfg.init_std))?;
        let think_layers = cfg.thinking_layers();
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for i in 0..cfg.n_layers {
            let name = format!("layers.{i}");
            let block = Block::load(&mut ps, &name, cfg)?;
            let thinking = if think_layers.contains(&i) {
                Some(ThinkingLayer::load(&mut ps, &format!("{name}.think"), cfg, i)?)
            } else {
                None
            };
            layers.push(Layer { block, thinking });
        }
        let norm = RmsNorm::load(&mut ps, "norm", cfg.d_model, cfg.norm_eps)?;
        let head = if cfg.tie_embeddings {
            None
        } else {
            Some(Linear::load(&mut ps, "head", cfg.vocab_size, cfg.d_model, cfg.init_std)?)
        };
        let (rope_cos, rope_sin) = ops::rope_tables(cfg.max_seq_len, cfg.head_dim(), cfg.rope_theta, device)?;
        let (rope_cos, rope_sin) = (rope_cos.to_dtype(ps.dtype)?, rope_sin.to_dtype(ps.dtype)?);
        let params = ps.finish()?;
        Ok(Model {
            cfg: cfg.clone(),
            embed,
            layers,
            norm,
            head,
            embed_quant: None,
            rope_cos,
            rope_sin,
            params,
            precision: Precision::F32,
            dense_dropped: false,
        })
    }

    pub fn device(&self) -> &Device {
        self.embed.device()
    }

    /// The same model with its weights on `device` (DESIGN §15): a copy of every parameter
    /// there, the precision kept. Quantized products run on the CPU only, so a quantized
    /// model moved to a GPU is dequantized (refused once its f32 copies were freed).
    pub fn to_device(self, device: &Device) -> Result<Model> {
        if self.device().same_device(device) {
            return Ok(self);
        }
        if self.is_quantized() && !device.is_cpu() {
            if self.dense_dropped {
                return Err(Error::usage(
                    "this model's f32 weights were freed after quantized loading, and quantized products run on the CPU only; \
                     load it with --gguf-weights f32 to run it on a GPU",
                ));
            }
            eprintln!(
                "notice: quantized products run on the CPU only; on {device:?} this model runs dense (f32 weights)"
            );
        }
        let tensors = self
            .params
            .iter()
            .map(|(name, var)| Ok((name.clone(), var.as_tensor().detach().to_device(device)?)))
            .collect::<Result<HashMap<_, _>>>()?;
        let mut moved = Model::from_tensors(&self.cfg, tensors, "a model in memory", device)?;
        moved.precision = self.precision;
        Ok(moved)
    }

    pub fn n_params(&self) -> usize {
        self.params.iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// The thinking layers (ITT or Loop), in order.
    pub fn thinking_layers(&self) -> impl Iterator<Item = &ThinkingLayer> {
        self.layers.iter().filter_map(|l| l.thinking.as_ref())
    }

    /// Check routing settings before running them (steps, ratios, thresholds present), so a
    /// request with impossible settings is refused instead of failing a shared batch.
    pub fn check_routing(&self, opts: &RoutingOptions) -> Result<()> {
        for t in self.thinking_layers() {
            t.plan(opts)?;
        }
        if opts.mode == Routing::Threshold && self.has_routers() && opts.calibration.is_none() {
            return Err(Error::usage(
                "threshold routing needs the checkpoint's router thresholds; run `itt calibrate` on it",
            ));
        }
        Ok(())
    }

    /// Steps each layer runs: T for thinking layers, 1 otherwise.
    pub fn layer_steps(&self) -> Vec<usize> {
        self.layers.iter().map(Layer::steps).collect()
    }

    /// An empty KV cache for one sequence.
    pub fn new_cache(&self) -> SeqCache {
        self.new_cache_reserved(0)
    }

    /// Caches whose buffers take room for `tokens` tokens when first written (no growing and
    /// copying while a sequence of that length decodes).
    pub fn new_cache_reserved(&self, tokens: usize) -> SeqCache {
        let slots = self.layer_steps().into_iter().map(|s| (0..s).map(|_| KvCache::with_reserve(tokens)).collect());
        SeqCache { slots: slots.collect(), seen: 0 }
    }

    /// The positions of a call's tokens: the layout and the rotary rows gathered at it.
    pub fn positions(&self, layout: &SeqLayout) -> Result<Positions> {
        let max_pos = layout.positions.iter().copied().max().unwrap_or(0) as usize;
        if max_pos >= self.cfg.max_seq_len {
            return Err(Error::usage(format!(
                "sequence position {max_pos} is past the model's context of {} tokens",
                self.cfg.max_seq_len
            )));
        }
        let pos = Tensor::from_slice(&layout.positions, layout.n_tokens(), self.device())?;
        let rope = RopeAt { cos: self.rope_cos.index_select(&pos, 0)?, sin: self.rope_sin.index_select(&pos, 0)? };
        Ok(Positions { layout: layout.clone(), rope })
    }

    /// Final hidden states (after the last norm): tokens (N,) u32 -> (N, D).
    ///
    /// `caches`, when given, holds one `SeqCache` per sequence of `layout`; keys and values
    /// of this call are appended and `seen` advances. `record` collects routing statistics.
    pub fn forward_hidden(
        &self,
        tokens: &Tensor,
        layout: &SeqLayout,
        routing: &RoutingOptions,
        caches: Option<&mut [SeqCache]>,
        record: Option<&mut ForwardRecord>,
    ) -> Result<Tensor> {
        let mut call =
            Call { pos: self.positions(layout)?, routing, precision: self.precision, caches, record, router_aux: None };
        self.run(tokens, &mut call)
    }

    /// The layers and the final norm over one call: tokens (N,) -> (N, D).
    pub fn run(&self, tokens: &Tensor, call: &mut Call) -> Result<Tensor> {
        let n = call.pos.layout.n_tokens();
        if tokens.dims() != [n] {
            return Err(Error::usage(format!("tokens {:?} do not match the layout's {n} tokens", tokens.dims())));
        }
        if let Some(c) = call.caches.as_deref() {
            if c.len() != call.pos.layout.lens.len() {
                return Err(Error::usage("one cache per packed sequence is needed"));
            }
        }
        let mut x = self.embed.index_select(tokens, 0)?; // (N, D)
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(i, &x, call)?;
        }
        if let Some(c) = call.caches.as_deref_mut() {
            for (seq, &len) in c.iter_mut().zip(&call.pos.layout.lens) {
                seq.seen += len;
            }
        }
        self.norm.forward(&x)
    }

    /// Output logits for hidden states: (N, D) -> (N, V).
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        match (&self.head, &self.embed_quant) {
            (Some(h), _) => h.forward(hidden, self.precision),
            (None, Some(q)) => ops::quant::qlinear(hidden, q),
            (None, None) => ops::linear(hidden, &self.embed, self.precision),
        }
    }

    /// Run the products on quantized weights (DESIGN §13): `quant` maps parameter names
    /// (`layers.{i}.attn.wq.weight`, `head.weight`, `embed.weight` for a tied head) to their
    /// quantized forms, each the same shape as the parameter. Names of other parameters, or a
    /// quantized embedding under an untied head, are refused.
    pub fn set_quantized(&mut self, quant: HashMap<String, Arc<QTensor>>) -> Result<()> {
        for (name, q) in quant {
            let (want, slot) = match name.as_str() {
                "embed.weight" if self.head.is_none() => (self.embed.dims().to_vec(), &mut self.embed_quant),
                _ => match self.linear_mut(&name) {
                    Some(l) => (l.weight.dims().to_vec(), &mut l.quant),
                    None => {
                        return Err(Error::usage(format!(
                            "`{name}` is not a linear layer's weight; it cannot be quantized"
                        )))
                    }
                },
            };
            if q.shape().dims() != want {
                return Err(Error::usage(format!(
                    "quantized `{name}` has shape {:?}, the parameter {want:?}",
                    q.shape().dims()
                )));
            }
            *slot = Some(q);
        }
        Ok(())
    }

    /// Drop the quantized forms: every product in f32 (or bf16) on `weight` again. Refused
    /// once the f32 copies were freed.
    pub fn dequantize(&mut self) -> Result<()> {
        if self.dense_dropped {
            return Err(Error::usage(
                "this model's f32 weights were freed after quantized loading; load it again with f32 weights",
            ));
        }
        self.embed_quant = None;
        for l in self.linears_mut() {
            l.quant = None;
        }
        Ok(())
    }

    /// Free the f32 copies of the linear weights that have quantized forms, for a model that
    /// only runs inference (`itt serve` on a GGUF, DESIGN §13): their products run on the
    /// blocks, so the copies only cost memory (SmolLM2-135M: ~430 MB). The embedding keeps its
    /// f32 values (lookups read them). Each freed weight becomes a zero-stride stand-in of
    /// the same shape, and leaves `params`; `dequantize` is refused from then on, and training
    /// already refuses a quantized model. Returns the bytes freed.
    pub fn drop_dense_copies(&mut self) -> Result<usize> {
        if self.dense_dropped {
            return Ok(0);
        }
        let mut freed_ids = vec![];
        let mut bytes = 0;
        for l in self.linears_mut() {
            if l.quant.is_none() {
                continue;
            }
            let (dims, dtype, device) = (l.weight.dims().to_vec(), l.weight.dtype(), l.weight.device().clone());
            bytes += l.weight.elem_count() * dtype.size_in_bytes();
            freed_ids.push(l.weight.id());
            l.weight = Tensor::zeros(1, dtype, &device)?.broadcast_as(dims)?;
        }
        self.params.retain(|(_, v)| !freed_ids.contains(&v.as_tensor().id()));
        self.dense_dropped = true;
        Ok(bytes)
    }

    /// Whether any product runs on quantized weights. Such a model has no gradients through
    /// them, so training refuses it (DESIGN §13).
    pub fn is_quantized(&self) -> bool {
        self.embed_quant.is_some() || self.linears().any(|l| l.quant.is_some())
    }

    /// The quantized weights' type names and counts, e.g. "Q4_1 x210, Q8_0 x1", or "none".
    pub fn quantized_summary(&self) -> String {
        let mut counts = std::collections::BTreeMap::new();
        let qs = self.linears().filter_map(|l| l.quant.as_ref()).chain(self.embed_quant.as_ref());
        for q in qs {
            *counts.entry(format!("{:?}", q.dtype())).or_insert(0) += 1;
        }
        if counts.is_empty() {
            return "none".into();
        }
        counts.iter().map(|(t, n)| format!("{t} x{n}")).collect::<Vec<_>>().join(", ")
    }

    fn linears(&self) -> impl Iterator<Item = &Linear> {
        self.layers
            .iter()
            .flat_map(|l| {
                let (a, m) = (&l.block.attn, &l.block.mlp);
                [&a.wq, &a.wk, &a.wv, &a.wo, &m.w_gate, &m.w_up, &m.w_down]
            })
            .chain(self.head.as_ref())
    }

    fn linears_mut(&mut self) -> impl Iterator<Item = &mut Linear> {
        self.layers
            .iter_mut()
            .flat_map(|l| {
                let (a, m) = (&mut l.block.attn, &mut l.block.mlp);
                [&mut a.wq, &mut a.wk, &mut a.wv, &mut a.wo, &mut m.w_gate, &mut m.w_up, &mut m.w_down]
            })
            .chain(self.head.as_mut())
    }

    /// The linear layer whose weight is the parameter `name`.
    fn linear_mut(&mut self, name: &str) -> Option<&mut Linear> {
        if name == "head.weight" {
            return self.head.as_mut();
        }
        let rest = name.strip_prefix("layers.")?.strip_suffix(".weight")?;
        let (i, part) = rest.split_once('.')?;
        let b = &mut self.layers.get_mut(i.parse::<usize>().ok()?)?.block;
        Some(match part {
            "attn.wq" => &mut b.attn.wq,
            "attn.wk" => &mut b.attn.wk,
            "attn.wv" => &mut b.attn.wv,
            "attn.wo" => &mut b.attn.wo,
            "mlp.w_gate" => &mut b.mlp.w_gate,
            "mlp.w_up" => &mut b.mlp.w_up,
            "mlp.w_down" => &mut b.mlp.w_down,
            _ => return None,
        })
    }

    /// Logits for every token: (N,) -> (N, V).
    pub fn forward(
        &self,
        tokens: &Tensor,
        layout: &SeqLayout,
        routing: &RoutingOptions,
        caches: Option<&mut [SeqCache]>,
        record: Option<&mut ForwardRecord>,
    ) -> Result<Tensor> {
        self.logits(&self.forward_hidden(tokens, layout, routing, caches, record)?)
    }

    /// Mean next-token cross-entropy of B sequences of T tokens (row-major ids).
    pub fn loss(
        &self,
        inputs: &[u32],
        targets: &[u32],
        b: usize,
        t: usize,
        routing: &RoutingOptions,
        record: Option<&mut ForwardRecord>,
    ) -> Result<Tensor> {
        Ok(self.train_loss(&TokenBatch { inputs, targets, b, t }, routing, record, false)?.ce)
    }

    /// The cross-entropy and, when `router_aux`, the router auxiliary loss of a batch (the
    /// training objective: ce + weight * router_aux, `train::Trainer::step`).
    pub fn train_loss(
        &self,
        batch: &TokenBatch,
        routing: &RoutingOptions,
        record: Option<&mut ForwardRecord>,
        router_aux: bool,
    ) -> Result<TrainLoss> {
        let &TokenBatch { inputs, targets, b, t } = batch;
        let dev = self.device();
        let tokens = Tensor::from_slice(inputs, b * t, dev)?;
        let targets = Tensor::from_slice(targets, b * t, dev)?;
        let mut call = Call {
            pos: self.positions(&SeqLayout::uniform(b, t))?,
            routing,
            precision: self.precision,
            caches: None,
            record,
            router_aux: router_aux.then(Vec::new),
        };
        let hidden = self.run(&tokens, &mut call)?;
        let ce = ops::cross_entropy(&self.logits(&hidden)?, &targets)?;
        let router_aux = match call.router_aux {
            Some(terms) if !terms.is_empty() => {
                let k = terms.len() as f64;
                Some((Tensor::stack(&terms, 0)?.sum_all()? / k)?)
            }
            _ => None,
        };
        Ok(TrainLoss { ce, router_aux })
    }

    /// Whether this model has routers (ITT with adaptive routing).
    pub fn has_routers(&self) -> bool {
        self.thinking_layers().any(|t| !t.routers.is_empty())
    }

    pub fn kind(&self) -> ModelKind {
        self.cfg.thinking.kind
    }
}

#[cfg(test)]
mod tests;
