//! SHA-256 lives in `proto` (shared with the `wrenn` CLI); re-exported here for ctl.

pub use proto::sha256::*;
