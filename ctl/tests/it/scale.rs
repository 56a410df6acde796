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
    let threads: Vec<_> = (0..24)
        .map(|i| {
            let addr = addrs[i % 2].clone();
            let key = key.clone();
            std::thread::spawn(move || {
                let cl = Client::connect_tcp(addr, proto::rpc::Credential::api_key(key)).unwrap();
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
                let cl = Client::connect_tcp(addr, proto::rpc::Credential::api_key(key)).unwrap();
                cl.unary::<_, c::DestroySandboxResponse>(
                    c::sandboxes_methods::DESTROY,
                    &c::DestroySandboxRequest { sandbox_id: id },
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
