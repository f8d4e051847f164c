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
use futures::StreamExt;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};

use super::driver::STREAM_DEPTH;
use super::service::operation_of;
use super::{Backend, ExecutionPipeline};
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

/// Operations per ListOperations page when the client does not choose.
pub const DEFAULT_LIST_PAGE: usize = 100;
/// Most operations in one ListOperations page, whatever the client asks.
pub const MAX_LIST_PAGE: usize = 1000;

fn not_found(name: &str) -> Error {
    Error::not_found(format!(
        "operation {name:?} does not exist (or has expired)"
    ))
}

#[tonic::async_trait]
impl Operations for OperationsService {
    /// Pages of at most `page_size` operations (default [`DEFAULT_LIST_PAGE`], at most
    /// [`MAX_LIST_PAGE`]) in name order; the page token is the last name of the page before.
    async fn list_operations(
        &self,
        request: Request<ListOperationsRequest>,
    ) -> Result<Response<ListOperationsResponse>, Status> {
        let timer = self.metrics.rpc("operations", "ListOperations");
        let r = async {
            let req = request.into_inner();
            if !req.filter.is_empty() {
                return Err(Error::invalid_argument(format!(
                    "ListOperations: filter {:.100?} is not supported; list without a filter",
                    req.filter
                )));
            }
            let page = match req.page_size {
                n if n < 0 => {
                    return Err(Error::invalid_argument(format!(
                        "ListOperations: page_size {n} is negative"
                    )))
                }
                0 => DEFAULT_LIST_PAGE,
                n => (n as usize).min(MAX_LIST_PAGE),
            };
            let mut operations = Vec::new();
            for p in &self.pipelines {
                let listed: Vec<Operation> = match &p.backend {
                    Backend::Local(h) => h.list().await?.iter().map(operation_of).collect(),
                    Backend::Shared(s) => s
                        .list(&req.page_token, page + 1)
                        .await?
                        .iter()
                        .map(operation_of)
                        .collect(),
                    // The remote's page after the same token is enough to fill this one.
                    Backend::Remote(r) => {
                        r.list_operations(ListOperationsRequest {
                            page_size: page as i32,
                            page_token: req.page_token.clone(),
                            ..Default::default()
                        })
                        .await?
                        .operations
                    }
                };
                operations.extend(
                    listed
                        .into_iter()
                        .filter(|op| req.page_token.is_empty() || op.name > req.page_token),
                );
            }
            operations.sort_unstable_by(|a, b| a.name.cmp(&b.name));
            let next_page_token = if operations.len() > page {
                operations.truncate(page);
                operations
                    .last()
                    .map(|o| o.name.clone())
                    .unwrap_or_default()
            } else {
                String::new()
            };
            Ok(Response::new(ListOperationsResponse {
                operations,
                next_page_token,
                unreachable: vec![],
            }))
        }
        .await
        .map_err(Status::from);
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
            match &p.backend {
                Backend::Local(h) => {
                    if let Some(u) = h.get(name.clone()).await? {
                        r = Ok(Response::new(operation_of(&u)));
                        break;
                    }
                }
                Backend::Shared(s) => {
                    if let Some(u) = s.get(&name).await? {
                        r = Ok(Response::new(operation_of(&u)));
                        break;
                    }
                }
                Backend::Remote(remote) => match remote.get_operation(&name).await {
                    Err(s) if s.code() == tonic::Code::NotFound => continue,
                    other => {
                        r = other.map(Response::new);
                        break;
                    }
                },
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
            .first(&name, |p, n| async move {
                match &p.backend {
                    Backend::Local(h) => h.delete(n).await.map_err(Status::from),
                    Backend::Shared(s) => s.delete(&n).await.map_err(Status::from),
                    Backend::Remote(r) => r.delete_operation(&n).await,
                }
            })
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
            .first(&name, |p, n| async move {
                match &p.backend {
                    Backend::Local(h) => h.cancel(n).await.map_err(Status::from),
                    Backend::Shared(s) => s.cancel(&n).await.map_err(Status::from),
                    Backend::Remote(r) => r.cancel_operation(&n).await,
                }
            })
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
            let handle = match &p.backend {
                Backend::Local(h) => h,
                Backend::Shared(s) => match s.follow(req.name.clone()).await {
                    Ok(mut updates) => {
                        let deadline = tokio::time::sleep(timeout);
                        tokio::pin!(deadline);
                        let mut last = None;
                        loop {
                            tokio::select! {
                                u = updates.next() => match u {
                                    Some(Ok(u)) => {
                                        let done = matches!(u.status, cairn_scheduler::OperationStatus::Completed(_));
                                        last = Some(u);
                                        if done { break }
                                    }
                                    Some(Err(e)) => { r = Err(e); break }
                                    None => break,
                                },
                                _ = &mut deadline => break,
                            }
                        }
                        if let Some(u) = last {
                            r = Ok(Response::new(operation_of(&u)));
                        }
                        break;
                    }
                    Err(e) if e.is_not_found() => continue,
                    Err(e) => {
                        r = Err(e.into());
                        break;
                    }
                },
                Backend::Remote(remote) => match remote.wait_operation(req.clone()).await {
                    Err(s) if s.code() == tonic::Code::NotFound => continue,
                    other => {
                        r = other.map(Response::new);
                        break;
                    }
                },
            };
            let (tx, mut rx) = mpsc::channel(STREAM_DEPTH);
            match handle.attach(req.name.clone(), tx).await {
                Ok((no, mut last)) => {
                    let deadline = tokio::time::sleep(timeout);
                    tokio::pin!(deadline);
                    while !matches!(last.status, cairn_scheduler::OperationStatus::Completed(_)) {
                        tokio::select! {
                            u = rx.recv() => match u { Some(u) => last = u, None => break },
                            _ = &mut deadline => break,
                        }
                    }
                    handle.detach(req.name.clone(), no);
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
        Fut: std::future::Future<Output = Result<(), Status>>,
    {
        for p in &self.pipelines {
            match f(p.clone(), name.to_string()).await {
                Err(e) if e.code() == tonic::Code::NotFound => continue,
                other => return other,
            }
        }
        Err(not_found(name).into())
    }
}
