//! Debian packages on the build host (dpkg-query, apt-get) and the apt mirror it is
//! configured with (read from `/etc/apt/sources.list*`, one-line and deb822 formats), so that
//! debootstrap uses the same mirror as the host instead of a hard-coded one.

use std::fs;
use std::path::{Path, PathBuf};

use super::command::Cmd;
use super::{io_err, ImageError};

/// The installed version of `package`, or `None` when it is not installed.
pub fn installed_version(package: &str) -> Result<Option<String>, ImageError> {
    let out = Cmd::new("dpkg-query")
        .args(["-W", "-f=${db:Status-Abbrev}|${Version}", package])
        .output();
    match out {
        Ok(s) => Ok(parse_dpkg_query(&s)),
        // dpkg-query exits 1 for a package it has never heard of.
        Err(ImageError::Command { status, .. }) if status.code() == Some(1) => Ok(None),
        Err(e) => Err(e),
    }
}

/// `ii |6.1.192-3` -> `Some("6.1.192-3")`; anything but "installed" -> `None`.
pub fn parse_dpkg_query(out: &str) -> Option<String> {
    let (status, version) = out.trim().split_once('|')?;
    (status.trim() == "ii" && !version.is_empty()).then(|| version.to_string())
}

/// Installs those of `packages` that are missing (one apt-get call); on failure refreshes the
/// package lists once and retries (a stale list names versions the mirror no longer has).
pub fn ensure_installed(packages: &[&str]) -> Result<(), ImageError> {
    let mut missing = Vec::new();
    for p in packages {
        if installed_version(p)?.is_none() {
            missing.push(*p);
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    log::info!("installing packages: {}", missing.join(" "));
    let install = Cmd::new("apt-get")
        .args(["install", "-y", "--no-install-recommends"])
        .args(missing.iter().copied())
        .env("DEBIAN_FRONTEND", "noninteractive");
    if let Err(first) = install.run() {
        log::warn!("apt-get install failed ({first}); running apt-get update and retrying");
        Cmd::new("apt-get").arg("update").run()?;
        install.run()?;
    }
    Ok(())
}

/// One `deb` source: a mirror URI with its suites and components.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Source {
    pub uri: String,
    pub suites: Vec<String>,
    pub components: Vec<String>,
}

/// Parses the one-line format: `deb [opts] uri suite component...`.
pub fn parse_one_line(text: &str) -> Vec<Source> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        let mut rest = match line
            .strip_prefix("deb ")
            .or_else(|| line.strip_prefix("deb\t"))
        {
            Some(r) => r.trim_start(),
            None => continue,
        };
        if rest.starts_with('[') {
            match rest.find(']') {
                Some(end) => rest = rest[end + 1..].trim_start(),
                None => continue,
            }
        }
        let words: Vec<&str> = rest.split_whitespace().collect();
        if words.len() < 2 {
            continue;
        }
        out.push(Source {
            uri: words[0].to_string(),
            suites: vec![words[1].to_string()],
            components: words[2..].iter().map(|s| s.to_string()).collect(),
        });
    }
    out
}

/// Parses the deb822 format (`*.sources`): paragraphs of `Field: value` lines.
pub fn parse_deb822(text: &str) -> Vec<Source> {
    let mut out = Vec::new();
    for para in paragraphs(text) {
        let field = |name: &str| -> Vec<String> {
            para.iter()
                .filter(|(k, _)| k.eq_ignore_ascii_case(name))
                .flat_map(|(_, v)| v.split_whitespace().map(str::to_string))
                .collect()
        };
        let enabled = field("Enabled");
        if enabled
            .first()
            .is_some_and(|v| v.eq_ignore_ascii_case("no"))
        {
            continue;
        }
        if !field("Types").iter().any(|t| t == "deb") {
            continue;
        }
        let suites = field("Suites");
        let components = field("Components");
        for uri in field("URIs") {
            out.push(Source {
                uri,
                suites: suites.clone(),
                components: components.clone(),
            });
        }
    }
    out
}

/// Splits deb822 text into paragraphs of (field, value) with continuation lines joined.
fn paragraphs(text: &str) -> Vec<Vec<(String, String)>> {
    let mut paras = Vec::new();
    let mut cur: Vec<(String, String)> = Vec::new();
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        if line.trim().is_empty() {
            if !cur.is_empty() {
                paras.push(std::mem::take(&mut cur));
            }
            continue;
        }
        if line.starts_with(' ') || line.starts_with('\t') {
            if let Some((_, v)) = cur.last_mut() {
                v.push(' ');
                v.push_str(line.trim());
            }
            continue;
        }
        if let Some((k, v)) = line.split_once(':') {
            cur.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    if !cur.is_empty() {
        paras.push(cur);
    }
    paras
}

/// The first source that serves `suite` itself (not `-updates`/`-security`) with `main`, over
/// a scheme debootstrap can fetch from.
pub fn pick_mirror(sources: &[Source], suite: &str) -> Option<String> {
    sources
        .iter()
        .find(|s| {
            s.suites.iter().any(|x| x == suite)
                && s.components.iter().any(|c| c == "main")
                && ["http://", "https://", "file:/", "ftp://"]
                    .iter()
                    .any(|p| s.uri.starts_with(p))
        })
        .map(|s| s.uri.clone())
}

/// The configured mirror for `suite`, from `/etc/apt/sources.list` and
/// `/etc/apt/sources.list.d/*.{list,sources}` (in name order, as apt reads them).
pub fn configured_mirror(suite: &str) -> Result<String, ImageError> {
    let mut files: Vec<PathBuf> = vec![PathBuf::from("/etc/apt/sources.list")];
    let dir = Path::new("/etc/apt/sources.list.d");
    if dir.is_dir() {
        let mut listed: Vec<PathBuf> = fs::read_dir(dir)
            .map_err(io_err("list", dir))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "list" || e == "sources"))
            .collect();
        listed.sort();
        files.extend(listed);
    }
    let mut sources = Vec::new();
    for f in files {
        let text = match fs::read_to_string(&f) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_err("read", &f)(e)),
        };
        if f.extension().is_some_and(|e| e == "sources") {
            sources.extend(parse_deb822(&text));
        } else {
            sources.extend(parse_one_line(&text));
        }
    }
    pick_mirror(&sources, suite).ok_or_else(|| ImageError::NoMirror {
        suite: suite.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dpkg_query_status() {
        assert_eq!(parse_dpkg_query("ii |6.1.192-3"), Some("6.1.192-3".into()));
        assert_eq!(parse_dpkg_query("un |"), None);
        assert_eq!(parse_dpkg_query("rc |6.1.1-1"), None);
        assert_eq!(parse_dpkg_query("garbage"), None);
    }

    #[test]
    fn deb822_picks_the_suite_not_security_or_disabled() {
        let text = "\
Types: deb
# comment
URIs: http://mirror.example/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb-src
URIs: http://src.example/debian
Suites: bookworm
Components: main

Types: deb
URIs: http://off.example/debian
Suites: bookworm
Components: main
Enabled: no

Types: deb
URIs: http://mirror.example/debian
Suites: bookworm bookworm-updates
Components: main contrib
";
        let sources = parse_deb822(text);
        assert_eq!(sources.len(), 2);
        assert_eq!(
            pick_mirror(&sources, "bookworm").as_deref(),
            Some("http://mirror.example/debian")
        );
        assert_eq!(pick_mirror(&sources, "trixie"), None);
    }

    #[test]
    fn one_line_format_with_options() {
        let text = "\
# deb http://commented.example/debian bookworm main
deb-src http://src.example/debian bookworm main
deb [arch=amd64 signed-by=/k.gpg] http://m.example/debian bookworm main non-free
deb http://other.example/debian bookworm contrib
";
        let sources = parse_one_line(text);
        assert_eq!(sources.len(), 2);
        assert_eq!(sources[0].uri, "http://m.example/debian");
        assert_eq!(sources[0].components, ["main", "non-free"]);
        assert_eq!(
            pick_mirror(&sources, "bookworm").as_deref(),
            Some("http://m.example/debian")
        );
    }

    #[test]
    fn unusable_schemes_are_skipped() {
        let sources = parse_one_line("deb mirror+file:/etc/apt/mirrors.txt bookworm main\n");
        assert_eq!(pick_mirror(&sources, "bookworm"), None);
    }
}
