//! The command line: `check-config` on every guide fragment, config errors, features that
//! parse but are refused at start-up, and `global.max_open_files`.

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};

fn cairn() -> Command {
    Command::new(env!("CARGO_BIN_EXE_cairn"))
}

fn fixtures() -> Vec<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../config/fixtures");
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json5"))
        .collect();
    v.sort();
    v
}

#[test]
fn check_config_accepts_every_guide_fragment_and_prints_trees() {
    let files = fixtures();
    assert!(files.len() >= 10);
    for f in files {
        if f.file_name().unwrap() == "ts-simple-executing-timeout.json5" {
            continue; // a scheduler-options fragment, not a whole file (parsed in cairn-config's tests)
        }
        let out = cairn().arg("check-config").arg(&f).output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stdout.contains("stores:"), "{stdout}");
        // Fragments that `cairn run` would refuse here are refused by check-config too, for
        // the same reason, after the tree is printed.
        let refused_because = match f.file_name().unwrap().to_str().unwrap() {
            "guide-tls.json5" => {
                Some("servers[0].listener.http.tls.cert_file: reading /certs/server.crt")
            }
            // The troubleshooting guide's fragment names no provider (NativeLink requires one).
            "ts-stores-s3-retry.json5" => {
                Some("stores.S3_STORE.experimental_cloud_object_store.provider: required")
            }
            // The guide's fragment names the scheduler only; `cairn run` needs a CAS too.
            "ts-worker.json5" => Some("workers[0].local.cas_fast_slow_store: name the store"),
            _ => None,
        };
        match refused_because {
            None => assert!(
                out.status.success() && stdout.ends_with(": ok\n"),
                "{}: {stderr}",
                f.display()
            ),
            Some(why) => assert!(
                !out.status.success() && stderr.contains(why),
                "{}: {stderr}",
                f.display()
            ),
        }
    }
    let prod = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../config/fixtures/guide-production-storage.json5");
    let out = cairn().arg("check-config").arg(prod).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("CAS_PRODUCTION: verify"), "{stdout}");
    assert!(stdout.contains("content_store: compression"), "{stdout}");
    assert!(stdout.contains("bucket=nativelink-cas-content"), "{stdout}");
}

#[test]
fn config_errors_name_file_key_path_and_expectation() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("bad.json5");
    std::fs::write(
        &f,
        r#"{stores: {CAS: {memory: {eviction_policy: {max_bytes: "lots"}}}}}"#,
    )
    .unwrap();
    let out = cairn().arg("check-config").arg(&f).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&f.display().to_string()), "{err}");
    assert!(
        err.contains("stores.CAS.memory.eviction_policy.max_bytes"),
        "{err}"
    );
    assert!(err.contains("\"10gb\""), "{err}");

    std::fs::write(
        &f,
        r#"{stores: {CAS: {memory: {}}}, servers: [{listener: {http: {socket_address: "127.0.0.1:0"}}, services: {cas: {main: {cas_store: "CSA"}}}}]}"#,
    )
    .unwrap();
    let out = cairn().arg("check-config").arg(&f).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        err.contains("servers[0].services.cas.main.cas_store") && err.contains("\"CSA\""),
        "{err}"
    );
}

#[test]
fn missing_tls_files_are_refused_at_start_with_the_key_path() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../config/fixtures");
    let out = cairn()
        .arg("run")
        .arg(dir.join("guide-tls.json5"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success(), "started without its certificate");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("servers[0].listener.http.tls.cert_file: reading /certs/server.crt"),
        "{err}"
    );
}

#[test]
fn unknown_cloud_providers_are_refused_at_start_with_the_key_path() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("cloud.json5");
    std::fs::write(
        &file,
        r#"{ stores: { BLOBS: { experimental_cloud_object_store: { provider: "s4", bucket: "b" } } } }"#,
    )
    .unwrap();
    let key = "stores.BLOBS.experimental_cloud_object_store.provider: unknown provider \"s4\"";
    // `run` and `check-config` give the same verdict.
    for verb in ["run", "check-config"] {
        let out = cairn()
            .arg(verb)
            .arg(&file)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(!out.status.success(), "{verb} succeeded");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(key), "{verb}: {err}");
    }
}

#[test]
fn global_max_open_files_raises_the_soft_limit() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = common::MEMORY_CONFIG.replacen('{', "{ global: { max_open_files: 1000 },", 1);
    let config = dir.path().join("c.json5");
    std::fs::write(&config, cfg.replace("@ADDR@", "127.0.0.1:0")).unwrap();
    // Start with a soft limit of 256 so that the raise is visible.
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -Sn 256 && exec {} run {}",
            env!("CARGO_BIN_EXE_cairn"),
            config.display()
        ))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stdout));
    let first = lines.next().unwrap().unwrap();
    assert!(first.contains("listening on"), "{first}");
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", child.id())).unwrap();
    let _ = child.kill();
    let _ = child.wait();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let soft: u64 = line.split_whitespace().nth(3).unwrap().parse().unwrap();
    assert_eq!(soft, 1000, "{line}");
}

#[test]
fn refused_worker_keys_fail_run_and_check_config_alike() {
    let dir = tempfile::tempdir().unwrap();
    let config = |extra: &str| {
        format!(
            r#"{{
              stores: {{ CAS: {{ memory: {{}} }}, AC: {{ memory: {{}} }} }},
              workers: [{{ local: {{
                worker_api_endpoint: {{ uri: "grpc://127.0.0.1:1" }},
                cas_fast_slow_store: "CAS",
                work_directory: "{work}",
                {extra}
              }} }}],
            }}"#,
            work = dir.path().join("work").display()
        )
    };
    let f = dir.path().join("w.json5");
    // Every key at once is accepted...
    std::fs::write(
        &f,
        config(
            r#"upload_action_result: {
                 ac_store: "AC", upload_ac_results_strategy: "everything",
                 historical_results_store: "CAS", upload_historical_results_strategy: "failures_only",
                 success_message_template: "{digest_function}/{action_digest_hash}-{action_digest_size}",
                 failure_message_template: "{historical_results_hash}-{historical_results_size}",
               },
               entrypoint: "/usr/bin/env", timeout_handled_externally: true, max_action_timeout_s: 60,
               additional_environment: { A: "timeout_millis", B: { property: "cpu_count" } },
               max_output_files: 10, max_output_bytes: "1GiB","#,
        ),
    )
    .unwrap();
    let out = cairn().arg("check-config").arg(&f).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // ...and each of these is refused, by `run` and `check-config` alike, naming its key.
    for (extra, key) in [
        (
            r#"stores: [{ memory: {} }],"#,
            "workers[0].local.stores: not a key of a NativeLink 1.6.6 local worker",
        ),
        (
            r#"upload_action_result: { upload_ac_results_strategy: "success_only" },"#,
            "workers[0].local.upload_action_result.upload_ac_results_strategy",
        ),
        (
            r#"upload_action_result: { ac_store: "ACX" },"#,
            "workers[0].local.upload_action_result.ac_store: no store named \"ACX\"",
        ),
        (
            r#"upload_action_result: { historical_results_store: "NOPE" },"#,
            "workers[0].local.upload_action_result.historical_results_store: no store named",
        ),
        (
            r#"upload_action_result: { ac_store: "AC", failure_message_template: "{instance_name}" },"#,
            "workers[0].local.upload_action_result.failure_message_template: unknown variable {instance_name}",
        ),
        (
            r#"worker_api_endpoint: { uri: "grpc://127.0.0.1:1", timeout: -1 },"#,
            "workers[0].local.worker_api_endpoint.timeout",
        ),
    ] {
        let text = config(extra);
        // The second `worker_api_endpoint` replaces the first (JSON5 keeps the last).
        std::fs::write(&f, text).unwrap();
        for verb in ["run", "check-config"] {
            let out = cairn()
                .arg(verb)
                .arg(&f)
                .stdin(Stdio::null())
                .output()
                .unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{verb} accepted {extra}");
            assert!(err.contains(key), "{verb} {extra}: {err}");
        }
    }
}

/// NativeLink kinds and keys that Cairn recognises but has not built are refused by name, by
/// `run` and `check-config` alike, never ignored.
#[test]
fn recognised_but_unbuilt_nativelink_parts_are_refused_by_key_path() {
    let dir = tempfile::tempdir().unwrap();
    for (text, key) in [(
        r#"{ stores: { M: { experimental_mongo: { connection_string: "mongodb://localhost:27017", database: "nativelink" } } } }"#,
        "stores.M: store kind `experimental_mongo`",
    )] {
        let f = dir.path().join("c.json5");
        std::fs::write(&f, text).unwrap();
        for verb in ["run", "check-config"] {
            let out = cairn()
                .arg(verb)
                .arg(&f)
                .stdin(Stdio::null())
                .output()
                .unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{verb} accepted {text}");
            assert!(
                err.contains(key) && err.contains("not built yet"),
                "{verb}: {err}"
            );
        }
    }
}

/// An action cache that shares a store, or a bucket prefix, with a CAS, and a dedup whose
/// index and content share one, are warned of by `check-config` (and logged by `run`), naming
/// the key paths; apart, or through `completeness_checking`'s read-only `cas_store`, nothing
/// is said.
#[test]
fn stores_that_overwrite_each_other_are_warned_of() {
    let dir = tempfile::tempdir().unwrap();
    let config = |stores: &str, ac: &str| {
        format!(
            r#"{{ stores: {{ {stores} }}, servers: [{{ listener: {{ http: {{ socket_address: "127.0.0.1:0" }} }},
               services: {{ cas: [{{ instance_name: "", cas_store: "CAS" }}], ac: [{{ instance_name: "", ac_store: "{ac}" }}] }} }}] }}"#
        )
    };
    let s3 = |prefix: &str| {
        format!(
            r#"{{ experimental_cloud_object_store: {{ provider: "aws", region: "r", bucket: "b", key_prefix: "{prefix}" }} }}"#
        )
    };
    let warned = [
        (
            config(&format!("CAS: {}", s3("p/")), "CAS"),
            "warning: c.json5: servers[0].services.ac..ac_store: \"CAS\" is also a CAS",
        ),
        (
            config(
                &format!(
                    "CAS: {{ fast_slow: {{ fast: {{ memory: {{}} }}, slow: {} }} }}, AC: {}",
                    s3("p/"),
                    s3("p/")
                ),
                "AC",
            ),
            "the action cache \"AC\" and the CAS \"CAS\"",
        ),
        (
            config(
                &format!(
                    "CAS: {{ dedup: {{ index_store: {}, content_store: {} }} }}, AC: {}",
                    s3("d/"),
                    s3("d/"),
                    s3("ac/")
                ),
                "AC",
            ),
            "stores.CAS.dedup: index_store and content_store both keep their entries in aws",
        ),
    ];
    for (text, want) in warned {
        let f = dir.path().join("c.json5");
        std::fs::write(&f, &text).unwrap();
        let out = cairn()
            .current_dir(dir.path())
            .arg("check-config")
            .arg("c.json5")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success() && err.contains(want), "{text}: {err}");
    }
    for text in [
        config(&format!("CAS: {}, AC: {}", s3("cas/"), s3("ac/")), "AC"),
        config(
            &format!(
                r#"CAS: {}, AC: {{ completeness_checking: {{ backend: {}, cas_store: {{ ref_store: {{ name: "CAS" }} }} }} }}"#,
                s3("cas/"),
                s3("ac/")
            ),
            "AC",
        ),
    ] {
        let f = dir.path().join("ok.json5");
        std::fs::write(&f, &text).unwrap();
        let out = cairn().arg("check-config").arg(&f).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && !err.contains("warning"),
            "{text}: {err}"
        );
    }
}

/// NativeLink's local-worker keys with values Cairn cannot use are errors naming the key.
#[test]
fn bad_worker_key_values_are_refused_by_key_path() {
    let dir = tempfile::tempdir().unwrap();
    let worker = |extra: &str| {
        format!(
            r#"{{ stores: {{ CAS: {{ fast_slow: {{ fast: {{ filesystem: {{ content_path: "/tmp/x/c", temp_path: "/tmp/x/t" }} }}, slow: {{ memory: {{}} }} }} }} }}, workers: [{{ local: {{ worker_api_endpoint: {{ uri: "grpc://127.0.0.1:1" }}, cas_fast_slow_store: "CAS", {extra} }} }}] }}"#
        )
    };
    for (extra, expected) in [
        (
            r#"experimental_precondition_script: "check 'unbalanced""#,
            "workers[0].local.experimental_precondition_script: \"check 'unbalanced\" is not a command line",
        ),
        (
            r#"max_upload_timeout_s: "soon""#,
            "workers[0].local.max_upload_timeout_s",
        ),
        (
            r#"directory_cache: { max_entries: 10, colour: "red" }"#,
            "workers[0].local.directory_cache.colour",
        ),
        (
            r#"directory_cache: { max_concurrent_fetches: 0 }"#,
            "workers[0].local.directory_cache.max_concurrent_fetches: expected a number above 0",
        ),
    ] {
        let f = dir.path().join("c.json5");
        std::fs::write(&f, worker(extra)).unwrap();
        refused_by_both(&f, expected);
    }
}

/// `check-config` and `run` both refuse the config at `f`, saying `expected`.
fn refused_by_both(f: &std::path::Path, expected: &str) {
    for verb in ["check-config", "run"] {
        let out = cairn()
            .arg(verb)
            .arg(f)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        let text = std::fs::read_to_string(f).unwrap_or_default();
        assert!(!out.status.success(), "{verb} accepted {text}");
        assert!(err.contains(expected), "{verb} {text}: {err}");
    }
}

/// A stop signal sent the moment the first listener is announced (while local workers are
/// still starting) drains and exits 0, rather than killing the process.
#[test]
fn sigterm_right_after_the_first_listener_drains_cleanly() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("c.json5");
    let waddr = common::free_addr();
    std::fs::write(
        &f,
        format!(
            r#"{{ stores: {{ CAS: {{ memory: {{}} }}, WCAS: {{ fast_slow: {{ fast: {{ filesystem: {{ content_path: "{d}/c", temp_path: "{d}/t" }} }}, slow: {{ ref_store: {{ name: "CAS" }} }} }} }} }},
                 schedulers: {{ MAIN: {{ simple: {{}} }} }},
                 servers: [{{ listener: {{ http: {{ socket_address: "127.0.0.1:0" }} }}, services: {{ cas: [{{ cas_store: "CAS" }}] }} }},
                           {{ listener: {{ http: {{ socket_address: "{waddr}" }} }}, services: {{ worker_api: {{ scheduler: "MAIN" }} }} }}],
                 workers: [{{ local: {{ worker_api_endpoint: {{ uri: "grpc://{waddr}" }}, cas_fast_slow_store: "WCAS", work_directory: "{d}/w" }} }}] }}"#,
            d = dir.path().display()
        ),
    )
    .unwrap();
    let mut child = cairn()
        .arg("run")
        .arg(&f)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    loop {
        let line = lines.next().expect("exited before listening").unwrap();
        if line.contains(" listening on ") {
            break;
        }
    }
    // SAFETY: kill(2) with the child's pid, which is not reaped yet.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    std::thread::spawn(move || for _ in lines {});
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "{status:?}");
}

/// A `redis_store` is checked without connecting: check-config prints it (passwords hidden)
/// and refuses a bad one by key path, like `run`.
#[test]
fn redis_store_is_checked_by_key_path_without_connecting() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("c.json5");
    std::fs::write(
        &f,
        r#"{ stores: { CAS: { redis_store: { addresses: ["redis://cairn:s3cret@127.0.0.1:1/2"], mode: "standard", key_prefix: "cas:", max_client_permits: 1000 } } } }"#,
    )
    .unwrap();
    let out = cairn().arg("check-config").arg(&f).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(
            "CAS: redis_store mode=standard addresses=redis://***@127.0.0.1:1/2 key_prefix=cas:"
        ),
        "{stdout}"
    );
    assert!(!stdout.contains("s3cret"), "{stdout}");
    for (text, key) in [
        (
            r#"{ stores: { CAS: { fast_slow: { fast: { memory: {} }, slow: { redis_store: { addresses: ["http://x"] } } } } } }"#,
            "stores.CAS.fast_slow.slow.redis_store.addresses[0]",
        ),
        (
            r#"{ stores: { R: { redis_store: { addresses: [] } } } }"#,
            "stores.R.redis_store.addresses",
        ),
        (
            r#"{ stores: { R: { redis_store: { addresses: ["redis://a:1", "redis://b:1"] } } } }"#,
            "stores.R.redis_store.addresses: mode standard takes exactly one URL",
        ),
        (
            r#"{ stores: { R: { redis_store: { addresses: ["redis://a:1"], mode: "galaxy" } } } }"#,
            "stores.R.redis_store.mode",
        ),
    ] {
        std::fs::write(&f, text).unwrap();
        for verb in ["run", "check-config"] {
            let out = cairn()
                .arg(verb)
                .arg(&f)
                .stdin(Stdio::null())
                .output()
                .unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{verb} accepted {text}");
            assert!(err.contains(key), "{verb} {text}: {err}");
        }
    }
}

/// The listener's upload limits (`advanced_http.max_uploads`, `upload_buffer_bytes`): values
/// that would refuse every upload or leave no buffer are refused by key path.
#[test]
fn bad_upload_limits_are_refused_by_key_path() {
    let dir = tempfile::tempdir().unwrap();
    for (adv, expected) in [
        (
            "max_uploads: 0",
            "servers[0].listener.http.advanced_http.max_uploads: 0 would refuse every upload",
        ),
        (
            r#"upload_buffer_bytes: "64kb""#,
            "servers[0].listener.http.advanced_http.upload_buffer_bytes: 64000 bytes is below the least, 1 MiB",
        ),
        (
            r#"upload_buffer_bytes: "lots""#,
            "servers[0].listener.http.advanced_http.upload_buffer_bytes",
        ),
    ] {
        let f = dir.path().join("c.json5");
        std::fs::write(
            &f,
            format!(
                r#"{{ stores: {{ CAS: {{ memory: {{}} }} }}, servers: [{{ listener: {{ http: {{ socket_address: "127.0.0.1:0", advanced_http: {{ {adv} }} }} }}, services: {{ cas: [{{ instance_name: "", cas_store: "CAS" }}] }} }}] }}"#
            ),
        )
        .unwrap();
        refused_by_both(&f, expected);
    }
}

/// A `gcs` store with `authentication_required: true` and no credentials anywhere (no key in
/// the environment, no gcloud file, no metadata server) is refused at start by key path, as
/// NativeLink refuses it; without the key it starts (requests then go unsigned).
#[test]
fn gcs_authentication_required_without_credentials_is_refused_by_key_path() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("c.json5");
    let config = |required: &str| {
        format!(
            r#"{{ stores: {{ CAS: {{ experimental_cloud_object_store: {{ provider: "gcs", bucket: "b"{required} }} }} }}, servers: [{{ listener: {{ http: {{ socket_address: "127.0.0.1:0" }} }}, services: {{ cas: [{{ instance_name: "", cas_store: "CAS" }}] }} }}] }}"#
        )
    };
    let run = |verb: &str| {
        cairn()
            .arg(verb)
            .arg(&f)
            .env_clear()
            .env("HOME", dir.path())
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            // RFC 6761: never resolves.
            .env("GCE_METADATA_HOST", "metadata.invalid")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    std::fs::write(&f, config(", authentication_required: true")).unwrap();
    for verb in ["check-config", "run"] {
        let out = run(verb);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{verb} accepted it");
        assert!(
            err.contains(
                "stores.CAS.experimental_cloud_object_store.authentication_required: true, but no GCP credentials were found"
            ),
            "{verb}: {err}"
        );
    }
    std::fs::write(&f, config("")).unwrap();
    let out = run("check-config");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
