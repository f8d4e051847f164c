//! Credentials of an assumed AWS role, from STS: `AssumeRole` (signed with SigV4 by the
//! source credentials: a profile's keys, a `credential_process`, the environment's keys or
//! another role) and `AssumeRoleWithWebIdentity` (unsigned; the token file is read again at
//! each call, as Kubernetes rotates it).
//!
//! The STS endpoint is chosen as the SDKs choose it: `AWS_ENDPOINT_URL_STS`, else
//! `AWS_ENDPOINT_URL`, else the profile's `endpoint_url`, else
//! `https://sts.REGION.amazonaws.com`. Credentials are fetched when the first request needs
//! them and again five minutes before their `Expiration`; concurrent requests wait for one
//! call. A call that fails (STS refuses, answers something that is not its XML, answers more
//! than [`ANSWER_LIMIT`] bytes, or does not finish within [`CALL_LIMIT`]) fails the request
//! that needed it with a message naming the role, the profile and the endpoint; the next
//! request calls again.
//!
//! The signature is `object_store`'s own SigV4 signer ([`AwsAuthorizer`]), the one that signs
//! the S3 requests; the answer is read with `quick-xml`, which `object_store` already uses.

use std::borrow::Cow;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use object_store::aws::{AwsAuthorizer, AwsCredential, AwsCredentialProvider};
use object_store::client::{HttpClient, HttpConnector, HttpRequestBody, ReqwestConnector};
use object_store::{ClientOptions, CredentialProvider};

use super::aws_process::fresh;

/// The most bytes of an STS answer read (a real one is about 2 KiB).
pub const ANSWER_LIMIT: usize = 64 * 1024;
/// The most bytes of a web identity token file read.
const TOKEN_LIMIT: u64 = 64 * 1024;
/// The longest one STS call may take, answer included.
pub const CALL_LIMIT: Duration = Duration::from_secs(30);

/// The STS endpoint as the SDKs pick it. `env` looks up a variable.
pub fn endpoint(
    env: &dyn Fn(&str) -> Option<String>,
    profile_endpoint: Option<&str>,
    region: &str,
) -> String {
    let set = |k: &str| env(k).filter(|v| !v.is_empty());
    set("AWS_ENDPOINT_URL_STS")
        .or_else(|| set("AWS_ENDPOINT_URL"))
        .or_else(|| profile_endpoint.map(str::to_string))
        .unwrap_or_else(|| format!("https://sts.{region}.amazonaws.com"))
}

/// What is asked of STS.
pub enum Call {
    AssumeRole {
        source: AwsCredentialProvider,
        role_arn: String,
        session_name: Option<String>,
        external_id: Option<String>,
        duration_seconds: Option<u32>,
    },
    WebIdentity {
        token_file: PathBuf,
        role_arn: String,
        session_name: Option<String>,
        duration_seconds: Option<u32>,
    },
}

impl Call {
    fn action(&self) -> &'static str {
        match self {
            Call::AssumeRole { .. } => "AssumeRole",
            Call::WebIdentity { .. } => "AssumeRoleWithWebIdentity",
        }
    }

    fn role_arn(&self) -> &str {
        match self {
            Call::AssumeRole { role_arn, .. } | Call::WebIdentity { role_arn, .. } => role_arn,
        }
    }
}

/// A credential provider that assumes a role through STS.
pub struct StsCredentials {
    call: Call,
    endpoint: String,
    /// The region the `AssumeRole` signature is scoped to.
    region: String,
    client: HttpClient,
    /// The longest one call may take ([`CALL_LIMIT`]).
    limit: Duration,
    /// Where the role was read (`profile "ci" in /root/.aws/config`), for messages.
    from: String,
    /// The last credentials and when they expire; held while STS is called.
    cached: tokio::sync::Mutex<Option<(Arc<AwsCredential>, Expiry)>>,
}

type Expiry = chrono::DateTime<chrono::Utc>;

impl std::fmt::Debug for StsCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StsCredentials")
            .field("action", &self.call.action())
            .field("role_arn", &self.call.role_arn())
            .field("endpoint", &self.endpoint)
            .field("from", &self.from)
            .finish_non_exhaustive()
    }
}

impl StsCredentials {
    /// A provider calling `endpoint` (plain `http://` only with `allow_http`).
    pub fn new(
        call: Call,
        endpoint: String,
        region: String,
        allow_http: bool,
        from: String,
    ) -> Result<StsCredentials, String> {
        let uri: http::Uri = endpoint
            .parse()
            .map_err(|e| format!("the STS endpoint {endpoint:?} is not a URL: {e}"))?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
            return Err(format!(
                "the STS endpoint {endpoint:?} is not an http:// or https:// URL"
            ));
        }
        let options = ClientOptions::new()
            .with_allow_http(allow_http)
            .with_connect_timeout(Duration::from_secs(10))
            .with_timeout(CALL_LIMIT);
        let client = ReqwestConnector::default()
            .connect(&options)
            .map_err(|e| format!("an HTTP client for STS: {e}"))?;
        Ok(StsCredentials {
            call,
            endpoint,
            region,
            client,
            limit: CALL_LIMIT,
            from,
            cached: tokio::sync::Mutex::new(None),
        })
    }

    /// What a failure message starts with.
    fn what(&self) -> String {
        format!(
            "STS {} of role {} ({}) at {}",
            self.call.action(),
            self.call.role_arn(),
            self.from,
            self.endpoint
        )
    }

    async fn fetch(&self) -> Result<(AwsCredential, Expiry), String> {
        let what = self.what();
        // The source's credentials first, under the source's own limits (a command may take
        // a minute; another role its own call).
        let signer = match &self.call {
            Call::AssumeRole { source, .. } => {
                let c = source
                    .get_credential()
                    .await
                    .map_err(|e| format!("{what}: the source credentials: {e}"))?;
                header_safe(&c).map_err(|e| format!("{what}: the source credentials: {e}"))?;
                Some(c)
            }
            Call::WebIdentity { .. } => None,
        };
        tokio::time::timeout(self.limit, self.call_sts(signer))
            .await
            .map_err(|_| format!("{what}: no answer within {:?}", self.limit))?
            .map_err(|e| format!("{what}: {e}"))
    }

    /// One call, signed by `signer` when given.
    async fn call_sts(
        &self,
        signer: Option<Arc<AwsCredential>>,
    ) -> Result<(AwsCredential, Expiry), String> {
        let default_session = || format!("cairn-{}", chrono::Utc::now().timestamp());
        let mut form = vec![("Action", Cow::from(self.call.action()))];
        form.push(("Version", "2011-06-15".into()));
        form.push(("RoleArn", self.call.role_arn().into()));
        match &self.call {
            Call::AssumeRole {
                session_name,
                external_id,
                duration_seconds,
                ..
            } => {
                form.push((
                    "RoleSessionName",
                    session_name.clone().unwrap_or_else(default_session).into(),
                ));
                if let Some(id) = external_id {
                    form.push(("ExternalId", id.as_str().into()));
                }
                if let Some(d) = duration_seconds {
                    form.push(("DurationSeconds", d.to_string().into()));
                }
            }
            Call::WebIdentity {
                token_file,
                session_name,
                duration_seconds,
                ..
            } => {
                form.push((
                    "RoleSessionName",
                    session_name.clone().unwrap_or_else(default_session).into(),
                ));
                if let Some(d) = duration_seconds {
                    form.push(("DurationSeconds", d.to_string().into()));
                }
                form.push(("WebIdentityToken", read_token(token_file).await?.into()));
            }
        }
        let body = form
            .iter()
            .map(|(k, v)| format!("{k}={}", form_encode(v)))
            .collect::<Vec<_>>()
            .join("&");
        let mut request = http::Request::builder()
            .method(http::Method::POST)
            .uri(&self.endpoint)
            .header(
                http::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded; charset=utf-8",
            )
            .body(HttpRequestBody::from(body))
            .map_err(|e| format!("building the request: {e}"))?;
        if let Some(c) = signer {
            AwsAuthorizer::new(&c, "sts", &self.region).authorize(&mut request, None);
        }
        let response = self
            .client
            .execute(request)
            .await
            .map_err(|e| format!("{e}"))?;
        let status = response.status();
        let mut body = response.into_body().bytes_stream();
        let mut answer = Vec::new();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| format!("reading the answer ({status}): {e}"))?;
            if answer.len() + chunk.len() > ANSWER_LIMIT {
                return Err(format!(
                    "the answer ({status}) is longer than {ANSWER_LIMIT} bytes"
                ));
            }
            answer.extend_from_slice(&chunk);
        }
        let answer = Answer::parse(&answer);
        if !status.is_success() {
            return Err(match answer {
                Ok(a) if a.code.is_some() => format!(
                    "refused ({status}): {}: {}",
                    a.code.unwrap_or_default(),
                    a.message.unwrap_or_default()
                ),
                _ => format!("refused ({status})"),
            });
        }
        answer
            .map_err(|e| format!("the answer ({status}) is not STS's XML: {e}"))?
            .credentials()
    }
}

/// The token of a web identity token file, trimmed.
async fn read_token(path: &std::path::Path) -> Result<String, String> {
    use tokio::io::AsyncReadExt;
    let file = tokio::fs::File::open(path).await.map_err(|e| {
        format!(
            "reading the web identity token file {}: {e}",
            path.display()
        )
    })?;
    let mut text = String::new();
    file.take(TOKEN_LIMIT + 1)
        .read_to_string(&mut text)
        .await
        .map_err(|e| {
            format!(
                "reading the web identity token file {}: {e}",
                path.display()
            )
        })?;
    if text.len() as u64 > TOKEN_LIMIT {
        return Err(format!(
            "the web identity token file {} is longer than {TOKEN_LIMIT} bytes",
            path.display()
        ));
    }
    let token = text.trim();
    if token.is_empty() {
        return Err(format!(
            "the web identity token file {} is empty",
            path.display()
        ));
    }
    Ok(token.to_string())
}

/// `application/x-www-form-urlencoded` of a value: all but the unreserved characters escaped.
fn form_encode(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for b in v.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Credentials whose key id and token can be written in HTTP headers (the signer writes them
/// there and cannot fail): visible ASCII only.
pub(super) fn header_safe(c: &AwsCredential) -> Result<(), String> {
    let visible = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_graphic());
    if !visible(&c.key_id) {
        return Err("the access key id is empty or not visible ASCII".into());
    }
    if !visible(&c.secret_key) {
        return Err("the secret access key is empty or not visible ASCII".into());
    }
    if c.token.as_deref().is_some_and(|t| !visible(t)) {
        return Err("the session token is empty or not visible ASCII".into());
    }
    Ok(())
}

/// The fields of an STS answer this reader needs, success or error.
#[derive(Debug, Default)]
struct Answer {
    access_key_id: Option<String>,
    secret_access_key: Option<String>,
    session_token: Option<String>,
    expiration: Option<String>,
    code: Option<String>,
    message: Option<String>,
}

impl Answer {
    fn parse(bytes: &[u8]) -> Result<Answer, String> {
        let text = std::str::from_utf8(bytes).map_err(|e| format!("not UTF-8: {e}"))?;
        let mut reader = quick_xml::Reader::from_str(text);
        let mut a = Answer::default();
        let mut elements = 0usize;
        loop {
            match reader.read_event().map_err(|e| e.to_string())? {
                quick_xml::events::Event::Start(e) => {
                    elements += 1;
                    let field = match e.local_name().as_ref() {
                        b"AccessKeyId" => &mut a.access_key_id,
                        b"SecretAccessKey" => &mut a.secret_access_key,
                        b"SessionToken" => &mut a.session_token,
                        b"Expiration" => &mut a.expiration,
                        b"Code" => &mut a.code,
                        b"Message" => &mut a.message,
                        _ => continue,
                    };
                    let raw = reader.read_text(e.name()).map_err(|e| e.to_string())?;
                    let value = quick_xml::escape::unescape(&raw).map_err(|e| e.to_string())?;
                    field.get_or_insert_with(|| value.trim().chars().take(4096).collect());
                }
                quick_xml::events::Event::Empty(_) => elements += 1,
                quick_xml::events::Event::Eof => break,
                _ => {}
            }
        }
        if elements == 0 {
            return Err("no XML element".into());
        }
        Ok(a)
    }

    fn credentials(self) -> Result<(AwsCredential, Expiry), String> {
        let missing = |k: &str| format!("the answer has no {k}");
        let c = AwsCredential {
            key_id: self.access_key_id.ok_or_else(|| missing("AccessKeyId"))?,
            secret_key: self
                .secret_access_key
                .ok_or_else(|| missing("SecretAccessKey"))?,
            token: Some(self.session_token.ok_or_else(|| missing("SessionToken"))?),
        };
        let e = self.expiration.ok_or_else(|| missing("Expiration"))?;
        let expiry = chrono::DateTime::parse_from_rfc3339(&e)
            .map_err(|err| format!("the answer's Expiration {e:?} is not an RFC 3339 time: {err}"))?
            .with_timezone(&chrono::Utc);
        header_safe(&c).map_err(|e| format!("the answer's credentials: {e}"))?;
        Ok((c, expiry))
    }
}

#[async_trait]
impl CredentialProvider for StsCredentials {
    type Credential = AwsCredential;

    async fn get_credential(&self) -> object_store::Result<Arc<AwsCredential>> {
        let mut cached = self.cached.lock().await;
        if let Some((c, expiry)) = cached.as_ref() {
            if fresh(Some(*expiry)) {
                return Ok(c.clone());
            }
        }
        let (c, expiry) = self
            .fetch()
            .await
            .map_err(|e| object_store::Error::Generic {
                store: "S3",
                source: e.into(),
            })?;
        tracing::debug!(
            role = self.call.role_arn(),
            from = %self.from,
            %expiry,
            "assumed an AWS role through STS"
        );
        let c = Arc::new(c);
        *cached = Some((c.clone(), expiry));
        Ok(c)
    }
}

#[cfg(test)]
#[path = "aws_sts_tests.rs"]
mod tests;
