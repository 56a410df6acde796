//! Every typed request checked against Firecracker's own API schema (Swagger 2.0 YAML, path
//! in `WRENN_FC_API_SCHEMA`): the method and path exist, the body has every required field,
//! no unknown key, and the right types, enums and ranges.
//!
//! The YAML reader below handles the subset that file uses (block mappings and sequences,
//! flow sequences of scalars, quoted and multi-line plain scalars, folded blocks, comments);
//! it is a test helper, not a YAML parser.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use serde_json::{json, Value};
use vmm_glue::api::ApiRequest;
use vmm_glue::request::{
    Action, BootSource, CacheType, Drive, LogLevel, Logger, MachineConfig, MemBackend, Metrics,
    MmdsConfig, MmdsData, MmdsVersion, NetworkInterface, NetworkOverride, SnapshotCreate,
    SnapshotLoad, SnapshotType, ToApiRequest, VmState, Vsock,
};

#[derive(Clone, Debug, PartialEq)]
enum Yaml {
    Map(Vec<(String, Yaml)>),
    Seq(Vec<Yaml>),
    Str(String),
}

impl Yaml {
    fn get(&self, key: &str) -> Option<&Yaml> {
        match self {
            Yaml::Map(m) => m.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }
    fn str(&self) -> Option<&str> {
        match self {
            Yaml::Str(s) => Some(s),
            _ => None,
        }
    }
}

struct Reader {
    /// (indent, text) of every line that is neither blank nor a comment.
    lines: Vec<(usize, String)>,
    i: usize,
}

/// Where the key of a `key: value` line ends, if it is one.
fn key_split(text: &str) -> Option<(String, String)> {
    if let Some(q) = text.chars().next().filter(|c| *c == '"' || *c == '\'') {
        let end = text[1..].find(q)? + 1;
        let rest = &text[end + 1..];
        let rest = rest.strip_prefix(':')?;
        if !(rest.is_empty() || rest.starts_with(' ')) {
            return None;
        }
        return Some((text[1..end].to_owned(), rest.trim().to_owned()));
    }
    let bytes = text.as_bytes();
    for (i, b) in bytes.iter().enumerate() {
        if *b == b' ' {
            return None; // keys in this file have no spaces
        }
        if *b == b':' && (i + 1 == bytes.len() || bytes[i + 1] == b' ') {
            return Some((text[..i].to_owned(), text[i + 1..].trim().to_owned()));
        }
    }
    None
}

fn unquote(s: &str) -> String {
    let s = s.trim();
    if s.len() >= 2
        && ((s.starts_with('"') && s.ends_with('"')) || (s.starts_with('\'') && s.ends_with('\'')))
    {
        s[1..s.len() - 1].to_owned()
    } else {
        s.to_owned()
    }
}

impl Reader {
    fn new(text: &str) -> Reader {
        let lines = text
            .lines()
            .filter_map(|l| {
                let t = l.trim_end();
                let body = t.trim_start();
                if body.is_empty() || body.starts_with('#') {
                    None
                } else {
                    Some((t.len() - body.len(), body.to_owned()))
                }
            })
            .collect();
        Reader { lines, i: 0 }
    }

    fn parse(mut self) -> Yaml {
        let indent = self.lines.first().map(|l| l.0).unwrap_or(0);
        let y = self.node(indent);
        assert_eq!(
            self.i,
            self.lines.len(),
            "unparsed line {:?}",
            self.lines.get(self.i)
        );
        y
    }

    fn node(&mut self, indent: usize) -> Yaml {
        let (ind, text) = self.lines[self.i].clone();
        assert_eq!(ind, indent);
        if text == "-" || text.starts_with("- ") {
            self.seq(indent)
        } else if key_split(&text).is_some() {
            self.map(indent)
        } else {
            self.i += 1;
            Yaml::Str(self.plain(unquote(&text), indent.saturating_sub(1)))
        }
    }

    /// Appends continuation lines (indented deeper than `parent`) of a plain scalar.
    fn plain(&mut self, mut s: String, parent: usize) -> String {
        while let Some((ind, t)) = self.lines.get(self.i) {
            if *ind <= parent {
                break;
            }
            s.push(' ');
            s.push_str(t);
            self.i += 1;
        }
        s
    }

    fn seq(&mut self, indent: usize) -> Yaml {
        let mut items = Vec::new();
        while let Some((ind, text)) = self.lines.get(self.i).cloned() {
            if ind != indent || !(text == "-" || text.starts_with("- ")) {
                break;
            }
            let rest = text[1..].trim_start().to_owned();
            if rest.is_empty() {
                self.i += 1;
                let child = self.lines[self.i].0;
                items.push(self.node(child));
            } else {
                // `- key: v` opens a mapping whose keys sit two columns in.
                let inner = indent + (text.len() - rest.len());
                self.lines[self.i] = (inner, rest);
                items.push(self.node(inner));
            }
        }
        Yaml::Seq(items)
    }

    fn map(&mut self, indent: usize) -> Yaml {
        let mut entries = Vec::new();
        while let Some((ind, text)) = self.lines.get(self.i).cloned() {
            if ind != indent || text.starts_with("- ") {
                break;
            }
            let (key, rest) = key_split(&text).unwrap_or_else(|| panic!("not a key: {text:?}"));
            self.i += 1;
            let value = if rest.is_empty() {
                match self.lines.get(self.i).cloned() {
                    Some((ci, ct)) if ci > indent => {
                        if ct.starts_with("- ") || key_split(&ct).is_some() {
                            self.node(ci)
                        } else {
                            Yaml::Str(self.plain(String::new(), indent).trim().to_owned())
                        }
                    }
                    Some((ci, ct)) if ci == indent && ct.starts_with("- ") => self.seq(ci),
                    _ => Yaml::Str(String::new()),
                }
            } else if rest.starts_with('>') || rest.starts_with('|') {
                Yaml::Str(self.plain(String::new(), indent).trim().to_owned())
            } else if rest.starts_with('[') {
                let inner = rest
                    .strip_prefix('[')
                    .and_then(|r| r.strip_suffix(']'))
                    .unwrap_or_else(|| panic!("flow sequence on one line: {rest:?}"));
                Yaml::Seq(
                    inner
                        .split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(|s| Yaml::Str(unquote(s)))
                        .collect(),
                )
            } else {
                Yaml::Str(self.plain(unquote(&rest), indent))
            };
            entries.push((key, value));
        }
        Yaml::Map(entries)
    }
}

struct Schema {
    doc: Yaml,
}

impl Schema {
    fn definition(&self, reference: &str) -> &Yaml {
        let name = reference
            .strip_prefix("#/definitions/")
            .unwrap_or_else(|| panic!("unsupported $ref {reference}"));
        self.doc
            .get("definitions")
            .and_then(|d| d.get(name))
            .unwrap_or_else(|| panic!("no definition {name}"))
    }

    /// The body schema of `METHOD path`, or an error if the API has no such operation.
    fn body_schema(&self, req: &ApiRequest) -> Result<Option<&Yaml>, String> {
        let Some(Yaml::Map(paths)) = self.doc.get("paths") else {
            panic!("no paths");
        };
        let segs: Vec<&str> = req.path.split('/').collect();
        let op = paths
            .iter()
            .find(|(tpl, _)| {
                let t: Vec<&str> = tpl.split('/').collect();
                t.len() == segs.len()
                    && t.iter()
                        .zip(&segs)
                        .all(|(a, b)| a == b || (a.starts_with('{') && a.ends_with('}')))
            })
            .map(|(_, v)| v)
            .ok_or_else(|| format!("no path matches {}", req.path))?;
        let method = req.method.as_str().to_ascii_lowercase();
        let op = op
            .get(&method)
            .ok_or_else(|| format!("{} has no {method}", req.path))?;
        let Some(Yaml::Seq(params)) = op.get("parameters") else {
            return Ok(None);
        };
        Ok(params
            .iter()
            .find(|p| p.get("in").and_then(Yaml::str) == Some("body"))
            .and_then(|p| p.get("schema")))
    }

    fn check(&self, schema: &Yaml, v: &Value, at: &str, errs: &mut Vec<String>) {
        if let Some(r) = schema.get("$ref").and_then(Yaml::str) {
            return self.check(self.definition(r), v, at, errs);
        }
        let ty = schema.get("type").and_then(Yaml::str).unwrap_or(
            if schema.get("properties").is_some() {
                "object"
            } else {
                "any"
            },
        );
        match ty {
            "object" => {
                let Some(obj) = v.as_object() else {
                    return errs.push(format!("{at}: not an object"));
                };
                if let Some(Yaml::Seq(req)) = schema.get("required") {
                    for r in req.iter().filter_map(Yaml::str) {
                        if !obj.contains_key(r) {
                            errs.push(format!("{at}: required field {r} missing"));
                        }
                    }
                }
                let props = schema.get("properties");
                let open = schema.get("additionalProperties").is_some();
                for (k, val) in obj {
                    match props.and_then(|p| p.get(k)) {
                        Some(ps) => self.check(ps, val, &format!("{at}.{k}"), errs),
                        None if open => {}
                        None => errs.push(format!("{at}: unknown key {k}")),
                    }
                }
            }
            "string" => {
                let Some(s) = v.as_str() else {
                    return errs.push(format!("{at}: not a string"));
                };
                if let Some(Yaml::Seq(e)) = schema.get("enum") {
                    if !e.iter().any(|x| x.str() == Some(s)) {
                        errs.push(format!("{at}: {s:?} not in enum"));
                    }
                }
            }
            "integer" => {
                let Some(n) = v.as_i64() else {
                    return errs.push(format!("{at}: not an integer"));
                };
                let bound = |k: &str| schema.get(k).and_then(Yaml::str).map(|s| s.parse::<i64>());
                if let Some(Ok(min)) = bound("minimum") {
                    if n < min {
                        errs.push(format!("{at}: {n} below minimum {min}"));
                    }
                }
                if let Some(Ok(max)) = bound("maximum") {
                    if n > max {
                        errs.push(format!("{at}: {n} above maximum {max}"));
                    }
                }
            }
            "boolean" => {
                if !v.is_boolean() {
                    errs.push(format!("{at}: not a boolean"));
                }
            }
            "array" => {
                let Some(items) = v.as_array() else {
                    return errs.push(format!("{at}: not an array"));
                };
                if let Some(is) = schema.get("items") {
                    for (i, x) in items.iter().enumerate() {
                        self.check(is, x, &format!("{at}[{i}]"), errs);
                    }
                }
            }
            "any" => {}
            other => errs.push(format!("{at}: schema type {other} not handled by the test")),
        }
    }

    /// All schema violations of one request.
    fn violations(&self, req: &ApiRequest) -> Vec<String> {
        let mut errs = Vec::new();
        let schema = match self.body_schema(req) {
            Ok(s) => s,
            Err(e) => return vec![e],
        };
        match (schema, &req.body) {
            (Some(s), Some(b)) => match serde_json::from_slice::<Value>(b) {
                Ok(v) => self.check(s, &v, "body", &mut errs),
                Err(e) => errs.push(format!("body is not JSON: {e}")),
            },
            (None, Some(_)) => errs.push("the operation takes no body".to_owned()),
            (Some(_), None) => errs.push("the operation needs a body".to_owned()),
            (None, None) => {}
        }
        errs
    }
}

fn load_schema() -> Option<Schema> {
    let Some(path) = std::env::var_os("WRENN_FC_API_SCHEMA") else {
        proto::skip::skip("vmm-glue schema test", "WRENN_FC_API_SCHEMA not set");
        return None;
    };
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("read {}: {e}", PathBuf::from(&path).display()));
    Some(Schema {
        doc: Reader::new(&text).parse(),
    })
}

/// One of each typed request, with optional fields both set and unset.
fn all_requests() -> Vec<(&'static str, ApiRequest)> {
    let mut out: Vec<(&'static str, ApiRequest)> = Vec::new();
    let mut add = |name: &'static str, r: &dyn ToApiRequest| {
        out.push((name, r.to_api_request().expect(name)));
    };
    add("machine-config", &MachineConfig::new(1, 512));
    add(
        "machine-config full",
        &MachineConfig {
            vcpu_count: 2,
            mem_size_mib: 4096,
            smt: true,
            track_dirty_pages: true,
        },
    );
    add("boot-source", &BootSource::new("/k/vmlinux"));
    let mut b = BootSource::new("/k/vmlinux")
        .arg("ip=169.254.0.21::169.254.0.22:255.255.255.252::eth0:off");
    b.console = true;
    b.initrd_path = Some("/k/initrd".into());
    add("boot-source full", &b);
    add("drive", &Drive::root("rootfs", "/wrenn/rootfs.ext4"));
    add(
        "drive full",
        &Drive {
            drive_id: "data_1".into(),
            path_on_host: "/d".into(),
            is_root_device: false,
            is_read_only: true,
            cache_type: CacheType::Writeback,
        },
    );
    add(
        "network-interface",
        &NetworkInterface {
            iface_id: "eth0".into(),
            host_dev_name: "tap0".into(),
            guest_mac: None,
        },
    );
    add(
        "network-interface mac",
        &NetworkInterface {
            iface_id: "eth0".into(),
            host_dev_name: "tap0".into(),
            guest_mac: Some([6, 0, 0xa9, 0xfe, 0, 0x15]),
        },
    );
    add(
        "vsock",
        &Vsock {
            guest_cid: 3,
            uds_path: "/var/lib/wrenn/sandboxes/x/vsock.sock".into(),
        },
    );
    add(
        "mmds config",
        &MmdsConfig {
            version: MmdsVersion::V2,
            network_interfaces: vec!["eth0".into()],
            ipv4_address: Some(Ipv4Addr::new(169, 254, 169, 254)),
        },
    );
    add(
        "mmds config v1",
        &MmdsConfig {
            version: MmdsVersion::V1,
            network_interfaces: vec!["eth0".into()],
            ipv4_address: None,
        },
    );
    add(
        "mmds data",
        &MmdsData(json!({"wrenn": {"sandbox": "sb-1", "n": 3, "tags": ["a"]}})),
    );
    add("action start", &Action::InstanceStart);
    add("action ctrl-alt-del", &Action::SendCtrlAltDel);
    add("action flush metrics", &Action::FlushMetrics);
    add("vm paused", &VmState::Paused);
    add("vm resumed", &VmState::Resumed);
    for t in [SnapshotType::Full, SnapshotType::Diff] {
        add(
            "snapshot create",
            &SnapshotCreate {
                snapshot_type: t,
                snapshot_path: "/s/state".into(),
                mem_file_path: "/s/mem".into(),
            },
        );
    }
    add(
        "snapshot load file",
        &SnapshotLoad::new("/s/state", MemBackend::File("/s/mem".into())),
    );
    let mut l = SnapshotLoad::new("/s/state", MemBackend::Uffd("/s/uffd.sock".into()));
    l.track_dirty_pages = true;
    l.resume_vm = true;
    l.clock_realtime = true;
    l.vsock_override = Some("/s/vsock.sock".into());
    l.network_overrides = vec![NetworkOverride {
        iface_id: "eth0".into(),
        host_dev_name: "tap0".into(),
    }];
    add("snapshot load uffd full", &l);
    add(
        "logger",
        &Logger {
            log_path: "/s/fc.log".into(),
            level: LogLevel::Warning,
            show_level: true,
            show_log_origin: false,
        },
    );
    add(
        "metrics",
        &Metrics {
            metrics_path: "/s/metrics".into(),
        },
    );
    out
}

#[test]
fn every_request_matches_firecracker_schema() {
    let Some(schema) = load_schema() else { return };
    let mut failures = Vec::new();
    let requests = all_requests();
    for (name, req) in &requests {
        for v in schema.violations(req) {
            failures.push(format!("{name} ({}): {v}", req.op()));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    println!("{} request bodies match the schema", requests.len());
}

#[test]
fn schema_check_catches_bad_bodies() {
    let Some(schema) = load_schema() else { return };
    let put = |path: &str, body: Value| ApiRequest {
        method: vmm_glue::api::Method::Put,
        path: path.to_owned(),
        body: Some(body.to_string().into_bytes()),
        timeout: std::time::Duration::from_secs(1),
    };
    let cases = [
        (
            put("/machine-config", json!({"vcpu_count": 1})),
            "required field mem_size_mib",
        ),
        (
            put(
                "/machine-config",
                json!({"vcpu_count": 1, "mem_size_mib": 1, "foo": 1}),
            ),
            "unknown key foo",
        ),
        (
            put(
                "/machine-config",
                json!({"vcpu_count": "1", "mem_size_mib": 1}),
            ),
            "not an integer",
        ),
        (
            put(
                "/machine-config",
                json!({"vcpu_count": 33, "mem_size_mib": 1}),
            ),
            "above maximum",
        ),
        (
            put("/actions", json!({"action_type": "Reboot"})),
            "not in enum",
        ),
        (
            put(
                "/snapshot/load",
                json!({"snapshot_path": "/s", "mem_backend": {"backend_type": "File"}}),
            ),
            "required field backend_path",
        ),
        (put("/nowhere", json!({})), "no path matches"),
    ];
    for (req, want) in cases {
        let v = schema.violations(&req);
        assert!(
            v.iter().any(|e| e.contains(want)),
            "{}: expected {want:?}, got {v:?}",
            req.op()
        );
    }
}

#[test]
fn yaml_reader_subset() {
    let doc = r##"
# comment
swagger: "2.0"
paths:
  /drives/{drive_id}:
    put:
      parameters:
      - name: body
        in: body
        schema:
          $ref: "#/definitions/Drive"
definitions:
  Drive:
    type: object
    required:
      - drive_id
    description:
      A long description: with a colon,
      on two lines.
    properties:
      cache_type:
        enum: ["Unsafe", "Writeback"]
      note:
        description: >-
          folded
          text
"##;
    let y = Reader::new(doc).parse();
    assert_eq!(y.get("swagger").and_then(Yaml::str), Some("2.0"));
    let d = y.get("definitions").unwrap().get("Drive").unwrap();
    assert_eq!(
        d.get("required"),
        Some(&Yaml::Seq(vec![Yaml::Str("drive_id".into())]))
    );
    assert_eq!(
        d.get("description").and_then(Yaml::str),
        Some("A long description: with a colon, on two lines.")
    );
    let ct = d.get("properties").unwrap().get("cache_type").unwrap();
    assert_eq!(
        ct.get("enum"),
        Some(&Yaml::Seq(vec![
            Yaml::Str("Unsafe".into()),
            Yaml::Str("Writeback".into())
        ]))
    );
    let p = y.get("paths").unwrap().get("/drives/{drive_id}").unwrap();
    let Some(Yaml::Seq(params)) = p.get("put").unwrap().get("parameters") else {
        panic!()
    };
    assert_eq!(params[0].get("in").and_then(Yaml::str), Some("body"));
    assert_eq!(
        params[0]
            .get("schema")
            .unwrap()
            .get("$ref")
            .and_then(Yaml::str),
        Some("#/definitions/Drive")
    );
}
