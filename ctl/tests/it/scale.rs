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
