//! The server's Prometheus metrics (`GET /metrics`, text format), on the `prometheus` crate.

use prometheus::{Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

pub struct Metrics {
    registry: Registry,
    /// HTTP requests by endpoint and status code.
    pub requests: IntCounterVec,
    /// Generations ended, by finish reason.
    pub finishes: IntCounterVec,
    pub cancelled: IntCounter,
    pub prompt_tokens: IntCounter,
    pub completion_tokens: IntCounter,
    pub queue_depth: IntGauge,
    pub running: IntGauge,
    /// The latency valve's factor on the trained routed shares (1 = as trained).
    pub share_scale: Gauge,
    pub batch_size: Histogram,
    pub step_seconds: Histogram,
    pub request_seconds: Histogram,
    pub time_to_first_token: Histogram,
    pub time_per_token: Histogram,
    /// The prefix cache (DESIGN §12): requests that reused a cached prefix, that found none,
    /// entries evicted, and bytes held.
    pub prefix_hits: IntCounter,
    pub prefix_misses: IntCounter,
    pub prefix_evictions: IntCounter,
    /// Prompt tokens taken from cached prefixes instead of being run.
    pub prefix_reused_tokens: IntCounter,
    pub prefix_bytes: IntGauge,
    /// Self-speculative decoding (DESIGN §12): tokens drafted, and those the full model kept.
    pub spec_drafted: IntCounter,
    pub spec_accepted: IntCounter,
}

fn seconds_buckets() -> Vec<f64> {
    vec![0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0]
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new_custom(Some("itt".into()), None).expect("a valid prefix");
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("valid metric");
            registry.register(Box::new(c.clone())).expect("registered once");
            c
        };
        let histogram = |name: &str, help: &str, buckets: Vec<f64>| {
            let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets)).expect("valid metric");
            registry.register(Box::new(h.clone())).expect("registered once");
            h
        };
        let requests = IntCounterVec::new(Opts::new("http_requests_total", "HTTP requests"), &["endpoint", "status"])
            .expect("valid metric");
        registry.register(Box::new(requests.clone())).expect("registered once");
        let finishes = IntCounterVec::new(Opts::new("generations_total", "Generations ended, by reason"), &["reason"])
            .expect("valid metric");
        registry.register(Box::new(finishes.clone())).expect("registered once");
        let queue_depth = IntGauge::new("queue_depth", "Requests waiting for a place in the batch").expect("valid");
        registry.register(Box::new(queue_depth.clone())).expect("registered once");
        let running = IntGauge::new("running_sequences", "Sequences in the running batch").expect("valid");
        registry.register(Box::new(running.clone())).expect("registered once");
        let share_scale =
            Gauge::new("share_scale", "Latency valve factor on the trained routed shares").expect("valid");
        share_scale.set(1.0);
        registry.register(Box::new(share_scale.clone())).expect("registered once");
        let prefix_bytes =
            IntGauge::new("prefix_cache_bytes", "Bytes of KV caches the prefix cache holds").expect("valid");
        registry.register(Box::new(prefix_bytes.clone())).expect("registered once");
        Metrics {
            prefix_hits: counter("prefix_cache_hits_total", "Requests that started from a cached prompt prefix"),
            prefix_misses: counter("prefix_cache_misses_total", "Requests that found no cached prefix"),
            prefix_evictions: counter("prefix_cache_evictions_total", "Prefix cache entries evicted (LRU)"),
            prefix_reused_tokens: counter(
                "prefix_cache_reused_tokens_total",
                "Prompt tokens taken from cached prefixes instead of being run",
            ),
            prefix_bytes,
            spec_drafted: counter("speculative_drafted_tokens_total", "Tokens drafted by self-speculative decoding"),
            spec_accepted: counter(
                "speculative_accepted_tokens_total",
                "Drafted tokens the full model kept (self-speculative decoding)",
            ),
            requests,
            finishes,
            cancelled: counter("cancelled_total", "Generations dropped because the client went away"),
            prompt_tokens: counter("prompt_tokens_total", "Prompt tokens of finished generations"),
            completion_tokens: counter("completion_tokens_total", "Generated tokens"),
            queue_depth,
            running,
            share_scale,
            batch_size: histogram(
                "batch_size",
                "Sequences per engine step",
                vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0],
            ),
            step_seconds: histogram("step_seconds", "Time of one engine step", seconds_buckets()),
            request_seconds: histogram("request_seconds", "Time from admission to the end", seconds_buckets()),
            time_to_first_token: histogram(
                "time_to_first_token_seconds",
                "Time from admission to the first token",
                seconds_buckets(),
            ),
            time_per_token: histogram(
                "time_per_output_token_seconds",
                "Mean time per generated token after the first, per request",
                seconds_buckets(),
            ),
            registry,
        }
    }

    pub fn finished(&self, reason: &str) {
        self.finishes.with_label_values(&[reason]).inc();
    }

    pub fn request(&self, endpoint: &str, status: u16) {
        self.requests.with_label_values(&[endpoint, &status.to_string()]).inc();
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = vec![];
        let _ = prometheus::TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
