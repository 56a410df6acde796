//! `cargo run --release -p bench -- <name>|all [--quick]`: runs benchmark cases, each
//! against a baseline measured in the same run (see harness.rs for the output format).

use std::process::ExitCode;

use bench::{cases, harness};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // Re-executed as envd by the envd cases when no envd binary sits next to this one.
    if args.first().map(String::as_str) == Some(bench::envd::ENVD_SUBCOMMAND) {
        return match bench::envd::run_envd(&args[1..]) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("envd: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let quick = args.iter().any(|a| a == "--quick");
    let names: Vec<&String> = args.iter().filter(|a| !a.starts_with("--")).collect();
    if names.is_empty() || args.iter().any(|a| a == "--help" || a == "-h") {
        eprintln!("usage: bench <name>|all [--quick]\ncases:");
        for c in cases() {
            eprintln!("  {}", c.name);
        }
        return if names.is_empty() {
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        };
    }
    let all = cases();
    for n in &names {
        if *n != "all" && !all.iter().any(|c| c.name == n.as_str()) {
            eprintln!("error: unknown case {n}");
            return ExitCode::FAILURE;
        }
    }
    let opts = harness::Opts { quick };
    let mut failed = 0;
    for c in all
        .iter()
        .filter(|c| names.iter().any(|n| *n == "all" || *n == c.name))
    {
        if let Err(e) = (c.run)(&opts) {
            println!("bench={} error={}", c.name, e.replace(' ', "_"));
            failed += 1;
        }
    }
    if failed > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
