//! nftables rulesets applied through `nft -f -`.
//!
//! nftables applies a whole file as one transaction: either every rule is in place or none
//! is. Each ruleset here first creates its table (a no-op if it exists), then deletes it, then
//! defines it in full, so applying it replaces the table atomically, whatever state a crash
//! left it in; applying it twice gives the same result. `nft` runs as a child process fed on
//! stdin, in the network namespace of the thread that spawns it (a child starts in its
//! parent thread's namespaces), which is how a slot's table lands in the slot's namespace.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::thread::JoinHandle;
use std::time::Instant;

use super::limits::{
    NFT_POLL_INTERVAL, NFT_RULESET_LEN_MAX, NFT_STDERR_LEN_MAX, NFT_STDOUT_LEN_MAX, NFT_TIMEOUT,
};
use super::Error;

/// Finds the `nft` binary: on PATH, else in the sbin directories PATH often lacks.
pub fn nft_path() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/local/sbin"].map(PathBuf::from))
        .map(|dir| dir.join("nft"))
        .find(|p| p.is_file())
}

/// Reads `r` to its end on a thread, keeping the first `keep` bytes: nft must never block
/// on a full stdout or stderr pipe while we wait for it to exit.
fn drain(mut r: impl Read + Send + 'static, keep: usize) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut kept = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            match r.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => {
                    let room = keep.saturating_sub(kept.len());
                    kept.extend_from_slice(&chunk[..n.min(room)]);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        String::from_utf8_lossy(&kept).into_owned()
    })
}

/// Runs nft with `args`, feeding `stdin`; returns its stdout. Bounded by [`NFT_TIMEOUT`].
fn run(args: &[&str], stdin: &str) -> Result<String, Error> {
    if stdin.len() > NFT_RULESET_LEN_MAX {
        return Err(Error::NftFailed {
            status: "not run".to_owned(),
            stderr: format!(
                "ruleset of {} bytes over {NFT_RULESET_LEN_MAX}",
                stdin.len()
            ),
        });
    }
    let nft = nft_path().ok_or(Error::NftMissing)?;
    let mut child = Command::new(nft)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(Error::NftSpawn)?;
    let stdout = child.stdout.take().map(|o| drain(o, NFT_STDOUT_LEN_MAX));
    let stderr = child.stderr.take().map(|e| drain(e, NFT_STDERR_LEN_MAX));
    // The ruleset fits in a pipe's buffer (NFT_RULESET_LEN_MAX), so this write cannot wait
    // on nft; dropping the handle closes nft's stdin, which starts the transaction.
    let fed = match child.stdin.take() {
        Some(mut pipe) => pipe.write_all(stdin.as_bytes()),
        None => Ok(()),
    };
    let deadline = Instant::now() + NFT_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Ok(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(NFT_POLL_INTERVAL),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                break Err(Error::NftTimeout);
            }
            Err(e) => break Err(Error::NftSpawn(e)),
        }
    };
    // The child has exited (or was killed), so its pipes are closed and the readers end.
    let stdout = stdout.and_then(|t| t.join().ok()).unwrap_or_default();
    let stderr = stderr.and_then(|t| t.join().ok()).unwrap_or_default();
    let status = status?;
    if !status.success() {
        return Err(Error::NftFailed {
            status: status.to_string(),
            stderr: stderr.trim().to_owned(),
        });
    }
    fed.map_err(Error::NftSpawn)?;
    Ok(stdout)
}

/// Applies a ruleset atomically in the calling thread's network namespace.
pub fn apply(ruleset: &str) -> Result<(), Error> {
    run(&["-f", "-"], ruleset).map(|_| ())
}

/// Tables in the calling thread's network namespace, as `(family, name)`.
pub fn list_tables() -> Result<Vec<(String, String)>, Error> {
    let out = run(&["list", "tables"], "")?;
    Ok(parse_tables(&out))
}

fn parse_tables(out: &str) -> Vec<(String, String)> {
    out.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            match (words.next(), words.next(), words.next()) {
                (Some("table"), Some(family), Some(name)) => {
                    Some((family.to_owned(), name.to_owned()))
                }
                _ => None,
            }
        })
        .collect()
}

/// `nft list set family table set` in the calling thread's network namespace (with the
/// elements' time left).
pub fn list_set(family: &str, table: &str, set: &str) -> Result<String, Error> {
    run(&["list", "set", family, table, set], "")
}

/// Deletes table `family name` if it exists; returns whether it did.
pub fn delete_table(family: &str, name: &str) -> Result<bool, Error> {
    let present = list_tables()?.iter().any(|(f, n)| f == family && n == name);
    if present {
        apply(&format!("delete table {family} {name}\n"))?;
    }
    Ok(present)
}

/// The preamble that makes a table definition replace whatever is there.
pub fn replace_table_preamble(family: &str, name: &str) -> String {
    format!("table {family} {name} {{}}\ndelete table {family} {name}\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_table_list() {
        let out = "table ip wrenn\ntable inet filter\n\nnoise\n";
        assert_eq!(
            parse_tables(out),
            vec![
                ("ip".into(), "wrenn".into()),
                ("inet".into(), "filter".into())
            ]
        );
    }

    #[test]
    fn preamble_creates_then_deletes() {
        assert_eq!(
            replace_table_preamble("ip", "t"),
            "table ip t {}\ndelete table ip t\n"
        );
    }
}
