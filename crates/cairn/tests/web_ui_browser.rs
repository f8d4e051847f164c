//! The web UI as a person uses it: Bazel 4.2.3 builds and tests `bazel-webui-workspace/`
//! with Cairn as its remote executor and Build Event Service (`--bes_backend`,
//! `--bes_results_url`); the link Bazel prints opens in headless Chromium and shows the
//! build; the failing action's stderr is on its page (reached from the invocation); the
//! worker is on the workers page; a queued action is on the queue page while it waits. Screenshots of each page are written under
//! `CARGO_TARGET_TMPDIR/web_ui_screenshots/`.
//!
//! Needs `bazel` (Debian's `bazel-bootstrap`) and `chromium` (both installed by
//! `scripts/test`); without Bazel the test fails unless `CAIRN_SKIP_BAZEL=1` is set.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cairn_core::proto::build::bazel::remote::execution::v2 as re;
use common::actions::{upload_blobs, ShellAction};
use common::bazel;
use common::http_get;
use common::web_ui_build::{chromium_binary, WebUiBuild};

const CONFIG: &str = r#"{
  stores: {
    CAS: { memory: {} },
    AC: { memory: {} },
    BEP: { memory: {} },
    WORKER_CAS: { fast_slow: {
      fast: { filesystem: { content_path: "@DIR@/worker-cas", temp_path: "@DIR@/worker-tmp" } },
      slow: { ref_store: { name: "CAS" } } } },
  },
  schedulers: {
    MAIN: { simple: { supported_platform_properties: { OSFamily: "exact" } } },
  },
  servers: [
    { listener: { http: { socket_address: "@ADDR@" } },
      services: {
        cas: [{ instance_name: "", cas_store: "CAS" }],
        ac: [{ instance_name: "", ac_store: "AC" }],
        bytestream: [{ instance_name: "", cas_store: "CAS" }],
        execution: [{ instance_name: "", cas_store: "CAS", scheduler: "MAIN" }],
        capabilities: [{ instance_name: "", remote_execution: { scheduler: "MAIN" } }],
        experimental_bep: { store: "BEP" },
        web_ui: { bep_store: "BEP", cas_store: "CAS", ac_store: "AC", schedulers: ["MAIN"] },
      } },
    { listener: { http: { socket_address: "127.0.0.1:@WPORT@" } }, services: { worker_api: { scheduler: "MAIN" } } },
  ],
  workers: [{ local: {
    name: "browser-worker",
    worker_api_endpoint: { uri: "grpc://127.0.0.1:@WPORT@" },
    cas_fast_slow_store: "WORKER_CAS",
    upload_action_result: { ac_store: "AC" },
    work_directory: "@DIR@/work",
    platform_properties: { OSFamily: { values: ["linux"] } },
    max_inflight_tasks: 4,
  } }],
}"#;

/// Headless Chromium on `url` with `args` (`--dump-dom`, `--screenshot=...`): its stdout.
/// Panics if it is missing, fails, or runs past a minute.
fn chromium(profile: &Path, url: &str, args: &[String]) -> String {
    let mut child = Command::new(chromium_binary())
        .args([
            "--headless",
            // Root in CI containers: Chromium's sandbox needs user namespaces it may not have.
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--window-size=1280,1800",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(url)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start chromium");
    let out = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut std::io::BufReader::new(out), &mut s);
        s
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "chromium {args:?} {url}: {status}");
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium {args:?} {url} ran past a minute");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    reader.join().unwrap()
}

/// The page's DOM as Chromium rendered it, and a screenshot of it at `shot`.
fn open(profile: &Path, url: &str, shot: &Path) -> String {
    let dom = chromium(profile, url, &["--dump-dom".to_string()]);
    chromium(profile, url, &[format!("--screenshot={}", shot.display())]);
    let png = std::fs::read(shot).expect("the screenshot was written");
    assert!(
        png.starts_with(b"\x89PNG"),
        "{} is not a PNG",
        shot.display()
    );
    dom
}

#[test]
fn bazel_prints_a_link_that_opens_the_build_in_a_browser() {
    let Some(build) = WebUiBuild::start("web_ui_browser", CONFIG, "web_ui_screenshots") else {
        return;
    };
    let (cairn, shots) = (&build.cairn, &build.shots);
    let profile = build.profile("chromium-profile");

    let mut flags = build.flags();
    flags.extend(["--keep_going".to_string(), "//...".to_string()]);
    let out = build.bazel.try_run("test", &flags, bazel::COMMAND_DEADLINE);
    let text = out.text();
    assert!(
        !out.status.success(),
        "//:fails must fail the build:\n{text}"
    );
    let prefix = build.link_prefix();
    let link = text
        .lines()
        .find_map(|l| l.find(&prefix).map(|i| l[i..].trim().to_string()))
        .unwrap_or_else(|| panic!("Bazel printed no {prefix} link:\n{text}"));

    // The printed link, in a browser.
    let dom = open(&profile, &link, &shots.join("invocation.png"));
    for want in [
        "Invocation ",
        "failed",
        "//:fails",
        "//:fine",
        "//:greets_test",
        "PASSED",
        "Console output",
        "Remote actions",
    ] {
        assert!(dom.contains(want), "{want:?} is not on {link}:\n{dom}");
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let path = &link[link.find("/invocation/").unwrap()..];
    let (_, page) = rt.block_on(http_get(cairn.addr, path));
    assert!(
        page.contains("greets_test says hello"),
        "the test log is on the invocation page:\n{page}"
    );

    // The failing action, reached from the invocation: its stderr is on its page.
    let failing = page
        .split("<tr>")
        .find(|row| row.contains(">failure<"))
        .and_then(|row| row.split("href=\"").nth(1))
        .and_then(|rest| rest.split('"').next())
        .unwrap_or_else(|| panic!("no failed remote action on the invocation page:\n{page}"))
        .to_string();
    let url = format!("http://{}{failing}", cairn.addr);
    let dom = open(&profile, &url, &shots.join("failed-action.png"));
    assert!(
        dom.contains("&lt;boom&gt; the fails rule failed"),
        "the failing action's stderr is not on {url}:\n{dom}"
    );

    // The worker, on the workers page.
    let url = format!("http://{}/workers", cairn.addr);
    let dom = open(&profile, &url, &shots.join("workers.png"));
    assert!(
        dom.contains("browser-worker-") && dom.contains("OSFamily=linux"),
        "{dom}"
    );
    // A queued action, while it waits: one for a platform no worker offers.
    let (digest, blobs) = ShellAction {
        script: "true",
        ..Default::default()
    }
    .build_with_platform(&[("OSFamily", "windows")]);
    let _waiting = rt.block_on(async {
        let ch = tonic::transport::Channel::from_shared(format!("http://{}", cairn.addr))
            .unwrap()
            .connect()
            .await
            .unwrap();
        upload_blobs(ch.clone(), "", blobs).await;
        let stream = re::execution_client::ExecutionClient::new(ch)
            .execute(re::ExecuteRequest {
                action_digest: Some(digest.to_proto()),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !http_get(cairn.addr, "/queue")
            .await
            .1
            .contains(&digest.hash_hex()[..12])
        {
            assert!(
                Instant::now() < deadline,
                "the action never showed on /queue"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        stream
    });
    let url = format!("http://{}/queue", cairn.addr);
    let dom = open(&profile, &url, &shots.join("queue.png"));
    assert!(
        dom.contains(&digest.hash_hex()[..12])
            && dom.contains("no connected worker offers OSFamily=windows"),
        "{dom}"
    );

    let url = format!("http://{}/invocations", cairn.addr);
    let dom = open(&profile, &url, &shots.join("invocations.png"));
    assert!(dom.contains(&link[prefix.len()..]), "{dom}");
    eprintln!("screenshots: {}", shots.display());
}
