//! Checkpoints: a folder per saved step, written atomically, plus a `latest` pointer.
//!
//! ```text
//! RUN/
//!   config.json  tokenizer.json  metrics.jsonl
//!   latest                          text: "checkpoints/step-00000600"
//!   checkpoints/step-00000600/
//!     model.safetensors             weights; metadata {"format": "itt", "version": "1"}
//!     optimizer.safetensors         AdamW moments "m.NAME", "v.NAME" (training checkpoints)
//!     state.json                    step, tokens seen, data RNG state, optimiser step
//!     config.json  tokenizer.json   everything needed to use the weights alone
//!     router_calibration.json       running router quantiles for causal routing (ITT)
//!     manifest.json                 every other file's name, size and sha256; written last
//! ```
//! A checkpoint is first written to a hidden temporary folder (`.step-00000600.tmpPID`), each
//! file fsynced, the manifest last, then the folder is fsynced and renamed into place; `latest`
//! is replaced by rename. So an interrupted save never leaves a half-written checkpoint where a
//! reader would look and never damages the previous one, and a failed save removes its
//! temporary folder. Older checkpoints are pruned only once the new one is complete.
//!
//! Loading checks each file's size against the manifest (cheap; catches truncation); resuming
//! and `itt verify` also check every sha256. Checkpoints written before manifests existed load
//! unchecked.

use crate::base::config::RunConfig;
use crate::base::error::IoContext;
use crate::base::util::{sync_dir, write_atomic};
use crate::model::{Model, RouterCalibration};
use crate::optim::AdamW;
use crate::{Error, Result};
use candle_core::{Device, Tensor, Var};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

pub const FORMAT: &str = "itt";
pub const VERSION: u32 = 1;
/// The file listing every other file of a checkpoint with its size and sha256.
pub const MANIFEST: &str = "manifest.json";
const MANIFEST_FORMAT: &str = "itt-manifest";

/// Where a training run stands; with the weights and optimiser, enough to resume exactly.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrainState {
    pub format: String,
    pub version: u32,
    /// Optimiser steps completed.
    pub step: usize,
    pub tokens_seen: u64,
    /// State of the generator that draws training batches.
    pub data_rng: [u64; 4],
    pub last_train_loss: Option<f64>,
    pub last_val_loss: Option<f64>,
    /// Wall-clock seconds spent training so far.
    pub elapsed_s: f64,
    /// Steps whose batch was dropped for a non-finite loss or gradient (`on_nonfinite: skip`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub skipped_batches: u64,
}

fn is_zero(x: &u64) -> bool {
    *x == 0
}

/// A loaded checkpoint: enough to rebuild the model and its tokenizer.
pub struct Checkpoint {
    pub dir: PathBuf,
    pub config: RunConfig,
    pub tokenizer_json: String,
    pub state: Option<TrainState>,
    pub calibration: Option<RouterCalibration>,
    tensors: HashMap<String, Tensor>,
}

impl Checkpoint {
    /// Build the model from the stored weights (consumes them).
    pub fn into_model(self, device: &Device) -> Result<(Model, CheckpointInfo)> {
        let origin = self.dir.join("model.safetensors");
        let model = Model::from_tensors(&self.config.model, self.tensors, &origin.to_string_lossy(), device)?;
        let info = CheckpointInfo {
            dir: self.dir,
            config: self.config,
            tokenizer_json: self.tokenizer_json,
            state: self.state,
            calibration: self.calibration,
        };
        Ok((model, info))
    }
}

/// A checkpoint's metadata once its weights are in a model.
#[derive(Clone, Debug)]
pub struct CheckpointInfo {
    pub dir: PathBuf,
    pub config: RunConfig,
    pub tokenizer_json: String,
    pub state: Option<TrainState>,
    pub calibration: Option<RouterCalibration>,
}

fn write_bytes(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic(path, |w| w.write_all(bytes))
}

/// The contents of `manifest.json`: what each file of the checkpoint was when it was saved.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    /// Sorted by name; `manifest.json` itself is not listed.
    pub files: Vec<ManifestEntry>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ManifestEntry {
    pub name: String,
    pub size: u64,
    /// Lower-case hex.
    pub sha256: String,
}

/// Size and sha256 (hex) of a file, read in 1 MiB pieces.
fn hash_file(path: &Path) -> Result<(u64, String)> {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let mut f = std::fs::File::open(path).at(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf).at(path)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        size += n as u64;
    }
    Ok((size, h.finalize().iter().map(|b| format!("{b:02x}")).collect()))
}

/// Hash every file of `dir` (except the manifest) and write `manifest.json`, atomically.
fn write_manifest(dir: &Path) -> Result<()> {
    let mut names = vec![];
    for e in std::fs::read_dir(dir).at(dir)? {
        let e = e.at(dir)?;
        let name = e.file_name().to_string_lossy().to_string();
        if e.file_type().at(e.path())?.is_file() && name != MANIFEST {
            names.push(name);
        }
    }
    names.sort();
    let mut files = Vec::with_capacity(names.len());
    for name in names {
        let (size, sha256) = hash_file(&dir.join(&name))?;
        files.push(ManifestEntry { name, size, sha256 });
    }
    let m = Manifest { format: MANIFEST_FORMAT.into(), version: VERSION, files };
    let json = serde_json::to_string_pretty(&m).map_err(|e| Error::checkpoint(dir, e.to_string()))?;
    write_bytes(&dir.join(MANIFEST), json.as_bytes())
}

/// Write (or replace) one file of an existing checkpoint, atomically, and bring its manifest up
/// to date (for files added after saving, e.g. router thresholds from `itt calibrate`).
pub fn write_file(dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    let had_manifest = dir.join(MANIFEST).exists();
    write_bytes(&dir.join(name), bytes)?;
    if had_manifest {
        write_manifest(dir)?;
    }
    Ok(())
}

/// Read and check `manifest.json`; `None` when the checkpoint predates manifests.
pub fn read_manifest(dir: &Path) -> Result<Option<Manifest>> {
    let path = dir.join(MANIFEST);
    if !path.exists() {
        return Ok(None);
    }
    let damaged = |msg: String| {
        Error::checkpoint(
            &path,
            format!(
                "{msg}; the checkpoint is damaged: use an earlier one, or delete manifest.json to load it unchecked"
            ),
        )
    };
    let text = std::fs::read(&path).map_err(|e| damaged(format!("cannot read ({e})")))?;
    let m: Manifest = serde_json::from_slice(&text).map_err(|e| damaged(format!("malformed ({e})")))?;
    if m.format != MANIFEST_FORMAT || m.version != VERSION {
        return Err(damaged(format!(
            "is `{}` version {}, not {MANIFEST_FORMAT} version {VERSION}",
            m.format, m.version
        )));
    }
    let mut seen = std::collections::HashSet::new();
    for f in &m.files {
        // Plain names only: a manifest must not make a reader look outside its folder.
        let plain = !f.name.is_empty()
            && f.name != "."
            && f.name != ".."
            && f.name != MANIFEST
            && !f.name.contains(['/', '\\', '\0']);
        if !plain || !seen.insert(f.name.as_str()) {
            return Err(damaged(format!("lists {:?}, which is not a file name of this folder (or twice)", f.name)));
        }
        if f.sha256.len() != 64 || !f.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(damaged(format!("gives {:?} as the sha256 of {}, not 64 hex digits", f.sha256, f.name)));
        }
    }
    Ok(Some(m))
}

/// How thoroughly to check a checkpoint against its manifest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Check {
    /// Every listed file exists with its recorded size (a stat per file).
    Sizes,
    /// Sizes, and every file's sha256 (reads every byte).
    Hashes,
}

/// One listed file's outcome: `None` when it matches the manifest.
#[derive(Clone, Debug)]
pub struct FileCheck {
    pub name: String,
    pub problem: Option<String>,
}

/// A checkpoint folder checked against its manifest.
#[derive(Clone, Debug)]
pub struct Verification {
    pub dir: PathBuf,
    /// False for checkpoints saved before manifests existed: nothing could be checked.
    pub has_manifest: bool,
    pub files: Vec<FileCheck>,
    /// Files in the folder that the manifest does not list (not checked).
    pub unlisted: Vec<String>,
}

impl Verification {
    pub fn is_intact(&self) -> bool {
        self.files.iter().all(|f| f.problem.is_none())
    }

    /// The first damaged file, as an error that names it and says what to do.
    pub fn error(&self) -> Option<Error> {
        let bad = self.files.iter().find(|f| f.problem.is_some())?;
        Some(Error::checkpoint(
            self.dir.join(&bad.name),
            format!(
                "{}; the checkpoint is damaged: use an earlier one (`itt train --resume` picks the newest intact one; \
                 `itt verify {}` lists every file)",
                bad.problem.as_deref().unwrap_or_default(),
                self.dir.display()
            ),
        ))
    }

    /// The one-line notice for a checkpoint without a manifest, if this is one.
    pub fn notice(&self) -> Option<String> {
        (!self.has_manifest).then(|| {
            format!(
                "notice: checkpoint {} has no {MANIFEST} (saved by an earlier version of itt); its files cannot be checked",
                self.dir.display()
            )
        })
    }
}

impl std::fmt::Display for Verification {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(n) = self.notice() {
            return write!(f, "{n}");
        }
        let verdict = if self.is_intact() { "intact" } else { "DAMAGED" };
        write!(f, "{}: {verdict}", self.dir.display())?;
        for c in &self.files {
            match &c.problem {
                None => write!(f, "\n  ok     {}", c.name)?,
                Some(p) => write!(f, "\n  BAD    {}: {p}", c.name)?,
            }
        }
        for u in &self.unlisted {
            write!(f, "\n  extra  {u} (not in {MANIFEST}; not checked)")?;
        }
        Ok(())
    }
}

/// Check a checkpoint folder's files against its manifest.
pub fn verify(dir: &Path, check: Check) -> Result<Verification> {
    if !dir.is_dir() {
        return Err(Error::checkpoint(dir, "does not exist or is not a folder"));
    }
    let Some(m) = read_manifest(dir)? else {
        return Ok(Verification { dir: dir.to_path_buf(), has_manifest: false, files: vec![], unlisted: vec![] });
    };
    let mut files = Vec::with_capacity(m.files.len());
    for e in &m.files {
        let path = dir.join(&e.name);
        let problem = match std::fs::metadata(&path) {
            Err(_) => Some(format!("is missing ({MANIFEST} lists it)")),
            Ok(md) if !md.is_file() => Some("is not a file".to_string()),
            Ok(md) if md.len() != e.size => Some(format!(
                "is {} bytes, {MANIFEST} records {} ({})",
                md.len(),
                e.size,
                if md.len() < e.size { "truncated" } else { "grown since it was saved" }
            )),
            Ok(_) if check == Check::Hashes => match hash_file(&path) {
                Ok((_, h)) if h != e.sha256 => {
                    Some(format!("its sha256 differs from {MANIFEST} (the bytes changed after saving)"))
                }
                Ok(_) => None,
                Err(err) => Some(format!("cannot be read ({err})")),
            },
            Ok(_) => None,
        };
        files.push(FileCheck { name: e.name.clone(), problem });
    }
    let mut unlisted = vec![];
    for e in std::fs::read_dir(dir).at(dir)?.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if name != MANIFEST && !m.files.iter().any(|f| f.name == name) {
            unlisted.push(name);
        }
    }
    unlisted.sort();
    Ok(Verification { dir: dir.to_path_buf(), has_manifest: true, files, unlisted })
}

/// The safetensors header tag, e.g. `{"format": "itt-model-v1"}`. One key only: the header's
/// map is written in hash order, and a single entry keeps checkpoints byte-for-byte repeatable.
fn st_metadata(kind: &str) -> HashMap<String, String> {
    HashMap::from([("format".to_string(), format!("{FORMAT}-{kind}-v{VERSION}"))])
}

fn save_tensors(path: &Path, tensors: Vec<(String, Tensor)>, kind: &str) -> Result<()> {
    safetensors::serialize_to_file(tensors, Some(st_metadata(kind)), path)
        .map_err(|e| Error::checkpoint(path, format!("cannot write: {e}")))?;
    make_world_readable(path)?;
    // `serialize_to_file` does not fsync; the manifest must only ever describe durable bytes.
    std::fs::File::open(path).and_then(|f| f.sync_all()).at(path)
}

/// `safetensors` writes through a private temporary file (mode 0600); checkpoints are shared
/// artefacts like the JSON files beside them, so give them the usual 0644.
pub fn make_world_readable(path: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)).at(path)?;
    }
    Ok(())
}

/// Model weights as named tensors (for saving or export).
pub fn model_tensors(params: &[(String, Var)]) -> Vec<(String, Tensor)> {
    params.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect()
}

/// Everything a checkpoint holds besides the weights.
pub struct SaveParts<'a> {
    pub config: &'a RunConfig,
    pub tokenizer_json: &'a str,
    pub optimizer: Option<&'a AdamW>,
    pub state: Option<&'a TrainState>,
    pub calibration: Option<&'a RouterCalibration>,
}

/// The points of a save at which `ITT_FAULT_CHECKPOINT=POINT@STEP` aborts the process, in the
/// order they are reached: after each file (written to a temporary name, fsynced, renamed),
/// after the folder's fsync, after the folder's rename into place, after `latest` is
/// rewritten, after pruning. tests/cluster.rs aborts at each in turn and resumes.
pub const FAULT_POINTS: [&str; 11] = [
    "model",
    "optimizer",
    "state",
    "calibration",
    "config",
    "tokenizer",
    "manifest",
    "synced",
    "placed",
    "latest",
    "pruned",
];

/// Crash-consistency testing: abort (no unwinding, no cleanup, as a kill or power loss would
/// leave things) when `ITT_FAULT_CHECKPOINT` names this point of saving the checkpoint whose
/// folder `dir` is (or whose temporary folder is) for that step. Unset: one env lookup.
pub fn fault_point(point: &str, dir: &Path) {
    let Ok(spec) = std::env::var("ITT_FAULT_CHECKPOINT") else { return };
    let Some((at, step)) = spec.split_once('@') else { return };
    let step_name = step.trim().parse::<usize>().map(|n| format!("step-{n:08}"));
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    if at == point && step_name.is_ok_and(|s| name.contains(&s)) {
        eprintln!("ITT_FAULT_CHECKPOINT: aborting at {point} of {}", dir.display());
        std::process::abort();
    }
}

/// Write a checkpoint folder `dir` atomically (temporary sibling folder, then rename). A failed
/// save removes its temporary folder and leaves any existing `dir` as it was.
pub fn save(dir: &Path, model: &Model, parts: &SaveParts) -> Result<()> {
    let parent = dir.parent().ok_or_else(|| Error::checkpoint(dir, "has no parent folder"))?;
    std::fs::create_dir_all(parent).at(parent)?;
    let name = dir.file_name().ok_or_else(|| Error::checkpoint(dir, "has no name"))?.to_string_lossy().to_string();
    let tmp = parent.join(format!(".{name}.tmp{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).at(&tmp)?;
    }
    let placed = write_folder(&tmp, model, parts).and_then(|()| {
        fault_point("synced", &tmp);
        if !dir.exists() {
            return std::fs::rename(&tmp, dir).at(dir);
        }
        // Re-saving a step (e.g. after a resume): move the old one aside, put the new one in
        // place (or the old one back), then delete the old one.
        let old = parent.join(format!(".{name}.old{}", std::process::id()));
        std::fs::rename(dir, &old).at(dir)?;
        if let Err(e) = std::fs::rename(&tmp, dir) {
            let _ = std::fs::rename(&old, dir);
            return Err(e).at(dir);
        }
        std::fs::remove_dir_all(&old).at(&old)
    });
    if let Err(e) = placed {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(Error::checkpoint(
            dir,
            format!("was not saved ({e}); is the disk full? Earlier checkpoints are untouched"),
        ));
    }
    sync_dir(parent)?;
    fault_point("placed", dir);
    Ok(())
}

/// Every file of a checkpoint into the fresh folder `tmp`, each fsynced, the manifest last.
fn write_folder(tmp: &Path, model: &Model, parts: &SaveParts) -> Result<()> {
    std::fs::create_dir_all(tmp).at(tmp)?;
    // Written from the host whatever the device (free on the CPU), so a checkpoint does not
    // depend on where it was trained (DESIGN §15).
    let on_host = model_tensors(&model.params)
        .into_iter()
        .map(|(n, t)| Ok((n, t.to_device(&Device::Cpu)?)))
        .collect::<Result<Vec<_>>>()?;
    save_tensors(&tmp.join("model.safetensors"), on_host, "model")?;
    fault_point("model", tmp);
    if let Some(opt) = parts.optimizer {
        let mut t = Vec::with_capacity(2 * model.params.len() + 1);
        for (i, (n, _)) in model.params.iter().enumerate() {
            t.push((format!("m.{n}"), Tensor::from_slice(&opt.m[i], opt.m[i].len(), &Device::Cpu)?));
            t.push((format!("v.{n}"), Tensor::from_slice(&opt.v[i], opt.v[i].len(), &Device::Cpu)?));
        }
        t.push(("t".to_string(), Tensor::from_slice(&[opt.t as u32], 1, &Device::Cpu)?));
        save_tensors(&tmp.join("optimizer.safetensors"), t, "optimizer")?;
        fault_point("optimizer", tmp);
    }
    let json = |path: &Path, v: std::result::Result<String, serde_json::Error>| -> Result<()> {
        write_bytes(path, v.map_err(|e| Error::checkpoint(path, e.to_string()))?.as_bytes())
    };
    if let Some(state) = parts.state {
        json(&tmp.join("state.json"), serde_json::to_string_pretty(state))?;
        fault_point("state", tmp);
    }
    if let Some(cal) = parts.calibration {
        json(&tmp.join("router_calibration.json"), serde_json::to_string(cal))?;
        fault_point("calibration", tmp);
    }
    write_bytes(&tmp.join("config.json"), parts.config.to_json().as_bytes())?;
    fault_point("config", tmp);
    write_bytes(&tmp.join("tokenizer.json"), parts.tokenizer_json.as_bytes())?;
    fault_point("tokenizer", tmp);
    write_manifest(tmp)?;
    fault_point("manifest", tmp);
    sync_dir(tmp)
}

/// Point `RUN/latest` at a checkpoint folder (relative path), atomically.
pub fn set_latest(run_dir: &Path, ckpt_dir: &Path) -> Result<()> {
    let rel = ckpt_dir.strip_prefix(run_dir).unwrap_or(ckpt_dir);
    write_bytes(&run_dir.join("latest"), rel.to_string_lossy().as_bytes())
}

/// A run's checkpoints in the order a resume tries them: the one `latest` names, then every
/// `checkpoints/step-*` folder, newest first.
pub fn run_checkpoints(run_dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    if let Ok(rel) = std::fs::read_to_string(run_dir.join("latest")) {
        out.push(run_dir.join(rel.trim()));
    }
    for p in step_folders(run_dir).into_iter().rev() {
        if !out.iter().any(|o| same_folder(o, &p)) {
            out.push(p);
        }
    }
    out
}

fn same_folder(a: &Path, b: &Path) -> bool {
    a == b || matches!((a.canonicalize(), b.canonicalize()), (Ok(x), Ok(y)) if x == y)
}

/// `RUN/checkpoints/step-*` folders, oldest first.
fn step_folders(run_dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(run_dir.join("checkpoints")) else {
        return vec![];
    };
    let mut steps: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir() && p.file_name().map(|n| n.to_string_lossy().starts_with("step-")).unwrap_or(false))
        .collect();
    steps.sort();
    steps
}

/// A checkpoint folder, or a run folder whose `latest` names one.
pub fn resolve(path: &Path) -> Result<PathBuf> {
    if !path.exists() {
        return Err(Error::checkpoint(path, "does not exist"));
    }
    if path.is_file() {
        return Err(Error::checkpoint(path, "is a file; give a checkpoint folder or a run folder"));
    }
    if path.join("model.safetensors").exists() {
        return Ok(path.to_path_buf());
    }
    let latest = path.join("latest");
    if latest.exists() {
        let rel = std::fs::read_to_string(&latest).at(&latest)?;
        let dir = path.join(rel.trim());
        if dir.join("model.safetensors").exists() {
            return Ok(dir);
        }
        return Err(Error::checkpoint(
            &latest,
            format!("points to {} which holds no model.safetensors", dir.display()),
        ));
    }
    Err(Error::checkpoint(path, "is neither a checkpoint folder (model.safetensors) nor a run folder (latest)"))
}

/// Read an `itt` safetensors file, checking its header names this program.
fn load_tensors(path: &Path, kind: &str) -> Result<HashMap<String, Tensor>> {
    let bytes = std::fs::read(path).map_err(|e| Error::checkpoint(path, format!("cannot read: {e}")))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| Error::checkpoint(path, format!("not a readable safetensors file ({e}); is it truncated?")))?;
    let info = meta.metadata().clone().unwrap_or_default();
    let mut tag = info.get("format").cloned().unwrap_or_default();
    // Checkpoints written before the single-tag header (commit 93ee281) carry three keys:
    // {"format": "itt", "content": KIND, "version": N}. Read them as the same format.
    if tag == FORMAT && info.get("content").map(String::as_str) == Some(kind) {
        tag = format!("{FORMAT}-{kind}-v{}", info.get("version").map(String::as_str).unwrap_or(""));
    }
    let Some(version) = tag.strip_prefix(&format!("{FORMAT}-{kind}-v")) else {
        return Err(Error::checkpoint(
            path,
            format!("is a safetensors file from elsewhere (no '{FORMAT}-{kind}' header); import it with the loaders of `itt convert` instead"),
        ));
    };
    if version.parse::<u32>().ok() != Some(VERSION) {
        return Err(Error::checkpoint(path, format!("has format version {version}, this build reads {VERSION}")));
    }
    candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
        .map_err(|e| Error::checkpoint(path, format!("corrupt tensor data ({e}); is it truncated?")))
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::checkpoint(path, format!("cannot read: {e}")))?;
    serde_json::from_str(&text).map_err(|e| Error::checkpoint(path, format!("malformed: {e}")))
}

/// Set by `--no-verify`: [`load`] then checks only the files' sizes, not their sha256.
static SIZES_ONLY: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// How thoroughly [`load`] checks: every file's sha256 unless `verify` is off (`--no-verify`).
/// A process-wide switch because every command that reads a model reaches `load` through
/// `import::open`, and each would otherwise need its own flag threaded through.
pub fn set_verify(verify: bool) {
    SIZES_ONLY.store(!verify, std::sync::atomic::Ordering::Relaxed);
}

/// Load the weights, config, tokenizer, state and calibration of a checkpoint or run folder,
/// after checking its files against the manifest: their sha256 (hashing costs about 0.05 s
/// for the 37 MB `small` checkpoint), or only their sizes after `set_verify(false)`.
pub fn load(path: &Path) -> Result<Checkpoint> {
    let check = if SIZES_ONLY.load(std::sync::atomic::Ordering::Relaxed) { Check::Sizes } else { Check::Hashes };
    Ok(load_checked(path, check)?.0)
}

/// `load`, checking the files against the manifest as thoroughly as asked first.
pub fn load_checked(path: &Path, check: Check) -> Result<(Checkpoint, Verification)> {
    let dir = resolve(path)?;
    let verification = verify(&dir, check)?;
    if let Some(e) = verification.error() {
        return Err(e);
    }
    let config: RunConfig = read_json(&dir.join("config.json"))?;
    config.validate().map_err(|e| Error::checkpoint(dir.join("config.json"), e.to_string()))?;
    let tok_path = dir.join("tokenizer.json");
    let tokenizer_json =
        std::fs::read_to_string(&tok_path).map_err(|e| Error::checkpoint(&tok_path, format!("cannot read: {e}")))?;
    let tensors = load_tensors(&dir.join("model.safetensors"), "model")?;
    let state_path = dir.join("state.json");
    let state = if state_path.exists() { Some(read_json::<TrainState>(&state_path)?) } else { None };
    let cal_path = dir.join("router_calibration.json");
    let calibration = if cal_path.exists() { Some(read_json(&cal_path)?) } else { None };
    Ok((Checkpoint { dir, config, tokenizer_json, state, calibration, tensors }, verification))
}

/// Load the AdamW state saved with a checkpoint, matching the model's parameters.
pub fn load_optimizer(dir: &Path, params: &[(String, Var)]) -> Result<AdamW> {
    let path = dir.join("optimizer.safetensors");
    if !path.exists() {
        return Err(Error::checkpoint(
            dir,
            "has no optimizer state; it cannot be resumed (it is a weights-only checkpoint)",
        ));
    }
    let mut t = load_tensors(&path, "optimizer")?;
    let mut take = |name: &str, len: usize| -> Result<Vec<f32>> {
        let x = t.remove(name).ok_or_else(|| Error::checkpoint(&path, format!("missing '{name}'")))?;
        let v = x.flatten_all()?.to_vec1::<f32>()?;
        if v.len() != len {
            return Err(Error::checkpoint(&path, format!("'{name}' has {} values, the model needs {len}", v.len())));
        }
        Ok(v)
    };
    let mut opt = AdamW { m: vec![], v: vec![], t: 0 };
    for (n, var) in params {
        opt.m.push(take(&format!("m.{n}"), var.elem_count())?);
        opt.v.push(take(&format!("v.{n}"), var.elem_count())?);
    }
    let steps = t.remove("t").ok_or_else(|| Error::checkpoint(&path, "missing 't'"))?;
    let steps = steps.flatten_all()?.to_vec1::<u32>()?;
    let [steps] = steps[..] else {
        return Err(Error::checkpoint(&path, format!("'t' has {} values, not 1", steps.len())));
    };
    opt.t = steps as u64;
    Ok(opt)
}

/// Delete all but the newest `keep` step folders of a run; never the one `latest` names (the
/// one just written, which after resuming from an older checkpoint need not be the newest).
pub fn prune(run_dir: &Path, keep: usize) -> Result<()> {
    let latest = std::fs::read_to_string(run_dir.join("latest")).ok().map(|rel| run_dir.join(rel.trim()));
    let (current, mut others): (Vec<PathBuf>, Vec<PathBuf>) =
        step_folders(run_dir).into_iter().partition(|p| latest.as_deref().is_some_and(|l| same_folder(l, p)));
    let room = keep.max(1).saturating_sub(current.len());
    let n = others.len();
    others.truncate(n.saturating_sub(room));
    // Left by a writer that died between the rename and the removal below.
    if let Ok(entries) = std::fs::read_dir(run_dir.join("checkpoints")) {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with(".removing-") {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    for p in others {
        // Renamed out of `step-*` first, so that a reader (`itt verify`, a resume elsewhere)
        // sees the folder whole or not at all, never half deleted.
        let gone = p.with_file_name(format!(".removing-{}", p.file_name().unwrap_or_default().to_string_lossy()));
        std::fs::rename(&p, &gone).at(&p)?;
        std::fs::remove_dir_all(&gone).at(&gone)?;
    }
    Ok(())
}

/// Load a checkpoint's model and tokenizer, checking that they belong together.
pub fn load_model(path: &Path) -> Result<(Model, crate::data::Tokenizer, CheckpointInfo)> {
    let ck = load(path)?;
    let tok = crate::data::Tokenizer::from_json(&ck.tokenizer_json)
        .map_err(|e| Error::checkpoint(ck.dir.join("tokenizer.json"), e.to_string()))?;
    if tok.vocab_size() != ck.config.model.vocab_size {
        return Err(Error::checkpoint(
            ck.dir.join("tokenizer.json"),
            format!(
                "tokenizer has {} tokens but the model's vocabulary is {}; they do not belong together",
                tok.vocab_size(),
                ck.config.model.vocab_size
            ),
        ));
    }
    let (model, info) = ck.into_model(&Device::Cpu)?;
    Ok((model, tok, info))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::base::config::TestModel;

    fn write_with_header(path: &Path, header: &[(&str, &str)]) {
        let t = Tensor::new(&[1.0f32, 2.0, 3.0], &Device::Cpu).unwrap();
        let meta: HashMap<String, String> = header.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        safetensors::serialize_to_file(vec![("w".to_string(), t)], Some(meta), path).unwrap();
    }

    /// A small dense model saved as a weights-only checkpoint in `dir`.
    fn saved(dir: &Path) -> Model {
        let mut cfg = crate::base::config::preset("tiny").unwrap();
        cfg.model = TestModel::preset("tiny").vocab(257).width(16, 32).heads(2, 2).layers(1).config();
        let model = Model::new(&cfg.model, 1, &Device::Cpu).unwrap();
        let tok = crate::data::Tokenizer::byte().to_json().unwrap();
        let parts = SaveParts { config: &cfg, tokenizer_json: &tok, optimizer: None, state: None, calibration: None };
        save(dir, &model, &parts).unwrap();
        model
    }

    #[test]
    fn the_manifest_lists_every_file_and_catches_changes() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ck");
        saved(&dir);
        let m = read_manifest(&dir).unwrap().unwrap();
        let names: Vec<&str> = m.files.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["config.json", "model.safetensors", "tokenizer.json"]);
        assert!(verify(&dir, Check::Hashes).unwrap().is_intact());
        // No temporary folder is left beside it.
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1);

        // A file added through `write_file` is listed; one dropped in by hand is reported as
        // unlisted but does not make the checkpoint damaged.
        write_file(&dir, "router_calibration.json", b"{}").unwrap();
        std::fs::write(dir.join("notes.txt"), "mine").unwrap();
        let v = verify(&dir, Check::Hashes).unwrap();
        assert!(v.is_intact() && v.files.len() == 4, "{v}");
        assert_eq!(v.unlisted, ["notes.txt"]);

        // Same size, one byte changed: sizes pass, hashes do not.
        let p = dir.join("config.json");
        let mut b = std::fs::read(&p).unwrap();
        b[3] ^= 1;
        std::fs::write(&p, &b).unwrap();
        assert!(verify(&dir, Check::Sizes).unwrap().is_intact());
        let e = verify(&dir, Check::Hashes).unwrap().error().unwrap().to_string();
        assert!(e.contains("config.json") && e.contains("sha256"), "{e}");
        // Loading checks hashes too, unless told to check sizes only (`--no-verify`).
        let e = load(&dir).err().unwrap().to_string();
        assert!(e.contains("config.json") && e.contains("sha256"), "{e}");
        std::fs::remove_file(dir.join("tokenizer.json")).unwrap();
        let e = load_checked(&dir, Check::Sizes).err().unwrap().to_string();
        assert!(e.contains("tokenizer.json") && e.contains("missing"), "{e}");
    }

    #[test]
    fn a_manifest_cannot_point_outside_its_folder() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ck");
        saved(&dir);
        let hash = "0".repeat(64);
        for name in ["../latest", "/etc/passwd", "", ".."] {
            let m = format!(
                r#"{{"format":"itt-manifest","version":1,"files":[{{"name":{name:?},"size":1,"sha256":"{hash}"}}]}}"#
            );
            std::fs::write(dir.join(MANIFEST), m).unwrap();
            let e = load(&dir).err().unwrap().to_string();
            assert!(e.contains("manifest.json") && e.contains("not a file name"), "{name}: {e}");
        }
        std::fs::write(dir.join(MANIFEST), "{").unwrap();
        let e = load(&dir).err().unwrap().to_string();
        assert!(e.contains("malformed") && e.contains("delete manifest.json"), "{e}");
    }

    #[test]
    fn resaving_a_step_replaces_it_whole_and_prune_keeps_the_latest() {
        let tmp = tempfile::tempdir().unwrap();
        let run = tmp.path();
        let ck = |s: usize| run.join("checkpoints").join(format!("step-{s:08}"));
        for s in [1, 2, 3] {
            saved(&ck(s));
        }
        saved(&ck(2));
        assert!(verify(&ck(2), Check::Hashes).unwrap().is_intact());
        // Resumed from step 1 and saved step 2 again: step 3 (newer, from the abandoned run)
        // and step 2 (the latest) stay, step 1 goes.
        set_latest(run, &ck(2)).unwrap();
        prune(run, 2).unwrap();
        assert!(!ck(1).exists() && ck(2).exists() && ck(3).exists());
        prune(run, 1).unwrap();
        assert!(ck(2).exists() && !ck(3).exists());
        let names: Vec<_> =
            std::fs::read_dir(run.join("checkpoints")).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["step-00000002"]);
    }

    #[test]
    fn current_and_earlier_headers_load_and_foreign_ones_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let read = |name: &str, header: &[(&str, &str)]| {
            let p = dir.path().join(name);
            write_with_header(&p, header);
            load_tensors(&p, "model").map(|m| m["w"].to_vec1::<f32>().unwrap())
        };
        assert_eq!(read("now.safetensors", &[("format", "itt-model-v1")]).unwrap(), vec![1.0, 2.0, 3.0]);
        let earlier = [("format", "itt"), ("content", "model"), ("version", "1")];
        assert_eq!(read("earlier.safetensors", &earlier).unwrap(), vec![1.0, 2.0, 3.0]);
        let wrong_kind = [("format", "itt"), ("content", "optimizer"), ("version", "1")];
        assert!(read("opt.safetensors", &wrong_kind).unwrap_err().to_string().contains("from elsewhere"));
        assert!(read("pt.safetensors", &[("format", "pt")]).unwrap_err().to_string().contains("from elsewhere"));
        let e = read("v9.safetensors", &[("format", "itt-model-v9")]).unwrap_err().to_string();
        assert!(e.contains("format version 9"), "{e}");
    }
}
