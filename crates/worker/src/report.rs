//! Step 4: store the `ActionResult` in the action cache when it may be cached, and build the
//! `ExecuteResponse`.
//!
//! A result is cached only when the action succeeded (status OK, exit code 0) and the caller
//! did not ask to skip the cache (`do_not_cache`). The key is the action digest, as
//! `UpdateActionResult` stores it. A failed AC write does not fail the action: the client has
//! its result; the failure is logged and noted in the response message.

use std::time::{SystemTime, UNIX_EPOCH};

use cairn_core::proto::build::bazel::remote::execution::v2 as re;
use cairn_core::proto::google::{protobuf, rpc};
use cairn_core::{Digest, Error};
use cairn_store::{Store, StoreExt};
use prost::Message;

use crate::error::ActionError;

/// `google.rpc.Code.OK`.
const RPC_OK: i32 = 0;

/// Whether a result may go to the action cache.
pub(crate) fn cacheable(skip_cache_write: bool, result: &re::ActionResult) -> bool {
    !skip_cache_write && result.exit_code == 0
}

/// Writes `result` to `ac` under `action`.
pub(crate) async fn write_action_result(
    ac: &dyn Store,
    action: &Digest,
    result: &re::ActionResult,
) -> Result<(), Error> {
    ac.put_bytes(action, result.encode_to_vec().into())
        .await
        .map_err(|e| {
            e.context(format!(
                "writing the action result of {action} to the action cache"
            ))
        })
}

/// The response for a run: `error` sets the status (OK without one), `result` is what was
/// collected (also on a timeout: stdout and stderr so far).
pub(crate) fn response(
    result: Option<re::ActionResult>,
    error: Option<&ActionError>,
    notes: &[String],
) -> re::ExecuteResponse {
    let status = match error {
        Some(e) => e.to_status(),
        None => rpc::Status {
            code: RPC_OK,
            message: String::new(),
            details: vec![],
        },
    };
    let mut message = status.message.clone();
    for n in notes {
        if !message.is_empty() {
            message.push_str("; ");
        }
        message.push_str(n);
    }
    re::ExecuteResponse {
        result,
        cached_result: false,
        status: Some(status),
        server_logs: Default::default(),
        message,
    }
}

/// A wall-clock time as a protobuf `Timestamp`.
pub(crate) fn timestamp(t: SystemTime) -> protobuf::Timestamp {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    protobuf::Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}
