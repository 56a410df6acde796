//! The forwarding table: every method with the `(wrenn.forward)` option, its field paths
//! resolved to numbers and checked against the envd method it names. Any mismatch is an
//! error that names the method: the table is never generated from a schema it would
//! misread.

use std::fmt::Write as _;

use protox::prost_reflect::{
    DescriptorPool, DynamicMessage, Kind, MessageDescriptor, MethodDescriptor, Value,
};

/// Methods carrying the option must be in one of these packages.
const PACKAGES: &[&str] = &["wrenn.ctl.v1", "wrenn.agent.v1"];

fn opt_str(m: &DynamicMessage, name: &str) -> String {
    match m.get_field_by_name(name).as_deref() {
        Some(Value::String(s)) => s.clone(),
        _ => String::new(),
    }
}

fn opt_enum(m: &DynamicMessage, name: &str) -> i32 {
    match m.get_field_by_name(name).as_deref() {
        Some(Value::EnumNumber(n)) => *n,
        _ => 0,
    }
}

/// Resolves a dotted path of field names in `msg`: the numbers and the last field's kind.
fn resolve(msg: &MessageDescriptor, path: &str) -> Result<(Vec<u32>, Kind), String> {
    let mut nums = Vec::new();
    let mut cur = msg.clone();
    let mut kind = Kind::Message(msg.clone());
    for (i, name) in path.split('.').enumerate() {
        if i > 0 {
            cur = match &kind {
                Kind::Message(m) => m.clone(),
                _ => {
                    return Err(format!(
                        "{path}: {name} is inside a field that is not a message"
                    ))
                }
            };
        }
        let f = cur
            .get_field_by_name(name)
            .ok_or_else(|| format!("{path}: {} has no field {name}", cur.full_name()))?;
        if f.is_list() || f.is_map() {
            return Err(format!("{path}: {name} is repeated"));
        }
        nums.push(f.number());
        kind = f.kind();
    }
    Ok((nums, kind))
}

fn is_msg(kind: &Kind, full: &str) -> bool {
    matches!(kind, Kind::Message(m) if m.full_name() == full)
}

/// Whether two messages are the same on the wire: the same field numbers, each with the
/// same kind and cardinality (message fields compared the same way, down the tree).
fn same_wire(a: &MessageDescriptor, b: &MessageDescriptor, depth: u32) -> bool {
    if a.full_name() == b.full_name() {
        return true;
    }
    if depth > 8 {
        return false;
    }
    let fa: Vec<_> = a.fields().collect();
    let fb: Vec<_> = b.fields().collect();
    fa.len() == fb.len()
        && fa.iter().all(|x| {
            let Some(y) = b.get_field(x.number()) else {
                return false;
            };
            x.is_list() == y.is_list()
                && match (x.kind(), y.kind()) {
                    (Kind::Message(p), Kind::Message(q)) => same_wire(&p, &q, depth + 1),
                    (Kind::Enum(p), Kind::Enum(q)) => p.full_name() == q.full_name(),
                    (p, q) => p == q,
                }
        })
}

fn nums(v: &[u32]) -> String {
    let s: Vec<String> = v.iter().map(u32::to_string).collect();
    format!("&[{}]", s.join(", "))
}

struct Entry {
    method: String,
    envd: String,
    agent: String,
    client_streaming: bool,
    server_streaming: bool,
    sandbox: Vec<u32>,
    request: Vec<u32>,
    wrap: u32,
    later: String,
    split: Vec<u32>,
    split_offset: u32,
    required: Vec<u32>,
    required_name: String,
    audit: String,
    timeout_ms: Vec<u32>,
    deadline: &'static str,
    /// For matching ctl to agent entries.
    input: MessageDescriptor,
    paths: (String, String, String, String),
}

fn full_method(m: &MethodDescriptor) -> String {
    format!("{}/{}", m.parent_service().full_name(), m.name())
}

fn entry(
    pool: &DescriptorPool,
    m: &MethodDescriptor,
    opt: &DynamicMessage,
) -> Result<Entry, String> {
    let name = full_method(m);
    let err = |e: String| format!("{name}: (wrenn.forward): {e}");
    let svc = m.parent_service();
    if !PACKAGES.contains(&svc.package_name()) {
        return Err(err(format!("only methods of {PACKAGES:?} are forwarded")));
    }
    let envd_name = opt_str(opt, "envd");
    let (es, em) = envd_name.split_once('/').ok_or_else(|| {
        err(format!(
            "envd {envd_name:?} is not \"package.Service/Method\""
        ))
    })?;
    if !es.starts_with("wrenn.envd.") {
        return Err(err(format!("envd {envd_name:?} is not an envd method")));
    }
    let e = pool
        .get_service_by_name(es)
        .and_then(|s| s.methods().find(|x| x.name() == em))
        .ok_or_else(|| err(format!("no envd method {envd_name}")))?;
    if (e.is_client_streaming(), e.is_server_streaming())
        != (m.is_client_streaming(), m.is_server_streaming())
    {
        return Err(err(format!("streaming shape differs from {envd_name}'s")));
    }
    if e.output().full_name() != m.output().full_name() {
        return Err(err(format!(
            "returns {} but {envd_name} returns {}",
            m.output().full_name(),
            e.output().full_name()
        )));
    }
    let input = m.input();
    let einput = e.input();
    let sandbox_path = opt_str(opt, "sandbox");
    let (sandbox, k) = resolve(&input, &sandbox_path).map_err(err)?;
    if k != Kind::String {
        return Err(err(format!("sandbox {sandbox_path} is not a string")));
    }
    let request_path = opt_str(opt, "request");
    let wrap_name = opt_str(opt, "wrap");
    let (request, wrap) = if request_path.is_empty() {
        if einput.fields().next().is_some() {
            return Err(err(format!(
                "no request field, but {} has fields",
                einput.full_name()
            )));
        }
        (Vec::new(), 0)
    } else {
        let (p, k) = resolve(&input, &request_path).map_err(err)?;
        let wrap = if wrap_name.is_empty() {
            if !is_msg(&k, einput.full_name()) {
                return Err(err(format!(
                    "request {request_path} is not a {}",
                    einput.full_name()
                )));
            }
            0
        } else {
            let (w, wk) = resolve(&einput, &wrap_name).map_err(err)?;
            let same = matches!((&k, &wk), (Kind::Message(a), Kind::Message(b)) if a.full_name() == b.full_name());
            if w.len() != 1 || !same {
                return Err(err(format!(
                    "request {request_path} is not the type of {}.{wrap_name}",
                    einput.full_name()
                )));
            }
            w[0]
        };
        (p, wrap)
    };
    // Nothing of the first message may be dropped: its fields are the sandbox's and the
    // request's (for header-first streams, inside the header arm), plus the arms of later
    // messages.
    let mut first_fields = vec![sandbox.clone(), request.clone()];
    first_fields.retain(|p| !p.is_empty());
    let later_path = opt_str(opt, "later");
    let later = if !m.is_client_streaming() {
        if !later_path.is_empty() {
            return Err(err("later is for client streams".into()));
        }
        "Later::None".to_owned()
    } else if later_path.is_empty() {
        // Later messages are envd's: every field other than the header arm matches.
        let header = *request
            .first()
            .ok_or_else(|| err("a client stream needs a request".into()))?;
        for f in input.fields().filter(|f| f.number() != header) {
            let g = einput.get_field(f.number()).ok_or_else(|| {
                err(format!(
                    "{} has no field {} (later messages pass unchanged)",
                    einput.full_name(),
                    f.number()
                ))
            })?;
            if g.kind() != f.kind() || g.is_list() != f.is_list() {
                return Err(err(format!(
                    "field {} differs from {}'s",
                    f.name(),
                    einput.full_name()
                )));
            }
        }
        format!("Later::Unchanged {{ header: {header} }}")
    } else {
        let (p, k) = resolve(&input, &later_path).map_err(err)?;
        if !is_msg(&k, einput.full_name()) {
            return Err(err(format!(
                "later {later_path} is not a {}",
                einput.full_name()
            )));
        }
        format!("Later::Field({})", nums(&p))
    };
    // Top-level fields not on a path are an error unless they are later messages' arms.
    for f in input.fields() {
        let used = first_fields.iter().any(|p| p[0] == f.number());
        if !used && !m.is_client_streaming() {
            return Err(err(format!(
                "field {} of {} is not forwarded",
                f.name(),
                input.full_name()
            )));
        }
    }
    let split_path = opt_str(opt, "split");
    if !split_path.is_empty() && !later_path.is_empty() {
        // ctl relays later messages as received; a split path inside envd's message would
        // not apply to them.
        return Err(err(
            "split is for later messages passed unchanged (no `later`)".into(),
        ));
    }
    let (split, split_offset) = if split_path.is_empty() {
        (Vec::new(), 0)
    } else {
        let within = if m.is_client_streaming() {
            einput.clone()
        } else {
            e.output()
        };
        let (p, k) = resolve(&within, &split_path).map_err(err)?;
        if k != Kind::Bytes {
            return Err(err(format!("split {split_path} is not bytes")));
        }
        let holder = match split_path.rsplit_once('.') {
            Some((parent, _)) => match resolve(&within, parent).map_err(err)?.1 {
                Kind::Message(h) => h,
                _ => return Err(err("split parent is not a message".into())),
            },
            None => within.clone(),
        };
        let off = holder
            .get_field_by_name("offset")
            .filter(|f| f.kind() == Kind::Uint64)
            .map_or(0, |f| f.number());
        (p, off)
    };
    let required_name = opt_str(opt, "required");
    let required = if required_name.is_empty() {
        Vec::new()
    } else {
        resolve(&einput, &required_name).map_err(err)?.0
    };
    let timeout_path = opt_str(opt, "timeout_ms");
    let timeout_ms = if timeout_path.is_empty() {
        Vec::new()
    } else {
        let (p, k) = resolve(&einput, &timeout_path).map_err(err)?;
        if k != Kind::Uint64 {
            return Err(err(format!("timeout_ms {timeout_path} is not uint64")));
        }
        p
    };
    let deadline = match opt_enum(opt, "deadline") {
        0 => "Deadline::Default",
        1 => "Deadline::Call",
        n => return Err(err(format!("unknown deadline {n}"))),
    };
    Ok(Entry {
        method: name.clone(),
        envd: envd_name,
        agent: String::new(),
        client_streaming: m.is_client_streaming(),
        server_streaming: m.is_server_streaming(),
        sandbox,
        request,
        wrap,
        later,
        split,
        split_offset,
        required,
        required_name,
        audit: opt_str(opt, "audit"),
        timeout_ms,
        deadline,
        input,
        paths: (sandbox_path, request_path, wrap_name, later_path),
    })
}

/// An agent.v1 entry as ctl's are matched to it: method, envd method, request, paths.
type AgentRoute = (
    String,
    String,
    MessageDescriptor,
    (String, String, String, String),
);

/// `proto/src/gen/forward.rs`: `ROUTES`, one `proto::rpc::forward::Route` per forwarded
/// method.
pub fn generate(pool: &DescriptorPool) -> Result<String, String> {
    let ext = pool
        .get_extension_by_name("wrenn.forward")
        .ok_or("the schema does not declare the wrenn.forward option")?;
    let mut entries = Vec::new();
    for svc in pool.services() {
        for m in svc.methods() {
            let opts = m.options();
            if !opts.has_extension(&ext) {
                continue;
            }
            let v = opts.get_extension(&ext);
            let Value::Message(opt) = v.as_ref() else {
                return Err(format!(
                    "{}: (wrenn.forward) is not a message",
                    full_method(&m)
                ));
            };
            entries.push(entry(pool, &m, opt)?);
        }
    }
    // A ctl method goes to the agent method that ends at the same envd method, with the
    // same request on the wire: ctl passes the bytes on unchanged.
    let agent: Vec<AgentRoute> = entries
        .iter()
        .filter(|e| e.method.starts_with("wrenn.agent."))
        .map(|e| {
            (
                e.method.clone(),
                e.envd.clone(),
                e.input.clone(),
                e.paths.clone(),
            )
        })
        .collect();
    for e in entries
        .iter_mut()
        .filter(|e| e.method.starts_with("wrenn.ctl."))
    {
        let Some((am, _, ainput, apaths)) = agent.iter().find(|a| a.1 == e.envd) else {
            return Err(format!(
                "{}: no wrenn.agent.v1 method forwards to {}",
                e.method, e.envd
            ));
        };
        if !same_wire(&e.input, ainput, 0) || *apaths != e.paths {
            return Err(format!(
                "{}: its request is not {am}'s on the wire (ctl forwards it unchanged)",
                e.method
            ));
        }
        e.agent = am.clone();
    }
    if agent
        .iter()
        .map(|a| &a.1)
        .collect::<std::collections::BTreeSet<_>>()
        .len()
        != agent.len()
    {
        return Err("two wrenn.agent.v1 methods forward to the same envd method".into());
    }
    entries.sort_by(|a, b| a.method.cmp(&b.method));
    let mut out = String::from(
        "// @generated by proto-codegen from the (wrenn.forward) options of proto/schema. Do\n\
         // not edit; see proto/schema/wrenn/options.proto and proto/PROTOCOL.md §9.\n\n\
         use crate::rpc::forward::{Deadline, Later, Route};\n\n\
         /// Every forwarded method of wrenn.ctl.v1 and wrenn.agent.v1.\n\
         pub const ROUTES: &[Route] = &[\n",
    );
    for e in &entries {
        let _ = writeln!(
            out,
            "    Route {{ method: {:?}, envd: {:?}, agent: {:?}, client_streaming: {}, server_streaming: {}, \
             sandbox: {}, request: {}, wrap: {}, later: {}, split: {}, split_offset: {}, required: {}, \
             required_name: {:?}, audit: {:?}, timeout_ms: {}, deadline: {} }},",
            e.method,
            e.envd,
            e.agent,
            e.client_streaming,
            e.server_streaming,
            nums(&e.sandbox),
            nums(&e.request),
            e.wrap,
            e.later,
            nums(&e.split),
            e.split_offset,
            nums(&e.required),
            e.required_name,
            e.audit,
            nums(&e.timeout_ms),
            e.deadline
        );
    }
    out.push_str("];\n");
    Ok(out)
}

/// Whether `method` ("pkg.Service/Method" with the Rust method name) is forwarded: the
/// generated service traits leave such methods out.
pub fn forwarded(pool: &DescriptorPool) -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    let Some(ext) = pool.get_extension_by_name("wrenn.forward") else {
        return out;
    };
    for svc in pool.services() {
        for m in svc.methods() {
            if m.options().has_extension(&ext) {
                out.insert(full_method(&m));
            }
        }
    }
    out
}
