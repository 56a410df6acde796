//! The systemd units in deploy/: `systemd-analyze verify` finds nothing to say about them
//! (the same check complains about a broken unit, so it can fail), and the hardening that
//! matters for each is there.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::support::{skip, TempDir};

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn unit(name: &str) -> String {
    std::fs::read_to_string(deploy().join(name)).unwrap()
}

/// Lines `key=value` of a unit (comments and sections skipped).
fn settings(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with('['))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

fn has(text: &str, key: &str, value: &str) -> bool {
    settings(text).iter().any(|(k, v)| k == key && v == value)
}

fn verify(files: &[PathBuf]) -> (bool, String) {
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .args(files)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn units_have_the_hardening_that_fits() {
    let agent = unit("wrenn-agent.service");
    let ctl = unit("wrenn-ctl.service");
    // The agent: root, /dev/kvm, and a restart that leaves Firecracker running.
    assert!(has(&agent, "KillMode", "process"));
    assert!(has(&agent, "User", "root"));
    assert!(has(&agent, "DeviceAllow", "/dev/kvm rw"));
    assert!(has(&agent, "DevicePolicy", "closed"));
    assert!(has(&agent, "Restart", "on-failure"));
    for k in [
        "ProtectSystem",
        "PrivateTmp",
        "PrivateDevices",
        "ProtectHome",
        "ReadWritePaths",
    ] {
        assert!(
            !settings(&agent).iter().any(|(key, _)| key == k),
            "{k} would give the agent a private mount namespace"
        );
    }
    // ctl: no root, no devices, nothing writable, restarts on failure.
    assert!(has(&ctl, "DynamicUser", "yes"));
    assert!(has(&ctl, "PrivateDevices", "yes"));
    assert!(has(&ctl, "ProtectSystem", "strict"));
    assert!(has(&ctl, "CapabilityBoundingSet", ""));
    assert!(has(&ctl, "NoNewPrivileges", "yes"));
    assert!(has(&ctl, "Restart", "on-failure"));
    assert!(!settings(&ctl)
        .iter()
        .any(|(k, v)| k == "User" && v == "root"));
    assert!(!settings(&ctl).iter().any(|(k, _)| k == "DeviceAllow"));
    // The example environment files set what the units read.
    let ctl_env = unit("ctl.env.example");
    assert!(ctl_env.contains("WRENN_DATABASE_URL="));
    let agent_env = unit("agent.env.example");
    assert!(agent_env.contains("WRENN_AGENT_FLAGS="));
    assert!(agent.contains("$WRENN_AGENT_FLAGS"));
    // No GLIBC_TUNABLES: the TLS transport avoids glibc's slow `rep movsb` window on AMD
    // itself (docs/operations.md, "TLS"); the variable no longer measurably helped.
    for u in [&agent, &ctl] {
        assert!(!u.contains("GLIBC_TUNABLES"));
    }
}

#[test]
fn systemd_analyze_verify() {
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        skip(
            "units::systemd_analyze_verify",
            "systemd-analyze is not installed",
        );
        return;
    }
    // verify checks that ExecStart's binary exists: point the units at built binaries (or
    // any executable) in a copy.
    let dir = TempDir::new("units");
    let exe = |name: &str| -> String {
        let built = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../target/debug")
            .join(name);
        if built.exists() {
            built.display().to_string()
        } else {
            "/bin/true".into()
        }
    };
    let mut files = Vec::new();
    for (name, bin) in [
        ("wrenn-ctl.service", "wrenn-ctl"),
        ("wrenn-agent.service", "wrenn-agent"),
    ] {
        let text = unit(name).replace(&format!("/usr/local/bin/{bin}"), &exe(bin));
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        files.push(p);
    }
    let (ok, out) = verify(&files);
    println!("systemd-analyze verify: ok={ok} output={out:?}");
    assert!(ok, "{out}");
    let ours: Vec<&str> = out
        .lines()
        .filter(|l| l.contains("wrenn-ctl.service") || l.contains("wrenn-agent.service"))
        .collect();
    assert!(ours.is_empty(), "systemd-analyze complains: {ours:?}");

    // The same check on a broken unit does complain (verify exits 0 on unknown keys, so the
    // output is what counts).
    let bad = dir.path().join("wrenn-agent-bad.service");
    std::fs::write(
        &bad,
        unit("wrenn-agent.service")
            .replace("/usr/local/bin/wrenn-agent", &exe("wrenn-agent"))
            .replace(
                "KillMode=process",
                "KillMode=procss\nDeviceAlow=/dev/kvm rw",
            ),
    )
    .unwrap();
    let (_, out) = verify(&[bad]);
    assert!(
        out.lines()
            .filter(|l| l.contains("wrenn-agent-bad.service"))
            .count()
            >= 2,
        "a broken unit passed: {out}"
    );
}
