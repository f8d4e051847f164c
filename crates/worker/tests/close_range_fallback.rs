//! Inherited descriptors are closed even where `close_range` is refused (kernels before 5.9,
//! seccomp profiles): from `/proc/self/fd`, and when that fails too the launch fails with a
//! status that says why. Its own test binary: the seccomp filters it installs are
//! process-wide and permanent.

mod common;

use cairn_core::Code;
use common::*;

/// From now on, every thread of this process gets `errno` from system call `nr`.
fn refuse(nr: libc::c_long, errno: u32) {
    const LD_NR: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
    const JEQ: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
    const RET: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
    let op = |code: u16, jt: u8, jf: u8, k: u32| libc::sock_filter { code, jt, jf, k };
    let mut filter = [
        op(LD_NR, 0, 0, 0), // seccomp_data.nr
        op(JEQ, 0, 1, nr as u32),
        op(RET, 0, 0, libc::SECCOMP_RET_ERRNO | errno),
        op(RET, 0, 0, libc::SECCOMP_RET_ALLOW),
    ];
    let prog = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_mut_ptr(),
    };
    // SAFETY: prctl and seccomp read the filter program through a valid pointer.
    unsafe {
        assert_eq!(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), 0);
        let r = libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            libc::SECCOMP_FILTER_FLAG_TSYNC,
            &prog as *const libc::sock_fprog,
        );
        assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
    }
}

#[tokio::test]
async fn descriptors_are_closed_without_close_range_or_the_launch_fails_clearly() {
    // A descriptor of the worker without close-on-exec, as a library might leave one.
    // SAFETY: open(2) with a valid path; the descriptor is never closed.
    let leaked = unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY) };
    assert!(leaked > 2);
    refuse(libc::SYS_close_range, libc::ENOSYS as u32);

    let kit = Kit::new();
    let action = kit
        .action(
            &command(&["/bin/ls", "-l", "/proc/self/fd"]),
            kit.empty_root().await,
        )
        .await;
    let response = kit.run(action).await;
    let listing = kit
        .read(ok(&response).stdout_digest.as_ref().unwrap())
        .await;
    let listing = String::from_utf8(listing.to_vec()).unwrap();
    // ls lists its own descriptors: 0, 1, 2 and the one it reads /proc/self/fd through.
    let fds: Vec<&str> = listing
        .lines()
        .filter_map(|l| l.split_once(" -> "))
        .filter(|(_, target)| !(target.starts_with("/proc/") && target.ends_with("/fd")))
        .map(|(l, _)| l.rsplit(' ').next().unwrap())
        .collect();
    assert_eq!(fds, ["0", "1", "2"], "{listing}");

    // Without a way to list descriptors either, the command must not start.
    refuse(libc::SYS_getdents64, libc::EPERM as u32);
    let action = kit
        .action(&command(&["/bin/true"]), kit.empty_root().await)
        .await;
    let response = kit.run(action).await;
    assert_eq!(code(&response), Code::FailedPrecondition.rpc_code());
    let message = &response.status.as_ref().unwrap().message;
    assert!(
        message.contains("closing inherited descriptors"),
        "{message}"
    );
}
