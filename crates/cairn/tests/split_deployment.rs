//! The split deployment of `deployment-examples/split/`: a CAS/AC server, a scheduler and a
//! worker as three processes, each from its shipped config with ports and directories set
//! through the environment; Bazel builds through them with `--remote_cache` on the CAS
//! server and `--remote_executor` on the scheduler.
//!
//! The Bazel test needs `bazel` on PATH (Debian's `bazel-bootstrap`) and works offline;
//! without Bazel it fails, unless `CAIRN_SKIP_BAZEL=1` is set.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::bazel::{self, Bazel};
use common::certs::{split_tls_dir, Pair, Pki};
use common::{free_addr, Cairn, CairnWorker};

/// Every variable the split configs read; unset for `check-config`, so that the shipped
/// defaults are what is checked (but `CAIRN_TLS_DIR`, which must hold real certificates).
const CONFIG_VARIABLES: [&str; 11] = [
    "CAIRN_CAS_LISTEN",
    "CAIRN_DATA",
    "CAIRN_MEMORY_BYTES",
    "CAIRN_DISK_BYTES",
    "CAIRN_SCHEDULER_LISTEN",
    "CAIRN_WORKER_API_LISTEN",
    "CAIRN_CAS_ENDPOINT",
    "CAIRN_WORKER_API_ENDPOINT",
    "CAIRN_WORKER_DATA",
    "CAIRN_WORKER_CAS_BYTES",
    "CAIRN_WORKER_SLOTS",
];

fn split_config(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../deployment-examples/split")
        .join(name)
}

#[test]
fn check_config_accepts_each_split_config() {
    let tmp = tempfile::tempdir().unwrap();
    let tls = split_tls_dir(tmp.path());
    for name in ["cas.json5", "scheduler.json5", "worker.json5"] {
        let path = split_config(name);
        let mut command = Command::new(env!("CARGO_BIN_EXE_cairn"));
        command.arg("check-config").arg(&path);
        command.env("CAIRN_TLS_DIR", &tls);
        for var in CONFIG_VARIABLES {
            command.env_remove(var);
        }
        let out = command.output().expect("run cairn check-config");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.trim_end().ends_with(": ok"),
            "cairn check-config {name}: {}\n--- stdout\n{stdout}\n--- stderr\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn bazel_builds_through_the_split_deployment() {
    let Some(program) = bazel::find_or_skip("split_deployment") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = |name: &str| {
        let d = tmp.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        d
    };

    let cas_dir = dir("cas");
    let cas = Cairn::start_config_env(
        &cas_dir,
        &split_config("cas.json5"),
        &[
            ("CAIRN_CAS_LISTEN", "127.0.0.1:0".to_string()),
            ("CAIRN_DATA", cas_dir.display().to_string()),
        ],
    );
    // The worker dials the worker API, so its port is chosen here.
    let worker_api = free_addr();
    let tls = split_tls_dir(tmp.path());
    let scheduler = Cairn::start_config_env(
        &dir("scheduler"),
        &split_config("scheduler.json5"),
        &[
            ("CAIRN_SCHEDULER_LISTEN", "127.0.0.1:0".to_string()),
            ("CAIRN_WORKER_API_LISTEN", worker_api.to_string()),
            ("CAIRN_CAS_ENDPOINT", format!("grpc://{}", cas.addr)),
            ("CAIRN_TLS_DIR", tls.display().to_string()),
        ],
    );
    let worker = CairnWorker::start(
        "worker",
        &split_config("worker.json5"),
        &[
            ("CAIRN_WORKER_API_ENDPOINT", format!("grpcs://{worker_api}")),
            ("CAIRN_TLS_DIR", tls.display().to_string()),
            ("CAIRN_CAS_ENDPOINT", format!("grpc://{}", cas.addr)),
            ("CAIRN_WORKER_DATA", dir("worker").display().to_string()),
            ("CAIRN_WORKER_SLOTS", "4".to_string()),
        ],
        Duration::from_secs(30),
    );

    let bazel = Bazel::new(program, &dir("bazel"), "bazel-exec-workspace");
    let mut args = bazel.remote_flags(scheduler.addr, Some(cas.addr), "OSFamily=linux");
    args.push("//...".to_string());

    // C++ compile and link, genrules, an output directory: all run by the worker.
    let first = bazel.run("build", &args);
    let executed = first.all_processes_were("remote");
    let report = bazel.bin("report.txt");
    let report = std::fs::read_to_string(&report)
        .unwrap_or_else(|e| panic!("read {}: {e}", report.display()));
    assert!(
        report.starts_with("hello from a remote worker\nACTIONS THAT RUN ELSEWHERE\n27\n"),
        "bazel-bin/report.txt: {report:?}"
    );

    // The worker wrote each result to the AC on the CAS server, where Bazel finds them.
    bazel.run("clean", &[]);
    let again = bazel.run("build", &args);
    assert_eq!(
        again.all_processes_were("remote cache hit"),
        executed,
        "after `bazel clean`, every action should come from the CAS server's AC"
    );

    // Only workers with a certificate from the CA get through the worker API's TLS: without
    // one, or with one from another CA, the connection is refused before any gRPC call (a
    // call that gets through is UNIMPLEMENTED, Capabilities not being served there).
    let stranger = Pki::new(&tmp.path().join("stranger"), "stranger").issue("intruder", 3, false);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let worker_pair = Pair {
        cert: tls.join("worker.crt"),
        key: tls.join("worker.key"),
    };
    for (who, identity, admitted) in [
        ("the worker's certificate", Some(&worker_pair), true),
        ("no certificate", None, false),
        ("another CA's certificate", Some(&stranger), false),
    ] {
        let code = runtime.block_on(worker_api_probe(worker_api, &tls.join("ca.crt"), identity));
        assert_eq!(
            code == Some(tonic::Code::Unimplemented),
            admitted,
            "worker API with {who}: {code:?}"
        );
    }

    drop(bazel); // `bazel shutdown`
    drop(worker);
    drop(scheduler);
    drop(cas);
}

/// Calls Capabilities on the worker API over TLS: the status code, or `None` when the
/// connection itself was refused.
async fn worker_api_probe(
    addr: std::net::SocketAddr,
    ca: &Path,
    identity: Option<&Pair>,
) -> Option<tonic::Code> {
    use cairn_core::proto::build::bazel::remote::execution::v2 as re;
    let mut tls = tonic::transport::ClientTlsConfig::new().ca_certificate(
        tonic::transport::Certificate::from_pem(std::fs::read(ca).unwrap()),
    );
    if let Some(p) = identity {
        tls = tls.identity(tonic::transport::Identity::from_pem(
            std::fs::read(&p.cert).unwrap(),
            std::fs::read(&p.key).unwrap(),
        ));
    }
    let channel = tonic::transport::Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .ok()?;
    let r = re::capabilities_client::CapabilitiesClient::new(channel)
        .get_capabilities(re::GetCapabilitiesRequest::default())
        .await;
    match r {
        Ok(_) => Some(tonic::Code::Ok),
        // A refused handshake surfaces as a transport error, UNAVAILABLE or UNKNOWN.
        Err(e) if matches!(e.code(), tonic::Code::Unavailable | tonic::Code::Unknown) => None,
        Err(e) => Some(e.code()),
    }
}
