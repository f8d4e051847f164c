//! The Execution service: `Execute` (action-cache check, then queue or merge, streaming
//! `Operation`s through QUEUED, EXECUTING and COMPLETED) and `WaitExecution`.

use std::sync::Arc;
use std::time::Duration;

use cairn_core::proto::build::bazel::remote::execution::v2 as re;
use cairn_core::proto::google::longrunning::{operation, Operation};
use cairn_core::proto::google::protobuf::Any;
use cairn_core::{Digest, Error};
use cairn_scheduler::{ActionKey, ActionRequest, OperationStatus};
use cairn_store::{StoreExt, StoreRef};
use futures::stream::BoxStream;
use futures::StreamExt;
use prost::Message;
use re::execution_server::Execution;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};

use super::driver::{unix_ms_now, ActionPayload, OpUpdate, STREAM_DEPTH};
use super::{Backend, ExecutionPipeline, SchedulerHandle};
use crate::instances::Instances;
use crate::metrics::Metrics;

/// Largest Action or Command this service reads.
const MAX_PROTO: usize = 16 << 20;

#[derive(Clone)]
pub struct ExecutionInstance {
    pub cas: StoreRef,
    pub pipeline: ExecutionPipeline,
}

pub struct ExecutionService {
    instances: Instances<ExecutionInstance>,
    metrics: Arc<Metrics>,
}

type OpStream = BoxStream<'static, Result<Operation, Status>>;

impl ExecutionService {
    pub fn new(instances: Instances<ExecutionInstance>, metrics: Arc<Metrics>) -> Self {
        ExecutionService { instances, metrics }
    }
}

fn pack<M: Message>(type_name: &str, m: &M) -> Any {
    Any {
        type_url: format!("type.googleapis.com/{type_name}"),
        value: m.encode_to_vec(),
    }
}

fn stage_of<R>(s: &OperationStatus<R>) -> re::execution_stage::Value {
    match s {
        OperationStatus::Queued => re::execution_stage::Value::Queued,
        OperationStatus::Executing => re::execution_stage::Value::Executing,
        OperationStatus::Completed(_) => re::execution_stage::Value::Completed,
    }
}

/// An `Operation` message for an update.
pub fn operation_of(u: &OpUpdate) -> Operation {
    let metadata = re::ExecuteOperationMetadata {
        stage: stage_of(&u.status) as i32,
        action_digest: Some(u.action_digest.to_proto()),
        digest_function: u.action_digest.function().to_proto(),
        ..Default::default()
    };
    let (done, result) = match &u.status {
        OperationStatus::Completed(outcome) => {
            let response = match outcome {
                Ok(r) => r.clone(),
                Err(e) => re::ExecuteResponse {
                    status: Some(cairn_core::proto::google::rpc::Status {
                        code: Error::new(code_of(e.code), String::new()).code.rpc_code(),
                        message: e.message.clone(),
                        details: vec![],
                    }),
                    ..Default::default()
                },
            };
            (
                true,
                Some(operation::Result::Response(pack(
                    "build.bazel.remote.execution.v2.ExecuteResponse",
                    &response,
                ))),
            )
        }
        _ => (false, None),
    };
    Operation {
        name: u.op_id.clone(),
        metadata: Some(pack(
            "build.bazel.remote.execution.v2.ExecuteOperationMetadata",
            &metadata,
        )),
        done,
        result,
    }
}

pub fn code_of(c: cairn_scheduler::ErrorCode) -> cairn_core::Code {
    use cairn_core::Code;
    use cairn_scheduler::ErrorCode as E;
    match c {
        E::InvalidArgument => Code::InvalidArgument,
        E::NotFound => Code::NotFound,
        E::AlreadyExists => Code::AlreadyExists,
        E::FailedPrecondition => Code::FailedPrecondition,
        E::ResourceExhausted => Code::ResourceExhausted,
        E::OutOfRange => Code::OutOfRange,
        E::Unavailable => Code::Unavailable,
        E::Internal => Code::Internal,
        E::Unimplemented => Code::Unimplemented,
        E::Cancelled => Code::Cancelled,
        E::DeadlineExceeded => Code::DeadlineExceeded,
        E::Aborted => Code::Aborted,
        E::PermissionDenied => Code::PermissionDenied,
        E::DataLoss => Code::DataLoss,
    }
}

/// FAILED_PRECONDITION with a PreconditionFailure listing the missing blobs.
fn missing(digests: &[Digest], what: &str) -> Status {
    let detail = cairn_core::precondition::missing_blobs_detail(digests);
    let message = format!(
        "{what} is not in the CAS: {}",
        digests
            .iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let st = cairn_core::proto::google::rpc::Status {
        code: tonic::Code::FailedPrecondition as i32,
        message: message.clone(),
        details: vec![detail],
    };
    Status::with_details(
        tonic::Code::FailedPrecondition,
        message,
        st.encode_to_vec().into(),
    )
}

/// The request's `RequestMetadata` header (Bazel's invocation id, target and mnemonic), or
/// an empty one.
pub(crate) fn request_metadata<T>(req: &Request<T>) -> re::RequestMetadata {
    req.metadata()
        .get_bin("build.bazel.remote.execution.v2.requestmetadata-bin")
        .and_then(|v| v.to_bytes().ok())
        .and_then(|b| re::RequestMetadata::decode(b.as_ref()).ok())
        .unwrap_or_default()
}

/// Streams a watcher's updates as Operations, ending after the completed one; tells the
/// driver when the client goes away.
fn watch_stream(
    handle: SchedulerHandle,
    op_id: String,
    watcher_no: u64,
    first: Option<OpUpdate>,
    rx: mpsc::Receiver<OpUpdate>,
) -> OpStream {
    struct Guard {
        handle: SchedulerHandle,
        op_id: String,
        no: u64,
    }
    impl Drop for Guard {
        fn drop(&mut self) {
            self.handle.detach(self.op_id.clone(), self.no);
        }
    }
    let guard = Guard {
        handle,
        op_id,
        no: watcher_no,
    };
    let updates = futures::stream::iter(first)
        .chain(futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|u| (u, rx))
        }));
    let mut finished = false;
    updates
        .take_while(move |u| {
            let was = finished;
            finished = matches!(u.status, OperationStatus::Completed(_));
            futures::future::ready(!was)
        })
        .map(move |u| {
            let _keep = &guard;
            Ok(operation_of(&u))
        })
        .boxed()
}

/// Operations of an operation followed in the shared state.
fn shared_stream(updates: super::shared::UpdateStream) -> OpStream {
    updates.map(|u| u.map(|u| operation_of(&u))).boxed()
}

#[tonic::async_trait]
impl Execution for ExecutionService {
    type ExecuteStream = OpStream;

    async fn execute(
        &self,
        request: Request<re::ExecuteRequest>,
    ) -> Result<Response<OpStream>, Status> {
        let timer = self.metrics.rpc("execution", "Execute");
        let r = self.execute_inner(request).await;
        timer.finish(&r);
        r.map(Response::new)
    }

    type WaitExecutionStream = OpStream;

    async fn wait_execution(
        &self,
        request: Request<re::WaitExecutionRequest>,
    ) -> Result<Response<OpStream>, Status> {
        let timer = self.metrics.rpc("execution", "WaitExecution");
        let headers = request.metadata().clone();
        let name = request.into_inner().name;
        let mut result = Err(Status::not_found(format!(
            "operation {name:?} does not exist (or has expired)"
        )));
        // Local schedulers first (an attach is a channel message), then remote ones.
        let mut remotes = Vec::new();
        for inst in self.instances.values() {
            let handle = match &inst.pipeline.backend {
                Backend::Local(h) => h,
                Backend::Shared(s) => match s.follow(name.clone()).await {
                    Ok(updates) => {
                        let stream = shared_stream(updates);
                        result = Ok(crate::web_ui::activity::forwarded(None, stream));
                        break;
                    }
                    Err(e) if e.is_not_found() => continue,
                    Err(e) => {
                        result = Err(e.into());
                        break;
                    }
                },
                Backend::Remote(r) => {
                    if !remotes.iter().any(|x| Arc::ptr_eq(x, r)) {
                        remotes.push(r.clone());
                    }
                    continue;
                }
            };
            let (tx, rx) = mpsc::channel(STREAM_DEPTH);
            match handle.attach(name.clone(), tx).await {
                Ok((no, snap)) => {
                    result = Ok(watch_stream(
                        handle.clone(),
                        name.clone(),
                        no,
                        Some(snap),
                        rx,
                    ));
                    break;
                }
                Err(e) if e.is_not_found() => continue,
                Err(e) => {
                    result = Err(e.into());
                    break;
                }
            }
        }
        if matches!(&result, Err(s) if s.code() == tonic::Code::NotFound) {
            for r in remotes {
                match r.wait_execution(&name, &headers).await {
                    Err(s) if s.code() == tonic::Code::NotFound => continue,
                    other => {
                        result = other.map(|s| crate::web_ui::activity::forwarded(None, s));
                        break;
                    }
                }
            }
        }
        timer.finish(&result);
        result.map(Response::new)
    }
}

impl ExecutionService {
    async fn execute_inner(
        &self,
        request: Request<re::ExecuteRequest>,
    ) -> Result<OpStream, Status> {
        let metadata = request_metadata(&request);
        let headers = request.metadata().clone();
        let req = request.into_inner();
        let inst = self.instances.get(&req.instance_name)?.clone();
        let wire = req
            .action_digest
            .as_ref()
            .ok_or_else(|| Error::invalid_argument("Execute: action_digest is missing"))?;
        let digest = Digest::from_proto(req.digest_function, wire)?;
        crate::otlp::traces::record_request(&req.instance_name, Some(&digest));
        let priority = req.execution_policy.as_ref().map_or(0, |p| p.priority);

        // The Action (and, for clients that put the platform there, the Command).
        let action_bytes = match inst.cas.get_all(&digest, MAX_PROTO).await {
            Ok(b) => b,
            Err(e) if e.is_not_found() => return Err(missing(&[digest], "the Action")),
            Err(e) => return Err(e.into()),
        };
        let action = re::Action::decode(action_bytes.as_ref()).map_err(|e| {
            Error::invalid_argument(format!("Execute: {digest} is not an Action: {e}"))
        })?;
        let mut platform: Vec<(String, String)> = action
            .platform
            .as_ref()
            .map(|p| {
                p.properties
                    .iter()
                    .map(|p| (p.name.clone(), p.value.clone()))
                    .collect()
            })
            .unwrap_or_default();
        let cmd_digest = action
            .command_digest
            .as_ref()
            .ok_or_else(|| {
                Error::invalid_argument(format!("Execute: Action {digest} has no command_digest"))
            })
            .and_then(|d| Digest::from_proto_with(digest.function(), d))?;
        if platform.is_empty() {
            let cmd_bytes = match inst.cas.get_all(&cmd_digest, MAX_PROTO).await {
                Ok(b) => b,
                Err(e) if e.is_not_found() => return Err(missing(&[cmd_digest], "the Command")),
                Err(e) => return Err(e.into()),
            };
            let cmd = re::Command::decode(cmd_bytes.as_ref()).map_err(|e| {
                Error::invalid_argument(format!("Execute: {cmd_digest} is not a Command: {e}"))
            })?;
            #[allow(deprecated)]
            let cmd_platform = cmd.platform;
            platform = cmd_platform
                .map(|p| {
                    p.properties
                        .into_iter()
                        .map(|p| (p.name, p.value))
                        .collect()
                })
                .unwrap_or_default();
        }
        // REAPI keeps `do_not_cache` on the Action (ResultsCachePolicy only has a priority).
        let cacheable = !action.do_not_cache;

        // The action cache, unless told to skip it.
        if let (Some(ac), false, true) = (&inst.pipeline.ac, req.skip_cache_lookup, cacheable) {
            match ac.get_all(&digest, MAX_PROTO).await {
                Ok(bytes) => {
                    if let Ok(result) = re::ActionResult::decode(bytes.as_ref()) {
                        let update = OpUpdate {
                            op_id: format!("operations/{}", uuid::Uuid::new_v4()),
                            action_digest: digest,
                            status: OperationStatus::Completed(Ok(re::ExecuteResponse {
                                result: Some(result),
                                cached_result: true,
                                status: Some(Default::default()),
                                ..Default::default()
                            })),
                        };
                        self.metrics.execution_completed("cache_hit");
                        crate::web_ui::activity::cache_hit(
                            &metadata.tool_invocation_id,
                            &req.instance_name,
                            digest,
                        );
                        return Ok(
                            futures::stream::once(async move { Ok(operation_of(&update)) }).boxed(),
                        );
                    }
                }
                Err(e) if e.is_not_found() => {}
                Err(e) => {
                    tracing::warn!(digest = %digest, error = %e, "action cache lookup failed; executing")
                }
            }
        }

        let op_id = format!("operations/{}", uuid::Uuid::new_v4());
        let timeout = action.timeout.as_ref().map(|t| {
            Duration::from_secs(t.seconds.max(0) as u64)
                + Duration::from_nanos(t.nanos.max(0) as u64)
        });
        let platform =
            inst.pipeline
                .modify(platform, &metadata.target_id, &metadata.action_mnemonic);
        let request = ActionRequest {
            key: ActionKey(format!("{}/{}", req.instance_name, digest)),
            cacheable,
            priority,
            platform: platform.clone(),
            invocation_id: metadata.tool_invocation_id,
            payload: ActionPayload {
                instance: req.instance_name.clone(),
                digest,
                skip_cache_write: !cacheable,
                timeout,
                queued_at_unix_ms: unix_ms_now(),
                platform,
                trace_context: cairn_core::trace_context::inject(&tracing::Span::current()),
            },
        };
        let handle = match &inst.pipeline.backend {
            Backend::Local(h) => h,
            // `grpc`: checked here (the Action exists, the action cache has no result), queued
            // there.
            Backend::Remote(r) => {
                let execute = (
                    request.invocation_id.clone(),
                    req.instance_name.clone(),
                    digest,
                );
                let stream = r.execute(req, &headers).await?;
                return Ok(crate::web_ui::activity::forwarded(Some(execute), stream));
            }
            Backend::Shared(s) => {
                let execute = (
                    request.invocation_id.clone(),
                    req.instance_name.clone(),
                    digest,
                );
                let followed = s.submit(op_id, &request).await?;
                let stream = shared_stream(s.follow(followed).await?);
                // Recorded from the stream: the replica whose worker runs it may be another.
                return Ok(crate::web_ui::activity::forwarded(Some(execute), stream));
            }
        };
        // Recorded before the scheduler has it, so that its end cannot come first.
        crate::web_ui::activity::queued(&request.invocation_id, &req.instance_name, digest, &op_id);
        let (tx, rx) = mpsc::channel(STREAM_DEPTH);
        let no = match handle.add(op_id.clone(), digest, request, tx).await {
            Ok(no) => no,
            Err(e) => {
                crate::web_ui::activity::refused(&op_id, &e.to_string());
                return Err(e.into());
            }
        };
        Ok(watch_stream(handle.clone(), op_id, no, None, rx))
    }
}
