//! `ref_store`: another top-level store, by name, so that one store can sit in several trees.

use async_trait::async_trait;
use cairn_core::{BlobStream, Digest, Error};

use crate::{Health, Store, StoreInfo, StoreRef};

pub struct RefStore {
    name: String,
    target: StoreRef,
}

impl RefStore {
    pub fn new(name: String, target: StoreRef) -> RefStore {
        RefStore { name, target }
    }
    pub fn name(&self) -> &str {
        &self.name
    }
}

#[async_trait]
impl Store for RefStore {
    async fn has_many(&self, keys: &[Digest]) -> Result<Vec<Option<u64>>, Error> {
        self.target.has_many(keys).await
    }
    async fn get(
        &self,
        key: &Digest,
        offset: u64,
        length: Option<u64>,
    ) -> Result<BlobStream, Error> {
        self.target.get(key, offset, length).await
    }
    async fn put(&self, key: &Digest, body: BlobStream) -> Result<(), Error> {
        self.target.put(key, body).await
    }
    fn info(&self) -> StoreInfo {
        // The target is described under its own name; do not count its bytes twice.
        StoreInfo {
            detail: Some(self.name.clone()),
            ..StoreInfo::leaf("ref_store")
        }
    }
    async fn health(&self) -> Health {
        self.target.health().await
    }
}
