//! `itt`: Inner Thinking Transformers (Chen et al., arXiv 2502.13842) on candle, CPU first.
//!
//! Layout follows the architecture: `config` (presets), `model` (backbone and the thinking
//! layer), `ops` (kernels with their backward passes), `data` (tokenizers, corpora, shards),
//! `train`, `checkpoint`, `eval`, `generate`.

// `!(x > 0.0)` is deliberate in validation: it also rejects NaN.
#![allow(clippy::neg_cmp_op_on_partial_ord)]

pub mod analysis;
pub mod bench;
pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod data;
pub mod demo;
pub mod dist;
pub mod error;
pub mod eval;
pub mod experiment;
pub mod flops;
pub mod generate;
pub mod import;
pub mod model;
pub mod ops;
pub mod optim;
pub mod report;
pub mod rng;
pub mod serve;
pub mod train;
pub mod util;

pub use error::{Error, Result};
