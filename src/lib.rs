//! `itt`: Inner Thinking Transformers (Chen et al., arXiv 2502.13842) on candle, CPU first.
//!
//! The modules from the top floor down; each imports only from those listed below it
//! (docs/DESIGN.md, "The layers"):
//!
//! - [`cli`]: the subcommands' flags and the one library call each makes.
//! - [`apps`]: what is built on training, evaluation and serving:
//!   - [`apps::experiment`]: the paper's comparisons at small scale, a grid of training runs.
//!   - [`apps::analysis`]: depth maps, router statistics, gradient spikes, run reports.
//!   - [`apps::bench`]: benchmarks that print numbers (training step, decode, GEMM).
//!   - [`apps::demo`]: `itt demo`, a tiny ITT trained, evaluated and sampled end to end.
//!   - [`apps::report`]: the human-readable tables and summaries the commands print.
//! - [`import`]: pretrained LLaMA-architecture models (GGUF, Hugging Face) and retrofitting.
//! - [`train`]: the training loop, its launch, validation, metrics and exact resume.
//! - [`serve`]: `itt serve`, an OpenAI-compatible HTTP server over the generation engine.
//! - [`eval`]: loss, perplexity, bits per byte, and the paper's benchmarks.
//! - [`generate`]: batched generation with KV caches and seeded sampling.
//! - [`checkpoint`]: checkpoint folders, written atomically, with a `latest` pointer.
//! - [`model`]: the LLaMA-style decoder and the thinking layer.
//! - [`optim`]: AdamW, its state on the host or on the device.
//! - [`data`]: tokenizers, corpora, the synthetic corpus, memory-mapped token shards.
//! - [`ops`]: tensor operations with their backward passes, and the fused CPU kernels.
//! - [`flops`]: analytic compute per token.
//! - [`base`]: what every floor stands on:
//!   - [`base::config`]: configuration as plain data: presets and derived values.
//!   - [`base::util`]: process-level helpers: atomic writes, devices, threads, memory.
//!   - [`base::dist`]: the MPI process group and the collectives training needs.
//!   - [`base::rng`]: the seedable, serialisable random number generator.
//!   - [`base::error`]: the library's one error type.

// `!(x > 0.0)` is deliberate in validation: it also rejects NaN.
#![allow(clippy::neg_cmp_op_on_partial_ord)]

pub mod apps;
pub mod base;
pub mod checkpoint;
pub mod cli;
pub mod data;
pub mod eval;
pub mod flops;
pub mod generate;
pub mod import;
pub mod model;
pub mod ops;
pub mod optim;
pub mod serve;
pub mod speculate;
pub mod train;

pub use base::error::{Error, Result};
