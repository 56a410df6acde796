//! Bounds of `wrenn image`, each with its reason.

/// Patches in one `--patches` directory. The test-host workarounds are five; a directory with
/// hundreds of files is a mistake (wrong path), not a patch series.
pub const PATCHES_MAX: usize = 256;

/// One patch file. The largest workaround patch is a few KiB; 16 MiB fits any real series.
pub const PATCH_BYTES_MAX: u64 = 16 << 20;

/// A kernel `.config`: a full x86_64 one is about 150 KiB.
pub const CONFIG_BYTES_MAX: u64 = 4 << 20;

/// Smallest root filesystem image, in MiB: ext4 metadata plus a journal need a few MiB, and
/// anything below this cannot hold even a stand-in tree.
pub const ROOTFS_SIZE_MIB_MIN: u64 = 16;

/// Largest root filesystem image, in MiB (1 TiB): the file is sparse, but every sandbox gets a
/// copy and ext4's metadata grows with it.
pub const ROOTFS_SIZE_MIB_MAX: u64 = 1 << 20;

/// Free space an image must keep beyond the tree itself, in MiB: ext4 metadata, journal and
/// room for the first writes of a sandbox.
pub const ROOTFS_HEADROOM_MIB: u64 = 64;

/// envd binary size: a static envd is a few MiB; anything this big is the wrong file.
pub const ENVD_BYTES_MAX: u64 = 512 << 20;

/// glibc's resolver reads at most three `nameserver` lines (MAXNS).
pub const NAMESERVERS_MAX: usize = 3;

/// Linux host names (HOST_NAME_MAX).
pub const HOSTNAME_BYTES_MAX: usize = 64;

/// Lines of a failed command's output quoted in the error.
pub const ERROR_TAIL_LINES: usize = 40;

/// How often a kernel build reports progress, in seconds.
pub const PROGRESS_INTERVAL_SECS: u64 = 15;

/// `make -j` upper bound: more jobs than this only thrash a shared build host.
pub const MAKE_JOBS_MAX: u64 = 256;
