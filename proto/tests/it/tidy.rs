//! Tidy checks over the whole workspace, run as ordinary tests:
//! - every direct dependency of a workspace crate is on `deps-allowed.txt` and explained in
//!   `DEPENDENCIES.md`;
//! - each binary package links no more third-party crates than its goal (printed);
//! - every `unsafe` block, fn or impl has a `SAFETY` comment within the three lines above.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .unwrap()
}

fn cargo() -> Command {
    let mut c = Command::new(env!("CARGO"));
    c.current_dir(root());
    c
}

fn allowed() -> BTreeSet<String> {
    std::fs::read_to_string(root().join("deps-allowed.txt"))
        .expect("deps-allowed.txt")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect()
}

#[test]
fn dependencies_are_allowed_and_explained() {
    let out = cargo()
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .output()
        .or_else(|_| {
            cargo()
                .args(["metadata", "--format-version", "1", "--no-deps"])
                .output()
        })
        .expect("cargo metadata runs");
    assert!(
        out.status.success(),
        "cargo metadata: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let ours: BTreeSet<String> = meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap().to_owned())
        .collect();
    let allowed = allowed();
    let explained =
        std::fs::read_to_string(root().join("DEPENDENCIES.md")).expect("DEPENDENCIES.md");
    let mut problems = Vec::new();
    for p in meta["packages"].as_array().unwrap() {
        let pkg = p["name"].as_str().unwrap();
        for d in p["dependencies"].as_array().unwrap() {
            let name = d["name"].as_str().unwrap();
            if ours.contains(name) {
                continue;
            }
            if !allowed.contains(name) {
                problems.push(format!(
                    "{pkg} depends on {name}, which is not in deps-allowed.txt"
                ));
            }
            if !explained.contains(&format!("`{name}`")) {
                problems.push(format!(
                    "{pkg} depends on {name}, which DEPENDENCIES.md does not explain"
                ));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "dependency policy:\n{}",
        problems.join("\n")
    );
}

/// Third-party crates linked into a package's binaries: normal dependencies, proc-macro
/// subtrees excluded, our own crates excluded.
fn linked_crates(package: &str, features: Option<&str>) -> BTreeSet<String> {
    let mut args = vec![
        "tree",
        "-p",
        package,
        "-e",
        "normal,no-proc-macro",
        "--prefix",
        "none",
        "--format",
        "{p}",
    ];
    if let Some(f) = features {
        args.extend(["--no-default-features", "--features", f]);
    }
    let out = cargo().args(&args).output().expect("cargo tree runs");
    assert!(
        out.status.success(),
        "cargo tree: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.contains("(/") && !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect()
}

#[test]
fn binaries_stay_within_their_crate_budgets() {
    // (package, features, goal)
    let budgets = [
        ("envd", None, 9),
        ("uffd", None, 10),
        ("agent", None, 26),
        ("ctl", None, 80),
        ("wrenn", None, 18),
    ];
    let mut over = Vec::new();
    for (pkg, features, goal) in budgets {
        let crates = linked_crates(pkg, features);
        let list: Vec<&str> = crates.iter().map(String::as_str).collect();
        println!(
            "crates linked into {pkg}: {} (goal <= {goal}): {}",
            crates.len(),
            list.join(" ")
        );
        if crates.len() > goal {
            over.push(format!("{pkg}: {} > {goal}", crates.len()));
        }
    }
    assert!(over.is_empty(), "over budget: {}", over.join(", "));
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        let name = e.file_name();
        let name = name.to_string_lossy();
        if p.is_dir() {
            if name == "target" || name.starts_with('.') || name == "gen" {
                continue;
            }
            rust_files(&p, out);
        } else if name.ends_with(".rs") {
            out.push(p);
        }
    }
}

/// Lines that open an unsafe block, fn or impl without a SAFETY comment just above.
pub fn undocumented_unsafe(src: &str) -> Vec<usize> {
    let lines: Vec<&str> = src.lines().collect();
    let mut bad = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let t = line.trim_start();
        if t.starts_with("//") || t.starts_with("#[") {
            continue;
        }
        let code = t.split("//").next().unwrap_or("");
        // Spelled in pieces so this file's own text never looks like an unsafe block.
        let opens = [" {", " fn", " impl", " extern"]
            .iter()
            .any(|k| code.contains(&format!("{}{k}", "unsafe")));
        if !opens {
            continue;
        }
        let window = &lines[i.saturating_sub(3)..=i];
        if !window
            .iter()
            .any(|l| l.contains("SAFETY") || l.contains("# Safety"))
        {
            bad.push(i + 1);
        }
    }
    bad
}

#[test]
fn every_unsafe_has_a_safety_comment() {
    let mut files = Vec::new();
    for dir in [
        "proto", "tls", "uffd", "envd", "vmm-glue", "agent", "ctl", "bench", "fuzz",
    ] {
        rust_files(&root().join(dir), &mut files);
    }
    assert!(files.len() > 10, "found only {} source files", files.len());
    let mut problems = Vec::new();
    for f in files {
        let src = std::fs::read_to_string(&f).unwrap();
        for line in undocumented_unsafe(&src) {
            problems.push(format!("{}:{line}", f.display()));
        }
    }
    assert!(
        problems.is_empty(),
        "unsafe without a SAFETY comment:\n{}",
        problems.join("\n")
    );
}

#[test]
fn the_unsafe_check_itself_can_fail() {
    let bad = concat!("fn f() {\n    let x = 1;\n    unsa", "fe { g() }\n}\n");
    assert_eq!(undocumented_unsafe(bad), vec![3]);
    let good = "fn f() {\n    // SAFETY: g has no preconditions.\n    unsafe { g() }\n}\n";
    assert!(undocumented_unsafe(good).is_empty());
}
