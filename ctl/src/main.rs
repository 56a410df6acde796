//! wrenn-ctl (flag parsing only; being built).
fn main() {}
