//! The command-line interface: clap argument structs and the call into the library that each
//! command makes. `src/main.rs` only parses and reports errors; everything a command does is
//! a library call (training, evaluation, generation, analysis), so the CLI and any other front
//! end (tests, a server) run the same code.

mod eval;
mod inspect;
mod serve;
mod train;

use crate::base::config::{self, RunConfig};
use crate::model::{Routing, RoutingOptions};
use crate::{Error, Result};
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

pub use eval::{CalibrateArgs, EvalArgs, GenerateArgs};
pub use inspect::{AnalyzeCmd, BenchArgs, ConvertArgs, ExportArgs, InfoArgs, ReportArgs, TokenizerCmd, VerifyArgs};
pub use serve::{ServeArgs, ServeBenchArgs};
pub use train::{DemoArgs, ExperimentArgs, RetrofitArgs, TrainArgs};

#[derive(Parser)]
#[command(name = "itt", version, about = "Inner Thinking Transformers: train, evaluate, analyse and serve them on CPU")]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Cmd,
    /// Load checkpoints without checking their files' sha256 against the manifest (sizes only).
    #[arg(long, global = true)]
    pub no_verify: bool,
}

#[derive(Subcommand)]
pub enum Cmd {
    /// The main job: train a tiny ITT model on the built-in data, evaluate it, sample from it.
    Demo(DemoArgs),
    /// Train a model (from a preset or config) on a corpus; resumable.
    Train(TrainArgs),
    /// Loss, perplexity and bits per byte of a checkpoint on a text or dataset.
    Eval(EvalArgs),
    /// Generate text from a checkpoint, streamed to stdout.
    Generate(GenerateArgs),
    /// Serve a model over HTTP: OpenAI-compatible API with continuous batching and per-request thinking.
    Serve(ServeArgs),
    /// Parameters and FLOPs per token of a preset, config or checkpoint.
    Info(InfoArgs),
    /// Tokenizer tools.
    Tokenizer {
        #[command(subcommand)]
        cmd: TokenizerCmd,
    },
    /// Measure training tokens/s and peak memory of a preset (a benchmark, not a test).
    Bench(BenchArgs),
    /// Compute router thresholds for causal routing from text, for a checkpoint without them.
    Calibrate(CalibrateArgs),
    /// The paper's comparisons at small scale: table1, table2, table3, fig4, scaling, steps, recipe.
    Experiment(ExperimentArgs),
    /// See the thinking: per-token depth maps, router statistics, the gradient-spike study.
    Analyze {
        #[command(subcommand)]
        cmd: AnalyzeCmd,
    },
    /// A self-contained HTML report of a training run: curves, routers, FLOPs, sample generations.
    Report(ReportArgs),
    /// Import a pretrained LLaMA model (GGUF file or Hugging Face folder) as an itt checkpoint.
    Convert(ConvertArgs),
    /// Write a model as an itt checkpoint, a Hugging Face LLaMA folder or a llama GGUF.
    Export(ExportArgs),
    /// Turn a pretrained dense model into ITT (every other layer thinks) and fine-tune it.
    Retrofit(RetrofitArgs),
    /// Check a checkpoint's files (or every checkpoint of a run) against their manifest's sha256.
    Verify(VerifyArgs),
}

/// Where the model runs (DESIGN §15).
#[derive(Args, Clone, Default)]
pub struct DeviceArg {
    /// cpu, cuda (GPU 0) or cuda:N; a GPU needs an itt built with `--features cuda`.
    #[arg(long, default_value = "cpu")]
    pub device: crate::base::util::DeviceSpec,
}

impl DeviceArg {
    pub fn open(&self) -> Result<candle_core::Device> {
        crate::base::util::open_device(self.device)
    }
}

/// Where a model's configuration comes from.
#[derive(Args, Clone)]
pub struct ModelSource {
    /// A named preset: tiny, small, paper-162m, paper-230m, paper-466m, each also -loopT / -ittT (T = 2, 3, 4).
    #[arg(long)]
    pub preset: Option<String>,
    /// A JSON run config (see `itt info --preset tiny --json` for the format).
    #[arg(long)]
    pub config: Option<PathBuf>,
}

impl ModelSource {
    pub fn load(&self, default: &str) -> Result<RunConfig> {
        Ok(self.load_vocab(default)?.0)
    }

    /// The config, and whether its vocabulary is the tokenizer's: a preset's, or a config
    /// file's whose `model.vocab_size` is null.
    pub fn load_vocab(&self, default: &str) -> Result<(RunConfig, bool)> {
        match (&self.preset, &self.config) {
            (Some(_), Some(_)) => Err(Error::usage("give either --preset or --config, not both")),
            (None, Some(path)) => RunConfig::load_open_vocab(path),
            (p, None) => Ok((config::preset(p.as_deref().unwrap_or(default))?, true)),
        }
    }
}

/// Elastic-inference and routing settings (DESIGN §5, §6).
#[derive(Args, Clone, Default)]
pub struct RoutingArgs {
    /// Share of tokens per routed step, e.g. 0.5,0.5,0.5 (default: the trained ratios).
    #[arg(long, value_delimiter = ',')]
    pub ratios: Option<Vec<f64>>,
    /// Number of thinking steps to run: fewer than the trained T, or up to 4 more (extended
    /// thinking: the extra steps reuse the last step's router, step vector and share).
    #[arg(long)]
    pub steps: Option<usize>,
    /// topk (the paper's rule, not causal) or threshold (causal, needs stored thresholds).
    #[arg(long)]
    pub routing: Option<Routing>,
    /// Stop giving a token further steps once its router weight falls below this (in [0, 1]).
    #[arg(long)]
    pub early_exit: Option<f32>,
}

impl RoutingArgs {
    pub fn options(
        &self,
        calibration: Option<&crate::model::RouterCalibration>,
        default: Routing,
    ) -> Result<RoutingOptions> {
        let mode = self.routing.unwrap_or(default);
        if let Some(e) = self.early_exit {
            // A router weight is in (0, 1): the same bound as a request's thinking.early_exit.
            if !(e.is_finite() && (0.0..=1.0).contains(&e)) {
                return Err(Error::usage(format!("--early-exit must be in [0, 1] (got {e})")));
            }
        }
        Ok(RoutingOptions {
            mode,
            calibration: calibration.cloned().map(std::sync::Arc::new),
            ratios: self.ratios.clone(),
            steps: self.steps,
            early_exit: self.early_exit,
            forced: None,
        })
    }
}

/// Run one parsed command.
pub fn run(cli: Cli) -> Result<()> {
    crate::checkpoint::set_verify(!cli.no_verify);
    // P copies of any other command would each do the whole job, writing the same files.
    if let (Some(p), false) = (crate::base::dist::launched_size().filter(|&p| p > 1), matches!(cli.cmd, Cmd::Train(_)))
    {
        return Err(crate::Error::usage(format!(
            "started by mpirun with {p} ranks, but only `itt train` runs data-parallel; run this command as one process"
        )));
    }
    match cli.cmd {
        Cmd::Demo(a) => train::demo(a),
        Cmd::Train(a) => train::train(a),
        Cmd::Retrofit(a) => train::retrofit(a),
        Cmd::Experiment(a) => train::experiment(a),
        Cmd::Eval(a) => eval::eval(a),
        Cmd::Generate(a) => eval::generate(a),
        Cmd::Serve(a) => serve::serve(a),
        Cmd::Calibrate(a) => eval::calibrate(a),
        Cmd::Info(a) => inspect::info(a),
        Cmd::Tokenizer { cmd } => inspect::tokenizer(cmd),
        Cmd::Bench(a) => inspect::bench(a),
        Cmd::Analyze { cmd } => inspect::analyze(cmd),
        Cmd::Report(a) => inspect::report(a),
        Cmd::Convert(a) => inspect::convert(a),
        Cmd::Export(a) => inspect::export(a),
        Cmd::Verify(a) => inspect::verify(&a.path),
    }
}
