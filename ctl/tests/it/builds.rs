//! Template builds from a recipe (issue 17 §1): `Templates/Build` with its context, steps
//! run through the (fake) agent, a failing step, cancel, a dead runner failed by the
//! reconciler, and the context size limit, against a real PostgreSQL.

use std::time::{Duration, Instant};

use proto::gen::wrenn::ctl::v1 as c;
use proto::rpc::{CallOpts, Client, ClientStream};
use proto::Code;

use crate::harness::Ctl;

const T: Option<Duration> = Some(Duration::from_secs(30));

use c::build_event::Event;

/// Opens a Build call: the header, then `files` as context, then the half-close.
fn start_build(cl: &Client, name: &str, recipe: &str, files: &[(&str, &[u8])]) -> ClientStream {
    let mut s = cl
        .call(
            c::templates_methods::BUILD,
            &c::BuildRequest {
                msg: Some(c::build_request::Msg::Header(c::BuildHeader {
                    recipe: recipe.into(),
                    name: name.into(),
                })),
            },
            CallOpts {
                timeout: Some(Duration::from_secs(60)),
                end_stream: false,
            },
        )
        .unwrap();
    for (path, data) in files {
        for chunk in data.chunks(256 * 1024) {
            s.send(&c::BuildRequest {
                msg: Some(c::build_request::Msg::Context(c::BuildContextChunk {
                    path: (*path).into(),
                    mode: 0o600,
                    data: chunk.to_vec().into(),
                })),
            })
            .unwrap();
        }
    }
    s.close_send().unwrap();
    s
}

/// Every event until the call ends.
fn drain(s: &mut ClientStream) -> Vec<Event> {
    let mut out = Vec::new();
    while let Some(e) = s.recv::<c::BuildEvent>().unwrap() {
        out.extend(e.event);
    }
    out
}

fn finished(ev: &[Event]) -> c::Build {
    match ev.last() {
        Some(Event::Finished(b)) => b.clone(),
        e => panic!("last event is not Finished: {e:?}"),
    }
}

fn output(ev: &[Event], n: u32) -> String {
    ev.iter()
        .filter_map(|e| match e {
            Event::Output(o) if o.n == n => Some(String::from_utf8_lossy(&o.data).into_owned()),
            _ => None,
        })
        .collect()
}

fn get(cl: &Client, id: &str) -> c::Build {
    cl.unary(
        c::templates_methods::GET_BUILD,
        &c::GetBuildRequest {
            build_id: id.into(),
        },
        T,
    )
    .unwrap()
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < Duration::from_secs(20), "timed out: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

const RECIPE: &str = "FROM minimal
ENV GREETING=hello
WORKDIR /app
COPY site/index.html /app/
USER web
RUN echo $GREETING > out.txt
START serve --port 8080
HEALTHCHECK --interval=1s --retries=2 check 8080
";

#[test]
fn a_build_runs_its_steps_and_ends_in_a_snapshot_template() {
    let Some(ctl) = Ctl::start() else { return };
    let (fa, _h) = ctl.add_host(8, 8192, 1_000_000);
    let cl = ctl.team();
    // A webhook for every event, so build.finished is recorded in the outbox.
    let team = proto::id::parse(proto::id::Kind::Team, &ctl.team_id).unwrap();
    ctl.api()
        .db()
        .run(move |c| {
            c.execute(
                "INSERT INTO webhooks (id, team_id, url, secret) \
                 VALUES (gen_random_uuid(), $1, 'http://example.invalid/', 's')",
                &[&team],
            )
            .map_err(ctl::db::pg_err)?;
            Ok(())
        })
        .unwrap();
    let mut s = start_build(&cl, "web", RECIPE, &[("site/index.html", b"<h1>hi</h1>")]);
    let ev = drain(&mut s);
    let b = finished(&ev);
    assert_eq!(b.status, c::BuildStatus::Succeeded as i32, "{b:?}");
    assert!(matches!(&ev[0], Event::BuildId(id) if *id == b.id));
    // Every step started and ended ok, in order; RUN's output came live.
    let started: Vec<u32> = ev
        .iter()
        .filter_map(|e| match e {
            Event::StepStarted(s) => Some(s.n),
            _ => None,
        })
        .collect();
    assert_eq!(started, vec![0, 1, 2, 3, 4]);
    assert!(ev
        .iter()
        .any(|e| matches!(e, Event::StepFinished(f) if f.n == 4 && f.ok && f.exit_code == 0)));
    assert_eq!(output(&ev, 4), "ran: echo $GREETING > out.txt\n");

    // The template exists, a snapshot, and the build sandbox is gone.
    let t: c::Template = cl
        .unary(
            c::templates_methods::GET,
            &c::GetTemplateRequest {
                template: "web".into(),
            },
            T,
        )
        .unwrap();
    assert_eq!(t.id, b.template_id);
    assert_eq!(t.kind, proto::sandbox::TemplateKind::Snapshot as i32);
    let st = fa.state.lock().unwrap();
    assert!(st.sandboxes.is_empty(), "build sandbox destroyed");
    // The context landed in the sandbox, never in ctl.
    let sb_id = b.sandbox_id.clone();
    assert_eq!(
        st.files
            .get(&(
                sb_id.clone(),
                "/tmp/wrenn-build-context/site/index.html".into()
            ))
            .map(|v| v.as_slice()),
        Some(&b"<h1>hi</h1>"[..])
    );
    // ENV, WORKDIR and USER apply to later steps; USER was created as root; START runs in
    // the background as the user; the healthcheck ran; the context was removed last.
    let runs: Vec<&proto::gen::wrenn::envd::v1::ProcessConfig> =
        st.shell_runs.iter().map(|(_, p)| p).collect();
    let script = |p: &proto::gen::wrenn::envd::v1::ProcessConfig| p.args[1].clone();
    let run = runs
        .iter()
        .find(|p| script(p).starts_with("echo $GREETING"))
        .unwrap();
    assert_eq!(run.env.get("GREETING").map(String::as_str), Some("hello"));
    assert_eq!((run.cwd.as_str(), run.user.as_str()), ("/app", "web"));
    let useradd = runs.iter().find(|p| script(p).contains("useradd")).unwrap();
    assert_eq!(useradd.user, "root");
    let copy = runs.iter().find(|p| script(p).contains("cp -a")).unwrap();
    assert!(
        script(copy).contains("'/tmp/wrenn-build-context/site/index.html' '/app/'"),
        "{}",
        script(copy)
    );
    let start = runs
        .iter()
        .find(|p| script(p) == "serve --port 8080")
        .unwrap();
    assert_eq!(
        (start.user.as_str(), start.tag.as_str()),
        ("web", "wrenn-build-start")
    );
    assert!(runs.iter().any(|p| script(p) == "check 8080"));
    assert_eq!(
        script(runs.last().unwrap()),
        "rm -rf '/tmp/wrenn-build-context'"
    );
    drop(st);

    // GetBuild: steps with their status; the kept log of RUN.
    let g = get(&cl, &b.id);
    assert_eq!(g.steps.len(), 5);
    assert!(g.steps.iter().all(|s| s.status == "succeeded"));
    assert_eq!(g.steps[4].instruction, "RUN echo $GREETING > out.txt");
    // AttachBuild after the end replays the kept output and the final state.
    let mut a = cl
        .call(
            c::templates_methods::ATTACH_BUILD,
            &c::AttachBuildRequest {
                build_id: b.id.clone(),
            },
            CallOpts {
                timeout: T,
                end_stream: true,
            },
        )
        .unwrap();
    let aev = drain(&mut a);
    assert_eq!(output(&aev, 4), "ran: echo $GREETING > out.txt\n");
    assert_eq!(finished(&aev).status, c::BuildStatus::Succeeded as i32);
    // ListBuilds; a second build of the same name is refused (the template exists).
    let l: c::ListBuildsResponse = cl
        .unary(
            c::templates_methods::LIST_BUILDS,
            &c::ListBuildsRequest::default(),
            T,
        )
        .unwrap();
    assert_eq!(l.builds.len(), 1);
    let mut s = start_build(&cl, "web", RECIPE, &[]);
    let e = s.recv::<c::BuildEvent>().unwrap_err();
    assert_eq!(e.code, Code::AlreadyExists);
    // build.finished was raised in the build's transaction.
    let n: i64 = ctl
        .api()
        .db()
        .run(|c| {
            Ok(c.query_one(
                "SELECT count(*) FROM webhook_events WHERE type = 'build.finished' \
                 AND data->>'status' = 'succeeded'",
                &[],
            )
            .map_err(ctl::db::pg_err)?
            .get(0))
        })
        .unwrap();
    assert_eq!(n, 1);
}

#[test]
fn a_failing_step_stops_the_build_with_its_exit_code() {
    let Some(ctl) = Ctl::start() else { return };
    let (fa, _h) = ctl.add_host(8, 8192, 1_000_000);
    let cl = ctl.team();
    let recipe = "RUN echo one\nRUN exit 7\nRUN echo never\n";
    let ev = drain(&mut start_build(&cl, "broken", recipe, &[]));
    let b = finished(&ev);
    assert_eq!(b.status, c::BuildStatus::Failed as i32);
    assert!(
        b.reason.contains("step 2 (line 2): exit code 7"),
        "{}",
        b.reason
    );
    assert!(b.template_id.is_empty());
    assert!(ev
        .iter()
        .any(|e| matches!(e, Event::StepFinished(f) if f.n == 1 && !f.ok && f.exit_code == 7)));
    assert!(!ev
        .iter()
        .any(|e| matches!(e, Event::StepStarted(s) if s.n == 2)));
    let g = get(&cl, &b.id);
    let st: Vec<(&str, Option<i32>)> = g
        .steps
        .iter()
        .map(|s| (s.status.as_str(), s.exit_code))
        .collect();
    assert_eq!(
        st,
        vec![
            ("succeeded", Some(0)),
            ("failed", Some(7)),
            ("skipped", None)
        ]
    );
    assert!(fa.state.lock().unwrap().sandboxes.is_empty());
    assert!(fa
        .state
        .lock()
        .unwrap()
        .shell_runs
        .iter()
        .all(|(_, p)| p.args[1] != "echo never"));
    // Attaching to an unknown build fails before any event.
    let mut a = cl
        .call(
            c::templates_methods::ATTACH_BUILD,
            &c::AttachBuildRequest {
                build_id: "bld-00000000-0000-4000-8000-000000000009".into(),
            },
            CallOpts {
                timeout: T,
                end_stream: true,
            },
        )
        .unwrap();
    assert_eq!(a.recv::<c::BuildEvent>().unwrap_err().code, Code::NotFound);
    // A malformed recipe is refused before anything runs, naming line and column.
    let mut s = start_build(&cl, "x", "RUN ok\nBOGUS thing\n", &[]);
    let e = s.recv::<c::BuildEvent>().unwrap_err();
    assert_eq!(e.code, Code::InvalidArgument);
    assert!(e.message.contains("line 2, column 1"), "{}", e.message);
}

#[test]
fn cancel_stops_a_running_build_and_destroys_its_sandbox() {
    let Some(ctl) = Ctl::start() else { return };
    let (fa, _h) = ctl.add_host(8, 8192, 1_000_000);
    let cl = ctl.team();
    let mut s = start_build(&cl, "slow", "RUN block forever\nRUN echo never\n", &[]);
    let Some(Event::BuildId(id)) = s.recv::<c::BuildEvent>().unwrap().and_then(|e| e.event) else {
        panic!("first event is the build id")
    };
    wait_for("step 0 running", || {
        get(&cl, &id).steps[0].status == "running"
    });
    assert_eq!(fa.state.lock().unwrap().sandboxes.len(), 1);
    let b: c::Build = cl
        .unary(
            c::templates_methods::CANCEL_BUILD,
            &c::CancelBuildRequest {
                build_id: id.clone(),
            },
            T,
        )
        .unwrap();
    assert_eq!(b.status, c::BuildStatus::Running as i32);
    let ev = drain(&mut s);
    let b = finished(&ev);
    assert_eq!(b.status, c::BuildStatus::Cancelled as i32, "{b:?}");
    assert!(fa.state.lock().unwrap().sandboxes.is_empty());
    let g = get(&cl, &id);
    assert_eq!(g.steps[1].status, "skipped");
    // A finished build cannot be cancelled.
    let r: Result<c::Build, _> = cl.unary(
        c::templates_methods::CANCEL_BUILD,
        &c::CancelBuildRequest { build_id: id },
        T,
    );
    assert_eq!(r.unwrap_err().code, Code::FailedPrecondition);
}

#[test]
fn the_reconciler_fails_a_build_whose_ctl_died_and_destroys_its_sandbox() {
    let Some(ctl) = Ctl::start() else { return };
    let (fa, _h) = ctl.add_host(8, 8192, 1_000_000);
    let cl = ctl.team();
    // Two builds mid-run, as a runner leaves them: one renewed just now, one whose ctl
    // stopped renewing a minute ago. Each holds a sandbox.
    let mk = || -> c::Sandbox {
        cl.unary(
            c::sandboxes_methods::CREATE,
            &c::CreateSandboxRequest::default(),
            T,
        )
        .unwrap()
    };
    let (alive, dead) = (mk(), mk());
    let team = proto::id::parse(proto::id::Kind::Team, &ctl.team_id).unwrap();
    let ins = |sb: &c::Sandbox, age_s: f64| -> proto::id::Uuid {
        let id = ctl::service::new_uuid().unwrap();
        let sb_id = proto::id::parse(proto::id::Kind::Sandbox, &sb.id).unwrap();
        let host = proto::id::parse(proto::id::Kind::Host, &sb.host_id).unwrap();
        ctl.api()
            .db()
            .run(move |c| {
                c.execute(
                    "INSERT INTO template_builds (id, team_id, name, recipe, status, host_id, \
                       sandbox_id, runner, runner_seen_at, started_at) \
                     VALUES ($1, $2, $3, 'RUN x', 'running', $4, $5, 'gone-replica', \
                       now() - make_interval(secs => $6), now())",
                    &[&id, &team, &format!("b{age_s}"), &host, &sb_id, &age_s],
                )
                .map_err(ctl::db::pg_err)?;
                c.execute(
                    "INSERT INTO template_build_steps (build_id, n, line, instruction, status) \
                     VALUES ($1, 0, 1, 'RUN x', 'running')",
                    &[&id],
                )
                .map_err(ctl::db::pg_err)?;
                Ok(())
            })
            .unwrap();
        id
    };
    let a = ins(&alive, 1.0);
    let d = ins(&dead, 60.0);
    let cfg = crate::harness::test_config(&ctl.url).jobs;
    ctl::reconciler::run_once(ctl.api(), &cfg).unwrap();
    let fmt = |u| proto::id::format(proto::id::Kind::Build, u);
    let gd = get(&cl, &fmt(d));
    assert_eq!(gd.status, c::BuildStatus::Failed as i32);
    assert!(
        gd.reason
            .starts_with("the ctl running the build stopped (runner gone-replica last seen "),
        "{}",
        gd.reason
    );
    assert_eq!(gd.steps[0].status, "skipped");
    assert_eq!(get(&cl, &fmt(a)).status, c::BuildStatus::Running as i32);
    let st = fa.state.lock().unwrap();
    assert!(
        !st.sandboxes.contains_key(&dead.id),
        "dead build's sandbox destroyed"
    );
    assert!(st.sandboxes.contains_key(&alive.id));
}

#[test]
fn a_context_over_the_limit_fails_the_build() {
    let Some(ctl) = Ctl::start() else { return };
    let (fa, _h) = ctl.add_host(8, 8192, 1_000_000);
    let cl = ctl.team();
    // The test replica's limit is 1 MiB.
    let big = vec![7u8; (1 << 20) + 1];
    let ev = drain(&mut start_build(&cl, "big", "COPY f /f\n", &[("f", &big)]));
    let b = finished(&ev);
    assert_eq!(b.status, c::BuildStatus::Failed as i32);
    assert!(
        b.reason
            .contains("build context larger than the limit of 1048576 bytes"),
        "{}",
        b.reason
    );
    assert!(fa.state.lock().unwrap().sandboxes.is_empty());
    // Exactly at the limit is fine; a path climbing out is refused.
    let ok = vec![7u8; 1 << 20];
    let ev = drain(&mut start_build(&cl, "fits", "COPY f /f\n", &[("f", &ok)]));
    assert_eq!(finished(&ev).status, c::BuildStatus::Succeeded as i32);
    let ev = drain(&mut start_build(
        &cl,
        "esc",
        "COPY f /f\n",
        &[("../f", b"x")],
    ));
    let b = finished(&ev);
    assert_eq!(b.status, c::BuildStatus::Failed as i32);
    assert!(b.reason.contains("must be relative"), "{}", b.reason);
}

#[test]
fn at_most_n_builds_run_at_once_per_host_the_rest_wait_queued() {
    let Some(ctl) = Ctl::start() else { return };
    let (fa, _h) = ctl.add_host(16, 16384, 1_000_000);
    let cl = ctl.team();
    let n = ctl::limits::BUILDS_PER_HOST_MAX as usize;
    let mut calls = Vec::new();
    for i in 0..=n {
        let mut s = start_build(&cl, &format!("b{i}"), "RUN block\n", &[]);
        let Some(Event::BuildId(id)) = s.recv::<c::BuildEvent>().unwrap().and_then(|e| e.event)
        else {
            panic!("first event is the build id")
        };
        if i < n {
            wait_for("running", || {
                get(&cl, &id).status == c::BuildStatus::Running as i32
            });
        }
        calls.push((id, s));
    }
    // The one past the bound holds its sandbox but waits queued.
    let last = calls[n].0.clone();
    wait_for("the last build's sandbox", || {
        !get(&cl, &last).sandbox_id.is_empty()
    });
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(get(&cl, &last).status, c::BuildStatus::Queued as i32);
    assert_eq!(fa.state.lock().unwrap().sandboxes.len(), n + 1);
    // A place frees: it runs.
    let _: c::Build = cl
        .unary(
            c::templates_methods::CANCEL_BUILD,
            &c::CancelBuildRequest {
                build_id: calls[0].0.clone(),
            },
            T,
        )
        .unwrap();
    wait_for("the last build runs", || {
        get(&cl, &last).status == c::BuildStatus::Running as i32
    });
    for (id, mut s) in calls {
        let _ = cl.unary::<_, c::Build>(
            c::templates_methods::CANCEL_BUILD,
            &c::CancelBuildRequest { build_id: id },
            T,
        );
        assert_eq!(
            finished(&drain(&mut s)).status,
            c::BuildStatus::Cancelled as i32
        );
    }
    assert!(fa.state.lock().unwrap().sandboxes.is_empty());
}

/// Issue 17 §1: a recipe's final USER, WORKDIR and ENV (over its FROM template's) become the
/// template's process defaults, are sent in the spec of every sandbox created from it (the
/// create's env winning per key), and stay with a template made from such a sandbox, even
/// once the first template is gone.
#[test]
fn the_final_user_env_and_workdir_become_the_template_defaults() {
    let Some(ctl) = Ctl::start() else { return };
    let (fa, _h) = ctl.add_host(8, 8192, 1_000_000);
    let cl = ctl.team();
    // The FROM template has defaults of its own; the recipe overrides some of them.
    ctl.api()
        .db()
        .run(|c| {
            c.execute(
                "UPDATE templates SET default_cwd = '/base', \
                 env = '{\"FROM_ONLY\": \"x\", \"A\": \"from\"}' WHERE name = 'minimal'",
                &[],
            )
            .map_err(ctl::db::pg_err)?;
            Ok(())
        })
        .unwrap();
    let recipe = "FROM minimal\nENV A=1 B=2\nWORKDIR /app\nUSER web\nRUN true\nENV B=3\n";
    let b = finished(&drain(&mut start_build(&cl, "defaults", recipe, &[])));
    assert_eq!(b.status, c::BuildStatus::Succeeded as i32, "{b:?}");
    let tpl_env = |pairs: &[(&str, &str)]| -> std::collections::HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let want = tpl_env(&[("FROM_ONLY", "x"), ("A", "1"), ("B", "3")]);
    let get_tpl = |name: &str| -> c::Template {
        cl.unary(
            c::templates_methods::GET,
            &c::GetTemplateRequest {
                template: name.into(),
            },
            T,
        )
        .unwrap()
    };
    let t = get_tpl("defaults");
    assert_eq!(
        (t.default_user.as_str(), t.default_cwd.as_str()),
        ("web", "/app")
    );
    assert_eq!(t.env, want);
    // The build sandbox itself ran with the FROM template's defaults.
    let build_spec = fa.state.lock().unwrap().specs[&b.sandbox_id].clone();
    assert_eq!(build_spec.default_cwd, "/base");
    assert_eq!(
        build_spec.env,
        tpl_env(&[("FROM_ONLY", "x"), ("A", "from")])
    );

    // A create from it: the defaults in the spec, the create's env winning per key.
    let create = |tpl: &str, env: &[(&str, &str)]| -> Result<c::Sandbox, proto::Status> {
        cl.unary(
            c::sandboxes_methods::CREATE,
            &c::CreateSandboxRequest {
                template: tpl.into(),
                env: tpl_env(env),
                ..Default::default()
            },
            T,
        )
    };
    let sb = create("defaults", &[("B", "call"), ("C", "4")]).unwrap();
    let spec = fa.state.lock().unwrap().specs[&sb.id].clone();
    assert_eq!(
        (spec.default_user.as_str(), spec.default_cwd.as_str()),
        ("web", "/app")
    );
    assert_eq!(
        spec.env,
        tpl_env(&[("FROM_ONLY", "x"), ("A", "1"), ("B", "call"), ("C", "4")])
    );

    // The first template deleted, the sandbox becomes a template: the defaults stay (the
    // create's own env, which may hold secrets, does not become the template's).
    let _: c::DeleteTemplateResponse = cl
        .unary(
            c::templates_methods::DELETE,
            &c::DeleteTemplateRequest {
                template_id: t.id.clone(),
            },
            T,
        )
        .unwrap();
    let t2: c::Template = cl
        .unary(
            c::templates_methods::CREATE,
            &c::CreateTemplateRequest {
                sandbox_id: sb.id.clone(),
                name: "again".into(),
                platform: false,
            },
            T,
        )
        .unwrap();
    assert_eq!(
        (t2.default_user.as_str(), t2.default_cwd.as_str()),
        ("web", "/app")
    );
    assert_eq!(t2.env, want);
    assert_eq!(get_tpl("again").env, want, "stored, not only returned");
    let sb2 = create("again", &[]).unwrap();
    let spec2 = fa.state.lock().unwrap().specs[&sb2.id].clone();
    assert_eq!(
        (spec2.default_user.as_str(), spec2.default_cwd.as_str()),
        ("web", "/app")
    );
    assert_eq!(spec2.env, want);

    // The merged env is bounded like a create's own: refused before anything is held.
    let many: Vec<(String, String)> = (0..ctl::limits::MAP_ENTRIES_MAX)
        .map(|i| (format!("K{i}"), "v".to_string()))
        .collect();
    let many: Vec<(&str, &str)> = many.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let e = create("again", &many).unwrap_err();
    assert_eq!(e.code, Code::InvalidArgument, "{e}");
    assert!(e.message.contains("env"), "{e}");
    let n: i64 = ctl
        .api()
        .db()
        .run(|c| {
            Ok(c.query_one("SELECT count(*) FROM sandboxes", &[])
                .map_err(ctl::db::pg_err)?
                .get(0))
        })
        .unwrap();
    assert_eq!(n, 3, "the build's, the create's and the second create's");
}
