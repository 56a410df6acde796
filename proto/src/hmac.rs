//! HMAC-SHA256 (RFC 2104) over [`crate::sha256`]: the signature of webhook deliveries
//! (`Wrenn-Signature`), made by ctl and checked by receivers (and the tests).

use crate::sha256::{self, Sha256};

const BLOCK: usize = 64;

/// HMAC-SHA256 of `msg` under `key`.
pub fn hmac_sha256(key: &[u8], msg: &[u8]) -> [u8; 32] {
    let mut k = [0u8; BLOCK];
    if key.len() > BLOCK {
        k[..32].copy_from_slice(&sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let mut ipad = [0x36u8; BLOCK];
    let mut opad = [0x5cu8; BLOCK];
    for i in 0..BLOCK {
        ipad[i] ^= k[i];
        opad[i] ^= k[i];
    }
    let mut inner = Sha256::new();
    inner.update(&ipad);
    inner.update(msg);
    let inner = inner.finish();
    let mut outer = Sha256::new();
    outer.update(&opad);
    outer.update(&inner);
    outer.finish()
}

/// The `Wrenn-Signature` header value of a delivery: `t=<unix>,v1=<hex HMAC(secret,
/// "<t>.<body>")>`.
pub fn webhook_signature(secret: &str, unix_s: u64, body: &[u8]) -> String {
    let mut msg = format!("{unix_s}.").into_bytes();
    msg.extend_from_slice(body);
    let mac = hmac_sha256(secret.as_bytes(), &msg);
    format!("t={unix_s},v1={}", sha256::hex(&mac))
}

/// Checks a `Wrenn-Signature` header against `body` (constant-time) and returns its time;
/// `None` when malformed or wrong. Receivers should also refuse times far from their clock.
pub fn verify_webhook_signature(secret: &str, header: &str, body: &[u8]) -> Option<u64> {
    let mut t = None;
    let mut v1 = None;
    for part in header.split(',') {
        match part.split_once('=') {
            Some(("t", v)) => t = v.parse::<u64>().ok(),
            Some(("v1", v)) => v1 = Some(v),
            _ => {}
        }
    }
    let t = t?;
    let want = webhook_signature(secret, t, body);
    let got = format!("t={t},v1={}", v1?);
    sha256::constant_time_eq(want.as_bytes(), got.as_bytes()).then_some(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc4231_vectors() {
        // Test case 1.
        let mac = hmac_sha256(&[0x0b; 20], b"Hi There");
        assert_eq!(
            sha256::hex(&mac),
            "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7"
        );
        // Test case 2.
        let mac = hmac_sha256(b"Jefe", b"what do ya want for nothing?");
        assert_eq!(
            sha256::hex(&mac),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        // Test case 6: a key longer than the block.
        let mac = hmac_sha256(
            &[0xaa; 131],
            b"Test Using Larger Than Block-Size Key - Hash Key First",
        );
        assert_eq!(
            sha256::hex(&mac),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
    }

    #[test]
    fn signatures_verify_and_tampering_fails() {
        let h = webhook_signature("whsec_x", 1_700_000_000, b"{\"a\":1}");
        assert!(h.starts_with("t=1700000000,v1="));
        assert_eq!(
            verify_webhook_signature("whsec_x", &h, b"{\"a\":1}"),
            Some(1_700_000_000)
        );
        assert_eq!(verify_webhook_signature("whsec_x", &h, b"{\"a\":2}"), None);
        assert_eq!(verify_webhook_signature("whsec_y", &h, b"{\"a\":1}"), None);
        let moved = h.replace("t=1700000000", "t=1700000001");
        assert_eq!(
            verify_webhook_signature("whsec_x", &moved, b"{\"a\":1}"),
            None
        );
        assert_eq!(verify_webhook_signature("whsec_x", "garbage", b""), None);
    }
}
