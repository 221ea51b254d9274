//! Runs that survive a cluster (issue 26): preemption by a signal, one writer per run folder,
//! extending a finished run, verified checkpoint loads. Each test drives the built binary as
//! a scheduler or a user would.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn itt(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_itt")).args(args).output().expect("the itt binary runs")
}

fn spawn(args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_itt"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the itt binary starts")
}

fn ok(out: &Output) {
    assert!(out.status.success(), "failed: {}", String::from_utf8_lossy(&out.stderr));
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A small fast run: tiny model, one metrics line per step (so a resumed run's lines can be
/// compared one for one with an uninterrupted run's).
fn train_args<'a>(out: &'a Path, steps: &'a str) -> Vec<&'a str> {
    vec![
        "train",
        "--preset",
        "tiny-itt2",
        "--steps",
        steps,
        "--batch-size",
        "2",
        "--seq-len",
        "16",
        "--log-interval",
        "1",
        "--eval-interval",
        "7",
        "--quiet",
        "--out",
        s(out),
    ]
}

/// The metrics lines without their timings.
fn metrics(run: &Path) -> Vec<String> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            for k in ["elapsed_s", "tokens_per_s", "comm_s"] {
                v.as_object_mut().unwrap().remove(k);
            }
            v.to_string()
        })
        .collect()
}

fn latest(run: &Path) -> PathBuf {
    run.join(std::fs::read_to_string(run.join("latest")).unwrap().trim())
}

/// The final weights and optimiser state, byte for byte.
fn final_state(run: &Path) -> (Vec<u8>, Vec<u8>) {
    let dir = latest(run);
    (std::fs::read(dir.join("model.safetensors")).unwrap(), std::fs::read(dir.join("optimizer.safetensors")).unwrap())
}

fn metric_lines(run: &Path) -> usize {
    std::fs::read_to_string(run.join("metrics.jsonl")).map(|t| t.lines().count()).unwrap_or(0)
}

/// Wait until the run has logged `lines` metrics lines (or the child ended).
fn wait_for_lines(child: &mut Child, run: &Path, lines: usize) {
    let t0 = Instant::now();
    while metric_lines(run) < lines {
        assert!(child.try_wait().unwrap().is_none(), "the run ended before it was signalled");
        assert!(t0.elapsed() < Duration::from_secs(120), "the run made no progress");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn signal(child: &Child, sig: i32) {
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, sig) }, 0);
}

/// A pseudo-random number from the clock, printed so that a failure can be reproduced.
fn random_below(n: usize) -> usize {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos() as usize;
    let r = nanos.wrapping_mul(2654435761) % n;
    eprintln!("random pick: {r} of {n}");
    r
}

#[test]
fn a_signal_at_a_random_step_then_resume_equals_the_uninterrupted_run() {
    let dir = tempfile::tempdir().unwrap();
    let (whole, cut) = (dir.path().join("whole"), dir.path().join("cut"));
    ok(&itt(&train_args(&whole, "120")));

    for (sig, exit) in [(libc::SIGTERM, "SIGTERM"), (libc::SIGUSR1, "SIGUSR1")] {
        let _ = std::fs::remove_dir_all(&cut);
        let mut child = spawn(&train_args(&cut, "120"));
        // Somewhere in the first half of the run, then a random extra wait inside a step.
        wait_for_lines(&mut child, &cut, 2 + random_below(50));
        std::thread::sleep(Duration::from_micros(random_below(20_000) as u64));
        signal(&child, sig);
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(75), "{stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
        assert!(stderr.contains(exit) && stderr.contains("--resume"), "{stderr}");
        let stopped = latest(&cut);
        let step: usize = stopped.file_name().unwrap().to_str().unwrap()["step-".len()..].parse().unwrap();
        assert!(step < 120, "the run was not stopped early: {}", stopped.display());
        ok(&itt(&["verify", s(&stopped)]));

        ok(&itt(&["train", "--out", s(&cut), "--resume", "--quiet"]));
        assert!(final_state(&cut) == final_state(&whole), "stopped at step {step}: the final state differs");
        assert_eq!(metrics(&cut), metrics(&whole), "stopped at step {step}");
    }
}

#[test]
fn a_second_signal_exits_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    // Slow steps (about half a second here), so that both signals land inside one.
    let mut child = spawn(&[
        "train",
        "--preset",
        "tiny",
        "--steps",
        "50",
        "--batch-size",
        "16",
        "--seq-len",
        "128",
        "--log-interval",
        "1",
        "--checkpoint-interval",
        "0",
        "--quiet",
        "--out",
        s(&run),
    ]);
    wait_for_lines(&mut child, &run, 1);
    signal(&child, libc::SIGINT);
    std::thread::sleep(Duration::from_millis(20));
    signal(&child, libc::SIGINT);
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(128 + libc::SIGINT), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn preemption_signals_can_be_chosen_and_bad_ones_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let mut args = train_args(&run, "1");
    args.extend(["--preempt-signals", "KILL"]);
    let out = itt(&args);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("KILL"));
    assert!(!run.exists(), "a refused run left a folder behind");
}

fn slow_run<'a>(out: &'a Path, steps: &'a str) -> Vec<&'a str> {
    vec![
        "train",
        "--preset",
        "tiny",
        "--steps",
        steps,
        "--batch-size",
        "16",
        "--seq-len",
        "128",
        "--log-interval",
        "1",
        "--checkpoint-interval",
        "1",
        "--quiet",
        "--out",
        s(out),
    ]
}

#[test]
fn a_second_writer_is_refused_with_the_holder_named() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let mut holder = spawn(&slow_run(&run, "400"));
    wait_for_lines(&mut holder, &run, 4);
    let lines_before = metric_lines(&run);
    let out = itt(&["train", "--out", s(&run), "--resume", "--quiet"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a second writer ran: {stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(stderr.contains(&format!("PID {}", holder.id())) && stderr.contains("lock"), "{stderr}");
    // Readers need no lock.
    ok(&itt(&["verify", s(&run)]));
    signal(&holder, libc::SIGTERM);
    let out = holder.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(75), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(metric_lines(&run) >= lines_before);
    // Released on exit: the next writer goes ahead, with no word about a stale lock.
    let out = itt(&["train", "--out", s(&run), "--resume", "--stop-at", &(lines_before + 2).to_string(), "--quiet"]);
    ok(&out);
    assert!(!String::from_utf8_lossy(&out.stderr).contains("taken over"));
}

#[test]
fn a_lock_left_by_a_dead_process_is_reported_and_taken_over() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    ok(&itt(&train_args(&run, "2")));
    // A process that has ended: its PID is no holder of any lock.
    let mut gone = Command::new("true").spawn().unwrap();
    gone.wait().unwrap();
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let text = format!("{{\"host\": \"{}\", \"pid\": {}}}\n", host.trim(), gone.id());
    std::fs::write(run.join("lock"), text).unwrap();
    let out = itt(&["train", "--out", s(&run), "--resume", "--steps", "4", "--quiet"]);
    ok(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&format!("PID {}", gone.id())) && stderr.contains("taken over"), "{stderr}");
    assert_eq!(std::fs::read_to_string(run.join("lock")).unwrap(), "", "the lock was not released");
}

fn lr_of(run: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            Some((v["step"].as_u64()?, v["lr"].as_f64()?))
        })
        .collect()
}

#[test]
fn a_finished_run_extends_with_a_constant_tail_and_its_past_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let (base, once, twice) = (dir.path().join("base"), dir.path().join("once"), dir.path().join("twice"));
    ok(&itt(&train_args(&base, "30")));
    let copy = |to: &Path| ok(&Command::new("cp").args(["-r", s(&base), s(to)]).output().unwrap());
    copy(&once);
    copy(&twice);
    let base_lines = metrics(&base);

    let out = itt(&["train", "--out", s(&once), "--resume", "--steps", "50", "--quiet"]);
    ok(&out);
    assert!(String::from_utf8_lossy(&out.stderr).contains("from 30 to 50"));
    let lines = metrics(&once);
    assert_eq!(lines[..base_lines.len()], base_lines[..], "the steps before the old end changed");
    assert_eq!(latest(&once).file_name().unwrap(), "step-00000050");
    // The constant tail: every extra step at the cosine's final rate.
    let lr = lr_of(&once);
    let last_old = lr.iter().find(|(s, _)| *s == 30).unwrap().1;
    let tail: Vec<f64> = lr.iter().filter(|(s, _)| *s > 30).map(|x| x.1).collect();
    assert_eq!(tail.len(), 20);
    assert!(tail.iter().all(|&x| x == tail[0]) && tail[0] <= last_old, "{tail:?} after {last_old}");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(once.join("config.json")).unwrap()).unwrap();
    assert_eq!((cfg["train"]["max_steps"].as_u64(), cfg["train"]["schedule_steps"].as_u64()), (Some(50), Some(30)));

    // The extension survives a stop and a resume: the same bits as in one go.
    ok(&itt(&["train", "--out", s(&twice), "--resume", "--steps", "50", "--stop-at", "41", "--quiet"]));
    ok(&itt(&["train", "--out", s(&twice), "--resume", "--quiet"]));
    assert!(final_state(&twice) == final_state(&once), "an extension resumed in two parts differs");

    // Going back, or shortening the schedule, is refused in one line.
    let mid = dir.path().join("mid");
    ok(&itt(&train_args(&mid, "60").into_iter().chain(["--stop-at", "20"]).collect::<Vec<_>>()));
    for (run, steps, needle) in [(&once, "10", "behind this run"), (&mid, "45", "--stop-at 45")] {
        let out = itt(&["train", "--out", s(run), "--resume", "--steps", steps, "--quiet"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
        assert!(stderr.contains(needle), "{stderr}");
    }
}

#[test]
fn every_command_that_loads_a_checkpoint_refuses_a_flipped_byte_unless_told_not_to_verify() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    ok(&itt(&train_args(&run, "2")));
    let st = latest(&run).join("model.safetensors");
    let mut bytes = std::fs::read(&st).unwrap();
    // A mantissa bit of the last weight: the file stays well-formed, only the hash tells.
    let at = bytes.len() - 4;
    bytes[at] ^= 0x01;
    std::fs::write(&st, &bytes).unwrap();
    let r = s(&run);
    let (export, analysis) = (dir.path().join("export"), dir.path().join("analysis"));
    let commands: Vec<Vec<&str>> = vec![
        vec!["eval", "--checkpoint", r, "--text", "12+34=46"],
        vec!["generate", "--checkpoint", r, "--prompt", "1+1=", "--max-new-tokens", "2"],
        vec!["export", "--checkpoint", r, "--out", s(&export)],
        vec!["analyze", "depth", "--checkpoint", r, "--text", "12+34=46", "--out", s(&analysis)],
        vec!["serve", "--checkpoint", r, "--port", "0"],
        vec!["info", "--checkpoint", r],
    ];
    for args in &commands {
        let out = itt(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.contains("model.safetensors") && stderr.contains("sha256"), "{args:?}: {stderr}");
    }
    assert!(!export.exists(), "a refused export wrote its folder");
    let mut args = commands[0].clone();
    args.push("--no-verify");
    ok(&itt(&args));
}

#[test]
fn mpirun_without_grad_accum_takes_one_micro_batch_per_rank() {
    use itt::train::grad_accum_for_ranks as g;
    // A preset (1 micro-batch) over 2 ranks: one each, and a notice saying so.
    let (n, note) = g(1, false, 2);
    assert_eq!(n, 2);
    assert!(note.unwrap().contains("--grad-accum 2"));
    // Splits already, or given on the command line, or one process: unchanged, no word.
    assert_eq!(g(4, false, 2), (4, None));
    assert_eq!(g(3, true, 2), (3, None));
    assert_eq!(g(3, false, 1), (3, None));
    // A config's 3 over 2 ranks: 3 per rank.
    assert_eq!(g(3, false, 2).0, 6);
}

#[test]
fn a_crash_at_every_point_of_a_checkpoint_save_resumes_from_an_intact_one() {
    let dir = tempfile::tempdir().unwrap();
    let whole = dir.path().join("whole");
    let mut args = train_args(&whole, "6");
    args.extend(["--checkpoint-interval", "2"]);
    ok(&itt(&args));
    for point in itt::checkpoint::FAULT_POINTS {
        let run = dir.path().join(point);
        let mut args = train_args(&run, "6");
        args.extend(["--checkpoint-interval", "2"]);
        // Saving step 6 also prunes step 2 (two are kept).
        let out = Command::new(env!("CARGO_BIN_EXE_itt"))
            .args(&args)
            .env("ITT_FAULT_CHECKPOINT", format!("{point}@6"))
            .output()
            .unwrap();
        assert!(!out.status.success(), "{point}: the fault did not fire");
        assert!(String::from_utf8_lossy(&out.stderr).contains(&format!("aborting at {point}")), "{point}");
        // Step 4, the checkpoint before the crash, is intact whatever the point.
        ok(&itt(&["verify", s(&run.join("checkpoints/step-00000004"))]));
        let out = itt(&["train", "--out", s(&run), "--resume", "--quiet"]);
        assert!(out.status.success(), "{point}: {}", String::from_utf8_lossy(&out.stderr));
        assert!(final_state(&run) == final_state(&whole), "{point}: the resumed run differs");
        assert_eq!(metrics(&run), metrics(&whole), "{point}");
        ok(&itt(&["verify", s(&run)]));
    }
}

/// `itt` under a file-size limit: writes past `bytes` fail (EFBIG) as they fail on a full disk
/// (ENOSPC), through the same error paths, without root or a small filesystem. SIGXFSZ is
/// ignored so that the write returns the error instead of killing the process.
fn itt_on_a_full_disk(args: &[&str], bytes: u64) -> Output {
    use std::os::unix::process::CommandExt;
    let mut c = Command::new(env!("CARGO_BIN_EXE_itt"));
    c.args(args);
    // SAFETY: only async-signal-safe calls (signal, setrlimit) between fork and exec.
    unsafe {
        c.pre_exec(move || {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            let limit = libc::rlimit { rlim_cur: bytes, rlim_max: bytes };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    c.output().expect("the itt binary runs")
}

/// A failed write is one `error:` line naming the file, exit 1, never a panic.
fn failed_to_write(out: &Output, what: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{what}: {stderr}");
    assert!(!stderr.contains("panicked"), "{what}: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{what}: {stderr}");
    assert!(lines[0].starts_with("error: ") && lines[0].contains("large"), "{what}: {stderr}");
}

/// No temporary file (`*.tmp<pid>`) left anywhere under `dir`.
fn no_temporaries(dir: &Path) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let temporary = name.rsplit_once(".tmp").is_some_and(|(_, pid)| pid.parse::<u32>().is_ok());
        assert!(!temporary, "left behind: {}", path.display());
        if path.is_dir() {
            no_temporaries(&path);
        }
    }
}

#[test]
fn a_full_disk_fails_every_writer_in_one_line_and_damages_nothing() {
    let dir = tempfile::tempdir().unwrap();
    // Training: the checkpoint at step 6 (3.3 MB of weights) does not fit; the one at step 4
    // stays the run's latest, and resuming with room ends where an uninterrupted run does.
    let whole = dir.path().join("whole");
    let mut args = train_args(&whole, "8");
    args.extend(["--checkpoint-interval", "2"]);
    ok(&itt(&args));
    let run = dir.path().join("run");
    let mut args = train_args(&run, "8");
    args.extend(["--checkpoint-interval", "2", "--stop-at", "4"]);
    ok(&itt(&args));
    let out = itt_on_a_full_disk(&["train", "--out", s(&run), "--resume", "--quiet"], 3_000_000);
    failed_to_write(&out, "checkpoint");
    no_temporaries(&run);
    assert!(latest(&run).ends_with("step-00000004"));
    ok(&itt(&["verify", s(&run)]));
    ok(&itt(&["train", "--out", s(&run), "--resume", "--quiet"]));
    assert!(final_state(&run) == final_state(&whole), "the resumed run differs");

    // A fresh run whose data does not fit: nothing is left that blocks running it again.
    let fresh = dir.path().join("fresh");
    failed_to_write(&itt_on_a_full_disk(&train_args(&fresh, "2"), 1_000_000), "training data");
    if fresh.exists() {
        no_temporaries(&fresh);
    }
    ok(&itt(&train_args(&fresh, "2")));

    // Export: no half-written model file.
    let export = ["export", "--checkpoint", s(&whole), "--format", "itt", "--out"];
    let folder = dir.path().join("exported");
    failed_to_write(&itt_on_a_full_disk(&[&export[..], &[s(&folder)]].concat(), 100_000), "export");
    assert!(!folder.join("model.safetensors").exists());
    no_temporaries(dir.path());

    // Tokenizer training: the output either whole or absent.
    let corpus = dir.path().join("corpus.txt");
    std::fs::write(&corpus, "the cat sat on the mat. ".repeat(400)).unwrap();
    let tok = dir.path().join("tok.json");
    let out =
        itt_on_a_full_disk(&["tokenizer", "train", "--data", s(&corpus), "--vocab-size", "300", "--out", s(&tok)], 64);
    failed_to_write(&out, "tokenizer");
    assert!(!tok.exists());

    // Experiment results: a rerun that cannot write them leaves the earlier ones intact.
    let exp = dir.path().join("exp");
    let grid = [
        "experiment",
        "table1",
        "--variants",
        "dense",
        "--steps",
        "2",
        "--seeds",
        "1",
        "--problems",
        "0",
        "--batch-size",
        "2",
        "--seq-len",
        "16",
        "--eval-batches",
        "1",
        "--quiet",
        "--out",
        s(&exp),
    ];
    ok(&itt(&grid));
    let results = exp.join("table1/results.json");
    let before = std::fs::read(&results).unwrap();
    failed_to_write(&itt_on_a_full_disk(&grid, 64), "experiment results");
    assert_eq!(std::fs::read(&results).unwrap(), before);
    no_temporaries(&exp);
}
