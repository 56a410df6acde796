//! Per-sandbox usage samples through the RPC server: the sampler reads the fake VM's
//! process (a real `sleep`), `Sandboxes/Samples` serves the tiers, and a pause or destroy
//! freezes them (still readable, so ctl can store them).

use std::sync::Arc;
use std::time::Duration;

use agent::host::{Host, IdentityCell};
use agent::rpc::AgentService;
use agent::samples::Store;
use agent::statedir::Identity;
use proto::gen::wrenn::agent::v1 as pb;
use proto::id::Uuid;
use proto::rpc::{Client, Credential, Server, ServerConfig};
use proto::Code;

use crate::service::{sb, TOKEN};
use crate::{Env, BASE};

const T: Option<Duration> = Some(Duration::from_secs(30));

fn samples(c: &Client, n: u128, step_s: u32) -> Result<pb::SandboxSamplesResponse, proto::Status> {
    c.unary(
        pb::sandboxes_methods::SAMPLES,
        &pb::SandboxSamplesRequest {
            sandbox_id: sb(n),
            since_unix_ns: 0,
            step_s,
        },
        T,
    )
}

#[test]
fn the_sampler_feeds_samples_and_pause_and_destroy_freeze_them() {
    let env = Env::new("samples");
    let identity = Arc::new(IdentityCell::new(Some(Identity {
        host_id: Uuid::from_u128(5),
        host_token: "host".into(),
        agent_token: TOKEN.into(),
    })));
    let host = Arc::new(Host {
        manager: env.manager.clone(),
        identity: identity.clone(),
        extra_problems: Vec::new(),
        overcommit: Default::default(),
    });
    let store = Arc::new(Store::new());
    let svc = AgentService::new(env.manager.clone(), host, identity)
        .unwrap()
        .with_samples(store.clone());
    let mut server = Server::new(ServerConfig::new("wrenn-agent"), Arc::new(svc)).unwrap();
    let addr = server.listen_tcp("127.0.0.1:0".parse().unwrap()).unwrap();
    let (handle, _join) = server.spawn().unwrap();
    let c = Client::connect_tcp(addr, Credential::agent_token(TOKEN)).unwrap();
    let _: pb::SandboxInfo = c
        .unary(
            pb::sandboxes_methods::CREATE,
            &proto::sandbox::SandboxSpec {
                sandbox_id: sb(1),
                template_id: proto::id::format_template(BASE),
                template_kind: proto::sandbox::TemplateKind::Base as i32,
                ..Default::default()
            },
            T,
        )
        .unwrap();
    assert_eq!(
        code(samples(&c, 1, 1)),
        Code::NotFound,
        "nothing sampled yet"
    );
    for _ in 0..3 {
        assert_eq!(agent::sampler::sample_once(&env.manager, &store), 1);
        env.clock.advance(Duration::from_secs(1));
    }
    let r = samples(&c, 1, 1).unwrap();
    assert!(r.live);
    assert_eq!((r.step_s, r.samples.len()), (1, 3));
    assert!(r.samples.iter().all(|s| s.memory_bytes > 0), "{r:?}");
    assert!(r.samples.iter().all(|s| s.disk_bytes > 0), "{r:?}");
    assert_eq!(r.samples[1].unix_ns - r.samples[0].unix_ns, 1_000_000_000);

    let _: pb::SandboxInfo = c
        .unary(
            pb::sandboxes_methods::PAUSE,
            &pb::PauseSandboxRequest { sandbox_id: sb(1) },
            T,
        )
        .unwrap();
    // Read at once after the pause: frozen, and the 30-s bucket it was filling is closed.
    let r = samples(&c, 1, 30).unwrap();
    assert!(!r.live);
    assert_eq!(r.samples.len(), 1);
    assert_eq!(r.samples[0].step_s, 3);
    assert_eq!(
        agent::sampler::sample_once(&env.manager, &store),
        0,
        "no VM to read"
    );

    let _: pb::DestroySandboxResponse = c
        .unary(
            pb::sandboxes_methods::DESTROY,
            &pb::DestroySandboxRequest { sandbox_id: sb(1) },
            T,
        )
        .unwrap();
    let r = samples(&c, 1, 1).unwrap();
    assert_eq!((r.live, r.samples.len()), (false, 3), "kept after destroy");
    assert_eq!(code(samples(&c, 1, 7)), Code::InvalidArgument);
    handle.shutdown();
}

fn code<T: std::fmt::Debug>(r: Result<T, proto::Status>) -> Code {
    r.unwrap_err().code
}
