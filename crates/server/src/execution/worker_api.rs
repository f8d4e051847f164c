//! The worker API service (`cairn.worker.v1.WorkerApi/Session`): a worker registers, keeps
//! alive, receives StartAction / KillAction and answers each action with ActionDone. Served
//! on its own listener; never on the public one in shipped configs. [`open_session`] is the
//! same session without gRPC, for a local worker in the scheduler's own process: the same
//! messages through in-memory streams, without two HTTP/2 hops per action.

use cairn_core::proto::build::bazel::remote::execution::v2 as re;
use cairn_proto::worker::v1 as wapi;
use cairn_scheduler::{ErrorCode, SchedError};
use futures::stream::BoxStream;
use futures::StreamExt;
use prost::Message;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status, Streaming};

use super::driver::STREAM_DEPTH;
use super::ExecutionPipeline;

pub struct WorkerApiService {
    pipeline: ExecutionPipeline,
}

impl WorkerApiService {
    pub fn new(pipeline: ExecutionPipeline) -> Self {
        WorkerApiService { pipeline }
    }
}

fn error_code(code: i32) -> ErrorCode {
    match tonic::Code::from_i32(code) {
        tonic::Code::InvalidArgument => ErrorCode::InvalidArgument,
        tonic::Code::NotFound => ErrorCode::NotFound,
        tonic::Code::FailedPrecondition => ErrorCode::FailedPrecondition,
        tonic::Code::ResourceExhausted => ErrorCode::ResourceExhausted,
        tonic::Code::Cancelled => ErrorCode::Cancelled,
        tonic::Code::DeadlineExceeded => ErrorCode::DeadlineExceeded,
        tonic::Code::Unavailable => ErrorCode::Unavailable,
        _ => ErrorCode::Internal,
    }
}

/// What a worker receives.
pub type SchedulerStream = BoxStream<'static, Result<wapi::SchedulerMessage, Status>>;

#[tonic::async_trait]
impl wapi::worker_api_server::WorkerApi for WorkerApiService {
    type SessionStream = SchedulerStream;

    async fn session(
        &self,
        request: Request<Streaming<wapi::WorkerMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        open_session(self.pipeline.clone(), request.into_inner().boxed())
            .await
            .map(Response::new)
    }
}

/// Runs one worker session on `pipeline`: `inbound` is what the worker sends (Register
/// first); the returned stream is what it receives. The worker is registered when this
/// returns, and is gone when `inbound` ends or fails.
pub async fn open_session(
    pipeline: ExecutionPipeline,
    mut inbound: BoxStream<'static, Result<wapi::WorkerMessage, Status>>,
) -> Result<SchedulerStream, Status> {
    let register = match inbound.next().await.transpose()? {
        Some(wapi::WorkerMessage {
            message: Some(wapi::worker_message::Message::Register(r)),
        }) => r,
        _ => {
            return Err(Status::invalid_argument(
                "worker session: the first message must be Register",
            ))
        }
    };
    if register.slots == 0 {
        return Err(Status::invalid_argument(
            "worker session: Register.slots must be at least 1",
        ));
    }
    let worker_id = format!(
        "{}-{}",
        if register.name.is_empty() {
            "worker"
        } else {
            &register.name
        },
        &uuid::Uuid::new_v4().to_string()[..8]
    );
    let (tx, rx) = mpsc::channel(STREAM_DEPTH);
    let props = register
        .properties
        .into_iter()
        .map(|p| (p.name, p.value))
        .collect();
    let Some(handle) = pipeline.local().cloned() else {
        return Err(Status::failed_precondition(format!(
            "scheduler {:?} forwards to another scheduler; connect workers to that one",
            pipeline.name
        )));
    };
    let registered = wapi::SchedulerMessage {
        message: Some(wapi::scheduler_message::Message::Registered(
            wapi::Registered {
                worker_id: worker_id.clone(),
                keepalive_interval_ms: handle.keepalive_interval.as_millis() as u64,
            },
        )),
    };
    tx.send(Ok(registered))
        .await
        .map_err(|_| Status::internal("worker stream closed"))?;
    handle
        .worker_connect(worker_id.clone(), props, register.slots, tx)
        .await?;
    tracing::info!(worker = %worker_id, slots = register.slots, "worker connected");

    tokio::spawn(async move {
        while let Some(Ok(m)) = inbound.next().await {
            match m.message {
                Some(wapi::worker_message::Message::Keepalive(_)) => {
                    handle.worker_keepalive(worker_id.clone()).await
                }
                Some(wapi::worker_message::Message::ActionDone(d)) => {
                    let Ok(attempt) = d.action_id.parse::<u64>() else {
                        continue;
                    };
                    let outcome = if d.error_code != 0 {
                        Err(SchedError::new(error_code(d.error_code), d.error_message))
                    } else {
                        re::ExecuteResponse::decode(d.execute_response.as_slice()).map_err(|e| {
                            SchedError::new(
                                ErrorCode::Internal,
                                format!("worker sent an undecodable ExecuteResponse: {e}"),
                            )
                        })
                    };
                    // An answer is a sign of life too: the driver counts it as a keepalive.
                    handle
                        .worker_done(worker_id.clone(), attempt, outcome)
                        .await;
                }
                _ => {}
            }
        }
        tracing::info!(worker = %worker_id, "worker disconnected");
        handle.worker_gone(worker_id);
    });
    let out = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
    Ok(Box::pin(out))
}
