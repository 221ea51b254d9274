//! Preemption: a scheduler's signal ends training at the next step boundary with a checkpoint
//! (docs/DESIGN.md §14.2, README "Training on a cluster").
//!
//! SLURM, Kubernetes and spot-instance schedulers send SIGTERM (SLURM's `--signal` another
//! one, often SIGUSR1) some seconds before they kill a job. The handler only records the
//! signal; [`crate::train::run`] polls it after each optimiser step, writes a checkpoint, and
//! returns [`crate::Error::Preempted`], which the binary turns into exit status
//! [`EXIT_PREEMPTED`]. A second signal means "now": the handler exits at once with the shell's
//! status for a signal death, 128 + the signal number, as if no handler had been installed.

use crate::{Error, Result};
use std::sync::atomic::{AtomicI32, Ordering};

/// Exit status of a run stopped by a signal after writing its checkpoint: EX_TEMPFAIL of
/// sysexits.h ("try again later"), distinct from errors (1), usage errors (2) and signal
/// deaths (128 + n), so that a requeue script can tell "resume me" from "I failed".
pub const EXIT_PREEMPTED: i32 = 75;

/// The signals that preempt when neither `--preempt-signals` nor `ITT_PREEMPT_SIGNALS` says.
pub const DEFAULT_SIGNALS: &str = "TERM,INT,USR1";

/// The first signal received (0: none). Written by the handler, read at step boundaries.
static RECEIVED: AtomicI32 = AtomicI32::new(0);

/// Parse a comma-separated signal list (`TERM,USR1`, `SIGTERM`, `15`; `none` for no handler).
pub fn parse_signals(list: &str) -> Result<Vec<i32>> {
    let mut out = vec![];
    for s in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let name = s.to_ascii_uppercase();
        let name = name.strip_prefix("SIG").unwrap_or(&name);
        let sig = match name {
            "NONE" => continue,
            "TERM" => libc::SIGTERM,
            "INT" => libc::SIGINT,
            "USR1" => libc::SIGUSR1,
            "USR2" => libc::SIGUSR2,
            "HUP" => libc::SIGHUP,
            "QUIT" => libc::SIGQUIT,
            "XCPU" => libc::SIGXCPU,
            n => match n.parse::<i32>() {
                Ok(v) if v > 0 && !signal_hook::consts::FORBIDDEN.contains(&v) => v,
                _ => {
                    return Err(Error::usage(format!(
                        "--preempt-signals: `{s}` is not a signal that can be caught; give names such as \
                         TERM,INT,USR1,USR2,HUP,QUIT,XCPU, numbers, or none"
                    )))
                }
            },
        };
        if !out.contains(&sig) {
            out.push(sig);
        }
    }
    Ok(out)
}

/// The signal list of a command: its flag, else `ITT_PREEMPT_SIGNALS`, else [`DEFAULT_SIGNALS`].
pub fn signals_from(flag: Option<&str>) -> Result<Vec<i32>> {
    match flag {
        Some(f) => parse_signals(f),
        None => parse_signals(&std::env::var("ITT_PREEMPT_SIGNALS").unwrap_or_else(|_| DEFAULT_SIGNALS.into())),
    }
}

/// Install the handler for `signals`. Called once per process by the commands that train.
pub fn install(signals: &[i32]) -> Result<()> {
    for &sig in signals {
        let action = move || {
            // Only async-signal-safe work here: an atomic swap, and `_exit` on the second one.
            if RECEIVED.swap(sig, Ordering::SeqCst) != 0 {
                signal_hook::low_level::exit(128 + sig);
            }
        };
        // SAFETY: the action is async-signal-safe (an atomic swap and `_exit`).
        unsafe { signal_hook::low_level::register(sig, action) }
            .map_err(|e| Error::usage(format!("cannot handle signal {sig}: {e}")))?;
    }
    Ok(())
}

/// The signal that asked this process to stop, if one has.
pub fn received() -> Option<i32> {
    match RECEIVED.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

/// A signal's short name for messages (`SIGTERM`).
pub fn name(sig: i32) -> String {
    match sig {
        libc::SIGTERM => "SIGTERM".into(),
        libc::SIGINT => "SIGINT".into(),
        libc::SIGUSR1 => "SIGUSR1".into(),
        libc::SIGUSR2 => "SIGUSR2".into(),
        libc::SIGHUP => "SIGHUP".into(),
        libc::SIGQUIT => "SIGQUIT".into(),
        libc::SIGXCPU => "SIGXCPU".into(),
        n => format!("signal {n}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signal_lists_parse_and_bad_ones_are_refused() {
        assert_eq!(parse_signals("TERM, sigusr1,15").unwrap(), vec![libc::SIGTERM, libc::SIGUSR1]);
        assert_eq!(parse_signals("none").unwrap(), Vec::<i32>::new());
        assert!(parse_signals("KILL").is_err());
        assert!(parse_signals("9").is_err());
        assert!(parse_signals("bogus").is_err());
    }
}
