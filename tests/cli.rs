//! The binary on bad input: every case is a one-line error naming the problem, a non-zero
//! exit, no panic, and nothing overwritten.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

fn itt(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_itt")).args(args).output().expect("the itt binary runs")
}

/// Assert a clean failure whose one-line message contains every `needles` item.
fn fails_cleanly(out: &Output, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "succeeded; stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "panicked: {stderr}");
    let line = stderr.trim_end();
    assert_eq!(line.lines().count(), 1, "not one line: {stderr}");
    assert!(line.starts_with("error: "), "{line}");
    for n in needles {
        assert!(line.contains(n), "{line:?} does not mention {n:?}");
    }
}

/// A small trained ITT run, made once for all tests: (tempdir guard, run folder).
fn trained() -> &'static PathBuf {
    static RUN: OnceLock<PathBuf> = OnceLock::new();
    RUN.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap().keep();
        let run = dir.join("run");
        let out = itt(&[
            "train",
            "--preset",
            "tiny-itt2",
            "--steps",
            "2",
            "--batch-size",
            "2",
            "--seq-len",
            "16",
            "--quiet",
            "--out",
            run.to_str().unwrap(),
        ]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        run
    })
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let to = dst.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to);
        } else {
            std::fs::copy(e.path(), &to).unwrap();
        }
    }
}

/// A copy of the trained checkpoint folder to damage.
fn checkpoint_copy(name: &str) -> PathBuf {
    let src = itt::checkpoint::resolve(trained()).unwrap();
    let dst = trained().parent().unwrap().join(name);
    copy_dir(&src, &dst);
    dst
}

fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = vec![];
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push((p.clone(), std::fs::read(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn corpus_missing_empty_or_binary() {
    let tmp = tempfile::tempdir().unwrap();
    let out_dir = tmp.path().join("run");
    let o = out_dir.to_str().unwrap();
    fails_cleanly(&itt(&["train", "--data", "/no/such/corpus.txt", "--out", o]), &["/no/such/corpus.txt"]);
    let empty = tmp.path().join("empty.txt");
    std::fs::write(&empty, "  \n").unwrap();
    fails_cleanly(&itt(&["train", "--data", empty.to_str().unwrap(), "--out", o]), &["empty.txt", "empty"]);
    let bin = tmp.path().join("blob.txt");
    std::fs::write(&bin, [0u8, 159, 146, 150, 0, 1, 2, 255]).unwrap();
    fails_cleanly(&itt(&["train", "--data", bin.to_str().unwrap(), "--out", o]), &["blob.txt", "binary"]);
    let jsonl = tmp.path().join("bad.jsonl");
    std::fs::write(&jsonl, "{\"text\": \"fine\"}\n{not json\n").unwrap();
    fails_cleanly(&itt(&["train", "--data", jsonl.to_str().unwrap(), "--out", o]), &["bad.jsonl", "2"]);
}

#[test]
fn configs_malformed_unknown_field_bad_values_unknown_preset() {
    let tmp = tempfile::tempdir().unwrap();
    let o = tmp.path().join("run");
    let o = o.to_str().unwrap();
    let bad = tmp.path().join("bad.json");
    std::fs::write(&bad, "{ \"format_version\": 1, ").unwrap();
    fails_cleanly(&itt(&["train", "--config", bad.to_str().unwrap(), "--out", o]), &["bad.json", "malformed"]);
    let mut cfg: serde_json::Value =
        serde_json::from_str(&itt::base::config::preset("tiny-itt4").unwrap().to_json()).unwrap();
    cfg["model"]["wobble"] = serde_json::json!(3);
    let unknown = tmp.path().join("unknown.json");
    std::fs::write(&unknown, cfg.to_string()).unwrap();
    fails_cleanly(&itt(&["train", "--config", unknown.to_str().unwrap(), "--out", o]), &["unknown.json", "wobble"]);
    cfg["model"].as_object_mut().unwrap().remove("wobble");
    cfg["model"]["thinking"]["ratios"] = serde_json::json!([0.7, 1.5, 0.7]);
    let ratio = tmp.path().join("ratio.json");
    std::fs::write(&ratio, cfg.to_string()).unwrap();
    fails_cleanly(&itt(&["train", "--config", ratio.to_str().unwrap(), "--out", o]), &["thinking.ratios", "1.5"]);
    fails_cleanly(&itt(&["train", "--preset", "enormous-itt9", "--out", o]), &["unknown preset", "enormous-itt9"]);
    fails_cleanly(&itt(&["info", "--preset", "tiny-itt4", "--ratios", "0.5,2"]), &["--ratios"]);
    // Precision: an unknown one on the command line or in a config, and one that does not apply.
    fails_cleanly(&itt(&["train", "--precision", "fp8", "--out", o]), &["fp8", "f32, bf16"]);
    cfg["model"]["thinking"]["ratios"] = serde_json::json!([0.7, 0.7, 0.7]);
    cfg["train"]["precision"] = serde_json::json!("fp8");
    let precision = tmp.path().join("precision.json");
    std::fs::write(&precision, cfg.to_string()).unwrap();
    fails_cleanly(&itt(&["train", "--config", precision.to_str().unwrap(), "--out", o]), &["precision.json", "fp8"]);
    fails_cleanly(&itt(&["bench", "--decode", "tiny", "--precision", "bf16"]), &["--precision", "--decode"]);
    fails_cleanly(&itt(&["bench", "--preset", "tiny", "--steps", "0"]), &["--steps", "at least 1"]);
    // Nothing to train: refused before the run folder is made.
    let none = tmp.path().join("no-steps");
    fails_cleanly(&itt(&["train", "--steps", "0", "--out", none.to_str().unwrap()]), &["nothing to train", "--steps"]);
    assert!(!none.exists(), "a run of no steps left a folder");
    fails_cleanly(
        &itt(&["train", "--stop-at", "0", "--out", none.to_str().unwrap()]),
        &["nothing to train", "--stop-at"],
    );
    assert!(!none.exists(), "a run stopped at step 0 left a folder");
    fails_cleanly(&itt(&["experiment", "table1", "--steps", "0", "--out", none.to_str().unwrap()]), &["--steps"]);
    assert!(!none.exists(), "an experiment of no steps left a folder");
    fails_cleanly(&itt(&["experiment", "table1", "--variants", "dense,itt4,dense", "--out", o]), &["'dense' twice"]);
    fails_cleanly(&itt(&["experiment", "recipe", "--lr-scales", "1,2,1", "--out", o]), &["--lr-scales", "twice"]);
    fails_cleanly(
        &itt(&["experiment", "table1", "--data", "/nonexistent/corpus.txt", "--out", none.to_str().unwrap()]),
        &["/nonexistent/corpus.txt", "no such file"],
    );
    assert!(!none.exists(), "an experiment on a missing corpus left a folder");
}

#[test]
fn truncated_foreign_or_mismatched_checkpoints() {
    // Truncated weights.
    let ck = checkpoint_copy("truncated");
    let st = ck.join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    std::fs::write(&st, &bytes[..bytes.len() / 2]).unwrap();
    fails_cleanly(
        &itt(&["eval", "--checkpoint", ck.to_str().unwrap(), "--text", "12+34=46"]),
        &["model.safetensors", "truncated"],
    );

    // A safetensors file written by something else, into a folder assembled by hand (no
    // manifest): the header names the problem. With the manifest it is a damaged checkpoint.
    let ck = checkpoint_copy("foreign");
    let t = candle_core::Tensor::zeros((2, 2), candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
    candle_core::safetensors::save(
        &std::collections::HashMap::from([("weight".to_string(), t)]),
        ck.join("model.safetensors"),
    )
    .unwrap();
    fails_cleanly(
        &itt(&["eval", "--checkpoint", ck.to_str().unwrap(), "--text", "12+34=46"]),
        &["model.safetensors", "manifest.json", "damaged"],
    );
    std::fs::remove_file(ck.join("manifest.json")).unwrap();
    fails_cleanly(
        &itt(&["eval", "--checkpoint", ck.to_str().unwrap(), "--text", "12+34=46"]),
        &["model.safetensors", "elsewhere"],
    );

    // A tokenizer whose vocabulary does not match the model.
    let ck = checkpoint_copy("tokmismatch");
    itt::data::Tokenizer::byte().save(&ck.join("tokenizer.json")).unwrap();
    std::fs::remove_file(ck.join("manifest.json")).unwrap();
    fails_cleanly(&itt(&["eval", "--checkpoint", ck.to_str().unwrap(), "--text", "12+34=46"]), &["tokenizer", "257"]);

    // Not a checkpoint at all.
    fails_cleanly(&itt(&["eval", "--checkpoint", "/no/such/run", "--text", "x"]), &["/no/such/run"]);
    for size in [["--batch-size", "0"], ["--seq-len", "0"]] {
        let args = ["eval", "--checkpoint", "/no/such/run", "--text", "x", size[0], size[1]];
        fails_cleanly(&itt(&args), &[size[0], "at least 1"]);
    }
}

#[test]
fn generation_bad_requests() {
    let run = trained().to_str().unwrap();
    fails_cleanly(&itt(&["generate", "--checkpoint", run, "--prompt", ""]), &["empty"]);
    let long = "1+1=2\n".repeat(100);
    fails_cleanly(&itt(&["generate", "--checkpoint", run, "--prompt", &long]), &["context"]);
    fails_cleanly(
        &itt(&["generate", "--checkpoint", run, "--prompt", "1+1=", "--ratios", "0.5,0.5,0.5"]),
        &["--ratios"],
    );
    // Characters a char model has no id for are named, and generation goes on.
    let out = itt(&["generate", "--checkpoint", run, "--prompt", "1é+1€=", "--max-new-tokens", "2"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("2 character(s)") && stderr.contains("'é', '€'"), "{stderr}");
    let out = itt(&["generate", "--checkpoint", run, "--prompt", "1+1=", "--max-new-tokens", "2"]);
    assert!(!String::from_utf8_lossy(&out.stderr).contains("vocabulary"), "a notice without cause");
    for e in ["2", "NaN"] {
        fails_cleanly(
            &itt(&["generate", "--checkpoint", run, "--prompt", "1+1=", "--early-exit", e]),
            &["--early-exit"],
        );
    }
    // Benchmarks of decoding refuse sizes that time nothing, and check every preset name
    // before their table starts.
    fails_cleanly(&itt(&["bench", "--decode", "tiny", "--prompt-len", "0"]), &["--prompt-len"]);
    fails_cleanly(&itt(&["bench", "--gguf", run, "--batch", "1,0"]), &["batch sizes"]);
    let out = itt(&["bench", "--decode", "tiny,nope"]);
    fails_cleanly(&out, &["unknown preset 'nope'"]);
    assert!(out.stdout.is_empty(), "{}", String::from_utf8_lossy(&out.stdout));
    // A routed model's file decodes causally on its thresholds, as `itt generate` does.
    let out = itt(&["bench", "--gguf", run, "--prompt", "1+1=", "--new-tokens", "4", "--steps", "1"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("decode 4 tokens"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // A server-wide speculation depth beyond what a request may ask for is refused before it
    // binds a port.
    fails_cleanly(&itt(&["serve", "--checkpoint", run, "--port", "0", "--speculate", "17"]), &["--speculate", "16"]);
    for (bias, why) in [("99999=1", "outside the vocabulary"), ("x", "TOKEN=BIAS"), ("3=500", "between -100 and 100")] {
        fails_cleanly(&itt(&["generate", "--checkpoint", run, "--prompt", "1+1=", "--logit-bias", bias]), &[why]);
    }
    // Causal decoding needs stored thresholds: the message says how to get them. (Removing a
    // file a manifest lists damages the checkpoint, so this one is from before manifests.)
    let ck = checkpoint_copy("nothresholds");
    std::fs::remove_file(ck.join("router_calibration.json")).unwrap();
    std::fs::remove_file(ck.join("manifest.json")).unwrap();
    fails_cleanly(&itt(&["generate", "--checkpoint", ck.to_str().unwrap(), "--prompt", "1+1="]), &["itt calibrate"]);
    // ... no batches is refused before the folder is touched ...
    fails_cleanly(&itt(&["calibrate", "--checkpoint", ck.to_str().unwrap(), "--batches", "0"]), &["--batches"]);
    assert!(!ck.join("router_calibration.json").exists());
    // ... and calibrating brings them back.
    let ok = itt(&["calibrate", "--checkpoint", ck.to_str().unwrap(), "--batches", "2"]);
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    let ok = itt(&["generate", "--checkpoint", ck.to_str().unwrap(), "--prompt", "1+1=", "--max-new-tokens", "3"]);
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
}

#[test]
fn export_quantization_bad_requests() {
    let run = trained().to_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x");
    let out = out.to_str().unwrap();
    let export = |extra: &[&str]| itt(&[&["export", "--checkpoint", run, "--out", out], extra].concat());
    fails_cleanly(&export(&["--format", "gguf", "--quantize", "q9_z"]), &["q9_z", "q8_0", "q4_k"]);
    fails_cleanly(
        &export(&["--format", "itt", "--quantize", "q8_0"]),
        &["--quantize q8_0 applies to --format gguf only"],
    );
    assert!(!dir.path().join("x").exists());
    fails_cleanly(
        &itt(&["generate", "--checkpoint", run, "--prompt", "1", "--gguf-weights", "q4"]),
        &["q4", "quantized"],
    );
}

#[test]
fn nothing_is_overwritten() {
    let run = trained();
    let before = snapshot(run);
    let r = run.to_str().unwrap();
    fails_cleanly(&itt(&["train", "--preset", "tiny", "--steps", "1", "--out", r]), &["--resume"]);
    let tok = run.join("tokenizer.json");
    fails_cleanly(
        &itt(&["tokenizer", "train", "--data", "builtin", "--kind", "char", "--out", tok.to_str().unwrap()]),
        &["exists"],
    );
    fails_cleanly(&itt(&["demo", "--out", r]), &["not an earlier demo"]);
    assert_eq!(snapshot(run), before);
}

#[test]
fn the_commands_work_on_a_trained_run() {
    let run = trained().to_str().unwrap();
    let out = itt(&["eval", "--checkpoint", run, "--text", "12+34=46\nsort 3 1 2 = 1 2 3\n", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["bits_per_byte"].as_f64().unwrap() > 0.0);
    let generate =
        ["generate", "--checkpoint", run, "--prompt", "12+", "--max-new-tokens", "5", "--seed", "3", "--show-depth"];
    let out = itt(&generate);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let again = itt(&generate);
    assert_eq!(out.stdout, again.stdout, "seeded sampling must repeat");
    // A +100 bias forces its token.
    let forced = ["generate", "--checkpoint", run, "--prompt", "12+", "--max-new-tokens", "3", "--temperature", "0"];
    let out = itt(&[&forced[..], &["--logit-bias", "5=100"]].concat());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let tail: Vec<char> = text.strip_prefix("12+").unwrap().strip_suffix('\n').unwrap().chars().collect();
    assert!(tail.len() == 3 && tail.iter().all(|&c| c == tail[0]), "{text:?}");
    let out = itt(&["info", "--checkpoint", run, "--ratios", "0.5"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("FLOPs/token"));
}

#[test]
fn train_refuses_a_non_empty_unrelated_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let precious = tmp.path().join("config.json");
    std::fs::write(&precious, "my own file").unwrap();
    fails_cleanly(
        &itt(&["train", "--preset", "tiny", "--steps", "1", "--out", tmp.path().to_str().unwrap()]),
        &["not empty"],
    );
    assert_eq!(std::fs::read_to_string(&precious).unwrap(), "my own file");
    assert!(!tmp.path().join("data").exists());
}

#[test]
fn info_json_is_a_config_that_train_accepts() {
    let tmp = tempfile::tempdir().unwrap();
    let out = itt(&["info", "--preset", "tiny-itt2", "--json"]);
    assert!(out.status.success());
    let path = tmp.path().join("cfg.json");
    std::fs::write(&path, &out.stdout).unwrap();
    let run = tmp.path().join("run");
    let (p, r) = (path.to_str().unwrap(), run.to_str().unwrap());
    let train = || {
        itt(&["train", "--config", p, "--steps", "1", "--batch-size", "2", "--seq-len", "16", "--quiet", "--out", r])
    };
    // A preset's vocabulary is its tokenizer's, written as null: the config trains on the
    // built-in data as the preset does (issue 26).
    let out = train();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("config.json")).unwrap()).unwrap();
    assert_eq!(saved["model"]["vocab_size"], 51);
    // A number is the model's vocabulary, and must match the tokenizer's: refused naming the field.
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert!(cfg["model"]["vocab_size"].is_null());
    cfg["model"]["vocab_size"] = serde_json::json!(512);
    std::fs::write(&path, cfg.to_string()).unwrap();
    std::fs::remove_dir_all(&run).unwrap();
    fails_cleanly(&train(), &["vocab_size"]);
}

#[test]
fn bf16_without_bf16_hardware_falls_back_to_f32_and_says_so() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let out = Command::new(env!("CARGO_BIN_EXE_itt"))
        .args(["train", "--preset", "tiny", "--precision", "bf16", "--steps", "1", "--batch-size", "2"])
        .args(["--seq-len", "16", "--quiet", "--out", run.to_str().unwrap()])
        .env_remove("ITT_BF16_EMULATE")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let saved = std::fs::read_to_string(run.join("config.json")).unwrap();
    if itt::ops::Precision::bf16_in_hardware() {
        assert!(saved.contains("bf16") && !stderr.contains("notice"), "{stderr}");
    } else {
        assert!(!saved.contains("bf16") && stderr.contains("notice") && stderr.contains("AMX"), "{stderr}");
    }
    // The benchmark runs what it is asked and names the kernels.
    let out = itt(&["bench", "--preset", "tiny", "--vocab", "64", "--steps", "1", "--batch-size", "2"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("f32 gemm"));
    // Asked for bf16, the benchmark times what training would run here (one rule,
    // `Precision::on_this_cpu`) and says which kernels ran.
    let out = Command::new(env!("CARGO_BIN_EXE_itt"))
        .args([
            "bench",
            "--preset",
            "tiny",
            "--vocab",
            "64",
            "--steps",
            "1",
            "--batch-size",
            "2",
            "--precision",
            "bf16",
        ])
        .env_remove("ITT_BF16_EMULATE")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    if itt::ops::Precision::bf16_in_hardware() {
        let kernel = itt::ops::fused::bf16_gemm::bf16_kernel().describe();
        assert!(stdout.contains(kernel), "{stdout}");
    } else {
        assert!(
            stdout.contains("f32 gemm") && stdout.contains("bf16 asked") && !stdout.contains("emulated"),
            "{stdout}"
        );
    }
}

#[test]
fn eval_writes_per_item_scores_and_json_for_every_kind() {
    let run = trained().to_str().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let task = tmp.path().join("t.jsonl");
    std::fs::write(
        &task,
        "{\"context\": \"12+34=\", \"choices\": [\"46\", \"47\", \"4\"], \"gold\": 0}\n\
         {\"context\": \"sort 3 1 2 =\", \"choices\": [\" 1 2 3\", \" 3 2 1\"], \"gold\": 0}\n",
    )
    .unwrap();
    let per_item = tmp.path().join("items.jsonl");
    let args = ["eval", "--checkpoint", run, "--task-file", task.to_str().unwrap(), "--json"];
    let out = itt(&[&args[..], &["--per-item", per_item.to_str().unwrap()]].concat());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let items: Vec<serde_json::Value> =
        std::fs::read_to_string(&per_item).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(items.len(), 2);
    assert_eq!(items[0]["choices"].as_array().unwrap().len(), 3);
    // The summary's accuracy is the share of items whose pick is gold.
    let right = items.iter().filter(|i| i["pick"] == i["gold"]).count() as f64 / 2.0;
    assert_eq!(summary[0]["acc"].as_f64().unwrap(), right);
    for c in items[1]["choices"].as_array().unwrap() {
        assert!(c["logprob"].as_f64().unwrap() < 0.0 && c["bytes"].as_u64().unwrap() == 6, "{c}");
    }
    // An existing file is never replaced.
    let again = itt(&[&args[..], &["--per-item", per_item.to_str().unwrap()]].concat());
    fails_cleanly(&again, &["exists"]);
    // --json on a prepared dataset's validation split is JSON too.
    let data = format!("{run}/data");
    let out = itt(&["eval", "--checkpoint", run, "--data", &data, "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["loss"].as_f64().unwrap() > 0.0 && v["precision"] == "f32");
}

/// A fresh run of `steps` steps with a checkpoint at every step (the newest two kept).
fn fresh_run(name: &str, steps: usize, extra: &[&str]) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join(name);
    let steps = steps.to_string();
    let mut args = vec!["train", "--preset", "tiny", "--steps", &steps, "--batch-size", "2", "--seq-len", "16"];
    args.extend(["--checkpoint-interval", "1", "--quiet", "--out", run.to_str().unwrap()]);
    args.extend(extra);
    let out = itt(&args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    (tmp, run)
}

fn step_dir(run: &Path, step: usize) -> PathBuf {
    run.join("checkpoints").join(format!("step-{step:08}"))
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_string()
}

#[test]
fn verify_and_resume_detect_flipped_bytes() {
    let (_tmp, run) = fresh_run("flipped", 3, &[]);
    let r = run.to_str().unwrap();
    let ok = itt(&["verify", r]);
    assert!(ok.status.success(), "{}", stderr(&ok));
    // Same size, different bytes: only the sha256 can tell.
    let st = step_dir(&run, 3).join("model.safetensors");
    let mut bytes = std::fs::read(&st).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid..mid + 4].iter_mut().for_each(|b| *b ^= 0x5a);
    std::fs::write(&st, &bytes).unwrap();

    let out = itt(&["verify", r]);
    fails_cleanly(&out, &["1 of 2", "step-00000003", "--resume"]);
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(listing.contains("BAD    model.safetensors: its sha256 differs"), "{listing}");
    assert!(listing.contains("step-00000002: intact"), "{listing}");
    let one = itt(&["verify", step_dir(&run, 2).to_str().unwrap()]);
    assert!(one.status.success(), "{}", stderr(&one));

    // Resume skips it for step 2, says so, and trains on to write a good step 3 again.
    let out = itt(&["train", "--resume", "--out", r, "--quiet"]);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("skipped checkpoint") && err.contains("step-00000003") && err.contains("sha256"), "{err}");
    assert!(err.contains("resuming from") && err.contains("step-00000002 (step 2)"), "{err}");
    let ok = itt(&["verify", r]);
    assert!(ok.status.success(), "{}", stderr(&ok));
}

#[test]
fn resume_falls_back_from_a_truncated_checkpoint() {
    let (_tmp, run) = fresh_run("truncated-newest", 3, &[]);
    let st = step_dir(&run, 3).join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    std::fs::write(&st, &bytes[..bytes.len() / 3]).unwrap();
    let older = snapshot(&step_dir(&run, 2));
    // Loading it names the file and the fault, and says where to go.
    fails_cleanly(
        &itt(&["eval", "--checkpoint", run.to_str().unwrap(), "--text", "12+34=46"]),
        &["step-00000003/model.safetensors", "truncated", "--resume"],
    );
    let out = itt(&["train", "--resume", "--out", run.to_str().unwrap(), "--quiet"]);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("step-00000003/model.safetensors") && err.contains("truncated"), "{err}");
    assert!(err.contains("resuming from") && err.contains("step 2"), "{err}");
    // The older checkpoint was read, never changed; the newer one was written again, whole.
    assert_eq!(snapshot(&step_dir(&run, 2)), older);
    assert_eq!(std::fs::read(&st).unwrap().len(), bytes.len());
    // An explicit --checkpoint that is damaged is refused, not replaced by another.
    std::fs::write(&st, &bytes[..10]).unwrap();
    let d3 = step_dir(&run, 3);
    fails_cleanly(
        &itt(&["train", "--resume", "--out", run.to_str().unwrap(), "--checkpoint", d3.to_str().unwrap()]),
        &["model.safetensors", "truncated"],
    );
}

#[test]
fn checkpoints_without_a_manifest_still_load_with_a_notice() {
    let (_tmp, run) = fresh_run("old-format", 2, &["--stop-at", "1"]);
    std::fs::remove_file(step_dir(&run, 1).join("manifest.json")).unwrap();
    let out = itt(&["verify", run.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("no manifest.json"));
    let out = itt(&["train", "--resume", "--out", run.to_str().unwrap(), "--quiet"]);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert_eq!(err.lines().filter(|l| l.contains("no manifest.json")).count(), 1, "{err}");
    // The checkpoint it writes has one.
    assert!(step_dir(&run, 2).join("manifest.json").exists());
}

#[cfg(unix)]
#[test]
fn a_failed_save_removes_its_temporary_folder_and_keeps_the_checkpoints() {
    let (_tmp, run) = fresh_run("disk-full", 4, &["--stop-at", "2"]);
    let ckpts = run.join("checkpoints");
    let before = snapshot(&ckpts);
    // Files may grow to 512 KiB only: the next model.safetensors (3 MiB) fails half-way, as
    // on a full disk. SIGXFSZ is ignored so the write returns an error instead of killing.
    let cmd = format!(
        "ulimit -f 1024; trap '' XFSZ; exec '{}' train --resume --out '{}' --quiet",
        env!("CARGO_BIN_EXE_itt"),
        run.display()
    );
    let out = Command::new("sh").args(["-c", &cmd]).output().unwrap();
    fails_cleanly(&out, &["step-00000003", "not saved", "untouched"]);
    let names: Vec<String> =
        std::fs::read_dir(&ckpts).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().to_string()).collect();
    assert!(!names.iter().any(|n| n.contains(".tmp")), "temporary folder left behind: {names:?}");
    assert_eq!(snapshot(&ckpts), before, "existing checkpoints changed");
    // Without the limit the run goes on from where it was.
    let out = itt(&["train", "--resume", "--out", run.to_str().unwrap(), "--quiet"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(itt(&["verify", run.to_str().unwrap()]).status.success());
}

/// Every weight of every checkpoint of a run is finite.
fn all_checkpoints_finite(run: &Path) -> usize {
    let mut n = 0;
    for e in std::fs::read_dir(run.join("checkpoints")).unwrap() {
        let (model, _, _) = itt::checkpoint::load_model(&e.unwrap().path()).unwrap();
        for (name, v) in &model.params {
            let x: Vec<f32> = v.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
            assert!(x.iter().all(|x| x.is_finite()), "{name} is not finite");
        }
        n += 1;
    }
    n
}

#[test]
fn a_huge_learning_rate_stops_training_without_a_nan_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("diverged");
    let r = run.to_str().unwrap();
    let args = ["train", "--preset", "tiny", "--steps", "8", "--batch-size", "2", "--seq-len", "16"];
    let out = itt(&[&args[..], &["--checkpoint-interval", "1", "--lr", "1e9", "--quiet", "--out", r]].concat());
    fails_cleanly(&out, &["diverged at step", "--lr 1e9", "learning rate", "is kept"]);
    // It stopped at the first non-finite step: every checkpoint before it is there and finite.
    let line = stderr(&out);
    let step: usize = line.split("at step ").nth(1).unwrap().split(':').next().unwrap().parse().unwrap();
    assert!(step < 8, "{line}");
    assert_eq!(all_checkpoints_finite(&run), (step - 1).min(2));
}

#[test]
fn on_nonfinite_skip_drops_the_batches_and_counts_them() {
    let (_tmp, run) = fresh_run("skipping", 8, &["--lr", "1e9", "--on-nonfinite", "skip", "--warmup", "1"]);
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = metrics.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let skips = lines.iter().filter(|l| l["skipped"].is_string()).count();
    assert!(skips > 0, "{metrics}");
    let last_log = lines.iter().rev().find(|l| l.get("loss").is_some()).unwrap();
    assert_eq!(last_log["skipped_batches"].as_u64().unwrap() as usize, skips, "{metrics}");
    assert!(all_checkpoints_finite(&run) > 0);
    let state = std::fs::read_to_string(step_dir(&run, 8).join("state.json")).unwrap();
    assert!(state.contains(&format!("\"skipped_batches\": {skips}")), "{state}");
    fails_cleanly(&itt(&["train", "--on-nonfinite", "maybe", "--out", "/nonexistent/x"]), &["maybe", "stop, skip"]);
}

#[test]
fn serve_answers_then_stops_cleanly_on_sigterm() {
    use std::io::{BufRead, BufReader};
    let run = trained();
    let mut child = Command::new(env!("CARGO_BIN_EXE_itt"))
        .args(["serve", "--checkpoint", run.to_str().unwrap(), "--port", "0", "--grace", "5"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let url = loop {
        let line = lines.next().expect("the server says where it listens").unwrap();
        if let Some(rest) = line.strip_prefix("serving on ") {
            break rest.split_whitespace().next().unwrap().to_string();
        }
    };
    let v: serde_json::Value = ureq::post(&format!("{url}/v1/completions"))
        .send_json(serde_json::json!({"prompt": "1+1=", "max_tokens": 3}))
        .unwrap()
        .into_json()
        .unwrap();
    assert_eq!(v["usage"]["prompt_tokens"], 4, "{v}");
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let status = child.wait().unwrap();
    let rest: Vec<String> = lines.map(|l| l.unwrap()).collect();
    assert!(status.success(), "exit {status:?}; stderr {rest:?}");
    assert!(rest.iter().any(|l| l == "server stopped"), "{rest:?}");
    // A port already taken: one line, non-zero exit.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port().to_string();
    fails_cleanly(&itt(&["serve", "--checkpoint", run.to_str().unwrap(), "--port", &port]), &["cannot listen"]);
}

/// Started by mpirun (as the launcher's environment says) but built without MPI: one line,
/// before anything is written (P copies would train P runs into one folder).
#[cfg(not(feature = "mpi"))]
#[test]
fn an_mpi_launch_without_the_mpi_feature_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let out = Command::new(env!("CARGO_BIN_EXE_itt"))
        .env("OMPI_COMM_WORLD_SIZE", "2")
        .args(["train", "--steps", "1", "--quiet", "--out", run.to_str().unwrap()])
        .output()
        .unwrap();
    fails_cleanly(&out, &["mpirun with 2 ranks", "--features mpi"]);
    assert!(!run.exists());
}

/// `--device` (DESIGN §15): a GPU asked of a build without CUDA, or a device name that is not
/// one, is one line and a non-zero exit on every command that builds a model, and a refused
/// `train` leaves no run folder behind.
#[test]
fn device_flag_refuses_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let out_dir = tmp.path().join("run");
    let o = out_dir.to_str().unwrap();
    let ck = trained().to_str().unwrap();
    let commands: [Vec<&str>; 6] = [
        vec!["train", "--steps", "1", "--out", o],
        vec!["eval", "--checkpoint", ck, "--text", "abc"],
        vec!["generate", "--checkpoint", ck, "--prompt", "a"],
        vec!["calibrate", "--checkpoint", ck],
        vec!["bench", "--preset", "tiny", "--steps", "1"],
        vec!["serve", "--checkpoint", ck, "--port", "0"],
    ];
    for args in &commands {
        #[cfg(not(feature = "cuda"))]
        for device in ["cuda", "cuda:1"] {
            let out = itt(&[args.as_slice(), &["--device", device]].concat());
            fails_cleanly(&out, &["built without CUDA", "--features cuda"]);
        }
        for bad in ["tpu", "cuda:x"] {
            // A clap value error: one line too (exit 2), naming the accepted values.
            let out = itt(&[args.as_slice(), &["--device", bad]].concat());
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success() && !stderr.contains("panicked"), "{args:?} {bad}: {stderr}");
            assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
            assert!(stderr.contains("use cpu, cuda or cuda:N"), "{stderr}");
        }
    }
    assert!(!out_dir.exists(), "a refused run left {o} behind");
}

#[test]
fn the_demo_compares_thinking_on_off_and_dense_of_equal_parameters() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("demo");
    let o = itt(&["demo", "--steps", "2", "--out", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8_lossy(&o.stdout);
    let rows: Vec<&str> = text.lines().skip_while(|l| !l.starts_with("compare")).take(4).collect();
    assert_eq!(rows.len(), 4, "{text}");
    assert!(rows[1].contains("tiny-itt4, thinking on"), "{text}");
    assert!(rows[2].contains("thinking off"), "{text}");
    assert!(rows[3].contains("tiny (dense"), "{text}");
    // Every row has a loss and six kinds of problems out of 40 each.
    for r in &rows[1..] {
        assert_eq!(r.matches("/40").count(), 6, "{r}");
    }
    // The compute dial: shares from none to all, FLOPs rising with the share, the backbone row
    // scoring what the comparison's thinking-off row scores (the same weights, one step).
    let dial: Vec<&str> = text.lines().skip_while(|l| !l.starts_with("dial")).skip(2).take(5).collect();
    assert_eq!(dial.len(), 5, "{text}");
    let cols = |r: &str| -> (f64, f64) {
        let f: Vec<&str> = r.split_whitespace().collect();
        let x = f.iter().position(|w| w.ends_with('x')).unwrap_or_else(|| panic!("{r}"));
        (f[x].trim_end_matches('x').parse().unwrap(), f[x + 1].parse().unwrap())
    };
    assert!(dial[0].contains("0% (off)") && dial[3].contains("70% (trained)") && dial[4].contains("100%"), "{text}");
    assert_eq!(cols(dial[0]).0, 1.0, "{text}");
    assert!(dial.windows(2).all(|w| cols(w[0]).0 < cols(w[1]).0), "{text}");
    let off_loss: f64 = rows[2].split_whitespace().rev().nth(8).unwrap().parse().unwrap();
    assert_eq!(cols(dial[0]).1, off_loss, "{text}");
    assert!(out.join("dense").join("latest").exists());
    // A second demo into the same folder replaces it; --no-dense drops the dense row.
    let o = itt(&["demo", "--steps", "1", "--no-dense", "--out", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("compare") && !text.contains("(dense,"), "{text}");
    assert!(!out.join("dense").exists());
}
