//! `wrenn up`'s PostgreSQL: finding the server's tools, a throwaway cluster under the state
//! directory (as root, owned by and run as the `postgres` user), its role and database for ctl.

use super::*;

/// The directory holding `initdb` and `pg_ctl`: `WRENN_PG_BIN`, else the newest
/// /usr/lib/postgresql/<version>/bin, else PATH.
pub fn find_pg_bin() -> Result<PathBuf, UpError> {
    if let Some(d) = std::env::var_os("WRENN_PG_BIN").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(d));
    }
    let mut best: Option<(u32, PathBuf)> = None;
    if let Ok(rd) = fs::read_dir("/usr/lib/postgresql") {
        for e in rd.flatten() {
            let v = e.file_name().to_string_lossy().parse::<u32>().ok();
            let bin = e.path().join("bin");
            if let Some(v) = v.filter(|_| bin.join("pg_ctl").is_file()) {
                if best.as_ref().is_none_or(|(bv, _)| v > *bv) {
                    best = Some((v, bin));
                }
            }
        }
    }
    if let Some((_, bin)) = best {
        return Ok(bin);
    }
    doctor::find_on_path("pg_ctl")
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .ok_or_else(|| UpError::Missing {
            what: "PostgreSQL (initdb, pg_ctl)".into(),
            hint: "`apt-get install postgresql-15` (or set WRENN_PG_BIN to its bin directory)"
                .into(),
        })
}

/// Uid and gid of `user` from /etc/passwd.
pub(super) fn user_ids(user: &str) -> Option<(u32, u32)> {
    let text = fs::read_to_string("/etc/passwd").ok()?;
    text.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() >= 4 && f[0] == user).then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))?
    })
}

pub(super) fn chown_tree(path: &Path, uid: u32, gid: u32) -> Result<(), UpError> {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid)).map_err(io_err("chown", path))?;
    if fs::symlink_metadata(path).is_ok_and(|m| m.is_dir()) {
        for e in fs::read_dir(path).map_err(io_err("list", path))?.flatten() {
            chown_tree(&e.path(), uid, gid)?;
        }
    }
    Ok(())
}

/// Every directory from `/` to `dir` must let `uid` (the postgres user) pass.
pub(super) fn check_traversable(dir: &Path, uid: u32) -> Result<(), UpError> {
    use std::os::unix::fs::MetadataExt;
    for d in dir.ancestors() {
        let m = fs::metadata(d).map_err(io_err("stat", d))?;
        let passes = if m.uid() == uid {
            m.mode() & 0o100 != 0
        } else {
            // Group membership is not looked up: other's x bit, as on a stock system.
            m.mode() & 0o001 != 0
        };
        if !passes {
            return Err(UpError::Missing {
                what: format!(
                    "a path the postgres user can reach ({} is closed to it)",
                    d.display()
                ),
                hint: "`chmod o+x` that directory or pick another --state-dir".into(),
            });
        }
    }
    Ok(())
}

/// Runs a PostgreSQL tool: as root through `runuser -u postgres --`, else directly.
pub(super) fn pg_command(bin: &Path, tool: &str, as_postgres: bool) -> Command {
    if as_postgres {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin.join(tool));
        c
    } else {
        Command::new(bin.join(tool))
    }
}

/// Starts the cluster (initializing it on the first run); returns ctl's database URL.
pub(super) fn start_postgres(cfg: &UpConfig, bin: &Path, root: bool) -> Result<String, UpError> {
    let l = &cfg.layout;
    let ids = if root {
        Some(user_ids("postgres").ok_or_else(|| UpError::Missing {
            what: "the postgres user".into(),
            hint:
                "install PostgreSQL from the distribution (`apt-get install postgresql-15`)".into(),
        })?)
    } else {
        None
    };
    if let Some((uid, _)) = ids {
        check_traversable(&l.dir, uid)?;
    }
    mkdir(&l.pg(), 0o700)?;
    mkdir(&l.pg_socket_dir(), 0o700)?;
    let log = l.log("postgres");
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .map_err(io_err("open", &log))?;
    if let Some((uid, gid)) = ids {
        std::os::unix::fs::chown(l.pg(), Some(uid), Some(gid)).map_err(io_err("chown", &l.pg()))?;
        std::os::unix::fs::chown(l.pg_socket_dir(), Some(uid), Some(gid))
            .map_err(io_err("chown", &l.pg_socket_dir()))?;
        std::os::unix::fs::chown(&log, Some(uid), Some(gid)).map_err(io_err("chown", &log))?;
    }

    let password = match read_trim(&l.pg_password()) {
        Some(p) => p,
        None => {
            let p =
                proto::random::hex(32).map_err(io_err("getrandom", Path::new("/dev/urandom")))?;
            write_secret(&l.pg_password(), &p)?;
            p
        }
    };
    if !l.pg_data().join("PG_VERSION").exists() {
        if l.pg_data().exists() {
            // A half-made cluster from an interrupted first run.
            fs::remove_dir_all(l.pg_data()).map_err(io_err("remove", &l.pg_data()))?;
        }
        // initdb reads the superuser's password from a file its user can read.
        let pwfile = l.pg().join("initdb-password");
        write_secret(&pwfile, &password)?;
        if let Some((uid, gid)) = ids {
            chown_tree(&pwfile, uid, gid)?;
        }
        let r = run_cmd(
            "initdb",
            pg_command(bin, "initdb", root)
                .arg("-D")
                .arg(l.pg_data())
                .args(["-U", "wrenn", "-E", "UTF8", "--no-instructions"])
                .args(["--auth-local=trust", "--auth-host=scram-sha-256"])
                .arg(format!("--pwfile={}", pwfile.display())),
        );
        let _ = fs::remove_file(&pwfile);
        r?;
    }
    let status = pg_command(bin, "pg_ctl", root)
        .arg("status")
        .arg("-D")
        .arg(l.pg_data())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map_err(|source| UpError::Spawn {
            program: bin.join("pg_ctl"),
            source,
        })?;
    if !status.success() {
        if !port_free(cfg.pg_port) {
            return Err(UpError::PortBusy {
                port: cfg.pg_port,
                what: "PostgreSQL".into(),
            });
        }
        let opts = format!(
            "-c listen_addresses=127.0.0.1 -c port={} -c unix_socket_directories={}",
            cfg.pg_port,
            l.pg_socket_dir().display()
        );
        run_cmd(
            "pg_ctl start",
            pg_command(bin, "pg_ctl", root)
                .arg("start")
                .arg("-D")
                .arg(l.pg_data())
                .arg("-l")
                .arg(&log)
                .args(["-w", "-t", "60", "-o", &opts])
                // pg_ctl leaves the server running; it must not hold our output pipes.
                .stdout(Stdio::null())
                .stderr(Stdio::piped()),
        )
        .map_err(|e| match e {
            UpError::Command { what, status, .. } => UpError::Command {
                what,
                status,
                output: tail(&log),
            },
            e => e,
        })?;
    }
    let psql = |sql: &str| -> Result<String, UpError> {
        run_cmd(
            "psql",
            pg_command(bin, "psql", root)
                .arg("-h")
                .arg(l.pg_socket_dir())
                .args([
                    "-p",
                    &cfg.pg_port.to_string(),
                    "-U",
                    "wrenn",
                    "-d",
                    "postgres",
                ])
                .args(["-XAtqc", sql]),
        )
    };
    if psql("SELECT 1 FROM pg_database WHERE datname = 'wrenn'")?.trim() != "1" {
        psql("CREATE DATABASE wrenn")?;
    }
    Ok(format!(
        "postgresql://wrenn:{password}@127.0.0.1:{}/wrenn",
        cfg.pg_port
    ))
}
