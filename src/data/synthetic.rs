//! The built-in synthetic corpus (`builtin` / `builtin:synthetic` as a corpus path): text in
//! which some tokens need much more computation than others, so that Inner Thinking layers
//! have a reason to give hard tokens more depth.
//!
//! Each document is many lines; each line is one small problem. Its prompt (before `=`) is
//! random, so no amount of thinking predicts it; its answer (after `=`) is fully determined by
//! the prompt but takes computation: carries in addition, borrows in subtraction, a stack for
//! bracket closing, sorting, reversal, counting. Filler lines (`5 6 7 8 9`, `la la la la`)
//! are easy: after their first word every token follows trivially.
//!
//! ```text
//! 347+589=936
//! 912-347=565
//! close ([{<>}]( = ))
//! sort 5 3 9 1 = 1 3 5 9
//! rev abcde = edcba
//! count b in abacbb = 3
//! 41 42 43 44 45
//! ho ho ho ho
//! ```
//!
//! The alphabet is 49 chars: `0-9`, `a-z`, `()[]{}<>`, `+-=`, space and newline. Document `i`
//! is drawn from `Rng::derive(seed, "synthetic/i")`, so the corpus is reproducible and a
//! larger `n_docs` only appends documents. The defaults give 1000 documents, 1.15 MB of text.

use std::ops::Range;

use crate::base::rng::Rng;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyntheticOptions {
    /// Seed of the whole corpus.
    pub seed: u64,
    /// Number of documents; each has 40 to 80 lines (about 1.15 KB).
    pub n_docs: usize,
}

impl Default for SyntheticOptions {
    fn default() -> Self {
        SyntheticOptions { seed: 0, n_docs: 1000 }
    }
}

/// The task a line poses, for per-kind analysis.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LineKind {
    Add,
    Sub,
    Close,
    Sort,
    Rev,
    Count,
    /// Easy lines without an answer: counting runs and repeated words.
    Filler,
}

impl LineKind {
    pub const ALL: [LineKind; 7] = [
        LineKind::Add,
        LineKind::Sub,
        LineKind::Close,
        LineKind::Sort,
        LineKind::Rev,
        LineKind::Count,
        LineKind::Filler,
    ];

    pub fn name(self) -> &'static str {
        match self {
            LineKind::Add => "add",
            LineKind::Sub => "sub",
            LineKind::Close => "close",
            LineKind::Sort => "sort",
            LineKind::Rev => "rev",
            LineKind::Count => "count",
            LineKind::Filler => "filler",
        }
    }
}

/// The kind of one line (without or with its trailing newline).
pub fn line_kind(line: &str) -> LineKind {
    let first = line.split(' ').next().unwrap_or("");
    match first {
        "close" => LineKind::Close,
        "sort" => LineKind::Sort,
        "rev" => LineKind::Rev,
        "count" => LineKind::Count,
        _ if first.contains('+') => LineKind::Add,
        _ if first.contains('-') => LineKind::Sub,
        _ => LineKind::Filler,
    }
}

/// Byte range of a line's answer: after the first `=` and any spaces, up to the end of the
/// line (a trailing `\n` excluded). `None` for lines without an answer.
pub fn answer_spans(line: &str) -> Option<Range<usize>> {
    let eq = line.find('=')?;
    let end = line.trim_end_matches(['\n', '\r']).len();
    let start = eq + 1 + line[eq + 1..].len() - line[eq + 1..].trim_start_matches(' ').len();
    (start < end).then_some(start..end)
}

/// For every byte of `text` (many lines), whether it lies in an answer span.
pub fn answer_byte_mask(text: &str) -> Vec<bool> {
    let mut mask = vec![false; text.len()];
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        if let Some(r) = answer_spans(line) {
            mask[offset + r.start..offset + r.end].iter_mut().for_each(|m| *m = true);
        }
        offset += line.len();
    }
    mask
}

fn closer(open: char) -> Option<char> {
    match open {
        '(' => Some(')'),
        '[' => Some(']'),
        '{' => Some('}'),
        '<' => Some('>'),
        _ => None,
    }
}

/// The answer of a problem line, given its prompt (the text before `=`, or the whole line).
/// `None` if the prompt is not one of the synthetic tasks.
pub fn solve(prompt: &str) -> Option<String> {
    let prompt = prompt.split('=').next()?.trim();
    let mut words = prompt.split(' ');
    let first = words.next()?;
    let rest: Vec<&str> = words.collect();
    let number = |s: &str| -> Option<u64> {
        (!s.is_empty() && s.len() <= 18 && s.bytes().all(|b| b.is_ascii_digit())).then(|| s.parse().ok())?
    };
    match (first, rest.as_slice()) {
        ("close", [seq]) => {
            let mut stack = Vec::new();
            for c in seq.chars() {
                if let Some(close) = closer(c) {
                    stack.push(close);
                } else if stack.pop() != Some(c) {
                    return None;
                }
            }
            (!stack.is_empty()).then(|| stack.iter().rev().collect())
        }
        ("sort", items) if !items.is_empty() => {
            let mut xs = items.iter().map(|s| number(s)).collect::<Option<Vec<u64>>>()?;
            xs.sort_unstable();
            Some(xs.iter().map(u64::to_string).collect::<Vec<_>>().join(" "))
        }
        ("rev", [word]) => Some(word.chars().rev().collect()),
        ("count", [c, "in", word]) if c.chars().count() == 1 => Some(word.matches(c).count().to_string()),
        (expr, []) => {
            if let Some((a, b)) = expr.split_once('+') {
                Some((number(a)? + number(b)?).to_string())
            } else if let Some((a, b)) = expr.split_once('-') {
                number(a)?.checked_sub(number(b)?).map(|d| d.to_string())
            } else {
                None
            }
        }
        _ => None,
    }
}

/// A number with 1 to `max_digits` digits, the digit count uniform (so small and large
/// numbers are equally common).
fn number(rng: &mut Rng, max_digits: u32) -> u64 {
    let digits = 1 + rng.below(max_digits as u64) as u32;
    let lo = if digits == 1 { 0 } else { 10u64.pow(digits - 1) };
    lo + rng.below(10u64.pow(digits) - lo)
}

fn letters(rng: &mut Rng, alphabet: &[u8], len: usize) -> String {
    (0..len).map(|_| alphabet[rng.below(alphabet.len() as u64) as usize] as char).collect()
}

const LOWER: &[u8] = b"abcdefghijklmnopqrstuvwxyz";

fn prompt(rng: &mut Rng) -> String {
    // Relative weights of the line kinds; the last two are filler.
    const WEIGHTS: [u64; 8] = [20, 10, 15, 15, 15, 10, 8, 7];
    let mut pick = rng.below(WEIGHTS.iter().sum());
    let mut kind = 0;
    while pick >= WEIGHTS[kind] {
        pick -= WEIGHTS[kind];
        kind += 1;
    }
    match kind {
        0 => format!("{}+{}", number(rng, 4), number(rng, 4)),
        1 => {
            let (a, b) = (number(rng, 4), number(rng, 4));
            format!("{}-{}", a.max(b), a.min(b))
        }
        2 => {
            let mut seq = String::new();
            let mut stack = Vec::new();
            for _ in 0..3 + rng.below(8) {
                if stack.is_empty() || (stack.len() < 5 && rng.below(10) < 6) {
                    let open = b"([{<"[rng.below(4) as usize] as char;
                    stack.push(open);
                    seq.push(open);
                } else if let Some(close) = stack.pop().and_then(closer) {
                    seq.push(close);
                }
            }
            if stack.is_empty() {
                seq.push('(');
            }
            format!("close {seq}")
        }
        3 => {
            let n = 3 + rng.below(6);
            let items: Vec<String> = (0..n).map(|_| rng.below(10).to_string()).collect();
            format!("sort {}", items.join(" "))
        }
        4 => {
            let len = 3 + rng.below(6) as usize;
            format!("rev {}", letters(rng, LOWER, len))
        }
        5 => {
            let len = 5 + rng.below(8) as usize;
            let word = letters(rng, b"abcde", len);
            let c = letters(rng, b"abcde", 1);
            format!("count {c} in {word}")
        }
        6 => {
            let start = rng.below(90);
            let n = 5 + rng.below(6);
            (start..start + n).map(|x| x.to_string()).collect::<Vec<_>>().join(" ")
        }
        _ => {
            let len = 2 + rng.below(2) as usize;
            let word = letters(rng, LOWER, len);
            vec![word; 4 + rng.below(5) as usize].join(" ")
        }
    }
}

/// One line without its newline: a filler line, or `prompt=answer` (`prompt = answer` for the
/// word tasks).
fn line(rng: &mut Rng) -> String {
    let p = prompt(rng);
    match solve(&p) {
        Some(answer) if p.contains(' ') => format!("{p} = {answer}"),
        Some(answer) => format!("{p}={answer}"),
        None => p,
    }
}

/// The synthetic corpus: `opts.n_docs` documents of 40 to 80 lines, each line ending in `\n`.
pub fn synthetic_corpus(opts: &SyntheticOptions) -> Vec<String> {
    (0..opts.n_docs)
        .map(|i| {
            let mut rng = Rng::derive(opts.seed, &format!("synthetic/{i}"));
            let n_lines = 40 + rng.below(41);
            let mut doc = String::with_capacity(n_lines as usize * 24);
            for _ in 0..n_lines {
                doc.push_str(&line(&mut rng));
                doc.push('\n');
            }
            doc
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn small() -> SyntheticOptions {
        SyntheticOptions { seed: 7, n_docs: 40 }
    }

    /// Checks a line's answer without `solve`: arithmetic by i64, sorting by comparison with a
    /// sorted copy, bracket closing by checking that prompt + answer is balanced, etc.
    fn verify(line: &str) -> bool {
        let kind = line_kind(line);
        let Some((prompt, answer)) = line.split_once('=') else {
            return kind == LineKind::Filler;
        };
        let (prompt, answer) = (prompt.trim(), answer.trim());
        let words: Vec<&str> = prompt.split(' ').collect();
        let int = |s: &str| s.parse::<i64>().unwrap();
        match kind {
            LineKind::Add => {
                let (a, b) = prompt.split_once('+').unwrap();
                int(a) + int(b) == int(answer)
            }
            LineKind::Sub => {
                let (a, b) = prompt.split_once('-').unwrap();
                int(a) - int(b) == int(answer) && int(answer) >= 0
            }
            LineKind::Close => {
                let full = format!("{}{}", words[1], answer);
                let mut depth: Vec<char> = Vec::new();
                let ok = full.chars().all(|c| match c {
                    '(' | '[' | '{' | '<' => {
                        depth.push(c);
                        true
                    }
                    _ => matches!(
                        (depth.pop(), c),
                        (Some('('), ')') | (Some('['), ']') | (Some('{'), '}') | (Some('<'), '>')
                    ),
                });
                ok && depth.is_empty() && answer.chars().all(|c| ")]}>".contains(c))
            }
            LineKind::Sort => {
                let mut xs: Vec<&str> = words[1..].to_vec();
                xs.sort();
                xs.join(" ") == answer
            }
            LineKind::Rev => {
                let w: Vec<char> = words[1].chars().collect();
                let a: Vec<char> = answer.chars().collect();
                w.len() == a.len() && (0..w.len()).all(|i| w[i] == a[w.len() - 1 - i])
            }
            LineKind::Count => {
                let c = words[1].chars().next().unwrap();
                words[3].chars().filter(|&x| x == c).count() == answer.parse::<usize>().unwrap()
            }
            LineKind::Filler => false,
        }
    }

    #[test]
    fn reproducible_and_seed_dependent() {
        let a = synthetic_corpus(&small());
        assert_eq!(a, synthetic_corpus(&small()));
        assert_ne!(a, synthetic_corpus(&SyntheticOptions { seed: 8, ..small() }));
        // More documents only appends.
        let more = synthetic_corpus(&SyntheticOptions { n_docs: 50, ..small() });
        assert_eq!(&more[..40], &a[..]);
    }

    #[test]
    fn every_answer_is_correct_and_every_kind_occurs() {
        let mut seen = BTreeMap::new();
        for doc in synthetic_corpus(&small()) {
            assert!(doc.ends_with('\n'));
            for line in doc.lines() {
                assert!(verify(line), "wrong line: {line:?}");
                *seen.entry(line_kind(line).name()).or_insert(0) += 1;
                match answer_spans(line) {
                    Some(r) => {
                        assert_eq!(Some(line[r.clone()].to_string()), solve(line));
                        assert_eq!(r.end, line.len());
                    }
                    None => assert_eq!(line_kind(line), LineKind::Filler),
                }
            }
        }
        assert_eq!(seen.len(), LineKind::ALL.len(), "{seen:?}");
    }

    #[test]
    fn spans_and_masks() {
        assert_eq!(answer_spans("347+589=936\n"), Some(8..11));
        assert_eq!(answer_spans("sort 5 3 = 3 5"), Some(11..14));
        assert_eq!(answer_spans("1 2 3 4"), None);
        assert_eq!(answer_spans("1+2=\n"), None);
        let text = "1+2=3\nla la\nrev ab = ba\n";
        let mask: String = answer_byte_mask(text).iter().map(|&m| if m { '^' } else { '.' }).collect();
        assert_eq!(mask, concat!("....^.", "......", ".........^^."));
        assert_eq!(solve("99+1"), Some("100".into()));
        assert_eq!(solve("3-5"), None);
        assert_eq!(solve("close ([)"), None);
        assert_eq!(solve("close ([{<>}]("), Some("))".into()));
        assert_eq!(solve("count a in banana"), Some("3".into()));
        assert_eq!(solve("hello"), None);
        assert_eq!(line_kind("12-3=9"), LineKind::Sub);
        assert_eq!(line_kind("ho ho ho"), LineKind::Filler);
    }

    #[test]
    fn default_corpus_size_and_alphabet() {
        let docs = synthetic_corpus(&SyntheticOptions::default());
        let bytes: usize = docs.iter().map(String::len).sum();
        let mut counts = BTreeMap::new();
        for d in &docs {
            for c in d.chars() {
                *counts.entry(c).or_insert(0u64) += 1;
            }
        }
        let n = bytes as f64;
        let entropy: f64 = counts.values().map(|&k| k as f64 / n).map(|p| -p * p.log2()).sum::<f64>();
        let lines: usize = docs.iter().map(|d| d.lines().count()).sum();
        let answer: usize = docs.iter().map(|d| answer_byte_mask(d).iter().filter(|&&m| m).count()).sum();
        println!(
            "default synthetic corpus: {} docs, {lines} lines, {bytes} bytes, {} chars {:?}, \
             unigram entropy {entropy:.3} bits/char, answer bytes {:.1}%",
            docs.len(),
            counts.len(),
            counts.keys().collect::<String>(),
            100.0 * answer as f64 / n
        );
        assert!((1_000_000..2_000_000).contains(&bytes), "{bytes} bytes");
        assert_eq!(counts.len(), 49);
        assert!(docs.iter().all(|d| d.is_ascii()));
    }
}
