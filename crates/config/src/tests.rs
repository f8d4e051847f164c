//! Every config fragment of the two guides parses into the right structure; errors name the
//! file, key path and expectation.

use super::*;
use crate::schedulers::{AllocationStrategy, SimpleScheduler};
use crate::stores::{CompressionAlgorithm, StoreSpec};

fn fixture(name: &str) -> CairnConfig {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name);
    CairnConfig::load(&path).unwrap_or_else(|e| panic!("{e}"))
}

fn simple(cfg: &CairnConfig) -> &SimpleScheduler {
    match cfg.schedulers.get("main").expect("scheduler main") {
        SchedulerSpec::Simple(s) => s,
        other => panic!("expected simple, got {other:?}"),
    }
}

#[test]
fn production_storage_tree() {
    let cfg = fixture("guide-production-storage.json5");
    let StoreSpec::Verify(v) = cfg.stores.get("CAS_PRODUCTION").unwrap() else {
        panic!("verify expected")
    };
    assert!(v.verify_size && !v.verify_hash);
    let StoreSpec::Dedup(d) = &v.backend else {
        panic!("dedup expected")
    };
    let StoreSpec::FastSlow(fs) = &d.index_store else {
        panic!()
    };
    let StoreSpec::Memory(m) = &fs.fast else {
        panic!()
    };
    assert_eq!(
        m.eviction_policy.as_ref().unwrap().max_bytes.0,
        2_000_000_000
    );
    let StoreSpec::ExperimentalCloudObjectStore(c) = &fs.slow else {
        panic!()
    };
    assert_eq!(c.bucket.as_deref(), Some("nativelink-cas-index"));
    assert_eq!(c.key_prefix.as_deref(), Some("prod/index/"));
    let r = c.retry.as_ref().unwrap();
    assert_eq!(
        (r.max_retries, r.delay, r.jitter),
        (Some(6), Some(0.3), Some(0.5))
    );
    let StoreSpec::Compression(comp) = &d.content_store else {
        panic!()
    };
    assert!(matches!(
        comp.compression_algorithm,
        CompressionAlgorithm::Lz4(_)
    ));
    let StoreSpec::FastSlow(fs) = &comp.backend else {
        panic!()
    };
    let StoreSpec::Memory(m) = &fs.fast else {
        panic!()
    };
    assert_eq!(
        m.eviction_policy.as_ref().unwrap().max_bytes.0,
        5_000_000_000
    );
    let StoreSpec::ExperimentalCloudObjectStore(c) = &fs.slow else {
        panic!()
    };
    assert_eq!(c.provider.as_deref(), Some("aws"));
    assert_eq!(c.region.as_deref(), Some("us-east-1"));
}

#[test]
fn tls_listener() {
    let cfg = fixture("guide-tls.json5");
    let http = cfg.servers[0].listener.http();
    assert_eq!(http.socket_address, "0.0.0.0:50051");
    let tls = http.tls.as_ref().unwrap();
    assert_eq!(tls.cert_file, "/certs/server.crt");
    assert_eq!(tls.key_file, "/certs/server.key");
    assert_eq!(tls.ca_file.as_deref(), Some("/certs/ca.crt"));
    assert!(tls.verify_client);
}

#[test]
fn advanced_http() {
    let cfg = fixture("guide-advanced-http.json5");
    let a = cfg.servers[0]
        .listener
        .http()
        .advanced_http
        .clone()
        .unwrap();
    assert_eq!(a.http2_keepalive_interval, Some(30));
    assert_eq!(a.http2_keepalive_timeout, Some(10));
    assert_eq!(a.max_concurrent_streams, Some(1000));
}

#[test]
fn global_max_open_files() {
    let cfg = fixture("guide-global.json5");
    assert_eq!(cfg.global.unwrap().max_open_files, Some(65536));
}

#[test]
fn troubleshooting_worker() {
    let cfg = fixture("ts-worker.json5");
    let w = cfg.local_workers();
    assert_eq!(w.len(), 1);
    assert_eq!(
        w[0].scheduler_endpoint.as_deref(),
        Some("grpc://nativelink-scheduler:50051")
    );
}

#[test]
fn troubleshooting_schedulers() {
    assert_eq!(
        simple(&fixture("ts-scheduler-worker-timeout.json5")).worker_timeout_s,
        Some(30)
    );
    let cfg = fixture("ts-scheduler-timeouts.json5");
    let s = simple(&cfg);
    assert_eq!(s.client_action_timeout_s, Some(300));
    assert_eq!(s.max_action_executing_timeout_s, Some(600));
    assert_eq!(
        simple(&fixture("ts-scheduler-retries.json5")).max_job_retries,
        Some(2)
    );
    assert_eq!(
        simple(&fixture("ts-scheduler-allocation.json5")).allocation_strategy,
        AllocationStrategy::MostRecentlyUsed
    );
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/ts-simple-executing-timeout.json5");
    let text = std::fs::read_to_string(&path).unwrap();
    let s: SimpleScheduler = parse_as("ts-simple-executing-timeout.json5", &text).unwrap();
    assert_eq!(s.max_action_executing_timeout_s, Some(600));
}

#[test]
fn troubleshooting_stores() {
    let cfg = fixture("ts-stores-memory.json5");
    let StoreSpec::Memory(m) = cfg.stores.get("CAS_MAIN_STORE").unwrap() else {
        panic!()
    };
    assert_eq!(
        m.eviction_policy.as_ref().unwrap().max_bytes.0,
        10_000_000_000
    );

    let cfg = fixture("ts-stores-tiered.json5");
    let StoreSpec::FastSlow(fs) = cfg.stores.get("TIERED_CAS").unwrap() else {
        panic!()
    };
    let StoreSpec::Filesystem(f) = &fs.slow else {
        panic!()
    };
    assert_eq!(f.content_path, "/var/cache/nativelink");
    assert_eq!(
        f.eviction_policy.as_ref().unwrap().max_bytes.0,
        100_000_000_000
    );

    let cfg = fixture("ts-stores-compressed.json5");
    assert!(matches!(
        cfg.stores.get("COMPRESSED_CAS").unwrap(),
        StoreSpec::Compression(_)
    ));

    let cfg = fixture("ts-stores-s3-retry.json5");
    let StoreSpec::ExperimentalCloudObjectStore(c) = cfg.stores.get("S3_STORE").unwrap() else {
        panic!()
    };
    assert_eq!(c.retry.as_ref().unwrap().max_retries, Some(6));
}

#[test]
fn list_and_map_forms_are_equivalent() {
    let list = parse_str(
        "l.json5",
        r#"{stores: [{name: "A", memory: {}}, {name: "B", noop: {}}]}"#,
    )
    .unwrap();
    let map = parse_str("m.json5", r#"{stores: {A: {memory: {}}, B: {noop: {}}}}"#).unwrap();
    for cfg in [list, map] {
        let names: Vec<_> = cfg.stores.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["A", "B"]);
        assert_eq!(cfg.stores.get("B").unwrap().kind(), "noop");
    }
}

#[test]
fn errors_name_file_key_path_and_expectation() {
    let e = parse_str(
        "cairn.json5",
        r#"{stores: {CAS: {memory: {eviction_policy: {max_bytes: "lots"}}}}}"#,
    )
    .unwrap_err();
    assert_eq!(e.file, "cairn.json5");
    assert_eq!(
        e.where_, "stores.CAS.memory.eviction_policy.max_bytes",
        "{e}"
    );
    assert!(e.message.contains("10gb"), "{e}");

    let e = parse_str(
        "cairn.json5",
        r#"{stores: [{name: "CAS", memory: {eviction_policy: {max_bites: 1}}}]}"#,
    )
    .unwrap_err();
    assert_eq!(
        e.where_, "stores.CAS.memory.eviction_policy.max_bites",
        "{e}"
    );
    assert!(e.message.contains("unknown field"), "{e}");

    let e = parse_str("x.json5", "{stores: {A: {memry: {}}}}").unwrap_err();
    assert!(e.message.contains("unknown variant `memry`"), "{e}");

    let e = parse_str("x.json5", "{servers: [}").unwrap_err();
    assert!(e.where_.starts_with("line 1"), "{e}");

    let e = parse_str("x.json5", "{bogus: 1}").unwrap_err();
    assert!(e.message.contains("unknown field `bogus`"), "{e}");
}

#[test]
fn env_expansion_applies_to_strings() {
    std::env::set_var("CAIRN_TEST_CAS_DIR", "/data/cas");
    let cfg = parse_str(
        "e.json5",
        r#"{stores: {F: {filesystem: {content_path: "${CAIRN_TEST_CAS_DIR}", eviction_policy: {max_bytes: "${CAIRN_TEST_UNSET:-10GiB}"}}}}}"#,
    )
    .unwrap();
    let StoreSpec::Filesystem(f) = cfg.stores.get("F").unwrap() else {
        panic!()
    };
    assert_eq!(f.content_path, "/data/cas");
    assert_eq!(
        f.eviction_policy.as_ref().unwrap().max_bytes.0,
        10_737_418_240
    );
    let e = parse_str(
        "e.json5",
        r#"{stores: {F: {filesystem: {content_path: "${CAIRN_TEST_NOT_SET_EVER}"}}}}"#,
    )
    .unwrap_err();
    assert_eq!(e.where_, "stores.F.filesystem.content_path");
    assert!(e.message.contains("CAIRN_TEST_NOT_SET_EVER"), "{e}");
}

#[test]
fn services_accept_map_and_list_instance_forms() {
    let cfg = parse_str(
        "s.json5",
        r#"{servers: [{listener: {http: {socket_address: "127.0.0.1:1"}}, services: {
            cas: {main: {cas_store: "CAS"}},
            ac: [{instance_name: "main", ac_store: "AC"}],
            bytestream: {cas_stores: {main: "CAS"}},
            capabilities: [{instance_name: "main"}],
            health: {},
        }}]}"#,
    )
    .unwrap();
    let s = cfg.servers[0].services.as_ref().unwrap();
    assert_eq!(
        s.cas.as_ref().unwrap().get("main").unwrap().cas_store,
        "CAS"
    );
    assert_eq!(s.ac.as_ref().unwrap().get("main").unwrap().ac_store, "AC");
    assert_eq!(
        s.bytestream.as_ref().unwrap().instances()[0].cas_store,
        "CAS"
    );
}

mod properties {
    use super::*;
    use proptest::prelude::*;

    /// The guides' fragments, as text.
    fn fixtures() -> Vec<String> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
        let mut texts: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            // `fixtures/nativelink/` holds the NativeLink compatibility fixtures.
            .filter(|p| p.is_file())
            .map(|p| std::fs::read_to_string(p).unwrap())
            .collect();
        texts.sort();
        texts
    }

    /// A config error says which file, and where in it.
    fn check(result: Result<CairnConfig, ConfigError>) -> Result<(), TestCaseError> {
        if let Err(e) = result {
            prop_assert_eq!(&e.file, "fuzz.json5");
            prop_assert!(!e.where_.is_empty() || !e.message.is_empty(), "{}", e);
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn any_text_is_a_config_or_an_error_naming_the_file(
            text in "\\PC{0,200}|[{}\\[\\]:,\" a-z_0-9]{0,120}",
        ) {
            check(parse_str("fuzz.json5", &text))?;
        }

        #[test]
        fn a_guide_fragment_cut_short_or_with_a_character_changed_is_a_config_or_an_error(
            which in any::<prop::sample::Index>(),
            at in any::<prop::sample::Index>(),
            cut in any::<bool>(),
            with in prop::sample::select(vec!['{', '}', '[', ']', ':', ',', '"', '0', '-', 'x', ' ', '$']),
        ) {
            let texts = fixtures();
            let text = which.get(&texts);
            let chars: Vec<char> = text.chars().collect();
            let i = at.index(chars.len());
            let mutated: String = if cut {
                chars[..i].iter().collect()
            } else {
                let mut c = chars.clone();
                c[i] = with;
                c.into_iter().collect()
            };
            check(parse_str("fuzz.json5", &mutated))?;
        }
    }
}

#[test]
fn nativelink_scheduler_forms_parse() {
    let cfg = parse_str(
        "nl.json5",
        r#"{
          stores: { AC: { memory: {} } },
          schedulers: {
            MAIN: { cache_lookup: { ac_store: "AC", scheduler: { simple: {
              worker_match_logging_interval_s: -1,
              unacknowledged_kill_timeout_s: 30,
            } } } },
            INLINE: { cache_lookup: { ac_store: { ref_store: { name: "AC" } }, scheduler: { simple: {} } } },
          },
        }"#,
    )
    .unwrap();
    let SchedulerSpec::CacheLookup(c) = cfg.schedulers.get("MAIN").unwrap() else {
        panic!("cache_lookup expected")
    };
    // A store name means a ref_store to it.
    let StoreSpec::RefStore(r) = &c.ac_store else {
        panic!("ref_store expected, got {:?}", c.ac_store)
    };
    assert_eq!(r.name, "AC");
    let SchedulerSpec::Simple(s) = &c.scheduler else {
        panic!("simple expected")
    };
    assert_eq!(s.worker_match_logging_interval_s, Some(-1.0));
    assert_eq!(s.unacknowledged_kill_timeout_s, Some(30));
    let SchedulerSpec::CacheLookup(c) = cfg.schedulers.get("INLINE").unwrap() else {
        panic!("cache_lookup expected")
    };
    assert!(matches!(&c.ac_store, StoreSpec::RefStore(r) if r.name == "AC"));
    // A wrong inline store is still an error at the key.
    let e = parse_str(
        "nl.json5",
        r#"{ schedulers: { M: { cache_lookup: { ac_store: { nope: {} }, scheduler: { simple: {} } } } } }"#,
    )
    .unwrap_err();
    assert!(e.to_string().contains("cache_lookup.ac_store"), "{e}");
}

/// Every provider of NativeLink's `experimental_cloud_object_store` with its own keys parses
/// (which keys belong to which provider is the store's check, in cairn-store).
#[test]
fn cloud_object_store_providers_parse_with_their_nativelink_keys() {
    let cfg = parse_str(
        "cloud.json5",
        r#"{ stores: {
          AWS: { experimental_cloud_object_store: { provider: "aws", region: "us-east-1", bucket: "b",
            key_prefix: "cas/", retry: { max_retries: 6, delay: 0.3, jitter: 0.5 },
            consider_expired_after_s: 86400, max_retry_buffer_per_request: "5mb",
            multipart_max_concurrent_uploads: "4", insecure_allow_http: false, disable_http2: true } },
          AWS_ENV: { experimental_cloud_object_store: { provider: "aws", bucket: "b",
            insecure_allow_http: "${CAIRN_TEST_UNSET_ALLOW_HTTP:-true}", disable_http2: "false" } },
          GCS: { experimental_cloud_object_store: { provider: "gcs", bucket: "b", resumable_chunk_size: "2mb",
            authentication_required: true, connection_timeout_s: 3, read_timeout_s: 3 } },
          AZ: { experimental_cloud_object_store: { provider: "azure", account_name: "a", container: "c",
            endpoint: "http://127.0.0.1:10000/devstoreaccount1", sas_url: "https://a.blob.core.windows.net/c?sig=x" } },
          ONTAP: { experimental_cloud_object_store: { provider: "ontap", endpoint: "https://ontap:443",
            vserver_name: "svm", bucket: "b", root_certificates: "/etc/ssl/ontap.pem" } },
          R2: { experimental_cloud_object_store: { provider: "r2", account_id: "acc", bucket: "b",
            access_key_id: "k", secret_access_key: "s" } },
          OCI: { experimental_cloud_object_store: { provider: "oci", namespace: "ns", region: "us-phoenix-1",
            bucket: "b", access_key_id: "k", secret_access_key: "s" } },
        } }"#,
    )
    .unwrap();
    let cloud = |name: &str| match cfg.stores.get(name).unwrap() {
        StoreSpec::ExperimentalCloudObjectStore(c) => c.clone(),
        other => panic!("{name}: {other:?}"),
    };
    let aws = cloud("AWS");
    assert_eq!(aws.multipart_max_concurrent_uploads, Some(4));
    assert_eq!(
        aws.max_retry_buffer_per_request.map(|b| b.0),
        Some(5_000_000)
    );
    assert_eq!(aws.consider_expired_after_s, Some(86400));
    assert!(!aws.insecure_allow_http && aws.disable_http2);
    // Booleans also come as strings, so that `${VAR}` can set them (NativeLink's shellexpand).
    let from_env = cloud("AWS_ENV");
    assert!(from_env.insecure_allow_http && !from_env.disable_http2);
    assert_eq!(
        cloud("GCS").resumable_chunk_size.map(|b| b.0),
        Some(2_000_000)
    );
    assert_eq!(cloud("AZ").account_name.as_deref(), Some("a"));
    assert_eq!(
        cloud("ONTAP").root_certificates.as_deref(),
        Some("/etc/ssl/ontap.pem")
    );
    assert_eq!(cloud("R2").access_key_id.as_deref(), Some("k"));
    assert_eq!(cloud("OCI").namespace.as_deref(), Some("ns"));
    // A key no provider has is an error at its path.
    let e = parse_str(
        "cloud.json5",
        r#"{ stores: { S: { experimental_cloud_object_store: { provider: "aws", bukket: "b" } } } }"#,
    )
    .unwrap_err();
    assert!(
        e.to_string()
            .contains("stores.S.experimental_cloud_object_store"),
        "{e}"
    );
}

#[test]
fn nativelink_store_server_and_origin_event_keys_parse_with_their_defaults() {
    let text = r#"{
      stores: {
        FS: { filesystem: { content_path: "/x", evict_page_cache: true } },
        FS2: { fast_slow: { fast: { memory: {} }, slow: { noop: {} }, bypass_dedup_threshold_bytes: "256MiB" } },
        G: { grpc: {
          endpoints: [{ address: "grpc://h:1", connect_timeout_s: "1m", tcp_keepalive_s: 7,
                        http2_keepalive_interval_s: "10s", http2_keepalive_timeout_s: 5 }],
          store_type: "cas", rpc_timeout_s: "5m", use_legacy_resource_names: "true",
          headers: { authorization: "Bearer t" }, forward_headers: ["x-token"],
          experimental_read_batching: { max_blob_size_bytes: "64KiB" },
          experimental_remote_cache_compression: false,
        } },
      },
      servers: [{
        listener: { http: { socket_address: "192.0.2.1:1", freebind: true } },
        services: {
          capabilities: [{ instance_name: "", remote_cache_compression: true }],
          worker_api: { scheduler: "S", disable_kill_revoked_operations: true, kill_revoked_operations_interval_s: "1m" },
        },
      }],
      experimental_origin_events: { publisher: { store: "FS" } },
    }"#;
    let cfg = parse_str("t.json5", text).unwrap_or_else(|e| panic!("{e}"));
    let StoreSpec::Filesystem(fs) = cfg.stores.get("FS").unwrap() else {
        panic!()
    };
    assert!(fs.evict_page_cache);
    let StoreSpec::FastSlow(f) = cfg.stores.get("FS2").unwrap() else {
        panic!()
    };
    assert_eq!(f.bypass_dedup_threshold_bytes.0, 256 << 20);
    let StoreSpec::Grpc(g) = cfg.stores.get("G").unwrap() else {
        panic!()
    };
    let e = &g.endpoints[0];
    assert_eq!(
        (
            e.connect_timeout_s,
            e.tcp_keepalive_s,
            e.http2_keepalive_interval_s,
            e.http2_keepalive_timeout_s
        ),
        (60, 7, 10, 5)
    );
    assert_eq!(g.rpc_timeout_s, 300);
    assert!(g.use_legacy_resource_names);
    assert_eq!(g.headers["authorization"], "Bearer t");
    assert_eq!(g.forward_headers, vec!["x-token"]);
    let b = g.experimental_read_batching.unwrap();
    assert_eq!(
        (
            b.max_blob_size_bytes.0,
            b.max_batch_bytes.0,
            b.dispatch_slots,
            b.max_queued_bytes.0
        ),
        (64 << 10, 3 << 20, 4, 32 << 20)
    );
    assert_eq!(g.experimental_remote_cache_compression, Some(false));
    let s = &cfg.servers[0];
    assert!(s.listener.http().freebind);
    let sv = s.services.as_ref().unwrap();
    assert!(sv.capabilities.as_ref().unwrap().0[0].remote_cache_compression);
    let w = sv.worker_api.as_ref().unwrap();
    assert!(w.disable_kill_revoked_operations);
    assert_eq!(w.kill_revoked_operations_interval_s, 60);
    let o = cfg.experimental_origin_events.as_ref().unwrap();
    assert_eq!((o.publisher.store.as_str(), o.queue_size()), ("FS", 65_536));

    // Unknown keys inside the new blocks are still refused by path.
    let e = parse_str(
        "t.json5",
        r#"{ experimental_origin_events: { publisher: { store: "A", topic: "x" } } }"#,
    )
    .unwrap_err();
    assert_eq!(e.where_, "experimental_origin_events.publisher.topic");
    let e = parse_str(
        "t.json5",
        r#"{ stores: { G: { grpc: { use_legacy_resource_names: "maybe" } } } }"#,
    )
    .unwrap_err();
    assert!(e.where_.ends_with("use_legacy_resource_names"), "{e}");
}

#[test]
fn grpc_zstd_follows_the_file_unless_a_store_says_otherwise() {
    let cfg = |caps: bool| {
        let text = format!(
            r#"{{
              stores: {{
                A: {{ grpc: {{ endpoints: [{{ address: "grpc://h:1" }}], store_type: "cas" }} }},
                B: {{ grpc: {{ endpoints: [{{ address: "grpc://h:1" }}], store_type: "cas",
                             experimental_remote_cache_compression: false }} }},
                C: {{ grpc: {{ endpoints: [{{ address: "grpc://h:1" }}], store_type: "ac" }} }},
                D: {{ fast_slow: {{ fast: {{ memory: {{}} }},
                  slow: {{ grpc: {{ endpoints: [{{ address: "grpc://h:1" }}] }} }} }} }},
              }},
              servers: [{{ listener: {{ http: {{ socket_address: "127.0.0.1:0" }} }},
                services: {{ capabilities: [{{ remote_cache_compression: {caps} }}] }} }}],
            }}"#
        );
        parse_str("t.json5", &text).unwrap_or_else(|e| panic!("{e}"))
    };
    let zstd = |c: &CairnConfig, name: &str| {
        let mut got = None;
        let mut spec = c.stores.get(name).unwrap().clone();
        spec.visit_grpc_mut(&mut |g| got = g.experimental_remote_cache_compression);
        got
    };
    let on = cfg(true);
    assert_eq!(zstd(&on, "A"), Some(true));
    assert_eq!(zstd(&on, "B"), Some(false));
    assert_eq!(zstd(&on, "C"), None, "an action cache store moves no blobs");
    assert_eq!(zstd(&on, "D"), Some(true), "nested stores too");
    let off = cfg(false);
    assert_eq!(zstd(&off, "A"), None);
}

#[test]
fn scheduler_backend_is_memory_or_a_named_redis_store() {
    use crate::schedulers::{RedisSchedulerBackend, SchedulerBackend};
    let backend = |b: &str| {
        let text =
            format!("{{ schedulers: {{ main: {{ simple: {{ experimental_backend: {b} }} }} }} }}");
        parse_str("t.json5", &text).map(|c| simple(&c).experimental_backend.clone())
    };
    assert_eq!(
        backend(r#""memory""#).unwrap(),
        Some(SchedulerBackend::Memory)
    );
    assert_eq!(
        backend(r#"{ redis: { redis_store: "STATE" } }"#).unwrap(),
        Some(SchedulerBackend::Redis(RedisSchedulerBackend {
            redis_store: "STATE".into()
        }))
    );
    let e = backend(r#"{ redis: { redis_store: "STATE", db: 1 } }"#).unwrap_err();
    assert!(
        e.to_string()
            .contains("schedulers.main.simple.experimental_backend.redis"),
        "{e}"
    );
    assert!(backend(r#""mongo""#).is_err());
}
