//! End-to-end tests with a real Firecracker: see `e2e_*` tests below.
