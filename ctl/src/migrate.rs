//! Schema migrations: SQL files embedded in the binary, applied in one transaction under a
//! PostgreSQL advisory lock (so replicas starting together apply each once), each recorded
//! with a SHA-256 checksum. A database whose applied migration differs from the embedded
//! text (someone edited a shipped migration) is refused: the schema would no longer be
//! what the code expects.

use std::fmt;

use postgres::GenericClient;

use crate::sha256;

/// One migration.
#[derive(Clone, Copy, Debug)]
pub struct Migration {
    pub version: i32,
    pub name: &'static str,
    pub sql: &'static str,
}

/// Every migration, in order.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "0001_init",
        sql: include_str!("../migrations/0001_init.sql"),
    },
    Migration {
        version: 2,
        name: "0002_user_directories",
        sql: include_str!("../migrations/0002_user_directories.sql"),
    },
    Migration {
        version: 3,
        name: "0003_host_drift",
        sql: include_str!("../migrations/0003_host_drift.sql"),
    },
    Migration {
        version: 4,
        name: "0004_usage_and_webhooks",
        sql: include_str!("../migrations/0004_usage_and_webhooks.sql"),
    },
    Migration {
        version: 5,
        name: "0005_template_builds",
        sql: include_str!("../migrations/0005_template_builds.sql"),
    },
    Migration {
        version: 6,
        name: "0006_host_overcommit",
        sql: include_str!("../migrations/0006_host_overcommit.sql"),
    },
    Migration {
        version: 7,
        name: "0007_sandbox_network",
        sql: include_str!("../migrations/0007_sandbox_network.sql"),
    },
    Migration {
        version: 8,
        name: "0008_host_certificates",
        sql: include_str!("../migrations/0008_host_certificates.sql"),
    },
    Migration {
        version: 9,
        name: "0009_template_defaults",
        sql: include_str!("../migrations/0009_template_defaults.sql"),
    },
    Migration {
        version: 10,
        name: "0010_sandbox_traffic",
        sql: include_str!("../migrations/0010_sandbox_traffic.sql"),
    },
    Migration {
        version: 11,
        name: "0011_revoked_certificates",
        sql: include_str!("../migrations/0011_revoked_certificates.sql"),
    },
    Migration {
        version: 12,
        name: "0012_sandbox_auto_resume",
        sql: include_str!("../migrations/0012_sandbox_auto_resume.sql"),
    },
    Migration {
        version: 13,
        name: "0013_sandbox_traffic_notify",
        sql: include_str!("../migrations/0013_sandbox_traffic_notify.sql"),
    },
];

/// Advisory lock key of the migration runner ("wrenn-mg" in ASCII).
pub const MIGRATE_LOCK: i64 = 0x7772_656e_6e2d_6d67;

/// Why migrating failed.
#[derive(Debug)]
pub enum MigrateError {
    Sql {
        step: &'static str,
        source: postgres::Error,
    },
    /// An applied migration's checksum differs from the embedded one.
    Edited { version: i32, name: String },
    /// The database has a migration this binary does not know (a newer ctl ran).
    Unknown { version: i32, name: String },
}

impl fmt::Display for MigrateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MigrateError::Sql { step, .. } => write!(f, "migrate: {step}"),
            MigrateError::Edited { version, name } => write!(
                f,
                "applied migration {version} ({name}) was edited after it was applied; refusing to start"
            ),
            MigrateError::Unknown { version, name } => write!(
                f,
                "database has migration {version} ({name}) that this wrenn-ctl does not know; run a newer wrenn-ctl"
            ),
        }
    }
}

impl std::error::Error for MigrateError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            MigrateError::Sql { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// Checksum recorded for a migration.
pub fn checksum(sql: &str) -> String {
    sha256::hex(&sha256::digest(sql.as_bytes()))
}

/// Applies pending migrations of `list`; returns the versions applied now.
pub fn run_list(
    client: &mut postgres::Client,
    list: &[Migration],
) -> Result<Vec<i32>, MigrateError> {
    let sql = |step: &'static str| move |source| MigrateError::Sql { step, source };
    let mut tx = client.transaction().map_err(sql("begin"))?;
    tx.query("SELECT pg_advisory_xact_lock($1)", &[&MIGRATE_LOCK])
        .map_err(sql("take advisory lock"))?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
            version    integer PRIMARY KEY,
            name       text NOT NULL,
            checksum   text NOT NULL,
            applied_at timestamptz NOT NULL DEFAULT now())",
    )
    .map_err(sql("create schema_migrations"))?;
    let applied = tx
        .query(
            "SELECT version, name, checksum FROM schema_migrations ORDER BY version",
            &[],
        )
        .map_err(sql("read schema_migrations"))?;
    for row in &applied {
        let version: i32 = row.get(0);
        let name: String = row.get(1);
        let sum: String = row.get(2);
        match list.iter().find(|m| m.version == version) {
            None => return Err(MigrateError::Unknown { version, name }),
            Some(m) if checksum(m.sql) != sum => {
                return Err(MigrateError::Edited { version, name })
            }
            Some(_) => {}
        }
    }
    let mut done = Vec::new();
    for m in list {
        if applied.iter().any(|r| r.get::<_, i32>(0) == m.version) {
            continue;
        }
        tx.batch_execute(m.sql).map_err(sql("apply migration"))?;
        tx.execute(
            "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
            &[&m.version, &m.name, &checksum(m.sql)],
        )
        .map_err(sql("record migration"))?;
        log::info!("applied migration version={} name={}", m.version, m.name);
        done.push(m.version);
    }
    tx.commit().map_err(sql("commit"))?;
    Ok(done)
}

/// Applies pending migrations of [`MIGRATIONS`].
pub fn run(client: &mut postgres::Client) -> Result<Vec<i32>, MigrateError> {
    run_list(client, MIGRATIONS)
}

/// Whether `client` sees an up-to-date schema (used by tests and `admin`).
pub fn is_current(client: &mut impl GenericClient) -> Result<bool, postgres::Error> {
    let n: i64 = client
        .query_one(
            "SELECT count(*) FROM information_schema.tables WHERE table_name = 'schema_migrations'",
            &[],
        )?
        .get(0);
    if n == 0 {
        return Ok(false);
    }
    let v: Option<i32> = client
        .query_one("SELECT max(version) FROM schema_migrations", &[])?
        .get(0);
    Ok(v == MIGRATIONS.last().map(|m| m.version))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_increasing_and_names_match_files() {
        for w in MIGRATIONS.windows(2) {
            assert!(w[0].version < w[1].version);
        }
        for m in MIGRATIONS {
            assert!(m.name.starts_with(&format!("{:04}_", m.version)));
        }
    }

    #[test]
    fn schema_follows_the_id_rules() {
        // UUID primary keys everywhere; TEXT only where the design allows.
        let sql = MIGRATIONS[0].sql;
        for line in sql.lines() {
            let l = line.trim();
            if l.starts_with("id ") {
                assert!(l.contains("uuid PRIMARY KEY"), "{l}");
            }
        }
        assert!(sql.contains("actor_id        text"));
        assert!(sql.contains("resource_id     text"));
    }

    #[test]
    fn build_bounds_in_sql_are_the_limits() {
        let sql = MIGRATIONS.iter().find(|m| m.version == 5).unwrap().sql;
        let log = crate::limits::BUILD_STEP_LOG_MAX;
        assert!(sql.contains(&format!("length(log) <= {log}")));
        let recipe = crate::limits::BUILD_RECIPE_LEN_MAX;
        assert!(sql.contains(&format!("octet_length(recipe) <= {recipe}")));
        assert!(sql.contains(&format!("n < {}", proto::recipe::RECIPE_STEPS_MAX)));
    }
}
