//! `google.longrunning.Operations` over every scheduler of this process: GetOperation,
//! ListOperations, CancelOperation (the running command is killed unless other clients still
//! wait on the merged action), DeleteOperation (of a completed one) and WaitOperation.

use std::sync::Arc;
use std::time::Duration;

use cairn_core::proto::google::longrunning::operations_server::Operations;
use cairn_core::proto::google::longrunning::{
    CancelOperationRequest, DeleteOperationRequest, GetOperationRequest, ListOperationsRequest,
    ListOperationsResponse, Operation, WaitOperationRequest,
};
use cairn_core::proto::google::protobuf::Empty;
use cairn_core::Error;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};

use super::driver::STREAM_DEPTH;
use super::service::operation_of;
use super::ExecutionPipeline;
use crate::metrics::Metrics;

pub struct OperationsService {
    pipelines: Vec<ExecutionPipeline>,
    metrics: Arc<Metrics>,
}

impl OperationsService {
    pub fn new(pipelines: Vec<ExecutionPipeline>, metrics: Arc<Metrics>) -> Self {
        OperationsService { pipelines, metrics }
    }
}

fn not_found(name: &str) -> Error {
    Error::not_found(format!(
        "operation {name:?} does not exist (or has expired)"
    ))
}

#[tonic::async_trait]
impl Operations for OperationsService {
    async fn list_operations(
        &self,
        _request: Request<ListOperationsRequest>,
    ) -> Result<Response<ListOperationsResponse>, Status> {
        let timer = self.metrics.rpc("operations", "ListOperations");
        let mut operations = Vec::new();
        for p in &self.pipelines {
            for u in p.handle.list().await? {
                operations.push(operation_of(&u));
            }
        }
        let r = Ok(Response::new(ListOperationsResponse {
            operations,
            next_page_token: String::new(),
            unreachable: vec![],
        }));
        timer.finish(&r);
        r
    }

    async fn get_operation(
        &self,
        request: Request<GetOperationRequest>,
    ) -> Result<Response<Operation>, Status> {
        let timer = self.metrics.rpc("operations", "GetOperation");
        let name = request.into_inner().name;
        let mut r = Err(not_found(&name).into());
        for p in &self.pipelines {
            if let Some(u) = p.handle.get(name.clone()).await? {
                r = Ok(Response::new(operation_of(&u)));
                break;
            }
        }
        timer.finish(&r);
        r
    }

    async fn delete_operation(
        &self,
        request: Request<DeleteOperationRequest>,
    ) -> Result<Response<Empty>, Status> {
        let timer = self.metrics.rpc("operations", "DeleteOperation");
        let name = request.into_inner().name;
        let r = self
            .first(&name, |p, n| async move { p.handle.delete(n).await })
            .await;
        timer.finish(&r);
        r.map(|()| Response::new(Empty {}))
    }

    async fn cancel_operation(
        &self,
        request: Request<CancelOperationRequest>,
    ) -> Result<Response<Empty>, Status> {
        let timer = self.metrics.rpc("operations", "CancelOperation");
        let name = request.into_inner().name;
        let r = self
            .first(&name, |p, n| async move { p.handle.cancel(n).await })
            .await;
        timer.finish(&r);
        r.map(|()| Response::new(Empty {}))
    }

    async fn wait_operation(
        &self,
        request: Request<WaitOperationRequest>,
    ) -> Result<Response<Operation>, Status> {
        let timer = self.metrics.rpc("operations", "WaitOperation");
        let req = request.into_inner();
        let timeout = req
            .timeout
            .map_or(Duration::from_secs(60), |t| {
                Duration::from_secs(t.seconds.max(0) as u64)
            })
            .min(Duration::from_secs(600));
        let mut r = Err(not_found(&req.name).into());
        for p in &self.pipelines {
            let (tx, mut rx) = mpsc::channel(STREAM_DEPTH);
            match p.handle.attach(req.name.clone(), tx).await {
                Ok((no, mut last)) => {
                    let deadline = tokio::time::sleep(timeout);
                    tokio::pin!(deadline);
                    while !matches!(last.status, cairn_scheduler::OperationStatus::Completed(_)) {
                        tokio::select! {
                            u = rx.recv() => match u { Some(u) => last = u, None => break },
                            _ = &mut deadline => break,
                        }
                    }
                    p.handle.detach(req.name.clone(), no);
                    r = Ok(Response::new(operation_of(&last)));
                    break;
                }
                Err(e) if e.is_not_found() => continue,
                Err(e) => {
                    r = Err(e.into());
                    break;
                }
            }
        }
        timer.finish(&r);
        r
    }
}

impl OperationsService {
    /// Runs `f` on the scheduler that knows the operation.
    async fn first<F, Fut>(&self, name: &str, f: F) -> Result<(), Status>
    where
        F: Fn(ExecutionPipeline, String) -> Fut,
        Fut: std::future::Future<Output = Result<(), Error>>,
    {
        for p in &self.pipelines {
            match f(p.clone(), name.to_string()).await {
                Err(e) if e.is_not_found() => continue,
                other => return other.map_err(Status::from),
            }
        }
        Err(not_found(name).into())
    }
}
