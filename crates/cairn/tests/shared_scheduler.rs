//! Scheduler replicas sharing their state in Redis (`simple.experimental_backend: {redis:
//! {redis_store: ...}}`), as real processes: two Debian `redis-server`s (blobs; scheduler
//! state), two or three `cairn run` replicas and worker processes each connected to one
//! replica, set up by the kit's `Fleet` (`common/shared_fleet.rs`).
//!
//! Each action prints the working directory of the worker that ran it, so a test knows
//! which worker (and so which replica) ran what.

mod common;
#[path = "common/redis.rs"]
mod redis_kit;
#[path = "common/shared_fleet.rs"]
mod shared_fleet;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use cairn_core::proto::build::bazel::remote::execution::v2 as re;
use cairn_core::proto::google::longrunning as lro;
use cairn_core::proto::google::longrunning::operations_client::OperationsClient;
use common::actions::ShellAction;
use common::CairnWorker;
use prost::Message;
use shared_fleet::*;
use tonic::transport::Channel;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_replica_queues_and_answers_and_a_worker_of_another_runs_it() {
    let fleet = Fleet::start(2);
    // The only worker is connected to replica 1; the client talks to replica 0.
    let _w = fleet.worker("w1", 1);
    let a = fleet.channel(0).await;
    let b = fleet.channel(1).await;

    let digest = upload(a.clone(), "echo ran-in $(pwd)", false).await;
    let mut ops = execute(a.clone(), &digest).await;
    let op = first(&mut ops).await;
    let name = op.name.clone();
    assert!(!op.done);
    let done = until_done(ops).await.unwrap();
    assert_eq!(done.name, name);
    let out = stdout(a.clone(), &response(&done)).await;
    assert!(
        out.contains("worker-w1"),
        "ran by the worker of replica 1: {out}"
    );

    // Either replica answers for it.
    for ch in [a.clone(), b.clone()] {
        let got = get_operation(ch.clone(), &name).await.unwrap();
        assert!(got.done, "GetOperation says done");
        assert_eq!(stage(&got), re::execution_stage::Value::Completed);
        let waited = until_done(wait_execution(ch, &name).await.unwrap())
            .await
            .unwrap();
        assert_eq!(response(&waited), response(&done));
    }
    let listed = OperationsClient::new(b.clone())
        .list_operations(lro::ListOperationsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(listed.operations.iter().any(|o| o.name == name));

    // Unknown names: NOT_FOUND from both, and the server stays up.
    for ch in [a.clone(), b.clone()] {
        let e = get_operation(ch.clone(), "operations/nope")
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::NotFound, "{e}");
        let e = wait_execution(ch, "operations/garbage\u{0}\u{ff}")
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::NotFound, "{e}");
    }

    // Identical cacheable actions merge across replicas: one execution, one operation.
    let counter = fleet.tmp.path().join("runs");
    let script = format!("echo x >> {}; sleep 1; echo merged", counter.display());
    let digest = upload(a.clone(), &script, false).await;
    let mut on_a = execute(a.clone(), &digest).await;
    let first_a = first(&mut on_a).await;
    let mut on_b = execute(b.clone(), &digest).await;
    let first_b = first(&mut on_b).await;
    assert_eq!(
        first_a.name, first_b.name,
        "the second Execute follows the first's operation"
    );
    let (ra, rb) = tokio::join!(until_done(on_a), until_done(on_b));
    assert_eq!(response(&ra.unwrap()), response(&rb.unwrap()));
    let runs = std::fs::read_to_string(&counter).unwrap();
    assert_eq!(runs.lines().count(), 1, "one execution for both");

    // do_not_cache actions are never merged.
    let digest = upload(a.clone(), "echo uncached", true).await;
    let mut x = execute(a.clone(), &digest).await;
    let mut y = execute(b.clone(), &digest).await;
    let (fx, fy) = (first(&mut x).await, first(&mut y).await);
    assert_ne!(fx.name, fy.name);
    until_done(x).await.unwrap();
    until_done(y).await.unwrap();

    // ListOperations pages run across replicas, in name order.
    let page = |ch: Channel, token: String| async move {
        OperationsClient::new(ch)
            .list_operations(lro::ListOperationsRequest {
                page_size: 2,
                page_token: token,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
    };
    let p1 = page(a.clone(), String::new()).await;
    assert_eq!(p1.operations.len(), 2);
    assert!(!p1.next_page_token.is_empty());
    let p2 = page(b.clone(), p1.next_page_token.clone()).await;
    assert!(!p2.operations.is_empty());
    assert!(p2.operations.iter().all(|o| o.name > p1.next_page_token));

    // CancelOperation on a queued operation from the other replica ends it CANCELLED.
    let digest = upload(a.clone(), "sleep 30", true).await;
    let mut blocker = execute(a.clone(), &digest).await; // takes the only slot
    first(&mut blocker).await;
    let digest2 = upload(a.clone(), "echo never", true).await;
    let mut queued = execute(a.clone(), &digest2).await;
    let q = first(&mut queued).await;
    OperationsClient::new(b.clone())
        .cancel_operation(lro::CancelOperationRequest {
            name: q.name.clone(),
        })
        .await
        .unwrap();
    let done = until_done(queued).await.unwrap();
    let st = response(&done).status.unwrap_or_default();
    assert_eq!(st.code, tonic::Code::Cancelled as i32, "{st:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_s_action_is_retried_on_another_replica_s_worker() {
    let fleet = Fleet::start(2);
    let mut workers = [Some(fleet.worker("w0", 0)), Some(fleet.worker("w1", 1))];
    let a = fleet.channel(0).await;
    let flag = fleet.tmp.path().join("attempt-1");
    let digest = upload(a.clone(), &first_sleeps(&flag), false).await;
    let mut ops = execute(a.clone(), &digest).await;
    first(&mut ops).await;
    let mut ran = String::new();
    wait_for("the first attempt starts", || {
        ran = std::fs::read_to_string(&flag).unwrap_or_default();
        !ran.is_empty()
    })
    .await;
    let (killed, other) = if ran.contains("worker-w0") {
        (0, "w1")
    } else {
        (1, "w0")
    };
    workers[killed].take().unwrap().kill9();
    let done = until_done(ops).await.unwrap();
    let out = stdout(a.clone(), &response(&done)).await;
    assert!(
        out.contains("second") && out.contains(&format!("worker-{other}")),
        "retried on the other worker: {out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replica_s_operation_is_requeued_by_its_lease_and_completes_through_the_survivor()
{
    let mut fleet = Fleet::start(2);
    let _w0 = fleet.worker("w0", 0);
    let _w1 = fleet.worker("w1", 1);
    let a = fleet.channel(0).await;
    let flag = fleet.tmp.path().join("attempt-1");
    let digest = upload(a.clone(), &first_sleeps(&flag), false).await;
    let mut ops = execute(a.clone(), &digest).await;
    let name = first(&mut ops).await.name;
    let mut ran = String::new();
    wait_for("the first attempt starts", || {
        ran = std::fs::read_to_string(&flag).unwrap_or_default();
        !ran.is_empty()
    })
    .await;
    // Kill the replica whose worker runs it: its lease stops being renewed.
    let (owner, survivor) = if ran.contains("worker-w0") {
        (0, 1)
    } else {
        (1, 0)
    };
    drop(ops);
    fleet.kill9(owner);
    let started = Instant::now();
    // The client follows it on the survivor, from wherever it was.
    let s = fleet.channel(survivor).await;
    let done = until_done(wait_execution(s.clone(), &name).await.unwrap())
        .await
        .unwrap();
    let out = stdout(s.clone(), &response(&done)).await;
    assert!(
        out.contains("second") && out.contains(&format!("worker-w{survivor}")),
        "re-run by the survivor's worker: {out}"
    );
    let took = started.elapsed();
    eprintln!("re-queued by lease expiry and completed {took:?} after the kill");
    assert!(took < Duration::from_secs(20), "took {took:?}");
}

#[test]
fn the_backend_must_name_a_redis_store() {
    let dir = tempfile::tempdir().unwrap();
    let check = |stores: &str| {
        let config = dir.path().join("c.json5");
        std::fs::write(
            &config,
            format!(
                r#"{{ stores: {{ {stores} }},
                  schedulers: {{ S: {{ cache_lookup: {{ ac_store: "M", scheduler: {{ simple: {{
                    experimental_backend: {{ redis: {{ redis_store: "STATE" }} }} }} }} }} }} }},
                  servers: [] }}"#
            ),
        )
        .unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_cairn"))
            .arg("check-config")
            .arg(&config)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let at = "schedulers.S.cache_lookup.scheduler.simple.experimental_backend.redis.redis_store";
    let (ok, text) = check(r#"M: { memory: {} }"#);
    assert!(
        !ok && text.contains(at) && text.contains("no store named \"STATE\""),
        "{text}"
    );
    let (ok, text) = check(r#"M: { memory: {} }, STATE: { memory: {} }"#);
    assert!(
        !ok && text.contains(at) && text.contains("needs a redis_store"),
        "{text}"
    );
    let (ok, text) = check(
        r#"M: { memory: {} }, STATE: { redis_store: { addresses: ["redis://127.0.0.1:1"] } }"#,
    );
    assert!(ok, "{text}");
    assert!(text.contains("backend=redis(STATE)"), "{text}");
}

/// Execute on a replica whose scheduler state is unreachable: UNAVAILABLE naming the
/// scheduler and its store, within a bound.
async fn expect_unavailable(channel: Channel, digest: &re::Digest, name: &str) {
    let started = Instant::now();
    let e = match re::execution_client::ExecutionClient::new(channel.clone())
        .execute(re::ExecuteRequest {
            instance_name: "main".into(),
            action_digest: Some(digest.clone()),
            skip_cache_lookup: true,
            ..Default::default()
        })
        .await
    {
        Err(e) => e,
        Ok(ops) => until_done(ops.into_inner()).await.unwrap_err(),
    };
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e}");
    assert!(
        e.message().contains("scheduler \"MAIN\"") && e.message().contains("stores.STATE"),
        "{e}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "answered in {:?}",
        started.elapsed()
    );
    let e = wait_execution(channel.clone(), name)
        .await
        .map(|_| ())
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e}");
    let e = get_operation(channel, name).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_stopped_for_30_s_answers_unavailable_then_recovers_without_a_restart() {
    let mut fleet = Fleet::start(2);
    let _w0 = fleet.worker("w0", 0);
    let a = fleet.channel(0).await;
    let b = fleet.channel(1).await;
    let flag = fleet.tmp.path().join("attempt-1");
    let digest = upload(a.clone(), &first_sleeps(&flag), false).await;
    let mut ops = execute(b.clone(), &digest).await;
    let name = first(&mut ops).await.name;
    let mut ran = String::new();
    wait_for("the first attempt starts", || {
        ran = std::fs::read_to_string(&flag).unwrap_or_default();
        !ran.is_empty()
    })
    .await;
    let pid = flag_pid(&ran);

    fleet.state.kill();
    let stopped = Instant::now();
    // The client's stream ends with UNAVAILABLE (it follows again later).
    let e = until_done(ops).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e}");
    let other = upload(a.clone(), "echo after the outage", true).await;
    for ch in [a.clone(), b.clone()] {
        expect_unavailable(ch, &other, &name).await;
    }
    // The replica running it cannot renew its lease: it stops the action.
    wait_for("the cut-off replica stops the running action", || {
        !alive(pid)
    })
    .await;
    eprintln!(
        "running action stopped {:?} after Redis stopped",
        stopped.elapsed()
    );

    let outage = Duration::from_secs(30);
    tokio::time::sleep(outage.saturating_sub(stopped.elapsed())).await;
    fleet.state.restart();
    let back = Instant::now();

    // The operation survived (append-only file): its lease expired, so it runs again.
    let done = loop {
        match wait_execution(b.clone(), &name).await {
            Ok(s) => match until_done(s).await {
                Ok(op) => break op,
                Err(e) if e.code() == tonic::Code::Unavailable => {}
                Err(e) => panic!("{e}"),
            },
            Err(e) if e.code() == tonic::Code::Unavailable => {}
            Err(e) => panic!("{e}"),
        }
        assert!(back.elapsed() < DEADLINE, "no recovery");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let out = stdout(a.clone(), &response(&done)).await;
    assert!(out.contains("second"), "{out}");
    eprintln!("recovered {:?} after Redis came back", back.elapsed());
    // New work flows through both replicas, with no restart.
    for ch in [a.clone(), b.clone()] {
        let digest = upload(ch.clone(), "echo after the outage", true).await;
        let done = until_done(execute(ch.clone(), &digest).await)
            .await
            .unwrap();
        assert!(stdout(ch, &response(&done))
            .await
            .contains("after the outage"));
    }
}

/// A Redis outage longer than `client_action_timeout_s` drops nothing: the clients could not
/// renew their marks while Redis was away, so after it returns they get a whole client
/// timeout to follow again. One operation running and one queued behind it, both followed;
/// Redis stopped for 5 s with a 2 s client timeout; the clients come back 1 s after it
/// returns: both complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_longer_than_the_client_timeout_drops_no_operation() {
    let mut fleet = Fleet::start_with(2, "client_action_timeout_s: 2,");
    let _w0 = fleet.worker("w0", 0);
    let a = fleet.channel(0).await;
    let b = fleet.channel(1).await;
    let flag = fleet.tmp.path().join("attempt-1");
    let running = upload(a.clone(), &first_sleeps(&flag), true).await;
    let queued = upload(a.clone(), "echo queued behind", true).await;
    let mut ops = Vec::new();
    let mut names = Vec::new();
    for d in [&running, &queued] {
        let mut s = execute(b.clone(), d).await;
        names.push(first(&mut s).await.name);
        ops.push(s);
    }
    wait_for("the first attempt starts", || flag.exists()).await;
    fleet.state.kill();
    for s in ops {
        let e = until_done(s).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unavailable, "{e}");
    }
    // Longer than the client timeout (and the lease) without Redis.
    tokio::time::sleep(Duration::from_secs(5)).await;
    fleet.state.restart();
    let back = Instant::now();
    // The clients' own back-off: within the client timeout of Redis's return.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut outs = Vec::new();
    for name in &names {
        let done = loop {
            match wait_execution(a.clone(), name).await {
                Ok(s) => match until_done(s).await {
                    Ok(op) => break op,
                    Err(e) if e.code() == tonic::Code::Unavailable => {}
                    Err(e) => panic!("{name}: {e}"),
                },
                Err(e) if e.code() == tonic::Code::Unavailable => {}
                Err(e) => panic!("{name}: {e}"),
            }
            assert!(back.elapsed() < DEADLINE, "no recovery");
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        outs.push(stdout(a.clone(), &response(&done)).await);
    }
    assert!(outs[0].contains("second"), "{outs:?}");
    assert!(outs[1].contains("queued behind"), "{outs:?}");
    // And one that nobody follows after the outage is still dropped, a client timeout later.
    let digest = upload(a.clone(), "sleep 60", true).await;
    let mut s = execute(b.clone(), &digest).await;
    let name = first(&mut s).await.name;
    drop(s);
    let left = Instant::now();
    let done = loop {
        let op = get_operation(b.clone(), &name).await.unwrap();
        if op.done {
            break op;
        }
        assert!(left.elapsed() < DEADLINE, "never dropped");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let st = response(&done).status.unwrap_or_default();
    assert_eq!(st.code, tonic::Code::Cancelled as i32, "{st:?}");
}

/// The cluster-wide views: `/status` and `/metrics` of a replica with no worker show the
/// whole shared queue, every live replica's workers and claims (labelled by replica id), and
/// which replica is the one answering; a replica killed drops out of them three leases later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_metrics_show_the_cluster_and_which_replica_owns_what() {
    let mut fleet = Fleet::start(2);
    let _w0 = fleet.worker("w0", 0);
    let a = fleet.channel(0).await;
    let flag = fleet.tmp.path().join("attempt-1");
    let running = upload(a.clone(), &first_sleeps(&flag), true).await;
    let mut streams = vec![execute(a.clone(), &running).await];
    wait_for("the first attempt starts", || flag.exists()).await;
    for i in 0..2 {
        let d = upload(a.clone(), &format!("echo behind {i}"), true).await;
        let mut s = execute(a.clone(), &d).await;
        first(&mut s).await;
        streams.push(s);
    }
    let addrs: Vec<SocketAddr> = (0..2).map(|i| fleet.r(i).cairn.addr).collect();
    let status = |i: usize| {
        let addr = addrs[i];
        async move {
            let (code, body) = common::http_get(addr, "/status").await;
            assert_eq!(code, 200, "{body}");
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            v["components"]["schedulers/MAIN"].clone()
        }
    };
    let r0 = status(0).await["replica"].as_str().unwrap().to_string();
    // Each replica records its summary every third of a lease: wait for the first record
    // made since its worker took the action.
    let start = Instant::now();
    let one = loop {
        let one = status(1).await;
        let claims = one["cluster"]["replicas"]
            .as_array()
            .and_then(|rs| rs.iter().find(|r| r["replica"] == r0.as_str()))
            .map(|r| r["claims"].clone());
        if claims == Some(serde_json::json!(1)) {
            break one;
        }
        assert!(start.elapsed() < DEADLINE, "{one}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let r1 = one["replica"].as_str().unwrap().to_string();
    assert_ne!(r0, r1);
    assert_eq!(one["claiming"], true, "{one}");
    let cluster = &one["cluster"];
    assert_eq!(cluster["queued"], 2, "{one}");
    assert_eq!(cluster["executing"], 1, "{one}");
    assert_eq!(cluster["workers"], 1, "{one}");
    let replicas = cluster["replicas"].as_array().unwrap();
    assert_eq!(replicas.len(), 2, "{one}");
    let of = |id: &str| {
        replicas
            .iter()
            .find(|r| r["replica"] == id)
            .unwrap_or_else(|| panic!("{id} in {one}"))
            .clone()
    };
    assert_eq!(of(&r0)["workers"], 1, "{one}");
    assert_eq!(of(&r0)["claims"], 1, "{one}");
    assert_eq!(of(&r0)["this_replica"], false, "{one}");
    assert_eq!(of(&r1)["workers"], 0, "{one}");
    assert_eq!(of(&r1)["this_replica"], true, "{one}");

    let (code, text) = common::http_get(addrs[1], "/metrics").await;
    assert_eq!(code, 200);
    let has = |line: &str| text.lines().any(|l| l == line);
    for line in [
        "nativelink_cluster_queue_length{scheduler=\"MAIN\"} 2".to_string(),
        "nativelink_cluster_execution_active_count{scheduler=\"MAIN\",execution_stage=\"executing\"} 1"
            .to_string(),
        "nativelink_cluster_replicas{scheduler=\"MAIN\"} 2".to_string(),
        format!("nativelink_cluster_worker_active_count{{scheduler=\"MAIN\",replica=\"{r0}\"}} 1"),
        format!("nativelink_cluster_replica_claims{{scheduler=\"MAIN\",replica=\"{r0}\"}} 1"),
        format!("nativelink_cluster_worker_active_count{{scheduler=\"MAIN\",replica=\"{r1}\"}} 0"),
        format!("nativelink_scheduler_replica_info{{scheduler=\"MAIN\",replica=\"{r1}\"}} 1"),
    ] {
        assert!(has(&line), "no line {line:?} in:\n{text}");
    }
    // The guides' families (`sum(nativelink_scheduler_queue_length)` and the like): the
    // replica with the lower id exports the cluster's figures, the other none, so that a sum
    // over the replicas is the cluster.
    let (reporter, other) = if r0 < r1 { (0, 1) } else { (1, 0) };
    let (_, reporting) = common::http_get(addrs[reporter], "/metrics").await;
    let (_, silent) = common::http_get(addrs[other], "/metrics").await;
    for line in [
        "nativelink_scheduler_queue_length{scheduler=\"MAIN\"} 2",
        "nativelink_queue_length{scheduler=\"MAIN\"} 2",
        "nativelink_worker_active_count{scheduler=\"MAIN\"} 1",
        "nativelink_execution_active_count{scheduler=\"MAIN\",execution_stage=\"queued\"} 2",
        "nativelink_execution_active_count{scheduler=\"MAIN\",execution_stage=\"executing\"} 1",
    ] {
        assert!(
            reporting.lines().any(|l| l == line),
            "no line {line:?} in the reporting replica's:\n{reporting}"
        );
        let name = line.split('{').next().unwrap();
        assert!(
            !silent
                .lines()
                .any(|l| l.starts_with(&format!("{name}{{scheduler=\"MAIN\""))),
            "the other replica also exports {name}:\n{silent}"
        );
    }

    // The web UI's pages say whose workers they list, and show the cluster beside them.
    for page in ["/queue", "/workers"] {
        let (code, html) = common::http_get(addrs[1], page).await;
        assert_eq!(code, 200, "{page}: {html}");
        for want in [
            format!("the tables below are replica <code>{r1}</code>"),
            "Whole cluster: 2 queued, 1 executing, 1 workers on 2 replicas.".to_string(),
            format!("<tr><td><code>{r0}</code></td><td>1</td><td>1</td><td>1</td><td>1</td></tr>"),
            format!("<code>{r1}</code> (this replica)"),
        ] {
            assert!(html.contains(&want), "{page}: no {want:?} in {html}");
        }
    }

    // A replica that dies leaves the views once its record expires (three leases, 6 s).
    drop(streams);
    fleet.kill9(0);
    let killed = Instant::now();
    loop {
        let one = status(1).await;
        if one["cluster"]["replicas"].as_array().map(Vec::len) == Some(1) {
            assert_eq!(
                one["cluster"]["replicas"][0]["replica"],
                r1.as_str(),
                "{one}"
            );
            break;
        }
        assert!(killed.elapsed() < DEADLINE, "the dead replica stays: {one}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "the killed replica left the cluster view {:?} after the kill",
        killed.elapsed()
    );
    let (_, text) = common::http_get(addrs[1], "/metrics").await;
    assert!(!text.contains(&r0), "{text}");
    assert!(
        text.contains("nativelink_cluster_replicas{scheduler=\"MAIN\"} 1"),
        "{text}"
    );
    // The survivor reports for the cluster now.
    assert!(
        text.lines()
            .any(|l| l.starts_with("nativelink_scheduler_queue_length{scheduler=\"MAIN\"}")),
        "{text}"
    );
}

/// Part 3's partition: replica 0 and its worker run in a network namespace of their own,
/// joined by one veth pair to the test's namespace, where both Redis servers listen (the
/// namespace reaches nothing else). The test cuts the link (its host end goes down: packets
/// are dropped, nothing is closed): the cut-off replica cannot renew its lease, stops the
/// action its worker runs and hands out nothing more; replica 1 re-queues the action when the
/// lease expires and runs it on its own worker, without the client noticing. When the link
/// comes back, replica 0 claims work again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_partitioned_from_redis_stops_handing_out_work_and_recovers_when_the_link_returns(
) {
    let mut fleet = Fleet::empty_in("", Some(common::netns::NetNs::create()));
    let r0 = fleet.replica_in_netns(0);
    fleet.replicas.push(Some(r0));
    let r1 = fleet.replica(1);
    fleet.replicas.push(Some(r1));
    let _w0 = fleet.worker("w0", 0);
    let b = fleet.channel(1).await;
    let flag = fleet.tmp.path().join("attempt-1");
    let digest = upload(b.clone(), &first_sleeps(&flag), false).await;
    let mut ops = execute(b.clone(), &digest).await;
    first(&mut ops).await;
    let mut ran = String::new();
    wait_for("the first attempt starts on replica 0's worker", || {
        ran = std::fs::read_to_string(&flag).unwrap_or_default();
        !ran.is_empty()
    })
    .await;
    assert!(ran.contains("worker-w0"), "{ran}");
    let pid = flag_pid(&ran);

    let ns = fleet.netns.as_ref().unwrap();
    ns.cut();
    let cut = Instant::now();
    // Replica 0 cannot renew its lease: it stops the action; replica 1 re-queues it.
    wait_for("the cut-off replica stops the running action", || {
        !alive(pid)
    })
    .await;
    eprintln!(
        "partition: the cut-off replica stopped its action {:?} after the cut",
        cut.elapsed()
    );
    // A worker on the replica that still reaches Redis runs it; the client never noticed.
    let w1 = fleet.worker("w1", 1);
    let done = until_done(ops).await.unwrap();
    let out = stdout(b.clone(), &response(&done)).await;
    assert!(out.contains("second") && out.contains("worker-w1"), "{out}");
    eprintln!(
        "partition: completed through replica 1 {:?} after the cut",
        cut.elapsed()
    );

    // While cut off, replica 0 hands nothing to its idle worker (no worker elsewhere: the
    // operation waits queued, never runs on w0).
    drop(w1);
    let marker = fleet.tmp.path().join("ran-on-0");
    let script = format!("pwd > {}; echo healed", marker.display());
    let digest = upload(b.clone(), &script, true).await;
    let mut ops = execute(b.clone(), &digest).await;
    let name = first(&mut ops).await.name;
    // Longer than a lease and a claiming pass: a replica that still claimed would have.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(!marker.exists(), "a cut-off replica handed out work");
    let op = get_operation(b.clone(), &name).await.unwrap();
    assert_eq!(stage(&op), re::execution_stage::Value::Queued);

    ns.heal();
    let healed = Instant::now();
    let done = until_done(ops).await.unwrap();
    assert!(stdout(b, &response(&done)).await.contains("healed"));
    assert!(std::fs::read_to_string(&marker)
        .unwrap()
        .contains("worker-w0"));
    eprintln!(
        "partition: replica 0 ran work again {:?} after the link came back",
        healed.elapsed()
    );
}

// ---- NativeLink's reported failures, each shown not to happen here --------------------------

/// NativeLink: "WaitExecution answers NOT_FOUND for long actions". Here a live operation never
/// expires: only a completed one does, `retain_completed_for_s` after it completed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_execution_never_answers_not_found_while_an_action_runs_longer_than_retention() {
    let fleet = Fleet::start_with(2, "retain_completed_for_s: 1,");
    let _w1 = fleet.worker("w1", 1);
    let a = fleet.channel(0).await;
    let b = fleet.channel(1).await;
    let digest = upload(a.clone(), "sleep 5; echo long", true).await;
    let mut ops = execute(a.clone(), &digest).await;
    let name = first(&mut ops).await.name;
    let started = Instant::now();
    let mut checks = 0;
    loop {
        let mut done = false;
        for ch in [a.clone(), b.clone()] {
            let op = get_operation(ch.clone(), &name).await.unwrap_or_else(|e| {
                panic!("GetOperation {:?} into the run: {e}", started.elapsed())
            });
            done |= op.done;
            // A fresh WaitExecution from either replica takes it up.
            let mut w = wait_execution(ch, &name).await.unwrap_or_else(|e| {
                panic!("WaitExecution {:?} into the run: {e}", started.elapsed())
            });
            first(&mut w).await;
            checks += 1;
        }
        if done {
            break;
        }
        assert!(started.elapsed() < DEADLINE);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(started.elapsed() >= Duration::from_secs(5), "ran its 5 s");
    assert!(checks > 10);
    let done = until_done(ops).await.unwrap();
    assert!(stdout(a.clone(), &response(&done)).await.contains("long"));
    // Then it goes, one retention period after completing, and so does its index entry.
    wait_for_async_not_found(&b, &name).await;
    let start = Instant::now();
    while fleet
        .state
        .cli(&["ZCARD", "cairn:scheduler:MAIN:ops"])
        .trim()
        != "0"
    {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "index never pruned"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn wait_for_async_not_found(ch: &Channel, name: &str) {
    let start = Instant::now();
    loop {
        match get_operation(ch.clone(), name).await {
            Err(e) if e.code() == tonic::Code::NotFound => return,
            Ok(_) => {}
            Err(e) => panic!("{e}"),
        }
        assert!(start.elapsed() < Duration::from_secs(10), "never expired");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// NativeLink: "operations stuck in Executing". A worker that hangs (SIGSTOP: no keepalive, no
/// answer) is removed after `worker_timeout_s` and its action runs on another replica's
/// worker; a replica that dies is covered by the lease test above.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_worker_leaves_no_operation_executing() {
    let fleet = Fleet::start(2);
    let w0 = fleet.worker("w0", 0);
    let a = fleet.channel(0).await;
    let flag = fleet.tmp.path().join("attempt-1");
    let digest = upload(a.clone(), &first_sleeps(&flag), false).await;
    let mut ops = execute(a.clone(), &digest).await;
    first(&mut ops).await;
    wait_for("the first attempt starts", || flag.exists()).await;
    // SAFETY: kill(2) with the worker's pid, which is not reaped yet (the handle is alive).
    let r = unsafe { libc::kill(w0.child.id() as i32, libc::SIGSTOP) };
    assert_eq!(r, 0);
    let stopped = Instant::now();
    let _w1 = fleet.worker("w1", 1);
    let done = until_done(ops).await.unwrap();
    let out = stdout(a.clone(), &response(&done)).await;
    assert!(out.contains("second") && out.contains("worker-w1"), "{out}");
    eprintln!("re-run {:?} after the worker hung", stopped.elapsed());
    drop(w0); // SIGKILL works on a stopped process
}

/// NativeLink: "re-queued operations stuck in Queued". An operation re-queued while no
/// worker is free, with every pub/sub connection cut in between, runs as soon as a worker
/// connects to any replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_requeued_operation_runs_when_a_worker_comes_even_after_pub_sub_was_cut() {
    let fleet = Fleet::start(2);
    let w0 = fleet.worker("w0", 0);
    let a = fleet.channel(0).await;
    let b = fleet.channel(1).await;
    let flag = fleet.tmp.path().join("attempt-1");
    let digest = upload(a.clone(), &first_sleeps(&flag), false).await;
    let mut ops = execute(a.clone(), &digest).await;
    let name = first(&mut ops).await.name;
    wait_for("the first attempt starts", || flag.exists()).await;
    let killed = fleet.state.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]);
    eprintln!("pub/sub connections killed: {killed}");
    w0.kill9();
    // Re-queued, and rightly queued while no worker exists.
    let start = Instant::now();
    loop {
        let op = get_operation(b.clone(), &name).await.unwrap();
        if stage(&op) == re::execution_stage::Value::Queued {
            break;
        }
        assert!(start.elapsed() < DEADLINE, "never re-queued");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    fleet.state.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]);
    let _w1 = fleet.worker("w1", 1);
    let done = until_done(ops).await.unwrap();
    let out = stdout(a.clone(), &response(&done)).await;
    assert!(out.contains("second") && out.contains("worker-w1"), "{out}");
}

/// Whatever else writes garbage under the scheduler's keys (a queued id with no operation, an
/// operation whose fields do not parse) is failed or skipped, never a crash, and real work
/// still flows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_in_the_shared_state_fails_cleanly_and_work_still_flows() {
    let fleet = Fleet::start(2);
    let p = "cairn:scheduler:MAIN:";
    fleet
        .state
        .cli(&["ZADD", &format!("{p}queue"), "1", "operations/ghost"]);
    // A platform queue and its properties that do not parse, with a ghost in it; a replica
    // summary that does not parse.
    fleet
        .state
        .cli(&["HSET", &format!("{p}platforms"), "deadbeef", "{not json"]);
    fleet
        .state
        .cli(&["ZADD", &format!("{p}pq:deadbeef"), "0", "operations/ghost2"]);
    fleet.state.cli(&["SADD", &format!("{p}replicas"), "bogus"]);
    fleet.state.cli(&[
        "SET",
        &format!("{p}replica:bogus"),
        "\u{ff}garbage",
        "PX",
        "600000",
    ]);
    fleet.state.cli(&[
        "HSET",
        &format!("{p}op:operations/garbage"),
        "state",
        "queued",
        "digest",
        "not-a-digest",
        "platform",
        "{not json",
        "fence",
        "0",
        "retries",
        "0",
        "score",
        "1",
    ]);
    fleet
        .state
        .cli(&["ZADD", &format!("{p}queue"), "1", "operations/garbage"]);
    // Counters that are not numbers: claimed, failed, never blocking the queue.
    let d = cairn_core::DigestFunction::Sha256.digest_of(b"missing action");
    fleet.state.cli(&[
        "HSET",
        &format!("{p}op:operations/bad-counters"),
        "state",
        "queued",
        "digest",
        &d.file_name(),
        "platform",
        "[]",
        "fence",
        "x",
        "retries",
        "y",
        "score",
        "z",
    ]);
    fleet
        .state
        .cli(&["ZADD", &format!("{p}queue"), "0", "operations/bad-counters"]);
    let _w0 = fleet.worker("w0", 0);
    let a = fleet.channel(0).await;
    let digest = upload(a.clone(), "echo fine", true).await;
    let done = until_done(execute(a.clone(), &digest).await).await.unwrap();
    assert!(stdout(a.clone(), &response(&done)).await.contains("fine"));
    // The one with bad counters ends (failed), it does not stay queued or executing.
    let start = Instant::now();
    while !get_operation(a.clone(), "operations/bad-counters")
        .await
        .unwrap()
        .done
    {
        assert!(
            start.elapsed() < DEADLINE,
            "operations/bad-counters never ended"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The unreadable operation is not served as an operation.
    let e = get_operation(a.clone(), "operations/garbage")
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{e}");
    // And both replicas are still up, their cluster views leave the garbage out.
    for i in 0..2 {
        let ch = fleet.channel(i).await;
        let digest = upload(ch.clone(), &format!("echo again {i}"), true).await;
        until_done(execute(ch, &digest).await).await.unwrap();
        let (code, body) = common::http_get(fleet.r(i).cairn.addr, "/status").await;
        assert_eq!(code, 200, "{body}");
        assert!(!body.contains("bogus"), "{body}");
        let (code, _) = common::http_get(fleet.r(i).cairn.addr, "/metrics").await;
        assert_eq!(code, 200);
    }
}

/// No action waits forever: an operation that no worker of any replica could ever run fails
/// with FAILED_PRECONDITION naming the property, once `unschedulable_grace_period_s` passed;
/// one that a worker of another replica can run is not touched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operation_no_replica_s_worker_can_run_fails_after_the_grace_period() {
    let fleet = Fleet::start_with(2, "unschedulable_grace_period_s: 2,");
    let _w0 = fleet.worker("w0", 0);
    let b = fleet.channel(1).await;
    let (digest, blobs) = ShellAction {
        script: "echo never",
        ..Default::default()
    }
    .build_with_platform(&[("OSFamily", "windows")]);
    common::actions::upload_blobs(b.clone(), "main", blobs).await;
    let started = Instant::now();
    let done = until_done(execute(b.clone(), &digest.to_proto()).await)
        .await
        .unwrap();
    let st = response(&done).status.unwrap_or_default();
    assert_eq!(st.code, tonic::Code::FailedPrecondition as i32, "{st:?}");
    assert!(st.message.contains("\"OSFamily\"=\"windows\""), "{st:?}");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(15),
        "{took:?}"
    );
    // Linux actions, which only replica 0's worker runs, are fine from replica 1.
    let digest = upload(b.clone(), "echo fine", true).await;
    let done = until_done(execute(b.clone(), &digest).await).await.unwrap();
    assert!(stdout(b, &response(&done)).await.contains("fine"));
}

/// No action queues forever behind work nobody can run: 200 queued operations that no worker
/// can run (an OS no worker has) ahead of one that a connected worker can run: that one runs
/// at once, found in its platform's queue, however deep it sits in the shared one. The 200
/// stay queued (their grace period is long).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operation_deep_in_the_queue_runs_at_once_when_a_worker_can_run_it() {
    let fleet = Fleet::start_with(2, "unschedulable_grace_period_s: 600,");
    let _w0 = fleet.worker("w0", 0);
    let a = fleet.channel(0).await;
    let b = fleet.channel(1).await;
    let mut blobs = Vec::new();
    let mut blocked = Vec::new();
    for i in 0..200 {
        let script = format!("echo blocked {i}");
        let (digest, more) = ShellAction {
            script: &script,
            do_not_cache: true,
            ..Default::default()
        }
        .build_with_platform(&[("OSFamily", "plan9")]);
        blobs.extend(more);
        blocked.push(digest.to_proto());
    }
    common::actions::upload_blobs(b.clone(), "main", blobs).await;
    let mut names = Vec::new();
    for d in &blocked {
        // Queued, then left: nobody follows them (client_action_timeout_s, 60 s, is longer
        // than this test).
        let mut ops = execute(b.clone(), d).await;
        names.push(first(&mut ops).await.name);
    }
    let depth = fleet.state.cli(&["ZCARD", "cairn:scheduler:MAIN:queue"]);
    assert_eq!(depth.trim(), "200", "the 200 are queued");
    let digest = upload(a.clone(), "echo runnable", true).await;
    let started = Instant::now();
    let done = until_done(execute(a.clone(), &digest).await).await.unwrap();
    let took = started.elapsed();
    assert!(stdout(a.clone(), &response(&done))
        .await
        .contains("runnable"));
    eprintln!("the operation behind 200 that no worker can run completed in {took:?}");
    assert!(took < Duration::from_secs(5), "took {took:?}");
    // The 200 are still queued, not failed.
    for name in [&names[0], &names[199]] {
        let op = get_operation(a.clone(), name).await.unwrap();
        assert_eq!(stage(&op), re::execution_stage::Value::Queued, "{name}");
    }
}

/// No action waits forever however deep it sits: an operation that no worker can run, queued
/// behind 150 that a busy worker will run, fails after the grace period (the check walks each
/// platform's queue, not only the head of the shared one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unschedulable_operation_deep_in_the_queue_fails_after_the_grace_period() {
    let fleet = Fleet::start_with(2, "unschedulable_grace_period_s: 2,");
    let _w0 = fleet.worker("w0", 0);
    let a = fleet.channel(0).await;
    let flag = fleet.tmp.path().join("attempt-1");
    let busy = upload(a.clone(), &first_sleeps(&flag), true).await;
    let mut busy = execute(a.clone(), &busy).await;
    first(&mut busy).await;
    wait_for("the worker is busy", || flag.exists()).await;
    let mut blobs = Vec::new();
    let mut waiting = Vec::new();
    for i in 0..150 {
        let script = format!("echo waits {i}");
        let (digest, more) = ShellAction {
            script: &script,
            do_not_cache: true,
            ..Default::default()
        }
        .build();
        blobs.extend(more);
        waiting.push(digest.to_proto());
    }
    common::actions::upload_blobs(a.clone(), "main", blobs).await;
    let mut names = Vec::new();
    for d in &waiting {
        let mut ops = execute(a.clone(), d).await;
        names.push(first(&mut ops).await.name);
    }
    let (digest, blobs) = ShellAction {
        script: "echo never",
        ..Default::default()
    }
    .build_with_platform(&[("OSFamily", "plan9")]);
    common::actions::upload_blobs(a.clone(), "main", blobs).await;
    let started = Instant::now();
    let done = until_done(execute(a.clone(), &digest.to_proto()).await)
        .await
        .unwrap();
    let st = response(&done).status.unwrap_or_default();
    assert_eq!(st.code, tonic::Code::FailedPrecondition as i32, "{st:?}");
    assert!(st.message.contains("\"OSFamily\"=\"plan9\""), "{st:?}");
    let took = started.elapsed();
    eprintln!("failed behind 150 queued operations after {took:?}");
    assert!(took < Duration::from_secs(15), "{took:?}");
    // The 150 are still queued: they can run, once the worker is free.
    let op = get_operation(a.clone(), &names[149]).await.unwrap();
    assert_eq!(stage(&op), re::execution_stage::Value::Queued);
}

/// `client_action_timeout_s`: an operation that no client of any replica follows any more is
/// dropped (CANCELLED) and its command stopped; while one follows, it lives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operation_nobody_follows_is_dropped_after_the_client_timeout() {
    let fleet = Fleet::start_with(2, "client_action_timeout_s: 2,");
    let _w0 = fleet.worker("w0", 0);
    let a = fleet.channel(0).await;
    let b = fleet.channel(1).await;
    let flag = fleet.tmp.path().join("attempt-1");
    let digest = upload(a.clone(), &first_sleeps(&flag), true).await;
    let mut ops = execute(b.clone(), &digest).await;
    let name = first(&mut ops).await.name;
    let mut ran = String::new();
    wait_for("the action starts", || {
        ran = std::fs::read_to_string(&flag).unwrap_or_default();
        !ran.is_empty()
    })
    .await;
    // Followed (through the other replica, in turn) for longer than the timeout: it lives.
    drop(ops);
    let mut w = wait_execution(a.clone(), &name).await.unwrap();
    first(&mut w).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let op = get_operation(b.clone(), &name).await.unwrap();
    assert!(!op.done, "dropped while a client followed it");
    // Nobody follows: dropped, and the command stopped.
    drop(w);
    let gone = Instant::now();
    let done = loop {
        let op = get_operation(b.clone(), &name).await.unwrap();
        if op.done {
            break op;
        }
        assert!(gone.elapsed() < DEADLINE, "never dropped");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let st = response(&done).status.unwrap_or_default();
    assert_eq!(st.code, tonic::Code::Cancelled as i32, "{st:?}");
    assert!(st.message.contains("client_action_timeout_s"), "{st:?}");
    let pid = flag_pid(&ran);
    wait_for("the dropped action's command stops", || !alive(pid)).await;
    eprintln!("dropped {:?} after its last follower left", gone.elapsed());
}

/// A replica told to stop (SIGTERM) drains: it claims nothing more, so queued work goes to
/// the workers of the replicas that stay, and nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_replica_claims_nothing_and_the_others_run_the_work() {
    let fleet = Fleet::start(2);
    let _w0 = fleet.worker("w0", 0);
    let _w1 = fleet.worker("w1", 1);
    let b = fleet.channel(1).await;
    // Replica 0 drains: its worker's stream keeps it alive (up to the drain deadline).
    // SAFETY: kill(2) with the replica's pid, which is not reaped yet (the handle is alive).
    let r = unsafe { libc::kill(fleet.r(0).cairn.child.id() as i32, libc::SIGTERM) };
    assert_eq!(r, 0);
    tokio::time::sleep(Duration::from_millis(500)).await;
    for i in 0..6 {
        let digest = upload(b.clone(), &format!("echo {i} in $(pwd)"), true).await;
        let done = until_done(execute(b.clone(), &digest).await).await.unwrap();
        let out = stdout(b.clone(), &response(&done)).await;
        assert!(
            out.contains("worker-w1"),
            "run {i} went to the draining replica's worker: {out}"
        );
    }
}

/// One client of the rolling update: executes its own actions one after another through
/// whichever replica answers, following each through WaitExecution on another replica when
/// its stream breaks, until `stop`; every run's output is checked. Returns how many ran.
async fn rolling_client(
    c: usize,
    addrs: Vec<SocketAddr>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    done: std::sync::Arc<std::sync::atomic::AtomicUsize>,
) -> Result<usize, String> {
    use std::sync::atomic::Ordering;
    let connect = |a: SocketAddr| async move {
        tonic::transport::Endpoint::from_shared(format!("http://{a}"))
            .unwrap()
            .connect_timeout(Duration::from_secs(2))
            .connect()
            .await
            .ok()
    };
    let mut n = 0;
    let mut next = c;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let want = format!("client{c}-run{n}");
        let deadline = Instant::now() + DEADLINE;
        // Submit through the first replica that takes it.
        let (name, mut stream) = loop {
            if Instant::now() > deadline {
                return Err(format!("{want}: no replica took the Execute"));
            }
            next += 1;
            let Some(ch) = connect(addrs[next % addrs.len()]).await else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            // In a task of its own: the kit's upload panics on an error (a replica that is
            // going away), which only means "try another".
            let script = format!("echo {want}");
            let up = ch.clone();
            let upload = tokio::spawn(async move {
                ShellAction {
                    script: &script,
                    do_not_cache: true,
                    ..Default::default()
                }
                .upload(up, "main")
                .await
            });
            let digest = match tokio::time::timeout(Duration::from_secs(10), upload).await {
                Ok(Ok(d)) => d.to_proto(),
                _ => continue,
            };
            let call = re::execution_client::ExecutionClient::new(ch)
                .execute(re::ExecuteRequest {
                    instance_name: "main".into(),
                    action_digest: Some(digest),
                    skip_cache_lookup: true,
                    ..Default::default()
                })
                .await;
            let Ok(mut s) = call.map(|r| r.into_inner()) else {
                continue;
            };
            match tokio::time::timeout(Duration::from_secs(10), s.message()).await {
                Ok(Ok(Some(op))) => break (op.name.clone(), s),
                _ => continue,
            }
        };
        // Follow it to the end, reattaching elsewhere when a stream breaks.
        let op = loop {
            if Instant::now() > deadline {
                return Err(format!("{want} ({name}) never completed"));
            }
            let ended = tokio::time::timeout(Duration::from_secs(30), async {
                loop {
                    match stream.message().await {
                        Ok(Some(op)) if op.done => return Some(op),
                        Ok(Some(_)) => continue,
                        _ => return None,
                    }
                }
            })
            .await;
            if let Ok(Some(op)) = ended {
                break op;
            }
            // Reattach through another replica.
            loop {
                if Instant::now() > deadline {
                    return Err(format!("{want} ({name}): no replica would reattach"));
                }
                next += 1;
                if let Some(ch) = connect(addrs[next % addrs.len()]).await {
                    if let Ok(s) = wait_execution(ch, &name).await {
                        stream = s;
                        break;
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        let r = match op.result {
            Some(lro::operation::Result::Response(any)) => {
                re::ExecuteResponse::decode(any.value.as_slice()).map_err(|e| e.to_string())?
            }
            other => return Err(format!("{want} ({name}) ended with {other:?}")),
        };
        let status = r.status.clone().unwrap_or_default();
        if status.code != 0 || r.result.as_ref().map(|x| x.exit_code) != Some(0) {
            return Err(format!(
                "{want} ({name}): status {status:?}, result {:?}",
                r.result
            ));
        }
        // Its own output, read through any replica.
        let out = loop {
            next += 1;
            if let Some(ch) = connect(addrs[next % addrs.len()]).await {
                break stdout(ch, &r).await;
            }
            if Instant::now() > deadline {
                return Err(format!("{want}: no replica to read the output through"));
            }
        };
        if out.trim() != want {
            return Err(format!("{want} ({name}) printed {out:?}"));
        }
        done.fetch_add(1, Ordering::Relaxed);
    }
    Ok(n)
}

/// `cairn bench execute` as a child process: its stdout collected, its stderr passed on.
struct BenchRun {
    child: std::process::Child,
    stdout: std::thread::JoinHandle<String>,
    /// Receives once the bench has uploaded its actions and started running them.
    running: std::sync::mpsc::Receiver<()>,
}

impl BenchRun {
    fn start(endpoint: SocketAddr, clients: usize, requests: usize) -> BenchRun {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_cairn"))
            .args(["bench", "execute", "--instance-name", "main"])
            .arg("--endpoint")
            .arg(format!("grpc://{endpoint}"))
            .arg("--clients")
            .arg(clients.to_string())
            .arg("--requests")
            .arg(requests.to_string())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start cairn bench execute");
        let mut out = child.stdout.take().unwrap();
        let stdout = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = std::io::Read::read_to_string(&mut out, &mut text);
            text
        });
        let err = child.stderr.take().unwrap();
        let (tx, running) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(err).lines().map_while(Result::ok) {
                eprintln!("[bench] {line}");
                if line.contains("running them") {
                    let _ = tx.send(());
                }
            }
        });
        BenchRun {
            child,
            stdout,
            running,
        }
    }

    /// Waits until the bench runs its actions (its upload is done).
    fn wait_running(&self) {
        self.running
            .recv_timeout(DEADLINE)
            .expect("cairn bench execute never started running its actions");
    }

    /// SIGINT (no new actions, those in flight finish), then its exit status and output.
    fn stop(mut self) -> (std::process::ExitStatus, String) {
        // SAFETY: kill(2) with the bench's pid, which is not reaped yet (the handle is alive).
        let r = unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        assert_eq!(r, 0);
        let deadline = Instant::now() + Duration::from_secs(150);
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("cairn bench execute did not end after SIGINT");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        (status, self.stdout.join().unwrap())
    }
}

/// Part 4 of the issue: the replicas are restarted one at a time (SIGTERM, drain, start again
/// on the same ports, as a rolling update replaces pods behind a Service) under a steady load
/// of `cairn bench execute` (4 clients, through a TCP front that sends each new connection to
/// the first replica that accepts it, as a load balancer would), and of one test client that
/// checks each action's own output: no operation is lost. The bench follows its operations
/// again with WaitExecution when a stream breaks, and exits non-zero on any failed one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_of_every_replica_under_bench_load_loses_no_operation() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;
    // Completed operations stay in the index for the whole test, so that its size only grows
    // (the progress measure below).
    let mut fleet = Fleet::start_with(3, "retain_completed_for_s: 600,");
    let _workers: Vec<CairnWorker> = (0..3).map(|i| fleet.worker(&format!("w{i}"), i)).collect();
    let addrs: Vec<SocketAddr> = (0..3).map(|i| fleet.r(i).cairn.addr).collect();
    let front = common::front::Front::start(addrs.clone());
    let bench = BenchRun::start(front.addr, 4, 20_000);
    tokio::task::block_in_place(|| bench.wait_running());
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let client = tokio::spawn(rolling_client(0, addrs, stop.clone(), done.clone()));
    let state_port = fleet.state.port;
    // Operations submitted so far (the bench's and the client's): each bench client submits
    // its next action only once its previous one completed.
    let submitted = move || {
        redis_kit::cli(state_port, &["ZCARD", "cairn:scheduler:MAIN:ops"])
            .trim()
            .parse::<usize>()
            .unwrap_or(0)
    };
    // Whether `at_least` more operations are submitted within the deadline.
    let progress = |at_least: usize| {
        let from = submitted();
        async move {
            let start = Instant::now();
            while submitted() < from + at_least {
                if start.elapsed() > DEADLINE {
                    return false;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            true
        }
    };
    let mut stalled = None;
    assert!(progress(40).await, "no load before the update");
    for i in 0..3 {
        let r = fleet.replicas[i].take().expect("replica running");
        let (addr, worker_api) = (r.cairn.addr, r.worker_api);
        eprintln!("rolling update: stopping {}", r.label);
        let status = tokio::task::spawn_blocking(move || r.cairn.terminate())
            .await
            .unwrap();
        assert!(
            status.success(),
            "replica {i} exited with {status} after SIGTERM"
        );
        let state = fleet.state.url();
        fleet.replicas[i] = Some(fleet.replica_at(i, &state, Some(addr), worker_api));
        eprintln!("rolling update: replica-{i} is back");
        // The load goes on through the new replica set before the next one is replaced.
        if !progress(20).await {
            stalled = Some(format!(
                "no 20 operations submitted within {DEADLINE:?} after replica-{i} came back"
            ));
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    let (status, report) = tokio::task::spawn_blocking(move || bench.stop())
        .await
        .unwrap();
    eprintln!("{report}");
    let client = client.await.unwrap();
    assert!(stalled.is_none(), "{stalled:?}");
    assert!(
        status.success(),
        "cairn bench execute reported failed operations ({status}):\n{report}"
    );
    let errors = report
        .lines()
        .find_map(|l| l.strip_prefix("execute errors:"))
        .map(str::trim);
    assert_eq!(errors, Some("0"), "{report}");
    let ran: usize = report
        .lines()
        .find_map(|l| l.strip_prefix("execute:"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("the bench's count");
    let checked = client.unwrap_or_else(|e| panic!("the checking client lost one: {e}"));
    eprintln!(
        "rolling update: the bench completed {ran} operations, the checking client {checked}, \
         none lost"
    );
    assert!(ran >= 60, "{report}");
    drop(front);
}
