//! `wrenn-uffd`: the userfaultfd page server of one restored VM. This file only parses flags;
//! the server is `uffd::page_server`. Flags are documented in `uffd/HEADER.md`.

use std::path::PathBuf;
use std::time::Duration;

use uffd::page_server::{Config, Outcome, PageServer};

const USAGE: &str =
    "usage: wrenn-uffd --socket PATH --firecracker-pid PID --header PATH --layers DIR...
                  [--prefetch PATH] [--record PATH [--record-seconds N]] [--stats PATH]
                  [--fault-around BYTES] [--no-background-fill] [--spin-us N]
                  [--socket-owner UID:GID] [--run-as UID:GID]";

#[derive(Debug, PartialEq)]
struct Flags {
    socket: PathBuf,
    pid: i32,
    header: PathBuf,
    layers: Vec<PathBuf>,
    prefetch: Option<PathBuf>,
    record: Option<PathBuf>,
    record_seconds: Option<u64>,
    stats: Option<PathBuf>,
    fault_around: Option<u64>,
    background_fill: bool,
    spin_us: Option<u64>,
    socket_owner: Option<(u32, u32)>,
    run_as: Option<(u32, u32)>,
}

/// `UID:GID`, both numbers.
fn ids(flag: &str, v: &str) -> Result<(u32, u32), String> {
    v.split_once(':')
        .and_then(|(u, g)| Some((u.parse().ok()?, g.parse().ok()?)))
        .ok_or_else(|| format!("{flag}: not UID:GID: {v}"))
}

fn parse(args: &[String]) -> Result<Flags, String> {
    let mut socket = None;
    let mut pid = None;
    let mut header = None;
    let mut layers = Vec::new();
    let mut f = Flags {
        socket: PathBuf::new(),
        pid: 0,
        header: PathBuf::new(),
        layers: Vec::new(),
        prefetch: None,
        record: None,
        record_seconds: None,
        stats: None,
        fault_around: None,
        background_fill: true,
        spin_us: None,
        socket_owner: None,
        run_as: None,
    };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        if flag == "--no-background-fill" {
            f.background_fill = false;
            continue;
        }
        let mut value = || {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{flag} needs a value"))
        };
        let number = |s: String| {
            s.parse::<u64>()
                .map_err(|_| format!("{flag}: not a number: {s}"))
        };
        match flag.as_str() {
            "--socket" => socket = Some(PathBuf::from(value()?)),
            "--firecracker-pid" => {
                let v = value()?;
                let p = v
                    .parse::<i32>()
                    .ok()
                    .filter(|p| *p > 0)
                    .ok_or(format!("{flag}: not a pid: {v}"))?;
                pid = Some(p);
            }
            "--header" => header = Some(PathBuf::from(value()?)),
            "--layers" => layers.push(PathBuf::from(value()?)),
            "--prefetch" => f.prefetch = Some(PathBuf::from(value()?)),
            "--record" => f.record = Some(PathBuf::from(value()?)),
            "--record-seconds" => f.record_seconds = Some(number(value()?)?),
            "--stats" => f.stats = Some(PathBuf::from(value()?)),
            "--fault-around" => f.fault_around = Some(number(value()?)?),
            "--spin-us" => f.spin_us = Some(number(value()?)?),
            "--socket-owner" => f.socket_owner = Some(ids(flag, &value()?)?),
            "--run-as" => {
                let v = ids(flag, &value()?)?;
                if v.0 == 0 || v.1 == 0 {
                    return Err(format!("{flag}: not root"));
                }
                f.run_as = Some(v);
            }
            other => return Err(format!("unknown flag {other}")),
        }
    }
    f.socket = socket.ok_or("--socket is required")?;
    f.pid = pid.ok_or("--firecracker-pid is required")?;
    f.header = header.ok_or("--header is required")?;
    if layers.is_empty() {
        return Err("--layers is required".into());
    }
    f.layers = layers;
    if f.record_seconds.is_some() && f.record.is_none() {
        return Err("--record-seconds needs --record".into());
    }
    Ok(f)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("{USAGE}");
        return;
    }
    let flags = match parse(&args) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("wrenn-uffd: {e}\n{USAGE}");
            std::process::exit(2);
        }
    };
    proto::logger::init();
    // Signal fds before any thread exists, so that the signals stay blocked everywhere.
    let stop_fd = uffd::sys::signalfd(&[libc::SIGTERM, libc::SIGINT]);
    let record_stop_fd = uffd::sys::signalfd(&[libc::SIGUSR1]);
    let (stop_fd, record_stop_fd) = match (stop_fd, record_stop_fd) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) | (_, Err(e)) => {
            log::error!("cannot create signalfd error={e}");
            std::process::exit(1);
        }
    };
    let mut config = Config::new(flags.socket, flags.pid, flags.header, PathBuf::new());
    config.layer_dirs = flags.layers;
    config.prefetch = flags.prefetch;
    config.record = flags.record;
    // Recording stops on SIGUSR1, or after 30 s when no time is given.
    config.record_for = config
        .record
        .as_ref()
        .map(|_| Duration::from_secs(flags.record_seconds.unwrap_or(30)));
    config.stats_path = flags.stats;
    if let Some(b) = flags.fault_around {
        config.fault_around = b;
    }
    config.background_fill = flags.background_fill;
    if let Some(us) = flags.spin_us {
        config.spin = Duration::from_micros(us);
    }
    config.socket_owner = flags.socket_owner;
    config.stop_fd = Some(stop_fd);
    config.record_stop_fd = Some(record_stop_fd);
    let server = match PageServer::bind(config) {
        Ok(s) => s,
        Err(e) => {
            log::error!(
                "cannot start error={e} cause={:?}",
                std::error::Error::source(&e).map(|s| s.to_string())
            );
            std::process::exit(1);
        }
    };
    // Everything is open: from here on an unprivileged process, before the first fault.
    if let Some((uid, gid)) = flags.run_as {
        if let Err(e) = uffd::privileges::drop_to(uid, gid) {
            log::error!(
                "cannot drop privileges error={e} cause={:?}",
                std::error::Error::source(&e).map(|s| s.to_string())
            );
            std::process::exit(1);
        }
        log::info!("privileges dropped uid={uid} gid={gid}");
    }
    match server.run() {
        Ok((outcome, stats)) => {
            let how = match outcome {
                Outcome::Resident => "resident",
                Outcome::FirecrackerExited => "firecracker_exited",
                Outcome::Stopped => "stopped",
            };
            log::info!(
                "exit outcome={how} faults={} pages_resident={}",
                stats.faults,
                stats.pages_resident
            );
        }
        // run() has logged the error and killed Firecracker.
        Err(_) => std::process::exit(1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn parses_all_flags() {
        let f = parse(&args(
            "--socket /s --firecracker-pid 42 --header /h --layers /l --prefetch /p --record /r \
             --record-seconds 5 --stats /st --fault-around 65536 --no-background-fill --spin-us 10",
        ))
        .unwrap();
        assert_eq!(f.pid, 42);
        assert_eq!(f.record_seconds, Some(5));
        assert!(!f.background_fill);
        let two = parse(&args(
            "--socket /s --firecracker-pid 1 --header /h --layers /a --layers /b",
        ))
        .unwrap();
        assert_eq!(two.layers, vec![PathBuf::from("/a"), PathBuf::from("/b")]);
        assert_eq!(f.spin_us, Some(10));
        let j = parse(&args(
            "--socket /s --firecracker-pid 1 --header /h --layers /l --socket-owner 900001:900001 \
             --run-as 904096:904096",
        ))
        .unwrap();
        assert_eq!(j.socket_owner, Some((900_001, 900_001)));
        assert_eq!(j.run_as, Some((904_096, 904_096)));
    }

    #[test]
    fn rejects_bad_flags() {
        assert!(parse(&args("--socket /s")).is_err());
        assert!(parse(&args(
            "--socket /s --firecracker-pid x --header /h --layers /l"
        ))
        .is_err());
        assert!(parse(&args(
            "--socket /s --firecracker-pid 0 --header /h --layers /l"
        ))
        .is_err());
        assert!(parse(&args(
            "--socket /s --firecracker-pid 1 --header /h --layers /l --bogus"
        ))
        .is_err());
        assert!(parse(&args(
            "--socket /s --firecracker-pid 1 --header /h --layers /l --stats"
        ))
        .is_err());
        assert!(parse(&args(
            "--socket /s --firecracker-pid 1 --header /h --layers /l --record-seconds 3"
        ))
        .is_err());
        for bad in [
            "--run-as 0:5",
            "--run-as 5:0",
            "--run-as 5",
            "--socket-owner a:b",
        ] {
            assert!(parse(&args(&format!(
                "--socket /s --firecracker-pid 1 --header /h --layers /l {bad}"
            )))
            .is_err());
        }
    }
}
