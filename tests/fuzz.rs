//! Property tests of every loader of user files: the GGUF reader, checkpoints (safetensors and
//! JSON), run configs, task files and tokenizer files. Each gets random bytes and mutations of a
//! valid file (bytes flipped, set, inserted, removed, the file cut short, 8 bytes replaced by a
//! huge little-endian length). Whatever the input, a loader returns a value or an error: it
//! never panics, never hangs, and never allocates what a header claims before checking the
//! claim against the file (a single allocation above the cap below aborts the test binary).
//!
//! A fixed number of cases per loader (500 to 2000, a few seconds in all) runs with `cargo test`,
//! from a fixed seed; `ITT_FUZZ_CASES=N` runs N per loader, `ITT_FUZZ_SEED=S` draws other
//! inputs, and `ITT_FUZZ_VERBOSE=1` prints every error the loaders return (to see how deep the
//! cases get).

use candle_core::Device;
use itt::base::config::{self, RunConfig};
use itt::checkpoint;
use itt::data::Tokenizer;
use itt::eval::tasks;
use itt::import::gguf;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed, TestCaseError, TestRunner};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------------
// Allocation cap: while a case runs, its thread may not allocate more than CAP_BYTES at once.
// Legitimate allocations here are bounded by the inputs (a few hundred KiB) and the rotary
// tables of the largest allowed context; a length read from a header (2^40, 2^62, ...) is not.

const CAP_BYTES: usize = 512 << 20;

struct Capped;

thread_local! {
    static CAPPED: Cell<bool> = const { Cell::new(false) };
}

fn over_cap(size: usize) -> bool {
    if size <= CAP_BYTES || !CAPPED.with(Cell::get) {
        return false;
    }
    // No allocation from inside the allocator: a fixed message, then refusing the request
    // makes the standard library abort with "memory allocation of N bytes failed".
    let msg = b"\nfuzz: a loader asked for one allocation above the 512 MiB cap (a size taken from the input?)\n";
    // SAFETY: writes a static buffer of its own length to stderr; nothing is allocated.
    unsafe { libc::write(2, msg.as_ptr().cast(), msg.len()) };
    true
}

// SAFETY: every call goes to the system allocator with the caller's own arguments, or returns
// null (allowed: an allocation may fail), so `GlobalAlloc`'s contract is the system's.
unsafe impl GlobalAlloc for Capped {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if over_cap(l.size()) {
            return std::ptr::null_mut();
        }
        System.alloc(l)
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        if over_cap(l.size()) {
            return std::ptr::null_mut();
        }
        System.alloc_zeroed(l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new_size: usize) -> *mut u8 {
        if over_cap(new_size) {
            return std::ptr::null_mut();
        }
        System.realloc(p, l, new_size)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l)
    }
}

#[global_allocator]
static ALLOC: Capped = Capped;

// ---------------------------------------------------------------------------------------------
// Hang guard: a case that runs longer than this is reported with its input and the binary aborts
// (a hang would otherwise stall the suite with no message).

const CASE_LIMIT: Duration = Duration::from_secs(120);

type Running = std::sync::Mutex<Vec<(std::thread::ThreadId, Instant, String)>>;

fn running() -> &'static Running {
    static RUNNING: OnceLock<Running> = OnceLock::new();
    RUNNING.get_or_init(|| {
        std::thread::spawn(|| loop {
            std::thread::sleep(Duration::from_secs(1));
            let r = running().lock().unwrap();
            if let Some((_, _, what)) = r.iter().find(|(_, t, _)| t.elapsed() > CASE_LIMIT) {
                eprintln!("fuzz: a case ran longer than {CASE_LIMIT:?} (a hang?): {what}");
                std::process::abort();
            }
        });
        Default::default()
    })
}

/// Run one case under the allocation cap and the hang guard; a panic inside becomes the case's
/// failure (proptest catches it and shrinks the input).
fn guarded<T>(what: impl FnOnce() -> String, f: impl FnOnce() -> T) -> T {
    let id = std::thread::current().id();
    running().lock().unwrap().push((id, Instant::now(), what()));
    struct Reset(std::thread::ThreadId);
    impl Drop for Reset {
        fn drop(&mut self) {
            CAPPED.with(|c| c.set(false));
            running().lock().unwrap().retain(|(i, _, _)| *i != self.0);
        }
    }
    let _reset = Reset(id);
    CAPPED.with(|c| c.set(true));
    f()
}

// ---------------------------------------------------------------------------------------------
// Inputs: mutations of a valid file, or random bytes.

#[derive(Clone, Debug)]
#[rustfmt::skip]
enum Mutation {
    Flip { at: Pos, mask: u8 },
    Set { at: Pos, byte: u8 },
    Insert { at: Pos, bytes: Vec<u8> },
    Remove { at: Pos, len: usize },
    Truncate { at: Pos },
    /// Overwrite 8 bytes with a little-endian u64 (a length, count or offset in a header).
    Huge { at: Pos, value: u64 },
    /// Replace the next run of ASCII digits with another number (a size or id in JSON).
    Number { at: Pos, value: String },
}

/// A position: in the file's first `head` bytes (where the headers are) or anywhere.
#[derive(Clone, Copy, Debug)]
struct Pos {
    in_head: bool,
    x: usize,
}

impl Pos {
    fn of(self, len: usize, head: usize) -> usize {
        let span = if self.in_head { head.min(len) } else { len };
        self.x % span.max(1)
    }
}

fn pos() -> impl Strategy<Value = Pos> {
    (prop::bool::weighted(0.7), any::<usize>()).prop_map(|(in_head, x)| Pos { in_head, x })
}

fn huge() -> impl Strategy<Value = u64> {
    prop::sample::select(vec![u64::MAX, 1 << 62, 1 << 60, 1 << 40, (1 << 32) + 7, u32::MAX as u64, 1 << 31, 1 << 20, 0])
}

/// Text to insert: digits (a number grows), JSON punctuation and values, printable ASCII.
fn insert_text() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        "[0-9]{1,24}".prop_map(String::into_bytes),
        prop::sample::select(vec![
            "-",
            "null",
            "1e999",
            "-1",
            "[",
            "]",
            "{",
            "}",
            "\"",
            ",",
            ":",
            "\\u0000",
            "\\ud800",
            "\u{ff}",
            "[[[[[[[[",
            "\"x\": 1, ",
        ])
        .prop_map(|s| s.as_bytes().to_vec()),
        "[ -~]{1,8}".prop_map(String::into_bytes),
    ]
}

/// Numbers that a size, count, index or id could be replaced by.
fn number() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "0",
            "1",
            "-1",
            "2",
            "7",
            "255",
            "65536",
            "4294967295",
            "4294967296",
            "1048577",
            "9007199254740993",
            "18446744073709551615",
            "18446744073709551616",
            "1e308",
            "0.5",
            "-0",
        ])
        .prop_map(str::to_string),
        any::<u64>().prop_map(|n| n.to_string()),
    ]
}

/// Mutations of binary files (GGUF, safetensors): any byte values.
fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        3 => (pos(), 1u8..=255).prop_map(|(at, mask)| Mutation::Flip { at, mask }),
        2 => (pos(), any::<u8>()).prop_map(|(at, byte)| Mutation::Set { at, byte }),
        2 => (pos(), prop_oneof![prop::collection::vec(any::<u8>(), 1..8), insert_text()])
            .prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
        1 => (pos(), 1usize..64).prop_map(|(at, len)| Mutation::Remove { at, len }),
        1 => pos().prop_map(|at| Mutation::Truncate { at }),
        2 => (pos(), huge()).prop_map(|(at, value)| Mutation::Huge { at, value }),
        2 => (pos(), number()).prop_map(|(at, value)| Mutation::Number { at, value }),
    ]
}

/// Mutations of text files (JSON, JSONL) that keep them ASCII, so that most get past UTF-8
/// decoding to the parsers and the checks behind them.
fn text_mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        2 => (pos(), 1u8..=0x7f).prop_map(|(at, mask)| Mutation::Flip { at, mask }),
        2 => (pos(), 0x20u8..=0x7e).prop_map(|(at, byte)| Mutation::Set { at, byte }),
        3 => (pos(), insert_text()).prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
        1 => (pos(), 1usize..64).prop_map(|(at, len)| Mutation::Remove { at, len }),
        1 => pos().prop_map(|at| Mutation::Truncate { at }),
        5 => (pos(), number()).prop_map(|(at, value)| Mutation::Number { at, value }),
    ]
}

fn apply(base: &[u8], head: usize, muts: &[Mutation]) -> Vec<u8> {
    let mut b = base.to_vec();
    for m in muts {
        let len = b.len();
        match m {
            Mutation::Flip { at, mask } if len > 0 => b[at.of(len, head)] ^= mask,
            Mutation::Set { at, byte } if len > 0 => b[at.of(len, head)] = *byte,
            Mutation::Insert { at, bytes } => {
                let i = at.of(len + 1, head + 1);
                b.splice(i..i, bytes.iter().copied());
            }
            Mutation::Remove { at, len: n } if len > 0 => {
                let i = at.of(len, head);
                b.drain(i..(i + n).min(len));
            }
            Mutation::Truncate { at } => b.truncate(at.of(len, head)),
            Mutation::Huge { at, value } if len >= 8 => {
                let i = at.of(len - 7, head);
                b[i..i + 8].copy_from_slice(&value.to_le_bytes());
            }
            Mutation::Number { at, value } if len > 0 => {
                let from = at.of(len, head);
                if let Some(i) = b[from..].iter().position(u8::is_ascii_digit).map(|i| i + from) {
                    let n = b[i..].iter().take_while(|c| c.is_ascii_digit()).count();
                    b.splice(i..i + n, value.bytes());
                }
            }
            _ => {}
        }
    }
    b
}

/// A case's file contents; shown as text (lossy, escaped) when a case fails.
#[derive(Clone)]
struct Bytes(Vec<u8>);

impl std::fmt::Debug for Bytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let text: String = String::from_utf8_lossy(&self.0).chars().take(4000).collect();
        write!(f, "{} bytes: {text:?}", self.0.len())
    }
}

impl std::ops::Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

/// A valid binary file mutated 1-4 times (mostly within its first `head` bytes), or (one case
/// in eight) random bytes.
fn input(base: Vec<u8>, head: usize) -> impl Strategy<Value = Bytes> {
    prop_oneof![
        7 => prop::collection::vec(mutation(), 1..5).prop_map(move |m| Bytes(apply(&base, head, &m))),
        1 => prop::collection::vec(any::<u8>(), 0..512).prop_map(Bytes),
    ]
}

/// A valid text file mutated 1-4 times (staying ASCII), or (one case in eight) random bytes.
fn text_input(base: Vec<u8>) -> impl Strategy<Value = Bytes> {
    let head = base.len();
    prop_oneof![
        7 => prop::collection::vec(text_mutation(), 1..5).prop_map(move |m| Bytes(apply(&base, head, &m))),
        1 => prop::collection::vec(any::<u8>(), 0..512).prop_map(Bytes),
    ]
}

fn cases(default: u32) -> u32 {
    std::env::var("ITT_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn runner(cases: u32) -> TestRunner {
    let seed = std::env::var("ITT_FUZZ_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(20250216);
    TestRunner::new(Config {
        cases,
        failure_persistence: None,
        rng_seed: RngSeed::Fixed(seed),
        max_shrink_iters: 256,
        ..Config::default()
    })
}

/// Run `check` on `cases` inputs; on failure, the shrunk input and its error.
fn fuzz<S: Strategy>(name: &str, cases: u32, strategy: S, check: impl Fn(&S::Value) -> Result<(), String>)
where
    S::Value: std::fmt::Debug,
{
    let result = runner(cases).run(&strategy, |v| {
        guarded(|| format!("{name}: {v:?}").chars().take(2000).collect(), || check(&v)).map_err(TestCaseError::fail)
    });
    if let Err(e) = result {
        panic!("{name}: {e}");
    }
}

/// An error must be one line (the binary prints it as `error: ...`).
fn one_line(e: &itt::Error) -> Result<(), String> {
    let msg = e.to_string();
    if std::env::var_os("ITT_FUZZ_VERBOSE").is_some() {
        eprintln!("fuzz error: {msg}");
    }
    if msg.trim().is_empty() || msg.contains('\n') {
        return Err(format!("error is not one line: {msg:?}"));
    }
    Ok(())
}

fn docs() -> Vec<String> {
    (0..20).map(|i| format!("the cat sat on the mat {i}; 12+34=46 and sort 3 1 2 = 1 2 3.\n")).collect()
}

// ---------------------------------------------------------------------------------------------
// GGUF

/// A small dense llama model with a byte-level BPE tokenizer, written as llama.cpp would; and the
/// length of its header (metadata and tensor infos, before the tensor data).
fn gguf_file() -> &'static (Vec<u8>, usize) {
    static FILE: OnceLock<(Vec<u8>, usize)> = OnceLock::new();
    FILE.get_or_init(|| {
        let tok = Tokenizer::train_bpe(&docs(), 280, 2).unwrap();
        let mut cfg = config::preset("tiny").unwrap().model;
        cfg.vocab_size = tok.vocab_size();
        (cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.mlp_hidden, cfg.n_layers) = (16, 2, 1, 32, 1);
        cfg.max_seq_len = 64;
        let model = itt::model::Model::new(&cfg, 3, &Device::Cpu).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        gguf::write_f32(&path, &cfg, &checkpoint::model_tensors(&model.params), &tok).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        // The last tensor name ends the header (then padding to 32 bytes, then the data).
        let head = bytes.windows(17).rposition(|w| w == b"output_norm.weigh").unwrap_or(bytes.len()) + 64;
        (bytes, head)
    })
}

fn load_gguf(bytes: &[u8]) -> Result<(), String> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fuzz.gguf");
    std::fs::write(&path, bytes).unwrap();
    match gguf::load(&path).and_then(|imp| imp.into_model(&Device::Cpu)) {
        Ok(_) => Ok(()),
        Err(e) => {
            one_line(&e)?;
            // Errors about the file's contents name the file.
            let msg = e.to_string();
            if !msg.contains("fuzz.gguf") {
                return Err(format!("error does not name the file: {msg}"));
            }
            Ok(())
        }
    }
}

#[test]
fn gguf_reader_survives_mutated_files() {
    let (base, head) = gguf_file();
    assert!(load_gguf(base).is_ok());
    fuzz("gguf", cases(500), input(base.clone(), *head), |b| load_gguf(b));
}

/// Byte offset just after the u64 length and the bytes of the first occurrence of `s`.
fn after(bytes: &[u8], s: &[u8]) -> usize {
    bytes.windows(s.len()).position(|w| w == s).unwrap() + s.len()
}

#[test]
fn gguf_headers_claiming_huge_sizes_are_refused_before_allocating() {
    let (base, _) = gguf_file();
    let set_u64 = |at: usize, v: u64| {
        let mut b = base.clone();
        b[at..at + 8].copy_from_slice(&v.to_le_bytes());
        b
    };
    let check = |name: &str, b: Vec<u8>, want: &str| {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("claims.gguf");
        std::fs::write(&path, &b).unwrap();
        let e = guarded(|| name.to_string(), || gguf::load(&path)).err().unwrap().to_string();
        assert!(e.contains("claims.gguf") && e.contains(want), "{name}: {e}");
        assert_eq!(e.lines().count(), 1, "{e}");
    };
    // Header: magic u32, version u32, tensor count u64 (at 8), metadata count u64 (at 16).
    for v in [1 << 60, 1 << 62, u64::MAX, 1 << 33] {
        check("tensor count", set_u64(8, v), "tensor");
        check("metadata count", set_u64(16, v), "metadata");
    }
    // The first key's length (at 24), a string value's length, an array's element count.
    check("key length", set_u64(24, 1 << 62), "string length");
    let arch = after(base, b"general.architecture") + 4; // then the value type u32
    check("string value length", set_u64(arch, 1 << 62), "string length");
    let tokens = after(base, b"tokenizer.ggml.tokens") + 8; // value type u32, element type u32
    check("array length", set_u64(tokens, 1 << 60), "array");
    // A tensor's dimensions: huge (the product overflows), or simply past the end of the file.
    let dims = after(base, b"output_norm.weight") + 4; // n_dims u32, then the dims u64
    check("tensor dims overflow", set_u64(dims, 1 << 62), "output_norm.weight");
    check("tensor past the end", set_u64(dims, 1 << 28), "output_norm.weight");
}

// ---------------------------------------------------------------------------------------------
// Checkpoints

/// A real checkpoint of a tiny ITT run (weights, optimiser, state, calibration, manifest).
fn checkpoint_files() -> &'static Vec<(String, Vec<u8>)> {
    static FILES: OnceLock<Vec<(String, Vec<u8>)>> = OnceLock::new();
    FILES.get_or_init(|| {
        let docs =
            itt::data::synthetic::synthetic_corpus(&itt::data::synthetic::SyntheticOptions { seed: 1, n_docs: 20 });
        let tok = Tokenizer::char_from_text(&docs.concat());
        let dir = tempfile::tempdir().unwrap();
        let ds = itt::data::prepare_dataset(&docs, &tok, 0.2, &dir.path().join("data"), "fuzz").unwrap();
        let mut cfg = config::preset("tiny-itt2").unwrap();
        let m = &mut cfg.model;
        (m.vocab_size, m.d_model, m.n_heads, m.n_kv_heads, m.mlp_hidden, m.n_layers) =
            (tok.vocab_size(), 16, 2, 2, 32, 2);
        m.max_seq_len = 32;
        (cfg.train.batch_size, cfg.train.seq_len, cfg.train.max_steps) = (2, 16, 1);
        let run = dir.path().join("run");
        let mut t = itt::train::Trainer::new(cfg, &tok, &run, Default::default()).unwrap();
        itt::train::run(&mut t, &ds, &itt::train::RunOptions { quiet: true, stop_at: None }).unwrap();
        let ck = checkpoint::resolve(&run).unwrap();
        let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(&ck)
            .unwrap()
            .map(|e| {
                let p = e.unwrap().path();
                (p.file_name().unwrap().to_string_lossy().to_string(), std::fs::read(&p).unwrap())
            })
            .collect();
        files.sort();
        files
    })
}

/// Write the checkpoint with file `which` replaced by `bytes` (and the manifest kept or not),
/// then load it the ways the commands do.
fn load_checkpoint(which: usize, bytes: &[u8], keep_manifest: bool, check: checkpoint::Check) -> Result<(), String> {
    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("step-00000001");
    std::fs::create_dir(&ck).unwrap();
    let files = checkpoint_files();
    for (i, (name, b)) in files.iter().enumerate() {
        if name == checkpoint::MANIFEST && !keep_manifest && i != which {
            continue;
        }
        std::fs::write(ck.join(name), if i == which { bytes } else { b }).unwrap();
    }
    // As `itt train --resume` (hashes) or any other command (sizes) reads it.
    let loaded = checkpoint::load_checked(&ck, check).and_then(|_| {
        let (model, tok, info) = checkpoint::load_model(&ck)?;
        checkpoint::load_optimizer(&info.dir, &model.params)?;
        Ok(tok)
    });
    match loaded {
        Ok(_) => Ok(()),
        Err(e) => {
            one_line(&e)?;
            if !e.to_string().contains("step-00000001") {
                return Err(format!("error does not name the checkpoint: {e}"));
            }
            Ok(())
        }
    }
}

#[test]
fn checkpoint_loader_survives_mutated_files() {
    let files = checkpoint_files();
    for (i, _) in files.iter().enumerate() {
        assert_eq!(load_checkpoint(i, &files[i].1, true, checkpoint::Check::Hashes), Ok(()));
    }
    let n = files.len();
    let strategy = (0..n, any::<bool>(), any::<bool>()).prop_flat_map(|(which, keep, hashes)| {
        let (name, base) = &checkpoint_files()[which];
        // safetensors: the 8-byte header length, then the JSON header.
        let bytes = if name.ends_with(".safetensors") {
            input(base.clone(), 8 + u64::from_le_bytes(base[..8].try_into().unwrap()) as usize).boxed()
        } else {
            text_input(base.clone()).boxed()
        };
        (Just(which), Just(keep), Just(hashes), bytes)
    });
    fuzz("checkpoint", cases(500), strategy, |(which, keep, hashes, bytes)| {
        let check = if *hashes { checkpoint::Check::Hashes } else { checkpoint::Check::Sizes };
        load_checkpoint(*which, bytes, *keep, check)
    });
}

// ---------------------------------------------------------------------------------------------
// Run configs, task files, tokenizer files

fn load_config(bytes: &[u8]) -> Result<(), String> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fuzz.json");
    std::fs::write(&path, bytes).unwrap();
    match RunConfig::load(&path) {
        Ok(cfg) => {
            // A config that validates can be used: its derived figures do not panic.
            let _ = (cfg.model.n_params(), cfg.train.tokens_per_step(), cfg.train.lr_at(cfg.train.max_steps));
            let _ = itt::flops::flops_per_token(&cfg.model, cfg.train.seq_len, None, None);
            Ok(())
        }
        Err(e) => {
            one_line(&e)?;
            if !e.to_string().contains("fuzz.json") {
                return Err(format!("error does not name the file: {e}"));
            }
            Ok(())
        }
    }
}

#[test]
fn config_parser_survives_mutated_files() {
    let base = config::preset("tiny-itt4").unwrap().to_json().into_bytes();
    assert_eq!(load_config(&base), Ok(()));
    fuzz("config", cases(2000), text_input(base), |b| load_config(b));
}

const TASKS: &str = "{\"context\": \"ab\", \"choices\": [\" x\", \" y\"], \"gold\": 1}\n\
{\"request\": {\"context\": \"q\", \"continuation\": \" a\"}, \"idx\": 0, \"doc_id\": 7, \"doc\": {\"gold\": 1}}\n\
{\"request\": {\"context\": \"q\", \"continuation\": \" b\"}, \"idx\": 1, \"doc_id\": 7, \"doc\": {\"gold\": 1}}\n\
{\"request\": {\"context\": \"Sam so Sam\", \"continuation\": \" won.\"}, \"idx\": 0, \"doc_id\": 8, \"doc\": {}, \"label\": 1}\n\
{\"request\": {\"context\": \"Sam so Max\", \"continuation\": \" won.\"}, \"idx\": 1, \"doc_id\": 8, \"doc\": {}, \"label\": 1}\n\
{\"request\": {\"context\": \"a b\", \"continuation\": \" c\"}, \"idx\": 0, \"doc_id\": 9, \"doc\": {}, \"label\": [\"c\"]}\n";

fn load_tasks(bytes: &[u8], gz: bool) -> Result<(), String> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(if gz { "fuzz.jsonl.gz" } else { "fuzz.jsonl" });
    std::fs::write(&path, bytes).unwrap();
    for on_error in [tasks::OnError::Stop, tasks::OnError::Skip] {
        match tasks::load_items(&path, on_error) {
            Ok((items, _)) => {
                for it in &items {
                    if it.contexts.len() != it.continuations.len()
                        || it.gold.is_some_and(|g| g >= it.continuations.len())
                    {
                        return Err(format!("inconsistent item {it:?}"));
                    }
                }
            }
            Err(e) => {
                one_line(&e)?;
                if !e.to_string().contains("fuzz.jsonl") {
                    return Err(format!("error does not name the file: {e}"));
                }
            }
        }
    }
    Ok(())
}

fn gzip(b: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut w = flate2::write::GzEncoder::new(vec![], flate2::Compression::fast());
    w.write_all(b).unwrap();
    w.finish().unwrap()
}

#[test]
fn task_file_parser_survives_mutated_files() {
    let base = TASKS.as_bytes().to_vec();
    assert_eq!(load_tasks(&base, false), Ok(()));
    assert_eq!(load_tasks(&gzip(&base), true), Ok(()));
    let strategy = prop_oneof![
        4 => text_input(base.clone()).prop_map(|b| (b, false, false)),
        1 => text_input(base.clone()).prop_map(|b| (b, true, true)),
        1 => input(gzip(&base), 16).prop_map(|b| (b, true, false)),
    ];
    fuzz("tasks", cases(2000), strategy, |(b, gz, compress)| {
        load_tasks(&if *compress { gzip(b) } else { b.to_vec() }, *gz)
    });
}

#[test]
fn task_lines_with_huge_choice_indices_are_refused() {
    for idx in ["4294967296000", "18446744073709551615", "100000000"] {
        let line = format!(
            "{{\"request\": {{\"context\": \"q\", \"continuation\": \" a\"}}, \"idx\": {idx}, \"doc_id\": 7, \"doc\": {{\"gold\": 1}}}}\n"
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("huge.jsonl");
        std::fs::write(&path, line).unwrap();
        let e = guarded(|| idx.to_string(), || tasks::load_items(&path, tasks::OnError::Stop)).unwrap_err().to_string();
        assert!(e.contains("huge.jsonl") && e.contains("line 1") && e.contains("idx"), "{e}");
    }
}

/// Our tokenizer files (char, byte, BPE) and a plain Hugging Face tokenizer.json.
fn tokenizer_files() -> &'static Vec<Vec<u8>> {
    static FILES: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    FILES.get_or_init(|| {
        let bpe = Tokenizer::train_bpe(&docs(), 270, 2).unwrap();
        let hf = bpe.hf().unwrap().to_string(false).unwrap();
        vec![
            Tokenizer::char_from_text(&docs().concat()).to_json().unwrap().into_bytes(),
            Tokenizer::byte().to_json().unwrap().into_bytes(),
            bpe.to_json().unwrap().into_bytes(),
            hf.into_bytes(),
        ]
    })
}

fn load_tokenizer(bytes: &[u8]) -> Result<(), String> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fuzz-tokenizer.json");
    std::fs::write(&path, bytes).unwrap();
    match Tokenizer::load(&path) {
        Ok(tok) => {
            // A tokenizer that loads can be used.
            if let Ok(ids) = tok.encode("the cat 12+34=46 🦀") {
                let _ = tok.decode(&ids);
            }
            let _ = (tok.vocab_size(), tok.eot_id(), tok.fingerprint());
            Ok(())
        }
        Err(e) => {
            one_line(&e)?;
            if !e.to_string().contains("fuzz-tokenizer.json") {
                return Err(format!("error does not name the file: {e}"));
            }
            Ok(())
        }
    }
}

#[test]
fn tokenizer_loader_survives_mutated_files() {
    let files = tokenizer_files();
    for f in files {
        assert_eq!(load_tokenizer(f), Ok(()));
    }
    let strategy = (0..files.len()).prop_flat_map(|i| text_input(tokenizer_files()[i].clone()));
    fuzz("tokenizer", cases(1000), strategy, |b| load_tokenizer(b));
}

/// Inputs the fuzzing above found to panic, allocate without bound or print several lines,
/// kept as fixed cases.
#[test]
fn inputs_that_fuzzing_found_stay_fixed() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config::preset("tiny-itt4").unwrap().to_json();
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    // A newline inside a JSON key, echoed back by the parser: the message stays one line.
    let p = write("newline.json", &cfg.replace("\"grad_clip\"", "\"\\ngrad_clip\""));
    let e = RunConfig::load(&p).unwrap_err().to_string();
    assert!(e.contains("newline.json") && e.contains("`\\ngrad_clip`") && !e.contains('\n'), "{e}");
    // Sizes that made the parameter count allocate per layer, or the rotary tables per position.
    for (from, to, field) in [
        ("\"n_layers\": 4", "\"n_layers\": 1099511627776", "n_layers"),
        ("\"max_seq_len\": 256", "\"max_seq_len\": 4294967296", "max_seq_len"),
        ("\"steps\": 4", "\"steps\": 1000000", "thinking.steps"),
        ("\"batch_size\": 16", "\"batch_size\": 4294967296", "train.batch_size"),
    ] {
        let p = write("big.json", &cfg.replace(from, to));
        let e = guarded(|| field.to_string(), || RunConfig::load(&p)).unwrap_err().to_string();
        assert!(e.contains("big.json") && e.contains(field) && e.contains("above the supported"), "{e}");
    }
    // A BPE token id far past the vocabulary: serialising the vocabulary would fill the gap.
    let hf = String::from_utf8(tokenizer_files()[3].clone()).unwrap();
    let p = write("gap.json", &hf.replacen("\"the\":", "\"the\":2147483647,\"was-the\":", 1));
    let e = guarded(|| "gap".into(), || Tokenizer::load(&p)).unwrap_err().to_string();
    assert!(e.contains("gap.json") && e.contains("2147483647") && e.contains("outside the vocabulary"), "{e}");
}
