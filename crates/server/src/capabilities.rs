//! Capabilities: what each instance serves, derived from the config (cache capabilities when
//! the instance has a CAS or AC, update_enabled when its AC is writable, execution only when
//! an execution service is configured).

use std::sync::Arc;

use cairn_core::proto::build::bazel::remote::execution::v2 as re;
use cairn_core::proto::build::bazel::semver::SemVer;
use cairn_core::DigestFunction;
use re::capabilities_server::Capabilities;
use tonic::{Request, Response, Status};

use crate::metrics::Metrics;
use crate::Limits;

/// What one instance name serves.
#[derive(Clone, Default)]
pub struct InstanceCaps {
    pub cas: bool,
    pub ac: bool,
    pub ac_writable: bool,
    pub execution: bool,
    /// Average chunk size when the CAS serves content-defined chunking.
    pub chunking_avg: Option<u64>,
    /// The scheduler of `remote_execution`, whose platform properties are reported.
    pub scheduler: Option<crate::execution::ExecutionPipeline>,
    /// zstd is advertised (`remote_cache_compression`).
    pub zstd: bool,
}

pub struct CapabilitiesService {
    instances: crate::instances::Instances<InstanceCaps>,
    limits: Limits,
    metrics: Arc<Metrics>,
}

impl CapabilitiesService {
    pub fn new(
        instances: crate::instances::Instances<InstanceCaps>,
        limits: Limits,
        metrics: Arc<Metrics>,
    ) -> CapabilitiesService {
        CapabilitiesService {
            instances,
            limits,
            metrics,
        }
    }
}

fn semver(major: i32, minor: i32) -> Option<SemVer> {
    Some(SemVer {
        major,
        minor,
        patch: 0,
        prerelease: String::new(),
    })
}

#[tonic::async_trait]
impl Capabilities for CapabilitiesService {
    async fn get_capabilities(
        &self,
        request: Request<re::GetCapabilitiesRequest>,
    ) -> Result<Response<re::ServerCapabilities>, Status> {
        let timer = self.metrics.rpc("capabilities", "GetCapabilities");
        let instance = request.get_ref().instance_name.clone();
        let node_properties = match self
            .instances
            .get(&instance)
            .ok()
            .and_then(|c| c.scheduler.as_ref())
        {
            Some(p) => match p.node_properties(&instance).await {
                Ok(props) => props,
                Err(e) => {
                    // A `grpc` scheduler whose remote does not answer: the rest still holds.
                    tracing::warn!(scheduler = %p.name, error = %e, "GetCapabilities: no platform properties from the scheduler");
                    vec![]
                }
            },
            None => vec![],
        };
        let r = self
            .instances
            .get(&instance)
            .map_err(Status::from)
            .map(|caps| {
                let digest_functions: Vec<i32> =
                    DigestFunction::ALL.iter().map(|f| f.to_proto()).collect();
                let zstd = if caps.zstd {
                    vec![re::compressor::Value::Zstd as i32]
                } else {
                    vec![]
                };
                let cache = (caps.cas || caps.ac).then(|| re::CacheCapabilities {
                    digest_functions: digest_functions.clone(),
                    action_cache_update_capabilities: Some(re::ActionCacheUpdateCapabilities {
                        update_enabled: caps.ac_writable,
                    }),
                    cache_priority_capabilities: Some(re::PriorityCapabilities {
                        priorities: vec![re::priority_capabilities::PriorityRange {
                            min_priority: 0,
                            max_priority: 0,
                        }],
                    }),
                    max_batch_total_size_bytes: self.limits.max_batch_total_size_bytes as i64,
                    symlink_absolute_path_strategy:
                        re::symlink_absolute_path_strategy::Value::Allowed as i32,
                    supported_compressors: zstd.clone(),
                    supported_batch_update_compressors: zstd,
                    max_cas_blob_size_bytes: 0,
                    split_blob_support: caps.chunking_avg.is_some(),
                    splice_blob_support: caps.chunking_avg.is_some(),
                    fast_cdc_2020_params: caps.chunking_avg.map(|avg| re::FastCdc2020Params {
                        avg_chunk_size_bytes: avg,
                        seed: 0,
                    }),
                    ..Default::default()
                });
                let execution = caps.execution.then(|| re::ExecutionCapabilities {
                    digest_function: DigestFunction::default_for_64_hex().to_proto(),
                    exec_enabled: true,
                    execution_priority_capabilities: None,
                    supported_node_properties: node_properties,
                    digest_functions,
                });
                Response::new(re::ServerCapabilities {
                    cache_capabilities: cache,
                    execution_capabilities: execution,
                    deprecated_api_version: None,
                    low_api_version: semver(2, 0),
                    high_api_version: semver(2, 3),
                })
            });
        timer.finish(&r);
        r
    }
}
