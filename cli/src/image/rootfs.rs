//! `wrenn image rootfs`: an ext4 root filesystem with envd as `/sbin/init`.
//!
//! The Debian tree (debootstrap, minbase, plus what users expect in a sandbox) is built once
//! into `<state-root>/cache/rootfs-tree/<key>/` and never changed afterwards. Each image is then
//! assembled in seconds: the tree is hard-link copied into a fresh staging directory, the
//! image-specific files are written there (each one unlinked first, so the cached tree's inode
//! is never written through the link), and `mkfs.ext4 -d` packs the staging tree into a new
//! sparse file that is renamed (or linked) into place.

use std::collections::HashSet;
use std::fs;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use super::args::{self, ArgError, Flag};
use super::command::{find_program, Cmd};
use super::limits::{
    ENVD_BYTES_MAX, HOSTNAME_BYTES_MAX, NAMESERVERS_MAX, ROOTFS_HEADROOM_MIB, ROOTFS_SIZE_MIB_MAX,
    ROOTFS_SIZE_MIB_MIN,
};
use super::sha256::Sha256;
use super::{apt, create_dir, fmt_duration, io_err, sync_parent, ImageError, Lock};

/// The `minimal` template's id (all zeros: the template every host has).
pub const MINIMAL_TEMPLATE_ID: &str = "00000000-0000-0000-0000-000000000000";

/// Packages on top of minbase: what users expect in a sandbox.
pub const INCLUDE: &[&str] = &[
    "bash",
    "ca-certificates",
    "coreutils",
    "curl",
    "iproute2",
    "python3",
];

const DEFAULT_SUITE: &str = "bookworm";
const DEFAULT_HOSTNAME: &str = "sandbox";
/// The slot's resolver, on the guest's gateway in every slot (the agent runs it; see
/// docs/operations.md "Sandbox egress"): it is the only resolver that makes domain names in a
/// sandbox's allow list work, and it answers REFUSED at once for names a closed policy does
/// not allow. Sandboxes never reach the host's own resolver directly.
const DEFAULT_NAMESERVERS: &[&str] = &["169.254.0.22"];

const MIB: u64 = 1 << 20;

const FLAGS: &[Flag] = &[
    Flag::value("state-root"),
    Flag::value("envd"),
    Flag::value("size-mib"),
    Flag::value("template-id"),
    Flag::value("out"),
    Flag::switch("force"),
    Flag::value("suite"),
    Flag::value("mirror"),
    Flag::value("hostname"),
    Flag::repeated("nameserver"),
];

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RootfsOptions {
    pub state_root: PathBuf,
    pub envd: PathBuf,
    pub size_mib: u64,
    /// Lower-case hyphenated UUID.
    pub template_id: String,
    /// Where to publish; default `<state-root>/templates/<uuid>/rootfs.ext4`.
    pub out: PathBuf,
    pub force: bool,
    pub suite: String,
    /// `None`: the host's configured apt mirror.
    pub mirror: Option<String>,
    pub files: GuestFiles,
}

/// The image-specific files written into each image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestFiles {
    pub hostname: String,
    pub nameservers: Vec<String>,
}

impl Default for GuestFiles {
    fn default() -> Self {
        GuestFiles {
            hostname: DEFAULT_HOSTNAME.to_string(),
            nameservers: DEFAULT_NAMESERVERS.iter().map(|s| s.to_string()).collect(),
        }
    }
}

impl GuestFiles {
    pub fn etc_hostname(&self) -> String {
        format!("{}\n", self.hostname)
    }

    pub fn etc_hosts(&self) -> String {
        format!(
            "127.0.0.1\tlocalhost\n127.0.1.1\t{}\n::1\tlocalhost ip6-localhost ip6-loopback\n\
             ff02::1\tip6-allnodes\nff02::2\tip6-allrouters\n",
            self.hostname
        )
    }

    pub fn etc_resolv_conf(&self) -> String {
        self.nameservers
            .iter()
            .map(|n| format!("nameserver {n}\n"))
            .collect()
    }
}

fn valid_hostname(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= HOSTNAME_BYTES_MAX
        && h.split('.').all(|label| {
            !label.is_empty()
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

impl RootfsOptions {
    pub fn from_args(argv: &[String]) -> Result<Self, ArgError> {
        let p = args::parse(argv, FLAGS)?;
        let bad = |flag: &'static str, value: &str, reason: &str| ArgError::BadValue {
            flag,
            value: value.to_string(),
            reason: reason.to_string(),
        };
        let state_root = PathBuf::from(p.value("state-root").unwrap_or(super::DEFAULT_STATE_ROOT));
        let envd = PathBuf::from(p.value("envd").ok_or(ArgError::MissingValue("envd"))?);
        let size_mib = p.number("size-mib", 5120, ROOTFS_SIZE_MIB_MIN, ROOTFS_SIZE_MIB_MAX)?;
        let id_text = p.value("template-id").unwrap_or(MINIMAL_TEMPLATE_ID);
        let template_id = proto::id::parse_uuid_strict(&id_text.to_ascii_lowercase())
            .ok_or_else(|| bad("template-id", id_text, "expected a hyphenated UUID"))?
            .hyphenated()
            .to_string();
        let out = match p.value("out") {
            Some(o) => PathBuf::from(o),
            None => state_root
                .join("templates")
                .join(&template_id)
                .join("rootfs.ext4"),
        };
        let suite = p.value("suite").unwrap_or(DEFAULT_SUITE).to_string();
        if !suite.bytes().all(|b| b.is_ascii_lowercase() || b == b'-') || suite.is_empty() {
            return Err(bad("suite", &suite, "expected a Debian suite name"));
        }
        let hostname = p.value("hostname").unwrap_or(DEFAULT_HOSTNAME).to_string();
        if !valid_hostname(&hostname) {
            return Err(bad("hostname", &hostname, "not a valid host name"));
        }
        let given = p.values("nameserver");
        if given.len() > NAMESERVERS_MAX {
            return Err(bad(
                "nameserver",
                given[NAMESERVERS_MAX],
                "the resolver reads at most 3",
            ));
        }
        for n in &given {
            if n.parse::<std::net::IpAddr>().is_err() {
                return Err(bad("nameserver", n, "expected an IP address"));
            }
        }
        let nameservers = if given.is_empty() {
            GuestFiles::default().nameservers
        } else {
            given.iter().map(|s| s.to_string()).collect()
        };
        Ok(RootfsOptions {
            state_root,
            envd,
            size_mib,
            template_id,
            out,
            force: p.switch("force"),
            suite,
            mirror: p.value("mirror").map(str::to_string),
            files: GuestFiles {
                hostname,
                nameservers,
            },
        })
    }
}

/// The cache key of a debootstrap tree (64 hex digits).
pub fn tree_key(suite: &str, mirror: &str, arch: &str, include: &[&str]) -> String {
    let mut h = Sha256::new();
    h.update_field(b"wrenn-rootfs-tree-v1");
    h.update_field(suite.as_bytes());
    h.update_field(mirror.trim_end_matches('/').as_bytes());
    h.update_field(arch.as_bytes());
    h.update_field(b"minbase");
    let mut inc: Vec<&str> = include.to_vec();
    inc.sort_unstable();
    inc.dedup();
    for p in inc {
        h.update_field(p.as_bytes());
    }
    h.finish_hex()
}

/// Builds the image; returns the published path.
pub fn build(opts: &RootfsOptions) -> Result<PathBuf, ImageError> {
    let started = Instant::now();
    // Refuse early, before minutes of debootstrap; assemble() checks again atomically.
    if opts.out.exists() && !opts.force {
        return Err(ImageError::Exists {
            path: opts.out.clone(),
        });
    }
    check_envd(&opts.envd)?;
    let tree = ensure_tree(&opts.state_root, &opts.suite, opts.mirror.as_deref())?;
    let out_dir = opts.out.parent().unwrap_or(Path::new("."));
    create_dir(out_dir)?;
    let staging_parent = opts.state_root.join("cache").join("rootfs-staging");
    create_dir(&staging_parent)?;
    // A run killed mid-way (Ctrl-C during mkfs) leaves its staging tree and temporary image.
    remove_stale(&staging_parent, "");
    let out_name = opts
        .out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    remove_stale(out_dir, &format!(".{out_name}.tmp-"));
    let t = Instant::now();
    assemble(
        &tree,
        &staging_parent,
        &opts.out,
        &Assembly {
            envd: &opts.envd,
            files: &opts.files,
            size_mib: opts.size_mib,
            force: opts.force,
        },
    )?;
    log::info!(
        "rootfs published path={} size_mib={} assemble={} total={}",
        opts.out.display(),
        opts.size_mib,
        fmt_duration(t.elapsed()),
        fmt_duration(started.elapsed())
    );
    Ok(opts.out.clone())
}

/// The cached debootstrap tree for `suite`, built if absent.
pub fn ensure_tree(
    state_root: &Path,
    suite: &str,
    mirror: Option<&str>,
) -> Result<PathBuf, ImageError> {
    let mirror = match mirror {
        Some(m) => m.to_string(),
        None => apt::configured_mirror(suite)?,
    };
    let arch = "amd64";
    let key = tree_key(suite, &mirror, arch, INCLUDE);
    let trees = state_root.join("cache").join("rootfs-tree");
    create_dir(&trees)?;
    let tree = trees.join(&key[..16]);
    if tree.is_dir() {
        log::info!("debootstrap tree cached path={}", tree.display());
        return Ok(tree);
    }
    let _lock = Lock::acquire(&trees.join(".lock"))?;
    if tree.is_dir() {
        return Ok(tree);
    }
    apt::ensure_installed(&["debootstrap"])?;
    let tmp = trees.join(format!(".{}.tmp", &key[..16]));
    if tmp.exists() {
        log::info!("removing partial tree path={}", tmp.display());
        fs::remove_dir_all(&tmp).map_err(io_err("remove partial tree", &tmp))?;
    }
    let t = Instant::now();
    log::info!(
        "debootstrap suite={suite} mirror={mirror} into {}",
        tmp.display()
    );
    Cmd::new("debootstrap")
        .arg("--variant=minbase")
        .arg(format!("--arch={arch}"))
        .arg(format!("--include={}", INCLUDE.join(",")))
        .arg(suite)
        .arg(tmp.as_os_str())
        .arg(mirror.as_str())
        .env("DEBIAN_FRONTEND", "noninteractive")
        .run()?;
    // Downloaded packages are not part of the image.
    let archives = tmp.join("var/cache/apt/archives");
    if let Ok(entries) = fs::read_dir(&archives) {
        for e in entries.flatten() {
            if e.path().extension().is_some_and(|x| x == "deb") {
                let _ = fs::remove_file(e.path());
            }
        }
    }
    fs::rename(&tmp, &tree).map_err(io_err("publish tree", &tree))?;
    sync_parent(&tree)?;
    log::info!(
        "debootstrap tree ready path={} took={}",
        tree.display(),
        fmt_duration(t.elapsed())
    );
    Ok(tree)
}

/// What goes into one image besides the tree.
pub struct Assembly<'a> {
    pub envd: &'a Path,
    pub files: &'a GuestFiles,
    pub size_mib: u64,
    pub force: bool,
}

/// Checks that `path` is a plausible envd: a regular x86_64 ELF executable of bounded size.
/// A dynamically linked one is accepted with a warning (these guests start them slowly and the
/// image's libc must match).
pub fn check_envd(path: &Path) -> Result<(), ImageError> {
    let bad = |reason: String| ImageError::BadInput {
        what: "envd binary",
        path: path.to_path_buf(),
        reason,
    };
    let meta = fs::metadata(path).map_err(io_err("stat envd", path))?;
    if !meta.is_file() {
        return Err(bad("not a regular file".to_string()));
    }
    if meta.len() > ENVD_BYTES_MAX {
        return Err(bad(format!(
            "{} bytes is over {ENVD_BYTES_MAX}",
            meta.len()
        )));
    }
    let mut head = Vec::new();
    fs::File::open(path)
        .and_then(|f| f.take(64 * 1024).read_to_end(&mut head))
        .map_err(io_err("read envd", path))?;
    match elf_info(&head) {
        Err(reason) => Err(bad(reason.to_string())),
        Ok(ElfInfo { dynamic: true }) => {
            log::warn!(
                "envd {} is dynamically linked; build it with -C target-feature=+crt-static",
                path.display()
            );
            Ok(())
        }
        Ok(_) => Ok(()),
    }
}

#[derive(Debug, PartialEq, Eq)]
pub struct ElfInfo {
    /// Has a PT_INTERP program header (needs a dynamic loader).
    pub dynamic: bool,
}

/// Reads the ELF header and program headers from the first bytes of a file.
pub fn elf_info(head: &[u8]) -> Result<ElfInfo, &'static str> {
    const PT_INTERP: u32 = 3;
    if head.len() < 64 || &head[..4] != b"\x7fELF" {
        return Err("not an ELF file");
    }
    if head[4] != 2 || head[5] != 1 {
        return Err("not a 64-bit little-endian ELF file");
    }
    let u16_at = |o: usize| u16::from_le_bytes([head[o], head[o + 1]]);
    let e_type = u16_at(16);
    if e_type != 2 && e_type != 3 {
        return Err("not an executable");
    }
    if u16_at(18) != 62 {
        return Err("not an x86_64 binary");
    }
    let mut phoff_b = [0u8; 8];
    phoff_b.copy_from_slice(&head[32..40]);
    let phoff = u64::from_le_bytes(phoff_b);
    let phentsize = u64::from(u16_at(54));
    let phnum = u64::from(u16_at(56));
    if phentsize < 56 {
        return Err("bad program header size");
    }
    let mut dynamic = false;
    for i in 0..phnum {
        let off = phoff.saturating_add(i.saturating_mul(phentsize));
        let Ok(off) = usize::try_from(off) else {
            return Err("program headers out of range");
        };
        let Some(ph) = head.get(off..off.saturating_add(4)) else {
            return Err("program headers beyond the first 64 KiB");
        };
        if u32::from_le_bytes([ph[0], ph[1], ph[2], ph[3]]) == PT_INTERP {
            dynamic = true;
        }
    }
    Ok(ElfInfo { dynamic })
}

/// Removes the staging directory however assembly ends.
struct Staging(PathBuf);

impl Drop for Staging {
    fn drop(&mut self) {
        if self.0.exists() {
            if let Err(e) = fs::remove_dir_all(&self.0) {
                log::warn!("remove staging path={} error={e}", self.0.display());
            }
        }
    }
}

/// Removes a temporary image unless it was published.
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// Assembles one image from `tree` and publishes it at `out`: staging copy, envd and the
/// guest files, `mkfs.ext4 -d` into a new sparse file, `e2fsck -fn`, then publish. Without
/// `force` an existing `out` is never replaced (the final step is a hard link, which fails if
/// `out` appeared meanwhile); with it the new file is renamed over the old one, so readers of
/// the old image keep their complete old file.
pub fn assemble(
    tree: &Path,
    staging_parent: &Path,
    out: &Path,
    a: &Assembly<'_>,
) -> Result<(), ImageError> {
    if out.exists() && !a.force {
        return Err(ImageError::Exists {
            path: out.to_path_buf(),
        });
    }
    check_envd(a.envd)?;
    let mkfs = find_program("mkfs.ext4").ok_or_else(|| ImageError::Unexpected {
        what: "host",
        detail: "mkfs.ext4 not found (install e2fsprogs)".to_string(),
    })?;
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let staging = Staging(staging_parent.join(format!("{}-{nanos}", std::process::id())));
    clone_tree(tree, &staging.0)?;
    install_files(&staging.0, a)?;

    let need_mib = tree_bytes(&staging.0)?.div_ceil(MIB) * 11 / 10 + ROOTFS_HEADROOM_MIB;
    if need_mib > a.size_mib {
        return Err(ImageError::TooSmall {
            size_mib: a.size_mib,
            need_mib,
        });
    }

    let tmp = TempFile(super::temp_sibling(out));
    {
        let f = fs::File::create(&tmp.0).map_err(io_err("create image", &tmp.0))?;
        f.set_len(a.size_mib * MIB)
            .map_err(io_err("size image", &tmp.0))?;
    }
    let t = Instant::now();
    Cmd::new(&mkfs.to_string_lossy())
        .args(["-q", "-F", "-t", "ext4", "-L", "wrenn-root", "-d"])
        .arg(staging.0.as_os_str())
        .arg(tmp.0.as_os_str())
        .output()?;
    log::info!("mkfs.ext4 took={}", fmt_duration(t.elapsed()));
    let e2fsck =
        find_program("e2fsck").map_or("e2fsck".into(), |p| p.to_string_lossy().into_owned());
    Cmd::new(&e2fsck)
        .args(["-f", "-n"])
        .arg(tmp.0.as_os_str())
        .output()?;
    fs::File::open(&tmp.0)
        .and_then(|f| f.sync_all())
        .map_err(io_err("sync image", &tmp.0))?;
    if a.force {
        fs::rename(&tmp.0, out).map_err(io_err("publish image", out))?;
    } else {
        match fs::hard_link(&tmp.0, out) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(ImageError::Exists {
                    path: out.to_path_buf(),
                })
            }
            Err(e) => return Err(io_err("publish image", out)(e)),
        }
    }
    sync_parent(out)?;
    Ok(())
}

/// The pid a leftover name carries: `<prefix><pid>` or `<prefix><pid>-<anything>`.
pub fn leftover_pid(name: &str, prefix: &str) -> Option<u32> {
    let rest = name.strip_prefix(prefix)?;
    let pid = rest.split('-').next()?;
    if pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    pid.parse().ok()
}

/// Removes entries of `dir` named `<prefix><pid>[-...]` whose process is gone. Best effort: a
/// failure only warns, since it never affects the image being built.
fn remove_stale(dir: &Path, prefix: &str) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = leftover_pid(&name, prefix) else {
            continue;
        };
        if pid == std::process::id() || Path::new("/proc").join(pid.to_string()).exists() {
            continue;
        }
        let path = e.path();
        log::info!(
            "removing leftover of an interrupted build path={}",
            path.display()
        );
        let res = if path.is_dir() {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        if let Err(err) = res {
            log::warn!("remove leftover path={} error={err}", path.display());
        }
    }
}

/// Hard-link copy of the tree (same filesystem: instant), falling back to a full copy.
fn clone_tree(tree: &Path, staging: &Path) -> Result<(), ImageError> {
    let t = Instant::now();
    let linked = Cmd::new("cp")
        .arg("-al")
        .arg(tree.as_os_str())
        .arg(staging.as_os_str())
        .output();
    if let Err(e) = linked {
        log::info!("hard-link copy failed ({e}); copying the tree");
        if staging.exists() {
            fs::remove_dir_all(staging).map_err(io_err("remove staging", staging))?;
        }
        Cmd::new("cp")
            .args(["-a", "--reflink=auto"])
            .arg(tree.as_os_str())
            .arg(staging.as_os_str())
            .output()?;
    }
    log::info!("staging tree ready took={}", fmt_duration(t.elapsed()));
    Ok(())
}

/// Writes a new file at `path` (unlinking what is there first, which may be a hard link into
/// the cached tree) with `mode`.
fn replace_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), ImageError> {
    if let Some(dir) = path.parent() {
        create_dir(dir)?;
    }
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => {
            return Err(ImageError::Unexpected {
                what: "tree layout",
                detail: format!("{} is a directory", path.display()),
            })
        }
        Ok(_) => fs::remove_file(path).map_err(io_err("unlink", path))?,
        Err(_) => {}
    }
    fs::write(path, bytes).map_err(io_err("write", path))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(io_err("chmod", path))
}

/// The unprivileged account every image gets: envd runs processes and file operations as it
/// unless a call (or the sandbox's Init) names another user (envd's `passwd::DEFAULT_USER`).
pub const GUEST_USER: &str = "user";
/// Its uid and gid (the first regular account of a Debian system).
pub const GUEST_UID: u32 = 1000;
/// Its home directory, inside the image.
pub const GUEST_HOME: &str = "/home/user";
/// Its login shell (bash is in [`INCLUDE`]).
pub const GUEST_SHELL: &str = "/bin/bash";

/// The fields of an account-file line (`name:...`), or None for comments and blank lines.
fn account_fields(line: &str) -> Option<Vec<&str>> {
    if line.trim().is_empty() || line.starts_with('#') {
        return None;
    }
    Some(line.split(':').collect())
}

/// `text` with `line` appended, unless an entry named [`GUEST_USER`] is there already. An id
/// column (`id_field`) holding [`GUEST_UID`] under another name is an error: the account
/// would share its files with that one.
fn add_account_line(
    text: &str,
    line: &str,
    id_field: Option<usize>,
    file: &str,
) -> Result<String, ImageError> {
    for fields in text.lines().filter_map(account_fields) {
        if fields[0] == GUEST_USER {
            return Ok(text.to_string());
        }
        if let Some(i) = id_field {
            if fields.get(i) == Some(&GUEST_UID.to_string().as_str()) {
                return Err(ImageError::Unexpected {
                    what: "tree layout",
                    detail: format!(
                        "{file}: id {GUEST_UID} belongs to {:?}, not {GUEST_USER:?}",
                        fields[0]
                    ),
                });
            }
        }
    }
    let mut out = text.to_string();
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
    out.push_str(line);
    out.push('\n');
    Ok(out)
}

/// The four account files of a tree with [`GUEST_USER`] added: passwd, group, shadow and
/// gshadow, in that order (the input in the same order). The password is locked (`*`):
/// nobody logs in, envd switches to the account directly.
pub fn with_guest_user(files: [&str; 4]) -> Result<[String; 4], ImageError> {
    let [passwd, group, shadow, gshadow] = files;
    Ok([
        add_account_line(
            passwd,
            &format!("{GUEST_USER}:x:{GUEST_UID}:{GUEST_UID}::{GUEST_HOME}:{GUEST_SHELL}"),
            Some(2),
            "etc/passwd",
        )?,
        add_account_line(
            group,
            &format!("{GUEST_USER}:x:{GUEST_UID}:"),
            Some(2),
            "etc/group",
        )?,
        add_account_line(
            shadow,
            &format!("{GUEST_USER}:*::0:99999:7:::"),
            None,
            "etc/shadow",
        )?,
        add_account_line(gshadow, &format!("{GUEST_USER}:!::"), None, "etc/gshadow")?,
    ])
}

/// Adds [`GUEST_USER`] to the tree at `root`: the account files (each a new inode; the old
/// may be a hard link into the cached tree) and a home directory owned by it, with the
/// files of `etc/skel`.
pub fn install_guest_user(root: &Path) -> Result<(), ImageError> {
    const FILES: [(&str, u32); 4] = [
        ("etc/passwd", 0o644),
        ("etc/group", 0o644),
        ("etc/shadow", 0o640),
        ("etc/gshadow", 0o640),
    ];
    let mut texts: [String; 4] = Default::default();
    for (i, (name, _)) in FILES.iter().enumerate() {
        let path = root.join(name);
        texts[i] = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(io_err("read", &path)(e)),
        };
    }
    let new = with_guest_user([&texts[0], &texts[1], &texts[2], &texts[3]])?;
    for (i, (name, mode)) in FILES.iter().enumerate() {
        if new[i] != texts[i] {
            let path = root.join(name);
            // Keep the owner and mode the tree gave it (shadow is root:shadow 0640).
            let meta = fs::metadata(&path).ok();
            replace_file(
                &path,
                new[i].as_bytes(),
                meta.as_ref().map_or(*mode, |m| m.mode() & 0o7777),
            )?;
            if let Some(m) = meta {
                std::os::unix::fs::chown(&path, Some(m.uid()), Some(m.gid()))
                    .map_err(io_err("chown", &path))?;
            }
        }
    }
    let home = root.join(GUEST_HOME.trim_start_matches('/'));
    create_dir(&home)?;
    let skel = root.join("etc/skel");
    if let Ok(entries) = fs::read_dir(&skel) {
        for e in entries.flatten() {
            let from = e.path();
            let Ok(m) = fs::symlink_metadata(&from) else {
                continue;
            };
            if !m.is_file() {
                continue;
            }
            let to = home.join(e.file_name());
            let bytes = fs::read(&from).map_err(io_err("read", &from))?;
            replace_file(&to, &bytes, m.mode() & 0o777)?;
            std::os::unix::fs::chown(&to, Some(GUEST_UID), Some(GUEST_UID))
                .map_err(io_err("chown", &to))?;
        }
    }
    fs::set_permissions(&home, fs::Permissions::from_mode(0o755))
        .map_err(io_err("chmod", &home))?;
    std::os::unix::fs::chown(&home, Some(GUEST_UID), Some(GUEST_UID))
        .map_err(io_err("chown", &home))
}

fn install_files(root: &Path, a: &Assembly<'_>) -> Result<(), ImageError> {
    let envd = fs::read(a.envd).map_err(io_err("read envd", a.envd))?;
    replace_file(&root.join("sbin/init"), &envd, 0o755)?;
    let local = root.join("usr/local/bin/envd");
    if let Ok(m) = fs::symlink_metadata(&local) {
        if !m.is_dir() {
            fs::remove_file(&local).map_err(io_err("unlink", &local))?;
        }
    }
    create_dir(&root.join("usr/local/bin"))?;
    fs::hard_link(root.join("sbin/init"), &local).map_err(io_err("link envd", &local))?;
    replace_file(
        &root.join("etc/hostname"),
        a.files.etc_hostname().as_bytes(),
        0o644,
    )?;
    replace_file(
        &root.join("etc/hosts"),
        a.files.etc_hosts().as_bytes(),
        0o644,
    )?;
    replace_file(
        &root.join("etc/resolv.conf"),
        a.files.etc_resolv_conf().as_bytes(),
        0o644,
    )?;
    install_guest_user(root)
}

/// Bytes the tree occupies (allocated blocks, each inode once).
fn tree_bytes(root: &Path) -> Result<u64, ImageError> {
    let mut seen = HashSet::new();
    let mut total = 0u64;
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).map_err(io_err("list", &dir))? {
            let entry = entry.map_err(io_err("list", &dir))?;
            let m = entry.metadata().map_err(io_err("stat", &entry.path()))?;
            if m.is_dir() {
                stack.push(entry.path());
            }
            if seen.insert((m.dev(), m.ino())) {
                total = total.saturating_add(m.blocks().saturating_mul(512));
            }
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn options_defaults() {
        let o = RootfsOptions::from_args(&argv(&["--envd", "/e"])).unwrap();
        assert_eq!(o.size_mib, 5120);
        assert_eq!(o.template_id, MINIMAL_TEMPLATE_ID);
        assert_eq!(
            o.out,
            PathBuf::from(
                "/var/lib/wrenn/templates/00000000-0000-0000-0000-000000000000/rootfs.ext4"
            )
        );
        assert_eq!(o.suite, "bookworm");
        assert_eq!(o.mirror, None);
        assert!(!o.force);
        assert_eq!(o.files, GuestFiles::default());
    }

    #[test]
    fn options_flags() {
        let o = RootfsOptions::from_args(&argv(&[
            "--envd=/e",
            "--state-root",
            "/s",
            "--size-mib",
            "64",
            "--template-id",
            "0A1B2C3D-0000-4000-8000-00000000000F",
            "--force",
            "--hostname",
            "box",
            "--nameserver",
            "9.9.9.9",
            "--mirror",
            "http://m/debian",
        ]))
        .unwrap();
        assert_eq!(o.template_id, "0a1b2c3d-0000-4000-8000-00000000000f");
        assert_eq!(
            o.out,
            PathBuf::from("/s/templates/0a1b2c3d-0000-4000-8000-00000000000f/rootfs.ext4")
        );
        assert_eq!(o.size_mib, 64);
        assert!(o.force);
        assert_eq!(o.files.hostname, "box");
        assert_eq!(o.files.nameservers, ["9.9.9.9"]);
        assert_eq!(o.mirror.as_deref(), Some("http://m/debian"));
        let o = RootfsOptions::from_args(&argv(&["--envd=/e", "--out", "/x/r.ext4"])).unwrap();
        assert_eq!(o.out, PathBuf::from("/x/r.ext4"));
    }

    #[test]
    fn options_reject_bad_values() {
        for bad in [
            &[][..],
            &["--envd=/e", "--template-id", "minimal"],
            &[
                "--envd=/e",
                "--template-id",
                "00000000000000000000000000000000",
            ],
            &["--envd=/e", "--size-mib", "1"],
            &["--envd=/e", "--size-mib", "-5"],
            &["--envd=/e", "--hostname", "-bad"],
            &["--envd=/e", "--hostname", "a b"],
            &["--envd=/e", "--nameserver", "dns.example"],
            &[
                "--envd=/e",
                "--nameserver=1.1.1.1",
                "--nameserver=1.1.1.2",
                "--nameserver=1.1.1.3",
                "--nameserver=1.1.1.4",
            ],
            &["--envd=/e", "--suite", "../etc"],
            &["--envd=/e", "positional"],
        ] {
            assert!(RootfsOptions::from_args(&argv(bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn leftover_names() {
        assert_eq!(leftover_pid("1234-99887766", ""), Some(1234));
        assert_eq!(
            leftover_pid(".rootfs.ext4.tmp-77", ".rootfs.ext4.tmp-"),
            Some(77)
        );
        assert_eq!(leftover_pid("rootfs.ext4", ".rootfs.ext4.tmp-"), None);
        assert_eq!(leftover_pid(".rootfs.ext4.tmp-", ".rootfs.ext4.tmp-"), None);
        assert_eq!(leftover_pid("snapshot", ""), None);
        assert_eq!(leftover_pid("-12", ""), None);
    }

    #[test]
    fn stale_leftovers_are_removed_live_ones_kept() {
        let dir = std::env::temp_dir().join(format!("wrenn-stale-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("99999999-1/etc")).unwrap();
        fs::write(dir.join(".rootfs.ext4.tmp-99999999"), "x").unwrap();
        let mine = format!(".rootfs.ext4.tmp-{}", std::process::id());
        fs::write(dir.join(&mine), "x").unwrap();
        fs::write(dir.join("rootfs.ext4"), "published").unwrap();
        remove_stale(&dir, "");
        remove_stale(&dir, ".rootfs.ext4.tmp-");
        let mut left: Vec<String> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, [mine, "rootfs.ext4".to_string()]);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn guest_files() {
        let f = GuestFiles::default();
        assert_eq!(f.etc_hostname(), "sandbox\n");
        assert!(f.etc_hosts().contains("127.0.1.1\tsandbox\n"));
        assert!(f.etc_hosts().starts_with("127.0.0.1\tlocalhost\n"));
        assert_eq!(f.etc_resolv_conf(), "nameserver 169.254.0.22\n");
    }

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/bash\n\
        nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n";
    const GROUP: &str = "root:x:0:\nusers:x:100:\nnogroup:x:65534:\n";

    #[test]
    fn account_files_gain_the_guest_user_once() {
        let [p, g, s, gs] =
            with_guest_user([PASSWD, GROUP, "root:*:19000:0:99999:7:::", ""]).unwrap();
        assert_eq!(
            p,
            format!("{PASSWD}user:x:1000:1000::/home/user:/bin/bash\n")
        );
        assert_eq!(g, format!("{GROUP}user:x:1000:\n"));
        assert_eq!(s, "root:*:19000:0:99999:7:::\nuser:*::0:99999:7:::\n");
        assert_eq!(gs, "user:!::\n");
        // envd reads the result as the account it runs things as by default.
        let again = with_guest_user([&p, &g, &s, &gs]).unwrap();
        assert_eq!(again, [p, g, s, gs], "adding twice changes nothing");
        // uid 1000 under another name is refused, not shared.
        let taken = format!("{PASSWD}debian:x:1000:1000::/home/debian:/bin/sh\n");
        assert!(matches!(
            with_guest_user([&taken, GROUP, "", ""]),
            Err(ImageError::Unexpected { .. })
        ));
        let gtaken = format!("{GROUP}staff2:x:1000:\n");
        assert!(with_guest_user([PASSWD, &gtaken, "", ""]).is_err());
    }

    #[test]
    fn install_guest_user_writes_accounts_and_an_owned_home() {
        let root = std::env::temp_dir().join(format!("wrenn-guest-user-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(root.join("etc/skel")).unwrap();
        fs::write(root.join("etc/passwd"), PASSWD).unwrap();
        fs::write(root.join("etc/group"), GROUP).unwrap();
        fs::write(root.join("etc/skel/.bashrc"), "# bashrc\n").unwrap();
        // etc/passwd as a hard link into a cached tree: the cache must stay as it was.
        let cached = root.join("cached-passwd");
        fs::hard_link(root.join("etc/passwd"), &cached).unwrap();
        let root_user = crate::doctor::sys::is_root();
        let r = install_guest_user(&root);
        if !root_user {
            // chown needs root; the files before it are still checked below.
            assert!(
                matches!(
                    r,
                    Err(ImageError::Io {
                        action: "chown",
                        ..
                    })
                ),
                "{r:?}"
            );
            proto::skip::note(
                "rootfs guest user",
                "not root: the home directory's owner is not checked",
            );
        } else {
            r.unwrap();
            let home = fs::metadata(root.join("home/user")).unwrap();
            assert!(home.is_dir());
            assert_eq!(
                (home.uid(), home.gid(), home.mode() & 0o777),
                (1000, 1000, 0o755)
            );
            let rc = fs::metadata(root.join("home/user/.bashrc")).unwrap();
            assert_eq!((rc.uid(), rc.gid()), (1000, 1000));
        }
        let passwd = fs::read_to_string(root.join("etc/passwd")).unwrap();
        assert!(
            passwd.ends_with("user:x:1000:1000::/home/user:/bin/bash\n"),
            "{passwd}"
        );
        assert!(fs::read_to_string(root.join("etc/group"))
            .unwrap()
            .ends_with("user:x:1000:\n"));
        assert_eq!(
            fs::read_to_string(&cached).unwrap(),
            PASSWD,
            "the cached tree is untouched"
        );
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn tree_key_depends_on_inputs_not_include_order() {
        let k = tree_key("bookworm", "http://m/debian", "amd64", &["a", "b"]);
        assert_eq!(
            k,
            tree_key("bookworm", "http://m/debian/", "amd64", &["b", "a", "a"])
        );
        assert_ne!(
            k,
            tree_key("trixie", "http://m/debian", "amd64", &["a", "b"])
        );
        assert_ne!(
            k,
            tree_key("bookworm", "http://n/debian", "amd64", &["a", "b"])
        );
        assert_ne!(
            k,
            tree_key("bookworm", "http://m/debian", "arm64", &["a", "b"])
        );
        assert_ne!(k, tree_key("bookworm", "http://m/debian", "amd64", &["a"]));
    }

    fn elf(dynamic: bool) -> Vec<u8> {
        let mut h = vec![0u8; 64 + 2 * 56];
        h[..4].copy_from_slice(b"\x7fELF");
        h[4] = 2;
        h[5] = 1;
        h[16] = 2; // ET_EXEC
        h[18] = 62; // x86_64
        h[32] = 64; // phoff
        h[54] = 56; // phentsize
        h[56] = 2; // phnum
        h[64] = 1; // PT_LOAD
        h[64 + 56] = if dynamic { 3 } else { 1 };
        h
    }

    #[test]
    fn elf_checks() {
        assert_eq!(elf_info(&elf(false)), Ok(ElfInfo { dynamic: false }));
        assert_eq!(elf_info(&elf(true)), Ok(ElfInfo { dynamic: true }));
        assert_eq!(elf_info(b"#!/bin/sh\n"), Err("not an ELF file"));
        let mut aarch64 = elf(false);
        aarch64[18] = 183;
        assert_eq!(elf_info(&aarch64), Err("not an x86_64 binary"));
        let mut truncated = elf(false);
        truncated.truncate(100);
        assert_eq!(
            elf_info(&truncated),
            Err("program headers beyond the first 64 KiB")
        );
        let mut obj = elf(false);
        obj[16] = 1; // ET_REL
        assert_eq!(elf_info(&obj), Err("not an executable"));
        // This test binary itself is a real ELF executable.
        let me = std::env::current_exe().unwrap();
        check_envd(&me).unwrap();
        assert!(matches!(
            check_envd(Path::new("/etc/hostname")),
            Err(ImageError::BadInput { .. }) | Err(ImageError::Io { .. })
        ));
    }
}
