//! Rows to messages, and the small validations every call shares.

use std::collections::HashMap;
use std::time::SystemTime;

use postgres::Row;
use proto::gen::wrenn::ctl::v1 as ctl;
use proto::id::{self, Kind, Uuid};
use proto::Status;

use super::audit::ns;
use crate::limits::{MAP_ENTRIES_MAX, MAP_KEY_LEN_MAX, MAP_VALUE_LEN_MAX, NAME_LEN_MAX};
use crate::scheduler::State;

/// Columns of a sandbox row, in the order [`sandbox`] reads them.
pub const SANDBOX_COLS: &str =
    "s.id, s.team_id, s.host_id, s.template_id, s.state, s.state_reason, \
    s.vcpus, s.memory_mib, s.disk_mib, s.timeout_s, s.on_timeout, s.metadata, s.created_at, \
    s.updated_at, s.expires_at";

/// A sandbox row as a message.
pub fn sandbox(r: &Row) -> ctl::Sandbox {
    let state = State::parse(r.get(4)).unwrap_or(State::Error);
    let metadata: serde_json::Value = r.get(11);
    ctl::Sandbox {
        id: id::format(Kind::Sandbox, r.get(0)),
        team_id: id::format(Kind::Team, r.get(1)),
        host_id: r
            .get::<_, Option<Uuid>>(2)
            .map(|h| id::format(Kind::Host, h))
            .unwrap_or_default(),
        template_id: id::format(Kind::Template, r.get(3)),
        state: state.wire(),
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
    }
}

/// `pause` / `destroy` → wire TimeoutPolicy.
pub fn policy_wire(s: &str) -> i32 {
    match s {
        "pause" => ctl::TimeoutPolicy::Pause as i32,
        _ => ctl::TimeoutPolicy::Destroy as i32,
    }
}

/// Wire TimeoutPolicy → stored text (`None` = unspecified).
pub fn policy_text(v: i32) -> Result<Option<&'static str>, Status> {
    match ctl::TimeoutPolicy::try_from(v) {
        Ok(ctl::TimeoutPolicy::Unspecified) => Ok(None),
        Ok(ctl::TimeoutPolicy::Pause) => Ok(Some("pause")),
        Ok(ctl::TimeoutPolicy::Destroy) => Ok(Some("destroy")),
        Err(_) => Err(Status::invalid_argument(format!("unknown on_timeout {v}"))),
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

/// The template kind as stored → wire.
pub fn kind_wire(s: &str) -> i32 {
    match s {
        "snapshot" => ctl::TemplateKind::Snapshot as i32,
        _ => ctl::TemplateKind::Base as i32,
    }
}

/// Columns of a template row, in the order [`template`] reads them.
pub const TEMPLATE_COLS: &str =
    "t.id, t.team_id, t.name, t.kind, t.vcpus, t.memory_mib, t.disk_mib, \
    t.size_bytes, t.host_id, t.source_sandbox_id, t.created_at";

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
    }
}
