//! Data-parallel training under `mpirun` (DESIGN §14), against single-process runs on the
//! same data: bit for bit with one micro-batch per rank, within rounding with several;
//! resume with another number of ranks; errors end the whole job.
//!
//! Needs the `mpi` feature and Open MPI's `mpirun` (`.ci/run` installs both):
//! `cargo test --release --features mpi --test mpi`.
#![cfg(feature = "mpi")]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const ITT: &str = env!("CARGO_BIN_EXE_itt");

/// A small ITT run on the built-in data; the thinking layers' router calibration is part of
/// what must agree.
const RUN: &[&str] = &["--preset", "tiny-itt4", "--batch-size", "4", "--seq-len", "32", "--quiet"];

fn mpirun(ranks: usize) -> Command {
    let mut c = Command::new("mpirun");
    // CI runs as root; loopback only; 2 ranks may exceed the slots Open MPI counts.
    c.args(["-n", &ranks.to_string(), "--oversubscribe", "--bind-to", "none", "--mca", "btl_tcp_if_include", "lo"]);
    c.env("OMPI_ALLOW_RUN_AS_ROOT", "1").env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
    c.arg(ITT);
    c
}

/// `itt train` on one process, or on `ranks` under mpirun; one thread per process so that the
/// products are the same bits either way.
fn train(ranks: usize, out: &Path, extra: &[&str]) -> Output {
    let mut c = if ranks == 1 { Command::new(ITT) } else { mpirun(ranks) };
    c.env("RAYON_NUM_THREADS", "1").arg("train").args(RUN).args(extra).arg("--out").arg(out);
    c.output().expect("runs")
}

fn ok(out: &Output) {
    assert!(
        out.status.success(),
        "failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// (step, loss, grad_norm) of every logged step.
fn losses(run: &Path) -> Vec<(u64, f64, f64)> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|j| j.get("loss").is_some())
        .map(|j| (j["step"].as_u64().unwrap(), j["loss"].as_f64().unwrap(), j["grad_norm"].as_f64().unwrap()))
        .collect()
}

/// (step, validation loss) of every validation.
fn val_losses(run: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|j| j.get("val_loss").is_some())
        .map(|j| (j["step"].as_u64().unwrap(), j["val_loss"].as_f64().unwrap()))
        .collect()
}

fn checkpoint(run: &Path, step: usize) -> PathBuf {
    run.join("checkpoints").join(format!("step-{step:08}"))
}

/// The files that must be the same bits: weights, optimiser moments, router calibration.
fn same_state(a: &Path, b: &Path) {
    for f in ["model.safetensors", "optimizer.safetensors", "router_calibration.json"] {
        let (x, y) = (std::fs::read(a.join(f)).unwrap(), std::fs::read(b.join(f)).unwrap());
        assert!(x == y, "{f} differs between {} and {}", a.display(), b.display());
    }
}

#[test]
fn two_ranks_equal_one_process_with_two_micro_batches() {
    let tmp = tempfile::tempdir().unwrap();
    let (single, multi) = (tmp.path().join("single"), tmp.path().join("multi"));
    let args = [
        "--steps",
        "4",
        "--grad-accum",
        "2",
        "--checkpoint-interval",
        "2",
        "--log-interval",
        "1",
        "--eval-interval",
        "2",
    ];
    ok(&train(1, &single, &args));
    let out = train(2, &multi, &args);
    ok(&out);
    // Rank 0 alone prints the summary.
    assert_eq!(String::from_utf8_lossy(&out.stdout).matches("trained 4 steps").count(), 1);
    assert_eq!(losses(&single), losses(&multi));
    assert_eq!(losses(&multi).len(), 4);
    // Validation batches are dealt over the ranks and their sums added in batch order.
    assert_eq!(val_losses(&single), val_losses(&multi));
    assert_eq!(val_losses(&multi).len(), 2);
    same_state(&checkpoint(&single, 4), &checkpoint(&multi, 4));
    same_state(&checkpoint(&single, 2), &checkpoint(&multi, 2));
}

/// The GPU's optimiser (gradient sums and moments as tensors, the sum over ranks through the
/// host) run on CPU tensors: 2 ranks equal one process with the same optimiser, bit for bit.
#[test]
fn the_device_optimiser_sums_over_ranks_like_one_process() {
    let tmp = tempfile::tempdir().unwrap();
    let (single, multi) = (tmp.path().join("single"), tmp.path().join("multi"));
    let args = ["--steps", "3", "--grad-accum", "2", "--log-interval", "1"];
    let run = |ranks: usize, out: &Path| {
        let mut c = if ranks == 1 { Command::new(ITT) } else { mpirun(ranks) };
        c.env("RAYON_NUM_THREADS", "1").env("ITT_DEVICE_OPTIMIZER", "1");
        c.arg("train").args(RUN).args(args).arg("--out").arg(out).output().unwrap()
    };
    ok(&run(1, &single));
    ok(&run(2, &multi));
    assert_eq!(losses(&single), losses(&multi));
    same_state(&checkpoint(&single, 3), &checkpoint(&multi, 3));
}

#[test]
fn several_micro_batches_per_rank_agree_within_rounding() {
    let tmp = tempfile::tempdir().unwrap();
    let (single, multi) = (tmp.path().join("single"), tmp.path().join("multi"));
    let args = ["--steps", "3", "--grad-accum", "4", "--log-interval", "1"];
    ok(&train(1, &single, &args));
    ok(&train(2, &multi, &args));
    let (a, b) = (losses(&single), losses(&multi));
    assert_eq!(a.len(), 3);
    for ((s1, l1, g1), (s2, l2, g2)) in a.iter().zip(&b) {
        assert_eq!(s1, s2);
        // The first step's loss comes before any update: the same micro-batches, the same sums.
        // After it the gradient sums were grouped ((g0+g1)+(g2+g3)) rather than left to right.
        assert!((l1 - l2).abs() <= 1e-5 * l1.abs(), "step {s1}: loss {l1} vs {l2}");
        assert!((g1 - g2).abs() <= 1e-4 * g1.abs(), "step {s1}: grad norm {g1} vs {g2}");
    }
    assert_eq!(a[0].1, b[0].1);
}

#[test]
fn resume_with_another_number_of_ranks() {
    let tmp = tempfile::tempdir().unwrap();
    let whole = tmp.path().join("whole");
    let args = ["--steps", "4", "--grad-accum", "2", "--log-interval", "1"];
    ok(&train(1, &whole, &args));
    // Two ranks, stopped at step 2, then one process to the end ...
    let a = tmp.path().join("a");
    ok(&train(2, &a, &[&args[..], &["--stop-at", "2"]].concat()));
    ok(&train(1, &a, &["--resume"]));
    same_state(&checkpoint(&whole, 4), &checkpoint(&a, 4));
    // ... and one process stopped at step 2, then two ranks.
    let b = tmp.path().join("b");
    ok(&train(1, &b, &[&args[..], &["--stop-at", "2"]].concat()));
    ok(&train(2, &b, &["--resume"]));
    same_state(&checkpoint(&whole, 4), &checkpoint(&b, 4));
    assert_eq!(losses(&whole), losses(&b));
}

/// The one-line error of a failed job (each rank that fails prints one; mpirun adds its own
/// report, which is not ours to shorten).
fn job_failed_with(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "succeeded: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let ours: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error: ")).collect();
    assert!(!ours.is_empty() && ours.iter().all(|l| l.contains(needle)), "{stderr}");
}

#[test]
fn a_split_that_does_not_divide_is_refused_before_anything_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let out = train(2, &run, &["--steps", "2", "--grad-accum", "3"]);
    job_failed_with(&out, "--grad-accum 3 does not split over 2 ranks");
    assert!(!run.exists());
}

#[test]
fn an_error_on_rank_0_ends_the_job() {
    // An existing run folder: rank 0 refuses it while rank 1 waits for rank 0's data; the job
    // must end (MPI_Abort), not hang, and the folder must be untouched.
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    ok(&train(1, &run, &["--steps", "1", "--grad-accum", "2"]));
    let before = std::fs::read(run.join("metrics.jsonl")).unwrap();
    let out = train(2, &run, &["--steps", "1", "--grad-accum", "2"]);
    job_failed_with(&out, "already holds a training run");
    assert_eq!(std::fs::read(run.join("metrics.jsonl")).unwrap(), before);
}

#[test]
fn only_train_runs_under_mpirun() {
    let out = mpirun(2).args(["info", "--preset", "tiny"]).output().unwrap();
    job_failed_with(&out, "only `itt train` runs data-parallel");
}

/// Preemption under mpirun (DESIGN §14.2): mpirun forwards SIGUSR1 to every rank (as SLURM's
/// `--signal` does); the ranks stop at the same step, rank 0 writes the checkpoint, the job
/// exits 75, and `--resume` on 2 ranks ends with the uninterrupted run's bits.
#[test]
fn a_preempted_two_rank_run_resumes_to_the_uninterrupted_one() {
    let tmp = tempfile::tempdir().unwrap();
    let (whole, cut) = (tmp.path().join("whole"), tmp.path().join("cut"));
    let args = ["--steps", "60", "--log-interval", "1", "--checkpoint-interval", "1000"];
    ok(&train(2, &whole, &args));

    let mut c = mpirun(2);
    c.env("RAYON_NUM_THREADS", "1").arg("train").args(RUN).args(args).arg("--out").arg(&cut);
    let mut child = c.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap();
    // Wait for a few logged steps, then preempt somewhere inside the run.
    let started = std::time::Instant::now();
    while losses_logged(&cut) < 5 {
        assert!(child.try_wait().unwrap().is_none(), "the run ended before it was signalled");
        assert!(started.elapsed().as_secs() < 300, "no steps logged");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // SAFETY: kill(2) on the pid of a child this test spawned and has not reaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGUSR1) };
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(75), "{stderr}");
    assert!(stderr.contains("SIGUSR1") && stderr.contains("--resume"), "{stderr}");
    let stopped = losses(&cut).last().unwrap().0 as usize;
    assert!(stopped < 60, "the run was not stopped early");
    assert!(checkpoint(&cut, stopped).join("model.safetensors").exists(), "no checkpoint at step {stopped}");

    ok(&train(2, &cut, &["--resume"]));
    same_state(&checkpoint(&whole, 60), &checkpoint(&cut, 60));
    assert_eq!(losses(&whole), losses(&cut), "stopped at step {stopped}");
}

fn losses_logged(run: &Path) -> usize {
    std::fs::read_to_string(run.join("metrics.jsonl")).map(|s| s.matches("\"loss\"").count()).unwrap_or(0)
}
