//! The `grpc` store's `retry`: which codes are retried, how often, and how long to wait.

use cairn_core::Error;

/// `retry` of the config, checked.
#[derive(Debug, Clone, Default)]
pub struct RetryPolicy {
    max_retries: u32,
    delay: std::time::Duration,
    jitter: f64,
    codes: Vec<tonic::Code>,
}

impl RetryPolicy {
    pub fn from_config(r: Option<&cairn_config::stores::Retry>) -> Result<RetryPolicy, Error> {
        let Some(r) = r else {
            return Ok(RetryPolicy::default());
        };
        let codes = match &r.retry_on_errors {
            None => vec![
                tonic::Code::Unavailable,
                tonic::Code::ResourceExhausted,
                tonic::Code::Aborted,
                tonic::Code::DeadlineExceeded,
                tonic::Code::Unknown,
            ],
            Some(names) => names
                .iter()
                .map(|n| {
                    code_named(n).ok_or_else(|| {
                        Error::invalid_argument(format!(
                            "grpc.retry.retry_on_errors: {n:?} is not a gRPC status code name (such as Unavailable, ResourceExhausted, Internal)"
                        ))
                    })
                })
                .collect::<Result<_, _>>()?,
        };
        let delay = r.delay.unwrap_or(0.0);
        if !(0.0..=3600.0).contains(&delay) {
            return Err(Error::invalid_argument(format!(
                "grpc.retry.delay: expected seconds from 0 to 3600, found {delay}"
            )));
        }
        let jitter = r.jitter.unwrap_or(0.0);
        if !(0.0..=10.0).contains(&jitter) {
            return Err(Error::invalid_argument(format!(
                "grpc.retry.jitter: expected a fraction from 0 to 10, found {jitter}"
            )));
        }
        Ok(RetryPolicy {
            max_retries: r.max_retries.unwrap_or(0).min(100) as u32,
            delay: std::time::Duration::from_secs_f64(delay),
            jitter,
            codes,
        })
    }

    /// The wait before retry number `attempt` (from 0): `delay * 2^attempt`, plus up to
    /// `jitter` times that, capped at 60 s.
    /// Whether attempt number `attempt` (from 0) that failed with `code` is tried again.
    pub fn retries(&self, attempt: u32, code: tonic::Code) -> bool {
        attempt < self.max_retries && self.codes.contains(&code)
    }

    pub fn backoff(&self, attempt: u32) -> std::time::Duration {
        let base = self.delay.as_secs_f64() * f64::from(1u32 << attempt.min(16));
        // A fraction from the clock's nanoseconds: enough to spread retries apart.
        let noise = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos()) as f64
            / 1e9;
        std::time::Duration::from_secs_f64((base * (1.0 + self.jitter * noise)).min(60.0))
    }
}

/// A gRPC status code by name, in NativeLink's spelling (`Unavailable`) or the protocol's
/// (`UNAVAILABLE`, `resource_exhausted`).
fn code_named(name: &str) -> Option<tonic::Code> {
    let n: String = name
        .chars()
        .filter(|c| *c != '_')
        .collect::<String>()
        .to_ascii_lowercase();
    (0..=16)
        .map(tonic::Code::from_i32)
        .find(|c| format!("{c:?}").to_ascii_lowercase() == n)
}

#[cfg(test)]
mod retry_tests {
    use super::*;

    #[test]
    fn code_names_in_either_spelling() {
        assert_eq!(code_named("Unavailable"), Some(tonic::Code::Unavailable));
        assert_eq!(
            code_named("RESOURCE_EXHAUSTED"),
            Some(tonic::Code::ResourceExhausted)
        );
        assert_eq!(
            code_named("deadline_exceeded"),
            Some(tonic::Code::DeadlineExceeded)
        );
        assert_eq!(code_named("Teapot"), None);
    }

    #[test]
    fn backoff_doubles_and_jitter_only_adds() {
        let p = RetryPolicy::from_config(Some(&cairn_config::stores::Retry {
            max_retries: Some(5),
            delay: Some(0.1),
            jitter: Some(0.5),
            retry_on_errors: None,
        }))
        .unwrap();
        for attempt in 0..4 {
            let base = 0.1 * f64::from(1u32 << attempt);
            let b = p.backoff(attempt).as_secs_f64();
            assert!(b >= base - 1e-9 && b <= base * 1.5 + 1e-9, "{attempt}: {b}");
        }
        let bad = RetryPolicy::from_config(Some(&cairn_config::stores::Retry {
            retry_on_errors: Some(vec!["Nope".into()]),
            ..Default::default()
        }))
        .unwrap_err();
        assert!(bad.message.contains("retry_on_errors"), "{bad}");
    }
}
