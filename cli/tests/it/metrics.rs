//! A strict parser of the Prometheus text exposition format (version 0.0.4), used on the
//! `/metrics` pages of ctl and the agent.
//!
//! Strict: every sample belongs to a family announced by `# TYPE` before it; names and label
//! names match the format's grammar; label values are quoted with only `\\`, `\"`, `\n`
//! escapes; values are floats (or `NaN`, `+Inf`, `-Inf`); a family is announced once;
//! counters end in `_total`... is a convention, not checked; histogram families have
//! `_bucket` samples with a `le` label in increasing order ending at `+Inf`, cumulative
//! counts, and `_sum`/`_count` with `_count` equal to the `+Inf` bucket.

use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

#[derive(Debug, Default)]
pub struct Exposition {
    /// family name -> type
    pub types: BTreeMap<String, String>,
    pub samples: Vec<Sample>,
}

impl Exposition {
    /// The value of the unlabelled sample `name`.
    pub fn value(&self, name: &str) -> Option<f64> {
        self.samples
            .iter()
            .find(|s| s.name == name && s.labels.is_empty())
            .map(|s| s.value)
    }
    /// Sum of every sample named `name`, whatever its labels.
    pub fn sum(&self, name: &str) -> f64 {
        self.samples
            .iter()
            .filter(|s| s.name == name)
            .map(|s| s.value)
            .sum()
    }
}

fn is_name(s: &str, colons: bool) -> bool {
    let mut chars = s.chars();
    let first_ok = |c: char| c.is_ascii_alphabetic() || c == '_' || (colons && c == ':');
    match chars.next() {
        Some(c) if first_ok(c) => {}
        _ => return false,
    }
    chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || (colons && c == ':'))
}

fn parse_value(s: &str) -> Result<f64, String> {
    match s {
        "NaN" => Ok(f64::NAN),
        "+Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        _ => {
            if s.is_empty() || s.contains(|c: char| !(c.is_ascii_digit() || "+-.eE".contains(c))) {
                return Err(format!("bad value {s:?}"));
            }
            s.parse::<f64>().map_err(|_| format!("bad value {s:?}"))
        }
    }
}

/// The family a sample name belongs to, given the declared types.
fn family_of<'a>(name: &'a str, types: &BTreeMap<String, String>) -> Option<&'a str> {
    if types.contains_key(name) {
        return Some(name);
    }
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix) {
            if matches!(
                types.get(base).map(String::as_str),
                Some("histogram" | "summary")
            ) {
                return Some(base);
            }
        }
    }
    None
}

fn parse_labels(s: &str, line_no: usize) -> Result<Vec<(String, String)>, String> {
    let err = |m: &str| format!("line {line_no}: {m}");
    let mut labels: Vec<(String, String)> = Vec::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let eq = s[i..].find('=').ok_or_else(|| err("label without ="))? + i;
        let name = &s[i..eq];
        if !is_name(name, false) {
            return Err(err(&format!("bad label name {name:?}")));
        }
        if labels.iter().any(|(n, _)| n == name) {
            return Err(err(&format!("label {name} twice")));
        }
        i = eq + 1;
        if b.get(i) != Some(&b'"') {
            return Err(err("label value not quoted"));
        }
        i += 1;
        let mut value = String::new();
        loop {
            match b.get(i) {
                None => return Err(err("unterminated label value")),
                Some(b'"') => {
                    i += 1;
                    break;
                }
                Some(b'\\') => {
                    match b.get(i + 1) {
                        Some(b'\\') => value.push('\\'),
                        Some(b'"') => value.push('"'),
                        Some(b'n') => value.push('\n'),
                        _ => return Err(err("bad escape in label value")),
                    }
                    i += 2;
                }
                Some(b'\n') => return Err(err("newline in label value")),
                Some(_) => {
                    let ch = s[i..].chars().next().unwrap();
                    value.push(ch);
                    i += ch.len_utf8();
                }
            }
        }
        labels.push((name.to_owned(), value));
        match b.get(i) {
            None => break,
            Some(b',') => i += 1,
            Some(_) => return Err(err("expected , between labels")),
        }
    }
    Ok(labels)
}

/// Parses a whole exposition, strictly.
pub fn parse(text: &str) -> Result<Exposition, String> {
    let mut e = Exposition::default();
    let mut helps: BTreeMap<String, ()> = BTreeMap::new();
    if !text.is_empty() && !text.ends_with('\n') {
        return Err("exposition does not end with a newline".into());
    }
    for (n, line) in text.lines().enumerate() {
        let line_no = n + 1;
        let err = |m: String| format!("line {line_no}: {m}: {line:?}");
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            match parts.next() {
                Some("TYPE") => {
                    let name = parts
                        .next()
                        .ok_or_else(|| err("TYPE without name".into()))?;
                    let ty = parts
                        .next()
                        .ok_or_else(|| err("TYPE without type".into()))?;
                    if !is_name(name, true) {
                        return Err(err("bad metric name".into()));
                    }
                    if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&ty) {
                        return Err(err(format!("unknown type {ty}")));
                    }
                    if e.types.insert(name.to_owned(), ty.to_owned()).is_some() {
                        return Err(err("family typed twice".into()));
                    }
                    if e.samples
                        .iter()
                        .any(|s| family_of(&s.name, &e.types) == Some(name))
                    {
                        return Err(err("TYPE after the family's samples".into()));
                    }
                }
                Some("HELP") => {
                    let name = parts
                        .next()
                        .ok_or_else(|| err("HELP without name".into()))?;
                    if !is_name(name, true) {
                        return Err(err("bad metric name".into()));
                    }
                    if helps.insert(name.to_owned(), ()).is_some() {
                        return Err(err("HELP twice".into()));
                    }
                }
                _ => {} // other comments are allowed
            }
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let (name_labels, rest) = match line.find('{') {
            Some(open) => {
                let close = line.rfind('}').ok_or_else(|| err("unclosed {".into()))?;
                if close < open {
                    return Err(err("} before {".into()));
                }
                (&line[..=close], line[close + 1..].to_owned())
            }
            None => {
                let sp = line
                    .find(' ')
                    .ok_or_else(|| err("sample without value".into()))?;
                (&line[..sp], line[sp..].to_owned())
            }
        };
        let (name, labels) = match name_labels.find('{') {
            Some(open) => (
                &name_labels[..open],
                parse_labels(&name_labels[open + 1..name_labels.len() - 1], line_no)?,
            ),
            None => (name_labels, Vec::new()),
        };
        if !is_name(name, true) {
            return Err(err(format!("bad metric name {name:?}")));
        }
        let rest = rest
            .strip_prefix(' ')
            .ok_or_else(|| err("no single space before the value".into()))?;
        let mut fields = rest.split(' ');
        let value = parse_value(fields.next().unwrap_or("")).map_err(err)?;
        if let Some(ts) = fields.next() {
            ts.parse::<i64>()
                .map_err(|_| err(format!("bad timestamp {ts:?}")))?;
        }
        if fields.next().is_some() {
            return Err(err("trailing fields".into()));
        }
        if family_of(name, &e.types).is_none() {
            return Err(err(format!("sample {name} before its # TYPE")));
        }
        if e.samples
            .iter()
            .any(|s| s.name == name && s.labels == labels)
        {
            return Err(err("duplicate sample".into()));
        }
        e.samples.push(Sample {
            name: name.to_owned(),
            labels,
            value,
        });
    }
    check_histograms(&e)?;
    Ok(e)
}

/// A sample's labels, in order.
type Labels = Vec<(String, String)>;

fn check_histograms(e: &Exposition) -> Result<(), String> {
    for (family, ty) in &e.types {
        if ty != "histogram" {
            continue;
        }
        // Group bucket samples by their labels other than `le`.
        let mut series: BTreeMap<Labels, Vec<(f64, f64)>> = BTreeMap::new();
        for s in e
            .samples
            .iter()
            .filter(|s| s.name == format!("{family}_bucket"))
        {
            let le = s
                .labels
                .iter()
                .find(|(n, _)| n == "le")
                .ok_or_else(|| format!("{family}_bucket without le"))?;
            let le = parse_value(&le.1).map_err(|m| format!("{family}: le {m}"))?;
            let rest: Vec<(String, String)> = s
                .labels
                .iter()
                .filter(|(n, _)| n != "le")
                .cloned()
                .collect();
            series.entry(rest).or_default().push((le, s.value));
        }
        if series.is_empty() {
            return Err(format!("histogram {family} has no buckets"));
        }
        for (labels, buckets) in series {
            for w in buckets.windows(2) {
                if w[1].0 <= w[0].0 {
                    return Err(format!("{family}{labels:?}: le not increasing"));
                }
                if w[1].1 < w[0].1 {
                    return Err(format!("{family}{labels:?}: buckets not cumulative"));
                }
            }
            let last = buckets.last().unwrap();
            if last.0 != f64::INFINITY {
                return Err(format!("{family}{labels:?}: no +Inf bucket"));
            }
            let count = e
                .samples
                .iter()
                .find(|s| s.name == format!("{family}_count") && s.labels == labels)
                .ok_or_else(|| format!("{family}{labels:?}: no _count"))?;
            if count.value != last.1 {
                return Err(format!("{family}{labels:?}: _count != +Inf bucket"));
            }
            if !e
                .samples
                .iter()
                .any(|s| s.name == format!("{family}_sum") && s.labels == labels)
            {
                return Err(format!("{family}{labels:?}: no _sum"));
            }
        }
    }
    Ok(())
}

#[test]
fn parser_accepts_good_text() {
    let text = "# HELP a_total Things.\n# TYPE a_total counter\na_total 3\n# TYPE g gauge\ng{k=\"v\\\"x\",z=\"\"} -1.5 1700000000000\n# TYPE h histogram\nh_bucket{le=\"0.1\"} 1\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 2\nh_sum 0.7\nh_count 2\n";
    let e = parse(text).unwrap();
    assert_eq!(e.value("a_total"), Some(3.0));
    assert_eq!(e.samples[1].labels[0].1, "v\"x");
    assert_eq!(e.sum("h_bucket"), 5.0);
}

#[test]
fn parser_rejects_bad_text() {
    let bad = [
        ("a 1\n", "sample before TYPE"),
        ("# TYPE a counter\na 1", "no final newline"),
        ("# TYPE a counter\na  1\n", "two spaces"),
        ("# TYPE a counter\na x\n", "bad value"),
        ("# TYPE a counter\na 1 2 3\n", "trailing fields"),
        ("# TYPE a counter\na{k=v} 1\n", "unquoted label"),
        ("# TYPE a counter\na{k=\"v} 1\n", "unterminated"),
        ("# TYPE a counter\na{k=\"\\t\"} 1\n", "bad escape"),
        ("# TYPE a counter\na{1k=\"v\"} 1\n", "bad label name"),
        ("# TYPE a counter\na{k=\"v\",k=\"w\"} 1\n", "label twice"),
        ("# TYPE a counter\na 1\na 2\n", "duplicate sample"),
        ("# TYPE a counter\n# TYPE a gauge\n", "typed twice"),
        ("# TYPE a widget\n", "unknown type"),
        ("# TYPE 9a counter\n", "bad name"),
        ("# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_sum 1\nh_count 1\n", "not cumulative"),
        ("# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_sum 1\nh_count 1\n", "no +Inf"),
        ("# TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_sum 1\nh_count 1\n", "count mismatch"),
        ("# TYPE h histogram\nh_bucket{le=\"+Inf\"} 1\nh_count 1\n", "no sum"),
        ("# TYPE h histogram\nh_sum 1\n", "no buckets"),
    ];
    for (text, why) in bad {
        assert!(parse(text).is_err(), "accepted ({why}): {text:?}");
    }
}
