//! Cairn's vocabulary: [`Digest`] and [`DigestFunction`], the streaming [`Hasher`], the one
//! [`Error`] type every layer returns (mapped to `tonic::Status` in exactly one place), and the
//! [`BlobStream`] type that carries blob bodies as bounded chunks of `Bytes`.

pub mod bytestream_wire;
pub mod digest;
pub mod error;
pub mod memory;
pub mod precondition;
pub mod stream;
pub mod trace_context;

pub use digest::{Digest, DigestFunction, Hasher};
pub use error::{Code, Error, Result};
pub use stream::{BlobStream, CHUNK_SIZE};

/// Re-export of the REAPI v2 and Google API types, so that other crates agree on one version.
pub use bazel_remote_apis as proto;
