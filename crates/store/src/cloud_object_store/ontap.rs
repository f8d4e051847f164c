//! Provider `ontap`: NetApp ONTAP S3, an S3-compatible server at `endpoint` (required), with
//! `vserver_name` (the SVM, required, as in NativeLink) and an optional `root_certificates`
//! PEM file to trust for it. Credentials from the AWS environment variables.

use cairn_config::stores::CloudObjectStore as Spec;
use cairn_core::Error;
use object_store::Certificate;

use super::aws::{s3_compatible, S3Compatible};
use super::transport::CountingConnector;
use super::{client_options, required, Client};

pub fn check(spec: &Spec, at: &str) -> Result<(), Error> {
    required(&spec.endpoint, "endpoint", at)?;
    required(&spec.vserver_name, "vserver_name", at)?;
    required(&spec.bucket, "bucket", at)?;
    Ok(())
}

pub fn client(spec: &Spec, at: &str, connector: CountingConnector) -> Result<Client, Error> {
    let mut options = client_options(spec);
    if let Some(file) = spec.root_certificates.as_deref() {
        let pem = std::fs::read(file).map_err(|e| {
            Error::invalid_argument(format!("{at}.root_certificates: reading {file}: {e}"))
        })?;
        let certs = Certificate::from_pem_bundle(&pem)
            .map_err(|e| Error::invalid_argument(format!("{at}.root_certificates: {file}: {e}")))?;
        for c in certs {
            options = options.with_root_certificate(c);
        }
    }
    s3_compatible(
        S3Compatible {
            endpoint: required(&spec.endpoint, "endpoint", at)?.to_string(),
            region: "us-east-1",
            bucket: required(&spec.bucket, "bucket", at)?,
            allow_http: spec.insecure_allow_http,
            access_key_id: None,
            secret_access_key: None,
        },
        options,
        connector,
        at,
    )
}
