//! TLS cases (issue 14), each against the same work over plaintext TCP in the same run:
//! - `rpc_unary_tls`: a unary call on an established TLS connection vs plaintext TCP
//!   (interleaved), goal ≤ 1.15×;
//! - `rpc_stream_tls`: 1 GiB streamed over TLS vs the same stream over plaintext TCP,
//!   goal ≥ 0.8× throughput;
//! - `tls_handshake`: a new connection + hello + one unary call, TLS vs plaintext: the ratio
//!   and the absolute times (no goal: a handshake is paid once per pooled connection).
//!
//! The server certificate comes from `ctl::pki` (the same code as `wrenn-ctl admin tls
//! init`), made in memory for 127.0.0.1.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use proto::rpc::{CallOpts, Client, ClientConfig, Credential, Server, ServerConfig};

use crate::harness::Case;
use crate::harness::{info_line, latency_line, measure, throughput_line, Goal, Opts, Samples};
use crate::rpc::{Bench, Blob, CHUNK, ECHO, STREAM};

pub fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "rpc_unary_tls",
            run: rpc_unary_tls,
        },
        Case {
            name: "rpc_stream_tls",
            run: rpc_stream_tls,
        },
        Case {
            name: "tls_handshake",
            run: tls_handshake,
        },
    ]
}

/// Two servers on loopback TCP, one plaintext and one TLS, and a client TLS configuration.
struct Pair {
    plain: SocketAddr,
    tls: SocketAddr,
    client_tls: tls::ClientTls,
    handles: Vec<proto::rpc::ServerHandle>,
}

impl Drop for Pair {
    fn drop(&mut self) {
        for h in &self.handles {
            h.shutdown();
        }
    }
}

/// A server certificate for 127.0.0.1 from a fresh CA (`ctl::pki`, the same code as `wrenn-ctl
/// admin tls init`) and a client that trusts that CA, both with wrenn's ALPN.
pub(crate) fn tls_configs() -> Result<(tls::ServerTls, tls::ClientTls), String> {
    let (ca, _ca_key) = ctl::pki::Authority::generate().map_err(|e| e.to_string())?;
    let leaf = ca
        .issue_server(&["127.0.0.1".to_owned()], Duration::from_secs(3600))
        .map_err(|e| e.to_string())?;
    let server_tls = tls::ServerTls::from_pem(
        leaf.cert_pem.as_bytes(),
        leaf.key_pem.as_bytes(),
        &tls::ServerOptions {
            alpn: vec![tls::ALPN_WRENN.to_vec()],
            ..Default::default()
        },
    )
    .map_err(|e| e.to_string())?;
    let client_tls = tls::ClientTls::from_ca_pem(
        ca.cert_pem.as_bytes(),
        tls::ClientOptions {
            alpn: vec![tls::ALPN_WRENN.to_vec()],
            ..Default::default()
        },
    )
    .map_err(|e| e.to_string())?;
    Ok((server_tls, client_tls))
}

fn pair() -> Result<Pair, String> {
    let (server_tls, client_tls) = tls_configs()?;
    let local: SocketAddr = "127.0.0.1:0".parse().map_err(|e| format!("{e}"))?;
    let mut handles = Vec::new();
    let mut serve = |wrap: Option<proto::rpc::WrapTransport>| -> Result<SocketAddr, String> {
        let mut s = Server::new(ServerConfig::new("bench-tls"), Arc::new(Bench))
            .map_err(|e| e.to_string())?;
        let addr = match wrap {
            Some(w) => s.listen_tcp_with(local, w),
            None => s.listen_tcp(local),
        }
        .map_err(|e| e.to_string())?;
        let (h, _join) = s.spawn().map_err(|e| e.to_string())?;
        handles.push(h);
        Ok(addr)
    };
    let plain = serve(None)?;
    let tls = serve(Some(server_tls.wrap()))?;
    Ok(Pair {
        plain,
        tls,
        client_tls,
        handles,
    })
}

impl Pair {
    fn connect_plain(&self) -> Result<Client, String> {
        Client::connect_tcp(self.plain, Credential::none()).map_err(|e| e.to_string())
    }
    fn connect_tls(&self) -> Result<Client, String> {
        tls::connect(
            &self.tls.to_string(),
            &self.client_tls,
            Credential::none(),
            &ClientConfig::default(),
        )
        .map_err(|e| e.to_string())
    }
}

fn echo(c: &Client, req: &Blob) -> Result<(), String> {
    let r: Blob = c.unary(ECHO, req, None).map_err(|e| e.to_string())?;
    if r.n != req.n {
        return Err("wrong echo".into());
    }
    Ok(())
}

fn rpc_unary_tls(opts: &Opts) -> Result<(), String> {
    let iters = opts.iters(20_000, 200);
    let p = pair()?;
    let (plain, tls) = (p.connect_plain()?, p.connect_tls()?);
    let req = Blob {
        data: vec![7; 64].into(),
        n: 1,
    };
    let (base, ours) =
        crate::harness::measure_interleaved(iters, || echo(&plain, &req), || echo(&tls, &req))?;
    println!(
        "{}",
        latency_line(
            "rpc_unary_tls",
            &ours,
            "rpc_unary_plain_tcp",
            &base,
            Goal::AtMost(1.15)
        )
    );
    Ok(())
}

fn stream(c: &Client, chunks: u64) -> Result<(), String> {
    let mut s = c
        .call(
            STREAM,
            &Blob {
                data: Default::default(),
                n: chunks,
            },
            CallOpts {
                timeout: None,
                end_stream: true,
            },
        )
        .map_err(|e| e.to_string())?;
    let mut n = 0u64;
    while let Some(m) = s.recv::<Blob>().map_err(|e| e.to_string())? {
        n += m.data.len() as u64;
    }
    if n != chunks * CHUNK as u64 {
        return Err(format!("received {n} bytes"));
    }
    Ok(())
}

fn rpc_stream_tls(opts: &Opts) -> Result<(), String> {
    // 1 GiB per iteration (16 MiB under --quick).
    let chunks = ((if opts.quick { 16u64 << 20 } else { 1u64 << 30 }) / CHUNK as u64).max(1);
    let iters = opts.iters(5, 1);
    let p = pair()?;
    let (plain, tls) = (p.connect_plain()?, p.connect_tls()?);
    let (base, ours) = crate::harness::measure_interleaved(
        iters,
        || stream(&plain, chunks),
        || stream(&tls, chunks),
    )?;
    println!(
        "{}",
        throughput_line(
            "rpc_stream_tls",
            &ours,
            "rpc_stream_plain_tcp",
            &base,
            Goal::AtLeast(0.8)
        )
    );
    let mib_s =
        |s: &Samples| (chunks * CHUNK as u64) as f64 / (1 << 20) as f64 / (s.p50() as f64 / 1e9);
    println!(
        "info=rpc_stream_tls_mib_s tls={:.0} plain_tcp={:.0}",
        mib_s(&ours),
        mib_s(&base)
    );
    // Whether glibc's copy routine was tuned (docs/operations.md, "TLS": the transport no
    // longer depends on it), so runs with and without can be compared.
    println!(
        "info=rpc_stream_tls_env glibc_tunables={}",
        std::env::var("GLIBC_TUNABLES").unwrap_or_else(|_| "unset".into())
    );
    Ok(())
}

fn tls_handshake(opts: &Opts) -> Result<(), String> {
    // Within each server's accept budget per source (100/s, burst 200): every iteration
    // is a new connection from 127.0.0.1.
    let iters = opts.iters(150, 20);
    let p = pair()?;
    let req = Blob {
        data: vec![7; 64].into(),
        n: 1,
    };
    let base = measure(iters, iters / 10, || {
        let c = p.connect_plain()?;
        echo(&c, &req)?;
        c.close();
        Ok(())
    })?;
    let ours = measure(iters, iters / 10, || {
        let c = p.connect_tls()?;
        echo(&c, &req)?;
        c.close();
        Ok(())
    })?;
    let ratio = ours.p50() as f64 / base.p50().max(1) as f64;
    println!(
        "{}",
        info_line(
            "tls_handshake",
            &ours,
            &format!(
                "new_connection+hello+unary_tls_vs_plain_tcp ratio={ratio:.2} plain_p50_ns={}",
                base.p50()
            )
        )
    );
    Ok(())
}
