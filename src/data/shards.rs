//! Token shards: a tokenized corpus stored compactly and read through a memory map, and the
//! batches drawn from them.
//!
//! Shard file layout (little-endian, 128-byte header, then the tokens):
//! ```text
//! 0..8     magic "ITTTOK01"
//! 8..12    format version u32 (= 1)
//! 12       token width u8: 2 (u16, vocab <= 65536) or 4 (u32)
//! 13..16   zero
//! 16..24   token count u64
//! 24..28   vocab size u32
//! 28..32   zero
//! 32..96   tokenizer fingerprint, ASCII (sha256 hex), zero-padded
//! 96..128  zero
//! 128..    tokens, `width` bytes each
//! ```
//! A prepared dataset is a folder with `train.bin`, `val.bin`, `meta.json` and the
//! `tokenizer.json` it was made with.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use serde::{Deserialize, Serialize};

use crate::base::error::IoContext;
use crate::base::rng::Rng;
use crate::base::util::write_atomic;
use crate::data::tokenizer::Tokenizer;
use crate::{Error, Result};

pub const SHARD_MAGIC: &[u8; 8] = b"ITTTOK01";
pub const SHARD_VERSION: u32 = 1;
pub const DATASET_VERSION: u32 = 1;
const HEADER_LEN: usize = 128;
const FINGERPRINT_LEN: usize = 64;

/// Write `tokens` as a shard. Every token must be below `vocab_size`.
pub fn write_shard(path: &Path, tokens: &[u32], vocab_size: usize, tokenizer_fingerprint: &str) -> Result<()> {
    if vocab_size == 0 || vocab_size > u32::MAX as usize {
        return Err(Error::usage(format!("shard {}: vocab size {vocab_size} must be in 1..2^32", path.display())));
    }
    if tokenizer_fingerprint.len() > FINGERPRINT_LEN || !tokenizer_fingerprint.is_ascii() {
        return Err(Error::usage(format!(
            "shard {}: the tokenizer fingerprint must be at most {FINGERPRINT_LEN} ASCII chars",
            path.display()
        )));
    }
    if let Some((i, t)) = tokens.iter().enumerate().find(|(_, &t)| t as usize >= vocab_size) {
        return Err(Error::usage(format!(
            "shard {}: token {t} at position {i} is outside the vocabulary of {vocab_size}",
            path.display()
        )));
    }
    let width: u8 = if vocab_size <= 1 << 16 { 2 } else { 4 };
    let mut header = [0u8; HEADER_LEN];
    header[0..8].copy_from_slice(SHARD_MAGIC);
    header[8..12].copy_from_slice(&SHARD_VERSION.to_le_bytes());
    header[12] = width;
    header[16..24].copy_from_slice(&(tokens.len() as u64).to_le_bytes());
    header[24..28].copy_from_slice(&(vocab_size as u32).to_le_bytes());
    header[32..32 + tokenizer_fingerprint.len()].copy_from_slice(tokenizer_fingerprint.as_bytes());
    write_atomic(path, |w| {
        w.write_all(&header)?;
        let mut buf = Vec::with_capacity(1 << 16);
        for chunk in tokens.chunks(1 << 14) {
            buf.clear();
            for &t in chunk {
                match width {
                    2 => buf.extend_from_slice(&(t as u16).to_le_bytes()),
                    _ => buf.extend_from_slice(&t.to_le_bytes()),
                }
            }
            w.write_all(&buf)?;
        }
        Ok(())
    })
}

/// A memory-mapped token shard.
pub struct TokenShard {
    path: PathBuf,
    mmap: Mmap,
    len: usize,
    width: usize,
    vocab_size: usize,
    fingerprint: String,
}

impl std::fmt::Debug for TokenShard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenShard")
            .field("path", &self.path)
            .field("len", &self.len)
            .field("width", &self.width)
            .field("vocab_size", &self.vocab_size)
            .field("fingerprint", &self.fingerprint)
            .finish()
    }
}

impl TokenShard {
    /// Map a shard, checking its magic, version and that its size matches its token count.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).at(path)?;
        // SAFETY: the map is read-only; shards are written to a temporary file and renamed into
        // place, so a file is never modified while mapped by this program.
        let mmap = unsafe { Mmap::map(&file) }.at(path)?;
        let redo = "re-create it with `itt prepare`";
        if mmap.len() < HEADER_LEN || &mmap[0..8] != SHARD_MAGIC {
            return Err(Error::input(path, format!("not an itt token shard (no ITTTOK01 header); {redo}")));
        }
        let u32_at = |o: usize| u32::from_le_bytes(mmap[o..o + 4].try_into().unwrap_or([0; 4]));
        let version = u32_at(8);
        if version != SHARD_VERSION {
            return Err(Error::input(
                path,
                format!("token shard format version {version}, this build reads {SHARD_VERSION}; {redo}"),
            ));
        }
        let width = mmap[12] as usize;
        if width != 2 && width != 4 {
            return Err(Error::input(
                path,
                format!("token width {width} is not 2 or 4; the header is corrupt; {redo}"),
            ));
        }
        let count = u64::from_le_bytes(mmap[16..24].try_into().unwrap_or([0; 8]));
        let vocab_size = u32_at(24) as usize;
        let expected = count.checked_mul(width as u64).and_then(|b| b.checked_add(HEADER_LEN as u64));
        if expected != Some(mmap.len() as u64) {
            return Err(Error::input(
                path,
                format!(
                    "truncated or corrupt: the header says {count} tokens ({} bytes) but the file has {} bytes; {redo}",
                    expected.map_or("too many".to_string(), |b| b.to_string()),
                    mmap.len()
                ),
            ));
        }
        let fp = &mmap[32..32 + FINGERPRINT_LEN];
        let fp_len = fp.iter().position(|&b| b == 0).unwrap_or(FINGERPRINT_LEN);
        let fingerprint = String::from_utf8_lossy(&fp[..fp_len]).into_owned();
        Ok(TokenShard { path: path.to_path_buf(), mmap, len: count as usize, width, vocab_size, fingerprint })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    fn bytes(&self, start: usize, len: usize) -> &[u8] {
        &self.mmap[HEADER_LEN + start * self.width..HEADER_LEN + (start + len) * self.width]
    }

    /// Token `i`. Panics if `i >= len()`, like slice indexing.
    pub fn get(&self, i: usize) -> u32 {
        assert!(i < self.len, "token {i} of a {}-token shard", self.len);
        let b = self.bytes(i, 1);
        match self.width {
            2 => u16::from_le_bytes([b[0], b[1]]) as u32,
            _ => u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        }
    }

    /// Tokens `start..start + len`. Panics if that runs past `len()`, like slice indexing.
    pub fn slice_to_vec(&self, start: usize, len: usize) -> Vec<u32> {
        assert!(start + len <= self.len, "tokens {start}..{} of a {}-token shard", start + len, self.len);
        let b = self.bytes(start, len);
        match self.width {
            2 => b.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]]) as u32).collect(),
            _ => b.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        }
    }
}

/// What `meta.json` of a prepared dataset records.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatasetMeta {
    pub format_version: u32,
    /// "byte", "char" or "bpe".
    pub tokenizer_kind: String,
    /// `Tokenizer::fingerprint` of the tokenizer the shards were made with.
    pub tokenizer_fingerprint: String,
    pub vocab_size: usize,
    pub eot_id: u32,
    pub train_tokens: u64,
    pub val_tokens: u64,
    pub n_docs: usize,
    pub train_docs: usize,
    pub val_docs: usize,
    /// Where the text came from (a path, `builtin:synthetic`, ...).
    pub source: String,
}

/// A prepared dataset: train and validation shards and their metadata.
#[derive(Debug)]
pub struct Dataset {
    pub train: TokenShard,
    pub val: TokenShard,
    pub meta: DatasetMeta,
    /// The folder it lives in.
    pub dir: PathBuf,
}

/// Tokenize `docs` (each followed by the tokenizer's `eot`), split them into train and
/// validation, and write `train.bin`, `val.bin`, `tokenizer.json` and `meta.json` to `out_dir`.
///
/// The last `ceil(val_fraction * n_docs)` documents (at least one, at most all but one) are
/// validation; a single document is instead split at `(1 - val_fraction)` of its tokens.
pub fn prepare_dataset(
    docs: &[String],
    tokenizer: &Tokenizer,
    val_fraction: f64,
    out_dir: &Path,
    source: &str,
) -> Result<Dataset> {
    if !(val_fraction > 0.0 && val_fraction < 1.0) {
        return Err(Error::config("val_fraction", format!("{val_fraction} must be between 0 and 1 (e.g. 0.1)")));
    }
    if docs.is_empty() {
        return Err(Error::usage(format!("no documents to prepare from {source}")));
    }
    std::fs::create_dir_all(out_dir).at(out_dir)?;
    // Remove the old meta first: a run that dies half-way leaves a folder that `open` refuses.
    let meta_path = out_dir.join("meta.json");
    if meta_path.exists() {
        std::fs::remove_file(&meta_path).at(&meta_path)?;
    }

    let eot = tokenizer.eot_id();
    let encoded = tokenizer.encode_batch(docs)?;
    let n = docs.len();
    let flatten = |encs: &[Vec<u32>]| {
        let mut out = Vec::with_capacity(encs.iter().map(|e| e.len() + 1).sum());
        for e in encs {
            out.extend_from_slice(e);
            out.push(eot);
        }
        out
    };
    let (train, val, train_docs, val_docs) = if n == 1 {
        let all = flatten(&encoded);
        let cut = (((1.0 - val_fraction) * all.len() as f64).floor() as usize).clamp(1, all.len().max(2) - 1);
        let cut = cut.min(all.len());
        (all[..cut].to_vec(), all[cut..].to_vec(), 1, 1)
    } else {
        // The epsilon keeps 0.3 * 10 = 3.0000000000000004 from rounding up to 4.
        let n_val = ((val_fraction * n as f64 - 1e-9).ceil() as usize).clamp(1, n - 1);
        (flatten(&encoded[..n - n_val]), flatten(&encoded[n - n_val..]), n - n_val, n_val)
    };

    let fp = tokenizer.fingerprint();
    let vocab = tokenizer.vocab_size();
    write_shard(&out_dir.join("train.bin"), &train, vocab, &fp)?;
    write_shard(&out_dir.join("val.bin"), &val, vocab, &fp)?;
    let tok_json = tokenizer.to_json()?;
    write_atomic(&out_dir.join("tokenizer.json"), |w| w.write_all(tok_json.as_bytes()))?;
    let meta = DatasetMeta {
        format_version: DATASET_VERSION,
        tokenizer_kind: tokenizer.kind().to_string(),
        tokenizer_fingerprint: fp,
        vocab_size: vocab,
        eot_id: eot,
        train_tokens: train.len() as u64,
        val_tokens: val.len() as u64,
        n_docs: n,
        train_docs,
        val_docs,
        source: source.to_string(),
    };
    let json = serde_json::to_string_pretty(&meta).map_err(|e| Error::usage(e.to_string()))?;
    write_atomic(&meta_path, |w| w.write_all(json.as_bytes()))?;
    Dataset::open(out_dir)
}

impl Dataset {
    /// Open a folder written by `prepare_dataset`, checking the shards against `meta.json`.
    pub fn open(dir: &Path) -> Result<Dataset> {
        let meta_path = dir.join("meta.json");
        let redo = "prepare the data again with `itt prepare`";
        let text = std::fs::read_to_string(&meta_path)
            .map_err(|_| Error::input(dir, format!("no readable meta.json: not a prepared dataset; {redo}")))?;
        let meta: DatasetMeta =
            serde_json::from_str(&text).map_err(|e| Error::input(&meta_path, format!("malformed ({e}); {redo}")))?;
        if meta.format_version != DATASET_VERSION {
            return Err(Error::input(
                &meta_path,
                format!("dataset format version {}, this build reads {DATASET_VERSION}; {redo}", meta.format_version),
            ));
        }
        let train = TokenShard::open(&dir.join("train.bin"))?;
        let val = TokenShard::open(&dir.join("val.bin"))?;
        for (shard, count) in [(&train, meta.train_tokens), (&val, meta.val_tokens)] {
            if shard.fingerprint() != meta.tokenizer_fingerprint
                || shard.vocab_size() != meta.vocab_size
                || shard.len() as u64 != count
            {
                return Err(Error::input(
                    shard.path(),
                    format!(
                        "does not match meta.json (tokenizer {}, vocab {}, {} tokens; meta says {}, {}, {}); {redo}",
                        short(shard.fingerprint()),
                        shard.vocab_size(),
                        shard.len(),
                        short(&meta.tokenizer_fingerprint),
                        meta.vocab_size,
                        count
                    ),
                ));
            }
        }
        Ok(Dataset { train, val, meta, dir: dir.to_path_buf() })
    }

    /// The tokenizer saved with the data.
    pub fn load_tokenizer(&self) -> Result<Tokenizer> {
        let tok = Tokenizer::load(&self.dir.join("tokenizer.json"))?;
        self.check_tokenizer(&tok)?;
        Ok(tok)
    }

    /// Error unless `tok` is the tokenizer the data was made with.
    pub fn check_tokenizer(&self, tok: &Tokenizer) -> Result<()> {
        let fp = tok.fingerprint();
        if fp != self.meta.tokenizer_fingerprint || tok.vocab_size() != self.meta.vocab_size {
            return Err(Error::usage(format!(
                "tokenizer does not match the data in {}: the data was made with a {} tokenizer {} \
                 (vocab {}), this is a {} tokenizer {} (vocab {}); use {}/tokenizer.json or prepare the data again",
                self.dir.display(),
                self.meta.tokenizer_kind,
                short(&self.meta.tokenizer_fingerprint),
                self.meta.vocab_size,
                tok.kind(),
                short(&fp),
                tok.vocab_size(),
                self.dir.display()
            )));
        }
        Ok(())
    }
}

fn short(fp: &str) -> &str {
    &fp[..fp.len().min(12)]
}

/// `batch` rows of `seq_len` tokens from random offsets, row-major, and their next-token
/// targets (the same rows shifted by one).
pub fn sample_batch(shard: &TokenShard, rng: &mut Rng, batch: usize, seq_len: usize) -> Result<(Vec<u32>, Vec<u32>)> {
    if batch == 0 || seq_len == 0 {
        return Err(Error::usage(format!("batch ({batch}) and seq_len ({seq_len}) must be at least 1")));
    }
    if shard.len() < seq_len + 1 {
        return Err(Error::input(
            shard.path(),
            format!(
                "{} tokens are too few for sequences of {seq_len} (+1 target); use a shorter seq_len or more data",
                shard.len()
            ),
        ));
    }
    let mut inputs = Vec::with_capacity(batch * seq_len);
    let mut targets = Vec::with_capacity(batch * seq_len);
    for _ in 0..batch {
        let start = rng.below((shard.len() - seq_len) as u64) as usize;
        let row = shard.slice_to_vec(start, seq_len + 1);
        inputs.extend_from_slice(&row[..seq_len]);
        targets.extend_from_slice(&row[1..]);
    }
    Ok((inputs, targets))
}

/// Rows of `seq_len` tokens that tile the shard without overlap: row `r` starts at token
/// `r * seq_len`, and its targets run one further.
pub fn sequential_rows(shard: &TokenShard, seq_len: usize) -> usize {
    match seq_len {
        0 => 0,
        _ => shard.len().saturating_sub(1) / seq_len,
    }
}

/// How many batches `sequential_batches` yields.
pub fn sequential_batch_count(shard: &TokenShard, batch: usize, seq_len: usize) -> usize {
    match batch {
        0 => 0,
        _ => sequential_rows(shard, seq_len).div_ceil(batch),
    }
}

/// The shard in order as `(inputs, targets)` batches of `batch` rows (row-major), for
/// deterministic validation. The last batch may have fewer rows (`inputs.len() / seq_len`);
/// the final `< seq_len` tokens are not covered. Yields nothing if `batch` or `seq_len` is 0.
pub fn sequential_batches(
    shard: &TokenShard,
    batch: usize,
    seq_len: usize,
) -> impl Iterator<Item = (Vec<u32>, Vec<u32>)> + '_ {
    let rows = sequential_rows(shard, seq_len);
    (0..sequential_batch_count(shard, batch, seq_len)).map(move |b| {
        let (r0, r1) = (b * batch, ((b + 1) * batch).min(rows));
        let all = shard.slice_to_vec(r0 * seq_len, (r1 - r0) * seq_len + 1);
        (all[..all.len() - 1].to_vec(), all[1..].to_vec())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const FP: &str = "00ff00ff00ff00ff00ff00ff00ff00ff00ff00ff00ff00ff00ff00ff00ff00ff";

    #[test]
    fn shard_round_trip_both_widths() {
        let dir = tempfile::tempdir().unwrap();
        for vocab in [300usize, 70_000] {
            let tokens: Vec<u32> = (0..1000).map(|i| (i * 7919 % vocab) as u32).collect();
            let path = dir.path().join(format!("v{vocab}.bin"));
            write_shard(&path, &tokens, vocab, FP).unwrap();
            assert!(!crate::base::util::tmp_path(&path).exists());
            let s = TokenShard::open(&path).unwrap();
            assert_eq!(s.len(), 1000);
            assert_eq!(s.vocab_size(), vocab);
            assert_eq!(s.fingerprint(), FP);
            assert_eq!(s.slice_to_vec(0, 1000), tokens);
            assert_eq!(s.get(999), tokens[999]);
            let width = if vocab == 300 { 2 } else { 4 };
            assert_eq!(std::fs::metadata(&path).unwrap().len(), 128 + 1000 * width);
        }
        let empty = dir.path().join("empty.bin");
        write_shard(&empty, &[], 10, "abc").unwrap();
        let s = TokenShard::open(&empty).unwrap();
        assert!(s.is_empty());
        assert_eq!(s.fingerprint(), "abc");
        assert!(write_shard(&empty, &[10], 10, "abc").is_err());
    }

    #[test]
    fn truncated_and_foreign_files_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.bin");
        write_shard(&path, &[1, 2, 3, 4], 10, FP).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 1]).unwrap();
        let e = TokenShard::open(&path).unwrap_err().to_string();
        assert!(e.contains("t.bin") && e.contains("truncated") && e.contains("4 tokens"), "{e}");

        let foreign = dir.path().join("f.json");
        std::fs::write(&foreign, vec![b'{'; 500]).unwrap();
        let e = TokenShard::open(&foreign).unwrap_err().to_string();
        assert!(e.contains("f.json") && e.contains("not an itt token shard"), "{e}");
        std::fs::write(&foreign, b"tiny").unwrap();
        assert!(TokenShard::open(&foreign).is_err());

        let mut v2 = bytes.clone();
        v2[8] = 2;
        std::fs::write(&path, &v2).unwrap();
        assert!(TokenShard::open(&path).unwrap_err().to_string().contains("version 2"));
        assert!(TokenShard::open(&dir.path().join("missing.bin")).is_err());
    }

    #[test]
    fn batches_shift_by_one_and_are_seeded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.bin");
        let tokens: Vec<u32> = (0..500).collect();
        write_shard(&path, &tokens, 500, FP).unwrap();
        let s = TokenShard::open(&path).unwrap();

        let (x, y) = sample_batch(&s, &mut Rng::new(1), 4, 16).unwrap();
        assert_eq!((x.len(), y.len()), (64, 64));
        for r in 0..4 {
            for t in 0..16 {
                assert_eq!(y[r * 16 + t], x[r * 16 + t] + 1);
            }
        }
        assert_eq!(sample_batch(&s, &mut Rng::new(1), 4, 16).unwrap(), (x.clone(), y));
        assert_ne!(sample_batch(&s, &mut Rng::new(2), 4, 16).unwrap().0, x);
        // Offsets run over 0..=len - seq_len - 1, so the last token is a reachable target.
        let (x, y) = sample_batch(&s, &mut Rng::new(3), 200, 498).unwrap();
        let starts: std::collections::BTreeSet<u32> = x.chunks(498).map(|r| r[0]).collect();
        assert_eq!(starts.into_iter().collect::<Vec<_>>(), [0, 1]);
        assert_eq!(y.iter().max(), Some(&499));
        let e = sample_batch(&s, &mut Rng::new(1), 1, 500).unwrap_err().to_string();
        assert!(e.contains("500 tokens") && e.contains("sequences of 500"), "{e}");
        assert!(sample_batch(&s, &mut Rng::new(1), 0, 5).is_err());

        // 500 tokens give (500 - 1) / 10 = 49 rows of 10, in batches of 20, 20 and 9 rows.
        assert_eq!(sequential_rows(&s, 10), 49);
        assert_eq!(sequential_batch_count(&s, 20, 10), 3);
        let batches: Vec<_> = sequential_batches(&s, 20, 10).collect();
        assert_eq!(batches.len(), 3);
        assert_eq!(batches[2].0.len(), 90);
        let all: Vec<u32> = batches.iter().flat_map(|b| b.0.clone()).collect();
        assert_eq!(all, (0..490).collect::<Vec<u32>>());
        assert!(batches.iter().all(|(x, y)| x.iter().zip(y).all(|(a, b)| *b == a + 1)));
        assert_eq!(sequential_batches(&s, 0, 10).count(), 0);
    }

    fn docs(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("document {i} {}", "ab".repeat(i + 1))).collect()
    }

    #[test]
    fn prepare_splits_by_document_and_checks_tokenizer() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("ds");
        let tok = Tokenizer::byte();
        let ds = prepare_dataset(&docs(10), &tok, 0.25, &out, "test docs").unwrap();
        // ceil(0.25 * 10) = 3 validation documents, the last three.
        assert_eq!((ds.meta.train_docs, ds.meta.val_docs, ds.meta.n_docs), (7, 3, 10));
        let expect_val: Vec<u32> = docs(10)[7..].iter().flat_map(|d| d.bytes().map(u32::from).chain([256])).collect();
        assert_eq!(ds.val.slice_to_vec(0, ds.val.len()), expect_val);
        assert_eq!(ds.train.get(ds.train.len() - 1), 256);
        assert_eq!(ds.meta.train_tokens + ds.meta.val_tokens, docs(10).iter().map(|d| d.len() as u64 + 1).sum::<u64>());
        assert_eq!(ds.meta.source, "test docs");
        assert_eq!(ds.meta.tokenizer_fingerprint, tok.fingerprint());

        let again = Dataset::open(&out).unwrap();
        assert_eq!(again.meta, ds.meta);
        again.check_tokenizer(&tok).unwrap();
        assert_eq!(again.load_tokenizer().unwrap().fingerprint(), tok.fingerprint());
        let other = Tokenizer::char_from_text("abc");
        let e = again.check_tokenizer(&other).unwrap_err().to_string();
        assert!(e.starts_with("tokenizer does not match the data in"), "{e}");

        // 0.3 * 10 is 3.0000000000000004 in floating point; still three documents.
        let ds = prepare_dataset(&docs(10), &tok, 0.3, &out, "x").unwrap();
        assert_eq!(ds.meta.val_docs, 3);

        // One document: split by tokens at (1 - val_fraction).
        let one = vec!["x".repeat(99)];
        let ds = prepare_dataset(&one, &tok, 0.1, &out, "one").unwrap();
        assert_eq!((ds.train.len(), ds.val.len()), (90, 10));
        assert_eq!(ds.val.get(9), 256);

        assert!(prepare_dataset(&one, &tok, 0.0, &out, "x").is_err());
        assert!(prepare_dataset(&[], &tok, 0.1, &out, "x").is_err());
    }

    #[test]
    fn open_refuses_missing_or_mismatched_meta() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("ds");
        let e = Dataset::open(&out).unwrap_err().to_string();
        assert!(e.contains("meta.json"), "{e}");
        let tok = Tokenizer::byte();
        prepare_dataset(&docs(4), &tok, 0.25, &out, "x").unwrap();
        let meta_path = out.join("meta.json");
        let text = std::fs::read_to_string(&meta_path).unwrap();
        std::fs::write(&meta_path, text.replace("\"vocab_size\": 257", "\"vocab_size\": 258")).unwrap();
        let e = Dataset::open(&out).unwrap_err().to_string();
        assert!(e.contains("train.bin") && e.contains("does not match meta.json"), "{e}");
        std::fs::write(&meta_path, "{}").unwrap();
        assert!(Dataset::open(&out).unwrap_err().to_string().contains("malformed"));
    }
}
