//! Template builds from a recipe (issue 17 §1): `Templates/Build` and its companions.
//!
//! A build is a row of `template_builds` (migration 5) with one `template_build_steps` row
//! per recipe step. The `Build` call's own worker thread is the runner: it creates a fresh
//! sandbox from FROM, writes the build context the client streams straight into it (never
//! stored by ctl), runs each step through the agent (`Processes/ExecStream` for RUN, COPY,
//! WORKDIR and USER), starts START in the background, polls HEALTHCHECK, then snapshots the
//! sandbox into a template and destroys the sandbox whatever happened.
//!
//! A second thread per build (the watcher) renews `runner_seen_at`, flushes the running
//! step's output into its bounded log, and watches `cancel_requested`: on a cancel it
//! destroys the sandbox, which ends the running command. If this ctl dies, its builds stop
//! being renewed and the reconciler fails them and destroys their sandboxes
//! ([`fail_dead_builds`]). The build survives its client going away: events are then no
//! longer sent, and `AttachBuild` follows the build from the database.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use postgres::GenericClient;
use proto::gen::wrenn::agent::v1 as agent;
use proto::gen::wrenn::ctl::v1 as ctl;
use proto::gen::wrenn::envd::v1 as envd;
use proto::id::{self, Kind, Uuid};
use proto::recipe::{self, Step};
use proto::rpc::ServerStream;
use proto::{Code, Status};

use super::templates::Overrides;
use super::{audit, convert, page_size, parse_id, Api, AuthCtx};
use crate::db::pg_err;
use crate::limits::{
    BUILDS_PER_HOST_MAX, BUILD_CONTEXT_DIR, BUILD_LOG_FLUSH, BUILD_QUEUE_WAIT_MAX,
    BUILD_RUNNER_GRACE, BUILD_RUNNER_RENEW, BUILD_STEP_LOG_MAX,
};

/// Where the `START` process is tagged (so a later look can find it).
const START_TAG: &str = "wrenn-build-start";

/// The statuses as the table spells them.
fn status_wire(s: &str) -> i32 {
    match s {
        "queued" => ctl::BuildStatus::Queued as i32,
        "running" => ctl::BuildStatus::Running as i32,
        "succeeded" => ctl::BuildStatus::Succeeded as i32,
        "failed" => ctl::BuildStatus::Failed as i32,
        "cancelled" => ctl::BuildStatus::Cancelled as i32,
        _ => ctl::BuildStatus::Unspecified as i32,
    }
}

const BUILD_COLS: &str =
    "id, name, status, reason, template_id, sandbox_id, created_at, finished_at";

fn build_row(r: &postgres::Row) -> ctl::Build {
    ctl::Build {
        id: id::format(Kind::Build, r.get(0)),
        name: r.get(1),
        status: status_wire(r.get(2)),
        reason: r.get(3),
        template_id: r
            .get::<_, Option<Uuid>>(4)
            .map(|t| id::format(Kind::Template, t))
            .unwrap_or_default(),
        sandbox_id: r
            .get::<_, Option<Uuid>>(5)
            .map(|t| id::format(Kind::Sandbox, t))
            .unwrap_or_default(),
        created_unix_ns: audit::ns(Some(r.get(6))),
        finished_unix_ns: audit::ns(r.get(7)),
        steps: Vec::new(),
    }
}

/// One build of `team` with its steps.
fn fetch_build(c: &mut impl GenericClient, team: Uuid, id: Uuid) -> Result<ctl::Build, Status> {
    let r = c
        .query_opt(
            &format!("SELECT {BUILD_COLS} FROM template_builds WHERE id = $1 AND team_id = $2"),
            &[&id, &team],
        )
        .map_err(pg_err)?
        .ok_or_else(|| Status::not_found("build not found"))?;
    let mut b = build_row(&r);
    b.steps = c
        .query(
            "SELECT n, line, instruction, status, exit_code FROM template_build_steps \
             WHERE build_id = $1 ORDER BY n",
            &[&id],
        )
        .map_err(pg_err)?
        .iter()
        .map(|r| ctl::BuildStep {
            n: r.get::<_, i32>(0) as u32,
            line: r.get::<_, i32>(1) as u32,
            instruction: r.get(2),
            status: r.get(3),
            exit_code: r.get(4),
        })
        .collect();
    Ok(b)
}

/// The recipe's text of a step's line (the first physical line of it).
fn line_text(src: &str, line: usize) -> String {
    let t = src.lines().nth(line.saturating_sub(1)).unwrap_or("").trim();
    t.chars().take(512).collect()
}

fn step_line(s: &Step) -> usize {
    match s {
        Step::Run { line, .. }
        | Step::Copy { line, .. }
        | Step::Env { line, .. }
        | Step::Workdir { line, .. }
        | Step::User { line, .. } => *line,
    }
}

/// A context path as given: relative, "/"-separated, no "." or ".." parts, no NUL.
pub fn check_context_path(p: &str) -> Result<(), Status> {
    let bad = p.is_empty()
        || p.len() > 4096
        || p.starts_with('/')
        || p.contains('\0')
        || p.split('/').any(|c| c.is_empty() || c == "." || c == "..");
    if bad {
        return Err(Status::invalid_argument(format!(
            "context path {p:?}: must be relative, without empty, \".\" or \"..\" parts"
        )));
    }
    Ok(())
}

/// Single-quotes `s` for /bin/sh.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// What later steps run with: ENV, WORKDIR and USER so far.
#[derive(Clone, Debug, Default)]
struct Ctx {
    env: BTreeMap<String, String>,
    workdir: String,
    user: String,
}

impl Ctx {
    fn process(&self, script: &str, root: bool, timeout: Option<Duration>) -> envd::ProcessConfig {
        envd::ProcessConfig {
            cmd: "/bin/sh".into(),
            args: vec!["-c".into(), script.into()],
            env: self.env.clone().into_iter().collect(),
            cwd: self.workdir.clone(),
            user: if root {
                "root".into()
            } else {
                self.user.clone()
            },
            timeout_ms: timeout.map(|t| t.as_millis() as u64).unwrap_or(0),
            ..Default::default()
        }
    }
}

/// Output of the running step not yet written to its log.
#[derive(Default)]
struct Pending {
    n: i32,
    bytes: Vec<u8>,
}

/// State shared by the runner and its watcher.
struct Shared {
    cancelled: AtomicBool,
    done: AtomicBool,
    /// Why the watcher stopped the build ("" for a cancel).
    pending: Mutex<Pending>,
    sandbox: Mutex<Option<(Uuid, Uuid)>>,
}

/// Appends `data` to step `n`'s log, keeping the last [`BUILD_STEP_LOG_MAX`] bytes.
fn append_log(c: &mut impl GenericClient, build: Uuid, n: i32, data: &[u8]) -> Result<(), Status> {
    if data.is_empty() {
        return Ok(());
    }
    let max = BUILD_STEP_LOG_MAX as i32;
    c.execute(
        "UPDATE template_build_steps SET \
           log_truncated = log_truncated OR length(log) + length($3::bytea) > $4, \
           log = substring(log || $3::bytea from greatest(1, length(log) + length($3::bytea) - $4 + 1)) \
         WHERE build_id = $1 AND n = $2",
        &[&build, &n, &data, &max],
    )
    .map_err(pg_err)?;
    Ok(())
}

/// How a step ended.
enum StepEnd {
    Ok(i32),
    Failed(i32, String),
}

/// The event sink: the client's stream until it goes away.
struct Events<'a> {
    stream: &'a mut ServerStream,
    gone: bool,
}

impl Events<'_> {
    fn send(&mut self, e: ctl::build_event::Event) {
        if self.gone {
            return;
        }
        if self
            .stream
            .send(&ctl::BuildEvent { event: Some(e) })
            .is_err()
        {
            self.gone = true;
        }
    }
}

impl Api {
    /// `Templates/Build`: runs the whole build on this thread (see the module docs).
    pub fn build_template(
        &self,
        ctx: &AuthCtx,
        first: ctl::BuildRequest,
        stream: &mut ServerStream,
    ) -> Result<(), Status> {
        let Some(ctl::build_request::Msg::Header(h)) = first.msg else {
            return Err(Status::invalid_argument(
                "the first message must be the header",
            ));
        };
        convert::check_name("name", &h.name)?;
        if h.name.starts_with("tpl-") {
            return Err(Status::invalid_argument(
                "template names must not look like ids (tpl-...)",
            ));
        }
        if h.recipe.len() > crate::limits::BUILD_RECIPE_LEN_MAX {
            return Err(Status::invalid_argument("recipe longer than 64 KiB"));
        }
        let rec = recipe::parse(h.recipe.as_bytes())
            .map_err(|e| Status::invalid_argument(format!("recipe: {e}")))?;
        // Its final ENV becomes the template's: the bounds of a create's env, checked now
        // rather than after every step ran.
        convert::check_map("recipe ENV", &rec.env.clone().into_iter().collect())?;
        let build = audit::new_uuid()?;
        let runner = format!("{}:{}", std::process::id(), audit::new_uuid()?);
        let team = ctx.team_id;
        let (name, src) = (h.name.clone(), h.recipe.clone());
        let steps: Vec<(i32, i32, String)> = rec
            .steps
            .iter()
            .enumerate()
            .map(|(i, s)| (i as i32, step_line(s) as i32, line_text(&src, step_line(s))))
            .collect();
        let steps2 = steps.clone();
        let runner2 = runner.clone();
        self.inner.db.tx(move |tx| {
            let taken = tx
                .query_opt(
                    "SELECT 1 FROM templates WHERE team_id = $1 AND name = $2",
                    &[&team, &name],
                )
                .map_err(pg_err)?;
            if taken.is_some() {
                return Err(Status::new(
                    Code::AlreadyExists,
                    "a template with this name exists",
                ));
            }
            tx.execute(
                "INSERT INTO template_builds (id, team_id, name, recipe, status, runner, runner_seen_at) \
                 VALUES ($1, $2, $3, $4, 'queued', $5, now())",
                &[&build, &team, &name, &src, &runner2],
            )
            .map_err(pg_err)?;
            for (n, line, ins) in &steps2 {
                tx.execute(
                    "INSERT INTO template_build_steps (build_id, n, line, instruction, status) \
                     VALUES ($1, $2, $3, $4, 'pending')",
                    &[&build, n, line, ins],
                )
                .map_err(pg_err)?;
            }
            Ok(())
        })?;
        let mut ev = Events {
            stream,
            gone: false,
        };
        ev.send(ctl::build_event::Event::BuildId(id::format(
            Kind::Build,
            build,
        )));
        let shared = Arc::new(Shared {
            cancelled: AtomicBool::new(false),
            done: AtomicBool::new(false),
            pending: Mutex::new(Pending::default()),
            sandbox: Mutex::new(None),
        });
        let watcher = {
            let api = self.clone();
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("ctl-build-watch".into())
                .spawn(move || api.watch_build(build, &shared))
                .map_err(|e| Status::internal(format!("spawn build watcher: {e}")))?
        };
        let r = self.run_build(ctx, build, &h.name, &rec, &steps, &shared, &mut ev);
        shared.done.store(true, Ordering::Release);
        let _ = watcher.join();
        // Whatever happened: the build sandbox goes.
        let sb = *shared.sandbox.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((host, sb)) = sb {
            if let Err(e) = self.agent_destroy(host, sb) {
                log::warn!(
                    "build={} could not destroy its sandbox={}: {}",
                    id::format(Kind::Build, build),
                    id::format(Kind::Sandbox, sb),
                    e.message
                );
            }
        }
        let cancelled = shared.cancelled.load(Ordering::Acquire);
        let (status, reason, tpl) = match r {
            Ok(tpl) => ("succeeded", String::new(), Some(tpl)),
            Err(_) if cancelled => ("cancelled", "cancelled".to_owned(), None),
            Err(e) => ("failed", e.message.clone(), None),
        };
        let reason2 = reason.clone();
        self.inner.db.tx(move |tx| {
            tx.execute(
                "UPDATE template_builds SET status = $2, reason = $3, template_id = $4, \
                   finished_at = now() WHERE id = $1 AND status IN ('queued', 'running')",
                &[&build, &status, &reason2, &tpl],
            )
            .map_err(pg_err)?;
            tx.execute(
                "UPDATE template_build_steps SET status = 'skipped' \
                 WHERE build_id = $1 AND status IN ('pending', 'running')",
                &[&build],
            )
            .map_err(pg_err)?;
            Ok(())
        })?;
        let b = self.inner.db.run(move |c| fetch_build(c, team, build))?;
        ev.send(ctl::build_event::Event::Finished(b));
        Ok(())
    }

    /// Renews the build's runner stamp, flushes output, and acts on a cancel.
    fn watch_build(&self, build: Uuid, shared: &Shared) {
        let mut last_renew = Instant::now();
        while !shared.done.load(Ordering::Acquire) {
            std::thread::sleep(BUILD_LOG_FLUSH);
            self.flush_pending(build, shared);
            if last_renew.elapsed() < BUILD_RUNNER_RENEW {
                continue;
            }
            last_renew = Instant::now();
            let r = self.inner.db.run(move |c| {
                Ok(c.query_opt(
                    "UPDATE template_builds SET runner_seen_at = now() WHERE id = $1 \
                     RETURNING cancel_requested",
                    &[&build],
                )
                .map_err(pg_err)?
                .map(|r| r.get::<_, bool>(0)))
            });
            if let Ok(Some(true)) = r {
                if !shared.cancelled.swap(true, Ordering::AcqRel) {
                    // Destroying the sandbox ends whatever runs in it.
                    let sb = *shared.sandbox.lock().unwrap_or_else(|e| e.into_inner());
                    if let Some((host, sb)) = sb {
                        let _ = self.agent_destroy(host, sb);
                    }
                }
            }
        }
    }

    fn flush_pending(&self, build: Uuid, shared: &Shared) {
        let mut p = shared.pending.lock().unwrap_or_else(|e| e.into_inner());
        if p.bytes.is_empty() {
            return;
        }
        let (n, data) = (p.n, std::mem::take(&mut p.bytes));
        // Under the lock: two flushes of one step never reorder.
        if let Err(e) = self.inner.db.run(move |c| append_log(c, build, n, &data)) {
            log::warn!("build log flush failed: {}", e.message);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn run_build(
        &self,
        ctx: &AuthCtx,
        build: Uuid,
        name: &str,
        rec: &recipe::Recipe,
        steps: &[(i32, i32, String)],
        shared: &Arc<Shared>,
        ev: &mut Events<'_>,
    ) -> Result<Uuid, Status> {
        // A fresh sandbox from FROM.
        let sb = self.create_sandbox(
            ctx,
            ctl::CreateSandboxRequest {
                template: rec.from.clone(),
                timeout_s: crate::limits::BUILD_SANDBOX_TIMEOUT_S,
                ..Default::default()
            },
        )?;
        let sb_id = parse_id(Kind::Sandbox, &sb.id)?;
        let host = parse_id(Kind::Host, &sb.host_id)?;
        *shared.sandbox.lock().unwrap_or_else(|e| e.into_inner()) = Some((host, sb_id));
        // Recorded at once, so the reconciler finds it if this ctl dies while queued.
        self.inner.db.run(move |c| {
            c.execute(
                "UPDATE template_builds SET host_id = $2, sandbox_id = $3 WHERE id = $1",
                &[&build, &host, &sb_id],
            )
            .map_err(pg_err)?;
            Ok(())
        })?;
        if shared.cancelled.load(Ordering::Acquire) {
            return Err(Status::cancelled("cancelled"));
        }
        // At most BUILDS_PER_HOST_MAX running per host: wait queued for a place.
        let waited = Instant::now();
        loop {
            let got = self.inner.db.tx(move |tx| {
                tx.query_one("SELECT 1 FROM hosts WHERE id = $1 FOR UPDATE", &[&host])
                    .map_err(pg_err)?;
                let n: i64 = tx
                    .query_one(
                        "SELECT count(*) FROM template_builds WHERE host_id = $1 AND status = 'running'",
                        &[&host],
                    )
                    .map_err(pg_err)?
                    .get(0);
                if n >= BUILDS_PER_HOST_MAX {
                    return Ok(false);
                }
                tx.execute(
                    "UPDATE template_builds SET status = 'running', started_at = now() \
                     WHERE id = $1 AND status = 'queued'",
                    &[&build],
                )
                .map_err(pg_err)?;
                Ok(true)
            })?;
            if got {
                break;
            }
            if waited.elapsed() > BUILD_QUEUE_WAIT_MAX {
                return Err(Status::resource_exhausted(format!(
                    "waited {} s for one of the host's {BUILDS_PER_HOST_MAX} build places",
                    BUILD_QUEUE_WAIT_MAX.as_secs()
                )));
            }
            if shared.cancelled.load(Ordering::Acquire) {
                return Err(Status::cancelled("cancelled"));
            }
            std::thread::sleep(BUILD_RUNNER_RENEW);
        }
        // The build context, straight into the sandbox.
        self.receive_context(host, sb_id, ev.stream)?;
        let mut cx = Ctx::default();
        for (i, step) in rec.steps.iter().enumerate() {
            if shared.cancelled.load(Ordering::Acquire) {
                return Err(Status::cancelled("cancelled"));
            }
            let (n, line, ins) = &steps[i];
            let n = *n;
            self.inner.db.run(move |c| {
                c.execute(
                    "UPDATE template_build_steps SET status = 'running', started_at = now() \
                     WHERE build_id = $1 AND n = $2",
                    &[&build, &n],
                )
                .map_err(pg_err)?;
                Ok(())
            })?;
            ev.send(ctl::build_event::Event::StepStarted(
                ctl::BuildStepStarted {
                    n: n as u32,
                    line: *line as u32,
                    instruction: ins.clone(),
                },
            ));
            let end = self.run_step(host, sb_id, n, step, &mut cx, shared, ev);
            self.flush_pending(build, shared);
            let (status, code, fail) = match &end {
                Ok(StepEnd::Ok(c)) => ("succeeded", Some(*c), None),
                Ok(StepEnd::Failed(c, why)) => ("failed", Some(*c), Some(why.clone())),
                Err(e) => ("failed", None, Some(e.message.clone())),
            };
            self.inner.db.run(move |c| {
                c.execute(
                    "UPDATE template_build_steps SET status = $3, exit_code = $4, finished_at = now() \
                     WHERE build_id = $1 AND n = $2",
                    &[&build, &n, &status, &code],
                )
                .map_err(pg_err)?;
                Ok(())
            })?;
            ev.send(ctl::build_event::Event::StepFinished(
                ctl::BuildStepFinished {
                    n: n as u32,
                    exit_code: code.unwrap_or(-1),
                    ok: fail.is_none(),
                },
            ));
            if let Some(why) = fail {
                return Err(Status::new(
                    Code::Aborted,
                    format!("step {} (line {line}): {why}", n + 1),
                ));
            }
        }
        if let Some(start) = &rec.start {
            let r: agent::ExecResponse = self.inner.agents.unary(
                host,
                agent::processes_methods::EXEC,
                &agent::ExecRequest {
                    sandbox_id: id::format(Kind::Sandbox, sb_id),
                    process: Some(envd::ProcessConfig {
                        tag: START_TAG.into(),
                        ..cx.process(&start.value, false, None)
                    }),
                    background: true,
                    ..Default::default()
                },
            )?;
            let _ = r;
        }
        if let Some(hc) = &rec.healthcheck {
            self.healthcheck(host, sb_id, &hc.value, &cx, shared)?;
        }
        // The context is not part of the template.
        let rm = format!("rm -rf {}", sh_quote(BUILD_CONTEXT_DIR));
        let code = self.exec_quiet(host, sb_id, &cx.process(&rm, true, None))?;
        if code != 0 {
            return Err(Status::internal(format!(
                "removing the context exited {code}"
            )));
        }
        if shared.cancelled.load(Ordering::Acquire) {
            return Err(Status::cancelled("cancelled"));
        }
        // The final USER, WORKDIR and ENV become the template's process defaults.
        let t = self.create_built_template(
            ctx,
            ctl::CreateTemplateRequest {
                sandbox_id: id::format(Kind::Sandbox, sb_id),
                name: name.to_owned(),
                platform: false,
            },
            &Overrides {
                user: rec.user.clone(),
                cwd: rec.workdir.clone(),
                env: rec.env.clone(),
            },
        )?;
        parse_id(Kind::Template, &t.id)
    }

    /// Reads the context files from the client and writes them under
    /// [`BUILD_CONTEXT_DIR`] in the sandbox, one agent `Files/Write` per file.
    fn receive_context(
        &self,
        host: Uuid,
        sb: Uuid,
        stream: &mut ServerStream,
    ) -> Result<(), Status> {
        let max = self.inner.cfg.build_context_max;
        let mut total: u64 = 0;
        let mut cur: Option<(String, proto::rpc::ClientStream)> = None;
        let finish = |w: Option<(String, proto::rpc::ClientStream)>| -> Result<(), Status> {
            if let Some((_, mut w)) = w {
                w.close_send()?;
                let _: Option<envd::WriteResponse> = w.recv()?;
            }
            Ok(())
        };
        while let Some(m) = stream.recv::<ctl::BuildRequest>()? {
            let Some(ctl::build_request::Msg::Context(chunk)) = m.msg else {
                return Err(Status::invalid_argument("a second header"));
            };
            total += chunk.data.len() as u64;
            if total > max {
                return Err(Status::resource_exhausted(format!(
                    "build context larger than the limit of {max} bytes"
                )));
            }
            if cur.as_ref().is_none_or(|(p, _)| *p != chunk.path) {
                check_context_path(&chunk.path)?;
                finish(cur.take())?;
                let header = agent::WriteRequest {
                    msg: Some(agent::write_request::Msg::Header(agent::WriteHeader {
                        sandbox_id: id::format(Kind::Sandbox, sb),
                        file: Some(envd::WriteHeader {
                            path: format!("{BUILD_CONTEXT_DIR}/{}", chunk.path),
                            user: "root".into(),
                            mode: Some(if chunk.mode == 0 {
                                0o644
                            } else {
                                chunk.mode & 0o7777
                            }),
                            truncate: true,
                            make_parents: true,
                            ..Default::default()
                        }),
                    })),
                };
                let w = self.inner.agents.stream(
                    host,
                    agent::files_methods::WRITE,
                    &header,
                    false,
                    Some(self.inner.cfg.agent_lifecycle_timeout),
                )?;
                cur = Some((chunk.path.clone(), w));
            }
            if !chunk.data.is_empty() {
                if let Some((_, w)) = cur.as_mut() {
                    w.send(&agent::WriteRequest {
                        msg: Some(agent::write_request::Msg::Data(chunk.data)),
                    })?;
                }
            }
        }
        finish(cur.take())
    }

    /// Runs one step; output goes to the client and the step's log.
    #[allow(clippy::too_many_arguments)]
    fn run_step(
        &self,
        host: Uuid,
        sb: Uuid,
        n: i32,
        step: &Step,
        cx: &mut Ctx,
        shared: &Shared,
        ev: &mut Events<'_>,
    ) -> Result<StepEnd, Status> {
        let pc = match step {
            Step::Run { cmd, timeout, .. } => cx.process(cmd, false, *timeout),
            Step::Copy {
                sources, target, ..
            } => {
                let srcs: Vec<String> = sources
                    .iter()
                    .map(|s| {
                        let s = s.trim_end_matches('/');
                        // "." is the whole context (its contents, as `cp -a dir/.` copies).
                        if s == "." || s.is_empty() {
                            return Ok(sh_quote(&format!("{BUILD_CONTEXT_DIR}/.")));
                        }
                        check_context_path(s)?;
                        Ok(sh_quote(&format!("{BUILD_CONTEXT_DIR}/{s}")))
                    })
                    .collect::<Result<_, Status>>()?;
                let dst = sh_quote(target);
                let script = if sources.len() > 1 || target.ends_with('/') {
                    format!("mkdir -p {dst} && cp -a {} {dst}", srcs.join(" "))
                } else {
                    format!(
                        "mkdir -p \"$(dirname {dst})\" && cp -a {} {dst}",
                        srcs.join(" ")
                    )
                };
                cx.process(&script, true, None)
            }
            Step::Env { vars, .. } => {
                for (k, v) in vars {
                    cx.env.insert(k.clone(), v.clone());
                }
                return Ok(StepEnd::Ok(0));
            }
            Step::Workdir { dir, .. } => {
                let d = if dir.starts_with('/') || cx.workdir.is_empty() {
                    dir.clone()
                } else {
                    format!("{}/{dir}", cx.workdir.trim_end_matches('/'))
                };
                let pc = Ctx {
                    workdir: String::new(),
                    ..cx.clone()
                }
                .process(&format!("mkdir -p {}", sh_quote(&d)), true, None);
                cx.workdir = d;
                pc
            }
            Step::User { name, .. } => {
                let q = sh_quote(name);
                let script = format!(
                    "id -u {q} >/dev/null 2>&1 || useradd -m {q} 2>/dev/null || adduser -D {q}"
                );
                let pc = cx.process(&script, true, None);
                cx.user = name.clone();
                pc
            }
        };
        let mut s = self.inner.agents.stream(
            host,
            agent::processes_methods::EXEC_STREAM,
            &agent::ExecStreamRequest {
                sandbox_id: id::format(Kind::Sandbox, sb),
                process: Some(pc),
            },
            true,
            None,
        )?;
        {
            let mut p = shared.pending.lock().unwrap_or_else(|e| e.into_inner());
            p.n = n;
        }
        loop {
            let m: Option<envd::ProcessEvent> = s.recv()?;
            let Some(m) = m else {
                return Ok(StepEnd::Failed(
                    -1,
                    "the command's stream ended without its exit".into(),
                ));
            };
            match m.event {
                Some(envd::process_event::Event::Output(o)) => {
                    {
                        let mut p = shared.pending.lock().unwrap_or_else(|e| e.into_inner());
                        p.bytes.extend_from_slice(&o.data);
                        // The watcher flushes often; this only bounds memory between
                        // flushes (the log keeps the tail anyway).
                        if p.bytes.len() > BUILD_STEP_LOG_MAX {
                            let cut = p.bytes.len() - BUILD_STEP_LOG_MAX;
                            p.bytes.drain(..cut);
                        }
                    }
                    ev.send(ctl::build_event::Event::Output(ctl::BuildOutput {
                        n: n as u32,
                        data: o.data,
                    }));
                }
                Some(envd::process_event::Event::Exited(x)) => {
                    return Ok(match x.status {
                        Some(envd::process_exited::Status::ExitCode(0)) => StepEnd::Ok(0),
                        Some(envd::process_exited::Status::ExitCode(c)) => {
                            StepEnd::Failed(c, format!("exit code {c}"))
                        }
                        Some(envd::process_exited::Status::Signal(sig)) if x.timed_out => {
                            StepEnd::Failed(128 + sig, "timed out".into())
                        }
                        Some(envd::process_exited::Status::Signal(sig)) => {
                            StepEnd::Failed(128 + sig, format!("killed by signal {sig}"))
                        }
                        None => StepEnd::Failed(-1, "exit without a status".into()),
                    });
                }
                _ => {}
            }
        }
    }

    /// Runs a command to its end without keeping output; its exit code.
    fn exec_quiet(&self, host: Uuid, sb: Uuid, pc: &envd::ProcessConfig) -> Result<i32, Status> {
        let r: agent::ExecResponse = self.inner.agents.unary_timeout(
            host,
            agent::processes_methods::EXEC,
            &agent::ExecRequest {
                sandbox_id: id::format(Kind::Sandbox, sb),
                process: Some(pc.clone()),
                ..Default::default()
            },
            self.inner.cfg.agent_lifecycle_timeout,
        )?;
        Ok(match r.exited.and_then(|e| e.status) {
            Some(envd::process_exited::Status::ExitCode(c)) => c,
            Some(envd::process_exited::Status::Signal(s)) => 128 + s,
            None => -1,
        })
    }

    fn healthcheck(
        &self,
        host: Uuid,
        sb: Uuid,
        hc: &recipe::Healthcheck,
        cx: &Ctx,
        shared: &Shared,
    ) -> Result<(), Status> {
        std::thread::sleep(hc.start_period);
        let mut last = 0;
        for attempt in 0..hc.retries.max(1) {
            if shared.cancelled.load(Ordering::Acquire) {
                return Err(Status::cancelled("cancelled"));
            }
            if attempt > 0 {
                std::thread::sleep(hc.interval);
            }
            last = self.exec_quiet(host, sb, &cx.process(&hc.cmd, false, Some(hc.timeout)))?;
            if last == 0 {
                return Ok(());
            }
        }
        Err(Status::new(
            Code::Aborted,
            format!(
                "healthcheck failed {} times (last exit code {last})",
                hc.retries.max(1)
            ),
        ))
    }

    /// `Templates/AttachBuild`: the kept output, then live events until the build ends.
    /// `emit` sends one event; `gone` says the caller left (checked between polls).
    pub fn attach_build(
        &self,
        ctx: &AuthCtx,
        req: ctl::AttachBuildRequest,
        emit: &mut dyn FnMut(ctl::BuildEvent) -> Result<(), Status>,
        gone: &dyn Fn() -> bool,
    ) -> Result<(), Status> {
        let id = parse_id(Kind::Build, &req.build_id)?;
        let team = ctx.team_id;
        // Per step: whether started/finished was sent and how many log bytes.
        let mut sent: Vec<(bool, bool, usize, bool)> = Vec::new();
        // Unknown (or another team's) builds fail before any event.
        self.inner.db.run(move |c| fetch_build(c, team, id))?;
        emit(ctl::BuildEvent {
            event: Some(ctl::build_event::Event::BuildId(req.build_id.clone())),
        })?;
        loop {
            if gone() {
                return Err(Status::cancelled("the caller left"));
            }
            let (b, logs) = self.inner.db.run(move |c| {
                let b = fetch_build(c, team, id)?;
                let logs: Vec<(Vec<u8>, bool)> = c
                    .query(
                        "SELECT log, log_truncated FROM template_build_steps WHERE build_id = $1 ORDER BY n",
                        &[&id],
                    )
                    .map_err(pg_err)?
                    .iter()
                    .map(|r| (r.get(0), r.get(1)))
                    .collect();
                Ok((b, logs))
            })?;
            sent.resize(b.steps.len(), (false, false, 0, false));
            for (i, st) in b.steps.iter().enumerate() {
                let s = &mut sent[i];
                if st.status == "pending" || st.status == "skipped" {
                    continue;
                }
                if !s.0 {
                    s.0 = true;
                    emit(ctl::BuildEvent {
                        event: Some(ctl::build_event::Event::StepStarted(
                            ctl::BuildStepStarted {
                                n: st.n,
                                line: st.line,
                                instruction: st.instruction.clone(),
                            },
                        )),
                    })?;
                }
                let (log, truncated) = logs.get(i).cloned().unwrap_or_default();
                // A truncated log's window moves: what it dropped is lost to an attach.
                let from = if truncated && !s.3 {
                    s.3 = true;
                    0
                } else if truncated {
                    log.len()
                } else {
                    s.2.min(log.len())
                };
                if from < log.len() {
                    emit(ctl::BuildEvent {
                        event: Some(ctl::build_event::Event::Output(ctl::BuildOutput {
                            n: st.n,
                            data: log[from..].to_vec().into(),
                        })),
                    })?;
                }
                s.2 = log.len();
                if !s.1 && (st.status == "succeeded" || st.status == "failed") {
                    s.1 = true;
                    emit(ctl::BuildEvent {
                        event: Some(ctl::build_event::Event::StepFinished(
                            ctl::BuildStepFinished {
                                n: st.n,
                                exit_code: st.exit_code.unwrap_or(-1),
                                ok: st.status == "succeeded",
                            },
                        )),
                    })?;
                }
            }
            let done = b.status == ctl::BuildStatus::Succeeded as i32
                || b.status == ctl::BuildStatus::Failed as i32
                || b.status == ctl::BuildStatus::Cancelled as i32;
            if done {
                emit(ctl::BuildEvent {
                    event: Some(ctl::build_event::Event::Finished(b)),
                })?;
                return Ok(());
            }
            std::thread::sleep(BUILD_LOG_FLUSH);
        }
    }

    /// `Templates/GetBuild`.
    pub fn get_build(
        &self,
        ctx: &AuthCtx,
        req: ctl::GetBuildRequest,
    ) -> Result<ctl::Build, Status> {
        let id = parse_id(Kind::Build, &req.build_id)?;
        let team = ctx.team_id;
        self.inner.db.run(move |c| fetch_build(c, team, id))
    }

    /// `Templates/ListBuilds`: newest first, without steps.
    pub fn list_builds(
        &self,
        ctx: &AuthCtx,
        req: ctl::ListBuildsRequest,
    ) -> Result<ctl::ListBuildsResponse, Status> {
        let limit = page_size(req.page_size);
        let after = audit::parse_page_token(&req.page_token)?;
        let team = ctx.team_id;
        self.inner.db.run(move |c| {
            let rows = match after {
                None => c.query(
                    &format!(
                        "SELECT {BUILD_COLS} FROM template_builds WHERE team_id = $1 \
                         ORDER BY created_at DESC, id DESC LIMIT $2"
                    ),
                    &[&team, &(limit + 1)],
                ),
                Some((t, id)) => c.query(
                    &format!(
                        "SELECT {BUILD_COLS} FROM template_builds WHERE team_id = $1 \
                         AND (created_at, id) < ($3, $4) \
                         ORDER BY created_at DESC, id DESC LIMIT $2"
                    ),
                    &[&team, &(limit + 1), &t, &id],
                ),
            }
            .map_err(pg_err)?;
            let (builds, next) = super::paginate(&rows, limit, |r| (r.get(6), r.get(0)), build_row);
            Ok(ctl::ListBuildsResponse {
                builds,
                next_page_token: next,
            })
        })
    }

    /// `Templates/CancelBuild`: a queued or running build is asked to stop; its runner
    /// sees it within [`BUILD_RUNNER_RENEW`] and destroys the sandbox.
    pub fn cancel_build(
        &self,
        ctx: &AuthCtx,
        req: ctl::CancelBuildRequest,
    ) -> Result<ctl::Build, Status> {
        let id = parse_id(Kind::Build, &req.build_id)?;
        let team = ctx.team_id;
        let ctx2 = ctx.clone();
        self.inner.db.tx(move |tx| {
            let r = tx
                .query_opt(
                    "UPDATE template_builds SET cancel_requested = true \
                     WHERE id = $1 AND team_id = $2 RETURNING status",
                    &[&id, &team],
                )
                .map_err(pg_err)?
                .ok_or_else(|| Status::not_found("build not found"))?;
            let status: String = r.get(0);
            if status != "queued" && status != "running" {
                return Err(Status::failed_precondition(format!(
                    "the build is {status}"
                )));
            }
            audit::insert(
                tx,
                audit::Entry {
                    team: Some(team),
                    actor: &audit::Actor::key(&ctx2),
                    resource_type: "build",
                    resource_id: id::format(Kind::Build, id),
                    action: "build.cancel",
                    success: true,
                    metadata: serde_json::json!({"from": status}),
                },
            )?;
            fetch_build(tx, team, id)
        })
    }
}

/// Fails builds whose runner stopped renewing (its ctl died) and destroys their
/// sandboxes. Run by the reconciler's pass, under its advisory lock. Returns the builds.
pub fn fail_dead_builds(api: &Api) -> Result<Vec<Uuid>, Status> {
    let grace = BUILD_RUNNER_GRACE.as_secs_f64();
    let dead: Vec<(Uuid, Option<Uuid>, Option<Uuid>, SystemTime)> = api.db().tx(move |tx| {
        let rows = tx
            .query(
                "UPDATE template_builds b SET status = 'failed', finished_at = now(), \
                   reason = 'the ctl running the build stopped (runner ' || b.runner || \
                            ' last seen ' || to_char(b.runner_seen_at AT TIME ZONE 'UTC', \
                            'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"') || ')' \
                 WHERE b.id IN (SELECT id FROM template_builds \
                     WHERE status IN ('queued', 'running') \
                       AND (runner_seen_at IS NULL OR runner_seen_at < now() - make_interval(secs => $1)) \
                     LIMIT 1000 FOR UPDATE SKIP LOCKED) \
                 RETURNING b.id, b.host_id, b.sandbox_id, b.created_at",
                &[&grace],
            )
            .map_err(pg_err)?;
        let ids: Vec<Uuid> = rows.iter().map(|r| r.get(0)).collect();
        tx.execute(
            "UPDATE template_build_steps SET status = 'skipped' \
             WHERE build_id = ANY($1) AND status IN ('pending', 'running')",
            &[&ids],
        )
        .map_err(pg_err)?;
        Ok(rows
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
            .collect())
    })?;
    let mut out = Vec::new();
    for (b, host, sb, _) in dead {
        log::warn!(
            "build={} failed: its runner stopped renewing",
            id::format(Kind::Build, b)
        );
        if let (Some(h), Some(s)) = (host, sb) {
            if let Err(e) = api.agent_destroy(h, s) {
                log::warn!(
                    "build={} sandbox={} destroy failed: {} (the reconciler's sweep retries)",
                    id::format(Kind::Build, b),
                    id::format(Kind::Sandbox, s),
                    e.message
                );
            }
        }
        out.push(b);
    }
    Ok(out)
}
