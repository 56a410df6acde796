//! `wrenn`: the CLI. For now only `wrenn image kernel|rootfs`; the API client, `up`/`down` and
//! `doctor` come later and extend this dispatcher. Logic lives in the library.

#![forbid(unsafe_code)]

use std::process::ExitCode;

const USAGE: &str = "usage: wrenn <command> [flags]\n\ncommands:\n  image kernel|rootfs   build guest images (wrenn image --help)\n  up | down             start / stop the whole system on this machine (wrenn up --help)\n  doctor                check this host for running sandboxes (wrenn doctor --help)\n";

fn main() -> ExitCode {
    proto::logger::init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("image") => wrenn::image::run(&args[1..]),
        Some("up") => return exit(wrenn::up::run(&args[1..])),
        Some("down") => return exit(wrenn::up::down(&args[1..])),
        Some("doctor") => return exit(wrenn::doctor::run(&args[1..])),
        // The API client: `wrenn sandbox|process|file|template|key|team|user|host|audit ...`.
        Some(group) if wrenn::cli::is_group(group) => {
            return ExitCode::from(wrenn::cli::run(&args))
        }
        Some("-h" | "--help" | "help") => {
            print!("{USAGE}{}", wrenn::cli::groups_usage());
            return ExitCode::SUCCESS;
        }
        Some(other) => {
            eprint!(
                "wrenn: unknown command {other:?}\n{USAGE}{}",
                wrenn::cli::groups_usage()
            );
            return ExitCode::from(2);
        }
        None => {
            eprint!("{USAGE}{}", wrenn::cli::groups_usage());
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let mut msg = format!("wrenn: {e}");
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                msg.push_str(&format!(": {s}"));
                source = s.source();
            }
            eprintln!("{msg}");
            ExitCode::FAILURE
        }
    }
}

/// Exit status of `up`, `down` and `doctor`: the error and its sources on one line.
fn exit<E: std::error::Error>(result: Result<(), E>) -> ExitCode {
    let Err(e) = result else {
        return ExitCode::SUCCESS;
    };
    let mut msg = format!("wrenn: {e}");
    let mut source = e.source();
    while let Some(s) = source {
        msg.push_str(&format!(": {s}"));
        source = s.source();
    }
    eprintln!("{msg}");
    ExitCode::FAILURE
}
