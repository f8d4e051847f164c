//! Cairn's own protocols, generated at build time from `proto/`.

/// The worker API (`proto/cairn/worker/v1/worker_api.proto`).
pub mod worker {
    pub mod v1 {
        tonic::include_proto!("cairn.worker.v1");
    }
}
