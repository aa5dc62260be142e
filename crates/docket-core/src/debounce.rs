//! Debounce: collapsing triggers with the same key within a window into one
//! run (docs/FLOW_CONTROL.md, "Debounce").
//!
//! A job (or one trigger) declares a key template (the same template
//! language as concurrency keys, [`crate::concurrency::KeyTemplate`]), a
//! window and which input to keep. The key is rendered once, at trigger
//! time; the store decides, per (tenant, job, key), whether a trigger opens
//! a new window with a new run or is collapsed into the current window's
//! run (`docket_store::plan::debounce`).

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Which trigger's input the collapsed run keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Keep {
    /// Throttle: the first trigger makes a run that is due at once (or at
    /// its `run_after`); every trigger with the same key within the window
    /// after it returns that run and its input is dropped.
    First,
    /// Debounce: the first trigger makes a run that is due when the window
    /// after it ends (a fixed window: later triggers do not push it back);
    /// each later trigger within the window replaces the run's input while
    /// the run has not started.
    Last,
}

impl Keep {
    /// The stored and configured name: `first` or `last`.
    pub fn as_str(self) -> &'static str {
        match self {
            Keep::First => "first",
            Keep::Last => "last",
        }
    }
}

impl fmt::Display for Keep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Keep {
    type Err = String;
    fn from_str(s: &str) -> Result<Keep, String> {
        match s {
            "first" => Ok(Keep::First),
            "last" => Ok(Keep::Last),
            other => Err(format!(
                "`{other}` is not a debounce mode: use \"first\" (the first trigger runs at once, later ones are dropped) or \"last\" (the run waits for the window to end and takes the last input)"
            )),
        }
    }
}

/// The longest window: 366 days (a window end must stay a representable
/// time, and a longer one is a configuration mistake).
pub const MAX_WINDOW_MS: i64 = 366 * 86_400_000;

/// Checks a window length in milliseconds: at least 1 ms and at most
/// [`MAX_WINDOW_MS`]. The message does not name the field; the caller
/// prefixes it.
pub fn check_window_ms(ms: i64) -> Result<i64, String> {
    if ms <= 0 {
        return Err(format!("must be a positive duration, not {ms} ms"));
    }
    if ms > MAX_WINDOW_MS {
        return Err(format!(
            "must be at most {MAX_WINDOW_MS} ms (366 days), not {ms} ms"
        ));
    }
    Ok(ms)
}

/// Parses a window like `"30s"`, `"5m"`, `"500ms"` (the durations of
/// schedules) and checks it ([`check_window_ms`]). The message does not
/// name the field.
pub fn parse_window(text: &str) -> Result<i64, String> {
    let ms = crate::schedule::parse_duration_ms("window", text).map_err(|e| e.message)?;
    check_window_ms(ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_have_names() {
        assert_eq!("first".parse::<Keep>(), Ok(Keep::First));
        assert_eq!("last".parse::<Keep>(), Ok(Keep::Last));
        assert_eq!(Keep::Last.to_string(), "last");
        let e = "latest".parse::<Keep>().unwrap_err();
        assert!(e.contains("`latest` is not a debounce mode"), "{e}");
    }

    #[test]
    fn windows_are_positive_and_bounded() {
        assert_eq!(parse_window("30s"), Ok(30_000));
        assert_eq!(parse_window("250ms"), Ok(250));
        for bad in ["0s", "-5s", "soon", ""] {
            assert!(parse_window(bad).is_err(), "{bad}");
        }
        assert!(check_window_ms(0).is_err());
        assert!(check_window_ms(-1).is_err());
        assert!(check_window_ms(MAX_WINDOW_MS + 1).is_err());
        assert_eq!(check_window_ms(1), Ok(1));
    }
}
