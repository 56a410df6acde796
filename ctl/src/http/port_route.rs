//! Which sandbox port a request is for: the routing half of port exposure.
//!
//! Two forms reach a server on port P of sandbox S:
//! - by host name, `P-sb-<uuid>.<traffic domain>` (the `Host` header, any case, an optional
//!   `:port` and final dot), for browsers: each sandbox port is its own origin. The traffic
//!   domain is a ctl setting and must be a registrable domain of its own, not the API's, so a
//!   sandbox's pages can set cookies neither for the API nor for another sandbox;
//! - by path, `/v1/sandboxes/sb-<uuid>/ports/P/<rest>`, for API clients (no wildcard DNS);
//!   the sandbox sees `/<rest>` with the query string kept.
//!
//! Pure functions over the request's `Host` and target; bounded (a host name is at most
//! [`HOST_LEN_MAX`] bytes) and fuzzed (`port_route`). envd's port is never a target.

use proto::id::{self, Uuid};

/// Longest `Host` value looked at (a DNS name is at most 253 characters, plus `:65535`).
pub const HOST_LEN_MAX: usize = 253 + 6;
/// envd's API port: never exposed, whatever the request says.
pub const ENVD_PORT: u16 = 49983;
/// The path form's prefix.
pub const PATH_PREFIX: &str = "/v1/sandboxes/";

/// A request for a sandbox port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortRoute {
    pub sandbox: Uuid,
    pub port: u16,
    /// The request target the sandbox's server sees (starts with `/`).
    pub target: String,
    /// Which form matched: the path form takes the traffic token from the header only.
    pub by_path: bool,
}

/// Why a request that looks like port traffic is refused (the caller answers 400 or 404).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteError {
    /// Not a port between 1 and 65535 in canonical decimal.
    BadPort,
    /// envd's port.
    EnvdPort,
    /// Not `sb-<uuid>`.
    BadSandboxId,
}

impl std::fmt::Display for RouteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RouteError::BadPort => write!(f, "port must be 1 to 65535"),
            RouteError::EnvdPort => write!(f, "port {ENVD_PORT} is never exposed"),
            RouteError::BadSandboxId => write!(f, "not a sandbox id"),
        }
    }
}

impl std::error::Error for RouteError {}

/// A canonical decimal port (no sign, no leading zero), 1..=65535, not envd's.
fn parse_port(s: &str) -> Result<u16, RouteError> {
    if s.is_empty() || s.len() > 5 || !s.bytes().all(|b| b.is_ascii_digit()) || s.starts_with('0') {
        return Err(RouteError::BadPort);
    }
    let port: u16 = s.parse().map_err(|_| RouteError::BadPort)?;
    if port == ENVD_PORT {
        return Err(RouteError::EnvdPort);
    }
    Ok(port)
}

/// The route of a `Host` header under `domain` (lower-case, no final dot): `None` when the
/// host is not a name directly below the traffic domain, so the request is not port traffic.
pub fn route_host(host: &str, domain: &str, target: &str) -> Option<Result<PortRoute, RouteError>> {
    if host.len() > HOST_LEN_MAX || domain.is_empty() {
        return None;
    }
    let host = host.to_ascii_lowercase();
    // Drop a `:port` (the host part never holds a colon: no IPv6 literal is a sandbox name).
    let name = match host.rsplit_once(':') {
        Some((n, p)) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => n,
        Some(_) => return None,
        None => host.as_str(),
    };
    let name = name.strip_suffix('.').unwrap_or(name);
    let label = name.strip_suffix(domain)?.strip_suffix('.')?;
    if label.contains('.') {
        return None; // deeper than one label below the domain
    }
    let (port, sandbox) = label.split_once('-')?;
    Some(route_of(port, sandbox, target, false))
}

fn route_of(
    port: &str,
    sandbox: &str,
    target: &str,
    by_path: bool,
) -> Result<PortRoute, RouteError> {
    let port = parse_port(port)?;
    let sandbox = id::parse_sandbox(sandbox).map_err(|_| RouteError::BadSandboxId)?;
    Ok(PortRoute {
        sandbox,
        port,
        target: target.to_owned(),
        by_path,
    })
}

/// The route of a path-form target, `/v1/sandboxes/<id>/ports/<P>[/<rest>][?query]`: `None`
/// when the target is not of that form (another API route).
pub fn route_path(target: &str) -> Option<Result<PortRoute, RouteError>> {
    let rest = target.strip_prefix(PATH_PREFIX)?;
    let (sandbox, rest) = rest.split_once('/')?;
    let rest = rest.strip_prefix("ports/")?;
    let split = rest.find(['/', '?']).unwrap_or(rest.len());
    let (port, tail) = rest.split_at(split);
    let inner = if tail.starts_with('?') || tail.is_empty() {
        format!("/{tail}")
    } else {
        tail.to_owned()
    };
    Some(route_of(port, sandbox, &inner, true))
}

/// Fuzz entry: both forms on arbitrary bytes (split into host and target at the first NUL).
pub fn fuzz_route(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let (host, target) = s.split_once('\0').unwrap_or((s, "/"));
    for r in [route_host(host, "wrenn.test", target), route_path(target)]
        .into_iter()
        .flatten()
        .flatten()
    {
        assert_ne!(r.port, 0);
        assert_ne!(r.port, ENVD_PORT);
        assert!(r.target.starts_with('/') || !r.by_path);
        let back = id::format_sandbox(r.sandbox);
        assert!(back.starts_with("sb-"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SB: &str = "sb-0123abcd-0000-4000-8000-00000000beef";

    fn uuid() -> Uuid {
        id::parse_sandbox(SB).unwrap()
    }

    #[test]
    fn host_form() {
        let d = "wrenn-sandboxes.test";
        let r = route_host(&format!("8080-{SB}.{d}"), d, "/a?b=1")
            .unwrap()
            .unwrap();
        assert_eq!(
            r,
            PortRoute {
                sandbox: uuid(),
                port: 8080,
                target: "/a?b=1".into(),
                by_path: false
            }
        );
        // Case, port and final dot do not matter.
        let up = format!("3000-{}.{}.:443", SB.to_uppercase(), d.to_uppercase());
        assert_eq!(route_host(&up, d, "/").unwrap().unwrap().port, 3000);
        // Not below the domain, deeper than one label, or the domain itself: not ours.
        for other in [
            format!("8080-{SB}.api.test"),
            format!("x.8080-{SB}.{d}"),
            d.to_owned(),
            format!("8080-{SB}.evil{d}"),
            format!("8080-{SB}{d}"),
            format!("8080-{SB}.{d}:x"),
            "a".repeat(300),
        ] {
            assert_eq!(route_host(&other, d, "/"), None, "{other}");
        }
        // Below the domain but malformed: refused with a reason.
        for (bad, why) in [
            (format!("0-{SB}.{d}"), RouteError::BadPort),
            (format!("080-{SB}.{d}"), RouteError::BadPort),
            (format!("65536-{SB}.{d}"), RouteError::BadPort),
            (format!("+80-{SB}.{d}"), RouteError::BadPort),
            (format!("49983-{SB}.{d}"), RouteError::EnvdPort),
            (format!("80-sb-xyz.{d}"), RouteError::BadSandboxId),
            (format!("80-tpl-{}.{d}", &SB[3..]), RouteError::BadSandboxId),
        ] {
            assert_eq!(route_host(&bad, d, "/"), Some(Err(why)), "{bad}");
        }
    }

    #[test]
    fn path_form() {
        let r = route_path(&format!("/v1/sandboxes/{SB}/ports/8888/api/x?y=2"))
            .unwrap()
            .unwrap();
        assert_eq!(
            (r.port, r.target.as_str(), r.by_path),
            (8888, "/api/x?y=2", true)
        );
        assert_eq!(r.sandbox, uuid());
        let bare = route_path(&format!("/v1/sandboxes/{SB}/ports/80"))
            .unwrap()
            .unwrap();
        assert_eq!(bare.target, "/");
        let q = route_path(&format!("/v1/sandboxes/{SB}/ports/80?x"))
            .unwrap()
            .unwrap();
        assert_eq!(q.target, "/?x");
        // Other API routes are not port traffic.
        for other in [
            format!("/v1/sandboxes/{SB}"),
            format!("/v1/sandboxes/{SB}/files"),
            "/v1/sandboxes".to_owned(),
            "/health".to_owned(),
        ] {
            assert_eq!(route_path(&other), None, "{other}");
        }
        assert_eq!(
            route_path(&format!("/v1/sandboxes/{SB}/ports/49983/")),
            Some(Err(RouteError::EnvdPort))
        );
        assert_eq!(
            route_path("/v1/sandboxes/nope/ports/80/"),
            Some(Err(RouteError::BadSandboxId))
        );
    }

    #[test]
    fn fuzz_corpus_replays() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/port_route");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).expect("corpus directory") {
            fuzz_route(&std::fs::read(e.unwrap().path()).unwrap());
            n += 1;
        }
        assert!(n > 0);
    }
}
