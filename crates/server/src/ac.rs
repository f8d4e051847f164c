//! ActionCache: GetActionResult and UpdateActionResult. What "found" means (for example that
//! every output is still in the CAS) is the store tree's business: see the
//! `completeness_checking` store.

use std::sync::Arc;

use cairn_core::proto::build::bazel::remote::execution::v2 as re;
use cairn_core::{Digest, Error};
use cairn_store::{StoreExt, StoreRef};
use prost::Message;
use re::action_cache_server::ActionCache;
use tonic::{Request, Response, Status};

use crate::instances::Instances;
use crate::metrics::Metrics;

/// Largest ActionResult accepted or returned.
const MAX_ACTION_RESULT: usize = 16 << 20;

#[derive(Clone)]
pub struct AcInstance {
    pub store: StoreRef,
    pub read_only: bool,
}

pub struct AcService {
    instances: Instances<AcInstance>,
    metrics: Arc<Metrics>,
}

impl AcService {
    pub fn new(instances: Instances<AcInstance>, metrics: Arc<Metrics>) -> AcService {
        AcService { instances, metrics }
    }
}

#[tonic::async_trait]
impl ActionCache for AcService {
    async fn get_action_result(
        &self,
        request: Request<re::GetActionResultRequest>,
    ) -> Result<Response<re::ActionResult>, Status> {
        let timer = self.metrics.rpc("ac", "GetActionResult");
        // The invocation asking, for the web UI's record of its cache hits and misses.
        let invocation = crate::web_ui::activity::get()
            .map(|_| crate::execution::service::request_metadata(&request).tool_invocation_id);
        let r = async {
            let req = request.into_inner();
            let inst = self.instances.get(&req.instance_name)?;
            let wire = req.action_digest.as_ref().ok_or_else(|| {
                Error::invalid_argument("GetActionResult: action_digest is missing")
            })?;
            let key = Digest::from_proto(req.digest_function, wire)?;
            crate::otlp::traces::record_request(&req.instance_name, Some(&key));
            let data = inst.store.get_all(&key, MAX_ACTION_RESULT).await;
            if let Some(invocation) = &invocation {
                crate::web_ui::activity::lookup(invocation, &req.instance_name, key, data.is_ok());
            }
            let data = data.map_err(|e| {
                if e.is_not_found() {
                    Error::not_found(format!("no action result for {key}: {}", e.message))
                } else {
                    e
                }
            })?;
            let result = re::ActionResult::decode(data.as_ref()).map_err(|e| {
                Error::data_loss(format!(
                    "stored action result for {key} does not decode: {e}"
                ))
            })?;
            Ok(Response::new(result))
        }
        .await
        .map_err(|e: Error| Status::from(e));
        // NOT_FOUND is GetActionResult's cache-miss answer, not a failure: it is counted as a
        // request but not as an error, so that error-rate alerts do not fire on cold builds.
        match &r {
            Err(st) if st.code() == tonic::Code::NotFound => timer.finish_cache_miss(st),
            _ => timer.finish(&r),
        }
        r
    }

    async fn update_action_result(
        &self,
        request: Request<re::UpdateActionResultRequest>,
    ) -> Result<Response<re::ActionResult>, Status> {
        let timer = self.metrics.rpc("ac", "UpdateActionResult");
        let r = async {
            let req = request.into_inner();
            let inst = self.instances.get(&req.instance_name)?;
            if inst.read_only {
                return Err(Error::new(
                    cairn_core::Code::PermissionDenied,
                    format!("the action cache of instance {:?} is read-only", req.instance_name),
                ));
            }
            let wire = req
                .action_digest
                .as_ref()
                .ok_or_else(|| Error::invalid_argument("UpdateActionResult: action_digest is missing"))?;
            let key = Digest::from_proto(req.digest_function, wire)?;
            crate::otlp::traces::record_request(&req.instance_name, Some(&key));
            let result = req
                .action_result
                .ok_or_else(|| Error::invalid_argument("UpdateActionResult: action_result is missing"))?;
            for f in &result.output_files {
                if let Some(d) = &f.digest {
                    Digest::from_proto_with(key.function(), d)
                        .map_err(|e| e.context(format!("output file {:?}", f.path)))?;
                }
            }
            let bytes = result.encode_to_vec();
            if bytes.len() > MAX_ACTION_RESULT {
                return Err(Error::resource_exhausted(format!(
                    "action result for {key} is {} bytes, more than the {MAX_ACTION_RESULT} this server stores",
                    bytes.len()
                )));
            }
            inst.store.put_bytes(&key, bytes.into()).await?;
            Ok(Response::new(result))
        }
        .await
        .map_err(|e: Error| Status::from(e));
        timer.finish(&r);
        r
    }
}
