//! Random bytes and tokens live in `proto` (shared by every crate); re-exported here for ctl.

pub use proto::random::*;
