//! host_service (being built).
