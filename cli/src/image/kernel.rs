//! `wrenn image kernel`: an uncompressed guest `vmlinux` from Debian's `linux-source-<ver>`.
//!
//! Steps: install the source package and build tools if missing; unpack the source into
//! `<state-root>/cache/kernel-build/<key>/`; apply `--patches` (test hosts only); write
//! `.config` = base + required fragment; `make olddefconfig`; check that every fragment option
//! survived; `make vmlinux` (progress every few seconds, full output in `make.log`); install
//! `kernels/vmlinux-<release>` plus its `.config` next to it.
//!
//! Caching: the key is a SHA-256 over the source package's name and version, both config
//! files, the patches (names and bytes) and the make target. The release string carries the
//! key's first 12 hex digits (`LOCALVERSION=-wrenn-<key12>`), so two builds that differ in any
//! input never share a file name, and a kernel that is installed is never rebuilt.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::args::{self, ArgError, Flag};
use super::command::Cmd;
use super::limits::{
    CONFIG_BYTES_MAX, MAKE_JOBS_MAX, PATCHES_MAX, PATCH_BYTES_MAX, PROGRESS_INTERVAL_SECS,
};
use super::sha256::Sha256;
use super::{apt, create_dir, fmt_duration, io_err, kconfig, write_atomic, ImageError, Lock};

/// The project's small base config.
pub const BASE_CONFIG: &str = include_str!("../../image/kernel/base.config");
/// What a Firecracker guest needs built in; checked after `olddefconfig`.
pub const REQUIRED_FRAGMENT: &str = include_str!("../../image/kernel/required.fragment");

/// Tools a kernel build needs besides the source (objtool needs libelf; bc, flex and bison
/// are used by Kbuild itself).
const BUILD_PACKAGES: &[&str] = &[
    "build-essential",
    "bc",
    "bison",
    "flex",
    "libelf-dev",
    "libssl-dev",
    "xz-utils",
    "patch",
];

/// The make target: the uncompressed ELF kernel Firecracker loads on x86_64.
const TARGET: &str = "vmlinux";

const FLAGS: &[Flag] = &[
    Flag::value("state-root"),
    Flag::value("patches"),
    Flag::value("version"),
    Flag::value("jobs"),
    Flag::value("nice"),
    Flag::switch("keep-build"),
];

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelOptions {
    pub state_root: PathBuf,
    pub patches: Option<PathBuf>,
    /// Debian source series, e.g. `6.1` for `linux-source-6.1`.
    pub version: String,
    pub jobs: u64,
    /// `nice -n` for make: a kernel build is background work on a shared host.
    pub nice: u64,
    /// Keep the object tree after installing (for iterating on patches).
    pub keep_build: bool,
}

impl KernelOptions {
    pub fn from_args(argv: &[String]) -> Result<Self, ArgError> {
        let p = args::parse(argv, FLAGS)?;
        let version = p.value("version").unwrap_or("6.1").to_string();
        let valid = version.split('.').count() == 2
            && version
                .split('.')
                .all(|part| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()));
        if !valid {
            return Err(ArgError::BadValue {
                flag: "version",
                value: version,
                reason: "expected MAJOR.MINOR, e.g. 6.1".to_string(),
            });
        }
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u64);
        Ok(KernelOptions {
            state_root: PathBuf::from(p.value("state-root").unwrap_or(super::DEFAULT_STATE_ROOT)),
            patches: p.value("patches").map(PathBuf::from),
            version,
            jobs: p.number("jobs", cpus.min(MAKE_JOBS_MAX), 1, MAKE_JOBS_MAX)?,
            nice: p.number("nice", 10, 0, 19)?,
            keep_build: p.switch("keep-build"),
        })
    }

    pub fn source_package(&self) -> String {
        format!("linux-source-{}", self.version)
    }
}

/// One patch, as read (and hashed) before it is applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Patch {
    pub name: String,
    pub bytes: Vec<u8>,
}

/// Reads `dir/*.patch` and `dir/*.diff` in name order.
pub fn read_patches(dir: &Path) -> Result<Vec<Patch>, ImageError> {
    let mut names = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err("list patch directory", dir))? {
        let entry = entry.map_err(io_err("list patch directory", dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if (name.ends_with(".patch") || name.ends_with(".diff")) && entry.path().is_file() {
            names.push(name);
        }
    }
    names.sort();
    let bad = |reason: String| ImageError::BadInput {
        what: "patch directory",
        path: dir.to_path_buf(),
        reason,
    };
    if names.is_empty() {
        return Err(bad("no *.patch or *.diff files".to_string()));
    }
    if names.len() > PATCHES_MAX {
        return Err(bad(format!("more than {PATCHES_MAX} patches")));
    }
    names
        .into_iter()
        .map(|name| {
            let path = dir.join(&name);
            let bytes = read_bounded(&path, PATCH_BYTES_MAX, "patch")?;
            Ok(Patch { name, bytes })
        })
        .collect()
}

fn read_bounded(path: &Path, max: u64, what: &'static str) -> Result<Vec<u8>, ImageError> {
    let len = fs::metadata(path).map_err(io_err("stat", path))?.len();
    if len > max {
        return Err(ImageError::BadInput {
            what,
            path: path.to_path_buf(),
            reason: format!("{len} bytes is over the limit of {max}"),
        });
    }
    fs::read(path).map_err(io_err("read", path))
}

/// The cache key of a build (64 hex digits).
pub fn cache_key(
    source_package: &str,
    source_version: &str,
    base: &str,
    fragment: &str,
    patches: &[Patch],
) -> String {
    let mut h = Sha256::new();
    h.update_field(b"wrenn-kernel-cache-v1");
    h.update_field(std::env::consts::ARCH.as_bytes());
    h.update_field(TARGET.as_bytes());
    h.update_field(source_package.as_bytes());
    h.update_field(source_version.as_bytes());
    h.update_field(base.as_bytes());
    h.update_field(fragment.as_bytes());
    h.update_field(&(patches.len() as u64).to_le_bytes());
    for p in patches {
        h.update_field(p.name.as_bytes());
        h.update_field(&p.bytes);
    }
    h.finish_hex()
}

/// The `.config` written before `olddefconfig`: base first, the fragment last so it wins.
pub fn initial_config(base: &str, fragment: &str) -> String {
    format!(
        "# wrenn image kernel: base.config\n{base}\n# wrenn image kernel: required.fragment\n{fragment}\n"
    )
}

/// Checks the final `.config` against the fragment.
pub fn check_config(config_text: &str, config_path: &Path) -> Result<(), ImageError> {
    let required = kconfig::parse(REQUIRED_FRAGMENT).map_err(|source| ImageError::Config {
        path: PathBuf::from("image/kernel/required.fragment"),
        source,
    })?;
    let config = kconfig::parse(config_text).map_err(|source| ImageError::Config {
        path: config_path.to_path_buf(),
        source,
    })?;
    let problems = kconfig::check(&required, &config);
    if problems.is_empty() {
        Ok(())
    } else {
        Err(ImageError::MissingOptions {
            config: config_path.to_path_buf(),
            problems,
        })
    }
}

/// Builds (or finds in the cache) the kernel; returns the installed `vmlinux` path.
pub fn build(opts: &KernelOptions) -> Result<PathBuf, ImageError> {
    let started = Instant::now();
    let package = opts.source_package();
    let mut packages = vec![package.as_str()];
    packages.extend_from_slice(BUILD_PACKAGES);
    apt::ensure_installed(&packages)?;
    let source_version =
        apt::installed_version(&package)?.ok_or_else(|| ImageError::Unexpected {
            what: "package state",
            detail: format!("{package} is not installed after apt-get install"),
        })?;
    let tarball = PathBuf::from(format!("/usr/src/{package}.tar.xz"));
    if !tarball.is_file() {
        return Err(ImageError::BadInput {
            what: "kernel source",
            path: tarball,
            reason: format!("not shipped by {package} {source_version}"),
        });
    }
    let patches = match &opts.patches {
        Some(dir) => read_patches(dir)?,
        None => Vec::new(),
    };
    let key = cache_key(
        &package,
        &source_version,
        BASE_CONFIG,
        REQUIRED_FRAGMENT,
        &patches,
    );
    let short = &key[..12];
    let local_version = format!("LOCALVERSION=-wrenn-{short}");
    log::info!(
        "kernel source={package} version={source_version} patches={} key={short}",
        patches.len()
    );

    let kernels = opts.state_root.join("kernels");
    let build_root = opts.state_root.join("cache").join("kernel-build");
    create_dir(&kernels)?;
    create_dir(&build_root)?;
    let _lock = Lock::acquire(&build_root.join(".lock"))?;

    // Cache hit: the stamp names the release, and that kernel is installed.
    let stamp = build_root.join(format!("{short}.release"));
    if let Ok(release) = fs::read_to_string(&stamp) {
        let installed = kernels.join(format!("vmlinux-{}", release.trim()));
        if installed.is_file() {
            log::info!("kernel up to date path={} (cached)", installed.display());
            return Ok(installed);
        }
    }

    let work = build_root.join(short);
    let src = work.join(&package);
    prepare_source(&tarball, &work, &src, &patches)?;

    // Configure and check.
    let final_config = configure(&src, opts.nice)?;
    log::info!("kernel config checked: every required option holds");
    let make = |args: &[&str]| {
        Cmd::new("nice")
            .args(["-n", &opts.nice.to_string(), "make", "-C"])
            .arg(src.as_os_str())
            .arg(local_version.as_str())
            .args(args.iter().copied())
    };
    let release = make(&["-s", "kernelrelease"]).output()?.trim().to_string();
    if release.is_empty() || release.contains(['/', ' ', '\n']) {
        return Err(ImageError::Unexpected {
            what: "kernelrelease",
            detail: format!("{release:?}"),
        });
    }

    // Build with progress.
    let steps_file = build_root.join("steps.last");
    let expected_steps: Option<u64> = fs::read_to_string(&steps_file)
        .ok()
        .and_then(|s| s.trim().parse().ok());
    let build_started = Instant::now();
    let mut progress = Progress::new(expected_steps);
    let jobs = format!("-j{}", opts.jobs);
    log::info!(
        "building {TARGET} release={release} jobs={} nice={} (about 12+ minutes on 2 cores)",
        opts.jobs,
        opts.nice
    );
    make(&[jobs.as_str(), TARGET])
        .run_logged(&work.join("make.log"), |line| progress.line(line))?;
    log::info!(
        "built {TARGET} in {} ({} steps)",
        fmt_duration(build_started.elapsed()),
        progress.steps
    );
    if let Err(e) = fs::write(&steps_file, format!("{}\n", progress.steps)) {
        log::warn!("write {} error={e}", steps_file.display());
    }

    // Install: new files under temporary names, renamed into place.
    let installed = kernels.join(format!("vmlinux-{release}"));
    let vmlinux = src.join(TARGET);
    let tmp = super::temp_sibling(&installed);
    fs::copy(&vmlinux, &tmp).map_err(io_err("copy vmlinux to", &tmp))?;
    fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(io_err("sync", &tmp))?;
    fs::rename(&tmp, &installed).map_err(io_err("install", &installed))?;
    write_atomic(
        &kernels.join(format!("vmlinux-{release}.config")),
        final_config.as_bytes(),
    )?;
    super::sync_parent(&installed)?;
    write_atomic(&stamp, format!("{release}\n").as_bytes())?;
    log::info!(
        "kernel installed path={} total={}",
        installed.display(),
        fmt_duration(started.elapsed())
    );
    if !opts.keep_build {
        // A full object tree is ~1.5 GB in ~20k files: removing it can take minutes on a busy
        // disk, so it is said, and a failure only warns (the kernel is already installed).
        let t = Instant::now();
        log::info!(
            "removing build tree path={} (--keep-build keeps it)",
            work.display()
        );
        match fs::remove_dir_all(&work) {
            Ok(()) => log::info!("build tree removed took={}", fmt_duration(t.elapsed())),
            Err(e) => log::warn!("remove build tree path={} error={e}", work.display()),
        }
    }
    Ok(installed)
}

/// Writes `.config` (base + fragment) in the kernel tree `src`, runs `make olddefconfig` and
/// checks the result against the fragment; returns the final `.config`.
pub fn configure(src: &Path, nice: u64) -> Result<String, ImageError> {
    let config_path = src.join(".config");
    write_atomic(
        &config_path,
        initial_config(BASE_CONFIG, REQUIRED_FRAGMENT).as_bytes(),
    )?;
    Cmd::new("nice")
        .args(["-n", &nice.to_string(), "make", "-C"])
        .arg(src.as_os_str())
        .arg("olddefconfig")
        .output()?;
    let final_config = String::from_utf8(read_bounded(&config_path, CONFIG_BYTES_MAX, ".config")?)
        .map_err(|e| ImageError::BadInput {
            what: ".config",
            path: config_path.clone(),
            reason: e.to_string(),
        })?;
    check_config(&final_config, &config_path)?;
    Ok(final_config)
}

/// Unpacks the source and applies the patches, unless a previous run finished that (its
/// `patched` stamp exists): then make resumes an interrupted build incrementally.
fn prepare_source(
    tarball: &Path,
    work: &Path,
    src: &Path,
    patches: &[Patch],
) -> Result<(), ImageError> {
    let patched = work.join("patched");
    if patched.is_file() && src.is_dir() {
        log::info!("reusing unpacked source path={}", src.display());
        return Ok(());
    }
    if work.exists() {
        fs::remove_dir_all(work).map_err(io_err("remove partial build tree", work))?;
    }
    create_dir(work)?;
    let t = Instant::now();
    Cmd::new("tar")
        .arg("-xf")
        .arg(tarball.as_os_str())
        .arg("-C")
        .arg(work.as_os_str())
        .output()?;
    if !src.is_dir() {
        return Err(ImageError::Unexpected {
            what: "source layout",
            detail: format!("{} has no {}", tarball.display(), src.display()),
        });
    }
    log::info!(
        "unpacked {} in {}",
        tarball.display(),
        fmt_duration(t.elapsed())
    );
    // Apply exactly the bytes that were hashed into the key.
    let patch_dir = work.join("patches");
    if !patches.is_empty() {
        create_dir(&patch_dir)?;
    }
    for p in patches {
        let path = patch_dir.join(&p.name);
        fs::write(&path, &p.bytes).map_err(io_err("write patch", &path))?;
        log::info!("applying patch {}", p.name);
        Cmd::new("patch")
            .args(["-p1", "--forward", "--batch", "-d"])
            .arg(src.as_os_str())
            .arg("-i")
            .arg(path.as_os_str())
            .output()?;
    }
    fs::write(&patched, b"").map_err(io_err("write stamp", &patched))
}

/// Counts Kbuild's step lines (`  CC      kernel/fork.o`) and logs progress periodically.
struct Progress {
    steps: u64,
    expected: Option<u64>,
    started: Instant,
    last_report: Instant,
}

impl Progress {
    fn new(expected: Option<u64>) -> Self {
        let now = Instant::now();
        Progress {
            steps: 0,
            expected,
            started: now,
            last_report: now,
        }
    }

    fn line(&mut self, line: &str) {
        if is_step(line) {
            self.steps += 1;
        }
        if self.last_report.elapsed() >= Duration::from_secs(PROGRESS_INTERVAL_SECS) {
            self.last_report = Instant::now();
            let pct = match self.expected {
                Some(total) if total > 0 => {
                    format!(" ~{}%", (self.steps * 100 / total).min(99))
                }
                _ => String::new(),
            };
            log::info!(
                "kernel build: {} steps{pct} elapsed={} last={:?}",
                self.steps,
                fmt_duration(self.started.elapsed()),
                line.trim()
            );
        }
    }
}

/// A Kbuild quiet-mode step: two spaces, an upper-case tag, spaces, a target.
pub fn is_step(line: &str) -> bool {
    let Some(rest) = line.strip_prefix("  ") else {
        return false;
    };
    let tag: String = rest.chars().take_while(|c| !c.is_whitespace()).collect();
    !tag.is_empty()
        && tag
            .chars()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '-' || c == '_')
        && rest.len() > tag.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn options_defaults_and_flags() {
        let o = KernelOptions::from_args(&[]).unwrap();
        assert_eq!(o.state_root, PathBuf::from("/var/lib/wrenn"));
        assert_eq!(o.version, "6.1");
        assert_eq!(o.source_package(), "linux-source-6.1");
        assert_eq!(o.patches, None);
        assert_eq!(o.nice, 10);
        assert!(o.jobs >= 1);
        assert!(!o.keep_build);
        let o = KernelOptions::from_args(&argv(&[
            "--state-root=/s",
            "--patches",
            "/p",
            "--version",
            "6.12",
            "--jobs",
            "3",
            "--nice=0",
            "--keep-build",
        ]))
        .unwrap();
        assert_eq!(o.state_root, PathBuf::from("/s"));
        assert_eq!(o.patches, Some(PathBuf::from("/p")));
        assert_eq!(o.source_package(), "linux-source-6.12");
        assert_eq!((o.jobs, o.nice, o.keep_build), (3, 0, true));
    }

    #[test]
    fn options_reject_bad_values() {
        for bad in [
            &["--version", "6"][..],
            &["--version", "6.1;rm"],
            &["--version", "6..1"],
            &["--jobs", "0"],
            &["--nice", "20"],
            &["--frobnicate"],
        ] {
            assert!(KernelOptions::from_args(&argv(bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn cache_key_changes_with_every_input() {
        let p = |n: &str, b: &str| Patch {
            name: n.to_string(),
            bytes: b.as_bytes().to_vec(),
        };
        let base = cache_key(
            "linux-source-6.1",
            "6.1.1-1",
            "B",
            "F",
            &[p("a.patch", "x")],
        );
        assert_eq!(base.len(), 64);
        assert!(base.bytes().all(|b| b.is_ascii_hexdigit()));
        // Deterministic.
        assert_eq!(
            base,
            cache_key(
                "linux-source-6.1",
                "6.1.1-1",
                "B",
                "F",
                &[p("a.patch", "x")]
            )
        );
        let variants = [
            cache_key(
                "linux-source-6.2",
                "6.1.1-1",
                "B",
                "F",
                &[p("a.patch", "x")],
            ),
            cache_key(
                "linux-source-6.1",
                "6.1.1-2",
                "B",
                "F",
                &[p("a.patch", "x")],
            ),
            cache_key(
                "linux-source-6.1",
                "6.1.1-1",
                "B2",
                "F",
                &[p("a.patch", "x")],
            ),
            cache_key(
                "linux-source-6.1",
                "6.1.1-1",
                "B",
                "F2",
                &[p("a.patch", "x")],
            ),
            cache_key(
                "linux-source-6.1",
                "6.1.1-1",
                "B",
                "F",
                &[p("a.patch", "y")],
            ),
            cache_key(
                "linux-source-6.1",
                "6.1.1-1",
                "B",
                "F",
                &[p("b.patch", "x")],
            ),
            cache_key("linux-source-6.1", "6.1.1-1", "B", "F", &[]),
            cache_key(
                "linux-source-6.1",
                "6.1.1-1",
                "B",
                "F",
                &[p("a.patch", "x"), p("b.patch", "")],
            ),
            // Moving text between base and fragment is a different config.
            cache_key(
                "linux-source-6.1",
                "6.1.1-1",
                "BF",
                "",
                &[p("a.patch", "x")],
            ),
        ];
        for (i, v) in variants.iter().enumerate() {
            assert_ne!(&base, v, "variant {i} collides");
        }
    }

    #[test]
    fn read_patches_sorted_filtered_and_bounded() {
        let dir = std::env::temp_dir().join(format!("wrenn-patches-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        assert!(matches!(
            read_patches(&dir),
            Err(ImageError::BadInput { .. })
        ));
        fs::write(dir.join("0002-b.patch"), "b").unwrap();
        fs::write(dir.join("0001-a.patch"), "a").unwrap();
        fs::write(dir.join("0003-c.diff"), "c").unwrap();
        fs::write(dir.join("README.md"), "not a patch").unwrap();
        fs::write(dir.join("guest.config"), "not a patch").unwrap();
        let names: Vec<String> = read_patches(&dir)
            .unwrap()
            .into_iter()
            .map(|p| p.name)
            .collect();
        assert_eq!(names, ["0001-a.patch", "0002-b.patch", "0003-c.diff"]);
        assert!(matches!(
            read_patches(&dir.join("missing")),
            Err(ImageError::Io { .. })
        ));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn initial_config_puts_the_fragment_last() {
        let c = initial_config("CONFIG_A=m\n", "CONFIG_A=y\n");
        let parsed = kconfig::parse(&c).unwrap();
        assert_eq!(
            parsed.get("CONFIG_A"),
            Some(&kconfig::Value::Set("y".into()))
        );
    }

    #[test]
    fn check_config_reports_every_missing_option() {
        // A config with nothing the fragment wants: every `=y` line is reported.
        let err = check_config("CONFIG_64BIT=y\n", Path::new("/x/.config")).unwrap_err();
        let ImageError::MissingOptions { problems, .. } = &err else {
            panic!("wrong error {err:?}")
        };
        let frag = kconfig::parse(REQUIRED_FRAGMENT).unwrap();
        let wanted_on = frag
            .entries
            .iter()
            .filter(|(_, v)| *v != kconfig::Value::NotSet)
            .count();
        assert_eq!(problems.len(), wanted_on - 1, "all but CONFIG_64BIT");
        let msg = err.to_string();
        assert!(msg.contains("CONFIG_PTP_1588_CLOCK_KVM wanted y"), "{msg}");
        assert!(msg.contains("CONFIG_VIRTIO_VSOCKETS wanted y"), "{msg}");
        // A config that satisfies the fragment passes.
        let ok: String = frag
            .entries
            .iter()
            .map(|(n, v)| match v {
                kconfig::Value::Set(x) => format!("{n}={x}\n"),
                kconfig::Value::NotSet => format!("# {n} is not set\n"),
            })
            .collect();
        check_config(&ok, Path::new("/x/.config")).unwrap();
        // One option demoted to a module is named.
        let demoted = ok.replace("CONFIG_VIRTIO_BLK=y", "CONFIG_VIRTIO_BLK=m");
        let err = check_config(&demoted, Path::new("/x/.config")).unwrap_err();
        assert!(err
            .to_string()
            .ends_with("CONFIG_VIRTIO_BLK wanted y, got m"));
    }

    /// The shipped base + fragment against Debian's real Kconfig: `olddefconfig` must keep
    /// every fragment option. Needs `linux-source-6.1` installed (about 30 s: most of it is
    /// decompressing the tarball, of which only the Kconfig files and scripts are unpacked).
    #[test]
    fn shipped_config_holds_after_olddefconfig_on_debian_source() {
        let tarball = Path::new("/usr/src/linux-source-6.1.tar.xz");
        if !tarball.is_file() || super::super::command::find_program("make").is_none() {
            let reason = format!("{} or make not installed", tarball.display());
            proto::skip::note("kernel config check", &reason);
            return;
        }
        let dir = std::env::temp_dir().join(format!("wrenn-kconfig-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        Cmd::new("tar")
            .arg("-xf")
            .arg(tarball.as_os_str())
            .arg("-C")
            .arg(dir.as_os_str())
            .args([
                "--wildcards",
                "*Kconfig*",
                "linux-source-6.1/scripts/*",
                "linux-source-6.1/Makefile",
                "linux-source-6.1/arch/x86/Makefile*",
                "linux-source-6.1/tools/*",
            ])
            .output()
            .unwrap();
        let src = dir.join("linux-source-6.1");
        let result = configure(&src, 0);
        let _ = fs::remove_dir_all(&dir);
        let config = result.unwrap();
        let parsed = kconfig::parse(&config).unwrap();
        assert_eq!(
            parsed.get("CONFIG_VIRTIO_VSOCKETS"),
            Some(&kconfig::Value::Set("y".into()))
        );
        assert_eq!(parsed.get("CONFIG_MODULES"), Some(&kconfig::Value::NotSet));
    }

    #[test]
    fn kbuild_step_lines() {
        assert!(is_step("  CC      kernel/fork.o"));
        assert!(is_step("  LD      vmlinux.o"));
        assert!(is_step("  HOSTCC  scripts/basic/fixdep"));
        assert!(!is_step("make[1]: Entering directory"));
        assert!(!is_step("  CC"));
        assert!(!is_step("kernel/fork.c:12: warning: x"));
        assert!(!is_step("   3 |  int x;"));
    }
}
