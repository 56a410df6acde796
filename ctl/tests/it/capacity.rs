//! Issue 15 §1: a host's overcommit ratios, reported by its agent, decide what the scheduler
//! places there; `Hosts/Get` shows the host's own resources and the ratios.

use std::time::Duration;

use proto::gen::wrenn::agent::v1 as agent;
use proto::gen::wrenn::ctl::v1 as c;
use proto::gen::wrenn::host::v1 as host;
use proto::Code;

use crate::harness::Ctl;

const T: Option<Duration> = Some(Duration::from_secs(30));

fn one_vcpu(cl: &proto::rpc::Client) -> Result<c::Sandbox, proto::Status> {
    cl.unary(
        c::sandboxes_methods::CREATE,
        &c::CreateSandboxRequest {
            vcpus: 1,
            memory_mib: 256,
            ..Default::default()
        },
        T,
    )
}

#[test]
fn a_two_core_host_at_four_times_takes_eight_one_vcpu_sandboxes() {
    let Some(ctl) = Ctl::start() else { return };
    // What an agent with the default --vcpu-overcommit 4 sends for a 2-core host.
    let (_fa, host_id) = ctl
        .register_host(8, 8192, 100_000, vec![], |r| {
            r.physical = Some(agent::Resources {
                vcpus: 2,
                memory_mib: 8192,
                disk_mib: 100_000,
            });
            r.vcpu_overcommit = 4.0;
            r.memory_overcommit = 1.0;
        })
        .unwrap();
    let cl = ctl.team();
    // A third 1-vCPU sandbox on 2 cores: refused without overcommit, placed now.
    for i in 0..8 {
        one_vcpu(&cl).unwrap_or_else(|e| panic!("sandbox {i}: {e}"));
    }
    assert_eq!(
        one_vcpu(&cl).unwrap_err().code,
        Code::ResourceExhausted,
        "the ninth is beyond 2 x 4"
    );
    let h: c::Host = ctl
        .admin()
        .unary(
            c::hosts_methods::GET,
            &c::GetHostRequest {
                host_id: host_id.clone(),
            },
            T,
        )
        .unwrap();
    assert_eq!(h.physical.as_ref().map(|p| p.vcpus), Some(2));
    assert_eq!(h.capacity.as_ref().map(|p| p.vcpus), Some(8));
    assert_eq!(h.usage.as_ref().map(|p| p.vcpus), Some(8));
    assert_eq!((h.vcpu_overcommit, h.memory_overcommit), (4.0, 1.0));
}

#[test]
fn ratios_out_of_bounds_are_refused_and_old_agents_read_as_one() {
    let Some(ctl) = Ctl::start() else { return };
    for (v, m) in [(33.0, 1.0), (4.0, 5.0), (f64::NAN, 1.0), (-1.0, 1.0)] {
        let e = ctl
            .register_host(2, 1024, 1000, vec![], |r| {
                r.vcpu_overcommit = v;
                r.memory_overcommit = m;
            })
            .map(|_| ())
            .unwrap_err();
        assert_eq!(e.code, Code::InvalidArgument, "{v} {m}: {e}");
        assert!(e.message.contains("overcommit"), "{e}");
    }
    // An agent that sends no settings: physical is its capacity, ratios 1.
    let (fa, host_id) = ctl.add_host(2, 1024, 1000);
    let h: c::Host = ctl
        .admin()
        .unary(c::hosts_methods::GET, &c::GetHostRequest { host_id }, T)
        .unwrap();
    assert_eq!(h.physical.as_ref().map(|p| p.vcpus), Some(2));
    assert_eq!((h.vcpu_overcommit, h.memory_overcommit), (1.0, 1.0));
    // A heartbeat brings new ratios (an agent restarted with other flags).
    fa.host_client()
        .unary::<_, host::HeartbeatResponse>(
            host::host_methods::HEARTBEAT,
            &host::HeartbeatRequest {
                capacity: Some(agent::Resources {
                    vcpus: 10,
                    memory_mib: 1024,
                    disk_mib: 1000,
                }),
                physical: Some(agent::Resources {
                    vcpus: 2,
                    memory_mib: 1024,
                    disk_mib: 1000,
                }),
                vcpu_overcommit: 5.0,
                ..Default::default()
            },
            T,
        )
        .unwrap();
    let hosts: c::ListHostsResponse = ctl
        .admin()
        .unary(c::hosts_methods::LIST, &c::ListHostsRequest::default(), T)
        .unwrap();
    let h = &hosts.hosts[0];
    assert_eq!(h.capacity.as_ref().map(|p| p.vcpus), Some(10));
    assert_eq!((h.vcpu_overcommit, h.memory_overcommit), (5.0, 1.0));
}
