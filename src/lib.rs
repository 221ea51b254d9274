//! `itt`: Inner Thinking Transformers (Chen et al., arXiv 2502.13842) on candle, CPU first.
//!
//! Layout follows the architecture: `config` (presets), `model` (backbone and the thinking
//! layer), `ops` (kernels with their backward passes), `data` (tokenizers, corpora, shards),
//! `train`, `checkpoint`, `eval`, `generate`.

pub mod bench;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod demo;
pub mod error;
pub mod eval;
pub mod flops;
pub mod generate;
pub mod import;
pub mod model;
pub mod ops;
pub mod optim;
pub mod report;
pub mod rng;
pub mod train;
pub mod util;

pub use error::{Error, Result};
