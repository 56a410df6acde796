//! Settings of a ctl replica (from flags and `WRENN_*` variables, parsed in main.rs).

use std::net::SocketAddr;
use std::time::Duration;

use crate::limits;

/// Everything `serve` needs.
#[derive(Clone, Debug)]
pub struct Config {
    pub database_url: String,
    /// Protobuf listener of clients (wrenn.ctl.v1), default 0.0.0.0:7700.
    pub listen: SocketAddr,
    /// Protobuf listener of agents (wrenn.host.v1), default 0.0.0.0:7702: its own port and
    /// server, so clients can never starve agents' heartbeats of connections or workers.
    pub host_listen: SocketAddr,
    /// HTTP/JSON listener, default 0.0.0.0:7701.
    pub http_listen: SocketAddr,
    pub db_workers: usize,
    pub api: ApiConfig,
    pub jobs: JobsConfig,
}

/// Settings the service layer uses.
#[derive(Clone, Debug)]
pub struct ApiConfig {
    /// Deadline of agent lifecycle calls (create, pause, resume, template create).
    pub agent_lifecycle_timeout: Duration,
    /// Deadline of every other agent call.
    pub agent_call_timeout: Duration,
    /// Heartbeat interval told to agents.
    pub heartbeat_interval: Duration,
    /// How often `last_used` of API keys is flushed.
    pub last_used_flush: Duration,
    /// Webhook delivery settings.
    pub webhooks: WebhookConfig,
}

/// Webhook deliveries (`webhook/`).
#[derive(Clone, Debug)]
pub struct WebhookConfig {
    /// Deliver to loopback, private, link-local and other special addresses
    /// (`--webhook-allow-private`): for tests and receivers on a trusted network only.
    pub allow_private: bool,
    /// Backoff after failed attempt n: base × 2^(n-1), at most `backoff_max`.
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// One attempt's deadline.
    pub attempt_timeout: Duration,
    /// A claimed delivery's lease (it is attempted again after it if no outcome was
    /// recorded: the replica died).
    pub lease: Duration,
    /// How often the delivery job looks for due deliveries.
    pub poll: Duration,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        WebhookConfig {
            allow_private: false,
            backoff_base: limits::WEBHOOK_BACKOFF_BASE,
            backoff_max: limits::WEBHOOK_BACKOFF_MAX,
            attempt_timeout: limits::WEBHOOK_ATTEMPT_TIMEOUT,
            lease: limits::WEBHOOK_LEASE,
            poll: limits::WEBHOOK_POLL,
        }
    }
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            agent_lifecycle_timeout: limits::AGENT_LIFECYCLE_TIMEOUT_DEFAULT,
            agent_call_timeout: limits::AGENT_CALL_TIMEOUT_DEFAULT,
            heartbeat_interval: limits::HEARTBEAT_INTERVAL_DEFAULT,
            last_used_flush: limits::LAST_USED_FLUSH_INTERVAL,
            webhooks: WebhookConfig::default(),
        }
    }
}

/// Settings of the background jobs.
#[derive(Clone, Debug)]
pub struct JobsConfig {
    /// Reconciler period.
    pub reconcile_interval: Duration,
    /// A host whose last heartbeat is older than this becomes unreachable.
    pub heartbeat_timeout: Duration,
    /// Destroy sandboxes an agent runs that the database does not know (else only report).
    pub destroy_unknown: bool,
    /// Grace before a new sandbox missing on its host counts as missing.
    pub new_grace: Duration,
    /// Grace for sandboxes in transition.
    pub transition_grace: Duration,
    /// The deadline of a create's agent call (the replicas' agent lifecycle timeout): a
    /// sandbox `starting` for longer than this plus [`limits::CREATE_DEADLINE_GRACE`] is no
    /// longer being created by any ctl.
    pub create_deadline: Duration,
}

impl Default for JobsConfig {
    fn default() -> Self {
        JobsConfig {
            reconcile_interval: limits::RECONCILE_INTERVAL_DEFAULT,
            heartbeat_timeout: limits::HEARTBEAT_INTERVAL_DEFAULT * limits::HEARTBEAT_MISSES,
            destroy_unknown: true,
            new_grace: limits::RECONCILE_NEW_GRACE,
            transition_grace: limits::RECONCILE_TRANSITION_GRACE,
            create_deadline: limits::AGENT_LIFECYCLE_TIMEOUT_DEFAULT,
        }
    }
}
