//! Tokenizers: raw bytes, characters of a training text, or byte-level BPE (trained here or
//! loaded from any Hugging Face `tokenizer.json`, e.g. LLaMA or SmolLM2).
//!
//! Every kind has one end-of-document id (`eot_id`) that the data pipeline appends after each
//! document. All kinds share one JSON file format (`{"format": "itt-tokenizer", ...}`, a BPE
//! tokenizer embeds its HF JSON), and `fingerprint` is the sha256 of that canonical JSON, so a
//! dataset or checkpoint can refuse a tokenizer it was not made with.

use std::collections::HashMap;
use std::path::Path;

use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, NormalizerWrapper, TokenizerBuilder};

use crate::base::config::MAX_VOCAB;
use crate::base::error::IoContext;
use crate::{Error, Result};

/// The end-of-document token of the tokenizers made here.
pub const EOT: &str = "<|eot|>";
/// The unknown-character token of the char tokenizer.
pub const UNK: &str = "<|unk|>";
/// Names an HF tokenizer may give its end-of-text token, tried in this order when loading one.
pub const EOT_CANDIDATES: &[&str] =
    &[EOT, "<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|im_end|>", "<|eot_id|>"];

const FORMAT: &str = "itt-tokenizer";
const FORMAT_VERSION: u64 = 1;
const BYTE_EOT: u32 = 256;
const CHAR_EOT: u32 = 0;
const CHAR_UNK: u32 = 1;

#[derive(Clone, Debug)]
pub enum Tokenizer {
    /// Ids 0..=255 are bytes, 256 is `<|eot|>`.
    Byte,
    /// Id 0 is `<|eot|>`, 1 is `<|unk|>`, then `chars` in sorted order from id 2.
    Char { chars: Vec<char>, index: HashMap<char, u32> },
    /// An HF tokenizer (byte-level BPE when trained here) and the id of its end-of-text token.
    Bpe { tok: Box<tokenizers::Tokenizer>, eot_id: u32 },
}

fn tok_err(e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(e.to_string())
}

impl Tokenizer {
    pub fn byte() -> Self {
        Tokenizer::Byte
    }

    /// Vocabulary = sorted distinct chars of `text`, after `<|eot|>` (0) and `<|unk|>` (1).
    pub fn char_from_text(text: &str) -> Self {
        Self::char_from_chars(text.chars())
    }

    fn char_from_chars(chars: impl IntoIterator<Item = char>) -> Self {
        let set: std::collections::BTreeSet<char> = chars.into_iter().collect();
        let chars: Vec<char> = set.into_iter().collect();
        let index = chars.iter().enumerate().map(|(i, &c)| (c, i as u32 + 2)).collect();
        Tokenizer::Char { chars, index }
    }

    /// Train a byte-level BPE (GPT-2 style: byte alphabet, no prefix space, no normalizer) with
    /// `<|eot|>` as its only special token. `vocab_size` counts the 256 bytes and `<|eot|>`;
    /// training stops earlier when no pair occurs `min_frequency` times.
    pub fn train_bpe(docs: &[String], vocab_size: usize, min_frequency: u64) -> Result<Self> {
        if vocab_size < 258 {
            return Err(Error::config(
                "vocab_size",
                format!("BPE needs at least 258 tokens (256 bytes, <|eot|>, one merge), got {vocab_size}"),
            ));
        }
        if vocab_size > u32::MAX as usize {
            return Err(Error::config("vocab_size", format!("{vocab_size} is too large")));
        }
        let byte_level = ByteLevel::default().add_prefix_space(false);
        let mut trainer = BpeTrainerBuilder::new()
            .vocab_size(vocab_size)
            .min_frequency(min_frequency)
            .show_progress(false)
            .special_tokens(vec![AddedToken::from(EOT, true)])
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .build();
        let mut tok = TokenizerBuilder::new()
            .with_model(BPE::default())
            .with_normalizer(None::<NormalizerWrapper>)
            .with_pre_tokenizer(Some(byte_level))
            .with_post_processor(Some(byte_level))
            .with_decoder(Some(ByteLevelDecoder::default()))
            .build()
            .map_err(tok_err)?;
        tok.train(&mut trainer, docs.iter()).map_err(tok_err)?;
        Self::from_hf(tok.into(), Some(EOT))
    }

    /// Wrap an HF tokenizer. `eot` names its end-of-text token; `None` tries `EOT_CANDIDATES`.
    pub fn from_hf(tok: tokenizers::Tokenizer, eot: Option<&str>) -> Result<Self> {
        let eot_id = match eot {
            Some(name) => tok
                .token_to_id(name)
                .ok_or_else(|| Error::Tokenizer(format!("the tokenizer has no token {name:?} to end documents")))?,
            None => EOT_CANDIDATES.iter().find_map(|name| tok.token_to_id(name)).ok_or_else(|| {
                Error::Tokenizer(format!(
                    "no end-of-text token found (looked for {}); add one of them to the tokenizer",
                    EOT_CANDIDATES.join(" ")
                ))
            })?,
        };
        Tokenizer::Bpe { tok: Box::new(tok), eot_id }.with_checked_ids()
    }

    /// `self` if every token id of a BPE tokenizer is usable. Ids index the model's embedding
    /// rows: each must be below the vocabulary size, and that size must be one a model can have
    /// (a damaged id of 2^31 would otherwise size the embedding, or the vocabulary list written
    /// with the tokenizer).
    fn with_checked_ids(self) -> Result<Self> {
        let n = self.vocab_size();
        if n > MAX_VOCAB {
            return Err(Error::Tokenizer(format!("{n} tokens is above the supported {MAX_VOCAB}")));
        }
        if let Tokenizer::Bpe { tok, .. } = &self {
            if let Some((name, id)) = tok.get_vocab(true).into_iter().find(|(_, id)| *id as usize >= n) {
                return Err(Error::Tokenizer(format!(
                    "token {name:?} has id {id}, outside the vocabulary of {n} (ids must run from 0 without gaps)"
                )));
            }
        }
        Ok(self)
    }

    /// The wrapped HF tokenizer, for a BPE tokenizer.
    pub fn hf(&self) -> Option<&tokenizers::Tokenizer> {
        match self {
            Tokenizer::Bpe { tok, .. } => Some(tok),
            _ => None,
        }
    }

    pub fn vocab_size(&self) -> usize {
        match self {
            Tokenizer::Byte => 257,
            Tokenizer::Char { chars, .. } => chars.len() + 2,
            Tokenizer::Bpe { tok, .. } => {
                // Added tokens may sit above the model's ids; count up to the highest one.
                let max_added = tok.get_added_tokens_decoder().keys().map(|&id| id as usize + 1).max();
                tok.get_vocab_size(true).max(max_added.unwrap_or(0))
            }
        }
    }

    pub fn eot_id(&self) -> u32 {
        match self {
            Tokenizer::Byte => BYTE_EOT,
            Tokenizer::Char { .. } => CHAR_EOT,
            Tokenizer::Bpe { eot_id, .. } => *eot_id,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Tokenizer::Byte => "byte",
            Tokenizer::Char { .. } => "char",
            Tokenizer::Bpe { .. } => "bpe",
        }
    }

    /// Token ids of `text`, without any BOS/EOS (the data pipeline appends `eot_id` itself).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        match self {
            Tokenizer::Byte => Ok(text.bytes().map(u32::from).collect()),
            Tokenizer::Char { index, .. } => Ok(text.chars().map(|c| *index.get(&c).unwrap_or(&CHAR_UNK)).collect()),
            Tokenizer::Bpe { tok, .. } => Ok(tok.encode_fast(text, false).map_err(tok_err)?.get_ids().to_vec()),
        }
    }

    /// The distinct characters of `text` that a char tokenizer has no id for (each becomes
    /// `<|unk|>`), in order of first appearance; empty for byte and BPE tokenizers, which
    /// encode any text.
    pub fn unknown_chars(&self, text: &str) -> Vec<char> {
        let mut out: Vec<char> = vec![];
        if let Tokenizer::Char { index, .. } = self {
            for c in text.chars() {
                if !index.contains_key(&c) && !out.contains(&c) {
                    out.push(c);
                }
            }
        }
        out
    }

    /// `encode` for many texts; BPE encodes them in parallel.
    pub fn encode_batch(&self, texts: &[String]) -> Result<Vec<Vec<u32>>> {
        match self {
            Tokenizer::Bpe { tok, .. } => {
                let inputs: Vec<&str> = texts.iter().map(String::as_str).collect();
                let encs = tok.encode_batch_fast(inputs, false).map_err(tok_err)?;
                Ok(encs.into_iter().map(|e| e.get_ids().to_vec()).collect())
            }
            _ => texts.iter().map(|t| self.encode(t)).collect(),
        }
    }

    fn check_ids(&self, ids: &[u32]) -> Result<()> {
        let v = self.vocab_size();
        match ids.iter().find(|&&id| id as usize >= v) {
            Some(id) => Err(Error::Tokenizer(format!(
                "token id {id} is outside the vocabulary of {v} tokens ({} tokenizer)",
                self.kind()
            ))),
            None => Ok(()),
        }
    }

    /// Text of `ids`; special tokens appear by name (`<|eot|>`), invalid UTF-8 from byte
    /// tokens is replaced by U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.check_ids(ids)?;
        match self {
            Tokenizer::Byte => {
                let mut out = String::new();
                for part in ids.split_inclusive(|&id| id == BYTE_EOT) {
                    let (bytes, eot) = match part.split_last() {
                        Some((&BYTE_EOT, rest)) => (rest, true),
                        _ => (part, false),
                    };
                    let bytes: Vec<u8> = bytes.iter().map(|&b| b as u8).collect();
                    out.push_str(&String::from_utf8_lossy(&bytes));
                    if eot {
                        out.push_str(EOT);
                    }
                }
                Ok(out)
            }
            Tokenizer::Char { chars, .. } => Ok(ids
                .iter()
                .map(|&id| match id {
                    CHAR_EOT => EOT.to_string(),
                    CHAR_UNK => UNK.to_string(),
                    _ => chars[id as usize - 2].to_string(),
                })
                .collect()),
            Tokenizer::Bpe { tok, .. } => tok.decode(ids, false).map_err(tok_err),
        }
    }

    /// A display form of one token for per-token colouring: its text when that is valid UTF-8
    /// on its own, `<0xNN>` for a lone byte, the vocabulary entry otherwise, `<?N>` for an id
    /// outside the vocabulary.
    pub fn token_text(&self, id: u32) -> String {
        if id as usize >= self.vocab_size() {
            return format!("<?{id}>");
        }
        match self {
            Tokenizer::Byte if id < 128 => (id as u8 as char).to_string(),
            Tokenizer::Byte if id < 256 => format!("<0x{id:02X}>"),
            Tokenizer::Bpe { tok, .. } => {
                let raw = tok.id_to_token(id);
                match tok.decode(&[id], false) {
                    // A SentencePiece decoder drops the word-start space of a lone first token.
                    Ok(s)
                        if raw.as_deref().is_some_and(|r| r.starts_with('\u{2581}'))
                            && !s.starts_with(' ')
                            && !s.contains('\u{FFFD}') =>
                    {
                        format!(" {s}")
                    }
                    Ok(s) if !s.is_empty() && !s.contains('\u{FFFD}') => s,
                    _ => raw.unwrap_or_else(|| format!("<?{id}>")),
                }
            }
            _ => self.decode(&[id]).unwrap_or_else(|_| format!("<?{id}>")),
        }
    }

    /// The canonical JSON (keys sorted, no whitespace) shared by all kinds.
    pub fn to_json(&self) -> Result<String> {
        let v = match self {
            Tokenizer::Byte => json!({"format": FORMAT, "version": FORMAT_VERSION, "kind": "byte"}),
            Tokenizer::Char { chars, .. } => {
                let chars: Vec<String> = chars.iter().map(|c| c.to_string()).collect();
                json!({"format": FORMAT, "version": FORMAT_VERSION, "kind": "char", "chars": chars})
            }
            Tokenizer::Bpe { tok, eot_id } => {
                let hf: Value = serde_json::from_str(&tok.to_string(false).map_err(tok_err)?).map_err(tok_err)?;
                json!({"format": FORMAT, "version": FORMAT_VERSION, "kind": "bpe",
                       "eot_id": eot_id, "hf": hf})
            }
        };
        // Keys sorted at every level, so this string (and the fingerprint hashed from it) is
        // canonical whatever order the maps keep: serde_json's `preserve_order` (on for the
        // server's ordered `top_logprobs`) would otherwise change every tokenizer's fingerprint
        // and orphan every prepared dataset and checkpoint made before.
        Ok(sorted_keys(v).to_string())
    }

    /// Parse our JSON format, or a plain HF `tokenizer.json` (end-of-text token found by name).
    pub fn from_json(s: &str) -> Result<Self> {
        let v: Value = serde_json::from_str(s).map_err(|e| Error::Tokenizer(format!("not valid JSON: {e}")))?;
        if v.get("format").and_then(Value::as_str) != Some(FORMAT) {
            if v.get("model").is_some() {
                let tok: tokenizers::Tokenizer =
                    s.parse().map_err(|e| Error::Tokenizer(format!("not a usable HF tokenizer.json: {e}")))?;
                return Self::from_hf(tok, None);
            }
            return Err(Error::Tokenizer("neither an itt tokenizer file nor an HF tokenizer.json".into()));
        }
        let version = v.get("version").and_then(Value::as_u64).unwrap_or(0);
        if version != FORMAT_VERSION {
            return Err(Error::Tokenizer(format!(
                "file format version {version}, this build reads {FORMAT_VERSION}; re-create the tokenizer"
            )));
        }
        let field = |name: &str| v.get(name).ok_or_else(|| Error::Tokenizer(format!("field `{name}` is missing")));
        match field("kind")?.as_str() {
            Some("byte") => Ok(Tokenizer::Byte),
            Some("char") => {
                let list = field("chars")?
                    .as_array()
                    .ok_or_else(|| Error::Tokenizer("field `chars` must be a list of one-char strings".into()))?;
                let mut chars = Vec::with_capacity(list.len());
                for item in list {
                    let mut it = item.as_str().unwrap_or("").chars();
                    match (it.next(), it.next()) {
                        (Some(c), None) => chars.push(c),
                        _ => return Err(Error::Tokenizer(format!("field `chars`: {item} is not a one-char string"))),
                    }
                }
                let tok = Self::char_from_chars(chars.iter().copied());
                match &tok {
                    Tokenizer::Char { chars: sorted, .. } if *sorted == chars => Ok(tok),
                    _ => Err(Error::Tokenizer("field `chars` must be sorted and without duplicates".into())),
                }
            }
            Some("bpe") => {
                let eot_id = field("eot_id")?
                    .as_u64()
                    .filter(|&x| x <= u32::MAX as u64)
                    .ok_or_else(|| Error::Tokenizer("field `eot_id` must be a token id".into()))?;
                let tok: tokenizers::Tokenizer = serde_json::from_value(field("hf")?.clone())
                    .map_err(|e| Error::Tokenizer(format!("field `hf`: {e}")))?;
                let t = Tokenizer::Bpe { tok: Box::new(tok), eot_id: eot_id as u32 };
                if eot_id as usize >= t.vocab_size() {
                    return Err(Error::Tokenizer(format!(
                        "field `eot_id` {eot_id} is outside the vocabulary of {}",
                        t.vocab_size()
                    )));
                }
                t.with_checked_ids()
            }
            _ => Err(Error::Tokenizer("field `kind` must be \"byte\", \"char\" or \"bpe\"".into())),
        }
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).at(dir)?;
        }
        let json = self.to_json()?;
        crate::base::util::write_atomic(path, |w| std::io::Write::write_all(w, json.as_bytes()))
    }

    /// Load our tokenizer file or a plain HF `tokenizer.json`.
    pub fn load(path: &Path) -> Result<Self> {
        let s = std::fs::read_to_string(path).at(path)?;
        Self::from_json(&s).map_err(|e| match e {
            Error::Tokenizer(msg) => Error::input(path, msg),
            e => e,
        })
    }

    /// sha256 (hex) of the canonical JSON.
    pub fn fingerprint(&self) -> String {
        // to_json only fails if the HF tokenizer cannot serialise itself; hash the kind then.
        let json = self.to_json().unwrap_or_else(|e| format!("{}:{e}", self.kind()));
        let digest = Sha256::digest(json.as_bytes());
        digest.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// `v` with the keys of every object in sorted order (byte order of the key strings, as a
/// `BTreeMap` keeps them).
fn sorted_keys(v: Value) -> Value {
    match v {
        Value::Object(map) => {
            let mut entries: Vec<(String, Value)> = map.into_iter().collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            Value::Object(entries.into_iter().map(|(k, v)| (k, sorted_keys(v))).collect())
        }
        Value::Array(items) => Value::Array(items.into_iter().map(sorted_keys).collect()),
        other => other,
    }
}

/// Build a tokenizer from a command-line spec: `byte`, `char` (the chars of `docs`), `bpe:N`
/// (train a BPE of N tokens on `docs`) or a path to a tokenizer file.
pub fn from_spec(spec: &str, docs: &[String]) -> Result<Tokenizer> {
    match spec {
        "byte" => Ok(Tokenizer::byte()),
        "char" => Ok(Tokenizer::char_from_chars(docs.iter().flat_map(|d| d.chars()))),
        _ => {
            if let Some(n) = spec.strip_prefix("bpe:") {
                let n: usize = n.parse().map_err(|_| {
                    Error::config("tokenizer", format!("`{spec}`: write bpe:N with N a number, e.g. bpe:4096"))
                })?;
                return Tokenizer::train_bpe(docs, n, 2);
            }
            let path = Path::new(spec);
            if path.exists() {
                Tokenizer::load(path)
            } else {
                Err(Error::config(
                    "tokenizer",
                    format!("`{spec}` is not byte, char, bpe:N or an existing tokenizer file"),
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "The quick brown fox jumps over the lazy dog.\nThe dog sleeps; the fox runs.\n\
        Ünïcödé → ✓ and emoji 🦀 too.\n347+589=936 sort 5 3 9 1 = 1 3 5 9\n";

    fn docs() -> Vec<String> {
        (0..20).map(|i| format!("{TEXT}line {i}: the the the fox fox\n")).collect()
    }

    #[test]
    fn byte_round_trip_and_eot() {
        let t = Tokenizer::byte();
        let ids = t.encode(TEXT).unwrap();
        assert_eq!(ids.len(), TEXT.len());
        assert_eq!(t.decode(&ids).unwrap(), TEXT);
        assert_eq!(t.vocab_size(), 257);
        assert_eq!(t.decode(&[104, 105, 256, 33]).unwrap(), "hi<|eot|>!");
        assert_eq!(t.decode(&[0xF0, 0x9F]).unwrap(), "\u{FFFD}");
        assert!(t.decode(&[257]).is_err());
        assert_eq!(t.token_text(65), "A");
        assert_eq!(t.token_text(0xE2), "<0xE2>");
        assert_eq!(t.token_text(256), EOT);
    }

    #[test]
    fn char_round_trip_and_unknown() {
        let t = Tokenizer::char_from_text(TEXT);
        let ids = t.encode(TEXT).unwrap();
        assert_eq!(ids.len(), TEXT.chars().count());
        assert_eq!(t.decode(&ids).unwrap(), TEXT);
        assert!(ids.iter().all(|&i| i >= 2));
        let ids = t.encode("fox#").unwrap();
        assert_eq!(ids[3], 1);
        assert_eq!(t.decode(&ids).unwrap(), "fox<|unk|>");
        assert_eq!(t.unknown_chars("fox#@#"), vec!['#', '@']);
        assert!(t.unknown_chars(TEXT).is_empty());
        assert!(Tokenizer::Byte.unknown_chars("é#").is_empty());
        assert_eq!(t.eot_id(), 0);
        assert_eq!(t.token_text(t.encode("q").unwrap()[0]), "q");
    }

    #[test]
    fn bpe_round_trip_and_compresses() {
        let t = Tokenizer::train_bpe(&docs(), 300, 2).unwrap();
        assert_eq!(t.kind(), "bpe");
        assert!(t.vocab_size() <= 300 && t.vocab_size() > 258, "{}", t.vocab_size());
        let ids = t.encode(TEXT).unwrap();
        assert!(ids.len() < TEXT.len(), "no merges learned");
        assert_eq!(t.decode(&ids).unwrap(), TEXT);
        let eot = t.eot_id();
        assert_eq!(t.token_text(eot), EOT);
        assert_eq!(t.decode(&[eot]).unwrap(), EOT);
        let batch = t.encode_batch(&docs()).unwrap();
        assert_eq!(batch[3], t.encode(&docs()[3]).unwrap());
        // Text outside the training data still round-trips through the byte alphabet.
        let odd = "zzz ϕ 中文 \t\r\n";
        assert_eq!(t.decode(&t.encode(odd).unwrap()).unwrap(), odd);
    }

    #[test]
    fn canonical_json_has_sorted_keys_at_every_level() {
        // The fingerprints of datasets and checkpoints made so far hash this exact string.
        fn check(v: &Value) {
            match v {
                Value::Object(m) => {
                    let keys: Vec<&String> = m.keys().collect();
                    let mut want = keys.clone();
                    want.sort();
                    assert_eq!(keys, want);
                    m.values().for_each(check);
                }
                Value::Array(a) => a.iter().for_each(check),
                _ => {}
            }
        }
        let docs = vec!["the cat sat on the mat; the dog sat on the log".to_string(); 4];
        for t in [Tokenizer::byte(), Tokenizer::char_from_text("ba"), from_spec("bpe:300", &docs).unwrap()] {
            let s = t.to_json().unwrap();
            // Parsed in file order (preserve_order keeps it), then checked.
            check(&serde_json::from_str::<Value>(&s).unwrap());
        }
        let c = Tokenizer::char_from_text("ba").to_json().unwrap();
        assert_eq!(c, r#"{"chars":["a","b"],"format":"itt-tokenizer","kind":"char","version":1}"#);
        // Pinned: the sha256 of Python's json.dumps(..., sort_keys=True, separators=(",", ":"))
        // of the same objects, the fingerprints every dataset made so far carries.
        assert_eq!(
            Tokenizer::char_from_text("ba").fingerprint(),
            "63b686eef67c8fa45b5617192693061bf9dd65e9ced118ce1cdf02214890b52e"
        );
        assert_eq!(Tokenizer::byte().fingerprint(), "9b294b6848186ac32610107ed69dbb45fc0c94e79fcc87652a44b012d1f956b1");
    }

    #[test]
    fn json_round_trip_and_fingerprints() {
        let dir = tempfile::tempdir().unwrap();
        let kinds =
            [Tokenizer::byte(), Tokenizer::char_from_text(TEXT), Tokenizer::train_bpe(&docs(), 300, 2).unwrap()];
        let mut prints = Vec::new();
        for t in &kinds {
            let path = dir.path().join(format!("{}.json", t.kind()));
            t.save(&path).unwrap();
            let u = Tokenizer::load(&path).unwrap();
            assert_eq!(u.to_json().unwrap(), t.to_json().unwrap());
            assert_eq!(u.fingerprint(), t.fingerprint());
            assert_eq!(u.vocab_size(), t.vocab_size());
            assert_eq!(u.eot_id(), t.eot_id());
            assert_eq!(u.encode(TEXT).unwrap(), t.encode(TEXT).unwrap());
            assert_eq!(t.fingerprint().len(), 64);
            prints.push(t.fingerprint());
        }
        prints.dedup();
        assert_eq!(prints.len(), 3);
        // Training is deterministic, so the fingerprint is stable across runs.
        let again = Tokenizer::train_bpe(&docs(), 300, 2).unwrap();
        assert_eq!(again.fingerprint(), kinds[2].fingerprint());
        assert_ne!(Tokenizer::char_from_text("ab").fingerprint(), kinds[1].fingerprint());
    }

    #[test]
    fn loads_plain_hf_json_with_other_eot_name() {
        let t = Tokenizer::train_bpe(&docs(), 300, 2).unwrap();
        let hf = t.hf().unwrap().to_string(false).unwrap().replace(EOT, "</s>");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        std::fs::write(&path, &hf).unwrap();
        let u = Tokenizer::load(&path).unwrap();
        assert_eq!(u.eot_id(), t.eot_id());
        assert_eq!(u.token_text(u.eot_id()), "</s>");
        assert_eq!(u.encode(TEXT).unwrap(), t.encode(TEXT).unwrap());
    }

    /// A LLaMA-style SentencePiece BPE (Metaspace, `</s>`), as a plain HF tokenizer.json.
    const SPM_JSON: &str = r#"{"version":"1.0","truncation":null,"padding":null,
      "added_tokens":[
        {"id":0,"content":"<unk>","single_word":false,"lstrip":false,"rstrip":false,"normalized":false,"special":true},
        {"id":1,"content":"<s>","single_word":false,"lstrip":false,"rstrip":false,"normalized":false,"special":true},
        {"id":2,"content":"</s>","single_word":false,"lstrip":false,"rstrip":false,"normalized":false,"special":true}],
      "normalizer":null,
      "pre_tokenizer":{"type":"Metaspace","replacement":"\u2581","prepend_scheme":"first","split":true},
      "post_processor":null,
      "decoder":{"type":"Metaspace","replacement":"\u2581","prepend_scheme":"first","split":true},
      "model":{"type":"BPE","dropout":null,"unk_token":"<unk>","continuing_subword_prefix":null,
        "end_of_word_suffix":null,"fuse_unk":true,"byte_fallback":false,
        "vocab":{"<unk>":0,"<s>":1,"</s>":2,"\u2581":3,"t":4,"h":5,"e":6,"c":7,"a":8,
                 "\u2581t":9,"\u2581th":10,"\u2581the":11,"\u2581c":12,"at":13,"\u2581cat":14},
        "merges":["\u2581 t","\u2581t h","\u2581th e","\u2581 c","a t","\u2581c at"]}}"#;

    #[test]
    fn wraps_a_sentencepiece_style_hf_tokenizer() {
        let t = Tokenizer::from_json(SPM_JSON).unwrap();
        assert_eq!((t.kind(), t.eot_id(), t.vocab_size()), ("bpe", 2, 15));
        let ids = t.encode("the cat").unwrap();
        assert_eq!(ids, [11, 14]);
        assert_eq!(t.decode(&ids).unwrap(), "the cat");
        assert_eq!(t.token_text(11), " the");
        assert_eq!(t.token_text(2), "</s>");
        let u = Tokenizer::from_json(&t.to_json().unwrap()).unwrap();
        assert_eq!(u.fingerprint(), t.fingerprint());
        assert_eq!(u.encode("the cat").unwrap(), ids);
    }

    #[test]
    fn bad_inputs_are_errors() {
        assert!(Tokenizer::from_json("{").is_err());
        assert!(Tokenizer::from_json(r#"{"format":"itt-tokenizer","version":9,"kind":"byte"}"#).is_err());
        assert!(Tokenizer::from_json(r#"{"format":"itt-tokenizer","version":1,"kind":"x"}"#).is_err());
        assert!(
            Tokenizer::from_json(r#"{"format":"itt-tokenizer","version":1,"kind":"char","chars":["b","a"]}"#).is_err()
        );
        assert!(Tokenizer::train_bpe(&docs(), 100, 2).is_err());
        assert!(Tokenizer::load(Path::new("/nonexistent/tok.json")).is_err());
        assert!(from_spec("bpe:x", &docs()).is_err());
        assert!(from_spec("nonexistent-spec", &docs()).is_err());
        assert_eq!(from_spec("byte", &docs()).unwrap().kind(), "byte");
        let c = from_spec("char", &docs()).unwrap();
        assert_eq!(c.decode(&c.encode(&docs()[0]).unwrap()).unwrap(), docs()[0]);
    }
}
