//! Seeing the thinking (issue 8): per-token depth maps, router statistics, the paper's
//! gradient-spike study (DESIGN §10) and training-run reports, as JSON plus pictures.
//!
//! - `depth`: steps each token took in each thinking layer -> HTML, PNG heat map, terminal, JSON.
//! - `router`: router weights, shares, step overlap, phi norms, depth by token type -> PNG, JSON.
//! - `grad_spikes`: nuclear norm of attention-weight gradients on easy vs hard samples.
//! - `run_report`: one self-contained HTML page for a training run folder.
//! - `linalg`: the symmetric Jacobi eigen-solver behind the nuclear norm.
//! - `plot`: PNG charts (plotters, embedded font).
//!
//! Everything here reads the model through its public API and the `ForwardRecord` the
//! thinking layers fill in, so what is drawn is what the model did.

pub mod depth;
pub mod grad_spikes;
pub mod linalg;
pub mod plot;
pub mod router;
pub mod run_report;
pub mod tokens;

use crate::base::error::IoContext;
use crate::data::Tokenizer;
use crate::{Error, Result};
use std::path::Path;

/// Write `value` as pretty JSON to `path`.
pub fn write_json(path: &Path, value: &impl serde::Serialize) -> Result<()> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| Error::usage(format!("cannot serialise {}: {e}", path.display())))?;
    std::fs::write(path, text).at(path)
}

/// Create the output folder (and parents); refuse a path that is a file.
pub fn prepare_out(dir: &Path) -> Result<()> {
    if dir.is_file() {
        return Err(Error::input(dir, "is a file; --out must be a folder"));
    }
    std::fs::create_dir_all(dir).at(dir)
}

/// Standard base64 with padding (RFC 4648), for `data:` URLs in self-contained pages.
pub fn base64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for c in bytes.chunks(3) {
        let n = (c[0] as u32) << 16 | (*c.get(1).unwrap_or(&0) as u32) << 8 | *c.get(2).unwrap_or(&0) as u32;
        out.push(A[(n >> 18) as usize & 63] as char);
        out.push(A[(n >> 12) as usize & 63] as char);
        out.push(if c.len() > 1 { A[(n >> 6) as usize & 63] as char } else { '=' });
        out.push(if c.len() > 2 { A[n as usize & 63] as char } else { '=' });
    }
    out
}

/// Escape text for HTML element content and attribute values.
pub fn html_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(c),
        }
    }
    out
}

/// A token's text with invisible characters made visible (newline ⏎, tab ⇥, other control
/// characters as U+2400 pictures); spaces are kept.
pub fn visible(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            '\n' => '⏎',
            '\t' => '⇥',
            '\r' => '␍',
            c if (c as u32) < 0x20 => char::from_u32(0x2400 + c as u32).unwrap_or('?'),
            c => c,
        })
        .collect()
}

/// RGB of depth `d` (1..=max): a ramp from pale blue-grey (one step, i.e. no extra thinking)
/// through yellow to dark red (every step). Shared by the PNG and HTML pictures.
pub fn depth_rgb(d: u32, max: u32) -> (u8, u8, u8) {
    const RAMP: [(f64, f64, f64); 4] =
        [(226.0, 232.0, 240.0), (255.0, 224.0, 130.0), (244.0, 130.0, 60.0), (165.0, 15.0, 21.0)];
    let t = if max <= 1 { 0.0 } else { (d.saturating_sub(1) as f64 / (max - 1) as f64).clamp(0.0, 1.0) };
    let x = t * (RAMP.len() - 1) as f64;
    let i = (x.floor() as usize).min(RAMP.len() - 2);
    let f = x - i as f64;
    let lerp = |a: f64, b: f64| (a + (b - a) * f).round() as u8;
    (lerp(RAMP[i].0, RAMP[i + 1].0), lerp(RAMP[i].1, RAMP[i + 1].1), lerp(RAMP[i].2, RAMP[i + 1].2))
}

/// Whether text on the depth colour of `d` should be white (dark background) for contrast.
pub fn depth_needs_light_text(d: u32, max: u32) -> bool {
    let (r, g, b) = depth_rgb(d, max);
    // Rec. 601 luma.
    (0.299 * r as f64 + 0.587 * g as f64 + 0.114 * b as f64) < 110.0
}

/// What a token's text is made of, for "which tokens think more" (router analysis).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CharClass {
    /// Only whitespace (spaces, newlines).
    Whitespace,
    /// Digits (optionally with surrounding whitespace).
    Digits,
    /// Letters (optionally with a leading word-start space, as BPE tokens have).
    Letters,
    /// Punctuation and symbols: brackets, operators, `=`.
    Punctuation,
    /// A mix of the above, or special tokens.
    Mixed,
}

impl CharClass {
    pub const ALL: [CharClass; 5] =
        [CharClass::Whitespace, CharClass::Digits, CharClass::Letters, CharClass::Punctuation, CharClass::Mixed];

    pub fn of(text: &str) -> CharClass {
        let core: Vec<char> = text.chars().filter(|c| !c.is_whitespace()).collect();
        if text.is_empty() {
            CharClass::Mixed
        } else if core.is_empty() {
            CharClass::Whitespace
        } else if core.iter().all(|c| c.is_numeric()) {
            CharClass::Digits
        } else if core.iter().all(|c| c.is_alphabetic()) {
            CharClass::Letters
        } else if core.iter().all(|c| !c.is_alphanumeric()) {
            CharClass::Punctuation
        } else {
            CharClass::Mixed
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            CharClass::Whitespace => "whitespace",
            CharClass::Digits => "digits",
            CharClass::Letters => "letters",
            CharClass::Punctuation => "punctuation",
            CharClass::Mixed => "mixed",
        }
    }
}

/// Token ids of `text` with each token's byte range in `text`. Char and byte tokenizers map
/// one to one; a BPE tokenizer reports its offsets (the slow path, which keeps them).
pub fn encode_with_offsets(tok: &Tokenizer, text: &str) -> Result<(Vec<u32>, Vec<std::ops::Range<usize>>)> {
    match tok {
        Tokenizer::Byte => Ok((text.bytes().map(u32::from).collect(), (0..text.len()).map(|i| i..i + 1).collect())),
        Tokenizer::Char { .. } => {
            let ids = tok.encode(text)?;
            let ranges = text.char_indices().map(|(i, c)| i..i + c.len_utf8()).collect();
            Ok((ids, ranges))
        }
        Tokenizer::Bpe { tok: hf, .. } => {
            let enc = hf.encode(text, false).map_err(|e| Error::Tokenizer(e.to_string()))?;
            Ok((enc.get_ids().to_vec(), enc.get_offsets().iter().map(|&(a, b)| a..b).collect()))
        }
    }
}

/// Text to analyse, from `--text` or `--data` (a file, folder, .jsonl, or `builtin`).
pub fn read_text(text: Option<&str>, data: Option<&str>, max_bytes: Option<u64>) -> Result<String> {
    let s = match (text, data) {
        (Some(t), None) => t.to_string(),
        (None, Some(d)) => {
            let opts = crate::data::CorpusOptions { max_bytes, ..Default::default() };
            crate::data::read_corpus(Path::new(d), &opts)?.join("\n")
        }
        _ => return Err(Error::usage("give exactly one of --text or --data")),
    };
    if s.trim().is_empty() {
        return Err(Error::usage(
            "the text to analyse is empty; give some text with --text or a non-empty --data file",
        ));
    }
    Ok(s)
}

/// Documents to analyse: `builtin` yields the synthetic corpus with its held-out documents
/// first (the last 5% are the validation split of a run trained with the defaults), so the
/// statistics are measured mostly on text the model did not train on.
pub fn read_docs(data: &str) -> Result<(Vec<String>, bool)> {
    let builtin = matches!(data, "builtin" | "builtin:synthetic");
    let mut docs = crate::data::read_corpus(Path::new(data), &crate::data::CorpusOptions::default())?;
    if builtin {
        docs.reverse();
    }
    if docs.is_empty() {
        return Err(Error::input(data, "holds no text"));
    }
    Ok((docs, builtin))
}

/// Mean and (population) standard deviation.
pub fn mean_std(v: &[f64]) -> (f64, f64) {
    if v.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let m = v.iter().sum::<f64>() / v.len() as f64;
    let var = v.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / v.len() as f64;
    (m, var.sqrt())
}

#[cfg(test)]
pub(crate) mod testutil {
    //! Tiny random checkpoints for the analysis tests: no training, a few milliseconds each.
    use crate::base::config::{self, ModelKind, RunConfig};
    use crate::checkpoint::{self, SaveParts};
    use crate::data::Tokenizer;
    use crate::model::{ForwardRecord, Model, RouterCalibration, RoutingOptions, SeqLayout};
    use candle_core::{Device, Tensor};
    use std::path::{Path, PathBuf};

    pub const ALPHABET: &str = "0123456789abcdefghijklmnopqrstuvwxyz()[]{}<>+-= \n";

    pub fn tiny_config(kind: ModelKind, vocab: usize) -> RunConfig {
        let name = match kind {
            ModelKind::Dense => "tiny",
            ModelKind::Loop => "tiny-loop3",
            ModelKind::Itt => "tiny-itt4",
        };
        let mut cfg = config::preset(name).unwrap();
        cfg.model = config::TestModel::preset(name).vocab(vocab).width(32, 64).heads(2, 2).context(64).config();
        cfg.train.seq_len = 32;
        cfg.train.batch_size = 2;
        cfg
    }

    /// A run folder `dir` holding one random checkpoint (with router thresholds for ITT), a
    /// few metrics lines, and a prepared-data marker naming the builtin corpus.
    pub fn tiny_run(dir: &Path, kind: ModelKind, seed: u64) -> (PathBuf, Model, Tokenizer) {
        let tok = Tokenizer::char_from_text(ALPHABET);
        let cfg = tiny_config(kind, tok.vocab_size());
        let model = Model::new(&cfg.model, seed, &Device::Cpu).unwrap();
        let calibration = model.has_routers().then(|| {
            let mut rec = ForwardRecord::with_scores();
            let ids: Vec<u32> = tok.encode("12+34=46\nrev abc = cba\nsort 3 1 2 = 1 2 3\n").unwrap();
            let x = Tensor::from_slice(&ids, ids.len(), &Device::Cpu).unwrap();
            model
                .forward(&x, &SeqLayout::uniform(1, ids.len()), &RoutingOptions::default(), None, Some(&mut rec))
                .unwrap();
            let mut c = RouterCalibration::new();
            c.update(&mut rec, 0.0);
            c
        });
        let ck = dir.join("checkpoints").join("step-00000010");
        let tj = tok.to_json().unwrap();
        checkpoint::save(
            &ck,
            &model,
            &SaveParts {
                config: &cfg,
                tokenizer_json: &tj,
                optimizer: None,
                state: None,
                calibration: calibration.as_ref(),
            },
        )
        .unwrap();
        checkpoint::set_latest(dir, &ck).unwrap();
        std::fs::write(dir.join("config.json"), cfg.to_json()).unwrap();
        let mut metrics = String::new();
        for step in 1..=10 {
            let routing = if kind == ModelKind::Itt {
                r#"[{"layer":1,"step":2,"selected":20,"candidates":32,"share":0.625,"w_mean":0.5,"w_std":0.01,"overlap_prev":0.0},
                    {"layer":1,"step":3,"selected":20,"candidates":32,"share":0.625,"w_mean":0.49,"w_std":0.01,"overlap_prev":0.6}]"#
                    .replace('\n', "")
            } else {
                "[]".into()
            };
            let phi = if kind == ModelKind::Itt { "[[1,[1.0,0.1,0.1,0.1]],[3,[1.0,0.1,0.1,0.1]]]" } else { "[]" };
            metrics.push_str(&format!(
                "{{\"step\":{step},\"loss\":{},\"lr\":0.001,\"grad_norm\":1.0,\"tokens_seen\":{},\"tokens_per_s\":1000.0,\"elapsed_s\":{},\"flops_per_token\":1e6,\"routing\":{routing},\"phi_rms\":{phi}}}\n",
                4.0 - 0.1 * step as f64,
                64 * step,
                0.1 * step as f64
            ));
            if step % 5 == 0 {
                metrics.push_str(&format!(
                    "{{\"step\":{step},\"val_loss\":{},\"val_ppl\":30.0,\"tokens_seen\":{}}}\n",
                    3.9 - 0.1 * step as f64,
                    64 * step
                ));
            }
        }
        std::fs::write(dir.join("metrics.jsonl"), metrics).unwrap();
        (ck, model, tok)
    }

    /// Checks that `html` is well formed: every non-void tag closed in order, no stray `<`.
    pub fn assert_well_formed_html(html: &str) {
        assert!(html.starts_with("<!DOCTYPE html>"), "no doctype");
        const VOID: &[&str] = &["meta", "br", "img", "hr", "input", "link", "col", "wbr"];
        let mut stack: Vec<String> = vec![];
        let mut rest = html;
        let mut in_raw: Option<String> = None;
        while let Some(i) = rest.find('<') {
            let after = &rest[i + 1..];
            let end =
                after.find('>').unwrap_or_else(|| panic!("unclosed '<' near {:?}", &after[..after.len().min(60)]));
            let tag = &after[..end];
            rest = &after[end + 1..];
            if let Some(raw) = &in_raw {
                if tag.trim_start_matches('/').split_whitespace().next() == Some(raw.as_str()) && tag.starts_with('/') {
                    assert_eq!(stack.pop().as_deref(), Some(raw.as_str()));
                    in_raw = None;
                }
                continue;
            }
            if tag.starts_with('!') {
                continue;
            }
            let name = tag
                .trim_start_matches('/')
                .split(|c: char| c.is_whitespace() || c == '/')
                .next()
                .unwrap()
                .to_lowercase();
            assert!(!name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric()), "bad tag <{tag}>");
            if tag.starts_with('/') {
                assert_eq!(stack.pop().as_deref(), Some(name.as_str()), "mismatched </{name}>");
            } else if !VOID.contains(&name.as_str()) && !tag.ends_with('/') {
                if name == "script" || name == "style" {
                    in_raw = Some(name.clone());
                }
                stack.push(name);
            }
        }
        assert!(stack.is_empty(), "unclosed tags {stack:?}");
    }

    pub fn assert_png(path: &Path, min_bytes: usize) {
        let b = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(&b[..8], b"\x89PNG\r\n\x1a\n", "{} is not a PNG", path.display());
        assert!(b.len() >= min_bytes, "{} has only {} bytes", path.display(), b.len());
        // IHDR: width and height, big-endian, at bytes 16..24.
        let w = u32::from_be_bytes(b[16..20].try_into().unwrap());
        let h = u32::from_be_bytes(b[20..24].try_into().unwrap());
        assert!(w >= 100 && h >= 100 && w <= 8000 && h <= 20000, "{}: {w}x{h}", path.display());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (i, o) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(i.as_bytes()), o);
        }
    }

    #[test]
    fn classes_escape_and_colours() {
        assert_eq!(CharClass::of(" "), CharClass::Whitespace);
        assert_eq!(CharClass::of("\n"), CharClass::Whitespace);
        assert_eq!(CharClass::of("42"), CharClass::Digits);
        assert_eq!(CharClass::of(" the"), CharClass::Letters);
        assert_eq!(CharClass::of("(["), CharClass::Punctuation);
        assert_eq!(CharClass::of("a1"), CharClass::Mixed);
        assert_eq!(html_escape("<a href=\"x\">&'"), "&lt;a href=&quot;x&quot;&gt;&amp;&#39;");
        assert_eq!(visible("a\nb\t"), "a⏎b⇥");
        assert_eq!(depth_rgb(1, 4), (226, 232, 240));
        assert_eq!(depth_rgb(4, 4), (165, 15, 21));
        assert_eq!(depth_rgb(1, 1), (226, 232, 240));
        assert!(depth_needs_light_text(4, 4) && !depth_needs_light_text(2, 4) && !depth_needs_light_text(1, 4));
    }

    #[test]
    fn offsets_cover_the_text() {
        let tok = Tokenizer::char_from_text("abc é\n");
        let (ids, r) = encode_with_offsets(&tok, "é a\n").unwrap();
        assert_eq!(ids.len(), 4);
        assert_eq!(r, vec![0..2, 2..3, 3..4, 4..5]);
        assert!(read_text(Some("  \n"), None, None).unwrap_err().to_string().contains("empty"));
        assert!(read_text(None, None, None).is_err());
    }
}
