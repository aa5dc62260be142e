//! Writing to stdout without panicking on a closed pipe.
//!
//! `println!` panics when stdout is a pipe whose reader has gone
//! (`docket runs show ID | head -1`): Rust ignores SIGPIPE, so the write
//! fails with `EPIPE` and `println!` turns that into a panic (exit 101).
//! Other CLIs end quietly there. `outln!` drops the output instead and
//! remembers why, so the command finishes what it was doing (a demo cleans
//! up its temporary files, `runs wait` keeps its exit code) without printing
//! more.

use std::io::{ErrorKind, Write};
use std::sync::Mutex;

/// The first write error other than a closed pipe, reported by `main`.
static FAILED: Mutex<Option<String>> = Mutex::new(None);
/// Set once a write failed: later output is dropped, not attempted.
static CLOSED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Writes `args` to stdout; after a failed write, does nothing.
pub fn write(args: std::fmt::Arguments<'_>) {
    use std::sync::atomic::Ordering;
    if CLOSED.load(Ordering::Relaxed) {
        return;
    }
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = stdout.write_fmt(args) {
        CLOSED.store(true, Ordering::Relaxed);
        // A reader that stopped reading is normal (`| head`); anything else
        // (a full disk) is the command's failure.
        if e.kind() != ErrorKind::BrokenPipe {
            let mut failed = FAILED.lock().unwrap_or_else(|p| p.into_inner());
            failed.get_or_insert_with(|| format!("writing to stdout: {e}"));
        }
    }
}

/// The error of a failed stdout write other than a closed pipe, if any.
pub fn failure() -> Option<String> {
    FAILED.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

/// `println!` for the command's output: a closed stdout ends the output
/// quietly instead of panicking (see the `out` module).
macro_rules! outln {
    () => {
        $crate::out::write(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::out::write(format_args!("{}\n", format_args!($($arg)*)))
    };
}
