//! The OpenAI-style request bodies, their checks, and the JSON error body. Every check that
//! can fail fails here, before a job reaches the engine, with a 4xx and one line naming the
//! field (DESIGN §12).

use super::template::Message;
use crate::generate::{GenerateOptions, SamplingParams};
use crate::model::{Model, RouterCalibration, Routing, RoutingOptions};
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;

/// Completions per prompt (`n`) at most, and prompts per request.
pub const MAX_N: usize = 8;
pub const MAX_PROMPTS: usize = 16;
pub const MAX_STOPS: usize = 4;
/// Alternatives per token in `logprobs` / `top_logprobs` at most (OpenAI's chat limit).
pub const MAX_LOGPROBS: usize = 20;
/// Drafted tokens per verify pass at most (`thinking.speculate`).
pub const MAX_SPECULATE: usize = 16;

/// An error answer: status and OpenAI's `{"error": {...}}` body.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub kind: &'static str,
    pub message: String,
    pub param: Option<&'static str>,
}

impl ApiError {
    pub fn bad(param: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            message: message.into(),
            param: Some(param),
        }
    }
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, kind, message: message.into(), param: None }
    }
    pub fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status.as_u16()}})
    }
}

#[derive(Deserialize, Debug)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

/// `/v1/completions`' prompt: a string, a list of strings, a list of token ids, or a list of
/// token-id lists (what lm-evaluation-harness sends). Ids are read as i64 so that a negative
/// or huge id gets our message naming it rather than serde's "did not match any variant".
#[derive(Deserialize, Debug)]
#[serde(untagged)]
pub enum PromptInput {
    Text(String),
    Texts(Vec<String>),
    Ids(Vec<i64>),
    IdLists(Vec<Vec<i64>>),
}

/// One prompt as given: text to encode, or token ids to check.
pub enum Prompt {
    Text(String),
    Ids(Vec<u32>),
}

impl PromptInput {
    /// The prompts, 1 to `MAX_PROMPTS`, none empty, every id inside the vocabulary.
    pub fn prompts(self, vocab: usize) -> Result<Vec<Prompt>, ApiError> {
        let ids = |v: Vec<i64>| -> Result<Prompt, ApiError> {
            if v.is_empty() {
                return Err(ApiError::bad("prompt", "a prompt is empty"));
            }
            v.into_iter()
                .map(|id| match u32::try_from(id) {
                    Ok(id) if (id as usize) < vocab => Ok(id),
                    _ => Err(ApiError::bad(
                        "prompt",
                        format!("token id {id} is outside the vocabulary (0 to {})", vocab - 1),
                    )),
                })
                .collect::<Result<Vec<u32>, ApiError>>()
                .map(Prompt::Ids)
        };
        let v: Vec<Prompt> = match self {
            PromptInput::Text(s) => vec![Prompt::Text(s)],
            PromptInput::Texts(v) => v.into_iter().map(Prompt::Text).collect(),
            PromptInput::Ids(v) => vec![ids(v)?],
            PromptInput::IdLists(v) => v.into_iter().map(ids).collect::<Result<_, _>>()?,
        };
        if v.is_empty() || v.len() > MAX_PROMPTS {
            return Err(ApiError::bad("prompt", format!("give 1 to {MAX_PROMPTS} prompts (got {})", v.len())));
        }
        if v.iter().any(|p| matches!(p, Prompt::Text(t) if t.is_empty())) {
            return Err(ApiError::bad("prompt", "a prompt is empty"));
        }
        Ok(v)
    }
}

/// The per-request thinking controls (our extension of the OpenAI body).
#[derive(Deserialize, Debug, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct ThinkingRequest {
    /// Routed share per step t = 2..=steps, each in [0, 1].
    pub ratios: Option<Vec<f64>>,
    /// Steps of the thinking layers, 1 to the trained T plus 4.
    pub steps: Option<usize>,
    /// A token whose router weight falls below this takes no further step.
    pub early_exit: Option<f32>,
    /// "threshold" (causal, with KV caches; the default) or "topk" (the paper's per-sequence
    /// top-k: no cache, every token re-runs the whole text).
    pub routing: Option<String>,
    /// Self-speculative decoding: tokens the model drafts with its routed steps off before
    /// one pass of the full model checks them (DESIGN §12); 0 = off. Absent: the server's
    /// `--speculate`.
    pub speculate: Option<usize>,
}

impl ThinkingRequest {
    /// The routing these controls ask for, checked against the model and its thresholds.
    fn routing_options(
        &self,
        model: &Model,
        calibration: Option<&Arc<RouterCalibration>>,
    ) -> Result<RoutingOptions, ApiError> {
        // Without thinking layers every setting would be ignored; a 200 would tell the client
        // its ratios or steps were used.
        if model.thinking_layers().next().is_none() {
            let given = [
                ("thinking.ratios", self.ratios.is_some()),
                ("thinking.steps", self.steps.is_some()),
                ("thinking.early_exit", self.early_exit.is_some()),
                ("thinking.routing", self.routing.is_some()),
                ("thinking.speculate", self.speculate.is_some_and(|k| k > 0)),
            ];
            if let Some(&(name, _)) = given.iter().find(|(_, set)| *set) {
                return Err(ApiError::bad(
                    name,
                    format!("{name}: this model is dense (no thinking layers); send no thinking settings"),
                ));
            }
        }
        let mode = match self.routing.as_deref() {
            None | Some("threshold") => Routing::Threshold,
            Some("topk") => Routing::TopK,
            Some(other) => {
                return Err(ApiError::bad(
                    "thinking.routing",
                    format!("thinking.routing must be \"threshold\" or \"topk\" (got \"{other}\")"),
                ))
            }
        };
        if let Some(e) = self.early_exit {
            if !(e.is_finite() && (0.0..=1.0).contains(&e)) {
                return Err(ApiError::bad(
                    "thinking.early_exit",
                    format!("thinking.early_exit must be in [0, 1] (got {e})"),
                ));
            }
        }
        let routing = RoutingOptions {
            mode,
            calibration: calibration.cloned(),
            ratios: self.ratios.clone(),
            steps: self.steps,
            early_exit: self.early_exit,
            forced: None,
        };
        if model.has_routers() && mode == Routing::Threshold && calibration.is_none() {
            return Err(ApiError::bad(
                "thinking.routing",
                "this model has no stored router thresholds (run `itt calibrate` on it); use thinking.routing \"topk\"",
            ));
        }
        model.check_routing(&routing).map_err(|e| ApiError::bad("thinking", e.to_string()))?;
        Ok(routing)
    }
}

#[derive(Deserialize, Debug, Default)]
#[serde(default)]
pub struct StreamOptions {
    pub include_usage: bool,
}

/// The fields `/v1/completions` and `/v1/chat/completions` share.
#[derive(Deserialize, Debug, Default)]
#[serde(default)]
pub struct Common {
    pub model: Option<String>,
    pub max_tokens: Option<i64>,
    /// The chat API's newer name for max_tokens.
    pub max_completion_tokens: Option<i64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub seed: Option<u64>,
    pub stop: Option<OneOrMany>,
    pub n: Option<i64>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub thinking: Option<ThinkingRequest>,
    /// Go on past the end-of-text token (vLLM's name), for benchmarks of a fixed length.
    pub ignore_eos: bool,
    /// Seconds the request may take; it ends with finish_reason "deadline" after that.
    pub timeout: Option<f64>,
    /// Completions: an integer 0..=20 (alternatives per token); chat: a boolean, with
    /// `top_logprobs` giving the alternatives. Kept as a Value so a wrong type gets a 400 that
    /// names the field and what it takes.
    pub logprobs: Option<Value>,
    pub top_logprobs: Option<Value>,
    /// Completions only: the prompt comes back before the completion (and in logprobs).
    pub echo: Option<bool>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    /// llama.cpp's and vLLM's extension (1 = off).
    pub repetition_penalty: Option<f32>,
    /// Token id (as a string, OpenAI's form) -> bias in [-100, 100].
    pub logit_bias: Option<serde_json::Map<String, Value>>,
}

#[derive(Deserialize, Debug)]
pub struct CompletionRequest {
    pub prompt: Option<PromptInput>,
    #[serde(flatten)]
    pub common: Common,
}

#[derive(Deserialize, Debug)]
pub struct ChatRequest {
    pub messages: Option<Vec<Message>>,
    #[serde(flatten)]
    pub common: Common,
}

/// Parse a JSON body into `T`: malformed JSON and wrong types are 400s naming the problem.
pub fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", format!("invalid JSON: {e}")))?;
    if !v.is_object() {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", "the body must be a JSON object"));
    }
    serde_json::from_value(v)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", format!("invalid request: {e}")))
}

/// An integer field in 0..=MAX_LOGPROBS (`logprobs` of completions, `top_logprobs` of chat).
fn logprob_count(param: &'static str, v: &Value) -> Result<usize, ApiError> {
    match v.as_u64() {
        Some(n) if n as usize <= MAX_LOGPROBS => Ok(n as usize),
        _ => Err(ApiError::bad(param, format!("{param} must be an integer from 0 to {MAX_LOGPROBS} (got {v})"))),
    }
}

/// What the checks of the shared fields produce.
pub struct Checked {
    pub opts: GenerateOptions,
    pub n: usize,
    pub stream: bool,
    pub include_usage: bool,
    /// The request set its own ratios or steps (the latency valve leaves it alone).
    pub pinned: bool,
    pub timeout: Option<std::time::Duration>,
    /// Completions: give the prompt back before the completion.
    pub echo: bool,
    /// `thinking.speculate` as the request gave it (absent: the server's default applies).
    pub speculate: Option<usize>,
}

impl Checked {
    /// Speculate with the server's `k` drafted tokens when the request did not say, and
    /// speculation can run with its settings (else it decodes plainly, as without the flag).
    pub fn default_speculate(&mut self, model: &Model, k: usize) {
        if self.speculate.is_none()
            && k > 0
            && crate::speculate::unsupported(model, &self.opts.routing, self.opts.use_cache).is_none()
        {
            self.opts.speculate = k;
        }
    }
}

impl Common {
    /// Check every field and build the generation options. `default_max` is the max_tokens when
    /// the request gives none; `seed` the server's seed for requests without one.
    pub fn check(
        &self,
        model: &Model,
        calibration: Option<&Arc<RouterCalibration>>,
        served_name: &str,
        default_max: usize,
        seed: u64,
        chat: bool,
    ) -> Result<Checked, ApiError> {
        if let Some(m) = &self.model {
            if m != served_name {
                return Err(ApiError::new(
                    StatusCode::NOT_FOUND,
                    "model_not_found",
                    format!("model `{m}` is not served here; this server serves `{served_name}`"),
                ));
            }
        }
        let ctx = model.cfg.max_seq_len;
        let echo = self.echo == Some(true);
        if echo && chat {
            return Err(ApiError::bad("echo", "echo is a /v1/completions field; chat has none"));
        }
        // max_tokens 0 scores the prompt without generating: only useful with echo.
        let min_tokens = i64::from(!echo);
        let max_tokens = match self.max_completion_tokens.or(self.max_tokens) {
            None => default_max.min(ctx - 1),
            Some(m) if m >= min_tokens && (m as usize) < ctx => m as usize,
            Some(m) => {
                let why = if m == 0 { " (0 only with echo)" } else { "" };
                return Err(ApiError::bad(
                    "max_tokens",
                    format!("max_tokens must be between {min_tokens} and {} (got {m}){why}", ctx - 1),
                ));
            }
        };
        let logprobs = self.logprobs(chat)?;
        let sampling = self.sampling(seed, model.cfg.vocab_size)?;
        let n = match self.n {
            None => 1,
            Some(n) if n >= 1 && n as usize <= MAX_N => n as usize,
            Some(n) => return Err(ApiError::bad("n", format!("n must be between 1 and {MAX_N} (got {n})"))),
        };
        let stop = match &self.stop {
            None => vec![],
            Some(OneOrMany::One(s)) => vec![s.clone()],
            Some(OneOrMany::Many(v)) => v.clone(),
        };
        if stop.len() > MAX_STOPS || stop.iter().any(|s| s.is_empty()) {
            return Err(ApiError::bad("stop", format!("stop takes 1 to {MAX_STOPS} non-empty strings")));
        }
        let timeout = match self.timeout {
            None => None,
            Some(t) if t.is_finite() && t > 0.0 && t <= 86400.0 => Some(std::time::Duration::from_secs_f64(t)),
            Some(t) => {
                return Err(ApiError::bad("timeout", format!("timeout must be between 0 and 86400 seconds (got {t})")))
            }
        };
        let th = self.thinking.clone().unwrap_or_default();
        let routing = th.routing_options(model, calibration)?;
        // Top-k routing is not causal: it re-runs the whole text each token (DESIGN §5).
        let use_cache = routing.mode == Routing::Threshold || !model.has_routers();
        let speculate = th.speculate.unwrap_or(0);
        if speculate > MAX_SPECULATE {
            return Err(ApiError::bad(
                "thinking.speculate",
                format!("thinking.speculate must be between 0 and {MAX_SPECULATE} (got {speculate})"),
            ));
        }
        if speculate > 0 {
            if let Some(why) = crate::speculate::unsupported(model, &routing, use_cache) {
                return Err(ApiError::bad("thinking.speculate", format!("thinking.speculate: {why}")));
            }
        }
        let opts = GenerateOptions {
            max_new_tokens: max_tokens,
            stop,
            stop_ids: vec![],
            ignore_eot: self.ignore_eos,
            sampling,
            use_cache,
            routing,
            prefill_chunk: 0,
            logprobs,
            prompt_logprobs: echo && logprobs.is_some(),
            speculate,
        };
        Ok(Checked {
            opts,
            n,
            stream: self.stream.unwrap_or(false),
            include_usage: self.stream_options.as_ref().is_some_and(|o| o.include_usage),
            pinned: th.ratios.is_some() || th.steps.is_some(),
            timeout,
            echo,
            speculate: th.speculate,
        })
    }

    /// Alternatives per token when log-probabilities are asked for. Completions: `logprobs: N`;
    /// chat: `logprobs: true` with `top_logprobs: N` (0 when absent).
    fn logprobs(&self, chat: bool) -> Result<Option<usize>, ApiError> {
        fn given(v: &Option<Value>) -> Option<&Value> {
            v.as_ref().filter(|v| !v.is_null())
        }
        if !chat {
            if given(&self.top_logprobs).is_some() {
                return Err(ApiError::bad(
                    "top_logprobs",
                    "top_logprobs is a chat field; completions take logprobs: N",
                ));
            }
            return given(&self.logprobs).map(|v| logprob_count("logprobs", v)).transpose();
        }
        let on = match given(&self.logprobs) {
            None => false,
            Some(Value::Bool(b)) => *b,
            Some(v) => {
                return Err(ApiError::bad("logprobs", format!("logprobs must be true or false in chat (got {v})")))
            }
        };
        let top = given(&self.top_logprobs).map(|v| logprob_count("top_logprobs", v)).transpose()?;
        match (on, top) {
            (false, Some(_)) => Err(ApiError::bad("top_logprobs", "top_logprobs needs logprobs: true")),
            (false, None) => Ok(None),
            (true, top) => Ok(Some(top.unwrap_or(0))),
        }
    }

    /// The sampling fields and the seed (the server's `seed` when the request gives none).
    fn sampling(&self, seed: u64, vocab: usize) -> Result<SamplingParams, ApiError> {
        // OpenAI's temperature range; the sampler itself takes any temperature >= 0.
        let temperature = self.temperature.unwrap_or(1.0);
        if !(temperature.is_finite() && (0.0..=2.0).contains(&temperature)) {
            return Err(ApiError::bad(
                "temperature",
                format!("temperature must be between 0 and 2 (got {temperature})"),
            ));
        }
        let top_k = match self.top_k {
            None => 0,
            Some(k) if k >= 0 => k as usize,
            Some(k) => return Err(ApiError::bad("top_k", format!("top_k must be >= 0 (got {k})"))),
        };
        let mut logit_bias = vec![];
        for (k, v) in self.logit_bias.iter().flatten() {
            let id = k.parse::<u32>().ok().filter(|&id| (id as usize) < vocab).ok_or_else(|| {
                ApiError::bad("logit_bias", format!("logit_bias key {k:?} is not a token id (0 to {})", vocab - 1))
            })?;
            let b =
                v.as_f64().ok_or_else(|| ApiError::bad("logit_bias", format!("logit_bias of {k} must be a number")))?;
            logit_bias.push((id, b as f32));
        }
        let p = SamplingParams {
            temperature,
            top_k,
            top_p: self.top_p.unwrap_or(1.0),
            seed: self.seed.unwrap_or(seed),
            presence_penalty: self.presence_penalty.unwrap_or(0.0),
            frequency_penalty: self.frequency_penalty.unwrap_or(0.0),
            repetition_penalty: self.repetition_penalty.unwrap_or(1.0),
            logit_bias,
        };
        // The sampler's own checks; their messages start with the field's name.
        p.validate().map_err(|e| {
            let m = e.to_string();
            let fields = ["top_p", "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias"];
            ApiError::bad(fields.into_iter().find(|f| m.starts_with(f)).unwrap_or("sampling"), m)
        })?;
        Ok(p)
    }
}
