//! Certificates ctl makes (rcgen): `wrenn-ctl admin tls init` (a CA and a server
//! certificate) and the certificates it issues agents at registration.
//!
//! Files (`admin tls init --dir DIR`): `ca.pem` (the CA certificate: clients' `WRENN_CA`),
//! `ca.key` (its key, mode 0600: every ctl replica reads the same file to issue host
//! certificates), `server.pem` + `server.key` (ctl's certificate for the names given, signed
//! by the CA: `--tls-cert`/`--tls-key`). Keys are ECDSA P-256. Existing files are never
//! overwritten: a second `init` refuses, so a CA cannot be replaced by accident.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, SerialNumber,
};

use crate::limits::{CA_LIFETIME, CLOCK_SKEW_ALLOWANCE, SERVER_CERT_LIFETIME};

/// Why a certificate could not be made, read or written.
#[derive(Debug)]
pub enum PkiError {
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    Exists {
        path: PathBuf,
    },
    Rcgen(rcgen::Error),
    BadName {
        name: String,
    },
    Tls(tls::TlsError),
    KeyReadable {
        path: PathBuf,
        mode: u32,
    },
    NotOurs {
        path: PathBuf,
        why: String,
    },
}

impl std::fmt::Display for PkiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PkiError::Io { path, source } => write!(f, "{}: {source}", path.display()),
            PkiError::Exists { path } => write!(
                f,
                "{} already exists; not overwriting it (remove it first to make a new one)",
                path.display()
            ),
            PkiError::Rcgen(e) => write!(f, "make certificate: {e}"),
            PkiError::BadName { name } => write!(
                f,
                "{name:?} is neither a DNS name nor an IP address for a certificate"
            ),
            PkiError::Tls(e) => write!(f, "{e}"),
            PkiError::NotOurs { path, why } => write!(
                f,
                "{}: not a CA made by `wrenn-ctl admin tls init` with this key ({why}); \
                 with your own PKI, give ctl and agents PEM files instead",
                path.display()
            ),
            PkiError::KeyReadable { path, mode } => write!(
                f,
                "{} is readable by others (mode {mode:o}); chmod 600 it",
                path.display()
            ),
        }
    }
}

impl std::error::Error for PkiError {}

impl From<rcgen::Error> for PkiError {
    fn from(e: rcgen::Error) -> PkiError {
        PkiError::Rcgen(e)
    }
}

/// PEM armour for DER bytes (64-column base64).
pub fn pem(label: &str, der: &[u8]) -> String {
    let b = proto::base64::encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// Sets a certificate's validity to `[from, to]` (rcgen's time type is not named here: the
/// `time` crate is only rcgen's).
fn validity(params: &mut CertificateParams, from: SystemTime, to: SystemTime) {
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    params.not_before = epoch + from.duration_since(UNIX_EPOCH).unwrap_or_default();
    params.not_after = epoch + to.duration_since(UNIX_EPOCH).unwrap_or_default();
}

/// A random serial number (16 bytes, positive).
fn serial() -> Result<SerialNumber, PkiError> {
    let mut b = [0u8; 16];
    crate::random::fill(&mut b).map_err(|source| PkiError::Io {
        path: PathBuf::from("/dev/urandom"),
        source,
    })?;
    b[0] &= 0x7f;
    b[0] |= 0x01;
    Ok(SerialNumber::from_slice(&b))
}

fn san(name: &str) -> Result<SanType, PkiError> {
    if let Ok(ip) = name.parse::<std::net::IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    let ok = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'*')
        });
    if !ok {
        return Err(PkiError::BadName {
            name: name.to_owned(),
        });
    }
    let s = name.to_owned().try_into().map_err(|_| PkiError::BadName {
        name: name.to_owned(),
    })?;
    Ok(SanType::DnsName(s))
}

/// The subject of every CA `init` makes.
pub const CA_COMMON_NAME: &str = "wrenn CA";

fn ca_params() -> Result<CertificateParams, PkiError> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(DnType::CommonName, CA_COMMON_NAME);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    Ok(params)
}

/// The CA: its certificate and signing key.
pub struct Authority {
    pub cert_pem: String,
    pub cert_der: Vec<u8>,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Authority")
    }
}

/// A certificate and its private key, PEM.
#[derive(Debug)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

impl Authority {
    /// A new CA (self-signed, [`CA_LIFETIME`]). Returns it and its key's PEM.
    pub fn generate() -> Result<(Authority, String), PkiError> {
        let key = KeyPair::generate()?;
        let mut params = ca_params()?;
        let now = SystemTime::now();
        validity(&mut params, now - CLOCK_SKEW_ALLOWANCE, now + CA_LIFETIME);
        params.serial_number = Some(serial()?);
        let cert = params.self_signed(&key)?;
        let key_pem = pem("PRIVATE KEY", &key.serialize_der());
        Ok((
            Authority {
                cert_pem: pem("CERTIFICATE", cert.der()),
                cert_der: cert.der().to_vec(),
                issuer: Issuer::new(params, key),
            },
            key_pem,
        ))
    }

    /// The CA in `ca.pem` + `ca.key` (the key must not be readable by group or others).
    pub fn load(cert: &Path, key: &Path) -> Result<Authority, PkiError> {
        let io = |path: &Path| {
            let p = path.to_owned();
            move |source| PkiError::Io { path: p, source }
        };
        let meta = std::fs::metadata(key).map_err(io(key))?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(PkiError::KeyReadable {
                path: key.to_owned(),
                mode,
            });
        }
        let cert_pem = std::fs::read_to_string(cert).map_err(io(cert))?;
        let key_pem = std::fs::read_to_string(key).map_err(io(key))?;
        let der = tls::certs_from_pem(cert_pem.as_bytes(), &cert.display().to_string())
            .map_err(PkiError::Tls)?
            .remove(0);
        let key_der = tls::key_from_pem(key_pem.as_bytes(), &key.display().to_string())
            .map_err(PkiError::Tls)?;
        let kp = KeyPair::try_from(&key_der)?;
        // rcgen reads no certificates (its parser would add a dozen crates): the issuer is
        // rebuilt from the name `init` gives every CA and the key, then checked by issuing
        // a probe certificate and verifying it against the loaded CA certificate.
        let issuer = Issuer::new(ca_params()?, kp);
        let ca = Authority {
            cert_pem,
            cert_der: der.to_vec(),
            issuer,
        };
        let probe = ca.issue_server(&["probe.wrenn".to_owned()], Duration::from_secs(600))?;
        let leaf = tls::certs_from_pem(probe.cert_pem.as_bytes(), "probe")
            .map_err(PkiError::Tls)?
            .remove(0);
        tls::verify_server_cert(&der, &leaf, "probe.wrenn").map_err(|why| PkiError::NotOurs {
            path: cert.to_owned(),
            why,
        })?;
        Ok(ca)
    }

    /// SHA-256 of the CA certificate (hex): the pin in registration tokens.
    pub fn fingerprint(&self) -> String {
        tls::ca_fingerprint(&tls::CertificateDer::from(self.cert_der.as_slice()))
    }

    /// A server certificate for `names` (DNS names or IP addresses), with a fresh key.
    pub fn issue_server(&self, names: &[String], lifetime: Duration) -> Result<Issued, PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.subject_alt_names = names.iter().map(|n| san(n)).collect::<Result<_, _>>()?;
        if let Some(first) = names.first() {
            params.distinguished_name.push(DnType::CommonName, first);
        }
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let now = SystemTime::now();
        validity(&mut params, now - CLOCK_SKEW_ALLOWANCE, now + lifetime);
        params.serial_number = Some(serial()?);
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Issued {
            cert_pem: pem("CERTIFICATE", cert.der()),
            key_pem: pem("PRIVATE KEY", &key.serialize_der()),
        })
    }
}

impl Authority {
    /// ctl's own client certificate for the agents' ports (mutual TLS), with a fresh key:
    /// CN `name`, CA:false, client auth only.
    pub fn issue_client(&self, name: &str, lifetime: Duration) -> Result<Issued, PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let now = SystemTime::now();
        validity(&mut params, now - CLOCK_SKEW_ALLOWANCE, now + lifetime);
        params.serial_number = Some(serial()?);
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Issued {
            cert_pem: pem("CERTIFICATE", cert.der()),
            key_pem: pem("PRIVATE KEY", &key.serialize_der()),
        })
    }

    /// A client configuration for calling agents: ctl's own client certificate (fresh,
    /// [`crate::limits::CTL_CLIENT_CERT_LIFETIME`]) and trust in this CA only.
    pub fn agent_client(&self) -> Result<tls::ClientTls, PkiError> {
        let me = self.issue_client("wrenn-ctl", crate::limits::CTL_CLIENT_CERT_LIFETIME)?;
        let chain = tls::certs_from_pem(me.cert_pem.as_bytes(), "ctl client certificate")
            .map_err(PkiError::Tls)?;
        let key =
            tls::key_from_pem(me.key_pem.as_bytes(), "ctl client key").map_err(PkiError::Tls)?;
        tls::ClientTls::from_ca_pem(
            self.cert_pem.as_bytes(),
            tls::ClientOptions {
                alpn: vec![tls::ALPN_WRENN.to_vec()],
                identity: Some((chain, key)),
                ..Default::default()
            },
        )
        .map_err(PkiError::Tls)
    }
}

/// An agent's Ed25519 public key (raw 32 bytes) as rcgen takes it: the key is certified,
/// never seen whole.
struct HostPublicKey<'a>(&'a [u8]);

impl rcgen::PublicKeyData for HostPublicKey<'_> {
    fn der_bytes(&self) -> &[u8] {
        self.0
    }
    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ED25519
    }
}

/// A host certificate ctl issued.
#[derive(Debug)]
pub struct HostCert {
    pub cert_pem: String,
    pub expires: SystemTime,
    /// Its serial number, big-endian (what a revocation names).
    pub serial: Vec<u8>,
}

impl Authority {
    /// The certificate of a host: identity = `host_id` ("host-{uuid}", as CN and DNS SAN),
    /// whatever the agent asked; CA:false; client and server auth (the agent presents it
    /// to ctl's host port and serves its own port with it); `lifetime` long.
    pub fn issue_host(
        &self,
        host_id: &str,
        public_key: &[u8],
        lifetime: Duration,
    ) -> Result<HostCert, PkiError> {
        if public_key.len() != tls::hostkey::PUBLIC_KEY_LEN {
            return Err(PkiError::BadName {
                name: format!("host public key of {} bytes", public_key.len()),
            });
        }
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.subject_alt_names = vec![san(host_id)?];
        params.distinguished_name.push(DnType::CommonName, host_id);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ClientAuth,
            ExtendedKeyUsagePurpose::ServerAuth,
        ];
        let now = SystemTime::now();
        let expires = now + lifetime;
        // The skew allowance is bounded by a tenth of the lifetime, so a short-lived
        // certificate's validity (from which the agent times its renewal) is mostly ahead.
        let skew = CLOCK_SKEW_ALLOWANCE.min(lifetime / 10);
        validity(&mut params, now - skew, expires);
        let sn = serial()?;
        let serial_bytes = sn.to_bytes();
        params.serial_number = Some(sn);
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&HostPublicKey(public_key), &self.issuer)?;
        Ok(HostCert {
            cert_pem: pem("CERTIFICATE", cert.der()),
            expires,
            serial: serial_bytes,
        })
    }
}

/// ctl's check of a Register request's host key, before any database work: no key (an
/// older agent) is allowed; a key must come with a valid signature over the token's secret.
/// Returns the key to certify.
pub fn check_register_key(
    req: &proto::gen::wrenn::host::v1::RegisterRequest,
) -> Result<Option<&[u8]>, tls::KeyError> {
    if req.host_public_key.is_empty() && req.token_signature.is_empty() {
        return Ok(None);
    }
    let (secret, _pin) = tls::hostkey::split_pin(&req.registration_token)?;
    tls::hostkey::verify_registration(&req.host_public_key, &req.token_signature, secret)?;
    Ok(Some(&req.host_public_key))
}

/// Fuzz entry point (`fuzz/fuzz_targets/register_key.rs`): a Register request from the
/// wire, then the key check ctl runs on it. Never panics; a request that passes carries a
/// 32-byte key.
pub fn fuzz_register_key(data: &[u8]) {
    use prost::Message;
    let Ok(req) = proto::gen::wrenn::host::v1::RegisterRequest::decode(data) else {
        return;
    };
    if let Ok(Some(k)) = check_register_key(&req) {
        assert_eq!(k.len(), tls::hostkey::PUBLIC_KEY_LEN);
    }
}

/// Writes `data` to a new file with `mode`; refuses to overwrite.
fn write_new(path: &Path, data: &str, mode: u32) -> Result<(), PkiError> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|source| {
            if source.kind() == std::io::ErrorKind::AlreadyExists {
                PkiError::Exists {
                    path: path.to_owned(),
                }
            } else {
                PkiError::Io {
                    path: path.to_owned(),
                    source,
                }
            }
        })?;
    f.write_all(data.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|source| PkiError::Io {
            path: path.to_owned(),
            source,
        })
}

/// What `admin tls init` made.
#[derive(Debug)]
pub struct InitFiles {
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    /// SHA-256 of the CA certificate, hex.
    pub fingerprint: String,
}

/// `wrenn-ctl admin tls init`: a CA and a server certificate for `names` in `dir`.
pub fn init(dir: &Path, names: &[String]) -> Result<InitFiles, PkiError> {
    if names.is_empty() {
        return Err(PkiError::BadName {
            name: String::new(),
        });
    }
    for n in names {
        san(n)?;
    }
    std::fs::create_dir_all(dir).map_err(|source| PkiError::Io {
        path: dir.to_owned(),
        source,
    })?;
    let files = InitFiles {
        ca_cert: dir.join("ca.pem"),
        ca_key: dir.join("ca.key"),
        server_cert: dir.join("server.pem"),
        server_key: dir.join("server.key"),
        fingerprint: String::new(),
    };
    for p in [
        &files.ca_cert,
        &files.ca_key,
        &files.server_cert,
        &files.server_key,
    ] {
        if p.exists() {
            return Err(PkiError::Exists { path: p.clone() });
        }
    }
    let (ca, ca_key) = Authority::generate()?;
    let server = ca.issue_server(names, SERVER_CERT_LIFETIME)?;
    write_new(&files.ca_key, &ca_key, 0o600)?;
    write_new(&files.ca_cert, &ca.cert_pem, 0o644)?;
    write_new(&files.server_key, &server.key_pem, 0o600)?;
    // The chain: the server certificate, then the CA (agents pin the CA from the chain).
    write_new(
        &files.server_cert,
        &format!("{}{}", server.cert_pem, ca.cert_pem),
        0o644,
    )?;
    Ok(InitFiles {
        fingerprint: ca.fingerprint(),
        ..files
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_makes_a_ca_and_a_server_certificate_that_tls_accepts() {
        let dir = std::env::temp_dir().join(format!("wrenn-pki-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let names = vec!["127.0.0.1".to_owned(), "localhost".to_owned()];
        let f = init(&dir, &names).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&f.ca_key), 0o600);
        assert_eq!(mode(&f.server_key), 0o600);
        assert_eq!(f.fingerprint.len(), 64);
        // A second init refuses to replace the CA.
        assert!(matches!(init(&dir, &names), Err(PkiError::Exists { .. })));
        // The files make a server configuration, and the CA loads back.
        tls::ServerTls::from_pem_files(&f.server_cert, &f.server_key, &Default::default()).unwrap();
        let ca = Authority::load(&f.ca_cert, &f.ca_key).unwrap();
        assert_eq!(ca.fingerprint(), f.fingerprint);
        std::fs::set_permissions(&f.ca_key, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            Authority::load(&f.ca_cert, &f.ca_key),
            Err(PkiError::KeyReadable { .. })
        ));
        assert!(matches!(
            init(&dir.join("x"), &["bad name!".to_owned()]),
            Err(PkiError::BadName { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The committed corpus of `fuzz/fuzz_targets/register_key.rs`, replayed; its named
    /// seeds (made by another Ed25519 implementation) get the verdicts their names say.
    #[test]
    fn register_key_corpus() {
        use prost::Message;
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/register_key");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).expect("corpus directory") {
            let path = e.unwrap().path();
            let data = std::fs::read(&path).unwrap();
            fuzz_register_key(&data);
            n += 1;
            let name = path.file_name().unwrap().to_str().unwrap().to_owned();
            let Ok(req) = proto::gen::wrenn::host::v1::RegisterRequest::decode(data.as_slice())
            else {
                assert_eq!(name, "truncated");
                continue;
            };
            let verdict = check_register_key(&req).map(|k| k.is_some());
            match name.as_str() {
                "valid" | "valid_with_pin" => assert_eq!(verdict, Ok(true), "{name}"),
                "no_key" => assert_eq!(verdict, Ok(false), "{name}"),
                "bad_signature" => assert_eq!(verdict, Err(tls::KeyError::BadSignature)),
                "short_key" => assert_eq!(verdict, Err(tls::KeyError::PublicKeyLength(31))),
                "key_without_signature" => {
                    assert_eq!(verdict, Err(tls::KeyError::SignatureLength(0)))
                }
                "bad_pin" => assert_eq!(verdict, Err(tls::KeyError::BadPin)),
                _ => {}
            }
        }
        assert!(n >= 8);
    }
}
