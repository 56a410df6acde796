//! ctl integration tests: a real PostgreSQL (throwaway cluster or DATABASE_URL), ctl
//! replicas in-process, and a fake agent speaking the real wrenn.agent.v1 protocol.

mod agent_conformance;
mod api;
mod builds;
mod capacity;
mod cli;
mod ctl_bin;
mod defects;
mod fake_agent;
mod fullstack;
mod harness;
mod http;
mod jobs;
mod matrix;
mod proxy;
mod scale;
mod usage;
mod webhooks;
