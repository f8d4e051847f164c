//! What copying inputs out of the local CAS costs (instead of hard links, which let an action
//! rewrite a blob). Not run by default: `cargo test -p cairn-worker --test input_cost --
//! --ignored --nocapture` prints the figures.

mod common;

use std::time::Instant;

use cairn_core::proto::build::bazel::remote::execution::v2 as re;
use common::*;

async fn measure(files: usize, size: usize) {
    let kit = Kit::with_local_cas().await;
    let mut nodes = Vec::new();
    for i in 0..files {
        let mut data = vec![b'x'; size];
        data[..8].copy_from_slice(&(i as u64).to_le_bytes());
        nodes.push(file(&format!("f{i}"), kit.blob(data).await, false));
    }
    let root = kit
        .proto(&re::Directory {
            files: nodes,
            ..Default::default()
        })
        .await;
    let action = kit
        .action_with(&command(&["/bin/true"]), root, |a| a.do_not_cache = true)
        .await;
    kit.run(action).await; // fills the local CAS
    let runs = 10;
    let start = Instant::now();
    for _ in 0..runs {
        assert_eq!(ok(&kit.run(action).await).exit_code, 0);
    }
    let per_action = start.elapsed() / runs;

    // The placing step alone, both ways, on the same blobs.
    let local = kit.local.as_ref().unwrap();
    let blobs: Vec<_> = (0..files)
        .map(|i| {
            let mut data = vec![b'x'; size];
            data[..8].copy_from_slice(&(i as u64).to_le_bytes());
            local.path_of_blob(&F.compute(&data)).unwrap()
        })
        .collect();
    let time = |name: &str, place: &dyn Fn(&std::path::Path, &std::path::Path)| {
        let dir = kit.tmp.path().join(name);
        std::fs::create_dir(&dir).unwrap();
        let start = Instant::now();
        for (i, b) in blobs.iter().enumerate() {
            place(b, &dir.join(format!("f{i}")));
        }
        start.elapsed()
    };
    let linked = time("link", &|s, d| std::fs::hard_link(s, d).unwrap());
    let copied = time("copy", &|s, d| {
        std::fs::copy(s, d).unwrap();
    });
    println!(
        "{files} files of {size} B: {per_action:?} per action (copies); placing alone: \
         hard links {linked:?}, copies {copied:?}"
    );
}

#[tokio::test]
#[ignore]
async fn input_copy_cost() {
    measure(300, 16 << 10).await; // a compile: headers
    measure(20, 5 << 20).await; // a link: objects and libraries
    measure(2000, 4 << 10).await;
}
