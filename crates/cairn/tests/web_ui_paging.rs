//! `/queue` pages a long queue: every operation is counted, one page of rows is shown per
//! platform (the longest queued first) with links to the next and previous pages, against a
//! real Cairn whose scheduler holds 130 operations no worker can run. Hostile paging
//! parameters (garbage, huge offsets, unknown platforms) answer a page, and the server
//! stays up.

mod common;

use std::time::{Duration, Instant};

use cairn_core::proto::build::bazel::remote::execution::v2 as re;
use common::actions::{upload_blobs, ShellAction};
use common::{http_get, Cairn};

const CONFIG: &str = r#"{
  stores: { CAS: { memory: {} }, AC: { memory: {} } },
  schedulers: {
    MAIN: { simple: {
      supported_platform_properties: { OSFamily: "exact" },
      unschedulable_grace_period_s: 600,
    } },
  },
  servers: [
    { listener: { http: { socket_address: "@ADDR@" } },
      services: {
        cas: [{ instance_name: "", cas_store: "CAS" }],
        execution: [{ instance_name: "", cas_store: "CAS", scheduler: "MAIN" }],
        web_ui: { cas_store: "CAS", ac_store: "AC", schedulers: ["MAIN"], activity_path: "" },
      } },
  ],
}"#;

const OPERATIONS: usize = 130;
const ROW: &str = "<tr><td><a href=\"/action/";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_queue_is_paged() {
    let tmp = tempfile::tempdir().unwrap();
    let cairn = Cairn::start_with(tmp.path(), CONFIG, None);
    // Three connections, so that no one carries all the waiting Execute streams.
    let mut channels = Vec::new();
    for _ in 0..3 {
        channels.push(cairn.channel().await);
    }
    let mut waiting = Vec::new();
    for n in 0..OPERATIONS {
        let ch = channels[n % 3].clone();
        let script = format!("echo {n}");
        let (digest, blobs) = ShellAction {
            script: &script,
            ..Default::default()
        }
        .build_with_platform(&[("OSFamily", "windows")]);
        upload_blobs(ch.clone(), "", blobs).await;
        let stream = re::execution_client::ExecutionClient::new(ch)
            .execute(re::ExecuteRequest {
                action_digest: Some(digest.to_proto()),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        waiting.push(stream);
    }

    let deadline = Instant::now() + Duration::from_secs(30);
    let first = loop {
        let (code, page) = http_get(cairn.addr, "/queue").await;
        assert_eq!(code, 200, "{page}");
        if page.contains(&format!(
            "<p>{OPERATIONS} queued, 0 executing, 0 workers.</p>"
        )) {
            break page;
        }
        assert!(Instant::now() < deadline, "never all queued:\n{page}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(first.matches(ROW).count(), 100, "{first}");
    assert!(
        first.contains("Platform <code>OSFamily=windows</code>: 130 queued, 0 executing")
            && first.contains("No worker can run these actions: no worker is connected")
            && first.contains("Operations 1-100 of 130, the longest queued first."),
        "{first}"
    );
    let next = "/queue?scheduler=MAIN&amp;platform=OSFamily%3Dwindows&amp;offset=100";
    assert!(
        first.contains(&format!("<a href=\"{next}\">next »</a>")),
        "{first}"
    );
    assert!(!first.contains("« previous"), "{first}");

    let (code, second) = http_get(cairn.addr, &next.replace("&amp;", "&")).await;
    assert_eq!(code, 200, "{second}");
    assert_eq!(second.matches(ROW).count(), 30, "{second}");
    assert!(
        second.contains("Operations 101-130 of 130")
            && second.contains("offset=0\">« previous</a>")
            && !second.contains("next »")
            && second.contains("<a href=\"/queue\">All platforms</a>"),
        "{second}"
    );
    // Rows do not repeat across the pages.
    let rows = |page: &str| -> Vec<String> {
        page.split(ROW)
            .skip(1)
            .map(|r| r[..r.find('"').unwrap()].to_string())
            .collect()
    };
    let mut all = rows(&first);
    all.extend(rows(&second));
    all.sort();
    all.dedup();
    assert_eq!(all.len(), OPERATIONS);

    // Past the end, and hostile parameters: a page, not an error.
    let (code, past) = http_get(
        cairn.addr,
        "/queue?scheduler=MAIN&platform=OSFamily%3Dwindows&offset=500",
    )
    .await;
    assert_eq!(code, 200, "{past}");
    assert!(
        past.contains("No operations from 501 on: 130 in all."),
        "{past}"
    );
    for path in [
        "/queue?offset=garbage",
        "/queue?offset=99999999999999999999999999999",
        "/queue?offset=-5&platform=%FF%FE%3Cscript%3E",
        "/queue?platform=nope&scheduler=MAIN&offset=18446744073709551615",
        "/queue?scheduler=NOPE",
        "/workers?offset=18446744073709551615&scheduler=MAIN",
        "/workers?offset=x",
    ] {
        let (code, page) = http_get(cairn.addr, path).await;
        assert_eq!(code, 200, "{path}: {page}");
        assert!(!page.contains("<script>"), "{path}: {page}");
    }
    let (code, page) = http_get(cairn.addr, "/queue?platform=nope").await;
    assert_eq!(code, 200);
    assert_eq!(page.matches(ROW).count(), 0, "{page}");
    assert!(page.contains("show its operations"), "{page}");
    drop(waiting);
    cairn.kill9();
}
