//! Provider `aws`: Amazon S3, or any S3-compatible server named by `AWS_ENDPOINT_URL_S3` or
//! `AWS_ENDPOINT_URL` (as the AWS SDK that NativeLink uses reads them). Credentials and the rest come from the standard
//! environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`,
//! `AWS_REGION`, ECS and EC2 instance metadata), through `object_store`'s
//! `AmazonS3Builder::from_env`, and, when the environment has no keys, from the shared files
//! `~/.aws/credentials` and `~/.aws/config` and the environment's web identity (IRSA)
//! ([`super::aws_profile`]): static keys, a `credential_process` ([`super::aws_process`]) or
//! a role assumed through STS ([`super::aws_sts`]). The ONTAP, R2 and OCI providers reuse
//! [`s3_compatible`] with their own endpoint and keys.

use std::sync::Arc;

use cairn_config::stores::CloudObjectStore as Spec;
use cairn_core::Error;
use object_store::aws::{AmazonS3Builder, AwsCredential, AwsCredentialProvider};
use object_store::{ClientOptions, StaticCredentialProvider};

use super::aws_process::ProcessCredentials;
use super::aws_profile::{self, Source};
use super::aws_sts::{self, Call, StsCredentials};
use super::transport::CountingConnector;
use super::{client_options, no_client_retries, required, Client};

pub fn check(spec: &Spec, at: &str) -> Result<(), Error> {
    required(&spec.bucket, "bucket", at)?;
    Ok(())
}

pub fn client(spec: &Spec, at: &str, connector: CountingConnector) -> Result<Client, Error> {
    let bucket = required(&spec.bucket, "bucket", at)?;
    let mut b = from_sdk_env().with_bucket_name(bucket);
    // The SDKs' S3-only endpoint wins over `AWS_ENDPOINT_URL` (which `from_env` reads).
    if let Some(endpoint) = env_var("AWS_ENDPOINT_URL_S3") {
        b = b.with_endpoint(endpoint);
    }
    let profile = profile(at)?;
    let env_region = env_var("AWS_REGION").or_else(|| env_var("AWS_DEFAULT_REGION"));
    let spec_region = spec.region.clone().filter(|r| !r.is_empty());
    if let Some(region) = spec_region.as_deref() {
        b = b.with_region(region);
    } else if env_region.is_none() {
        if let Some(region) = profile.as_ref().and_then(|p| p.region.as_deref()) {
            b = b.with_region(region);
        }
    }
    // The profile's endpoint_url, when no variable names S3's endpoint.
    let env_endpoint = ["AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ENDPOINT"]
        .into_iter()
        .any(|v| env_var(v).is_some());
    if let Some(p) = profile.as_ref().filter(|_| !env_endpoint) {
        if let Some(endpoint) = p.endpoint_url.as_deref() {
            let source = format!("endpoint_url of {}", p.from);
            super::plain_http_allowed(endpoint, spec, at, &source)?;
            b = b.with_endpoint(endpoint);
        }
    }
    // The region STS is called in when the role's profile names none.
    let region = spec_region
        .or(env_region)
        .or_else(|| profile.as_ref().and_then(|p| p.region.clone()))
        .unwrap_or_else(|| "us-east-1".to_string());
    let b = with_profile_credentials(b, profile, spec.insecure_allow_http, &region, at)?;
    finish(b, client_options(spec), connector, at, bucket)
}

/// `object_store`'s builder from the environment, with the variables the AWS SDKs name
/// differently: `AWS_EC2_METADATA_SERVICE_ENDPOINT` (the instance metadata service;
/// `object_store` reads `AWS_METADATA_ENDPOINT`).
fn from_sdk_env() -> AmazonS3Builder {
    let b = AmazonS3Builder::from_env();
    match env_var("AWS_EC2_METADATA_SERVICE_ENDPOINT") {
        Some(endpoint) if env_var("AWS_METADATA_ENDPOINT").is_none() => {
            b.with_metadata_endpoint(endpoint.trim_end_matches('/'))
        }
        _ => b,
    }
}

fn env_var(var: &str) -> Option<String> {
    std::env::var(var).ok().filter(|v| !v.is_empty())
}

/// The shared files' profile, or the environment's web identity, when the environment has no
/// keys of its own.
fn profile(at: &str) -> Result<Option<aws_profile::Profile>, Error> {
    aws_profile::from_environment(&|k| std::env::var(k).ok()).map_err(|e| credentials_error(at, e))
}

fn credentials_error(at: &str, e: String) -> Error {
    Error::invalid_argument(format!("{at}: AWS credentials: {e}"))
}

fn with_profile_credentials(
    b: AmazonS3Builder,
    profile: Option<aws_profile::Profile>,
    allow_http: bool,
    region: &str,
    at: &str,
) -> Result<AmazonS3Builder, Error> {
    let Some(profile) = profile else {
        return Ok(b);
    };
    let default_endpoint = profile.endpoint_url.as_deref();
    Ok(match profile.source {
        None => b,
        // Static keys stay the builder's own, as when they come from the environment.
        Some(Source::Static(c)) => {
            let b = b
                .with_access_key_id(c.access_key_id)
                .with_secret_access_key(c.secret_access_key);
            match c.session_token {
                Some(token) => b.with_token(token),
                None => b,
            }
        }
        Some(source) => {
            b.with_credentials(provider(source, allow_http, region, default_endpoint, at)?)
        }
    })
}

/// The credential provider of a source; roles are assumed through STS with the provider of
/// their own source.
/// `default_endpoint`: the selected profile's `endpoint_url`, for roles whose profile names
/// none.
fn provider(
    source: Source,
    allow_http: bool,
    region: &str,
    default_endpoint: Option<&str>,
    at: &str,
) -> Result<AwsCredentialProvider, Error> {
    let sts = |call: Call,
               role_region: Option<String>,
               endpoint_url: Option<String>,
               from: String|
     -> Result<AwsCredentialProvider, Error> {
        let region = role_region.unwrap_or_else(|| region.to_string());
        let env = |k: &str| std::env::var(k).ok();
        let endpoint =
            aws_sts::endpoint(&env, endpoint_url.as_deref().or(default_endpoint), &region);
        if endpoint.starts_with("http://") && !allow_http {
            return Err(Error::invalid_argument(format!(
                "{at}.insecure_allow_http: the STS endpoint {endpoint} (for {from}) is plain \
                 HTTP, which this store refuses unless insecure_allow_http is true (for \
                 emulators and tests; use https:// in production)"
            )));
        }
        let p = StsCredentials::new(call, endpoint, region, allow_http, from)
            .map_err(|e| credentials_error(at, e))?;
        Ok(Arc::new(p))
    };
    Ok(match source {
        Source::Static(c) => Arc::new(StaticCredentialProvider::new(AwsCredential {
            key_id: c.access_key_id,
            secret_key: c.secret_access_key,
            token: c.session_token,
        })),
        Source::Process { command, from } => Arc::new(ProcessCredentials::new(command, from)),
        Source::AssumeRole(r) => {
            let r = *r;
            let source = provider(r.source, allow_http, region, default_endpoint, at)?;
            let call = Call::AssumeRole {
                source,
                role_arn: r.role_arn,
                session_name: r.session_name,
                external_id: r.external_id,
                duration_seconds: r.duration_seconds,
            };
            sts(call, r.region, r.endpoint_url, r.from)?
        }
        Source::WebIdentity(w) => {
            let call = Call::WebIdentity {
                token_file: w.token_file,
                role_arn: w.role_arn,
                session_name: w.session_name,
                duration_seconds: w.duration_seconds,
            };
            sts(call, w.region, w.endpoint_url, w.from)?
        }
    })
}

/// Explicit settings of an S3-compatible provider.
pub struct S3Compatible<'a> {
    pub endpoint: String,
    pub region: &'a str,
    pub bucket: &'a str,
    pub access_key_id: Option<&'a str>,
    pub secret_access_key: Option<&'a str>,
    /// `insecure_allow_http`: also lets a role be assumed at a plain `http://` STS endpoint.
    pub allow_http: bool,
}

/// A client of an S3-compatible service: credentials from the keys when given, else from the
/// environment as for `aws`.
pub fn s3_compatible(
    s: S3Compatible<'_>,
    options: ClientOptions,
    connector: CountingConnector,
    at: &str,
) -> Result<Client, Error> {
    let mut b = from_sdk_env()
        .with_endpoint(s.endpoint)
        .with_region(s.region)
        .with_bucket_name(s.bucket);
    match (s.access_key_id, s.secret_access_key) {
        (Some(id), Some(secret)) => {
            b = b.with_access_key_id(id).with_secret_access_key(secret);
        }
        (None, None) => {
            b = with_profile_credentials(b, profile(at)?, s.allow_http, s.region, at)?;
        }
        (Some(_), None) => {
            return Err(Error::invalid_argument(format!(
                "{at}.secret_access_key: required with access_key_id"
            )))
        }
        (None, Some(_)) => {
            return Err(Error::invalid_argument(format!(
                "{at}.access_key_id: required with secret_access_key"
            )))
        }
    }
    finish(b, options, connector, at, s.bucket)
}

fn finish(
    b: AmazonS3Builder,
    options: ClientOptions,
    connector: CountingConnector,
    at: &str,
    bucket: &str,
) -> Result<Client, Error> {
    let s3 = b
        .with_client_options(options)
        .with_retry(no_client_retries())
        .with_http_connector(connector)
        .build()
        .map_err(|e| Error::invalid_argument(format!("{at}: {e}")))?;
    let s3 = Arc::new(s3);
    Ok(Client {
        objects: s3.clone(),
        multipart: s3,
        location: format!("bucket {bucket:?}"),
        min_part_size: super::upload::MIN_PART_SIZE,
        max_parts: super::upload::MAX_PARTS,
    })
}
