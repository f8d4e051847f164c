//! The `grpc` scheduler kind: this process keeps no queue; Execute, WaitExecution and the
//! Operations calls go to another scheduler (NativeLink's `grpc` scheduler), over
//! `connections_per_endpoint` connections, at most `max_concurrent_requests` at a time, with
//! `retry` for calls that failed before any answer arrived. GetCapabilities reports the
//! remote scheduler's platform properties.
//!
//! Operation names are the remote scheduler's, passed through unchanged. A call that the
//! remote answers is never sent again (an Execute that started streaming is the client's to
//! resume with WaitExecution); a remote that cannot be reached is UNAVAILABLE naming this
//! scheduler and its address.

use std::sync::Arc;

use cairn_config::schedulers::GrpcScheduler;
use cairn_core::proto::build::bazel::remote::execution::v2 as re;
use cairn_core::proto::google::longrunning::operations_client::OperationsClient;
use cairn_core::proto::google::longrunning::{
    CancelOperationRequest, DeleteOperationRequest, GetOperationRequest, ListOperationsRequest,
    ListOperationsResponse, Operation, WaitOperationRequest,
};
use cairn_core::Error;
use cairn_store::grpc::RetryPolicy;
use futures::stream::BoxStream;
use futures::StreamExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::transport::Channel;
use tonic::{Request, Status};

/// Request headers passed on to the remote scheduler.
const FORWARDED_HEADERS: [&str; 3] = [
    "build.bazel.remote.execution.v2.requestmetadata-bin",
    "traceparent",
    "tracestate",
];

/// Largest message accepted from the remote scheduler.
const MAX_MESSAGE: usize = 64 << 20;

pub struct RemoteScheduler {
    /// The scheduler's config name, for messages.
    name: String,
    address: String,
    channels: cairn_store::channel::Pool,
    permits: Option<Arc<Semaphore>>,
    retry: RetryPolicy,
}

impl RemoteScheduler {
    /// Checks the config and opens the (lazy) connections. `path` is the spec's key path.
    pub fn new(name: &str, cfg: &GrpcScheduler, path: &str) -> Result<RemoteScheduler, Error> {
        let at = format!("{path}.grpc.endpoint");
        let connections = cfg.connections_per_endpoint.unwrap_or(1).clamp(1, 64);
        let endpoint = cfg.endpoint.clone();
        let build_at = at.clone();
        let channels = cairn_store::channel::Pool::new(
            &at,
            cairn_store::channel::tls_files([cfg.endpoint.tls_config.as_ref()]),
            move || {
                let ep = cairn_store::channel::endpoint(
                    &endpoint.address,
                    endpoint.tls_config.as_ref(),
                    &build_at,
                )?
                .tcp_nodelay(true);
                let ep = cairn_store::channel::with_endpoint_settings(ep, &endpoint);
                Ok((0..connections).map(|_| ep.connect_lazy()).collect())
            },
        )?;
        let retry = RetryPolicy::from_config(cfg.retry.as_ref())
            .map_err(|e| Error::invalid_argument(format!("{path}.{}", e.message)))?;
        Ok(RemoteScheduler {
            name: name.to_string(),
            address: cfg.endpoint.address.clone(),
            channels,
            permits: cfg
                .max_concurrent_requests
                .filter(|n| *n > 0)
                .map(|n| Arc::new(Semaphore::new(n.min(Semaphore::MAX_PERMITS as u64) as usize))),
            retry,
        })
    }

    /// What can be checked without connecting: the address, the TLS files, `retry`.
    pub fn check(cfg: &GrpcScheduler, path: &str) -> Result<(), Error> {
        RemoteScheduler::new("check", cfg, path).map(|_| ())
    }

    fn channel(&self) -> Channel {
        self.channels.pick()
    }

    async fn permit(&self) -> Option<OwnedSemaphorePermit> {
        match &self.permits {
            Some(p) => p.clone().acquire_owned().await.ok(),
            None => None,
        }
    }

    /// The remote's status, said as this scheduler's: the code stays, the message names where.
    fn upstream(&self, s: Status) -> Status {
        let s = cairn_store::channel::connection_status(s);
        let code = s.code();
        let what = if code == tonic::Code::Unavailable {
            "cannot be reached"
        } else {
            "answered"
        };
        Status::new(
            code,
            format!(
                "scheduler {:?} forwards to {} which {what}: {}",
                self.name,
                self.address,
                s.message()
            ),
        )
    }

    /// Runs `call` on a fresh channel per try, retrying per `retry` while no answer came.
    async fn call<T, F, Fut>(&self, call: F) -> Result<T, Status>
    where
        F: Fn(Channel) -> Fut,
        Fut: std::future::Future<Output = Result<T, Status>>,
    {
        let mut attempt = 0;
        loop {
            match call(self.channel())
                .await
                .map_err(cairn_store::channel::connection_status)
            {
                Err(e) if self.retry.retries(attempt, e.code()) => {
                    tracing::debug!(scheduler = %self.name, upstream = %self.address, code = ?e.code(), attempt, "retrying a forwarded call");
                    tokio::time::sleep(self.retry.backoff(attempt)).await;
                    attempt += 1;
                }
                other => return other.map_err(|e| self.upstream(e)),
            }
        }
    }

    /// Forwards an Execute; the stream is the remote's, with its operation names.
    pub async fn execute(
        &self,
        req: re::ExecuteRequest,
        headers: &tonic::metadata::MetadataMap,
    ) -> Result<BoxStream<'static, Result<Operation, Status>>, Status> {
        let permit = self.permit().await;
        let stream = self
            .call(|ch| {
                let request = with_headers(req.clone(), headers);
                async move {
                    re::execution_client::ExecutionClient::new(ch)
                        .max_decoding_message_size(MAX_MESSAGE)
                        .execute(request)
                        .await
                }
            })
            .await?
            .into_inner();
        Ok(self.relay(stream, permit))
    }

    /// Forwards a WaitExecution; NOT_FOUND when the remote does not know the operation.
    pub async fn wait_execution(
        &self,
        name: &str,
        headers: &tonic::metadata::MetadataMap,
    ) -> Result<BoxStream<'static, Result<Operation, Status>>, Status> {
        let permit = self.permit().await;
        let req = re::WaitExecutionRequest {
            name: name.to_string(),
        };
        let stream = self
            .call(|ch| {
                let request = with_headers(req.clone(), headers);
                async move {
                    re::execution_client::ExecutionClient::new(ch)
                        .max_decoding_message_size(MAX_MESSAGE)
                        .wait_execution(request)
                        .await
                }
            })
            .await?
            .into_inner();
        Ok(self.relay(stream, permit))
    }

    /// The remote's operation stream, its errors said as this scheduler's; the permit is held
    /// until the stream ends.
    fn relay(
        &self,
        stream: tonic::Streaming<Operation>,
        permit: Option<OwnedSemaphorePermit>,
    ) -> BoxStream<'static, Result<Operation, Status>> {
        let (name, address) = (self.name.clone(), self.address.clone());
        stream
            .map(move |r| {
                let _held = &permit;
                r.map_err(|s| {
                    Status::new(
                        s.code(),
                        format!(
                            "scheduler {name:?} forwards to {address}, whose stream failed: {}",
                            s.message()
                        ),
                    )
                })
            })
            .boxed()
    }

    fn operations(ch: Channel) -> OperationsClient<Channel> {
        OperationsClient::new(ch).max_decoding_message_size(MAX_MESSAGE)
    }

    pub async fn get_operation(&self, name: &str) -> Result<Operation, Status> {
        let _permit = self.permit().await;
        let req = GetOperationRequest {
            name: name.to_string(),
        };
        self.call(|ch| {
            let req = req.clone();
            async move { Self::operations(ch).get_operation(req).await }
        })
        .await
        .map(|r| r.into_inner())
    }

    pub async fn list_operations(
        &self,
        req: ListOperationsRequest,
    ) -> Result<ListOperationsResponse, Status> {
        let _permit = self.permit().await;
        self.call(|ch| {
            let req = req.clone();
            async move { Self::operations(ch).list_operations(req).await }
        })
        .await
        .map(|r| r.into_inner())
    }

    pub async fn cancel_operation(&self, name: &str) -> Result<(), Status> {
        let _permit = self.permit().await;
        let req = CancelOperationRequest {
            name: name.to_string(),
        };
        self.call(|ch| {
            let req = req.clone();
            async move { Self::operations(ch).cancel_operation(req).await }
        })
        .await
        .map(|_| ())
    }

    pub async fn delete_operation(&self, name: &str) -> Result<(), Status> {
        let _permit = self.permit().await;
        let req = DeleteOperationRequest {
            name: name.to_string(),
        };
        self.call(|ch| {
            let req = req.clone();
            async move { Self::operations(ch).delete_operation(req).await }
        })
        .await
        .map(|_| ())
    }

    pub async fn wait_operation(&self, req: WaitOperationRequest) -> Result<Operation, Status> {
        let _permit = self.permit().await;
        self.call(|ch| {
            let req = req.clone();
            async move { Self::operations(ch).wait_operation(req).await }
        })
        .await
        .map(|r| r.into_inner())
    }

    /// The platform properties the remote scheduler supports for `instance`.
    pub async fn node_properties(&self, instance: &str) -> Result<Vec<String>, Status> {
        let req = re::GetCapabilitiesRequest {
            instance_name: instance.to_string(),
        };
        let caps = self
            .call(|ch| {
                let req = req.clone();
                async move {
                    re::capabilities_client::CapabilitiesClient::new(ch)
                        .get_capabilities(req)
                        .await
                }
            })
            .await?
            .into_inner();
        Ok(caps
            .execution_capabilities
            .map(|e| e.supported_node_properties)
            .unwrap_or_default())
    }
}

/// `message` as a request carrying the client's forwarded headers.
fn with_headers<T>(message: T, headers: &tonic::metadata::MetadataMap) -> Request<T> {
    use tonic::metadata::{AsciiMetadataKey, BinaryMetadataKey};
    let mut r = Request::new(message);
    for name in FORWARDED_HEADERS {
        if name.ends_with("-bin") {
            if let (Some(v), Ok(k)) = (
                headers.get_bin(name),
                BinaryMetadataKey::from_bytes(name.as_bytes()),
            ) {
                r.metadata_mut().insert_bin(k, v.clone());
            }
        } else if let (Some(v), Ok(k)) = (
            headers.get(name),
            AsciiMetadataKey::from_bytes(name.as_bytes()),
        ) {
            r.metadata_mut().insert(k, v.clone());
        }
    }
    r
}
