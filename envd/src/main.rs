//! `envd [--listen-unix PATH | --listen-tcp ADDR | --vsock-port PORT] [--no-announce]
//! [--announce-unix PATH] [--accounts-root DIR]`: parses flags and runs
//! [`envd::daemon::run`]. `envd selftest ...` runs the copy self-test instead
//! ([`envd::selftest`]).

#![forbid(unsafe_code)]

use std::path::PathBuf;

use envd::daemon::{Listen, Options};

const USAGE: &str = "usage: envd [--listen-unix PATH | --listen-tcp ADDR | --vsock-port PORT] \
[--no-announce] [--announce-unix PATH] [--accounts-root DIR]
       envd selftest [--dir DIR] [--mib N] [--rounds N] [--threads N]   (see envd selftest --help)
  --listen-unix PATH    serve on a Unix socket (tests, development)
  --listen-tcp ADDR     serve on TCP, e.g. 127.0.0.1:49983
  --vsock-port PORT     serve on AF_VSOCK (default 49983)
  --no-announce         do not push readiness to the host (CID 2, port 49984)
  --announce-unix PATH  push readiness to a Unix socket instead of the host
  --accounts-root DIR   read users from DIR/etc/passwd and DIR/etc/group (default /; tests)";

/// Parses the arguments after the program name.
fn parse(args: &[String]) -> Result<Options, String> {
    let mut listen: Option<Listen> = None;
    let mut announce = true;
    let mut announce_unix = None;
    let mut accounts_root = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{name} needs a value"))
        };
        let set = |l: &mut Option<Listen>, v: Listen| {
            if l.is_some() {
                return Err("only one of --listen-unix, --listen-tcp, --vsock-port".to_string());
            }
            *l = Some(v);
            Ok(())
        };
        match a.as_str() {
            "--listen-unix" => set(&mut listen, Listen::Unix(PathBuf::from(value(a)?)))?,
            "--listen-tcp" => {
                let v = value(a)?;
                let addr = v.parse().map_err(|e| format!("--listen-tcp {v}: {e}"))?;
                set(&mut listen, Listen::Tcp(addr))?
            }
            "--vsock-port" => {
                let v = value(a)?;
                let port = v.parse().map_err(|e| format!("--vsock-port {v}: {e}"))?;
                set(&mut listen, Listen::Vsock(port))?
            }
            "--no-announce" => announce = false,
            "--announce-unix" => announce_unix = Some(PathBuf::from(value(a)?)),
            "--accounts-root" => accounts_root = Some(PathBuf::from(value(a)?)),
            "-h" | "--help" => return Err(USAGE.to_string()),
            "--version" => return Err(format!("envd {}", env!("CARGO_PKG_VERSION"))),
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    Ok(Options {
        listen: listen.unwrap_or(Listen::Vsock(envd::vsock::API_PORT)),
        announce,
        announce_unix,
        accounts_root,
    })
}

/// As PID 1, envd's arguments are whatever words of the kernel command line the kernel did
/// not recognise (e.g. `noxsave`): they are the boot configuration's, not envd's, so they
/// are ignored rather than refused — refusing them would panic the guest.
fn args_for(pid1: bool, args: Vec<String>) -> Vec<String> {
    if !pid1 {
        return args;
    }
    const WITH_VALUE: [&str; 5] = [
        "--listen-unix",
        "--listen-tcp",
        "--vsock-port",
        "--announce-unix",
        "--accounts-root",
    ];
    const PLAIN: [&str; 1] = ["--no-announce"];
    let mut kept = Vec::new();
    let mut ignored = Vec::new();
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        if WITH_VALUE.contains(&a.as_str()) {
            kept.push(a);
            kept.extend(it.next());
        } else if PLAIN.contains(&a.as_str()) {
            kept.push(a);
        } else {
            ignored.push(a);
        }
    }
    if !ignored.is_empty() {
        eprintln!("envd: ignoring kernel command-line words {ignored:?}");
    }
    kept
}

/// `envd selftest ...`: prints the report, exits 0 (clean), 1 (corruption) or 2 (error).
fn selftest(args: &[String]) -> ! {
    let opts = match envd::selftest::parse(args) {
        Ok(o) => o,
        Err(msg) => {
            eprintln!("{msg}");
            std::process::exit(2);
        }
    };
    match envd::selftest::run(&opts, &mut std::io::stderr()) {
        Ok(report) => {
            let mut out = std::io::stdout();
            let _ = std::io::Write::write_all(&mut out, report.render().as_bytes());
            let _ = std::io::Write::flush(&mut out);
            std::process::exit(if report.corrupted().is_empty() { 0 } else { 1 });
        }
        Err(e) => {
            eprintln!("envd selftest: {e}");
            std::process::exit(2);
        }
    }
}

fn main() {
    let pid1 = std::process::id() == 1;
    let argv: Vec<String> = std::env::args().skip(1).collect();
    if !pid1 && argv.first().map(String::as_str) == Some("selftest") {
        selftest(&argv[1..]);
    }
    let args = args_for(pid1, argv);
    let opts = match parse(&args) {
        Ok(o) => o,
        Err(msg) => {
            eprintln!("{msg}");
            std::process::exit(2);
        }
    };
    if let Err(e) = envd::daemon::run(opts) {
        eprintln!("envd: {e}");
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(a: &[&str]) -> Result<Options, String> {
        parse(&a.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn flags() {
        assert_eq!(p(&[]).unwrap().listen, Listen::Vsock(49983));
        assert!(p(&[]).unwrap().announce);
        let o = p(&["--listen-unix", "/tmp/x", "--no-announce"]).unwrap();
        assert_eq!(o.listen, Listen::Unix("/tmp/x".into()));
        assert!(!o.announce);
        assert_eq!(
            p(&["--listen-tcp", "127.0.0.1:5"]).unwrap().listen,
            Listen::Tcp("127.0.0.1:5".parse().unwrap())
        );
        assert_eq!(p(&["--vsock-port", "7"]).unwrap().listen, Listen::Vsock(7));
        assert_eq!(p(&[]).unwrap().accounts_root, None);
        assert_eq!(
            p(&["--accounts-root", "/r"]).unwrap().accounts_root,
            Some(PathBuf::from("/r"))
        );
        assert!(p(&["--accounts-root"]).is_err());
        assert!(p(&["--listen-unix"]).is_err());
        assert!(p(&["--listen-tcp", "nonsense"]).is_err());
        assert!(p(&["--vsock-port", "-1"]).is_err());
        assert!(p(&["--listen-unix", "/a", "--vsock-port", "1"]).is_err());
        assert!(p(&["--bogus"]).is_err());
    }

    #[test]
    fn pid1_ignores_kernel_words() {
        let a = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            args_for(true, a(&["noxsave", "--no-announce", "quiet"])),
            a(&["--no-announce"])
        );
        // Flag values survive (the PID-1 test passes a socket path).
        assert_eq!(
            args_for(
                true,
                a(&["--listen-unix", "/tmp/s", "noxsave", "--no-announce"])
            ),
            a(&["--listen-unix", "/tmp/s", "--no-announce"])
        );
        assert_eq!(args_for(false, a(&["noxsave"])), a(&["noxsave"]));
        assert!(parse(&args_for(false, a(&["noxsave"]))).is_err());
    }
}
