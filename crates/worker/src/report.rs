//! Step 4: publish the result, and build the `ExecuteResponse`.
//!
//! A finished run's `ActionResult` goes to the action cache and its
//! `HistoricalExecuteResponse` to the historical store as `upload_action_result` says
//! (NativeLink's strategies):
//!
//! | strategy | action cache | historical store |
//! |---|---|---|
//! | `success_only` (AC default) | exit code 0 | exit code 0 and no error |
//! | `failures_only` (historical default) | exit code not 0 | exit code not 0, or an error |
//! | `everything` | any | any |
//! | `never` | none | none |
//!
//! A result with an error (a timeout) never goes to the action cache, nor does one the caller
//! or the Action marked `do_not_cache`. The key in the action cache is the action digest, as
//! `UpdateActionResult` stores it; a `HistoricalExecuteResponse` is stored under its own digest
//! (the action's digest function), in the format bb_browser reads. When either was written, the
//! success or failure message template becomes the start of `ExecuteResponse.message`. A failed
//! write does not fail the action: the client has its result; the failure is logged and noted
//! in the message.

use std::time::{SystemTime, UNIX_EPOCH};

use cairn_config::workers::UploadStrategy;
use cairn_core::proto::build::bazel::remote::execution::v2 as re;
use cairn_core::proto::google::{protobuf, rpc};
use cairn_core::{Digest, Error};
use cairn_store::{Store, StoreExt};
use prost::Message;

use crate::error::ActionError;
use crate::RunnerConfig;

/// `google.rpc.Code.OK`.
const RPC_OK: i32 = 0;

/// What NativeLink and Buildbarn store in the CAS for a finished action, for browsers of build
/// history (`com.github.trace_machina.nativelink.remote_execution.HistoricalExecuteResponse`,
/// wire-compatible with bb-remote-execution's `HistoricalExecuteResponse`).
#[derive(Clone, PartialEq, Message)]
pub struct HistoricalExecuteResponse {
    #[prost(message, optional, tag = "1")]
    pub action_digest: Option<re::Digest>,
    #[prost(message, optional, tag = "3")]
    pub execute_response: Option<re::ExecuteResponse>,
}

/// Whether a result goes to the action cache under `strategy` (never one with an error).
pub(crate) fn to_action_cache(
    strategy: UploadStrategy,
    result: &re::ActionResult,
    error: Option<&ActionError>,
) -> bool {
    error.is_none()
        && match strategy {
            UploadStrategy::SuccessOnly => result.exit_code == 0,
            UploadStrategy::FailuresOnly => result.exit_code != 0,
            UploadStrategy::Everything => true,
            UploadStrategy::Never => false,
        }
}

/// Whether a result's `HistoricalExecuteResponse` is stored under `strategy`.
pub(crate) fn to_history(strategy: UploadStrategy, failed: bool) -> bool {
    match strategy {
        UploadStrategy::SuccessOnly => !failed,
        UploadStrategy::FailuresOnly => failed,
        UploadStrategy::Everything => true,
        UploadStrategy::Never => false,
    }
}

/// Stores `response` for `action` as a `HistoricalExecuteResponse` in `store`; returns its
/// digest.
pub(crate) async fn write_historical(
    store: &dyn Store,
    action: &Digest,
    response: re::ExecuteResponse,
) -> Result<Digest, Error> {
    let bytes = HistoricalExecuteResponse {
        action_digest: Some(action.to_proto()),
        execute_response: Some(response),
    }
    .encode_to_vec();
    let digest = action.function().compute(&bytes);
    store
        .put_bytes(&digest, bytes.into())
        .await
        .map_err(|e| e.context(format!("storing the historical result of {action}")))?;
    Ok(digest)
}

/// Where a result may go, and the strategies and templates that decide it.
pub(crate) struct Targets<'a> {
    /// The action cache; `None` when there is none or the action may not be cached.
    pub ac: Option<&'a dyn Store>,
    pub historical: &'a dyn Store,
    pub cfg: &'a RunnerConfig,
}

/// Writes the result of `action` to the action cache and its `HistoricalExecuteResponse` to
/// the historical store, as the strategies say. Returns the rendered message template when
/// anything was written, and notes on writes that failed.
pub(crate) async fn publish(
    to: Targets<'_>,
    action: &Digest,
    result: &re::ActionResult,
    error: Option<&ActionError>,
) -> (Option<String>, Vec<String>) {
    let mut failures = Vec::new();
    let failed = result.exit_code != 0 || error.is_some();
    let ac = to
        .ac
        .filter(|_| to_action_cache(to.cfg.ac_strategy, result, error));
    let history = to_history(to.cfg.historical_strategy, failed);
    if ac.is_none() && !history {
        return (None, failures);
    }
    let mut historical = None;
    if history {
        let response = response(Some(result.clone()), error, None, &[]);
        match write_historical(to.historical, action, response).await {
            Ok(d) => historical = Some(d),
            Err(e) => {
                tracing::warn!(digest = %action, error = %e, "historical result not stored");
                failures.push(format!("the historical result was not stored: {e}"));
            }
        }
    }
    if let Some(ac) = ac {
        if let Err(e) = write_action_result(ac, action, result).await {
            tracing::warn!(digest = %action, error = %e, "action result not cached");
            failures.push(format!("the result was not cached: {e}"));
        }
    }
    let template = if failed {
        &to.cfg.failure_message
    } else {
        &to.cfg.success_message
    };
    let headline = (!template.is_empty()).then(|| template.render(action, historical.as_ref()));
    (headline, failures)
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
/// collected (also on a timeout: stdout and stderr so far). The message is `headline` (the
/// rendered template), the status message and the notes, in that order.
pub(crate) fn response(
    result: Option<re::ActionResult>,
    error: Option<&ActionError>,
    headline: Option<&str>,
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
    let mut message = String::new();
    let parts = headline.into_iter().chain([status.message.as_str()]);
    for part in parts.chain(notes.iter().map(String::as_str)) {
        if part.is_empty() {
            continue;
        }
        if !message.is_empty() {
            message.push_str("; ");
        }
        message.push_str(part);
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
