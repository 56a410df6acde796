//! `Ports.Connect`: raw TCP between ctl and a port of a running sandbox's guest, the agent's
//! half of port exposure (ctl's HTTP proxy and `wrenn port forward` sit on top of it).
//!
//! One call is one TCP connection to the guest's address in its slot (the guest alias, from
//! the host: the slot's rules let the host open connections into the guest, and the sandbox's
//! egress policy does not apply to its answers). The call's worker moves ctl's messages to the
//! socket; a thread of its own moves the guest's bytes to ctl through a [`ServerSender`].
//! Both directions block under back-pressure (a full socket, an exhausted RPC window), so the
//! agent holds at most one chunk per direction per call.
//!
//! Budgets: [`PORT_STREAMS_MAX`] calls on the agent, [`PORT_STREAMS_PER_SANDBOX_MAX`] per
//! sandbox (RESOURCE_EXHAUSTED beyond), a connect timeout, envd's port refused.
//!
//! It is not an HTTP proxy: it moves bytes, nothing else.

use std::collections::HashMap;
use std::io::Write;
use std::net::{Shutdown, TcpStream};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use proto::gen::wrenn::agent::v1 as pb;
use proto::id::Uuid;
use proto::rpc::{ServerSender, ServerStream};
use proto::Status;

use crate::limits::{
    CANCEL_POLL, PORT_CHUNK_LEN, PORT_CONNECT_TIMEOUT, PORT_STREAMS_MAX,
    PORT_STREAMS_PER_SANDBOX_MAX,
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
pub struct PortPermit<'a> {
    budget: &'a PortBudget,
    id: Uuid,
}

impl PortBudget {
    /// Takes a place for a stream to sandbox `id`, or RESOURCE_EXHAUSTED naming the budget.
    pub fn take(&self, id: Uuid) -> Result<PortPermit<'_>, Status> {
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
        Ok(PortPermit { budget: self, id })
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

impl Drop for PortPermit<'_> {
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

/// Serves one `Ports.Connect` call whose first message is `first`.
pub fn connect(
    m: &Manager,
    budget: &PortBudget,
    first: pb::PortConnectRequest,
    s: &mut ServerStream,
) -> Result<(), Status> {
    let Some(Up::Open(open)) = first.kind else {
        return Err(Status::invalid_argument(
            "Ports.Connect: the first message must be `open`",
        ));
    };
    let id = crate::manager::parse_id(proto::id::Kind::Sandbox, &open.sandbox_id)?;
    let target = m.port_target(id, open.port)?;
    let _permit = budget.take(id)?;
    let sock = TcpStream::connect_timeout(&target.into(), PORT_CONNECT_TIMEOUT).map_err(|e| {
        Status::unavailable(format!("connect to port {} of the sandbox: {e}", open.port))
    })?;
    let _ = sock.set_nodelay(true);
    crate::metrics::PORT_STREAMS.inc();
    s.send(&pb::PortConnectResponse {
        kind: Some(Down::Opened(true)),
    })?;
    let reader_sock = sock
        .try_clone()
        .map_err(|e| Status::internal(format!("clone socket: {e}")))?;
    let guest_closed = Arc::new(AtomicBool::new(false));
    let closed = guest_closed.clone();
    let sender = s.sender();
    // Dropped by the reader when it ends: wakes a worker waiting for the guest's close.
    let (ended_tx, ended) = std::sync::mpsc::channel::<()>();
    let reader = std::thread::Builder::new()
        .name("wrenn-port".to_owned())
        .spawn(move || {
            let r = guest_to_ctl(reader_sock, &sender, &closed);
            // The worker waits for ctl's next message or this: wake it now, not at its
            // next poll (the call, and with it the proxied answer, ends at once).
            sender.wake();
            drop(ended_tx);
            r
        })
        .map_err(|e| Status::resource_exhausted(format!("start port reader: {e}")))?;
    let up = ctl_to_guest(&sock, s, &guest_closed, &ended);
    // Whatever ended the call, the reader must end too.
    let _ = sock.shutdown(Shutdown::Both);
    let down = reader
        .join()
        .unwrap_or_else(|_| Err(Status::internal("port reader panicked")));
    up.and(down)
}

/// Moves the guest's bytes to ctl until the guest closes (Ok) or either side fails.
fn guest_to_ctl(sock: TcpStream, sender: &ServerSender, closed: &AtomicBool) -> Result<(), Status> {
    let mut buf = BytesMut::new();
    let r = loop {
        // Read straight into the message's own buffer; it goes to the socket from there
        // (writev), so the agent copies nothing in user space.
        match proto::rpc::recv_payload(sock.as_fd(), &mut buf, PORT_CHUNK_LEN) {
            Ok(None) => break Ok(()),
            Ok(Some(data)) => {
                let empty = pb::PortConnectResponse { kind: None };
                if let Err(e) = sender.send_payload(&empty, DATA_TAG, data) {
                    break Err(e);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            // Our own shutdown after ctl's side ended, or the guest reset the connection.
            Err(_) => break Ok(()),
        }
    };
    closed.store(true, Ordering::Release);
    r
}

/// Moves ctl's bytes to the guest until the guest closes, ctl cancels, or ctl ends its side
/// (then the socket is half-closed and this waits for the guest to close).
fn ctl_to_guest(
    mut sock: &TcpStream,
    s: &mut ServerStream,
    guest_closed: &AtomicBool,
    reader_ended: &std::sync::mpsc::Receiver<()>,
) -> Result<(), Status> {
    let mut ctl_open = true;
    while !guest_closed.load(Ordering::Acquire) {
        if s.is_cancelled() {
            return Err(Status::cancelled("Ports.Connect cancelled"));
        }
        if !ctl_open {
            // Returns at once when the reader ends (its sender is dropped).
            let _ = reader_ended.recv_timeout(CANCEL_POLL);
            continue;
        }
        let stop = || guest_closed.load(Ordering::Acquire);
        let msg = match s.recv_timeout_or(CANCEL_POLL, &stop)? {
            Err(()) => continue,
            Ok(None) => {
                ctl_open = false;
                let _ = sock.shutdown(Shutdown::Write);
                continue;
            }
            Ok(Some(b)) => b,
        };
        let msg: pb::PortConnectRequest = prost::Message::decode(msg).map_err(|e| {
            Status::invalid_argument(format!("Ports.Connect: malformed message: {e}"))
        })?;
        match msg.kind {
            // The guest is gone; the reader sees it too.
            Some(Up::Data(d)) if sock.write_all(&d).is_err() => return Ok(()),
            Some(Up::Data(_)) => {}
            Some(Up::Open(_)) => {
                return Err(Status::invalid_argument(
                    "Ports.Connect: `open` only in the first message",
                ))
            }
            None => {}
        }
    }
    Ok(())
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
        let b = PortBudget::default();
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
