//! docs/operations.md lists every flag of every binary and every `WRENN_*` variable the
//! code reads: this test reads the flag parsers' sources and the whole tree for variables.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// `--flag` words inside string literals of `src` (before its test module).
fn flags_in(src: &str) -> BTreeSet<String> {
    let src = src.split("#[cfg(test)]").next().unwrap_or(src);
    let mut out = BTreeSet::new();
    for (i, _) in src.match_indices("\"--") {
        let rest = &src[i + 1..];
        let end = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
            .unwrap_or(rest.len());
        let flag = &rest[..end];
        if flag.len() > 2 && flag != "--help" && flag != "--version" {
            out.insert(flag.to_owned());
        }
    }
    out
}

/// Flags declared with the image-style parser: `Flag::value("name")` etc.
fn declared_flags(src: &str) -> BTreeSet<String> {
    let src = src.split("#[cfg(test)]").next().unwrap_or(src);
    let mut out = BTreeSet::new();
    for kind in ["Flag::value(\"", "Flag::switch(\"", "Flag::repeated(\""] {
        for (i, _) in src.match_indices(kind) {
            let rest = &src[i + kind.len()..];
            if let Some(end) = rest.find('"') {
                if &rest[..end] != "help" {
                    out.insert(format!("--{}", &rest[..end]));
                }
            }
        }
    }
    out
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        if p.is_dir() {
            if !["target", "tests", "fuzz", ".git", "gen"].contains(&name.as_str()) {
                rust_files(&p, out);
            }
        } else if name.ends_with(".rs") {
            out.push(p);
        }
    }
}

#[test]
fn operations_lists_every_flag() {
    let doc = read("docs/operations.md");
    let mut missing = Vec::new();
    let sources = [
        ("wrenn-ctl", "ctl/src/main.rs", false),
        ("wrenn-agent", "agent/src/flags.rs", false),
        ("wrenn-uffd", "uffd/src/main.rs", false),
        ("envd", "envd/src/main.rs", false),
        ("wrenn up", "cli/src/up/mod.rs", true),
        ("wrenn doctor", "cli/src/doctor.rs", true),
        ("wrenn image kernel", "cli/src/image/kernel.rs", true),
        ("wrenn image rootfs", "cli/src/image/rootfs.rs", true),
    ];
    for (bin, file, declared) in sources {
        let src = read(file);
        let flags = if declared {
            declared_flags(&src)
        } else {
            flags_in(&src)
        };
        assert!(!flags.is_empty(), "found no flags in {file}");
        for f in flags {
            if !doc.contains(&format!("`{f}")) && !doc.contains(&format!(", {f}")) {
                missing.push(format!("{bin} {f}"));
            }
        }
    }
    assert!(missing.is_empty(), "not in docs/operations.md: {missing:?}");
}

#[test]
fn operations_lists_every_variable() {
    let doc = read("docs/operations.md");
    let mut files = Vec::new();
    for dir in ["proto", "uffd", "envd", "vmm-glue", "agent", "ctl", "bench"] {
        rust_files(&root().join(dir), &mut files);
    }
    let mut vars = BTreeSet::new();
    for f in files {
        let src = std::fs::read_to_string(&f).unwrap();
        let src = src.split("#[cfg(test)]").next().unwrap_or(&src).to_owned();
        for (i, _) in src.match_indices("\"WRENN_") {
            let rest = &src[i + 1..];
            let end = rest
                .find(|c: char| !(c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'))
                .unwrap_or(rest.len());
            if end > "WRENN_".len() {
                vars.insert((rest[..end].to_owned(), f.display().to_string()));
            }
        }
    }
    assert!(
        vars.iter().any(|(v, _)| v == "WRENN_LOG"),
        "the scan finds nothing"
    );
    let missing: Vec<String> = vars
        .into_iter()
        .filter(|(v, _)| !doc.contains(&format!("`{v}")) && !doc.contains(&format!(", {v}")))
        .map(|(v, f)| format!("{v} ({f})"))
        .collect();
    assert!(missing.is_empty(), "not in docs/operations.md: {missing:?}");
}

#[test]
fn the_flag_scan_can_fail() {
    let src = "match a { \"--alpha\" => 1, \"--beta-2\" => 2, \"-h\" | \"--help\" => 3 }";
    let f = flags_in(src);
    assert_eq!(f.into_iter().collect::<Vec<_>>(), ["--alpha", "--beta-2"]);
    let d = declared_flags("Flag::value(\"state-root\"), Flag::switch(\"json\")");
    assert!(d.contains("--state-root") && d.contains("--json"));
}
