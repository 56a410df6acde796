//! Aligned text tables for people (the default output; `--json` is for scripts).

#![forbid(unsafe_code)]

/// A table: a header row and data rows, rendered with columns padded to their widest cell.
#[derive(Debug, Default)]
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Table {
        Table {
            header: header.iter().map(|h| (*h).to_owned()).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row; missing cells are empty, extra cells are a programmer error.
    pub fn row(&mut self, cells: Vec<String>) {
        assert!(cells.len() <= self.header.len(), "row wider than header");
        self.rows.push(cells);
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Renders with two spaces between columns and no trailing spaces. Control characters
    /// in cells are shown escaped so a value cannot break the layout or the terminal.
    pub fn render(&self) -> String {
        let clean =
            |s: &str| -> String { s.chars().flat_map(char::escape_default).collect::<String>() };
        let clean_cell = |s: &str| -> String {
            if s.chars().any(char::is_control) {
                clean(s)
            } else {
                s.to_owned()
            }
        };
        let rows: Vec<Vec<String>> = std::iter::once(&self.header)
            .chain(self.rows.iter())
            .map(|r| r.iter().map(|c| clean_cell(c)).collect())
            .collect();
        let mut widths = vec![0; self.header.len()];
        for r in &rows {
            for (i, c) in r.iter().enumerate() {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
        let mut out = String::new();
        for r in &rows {
            let mut line = String::new();
            for (i, w) in widths.iter().enumerate() {
                let c = r.get(i).map(String::as_str).unwrap_or("");
                line.push_str(c);
                if i + 1 < widths.len() {
                    line.push_str(&" ".repeat(w - c.chars().count() + 2));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// A `*_unix_ns` time as `YYYY-MM-DD HH:MM:SS` UTC ("-" for 0).
pub fn time(ns: i64) -> String {
    if ns <= 0 {
        return "-".into();
    }
    let secs = ns / 1_000_000_000;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// An enum value name without its type prefix, lower-cased: `SANDBOX_STATE_RUNNING` -> `running`.
pub fn short_enum(name: &str, prefix: &str) -> String {
    name.strip_prefix(prefix)
        .unwrap_or(name)
        .to_ascii_lowercase()
}

/// Bytes for people: `512 B`, `1.5 MiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligns_columns_and_escapes_controls() {
        let mut t = Table::new(&["ID", "STATE", "NOTE"]);
        t.row(vec!["sb-1".into(), "running".into(), String::new()]);
        t.row(vec!["sb-22".into(), "x\ny".into(), "z".into()]);
        t.row(vec!["sb-3".into()]);
        assert_eq!(
            t.render(),
            "ID     STATE    NOTE\nsb-1   running\nsb-22  x\\ny     z\nsb-3\n"
        );
    }

    #[test]
    fn times_bytes_enums() {
        assert_eq!(time(0), "-");
        assert_eq!(time(1_700_000_000_000_000_000), "2023-11-14 22:13:20");
        assert_eq!(time(951_782_400_000_000_000), "2000-02-29 00:00:00");
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(
            short_enum("SANDBOX_STATE_RUNNING", "SANDBOX_STATE_"),
            "running"
        );
    }
}
