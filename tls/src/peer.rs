//! What ctl reads from a peer's certificate after rustls verified it: its serial number
//! (what a revocation names) and whether it names a given host id.
//!
//! The serial is read by a minimal DER walk (rustls and webpki do not expose it): the
//! certificate's outer SEQUENCE, the `tbsCertificate` SEQUENCE, an optional `[0]` version,
//! then the serial INTEGER. It only ever sees certificates the handshake already checked
//! against the CA, but it is written (and fuzzed, `fuzz_targets/cert_serial.rs`) as a
//! parser of outside bytes: every length is checked, nothing panics.

use rustls::pki_types::{CertificateDer, ServerName};

/// Longest serial number RFC 5280 allows (20 octets); ours are 16.
pub const SERIAL_LEN_MAX: usize = 20;

/// Splits one DER element with tag `tag` off the front of `der`: (its contents, the rest).
fn element(der: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (&t, rest) = der.split_first()?;
    if t != tag {
        return None;
    }
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        // Certificates are far below 4 GiB; 0 (indefinite) is not DER.
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let (len_bytes, rest) = rest.split_at(n);
        let len = len_bytes
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        (len, rest)
    };
    if rest.len() < len {
        return None;
    }
    Some(rest.split_at(len))
}

/// The serial number of a DER certificate (the INTEGER's content octets, big-endian, as
/// ctl stores it), or `None` when the bytes are not a certificate's start.
pub fn cert_serial(der: &[u8]) -> Option<Vec<u8>> {
    const SEQUENCE: u8 = 0x30;
    const VERSION: u8 = 0xa0;
    const INTEGER: u8 = 0x02;
    let (cert, _) = element(der, SEQUENCE)?;
    let (tbs, _) = element(cert, SEQUENCE)?;
    let tbs = match element(tbs, VERSION) {
        Some((_, rest)) => rest,
        None => tbs,
    };
    let (serial, _) = element(tbs, INTEGER)?;
    if serial.is_empty() || serial.len() > SERIAL_LEN_MAX + 1 {
        return None;
    }
    Some(serial.to_vec())
}

/// Whether a (verified) certificate names `name` (a DNS name such as `host-{uuid}`) in its
/// subject alternative names.
pub fn cert_names(der: &[u8], name: &str) -> bool {
    let Ok(server_name) = ServerName::try_from(name) else {
        return false;
    };
    let der = CertificateDer::from(der);
    match rustls::server::ParsedCertificate::try_from(&der) {
        Ok(parsed) => rustls::client::verify_server_name(&parsed, &server_name).is_ok(),
        Err(_) => false,
    }
}

/// Fuzz entry point (`fuzz/fuzz_targets/cert_serial.rs`): never panics; a serial found is
/// within bounds.
pub fn fuzz_cert_serial(data: &[u8]) {
    if let Some(s) = cert_serial(data) {
        assert!(!s.is_empty() && s.len() <= SERIAL_LEN_MAX + 1);
    }
    let _ = cert_names(data, "host-00000000-0000-0000-0000-000000000000");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serials_and_names_are_read_from_a_generated_certificate() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["host-abc".to_owned()]).unwrap();
        let serial = [0x51, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16];
        params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
        let cert = params.self_signed(&key).unwrap();
        assert_eq!(cert_serial(cert.der()).as_deref(), Some(&serial[..]));
        assert!(cert_names(cert.der(), "host-abc"));
        assert!(!cert_names(cert.der(), "host-abd"));
        // Every truncation is refused without a panic.
        for n in 0..cert.der().len() {
            let _ = cert_serial(&cert.der()[..n]);
        }
        assert_eq!(cert_serial(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]), None);
        assert_eq!(cert_serial(b""), None);
    }
}
