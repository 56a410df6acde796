//! A small JSON value for `--json` output, written by hand so the CLI links no JSON crate.
//! Messages map to it through the generated `gen_json.rs`, with the HTTP gateway's rules:
//! snake_case field names, 64-bit integers as strings, bytes as base64, enums by name.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::fmt::Write as _;

#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    /// A number, already rendered.
    Number(String),
    String(String),
    Array(Vec<Value>),
    Object(Map),
}

/// A JSON object with sorted keys (the gateway's order too).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Map(BTreeMap<String, Value>);

impl Map {
    pub fn new() -> Map {
        Map(BTreeMap::new())
    }
    pub fn insert(&mut self, k: String, v: Value) -> Option<Value> {
        self.0.insert(k, v)
    }
    pub fn get(&self, k: &str) -> Option<&Value> {
        self.0.get(k)
    }
}

impl FromIterator<(String, Value)> for Map {
    fn from_iter<I: IntoIterator<Item = (String, Value)>>(iter: I) -> Map {
        Map(iter.into_iter().collect())
    }
}

impl From<u32> for Value {
    fn from(v: u32) -> Value {
        Value::Number(v.to_string())
    }
}
impl From<i32> for Value {
    fn from(v: i32) -> Value {
        Value::Number(v.to_string())
    }
}
impl From<bool> for Value {
    fn from(v: bool) -> Value {
        Value::Bool(v)
    }
}
impl From<&str> for Value {
    fn from(v: &str) -> Value {
        Value::String(v.to_owned())
    }
}

impl Value {
    pub fn get(&self, k: &str) -> Option<&Value> {
        match self {
            Value::Object(m) => m.get(k),
            _ => None,
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }
}

/// A message as JSON.
pub trait ToJson {
    fn to_json(&self) -> Value;
}

pub fn i64_out(x: i64) -> Value {
    Value::String(x.to_string())
}
pub fn u64_out(x: u64) -> Value {
    Value::String(x.to_string())
}
pub fn f64_out(x: f64) -> Value {
    if x.is_nan() {
        Value::String("NaN".into())
    } else if x.is_infinite() {
        Value::String(if x > 0.0 { "Infinity" } else { "-Infinity" }.into())
    } else {
        // `{:?}` keeps a decimal point or exponent, so the text reads back as a float.
        Value::Number(format!("{x:?}"))
    }
}
pub fn enum_out(v: i32, name: Option<&'static str>) -> Value {
    match name {
        Some(n) => Value::String(n.to_owned()),
        None => Value::from(v),
    }
}
pub fn bytes_out(b: &[u8]) -> Value {
    Value::String(base64(b))
}

use proto::base64::encode as base64;

fn string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Renders compactly (`pretty` = false, one line: for NDJSON) or indented by two spaces.
pub fn render(v: &Value, pretty: bool) -> String {
    let mut out = String::new();
    write_value(&mut out, v, pretty, 0);
    out
}

fn write_value(out: &mut String, v: &Value, pretty: bool, depth: usize) {
    let nl = |out: &mut String, d: usize| {
        if pretty {
            out.push('\n');
            out.push_str(&"  ".repeat(d));
        }
    };
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => out.push_str(n),
        Value::String(s) => string(out, s),
        Value::Array(a) if a.is_empty() => out.push_str("[]"),
        Value::Array(a) => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                nl(out, depth + 1);
                write_value(out, x, pretty, depth + 1);
            }
            nl(out, depth);
            out.push(']');
        }
        Value::Object(m) if m.0.is_empty() => out.push_str("{}"),
        Value::Object(m) => {
            out.push('{');
            for (i, (k, x)) in m.0.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                nl(out, depth + 1);
                string(out, k);
                out.push(':');
                if pretty {
                    out.push(' ');
                }
                write_value(out, x, pretty, depth + 1);
            }
            nl(out, depth);
            out.push('}');
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::gen::wrenn::ctl::v1 as ctl;
    use proto::gen::wrenn::envd::v1 as envd;

    #[test]
    fn renders_messages_with_the_gateway_rules() {
        let mut sb = ctl::Sandbox {
            id: "sb-1".into(),
            state: ctl::SandboxState::Paused as i32,
            created_unix_ns: 1_764_000_000_000_000_001,
            vcpus: 2,
            ..Default::default()
        };
        sb.metadata.insert("k\"ey".into(), "v\n".into());
        let text = render(&sb.to_json(), false);
        assert!(
            text.contains("\"state\":\"SANDBOX_STATE_PAUSED\""),
            "{text}"
        );
        assert!(
            text.contains("\"created_unix_ns\":\"1764000000000000001\""),
            "{text}"
        );
        assert!(text.contains("\"vcpus\":2"), "{text}");
        assert!(
            text.contains("\"metadata\":{\"k\\\"ey\":\"v\\n\"}"),
            "{text}"
        );
        assert!(!text.contains('\n'));
        let ev = envd::ProcessEvent {
            event: Some(envd::process_event::Event::Output(envd::ProcessOutput {
                stream: 1,
                data: prost::bytes::Bytes::from_static(b"hi\n"),
                offset: 0,
            })),
        };
        assert_eq!(
            render(&ev.to_json(), false),
            r#"{"output":{"data":"aGkK","offset":"0","stream":"OUTPUT_STREAM_STDOUT"}}"#
        );
        let pretty = render(&ev.to_json(), true);
        assert!(
            pretty.contains("\n  \"output\": {\n    \"data\": \"aGkK\""),
            "{pretty}"
        );
        assert_eq!(render(&Value::String("\u{1}".into()), false), "\"\\u0001\"");
        assert_eq!(render(&f64_out(1.0), false), "1.0");
        assert_eq!(base64(b"ab"), "YWI=");
    }
}
