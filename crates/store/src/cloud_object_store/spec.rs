//! The spec's check, shared by `cairn run` and `cairn check-config`: a known provider, only
//! its keys (the config struct holds every provider's keys, so that the file parses whatever
//! the provider), its required keys, and values in range. No I/O.

use cairn_config::stores::CloudObjectStore as Spec;
use cairn_core::Error;

use super::retry::RetryPolicy;
use super::{aws, azure, gcs, oci, ontap, r2};

/// The providers and the keys each takes beside the common ones.
pub(crate) const PROVIDERS: &[(&str, &[&str])] = &[
    ("aws", &["region", "bucket"]),
    (
        "gcs",
        &[
            "bucket",
            "resumable_chunk_size",
            "authentication_required",
            "connection_timeout_s",
            "read_timeout_s",
        ],
    ),
    (
        "azure",
        &["account_name", "container", "endpoint", "sas_url"],
    ),
    (
        "ontap",
        &["endpoint", "vserver_name", "bucket", "root_certificates"],
    ),
    (
        "r2",
        &["account_id", "bucket", "access_key_id", "secret_access_key"],
    ),
    (
        "oci",
        &[
            "namespace",
            "region",
            "bucket",
            "access_key_id",
            "secret_access_key",
        ],
    ),
];

/// The provider-specific keys present in a spec, by name.
fn present_keys(s: &Spec) -> Vec<&'static str> {
    let mut keys = Vec::new();
    let mut note = |name: &'static str, set: bool| {
        if set {
            keys.push(name)
        }
    };
    note("region", s.region.is_some());
    note("bucket", s.bucket.is_some());
    note("resumable_chunk_size", s.resumable_chunk_size.is_some());
    note(
        "authentication_required",
        s.authentication_required.is_some(),
    );
    note("connection_timeout_s", s.connection_timeout_s.is_some());
    note("read_timeout_s", s.read_timeout_s.is_some());
    note("account_name", s.account_name.is_some());
    note("container", s.container.is_some());
    note("endpoint", s.endpoint.is_some());
    note("sas_url", s.sas_url.is_some());
    note("vserver_name", s.vserver_name.is_some());
    note("root_certificates", s.root_certificates.is_some());
    note("account_id", s.account_id.is_some());
    note("access_key_id", s.access_key_id.is_some());
    note("secret_access_key", s.secret_access_key.is_some());
    note("namespace", s.namespace.is_some());
    keys
}

/// A required string key: present and not empty.
pub(crate) fn required<'a>(
    value: &'a Option<String>,
    key: &str,
    at: &str,
) -> Result<&'a str, Error> {
    match value.as_deref() {
        Some(v) if !v.trim().is_empty() => Ok(v),
        _ => Err(Error::invalid_argument(format!(
            "{at}.{key}: required for this provider"
        ))),
    }
}

/// Every check of the spec that needs no network: a known provider, only its keys, its
/// required keys, and values in range. `path` is the store's key path (`stores.CAS`).
pub fn check(spec: &Spec, path: &str) -> Result<(), Error> {
    check_at(spec, &format!("{path}.experimental_cloud_object_store"))
}

/// [`check`] of a spec at key path `at` itself (the `backend` of an
/// `ontap_s3_existence_cache`).
pub fn check_at(spec: &Spec, at: &str) -> Result<(), Error> {
    let names: Vec<&str> = PROVIDERS.iter().map(|(p, _)| *p).collect();
    let provider = spec.provider.as_deref().ok_or_else(|| {
        Error::invalid_argument(format!(
            "{at}.provider: required (one of {})",
            names.join(", ")
        ))
    })?;
    let Some((provider, allowed)) = PROVIDERS.iter().find(|(p, _)| *p == provider) else {
        return Err(Error::invalid_argument(format!(
            "{at}.provider: unknown provider {provider:?} (expected one of {})",
            names.join(", ")
        )));
    };
    for key in present_keys(spec) {
        if !allowed.contains(&key) {
            let owners: Vec<&str> = PROVIDERS
                .iter()
                .filter(|(_, keys)| keys.contains(&key))
                .map(|(p, _)| *p)
                .collect();
            let hint = if key == "endpoint" && *provider == "aws" {
                "; for an S3-compatible endpoint set AWS_ENDPOINT_URL in the environment".into()
            } else {
                String::new()
            };
            return Err(Error::invalid_argument(format!(
                "{at}.{key}: not a key of provider `{provider}` (it belongs to {}){hint}",
                owners.join(", ")
            )));
        }
    }
    if let Some(endpoint) = spec.endpoint.as_deref() {
        super::plain_http_allowed(endpoint, spec, at, &format!("{at}.endpoint"))?;
    }
    if *provider == "aws" {
        for var in ["AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ENDPOINT"] {
            if let Ok(endpoint) = std::env::var(var) {
                super::plain_http_allowed(&endpoint, spec, at, var)?;
            }
        }
    }
    RetryPolicy::from_config(spec.retry.as_ref(), &format!("{at}.retry"))?;
    if spec.multipart_max_concurrent_uploads == Some(0) {
        return Err(Error::invalid_argument(format!(
            "{at}.multipart_max_concurrent_uploads: must be at least 1"
        )));
    }
    match *provider {
        "aws" => aws::check(spec, at),
        "azure" => azure::check(spec, at),
        "gcs" => gcs::check(spec, at),
        "ontap" => ontap::check(spec, at),
        "r2" => r2::check(spec, at),
        "oci" => oci::check(spec, at),
        other => Err(Error::unimplemented(format!(
            "{at}.provider: `{other}` parses but is not built yet in this version of Cairn \
             (every provider of NativeLink 1.6.6 is)"
        ))),
    }
}
