//! The sandbox types every service and daemon shares (`wrenn.sandbox.v1`, PROTOCOL.md §10):
//! the spec, the lifecycle state, the timeout policy and the template kind, with the one
//! stored name of each enum value (ctl's rows, the agent's records, logs).
//!
//! The public `wrenn.ctl.v1` keeps enums of its own with the same numbers; ctl's mapping
//! and its test check them.

use std::fmt;

pub use crate::gen::wrenn::sandbox::v1::{
    NetworkPolicy, SandboxSpec, SandboxState, TemplateKind, TimeoutPolicy,
};

impl SandboxState {
    /// Every state but UNSPECIFIED.
    pub const ALL: [SandboxState; 9] = [
        SandboxState::Pending,
        SandboxState::Starting,
        SandboxState::Running,
        SandboxState::Pausing,
        SandboxState::Paused,
        SandboxState::Resuming,
        SandboxState::Stopping,
        SandboxState::Stopped,
        SandboxState::Error,
    ];

    /// The stored name: ctl's `sandboxes.state`, the agent's `state` key, logs.
    pub const fn name(self) -> &'static str {
        match self {
            SandboxState::Unspecified => "unspecified",
            SandboxState::Pending => "pending",
            SandboxState::Starting => "starting",
            SandboxState::Running => "running",
            SandboxState::Pausing => "pausing",
            SandboxState::Paused => "paused",
            SandboxState::Resuming => "resuming",
            SandboxState::Stopping => "stopping",
            SandboxState::Stopped => "stopped",
            SandboxState::Error => "error",
        }
    }

    /// The state of a stored name; `None` for anything else (UNSPECIFIED is never stored).
    pub fn from_name(s: &str) -> Option<SandboxState> {
        SandboxState::ALL.into_iter().find(|st| st.name() == s)
    }

    /// The state of a wire value; `None` for UNSPECIFIED and unknown numbers.
    pub fn from_wire(v: i32) -> Option<SandboxState> {
        SandboxState::ALL.into_iter().find(|st| *st as i32 == v)
    }

    /// A state with work in progress (an API call or the agent is still moving the sandbox
    /// out of it): after a restart, a sandbox left in one was interrupted mid-operation.
    pub const fn is_transient(self) -> bool {
        matches!(
            self,
            SandboxState::Pending
                | SandboxState::Starting
                | SandboxState::Pausing
                | SandboxState::Resuming
                | SandboxState::Stopping
        )
    }
}

impl fmt::Display for SandboxState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl TimeoutPolicy {
    /// The stored name ("pause", "destroy").
    pub const fn name(self) -> &'static str {
        match self {
            TimeoutPolicy::Unspecified => "unspecified",
            TimeoutPolicy::Pause => "pause",
            TimeoutPolicy::Destroy => "destroy",
        }
    }

    /// The policy of a stored name; UNSPECIFIED is never stored.
    pub fn from_name(s: &str) -> Option<TimeoutPolicy> {
        [TimeoutPolicy::Pause, TimeoutPolicy::Destroy]
            .into_iter()
            .find(|p| p.name() == s)
    }

    /// Reads a wire value: `Ok(None)` for UNSPECIFIED (the caller's default applies: DESTROY
    /// at create, "keep" at SetTimeout), an error naming the value for unknown numbers.
    pub fn from_wire(v: i32) -> Result<Option<TimeoutPolicy>, crate::Status> {
        match TimeoutPolicy::try_from(v) {
            Ok(TimeoutPolicy::Unspecified) => Ok(None),
            Ok(p) => Ok(Some(p)),
            Err(_) => Err(crate::Status::invalid_argument(format!(
                "unknown on_timeout {v}"
            ))),
        }
    }
}

impl TemplateKind {
    /// The stored name ("base", "snapshot").
    pub const fn name(self) -> &'static str {
        match self {
            TemplateKind::Unspecified => "unspecified",
            TemplateKind::Base => "base",
            TemplateKind::Snapshot => "snapshot",
        }
    }

    /// The kind of a stored name; UNSPECIFIED is never stored.
    pub fn from_name(s: &str) -> Option<TemplateKind> {
        [TemplateKind::Base, TemplateKind::Snapshot]
            .into_iter()
            .find(|k| k.name() == s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_names_round_trip_and_refuse_unspecified() {
        for s in SandboxState::ALL {
            assert_eq!(SandboxState::from_name(s.name()), Some(s));
            assert_eq!(SandboxState::from_wire(s as i32), Some(s));
            assert_eq!(s.to_string(), s.name());
        }
        assert_eq!(SandboxState::from_name("unspecified"), None);
        assert_eq!(SandboxState::from_name("Running"), None);
        assert_eq!(SandboxState::from_wire(0), None);
        assert_eq!(SandboxState::from_wire(10), None);
        for p in [TimeoutPolicy::Pause, TimeoutPolicy::Destroy] {
            assert_eq!(TimeoutPolicy::from_name(p.name()), Some(p));
            assert_eq!(TimeoutPolicy::from_wire(p as i32).unwrap(), Some(p));
        }
        assert_eq!(TimeoutPolicy::from_name("unspecified"), None);
        assert_eq!(TimeoutPolicy::from_wire(0).unwrap(), None);
        assert_eq!(
            TimeoutPolicy::from_wire(3).unwrap_err().code,
            crate::Code::InvalidArgument
        );
        for k in [TemplateKind::Base, TemplateKind::Snapshot] {
            assert_eq!(TemplateKind::from_name(k.name()), Some(k));
        }
        assert_eq!(TemplateKind::from_name("unspecified"), None);
    }

    #[test]
    fn stored_names_are_the_wire_names_in_lower_case() {
        // One naming rule, so the stored form cannot drift from the .proto file.
        for s in SandboxState::ALL {
            let wire = s.as_str_name().strip_prefix("SANDBOX_STATE_").unwrap();
            assert_eq!(wire.to_lowercase(), s.name());
        }
        for p in [TimeoutPolicy::Pause, TimeoutPolicy::Destroy] {
            let wire = p.as_str_name().strip_prefix("TIMEOUT_POLICY_").unwrap();
            assert_eq!(wire.to_lowercase(), p.name());
        }
        for k in [TemplateKind::Base, TemplateKind::Snapshot] {
            let wire = k.as_str_name().strip_prefix("TEMPLATE_KIND_").unwrap();
            assert_eq!(wire.to_lowercase(), k.name());
        }
    }
}
