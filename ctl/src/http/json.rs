//! The JSON mapping of the API's protobuf messages, written by hand (no serde derive): the
//! [`Json`] trait, implemented for every message by the generated `gen_json.rs`, and the
//! helpers those impls call.
//!
//! Mapping rules (also stated in the OpenAPI document's description):
//! - field names are the `.proto` names, snake_case (`memory_mib`), not lowerCamelCase: the
//!   same spelling as the schema, the docs and the CLI's `--json`;
//! - every field is written, with its default when unset, except unset `optional` scalars,
//!   unset message fields and unset oneof arms, which are absent;
//! - 64-bit integers (`int64`, `uint64`) are written as decimal strings, as proto3 JSON does,
//!   because nanosecond timestamps exceed what a JavaScript number holds exactly; on input a
//!   decimal string or an integral JSON number is accepted;
//! - `bytes` are standard base64 with padding; input also accepts the URL-safe alphabet and
//!   missing padding;
//! - enums are written as their value names (`SANDBOX_STATE_RUNNING`); input accepts the
//!   name or the number;
//! - `null` stands for the default value; a field the message does not have, a value of the
//!   wrong type or range, or two arms of the same oneof are errors naming the field's path
//!   (`process.args[2]`).

use std::fmt;

use serde_json::{Map, Value};

/// A message that maps to and from JSON.
pub trait Json: Sized + Default {
    /// Its OpenAPI component name (`ctl.v1.Sandbox`).
    const SCHEMA: &'static str;
    /// The message as JSON.
    fn to_json(&self) -> Value;
    /// Parses the message from `v`; `path` names `v` in errors ("" for the top level).
    fn from_json_at(v: &Value, path: &str) -> Result<Self, JsonError>;
    /// Parses the message from a top-level JSON value.
    fn from_json(v: &Value) -> Result<Self, JsonError> {
        Self::from_json_at(v, "")
    }
}

/// `to_json(&msg)`.
pub fn to_json<M: Json>(m: &M) -> Value {
    m.to_json()
}

/// `from_json::<Msg>(&value)`.
pub fn from_json<M: Json>(v: &Value) -> Result<M, JsonError> {
    M::from_json(v)
}

/// Why a JSON value does not map to a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonError {
    /// Path of the offending value (`process.args[2]`); "" for the top level.
    pub path: String,
    pub kind: JsonErrorKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JsonErrorKind {
    /// The message has no field of this name.
    UnknownField,
    /// Wrong JSON type; holds what was expected.
    Type(&'static str),
    /// Right type, bad value (out of range, bad base64, unknown enum name).
    Value(String),
    /// A second arm of the named oneof.
    Oneof(String),
}

impl JsonError {
    pub fn unknown_field(path: &str, name: &str) -> JsonError {
        JsonError {
            path: field(path, name),
            kind: JsonErrorKind::UnknownField,
        }
    }
    pub fn oneof(path: &str, oneof: &str) -> JsonError {
        JsonError {
            path: path.to_owned(),
            kind: JsonErrorKind::Oneof(oneof.to_owned()),
        }
    }
    fn ty(path: &str, expected: &'static str) -> JsonError {
        JsonError {
            path: path.to_owned(),
            kind: JsonErrorKind::Type(expected),
        }
    }
    fn value(path: &str, why: impl Into<String>) -> JsonError {
        JsonError {
            path: path.to_owned(),
            kind: JsonErrorKind::Value(why.into()),
        }
    }
}

impl fmt::Display for JsonError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let at = if self.path.is_empty() {
            "the body"
        } else {
            self.path.as_str()
        };
        match &self.kind {
            JsonErrorKind::UnknownField => write!(f, "unknown field {at:?}"),
            JsonErrorKind::Type(t) => write!(f, "{at}: expected {t}"),
            JsonErrorKind::Value(w) => write!(f, "{at}: {w}"),
            JsonErrorKind::Oneof(o) => {
                write!(f, "{at}: more than one field of oneof {o:?} is set")
            }
        }
    }
}

impl std::error::Error for JsonError {}

/// Path of field `name` inside `path`.
pub fn field(path: &str, name: &str) -> String {
    if path.is_empty() {
        name.to_owned()
    } else {
        format!("{path}.{name}")
    }
}

/// Path of element `i` inside `path`.
pub fn index(path: &str, i: usize) -> String {
    format!("{path}[{i}]")
}

/// Path of map key `k` inside `path`.
pub fn key(path: &str, k: &str) -> String {
    format!("{path}[{k:?}]")
}

static EMPTY_OBJECT: std::sync::LazyLock<Map<String, Value>> = std::sync::LazyLock::new(Map::new);

pub fn object_or_null<'a>(v: &'a Value, path: &str) -> Result<&'a Map<String, Value>, JsonError> {
    match v {
        Value::Object(m) => Ok(m),
        Value::Null => Ok(&EMPTY_OBJECT),
        _ => Err(JsonError::ty(path, "an object")),
    }
}

pub fn array_or_null<'a>(v: &'a Value, path: &str) -> Result<&'a [Value], JsonError> {
    match v {
        Value::Array(a) => Ok(a),
        Value::Null => Ok(&[]),
        _ => Err(JsonError::ty(path, "an array")),
    }
}

pub fn string_in(v: &Value, path: &str) -> Result<String, JsonError> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Null => Ok(String::new()),
        _ => Err(JsonError::ty(path, "a string")),
    }
}

pub fn bool_in(v: &Value, path: &str) -> Result<bool, JsonError> {
    match v {
        Value::Bool(b) => Ok(*b),
        Value::Null => Ok(false),
        _ => Err(JsonError::ty(path, "a boolean")),
    }
}

/// An integer given as a JSON number (integral) or a decimal string.
fn integer(v: &Value, path: &str) -> Result<i128, JsonError> {
    match v {
        Value::Null => Ok(0),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                Ok(i128::from(i))
            } else if let Some(u) = n.as_u64() {
                Ok(i128::from(u))
            } else {
                Err(JsonError::value(path, "not an integer"))
            }
        }
        Value::String(s) => {
            let digits = s.strip_prefix('-').unwrap_or(s);
            if digits.is_empty() || digits.len() > 20 || !digits.bytes().all(|b| b.is_ascii_digit())
            {
                return Err(JsonError::value(
                    path,
                    format!("{s:?} is not a decimal integer"),
                ));
            }
            s.parse::<i128>()
                .map_err(|_| JsonError::value(path, format!("{s:?} is not a decimal integer")))
        }
        _ => Err(JsonError::ty(path, "an integer")),
    }
}

fn ranged<T: TryFrom<i128>>(v: &Value, path: &str, ty: &str) -> Result<T, JsonError> {
    let i = integer(v, path)?;
    T::try_from(i).map_err(|_| JsonError::value(path, format!("{i} is out of range for {ty}")))
}

pub fn i32_in(v: &Value, path: &str) -> Result<i32, JsonError> {
    ranged(v, path, "int32")
}
pub fn u32_in(v: &Value, path: &str) -> Result<u32, JsonError> {
    ranged(v, path, "uint32")
}
pub fn i64_in(v: &Value, path: &str) -> Result<i64, JsonError> {
    ranged(v, path, "int64")
}
pub fn u64_in(v: &Value, path: &str) -> Result<u64, JsonError> {
    ranged(v, path, "uint64")
}

pub fn f64_in(v: &Value, path: &str) -> Result<f64, JsonError> {
    match v {
        Value::Null => Ok(0.0),
        Value::Number(n) => n.as_f64().ok_or_else(|| JsonError::ty(path, "a number")),
        Value::String(s) => match s.as_str() {
            "NaN" => Ok(f64::NAN),
            "Infinity" => Ok(f64::INFINITY),
            "-Infinity" => Ok(f64::NEG_INFINITY),
            _ => s
                .parse::<f64>()
                .map_err(|_| JsonError::value(path, format!("{s:?} is not a number"))),
        },
        _ => Err(JsonError::ty(path, "a number")),
    }
}

pub fn f32_in(v: &Value, path: &str) -> Result<f32, JsonError> {
    let x = f64_in(v, path)?;
    if x.is_finite() && x.abs() > f64::from(f32::MAX) {
        return Err(JsonError::value(path, "out of range for float"));
    }
    // Narrowing is the point: the field is a float.
    #[allow(clippy::cast_possible_truncation)]
    Ok(x as f32)
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
        serde_json::Number::from_f64(x).map_or(Value::Null, Value::Number)
    }
}

/// An enum as its name, or its number when this build does not know the value.
pub fn enum_out(v: i32, name: Option<&'static str>) -> Value {
    match name {
        Some(n) => Value::String(n.to_owned()),
        None => Value::from(v),
    }
}

pub fn enum_in(
    v: &Value,
    path: &str,
    by_name: impl Fn(&str) -> Option<i32>,
) -> Result<i32, JsonError> {
    match v {
        Value::String(s) => {
            by_name(s).ok_or_else(|| JsonError::value(path, format!("unknown enum value {s:?}")))
        }
        Value::Number(_) => i32_in(v, path),
        Value::Null => Ok(0),
        _ => Err(JsonError::ty(path, "an enum name (string)")),
    }
}

pub fn bytes_out(b: &[u8]) -> Value {
    Value::String(base64_encode(b))
}

pub fn bytes_in(v: &Value, path: &str) -> Result<prost::bytes::Bytes, JsonError> {
    match v {
        Value::String(s) => base64_decode(s)
            .map(prost::bytes::Bytes::from)
            .ok_or_else(|| JsonError::value(path, "not valid base64")),
        Value::Null => Ok(prost::bytes::Bytes::new()),
        _ => Err(JsonError::ty(path, "a base64 string")),
    }
}

pub use proto::base64::{decode as base64_decode, encode as base64_encode};

/// Fuzz entry point: any bytes, read as JSON and mapped to request messages, never panic;
/// whatever maps must survive a round trip (`to_json` then `from_json` gives the message
/// back).
pub fn fuzz_json(data: &[u8]) {
    use proto::gen::wrenn::ctl::v1 as ctl;
    use proto::gen::wrenn::envd::v1 as envd;
    // Compared as JSON values: a NaN double (written as a string) equals itself, and map
    // entries compare regardless of order (prost encodes a HashMap in iteration order, so
    // comparing encoded bytes reported false mismatches; found by fuzzing).
    fn round<M: Json + prost::Message>(v: &Value) {
        if let Ok(m) = M::from_json(v) {
            let back = M::from_json(&m.to_json()).map(|b| b.to_json());
            assert_eq!(back, Ok(m.to_json()), "round trip of {}", M::SCHEMA);
        }
    }
    let Ok(v) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    round::<ctl::CreateSandboxRequest>(&v);
    round::<ctl::ExecRequest>(&v);
    round::<ctl::ListSandboxesRequest>(&v);
    round::<ctl::UploadRequest>(&v);
    round::<ctl::Sandbox>(&v);
    round::<envd::ProcessEvent>(&v);
    round::<envd::WriteHeader>(&v);
    round::<envd::GetMetricsResponse>(&v);
}

#[cfg(test)]
mod tests {
    /// The committed fuzz corpus keeps being replayed by `cargo test`.
    #[test]
    fn fuzz_corpus_replays() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/http_json");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).expect("corpus directory") {
            super::fuzz_json(&std::fs::read(e.unwrap().path()).unwrap());
            n += 1;
        }
        assert!(n > 0);
    }

    use super::*;
    use proto::gen::wrenn::ctl::v1 as ctl;
    use proto::gen::wrenn::envd::v1 as envd;
    use serde_json::json;

    #[test]
    fn sandbox_round_trip_uses_snake_names_strings_and_enum_names() {
        let mut sb = ctl::Sandbox {
            id: "sb-1".into(),
            state: ctl::SandboxState::Running as i32,
            memory_mib: 512,
            created_unix_ns: 1_764_000_000_000_000_000,
            ..Default::default()
        };
        sb.metadata.insert("k".into(), "v".into());
        let v = to_json(&sb);
        assert_eq!(v["state"], json!("SANDBOX_STATE_RUNNING"));
        assert_eq!(v["memory_mib"], json!(512));
        assert_eq!(v["created_unix_ns"], json!("1764000000000000000"));
        assert_eq!(v["metadata"], json!({"k": "v"}));
        assert_eq!(v["host_id"], json!(""));
        let back: ctl::Sandbox = from_json(&v).unwrap();
        assert_eq!(back, sb);
    }

    #[test]
    fn unknown_field_is_named_with_its_path() {
        let e = from_json::<ctl::ExecRequest>(&json!({"process": {"cmd": "ls", "argz": []}}))
            .unwrap_err();
        assert_eq!(e.path, "process.argz");
        assert_eq!(e.kind, JsonErrorKind::UnknownField);
        assert_eq!(e.to_string(), "unknown field \"process.argz\"");
    }

    #[test]
    fn types_ranges_and_enums_are_checked() {
        let e = from_json::<ctl::CreateSandboxRequest>(&json!({"vcpus": "x"})).unwrap_err();
        assert_eq!(e.path, "vcpus");
        let e =
            from_json::<ctl::CreateSandboxRequest>(&json!({"vcpus": 4294967296u64})).unwrap_err();
        assert!(e.to_string().contains("out of range"), "{e}");
        let e = from_json::<ctl::CreateSandboxRequest>(&json!({"vcpus": 1.5})).unwrap_err();
        assert_eq!(e.path, "vcpus");
        let e = from_json::<ctl::CreateSandboxRequest>(&json!({"on_timeout": "NOPE"})).unwrap_err();
        assert!(e.to_string().contains("NOPE"));
        let r: ctl::CreateSandboxRequest = from_json(
            &json!({"on_timeout": "TIMEOUT_POLICY_PAUSE", "timeout_s": "60", "wait": false}),
        )
        .unwrap();
        assert_eq!(r.on_timeout, ctl::TimeoutPolicy::Pause as i32);
        assert_eq!(r.timeout_s, 60);
        assert_eq!(r.wait, Some(false));
        let r: ctl::CreateSandboxRequest =
            from_json(&json!({"on_timeout": 1, "timeout_s": 60})).unwrap();
        assert_eq!(r.on_timeout, 1);
        assert_eq!(r.timeout_s, 60);
        assert!(from_json::<ctl::CreateSandboxRequest>(&json!([])).is_err());
        let e = from_json::<ctl::CreateSandboxRequest>(&json!({"metadata": {"a": 1}})).unwrap_err();
        assert_eq!(e.path, "metadata[\"a\"]");
    }

    #[test]
    fn oneofs_bytes_repeated_and_optional() {
        let ev = envd::ProcessEvent {
            event: Some(envd::process_event::Event::Output(envd::ProcessOutput {
                stream: envd::OutputStream::Stdout as i32,
                data: prost::bytes::Bytes::from_static(b"hi\n"),
                offset: 3,
            })),
        };
        let v = to_json(&ev);
        assert_eq!(
            v,
            json!({"output": {"stream": "OUTPUT_STREAM_STDOUT", "data": "aGkK", "offset": "3"}})
        );
        assert_eq!(from_json::<envd::ProcessEvent>(&v).unwrap(), ev);
        let e = from_json::<envd::ProcessSelector>(&json!({"pid": 1, "tag": "x"})).unwrap_err();
        assert!(matches!(e.kind, JsonErrorKind::Oneof(_)), "{e}");
        let s: envd::ProcessSelector = from_json(&json!({"tag": "x"})).unwrap();
        assert_eq!(
            s.selector,
            Some(envd::process_selector::Selector::Tag("x".into()))
        );
        let m = envd::MakeDirRequest {
            path: "/a".into(),
            mode: None,
            user: String::new(),
        };
        assert!(to_json(&m).get("mode").is_none());
        let m2: envd::MakeDirRequest = from_json(&json!({"path": "/a", "mode": 448})).unwrap();
        assert_eq!(m2.mode, Some(448));
        let c: envd::ProcessConfig = from_json(&json!({"cmd": "ls", "args": ["-l", "/"]})).unwrap();
        assert_eq!(c.args, vec!["-l".to_owned(), "/".to_owned()]);
        let e = from_json::<envd::ProcessConfig>(&json!({"args": ["-l", 3]})).unwrap_err();
        assert_eq!(e.path, "args[1]");
        let e = from_json::<ctl::ExecRequest>(&json!({"stdin": "***"})).unwrap_err();
        assert_eq!(e.path, "stdin");
    }

    #[test]
    fn fuzz_json_round_trips() {
        let cases = [
            r#"{"template": "minimal", "vcpus": 2, "metadata": {"a": "b"}, "wait": true, "on_timeout": 1}"#,
            r#"{"process": {"cmd": "ls", "args": ["-l"], "env": {"A": "1"}, "pty": {"rows": 1, "cols": 2}}, "stdin": "aGk=", "output_limit_bytes": "18446744073709551615"}"#,
            r#"{"states": [1, "SANDBOX_STATE_PAUSED", 77], "page_size": 4294967295}"#,
            r#"{"header": {"sandbox_id": "sb-x", "file": {"path": "/a", "mode": 420, "uid": 0}}}"#,
            r#"{"data": "-_8"}"#,
            r#"{"output": {"stream": 99, "data": "", "offset": "0"}}"#,
            r#"{"load_avg_1m": 1.5e300, "clock_offset_ns": "-9223372036854775808"}"#,
            r#"{"load_avg_1m": "NaN"}"#,
            r#"{"exited": {"signal": -1}}"#,
        ];
        for c in cases {
            fuzz_json(c.as_bytes());
        }
        // The NaN case: a NaN double does not equal itself, so it is checked apart.
        let m: proto::gen::wrenn::envd::v1::GetMetricsResponse =
            from_json(&json!({"load_avg_1m": "NaN"})).unwrap();
        assert!(m.load_avg_1m.is_nan());
        assert_eq!(to_json(&m)["load_avg_1m"], json!("NaN"));
    }

    #[test]
    fn empty_messages_reject_fields() {
        assert!(from_json::<ctl::DestroySandboxResponse>(&json!({})).is_ok());
        assert!(from_json::<ctl::DestroySandboxResponse>(&json!(null)).is_ok());
        let e = from_json::<ctl::DestroySandboxResponse>(&json!({"x": 1})).unwrap_err();
        assert_eq!(e.path, "x");
    }

    #[test]
    fn schemas_parse_and_cover_every_message() {
        let v: Value = serde_json::from_str(super::super::gen_json::SCHEMAS_JSON).unwrap();
        let s = v.as_object().unwrap();
        for name in [
            "ctl.v1.Sandbox",
            "envd.v1.ProcessEvent",
            "ctl.v1.SandboxState",
        ] {
            assert!(s.contains_key(name), "{name}");
        }
        assert_eq!(
            s["ctl.v1.Sandbox"]["properties"]["created_unix_ns"]["type"],
            json!("string")
        );
        assert_eq!(s["ctl.v1.Sandbox"]["additionalProperties"], json!(false));
    }
}
