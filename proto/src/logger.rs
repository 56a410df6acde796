//! A small logger for the `log` facade: one line per event,
//! `ts level target: message key=value ...`, written to stderr.
//!
//! The level comes from `WRENN_LOG` (`error`, `warn`, `info`, `debug`, `trace`; default `info`).
//! Fields are written by the caller inside the message (`info!("started pid={pid}")`) so the
//! logger stays a plain formatter with no allocation beyond one line buffer.

use std::io::Write;
use std::time::{SystemTime, UNIX_EPOCH};

use log::{Level, LevelFilter, Log, Metadata, Record};

struct Logger {
    level: LevelFilter,
}

static LOGGER: std::sync::OnceLock<Logger> = std::sync::OnceLock::new();

/// Installs the logger once; later calls are no-ops. Reads `WRENN_LOG`.
pub fn init() {
    let level = std::env::var("WRENN_LOG")
        .ok()
        .and_then(|s| parse_level(&s))
        .unwrap_or(LevelFilter::Info);
    init_with(level);
}

/// Installs the logger with an explicit level (tests, tools).
pub fn init_with(level: LevelFilter) {
    let logger = LOGGER.get_or_init(|| Logger { level });
    if log::set_logger(logger).is_ok() {
        log::set_max_level(logger.level);
    }
}

/// Parses a level name as `WRENN_LOG` accepts it.
pub fn parse_level(s: &str) -> Option<LevelFilter> {
    match s.trim().to_ascii_lowercase().as_str() {
        "off" => Some(LevelFilter::Off),
        "error" => Some(LevelFilter::Error),
        "warn" => Some(LevelFilter::Warn),
        "info" => Some(LevelFilter::Info),
        "debug" => Some(LevelFilter::Debug),
        "trace" => Some(LevelFilter::Trace),
        _ => None,
    }
}

impl Log for Logger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= self.level
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let line = format_line(
            SystemTime::now(),
            record.level(),
            record.target(),
            record.args(),
        );
        // A failed write to stderr has nowhere to be reported.
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }

    fn flush(&self) {
        let _ = std::io::stderr().flush();
    }
}

/// Formats one log line: RFC 3339 UTC time with milliseconds, level, target, message.
pub fn format_line(
    now: SystemTime,
    level: Level,
    target: &str,
    args: &std::fmt::Arguments<'_>,
) -> String {
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let (y, mo, d, h, mi, s) = civil_from_unix(since.as_secs());
    let level = match level {
        Level::Error => "ERROR",
        Level::Warn => "WARN",
        Level::Info => "INFO",
        Level::Debug => "DEBUG",
        Level::Trace => "TRACE",
    };
    let mut line = format!(
        "{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{:03}Z {level} {target}: {args}\n",
        since.subsec_millis()
    );
    // One event, one line: a message carrying newlines would break line-based collectors.
    if line[..line.len() - 1].contains('\n') {
        let body = line[..line.len() - 1].replace('\n', "\\n");
        line = body + "\n";
    }
    line
}

/// Converts seconds since the Unix epoch to (year, month, day, hour, minute, second) in UTC.
/// Howard Hinnant's days-from-civil inverse; valid for every u64 second count we can see.
pub fn civil_from_unix(secs: u64) -> (i64, u32, u32, u32, u32, u32) {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = if m <= 2 { y + 1 } else { y };
    (
        y,
        m,
        d,
        (rem / 3600) as u32,
        ((rem % 3600) / 60) as u32,
        (rem % 60) as u32,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_unix(0), (1970, 1, 1, 0, 0, 0));
        assert_eq!(civil_from_unix(951_782_400), (2000, 2, 29, 0, 0, 0));
        assert_eq!(civil_from_unix(1_795_910_399), (2026, 11, 28, 23, 59, 59));
    }

    #[test]
    fn line_shape() {
        let t = UNIX_EPOCH + Duration::from_millis(1_795_910_400_123);
        let line = format_line(
            t,
            Level::Info,
            "agent",
            &format_args!("started port={}", 7710),
        );
        assert_eq!(
            line,
            "2026-11-29T00:00:00.123Z INFO agent: started port=7710\n"
        );
        let line = format_line(t, Level::Warn, "x", &format_args!("a\nb"));
        assert_eq!(line, "2026-11-29T00:00:00.123Z WARN x: a\\nb\n");
    }

    #[test]
    fn levels() {
        assert_eq!(parse_level("DEBUG"), Some(LevelFilter::Debug));
        assert_eq!(parse_level("nope"), None);
    }
}
