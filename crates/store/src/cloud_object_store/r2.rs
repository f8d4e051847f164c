//! Provider `r2`: Cloudflare R2, S3-compatible at `https://{account_id}.r2.cloudflarestorage.com`
//! (region `auto`), with `access_key_id` and `secret_access_key` or the AWS environment's
//! credentials. R2 wants every part but the last of one size, which the uploads keep.

use cairn_config::stores::CloudObjectStore as Spec;
use cairn_core::Error;

use super::aws::{s3_compatible, S3Compatible};
use super::transport::CountingConnector;
use super::{client_options, required, Client};

pub fn check(spec: &Spec, at: &str) -> Result<(), Error> {
    required(&spec.account_id, "account_id", at)?;
    required(&spec.bucket, "bucket", at)?;
    Ok(())
}

pub fn client(spec: &Spec, at: &str, connector: CountingConnector) -> Result<Client, Error> {
    let account = required(&spec.account_id, "account_id", at)?;
    s3_compatible(
        S3Compatible {
            endpoint: format!("https://{account}.r2.cloudflarestorage.com"),
            region: "auto",
            bucket: required(&spec.bucket, "bucket", at)?,
            allow_http: spec.insecure_allow_http,
            access_key_id: spec.access_key_id.as_deref(),
            secret_access_key: spec.secret_access_key.as_deref(),
        },
        client_options(spec),
        connector,
        at,
    )
}
