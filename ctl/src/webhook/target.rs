//! Where a webhook delivery goes: the URL (a strict parser, fuzzed), the address checks
//! against server-side request forgery, and the connect that applies them.
//!
//! A URL is `http://host[:port][/path][?query]`, printable ASCII, no user info, no
//! fragment. `https` is refused until ctl has a TLS client (the TLS work adds one); nothing
//! pretends to deliver over TLS.
//!
//! The address check runs at connect time on every address the name resolves to — not at
//! registration only — so a name that later resolves to 127.0.0.1 (DNS rebinding) is still
//! refused. Loopback, unspecified, private (RFC 1918, IPv6 unique-local), link-local (the
//! cloud metadata service lives there), shared (100.64/10), multicast, broadcast and
//! reserved addresses, and IPv6 forms embedding an IPv4 address (mapped, NAT64) are refused
//! unless the operator allows private targets (`--webhook-allow-private`).

use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use crate::limits::WEBHOOK_URL_LEN_MAX;

/// A parsed delivery URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Url {
    /// A DNS name or an IP literal (IPv6 without brackets).
    pub host: String,
    pub port: u16,
    /// Path and query, starting with `/`.
    pub target: String,
}

/// Why a URL was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UrlError {
    TooLong {
        len: usize,
    },
    /// Control characters, spaces or non-ASCII.
    BadCharacter,
    /// `https://`: no TLS client yet.
    Https,
    /// Not `http://`.
    Scheme,
    UserInfo,
    Fragment,
    Host,
    Port,
}

impl fmt::Display for UrlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UrlError::TooLong { len } => {
                write!(f, "url is {len} bytes, longer than {WEBHOOK_URL_LEN_MAX}")
            }
            UrlError::BadCharacter => {
                f.write_str("url may hold printable ASCII only (percent-encode the rest)")
            }
            UrlError::Https => f.write_str(
                "https webhook urls need ctl's TLS client, which this build does not have; use http on a trusted network",
            ),
            UrlError::Scheme => f.write_str("url must start with http://"),
            UrlError::UserInfo => f.write_str("url must not carry user info (user@host)"),
            UrlError::Fragment => f.write_str("url must not carry a fragment (#...)"),
            UrlError::Host => f.write_str("url has no valid host"),
            UrlError::Port => f.write_str("url port must be 1-65535"),
        }
    }
}

impl std::error::Error for UrlError {}

/// Parses a delivery URL strictly.
pub fn parse_url(s: &str) -> Result<Url, UrlError> {
    if s.len() > WEBHOOK_URL_LEN_MAX {
        return Err(UrlError::TooLong { len: s.len() });
    }
    if !s.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(UrlError::BadCharacter);
    }
    let lower = s.get(..8).unwrap_or(s).to_ascii_lowercase();
    let rest = if lower.starts_with("http://") {
        &s[7..]
    } else if lower.starts_with("https://") {
        return Err(UrlError::Https);
    } else {
        return Err(UrlError::Scheme);
    };
    if s.contains('#') {
        return Err(UrlError::Fragment);
    }
    let split = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(split);
    if authority.contains('@') {
        return Err(UrlError::UserInfo);
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, after) = v6.split_once(']').ok_or(UrlError::Host)?;
        let ip: Ipv6Addr = h.parse().map_err(|_| UrlError::Host)?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or(UrlError::Host)?),
        };
        (ip.to_string(), port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_owned(), Some(p)),
            None => (authority.to_owned(), None),
        }
    };
    let port = match port {
        None => 80,
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|&n| n != 0 && !p.starts_with('+'))
            .ok_or(UrlError::Port)?,
    };
    let host_ok = !host.is_empty()
        && host.len() <= 253
        && (host.parse::<IpAddr>().is_ok()
            || host.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            }));
    if !host_ok {
        return Err(UrlError::Host);
    }
    let target = match tail {
        "" => "/".to_owned(),
        t if t.starts_with('?') => format!("/{t}"),
        t => t.to_owned(),
    };
    Ok(Url {
        host: host.to_ascii_lowercase(),
        port,
        target,
    })
}

/// Fuzz entry point (`fuzz/fuzz_targets/webhook_url.rs`): any bytes never panic; what
/// parses has a host, a port and a target that a request line accepts.
pub fn fuzz_parse_url(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(u) = parse_url(s) {
        assert!(!u.host.is_empty());
        assert!(u.port != 0);
        assert!(u.target.starts_with('/'));
        assert!(
            proto::http::request_head("POST", &u.target, &[("Host", &u.host)], Some(0)).is_ok()
        );
    }
}

/// Why an address may not be delivered to ("" when it may).
pub fn forbidden(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => forbidden_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return forbidden_v4(v4);
            }
            let s = v6.segments();
            if v6.is_loopback() {
                Some("loopback")
            } else if v6.is_unspecified() {
                Some("unspecified")
            } else if s[0] & 0xfe00 == 0xfc00 {
                Some("private (unique local)")
            } else if s[0] & 0xffc0 == 0xfe80 || s[0] & 0xffc0 == 0xfec0 {
                Some("link-local")
            } else if s[0] & 0xff00 == 0xff00 {
                Some("multicast")
            } else if s[0] == 0x64 && s[1] == 0xff9b {
                // NAT64: the IPv4 address in the last 32 bits.
                let v4 =
                    Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
                forbidden_v4(v4)
            } else if s[0] == 0 && s[1] == 0 && s[2] == 0 && s[3] == 0 && s[4] == 0 && s[5] == 0 {
                // IPv4-compatible (deprecated) ::a.b.c.d.
                Some("IPv4-compatible")
            } else {
                None
            }
        }
    }
}

fn forbidden_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let o = ip.octets();
    if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_unspecified() || o[0] == 0 {
        Some("unspecified")
    } else if ip.is_private() {
        Some("private")
    } else if ip.is_link_local() {
        Some("link-local")
    } else if o[0] == 100 && o[1] & 0xc0 == 64 {
        Some("shared (carrier-grade NAT)")
    } else if ip.is_broadcast() {
        Some("broadcast")
    } else if ip.is_multicast() {
        Some("multicast")
    } else if o[0] >= 240 {
        Some("reserved")
    } else if o[0] == 192 && o[1] == 0 && o[2] == 0 {
        Some("reserved (IETF protocol assignments)")
    } else {
        None
    }
}

/// Why a connection could not be made.
#[derive(Debug)]
pub enum ConnectError {
    Resolve {
        host: String,
        source: io::Error,
    },
    /// Every address the host resolved to is refused.
    Forbidden {
        addr: IpAddr,
        why: &'static str,
    },
    Connect {
        addr: SocketAddr,
        source: io::Error,
    },
    TimedOut,
}

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnectError::Resolve { host, source } => write!(f, "resolve {host}: {source}"),
            ConnectError::Forbidden { addr, why } => write!(
                f,
                "refused to deliver to {addr}: {why} address (the operator may allow private targets)"
            ),
            ConnectError::Connect { addr, source } => write!(f, "connect to {addr}: {source}"),
            ConnectError::TimedOut => f.write_str("connect timed out"),
        }
    }
}

impl std::error::Error for ConnectError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ConnectError::Resolve { source, .. } | ConnectError::Connect { source, .. } => {
                Some(source)
            }
            _ => None,
        }
    }
}

/// Resolves `url`'s host and connects to the first allowed address that answers before
/// `deadline`; each address is checked right before its connect.
pub fn connect(
    url: &Url,
    allow_private: bool,
    deadline: Instant,
) -> Result<TcpStream, ConnectError> {
    let addrs: Vec<SocketAddr> = (url.host.as_str(), url.port)
        .to_socket_addrs()
        .map_err(|source| ConnectError::Resolve {
            host: url.host.clone(),
            source,
        })?
        .collect();
    let mut last = None;
    for addr in addrs {
        if !allow_private {
            if let Some(why) = forbidden(addr.ip()) {
                last.get_or_insert(ConnectError::Forbidden {
                    addr: addr.ip(),
                    why,
                });
                continue;
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left < Duration::from_millis(1) {
            return Err(ConnectError::TimedOut);
        }
        match TcpStream::connect_timeout(&addr, left) {
            Ok(s) => return Ok(s),
            Err(source) => last = Some(ConnectError::Connect { addr, source }),
        }
    }
    Err(last.unwrap_or(ConnectError::Resolve {
        host: url.host.clone(),
        source: io::Error::new(io::ErrorKind::NotFound, "no addresses"),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_strictly() {
        let u = parse_url("http://Example.com:8080/hook?x=1").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.target.as_str()),
            ("example.com", 8080, "/hook?x=1")
        );
        let u = parse_url("http://10.0.0.1").unwrap();
        assert_eq!((u.port, u.target.as_str()), (80, "/"));
        let u = parse_url("http://[::1]:9/x").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("::1", 9));
        assert_eq!(parse_url("http://h?q").unwrap().target, "/?q");
        assert_eq!(parse_url("https://x/"), Err(UrlError::Https));
        assert_eq!(parse_url("ftp://x/"), Err(UrlError::Scheme));
        assert_eq!(parse_url("http://u:p@x/"), Err(UrlError::UserInfo));
        assert_eq!(parse_url("http://x/#f"), Err(UrlError::Fragment));
        assert_eq!(parse_url("http://x:0/"), Err(UrlError::Port));
        assert_eq!(parse_url("http://x:99999/"), Err(UrlError::Port));
        assert_eq!(parse_url("http://x:+80/"), Err(UrlError::Port));
        assert_eq!(parse_url("http:///p"), Err(UrlError::Host));
        assert_eq!(parse_url("http://a..b/"), Err(UrlError::Host));
        assert_eq!(parse_url("http://[zz]/"), Err(UrlError::Host));
        assert_eq!(parse_url("http://x/ y"), Err(UrlError::BadCharacter));
        assert_eq!(parse_url("http://x/\r\nX: y"), Err(UrlError::BadCharacter));
        let long = format!("http://x/{}", "a".repeat(WEBHOOK_URL_LEN_MAX));
        assert!(matches!(parse_url(&long), Err(UrlError::TooLong { .. })));
    }

    #[test]
    fn private_and_special_addresses_are_forbidden() {
        for a in [
            "127.0.0.1",
            "0.0.0.0",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "255.255.255.255",
            "224.0.0.1",
            "240.0.0.1",
            "192.0.0.1",
            "::1",
            "::",
            "fd00::1",
            "fe80::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::a9fe:a9fe",
            "::127.0.0.1",
        ] {
            assert!(forbidden(a.parse().unwrap()).is_some(), "{a} allowed");
        }
        for a in [
            "93.184.216.34",
            "8.8.8.8",
            "172.32.0.1",
            "2606:4700::1111",
            "64:ff9b::808:808",
        ] {
            assert_eq!(forbidden(a.parse().unwrap()), None, "{a} refused");
        }
    }

    #[test]
    fn connect_refuses_loopback_unless_allowed() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let url = parse_url(&format!("http://localhost:{port}/")).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let e = connect(&url, false, deadline).unwrap_err();
        assert!(matches!(e, ConnectError::Forbidden { .. }), "{e}");
        assert!(e.to_string().contains("loopback"), "{e}");
        let url = parse_url(&format!("http://127.0.0.1:{port}/")).unwrap();
        assert!(connect(&url, true, deadline).is_ok());
    }

    #[test]
    fn corpus_replays() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/webhook_url");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).unwrap() {
            fuzz_parse_url(&std::fs::read(e.unwrap().path()).unwrap());
            n += 1;
        }
        assert!(n > 0, "corpus {} is empty", dir.display());
    }
}
