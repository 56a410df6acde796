//! wrenn-agent's command line, parsed by hand.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;

pub const USAGE: &str = "\
usage: wrenn-agent [--listen 0.0.0.0:7710] [--metrics-listen 0.0.0.0:7711]
                   [--state-root /var/lib/wrenn] [--ctl HOST:7702] [--registration-token-file F]
                   [--ctl-ca FILE | --ctl-plaintext]
                   [--advertise HOST:PORT] [--firecracker PATH] [--kernel PATH]
                   [--uffd-bin PATH] [--restore-backend file|uffd] [--boot-args-extra STR]
                   [--slots N] [--net-prefix wrenn] [--net-subnet 10.200.0.0]
                    [--jailer /usr/local/bin/jailer] [--chroot-base-dir <state-root>/jail]
                    [--uid-base 900000] [--uid-count 4096] [--uffd-uid <uid-base + uid-count>]
                    [--unjailed] [--vcpu-overcommit 4] [--memory-overcommit 1]
                    [--never-out default,CIDR,...] [--dns-upstream IP[:PORT]|off]
--ctl is ctl's host port (wrenn.host.v1, 7702 by default), not its client port (7700); it
speaks TLS, trusting the CA certificate in --ctl-ca (WRENN_CTL_CA), or plaintext with
--ctl-plaintext.
--never-out: destinations no sandbox reaches whatever its policy allows; the word `default`
stands for the private, shared, link-local, loopback ranges (the default). Add the control
network when it is outside them.
--restore-backend: how a create from a snapshot template gets its memory: `file` (default)
maps the template's one memory file, shared by its clones (10 idle clones of a 512 MiB
template: summed Pss 0.21x of ten alone); `uffd` has wrenn-uffd copy pages into each clone
(docs/operations.md, \"Restore backends\"). Resumes use wrenn-uffd either way.
--dns-upstream: where the slots' resolver sends allowed queries (default: the first IPv4
nameserver of /etc/resolv.conf); `off` runs no resolver (domain allow lists resolve nothing).
environment: WRENN_FIRECRACKER, WRENN_KERNEL, WRENN_JAILER (defaults of --firecracker,
             --kernel, --jailer); WRENN_REGISTRATION_TOKEN (the first start's token, or
             --registration-token-file: never on the command line, where /proc shows it)";

/// How a create from a snapshot template gets its memory (docs/operations.md, "Restore
/// backends"). A resume of a paused sandbox goes through wrenn-uffd with either. The
/// default is `File`, chosen from the `sandbox_density` and `sandbox_create_backends`
/// benches on the test hosts (clones share the template's pages; see the docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RestoreBackend {
    /// wrenn-uffd serves faults from the template's layers.
    Uffd,
    /// The template's one memory file, mapped `MAP_PRIVATE` as it is (no copy per sandbox).
    File,
}

/// Where the slots' resolver forwards allowed queries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DnsUpstream {
    /// The first IPv4 `nameserver` of /etc/resolv.conf, read at start-up.
    ResolvConf,
    Addr(SocketAddr),
    /// No resolver.
    Off,
}

/// `default,CIDR,...` (`default` = the built-in list).
fn parse_never_out(v: &str) -> Option<Vec<vmm_glue::net::Ipv4Cidr>> {
    let mut out = Vec::new();
    for item in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        if item == "default" {
            out.extend(vmm_glue::net::slot::never_out_default());
        } else {
            out.push(item.parse().ok()?);
        }
    }
    Some(out)
}

/// The parsed flags.
#[derive(Clone, Debug, PartialEq)]
pub struct Flags {
    pub listen: SocketAddr,
    pub metrics_listen: SocketAddr,
    pub state_root: PathBuf,
    pub ctl: Option<String>,
    pub registration_token: Option<String>,
    /// CA certificate (PEM) ctl's host port certificate must chain to (`WRENN_CTL_CA`).
    pub ctl_ca: Option<PathBuf>,
    /// Talk to ctl's host port without TLS (`--ctl-plaintext`).
    pub ctl_plaintext: bool,
    /// Address ctl uses to reach this agent (default: --listen, with the host's name when
    /// it listens on 0.0.0.0).
    pub advertise: Option<String>,
    pub firecracker: PathBuf,
    /// Default guest kernel (else `<state-root>/kernels/vmlinux-*`, newest).
    pub kernel: Option<PathBuf>,
    /// wrenn-uffd (else next to this executable).
    pub uffd_bin: Option<PathBuf>,
    pub restore_backend: RestoreBackend,
    pub boot_args_extra: String,
    pub slots: u32,
    /// Firecracker's jailer (`WRENN_JAILER`); unused with `--unjailed`.
    pub jailer: PathBuf,
    /// Where chroots are built (default `<state-root>/jail`: the same filesystem as the
    /// sandboxes, so disks hard-link in).
    pub chroot_base: PathBuf,
    /// Uids (and equal gids) of jailed Firecrackers: `uid_base .. uid_base + uid_count`.
    pub uid_base: u32,
    pub uid_count: u32,
    /// The one uid every `wrenn-uffd` drops to (default: the first after the range).
    pub uffd_uid: u32,
    /// Today's mode without the jailer (Firecracker and wrenn-uffd as root); `wrenn doctor`
    /// reports it as a failure for production.
    pub unjailed: bool,
    /// Capacity offered per unit of the host's own (reported to ctl, used by its scheduler).
    pub overcommit: crate::host::Overcommit,
    /// Names of slots' namespaces and links, the /16 their addresses come from, and the
    /// host's `never_out` list.
    pub net: vmm_glue::net::NetConfig,
    /// The slots' DNS resolver's upstream.
    pub dns_upstream: DnsUpstream,
    pub help: bool,
}

/// A command line that does not parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FlagError {
    Unknown(String),
    MissingValue(&'static str),
    BadValue {
        flag: &'static str,
        value: String,
    },
    /// A secret given on the command line, where every local user can read it.
    SecretOnArgv(&'static str),
    /// The token file could not be read.
    TokenFile {
        path: PathBuf,
        error: String,
    },
}

impl fmt::Display for FlagError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FlagError::Unknown(s) => write!(f, "unknown argument {s:?}"),
            FlagError::MissingValue(flag) => write!(f, "{flag} needs a value"),
            FlagError::BadValue { flag, value } => write!(f, "bad value {value:?} for {flag}"),
            FlagError::SecretOnArgv(flag) => write!(
                f,
                "{flag} is not taken on the command line (every local user can read it in \
                 /proc/*/cmdline): set WRENN_REGISTRATION_TOKEN or pass \
                 --registration-token-file FILE"
            ),
            FlagError::TokenFile { path, error } => {
                write!(f, "--registration-token-file {}: {error}", path.display())
            }
        }
    }
}

impl std::error::Error for FlagError {}

/// A registration token from a file: one line, at most
/// [`crate::limits::REGISTRATION_TOKEN_FILE_MAX`] bytes.
fn read_token_file(path: &std::path::Path) -> Result<String, FlagError> {
    use std::io::Read;
    let err = |error: String| FlagError::TokenFile {
        path: path.to_owned(),
        error,
    };
    let max = crate::limits::REGISTRATION_TOKEN_FILE_MAX;
    let mut s = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(max as u64 + 1).read_to_string(&mut s))
        .map_err(|e| err(e.to_string()))?;
    if s.len() > max {
        return Err(err(format!("longer than {max} bytes; not a token")));
    }
    let t = s.trim();
    if t.is_empty() || t.contains(char::is_whitespace) {
        return Err(err("not one token".into()));
    }
    Ok(t.to_owned())
}

impl Flags {
    /// Parses arguments (without the program name); `env` looks up environment variables.
    pub fn parse(
        args: impl IntoIterator<Item = String>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Flags, FlagError> {
        let mut f = Flags {
            listen: SocketAddr::from(([0, 0, 0, 0], 7710)),
            metrics_listen: SocketAddr::from(([0, 0, 0, 0], 7711)),
            state_root: PathBuf::from("/var/lib/wrenn"),
            ctl: None,
            registration_token: env("WRENN_REGISTRATION_TOKEN").filter(|s| !s.is_empty()),
            ctl_ca: env("WRENN_CTL_CA")
                .filter(|s| !s.is_empty())
                .map(PathBuf::from),
            ctl_plaintext: false,
            advertise: None,
            firecracker: env("WRENN_FIRECRACKER")
                .filter(|s| !s.is_empty())
                .map_or_else(
                    || PathBuf::from("/usr/local/bin/firecracker"),
                    PathBuf::from,
                ),
            kernel: env("WRENN_KERNEL")
                .filter(|s| !s.is_empty())
                .map(PathBuf::from),
            uffd_bin: None,
            restore_backend: RestoreBackend::File,
            boot_args_extra: String::new(),
            slots: crate::limits::SANDBOXES_MAX as u32,
            net: vmm_glue::net::NetConfig::default(),
            dns_upstream: DnsUpstream::ResolvConf,
            jailer: env("WRENN_JAILER")
                .filter(|s| !s.is_empty())
                .map_or_else(|| PathBuf::from("/usr/local/bin/jailer"), PathBuf::from),
            chroot_base: PathBuf::new(),
            uid_base: crate::limits::JAIL_UID_BASE_DEFAULT,
            uid_count: crate::limits::JAIL_UID_COUNT_DEFAULT,
            uffd_uid: 0,
            unjailed: false,
            overcommit: crate::host::Overcommit::default(),
            help: false,
        };
        let mut chroot_base = None;
        let mut uffd_uid = None;
        let mut net_prefix = f.net.prefix().to_owned();
        let mut net_subnet = f.net.subnet().addr();
        let mut never_out = None;
        let mut it = args.into_iter();
        while let Some(arg) = it.next() {
            let (name, inline) = match arg.split_once('=') {
                Some((n, v)) if n.starts_with("--") => (n.to_owned(), Some(v.to_owned())),
                _ => (arg.clone(), None),
            };
            macro_rules! value {
                ($flag:literal) => {
                    match inline.clone().or_else(|| it.next()) {
                        Some(v) => v,
                        None => return Err(FlagError::MissingValue($flag)),
                    }
                };
            }
            let bad = |flag: &'static str, value: String| FlagError::BadValue { flag, value };
            match name.as_str() {
                "--listen" => {
                    let v = value!("--listen");
                    f.listen = v.parse().map_err(|_| bad("--listen", v))?;
                }
                "--metrics-listen" => {
                    let v = value!("--metrics-listen");
                    f.metrics_listen = v.parse().map_err(|_| bad("--metrics-listen", v))?;
                }
                "--state-root" => f.state_root = PathBuf::from(value!("--state-root")),
                "--ctl" => {
                    let v = value!("--ctl");
                    if !v.contains(':') {
                        return Err(bad("--ctl", v));
                    }
                    f.ctl = Some(v);
                }
                "--registration-token" => {
                    return Err(FlagError::SecretOnArgv("--registration-token"))
                }
                "--registration-token-file" => {
                    let path = PathBuf::from(value!("--registration-token-file"));
                    f.registration_token = Some(read_token_file(&path)?);
                }
                "--advertise" => f.advertise = Some(value!("--advertise")),
                "--firecracker" => f.firecracker = PathBuf::from(value!("--firecracker")),
                "--kernel" => f.kernel = Some(PathBuf::from(value!("--kernel"))),
                "--uffd-bin" => f.uffd_bin = Some(PathBuf::from(value!("--uffd-bin"))),
                "--restore-backend" => {
                    let v = value!("--restore-backend");
                    f.restore_backend = match v.as_str() {
                        "uffd" => RestoreBackend::Uffd,
                        "file" => RestoreBackend::File,
                        _ => return Err(bad("--restore-backend", v)),
                    };
                }
                "--boot-args-extra" => f.boot_args_extra = value!("--boot-args-extra"),
                "--slots" => {
                    let v = value!("--slots");
                    f.slots = match v.parse::<u32>() {
                        Ok(n) if (1..=crate::limits::SANDBOXES_MAX as u32).contains(&n) => n,
                        _ => return Err(bad("--slots", v)),
                    };
                }
                "--net-prefix" => net_prefix = value!("--net-prefix"),
                "--net-subnet" => {
                    let v = value!("--net-subnet");
                    net_subnet = v.parse().map_err(|_| bad("--net-subnet", v))?;
                }
                "--never-out" => {
                    let v = value!("--never-out");
                    never_out = Some(parse_never_out(&v).ok_or_else(|| bad("--never-out", v))?);
                }
                "--dns-upstream" => {
                    let v = value!("--dns-upstream");
                    f.dns_upstream = if v == "off" {
                        DnsUpstream::Off
                    } else if let Ok(a) = v.parse::<SocketAddr>() {
                        DnsUpstream::Addr(a)
                    } else if let Ok(ip) = v.parse::<std::net::IpAddr>() {
                        DnsUpstream::Addr(SocketAddr::new(ip, 53))
                    } else {
                        return Err(bad("--dns-upstream", v));
                    };
                }
                "--jailer" => f.jailer = PathBuf::from(value!("--jailer")),
                "--chroot-base-dir" => {
                    let v = value!("--chroot-base-dir");
                    if !v.starts_with('/') {
                        return Err(bad("--chroot-base-dir", v));
                    }
                    chroot_base = Some(PathBuf::from(v));
                }
                "--uid-base" => {
                    let v = value!("--uid-base");
                    f.uid_base = v.parse().map_err(|_| bad("--uid-base", v))?;
                }
                "--uid-count" => {
                    let v = value!("--uid-count");
                    f.uid_count = v.parse().map_err(|_| bad("--uid-count", v))?;
                }
                "--uffd-uid" => {
                    let v = value!("--uffd-uid");
                    uffd_uid = Some(v.parse::<u32>().map_err(|_| bad("--uffd-uid", v))?);
                }
                "--unjailed" => f.unjailed = true,
                "--vcpu-overcommit" => {
                    let v = value!("--vcpu-overcommit");
                    f.overcommit.vcpu = match v.parse::<f64>() {
                        Ok(r) if proto::sandbox_limits::overcommit_ok(r, false) => r,
                        _ => return Err(bad("--vcpu-overcommit", v)),
                    };
                }
                "--memory-overcommit" => {
                    let v = value!("--memory-overcommit");
                    f.overcommit.memory = match v.parse::<f64>() {
                        Ok(r) if proto::sandbox_limits::overcommit_ok(r, true) => r,
                        _ => return Err(bad("--memory-overcommit", v)),
                    };
                }
                "--ctl-plaintext" => f.ctl_plaintext = true,
                "--ctl-ca" => f.ctl_ca = Some(PathBuf::from(value!("--ctl-ca"))),
                "-h" | "--help" => f.help = true,
                _ => return Err(FlagError::Unknown(arg)),
            }
        }
        f.net = vmm_glue::net::NetConfig::new(&net_prefix, net_subnet).map_err(|_| {
            FlagError::BadValue {
                flag: "--net-prefix/--net-subnet",
                value: format!("{net_prefix} {net_subnet}"),
            }
        })?;
        if let Some(list) = never_out {
            let n = list.len();
            f.net = f
                .net
                .with_never_out(list)
                .map_err(|_| FlagError::BadValue {
                    flag: "--never-out",
                    value: format!("{n} entries"),
                })?;
        }
        match (&f.ctl, &f.ctl_ca, f.ctl_plaintext) {
            (_, Some(_), true) => {
                return Err(FlagError::BadValue {
                    flag: "--ctl-ca/--ctl-plaintext",
                    value: "both given; they exclude each other".into(),
                })
            }
            (Some(_), None, false) => {
                return Err(FlagError::BadValue {
                    flag: "--ctl",
                    value: "ctl's host port speaks TLS: give its CA with --ctl-ca FILE \
                            (WRENN_CTL_CA), or --ctl-plaintext for a ctl serving --plaintext"
                        .into(),
                })
            }
            _ => {}
        }
        f.chroot_base = chroot_base.unwrap_or_else(|| f.state_root.join("jail"));
        let range = crate::uid_pool::UidRange {
            base: f.uid_base,
            count: f.uid_count,
        };
        if crate::uid_pool::UidPool::new(range).is_err() || f.uid_count < f.slots {
            return Err(FlagError::BadValue {
                flag: "--uid-base/--uid-count",
                value: format!(
                    "{} {} (at least --slots uids from 1000 up)",
                    f.uid_base, f.uid_count
                ),
            });
        }
        f.uffd_uid = match uffd_uid {
            Some(u) => u,
            None => f
                .uid_base
                .checked_add(f.uid_count)
                .ok_or(FlagError::BadValue {
                    flag: "--uffd-uid",
                    value: "past the largest uid".into(),
                })?,
        };
        let in_range = |u: u32| u >= f.uid_base && u - f.uid_base < f.uid_count;
        if f.uffd_uid == 0 || in_range(f.uffd_uid) {
            return Err(FlagError::BadValue {
                flag: "--uffd-uid",
                value: format!("{} (not 0, not a sandbox uid)", f.uffd_uid),
            });
        }
        Ok(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Flags, FlagError> {
        Flags::parse(args.iter().map(|s| s.to_string()), |_| None)
    }

    #[test]
    fn defaults() {
        let f = parse(&[]).unwrap();
        assert_eq!(f.listen.to_string(), "0.0.0.0:7710");
        assert_eq!(f.metrics_listen.to_string(), "0.0.0.0:7711");
        assert_eq!(f.state_root, PathBuf::from("/var/lib/wrenn"));
        assert_eq!(f.restore_backend, RestoreBackend::File);
        assert_eq!(f.ctl, None);
        assert_eq!(f.jailer, PathBuf::from("/usr/local/bin/jailer"));
        assert_eq!(f.chroot_base, PathBuf::from("/var/lib/wrenn/jail"));
        assert_eq!(
            (f.uid_base, f.uid_count, f.uffd_uid),
            (900_000, 4096, 904_096)
        );
        assert!(!f.unjailed);
        assert_eq!(
            f.overcommit,
            crate::host::Overcommit {
                vcpu: 4.0,
                memory: 1.0
            }
        );
    }

    #[test]
    fn jail_flags() {
        let f = parse(&[
            "--state-root",
            "/s",
            "--jailer=/j",
            "--uid-base",
            "700000",
            "--uid-count",
            "100",
            "--slots",
            "10",
            "--unjailed",
        ])
        .unwrap();
        assert_eq!(f.jailer, PathBuf::from("/j"));
        assert_eq!(
            f.chroot_base,
            PathBuf::from("/s/jail"),
            "follows --state-root"
        );
        assert_eq!(f.uffd_uid, 700_100);
        assert!(f.unjailed);
        let f = parse(&["--chroot-base-dir", "/c", "--uffd-uid", "5000"]).unwrap();
        assert_eq!((f.chroot_base, f.uffd_uid), (PathBuf::from("/c"), 5000));
        let env = |k: &str| (k == "WRENN_JAILER").then(|| "/env/jailer".to_string());
        let f = Flags::parse(Vec::<String>::new(), env).unwrap();
        assert_eq!(f.jailer, PathBuf::from("/env/jailer"));
        for bad in [
            &["--chroot-base-dir", "rel"][..],
            &["--uid-base", "0"],
            &["--uid-count", "0"],
            &["--uid-count", "10", "--slots", "11"],
            &["--uffd-uid", "900005"],
            &["--uffd-uid", "0"],
            &["--uid-base", "x"],
        ] {
            assert!(
                matches!(parse(bad), Err(FlagError::BadValue { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn every_flag_both_spellings() {
        let f = parse(&[
            "--listen",
            "127.0.0.1:1",
            "--metrics-listen=127.0.0.1:2",
            "--state-root",
            "/tmp/x",
            "--ctl",
            "ctl:7702",
            "--ctl-plaintext",
            "--firecracker",
            "/fc",
            "--kernel",
            "/k",
            "--uffd-bin",
            "/u",
            "--restore-backend",
            "file",
            "--boot-args-extra",
            "quiet a=b",
            "--slots",
            "8",
            "--advertise",
            "10.0.0.5:7710",
            "--vcpu-overcommit",
            "5",
            "--memory-overcommit=1.5",
        ])
        .unwrap();
        assert_eq!(
            f.overcommit,
            crate::host::Overcommit {
                vcpu: 5.0,
                memory: 1.5
            }
        );
        assert_eq!(f.listen.port(), 1);
        assert_eq!(f.metrics_listen.port(), 2);
        assert_eq!(f.ctl.as_deref(), Some("ctl:7702"));
        assert!(f.ctl_plaintext);
        assert_eq!(f.firecracker, PathBuf::from("/fc"));
        assert_eq!(f.kernel, Some(PathBuf::from("/k")));
        assert_eq!(f.uffd_bin, Some(PathBuf::from("/u")));
        assert_eq!(f.restore_backend, RestoreBackend::File);
        assert_eq!(f.boot_args_extra, "quiet a=b");
        assert_eq!(f.slots, 8);
        assert_eq!(f.advertise.as_deref(), Some("10.0.0.5:7710"));
    }

    #[test]
    fn environment_supplies_defaults_and_flags_win() {
        let env = |k: &str| match k {
            "WRENN_FIRECRACKER" => Some("/env/fc".to_string()),
            "WRENN_KERNEL" => Some("/env/k".to_string()),
            _ => None,
        };
        let f = Flags::parse(Vec::<String>::new(), env).unwrap();
        assert_eq!(f.firecracker, PathBuf::from("/env/fc"));
        assert_eq!(f.kernel, Some(PathBuf::from("/env/k")));
        let f = Flags::parse(vec!["--firecracker".into(), "/flag".into()], env).unwrap();
        assert_eq!(f.firecracker, PathBuf::from("/flag"));
    }

    #[test]
    fn errors() {
        assert_eq!(
            parse(&["--bogus"]),
            Err(FlagError::Unknown("--bogus".into()))
        );
        assert_eq!(
            parse(&["--listen"]),
            Err(FlagError::MissingValue("--listen"))
        );
        assert!(matches!(
            parse(&["--listen", "nope"]),
            Err(FlagError::BadValue { .. })
        ));
        assert!(matches!(
            parse(&["--restore-backend", "disk"]),
            Err(FlagError::BadValue { .. })
        ));
        assert!(matches!(
            parse(&["--slots", "0"]),
            Err(FlagError::BadValue { .. })
        ));
        assert!(matches!(
            parse(&["--ctl", "nohostport"]),
            Err(FlagError::BadValue { .. })
        ));
        assert!(parse(&["-h"]).unwrap().help);
        for bad in [
            ["--vcpu-overcommit", "0.05"],
            ["--vcpu-overcommit", "33"],
            ["--vcpu-overcommit", "NaN"],
            ["--memory-overcommit", "4.5"],
            ["--memory-overcommit", "-1"],
        ] {
            assert!(
                matches!(parse(&bad), Err(FlagError::BadValue { .. })),
                "{bad:?}"
            );
        }
        assert!(matches!(
            parse(&["--net-prefix", "Bad!"]),
            Err(FlagError::BadValue { .. })
        ));
        assert!(matches!(
            parse(&["--net-subnet", "10.1.2.0"]),
            Err(FlagError::BadValue { .. })
        ));
        let f = parse(&["--net-prefix", "wt", "--net-subnet", "10.201.0.0"]).unwrap();
        assert_eq!(f.net.prefix(), "wt");
    }

    #[test]
    fn egress_flags() {
        let f = parse(&[]).unwrap();
        assert_eq!(f.dns_upstream, DnsUpstream::ResolvConf);
        assert!(f.net.is_never_out("10.1.2.3".parse().unwrap()));
        let f = parse(&[
            "--never-out",
            "default,203.0.113.0/24",
            "--dns-upstream=10.0.0.2",
        ])
        .unwrap();
        assert!(f.net.is_never_out("203.0.113.9".parse().unwrap()));
        assert!(f.net.is_never_out("192.168.1.1".parse().unwrap()));
        assert_eq!(
            f.dns_upstream,
            DnsUpstream::Addr("10.0.0.2:53".parse().unwrap())
        );
        // Without `default` the list is only what is given (plus the slot subnet).
        let f = parse(&["--never-out", "203.0.113.0/24", "--dns-upstream", "off"]).unwrap();
        assert!(!f.net.is_never_out("192.168.1.1".parse().unwrap()));
        assert_eq!(f.dns_upstream, DnsUpstream::Off);
        let f = parse(&["--dns-upstream", "127.0.0.53:5353"]).unwrap();
        assert_eq!(
            f.dns_upstream,
            DnsUpstream::Addr("127.0.0.53:5353".parse().unwrap())
        );
        for bad in [
            &["--never-out", "10.0.0.0/33"][..],
            &["--never-out", "default,x"],
            &["--dns-upstream", "resolver.example"],
        ] {
            assert!(
                matches!(parse(bad), Err(FlagError::BadValue { .. })),
                "{bad:?}"
            );
        }
        let many = vec!["1.2.3.4"; 65].join(",");
        assert!(parse(&["--never-out", &many]).is_err());
    }
}

#[cfg(test)]
mod token_tests {
    use super::*;

    #[test]
    fn the_registration_token_never_comes_from_argv() {
        let e = Flags::parse(["--registration-token=wrr_x".to_string()], |_| None).unwrap_err();
        assert!(matches!(e, FlagError::SecretOnArgv(_)), "{e}");
        assert!(e.to_string().contains("WRENN_REGISTRATION_TOKEN"));
        let env = |k: &str| (k == "WRENN_REGISTRATION_TOKEN").then(|| "wrr_env".to_string());
        let f = Flags::parse(Vec::<String>::new(), env).unwrap();
        assert_eq!(f.registration_token.as_deref(), Some("wrr_env"));
        let dir = std::env::temp_dir().join(format!("wrenn-agent-tok-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("token");
        std::fs::write(&file, "wrr_file\n").unwrap();
        let args = vec![
            "--registration-token-file".to_string(),
            file.display().to_string(),
        ];
        let f = Flags::parse(args.clone(), env).unwrap();
        assert_eq!(f.registration_token.as_deref(), Some("wrr_file"));
        std::fs::write(&file, "two tokens\n").unwrap();
        assert!(matches!(
            Flags::parse(args.clone(), |_| None),
            Err(FlagError::TokenFile { .. })
        ));
        std::fs::write(&file, vec![b'a'; 5000]).unwrap();
        assert!(matches!(
            Flags::parse(args, |_| None),
            Err(FlagError::TokenFile { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[cfg(test)]
mod ctl_trust_tests {
    use super::*;

    #[test]
    fn the_host_port_link_is_tls_unless_plaintext_is_asked() {
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let e = Flags::parse(args(&["--ctl", "ctl:7702"]), |_| None).unwrap_err();
        assert!(e.to_string().contains("--ctl-ca"), "{e}");
        let env = |k: &str| (k == "WRENN_CTL_CA").then(|| "/etc/wrenn/ca.pem".to_string());
        let f = Flags::parse(args(&["--ctl", "ctl:7702"]), env).unwrap();
        assert_eq!(f.ctl_ca, Some(PathBuf::from("/etc/wrenn/ca.pem")));
        assert!(Flags::parse(args(&["--ctl", "c:1", "--ctl-plaintext"]), env).is_err());
        assert!(Flags::parse(args(&["--ctl", "c:1", "--ctl-plaintext"]), |_| None).is_ok());
    }
}
