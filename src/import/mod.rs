//! Real checkpoints: load pretrained LLaMA-architecture models from GGUF files (`gguf`) and
//! Hugging Face folders (`hf`), write ours back out in the Hugging Face layout (`hf::export`),
//! and turn a pretrained dense model into an ITT model (`retrofit`).
//!
//! Every loader produces the same thing, an [`Imported`]: a dense `ModelConfig`, the weights
//! under this crate's parameter names (`embed.weight`, `layers.{i}.attn.wq.weight`, ... see
//! `model/mod.rs`) in f32 and in the rotate-half rotary layout of `ops::apply_rope`, and the
//! model's own tokenizer. From there `Model::from_tensors` builds the model, `checkpoint::save`
//! writes one of our checkpoint folders, and `retrofit::retrofit` adds thinking parameters.

pub mod gguf;
pub mod hf;
pub mod retrofit;

use crate::checkpoint;
use crate::config::{ModelConfig, RunConfig, TrainConfig, CONFIG_FORMAT_VERSION};
use crate::data::Tokenizer;
use crate::model::{Model, RouterCalibration};
use crate::{Error, Result};
use candle_core::quantized::QTensor;
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A model read from outside (or from one of our checkpoints), ready to build.
pub struct Imported {
    pub config: ModelConfig,
    /// Our parameter names -> f32 tensors, Q/K rows in the rotate-half layout.
    pub tensors: HashMap<String, Tensor>,
    pub tokenizer: Tokenizer,
    /// The file or folder it came from, for messages.
    pub origin: PathBuf,
    /// What kind of source it was: "gguf", "hf" or "itt".
    pub source: &'static str,
    /// Router thresholds, when the source is an ITT checkpoint that has them.
    pub calibration: Option<RouterCalibration>,
    /// Quantized forms of linear weights (and of the embedding under a tied head), kept from a
    /// GGUF loaded with `GgufWeights::Quantized`; `into_model` runs the products on them
    /// (DESIGN §13). `tensors` still holds every weight dequantized.
    pub quantized: HashMap<String, Arc<QTensor>>,
}

impl Imported {
    /// Build the model (the tensors are moved into it) and hand back the tokenizer.
    pub fn into_model(self, device: &Device) -> Result<(Model, Tokenizer)> {
        let mut model = Model::from_tensors(&self.config, self.tensors, &self.origin.to_string_lossy(), device)?;
        model.set_quantized(self.quantized).map_err(|e| Error::input(&self.origin, e.to_string()))?;
        Ok((model, self.tokenizer))
    }

    /// A run config for the imported model: the model as read, default training settings with
    /// the sequence length capped by the model's context.
    pub fn run_config(&self) -> RunConfig {
        run_config_for(&self.config)
    }
}

/// A `RunConfig` wrapping a model config, for checkpoints written by `convert` and `retrofit`.
pub fn run_config_for(model: &ModelConfig) -> RunConfig {
    let mut train = TrainConfig::default();
    train.seq_len = train.seq_len.min(model.max_seq_len);
    RunConfig { format_version: CONFIG_FORMAT_VERSION, preset: None, model: model.clone(), train }
}

/// Load a model from a GGUF file, a Hugging Face folder (`config.json` + safetensors +
/// `tokenizer.json`), or one of our checkpoint or run folders.
pub fn load(path: &Path) -> Result<Imported> {
    if !path.exists() {
        return Err(Error::input(
            path,
            "does not exist (give a .gguf file, a Hugging Face model folder or an itt checkpoint)",
        ));
    }
    if path.is_file() {
        return gguf::load(path);
    }
    if (path.join("model.safetensors").exists() || path.join("latest").exists()) && is_itt_checkpoint(path) {
        return load_checkpoint(path);
    }
    if path.join("config.json").exists() {
        return hf::load(path);
    }
    Err(Error::input(
        path,
        "is a folder with neither config.json (Hugging Face) nor an itt checkpoint; give a .gguf file or a model folder",
    ))
}

/// A model for inference (eval, generate, bench): one of our checkpoints or run folders, or a
/// GGUF file read directly, its quantized weights kept or dequantized as `weights` says
/// (DESIGN §13). A GGUF gets the run config `run_config_for` makes.
pub fn load_for_inference(
    path: &Path,
    weights: gguf::GgufWeights,
) -> Result<(Model, Tokenizer, checkpoint::CheckpointInfo)> {
    if !path.is_file() {
        return checkpoint::load_model(path);
    }
    let imported = gguf::load_with(path, weights)?;
    let config = imported.run_config();
    let tokenizer_json = imported.tokenizer.to_json()?;
    let (model, tok) = imported.into_model(&Device::Cpu)?;
    let info =
        checkpoint::CheckpointInfo { dir: path.to_path_buf(), config, tokenizer_json, state: None, calibration: None };
    Ok((model, tok, info))
}

/// Whether a folder is one of our checkpoints or runs (its weights carry our header).
fn is_itt_checkpoint(path: &Path) -> bool {
    let Ok(dir) = checkpoint::resolve(path) else { return false };
    let Ok(text) = std::fs::read_to_string(dir.join("config.json")) else { return false };
    serde_json::from_str::<RunConfig>(&text).is_ok()
}

fn load_checkpoint(path: &Path) -> Result<Imported> {
    let (model, tokenizer, info) = checkpoint::load_model(path)?;
    // `detach` keeps the storage but drops the variable flag, so a model built from these
    // tensors gets its own copy (`Var::from_tensor` copies non-variables) and training it
    // cannot change this one.
    let tensors = model.params.iter().map(|(n, v)| (n.clone(), v.as_tensor().detach())).collect();
    Ok(Imported {
        config: info.config.model,
        tensors,
        tokenizer,
        origin: info.dir,
        source: "itt",
        calibration: info.calibration,
        quantized: HashMap::new(),
    })
}

/// Write an imported model as one of our checkpoint folders (weights, config, tokenizer), so
/// that `itt eval`, `itt generate` and `itt train --resume`-free fine-tuning can use it.
pub fn save_checkpoint(imported: Imported, out: &Path) -> Result<Model> {
    let cfg = imported.run_config();
    let tokenizer_json = imported.tokenizer.to_json()?;
    let calibration = imported.calibration.clone();
    let (model, _) = imported.into_model(&Device::Cpu)?;
    checkpoint::save(
        out,
        &model,
        &checkpoint::SaveParts {
            config: &cfg,
            tokenizer_json: &tokenizer_json,
            optimizer: None,
            state: None,
            calibration: calibration.as_ref(),
        },
    )?;
    Ok(model)
}

/// The first line of an error's message: candle's Display may append a backtrace, and our
/// messages are one line.
pub(crate) fn first_line(e: &impl std::fmt::Display) -> String {
    e.to_string().lines().next().unwrap_or("").to_string()
}

/// The layouts `export` writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportFormat {
    /// One of our checkpoint folders, weights only (no optimiser state): model.safetensors,
    /// config.json, tokenizer.json (+ router_calibration.json).
    Itt,
    /// A Hugging Face `LlamaForCausalLM` folder (dense models only), see `hf::export`.
    #[value(alias = "huggingface")]
    Hf,
    /// `model.gguf`, llama architecture, f32 or quantized (dense models with a BPE tokenizer),
    /// see `gguf::write`.
    Gguf,
}

impl std::str::FromStr for ExportFormat {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "itt" => Ok(ExportFormat::Itt),
            "hf" | "huggingface" => Ok(ExportFormat::Hf),
            "gguf" => Ok(ExportFormat::Gguf),
            _ => Err(Error::usage(format!("unknown export format '{s}' (use itt, hf or gguf)"))),
        }
    }
}

/// Export any model `load` reads (our checkpoint, a GGUF, a Hugging Face folder) to `out`;
/// `quant` is the number format of a GGUF's matrices (f32 for the other formats).
/// Returns a one-line description of what was written.
pub fn export(from: &Path, out: &Path, format: ExportFormat, quant: gguf::GgufQuant) -> Result<String> {
    if quant != gguf::GgufQuant::F32 && format != ExportFormat::Gguf {
        return Err(Error::usage(format!(
            "--quantize {} applies to --format gguf only; itt and hf exports are f32",
            quant.name()
        )));
    }
    if out.exists() && std::fs::read_dir(out).map(|mut d| d.next().is_some()).unwrap_or(true) {
        return Err(Error::usage(format!("{} exists and is not empty; choose another --out", out.display())));
    }
    let imported = load(from)?;
    let source = imported.source;
    match format {
        ExportFormat::Itt => {
            let model = save_checkpoint(imported, out)?;
            Ok(format!(
                "{source} model with {} parameters written as an itt checkpoint to {}",
                model.n_params(),
                out.display()
            ))
        }
        ExportFormat::Hf | ExportFormat::Gguf => {
            let cfg = imported.config.clone();
            let (model, tok) = imported.into_model(&Device::Cpu)?;
            let tensors = checkpoint::model_tensors(&model.params);
            if format == ExportFormat::Gguf {
                std::fs::create_dir_all(out).map_err(|e| Error::input(out, e.to_string()))?;
                let path = out.join("model.gguf");
                let types = gguf::write(&path, &cfg, &tensors, &tok, quant)?;
                return Ok(format!(
                    "{source} model with {} parameters written as {} GGUF ({types}) to {}",
                    model.n_params(),
                    quant.name(),
                    path.display()
                ));
            }
            let with_tok = hf::export(out, &cfg, &tensors, &tok)?;
            Ok(format!(
                "{source} model with {} parameters written as a Hugging Face LlamaForCausalLM folder to {}{}",
                model.n_params(),
                out.display(),
                if with_tok { "" } else { " (without tokenizer.json: only BPE tokenizers have a Hugging Face form)" }
            ))
        }
    }
}

/// Rows of a Q or K projection from llama.cpp's interleaved-pair rotary layout back to the
/// rotate-half layout (`ops::apply_rope` rotates pairs (i, i + hd/2)).
///
/// llama.cpp's converter permutes each head's rows: row `j*hd/2 + i` of the HF weight (j in
/// {0, 1}, i < hd/2) becomes row `2i + j`, so that GGML can rotate adjacent pairs. Undoing
/// it is the transpose of the (hd/2, 2) grid back to (2, hd/2). w: (heads*hd, in).
pub fn unpermute_rotary(w: &Tensor, heads: usize) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    if heads == 0 || out % (2 * heads) != 0 {
        return Err(Error::usage(format!("cannot split {out} rows into {heads} rotary heads")));
    }
    let half = out / heads / 2;
    Ok(w.reshape((heads, half, 2, inp))?.transpose(1, 2)?.contiguous()?.reshape((out, inp))?)
}

/// The inverse of [`unpermute_rotary`]: what llama.cpp's converter does to HF weights.
pub fn permute_rotary(w: &Tensor, heads: usize) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    if heads == 0 || out % (2 * heads) != 0 {
        return Err(Error::usage(format!("cannot split {out} rows into {heads} rotary heads")));
    }
    let half = out / heads / 2;
    Ok(w.reshape((heads, 2, half, inp))?.transpose(1, 2)?.contiguous()?.reshape((out, inp))?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{RoutingOptions, SeqLayout};

    fn logits(m: &Model) -> Vec<f32> {
        let x = Tensor::from_slice(&[3u32, 1, 4, 1, 5], 5, &Device::Cpu).unwrap();
        let l = m.forward(&x, &SeqLayout::uniform(1, 5), &RoutingOptions::default(), None, None).unwrap();
        l.flatten_all().unwrap().to_vec1().unwrap()
    }

    /// A dense checkpoint exported in each format loads back (through `load`'s dispatch on
    /// file vs folder) as the same model.
    #[test]
    fn every_export_format_loads_back_as_the_same_model() {
        let dir = tempfile::tempdir().unwrap();
        let docs: Vec<String> = (0..20).map(|i| format!("one two three {i} four five\n")).collect();
        let tok = Tokenizer::train_bpe(&docs, 280, 2).unwrap();
        let mut cfg = crate::config::preset("tiny").unwrap();
        cfg.model.vocab_size = tok.vocab_size();
        let model = Model::new(&cfg.model, 9, &Device::Cpu).unwrap();
        let ck = dir.path().join("ck");
        let parts = checkpoint::SaveParts {
            config: &cfg,
            tokenizer_json: &tok.to_json().unwrap(),
            optimizer: None,
            state: None,
            calibration: None,
        };
        checkpoint::save(&ck, &model, &parts).unwrap();
        let want = logits(&model);
        for (format, source, file) in
            [(ExportFormat::Itt, "itt", ""), (ExportFormat::Hf, "hf", ""), (ExportFormat::Gguf, "gguf", "model.gguf")]
        {
            let out = dir.path().join(format!("{format:?}"));
            export(&ck, &out, format, gguf::GgufQuant::F32).unwrap();
            let back = load(&out.join(file)).unwrap();
            assert_eq!(back.source, source);
            let (m, t) = back.into_model(&Device::Cpu).unwrap();
            assert_eq!(logits(&m), want, "{format:?}");
            assert_eq!(t.encode("one two 12").unwrap(), tok.encode("one two 12").unwrap());
            assert!(export(&ck, &out, format, gguf::GgufQuant::F32).unwrap_err().to_string().contains("not empty"));
        }
        assert!("onnx".parse::<ExportFormat>().is_err());
    }

    #[test]
    fn rotary_permutation_round_trips_and_moves_rows() {
        let w = Tensor::arange(0f32, 24.0, &Device::Cpu).unwrap().reshape((8, 3)).unwrap();
        // 2 heads of head_dim 4: HF rows (per head) 0,1 | 2,3 become 0,2,1,3.
        let p = permute_rotary(&w, 2).unwrap();
        let rows: Vec<f32> = p.narrow(1, 0, 1).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(rows, [0.0, 6.0, 3.0, 9.0, 12.0, 18.0, 15.0, 21.0]);
        let back = unpermute_rotary(&p, 2).unwrap();
        let diff = (back - &w).unwrap().abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(diff, 0.0);
        assert!(unpermute_rotary(&w, 3).is_err());
    }
}
