//! wrenn's benchmark suite: every case measures its baseline in the same run and prints the
//! ratio (see `harness`). `cargo run --release -p bench -- <name>|all [--quick]`.

pub mod agent;
pub mod ctl;
pub mod density;
pub mod envd;
pub mod harness;
pub mod rpc;
pub mod tls;
pub mod uffd;
pub mod vm;

/// Every case, in the order `all` runs them.
pub fn cases() -> Vec<harness::Case> {
    let mut v = Vec::new();
    v.extend(rpc::cases());
    v.extend(tls::cases());
    v.extend(ctl::cases());
    v.extend(envd::cases());
    v.extend(uffd::cases());
    v.extend(vm::cases());
    v.extend(agent::cases());
    v.extend(density::cases());
    v
}
