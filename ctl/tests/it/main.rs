//! ctl integration tests (being built).
