//! Real checkpoints: load pretrained LLaMA-architecture models from GGUF files (`gguf`) and
//! Hugging Face folders (`hf`), write ours back out in the Hugging Face layout (`hf::export`),
//! and turn a pretrained dense model into an ITT model (`retrofit`).
//!
//! [`open`] is the one loader every command uses: it tells the format from the path
//! ([`Format::of`]) and reads any of them, ours included, into a model on the asked device.
//! The format loaders produce the same thing, an [`Imported`]: a dense `ModelConfig`, the weights
//! under this crate's parameter names (`embed.weight`, `layers.{i}.attn.wq.weight`, ... see
//! `model/mod.rs`) in f32 and in the rotate-half rotary layout of `ops::apply_rope`, and the
//! model's own tokenizer. From there `Model::from_tensors` builds the model, `checkpoint::save`
//! writes one of our checkpoint folders, and `retrofit::retrofit` adds thinking parameters.

pub mod gguf;
pub mod hf;
pub mod retrofit;

use crate::base::config::{ModelConfig, RunConfig, TrainConfig, CONFIG_FORMAT_VERSION};
use crate::checkpoint;
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
    /// (DESIGN §13). `tensors` holds every other weight in f32, and the embedding always (lookups
    /// read it); a quantized linear weight has no f32 copy (the model never needs one for
    /// inference, and SmolLM2-135M's would be 430 MB).
    pub quantized: HashMap<String, Arc<QTensor>>,
}

impl Imported {
    /// Build the model (the tensors are moved into it) and hand back the tokenizer.
    pub fn into_model(self, device: &Device) -> Result<(Model, Tokenizer)> {
        let blocks_only = self.quantized.keys().filter(|n| !self.tensors.contains_key(*n)).cloned().collect();
        let origin = self.origin.to_string_lossy();
        let mut model = Model::from_tensors_blocks_only(&self.config, self.tensors, blocks_only, &origin, device)?;
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

/// The formats `open` reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// A llama GGUF file (`gguf`).
    Gguf,
    /// A Hugging Face LLaMA folder: config.json, safetensors, tokenizer.json (`hf`).
    HuggingFace,
    /// One of our checkpoint or run folders (`checkpoint`).
    Itt,
}

impl Format {
    /// What `path` holds, from its shape alone: a file is a GGUF; a run folder (`latest`) or
    /// a folder whose config.json is not a Hugging Face one (no `model_type`, no
    /// `architectures`) is ours, and its loader says what is wrong with it if anything is.
    pub fn of(path: &Path) -> Result<Format> {
        if !path.exists() {
            return Err(Error::input(
                path,
                "does not exist (give a .gguf file, a Hugging Face model folder or an itt checkpoint)",
            ));
        }
        if path.is_file() {
            return Ok(Format::Gguf);
        }
        let config = path.join("config.json");
        if path.join("latest").exists() || (path.join("model.safetensors").exists() && !config.exists()) {
            return Ok(Format::Itt);
        }
        if config.exists() {
            let hf = std::fs::read_to_string(&config)
                .ok()
                .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
                .is_some_and(|v| v.get("model_type").is_some() || v.get("architectures").is_some());
            return Ok(if hf { Format::HuggingFace } else { Format::Itt });
        }
        Err(Error::input(
            path,
            "is a folder with neither config.json (Hugging Face) nor an itt checkpoint; give a .gguf file or a model folder",
        ))
    }

    /// "gguf", "hf" or "itt", as messages and `Imported::source` name them.
    pub fn name(self) -> &'static str {
        match self {
            Format::Gguf => "gguf",
            Format::HuggingFace => "hf",
            Format::Itt => "itt",
        }
    }
}

/// How `open` reads a model. `Default`: a GGUF's quantized matrices kept, on the CPU.
#[derive(Clone, Debug)]
pub struct OpenOptions {
    /// A GGUF's quantized matrices: kept, the products running on them (DESIGN §13), or
    /// dequantized to f32 (needed to train or differentiate the model).
    pub gguf_weights: gguf::GgufWeights,
    /// Where the model runs.
    pub device: Device,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions { gguf_weights: gguf::GgufWeights::default(), device: Device::Cpu }
    }
}

impl OpenOptions {
    /// Every weight in f32 on the CPU: a model that can be trained, or differentiated for
    /// analysis (quantized products have no backward pass).
    pub fn differentiable() -> Self {
        OpenOptions { gguf_weights: gguf::GgufWeights::F32, device: Device::Cpu }
    }
}

/// A model `open` read.
pub struct Opened {
    pub model: Model,
    pub tokenizer: Tokenizer,
    /// Where it came from, its run config (for a GGUF or Hugging Face model the one
    /// [`run_config_for`] makes), its router thresholds and, for a training checkpoint, its state.
    pub info: checkpoint::CheckpointInfo,
    pub format: Format,
}

/// The one loader of every command: a GGUF file, a Hugging Face folder (`config.json` +
/// safetensors + `tokenizer.json`), or one of our checkpoint or run folders, built on
/// `opts.device`.
pub fn open(path: &Path, opts: &OpenOptions) -> Result<Opened> {
    let format = Format::of(path)?;
    let (model, tokenizer, info) = match format {
        Format::Itt => checkpoint::load_model(path)?,
        Format::Gguf => {
            // Quantized products run on the CPU only (DESIGN §15): elsewhere the model runs
            // dense, so read it dequantized (a quantized read keeps no f32 copies, §13).
            let weights = match opts.device.is_cpu() {
                true => opts.gguf_weights,
                false => {
                    if opts.gguf_weights == gguf::GgufWeights::Quantized {
                        eprintln!("notice: quantized products run on the CPU only; on {:?} this model runs dense (f32 weights)", opts.device);
                    }
                    gguf::GgufWeights::F32
                }
            };
            built(gguf::load_with(path, weights)?)?
        }
        Format::HuggingFace => built(hf::load(path)?)?,
    };
    Ok(Opened { model: model.to_device(&opts.device)?, tokenizer, info, format })
}

/// An imported model built on the host, with the checkpoint info of a weights-only checkpoint.
fn built(imported: Imported) -> Result<(Model, Tokenizer, checkpoint::CheckpointInfo)> {
    let info = checkpoint::CheckpointInfo {
        dir: imported.origin.clone(),
        config: imported.run_config(),
        tokenizer_json: imported.tokenizer.to_json()?,
        state: None,
        calibration: imported.calibration.clone(),
    };
    let (model, tokenizer) = imported.into_model(&Device::Cpu)?;
    Ok((model, tokenizer, info))
}

/// Write a model as one of our checkpoint folders (weights, config, tokenizer, router
/// thresholds), so that `itt eval`, `itt generate` and fine-tuning can use it.
fn save_checkpoint(opened: &Opened, out: &Path) -> Result<()> {
    // Weights only: the model and default training settings, not the run it came from.
    let cfg = run_config_for(&opened.model.cfg);
    checkpoint::save(
        out,
        &opened.model,
        &checkpoint::SaveParts {
            config: &cfg,
            tokenizer_json: &opened.tokenizer.to_json()?,
            optimizer: None,
            state: None,
            calibration: opened.info.calibration.as_ref(),
        },
    )
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

/// Export any model `open` reads (our checkpoint, a GGUF, a Hugging Face folder) to `out`;
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
    let opened = open(from, &OpenOptions::differentiable())?;
    let source = opened.format.name();
    match format {
        ExportFormat::Itt => {
            save_checkpoint(&opened, out)?;
            Ok(format!(
                "{source} model with {} parameters written as an itt checkpoint to {}",
                opened.model.n_params(),
                out.display()
            ))
        }
        ExportFormat::Hf | ExportFormat::Gguf => {
            let Opened { model, tokenizer: tok, .. } = opened;
            let cfg = model.cfg.clone();
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

    /// A dense checkpoint exported in each format loads back (through `open`'s dispatch on
    /// file vs folder) as the same model.
    #[test]
    fn every_export_format_loads_back_as_the_same_model() {
        let dir = tempfile::tempdir().unwrap();
        let docs: Vec<String> = (0..20).map(|i| format!("one two three {i} four five\n")).collect();
        let tok = Tokenizer::train_bpe(&docs, 280, 2).unwrap();
        let mut cfg = crate::base::config::preset("tiny").unwrap();
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
            let back = open(&out.join(file), &OpenOptions::default()).unwrap();
            assert_eq!(back.format.name(), source);
            let (m, t) = (back.model, back.tokenizer);
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
