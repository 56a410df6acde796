//! Integration tests of the `wrenn` CLI library.
//!
//! `rootfs_*`: the image assembly step (staging copy -> envd + guest files -> `mkfs.ext4 -d`
//! -> publish) on a tiny fake tree, inspected with `debugfs`. They need e2fsprogs and print
//! `skipped: <reason>` without it (a failure instead when `WRENN_REQUIRE_E2E=1`). No test here
//! builds a kernel or runs debootstrap: those take minutes to hours.

mod docs;
mod doctor;
mod metrics;
mod recipe;
mod support;
mod units;
mod up;
mod upgrade;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use wrenn::image::command::find_program;
use wrenn::image::rootfs::{assemble, Assembly, GuestFiles};
use wrenn::image::ImageError;

/// `Some((mkfs, debugfs))`, or prints the skip (panics under WRENN_REQUIRE_E2E=1).
fn tools(test: &str) -> Option<PathBuf> {
    match (find_program("mkfs.ext4"), find_program("debugfs")) {
        (Some(_), Some(debugfs)) => Some(debugfs),
        _ => {
            let reason = "mkfs.ext4/debugfs not found (install e2fsprogs)";
            proto::skip::skip(test, reason);
            None
        }
    }
}

struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let d = std::env::temp_dir().join(format!("wrenn-it-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        Scratch(d)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A tiny stand-in for the debootstrap tree, with the files an image overrides already present
/// (as debootstrap leaves them), so the test sees that the tree is never written through.
fn fake_tree(root: &Path) -> PathBuf {
    let tree = root.join("tree");
    for d in [
        "etc",
        "sbin",
        "bin",
        "usr/local/bin",
        "proc",
        "sys",
        "dev",
        "tmp",
    ] {
        fs::create_dir_all(tree.join(d)).unwrap();
    }
    fs::write(tree.join("etc/hostname"), "buildhost\n").unwrap();
    fs::write(tree.join("etc/resolv.conf"), "nameserver 10.0.0.1\n").unwrap();
    fs::write(tree.join("etc/os-release"), "ID=fake\n").unwrap();
    fs::write(tree.join("sbin/init"), "old init").unwrap();
    fs::write(tree.join("bin/hello"), "hello").unwrap();
    std::os::unix::fs::symlink("hello", tree.join("bin/hi")).unwrap();
    tree
}

fn debugfs(debugfs: &Path, image: &Path, request: &str) -> String {
    let out = Command::new(debugfs)
        .args(["-R", request])
        .arg(image)
        .output()
        .unwrap();
    assert!(out.status.success(), "debugfs {request}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn envd_stand_in() -> PathBuf {
    // Any x86_64 ELF executable passes the envd check; this test binary is one.
    std::env::current_exe().unwrap()
}

#[test]
fn rootfs_assembles_and_debugfs_sees_init() {
    let Some(debugfs_bin) = tools("rootfs_assembles_and_debugfs_sees_init") else {
        return;
    };
    let s = Scratch::new("assemble");
    let tree = fake_tree(&s.0);
    let staging = s.0.join("staging");
    fs::create_dir_all(&staging).unwrap();
    let out = s.0.join("templates/x/rootfs.ext4");
    fs::create_dir_all(out.parent().unwrap()).unwrap();
    let envd = envd_stand_in();
    let envd_len = fs::metadata(&envd).unwrap().len();
    let files = GuestFiles::default();
    let a = Assembly {
        envd: &envd,
        files: &files,
        size_mib: 64 + envd_len.div_ceil(1 << 20) * 2,
        force: false,
    };
    let t = std::time::Instant::now();
    assemble(&tree, &staging, &out, &a).unwrap();
    println!("assembled in {:?}", t.elapsed());

    let meta = fs::metadata(&out).unwrap();
    assert_eq!(meta.len(), a.size_mib << 20);
    assert!(
        meta.blocks() * 512 < meta.len(),
        "image is sparse: {} allocated of {}",
        meta.blocks() * 512,
        meta.len()
    );
    let stat = debugfs(&debugfs_bin, &out, "stat /sbin/init");
    assert!(stat.contains("Type: regular"), "{stat}");
    assert!(stat.contains(&format!("Size: {envd_len}")), "{stat}");
    assert!(stat.contains("Mode:  0755"), "{stat}");
    let local = debugfs(&debugfs_bin, &out, "stat /usr/local/bin/envd");
    assert!(local.contains(&format!("Size: {envd_len}")), "{local}");
    assert!(
        local.contains("Links: 2"),
        "envd is one inode at two paths: {local}"
    );
    assert_eq!(
        debugfs(&debugfs_bin, &out, "cat /etc/hostname"),
        files.etc_hostname()
    );
    assert_eq!(
        debugfs(&debugfs_bin, &out, "cat /etc/resolv.conf"),
        files.etc_resolv_conf()
    );
    assert_eq!(
        debugfs(&debugfs_bin, &out, "cat /etc/hosts"),
        files.etc_hosts()
    );
    assert_eq!(debugfs(&debugfs_bin, &out, "cat /bin/hello"), "hello");
    assert!(debugfs(&debugfs_bin, &out, "stat /bin/hi").contains("Type: symlink"));

    // The cached tree is untouched, and no staging or temporary file is left.
    assert_eq!(
        fs::read_to_string(tree.join("etc/hostname")).unwrap(),
        "buildhost\n"
    );
    assert_eq!(
        fs::read_to_string(tree.join("sbin/init")).unwrap(),
        "old init"
    );
    assert!(!tree.join("usr/local/bin/envd").exists());
    assert_eq!(
        fs::read_dir(&staging).unwrap().count(),
        0,
        "staging removed"
    );
    let names: Vec<String> = fs::read_dir(out.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["rootfs.ext4"]);
}

#[test]
fn rootfs_never_replaces_a_published_image_in_place() {
    let Some(debugfs_bin) = tools("rootfs_never_replaces_a_published_image_in_place") else {
        return;
    };
    let s = Scratch::new("replace");
    let tree = fake_tree(&s.0);
    let staging = s.0.join("staging");
    fs::create_dir_all(&staging).unwrap();
    let out = s.0.join("rootfs.ext4");
    let envd = envd_stand_in();
    let size_mib = 64 + fs::metadata(&envd).unwrap().len().div_ceil(1 << 20) * 2;
    let first = GuestFiles {
        hostname: "first".to_string(),
        nameservers: vec!["1.1.1.1".to_string()],
    };
    let second = GuestFiles {
        hostname: "second".to_string(),
        ..first.clone()
    };
    fn mk<'a>(envd: &'a Path, files: &'a GuestFiles, size_mib: u64, force: bool) -> Assembly<'a> {
        Assembly {
            envd,
            files,
            size_mib,
            force,
        }
    }
    assemble(&tree, &staging, &out, &mk(&envd, &first, size_mib, false)).unwrap();
    let old_ino = fs::metadata(&out).unwrap().ino();
    // A reader (a sandbox being cloned) holds the published image open.
    let held = fs::File::open(&out).unwrap();

    // Without --force: refused, image unchanged.
    let err = assemble(&tree, &staging, &out, &mk(&envd, &second, size_mib, false)).unwrap_err();
    assert!(matches!(err, ImageError::Exists { .. }), "{err}");
    assert_eq!(fs::metadata(&out).unwrap().ino(), old_ino);

    // With --force: a new file takes the name; the held one is the complete old image.
    assemble(&tree, &staging, &out, &mk(&envd, &second, size_mib, true)).unwrap();
    assert_ne!(fs::metadata(&out).unwrap().ino(), old_ino);
    assert_eq!(held.metadata().unwrap().ino(), old_ino);
    assert_eq!(
        held.metadata().unwrap().nlink(),
        0,
        "old image unlinked, not rewritten"
    );
    assert_eq!(debugfs(&debugfs_bin, &out, "cat /etc/hostname"), "second\n");
    // debugfs is another process: name our descriptor through our own pid.
    let held_path = format!(
        "/proc/{}/fd/{}",
        std::process::id(),
        std::os::fd::AsRawFd::as_raw_fd(&held)
    );
    assert_eq!(
        debugfs(&debugfs_bin, Path::new(&held_path), "cat /etc/hostname"),
        "first\n"
    );
}

#[test]
fn rootfs_too_small_and_bad_envd_are_typed_errors() {
    let Some(_) = tools("rootfs_too_small_and_bad_envd_are_typed_errors") else {
        return;
    };
    let s = Scratch::new("errors");
    let tree = fake_tree(&s.0);
    fs::write(tree.join("big"), vec![1u8; 3 << 20]).unwrap();
    let staging = s.0.join("staging");
    fs::create_dir_all(&staging).unwrap();
    let out = s.0.join("rootfs.ext4");
    let envd = envd_stand_in();
    let files = GuestFiles::default();
    let err = assemble(
        &tree,
        &staging,
        &out,
        &Assembly {
            envd: &envd,
            files: &files,
            size_mib: 16,
            force: false,
        },
    )
    .unwrap_err();
    assert!(
        matches!(err, ImageError::TooSmall { size_mib: 16, .. }),
        "{err}"
    );
    assert!(!out.exists());

    let script = s.0.join("envd.sh");
    fs::write(&script, "#!/bin/sh\n").unwrap();
    let err = assemble(
        &tree,
        &staging,
        &out,
        &Assembly {
            envd: &script,
            files: &files,
            size_mib: 64,
            force: false,
        },
    )
    .unwrap_err();
    assert!(err.to_string().contains("not an ELF file"), "{err}");
    assert!(!out.exists());
    assert_eq!(fs::read_dir(&staging).unwrap().count(), 0);
}
