//! A tiny KVM guest whose memory is served by the page server: real-mode code (itself in the
//! snapshot) checksums 512 KiB of guest memory, spanning two regions with a host-side gap and
//! including zero extents, and reports the checksum with port I/O.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::harness::{build_chain_with, skip, uffd_unavailable, FakeVm, Running};

const KVM_GET_VCPU_MMAP_SIZE: u64 = 0xAE04;
const KVM_CREATE_VM: u64 = 0xAE01;
const KVM_CREATE_VCPU: u64 = 0xAE41;
const KVM_SET_TSS_ADDR: u64 = 0xAE47;
const KVM_RUN: u64 = 0xAE80;
const KVM_SET_USER_MEMORY_REGION: u64 = 0x4020_AE46;
const KVM_GET_SREGS: u64 = 0x8138_AE83;
const KVM_SET_SREGS: u64 = 0x4138_AE84;
const KVM_SET_REGS: u64 = 0x4090_AE82;
const KVM_EXIT_IO: u32 = 2;
const KVM_EXIT_HLT: u32 = 5;

#[repr(C)]
struct UserMemoryRegion {
    slot: u32,
    flags: u32,
    guest_phys_addr: u64,
    memory_size: u64,
    userspace_addr: u64,
}
const _: () = assert!(std::mem::size_of::<UserMemoryRegion>() == 32);

/// The guest (16-bit real mode, at 0x1000): for each byte of 0x10000..0x90000,
/// `bx = rol(bx, 1) + byte`; then `out 0x10, ax` with ax = bx, and `hlt`.
const GUEST: [u8; 35] = [
    0xba, 0x00, 0x10, // mov dx, 0x1000
    0x31, 0xdb, // xor bx, bx
    0x31, 0xc0, // xor ax, ax
    0x8e, 0xda, // outer: mov ds, dx
    0x31, 0xf6, // xor si, si
    0x31, 0xc9, // xor cx, cx (65536 iterations)
    0xac, // inner: lodsb
    0xd1, 0xc3, // rol bx, 1
    0x01, 0xc3, // add bx, ax
    0xe2, 0xf9, // loop inner
    0x81, 0xc2, 0x00, 0x10, // add dx, 0x1000
    0x81, 0xfa, 0x00, 0x90, // cmp dx, 0x9000
    0x75, 0xe9, // jne outer
    0x89, 0xd8, // mov ax, bx
    0xe7, 0x10, // out 0x10, ax
    0xf4, // hlt
];
const CODE_AT: usize = 0x1000;
const SUM_FROM: usize = 0x10000;
const SUM_TO: usize = 0x90000;

fn checksum(mem: &[u8]) -> u16 {
    mem[SUM_FROM..SUM_TO]
        .iter()
        .fold(0u16, |bx, &b| bx.rotate_left(1).wrapping_add(u16::from(b)))
}

fn ioctl(fd: &impl AsRawFd, req: u64, arg: u64) -> std::io::Result<i32> {
    // SAFETY: each call site passes a request whose argument is `arg` (an integer or a pointer
    // to a live struct of the size the request encodes).
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), req as _, arg) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(r)
}

fn owned(fd: i32) -> OwnedFd {
    assert!(fd >= 0);
    // SAFETY: `fd` is a new fd returned by a KVM ioctl; nothing else owns it.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

#[test]
fn a_kvm_guest_checksums_memory_served_by_the_page_server() {
    if uffd_unavailable() {
        return;
    }
    let kvm = match File::options().read(true).write(true).open("/dev/kvm") {
        Ok(f) => f,
        Err(e) => {
            skip(&format!("/dev/kvm unavailable: {e}"));
            return;
        }
    };
    let memory: u64 = 1 << 20;
    let chain = build_chain_with(31, memory, |_, mem| {
        mem[CODE_AT..CODE_AT + GUEST.len()].copy_from_slice(&GUEST)
    });
    let want = checksum(&chain.expected);
    // Two memslots: guest 0..512 KiB and 512 KiB..1 MiB, with a host-side gap between them.
    let split = 512 * 1024;
    let vm = FakeVm::new(memory, split, 256 * 1024);
    let srv = Running::start(&chain, |c| c.background_fill = false);
    let _conn = vm.connect(&srv.socket);

    let vmfd = owned(ioctl(&kvm, KVM_CREATE_VM, 0).unwrap());
    let _ = ioctl(&vmfd, KVM_SET_TSS_ADDR, 0xfffb_d000);
    for (slot, r) in vm.regions.iter().enumerate() {
        let region = UserMemoryRegion {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: r.offset,
            memory_size: r.size,
            userspace_addr: r.base_host_virt_addr,
        };
        ioctl(
            &vmfd,
            KVM_SET_USER_MEMORY_REGION,
            &region as *const _ as u64,
        )
        .unwrap();
    }
    let vcpu = owned(ioctl(&vmfd, KVM_CREATE_VCPU, 0).unwrap());
    let run_size = ioctl(&kvm, KVM_GET_VCPU_MMAP_SIZE, 0).unwrap() as usize;
    // SAFETY: maps the vcpu's kvm_run area (shared, as KVM requires); unmapped below.
    let run = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            run_size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            vcpu.as_raw_fd(),
            0,
        )
    };
    assert_ne!(run, libc::MAP_FAILED);
    let mut sregs = [0u8; 312];
    ioctl(&vcpu, KVM_GET_SREGS, sregs.as_mut_ptr() as u64).unwrap();
    // cs: base (u64 at 0) = 0, selector (u16 at 12) = 0.
    sregs[0..8].fill(0);
    sregs[12..14].fill(0);
    ioctl(&vcpu, KVM_SET_SREGS, sregs.as_ptr() as u64).unwrap();
    let mut regs = [0u64; 18];
    regs[16] = CODE_AT as u64; // rip
    regs[17] = 2; // rflags
    ioctl(&vcpu, KVM_SET_REGS, regs.as_ptr() as u64).unwrap();

    let mut got: Option<u16> = None;
    for _ in 0..100 {
        ioctl(&vcpu, KVM_RUN, 0).unwrap();
        let base = run as *const u8;
        // SAFETY: the first 48 bytes of the mapped kvm_run (at least a page) are readable.
        let head: [u8; 48] = unsafe { std::ptr::read_volatile(base as *const [u8; 48]) };
        let u16_at = |i: usize| u16::from_le_bytes([head[i], head[i + 1]]);
        let reason = u32::from_le_bytes([head[8], head[9], head[10], head[11]]);
        match reason {
            KVM_EXIT_IO => {
                // The io exit: direction u8 @32, size u8 @33, port u16 @34, count u32 @36,
                // data_offset u64 @40.
                let (size, port) = (head[33], u16_at(34));
                let mut off = [0u8; 8];
                off.copy_from_slice(&head[40..48]);
                let data_offset = u64::from_le_bytes(off) as usize;
                assert_eq!((port, size), (0x10, 2));
                assert!(data_offset + 2 <= run_size);
                let data = base.wrapping_add(data_offset) as *const u16;
                // SAFETY: data_offset + 2 lies inside the kvm_run mapping (checked above).
                got = Some(unsafe { std::ptr::read_unaligned(data) });
            }
            KVM_EXIT_HLT => break,
            other => panic!("unexpected kvm exit {other}"),
        }
    }
    // SAFETY: unmaps the kvm_run mapping created above, used no more.
    unsafe { libc::munmap(run, run_size) };
    let (_, stats) = srv.stop().unwrap();
    eprintln!("kvm guest checksum {got:?} (want {want:#06x}); stats {stats:?}");
    assert_eq!(got, Some(want), "guest checksum");
    assert!(stats.faults > 0);
}
