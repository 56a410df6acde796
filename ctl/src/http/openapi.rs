//! The OpenAPI 3.1 document (`/openapi.yaml`), built from the route table and the generated
//! component schemas, rendered as YAML by a small emitter; and `/docs`, an HTML page
//! rendered from the same document with no external assets.

use std::fmt::Write as _;
use std::sync::LazyLock;

use serde_json::{json, Map, Value};

use super::handler::SCHEMAS;
use super::routes::{param_kind, Call, Input, Route, ROUTES};

const DESCRIPTION: &str = "\
The public API of wrenn-ctl over HTTP/1.1 and JSON. The same calls are served as framed \
protobuf (`wrenn.ctl.v1`, port 7700) over one service layer; this gateway listens on port 7701.

Authentication: every `/v1` call needs an API key in the `X-API-Key` header. A key acts for \
its team: every call sees only that team's resources (and the platform templates). A request \
without a key, or with a bad one, is answered 401 without its body being read, and the \
connection is closed.

JSON mapping of the protobuf messages: field names are the `.proto` names (snake_case); every \
field is written, with its default when unset, except unset optional scalars, unset messages \
and unset oneof arms; 64-bit integers are decimal strings (input also accepts JSON numbers); \
bytes are base64; enums are value names (input also accepts numbers); unknown fields are \
rejected with an error naming the field. Query parameters are the fields of the request \
message (`metadata.<key>=<value>` for maps, repeated parameters for lists).

IDs are `prefix-{uuid}` (`sb-`, `usr-`, `team-`, `key-`, `host-`, `tpl-`, `log-`) and are \
checked strictly; a bad ID is `invalid_argument` (400).

Errors: `{\"error\":{\"code\":\"...\",\"message\":\"...\"}}` with a stable code: \
invalid_argument 400, unauthenticated 401, permission_denied 403, not_found 404 (also for \
other teams' resources and unknown routes), method_not_allowed 405, request_timeout 408 (a \
request head or body not received in time; the message names the deadline), already_exists and aborted 409, failed_precondition 412, payload_too_large 413 (JSON bodies are limited to \
1 MiB; file transfers have no limit), unsupported_media_type 415, resource_exhausted 429, \
internal 500, unimplemented 501, unavailable 503 (also at the gateway's connection and \
queue bounds, with `Retry-After`), deadline_exceeded 504.

Streams: `exec/stream` and `processes/connect` answer chunked newline-delimited JSON, one \
`envd.v1.ProcessEvent` per line; a failure after the first line arrives as a last line \
`{\"error\":{...}}`. Uploads (raw or multipart) and `processes/stdin` take request bodies of any size, \
streamed. Downloads and directory listings stream without a size cap; a failure \
after the status line closes the connection before the final chunk, so the body is visibly \
truncated.

Links are cleartext on a private network for now; TLS is not implemented.";

fn id_pattern(kind: proto::id::Kind) -> String {
    format!(
        "^{}-[0-9a-f]{{8}}-[0-9a-f]{{4}}-[0-9a-f]{{4}}-[0-9a-f]{{4}}-[0-9a-f]{{12}}$",
        kind.prefix()
    )
}

fn error_responses(route: &Route) -> Map<String, Value> {
    let err = json!({"$ref": "#/components/responses/Error"});
    let mut m = Map::new();
    for s in [
        "400", "401", "403", "404", "409", "412", "429", "500", "503", "504",
    ] {
        m.insert(s.into(), err.clone());
    }
    if route.input == Input::Body || route.input == Input::None {
        m.insert("408".into(), err.clone());
        m.insert("413".into(), err.clone());
        m.insert("415".into(), err.clone());
    }
    m
}

fn parameters(route: &Route) -> Vec<Value> {
    let mut out = Vec::new();
    for p in route.params() {
        let mut schema = json!({"type": "string"});
        // An example value shows the kind; `current` is accepted for team ids.
        if let Some(kind) = param_kind(route, p, "x") {
            schema["pattern"] = Value::String(id_pattern(kind));
        }
        let desc = match p {
            "team_id" => "A team id (`team-{uuid}`) or `current` for the caller's team.",
            "template_id" if !route.renames.is_empty() => "A template id (`tpl-{uuid}`) or name.",
            _ => "A wire id.",
        };
        if p == "team_id" {
            schema = json!({"type": "string"});
        }
        out.push(json!({"name": p, "in": "path", "required": true, "description": desc, "schema": schema}));
    }
    if route.input == Input::Query {
        let props = SCHEMAS[route.input_schema]["properties"]
            .as_object()
            .cloned()
            .unwrap_or_default();
        let params = route.params();
        for (name, schema) in props {
            if params.iter().any(|p| route.field_of(p) == name) {
                continue;
            }
            let desc = schema["description"].as_str().unwrap_or("").to_owned();
            let is_map = schema["type"] == "object";
            let pname = if is_map {
                format!("{name}.*")
            } else {
                name.clone()
            };
            let mut p = json!({"name": pname, "in": "query", "required": false, "schema": schema});
            if is_map {
                p["description"] = Value::String(format!(
                    "{desc} Given as `{name}.<key>=<value>`, once per pair."
                ));
                p["style"] = json!("form");
            } else if !desc.is_empty() {
                p["description"] = Value::String(desc);
            }
            if schema["type"] == "array" {
                p["explode"] = json!(true);
            }
            out.push(p);
        }
    }
    out
}

fn schema_ref(name: &str) -> Value {
    json!({"$ref": format!("#/components/schemas/{name}")})
}

fn operation(route: &Route) -> Value {
    let mut op = Map::new();
    op.insert("operationId".into(), json!(route.operation));
    op.insert("summary".into(), json!(route.summary));
    op.insert("tags".into(), json!([route.tag]));
    let mut desc = format!("Calls `{}`.", route.rpc);
    if let Some(w) = route.wrap {
        let _ = write!(
            desc,
            " The {} is the `{w}` field of `{}`; path parameters fill the rest.",
            if route.input == Input::Query {
                "query"
            } else {
                "body"
            },
            route.request_schema
        );
    }
    op.insert("description".into(), json!(desc));
    let mut params = parameters(route);
    if let Call::Upload { .. } = route.call {
        params.push(json!({"name": super::handler::CRC32_HEADER, "in": "header", "required": false,
            "description": "The content's CRC-32 (IEEE, 8 hexadecimal digits, as `crc32` prints it). envd checks it against the bytes it received and wrote; a mismatch answers 500 `data_loss`, and an atomic upload then leaves nothing at the path.",
            "schema": {"type": "string", "pattern": "^[0-9a-fA-F]{8}$"}}));
    }
    if !params.is_empty() {
        op.insert("parameters".into(), Value::Array(params));
    }
    match route.call {
        Call::Stdin => {
            op.insert(
                "requestBody".into(),
                json!({"required": true, "description": "Bytes for the process's stdin, streamed (any size).",
                       "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}),
            );
        }
        Call::Upload { multipart: false } => {
            op.insert(
                "requestBody".into(),
                json!({"required": true, "description": "The file's content, streamed (any size).",
                       "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}),
            );
        }
        Call::Upload { multipart: true } => {
            op.insert(
                "requestBody".into(),
                json!({"required": true,
                       "description": "Form fields before the file part set fields of `envd.v1.WriteHeader` (e.g. `path`); the part named `file` (or with a filename) is the content, streamed.",
                       "content": {"multipart/form-data": {"schema": {"type": "object",
                           "properties": {"path": {"type": "string"}, "file": {"type": "string", "format": "binary"}},
                           "required": ["file"]}}}}),
            );
        }
        _ if route.input == Input::Body => {
            op.insert(
                "requestBody".into(),
                json!({"required": true, "content": {"application/json": {"schema": schema_ref(route.input_schema)}}}),
            );
        }
        _ => {}
    }
    let ok = match route.call {
        Call::Unary { .. } | Call::Upload { .. } | Call::ListDir | Call::Stdin => json!({
            "description": "Success.",
            "content": {"application/json": {"schema": schema_ref(route.response_schema)}}}),
        Call::Ndjson { .. } => json!({
            "description": "Newline-delimited JSON: one object per line; a last line `{\"error\":...}` reports a failure after the first.",
            "content": {"application/x-ndjson": {"schema": schema_ref(route.response_schema)}}}),
        Call::Download => json!({
            "description": "The bytes of the range, streamed. Headers X-Wrenn-File-Size and X-Wrenn-File-Mode (octal) describe the file. The gateway checks envd's end-to-end CRC-32 of the bytes: on a mismatch it closes the connection before the body's end, so the transfer fails instead of delivering wrong bytes.",
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}),
    };
    let mut responses = Map::new();
    responses.insert(route.status.to_string(), ok);
    responses.extend(error_responses(route));
    op.insert("responses".into(), Value::Object(responses));
    op.insert("security".into(), json!([{"ApiKey": []}]));
    Value::Object(op)
}

/// The whole document as JSON.
pub fn document() -> Value {
    let mut paths: Map<String, Value> = Map::new();
    for r in ROUTES.iter() {
        let item = paths.entry(r.path.to_owned()).or_insert_with(|| json!({}));
        item[r.method.lower()] = operation(r);
    }
    let plain = |op: &str, summary: &str, ct: &str, schema: Value| {
        json!({"get": {"operationId": op, "summary": summary, "tags": ["service"], "security": [],
                       "responses": {"200": {"description": "Success.", "content": {ct: {"schema": schema}}}}}})
    };
    paths.insert(
        "/health".into(),
        json!({"get": {"operationId": "health", "summary": "Liveness: 200 when the service can answer, 503 with the reason otherwise",
                       "tags": ["service"], "security": [],
                       "responses": {
                           "200": {"description": "Healthy.", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Health"}}}},
                           "503": {"description": "Unhealthy.", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Health"}}}}}}}),
    );
    paths.insert(
        "/metrics".into(),
        plain(
            "metrics",
            "Prometheus text metrics",
            "text/plain",
            json!({"type": "string"}),
        ),
    );
    paths.insert(
        "/openapi.yaml".into(),
        plain(
            "openapi",
            "This document",
            "application/yaml",
            json!({"type": "string"}),
        ),
    );
    paths.insert(
        "/docs".into(),
        plain(
            "docs",
            "This document as an HTML page",
            "text/html",
            json!({"type": "string"}),
        ),
    );
    let mut schemas = SCHEMAS.as_object().cloned().unwrap_or_default();
    schemas.insert(
        "Error".into(),
        json!({"type": "object", "additionalProperties": false, "required": ["error"],
               "description": "Every error answer.",
               "properties": {"error": {"type": "object", "additionalProperties": false, "required": ["code", "message"],
                   "properties": {
                       "code": {"type": "string", "description": "Stable code (the call status code's snake_case name, or method_not_allowed, request_timeout, payload_too_large, unsupported_media_type)."},
                       "message": {"type": "string", "description": "Human-readable detail."}}}}}),
    );
    schemas.insert(
        "Health".into(),
        json!({"type": "object", "additionalProperties": false, "required": ["status"],
               "properties": {"status": {"type": "string", "enum": ["ok", "unavailable"]},
                              "reason": {"type": "string"}}}),
    );
    let mut tags: Vec<String> = ROUTES.iter().map(|r| r.tag.to_owned()).collect();
    tags.dedup();
    tags.push("service".into());
    json!({
        "openapi": "3.1.0",
        "info": {"title": "wrenn-ctl API", "version": env!("CARGO_PKG_VERSION"), "description": DESCRIPTION},
        "servers": [{"url": "http://127.0.0.1:7701"}],
        "tags": tags.iter().map(|t| json!({"name": t})).collect::<Vec<_>>(),
        "security": [{"ApiKey": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {"ApiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"}},
            "responses": {"Error": {"description": "An error.", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}},
            "schemas": schemas,
        }
    })
}

static YAML: LazyLock<String> = LazyLock::new(|| to_yaml(&document()));
static DOCS: LazyLock<String> = LazyLock::new(|| docs_page(&document()));

/// `/openapi.yaml`.
pub fn yaml() -> &'static str {
    &YAML
}

/// `/docs`.
pub fn docs_html() -> &'static str {
    &DOCS
}

/// Renders a JSON value as block-style YAML. Strings are always double-quoted with JSON
/// escapes (valid YAML), so no plain scalar can be misread (`yes`, `1.0`, `:`).
pub fn to_yaml(v: &Value) -> String {
    let mut out = String::new();
    yaml_value(&mut out, v, 0, false);
    out
}

/// A multi-line string as the lines of a `|-` literal block, when it can be one exactly:
/// printable text, no line starting with a space, no trailing whitespace on any line.
fn block_lines(v: &Value) -> Option<Vec<&str>> {
    let s = v.as_str()?;
    if !s.contains('\n') || s.ends_with('\n') || s.starts_with('\n') {
        return None;
    }
    let lines: Vec<&str> = s.split('\n').collect();
    let ok = lines.iter().all(|l| {
        !l.starts_with(' ')
            && !l.ends_with(' ')
            && !l.chars().any(|c| c.is_control() || c == '\u{feff}')
    });
    ok.then_some(lines)
}

fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::Null => Some("null".into()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Number(n) => Some(n.to_string()),
        Value::String(s) => Some(serde_json::to_string(s).unwrap_or_default()),
        Value::Array(a) if a.is_empty() => Some("[]".into()),
        Value::Object(o) if o.is_empty() => Some("{}".into()),
        _ => None,
    }
}

/// Keys written first, in this order, wherever they appear (the rest follow sorted), so the
/// document reads top-down: `openapi`, `info`, `paths` before `components`; an operation's
/// id and summary before its parameters and responses.
const KEY_ORDER: &[&str] = &[
    "openapi",
    "info",
    "title",
    "version",
    "servers",
    "tags",
    "security",
    "paths",
    "components",
    "operationId",
    "summary",
    "name",
    "in",
    "description",
    "type",
    "format",
    "parameters",
    "requestBody",
    "responses",
];

fn key_rank(k: &str) -> usize {
    KEY_ORDER
        .iter()
        .position(|x| *x == k)
        .unwrap_or(KEY_ORDER.len())
}

fn yaml_value(out: &mut String, v: &Value, indent: usize, _in_seq: bool) {
    let pad = " ".repeat(indent);
    match v {
        Value::Object(o) if !o.is_empty() => {
            let mut entries: Vec<(&String, &Value)> = o.iter().collect();
            // Stable: keys outside KEY_ORDER keep the map's sorted order.
            entries.sort_by_key(|(k, _)| key_rank(k));
            for (k, val) in entries {
                let key = serde_json::to_string(k).unwrap_or_default();
                if let Some(lines) = block_lines(val) {
                    let _ = writeln!(out, "{pad}{key}: |-");
                    for l in lines {
                        if l.is_empty() {
                            out.push('\n');
                        } else {
                            let _ = writeln!(out, "{pad}  {l}");
                        }
                    }
                    continue;
                }
                match scalar(val) {
                    Some(s) => {
                        let _ = writeln!(out, "{pad}{key}: {s}");
                    }
                    None => {
                        let _ = writeln!(out, "{pad}{key}:");
                        yaml_value(out, val, indent + 2, false);
                    }
                }
            }
        }
        Value::Array(a) if !a.is_empty() => {
            for item in a {
                match scalar(item) {
                    Some(s) => {
                        let _ = writeln!(out, "{pad}- {s}");
                    }
                    None => {
                        let _ = writeln!(out, "{pad}-");
                        yaml_value(out, item, indent + 2, true);
                    }
                }
            }
        }
        other => {
            let _ = writeln!(out, "{pad}{}", scalar(other).unwrap_or_default());
        }
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Inline `code` spans of descriptions.
fn md(s: &str) -> String {
    let e = esc(s);
    let mut out = String::new();
    for (i, part) in e.split('`').enumerate() {
        if i % 2 == 1 {
            let _ = write!(out, "<code>{part}</code>");
        } else {
            out.push_str(part);
        }
    }
    out
}

fn schema_link(s: &Value) -> String {
    if let Some(r) = s.get("$ref").and_then(Value::as_str) {
        let name = r.rsplit('/').next().unwrap_or("");
        return format!("<a href=\"#schema-{0}\">{0}</a>", esc(name));
    }
    match s["type"].as_str() {
        Some("array") => format!("array of {}", schema_link(&s["items"])),
        Some("object") if s["additionalProperties"].is_object() => {
            format!(
                "map of string to {}",
                schema_link(&s["additionalProperties"])
            )
        }
        Some(t) => {
            let fmt = s["format"]
                .as_str()
                .map(|f| format!(" ({f})"))
                .unwrap_or_default();
            format!("{}{}", esc(t), esc(&fmt))
        }
        None => "any".into(),
    }
}

fn docs_page(doc: &Value) -> String {
    let mut h = String::new();
    h.push_str("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>wrenn-ctl API</title><style>\
body{font:15px/1.5 system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}\
code,pre{font:13px ui-monospace,monospace;background:#f4f4f4;padding:0 .2em}\
h2{border-bottom:1px solid #ccc;margin-top:2.5rem}.op{border:1px solid #ddd;border-radius:6px;padding:.5rem 1rem;margin:1rem 0}\
.m{display:inline-block;min-width:4.5em;font-weight:bold}.get{color:#0a6}.post{color:#06c}.put{color:#a60}.delete{color:#c22}\
table{border-collapse:collapse;width:100%}td,th{border-top:1px solid #eee;padding:.2rem .4rem;text-align:left;vertical-align:top}\
nav a{margin-right:.8em}</style></head><body>");
    let _ = write!(h, "<h1>{}</h1><p>Version {}. Machine-readable: <a href=\"/openapi.yaml\">/openapi.yaml</a> (OpenAPI 3.1).</p>",
        esc(doc["info"]["title"].as_str().unwrap_or("")), esc(doc["info"]["version"].as_str().unwrap_or("")));
    for para in doc["info"]["description"]
        .as_str()
        .unwrap_or("")
        .split("\n\n")
    {
        let _ = write!(h, "<p>{}</p>", md(para));
    }
    let paths = doc["paths"].as_object().cloned().unwrap_or_default();
    let mut by_tag: Vec<(String, String, String, Value)> = Vec::new();
    for (path, item) in &paths {
        for (method, op) in item.as_object().into_iter().flatten() {
            let tag = op["tags"][0].as_str().unwrap_or("other").to_owned();
            by_tag.push((tag, path.clone(), method.clone(), op.clone()));
        }
    }
    // Tags in the document's order (sandboxes first), then any others.
    let mut tags: Vec<String> = doc["tags"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t["name"].as_str().map(str::to_owned))
        .collect();
    for t in by_tag.iter().map(|t| &t.0) {
        if !tags.contains(t) {
            tags.push(t.clone());
        }
    }
    h.push_str("<nav>");
    for t in &tags {
        let _ = write!(h, "<a href=\"#tag-{0}\">{0}</a>", esc(t));
    }
    h.push_str("<a href=\"#schemas\">schemas</a></nav>");
    for t in &tags {
        let _ = write!(h, "<h2 id=\"tag-{0}\">{0}</h2>", esc(t));
        for (_, path, method, op) in by_tag.iter().filter(|x| &x.0 == t) {
            let _ = write!(
                h,
                "<div class=\"op\" id=\"op-{}\"><p><span class=\"m {m}\">{}</span> <code>{}</code></p><p><b>{}</b></p><p>{}</p>",
                esc(op["operationId"].as_str().unwrap_or("")),
                method.to_uppercase(),
                esc(path),
                md(op["summary"].as_str().unwrap_or("")),
                md(op["description"].as_str().unwrap_or("")),
                m = esc(method)
            );
            if let Some(ps) = op["parameters"].as_array() {
                h.push_str("<table><tr><th>parameter</th><th>in</th><th>type</th><th>description</th></tr>");
                for p in ps {
                    let _ = write!(
                        h,
                        "<tr><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td></tr>",
                        esc(p["name"].as_str().unwrap_or("")),
                        esc(p["in"].as_str().unwrap_or("")),
                        schema_link(&p["schema"]),
                        md(p["description"].as_str().unwrap_or(""))
                    );
                }
                h.push_str("</table>");
            }
            if let Some(body) = op["requestBody"]["content"].as_object() {
                for (ct, c) in body {
                    let _ = write!(
                        h,
                        "<p>Body (<code>{}</code>): {}</p>",
                        esc(ct),
                        schema_link(&c["schema"])
                    );
                }
            }
            for (status, r) in op["responses"].as_object().into_iter().flatten() {
                if status.starts_with('2') {
                    for (ct, c) in r["content"].as_object().into_iter().flatten() {
                        let _ = write!(
                            h,
                            "<p>{status} (<code>{}</code>): {}</p>",
                            esc(ct),
                            schema_link(&c["schema"])
                        );
                    }
                }
            }
            let errors: Vec<&str> = op["responses"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(k, _)| k.as_str())
                .filter(|k| !k.starts_with('2'))
                .collect();
            if !errors.is_empty() {
                let _ = write!(
                    h,
                    "<p>Errors (<a href=\"#schema-Error\">Error</a>): {}</p>",
                    errors.join(", ")
                );
            }
            h.push_str("</div>");
        }
    }
    h.push_str("<h2 id=\"schemas\">Schemas</h2>");
    for (name, s) in doc["components"]["schemas"]
        .as_object()
        .into_iter()
        .flatten()
    {
        let _ = write!(
            h,
            "<h3 id=\"schema-{0}\">{0}</h3><p>{1}</p>",
            esc(name),
            md(s["description"].as_str().unwrap_or(""))
        );
        if let Some(vals) = s["enum"].as_array() {
            let names: Vec<String> = vals
                .iter()
                .map(|v| format!("<code>{}</code>", esc(v.as_str().unwrap_or(""))))
                .collect();
            let _ = write!(h, "<p>Values: {}</p>", names.join(", "));
        }
        if let Some(props) = s["properties"].as_object() {
            h.push_str("<table><tr><th>field</th><th>type</th><th>description</th></tr>");
            for (f, fs) in props {
                let _ = write!(
                    h,
                    "<tr><td><code>{}</code></td><td>{}</td><td>{}</td></tr>",
                    esc(f),
                    schema_link(fs),
                    md(fs["description"].as_str().unwrap_or(""))
                );
            }
            h.push_str("</table>");
        }
    }
    h.push_str("</body></html>\n");
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `WRENN_WRITE_API_DOCS=DIR cargo test -p ctl --lib write_api_docs` writes openapi.yaml
    /// and docs.html into DIR (for reading them without a running ctl).
    #[test]
    fn write_api_docs() {
        if let Ok(dir) = std::env::var("WRENN_WRITE_API_DOCS") {
            let dir = std::path::Path::new(&dir);
            std::fs::write(dir.join("openapi.yaml"), yaml()).unwrap();
            std::fs::write(dir.join("docs.html"), docs_html()).unwrap();
        }
        assert!(yaml().starts_with("\"openapi\": \"3.1.0\"\n"));
    }

    #[test]
    fn yaml_quotes_strings_and_nests() {
        let v = json!({"a": {"b": [1, "x: y", {"c": true}], "e": {}}, "yes": "no"});
        assert_eq!(
            to_yaml(&v),
            "\"a\":\n  \"b\":\n    - 1\n    - \"x: y\"\n    -\n      \"c\": true\n  \"e\": {}\n\"yes\": \"no\"\n"
        );
        let v = json!({"d": "one\n\ntwo: x", "e": " lead\nx", "f": "tab\tx\ny"});
        assert_eq!(
            to_yaml(&v),
            "\"d\": |-\n  one\n\n  two: x\n\"e\": \" lead\\nx\"\n\"f\": \"tab\\tx\\ny\"\n"
        );
        let v = json!({"paths": 1, "components": 2, "openapi": "3.1.0", "zeta": 3, "info": 4});
        assert_eq!(
            to_yaml(&v),
            "\"openapi\": \"3.1.0\"\n\"info\": 4\n\"paths\": 1\n\"components\": 2\n\"zeta\": 3\n"
        );
    }

    #[test]
    fn every_ref_resolves() {
        let doc = document();
        let schemas = doc["components"]["schemas"].as_object().unwrap().clone();
        fn walk(v: &Value, schemas: &Map<String, Value>) {
            match v {
                Value::Object(o) => {
                    if let Some(r) = o.get("$ref").and_then(Value::as_str) {
                        let ok = match r.strip_prefix("#/components/schemas/") {
                            Some(n) => schemas.contains_key(n),
                            None => r == "#/components/responses/Error",
                        };
                        assert!(ok, "dangling {r}");
                    }
                    for x in o.values() {
                        walk(x, schemas);
                    }
                }
                Value::Array(a) => a.iter().for_each(|x| walk(x, schemas)),
                _ => {}
            }
        }
        walk(&doc, &schemas);
        assert!(docs_html().contains("sandboxes.create"));
        assert!(!docs_html().contains("http://") || docs_html().contains("127.0.0.1"));
    }
}
