//! Whole request messages, as a client sends them, fed to the CAS and AC service handlers over
//! a bounded memory store: every call returns a response or a status, never a panic, and the
//! store stays within its bound.
#![no_main]
use std::sync::{Arc, OnceLock};

use arbitrary::Arbitrary;
use cairn_config::stores::{EvictionPolicy, MemoryStore as MemoryConfig};
use cairn_core::proto::build::bazel::remote::execution::v2 as re;
use cairn_server::ac::{AcInstance, AcService};
use cairn_server::cas::CasService;
use cairn_server::instances::Instances;
use cairn_server::{Limits, Metrics};
use cairn_store::{memory::MemoryStore, StoreRef};
use futures::StreamExt;
use libfuzzer_sys::fuzz_target;
use prost::Message;
use re::action_cache_server::ActionCache;
use re::content_addressable_storage_server::ContentAddressableStorage;
use tonic::Request;

struct Env {
    runtime: tokio::runtime::Runtime,
    cas: CasService,
    ac: AcService,
    store: StoreRef,
}

const STORE_BYTES: u64 = 16 << 20;

fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| {
        let store: StoreRef = Arc::new(MemoryStore::new(&MemoryConfig {
            eviction_policy: Some(EvictionPolicy {
                max_bytes: cairn_config::ByteSize(STORE_BYTES),
                ..Default::default()
            }),
        }));
        let metrics = Metrics::with_prefix("fuzz");
        let mut cas = Instances::new("ContentAddressableStorage");
        cas.insert(String::new(), store.clone());
        let mut ac = Instances::new("ActionCache");
        ac.insert(
            String::new(),
            AcInstance {
                store: store.clone(),
                read_only: false,
            },
        );
        Env {
            runtime: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
            // zstd on (`remote_cache_compression`), so that compressed entries are decoded.
            cas: CasService::new(cas, Limits::default(), metrics.clone())
                .with_zstd(std::sync::Arc::new([String::new()].into())),
            ac: AcService::new(ac, metrics),
            store,
        }
    })
}

#[derive(Arbitrary, Debug)]
enum Call {
    FindMissingBlobs(Vec<u8>),
    BatchUpdateBlobs(Vec<u8>),
    BatchReadBlobs(Vec<u8>),
    GetTree(Vec<u8>),
    GetActionResult(Vec<u8>),
    UpdateActionResult(Vec<u8>),
}

fuzz_target!(|calls: Vec<Call>| {
    let env = env();
    env.runtime.block_on(async {
        for call in calls {
            match call {
                Call::FindMissingBlobs(b) => {
                    if let Ok(r) = re::FindMissingBlobsRequest::decode(&b[..]) {
                        let _ = env.cas.find_missing_blobs(Request::new(r)).await;
                    }
                }
                Call::BatchUpdateBlobs(b) => {
                    if let Ok(r) = re::BatchUpdateBlobsRequest::decode(&b[..]) {
                        let _ = env.cas.batch_update_blobs(Request::new(r)).await;
                    }
                }
                Call::BatchReadBlobs(b) => {
                    if let Ok(r) = re::BatchReadBlobsRequest::decode(&b[..]) {
                        let _ = env.cas.batch_read_blobs(Request::new(r)).await;
                    }
                }
                Call::GetTree(b) => {
                    if let Ok(r) = re::GetTreeRequest::decode(&b[..]) {
                        if let Ok(s) = env.cas.get_tree(Request::new(r)).await {
                            let mut s = s.into_inner();
                            let mut pages = 0;
                            while let Some(_page) = s.next().await {
                                pages += 1;
                                if pages > 8 {
                                    break;
                                }
                            }
                        }
                    }
                }
                Call::GetActionResult(b) => {
                    if let Ok(r) = re::GetActionResultRequest::decode(&b[..]) {
                        let _ = env.ac.get_action_result(Request::new(r)).await;
                    }
                }
                Call::UpdateActionResult(b) => {
                    if let Ok(r) = re::UpdateActionResultRequest::decode(&b[..]) {
                        let _ = env.ac.update_action_result(Request::new(r)).await;
                    }
                }
            }
        }
    });
    let size = env.store.info().size_bytes.unwrap_or(0);
    assert!(size <= STORE_BYTES, "memory store holds {size} bytes");
});
