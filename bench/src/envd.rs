//! envd cases: exec round trip against a direct spawn of the same command, and file
//! transfer through envd against a local copy of the same bytes. envd runs as its own
//! process (the `envd` binary next to this one, or this binary re-executed as envd).
//! `envd_exec` alternates the two one iteration each (`measure_interleaved`), so both meet
//! the same load on this shared machine.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use proto::gen::wrenn::envd::v1 as pb;
use proto::rpc::{Bytes, CallOpts, Client, Credential};

use crate::harness::{
    latency_line, measure, measure_interleaved, metric_line, rss_kib, throughput_line, Case, Goal,
    Opts,
};
use crate::rpc::TempDir;

pub fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "envd_exec",
            run: envd_exec,
        },
        Case {
            name: "envd_file",
            run: envd_file,
        },
    ]
}

/// The hidden subcommand under which this binary runs envd.
pub const ENVD_SUBCOMMAND: &str = "__envd";

/// Runs envd in this process (`bench __envd <envd flags>`).
pub fn run_envd(args: &[String]) -> Result<(), String> {
    let mut it = args.iter();
    let mut sock = None;
    while let Some(a) = it.next() {
        if a == "--listen-unix" {
            sock = it.next().map(PathBuf::from);
        }
    }
    let sock = sock.ok_or("--listen-unix PATH is required")?;
    envd::daemon::run(envd::daemon::Options {
        listen: envd::daemon::Listen::Unix(sock),
        announce: false,
        announce_unix: None,
        accounts_root: None,
    })
}

struct Envd {
    child: Child,
    _dir: TempDir,
    dir: PathBuf,
    client: Client,
    real_binary: bool,
}

impl Drop for Envd {
    /// SIGTERM, so envd removes its cgroup on the way out; SIGKILL if it takes too long.
    fn drop(&mut self) {
        self.client.close();
        // SAFETY: kill takes plain integers; the pid is our child, not yet reaped.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let t0 = Instant::now();
        while let Ok(None) = self.child.try_wait() {
            if t0.elapsed() > Duration::from_secs(10) {
                let _ = self.child.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.wait();
    }
}

const TOKEN: &str = "bench-token";

fn start_envd() -> Result<Envd, String> {
    let dir = TempDir::new("envd")?;
    let sock = dir.0.join("envd.sock");
    let me = std::env::current_exe().map_err(|e| e.to_string())?;
    let real = me.with_file_name("envd");
    let real_binary = real.exists();
    let mut cmd = if real_binary {
        Command::new(&real)
    } else {
        let mut c = Command::new(&me);
        c.arg(ENVD_SUBCOMMAND);
        c
    };
    let child = cmd
        .args([
            "--listen-unix".as_ref(),
            sock.as_os_str(),
            "--no-announce".as_ref(),
        ])
        .env("WRENN_LOG", "warn")
        .stdin(Stdio::null())
        .spawn()
        .map_err(|e| format!("start envd: {e}"))?;
    let t0 = Instant::now();
    while !sock.exists() {
        if t0.elapsed() > Duration::from_secs(10) {
            return Err("envd did not start".into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let c = Client::connect_unix(&sock, Credential::none()).map_err(|e| e.to_string())?;
    let _: pb::InitResponse = c
        .unary(
            pb::init_methods::INIT,
            &pb::InitRequest {
                access_token: TOKEN.into(),
                ..Default::default()
            },
            Some(Duration::from_secs(10)),
        )
        .map_err(|e| e.to_string())?;
    let client =
        Client::connect_unix(&sock, Credential::access_token(TOKEN)).map_err(|e| e.to_string())?;
    let path = dir.0.clone();
    Ok(Envd {
        child,
        _dir: dir,
        dir: path,
        client,
        real_binary,
    })
}

fn exec_true(c: &Client) -> Result<(), String> {
    let cfg = pb::ProcessConfig {
        cmd: "/bin/true".into(),
        ..Default::default()
    };
    let mut s = c
        .call(
            pb::process_methods::START,
            &pb::StartRequest { process: Some(cfg) },
            CallOpts {
                timeout: None,
                end_stream: true,
            },
        )
        .map_err(|e| e.to_string())?;
    let mut code = None;
    while let Some(ev) = s.recv::<pb::ProcessEvent>().map_err(|e| e.to_string())? {
        if let Some(pb::process_event::Event::Exited(x)) = ev.event {
            code = x.status;
        }
    }
    match code {
        Some(pb::process_exited::Status::ExitCode(0)) => Ok(()),
        other => Err(format!("true ended with {other:?}")),
    }
}

fn envd_exec(opts: &Opts) -> Result<(), String> {
    let iters = opts.iters(400, 5);
    let e = start_envd()?;
    let idle = rss_kib(e.child.id())?;
    let (base, ours) = measure_interleaved(
        iters,
        || {
            let st = Command::new("/bin/true")
                .status()
                .map_err(|e| e.to_string())?;
            if st.success() {
                Ok(())
            } else {
                Err("true failed".into())
            }
        },
        || exec_true(&e.client),
    )?;
    println!(
        "{}",
        latency_line("envd_exec", &ours, "spawn_wait", &base, Goal::AtMost(1.3))
    );
    if e.real_binary {
        println!(
            "{}",
            metric_line(
                "envd_idle_rss",
                idle as f64 / 1024.0,
                "MiB",
                Goal::AtMost(4.0)
            )
        );
    }
    Ok(())
}

fn write_through(
    c: &Client,
    path: &Path,
    len: usize,
    chunk: &Bytes,
    checked: bool,
) -> Result<(), String> {
    let header = pb::WriteRequest {
        msg: Some(pb::write_request::Msg::Header(pb::WriteHeader {
            path: path.to_string_lossy().into_owned(),
            // What users get by default: temp file, fsync, rename.
            atomic: true,
            ..Default::default()
        })),
    };
    let mut s = c
        .call(pb::filesystem_methods::WRITE, &header, CallOpts::default())
        .map_err(|e| e.to_string())?;
    // The data arm of WriteRequest's oneof is field 2; the payload is sent without a copy.
    let empty = pb::WriteRequest { msg: None };
    let mut crc = crc32fast::Hasher::new();
    for _ in 0..len / chunk.len() {
        if checked {
            crc.update(chunk);
        }
        s.send_payload(&empty, WRITE_DATA_TAG, chunk.clone())
            .map_err(|e| e.to_string())?;
    }
    if checked {
        // What `wrenn file put` sends: envd checks it and reads the file back.
        s.send(&pb::WriteRequest {
            msg: Some(pb::write_request::Msg::Crc32(crc.finalize())),
        })
        .map_err(|e| e.to_string())?;
    }
    s.close_send().map_err(|e| e.to_string())?;
    let _: Option<pb::WriteResponse> = s.recv().map_err(|e| e.to_string())?;
    Ok(())
}

/// Field number of `WriteRequest.data`.
const WRITE_DATA_TAG: u32 = 2;

fn read_through(c: &Client, path: &Path, len: usize) -> Result<(), String> {
    let req = pb::ReadRequest {
        path: path.to_string_lossy().into_owned(),
        ..Default::default()
    };
    let mut r = c
        .call(
            pb::filesystem_methods::READ,
            &req,
            CallOpts {
                timeout: None,
                end_stream: true,
            },
        )
        .map_err(|e| e.to_string())?;
    let mut total = 0;
    while let Some(m) = r.recv::<pb::ReadResponse>().map_err(|e| e.to_string())? {
        total += m.data.len();
    }
    if total != len {
        return Err(format!("read {total} bytes of {len}"));
    }
    Ok(())
}

fn envd_file(opts: &Opts) -> Result<(), String> {
    let len: usize = if opts.quick { 16 << 20 } else { 1 << 30 };
    let iters = opts.iters(3, 1);
    let e = start_envd()?;
    let chunk = Bytes::from(vec![0x42u8; proto::limits::CHUNK_LEN]);
    let src = e.dir.join("src");
    let dst = e.dir.join("dst");
    let through = e.dir.join("through");
    let write = measure(iters, 0, || {
        write_through(&e.client, &through, len, &chunk, false)
    })?;
    let write_checked = measure(iters, 0, || {
        write_through(&e.client, &through, len, &chunk, true)
    })?;
    let read = measure(iters, 0, || read_through(&e.client, &through, len))?;
    std::fs::write(&src, vec![0x42u8; len]).map_err(|e| e.to_string())?;
    // The write baseline is as durable as envd's write (which fsyncs before it answers);
    // the read baseline copies within the page cache, as envd's read is served from it.
    let copy_durable = measure(iters, 0, || {
        let _ = std::fs::remove_file(&dst);
        std::fs::copy(&src, &dst).map_err(|e| e.to_string())?;
        std::fs::File::open(&dst)
            .and_then(|f| f.sync_all())
            .map_err(|e| e.to_string())
    })?;
    let copy = measure(iters, 0, || {
        let _ = std::fs::remove_file(&dst);
        std::fs::copy(&src, &dst)
            .map(|_| ())
            .map_err(|e| e.to_string())
    })?;
    println!(
        "{}",
        throughput_line(
            "envd_file_write",
            &write,
            "local_copy_fsync",
            &copy_durable,
            Goal::AtLeast(0.7)
        )
    );
    println!(
        "{}",
        throughput_line(
            "envd_file_write_checked",
            &write_checked,
            "local_copy_fsync",
            &copy_durable,
            Goal::AtLeast(0.7)
        )
    );
    println!(
        "{}",
        throughput_line(
            "envd_file_read",
            &read,
            "local_copy",
            &copy,
            Goal::AtLeast(0.7)
        )
    );
    Ok(())
}
