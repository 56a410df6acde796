//! The page server behind `wrenn-uffd`: serves a restored VM's page faults from the layer files
//! of a snapshot header, prefetches a recorded working set, fills the rest in the background,
//! then unregisters the memory and exits.
//!
//! Lifecycle: [`PageServer::bind`] loads the header, maps the layers and creates the socket
//! (so that the launcher can wait for the socket); [`PageServer::run`] accepts Firecracker's
//! connection (checking its pid), takes the handshake and runs the event loop until every page
//! is resident, Firecracker exits, or it is told to stop. On a fatal error it kills Firecracker
//! (a VM whose fault handler died would hang forever) and returns the error.
//!
//! Page states (one byte per 4 KiB page of memory): *missing* (serve from the header),
//! *resident* (installed; the kernel owns it), *removed* (discarded by a REMOVE event; serve
//! zeros). Architecture invariant: a page is installed only from the missing or removed state,
//! and the kernel never overwrites a present page, so a late or duplicate install is harmless
//! (`EEXIST`).

use std::collections::VecDeque;
use std::fmt;
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use log::{debug, error, info, warn};
use memmap2::Mmap;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};

use crate::handshake::{self, Region};
use crate::header::{BuildId, Header};
use crate::limits::{
    AROUND_QUEUE_MAX, AROUND_STEP, BLOCK_SIZE, EVENT_BATCH, FAULT_AROUND_MAX, FILL_CHUNK,
    HANDSHAKE_TIMEOUT_MS, RETRY_QUEUE_MAX, SPIN_MAX_US,
};
use crate::stats::Stats;
use crate::sys::{self, UffdMsg};
use crate::working_set::{OutputFile, WorkingSet};

/// Everything the server needs; `main.rs` builds it from flags (see HEADER.md).
#[derive(Debug)]
pub struct Config {
    /// Unix socket Firecracker connects to (`mem_backend.backend_path`).
    pub socket_path: PathBuf,
    /// Firecracker's pid: the only accepted peer; its exit ends the server.
    pub firecracker_pid: i32,
    /// The snapshot header file.
    pub header_path: PathBuf,
    /// Directories holding the layer files, `<build id>.layer`, searched in order (a sandbox's
    /// own generations and its template's shared layers may live apart).
    pub layer_dirs: Vec<PathBuf>,
    /// Working set to prefetch.
    pub prefetch: Option<PathBuf>,
    /// Where to write the working set recorded in this run.
    pub record: Option<PathBuf>,
    /// Stop recording after this long (also stops when `record_stop_fd` becomes readable).
    pub record_for: Option<Duration>,
    /// Stats file.
    pub stats_path: Option<PathBuf>,
    /// Fault-around window in bytes (0 or 4096: one page per fault).
    pub fault_around: u64,
    /// Fill every page in the background, then unregister and exit.
    pub background_fill: bool,
    /// Busy-poll the userfaultfd this long after the last event before sleeping.
    pub spin: Duration,
    /// Kill Firecracker on a fatal error (tests serving their own process turn it off).
    pub kill_on_fatal: bool,
    /// Owner (uid, gid) given to the socket before it appears: the jailed Firecracker's, so
    /// it can connect once `wrenn-uffd` is no longer root.
    pub socket_owner: Option<(u32, u32)>,
    /// Readable = exit cleanly (main passes a signalfd for SIGTERM/SIGINT).
    pub stop_fd: Option<OwnedFd>,
    /// Readable = stop recording (main passes a signalfd for SIGUSR1).
    pub record_stop_fd: Option<OwnedFd>,
}

impl Config {
    /// A configuration with the defaults of `limits.rs` for the optional parts.
    pub fn new(
        socket_path: PathBuf,
        firecracker_pid: i32,
        header_path: PathBuf,
        layer_dir: PathBuf,
    ) -> Config {
        Config {
            socket_path,
            firecracker_pid,
            header_path,
            layer_dirs: vec![layer_dir],
            prefetch: None,
            record: None,
            record_for: None,
            stats_path: None,
            fault_around: crate::limits::FAULT_AROUND_DEFAULT,
            background_fill: true,
            spin: Duration::from_micros(crate::limits::SPIN_DEFAULT_US),
            kill_on_fatal: true,
            socket_owner: None,
            stop_fd: None,
            record_stop_fd: None,
        }
    }
}

/// Why the server failed.
#[derive(Debug)]
pub enum Error {
    Config {
        what: &'static str,
    },
    ReadHeader {
        path: PathBuf,
        source: std::io::Error,
    },
    Header {
        path: PathBuf,
        source: crate::header::ParseError,
    },
    OpenLayer {
        path: PathBuf,
        source: std::io::Error,
    },
    ShortLayer {
        path: PathBuf,
        size: u64,
        needed: u64,
    },
    ReadWorkingSet {
        path: PathBuf,
        source: std::io::Error,
    },
    WorkingSet {
        path: PathBuf,
        source: crate::working_set::ParseError,
    },
    WorkingSetMismatch {
        path: PathBuf,
    },
    Pidfd {
        pid: i32,
        source: std::io::Error,
    },
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
    Handshake {
        source: handshake::Error,
    },
    Poll {
        source: std::io::Error,
    },
    ReadEvents {
        source: std::io::Error,
    },
    UnexpectedEvent {
        event: u8,
    },
    FaultOutsideRegions {
        address: u64,
    },
    Install {
        address: u64,
        len: u64,
        source: std::io::Error,
    },
    Unregister {
        source: std::io::Error,
    },
    WriteWorkingSet {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The directory of an output file (stats, recorded working set) cannot be opened.
    OpenOutput {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use Error::*;
        match self {
            Config { what } => write!(f, "invalid configuration: {what}"),
            ReadHeader { path, .. } => write!(f, "cannot read header {}", path.display()),
            Header { path, .. } => write!(f, "invalid header {}", path.display()),
            OpenLayer { path, .. } => write!(f, "cannot map layer {}", path.display()),
            ShortLayer { path, size, needed } => {
                write!(
                    f,
                    "layer {} is {size} bytes, header needs {needed}",
                    path.display()
                )
            }
            ReadWorkingSet { path, .. } => write!(f, "cannot read working set {}", path.display()),
            WorkingSet { path, .. } => write!(f, "invalid working set {}", path.display()),
            WorkingSetMismatch { path } => {
                write!(
                    f,
                    "working set {} was recorded for another memory size",
                    path.display()
                )
            }
            Pidfd { pid, .. } => write!(f, "cannot open a pidfd for firecracker pid {pid}"),
            Bind { path, .. } => write!(f, "cannot listen on {}", path.display()),
            Handshake { .. } => write!(f, "firecracker handshake failed"),
            Poll { .. } => write!(f, "cannot poll"),
            ReadEvents { .. } => write!(f, "cannot read userfaultfd events"),
            UnexpectedEvent { event } => write!(f, "unexpected userfaultfd event {event:#x}"),
            FaultOutsideRegions { address } => {
                write!(f, "fault at {address:#x} outside every region")
            }
            Install { address, len, .. } => write!(f, "cannot install {len} bytes at {address:#x}"),
            Unregister { .. } => write!(f, "cannot unregister guest memory"),
            WriteWorkingSet { path, .. } => {
                write!(f, "cannot write working set {}", path.display())
            }
            OpenOutput { path, .. } => {
                write!(f, "cannot open the directory of {}", path.display())
            }
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        use Error::*;
        match self {
            ReadHeader { source, .. }
            | OpenLayer { source, .. }
            | ReadWorkingSet { source, .. }
            | Pidfd { source, .. }
            | Bind { source, .. }
            | Poll { source }
            | ReadEvents { source }
            | Install { source, .. }
            | Unregister { source }
            | WriteWorkingSet { source, .. }
            | OpenOutput { source, .. } => Some(source),
            Header { source, .. } => Some(source),
            WorkingSet { source, .. } => Some(source),
            Handshake { source } => Some(source),
            Config { .. }
            | ShortLayer { .. }
            | WorkingSetMismatch { .. }
            | UnexpectedEvent { .. }
            | FaultOutsideRegions { .. } => None,
        }
    }
}

/// How a run ended (the error case is [`Error`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Every page became resident; the memory was unregistered.
    Resident,
    /// Firecracker exited.
    FirecrackerExited,
    /// The stop fd became readable.
    Stopped,
}

/// The mapped layer files of a header, looked up by build id.
pub struct LayerSet {
    /// Sorted by build id. `None` for an empty layer (nothing to map).
    maps: Vec<(BuildId, Option<Mmap>)>,
}

impl fmt::Debug for LayerSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LayerSet")
            .field("layers", &self.maps.len())
            .finish()
    }
}

impl LayerSet {
    /// Maps every layer the header references from `dir`, read-only, checking each is long
    /// enough for the header.
    pub fn open(header: &Header, dir: &Path) -> Result<LayerSet, Error> {
        LayerSet::open_dirs(header, &[dir.to_path_buf()])
    }

    /// As [`LayerSet::open`], taking each layer from the first of `dirs` that has its file.
    pub fn open_dirs(header: &Header, dirs: &[PathBuf]) -> Result<LayerSet, Error> {
        if dirs.is_empty() {
            return Err(Error::Config {
                what: "no layer directory",
            });
        }
        let mut maps = Vec::with_capacity(header.layers.len());
        for l in &header.layers {
            let name = l.build_id.layer_file_name();
            let path = dirs
                .iter()
                .map(|d| d.join(&name))
                .find(|p| p.exists())
                .unwrap_or_else(|| dirs[0].join(&name));
            if l.size == 0 {
                maps.push((l.build_id, None));
                continue;
            }
            let file = File::open(&path).map_err(|source| Error::OpenLayer {
                path: path.clone(),
                source,
            })?;
            let len = file
                .metadata()
                .map_err(|source| Error::OpenLayer {
                    path: path.clone(),
                    source,
                })?
                .len();
            if len < l.size {
                return Err(Error::ShortLayer {
                    path,
                    size: len,
                    needed: l.size,
                });
            }
            // SAFETY: the layer files are immutable once written (templates and generations are
            // never modified in place), so the mapping cannot change under us; a truncation by
            // someone else would be a SIGBUS, the same as any mapped-file reader.
            let map = unsafe { Mmap::map(&file) }.map_err(|source| Error::OpenLayer {
                path: path.clone(),
                source,
            })?;
            maps.push((l.build_id, Some(map)));
        }
        Ok(LayerSet { maps })
    }
}

impl crate::header::Layers for LayerSet {
    fn layer(&self, id: &BuildId) -> Option<&[u8]> {
        let i = self.maps.binary_search_by(|(b, _)| b.cmp(id)).ok()?;
        Some(self.maps[i].1.as_deref().unwrap_or(&[]))
    }
}

const MISSING: u8 = 0;
const RESIDENT: u8 = 1;
const REMOVED: u8 = 2;
const STATE_MASK: u8 = 3;
const RECORDED: u8 = 4;

const TOKEN_LISTENER: Token = Token(0);
const TOKEN_PIDFD: Token = Token(1);
const TOKEN_STOP: Token = Token(2);
const TOKEN_RECORD_STOP: Token = Token(3);
const TOKEN_UFFD: Token = Token(4);

/// Why a page was installed (for the counters).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Cause {
    Fault,
    Prefetch,
    Fill,
}

/// Result of installing a run.
enum Install {
    Done,
    /// `EAGAIN` without progress: retry after reading pending events.
    Retry,
    /// The address space is gone (Firecracker exited).
    Gone,
}

/// A bound page server, ready to [`run`](PageServer::run).
#[derive(Debug)]
pub struct PageServer {
    config: Config,
    header: Header,
    layers: LayerSet,
    working_set: Option<WorkingSet>,
    listener: UnixListener,
    pidfd: OwnedFd,
    started: Instant,
    stats: Stats,
    stats_out: Option<OutputFile>,
    record_out: Option<OutputFile>,
}

impl PageServer {
    /// Loads the header, maps the layers, reads the working set, opens Firecracker's pidfd and
    /// creates the listening socket. When this returns, the socket accepts connections.
    pub fn bind(config: Config) -> Result<PageServer, Error> {
        let started = Instant::now();
        if config.fault_around > FAULT_AROUND_MAX || config.fault_around % BLOCK_SIZE != 0 {
            return Err(Error::Config {
                what: "fault-around must be a multiple of 4096 up to 2 MiB",
            });
        }
        if config.spin > Duration::from_micros(SPIN_MAX_US) {
            return Err(Error::Config {
                what: "spin is longer than 100 ms",
            });
        }
        let path = &config.header_path;
        let bytes = std::fs::read(path).map_err(|source| Error::ReadHeader {
            path: path.clone(),
            source,
        })?;
        let header = Header::parse(&bytes).map_err(|source| Error::Header {
            path: path.clone(),
            source,
        })?;
        let layers = LayerSet::open_dirs(&header, &config.layer_dirs)?;
        let working_set = match &config.prefetch {
            None => None,
            Some(p) => {
                let b = std::fs::read(p).map_err(|source| Error::ReadWorkingSet {
                    path: p.clone(),
                    source,
                })?;
                let ws = WorkingSet::parse(&b).map_err(|source| Error::WorkingSet {
                    path: p.clone(),
                    source,
                })?;
                if ws.memory_size != header.memory_size {
                    return Err(Error::WorkingSetMismatch { path: p.clone() });
                }
                if ws.build_id != header.build_id {
                    info!(
                        "working set recorded on another generation path={} recorded={} header={}",
                        p.display(),
                        ws.build_id,
                        header.build_id
                    );
                }
                Some(ws)
            }
        };
        let pidfd = sys::pidfd_open(config.firecracker_pid).map_err(|source| Error::Pidfd {
            pid: config.firecracker_pid,
            source,
        })?;
        let (listener, tmp) = bind_socket(&config.socket_path)?;
        if let Some((uid, gid)) = config.socket_owner {
            std::os::unix::fs::lchown(&tmp, Some(uid), Some(gid)).map_err(|source| {
                Error::Bind {
                    path: config.socket_path.clone(),
                    source,
                }
            })?;
        }
        // Output files are reached through their directories opened now, while we may.
        let open_out = |p: &Option<PathBuf>| -> Result<Option<OutputFile>, Error> {
            p.as_ref()
                .map(|p| {
                    OutputFile::open(p).map_err(|source| Error::OpenOutput {
                        path: p.clone(),
                        source,
                    })
                })
                .transpose()
        };
        let stats_out = open_out(&config.stats_path)?;
        let record_out = open_out(&config.record)?;
        let stats = Stats {
            state: "listening",
            ..Stats::default()
        };
        let server = PageServer {
            config,
            header,
            layers,
            working_set,
            listener,
            pidfd,
            started,
            stats,
            stats_out,
            record_out,
        };
        // Stats first, then the socket's final name: whoever sees the socket sees the stats.
        server.write_stats();
        let path = &server.config.socket_path;
        std::fs::rename(&tmp, path).map_err(|source| Error::Bind {
            path: path.clone(),
            source,
        })?;
        info!(
            "listening socket={} firecracker_pid={} memory_bytes={} layers={} extents={}",
            server.config.socket_path.display(),
            server.config.firecracker_pid,
            server.header.memory_size,
            server.header.layers.len(),
            server.header.extents.len()
        );
        Ok(server)
    }

    /// The header being served.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Serves until every page is resident, Firecracker exits or the stop fd fires. On a fatal
    /// error, kills Firecracker first (if configured) and writes `state=failed`.
    pub fn run(mut self) -> Result<(Outcome, Stats), Error> {
        let result = self.run_inner();
        match &result {
            Ok(outcome) => {
                self.stats.state = match outcome {
                    Outcome::Resident => "resident",
                    Outcome::FirecrackerExited => "firecracker_exited",
                    Outcome::Stopped => "stopped",
                };
            }
            Err(e) => {
                error!(
                    "fatal error={} cause={:?}",
                    e,
                    std::error::Error::source(e).map(|s| s.to_string())
                );
                self.stats.state = "failed";
                if self.config.kill_on_fatal {
                    match sys::pidfd_send_signal(self.pidfd.as_fd(), libc::SIGKILL) {
                        Ok(()) => warn!("killed firecracker pid={}", self.config.firecracker_pid),
                        Err(e) => error!(
                            "cannot kill firecracker pid={} error={e}",
                            self.config.firecracker_pid
                        ),
                    }
                }
            }
        }
        self.write_stats();
        let _ = std::fs::remove_file(&self.config.socket_path);
        result.map(|o| (o, self.stats.clone()))
    }

    fn write_stats(&self) {
        if let Some(out) = &self.stats_out {
            if let Err(e) = out.write(self.stats.render().as_bytes()) {
                warn!("cannot write stats path={} error={e}", out.path().display());
            }
        }
    }

    fn run_inner(&mut self) -> Result<Outcome, Error> {
        let mut poll = Poll::new().map_err(|source| Error::Poll { source })?;
        let listener_fd = self.listener.as_raw_fd();
        self.listener
            .set_nonblocking(true)
            .map_err(|source| Error::Poll { source })?;
        poll.registry()
            .register(
                &mut SourceFd(&listener_fd),
                TOKEN_LISTENER,
                Interest::READABLE,
            )
            .map_err(|source| Error::Poll { source })?;
        let pidfd = self.pidfd.as_raw_fd();
        poll.registry()
            .register(&mut SourceFd(&pidfd), TOKEN_PIDFD, Interest::READABLE)
            .map_err(|source| Error::Poll { source })?;
        if let Some(fd) = &self.config.stop_fd {
            poll.registry()
                .register(
                    &mut SourceFd(&fd.as_raw_fd()),
                    TOKEN_STOP,
                    Interest::READABLE,
                )
                .map_err(|source| Error::Poll { source })?;
        }
        let mut events = Events::with_capacity(8);
        // Phase 1: wait for Firecracker's connection.
        let (stream, hs) = loop {
            match poll.poll(&mut events, None) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(source) => return Err(Error::Poll { source }),
            }
            for ev in events.iter() {
                match ev.token() {
                    TOKEN_PIDFD => return Ok(Outcome::FirecrackerExited),
                    TOKEN_STOP => return Ok(Outcome::Stopped),
                    _ => {}
                }
            }
            if let Some(accepted) = self.accept()? {
                break accepted;
            }
        };
        poll.registry()
            .deregister(&mut SourceFd(&listener_fd))
            .map_err(|source| Error::Poll { source })?;
        self.stats.handshake_us = self.started.elapsed().as_micros() as u64;
        info!(
            "handshake regions={} handshake_us={}",
            hs.regions.len(),
            self.stats.handshake_us
        );
        sys::set_nonblocking(hs.uffd.as_fd()).map_err(|source| Error::Poll { source })?;
        let uffd = hs.uffd.as_raw_fd();
        poll.registry()
            .register(&mut SourceFd(&uffd), TOKEN_UFFD, Interest::READABLE)
            .map_err(|source| Error::Poll { source })?;
        if let Some(fd) = &self.config.record_stop_fd {
            poll.registry()
                .register(
                    &mut SourceFd(&fd.as_raw_fd()),
                    TOKEN_RECORD_STOP,
                    Interest::READABLE,
                )
                .map_err(|source| Error::Poll { source })?;
        }
        let mut serve = Serve::new(self, hs.uffd, hs.regions);
        let outcome = serve.run(&mut poll, &mut events);
        // Keep Firecracker's connection open until the end: it is how it sees us alive.
        drop(stream);
        outcome
    }

    /// Accepts one pending connection: `Some` after a good handshake, `None` when the pending
    /// connection was not Firecracker (it is closed and the server keeps listening).
    fn accept(&mut self) -> Result<Option<(UnixStream, handshake::Handshake)>, Error> {
        loop {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(source) => return Err(Error::Poll { source }),
            };
            if let Err(e) = handshake::check_peer(&stream, self.config.firecracker_pid) {
                warn!("rejected connection error={e}");
                continue;
            }
            stream
                .set_nonblocking(false)
                .map_err(|source| Error::Poll { source })?;
            let timeout = Duration::from_millis(HANDSHAKE_TIMEOUT_MS);
            let hs = handshake::receive(&stream, self.header.memory_size, timeout)
                .map_err(|source| Error::Handshake { source })?;
            return Ok(Some((stream, hs)));
        }
    }
}

/// Creates the listening socket under a temporary name (bind + listen); the caller renames it
/// to `path`, so that the path appears only once connections are accepted.
fn bind_socket(path: &Path) -> Result<(UnixListener, PathBuf), Error> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let l = UnixListener::bind(&tmp).map_err(|source| Error::Bind {
        path: path.to_path_buf(),
        source,
    })?;
    Ok((l, tmp))
}

/// The serving phase: owns the userfaultfd and the page states.
struct Serve<'a> {
    srv: &'a mut PageServer,
    uffd: OwnedFd,
    /// Sorted by host address.
    regions: Vec<Region>,
    state: Vec<u8>,
    msgs: Vec<UffdMsg>,
    retry: Vec<u64>,
    recording: Option<Vec<u64>>,
    record_deadline: Option<Instant>,
    /// Prefetch cursor: (run index, offset inside run).
    prefetch: Vec<(u64, u64)>,
    prefetch_next: usize,
    /// Working-set run index of each page (empty without a working set).
    prefetch_run_of: Vec<u32>,
    /// Background-fill cursor: (region index, offset inside region).
    fill_region: usize,
    fill_offset: u64,
    handshake_at: Instant,
    last_stats: Instant,
    /// Set by `install_run` when a page turned out to be present already.
    eexist_seen: bool,
    /// Fault-around windows still to install: (region, from, to) in memory offsets.
    around: VecDeque<(Region, u64, u64)>,
}

impl<'a> Serve<'a> {
    fn new(srv: &'a mut PageServer, uffd: OwnedFd, mut regions: Vec<Region>) -> Serve<'a> {
        regions.sort_by_key(|r| r.base_host_virt_addr);
        let pages = (srv.header.memory_size / BLOCK_SIZE) as usize;
        let total: u64 = regions.iter().map(|r| r.size / BLOCK_SIZE).sum();
        srv.stats.pages_total = total;
        let recording = srv
            .config
            .record
            .as_ref()
            .map(|_| Vec::with_capacity(total as usize));
        let record_deadline = srv.config.record_for.map(|d| Instant::now() + d);
        let prefetch = srv
            .working_set
            .as_ref()
            .map(|w| w.runs())
            .unwrap_or_default();
        // Run index of every working-set page (u32::MAX: not in the set), so that a demand
        // fault can move the prefetch cursor to where the guest is.
        let mut prefetch_run_of = Vec::new();
        if !prefetch.is_empty() {
            prefetch_run_of = vec![u32::MAX; pages];
            for (i, &(off, len)) in prefetch.iter().enumerate() {
                for p in off / BLOCK_SIZE..(off + len) / BLOCK_SIZE {
                    prefetch_run_of[p as usize] = i as u32;
                }
            }
        }
        Serve {
            prefetch_run_of,
            uffd,
            regions,
            state: vec![MISSING; pages],
            msgs: vec![UffdMsg::default(); EVENT_BATCH],
            retry: Vec::with_capacity(RETRY_QUEUE_MAX),
            recording,
            record_deadline,
            prefetch,
            prefetch_next: 0,
            fill_region: 0,
            fill_offset: 0,
            handshake_at: Instant::now(),
            last_stats: Instant::now(),
            eexist_seen: false,
            around: VecDeque::with_capacity(AROUND_QUEUE_MAX),
            srv,
        }
    }

    fn run(&mut self, poll: &mut Poll, events: &mut Events) -> Result<Outcome, Error> {
        self.srv.stats.state = if self.recording.is_some() {
            "recording"
        } else {
            "serving"
        };
        self.srv.write_stats();
        let mut last_activity = Instant::now();
        loop {
            let served = self.drain_events()?;
            if served {
                last_activity = Instant::now();
            }
            if self.recording.is_some() && self.record_deadline.is_some_and(|d| Instant::now() >= d)
            {
                self.stop_recording()?;
            }
            // Fault-around first (it serves what was just touched), then prefetch and fill.
            let step = match self.around_step()? {
                Some(r) => Some(r),
                None => self.background_step()?,
            };
            let worked = match step {
                Some(Install::Gone) => return Ok(Outcome::FirecrackerExited),
                Some(_) => true,
                None => false,
            };
            if self.srv.stats.pages_resident == self.srv.stats.pages_total
                && self.recording.is_none()
            {
                return self.finish();
            }
            if self.last_stats.elapsed() >= Duration::from_secs(1) {
                self.last_stats = Instant::now();
                self.srv.write_stats();
            }
            if served || worked {
                // Look at the control fds now and then without sleeping.
                if worked {
                    if let Some(o) = self.poll_once(poll, events, Some(Duration::ZERO))? {
                        return Ok(o);
                    }
                }
                continue;
            }
            if last_activity.elapsed() < self.srv.config.spin {
                std::hint::spin_loop();
                continue;
            }
            let mut timeout = Duration::from_secs(1);
            if let Some(d) = self.record_deadline.filter(|_| self.recording.is_some()) {
                timeout = timeout.min(d.saturating_duration_since(Instant::now()));
            }
            if let Some(o) = self.poll_once(poll, events, Some(timeout))? {
                return Ok(o);
            }
        }
    }

    /// Polls once; returns an outcome if Firecracker exited or a stop was requested.
    fn poll_once(
        &mut self,
        poll: &mut Poll,
        events: &mut Events,
        timeout: Option<Duration>,
    ) -> Result<Option<Outcome>, Error> {
        match poll.poll(events, timeout) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => return Ok(None),
            Err(source) => return Err(Error::Poll { source }),
        }
        for ev in events.iter() {
            match ev.token() {
                TOKEN_PIDFD => {
                    info!("firecracker exited pid={}", self.srv.config.firecracker_pid);
                    return Ok(Some(Outcome::FirecrackerExited));
                }
                TOKEN_STOP => {
                    info!("stop requested");
                    return Ok(Some(Outcome::Stopped));
                }
                TOKEN_RECORD_STOP => {
                    if let Some(fd) = &self.srv.config.record_stop_fd {
                        sys::drain(fd.as_fd());
                    }
                    if self.recording.is_some() {
                        self.stop_recording()?;
                    }
                }
                _ => {}
            }
        }
        Ok(None)
    }

    /// Reads and handles every pending event; returns whether there were any.
    fn drain_events(&mut self) -> Result<bool, Error> {
        let mut any = false;
        loop {
            let n = sys::read_uffd_msgs(self.uffd.as_fd(), &mut self.msgs)
                .map_err(|source| Error::ReadEvents { source })?;
            if n == 0 {
                break;
            }
            any = true;
            // REMOVE events first: a fault in the same batch on a removed page must read zeros,
            // never the layer's old content. A fault that happened before the removal and is
            // served as zeros ends the same way: the removal would have discarded that page.
            for i in 0..n {
                let m = self.msgs[i];
                match m.event {
                    sys::UFFD_EVENT_REMOVE => self.on_remove(m.arg[0], m.arg[1]),
                    sys::UFFD_EVENT_PAGEFAULT => {}
                    // Not requested by Firecracker (no FORK/REMAP/UNMAP features): a peer that
                    // enables them is not one we can serve correctly.
                    event => return Err(Error::UnexpectedEvent { event }),
                }
            }
            for i in 0..n {
                let m = self.msgs[i];
                if m.event == sys::UFFD_EVENT_PAGEFAULT {
                    if self.srv.stats.faults == 0 {
                        // Plus one, so a fault in the handshake's microsecond is not "none".
                        self.srv.stats.first_fault_us =
                            self.handshake_at.elapsed().as_micros() as u64 + 1;
                    }
                    self.srv.stats.faults += 1;
                    match self.on_fault(m.arg[1])? {
                        Install::Done => {}
                        Install::Retry => self.queue_retry(m.arg[1]),
                        Install::Gone => return Ok(true),
                    }
                }
            }
        }
        // Retry faults that hit a changing memory map now that its events are read.
        if !self.retry.is_empty() {
            let pending = std::mem::take(&mut self.retry);
            for addr in &pending {
                if let Install::Retry = self.on_fault(*addr)? {
                    self.queue_retry(*addr);
                }
            }
            let mut pending = pending;
            pending.clear();
            if self.retry.is_empty() {
                self.retry = pending;
            }
            any = true;
        }
        Ok(any)
    }

    fn queue_retry(&mut self, addr: u64) {
        self.srv.stats.eagain += 1;
        if self.retry.len() < RETRY_QUEUE_MAX {
            self.retry.push(addr);
        } else {
            // The faulting thread will fault again (its fault is still pending in the kernel
            // only until woken), so dropping the retry cannot lose it: wake it to re-fault.
            let _ = sys::uffdio_wake(self.uffd.as_fd(), addr & !(BLOCK_SIZE - 1), BLOCK_SIZE);
        }
    }

    fn region_of(&self, addr: u64) -> Option<usize> {
        let i = self
            .regions
            .partition_point(|r| r.base_host_virt_addr <= addr);
        let i = i.checked_sub(1)?;
        (addr < self.regions[i].host_end()).then_some(i)
    }

    fn on_remove(&mut self, start: u64, end: u64) {
        self.srv.stats.remove_events += 1;
        let mut a = start & !(BLOCK_SIZE - 1);
        while a < end {
            let Some(ri) = self.region_of(a) else {
                a += BLOCK_SIZE;
                continue;
            };
            let r = self.regions[ri];
            let stop = end.min(r.host_end());
            while a < stop {
                let page = ((r.offset + a - r.base_host_virt_addr) / BLOCK_SIZE) as usize;
                if self.state[page] & STATE_MASK == RESIDENT {
                    self.srv.stats.pages_resident -= 1;
                }
                self.state[page] = (self.state[page] & RECORDED) | REMOVED;
                a += BLOCK_SIZE;
            }
        }
        debug!("remove start={start:#x} end={end:#x}");
    }

    fn on_fault(&mut self, addr: u64) -> Result<Install, Error> {
        let ri = self
            .region_of(addr)
            .ok_or(Error::FaultOutsideRegions { address: addr })?;
        let r = self.regions[ri];
        let page_host = addr & !(BLOCK_SIZE - 1);
        let off = r.offset + (page_host - r.base_host_virt_addr);
        let page = (off / BLOCK_SIZE) as usize;
        if let Some(rec) = &mut self.recording {
            if self.state[page] & RECORDED == 0 {
                self.state[page] |= RECORDED;
                rec.push(off);
            }
        }
        if self.state[page] & STATE_MASK == RESIDENT {
            // Already installed (a duplicate fault from another vCPU, or installed since):
            // the install woke its waiters; wake again in case this one raced it.
            let _ = sys::uffdio_wake(self.uffd.as_fd(), page_host, BLOCK_SIZE);
            return Ok(Install::Done);
        }
        // The faulting page alone first, so that its vCPU resumes after one page's copy.
        self.eexist_seen = false;
        let res = self.install_run(&r, off, BLOCK_SIZE, Cause::Fault)?;
        if !matches!(res, Install::Done) {
            return Ok(res);
        }
        if self.eexist_seen {
            // Present already without our install having woken this fault: wake it.
            let _ = sys::uffdio_wake(self.uffd.as_fd(), page_host, BLOCK_SIZE);
        }
        // Then fault-around: the rest of the aligned window (within the region) is queued and
        // installed in small steps between reads of the userfaultfd, so that neighbours never
        // delay the next demand fault. Recording installs single pages so that the record
        // lists exactly the touched pages.
        // While a working set is being prefetched it predicts better than the neighbours do:
        // no fault-around then, and a fault on a page further down the working set means the
        // guest is there, so the prefetch jumps ahead to follow it (skipped runs are faulted
        // in or filled later).
        let prefetching = self.prefetch_next < self.prefetch.len();
        if prefetching {
            let run = self.prefetch_run_of[page];
            if run != u32::MAX && run as usize > self.prefetch_next {
                self.prefetch_next = run as usize;
            }
        }
        if !prefetching && self.recording.is_none() && self.srv.config.fault_around > BLOCK_SIZE {
            let window = self.srv.config.fault_around;
            let lo = (off / window * window).max(r.offset);
            let hi = (off / window * window + window).min(r.offset + r.size);
            if self.around.len() == AROUND_QUEUE_MAX {
                // Bounded: drop the oldest window (an optimization only; faults still work).
                self.around.pop_front();
            }
            self.around.push_back((r, lo, hi));
        }
        Ok(Install::Done)
    }

    /// One step of queued fault-around: at most `AROUND_STEP` bytes. `None` when the queue is
    /// empty.
    fn around_step(&mut self) -> Result<Option<Install>, Error> {
        while let Some(&(r, from, to)) = self.around.front() {
            let mut off = from;
            while off < to && self.state[(off / BLOCK_SIZE) as usize] & STATE_MASK == RESIDENT {
                off += BLOCK_SIZE;
            }
            if off >= to {
                self.around.pop_front();
                continue;
            }
            let res = self.install_run(&r, off, AROUND_STEP.min(to - off), Cause::Fault)?;
            if let Some(front) = self.around.front_mut() {
                front.1 = off + BLOCK_SIZE;
            }
            return Ok(Some(res));
        }
        Ok(None)
    }

    /// Installs the run of not-yet-resident pages starting at memory offset `start` (which must
    /// be missing or removed), at most `max_len` bytes, all from one source (one extent, or
    /// zeros for removed pages), inside region `r`.
    fn install_run(
        &mut self,
        r: &Region,
        start: u64,
        max_len: u64,
        cause: Cause,
    ) -> Result<Install, Error> {
        let first = self.state[(start / BLOCK_SIZE) as usize] & STATE_MASK;
        debug_assert_ne!(first, RESIDENT);
        let limit = (start + max_len).min(r.offset + r.size);
        // `find` cannot fail: start < region end <= memory size (validated at the handshake).
        let Some(ei) = self.srv.header.find(start) else {
            return Ok(Install::Done);
        };
        let e = self.srv.header.extents[ei];
        let end_limit = if first == REMOVED {
            limit
        } else {
            limit.min(e.end())
        };
        let mut end = start + BLOCK_SIZE;
        while end < end_limit && self.state[(end / BLOCK_SIZE) as usize] & STATE_MASK == first {
            end += BLOCK_SIZE;
        }
        let zero = first == REMOVED || e.is_zero();
        let mut done = 0u64;
        let len = end - start;
        let dst = r.base_host_virt_addr + (start - r.offset);
        while done < len {
            let res = if zero {
                sys::uffdio_zeropage(self.uffd.as_fd(), dst + done, len - done, 0)
            } else {
                let layer =
                    crate::header::Layers::layer(&self.srv.layers, &e.build_id).unwrap_or(&[]);
                let s = (e.storage_offset + (start + done - e.offset)) as usize;
                // In bounds: the header was checked against the layer sizes, and the layer
                // files against the header (LayerSet::open).
                let src = &layer[s..s + (len - done) as usize];
                sys::uffdio_copy(self.uffd.as_fd(), dst + done, src, 0)
            };
            match res {
                Ok(()) => {
                    self.mark_resident(start + done, len - done, zero, cause);
                    done = len;
                }
                Err(fe) => {
                    self.mark_resident(start + done, fe.done, zero, cause);
                    done += fe.done;
                    match fe.error.raw_os_error() {
                        Some(libc::EEXIST) => {
                            self.eexist_seen = true;
                            // Present already (installed by the kernel or an earlier copy).
                            self.srv.stats.eexist += 1;
                            self.set_resident(start + done, BLOCK_SIZE);
                            done += BLOCK_SIZE;
                        }
                        Some(libc::EAGAIN) if fe.done > 0 => {}
                        Some(libc::EAGAIN) => return Ok(Install::Retry),
                        Some(libc::ESRCH) | Some(libc::ENOENT) => return Ok(Install::Gone),
                        _ => {
                            return Err(Error::Install {
                                address: dst + done,
                                len: len - done,
                                source: fe.error,
                            })
                        }
                    }
                }
            }
        }
        Ok(Install::Done)
    }

    /// Marks pages resident and counts them as installed by `cause`.
    fn mark_resident(&mut self, start: u64, len: u64, zero: bool, cause: Cause) {
        let pages = len / BLOCK_SIZE;
        self.set_resident(start, len);
        if zero {
            self.srv.stats.zero_pages += pages;
        }
        match cause {
            Cause::Fault => self.srv.stats.pages_faulted += pages,
            Cause::Prefetch => self.srv.stats.pages_prefetched += pages,
            Cause::Fill => self.srv.stats.pages_filled += pages,
        }
    }

    /// Marks pages resident (without counting an install).
    fn set_resident(&mut self, start: u64, len: u64) {
        for p in (start / BLOCK_SIZE)..((start + len) / BLOCK_SIZE) {
            let s = &mut self.state[p as usize];
            if *s & STATE_MASK != RESIDENT {
                self.srv.stats.pages_resident += 1;
            }
            *s = (*s & RECORDED) | RESIDENT;
        }
    }

    /// Maps a memory offset to the region holding it.
    fn region_of_offset(&self, off: u64) -> Option<Region> {
        self.regions
            .iter()
            .find(|r| off >= r.offset && off < r.offset + r.size)
            .copied()
    }

    /// One step of background work: a prefetch run, else (when not recording) a fill chunk.
    /// Returns `None` when there is nothing left to do.
    fn background_step(&mut self) -> Result<Option<Install>, Error> {
        if self.prefetch_next == self.prefetch.len() && !self.prefetch.is_empty() {
            // Announce the end of the prefetch once (the agent and tests watch the stats).
            self.prefetch_next += 1;
            info!("prefetch done pages={}", self.srv.stats.pages_prefetched);
            self.srv.write_stats();
        }
        while self.prefetch_next < self.prefetch.len() {
            let (run_off, run_len) = self.prefetch[self.prefetch_next];
            // Skip the resident head of the run.
            let mut off = run_off;
            let end = run_off + run_len;
            while off < end && self.state[(off / BLOCK_SIZE) as usize] & STATE_MASK == RESIDENT {
                off += BLOCK_SIZE;
            }
            if off >= end {
                self.prefetch_next += 1;
                continue;
            }
            let Some(r) = self.region_of_offset(off) else {
                // A working-set page outside every region: skip it.
                self.prefetch[self.prefetch_next] = (off + BLOCK_SIZE, end - off - BLOCK_SIZE);
                continue;
            };
            let res = self.install_run(&r, off, (end - off).min(FILL_CHUNK), Cause::Prefetch)?;
            if matches!(res, Install::Retry) {
                self.srv.stats.eagain += 1;
            }
            return Ok(Some(res));
        }
        if self.recording.is_some() || !self.srv.config.background_fill {
            return Ok(None);
        }
        if self.srv.stats.state != "filling" {
            self.srv.stats.state = "filling";
            self.srv.write_stats();
        }
        while self.fill_region < self.regions.len() {
            let r = self.regions[self.fill_region];
            let mut off = r.offset + self.fill_offset;
            let end = r.offset + r.size;
            while off < end && self.state[(off / BLOCK_SIZE) as usize] & STATE_MASK == RESIDENT {
                off += BLOCK_SIZE;
            }
            if off >= end {
                self.fill_region += 1;
                self.fill_offset = 0;
                continue;
            }
            self.fill_offset = off - r.offset;
            let res = self.install_run(&r, off, FILL_CHUNK, Cause::Fill)?;
            if matches!(res, Install::Retry) {
                self.srv.stats.eagain += 1;
            }
            return Ok(Some(res));
        }
        // Pages removed after the cursor passed them: start over (they are few).
        if self.srv.stats.pages_resident < self.srv.stats.pages_total {
            self.fill_region = 0;
            self.fill_offset = 0;
            return Ok(Some(Install::Done));
        }
        Ok(None)
    }

    fn stop_recording(&mut self) -> Result<(), Error> {
        let Some(pages) = self.recording.take() else {
            return Ok(());
        };
        let Some(out) = &self.srv.record_out else {
            return Ok(());
        };
        let path = out.path().to_owned();
        self.srv.stats.pages_recorded = pages.len() as u64;
        let ws = WorkingSet {
            memory_size: self.srv.header.memory_size,
            build_id: self.srv.header.build_id,
            pages,
        };
        out.write(&ws.serialize())
            .map_err(|source| Error::WriteWorkingSet {
                path: path.clone(),
                source,
            })?;
        info!(
            "working set recorded path={} pages={}",
            path.display(),
            ws.pages.len()
        );
        self.srv.stats.state = "serving";
        self.srv.write_stats();
        Ok(())
    }

    /// Every page is resident: unregister the memory so that later faults and REMOVE events
    /// are the kernel's own, then end.
    fn finish(&mut self) -> Result<Outcome, Error> {
        for r in &self.regions {
            match sys::uffdio_unregister(self.uffd.as_fd(), r.base_host_virt_addr, r.size) {
                Ok(()) => {}
                // The address space is gone: Firecracker exited meanwhile.
                Err(e) if matches!(e.raw_os_error(), Some(libc::ESRCH) | Some(libc::ENOENT)) => {
                    return Ok(Outcome::FirecrackerExited)
                }
                Err(source) => return Err(Error::Unregister { source }),
            }
        }
        self.srv.stats.resident_ms = self.handshake_at.elapsed().as_millis() as u64;
        info!(
            "all pages resident pages={} faults={} prefetched={} filled={} zero_pages={} resident_ms={}",
            self.srv.stats.pages_total,
            self.srv.stats.faults,
            self.srv.stats.pages_prefetched,
            self.srv.stats.pages_filled,
            self.srv.stats.zero_pages,
            self.srv.stats.resident_ms
        );
        Ok(Outcome::Resident)
    }
}
