//! Credentials: API keys (clients), host tokens (agents), registration tokens.
//!
//! Secrets are `prefix` + 64 hex digits (32 bytes from getrandom). ctl stores only their
//! SHA-256; API keys are found by a short lookup prefix (the first [`LOOKUP_LEN`] characters,
//! indexed), then the hash is compared in constant time. `last_used` of API keys is not
//! written on the request path: [`LastUsed`] gathers stamps and a background thread writes
//! them in one UPDATE every few seconds.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, SystemTime};

use proto::id::Uuid;
use proto::Status;

use crate::db::{pg_err, Db};
use crate::limits::LAST_USED_PENDING_MAX;
use crate::service::{Api, AuthCtx};
use crate::sha256;

/// Prefix of API keys.
pub const API_KEY_PREFIX: &str = "wrn_";
/// Prefix of host tokens (agent → ctl).
pub const HOST_TOKEN_PREFIX: &str = "wrh_";
/// Prefix of agent tokens (ctl → agent).
pub const AGENT_TOKEN_PREFIX: &str = "wra_";
/// Prefix of one-time registration tokens.
pub const REGISTRATION_TOKEN_PREFIX: &str = "wrr_";
/// Characters of a key stored in clear as its lookup prefix (`wrn_` + 8 hex digits = 32
/// bits of the random part: enough to make lookups unique in practice, useless to an
/// attacker without the other 224 bits).
pub const LOOKUP_LEN: usize = 12;
/// Length of every secret: prefix (4) + 64 hex digits.
pub const SECRET_LEN: usize = 68;

/// A fresh secret with its stored forms.
#[derive(Clone, Debug)]
pub struct NewSecret {
    pub plaintext: String,
    pub lookup: String,
    pub hash: Vec<u8>,
}

/// Makes a new secret with `prefix` (one of the `*_PREFIX` constants).
pub fn new_secret(prefix: &str) -> Result<NewSecret, Status> {
    let plaintext =
        crate::random::token(prefix).map_err(|e| Status::internal(format!("getrandom: {e}")))?;
    Ok(NewSecret {
        lookup: plaintext[..LOOKUP_LEN].to_owned(),
        hash: hash(&plaintext).to_vec(),
        plaintext,
    })
}

/// SHA-256 of a secret as stored.
pub fn hash(secret: &str) -> [u8; 32] {
    sha256::digest(secret.as_bytes())
}

/// Whether `s` has the shape of a secret with `prefix` (checked before any query, so
/// garbage never reaches the database).
pub fn well_formed(s: &str, prefix: &str) -> bool {
    s.len() == SECRET_LEN
        && s.starts_with(prefix)
        && s.as_bytes()[prefix.len()..]
            .iter()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c))
}

pub(crate) fn authenticate(api: &Api, key: &str) -> Result<AuthCtx, Status> {
    let r = lookup_key(api.db(), key).and_then(|ctx| {
        // A revocation this replica heard of but the lookup's snapshot predates.
        if api.revocations().is_revoked(ctx.key_id) {
            Err(Status::unauthenticated("api key revoked"))
        } else {
            Ok(ctx)
        }
    });
    match &r {
        Ok(ctx) => api.inner.last_used.touch(ctx.key_id),
        Err(_) => crate::metrics::AUTH_FAILURES.inc(),
    }
    r
}

/// Checks an API key against the database (one indexed SELECT).
pub fn lookup_key(db: &Db, key: &str) -> Result<AuthCtx, Status> {
    if !well_formed(key, API_KEY_PREFIX) {
        return Err(Status::unauthenticated("malformed api key"));
    }
    let lookup = key[..LOOKUP_LEN].to_owned();
    let h = hash(key);
    let rows = db.run(move |c| {
        let st = crate::db::prepared(
            c,
            "SELECT id, team_id, name, key_hash, platform_admin FROM api_keys \
             WHERE lookup = $1 AND revoked_at IS NULL",
            &[postgres::types::Type::TEXT],
        )?;
        c.query(&st, &[&lookup]).map_err(pg_err)
    })?;
    for row in rows {
        let stored: Vec<u8> = row.get(3);
        if sha256::constant_time_eq(&stored, &h) {
            return Ok(AuthCtx {
                key_id: row.get(0),
                team_id: row.get(1),
                key_name: row.get(2),
                platform_admin: row.get(4),
            });
        }
    }
    Err(Status::unauthenticated("unknown or revoked api key"))
}

/// Whether key `id` still exists and is not revoked.
pub fn key_active(db: &Db, id: Uuid) -> Result<bool, Status> {
    db.run(move |c| {
        let st = crate::db::prepared(
            c,
            "SELECT 1 FROM api_keys WHERE id = $1 AND revoked_at IS NULL",
            &[postgres::types::Type::UUID],
        )?;
        Ok(c.query_opt(&st, &[&id]).map_err(pg_err)?.is_some())
    })
}

/// A host as its token finds it.
#[derive(Clone, Debug)]
pub struct HostRow {
    pub id: Uuid,
    pub name: String,
    /// Serial of the certificate ctl issued it (None: registered without a key, or ctl
    /// issued none): such a host must present that certificate on the host port.
    pub cert_serial: Option<Vec<u8>>,
    /// The certificate a renewal replaced: accepted until it expires.
    pub prev_cert_serial: Option<Vec<u8>>,
}

/// Checks a host token: the host it belongs to, with its hostname and certificate serial
/// (constant-time comparison of the hash).
pub fn lookup_host(db: &Db, token: &str) -> Result<HostRow, Status> {
    if !well_formed(token, HOST_TOKEN_PREFIX) {
        return Err(Status::unauthenticated("malformed host token"));
    }
    let h = hash(token).to_vec();
    let row = db.run(move |c| {
        c.query_opt(
            "SELECT id, hostname, host_token_hash, cert_serial, prev_cert_serial FROM hosts \
             WHERE host_token_hash = $1",
            &[&h],
        )
        .map_err(pg_err)
    })?;
    match row {
        // The index lookup already matched the hash; compare again in constant time so the
        // check does not rest on the index's comparison.
        Some(r) if sha256::constant_time_eq(&r.get::<_, Vec<u8>>(2), &hash(token)) => Ok(HostRow {
            id: r.get(0),
            name: r.get(1),
            cert_serial: r.get(3),
            prev_cert_serial: r.get(4),
        }),
        _ => Err(Status::unauthenticated("unknown host token")),
    }
}

/// Pending `last_used` stamps, flushed by a background thread.
pub struct LastUsed {
    shared: Arc<LastUsedShared>,
    db: Db,
}

struct LastUsedShared {
    pending: Mutex<(HashMap<Uuid, SystemTime>, bool)>,
    cv: Condvar,
}

impl LastUsed {
    /// Starts the flusher thread; it ends when the `LastUsed` is dropped.
    pub fn start(db: Db, every: Duration) -> LastUsed {
        let shared = Arc::new(LastUsedShared {
            pending: Mutex::new((HashMap::new(), false)),
            cv: Condvar::new(),
        });
        let weak = Arc::downgrade(&shared);
        let db2 = db.clone();
        let spawned = std::thread::Builder::new()
            .name("ctl-last-used".into())
            .spawn(move || loop {
                let Some(s) = weak.upgrade() else { return };
                let stop = {
                    let g = s.pending.lock().unwrap_or_else(|e| e.into_inner());
                    let (g, _) =
                        s.cv.wait_timeout(g, every)
                            .unwrap_or_else(|e| e.into_inner());
                    g.1
                };
                if let Err(e) = flush(&s, &db2) {
                    log::warn!("last_used flush failed: {}", e.message);
                }
                if stop {
                    return;
                }
            });
        if let Err(e) = spawned {
            log::error!("cannot start last_used flusher: {e}");
        }
        LastUsed { shared, db }
    }

    /// Records a use of `key` (in memory only).
    pub fn touch(&self, key: Uuid) {
        let mut g = self
            .shared
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if g.0.len() < LAST_USED_PENDING_MAX || g.0.contains_key(&key) {
            g.0.insert(key, SystemTime::now());
        }
    }

    /// Writes the pending stamps now.
    pub fn flush_now(&self) -> Result<(), Status> {
        flush(&self.shared, &self.db)
    }
}

impl Drop for LastUsed {
    fn drop(&mut self) {
        self.shared
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .1 = true;
        self.shared.cv.notify_all();
    }
}

fn flush(s: &LastUsedShared, db: &Db) -> Result<(), Status> {
    let batch = std::mem::take(&mut s.pending.lock().unwrap_or_else(|e| e.into_inner()).0);
    if batch.is_empty() {
        return Ok(());
    }
    let (ids, times): (Vec<Uuid>, Vec<SystemTime>) = batch.into_iter().unzip();
    db.run(move |c| {
        c.execute(
            "UPDATE api_keys k SET last_used_at = GREATEST(COALESCE(k.last_used_at, u.t), u.t) \
             FROM unnest($1::uuid[], $2::timestamptz[]) AS u(id, t) WHERE k.id = u.id",
            &[&ids, &times],
        )
        .map_err(pg_err)?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_well_formed_and_hashed() {
        let s = new_secret(API_KEY_PREFIX).unwrap();
        assert!(well_formed(&s.plaintext, API_KEY_PREFIX));
        assert!(!well_formed(&s.plaintext, HOST_TOKEN_PREFIX));
        assert_eq!(s.lookup, &s.plaintext[..LOOKUP_LEN]);
        assert_eq!(s.hash, hash(&s.plaintext).to_vec());
        assert!(!well_formed("wrn_short", API_KEY_PREFIX));
        let upper = s.plaintext.to_uppercase().replacen("WRN_", "wrn_", 1);
        assert!(!well_formed(&upper, API_KEY_PREFIX) || upper == s.plaintext);
        assert!(!well_formed(
            &format!("{}\u{e9}", &s.plaintext[..67]),
            API_KEY_PREFIX
        ));
    }
}
