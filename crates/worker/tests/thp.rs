//! A worker that turned transparent huge pages off (cairn's `main` does) keeps them off while
//! it launches commands, and the commands run with the system's setting. Its own test binary:
//! the setting is process-wide.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use common::*;

/// Whether THP is off for this process (a flag of its memory map: any thread reads it).
fn thp_off() -> bool {
    // SAFETY: PR_GET_THP_DISABLE takes only integers.
    unsafe { libc::prctl(libc::PR_GET_THP_DISABLE, 0, 0, 0, 0) == 1 }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_workers_thp_flag_never_turns_on_while_commands_get_thp() {
    // SAFETY: PR_SET_THP_DISABLE takes only integers.
    unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    let (stop, samples, on) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let sampler = {
        let (stop, samples, on) = (stop.clone(), samples.clone(), on.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                samples.fetch_add(1, Ordering::Relaxed);
                if !thp_off() {
                    on.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    let kit = Arc::new(Kit::new());
    let probe = kit
        .action(
            &command(&["/bin/grep", "^THP_enabled", "/proc/self/status"]),
            kit.empty_root().await,
        )
        .await;
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let kit = kit.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..25 {
                let response = kit
                    .runner
                    .run(probe, true, Default::default())
                    .await
                    .unwrap();
                let stdout = kit
                    .read(ok(&response).stdout_digest.as_ref().unwrap())
                    .await;
                assert_eq!(&stdout[..], b"THP_enabled:\t1\n");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    let (samples, on) = (samples.load(Ordering::Relaxed), on.load(Ordering::Relaxed));
    assert!(samples > 1000, "{samples} samples");
    assert_eq!(on, 0, "THP read on in {on} of {samples} samples");
    assert!(thp_off());

    // A program that cannot be executed is still reported as such through the trampoline.
    let missing = kit
        .action(&command(&["/nonexistent/tool"]), kit.empty_root().await)
        .await;
    let response = kit.run(missing).await;
    assert_eq!(
        code(&response),
        cairn_core::Code::FailedPrecondition.rpc_code()
    );
    let message = &response.status.as_ref().unwrap().message;
    assert!(message.contains("No such file"), "{message}");
}
