//! The manager over the fake VM layer: states, slots, disks, TTL, failures, re-adoption,
//! templates.

use std::sync::atomic::Ordering;
use std::time::Duration;

use agent::state::State;
use agent::statedir::{SandboxDir, SandboxRecord, TemplateKind, TimeoutPolicy};
use agent::ttl::Outcome;
use proto::gen::wrenn::agent::v1 as pb;
use proto::gen::wrenn::host::v1::StateChangeReason;
use proto::id::{self, Uuid};
use proto::Code;

use crate::{Env, BASE};

fn state(info: &pb::SandboxInfo) -> State {
    State::from_wire(info.state).unwrap()
}

#[test]
fn create_pause_resume_destroy_leaves_nothing() {
    let env = Env::new("cycle");
    let m = &env.manager;
    let info = m.create(env.spec(1)).unwrap();
    assert_eq!(state(&info), State::Running);
    assert_eq!(info.envd_version, "fake-1");
    assert_eq!(info.vcpus, 1);
    assert_eq!(info.memory_mib, 512);
    assert!(info.expires_unix_ns > 0);
    assert_eq!(m.slots_used(), 1);
    assert_eq!(env.vmm.slots.lock().unwrap().len(), 1);
    assert!(env.dir(1).join("rootfs.ext4").exists(), "disk copied");
    let guest = env.vmm.envd(&env.dir(1)).unwrap();
    let token1 = guest.token.lock().unwrap().clone();
    assert_eq!(token1.len(), 64, "fresh random token");
    assert_eq!(guest.env.lock().unwrap().get("GREETING").unwrap(), "hi");
    guest
        .files
        .lock()
        .unwrap()
        .insert("/home/user/f".into(), b"kept".to_vec());

    let info = m.pause(Uuid::from_u128(1)).unwrap();
    assert_eq!(state(&info), State::Paused);
    assert_eq!(info.expires_unix_ns, 0);
    assert_eq!(m.slots_used(), 0, "a paused sandbox holds no slot");
    assert!(env.vmm.slots.lock().unwrap().is_empty());
    assert_eq!(env.vmm.running(), 0, "no process left while paused");
    let rec = SandboxRecord::load(&SandboxDir(env.dir(1))).unwrap();
    assert_eq!(rec.state, State::Paused);
    assert!(rec.firecracker.is_none() && rec.slot.is_none());
    assert_eq!(rec.chain.as_ref().unwrap().generation, 1);

    let info = m.resume(Uuid::from_u128(1), 0).unwrap();
    assert_eq!(state(&info), State::Running);
    let guest = env.vmm.envd(&env.dir(1)).unwrap();
    assert_eq!(
        guest.files.lock().unwrap().get("/home/user/f").unwrap(),
        b"kept"
    );
    assert_eq!(guest.resumed.load(Ordering::SeqCst), 1);
    let token2 = guest.token.lock().unwrap().clone();
    assert_ne!(token1, token2, "a resume sets a fresh token");
    // The manager's envd connection uses the new token.
    let c = m.envd(Uuid::from_u128(1)).unwrap();
    c.close();

    // Second pause is a Diff on top: generation 2.
    m.pause(Uuid::from_u128(1)).unwrap();
    let rec = SandboxRecord::load(&SandboxDir(env.dir(1))).unwrap();
    assert_eq!(rec.chain.as_ref().unwrap().generation, 2);
    m.resume(Uuid::from_u128(1), 0).unwrap();

    m.destroy(Uuid::from_u128(1)).unwrap();
    assert_eq!(m.get(Uuid::from_u128(1)).unwrap_err().code, Code::NotFound);
    assert!(!env.dir(1).exists());
    assert_eq!(m.slots_used(), 0);
    assert!(env.vmm.slots.lock().unwrap().is_empty());
    assert_eq!(env.vmm.running(), 0);
    assert!(m.list(&[]).is_empty());
    assert_eq!(
        m.destroy(Uuid::from_u128(1)).unwrap_err().code,
        Code::NotFound
    );
}

#[test]
fn wrong_state_unknown_ids_and_duplicates() {
    let env = Env::new("states");
    let m = &env.manager;
    let id = Uuid::from_u128(2);
    assert_eq!(m.pause(id).unwrap_err().code, Code::NotFound);
    assert_eq!(m.resume(id, 0).unwrap_err().code, Code::NotFound);
    assert_eq!(m.ping(id).unwrap_err().code, Code::NotFound);
    m.create(env.spec(2)).unwrap();
    assert_eq!(m.create(env.spec(2)).unwrap_err().code, Code::AlreadyExists);
    assert_eq!(m.resume(id, 0).unwrap_err().code, Code::FailedPrecondition);
    m.pause(id).unwrap();
    assert_eq!(m.pause(id).unwrap_err().code, Code::FailedPrecondition);
    assert_eq!(m.ping(id).unwrap_err().code, Code::FailedPrecondition);
    assert_eq!(m.envd(id).unwrap_err().code, Code::FailedPrecondition);
    assert_eq!(
        m.set_timeout(id, 0, 0).unwrap_err().code,
        Code::InvalidArgument
    );
    assert_eq!(
        m.set_timeout(id, 10, 99).unwrap_err().code,
        Code::InvalidArgument
    );
    // Set-timeout on a paused sandbox records it for the next resume.
    let info = m
        .set_timeout(id, 10, proto::sandbox::TimeoutPolicy::Pause as i32)
        .unwrap();
    assert_eq!(info.timeout_s, 10);
    assert_eq!(info.expires_unix_ns, 0);

    let mut s = env.spec(3);
    s.template_id = id::format_template(Uuid::from_u128(99));
    assert_eq!(m.create(s).unwrap_err().code, Code::NotFound);
    let mut s = env.spec(3);
    s.template_kind = TemplateKind::Snapshot as i32;
    assert_eq!(m.create(s).unwrap_err().code, Code::FailedPrecondition);
    assert!(!env.dir(3).exists(), "a refused create leaves no directory");
    m.destroy(id).unwrap();
}

#[test]
fn ttl_pauses_or_destroys_per_policy_and_ping_extends() {
    let env = Env::new("ttl");
    let m = &env.manager;
    let mut s = env.spec(1);
    s.on_timeout = TimeoutPolicy::Pause as i32;
    m.create(s).unwrap();
    m.create(env.spec(2)).unwrap(); // destroy policy, 60 s
    let expire = |id| m.expire(id);

    env.clock.advance(Duration::from_secs(59));
    assert!(m.reaper().tick(env.clock.as_ref(), &expire).is_empty());
    m.ping(Uuid::from_u128(1)).unwrap(); // now expires at 119 s
    env.clock.advance(Duration::from_secs(2));
    let fired = m.reaper().tick(env.clock.as_ref(), &expire);
    assert_eq!(fired, vec![Uuid::from_u128(2)]);
    assert_eq!(m.get(Uuid::from_u128(2)).unwrap_err().code, Code::NotFound);
    assert!(!env.dir(2).exists());
    assert_eq!(state(&m.get(Uuid::from_u128(1)).unwrap()), State::Running);

    env.clock.advance(Duration::from_secs(58));
    assert_eq!(
        m.reaper().tick(env.clock.as_ref(), &expire),
        vec![Uuid::from_u128(1)]
    );
    let info = m.get(Uuid::from_u128(1)).unwrap();
    assert_eq!(state(&info), State::Paused);
    assert_eq!(info.state_reason, "timeout");

    let reports = env.events.0.lock().unwrap().clone();
    assert_eq!(reports.len(), 2, "{reports:?}");
    assert!(reports
        .iter()
        .all(|r| r.reason == StateChangeReason::Timeout as i32));
    assert_eq!(
        reports[0].state,
        proto::sandbox::SandboxState::Stopped as i32
    );
    assert_eq!(
        reports[1].state,
        proto::sandbox::SandboxState::Paused as i32
    );
    assert_eq!(
        reports[1].previous_state,
        proto::sandbox::SandboxState::Running as i32
    );

    // Resume restarts the timeout from now; set-timeout moves it.
    let info = m.resume(Uuid::from_u128(1), 30).unwrap();
    let now = agent::ttl::Clock::now_unix_ns(env.clock.as_ref());
    assert_eq!(info.expires_unix_ns, now + 30_000_000_000);
    let info = m.set_timeout(Uuid::from_u128(1), 5, 0).unwrap();
    assert_eq!(info.expires_unix_ns, now + 5_000_000_000);
    assert_eq!(
        m.reaper().get(Uuid::from_u128(1)),
        Some(now + 5_000_000_000)
    );
    // A stale deadline (ping came after the reaper took it) keeps the sandbox running.
    m.ping(Uuid::from_u128(1)).unwrap();
    assert_eq!(m.expire(Uuid::from_u128(1)), Outcome::Done);
    assert_eq!(state(&m.get(Uuid::from_u128(1)).unwrap()), State::Running);
    m.destroy(Uuid::from_u128(1)).unwrap();
}

#[test]
fn failed_create_cleans_up_everything() {
    let env = Env::new("failcreate");
    let m = &env.manager;
    *env.vmm.fail_next.lock().unwrap() = Some("boot");
    let e = m.create(env.spec(1)).unwrap_err();
    assert_eq!(e.code, Code::Unavailable, "{e}");
    assert!(!env.dir(1).exists());
    assert_eq!(m.slots_used(), 0);
    assert!(env.vmm.slots.lock().unwrap().is_empty());
    assert!(m.list(&[]).is_empty());
    // The id is free again.
    m.create(env.spec(1)).unwrap();
    m.destroy(Uuid::from_u128(1)).unwrap();

    env.vmm.problems.lock().unwrap().push("no kvm".into());
    let e = m.create(env.spec(4)).unwrap_err();
    assert_eq!(e.code, Code::Unavailable);
    assert!(e.message.contains("no kvm"), "{e}");
}

#[test]
fn failed_pause_keeps_or_fails_and_failed_resume_stays_paused() {
    let env = Env::new("failpause");
    let m = &env.manager;
    let id = Uuid::from_u128(1);
    m.create(env.spec(1)).unwrap();
    *env.vmm.fail_next.lock().unwrap() = Some("snapshot-keep");
    assert_eq!(m.pause(id).unwrap_err().code, Code::Unavailable);
    let info = m.get(id).unwrap();
    assert_eq!(state(&info), State::Running);
    assert!(info.state_reason.contains("pause failed"));
    assert!(m.reaper().get(id).is_some(), "timeout runs again");

    m.pause(id).unwrap();
    *env.vmm.fail_next.lock().unwrap() = Some("restore");
    assert_eq!(m.resume(id, 0).unwrap_err().code, Code::Unavailable);
    let info = m.get(id).unwrap();
    assert_eq!(state(&info), State::Paused, "chain intact, still paused");
    assert_eq!(m.slots_used(), 0, "slot of the failed restore released");
    m.resume(id, 0).unwrap();

    *env.vmm.fail_next.lock().unwrap() = Some("snapshot");
    assert_eq!(m.pause(id).unwrap_err().code, Code::Unavailable);
    assert_eq!(state(&m.get(id).unwrap()), State::Error);
    assert_eq!(env.vmm.running(), 0);
    assert_eq!(m.slots_used(), 0);
    m.destroy(id).unwrap();
    assert!(!env.dir(1).exists());
}

#[test]
fn the_manager_records_what_a_snapshot_returns_and_what_a_failed_one_leaves() {
    // The VM layer returns the new chain, or an error saying Firecracker's dirty-page log
    // may be gone; the manager alone writes the record.
    let env = Env::new("snapoutcome");
    let m = &env.manager;
    let id = Uuid::from_u128(1);
    m.create(env.spec(1)).unwrap();
    let load = || SandboxRecord::load(&SandboxDir(env.dir(1))).unwrap();
    assert!(!load().full_snapshot_taken, "a cold boot has taken none");
    m.pause(id).unwrap();
    let paused = load();
    assert!(paused.full_snapshot_taken);
    let generation = paused.chain.as_ref().unwrap().generation;
    m.resume(id, 0).unwrap();
    assert!(load().full_snapshot_taken);
    *env.vmm.fail_next.lock().unwrap() = Some("snapshot-keep");
    assert_eq!(m.pause(id).unwrap_err().code, Code::Unavailable);
    let failed = load();
    assert!(
        !failed.full_snapshot_taken,
        "the next snapshot must be Full"
    );
    assert_eq!(failed.chain.as_ref().unwrap().generation, generation);
    m.pause(id).unwrap();
    let again = load();
    assert!(again.full_snapshot_taken);
    assert_eq!(again.chain.as_ref().unwrap().generation, generation + 1);
    m.destroy(id).unwrap();
}

#[test]
fn slots_run_out_and_come_back() {
    let env = Env::with_slots("slots", 2);
    let m = &env.manager;
    m.create(env.spec(1)).unwrap();
    m.create(env.spec(2)).unwrap();
    let e = m.create(env.spec(3)).unwrap_err();
    assert_eq!(e.code, Code::ResourceExhausted);
    assert!(!env.dir(3).exists());
    // A paused sandbox frees its slot; it needs one again to resume.
    m.pause(Uuid::from_u128(1)).unwrap();
    m.create(env.spec(3)).unwrap();
    assert_eq!(
        m.resume(Uuid::from_u128(1), 0).unwrap_err().code,
        Code::ResourceExhausted
    );
    assert_eq!(state(&m.get(Uuid::from_u128(1)).unwrap()), State::Paused);
    m.destroy(Uuid::from_u128(3)).unwrap();
    m.resume(Uuid::from_u128(1), 0).unwrap();
    let u = m.usage();
    assert_eq!((u.running, u.vcpus, u.memory_mib), (2, 2, 1024));
    for n in [1, 2] {
        m.destroy(Uuid::from_u128(n)).unwrap();
    }
    assert_eq!(m.slots_used(), 0);
}

#[test]
fn a_vm_that_dies_becomes_error_and_is_reported() {
    let env = Env::new("death");
    let m = &env.manager;
    m.create(env.spec(1)).unwrap();
    m.create(env.spec(2)).unwrap();
    assert_eq!(m.check_vms(), 0);
    env.vmm.kill_firecracker(&env.dir(1));
    assert_eq!(m.check_vms(), 1);
    let info = m.get(Uuid::from_u128(1)).unwrap();
    assert_eq!(state(&info), State::Error);
    assert!(
        info.state_reason.contains("exited"),
        "{}",
        info.state_reason
    );
    assert_eq!(m.slots_used(), 1);
    let r = env.events.0.lock().unwrap().clone();
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].reason, StateChangeReason::VmExited as i32);
    assert_eq!(r[0].state, proto::sandbox::SandboxState::Error as i32);
    assert_eq!(m.reaper().get(Uuid::from_u128(1)), None);
    m.destroy(Uuid::from_u128(1)).unwrap();
    m.destroy(Uuid::from_u128(2)).unwrap();
}

#[test]
fn operations_on_one_sandbox_are_serialized_others_proceed() {
    let env = Env::new("serial");
    let m = env.manager.clone();
    m.create(env.spec(1)).unwrap();
    m.create(env.spec(2)).unwrap();
    *env.vmm.snapshot_delay.lock().unwrap() = Duration::from_millis(800);
    let m2 = m.clone();
    let t = std::thread::spawn(move || m2.pause(Uuid::from_u128(1)));
    std::thread::sleep(Duration::from_millis(200));
    // Sandbox 1 is mid-pause: a second operation is refused at once.
    let started = std::time::Instant::now();
    assert_eq!(m.ping(Uuid::from_u128(1)).unwrap_err().code, Code::Aborted);
    assert_eq!(
        m.destroy(Uuid::from_u128(1)).unwrap_err().code,
        Code::Aborted
    );
    assert_eq!(m.expire(Uuid::from_u128(1)), Outcome::Busy);
    // Reads and other sandboxes are not blocked by it.
    assert_eq!(state(&m.get(Uuid::from_u128(1)).unwrap()), State::Pausing);
    m.ping(Uuid::from_u128(2)).unwrap();
    assert!(started.elapsed() < Duration::from_millis(400));
    t.join().unwrap().unwrap();
    *env.vmm.snapshot_delay.lock().unwrap() = Duration::ZERO;
    m.destroy(Uuid::from_u128(1)).unwrap();
    m.destroy(Uuid::from_u128(2)).unwrap();
}

#[test]
fn restart_readopts_live_vms_and_reports_dead_ones() {
    let env = Env::new("readopt");
    let m = env.manager.clone();
    for n in 1..=4 {
        m.create(env.spec(n)).unwrap();
    }
    m.pause(Uuid::from_u128(3)).unwrap();
    // Sandbox 4's record says it was being created when the agent died.
    let d4 = SandboxDir(env.dir(4));
    let mut r4 = SandboxRecord::load(&d4).unwrap();
    r4.state = State::Starting;
    r4.save(&d4).unwrap();
    // A stray process naming a sandbox directory the records do not know.
    let stray_dir = env
        .root
        .join("sandboxes/00000000-0000-0000-0000-0000000000ff");
    let mut stray = std::process::Command::new("sh")
        .arg("-c")
        .arg("sleep 100; : \"$0\"")
        .arg(stray_dir.join("fc.sock"))
        .spawn()
        .unwrap();
    // A leftover slot no record holds.
    env.vmm.slots.lock().unwrap().insert(50);
    // The agent "crashes": nothing is cleaned up. Sandbox 2's VM dies meanwhile.
    drop(m);
    env.vmm.kill_firecracker(&env.dir(2));

    let m = crate::Env::manager_on(&env.root, 64, &env.vmm, &env.clock, &env.events);
    let decisions = m.recover();
    assert_eq!(decisions.len(), 4);
    use agent::manager::Action;
    let d = |n: u128| {
        decisions
            .iter()
            .find(|(id, _)| *id == Uuid::from_u128(n))
            .unwrap()
            .1
            .clone()
    };
    assert_eq!(d(1).action, Action::Adopt);
    assert_eq!(d(2).state, State::Error);
    assert_eq!(d(3).state, State::Paused);
    assert_eq!(d(4).state, State::Error);
    assert_eq!(state(&m.get(Uuid::from_u128(1)).unwrap()), State::Running);
    assert!(m
        .get(Uuid::from_u128(2))
        .unwrap()
        .state_reason
        .contains("exited while the agent was down"));
    // The adopted sandbox is usable and keeps its slot; no other slot survives.
    m.envd(Uuid::from_u128(1)).unwrap().close();
    assert_eq!(m.slots_used(), 1);
    assert_eq!(env.vmm.slots.lock().unwrap().len(), 1);
    assert_eq!(env.vmm.running(), 1, "only the adopted VM runs");
    // The stray was killed.
    let mut gone = false;
    for _ in 0..100 {
        // Reaped by the agent already (same process here): ECHILD.
        if !matches!(stray.try_wait(), Ok(None)) {
            gone = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(gone, "stray process still alive");
    let reports = env.events.0.lock().unwrap().clone();
    let failed: Vec<_> = reports
        .iter()
        .filter(|r| r.reason == StateChangeReason::AdoptionFailed as i32)
        .collect();
    assert_eq!(failed.len(), 2, "{reports:?}");
    // Paused and error sandboxes work after the restart.
    m.resume(Uuid::from_u128(3), 0).unwrap();
    for n in 1..=4 {
        m.destroy(Uuid::from_u128(n)).unwrap();
    }
    assert_eq!(m.slots_used(), 0);
    assert_eq!(env.vmm.running(), 0);
    let left: Vec<_> = std::fs::read_dir(env.root.join("sandboxes"))
        .unwrap()
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn corrupt_record_becomes_error_and_destroy_removes_it() {
    let env = Env::new("corrupt");
    let dir = env.dir(9);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("sandbox.conf"), "garbage").unwrap();
    let d = env.manager.recover();
    assert_eq!(d.len(), 1);
    let info = env.manager.get(Uuid::from_u128(9)).unwrap();
    assert_eq!(state(&info), State::Error);
    assert!(info.state_reason.contains("record unreadable"));
    env.manager.destroy(Uuid::from_u128(9)).unwrap();
    assert!(!dir.exists());
}

#[test]
fn snapshot_templates_are_independent_of_their_sandbox() {
    let env = Env::new("template");
    let m = env.manager.clone();
    m.create(env.spec(1)).unwrap();
    let g = env.vmm.envd(&env.dir(1)).unwrap();
    g.files
        .lock()
        .unwrap()
        .insert("/data".into(), b"v1".to_vec());
    let tpl = Uuid::from_u128(0x77);
    let t = m.create_template(Uuid::from_u128(1), tpl).unwrap();
    assert_eq!(t.kind, proto::sandbox::TemplateKind::Snapshot as i32);
    assert_eq!(
        t.working_set_pages, 3,
        "working set recorded before publishing"
    );
    assert_eq!(env.vmm.working_sets_recorded.load(Ordering::SeqCst), 1);
    assert!(t.size_bytes > 0);
    assert_eq!(state(&m.get(Uuid::from_u128(1)).unwrap()), State::Paused);
    assert_eq!(m.slots_used(), 0, "the recording restore released its slot");
    assert_eq!(
        m.create_template(Uuid::from_u128(1), tpl).unwrap_err().code,
        Code::AlreadyExists
    );
    // Deleting the source sandbox never breaks the template.
    m.destroy(Uuid::from_u128(1)).unwrap();

    // Three sandboxes from the template, in parallel; each independent.
    let mut threads = Vec::new();
    for n in 10..13u128 {
        let m = m.clone();
        let mut s = env.spec(n);
        s.template_id = id::format_template(tpl);
        s.template_kind = TemplateKind::Snapshot as i32;
        s.vcpus = 4; // ignored: the snapshot's values hold
        threads.push(std::thread::spawn(move || m.create(s)));
    }
    for t in threads {
        let info = t.join().unwrap().unwrap();
        assert_eq!(info.vcpus, 1);
    }
    for n in 10..13u128 {
        let g = env.vmm.envd(&env.dir(n)).unwrap();
        assert_eq!(g.files.lock().unwrap().get("/data").unwrap(), b"v1");
        assert_eq!(g.resumed.load(Ordering::SeqCst), 1);
        g.files
            .lock()
            .unwrap()
            .insert(format!("/own-{n}"), b"x".to_vec());
    }
    for n in 10..13u128 {
        let g = env.vmm.envd(&env.dir(n)).unwrap();
        let files = g.files.lock().unwrap();
        assert_eq!(files.len(), 2, "sandbox {n} sees only its own writes");
    }
    // Sandbox 10 pauses on top of the template's shared layers; then the template goes;
    // sandbox 10 still resumes with its data.
    m.pause(Uuid::from_u128(10)).unwrap();
    let rec = SandboxRecord::load(&SandboxDir(env.dir(10))).unwrap();
    let tdir = env
        .root
        .join("templates")
        .join(tpl.hyphenated().to_string());
    let chain = rec.chain.as_ref().unwrap();
    assert_eq!(chain.layer_dirs.len(), 1);
    assert!(
        chain.layer_dirs[0].starts_with(env.dir(10).join("snapshot")),
        "own view of the layers"
    );
    // The template's layers are shared (hard links), not copied.
    let header = uffd::header::Header::parse(&std::fs::read(&chain.header).unwrap()).unwrap();
    use std::os::unix::fs::MetadataExt;
    let shared = header
        .layers
        .iter()
        .filter(|l| {
            let p = tdir.join("snapshot").join(l.build_id.layer_file_name());
            p.exists() && std::fs::metadata(&p).unwrap().nlink() > 1
        })
        .count();
    assert!(shared >= 1, "no layer shared with the template");
    m.delete_template(tpl).unwrap();
    assert!(!tdir.exists());
    assert_eq!(m.delete_template(tpl).unwrap_err().code, Code::NotFound);
    m.resume(Uuid::from_u128(10), 0).unwrap();
    let g = env.vmm.envd(&env.dir(10)).unwrap();
    assert_eq!(g.files.lock().unwrap().get("/own-10").unwrap(), b"x");
    for n in 10..13u128 {
        m.destroy(Uuid::from_u128(n)).unwrap();
    }
    assert_eq!(
        m.list_templates().len(),
        1,
        "only the base template is left"
    );
    assert_eq!(
        m.list_templates()[0].template_id,
        proto::id::format_template(BASE)
    );
}

#[test]
fn jail_uids_are_held_with_the_slot_and_survive_a_restart() {
    use agent::manager::{Config, Manager};
    use agent::uid_pool::UidRange;
    let env = Env::new("uids");
    let manager = || {
        let mut cfg = Config::new(&env.root);
        cfg.jail_uids = Some(UidRange {
            base: 7_340_000,
            count: 3,
        });
        Manager::new(cfg, env.vmm.clone(), env.clock.clone(), env.events.clone()).unwrap()
    };
    let uid = |n: u128| {
        SandboxRecord::load(&SandboxDir(env.dir(n)))
            .unwrap()
            .jail_uid
    };
    let m = manager();
    m.recover();
    for n in 1..=3 {
        m.create(env.spec(n)).unwrap();
    }
    let held: std::collections::BTreeSet<_> = (1..=3).map(|n| uid(n).unwrap()).collect();
    assert_eq!(held.len(), 3, "three sandboxes, three uids");
    assert!(held.iter().all(|u| (7_340_000..7_340_003).contains(u)));
    assert_eq!(m.uids_used(), 3);
    // No uid left: a fourth sandbox is refused, and holds no slot either.
    let e = m.create(env.spec(4)).unwrap_err();
    assert_eq!(e.code, Code::ResourceExhausted);
    assert!(e.message.contains("jail uids"), "{}", e.message);
    assert_eq!(m.slots_used(), 3);
    // Pause gives the uid back; resume needs one again.
    m.pause(Uuid::from_u128(1)).unwrap();
    assert_eq!(uid(1), None);
    assert_eq!(m.uids_used(), 2);
    m.create(env.spec(4)).unwrap();
    assert_eq!(
        m.resume(Uuid::from_u128(1), 0).unwrap_err().code,
        Code::ResourceExhausted
    );
    m.destroy(Uuid::from_u128(4)).unwrap();
    assert_eq!(m.uids_used(), 2, "destroy gives it back");
    m.resume(Uuid::from_u128(1), 0).unwrap();
    assert!(uid(1).is_some());

    // The agent restarts: the live sandboxes' uids are marked before anything is created.
    drop(m);
    let m = manager();
    m.recover();
    assert_eq!(m.uids_used(), 3);
    assert_eq!(
        m.create(env.spec(5)).unwrap_err().code,
        Code::ResourceExhausted
    );
    let two = uid(2).unwrap();
    m.destroy(Uuid::from_u128(2)).unwrap();
    m.create(env.spec(5)).unwrap();
    assert_eq!(uid(5), Some(two), "the only free uid");
    let all: std::collections::BTreeSet<_> = [1, 3, 5].iter().map(|n| uid(*n).unwrap()).collect();
    assert_eq!(all.len(), 3, "never shared");
    for n in [1, 3, 5] {
        m.destroy(Uuid::from_u128(n)).unwrap();
    }
    assert_eq!(m.uids_used(), 0);
}

/// A jailed Firecracker that no record names (the agent died between its start and the
/// record) names no sandbox directory either: a restarted agent finds it by its uid.
#[test]
fn recovery_kills_processes_of_jail_uids_no_record_holds() {
    use agent::manager::{Config, Manager};
    use agent::uid_pool::UidRange;
    use std::os::unix::process::CommandExt;
    let root = std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"));
    if !root {
        crate::skip("recovery of stray jailed processes needs root (a process of another uid)");
        return;
    }
    let env = Env::new("stray-uid");
    let base = 7_350_000;
    let sleep_as = |uid: u32| {
        std::process::Command::new("/bin/sleep")
            .arg("60")
            .uid(uid)
            .gid(uid)
            .spawn()
            .unwrap()
    };
    let mut stray = sleep_as(base + 1);
    // Another agent's process with a uid of the same range: no chroot of ours names it.
    let mut foreign = sleep_as(base + 2);
    // The jailer's pid file in a chroot of this agent names the stray.
    let chroots = env.root.join("jail");
    let root = chroots.join("firecracker/00000000-0000-0000-0000-0000000000aa/root");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("firecracker.pid"), format!("{}\n", stray.id())).unwrap();
    let mut cfg = Config::new(&env.root);
    cfg.jail_uids = Some(UidRange { base, count: 3 });
    cfg.jail_chroot_base = Some(chroots);
    let m = Manager::new(cfg, env.vmm.clone(), env.clock.clone(), env.events.clone()).unwrap();
    let pid = stray.id();
    m.recover();
    assert!(
        foreign.try_wait().unwrap().is_none(),
        "a process of the range that no chroot of this agent names was killed"
    );
    let _ = foreign.kill();
    let _ = foreign.wait();
    // Killed and reaped by the recovery (it is this process's child here): gone from /proc.
    let gone = || {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .map_or(true, |s| s.lines().any(|l| l.starts_with("State:\tZ")))
    };
    let end = std::time::Instant::now() + Duration::from_secs(10);
    while !gone() {
        assert!(
            std::time::Instant::now() < end,
            "the stray process of a jail uid survived recovery"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = stray.kill();
    let _ = stray.try_wait();
}

/// The egress policy is part of the sandbox (its spec's `network`): on its slot from the
/// start, changed at once by UpdateNetwork, on the new slot after a resume, handed to
/// re-adoption after a restart, and never copied into a template or the sandboxes made from it.
#[test]
fn egress_policy_follows_the_sandbox() {
    use proto::sandbox::NetworkPolicy;
    use vmm_glue::net::Egress;
    let env = Env::new("egress");
    let m = env.manager.clone();
    let id = Uuid::from_u128(1);
    let only = |what: &str| NetworkPolicy {
        allow_internet_access: Some(false),
        deny_out: vec![],
        allow_out: vec![what.to_string()],
    };
    let egress = |p: &NetworkPolicy| agent::manager::egress_of(Some(p)).unwrap();
    let slot_policy = || {
        let rec = SandboxRecord::load(&SandboxDir(env.dir(1))).unwrap();
        let index = rec.slot.expect("running sandbox holds a slot");
        let got = env.vmm.egress.lock().unwrap().get(&index).cloned().unwrap();
        assert_eq!(
            got,
            agent::manager::egress_of(rec.spec.network.as_ref()).unwrap(),
            "slot and record agree"
        );
        got
    };
    let mut spec = env.spec(1);
    spec.network = Some(only("*.example.com"));
    m.create(spec).unwrap();
    assert_eq!(slot_policy(), egress(&only("*.example.com")));

    m.update_network(id, Some(only("203.0.113.0/24"))).unwrap();
    assert_eq!(slot_policy(), egress(&only("203.0.113.0/24")));

    // Paused: no slot; the update is stored and applied on resume.
    m.pause(id).unwrap();
    m.update_network(id, Some(only("api.example.org"))).unwrap();
    m.resume(id, 0).unwrap();
    assert_eq!(slot_policy(), egress(&only("api.example.org")));

    // Restart: re-adoption gets the stored policy.
    env.vmm.egress.lock().unwrap().clear();
    drop(m);
    let m = crate::Env::manager_on(&env.root, 64, &env.vmm, &env.clock, &env.events);
    m.recover();
    assert_eq!(slot_policy(), egress(&only("api.example.org")));

    // A bad policy is refused, naming the item, and changes nothing.
    let e = m.update_network(id, Some(only("bad name"))).unwrap_err();
    assert_eq!(e.code, Code::InvalidArgument);
    assert!(e.message.contains("bad name"), "{e}");
    let many = NetworkPolicy {
        deny_out: vec!["1.2.3.4".into(); 257],
        ..NetworkPolicy::default()
    };
    assert_eq!(
        m.update_network(id, Some(many)).unwrap_err().code,
        Code::InvalidArgument
    );
    assert_eq!(slot_policy(), egress(&only("api.example.org")));
    assert_eq!(
        m.update_network(Uuid::from_u128(9), None).unwrap_err().code,
        Code::NotFound
    );
    // And at create.
    let mut bad = env.spec(3);
    bad.network = Some(only("::1"));
    assert_eq!(m.create(bad).unwrap_err().code, Code::InvalidArgument);

    // A template does not carry its source's policy.
    let tpl = Uuid::from_u128(0x78);
    m.create_template(id, tpl).unwrap();
    let mut s = env.spec(2);
    s.template_id = proto::id::format_template(tpl);
    s.template_kind = proto::sandbox::TemplateKind::Snapshot as i32;
    m.create(s).unwrap();
    let rec2 = SandboxRecord::load(&SandboxDir(env.dir(2))).unwrap();
    assert_eq!(rec2.spec.network, None);
    let got = env.vmm.egress.lock().unwrap()[&rec2.slot.unwrap()].clone();
    assert_eq!(got, Egress::default());
}

#[test]
fn recovery_takes_the_newest_complete_generation_and_a_full_snapshot_after_a_cut_pause() {
    let env = Env::new("generations");
    let m = env.manager.clone();
    let id = Uuid::from_u128(1);
    m.create(env.spec(1)).unwrap();
    m.pause(id).unwrap();
    let d = SandboxDir(env.dir(1));
    let first = SandboxRecord::load(&d).unwrap();
    m.resume(id, 0).unwrap();
    *env.vmm.fail_next.lock().unwrap() = Some("keep-old-generations");
    m.pause(id).unwrap();
    let second = SandboxRecord::load(&d).unwrap();
    assert_ne!(first.chain, second.chain);
    // The agent died after the second generation was renamed into place but before the
    // record named it; a third pause was cut before its rename.
    let mut cut = second.clone();
    cut.chain = first.chain.clone();
    cut.save(&d).unwrap();
    std::fs::create_dir(d.snapshot().join("gen-00000000000000000003.tmp")).unwrap();
    drop(m);
    let m = crate::Env::manager_on(&env.root, 64, &env.vmm, &env.clock, &env.events);
    m.recover();
    let rec = SandboxRecord::load(&d).unwrap();
    assert_eq!(
        rec.chain, second.chain,
        "the newest complete generation wins"
    );
    let gens: Vec<String> = std::fs::read_dir(d.snapshot())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("gen-"))
        .collect();
    assert_eq!(gens, vec!["gen-00000000000000000002".to_owned()]);
    m.resume(id, 0).unwrap();
    m.destroy(id).unwrap();

    // A pause cut by an agent restart while Firecracker lives: the VM runs again and its
    // next snapshot is Full (its dirty-page log may have been reset unpublished).
    let id2 = Uuid::from_u128(2);
    m.create(env.spec(2)).unwrap();
    m.pause(id2).unwrap();
    m.resume(id2, 0).unwrap();
    let d2 = SandboxDir(env.dir(2));
    let mut r2 = SandboxRecord::load(&d2).unwrap();
    assert!(r2.full_snapshot_taken);
    r2.state = State::Pausing;
    r2.save(&d2).unwrap();
    drop(m);
    let m = crate::Env::manager_on(&env.root, 64, &env.vmm, &env.clock, &env.events);
    m.recover();
    let r2 = SandboxRecord::load(&d2).unwrap();
    assert_eq!(r2.state, State::Running);
    assert!(!r2.full_snapshot_taken, "next snapshot must be Full");
    m.destroy(id2).unwrap();
}

/// Issue 17 §1: the spec's process defaults (a template's USER, WORKDIR and ENV, sent by
/// ctl) reach envd at create, again at every resume (also after an agent restart, from the
/// record), and a sandbox from a snapshot template gets its own spec's, not its source's.
#[test]
fn process_defaults_reach_envd_at_create_resume_and_from_a_template() {
    let env = Env::new("defaults");
    let m = env.manager.clone();
    let mut spec = env.spec(1);
    spec.default_user = "web".into();
    spec.default_cwd = "/app".into();
    spec.env.insert("PORT".into(), "8080".into());
    m.create(spec).unwrap();
    let seen = |n: u128| {
        let g = env.vmm.envd(&env.dir(n)).unwrap();
        let d = g.defaults.lock().unwrap().clone();
        let mut e: Vec<(String, String)> = g.env.lock().unwrap().clone().into_iter().collect();
        e.sort();
        (d, e)
    };
    let want = (
        ("web".to_string(), "/app".to_string()),
        vec![
            ("GREETING".to_string(), "hi".to_string()),
            ("PORT".to_string(), "8080".to_string()),
        ],
    );
    assert_eq!(seen(1), want);
    // Forget them in the guest before the snapshot: a resume must send them again.
    let forget = |n: u128| {
        let g = env.vmm.envd(&env.dir(n)).unwrap();
        *g.defaults.lock().unwrap() = Default::default();
        g.env.lock().unwrap().clear();
    };
    forget(1);
    m.pause(Uuid::from_u128(1)).unwrap();
    m.resume(Uuid::from_u128(1), 0).unwrap();
    assert_eq!(seen(1), want);
    // After an agent restart, from the record.
    forget(1);
    m.pause(Uuid::from_u128(1)).unwrap();
    drop(m);
    let m = crate::Env::manager_on(&env.root, 64, &env.vmm, &env.clock, &env.events);
    m.recover();
    m.resume(Uuid::from_u128(1), 0).unwrap();
    assert_eq!(seen(1), want);
    // A snapshot template of it; a sandbox from the template gets the defaults its spec
    // carries (ctl sends the template's), not what the source sandbox had.
    let tpl = Uuid::from_u128(0x78);
    m.create_template(Uuid::from_u128(1), tpl).unwrap();
    let mut s = env.spec(2);
    s.template_id = id::format_template(tpl);
    s.template_kind = TemplateKind::Snapshot as i32;
    s.default_user = "other".into();
    s.default_cwd = "/srv".into();
    s.env = [("ONLY".to_string(), "this".to_string())].into();
    m.create(s).unwrap();
    assert_eq!(
        seen(2),
        (
            ("other".to_string(), "/srv".to_string()),
            vec![("ONLY".to_string(), "this".to_string())]
        )
    );
    for n in 1..=2 {
        m.destroy(Uuid::from_u128(n)).unwrap();
    }
}

/// Issue 15 §1: with the File backend a snapshot template is published with one memory file
/// (whole, sparse, read-only), every create from the template is given that file (the same
/// inode; nothing is written for the sandbox), a resume is given none (its own chain goes
/// through wrenn-uffd); a template published under the uffd backend gets its file once, at
/// the first File-backed create.
#[test]
fn file_backed_creates_from_a_template_share_its_one_memory_file() {
    use std::os::unix::fs::MetadataExt;
    let env = Env::new("tplmem");
    let m = env.manager.clone();
    env.vmm.file_backend.store(true, Ordering::SeqCst);
    m.create(env.spec(1)).unwrap();
    let tpl = Uuid::from_u128(0x79);
    m.create_template(Uuid::from_u128(1), tpl).unwrap();
    let tdir = env
        .root
        .join("templates")
        .join(tpl.hyphenated().to_string());
    let mem = tdir.join("memory");
    let meta = std::fs::metadata(&mem).expect("published with the template");
    assert_eq!(meta.mode() & 0o7777, 0o444);
    // The fake chain: 16 pages, one page of data (7s) per generation; the rest holes.
    assert_eq!(meta.len(), 16 * 4096);
    assert!(
        meta.blocks() * 512 < meta.len(),
        "sparse: {} blocks",
        meta.blocks()
    );
    let bytes = std::fs::read(&mem).unwrap();
    assert_eq!(bytes.iter().filter(|&&b| b == 7).count(), 4096);
    assert_eq!(bytes.iter().filter(|&&b| b == 0).count(), 15 * 4096);
    env.vmm.template_memory.lock().unwrap().clear();
    for n in 10..13u128 {
        let mut s = env.spec(n);
        s.template_id = id::format_template(tpl);
        s.template_kind = TemplateKind::Snapshot as i32;
        m.create(s).unwrap();
        assert!(!env.dir(n).join("snapshot/memory").exists());
    }
    let given = env.vmm.template_memory.lock().unwrap().clone();
    assert_eq!(
        given,
        vec![Some(mem.clone()); 3],
        "each create got the template's file"
    );
    let after = std::fs::metadata(&mem).unwrap();
    assert_eq!(
        (after.ino(), after.mtime_nsec(), after.len()),
        (meta.ino(), meta.mtime_nsec(), meta.len()),
        "never written again"
    );
    // A resume restores its own chain.
    env.vmm.template_memory.lock().unwrap().clear();
    m.pause(Uuid::from_u128(10)).unwrap();
    m.resume(Uuid::from_u128(10), 0).unwrap();
    assert_eq!(*env.vmm.template_memory.lock().unwrap(), vec![None]);

    // Published while the agent used wrenn-uffd: no file; the first File-backed create
    // writes it, the next ones reuse it.
    env.vmm.file_backend.store(false, Ordering::SeqCst);
    let tpl2 = Uuid::from_u128(0x7a);
    m.create_template(Uuid::from_u128(11), tpl2).unwrap();
    let mem2 = env
        .root
        .join("templates")
        .join(tpl2.hyphenated().to_string())
        .join("memory");
    assert!(!mem2.exists());
    let mut s = env.spec(20);
    s.template_id = id::format_template(tpl2);
    s.template_kind = TemplateKind::Snapshot as i32;
    env.vmm.template_memory.lock().unwrap().clear();
    m.create(s.clone()).unwrap();
    assert_eq!(*env.vmm.template_memory.lock().unwrap(), vec![None]);
    env.vmm.file_backend.store(true, Ordering::SeqCst);
    s.sandbox_id = id::format_sandbox(Uuid::from_u128(21));
    m.create(s.clone()).unwrap();
    let ino = std::fs::metadata(&mem2).unwrap().ino();
    s.sandbox_id = id::format_sandbox(Uuid::from_u128(22));
    m.create(s).unwrap();
    assert_eq!(std::fs::metadata(&mem2).unwrap().ino(), ino, "written once");
    assert_eq!(
        *env.vmm.template_memory.lock().unwrap(),
        vec![None, Some(mem2.clone()), Some(mem2.clone())]
    );
    for n in [1, 10, 11, 12, 20, 21, 22] {
        m.destroy(Uuid::from_u128(n)).unwrap();
    }
}
