//! Containment without cgroups: the worker process is a child subreaper, and the processes an
//! action leaves behind, re-parented to it, are killed and reaped when the action ends. Its
//! own test binary: the choice is made once per process.

mod common;

use common::*;

#[tokio::test]
async fn without_cgroups_escaped_processes_are_killed_and_reaped() {
    std::env::set_var("CAIRN_ACTION_CGROUPS", "off");
    let kit = Kit::new();
    let action = kit
        .action(
            &sh(&escaping_script(kit.tmp.path())),
            kit.empty_root().await,
        )
        .await;
    let response = kit.run(action).await;
    let result = ok(&response);
    assert_eq!(
        kit.read(result.stdout_digest.as_ref().unwrap()).await,
        "done\n"
    );
    for file in ["forked.pid", "setsid.pid"] {
        let pid = pid_in(&kit.tmp.path().join(file));
        // Re-parented to this process and reaped by it: not even a zombie is left.
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "{file}: process {pid} is left: {:?}",
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
        );
    }
    // SAFETY: prctl(2) PR_GET_CHILD_SUBREAPER writes one int through a valid pointer.
    let mut flag: libc::c_int = 0;
    unsafe { libc::prctl(libc::PR_GET_CHILD_SUBREAPER, &mut flag as *mut libc::c_int) };
    assert_eq!(flag, 1);
    kit.assert_work_root_empty();
}
