//! Why an action did not produce a result, and how that becomes the `google.rpc.Status` of its
//! `ExecuteResponse`.
//!
//! Every step of the pipeline returns an [`ActionError`]. [`ActionError::to_status`] is the
//! one place it becomes a wire status: missing blobs become FAILED_PRECONDITION with a
//! `google.rpc.PreconditionFailure` detail listing each digest, as the REAPI requires, so that
//! clients such as Bazel upload them and retry.

use std::path::PathBuf;
use std::time::Duration;

use cairn_core::proto::google::rpc;
use cairn_core::{Code, Digest, Error};

/// What went wrong with one action.
#[derive(Debug, thiserror::Error)]
pub enum ActionError {
    /// Blobs the action needs (the Action, its Command, a Directory or an input file) are not
    /// in the CAS. Every missing digest is listed, once.
    #[error("{} blob(s) the action needs are missing from the CAS: {}", .0.len(), list(.0))]
    MissingBlobs(Vec<Digest>),
    /// The Action or Command is malformed or asks for something this worker refuses.
    #[error("{0}")]
    InvalidAction(String),
    /// The command's program could not be started.
    #[error("cannot start {program:?} (working directory {cwd}): {source}")]
    Spawn {
        program: String,
        cwd: PathBuf,
        source: std::io::Error,
    },
    /// The command ran past its timeout and was killed.
    #[error("the command ran past its timeout of {0:?} and was killed")]
    TimedOut(Duration),
    /// The command said, in its side channel file, that it ran past its timeout (an
    /// `entrypoint` that enforces the timeout itself does so).
    #[error(
        "the command reported through its side channel file that it ran past its timeout of {0:?}"
    )]
    ReportedTimeout(Duration),
    /// The caller cancelled the action.
    #[error("the action was cancelled")]
    Cancelled,
    /// Uploading the outputs took longer than `max_upload_timeout_s`.
    #[error("uploading the outputs took longer than {0:?}")]
    UploadTimedOut(Duration),
    /// Any other failure (store, local disk), with its code and context.
    #[error(transparent)]
    Other(#[from] Error),
}

fn list(digests: &[Digest]) -> String {
    let mut s = digests
        .iter()
        .take(5)
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    if digests.len() > 5 {
        s.push_str(&format!(", and {} more", digests.len() - 5));
    }
    s
}

impl ActionError {
    /// Shorthand for an INVALID_ARGUMENT about the action.
    pub fn invalid(message: impl Into<String>) -> ActionError {
        ActionError::InvalidAction(message.into())
    }

    /// The gRPC code this error maps to.
    pub fn code(&self) -> Code {
        match self {
            ActionError::MissingBlobs(_) => Code::FailedPrecondition,
            ActionError::InvalidAction(_) => Code::InvalidArgument,
            ActionError::Spawn { .. } => Code::FailedPrecondition,
            ActionError::TimedOut(_)
            | ActionError::ReportedTimeout(_)
            | ActionError::UploadTimedOut(_) => Code::DeadlineExceeded,
            ActionError::Cancelled => Code::Cancelled,
            ActionError::Other(e) => e.code,
        }
    }

    /// The status for `ExecuteResponse.status`.
    pub fn to_status(&self) -> rpc::Status {
        let details = match self {
            ActionError::MissingBlobs(digests) => vec![missing_blobs_detail(digests)],
            _ => vec![],
        };
        rpc::Status {
            code: self.code().rpc_code(),
            message: self.to_string(),
            details,
        }
    }
}

pub use cairn_core::precondition::{
    missing_blobs_detail, PreconditionFailure, Violation, PRECONDITION_FAILURE_TYPE_URL,
};

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_core::DigestFunction;
    use prost::Message;

    #[test]
    fn missing_blobs_become_failed_precondition_with_one_violation_each() {
        let a = DigestFunction::Sha256.compute(b"a");
        let b = DigestFunction::Sha256.compute(b"bb");
        let status = ActionError::MissingBlobs(vec![a, b]).to_status();
        assert_eq!(status.code, Code::FailedPrecondition.rpc_code());
        assert_eq!(status.details.len(), 1);
        assert_eq!(status.details[0].type_url, PRECONDITION_FAILURE_TYPE_URL);
        let failure = PreconditionFailure::decode(&status.details[0].value[..]).unwrap();
        let subjects: Vec<_> = failure.violations.iter().map(|v| &v.subject).collect();
        assert_eq!(
            subjects,
            [
                &format!("blobs/{}/1", a.hash_hex()),
                &format!("blobs/{}/2", b.hash_hex())
            ]
        );
        assert!(failure.violations.iter().all(|v| v.r#type == "MISSING"));
    }
}
