//! Typed requests of Firecracker's API: each builds its method, path and JSON body, checked
//! against what Firecracker accepts (IDs, paths as UTF-8, ranges) before anything is sent.
//!
//! Optional fields are written only when they differ from Firecracker's default, so a body
//! stays valid on Firecracker versions that predate a field we do not use. The integration
//! tests check every body against Firecracker's own API schema.

use std::fmt;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Map, Value};

use crate::api::{ApiRequest, Method};
use crate::limits::{
    API_ID_LEN_MAX, API_REQUEST_BODY_LEN_MAX, API_TIMEOUT_DEFAULT, API_TIMEOUT_SNAPSHOT_CREATE,
    API_TIMEOUT_SNAPSHOT_LOAD, BOOT_ARGS_LEN_MAX, UNIX_SOCKET_PATH_LEN_MAX,
};

/// Kernel arguments every guest gets: reboot by triple fault (Firecracker exits on it), panic
/// reboots after a second, no PCI scan (virtio-mmio only), and kvm-clock as the clock source
/// (the TSC is not trusted across snapshot restore).
pub const BOOT_ARGS_BASE: &str = "reboot=k panic=1 pci=off clocksource=kvm-clock";
/// Arguments when the serial console is asked for.
pub const BOOT_ARGS_CONSOLE_ON: &str = "console=ttyS0";
/// Arguments when it is not: no 8250 UART at all, so the guest never spends time on a serial
/// port nobody reads (writing to it traps to Firecracker for every byte).
pub const BOOT_ARGS_CONSOLE_OFF: &str = "8250.nr_uarts=0";

/// A request that cannot be built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestError {
    /// A device or drive ID Firecracker would refuse (1–64 of `[A-Za-z0-9_]`).
    InvalidId { what: &'static str, id: String },
    /// A path that is not UTF-8 (JSON strings are).
    NonUtf8Path { field: &'static str, path: PathBuf },
    /// A value out of range or malformed.
    Invalid { field: &'static str, reason: String },
    /// The JSON body is over the API's payload limit.
    BodyTooLarge { len: usize },
}

impl fmt::Display for RequestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RequestError::InvalidId { what, id } => write!(f, "invalid {what} {id:?}"),
            RequestError::NonUtf8Path { field, path } => {
                write!(f, "{field} {} is not UTF-8", path.display())
            }
            RequestError::Invalid { field, reason } => write!(f, "invalid {field}: {reason}"),
            RequestError::BodyTooLarge { len } => write!(
                f,
                "request body of {len} bytes is over {API_REQUEST_BODY_LEN_MAX}"
            ),
        }
    }
}

impl std::error::Error for RequestError {}

/// Something that becomes one API request.
pub trait ToApiRequest {
    fn to_api_request(&self) -> Result<ApiRequest, RequestError>;
}

fn check_id(what: &'static str, id: &str) -> Result<(), RequestError> {
    let ok = !id.is_empty()
        && id.len() <= API_ID_LEN_MAX
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(RequestError::InvalidId {
            what,
            id: id.to_owned(),
        })
    }
}

fn path_str<'a>(field: &'static str, p: &'a Path) -> Result<&'a str, RequestError> {
    let s = p.to_str().ok_or_else(|| RequestError::NonUtf8Path {
        field,
        path: p.to_owned(),
    })?;
    if s.is_empty() {
        return Err(RequestError::Invalid {
            field,
            reason: "empty path".to_owned(),
        });
    }
    Ok(s)
}

fn socket_path_str<'a>(
    field: &'static str,
    p: &'a Path,
    suffix_len: usize,
) -> Result<&'a str, RequestError> {
    let s = path_str(field, p)?;
    if s.len() + suffix_len > UNIX_SOCKET_PATH_LEN_MAX {
        return Err(RequestError::Invalid {
            field,
            reason: format!(
                "socket path of {} bytes leaves no room under {UNIX_SOCKET_PATH_LEN_MAX}",
                s.len()
            ),
        });
    }
    Ok(s)
}

fn build(
    method: Method,
    path: String,
    body: Value,
    timeout: Duration,
) -> Result<ApiRequest, RequestError> {
    // Display of a Value writes into a String, which cannot fail.
    let body = body.to_string().into_bytes();
    if body.len() > API_REQUEST_BODY_LEN_MAX {
        return Err(RequestError::BodyTooLarge { len: body.len() });
    }
    Ok(ApiRequest {
        method,
        path,
        body: Some(body),
        timeout,
    })
}

fn put(path: impl Into<String>, body: Map<String, Value>) -> Result<ApiRequest, RequestError> {
    build(
        Method::Put,
        path.into(),
        Value::Object(body),
        API_TIMEOUT_DEFAULT,
    )
}

/// `PUT /machine-config`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MachineConfig {
    /// 1, or an even number up to 32 (Firecracker's rule).
    pub vcpu_count: u32,
    pub mem_size_mib: u32,
    pub smt: bool,
    /// Needed for Diff snapshots of a cold-booted VM.
    pub track_dirty_pages: bool,
}

impl MachineConfig {
    pub fn new(vcpu_count: u32, mem_size_mib: u32) -> MachineConfig {
        MachineConfig {
            vcpu_count,
            mem_size_mib,
            smt: false,
            track_dirty_pages: false,
        }
    }
}

impl ToApiRequest for MachineConfig {
    fn to_api_request(&self) -> Result<ApiRequest, RequestError> {
        let v = self.vcpu_count;
        if !(v == 1 || (v % 2 == 0 && (2..=32).contains(&v))) {
            return Err(RequestError::Invalid {
                field: "vcpu_count",
                reason: format!("{v} is not 1 or an even number up to 32"),
            });
        }
        if self.mem_size_mib == 0 {
            return Err(RequestError::Invalid {
                field: "mem_size_mib",
                reason: "zero".to_owned(),
            });
        }
        let mut m = Map::new();
        m.insert("vcpu_count".into(), v.into());
        m.insert("mem_size_mib".into(), self.mem_size_mib.into());
        if self.smt {
            m.insert("smt".into(), true.into());
        }
        if self.track_dirty_pages {
            m.insert("track_dirty_pages".into(), true.into());
        }
        put("/machine-config", m)
    }
}

/// `PUT /boot-source`. The kernel command line is [`BOOT_ARGS_BASE`], the console setting,
/// then the extra arguments in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootSource {
    pub kernel_image_path: PathBuf,
    pub initrd_path: Option<PathBuf>,
    /// Serial console on `ttyS0` (slow: keep it off in production).
    pub console: bool,
    /// More kernel arguments (the network slot's `ip=`, host workarounds).
    pub extra_args: Vec<String>,
}

impl BootSource {
    pub fn new(kernel_image_path: impl Into<PathBuf>) -> BootSource {
        BootSource {
            kernel_image_path: kernel_image_path.into(),
            initrd_path: None,
            console: false,
            extra_args: Vec::new(),
        }
    }

    /// Appends kernel arguments (split on whitespace).
    pub fn arg(mut self, args: &str) -> BootSource {
        self.extra_args
            .extend(args.split_ascii_whitespace().map(str::to_owned));
        self
    }

    /// The kernel command line this boot source passes.
    pub fn boot_args(&self) -> Result<String, RequestError> {
        let mut s = String::from(BOOT_ARGS_BASE);
        s.push(' ');
        s.push_str(if self.console {
            BOOT_ARGS_CONSOLE_ON
        } else {
            BOOT_ARGS_CONSOLE_OFF
        });
        for a in &self.extra_args {
            if a.is_empty() || !a.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(RequestError::Invalid {
                    field: "boot_args",
                    reason: format!("argument {a:?} is empty or has spaces or control bytes"),
                });
            }
            s.push(' ');
            s.push_str(a);
        }
        if s.len() > BOOT_ARGS_LEN_MAX {
            return Err(RequestError::Invalid {
                field: "boot_args",
                reason: format!("{} bytes, over {BOOT_ARGS_LEN_MAX}", s.len()),
            });
        }
        Ok(s)
    }
}

impl ToApiRequest for BootSource {
    fn to_api_request(&self) -> Result<ApiRequest, RequestError> {
        let mut m = Map::new();
        m.insert(
            "kernel_image_path".into(),
            path_str("kernel_image_path", &self.kernel_image_path)?.into(),
        );
        if let Some(p) = &self.initrd_path {
            m.insert("initrd_path".into(), path_str("initrd_path", p)?.into());
        }
        m.insert("boot_args".into(), self.boot_args()?.into());
        put("/boot-source", m)
    }
}

/// Host page cache use of a drive.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum CacheType {
    /// Guest flushes are not passed to the host (Firecracker's default).
    #[default]
    Unsafe,
    /// Guest flushes become fsync on the host.
    Writeback,
}

/// `PUT /drives/{drive_id}` (virtio-block).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Drive {
    pub drive_id: String,
    pub path_on_host: PathBuf,
    pub is_root_device: bool,
    pub is_read_only: bool,
    pub cache_type: CacheType,
}

impl Drive {
    /// The writable root drive at `path_on_host`.
    pub fn root(drive_id: &str, path_on_host: impl Into<PathBuf>) -> Drive {
        Drive {
            drive_id: drive_id.to_owned(),
            path_on_host: path_on_host.into(),
            is_root_device: true,
            is_read_only: false,
            cache_type: CacheType::Unsafe,
        }
    }
}

impl ToApiRequest for Drive {
    fn to_api_request(&self) -> Result<ApiRequest, RequestError> {
        check_id("drive id", &self.drive_id)?;
        let mut m = Map::new();
        m.insert("drive_id".into(), self.drive_id.clone().into());
        m.insert(
            "path_on_host".into(),
            path_str("path_on_host", &self.path_on_host)?.into(),
        );
        m.insert("is_root_device".into(), self.is_root_device.into());
        m.insert("is_read_only".into(), self.is_read_only.into());
        if self.cache_type == CacheType::Writeback {
            m.insert("cache_type".into(), "Writeback".into());
        }
        put(format!("/drives/{}", self.drive_id), m)
    }
}

/// `PUT /network-interfaces/{iface_id}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetworkInterface {
    pub iface_id: String,
    /// The tap device (in Firecracker's network namespace).
    pub host_dev_name: String,
    pub guest_mac: Option<[u8; 6]>,
}

/// Linux's IFNAMSIZ minus the NUL.
const IFNAME_LEN_MAX: usize = 15;

fn check_ifname(field: &'static str, name: &str) -> Result<(), RequestError> {
    let ok = !name.is_empty()
        && name.len() <= IFNAME_LEN_MAX
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':');
    if ok {
        Ok(())
    } else {
        Err(RequestError::Invalid {
            field,
            reason: format!("{name:?} is not a network interface name"),
        })
    }
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    let parts: Vec<String> = mac.iter().map(|b| format!("{b:02x}")).collect();
    parts.join(":")
}

impl ToApiRequest for NetworkInterface {
    fn to_api_request(&self) -> Result<ApiRequest, RequestError> {
        check_id("iface id", &self.iface_id)?;
        check_ifname("host_dev_name", &self.host_dev_name)?;
        let mut m = Map::new();
        m.insert("iface_id".into(), self.iface_id.clone().into());
        m.insert("host_dev_name".into(), self.host_dev_name.clone().into());
        if let Some(mac) = &self.guest_mac {
            if mac[0] & 1 == 1 {
                return Err(RequestError::Invalid {
                    field: "guest_mac",
                    reason: "multicast address".to_owned(),
                });
            }
            m.insert("guest_mac".into(), format_mac(mac).into());
        }
        put(format!("/network-interfaces/{}", self.iface_id), m)
    }
}

/// Longest `_<port>` suffix Firecracker appends to the vsock socket path.
const VSOCK_PORT_SUFFIX_LEN_MAX: usize = "_4294967295".len();

/// `PUT /vsock`: the hybrid vsock device backed by `uds_path`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Vsock {
    /// At least 3 (0–2 are reserved).
    pub guest_cid: u32,
    pub uds_path: PathBuf,
}

impl ToApiRequest for Vsock {
    fn to_api_request(&self) -> Result<ApiRequest, RequestError> {
        if self.guest_cid < 3 {
            return Err(RequestError::Invalid {
                field: "guest_cid",
                reason: format!("{} is reserved (must be at least 3)", self.guest_cid),
            });
        }
        let mut m = Map::new();
        m.insert("guest_cid".into(), self.guest_cid.into());
        m.insert(
            "uds_path".into(),
            socket_path_str("uds_path", &self.uds_path, VSOCK_PORT_SUFFIX_LEN_MAX)?.into(),
        );
        put("/vsock", m)
    }
}

/// MMDS protocol version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MmdsVersion {
    V1,
    /// Session tokens (`PUT /latest/api/token`) required.
    V2,
}

/// `PUT /mmds/config`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MmdsConfig {
    pub version: MmdsVersion,
    pub network_interfaces: Vec<String>,
    /// Link-local address the guest reaches MMDS at (Firecracker's default 169.254.169.254).
    pub ipv4_address: Option<Ipv4Addr>,
}

impl ToApiRequest for MmdsConfig {
    fn to_api_request(&self) -> Result<ApiRequest, RequestError> {
        if self.network_interfaces.is_empty() {
            return Err(RequestError::Invalid {
                field: "network_interfaces",
                reason: "empty".to_owned(),
            });
        }
        for i in &self.network_interfaces {
            check_id("iface id", i)?;
        }
        let mut m = Map::new();
        let version = match self.version {
            MmdsVersion::V1 => "V1",
            MmdsVersion::V2 => "V2",
        };
        m.insert("version".into(), version.into());
        m.insert(
            "network_interfaces".into(),
            Value::Array(
                self.network_interfaces
                    .iter()
                    .map(|s| s.clone().into())
                    .collect(),
            ),
        );
        if let Some(a) = self.ipv4_address {
            let o = a.octets();
            // Firecracker's rule: 169.254.[1-254].[0-255].
            if o[0] != 169 || o[1] != 254 || o[2] == 0 || o[2] == 255 {
                return Err(RequestError::Invalid {
                    field: "ipv4_address",
                    reason: format!("{a} is not in 169.254.1.0-169.254.254.255"),
                });
            }
            m.insert("ipv4_address".into(), a.to_string().into());
        }
        put("/mmds/config", m)
    }
}

/// `PUT /mmds`: replaces the whole metadata store with a JSON object.
#[derive(Clone, Debug, PartialEq)]
pub struct MmdsData(pub Value);

impl ToApiRequest for MmdsData {
    fn to_api_request(&self) -> Result<ApiRequest, RequestError> {
        if !self.0.is_object() {
            return Err(RequestError::Invalid {
                field: "mmds",
                reason: "the metadata store must be a JSON object".to_owned(),
            });
        }
        build(
            Method::Put,
            "/mmds".to_owned(),
            self.0.clone(),
            API_TIMEOUT_DEFAULT,
        )
    }
}

/// `PUT /actions`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    InstanceStart,
    /// Asks the guest to shut down (x86: keyboard controller reset).
    SendCtrlAltDel,
    FlushMetrics,
}

impl ToApiRequest for Action {
    fn to_api_request(&self) -> Result<ApiRequest, RequestError> {
        let t = match self {
            Action::InstanceStart => "InstanceStart",
            Action::SendCtrlAltDel => "SendCtrlAltDel",
            Action::FlushMetrics => "FlushMetrics",
        };
        let mut m = Map::new();
        m.insert("action_type".into(), t.into());
        put("/actions", m)
    }
}

/// `PATCH /vm`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmState {
    Paused,
    Resumed,
}

impl ToApiRequest for VmState {
    fn to_api_request(&self) -> Result<ApiRequest, RequestError> {
        let s = match self {
            VmState::Paused => "Paused",
            VmState::Resumed => "Resumed",
        };
        let mut m = Map::new();
        m.insert("state".into(), s.into());
        build(
            Method::Patch,
            "/vm".to_owned(),
            Value::Object(m),
            API_TIMEOUT_DEFAULT,
        )
    }
}

/// Kind of snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SnapshotType {
    /// All guest memory.
    Full,
    /// Only pages dirtied since the last snapshot (needs dirty page tracking).
    Diff,
}

/// `PUT /snapshot/create` (the VM must be paused).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotCreate {
    pub snapshot_type: SnapshotType,
    pub snapshot_path: PathBuf,
    pub mem_file_path: PathBuf,
}

impl ToApiRequest for SnapshotCreate {
    fn to_api_request(&self) -> Result<ApiRequest, RequestError> {
        let mut m = Map::new();
        let t = match self.snapshot_type {
            SnapshotType::Full => "Full",
            SnapshotType::Diff => "Diff",
        };
        m.insert("snapshot_type".into(), t.into());
        m.insert(
            "snapshot_path".into(),
            path_str("snapshot_path", &self.snapshot_path)?.into(),
        );
        m.insert(
            "mem_file_path".into(),
            path_str("mem_file_path", &self.mem_file_path)?.into(),
        );
        build(
            Method::Put,
            "/snapshot/create".to_owned(),
            Value::Object(m),
            API_TIMEOUT_SNAPSHOT_CREATE,
        )
    }
}

/// Where a restored VM's memory comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MemBackend {
    /// Firecracker maps this memory file privately.
    File(PathBuf),
    /// A page server listening on this Unix socket serves faults (wrenn-uffd).
    Uffd(PathBuf),
}

/// A tap to use instead of the one recorded in the snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetworkOverride {
    pub iface_id: String,
    pub host_dev_name: String,
}

/// `PUT /snapshot/load` (only on a Firecracker that has not been configured).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotLoad {
    pub snapshot_path: PathBuf,
    pub mem_backend: MemBackend,
    /// Track dirty pages from the start, so the next snapshot can be a Diff.
    pub track_dirty_pages: bool,
    /// Resume the VM once loaded (else it stays paused).
    pub resume_vm: bool,
    pub network_overrides: Vec<NetworkOverride>,
    /// A vsock socket path to use instead of the one recorded in the snapshot.
    pub vsock_override: Option<PathBuf>,
    /// Advance kvmclock by the wall time elapsed since the snapshot (x86).
    pub clock_realtime: bool,
}

impl SnapshotLoad {
    pub fn new(snapshot_path: impl Into<PathBuf>, mem_backend: MemBackend) -> SnapshotLoad {
        SnapshotLoad {
            snapshot_path: snapshot_path.into(),
            mem_backend,
            track_dirty_pages: false,
            resume_vm: false,
            network_overrides: Vec::new(),
            vsock_override: None,
            clock_realtime: false,
        }
    }
}

impl ToApiRequest for SnapshotLoad {
    fn to_api_request(&self) -> Result<ApiRequest, RequestError> {
        let mut m = Map::new();
        m.insert(
            "snapshot_path".into(),
            path_str("snapshot_path", &self.snapshot_path)?.into(),
        );
        let (kind, path) = match &self.mem_backend {
            MemBackend::File(p) => ("File", path_str("backend_path", p)?),
            MemBackend::Uffd(p) => ("Uffd", socket_path_str("backend_path", p, 0)?),
        };
        let mut b = Map::new();
        b.insert("backend_type".into(), kind.into());
        b.insert("backend_path".into(), path.into());
        m.insert("mem_backend".into(), Value::Object(b));
        m.insert("track_dirty_pages".into(), self.track_dirty_pages.into());
        m.insert("resume_vm".into(), self.resume_vm.into());
        if !self.network_overrides.is_empty() {
            let mut list = Vec::with_capacity(self.network_overrides.len());
            for o in &self.network_overrides {
                check_id("iface id", &o.iface_id)?;
                check_ifname("host_dev_name", &o.host_dev_name)?;
                let mut e = Map::new();
                e.insert("iface_id".into(), o.iface_id.clone().into());
                e.insert("host_dev_name".into(), o.host_dev_name.clone().into());
                list.push(Value::Object(e));
            }
            m.insert("network_overrides".into(), Value::Array(list));
        }
        if let Some(p) = &self.vsock_override {
            let mut e = Map::new();
            e.insert(
                "uds_path".into(),
                socket_path_str("vsock_override", p, VSOCK_PORT_SUFFIX_LEN_MAX)?.into(),
            );
            m.insert("vsock_override".into(), Value::Object(e));
        }
        if self.clock_realtime {
            m.insert("clock_realtime".into(), true.into());
        }
        build(
            Method::Put,
            "/snapshot/load".to_owned(),
            Value::Object(m),
            API_TIMEOUT_SNAPSHOT_LOAD,
        )
    }
}

/// Firecracker's log level.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogLevel {
    Error,
    Warning,
    Info,
    Debug,
    Trace,
    Off,
}

/// `PUT /logger`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Logger {
    /// A file or named pipe Firecracker appends to.
    pub log_path: PathBuf,
    pub level: LogLevel,
    pub show_level: bool,
    pub show_log_origin: bool,
}

impl ToApiRequest for Logger {
    fn to_api_request(&self) -> Result<ApiRequest, RequestError> {
        let level = match self.level {
            LogLevel::Error => "Error",
            LogLevel::Warning => "Warning",
            LogLevel::Info => "Info",
            LogLevel::Debug => "Debug",
            LogLevel::Trace => "Trace",
            LogLevel::Off => "Off",
        };
        let mut m = Map::new();
        m.insert(
            "log_path".into(),
            path_str("log_path", &self.log_path)?.into(),
        );
        m.insert("level".into(), level.into());
        m.insert("show_level".into(), self.show_level.into());
        m.insert("show_log_origin".into(), self.show_log_origin.into());
        put("/logger", m)
    }
}

/// `PUT /metrics`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Metrics {
    /// A file or named pipe Firecracker writes JSON metrics lines to.
    pub metrics_path: PathBuf,
}

impl ToApiRequest for Metrics {
    fn to_api_request(&self) -> Result<ApiRequest, RequestError> {
        let mut m = Map::new();
        m.insert(
            "metrics_path".into(),
            path_str("metrics_path", &self.metrics_path)?.into(),
        );
        put("/metrics", m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(r: &impl ToApiRequest) -> String {
        String::from_utf8(r.to_api_request().unwrap().body.unwrap()).unwrap()
    }

    #[test]
    fn boot_args_have_kvm_clock_and_console_off() {
        let b = BootSource::new("/k").arg("ip=1.2.3.4::1.2.3.5:255.255.255.252::eth0:off");
        let args = b.boot_args().unwrap();
        assert!(args.contains("clocksource=kvm-clock"));
        assert!(args.contains(BOOT_ARGS_CONSOLE_OFF));
        assert!(!args.contains("console=ttyS0"));
        assert!(args.ends_with("eth0:off"));
        let mut b = b;
        b.console = true;
        assert!(b.boot_args().unwrap().contains("console=ttyS0"));
        assert_eq!(
            body(&b),
            format!(
                r#"{{"boot_args":"{}","kernel_image_path":"/k"}}"#,
                b.boot_args().unwrap()
            )
        );
    }

    #[test]
    fn boot_args_refused() {
        let mut b = BootSource::new("/k");
        b.extra_args.push("a\nb".to_owned());
        assert!(b.boot_args().is_err());
        let b = BootSource::new("/k").arg(&"x".repeat(BOOT_ARGS_LEN_MAX));
        assert!(b.to_api_request().is_err());
    }

    #[test]
    fn ids_checked() {
        let mut d = Drive::root("rootfs", "/d");
        assert_eq!(d.to_api_request().unwrap().path, "/drives/rootfs");
        for bad in ["", "a/b", "a b", "../x", &"a".repeat(65)] {
            d.drive_id = bad.to_owned();
            assert!(matches!(
                d.to_api_request(),
                Err(RequestError::InvalidId { .. })
            ));
        }
    }

    #[test]
    fn machine_config_vcpus() {
        assert!(MachineConfig::new(1, 128).to_api_request().is_ok());
        assert!(MachineConfig::new(2, 128).to_api_request().is_ok());
        assert!(MachineConfig::new(3, 128).to_api_request().is_err());
        assert!(MachineConfig::new(0, 128).to_api_request().is_err());
        assert!(MachineConfig::new(34, 128).to_api_request().is_err());
        assert!(MachineConfig::new(1, 0).to_api_request().is_err());
        assert_eq!(
            body(&MachineConfig::new(1, 256)),
            r#"{"mem_size_mib":256,"vcpu_count":1}"#
        );
    }

    #[test]
    fn snapshot_load_body() {
        let mut l = SnapshotLoad::new("/s/state", MemBackend::Uffd("/s/uffd.sock".into()));
        l.resume_vm = true;
        l.clock_realtime = true;
        l.vsock_override = Some("/s/v.sock".into());
        l.network_overrides.push(NetworkOverride {
            iface_id: "eth0".into(),
            host_dev_name: "tap0".into(),
        });
        let r = l.to_api_request().unwrap();
        assert_eq!(r.timeout, API_TIMEOUT_SNAPSHOT_LOAD);
        let v: Value = serde_json::from_slice(r.body.as_ref().unwrap()).unwrap();
        assert_eq!(v["mem_backend"]["backend_type"], "Uffd");
        assert_eq!(v["network_overrides"][0]["host_dev_name"], "tap0");
        assert_eq!(v["vsock_override"]["uds_path"], "/s/v.sock");
        assert_eq!(v["clock_realtime"], true);
        l.vsock_override = Some(PathBuf::from(format!("/{}", "v".repeat(100))));
        assert!(l.to_api_request().is_err());
    }

    #[test]
    fn non_utf8_path_refused() {
        use std::os::unix::ffi::OsStrExt;
        let p = PathBuf::from(std::ffi::OsStr::from_bytes(b"/a\xff"));
        let m = Metrics { metrics_path: p };
        assert!(matches!(
            m.to_api_request(),
            Err(RequestError::NonUtf8Path { .. })
        ));
    }

    #[test]
    fn mmds_checks() {
        assert!(MmdsData(Value::Array(vec![])).to_api_request().is_err());
        let big = Value::String("x".repeat(API_REQUEST_BODY_LEN_MAX));
        let mut o = Map::new();
        o.insert("k".into(), big);
        assert!(matches!(
            MmdsData(Value::Object(o)).to_api_request(),
            Err(RequestError::BodyTooLarge { .. })
        ));
        let c = MmdsConfig {
            version: MmdsVersion::V2,
            network_interfaces: vec!["eth0".into()],
            ipv4_address: Some(Ipv4Addr::new(10, 0, 0, 1)),
        };
        assert!(c.to_api_request().is_err());
    }

    #[test]
    fn mac_format() {
        assert_eq!(format_mac(&[6, 0, 0xac, 0x10, 0, 2]), "06:00:ac:10:00:02");
    }
}
