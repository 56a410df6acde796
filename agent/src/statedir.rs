//! The agent's state on disk, under the state root (default `/var/lib/wrenn`):
//!
//! ```text
//! <root>/agent/identity.conf          host id and tokens from registration (0600)
//! <root>/kernels/vmlinux-<version>    guest kernels
//! <root>/templates/<uuid>/            rootfs.ext4, template.conf, snapshot/ (never modified)
//! <root>/sandboxes/<uuid>/            sandbox.conf, rootfs.ext4, api.sock, vsock.sock,
//!                                     snapshot/ (header, vmstate, <build id>.layer),
//!                                     firecracker.log, firecracker.state
//! ```
//! Records are small `key=value` text files written atomically (temp file, fsync, rename,
//! fsync of the directory), so a crash leaves either the old or the new record. Keys and
//! values are percent-escaped (`%`, `=`, control bytes), so any string round-trips. The
//! first line names the format and its version; unknown keys are refused, so a record written
//! by a newer agent is never half-understood. A sandbox record keeps the sandbox's
//! `wrenn.sandbox.v1.SandboxSpec` as one field (`spec`, its protobuf encoding in base64), so
//! a new spec field needs no change here; version 1 records (one key per spec field) are
//! still read.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use proto::id::Uuid;

use crate::limits::{STATE_FILE_LEN_MAX, STATE_FILE_LINES_MAX};
use crate::state::State;

/// Errors reading or writing state files.
#[derive(Debug)]
pub enum Error {
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    /// A record that does not parse; `line` is 1-based (0: the file as a whole).
    Malformed {
        path: PathBuf,
        line: usize,
        reason: String,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io { action, path, .. } => write!(f, "{action} {}", path.display()),
            Error::Malformed { path, line, reason } => {
                write!(f, "malformed {} line {line}: {reason}", path.display())
            }
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io { source, .. } => Some(source),
            Error::Malformed { .. } => None,
        }
    }
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> Error + 'a {
    move |source| Error::Io {
        action,
        path: path.to_owned(),
        source,
    }
}

// ---- layout ----

/// The paths under the state root.
#[derive(Clone, Debug)]
pub struct Layout {
    pub root: PathBuf,
}

impl Layout {
    pub fn new(root: impl Into<PathBuf>) -> Layout {
        Layout { root: root.into() }
    }
    pub fn sandboxes(&self) -> PathBuf {
        self.root.join("sandboxes")
    }
    pub fn templates(&self) -> PathBuf {
        self.root.join("templates")
    }
    pub fn kernels(&self) -> PathBuf {
        self.root.join("kernels")
    }
    pub fn identity(&self) -> PathBuf {
        self.root.join("agent").join("identity.conf")
    }
    /// The host key made at registration (PKCS#8 PEM, mode 0600; it never leaves the host).
    pub fn host_key(&self) -> PathBuf {
        self.root.join("agent").join("host.key")
    }
    /// The host certificate ctl issued (PEM).
    pub fn host_cert(&self) -> PathBuf {
        self.root.join("agent").join("host.pem")
    }
    /// ctl's CA certificate as registration returned it, checked against the token's pin.
    pub fn ctl_ca(&self) -> PathBuf {
        self.root.join("agent").join("ctl-ca.pem")
    }
    pub fn sandbox(&self, id: Uuid) -> SandboxDir {
        SandboxDir(self.sandboxes().join(id.hyphenated().to_string()))
    }
    pub fn template(&self, id: Uuid) -> TemplateDir {
        TemplateDir(self.templates().join(id.hyphenated().to_string()))
    }
    pub fn kernel(&self, version: &str) -> PathBuf {
        self.kernels().join(format!("vmlinux-{version}"))
    }

    /// Creates the top-level directories (mode 0700: records hold tokens). `sandboxes`,
    /// `templates` and `agent` are made 0700 even when something else created them first:
    /// their files (disks, memory layers, tokens) must not be reachable by any other uid, a
    /// jailed Firecracker's included, whatever their own modes. The root keeps its mode (a
    /// `wrenn up` state directory may live inside it).
    pub fn create(&self) -> Result<(), Error> {
        use std::os::unix::fs::PermissionsExt;
        mkdir_private(&self.root)?;
        for d in [self.sandboxes(), self.templates(), self.root.join("agent")] {
            mkdir_private(&d)?;
            let mode = fs::metadata(&d)
                .map_err(io_err("stat", &d))?
                .permissions()
                .mode();
            if mode & 0o077 != 0 {
                fs::set_permissions(&d, fs::Permissions::from_mode(0o700))
                    .map_err(io_err("make private", &d))?;
            }
        }
        Ok(())
    }

    /// UUIDs of the directories under `sandboxes/` (or `templates/`); other names are
    /// returned separately so the caller can report them.
    pub fn list_dirs(dir: &Path) -> Result<(Vec<Uuid>, Vec<String>), Error> {
        let mut ids = Vec::new();
        let mut other = Vec::new();
        let rd = match fs::read_dir(dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((ids, other)),
            Err(e) => return Err(io_err("list", dir)(e)),
        };
        for ent in rd {
            let ent = ent.map_err(io_err("list", dir))?;
            let name = ent.file_name().to_string_lossy().into_owned();
            match proto::id::parse_uuid_strict(&name) {
                Some(u) => ids.push(u),
                None => other.push(name),
            }
        }
        ids.sort();
        Ok((ids, other))
    }
}

fn mkdir_private(d: &Path) -> Result<(), Error> {
    use std::os::unix::fs::DirBuilderExt;
    match fs::DirBuilder::new().mode(0o700).recursive(true).create(d) {
        Ok(()) => Ok(()),
        Err(e) => Err(io_err("create directory", d)(e)),
    }
}

/// One sandbox's directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SandboxDir(pub PathBuf);

impl SandboxDir {
    pub fn path(&self) -> &Path {
        &self.0
    }
    pub fn record(&self) -> PathBuf {
        self.0.join("sandbox.conf")
    }
    pub fn disk(&self) -> PathBuf {
        self.0.join("rootfs.ext4")
    }
    pub fn api_socket(&self) -> PathBuf {
        self.0.join("api.sock")
    }
    pub fn vsock_socket(&self) -> PathBuf {
        self.0.join("vsock.sock")
    }
    pub fn uffd_socket(&self) -> PathBuf {
        self.0.join("uffd.sock")
    }
    pub fn snapshot(&self) -> PathBuf {
        self.0.join("snapshot")
    }
    pub fn log(&self) -> PathBuf {
        self.0.join("firecracker.log")
    }
    pub fn create(&self) -> Result<(), Error> {
        mkdir_private(&self.0)?;
        mkdir_private(&self.snapshot())
    }
    /// Removes the directory and everything in it; a missing directory is fine.
    pub fn remove(&self) -> Result<(), Error> {
        match fs::remove_dir_all(&self.0) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("remove", &self.0)(e)),
        }
    }
}

/// One template's directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TemplateDir(pub PathBuf);

impl TemplateDir {
    pub fn path(&self) -> &Path {
        &self.0
    }
    pub fn record(&self) -> PathBuf {
        self.0.join("template.conf")
    }
    pub fn rootfs(&self) -> PathBuf {
        self.0.join("rootfs.ext4")
    }
    pub fn snapshot(&self) -> PathBuf {
        self.0.join("snapshot")
    }
    /// The snapshot template's memory file for the File backend (see
    /// `manager::write_template_memory`); absent for base templates and for templates
    /// published while the agent restored through wrenn-uffd.
    pub fn memory(&self) -> PathBuf {
        self.0.join("memory")
    }
}

// ---- records ----

/// A process the agent started, identified by pid and its start time (field 22 of
/// /proc/<pid>/stat, clock ticks since boot), so a reused pid is never mistaken for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcRef {
    pub pid: i32,
    pub start_ticks: u64,
}

/// Where a sandbox's memory snapshot lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chain {
    /// The merged header of the latest generation.
    pub header: PathBuf,
    /// Firecracker's VM state file of the latest snapshot.
    pub vmstate: PathBuf,
    /// Directories holding layer files (`<build id>.layer`), searched in order: the
    /// sandbox's own, then the template's shared, read-only ones.
    pub layer_dirs: Vec<PathBuf>,
    /// Generation of `header`.
    pub generation: u64,
}

pub use proto::sandbox::{SandboxSpec, TemplateKind, TimeoutPolicy};

/// Everything the agent keeps about one sandbox: its spec as ctl sent it (with the defaults
/// filled in, and the timeout as last set) and what the agent made of it.
#[derive(Clone, Debug, PartialEq)]
pub struct SandboxRecord {
    /// `spec.sandbox_id`, parsed.
    pub id: Uuid,
    /// `spec.template_id`, parsed.
    pub template_id: Uuid,
    /// The sandbox as asked for (`wrenn.sandbox.v1.SandboxSpec`): owner, template, size,
    /// timeout and policy, env, metadata, default user and directory.
    pub spec: SandboxSpec,
    pub state: State,
    pub state_reason: String,
    pub created_unix_ns: i64,
    pub updated_unix_ns: i64,
    /// 0 when no timeout runs (not running).
    pub expires_unix_ns: i64,
    /// envd's current access token (a secret: the file is 0600).
    pub access_token: String,
    pub envd_version: String,
    pub kernel_version: String,
    /// Network slot held while a VM exists.
    pub slot: Option<u32>,
    /// The uid and gid its jailed Firecracker runs as, held with the slot (`uid_pool`).
    pub jail_uid: Option<u32>,
    pub firecracker: Option<ProcRef>,
    pub page_server: Option<ProcRef>,
    /// The memory snapshot, once the sandbox was paused (or restored from a template).
    pub chain: Option<Chain>,
    /// A cold-booted sandbox takes a Full snapshot the first time; afterwards (and for a
    /// sandbox restored from a template, whose dirty pages Firecracker tracks) a Diff.
    pub full_snapshot_taken: bool,
}

/// The first line of a sandbox record: version 2 keeps the spec as one field (its protobuf
/// encoding in base64), so a new spec field needs no change here.
const SANDBOX_MAGIC: &str = "wrenn-sandbox 2";
/// Version 1 (agents before the shared spec) wrote each spec field as its own key; it is
/// still read, so an upgraded agent re-adopts the VMs of the old one.
const SANDBOX_MAGIC_V1: &str = "wrenn-sandbox 1";

impl SandboxRecord {
    /// A fresh record in state `pending`, with the default spec of a sandbox of `template_id`
    /// (1 vCPU, 512 MiB, the default timeout, DESTROY at expiry).
    pub fn new(id: Uuid, template_id: Uuid, kind: TemplateKind, now_unix_ns: i64) -> Self {
        SandboxRecord {
            id,
            template_id,
            spec: SandboxSpec {
                sandbox_id: proto::id::format(proto::id::Kind::Sandbox, id),
                template_id: proto::id::format(proto::id::Kind::Template, template_id),
                template_kind: kind as i32,
                vcpus: 1,
                memory_mib: 512,
                timeout_s: crate::limits::TIMEOUT_DEFAULT.as_secs(),
                on_timeout: TimeoutPolicy::Destroy as i32,
                ..SandboxSpec::default()
            },
            state: State::Pending,
            state_reason: String::new(),
            created_unix_ns: now_unix_ns,
            updated_unix_ns: now_unix_ns,
            expires_unix_ns: 0,
            access_token: String::new(),
            envd_version: String::new(),
            kernel_version: String::new(),
            slot: None,
            jail_uid: None,
            firecracker: None,
            page_server: None,
            chain: None,
            full_snapshot_taken: false,
        }
    }

    /// The template's kind (UNSPECIFIED is refused at create, so never stored).
    pub fn template_kind(&self) -> TemplateKind {
        self.spec.template_kind()
    }

    /// What happens at expiry (UNSPECIFIED reads as DESTROY, as the protocol says).
    pub fn on_timeout(&self) -> TimeoutPolicy {
        match self.spec.on_timeout() {
            TimeoutPolicy::Pause => TimeoutPolicy::Pause,
            _ => TimeoutPolicy::Destroy,
        }
    }

    pub fn encode(&self) -> String {
        let mut w = Writer::new(SANDBOX_MAGIC);
        w.put(
            "spec",
            &proto::base64::encode(&prost::Message::encode_to_vec(&self.spec)),
        );
        w.put("state", self.state.name());
        w.put("state_reason", &self.state_reason);
        w.put("created_unix_ns", &self.created_unix_ns.to_string());
        w.put("updated_unix_ns", &self.updated_unix_ns.to_string());
        w.put("expires_unix_ns", &self.expires_unix_ns.to_string());
        w.put("access_token", &self.access_token);
        w.put("envd_version", &self.envd_version);
        w.put("kernel_version", &self.kernel_version);
        if let Some(s) = self.slot {
            w.put("slot", &s.to_string());
        }
        if let Some(u) = self.jail_uid {
            w.put("jail_uid", &u.to_string());
        }
        w.proc("firecracker", self.firecracker);
        w.proc("page_server", self.page_server);
        if let Some(c) = &self.chain {
            w.put("chain.header", &path_str(&c.header));
            w.put("chain.vmstate", &path_str(&c.vmstate));
            w.put("chain.generation", &c.generation.to_string());
            for (i, d) in c.layer_dirs.iter().enumerate() {
                w.put(&format!("chain.layer_dir.{i}"), &path_str(d));
            }
        }
        w.put(
            "full_snapshot_taken",
            if self.full_snapshot_taken { "1" } else { "0" },
        );
        w.finish()
    }

    pub fn decode(path: &Path, text: &str) -> Result<SandboxRecord, Error> {
        let (mut r, magic) = Reader::parse(path, text, &[SANDBOX_MAGIC, SANDBOX_MAGIC_V1])?;
        let (spec, id, template_id) = if magic == SANDBOX_MAGIC_V1 {
            r.spec_v1()?
        } else {
            let spec = r.with("spec", |s| {
                let bytes = proto::base64::decode(s)?;
                <SandboxSpec as prost::Message>::decode(bytes.as_slice()).ok()
            })?;
            let id = r.wire_id(proto::id::Kind::Sandbox, &spec.sandbox_id)?;
            let template_id = r.wire_id(proto::id::Kind::Template, &spec.template_id)?;
            (spec, id, template_id)
        };
        let created = r.num("created_unix_ns")?;
        let mut rec = SandboxRecord::new(id, template_id, spec.template_kind(), created);
        rec.spec = spec;
        rec.state = r.with("state", State::from_name)?;
        rec.state_reason = r.string("state_reason")?;
        rec.updated_unix_ns = r.num("updated_unix_ns")?;
        rec.expires_unix_ns = r.num("expires_unix_ns")?;
        rec.access_token = r.string("access_token")?;
        rec.envd_version = r.string("envd_version")?;
        rec.kernel_version = r.string("kernel_version")?;
        rec.slot = r.opt_num("slot")?;
        rec.jail_uid = r.opt_num("jail_uid")?;
        rec.firecracker = r.proc("firecracker")?;
        rec.page_server = r.proc("page_server")?;
        rec.chain = match r.take("chain.header") {
            None => None,
            Some(h) => {
                let vmstate = PathBuf::from(r.string("chain.vmstate")?);
                let generation = r.num("chain.generation")?;
                let mut layer_dirs = Vec::new();
                while let Some(d) = r.take(&format!("chain.layer_dir.{}", layer_dirs.len())) {
                    layer_dirs.push(PathBuf::from(d));
                }
                Some(Chain {
                    header: PathBuf::from(h),
                    vmstate,
                    layer_dirs,
                    generation,
                })
            }
        };
        rec.full_snapshot_taken = r.with("full_snapshot_taken", |s| match s {
            "0" => Some(false),
            "1" => Some(true),
            _ => None,
        })?;
        r.done()?;
        Ok(rec)
    }

    pub fn save(&self, dir: &SandboxDir) -> Result<(), Error> {
        write_atomic(&dir.record(), self.encode().as_bytes())
    }

    pub fn load(dir: &SandboxDir) -> Result<SandboxRecord, Error> {
        let p = dir.record();
        let text = read_bounded(&p)?;
        SandboxRecord::decode(&p, &text)
    }
}

/// What the agent keeps about a template it holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TemplateRecord {
    pub id: Uuid,
    pub kind: TemplateKind,
    /// Wire id of the sandbox a snapshot template was made from ("" for base).
    pub source_sandbox_id: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub disk_mib: u64,
    pub kernel_version: String,
    /// envd's access token inside the snapshot: a restore authenticates with it before
    /// setting a fresh one (secret: the file is 0600).
    pub access_token: String,
    pub working_set_pages: u64,
    pub created_unix_ns: i64,
    /// Generation of the template's header.
    pub generation: u64,
}

impl TemplateRecord {
    pub fn encode(&self) -> String {
        let mut w = Writer::new("wrenn-template 1");
        w.put("id", &self.id.hyphenated().to_string());
        w.put("kind", self.kind.name());
        w.put("source_sandbox_id", &self.source_sandbox_id);
        w.put("vcpus", &self.vcpus.to_string());
        w.put("memory_mib", &self.memory_mib.to_string());
        w.put("disk_mib", &self.disk_mib.to_string());
        w.put("kernel_version", &self.kernel_version);
        w.put("access_token", &self.access_token);
        w.put("working_set_pages", &self.working_set_pages.to_string());
        w.put("created_unix_ns", &self.created_unix_ns.to_string());
        w.put("generation", &self.generation.to_string());
        w.finish()
    }

    pub fn decode(path: &Path, text: &str) -> Result<TemplateRecord, Error> {
        let (mut r, _) = Reader::parse(path, text, &["wrenn-template 1"])?;
        let t = TemplateRecord {
            id: r.uuid("id")?,
            kind: r.with("kind", TemplateKind::from_name)?,
            source_sandbox_id: r.string("source_sandbox_id")?,
            vcpus: r.num("vcpus")?,
            memory_mib: r.num("memory_mib")?,
            disk_mib: r.num("disk_mib")?,
            kernel_version: r.string("kernel_version")?,
            access_token: r.string("access_token")?,
            working_set_pages: r.num("working_set_pages")?,
            created_unix_ns: r.num("created_unix_ns")?,
            generation: r.num("generation")?,
        };
        r.done()?;
        Ok(t)
    }

    pub fn save(&self, dir: &TemplateDir) -> Result<(), Error> {
        write_atomic(&dir.record(), self.encode().as_bytes())
    }

    pub fn load(dir: &TemplateDir) -> Result<TemplateRecord, Error> {
        let p = dir.record();
        let text = read_bounded(&p)?;
        TemplateRecord::decode(&p, &text)
    }
}

/// The host's identity from registration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub host_id: Uuid,
    pub host_token: String,
    pub agent_token: String,
}

impl Identity {
    pub fn encode(&self) -> String {
        let mut w = Writer::new("wrenn-identity 1");
        w.put("host_id", &self.host_id.hyphenated().to_string());
        w.put("host_token", &self.host_token);
        w.put("agent_token", &self.agent_token);
        w.finish()
    }

    pub fn decode(path: &Path, text: &str) -> Result<Identity, Error> {
        let (mut r, _) = Reader::parse(path, text, &["wrenn-identity 1"])?;
        let id = Identity {
            host_id: r.uuid("host_id")?,
            host_token: r.string("host_token")?,
            agent_token: r.string("agent_token")?,
        };
        r.done()?;
        Ok(id)
    }

    /// Reads the identity; `None` when the host has not registered yet.
    pub fn load(path: &Path) -> Result<Option<Identity>, Error> {
        match fs::metadata(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            _ => {}
        }
        let text = read_bounded(path)?;
        Identity::decode(path, &text).map(Some)
    }

    pub fn save(&self, path: &Path) -> Result<(), Error> {
        if let Some(parent) = path.parent() {
            mkdir_private(parent)?;
        }
        write_atomic(path, self.encode().as_bytes())
    }
}

// ---- the key=value format ----

fn path_str(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

use proto::kv::KvError;

/// Records are written with [`proto::kv::Writer`]; processes as `<name>.pid` and
/// `<name>.start_ticks`.
struct Writer(proto::kv::Writer);

impl Writer {
    fn new(magic: &str) -> Writer {
        Writer(proto::kv::Writer::new(magic))
    }
    fn put(&mut self, k: &str, v: &str) {
        self.0.put(k, v);
    }
    fn proc(&mut self, name: &str, p: Option<ProcRef>) {
        if let Some(p) = p {
            self.0.put_display(&format!("{name}.pid"), p.pid);
            self.0
                .put_display(&format!("{name}.start_ticks"), p.start_ticks);
        }
    }
    fn finish(self) -> String {
        self.0.finish()
    }
}

/// A [`proto::kv::Reader`] whose errors name the file.
struct Reader<'a> {
    path: &'a Path,
    kv: proto::kv::Reader,
}

impl<'a> Reader<'a> {
    fn parse<'m>(
        path: &'a Path,
        text: &str,
        magics: &[&'m str],
    ) -> Result<(Reader<'a>, &'m str), Error> {
        let (kv, magic) = proto::kv::Reader::parse(text, magics, STATE_FILE_LINES_MAX)
            .map_err(|e| malformed(path, e))?;
        Ok((Reader { path, kv }, magic))
    }

    /// A wire id of the spec, parsed strictly.
    fn wire_id(&self, kind: proto::id::Kind, s: &str) -> Result<Uuid, Error> {
        proto::id::parse(kind, s).map_err(|e| {
            self.err(KvError {
                line: 0,
                reason: format!("spec: bad {}: {e}", kind.noun()),
            })
        })
    }

    /// The spec of a version 1 record, one key per field; with the sandbox and template ids.
    fn spec_v1(&mut self) -> Result<(SandboxSpec, Uuid, Uuid), Error> {
        use proto::id::{format, Kind};
        let id = self.uuid("id")?;
        let template_id = self.uuid("template_id")?;
        let spec = SandboxSpec {
            sandbox_id: format(Kind::Sandbox, id),
            team_id: self.string("team_id")?,
            template_id: format(Kind::Template, template_id),
            template_kind: self.with("template_kind", TemplateKind::from_name)? as i32,
            kernel: self.string("kernel")?,
            vcpus: self.num("vcpus")?,
            memory_mib: self.num("memory_mib")?,
            disk_mib: self.num("disk_mib")?,
            timeout_s: self.num("timeout_s")?,
            on_timeout: self.with("policy", TimeoutPolicy::from_name)? as i32,
            env: self.map("env.")?.into_iter().collect(),
            metadata: self.map("metadata.")?.into_iter().collect(),
            default_user: self.string("default_user")?,
            default_cwd: self.string("default_cwd")?,
            network: None,
        };
        Ok((spec, id, template_id))
    }

    fn err(&self, e: KvError) -> Error {
        malformed(self.path, e)
    }

    fn take(&mut self, k: &str) -> Option<String> {
        self.kv.take(k)
    }

    fn string(&mut self, k: &str) -> Result<String, Error> {
        self.kv.string(k).map_err(|e| self.err(e))
    }

    fn with<T>(&mut self, k: &str, f: impl FnOnce(&str) -> Option<T>) -> Result<T, Error> {
        self.kv.with(k, f).map_err(|e| self.err(e))
    }

    fn num<T: std::str::FromStr>(&mut self, k: &str) -> Result<T, Error> {
        self.kv.num(k).map_err(|e| self.err(e))
    }

    fn opt_num<T: std::str::FromStr>(&mut self, k: &str) -> Result<Option<T>, Error> {
        self.kv.opt_num(k).map_err(|e| self.err(e))
    }

    fn uuid(&mut self, k: &str) -> Result<Uuid, Error> {
        self.with(k, proto::id::parse_uuid_strict)
    }

    fn proc(&mut self, name: &str) -> Result<Option<ProcRef>, Error> {
        let pid: Option<i32> = self.opt_num(&format!("{name}.pid"))?;
        let ticks: Option<u64> = self.opt_num(&format!("{name}.start_ticks"))?;
        match (pid, ticks) {
            (None, None) => Ok(None),
            (Some(pid), Some(start_ticks)) if pid > 0 => Ok(Some(ProcRef { pid, start_ticks })),
            _ => Err(self.err(KvError {
                line: 0,
                reason: format!("incomplete or bad {name}.pid/start_ticks"),
            })),
        }
    }

    fn map(&mut self, prefix: &str) -> Result<BTreeMap<String, String>, Error> {
        Ok(self.kv.map(prefix))
    }

    fn done(self) -> Result<(), Error> {
        let path = self.path;
        self.kv.done().map_err(|e| malformed(path, e))
    }
}

fn malformed(path: &Path, e: KvError) -> Error {
    Error::Malformed {
        path: path.to_owned(),
        line: e.line,
        reason: e.reason,
    }
}

// ---- files ----

/// Reads a state file, refusing one over [`STATE_FILE_LEN_MAX`].
pub fn read_bounded(path: &Path) -> Result<String, Error> {
    let f = File::open(path).map_err(io_err("open", path))?;
    let mut buf = String::new();
    f.take(STATE_FILE_LEN_MAX + 1)
        .read_to_string(&mut buf)
        .map_err(io_err("read", path))?;
    if buf.len() as u64 > STATE_FILE_LEN_MAX {
        return Err(Error::Malformed {
            path: path.to_owned(),
            line: 0,
            reason: format!("larger than {STATE_FILE_LEN_MAX} bytes"),
        });
    }
    Ok(buf)
}

/// Writes `bytes` to `path` so that a crash leaves the old or the new content: a temp file
/// in the same directory (mode 0600), fsync, rename, fsync of the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp = dir.join(tmp_name);
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io_err("create", &tmp))?;
    f.write_all(bytes).map_err(io_err("write", &tmp))?;
    f.sync_all().map_err(io_err("fsync", &tmp))?;
    drop(f);
    fs::rename(&tmp, path).map_err(io_err("rename into place", path))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync", dir))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::kv::{escape, unescape};

    fn tmpdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "wrenn-agent-statedir-{name}-{}",
            std::process::id()
        ));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    fn full_record() -> SandboxRecord {
        let id = Uuid::from_u128(0x1234_5678_9abc_def0_1234_5678_9abc_def0);
        let mut r = SandboxRecord::new(id, Uuid::from_u128(7), TemplateKind::Snapshot, 11);
        r.spec.team_id = "team-00000000-0000-0000-0000-000000000001".into();
        r.spec.kernel = "6.1.0".into();
        r.spec.vcpus = 2;
        r.spec.memory_mib = 1024;
        r.spec.disk_mib = 5120;
        r.spec.timeout_s = 60;
        r.spec.on_timeout = TimeoutPolicy::Pause as i32;
        r.spec.env.insert("PATH".into(), "/usr/bin:/bin".into());
        r.spec
            .env
            .insert("WEIRD=KEY%".into(), "line1\nline2\r\t=%41".into());
        r.spec.env.insert("".into(), "".into());
        r.spec.metadata.insert("env.fake".into(), "ü ✓".into());
        r.spec.default_user = "user".into();
        r.spec.default_cwd = "/home/user".into();
        r.state = State::Paused;
        r.state_reason = "paused by ttl".into();
        r.updated_unix_ns = 22;
        r.expires_unix_ns = -1;
        r.access_token = "abc".into();
        r.envd_version = "0.1.0".into();
        r.kernel_version = "6.1.0-wrenn".into();
        r.slot = Some(4095);
        r.jail_uid = Some(900_017);
        r.firecracker = Some(ProcRef {
            pid: 1234,
            start_ticks: 99,
        });
        r.page_server = Some(ProcRef {
            pid: 5,
            start_ticks: u64::MAX,
        });
        r.chain = Some(Chain {
            header: "/x/snapshot/header".into(),
            vmstate: "/x/snapshot/vmstate".into(),
            layer_dirs: vec!["/x/snapshot".into(), "/t/snapshot".into()],
            generation: 3,
        });
        r.full_snapshot_taken = true;
        r
    }

    #[test]
    fn sandbox_record_round_trips_through_a_file() {
        let d = tmpdir("rt");
        let dir = SandboxDir(d.join("sb"));
        dir.create().unwrap();
        for rec in [
            full_record(),
            SandboxRecord::new(Uuid::from_u128(1), Uuid::nil(), TemplateKind::Base, 0),
        ] {
            rec.save(&dir).unwrap();
            assert_eq!(SandboxRecord::load(&dir).unwrap(), rec);
        }
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(dir.record()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "records hold tokens");
        assert!(!d.join("sb/sandbox.conf.tmp").exists());
        fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn top_level_directories_are_private_even_if_made_before() {
        use std::os::unix::fs::PermissionsExt;
        let d = tmpdir("layout");
        // As `wrenn image rootfs` leaves it: templates/ world-readable.
        fs::create_dir_all(d.join("templates/00000000-0000-0000-0000-000000000000")).unwrap();
        fs::set_permissions(d.join("templates"), fs::Permissions::from_mode(0o755)).unwrap();
        fs::set_permissions(&d, fs::Permissions::from_mode(0o755)).unwrap();
        Layout::new(&d).create().unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        for sub in ["templates", "sandboxes", "agent"] {
            assert_eq!(mode(&d.join(sub)), 0o700, "{sub}");
        }
        assert_eq!(mode(&d), 0o755, "the root keeps its mode");
        fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn template_and_identity_round_trip() {
        let d = tmpdir("tpl");
        let t = TemplateRecord {
            id: Uuid::from_u128(9),
            kind: TemplateKind::Snapshot,
            source_sandbox_id: "sb-00000000-0000-0000-0000-000000000001".into(),
            vcpus: 1,
            memory_mib: 256,
            disk_mib: 100,
            kernel_version: "6.1".into(),
            access_token: "tok=en".into(),
            working_set_pages: 17,
            created_unix_ns: 5,
            generation: 2,
        };
        let td = TemplateDir(d.clone());
        t.save(&td).unwrap();
        assert_eq!(TemplateRecord::load(&td).unwrap(), t);

        let p = d.join("agent/identity.conf");
        assert_eq!(Identity::load(&p).unwrap(), None);
        let id = Identity {
            host_id: Uuid::from_u128(3),
            host_token: "h".into(),
            agent_token: "a".into(),
        };
        id.save(&p).unwrap();
        assert_eq!(Identity::load(&p).unwrap(), Some(id));
        fs::remove_dir_all(d).unwrap();
    }

    /// `text` with its `spec=` line replaced by `line` ("" removes it).
    fn replace_spec(text: &str, line: &str) -> String {
        text.lines()
            .map(|l| {
                if l.starts_with("spec=") {
                    line.to_owned()
                } else {
                    format!("{l}\n")
                }
            })
            .collect()
    }

    #[test]
    fn a_version_1_record_still_loads_with_the_same_spec() {
        // What agents before the shared spec wrote for `full_record()`: an upgraded agent
        // re-adopts their VMs.
        let v1 = "wrenn-sandbox 1\n\
            id=12345678-9abc-def0-1234-56789abcdef0\n\
            team_id=team-00000000-0000-0000-0000-000000000001\n\
            template_id=00000000-0000-0000-0000-000000000007\n\
            template_kind=snapshot\n\
            kernel=6.1.0\n\
            vcpus=2\n\
            memory_mib=1024\n\
            disk_mib=5120\n\
            timeout_s=60\n\
            policy=pause\n\
            env.=\n\
            env.PATH=/usr/bin:/bin\n\
            env.WEIRD%3DKEY%25=line1%0Aline2%0D%09%3D%2541\n\
            metadata.env.fake=\u{fc} \u{2713}\n\
            default_user=user\n\
            default_cwd=/home/user\n\
            state=paused\n\
            state_reason=paused by ttl\n\
            created_unix_ns=11\n\
            updated_unix_ns=22\n\
            expires_unix_ns=-1\n\
            access_token=abc\n\
            envd_version=0.1.0\n\
            kernel_version=6.1.0-wrenn\n\
            slot=4095\n\
            jail_uid=900017\n\
            firecracker.pid=1234\n\
            firecracker.start_ticks=99\n\
            page_server.pid=5\n\
            page_server.start_ticks=18446744073709551615\n\
            chain.header=/x/snapshot/header\n\
            chain.vmstate=/x/snapshot/vmstate\n\
            chain.generation=3\n\
            chain.layer_dir.0=/x/snapshot\n\
            chain.layer_dir.1=/t/snapshot\n\
            full_snapshot_taken=1\n";
        let p = Path::new("/x/sandbox.conf");
        let rec = SandboxRecord::decode(p, v1).unwrap();
        assert_eq!(rec, full_record());
        // Saved again, it is a version 2 record.
        assert!(rec.encode().starts_with("wrenn-sandbox 2\n"));
        // A version 1 record with a key of version 2 is refused, not half-read.
        let mixed = v1.replace("state=paused\n", "state=paused\nspec=AAAA\n");
        let err = SandboxRecord::decode(p, &mixed).unwrap_err();
        assert!(err.to_string().contains("unknown key"), "{err}");
    }

    #[test]
    fn malformed_records_are_refused_with_a_reason() {
        let p = Path::new("/x/sandbox.conf");
        let good = full_record().encode();
        let cases: Vec<(String, &str)> = vec![
            (String::new(), "expected"),
            ("wrenn-sandbox 3\n".into(), "expected"),
            (good.trim_end().to_owned(), "truncated"),
            (good.replace("state=paused", "state=sleeping"), "bad value"),
            (
                good.replace("state=paused", "state=unspecified"),
                "bad value",
            ),
            (replace_spec(&good, "spec=!!!\n"), "bad value"),
            (replace_spec(&good, "spec=AAAA\n"), "bad value"),
            (replace_spec(&good, ""), "missing key"),
            (format!("{good}state=running\n"), "duplicate key"),
            (format!("{good}colour=blue\n"), "unknown key"),
            (format!("{good}vcpus=2\n"), "unknown key"),
            (format!("{good}no equals\n"), "no '='"),
            (format!("{good}k=%4\n"), "bad escape"),
            (format!("{good}k=%zz\n"), "bad escape"),
            (format!("{good}k=%FF\n"), "bad escape"),
            (
                good.replace("firecracker.start_ticks=99\n", ""),
                "incomplete",
            ),
            (
                good.replace("firecracker.pid=1234", "firecracker.pid=0"),
                "incomplete",
            ),
            (
                {
                    let mut r = full_record();
                    r.spec.sandbox_id = r.spec.sandbox_id.to_uppercase();
                    r.encode()
                },
                "bad sandbox",
            ),
            (
                {
                    let mut r = full_record();
                    r.spec.template_id = String::new();
                    r.encode()
                },
                "bad template",
            ),
        ];
        for (text, want) in cases {
            let err = SandboxRecord::decode(p, &text).unwrap_err();
            assert!(err.to_string().contains(want), "{want}: {err}");
        }
    }

    #[test]
    fn escaping_round_trips_every_small_string() {
        // A small seeded generator over characters that need escaping and ones that don't.
        let alphabet = [
            'a', '=', '%', '\n', '\r', '\0', '\x7f', 'é', '✓', ' ', '0', 'F',
        ];
        let mut seed: u64 = 0x5eed;
        for _ in 0..2000 {
            let mut s = String::new();
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let len = (seed >> 60) as usize;
            for i in 0..len {
                s.push(alphabet[((seed >> (i * 4)) & 0xf) as usize % alphabet.len()]);
            }
            let e = escape(&s);
            assert!(!e.contains('=') && !e.contains('\n'), "seed {seed}: {e:?}");
            assert_eq!(unescape(&e).as_deref(), Some(s.as_str()), "seed {seed}");
        }
    }

    #[test]
    fn oversized_file_is_refused() {
        let d = tmpdir("big");
        let p = d.join("sandbox.conf");
        fs::write(&p, vec![b'a'; (STATE_FILE_LEN_MAX + 1) as usize]).unwrap();
        assert!(read_bounded(&p).unwrap_err().to_string().contains("larger"));
        fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn list_dirs_separates_uuids_from_strays() {
        let d = tmpdir("list");
        fs::create_dir(d.join("00000000-0000-0000-0000-000000000002")).unwrap();
        fs::create_dir(d.join("00000000-0000-0000-0000-000000000001")).unwrap();
        fs::create_dir(d.join("junk")).unwrap();
        let (ids, other) = Layout::list_dirs(&d).unwrap();
        assert_eq!(ids, vec![Uuid::from_u128(1), Uuid::from_u128(2)]);
        assert_eq!(other, vec!["junk".to_string()]);
        assert_eq!(
            Layout::list_dirs(&d.join("missing")).unwrap(),
            (vec![], vec![])
        );
        fs::remove_dir_all(d).unwrap();
    }
}
