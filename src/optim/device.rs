//! The optimiser for parameters on a GPU (DESIGN §15): the same AdamW as `optim::AdamW` —
//! the same formula, clipping, weight-decay rule (`optim::decays`), thinking-parameter group
//! and learning rate — with the gradient sums and both moments kept as tensors beside the
//! parameters and the update composed from tensor ops, so a step moves nothing to the host
//! but the gradient norm. The host optimiser stays the one for the CPU: its fixed-order sums
//! make a resumed run equal the uninterrupted one bit for bit, which tensor reductions on a
//! GPU do not promise.
//!
//! Checkpoints stay device-independent: the state converts to and from `optim::AdamW`
//! ([`DeviceOptimizer::from_host`], [`DeviceOptimizer::to_host`]), which is what is saved.

use super::{param_group, AdamW};
use crate::base::config::{TrainConfig, Trainable};
use crate::base::dist::Group;
use crate::Result;
use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};

/// Gradients summed over micro-batches, one tensor per parameter on its device; `None` until
/// the first micro-batch of a step (and for frozen parameters, which get no update).
pub struct DeviceAccumulator {
    pub sums: Vec<Option<Tensor>>,
    pub micro_batches: usize,
    frozen: Vec<bool>,
    /// The NCCL communicator of a distributed run on GPUs, made at the first `sum_over`.
    #[cfg(feature = "nccl")]
    nccl: Option<super::nccl::NcclComm>,
}

impl DeviceAccumulator {
    pub fn with_trainable(params: &[(String, Var)], trainable: Trainable) -> Self {
        DeviceAccumulator {
            sums: vec![None; params.len()],
            micro_batches: 0,
            frozen: params.iter().map(|(n, _)| !trainable.includes(n)).collect(),
            #[cfg(feature = "nccl")]
            nccl: None,
        }
    }

    /// Add one backward pass's gradients; a parameter without a gradient counts as zero.
    pub fn add(&mut self, params: &[(String, Var)], grads: &GradStore) -> Result<()> {
        for (((_, var), sum), &frozen) in params.iter().zip(self.sums.iter_mut()).zip(&self.frozen) {
            if frozen {
                continue;
            }
            if let Some(g) = grads.get(var.as_tensor()) {
                let g = g.to_dtype(DType::F32)?;
                *sum = Some(match sum.take() {
                    Some(s) => (s + g)?,
                    None => g,
                });
            }
        }
        self.micro_batches += 1;
        Ok(())
    }

    /// Average over micro-batches; returns the global L2 norm of the averaged gradient (the
    /// one value read back to the host per step).
    pub fn finish(&mut self) -> Result<f64> {
        let scale = 1.0 / self.micro_batches.max(1) as f64;
        let mut squares = vec![];
        for sum in self.sums.iter_mut().flatten() {
            if scale != 1.0 {
                *sum = sum.affine(scale, 0.0)?;
            }
            squares.push(sum.sqr()?.sum_all()?);
        }
        if squares.is_empty() {
            return Ok(0.0);
        }
        let total = Tensor::stack(&squares, 0)?.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?;
        Ok(total.sqrt())
    }

    /// Start a new optimiser step.
    pub fn zero(&mut self) {
        self.sums.iter_mut().for_each(|s| *s = None);
        self.micro_batches = 0;
    }

    /// Replace the sums by their sum over the ranks of `group`, added in rank order (the same
    /// bits on every rank): through NCCL on the GPU in a build with the `nccl` feature and a
    /// model on a CUDA device, else through the host (`Group::sum_in_rank_order`);
    /// `micro_batches` is the whole step's count (DESIGN §14, §15).
    pub fn sum_over(&mut self, params: &[(String, Var)], group: &Group, micro_batches: usize) -> Result<()> {
        #[cfg(feature = "nccl")]
        if group.is_distributed() {
            let device = params.iter().zip(&self.frozen).find(|p| !*p.1).map(|((_, v), _)| v.device().clone());
            if let Some(device @ candle_core::Device::Cuda(_)) = device {
                return self.sum_over_nccl(params, group, &device, micro_batches);
            }
        }
        let mut host = self.host_sums(params, |_| true)?;
        group.sum_in_rank_order(&mut host)?;
        for ((((_, var), sum), h), &frozen) in params.iter().zip(self.sums.iter_mut()).zip(host).zip(&self.frozen) {
            if !frozen {
                *sum = Some(Tensor::from_vec(h, var.shape(), var.device())?);
            }
        }
        self.micro_batches = micro_batches;
        Ok(())
    }

    /// `sum_over` through NCCL: the trainable parameters' sums (zeros where a rank has none) as
    /// one device vector, summed over the ranks on the GPU, and split back.
    #[cfg(feature = "nccl")]
    fn sum_over_nccl(
        &mut self,
        params: &[(String, Var)],
        group: &Group,
        device: &candle_core::Device,
        micro_batches: usize,
    ) -> Result<()> {
        let candle_core::Device::Cuda(cuda) = device else { unreachable!("sum_over checks the device") };
        if self.nccl.is_none() {
            self.nccl = Some(super::nccl::NcclComm::new(group, cuda)?);
        }
        let mut pieces = vec![];
        for (((_, var), sum), &frozen) in params.iter().zip(&self.sums).zip(&self.frozen) {
            if !frozen {
                pieces.push(match sum {
                    Some(s) => s.flatten_all()?,
                    None => Tensor::zeros(var.elem_count(), DType::F32, device)?,
                });
            }
        }
        if pieces.is_empty() {
            self.micro_batches = micro_batches;
            return Ok(());
        }
        let flat = Tensor::cat(&pieces, 0)?;
        drop(pieces);
        let total = self.nccl.as_ref().expect("made above").sum_in_rank_order(&flat)?;
        let mut at = 0;
        for (((_, var), sum), &frozen) in params.iter().zip(self.sums.iter_mut()).zip(&self.frozen) {
            if !frozen {
                let n = var.elem_count();
                *sum = Some(total.narrow(0, at, n)?.reshape(var.shape())?);
                at += n;
            }
        }
        self.micro_batches = micro_batches;
        Ok(())
    }

    /// The sums on the host, empty for parameters `wanted` rejects (a few small ones for the
    /// thinking-gradient statistics of a log step).
    pub fn host_sums(&self, params: &[(String, Var)], wanted: impl Fn(&str) -> bool) -> Result<Vec<Vec<f32>>> {
        params
            .iter()
            .zip(&self.sums)
            .map(|((name, var), sum)| match sum {
                Some(s) if wanted(name) => Ok(s.flatten_all()?.to_vec1::<f32>()?),
                None if wanted(name) => Ok(vec![0.0; var.elem_count()]),
                _ => Ok(vec![]),
            })
            .collect()
    }
}

/// AdamW moments per parameter as tensors on the parameter's device, and the update count.
pub struct DeviceAdamW {
    pub m: Vec<Tensor>,
    pub v: Vec<Tensor>,
    pub t: u64,
}

impl DeviceAdamW {
    /// One update, the formula of `AdamW::step` element for element:
    /// g' = clip g; m = b1 m + (1 - b1) g'; v = b2 v + (1 - b2) g'^2;
    /// p -= decay p; p -= step_size m / (sqrt(v) / sqrt(bc2) + eps).
    pub fn step(
        &mut self,
        params: &[(String, Var)],
        grads: &[Option<Tensor>],
        grad_norm: f64,
        lr: f64,
        cfg: &TrainConfig,
    ) -> Result<()> {
        self.t += 1;
        let clip = if cfg.grad_clip > 0.0 && grad_norm > cfg.grad_clip { cfg.grad_clip / grad_norm } else { 1.0 };
        // Scalars rounded to f32 as the host optimiser uses them.
        let f = |x: f64| x as f32 as f64;
        let (b1, b2) = (f(cfg.beta1), f(cfg.beta2));
        let (one_minus_b1, one_minus_b2) = (f(1.0 - b1), f(1.0 - b2));
        let bc1 = 1.0 - cfg.beta1.powi(self.t as i32);
        let bc2_sqrt = f((1.0 - cfg.beta2.powi(self.t as i32)).sqrt());
        let eps = f(cfg.eps);
        for (i, (name, var)) in params.iter().enumerate() {
            if !cfg.trainable.includes(name) {
                continue;
            }
            let (decay, step_size) = param_group(name, var.dims(), lr, (lr / bc1) as f32, cfg);
            let (decay, step_size) = (decay as f64, step_size as f64);
            let p = var.as_tensor();
            let g = match &grads[i] {
                Some(g) => g.reshape(p.shape())?,
                None => p.zeros_like()?.to_dtype(DType::F32)?,
            };
            let g = if clip != 1.0 { g.affine(f(clip), 0.0)? } else { g };
            let m = (self.m[i].affine(b1, 0.0)? + g.affine(one_minus_b1, 0.0)?)?;
            let v = (self.v[i].affine(b2, 0.0)? + g.sqr()?.affine(one_minus_b2, 0.0)?)?;
            let p32 = p.to_dtype(DType::F32)?;
            let p32 = if decay != 0.0 { (&p32 - p32.affine(decay, 0.0)?)? } else { p32 };
            let denom = v.sqrt()?.affine(1.0 / bc2_sqrt, eps)?;
            let p32 = (p32 - (m.affine(step_size, 0.0)? / denom)?)?;
            var.set(&p32.to_dtype(p.dtype())?)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }
}

/// Gradient sums and moments on the parameters' device.
pub struct DeviceOptimizer {
    pub acc: DeviceAccumulator,
    pub adam: DeviceAdamW,
}

impl DeviceOptimizer {
    /// The host optimiser's state moved beside the parameters (a fresh run's zeros, or a
    /// checkpoint's moments).
    pub fn from_host(opt: &AdamW, params: &[(String, Var)], trainable: Trainable) -> Result<Self> {
        let moment = |values: &[f32], var: &Var| -> Result<Tensor> {
            Ok(Tensor::from_slice(values, var.shape(), &candle_core::Device::Cpu)?.to_device(var.device())?)
        };
        let mut adam = DeviceAdamW { m: vec![], v: vec![], t: opt.t };
        for (i, (_, var)) in params.iter().enumerate() {
            adam.m.push(moment(&opt.m[i], var)?);
            adam.v.push(moment(&opt.v[i], var)?);
        }
        Ok(DeviceOptimizer { acc: DeviceAccumulator::with_trainable(params, trainable), adam })
    }

    /// The state as the host optimiser holds it, for a checkpoint.
    pub fn to_host(&self) -> Result<AdamW> {
        let host = |t: &Tensor| -> Result<Vec<f32>> { Ok(t.flatten_all()?.to_vec1::<f32>()?) };
        Ok(AdamW {
            m: self.adam.m.iter().map(host).collect::<Result<_>>()?,
            v: self.adam.v.iter().map(host).collect::<Result<_>>()?,
            t: self.adam.t,
        })
    }
}
