//! Benchmarks that print numbers (never asserted in tests): training step throughput and
//! peak memory for a configuration, on random tokens.

use crate::config::RunConfig;
use crate::flops::flops_per_token;
use crate::model::{Model, RoutingOptions};
use crate::optim::{AdamW, GradAccumulator};
use crate::rng::Rng;
use crate::Result;
use candle_core::Device;
use serde::Serialize;
use std::time::Instant;

#[derive(Clone, Debug, Serialize)]
pub struct TrainBench {
    pub preset: Option<String>,
    pub params: usize,
    pub batch: usize,
    pub seq_len: usize,
    pub steps: usize,
    /// Median seconds per optimiser step (forward + backward + AdamW).
    pub step_s_median: f64,
    pub step_s_min: f64,
    pub tokens_per_s: f64,
    /// Analytic training FLOPs per token and the rate they imply at the median step time.
    pub train_flops_per_token: f64,
    pub gflops_per_s: f64,
    pub peak_rss_mb: f64,
    pub threads: usize,
}

impl TrainBench {
    pub fn table(&self) -> String {
        format!(
            "preset {} | {:.2}M params | batch {}x{} | {} steps\n\
             step {:.3} s median ({:.3} min) | {:.0} tokens/s | {:.1} GFLOP/s | peak RSS {:.0} MiB | {} threads",
            self.preset.as_deref().unwrap_or("custom"),
            self.params as f64 / 1e6,
            self.batch,
            self.seq_len,
            self.steps,
            self.step_s_median,
            self.step_s_min,
            self.tokens_per_s,
            self.gflops_per_s,
            self.peak_rss_mb,
            self.threads
        )
    }
}

/// Time `steps` training steps (after one warm-up step) of the configuration.
pub fn train_step(cfg: &RunConfig, steps: usize) -> Result<TrainBench> {
    let model = Model::new(&cfg.model, cfg.train.seed, &Device::Cpu)?;
    let (b, t) = (cfg.train.batch_size, cfg.train.seq_len);
    let mut rng = Rng::new(cfg.train.seed);
    let mut opt = AdamW::new(&model.params);
    let mut acc = GradAccumulator::new(&model.params);
    let mut times = vec![];
    for i in 0..steps.max(1) + 1 {
        let v = cfg.model.vocab_size as u64;
        let inp: Vec<u32> = (0..b * t).map(|_| rng.below(v) as u32).collect();
        let tgt: Vec<u32> = (0..b * t).map(|_| rng.below(v) as u32).collect();
        let t0 = Instant::now();
        acc.zero();
        let loss = model.loss(&inp, &tgt, b, t, &RoutingOptions::default(), None)?;
        let grads = loss.backward()?;
        acc.add(&model.params, &grads)?;
        let norm = acc.finish();
        opt.step(&model.params, &acc.sums, norm, 1e-4, &cfg.train)?;
        if i > 0 {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    times.sort_by(|a, b| a.total_cmp(b));
    let med = times[times.len() / 2];
    let f = flops_per_token(&cfg.model, t, None, None);
    Ok(TrainBench {
        preset: cfg.preset.clone(),
        params: model.n_params(),
        batch: b,
        seq_len: t,
        steps: times.len(),
        step_s_median: med,
        step_s_min: times[0],
        tokens_per_s: (b * t) as f64 / med,
        train_flops_per_token: f.train,
        gflops_per_s: f.train * (b * t) as f64 / med / 1e9,
        peak_rss_mb: crate::util::peak_rss_mb(),
        threads: candle_core::utils::get_num_threads(),
    })
}
