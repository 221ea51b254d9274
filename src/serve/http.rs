//! The HTTP front (axum): OpenAI-style routes over the engine's job channels, SSE streaming,
//! metrics, health, and the web page.

use super::api::{self, ApiError, ChatRequest, Checked, CompletionRequest};
use super::engine::{EngineHandle, Job, JobEnd, JobEvent, SubmitError, ThinkingReport};
use super::metrics::Metrics;
use super::template::ChatTemplate;
use crate::data::Tokenizer;
use crate::generate::SeqUsage;
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
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/models", get(models))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat))
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

fn encode(s: &AppState, prompts: &[String]) -> Result<Vec<Vec<u32>>, ApiError> {
    let ctx = s.model.cfg.max_seq_len;
    prompts
        .iter()
        .map(|p| {
            let ids = s.tok.encode(p).map_err(|e| ApiError::bad("prompt", e.to_string()))?;
            if ids.is_empty() {
                return Err(ApiError::bad("prompt", "a prompt encodes to no tokens"));
            }
            if ids.len() >= ctx {
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

async fn completions_inner(s: &Arc<AppState>, body: &[u8]) -> Result<Response, ApiError> {
    let req: CompletionRequest = api::parse(body)?;
    let prompts = req.prompt.ok_or_else(|| ApiError::bad("prompt", "prompt is required"))?.prompts()?;
    let c = req.common.check(&s.model, s.calibration.as_ref(), &s.name, 16, next_seed(s))?;
    let ids = encode(s, &prompts)?;
    let id = format!("cmpl-{}", s.next_id.fetch_add(1, Ordering::Relaxed));
    let sub = submit(s, &ids, &c, &[])?;
    respond(s.clone(), sub, c, id, false).await
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
    let mut c = req.common.check(&s.model, s.calibration.as_ref(), &s.name, 256, next_seed(s))?;
    let prompt = s.template.render(&messages).map_err(|e| ApiError::bad("messages", e.to_string()))?;
    c.opts.stop.extend(s.template.stop_text.iter().cloned());
    let ids = encode(s, &[prompt])?;
    let id = format!("chatcmpl-{}", s.next_id.fetch_add(1, Ordering::Relaxed));
    let sub = submit(s, &ids, &c, &s.template.stop_ids)?;
    respond(s.clone(), sub, c, id, true).await
}

fn thinking_json(t: &ThinkingReport, depth: Option<&[Vec<u32>]>) -> Value {
    let mut v = json!({
        "ratios": t.ratios, "extra_block_steps": t.extra_block_steps,
        "thinking_flops": t.thinking_flops, "total_flops": t.total_flops,
    });
    if let Some(d) = depth {
        v["depth"] = json!(d);
    }
    v
}

fn usage_json(prompt: usize, completion: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

async fn respond(s: Arc<AppState>, sub: Submitted, c: Checked, id: String, chat: bool) -> Result<Response, ApiError> {
    let reply = Reply { id, created: now(), name: s.name.clone(), chat };
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
}

/// A non-streamed response: every choice's whole text once all have finished.
async fn respond_whole(mut sub: Submitted, reply: Reply) -> Result<Response, ApiError> {
    let Reply { id, created, name, chat } = reply;
    let mut choices = vec![Choice::default(); sub.choices];
    let mut done = 0;
    while done < sub.choices {
        let Some((i, ev)) = sub.rx.recv().await else { break };
        match ev {
            JobEvent::Token { text, depth, .. } => {
                choices[i].text.push_str(&text);
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
    let completion: usize = choices.iter().map(|c| c.usage.completion_tokens).sum();
    let out: Vec<Value> = choices
        .iter()
        .enumerate()
        .map(|(i, ch)| {
            let reason = ch.end.map(|e| e.name()).unwrap_or("stop");
            let thinking = thinking_json(&ch.thinking, Some(&ch.depth));
            if chat {
                json!({"index": i, "message": {"role": "assistant", "content": ch.text}, "finish_reason": reason, "thinking": thinking})
            } else {
                json!({"index": i, "text": ch.text, "logprobs": null, "finish_reason": reason, "thinking": thinking})
            }
        })
        .collect();
    let total = choices.iter().fold(ThinkingReport::default(), |mut a, c| {
        a.extra_block_steps += c.thinking.extra_block_steps;
        a.thinking_flops += c.thinking.thinking_flops;
        a.total_flops += c.thinking.total_flops;
        a
    });
    let object = if chat { "chat.completion" } else { "text_completion" };
    Ok(Json(json!({
        "id": id, "object": object, "created": created, "model": name, "choices": out,
        "usage": usage_json(sub.prompt_tokens, completion),
        "thinking": {"extra_block_steps": total.extra_block_steps, "thinking_flops": total.thinking_flops, "total_flops": total.total_flops},
    }))
    .into_response())
}

/// A streamed response (SSE).
fn respond_streamed(sub: Submitted, reply: Reply, include_usage: bool) -> Response {
    let Reply { id, created, name, chat } = reply;
    // Streaming: one SSE chunk per token, a last chunk per choice with its finish reason and
    // thinking, a usage chunk when asked, then [DONE].
    let object = if chat { "chat.completion.chunk" } else { "text_completion" };
    let chunk = move |choice: Value| json!({"id": id, "object": object, "created": created, "model": name, "choices": [choice]});
    struct St {
        sub: Submitted,
        started: Vec<bool>,
        done: usize,
        completion: usize,
        finished: bool,
    }
    let st = St { started: vec![false; sub.choices], sub, done: 0, completion: 0, finished: false };
    let stream = futures_util::stream::unfold(st, move |mut st| {
        let chunk = chunk.clone();
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
            if chat && !st.started[i] {
                st.started[i] = true;
                events.push(
                    chunk(json!({"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}))
                        .to_string(),
                );
            }
            match ev {
                JobEvent::Token { text, depth, .. } => {
                    let c = if chat {
                        json!({"index": i, "delta": {"content": text}, "finish_reason": null, "depth": depth})
                    } else {
                        json!({"index": i, "text": text, "logprobs": null, "finish_reason": null, "depth": depth})
                    };
                    events.push(chunk(c).to_string());
                }
                JobEvent::Finished { end, usage, thinking } => {
                    st.done += 1;
                    st.completion += usage.completion_tokens;
                    let t = thinking_json(&thinking, None);
                    let c = if chat {
                        json!({"index": i, "delta": {}, "finish_reason": end.name(), "thinking": t})
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
