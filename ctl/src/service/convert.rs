//! Rows to messages, and the small validations every call shares.

use std::collections::HashMap;
use std::time::SystemTime;

use postgres::Row;
use proto::gen::wrenn::ctl::v1 as ctl;
use proto::id::{self, Kind, Uuid};
use proto::sandbox::{SandboxSpec, TemplateKind, TimeoutPolicy};
use proto::Status;

use super::audit::ns;
use crate::limits::{MAP_ENTRIES_MAX, MAP_KEY_LEN_MAX, MAP_VALUE_LEN_MAX, NAME_LEN_MAX};
use crate::scheduler::State;

/// Columns of a sandbox row, in the order [`sandbox`] reads them.
pub const SANDBOX_COLS: &str =
    "s.id, s.team_id, s.host_id, s.template_id, s.state, s.state_reason, \
    s.vcpus, s.memory_mib, s.disk_mib, s.timeout_s, s.on_timeout, s.metadata, s.created_at, \
    s.updated_at, s.expires_at, s.network, s.allow_public_traffic, s.auto_resume";

/// A sandbox row as a message.
pub fn sandbox(r: &Row) -> ctl::Sandbox {
    let state = State::from_name(r.get(4)).unwrap_or(State::Error);
    let metadata: serde_json::Value = r.get(11);
    ctl::Sandbox {
        id: id::format(Kind::Sandbox, r.get(0)),
        team_id: id::format(Kind::Team, r.get(1)),
        host_id: r
            .get::<_, Option<Uuid>>(2)
            .map(|h| id::format(Kind::Host, h))
            .unwrap_or_default(),
        template_id: id::format(Kind::Template, r.get(3)),
        state: state as i32,
        state_reason: r.get(5),
        vcpus: u32::try_from(r.get::<_, i32>(6)).unwrap_or(0),
        memory_mib: u32::try_from(r.get::<_, i32>(7)).unwrap_or(0),
        disk_mib: u64::try_from(r.get::<_, i64>(8)).unwrap_or(0),
        timeout_s: u64::try_from(r.get::<_, i64>(9)).unwrap_or(0),
        on_timeout: policy_wire(r.get(10)),
        created_unix_ns: ns(Some(r.get(12))),
        updated_unix_ns: ns(Some(r.get(13))),
        expires_unix_ns: if state == State::Running {
            ns(r.get(14))
        } else {
            0
        },
        metadata: json_to_map(&metadata),
        network: r
            .get::<_, Option<serde_json::Value>>(15)
            .map(|v| network_from_json(&v)),
        // Only Create, Get and RotateTrafficToken fill it in (`traffic_token` is no column
        // of SANDBOX_COLS, so no other answer can carry it by accident).
        traffic_token: String::new(),
        allow_public_traffic: r.get(16),
        auto_resume: r.get(17),
    }
}

/// A public network policy as the shared one (the same fields).
pub fn network_to_shared(n: &ctl::NetworkPolicy) -> proto::sandbox::NetworkPolicy {
    proto::sandbox::NetworkPolicy {
        allow_internet_access: n.allow_internet_access,
        deny_out: n.deny_out.clone(),
        allow_out: n.allow_out.clone(),
    }
}

/// Refuses a bad policy before anything happens, naming the item (`proto::network`: the same
/// syntax and bounds the agent applies).
pub fn check_network(n: Option<&ctl::NetworkPolicy>) -> Result<(), Status> {
    match n {
        None => Ok(()),
        Some(n) => proto::network::check_lists(&n.deny_out, &n.allow_out)
            .map_err(|e| Status::invalid_argument(format!("network: {e}"))),
    }
}

/// The stored form (`sandboxes.network`).
pub fn network_json(n: &ctl::NetworkPolicy) -> serde_json::Value {
    serde_json::json!({
        "allow_internet_access": n.allow_internet_access,
        "deny_out": n.deny_out,
        "allow_out": n.allow_out,
    })
}

/// The stored form back (what it cannot read is left out).
pub fn network_from_json(v: &serde_json::Value) -> ctl::NetworkPolicy {
    let list = |k: &str| -> Vec<String> {
        v[k].as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    ctl::NetworkPolicy {
        allow_internet_access: v["allow_internet_access"].as_bool(),
        deny_out: list("deny_out"),
        allow_out: list("allow_out"),
    }
}

/// The stored policy (`sandboxes.on_timeout`: "pause", "destroy") → its wire value, the same
/// number in wrenn.ctl.v1 and the shared enum.
pub fn policy_wire(s: &str) -> i32 {
    TimeoutPolicy::from_name(s).unwrap_or(TimeoutPolicy::Destroy) as i32
}

/// The spec a public Create asks for: the fields wrenn.ctl.v1's request shares with
/// `wrenn.sandbox.v1.SandboxSpec`, by name and number. The rest of the spec (ids, the
/// template's kind, the placed size) ctl fills in once the sandbox is placed; the request's
/// `template` (an id or a name) and `wait` are ctl's own. A new spec field that clients set
/// is one line here and one in the test's reverse mapping, which fails until both exist.
pub fn spec_from_create(r: &ctl::CreateSandboxRequest) -> SandboxSpec {
    SandboxSpec {
        vcpus: r.vcpus,
        memory_mib: r.memory_mib,
        disk_mib: r.disk_mib,
        timeout_s: r.timeout_s,
        on_timeout: r.on_timeout,
        env: r.env.clone(),
        metadata: r.metadata.clone(),
        network: r.network.as_ref().map(network_to_shared),
        ..SandboxSpec::default()
    }
}

/// A JSON object of strings as a map (non-string values are skipped).
pub fn json_to_map(v: &serde_json::Value) -> HashMap<String, String> {
    v.as_object()
        .map(|o| {
            o.iter()
                .filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_owned())))
                .collect()
        })
        .unwrap_or_default()
}

/// Checks a label/env map against the bounds and turns it into a JSON object.
pub fn check_map(name: &str, m: &HashMap<String, String>) -> Result<serde_json::Value, Status> {
    if m.len() > MAP_ENTRIES_MAX {
        return Err(Status::invalid_argument(format!(
            "{name}: more than {MAP_ENTRIES_MAX} entries"
        )));
    }
    let mut o = serde_json::Map::new();
    for (k, v) in m {
        if k.is_empty() || k.len() > MAP_KEY_LEN_MAX || v.len() > MAP_VALUE_LEN_MAX {
            return Err(Status::invalid_argument(format!(
                "{name}: keys must be 1..={MAP_KEY_LEN_MAX} bytes, values at most {MAP_VALUE_LEN_MAX}"
            )));
        }
        crate::db::check_text(&format!("{name} key"), k)?;
        crate::db::check_text(&format!("{name}[{k:?}]"), v)?;
        o.insert(k.clone(), serde_json::Value::String(v.clone()));
    }
    Ok(serde_json::Value::Object(o))
}

/// Checks a display name (templates, keys, teams, users).
pub fn check_name(what: &str, s: &str) -> Result<(), Status> {
    crate::db::check_text(what, s)?;
    if s.trim().is_empty() || s.len() > NAME_LEN_MAX || s.chars().any(|c| c.is_control()) {
        return Err(Status::invalid_argument(format!(
            "{what} must be 1..={NAME_LEN_MAX} bytes without control characters"
        )));
    }
    Ok(())
}

/// The template kind as stored ("base", "snapshot") → its wire value (the same number in
/// wrenn.ctl.v1 and the shared enum).
pub fn kind_wire(s: &str) -> i32 {
    TemplateKind::from_name(s).unwrap_or(TemplateKind::Base) as i32
}

/// Columns of a template row, in the order [`template`] reads them.
pub const TEMPLATE_COLS: &str =
    "t.id, t.team_id, t.name, t.kind, t.vcpus, t.memory_mib, t.disk_mib, \
    t.size_bytes, t.host_id, t.source_sandbox_id, t.created_at, t.default_user, t.default_cwd, \
    t.env";

pub fn template(r: &Row) -> ctl::Template {
    let team: Uuid = r.get(1);
    ctl::Template {
        id: id::format(Kind::Template, r.get(0)),
        team_id: id::format(Kind::Team, team),
        name: r.get(2),
        kind: kind_wire(r.get(3)),
        platform: team == super::PLATFORM_TEAM,
        vcpus: u32::try_from(r.get::<_, i32>(4)).unwrap_or(0),
        memory_mib: u32::try_from(r.get::<_, i32>(5)).unwrap_or(0),
        disk_mib: u64::try_from(r.get::<_, i64>(6)).unwrap_or(0),
        size_bytes: u64::try_from(r.get::<_, i64>(7)).unwrap_or(0),
        host_id: r
            .get::<_, Option<Uuid>>(8)
            .map(|h| id::format(Kind::Host, h))
            .unwrap_or_default(),
        source_sandbox_id: r
            .get::<_, Option<Uuid>>(9)
            .map(|s| id::format(Kind::Sandbox, s))
            .unwrap_or_default(),
        created_unix_ns: ns(Some(r.get::<_, SystemTime>(10))),
        default_user: r.get(11),
        default_cwd: r.get(12),
        env: json_to_map(&r.get::<_, serde_json::Value>(13)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::gen::wrenn::agent::v1 as agent;

    /// The other way: the public request that asks for `spec` (its template by id, `wait`
    /// unset). The clients' view of a spec, e.g. for tests and tools that replay one.
    fn create_request(spec: &SandboxSpec) -> ctl::CreateSandboxRequest {
        ctl::CreateSandboxRequest {
            template: spec.template_id.clone(),
            vcpus: spec.vcpus,
            memory_mib: spec.memory_mib,
            disk_mib: spec.disk_mib,
            timeout_s: spec.timeout_s,
            on_timeout: spec.on_timeout,
            env: spec.env.clone(),
            metadata: spec.metadata.clone(),
            wait: None,
            network: spec.network.as_ref().map(|n| ctl::NetworkPolicy {
                allow_internet_access: n.allow_internet_access,
                deny_out: n.deny_out.clone(),
                allow_out: n.allow_out.clone(),
            }),
            // ctl's own (its traffic proxy), not part of the spec an agent gets.
            allow_public_traffic: false,
            auto_resume: false,
        }
    }

    /// Every field of the public request set to a value that is not its default.
    fn full_request() -> ctl::CreateSandboxRequest {
        ctl::CreateSandboxRequest {
            template: "tpl-00000000-0000-0000-0000-000000000007".into(),
            vcpus: 3,
            memory_mib: 1536,
            disk_mib: 6000,
            timeout_s: 90,
            on_timeout: ctl::TimeoutPolicy::Pause as i32,
            metadata: [("owner".to_string(), "ci".to_string())].into(),
            env: [("LANG".to_string(), "C.UTF-8".to_string())].into(),
            wait: None,
            network: Some(ctl::NetworkPolicy {
                allow_internet_access: Some(false),
                deny_out: vec!["10.0.0.0/8".into()],
                allow_out: vec!["*.example.com".into()],
            }),
            // The fields that do not map: ctl's own, see create_request.
            allow_public_traffic: false,
            auto_resume: false,
        }
    }

    #[test]
    fn network_policies_store_and_check() {
        let n = ctl::NetworkPolicy {
            allow_internet_access: Some(false),
            deny_out: vec!["10.0.0.0/8".into()],
            allow_out: vec!["1.2.3.4".into(), "*.example.com".into()],
        };
        assert_eq!(network_from_json(&network_json(&n)), n);
        let open = ctl::NetworkPolicy::default();
        assert_eq!(network_from_json(&network_json(&open)), open);
        assert!(check_network(Some(&n)).is_ok());
        assert!(check_network(None).is_ok());
        let bad = ctl::NetworkPolicy {
            allow_out: vec!["a b".into()],
            ..Default::default()
        };
        let e = check_network(Some(&bad)).unwrap_err();
        assert_eq!(e.code, proto::Code::InvalidArgument);
        assert!(e.message.contains("a b"), "{e}");
    }

    #[test]
    fn the_public_create_request_and_the_spec_map_both_ways() {
        use prost::Message;
        let req = full_request();
        let mut spec = spec_from_create(&req);
        spec.template_id = req.template.clone();
        assert_eq!(create_request(&spec), req);
        // A spec with every field ctl.v1 can set maps to a request and back unchanged; the
        // fields it cannot set (ids, kind, kernel, user, directory) ctl fills in itself.
        let spec = SandboxSpec {
            template_id: "tpl-00000000-0000-0000-0000-000000000007".into(),
            vcpus: 2,
            memory_mib: 1024,
            disk_mib: 5120,
            timeout_s: 60,
            on_timeout: TimeoutPolicy::Destroy as i32,
            env: [("A".to_string(), "1".to_string())].into(),
            metadata: [("k".to_string(), "v".to_string())].into(),
            network: Some(proto::sandbox::NetworkPolicy {
                allow_internet_access: None,
                deny_out: vec!["0.0.0.0/0".into()],
                allow_out: vec!["api.example.com".into()],
            }),
            ..SandboxSpec::default()
        };
        let mut back = spec_from_create(&create_request(&spec));
        back.template_id = spec.template_id.clone();
        assert_eq!(back, spec);
        // Every field of the public request is accounted for. Its JSON mapping is
        // generated from the .proto file, so it lists every field, a new one too: each must
        // be set in `full_request`, and a request with each field set must encode to exactly
        // the bytes of the shared fields plus `template` and `wait`, so a field the mapping
        // forgets makes this fail.
        let mut req = full_request();
        req.wait = Some(false);
        let json = crate::http::json::to_json(&req);
        for (k, v) in json.as_object().unwrap() {
            let unset = match v {
                serde_json::Value::String(s) => {
                    s.is_empty() || s == "0" || s.ends_with("_UNSPECIFIED")
                }
                serde_json::Value::Number(n) => n.as_u64() == Some(0),
                serde_json::Value::Object(o) => o.is_empty(),
                serde_json::Value::Null => true,
                _ => false,
            };
            assert!(!unset, "full_request leaves {k} unset: set it, and map it");
        }
        let shared = spec_from_create(&req).encoded_len();
        let own = ctl::CreateSandboxRequest {
            template: req.template.clone(),
            wait: req.wait,
            ..Default::default()
        }
        .encoded_len();
        assert_eq!(req.encoded_len(), shared + own, "a field is not mapped");
    }

    #[test]
    fn public_enums_have_the_shared_numbers_and_names() {
        use proto::sandbox::SandboxState;
        // Every number either enum knows, in both directions, with the same name.
        for v in 0..16 {
            let a = ctl::SandboxState::try_from(v).ok().map(|s| s.as_str_name());
            let b = SandboxState::try_from(v).ok().map(|s| s.as_str_name());
            assert_eq!(a, b, "SandboxState {v}");
            let a = ctl::TimeoutPolicy::try_from(v)
                .ok()
                .map(|s| s.as_str_name());
            let b = TimeoutPolicy::try_from(v).ok().map(|s| s.as_str_name());
            assert_eq!(a, b, "TimeoutPolicy {v}");
            let a = ctl::TemplateKind::try_from(v).ok().map(|s| s.as_str_name());
            let b = TemplateKind::try_from(v).ok().map(|s| s.as_str_name());
            assert_eq!(a, b, "TemplateKind {v}");
        }
        // The agent's report is the shared enum; ctl's stored names read it back.
        for s in SandboxState::ALL {
            let info = agent::SandboxInfo {
                state: s as i32,
                ..Default::default()
            };
            assert_eq!(SandboxState::from_wire(info.state), Some(s));
        }
        for name in ["pause", "destroy"] {
            let wire = policy_wire(name);
            assert_eq!(
                ctl::TimeoutPolicy::try_from(wire).unwrap().as_str_name(),
                format!("TIMEOUT_POLICY_{}", name.to_uppercase())
            );
        }
        for name in ["base", "snapshot"] {
            let wire = kind_wire(name);
            assert_eq!(
                ctl::TemplateKind::try_from(wire).unwrap().as_str_name(),
                format!("TEMPLATE_KIND_{}", name.to_uppercase())
            );
        }
    }
}
