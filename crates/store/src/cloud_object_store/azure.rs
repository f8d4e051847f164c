//! Provider `azure`: Azure Blob Storage, NativeLink's keys. The container URL is
//! `https://{account_name}.blob.core.windows.net/{container}`, or `{endpoint}/{container}`
//! when `endpoint` is set (an Azurite URL such as `http://127.0.0.1:10000/devstoreaccount1`),
//! or `sas_url` as it is (a container URL whose query is a SAS token, which is then the
//! credential). Otherwise credentials come from the environment through `object_store`'s
//! `MicrosoftAzureBuilder::from_env`: workload identity (`AZURE_CLIENT_ID`,
//! `AZURE_TENANT_ID`, `AZURE_FEDERATED_TOKEN_FILE`, as NativeLink uses), a service principal
//! secret, an account key (`AZURE_STORAGE_ACCOUNT_KEY`), a SAS (`AZURE_STORAGE_SAS_TOKEN`),
//! or the managed identity of the machine. Parts of a large blob are blocks, committed by
//! one Put Block List.

use std::sync::Arc;

use cairn_config::stores::CloudObjectStore as Spec;
use cairn_core::Error;
use object_store::azure::MicrosoftAzureBuilder;

use super::transport::CountingConnector;
use super::{client_options, no_client_retries, required, Client};

pub fn check(spec: &Spec, at: &str) -> Result<(), Error> {
    match spec.sas_url.as_deref() {
        Some(url) => {
            parse_sas_url(url, spec.account_name.as_deref(), at)?;
        }
        None => {
            required(&spec.account_name, "account_name", at)?;
            required(&spec.container, "container", at)?;
        }
    }
    Ok(())
}

/// A container URL with a SAS token, in parts.
#[derive(Debug, PartialEq, Eq)]
struct SasUrl {
    /// The account URL: the container URL without its last segment and query.
    endpoint: String,
    account: String,
    container: String,
    query: Vec<(String, String)>,
}

/// Splits `https://ACCOUNT.blob.core.windows.net/CONTAINER?SAS` (or the path-style
/// `http://HOST:PORT/ACCOUNT/CONTAINER?SAS` of an emulator). The account comes from
/// `account_name` when given, else from the host or the first path segment.
fn parse_sas_url(url: &str, account_name: Option<&str>, at: &str) -> Result<SasUrl, Error> {
    let bad = |why: &str| {
        Error::invalid_argument(format!(
            "{at}.sas_url: {why} (expected https://ACCOUNT.blob.core.windows.net/CONTAINER?SAS)"
        ))
    };
    let (base, query) = url
        .split_once('?')
        .ok_or_else(|| bad("no SAS token (query)"))?;
    let (scheme, rest) = base.split_once("://").ok_or_else(|| bad("not a URL"))?;
    let rest = rest.trim_end_matches('/');
    let (host, path) = rest
        .split_once('/')
        .ok_or_else(|| bad("no container in the path"))?;
    let (account_path, container) = match path.rsplit_once('/') {
        Some((a, c)) => (Some(a), c),
        None => (None, path),
    };
    if container.is_empty() {
        return Err(bad("no container in the path"));
    }
    let account = match (account_name.filter(|a| !a.is_empty()), account_path) {
        (Some(a), _) => a.to_string(),
        (None, Some(a)) => a.to_string(),
        (None, None) => host
            .split('.')
            .next()
            .filter(|a| !a.is_empty())
            .ok_or_else(|| bad("no account in the host"))?
            .to_string(),
    };
    let query = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect();
    let endpoint = match account_path {
        Some(a) => format!("{scheme}://{host}/{a}"),
        None => format!("{scheme}://{host}"),
    };
    Ok(SasUrl {
        endpoint,
        account,
        container: container.to_string(),
        query,
    })
}

/// Percent-decoding of a query component (`%2F` -> `/`, `+` kept: SAS signatures are
/// percent-encoded).
fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn client(spec: &Spec, at: &str, connector: CountingConnector) -> Result<Client, Error> {
    let mut b = MicrosoftAzureBuilder::from_env();
    let container = match spec.sas_url.as_deref() {
        Some(url) => {
            let sas = parse_sas_url(url, spec.account_name.as_deref(), at)?;
            super::plain_http_allowed(&sas.endpoint, spec, at, &format!("{at}.sas_url"))?;
            b = b
                .with_account(sas.account)
                .with_endpoint(sas.endpoint)
                .with_sas_authorization(sas.query);
            sas.container
        }
        None => {
            let account = required(&spec.account_name, "account_name", at)?;
            b = b.with_account(account);
            if let Some(endpoint) = spec.endpoint.as_deref().filter(|e| !e.is_empty()) {
                b = b.with_endpoint(endpoint.trim_end_matches('/').to_string());
            }
            required(&spec.container, "container", at)?.to_string()
        }
    };
    let azure = b
        .with_container_name(&container)
        .with_client_options(client_options(spec))
        .with_retry(no_client_retries())
        .with_http_connector(connector)
        .build()
        .map_err(|e| Error::invalid_argument(format!("{at}: {e}")))?;
    let azure = Arc::new(azure);
    Ok(Client {
        objects: azure.clone(),
        multipart: azure,
        location: format!("container {container:?}"),
        min_part_size: super::upload::MIN_PART_SIZE,
        max_parts: super::upload::MAX_PARTS,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sas_urls_split_into_account_container_and_token() {
        let s = parse_sas_url(
            "https://acct.blob.core.windows.net/cas?sv=2022-11-02&sig=a%2Fb%3D",
            None,
            "x",
        )
        .unwrap();
        assert_eq!(s.endpoint, "https://acct.blob.core.windows.net");
        assert_eq!((s.account.as_str(), s.container.as_str()), ("acct", "cas"));
        assert_eq!(
            s.query,
            vec![
                ("sv".to_string(), "2022-11-02".to_string()),
                ("sig".to_string(), "a/b=".to_string())
            ]
        );
        let s =
            parse_sas_url("http://127.0.0.1:10000/devstoreaccount1/c?sig=x", None, "x").unwrap();
        assert_eq!(s.endpoint, "http://127.0.0.1:10000/devstoreaccount1");
        assert_eq!(
            (s.account.as_str(), s.container.as_str()),
            ("devstoreaccount1", "c")
        );
        for bad in [
            "https://a.blob.core.windows.net/c",
            "https://a.blob.core.windows.net?sig=x",
            "nonsense?x=y",
        ] {
            let e = parse_sas_url(bad, None, "stores.A").unwrap_err();
            assert!(e.message.starts_with("stores.A.sas_url: "), "{e}");
        }
    }
}
