//! The host key: the agent makes an Ed25519 key pair (ring) at registration, keeps the
//! private half in its state root, and proves it holds it by signing the registration token.
//! ctl checks the signature and issues a certificate for the public key (no CSR to parse:
//! two fixed-size byte strings). Also the CA pin a registration token carries.
//!
//! A registration token as handed out is `wrr_<64 hex>` or, when ctl issues certificates,
//! `wrr_<64 hex>.<SHA-256 of ctl's CA certificate, 64 hex>`; only the part before the dot is
//! the secret ctl stores (hashed) and the agent signs.

use std::sync::Arc;

use ring::signature::{self, Ed25519KeyPair, KeyPair};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};

/// What the agent signs: this context, then the registration token's secret part. The
/// context keeps the signature from meaning anything anywhere else.
pub const REGISTER_SIGNING_CONTEXT: &[u8] = b"wrenn.host.v1 Register host key\0";
/// An Ed25519 public key: 32 bytes.
pub const PUBLIC_KEY_LEN: usize = 32;
/// An Ed25519 signature: 64 bytes.
pub const SIGNATURE_LEN: usize = 64;
/// Between a registration token's secret and its CA pin.
pub const PIN_SEPARATOR: char = '.';

/// Why a host key, its proof or a pin was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyError {
    /// The public key is not 32 bytes.
    PublicKeyLength(usize),
    /// The signature is not 64 bytes.
    SignatureLength(usize),
    /// The signature does not verify with the public key over the token.
    BadSignature,
    /// The pin after the token's dot is not 64 hex digits.
    BadPin,
    /// The key file could not be read as an Ed25519 PKCS#8 key.
    BadKey(String),
    /// ring could not make a key.
    Generate,
}

impl std::fmt::Display for KeyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeyError::PublicKeyLength(n) => {
                write!(
                    f,
                    "host public key is {n} bytes; an Ed25519 key is {PUBLIC_KEY_LEN}"
                )
            }
            KeyError::SignatureLength(n) => {
                write!(
                    f,
                    "token signature is {n} bytes; an Ed25519 signature is {SIGNATURE_LEN}"
                )
            }
            KeyError::BadSignature => {
                f.write_str("token signature does not verify with the host public key")
            }
            KeyError::BadPin => f.write_str(
                "the registration token's CA pin (after the '.') is not a SHA-256 in hex",
            ),
            KeyError::BadKey(why) => write!(f, "host key: {why}"),
            KeyError::Generate => f.write_str("could not generate a host key"),
        }
    }
}

impl std::error::Error for KeyError {}

/// The bytes signed for `token` (its secret part).
pub fn registration_message(token: &str) -> Vec<u8> {
    let mut m = Vec::with_capacity(REGISTER_SIGNING_CONTEXT.len() + token.len());
    m.extend_from_slice(REGISTER_SIGNING_CONTEXT);
    m.extend_from_slice(token.as_bytes());
    m
}

/// What a RenewCertificate request's signature covers, before the host id.
pub const RENEW_SIGNING_CONTEXT: &[u8] = b"wrenn.host.v1 RenewCertificate host key\0";

/// The bytes signed to renew the certificate of `host_id` ("host-{uuid}").
pub fn renewal_message(host_id: &str) -> Vec<u8> {
    let mut m = Vec::with_capacity(RENEW_SIGNING_CONTEXT.len() + host_id.len());
    m.extend_from_slice(RENEW_SIGNING_CONTEXT);
    m.extend_from_slice(host_id.as_bytes());
    m
}

/// ctl's check of a RenewCertificate request: `signature` by the Ed25519 `public_key` over
/// [`renewal_message`]`(host_id)`.
pub fn verify_renewal(public_key: &[u8], signature: &[u8], host_id: &str) -> Result<(), KeyError> {
    if public_key.len() != PUBLIC_KEY_LEN {
        return Err(KeyError::PublicKeyLength(public_key.len()));
    }
    if signature.len() != SIGNATURE_LEN {
        return Err(KeyError::SignatureLength(signature.len()));
    }
    signature::UnparsedPublicKey::new(&signature::ED25519, public_key)
        .verify(&renewal_message(host_id), signature)
        .map_err(|_| KeyError::BadSignature)
}

/// ctl's check of a Register request's key proof: `public_key` is an Ed25519 key and
/// `signature` is its signature over [`registration_message`]`(token)`.
pub fn verify_registration(
    public_key: &[u8],
    signature: &[u8],
    token: &str,
) -> Result<(), KeyError> {
    if public_key.len() != PUBLIC_KEY_LEN {
        return Err(KeyError::PublicKeyLength(public_key.len()));
    }
    if signature.len() != SIGNATURE_LEN {
        return Err(KeyError::SignatureLength(signature.len()));
    }
    signature::UnparsedPublicKey::new(&signature::ED25519, public_key)
        .verify(&registration_message(token), signature)
        .map_err(|_| KeyError::BadSignature)
}

/// Splits a registration token as handed out into its secret and its CA pin, if any.
pub fn split_pin(token: &str) -> Result<(&str, Option<[u8; 32]>), KeyError> {
    let Some((secret, pin)) = token.split_once(PIN_SEPARATOR) else {
        return Ok((token, None));
    };
    let b = pin.as_bytes();
    if b.len() != 64 {
        return Err(KeyError::BadPin);
    }
    let mut out = [0u8; 32];
    for (i, pair) in b.chunks(2).enumerate() {
        let hex = |c: u8| match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        };
        out[i] =
            (hex(pair[0]).ok_or(KeyError::BadPin)? << 4) | hex(pair[1]).ok_or(KeyError::BadPin)?;
    }
    Ok((secret, Some(out)))
}

/// SHA-256 of a certificate's DER bytes.
pub fn cert_sha256(der: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, der);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// The agent's key pair.
pub struct HostKey {
    pkcs8: Vec<u8>,
    pair: Ed25519KeyPair,
}

impl std::fmt::Debug for HostKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HostKey")
    }
}

impl HostKey {
    /// A fresh key from the system's random source.
    pub fn generate() -> Result<HostKey, KeyError> {
        let rng = ring::rand::SystemRandom::new();
        let doc = Ed25519KeyPair::generate_pkcs8(&rng).map_err(|_| KeyError::Generate)?;
        HostKey::from_pkcs8(doc.as_ref())
    }

    /// From PKCS#8 DER.
    pub fn from_pkcs8(der: &[u8]) -> Result<HostKey, KeyError> {
        let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(der)
            .map_err(|e| KeyError::BadKey(e.to_string()))?;
        Ok(HostKey {
            pkcs8: der.to_vec(),
            pair,
        })
    }

    /// From a `PRIVATE KEY` PEM file's text.
    pub fn from_pem(pem: &[u8]) -> Result<HostKey, KeyError> {
        match crate::key_from_pem(pem, "host key").map_err(|e| KeyError::BadKey(e.to_string()))? {
            rustls::pki_types::PrivateKeyDer::Pkcs8(k) => HostKey::from_pkcs8(k.secret_pkcs8_der()),
            _ => Err(KeyError::BadKey("not a PKCS#8 key".into())),
        }
    }

    /// PEM (`PRIVATE KEY`, PKCS#8): what the agent stores, mode 0600.
    pub fn to_pem(&self) -> String {
        pem("PRIVATE KEY", &self.pkcs8)
    }

    /// The raw public key (what Register carries).
    pub fn public_key(&self) -> &[u8] {
        self.pair.public_key().as_ref()
    }

    /// The proof for RenewCertificate: a signature over [`renewal_message`]`(host_id)`.
    pub fn sign_renewal(&self, host_id: &str) -> Vec<u8> {
        self.pair.sign(&renewal_message(host_id)).as_ref().to_vec()
    }

    /// The proof for Register: a signature over [`registration_message`]`(token)`.
    pub fn sign_token(&self, token: &str) -> Vec<u8> {
        self.pair
            .sign(&registration_message(token))
            .as_ref()
            .to_vec()
    }
}

/// PEM text of one DER object.
pub fn pem(label: &str, der: &[u8]) -> String {
    let b64 = proto::base64::encode(der);
    let mut s = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        s.push_str(std::str::from_utf8(line).unwrap_or(""));
        s.push('\n');
    }
    s.push_str(&format!("-----END {label}-----\n"));
    s
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

/// A server verifier for the agent's first connection: the server's chain (or the CA
/// bundle the agent was given) must hold a certificate whose SHA-256 is the token's pin,
/// and the server's certificate must chain to it and carry the name dialled.
#[derive(Debug)]
struct PinnedCa {
    pin: [u8; 32],
    extra: Vec<CertificateDer<'static>>,
}

impl PinnedCa {
    fn root<'a>(
        &'a self,
        intermediates: &'a [CertificateDer<'a>],
    ) -> Option<&'a CertificateDer<'a>> {
        intermediates
            .iter()
            .chain(self.extra.iter())
            .find(|c| cert_sha256(c.as_ref()) == self.pin)
    }
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(root) = self.root(intermediates) else {
            return Err(rustls::Error::General(format!(
                "ctl's CA does not match the registration token's pin (sha256 {}): \
                 refusing to register with it",
                hex(&self.pin)
            )));
        };
        let mut roots = RootCertStore::empty();
        roots
            .add(root.clone().into_owned())
            .map_err(|e| rustls::Error::General(format!("pinned CA: {e}")))?;
        let v = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            crate::config::provider(),
        )
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
        // The pinned CA is the trust anchor: it is not passed again as an intermediate.
        let rest: Vec<CertificateDer<'_>> = intermediates
            .iter()
            .filter(|c| cert_sha256(c.as_ref()) != self.pin)
            .cloned()
            .collect();
        v.verify_server_cert(end_entity, &rest, server_name, ocsp, now)
            .map_err(|e| {
                rustls::Error::General(format!(
                    "ctl's certificate does not chain to the CA the registration token pins \
                     (sha256 {}): {e}",
                    hex(&self.pin)
                ))
            })
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &crate::config::provider().signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &crate::config::provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        crate::config::provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A client configuration for the agent's registration: trusts only a CA whose SHA-256 is
/// `pin`, found in the server's chain or in `ca_pem` (the `--ctl-ca` bundle, may be empty).
pub fn pinned_client(
    pin: [u8; 32],
    ca_pem: &[u8],
    alpn: Vec<Vec<u8>>,
) -> Result<crate::ClientTls, crate::TlsError> {
    let extra = if ca_pem.is_empty() {
        Vec::new()
    } else {
        crate::certs_from_pem(ca_pem, "CA bundle")?
    };
    let mut config = rustls::ClientConfig::builder_with_provider(crate::config::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedCa { pin, extra }))
        .with_no_client_auth();
    config.alpn_protocols = alpn;
    Ok(crate::ClientTls::from_config(Arc::new(config), None))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_verifies_only_for_its_token_and_key() {
        let k = HostKey::generate().unwrap();
        let sig = k.sign_token("wrr_a");
        verify_registration(k.public_key(), &sig, "wrr_a").unwrap();
        assert_eq!(
            verify_registration(k.public_key(), &sig, "wrr_b"),
            Err(KeyError::BadSignature)
        );
        let other = HostKey::generate().unwrap();
        assert_eq!(
            verify_registration(other.public_key(), &sig, "wrr_a"),
            Err(KeyError::BadSignature)
        );
        assert_eq!(
            verify_registration(&[0; 31], &sig, "wrr_a"),
            Err(KeyError::PublicKeyLength(31))
        );
        assert_eq!(
            verify_registration(k.public_key(), &sig[..63], "wrr_a"),
            Err(KeyError::SignatureLength(63))
        );
        let again = HostKey::from_pem(k.to_pem().as_bytes()).unwrap();
        assert_eq!(again.public_key(), k.public_key());
    }

    #[test]
    fn pins_split_off_tokens() {
        assert_eq!(split_pin("wrr_x").unwrap(), ("wrr_x", None));
        let pin = "ab".repeat(32);
        assert_eq!(
            split_pin(&format!("wrr_x.{pin}")).unwrap(),
            ("wrr_x", Some([0xab; 32]))
        );
        assert_eq!(split_pin("wrr_x.abc"), Err(KeyError::BadPin));
        assert_eq!(
            split_pin(&format!("wrr_x.{}", "AB".repeat(32))),
            Err(KeyError::BadPin)
        );
    }
}
