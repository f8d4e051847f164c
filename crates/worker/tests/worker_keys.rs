//! The NativeLink worker keys on real processes: `additional_environment`, `entrypoint`,
//! `timeout_handled_externally`, the upload strategies of `upload_action_result`, the
//! historical store and the message templates.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cairn_core::proto::build::bazel::remote::execution::v2 as re;
use cairn_core::{Code, Digest};
use cairn_store::memory::MemoryStore;
use cairn_store::{Store, StoreExt, StoreRef};
use cairn_worker::{
    ActionRunner, EnvironmentSource, HistoricalExecuteResponse, MessageTemplate, RunRequest,
    UploadStrategy,
};
use common::*;
use prost::Message;
use tokio_util::sync::CancellationToken;

fn env(pairs: &[(&str, EnvironmentSource)]) -> Vec<(String, EnvironmentSource)> {
    pairs
        .iter()
        .map(|(n, s)| (n.to_string(), s.clone()))
        .collect()
}

fn platform(pairs: &[(&str, &str)]) -> re::Platform {
    re::Platform {
        properties: pairs
            .iter()
            .map(|(n, v)| re::platform::Property {
                name: n.to_string(),
                value: v.to_string(),
            })
            .collect(),
    }
}

/// An executable script at `path`.
fn script(path: &Path, body: &str) {
    std::fs::write(path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

async fn run_with(
    kit: &Kit,
    action: Digest,
    platform: Option<Vec<(String, String)>>,
) -> re::ExecuteResponse {
    let req = RunRequest {
        action_digest: action,
        skip_cache_write: false,
        queued_at: None,
        platform,
    };
    kit.runner
        .run_request(req, CancellationToken::new())
        .await
        .unwrap()
}

/// The stdout of an OK response, as text.
async fn stdout(kit: &Kit, response: &re::ExecuteResponse) -> String {
    let result = ok(response);
    let d = result.stdout_digest.as_ref().expect("stdout written");
    String::from_utf8(kit.read(d).await.to_vec()).unwrap()
}

#[tokio::test]
async fn additional_environment_sets_each_source_before_the_commands_own() {
    let kit = Kit::with(|c| {
        c.additional_environment = env(&[
            ("CPUS", EnvironmentSource::Property("cpu_count".into())),
            (
                "ABSENT",
                EnvironmentSource::Property("no_such_property".into()),
            ),
            ("MODE", EnvironmentSource::Value("from-config".into())),
            ("KEEP", EnvironmentSource::Value("config-only".into())),
            ("T_MS", EnvironmentSource::TimeoutMillis),
            ("SCRATCH", EnvironmentSource::ActionDirectory),
            ("PATH", EnvironmentSource::FromEnvironment),
        ]);
    });
    // The scratch directory exists, is not the input root, and can be written.
    let mut cmd = sh(
        "touch \"$SCRATCH/tmp-file\" && [ \"$SCRATCH\" != \"$PWD\" ] && \
         echo \"$CPUS|$ABSENT|$MODE|$KEEP|$T_MS|$PATH\"; echo \"$SCRATCH\" >&2",
    );
    cmd.environment_variables = vec![re::command::EnvironmentVariable {
        name: "MODE".into(),
        value: "from-command".into(),
    }];
    let root = kit.empty_root().await;
    let action = kit
        .action_with(&cmd, root, |a| {
            a.timeout = timeout(7);
            a.platform = Some(platform(&[("cpu_count", "from-action")]));
        })
        .await;
    let path = std::env::var("PATH").unwrap_or_default();

    // The Action's platform, when the scheduler sends none.
    let response = run_with(&kit, action, None).await;
    assert_eq!(
        stdout(&kit, &response).await,
        format!("from-action||from-command|config-only|7000|{path}\n")
    );
    let scratch = kit
        .read(ok(&response).stderr_digest.as_ref().unwrap())
        .await;
    let scratch = String::from_utf8(scratch.to_vec()).unwrap();
    assert!(scratch.trim().ends_with(".action"), "{scratch}");
    assert!(
        !Path::new(scratch.trim()).exists(),
        "the scratch directory is removed"
    );

    // The platform the scheduler matched (after its property_modifier) wins.
    let matched = vec![("cpu_count".to_string(), "16".to_string())];
    let response = run_with(&kit, action, Some(matched)).await;
    assert!(stdout(&kit, &response).await.starts_with("16||"));
    kit.assert_work_root_empty();
}

#[tokio::test]
async fn timeout_millis_is_the_maximum_when_the_action_sets_none() {
    let kit = Kit::with(|c| {
        c.max_timeout = Duration::from_secs(90);
        c.default_timeout = c.max_timeout;
        c.additional_environment = env(&[("T_MS", EnvironmentSource::TimeoutMillis)]);
    });
    let action = kit.action(&sh("echo $T_MS"), kit.empty_root().await).await;
    assert_eq!(stdout(&kit, &kit.run(action).await).await, "90000\n");
}

#[tokio::test]
async fn the_entrypoint_runs_every_command_with_its_argv_appended() {
    let tmp = tempfile::tempdir().unwrap();
    let argv = tmp.path().join("argv");
    let wrapper = tmp.path().join("wrapper.sh");
    // Records its arguments (one per line), drops its own flag and runs the rest.
    script(
        &wrapper,
        &format!(
            "printf '%s\\n' \"$@\" > {}\nshift\nexec \"$@\"",
            argv.display()
        ),
    );
    let kit = Kit::with(|c| {
        c.entrypoint = vec![wrapper.display().to_string(), "--wrapped".into()];
    });
    let action = kit
        .action(
            &command(&["/bin/echo", "hello", "two words"]),
            kit.empty_root().await,
        )
        .await;
    let response = kit.run(action).await;
    assert_eq!(stdout(&kit, &response).await, "hello two words\n");
    assert_eq!(
        std::fs::read_to_string(&argv).unwrap(),
        "--wrapped\n/bin/echo\nhello\ntwo words\n"
    );

    // A missing entrypoint is a program that cannot start, named as such.
    let kit = Kit::with(|c| c.entrypoint = vec!["/nonexistent/entrypoint".into()]);
    let action = kit
        .action(&command(&["/bin/true"]), kit.empty_root().await)
        .await;
    let response = kit.run(action).await;
    assert_eq!(code(&response), Code::FailedPrecondition.rpc_code());
    assert!(
        response.message.contains("/nonexistent/entrypoint"),
        "{}",
        response.message
    );
}

#[tokio::test]
async fn with_the_timeout_handled_externally_the_worker_does_not_kill_at_the_actions_timeout() {
    let kit = Kit::with(|c| {
        c.timeout_handled_externally = true;
        c.max_timeout = Duration::from_secs(30);
        c.additional_environment = env(&[("T_MS", EnvironmentSource::TimeoutMillis)]);
    });
    // Runs past its 1 s timeout and finishes: nobody enforces it.
    let action = kit
        .action_with(
            &sh("sleep 2; echo survived $T_MS"),
            kit.empty_root().await,
            |a| a.timeout = timeout(1),
        )
        .await;
    let response = kit.run(action).await;
    assert_eq!(stdout(&kit, &response).await, "survived 1000\n");

    // An action may ask for more than the maximum; it is told so, and killed at the maximum.
    let kit = Kit::with(|c| {
        c.timeout_handled_externally = true;
        c.max_timeout = Duration::from_secs(1);
    });
    let action = kit
        .action_with(&sh("sleep 30"), kit.empty_root().await, |a| {
            a.timeout = timeout(600)
        })
        .await;
    let started = Instant::now();
    let response = kit.run(action).await;
    assert_eq!(code(&response), Code::DeadlineExceeded.rpc_code());
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(response.message.contains("1s"), "{}", response.message);
}

#[tokio::test]
async fn an_entrypoint_enforces_the_timeout_and_reports_it_through_the_side_channel() {
    let tmp = tempfile::tempdir().unwrap();
    let wrapper = tmp.path().join("enforce.sh");
    // What NativeLink's docs suggest: wrap the command in `timeout`, and say so in the side
    // channel file when it fires.
    script(
        &wrapper,
        "timeout -s KILL $((T_MS / 1000)) \"$@\"\nrc=$?\n\
         if [ $rc -eq 137 ]; then echo '{\"failure\": \"timeout\"}' > \"$SIDE_CHANNEL\"; fi\n\
         exit $rc",
    );
    let kit = Kit::with(|c| {
        c.timeout_handled_externally = true;
        c.max_timeout = Duration::from_secs(60);
        c.entrypoint = vec![wrapper.display().to_string()];
        c.additional_environment = env(&[
            ("T_MS", EnvironmentSource::TimeoutMillis),
            ("SIDE_CHANNEL", EnvironmentSource::SideChannelFile),
        ]);
    });
    let action = kit
        .action_with(&sh("echo started; sleep 30"), kit.empty_root().await, |a| {
            a.timeout = timeout(1)
        })
        .await;
    let started = Instant::now();
    let response = kit.run(action).await;
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the entrypoint killed it"
    );
    assert_eq!(code(&response), Code::DeadlineExceeded.rpc_code());
    assert!(
        response.message.contains("side channel file"),
        "{}",
        response.message
    );
    let result = response.result.as_ref().expect("the result is kept");
    assert_eq!(result.exit_code, 137);
    assert_eq!(
        kit.read(result.stdout_digest.as_ref().unwrap()).await,
        "started\n"
    );
    assert_eq!(kit.cached(action).await, None, "a timeout is never cached");

    // Within its timeout the same wrapper changes nothing.
    let action = kit
        .action_with(&sh("echo quick"), kit.empty_root().await, |a| {
            a.timeout = timeout(5)
        })
        .await;
    let response = kit.run(action).await;
    assert_eq!(stdout(&kit, &response).await, "quick\n");
    assert!(kit.cached(action).await.is_some());
    kit.assert_work_root_empty();
}

/// Runs a succeeding and a failing action under `strategy`; returns whether each was cached.
async fn cached_under(strategy: UploadStrategy) -> (bool, bool) {
    let kit = Kit::with(|c| c.ac_strategy = strategy);
    let root = kit.empty_root().await;
    let good = kit.action(&sh("echo good"), root).await;
    let bad = kit.action(&sh("echo bad; exit 3"), root).await;
    assert_eq!(ok(&kit.run(good).await).exit_code, 0);
    assert_eq!(ok(&kit.run(bad).await).exit_code, 3);
    (
        kit.cached(good).await.is_some(),
        kit.cached(bad).await.is_some(),
    )
}

#[tokio::test]
async fn upload_ac_results_strategy_chooses_which_results_are_cached() {
    assert_eq!(
        cached_under(UploadStrategy::SuccessOnly).await,
        (true, false)
    );
    assert_eq!(cached_under(UploadStrategy::Everything).await, (true, true));
    assert_eq!(
        cached_under(UploadStrategy::FailuresOnly).await,
        (false, true)
    );
    assert_eq!(cached_under(UploadStrategy::Never).await, (false, false));

    // `everything` still never caches a timeout.
    let kit = Kit::with(|c| c.ac_strategy = UploadStrategy::Everything);
    let action = kit
        .action_with(&sh("sleep 30"), kit.empty_root().await, |a| {
            a.timeout = timeout(1)
        })
        .await;
    assert_eq!(
        code(&kit.run(action).await),
        Code::DeadlineExceeded.rpc_code()
    );
    assert_eq!(kit.cached(action).await, None);
}

fn entries(store: &MemoryStore) -> u64 {
    store
        .info()
        .entries
        .expect("a memory store counts its entries")
}

/// The `HistoricalExecuteResponse` whose digest the message names as `<hash>-<size>`.
async fn historical(store: &MemoryStore, message: &str) -> HistoricalExecuteResponse {
    let (hash, size) = message.rsplit_once('/').unwrap().1.split_once('-').unwrap();
    let d = Digest::parse(F, hash, size.parse().unwrap()).unwrap();
    HistoricalExecuteResponse::decode(store.get_all(&d, usize::MAX).await.unwrap()).unwrap()
}

#[tokio::test]
async fn failures_go_to_the_historical_store_and_the_templates_make_the_message() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(tmp.path());
    cfg.success_message = MessageTemplate::parse(
        "https://b/{digest_function}/action/{action_digest_hash}-{action_digest_size}/",
    )
    .unwrap();
    cfg.failure_message = MessageTemplate::parse(
        "https://b/{digest_function}/historical_execute_response/{historical_results_hash}-{historical_results_size}",
    )
    .unwrap();
    let cas = Arc::new(MemoryStore::new(&Default::default()));
    let ac = Arc::new(MemoryStore::new(&Default::default()));
    let history = Arc::new(MemoryStore::new(&Default::default()));
    let runner = ActionRunner::new(
        cas.clone() as StoreRef,
        Some(ac.clone() as StoreRef),
        None,
        cfg,
    )
    .with_historical_store(history.clone() as StoreRef);
    let kit = Kit {
        tmp,
        cas,
        ac,
        local: None,
        runner,
    };
    let root = kit.empty_root().await;

    let good = kit.action(&sh("echo good"), root).await;
    let response = kit.run(good).await;
    assert_eq!(
        response.message,
        format!(
            "https://b/sha256/action/{}-{}/",
            good.hash_hex(),
            good.size()
        )
    );
    assert!(kit.cached(good).await.is_some());

    let bad = kit.action(&sh("echo bad; exit 3"), root).await;
    let response = kit.run(bad).await;
    assert_eq!(ok(&response).exit_code, 3);
    assert!(
        response
            .message
            .starts_with("https://b/sha256/historical_execute_response/"),
        "{}",
        response.message
    );
    let h = historical(&history, &response.message).await;
    assert_eq!(h.action_digest, Some(bad.to_proto()));
    let stored = h.execute_response.unwrap();
    assert_eq!(stored.result.as_ref().unwrap().exit_code, 3);
    assert_eq!(stored.result, response.result);
    assert_eq!(kit.cached(bad).await, None);
    assert_eq!(
        entries(&history),
        1,
        "only the failure is in the historical store"
    );
}

#[tokio::test]
async fn without_a_historical_store_failures_go_to_the_cas_and_nothing_is_said_by_default() {
    let kit = Kit::with(|c| {
        c.failure_message =
            MessageTemplate::parse("{historical_results_hash}-{historical_results_size}").unwrap()
    });
    let bad = kit.action(&sh("exit 1"), kit.empty_root().await).await;
    let response = kit.run(bad).await;
    let (hash, size) = response.message.split_once('-').unwrap();
    let d = Digest::parse(F, hash, size.parse().unwrap()).unwrap();
    let h =
        HistoricalExecuteResponse::decode(kit.cas.get_all(&d, usize::MAX).await.unwrap()).unwrap();
    assert_eq!(h.action_digest, Some(bad.to_proto()));

    // No templates: no message; `never`: no historical result.
    let kit = Kit::with(|c| c.historical_strategy = UploadStrategy::Never);
    let bad = kit.action(&sh("exit 1"), kit.empty_root().await).await;
    let before = entries(&kit.cas);
    let response = kit.run(bad).await;
    assert_eq!(response.message, "");
    assert_eq!(entries(&kit.cas), before, "nothing was stored");
}

/// `experimental_precondition_script`: while it fails, every run is given back to the scheduler
/// with RESOURCE_EXHAUSTED and what the program printed, and nothing runs; once it passes,
/// actions run. It sees `additional_environment`'s values and platform properties.
#[tokio::test]
async fn a_failing_precondition_gives_the_action_back_and_runs_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let block = dir.path().join("blocked");
    let ran = dir.path().join("ran");
    let pre = dir.path().join("pre.sh");
    script(
        &pre,
        &format!(
            "if [ -e {} ]; then echo \"no disk for $POOL ($GREETING)\"; exit 3; fi",
            block.display()
        ),
    );
    let kit = Kit::with(|c| {
        c.precondition = Some(vec![pre.display().to_string()]);
        c.additional_environment = env(&[
            ("POOL", EnvironmentSource::Property("pool".into())),
            ("GREETING", EnvironmentSource::Value("hi".into())),
        ]);
    });
    let root = kit.empty_root().await;
    let action = kit
        .action(&sh(&format!("touch {}", ran.display())), root)
        .await;
    std::fs::write(&block, b"").unwrap();
    let req = RunRequest {
        action_digest: action,
        skip_cache_write: false,
        queued_at: None,
        platform: Some(vec![("pool".into(), "large".into())]),
    };
    let e = kit
        .runner
        .run_request(req.clone(), CancellationToken::new())
        .await
        .unwrap_err();
    assert_eq!(e.code, Code::ResourceExhausted, "{e:?}");
    assert!(e.message.contains("no disk for large (hi)"), "{e:?}");
    assert!(e.message.contains("exit status: 3"), "{e:?}");
    assert!(
        !ran.exists(),
        "the action ran although the precondition failed"
    );
    kit.assert_work_root_empty();

    std::fs::remove_file(&block).unwrap();
    let r = kit
        .runner
        .run_request(req, CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(ok(&r).exit_code, 0);
    assert!(ran.exists());

    // A program that cannot be started is a failed precondition too, not a crash.
    let kit = Kit::with(|c| c.precondition = Some(vec!["/no/such/program".into()]));
    let root = kit.empty_root().await;
    let action = kit.action(&command(&["/bin/true"]), root).await;
    let e = kit
        .runner
        .run(action, false, CancellationToken::new())
        .await
        .unwrap_err();
    assert_eq!(e.code, Code::ResourceExhausted, "{e:?}");
}

/// A CAS whose writes take `delay`: uploads that outlast `max_upload_timeout_s`.
struct SlowWrites {
    inner: Arc<MemoryStore>,
    delay: Duration,
}

#[async_trait::async_trait]
impl Store for SlowWrites {
    async fn has_many(&self, keys: &[Digest]) -> Result<Vec<Option<u64>>, cairn_core::Error> {
        self.inner.has_many(keys).await
    }
    async fn get(
        &self,
        key: &Digest,
        offset: u64,
        length: Option<u64>,
    ) -> Result<cairn_core::BlobStream, cairn_core::Error> {
        self.inner.get(key, offset, length).await
    }
    async fn put(
        &self,
        key: &Digest,
        body: cairn_core::BlobStream,
    ) -> Result<(), cairn_core::Error> {
        tokio::time::sleep(self.delay).await;
        self.inner.put(key, body).await
    }
    fn info(&self) -> cairn_store::StoreInfo {
        self.inner.info()
    }
}

/// `max_upload_timeout_s`: an upload that outlasts it fails the run with DEADLINE_EXCEEDED as
/// an error (so the scheduler retries the action), and no result is cached.
#[tokio::test]
async fn an_upload_past_its_timeout_gives_the_action_back() {
    let tmp = tempfile::tempdir().unwrap();
    let inner = Arc::new(MemoryStore::new(&Default::default()));
    let ac = Arc::new(MemoryStore::new(&Default::default()));
    let mut cfg = config(tmp.path());
    cfg.upload_timeout = Duration::from_millis(200);
    let runner = ActionRunner::new(
        Arc::new(SlowWrites {
            inner: inner.clone(),
            delay: Duration::from_secs(30),
        }) as StoreRef,
        Some(ac.clone() as StoreRef),
        None,
        cfg,
    );
    let command = sh("echo output > out.txt").encode_to_vec();
    let command = {
        let mut c = re::Command::decode(&command[..]).unwrap();
        c.output_paths = vec!["out.txt".into()];
        c.encode_to_vec()
    };
    let root = re::Directory::default().encode_to_vec();
    let cd = F.compute(&command);
    let rd = F.compute(&root);
    inner.put_bytes(&cd, command.into()).await.unwrap();
    inner.put_bytes(&rd, root.into()).await.unwrap();
    let action = re::Action {
        command_digest: Some(cd.to_proto()),
        input_root_digest: Some(rd.to_proto()),
        ..Default::default()
    }
    .encode_to_vec();
    let ad = F.compute(&action);
    inner.put_bytes(&ad, action.into()).await.unwrap();

    let e = runner
        .run(ad, false, CancellationToken::new())
        .await
        .unwrap_err();
    assert_eq!(e.code, Code::DeadlineExceeded, "{e:?}");
    assert!(e.message.contains("max_upload_timeout_s"), "{e:?}");
    assert!(
        ac.get_all(&ad, 1 << 20).await.is_err(),
        "a result was cached"
    );
}

/// `directory_cache`: an input root seen before is copied from the cache (kept across a
/// restart of the worker): the second worker here has none of the input blobs or Directory
/// messages in its CAS and still runs the action, on the input as it was before the first run
/// changed it.
#[tokio::test]
async fn the_directory_cache_serves_an_input_root_seen_before() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = cairn_worker::DirectoryCacheConfig {
        root: tmp.path().join("directory_cache"),
        max_entries: 10,
        max_bytes: 0,
        max_concurrent_fetches: 2,
    };
    let runner = |cas: Arc<MemoryStore>, cached: bool, work: &str| {
        let mut cfg = config(tmp.path());
        cfg.work_root = tmp.path().join(work);
        if cached {
            cfg.directory_cache = Some(cache.clone());
        }
        ActionRunner::new(cas as StoreRef, None, None, cfg)
    };
    let put = |cas: &Arc<MemoryStore>, bytes: Vec<u8>| {
        let cas = cas.clone();
        async move {
            let d = F.compute(&bytes);
            cas.put_bytes(&d, bytes.into()).await.unwrap();
            d
        }
    };
    let full = Arc::new(MemoryStore::new(&Default::default()));
    let input = put(&full, b"hello\n".to_vec()).await;
    let data = put(
        &full,
        re::Directory {
            files: vec![file("in.txt", input, false)],
            ..Default::default()
        }
        .encode_to_vec(),
    )
    .await;
    let root = put(
        &full,
        re::Directory {
            directories: vec![dir("data", data)],
            ..Default::default()
        }
        .encode_to_vec(),
    )
    .await;
    let command =
        sh("cat data/in.txt; chmod u+w data/in.txt; echo changed > data/in.txt").encode_to_vec();
    let action = |cd: Digest| {
        re::Action {
            command_digest: Some(cd.to_proto()),
            input_root_digest: Some(root.to_proto()),
            ..Default::default()
        }
        .encode_to_vec()
    };
    let cd = put(&full, command.clone()).await;
    let ad = put(&full, action(cd)).await;

    let first = runner(full.clone(), true, "work1")
        .open_directory_cache()
        .await
        .unwrap();
    let r = first.run(ad, true, CancellationToken::new()).await.unwrap();
    let out = ok(&r).stdout_digest.clone().unwrap();
    let d = Digest::from_proto_with(F, &out).unwrap();
    assert_eq!(full.get_all(&d, 1024).await.unwrap(), &b"hello\n"[..]);
    drop(first);

    // A CAS with the Command and the Action only.
    let bare = Arc::new(MemoryStore::new(&Default::default()));
    assert_eq!(put(&bare, command).await, cd);
    assert_eq!(put(&bare, action(cd)).await, ad);
    let uncached = runner(bare.clone(), false, "work2");
    let r = uncached
        .run(ad, true, CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(code(&r), Code::FailedPrecondition.rpc_code(), "{r:?}");

    let second = runner(bare.clone(), true, "work3")
        .open_directory_cache()
        .await
        .unwrap();
    let r = second
        .run(ad, true, CancellationToken::new())
        .await
        .unwrap();
    let out = ok(&r).stdout_digest.clone().unwrap();
    let d = Digest::from_proto_with(F, &out).unwrap();
    assert_eq!(bare.get_all(&d, 1024).await.unwrap(), &b"hello\n"[..]);
}
