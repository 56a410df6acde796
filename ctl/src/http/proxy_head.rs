//! The heads a port-exposure proxy writes: the request it sends into the sandbox and the
//! response it gives back to the client. Pure functions, fuzzed (`proxy_head`).
//!
//! Into the sandbox: the client's method, the sandbox-side target ([`super::port_route`]), and
//! its headers minus credentials (`X-API-Key`, `wrenn-traffic-access-token`) and hop-by-hop
//! headers (RFC 9110 §7.6.1, plus any the client lists in `Connection`); `Connection: close`
//! (one request per stream) unless the client asks for a WebSocket upgrade, whose `Upgrade`
//! and `Connection: Upgrade` are kept. The body's framing headers pass unchanged: the body
//! goes through as it came.
//!
//! Back to the client: the sandbox's status and headers, each `Set-Cookie` without a
//! `Domain` attribute (a cookie then belongs to the sandbox port's own host name only, never
//! to the traffic domain or the API's), hop-by-hop headers dropped, `Connection: close`
//! unless it is a `101 Switching Protocols`.

use proto::http::{EncodeError, RequestHead, ResponseHead, HTTP_HEADERS_MAX};

/// Headers copied into a rewritten head: room for the two we add, so the head still parses
/// under [`HTTP_HEADERS_MAX`] (the input had at most that many).
const COPIED_HEADERS_MAX: usize = HTTP_HEADERS_MAX - 2;

/// The header carrying a sandbox's traffic access token.
pub const TRAFFIC_TOKEN_HEADER: &str = "wrenn-traffic-access-token";

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1).
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "upgrade",
];

/// Also accepted (and stripped) for the traffic token.
pub const TRAFFIC_TOKEN_HEADER_ALT: &str = "x-wrenn-traffic-token";

/// The query parameter a link to a sandbox port may carry the traffic token in (host form
/// only): a browser cannot send a header, so ctl answers such a GET with a redirect to the
/// same URL without it that sets [`TRAFFIC_COOKIE`].
pub const TRAFFIC_TOKEN_PARAM: &str = "wrenn_traffic_token";
/// The cookie carrying the traffic token on later requests (host form only): `HttpOnly`,
/// `SameSite=Lax`, `Secure` on TLS, no `Domain` (so it belongs to that sandbox port's host
/// name alone). Removed from the `Cookie` header before a request reaches the sandbox.
pub const TRAFFIC_COOKIE: &str = "wrenn_traffic_token";
/// Longest value taken from the query or a cookie as a token (ours are 68 characters).
const TOKEN_LEN_MAX: usize = 256;

/// The traffic token in `query` (its first [`TRAFFIC_TOKEN_PARAM`]) and the query without
/// any occurrence of that parameter.
pub fn query_token(query: &str) -> (Option<&str>, String) {
    let mut token = None;
    let mut kept: Vec<&str> = Vec::new();
    for pair in query.split('&') {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        if name == TRAFFIC_TOKEN_PARAM {
            if token.is_none() && !value.is_empty() && value.len() <= TOKEN_LEN_MAX {
                token = Some(value);
            }
            continue;
        }
        if !pair.is_empty() {
            kept.push(pair);
        }
    }
    (token, kept.join("&"))
}

/// `target` (path and query) without the [`TRAFFIC_TOKEN_PARAM`] parameter.
pub fn target_without_token(target: &str) -> String {
    match target.split_once('?') {
        Some((path, query)) => {
            let (_, rest) = query_token(query);
            if rest.is_empty() {
                path.to_owned()
            } else {
                format!("{path}?{rest}")
            }
        }
        None => target.to_owned(),
    }
}

/// The pairs of one `Cookie` header value (RFC 6265 §5.4: `name=value; name=value`).
fn cookie_pairs(value: &str) -> impl Iterator<Item = (&str, &str)> {
    value
        .split(';')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| p.split_once('=').unwrap_or((p, "")))
}

/// The traffic token in the request's `Cookie` headers ([`TRAFFIC_COOKIE`]).
pub fn cookie_token(head: &RequestHead) -> Option<&str> {
    head.headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("cookie"))
        .filter_map(|(_, v)| std::str::from_utf8(v).ok())
        .flat_map(cookie_pairs)
        .find(|(n, v)| *n == TRAFFIC_COOKIE && !v.is_empty() && v.len() <= TOKEN_LEN_MAX)
        .map(|(_, v)| v.trim_matches('"'))
}

/// A `Cookie` header value without [`TRAFFIC_COOKIE`]; `None` when nothing else is left.
fn cookie_without_token(value: &str) -> Option<String> {
    let kept: Vec<&str> = value
        .split(';')
        .map(str::trim)
        .filter(|p| !p.is_empty() && p.split('=').next() != Some(TRAFFIC_COOKIE))
        .collect();
    (!kept.is_empty()).then(|| kept.join("; "))
}

/// The `Set-Cookie` value that keeps `token` for a sandbox port's host name.
pub fn token_cookie(token: &str, secure: bool) -> String {
    format!(
        "{TRAFFIC_COOKIE}={token}; Path=/; HttpOnly; SameSite=Lax{}",
        if secure { "; Secure" } else { "" }
    )
}

/// Credentials of ours that never reach a sandbox.
const CREDENTIALS: &[&str] = &["x-api-key", TRAFFIC_TOKEN_HEADER, TRAFFIC_TOKEN_HEADER_ALT];

/// The header names `Connection` lists (lower-case).
fn connection_listed(headers: &[(String, Vec<u8>)]) -> Vec<String> {
    headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("connection"))
        .filter_map(|(_, v)| std::str::from_utf8(v).ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect()
}

/// Whether the request asks for a WebSocket upgrade.
pub fn is_websocket(head: &RequestHead) -> bool {
    let upgrade = head
        .header("upgrade")
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("websocket"));
    upgrade
        && connection_listed(&head.headers)
            .iter()
            .any(|t| t == "upgrade")
}

/// Whether the client's connection may carry more requests through the proxy: HTTP/1.1,
/// no `Connection: close`, not a WebSocket upgrade (whose connection becomes a byte stream).
pub fn keeps_alive(head: &RequestHead) -> bool {
    head.version == 1 && head.keep_alive && !is_websocket(head)
}

/// The request head sent into the sandbox for `head`, with `target` (path and query as the
/// sandbox sees them).
pub fn upstream_request(head: &RequestHead, target: &str) -> Result<Vec<u8>, EncodeError> {
    let listed = connection_listed(&head.headers);
    let ws = is_websocket(head);
    let mut cookies: Vec<(usize, String)> = Vec::new();
    let mut out: Vec<(&str, &str)> = Vec::with_capacity(head.headers.len() + 2);
    for (name, value) in &head.headers {
        let lower = name.to_ascii_lowercase();
        if CREDENTIALS.contains(&lower.as_str())
            || HOP_BY_HOP.contains(&lower.as_str())
            || listed.contains(&lower)
        {
            continue;
        }
        let Ok(v) = std::str::from_utf8(value) else {
            continue; // not text: dropped rather than re-encoded
        };
        if out.len() < COPIED_HEADERS_MAX {
            if lower == "cookie" {
                // Our token cookie stays here; the sandbox's own cookies go on.
                if let Some(c) = cookie_without_token(v) {
                    cookies.push((out.len(), c));
                    out.push((name, ""));
                }
                continue;
            }
            out.push((name, v));
        }
    }
    for (i, c) in &cookies {
        out[*i].1 = c.as_str();
    }
    if ws {
        out.push(("Connection", "Upgrade"));
        out.push(("Upgrade", "websocket"));
    } else if !keeps_alive(head) {
        out.push(("Connection", "close"));
    }
    proto::http::request_head(&head.method, target, &out, None)
}

/// `value` of a `Set-Cookie` without its `Domain` attribute(s).
pub fn strip_cookie_domain(value: &str) -> String {
    let mut parts = value.split(';');
    let mut out = parts.next().unwrap_or("").to_owned();
    for attr in parts {
        let name = attr.split('=').next().unwrap_or("").trim();
        if name.eq_ignore_ascii_case("domain") {
            continue;
        }
        out.push(';');
        out.push_str(attr);
    }
    out
}

/// The response head sent to the client for the sandbox's `head`; `keep_alive`: the
/// connection carries another request after this answer (no `Connection: close`).
pub fn downstream_response(head: &ResponseHead, keep_alive: bool) -> Vec<u8> {
    let listed = connection_listed(&head.headers);
    let switching = head.status == 101;
    let mut h = format!(
        "HTTP/1.1 {} {}\r\n",
        head.status,
        proto::http::reason(head.status)
    );
    for (name, value) in head.headers.iter().take(COPIED_HEADERS_MAX) {
        let lower = name.to_ascii_lowercase();
        let keep_for_101 = switching && (lower == "upgrade");
        if (HOP_BY_HOP.contains(&lower.as_str()) || listed.contains(&lower)) && !keep_for_101 {
            continue;
        }
        let Ok(v) = std::str::from_utf8(value) else {
            continue;
        };
        if v.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0) {
            continue;
        }
        let v = if lower == "set-cookie" {
            strip_cookie_domain(v)
        } else {
            v.to_owned()
        };
        h.push_str(name);
        h.push_str(": ");
        h.push_str(&v);
        h.push_str("\r\n");
    }
    h.push_str(if switching {
        "Connection: Upgrade\r\n\r\n"
    } else if keep_alive {
        "\r\n"
    } else {
        "Connection: close\r\n\r\n"
    });
    h.into_bytes()
}

/// Fuzz entry: the bytes as a client's request head and as a sandbox's response head; every
/// rewritten head parses again and carries no credential and no cookie domain.
pub fn fuzz_heads(data: &[u8]) {
    if let Ok(Some((head, _))) = proto::http::parse_request_head(data, data.len()) {
        if let Ok(up) = upstream_request(&head, "/x") {
            let (again, _) = proto::http::parse_request_head(&up, up.len())
                .expect("our head parses")
                .expect("complete");
            assert!(again.header("x-api-key").is_none());
            assert!(again.header(TRAFFIC_TOKEN_HEADER).is_none());
            for (n, v) in &again.headers {
                if n.eq_ignore_ascii_case("cookie") {
                    let v = String::from_utf8_lossy(v);
                    assert!(cookie_pairs(&v).all(|(n, _)| n != TRAFFIC_COOKIE), "{v}");
                }
            }
        }
        let _ = cookie_token(&head);
        let target = format!("{}?{}", head.path, head.query);
        let clean = target_without_token(&target);
        assert!(!clean.split_once('?').is_some_and(|(_, q)| q
            .split('&')
            .any(|p| p.split('=').next() == Some(TRAFFIC_TOKEN_PARAM))));
    }
    if let Ok(Some((head, _))) = proto::http::parse_response_head(data, data.len(), false) {
        let down = downstream_response(&head, data.len() % 2 == 0);
        let (again, _) = proto::http::parse_response_head(&down, down.len(), false)
            .expect("our head parses")
            .expect("complete");
        for (n, v) in &again.headers {
            if n.eq_ignore_ascii_case("set-cookie") {
                let v = String::from_utf8_lossy(v).to_ascii_lowercase();
                assert!(!v
                    .split(';')
                    .skip(1)
                    .any(|a| a.split('=').next().unwrap_or("").trim() == "domain"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(text: &str) -> RequestHead {
        proto::http::parse_request_head(text.as_bytes(), 16384)
            .unwrap()
            .unwrap()
            .0
    }

    fn resp(text: &str) -> ResponseHead {
        proto::http::parse_response_head(text.as_bytes(), 16384, false)
            .unwrap()
            .unwrap()
            .0
    }

    #[test]
    fn request_loses_credentials_and_hop_by_hop_headers() {
        let h = req("POST /v1/sandboxes/sb-x/ports/80/api?q=1 HTTP/1.1\r\nHost: api.example\r\n\
             X-API-Key: wrn_secret\r\nwrenn-traffic-access-token: tok\r\nX-Wrenn-Traffic-Token: alt\r\nConnection: keep-alive, X-Private\r\n\
             X-Private: 1\r\nKeep-Alive: timeout=5\r\nContent-Length: 3\r\nCookie: a=b\r\n\r\n");
        let up = String::from_utf8(upstream_request(&h, "/api?q=1").unwrap()).unwrap();
        assert!(up.starts_with("POST /api?q=1 HTTP/1.1\r\n"), "{up}");
        for gone in ["wrn_secret", "tok\r", "alt\r", "X-Private", "Keep-Alive"] {
            assert!(!up.contains(gone), "{gone} in {up}");
        }
        for kept in ["Host: api.example", "Content-Length: 3", "Cookie: a=b"] {
            assert!(up.contains(kept), "{kept} missing in {up}");
        }
        // Kept alive (HTTP/1.1, no close): no Connection header of ours.
        assert!(!up.contains("Connection"), "{up}");
        let h = req("GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n");
        let up = String::from_utf8(upstream_request(&h, "/").unwrap()).unwrap();
        assert!(up.contains("Connection: close\r\n"), "{up}");
        let h = req("GET / HTTP/1.0\r\nHost: h\r\n\r\n");
        let up = String::from_utf8(upstream_request(&h, "/").unwrap()).unwrap();
        assert!(up.contains("Connection: close\r\n"), "{up}");
    }

    #[test]
    fn websocket_upgrades_pass() {
        let h = req(
            "GET /ws HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: abc\r\nSec-WebSocket-Version: 13\r\n\r\n",
        );
        assert!(is_websocket(&h));
        let up = String::from_utf8(upstream_request(&h, "/ws").unwrap()).unwrap();
        assert!(
            up.contains("Connection: Upgrade\r\nUpgrade: websocket\r\n"),
            "{up}"
        );
        assert!(up.contains("Sec-WebSocket-Key: abc"));
        assert!(!up.contains("Connection: close"));
        let r = resp(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: xyz\r\n\r\n",
        );
        let down = String::from_utf8(downstream_response(&r, false)).unwrap();
        assert!(down.starts_with("HTTP/1.1 101 "));
        assert!(down.contains("Upgrade: websocket") && down.contains("Connection: Upgrade"));
        assert!(!is_websocket(&req(
            "GET / HTTP/1.1\r\nUpgrade: websocket\r\n\r\n"
        )));
    }

    #[test]
    fn cookies_lose_their_domain() {
        assert_eq!(
            strip_cookie_domain("sid=1; Path=/; Domain=.wrenn.example; HttpOnly"),
            "sid=1; Path=/; HttpOnly"
        );
        assert_eq!(strip_cookie_domain("a=b;domain=x;DOMAIN = y"), "a=b");
        assert_eq!(strip_cookie_domain("a=domain"), "a=domain");
        let r = resp(
            "HTTP/1.1 200 OK\r\nSet-Cookie: s=1; Domain=api.example; Secure\r\n\
             Set-Cookie: t=2\r\nKeep-Alive: x\r\nContent-Length: 0\r\n\r\n",
        );
        let down = String::from_utf8(downstream_response(&r, false)).unwrap();
        assert!(down.contains("Set-Cookie: s=1; Secure\r\n"), "{down}");
        assert!(down.contains("Set-Cookie: t=2\r\n"));
        assert!(!down.contains("Keep-Alive") && down.contains("Connection: close"));
        assert!(!down.to_ascii_lowercase().contains("domain"));
    }

    /// Seeded mutations of the corpus through the fuzz body (`WRENN_SEED` replays).
    #[test]
    fn mutated_heads_keep_the_invariants() {
        let seed: u64 = std::env::var("WRENN_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0x9e37_79b9);
        println!("seed {seed}");
        let mut x = seed | 1;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/proxy_head");
        let seeds: Vec<Vec<u8>> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| std::fs::read(e.unwrap().path()).unwrap())
            .collect();
        let alphabet = b"\r\n:;= ,aA-Domain";
        for _ in 0..20_000 {
            let mut m = seeds[(next() as usize) % seeds.len()].clone();
            for _ in 0..(next() % 4 + 1) {
                let at = (next() as usize) % m.len();
                m[at] = alphabet[(next() as usize) % alphabet.len()];
            }
            fuzz_heads(&m);
        }
    }

    #[test]
    fn token_in_query_and_cookie() {
        assert_eq!(
            query_token("a=1&wrenn_traffic_token=wtt_x&b=2&wrenn_traffic_token=wtt_y"),
            (Some("wtt_x"), "a=1&b=2".to_owned())
        );
        assert_eq!(query_token("wrenn_traffic_token="), (None, String::new()));
        assert_eq!(query_token("a"), (None, "a".to_owned()));
        assert_eq!(target_without_token("/p?wrenn_traffic_token=t"), "/p");
        assert_eq!(target_without_token("/p?x&wrenn_traffic_token=t"), "/p?x");
        assert_eq!(target_without_token("/p"), "/p");
        let h = req("GET / HTTP/1.1\r\nCookie: a=1; wrenn_traffic_token=wtt_c; b\r\n\r\n");
        assert_eq!(cookie_token(&h), Some("wtt_c"));
        let up = String::from_utf8(upstream_request(&h, "/").unwrap()).unwrap();
        assert!(up.contains("Cookie: a=1; b\r\n"), "{up}");
        let h = req("GET / HTTP/1.1\r\nCookie: wrenn_traffic_token=wtt_c\r\nCookie: z=9\r\n\r\n");
        let up = String::from_utf8(upstream_request(&h, "/").unwrap()).unwrap();
        assert!(
            !up.contains("wtt_c") && up.contains("Cookie: z=9\r\n"),
            "{up}"
        );
        assert_eq!(
            token_cookie("wtt_c", true),
            "wrenn_traffic_token=wtt_c; Path=/; HttpOnly; SameSite=Lax; Secure"
        );
    }

    #[test]
    fn fuzz_corpus_replays() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/proxy_head");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).expect("corpus directory") {
            fuzz_heads(&std::fs::read(e.unwrap().path()).unwrap());
            n += 1;
        }
        assert!(n > 0);
    }
}
