//! Reading a text corpus into documents.
//!
//! A corpus path is one of:
//! - `builtin` or `builtin:synthetic`: the built-in synthetic corpus with its default seed and
//!   size (`SyntheticOptions::default()`, 1000 documents, 1.15 MB); these names win over a
//!   file of the same name (write `./builtin` for the file);
//! - a `.jsonl` file: one document per line, taken from a string field (`text` by default);
//!   blank lines are skipped;
//! - any other file: one document, which must be UTF-8 text;
//! - a `.gz` file: decompressed, then read as above by its inner name (`a.jsonl.gz`);
//! - a folder: every non-hidden file below it, in sorted path order, read as above.
//!
//! Documents with nothing but whitespace are dropped; a corpus with no text left is an error.

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::base::error::IoContext;
use crate::data::synthetic::{synthetic_corpus, SyntheticOptions};
use crate::{Error, Result};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CorpusOptions {
    /// Field of a `.jsonl` line that holds the document text.
    pub jsonl_field: String,
    /// Stop after this many bytes of text (the last document is cut at a char boundary);
    /// `None` reads everything.
    pub max_bytes: Option<u64>,
}

impl Default for CorpusOptions {
    fn default() -> Self {
        CorpusOptions { jsonl_field: "text".into(), max_bytes: None }
    }
}

/// The error for a corpus path that does not exist (also raised before an experiment makes its
/// output folder).
pub fn missing_corpus(path: &Path) -> Error {
    Error::input(path, "no such file or folder; give a text or .jsonl(.gz) file, a folder of them, or `builtin`")
}

/// Documents of the corpus at `path` (see the module docs for what a path may be).
pub fn read_corpus(path: &Path, opts: &CorpusOptions) -> Result<Vec<String>> {
    let mut docs = Vec::new();
    let mut budget = opts.max_bytes.unwrap_or(u64::MAX);
    match path.to_str() {
        Some("builtin") | Some("builtin:synthetic") => {
            for doc in synthetic_corpus(&SyntheticOptions::default()) {
                push_doc(&mut docs, doc, &mut budget);
            }
            return Ok(docs);
        }
        _ => {}
    }
    let meta = std::fs::metadata(path).map_err(|_| missing_corpus(path))?;
    if meta.is_dir() {
        let mut files = Vec::new();
        list_files(path, &mut files)?;
        if files.is_empty() {
            return Err(Error::input(path, "the folder has no (non-hidden) files to read"));
        }
        for file in files {
            if budget == 0 {
                break;
            }
            read_file(&file, opts, &mut docs, &mut budget)?;
        }
    } else {
        read_file(path, opts, &mut docs, &mut budget)?;
    }
    if docs.is_empty() {
        return Err(Error::input(path, "the corpus contains no text (only whitespace or nothing)"));
    }
    Ok(docs)
}

fn is_hidden(path: &Path) -> bool {
    path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('.'))
}

fn list_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let mut entries: Vec<PathBuf> =
        std::fs::read_dir(dir).at(dir)?.map(|e| e.map(|e| e.path())).collect::<std::io::Result<_>>().at(dir)?;
    entries.sort();
    for p in entries {
        if is_hidden(&p) {
            continue;
        }
        if p.is_dir() {
            list_files(&p, out)?;
        } else {
            out.push(p);
        }
    }
    Ok(())
}

/// Keep a document if it has text, charging its bytes to the budget.
fn push_doc(docs: &mut Vec<String>, mut doc: String, budget: &mut u64) {
    if *budget == 0 || doc.trim().is_empty() {
        return;
    }
    if doc.len() as u64 > *budget {
        let mut cut = *budget as usize;
        while !doc.is_char_boundary(cut) {
            cut -= 1;
        }
        doc.truncate(cut);
        if doc.trim().is_empty() {
            *budget = 0;
            return;
        }
    }
    *budget -= doc.len() as u64;
    docs.push(doc);
}

fn to_text(path: &Path, bytes: Vec<u8>) -> Result<String> {
    if let Some(pos) = bytes.iter().position(|&b| b == 0) {
        return Err(Error::input(
            path,
            format!("looks binary (NUL byte at offset {pos}); give UTF-8 text, .jsonl or .gz files"),
        ));
    }
    let mut text = String::from_utf8(bytes).map_err(|e| {
        Error::input(
            path,
            format!(
                "looks binary (invalid UTF-8 at byte {}); convert it to UTF-8 text first",
                e.utf8_error().valid_up_to()
            ),
        )
    })?;
    if text.starts_with('\u{FEFF}') {
        text.drain(..3);
    }
    Ok(text)
}

fn read_file(path: &Path, opts: &CorpusOptions, docs: &mut Vec<String>, budget: &mut u64) -> Result<()> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("").to_ascii_lowercase();
    let (inner, bytes) = match name.strip_suffix(".gz") {
        Some(inner) => {
            let file = std::fs::File::open(path).at(path)?;
            let mut bytes = Vec::new();
            flate2::read::MultiGzDecoder::new(std::io::BufReader::new(file))
                .read_to_end(&mut bytes)
                .map_err(|e| Error::input(path, format!("cannot decompress ({e}); is it really gzip?")))?;
            (inner.to_string(), bytes)
        }
        None => (name, std::fs::read(path).at(path)?),
    };
    let text = to_text(path, bytes)?;
    if inner.ends_with(".jsonl") {
        read_jsonl(path, &text, &opts.jsonl_field, docs, budget)
    } else {
        push_doc(docs, text, budget);
        Ok(())
    }
}

fn read_jsonl(path: &Path, text: &str, field: &str, docs: &mut Vec<String>, budget: &mut u64) -> Result<()> {
    for (i, line) in text.lines().enumerate() {
        if *budget == 0 {
            break;
        }
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| Error::input(path, format!("line {}: not valid JSON ({e})", i + 1)))?;
        match v.get(field) {
            Some(serde_json::Value::String(s)) => push_doc(docs, s.clone(), budget),
            Some(_) => return Err(Error::input(path, format!("line {}: field `{field}` is not a string", i + 1))),
            None => {
                return Err(Error::input(
                    path,
                    format!("line {}: no field `{field}`; choose the text field with the jsonl-field option", i + 1),
                ))
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn write(path: &Path, bytes: &[u8]) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(bytes).unwrap();
        enc.finish().unwrap()
    }

    fn err(path: &Path) -> String {
        read_corpus(path, &CorpusOptions::default()).unwrap_err().to_string()
    }

    #[test]
    fn reads_text_jsonl_gz_and_folders() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write(&d.join("b.txt"), "\u{FEFF}second file\n".as_bytes());
        write(&d.join("a.txt"), b"first file\n");
        write(&d.join("sub/c.jsonl"), b"{\"text\":\"doc c1\"}\n\n{\"text\":\"doc c2\",\"n\":1}\n");
        write(&d.join("sub/d.jsonl.gz"), &gzip(b"{\"text\":\"doc d1\"}\n"));
        write(&d.join("sub/e.txt.gz"), &gzip(b"doc e"));
        write(&d.join("sub/blank.txt"), b"  \n\t");
        write(&d.join(".hidden"), b"\0\0binary");
        write(&d.join(".git/x.txt"), b"hidden");
        let docs = read_corpus(d, &CorpusOptions::default()).unwrap();
        assert_eq!(docs, ["first file\n", "second file\n", "doc c1", "doc c2", "doc d1", "doc e"]);
        let one = read_corpus(&d.join("a.txt"), &CorpusOptions::default()).unwrap();
        assert_eq!(one, ["first file\n"]);

        write(&d.join("other/f.jsonl"), b"{\"body\":\"x\"}\n");
        let opts = CorpusOptions { jsonl_field: "body".into(), ..Default::default() };
        assert_eq!(read_corpus(&d.join("other/f.jsonl"), &opts).unwrap(), ["x"]);

        let capped = CorpusOptions { max_bytes: Some(14), ..Default::default() };
        assert_eq!(read_corpus(d, &capped).unwrap(), ["first file\n", "sec"]);
    }

    #[test]
    fn builtin_is_the_synthetic_corpus() {
        let docs = read_corpus(Path::new("builtin"), &CorpusOptions::default()).unwrap();
        assert_eq!(docs, synthetic_corpus(&SyntheticOptions::default()));
        let capped = CorpusOptions { max_bytes: Some(5000), ..Default::default() };
        let few = read_corpus(Path::new("builtin:synthetic"), &capped).unwrap();
        assert_eq!(few.iter().map(String::len).sum::<usize>(), 5000);
    }

    #[test]
    fn errors_name_the_file_and_problem() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        assert!(err(&d.join("missing.txt")).contains("no such file"));

        write(&d.join("empty.txt"), b" \n\n ");
        let e = err(&d.join("empty.txt"));
        assert!(e.contains("empty.txt") && e.contains("no text"), "{e}");

        write(&d.join("bin.dat"), b"abc\0def");
        let e = err(&d.join("bin.dat"));
        assert!(e.contains("bin.dat") && e.contains("looks binary"), "{e}");
        write(&d.join("latin1.txt"), b"caf\xe9");
        assert!(err(&d.join("latin1.txt")).contains("looks binary"));

        write(&d.join("bad.jsonl"), b"{\"text\":\"ok\"}\n{\"text\":\"ok\"}\n{\"text\": oops}\n");
        let e = err(&d.join("bad.jsonl"));
        assert!(e.contains("bad.jsonl") && e.contains("line 3"), "{e}");
        write(&d.join("num.jsonl"), b"{\"text\":3}\n");
        assert!(err(&d.join("num.jsonl")).contains("line 1: field `text` is not a string"));
        write(&d.join("nofield.jsonl"), b"{\"body\":\"x\"}\n");
        assert!(err(&d.join("nofield.jsonl")).contains("no field `text`"));

        write(&d.join("fake.txt.gz"), b"not gzip at all");
        assert!(err(&d.join("fake.txt.gz")).contains("decompress"));

        std::fs::create_dir(d.join("void")).unwrap();
        assert!(err(&d.join("void")).contains("no (non-hidden) files"));

        // A folder with one binary file among text files names that file.
        write(&d.join("mixed/a.txt"), b"hello");
        write(&d.join("mixed/model.bin"), &[0u8, 1, 2, 3]);
        let e = err(&d.join("mixed"));
        assert!(e.contains("model.bin") && e.contains("looks binary"), "{e}");
    }
}
