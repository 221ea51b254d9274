//! One writer per run folder (docs/DESIGN.md §14.3): an advisory lock (flock(2)) on `RUN/lock`, held by the commands
//! that write a run (train, its resume, retrofit, experiment) for as long as they run.
//! Readers (eval, generate, serve, analyze, report) take none: checkpoints are published by a
//! rename, so a reader sees a whole one or the previous one.
//!
//! The kernel drops a flock when its holder dies, however it dies, so a lock file naming a
//! process that is gone is stale by construction: the next writer takes it over and says so.
//! The file is emptied, never removed, on release: removing it would let a writer that opened
//! the old file and one that creates a new file both hold "the" lock.

use crate::base::error::IoContext;
use crate::{Error, Result};
use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// The lock file's name inside a run folder.
pub const LOCK_FILE: &str = "lock";

/// A held run lock; released (the file emptied, the flock dropped) when dropped.
#[derive(Debug)]
pub struct RunLock {
    file: File,
    path: PathBuf,
    /// Set when the lock was left by a process that ended without releasing it.
    pub took_over: Option<String>,
}

/// This machine's name, for the lock file and messages.
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer and its length are valid; gethostname NUL-terminates within it or fails.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "unknown-host".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// "PID 123 on host h" from a lock file's contents (`{"host": .., "pid": ..}`).
fn holder(text: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(text).ok()?;
    Some(format!("PID {} on host {}", v["pid"].as_u64()?, v["host"].as_str()?))
}

impl RunLock {
    /// Take the lock of the run folder `dir` (which must exist), or fail with a one-line error
    /// naming the process that holds it.
    pub fn acquire(dir: &Path) -> Result<RunLock> {
        let path = dir.join(LOCK_FILE);
        let mut file =
            std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path).at(&path)?;
        // SAFETY: flock on a file descriptor this function owns.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(Error::Io { path, source: err });
            }
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            let who = holder(&text).unwrap_or_else(|| "another process".into());
            return Err(Error::usage(format!(
                "{} is being written by {who} (lock file {}); one writer per run: wait for it to end or stop it",
                dir.display(),
                path.display()
            )));
        }
        let mut text = String::new();
        file.read_to_string(&mut text).at(&path)?;
        let took_over = holder(&text).map(|who| {
            format!("note: {} was locked by {who}, which ended without releasing it; taken over", dir.display())
        });
        let me = serde_json::json!({"host": hostname(), "pid": std::process::id()});
        file.set_len(0).at(&path)?;
        file.rewind().at(&path)?;
        writeln!(file, "{me}").at(&path)?;
        file.sync_all().at(&path)?;
        Ok(RunLock { file, path, took_over })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for RunLock {
    fn drop(&mut self) {
        // Emptied while still held, so nobody reads a released lock as ours; closing the file
        // then drops the flock.
        let _ = self.file.set_len(0);
    }
}
