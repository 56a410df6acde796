//! The table of API subcommands: their flags, arguments and help. `mod.rs` runs them.

#![forbid(unsafe_code)]

use proto::gen::wrenn::ctl::v1::{
    api_keys_methods as keys, audit_logs_methods as audit, files_methods as files,
    hosts_methods as hosts, ports_methods as ports, processes_methods as procs,
    sandboxes_methods as sb, teams_methods as teams, templates_methods as tpl,
    users_methods as users, webhooks_methods as wh,
};

use super::args::{Arg, Command, Flag};

const fn arg(name: &'static str, help: &'static str) -> Arg {
    Arg {
        name,
        required: true,
        help,
    }
}
const fn opt(name: &'static str, help: &'static str) -> Arg {
    Arg {
        name,
        required: false,
        help,
    }
}
const fn val(name: &'static str, value: &'static str, help: &'static str) -> Flag {
    Flag {
        name,
        value: Some(value),
        repeat: false,
        help,
    }
}
const fn rep(name: &'static str, value: &'static str, help: &'static str) -> Flag {
    Flag {
        name,
        value: Some(value),
        repeat: true,
        help,
    }
}
const fn on(name: &'static str, help: &'static str) -> Flag {
    Flag {
        name,
        value: None,
        repeat: false,
        help,
    }
}

const SB: Arg = arg("SANDBOX", "sandbox id (sb-...)");
const PAGE: [Flag; 3] = [
    val(
        "page-size",
        "N",
        "entries per page (default 100, at most 1000)",
    ),
    val(
        "page-token",
        "TOKEN",
        "the next_page_token of the previous page",
    ),
    on("all", "follow next_page_token to the last page"),
];
const NET: [Flag; 3] = [
    on(
        "no-internet",
        "deny everything not allowed (allow_internet_access: false)",
    ),
    rep(
        "deny-out",
        "CIDR",
        "refuse this address or network unless allowed",
    ),
    rep(
        "allow-out",
        "CIDR|DOMAIN",
        "always allow (except never_out): address, network, example.com, *.example.com",
    ),
];
const PROC: [Flag; 2] = [
    val("pid", "PID", "the process, by pid"),
    val("tag", "TAG", "the process, by tag"),
];

macro_rules! cmd {
    ($path:expr, $rpcs:expr, $about:expr, [$($a:expr),*], [$($f:expr),*]) => {
        Command { path: $path, rpcs: $rpcs, about: $about, args: &[$($a),*], flags: &[$($f),*], rest: None }
    };
}

pub static COMMANDS: &[Command] = &[
    cmd!("sandbox create", &[sb::CREATE], "Create a sandbox from a template and print it (waits until it runs unless --no-wait).", [], [
        val("template", "NAME|ID", "template (default: minimal)"),
        val("vcpus", "N", "vCPUs (default: the template's)"),
        val("memory", "MIB", "guest memory in MiB (default: the template's)"),
        val("disk", "MIB", "root disk in MiB (default: the template's)"),
        val("timeout", "SECONDS", "seconds until the timeout policy applies (default 300)"),
        val("on-timeout", "pause|destroy", "what happens at expiry (default destroy)"),
        rep("meta", "KEY=VALUE", "metadata label"),
        rep("env", "KEY=VALUE", "environment variable for every process"),
        on("no-wait", "answer at once (state pending/starting)"),
        on("public-traffic", "its ports answer through ctl's traffic proxy without the traffic token (default: token or API key required)"),
        on("auto-resume", "when paused, the first request to one of its ports through ctl's traffic proxy resumes it (default: 409)"),
        NET[0], NET[1], NET[2]]),
    cmd!("sandbox list", &[sb::LIST], "List the team's sandboxes, newest first.", [], [
        rep("state", "STATE", "only this state (running, paused, stopped, ...)"),
        val("template", "ID", "only sandboxes from this template (tpl-...)"),
        rep("meta", "KEY=VALUE", "only sandboxes with this label"),
        PAGE[0], PAGE[1], PAGE[2]]),
    cmd!("sandbox get", &[sb::GET], "Show one sandbox.", [SB], []),
    cmd!("sandbox rm", &[sb::DESTROY], "Destroy a sandbox.", [SB], [
        on("force", "record it stopped even when its host cannot be reached (the host destroys it if it comes back)")]),
    cmd!("sandbox pause", &[sb::PAUSE], "Pause a running sandbox.", [SB], []),
    cmd!("sandbox resume", &[sb::RESUME], "Resume a paused sandbox.", [SB], [val("timeout", "SECONDS", "new timeout (default: keep)")]),
    cmd!("sandbox metrics", &[sb::METRICS], "Show a sandbox's CPU, memory, network and disk as its host sees them (live while it runs, stored once paused or stopped).", [SB], [
        val("range", "DURATION", "how far back: 90s, 10m, 2h, 1d (default 10m; the step is 1 s up to 10m, 30 s up to 2h, 5 min beyond)"),
        on("watch", "redraw every few seconds until interrupted")]),
    cmd!("sandbox ping", &[sb::PING], "Keep a sandbox alive: its expiry becomes now + its timeout.", [SB], []),
    cmd!("sandbox network", &[sb::UPDATE_NETWORK], "Replace a sandbox's network policy (egress), running or paused: e2b's fields; allow beats deny, the host's never_out beats both; domain names through the sandbox's resolver (docs/operations.md, Sandbox egress). Without flags: allow everything.", [SB], [
        NET[0], NET[1], NET[2]]),
    cmd!("sandbox traffic-token", &[sb::GET, sb::ROTATE_TRAFFIC_TOKEN], "Print the sandbox's traffic token (header wrenn-traffic-access-token on requests to its ports through ctl, docs/operations.md, Sandbox ports).", [SB], [
        on("rotate", "replace it with a new one first (the old one stops working)")]),
    cmd!("sandbox set-timeout", &[sb::SET_TIMEOUT], "Change a sandbox's timeout (and policy).", [SB, arg("SECONDS", "new timeout")], [
        val("on-timeout", "pause|destroy", "new policy (default: keep)")]),
    Command {
        path: "sandbox exec",
        rpcs: &[procs::EXEC, procs::EXEC_STREAM, procs::SEND_INPUT, procs::RESIZE_PTY],
        about: "Run a command in a sandbox, streaming its output live; exits with the command's exit code (128+N when killed by signal N).",
        args: &[SB],
        flags: &[
            rep("env", "KEY=VALUE", "environment variable"),
            val("cwd", "DIR", "working directory"),
            val("user", "USER", "user to run as (default: the image's `user`, else root)"),
            val("tag", "TAG", "name for the process (reconnect with process connect --tag)"),
            val("timeout-ms", "MS", "kill the process group after this long"),
            on("stdin", "forward this terminal's stdin to the process"),
            on("tty", "run on a PTY sized like this terminal, in raw mode, stdin forwarded (interactive shells)"),
            on("background", "start it and print its pid at once")],
        rest: Some("CMD [ARGS...]"),
    },
    cmd!("process list", &[procs::LIST], "List running processes started through the API.", [SB], []),
    cmd!("process connect", &[procs::CONNECT], "Reattach to a process: replay of recent output, then live output.", [SB], [
        PROC[0], PROC[1], on("skip-replay", "only output produced from now on")]),
    cmd!("process kill", &[procs::SIGNAL], "Send a signal to a process.", [SB], [
        PROC[0], PROC[1],
        val("signal", "NAME|N", "signal (default TERM)"),
        on("group", "signal the whole process group")]),
    cmd!("process input", &[procs::SEND_INPUT], "Write DATA (or this program's stdin) to a process's stdin.", [SB, opt("DATA", "bytes to write (default: read stdin)")], [
        PROC[0], PROC[1], on("close", "close its stdin afterwards")]),
    cmd!("process close-stdin", &[procs::CLOSE_STDIN], "Close a process's stdin.", [SB], [PROC[0], PROC[1]]),
    cmd!("process resize", &[procs::RESIZE_PTY], "Resize a process's PTY.", [SB], [
        PROC[0], PROC[1], val("rows", "N", "rows"), val("cols", "N", "columns")]),
    cmd!("file put", &[files::UPLOAD], "Upload a local file (- = stdin) to a path in the sandbox, any size, checked end to end by a CRC-32 (a mismatch fails with data_loss and leaves the path as it was).", [SB, arg("LOCAL", "local file or -"), arg("REMOTE", "path in the sandbox")], [
        val("mode", "OCTAL", "permission bits, e.g. 644"),
        val("user", "USER", "user who writes (and owns) it (default: the image's `user`, else root)"),
        on("atomic", "write a temp file and rename it over the target once checked (the default)"),
        on("in-place", "write into the file in place instead (a failed upload may leave part of it)"),
        on("parents", "create missing parent directories"),
        on("progress", "show progress on stderr even when it is not a terminal")]),
    cmd!("file get", &[files::DOWNLOAD], "Download a file from the sandbox to a local path (- = stdout), any size, checked end to end by a CRC-32 (a mismatch fails with data_loss and writes no local file).", [SB, arg("REMOTE", "path in the sandbox"), arg("LOCAL", "local file or -")], [
        val("offset", "BYTES", "first byte"),
        val("length", "BYTES", "bytes to read (default: to the end)"),
        val("user", "USER", "user whose permissions apply"),
        on("progress", "show progress on stderr even when it is not a terminal")]),
    cmd!("file ls", &[files::LIST], "List a directory.", [SB, arg("PATH", "directory")], [
        val("depth", "N", "levels to descend (default 1)"), val("user", "USER", "user whose permissions apply")]),
    cmd!("file stat", &[files::STAT], "Show a path's metadata.", [SB, arg("PATH", "path")], [
        on("follow", "describe a symlink's target"), val("user", "USER", "user whose permissions apply")]),
    cmd!("file mkdir", &[files::MAKE_DIR], "Create a directory and its parents.", [SB, arg("PATH", "directory")], [
        val("mode", "OCTAL", "permission bits"), val("user", "USER", "user who creates it")]),
    cmd!("file mv", &[files::MOVE], "Rename a file or directory.", [SB, arg("SOURCE", "existing path"), arg("DEST", "new path")], [
        on("overwrite", "replace an existing destination"), val("user", "USER", "user whose permissions apply")]),
    cmd!("file rm", &[files::REMOVE], "Remove a file or directory.", [SB, arg("PATH", "path")], [
        on("recursive", "remove a directory and everything under it"),
        on("force", "a missing path is not an error"),
        val("user", "USER", "user whose permissions apply")]),
    cmd!("port forward", &[ports::CONNECT], "Forward local TCP port LOCAL (127.0.0.1; 0 = any free port, printed) to port REMOTE of the sandbox: every connection is one Ports.Connect stream through ctl and the sandbox's agent, for databases and anything not HTTP. Runs until interrupted.", [SB, arg("LOCAL:REMOTE", "local port and sandbox port")], [
        val("connections", "N", "exit after serving N connections")
    ]),
    cmd!("template create", &[tpl::CREATE], "Snapshot a sandbox into a template (the sandbox ends paused).", [SB, arg("NAME", "template name, unique in the team")], [
        on("platform", "publish as a platform template (platform admin)")]),
    cmd!("template check", &[], "Check a recipe (Wrennfile) here, without a server: prints its steps, or its first error with line and column (exit 1).", [opt("FILE", "the recipe (default ./Wrennfile)")], []),
    cmd!("template build", &[tpl::BUILD], "Build a snapshot template from a recipe: the COPY sources under DIR are streamed into a fresh build sandbox (never stored by ctl), each step's output printed live; exit 1 when a step fails. -f is --file.", [opt("DIR", "the build context (default .)")], [
        val("file", "FILE", "the recipe (default DIR/Wrennfile)"),
        val("name", "NAME", "the template's name (default: DIR's name)")]),
    cmd!("template attach", &[tpl::ATTACH_BUILD], "Follow a build: what its steps printed so far, then live until it ends; exit 1 unless it succeeded.", [arg("BUILD", "build id (bld-...)")], []),
    cmd!("template builds", &[tpl::LIST_BUILDS], "List the team's builds, newest first.", [], [PAGE[0], PAGE[1], PAGE[2]]),
    cmd!("template build-get", &[tpl::GET_BUILD], "Show a build and its steps.", [arg("BUILD", "build id (bld-...)")], []),
    cmd!("template build-cancel", &[tpl::CANCEL_BUILD], "Cancel a queued or running build (its sandbox is destroyed).", [arg("BUILD", "build id (bld-...)")], []),
    cmd!("template list", &[tpl::LIST], "List the team's and the platform's templates.", [], [
        on("team-only", "leave out platform templates"), PAGE[0], PAGE[1], PAGE[2]]),
    cmd!("template get", &[tpl::GET], "Show a template.", [arg("TEMPLATE", "id (tpl-...) or name")], []),
    cmd!("template rm", &[tpl::DELETE], "Delete a template.", [arg("TEMPLATE", "id (tpl-...)")], []),
    cmd!("key create", &[keys::CREATE], "Create an API key; its secret is printed once.", [arg("NAME", "display name")], [
        on("admin", "a platform-admin key (platform admin)")]),
    cmd!("key list", &[keys::LIST], "List the team's API keys.", [], [PAGE[0], PAGE[1], PAGE[2]]),
    cmd!("key revoke", &[keys::REVOKE], "Revoke an API key.", [arg("KEY", "key id (key-...)")], []),
    cmd!("team get", &[teams::GET], "Show a team (default: the caller's).", [opt("TEAM", "team id (team-...)")], []),
    cmd!("team create", &[teams::CREATE], "Create a team with its owner and first API key, printed once (platform admin).", [arg("NAME", "team name")], [
        val("owner-email", "EMAIL", "the owner's email (required)"), val("owner-name", "NAME", "the owner's display name")]),
    cmd!("team members", &[teams::LIST_MEMBERS], "List a team's members (default: the caller's team).", [opt("TEAM", "team id")], [PAGE[0], PAGE[1], PAGE[2]]),
    cmd!("team usage", &[teams::USAGE], "Usage per UTC day: sandbox-seconds, CPU-seconds, memory MiB-seconds (default: the caller's team).", [opt("TEAM", "team id")], [
        val("days", "N", "days back, today included (default 7, at most 92)")]),
    cmd!("team add-member", &[teams::ADD_MEMBER], "Add an existing user to a team.", [arg("USER", "user id (usr-...)")], [
        val("team", "TEAM", "team id (default: the caller's)"), val("role", "owner|admin|member", "role (default member)")]),
    cmd!("team remove-member", &[teams::REMOVE_MEMBER], "Remove a user from a team.", [arg("USER", "user id (usr-...)")], [
        val("team", "TEAM", "team id (default: the caller's)")]),
    cmd!("user create", &[users::CREATE], "Create a user in the caller's team.", [arg("EMAIL", "email address (unique within the team, any case)")], [
        val("name", "NAME", "display name"), val("role", "owner|admin|member", "role (default member)")]),
    cmd!("user list", &[users::LIST], "List users of the caller's team.", [], [PAGE[0], PAGE[1], PAGE[2]]),
    cmd!("user get", &[users::GET], "Show a user.", [arg("USER", "user id (usr-...)")], []),
    cmd!("host token", &[hosts::CREATE_REGISTRATION_TOKEN], "Make a one-time host registration token (platform admin).", [], [
        val("ttl", "SECONDS", "validity (default 3600)")]),
    cmd!("host list", &[hosts::LIST], "List hosts (platform admin).", [], [
        rep("status", "STATUS", "only this status (online, unreachable, draining)"), PAGE[0], PAGE[1], PAGE[2]]),
    cmd!("host get", &[hosts::GET], "Show a host (platform admin).", [arg("HOST", "host id (host-...)")], []),
    cmd!("host drain", &[hosts::DRAIN], "Stop placing sandboxes on a host; lists what remains (platform admin).", [arg("HOST", "host id")], []),
    cmd!("host undrain", &[hosts::UNDRAIN], "Place sandboxes on a draining host again (platform admin).", [arg("HOST", "host id")], []),
    cmd!("host rm", &[hosts::DELETE], "Forget a host (platform admin).", [arg("HOST", "host id")], [
        on("force", "for a host that is gone: record its sandboxes stopped and delete its snapshot templates")]),
    cmd!("webhook create", &[wh::CREATE], "Register a webhook endpoint; its signing secret is printed once.", [arg("URL", "http://host[:port]/path (https once ctl has a TLS client)")], [
        rep("event", "TYPE", "an event type to receive (default: all), e.g. sandbox.paused")]),
    cmd!("webhook list", &[wh::LIST], "List the team's webhooks.", [], []),
    cmd!("webhook rm", &[wh::DELETE], "Remove a webhook (its pending deliveries are dropped).", [arg("WEBHOOK", "webhook id (wh-...)")], []),
    cmd!("webhook deliveries", &[wh::DELIVERIES], "List a webhook's deliveries and their outcome, newest first.", [arg("WEBHOOK", "webhook id (wh-...)")], [
        PAGE[0], PAGE[1], PAGE[2]]),
    cmd!("audit list", &[audit::LIST], "List audit entries, newest first.", [], [
        val("actor", "ID", "who acted (key-..., usr-..., host-...)"),
        val("resource-type", "TYPE", "sandbox, template, team, user, api_key, host"),
        val("resource", "ID", "the resource's id"),
        val("action", "ACTION", "e.g. sandbox.create"),
        val("since", "UNIX_NS", "entries at or after this time"),
        val("until", "UNIX_NS", "entries before this time"),
        PAGE[0], PAGE[1], PAGE[2]]),
];

/// Finds the command named by the first two words of `argv`.
pub fn lookup(group: &str, verb: &str) -> Option<&'static Command> {
    COMMANDS
        .iter()
        .find(|c| c.path.split_once(' ') == Some((group, verb)))
}

/// The command groups, in order.
pub fn groups() -> Vec<&'static str> {
    let mut g: Vec<&str> = COMMANDS
        .iter()
        .filter_map(|c| c.path.split(' ').next())
        .collect();
    g.dedup();
    g
}

/// `wrenn <group> --help`.
pub fn group_usage(group: &str) -> String {
    let mut s = format!("usage: wrenn {group} <command> [flags]\n\ncommands:\n");
    for c in COMMANDS
        .iter()
        .filter(|c| c.path.starts_with(&format!("{group} ")))
    {
        let verb = c.path.split_once(' ').map(|x| x.1).unwrap_or("");
        let first = c
            .about
            .split(". ")
            .next()
            .unwrap_or("")
            .trim_end_matches('.');
        s.push_str(&format!("  {verb:<16} {first}\n"));
    }
    s.push_str(&format!(
        "\nwrenn {group} <command> --help shows a command's flags.\n"
    ));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_consistent() {
        let mut seen = std::collections::HashSet::new();
        for c in COMMANDS {
            assert!(seen.insert(c.path), "duplicate {}", c.path);
            let mut names = std::collections::HashSet::new();
            for f in c.flags.iter().chain(super::super::args::GLOBAL) {
                assert!(
                    names.insert(f.name),
                    "{}: duplicate flag {}",
                    c.path,
                    f.name
                );
            }
            // Optional positionals only at the end.
            let first_opt = c
                .args
                .iter()
                .position(|a| !a.required)
                .unwrap_or(c.args.len());
            assert!(
                c.args[first_opt..].iter().all(|a| !a.required),
                "{}",
                c.path
            );
            assert!(lookup(
                c.path.split(' ').next().unwrap(),
                c.path.split(' ').nth(1).unwrap()
            )
            .is_some());
        }
        assert_eq!(
            groups(),
            [
                "sandbox", "process", "file", "port", "template", "key", "team", "user", "host",
                "webhook", "audit"
            ]
        );
        assert!(group_usage("file").contains("  put "));
    }

    /// Methods of `wrenn.ctl.v1` no command calls, with the reason. Empty: every RPC is
    /// reachable from the CLI.
    const NOT_IN_CLI: &[(&str, &str)] = &[];

    /// Commands that run locally and call no method, with the reason.
    const LOCAL: &[(&str, &str)] = &[(
        "template check",
        "checks a recipe on the client, without a server or a key",
    )];

    /// The command table against the descriptors generated from the `.proto` files: every
    /// command names the methods it calls, each a method of `wrenn.ctl.v1`, and every method
    /// is called by some command. (`execute` checks at run time that a command calls only
    /// the methods it names.)
    #[test]
    fn commands_agree_with_the_service_descriptors() {
        use proto::gen::wrenn::ctl::v1::METHODS;
        let all: Vec<&str> = METHODS
            .iter()
            .flat_map(|s| s.iter())
            .map(|d| d.name)
            .collect();
        for c in COMMANDS {
            let local = LOCAL.iter().any(|(p, _)| *p == c.path);
            assert_eq!(
                c.rpcs.is_empty(),
                local,
                "{}: a command names the methods it calls unless it is local",
                c.path
            );
            for m in c.rpcs {
                assert!(all.contains(m), "{}: no method {m} in wrenn.ctl.v1", c.path);
            }
        }
        for m in &all {
            let called = COMMANDS.iter().any(|c| c.rpcs.contains(m));
            let exempt = NOT_IN_CLI.iter().any(|(x, _)| x == m);
            assert!(called || exempt, "no command calls {m}");
            assert!(!(called && exempt), "{m} is called and listed as not");
        }
    }
}
