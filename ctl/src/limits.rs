//! Bounds of ctl, each with its reason.

use std::time::Duration;

/// DB worker threads (= PostgreSQL connections per replica). Each request holds one for a
/// few queries; 8 keeps a replica well under PostgreSQL's default `max_connections` (100)
/// even with several replicas.
pub const DB_WORKERS_DEFAULT: usize = 8;
/// Jobs waiting for a DB worker. Beyond this the database is the bottleneck and queueing more
/// only adds latency: callers get `unavailable` at once.
pub const DB_QUEUE_MAX: usize = 1024;
/// How long a caller waits for its DB job (queueing + running) before `deadline_exceeded`.
pub const DB_JOB_TIMEOUT: Duration = Duration::from_secs(30);
/// Reconnect backoff after a failed connection attempt: first and largest delay.
pub const DB_BACKOFF_MIN: Duration = Duration::from_millis(100);
pub const DB_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Server-side bounds on one statement and on a lock wait of the pool's connections (the
/// caller's wait is DB_JOB_TIMEOUT; these free the worker too). Below the job timeout so
/// the caller sees the database's error rather than its own timeout.
pub const STATEMENT_TIMEOUT: Duration = Duration::from_secs(25);
pub const LOCK_TIMEOUT: Duration = Duration::from_secs(10);
/// Connecting to PostgreSQL must not hang a worker forever.
pub const DB_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Page sizes of every list call (the API contract: 0 = 100, at most 1000).
pub const PAGE_SIZE_DEFAULT: u32 = 100;
pub const PAGE_SIZE_MAX: u32 = 1000;

/// Sandbox timeout when the request gives none (the API contract: 300 s).
pub const SANDBOX_TIMEOUT_DEFAULT_S: u64 = 300;
/// Longest timeout a caller may set: 30 days; longer would be a leak, not a sandbox.
pub const SANDBOX_TIMEOUT_MAX_S: u64 = 30 * 24 * 3600;
/// Largest vCPU count / memory / disk a request may ask for, and the metadata/env maps'
/// bounds: the agent's own, from `proto::sandbox_limits`, so ctl never reserves capacity
/// for a sandbox its host would refuse.
pub const SANDBOX_VCPUS_MAX: u32 = proto::sandbox_limits::VCPUS_MAX;
pub const SANDBOX_MEMORY_MIB_MAX: u32 = proto::sandbox_limits::MEMORY_MIB_MAX;
pub const SANDBOX_DISK_MIB_MAX: u64 = proto::sandbox_limits::DISK_MIB_MAX;
pub const MAP_ENTRIES_MAX: usize = proto::sandbox_limits::MAP_ENTRIES_MAX;
pub const MAP_KEY_LEN_MAX: usize = proto::sandbox_limits::MAP_KEY_LEN_MAX;
pub const MAP_VALUE_LEN_MAX: usize = proto::sandbox_limits::MAP_VALUE_LEN_MAX;
/// Names (templates, teams, keys, users) and emails.
pub const NAME_LEN_MAX: usize = 128;
pub const EMAIL_LEN_MAX: usize = 254;

/// Creates with `wait = false` finish on background threads; at most this many at once
/// (more answers `resource_exhausted` instead of spawning without bound).
pub const BACKGROUND_CREATES_MAX: usize = 64;

/// Agent calls: lifecycle (create/pause/resume/template: a cold boot on a slow host takes
/// minutes) and everything else.
pub const AGENT_LIFECYCLE_TIMEOUT_DEFAULT: Duration = Duration::from_secs(600);
pub const AGENT_CALL_TIMEOUT_DEFAULT: Duration = Duration::from_secs(30);

/// Registration tokens live 1 hour unless asked otherwise, at most a week.
pub const REGISTRATION_TTL_DEFAULT_S: u64 = 3600;
pub const REGISTRATION_TTL_MAX_S: u64 = 7 * 24 * 3600;

/// Heartbeat interval told to agents; a host that misses `HEARTBEAT_MISSES` of them
/// becomes unreachable.
pub const HEARTBEAT_INTERVAL_DEFAULT: Duration = Duration::from_secs(5);
pub const HEARTBEAT_MISSES: u32 = 3;
/// Reconciler period (the issue: every 30 s, configurable).
pub const RECONCILE_INTERVAL_DEFAULT: Duration = Duration::from_secs(30);
/// A sandbox in transition (starting, pausing, ...) is left alone by the reconciler for this
/// long: the lifecycle call that moves it may still be running.
pub const RECONCILE_TRANSITION_GRACE: Duration = Duration::from_secs(660);
/// Grace after a create's own deadline (ctl's Create call to the agent is bounded by the
/// agent lifecycle timeout): past both, no ctl is still creating the sandbox, so the
/// reconciler settles a row left `starting` (by a ctl crash) from the host's word, or marks
/// it `error` when its host is gone. Covers clock skew between replicas and the database,
/// and the time ctl takes to record an answer.
pub const CREATE_DEADLINE_GRACE: Duration = Duration::from_secs(30);
/// How often each replica's jobs thread looks for hosts whose heartbeats showed drift (one
/// small transaction under an advisory lock): the early reconcile starts within this bound.
pub const DRIFT_CHECK_INTERVAL: Duration = Duration::from_millis(500);
/// A sandbox younger than this is not reported missing (its agent call may be in flight).
pub const RECONCILE_NEW_GRACE: Duration = Duration::from_secs(60);

/// `last_used` of API keys is written at most this often (batched, off the request path).
pub const LAST_USED_FLUSH_INTERVAL: Duration = Duration::from_secs(10);
/// Distinct keys remembered between flushes; beyond this, further keys wait for the next.
pub const LAST_USED_PENDING_MAX: usize = 65536;

/// Exec output kept per stream when the request gives no limit, and the most it may ask.
pub const EXEC_OUTPUT_DEFAULT: u64 = 1024 * 1024;
pub const EXEC_OUTPUT_MAX: u64 = 16 * 1024 * 1024;

/// Audit metadata JSON text; larger detail belongs in logs.
pub const AUDIT_METADATA_LEN_MAX: usize = 8192;

/// Connections open on the host port with an empty host token (an agent registering: one
/// call, once per new host). Anyone can open such a connection, so they have this small
/// budget of their own instead of sharing the agents' connections.
pub const REGISTERING_CONNECTIONS_MAX: usize = 16;

/// Revoked keys a replica remembers (from LISTEN/NOTIFY). Beyond this the set is flushed and
/// every open connection re-checks its key in the database once: revocations are rare, and
/// 65536 UUIDs are about 2 MiB with the set's overhead.
pub const REVOKED_KEYS_MAX: usize = 65536;
/// Revoked host-certificate serials a replica holds in memory (loaded at each listener
/// (re)connect, rows kept only until the certificate expires: at most two unexpired
/// certificates per deleted host within `HOST_CERT_LIFETIME`). Beyond it hellos ask the
/// database; 65536 serials of 16 bytes are about 4 MiB with the set's overhead.
pub const REVOKED_CERTS_MAX: usize = 65536;
/// The revocation listener pings its connection this often, so a silently dead one (and the
/// notifications it would miss) is noticed within this bound; meanwhile calls check their key
/// in the database.
pub const LISTEN_PING_INTERVAL: Duration = Duration::from_secs(5);

/// Port streams one team may hold open on a ctl replica: Ports.Connect calls (each holds a
/// worker of the protobuf server and a relay thread) and proxied HTTP connections of the
/// traffic proxy (two relay threads each) together; 64 keeps one team's tunnels from taking
/// the pools.
pub const PORT_STREAMS_PER_TEAM_MAX: usize = 64;
/// Port streams (Ports.Connect and proxied connections) to one sandbox on a ctl replica (the
/// agent's own bound is the same).
pub const PORT_STREAMS_PER_SANDBOX_MAX: usize = 16;
/// How often a proxied request to an `auto_resume` sandbox that another request is resuming
/// looks again at its state (one indexed row read): a restore takes tens of milliseconds
/// and the guest's envd longer, so 50 ms adds little to the wait and costs little. The wait
/// is bounded by the agent lifecycle timeout (`wrenn-ctl serve --lifecycle-timeout-s`).
pub const AUTO_RESUME_POLL: Duration = Duration::from_millis(50);
/// Running sandboxes' traffic rows the proxy keeps per replica (`service::ports::TrafficCache`,
/// ~200 bytes each): past it the copy is emptied and refilled by the next requests, so a
/// host of many sandboxes costs at most one database read per sandbox per refill.
pub const TRAFFIC_CACHE_MAX: usize = 4096;
const _: () = assert!(PORT_STREAMS_PER_SANDBOX_MAX <= PORT_STREAMS_PER_TEAM_MAX);
// ---- per-sandbox metrics and usage (`usage.rs`) ----

/// The agent's sample tiers (agent/src/limits.rs holds the same numbers): 1 s for 10
/// minutes, 30 s for 2 hours, 5 minutes for 24 hours. `Sandboxes/Metrics` picks the step
/// from the range asked.
pub const METRICS_FINE_RANGE_S: u32 = 600;
pub const METRICS_MID_STEP_S: u32 = 30;
pub const METRICS_MID_RANGE_S: u32 = 7200;
pub const METRICS_COARSE_STEP_S: u32 = 300;
/// Longest range `Sandboxes/Metrics` serves (the agent's coarse tier).
pub const METRICS_RANGE_MAX_S: u32 = 86_400;
pub const METRICS_RANGE_DEFAULT_S: u32 = 600;
/// Days `Teams/Usage` covers by default and at most (a quarter).
pub const USAGE_DAYS_DEFAULT: u32 = 7;
pub const USAGE_DAYS_MAX: u32 = 92;
/// How often the usage flush stores running sandboxes' 30-s samples: well inside the
/// agent's 2-hour mid tier, so a long run loses none.
pub const USAGE_FLUSH_INTERVAL: Duration = Duration::from_secs(600);
/// Deadline of one `Sandboxes/Samples` call to an agent (a memory read on the agent).
pub const SAMPLES_CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Transitions and samples one `Teams/Usage` call reads at most (92 days of a busy team at
/// 30 s a sample is far less than this for a handful of sandboxes; beyond it the call says
/// so instead of answering with a partial sum).
pub const USAGE_ROWS_MAX: i64 = 2_000_000;

// ---- webhooks (`webhook/`) ----

/// Webhooks per team.
pub const WEBHOOKS_PER_TEAM_MAX: i64 = 32;
/// Length of a webhook URL.
pub const WEBHOOK_URL_LEN_MAX: usize = 2048;
/// Deliveries pending per webhook; a new event beyond it is recorded `dropped` (the SQL
/// function `wrenn_raise_event` of migration 4 holds the same number; a test checks).
pub const WEBHOOK_QUEUE_MAX: usize = 1000;
/// Attempts per delivery before it is `failed`.
pub const WEBHOOK_ATTEMPTS_MAX: i32 = 8;
/// Backoff after a failed attempt n (1-based): base × 2^(n-1), at most the cap. With 8
/// attempts: 5 s, 10 s, ... 10 min, about 21 minutes from the first to the last.
pub const WEBHOOK_BACKOFF_BASE: Duration = Duration::from_secs(5);
pub const WEBHOOK_BACKOFF_MAX: Duration = Duration::from_secs(600);
/// One attempt: connect, send, and read the answer within this time.
pub const WEBHOOK_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// A claimed delivery is leased for this long: a ctl that dies mid-attempt leaves it due
/// again after the lease (at least once), and no other replica takes it before.
pub const WEBHOOK_LEASE: Duration = Duration::from_secs(60);
/// Deliveries attempted at once by one replica (threads), and per webhook in one round, so
/// one slow endpoint takes at most its share.
pub const WEBHOOK_WORKERS: usize = 8;
pub const WEBHOOK_PER_ENDPOINT_MAX: i64 = 2;
/// How often the delivery job looks for due deliveries.
pub const WEBHOOK_POLL: Duration = Duration::from_millis(500);
/// Bytes of an endpoint's answer read (head and body); the rest is ignored.
pub const WEBHOOK_RESPONSE_HEAD_MAX: usize = 8 * 1024;
pub const WEBHOOK_RESPONSE_BODY_MAX: u64 = 64 * 1024;
/// Characters of an error kept with a delivery.
pub const WEBHOOK_ERROR_LEN_MAX: usize = 512;

const _: () = assert!(METRICS_FINE_RANGE_S < METRICS_MID_RANGE_S);
const _: () = assert!(METRICS_MID_RANGE_S < METRICS_RANGE_MAX_S);
const _: () = assert!(WEBHOOK_ATTEMPT_TIMEOUT.as_secs() * 2 <= WEBHOOK_LEASE.as_secs());
const _: () = assert!(USAGE_FLUSH_INTERVAL.as_secs() < METRICS_MID_RANGE_S as u64);

// ---- template builds (migration 5; `service/builds.rs`) ----

/// Output kept per build step: the last 256 KiB (the table's CHECK holds the same number;
/// a test checks). A step's full output streams live to the client; what is kept is for
/// a later look at why a step failed.
pub const BUILD_STEP_LOG_MAX: usize = 256 * 1024;
/// A recipe as stored: `proto::recipe::RECIPE_LEN_MAX`.
pub const BUILD_RECIPE_LEN_MAX: usize = proto::recipe::RECIPE_LEN_MAX;
/// Builds running at once on one host: each holds a sandbox and keeps a ctl worker thread
/// busy for its whole length; more wait `queued` for a place.
pub const BUILDS_PER_HOST_MAX: i64 = 2;
/// Longest a build waits queued for a place on its host before it fails.
pub const BUILD_QUEUE_WAIT_MAX: Duration = Duration::from_secs(600);
/// Default most bytes of a build context (`--build-context-max-mib`): it is written into
/// the build sandbox's disk, so it is bounded well below a sandbox's disk.
pub const BUILD_CONTEXT_LEN_MAX: u64 = 512 << 20;
/// Where the context lands in the build sandbox (removed before the snapshot).
pub const BUILD_CONTEXT_DIR: &str = "/tmp/wrenn-build-context";
/// How often a runner renews `runner_seen_at` and reads `cancel_requested`.
pub const BUILD_RUNNER_RENEW: Duration = Duration::from_secs(2);
/// A build whose runner has not renewed for this long is failed by the reconciler (its
/// ctl died): many renewals, so a slow database never fails a live build.
pub const BUILD_RUNNER_GRACE: Duration = Duration::from_secs(30);
/// How often the running step's output is written to its log (and an attach polls).
pub const BUILD_LOG_FLUSH: Duration = Duration::from_millis(500);
/// The build sandbox's timeout: a build longer than this loses its sandbox.
pub const BUILD_SANDBOX_TIMEOUT_S: u64 = 6 * 3600 + 600;

const _: () = assert!(BUILD_RUNNER_RENEW.as_secs() * 5 <= BUILD_RUNNER_GRACE.as_secs());
const _: () = assert!(BUILD_LOG_FLUSH.as_millis() < BUILD_RUNNER_RENEW.as_millis());

// ---- retention (`retention.rs`) ----

/// Stored samples and state transitions are kept a day longer than `Teams/Usage` looks
/// back ([`USAGE_DAYS_MAX`]).
pub const USAGE_RETENTION: Duration = Duration::from_secs((USAGE_DAYS_MAX as u64 + 1) * 86_400);
/// Finished webhook deliveries (delivered, failed, dropped) and their events: a week, to
/// look at with `Webhooks/Deliveries`.
pub const WEBHOOK_RETENTION: Duration = Duration::from_secs(7 * 86_400);
/// Rows one pruning statement deletes at most.
pub const RETENTION_BATCH: i64 = 10_000;

/// Lifetime of the CA `wrenn-ctl admin tls init` makes: ten years. Replacing a CA means
/// re-registering every host, so it outlives any deployment's hardware.
pub const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Lifetime of ctl's own server certificate from `admin tls init`: about thirteen months
/// (browsers' and most policies' ceiling for server certificates).
pub const SERVER_CERT_LIFETIME: Duration = Duration::from_secs(397 * 24 * 3600);
/// Lifetime of the host certificates ctl issues agents at registration: 90 days. Short
/// enough that a stolen key is not useful for long even before revocation is heard of,
/// long enough that an agent cut off from ctl for weeks still proves who it is.
pub const HOST_CERT_LIFETIME: Duration = Duration::from_secs(90 * 24 * 3600);
/// Lifetime of the client certificate a ctl replica issues itself for calling agents over
/// mutual TLS. The agent pool makes a new one when half of it has passed
/// ([`CTL_CLIENT_CERT_LIFETIME`] / 2), so a long-running replica never presents an expired one.
pub const CTL_CLIENT_CERT_LIFETIME: Duration = Duration::from_secs(7 * 24 * 3600);
/// Certificates are valid from this long before they were made, so a host whose clock is
/// a little behind ctl's still accepts a fresh one.
pub const CLOCK_SKEW_ALLOWANCE: Duration = Duration::from_secs(3600);
