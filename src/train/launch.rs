//! Starting a training run as `itt train` does: new or resumed, on every rank of an `mpirun`
//! job, with its data prepared and its folder checked (DESIGN §14). The command line parses
//! its flags into [`LaunchOptions`] and makes one call, [`launch`].
//!
//! Under `mpirun -n P` every rank runs `launch`; rank 0 alone prepares data and writes the run
//! folder, the others wait for it and then read what it wrote.

use super::lock::RunLock;
use super::{prepare_data, refuse_existing_run, run, DataSpec, RunOptions, TrainSummary, Trainer, TrainerOptions};
use crate::base::config::{OnNonFinite, RunConfig};
use crate::base::dist::Group;
use crate::base::error::IoContext;
use crate::base::util::DeviceSpec;
use crate::data::{Dataset, Tokenizer};
use crate::{Error, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

/// How a run starts.
#[derive(Clone, Debug)]
pub enum Start {
    /// A fresh run of this config. `vocab_from_tokenizer`: the model's vocabulary is the
    /// tokenizer's (a preset); otherwise the config's must match it (a config file).
    New { config: Box<RunConfig>, vocab_from_tokenizer: bool },
    /// Continue the run in the folder from this checkpoint, or from its newest intact one;
    /// `steps`: to this step, past the run's end if larger (see [`extend`]).
    Resume { from: Option<PathBuf>, steps: Option<usize> },
}

/// Everything `itt train` decides from its flags.
#[derive(Clone, Debug)]
pub struct LaunchOptions {
    /// The run folder.
    pub out: PathBuf,
    pub start: Start,
    /// The training text; a raw corpus is tokenized into `out/data`.
    pub data: DataSpec,
    /// What to do on a non-finite loss or gradient norm, over the config's (resumed runs too).
    pub on_nonfinite: Option<OnNonFinite>,
    /// The device of rank 0 of each machine; under mpirun rank r of a machine takes `cuda:(N + r)`.
    pub device: DeviceSpec,
    /// The optimiser on the parameters' device even on the CPU (`ITT_DEVICE_OPTIMIZER=1`:
    /// how tests reach the GPU path without a GPU; DESIGN §15).
    pub device_optimizer: bool,
    pub run: RunOptions,
}

/// Start (or resume) the run, train it to the end, and return rank 0's summary (`None` on the
/// other ranks, whose metrics and checkpoints go nowhere).
pub fn launch(opts: &LaunchOptions) -> Result<Option<TrainSummary>> {
    if opts.run.stop_at == Some(0) {
        // The same reason as --steps 0, for a new run and a resumed one alike.
        return Err(Error::usage("nothing to train: --stop-at is 0; give the step to stop after, 1 or more"));
    }
    if let Start::New { config, .. } = &opts.start {
        // Refused before the run folder is made: a run of no steps has no checkpoint to end on.
        if config.train.max_steps == 0 {
            return Err(Error::usage("nothing to train: --steps (train.max_steps) is 0; give 1 or more"));
        }
    }
    let group = Group::from_launch()?;
    let placed = TrainerOptions {
        group: group.clone(),
        device: crate::base::util::open_device(rank_device(opts.device, &group))?,
        device_optimizer: opts.device_optimizer,
        weights: None,
    };
    // Held until training ends; rank 0 alone writes, so it alone locks (DESIGN §14).
    let (mut trainer, dataset, _lock) = match &opts.start {
        Start::Resume { from, steps } => {
            let mut started = resume(opts, from.as_deref(), placed)?;
            if let Some(n) = steps {
                extend(&mut started.0, *n)?;
            }
            started
        }
        Start::New { .. } if !group.is_lead() => join_new(opts, placed)?,
        Start::New { config, vocab_from_tokenizer } => {
            start_new(opts, (**config).clone(), *vocab_from_tokenizer, placed)?
        }
    };
    if group.is_distributed() {
        // Ranks that disagree here would train different models without a word.
        group.share(trainer.cfg.train.grad_accum)?;
        group.check_agree("model, optimiser state or data position", trainer.fingerprint()?)?;
    }
    let summary = run(&mut trainer, &dataset, &opts.run)?;
    Ok(group.is_lead().then_some(summary))
}

/// A run ready to train, and rank 0's lock of its folder.
type Started = (Trainer, Dataset, Option<RunLock>);

/// The micro-batches per step of a fresh run over `ranks` ranks when `--grad-accum` was not
/// given: the config's `grad_accum` if it splits evenly, else that many per rank (a preset's
/// 1 becomes one micro-batch per rank), so `mpirun -n P itt train --preset small` runs as
/// launched. Each rank then computes what the single process would; the global batch is P
/// times larger, which the returned notice says. `--grad-accum` given is taken as it is.
pub fn grad_accum_for_ranks(configured: usize, given: bool, ranks: usize) -> (usize, Option<String>) {
    if given || ranks <= 1 || configured.is_multiple_of(ranks) {
        return (configured, None);
    }
    let total = configured * ranks;
    let note = format!(
        "note: {ranks} ranks, so --grad-accum {total} ({configured} micro-batch{} per rank; {ranks} times the \
         single-process batch); give --grad-accum to choose",
        if configured == 1 { "" } else { "es" }
    );
    (total, Some(note))
}

/// Under mpirun each rank of a machine takes its own GPU: cuda:N is the first (DESIGN §14).
fn rank_device(device: DeviceSpec, group: &Group) -> DeviceSpec {
    match device {
        DeviceSpec::Cuda(n) if group.is_distributed() => DeviceSpec::Cuda(n + crate::base::dist::launched_local_rank()),
        spec => spec,
    }
}

/// Rank 0's lock of the run folder, announcing a stale one it took over.
fn lock(dir: &Path) -> Result<RunLock> {
    let lock = RunLock::acquire(dir)?;
    if let Some(note) = &lock.took_over {
        eprintln!("{note}");
    }
    Ok(lock)
}

/// Continue the run in `out`; its data folder is prepared again if the run lost it.
fn resume(opts: &LaunchOptions, from: Option<&Path>, placed: TrainerOptions) -> Result<Started> {
    let group = placed.group.clone();
    // Before anything is read, so that no other writer changes the run under this one; a
    // folder that does not exist is left to `Trainer::resume` to report (and not created).
    let held = if group.is_lead() && opts.out.is_dir() { Some(lock(&opts.out)?) } else { None };
    let mut trainer = Trainer::resume(&opts.out, from, placed)?;
    if group.is_lead() {
        for n in &trainer.notices {
            eprintln!("{n}");
        }
    }
    if let Some(v) = opts.on_nonfinite {
        trainer.cfg.train.on_nonfinite = v;
    }
    let data_dir = opts.out.join("data");
    let open = || Dataset::open(&data_dir).or_else(|_| prepare_data(&opts.data, &data_dir).map(|x| x.0));
    // Rank 0 prepares the data if the run folder lost it; the others then find it there.
    let lead_data = if group.is_lead() { Some(open()?) } else { None };
    group.barrier();
    let dataset = match lead_data {
        Some(d) => d,
        None => open()?,
    };
    dataset.check_tokenizer(&Tokenizer::from_json(&trainer.tokenizer_json)?)?;
    Ok((trainer, dataset, held))
}

/// Set a resumed run's end to step `n`. Past its end the run continues with the learning rate
/// at the cosine's final value (a constant tail; `schedule_steps` keeps the original length,
/// so every earlier step is unchanged); a shorter schedule or a step already passed is refused,
/// since either would make the run something it was not.
pub fn extend(trainer: &mut Trainer, n: usize) -> Result<()> {
    let (at, end) = (trainer.state.step, trainer.cfg.train.max_steps);
    if n < at {
        return Err(Error::usage(format!(
            "--steps {n} is behind this run, which is at step {at}; give --steps {at} or more, or resume an earlier \
             checkpoint with --checkpoint"
        )));
    }
    if n == end {
        return Ok(());
    }
    if n < end {
        return Err(Error::usage(format!(
            "--steps {n} would shorten this run's {end}-step learning-rate schedule; to stop early and keep it, \
             use --stop-at {n}"
        )));
    }
    let tc = &mut trainer.cfg.train;
    let schedule = *tc.schedule_steps.get_or_insert(end);
    tc.max_steps = n;
    let tail_lr = tc.lr_at(schedule);
    if trainer.group.is_lead() {
        let config = trainer.run_dir.join("config.json");
        crate::base::util::write_atomic(&config, |w| w.write_all(trainer.cfg.to_json().as_bytes()))?;
        let metrics = trainer.run_dir.join("metrics.jsonl");
        let line = serde_json::json!({"step": at, "extended": {"from": end, "to": n, "schedule_steps": schedule, "tail_lr": tail_lr}});
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&metrics).at(&metrics)?;
        writeln!(f, "{line}").at(&metrics)?;
        eprintln!(
            "extending the run from {end} to {n} steps; after step {schedule} the learning rate stays at {tail_lr:.3e}"
        );
    }
    Ok(())
}

/// Rank 0's fresh run: checks that `out` is free before anything is written, prepares the data,
/// writes the run folder; a folder it created is removed again if that fails.
fn start_new(
    opts: &LaunchOptions,
    mut cfg: RunConfig,
    vocab_from_tokenizer: bool,
    placed: TrainerOptions,
) -> Result<Started> {
    let group = placed.group.clone();
    if let Some(v) = opts.on_nonfinite {
        cfg.train.on_nonfinite = v;
    }
    // Checked before anything is written, so that a bad split leaves no folder behind.
    group.share(cfg.train.grad_accum)?;
    let out = &opts.out;
    refuse_existing_run(out)?;
    let others = |d: std::fs::ReadDir| d.flatten().any(|e| e.file_name() != super::lock::LOCK_FILE);
    if out.read_dir().map(others).unwrap_or(false) {
        return Err(Error::usage(format!(
            "{} exists and is not empty (an unrelated folder, or a run stopped before its first checkpoint); \
             choose another --out",
            out.display()
        )));
    }
    let created = !out.exists();
    std::fs::create_dir_all(out).map_err(|e| Error::Io { path: out.clone(), source: e })?;
    let held = match lock(out) {
        Ok(l) => l,
        Err(e) => {
            if created {
                let _ = std::fs::remove_dir_all(out);
            }
            return Err(e);
        }
    };
    let setup = || -> Result<(Trainer, Dataset)> {
        let (dataset, tok) = prepare_data(&opts.data, &out.join("data"))?;
        if vocab_from_tokenizer {
            cfg.model.vocab_size = tok.vocab_size();
        }
        cfg.validate()?;
        Ok((Trainer::new(cfg, &tok, out, placed)?, dataset))
    };
    let made = match setup() {
        Ok(x) => x,
        Err(e) => {
            // A run that never started leaves nothing behind in a folder it created.
            if created {
                let _ = std::fs::remove_dir_all(out);
            }
            return Err(e);
        }
    };
    group.barrier();
    Ok((made.0, made.1, Some(held)))
}

/// Another rank's part of a fresh run: what rank 0 prepared, its dataset and the run's config
/// as it wrote them.
fn join_new(opts: &LaunchOptions, placed: TrainerOptions) -> Result<Started> {
    placed.group.barrier();
    let data_dir = opts.out.join("data");
    let prepared = if Path::new(&opts.data.path).join("meta.json").exists() {
        opts.data.clone()
    } else {
        DataSpec { path: data_dir.to_string_lossy().into_owned(), ..opts.data.clone() }
    };
    let (dataset, tok) = prepare_data(&prepared, &data_dir)?;
    let cfg = RunConfig::load(&opts.out.join("config.json"))?;
    Ok((Trainer::new(cfg, &tok, &opts.out, placed)?, dataset, None))
}
