//! `verify`: checks the size (`verify_size`) and hash (`verify_hash`) of every upload against
//! its key before the backend commits it. The hash is computed once, as the bytes pass.

use async_trait::async_trait;
use cairn_config::stores::VerifyStore as VerifyConfig;
use cairn_core::{stream, BlobStream, Digest, Error};

use crate::{Health, Store, StoreInfo, StoreRef};

pub struct VerifyStore {
    backend: StoreRef,
    verify_size: bool,
    verify_hash: bool,
}

impl VerifyStore {
    pub fn new(cfg: &VerifyConfig, backend: StoreRef) -> VerifyStore {
        VerifyStore {
            backend,
            verify_size: cfg.verify_size,
            verify_hash: cfg.verify_hash,
        }
    }
}

#[async_trait]
impl Store for VerifyStore {
    async fn has_many(&self, keys: &[Digest]) -> Result<Vec<Option<u64>>, Error> {
        self.backend.has_many(keys).await
    }
    async fn get(
        &self,
        key: &Digest,
        offset: u64,
        length: Option<u64>,
    ) -> Result<BlobStream, Error> {
        self.backend.get(key, offset, length).await
    }
    async fn put(&self, key: &Digest, body: BlobStream) -> Result<(), Error> {
        let body = if self.verify_hash || self.verify_size {
            stream::verified(body, *key, self.verify_hash)
        } else {
            body
        };
        self.backend.put(key, body).await
    }
    fn info(&self) -> StoreInfo {
        StoreInfo::wrapper("verify", vec![("backend", self.backend.info())])
    }
    async fn health(&self) -> Health {
        self.backend.health().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::MemoryStore;
    use crate::{testutil, StoreExt};
    use cairn_core::{Code, DigestFunction};
    use std::sync::Arc;

    #[tokio::test]
    async fn rejects_mismatches_and_stores_nothing() {
        let mem: StoreRef = Arc::new(MemoryStore::new(&Default::default()));
        let cfg = VerifyConfig {
            backend: cairn_config::StoreSpec::Noop(Default::default()),
            verify_size: true,
            verify_hash: true,
        };
        let v = VerifyStore::new(&cfg, mem.clone());
        testutil::check_store_contract(&v).await;
        let d = DigestFunction::Sha256.compute(b"right");
        let e = v.put_bytes(&d, "wrong".into()).await.unwrap_err();
        assert_eq!(e.code, Code::InvalidArgument);
        assert_eq!(mem.has(&d).await.unwrap(), None);
    }
}
