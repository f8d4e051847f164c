//! Provider `oci`: Oracle Cloud Object Storage through its S3 compatibility API, path-style at
//! `https://{namespace}.compat.objectstorage.{region}.oci.customer-oci.com`, signed for
//! `region`, with a Customer Secret Key (`access_key_id`, `secret_access_key`) or the AWS
//! environment's credentials.

use cairn_config::stores::CloudObjectStore as Spec;
use cairn_core::Error;

use super::aws::{s3_compatible, S3Compatible};
use super::transport::CountingConnector;
use super::{client_options, required, Client};

pub fn check(spec: &Spec, at: &str) -> Result<(), Error> {
    required(&spec.namespace, "namespace", at)?;
    required(&spec.region, "region", at)?;
    required(&spec.bucket, "bucket", at)?;
    Ok(())
}

pub fn client(spec: &Spec, at: &str, connector: CountingConnector) -> Result<Client, Error> {
    let namespace = required(&spec.namespace, "namespace", at)?;
    let region = required(&spec.region, "region", at)?;
    s3_compatible(
        S3Compatible {
            endpoint: format!(
                "https://{namespace}.compat.objectstorage.{region}.oci.customer-oci.com"
            ),
            region,
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
