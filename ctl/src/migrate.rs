//! migrate (being built).
