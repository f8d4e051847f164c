//! NativeLink 1.6.6 compatibility: every config file of NativeLink's repository, recreated
//! as our own fixture with the same keys and shapes (`crates/config/fixtures/nativelink/`).
//!
//! - `check-config` on each fixture prints the tree in its golden file `FIXTURE.tree`
//!   (written anew with `CAIRN_BLESS=1`) and gives the verdict of the tables below.
//! - Each fixture that can run here is served by `cairn run` from a rewritten copy: socket
//!   addresses on free loopback ports (one new port per original port, so that a worker
//!   reaches the scheduler of its own file), host names and `${VAR:-host}` on 127.0.0.1, data
//!   paths under a temporary directory, TLS files made by the test. Then every listener
//!   answers GetCapabilities for each of its instance names (over TLS where configured) and
//!   `/status` where `health` is configured, one action runs end to end where the file has a
//!   scheduler and a local worker, a worker-only file keeps retrying its scheduler, and
//!   SIGTERM ends each process cleanly.

mod common;
#[path = "common/redis.rs"]
mod redis_kit;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cairn_core::proto::build::bazel::remote::execution::v2 as re;
use cairn_core::proto::google::longrunning::operation;
use cairn_core::DigestFunction;
use common::actions::{upload_blobs, ShellAction};
use common::certs::{Pair, Pki};
use common::CairnRun;
use futures::StreamExt;
use prost::Message;

fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/fixtures/nativelink")
}

/// What `cairn check-config FIXTURE` says of a fixture as it stands.
#[derive(Clone, Copy, Debug)]
enum Verdict {
    Accepted,
    /// Refused: the error names the key path `at` and says `because`.
    Refused {
        at: &'static str,
        because: &'static str,
    },
    /// Refused only because the certificate files it names are not on this machine (the
    /// error names `at`); served with the test's certificates.
    NeedsTlsFiles {
        at: &'static str,
    },
}

use Verdict::*;

/// Every fixture whose verdict no store under construction changes.
const VERDICTS: &[(&str, Verdict)] = &[
    (
        "deployment-examples__docker-compose__cas-server-multi-worker.json5",
        Accepted,
    ),
    (
        "deployment-examples__docker-compose__local-storage-cas.json5",
        NeedsTlsFiles {
            at: "servers[1].listener.http.tls.cert_file",
        },
    ),
    (
        "deployment-examples__docker-compose__scheduler-multi-worker.json5",
        Accepted,
    ),
    (
        "deployment-examples__docker-compose__scheduler.json5",
        Accepted,
    ),
    (
        "deployment-examples__docker-compose__test-multi-worker-simple.json5",
        Accepted,
    ),
    (
        "deployment-examples__docker-compose__worker-shared-cas.json5",
        Accepted,
    ),
    (
        "deployment-examples__docker-compose__worker.json5",
        Accepted,
    ),
    ("integration_tests__buck2__buck2_cas.json5", Accepted),
    (
        "integration_tests__buildstream__buildstream_cas.json5",
        Accepted,
    ),
    // No MongoDB server in Debian to test a store against: refused by key path, and stays so.
    (
        "integration_tests__mongo__mongo.json5",
        Refused {
            at: "stores.DOCUMENT_CAS",
            because: "store kind `experimental_mongo` parses but is not built yet",
        },
    ),
    ("kubernetes__components__worker__worker.json5", Accepted),
    (
        "kubernetes__nativelink__nativelink-config.json5",
        NeedsTlsFiles {
            at: "servers[1].listener.http.tls.cert_file",
        },
    ),
    ("nativelink-config__examples__advanced_http.json5", Accepted),
    ("nativelink-config__examples__basic_cas.json5", Accepted),
    ("nativelink-config__examples__chunking_cas.json5", Accepted),
    (
        "nativelink-config__examples__filesystem_cas.json5",
        Accepted,
    ),
    // Its `stores` is empty, so its services name stores that do not exist: NativeLink
    // cannot run it either. The empty instance name makes the `..` in the key path.
    (
        "nativelink-config__examples__legacy_service_config.json5",
        Refused {
            at: "servers[0].services.cas..cas_store",
            because: "no store named \"LEGACY_CAS\"",
        },
    ),
    (
        "nativelink-config__examples__local_rbe_self_test.json5",
        Accepted,
    ),
    (
        "nativelink-config__examples__mongo.json5",
        Refused {
            at: "stores.DOC_CAS",
            because: "store kind `experimental_mongo` parses but is not built yet",
        },
    ),
    (
        "nativelink-config__examples__scheduler_match_logging_disable.json5",
        Accepted,
    ),
    ("nativelink-config__examples__tmpfs-worker.json5", Accepted),
    ("toolchain-examples__nativelink-config.json5", Accepted),
];

// ---------------------------------------------------------------------------------------
// CLOUD AND REDIS STORES: the fixtures over `experimental_cloud_object_store` and
// `redis_store`. They are checked here; serving them needs their backends, which the
// emulator tests (`cloud_store.rs`, `redis_store.rs`) start.
// ---------------------------------------------------------------------------------------
const PENDING_STORES: &[(&str, Verdict)] = &[
    (
        "nativelink-config__examples__azure_blob_backend.json5",
        Accepted,
    ),
    ("nativelink-config__examples__gcs_backend.json5", Accepted),
    ("nativelink-config__examples__oci_backend.json5", Accepted),
    // NativeLink's example keeps the dedup index and content in one bucket prefix (both
    // existence-cache tiers write `objects/`, as does the action cache): accepted, with
    // warnings naming the stores (see the golden tree); served over moto with its content
    // tier under its own prefix in `cloud_and_redis_fixtures_serve_over_emulators`.
    ("nativelink-config__examples__ontap_backend.json5", Accepted),
    ("nativelink-config__examples__r2_backend.json5", Accepted),
    ("nativelink-config__examples__redis.json5", Accepted),
    (
        "nativelink-config__examples__s3_backend_with_local_fast_cas.json5",
        Accepted,
    ),
    // Every kind parses now; what is left is the store it names and does not declare, as
    // NativeLink's own generated file does.
    (
        "nativelink-config__examples__stores-config.json5",
        Refused {
            at: "stores.10.completeness_checking.cas_store.ref_store.name",
            because: "no store named \"UNDECLARED_CAS\"",
        },
    ),
    // Shared scheduler state in the Redis store.
    (
        "nativelink-config__examples__worker_with_redis_scheduler.json5",
        Accepted,
    ),
];

// ---------------------------------------------------------------------------------------
// KNOWN GAPS: NativeLink 1.6.6 keys that Cairn refuses or mis-resolves, outside the
// refusals above. Each is checked to still be a gap (a test fails once it is closed, so that
// the entry moves out of here).
// ---------------------------------------------------------------------------------------

/// (fixture that carries the key, a store of our own with the key, the key path Cairn
/// refuses, what NativeLink 1.6.6 means by it).
const KNOWN_GAPS: &[(&str, &str, &str, &str)] = &[];

#[test]
fn known_gaps_are_still_gaps() {
    let dir = tempfile::tempdir().unwrap();
    for (fixture, store, at, meaning) in KNOWN_GAPS {
        let text = std::fs::read_to_string(fixtures_dir().join(fixture)).unwrap();
        let key = at.rsplit('.').next().unwrap();
        assert!(
            text.contains(&format!("\"{key}\"")),
            "{fixture} uses `{key}`"
        );
        let config = dir.path().join("gap.json5");
        std::fs::write(
            &config,
            format!("{{ stores: {{ S: {store} }}, servers: [] }}"),
        )
        .unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_cairn"))
            .arg("check-config")
            .arg(&config)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains(&format!("{at}: unknown field")),
            "`{at}` ({meaning}) is accepted now: the gap is closed, remove it from KNOWN_GAPS \
             and update the pending verdict of {fixture}\n{stderr}"
        );
    }
}

fn all_verdicts() -> Vec<(&'static str, Verdict)> {
    VERDICTS.iter().chain(PENDING_STORES).copied().collect()
}

// ---------------------------------------------------------------------------------------
// What each runnable fixture serves, written from the fixture by hand (not read through the
// config crate under test).
// ---------------------------------------------------------------------------------------

struct Listener {
    tls: bool,
    /// Instance names its `capabilities` service answers for, and whether each has
    /// `remote_execution`.
    capabilities: &'static [(&'static str, bool)],
    health: bool,
}

struct Serves {
    fixture: &'static str,
    /// In the order of `servers`.
    listeners: &'static [Listener],
    /// Local workers in the file.
    workers: usize,
    /// One action through a scheduler and a local worker of the same file.
    action: Action,
}

enum Action {
    None,
    /// Through listener `.0` on instance `.1`: it runs, and its output is in the CAS.
    Runs(usize, &'static str),
    /// Through listener `.0` on instance `.1`: blobs and an action result written, found and
    /// read back (the stores' backends are the emulators).
    CasRoundTrip(usize, &'static str),
}

const fn plain(capabilities: &'static [(&'static str, bool)], health: bool) -> Listener {
    Listener {
        tls: false,
        capabilities,
        health,
    }
}

const WORKER_API: Listener = plain(&[], true);
const WORKER_API_NO_HEALTH: Listener = plain(&[], false);

/// A scheduler alone, with no server and no worker: check-config accepts it; `cairn run`
/// refuses to start a process with nothing to serve (see `nothing_to_run_is_refused`).
const NOTHING_TO_RUN: &str = "nativelink-config__examples__scheduler_match_logging_disable.json5";

#[test]
fn nothing_to_run_is_refused() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cairn"))
        .current_dir(fixtures_dir())
        .arg("run")
        .arg(NOTHING_TO_RUN)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("`servers` and `workers` are empty: nothing to run"),
        "{stderr}"
    );
}

const SERVES: &[Serves] = &[
    Serves {
        fixture: "deployment-examples__docker-compose__cas-server-multi-worker.json5",
        listeners: &[plain(&[], false)],
        workers: 0,
        action: Action::None,
    },
    Serves {
        fixture: "deployment-examples__docker-compose__local-storage-cas.json5",
        listeners: &[
            plain(&[], false),
            Listener {
                tls: true,
                capabilities: &[],
                health: true,
            },
        ],
        workers: 0,
        action: Action::None,
    },
    Serves {
        fixture: "deployment-examples__docker-compose__scheduler-multi-worker.json5",
        listeners: &[plain(&[("", true)], false), WORKER_API],
        workers: 0,
        action: Action::None,
    },
    Serves {
        fixture: "deployment-examples__docker-compose__scheduler.json5",
        listeners: &[plain(&[("", true)], false), WORKER_API],
        workers: 0,
        action: Action::None,
    },
    Serves {
        fixture: "deployment-examples__docker-compose__test-multi-worker-simple.json5",
        listeners: &[plain(&[("", true)], false), WORKER_API_NO_HEALTH],
        workers: 2,
        action: Action::Runs(0, ""),
    },
    Serves {
        fixture: "deployment-examples__docker-compose__worker-shared-cas.json5",
        listeners: &[],
        workers: 1,
        action: Action::None,
    },
    Serves {
        fixture: "deployment-examples__docker-compose__worker.json5",
        listeners: &[],
        workers: 1,
        action: Action::None,
    },
    Serves {
        fixture: "integration_tests__buck2__buck2_cas.json5",
        listeners: &[plain(&[("buck", true)], false), WORKER_API],
        workers: 1,
        action: Action::Runs(0, "buck"),
    },
    Serves {
        fixture: "integration_tests__buildstream__buildstream_cas.json5",
        listeners: &[plain(&[("", true)], false), WORKER_API],
        workers: 1,
        action: Action::Runs(0, ""),
    },
    Serves {
        fixture: "kubernetes__components__worker__worker.json5",
        listeners: &[],
        workers: 1,
        action: Action::None,
    },
    Serves {
        fixture: "kubernetes__nativelink__nativelink-config.json5",
        listeners: &[
            plain(&[("", true)], false),
            Listener {
                tls: true,
                capabilities: &[("", true)],
                health: false,
            },
            WORKER_API,
        ],
        workers: 0,
        action: Action::None,
    },
    Serves {
        fixture: "nativelink-config__examples__advanced_http.json5",
        listeners: &[plain(&[("", true), ("ci", true)], false), WORKER_API],
        workers: 1,
        action: Action::Runs(0, "ci"),
    },
    Serves {
        fixture: "nativelink-config__examples__basic_cas.json5",
        listeners: &[plain(&[("", true), ("ci", true)], false), WORKER_API],
        workers: 1,
        action: Action::Runs(0, ""),
    },
    Serves {
        fixture: "nativelink-config__examples__chunking_cas.json5",
        listeners: &[plain(&[("chunked", false)], false)],
        workers: 0,
        action: Action::None,
    },
    Serves {
        fixture: "nativelink-config__examples__filesystem_cas.json5",
        listeners: &[plain(&[("fs", true)], false), WORKER_API],
        workers: 0,
        action: Action::None,
    },
    Serves {
        fixture: "nativelink-config__examples__local_rbe_self_test.json5",
        listeners: &[plain(&[("", true)], false), WORKER_API],
        workers: 1,
        action: Action::Runs(0, ""),
    },
    Serves {
        fixture: "nativelink-config__examples__tmpfs-worker.json5",
        listeners: &[plain(&[("ram", true)], false), WORKER_API],
        workers: 1,
        action: Action::Runs(0, "ram"),
    },
    Serves {
        fixture: "toolchain-examples__nativelink-config.json5",
        listeners: &[plain(&[("", true)], false), WORKER_API],
        workers: 1,
        action: Action::Runs(0, ""),
    },
];

// ---------------------------------------------------------------------------------------
// The tables cover the directory.
// ---------------------------------------------------------------------------------------

fn fixture_files() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(fixtures_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".json5"))
        .collect();
    v.sort();
    v
}

#[test]
fn every_fixture_has_one_verdict_a_golden_tree_and_a_readme_row() {
    let files = fixture_files();
    assert_eq!(files.len(), 31, "NativeLink 1.6.6 has 31 config files");
    let mut named: Vec<&str> = all_verdicts().iter().map(|(f, _)| *f).collect();
    named.sort();
    assert_eq!(named, files, "the verdict tables list every fixture once");
    let readme = std::fs::read_to_string(fixtures_dir().join("README.md")).unwrap();
    for f in &files {
        assert!(readme.contains(&format!("`{f}`")), "README.md lists {f}");
        assert!(
            fixtures_dir().join(format!("{f}.tree")).exists() || blessing(),
            "{f}.tree is missing: run with CAIRN_BLESS=1"
        );
    }
    for s in SERVES {
        let verdict = all_verdicts()
            .into_iter()
            .find(|(f, _)| *f == s.fixture)
            .map(|(_, v)| v);
        assert!(
            matches!(verdict, Some(Accepted) | Some(NeedsTlsFiles { .. })),
            "{} is served, so check-config accepts it (or lacks only its TLS files)",
            s.fixture
        );
    }
    let served = |f: &str| SERVES.iter().any(|s| s.fixture == f);
    for (f, v) in VERDICTS {
        if matches!(v, Accepted | NeedsTlsFiles { .. }) {
            assert!(
                served(f) || *f == NOTHING_TO_RUN,
                "{f} is runnable: add it to SERVES"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// Resolved trees.
// ---------------------------------------------------------------------------------------

fn blessing() -> bool {
    std::env::var_os("CAIRN_BLESS").is_some()
}

/// `cairn check-config FIXTURE` run in the fixtures' directory: (success, stdout, stderr).
fn check_config(fixture: &str) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cairn"))
        .current_dir(fixtures_dir())
        .arg("check-config")
        .arg(fixture)
        .env_remove("RUST_LOG")
        // The fixtures' `${VAR:-default}`: the goldens are made with the defaults.
        .env_remove("CAS_ENDPOINT")
        .env_remove("SCHEDULER_ENDPOINT")
        .env_remove("NATIVELINK_ENDPOINT")
        .env_remove("NATIVELINK_WORKER_PLATFORM")
        .env_remove("NATIVELINK_WORKER_LRE_RS")
        .env_remove("NATIVELINK_CAS_MEMORY_CONTENT_LIMIT")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_config_prints_each_golden_tree_and_verdict() {
    let mut failures = Vec::new();
    for (fixture, verdict) in all_verdicts() {
        let (ok, stdout, stderr) = check_config(fixture);
        let printed = format!("{stdout}{stderr}");
        let golden = fixtures_dir().join(format!("{fixture}.tree"));
        if blessing() {
            std::fs::write(&golden, &printed).unwrap();
        } else {
            let want = std::fs::read_to_string(&golden).unwrap_or_default();
            if want != printed {
                failures.push(format!(
                    "{fixture}: the tree differs from {fixture}.tree (CAIRN_BLESS=1 rewrites it)\n\
                     --- want\n{want}--- got\n{printed}"
                ));
            }
        }
        let right = match verdict {
            Accepted => ok && stdout.ends_with(&format!("{fixture}: ok\n")),
            Refused { at, because } => {
                !ok && stderr.contains(&format!("{fixture}: {at}: ")) && stderr.contains(because)
            }
            NeedsTlsFiles { at } => {
                !ok && stderr.contains(&format!("{fixture}: {at}: reading "))
                    && stderr.contains("No such file or directory")
            }
        };
        if !right {
            failures.push(format!(
                "{fixture}: expected {verdict:?}, got success={ok}\n{stdout}{stderr}"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

// ---------------------------------------------------------------------------------------
// Serving: rewrite a copy for this machine, run it, talk to it, stop it.
// ---------------------------------------------------------------------------------------

/// The string literals of a JSON5 text, each with the key it is the value of (`None` for an
/// array element), passed to `f`; where `f` returns a new value, it replaces the old one.
/// Enough for our fixtures: no escapes inside strings, `//` comments skipped.
fn rewrite_strings(text: &str, mut f: impl FnMut(Option<&str>, &str) -> Option<String>) -> String {
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'/' && b.get(i + 1) == Some(&b'/') {
            let end = text[i..].find('\n').map_or(b.len(), |n| i + n);
            out.push_str(&text[i..end]);
            i = end;
            continue;
        }
        if b[i] != b'"' {
            let next = text[i..].chars().next().unwrap();
            out.push(next);
            i += next.len_utf8();
            continue;
        }
        let end = i + 1 + text[i + 1..].find('"').expect("closed string");
        let value = &text[i + 1..end];
        let after = text[end + 1..].trim_start();
        let is_key = after.starts_with(':');
        let before = text[..i].trim_end();
        let key = if !is_key && before.ends_with(':') {
            let k = before[..before.len() - 1].trim_end();
            Some(if let Some(q) = k.strip_suffix('"') {
                &q[q.rfind('"').map_or(0, |p| p + 1)..]
            } else {
                let start = k
                    .rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '-'))
                    .map_or(0, |p| p + 1);
                &k[start..]
            })
        } else {
            None
        };
        match (!is_key).then(|| f(key, value)).flatten() {
            Some(new) => {
                out.push('"');
                out.push_str(&new);
                out.push('"');
            }
            None => out.push_str(&text[i..=end]),
        }
        i = end + 1;
    }
    out
}

/// A fixture rewritten to run here.
struct Rewritten {
    config: PathBuf,
    /// Each original port and the free loopback address that replaces it.
    ports: BTreeMap<u16, std::net::SocketAddr>,
    /// Host variables set to 127.0.0.1; every other `${VAR:-default}` is unset.
    env: Vec<(String, String)>,
    env_remove: Vec<String>,
    /// The CA of the server certificate, when the file has TLS listeners.
    ca: Option<PathBuf>,
}

fn rewrite(fixture: &str, dir: &Path) -> Rewritten {
    let text = std::fs::read_to_string(fixtures_dir().join(fixture)).unwrap();
    rewrite_text(fixture, &text, dir)
}

/// `rewrite` of `text`, written as `dir/name`.
fn rewrite_text(name: &str, text: &str, dir: &Path) -> Rewritten {
    let mut ports = BTreeMap::new();
    let mut port = |p: u16| *ports.entry(p).or_insert_with(common::free_addr);
    let mut host_vars = Vec::new();
    let mut server: Option<(Pki, Pair)> = None;
    let data = dir.join("data");
    let rewritten = rewrite_strings(text, |key, value| match key {
        Some("cert_file" | "key_file") => {
            let (_, pair) = server.get_or_insert_with(|| {
                let pki = Pki::new(&dir.join("tls"), "compat");
                let pair = pki.issue("server", 1, true);
                (pki, pair)
            });
            let file = if key == Some("cert_file") {
                &pair.cert
            } else {
                &pair.key
            };
            Some(file.display().to_string())
        }
        Some("socket_address") => {
            let (_, p) = value.rsplit_once(':').expect("HOST:PORT");
            Some(port(p.parse().expect("port")).to_string())
        }
        Some("address" | "uri") if value.contains("://") => {
            let (scheme, rest) = value.split_once("://").unwrap();
            let (host, p) = rest.rsplit_once(':').expect("HOST:PORT");
            let addr = port(p.trim_end_matches('/').parse().expect("port"));
            let host = match host.strip_prefix("${") {
                Some(var) => {
                    host_vars.push(var.split(":-").next().unwrap().to_string());
                    host.to_string()
                }
                None => "127.0.0.1".to_string(),
            };
            Some(format!("{scheme}://{host}:{}", addr.port()))
        }
        _ if value.starts_with('/') || value.starts_with("~/") => Some(
            data.join(value.trim_start_matches('~').trim_start_matches('/'))
                .display()
                .to_string(),
        ),
        _ => None,
    });
    let mut env_remove: Vec<String> = rewritten
        .split("${")
        .skip(1)
        .filter_map(|s| s.split(":-").next())
        .filter(|v| !host_vars.iter().any(|h| h == v))
        .map(str::to_string)
        .collect();
    env_remove.sort();
    env_remove.dedup();
    host_vars.sort();
    host_vars.dedup();
    let config = dir.join(name);
    std::fs::write(&config, rewritten).unwrap();
    Rewritten {
        config,
        ports,
        env: host_vars
            .into_iter()
            .map(|v| (v, "127.0.0.1".to_string()))
            .collect(),
        env_remove,
        ca: server.map(|(pki, _)| pki.ca),
    }
}

#[test]
fn string_values_are_found_with_their_keys() {
    let text =
        r#"{ "socket_address": "0.0.0.0:1", a: ["/x"], b-c: { content_path: "/y" }, "k": 1 }"#;
    let mut seen = Vec::new();
    let out = rewrite_strings(text, |key, value| {
        seen.push((key.map(str::to_string), value.to_string()));
        (value == "/y").then(|| "/z".to_string())
    });
    assert_eq!(
        seen,
        [
            (Some("socket_address".to_string()), "0.0.0.0:1".to_string()),
            (None, "/x".to_string()),
            (Some("content_path".to_string()), "/y".to_string()),
        ]
    );
    assert_eq!(out, text.replace("\"/y\"", "\"/z\""));
}

#[test]
fn rewriting_maps_ports_hosts_paths_and_tls_files() {
    let dir = tempfile::tempdir().unwrap();
    let r = rewrite("nativelink-config__examples__basic_cas.json5", dir.path());
    let text = std::fs::read_to_string(&r.config).unwrap();
    let worker_api = r.ports[&5061];
    // The worker dials the address its scheduler's listener binds.
    assert!(
        text.contains(&format!("socket_address: \"{worker_api}\"")),
        "{text}"
    );
    assert!(
        text.contains(&format!("uri: \"grpc://{worker_api}\"")),
        "{text}"
    );
    assert!(
        !text.contains("0.0.0.0") && !text.contains("\"/tmp/cairn-compat"),
        "{text}"
    );
    assert!(text.contains(&format!(
        "\"{}/data/tmp/cairn-compat-basic/ac\"",
        dir.path().display()
    )));
    assert_eq!(r.ports.len(), 2);

    let r = rewrite(
        "deployment-examples__docker-compose__worker.json5",
        dir.path(),
    );
    let text = std::fs::read_to_string(&r.config).unwrap();
    assert!(text.contains(&format!(
        "grpc://${{SCHEDULER_ENDPOINT:-localhost}}:{}",
        r.ports[&9101].port()
    )));
    let vars: Vec<&str> = r.env.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(vars, ["CAS_ENDPOINT", "SCHEDULER_ENDPOINT"]);

    let r = rewrite(
        "kubernetes__nativelink__nativelink-config.json5",
        dir.path(),
    );
    let text = std::fs::read_to_string(&r.config).unwrap();
    assert!(r.ca.is_some() && text.contains("server.crt") && text.contains("server.key"));

    let r = rewrite("kubernetes__components__worker__worker.json5", dir.path());
    assert_eq!(
        r.env_remove,
        ["NATIVELINK_WORKER_LRE_RS", "NATIVELINK_WORKER_PLATFORM"]
    );
}

async fn channel(
    addr: std::net::SocketAddr,
    ca: Option<&Path>,
) -> Result<tonic::transport::Channel, String> {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
    let mut endpoint = match ca {
        None => Endpoint::from_shared(format!("http://{addr}")).unwrap(),
        Some(ca) => Endpoint::from_shared(format!("https://{addr}"))
            .unwrap()
            .tls_config(
                ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(std::fs::read(ca).unwrap()))
                    .domain_name("localhost"),
            )
            .map_err(|e| e.to_string())?,
    };
    endpoint = endpoint.connect_timeout(Duration::from_secs(5));
    endpoint
        .connect()
        .await
        .map_err(|e| format!("connecting to {addr}: {e:?}"))
}

/// `GET /status` over HTTP/1.1, through TLS when `ca` is given: (status code, body).
async fn status(addr: std::net::SocketAddr, ca: Option<&Path>) -> Result<(u16, String), String> {
    use rustls_pki_types::pem::PemObject;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Some(ca) = ca else {
        return Ok(common::http_get(addr, "/status").await);
    };
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    // The ring provider, as the server's (the same as `tls.rs`).
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let mut s = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(
            rustls_pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .map_err(|e| format!("TLS handshake with {addr}: {e}"))?;
    s.write_all(b"GET /status HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    // The server may close without a TLS close_notify once it has answered.
    let _ = s.read_to_end(&mut buf).await;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let code = text
        .get(9..12)
        .and_then(|c| c.parse().ok())
        .ok_or(format!("no HTTP status line from {addr}: {text:?}"))?;
    let body = text
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .to_string();
    Ok((code, body))
}

/// Uploads and executes one action on `instance` through `ch`, and checks its result and
/// output bytes.
async fn run_action(
    ch: tonic::transport::Channel,
    instance: &str,
    fixture: &str,
) -> Result<(), String> {
    const SHA: DigestFunction = DigestFunction::Sha256;
    let input = format!("compat {fixture}\n");
    let action = ShellAction {
        script: "cat in.txt in.txt > doubled.txt",
        outputs: &["doubled.txt"],
        inputs: &[("in.txt", input.as_bytes())],
        do_not_cache: false,
    };
    // No platform property: every worker of the fixture satisfies it.
    let (digest, blobs) = action.build_with_platform(&[]);
    upload_blobs(ch.clone(), instance, blobs).await;
    let mut stream = re::execution_client::ExecutionClient::new(ch.clone())
        .execute(re::ExecuteRequest {
            instance_name: instance.to_string(),
            action_digest: Some(digest.to_proto()),
            skip_cache_lookup: true,
            ..Default::default()
        })
        .await
        .map_err(|e| format!("Execute: {e}"))?
        .into_inner();
    let mut last = None;
    while let Some(op) = stream.next().await {
        last = Some(op.map_err(|e| format!("Execute stream: {e}"))?);
    }
    let op = last.ok_or("Execute sent no operation")?;
    let response = match op.result {
        Some(operation::Result::Response(any)) => {
            re::ExecuteResponse::decode(any.value.as_slice()).map_err(|e| e.to_string())?
        }
        other => return Err(format!("operation ended with {other:?}")),
    };
    let code = response.status.as_ref().map_or(0, |s| s.code);
    let result = response
        .result
        .ok_or(format!("no ActionResult (status {:?})", response.status))?;
    let expected = format!("{input}{input}");
    let out = result.output_files.first().ok_or("no output file")?;
    if code != 0 || result.exit_code != 0 || out.path != "doubled.txt" {
        return Err(format!(
            "status {code}, exit code {}, outputs {:?}",
            result.exit_code, result.output_files
        ));
    }
    let want = SHA.compute(expected.as_bytes()).to_proto();
    if out.digest.as_ref() != Some(&want) {
        return Err(format!("output digest {:?}, want {want:?}", out.digest));
    }
    // The bytes are in the CAS that clients read.
    let read = re::content_addressable_storage_client::ContentAddressableStorageClient::new(ch)
        .batch_read_blobs(re::BatchReadBlobsRequest {
            instance_name: instance.to_string(),
            digests: vec![want],
            ..Default::default()
        })
        .await
        .map_err(|e| format!("BatchReadBlobs: {e}"))?
        .into_inner();
    match read.responses.first() {
        Some(r) if r.data == expected.as_bytes() => Ok(()),
        other => Err(format!("reading the output back: {other:?}")),
    }
}

/// Writes blobs (one through ByteStream, larger than a multipart part) and an action result
/// on `instance` through `ch`, then finds and reads each back.
async fn cas_round_trip(
    ch: tonic::transport::Channel,
    instance: &str,
    fixture: &str,
) -> Result<(), String> {
    use cairn_core::proto::google::bytestream::{
        byte_stream_client::ByteStreamClient, ReadRequest, WriteRequest,
    };
    const SHA: DigestFunction = DigestFunction::Sha256;
    let small: Vec<Vec<u8>> = (0..3)
        .map(|i| {
            format!("{fixture} blob {i}")
                .repeat(50 * (i + 1))
                .into_bytes()
        })
        .collect();
    // Its own bytes per fixture: fixtures may share a bucket.
    let seed = fixture
        .bytes()
        .fold(7u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64));
    let big = common::data(6 << 20, seed);
    let mut cas =
        re::content_addressable_storage_client::ContentAddressableStorageClient::new(ch.clone())
            .max_decoding_message_size(64 << 20);
    let digests: Vec<_> = small.iter().chain([&big]).map(|b| SHA.compute(b)).collect();
    let missing =
        |cas: &mut re::content_addressable_storage_client::ContentAddressableStorageClient<_>| {
            let req = re::FindMissingBlobsRequest {
                instance_name: instance.to_string(),
                blob_digests: digests.iter().map(|d| d.to_proto()).collect(),
                ..Default::default()
            };
            let mut cas = std::mem::replace(cas, cas.clone());
            async move {
                cas.find_missing_blobs(req)
                    .await
                    .map(|r| r.into_inner().missing_blob_digests.len())
                    .map_err(|e| format!("FindMissingBlobs: {e}"))
            }
        };
    if missing(&mut cas).await? != digests.len() {
        return Err("blobs never written are reported present".into());
    }
    let r = cas
        .batch_update_blobs(re::BatchUpdateBlobsRequest {
            instance_name: instance.to_string(),
            requests: small
                .iter()
                .map(|b| re::batch_update_blobs_request::Request {
                    digest: Some(SHA.compute(b).to_proto()),
                    data: b.clone(),
                    compressor: 0,
                })
                .collect(),
            ..Default::default()
        })
        .await
        .map_err(|e| format!("BatchUpdateBlobs: {e}"))?
        .into_inner();
    if let Some(bad) = r
        .responses
        .iter()
        .find(|r| r.status.as_ref().is_some_and(|s| s.code != 0))
    {
        return Err(format!("BatchUpdateBlobs: {:?}", bad.status));
    }
    let d = SHA.compute(&big);
    let name = format!(
        "{instance}/uploads/{}/blobs/{}/{}",
        uuid::Uuid::new_v4(),
        d.hash_hex(),
        d.size()
    );
    let chunks: Vec<WriteRequest> = big
        .chunks(1 << 20)
        .enumerate()
        .map(|(i, c)| WriteRequest {
            resource_name: if i == 0 { name.clone() } else { String::new() },
            write_offset: (i << 20) as i64,
            finish_write: (i + 1) << 20 >= big.len(),
            data: c.to_vec(),
        })
        .collect();
    let mut bs = ByteStreamClient::new(ch.clone()).max_decoding_message_size(64 << 20);
    bs.write(futures::stream::iter(chunks))
        .await
        .map_err(|e| format!("ByteStream Write: {e}"))?;
    if missing(&mut cas).await? != 0 {
        return Err("written blobs are reported missing".into());
    }
    let read = cas
        .batch_read_blobs(re::BatchReadBlobsRequest {
            instance_name: instance.to_string(),
            digests: small.iter().map(|b| SHA.compute(b).to_proto()).collect(),
            ..Default::default()
        })
        .await
        .map_err(|e| format!("BatchReadBlobs: {e}"))?
        .into_inner();
    for (r, want) in read.responses.iter().zip(&small) {
        if &r.data != want {
            return Err(format!("BatchReadBlobs: wrong bytes for {:?}", r.digest));
        }
    }
    let mut stream = bs
        .read(ReadRequest {
            resource_name: format!("{instance}/blobs/{}/{}", d.hash_hex(), d.size()),
            read_offset: 0,
            read_limit: 0,
        })
        .await
        .map_err(|e| format!("ByteStream Read: {e}"))?
        .into_inner();
    let mut got = Vec::new();
    while let Some(m) = stream.next().await {
        got.extend_from_slice(&m.map_err(|e| format!("ByteStream Read: {e}"))?.data);
    }
    if got != big {
        return Err(format!(
            "ByteStream Read: {} bytes, not the {} written",
            got.len(),
            big.len()
        ));
    }
    let action = SHA.compute(format!("{fixture} action").as_bytes());
    let result = re::ActionResult {
        exit_code: 7,
        stdout_raw: fixture.as_bytes().to_vec(),
        ..Default::default()
    };
    let mut ac = re::action_cache_client::ActionCacheClient::new(ch);
    ac.update_action_result(re::UpdateActionResultRequest {
        instance_name: instance.to_string(),
        action_digest: Some(action.to_proto()),
        action_result: Some(result.clone()),
        ..Default::default()
    })
    .await
    .map_err(|e| format!("UpdateActionResult: {e}"))?;
    let got = ac
        .get_action_result(re::GetActionResultRequest {
            instance_name: instance.to_string(),
            action_digest: Some(action.to_proto()),
            ..Default::default()
        })
        .await
        .map_err(|e| format!("GetActionResult: {e}"))?
        .into_inner();
    if got.exit_code != 7 || got.stdout_raw != result.stdout_raw {
        return Err(format!("GetActionResult: {got:?}"));
    }
    Ok(())
}

const START_WITHIN: Duration = Duration::from_secs(30);

/// Runs one fixture from start to SIGTERM.
fn serve(case: &Serves) -> Result<(), String> {
    let text = std::fs::read_to_string(fixtures_dir().join(case.fixture)).unwrap();
    serve_text(case, &text)
}

/// `serve` with the fixture's text replaced by `text`.
fn serve_text(case: &Serves, text: &str) -> Result<(), String> {
    serve_with(case, text, &[], |_| {})
}

/// `serve_text` with `extra_env` set for the process and `prepare` called on the rewritten
/// copy's data directory before it starts.
fn serve_with(
    case: &Serves,
    text: &str,
    extra_env: &[(&str, String)],
    prepare: impl FnOnce(&Path),
) -> Result<(), String> {
    let dir = tempfile::tempdir().unwrap();
    let r = rewrite_text(case.fixture, text, dir.path());
    prepare(&dir.path().join("data"));
    let label = case.fixture.trim_end_matches(".json5");
    let mut env = r.env.clone();
    env.extend(extra_env.iter().map(|(k, v)| (k.to_string(), v.clone())));
    let mut run = CairnRun::spawn(label, &r.config, dir.path(), &env, &r.env_remove);
    let n = case.listeners.len();
    run.wait_until(&format!("{n} listeners"), START_WITHIN, |o| {
        o.listening.len() >= n
    })?;
    if case.listeners.is_empty() {
        // A worker-only file: its scheduler is not here, so it keeps retrying, and runs on.
        let retries = "worker session ended; reconnecting";
        run.wait_until("two reconnection attempts", START_WITHIN, |o| {
            o.count(retries) >= 2 * case.workers
        })?;
    } else if case.workers > 0 {
        run.wait_until(
            &format!("{} workers registered", case.workers),
            START_WITHIN,
            |o| o.count(common::CairnWorker::REGISTERED) >= case.workers,
        )?;
    }
    let addrs = run.output.listening.clone();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        for (i, (listener, addr)) in case.listeners.iter().zip(&addrs).enumerate() {
            if !r.ports.values().any(|a| a == addr) {
                return Err(format!(
                    "listener {i} on {addr}, not on a rewritten address"
                ));
            }
            let ca = listener.tls.then_some(r.ca.as_deref()).flatten();
            if listener.tls && ca.is_none() {
                return Err(format!("listener {i} should have TLS files"));
            }
            if !listener.capabilities.is_empty() {
                let ch = channel(*addr, ca).await?;
                for (instance, exec) in listener.capabilities {
                    let caps = re::capabilities_client::CapabilitiesClient::new(ch.clone())
                        .get_capabilities(re::GetCapabilitiesRequest {
                            instance_name: instance.to_string(),
                        })
                        .await
                        .map_err(|e| format!("listener {i}: GetCapabilities({instance:?}): {e}"))?
                        .into_inner();
                    let enabled = caps
                        .execution_capabilities
                        .as_ref()
                        .is_some_and(|e| e.exec_enabled);
                    if caps.cache_capabilities.is_none() || enabled != *exec {
                        return Err(format!(
                            "listener {i}: GetCapabilities({instance:?}): {caps:?}, \
                             want exec_enabled={exec}"
                        ));
                    }
                }
            }
            if listener.health {
                let (code, body) = status(*addr, ca).await?;
                if code != 200 {
                    return Err(format!("listener {i}: GET /status: {code} {body}"));
                }
            }
        }
        match case.action {
            Action::None => {}
            Action::Runs(i, instance) => {
                let ch = channel(addrs[i], None).await?;
                run_action(ch, instance, case.fixture)
                    .await
                    .map_err(|e| format!("action on {instance:?}: {e}"))?;
            }
            Action::CasRoundTrip(i, instance) => {
                let ch = channel(addrs[i], None).await?;
                cas_round_trip(ch, instance, case.fixture)
                    .await
                    .map_err(|e| format!("CAS and AC on {instance:?}: {e}"))?;
            }
        }
        Ok(())
    })?;
    // Our connections close before the stop: the drain waits for none of them.
    drop(rt);
    let status = run.terminate(Duration::from_secs(20))?;
    if !status.success() {
        return Err(format!("exit after SIGTERM: {status}"));
    }
    Ok(())
}

/// How many fixtures run at once: the machine has 2 cores shared with builds.
const CONCURRENT: usize = 4;

#[test]
fn runnable_fixtures_serve_and_stop_cleanly() {
    let started = Instant::now();
    // CAIRN_COMPAT_ONLY=TEXT serves only the fixtures whose names contain TEXT.
    let only = std::env::var("CAIRN_COMPAT_ONLY").unwrap_or_default();
    let cases: Vec<&'static Serves> = SERVES
        .iter()
        .filter(|s| s.fixture.contains(&only))
        .collect();
    let queue = Arc::new(Mutex::new(cases));
    let failures = Arc::new(Mutex::new(Vec::new()));
    std::thread::scope(|s| {
        for _ in 0..CONCURRENT {
            let (queue, failures) = (queue.clone(), failures.clone());
            s.spawn(move || loop {
                let Some(case) = queue.lock().unwrap().pop() else {
                    return;
                };
                let t = Instant::now();
                let outcome = serve(case);
                eprintln!("{}: {:?} in {:?}", case.fixture, outcome, t.elapsed());
                if let Err(e) = outcome {
                    failures
                        .lock()
                        .unwrap()
                        .push(format!("{}: {e}", case.fixture));
                }
            });
        }
    });
    let failures = failures.lock().unwrap();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    eprintln!(
        "{} fixtures served and stopped in {:?}",
        SERVES.len(),
        started.elapsed()
    );
}

/// The legacy example's services (the map forms of `cas`, `ac`, `execution` and
/// `capabilities`, and `bytestream.cas_stores`) serve once the stores and the scheduler that
/// they name exist: its only refusal is the one NativeLink makes too.
#[test]
fn legacy_service_maps_serve_once_their_stores_exist() {
    const FIXTURE: &str = "nativelink-config__examples__legacy_service_config.json5";
    let text = std::fs::read_to_string(fixtures_dir().join(FIXTURE)).unwrap();
    let declared = text.replacen(
        "stores: [],",
        r#"stores: [
    { name: "LEGACY_CAS", memory: {} },
    { name: "LEGACY_AC", memory: {} },
    { name: "LEGACY_WORKER_CAS", memory: {} },
  ],
  schedulers: [{ name: "LEGACY_SCHEDULER", simple: {} }],"#,
        1,
    );
    assert_ne!(declared, text, "the fixture's empty `stores`");
    const LISTENERS: &[Listener] = &[plain(&[("", true)], false)];
    let case = Serves {
        fixture: FIXTURE,
        listeners: LISTENERS,
        workers: 0,
        action: Action::None,
    };
    if let Err(e) = serve_text(&case, &declared) {
        panic!("{e}");
    }
}

// ---------------------------------------------------------------------------------------
// The cloud and Redis fixtures, served with their backends on local emulators: the bucket
// or container the fixture names is created on moto_server (S3, and ONTAP S3 with its
// endpoint rewritten), Azurite or fake-gcs-server, and the Redis address points at a
// redis-server of the test's. `r2_backend` and `oci_backend` derive their endpoints from an
// account id or namespace (no key or variable points them elsewhere), so they are checked,
// not served; `worker_with_redis_scheduler` is refused (see PENDING_STORES).
// ---------------------------------------------------------------------------------------

const fn with_health(capabilities: &'static [(&'static str, bool)]) -> Listener {
    plain(capabilities, true)
}

const EMULATED: &[Serves] = &[
    Serves {
        fixture: "nativelink-config__examples__s3_backend_with_local_fast_cas.json5",
        listeners: &[with_health(&[("s3", true)])],
        workers: 0,
        action: Action::CasRoundTrip(0, "s3"),
    },
    Serves {
        fixture: "nativelink-config__examples__azure_blob_backend.json5",
        listeners: &[with_health(&[("azure", true)])],
        workers: 0,
        action: Action::CasRoundTrip(0, "azure"),
    },
    Serves {
        fixture: "nativelink-config__examples__gcs_backend.json5",
        listeners: &[with_health(&[("gcs", true)])],
        workers: 0,
        action: Action::CasRoundTrip(0, "gcs"),
    },
    Serves {
        fixture: "nativelink-config__examples__ontap_backend.json5",
        listeners: &[with_health(&[("ontap", true)])],
        workers: 0,
        action: Action::CasRoundTrip(0, "ontap"),
    },
    Serves {
        fixture: "nativelink-config__examples__redis.json5",
        listeners: &[plain(&[], false)],
        workers: 0,
        action: Action::CasRoundTrip(0, "kv"),
    },
];

#[test]
fn cloud_and_redis_fixtures_serve_over_emulators() {
    use common::emulators::{Azurite, FakeGcs, Moto};
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (moto, azurite, gcs) = rt.block_on(async {
        let (moto, azurite, gcs) = tokio::join!(Moto::start(), Azurite::start(), FakeGcs::start());
        moto.create_bucket("cairn-compat-bucket").await;
        gcs.create_bucket("cairn-compat-bucket").await;
        (moto, azurite, gcs)
    });
    azurite.create_container("cairn-compat-container");
    let redis_dir = tempfile::tempdir().unwrap();
    let redis = redis_kit::RedisServer::start(redis_dir.path());
    let ca_dir = tempfile::tempdir().unwrap();
    let ca = Pki::new(ca_dir.path(), "ontap").ca;
    let mut failures = Vec::new();
    for case in EMULATED {
        let mut text = std::fs::read_to_string(fixtures_dir().join(case.fixture)).unwrap();
        let original = text.clone();
        let mut env: Vec<(&str, String)> = Vec::new();
        let mut root_ca = false;
        match case.fixture {
            f if f.contains("s3_backend") => {
                // moto speaks plain HTTP: allowed by the key NativeLink has for it.
                text = text.replace(
                    r#"provider: "aws","#,
                    r#"provider: "aws", insecure_allow_http: true,"#,
                );
                env = moto.aws_env(&moto.endpoint());
            }
            f if f.contains("azure") => {
                text = text.replace(
                    r#"account_name: "cairncompat","#,
                    &format!(
                        r#"account_name: "devstoreaccount1", endpoint: "{}", insecure_allow_http: true,"#,
                        azurite.endpoint()
                    ),
                );
                env = azurite.azure_env();
            }
            f if f.contains("gcs") => env.push(("STORAGE_EMULATOR_HOST", gcs.host())),
            f if f.contains("ontap") => {
                // ONTAP S3 is S3: the endpoint becomes moto's, over plain HTTP; the
                // `root_certificates` file (rewritten under the data directory) is made.
                text = text.replace(
                    r#"endpoint: "https://ontap.cairn-compat.test:8443","#,
                    &format!(
                        r#"endpoint: "{}", insecure_allow_http: true,"#,
                        moto.endpoint()
                    ),
                );
                // The content tier's existence cache (the second) under its own prefix, as
                // the warning about the fixture as written asks (blobs of one chunk are lost
                // otherwise).
                let (at, _) = text
                    .match_indices(r#"key_prefix: "objects/""#)
                    .nth(1)
                    .unwrap();
                text.replace_range(at..at + 22, r#"key_prefix: "chunks/""#);
                env = moto.aws_env(&moto.endpoint());
                root_ca = true;
            }
            f if f.contains("redis") => {
                text = text.replace("redis://127.0.0.1:6390/", &redis.url());
            }
            f => panic!("no emulator for {f}"),
        }
        assert!(
            case.fixture.contains("gcs") || text != original,
            "{}: the text to rewrite was not found (the fixture changed?)",
            case.fixture
        );
        let result = serve_with(case, &text, &env, |data| {
            if root_ca {
                let at = data.join("etc/cairn-compat/ontap-ca.pem");
                std::fs::create_dir_all(at.parent().unwrap()).unwrap();
                std::fs::copy(&ca, at).unwrap();
            }
        });
        if let Err(e) = result {
            failures.push(format!("{}: {e}", case.fixture));
        }
    }
    drop(rt);
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
