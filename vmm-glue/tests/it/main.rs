//! vmm-glue's integration tests (one binary): the API client against a scripted server,
//! request bodies against Firecracker's schema, network slots, disk clones, and Firecracker
//! for real where it is available.

mod api;
mod boot;
mod corpus;
mod disk;
mod dnstcp;
mod egress;
mod firecracker;
mod jail;
mod net;
mod netkit;
mod schema;
mod vsock;
