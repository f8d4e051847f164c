//! The THP trampoline: a tiny static program that turns transparent huge pages back on for
//! its own memory map and then executes the command.
//!
//! Cairn's `main` turns THP off for the server (`PR_SET_THP_DISABLE`), a flag of the memory
//! map that `execve` copies into the new one. A command started by `clone(CLONE_VM)` shares
//! the worker's map until its `execve`, so clearing the flag there would turn THP on for the
//! whole worker for that time (measured: 18% of the time at 394 launches/s). Instead the child
//! executes this program, which inherits the flag, clears it in its own fresh map and executes
//! the command, which so runs with the system's THP setting while the worker's flag never
//! changes. It costs one more `execve` of a 225-byte file with no loader.
//!
//! The program (x86-64 only; elsewhere commands inherit THP off) finds the command's path in
//! its `argv[0]` and the command's argv after it; it sets close-on-exec on descriptor 3, so
//! that a successful `execve` closes it, and when `execve` fails it writes the errno there (4
//! bytes) and exits with 127. It lives in a sealed-by-reopening memfd, read-only (an exec of a
//! file open for writing fails with ETXTBSY), made once per process.

use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::OnceLock;

/// The code, at the start of the program's only segment (after the headers):
///
/// ```text
/// mov $157, %eax; mov $41, %edi; xor %esi, %esi; xor %edx, %edx; xor %r10d, %r10d;
/// xor %r8d, %r8d; syscall                      # prctl(PR_SET_THP_DISABLE, 0, 0, 0, 0)
/// mov $72, %eax; mov $3, %edi; mov $2, %esi; mov $1, %edx; syscall
///                                              # fcntl(3, F_SETFD, FD_CLOEXEC)
/// mov (%rsp), %rcx; mov 8(%rsp), %rdi; lea 16(%rsp), %rsi; lea 16(%rsp,%rcx,8), %rdx
/// mov $59, %eax; syscall                       # execve(argv[0], argv + 1, envp)
/// neg %eax; push %rax; mov $1, %eax; mov $3, %edi; mov %rsp, %rsi; mov $4, %edx; syscall
///                                              # write(3, &errno, 4)
/// mov $231, %eax; mov $127, %edi; syscall      # exit_group(127)
/// ```
#[cfg(target_arch = "x86_64")]
const CODE: [u8; 105] = [
    0xb8, 0x9d, 0x00, 0x00, 0x00, 0xbf, 0x29, 0x00, 0x00, 0x00, 0x31, 0xf6, 0x31, 0xd2, 0x45, 0x31,
    0xd2, 0x45, 0x31, 0xc0, 0x0f, 0x05, 0xb8, 0x48, 0x00, 0x00, 0x00, 0xbf, 0x03, 0x00, 0x00, 0x00,
    0xbe, 0x02, 0x00, 0x00, 0x00, 0xba, 0x01, 0x00, 0x00, 0x00, 0x0f, 0x05, 0x48, 0x8b, 0x0c, 0x24,
    0x48, 0x8b, 0x7c, 0x24, 0x08, 0x48, 0x8d, 0x74, 0x24, 0x10, 0x48, 0x8d, 0x54, 0xcc, 0x10, 0xb8,
    0x3b, 0x00, 0x00, 0x00, 0x0f, 0x05, 0xf7, 0xd8, 0x50, 0xb8, 0x01, 0x00, 0x00, 0x00, 0xbf, 0x03,
    0x00, 0x00, 0x00, 0x48, 0x89, 0xe6, 0xba, 0x04, 0x00, 0x00, 0x00, 0x0f, 0x05, 0xb8, 0xe7, 0x00,
    0x00, 0x00, 0xbf, 0x7f, 0x00, 0x00, 0x00, 0x0f, 0x05,
];

/// The descriptor the child passes its errno pipe on, as the program expects.
pub(crate) const ERRNO_FD: RawFd = 3;

/// The program as a static ELF executable: one read+execute segment mapping the whole file.
#[cfg(target_arch = "x86_64")]
fn elf() -> Vec<u8> {
    const BASE: u64 = 0x40_0000;
    const HEADERS: u64 = 64 + 56;
    let size = HEADERS + CODE.len() as u64;
    let mut f = Vec::with_capacity(size as usize);
    // ELF header: 64-bit, little-endian, version 1, System V; an executable for x86-64.
    f.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    f.extend_from_slice(&2u16.to_le_bytes()); // e_type: ET_EXEC
    f.extend_from_slice(&0x3eu16.to_le_bytes()); // e_machine: x86-64
    f.extend_from_slice(&1u32.to_le_bytes()); // e_version
    f.extend_from_slice(&(BASE + HEADERS).to_le_bytes()); // e_entry: the code
    f.extend_from_slice(&64u64.to_le_bytes()); // e_phoff
    f.extend_from_slice(&0u64.to_le_bytes()); // e_shoff: no sections
    f.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    f.extend_from_slice(&64u16.to_le_bytes()); // e_ehsize
    f.extend_from_slice(&56u16.to_le_bytes()); // e_phentsize
    f.extend_from_slice(&1u16.to_le_bytes()); // e_phnum
    f.extend_from_slice(&[0; 6]); // e_shentsize, e_shnum, e_shstrndx
                                  // Program header: PT_LOAD, read + execute, the whole file at BASE.
    f.extend_from_slice(&1u32.to_le_bytes());
    f.extend_from_slice(&5u32.to_le_bytes());
    f.extend_from_slice(&0u64.to_le_bytes()); // p_offset
    f.extend_from_slice(&BASE.to_le_bytes()); // p_vaddr
    f.extend_from_slice(&BASE.to_le_bytes()); // p_paddr
    f.extend_from_slice(&size.to_le_bytes()); // p_filesz
    f.extend_from_slice(&size.to_le_bytes()); // p_memsz
    f.extend_from_slice(&0x1000u64.to_le_bytes()); // p_align
    f.extend_from_slice(&CODE);
    debug_assert_eq!(f.len() as u64, size);
    f
}

#[cfg(not(target_arch = "x86_64"))]
fn elf() -> Vec<u8> {
    Vec::new()
}

/// A read-only, close-on-exec descriptor of the program, made on first use; `None` where it
/// cannot be (another architecture, no memfd), and then commands inherit the worker's THP
/// setting.
pub(crate) fn program() -> Option<RawFd> {
    static PROGRAM: OnceLock<Option<OwnedFd>> = OnceLock::new();
    PROGRAM
        .get_or_init(|| match make() {
            Ok(fd) => fd,
            Err(e) => {
                tracing::warn!(error = %e, "no THP trampoline: commands run with THP off, as the worker");
                None
            }
        })
        .as_ref()
        .map(|fd| fd.as_raw_fd())
}

fn make() -> std::io::Result<Option<OwnedFd>> {
    let elf = elf();
    if elf.is_empty() {
        return Ok(None);
    }
    const MFD_EXEC: libc::c_uint = 0x10; // Linux 6.3: executable despite vm.memfd_noexec
    let name = c"cairn-thp-trampoline";
    // SAFETY: memfd_create(2) reads a NUL-terminated name and returns a new descriptor.
    let mut fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | MFD_EXEC) };
    if fd < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) {
        // SAFETY: as above; kernels before 6.3 know no MFD_EXEC.
        fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    }
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and is owned by nothing else.
    let mut file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    file.write_all(&elf)?;
    // Executing needs a descriptor with no writer: reopen read-only, then close the writer.
    let path = format!("/proc/self/fd/{}", file.as_raw_fd());
    let read_only = std::fs::File::open(path)?;
    drop(file);
    let fd = OwnedFd::from(read_only);
    // Numbered above the descriptors the child sets up (0 to 4), so that its dup2s never
    // overwrite it before it is used.
    Ok(Some(crate::launch::above_child_fds(fd)?))
}
