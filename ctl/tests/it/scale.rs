//! Concurrency: creates racing on two ctl replicas and two hosts never overbook a host.

use std::sync::Arc;
use std::time::Duration;

use proto::gen::wrenn::ctl::v1 as c;
use proto::rpc::Client;
use proto::Code;

use crate::harness::Ctl;

const T: Option<Duration> = Some(Duration::from_secs(60));

#[test]
fn concurrent_creates_never_exceed_capacity() {
    let Some(ctl) = Ctl::start() else { return };
    let replica = ctl.replica();
    let (fa1, h1) = ctl.add_host(4, 4096, 1_000_000);
    let (fa2, h2) = ctl.add_host(4, 4096, 1_000_000);
    for fa in [&fa1, &fa2] {
        fa.state.lock().unwrap().create_delay = Duration::from_millis(20);
    }
    let addrs = [ctl.addr(), replica.addr.to_string()];
    let key = ctl.team_key.clone();
    // Connections first, one after another: 12 TLS handshakes at once from one address
    // would exceed a replica's budget of connections before their hello (8 per source);
    // the creates are what runs concurrently.
    let clients: Vec<_> = (0..24)
        .map(|i| {
            crate::harness::connect(&addrs[i % 2], proto::rpc::Credential::api_key(&key)).unwrap()
        })
        .collect();
    let threads: Vec<_> = clients
        .into_iter()
        .map(|cl| {
            std::thread::spawn(move || {
                cl.unary::<_, c::Sandbox>(
                    c::sandboxes_methods::CREATE,
                    &c::CreateSandboxRequest::default(),
                    T,
                )
            })
        })
        .collect();
    let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let ok: Vec<&c::Sandbox> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    let exhausted = results
        .iter()
        .filter(|r| matches!(r, Err(s) if s.code == Code::ResourceExhausted))
        .count();
    assert_eq!(
        ok.len(),
        8,
        "4 vCPUs on each of 2 hosts, 1 per sandbox: {results:?}"
    );
    assert_eq!(exhausted, 16);
    for (fa, h) in [(&fa1, &h1), (&fa2, &h2)] {
        assert_eq!(fa.state.lock().unwrap().sandboxes.len(), 4, "host {h}");
        assert_eq!(ok.iter().filter(|s| &s.host_id == h).count(), 4);
        let host: c::Host = ctl
            .admin()
            .unary(
                c::hosts_methods::GET,
                &c::GetHostRequest { host_id: h.clone() },
                T,
            )
            .unwrap();
        let u = host.usage.unwrap();
        assert_eq!((u.vcpus, u.memory_mib), (4, 2048));
    }
    // Destroy all concurrently: the ledger returns to zero.
    let ids: Vec<String> = ok.iter().map(|s| s.id.clone()).collect();
    let threads: Vec<_> = ids
        .into_iter()
        .enumerate()
        .map(|(i, id)| {
            let addr = addrs[i % 2].clone();
            let key = key.clone();
            std::thread::spawn(move || {
                let cl =
                    crate::harness::connect(addr, proto::rpc::Credential::api_key(key)).unwrap();
                cl.unary::<_, c::DestroySandboxResponse>(
                    c::sandboxes_methods::DESTROY,
                    &c::DestroySandboxRequest {
                        sandbox_id: id,
                        force: false,
                    },
                    T,
                )
                .unwrap();
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    for h in [&h1, &h2] {
        let host: c::Host = ctl
            .admin()
            .unary(
                c::hosts_methods::GET,
                &c::GetHostRequest { host_id: h.clone() },
                T,
            )
            .unwrap();
        let u = host.usage.unwrap();
        assert_eq!((u.vcpus, u.memory_mib, u.disk_mib), (0, 0, 0));
    }
    let _keep = Arc::new(());
    replica.shutdown();
}

#[test]
fn placement_follows_template_files_and_paused_sandboxes() {
    let Some(ctl) = Ctl::start() else { return };
    let cl = ctl.team();
    let (_fa1, h1) = ctl.add_host(2, 8192, 1_000_000);
    let src: c::Sandbox = cl
        .unary(
            c::sandboxes_methods::CREATE,
            &c::CreateSandboxRequest::default(),
            T,
        )
        .unwrap();
    assert_eq!(src.host_id, h1);
    let tpl: c::Template = cl
        .unary(
            c::templates_methods::CREATE,
            &c::CreateTemplateRequest {
                sandbox_id: src.id.clone(),
                name: "snap".into(),
                platform: false,
            },
            T,
        )
        .unwrap();
    // A second, emptier host appears; the snapshot template still starts only on h1.
    let (_fa2, h2) = ctl.add_host(16, 65536, 1_000_000);
    let a: c::Sandbox = cl
        .unary(
            c::sandboxes_methods::CREATE,
            &c::CreateSandboxRequest {
                template: tpl.id.clone(),
                ..Default::default()
            },
            T,
        )
        .unwrap();
    assert_eq!(a.host_id, h1);
    // h1 has 2 vCPUs: the source (paused: holds only disk) + a → one more fits, then full.
    let b: c::Sandbox = cl
        .unary(
            c::sandboxes_methods::CREATE,
            &c::CreateSandboxRequest {
                template: "snap".into(),
                ..Default::default()
            },
            T,
        )
        .unwrap();
    assert_eq!(b.host_id, h1);
    let r = cl.unary::<_, c::Sandbox>(
        c::sandboxes_methods::CREATE,
        &c::CreateSandboxRequest {
            template: "snap".into(),
            ..Default::default()
        },
        T,
    );
    assert_eq!(
        crate::harness::code(r),
        Code::ResourceExhausted,
        "h2 is free but holds no files of the template"
    );
    // Base-template creates go to the free host.
    let d: c::Sandbox = cl
        .unary(
            c::sandboxes_methods::CREATE,
            &c::CreateSandboxRequest::default(),
            T,
        )
        .unwrap();
    assert_eq!(d.host_id, h2);
    // The paused source resumes only on h1, which is full: resource_exhausted, still paused.
    let r = cl.unary::<_, c::Sandbox>(
        c::sandboxes_methods::RESUME,
        &c::ResumeSandboxRequest {
            sandbox_id: src.id.clone(),
            timeout_s: 0,
        },
        T,
    );
    assert_eq!(crate::harness::code(r), Code::ResourceExhausted);
    let g: c::Sandbox = cl
        .unary(
            c::sandboxes_methods::GET,
            &c::GetSandboxRequest {
                sandbox_id: src.id.clone(),
            },
            T,
        )
        .unwrap();
    assert_eq!(g.state, c::SandboxState::Paused as i32);
    // Free a slot on h1: now it resumes there.
    let _: c::DestroySandboxResponse = cl
        .unary(
            c::sandboxes_methods::DESTROY,
            &c::DestroySandboxRequest {
                sandbox_id: a.id.clone(),
                force: false,
            },
            T,
        )
        .unwrap();
    let g: c::Sandbox = cl
        .unary(
            c::sandboxes_methods::RESUME,
            &c::ResumeSandboxRequest {
                sandbox_id: src.id.clone(),
                timeout_s: 0,
            },
            T,
        )
        .unwrap();
    assert_eq!(
        (g.state, g.host_id.as_str()),
        (c::SandboxState::Running as i32, h1.as_str())
    );
}

/// Usage of a host as (vCPUs, memory, disk), read through the API.
fn usage(ctl: &Ctl, host: &str) -> (u32, u64, u64) {
    let h: c::Host = ctl
        .admin()
        .unary(
            c::hosts_methods::GET,
            &c::GetHostRequest {
                host_id: host.to_owned(),
            },
            T,
        )
        .unwrap();
    let u = h.usage.unwrap();
    (u.vcpus, u.memory_mib, u.disk_mib)
}

/// The successful creates' audit rows (refused creates have failure rows of their own).
fn audit_creates(cl: &Client) -> Vec<c::AuditLog> {
    crate::harness::audit(cl, "sandbox.create")
        .into_iter()
        .filter(|a| a.status == "success")
        .collect()
}

fn audit_create_failures(cl: &Client) -> Vec<c::AuditLog> {
    crate::harness::audit(cl, "sandbox.create")
        .into_iter()
        .filter(|a| a.status == "failure")
        .collect()
}

#[test]
fn the_last_capacity_goes_to_exactly_one_create() {
    let Some(ctl) = Ctl::start() else { return };
    let replica = ctl.replica();
    let (fa, h) = ctl.add_host(2, 1024, 1_000_000);
    fa.state.lock().unwrap().create_delay = Duration::from_millis(20);
    let first: c::Sandbox = ctl
        .team()
        .unary(
            c::sandboxes_methods::CREATE,
            &c::CreateSandboxRequest::default(),
            T,
        )
        .unwrap();
    assert_eq!(first.host_id, h);
    // One sandbox of 1 vCPU / 512 MiB still fits; 8 creates on two replicas race for it.
    let addrs = [ctl.addr(), replica.addr.to_string()];
    let barrier = Arc::new(std::sync::Barrier::new(8));
    let threads: Vec<_> = (0..8)
        .map(|i| {
            let addr = addrs[i % 2].clone();
            let key = ctl.team_key.clone();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let cl =
                    crate::harness::connect(addr, proto::rpc::Credential::api_key(key)).unwrap();
                barrier.wait();
                cl.unary::<_, c::Sandbox>(
                    c::sandboxes_methods::CREATE,
                    &c::CreateSandboxRequest::default(),
                    T,
                )
            })
        })
        .collect();
    let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let won = results.iter().filter(|r| r.is_ok()).count();
    let exhausted = results
        .iter()
        .filter(|r| matches!(r, Err(s) if s.code == Code::ResourceExhausted))
        .count();
    assert_eq!((won, exhausted), (1, 7), "{results:?}");
    assert_eq!(usage(&ctl, &h), (2, 1024, 2 * 5120));
    assert_eq!(fa.state.lock().unwrap().sandboxes.len(), 2);
    // One success row per sandbox that exists, a failure row per refused create.
    assert_eq!(audit_creates(&ctl.team()).len(), 2);
    assert_eq!(audit_create_failures(&ctl.team()).len(), 7);
    replica.shutdown();
}

#[test]
fn create_sizes_refusals_and_audit_row() {
    let Some(ctl) = Ctl::start() else { return };
    let cl = ctl.team();
    let (_fa, h) = ctl.add_host(8, 8192, 1_000_000);
    // A base template: requested sizes win; 0 means the template's.
    let sb: c::Sandbox = cl
        .unary(
            c::sandboxes_methods::CREATE,
            &c::CreateSandboxRequest {
                vcpus: 2,
                memory_mib: 1024,
                disk_mib: 6000,
                ..Default::default()
            },
            T,
        )
        .unwrap();
    assert_eq!((sb.vcpus, sb.memory_mib, sb.disk_mib), (2, 1024, 6000));
    assert_eq!(usage(&ctl, &h), (2, 1024, 6000));
    let audit = audit_creates(&cl);
    assert_eq!(audit.len(), 1);
    assert_eq!(audit[0].resource_id, sb.id);
    let meta: serde_json::Value = serde_json::from_str(&audit[0].metadata_json).unwrap();
    assert_eq!(
        meta,
        serde_json::json!({
            "template": "tpl-00000000-0000-0000-0000-000000000000",
            "host": h,
            "vcpus": 2,
            "memory_mib": 1024,
        })
    );
    // A disk below the template's is refused before anything is reserved or written.
    let r = cl.unary::<_, c::Sandbox>(
        c::sandboxes_methods::CREATE,
        &c::CreateSandboxRequest {
            disk_mib: 100,
            ..Default::default()
        },
        T,
    );
    assert_eq!(crate::harness::code(r), Code::InvalidArgument);
    // Unknown templates, by name and by id, and another team's template by id.
    for t in ["nope", "tpl-00000000-0000-4000-8000-000000000009"] {
        let r = cl.unary::<_, c::Sandbox>(
            c::sandboxes_methods::CREATE,
            &c::CreateSandboxRequest {
                template: t.into(),
                ..Default::default()
            },
            T,
        );
        assert_eq!(crate::harness::code(r), Code::NotFound, "{t}");
    }
    assert_eq!(usage(&ctl, &h), (2, 1024, 6000));
    assert_eq!(audit_creates(&cl).len(), 1);
    // A snapshot template: its own size wins over the request, and it runs on its host.
    let tpl: c::Template = cl
        .unary(
            c::templates_methods::CREATE,
            &c::CreateTemplateRequest {
                sandbox_id: sb.id.clone(),
                name: "snap".into(),
                platform: false,
            },
            T,
        )
        .unwrap();
    let (other_team, other_key) = ctl.other_team("other", "other@example.com");
    assert!(!other_team.is_empty());
    let r = ctl.client(&other_key).unary::<_, c::Sandbox>(
        c::sandboxes_methods::CREATE,
        &c::CreateSandboxRequest {
            template: tpl.id.clone(),
            ..Default::default()
        },
        T,
    );
    assert_eq!(crate::harness::code(r), Code::NotFound, "another team's");
    let (_fa2, _h2) = ctl.add_host(64, 65536, 1_000_000);
    for t in [tpl.id.clone(), "snap".to_owned()] {
        let s: c::Sandbox = cl
            .unary(
                c::sandboxes_methods::CREATE,
                &c::CreateSandboxRequest {
                    template: t.clone(),
                    vcpus: 1,
                    memory_mib: 256,
                    disk_mib: 100_000,
                    ..Default::default()
                },
                T,
            )
            .unwrap();
        assert_eq!(
            (s.vcpus, s.memory_mib, s.disk_mib, s.host_id.as_str()),
            (2, 1024, 6000, h.as_str()),
            "{t}"
        );
        assert_eq!(s.template_id, tpl.id);
    }
}
