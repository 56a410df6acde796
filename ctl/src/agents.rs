//! Clients of the hosts' agents (`wrenn.agent.v1`), presenting the per-host agent token: one
//! connection per host for lifecycle, process and file calls, and a second one per host for
//! port traffic (`Ports.Connect`), so bulk or long-lived port streams never share a
//! connection's windows and budgets with create/pause/destroy. A connection that died is
//! replaced on the next call.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prost::Message;
use proto::id::Uuid;
use proto::rpc::{CallOpts, Client, ClientStream, Credential};
use proto::Status;

use crate::db::{pg_err, Db};
use crate::limits::CTL_CLIENT_CERT_LIFETIME;
use crate::metrics;
use crate::pki::Authority;

/// Pool of agent clients keyed by host.
pub struct Agents {
    db: Db,
    call_timeout: Duration,
    clients: Mutex<HashMap<Uuid, (String, Client)>>,
    /// Port traffic's own connections.
    proxy_clients: Mutex<HashMap<Uuid, (String, Client)>>,
    /// The CA that issued the hosts' certificates: agents with one are called over mutual
    /// TLS with a client certificate this replica issues itself.
    issuer: Option<Arc<Authority>>,
    client_tls: Mutex<Option<(Instant, tls::ClientTls)>>,
    /// A host whose certificate was revoked is not called (and its connections are
    /// closed by [`Agents::forget`] when the revocation is heard).
    revocations: crate::revocation::Revocations,
}

impl Agents {
    pub fn new(
        db: Db,
        call_timeout: Duration,
        issuer: Option<Arc<Authority>>,
        revocations: crate::revocation::Revocations,
    ) -> Agents {
        Agents {
            revocations,
            db,
            call_timeout,
            clients: Mutex::new(HashMap::new()),
            proxy_clients: Mutex::new(HashMap::new()),
            issuer,
            client_tls: Mutex::new(None),
        }
    }

    /// ctl's client TLS for agents, renewed when half its certificate's life has passed.
    fn client_tls(&self) -> Result<Option<tls::ClientTls>, Status> {
        let Some(ca) = &self.issuer else {
            return Ok(None);
        };
        let mut g = self.client_tls.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((made, t)) = &*g {
            if made.elapsed() < CTL_CLIENT_CERT_LIFETIME / 2 {
                return Ok(Some(t.clone()));
            }
        }
        let t = ca
            .agent_client()
            .map_err(|e| Status::internal(format!("ctl's client certificate: {e}")))?;
        *g = Some((Instant::now(), t.clone()));
        Ok(Some(t))
    }

    /// A connected client for `host` (address and agent token read from the database).
    pub fn client(&self, host: Uuid) -> Result<Client, Status> {
        self.pooled(&self.clients, host)
    }

    /// A connected client for `host` that carries port traffic only.
    pub fn proxy_client(&self, host: Uuid) -> Result<Client, Status> {
        self.pooled(&self.proxy_clients, host)
    }

    fn pooled(
        &self,
        pool: &Mutex<HashMap<Uuid, (String, Client)>>,
        host: Uuid,
    ) -> Result<Client, Status> {
        {
            let g = pool.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((_, c)) = g.get(&host) {
                if !c.is_closed() {
                    return Ok(c.clone());
                }
            }
        }
        let row = self.db.run(move |c| {
            c.query_opt(
                "SELECT address, agent_token, cert_serial FROM hosts WHERE id = $1",
                &[&host],
            )
            .map_err(pg_err)
        })?;
        let Some(row) = row else {
            return Err(Status::not_found("host not found"));
        };
        let addr: String = row.get(0);
        let token: String = row.get(1);
        let serial: Option<Vec<u8>> = row.get(2);
        if let Some(s) = &serial {
            let revoked = match self.revocations.cert_revoked(s) {
                Some(r) => r,
                None => crate::revocation::cert_revoked_in_db(&self.db, s)?,
            };
            if revoked {
                return Err(Status::failed_precondition(
                    "this host's certificate was revoked: it is not called",
                ));
            }
        }
        let cred = Credential::agent_token(token);
        let client = if serial.is_some() {
            // Mutual TLS: the agent's certificate must name this host id, whatever address
            // it is reached at; ctl presents its own client certificate.
            let Some(t) = self.client_tls()? else {
                return Err(Status::failed_precondition(
                    "this host has a certificate but this ctl replica has no CA \
                     (--tls-ca-cert/--tls-ca-key) to call it with",
                ));
            };
            let t = t.with_server_name(proto::id::format(proto::id::Kind::Host, host));
            tls::connect(&addr, &t, cred, &proto::rpc::ClientConfig::default())
        } else {
            // A host registered without a certificate (an older agent, or ctl without a
            // CA): agent token only, in plaintext.
            Client::connect_tcp(addr.as_str(), cred)
        }
        .map_err(|e| Status::unavailable(format!("connect to agent at {addr}: {}", e.message)))?;
        let mut g = pool.lock().unwrap_or_else(|e| e.into_inner());
        g.insert(host, (addr, client.clone()));
        Ok(client)
    }

    /// Drops the cached connection of `host` (after its token or address changed).
    pub fn forget(&self, host: Uuid) {
        for pool in [&self.clients, &self.proxy_clients] {
            if let Some((_, c)) = pool.lock().unwrap_or_else(|e| e.into_inner()).remove(&host) {
                c.close();
            }
        }
    }

    /// One unary call with the default deadline.
    pub fn unary<Req: Message, Resp: Message + Default>(
        &self,
        host: Uuid,
        method: &str,
        req: &Req,
    ) -> Result<Resp, Status> {
        self.unary_timeout(host, method, req, self.call_timeout)
    }

    /// One unary call with an explicit deadline (lifecycle calls take minutes).
    pub fn unary_timeout<Req: Message, Resp: Message + Default>(
        &self,
        host: Uuid,
        method: &str,
        req: &Req,
        timeout: Duration,
    ) -> Result<Resp, Status> {
        metrics::AGENT_CALLS.inc();
        let client = self.client(host)?;
        let r = client.unary(method, req, Some(timeout));
        if r.is_err() {
            metrics::AGENT_ERRORS.inc();
        }
        r
    }

    /// Opens a streaming call.
    pub fn stream<Req: Message>(
        &self,
        host: Uuid,
        method: &str,
        req: &Req,
        end_stream: bool,
        timeout: Option<Duration>,
    ) -> Result<ClientStream, Status> {
        metrics::AGENT_CALLS.inc();
        let client = self.client(host)?;
        client
            .call(
                method,
                req,
                CallOpts {
                    timeout,
                    end_stream,
                },
            )
            .inspect_err(|_| metrics::AGENT_ERRORS.inc())
    }
}
