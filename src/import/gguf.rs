//! GGUF (llama.cpp's file format) for LLaMA-architecture models: hyperparameters and the
//! byte-level BPE tokenizer from the metadata, weights dequantized to f32 and, for inference
//! (`GgufWeights::Quantized`), the quantized linear weights also kept in their GGML blocks
//! (DESIGN §13). `write` writes a dense model back, f32 or quantized.
//!
//! Names, from llama.cpp's `convert_hf_to_gguf.py`:
//!
//! ```text
//! token_embd.weight              embed.weight                      (V, D)
//! blk.N.attn_norm.weight         layers.N.attn_norm.weight         (D,)
//! blk.N.attn_{q,k,v,output}      layers.N.attn.{wq,wk,wv,wo}       (out, in)
//! blk.N.ffn_norm.weight          layers.N.mlp_norm.weight          (D,)
//! blk.N.ffn_{gate,up,down}       layers.N.mlp.{w_gate,w_up,w_down} (out, in)
//! output_norm.weight             norm.weight                       (D,)
//! output.weight                  head.weight (absent: tied to token_embd)
//! ```
//!
//! GGUF lists dimensions innermost first; candle's reader reverses them, so shapes arrive as
//! (out, in) like ours. The converter permutes the rows of Q and K for GGML's interleaved-pair
//! RoPE; `unpermute_rotary` puts them back into the rotate-half layout of `ops::apply_rope`.

use super::{first_line, unpermute_rotary, Imported};
use crate::base::config::{ModelConfig, ThinkingConfig};
use crate::data::Tokenizer;
use crate::{Error, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{Device, Tensor};
use serde_json::json;
use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::Path;
use std::sync::Arc;

/// How a GGUF's weights are held when it is loaded for inference (DESIGN §13).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum GgufWeights {
    /// Keep quantized linear weights (and the embedding, when the head is tied to it) in their
    /// GGML blocks and run those products on them; the rest in f32.
    #[default]
    Quantized,
    /// Dequantize every tensor to f32 and run every product in f32.
    F32,
}

/// The tensor types candle can dequantize (named as llama.cpp names them).
pub const SUPPORTED_TYPES: &str =
    "F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K";

/// The GGUF metadata of one file, with typed getters that name the file and key on error.
struct Meta<'a> {
    path: &'a Path,
    md: &'a HashMap<String, Value>,
}

impl Meta<'_> {
    fn get(&self, key: &str) -> Result<&Value> {
        self.md.get(key).ok_or_else(|| {
            Error::input(
                self.path,
                format!("GGUF metadata key `{key}` is missing; the file is incomplete or not a llama model"),
            )
        })
    }

    fn usize_opt(&self, key: &str) -> Result<Option<usize>> {
        let Some(v) = self.md.get(key) else { return Ok(None) };
        let n: Option<i128> = match v {
            Value::U8(x) => Some(*x as i128),
            Value::I8(x) => Some(*x as i128),
            Value::U16(x) => Some(*x as i128),
            Value::I16(x) => Some(*x as i128),
            Value::U32(x) => Some(*x as i128),
            Value::I32(x) => Some(*x as i128),
            Value::U64(x) => Some(*x as i128),
            Value::I64(x) => Some(*x as i128),
            _ => None,
        };
        match n {
            Some(n) if n >= 0 && n <= usize::MAX as i128 => Ok(Some(n as usize)),
            _ => Err(Error::input(
                self.path,
                format!("GGUF metadata `{key}` should be a non-negative integer, found {v:?}"),
            )),
        }
    }

    fn usize(&self, key: &str) -> Result<usize> {
        self.get(key)?;
        Ok(self.usize_opt(key)?.unwrap_or(0))
    }

    fn f64_opt(&self, key: &str) -> Result<Option<f64>> {
        match self.md.get(key) {
            None => Ok(None),
            Some(Value::F32(x)) => Ok(Some(*x as f64)),
            Some(Value::F64(x)) => Ok(Some(*x)),
            Some(_) => Ok(self.usize_opt(key)?.map(|n| n as f64)),
        }
    }

    fn string(&self, key: &str) -> Result<&str> {
        match self.get(key)? {
            Value::String(s) => Ok(s),
            v => Err(Error::input(self.path, format!("GGUF metadata `{key}` should be a string, found {v:?}"))),
        }
    }

    fn strings(&self, key: &str) -> Result<Vec<&str>> {
        let bad = || Error::input(self.path, format!("GGUF metadata `{key}` should be a list of strings"));
        match self.get(key)? {
            Value::Array(items) => {
                items.iter().map(|v| if let Value::String(s) = v { Ok(s.as_str()) } else { Err(bad()) }).collect()
            }
            _ => Err(bad()),
        }
    }
}

/// Read a GGUF header, turning candle's messages into ours.
fn read_content(path: &Path) -> Result<(Content, BufReader<File>)> {
    let file = File::open(path).map_err(|e| Error::input(path, format!("cannot open: {e}")))?;
    let mut reader = BufReader::new(file);
    let content = Content::read(&mut reader).map_err(|e| {
        let msg = first_line(&e);
        if let Some(rest) = msg.split("unknown dtype for tensor ").nth(1) {
            // candle names the ggml type id it does not know (IQ*, TQ*, MXFP4, ...).
            let id: String = rest.chars().take_while(char::is_ascii_digit).collect();
            Error::input(
                path,
                format!("uses tensor type {id} (a ggml type id), which cannot be dequantized here; supported types: {SUPPORTED_TYPES}"),
            )
        } else if msg.contains("magic") {
            Error::input(path, "is not a GGUF file (wrong magic number)")
        } else {
            Error::input(path, format!("is not a readable GGUF file: {msg}"))
        }
    })?;
    Ok((content, reader))
}

/// Check every tensor's claimed shape and data range against the file before anything is read
/// or allocated for it: candle multiplies the dimensions unchecked, so a damaged header could
/// otherwise overflow into a small size or ask for an allocation the file cannot back.
fn check_tensor_claims(path: &Path, content: &Content) -> Result<()> {
    let file_len = std::fs::metadata(path).map_err(|e| Error::input(path, format!("cannot read: {e}")))?.len();
    for (name, info) in &content.tensor_infos {
        let bad = |msg: String| Error::input(path, format!("tensor `{name}` {msg}; the file is truncated or corrupt"));
        let dims = info.shape.dims();
        let elems = dims
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d as u64))
            .ok_or_else(|| bad(format!("has dimensions {dims:?}, whose product overflows")))?;
        let (block, size) = (info.ggml_dtype.block_size() as u64, info.ggml_dtype.type_size() as u64);
        if elems % block != 0 {
            return Err(bad(format!("has {elems} values, not a multiple of its type's block of {block}")));
        }
        let bytes = (elems / block).checked_mul(size);
        let start = content.tensor_data_offset.checked_add(info.offset);
        match (bytes, start) {
            (Some(b), Some(s)) if s.checked_add(b).is_some_and(|end| end <= file_len) => {}
            _ => {
                return Err(bad(format!(
                    "claims {} bytes at offset {}, past the end of the file ({file_len} bytes)",
                    bytes.map_or("too many".to_string(), |b| b.to_string()),
                    start.map_or("beyond 2^64".to_string(), |s| s.to_string()),
                )))
            }
        }
    }
    Ok(())
}

/// Load a llama-architecture GGUF file: config, f32 weights under our names, tokenizer.
pub fn load(path: &Path) -> Result<Imported> {
    load_with(path, GgufWeights::F32)
}

/// `load`, also keeping the quantized weights' blocks when `weights` says so.
pub fn load_with(path: &Path, weights: GgufWeights) -> Result<Imported> {
    let (content, mut reader) = read_content(path)?;
    check_tensor_claims(path, &content)?;
    let meta = Meta { path, md: &content.metadata };
    let arch = meta.string("general.architecture")?;
    if arch != "llama" {
        return Err(Error::input(
            path,
            format!("GGUF architecture `{arch}` is not supported; only `llama` models (LLaMA, SmolLM2, ...) can be imported"),
        ));
    }
    let infos = &content.tensor_infos;
    if infos.contains_key("rope_freqs.weight") {
        return Err(Error::input(
            path,
            "uses scaled RoPE frequencies (rope_freqs.weight, LLaMA 3.1 style), which are not supported",
        ));
    }
    if let Some(Value::String(s)) = content.metadata.get("llama.rope.scaling.type") {
        if s != "none" {
            return Err(Error::input(path, format!("uses RoPE scaling `{s}`, which is not supported")));
        }
    }
    let config = config_from_meta(&meta, infos.contains_key("output.weight"), infos)?;
    let tokenizer = tokenizer_from_meta(&meta)?;
    if tokenizer.vocab_size() != config.vocab_size {
        return Err(Error::input(
            path,
            format!("the tokenizer has {} tokens but the embedding {} rows", tokenizer.vocab_size(), config.vocab_size),
        ));
    }

    let dev = Device::Cpu;
    let mut tensors = HashMap::with_capacity(infos.len());
    let mut quantized = HashMap::new();
    let mut names: Vec<&String> = infos.keys().collect();
    names.sort();
    for name in names {
        let ours = our_name(name).ok_or_else(|| {
            Error::input(
                path,
                format!("has tensor `{name}`, which a plain llama model does not have; it cannot be imported"),
            )
        })?;
        let info = &infos[name];
        let q = Arc::new(
            content
                .tensor(&mut reader, name, &dev)
                .map_err(|e| Error::input(path, format!("tensor `{name}`: {}", first_line(&e))))?,
        );
        let heads = match ours.rsplit('.').nth(1) {
            Some("wq") => Some(config.n_heads),
            Some("wk") => Some(config.n_kv_heads),
            _ => None,
        };
        // A product's weight: a linear layer's, or the embedding read as the tied head.
        let product = q.shape().rank() == 2 && (ours != "embed.weight" || config.tie_embeddings);
        if weights == GgufWeights::Quantized && product && crate::ops::quant::is_quantized(q.dtype()) {
            let blocks = match heads {
                Some(heads) => Arc::new(
                    unpermute_rotary_blocks(&q, heads)
                        .map_err(|e| Error::input(path, format!("tensor `{name}`: {e}")))?,
                ),
                None => q.clone(),
            };
            quantized.insert(ours.clone(), blocks);
            // Only the blocks: a linear weight's f32 copy would never be read (DESIGN §13).
            // The embedding's is, by the token lookups.
            if ours != "embed.weight" {
                continue;
            }
        }
        let mut t = dequantize(&q).map_err(|e| {
            Error::input(
                path,
                format!("tensor `{name}` ({:?}) cannot be dequantized: {}", info.ggml_dtype, first_line(&e)),
            )
        })?;
        if let Some(heads) = heads {
            t = unpermute_rotary(&t, heads).map_err(|e| Error::input(path, format!("tensor `{name}`: {e}")))?;
        }
        tensors.insert(ours, t);
    }
    Ok(Imported {
        config,
        tensors,
        tokenizer,
        origin: path.to_path_buf(),
        source: "gguf",
        calibration: None,
        quantized,
    })
}

/// `unpermute_rotary` on a quantized Q or K weight: the rows move whole (each row is its own
/// run of blocks), so the blocks are copied, not requantized. q: (heads*hd, in).
fn unpermute_rotary_blocks(q: &QTensor, heads: usize) -> Result<QTensor> {
    let (out, inp) = q.shape().dims2()?;
    // Which source row each row takes: the same permutation applied to the row numbers.
    let rows = Tensor::arange(0f32, out as f32, &Device::Cpu)?.reshape((out, 1))?;
    let order: Vec<f32> = unpermute_rotary(&rows, heads)?.flatten_all()?.to_vec1()?;
    let row_bytes = inp / q.dtype().block_size() * q.dtype().type_size();
    let data = q.data()?;
    // u64 words keep the copy aligned for any block type (candle checks the alignment).
    let mut words = vec![0u64; (out * row_bytes).div_ceil(8)];
    // SAFETY: a u64 buffer viewed as the bytes it holds.
    let bytes = unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr() as *mut u8, out * row_bytes) };
    for (dst, &src) in bytes.chunks_exact_mut(row_bytes).zip(&order) {
        let src = src as usize;
        dst.copy_from_slice(&data[src * row_bytes..(src + 1) * row_bytes]);
    }
    let storage = QStorage::from_data(Cow::Borrowed(bytes), &Device::Cpu, q.dtype())?;
    Ok(QTensor::new(storage, (out, inp))?)
}

fn dequantize(q: &QTensor) -> candle_core::Result<Tensor> {
    if let (Ok((rows, cols)), true) = (q.shape().dims2(), crate::ops::quant::is_quantized(q.dtype())) {
        return dequantize_into_var(q, rows, cols);
    }
    match q.dtype() {
        GgmlDType::F32 => q.dequantize(&Device::Cpu),
        _ => q.dequantize(&Device::Cpu)?.to_dtype(candle_core::DType::F32),
    }
}

/// A quantized matrix dequantized straight into a parameter's storage, a few rows at a time:
/// the model's `Var` then takes it without a copy (`Var::from_tensor` copies anything that is
/// not already a variable), so loading never holds a matrix twice in f32. For the embedding of
/// SmolLM2-135M that second copy was 113 MB of peak memory.
fn dequantize_into_var(q: &QTensor, rows: usize, cols: usize) -> candle_core::Result<Tensor> {
    let var = candle_core::Var::zeros((rows, cols), candle_core::DType::F32, &Device::Cpu)?;
    let row_bytes = cols / q.dtype().block_size() * q.dtype().type_size();
    let data = q.data()?;
    const ROWS: usize = 1024;
    for r0 in (0..rows).step_by(ROWS) {
        let r1 = (r0 + ROWS).min(rows);
        let storage =
            QStorage::from_data(Cow::Borrowed(&data[r0 * row_bytes..r1 * row_bytes]), &Device::Cpu, q.dtype())?;
        let chunk = QTensor::new(storage, (r1 - r0, cols))?.dequantize(&Device::Cpu)?;
        var.slice_set(&chunk, 0, r0)?;
    }
    Ok(var.as_tensor().clone())
}

/// GGUF tensor name -> ours; `None` for names a plain llama model does not have.
fn our_name(gguf: &str) -> Option<String> {
    let fixed = match gguf {
        "token_embd.weight" => Some("embed.weight"),
        "output_norm.weight" => Some("norm.weight"),
        "output.weight" => Some("head.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, part) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let ours = match part {
        "attn_norm.weight" => "attn_norm.weight",
        "attn_q.weight" => "attn.wq.weight",
        "attn_k.weight" => "attn.wk.weight",
        "attn_v.weight" => "attn.wv.weight",
        "attn_output.weight" => "attn.wo.weight",
        "ffn_norm.weight" => "mlp_norm.weight",
        "ffn_gate.weight" => "mlp.w_gate.weight",
        "ffn_up.weight" => "mlp.w_up.weight",
        "ffn_down.weight" => "mlp.w_down.weight",
        _ => return None,
    };
    Some(format!("layers.{layer}.{ours}"))
}

/// Our name -> the GGUF one (for writing).
fn gguf_name(ours: &str) -> Option<String> {
    let fixed = match ours {
        "embed.weight" => Some("token_embd.weight"),
        "norm.weight" => Some("output_norm.weight"),
        "head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = ours.strip_prefix("layers.")?;
    let (layer, part) = rest.split_once('.')?;
    let g = match part {
        "attn_norm.weight" => "attn_norm.weight",
        "attn.wq.weight" => "attn_q.weight",
        "attn.wk.weight" => "attn_k.weight",
        "attn.wv.weight" => "attn_v.weight",
        "attn.wo.weight" => "attn_output.weight",
        "mlp_norm.weight" => "ffn_norm.weight",
        "mlp.w_gate.weight" => "ffn_gate.weight",
        "mlp.w_up.weight" => "ffn_up.weight",
        "mlp.w_down.weight" => "ffn_down.weight",
        _ => return None,
    };
    Some(format!("blk.{layer}.{g}"))
}

fn config_from_meta(
    meta: &Meta,
    has_output: bool,
    infos: &HashMap<String, candle_core::quantized::gguf_file::TensorInfo>,
) -> Result<ModelConfig> {
    let d = meta.usize("llama.embedding_length")?;
    let n_heads = meta.usize("llama.attention.head_count")?;
    let n_kv_heads = meta.usize_opt("llama.attention.head_count_kv")?.unwrap_or(n_heads);
    // The vocabulary: the metadata's when given, else the embedding's rows.
    let vocab = match meta.usize_opt("llama.vocab_size")? {
        Some(v) => v,
        None => match infos.get("token_embd.weight") {
            Some(i) => i.shape.dims().first().copied().unwrap_or(0),
            None => return Err(Error::input(meta.path, "has no token_embd.weight tensor")),
        },
    };
    let cfg = ModelConfig {
        vocab_size: vocab,
        d_model: d,
        n_layers: meta.usize("llama.block_count")?,
        n_heads,
        n_kv_heads,
        mlp_hidden: meta.usize("llama.feed_forward_length")?,
        max_seq_len: meta.usize("llama.context_length")?,
        rope_theta: meta.f64_opt("llama.rope.freq_base")?.unwrap_or(10000.0),
        norm_eps: meta
            .f64_opt("llama.attention.layer_norm_rms_epsilon")?
            .ok_or_else(|| meta.get("llama.attention.layer_norm_rms_epsilon").unwrap_err())?,
        tie_embeddings: !has_output,
        init_std: 0.02,
        thinking: ThinkingConfig::default(),
    };
    if n_heads == 0 || d % n_heads != 0 {
        return Err(Error::input(meta.path, format!("embedding_length {d} is not a multiple of head_count {n_heads}")));
    }
    let hd = d / n_heads;
    for key in ["llama.rope.dimension_count", "llama.attention.key_length", "llama.attention.value_length"] {
        if let Some(v) = meta.usize_opt(key)? {
            if v != hd {
                return Err(Error::input(
                    meta.path,
                    format!(
                        "`{key}` is {v} but embedding_length / head_count is {hd}; only full-width heads are supported"
                    ),
                ));
            }
        }
    }
    cfg.validate().map_err(|e| Error::input(meta.path, e.to_string()))?;
    Ok(cfg)
}

/// Byte-level BPE from `tokenizer.ggml.*`, built as a Hugging Face `tokenizer.json` (so the
/// same JSON is what `hf::export` writes). The pre-tokenizer follows llama.cpp's
/// `tokenizer.ggml.pre`: `smollm` splits every digit on its own before GPT-2's regex (as
/// SmolLM2's own tokenizer.json does); `gpt2`/`default` use GPT-2's regex alone.
fn tokenizer_from_meta(meta: &Meta) -> Result<Tokenizer> {
    let model = meta.string("tokenizer.ggml.model")?;
    if model != "gpt2" {
        return Err(Error::input(
            meta.path,
            format!(
                "tokenizer model `{model}` is not supported; only byte-level BPE (`gpt2`) tokenizers can be imported"
            ),
        ));
    }
    let pre = match meta.md.get("tokenizer.ggml.pre") {
        Some(Value::String(s)) => s.as_str(),
        _ => "default",
    };
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    let pre_tokenizer = match pre {
        "smollm" => {
            json!({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": true}, byte_level]})
        }
        "gpt2" | "default" => byte_level,
        other => {
            return Err(Error::input(
                meta.path,
                format!(
                "pre-tokenizer `{other}` is not supported (known: smollm, gpt2, default); its split rules would differ"
            ),
            ))
        }
    };
    let tokens = meta.strings("tokenizer.ggml.tokens")?;
    let merges = meta.strings("tokenizer.ggml.merges")?;
    let types: Vec<usize> = match meta.md.get("tokenizer.ggml.token_type") {
        Some(Value::Array(v)) => v
            .iter()
            .map(|x| match x {
                Value::I32(t) => *t as usize,
                Value::U32(t) => *t as usize,
                _ => 1,
            })
            .collect(),
        _ => vec![1; tokens.len()],
    };
    let mut vocab = serde_json::Map::with_capacity(tokens.len());
    let mut added = vec![];
    for (id, tok) in tokens.iter().enumerate() {
        if vocab.insert(tok.to_string(), json!(id)).is_some() {
            return Err(Error::input(meta.path, format!("token {tok:?} appears twice in tokenizer.ggml.tokens")));
        }
        // llama.cpp token types: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
        match types.get(id) {
            Some(3) | Some(4) => added.push(json!({
                "id": id, "content": tok, "single_word": false, "lstrip": false, "rstrip": false,
                "normalized": false, "special": types[id] == 3,
            })),
            _ => {}
        }
    }
    let merges: Vec<serde_json::Value> = merges
        .iter()
        .map(|m| match m.split_once(' ') {
            Some((a, b)) => Ok(json!([a, b])),
            None => Err(Error::input(meta.path, format!("merge {m:?} is not two tokens separated by a space"))),
        })
        .collect::<Result<_>>()?;
    let hf = json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": merges},
    });
    let tok: tokenizers::Tokenizer = serde_json::from_value(hf)
        .map_err(|e| Error::input(meta.path, format!("the tokenizer in the metadata is unusable: {e}")))?;
    // The end of text is the file's declared end-of-sequence token (SmolLM2-Instruct:
    // `<|im_end|>`), which is also where Hugging Face's generation stops.
    let eos = meta.usize_opt("tokenizer.ggml.eos_token_id")?;
    let eot = eos.and_then(|id| tokens.get(id).copied());
    Tokenizer::from_hf(tok, eot).map_err(|e| Error::input(meta.path, e.to_string()))
}

/// The number format of the matrices of a written GGUF (`itt export --format gguf --quantize`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum GgufQuant {
    /// Every tensor f32.
    #[default]
    F32,
    /// 8-bit blocks of 32 with an f16 scale (8.5 bits per weight).
    #[value(name = "q8_0")]
    Q8_0,
    /// 4-bit blocks of 32 with an f16 scale (4.5 bits per weight).
    #[value(name = "q4_0")]
    Q4_0,
    /// 4-bit blocks of 32 with an f16 scale and minimum (5 bits per weight).
    #[value(name = "q4_1")]
    Q4_1,
    /// 4-bit super-blocks of 256 with 6-bit sub-block scales (4.5 bits per weight); rows must
    /// be a multiple of 256 long, shorter ones are written Q8_0.
    #[value(name = "q4_k")]
    Q4K,
    /// 6-bit super-blocks of 256 (6.56 bits per weight); rows as for q4_k.
    #[value(name = "q6_k")]
    Q6K,
}

impl GgufQuant {
    pub fn dtype(self) -> GgmlDType {
        match self {
            GgufQuant::F32 => GgmlDType::F32,
            GgufQuant::Q8_0 => GgmlDType::Q8_0,
            GgufQuant::Q4_0 => GgmlDType::Q4_0,
            GgufQuant::Q4_1 => GgmlDType::Q4_1,
            GgufQuant::Q4K => GgmlDType::Q4K,
            GgufQuant::Q6K => GgmlDType::Q6K,
        }
    }

    /// The name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            GgufQuant::F32 => "f32",
            GgufQuant::Q8_0 => "q8_0",
            GgufQuant::Q4_0 => "q4_0",
            GgufQuant::Q4_1 => "q4_1",
            GgufQuant::Q4K => "q4_k",
            GgufQuant::Q6K => "q6_k",
        }
    }

    /// llama.cpp's `general.file_type` (`llama_ftype`): ALL_F32, MOSTLY_Q8_0, Q4_0, Q4_1,
    /// Q4_K_S (the nearest to every matrix Q4_K), Q6_K.
    fn file_type(self) -> u32 {
        match self {
            GgufQuant::F32 => 0,
            GgufQuant::Q8_0 => 7,
            GgufQuant::Q4_0 => 2,
            GgufQuant::Q4_1 => 3,
            GgufQuant::Q4K => 14,
            GgufQuant::Q6K => 18,
        }
    }

    /// The type a matrix with rows of `row_len` values is written in: this one when the rows
    /// split into its blocks, else Q8_0 (blocks of 32, as llama.cpp's quantizer falls back for
    /// K-quants), else f32.
    fn for_rows(self, row_len: usize) -> GgmlDType {
        [self.dtype(), GgmlDType::Q8_0, GgmlDType::F32]
            .into_iter()
            .find(|d| row_len.is_multiple_of(d.block_size()))
            .unwrap_or(GgmlDType::F32)
    }
}

/// Write a dense model as an f32 llama GGUF; see [`write`].
pub fn write_f32(path: &Path, cfg: &ModelConfig, tensors: &[(String, Tensor)], tokenizer: &Tokenizer) -> Result<()> {
    write(path, cfg, tensors, tokenizer, GgufQuant::F32).map(|_| ())
}

/// Write a dense model as a llama GGUF (Q/K permuted the way llama.cpp's converter does), for
/// llama.cpp and the tests: matrices (linear weights, the embedding) in `quant`, norms in f32.
/// The tokenizer must be a byte-level BPE; its pre-tokenizer is declared `smollm` when it is
/// a sequence (digits split, then byte level, as `load` builds it) and `gpt2` otherwise.
/// Returns the tensor types written, e.g. "Q8_0 x29, F32 x9".
pub fn write(
    path: &Path,
    cfg: &ModelConfig,
    tensors: &[(String, Tensor)],
    tokenizer: &Tokenizer,
    quant: GgufQuant,
) -> Result<String> {
    if cfg.thinking.kind != crate::base::config::ModelKind::Dense {
        return Err(Error::usage("only dense models can be written as GGUF (llama has no thinking layers)"));
    }
    let hf = tokenizer.hf().ok_or_else(|| Error::usage("a GGUF needs a byte-level BPE tokenizer"))?;
    let tj: serde_json::Value =
        serde_json::from_str(&hf.to_string(false).map_err(|e| Error::Tokenizer(e.to_string()))?)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
    let mut by_id: Vec<(u32, String)> = tj["model"]["vocab"]
        .as_object()
        .map(|m| m.iter().filter_map(|(k, v)| v.as_u64().map(|id| (id as u32, k.clone()))).collect())
        .unwrap_or_default();
    let specials: Vec<u32> = tj["added_tokens"]
        .as_array()
        .map(|a| a.iter().filter_map(|t| t["id"].as_u64().map(|x| x as u32)).collect())
        .unwrap_or_default();
    for t in tj["added_tokens"].as_array().into_iter().flatten() {
        if let (Some(id), Some(c)) = (t["id"].as_u64(), t["content"].as_str()) {
            if !by_id.iter().any(|(i, _)| *i == id as u32) {
                by_id.push((id as u32, c.to_string()));
            }
        }
    }
    by_id.sort();
    if by_id.iter().enumerate().any(|(i, (id, _))| i as u32 != *id) {
        return Err(Error::usage("the tokenizer's ids are not contiguous from 0"));
    }
    let merges: Vec<Value> = tj["model"]["merges"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| match m {
            serde_json::Value::Array(p) => Value::String(format!(
                "{} {}",
                p.first().and_then(|x| x.as_str()).unwrap_or(""),
                p.get(1).and_then(|x| x.as_str()).unwrap_or("")
            )),
            other => Value::String(other.as_str().unwrap_or("").to_string()),
        })
        .collect();
    let u = |x: usize| Value::U32(x as u32);
    let pre = if tj["pre_tokenizer"]["type"] == "Sequence" { "smollm" } else { "gpt2" };
    let md: Vec<(&str, Value)> = vec![
        ("general.architecture", Value::String("llama".into())),
        ("llama.block_count", u(cfg.n_layers)),
        ("llama.context_length", u(cfg.max_seq_len)),
        ("llama.embedding_length", u(cfg.d_model)),
        ("llama.feed_forward_length", u(cfg.mlp_hidden)),
        ("llama.attention.head_count", u(cfg.n_heads)),
        ("llama.attention.head_count_kv", u(cfg.n_kv_heads)),
        ("llama.rope.freq_base", Value::F32(cfg.rope_theta as f32)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(cfg.norm_eps as f32)),
        ("llama.vocab_size", u(cfg.vocab_size)),
        ("llama.rope.dimension_count", u(cfg.head_dim())),
        ("tokenizer.ggml.model", Value::String("gpt2".into())),
        ("tokenizer.ggml.pre", Value::String(pre.into())),
        ("tokenizer.ggml.tokens", Value::Array(by_id.iter().map(|(_, s)| Value::String(s.clone())).collect())),
        (
            "tokenizer.ggml.token_type",
            Value::Array(by_id.iter().map(|(id, _)| Value::I32(if specials.contains(id) { 3 } else { 1 })).collect()),
        ),
        ("tokenizer.ggml.merges", Value::Array(merges)),
        ("tokenizer.ggml.eos_token_id", u(tokenizer.eot_id() as usize)),
        ("general.file_type", Value::U32(quant.file_type())),
        ("general.quantization_version", Value::U32(2)),
    ];
    let mut qts = vec![];
    let mut types = std::collections::BTreeMap::new();
    for (name, t) in tensors {
        let g = gguf_name(name).ok_or_else(|| Error::usage(format!("tensor `{name}` has no GGUF name")))?;
        let t = t.to_dtype(candle_core::DType::F32)?;
        let t = if name.ends_with("attn.wq.weight") {
            super::permute_rotary(&t, cfg.n_heads)?
        } else if name.ends_with("attn.wk.weight") {
            super::permute_rotary(&t, cfg.n_kv_heads)?
        } else {
            t
        };
        let dtype = match t.dims() {
            [_, row_len] => quant.for_rows(*row_len),
            _ => GgmlDType::F32,
        };
        *types.entry(format!("{dtype:?}")).or_insert(0) += 1;
        qts.push((g, QTensor::quantize(&t, dtype)?));
    }
    let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (*k, v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = qts.iter().map(|(k, v)| (k.as_str(), v)).collect();
    crate::base::util::write_atomic(path, |w| {
        candle_core::quantized::gguf_file::write(w, &md_refs, &t_refs).map_err(std::io::Error::other)
    })?;
    Ok(types.iter().map(|(t, n)| format!("{t} x{n}")).collect::<Vec<_>>().join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::base::config::{preset, TestModel};
    use crate::checkpoint::model_tensors;
    use crate::model::{Model, RoutingOptions, SeqLayout};

    fn docs() -> Vec<String> {
        (0..30).map(|i| format!("The cat sat on the mat {i}. Ünïcödé 中文 🦀 the dog 1234 ran.\n")).collect()
    }

    /// A small random dense model with GQA and tied embeddings, its BPE tokenizer, and the
    /// model written as a GGUF the way llama.cpp would.
    fn small_gguf(dir: &Path) -> (Model, Tokenizer, std::path::PathBuf) {
        let tok = Tokenizer::train_bpe(&docs(), 300, 2).unwrap();
        let mut cfg = TestModel::preset("tiny").vocab(tok.vocab_size()).heads(4, 2).config();
        cfg.tie_embeddings = true;
        cfg.rope_theta = 100000.0;
        let model = Model::new(&cfg, 7, &Device::Cpu).unwrap();
        let path = dir.join("m.gguf");
        write_f32(&path, &cfg, &model_tensors(&model.params), &tok).unwrap();
        (model, tok, path)
    }

    fn logits(m: &Model, ids: &[u32]) -> Vec<f32> {
        let x = Tensor::from_slice(ids, ids.len(), &Device::Cpu).unwrap();
        let l = m.forward(&x, &SeqLayout::uniform(1, ids.len()), &RoutingOptions::default(), None, None).unwrap();
        l.flatten_all().unwrap().to_vec1().unwrap()
    }

    #[test]
    fn gguf_round_trip_gives_the_same_model_and_tokenizer() {
        let dir = tempfile::tempdir().unwrap();
        let (model, tok, path) = small_gguf(dir.path());
        let imp = load(&path).unwrap();
        assert_eq!(imp.config.vocab_size, model.cfg.vocab_size);
        assert_eq!((imp.config.n_heads, imp.config.n_kv_heads), (4, 2));
        assert!(imp.config.tie_embeddings);
        assert_eq!(imp.config.rope_theta, 100000.0);
        let (back, tok2) = imp.into_model(&Device::Cpu).unwrap();
        let text = "The cat 12 中文 🦀 sat.";
        let ids = tok.encode(text).unwrap();
        assert_eq!(tok2.encode(text).unwrap(), ids);
        assert_eq!(tok2.eot_id(), tok.eot_id());
        // Q and K went through permute (write) and unpermute (load): logits are identical.
        assert_eq!(logits(&model, &ids), logits(&back, &ids));
    }

    #[test]
    fn loading_without_unpermuting_would_change_the_logits() {
        // Guards the test above: the permutation is not a no-op on this model.
        let dir = tempfile::tempdir().unwrap();
        let (model, _tok, _) = small_gguf(dir.path());
        let mut t: HashMap<String, Tensor> = model_tensors(&model.params).into_iter().collect();
        let wq = t["layers.0.attn.wq.weight"].clone();
        t.insert("layers.0.attn.wq.weight".into(), crate::import::permute_rotary(&wq, 4).unwrap());
        let wrong = Model::from_tensors(&model.cfg, t, "test", &Device::Cpu).unwrap();
        assert_ne!(logits(&model, &[1, 2, 3, 4]), logits(&wrong, &[1, 2, 3, 4]));
    }

    /// Relative L2 distance ||a - b|| / ||b||.
    fn rel_l2(a: &[f32], b: &[f32]) -> f32 {
        let d: f32 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
        (d / b.iter().map(|y| y * y).sum::<f32>()).sqrt()
    }

    /// A dense model written quantized (`write`) and read back for inference keeps its blocks
    /// (GQA, tied head: every linear weight and the embedding), and its logits stay near the
    /// f32 model's. Tolerances, relative L2 over the logits of the prompt's tokens: the
    /// products on the file's blocks against f32 products on the same weights dequantized
    /// differ only by the 8-bit rounding of the activations, ~0.4% per product (`ops::quant`),
    /// compounded over 2 layers and the head: 3% (seen 0.9% Q8_0, 1.3% Q4_K). Against the
    /// original f32 model the weights' own rounding adds ~0.5% per weight for Q8_0 (step
    /// max|w|/127 over Gaussian blocks of 32) and ~8% for Q4_K (4 bits over a sub-block's
    /// range), about doubled through the layers: 3% and 25% (seen 1.5% and 16%).
    #[test]
    fn quantized_export_round_trips_with_logits_near_the_f32_model() {
        let dir = tempfile::tempdir().unwrap();
        let tok = Tokenizer::train_bpe(&docs(), 300, 2).unwrap();
        let mut cfg = preset("tiny").unwrap().model;
        // Rows of 256 (d) and 512 (MLP) values: Q4_K blocks fit every matrix.
        (cfg.vocab_size, cfg.d_model, cfg.mlp_hidden, cfg.n_kv_heads, cfg.n_layers) =
            (tok.vocab_size(), 256, 512, 2, 2);
        cfg.tie_embeddings = true;
        let model = Model::new(&cfg, 11, &Device::Cpu).unwrap();
        let ids = tok.encode("The cat sat on the mat 12.").unwrap();
        let want = logits(&model, &ids);
        for (quant, dtype, tol) in [(GgufQuant::Q8_0, GgmlDType::Q8_0, 0.03), (GgufQuant::Q4K, GgmlDType::Q4K, 0.25)] {
            let path = dir.path().join(format!("{}.gguf", quant.name()));
            let types = write(&path, &cfg, &model_tensors(&model.params), &tok, quant).unwrap();
            assert_eq!(types, format!("F32 x5, {dtype:?} x15"));
            let (q, _) = load_with(&path, GgufWeights::Quantized).unwrap().into_model(&Device::Cpu).unwrap();
            assert_eq!(q.quantized_summary(), format!("{dtype:?} x15"));
            assert!(q.is_quantized() && q.embed_quant.is_some() && q.layers[1].block.attn.wk.quant.is_some());
            let (f, _) = load_with(&path, GgufWeights::F32).unwrap().into_model(&Device::Cpu).unwrap();
            assert!(!f.is_quantized());
            let (got, same_weights) = (logits(&q, &ids), logits(&f, &ids));
            let (e_act, e_all) = (rel_l2(&got, &same_weights), rel_l2(&got, &want));
            println!("{}: vs dequantized weights {e_act:.4}, vs the f32 model {e_all:.4}", quant.name());
            assert!(e_act < 0.03, "{}: {e_act}", quant.name());
            assert!(e_all < tol, "{}: {e_all}", quant.name());
            // A quantized read keeps no f32 copies of the quantized linears (their parameters
            // are gone, the embedding's stays for the lookups), and nothing can dequantize it.
            assert_eq!(q.params.len(), f.params.len() - 14, "2 layers x 7 linear weights have no parameters");
            let mut served = load_with(&path, GgufWeights::Quantized).unwrap().into_model(&Device::Cpu).unwrap().0;
            assert_eq!(served.drop_dense_copies().unwrap(), 0, "nothing left to free");
            assert_eq!(logits(&served, &ids), got, "{}: the logits changed", quant.name());
            assert!(served.dequantize().is_err());
            // Quantized products have no gradients: such a model is not trained.
            let run = crate::import::run_config_for(&q.cfg);
            let e = crate::train::Trainer::new(
                run,
                &tok,
                &dir.path().join("run"),
                crate::train::TrainerOptions { weights: Some(q), ..Default::default() },
            )
            .err()
            .unwrap();
            assert!(e.to_string().contains("cannot be trained"), "{e}");
        }
    }

    #[test]
    fn rows_too_short_for_k_quants_are_written_q8_0() {
        let dir = tempfile::tempdir().unwrap();
        let (model, tok, _) = small_gguf(dir.path());
        let path = dir.path().join("q4k.gguf");
        // tiny: rows of 128 and 352 values, none a multiple of Q4_K's 256.
        let types = write(&path, &model.cfg, &model_tensors(&model.params), &tok, GgufQuant::Q4K).unwrap();
        assert_eq!(types, "F32 x9, Q8_0 x29");
        let (q, _) = load_with(&path, GgufWeights::Quantized).unwrap().into_model(&Device::Cpu).unwrap();
        assert_eq!(q.quantized_summary(), "Q8_0 x29");
    }

    /// Rewrite one metadata string value in a GGUF written by `write_f32` (same length).
    fn patch(path: &Path, from: &[u8], to: &[u8]) {
        assert_eq!(from.len(), to.len());
        let mut bytes = std::fs::read(path).unwrap();
        let pos = bytes.windows(from.len()).position(|w| w == from).expect("pattern present");
        bytes[pos..pos + to.len()].copy_from_slice(to);
        std::fs::write(path, bytes).unwrap();
    }

    #[test]
    fn other_architectures_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (_, _, path) = small_gguf(dir.path());
        // "general.architecture" -> "llama" is stored as u64 length 5 + bytes; make it "gemma".
        patch(&path, b"\x05\x00\x00\x00\x00\x00\x00\x00llama", b"\x05\x00\x00\x00\x00\x00\x00\x00gemma");
        let e = load(&path).err().unwrap().to_string();
        assert!(e.contains("architecture `gemma` is not supported"), "{e}");
        assert_eq!(e.lines().count(), 1);
    }

    #[test]
    fn unsupported_tensor_types_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (_, _, path) = small_gguf(dir.path());
        // The first tensor info: name, n_dims u32, dims u64 each, then the type u32 (0 = F32).
        // Set it to 16 (IQ2_XXS), which candle cannot dequantize.
        let mut bytes = std::fs::read(&path).unwrap();
        let name = b"blk.0.attn_k.weight";
        let pos = bytes.windows(name.len()).position(|w| w == name).unwrap() + name.len();
        let n_dims = u32::from_le_bytes(bytes[pos..pos + 4].try_into().unwrap()) as usize;
        let ty = pos + 4 + 8 * n_dims;
        assert_eq!(&bytes[ty..ty + 4], &[0, 0, 0, 0]);
        bytes[ty] = 16;
        std::fs::write(&path, bytes).unwrap();
        let e = load(&path).err().unwrap().to_string();
        assert!(e.contains("tensor type 16") && e.contains("Q4_1"), "{e}");
        assert_eq!(e.lines().count(), 1);
    }

    #[test]
    fn missing_metadata_and_non_gguf_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let (_, _, path) = small_gguf(dir.path());
        patch(&path, b"llama.block_count", b"llama.block_xxxxx");
        let e = load(&path).err().unwrap().to_string();
        assert!(e.contains("`llama.block_count` is missing"), "{e}");
        let txt = dir.path().join("x.gguf");
        std::fs::write(&txt, "hello, not a gguf").unwrap();
        let e = load(&txt).err().unwrap().to_string();
        assert!(e.contains("GGUF"), "{e}");
    }
}
