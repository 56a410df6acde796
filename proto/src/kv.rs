//! The one `key=value` record format of wrenn's small state files (the agent's
//! `sandbox.conf`/`template.conf`/`identity.conf`, vmm-glue's `firecracker.state` and
//! `uffd.state`, wrenn-uffd's stats file).
//!
//! ```text
//! <format name> <version>\n        first line: which record, which version
//! key=value\n ...                   one field a line; every line ends with '\n'
//! ```
//! Keys and values are percent-escaped (`%`, `=`, bytes below 0x20 and 0x7f become `%XX`),
//! so any string, a path with a newline included, round-trips. Repeated values use indexed
//! keys (`cgroup.0`, `cgroup.1`) or a prefix map (`env.PATH`).
//!
//! **One rule for unknown keys: they are refused** ([`Reader::done`]). A record is read to
//! act on it (re-adopt a process, restore a sandbox); a reader that skipped a field it does
//! not know would act on half of it. A writer that adds a field an older reader must not
//! ignore bumps the version in the first line; readers accept the versions they know. (A
//! report of counters, such as wrenn-uffd's stats file, is looked up key by key instead: no
//! one acts on it.)

use std::collections::BTreeMap;
use std::fmt;

/// A record that does not parse: the 1-based line (0 = the record as a whole) and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvError {
    pub line: usize,
    pub reason: String,
}

impl fmt::Display for KvError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            f.write_str(&self.reason)
        } else {
            write!(f, "line {}: {}", self.line, self.reason)
        }
    }
}

impl std::error::Error for KvError {}

fn bad(line: usize, reason: impl Into<String>) -> KvError {
    KvError {
        line,
        reason: reason.into(),
    }
}

/// Escapes `%`, `=`, and bytes below 0x20 or 0x7f as `%XX`.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c == '%' || c == '=' || (c as u32) < 0x20 || c as u32 == 0x7f {
            out.push_str(&format!("%{:02X}", c as u32));
        } else {
            out.push(c);
        }
    }
    out
}

/// The inverse of [`escape`]; `None` for a malformed escape or bytes that are not UTF-8.
pub fn unescape(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            if !hex.bytes().all(|c| c.is_ascii_hexdigit()) {
                return None;
            }
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Builds a record's text.
pub struct Writer {
    out: String,
}

impl Writer {
    /// A record whose first line is `magic` (`"<format name> <version>"`).
    pub fn new(magic: &str) -> Writer {
        Writer {
            out: format!("{magic}\n"),
        }
    }

    pub fn put(&mut self, k: &str, v: &str) {
        self.out.push_str(&escape(k));
        self.out.push('=');
        self.out.push_str(&escape(v));
        self.out.push('\n');
    }

    /// `put` of anything displayable (numbers, paths through `.display()`).
    pub fn put_display(&mut self, k: &str, v: impl fmt::Display) {
        self.put(k, &v.to_string());
    }

    /// Every entry of `m` as `<prefix><key>=<value>`.
    pub fn map(&mut self, prefix: &str, m: &BTreeMap<String, String>) {
        for (k, v) in m {
            self.put(&format!("{prefix}{k}"), v);
        }
    }

    /// Every item as `<name>.<index>=<value>`.
    pub fn list<T: fmt::Display>(&mut self, name: &str, items: impl IntoIterator<Item = T>) {
        for (i, v) in items.into_iter().enumerate() {
            self.put_display(&format!("{name}.{i}"), v);
        }
    }

    pub fn finish(self) -> String {
        self.out
    }
}

/// A parsed record: take each known field, then [`Reader::done`] refuses what is left.
#[derive(Debug)]
pub struct Reader {
    fields: BTreeMap<String, String>,
}

impl Reader {
    /// Parses `text`, whose first line must be one of `magics` (the versions this reader
    /// knows). Returns the reader and the magic that matched. At most `lines_max` lines.
    pub fn parse<'m>(
        text: &str,
        magics: &[&'m str],
        lines_max: usize,
    ) -> Result<(Reader, &'m str), KvError> {
        let mut lines = text.split_terminator('\n');
        let first = lines.next().unwrap_or("");
        let Some(magic) = magics.iter().find(|m| **m == first) else {
            return Err(bad(1, format!("expected {:?}, found {first:?}", magics[0])));
        };
        if !text.ends_with('\n') {
            return Err(bad(0, "truncated (no final newline)"));
        }
        let mut fields = BTreeMap::new();
        for (n, line) in lines.enumerate() {
            let n = n + 2;
            if n > lines_max {
                return Err(bad(n, "too many lines"));
            }
            let (k, v) = line.split_once('=').ok_or_else(|| bad(n, "no '='"))?;
            let k = unescape(k).ok_or_else(|| bad(n, "bad escape in key"))?;
            let v = unescape(v).ok_or_else(|| bad(n, "bad escape in value"))?;
            if fields.insert(k.clone(), v).is_some() {
                return Err(bad(n, format!("duplicate key {k:?}")));
            }
        }
        Ok((Reader { fields }, magic))
    }

    pub fn take(&mut self, k: &str) -> Option<String> {
        self.fields.remove(k)
    }

    pub fn string(&mut self, k: &str) -> Result<String, KvError> {
        self.take(k)
            .ok_or_else(|| bad(0, format!("missing key {k:?}")))
    }

    pub fn with<T>(&mut self, k: &str, f: impl FnOnce(&str) -> Option<T>) -> Result<T, KvError> {
        let v = self.string(k)?;
        f(&v).ok_or_else(|| bad(0, format!("bad value {v:?} of {k:?}")))
    }

    pub fn num<T: std::str::FromStr>(&mut self, k: &str) -> Result<T, KvError> {
        self.with(k, |s| s.parse().ok())
    }

    pub fn opt_num<T: std::str::FromStr>(&mut self, k: &str) -> Result<Option<T>, KvError> {
        match self.take(k) {
            None => Ok(None),
            Some(v) => v
                .parse()
                .map(Some)
                .map_err(|_| bad(0, format!("bad value {v:?} of {k:?}"))),
        }
    }

    /// Every field whose key starts with `prefix`, keyed by the rest.
    pub fn map(&mut self, prefix: &str) -> BTreeMap<String, String> {
        let keys: Vec<String> = self
            .fields
            .range(prefix.to_owned()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, _)| k.clone())
            .collect();
        let mut m = BTreeMap::new();
        for k in keys {
            let v = self.fields.remove(&k).unwrap_or_default();
            m.insert(k[prefix.len()..].to_owned(), v);
        }
        m
    }

    /// The items written by [`Writer::list`], in index order; indexes must be 0..n.
    pub fn list(&mut self, name: &str) -> Result<Vec<String>, KvError> {
        let mut out = Vec::new();
        while let Some(v) = self.take(&format!("{name}.{}", out.len())) {
            out.push(v);
        }
        Ok(out)
    }

    /// Ends the read: any field not taken is an unknown key, and refused.
    pub fn done(self) -> Result<(), KvError> {
        match self.fields.keys().next() {
            None => Ok(()),
            Some(k) => Err(bad(0, format!("unknown key {k:?}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_any_string_and_refuses_unknown_keys() {
        let mut w = Writer::new("t 1");
        w.put("path", "/a b/c=d%e\nf\u{7f}");
        w.put_display("n", 42u32);
        w.list("cg", ["x", "y"]);
        let mut m = BTreeMap::new();
        m.insert("K".to_owned(), "v=1".to_owned());
        w.map("env.", &m);
        let text = w.finish();
        assert_eq!(text.lines().count(), 6, "{text}");
        let (mut r, magic) = Reader::parse(&text, &["t 2", "t 1"], 100).unwrap();
        assert_eq!(magic, "t 1");
        assert_eq!(r.string("path").unwrap(), "/a b/c=d%e\nf\u{7f}");
        assert_eq!(r.num::<u32>("n").unwrap(), 42);
        assert_eq!(r.list("cg").unwrap(), ["x", "y"]);
        assert_eq!(r.map("env."), m);
        r.done().unwrap();

        let (mut r, _) = Reader::parse("t 1\na=1\nb=2\n", &["t 1"], 100).unwrap();
        r.take("a");
        assert_eq!(r.done().unwrap_err().reason, "unknown key \"b\"");
    }

    #[test]
    fn refuses_malformed_records() {
        let p = |t: &str| Reader::parse(t, &["t 1"], 4).map(|_| ()).unwrap_err();
        assert_eq!(p("t 2\n").line, 1);
        assert!(p("t 1\na=1").reason.contains("truncated"));
        assert!(p("t 1\nnoequals\n").reason.contains("'='"));
        assert!(p("t 1\na=1\na=2\n").reason.contains("duplicate"));
        assert!(p("t 1\na=%zz\n").reason.contains("escape"));
        assert!(p("t 1\na=%\n").reason.contains("escape"));
        assert!(p("t 1\na=%FF\n").reason.contains("escape")); // not UTF-8
        assert!(p("t 1\na=1\nb=1\nc=1\nd=1\n").reason.contains("too many"));
    }
}
