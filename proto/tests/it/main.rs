//! Integration tests of the proto crate: the RPC runtime over real sockets, the tidy checks,
//! and the replay of the committed fuzz corpus.

mod budgets;
mod corpus;
mod generated;
mod rpc;
mod support;
mod tidy;
mod transport;
