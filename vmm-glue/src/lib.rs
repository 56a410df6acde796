//! `vmm-glue`: the host-side glue between wrenn-agent and Firecracker.
//!
//! - [`api`]: client of Firecracker's HTTP API on its Unix socket (one keep-alive connection,
//!   bounded heads and bodies, a deadline per call);
//! - [`request`]: typed API requests (machine, boot source, drives, network, vsock, MMDS,
//!   actions, pause/resume, snapshots, logger, metrics);
//! - [`process`]: spawning Firecracker in a sandbox's network namespace, cgroup and own mount
//!   namespace (the stable disk path), holding it by pidfd, re-adopting it, killing it;
//! - [`cgroup`]: per-sandbox cgroups, v2 where mounted with controllers, else v1 cpu/memory;
//! - [`vsock`]: the host side of Firecracker's hybrid vsock (`CONNECT <port>`, guest-initiated
//!   listeners, envd's readiness push);
//! - [`page_server`]: the launcher of `wrenn-uffd` (the page server of a restored VM);
//! - [`jail`]: Firecracker under Firecracker's jailer (command line, chroot layout, cleanup);
//! - [`disk`]: per-sandbox root disks as reflink clones or sparse copies of a template;
//! - [`net`]: network slots (namespaces, veth, tap, NAT);
//! - [`limits`]: every bound outside `net`, with its reason.
//!
//! A cold boot, as the agent drives it: take a network slot (`net`); [`disk::clone_disk`] the
//! template into the sandbox directory; start a [`vsock::ReadinessListener`] on the vsock
//! path; [`process::VmProcess::spawn`] with the slot's namespace, the disk (seen by Firecracker
//! at [`process::STABLE_DISK_PATH`]) and a cgroup; `wait_api_socket`; send machine-config,
//! boot-source (with the slot's `ip=`), the root [`request::Drive`] at the stable path, the tap,
//! the vsock; `InstanceStart`; wait for Ready; talk to envd with [`vsock::connect_rpc`].
//! A restore replaces the configuration with one [`request::SnapshotLoad`] carrying the vsock
//! override (the tap has the same name in every slot, and the disk path is stable).
//!
//! It is not a scheduler and keeps no state of its own beyond a sandbox's process state file:
//! the agent decides what runs where.

pub mod api;
pub mod cgroup;
pub mod disk;
pub mod jail;
pub mod limits;
pub mod net;
pub mod page_server;
pub mod process;
pub mod request;
mod sys;
pub mod vsock;
