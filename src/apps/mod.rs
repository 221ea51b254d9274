//! The applications: what `itt` builds on training, evaluation and serving (the paper's
//! experiments, the analysis of runs, benchmarks, the demo, and the reports they print).
//! Nothing below this folder imports from it; `cli` above calls it.

pub mod analysis;
pub mod bench;
pub mod demo;
pub mod experiment;
pub mod report;
