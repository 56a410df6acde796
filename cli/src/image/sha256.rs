//! SHA-256 lives in `proto` (shared with ctl); re-exported for the image cache keys.

pub use proto::sha256::*;
