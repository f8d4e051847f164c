//! Retries of backend requests, with NativeLink's `retry` keys and meaning: at most
//! `max_retries` retries after the first attempt (0, the default, means one attempt only);
//! before retry `n` (1, 2, ...) a wait of `delay * 2^(n-1)` seconds, each multiplied by a
//! random factor in `[1 - jitter/2, 1 + jitter/2]`; only errors whose code is in
//! `retry_on_errors` (by default the codes of temporary failures) are retried.
//!
//! An operation is retried whole, from data the store still holds (a part's buffer, the next
//! unread offset), so a retry can never store a different object than the first attempt would.

use std::time::Duration;

use cairn_config::stores::Retry;
use cairn_core::{Code, Error};
use rand::Rng;

/// Longest single wait, whatever `delay` and the attempt number say.
const MAX_WAIT: Duration = Duration::from_secs(120);

/// The codes retried when `retry_on_errors` is not set (NativeLink's list).
const DEFAULT_RETRIED: &[Code] = &[
    Code::Cancelled,
    Code::DeadlineExceeded,
    Code::ResourceExhausted,
    Code::Aborted,
    Code::Internal,
    Code::Unavailable,
    Code::DataLoss,
];

#[derive(Debug, Clone)]
pub struct RetryPolicy {
    pub max_retries: u32,
    pub delay: f64,
    pub jitter: f64,
    retried: Vec<Code>,
}

impl RetryPolicy {
    /// From the config; `path` names the `retry` key in errors.
    pub fn from_config(retry: Option<&Retry>, path: &str) -> Result<RetryPolicy, Error> {
        let Some(r) = retry else {
            return Ok(RetryPolicy::none());
        };
        let delay = r.delay.unwrap_or(0.0);
        let jitter = r.jitter.unwrap_or(0.0);
        if !(delay.is_finite() && delay >= 0.0) {
            return Err(Error::invalid_argument(format!(
                "{path}.delay: expected a non-negative number of seconds, found {delay}"
            )));
        }
        if !(0.0..=2.0).contains(&jitter) {
            return Err(Error::invalid_argument(format!(
                "{path}.jitter: expected a fraction between 0 and 2, found {jitter}"
            )));
        }
        let retried = match &r.retry_on_errors {
            None => DEFAULT_RETRIED.to_vec(),
            Some(names) => {
                let mut codes = Vec::new();
                for (i, n) in names.iter().enumerate() {
                    match code_named(n) {
                        Some(Some(c)) => codes.push(c),
                        Some(None) => {}
                        None => {
                            return Err(Error::invalid_argument(format!(
                                "{path}.retry_on_errors[{i}]: unknown error code {n:?} (expected \
                                 a gRPC code name such as \"Unavailable\")"
                            )))
                        }
                    }
                }
                codes
            }
        };
        Ok(RetryPolicy {
            max_retries: u32::try_from(r.max_retries.unwrap_or(0)).unwrap_or(u32::MAX),
            delay,
            jitter,
            retried,
        })
    }

    /// One attempt, no retry.
    pub fn none() -> RetryPolicy {
        RetryPolicy {
            max_retries: 0,
            delay: 0.0,
            jitter: 0.0,
            retried: DEFAULT_RETRIED.to_vec(),
        }
    }

    /// Whether an error of this code is worth another attempt.
    pub fn retries(&self, code: Code) -> bool {
        self.retried.contains(&code)
    }

    /// The wait before retry `n` (1-based), jittered.
    pub fn wait(&self, n: u32) -> Duration {
        let base = self.delay * 2f64.powi(n.saturating_sub(1).min(62) as i32);
        let factor = if self.jitter > 0.0 {
            rand::thread_rng().gen_range((1.0 - self.jitter / 2.0)..=(1.0 + self.jitter / 2.0))
        } else {
            1.0
        };
        Duration::try_from_secs_f64(base * factor)
            .unwrap_or(MAX_WAIT)
            .min(MAX_WAIT)
    }
}

/// NativeLink's `ErrorCode` names: `Some(Some(code))` for a code Cairn has, `Some(None)` for
/// one it never produces (`Unknown`, `Unauthenticated`), `None` for no such name.
fn code_named(name: &str) -> Option<Option<Code>> {
    Some(Some(match name {
        "Cancelled" => Code::Cancelled,
        "InvalidArgument" => Code::InvalidArgument,
        "DeadlineExceeded" => Code::DeadlineExceeded,
        "NotFound" => Code::NotFound,
        "AlreadyExists" => Code::AlreadyExists,
        "PermissionDenied" => Code::PermissionDenied,
        "ResourceExhausted" => Code::ResourceExhausted,
        "FailedPrecondition" => Code::FailedPrecondition,
        "Aborted" => Code::Aborted,
        "OutOfRange" => Code::OutOfRange,
        "Unimplemented" => Code::Unimplemented,
        "Internal" => Code::Internal,
        "Unavailable" => Code::Unavailable,
        "DataLoss" => Code::DataLoss,
        "Unknown" | "Unauthenticated" => return Some(None),
        _ => return None,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_double_within_the_jitter_band() {
        let r = Retry {
            max_retries: Some(6),
            delay: Some(0.3),
            jitter: Some(0.5),
            retry_on_errors: None,
        };
        let p = RetryPolicy::from_config(Some(&r), "r").unwrap();
        assert_eq!(p.max_retries, 6);
        for n in 1..=6u32 {
            let base = 0.3 * 2f64.powi(n as i32 - 1);
            for _ in 0..50 {
                let w = p.wait(n).as_secs_f64();
                assert!(
                    w >= base * 0.75 - 1e-9 && w <= base * 1.25 + 1e-9,
                    "{n}: {w}"
                );
            }
        }
        assert!(p.retries(Code::Unavailable) && !p.retries(Code::NotFound));
    }

    #[test]
    fn absent_means_one_attempt_and_bad_values_name_the_key() {
        assert_eq!(RetryPolicy::from_config(None, "r").unwrap().max_retries, 0);
        let r = Retry {
            retry_on_errors: Some(vec!["Unavailable".into(), "Sometimes".into()]),
            ..Retry::default()
        };
        let e = RetryPolicy::from_config(Some(&r), "stores.S.retry").unwrap_err();
        assert!(
            e.message.contains("stores.S.retry.retry_on_errors[1]"),
            "{e}"
        );
        let r = Retry {
            retry_on_errors: Some(vec!["NotFound".into()]),
            ..Retry::default()
        };
        let p = RetryPolicy::from_config(Some(&r), "r").unwrap();
        assert!(p.retries(Code::NotFound) && !p.retries(Code::Unavailable));
        let r = Retry {
            jitter: Some(-1.0),
            ..Retry::default()
        };
        let e = RetryPolicy::from_config(Some(&r), "r").unwrap_err();
        assert!(e.message.contains("r.jitter"), "{e}");
    }
}
