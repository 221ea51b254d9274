//! AdamW with decoupled weight decay (Loshchilov & Hutter), gradient accumulation and
//! global-norm clipping. [`Optimizer`] is what a training step talks to: on the host in f32
//! ([`GradAccumulator`], [`AdamW`]), so that its state is plain vectors that a checkpoint
//! stores exactly and a resumed run continues bit for bit, or beside the parameters on their
//! device (`device`, DESIGN §15).
//!
//! Which tensors decay: matrices — linear weights and the embedding/head (rank 2) — but not
//! norm gains, router weights and biases, or step vectors phi (rank 1 or routers): decaying
//! those pulls gains and step encodings toward zero, which is not regularisation.

use crate::base::config::{TrainConfig, Trainable};
use crate::base::dist::Group;
use crate::Result;
use candle_core::backprop::GradStore;
use candle_core::Var;
use rayon::prelude::*;
use std::borrow::Cow;

pub mod device;
#[cfg(feature = "nccl")]
pub mod nccl;

/// The optimiser of a run, owning its state where it steps: on the host (the CPU) or beside the
/// parameters (a GPU, or the CPU when asked, to test that path; DESIGN §15). One step is
/// `zero`, `accumulate` per micro-batch, `sum_over` the ranks, `finish` (the gradient norm),
/// `update`; `state` is the host form a checkpoint saves and resumes from.
pub enum Optimizer {
    Host { acc: GradAccumulator, adam: AdamW },
    Device(device::DeviceOptimizer),
}

impl Optimizer {
    /// `state` (fresh zeros, or a checkpoint's moments) on the host, or moved beside the
    /// parameters when `on_device`; parameters `trainable` leaves out get no update.
    pub fn new(params: &[(String, Var)], trainable: Trainable, state: AdamW, on_device: bool) -> Result<Self> {
        Ok(if on_device {
            Optimizer::Device(device::DeviceOptimizer::from_host(&state, params, trainable)?)
        } else {
            Optimizer::Host { acc: GradAccumulator::with_trainable(params, trainable), adam: state }
        })
    }

    pub fn is_on_device(&self) -> bool {
        matches!(self, Optimizer::Device(_))
    }

    /// Start a new step.
    pub fn zero(&mut self) {
        match self {
            Optimizer::Host { acc, .. } => acc.zero(),
            Optimizer::Device(d) => d.acc.zero(),
        }
    }

    /// Add one backward pass's gradients.
    pub fn accumulate(&mut self, params: &[(String, Var)], grads: &GradStore) -> Result<()> {
        match self {
            Optimizer::Host { acc, .. } => acc.add(params, grads),
            Optimizer::Device(d) => d.acc.add(params, grads),
        }
    }

    /// Replace the sums by their sum over the ranks of `group`, added in rank order (the same
    /// bits on every rank); `micro_batches` is the whole step's count (DESIGN §14).
    pub fn sum_over(&mut self, params: &[(String, Var)], group: &Group, micro_batches: usize) -> Result<()> {
        match self {
            Optimizer::Host { acc, .. } => {
                group.sum_in_rank_order(&mut acc.sums)?;
                acc.micro_batches = micro_batches;
                Ok(())
            }
            // On a GPU: through NCCL with the `nccl` feature, else through the host.
            Optimizer::Device(d) => d.acc.sum_over(params, group, micro_batches),
        }
    }

    /// Average over the micro-batches; returns the global L2 norm of the averaged gradient.
    pub fn finish(&mut self) -> Result<f64> {
        match self {
            Optimizer::Host { acc, .. } => Ok(acc.finish()),
            Optimizer::Device(d) => d.acc.finish(),
        }
    }

    /// The averaged gradients on the host, one vector per parameter: those `wanted` accepts
    /// (on the host every one, as they already are there; read back from a device, the others
    /// empty).
    pub fn gradients(&self, params: &[(String, Var)], wanted: impl Fn(&str) -> bool) -> Result<Cow<'_, [Vec<f32>]>> {
        match self {
            Optimizer::Host { acc, .. } => Ok(Cow::Borrowed(&acc.sums)),
            Optimizer::Device(d) => Ok(Cow::Owned(d.acc.host_sums(params, wanted)?)),
        }
    }

    /// One AdamW update with the averaged gradients, clipped by `grad_norm` (from `finish`).
    pub fn update(&mut self, params: &[(String, Var)], grad_norm: f64, lr: f64, cfg: &TrainConfig) -> Result<()> {
        match self {
            Optimizer::Host { acc, adam } => adam.step(params, &acc.sums, grad_norm, lr, cfg),
            Optimizer::Device(d) => d.adam.step(params, &d.acc.sums, grad_norm, lr, cfg),
        }
    }

    /// The moments and update count as host vectors: what a checkpoint saves and ranks compare.
    pub fn state(&self) -> Result<Cow<'_, AdamW>> {
        match self {
            Optimizer::Host { adam, .. } => Ok(Cow::Borrowed(adam)),
            Optimizer::Device(d) => Ok(Cow::Owned(d.to_host()?)),
        }
    }
}

pub fn decays(name: &str, shape: &[usize]) -> bool {
    shape.len() == 2 && !name.contains(".router.")
}

/// Gradients summed over micro-batches, one flat vector per parameter.
pub struct GradAccumulator {
    pub sums: Vec<Vec<f32>>,
    pub micro_batches: usize,
    /// Frozen parameters: their gradients are not copied (their sums stay zero).
    frozen: Vec<bool>,
}

impl GradAccumulator {
    pub fn new(params: &[(String, Var)]) -> Self {
        Self::with_trainable(params, Trainable::All)
    }

    /// An accumulator that skips the parameters `trainable` leaves out.
    pub fn with_trainable(params: &[(String, Var)], trainable: Trainable) -> Self {
        GradAccumulator {
            sums: params.iter().map(|(_, v)| vec![0.0; v.elem_count()]).collect(),
            micro_batches: 0,
            frozen: params.iter().map(|(n, _)| !trainable.includes(n)).collect(),
        }
    }

    /// Add one backward pass's gradients; parameters without a gradient (not in the graph,
    /// e.g. the router of a skipped step) count as zero. The first pass after `zero` copies
    /// instead of adding to zeros (x + 0 = x exactly, so the sums are the same bits).
    pub fn add(&mut self, params: &[(String, Var)], grads: &GradStore) -> Result<()> {
        let first = self.micro_batches == 0;
        for (((_, var), sum), &frozen) in params.iter().zip(self.sums.iter_mut()).zip(&self.frozen) {
            if frozen {
                continue;
            }
            match grads.get(var.as_tensor()) {
                // Read in place (no host copy per micro-batch); `to_dtype` is free for f32.
                Some(g) => crate::ops::fused::with_data::<f32, _>(&g.to_dtype(candle_core::DType::F32)?, |d| {
                    sum.par_chunks_mut(CHUNK).zip(d.par_chunks(CHUNK)).for_each(|(s, d)| {
                        if first {
                            s.copy_from_slice(d);
                        } else {
                            s.iter_mut().zip(d).for_each(|(s, &x)| *s += x);
                        }
                    });
                    Ok(())
                })?,
                None if first => sum.par_chunks_mut(CHUNK).for_each(|s| s.fill(0.0)),
                None => {}
            }
        }
        self.micro_batches += 1;
        Ok(())
    }

    /// Average over micro-batches; returns the global L2 norm of the averaged gradient.
    ///
    /// The squares are summed in f64 over fixed chunks, each with eight interleaved partial
    /// sums (so the loop vectorises), and the chunks' sums added in order: the same bits on
    /// any number of threads.
    pub fn finish(&mut self) -> f64 {
        let scale = 1.0 / self.micro_batches.max(1) as f32;
        let mut sq = 0f64;
        for sum in &mut self.sums {
            let parts: Vec<f64> = sum
                .par_chunks_mut(CHUNK)
                .map(|chunk| {
                    if scale != 1.0 {
                        chunk.iter_mut().for_each(|s| *s *= scale);
                    }
                    let mut lanes = [0f64; 8];
                    let mut blocks = chunk.chunks_exact(8);
                    for b in &mut blocks {
                        for (l, &x) in lanes.iter_mut().zip(b) {
                            *l += (x as f64) * (x as f64);
                        }
                    }
                    for (l, &x) in lanes.iter_mut().zip(blocks.remainder()) {
                        *l += (x as f64) * (x as f64);
                    }
                    lanes.iter().sum::<f64>()
                })
                .collect();
            sq += parts.iter().sum::<f64>();
        }
        sq.sqrt()
    }

    /// Start a new optimiser step. The sums are overwritten by the next `add`.
    pub fn zero(&mut self) {
        self.micro_batches = 0;
    }
}

/// Element-wise passes split into chunks of this many values, one per rayon task.
const CHUNK: usize = 1 << 15;

/// A parameter's weight decay (lr * weight_decay for `decays` ones) and step size, in f32 as
/// both optimisers (host and `device`) apply them. Routers and step vectors form their own
/// group: lr * thinking_lr_scale, no decay (`decays` leaves them out; docs/DESIGN.md §4.7).
pub(crate) fn param_group(name: &str, dims: &[usize], lr: f64, step_size: f32, cfg: &TrainConfig) -> (f32, f32) {
    let decay = if decays(name, dims) { (lr * cfg.weight_decay) as f32 } else { 0.0 };
    let step_size = if name.contains(".think.") { step_size * cfg.thinking_lr_scale as f32 } else { step_size };
    (decay, step_size)
}

/// AdamW state: first and second moments per parameter, and the number of updates.
#[derive(Clone, Debug, PartialEq)]
pub struct AdamW {
    pub m: Vec<Vec<f32>>,
    pub v: Vec<Vec<f32>>,
    pub t: u64,
}

impl AdamW {
    pub fn new(params: &[(String, Var)]) -> Self {
        AdamW {
            m: params.iter().map(|(_, v)| vec![0.0; v.elem_count()]).collect(),
            v: params.iter().map(|(_, v)| vec![0.0; v.elem_count()]).collect(),
            t: 0,
        }
    }

    /// One update with the (averaged) gradients; clips to `cfg.grad_clip` using `grad_norm`.
    pub fn step(
        &mut self,
        params: &[(String, Var)],
        grads: &[Vec<f32>],
        grad_norm: f64,
        lr: f64,
        cfg: &TrainConfig,
    ) -> Result<()> {
        self.t += 1;
        let clip =
            if cfg.grad_clip > 0.0 && grad_norm > cfg.grad_clip { (cfg.grad_clip / grad_norm) as f32 } else { 1.0 };
        let (b1, b2) = (cfg.beta1 as f32, cfg.beta2 as f32);
        let bc1 = 1.0 - cfg.beta1.powi(self.t as i32);
        let bc2 = 1.0 - cfg.beta2.powi(self.t as i32);
        let step_size = (lr / bc1) as f32;
        let bc2_sqrt = bc2.sqrt() as f32;
        let eps = cfg.eps as f32;
        for (i, (name, var)) in params.iter().enumerate() {
            if !cfg.trainable.includes(name) {
                continue;
            }
            let (decay, step_size) = param_group(name, var.dims(), lr, step_size, cfg);
            let (m, v, g) = (&mut self.m[i], &mut self.v[i], &grads[i]);
            // Element-wise, so chunks on several threads give the same bits as one loop; the
            // zipped iterators (no indexing) let LLVM vectorise, sqrt and division included.
            let update = |p: &mut [f32]| {
                p.par_chunks_mut(CHUNK)
                    .zip(m.par_chunks_mut(CHUNK))
                    .zip(v.par_chunks_mut(CHUNK))
                    .zip(g.par_chunks(CHUNK))
                    .for_each(|(((p, m), v), g)| {
                        for (((p, m), v), &g) in p.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(g) {
                            let gj = g * clip;
                            *m = b1 * *m + (1.0 - b1) * gj;
                            *v = b2 * *v + (1.0 - b2) * gj * gj;
                            *p -= decay * *p;
                            *p -= step_size * *m / (v.sqrt() / bc2_sqrt + eps);
                        }
                    });
            };
            // The parameter's own storage is updated in place (no copies out and back).
            var.as_tensor().inplace_op1(&InPlace(std::sync::Mutex::new(update)))?;
        }
        Ok(())
    }
}

/// Runs a closure on a tensor's values in place: f32 storage directly; other float dtypes
/// (f64 parameters of gradient checks) through an f32 copy, as `to_dtype` would.
struct InPlace<F>(std::sync::Mutex<F>);

impl<F: FnMut(&mut [f32])> candle_core::InplaceOp1 for InPlace<F> {
    fn name(&self) -> &'static str {
        "itt-adamw-update"
    }

    fn cpu_fwd(&self, storage: &mut candle_core::CpuStorage, layout: &candle_core::Layout) -> candle_core::Result<()> {
        use candle_core::CpuStorage;
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("AdamW: a parameter is not contiguous");
        };
        let mut f = self.0.lock().unwrap();
        match storage {
            CpuStorage::F32(d) => f(&mut d[start..end]),
            CpuStorage::F64(d) => {
                let mut tmp: Vec<f32> = d[start..end].iter().map(|&x| x as f32).collect();
                f(&mut tmp);
                d[start..end].iter_mut().zip(tmp).for_each(|(x, y)| *x = y as f64);
            }
            _ => candle_core::bail!("AdamW: parameters must be f32 or f64"),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Tensor};

    #[test]
    fn accumulator_overwrites_after_zero_and_averages_micro_batches() {
        let dev = Device::Cpu;
        let a = Var::from_tensor(&Tensor::new(&[1.0f32, 2.0, 3.0], &dev).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::new(&[1.0f32], &dev).unwrap()).unwrap();
        let params = vec![("a".to_string(), a.clone()), ("b".to_string(), b.clone())];
        let mut acc = GradAccumulator::new(&params);
        // Step 1: both parameters get gradients.
        let both = (a.as_tensor().sum_all().unwrap() * 2.0).unwrap() + (b.as_tensor().sum_all().unwrap() * 5.0);
        acc.add(&params, &both.unwrap().backward().unwrap()).unwrap();
        assert_eq!(acc.sums, vec![vec![2.0, 2.0, 2.0], vec![5.0]]);
        // Step 2: two micro-batches; `b` has no gradient, so its stale sum must not survive.
        acc.zero();
        let only_a = |k: f64| (a.as_tensor().sqr().unwrap().sum_all().unwrap() * k).unwrap();
        acc.add(&params, &only_a(1.0).backward().unwrap()).unwrap();
        acc.add(&params, &only_a(3.0).backward().unwrap()).unwrap();
        let norm = acc.finish();
        // d/da (1 + 3) a^2 / 2 micro-batches = 4a.
        assert_eq!(acc.sums, vec![vec![4.0, 8.0, 12.0], vec![0.0]]);
        assert!((norm - (16.0f64 + 64.0 + 144.0).sqrt()).abs() < 1e-12);
    }

    #[test]
    fn adamw_updates_in_place_for_every_clone_and_in_f64() {
        let dev = Device::Cpu;
        let cfg = TrainConfig { weight_decay: 0.0, grad_clip: 0.0, ..Default::default() };
        for dtype in [DType::F32, DType::F64] {
            let var = Var::from_tensor(&Tensor::new(&[1.0f32, -2.0], &dev).unwrap().to_dtype(dtype).unwrap()).unwrap();
            let alias = var.as_tensor().clone(); // as the model holds it
            let params = vec![("w".to_string(), var.clone())];
            let mut opt = AdamW::new(&params);
            opt.step(&params, &[vec![0.5, -0.25]], 0.0, 0.01, &cfg).unwrap();
            let got = alias.to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap();
            assert!((got[0] - 0.99).abs() < 1e-6 && (got[1] + 1.99).abs() < 1e-6, "{dtype:?}: {got:?}");
        }
    }

    #[test]
    fn adamw_matches_hand_computed_update() {
        let var = Var::from_tensor(&Tensor::new(&[[1.0f32, -2.0]], &Device::Cpu).unwrap()).unwrap();
        let params = vec![("w.weight".to_string(), var.clone())];
        let cfg = TrainConfig { weight_decay: 0.1, grad_clip: 0.0, ..Default::default() };
        let mut opt = AdamW::new(&params);
        opt.step(&params, &[vec![0.5, -0.25]], 0.0, 0.01, &cfg).unwrap();
        // First step: m_hat = g, v_hat = g^2, so the update is lr * sign(g) (up to eps).
        let got = var.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let want = [1.0 * (1.0 - 0.001) - 0.01, -2.0 * (1.0 - 0.001) + 0.01];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{got:?} vs {want:?}");
        }
    }

    #[test]
    fn frozen_parameters_are_neither_updated_nor_counted() {
        let dev = Device::Cpu;
        let frozen = Var::from_tensor(&Tensor::new(&[1.0f32, 2.0], &dev).unwrap()).unwrap();
        let phi = Var::from_tensor(&Tensor::new(&[0.5f32, 0.5], &dev).unwrap()).unwrap();
        let params = vec![
            ("layers.1.attn.wq.weight".to_string(), frozen.clone()),
            ("layers.1.think.phi.2".to_string(), phi.clone()),
        ];
        let loss = (frozen.as_tensor().sum_all().unwrap() * 3.0).unwrap()
            + (phi.as_tensor().sum_all().unwrap() * 4.0).unwrap();
        let grads = loss.unwrap().backward().unwrap();
        let mut acc = GradAccumulator::with_trainable(&params, Trainable::Thinking);
        acc.add(&params, &grads).unwrap();
        assert_eq!(acc.sums[0], vec![0.0, 0.0]);
        // Only phi's gradient (4, 4) is in the norm.
        assert!((acc.finish() - 32f64.sqrt()).abs() < 1e-9);
        let cfg = TrainConfig { trainable: Trainable::Thinking, weight_decay: 0.1, ..Default::default() };
        let mut opt = AdamW::new(&params);
        opt.step(&params, &acc.sums, 0.0, 0.01, &cfg).unwrap();
        assert_eq!(frozen.as_tensor().to_vec1::<f32>().unwrap(), vec![1.0, 2.0]);
        assert_ne!(phi.as_tensor().to_vec1::<f32>().unwrap(), vec![0.5, 0.5]);
    }

    #[test]
    fn thinking_parameters_take_their_own_learning_rate() {
        let dev = Device::Cpu;
        let w = Var::from_tensor(&Tensor::new(&[1.0f32, 1.0], &dev).unwrap()).unwrap();
        let phi = Var::from_tensor(&Tensor::new(&[1.0f32, 1.0], &dev).unwrap()).unwrap();
        let params = vec![
            ("layers.1.mlp_norm.weight".to_string(), w.clone()),
            ("layers.1.think.phi.2".to_string(), phi.clone()),
        ];
        let cfg = TrainConfig { thinking_lr_scale: 4.0, grad_clip: 0.0, ..Default::default() };
        let mut opt = AdamW::new(&params);
        opt.step(&params, &[vec![0.5, 0.5], vec![0.5, 0.5]], 0.0, 0.01, &cfg).unwrap();
        // First Adam step moves each by lr * sign(g) (up to eps): 0.01 and 0.04.
        let moved = |v: &Var| 1.0 - v.as_tensor().to_vec1::<f32>().unwrap()[0];
        assert!((moved(&w) - 0.01).abs() < 1e-6 && (moved(&phi) - 0.04).abs() < 1e-6, "{} {}", moved(&w), moved(&phi));
    }

    #[test]
    fn which_tensors_decay() {
        assert!(decays("layers.0.attn.wq.weight", &[4, 4]));
        assert!(decays("embed.weight", &[10, 4]));
        assert!(!decays("layers.0.attn_norm.weight", &[4]));
        assert!(!decays("layers.1.think.router.2.weight", &[1, 4]));
        assert!(!decays("layers.1.think.phi.2", &[4]));
    }
}
