//! The serving engine: one thread that owns the model and runs continuous batching over
//! [`crate::generate::Batch`]. It knows nothing of HTTP: jobs come in through a bounded queue
//! ([`EngineHandle::submit`]), events go out on each job's own channel. Between two steps it
//! admits queued jobs (up to `max_batch` running), drops jobs whose client went away (their
//! channel is closed) or whose deadline passed, and adjusts routed shares under load (the
//! latency valve, DESIGN §12).

use super::metrics::Metrics;
use crate::data::Tokenizer;
use crate::generate::{Batch, Event, FinishReason, GenerateOptions, SeqUsage, TokenLogprob};
use crate::model::Model;
use crate::{Error, Result};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::UnboundedSender;

/// How the engine schedules.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Sequences decoded together at most.
    pub max_batch: usize,
    /// Jobs waiting for a place in the batch at most; beyond, `submit` refuses (HTTP 429).
    pub max_queue: usize,
    /// Prompt tokens fed per sequence and step at most (0 = whole prompts), so a long prompt
    /// joining does not stall the running streams for its whole prefill.
    pub prefill_chunk: usize,
    /// The latency valve: target time per output token.
    pub latency_target: Option<Duration>,
    /// The valve never scales routed shares below this fraction of the trained ones.
    pub share_floor: f64,
    /// Bytes of prompt-prefix KV caches kept for later requests (0 = no prefix cache).
    pub prefix_cache_bytes: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            max_batch: 16,
            max_queue: 64,
            prefill_chunk: 256,
            latency_target: None,
            share_floor: 0.25,
            prefix_cache_bytes: 0,
        }
    }
}

/// One request's generation, as the engine receives it.
pub struct Job {
    pub prompt: Vec<u32>,
    pub opts: GenerateOptions,
    /// The request set its own ratios or steps: the valve leaves it alone.
    pub pinned: bool,
    pub deadline: Option<Instant>,
    pub events: UnboundedSender<JobEvent>,
}

/// Why a job ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobEnd {
    Finished(FinishReason),
    /// Its deadline passed.
    Deadline,
    /// The server shut down before it finished.
    Shutdown,
}

impl JobEnd {
    /// OpenAI's `finish_reason` names, with two of our own ("deadline", "shutdown").
    pub fn name(self) -> &'static str {
        match self {
            JobEnd::Finished(FinishReason::EndOfText | FinishReason::Stop) => "stop",
            JobEnd::Finished(FinishReason::Length | FinishReason::Context) => "length",
            JobEnd::Deadline => "deadline",
            JobEnd::Shutdown => "shutdown",
        }
    }
}

/// What the job's thinking actually was.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ThinkingReport {
    /// Routed share per step t = 2..=T, averaged over the job's steps (the valve may change
    /// them while it runs); empty for models without routed steps.
    pub ratios: Vec<f64>,
    /// Block steps thinking added over the dense pass, and their forward FLOPs.
    pub extra_block_steps: u64,
    pub thinking_flops: f64,
    /// Forward FLOPs of the whole job (dense pass plus thinking).
    pub total_flops: f64,
    /// Self-speculative decoding: tokens drafted, and how many the full model kept.
    pub drafted: usize,
    pub accepted: usize,
}

pub enum JobEvent {
    /// With `GenerateOptions::prompt_logprobs`, before any token: prompt tokens 2.. scored.
    Prompt(Vec<TokenLogprob>),
    Token {
        id: u32,
        text: String,
        depth: Vec<u32>,
        logprob: Option<TokenLogprob>,
    },
    Finished {
        end: JobEnd,
        usage: SeqUsage,
        thinking: ThinkingReport,
    },
    /// The model failed on this job's batch; the engine goes on with the next jobs.
    Failed(String),
}

/// Why a job was not queued.
#[derive(Debug, PartialEq, Eq)]
pub enum SubmitError {
    QueueFull,
    ShuttingDown,
}

/// The handle the server holds; cloning shares the engine.
#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Job>,
    queued: Arc<AtomicUsize>,
    max_queue: usize,
    closing: Arc<AtomicBool>,
    /// End every running job now (after a graceful shutdown's grace period).
    abort: Arc<AtomicBool>,
}

impl EngineHandle {
    pub fn submit(&self, job: Job) -> std::result::Result<(), SubmitError> {
        if self.closing.load(Ordering::SeqCst) {
            return Err(SubmitError::ShuttingDown);
        }
        // Reserve a place first so concurrent submits cannot overshoot the bound.
        if self.queued.fetch_add(1, Ordering::SeqCst) >= self.max_queue {
            self.queued.fetch_sub(1, Ordering::SeqCst);
            return Err(SubmitError::QueueFull);
        }
        self.tx.send(job).map_err(|_| {
            self.queued.fetch_sub(1, Ordering::SeqCst);
            SubmitError::ShuttingDown
        })
    }

    /// Jobs waiting for a place in the batch.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::SeqCst)
    }

    pub fn is_closing(&self) -> bool {
        self.closing.load(Ordering::SeqCst)
    }

    /// Refuse new jobs from now on; running and queued ones go on.
    pub fn close(&self) {
        self.closing.store(true, Ordering::SeqCst);
    }

    /// End every running and queued job now, with finish reason "shutdown".
    pub fn abort(&self) {
        self.close();
        self.abort.store(true, Ordering::SeqCst);
    }
}

/// A running job's bookkeeping.
struct Live {
    events: UnboundedSender<JobEvent>,
    pinned: bool,
    deadline: Option<Instant>,
    admitted: Instant,
    first_token: Option<Instant>,
    /// Sum over the job's steps of the shares it ran at, and the number of steps.
    share_sum: Vec<f64>,
    share_steps: u64,
}

/// Start the engine thread. It ends when every handle is dropped (or closed) and the queue and
/// batch are empty; join the returned thread to wait for that.
pub fn start(
    model: Arc<Model>,
    tok: Arc<Tokenizer>,
    cfg: EngineConfig,
    metrics: Arc<Metrics>,
) -> Result<(EngineHandle, std::thread::JoinHandle<()>)> {
    if cfg.max_batch == 0 {
        return Err(Error::usage("--max-batch must be at least 1"));
    }
    if !(cfg.share_floor >= 0.0 && cfg.share_floor <= 1.0) {
        return Err(Error::usage(format!("--share-floor must be in [0, 1] (got {})", cfg.share_floor)));
    }
    let (tx, rx) = mpsc::channel();
    let handle = EngineHandle {
        tx,
        queued: Arc::new(AtomicUsize::new(0)),
        max_queue: cfg.max_queue,
        closing: Arc::new(AtomicBool::new(false)),
        abort: Arc::new(AtomicBool::new(false)),
    };
    let h = handle.clone();
    let thread = std::thread::Builder::new()
        .name("itt-engine".into())
        // On a rayon worker, as the CLI runs (`util::on_worker_thread`): the products' parallel
        // regions then fork from a thread that takes part, instead of handing each region to
        // the pool and sleeping until woken (hundreds of times per token).
        .spawn(move || crate::base::util::on_worker_thread(move || run(&model, &tok, cfg, rx, h, metrics)))
        .map_err(|e| Error::usage(format!("cannot start the engine thread: {e}")))?;
    Ok((handle, thread))
}

/// The valve's state: one factor on the trained shares for every job that did not pin its own.
struct Valve {
    target: Option<Duration>,
    floor: f64,
    scale: f64,
    /// Smoothed time per decode step (= per output token of each running stream).
    ewma: Option<f64>,
    steps_since_change: u32,
}

impl Valve {
    /// Shares at full scale; `target` None: the valve stays open.
    fn new(target: Option<Duration>, floor: f64) -> Self {
        Valve { target, floor, scale: 1.0, ewma: None, steps_since_change: 0 }
    }

    /// Feed one step's time; returns the new scale when it changes.
    fn observe(&mut self, step: Duration) -> Option<f64> {
        let target = self.target?.as_secs_f64();
        let t = step.as_secs_f64();
        let e = match self.ewma {
            Some(e) => 0.8 * e + 0.2 * t,
            None => t,
        };
        self.ewma = Some(e);
        self.steps_since_change += 1;
        // Change at most every 4 steps, so one change shows in the average before the next.
        if self.steps_since_change < 4 {
            return None;
        }
        let old = self.scale;
        if e > target {
            self.scale = (self.scale * 0.8).max(self.floor);
        } else if e < 0.7 * target {
            self.scale = (self.scale * 1.25).min(1.0);
        }
        if (self.scale - old).abs() > 1e-12 {
            self.steps_since_change = 0;
            Some(self.scale)
        } else {
            None
        }
    }
}

fn run(
    model: &Model,
    tok: &Tokenizer,
    cfg: EngineConfig,
    rx: mpsc::Receiver<Job>,
    handle: EngineHandle,
    metrics: Arc<Metrics>,
) {
    let mut batch = match Batch::new(model, tok) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("error: the engine cannot start: {e}");
            return;
        }
    };
    if cfg.prefix_cache_bytes > 0 {
        batch.prefix_cache = Some(crate::generate::PrefixCache::new(cfg.prefix_cache_bytes));
    }
    let valve = Valve::new(cfg.latency_target, cfg.share_floor);
    let mut engine = Engine {
        model,
        trained: model.thinking_layers().next().map(|t| t.ratios.clone()).unwrap_or_default(),
        routed: model.has_routers(),
        cfg,
        rx,
        handle,
        metrics,
        batch,
        valve,
        live: HashMap::new(),
        disconnected: false,
    };
    // Between two steps: admit queued jobs, end the ones that must end, then step the batch,
    // send its tokens and let the valve see how long the step took.
    loop {
        engine.admit();
        if engine.live.is_empty() {
            if engine.drained() {
                break;
            }
            continue;
        }
        engine.expire();
        if engine.live.is_empty() {
            continue;
        }
        let Some((events, took)) = engine.step() else { continue };
        engine.dispatch(events);
        engine.open_or_close_valve(took);
    }
}

/// The engine thread's state: the batch and the bookkeeping of its running jobs.
struct Engine<'a> {
    model: &'a Model,
    cfg: EngineConfig,
    rx: mpsc::Receiver<Job>,
    handle: EngineHandle,
    metrics: Arc<Metrics>,
    batch: Batch<'a>,
    /// The trained routed shares, which the valve scales.
    trained: Vec<f64>,
    routed: bool,
    valve: Valve,
    live: HashMap<usize, Live>,
    /// Every handle is gone: no job can come any more.
    disconnected: bool,
}

impl Engine<'_> {
    /// Admit queued jobs while there is room in the batch; wait a little for one when idle.
    fn admit(&mut self) {
        while self.live.len() < self.cfg.max_batch && !self.disconnected {
            let Some(job) = self.next_job() else { break };
            self.handle.queued.fetch_sub(1, Ordering::SeqCst);
            if job.events.is_closed() {
                self.metrics.cancelled.inc();
                continue;
            }
            if self.handle.abort.load(Ordering::SeqCst) {
                let _ = job.events.send(JobEvent::Finished {
                    end: JobEnd::Shutdown,
                    usage: SeqUsage { prompt_tokens: job.prompt.len(), ..Default::default() },
                    thinking: ThinkingReport::default(),
                });
                continue;
            }
            let mut opts = job.opts;
            opts.prefill_chunk = self.cfg.prefill_chunk;
            if !job.pinned && self.routed && self.valve.scale < 1.0 {
                opts.routing.ratios = Some(scaled(&self.trained, self.valve.scale, opts.routing.steps));
            }
            match self.batch.add(job.prompt, opts) {
                Ok(id) => {
                    let live = Live {
                        events: job.events,
                        pinned: job.pinned,
                        deadline: job.deadline,
                        admitted: Instant::now(),
                        first_token: None,
                        share_sum: vec![],
                        share_steps: 0,
                    };
                    self.live.insert(id, live);
                }
                Err(e) => {
                    let _ = job.events.send(JobEvent::Failed(e.to_string()));
                }
            }
        }
        self.metrics.queue_depth.set(self.handle.queued() as i64);
        self.metrics.running.set(self.live.len() as i64);
        self.prefix_metrics();
    }

    /// Bring the prefix cache's counters to /metrics.
    fn prefix_metrics(&self) {
        let Some(pc) = &self.batch.prefix_cache else { return };
        let m = &self.metrics;
        m.prefix_hits.inc_by(pc.hits - m.prefix_hits.get());
        m.prefix_misses.inc_by(pc.misses - m.prefix_misses.get());
        m.prefix_evictions.inc_by(pc.evictions - m.prefix_evictions.get());
        m.prefix_reused_tokens.inc_by(pc.reused_tokens - m.prefix_reused_tokens.get());
        m.prefix_bytes.set(pc.bytes() as i64);
    }

    /// Bring speculation's counters to /metrics.
    fn spec_metrics(&self) {
        let (m, s) = (&self.metrics, &self.batch.spec);
        m.spec_drafted.inc_by(s.drafted as u64 - m.spec_drafted.get());
        m.spec_accepted.inc_by(s.accepted as u64 - m.spec_accepted.get());
    }

    /// The next queued job: waited for (50 ms at most) when nothing runs, else only taken if
    /// one is there.
    fn next_job(&mut self) -> Option<Job> {
        let next = if self.live.is_empty() {
            match self.rx.recv_timeout(Duration::from_millis(50)) {
                Ok(j) => Ok(j),
                Err(mpsc::RecvTimeoutError::Timeout) => Err(false),
                Err(mpsc::RecvTimeoutError::Disconnected) => Err(true),
            }
        } else {
            match self.rx.try_recv() {
                Ok(j) => Ok(j),
                Err(mpsc::TryRecvError::Empty) => Err(false),
                Err(mpsc::TryRecvError::Disconnected) => Err(true),
            }
        };
        match next {
            Ok(job) => Some(job),
            Err(disconnected) => {
                self.disconnected |= disconnected;
                None
            }
        }
    }

    /// Nothing runs and nothing more will come: every handle is gone, or the server closed
    /// and its queue is empty.
    fn drained(&self) -> bool {
        self.disconnected || (self.handle.closing.load(Ordering::SeqCst) && self.handle.queued() == 0)
    }

    /// End the jobs whose client went away, whose deadline passed, or all of them once
    /// shutdown's grace is over.
    fn expire(&mut self) {
        let now = Instant::now();
        let abort = self.handle.abort.load(Ordering::SeqCst);
        let ids: Vec<usize> = self.live.keys().copied().collect();
        for id in ids {
            let l = &self.live[&id];
            let end = if abort {
                Some(JobEnd::Shutdown)
            } else if l.deadline.is_some_and(|d| now >= d) {
                Some(JobEnd::Deadline)
            } else {
                None
            };
            if l.events.is_closed() {
                self.metrics.cancelled.inc();
            } else if let Some(end) = end {
                let usage = self.batch.usage(id).unwrap_or_default();
                let thinking = report(self.model, &usage, l);
                let _ = l.events.send(JobEvent::Finished { end, usage, thinking });
                self.metrics.finished(end.name());
            } else {
                continue;
            }
            self.batch.remove(id);
            self.live.remove(&id);
        }
        self.metrics.running.set(self.live.len() as i64);
    }

    /// One decode step of the whole batch: its events and how long it took. `None` when the
    /// model failed: its jobs end with the error and serving goes on.
    fn step(&mut self) -> Option<(Vec<Event>, Duration)> {
        // Record the shares each job runs this step at (what the valve gave it).
        for (&id, l) in self.live.iter_mut() {
            if let Some(r) = self.batch.routing(id) {
                let shares: Vec<f64> = match &r.ratios {
                    Some(r) => r.clone(),
                    None => self.trained.clone(),
                };
                if l.share_sum.len() != shares.len() {
                    l.share_sum = vec![0.0; shares.len()];
                }
                l.share_sum.iter_mut().zip(&shares).for_each(|(s, x)| *s += x);
                l.share_steps += 1;
            }
        }
        let t0 = Instant::now();
        let events = match self.batch.step() {
            Ok(e) => e,
            Err(e) => {
                let msg = e.to_string();
                for (id, l) in self.live.drain() {
                    let _ = l.events.send(JobEvent::Failed(msg.clone()));
                    self.batch.remove(id);
                    self.metrics.finished("error");
                }
                return None;
            }
        };
        let took = t0.elapsed();
        self.metrics.step_seconds.observe(took.as_secs_f64());
        self.prefix_metrics();
        self.spec_metrics();
        self.metrics.batch_size.observe(self.live.len() as f64);
        Some((events, took))
    }

    /// Send each token to its job, and finish the jobs whose sequence ended.
    fn dispatch(&mut self, events: Vec<Event>) {
        let metrics = &self.metrics;
        for ev in events {
            match ev {
                Event::Token(t) => {
                    metrics.completion_tokens.inc();
                    if let Some(l) = self.live.get_mut(&t.seq) {
                        if l.first_token.is_none() {
                            l.first_token = Some(Instant::now());
                            metrics.time_to_first_token.observe(l.admitted.elapsed().as_secs_f64());
                        }
                        let ev = JobEvent::Token { id: t.id, text: t.text, depth: t.depth, logprob: t.logprob };
                        let _ = l.events.send(ev);
                    }
                }
                Event::Prompt { seq, logprobs } => {
                    if let Some(l) = self.live.get(&seq) {
                        let _ = l.events.send(JobEvent::Prompt(logprobs));
                    }
                }
                Event::Finished { seq, reason, usage, .. } => {
                    if let Some(l) = self.live.remove(&seq) {
                        let thinking = report(self.model, &usage, &l);
                        metrics.prompt_tokens.inc_by(usage.prompt_tokens as u64);
                        metrics.request_seconds.observe(l.admitted.elapsed().as_secs_f64());
                        if usage.completion_tokens > 1 {
                            if let Some(ft) = l.first_token {
                                let per = ft.elapsed().as_secs_f64() / (usage.completion_tokens - 1) as f64;
                                metrics.time_per_token.observe(per);
                            }
                        }
                        let end = JobEnd::Finished(reason);
                        metrics.finished(end.name());
                        let _ = l.events.send(JobEvent::Finished { end, usage, thinking });
                    }
                    self.batch.remove(seq);
                }
            }
        }
        metrics.running.set(self.live.len() as i64);
    }

    /// Feed the step's time to the valve; when it changes the scale, rescale the routed shares
    /// of every running job that did not pin its own.
    fn open_or_close_valve(&mut self, took: Duration) {
        let Some(scale) = self.valve.observe(took) else { return };
        self.metrics.share_scale.set(scale);
        if !self.routed {
            return;
        }
        for (&id, l) in &self.live {
            if l.pinned {
                continue;
            }
            if let Some(r) = self.batch.routing(id) {
                let mut r = r.clone();
                r.ratios = Some(scaled(&self.trained, scale, r.steps));
                self.batch.set_routing(id, r);
            }
        }
    }
}

/// The trained shares times `scale`, for `steps` steps (extended steps take the last share).
fn scaled(trained: &[f64], scale: f64, steps: Option<usize>) -> Vec<f64> {
    let n = steps.map(|s| s.saturating_sub(1)).unwrap_or(trained.len());
    (0..n).map(|i| trained.get(i).or(trained.last()).copied().unwrap_or(0.0) * scale).collect()
}

/// A finished job's thinking: the shares it got and what its extra steps cost.
fn report(model: &Model, usage: &SeqUsage, l: &Live) -> ThinkingReport {
    // Rounded to 6 places: sums of equal shares should read as the share.
    let ratios = if l.share_steps == 0 {
        vec![]
    } else {
        l.share_sum.iter().map(|s| (s / l.share_steps as f64 * 1e6).round() / 1e6).collect()
    };
    let cfg = &model.cfg;
    let tokens = usage.prompt_tokens + usage.completion_tokens;
    let per_step = crate::flops::block_token_flops(cfg);
    let dense = crate::flops::flops_per_token(cfg, tokens.max(1), Some(1), None).forward * tokens as f64;
    let thinking_flops = usage.extra_block_steps as f64 * per_step;
    ThinkingReport {
        ratios,
        extra_block_steps: usage.extra_block_steps,
        thinking_flops,
        total_flops: dense + thinking_flops,
        drafted: usage.drafted,
        accepted: usage.accepted,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// Feed `n` steps of `step` and return the scales the valve announced.
    fn feed(valve: &mut Valve, step: Duration, n: usize) -> Vec<f64> {
        (0..n).filter_map(|_| valve.observe(step)).collect()
    }

    #[test]
    fn the_valve_closes_to_its_floor_under_load_and_reopens_when_it_passes() {
        let mut valve = Valve::new(Some(10 * MS), 0.5);
        // Over the target: down by 0.8 at most every 4 steps, never below the floor.
        assert_eq!(feed(&mut valve, 20 * MS, 3), Vec::<f64>::new());
        assert_eq!(feed(&mut valve, 20 * MS, 1), vec![0.8]);
        assert_eq!(feed(&mut valve, 20 * MS, 3), Vec::<f64>::new());
        let down = feed(&mut valve, 20 * MS, 40);
        let want = [0.64, 0.512, 0.5];
        assert!(down.len() == 3 && down.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-12), "{down:?}");
        // Between 0.7 and 1 of the target the scale holds.
        let mut held = Valve { scale: 0.5, ewma: Some(8e-3), ..Valve::new(Some(10 * MS), 0.5) };
        assert_eq!(feed(&mut held, 8 * MS, 20), Vec::<f64>::new());
        // Well under it: back up by 1.25 per change, to 1 and no further.
        let up = feed(&mut valve, MS, 80);
        assert_eq!(up.last(), Some(&1.0), "{up:?}");
        assert!(up.windows(2).all(|w| w[1] > w[0]), "{up:?}");
        assert_eq!(valve.scale, 1.0);
    }

    #[test]
    fn without_a_target_the_valve_stays_open() {
        let mut valve = Valve::new(None, 0.25);
        assert_eq!(feed(&mut valve, Duration::from_secs(1), 100), Vec::<f64>::new());
        assert_eq!(valve.scale, 1.0);
    }

    #[test]
    fn scaled_shares_follow_the_steps_asked_for() {
        assert_eq!(scaled(&[0.8, 0.4], 0.5, None), vec![0.4, 0.2]);
        // Fewer steps: fewer shares; extended thinking: the last share repeats.
        assert_eq!(scaled(&[0.8, 0.4], 0.5, Some(2)), vec![0.4]);
        assert_eq!(scaled(&[0.8, 0.4], 1.0, Some(5)), vec![0.8, 0.4, 0.4, 0.4]);
    }
}
