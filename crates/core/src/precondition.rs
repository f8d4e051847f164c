//! `google.rpc.PreconditionFailure`, which the `bazel-remote-apis` crate does not generate: the
//! error detail that lists each blob missing from the CAS (REAPI: a MISSING violation per blob,
//! subject `blobs/{hash}/{size}`).

use prost::Message;

use crate::proto::google::protobuf::Any;
use crate::Digest;

/// `google.rpc.PreconditionFailure` (google/rpc/error_details.proto), which the
/// `bazel-remote-apis` crate does not generate.
#[derive(Clone, PartialEq, Message)]
pub struct PreconditionFailure {
    #[prost(message, repeated, tag = "1")]
    pub violations: Vec<Violation>,
}

/// `google.rpc.PreconditionFailure.Violation`.
#[derive(Clone, PartialEq, Message)]
pub struct Violation {
    /// `MISSING` for a blob that is not in the CAS.
    #[prost(string, tag = "1")]
    pub r#type: String,
    /// `blobs/{hash}/{size}` for a missing blob.
    #[prost(string, tag = "2")]
    pub subject: String,
    #[prost(string, tag = "3")]
    pub description: String,
}

/// The `type_url` of a packed [`PreconditionFailure`].
pub const PRECONDITION_FAILURE_TYPE_URL: &str =
    "type.googleapis.com/google.rpc.PreconditionFailure";

/// A `PreconditionFailure` with one MISSING violation per digest, packed as `Any`.
pub fn missing_blobs_detail(digests: &[Digest]) -> Any {
    let failure = PreconditionFailure {
        violations: digests
            .iter()
            .map(|d| Violation {
                r#type: "MISSING".to_string(),
                subject: format!("blobs/{}/{}", d.hash_hex(), d.size()),
                description: String::new(),
            })
            .collect(),
    };
    Any {
        type_url: PRECONDITION_FAILURE_TYPE_URL.to_string(),
        value: failure.encode_to_vec(),
    }
}
