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

/// The validity of a DER certificate, `(not_before, not_after)` in seconds since the Unix
/// epoch (the agent's renewal clock), or `None` when it cannot be read.
pub fn cert_validity(der: &[u8]) -> Option<(u64, u64)> {
    const SEQUENCE: u8 = 0x30;
    const VERSION: u8 = 0xa0;
    const INTEGER: u8 = 0x02;
    let (cert, _) = element(der, SEQUENCE)?;
    let (tbs, _) = element(cert, SEQUENCE)?;
    let tbs = match element(tbs, VERSION) {
        Some((_, rest)) => rest,
        None => tbs,
    };
    let (_serial, rest) = element(tbs, INTEGER)?;
    let (_signature_alg, rest) = element(rest, SEQUENCE)?;
    let (_issuer, rest) = element(rest, SEQUENCE)?;
    let (validity, _) = element(rest, SEQUENCE)?;
    let (from, rest) = time(validity)?;
    let (to, _) = time(rest)?;
    Some((from, to))
}

/// One X.509 Time (UTCTime `YYMMDDHHMMSSZ` or GeneralizedTime `YYYYMMDDHHMMSSZ`) off the
/// front of `der`: (seconds since the epoch, the rest).
fn time(der: &[u8]) -> Option<(u64, &[u8])> {
    const UTC_TIME: u8 = 0x17;
    const GENERALIZED_TIME: u8 = 0x18;
    let (year, digits, rest) = if let Some((t, rest)) = element(der, UTC_TIME) {
        let digits = t.strip_suffix(b"Z")?;
        let yy = number(digits.get(..2)?)?;
        // RFC 5280: UTCTime years 50..99 are 19xx, 00..49 are 20xx.
        (
            if yy >= 50 { 1900 + yy } else { 2000 + yy },
            digits.get(2..)?,
            rest,
        )
    } else {
        let (t, rest) = element(der, GENERALIZED_TIME)?;
        let digits = t.strip_suffix(b"Z")?;
        (number(digits.get(..4)?)?, digits.get(4..)?, rest)
    };
    if digits.len() != 10 {
        return None;
    }
    let field = |i: usize| number(&digits[i..i + 2]);
    let (month, day) = (field(0)?, field(2)?);
    let (hour, minute, second) = (field(4)?, field(6)?, field(8)?);
    if !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    let days = days_from_civil(year, month, day)?;
    Some((days * 86_400 + hour * 3600 + minute * 60 + second, rest))
}

fn number(digits: &[u8]) -> Option<u64> {
    digits.iter().try_fold(0u64, |acc, &d| {
        d.is_ascii_digit().then(|| acc * 10 + u64::from(d - b'0'))
    })
}

/// Days from 1970-01-01 to a civil date (Howard Hinnant's algorithm), for years ≥ 1970.
fn days_from_civil(year: u64, month: u64, day: u64) -> Option<u64> {
    if year < 1970 {
        return None;
    }
    let y = if month <= 2 { year - 1 } else { year };
    let era = y / 400;
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    (era * 146_097 + doe).checked_sub(719_468)
}

/// Whether a certificate valid from `not_before` to `not_after` (seconds since the epoch) is
/// due for renewal at `now`: once `num/den` of its lifetime has passed.
pub fn renewal_due(not_before: u64, not_after: u64, now: u64, num: u64, den: u64) -> bool {
    assert!(den > 0 && num <= den, "a fraction of the lifetime");
    let life = not_after.saturating_sub(not_before);
    now >= not_before.saturating_add(life / den * num + life % den * num / den)
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
    let _ = cert_validity(data);
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
        // rcgen's default validity: 1975-01-01 to 4096-01-01 (UTCTime, GeneralizedTime).
        assert_eq!(
            cert_validity(cert.der()),
            Some((157_766_400, 67_090_118_400))
        );
        let mut params = rcgen::CertificateParams::new(vec!["h".to_owned()]).unwrap();
        params.not_before = rcgen::date_time_ymd(2026, 12, 7);
        params.not_after = rcgen::date_time_ymd(2049, 12, 31);
        let dated = params.self_signed(&key).unwrap();
        // Checked against Python's calendar.timegm.
        assert_eq!(
            cert_validity(dated.der()),
            Some((1_796_601_600, 2_524_521_600))
        );
        assert!(cert_names(cert.der(), "host-abc"));
        assert!(!cert_names(cert.der(), "host-abd"));
        // Every truncation is refused without a panic.
        for n in 0..cert.der().len() {
            let _ = cert_serial(&cert.der()[..n]);
        }
        assert_eq!(cert_serial(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]), None);
        assert_eq!(cert_serial(b""), None);
    }

    #[test]
    fn renewal_is_due_at_the_fraction_of_the_lifetime() {
        assert!(!renewal_due(1000, 1900, 1599, 2, 3));
        assert!(renewal_due(1000, 1900, 1600, 2, 3));
        assert!(
            renewal_due(1000, 1000, 1000, 2, 3),
            "an empty lifetime is due at once"
        );
        assert!(!renewal_due(0, u64::MAX, u64::MAX / 2, 2, 3), "no overflow");
    }
}
