//! Revocation pushed to every replica, through PostgreSQL LISTEN/NOTIFY.
//!
//! Revoking an API key sends `NOTIFY wrenn_key_revoked, '<key uuid>'` in the revoking
//! transaction, so every replica hears of it at commit. Each replica LISTENs on one
//! dedicated connection, on its own thread (the postgres crate's sync client:
//! `Client::notifications()` blocks). A notification adds the key to this replica's set of
//! revoked keys (checked on every call of every open protobuf connection, a hash lookup) and
//! closes that key's open protobuf connections; HTTP requests authenticate against the
//! database on each request and check the same set.
//!
//! A call therefore never queries the database for its key while the listener is up. What
//! keeps that safe is the listener's *generation*: each connection remembers the
//! generation at which its key was last checked against the database. The generation
//! changes whenever notifications may have been missed — the listener (re)connected, or the
//! revoked set overflowed and was flushed — so every open connection re-checks its key once
//! (one indexed SELECT) before its next call. While the listener is down, every call
//! checks its key in the database: slower, never unsafe. The listener reconnects with
//! backoff and pings its connection, so a dead one is noticed within
//! [`LISTEN_PING_INTERVAL`].
//!
//! Host certificates ride the same connection on a second channel, [`CERT_CHANNEL`]:
//! deleting a host (or `admin revoke-host`) records its certificates' serials in
//! `revoked_certificates` and notifies `'<host uuid> <serial hex>…'`. Each replica loads
//! the unexpired serials every time its LISTEN connection (re)starts, after the LISTEN, so
//! none is missed; a hello presenting a revoked serial is refused from memory, and a
//! notification closes that host's open connections (host port and ctl → agent). While the
//! listener is down (or the set overflowed), hellos ask the database instead.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use postgres::fallible_iterator::FallibleIterator;
use proto::id::Uuid;
use proto::Status;

use crate::limits::{
    DB_BACKOFF_MAX, DB_BACKOFF_MIN, DB_CONNECT_TIMEOUT, LISTEN_PING_INTERVAL, REVOKED_CERTS_MAX,
    REVOKED_KEYS_MAX,
};

/// The NOTIFY channel of revoked API keys; the payload is the key's UUID (hyphenated).
pub const CHANNEL: &str = "wrenn_key_revoked";
/// The NOTIFY channel of revoked host certificates; the payload is the host's UUID
/// (hyphenated) then each revoked serial in lower-case hex, separated by spaces (none: the
/// host had no certificate, its connections close all the same).
pub const CERT_CHANNEL: &str = "wrenn_cert_revoked";

/// The NOTIFY channel of running sandboxes whose traffic row changed (migration 13's
/// trigger); the payload is the sandbox's UUID. The traffic proxy's per-replica cache of
/// those rows ([`crate::service::Api::proxy_authorize`]) drops the sandbox.
pub const TRAFFIC_CHANNEL: &str = "wrenn_sandbox_traffic";

type Hook = Box<dyn Fn(Uuid) + Send + Sync>;

/// This replica's view of revoked keys. Cheap to share (one `Arc`).
#[derive(Clone)]
pub struct Revocations {
    shared: Arc<Shared>,
}

struct Shared {
    revoked: Mutex<HashSet<Uuid>>,
    /// Changes whenever notifications may have been missed (see the module comment).
    generation: AtomicU64,
    /// Whether the LISTEN connection is up (notifications arrive).
    listening: AtomicBool,
    hooks: Mutex<Vec<Hook>>,
    /// Revoked host certificate serials, and whether the set is the whole unexpired table
    /// as of the listener's last (re)connect plus every notification since.
    certs: Mutex<(HashSet<Vec<u8>>, bool)>,
    /// Run with the host id of every revocation (closing its connections).
    host_hooks: Mutex<Vec<Hook>>,
    /// Run with the id of every sandbox whose traffic row changed.
    traffic_hooks: Mutex<Vec<Hook>>,
    stop: AtomicBool,
}

/// What an open connection remembers about its key: the generation it was last checked at.
#[derive(Debug, Default)]
pub struct KeyCheck {
    generation: AtomicU64,
}

impl KeyCheck {
    /// A check made now, at `generation` (a connection's key was just looked up).
    pub fn at(generation: u64) -> KeyCheck {
        KeyCheck {
            generation: AtomicU64::new(generation),
        }
    }
}

impl Default for Revocations {
    fn default() -> Self {
        Revocations::new()
    }
}

impl Revocations {
    /// Not listening yet: every check goes to the database until [`Self::listen`] is up.
    pub fn new() -> Revocations {
        Revocations {
            shared: Arc::new(Shared {
                revoked: Mutex::new(HashSet::new()),
                // 0 is never a listening generation: checks made before the listener
                // first connects are re-made once it has.
                generation: AtomicU64::new(0),
                listening: AtomicBool::new(false),
                hooks: Mutex::new(Vec::new()),
                certs: Mutex::new((HashSet::new(), false)),
                host_hooks: Mutex::new(Vec::new()),
                traffic_hooks: Mutex::new(Vec::new()),
                stop: AtomicBool::new(false),
            }),
        }
    }

    /// The current generation (stamp a fresh key check with it).
    pub fn generation(&self) -> u64 {
        self.shared.generation.load(Ordering::Acquire)
    }

    /// Whether notifications are being received.
    pub fn listening(&self) -> bool {
        self.shared.listening.load(Ordering::Acquire)
    }

    /// Whether this replica has heard that `key` was revoked.
    pub fn is_revoked(&self, key: Uuid) -> bool {
        self.set().contains(&key)
    }

    /// Runs `hook` with every sandbox whose traffic row changes from now on.
    pub fn on_sandbox_traffic(&self, hook: impl Fn(Uuid) + Send + Sync + 'static) {
        self.shared
            .traffic_hooks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Box::new(hook));
    }

    /// A running sandbox's traffic row changed (a notification): runs the hooks.
    pub fn sandbox_traffic_changed(&self, sandbox: Uuid) {
        for h in self
            .shared
            .traffic_hooks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            h(sandbox);
        }
    }

    /// Runs `hook` for every key revoked from now on (closing its connections).
    pub fn on_revoke(&self, hook: impl Fn(Uuid) + Send + Sync + 'static) {
        self.shared
            .hooks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Box::new(hook));
    }

    /// Records that `key` was revoked and runs the hooks (a notification, or the revoking
    /// call itself on this replica, which need not wait for its own notification).
    pub fn revoked(&self, key: Uuid) {
        {
            let mut set = self.set();
            if set.len() >= REVOKED_KEYS_MAX {
                // Flush: every open connection re-checks its key in the database once.
                set.clear();
                self.shared.generation.fetch_add(1, Ordering::AcqRel);
            }
            set.insert(key);
        }
        let hooks = self.shared.hooks.lock().unwrap_or_else(|e| e.into_inner());
        for h in hooks.iter() {
            h(key);
        }
    }

    /// Whether a connection whose key was checked at `check` may call without asking the
    /// database: the key is not known revoked, notifications are arriving, and none can
    /// have been missed since the check. `Err` when the key is known revoked.
    pub fn fresh(&self, key: Uuid, check: &KeyCheck) -> Result<bool, Status> {
        if self.is_revoked(key) {
            return Err(Status::unauthenticated("api key revoked"));
        }
        Ok(self.listening() && check.generation.load(Ordering::Acquire) == self.generation())
    }

    /// Stamps `check` after a successful database check made while the generation was
    /// `generation` (read before the check, so a change during it forces another).
    pub fn checked(&self, check: &KeyCheck, generation: u64) {
        check.generation.store(generation, Ordering::Release);
    }

    /// Whether the certificate with `serial` is revoked, from memory: `None` when this
    /// replica cannot tell (listener down, or the set overflowed): ask the database
    /// ([`cert_revoked_in_db`]).
    pub fn cert_revoked(&self, serial: &[u8]) -> Option<bool> {
        let certs = self.certs();
        (self.listening() && certs.1).then(|| certs.0.contains(serial))
    }

    /// Runs `hook` with the host id of every certificate revocation from now on.
    pub fn on_host_revoked(&self, hook: impl Fn(Uuid) + Send + Sync + 'static) {
        self.shared
            .host_hooks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Box::new(hook));
    }

    /// Records that `host`'s certificates `serials` were revoked and runs the host hooks
    /// (a notification, or the revoking call on this replica).
    pub fn host_revoked(&self, host: Uuid, serials: &[Vec<u8>]) {
        {
            let mut certs = self.certs();
            for s in serials {
                if certs.0.len() >= REVOKED_CERTS_MAX {
                    // Incomplete from here: hellos ask the database until the next reload.
                    certs.1 = false;
                    break;
                }
                certs.0.insert(s.clone());
            }
        }
        let hooks = self
            .shared
            .host_hooks
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        for h in hooks.iter() {
            h(host);
        }
    }

    /// Replaces the revoked serials with the table's unexpired rows (the listener, right
    /// after its LISTEN).
    fn load_certs(&self, client: &mut postgres::Client) -> Result<(), postgres::Error> {
        let limit = i64::try_from(REVOKED_CERTS_MAX).unwrap_or(i64::MAX);
        let rows = client.query(
            "SELECT serial FROM revoked_certificates WHERE expires_at > now() LIMIT $1",
            &[&(limit + 1)],
        )?;
        let complete = rows.len() <= REVOKED_CERTS_MAX;
        if !complete {
            log::warn!(
                "more than {REVOKED_CERTS_MAX} revoked certificates: hellos check the database"
            );
        }
        let set = rows
            .iter()
            .take(REVOKED_CERTS_MAX)
            .map(|r| r.get::<_, Vec<u8>>(0))
            .collect();
        *self.certs() = (set, complete);
        Ok(())
    }

    fn certs(&self) -> std::sync::MutexGuard<'_, (HashSet<Vec<u8>>, bool)> {
        // Plain data: a panic elsewhere cannot leave it half-written.
        self.shared.certs.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set(&self) -> std::sync::MutexGuard<'_, HashSet<Uuid>> {
        // Plain data: a panic elsewhere cannot leave it half-written.
        self.shared
            .revoked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Starts the listener thread on its own connection to `url`. It ends when every
    /// `Revocations` handle is dropped or [`Self::stop`] is called.
    pub fn listen(&self, url: &str) -> Result<(), ListenError> {
        let mut pg: postgres::Config = url
            .parse()
            .map_err(|source| ListenError::BadUrl { source })?;
        pg.connect_timeout(DB_CONNECT_TIMEOUT);
        pg.application_name("wrenn-ctl-listen");
        let weak = Arc::downgrade(&self.shared);
        std::thread::Builder::new()
            .name("ctl-revocations".into())
            .spawn(move || listener(pg, weak))
            .map_err(|source| ListenError::Spawn { source })?;
        Ok(())
    }

    /// Stops the listener thread (within its poll interval).
    pub fn stop(&self) {
        self.shared.stop.store(true, Ordering::Release);
    }
}

/// Why the listener could not start.
#[derive(Debug)]
pub enum ListenError {
    BadUrl { source: postgres::Error },
    Spawn { source: std::io::Error },
}

impl std::fmt::Display for ListenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListenError::BadUrl { .. } => {
                f.write_str("parse database url for the revocation listener")
            }
            ListenError::Spawn { .. } => f.write_str("spawn the revocation listener"),
        }
    }
}

impl std::error::Error for ListenError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ListenError::BadUrl { source } => Some(source),
            ListenError::Spawn { source } => Some(source),
        }
    }
}

/// How long one wait for notifications lasts before the loop looks at `stop` and pings.
const LISTEN_POLL: Duration = Duration::from_millis(250);

fn listener(pg: postgres::Config, weak: Weak<Shared>) {
    let mut backoff = DB_BACKOFF_MIN;
    loop {
        let Some(shared) = weak.upgrade() else { return };
        if shared.stop.load(Ordering::Acquire) {
            return;
        }
        let rev = Revocations { shared };
        match connect(&pg).and_then(|mut c| rev.load_certs(&mut c).map(|()| c)) {
            Ok(mut client) => {
                backoff = DB_BACKOFF_MIN;
                // LISTEN is in force: from here no notification is missed. Checks made
                // before it (and before any outage) are stale: new generation.
                rev.shared.generation.fetch_add(1, Ordering::AcqRel);
                rev.shared.listening.store(true, Ordering::Release);
                log::info!("revocation listener up generation={}", rev.generation());
                let why = receive(&mut client, &rev);
                rev.shared.listening.store(false, Ordering::Release);
                if rev.shared.stop.load(Ordering::Acquire) {
                    return;
                }
                log::warn!("revocation listener lost its connection ({why}); every call checks its key in the database until it is back");
            }
            Err(e) => {
                log::warn!(
                    "revocation listener cannot connect: {} retry_in_ms={}",
                    crate::db::describe(&e),
                    backoff.as_millis()
                );
                drop(rev);
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(DB_BACKOFF_MAX);
            }
        }
    }
}

fn connect(pg: &postgres::Config) -> Result<postgres::Client, postgres::Error> {
    let mut c = pg.connect(postgres::NoTls)?;
    c.batch_execute(&format!(
        "LISTEN {CHANNEL}; LISTEN {CERT_CHANNEL}; LISTEN {TRAFFIC_CHANNEL}"
    ))?;
    Ok(c)
}

/// Delivers notifications until the connection fails or the listener is stopped; returns
/// why it stopped.
fn receive(client: &mut postgres::Client, rev: &Revocations) -> String {
    let mut last_ping = Instant::now();
    loop {
        // Stopped, or every other handle dropped (the replica is gone).
        if rev.shared.stop.load(Ordering::Acquire) || Arc::strong_count(&rev.shared) == 1 {
            rev.shared.stop.store(true, Ordering::Release);
            return "stopped".into();
        }
        {
            let mut n = client.notifications();
            let mut it = n.timeout_iter(LISTEN_POLL);
            loop {
                match it.next() {
                    Ok(Some(note)) if note.channel() == CERT_CHANNEL => {
                        match parse_cert_payload(note.payload()) {
                            Some((host, serials)) => rev.host_revoked(host, &serials),
                            None => log::warn!(
                                "malformed certificate revocation payload={:?}",
                                note.payload()
                            ),
                        }
                    }
                    Ok(Some(note)) if note.channel() == TRAFFIC_CHANNEL => {
                        match proto::id::parse_uuid_strict(note.payload()) {
                            Some(id) => rev.sandbox_traffic_changed(id),
                            None => {
                                log::warn!("malformed sandbox traffic payload={:?}", note.payload())
                            }
                        }
                    }
                    Ok(Some(note)) => match proto::id::parse_uuid_strict(note.payload()) {
                        Some(key) => rev.revoked(key),
                        None => log::warn!("malformed revocation payload={:?}", note.payload()),
                    },
                    Err(e) => return crate::db::describe(&e),
                    Ok(None) => break,
                }
            }
        }
        if client.is_closed() {
            return "connection closed".into();
        }
        if last_ping.elapsed() >= LISTEN_PING_INTERVAL {
            if let Err(e) = client.is_valid(DB_CONNECT_TIMEOUT) {
                return crate::db::describe(&e);
            }
            last_ping = Instant::now();
        }
    }
}

/// The payload of a [`CERT_CHANNEL`] notification: host UUID, then serials in hex.
pub fn cert_payload(host: Uuid, serials: &[Vec<u8>]) -> String {
    let mut p = host.hyphenated().to_string();
    for s in serials {
        p.push(' ');
        for b in s {
            p.push_str(&format!("{b:02x}"));
        }
    }
    p
}

fn parse_cert_payload(p: &str) -> Option<(Uuid, Vec<Vec<u8>>)> {
    let mut parts = p.split(' ');
    let host = proto::id::parse_uuid_strict(parts.next()?)?;
    let mut serials = Vec::new();
    for hex in parts {
        if hex.is_empty() || hex.len() % 2 != 0 || hex.len() > 2 * (tls::peer::SERIAL_LEN_MAX + 1) {
            return None;
        }
        let bytes: Option<Vec<u8>> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
            .collect();
        serials.push(bytes?);
    }
    Some((host, serials))
}

/// Revokes every unexpired certificate of `host` (its current one and the one a renewal
/// replaced) inside the caller's transaction, and notifies every replica at commit. Returns
/// the serials revoked. Also notifies when there are none, so every replica closes the
/// host's connections.
pub fn revoke_host_certs(
    tx: &mut postgres::Transaction<'_>,
    host: Uuid,
) -> Result<Vec<Vec<u8>>, Status> {
    let rows = tx
        .query(
            "INSERT INTO revoked_certificates (serial, host_id, expires_at) \
             SELECT v.serial, h.id, v.expires_at FROM hosts h, \
                 LATERAL (VALUES (h.cert_serial, h.cert_expires_at), \
                                 (h.prev_cert_serial, h.prev_cert_expires_at)) AS v(serial, expires_at) \
             WHERE h.id = $1 AND v.serial IS NOT NULL AND v.expires_at > now() \
             ON CONFLICT (serial) DO NOTHING RETURNING serial",
            &[&host],
        )
        .map_err(crate::db::pg_err)?;
    let serials: Vec<Vec<u8>> = rows.iter().map(|r| r.get(0)).collect();
    tx.execute(
        "SELECT pg_notify($1, $2)",
        &[&CERT_CHANNEL, &cert_payload(host, &serials)],
    )
    .map_err(crate::db::pg_err)?;
    Ok(serials)
}

/// Whether `serial` is in `revoked_certificates` (a hello while this replica's listener is
/// down: one indexed lookup on a worker thread, never on the event loop).
pub fn cert_revoked_in_db(db: &crate::db::Db, serial: &[u8]) -> Result<bool, Status> {
    let serial = serial.to_vec();
    db.run(move |c| {
        c.query_opt(
            "SELECT 1 FROM revoked_certificates WHERE serial = $1",
            &[&serial],
        )
        .map(|r| r.is_some())
        .map_err(crate::db::pg_err)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificate_payloads_round_trip_and_bad_ones_are_refused() {
        let h = Uuid::from_u128(7);
        let serials = vec![vec![0x01, 0xab], vec![0x7f; 16]];
        let p = cert_payload(h, &serials);
        assert_eq!(parse_cert_payload(&p), Some((h, serials)));
        assert_eq!(parse_cert_payload(&cert_payload(h, &[])), Some((h, vec![])));
        for bad in [
            "",
            "x",
            &format!("{} 0", h.hyphenated()),
            &format!("{} zz", h.hyphenated()),
        ] {
            assert_eq!(parse_cert_payload(bad), None, "{bad}");
        }
    }

    #[test]
    fn revoked_certificates_are_known_only_while_complete_and_listening() {
        let r = Revocations::new();
        let heard = Arc::new(Mutex::new(Vec::new()));
        let h = Arc::clone(&heard);
        r.on_host_revoked(move |k| h.lock().unwrap().push(k));
        r.host_revoked(Uuid::from_u128(3), &[vec![1, 2]]);
        assert_eq!(*heard.lock().unwrap(), vec![Uuid::from_u128(3)]);
        assert_eq!(r.cert_revoked(&[1, 2]), None, "not listening, never loaded");
        r.shared.listening.store(true, Ordering::Release);
        r.certs().1 = true;
        assert_eq!(r.cert_revoked(&[1, 2]), Some(true));
        assert_eq!(r.cert_revoked(&[1, 3]), Some(false));
    }

    #[test]
    fn checks_are_fresh_only_while_listening_at_the_same_generation() {
        let r = Revocations::new();
        let key = Uuid::from_u128(1);
        let c = KeyCheck::at(r.generation());
        assert_eq!(r.fresh(key, &c).ok(), Some(false), "not listening");
        r.shared.generation.fetch_add(1, Ordering::AcqRel);
        r.shared.listening.store(true, Ordering::Release);
        assert_eq!(
            r.fresh(key, &c).ok(),
            Some(false),
            "checked before the listener"
        );
        r.checked(&c, r.generation());
        assert_eq!(r.fresh(key, &c).ok(), Some(true));
        r.revoked(key);
        assert!(r.fresh(key, &c).is_err());
        assert_eq!(r.fresh(Uuid::from_u128(2), &c).ok(), Some(true));
    }

    #[test]
    fn overflow_flushes_and_forces_rechecks() {
        let r = Revocations::new();
        r.shared.listening.store(true, Ordering::Release);
        let c = KeyCheck::at(r.generation());
        for i in 0..REVOKED_KEYS_MAX as u128 + 1 {
            r.revoked(Uuid::from_u128(i + 10));
        }
        assert!(r.set().len() <= REVOKED_KEYS_MAX);
        assert_eq!(r.fresh(Uuid::from_u128(1), &c).ok(), Some(false));
    }

    #[test]
    fn hooks_hear_every_revocation() {
        let r = Revocations::new();
        let heard = Arc::new(Mutex::new(Vec::new()));
        let h = Arc::clone(&heard);
        r.on_revoke(move |k| h.lock().unwrap().push(k));
        r.revoked(Uuid::from_u128(5));
        assert_eq!(*heard.lock().unwrap(), vec![Uuid::from_u128(5)]);
    }
}
