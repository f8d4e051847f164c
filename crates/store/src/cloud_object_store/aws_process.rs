//! `credential_process` of an AWS profile: a command whose standard output is the JSON the AWS
//! SDKs read (`Version: 1`, `AccessKeyId`, `SecretAccessKey`, optional `SessionToken` and
//! `Expiration`). It is run through `sh -c`, as the SDKs do on Unix, when the first request
//! needs credentials, and again five minutes before they expire (never, when they carry no
//! `Expiration`). A command that fails, runs past a minute or prints something else fails
//! the request that needed it, with what it printed on stderr; the next request runs it again.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use object_store::aws::AwsCredential;
use object_store::CredentialProvider;

/// Credentials are fetched again this long before they expire.
const REFRESH_BEFORE: Duration = Duration::from_secs(300);
/// The longest a run of the command may take.
const RUN_LIMIT: Duration = Duration::from_secs(60);

/// When credentials expire; `None` when they carry no `Expiration`.
type Expiry = Option<chrono::DateTime<chrono::Utc>>;

pub struct ProcessCredentials {
    command: String,
    /// Where the command was read (`profile "ci" in /root/.aws/config`), for messages.
    from: String,
    /// The last credentials and when they expire. Held only while the command runs, so that
    /// concurrent requests wait for one run instead of starting one each.
    cached: tokio::sync::Mutex<Option<(Arc<AwsCredential>, Expiry)>>,
}

impl std::fmt::Debug for ProcessCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessCredentials")
            .field("from", &self.from)
            .finish_non_exhaustive()
    }
}

impl ProcessCredentials {
    pub fn new(command: String, from: String) -> ProcessCredentials {
        ProcessCredentials {
            command,
            from,
            cached: tokio::sync::Mutex::new(None),
        }
    }

    async fn run(&self) -> Result<(AwsCredential, Option<chrono::DateTime<chrono::Utc>>), String> {
        let what = format!("credential_process of {}", self.from);
        let child = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(&self.command)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("{what}: cannot start sh: {e}"))?;
        let out = tokio::time::timeout(RUN_LIMIT, child.wait_with_output())
            .await
            .map_err(|_| format!("{what}: still running after {RUN_LIMIT:?}"))?
            .map_err(|e| format!("{what}: {e}"))?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let stderr: String = stderr.trim().chars().take(500).collect();
            return Err(format!("{what} failed ({}): {stderr}", out.status));
        }
        parse(&out.stdout).map_err(|e| format!("{what}: {e}"))
    }
}

/// The credentials in the command's output, and when they expire.
pub fn parse(stdout: &[u8]) -> Result<(AwsCredential, Expiry), String> {
    let v: serde_json::Value =
        serde_json::from_slice(stdout).map_err(|e| format!("its output is not JSON: {e}"))?;
    if v.get("Version").and_then(|v| v.as_i64()) != Some(1) {
        return Err("its output has no \"Version\": 1".into());
    }
    let text = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_string);
    let key_id = text("AccessKeyId").ok_or("its output has no \"AccessKeyId\"")?;
    let secret_key = text("SecretAccessKey").ok_or("its output has no \"SecretAccessKey\"")?;
    let expiry = match text("Expiration") {
        None => None,
        Some(t) => Some(
            chrono::DateTime::parse_from_rfc3339(&t)
                .map_err(|e| format!("\"Expiration\" {t:?} is not an RFC 3339 time: {e}"))?
                .with_timezone(&chrono::Utc),
        ),
    };
    let c = AwsCredential {
        key_id,
        secret_key,
        token: text("SessionToken"),
    };
    super::aws_sts::header_safe(&c).map_err(|e| format!("its output: {e}"))?;
    Ok((c, expiry))
}

/// Whether credentials that expire at `expiry` (never: `None`) are still used, rather than
/// fetched again.
pub(super) fn fresh(expiry: Expiry) -> bool {
    expiry.is_none_or(|e| {
        e - chrono::Duration::from_std(REFRESH_BEFORE).unwrap_or_default() > chrono::Utc::now()
    })
}

#[async_trait]
impl CredentialProvider for ProcessCredentials {
    type Credential = AwsCredential;

    async fn get_credential(&self) -> object_store::Result<Arc<AwsCredential>> {
        let mut cached = self.cached.lock().await;
        if let Some((c, expiry)) = cached.as_ref() {
            if fresh(*expiry) {
                return Ok(c.clone());
            }
        }
        let (c, expiry) = self.run().await.map_err(|e| object_store::Error::Generic {
            store: "S3",
            source: e.into(),
        })?;
        let c = Arc::new(c);
        *cached = Some((c.clone(), expiry));
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_is_read_as_the_sdks_read_it() {
        let (c, e) = parse(
            br#"{"Version": 1, "AccessKeyId": "AKID", "SecretAccessKey": "s", "SessionToken": "t", "Expiration": "2030-01-02T03:04:05Z"}"#,
        )
        .unwrap();
        assert_eq!((c.key_id.as_str(), c.token.as_deref()), ("AKID", Some("t")));
        assert_eq!(e.unwrap().to_rfc3339(), "2030-01-02T03:04:05+00:00");
        let (c, e) = parse(br#"{"Version":1,"AccessKeyId":"A","SecretAccessKey":"s"}"#).unwrap();
        assert_eq!((c.token, e), (None, None));
        for (bad, says) in [
            (&b"not json"[..], "not JSON"),
            (br#"{"AccessKeyId":"A","SecretAccessKey":"s"}"#, "Version"),
            (
                br#"{"Version":2,"AccessKeyId":"A","SecretAccessKey":"s"}"#,
                "Version",
            ),
            (br#"{"Version":1,"SecretAccessKey":"s"}"#, "AccessKeyId"),
            (br#"{"Version":1,"AccessKeyId":"A"}"#, "SecretAccessKey"),
            (
                br#"{"Version":1,"AccessKeyId":"A","SecretAccessKey":"s","SessionToken":"a\nb"}"#,
                "session token is empty or not visible ASCII",
            ),
            (
                br#"{"Version":1,"AccessKeyId":"A","SecretAccessKey":"s","Expiration":"soon"}"#,
                "RFC 3339",
            ),
        ] {
            let e = parse(bad).unwrap_err();
            assert!(e.contains(says), "{e}");
        }
    }

    #[tokio::test]
    async fn the_command_runs_once_until_its_credentials_near_expiry() {
        let dir = tempfile::tempdir().unwrap();
        let count = dir.path().join("count");
        // Prints credentials that expire in 2 minutes (inside the refresh margin) on odd runs
        // and in a day on even runs; counts its runs.
        let script = format!(
            "echo x >> {count}; n=$(wc -l < {count}); \
             if [ $((n % 2)) = 1 ]; then e=$(date -u -d '+2 min' +%Y-%m-%dT%H:%M:%SZ); \
             else e=$(date -u -d '+1 day' +%Y-%m-%dT%H:%M:%SZ); fi; \
             printf '{{\"Version\":1,\"AccessKeyId\":\"AK%s\",\"SecretAccessKey\":\"s\",\"Expiration\":\"%s\"}}' $n $e",
            count = count.display()
        );
        let p = ProcessCredentials::new(script, "profile \"t\"".into());
        assert_eq!(p.get_credential().await.unwrap().key_id, "AK1");
        // Near expiry: run again; then a day of validity: kept.
        assert_eq!(p.get_credential().await.unwrap().key_id, "AK2");
        assert_eq!(p.get_credential().await.unwrap().key_id, "AK2");
        assert_eq!(std::fs::read_to_string(&count).unwrap().lines().count(), 2);

        let failing = ProcessCredentials::new(
            "echo 'token expired, run aws sso login' >&2; exit 3".into(),
            "profile \"f\" in /x/config".into(),
        );
        let e = failing.get_credential().await.unwrap_err().to_string();
        assert!(
            e.contains("profile \"f\" in /x/config") && e.contains("token expired"),
            "{e}"
        );
    }
}
