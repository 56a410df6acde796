//! wrenn-agent's integration tests.
//!
//! - `lifecycle`: the manager over a fake VM layer (real processes, in-process envd);
//! - `service`: the RPC server, its bad-input answers and the proxies to envd;
//! - `forward`: every forwarded method through the one forwarding path, and re-cutting to
//!   a client's small frame limit;
//! - `binary`: the wrenn-agent executable (flags, start without Firecracker, /health);
//! - `e2e`: with a real Firecracker (WRENN_FIRECRACKER, WRENN_KERNEL, WRENN_ROOTFS).

mod binary;
mod e2e;
mod e2e_jail;
mod fake;
mod forward;
mod lifecycle;
mod samples;
mod service;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use agent::manager::{Config, Events, Manager};
use agent::statedir::{SandboxSpec, TemplateKind, TimeoutPolicy};
use agent::ttl::TestClock;
use proto::gen::wrenn::host::v1::ReportStateRequest;
use proto::id::{self, Uuid};

/// The id of the base template every test host has.
pub const BASE: Uuid = Uuid::nil();

/// Reports collected instead of sent to ctl.
#[derive(Default)]
pub struct Collected(pub Mutex<Vec<ReportStateRequest>>);

impl Events for Collected {
    fn state_changed(&self, r: ReportStateRequest) {
        self.0.lock().unwrap().push(r);
    }
}

/// A temporary state root with a base template, a fake VM layer and a test clock.
pub struct Env {
    pub root: PathBuf,
    pub vmm: Arc<fake::FakeVmm>,
    pub clock: Arc<TestClock>,
    pub events: Arc<Collected>,
    pub manager: Arc<Manager>,
}

pub fn tmp_root(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("wrenn-agent-it-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

impl Env {
    pub fn new(name: &str) -> Env {
        Env::with_slots(name, 64)
    }

    pub fn with_slots(name: &str, slots: u32) -> Env {
        let root = tmp_root(name);
        let base = root.join("templates").join(BASE.hyphenated().to_string());
        std::fs::create_dir_all(&base).unwrap();
        std::fs::write(base.join("rootfs.ext4"), vec![1u8; 8192]).unwrap();
        let vmm = Arc::new(fake::FakeVmm::default());
        let clock = Arc::new(TestClock::new(1_700_000_000_000_000_000));
        let events = Arc::new(Collected::default());
        let manager = Env::manager_on(&root, slots, &vmm, &clock, &events);
        Env {
            root,
            vmm,
            clock,
            events,
            manager,
        }
    }

    pub fn manager_on(
        root: &std::path::Path,
        slots: u32,
        vmm: &Arc<fake::FakeVmm>,
        clock: &Arc<TestClock>,
        events: &Arc<Collected>,
    ) -> Arc<Manager> {
        let mut cfg = Config::new(root);
        cfg.slot_capacity = slots;
        // The fake envd reports a start at once; its `stall` command never does.
        cfg.exec_start_timeout = std::time::Duration::from_secs(2);
        Manager::new(cfg, vmm.clone(), clock.clone(), events.clone()).unwrap()
    }

    pub fn spec(&self, n: u128) -> SandboxSpec {
        SandboxSpec {
            sandbox_id: id::format_sandbox(Uuid::from_u128(n)),
            template_id: id::format_template(BASE),
            template_kind: TemplateKind::Base as i32,
            timeout_s: 60,
            on_timeout: TimeoutPolicy::Destroy as i32,
            env: [("GREETING".to_string(), "hi".to_string())].into(),
            ..SandboxSpec::default()
        }
    }

    pub fn dir(&self, n: u128) -> PathBuf {
        self.root
            .join("sandboxes")
            .join(Uuid::from_u128(n).hyphenated().to_string())
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// Prints a visible skip, or fails under WRENN_REQUIRE_E2E=1.
pub fn skip(reason: &str) {
    proto::skip::skip("agent", reason);
}
