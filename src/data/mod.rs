//! Tokenizers, corpus readers, the built-in synthetic corpus and memory-mapped token shards.
