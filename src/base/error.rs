//! The library's one error type. Every message names the file, field or value at fault and,
//! where there is one, the way to recover; the binary prints it on one line and exits non-zero.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A configuration value or file is invalid; `field` names the offending key.
    #[error("invalid config: {field}: {msg}")]
    Config { field: String, msg: String },

    /// A user-supplied file or folder cannot be used (missing, empty, binary, malformed, ...).
    #[error("{}: {msg}", path.display())]
    Input { path: PathBuf, msg: String },

    /// A checkpoint is missing, truncated, from another program, or does not match its config.
    #[error("checkpoint {}: {msg}", path.display())]
    Checkpoint { path: PathBuf, msg: String },

    /// Training met a NaN or infinite loss, gradient norm or weight; `msg` names the likely
    /// cause and the checkpoint that is kept.
    #[error("training diverged at step {step}: {msg}")]
    Diverged { step: usize, msg: String },

    /// Training stopped at a step boundary on a signal (preemption) after writing and verifying
    /// the checkpoint `checkpoint`; the binary exits with `train::preempt::EXIT_PREEMPTED`.
    #[error("stopped by {signal} after step {step}; checkpoint {} written and verified; continue with --resume", checkpoint.display())]
    Preempted { signal: String, step: usize, checkpoint: PathBuf },

    /// Bad arguments to a library call (a prompt longer than the context, an unknown task, ...).
    #[error("{0}")]
    Usage(String),

    #[error("tokenizer: {0}")]
    Tokenizer(String),

    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),

    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn config(field: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Config { field: field.into(), msg: one_line(msg.into()) }
    }
    pub fn input(path: impl AsRef<Path>, msg: impl Into<String>) -> Self {
        Error::Input { path: path.as_ref().to_path_buf(), msg: one_line(msg.into()) }
    }
    pub fn checkpoint(path: impl AsRef<Path>, msg: impl Into<String>) -> Self {
        Error::Checkpoint { path: path.as_ref().to_path_buf(), msg: one_line(msg.into()) }
    }
    pub fn usage(msg: impl Into<String>) -> Self {
        Error::Usage(one_line(msg.into()))
    }
}

/// A message fit for one line: control characters quoted from a file (a newline inside a JSON
/// key or a token, say) are escaped as Rust writes them (`\n`, `\u{1b}`).
pub fn one_line(msg: String) -> String {
    if !msg.chars().any(char::is_control) {
        return msg;
    }
    msg.chars().map(|c| if c.is_control() { c.escape_default().to_string() } else { c.to_string() }).collect()
}

/// Attach the path to an io::Error so the message says which file failed.
pub trait IoContext<T> {
    fn at(self, path: impl AsRef<Path>) -> Result<T>;
}

impl<T> IoContext<T> for std::result::Result<T, std::io::Error> {
    fn at(self, path: impl AsRef<Path>) -> Result<T> {
        self.map_err(|source| Error::Io { path: path.as_ref().to_path_buf(), source })
    }
}
