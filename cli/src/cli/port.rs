//! `wrenn port forward SB LOCAL:REMOTE`: a local TCP listener whose every connection is one
//! `Ports.Connect` call to port REMOTE of the sandbox, for databases and anything not HTTP.
//!
//! Each accepted connection gets two threads: one reads the local socket and sends `data`
//! (its EOF half-closes the call), the other receives and writes to the local socket. Both
//! block under back-pressure. At most [`FORWARD_CONNECTIONS_MAX`] connections at once (ctl
//! allows 16 per sandbox); more wait in the listen backlog.

#![forbid(unsafe_code)]

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use proto::gen::wrenn::ctl::v1 as pb;
use proto::rpc::{CallOpts, Client};
use proto::Status;

use super::args::Parsed;
use super::{CliError, Ctx};

/// Connections forwarded at once (ctl's per-sandbox budget).
pub const FORWARD_CONNECTIONS_MAX: usize = 16;
/// Bytes read from the local socket per message.
const CHUNK_LEN: usize = 64 * 1024;

/// `LOCAL:REMOTE` (local port 0: any free port, printed).
fn mapping(s: &str) -> Result<(u16, u32), CliError> {
    let bad = || CliError::Usage(format!("{s:?}: expected LOCAL_PORT:SANDBOX_PORT"));
    let (l, r) = s.split_once(':').ok_or_else(bad)?;
    let l: u16 = l.parse().map_err(|_| bad())?;
    let r: u16 = r.parse().map_err(|_| bad())?;
    if r == 0 {
        return Err(bad());
    }
    Ok((l, u32::from(r)))
}

pub fn forward(ctx: &Ctx, p: &Parsed) -> Result<u8, CliError> {
    let sandbox = p.arg(0).unwrap_or("").to_owned();
    let (local, remote) = mapping(p.arg(1).unwrap_or(""))?;
    let stop_after: Option<usize> = p.num("connections")?;
    let listener = TcpListener::bind(("127.0.0.1", local)).map_err(|source| CliError::Io {
        action: format!("listen on 127.0.0.1:{local}"),
        source,
    })?;
    let addr = listener.local_addr().map_err(|source| CliError::Io {
        action: "read the listening address".into(),
        source,
    })?;
    println!("forwarding {addr} -> {sandbox}:{remote}");
    let _ = std::io::stdout().flush();
    let open = Arc::new(AtomicUsize::new(0));
    let mut served = 0usize;
    let mut threads = Vec::new();
    for conn in listener.incoming() {
        let conn = match conn {
            Ok(c) => c,
            Err(e) => {
                eprintln!("accept failed: {e}");
                continue;
            }
        };
        while open.load(Ordering::Acquire) >= FORWARD_CONNECTIONS_MAX {
            std::thread::sleep(Duration::from_millis(20));
        }
        open.fetch_add(1, Ordering::AcqRel);
        let (client, sandbox, open) = (ctx.client.clone(), sandbox.clone(), open.clone());
        threads.push(std::thread::spawn(move || {
            if let Err(e) = one(&client, &sandbox, remote, conn) {
                eprintln!(
                    "connection to {sandbox}:{remote} failed: {}: {}",
                    e.code, e.message
                );
            }
            open.fetch_sub(1, Ordering::AcqRel);
        }));
        served += 1;
        if stop_after.is_some_and(|n| served >= n) {
            break;
        }
        threads.retain(|t| !t.is_finished());
    }
    for t in threads {
        let _ = t.join();
    }
    Ok(0)
}

/// One local connection, relayed until both sides are done.
fn one(client: &Client, sandbox: &str, port: u32, conn: TcpStream) -> Result<(), Status> {
    use pb::port_connect_request::Kind as Up;
    use pb::port_connect_response::Kind as Down;
    let mut s = client.call(
        pb::ports_methods::CONNECT,
        &pb::PortConnectRequest {
            kind: Some(Up::Open(pb::PortOpen {
                sandbox_id: sandbox.to_owned(),
                port,
            })),
        },
        CallOpts {
            timeout: None,
            end_stream: false,
        },
    )?;
    match s.recv::<pb::PortConnectResponse>()?.and_then(|m| m.kind) {
        Some(Down::Opened(true)) => {}
        _ => return Err(Status::internal("ctl did not open the port")),
    }
    let _ = conn.set_nodelay(true);
    let (tx, rx) = s.split();
    let mut reader = conn
        .try_clone()
        .map_err(|e| Status::internal(format!("clone socket: {e}")))?;
    let up = std::thread::spawn(move || -> Result<(), Status> {
        let mut buf = vec![0u8; CHUNK_LEN];
        loop {
            match reader.read(&mut buf) {
                Ok(0) | Err(_) => return tx.close_send(),
                Ok(n) => tx.send(&pb::PortConnectRequest {
                    kind: Some(Up::Data(buf[..n].to_vec().into())),
                })?,
            }
        }
    });
    let mut writer = &conn;
    let down = (|| -> Result<(), Status> {
        while let Some(m) = rx.recv::<pb::PortConnectResponse>()? {
            if let Some(Down::Data(d)) = m.kind {
                if writer.write_all(&d).is_err() {
                    break;
                }
            }
        }
        Ok(())
    })();
    // The sandbox closed (or failed): so does the local connection, which ends the reader.
    let _ = conn.shutdown(Shutdown::Both);
    let up = up
        .join()
        .unwrap_or_else(|_| Err(Status::internal("reader panicked")));
    down.and(up.or(Ok(())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mappings() {
        assert_eq!(mapping("5432:5432").unwrap(), (5432, 5432));
        assert_eq!(mapping("0:80").unwrap(), (0, 80));
        for bad in ["", "80", "80:0", "a:80", "80:70000", ":80"] {
            assert!(mapping(bad).is_err(), "{bad}");
        }
    }
}
