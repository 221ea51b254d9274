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
//! ```
//! A checkpoint is first written to a hidden temporary folder and renamed into place, and
//! `latest` is replaced by rename, so an interrupted save never leaves a half-written
//! checkpoint where a reader would look, and never damages the previous one.

use crate::config::RunConfig;
use crate::error::IoContext;
use crate::model::{Model, RouterCalibration};
use crate::optim::AdamW;
use crate::util::write_atomic;
use crate::{Error, Result};
use candle_core::{Device, Tensor, Var};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

pub const FORMAT: &str = "itt";
pub const VERSION: u32 = 1;

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

/// The safetensors header tag, e.g. `{"format": "itt-model-v1"}`. One key only: the header's
/// map is written in hash order, and a single entry keeps checkpoints byte-for-byte repeatable.
fn st_metadata(kind: &str) -> HashMap<String, String> {
    HashMap::from([("format".to_string(), format!("{FORMAT}-{kind}-v{VERSION}"))])
}

fn save_tensors(path: &Path, tensors: Vec<(String, Tensor)>, kind: &str) -> Result<()> {
    safetensors::serialize_to_file(tensors, Some(st_metadata(kind)), path)
        .map_err(|e| Error::checkpoint(path, format!("cannot write: {e}")))?;
    make_world_readable(path)
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

/// Write a checkpoint folder `dir` atomically (temporary sibling folder, then rename).
pub fn save(dir: &Path, model: &Model, parts: &SaveParts) -> Result<()> {
    let parent = dir.parent().ok_or_else(|| Error::checkpoint(dir, "has no parent folder"))?;
    std::fs::create_dir_all(parent).at(parent)?;
    let name = dir.file_name().ok_or_else(|| Error::checkpoint(dir, "has no name"))?.to_string_lossy().to_string();
    let tmp = parent.join(format!(".{name}.tmp{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).at(&tmp)?;
    }
    std::fs::create_dir_all(&tmp).at(&tmp)?;
    save_tensors(&tmp.join("model.safetensors"), model_tensors(&model.params), "model")?;
    if let Some(opt) = parts.optimizer {
        let mut t = Vec::with_capacity(2 * model.params.len() + 1);
        for (i, (n, _)) in model.params.iter().enumerate() {
            t.push((format!("m.{n}"), Tensor::from_slice(&opt.m[i], opt.m[i].len(), &Device::Cpu)?));
            t.push((format!("v.{n}"), Tensor::from_slice(&opt.v[i], opt.v[i].len(), &Device::Cpu)?));
        }
        t.push(("t".to_string(), Tensor::from_slice(&[opt.t as u32], 1, &Device::Cpu)?));
        save_tensors(&tmp.join("optimizer.safetensors"), t, "optimizer")?;
    }
    if let Some(state) = parts.state {
        write_bytes(&tmp.join("state.json"), serde_json::to_string_pretty(state).unwrap().as_bytes())?;
    }
    if let Some(cal) = parts.calibration {
        write_bytes(&tmp.join("router_calibration.json"), serde_json::to_string(cal).unwrap().as_bytes())?;
    }
    write_bytes(&tmp.join("config.json"), parts.config.to_json().as_bytes())?;
    write_bytes(&tmp.join("tokenizer.json"), parts.tokenizer_json.as_bytes())?;
    if dir.exists() {
        // Re-saving a step (e.g. after a resume): move the old one aside first.
        let old = parent.join(format!(".{name}.old{}", std::process::id()));
        std::fs::rename(dir, &old).at(dir)?;
        std::fs::rename(&tmp, dir).at(dir)?;
        std::fs::remove_dir_all(&old).at(&old)?;
    } else {
        std::fs::rename(&tmp, dir).at(dir)?;
    }
    Ok(())
}

/// Point `RUN/latest` at a checkpoint folder (relative path), atomically.
pub fn set_latest(run_dir: &Path, ckpt_dir: &Path) -> Result<()> {
    let rel = ckpt_dir.strip_prefix(run_dir).unwrap_or(ckpt_dir);
    write_bytes(&run_dir.join("latest"), rel.to_string_lossy().as_bytes())
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

/// Load the weights, config, tokenizer, state and calibration of a checkpoint or run folder.
pub fn load(path: &Path) -> Result<Checkpoint> {
    let dir = resolve(path)?;
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
    Ok(Checkpoint { dir, config, tokenizer_json, state, calibration, tensors })
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
    opt.t = steps.to_vec1::<u32>()?[0] as u64;
    Ok(opt)
}

/// Delete all but the newest `keep` step folders of a run.
pub fn prune(run_dir: &Path, keep: usize) -> Result<()> {
    let dir = run_dir.join("checkpoints");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Ok(());
    };
    let mut steps: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().map(|n| n.to_string_lossy().starts_with("step-")).unwrap_or(false))
        .collect();
    steps.sort();
    let n = steps.len();
    for p in steps.into_iter().take(n.saturating_sub(keep.max(1))) {
        std::fs::remove_dir_all(&p).at(&p)?;
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

    fn write_with_header(path: &Path, header: &[(&str, &str)]) {
        let t = Tensor::new(&[1.0f32, 2.0, 3.0], &Device::Cpu).unwrap();
        let meta: HashMap<String, String> = header.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        safetensors::serialize_to_file(vec![("w".to_string(), t)], Some(meta), path).unwrap();
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
