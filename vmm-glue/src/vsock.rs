//! The host side of Firecracker's hybrid vsock.
//!
//! Host to guest: connect to the device's Unix socket (`uds_path`), send `CONNECT <port>\n` in
//! one write, read `OK <host port>\n`; from then on the stream carries the guest connection's
//! bytes. The reply is read one byte at a time so that nothing the guest sends right after it
//! is swallowed. If nothing listens on the guest port, Firecracker closes the connection.
//!
//! Guest to host: a guest connection to host port P arrives on the Unix socket
//! `<uds_path>_P`, which the host must listen on. envd uses this for its readiness push:
//! it calls `wrenn.envd.v1.Announce/Ready` on port 49984; [`ReadinessListener`] serves it.

use std::fmt;
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use proto::gen::wrenn::envd::v1::{announce_methods, ReadyRequest, ReadyResponse};
use proto::gen::wrenn::wire::v1::Hello;
use proto::rpc::{
    Call, Client, ClientConfig, Credential, Peer, Server, ServerConfig, ServerHandle, Service,
};
use proto::Status;

use crate::limits::{UNIX_SOCKET_PATH_LEN_MAX, VSOCK_REPLY_LEN_MAX};

/// The guest port envd's API listens on.
pub const ENVD_PORT: u32 = 49983;
/// The host port envd pushes its readiness to.
pub const READINESS_PORT: u32 = 49984;

#[derive(Debug)]
pub enum VsockError {
    Connect {
        path: PathBuf,
        source: io::Error,
    },
    Write {
        port: u32,
        source: io::Error,
    },
    Read {
        port: u32,
        source: io::Error,
    },
    /// No `OK` within the deadline.
    Timeout {
        port: u32,
        timeout: Duration,
    },
    /// Firecracker closed the connection: nothing listens on the guest port (or the VM is
    /// gone).
    Refused {
        port: u32,
    },
    /// Something other than `OK <n>\n`.
    BadReply {
        port: u32,
        reply: String,
    },
    /// Listening on `<uds_path>_<port>` failed.
    Listen {
        path: PathBuf,
        source: io::Error,
    },
    /// The listener path is too long for a Unix socket.
    PathTooLong {
        path: PathBuf,
    },
    /// The RPC hello over the connected stream failed.
    Rpc(Status),
}

impl fmt::Display for VsockError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VsockError::Connect { path, .. } => {
                write!(f, "connect to vsock socket {}", path.display())
            }
            VsockError::Write { port, .. } => write!(f, "send CONNECT {port}"),
            VsockError::Read { port, .. } => write!(f, "read the reply to CONNECT {port}"),
            VsockError::Timeout { port, timeout } => {
                write!(f, "no reply to CONNECT {port} within {timeout:?}")
            }
            VsockError::Refused { port } => {
                write!(f, "guest port {port} refused the connection")
            }
            VsockError::BadReply { port, reply } => {
                write!(f, "unexpected reply to CONNECT {port}: {reply:?}")
            }
            VsockError::Listen { path, .. } => write!(f, "listen on {}", path.display()),
            VsockError::PathTooLong { path } => write!(
                f,
                "socket path {} is over {UNIX_SOCKET_PATH_LEN_MAX} bytes",
                path.display()
            ),
            VsockError::Rpc(s) => write!(f, "rpc hello over vsock: {s}"),
        }
    }
}

impl std::error::Error for VsockError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            VsockError::Connect { source, .. }
            | VsockError::Write { source, .. }
            | VsockError::Read { source, .. }
            | VsockError::Listen { source, .. } => Some(source),
            _ => None,
        }
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Parses `OK <port>\n`.
pub fn parse_reply(reply: &[u8]) -> Option<u32> {
    let s = std::str::from_utf8(reply).ok()?;
    let n = s.strip_prefix("OK ")?.strip_suffix('\n')?;
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    n.parse().ok()
}

/// Opens a connection to guest port `port` through the hybrid vsock socket at `uds_path`.
/// The returned stream is blocking, without timeouts.
pub fn connect(uds_path: &Path, port: u32, timeout: Duration) -> Result<UnixStream, VsockError> {
    let deadline = Instant::now() + timeout;
    let mut s = UnixStream::connect(uds_path).map_err(|source| VsockError::Connect {
        path: uds_path.to_owned(),
        source,
    })?;
    let line = format!("CONNECT {port}\n");
    s.set_write_timeout(Some(timeout))
        .map_err(|source| VsockError::Write { port, source })?;
    // One write: Firecracker parses the command from what one read returns.
    match s.write(line.as_bytes()) {
        Ok(n) if n == line.len() => {}
        Ok(_) => {
            return Err(VsockError::Write {
                port,
                source: io::Error::new(io::ErrorKind::WriteZero, "short write of CONNECT"),
            })
        }
        Err(e) if is_timeout(&e) => return Err(VsockError::Timeout { port, timeout }),
        Err(source) => return Err(VsockError::Write { port, source }),
    }
    let mut reply = [0u8; VSOCK_REPLY_LEN_MAX];
    let mut len = 0;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(VsockError::Timeout { port, timeout });
        }
        s.set_read_timeout(Some(left))
            .map_err(|source| VsockError::Read { port, source })?;
        match s.read(&mut reply[len..len + 1]) {
            Ok(0) if len == 0 => return Err(VsockError::Refused { port }),
            Ok(0) => {
                return Err(VsockError::BadReply {
                    port,
                    reply: String::from_utf8_lossy(&reply[..len]).into_owned(),
                })
            }
            Ok(_) => {
                len += 1;
                if reply[len - 1] == b'\n' {
                    break;
                }
                if len == reply.len() {
                    return Err(VsockError::BadReply {
                        port,
                        reply: String::from_utf8_lossy(&reply[..len]).into_owned(),
                    });
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if is_timeout(&e) => return Err(VsockError::Timeout { port, timeout }),
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                return Err(VsockError::Refused { port })
            }
            Err(source) => return Err(VsockError::Read { port, source }),
        }
    }
    if parse_reply(&reply[..len]).is_none() {
        return Err(VsockError::BadReply {
            port,
            reply: String::from_utf8_lossy(&reply[..len]).into_owned(),
        });
    }
    s.set_read_timeout(None)
        .and_then(|()| s.set_write_timeout(None))
        .map_err(|source| VsockError::Read { port, source })?;
    Ok(s)
}

/// Connects to guest port `port` and opens an RPC client over it (hello included); `timeout`
/// bounds the CONNECT handshake and, again, the hello.
pub fn connect_rpc(
    uds_path: &Path,
    port: u32,
    cred: Credential,
    timeout: Duration,
) -> Result<Client, VsockError> {
    let s = connect(uds_path, port, timeout)?;
    // A guest answers the hello slower than a network peer (a starved vCPU on a busy host):
    // the caller's timeout bounds it, not the network default.
    let cfg = ClientConfig {
        name: "wrenn-agent".to_owned(),
        hello_timeout: timeout,
        ..ClientConfig::default()
    };
    let io = proto::rpc::SocketTransport::hybrid_vsock(OwnedFd::from(s), port);
    Client::from_transport(Box::new(io), cred, &cfg).map_err(VsockError::Rpc)
}

/// The Unix socket where guest connections to host port `port` arrive.
pub fn listener_path(uds_path: &Path, port: u32) -> PathBuf {
    let mut s = uds_path.as_os_str().to_owned();
    s.push(format!("_{port}"));
    PathBuf::from(s)
}

/// Listens for guest connections to host port `port` (a stale socket file is replaced).
pub fn listen(uds_path: &Path, port: u32) -> Result<UnixListener, VsockError> {
    let path = listener_path(uds_path, port);
    if path.as_os_str().len() > UNIX_SOCKET_PATH_LEN_MAX {
        return Err(VsockError::PathTooLong { path });
    }
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => return Err(VsockError::Listen { path, source }),
    }
    UnixListener::bind(&path).map_err(|source| VsockError::Listen { path, source })
}

struct Readiness {
    on_ready: Box<dyn Fn(ReadyRequest) + Send + Sync>,
}

impl Service for Readiness {
    fn hello(&self, _hello: &Hello) -> Result<Peer, Status> {
        // The socket belongs to one sandbox's Firecracker: reaching it identifies the caller,
        // so envd connects without a credential.
        Ok(Arc::new(()))
    }

    fn call(&self, call: Call) {
        if call.method() != announce_methods::READY {
            let m = call.method().to_owned();
            call.fail(Status::unimplemented(format!("no method {m} here")));
            return;
        }
        match call.decode::<ReadyRequest>() {
            Ok(req) => {
                (self.on_ready)(req);
                call.reply(&ReadyResponse {});
            }
            Err(s) => call.fail(s),
        }
    }
}

/// Serves `Announce/Ready` on `<uds_path>_49984` for one sandbox. Stops on drop.
pub struct ReadinessListener {
    path: PathBuf,
    handle: ServerHandle,
    join: Option<JoinHandle<io::Result<()>>>,
}

impl fmt::Debug for ReadinessListener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReadinessListener")
            .field("path", &self.path)
            .finish()
    }
}

impl ReadinessListener {
    /// Starts listening; `on_ready` runs on the server's event loop for every Ready call and
    /// must not block (send on a channel, set a flag).
    pub fn start(
        uds_path: &Path,
        on_ready: impl Fn(ReadyRequest) + Send + Sync + 'static,
    ) -> Result<ReadinessListener, VsockError> {
        let listener = listen(uds_path, READINESS_PORT)?;
        let path = listener_path(uds_path, READINESS_PORT);
        let listen_err = |source| VsockError::Listen {
            path: path.clone(),
            source,
        };
        let mut cfg = ServerConfig::new("readiness");
        // One guest, one connection at a time; a few spare for reconnects.
        cfg.connections_max = 4;
        cfg.workers_max = 1;
        let svc = Readiness {
            on_ready: Box::new(on_ready),
        };
        let mut server = Server::new(cfg, Arc::new(svc)).map_err(listen_err)?;
        server
            .listen_fd(OwnedFd::from(listener))
            .map_err(listen_err)?;
        let (handle, join) = server.spawn().map_err(listen_err)?;
        Ok(ReadinessListener {
            path,
            handle,
            join: Some(join),
        })
    }

    /// Starts listening and delivers each Ready on the returned channel.
    pub fn with_channel(
        uds_path: &Path,
    ) -> Result<(ReadinessListener, mpsc::Receiver<ReadyRequest>), VsockError> {
        let (tx, rx) = mpsc::channel();
        let tx = std::sync::Mutex::new(tx);
        let l = ReadinessListener::start(uds_path, move |req| {
            // A receiver that is gone means nobody waits any more: dropping is right.
            let _ = tx.lock().unwrap_or_else(|e| e.into_inner()).send(req);
        })?;
        Ok((l, rx))
    }

    /// The socket path guest connections arrive on.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops the server and removes the socket file.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if let Some(j) = self.join.take() {
            self.handle.shutdown();
            let _ = j.join();
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl Drop for ReadinessListener {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Fuzz target body (`fuzz/fuzz_targets/vsock_reply.rs`): the reply to `CONNECT`.
pub fn fuzz_reply(data: &[u8]) {
    if parse_reply(data).is_some() {
        assert!(data.starts_with(b"OK ") && data.ends_with(b"\n"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies() {
        assert_eq!(parse_reply(b"OK 1073741824\n"), Some(1_073_741_824));
        assert_eq!(parse_reply(b"OK 5\n"), Some(5));
        for bad in [
            &b"OK\n"[..],
            b"OK 5",
            b"ok 5\n",
            b"OK -1\n",
            b"OK 99999999999\n",
            b"OK 5 \n",
            b"KO 5\n",
        ] {
            assert_eq!(parse_reply(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn listener_paths() {
        assert_eq!(
            listener_path(Path::new("/s/v.sock"), 49984),
            PathBuf::from("/s/v.sock_49984")
        );
        let long = PathBuf::from(format!("/{}", "x".repeat(101)));
        assert!(matches!(
            listen(&long, 49984),
            Err(VsockError::PathTooLong { .. })
        ));
    }
}
