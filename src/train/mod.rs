//! Training: AdamW with warmup + cosine, gradient accumulation and clipping, periodic
//! validation, JSONL metrics, atomic checkpoints, and exact resume.
//!
//! Repeatability: the initial weights come from `seed` ("init" stream), training batches from
//! a separate "data" stream whose state is saved in every checkpoint; the optimiser runs on
//! the host in a fixed order. So a run is the same bit for bit for the same seed, and a run
//! stopped at step N and resumed equals the uninterrupted run.

use crate::base::config::{OnNonFinite, RunConfig};
use crate::base::dist::Group;
use crate::base::error::IoContext;
use crate::base::rng::Rng;
use crate::base::util::write_atomic;
use crate::checkpoint::{self, Check, SaveParts, TrainState};
use crate::data::{self, CorpusOptions, Dataset, TokenShard, Tokenizer};
use crate::flops::flops_per_token;
use crate::model::thinking::CalibrationEntry;
use crate::model::{ForwardRecord, Model, RouterCalibration, RoutingOptions, TokenBatch};
use crate::ops::Precision;
use crate::optim::{AdamW, Optimizer};
use crate::{Error, Result};
use candle_core::Device;
use serde_json::json;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

mod launch;
pub mod lock;
pub mod preempt;
pub use launch::{grad_accum_for_ranks, launch, LaunchOptions, Start};

/// Where the training text comes from and how it becomes tokens.
#[derive(Clone, Debug)]
pub struct DataSpec {
    /// `builtin`, a corpus path (file, folder, .gz, .jsonl) or a prepared dataset folder.
    pub path: String,
    /// Tokenizer for raw corpora: `char`, `byte`, `bpe:N` or a tokenizer file.
    pub tokenizer: String,
    pub corpus: CorpusOptions,
    pub val_fraction: f64,
}

impl Default for DataSpec {
    fn default() -> Self {
        DataSpec {
            path: "builtin".into(),
            tokenizer: "char".into(),
            corpus: CorpusOptions::default(),
            val_fraction: 0.05,
        }
    }
}

/// Open a prepared dataset, or read and tokenize a corpus into `out_dir`.
pub fn prepare_data(spec: &DataSpec, out_dir: &Path) -> Result<(Dataset, Tokenizer)> {
    let p = Path::new(&spec.path);
    if p.join("meta.json").exists() {
        let ds = Dataset::open(p)?;
        let tok = ds.load_tokenizer()?;
        return Ok((ds, tok));
    }
    let docs = data::read_corpus(p, &spec.corpus)?;
    let tok = data::from_spec(&spec.tokenizer, &docs)?;
    let ds = data::prepare_dataset(&docs, &tok, spec.val_fraction, out_dir, &spec.path)?;
    Ok((ds, tok))
}

/// Every rank's micro-batch router quantiles, in rank (= micro-batch) order. Sent as raw
/// little-endian words, so that non-finite values arrive as they are (and the step's
/// non-finite check, not the transport, decides what happens).
fn gather_quantiles(group: &Group, mine: &[Vec<CalibrationEntry>]) -> Result<Vec<Vec<CalibrationEntry>>> {
    let mut words: Vec<u32> = vec![mine.len() as u32];
    for batch in mine {
        words.push(batch.len() as u32);
        for e in batch {
            words.extend([e.layer as u32, e.step as u32, e.quantiles.len() as u32]);
            words.extend(e.quantiles.iter().map(|q| q.to_bits()));
        }
    }
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    let mut all = vec![];
    for (rank, theirs) in group.all_gather_bytes(&bytes)?.iter().enumerate() {
        let words: Vec<u32> =
            theirs.chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes"))).collect();
        let bad = || Error::usage(format!("rank {rank} sent malformed router quantiles"));
        let mut it = words.into_iter();
        let mut next = || it.next().ok_or_else(bad);
        for _ in 0..next()? {
            let mut batch = vec![];
            for _ in 0..next()? {
                let (layer, step, n) = (next()? as usize, next()? as usize, next()?);
                let quantiles = (0..n).map(|_| next().map(f32::from_bits)).collect::<Result<_>>()?;
                batch.push(CalibrationEntry { layer, step, quantiles });
            }
            all.push(batch);
        }
    }
    Ok(all)
}

/// This rank's micro-batches of a step: per micro-batch its cross-entropy, router auxiliary
/// loss and whether there was one (3 values each), and its router quantiles.
struct MicroBatches {
    losses: Vec<f64>,
    quantiles: Vec<Vec<CalibrationEntry>>,
}

/// A fresh run never overwrites one: refuse a folder whose `latest` names a checkpoint.
pub(crate) fn refuse_existing_run(run_dir: &Path) -> Result<()> {
    if run_dir.join("latest").exists() {
        return Err(Error::usage(format!(
            "{} already holds a training run; pass --resume to continue it or choose another --out",
            run_dir.display()
        )));
    }
    Ok(())
}

/// One optimiser step's outcome.
#[derive(Clone, Debug)]
pub struct StepReport {
    pub step: usize,
    /// Mean cross-entropy over the micro-batches (the auxiliary loss not included).
    pub loss: f64,
    /// Mean router auxiliary loss, when trained with one.
    pub router_aux: Option<f64>,
    pub lr: f64,
    pub grad_norm: f64,
    pub seconds: f64,
    /// Of `seconds`, the time spent in collectives with the other ranks (0 in one process),
    /// waiting for slower ranks included.
    pub comm_seconds: f64,
    pub record: ForwardRecord,
    /// On measured steps: the gradient norms reaching each thinking layer's routers and phi_t.
    pub thinking_grads: Vec<ThinkingGrad>,
    /// Why this step's batch was dropped without an update (`on_nonfinite: skip`), if it was.
    pub skipped: Option<String>,
    /// The signal that asks every rank to stop after this step (preemption), the same on all.
    pub preempted: Option<i32>,
}

/// L2 norms of the (micro-batch averaged, unclipped) gradient of one (layer, step)'s router
/// (weight and bias together) and step vector phi_t (docs/DESIGN.md §7).
#[derive(Clone, Debug, serde::Serialize)]
pub struct ThinkingGrad {
    pub layer: usize,
    pub step: usize,
    pub router: Option<f64>,
    pub phi: Option<f64>,
}

/// Which (layer, step) and part a thinking parameter is, from its name
/// (`layers.{i}.think.router.{t}.weight|bias`, `layers.{i}.think.phi.{t}`): (layer, step, router?).
pub fn thinking_param(name: &str) -> Option<(usize, usize, bool)> {
    let rest = name.strip_prefix("layers.")?;
    let (layer, rest) = rest.split_once(".think.")?;
    let layer = layer.parse().ok()?;
    if let Some(r) = rest.strip_prefix("router.") {
        let (t, _) = r.split_once('.')?;
        return Some((layer, t.parse().ok()?, true));
    }
    Some((layer, rest.strip_prefix("phi.")?.parse().ok()?, false))
}

/// Gradient norms per (layer, step) of the thinking parameters, from the summed gradients.
fn thinking_grads_of(params: &[(String, candle_core::Var)], sums: &[Vec<f32>]) -> Vec<ThinkingGrad> {
    let mut acc: std::collections::BTreeMap<(usize, usize), (Option<f64>, Option<f64>)> = Default::default();
    for ((name, _), g) in params.iter().zip(sums) {
        let Some((layer, step, router)) = thinking_param(name) else { continue };
        let sq: f64 = g.iter().map(|&x| (x as f64) * (x as f64)).sum();
        let e = acc.entry((layer, step)).or_default();
        let slot = if router { &mut e.0 } else { &mut e.1 };
        *slot = Some(slot.unwrap_or(0.0) + sq);
    }
    acc.into_iter()
        .map(|((layer, step), (r, p))| ThinkingGrad { layer, step, router: r.map(f64::sqrt), phi: p.map(f64::sqrt) })
        .collect()
}

pub struct Trainer {
    pub cfg: RunConfig,
    pub model: Model,
    /// AdamW on the host, or on the parameters' device for a model on a GPU (DESIGN §15).
    pub optimizer: Optimizer,
    pub state: TrainState,
    /// Running router quantiles for causal routing (ITT with routers only).
    pub calibration: Option<RouterCalibration>,
    pub tokenizer_json: String,
    pub run_dir: PathBuf,
    /// One-line notices for the user from `resume`: checkpoints skipped as damaged, or resumed
    /// without a manifest to check.
    pub notices: Vec<String>,
    /// The ranks this run trains on (DESIGN §14); the single process unless launched by mpirun.
    pub group: Group,
    data_rng: Rng,
}

/// Where and how a [`Trainer`] runs. `Default`: one process on the CPU with the host
/// optimiser, a fresh run's weights drawn from its seed.
pub struct TrainerOptions {
    /// The ranks that train (DESIGN §14): rank 0 alone checks and writes the run folder, the
    /// others build the same trainer without touching it.
    pub group: Group,
    /// Where the model and the optimiser live (DESIGN §15). Initial weights are drawn on the
    /// host, and checkpoints hold host tensors, so a run is the same on every device and may
    /// resume on another one than it started on.
    pub device: Device,
    /// The device optimiser even on the CPU (a GPU always uses it): how the tests reach the
    /// GPU's optimiser without a GPU (tests/train.rs, `ITT_DEVICE_OPTIMIZER=1`).
    pub device_optimizer: bool,
    /// Start a fresh run from these weights (a pretrained or retrofitted model, on its own
    /// device) instead of drawing them from the seed. Not for `resume`.
    pub weights: Option<Model>,
}

impl Default for TrainerOptions {
    fn default() -> Self {
        TrainerOptions { group: Group::single(), device: Device::Cpu, device_optimizer: false, weights: None }
    }
}

impl Trainer {
    /// A fresh run of `cfg` in `run_dir`, which must not already hold one.
    pub fn new(mut cfg: RunConfig, tokenizer: &Tokenizer, run_dir: &Path, opts: TrainerOptions) -> Result<Self> {
        cfg.validate()?;
        let TrainerOptions { group, device, device_optimizer, weights } = opts;
        let mut model = match weights {
            Some(model) => model,
            None => Model::new(&cfg.model, cfg.train.seed, &device)?,
        };
        let on_cpu = model.device().is_cpu();
        if on_cpu && cfg.train.precision.on_this_cpu() != cfg.train.precision {
            // Emulated bf16 is slower than f32 and no more accurate: run (and record) f32.
            eprintln!(
                "notice: this CPU has no bf16 kernel faster than f32 (AMX; AVX512_BF16 on AMD); --precision bf16 would be emulated at about \
                 2/3 the speed of f32, so this run computes its products in f32 (recorded in config.json; ITT_BF16_EMULATE=1 keeps bf16)"
            );
            cfg.train.precision = Precision::F32;
        }
        if model.cfg != cfg.model {
            return Err(Error::usage("the model does not match the run's model config"));
        }
        if model.is_quantized() {
            // Quantized products have no gradients (DESIGN §13).
            return Err(Error::usage(
                "the model runs its products on quantized weights, which cannot be trained; \
                 load it with --gguf-weights f32 (or call Model::dequantize) to train",
            ));
        }
        if group.is_lead() {
            refuse_existing_run(run_dir)?;
        }
        if tokenizer.vocab_size() != cfg.model.vocab_size {
            return Err(Error::config(
                "model.vocab_size",
                format!("is {}, but the tokenizer has {} tokens", cfg.model.vocab_size, tokenizer.vocab_size()),
            ));
        }
        let tokenizer_json = tokenizer.to_json()?;
        if group.is_lead() {
            std::fs::create_dir_all(run_dir).at(run_dir)?;
            write_atomic(&run_dir.join("config.json"), |w| w.write_all(cfg.to_json().as_bytes()))?;
            write_atomic(&run_dir.join("tokenizer.json"), |w| w.write_all(tokenizer_json.as_bytes()))?;
            let _ = std::fs::remove_file(run_dir.join("metrics.jsonl"));
        }
        model.precision = cfg.train.precision;
        let optimizer =
            Optimizer::new(&model.params, cfg.train.trainable, AdamW::new(&model.params), device_optimizer || !on_cpu)?;
        let data_rng = Rng::derive(cfg.train.seed, "data");
        let calibration = model.has_routers().then(RouterCalibration::new);
        let state = TrainState {
            format: checkpoint::FORMAT.into(),
            version: checkpoint::VERSION,
            step: 0,
            tokens_seen: 0,
            data_rng: data_rng.state(),
            last_train_loss: None,
            last_val_loss: None,
            elapsed_s: 0.0,
            skipped_batches: 0,
        };
        Ok(Trainer {
            cfg,
            model,
            optimizer,
            state,
            calibration,
            tokenizer_json,
            run_dir: run_dir.to_path_buf(),
            notices: vec![],
            group,
            data_rng,
        })
    }

    /// Continue the run in `run_dir` from its latest checkpoint (or from checkpoint `from`),
    /// after checking every file's sha256 against the checkpoint's manifest. Without `from`, a
    /// damaged checkpoint is skipped for the newest intact one, and `notices` says which and why.
    /// Every rank reads the same checkpoint, rank 0 alone writes; the number of ranks may
    /// differ from the run's earlier part (DESIGN §14).
    pub fn resume(run_dir: &Path, from: Option<&Path>, opts: TrainerOptions) -> Result<Self> {
        if opts.weights.is_some() {
            return Err(Error::usage("a resumed run continues from its checkpoint's weights; give no others"));
        }
        let candidates = match from {
            Some(p) => vec![p.to_path_buf()],
            None => checkpoint::run_checkpoints(run_dir),
        };
        if candidates.is_empty() {
            // No checkpoint at all: `load` says what the folder is instead.
            return Self::resume_from(run_dir, run_dir, &opts).map(|t| Trainer { group: opts.group, ..t });
        }
        let mut notices = vec![];
        let mut skipped = vec![];
        for dir in &candidates {
            match Self::resume_from(run_dir, dir, &opts) {
                Ok(mut t) => {
                    if !skipped.is_empty() {
                        notices.push(format!(
                            "resuming from {} (step {}), the newest intact checkpoint",
                            dir.display(),
                            t.state.step
                        ));
                    }
                    t.notices.splice(0..0, notices);
                    if opts.group.is_lead() {
                        truncate_metrics(&run_dir.join("metrics.jsonl"), t.state.step)?;
                    }
                    t.group = opts.group;
                    return Ok(t);
                }
                Err(e) if from.is_none() => {
                    notices.push(format!("skipped {e}"));
                    skipped.push(e.to_string());
                }
                Err(e) => return Err(e),
            }
        }
        Err(Error::checkpoint(run_dir, format!("holds no intact checkpoint to resume from: {}", skipped.join("; "))))
    }

    /// The trainer of one checkpoint, its files checked against their sha256.
    fn resume_from(run_dir: &Path, ckpt: &Path, opts: &TrainerOptions) -> Result<Self> {
        let device = &opts.device;
        let (ck, verified) = checkpoint::load_checked(ckpt, Check::Hashes)?;
        let (mut model, info) = ck.into_model(device)?;
        model.precision = info.config.train.precision;
        if model.precision == Precision::Bf16 && device.is_cpu() && Precision::bf16_falls_back() {
            eprintln!(
                "notice: this run trained with bf16 products, but this CPU has no bf16 matrix units (AMX); it \
                 continues in f32 (emulated bf16 would be slower), so it will not match a bf16 continuation bit for bit"
            );
            model.precision = Precision::F32;
        }
        let state =
            info.state.ok_or_else(|| Error::checkpoint(&info.dir, "has no state.json; it cannot be resumed"))?;
        let saved = checkpoint::load_optimizer(&info.dir, &model.params)?;
        let on_device = opts.device_optimizer || !device.is_cpu();
        let optimizer = Optimizer::new(&model.params, info.config.train.trainable, saved, on_device)?;
        let calibration =
            if model.has_routers() { Some(info.calibration.unwrap_or_else(RouterCalibration::new)) } else { None };
        Ok(Trainer {
            cfg: info.config,
            model,
            optimizer,
            data_rng: Rng::from_state(state.data_rng),
            state,
            calibration,
            tokenizer_json: info.tokenizer_json,
            run_dir: run_dir.to_path_buf(),
            notices: verified.notice().into_iter().collect(),
            group: Group::single(),
        })
    }

    /// The checkpoint folder of the current step.
    fn state_dir(&self) -> PathBuf {
        self.run_dir.join("checkpoints").join(format!("step-{:08}", self.state.step))
    }

    /// The error for a non-finite value at the current step, naming the learning rate (the
    /// usual cause) and the checkpoint that is kept.
    fn diverged(&self, what: &str) -> Error {
        let tc = &self.cfg.train;
        let step = self.state.step + 1;
        let warm = if self.state.step < tc.warmup_steps {
            format!(", warm-up step {step} of {}", tc.warmup_steps)
        } else {
            String::new()
        };
        let kept = match checkpoint::resolve(&self.run_dir) {
            Ok(dir) => format!("the last checkpoint, {}, is kept", dir.display()),
            Err(_) => "no checkpoint was written".to_string(),
        };
        Error::Diverged {
            step,
            msg: format!(
                "{what} at learning rate {:e} (peak --lr {:e}{warm}); the learning rate is probably too high: \
                 lower --lr or lengthen --warmup, or pass --on-nonfinite skip to drop such batches; {kept}",
                tc.lr_at(self.state.step),
                tc.lr
            ),
        }
    }

    /// One optimiser step over `grad_accum` micro-batches drawn from `shard`, with the matrix
    /// products in the run's precision (set on the model when the trainer is made).
    ///
    /// `measure`: also measure each routed step's contribution and the gradient norms reaching
    /// the routers and step vectors (a few reductions; `run` asks at its log steps).
    pub fn step(&mut self, shard: &TokenShard, measure: bool) -> Result<StepReport> {
        let t0 = Instant::now();
        let tc = self.cfg.train.clone();
        let mut record = ForwardRecord { keep_scores: self.calibration.is_some(), measure, ..Default::default() };
        // A skipped batch must not move the router thresholds either.
        let calibration_before = (tc.on_nonfinite == OnNonFinite::Skip).then(|| self.calibration.clone());
        let mine = self.backward_passes(shard, &mut record)?;
        let t_comm = Instant::now();
        let (loss_sum, aux_sum, preempted) = self.sum_over_ranks(mine)?;
        let comm_seconds = if self.group.is_distributed() { t_comm.elapsed().as_secs_f64() } else { 0.0 };
        let loss = loss_sum / tc.grad_accum as f64;
        // Checked before the update: a NaN gradient would make every weight NaN.
        let grad_norm = self.optimizer.finish()?;
        let nonfinite = if !loss.is_finite() {
            Some(format!("the loss is {loss}"))
        } else if !grad_norm.is_finite() {
            Some(format!("the gradient norm is {grad_norm}"))
        } else {
            None
        };
        let lr = tc.lr_at(self.state.step);
        let mut thinking_grads = vec![];
        if let Some(what) = &nonfinite {
            match calibration_before {
                Some(before) => {
                    self.calibration = before;
                    self.state.skipped_batches += 1;
                }
                None => return Err(self.diverged(what)),
            }
        } else {
            if measure {
                let sums = self.optimizer.gradients(&self.model.params, |n| thinking_param(n).is_some())?;
                thinking_grads = thinking_grads_of(&self.model.params, &sums);
            }
            self.optimizer.update(&self.model.params, grad_norm, lr, &tc)?;
            // Finite gradients can still overflow a weight (a huge learning rate times weight
            // decay); the update cannot be taken back, so this stops in either mode.
            if let Some(name) = first_nonfinite_param(&self.model.params)? {
                return Err(self.diverged(&format!("the update made weight `{name}` non-finite")));
            }
            self.state.last_train_loss = Some(loss);
        }
        self.state.step += 1;
        self.state.tokens_seen += tc.tokens_per_step() as u64;
        self.state.data_rng = self.data_rng.state();
        let seconds = t0.elapsed().as_secs_f64();
        self.state.elapsed_s += seconds;
        Ok(StepReport {
            step: self.state.step,
            loss,
            router_aux: aux_sum.map(|a| a / tc.grad_accum as f64),
            lr,
            grad_norm,
            seconds,
            comm_seconds,
            record,
            thinking_grads,
            skipped: nonfinite,
            preempted,
        })
    }

    /// A step's forward and backward passes: every rank draws the whole global batch (the same
    /// data stream everywhere) and computes its own block of micro-batches, their gradients
    /// summed into the optimiser (DESIGN §14); a single process computes them all.
    fn backward_passes(&mut self, shard: &TokenShard, record: &mut ForwardRecord) -> Result<MicroBatches> {
        let tc = &self.cfg.train;
        let (b, t) = (tc.batch_size, tc.seq_len);
        let ratios = if self.model.has_routers() {
            tc.capacity_at(self.state.step, &self.cfg.model.thinking.ratios)
        } else {
            None
        };
        let routing = RoutingOptions { ratios, ..Default::default() };
        let with_aux = tc.router_aux_weight > 0.0;
        let scalar =
            |t: &candle_core::Tensor| -> Result<f64> { Ok(t.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?) };
        let mine = self.group.share(tc.grad_accum)?;
        let mut out = MicroBatches { losses: Vec::with_capacity(3 * mine.len()), quantiles: vec![] };
        self.optimizer.zero();
        for i in 0..tc.grad_accum {
            let (inp, tgt) = data::sample_batch(shard, &mut self.data_rng, b, t)?;
            if !mine.contains(&i) {
                continue;
            }
            let batch = TokenBatch { inputs: &inp, targets: &tgt, b, t };
            let parts = self.model.train_loss(&batch, &routing, Some(&mut *record), with_aux)?;
            let (grads, aux) = match &parts.router_aux {
                // The objective: cross-entropy + weight * router auxiliary loss (DESIGN §4.6).
                Some(aux) => (((&parts.ce + (aux * tc.router_aux_weight)?)?).backward()?, Some(scalar(aux)?)),
                None => (parts.ce.backward()?, None),
            };
            self.optimizer.accumulate(&self.model.params, &grads)?;
            out.losses.extend([scalar(&parts.ce)?, aux.unwrap_or(0.0), f64::from(u8::from(aux.is_some()))]);
            if let Some(cal) = &self.calibration {
                out.quantiles.push(cal.batch_quantiles(record));
            }
        }
        Ok(out)
    }

    /// The sums over the whole global batch, added in micro-batch order on every rank: the
    /// gradients (in the optimiser), the router quantiles (folded into the calibration), and
    /// the returned (cross-entropy, router auxiliary loss) sums. Also the preemption signal, if
    /// any rank has received one: it rides on the loss exchange every step makes anyway, so all
    /// ranks see the same answer and stop after the same step without a collective of its own.
    fn sum_over_ranks(&mut self, mine: MicroBatches) -> Result<(f64, Option<f64>, Option<i32>)> {
        let MicroBatches { mut losses, mut quantiles } = mine;
        losses.push(f64::from(preempt::received().unwrap_or(0)));
        let per_rank = losses.len();
        let all = self.group.all_gather_f64(&losses)?;
        let (mut loss_sum, mut aux_sum, mut preempted) = (0.0, None::<f64>, None);
        // (ce, aux, has_aux) per micro-batch, then the signal, for each rank in rank order.
        for rank in all.chunks_exact(per_rank) {
            let (micro, signal) = rank.split_at(per_rank - 1);
            if signal[0] != 0.0 && preempted.is_none() {
                preempted = Some(signal[0] as i32);
            }
            for m in micro.chunks_exact(3) {
                loss_sum += m[0];
                if m[2] != 0.0 {
                    *aux_sum.get_or_insert(0.0) += m[1];
                }
            }
        }
        if self.group.is_distributed() {
            self.optimizer.sum_over(&self.model.params, &self.group, self.cfg.train.grad_accum)?;
            quantiles = gather_quantiles(&self.group, &quantiles)?;
        }
        if let Some(cal) = &mut self.calibration {
            for q in quantiles {
                cal.fold(q, self.cfg.train.threshold_momentum);
            }
        }
        Ok((loss_sum, aux_sum, preempted))
    }

    /// Mean validation loss over up to `batches` sequential batches (0 = all), the batches
    /// shared among the ranks.
    pub fn evaluate(&self, shard: &TokenShard, batches: usize) -> Result<f64> {
        let tc = &self.cfg.train;
        let routing = RoutingOptions::default();
        crate::eval::shard_loss_in(&self.model, shard, tc.batch_size, tc.seq_len, batches, &routing, &self.group)
    }

    /// A hash of what must be the same on every rank before a data-parallel run starts: the
    /// step, the data stream's position, the weights and the optimiser's moments.
    pub fn fingerprint(&self) -> Result<u64> {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        h.update(self.state.step.to_le_bytes());
        for w in self.data_rng.state() {
            h.update(w.to_le_bytes());
        }
        for (name, var) in &self.model.params {
            h.update(name.as_bytes());
            let t = var.as_tensor().to_dtype(candle_core::DType::F32)?;
            crate::ops::fused::with_data::<f32, _>(&t, |d| {
                h.update(le_bytes(d));
                Ok(())
            })?;
        }
        let state = self.optimizer.state()?;
        for moments in state.m.iter().chain(&state.v) {
            h.update(le_bytes(moments));
        }
        Ok(u64::from_le_bytes(h.finalize()[..8].try_into().expect("8 bytes")))
    }

    /// Write a checkpoint of the current step, point `latest` at it, then prune older ones.
    /// Refuses weights that are not all finite (a checkpoint must be safe to resume from).
    pub fn save(&self) -> Result<PathBuf> {
        if let Some(name) = first_nonfinite_param(&self.model.params)? {
            return Err(self.diverged(&format!("weight `{name}` is non-finite; no checkpoint written")));
        }
        let dir = self.state_dir();
        let optimizer = self.optimizer.state()?;
        checkpoint::save(
            &dir,
            &self.model,
            &SaveParts {
                config: &self.cfg,
                tokenizer_json: &self.tokenizer_json,
                optimizer: Some(&optimizer),
                state: Some(&self.state),
                calibration: self.calibration.as_ref(),
            },
        )?;
        checkpoint::set_latest(&self.run_dir, &dir)?;
        checkpoint::fault_point("latest", &dir);
        checkpoint::prune(&self.run_dir, self.cfg.train.keep_checkpoints)?;
        checkpoint::fault_point("pruned", &dir);
        Ok(dir)
    }

    /// Root-mean-square of each thinking layer's step vectors phi_t: [(layer, [rms per t])].
    pub fn phi_rms(&self) -> Result<Vec<(usize, Vec<f64>)>> {
        let mut out = vec![];
        for th in self.model.thinking_layers() {
            let mut v = vec![];
            for phi in &th.phis {
                v.push(phi.sqr()?.mean_all()?.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?.sqrt());
            }
            out.push((th.layer, v));
        }
        Ok(out)
    }
}

/// The name of the first parameter holding a NaN or infinity, if any.
fn first_nonfinite_param(params: &[(String, candle_core::Var)]) -> Result<Option<String>> {
    use rayon::prelude::*;
    if params.first().is_some_and(|(_, v)| !v.device().is_cpu()) {
        // On a GPU: x - x is 0 for a finite x and NaN otherwise, so each sum is 0 or NaN; one
        // read back for all parameters.
        let sums = params
            .iter()
            .map(|(_, v)| (v.as_tensor() - v.as_tensor())?.sum_all()?.to_dtype(candle_core::DType::F32))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let sums = candle_core::Tensor::stack(&sums, 0)?.to_vec1::<f32>()?;
        return Ok(sums.iter().position(|s| !s.is_finite()).map(|i| params[i].0.clone()));
    }
    for (name, var) in params {
        let t = var.as_tensor().to_dtype(candle_core::DType::F32)?;
        let finite = crate::ops::fused::with_data::<f32, _>(&t, |d| {
            Ok(d.par_chunks(1 << 15).all(|c| c.iter().fold(true, |ok, x| ok & x.is_finite())))
        })?;
        if !finite {
            return Ok(Some(name.clone()));
        }
    }
    Ok(None)
}

fn le_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Drop metric lines past `step` (written after the checkpoint a run resumes from).
fn truncate_metrics(path: &Path, step: usize) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else { return Ok(()) };
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v.get("step").and_then(|s| s.as_u64()))
                .map(|s| s as usize <= step)
                .unwrap_or(false)
        })
        .collect();
    let mut body = kept.join("\n");
    if !body.is_empty() {
        body.push('\n');
    }
    write_atomic(path, |w| w.write_all(body.as_bytes()))
}

/// Options of a whole training run.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// No progress bar or log lines.
    pub quiet: bool,
    /// Stop after this step even if `max_steps` is larger (for tests of resume).
    pub stop_at: Option<usize>,
}

/// Summary of a finished run.
#[derive(Clone, Debug, serde::Serialize)]
pub struct TrainSummary {
    pub steps: usize,
    pub tokens_seen: u64,
    pub final_train_loss: f64,
    pub final_val_loss: f64,
    pub seconds: f64,
    pub tokens_per_s: f64,
    pub peak_rss_mb: f64,
    pub checkpoint: PathBuf,
}

/// Training FLOPs per token at the shares of tokens actually routed (averaged over layers),
/// to set against the analytic figure at the configured ratios (DESIGN §7).
fn counted_flops(cfg: &RunConfig, record: &ForwardRecord) -> Option<f64> {
    if record.stats.is_empty() {
        return None;
    }
    let steps = cfg.model.thinking.steps;
    let shares: Vec<f64> = (2..=steps)
        .map(|t| {
            let (sel, cand) = record
                .stats
                .iter()
                .filter(|((_, s), _)| *s == t)
                .fold((0u64, 0u64), |a, (_, st)| (a.0 + st.selected, a.1 + st.candidates));
            if cand == 0 {
                0.0
            } else {
                sel as f64 / cand as f64
            }
        })
        .collect();
    Some(flops_per_token(&cfg.model, cfg.train.seq_len, None, Some(&shares)).train)
}

/// One entry per routed (layer, step): shares, router weights (all, selected, passed over),
/// overlap with the previous step, the step's contribution and the gradient norms reaching its
/// router and phi_t (docs/DESIGN.md §7).
fn routing_json(record: &ForwardRecord, grads: &[ThinkingGrad]) -> serde_json::Value {
    record
        .stats
        .iter()
        .map(|(&(layer, step), s)| {
            let g = grads.iter().find(|g| g.layer == layer && g.step == step);
            json!({
                "layer": layer, "step": step, "selected": s.selected, "candidates": s.candidates,
                "share": s.share(), "w_mean": s.weight_mean(), "w_std": s.weight_std(),
                "w_selected": s.weight_mean_selected(), "w_passed": s.weight_mean_passed(),
                "overlap_prev": s.overlap_prev(), "contribution": s.contribution(),
                "grad_router": g.and_then(|g| g.router), "grad_phi": g.and_then(|g| g.phi),
            })
        })
        .collect()
}

/// Train until `max_steps` (or `stop_at`), validating, logging and checkpointing on schedule.
pub fn run(trainer: &mut Trainer, data: &Dataset, opts: &RunOptions) -> Result<TrainSummary> {
    let tc = trainer.cfg.train.clone();
    let end = opts.stop_at.unwrap_or(tc.max_steps).min(tc.max_steps);
    let metrics_path = trainer.run_dir.join("metrics.jsonl");
    // Rank 0 alone logs and writes checkpoints (DESIGN §14); the others' metrics go nowhere and
    // they show no progress. Validation is shared.
    let lead = trainer.group.is_lead();
    let mut metrics: Box<dyn Write> = if lead {
        Box::new(std::fs::OpenOptions::new().create(true).append(true).open(&metrics_path).at(&metrics_path)?)
    } else {
        Box::new(std::io::sink())
    };
    let quiet = opts.quiet || !lead;
    let flops = flops_per_token(&trainer.cfg.model, tc.seq_len, None, None);
    let bar = progress_bar(end as u64, trainer.state.step as u64, quiet);
    let t_start = Instant::now();
    let tokens_at_start = trainer.state.tokens_seen;
    let mut window = ForwardRecord::default();
    let mut window_loss = (0.0, 0usize);
    let mut window_comm = 0.0;
    while trainer.state.step < end {
        let next = trainer.state.step + 1;
        let rep = trainer.step(&data.train, next.is_multiple_of(tc.log_interval) || next == end)?;
        let step = rep.step;
        if let Some(why) = &rep.skipped {
            let line = json!({"step": step, "skipped": why, "skipped_batches": trainer.state.skipped_batches});
            writeln!(metrics, "{line}").at(&metrics_path)?;
            if !quiet {
                bar.suspend(|| eprintln!("step {step}: {why}; batch skipped (--on-nonfinite skip)"));
            }
        } else {
            window.merge_stats(&rep.record);
            window_loss.0 += rep.loss;
            window_loss.1 += 1;
        }
        window_comm += rep.comm_seconds;
        let elapsed = t_start.elapsed().as_secs_f64();
        let tok_s = (trainer.state.tokens_seen - tokens_at_start) as f64 / elapsed.max(1e-9);
        if step % tc.log_interval == 0 || step == end {
            let mean_loss = window_loss.0 / window_loss.1 as f64;
            let counted = counted_flops(&trainer.cfg, &window).unwrap_or(flops.train);
            let mut line = json!({
                "step": step, "loss": mean_loss, "lr": rep.lr, "grad_norm": rep.grad_norm,
                "tokens_seen": trainer.state.tokens_seen, "tokens_per_s": tok_s, "elapsed_s": trainer.state.elapsed_s,
                "flops_per_token": flops.train, "flops_per_token_counted": counted,
                "routing": routing_json(&window, &rep.thinking_grads), "router_aux": rep.router_aux,
                "phi_grad_step1": rep.thinking_grads.iter().filter(|g| g.step == 1).map(|g| json!({"layer": g.layer, "norm": g.phi})).collect::<Vec<_>>(),
                "phi_rms": trainer.phi_rms()?, "skipped_batches": trainer.state.skipped_batches,
            });
            if trainer.group.is_distributed() {
                line["ranks"] = json!(trainer.group.size());
                line["comm_s"] = json!(window_comm);
            }
            writeln!(metrics, "{line}").at(&metrics_path)?;
            let share: Vec<String> = window.stats.values().map(|s| format!("{:.2}", s.share())).collect();
            // Before the first evaluation there is no validation loss to show.
            let val = match trainer.state.last_val_loss {
                Some(v) => format!("{v:.4}"),
                None => "-".to_string(),
            };
            let msg = format!(
                "loss {mean_loss:.4} | val {val} | lr {:.2e} | {tok_s:.0} tok/s{}",
                rep.lr,
                if share.is_empty() { String::new() } else { format!(" | routed {}", share.join("/")) }
            );
            bar.set_message(msg.clone());
            if !quiet && bar.is_hidden() {
                eprintln!("step {step:>6}/{end} | {msg}");
            }
            window = ForwardRecord::default();
            window_loss = (0.0, 0);
            window_comm = 0.0;
        }
        if step % tc.eval_interval == 0 || step == end {
            let last_val = trainer.evaluate(&data.val, tc.eval_batches)?;
            trainer.state.last_val_loss = Some(last_val);
            let line = json!({"step": step, "val_loss": last_val, "val_ppl": last_val.exp(), "tokens_seen": trainer.state.tokens_seen});
            writeln!(metrics, "{line}").at(&metrics_path)?;
        }
        let scheduled = (tc.checkpoint_interval > 0 && step % tc.checkpoint_interval == 0) || step == end;
        if lead && scheduled {
            trainer.save()?;
        }
        bar.set_position(step as u64);
        if let Some(sig) = rep.preempted {
            if step == end {
                // The run is complete anyway: finish normally.
                continue;
            }
            if lead && !scheduled {
                trainer.save()?;
            }
            bar.finish_and_clear();
            return Err(preempted(trainer, sig));
        }
    }
    bar.finish_and_clear();
    let seconds = t_start.elapsed().as_secs_f64();
    // The others wait for rank 0's last checkpoint.
    trainer.group.barrier();
    let checkpoint = checkpoint::resolve(&trainer.run_dir)?;
    Ok(TrainSummary {
        steps: trainer.state.step,
        tokens_seen: trainer.state.tokens_seen,
        final_train_loss: trainer.state.last_train_loss.unwrap_or(f64::NAN),
        final_val_loss: trainer.state.last_val_loss.unwrap_or(f64::NAN),
        seconds,
        tokens_per_s: (trainer.state.tokens_seen - tokens_at_start) as f64 / seconds.max(1e-9),
        peak_rss_mb: crate::base::util::peak_rss_mb(),
        checkpoint,
    })
}

/// After a preempting signal: every rank waits for rank 0's checkpoint, which is read back and
/// checked against its manifest (a resume must find it intact), and the run stops.
fn preempted(trainer: &Trainer, sig: i32) -> Error {
    trainer.group.barrier();
    let checked =
        checkpoint::resolve(&trainer.run_dir).and_then(|dir| match checkpoint::verify(&dir, Check::Hashes)?.error() {
            Some(e) => Err(e),
            None => Ok(dir),
        });
    match checked {
        Ok(dir) => Error::Preempted { signal: preempt::name(sig), step: trainer.state.step, checkpoint: dir },
        Err(e) => e,
    }
}

fn progress_bar(len: u64, pos: u64, quiet: bool) -> indicatif::ProgressBar {
    if quiet {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} steps [{elapsed_precise} < {eta_precise}] {msg}")
            .expect("valid template"),
    );
    bar.set_position(pos);
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn router_quantiles_survive_the_exchange_bit_for_bit() {
        let entry = |layer, step, q: Vec<f32>| CalibrationEntry { layer, step, quantiles: q };
        let mine = vec![
            vec![entry(1, 2, vec![-1.5, 0.0, f32::NAN, f32::INFINITY]), entry(3, 4, vec![])],
            vec![],
            vec![entry(0, 2, vec![1e-30])],
        ];
        let back = gather_quantiles(&Group::single(), &mine).unwrap();
        assert_eq!(back.len(), mine.len());
        for (a, b) in back.iter().flatten().zip(mine.iter().flatten()) {
            assert_eq!((a.layer, a.step), (b.layer, b.step));
            let bits = |q: &[f32]| q.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&a.quantiles), bits(&b.quantiles));
        }
    }
}
