//! ctl integration tests (being built).
mod http;
