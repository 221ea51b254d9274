//! `itt serve`: an OpenAI-compatible HTTP server (DESIGN §12).
//!
//! - `engine`: the model's thread, continuous batching over `generate::Batch`, no HTTP.
//! - `api`: request bodies and their checks; `http`: the axum routes and SSE streams.
//! - `template`: chat templates; `metrics`: Prometheus metrics; `bench`: the load benchmark.

pub mod api;
pub mod bench;
pub mod engine;
pub mod http;
pub mod metrics;
pub mod template;

use crate::data::Tokenizer;
use crate::model::{Model, RouterCalibration};
use crate::{Error, Result};
use engine::{EngineConfig, EngineHandle};
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

/// Everything the server needs besides the model.
pub struct ServeOptions {
    pub engine: EngineConfig,
    /// The name clients use in `model` (and `/v1/models` lists).
    pub name: String,
    pub template: template::ChatTemplate,
    pub calibration: Option<Arc<RouterCalibration>>,
    /// Seed of requests that give none (each request gets its own, counted from this).
    pub seed: u64,
    /// After SIGTERM (or `Server::stop`), running requests get this long to finish before they
    /// end with finish_reason "shutdown".
    pub grace: Duration,
    /// Drafted tokens per verify pass for requests that do not set `thinking.speculate`
    /// (self-speculative decoding, DESIGN §12); 0 = off.
    pub speculate: usize,
}

/// A server running on its own threads (tokio runtime and engine).
pub struct Server {
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
}

impl Server {
    /// Bind `addr` (port 0 picks a free one) and serve until `stop` or SIGTERM/SIGINT.
    pub fn start(model: Model, tok: Tokenizer, opts: ServeOptions, addr: SocketAddr) -> Result<Server> {
        // The same bound as a request's `thinking.speculate`: a server default no request could
        // ask for itself would only slow every request down (each draft past the accepted
        // prefix is wasted work).
        let most = api::MAX_SPECULATE;
        if opts.speculate > most {
            return Err(Error::usage(format!("--speculate must be between 0 and {most} (got {})", opts.speculate)));
        }
        if opts.speculate > 0 {
            let routing = crate::model::RoutingOptions::default();
            if let Some(why) = crate::speculate::unsupported(&model, &routing, true) {
                return Err(Error::usage(format!("--speculate: {why}")));
            }
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .thread_name("itt-http")
            .build()
            .map_err(|e| Error::usage(format!("cannot start the async runtime: {e}")))?;
        let listener = rt
            .block_on(tokio::net::TcpListener::bind(addr))
            .map_err(|e| Error::usage(format!("cannot listen on {addr}: {e}")))?;
        let addr = listener.local_addr().map_err(|e| Error::usage(e.to_string()))?;
        let metrics = Arc::new(metrics::Metrics::new());
        let model = Arc::new(model);
        let tok = Arc::new(tok);
        let (engine, engine_thread) = engine::start(model.clone(), tok.clone(), opts.engine.clone(), metrics.clone())?;
        let state = Arc::new(http::AppState {
            model,
            tok,
            calibration: opts.calibration,
            template: opts.template,
            engine: engine.clone(),
            metrics,
            name: opts.name,
            created: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            next_id: AtomicU64::new(0),
            seed: opts.seed,
            speculate: opts.speculate,
        });
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let grace = opts.grace;
        let thread = std::thread::Builder::new()
            .name("itt-serve".into())
            .spawn(move || {
                let r = rt.block_on(serve(listener, state, engine.clone(), stop_rx, grace));
                // The state (and its handle) is gone with the server; the engine ends when the
                // last handle does.
                drop(engine);
                let _ = engine_thread.join();
                r
            })
            .map_err(|e| Error::usage(format!("cannot start the server thread: {e}")))?;
        Ok(Server { addr, stop: Some(stop_tx), thread: Some(thread) })
    }

    /// Shut down gracefully (as on SIGTERM) and wait for it.
    pub fn stop(mut self) -> Result<()> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        self.wait()
    }

    /// Wait until the server stops (on SIGTERM or SIGINT).
    pub fn wait(mut self) -> Result<()> {
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(Error::usage("the server thread panicked")),
            None => Ok(()),
        }
    }
}

async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<http::AppState>,
    engine: EngineHandle,
    stop: tokio::sync::oneshot::Receiver<()>,
    grace: Duration,
) -> Result<()> {
    let app = http::router(state);
    let (begin_tx, begin_rx) = tokio::sync::watch::channel(false);
    let signal = async move {
        let term = async {
            #[cfg(unix)]
            if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                s.recv().await;
                return;
            }
            std::future::pending::<()>().await
        };
        tokio::select! {
            _ = stop => {},
            _ = term => {},
            _ = tokio::signal::ctrl_c() => {},
        }
        let _ = begin_tx.send(true);
    };
    // Once shutdown begins: refuse new jobs at once; after the grace period end running ones.
    let engine2 = engine.clone();
    let mut begin = begin_rx.clone();
    tokio::spawn(async move {
        if begin.wait_for(|b| *b).await.is_ok() {
            engine2.close();
            tokio::time::sleep(grace).await;
            engine2.abort();
        }
    });
    axum::serve(listener, app)
        .with_graceful_shutdown(signal)
        .await
        .map_err(|e| Error::usage(format!("the server failed: {e}")))?;
    engine.close();
    Ok(())
}
