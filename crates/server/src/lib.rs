//! Cairn's network face: the REAPI v2 gRPC services (Capabilities, ContentAddressableStorage,
//! ActionCache, ByteStream), the HTTP routes `/status` and `/metrics`, and the listener that
//! serves both on one port.
//!
//! Services are thin: they parse and validate a request (instance name, digest function,
//! digests, sizes, resource names), call stores, and map errors to statuses through
//! `cairn_core::Error`. Limits live in [`Limits`].

pub mod ac;
pub mod asset;
pub mod bep;
pub mod bytestream;
pub mod bytestream_wire;
pub mod capabilities;
pub mod cas;
pub mod chunking;
pub mod execution;
pub mod grpc_body;
pub mod http;
pub mod instances;
pub mod listener;
pub mod metered;
pub mod metrics;
pub mod origin_events;
pub mod otlp;
pub mod resource;
pub mod tls;
pub mod web_ui;
pub mod zstd_codec;

pub use listener::{check as check_listener, serve, RunningServer};
pub use metrics::Metrics;

/// Limits shared by the services.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest total of blob sizes in one BatchUpdateBlobs or BatchReadBlobs (advertised as
    /// `max_batch_total_size_bytes`).
    pub max_batch_total_size_bytes: u64,
    /// Largest gRPC message accepted or sent.
    pub max_message_bytes: usize,
    /// How long an interrupted ByteStream upload waits to be resumed.
    pub resume_timeout: std::time::Duration,
    /// Largest data field of one ByteStream ReadResponse (`max_bytes_per_stream`).
    pub read_chunk_bytes: usize,
    /// Most ByteStream uploads in progress at once on one listener, including interrupted ones
    /// that wait to be resumed; past it a new upload gets RESOURCE_EXHAUSTED.
    pub max_uploads: usize,
    /// Bytes of upload chunks received on one listener and not yet taken by their stores
    /// (`advanced_http.upload_buffer_bytes`).
    pub upload_buffer_bytes: usize,
    /// `global.default_digest_size_health_check`: `/status` writes a blob of this many bytes to
    /// each store and reads it back (0: it only asks each store for its health).
    pub health_probe_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_batch_total_size_bytes: 4 << 20,
            max_message_bytes: 8 << 20,
            resume_timeout: std::time::Duration::from_secs(60),
            read_chunk_bytes: 1 << 20,
            max_uploads: 10_000,
            upload_buffer_bytes: 256 << 20,
            health_probe_bytes: 0,
        }
    }
}
