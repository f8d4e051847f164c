//! Provider `aws`: Amazon S3, or any S3-compatible server named by `AWS_ENDPOINT_URL` (as the
//! AWS SDK that NativeLink uses reads it). Credentials and the rest come from the standard
//! environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`,
//! `AWS_REGION`, web identity / IRSA, ECS and EC2 instance metadata), through
//! `object_store`'s `AmazonS3Builder::from_env`, and, when the environment has no keys, from the
//! shared files `~/.aws/credentials` and `~/.aws/config` ([`super::aws_profile`]). The ONTAP, R2
//! and OCI providers reuse [`s3_compatible`] with their own endpoint and keys.

use std::sync::Arc;

use cairn_config::stores::CloudObjectStore as Spec;
use cairn_core::Error;
use object_store::aws::AmazonS3Builder;
use object_store::ClientOptions;

use super::aws_profile;
use super::transport::CountingConnector;
use super::{client_options, no_client_retries, required, Client};

pub fn check(spec: &Spec, at: &str) -> Result<(), Error> {
    required(&spec.bucket, "bucket", at)?;
    Ok(())
}

pub fn client(spec: &Spec, at: &str, connector: CountingConnector) -> Result<Client, Error> {
    let bucket = required(&spec.bucket, "bucket", at)?;
    let mut b = AmazonS3Builder::from_env().with_bucket_name(bucket);
    let profile = profile(at)?;
    if let Some(region) = spec.region.as_deref().filter(|r| !r.is_empty()) {
        b = b.with_region(region);
    } else if !env_set("AWS_REGION") && !env_set("AWS_DEFAULT_REGION") {
        if let Some(region) = profile.as_ref().and_then(|p| p.region.as_deref()) {
            b = b.with_region(region);
        }
    }
    let b = with_profile_credentials(b, profile);
    finish(b, client_options(spec), connector, at, bucket)
}

fn env_set(var: &str) -> bool {
    std::env::var_os(var).is_some_and(|v| !v.is_empty())
}

/// The shared files' profile, when the environment has no keys of its own.
fn profile(at: &str) -> Result<Option<aws_profile::Profile>, Error> {
    aws_profile::from_environment(&|k| std::env::var(k).ok())
        .map_err(|e| Error::invalid_argument(format!("{at}: AWS credentials: {e}")))
}

fn with_profile_credentials(
    mut b: AmazonS3Builder,
    profile: Option<aws_profile::Profile>,
) -> AmazonS3Builder {
    if let Some((command, from)) = profile.as_ref().and_then(|p| p.process.clone()) {
        return b.with_credentials(std::sync::Arc::new(
            super::aws_process::ProcessCredentials::new(command, from),
        ));
    }
    if let Some(c) = profile.and_then(|p| p.credentials) {
        b = b
            .with_access_key_id(c.access_key_id)
            .with_secret_access_key(c.secret_access_key);
        if let Some(token) = c.session_token {
            b = b.with_token(token);
        }
    }
    b
}

/// Explicit settings of an S3-compatible provider.
pub struct S3Compatible<'a> {
    pub endpoint: String,
    pub region: &'a str,
    pub bucket: &'a str,
    pub access_key_id: Option<&'a str>,
    pub secret_access_key: Option<&'a str>,
}

/// A client of an S3-compatible service: credentials from the keys when given, else from the
/// environment as for `aws`.
pub fn s3_compatible(
    s: S3Compatible<'_>,
    options: ClientOptions,
    connector: CountingConnector,
    at: &str,
) -> Result<Client, Error> {
    let mut b = AmazonS3Builder::from_env()
        .with_endpoint(s.endpoint)
        .with_region(s.region)
        .with_bucket_name(s.bucket);
    match (s.access_key_id, s.secret_access_key) {
        (Some(id), Some(secret)) => {
            b = b.with_access_key_id(id).with_secret_access_key(secret);
        }
        (None, None) => b = with_profile_credentials(b, profile(at)?),
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
