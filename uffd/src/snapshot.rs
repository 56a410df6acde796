//! A snapshot directory: the published generations of one sandbox's memory snapshot.
//!
//! A pause publishes one **generation directory** `gen-<seq>` (seq: 20 decimal digits, +1
//! per publish) holding everything a restore needs: `header`, Firecracker's `vmstate`, every
//! layer the header references (the new one written there, the parent's hard-linked), and a
//! `manifest` with their sizes and CRC-32s. It is built under `gen-<seq>.tmp`, every file and
//! the directory are synced, and one `rename` makes it visible: a crash at any point leaves
//! the previous generation or the new one, never new memory with old CPU state.
//!
//! [`recover`] takes the newest generation whose manifest checks out and removes incomplete
//! (`.tmp`) and older ones. A directory without generations but with `header` and `vmstate`
//! at its top is the layout written before generations existed (and templates' layout): it
//! is still read as one generation ([`Generation::legacy`]).

use std::fmt;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::header::{BuildId, Header};
use crate::limits::{LAYER_COUNT_MAX, SCAN_CHUNK, SQUASH_CHUNK};

/// Name prefix of a generation directory.
pub const GEN_PREFIX: &str = "gen-";
/// Suffix of a generation directory being built.
pub const TMP_SUFFIX: &str = ".tmp";
/// The files of a generation directory.
pub const HEADER_NAME: &str = "header";
pub const VMSTATE_NAME: &str = "vmstate";
pub const MANIFEST_NAME: &str = "manifest";
/// First line of a manifest.
pub const MANIFEST_MAGIC: &str = "wrenn-generation 1";
/// Lines a manifest may have: one per layer plus the fixed fields.
const MANIFEST_LINES_MAX: usize = LAYER_COUNT_MAX as usize + 16;
/// Size a manifest may have (a line is under 100 bytes).
const MANIFEST_SIZE_MAX: u64 = MANIFEST_LINES_MAX as u64 * 128;

/// Why a snapshot directory operation failed.
#[derive(Debug)]
pub enum Error {
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    /// A generation that does not check out (manifest, sizes, checksums, header).
    Invalid { path: PathBuf, reason: String },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io { action, path, .. } => write!(f, "cannot {action} {}", path.display()),
            Error::Invalid { path, reason } => {
                write!(f, "generation {} is invalid: {reason}", path.display())
            }
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io { source, .. } => Some(source),
            Error::Invalid { .. } => None,
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

fn invalid(path: &Path, reason: impl Into<String>) -> Error {
    Error::Invalid {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

/// One published generation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generation {
    /// The directory holding `header`, `vmstate` and the layers.
    pub dir: PathBuf,
    /// Publish sequence number (0 for the legacy layout).
    pub seq: u64,
    /// The directory layout written before generation directories.
    pub legacy: bool,
}

impl Generation {
    pub fn header(&self) -> PathBuf {
        self.dir.join(HEADER_NAME)
    }
    pub fn vmstate(&self) -> PathBuf {
        self.dir.join(VMSTATE_NAME)
    }
    /// Where its layers are (every layer its header references, for a generation directory).
    pub fn layer_dir(&self) -> &Path {
        &self.dir
    }
}

/// The points of a publish, in order, where a test hook runs (crash injection).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The `.tmp` directory exists.
    Begun,
    /// A layer file was written in full (not yet synced).
    LayerWritten,
    /// A parent's layer was linked.
    LayerLinked,
    /// The VM state file is in place.
    VmStatePlaced,
    /// The header file is written.
    HeaderWritten,
    /// The manifest is written.
    ManifestWritten,
    /// Every file and the `.tmp` directory are synced.
    Synced,
    /// Renamed to `gen-<seq>`.
    Renamed,
    /// The snapshot directory is synced: published.
    Published,
    /// An older generation was removed ([`remove_others`]).
    OldRemoved,
}

/// What each step calls; production passes [`no_hook`].
pub type Hook<'a> = &'a mut dyn FnMut(Step);

/// A hook that does nothing.
pub fn no_hook(_: Step) {}

/// Parses `gen-<seq>` (complete) names.
fn parse_gen_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix(GEN_PREFIX)?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

fn gen_name(seq: u64) -> String {
    format!("{GEN_PREFIX}{seq:020}")
}

/// The complete generation directories of `snap` (by name), newest first.
fn list_generations(snap: &Path) -> Result<Vec<u64>, Error> {
    let mut seqs = Vec::new();
    let rd = match fs::read_dir(snap) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(seqs),
        Err(e) => return Err(io_err("list", snap)(e)),
    };
    for e in rd.flatten() {
        if let Some(seq) = e.file_name().to_str().and_then(parse_gen_name) {
            seqs.push(seq);
        }
    }
    seqs.sort_unstable_by(|a, b| b.cmp(a));
    Ok(seqs)
}

fn sync_dir(dir: &Path) -> Result<(), Error> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("sync directory", dir))
}

/// A layer being written into a generation: counts its bytes and its CRC-32.
pub struct LayerWriter {
    id: BuildId,
    file: File,
    buf: Vec<u8>,
    size: u64,
    crc: crc32fast::Hasher,
}

/// Buffer of a [`LayerWriter`] (writes reach the file in pieces of this size).
const LAYER_WRITE_BUFFER: usize = SQUASH_CHUNK;

impl LayerWriter {
    fn flush_buf(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            self.file.write_all(&self.buf)?;
            self.buf.clear();
        }
        Ok(())
    }
}

impl Write for LayerWriter {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.crc.update(b);
        self.size += b.len() as u64;
        if self.buf.len() + b.len() > LAYER_WRITE_BUFFER {
            self.flush_buf()?;
        }
        if b.len() >= LAYER_WRITE_BUFFER {
            self.file.write_all(b)?;
        } else {
            self.buf.extend_from_slice(b);
        }
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        self.flush_buf()
    }
}

/// One layer listed in a manifest: `None` crc for a layer linked from a parent generation
/// (its checksum is in the manifest of the generation that wrote it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ManifestLayer {
    id: BuildId,
    size: u64,
    crc: Option<u32>,
}

/// A generation being built under `gen-<seq>.tmp`.
pub struct Publish {
    snap: PathBuf,
    seq: u64,
    tmp: PathBuf,
    layers: Vec<ManifestLayer>,
    files: Vec<File>,
}

impl Publish {
    /// Starts the next generation of `snap` (created if missing): a fresh `.tmp` directory
    /// (a stale one from a crash is removed first).
    pub fn begin(snap: &Path, hook: Hook<'_>) -> Result<Publish, Error> {
        fs::create_dir_all(snap).map_err(io_err("create", snap))?;
        let seq = list_generations(snap)?.first().map_or(1, |s| s + 1);
        let tmp = snap.join(format!("{}{TMP_SUFFIX}", gen_name(seq)));
        match fs::remove_dir_all(&tmp) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("remove stale", &tmp)(e)),
        }
        fs::create_dir(&tmp).map_err(io_err("create", &tmp))?;
        hook(Step::Begun);
        Ok(Publish {
            snap: snap.to_owned(),
            seq,
            tmp,
            layers: Vec::new(),
            files: Vec::new(),
        })
    }

    /// The directory being built (the VM state goes to `dir()/vmstate`).
    pub fn dir(&self) -> &Path {
        &self.tmp
    }

    /// The sequence number it will be published under.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// A new layer file `<id>.layer` in the generation.
    pub fn layer_writer(&self, id: BuildId) -> Result<LayerWriter, Error> {
        let p = self.tmp.join(id.layer_file_name());
        let file = File::create(&p).map_err(io_err("create", &p))?;
        Ok(LayerWriter {
            id,
            file,
            buf: Vec::with_capacity(LAYER_WRITE_BUFFER),
            size: 0,
            crc: crc32fast::Hasher::new(),
        })
    }

    /// Ends a layer written with [`Publish::layer_writer`].
    pub fn layer_done(&mut self, mut w: LayerWriter, hook: Hook<'_>) -> Result<(), Error> {
        let p = self.tmp.join(w.id.layer_file_name());
        w.flush_buf().map_err(io_err("write", &p))?;
        self.layers.retain(|l| l.id != w.id);
        self.layers.push(ManifestLayer {
            id: w.id,
            size: w.size,
            crc: Some(w.crc.finalize()),
        });
        self.files.push(w.file);
        hook(Step::LayerWritten);
        Ok(())
    }

    /// Links layer `id` of a parent generation (found in `dirs`, in order) into this one: a
    /// hard link (layers never change), a copy across file systems.
    pub fn link_layer(
        &mut self,
        dirs: &[PathBuf],
        id: BuildId,
        hook: Hook<'_>,
    ) -> Result<(), Error> {
        let name = id.layer_file_name();
        let dst = self.tmp.join(&name);
        if self.layers.iter().any(|l| l.id == id) {
            return Ok(());
        }
        let src = dirs
            .iter()
            .map(|d| d.join(&name))
            .find(|p| p.exists())
            .ok_or_else(|| invalid(&self.tmp, format!("parent layer {name} not found")))?;
        if fs::hard_link(&src, &dst).is_err() {
            fs::copy(&src, &dst).map_err(io_err("copy", &src))?;
            self.files
                .push(File::open(&dst).map_err(io_err("open", &dst))?);
        }
        let size = fs::metadata(&dst).map_err(io_err("stat", &dst))?.len();
        self.layers.push(ManifestLayer {
            id,
            size,
            crc: None,
        });
        hook(Step::LayerLinked);
        Ok(())
    }

    /// Squashes `header`'s layers (all in this generation's directory) into one new layer
    /// `id` and returns the squashed header. It streams through the mapped layer files
    /// (`page_server::LayerSet`): the heap it uses is bounded by
    /// [`crate::limits::SQUASH_MEMORY_MAX`] whatever the layers' sizes.
    pub fn squash(
        &mut self,
        header: &Header,
        id: BuildId,
        hook: Hook<'_>,
    ) -> Result<Header, Error> {
        let layers = crate::page_server::LayerSet::open(header, &self.tmp)
            .map_err(|e| invalid(&self.tmp, format!("cannot map the layers: {e}")))?;
        let mut w = self.layer_writer(id)?;
        let squashed = crate::header::squash(header, &layers, &mut w, id)
            .map_err(|e| invalid(&self.tmp, format!("squash: {e}")))?;
        drop(layers);
        self.layer_done(w, hook)?;
        Ok(squashed)
    }

    /// Moves a VM state file (on the same file system) into the generation.
    pub fn place_vmstate(&mut self, from: &Path, hook: Hook<'_>) -> Result<(), Error> {
        let dst = self.tmp.join(VMSTATE_NAME);
        fs::rename(from, &dst).map_err(io_err("move the vm state", from))?;
        hook(Step::VmStatePlaced);
        Ok(())
    }

    /// Marks `dir()/vmstate`, written by the caller, as placed.
    pub fn vmstate_written(&mut self, hook: Hook<'_>) -> Result<(), Error> {
        let p = self.tmp.join(VMSTATE_NAME);
        fs::metadata(&p).map_err(io_err("stat", &p))?;
        hook(Step::VmStatePlaced);
        Ok(())
    }

    /// Writes `header` and the manifest, syncs everything and renames the directory into
    /// place. Layers in the directory that `header` no longer references (squashed) are
    /// removed first; every referenced one must be there.
    pub fn finish(mut self, header: &Header, hook: Hook<'_>) -> Result<Generation, Error> {
        let tmp = self.tmp.clone();
        self.layers.retain(|l| {
            let keep = header.layer(&l.id).is_some();
            if !keep {
                let _ = fs::remove_file(tmp.join(l.id.layer_file_name()));
            }
            keep
        });
        for l in &header.layers {
            let Some(m) = self.layers.iter().find(|m| m.id == l.build_id) else {
                return Err(invalid(
                    &tmp,
                    format!("layer {} missing", l.build_id.layer_file_name()),
                ));
            };
            if m.size < l.size {
                return Err(invalid(&tmp, "a layer is shorter than its header says"));
            }
        }
        let header_bytes = header.serialize();
        let hp = tmp.join(HEADER_NAME);
        let mut hf = File::create(&hp).map_err(io_err("create", &hp))?;
        hf.write_all(&header_bytes).map_err(io_err("write", &hp))?;
        self.files.push(hf);
        hook(Step::HeaderWritten);
        let vp = tmp.join(VMSTATE_NAME);
        let (vmstate_size, vmstate_crc) = crc_of(&vp)?;
        let mut w = proto::kv::Writer::new(MANIFEST_MAGIC);
        w.put_display("seq", self.seq);
        w.put_display("generation", header.generation);
        w.put_display("build_id", header.build_id);
        w.put_display("header.size", header_bytes.len());
        w.put_display(
            "header.crc32",
            format!("{:08x}", crc32fast::hash(&header_bytes)),
        );
        w.put_display("vmstate.size", vmstate_size);
        w.put_display("vmstate.crc32", format!("{vmstate_crc:08x}"));
        for l in &self.layers {
            let crc = l
                .crc
                .map_or_else(|| "linked".to_owned(), |c| format!("{c:08x}"));
            w.put(&format!("layer.{}", l.id), &format!("{} {crc}", l.size));
        }
        let mp = tmp.join(MANIFEST_NAME);
        let mut mf = File::create(&mp).map_err(io_err("create", &mp))?;
        mf.write_all(w.finish().as_bytes())
            .map_err(io_err("write", &mp))?;
        self.files.push(mf);
        self.files
            .push(File::open(&vp).map_err(io_err("open", &vp))?);
        hook(Step::ManifestWritten);
        // One durability point: every byte of the generation before its name appears.
        for f in &self.files {
            f.sync_data().map_err(io_err("sync a file of", &tmp))?;
        }
        sync_dir(&tmp)?;
        hook(Step::Synced);
        let dst = self.snap.join(gen_name(self.seq));
        fs::rename(&tmp, &dst).map_err(io_err("publish", &dst))?;
        hook(Step::Renamed);
        sync_dir(&self.snap)?;
        hook(Step::Published);
        Ok(Generation {
            dir: dst,
            seq: self.seq,
            legacy: false,
        })
    }

    /// Gives the generation up: removes its `.tmp` directory.
    pub fn abandon(self) {
        let _ = fs::remove_dir_all(&self.tmp);
    }
}

/// Size and CRC-32 of a file, read in pieces.
fn crc_of(p: &Path) -> Result<(u64, u32), Error> {
    let mut f = File::open(p).map_err(io_err("open", p))?;
    let mut h = crc32fast::Hasher::new();
    let mut buf = vec![0u8; SCAN_CHUNK];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(io_err("read", p))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        size += n as u64;
    }
    Ok((size, h.finalize()))
}

/// What a manifest says.
#[derive(Debug)]
struct Manifest {
    seq: u64,
    header_size: u64,
    header_crc: u32,
    vmstate_size: u64,
    vmstate_crc: u32,
    layers: Vec<ManifestLayer>,
}

fn parse_manifest(dir: &Path) -> Result<Manifest, Error> {
    let p = dir.join(MANIFEST_NAME);
    let f = File::open(&p).map_err(io_err("open", &p))?;
    let mut text = String::new();
    f.take(MANIFEST_SIZE_MAX + 1)
        .read_to_string(&mut text)
        .map_err(io_err("read", &p))?;
    if text.len() as u64 > MANIFEST_SIZE_MAX {
        return Err(invalid(dir, "manifest too large"));
    }
    let bad = |e: proto::kv::KvError| invalid(dir, format!("manifest: {e}"));
    let (mut r, _) =
        proto::kv::Reader::parse(&text, &[MANIFEST_MAGIC], MANIFEST_LINES_MAX).map_err(bad)?;
    let hex = |s: &str| u32::from_str_radix(s, 16).ok().filter(|_| s.len() == 8);
    let seq = r.num("seq").map_err(bad)?;
    let _: u64 = r.num("generation").map_err(bad)?;
    let _ = r.with("build_id", BuildId::parse).map_err(bad)?;
    let m = Manifest {
        seq,
        header_size: r.num("header.size").map_err(bad)?,
        header_crc: r.with("header.crc32", hex).map_err(bad)?,
        vmstate_size: r.num("vmstate.size").map_err(bad)?,
        vmstate_crc: r.with("vmstate.crc32", hex).map_err(bad)?,
        layers: r
            .map("layer.")
            .into_iter()
            .map(|(name, v)| {
                let id = BuildId::parse(&name)
                    .ok_or_else(|| invalid(dir, format!("manifest: bad layer name {name:?}")))?;
                let (size, crc) = v
                    .split_once(' ')
                    .ok_or_else(|| invalid(dir, format!("manifest: bad layer entry {v:?}")))?;
                let size = size
                    .parse()
                    .map_err(|_| invalid(dir, format!("manifest: bad layer size {size:?}")))?;
                let crc = match crc {
                    "linked" => None,
                    c => Some(hex(c).ok_or_else(|| invalid(dir, "manifest: bad layer crc"))?),
                };
                Ok(ManifestLayer { id, size, crc })
            })
            .collect::<Result<_, Error>>()?,
    };
    r.done().map_err(bad)?;
    Ok(m)
}

/// Checks a generation directory against its manifest: the header's and the VM state's
/// sizes and CRC-32s, the header parses, and every layer it references is listed and
/// present with the listed size. Layer contents are not read (see [`verify_layers`]).
pub fn verify(dir: &Path, seq: u64) -> Result<Header, Error> {
    let m = parse_manifest(dir)?;
    if m.seq != seq {
        return Err(invalid(dir, "manifest names another sequence number"));
    }
    let hp = dir.join(HEADER_NAME);
    let (hs, hc) = crc_of(&hp)?;
    if hs != m.header_size || hc != m.header_crc {
        return Err(invalid(
            dir,
            "header size or checksum differs from the manifest",
        ));
    }
    let (vs, vc) = crc_of(&dir.join(VMSTATE_NAME))?;
    if vs != m.vmstate_size || vc != m.vmstate_crc {
        return Err(invalid(
            dir,
            "vm state size or checksum differs from the manifest",
        ));
    }
    let bytes = fs::read(&hp).map_err(io_err("read", &hp))?;
    let header = Header::parse(&bytes).map_err(|e| invalid(dir, format!("header: {e}")))?;
    for l in &header.layers {
        let Some(ml) = m.layers.iter().find(|x| x.id == l.build_id) else {
            return Err(invalid(dir, "a layer of the header is not in the manifest"));
        };
        let p = dir.join(l.build_id.layer_file_name());
        let len = fs::metadata(&p).map_err(io_err("stat", &p))?.len();
        if len != ml.size || len < l.size {
            return Err(invalid(dir, "a layer's size differs from the manifest"));
        }
    }
    Ok(header)
}

/// Reads every layer this generation wrote and checks its CRC-32 against the manifest
/// (recovery does not: it would read every byte of every paused sandbox at start).
pub fn verify_layers(dir: &Path) -> Result<(), Error> {
    let m = parse_manifest(dir)?;
    for l in &m.layers {
        if let Some(crc) = l.crc {
            let (size, c) = crc_of(&dir.join(l.id.layer_file_name()))?;
            if size != l.size || c != crc {
                return Err(invalid(dir, "a layer's checksum differs from the manifest"));
            }
        }
    }
    Ok(())
}

/// What [`recover`] found and did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Recovered {
    /// The newest complete generation (or the legacy layout), if any.
    pub generation: Option<Generation>,
    /// Directories removed: `.tmp` ones, invalid ones, older ones.
    pub removed: Vec<PathBuf>,
}

/// Takes the newest generation of `snap` that checks out ([`verify`]); removes incomplete
/// (`.tmp`) directories, generations that do not check out, and older generations. Without
/// any generation directory, `header` + `vmstate` at the top of `snap` are the legacy layout.
pub fn recover(snap: &Path) -> Result<Recovered, Error> {
    let mut out = Recovered::default();
    if let Ok(rd) = fs::read_dir(snap) {
        for e in rd.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            if name.starts_with(GEN_PREFIX) && name.ends_with(TMP_SUFFIX) {
                fs::remove_dir_all(e.path()).map_err(io_err("remove", &e.path()))?;
                out.removed.push(e.path());
            }
        }
    }
    for seq in list_generations(snap)? {
        let dir = snap.join(gen_name(seq));
        if out.generation.is_none() {
            match verify(&dir, seq) {
                Ok(_) => {
                    out.generation = Some(Generation {
                        dir,
                        seq,
                        legacy: false,
                    });
                    continue;
                }
                Err(e) => log::warn!("dropping snapshot generation error={e}"),
            }
        }
        fs::remove_dir_all(&dir).map_err(io_err("remove", &dir))?;
        out.removed.push(dir);
    }
    if out.generation.is_none()
        && snap.join(HEADER_NAME).is_file()
        && snap.join(VMSTATE_NAME).is_file()
    {
        out.generation = Some(Generation {
            dir: snap.to_owned(),
            seq: 0,
            legacy: true,
        });
    }
    Ok(out)
}

/// The newest generation of `snap` that checks out, or the legacy layout; removes nothing
/// (for readers beside the agent, such as benches).
pub fn newest(snap: &Path) -> Result<Option<Generation>, Error> {
    for seq in list_generations(snap)? {
        let dir = snap.join(gen_name(seq));
        if verify(&dir, seq).is_ok() {
            return Ok(Some(Generation {
                dir,
                seq,
                legacy: false,
            }));
        }
    }
    let legacy = snap.join(HEADER_NAME).is_file() && snap.join(VMSTATE_NAME).is_file();
    Ok(legacy.then(|| Generation {
        dir: snap.to_owned(),
        seq: 0,
        legacy: true,
    }))
}

/// After `keep` is published: removes every other generation directory, stale `.tmp` ones,
/// and the legacy layout's files at the top of `snap` (`header`, `vmstate`, `*.layer`).
pub fn remove_others(snap: &Path, keep: &Generation, hook: Hook<'_>) -> Result<(), Error> {
    let rd = fs::read_dir(snap).map_err(io_err("list", snap))?;
    for e in rd.flatten() {
        let p = e.path();
        if p == keep.dir {
            continue;
        }
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(GEN_PREFIX) {
            fs::remove_dir_all(&p).map_err(io_err("remove", &p))?;
            hook(Step::OldRemoved);
        } else if !keep.legacy
            && (name == HEADER_NAME
                || name == VMSTATE_NAME
                || name == "header.tmp"
                || name.ends_with(".layer")
                || name.ends_with(".layer.tmp"))
        {
            fs::remove_file(&p).map_err(io_err("remove", &p))?;
            hook(Step::OldRemoved);
        }
    }
    Ok(())
}

/// Writes the full memory file of a chain for Firecracker's File backend into `out` (a new,
/// empty file): the memory's size, every data extent at its offset, zeros left as holes.
/// Layers are looked up in `layer_dirs` in order; copies go through a buffer of
/// [`SCAN_CHUNK`] bytes.
pub fn materialize(header: &Header, layer_dirs: &[PathBuf], out: &File) -> Result<(), Error> {
    let out_path = Path::new("memory file");
    out.set_len(header.memory_size)
        .map_err(io_err("size", out_path))?;
    let mut files: Vec<(BuildId, File)> = Vec::new();
    let mut buf = vec![0u8; SCAN_CHUNK];
    for e in header.extents.iter().filter(|e| !e.is_zero()) {
        let i = match files.iter().position(|(id, _)| *id == e.build_id) {
            Some(i) => i,
            None => {
                let name = e.build_id.layer_file_name();
                let p = layer_dirs
                    .iter()
                    .map(|d| d.join(&name))
                    .find(|p| p.exists())
                    .ok_or_else(|| invalid(out_path, format!("layer {name} missing")))?;
                files.push((e.build_id, File::open(&p).map_err(io_err("open", &p))?));
                files.len() - 1
            }
        };
        let src = &files[i].1;
        let mut done = 0;
        while done < e.length {
            let n = (e.length - done).min(buf.len() as u64) as usize;
            src.read_exact_at(&mut buf[..n], e.storage_offset + done)
                .map_err(io_err("read a layer for", out_path))?;
            out.write_all_at(&buf[..n], e.offset + done)
                .map_err(io_err("write", out_path))?;
            done += n as u64;
        }
    }
    Ok(())
}

/// Reads one page of guest memory at `offset` through a generation's header and layers
/// (for tests and checks: opens the layer each call).
pub fn read_page(
    g: &Generation,
    header: &Header,
    offset: u64,
    out: &mut [u8],
) -> Result<(), Error> {
    let i = header
        .find(offset)
        .ok_or_else(|| invalid(&g.dir, "offset past the memory"))?;
    let e = &header.extents[i];
    if e.is_zero() {
        out.fill(0);
        return Ok(());
    }
    let p = g.dir.join(e.build_id.layer_file_name());
    let f = File::open(&p).map_err(io_err("open", &p))?;
    f.read_exact_at(out, e.storage_offset + offset - e.offset)
        .map_err(io_err("read", &p))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::header::{Diff, DiffExtent, DiffKind};
    use crate::limits::BLOCK_SIZE;

    const PAGES: u64 = 8;
    const CRASH_EXIT: i32 = 86;

    fn tmpdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("uffd-snap-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    fn data_diff(offset: u64, pages: u64) -> Diff {
        Diff {
            extents: vec![DiffExtent {
                offset,
                length: pages * BLOCK_SIZE,
                kind: DiffKind::Data { storage_offset: 0 },
            }],
            layer_size: pages * BLOCK_SIZE,
        }
    }

    /// Publishes generation 1: every page 0xA1; its VM state names its build id.
    fn publish_first(snap: &Path) -> Generation {
        let id = BuildId([0xA1; 16]);
        let header = Header::from_base(PAGES * BLOCK_SIZE, id, &data_diff(0, PAGES)).unwrap();
        let hook = &mut no_hook;
        let mut p = Publish::begin(snap, hook).unwrap();
        let mut w = p.layer_writer(id).unwrap();
        w.write_all(&vec![0xA1; (PAGES * BLOCK_SIZE) as usize])
            .unwrap();
        p.layer_done(w, hook).unwrap();
        fs::write(p.dir().join(VMSTATE_NAME), format!("cpu {id}")).unwrap();
        p.vmstate_written(hook).unwrap();
        p.finish(&header, hook).unwrap()
    }

    /// Publishes generation 2 over `parent`: pages 2 and 3 become 0xB2; calls `hook` at
    /// every step, then removes the older generation.
    fn publish_second(snap: &Path, parent: &Generation, hook: Hook<'_>) -> Generation {
        let id = BuildId([0xB2; 16]);
        let old = Header::parse(&fs::read(parent.header()).unwrap()).unwrap();
        let header = old.merge(&data_diff(2 * BLOCK_SIZE, 2), id).unwrap();
        let mut p = Publish::begin(snap, hook).unwrap();
        // Firecracker writes its VM state next to the generation, then it moves in.
        let vm_new = snap.join("vmstate.new");
        fs::write(&vm_new, format!("cpu {id}")).unwrap();
        let mut w = p.layer_writer(id).unwrap();
        w.write_all(&vec![0xB2; 2 * BLOCK_SIZE as usize]).unwrap();
        p.layer_done(w, hook).unwrap();
        for l in &header.layers {
            if l.build_id != id {
                p.link_layer(&[parent.layer_dir().to_owned()], l.build_id, hook)
                    .unwrap();
            }
        }
        p.place_vmstate(&vm_new, hook).unwrap();
        let g = p.finish(&header, hook).unwrap();
        remove_others(snap, &g, hook).unwrap();
        g
    }

    /// Which generation `g` is (1 or 2), after checking that its memory and its VM state
    /// belong to the same one.
    fn check_consistent(g: &Generation) -> u8 {
        let header = Header::parse(&fs::read(g.header()).unwrap()).unwrap();
        let vm = fs::read_to_string(g.vmstate()).unwrap();
        assert_eq!(
            vm,
            format!("cpu {}", header.build_id),
            "memory and CPU state mixed"
        );
        verify_layers(&g.dir).unwrap();
        let mut page = vec![0u8; BLOCK_SIZE as usize];
        read_page(g, &header, 0, &mut page).unwrap();
        assert!(page.iter().all(|&b| b == 0xA1));
        read_page(g, &header, 2 * BLOCK_SIZE, &mut page).unwrap();
        match header.build_id {
            BuildId([0xA1, ..]) => {
                assert!(page.iter().all(|&b| b == 0xA1));
                1
            }
            BuildId([0xB2, ..]) => {
                assert!(page.iter().all(|&b| b == 0xB2));
                2
            }
            other => panic!("unknown generation {other}"),
        }
    }

    /// The child side of [`a_crash_at_every_step_leaves_the_old_or_the_new_generation`]:
    /// does nothing unless started by it.
    #[test]
    fn crash_child() {
        let (Ok(dir), Ok(step)) = (
            std::env::var("WRENN_TEST_CRASH_DIR"),
            std::env::var("WRENN_TEST_CRASH_STEP"),
        ) else {
            return;
        };
        let step: usize = step.parse().unwrap();
        let snap = PathBuf::from(dir);
        let parent = recover(&snap).unwrap().generation.unwrap();
        let mut n = 0usize;
        let mut hook = |s: Step| {
            if n == step {
                eprintln!("crashing at step {n} ({s:?})");
                std::process::exit(CRASH_EXIT);
            }
            n += 1;
        };
        publish_second(&snap, &parent, &mut hook);
    }

    #[test]
    fn a_crash_at_every_step_leaves_the_old_or_the_new_generation() {
        let exe = std::env::current_exe().unwrap();
        let mut seen = [0usize; 3];
        let mut completed = false;
        for step in 0..64 {
            let snap = tmpdir(&format!("crash{step}"));
            publish_first(&snap);
            let st = std::process::Command::new(&exe)
                .args([
                    "snapshot::tests::crash_child",
                    "--exact",
                    "--test-threads=1",
                ])
                .env("WRENN_TEST_CRASH_DIR", &snap)
                .env("WRENN_TEST_CRASH_STEP", step.to_string())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .unwrap();
            let r = recover(&snap).unwrap();
            let g = r.generation.expect("a generation survives every crash");
            let which = check_consistent(&g);
            seen[which as usize] += 1;
            // Nothing incomplete is left, and the next pause starts after the survivor.
            let names: Vec<String> = fs::read_dir(&snap)
                .unwrap()
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(GEN_PREFIX))
                .collect();
            assert_eq!(names, vec![gen_name(g.seq)], "step {step}");
            let p = Publish::begin(&snap, &mut no_hook).unwrap();
            assert_eq!(p.seq(), g.seq + 1);
            p.abandon();
            fs::remove_dir_all(&snap).unwrap();
            match st.code() {
                Some(CRASH_EXIT) => {}
                Some(0) => {
                    assert_eq!(which, 2, "a completed publish yields the new generation");
                    completed = true;
                    break;
                }
                other => panic!("child failed at step {step}: {other:?}"),
            }
        }
        eprintln!(
            "crash steps: {} kept the old generation, {} the new",
            seen[1], seen[2]
        );
        assert!(completed, "the publish has fewer than 64 steps");
        assert!(seen[1] >= 5 && seen[2] >= 2, "steps seen {seen:?}");
    }

    #[test]
    fn legacy_layout_is_read_and_a_publish_replaces_it() {
        let snap = tmpdir("legacy");
        let id = BuildId([0xA1; 16]);
        let header = Header::from_base(PAGES * BLOCK_SIZE, id, &data_diff(0, PAGES)).unwrap();
        fs::write(snap.join(HEADER_NAME), header.serialize()).unwrap();
        fs::write(snap.join(VMSTATE_NAME), format!("cpu {id}")).unwrap();
        fs::write(
            snap.join(id.layer_file_name()),
            vec![0xA1; (PAGES * BLOCK_SIZE) as usize],
        )
        .unwrap();
        let g = recover(&snap).unwrap().generation.unwrap();
        assert!(g.legacy);
        assert_eq!(g.dir, snap);
        let mut page = vec![0u8; BLOCK_SIZE as usize];
        read_page(&g, &header, 0, &mut page).unwrap();
        assert_eq!(page[0], 0xA1);
        let g2 = publish_second(&snap, &g, &mut no_hook);
        assert_eq!(check_consistent(&g2), 2);
        assert!(!snap.join(HEADER_NAME).exists());
        assert!(!snap.join(id.layer_file_name()).exists());
        assert_eq!(newest(&snap).unwrap(), Some(g2.clone()));
        assert_eq!(recover(&snap).unwrap().generation, Some(g2));
        fs::remove_dir_all(&snap).unwrap();
    }

    #[test]
    fn a_generation_that_does_not_check_out_falls_back_to_the_previous() {
        let snap = tmpdir("corrupt");
        let g1 = publish_first(&snap);
        // Keep gen 1 (publish_second would remove it): build gen 2 by hand.
        let keep = snap.join("keep");
        fs::create_dir(&keep).unwrap();
        for e in fs::read_dir(&g1.dir).unwrap().flatten() {
            fs::copy(e.path(), keep.join(e.file_name())).unwrap();
        }
        let g2 = publish_second(&snap, &g1, &mut no_hook);
        assert_eq!(g2.seq, 2);
        fs::rename(&keep, &g1.dir).unwrap();
        // The VM state of gen 2 is damaged: recovery takes gen 1 and removes gen 2.
        fs::write(g2.vmstate(), "cpu damaged").unwrap();
        let r = recover(&snap).unwrap();
        assert_eq!(r.generation, Some(g1.clone()));
        assert_eq!(r.removed, vec![g2.dir.clone()]);
        // A manifest with an unknown key is refused too.
        let m = fs::read_to_string(g1.dir.join(MANIFEST_NAME)).unwrap();
        fs::write(g1.dir.join(MANIFEST_NAME), format!("{m}extra=1\n")).unwrap();
        assert!(matches!(
            verify(&g1.dir, g1.seq),
            Err(Error::Invalid { .. })
        ));
        fs::remove_dir_all(&snap).unwrap();
    }

    /// Layers of the squash test: each larger than the squash's memory limit.
    const SQUASH_LAYER_BYTES: u64 = 2 * crate::limits::SQUASH_MEMORY_MAX;
    const SQUASH_LAYERS: u64 = 9;

    fn rss_anon_kib() -> u64 {
        let s = fs::read_to_string("/proc/self/status").unwrap();
        s.lines()
            .find_map(|l| l.strip_prefix("RssAnon:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }

    /// The child side of [`squash_memory_is_bounded_whatever_the_layer_sizes`]: squashes the
    /// prepared generation (streaming, or reading every layer into memory as the agent did
    /// before) while a thread samples `RssAnon`; prints the peak growth.
    #[test]
    fn squash_child() {
        let (Ok(dir), Ok(mode)) = (
            std::env::var("WRENN_TEST_SQUASH_DIR"),
            std::env::var("WRENN_TEST_SQUASH_MODE"),
        ) else {
            return;
        };
        let tmp = PathBuf::from(dir);
        let header = Header::parse(&fs::read(tmp.join(HEADER_NAME)).unwrap()).unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let base = rss_anon_kib();
        let s2 = stop.clone();
        let sampler = std::thread::spawn(move || {
            let mut peak = 0;
            while !s2.load(std::sync::atomic::Ordering::SeqCst) {
                peak = peak.max(rss_anon_kib());
                std::thread::sleep(std::time::Duration::from_micros(200));
            }
            peak.max(rss_anon_kib())
        });
        let id = BuildId([0x5C; 16]);
        let mut p = Publish {
            snap: tmp.parent().unwrap().to_owned(),
            seq: 1,
            tmp: tmp.clone(),
            layers: Vec::new(),
            files: Vec::new(),
        };
        let squashed = if mode == "stream" {
            p.squash(&header, id, &mut no_hook).unwrap()
        } else {
            let mut all = std::collections::HashMap::new();
            for l in &header.layers {
                all.insert(
                    l.build_id,
                    fs::read(tmp.join(l.build_id.layer_file_name())).unwrap(),
                );
            }
            let mut w = p.layer_writer(id).unwrap();
            let h = crate::header::squash(&header, &all, &mut w, id).unwrap();
            p.layer_done(w, &mut no_hook).unwrap();
            h
        };
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let peak = sampler.join().unwrap();
        fs::write(tmp.join("squashed.header"), squashed.serialize()).unwrap();
        println!("peak_anon_growth_kib={}", peak.saturating_sub(base));
    }

    #[test]
    fn squash_memory_is_bounded_whatever_the_layer_sizes() {
        let snap = tmpdir("squash");
        let tmp = snap.join("gen-00000000000000000001.tmp");
        fs::create_dir(&tmp).unwrap();
        let memory = SQUASH_LAYERS * SQUASH_LAYER_BYTES;
        // Layer i holds range i, filled with byte i + 1.
        let mut header: Option<Header> = None;
        for i in 0..SQUASH_LAYERS {
            let id = BuildId([i as u8 + 1; 16]);
            fs::write(
                tmp.join(id.layer_file_name()),
                vec![i as u8 + 1; SQUASH_LAYER_BYTES as usize],
            )
            .unwrap();
            let mut diff = data_diff(i * SQUASH_LAYER_BYTES, SQUASH_LAYER_BYTES / BLOCK_SIZE);
            header = Some(match header {
                None => {
                    diff.extents.push(DiffExtent {
                        offset: SQUASH_LAYER_BYTES,
                        length: memory - SQUASH_LAYER_BYTES,
                        kind: DiffKind::Zero,
                    });
                    Header::from_base(memory, id, &diff).unwrap()
                }
                Some(h) => h.merge(&diff, id).unwrap(),
            });
        }
        let header = header.unwrap();
        assert!(header.needs_squash());
        fs::write(tmp.join(HEADER_NAME), header.serialize()).unwrap();
        let exe = std::env::current_exe().unwrap();
        let run = |mode: &str| -> u64 {
            let out = std::process::Command::new(&exe)
                .args(["snapshot::tests::squash_child", "--exact", "--nocapture"])
                .env("WRENN_TEST_SQUASH_DIR", &tmp)
                .env("WRENN_TEST_SQUASH_MODE", mode)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            text.lines()
                .find_map(|l| l.strip_prefix("peak_anon_growth_kib="))
                .unwrap_or_else(|| panic!("no peak in {text:?}"))
                .parse::<u64>()
                .unwrap()
                * 1024
        };
        let all_bytes = SQUASH_LAYERS * SQUASH_LAYER_BYTES;
        // Reading every layer (the agent before): the heap holds them all.
        let read_all = run("read_all");
        assert!(read_all >= all_bytes / 2, "read_all grew {read_all} bytes");
        let stream = run("stream");
        eprintln!(
            "squash of {all_bytes} bytes in {SQUASH_LAYERS} layers: peak RssAnon growth \
             streaming {stream} bytes, reading every layer {read_all} bytes"
        );
        assert!(
            stream <= crate::limits::SQUASH_MEMORY_MAX,
            "streaming squash grew RssAnon by {stream} bytes"
        );
        // The squashed header reads every byte as before, from its one layer.
        let sq = Header::parse(&fs::read(tmp.join("squashed.header")).unwrap()).unwrap();
        assert_eq!(sq.layers.len(), 1);
        let g = Generation {
            dir: tmp.clone(),
            seq: 1,
            legacy: false,
        };
        let (mut a, mut b) = (
            vec![0u8; BLOCK_SIZE as usize],
            vec![0u8; BLOCK_SIZE as usize],
        );
        for i in 0..SQUASH_LAYERS {
            for off in [
                i * SQUASH_LAYER_BYTES,
                (i + 1) * SQUASH_LAYER_BYTES - BLOCK_SIZE,
            ] {
                read_page(&g, &header, off, &mut a).unwrap();
                read_page(&g, &sq, off, &mut b).unwrap();
                assert_eq!(a, b);
                assert!(b.iter().all(|&x| x == i as u8 + 1));
            }
        }
        fs::remove_dir_all(&snap).unwrap();
    }

    #[test]
    fn materialize_writes_every_data_extent_and_leaves_zeros_as_holes() {
        let snap = tmpdir("materialize");
        let g1 = publish_first(&snap);
        let g2 = publish_second(&snap, &g1, &mut no_hook);
        let header = Header::parse(&fs::read(g2.header()).unwrap()).unwrap();
        let out = snap.join("memory");
        let f = File::options()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&out)
            .unwrap();
        materialize(&header, std::slice::from_ref(&g2.dir), &f).unwrap();
        let mem = fs::read(&out).unwrap();
        assert_eq!(mem.len() as u64, PAGES * BLOCK_SIZE);
        for p in 0..PAGES {
            let want = if p == 2 || p == 3 { 0xB2 } else { 0xA1 };
            let page = &mem[(p * BLOCK_SIZE) as usize..((p + 1) * BLOCK_SIZE) as usize];
            assert!(page.iter().all(|&b| b == want), "page {p}");
        }
        // A layer that is nowhere is a typed error.
        let err = materialize(&header, &[snap.join("nowhere")], &f).unwrap_err();
        assert!(matches!(err, Error::Invalid { .. }), "{err}");
        fs::remove_dir_all(&snap).unwrap();
    }
}
