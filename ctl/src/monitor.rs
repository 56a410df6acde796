//! monitor (being built).
