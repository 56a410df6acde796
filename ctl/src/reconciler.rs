//! reconciler (being built).
