//! Running the external build tools: with output passed through, captured, or logged to a
//! file with a progress callback (the kernel build).

use std::collections::VecDeque;
use std::ffi::OsString;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;

use super::limits::ERROR_TAIL_LINES;
use super::{io_err, ImageError};

/// A command line, kept as words so it can be shown in logs and errors.
#[derive(Clone, Debug)]
pub struct Cmd {
    program: String,
    args: Vec<OsString>,
    cwd: Option<PathBuf>,
    env: Vec<(String, String)>,
}

impl Cmd {
    pub fn new(program: &str) -> Self {
        Cmd {
            program: program.to_string(),
            args: Vec::new(),
            cwd: None,
            env: Vec::new(),
        }
    }

    pub fn arg(mut self, a: impl Into<OsString>) -> Self {
        self.args.push(a.into());
        self
    }

    pub fn args<I, S>(mut self, items: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.args.extend(items.into_iter().map(Into::into));
        self
    }

    pub fn cwd(mut self, dir: &Path) -> Self {
        self.cwd = Some(dir.to_path_buf());
        self
    }

    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.env.push((k.to_string(), v.to_string()));
        self
    }

    /// The command as one line, for logs and errors.
    pub fn display(&self) -> String {
        let mut s = self.program.clone();
        for a in &self.args {
            s.push(' ');
            s.push_str(&a.to_string_lossy());
        }
        s
    }

    fn command(&self) -> Command {
        let mut c = Command::new(&self.program);
        c.args(&self.args);
        if let Some(d) = &self.cwd {
            c.current_dir(d);
        }
        for (k, v) in &self.env {
            c.env(k, v);
        }
        c.stdin(Stdio::null());
        c
    }

    fn spawn_err(&self) -> impl FnOnce(std::io::Error) -> ImageError {
        let program = self.program.clone();
        move |source| ImageError::Spawn { program, source }
    }

    /// Runs with the tool's output shown on our stderr (stdout is kept for the result path).
    pub fn run(&self) -> Result<(), ImageError> {
        log::info!("running: {}", self.display());
        let status = self
            .command()
            .stdout(std::io::stderr())
            .stderr(Stdio::inherit())
            .status()
            .map_err(self.spawn_err())?;
        if !status.success() {
            return Err(ImageError::Command {
                command: self.display(),
                status,
                output_tail: String::new(),
            });
        }
        Ok(())
    }

    /// Runs quietly and returns stdout; a failure quotes the end of stderr.
    pub fn output(&self) -> Result<String, ImageError> {
        log::debug!("running: {}", self.display());
        let out = self.command().output().map_err(self.spawn_err())?;
        if !out.status.success() {
            return Err(ImageError::Command {
                command: self.display(),
                status: out.status,
                output_tail: tail(&String::from_utf8_lossy(&out.stderr)),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs with stdout and stderr written to `log_path`, calling `on_line` for every line
    /// (progress); a failure quotes the last lines.
    pub fn run_logged(
        &self,
        log_path: &Path,
        mut on_line: impl FnMut(&str),
    ) -> Result<(), ImageError> {
        log::info!(
            "running: {} (output in {})",
            self.display(),
            log_path.display()
        );
        let mut log_file = fs::File::create(log_path).map_err(io_err("create log", log_path))?;
        let mut child = self
            .command()
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(self.spawn_err())?;
        let (tx, rx) = mpsc::channel::<String>();
        let mut readers = Vec::new();
        // Both pipes are set: spawn() with Stdio::piped() always fills them.
        let pipes: [Option<Box<dyn Read + Send>>; 2] = [
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
        ];
        for pipe in pipes.into_iter().flatten() {
            let tx = tx.clone();
            readers.push(std::thread::spawn(move || {
                for line in BufReader::new(pipe).split(b'\n') {
                    let Ok(line) = line else { break };
                    if tx
                        .send(String::from_utf8_lossy(&line).into_owned())
                        .is_err()
                    {
                        break;
                    }
                }
            }));
        }
        drop(tx);
        let mut last: VecDeque<String> = VecDeque::with_capacity(ERROR_TAIL_LINES);
        let mut log_ok = true;
        for line in rx {
            if log_ok && writeln!(log_file, "{line}").is_err() {
                log::warn!(
                    "write log path={} failed; not logging further",
                    log_path.display()
                );
                log_ok = false;
            }
            on_line(&line);
            if last.len() == ERROR_TAIL_LINES {
                last.pop_front();
            }
            last.push_back(line);
        }
        for r in readers {
            let _ = r.join();
        }
        let status = child.wait().map_err(self.spawn_err())?;
        if !status.success() {
            return Err(ImageError::Command {
                command: self.display(),
                status,
                output_tail: Vec::from(last).join("\n"),
            });
        }
        Ok(())
    }
}

/// The last `ERROR_TAIL_LINES` lines of `text`.
pub fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(ERROR_TAIL_LINES);
    lines[start..].join("\n")
}

/// Finds `program` on PATH or in the sbin directories (root's tools are there and a user's
/// PATH often lacks them).
pub fn find_program(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_and_failures() {
        let out = Cmd::new("sh").args(["-c", "echo hi"]).output().unwrap();
        assert_eq!(out, "hi\n");
        let e = Cmd::new("sh")
            .args(["-c", "echo bad >&2; exit 3"])
            .output()
            .unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.starts_with("sh -c echo bad >&2; exit 3 failed"),
            "{msg}"
        );
        assert!(msg.ends_with("last output:\nbad"), "{msg}");
        let e = Cmd::new("/nonexistent/tool").output().unwrap_err();
        assert!(matches!(e, ImageError::Spawn { .. }));
    }

    #[test]
    fn run_logged_sees_both_streams_and_keeps_a_tail() {
        let dir = std::env::temp_dir().join(format!("wrenn-cmd-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let log = dir.join("log");
        let mut seen = Vec::new();
        Cmd::new("sh")
            .args(["-c", "echo out; echo err >&2"])
            .run_logged(&log, |l| seen.push(l.to_string()))
            .unwrap();
        seen.sort();
        assert_eq!(seen, ["err", "out"]);
        assert_eq!(fs::read_to_string(&log).unwrap().lines().count(), 2);
        let e = Cmd::new("sh")
            .args(["-c", "seq 1 100; exit 1"])
            .run_logged(&log, |_| {})
            .unwrap_err();
        let ImageError::Command { output_tail, .. } = e else {
            panic!("wrong error {e:?}")
        };
        assert_eq!(output_tail.lines().count(), ERROR_TAIL_LINES);
        assert!(output_tail.ends_with("100"));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn tail_keeps_last_lines() {
        let text: String = (1..=50).map(|i| format!("{i}\n")).collect();
        let t = tail(&text);
        assert_eq!(t.lines().next(), Some("11"));
        assert_eq!(t.lines().count(), ERROR_TAIL_LINES);
        assert_eq!(tail("a\nb"), "a\nb");
    }
}
