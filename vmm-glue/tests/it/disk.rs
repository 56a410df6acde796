//! Disk clones: content equal, the template unchanged after writing to the clone, sparse files
//! stay sparse; the reflink path on loop-mounted btrfs and XFS images made here (root and
//! mkfs.btrfs / mkfs.xfs needed, else `skipped`).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use vmm_glue::disk::{clone_disk, CloneMethod};

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("vmm-glue-it-disk-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const MIB: u64 = 1 << 20;

/// A 64 MiB template with three data ranges (one not block-aligned in length) and holes.
fn make_template(path: &Path) -> Vec<(u64, Vec<u8>)> {
    let f = File::create(path).unwrap();
    f.set_len(64 * MIB).unwrap();
    let ranges: Vec<(u64, Vec<u8>)> = vec![
        (0, (0..4096u32).map(|i| (i % 251) as u8).collect()),
        (10 * MIB, vec![0xab; 3 * 4096 + 100]),
        (
            63 * MIB,
            (0..8192u32).map(|i| (i * 7 % 256) as u8).collect(),
        ),
    ];
    for (off, data) in &ranges {
        f.write_all_at(data, *off).unwrap();
    }
    f.sync_all().unwrap();
    ranges
}

fn digest(path: &Path) -> u64 {
    // FNV-1a over the whole file: enough to see any changed byte in a test.
    let data = std::fs::read(path).unwrap();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}

fn check_clone(template: &Path, clone: &Path, expect: Option<CloneMethod>) -> CloneMethod {
    let before = digest(template);
    let tmeta = std::fs::metadata(template).unwrap();
    let method = clone_disk(template, clone).unwrap();
    if let Some(m) = expect {
        assert_eq!(method, m);
    }
    assert_eq!(
        std::fs::read(template).unwrap(),
        std::fs::read(clone).unwrap()
    );
    let cmeta = std::fs::metadata(clone).unwrap();
    assert_eq!(cmeta.len(), tmeta.len());
    // Sparse stays sparse: the clone allocates no more than the template (plus one block of
    // rounding per range), far less than its length.
    assert!(
        cmeta.blocks() <= tmeta.blocks() + 3 * 8,
        "clone has {} blocks, template {}",
        cmeta.blocks(),
        tmeta.blocks()
    );
    assert!(cmeta.blocks() * 512 < cmeta.len() / 4);
    // Writing to the clone leaves the template alone.
    let f = OpenOptions::new().write(true).open(clone).unwrap();
    f.write_all_at(b"guest wrote here", 10 * MIB + 5).unwrap();
    f.write_all_at(b"and in a hole", 30 * MIB).unwrap();
    f.sync_all().unwrap();
    assert_eq!(digest(template), before);
    assert_ne!(digest(clone), before);
    assert_eq!(std::fs::metadata(template).unwrap().mtime(), tmeta.mtime());
    method
}

#[test]
fn sparse_copy_on_this_filesystem() {
    let d = TempDir::new("sparse");
    let t = d.0.join("template.ext4");
    let ranges = make_template(&t);
    let method = check_clone(&t, &d.0.join("disk.ext4"), None);
    println!("clone on the temp dir's filesystem: {method:?}");
    let data = std::fs::read(d.0.join("disk.ext4")).unwrap();
    for (off, bytes) in ranges {
        let o = off as usize;
        if o == 10 * MIB as usize {
            continue; // overwritten in part by check_clone
        }
        assert_eq!(&data[o..o + bytes.len()], &bytes[..]);
    }
}

fn tool(name: &str) -> Option<PathBuf> {
    ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.exists())
}

/// Skips (or fails under WRENN_REQUIRE_E2E=1) with a reason.
fn skip(reason: &str) {
    proto::skip::skip("vmm-glue reflink test", reason);
}

struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

fn reflink_on(fs: &str, mkfs: &str, mkfs_args: &[&str], size: u64) {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return skip("reflink test needs root (loop mount)");
    }
    let Some(mkfs_path) = tool(mkfs) else {
        return skip(&format!(
            "{mkfs} not found (apt-get install btrfs-progs xfsprogs)"
        ));
    };
    let d = TempDir::new(fs);
    let img = d.0.join("fs.img");
    File::create(&img).unwrap().set_len(size).unwrap();
    let out = Command::new(mkfs_path)
        .args(mkfs_args)
        .arg(&img)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{mkfs}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mnt = d.0.join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let out = Command::new("mount")
        .args(["-o", "loop", "-t", fs])
        .arg(&img)
        .arg(&mnt)
        .output()
        .unwrap();
    if !out.status.success() {
        return skip(&format!(
            "cannot loop-mount {fs}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let _m = Mount(mnt.clone());
    let t = mnt.join("template.ext4");
    make_template(&t);
    check_clone(&t, &mnt.join("disk.ext4"), Some(CloneMethod::Reflink));
    // A second clone of the same template, after the first was written to.
    check_clone(&t, &mnt.join("disk2.ext4"), Some(CloneMethod::Reflink));
}

#[test]
fn reflink_on_btrfs() {
    reflink_on("btrfs", "mkfs.btrfs", &["-q"], 256 * MIB);
}

#[test]
fn reflink_on_xfs() {
    reflink_on("xfs", "mkfs.xfs", &["-q", "-m", "reflink=1"], 320 * MIB);
}
