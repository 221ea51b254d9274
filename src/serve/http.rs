//! The HTTP front (axum): OpenAI-style routes over the engine's job channels, SSE streaming,
//! metrics, health, and the web page.

use super::api::{self, ApiError, ChatRequest, Checked, CompletionRequest, Prompt};
use super::engine::{EngineHandle, Job, JobEnd, JobEvent, SubmitError, ThinkingReport};
use super::metrics::Metrics;
use super::template::ChatTemplate;
use crate::data::Tokenizer;
use crate::generate::{SeqUsage, TokenLogprob};
use crate::model::{Model, RouterCalibration};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;

pub struct AppState {
    pub model: Arc<Model>,
    pub tok: Arc<Tokenizer>,
    pub calibration: Option<Arc<RouterCalibration>>,
    pub template: ChatTemplate,
    pub engine: EngineHandle,
    pub metrics: Arc<Metrics>,
    pub name: String,
    pub created: u64,
    pub next_id: AtomicU64,
    /// Seed of requests that give none: a counter from the server's seed.
    pub seed: u64,
    /// Drafted tokens of requests that do not set `thinking.speculate` (0 = off).
    pub speculate: usize,
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/models", get(models))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat))
        .route("/tokenizer_info", get(tokenizer_info))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .fallback(not_found)
        .with_state(state)
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

async fn page() -> Html<&'static str> {
    Html(include_str!("page.html"))
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such route; see /v1/models, /v1/completions, /v1/chat/completions",
    )
}

async fn health(State(s): State<Arc<AppState>>) -> Response {
    let body = json!({"status": "ok", "queued": s.engine.queued(), "running": s.metrics.running.get()});
    if s.engine.is_closing() {
        return (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"status": "shutting_down"}))).into_response();
    }
    Json(body).into_response()
}

async fn metrics(State(s): State<Arc<AppState>>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], s.metrics.render()).into_response()
}

async fn models(State(s): State<Arc<AppState>>) -> Json<Value> {
    let cfg = &s.model.cfg;
    let th = &cfg.thinking;
    Json(json!({"object": "list", "data": [{
        "id": s.name, "object": "model", "created": s.created, "owned_by": "itt",
        "context_length": cfg.max_seq_len,
        "thinking": {
            "kind": format!("{:?}", th.kind).to_lowercase(),
            "layers": s.model.thinking_layers().map(|t| t.layer).collect::<Vec<_>>(),
            "steps": s.model.layer_steps().into_iter().max().unwrap_or(1),
            "ratios": s.model.thinking_layers().next().map(|t| t.ratios.clone()).unwrap_or_default(),
            "routed": s.model.has_routers(),
            "speculate": s.speculate,
        },
    }]}))
}

/// A request's jobs, one per (prompt, n), all sending to one channel tagged by choice index.
struct Submitted {
    rx: mpsc::UnboundedReceiver<(usize, JobEvent)>,
    choices: usize,
    prompt_tokens: usize,
}

/// What a job was, as the engine's events told it.
#[derive(Default, Clone)]
struct Choice {
    text: String,
    /// Generated token ids, with their log-probabilities when asked for.
    tokens: Vec<(u32, Option<TokenLogprob>)>,
    /// Prompt tokens 2.. scored (echo with logprobs).
    prompt_logprobs: Vec<TokenLogprob>,
    depth: Vec<Vec<u32>>,
    end: Option<JobEnd>,
    usage: SeqUsage,
    thinking: ThinkingReport,
}

fn submit(s: &AppState, prompts: &[Vec<u32>], c: &Checked, extra_stop_ids: &[u32]) -> Result<Submitted, ApiError> {
    let (tx, rx) = mpsc::unbounded_channel();
    let deadline = c.timeout.map(|t| Instant::now() + t);
    let mut index = 0;
    for p in prompts {
        for k in 0..c.n {
            let mut opts = c.opts.clone();
            opts.sampling.seed = opts.sampling.seed.wrapping_add(k as u64);
            opts.stop_ids.extend_from_slice(extra_stop_ids);
            let (jtx, mut jrx) = mpsc::unbounded_channel::<JobEvent>();
            let job = Job { prompt: p.clone(), opts, pinned: c.pinned, deadline, events: jtx };
            match s.engine.submit(job) {
                Ok(()) => {}
                Err(SubmitError::QueueFull) => {
                    return Err(ApiError::new(
                        StatusCode::TOO_MANY_REQUESTS,
                        "server_busy",
                        format!("the queue is full ({} waiting); retry later", s.engine.queued()),
                    ))
                }
                Err(SubmitError::ShuttingDown) => {
                    return Err(ApiError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "shutting_down",
                        "the server is shutting down",
                    ))
                }
            }
            // Forward this job's events, tagged; when the request's receiver goes away this
            // task ends, dropping the job's receiver: the engine sees it closed and cancels.
            let tx = tx.clone();
            let i = index;
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        ev = jrx.recv() => match ev {
                            Some(ev) => if tx.send((i, ev)).is_err() { break },
                            None => break,
                        },
                        _ = tx.closed() => break,
                    }
                }
            });
            index += 1;
        }
    }
    Ok(Submitted { rx, choices: index, prompt_tokens: prompts.iter().map(|p| p.len()).sum::<usize>() * c.n })
}

/// Token ids of each prompt, checked against the context; `room`: places left to generate in.
fn encode(s: &AppState, prompts: &[Prompt], room: usize) -> Result<Vec<Vec<u32>>, ApiError> {
    let ctx = s.model.cfg.max_seq_len;
    prompts
        .iter()
        .map(|p| {
            let ids = match p {
                Prompt::Text(t) => s.tok.encode(t).map_err(|e| ApiError::bad("prompt", e.to_string()))?,
                Prompt::Ids(ids) => ids.clone(),
            };
            if ids.is_empty() {
                return Err(ApiError::bad("prompt", "a prompt encodes to no tokens"));
            }
            if ids.len() + room > ctx {
                return Err(ApiError::bad(
                    "prompt",
                    format!(
                        "the prompt has {} tokens; the model's context is {ctx}, leaving no room to generate",
                        ids.len()
                    ),
                ));
            }
            Ok(ids)
        })
        .collect()
}

fn next_seed(s: &AppState) -> u64 {
    s.seed.wrapping_add(s.next_id.load(Ordering::Relaxed).wrapping_mul(0x9E37_79B9))
}

async fn completions(State(s): State<Arc<AppState>>, body: Bytes) -> Response {
    let r = completions_inner(&s, &body).await;
    finish("completions", &s, r)
}

async fn chat(State(s): State<Arc<AppState>>, body: Bytes) -> Response {
    let r = chat_inner(&s, &body).await;
    finish("chat", &s, r)
}

fn finish(endpoint: &str, s: &AppState, r: Result<Response, ApiError>) -> Response {
    let resp = r.unwrap_or_else(|e| e.into_response());
    s.metrics.request(endpoint, resp.status().as_u16());
    resp
}

// vLLM's tokenizer endpoints: lm-evaluation-harness's `local-completions` finds them and then
// splits each context from its continuation with the server's own tokenizer (no Hugging Face
// tokenizer on the client). The tokenizer adds no special tokens, whatever
// `add_special_tokens` says.

async fn tokenizer_info(State(s): State<Arc<AppState>>) -> Json<Value> {
    let eos = s.tok.decode(&[s.tok.eot_id()]).ok();
    Json(json!({
        "eos_token": eos, "bos_token": null, "pad_token": null,
        "model_max_length": s.model.cfg.max_seq_len, "vocab_size": s.tok.vocab_size(), "kind": s.tok.kind(),
    }))
}

#[derive(serde::Deserialize)]
struct TokenizeRequest {
    prompt: Option<String>,
    model: Option<String>,
}

#[derive(serde::Deserialize)]
struct DetokenizeRequest {
    tokens: Option<Vec<i64>>,
    model: Option<String>,
}

fn check_model(s: &AppState, model: &Option<String>) -> Result<(), ApiError> {
    match model {
        Some(m) if *m != s.name => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "model_not_found",
            format!("model `{m}` is not served here; this server serves `{}`", s.name),
        )),
        _ => Ok(()),
    }
}

async fn tokenize(State(s): State<Arc<AppState>>, body: Bytes) -> Response {
    let r = (|| {
        let req: TokenizeRequest = api::parse(&body)?;
        check_model(&s, &req.model)?;
        let text = req.prompt.ok_or_else(|| ApiError::bad("prompt", "prompt is required"))?;
        let ids = s.tok.encode(&text).map_err(|e| ApiError::bad("prompt", e.to_string()))?;
        let v = json!({"tokens": ids, "count": ids.len(), "max_model_len": s.model.cfg.max_seq_len});
        Ok(Json(v).into_response())
    })();
    finish("tokenize", &s, r)
}

async fn detokenize(State(s): State<Arc<AppState>>, body: Bytes) -> Response {
    let r = (|| {
        let req: DetokenizeRequest = api::parse(&body)?;
        check_model(&s, &req.model)?;
        let ids = req.tokens.ok_or_else(|| ApiError::bad("tokens", "tokens is required"))?;
        let vocab = s.model.cfg.vocab_size;
        let ids: Vec<u32> = ids
            .into_iter()
            .map(|id| {
                u32::try_from(id).ok().filter(|&i| (i as usize) < vocab).ok_or_else(|| {
                    ApiError::bad("tokens", format!("token id {id} is outside the vocabulary (0 to {})", vocab - 1))
                })
            })
            .collect::<Result<_, _>>()?;
        let text = s.tok.decode(&ids).map_err(|e| ApiError::bad("tokens", e.to_string()))?;
        Ok(Json(json!({"prompt": text})).into_response())
    })();
    finish("detokenize", &s, r)
}

async fn completions_inner(s: &Arc<AppState>, body: &[u8]) -> Result<Response, ApiError> {
    let req: CompletionRequest = api::parse(body)?;
    let prompts =
        req.prompt.ok_or_else(|| ApiError::bad("prompt", "prompt is required"))?.prompts(s.model.cfg.vocab_size)?;
    let mut c = req.common.check(&s.model, s.calibration.as_ref(), &s.name, 16, next_seed(s), false)?;
    c.default_speculate(&s.model, s.speculate);
    let ids = encode(s, &prompts, usize::from(c.opts.max_new_tokens > 0))?;
    // Echo gives each prompt back as sent (token-id prompts decoded), with its tokens.
    let echo = if c.echo {
        let texts: Vec<String> = prompts
            .iter()
            .zip(&ids)
            .map(|(p, ids)| match p {
                Prompt::Text(t) => Ok(t.clone()),
                Prompt::Ids(_) => s.tok.decode(ids).map_err(|e| ApiError::bad("prompt", e.to_string())),
            })
            .collect::<Result<_, _>>()?;
        texts.into_iter().zip(ids.iter().cloned()).flat_map(|p| std::iter::repeat_n(p, c.n)).collect()
    } else {
        vec![]
    };
    let id = format!("cmpl-{}", s.next_id.fetch_add(1, Ordering::Relaxed));
    let sub = submit(s, &ids, &c, &[])?;
    let prompt_chars = ids
        .iter()
        .map(|p| s.tok.decode(p).map(|t| t.chars().count()).unwrap_or(0))
        .flat_map(|n| std::iter::repeat_n(n, c.n))
        .collect();
    respond(s.clone(), sub, c, id, false, echo, prompt_chars).await
}

async fn chat_inner(s: &Arc<AppState>, body: &[u8]) -> Result<Response, ApiError> {
    let req: ChatRequest = api::parse(body)?;
    let messages = req.messages.ok_or_else(|| ApiError::bad("messages", "messages is required"))?;
    if messages.is_empty() {
        return Err(ApiError::bad("messages", "messages is empty"));
    }
    if let Some(m) =
        messages.iter().find(|m| !["system", "user", "assistant", "tool", "developer"].contains(&m.role.as_str()))
    {
        return Err(ApiError::bad("messages", format!("unknown role `{}`", m.role)));
    }
    let mut c = req.common.check(&s.model, s.calibration.as_ref(), &s.name, 256, next_seed(s), true)?;
    c.default_speculate(&s.model, s.speculate);
    let prompt = s.template.render(&messages).map_err(|e| ApiError::bad("messages", e.to_string()))?;
    c.opts.stop.extend(s.template.stop_text.iter().cloned());
    let ids = encode(s, &[Prompt::Text(prompt)], 1)?;
    let id = format!("chatcmpl-{}", s.next_id.fetch_add(1, Ordering::Relaxed));
    let sub = submit(s, &ids, &c, &s.template.stop_ids)?;
    respond(s.clone(), sub, c, id, true, vec![], vec![]).await
}

fn thinking_json(t: &ThinkingReport, depth: Option<&[Vec<u32>]>) -> Value {
    let mut v = json!({
        "ratios": t.ratios, "extra_block_steps": t.extra_block_steps,
        "thinking_flops": t.thinking_flops, "total_flops": t.total_flops,
    });
    if t.drafted > 0 {
        v["speculation"] = json!({"drafted": t.drafted, "accepted": t.accepted});
    }
    if let Some(d) = depth {
        v["depth"] = json!(d);
    }
    v
}

fn usage_json(prompt: usize, completion: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

#[allow(clippy::too_many_arguments)]
async fn respond(
    s: Arc<AppState>,
    sub: Submitted,
    c: Checked,
    id: String,
    chat: bool,
    echo: Vec<(String, Vec<u32>)>,
    prompt_chars: Vec<usize>,
) -> Result<Response, ApiError> {
    let reply = Reply {
        id,
        created: now(),
        name: s.name.clone(),
        chat,
        logprobs: c.opts.logprobs.is_some(),
        echo,
        prompt_chars,
        tok: s.tok.clone(),
    };
    if c.stream {
        Ok(respond_streamed(sub, reply, c.include_usage))
    } else {
        respond_whole(sub, reply).await
    }
}

/// What every response (or chunk) of one request carries.
struct Reply {
    id: String,
    created: u64,
    name: String,
    chat: bool,
    /// Log-probabilities were asked for.
    logprobs: bool,
    /// Per choice with `echo`: the prompt's text and ids (empty without echo).
    echo: Vec<(String, Vec<u32>)>,
    /// Per choice (completions): the prompt's length in characters, where the completion's
    /// `text_offset`s start without echo.
    prompt_chars: Vec<usize>,
    tok: Arc<Tokenizer>,
}

/// One token as the logprobs objects show it: its text and entry (`None`: the first prompt
/// token, which nothing predicts).
type Scored<'a> = (u32, Option<&'a TokenLogprob>);

/// OpenAI's legacy completions `logprobs` object over `tokens`, whose text starts at character
/// `offset` of the choice's text. `top_logprobs` maps token text to log-probability: the top N
/// plus the chosen token when it is not among them (as vLLM answers, so a scorer can tell
/// whether a token was the greedy one). A JSON object has no order; its keys come sorted.
fn completion_logprobs(tok: &Tokenizer, tokens: &[Scored], mut offset: usize) -> Value {
    let (mut texts, mut lps, mut tops, mut offsets) = (vec![], vec![], vec![], vec![]);
    for &(id, lp) in tokens {
        let text = tok.token_text(id);
        offsets.push(offset);
        offset += text.chars().count();
        match lp {
            None => {
                lps.push(Value::Null);
                tops.push(Value::Null);
            }
            Some(lp) => {
                lps.push(json!(lp.logprob));
                let mut top = serde_json::Map::new();
                for &(t, l) in &lp.top {
                    top.entry(tok.token_text(t)).or_insert(json!(l));
                }
                if !lp.top.is_empty() {
                    top.entry(text.clone()).or_insert(json!(lp.logprob));
                }
                tops.push(Value::Object(top));
            }
        }
        texts.push(text);
    }
    json!({"tokens": texts, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets})
}

/// The chat `logprobs.content` entries of generated tokens: token text, log-probability, UTF-8
/// bytes, and the top N alternatives most likely first.
fn chat_logprobs(tok: &Tokenizer, tokens: &[&TokenLogprob]) -> Value {
    let entry = |id: u32, lp: f32| {
        let t = tok.token_text(id);
        json!({"token": t, "logprob": lp, "bytes": t.as_bytes()})
    };
    let content: Vec<Value> = tokens
        .iter()
        .map(|lp| {
            let mut e = entry(lp.id, lp.logprob);
            e["top_logprobs"] = lp.top.iter().map(|&(t, l)| entry(t, l)).collect();
            e
        })
        .collect();
    json!({"content": content})
}

impl Reply {
    /// With echo, choice `i`'s prompt tokens as the logprobs objects show them (the first has
    /// no entry; `scored` holds the rest once scored); empty without echo.
    fn echo_tokens<'a>(&self, i: usize, scored: &'a [TokenLogprob]) -> Vec<Scored<'a>> {
        let Some((_, ids)) = self.echo.get(i) else { return vec![] };
        ids.iter().enumerate().map(|(j, &id)| (id, j.checked_sub(1).and_then(|j| scored.get(j)))).collect()
    }

    /// Where choice `i`'s generated text starts in its text, in characters (OpenAI counts the
    /// prompt's length even without echo).
    fn generated_offset(&self, i: usize) -> usize {
        match self.echo.get(i) {
            Some((text, _)) => text.chars().count(),
            None => self.prompt_chars.get(i).copied().unwrap_or(0),
        }
    }
}

/// A non-streamed response: every choice's whole text once all have finished.
async fn respond_whole(mut sub: Submitted, reply: Reply) -> Result<Response, ApiError> {
    let mut choices = vec![Choice::default(); sub.choices];
    let mut done = 0;
    while done < sub.choices {
        let Some((i, ev)) = sub.rx.recv().await else { break };
        match ev {
            JobEvent::Prompt(lps) => choices[i].prompt_logprobs = lps,
            JobEvent::Token { id, text, depth, logprob } => {
                choices[i].text.push_str(&text);
                choices[i].tokens.push((id, logprob));
                choices[i].depth.push(depth);
            }
            JobEvent::Finished { end, usage, thinking } => {
                choices[i].end = Some(end);
                choices[i].usage = usage;
                choices[i].thinking = thinking;
                done += 1;
            }
            JobEvent::Failed(msg) => {
                return Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", msg));
            }
        }
    }
    if done < sub.choices {
        return Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "the engine stopped"));
    }
    let r = &reply;
    let completion: usize = choices.iter().map(|c| c.usage.completion_tokens).sum();
    let out: Vec<Value> = choices
        .iter()
        .enumerate()
        .map(|(i, ch)| {
            let reason = ch.end.map(|e| e.name()).unwrap_or("stop");
            let thinking = thinking_json(&ch.thinking, Some(&ch.depth));
            let generated = ch.tokens.iter().map(|(id, lp)| (*id, lp.as_ref()));
            if r.chat {
                let logprobs = if r.logprobs {
                    chat_logprobs(&r.tok, &ch.tokens.iter().filter_map(|t| t.1.as_ref()).collect::<Vec<_>>())
                } else {
                    Value::Null
                };
                json!({"index": i, "message": {"role": "assistant", "content": ch.text}, "logprobs": logprobs, "finish_reason": reason, "thinking": thinking})
            } else {
                let mut text = ch.text.clone();
                let mut tokens = r.echo_tokens(i, &ch.prompt_logprobs);
                if let Some((prompt, _)) = r.echo.get(i) {
                    text.insert_str(0, prompt);
                }
                let offset = if tokens.is_empty() { r.generated_offset(i) } else { 0 };
                tokens.extend(generated);
                let logprobs = if r.logprobs { completion_logprobs(&r.tok, &tokens, offset) } else { Value::Null };
                json!({"index": i, "text": text, "logprobs": logprobs, "finish_reason": reason, "thinking": thinking})
            }
        })
        .collect();
    let total = choices.iter().fold(ThinkingReport::default(), |mut a, c| {
        a.extra_block_steps += c.thinking.extra_block_steps;
        a.thinking_flops += c.thinking.thinking_flops;
        a.total_flops += c.thinking.total_flops;
        a
    });
    let object = if r.chat { "chat.completion" } else { "text_completion" };
    Ok(Json(json!({
        "id": r.id, "object": object, "created": r.created, "model": r.name, "choices": out,
        "usage": usage_json(sub.prompt_tokens, completion),
        "thinking": {"extra_block_steps": total.extra_block_steps, "thinking_flops": total.thinking_flops, "total_flops": total.total_flops},
    }))
    .into_response())
}

/// A streamed response (SSE).
fn respond_streamed(sub: Submitted, reply: Reply, include_usage: bool) -> Response {
    // Streaming: one SSE chunk per token (after, with echo, one with the prompt), a last chunk
    // per choice with its finish reason and thinking, a usage chunk when asked, then [DONE].
    let object = if reply.chat { "chat.completion.chunk" } else { "text_completion" };
    let chunk = {
        let (id, created, name) = (reply.id.clone(), reply.created, reply.name.clone());
        move |choice: Value| json!({"id": id, "object": object, "created": created, "model": name, "choices": [choice]})
    };
    struct St {
        sub: Submitted,
        started: Vec<bool>,
        /// Per choice: where its next token's text starts (completions' `text_offset`).
        offset: Vec<usize>,
        done: usize,
        completion: usize,
        finished: bool,
    }
    let offset = (0..sub.choices).map(|i| reply.generated_offset(i)).collect();
    let st = St { started: vec![false; sub.choices], offset, sub, done: 0, completion: 0, finished: false };
    let reply = Arc::new(reply);
    let stream = futures_util::stream::unfold(st, move |mut st| {
        let chunk = chunk.clone();
        let r = reply.clone();
        async move {
            if st.finished {
                return None;
            }
            if st.done == st.sub.choices {
                st.finished = true;
                let mut events = vec![];
                if include_usage {
                    let mut u = chunk(Value::Null);
                    u["choices"] = json!([]);
                    u["usage"] = usage_json(st.sub.prompt_tokens, st.completion);
                    events.push(u.to_string());
                }
                events.push("[DONE]".to_string());
                return Some((events, st));
            }
            let (i, ev) = match st.sub.rx.recv().await {
                Some(x) => x,
                None => {
                    st.finished = true;
                    let e = ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "the engine stopped");
                    return Some((vec![e.body().to_string()], st));
                }
            };
            let mut events = vec![];
            if !st.started[i] {
                st.started[i] = true;
                if r.chat {
                    let c = json!({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null});
                    events.push(chunk(c).to_string());
                } else if let Some((prompt, _)) = r.echo.get(i) {
                    // The echoed prompt, scored when the job sent its prompt's log-probabilities.
                    let scored = match &ev {
                        JobEvent::Prompt(lps) => lps.as_slice(),
                        _ => &[],
                    };
                    let lp = if r.logprobs {
                        completion_logprobs(&r.tok, &r.echo_tokens(i, scored), 0)
                    } else {
                        Value::Null
                    };
                    events.push(
                        chunk(json!({"index": i, "text": prompt, "logprobs": lp, "finish_reason": null})).to_string(),
                    );
                }
            }
            match ev {
                JobEvent::Prompt(_) => {}
                JobEvent::Token { id, text, depth, logprob } => {
                    let c = if r.chat {
                        let lp = match &logprob {
                            Some(lp) if r.logprobs => chat_logprobs(&r.tok, &[lp]),
                            _ => Value::Null,
                        };
                        json!({"index": i, "delta": {"content": text}, "logprobs": lp, "finish_reason": null, "depth": depth})
                    } else {
                        let lp = if r.logprobs {
                            completion_logprobs(&r.tok, &[(id, logprob.as_ref())], st.offset[i])
                        } else {
                            Value::Null
                        };
                        st.offset[i] += r.tok.token_text(id).chars().count();
                        json!({"index": i, "text": text, "logprobs": lp, "finish_reason": null, "depth": depth})
                    };
                    events.push(chunk(c).to_string());
                }
                JobEvent::Finished { end, usage, thinking } => {
                    st.done += 1;
                    st.completion += usage.completion_tokens;
                    let t = thinking_json(&thinking, None);
                    let c = if r.chat {
                        json!({"index": i, "delta": {}, "logprobs": null, "finish_reason": end.name(), "thinking": t})
                    } else {
                        json!({"index": i, "text": "", "logprobs": null, "finish_reason": end.name(), "thinking": t})
                    };
                    events.push(chunk(c).to_string());
                }
                JobEvent::Failed(msg) => {
                    st.finished = true;
                    events
                        .push(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", msg).body().to_string());
                }
            }
            Some((events, st))
        }
    });
    use futures_util::StreamExt;
    let stream = stream.flat_map(|evs| {
        futures_util::stream::iter(evs.into_iter().map(|d| Ok::<_, Infallible>(SseEvent::default().data(d))))
    });
    Sse::new(stream).keep_alive(KeepAlive::default()).into_response()
}
