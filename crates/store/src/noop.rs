//! `noop`: stores nothing and has nothing; writes succeed and are dropped.

use async_trait::async_trait;
use cairn_core::{BlobStream, Digest, Error};
use futures::StreamExt;

use crate::{Store, StoreInfo};

#[derive(Default)]
pub struct NoopStore;

impl NoopStore {
    pub fn new() -> NoopStore {
        NoopStore
    }
}

#[async_trait]
impl Store for NoopStore {
    async fn has_many(&self, keys: &[Digest]) -> Result<Vec<Option<u64>>, Error> {
        Ok(vec![None; keys.len()])
    }
    async fn get(&self, key: &Digest, _: u64, _: Option<u64>) -> Result<BlobStream, Error> {
        Err(Error::not_found(format!(
            "{key}: the noop store holds nothing"
        )))
    }
    async fn put(&self, _: &Digest, mut body: BlobStream) -> Result<(), Error> {
        // Drain so that the writer's stream completes normally.
        while let Some(chunk) = body.next().await {
            chunk?;
        }
        Ok(())
    }
    fn info(&self) -> StoreInfo {
        StoreInfo::leaf("noop")
    }
}
