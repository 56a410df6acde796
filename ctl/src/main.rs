//! `wrenn-ctl`: flag parsing only; the work is in the `ctl` library.
//!
//! ```text
//! wrenn-ctl serve [--database-url URL] [--listen ADDR] [--http-listen ADDR] [--host-listen ADDR] [--db-workers N]
//!                 [--reconcile-interval-s S] [--heartbeat-timeout-s S] [--lifecycle-timeout-s S]
//!                 [--no-http] [--keep-unknown] [--webhook-allow-private] [--build-context-max-mib N]
//!                 (--tls-cert FILE --tls-key FILE [--tls12] | --plaintext)
//! wrenn-ctl admin tls init --dir DIR --names NAME[,NAME...]
//! wrenn-ctl admin migrate [--database-url URL]
//! wrenn-ctl admin init --team NAME --email EMAIL [--name NAME] [--database-url URL]
//! wrenn-ctl admin create-team --team NAME --email EMAIL [--name NAME] [--database-url URL]
//! wrenn-ctl admin create-registration-token [--ttl-s S] [--database-url URL]
//! wrenn-ctl admin revoke-host --host HOST_ID [--database-url URL]
//! wrenn-ctl admin adopt-template --host HOST_ID --template TPL_ID --name NAME --vcpus N
//!                                --memory-mib M --disk-mib D [--database-url URL]
//! wrenn-ctl --version | --help, and --help after any command
//! ```
//! Usage errors print the usage and exit 2; runtime errors print only the error, exit 1.
//! The database URL may also come from `WRENN_DATABASE_URL` or `DATABASE_URL`.
//! `--keep-unknown`: the reconciler only reports sandboxes an agent runs that the database
//! does not know, instead of destroying them. `--webhook-allow-private`: webhooks may be
//! delivered to loopback, private and link-local addresses (tests; a trusted network).

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use ctl::config::{ApiConfig, Config, JobsConfig};

const USAGE: &str = "usage:
  wrenn-ctl serve [--database-url URL] [--listen 0.0.0.0:7700] [--http-listen 0.0.0.0:7701]
                  [--host-listen 0.0.0.0:7702] [--no-http] [--keep-unknown] [--db-workers N] [--reconcile-interval-s S]
                  [--heartbeat-timeout-s S] [--lifecycle-timeout-s S] [--webhook-allow-private]
                  [--build-context-max-mib N]
                  (--tls-cert FILE --tls-key FILE [--tls12] | --plaintext)
                  [--tls-sandbox-domain D --tls-sandbox-cert FILE --tls-sandbox-key FILE]
                  [--tls-ca-cert FILE --tls-ca-key FILE] [--traffic-domain D]
  wrenn-ctl admin migrate [--database-url URL]
  wrenn-ctl admin init --team NAME --email EMAIL [--name NAME] [--database-url URL]
  wrenn-ctl admin create-team --team NAME --email EMAIL [--name NAME] [--database-url URL]
  wrenn-ctl admin create-registration-token [--ttl-s S] [--tls-ca-cert FILE] [--database-url URL]
  wrenn-ctl admin revoke-host --host HOST_ID [--database-url URL]
  wrenn-ctl admin adopt-template --host HOST_ID --template TPL_ID --name NAME --vcpus N
                                 --memory-mib M --disk-mib D [--database-url URL]
  wrenn-ctl admin tls init --dir DIR --names NAME[,NAME...]
  wrenn-ctl --version
The database URL defaults to $WRENN_DATABASE_URL, then $DATABASE_URL.
The client ports speak TLS 1.3 with --tls-cert/--tls-key ($WRENN_TLS_CERT/$WRENN_TLS_KEY, PEM);
plaintext only with --plaintext. `admin tls init` makes a CA (ca.pem, ca.key mode 0600) and a
certificate for the names (server.pem, server.key) in DIR. With --tls-ca-cert/--tls-ca-key
($WRENN_TLS_CA_CERT/$WRENN_TLS_CA_KEY: ca.pem, ca.key) ctl issues each agent a certificate at
registration, and registration tokens carry the CA's SHA-256 for the agent to pin.
`admin adopt-template` records a snapshot template whose files the host's agent already has
(sizes from its template.conf) as a platform template.
`serve` applies pending migrations itself before it listens (docs/operations.md).";

/// Why a command failed: a usage error (bad or missing arguments: the usage follows) or a
/// runtime error (the arguments were fine; only the error is printed).
enum Failure {
    Usage(String),
    Runtime(String),
}

impl From<String> for Failure {
    fn from(s: String) -> Failure {
        Failure::Usage(s)
    }
}

impl From<&str> for Failure {
    fn from(s: &str) -> Failure {
        Failure::Usage(s.to_owned())
    }
}

/// Whether `args` asks for help (`--help` or `-h` anywhere).
fn wants_help(args: &[String]) -> bool {
    args.iter().any(|a| a == "--help" || a == "-h")
}

/// Parsed `--flag value` pairs and bare switches, checked against the allowed set.
struct Flags {
    pairs: Vec<(String, String)>,
    switches: Vec<String>,
}

impl Flags {
    fn parse(args: &[String], with_value: &[&str], switches: &[&str]) -> Result<Flags, String> {
        let mut f = Flags {
            pairs: Vec::new(),
            switches: Vec::new(),
        };
        let mut i = 0;
        while i < args.len() {
            let a = &args[i];
            let (name, inline) = match a.split_once('=') {
                Some((n, v)) => (n, Some(v.to_owned())),
                None => (a.as_str(), None),
            };
            if with_value.contains(&name) {
                let v = match inline {
                    Some(v) => v,
                    None => {
                        i += 1;
                        args.get(i)
                            .cloned()
                            .ok_or_else(|| format!("{name} needs a value"))?
                    }
                };
                if f.pairs.iter().any(|(n, _)| n == name) {
                    return Err(format!("{name} given twice"));
                }
                f.pairs.push((name.to_owned(), v));
            } else if switches.contains(&name) && inline.is_none() {
                f.switches.push(name.to_owned());
            } else {
                return Err(format!("unknown argument {a:?}"));
            }
            i += 1;
        }
        Ok(f)
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.pairs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn has(&self, name: &str) -> bool {
        self.switches.iter().any(|s| s == name)
    }

    fn addr(&self, name: &str, env: &str, default: &str) -> Result<SocketAddr, String> {
        let v = self
            .get(name)
            .map(str::to_owned)
            .or_else(|| std::env::var(env).ok())
            .unwrap_or_else(|| default.to_owned());
        v.parse()
            .map_err(|_| format!("{name}: {v:?} is not an address like 0.0.0.0:7700"))
    }

    fn secs(&self, name: &str, default: Duration) -> Result<Duration, String> {
        match self.get(name) {
            None => Ok(default),
            Some(v) => match v.parse::<u64>() {
                Ok(n) if n > 0 && n <= 7 * 24 * 3600 => Ok(Duration::from_secs(n)),
                _ => Err(format!(
                    "{name}: {v:?} is not a number of seconds in 1..=604800"
                )),
            },
        }
    }

    fn database_url(&self) -> Result<String, String> {
        self.get("--database-url")
            .map(str::to_owned)
            .or_else(|| std::env::var("WRENN_DATABASE_URL").ok())
            .or_else(|| std::env::var("DATABASE_URL").ok())
            .ok_or_else(|| {
                "no database: pass --database-url or set WRENN_DATABASE_URL / DATABASE_URL"
                    .to_owned()
            })
    }
}

fn serve(args: &[String]) -> Result<(), Failure> {
    let f = Flags::parse(
        args,
        &[
            "--database-url",
            "--listen",
            "--http-listen",
            "--host-listen",
            "--db-workers",
            "--reconcile-interval-s",
            "--heartbeat-timeout-s",
            "--lifecycle-timeout-s",
            "--build-context-max-mib",
            "--tls-cert",
            "--tls-key",
            "--tls-sandbox-domain",
            "--tls-sandbox-cert",
            "--tls-sandbox-key",
            "--tls-ca-cert",
            "--tls-ca-key",
            "--traffic-domain",
        ],
        &[
            "--no-http",
            "--keep-unknown",
            "--webhook-allow-private",
            "--plaintext",
            "--tls12",
        ],
    )?;
    let tls_file = |flag: &str, env: &str| {
        f.get(flag)
            .map(str::to_owned)
            .or_else(|| std::env::var(env).ok().filter(|s| !s.is_empty()))
    };
    let cert = match (
        tls_file("--tls-cert", "WRENN_TLS_CERT"),
        tls_file("--tls-key", "WRENN_TLS_KEY"),
        f.has("--plaintext"),
    ) {
        (Some(c), Some(k), false) => {
            Some((std::path::PathBuf::from(c), std::path::PathBuf::from(k)))
        }
        (None, None, true) => None,
        (Some(_), Some(_), true) => {
            return Err("--plaintext and --tls-cert/--tls-key exclude each other".into())
        }
        (Some(_), None, _) | (None, Some(_), _) => {
            return Err(
                "--tls-cert and --tls-key (WRENN_TLS_CERT, WRENN_TLS_KEY) go together".into(),
            )
        }
        (None, None, false) => {
            return Err("the client ports speak TLS: pass --tls-cert and --tls-key \
                        (WRENN_TLS_CERT, WRENN_TLS_KEY; `wrenn-ctl admin tls init` makes them), \
                        or --plaintext"
                .into())
        }
    };
    let cert_given = cert.is_some();
    let db_workers = match f.get("--db-workers") {
        None => ctl::limits::DB_WORKERS_DEFAULT,
        Some(v) => v
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=256).contains(n))
            .ok_or("--db-workers must be 1..=256")?,
    };
    let sandbox = match (
        tls_file("--tls-sandbox-domain", "WRENN_TLS_SANDBOX_DOMAIN"),
        tls_file("--tls-sandbox-cert", "WRENN_TLS_SANDBOX_CERT"),
        tls_file("--tls-sandbox-key", "WRENN_TLS_SANDBOX_KEY"),
    ) {
        (None, None, None) => None,
        (Some(domain), Some(cert), Some(key)) if cert_given => Some(ctl::config::SandboxCert {
            domain,
            cert: cert.into(),
            key: key.into(),
        }),
        _ => {
            return Err(
                "--tls-sandbox-domain, --tls-sandbox-cert and --tls-sandbox-key go \
                        together, with --tls-cert"
                    .into(),
            )
        }
    };
    // The CA that issues host certificates at registration: every replica reads the same
    // files (the key mode 0600).
    let issuer =
        match (
            tls_file("--tls-ca-cert", "WRENN_TLS_CA_CERT"),
            tls_file("--tls-ca-key", "WRENN_TLS_CA_KEY"),
        ) {
            (None, None) => None,
            (Some(c), Some(k)) => Some(std::sync::Arc::new(
                ctl::pki::Authority::load(c.as_ref(), k.as_ref())
                    .map_err(|e| format!("--tls-ca-cert/--tls-ca-key: {e}"))?,
            )),
            _ => return Err(
                "--tls-ca-cert and --tls-ca-key (WRENN_TLS_CA_CERT, WRENN_TLS_CA_KEY) go together"
                    .into(),
            ),
        };
    // The sandbox ports' domain: its own, or the wildcard certificate's.
    let traffic_domain = match tls_file("--traffic-domain", "WRENN_TRAFFIC_DOMAIN")
        .or_else(|| sandbox.as_ref().map(|s| s.domain.clone()))
    {
        None => None,
        Some(d) => Some(ctl::config::traffic_domain(&d).map_err(Failure::from)?),
    };
    let jobs_default = JobsConfig::default();
    let api_default = ApiConfig::default();
    let lifecycle = f.secs("--lifecycle-timeout-s", api_default.agent_lifecycle_timeout)?;
    let cfg = Config {
        database_url: f.database_url()?,
        listen: f.addr("--listen", "WRENN_LISTEN", "0.0.0.0:7700")?,
        http_listen: f.addr("--http-listen", "WRENN_HTTP_LISTEN", "0.0.0.0:7701")?,
        host_listen: f.addr("--host-listen", "WRENN_HOST_LISTEN", "0.0.0.0:7702")?,
        db_workers,
        api: ApiConfig {
            agent_lifecycle_timeout: lifecycle,
            webhooks: ctl::config::WebhookConfig {
                allow_private: f.has("--webhook-allow-private"),
                ..Default::default()
            },
            issuer,
            build_context_max: match f.get("--build-context-max-mib") {
                None => api_default.build_context_max,
                Some(v) => match v.parse::<u64>() {
                    Ok(n) if (1..=64 * 1024).contains(&n) => n << 20,
                    _ => {
                        return Err(Failure::from(format!(
                            "--build-context-max-mib: {v:?} is not a number of MiB in 1..=65536"
                        )))
                    }
                },
            },
            ..api_default
        },
        jobs: JobsConfig {
            reconcile_interval: f
                .secs("--reconcile-interval-s", jobs_default.reconcile_interval)?,
            heartbeat_timeout: f.secs("--heartbeat-timeout-s", jobs_default.heartbeat_timeout)?,
            destroy_unknown: !f.has("--keep-unknown"),
            create_deadline: lifecycle,
            ..jobs_default
        },
        tls: ctl::config::TlsConfig {
            cert,
            allow_tls12: f.has("--tls12"),
            sandbox,
        },
        traffic_domain,
    };
    if cfg.tls.cert.is_none() {
        log::warn!("client ports in plaintext (--plaintext): API keys cross the network in clear");
    }
    let term =
        proto::signal::Termination::install().map_err(|e| format!("signal handlers: {e}"))?;
    let running = ctl::server::start(
        &cfg,
        ctl::server::StartOpts {
            jobs: true,
            http: !f.has("--no-http"),
        },
    )
    .map_err(|e| Failure::Runtime(error_chain(&e)))?;
    // SIGTERM/SIGINT drain the protobuf server: GOAWAY, open calls finish (PROTOCOL.md §5).
    let handle = running.handle.clone();
    std::thread::Builder::new()
        .name("ctl-signals".into())
        .spawn(move || {
            if let Ok(sig) = term.wait() {
                log::info!("draining protobuf server signal={sig}");
                handle.shutdown();
            }
        })
        .map_err(|e| Failure::Runtime(format!("spawn signal thread: {e}")))?;
    running
        .wait()
        .map_err(|e| Failure::Runtime(format!("server: {e}")))
}

fn admin(args: &[String]) -> Result<(), Failure> {
    let Some((cmd, rest)) = args.split_first() else {
        return Err("admin needs a subcommand".into());
    };
    match cmd.as_str() {
        "migrate" => {
            let f = Flags::parse(rest, &["--database-url"], &[])?;
            let done = ctl::admin::migrate(&f.database_url()?)
                .map_err(|e| Failure::Runtime(error_chain(&e)))?;
            println!("migrations applied now: {done:?}");
            Ok(())
        }
        "init" => {
            let f = Flags::parse(
                rest,
                &["--database-url", "--team", "--email", "--name"],
                &[],
            )?;
            let team = f.get("--team").ok_or("--team is required")?;
            let email = f.get("--email").ok_or("--email is required")?;
            let name = f.get("--name").unwrap_or("");
            let i = ctl::admin::init(&f.database_url()?, team, email, name)
                .map_err(|e| Failure::Runtime(error_chain(&e)))?;
            println!("team:               {}", i.team_id);
            println!("user:               {}", i.user_id);
            println!("team api key:       {}  ({})", i.team_key, i.team_key_id);
            println!("platform admin key: {}  ({})", i.admin_key, i.admin_key_id);
            println!("These keys are shown once; store them now.");
            Ok(())
        }
        "create-team" => {
            let f = Flags::parse(
                rest,
                &["--database-url", "--team", "--email", "--name"],
                &[],
            )?;
            let team = f.get("--team").ok_or("--team is required")?;
            let email = f.get("--email").ok_or("--email is required")?;
            let name = f.get("--name").unwrap_or("");
            let t = ctl::admin::create_team(&f.database_url()?, team, email, name)
                .map_err(|e| Failure::Runtime(error_chain(&e)))?;
            println!("team:         {}", t.team_id);
            println!("user:         {}", t.user_id);
            println!("team api key: {}  ({})", t.key, t.key_id);
            println!("The key is shown once; store it now.");
            Ok(())
        }
        "create-registration-token" => {
            let f = Flags::parse(rest, &["--database-url", "--ttl-s", "--tls-ca-cert"], &[])?;
            let ttl = f.secs(
                "--ttl-s",
                Duration::from_secs(ctl::limits::REGISTRATION_TTL_DEFAULT_S),
            )?;
            // The CA pin (SHA-256 of ctl's CA certificate) rides in the token.
            let pin = match f.get("--tls-ca-cert").map(str::to_owned).or_else(|| {
                std::env::var("WRENN_TLS_CA_CERT")
                    .ok()
                    .filter(|s| !s.is_empty())
            }) {
                None => None,
                Some(p) => {
                    let pem = tls::read_pem_file(std::path::Path::new(&p))
                        .map_err(|e| Failure::Runtime(e.to_string()))?;
                    let der = tls::certs_from_pem(&pem, &p)
                        .map_err(|e| Failure::Runtime(e.to_string()))?;
                    Some(tls::ca_fingerprint(&der[0]))
                }
            };
            let (tok, exp) =
                ctl::admin::create_registration_token(&f.database_url()?, ttl.as_secs())
                    .map_err(|e| Failure::Runtime(error_chain(&e)))?;
            match pin {
                Some(pin) => println!("{tok}{}{pin}", tls::hostkey::PIN_SEPARATOR),
                None => println!("{tok}"),
            }
            eprintln!("one-time registration token; expires at {exp} ns since the epoch");
            Ok(())
        }
        "revoke-host" => {
            let f = Flags::parse(rest, &["--database-url", "--host"], &[])?;
            let host = f.get("--host").ok_or("--host is required")?;
            let n = ctl::admin::revoke_host(&f.database_url()?, host)
                .map_err(|e| Failure::Runtime(error_chain(&e)))?;
            println!("revoked {n} certificate(s) of {host}; every replica closes its connections");
            Ok(())
        }
        "adopt-template" => {
            let f = Flags::parse(
                rest,
                &[
                    "--database-url",
                    "--host",
                    "--template",
                    "--name",
                    "--vcpus",
                    "--memory-mib",
                    "--disk-mib",
                ],
                &[],
            )?;
            let num = |k: &'static str| -> Result<u64, Failure> {
                let v = f.get(k).ok_or_else(|| format!("{k} is required"))?;
                v.parse::<u64>()
                    .map_err(|_| Failure::from(format!("{k}: {v:?} is not a number")))
            };
            let t = ctl::admin::AdoptTemplate {
                host_id: f.get("--host").ok_or("--host is required")?,
                template_id: f.get("--template").ok_or("--template is required")?,
                name: f.get("--name").ok_or("--name is required")?,
                vcpus: u32::try_from(num("--vcpus")?).map_err(|_| "--vcpus is too large")?,
                memory_mib: u32::try_from(num("--memory-mib")?)
                    .map_err(|_| "--memory-mib is too large")?,
                disk_mib: num("--disk-mib")?,
            };
            ctl::admin::adopt_template(&f.database_url()?, &t)
                .map_err(|e| Failure::Runtime(error_chain(&e)))?;
            println!(
                "{} is the platform template {:?} on {}",
                t.template_id, t.name, t.host_id
            );
            Ok(())
        }
        "tls" => match rest.split_first() {
            Some((sub, rest)) if sub == "init" => {
                let f = Flags::parse(rest, &["--dir", "--names"], &[])?;
                let dir = f.get("--dir").ok_or("--dir is required")?;
                let names: Vec<String> = f
                    .get("--names")
                    .ok_or("--names is required (the DNS names and IP addresses clients use)")?
                    .split(',')
                    .map(|s| s.trim().to_owned())
                    .filter(|s| !s.is_empty())
                    .collect();
                let files = ctl::pki::init(std::path::Path::new(dir), &names)
                    .map_err(|e| Failure::Runtime(e.to_string()))?;
                println!("ca certificate:     {}", files.ca_cert.display());
                println!("ca key (mode 0600): {}", files.ca_key.display());
                println!("server certificate: {}", files.server_cert.display());
                println!("server key:         {}", files.server_key.display());
                println!("ca sha-256:         {}", files.fingerprint);
                println!(
                    "serve with --tls-cert {} --tls-key {}; clients set WRENN_CA={}",
                    files.server_cert.display(),
                    files.server_key.display(),
                    files.ca_cert.display()
                );
                Ok(())
            }
            _ => Err("admin tls needs a subcommand: init".into()),
        },
        other => Err(Failure::Usage(format!(
            "unknown admin subcommand {other:?}"
        ))),
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn main() -> ExitCode {
    proto::logger::init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let r = match args.split_first() {
        Some((c, _)) if c == "--version" || c == "-V" || c == "version" => {
            println!("wrenn-ctl {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Some((c, _)) if c == "--help" || c == "-h" || c == "help" => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Some((c, rest)) if (c == "serve" || c == "admin") && wants_help(rest) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Some((c, rest)) if c == "serve" => serve(rest),
        Some((c, rest)) if c == "admin" => admin(rest),
        Some((c, _)) => Err(Failure::Usage(format!("unknown command {c:?}"))),
        None => Err(Failure::Usage("missing command".into())),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(e)) => {
            eprintln!("wrenn-ctl: {e}\n{USAGE}");
            ExitCode::from(2)
        }
        Err(Failure::Runtime(e)) => {
            eprintln!("wrenn-ctl: {e}");
            ExitCode::from(1)
        }
    }
}
