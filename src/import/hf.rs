//! Hugging Face LLaMA folders (`LlamaForCausalLM`): read them, and write ours in their layout.
//!
//! A folder holds `config.json`, the weights as `model.safetensors` or as shards
//! `model-0000i-of-0000n.safetensors` listed by `model.safetensors.index.json`, and
//! `tokenizer.json`. Names map one to one (HF checkpoints already use the rotate-half RoPE
//! layout of `ops::apply_rope`, so nothing is permuted):
//!
//! ```text
//! model.embed_tokens.weight                    embed.weight
//! model.layers.N.input_layernorm.weight        layers.N.attn_norm.weight
//! model.layers.N.self_attn.{q,k,v,o}_proj      layers.N.attn.{wq,wk,wv,wo}
//! model.layers.N.post_attention_layernorm      layers.N.mlp_norm.weight
//! model.layers.N.mlp.{gate,up,down}_proj       layers.N.mlp.{w_gate,w_up,w_down}
//! model.norm.weight                            norm.weight
//! lm_head.weight                               head.weight (absent or ignored when tied)
//! ```

use super::Imported;
use crate::base::config::{ModelConfig, ModelKind, ThinkingConfig};
use crate::base::error::IoContext;
use crate::base::util::{write_atomic, write_atomic_via};
use crate::data::Tokenizer;
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};
use std::collections::{BTreeSet, HashMap};
use std::io::Write;
use std::path::Path;

const LAYER_PARTS: [(&str, &str); 9] = [
    ("input_layernorm.weight", "attn_norm.weight"),
    ("self_attn.q_proj.weight", "attn.wq.weight"),
    ("self_attn.k_proj.weight", "attn.wk.weight"),
    ("self_attn.v_proj.weight", "attn.wv.weight"),
    ("self_attn.o_proj.weight", "attn.wo.weight"),
    ("post_attention_layernorm.weight", "mlp_norm.weight"),
    ("mlp.gate_proj.weight", "mlp.w_gate.weight"),
    ("mlp.up_proj.weight", "mlp.w_up.weight"),
    ("mlp.down_proj.weight", "mlp.w_down.weight"),
];

/// HF tensor name -> ours; `None` for names a plain LLaMA does not have.
pub fn our_name(hf: &str) -> Option<String> {
    match hf {
        "model.embed_tokens.weight" => return Some("embed.weight".into()),
        "model.norm.weight" => return Some("norm.weight".into()),
        "lm_head.weight" => return Some("head.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, part) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (_, ours) = LAYER_PARTS.iter().find(|(h, _)| *h == part)?;
    Some(format!("layers.{layer}.{ours}"))
}

/// Our name -> the HF one; `None` for thinking parameters, which HF LLaMA has no place for.
pub fn hf_name(ours: &str) -> Option<String> {
    match ours {
        "embed.weight" => return Some("model.embed_tokens.weight".into()),
        "norm.weight" => return Some("model.norm.weight".into()),
        "head.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = ours.strip_prefix("layers.")?;
    let (layer, part) = rest.split_once('.')?;
    let (hf, _) = LAYER_PARTS.iter().find(|(_, o)| *o == part)?;
    Some(format!("model.layers.{layer}.{hf}"))
}

/// The fields of a `LlamaForCausalLM` config.json this crate reads.
fn config_from_json(path: &Path, v: &Value) -> Result<ModelConfig> {
    let missing = |key: &str| {
        Error::input(path, format!("field `{key}` is missing or not a number; a LlamaForCausalLM config.json needs it"))
    };
    let req = |key: &str| v.get(key).and_then(Value::as_u64).map(|x| x as usize).ok_or_else(|| missing(key));
    let opt_f64 =
        |key: &str| v.get(key).filter(|x| !x.is_null()).map(|x| x.as_f64().ok_or_else(|| missing(key))).transpose();
    let model_type = v.get("model_type").and_then(Value::as_str).unwrap_or("");
    let is_llama = model_type == "llama"
        || v.get("architectures").and_then(Value::as_array).is_some_and(|a| a.iter().any(|x| x == "LlamaForCausalLM"));
    if !is_llama {
        return Err(Error::input(
            path,
            format!(
                "model_type `{model_type}` is not supported; only LLaMA models (model_type \"llama\") can be imported"
            ),
        ));
    }
    for (key, ok) in [
        ("rope_scaling", v.get("rope_scaling").is_none_or(Value::is_null)),
        ("attention_bias", !v.get("attention_bias").and_then(Value::as_bool).unwrap_or(false)),
        ("mlp_bias", !v.get("mlp_bias").and_then(Value::as_bool).unwrap_or(false)),
        ("hidden_act", v.get("hidden_act").and_then(Value::as_str).unwrap_or("silu") == "silu"),
    ] {
        if !ok {
            return Err(Error::input(
                path,
                format!("`{key}` is {}, which this LLaMA implementation does not support", v[key]),
            ));
        }
    }
    let d = req("hidden_size")?;
    let n_heads = req("num_attention_heads")?;
    let rope_theta = match opt_f64("rope_theta")? {
        Some(t) => t,
        // transformers 5 keeps theta inside `rope_parameters`.
        None => v.pointer("/rope_parameters/rope_theta").and_then(Value::as_f64).unwrap_or(10000.0),
    };
    let cfg = ModelConfig {
        vocab_size: req("vocab_size")?,
        d_model: d,
        n_layers: req("num_hidden_layers")?,
        n_heads,
        n_kv_heads: match v.get("num_key_value_heads").filter(|x| !x.is_null()) {
            Some(_) => req("num_key_value_heads")?,
            None => n_heads,
        },
        mlp_hidden: req("intermediate_size")?,
        max_seq_len: req("max_position_embeddings")?,
        rope_theta,
        norm_eps: opt_f64("rms_norm_eps")?.ok_or_else(|| missing("rms_norm_eps"))?,
        tie_embeddings: v.get("tie_word_embeddings").and_then(Value::as_bool).unwrap_or(false),
        init_std: opt_f64("initializer_range")?.unwrap_or(0.02),
        thinking: ThinkingConfig::default(),
    };
    if n_heads > 0 && d % n_heads == 0 {
        if let Some(hd) = v.get("head_dim").and_then(Value::as_u64) {
            if hd as usize != d / n_heads {
                return Err(Error::input(
                    path,
                    format!("head_dim {hd} differs from hidden_size / num_attention_heads; not supported"),
                ));
            }
        }
    }
    cfg.validate().map_err(|e| Error::input(path, e.to_string()))?;
    Ok(cfg)
}

/// The safetensors files of a folder: `model.safetensors`, or the shards its index lists.
fn weight_files(dir: &Path) -> Result<Vec<std::path::PathBuf>> {
    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = std::fs::read_to_string(&index).at(&index)?;
        let v: Value = serde_json::from_str(&text).map_err(|e| Error::input(&index, format!("malformed: {e}")))?;
        let map = v
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| Error::input(&index, "has no `weight_map` object"))?;
        let files: BTreeSet<&str> = map.values().filter_map(Value::as_str).collect();
        let mut out = vec![];
        for f in files {
            let p = dir.join(f);
            if !p.exists() {
                return Err(Error::input(
                    &index,
                    format!("lists shard {f}, which is missing from the folder; download every shard"),
                ));
            }
            out.push(p);
        }
        return Ok(out);
    }
    if single.exists() {
        return Ok(vec![single]);
    }
    Err(Error::input(dir, "has no model.safetensors and no model.safetensors.index.json"))
}

/// Load a Hugging Face LLaMA folder: config, f32 weights under our names, tokenizer.
pub fn load(dir: &Path) -> Result<Imported> {
    let cfg_path = dir.join("config.json");
    let text = std::fs::read_to_string(&cfg_path).at(&cfg_path)?;
    let v: Value = serde_json::from_str(&text).map_err(|e| Error::input(&cfg_path, format!("malformed JSON: {e}")))?;
    let config = config_from_json(&cfg_path, &v)?;

    let mut tensors = HashMap::new();
    for file in weight_files(dir)? {
        let loaded = candle_core::safetensors::load(&file, &Device::Cpu)
            .map_err(|e| Error::input(&file, format!("not a readable safetensors file: {}", super::first_line(&e))))?;
        for (name, t) in loaded {
            if name.ends_with("rotary_emb.inv_freq") {
                continue; // a buffer older transformers saved; recomputed from rope_theta
            }
            let ours = our_name(&name).ok_or_else(|| {
                Error::input(&file, format!("has tensor `{name}`, which a LlamaForCausalLM does not have"))
            })?;
            if ours == "head.weight" && config.tie_embeddings {
                continue; // a tied head saved anyway: it is the embedding
            }
            tensors.insert(ours, t.to_dtype(DType::F32)?);
        }
    }

    let tok_path = dir.join("tokenizer.json");
    let tok_text = std::fs::read_to_string(&tok_path)
        .map_err(|e| Error::input(&tok_path, format!("cannot read ({e}); the folder needs its tokenizer.json")))?;
    let hf: tokenizers::Tokenizer =
        tok_text.parse().map_err(|e| Error::input(&tok_path, format!("not a usable tokenizer.json: {e}")))?;
    // End of text: config.json's eos_token_id when the tokenizer knows it, else by name.
    let eos = v.get("eos_token_id").and_then(|e| e.as_u64().or_else(|| e.get(0).and_then(Value::as_u64)));
    let eos_name = eos.and_then(|id| hf.id_to_token(id as u32));
    let tokenizer = Tokenizer::from_hf(hf, eos_name.as_deref()).map_err(|e| Error::input(&tok_path, e.to_string()))?;
    if tokenizer.vocab_size() != config.vocab_size {
        return Err(Error::input(
            &tok_path,
            format!(
                "has {} tokens but config.json's vocab_size is {}; padded vocabularies are not supported",
                tokenizer.vocab_size(),
                config.vocab_size
            ),
        ));
    }
    Ok(Imported {
        config,
        tensors,
        tokenizer,
        origin: dir.to_path_buf(),
        source: "hf",
        calibration: None,
        quantized: HashMap::new(),
    })
}

/// The `config.json` of a `LlamaForCausalLM` equal to a dense `cfg`.
pub fn config_json(cfg: &ModelConfig, tokenizer: Option<&Tokenizer>) -> Value {
    let eos = tokenizer.map(|t| t.eot_id());
    json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.mlp_hidden,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim(),
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": null,
        "attention_bias": false,
        "attention_dropout": 0.0,
        "mlp_bias": false,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "torch_dtype": "float32",
        "bos_token_id": null,
        "eos_token_id": eos,
        "use_cache": true,
    })
}

/// Write a dense model as a Hugging Face LLaMA folder: `model.safetensors` (HF names, f32,
/// metadata format "pt" as transformers expects), `config.json`, and `tokenizer.json` plus a
/// minimal `tokenizer_config.json` when the tokenizer is a BPE (byte and char tokenizers have
/// no HF form; the weights are written anyway and the caller is told).
pub fn export(dir: &Path, cfg: &ModelConfig, tensors: &[(String, Tensor)], tokenizer: &Tokenizer) -> Result<bool> {
    if cfg.thinking.kind != ModelKind::Dense {
        return Err(Error::usage(
            "only dense models have a Hugging Face LLaMA form (thinking layers have no place in LlamaForCausalLM); use --format itt",
        ));
    }
    std::fs::create_dir_all(dir).at(dir)?;
    let mut named = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let hf = hf_name(name).ok_or_else(|| Error::usage(format!("tensor `{name}` has no Hugging Face name")))?;
        named.push((hf, t.to_dtype(DType::F32)?.contiguous()?));
    }
    let st = dir.join("model.safetensors");
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    write_atomic_via(&st, |tmp| {
        safetensors::serialize_to_file(named, Some(meta), tmp)
            .map_err(|e| Error::input(&st, format!("cannot write: {e}")))
    })?;
    crate::checkpoint::make_world_readable(&st)?;
    let cfg_path = dir.join("config.json");
    let body = serde_json::to_string_pretty(&config_json(cfg, Some(tokenizer))).unwrap_or_default();
    write_atomic(&cfg_path, |w| w.write_all(body.as_bytes()))?;
    let Some(hf) = tokenizer.hf() else { return Ok(false) };
    let tok_path = dir.join("tokenizer.json");
    write_atomic_via(&tok_path, |tmp| {
        hf.save(tmp, true).map_err(|e| Error::input(&tok_path, format!("cannot write: {e}")))
    })?;
    let eot = tokenizer.token_text(tokenizer.eot_id());
    let tc = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": eot,
        "bos_token": null,
        "add_bos_token": false,
        "add_eos_token": false,
        "model_max_length": cfg.max_seq_len,
        "clean_up_tokenization_spaces": false,
    });
    let tc_path = dir.join("tokenizer_config.json");
    let body = serde_json::to_string_pretty(&tc).unwrap_or_default();
    write_atomic(&tc_path, |w| w.write_all(body.as_bytes()))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::base::config::{preset, TestModel};
    use crate::checkpoint::model_tensors;
    use crate::model::{Model, RoutingOptions, SeqLayout};

    fn setup() -> (Model, Tokenizer) {
        let docs: Vec<String> = (0..20).map(|i| format!("the cat sat on the mat {i} times\n")).collect();
        let tok = Tokenizer::train_bpe(&docs, 280, 2).unwrap();
        let cfg = TestModel::preset("tiny").vocab(tok.vocab_size()).heads(4, 2).config();
        (Model::new(&cfg, 3, &Device::Cpu).unwrap(), tok)
    }

    fn logits(m: &Model) -> Vec<f32> {
        let ids = [1u32, 5, 9, 20, 7];
        let x = Tensor::from_slice(&ids, 5, &Device::Cpu).unwrap();
        let l = m.forward(&x, &SeqLayout::uniform(1, 5), &RoutingOptions::default(), None, None).unwrap();
        l.flatten_all().unwrap().to_vec1().unwrap()
    }

    #[test]
    fn names_map_both_ways() {
        for ours in
            ["embed.weight", "norm.weight", "head.weight", "layers.3.attn.wk.weight", "layers.0.mlp.w_down.weight"]
        {
            assert_eq!(our_name(&hf_name(ours).unwrap()).unwrap(), ours);
        }
        assert_eq!(hf_name("layers.1.attn.wq.weight").unwrap(), "model.layers.1.self_attn.q_proj.weight");
        assert!(hf_name("layers.1.think.phi.2").is_none());
        assert!(our_name("model.layers.0.self_attn.q_norm.weight").is_none());
    }

    #[test]
    fn export_then_load_is_the_same_model() {
        let (model, tok) = setup();
        let dir = tempfile::tempdir().unwrap();
        assert!(export(dir.path(), &model.cfg, &model_tensors(&model.params), &tok).unwrap());
        let imp = load(dir.path()).unwrap();
        assert_eq!(imp.config, model.cfg);
        let (back, tok2) = imp.into_model(&Device::Cpu).unwrap();
        assert_eq!(logits(&back), logits(&model));
        assert_eq!(tok2.encode("the cat 12").unwrap(), tok.encode("the cat 12").unwrap());
        assert_eq!(tok2.eot_id(), tok.eot_id());
    }

    #[test]
    fn sharded_folders_load_and_missing_shards_are_named() {
        let (model, tok) = setup();
        let dir = tempfile::tempdir().unwrap();
        export(dir.path(), &model.cfg, &model_tensors(&model.params), &tok).unwrap();
        // Split model.safetensors into two shards plus an index, as transformers does.
        let all = candle_core::safetensors::load(dir.path().join("model.safetensors"), &Device::Cpu).unwrap();
        std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
        let mut names: Vec<String> = all.keys().cloned().collect();
        names.sort();
        let mut weight_map = serde_json::Map::new();
        for (i, part) in names.chunks(names.len() / 2 + 1).enumerate() {
            let file = format!("model-0000{}-of-00002.safetensors", i + 1);
            let ts: HashMap<String, Tensor> = part.iter().map(|n| (n.clone(), all[n].clone())).collect();
            candle_core::safetensors::save(&ts, dir.path().join(&file)).unwrap();
            for n in part {
                weight_map.insert(n.clone(), json!(file));
            }
        }
        let index = json!({"metadata": {}, "weight_map": weight_map});
        std::fs::write(dir.path().join("model.safetensors.index.json"), index.to_string()).unwrap();
        let (back, _) = load(dir.path()).unwrap().into_model(&Device::Cpu).unwrap();
        assert_eq!(logits(&back), logits(&model));

        std::fs::remove_file(dir.path().join("model-00002-of-00002.safetensors")).unwrap();
        let e = load(dir.path()).err().unwrap().to_string();
        assert!(e.contains("model-00002-of-00002.safetensors") && e.contains("missing"), "{e}");
        assert_eq!(e.lines().count(), 1);
    }

    #[test]
    fn configs_with_missing_fields_or_other_models_are_refused() {
        let (model, tok) = setup();
        let dir = tempfile::tempdir().unwrap();
        export(dir.path(), &model.cfg, &model_tensors(&model.params), &tok).unwrap();
        let path = dir.path().join("config.json");
        let good: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();

        let mut v = good.clone();
        v.as_object_mut().unwrap().remove("hidden_size");
        std::fs::write(&path, v.to_string()).unwrap();
        let e = load(dir.path()).err().unwrap().to_string();
        assert!(e.contains("config.json") && e.contains("`hidden_size` is missing"), "{e}");
        assert_eq!(e.lines().count(), 1);

        let mut v = good.clone();
        v["model_type"] = json!("gpt_neox");
        v["architectures"] = json!(["GPTNeoXForCausalLM"]);
        std::fs::write(&path, v.to_string()).unwrap();
        let e = load(dir.path()).err().unwrap().to_string();
        assert!(e.contains("`gpt_neox` is not supported"), "{e}");

        let mut v = good;
        v["rope_scaling"] = json!({"rope_type": "llama3", "factor": 8.0});
        std::fs::write(&path, v.to_string()).unwrap();
        assert!(load(dir.path()).err().unwrap().to_string().contains("rope_scaling"));
    }

    #[test]
    fn itt_models_have_no_hf_form() {
        let (_, tok) = setup();
        let mut cfg = preset("tiny-itt2").unwrap().model;
        cfg.vocab_size = tok.vocab_size();
        let m = Model::new(&cfg, 1, &Device::Cpu).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let e = export(dir.path(), &cfg, &model_tensors(&m.params), &tok).err().unwrap().to_string();
        assert!(e.contains("--format itt"), "{e}");
    }
}
