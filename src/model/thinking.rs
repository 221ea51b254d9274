//! The thinking layer: Inner Thinking Transformer (ITT) and Loop (docs/DESIGN.md §3–§5).
//!
//! Paper: Chen et al., "Inner Thinking Transformer", arXiv 2502.13842, §3 (Eqs. 3–6).
//! `f` is a whole decoder block, residual paths included (`Block::forward`), `x0` its input,
//! T the number of steps, rho_t the share of a sequence's tokens selected at step t, phi_t a
//! learned vector of size D, R_t a router Linear(D -> 1), alpha a fixed step scale. This file
//! implements (DESIGN §3, each line's function in brackets)
//!
//! ```text
//! x1 = phi_1 * f(x0)                                 step 1, every token    [first_step]
//! for t in 2..=T:                                                           [forward]
//!     w   = sigmoid(R_t(x_{t-1}))                     one router a step      [Router::logits]
//!     S   = top ceil(rho_t * n) tokens of w           per sequence           [select]
//!     y   = f(x_{t-1}[S])                             selected tokens only   [apply_step]
//!     x_t = x_{t-1};  x_t[S] += alpha * w[S] * (phi_t * y)                   [apply_step]
//! return x_T
//! ```
//!
//! The three components and their switches (config `thinking.*`, DESIGN §3.1–§3.3):
//! - Residual Thinking Connection (RTC, `residual_connection`): the accumulation above; the
//!   literal Eq. 4 sums block outputs, x_T = sum_t phi_t * f(x_{t-1}).
//! - Thinking Step Encoding (TSE, `step_encoding`): the vectors phi_t; off = phi fixed to 1.
//! - Adaptive Token Routing (ATR, `adaptive_routing`): routers and top-k; the router learns
//!   through `w` scaling the update, and optionally through an auxiliary loss (DESIGN §4.6).
//!   Off = every token takes every step with weight 1.
//!
//! Choices the paper leaves open (DESIGN §4):
//! - Attention inside a routed step (§4.1): selected tokens attend causally to the selected
//!   tokens of the same sequence and step, at their original rotary positions.
//! - Residual form (§4.2, `residual_form`): `literal` accumulates f(x) as Eq. 4 writes it;
//!   `update` accumulates only the block's update f(x) - x: x1 = x0 + phi_1 * (f(x0) - x0) and
//!   x_t[S] += alpha * w * phi_t * (y - x_{t-1}[S]).
//! - Initialisation (§4.3): phi_1 = 1, phi_t = `phi_init` for t >= 2; routers N(0,
//!   `router_init_std`), bias 0.
//! - Router input (§4.4, `router_norm`): the raw residual stream x, or RMSNorm(x) without gain.
//! - Without RTC (§4.5, Table 3 ablation; literal form only): the selected tokens' state is
//!   *replaced*, moved to r = phi_t * y by the weight: x_t[S] = x[S] + alpha * w * (r - x[S]).
//!   In the update form replacement and accumulation are the same formula, so the config
//!   rejects that pair. phi_t starts at 1 in this ablation.
//! - k = ceil(rho * n) with a 1e-9 guard so 0.7 * 10 selects 7, not 8; ties in the router
//!   score break towards the earlier position, so selection is deterministic.
//! - Causal routing (§5, not in the paper): mode `Threshold` selects token i at step t iff its
//!   router logit exceeds tau_t, the (1 - rho_t) quantile of router logits tracked during
//!   training (`RouterCalibration`); cached decoding then equals the full pass.
//! - Elastic inference (§6): `RoutingOptions` may override the ratios and use fewer steps; a
//!   ratio of 0 skips that step. `early_exit` e: a token whose router weight at step t is
//!   below e takes neither step t nor any later step.
//!
//! Loop xT (DESIGN §3.5) shares this file: x_t = f(x_{t-1}) on every token, no router, phi or
//! accumulation.

use super::{Block, Call, Init, ParamStore, Routed};
use crate::base::config::{ModelConfig, ModelKind, ResidualForm, RoutedAttention};
use crate::{Error, Result};
use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;

use super::SeqLayout;

/// How many steps past the trained T a call may run (extended thinking at inference, DESIGN §6).
pub const MAX_EXTRA_STEPS: usize = 4;

/// R_t: Linear(D -> 1) with bias; its sigmoid is the router weight w.
#[derive(Clone, Debug)]
pub struct Router {
    pub weight: Tensor, // (1, D)
    pub bias: Tensor,   // (1,)
    /// `router_norm`: the input is RMSNorm(x) with unit gain (D,) and this epsilon.
    pub norm: Option<(Tensor, f64)>,
}

impl Router {
    /// Router logits for every token: (N, D) -> (N, 1).
    pub fn logits(&self, x: &Tensor) -> Result<Tensor> {
        match &self.norm {
            Some((gain, eps)) => {
                crate::ops::router_logits(&crate::ops::rms_norm(x, gain, *eps)?, &self.weight, &self.bias)
            }
            None => crate::ops::router_logits(x, &self.weight, &self.bias),
        }
    }
}

#[derive(Clone, Debug)]
pub struct ThinkingLayer {
    /// Index of this layer in the model.
    pub layer: usize,
    pub kind: ModelKind,
    /// T, steps including the first full pass.
    pub steps: usize,
    /// phi_t for t = 1..=T, each (D,); empty when step encoding is off (phi = 1).
    pub phis: Vec<Tensor>,
    /// R_t for t = 2..=T; empty without adaptive routing (and for Loop).
    pub routers: Vec<Router>,
    /// The trained rho_t for t = 2..=T.
    pub ratios: Vec<f64>,
    pub residual_connection: bool,
    pub residual_form: ResidualForm,
    /// alpha, the fixed factor beside the router weight of every routed step (DESIGN §3.3).
    pub step_scale: f64,
    /// What the selected tokens of a routed step attend to (DESIGN §4.1).
    pub routed_attention: RoutedAttention,
}

/// Which rule picks the tokens of a routed step (DESIGN §5).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Routing {
    /// The paper's per-sequence top-k; not causal. Training and full-text scoring.
    #[default]
    #[value(name = "topk")]
    TopK,
    /// Causal: a token takes a step iff its router logit exceeds the calibrated threshold.
    #[value(alias = "causal")]
    Threshold,
}

impl std::str::FromStr for Routing {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "topk" => Ok(Routing::TopK),
            "threshold" | "causal" => Ok(Routing::Threshold),
            _ => Err(Error::usage(format!("unknown routing mode '{s}' (use topk or threshold)"))),
        }
    }
}

/// Selected packed token indices per (layer, step).
pub type Selections = BTreeMap<(usize, usize), Vec<u32>>;

/// Per-call routing settings: the request's state, passed in, never stored in the model.
#[derive(Clone, Debug, Default)]
pub struct RoutingOptions {
    pub mode: Routing,
    /// Needed for `Threshold` routing: the checkpoint's tracked router quantiles.
    pub calibration: Option<Arc<RouterCalibration>>,
    /// Elastic ratios for t = 2..=steps (DESIGN §6); `None` = the trained ratios.
    pub ratios: Option<Vec<f64>>,
    /// Elastic number of steps (at most the trained T); `None` = T.
    pub steps: Option<usize>,
    /// A token whose router weight falls below this value takes no further step (this one included).
    pub early_exit: Option<f32>,
    /// Use these selections (packed token indices per (layer, step)) instead of routing:
    /// holds selection fixed, e.g. for finite-difference gradient checks.
    pub forced: Option<Arc<Selections>>,
}

/// Statistics of one (layer, step), accumulated over calls.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct StepStats {
    /// Tokens that took this step.
    pub selected: u64,
    /// Tokens that could have (the layer's tokens in the calls).
    pub candidates: u64,
    pub logit_sum: f64,
    pub logit_sqsum: f64,
    /// Router weight w = sigmoid(logit), over all candidates.
    pub weight_sum: f64,
    pub weight_sqsum: f64,
    /// Router weight summed over the selected tokens only.
    pub selected_weight_sum: f64,
    /// Sum over calls of |S_t ∩ S_{t-1}| / |S_t| numerators (overlap with the previous step).
    pub overlap_with_prev: u64,
    /// With `ForwardRecord::measure`: squared norms, summed over the selected tokens of the
    /// measured calls, of what the step added (alpha * w * phi_t * delta) and of the state it
    /// was added to (x_{t-1}[S]); `contribution` is the square root of their ratio.
    pub update_sqsum: f64,
    pub state_sqsum: f64,
}

impl StepStats {
    /// Add another call's (or window's) statistics to these.
    pub fn merge(&mut self, o: &StepStats) {
        self.selected += o.selected;
        self.candidates += o.candidates;
        self.logit_sum += o.logit_sum;
        self.logit_sqsum += o.logit_sqsum;
        self.weight_sum += o.weight_sum;
        self.weight_sqsum += o.weight_sqsum;
        self.selected_weight_sum += o.selected_weight_sum;
        self.overlap_with_prev += o.overlap_with_prev;
        self.update_sqsum += o.update_sqsum;
        self.state_sqsum += o.state_sqsum;
    }
    pub fn share(&self) -> f64 {
        if self.candidates == 0 {
            0.0
        } else {
            self.selected as f64 / self.candidates as f64
        }
    }
    pub fn weight_mean(&self) -> f64 {
        if self.candidates == 0 {
            0.0
        } else {
            self.weight_sum / self.candidates as f64
        }
    }
    pub fn weight_std(&self) -> f64 {
        if self.candidates == 0 {
            return 0.0;
        }
        let m = self.weight_mean();
        (self.weight_sqsum / self.candidates as f64 - m * m).max(0.0).sqrt()
    }
    /// Mean router weight of the tokens that took the step.
    pub fn weight_mean_selected(&self) -> Option<f64> {
        (self.selected > 0).then(|| self.selected_weight_sum / self.selected as f64)
    }
    /// Mean router weight of the tokens passed over.
    pub fn weight_mean_passed(&self) -> Option<f64> {
        let n = self.candidates - self.selected;
        (n > 0).then(|| (self.weight_sum - self.selected_weight_sum) / n as f64)
    }
    /// ||alpha w phi_t delta|| / ||x_{t-1}|| over the selected tokens, when measured.
    pub fn contribution(&self) -> Option<f64> {
        (self.state_sqsum > 0.0).then(|| (self.update_sqsum / self.state_sqsum).sqrt())
    }
    pub fn overlap_prev(&self) -> f64 {
        if self.selected > 0 {
            self.overlap_with_prev as f64 / self.selected as f64
        } else {
            0.0
        }
    }
}

/// What the thinking layers did: statistics accumulated over calls, and optionally the raw
/// router logits (for calibration) and the last call's per-token detail (for depth maps).
#[derive(Clone, Debug, Default)]
pub struct ForwardRecord {
    /// Keep every router logit seen, per (layer, step), until taken.
    pub keep_scores: bool,
    /// Keep the last call's selections and per-token depths.
    pub keep_detail: bool,
    /// Measure each routed step's contribution (`StepStats::contribution`); a few extra
    /// reductions over the selected rows, so training asks for it at log steps only.
    pub measure: bool,
    pub stats: BTreeMap<(usize, usize), StepStats>,
    pub scores: BTreeMap<(usize, usize), Vec<f32>>,
    /// Last call: selected packed token indices per (layer, step).
    pub selections: BTreeMap<(usize, usize), Vec<u32>>,
    /// Last call: steps taken by each token, per thinking layer.
    pub depth: BTreeMap<usize, Vec<u32>>,
    /// Last call: router weight of each token, per (layer, step) (0 where not evaluated).
    pub weights: BTreeMap<(usize, usize), Vec<f32>>,
}

impl ForwardRecord {
    pub fn with_scores() -> Self {
        ForwardRecord { keep_scores: true, ..Default::default() }
    }
    pub fn with_detail() -> Self {
        ForwardRecord { keep_detail: true, ..Default::default() }
    }
    /// Tokens actually run through the block, summed over layers and steps >= 2.
    pub fn routed_tokens(&self) -> u64 {
        self.stats.values().map(|s| s.selected).sum()
    }
    /// Fold another record's statistics into this one.
    pub fn merge_stats(&mut self, other: &ForwardRecord) {
        for (k, s) in &other.stats {
            self.stats.entry(*k).or_default().merge(s);
        }
    }
}

/// The tokens a routed step picked, with every token's router logit and weight (host copies),
/// and the logits as a node whose only inputs with gradients are the router's (x detached).
struct Route {
    selected: Vec<u32>,
    logits: Vec<f32>,
    weights: Vec<f32>,
    router_logits: Tensor, // (N, 1)
}

/// Per-token bookkeeping across one layer's steps.
struct Walk {
    /// Steps taken so far by each token.
    depth: Vec<u32>,
    /// Tokens still eligible for further steps (early exit).
    alive: Vec<bool>,
    /// The previous routed step's selection (None before the first).
    prev: Option<Vec<u32>>,
}

impl ThinkingLayer {
    pub(super) fn load(ps: &mut ParamStore, name: &str, cfg: &ModelConfig, layer: usize) -> Result<Self> {
        let th = &cfg.thinking;
        let d = cfg.d_model;
        let is_itt = th.kind == ModelKind::Itt;
        let mut phis = vec![];
        let mut routers = vec![];
        if is_itt && th.step_encoding {
            let later = if th.residual_connection { th.phi_init } else { 1.0 };
            for t in 1..=th.steps {
                let init = if t == 1 { 1.0 } else { later };
                phis.push(ps.get(&format!("{name}.phi.{t}"), &[d], Init::Const(init))?);
            }
        }
        if is_itt && th.adaptive_routing {
            let norm = if th.router_norm { Some((Tensor::ones(d, ps.dtype, &ps.device)?, cfg.norm_eps)) } else { None };
            for t in 2..=th.steps {
                routers.push(Router {
                    weight: ps.get(&format!("{name}.router.{t}.weight"), &[1, d], Init::Normal(th.router_init_std))?,
                    bias: ps.get(&format!("{name}.router.{t}.bias"), &[1], Init::Const(0.0))?,
                    norm: norm.clone(),
                });
            }
        }
        Ok(ThinkingLayer {
            layer,
            kind: th.kind,
            steps: th.steps,
            phis,
            routers,
            ratios: if is_itt { th.ratios.clone() } else { vec![] },
            residual_connection: th.residual_connection,
            residual_form: th.residual_form,
            step_scale: th.step_scale,
            routed_attention: th.routed_attention,
        })
    }

    /// phi_t (1-based t), or None when step encoding is off (phi = 1).
    /// Steps past the trained T (extended thinking at inference) reuse the last step's.
    fn phi(&self, t: usize) -> Option<&Tensor> {
        self.phis.get(t - 1).or(if t > self.steps { self.phis.last() } else { None })
    }

    /// R_t; steps past the trained T reuse the last router (DESIGN §6).
    fn router(&self, t: usize) -> Option<&Router> {
        self.routers.get(t - 2).or(if t > self.steps { self.routers.last() } else { None })
    }

    /// Steps and ratios in effect for this call (elastic inference, DESIGN §6).
    pub(crate) fn plan(&self, opts: &RoutingOptions) -> Result<(usize, Vec<f64>)> {
        let steps = opts.steps.unwrap_or(self.steps);
        let most = MAX_EXTRA_STEPS + self.steps;
        if steps < 1 || steps > most {
            return Err(Error::usage(format!(
                "steps must be between 1 and {most} (the trained {} plus up to {MAX_EXTRA_STEPS} extended ones), got {steps}",
                self.steps
            )));
        }
        if self.kind == ModelKind::Loop || self.routers.is_empty() {
            // Loop, and ITT without routing: every token takes every step.
            return Ok((steps, vec![1.0; steps - 1]));
        }
        let ratios = match &opts.ratios {
            Some(r) => {
                if r.len() != steps - 1 {
                    return Err(Error::usage(format!(
                        "--ratios needs {} values (one per routed step of {steps} steps), got {}",
                        steps - 1,
                        r.len()
                    )));
                }
                crate::base::config::check_ratios("--ratios", r)?;
                r.clone()
            }
            // Extended steps take the last trained step's share.
            None => (2..=steps).map(|t| self.ratios[(t - 2).min(self.ratios.len() - 1)]).collect(),
        };
        Ok((steps, ratios))
    }

    /// Run the layer's T steps on x0: (N, D) -> (N, D).
    pub fn forward(&self, block: &Block, x0: &Tensor, call: &mut Call) -> Result<Tensor> {
        let (steps, ratios) = self.plan(call.routing)?;
        let n = call.pos.layout.n_tokens();
        let mut x = self.first_step(block, x0, call)?;
        let mut walk = Walk { depth: vec![1; n], alive: vec![true; n], prev: None };
        for t in 2..=steps {
            if self.kind == ModelKind::Loop {
                // Loop xT: x_t = f(x_{t-1}) on every token.
                let prec = call.precision;
                let (pos, slot) = call.pos_and_slot(self.layer, t - 1);
                x = block.forward(&x, pos, prec, slot)?;
                walk.depth.iter_mut().for_each(|d| *d += 1);
                continue;
            }
            let rho = ratios[t - 2];
            if rho == 0.0 {
                continue; // a skipped step (e.g. 90/90/0)
            }
            let Some(router) = self.router(t) else {
                // No ATR: every token, weight 1.
                let prec = call.precision;
                let (pos, slot) = call.pos_and_slot(self.layer, t - 1);
                let y = block.forward(&x, pos, prec, slot)?;
                x = (&x + self.delta(&x, &y, None, t)?)?;
                walk.depth.iter_mut().for_each(|d| *d += 1);
                continue;
            };
            let route = self.select(router, &x, t, rho, call, &mut walk)?;
            if let Some(aux) = call.router_aux.as_mut() {
                aux.push(router_aux_term(&route.router_logits, &route.selected)?);
            }
            if let Some(rec) = call.record.as_deref_mut() {
                self.record_step(rec, t, &route, &walk);
            }
            for &i in &route.selected {
                walk.depth[i as usize] += 1;
            }
            if !route.selected.is_empty() {
                x = self.apply_step(block, router, &x, t, &route.selected, call)?;
            } else if self.routed_attention == RoutedAttention::All {
                // Later tokens attend to these ones at this step: cache them all the same.
                let prec = call.precision;
                if let (pos, Some(slot)) = call.pos_and_slot(self.layer, t - 1) {
                    block.attn.cache_only(&block.attn_norm.forward(&x)?, pos, prec, slot)?;
                }
            }
            walk.prev = Some(route.selected);
        }
        if let Some(rec) = call.record.as_deref_mut() {
            if rec.keep_detail {
                rec.depth.insert(self.layer, walk.depth);
            }
        }
        Ok(x)
    }

    /// Step 1, every token: x1 = phi_1 * f(x0) (literal) or x0 + phi_1 * (f(x0) - x0) (update).
    fn first_step(&self, block: &Block, x0: &Tensor, call: &mut Call) -> Result<Tensor> {
        let prec = call.precision;
        let (pos, slot) = call.pos_and_slot(self.layer, 0);
        let f0 = block.forward(x0, pos, prec, slot)?;
        Ok(match (self.kind, self.phi(1), self.residual_form) {
            (ModelKind::Loop, _, _) | (_, None, _) => f0,
            (_, Some(phi), ResidualForm::Literal) => crate::ops::scale_columns(&f0, phi)?,
            (_, Some(phi), ResidualForm::Update) => (x0 + (f0 - x0)?.broadcast_mul(phi)?)?,
        })
    }

    /// Which tokens take step t: every token's router logit (outside the graph: selection and
    /// statistics only), then top-k per sequence or the causal threshold, among the tokens
    /// that early exit has not stopped.
    fn select(&self, router: &Router, x: &Tensor, t: usize, rho: f64, call: &Call, walk: &mut Walk) -> Result<Route> {
        let opts = call.routing;
        let lens = &call.pos.layout.lens;
        let router_logits = router.logits(&x.detach())?; // (N, 1)
        let logits: Vec<f32> = router_logits.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
        let weights: Vec<f32> = logits.iter().map(|&z| 1.0 / (1.0 + (-z).exp())).collect();
        if let Some(e) = opts.early_exit {
            // This step's weight decides this step already (DESIGN §6).
            for (a, &wi) in walk.alive.iter_mut().zip(&weights) {
                if wi < e {
                    *a = false;
                }
            }
        }
        let selected = match opts.forced.as_ref().and_then(|f| f.get(&(self.layer, t))) {
            Some(sel) => sel.clone(),
            None => match opts.mode {
                Routing::TopK => select_topk(&logits, lens, rho, &walk.alive),
                Routing::Threshold => {
                    let cal = opts.calibration.as_ref().ok_or_else(|| {
                        Error::usage(
                            "threshold routing needs router thresholds; this checkpoint has none \
                             (train it with this version, or run `itt calibrate --checkpoint PATH --data TEXT`)",
                        )
                    })?;
                    let tau = cal.threshold(self.layer, t.min(self.steps), rho)?;
                    select_threshold(&logits, lens, tau, &walk.alive)
                }
            },
        };
        Ok(Route { selected, logits, weights, router_logits })
    }

    /// Fold one routed step into the record's statistics (and detail, when kept).
    fn record_step(&self, rec: &mut ForwardRecord, t: usize, route: &Route, walk: &Walk) {
        let key = (self.layer, t);
        let s = rec.stats.entry(key).or_default();
        s.selected += route.selected.len() as u64;
        s.candidates += route.logits.len() as u64;
        for (&z, &wi) in route.logits.iter().zip(&route.weights) {
            s.logit_sum += z as f64;
            s.logit_sqsum += (z as f64) * (z as f64);
            s.weight_sum += wi as f64;
            s.weight_sqsum += (wi as f64) * (wi as f64);
        }
        s.selected_weight_sum += route.selected.iter().map(|&i| route.weights[i as usize] as f64).sum::<f64>();
        if let Some(prev) = &walk.prev {
            s.overlap_with_prev += sorted_intersection(prev, &route.selected) as u64;
        }
        if rec.keep_scores {
            rec.scores.entry(key).or_default().extend_from_slice(&route.logits);
        }
        if rec.keep_detail {
            rec.selections.insert(key, route.selected.clone());
            rec.weights.insert(key, route.weights.clone());
        }
    }

    /// Run the block on the selected tokens (causal among themselves, at their own positions)
    /// and add the scaled result to their state.
    fn apply_step(
        &self,
        block: &Block,
        router: &Router,
        x: &Tensor,
        t: usize,
        selected: &[u32],
        call: &mut Call,
    ) -> Result<Tensor> {
        let sub = call.pos.select(selected)?;
        let xs = crate::ops::gather_rows(x, selected)?; // (M, D)

        // The selected tokens' weights w = sigmoid(R(x)), recomputed from their gathered rows:
        // the same dot products, and only these M logits reach the loss, so the router's
        // gradient reaches x through the gather's M rows instead of an (N, D) outer product
        // summed into x's gradient. Computed before the block runs, while the gathered rows
        // are still in cache (after it, this read was ~2x slower).
        let mut ws = candle_nn::ops::sigmoid(&router.logits(&xs)?)?; // (M, 1)
        if self.step_scale != 1.0 {
            ws = (ws * self.step_scale)?;
        }
        let prec = call.precision;
        let y = match self.routed_attention {
            RoutedAttention::Selected => block.forward(&xs, &sub, prec, call.slot(self.layer, t - 1))?,
            RoutedAttention::All => {
                let (pos, slot) = call.pos_and_slot(self.layer, t - 1);
                block.forward_routed(x, &xs, Routed { rows: selected, pos: &sub }, pos, prec, slot)?
            }
        };
        let (x_new, update) = match (self.residual_connection, self.residual_form, self.phi(t)) {
            // The default ITT forms in one node: x[S] += (delta * phi_t) * (alpha w[S]).
            (true, form, Some(phi)) => {
                let delta = match form {
                    ResidualForm::Literal => y,
                    ResidualForm::Update => (&y - &xs)?,
                };
                let measured = match call.record.as_deref() {
                    Some(r) if r.measure => Some(delta.detach().broadcast_mul(phi)?.broadcast_mul(&ws.detach())?),
                    _ => None,
                };
                (crate::ops::routed_update(x, selected, &delta, phi, &ws)?, measured)
            }
            _ => {
                let idx = Tensor::from_slice(selected, selected.len(), x.device())?;
                let delta = self.delta(&xs, &y, Some(&ws), t)?;
                let measured = call.record.as_deref().filter(|r| r.measure).map(|_| delta.detach());
                (x.index_add(&idx, &delta, 0)?, measured)
            }
        };
        if let (Some(u), Some(rec)) = (update, call.record.as_deref_mut()) {
            let sq = |z: &Tensor| -> Result<f64> { Ok(z.sqr()?.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?) };
            let s = rec.stats.entry((self.layer, t)).or_default();
            s.update_sqsum += sq(&u)?;
            s.state_sqsum += sq(&xs.detach())?;
        }
        Ok(x_new)
    }

    /// The amount added to the selected tokens' state at step t on the composed paths (no
    /// step encoding, or no RTC; see the header). xs: (M, D) their state, y = f(xs): (M, D),
    /// w: (M, 1) already scaled by alpha, or None for weight 1 (no ATR; alpha applied here).
    fn delta(&self, xs: &Tensor, y: &Tensor, w: Option<&Tensor>, t: usize) -> Result<Tensor> {
        let weighted = |z: Tensor| -> Result<Tensor> {
            Ok(match w {
                Some(w) => z.broadcast_mul(w)?,
                None if self.step_scale != 1.0 => (z * self.step_scale)?,
                None => z,
            })
        };
        let phi_times = |z: Tensor| -> Result<Tensor> {
            Ok(match self.phi(t) {
                Some(phi) => z.broadcast_mul(phi)?,
                None => z,
            })
        };
        if self.residual_connection {
            match self.residual_form {
                ResidualForm::Literal => weighted(phi_times(y.clone())?),
                ResidualForm::Update => weighted(phi_times((y - xs)?)?),
            }
        } else {
            // Replacement (literal form only, checked by the config): x <- x + alpha w (phi y - x).
            weighted((phi_times(y.clone())? - xs)?)
        }
    }
}

/// The router auxiliary loss of one routed step (DESIGN §4.6, as Mixture-of-Recursions does):
/// the mean binary cross-entropy of every token's router logit z (N, 1) against whether the
/// step selected it, log(1 + e^z) - [selected] * z. The logits were computed from x detached,
/// so this loss trains the router alone (teaching it to score as top-k selects, which is also
/// what causal threshold routing needs), not the representation.
fn router_aux_term(z: &Tensor, selected: &[u32]) -> Result<Tensor> {
    let n = z.dim(0)?;
    let mut target = vec![0f32; n];
    for &i in selected {
        target[i as usize] = 1.0;
    }
    let target = Tensor::from_vec(target, (n, 1), z.device())?.to_dtype(z.dtype())?;
    // softplus(z) = max(z, 0) + log(1 + e^-|z|), stable for any z.
    let softplus = (z.relu()? + ((z.abs()?.neg()?.exp()? + 1.0)?.log()?))?;
    Ok((softplus - (z * target)?)?.mean_all()?)
}

/// Per sequence, the ceil(rho * n) alive tokens with the highest router logits; ties go to
/// the earlier position. Returns packed indices, ascending (so causal order is kept).
pub fn select_topk(logits: &[f32], lens: &[usize], rho: f64, alive: &[bool]) -> Vec<u32> {
    let mut out = Vec::new();
    let mut start = 0;
    for &n in lens {
        let k = ((rho * n as f64 - 1e-9).ceil().max(0.0) as usize).min(n);
        let mut cand: Vec<usize> = (start..start + n).filter(|&i| alive[i]).collect();
        // Descending logit, then ascending index: a total order, so the k first are one set
        // whatever the algorithm, and partitioning (linear time) finds the same set a sort would.
        if k < cand.len() {
            if k > 0 {
                cand.select_nth_unstable_by(k - 1, |&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
            }
            cand.truncate(k);
        }
        cand.sort_unstable();
        out.extend(cand.into_iter().map(|i| i as u32));
        start += n;
    }
    out
}

/// Causal selection: every alive token whose logit exceeds `tau`.
pub fn select_threshold(logits: &[f32], lens: &[usize], tau: f32, alive: &[bool]) -> Vec<u32> {
    let n: usize = lens.iter().sum();
    (0..n).filter(|&i| alive[i] && logits[i] > tau).map(|i| i as u32).collect()
}

/// The layout of the selected tokens: per-sequence counts and their original positions.
pub fn sub_layout(layout: &SeqLayout, selected: &[u32]) -> SeqLayout {
    let mut lens = vec![0usize; layout.lens.len()];
    let mut seq = 0;
    let starts = layout.starts();
    for &i in selected {
        while seq + 1 < starts.len() && (i as usize) >= starts[seq + 1] {
            seq += 1;
        }
        lens[seq] += 1;
    }
    SeqLayout { lens, positions: selected.iter().map(|&i| layout.positions[i as usize]).collect() }
}

fn sorted_intersection(a: &[u32], b: &[u32]) -> usize {
    let (mut i, mut j, mut c) = (0, 0, 0);
    while i < a.len() && j < b.len() {
        match a[i].cmp(&b[j]) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => {
                c += 1;
                i += 1;
                j += 1;
            }
        }
    }
    c
}

/// Running quantiles of router logits per (layer, step), tracked during training, so that
/// causal routing can select any share rho at inference (DESIGN §5, §6).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RouterCalibration {
    /// Quantiles stored at levels k / `levels`, k = 0..=levels.
    pub levels: usize,
    pub updates: u64,
    pub entries: Vec<CalibrationEntry>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CalibrationEntry {
    pub layer: usize,
    pub step: usize,
    pub quantiles: Vec<f32>,
}

impl RouterCalibration {
    pub fn new() -> Self {
        RouterCalibration { levels: 100, updates: 0, entries: vec![] }
    }

    /// Fold in the router logits a record kept (`keep_scores`), then clear them:
    /// q <- m q + (1 - m) q_batch (the first update sets q).
    pub fn update(&mut self, record: &mut ForwardRecord, momentum: f64) {
        let batch = self.batch_quantiles(record);
        self.fold(batch, momentum);
    }

    /// The quantiles of one micro-batch's router logits per (layer, step), taken out of the
    /// record. Split from [`Self::fold`] so that data-parallel ranks can exchange them and fold
    /// every micro-batch in the single process's order (DESIGN §14).
    pub fn batch_quantiles(&self, record: &mut ForwardRecord) -> Vec<CalibrationEntry> {
        let mut out = vec![];
        for ((layer, step), mut scores) in std::mem::take(&mut record.scores) {
            if scores.is_empty() {
                continue;
            }
            scores.sort_by(|a, b| a.total_cmp(b));
            let quantiles =
                (0..=self.levels).map(|k| quantile_sorted(&scores, k as f64 / self.levels as f64)).collect();
            out.push(CalibrationEntry { layer, step, quantiles });
        }
        out
    }

    /// q <- m q + (1 - m) q_batch for each entry of one micro-batch (the first sets q).
    pub fn fold(&mut self, batch: Vec<CalibrationEntry>, momentum: f64) {
        for b in batch {
            match self.entries.iter_mut().find(|e| e.layer == b.layer && e.step == b.step) {
                Some(e) => {
                    for (q, x) in e.quantiles.iter_mut().zip(&b.quantiles) {
                        *q = (momentum * *q as f64 + (1.0 - momentum) * *x as f64) as f32;
                    }
                }
                None => self.entries.push(b),
            }
        }
        self.entries.sort_by_key(|e| (e.layer, e.step));
        self.updates += 1;
    }

    /// The router-logit threshold that selects a share `rho` of tokens at (layer, step).
    pub fn threshold(&self, layer: usize, step: usize, rho: f64) -> Result<f32> {
        let e = self.entries.iter().find(|e| e.layer == layer && e.step == step).ok_or_else(|| {
            Error::usage(format!(
                "no router threshold stored for layer {layer} step {step}; run `itt calibrate` on this checkpoint"
            ))
        })?;
        if rho >= 1.0 {
            return Ok(f32::NEG_INFINITY);
        }
        if rho <= 0.0 {
            return Ok(f32::INFINITY);
        }
        Ok(quantile_sorted(&e.quantiles, 1.0 - rho))
    }
}

/// Linear interpolation quantile of ascending values at level p in [0, 1].
fn quantile_sorted(v: &[f32], p: f64) -> f32 {
    let pos = p * (v.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = (lo + 1).min(v.len() - 1);
    let frac = pos - lo as f64;
    (v[lo] as f64 * (1.0 - frac) + v[hi] as f64 * frac) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topk_counts_ties_and_order() {
        // rho * n = 0.7 * 10 = 7 exactly: the guard keeps float error from picking 8.
        let logits: Vec<f32> = (0..10).map(|i| i as f32).collect();
        let sel = select_topk(&logits, &[10], 0.7, &[true; 10]);
        assert_eq!(sel, vec![3, 4, 5, 6, 7, 8, 9]);
        // All equal: ties go to the earliest positions, every time.
        let flat = vec![0.5f32; 6];
        assert_eq!(select_topk(&flat, &[6], 0.5, &[true; 6]), vec![0, 1, 2]);
        // Two sequences are selected independently.
        let l = vec![9.0, 1.0, 2.0, 0.0, 0.0, 5.0];
        assert_eq!(select_topk(&l, &[3, 3], 0.33, &[true; 6]), vec![0, 5]);
        assert_eq!(select_topk(&l, &[3, 3], 0.34, &[true; 6]), vec![0, 2, 3, 5]);
        assert_eq!(select_topk(&l, &[3, 3], 0.0, &[true; 6]), Vec::<u32>::new());
    }

    #[test]
    fn topk_partition_selects_what_a_full_sort_selects() {
        // Random logits drawn from few values (many ties), random lengths, ratios and dead tokens.
        let mut rng = crate::base::rng::Rng::new(7);
        for _ in 0..300 {
            let lens: Vec<usize> = (0..1 + rng.below(4)).map(|_| rng.below(40) as usize).collect();
            let n: usize = lens.iter().sum();
            let logits: Vec<f32> = (0..n).map(|_| rng.below(5) as f32 - 2.0).collect();
            let alive: Vec<bool> = (0..n).map(|_| rng.below(6) != 0).collect();
            let rho = rng.below(11) as f64 / 10.0;
            let mut want = Vec::new();
            let mut start = 0;
            for &len in &lens {
                let k = ((rho * len as f64 - 1e-9).ceil().max(0.0) as usize).min(len);
                let mut c: Vec<usize> = (start..start + len).filter(|&i| alive[i]).collect();
                c.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
                c.truncate(k);
                c.sort_unstable();
                want.extend(c.into_iter().map(|i| i as u32));
                start += len;
            }
            assert_eq!(select_topk(&logits, &lens, rho, &alive), want, "lens {lens:?} rho {rho}");
        }
    }

    #[test]
    fn sub_layout_keeps_positions() {
        let layout = SeqLayout::with_past(&[3, 2], &[5, 0]);
        let s = sub_layout(&layout, &[1, 3, 4]);
        assert_eq!(s.lens, vec![1, 2]);
        assert_eq!(s.positions, vec![6, 0, 1]);
    }

    #[test]
    fn calibration_thresholds_select_the_share() {
        let mut rec = ForwardRecord::with_scores();
        rec.scores.insert((1, 2), (0..1000).map(|i| i as f32 / 10.0).collect());
        let mut cal = RouterCalibration::new();
        cal.update(&mut rec, 0.9);
        let tau = cal.threshold(1, 2, 0.3).unwrap();
        let share = (0..1000).filter(|&i| (i as f32 / 10.0) > tau).count() as f64 / 1000.0;
        assert!((share - 0.3).abs() < 0.01, "{share}");
        assert!(cal.threshold(3, 2, 0.3).is_err());
        assert_eq!(cal.threshold(1, 2, 1.0).unwrap(), f32::NEG_INFINITY);
    }
}
