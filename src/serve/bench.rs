//! The load client of `itt bench --serve` and of the server's tests: concurrent streaming
//! clients on blocking threads (ureq), each checking that its streams are well formed.

use crate::{Error, Result};
use serde::Serialize;
use serde_json::Value;
use std::io::BufRead;
use std::time::{Duration, Instant};

/// One streamed request as a client saw it.
#[derive(Clone, Debug, Default, Serialize)]
pub struct StreamStats {
    pub latency: f64,
    pub time_to_first_token: Option<f64>,
    pub tokens: usize,
    pub text: String,
    pub finish_reason: String,
    /// Routed shares the server reports it ran this request at.
    pub ratios: Vec<f64>,
}

/// Send one streaming completion and read it to the end, checking the stream's form: every
/// `data:` line is a JSON chunk with one choice until a final `[DONE]`, exactly one chunk
/// carries a finish reason.
pub fn stream_completion(url: &str, body: &Value, timeout: Duration) -> Result<StreamStats> {
    let mut body = body.clone();
    body["stream"] = Value::Bool(true);
    let t0 = Instant::now();
    let agent = ureq::AgentBuilder::new().timeout(timeout).build();
    let resp = agent
        .post(&format!("{url}/v1/completions"))
        .send_json(body)
        .map_err(|e| Error::usage(format!("request failed: {}", first_line(&e.to_string()))))?;
    let mut st = StreamStats::default();
    let mut done = false;
    let mut finishes = 0;
    for line in std::io::BufReader::new(resp.into_reader()).lines() {
        let line = line.map_err(|e| Error::usage(format!("reading the stream: {e}")))?;
        let Some(data) = line.strip_prefix("data: ") else {
            if line.is_empty() || line.starts_with(':') {
                continue;
            }
            return Err(Error::usage(format!("not an SSE line: {line:?}")));
        };
        if done {
            return Err(Error::usage("data after [DONE]"));
        }
        if data == "[DONE]" {
            done = true;
            continue;
        }
        let v: Value =
            serde_json::from_str(data).map_err(|e| Error::usage(format!("chunk is not JSON ({e}): {data}")))?;
        if let Some(err) = v.get("error") {
            return Err(Error::usage(format!("the stream reported an error: {err}")));
        }
        let choices = v["choices"].as_array().ok_or_else(|| Error::usage(format!("chunk without choices: {data}")))?;
        if choices.len() != 1 || v["object"] != "text_completion" {
            return Err(Error::usage(format!("malformed chunk: {data}")));
        }
        let c = &choices[0];
        if let Some(r) = c["finish_reason"].as_str() {
            finishes += 1;
            st.finish_reason = r.to_string();
            st.ratios = c["thinking"]["ratios"]
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_f64).collect())
                .unwrap_or_default();
        } else {
            st.tokens += 1;
            st.time_to_first_token.get_or_insert(t0.elapsed().as_secs_f64());
            st.text.push_str(c["text"].as_str().ok_or_else(|| Error::usage(format!("chunk without text: {data}")))?);
        }
    }
    if !done || finishes != 1 {
        return Err(Error::usage(format!("stream ended without [DONE] or with {finishes} finish reasons")));
    }
    st.latency = t0.elapsed().as_secs_f64();
    Ok(st)
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or("").to_string()
}

/// A load run's summary.
#[derive(Clone, Debug, Serialize)]
pub struct LoadReport {
    pub clients: usize,
    pub requests: usize,
    pub errors: usize,
    pub first_error: Option<String>,
    pub seconds: f64,
    pub requests_per_s: f64,
    pub tokens_per_s: f64,
    pub latency_p50: f64,
    pub latency_p99: f64,
    pub ttft_p50: f64,
    pub ttft_p99: f64,
    /// Per request: (latency - ttft) / (tokens - 1).
    pub time_per_token_p50: f64,
    pub time_per_token_p99: f64,
    /// Mean routed share over requests (first routed step), as the server reported.
    pub mean_share: Option<f64>,
}

/// `clients` threads each send `per_client` streaming requests with `body`, one after another.
pub fn load(url: &str, clients: usize, per_client: usize, body: &Value) -> LoadReport {
    let t0 = Instant::now();
    let results: Vec<Result<StreamStats>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..clients)
            .map(|c| {
                let mut body = body.clone();
                s.spawn(move || {
                    (0..per_client)
                        .map(|k| {
                            if body.get("seed").is_none() || body["seed"].is_null() {
                                body["seed"] = Value::from((c * 1000 + k) as u64);
                            }
                            stream_completion(url, &body, Duration::from_secs(600))
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        hs.into_iter().flat_map(|h| h.join().unwrap_or_default()).collect()
    });
    let seconds = t0.elapsed().as_secs_f64();
    let ok: Vec<&StreamStats> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    let first_error = results.iter().find_map(|r| r.as_ref().err().map(|e| e.to_string()));
    let pct = |mut v: Vec<f64>, p: f64| -> f64 {
        if v.is_empty() {
            return f64::NAN;
        }
        v.sort_by(f64::total_cmp);
        v[((v.len() - 1) as f64 * p).round() as usize]
    };
    let lat: Vec<f64> = ok.iter().map(|s| s.latency).collect();
    let ttft: Vec<f64> = ok.iter().filter_map(|s| s.time_to_first_token).collect();
    let tpt: Vec<f64> = ok
        .iter()
        .filter(|s| s.tokens > 1)
        .filter_map(|s| s.time_to_first_token.map(|f| (s.latency - f) / (s.tokens - 1) as f64))
        .collect();
    let shares: Vec<f64> = ok.iter().filter_map(|s| s.ratios.first().copied()).collect();
    let tokens: usize = ok.iter().map(|s| s.tokens).sum();
    LoadReport {
        clients,
        requests: results.len(),
        errors: results.len() - ok.len(),
        first_error,
        seconds,
        requests_per_s: ok.len() as f64 / seconds,
        tokens_per_s: tokens as f64 / seconds,
        latency_p50: pct(lat.clone(), 0.5),
        latency_p99: pct(lat, 0.99),
        ttft_p50: pct(ttft.clone(), 0.5),
        ttft_p99: pct(ttft, 0.99),
        time_per_token_p50: pct(tpt.clone(), 0.5),
        time_per_token_p99: pct(tpt, 0.99),
        mean_share: if shares.is_empty() { None } else { Some(shares.iter().sum::<f64>() / shares.len() as f64) },
    }
}
