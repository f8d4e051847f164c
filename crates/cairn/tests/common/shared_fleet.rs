//! Test kit for scheduler replicas sharing their state in Redis
//! (`simple.experimental_backend: {redis: ...}`): a [`Fleet`] of real `cairn run` replicas
//! (CAS and AC in one Redis, so that every replica serves every blob; the scheduler state in
//! another, which tests stop, restart and cut off), worker processes
//! (`deployment-examples/split/worker.json5`) each connected to one replica, optionally a
//! network namespace for partition tests, and the gRPC client helpers the tests share.
//!
//! Included with `#[path = "common/shared_fleet.rs"] mod shared_fleet;` beside `mod common;`
//! and `#[path = "common/redis.rs"] mod redis_kit;` (it uses both).
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cairn_core::proto::build::bazel::remote::execution::v2 as re;
use cairn_core::proto::google::longrunning::operations_client::OperationsClient;
use cairn_core::proto::google::longrunning::{self as lro, Operation};
use prost::Message;
use tonic::transport::Channel;

use crate::common::actions::ShellAction;
use crate::common::{free_addr, Cairn, CairnWorker};
use crate::redis_kit::RedisServer;

/// How long anything here may take.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// One replica's config: CAS and AC in one Redis (`@REDIS@`), the scheduler state in another
/// (`@STATE@`, which tests stop and cut off); the public listener on `@ADDR@`, the worker API
/// (TLS, client certificates) on `@WORKER_API@`.
pub const REPLICA: &str = r#"{
  stores: [
    { name: "STATE", redis_store: { addresses: ["@STATE@"], command_timeout_ms: 1000,
        connection_timeout_ms: 500, retry: { max_retries: 2, delay: 0.05 } } },
    { name: "CAS", redis_store: { addresses: ["@REDIS@"], key_prefix: "cas:",
        command_timeout_ms: 2000, connection_timeout_ms: 1000, retry: { max_retries: 2, delay: 0.05 } } },
    { name: "AC", redis_store: { addresses: ["@REDIS@"], key_prefix: "ac:",
        command_timeout_ms: 2000, connection_timeout_ms: 1000, retry: { max_retries: 2, delay: 0.05 } } },
  ],
  schedulers: [{ name: "MAIN", @SCHEDULER_OPEN@
    supported_platform_properties: { OSFamily: "exact", cpu_count: "minimum" },
    worker_timeout_s: 2,
    max_job_retries: 2,
    @SCHEDULER_EXTRA@
    experimental_backend: { redis: { redis_store: "STATE" } },
  @SCHEDULER_CLOSE@ }],
  servers: [
    { listener: { http: { socket_address: "@ADDR@" } },
      services: {
        cas: [{ instance_name: "main", cas_store: "CAS" }],
        ac: [{ instance_name: "main", ac_store: "AC" }],
        bytestream: [{ instance_name: "main", cas_store: "CAS" }],
        execution: [{ instance_name: "main", cas_store: "CAS", scheduler: "MAIN" }],
        capabilities: [{ instance_name: "main", remote_execution: { scheduler: "MAIN" } }],
        health: {},
        web_ui: { schedulers: ["MAIN"] },
      } },
    { listener: { http: { socket_address: "@WORKER_API@", tls: @WORKER_API_TLS@ } },
      services: { worker_api: { scheduler: "MAIN" } } },
  ],
}"#;

pub struct Replica {
    pub cairn: Cairn,
    pub worker_api: SocketAddr,
    pub label: String,
    /// Runs in the fleet's network namespace (its addresses are that namespace's loopback).
    pub in_netns: bool,
}

pub struct Fleet {
    pub tmp: tempfile::TempDir,
    /// Blobs: CAS and AC.
    pub redis: RedisServer,
    /// The scheduler state (append-only file on, so a restart keeps it).
    pub state: RedisServer,
    pub tls: PathBuf,
    pub replicas: Vec<Option<Replica>>,
    /// Extra `simple` scheduler keys.
    pub extra: String,
    /// A namespace for replicas cut off by partition tests (both Redis servers also listen
    /// on its link's host address).
    pub netns: Option<crate::common::netns::NetNs>,
    /// The scheduler is wrapped in `cache_lookup` over the AC (as Bazel builds want it).
    pub cache_lookup: bool,
    /// Action slots of each worker [`Fleet::worker`] starts (1 unless set).
    pub worker_slots: usize,
}

impl Fleet {
    pub fn start(replicas: usize) -> Fleet {
        Fleet::start_with(replicas, "")
    }

    pub fn start_with(replicas: usize, extra: &str) -> Fleet {
        let mut fleet = Fleet::empty(extra);
        fleet.add_replicas(replicas);
        fleet
    }

    pub fn empty(extra: &str) -> Fleet {
        Fleet::empty_in(extra, None)
    }

    /// A fleet without replicas whose Redis servers also listen on `netns`'s host address.
    pub fn empty_in(extra: &str, netns: Option<crate::common::netns::NetNs>) -> Fleet {
        let tmp = tempfile::tempdir().unwrap();
        let mut bind = vec!["--bind".to_string(), "127.0.0.1".to_string()];
        bind.extend(netns.as_ref().map(|n| n.host_ip.to_string()));
        let bind: Vec<&str> = bind.iter().map(String::as_str).collect();
        let redis = RedisServer::start_args(tmp.path(), crate::redis_kit::free_port(), &bind);
        let mut state_args = vec!["--appendonly", "yes", "--appendfsync", "always"];
        state_args.extend(&bind);
        let state = RedisServer::start_args(tmp.path(), crate::redis_kit::free_port(), &state_args);
        let tls = crate::common::certs::split_tls_dir(tmp.path());
        Fleet {
            tmp,
            redis,
            state,
            tls,
            replicas: Vec::new(),
            extra: extra.to_string(),
            netns,
            cache_lookup: false,
            worker_slots: 1,
        }
    }

    pub fn replica(&self, i: usize) -> Replica {
        self.replica_via(i, &self.state.url())
    }

    /// Replica `i`, reaching the scheduler state at `state` (a proxy, say).
    pub fn replica_via(&self, i: usize, state: &str) -> Replica {
        self.replica_at(i, state, None, free_addr())
    }

    /// Replica `i` on the given addresses (a restart takes its predecessor's).
    pub fn replica_at(
        &self,
        i: usize,
        state: &str,
        addr: Option<SocketAddr>,
        worker_api: SocketAddr,
    ) -> Replica {
        let label = format!("replica-{i}");
        let dir = self.tmp.path().join(&label);
        std::fs::create_dir_all(&dir).unwrap();
        let cairn = Cairn::start_with(
            &dir,
            &self.replica_config(&self.redis.url(), state, worker_api),
            Some(addr.unwrap_or_else(free_addr)),
        );
        Replica {
            cairn,
            worker_api,
            label,
            in_netns: false,
        }
    }

    pub fn replica_config(&self, redis: &str, state: &str, worker_api: SocketAddr) -> String {
        REPLICA
            .replace("@REDIS@", redis)
            .replace("@STATE@", state)
            .replace("@SCHEDULER_EXTRA@", &self.extra)
            .replace(
                "@SCHEDULER_OPEN@",
                if self.cache_lookup {
                    r#"cache_lookup: { ac_store: "AC", scheduler: { simple: {"#
                } else {
                    "simple: {"
                },
            )
            .replace(
                "@SCHEDULER_CLOSE@",
                if self.cache_lookup { "} } }" } else { "}" },
            )
            .replace("@WORKER_API@", &worker_api.to_string())
            .replace(
                "@WORKER_API_TLS@",
                &crate::common::certs::worker_api_tls(&self.tls),
            )
    }

    /// Replica `i` inside the fleet's network namespace: it reaches both Redis servers over
    /// the veth pair, and listens on the namespace's own loopback (its workers run there
    /// too, see [`Fleet::worker`]).
    pub fn replica_in_netns(&self, i: usize) -> Replica {
        let ns = self.netns.as_ref().expect("a fleet with a namespace");
        let label = format!("replica-{i}");
        let dir = self.tmp.path().join(&label);
        std::fs::create_dir_all(&dir).unwrap();
        // A fresh namespace: any port is free on its loopback.
        let (addr, worker_api) = (free_addr(), free_addr());
        let at = |port: u16| format!("redis://{}:{port}", ns.host_ip);
        let config = dir.join("cairn.json5");
        std::fs::write(
            &config,
            self.replica_config(&at(self.redis.port), &at(self.state.port), worker_api)
                .replace("@ADDR@", &addr.to_string()),
        )
        .unwrap();
        let mut command = ns.command(env!("CARGO_BIN_EXE_cairn"));
        command.arg("run").arg(&config);
        let cairn = Cairn::spawn_until_listening(command, &dir, config.clone());
        Replica {
            cairn,
            worker_api,
            label,
            in_netns: true,
        }
    }

    pub fn r(&self, i: usize) -> &Replica {
        self.replicas[i].as_ref().expect("replica running")
    }

    /// The data directory of worker `name` (its work directory is `work/` in it).
    pub fn worker_dir(&self, name: &str) -> PathBuf {
        self.tmp.path().join(format!("worker-{name}"))
    }

    /// Starts `n` replicas (numbered from the ones already there).
    pub fn add_replicas(&mut self, n: usize) {
        for _ in 0..n {
            let r = self.replica(self.replicas.len());
            self.replicas.push(Some(r));
        }
    }

    /// A worker process ([`Fleet::worker_slots`] slots) connected to replica `i`; its
    /// directory names it.
    pub fn worker(&self, name: &str, i: usize) -> CairnWorker {
        let r = self.r(i);
        let data = self.worker_dir(name);
        std::fs::create_dir_all(&data).unwrap();
        let config: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../deployment-examples/split/worker.json5");
        // A worker of a replica in the namespace runs there too, beside it.
        let command = match (&self.netns, r.in_netns) {
            (Some(ns), true) => ns.command(env!("CARGO_BIN_EXE_cairn")),
            _ => std::process::Command::new(env!("CARGO_BIN_EXE_cairn")),
        };
        CairnWorker::start_in(
            name,
            command,
            &config,
            &[
                (
                    "CAIRN_WORKER_API_ENDPOINT",
                    format!("grpcs://{}", r.worker_api),
                ),
                ("CAIRN_TLS_DIR", self.tls.display().to_string()),
                ("CAIRN_CAS_ENDPOINT", format!("grpc://{}", r.cairn.addr)),
                ("CAIRN_WORKER_DATA", data.display().to_string()),
                ("CAIRN_WORKER_SLOTS", self.worker_slots.to_string()),
            ],
            DEADLINE,
        )
    }

    pub async fn channel(&self, i: usize) -> Channel {
        self.r(i).cairn.channel().await
    }

    /// SIGKILL replica `i`.
    pub fn kill9(&mut self, i: usize) {
        let r = self.replicas[i].take().expect("replica running");
        eprintln!("killing {} with SIGKILL", r.label);
        r.cairn.kill9();
    }
}

/// A shell action uploaded through replica `via`; returns its digest.
pub async fn upload(channel: Channel, script: &str, do_not_cache: bool) -> re::Digest {
    ShellAction {
        script,
        do_not_cache,
        ..Default::default()
    }
    .upload(channel, "main")
    .await
    .to_proto()
}

pub async fn execute(channel: Channel, digest: &re::Digest) -> tonic::Streaming<Operation> {
    re::execution_client::ExecutionClient::new(channel)
        .execute(re::ExecuteRequest {
            instance_name: "main".into(),
            action_digest: Some(digest.clone()),
            skip_cache_lookup: true,
            ..Default::default()
        })
        .await
        .expect("Execute")
        .into_inner()
}

pub async fn wait_execution(
    channel: Channel,
    name: &str,
) -> Result<tonic::Streaming<Operation>, tonic::Status> {
    re::execution_client::ExecutionClient::new(channel)
        .wait_execution(re::WaitExecutionRequest { name: name.into() })
        .await
        .map(|r| r.into_inner())
}

pub fn stage(op: &Operation) -> re::execution_stage::Value {
    let m = re::ExecuteOperationMetadata::decode(op.metadata.as_ref().unwrap().value.as_slice())
        .unwrap();
    re::execution_stage::Value::try_from(m.stage).unwrap()
}

pub fn response(op: &Operation) -> re::ExecuteResponse {
    match op.result.as_ref().expect("a done operation has a result") {
        lro::operation::Result::Response(any) => {
            re::ExecuteResponse::decode(any.value.as_slice()).unwrap()
        }
        lro::operation::Result::Error(e) => panic!("operation error {e:?}"),
    }
}

/// Reads the stream to its done operation (within [`DEADLINE`]); the first operation's name
/// is returned with it.
pub async fn until_done(mut ops: tonic::Streaming<Operation>) -> Result<Operation, tonic::Status> {
    tokio::time::timeout(DEADLINE, async move {
        loop {
            match ops.message().await? {
                Some(op) if op.done => return Ok(op),
                Some(_) => continue,
                None => return Err(tonic::Status::aborted("stream ended before done")),
            }
        }
    })
    .await
    .expect("the operation ends within the deadline")
}

/// The first operation of a stream (its name).
pub async fn first(ops: &mut tonic::Streaming<Operation>) -> Operation {
    tokio::time::timeout(DEADLINE, ops.message())
        .await
        .expect("first operation in time")
        .expect("stream")
        .expect("an operation")
}

/// The stdout of a completed action, read from the CAS through `channel`.
pub async fn stdout(channel: Channel, r: &re::ExecuteResponse) -> String {
    let status = r.status.clone().unwrap_or_default();
    assert_eq!(status.code, 0, "execution status {status:?}");
    let result = r.result.as_ref().expect("an ActionResult");
    let Some(d) = result.stdout_digest.clone() else {
        return String::from_utf8_lossy(&result.stdout_raw).into_owned();
    };
    let reply =
        re::content_addressable_storage_client::ContentAddressableStorageClient::new(channel)
            .batch_read_blobs(re::BatchReadBlobsRequest {
                instance_name: "main".into(),
                digests: vec![d],
                ..Default::default()
            })
            .await
            .expect("BatchReadBlobs")
            .into_inner();
    String::from_utf8_lossy(&reply.responses[0].data).into_owned()
}

pub async fn get_operation(channel: Channel, name: &str) -> Result<Operation, tonic::Status> {
    OperationsClient::new(channel)
        .get_operation(lro::GetOperationRequest { name: name.into() })
        .await
        .map(|r| r.into_inner())
}

pub async fn wait_for(what: &str, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(
            start.elapsed() < DEADLINE,
            "{what}: not within {DEADLINE:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Script for a killing test: the first attempt writes its directory to `flag` and sleeps;
/// any later attempt prints "second" and the directory it ran in.
pub fn first_sleeps(flag: &Path) -> String {
    format!(
        "if [ -e {0} ]; then echo second in $(pwd); else echo $$ $(pwd) > {0}.tmp && mv {0}.tmp {0}; exec sleep 600; fi",
        flag.display()
    )
}

/// The pid in a first attempt's flag file (`PID DIR`).
pub fn flag_pid(flag: &str) -> u32 {
    flag.split_whitespace().next().unwrap().parse().unwrap()
}

/// Whether `pid` is a live process (not a zombie).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}
