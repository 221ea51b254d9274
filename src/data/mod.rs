//! Tokenizers, corpus readers, the built-in synthetic corpus and memory-mapped token shards.

pub mod corpus;
pub mod synthetic;
pub mod tokenizer;

pub use corpus::{read_corpus, CorpusOptions};
pub use synthetic::{answer_spans, synthetic_corpus, SyntheticOptions};
pub use tokenizer::{from_spec, Tokenizer, EOT};
