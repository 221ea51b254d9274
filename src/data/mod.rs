//! Tokenizers, corpus readers, the built-in synthetic corpus and memory-mapped token shards.

pub mod corpus;
pub mod shards;
pub mod synthetic;
pub mod tokenizer;

pub use corpus::{read_corpus, CorpusOptions};
pub use shards::{
    prepare_dataset, sample_batch, sequential_batch_count, sequential_batches, write_shard, Dataset, DatasetMeta,
    TokenShard,
};
pub use synthetic::{answer_byte_mask, answer_spans, line_kind, solve, synthetic_corpus, LineKind, SyntheticOptions};
pub use tokenizer::{from_spec, Tokenizer, EOT};
