//! `envd selftest`: does this machine corrupt bytes that are copied, and where?
//!
//! A file uploaded into a guest once came back with 16-byte runs of zeros, and so did the
//! output of `cat` (issue 12, item 17): something between the client and the disk changed
//! bytes. The nested hypervisor of the test hosts is the first suspect; this test, run inside
//! a guest, tells which kind of copy goes wrong, by copying known pseudo-random bytes each way
//! and comparing the result with the source:
//!
//! - `memcpy`: user-space copies only (no system call on the data), on several threads at
//!   once with a yield after every chunk, so the copies are interrupted by context switches.
//! - `envd-path`: the way envd handles an upload and a download, with its chunk size: the
//!   bytes cross a Unix socket in chunk-sized writes, are read into a chunk buffer and copied
//!   into a message buffer (`received`), written through envd's atomic writer (write(2),
//!   fsync, rename), then read back twice through envd's reader in chunk-sized buffers.
//! - `kernel-copy`: copy_file_range(2) and then sendfile(2) of the stored file into new
//!   files: the kernel copies, no user-space buffer holds the bytes. They are read back twice.
//! - `process-pipe`: the bytes through `/bin/cat` (stdin and stdout pipes, read in chunks as
//!   envd reads a process's output), as `wrenn sandbox exec -- cat FILE` moves them.
//!
//! Every read-back is done twice: a difference the two reads share is in the file
//! (`stored`: it went wrong on the way in); one only a single read shows went wrong while
//! reading (`read`). A kernel copy is blamed only for differences its source did not have.
//! The verdict names the kinds that corrupted; the exit status is 1 when any did.

#![forbid(unsafe_code)]

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::fs::{self as efs, AtomicWriter, KernelCopy, WriteOptions};
use crate::limits::{
    OUTPUT_CHUNK_LEN, SELFTEST_MIB_MAX, SELFTEST_RUNS_SHOWN, SELFTEST_THREADS_MAX,
};
use crate::passwd::{Db, User};

pub const USAGE: &str = "usage: envd selftest [--dir DIR] [--mib N] [--rounds N] [--threads N]
  --dir DIR      where the test files go (default /tmp); they are removed afterwards
  --mib N        bytes per round, in MiB (default 32)
  --rounds N     rounds, each with new bytes (default 4)
  --threads N    threads copying at once in the memcpy case (default 2)
Prints one line per case and stage, the first differing runs, and a verdict; exit status 0
when nothing was corrupted, 1 when something was, 2 on a usage or I/O error.";

/// What to run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Options {
    pub dir: PathBuf,
    pub mib: u64,
    pub rounds: u32,
    pub threads: u32,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            dir: PathBuf::from("/tmp"),
            mib: 32,
            rounds: 4,
            threads: 2,
        }
    }
}

/// Parses the arguments after `selftest`.
pub fn parse(args: &[String]) -> Result<Options, String> {
    let mut o = Options::default();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{a} needs a value\n{USAGE}"))
        };
        let number = |v: String, max: u64| -> Result<u64, String> {
            match v.parse::<u64>() {
                Ok(n) if (1..=max).contains(&n) => Ok(n),
                _ => Err(format!("{a} {v}: expected 1..={max}\n{USAGE}")),
            }
        };
        match a.as_str() {
            "--dir" => o.dir = PathBuf::from(value()?),
            "--mib" => o.mib = number(value()?, SELFTEST_MIB_MAX)?,
            "--rounds" => o.rounds = number(value()?, 1000)? as u32,
            "--threads" => o.threads = number(value()?, SELFTEST_THREADS_MAX as u64)? as u32,
            "-h" | "--help" => return Err(USAGE.to_string()),
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    Ok(o)
}

/// A run of bytes that differ from the source.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    pub offset: u64,
    pub len: u64,
    /// Every byte of the run reads as zero.
    pub zeros: bool,
}

/// Differing runs found by one comparison, bounded: every run is counted, the first
/// [`SELFTEST_RUNS_SHOWN`] are kept.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Runs {
    pub kept: Vec<Run>,
    pub count: u64,
    pub bytes: u64,
}

impl Runs {
    fn add(&mut self, r: Run) {
        self.count += 1;
        self.bytes += r.len;
        if self.kept.len() < SELFTEST_RUNS_SHOWN {
            self.kept.push(r);
        }
    }

    fn extend(&mut self, other: Runs) {
        self.count += other.count;
        self.bytes += other.bytes;
        for r in other.kept {
            if self.kept.len() < SELFTEST_RUNS_SHOWN {
                self.kept.push(r);
            }
        }
    }

    /// The runs of `self` that `other` does not have (same offset and length).
    fn without(&self, other: &Runs) -> Runs {
        let mut out = Runs::default();
        for r in &self.kept {
            if !other
                .kept
                .iter()
                .any(|o| o.offset == r.offset && o.len == r.len)
            {
                out.add(*r);
            }
        }
        // Runs beyond the kept ones cannot be matched: count them as they are.
        let unmatched = self.count.saturating_sub(self.kept.len() as u64);
        out.count += unmatched;
        out
    }
}

/// The runs where `got` differs from `want`; `base` is the offset of their first byte.
pub fn diff(base: u64, want: &[u8], got: &[u8], out: &mut Runs) {
    let n = want.len().min(got.len());
    let mut i = 0;
    while i < n {
        if want[i] == got[i] {
            i += 1;
            continue;
        }
        let start = i;
        while i < n && want[i] != got[i] {
            i += 1;
        }
        out.add(Run {
            offset: base + start as u64,
            len: (i - start) as u64,
            zeros: got[start..i].iter().all(|&b| b == 0),
        });
    }
    if want.len() != got.len() {
        let (short, long) = (n, want.len().max(got.len()));
        out.add(Run {
            offset: base + short as u64,
            len: (long - short) as u64,
            zeros: false,
        });
    }
}

/// Deterministic pseudo-random bytes (xorshift64), different per seed.
pub fn fill(seed: u64, buf: &mut [u8]) {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for w in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        w.copy_from_slice(&b[..w.len()]);
    }
}

/// The result of one stage of one case over every round.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stage {
    pub case: &'static str,
    pub stage: &'static str,
    pub bytes: u64,
    pub runs: Runs,
}

/// Everything one run of the self-test found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    pub stages: Vec<Stage>,
}

impl Report {
    fn stage(&mut self, case: &'static str, stage: &'static str) -> &mut Stage {
        if let Some(i) = self
            .stages
            .iter()
            .position(|s| s.case == case && s.stage == stage)
        {
            return &mut self.stages[i];
        }
        self.stages.push(Stage {
            case,
            stage,
            bytes: 0,
            runs: Runs::default(),
        });
        let last = self.stages.len() - 1;
        &mut self.stages[last]
    }

    fn record(&mut self, case: &'static str, stage: &'static str, bytes: u64, runs: Runs) {
        let s = self.stage(case, stage);
        s.bytes += bytes;
        s.runs.extend(runs);
    }

    /// The kinds of copy that corrupted, in a fixed order; empty when none did.
    pub fn corrupted(&self) -> Vec<&'static str> {
        let bad = |case: &str, stages: &[&str]| {
            self.stages
                .iter()
                .any(|s| s.case == case && stages.contains(&s.stage) && s.runs.count > 0)
        };
        let mut out = Vec::new();
        if bad("memcpy", &["copy"]) || bad("envd-path", &["received"]) {
            out.push("user-space-copy");
        }
        if bad("envd-path", &["stored"]) {
            out.push("user-space-write");
        }
        if bad("kernel-copy", &["copy_file_range", "sendfile"]) {
            out.push("kernel-copy");
        }
        if bad("process-pipe", &["output"]) {
            out.push("process-output");
        }
        if self
            .stages
            .iter()
            .any(|s| s.stage.starts_with("read") && s.runs.count > 0)
        {
            out.push("read");
        }
        out
    }

    /// The report as text: a line per stage, its first runs, and the verdict.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for s in &self.stages {
            out.push_str(&format!(
                "selftest case={} stage={} bytes={} runs={} bad_bytes={}\n",
                s.case, s.stage, s.bytes, s.runs.count, s.runs.bytes
            ));
            for r in &s.runs.kept {
                out.push_str(&format!(
                    "selftest   run case={} stage={} offset={} len={} zeros={}\n",
                    s.case, s.stage, r.offset, r.len, r.zeros
                ));
            }
        }
        let bad = self.corrupted();
        if bad.is_empty() {
            out.push_str("selftest verdict=clean\n");
        } else {
            out.push_str(&format!(
                "selftest verdict=corrupted kinds={}\n",
                bad.join(",")
            ));
        }
        out
    }
}

fn io_error(action: &str, path: &Path, e: io::Error) -> efs::Error {
    efs::Error::from_io(action, path, e)
}

/// The user the files are written as: whoever runs the test.
fn me() -> Result<User, efs::Error> {
    let uid = std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m))
        .map_err(|e| io_error("stat", Path::new("/proc/self"), e))?;
    let db = Db::load(Path::new("/")).unwrap_or_default();
    db.user(&uid.to_string())
        .map_err(|e| efs::Error::new(efs::ErrorKind::Other, format!("resolve uid {uid}: {e}")))
}

/// Runs every case; `log` gets a line as each round ends.
pub fn run(opts: &Options, log: &mut dyn Write) -> Result<Report, efs::Error> {
    let user = me()?;
    let len = (opts.mib << 20) as usize;
    let mut report = Report::default();
    let mut src = vec![0u8; len];
    for round in 0..opts.rounds {
        let t = Instant::now();
        fill(u64::from(round) + 1, &mut src);
        memcpy_case(&src, opts.threads, &mut report);
        let stored = envd_path_case(&opts.dir, &user, &src, &mut report)?;
        let r = kernel_copy_case(&opts.dir, &stored, &src, &mut report);
        let _ = std::fs::remove_file(&stored.path);
        r?;
        pipe_case(&src, &mut report)?;
        let _ = writeln!(
            log,
            "selftest round={round} mib={} took_ms={} corrupted={:?}",
            opts.mib,
            t.elapsed().as_millis(),
            report.corrupted()
        );
    }
    Ok(report)
}

/// User-space copies only: chunk by chunk through a fresh buffer (as a decoder copies a
/// message's bytes), on `threads` threads at once, yielding after each chunk.
fn memcpy_case(src: &[u8], threads: u32, report: &mut Report) {
    let results: Vec<Runs> = std::thread::scope(|sc| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                sc.spawn(|| {
                    let mut dst = vec![0u8; src.len()];
                    for (i, chunk) in src.chunks(OUTPUT_CHUNK_LEN).enumerate() {
                        let tmp = chunk.to_vec();
                        let at = i * OUTPUT_CHUNK_LEN;
                        dst[at..at + tmp.len()].copy_from_slice(&tmp);
                        std::thread::yield_now();
                    }
                    let mut runs = Runs::default();
                    diff(0, src, &dst, &mut runs);
                    runs
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_default())
            .collect()
    });
    for runs in results {
        report.record("memcpy", "copy", src.len() as u64, runs);
    }
}

/// A file written by a case, with the runs its two read-backs agreed on.
struct Stored {
    path: PathBuf,
    runs: Runs,
}

/// envd's upload and download: socket -> chunk buffer -> message buffer -> atomic write;
/// then two read-backs through envd's reader.
fn envd_path_case(
    dir: &Path,
    user: &User,
    src: &[u8],
    report: &mut Report,
) -> Result<Stored, efs::Error> {
    let target = dir.join(format!("envd-selftest-{}.bin", std::process::id()));
    let (mut tx, mut rx) =
        UnixStream::pair().map_err(|e| io_error("socketpair", Path::new(""), e))?;
    let mut writer = AtomicWriter::create(user, &target, WriteOptions::default())?;
    let mut received = Runs::default();
    let sent = std::thread::scope(|sc| -> Result<(), efs::Error> {
        let sender = sc.spawn(move || -> io::Result<()> {
            for chunk in src.chunks(OUTPUT_CHUNK_LEN) {
                tx.write_all(chunk)?;
            }
            Ok(())
        });
        let mut buf = vec![0u8; OUTPUT_CHUNK_LEN];
        let mut at = 0usize;
        while at < src.len() {
            let want = OUTPUT_CHUNK_LEN.min(src.len() - at);
            rx.read_exact(&mut buf[..want])
                .map_err(|e| io_error("read the socket", Path::new(""), e))?;
            let message = buf[..want].to_vec();
            diff(at as u64, &src[at..at + want], &message, &mut received);
            writer.write(&message)?;
            at += want;
        }
        match sender.join() {
            Ok(r) => r.map_err(|e| io_error("write the socket", Path::new(""), e)),
            Err(_) => Err(efs::Error::new(
                efs::ErrorKind::Other,
                "the socket writer panicked".into(),
            )),
        }
    });
    sent?;
    report.record("envd-path", "received", src.len() as u64, received);
    writer.commit()?;
    let stored = read_back_twice(user, &target, src, "envd-path", report)?;
    Ok(Stored {
        path: target,
        runs: stored,
    })
}

/// Reads `path` twice through envd's reader and records the differences: those both reads
/// share as `stored`, the others as `read`. Returns the stored ones.
fn read_back_twice(
    user: &User,
    path: &Path,
    src: &[u8],
    case: &'static str,
    report: &mut Report,
) -> Result<Runs, efs::Error> {
    let mut passes = Vec::new();
    for _ in 0..2 {
        let mut r = efs::open_read(user, path, 0, None)?;
        let mut buf = vec![0u8; OUTPUT_CHUNK_LEN];
        let mut runs = Runs::default();
        let mut at = 0usize;
        loop {
            let n = r.read_chunk(&mut buf)?;
            if n == 0 {
                break;
            }
            let end = (at + n).min(src.len());
            diff(at as u64, &src[at..end], &buf[..n], &mut runs);
            at += n;
        }
        if at < src.len() {
            runs.add(Run {
                offset: at as u64,
                len: (src.len() - at) as u64,
                zeros: false,
            });
        }
        passes.push(runs);
    }
    let (a, b) = (&passes[0], &passes[1]);
    let only_a = a.without(b);
    let only_b = b.without(a);
    let stored = a.without(&only_a);
    let mut transient = only_a;
    transient.extend(only_b);
    report.record(case, "stored", src.len() as u64, stored.clone());
    report.record(case, "read", 2 * src.len() as u64, transient);
    Ok(stored)
}

/// Kernel-only copies of the stored file: copy_file_range into one new file, sendfile of
/// that into another. Each is read back twice; differences its source did not have are the
/// copy's.
fn kernel_copy_case(
    dir: &Path,
    source: &Stored,
    src: &[u8],
    report: &mut Report,
) -> Result<(), efs::Error> {
    let user = me()?;
    let mut from_path = source.path.clone();
    let mut from_runs = source.runs.clone();
    for (how, name) in [
        (KernelCopy::CopyFileRange, "copy_file_range"),
        (KernelCopy::Sendfile, "sendfile"),
    ] {
        let to_path = dir.join(format!("envd-selftest-{}-{name}.bin", std::process::id()));
        let result = (|| -> Result<Runs, efs::Error> {
            let from = File::open(&from_path).map_err(|e| io_error("open", &from_path, e))?;
            let to = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&to_path)
                .map_err(|e| io_error("create", &to_path, e))?;
            let n = efs::kernel_copy(&from, &to, src.len() as u64, how)
                .map_err(|e| io_error(name, &to_path, e))?;
            if n != src.len() as u64 {
                return Err(efs::Error::new(
                    efs::ErrorKind::Other,
                    format!("{name}: copied {n} of {} bytes", src.len()),
                ));
            }
            to.sync_all().map_err(|e| io_error("fsync", &to_path, e))?;
            let mut scratch = Report::default();
            let stored = read_back_twice(&user, &to_path, src, "kernel-copy", &mut scratch)?;
            for s in scratch.stages {
                let stage = if s.stage == "stored" { name } else { "read" };
                let runs = if s.stage == "stored" {
                    s.runs.without(&from_runs)
                } else {
                    s.runs
                };
                report.record("kernel-copy", stage, s.bytes, runs);
            }
            Ok(stored)
        })();
        if from_path != source.path {
            let _ = std::fs::remove_file(&from_path);
        }
        match result {
            Ok(runs) => {
                from_path = to_path;
                from_runs = runs;
            }
            Err(e) => {
                let _ = std::fs::remove_file(&to_path);
                return Err(e);
            }
        }
    }
    let _ = std::fs::remove_file(&from_path);
    Ok(())
}

/// The program the process-pipe case runs (skipped when the image has none).
const CAT: &str = "/bin/cat";

/// A process's output: the bytes through `cat`'s stdin and stdout, read in envd's chunk size.
fn pipe_case(src: &[u8], report: &mut Report) -> Result<(), efs::Error> {
    use std::process::{Command, Stdio};
    let fail = |action: &str, e: io::Error| io_error(action, Path::new(CAT), e);
    let mut child = match Command::new(CAT)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
    {
        Ok(c) => c,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(fail("run", e)),
    };
    let (Some(mut stdin), Some(mut stdout)) = (child.stdin.take(), child.stdout.take()) else {
        let _ = child.kill();
        let _ = child.wait();
        return Err(efs::Error::new(
            efs::ErrorKind::Other,
            "cat has no pipes".into(),
        ));
    };
    let mut runs = Runs::default();
    let result = std::thread::scope(|sc| -> Result<(), efs::Error> {
        let feeder = sc.spawn(move || -> io::Result<()> {
            for chunk in src.chunks(OUTPUT_CHUNK_LEN) {
                stdin.write_all(chunk)?;
            }
            Ok(())
        });
        let mut buf = vec![0u8; OUTPUT_CHUNK_LEN];
        let mut at = 0usize;
        loop {
            let n = match stdout.read(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(fail("read the output of", e)),
            };
            if n == 0 {
                break;
            }
            let end = (at + n).min(src.len());
            diff(at as u64, &src[at..end], &buf[..n], &mut runs);
            at += n;
        }
        if at < src.len() {
            runs.add(Run {
                offset: at as u64,
                len: (src.len() - at) as u64,
                zeros: false,
            });
        }
        match feeder.join() {
            Ok(r) => r.map_err(|e| fail("write the input of", e)),
            Err(_) => Err(efs::Error::new(
                efs::ErrorKind::Other,
                "the pipe feeder panicked".into(),
            )),
        }
    });
    let _ = child.wait();
    result?;
    report.record("process-pipe", "output", src.len() as u64, runs);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Result<Options, String> {
        parse(&a.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn flags() {
        assert_eq!(args(&[]).unwrap(), Options::default());
        let o = args(&[
            "--dir",
            "/d",
            "--mib",
            "3",
            "--rounds",
            "2",
            "--threads",
            "4",
        ])
        .unwrap();
        assert_eq!(
            (o.dir, o.mib, o.rounds, o.threads),
            (PathBuf::from("/d"), 3, 2, 4)
        );
        for bad in [
            &["--mib", "0"][..],
            &["--mib", "x"],
            &["--mib", "99999999"],
            &["--threads", "1000"],
            &["--rounds"],
            &["--bogus"],
        ] {
            assert!(args(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn diff_finds_runs_and_zeros() {
        let want: Vec<u8> = (1..=100u8).collect();
        let mut got = want.clone();
        got[10..26].fill(0);
        got[50] ^= 0xff;
        let mut runs = Runs::default();
        diff(1000, &want, &got, &mut runs);
        assert_eq!(
            runs.kept,
            [
                Run {
                    offset: 1010,
                    len: 16,
                    zeros: true
                },
                Run {
                    offset: 1050,
                    len: 1,
                    zeros: false
                },
            ]
        );
        assert_eq!((runs.count, runs.bytes), (2, 17));
        let mut short = Runs::default();
        diff(0, &want, &want[..90], &mut short);
        assert_eq!(
            short.kept,
            [Run {
                offset: 90,
                len: 10,
                zeros: false
            }]
        );
        // Bounded: every run counted, the first ones kept.
        let mut many = Runs::default();
        let alt: Vec<u8> = want
            .iter()
            .enumerate()
            .map(|(i, &b)| if i % 2 == 0 { !b } else { b })
            .collect();
        diff(0, &want, &alt, &mut many);
        assert_eq!(many.count, 50);
        assert_eq!(many.kept.len(), SELFTEST_RUNS_SHOWN.min(50));
    }

    #[test]
    fn clean_machine_reports_clean() {
        let dir = std::env::temp_dir().join(format!("envd-selftest-unit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let opts = Options {
            dir: dir.clone(),
            mib: 2,
            rounds: 2,
            threads: 2,
        };
        let mut log = Vec::new();
        let report = run(&opts, &mut log).unwrap();
        let text = report.render();
        assert!(text.ends_with("selftest verdict=clean\n"), "{text}");
        for (case, stage) in [
            ("memcpy", "copy"),
            ("envd-path", "received"),
            ("envd-path", "stored"),
            ("envd-path", "read"),
            ("kernel-copy", "copy_file_range"),
            ("kernel-copy", "sendfile"),
            ("kernel-copy", "read"),
            ("process-pipe", "output"),
        ] {
            let s = report
                .stages
                .iter()
                .find(|s| s.case == case && s.stage == stage)
                .unwrap_or_else(|| panic!("no {case}/{stage} in {text}"));
            assert!(
                s.bytes >= 4 << 20,
                "{case}/{stage} checked {} bytes",
                s.bytes
            );
        }
        assert_eq!(String::from_utf8(log).unwrap().lines().count(), 2);
        // Nothing left behind.
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The comparison itself can fail: a corrupted stored file shows as `stored` (both reads
    /// agree), and a copy that only repeats its source's damage is not blamed.
    #[test]
    fn corruption_is_found_and_attributed() {
        let dir = std::env::temp_dir().join(format!("envd-selftest-bad-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let user = me().unwrap();
        let mut src = vec![0u8; 300_000];
        fill(9, &mut src);
        let path = dir.join("damaged");
        let mut damaged = src.clone();
        damaged[70_000..70_016].fill(0);
        std::fs::write(&path, &damaged).unwrap();
        let mut report = Report::default();
        let stored = read_back_twice(&user, &path, &src, "envd-path", &mut report).unwrap();
        assert_eq!(
            stored.kept,
            [Run {
                offset: 70_000,
                len: 16,
                zeros: true
            }]
        );
        let source = Stored {
            path: path.clone(),
            runs: stored,
        };
        kernel_copy_case(&dir, &source, &src, &mut report).unwrap();
        assert_eq!(
            report.corrupted(),
            ["user-space-write"],
            "{}",
            report.render()
        );
        assert!(report
            .render()
            .contains("verdict=corrupted kinds=user-space-write"));
        assert!(report
            .render()
            .contains("run case=envd-path stage=stored offset=70000 len=16 zeros=true"));
        // A copy that adds damage of its own is blamed.
        let mut r2 = Report::default();
        let pristine = Stored {
            path: path.clone(),
            runs: Runs::default(),
        };
        std::fs::write(&path, &damaged).unwrap();
        kernel_copy_case(&dir, &pristine, &src, &mut r2).unwrap();
        assert!(r2.corrupted().contains(&"kernel-copy"), "{}", r2.render());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
