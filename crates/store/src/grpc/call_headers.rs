//! The `grpc` store's `headers` (sent on every call) and `forward_headers` (copied from the
//! client request being served, through `crate::client_headers`).

use cairn_config::stores::GrpcStore as GrpcConfig;
use cairn_core::Error;

/// The headers every call carries: the static ones, and those copied from the client request.
#[derive(Debug, Clone, Default)]
pub(super) struct CallHeaders {
    pub(super) fixed: tonic::metadata::MetadataMap,
    pub(super) forward: Vec<String>,
}

impl CallHeaders {
    pub(super) fn from_config(cfg: &GrpcConfig) -> Result<CallHeaders, Error> {
        use tonic::metadata::{AsciiMetadataKey, BinaryMetadataKey, MetadataValue};
        let mut fixed = tonic::metadata::MetadataMap::new();
        for (name, value) in &cfg.headers {
            let at = format!("grpc.headers.{name}");
            let bad = |e: &dyn std::fmt::Display| Error::invalid_argument(format!("{at}: {e}"));
            if name.ends_with("-bin") {
                let key = BinaryMetadataKey::from_bytes(name.as_bytes()).map_err(|e| bad(&e))?;
                fixed.insert_bin(key, MetadataValue::from_bytes(value.as_bytes()));
            } else {
                let key = AsciiMetadataKey::from_bytes(name.as_bytes()).map_err(|e| bad(&e))?;
                let v = value
                    .parse()
                    .map_err(|_| bad(&"the value is not printable ASCII"))?;
                fixed.insert(key, v);
            }
        }
        let mut forward = Vec::new();
        for (i, name) in cfg.forward_headers.iter().enumerate() {
            let lower = name.to_ascii_lowercase();
            let valid = if lower.ends_with("-bin") {
                tonic::metadata::BinaryMetadataKey::from_bytes(lower.as_bytes()).is_ok()
            } else {
                tonic::metadata::AsciiMetadataKey::from_bytes(lower.as_bytes()).is_ok()
            };
            if !valid {
                return Err(Error::invalid_argument(format!(
                    "grpc.forward_headers[{i}]: {name:?} is not a header name"
                )));
            }
            forward.push(lower);
        }
        Ok(CallHeaders { fixed, forward })
    }

    /// Adds the headers to a request.
    pub(super) fn apply(&self, md: &mut tonic::metadata::MetadataMap) {
        use tonic::metadata::KeyAndValueRef;
        for kv in self.fixed.iter() {
            match kv {
                KeyAndValueRef::Ascii(k, v) => {
                    md.insert(k.clone(), v.clone());
                }
                KeyAndValueRef::Binary(k, v) => {
                    md.insert_bin(k.clone(), v.clone());
                }
            }
        }
        if self.forward.is_empty() {
            return;
        }
        let Some(client) = crate::client_headers::current() else {
            return;
        };
        for name in &self.forward {
            if name.ends_with("-bin") {
                let Ok(k) = tonic::metadata::BinaryMetadataKey::from_bytes(name.as_bytes()) else {
                    continue;
                };
                for v in client.get_all_bin(name.as_str()) {
                    md.append_bin(k.clone(), v.clone());
                }
            } else {
                let Ok(k) = tonic::metadata::AsciiMetadataKey::from_bytes(name.as_bytes()) else {
                    continue;
                };
                for v in client.get_all(name.as_str()) {
                    md.append(k.clone(), v.clone());
                }
            }
        }
    }
}
