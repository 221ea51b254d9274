//! Configuration as plain data: serde structs, named presets, derived values as methods.
//!
//! A run's `RunConfig` (model + training) is saved next to every checkpoint with
//! `format_version`, so a checkpoint always says what it is. Presets (DESIGN §2, §4):
//! `tiny`, `small`, `paper-162m`, `paper-230m`, `paper-466m`, each also as `SIZE-loopT` and
//! `SIZE-ittT` for T = 2, 3, 4.

use crate::base::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Number format of the matrix products in `linear` (training and its validation; `f32`
/// elsewhere unless asked). `Bf16` rounds both operands of every product to bfloat16 and sums in
/// f32, in the forward and backward passes, like PyTorch's CPU autocast; everything else (norms,
/// attention, softmax, the optimiser and its master weights) stays f32.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    #[value(alias = "fp32")]
    F32,
    Bf16,
}

impl Precision {
    pub fn is_f32(&self) -> bool {
        *self == Precision::F32
    }

    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        }
    }
}

impl std::str::FromStr for Precision {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" | "fp32" => Ok(Precision::F32),
            "bf16" => Ok(Precision::Bf16),
            _ => Err(Error::usage(format!("unknown precision '{s}' (use f32 or bf16)"))),
        }
    }
}

/// Bumped whenever the meaning of a saved field changes.
pub const CONFIG_FORMAT_VERSION: u32 = 1;
/// Longest context a model may declare (2^20 positions).
pub const MAX_CONTEXT: usize = 1 << 20;
/// Largest vocabulary a model or tokenizer may have (2^24 tokens).
pub const MAX_VOCAB: usize = 1 << 24;
/// Most thinking steps a layer may take (the paper goes to 4).
pub const MAX_STEPS: usize = 64;

/// Which family of model the thinking layers make (DESIGN §3.5).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    /// The plain backbone.
    Dense,
    /// The thinking layers re-run T times on every token: `x_t = f(x_{t-1})`.
    Loop,
    /// Inner Thinking Transformer: routed, accumulated, step-encoded extra steps.
    Itt,
}

/// What the accumulated term holds (DESIGN §3, last bullets): the literal block output
/// `f(x)` of the paper's Eq. 4 (default), or only the block's update `f(x) - x`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ResidualForm {
    Literal,
    Update,
}

/// Which tokens the selected tokens of a routed step attend to (DESIGN §4.1).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum RoutedAttention {
    /// The selected tokens of the same step, as in Mixture-of-Depths.
    #[default]
    Selected,
    /// Every token of the sequence up to their own position, keys and values from every
    /// token's current state (queries, MLP and update still on the selected tokens only).
    All,
}

/// Settings of the thinking layers. Ignored (beyond validation) for `kind = dense`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ThinkingConfig {
    pub kind: ModelKind,
    /// 0-indexed layers that think; `None` = every other layer, 1, 3, 5, ... (DESIGN §2).
    pub layers: Option<Vec<usize>>,
    /// T, the number of steps including the first full pass (the paper's "x4" is T = 4).
    pub steps: usize,
    /// rho_t for t = 2..=T: share of each sequence's tokens selected at each routed step.
    /// Length T - 1. Default 0.7 each (paper Table 2's training setting).
    pub ratios: Vec<f64>,
    /// Residual Thinking Connection: accumulate step outputs (true) or replace the state of
    /// selected tokens (false, the "without RTC" ablation).
    pub residual_connection: bool,
    /// Adaptive Token Routing: routers pick tokens and scale updates (true), or every token
    /// takes every step with weight 1 (false, the "without ATR" ablation).
    pub adaptive_routing: bool,
    /// Thinking Step Encoding: learned per-step vectors phi_t (true) or phi fixed to ones.
    pub step_encoding: bool,
    pub residual_form: ResidualForm,
    /// Initial value of phi_t for t >= 2 (here: small, so a fresh model starts near dense;
    /// DESIGN §3). phi_1 starts at 1.
    pub phi_init: f64,
    /// Standard deviation of the router weights at initialisation.
    pub router_init_std: f64,
    /// alpha, a fixed factor beside the router weight of every routed step: the paper's
    /// alpha^(t) (no value given; docs/DESIGN.md §3.3). 1 leaves the update as it is.
    pub step_scale: f64,
    /// Routers read RMSNorm(x) (unit gain) instead of the raw residual stream, whose scale
    /// grows with depth and training (docs/DESIGN.md §4.4).
    pub router_norm: bool,
    /// What a routed step's selected tokens attend to: `selected` or `all` (DESIGN §4.1).
    pub routed_attention: RoutedAttention,
}

impl Default for ThinkingConfig {
    fn default() -> Self {
        ThinkingConfig {
            kind: ModelKind::Dense,
            layers: None,
            steps: 1,
            ratios: vec![],
            residual_connection: true,
            adaptive_routing: true,
            step_encoding: true,
            residual_form: ResidualForm::Literal,
            phi_init: 0.1,
            router_init_std: 0.02,
            step_scale: 1.0,
            router_norm: false,
            routed_attention: RoutedAttention::Selected,
        }
    }
}

/// The LLaMA-style backbone (DESIGN §2) plus the thinking settings.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub vocab_size: usize,
    pub d_model: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    /// Grouped-query attention: number of key/value heads (divides n_heads).
    pub n_kv_heads: usize,
    /// SwiGLU hidden width.
    pub mlp_hidden: usize,
    /// Longest sequence (context) the model accepts.
    pub max_seq_len: usize,
    pub rope_theta: f64,
    pub norm_eps: f64,
    /// Share the token embedding with the output head (SmolLM2 does; the paper does not).
    pub tie_embeddings: bool,
    /// Std of the normal init of matrices; output projections get std / sqrt(2 n_layers).
    pub init_std: f64,
    #[serde(default)]
    pub thinking: ThinkingConfig,
}

impl ModelConfig {
    pub fn head_dim(&self) -> usize {
        self.d_model / self.n_heads
    }

    /// The layers that think (empty for dense).
    pub fn thinking_layers(&self) -> Vec<usize> {
        if self.thinking.kind == ModelKind::Dense {
            return vec![];
        }
        match &self.thinking.layers {
            Some(l) => l.clone(),
            None => (1..self.n_layers).step_by(2).collect(),
        }
    }

    pub fn validate(&self) -> Result<()> {
        let pos = |name: &str, v: usize| -> Result<()> {
            if v == 0 {
                return Err(Error::config(name, "must be at least 1"));
            }
            Ok(())
        };
        // Upper bounds far above any model this trains (paper-466m: d 2048, 8 layers, vocab
        // 32000), so that sizes derived from a mistyped or damaged config (rotary tables of
        // max_seq_len x head_dim, parameter and FLOP counts, per-layer lists) stay computable.
        for (name, v, max) in [
            ("vocab_size", self.vocab_size, MAX_VOCAB),
            ("d_model", self.d_model, 1 << 16),
            ("n_layers", self.n_layers, 1024),
            ("n_heads", self.n_heads, 1 << 12),
            ("n_kv_heads", self.n_kv_heads, 1 << 12),
            ("mlp_hidden", self.mlp_hidden, 1 << 18),
            ("max_seq_len", self.max_seq_len, MAX_CONTEXT),
            ("thinking.steps", self.thinking.steps, MAX_STEPS),
        ] {
            pos(name, v)?;
            if v > max {
                return Err(Error::config(name, format!("{v} is above the supported {max}")));
            }
        }
        if !self.d_model.is_multiple_of(self.n_heads) {
            return Err(Error::config(
                "n_heads",
                format!("d_model {} is not divisible by n_heads {}", self.d_model, self.n_heads),
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err(Error::config("n_heads", "head dimension must be even for rotary embeddings"));
        }
        if !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return Err(Error::config(
                "n_kv_heads",
                format!("n_heads {} is not a multiple of n_kv_heads {}", self.n_heads, self.n_kv_heads),
            ));
        }
        if !(self.rope_theta > 0.0) {
            return Err(Error::config("rope_theta", "must be positive"));
        }
        if !(self.norm_eps > 0.0) {
            return Err(Error::config("norm_eps", "must be positive"));
        }
        if !(self.init_std > 0.0) {
            return Err(Error::config("init_std", "must be positive"));
        }
        let th = &self.thinking;
        if th.kind == ModelKind::Dense && th.steps != 1 {
            return Err(Error::config("thinking.steps", "a dense model takes exactly 1 step; use kind loop or itt"));
        }
        if th.kind == ModelKind::Itt && th.ratios.len() != th.steps - 1 {
            return Err(Error::config(
                "thinking.ratios",
                format!("needs steps - 1 = {} values (one per routed step), got {}", th.steps - 1, th.ratios.len()),
            ));
        }
        check_ratios("thinking.ratios", &th.ratios)?;
        if let Some(layers) = &th.layers {
            for &l in layers {
                if l >= self.n_layers {
                    return Err(Error::config(
                        "thinking.layers",
                        format!("layer {l} is past the model's last layer {}", self.n_layers - 1),
                    ));
                }
            }
            let mut sorted = layers.clone();
            sorted.sort();
            sorted.dedup();
            if sorted.len() != layers.len() {
                return Err(Error::config("thinking.layers", "a layer is listed twice"));
            }
        }
        if !th.phi_init.is_finite() {
            return Err(Error::config("thinking.phi_init", "must be finite"));
        }
        if !(th.step_scale.is_finite() && th.step_scale > 0.0) {
            return Err(Error::config("thinking.step_scale", "must be a positive number"));
        }
        if !(th.router_init_std >= 0.0 && th.router_init_std.is_finite()) {
            return Err(Error::config("thinking.router_init_std", "must be a non-negative number"));
        }
        if th.kind == ModelKind::Itt && !th.residual_connection && th.residual_form == ResidualForm::Update {
            // x + w (r - x) with r = x + phi (f(x) - x) is x + w phi (f(x) - x): the same formula
            // as the residual connection, so "without RTC" would silently be ITT (DESIGN §4.5).
            return Err(Error::config(
                "thinking.residual_connection",
                "false (the without-RTC ablation) is defined for residual_form literal only; in the update \
                 form replacing the state equals accumulating the update",
            ));
        }
        Ok(())
    }

    /// Parameter count (embedding and head counted separately when untied).
    pub fn n_params(&self) -> usize {
        let d = self.d_model;
        let kv = self.n_kv_heads * self.head_dim();
        let attn = d * d * 2 + d * kv * 2;
        let mlp = 3 * d * self.mlp_hidden;
        let block = attn + mlp + 2 * d;
        let embed = self.vocab_size * d;
        let head = if self.tie_embeddings { 0 } else { self.vocab_size * d };
        let thinking = match self.thinking.kind {
            ModelKind::Itt => {
                self.thinking_layers().len() * (self.thinking.steps - 1) * (d + 1 + d)
                    + self.thinking_layers().len() * d
            }
            _ => 0,
        };
        self.n_layers * block + embed + head + d + thinking
    }
}

/// Ratios must lie in [0, 1].
pub fn check_ratios(field: &str, ratios: &[f64]) -> Result<()> {
    for (i, &r) in ratios.iter().enumerate() {
        if !(0.0..=1.0).contains(&r) {
            return Err(Error::config(field, format!("ratio {} at position {} is outside [0, 1]", r, i + 1)));
        }
    }
    Ok(())
}

/// Optimiser, schedule and bookkeeping of a training run.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Sequences per micro-batch.
    pub batch_size: usize,
    /// Tokens per sequence.
    pub seq_len: usize,
    /// Micro-batches per optimiser step.
    pub grad_accum: usize,
    pub max_steps: usize,
    /// Length of the learning-rate schedule (warm-up + cosine) and of the capacity warm-up when
    /// it is not `max_steps`: a run extended by `itt train --resume --steps N` keeps its
    /// original schedule, and past its end the rate stays at the cosine's final value (a
    /// constant tail), so the steps before the old end are unchanged (DESIGN §14.4). Absent
    /// (the usual case): `max_steps`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule_steps: Option<usize>,
    /// Peak learning rate.
    pub lr: f64,
    /// Final learning rate as a share of the peak (cosine decay ends here; DESIGN §2: 10%).
    pub min_lr_ratio: f64,
    pub warmup_steps: usize,
    /// Decoupled weight decay, applied to matrices (linear weights, embeddings) only.
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Clip the global gradient norm to this; 0 disables.
    pub grad_clip: f64,
    /// Validate every this many steps (and at the end).
    pub eval_interval: usize,
    /// Validation batches per evaluation (0 = the whole validation split).
    pub eval_batches: usize,
    /// Checkpoint every this many steps (and at the end); 0 = only at the end.
    pub checkpoint_interval: usize,
    /// Checkpoints kept on disk (the newest ones).
    pub keep_checkpoints: usize,
    pub log_interval: usize,
    pub seed: u64,
    /// Momentum of the running router-score quantiles used by causal routing (DESIGN §5).
    pub threshold_momentum: f64,
    /// Which parameters the optimiser updates (`all`, or `thinking` to fine-tune only the step
    /// vectors and routers of a model retrofitted from a pretrained one, `itt retrofit`).
    #[serde(skip_serializing_if = "Trainable::is_all")]
    pub trainable: Trainable,
    /// Number format of the matrix products in training and validation: `f32`, or `bf16`
    /// (bf16 operands, f32 sums; [`Precision`]). Left out of files when f32.
    #[serde(skip_serializing_if = "Precision::is_f32")]
    pub precision: Precision,
    /// Learning-rate multiplier of the thinking parameters (routers and step vectors phi_t,
    /// which are never weight-decayed): their own optimiser group (docs/DESIGN.md §4.7).
    pub thinking_lr_scale: f64,
    /// Capacity warm-up: over this share of `max_steps` the routed shares fall linearly from 1
    /// (every token thinks) to the configured ratios (docs/DESIGN.md §4.8). 0 = off.
    pub capacity_warmup: f64,
    /// Weight of the router auxiliary loss (binary cross-entropy of each router logit against
    /// top-k membership, docs/DESIGN.md §4.6) added to the training loss. 0 = off.
    pub router_aux_weight: f64,
    /// What a non-finite loss or gradient norm does: `stop` training with an error (keeping the
    /// last checkpoint), or `skip` the batch (no update; counted in metrics.jsonl). Left out of
    /// files when `stop`.
    #[serde(skip_serializing_if = "OnNonFinite::is_stop")]
    pub on_nonfinite: OnNonFinite,
}

/// What training does with a batch whose loss or gradient norm is NaN or infinite.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum OnNonFinite {
    /// Stop with an error naming the step; the last checkpoint (all finite) stays.
    #[default]
    Stop,
    /// Drop the batch's update (no optimiser step); the data stream still moves on.
    Skip,
}

impl OnNonFinite {
    pub fn is_stop(&self) -> bool {
        *self == OnNonFinite::Stop
    }
}

impl std::str::FromStr for OnNonFinite {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "stop" => Ok(OnNonFinite::Stop),
            "skip" => Ok(OnNonFinite::Skip),
            _ => Err(Error::usage(format!("--on-nonfinite must be stop or skip, not '{s}'"))),
        }
    }
}

/// Which parameters training updates; the others stay frozen (no update, no weight decay, and
/// their gradients are left out of the clipping norm).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Trainable {
    #[default]
    All,
    /// Only the thinking layers' own parameters, `layers.{i}.think.*` (phi_t and routers).
    #[value(alias = "routers")]
    Thinking,
}

impl Trainable {
    pub fn includes(self, name: &str) -> bool {
        match self {
            Trainable::All => true,
            Trainable::Thinking => name.contains(".think."),
        }
    }
    pub fn is_all(&self) -> bool {
        *self == Trainable::All
    }
}

impl std::str::FromStr for Trainable {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "all" => Ok(Trainable::All),
            "thinking" | "routers" => Ok(Trainable::Thinking),
            _ => Err(Error::usage(format!(
                "unknown trainable set '{s}' (use all, or thinking = routers and step vectors)"
            ))),
        }
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            batch_size: 16,
            seq_len: 128,
            grad_accum: 1,
            max_steps: 1000,
            schedule_steps: None,
            lr: 3e-3,
            min_lr_ratio: 0.1,
            warmup_steps: 30,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            grad_clip: 1.0,
            eval_interval: 100,
            eval_batches: 8,
            checkpoint_interval: 0,
            keep_checkpoints: 2,
            log_interval: 10,
            seed: 1337,
            threshold_momentum: 0.95,
            trainable: Trainable::All,
            precision: Precision::F32,
            thinking_lr_scale: 1.0,
            capacity_warmup: 0.0,
            router_aux_weight: 0.0,
            on_nonfinite: OnNonFinite::Stop,
        }
    }
}

impl TrainConfig {
    pub fn validate(&self) -> Result<()> {
        for (name, v) in [
            ("batch_size", self.batch_size),
            ("seq_len", self.seq_len),
            ("grad_accum", self.grad_accum),
            ("log_interval", self.log_interval),
            ("eval_interval", self.eval_interval),
        ] {
            if v == 0 {
                return Err(Error::config(format!("train.{name}"), "must be at least 1"));
            }
            // Keeps tokens per step (batch x length x accumulation) far from overflowing.
            if v > 1 << 20 && matches!(name, "batch_size" | "seq_len" | "grad_accum") {
                return Err(Error::config(format!("train.{name}"), format!("{v} is above the supported {}", 1 << 20)));
            }
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return Err(Error::config("train.lr", "must be a positive number"));
        }
        if !(0.0..=1.0).contains(&self.min_lr_ratio) {
            return Err(Error::config("train.min_lr_ratio", "must be in [0, 1]"));
        }
        if !(0.0..1.0).contains(&self.beta1) || !(0.0..1.0).contains(&self.beta2) {
            return Err(Error::config("train.beta1/beta2", "must be in [0, 1)"));
        }
        if !(self.weight_decay >= 0.0) || !(self.grad_clip >= 0.0) || !(self.eps > 0.0) {
            return Err(Error::config("train.weight_decay/grad_clip/eps", "must be non-negative (eps positive)"));
        }
        if !(0.0..1.0).contains(&self.threshold_momentum) {
            return Err(Error::config("train.threshold_momentum", "must be in [0, 1)"));
        }
        if !(self.thinking_lr_scale > 0.0 && self.thinking_lr_scale.is_finite()) {
            return Err(Error::config("train.thinking_lr_scale", "must be a positive number"));
        }
        if !(0.0..=1.0).contains(&self.capacity_warmup) {
            return Err(Error::config("train.capacity_warmup", "must be a share of max_steps in [0, 1]"));
        }
        if !(self.router_aux_weight >= 0.0 && self.router_aux_weight.is_finite()) {
            return Err(Error::config("train.router_aux_weight", "must be a non-negative number"));
        }
        Ok(())
    }

    /// Routed shares at optimiser step `step` (0-based) under capacity warm-up: from 1 down to
    /// `ratios`, linearly over the first `capacity_warmup * max_steps` steps; `None` once the
    /// warm-up is over (or off), meaning the model's own ratios.
    pub fn capacity_at(&self, step: usize, ratios: &[f64]) -> Option<Vec<f64>> {
        let span = self.capacity_warmup * self.schedule_len() as f64;
        if span <= 0.0 || step as f64 >= span {
            return None;
        }
        let left = 1.0 - step as f64 / span; // 1 at the start, -> 0 at the end of the warm-up
        Some(ratios.iter().map(|&r| if r == 0.0 { 0.0 } else { r + (1.0 - r) * left }).collect())
    }

    /// Steps of the learning-rate and capacity schedules: `schedule_steps`, else `max_steps`.
    pub fn schedule_len(&self) -> usize {
        self.schedule_steps.unwrap_or(self.max_steps)
    }

    /// Tokens per optimiser step.
    pub fn tokens_per_step(&self) -> usize {
        self.batch_size * self.seq_len * self.grad_accum
    }

    /// Learning rate at `step` (0-based): linear warmup, then cosine to `min_lr_ratio * lr`.
    pub fn lr_at(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let decay_steps = self.schedule_len().saturating_sub(self.warmup_steps).max(1);
        let progress = ((step - self.warmup_steps) as f64 / decay_steps as f64).min(1.0);
        let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
        self.lr * (self.min_lr_ratio + (1.0 - self.min_lr_ratio) * cosine)
    }
}

/// The vocabulary size a `null` `model.vocab_size` is read as until the tokenizer gives the
/// real one (what `itt info --config` counts with, having no tokenizer).
pub const OPEN_VOCAB_PLACEHOLDER: usize = 256;

/// Everything that defines a run; saved as `config.json` in the run folder and every checkpoint.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    pub format_version: u32,
    /// The preset this started from, for the record.
    #[serde(default)]
    pub preset: Option<String>,
    pub model: ModelConfig,
    pub train: TrainConfig,
}

impl RunConfig {
    pub fn validate(&self) -> Result<()> {
        if self.format_version != CONFIG_FORMAT_VERSION {
            return Err(Error::config(
                "format_version",
                format!("is {}, this build reads version {}", self.format_version, CONFIG_FORMAT_VERSION),
            ));
        }
        self.model.validate()?;
        self.train.validate()?;
        if self.train.seq_len > self.model.max_seq_len {
            return Err(Error::config(
                "train.seq_len",
                format!("{} exceeds model.max_seq_len {}", self.train.seq_len, self.model.max_seq_len),
            ));
        }
        Ok(())
    }

    /// Read a JSON (or TOML, by extension) config file, rejecting unknown fields.
    pub fn load(path: &Path) -> Result<Self> {
        let (cfg, open) = Self::load_open_vocab(path)?;
        if open {
            return Err(Error::input(path, "model.vocab_size is null here, where no tokenizer gives it; set a number"));
        }
        Ok(cfg)
    }

    /// A config file whose `model.vocab_size` may be `null`: "the tokenizer's", as in the
    /// presets (`itt info --preset P --json` writes it so). Returns the config, the null read
    /// as [`OPEN_VOCAB_PLACEHOLDER`], and whether it was null; the caller sets the real size.
    pub fn load_open_vocab(path: &Path) -> Result<(Self, bool)> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::input(path, format!("cannot read config: {e}")))?;
        let malformed = |e: serde_json::Error| Error::input(path, format!("malformed config: {e}"));
        let value: serde_json::Value = serde_json::from_str(&text).map_err(malformed)?;
        let open = value.get("model").and_then(|m| m.get("vocab_size")).is_some_and(serde_json::Value::is_null);
        let cfg: RunConfig = if open {
            let mut value = value;
            value["model"]["vocab_size"] = OPEN_VOCAB_PLACEHOLDER.into();
            serde_json::from_value(value).map_err(malformed)?
        } else {
            // Parsed from the text again, so that errors keep their line and column.
            serde_json::from_str(&text).map_err(malformed)?
        };
        cfg.validate().map_err(|e| Error::input(path, e.to_string()))?;
        Ok((cfg, open))
    }

    /// The JSON of a preset's config, with `model.vocab_size` null: a preset takes its
    /// vocabulary from the tokenizer it is trained with, and so does a config file saying so.
    pub fn to_json_open_vocab(&self) -> String {
        let mut v = serde_json::to_value(self).expect("config serialises");
        v["model"]["vocab_size"] = serde_json::Value::Null;
        serde_json::to_string_pretty(&v).expect("config serialises")
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("config serialises")
    }
}

/// The backbone sizes (DESIGN §2). `small` is the shape of the CPU speed measurements
/// (docs/PERFORMANCE.md); the paper shapes use heads = d/128 and vocab 32000.
fn size_preset(size: &str) -> Option<(ModelConfig, TrainConfig)> {
    let base = |vocab, d, layers, heads, mlp, ctx| ModelConfig {
        vocab_size: vocab,
        d_model: d,
        n_layers: layers,
        n_heads: heads,
        n_kv_heads: heads,
        mlp_hidden: mlp,
        max_seq_len: ctx,
        rope_theta: 10000.0,
        norm_eps: 1e-5,
        tie_embeddings: false,
        init_std: 0.02,
        thinking: ThinkingConfig::default(),
    };
    let t = TrainConfig::default();
    Some(match size {
        "tiny" => (
            base(512, 128, 4, 4, 352, 256),
            TrainConfig { batch_size: 16, seq_len: 128, max_steps: 600, lr: 3e-3, warmup_steps: 20, ..t },
        ),
        "small" => (
            base(4096, 256, 4, 4, 688, 512),
            TrainConfig { batch_size: 8, seq_len: 256, max_steps: 2000, lr: 2e-3, warmup_steps: 60, ..t },
        ),
        "paper-162m" => (
            base(32000, 1024, 8, 8, 2560, 4096),
            TrainConfig { batch_size: 256, seq_len: 4096, max_steps: 50_000, lr: 3e-4, warmup_steps: 1500, ..t },
        ),
        "paper-230m" => (
            base(32000, 1536, 8, 12, 1536, 4096),
            TrainConfig { batch_size: 256, seq_len: 4096, max_steps: 50_000, lr: 3e-4, warmup_steps: 1500, ..t },
        ),
        "paper-466m" => (
            base(32000, 2048, 8, 16, 4096, 4096),
            TrainConfig { batch_size: 256, seq_len: 4096, max_steps: 50_000, lr: 3e-4, warmup_steps: 1500, ..t },
        ),
        _ => return None,
    })
}

pub const SIZES: [&str; 5] = ["tiny", "small", "paper-162m", "paper-230m", "paper-466m"];

/// All preset names: every size as dense, `-loopT` and `-ittT` for T = 2, 3, 4.
pub fn preset_names() -> Vec<String> {
    let mut names = vec![];
    for s in SIZES {
        names.push(s.to_string());
        for t in 2..=4 {
            names.push(format!("{s}-loop{t}"));
            names.push(format!("{s}-itt{t}"));
        }
    }
    names
}

/// A named preset, e.g. `tiny`, `small-itt4`, `paper-162m-loop4`.
pub fn preset(name: &str) -> Result<RunConfig> {
    let unknown = || Error::config("preset", format!("unknown preset '{name}'; known: {}", preset_names().join(", ")));
    let (size, kind, steps) = if let Some((s, t)) = name.rsplit_once("-itt") {
        (s, ModelKind::Itt, t.parse::<usize>().map_err(|_| unknown())?)
    } else if let Some((s, t)) = name.rsplit_once("-loop") {
        (s, ModelKind::Loop, t.parse::<usize>().map_err(|_| unknown())?)
    } else {
        (name, ModelKind::Dense, 1)
    };
    if kind != ModelKind::Dense && !(2..=4).contains(&steps) {
        return Err(unknown());
    }
    let (mut model, train) = size_preset(size).ok_or_else(unknown)?;
    model.thinking.kind = kind;
    model.thinking.steps = steps;
    if kind == ModelKind::Itt {
        // The recipe search's winner (DESIGN §9, docs/EXPERIMENTS.md "Thinking that does
        // work"): update form with phi 1, 70% shares, routers reading RMSNorm(x). The literal
        // form with phi 0.1 trained routed steps worth ~0.01 nats.
        let th = &mut model.thinking;
        th.ratios = vec![0.7; steps - 1];
        th.residual_form = ResidualForm::Update;
        th.phi_init = 1.0;
        th.router_norm = true;
    }
    let cfg = RunConfig { format_version: CONFIG_FORMAT_VERSION, preset: Some(name.to_string()), model, train };
    cfg.validate()?;
    Ok(cfg)
}

/// The small models of tests: a preset's model with the sizes a test needs set by name, e.g.
/// `TestModel::preset("tiny-itt4").vocab(v).width(32, 48).heads(2, 1).context(64).config()`,
/// instead of a preset's fields assigned one by one in every test file.
#[derive(Clone, Debug)]
pub struct TestModel(ModelConfig);

impl TestModel {
    /// A preset's model; the name must be one of [`preset_names`] (tests name presets that exist).
    pub fn preset(name: &str) -> Self {
        TestModel(preset(name).unwrap_or_else(|e| panic!("{e}")).model)
    }

    /// The tokenizer's vocabulary size.
    pub fn vocab(mut self, vocab_size: usize) -> Self {
        self.0.vocab_size = vocab_size;
        self
    }

    /// Width of the residual stream and of the SwiGLU hidden layer.
    pub fn width(mut self, d_model: usize, mlp_hidden: usize) -> Self {
        (self.0.d_model, self.0.mlp_hidden) = (d_model, mlp_hidden);
        self
    }

    /// Query heads and key/value heads (fewer key/value heads: grouped-query attention).
    pub fn heads(mut self, n_heads: usize, n_kv_heads: usize) -> Self {
        (self.0.n_heads, self.0.n_kv_heads) = (n_heads, n_kv_heads);
        self
    }

    pub fn layers(mut self, n_layers: usize) -> Self {
        self.0.n_layers = n_layers;
        self
    }

    /// The longest sequence the model accepts.
    pub fn context(mut self, max_seq_len: usize) -> Self {
        self.0.max_seq_len = max_seq_len;
        self
    }

    /// Std of the initial matrices: larger than a preset's, a random model's outputs differ
    /// more from token to token.
    pub fn init_std(mut self, std: f64) -> Self {
        self.0.init_std = std;
        self
    }

    /// Std of the initial router weights: larger, a random model's routing decisions differ more.
    pub fn router_init_std(mut self, std: f64) -> Self {
        self.0.thinking.router_init_std = std;
        self
    }

    pub fn config(self) -> ModelConfig {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_preset_is_valid_and_roundtrips() {
        for name in preset_names() {
            let cfg = preset(&name).unwrap();
            let back: RunConfig = serde_json::from_str(&cfg.to_json()).unwrap();
            assert_eq!(back, cfg, "{name}");
        }
        assert!(preset("tiny-itt5").is_err());
        assert!(preset("nope").unwrap_err().to_string().contains("unknown preset"));
    }

    #[test]
    fn itt_presets_carry_the_recipe_and_the_others_the_plain_layer() {
        // DESIGN §9: update form, phi 1, 70% shares, normalised router input.
        for name in ["tiny-itt2", "small-itt4", "paper-162m-itt3"] {
            let th = preset(name).unwrap().model.thinking;
            assert_eq!(th.residual_form, ResidualForm::Update, "{name}");
            assert_eq!(th.phi_init, 1.0, "{name}");
            assert!(th.router_norm, "{name}");
            assert!(th.ratios.iter().all(|&r| r == 0.7), "{name}");
        }
        for name in ["tiny", "tiny-loop4"] {
            assert_eq!(preset(name).unwrap().model.thinking.residual_form, ResidualForm::Literal, "{name}");
        }
    }

    #[test]
    fn paper_parameter_counts_match_table5() {
        // DESIGN §2: 162M / 230M / 466M with untied 32000-token embeddings.
        for (name, want) in [("paper-162m", 162e6), ("paper-230m", 230e6), ("paper-466m", 466e6)] {
            let n = preset(name).unwrap().model.n_params() as f64;
            assert!((n - want).abs() / want < 0.02, "{name}: {n}");
        }
    }

    #[test]
    fn bad_fields_are_named() {
        let mut c = preset("tiny-itt4").unwrap();
        c.model.thinking.ratios = vec![0.5, 1.5, 0.5];
        assert!(c.validate().unwrap_err().to_string().contains("thinking.ratios"));
        c.model.thinking.ratios = vec![0.5];
        assert!(c.validate().unwrap_err().to_string().contains("thinking.ratios"));
        c.model.thinking.ratios = vec![0.5; 3];
        c.model.thinking.layers = Some(vec![9]);
        assert!(c.validate().unwrap_err().to_string().contains("thinking.layers"));
        c.model.thinking.layers = None;
        c.model.thinking.steps = 0;
        assert!(c.validate().unwrap_err().to_string().contains("thinking.steps"));
        let unknown = r#"{"format_version":1,"model":{"bogus":1},"train":{}}"#;
        assert!(serde_json::from_str::<RunConfig>(unknown).unwrap_err().to_string().contains("bogus"));
    }

    #[test]
    fn update_form_without_rtc_is_rejected_and_knobs_are_checked() {
        let mut c = preset("tiny-itt4").unwrap();
        c.model.thinking.residual_form = ResidualForm::Update;
        c.model.thinking.residual_connection = false;
        assert!(c.validate().unwrap_err().to_string().contains("thinking.residual_connection"));
        c.model.thinking.residual_connection = true;
        c.validate().unwrap();
        c.model.thinking.step_scale = 0.0;
        assert!(c.validate().unwrap_err().to_string().contains("thinking.step_scale"));
        c.model.thinking.step_scale = 1.0;
        c.train.capacity_warmup = 1.5;
        assert!(c.validate().unwrap_err().to_string().contains("train.capacity_warmup"));
        c.train.capacity_warmup = 0.2;
        c.train.thinking_lr_scale = -1.0;
        assert!(c.validate().unwrap_err().to_string().contains("train.thinking_lr_scale"));
        c.train.thinking_lr_scale = 3.0;
        c.train.router_aux_weight = f64::NAN;
        assert!(c.validate().unwrap_err().to_string().contains("train.router_aux_weight"));
    }

    #[test]
    fn on_nonfinite_is_left_out_when_stop_and_read_back_when_skip() {
        let mut c = preset("tiny").unwrap();
        assert!(!c.to_json().contains("on_nonfinite"), "default configs stay as they were");
        c.train.on_nonfinite = "skip".parse().unwrap();
        let back: RunConfig = serde_json::from_str(&c.to_json()).unwrap();
        assert_eq!(back.train.on_nonfinite, OnNonFinite::Skip);
        assert!("maybe".parse::<OnNonFinite>().unwrap_err().to_string().contains("stop or skip"));
        let bad = c.to_json().replace("\"skip\"", "\"ignore\"");
        assert!(serde_json::from_str::<RunConfig>(&bad).unwrap_err().to_string().contains("ignore"));
    }

    #[test]
    fn capacity_warmup_falls_linearly_from_one_to_the_ratios() {
        let t = TrainConfig { max_steps: 100, capacity_warmup: 0.2, ..Default::default() };
        let r = [0.5, 0.7, 0.0];
        assert_eq!(t.capacity_at(0, &r), Some(vec![1.0, 1.0, 0.0]));
        let mid = t.capacity_at(10, &r).unwrap();
        assert!((mid[0] - 0.75).abs() < 1e-12 && (mid[1] - 0.85).abs() < 1e-12 && mid[2] == 0.0);
        assert_eq!(t.capacity_at(20, &r), None);
        assert_eq!(TrainConfig::default().capacity_at(0, &r), None);
    }

    #[test]
    fn schedule_warms_up_then_decays_to_floor() {
        let t = TrainConfig { lr: 1.0, warmup_steps: 10, max_steps: 110, min_lr_ratio: 0.1, ..Default::default() };
        assert!((t.lr_at(0) - 0.1).abs() < 1e-12);
        assert!((t.lr_at(9) - 1.0).abs() < 1e-12);
        assert!((t.lr_at(60) - 0.55).abs() < 1e-9);
        assert!((t.lr_at(110) - 0.1).abs() < 1e-12);
    }
}
