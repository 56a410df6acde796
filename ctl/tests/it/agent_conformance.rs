//! Protocol conformance of a `wrenn.agent.v1` server: hello and auth, error codes, list,
//! bad input. A plain function of an address and the agent token, so the same checks run
//! against the in-test fake agent here and against the real agent (agent issue).

use prost::Message;
use proto::gen::wrenn::agent::v1 as agent;
use proto::rpc::{Client, Credential};
use proto::Code;

/// A message whose field 1 is raw bytes: sent where a string is expected, with invalid
/// UTF-8, it is a malformed request.
#[derive(Clone, PartialEq, Message)]
struct RawField1 {
    #[prost(bytes = "vec", tag = "1")]
    b: Vec<u8>,
}

fn expect_code<T: std::fmt::Debug>(
    what: &str,
    r: Result<T, proto::Status>,
    want: Code,
) -> Result<(), String> {
    match r {
        Err(s) if s.code == want => Ok(()),
        Err(s) => Err(format!(
            "{what}: expected {want}, got {} ({})",
            s.code, s.message
        )),
        Ok(v) => Err(format!("{what}: expected {want}, got Ok({v:?})")),
    }
}

/// Runs every check; the first failure is returned.
pub fn run(addr: &str, token: &str) -> Result<(), String> {
    let t = Some(std::time::Duration::from_secs(10));
    // Hello and auth: a wrong token, another credential kind, none at all.
    for (what, cred) in [
        (
            "wrong agent token",
            Credential::agent_token(format!("{token}x")),
        ),
        ("api key credential", Credential::api_key(token)),
        ("no credential", Credential::none()),
    ] {
        let r = Client::connect_tcp(addr, cred).and_then(|c| {
            c.unary::<_, agent::ListSandboxesResponse>(
                agent::sandboxes_methods::LIST,
                &agent::ListSandboxesRequest::default(),
                t,
            )
        });
        expect_code(what, r, Code::Unauthenticated)?;
    }
    let c = Client::connect_tcp(addr, Credential::agent_token(token))
        .map_err(|e| format!("connect: {e:?}"))?;
    // List works and every entry is well-formed.
    let l: agent::ListSandboxesResponse = c
        .unary(
            agent::sandboxes_methods::LIST,
            &agent::ListSandboxesRequest::default(),
            t,
        )
        .map_err(|e| format!("list: {e:?}"))?;
    for s in &l.sandboxes {
        proto::id::parse(proto::id::Kind::Sandbox, &s.sandbox_id)
            .map_err(|e| format!("list entry id: {e}"))?;
        if !(1..=9).contains(&s.state) {
            return Err(format!("list entry state {}", s.state));
        }
    }
    // Bad ids are invalid_argument; unknown ones not_found.
    for bad in [
        "",
        "sb-",
        "sb-XYZ",
        "tpl-00000000-0000-0000-0000-000000000000",
        "sb-00000000-0000-0000-0000-00000000000G",
    ] {
        let r = c.unary::<_, agent::SandboxInfo>(
            agent::sandboxes_methods::GET,
            &agent::GetSandboxRequest {
                sandbox_id: bad.into(),
            },
            t,
        );
        expect_code(&format!("get {bad:?}"), r, Code::InvalidArgument)?;
    }
    let unknown = "sb-7a1f2b3c-0000-4000-8000-000000000001";
    expect_code(
        "get unknown",
        c.unary::<_, agent::SandboxInfo>(
            agent::sandboxes_methods::GET,
            &agent::GetSandboxRequest {
                sandbox_id: unknown.into(),
            },
            t,
        ),
        Code::NotFound,
    )?;
    expect_code(
        "destroy unknown",
        c.unary::<_, agent::DestroySandboxResponse>(
            agent::sandboxes_methods::DESTROY,
            &agent::DestroySandboxRequest {
                sandbox_id: unknown.into(),
            },
            t,
        ),
        Code::NotFound,
    )?;
    expect_code(
        "pause unknown",
        c.unary::<_, agent::SandboxInfo>(
            agent::sandboxes_methods::PAUSE,
            &agent::PauseSandboxRequest {
                sandbox_id: unknown.into(),
            },
            t,
        ),
        Code::NotFound,
    )?;
    // Malformed protobuf (invalid UTF-8 in a string field).
    expect_code(
        "malformed request",
        c.unary::<_, agent::SandboxInfo>(
            agent::sandboxes_methods::GET,
            &RawField1 {
                b: vec![0xff, 0xfe, 0xfd],
            },
            t,
        ),
        Code::InvalidArgument,
    )?;
    // Unknown method.
    expect_code(
        "unknown method",
        c.unary::<_, agent::ListSandboxesResponse>(
            "wrenn.agent.v1.Sandboxes/Nope",
            &agent::ListSandboxesRequest::default(),
            t,
        ),
        Code::Unimplemented,
    )?;
    // The connection survives errors.
    c.unary::<_, agent::ListSandboxesResponse>(
        agent::sandboxes_methods::LIST,
        &agent::ListSandboxesRequest::default(),
        t,
    )
    .map_err(|e| format!("list after errors: {e:?}"))?;
    Ok(())
}

#[test]
fn fake_agent_conforms() {
    let fa = crate::fake_agent::FakeAgent::start();
    fa.set_token("wra_conformance");
    run(&fa.addr.to_string(), "wra_conformance").unwrap();
}

/// Runs the same checks against a real agent when one is named
/// (WRENN_AGENT_ADDR + WRENN_AGENT_TOKEN).
#[test]
fn real_agent_conforms_when_given() {
    match (
        std::env::var("WRENN_AGENT_ADDR"),
        std::env::var("WRENN_AGENT_TOKEN"),
    ) {
        (Ok(a), Ok(t)) => run(&a, &t).unwrap(),
        _ => proto::skip::note(
            "real agent conformance",
            "WRENN_AGENT_ADDR / WRENN_AGENT_TOKEN not set",
        ),
    }
}
