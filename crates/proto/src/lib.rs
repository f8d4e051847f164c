//! Cairn's own protocols, generated at build time from `proto/`.

/// The worker API (`proto/cairn/worker/v1/worker_api.proto`).
pub mod worker {
    pub mod v1 {
        tonic::include_proto!("cairn.worker.v1");
    }
}

/// The Build Event Service interface Bazel's `--bes_backend` speaks
/// (`proto/google/devtools/build/v1/publish_build_event.proto`, Cairn's own rendering of the
/// public API's wire format).
pub mod bes {
    pub mod v1 {
        tonic::include_proto!("google.devtools.build.v1");
    }
}
