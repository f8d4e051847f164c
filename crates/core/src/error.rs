//! The error type of every Cairn layer.
//!
//! An [`Error`] is a gRPC [`Code`] and a message that says what failed and why. Each layer adds
//! what it knew with [`Error::context`] ("store CAS: reading sha256:ab..-12: ..."), and the one
//! `From<Error> for tonic::Status` below is the only place errors become wire statuses.

use std::fmt;

/// The gRPC status codes Cairn uses (a subset of `tonic::Code`, kept here so that crates that
/// never touch the network can still say which status an error maps to).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Code {
    InvalidArgument,
    NotFound,
    AlreadyExists,
    FailedPrecondition,
    ResourceExhausted,
    OutOfRange,
    Unavailable,
    Internal,
    Unimplemented,
    Cancelled,
    DeadlineExceeded,
    Aborted,
    PermissionDenied,
    DataLoss,
}

impl Code {
    pub fn to_tonic(self) -> tonic::Code {
        match self {
            Code::InvalidArgument => tonic::Code::InvalidArgument,
            Code::NotFound => tonic::Code::NotFound,
            Code::AlreadyExists => tonic::Code::AlreadyExists,
            Code::FailedPrecondition => tonic::Code::FailedPrecondition,
            Code::ResourceExhausted => tonic::Code::ResourceExhausted,
            Code::OutOfRange => tonic::Code::OutOfRange,
            Code::Unavailable => tonic::Code::Unavailable,
            Code::Internal => tonic::Code::Internal,
            Code::Unimplemented => tonic::Code::Unimplemented,
            Code::Cancelled => tonic::Code::Cancelled,
            Code::DeadlineExceeded => tonic::Code::DeadlineExceeded,
            Code::Aborted => tonic::Code::Aborted,
            Code::PermissionDenied => tonic::Code::PermissionDenied,
            Code::DataLoss => tonic::Code::DataLoss,
        }
    }

    pub fn from_tonic(code: tonic::Code) -> Code {
        match code {
            tonic::Code::InvalidArgument => Code::InvalidArgument,
            tonic::Code::NotFound => Code::NotFound,
            tonic::Code::AlreadyExists => Code::AlreadyExists,
            tonic::Code::FailedPrecondition => Code::FailedPrecondition,
            tonic::Code::ResourceExhausted => Code::ResourceExhausted,
            tonic::Code::OutOfRange => Code::OutOfRange,
            tonic::Code::Unavailable => Code::Unavailable,
            tonic::Code::Unimplemented => Code::Unimplemented,
            tonic::Code::Cancelled => Code::Cancelled,
            tonic::Code::DeadlineExceeded => Code::DeadlineExceeded,
            tonic::Code::Aborted => Code::Aborted,
            tonic::Code::PermissionDenied => Code::PermissionDenied,
            tonic::Code::DataLoss => Code::DataLoss,
            _ => Code::Internal,
        }
    }

    /// The `google.rpc.Code` number, for statuses embedded in responses (BatchUpdateBlobs).
    pub fn rpc_code(self) -> i32 {
        self.to_tonic() as i32
    }
}

/// An error with a gRPC code and a message naming what failed and why.
#[derive(Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Error {
    pub code: Code,
    pub message: String,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.code, self.message)
    }
}

macro_rules! ctor {
    ($name:ident, $code:ident) => {
        pub fn $name(message: impl Into<String>) -> Error {
            Error::new(Code::$code, message)
        }
    };
}

impl Error {
    pub fn new(code: Code, message: impl Into<String>) -> Error {
        Error {
            code,
            message: message.into(),
        }
    }
    ctor!(invalid_argument, InvalidArgument);
    ctor!(not_found, NotFound);
    ctor!(failed_precondition, FailedPrecondition);
    ctor!(resource_exhausted, ResourceExhausted);
    ctor!(out_of_range, OutOfRange);
    ctor!(unavailable, Unavailable);
    ctor!(internal, Internal);
    ctor!(unimplemented, Unimplemented);
    ctor!(cancelled, Cancelled);
    ctor!(data_loss, DataLoss);

    /// Prefixes the message with what the caller was doing, keeping the code.
    pub fn context(mut self, what: impl fmt::Display) -> Error {
        self.message = format!("{what}: {}", self.message);
        self
    }

    pub fn is_not_found(&self) -> bool {
        self.code == Code::NotFound
    }

    /// An I/O error, classified: a missing file is NOT_FOUND, a full disk RESOURCE_EXHAUSTED.
    pub fn io(what: impl fmt::Display, err: std::io::Error) -> Error {
        let code = match err.kind() {
            std::io::ErrorKind::NotFound => Code::NotFound,
            std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded => {
                Code::ResourceExhausted
            }
            std::io::ErrorKind::PermissionDenied => Code::PermissionDenied,
            _ => Code::Internal,
        };
        Error::new(code, format!("{what}: {err}"))
    }
}

impl From<Error> for tonic::Status {
    fn from(err: Error) -> tonic::Status {
        tonic::Status::new(err.code.to_tonic(), err.message)
    }
}

impl From<tonic::Status> for Error {
    fn from(status: tonic::Status) -> Error {
        Error::new(
            Code::from_tonic(status.code()),
            status.message().to_string(),
        )
    }
}

impl From<Error> for bazel_remote_apis::google::rpc::Status {
    fn from(err: Error) -> Self {
        bazel_remote_apis::google::rpc::Status {
            code: err.code.rpc_code(),
            message: err.message,
            details: vec![],
        }
    }
}

/// Shorthand for `Err(Error::invalid_argument(format!(...)))`.
#[macro_export]
macro_rules! invalid {
    ($($arg:tt)*) => { $crate::Error::invalid_argument(format!($($arg)*)) };
}
