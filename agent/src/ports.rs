//! `Ports.Connect`: raw TCP between ctl and a port of a running sandbox's guest, the agent's
//! half of port exposure (ctl's HTTP proxy and `wrenn port forward` sit on top of it).
//!
//! One call is one TCP connection to the guest's address in its slot (the guest alias, from
//! the host: the slot's rules let the host open connections into the guest, and the sandbox's
//! egress policy does not apply to its answers). Two relay halves move the bytes: ctl's
//! messages to the socket ([`ToGuest`], starting on the call's worker) and the guest's bytes
//! to ctl through a [`ServerSender`] ([`ToCtl`], on a thread of the relay pool). Both block
//! under back-pressure (a full socket, an exhausted RPC window), so the agent holds at most
//! one chunk per direction per call. A half whose side brings nothing for
//! [`PORT_PARK_AFTER`] parks ([`proto::rpc::park`]): the guest side until the socket is
//! readable, ctl's side until the call has a message, its end or a cancellation. It then
//! holds no thread, and the call's worker is back in the RPC pool: an idle proxied
//! connection costs the agent its socket and its state, not threads.
//!
//! Budgets: [`PORT_STREAMS_MAX`] calls on the agent, [`PORT_STREAMS_PER_SANDBOX_MAX`] per
//! sandbox (RESOURCE_EXHAUSTED beyond), a connect timeout, envd's port refused.
//!
//! It is not an HTTP proxy: it moves bytes, nothing else.

use std::collections::HashMap;
use std::io::Write;
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use proto::gen::wrenn::agent::v1 as pb;
use proto::id::Uuid;
use proto::pool::Pool;
use proto::rpc::park::Parking;
use proto::rpc::{ServerSender, ServerStream};
use proto::Status;

use crate::limits::{
    PORT_CHUNK_LEN, PORT_CONNECT_TIMEOUT, PORT_PARK_AFTER, PORT_PARK_RECHECK,
    PORT_RELAY_THREAD_IDLE, PORT_STREAMS_MAX, PORT_STREAMS_PER_SANDBOX_MAX,
};
use crate::manager::Manager;

use proto::rpc::BytesMut;

use pb::port_connect_request::Kind as Up;
use pb::port_connect_response::Kind as Down;

/// Open port streams, in all and per sandbox.
#[derive(Debug, Default)]
pub struct PortBudget {
    open: Mutex<HashMap<Uuid, usize>>,
}

/// One open stream's place in the budget; given back when dropped.
pub struct PortPermit {
    budget: Arc<PortBudget>,
    id: Uuid,
}

impl PortBudget {
    /// Takes a place for a stream to sandbox `id`, or RESOURCE_EXHAUSTED naming the budget.
    pub fn take(self: &Arc<Self>, id: Uuid) -> Result<PortPermit, Status> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let total: usize = open.values().sum();
        if total >= PORT_STREAMS_MAX {
            return Err(Status::resource_exhausted(format!(
                "{PORT_STREAMS_MAX} port streams open on this host"
            )));
        }
        let n = open.entry(id).or_insert(0);
        if *n >= PORT_STREAMS_PER_SANDBOX_MAX {
            return Err(Status::resource_exhausted(format!(
                "{PORT_STREAMS_PER_SANDBOX_MAX} port streams open to this sandbox"
            )));
        }
        *n += 1;
        Ok(PortPermit {
            budget: self.clone(),
            id,
        })
    }

    /// Streams open now (for tests and metrics).
    pub fn open(&self) -> usize {
        self.open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .sum()
    }
}

impl Drop for PortPermit {
    fn drop(&mut self) {
        let mut open = self.budget.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.id) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.id);
            }
        }
    }
}

/// The field number of `PortConnectResponse.data` (agent.proto), written around a payload
/// sent without copying.
const DATA_TAG: u32 = 2;

/// What the agent's port streams share: their budget, the pool their relay halves run on
/// and the place they park while idle.
pub struct PortRelays {
    budget: Arc<PortBudget>,
    pool: Arc<Pool>,
    park: Arc<Parking>,
}

impl PortRelays {
    pub fn new() -> std::io::Result<PortRelays> {
        // Two halves per stream at most run at once; the call's worker carries one of them
        // until it first parks.
        let pool = Pool::new(
            "wrenn-port",
            2 * PORT_STREAMS_MAX,
            0,
            PORT_RELAY_THREAD_IDLE,
        );
        let park = Parking::start(
            "wrenn-port-park",
            pool.clone(),
            &crate::metrics::PORT_RELAYS,
        )?;
        Ok(PortRelays {
            budget: Arc::new(PortBudget::default()),
            pool,
            park,
        })
    }

    /// Relay halves on a thread now, and parked (no thread).
    pub fn halves(&self) -> (usize, usize) {
        (self.park.running_now(), self.park.parked_now())
    }
}

/// Serves one `Ports.Connect` call (its first message is `open`): connects to the guest's
/// port, answers `opened`, then relays until either side ends. Owns the call: its worker
/// returns as soon as ctl's side goes quiet.
pub fn serve(m: &Manager, relays: &PortRelays, s: ServerStream) {
    let opened = s
        .first::<pb::PortConnectRequest>()
        .and_then(|first| open(m, relays, first, &s));
    let (sock, permit) = match opened {
        Ok(x) => x,
        Err(e) => return s.finish(Err(e)),
    };
    let link = Arc::new(Link {
        sender: s.sender(),
        sock,
        park: relays.park.clone(),
        guest_closed: AtomicBool::new(false),
        to_guest_parked: Mutex::new(None),
        stream: Mutex::new(None),
        result: Mutex::new(Ok(())),
        _permit: permit,
    });
    let to_ctl = ToCtl {
        link: link.clone(),
        buf: BytesMut::new(),
    };
    if relays.pool.spawn(Box::new(move || to_ctl.run())).is_err() {
        link.fail(Status::resource_exhausted("no thread for the guest's side"));
        link.sock_shutdown();
        *link.stream.lock().unwrap_or_else(|e| e.into_inner()) = Some(s);
        return;
    }
    ToGuest {
        link,
        s,
        ctl_open: true,
    }
    .run();
}

/// Checks the open and connects: the socket and the stream's budget place.
fn open(
    m: &Manager,
    relays: &PortRelays,
    first: pb::PortConnectRequest,
    s: &ServerStream,
) -> Result<(TcpStream, PortPermit), Status> {
    let Some(Up::Open(open)) = first.kind else {
        return Err(Status::invalid_argument(
            "Ports.Connect: the first message must be `open`",
        ));
    };
    let id = crate::manager::parse_id(proto::id::Kind::Sandbox, &open.sandbox_id)?;
    let target = m.port_target(id, open.port)?;
    let permit = relays.budget.take(id)?;
    let sock = TcpStream::connect_timeout(&target.into(), PORT_CONNECT_TIMEOUT).map_err(|e| {
        Status::unavailable(format!("connect to port {} of the sandbox: {e}", open.port))
    })?;
    let _ = sock.set_nodelay(true);
    // A read that waits this long gives the guest side's thread back (it parks).
    sock.set_read_timeout(Some(PORT_PARK_AFTER))
        .map_err(|e| Status::internal(format!("socket timeout: {e}")))?;
    crate::metrics::PORT_STREAMS.inc();
    s.sender().send(&pb::PortConnectResponse {
        kind: Some(Down::Opened(true)),
    })?;
    Ok((sock, permit))
}

/// One call's shared state. Dropped with its last half: the socket is closed, the call
/// ends (END, or the first error either half met) and its budget place is given back.
struct Link {
    sender: ServerSender,
    sock: TcpStream,
    park: Arc<Parking>,
    /// The guest closed its side (or failed): ctl's side stops.
    guest_closed: AtomicBool,
    /// ctl's side's parking token while it waits for the call (to wake it when the guest
    /// closes).
    to_guest_parked: Mutex<Option<usize>>,
    /// The call, once ctl's side is done with it; finished when the link drops.
    stream: Mutex<Option<ServerStream>>,
    result: Mutex<Result<(), Status>>,
    _permit: PortPermit,
}

impl Link {
    fn fail(&self, e: Status) {
        let mut r = self.result.lock().unwrap_or_else(|e| e.into_inner());
        if r.is_ok() {
            *r = Err(e);
        }
    }

    fn sock_shutdown(&self) {
        let _ = self.sock.shutdown(Shutdown::Both);
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.sock_shutdown();
        let r = std::mem::replace(
            self.result.get_mut().unwrap_or_else(|e| e.into_inner()),
            Ok(()),
        );
        if let Some(s) = self
            .stream
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            s.finish(r);
        }
    }
}

/// ctl → guest: the call's messages written to the socket.
struct ToGuest {
    link: Arc<Link>,
    s: ServerStream,
    /// ctl has not ended its side.
    ctl_open: bool,
}

impl ToGuest {
    fn run(mut self) {
        let park = self.link.park.clone();
        let _running = park.running();
        // Resumed for the guest's close rather than by the call: take the wake back.
        self.s.unpark();
        *self
            .link
            .to_guest_parked
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = None;
        let link = self.link.clone();
        let stop = || link.guest_closed.load(Ordering::Acquire);
        loop {
            if !self.ctl_open || stop() {
                break;
            }
            if self.s.is_cancelled() {
                link.fail(Status::cancelled("Ports.Connect cancelled"));
                // The guest side's read ends with the socket.
                link.sock_shutdown();
                break;
            }
            let msg = match self.s.recv_timeout_or(PORT_PARK_AFTER, &stop) {
                Err(e) => {
                    link.fail(e);
                    link.sock_shutdown();
                    break;
                }
                Ok(Err(())) if stop() => break,
                Ok(Err(())) => match self.park() {
                    Ok(()) => return,
                    Err(back) => {
                        self = back;
                        continue;
                    }
                },
                Ok(Ok(None)) => {
                    // ctl's end: the guest reads EOF; the call ends when the guest closes.
                    self.ctl_open = false;
                    let _ = link.sock.shutdown(Shutdown::Write);
                    break;
                }
                Ok(Ok(Some(b))) => b,
            };
            let msg: pb::PortConnectRequest = match prost::Message::decode(msg) {
                Ok(m) => m,
                Err(e) => {
                    link.fail(Status::invalid_argument(format!(
                        "Ports.Connect: malformed message: {e}"
                    )));
                    link.sock_shutdown();
                    break;
                }
            };
            match msg.kind {
                // The guest is gone; its side sees it too.
                Some(Up::Data(d)) if (&link.sock).write_all(&d).is_err() => break,
                Some(Up::Data(_)) => {}
                Some(Up::Open(_)) => {
                    link.fail(Status::invalid_argument(
                        "Ports.Connect: `open` only in the first message",
                    ));
                    link.sock_shutdown();
                    break;
                }
                None => {}
            }
        }
        // Done with the call: it ends when the guest side is done too.
        *self.link.stream.lock().unwrap_or_else(|e| e.into_inner()) = Some(self.s);
    }

    /// Waits off-thread for the call's next message (or end, or cancellation), or for the
    /// guest's close; `Err` (itself back) when something is there now or it cannot park.
    fn park(self) -> Result<(), ToGuest> {
        let link = self.link.clone();
        let token = link
            .park
            .park_woken(self, |h, w| h.s.park(w), ToGuest::run)?;
        let g = link.to_guest_parked.lock();
        let mut g = g.unwrap_or_else(|e| e.into_inner());
        *g = Some(token);
        if link.guest_closed.load(Ordering::Acquire) {
            link.park.hurry(token, Instant::now());
        }
        Ok(())
    }
}

/// guest → ctl: the socket's bytes sent as messages of the call.
struct ToCtl {
    link: Arc<Link>,
    buf: BytesMut,
}

impl ToCtl {
    fn run(mut self) {
        let park = self.link.park.clone();
        let _running = park.running();
        loop {
            // Read straight into the message's own buffer; it goes to the socket from there
            // (writev), so the agent copies nothing in user space.
            match proto::rpc::recv_payload(self.link.sock.as_fd(), &mut self.buf, PORT_CHUNK_LEN) {
                Ok(None) => break,
                Ok(Some(data)) => {
                    let empty = pb::PortConnectResponse { kind: None };
                    if let Err(e) = self.link.sender.send_payload(&empty, DATA_TAG, data) {
                        self.link.fail(e);
                        break;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    // Quiet: wait off-thread until the socket is readable (or closed).
                    let fd = self.link.sock.as_raw_fd();
                    let deadline = Instant::now() + PORT_PARK_RECHECK;
                    match park.park_readable(fd, deadline, self, ToCtl::run) {
                        Ok(_) => return,
                        Err(back) => self = back,
                    }
                }
                // Our own shutdown after ctl's side ended, or the guest reset the connection.
                Err(_) => break,
            }
        }
        // The guest is done: ctl's side stops too, woken now if it waits.
        let link = self.link.clone();
        link.guest_closed.store(true, Ordering::Release);
        link.sender.wake();
        let parked = *link
            .to_guest_parked
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(t) = parked {
            link.park.hurry(t, Instant::now());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_encoding_is_the_data_field() {
        let data = proto::rpc::Bytes::from_static(b"bytes from the guest");
        let mut sent = proto::rpc::payload_prefix(
            &pb::PortConnectResponse { kind: None },
            DATA_TAG,
            data.len(),
        );
        sent.extend_from_slice(&data);
        let m: pb::PortConnectResponse = prost::Message::decode(&sent[..]).unwrap();
        assert_eq!(m.kind, Some(Down::Data(data)));
    }

    #[test]
    fn budgets() {
        let b = Arc::new(PortBudget::default());
        let a = Uuid::from_u128(1);
        let held: Vec<_> = (0..PORT_STREAMS_PER_SANDBOX_MAX)
            .map(|_| b.take(a).unwrap())
            .collect();
        assert_eq!(
            b.take(a).err().unwrap().code,
            proto::Code::ResourceExhausted
        );
        let mut others = Vec::new();
        let mut n = 2u128;
        while b.open() < PORT_STREAMS_MAX {
            match b.take(Uuid::from_u128(n)) {
                Ok(p) => others.push(p),
                Err(_) => n += 1,
            }
        }
        assert!(b.take(Uuid::from_u128(999)).is_err(), "host budget");
        drop(held);
        assert!(b.take(a).is_ok());
        drop(others);
        assert_eq!(b.open(), 0);
    }
}
