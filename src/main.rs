//! `itt`: the command-line tool. Parses flags and runs the command (`itt::cli`); every error
//! is one line on stderr and a non-zero exit.

use clap::Parser;
use std::io::Write;

/// Large allocations on transparent huge pages (`itt::base::alloc`, docs/PERFORMANCE.md).
#[global_allocator]
static ALLOCATOR: itt::base::alloc::HugePageAlloc = itt::base::alloc::HugePageAlloc;

fn main() {
    itt::base::util::tune_allocator();
    itt::base::util::tune_threads();
    let cli = match itt::cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(), // --help, --version
        Err(e) => {
            // One line, like every other error: clap's message with its hints joined.
            let text = e.render().to_string();
            let parts: Vec<&str> = text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with("For more information"))
                .collect();
            eprintln!("{}", parts.join(" "));
            std::process::exit(2);
        }
    };
    match itt::base::util::on_worker_thread(|| itt::cli::run(cli)) {
        Ok(()) => {}
        Err(e @ itt::Error::Preempted { .. }) => {
            // Not a failure: every rank stopped at the same step and the checkpoint is written,
            // so MPI is finalised normally and the status tells a requeue script to resume.
            let _ = std::io::stdout().flush();
            eprint_line(&format!("itt: {e}"));
            itt::base::dist::finalize();
            std::process::exit(itt::train::preempt::EXIT_PREEMPTED);
        }
        Err(e) => fail(e),
    }
    itt::base::dist::finalize();
}

fn fail(e: itt::Error) -> ! {
    let _ = std::io::stdout().flush();
    eprint_line(&format!("error: {}", itt::base::error::one_line(e.to_string())));
    // Under mpirun the other ranks may be waiting for this one in a collective.
    itt::base::dist::abort_job(1);
    std::process::exit(1);
}

/// `line` and its newline on stderr in one write: under mpirun, stderr is forwarded in the
/// chunks it was written in, and `eprintln!` writes a formatted line in pieces, which came out
/// split by mpirun's abort report.
fn eprint_line(line: &str) {
    let _ = std::io::stderr().write_all(format!("{line}\n").as_bytes());
}
