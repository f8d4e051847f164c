//! `completeness_checking`: an action cache that answers only with results whose every
//! referenced blob is in the CAS: output files, stdout and stderr, each output directory's
//! `Tree` blob and every file inside those trees. A result with a missing blob is reported as
//! NOT_FOUND, so that the client re-runs the action instead of failing to download outputs.

use async_trait::async_trait;
use bytes::Bytes;
use cairn_core::proto::build::bazel::remote::execution::v2::{ActionResult, Tree};
use cairn_core::{stream, BlobStream, Digest, Error};
use prost::Message;

use crate::{check_range, Health, Store, StoreExt, StoreInfo, StoreRef};

/// Largest action result or tree this store decodes (they are small protos).
const MAX_PROTO: usize = 64 << 20;

pub struct CompletenessCheckingStore {
    backend: StoreRef,
    cas: StoreRef,
}

impl CompletenessCheckingStore {
    pub fn new(backend: StoreRef, cas: StoreRef) -> CompletenessCheckingStore {
        CompletenessCheckingStore { backend, cas }
    }

    /// Reads the result and checks it; NOT_FOUND names the first missing blob.
    async fn checked(&self, key: &Digest) -> Result<Bytes, Error> {
        let data = self.backend.get_all(key, MAX_PROTO).await?;
        let result = ActionResult::decode(data.as_ref())
            .map_err(|e| Error::data_loss(format!("action result {key} does not decode: {e}")))?;
        let f = key.function();
        let parse = |d: &cairn_core::proto::build::bazel::remote::execution::v2::Digest| {
            Digest::from_proto_with(f, d)
                .map_err(|e| Error::data_loss(format!("action result {key}: {}", e.message)))
        };
        let mut needed: Vec<Digest> = Vec::new();
        for file in &result.output_files {
            if let Some(d) = &file.digest {
                needed.push(parse(d)?);
            }
        }
        for d in [&result.stdout_digest, &result.stderr_digest]
            .into_iter()
            .flatten()
        {
            needed.push(parse(d)?);
        }
        let mut trees = Vec::new();
        for dir in &result.output_directories {
            if let Some(d) = &dir.tree_digest {
                trees.push(parse(d)?);
            }
        }
        needed.extend(trees.iter().copied());
        self.require(key, &needed).await?;
        for tree_digest in trees {
            let tree_bytes = self.cas.get_all(&tree_digest, MAX_PROTO).await?;
            let tree = Tree::decode(tree_bytes.as_ref()).map_err(|e| {
                Error::data_loss(format!(
                    "tree {tree_digest} of action result {key} does not decode: {e}"
                ))
            })?;
            let mut files = Vec::new();
            for dir in tree.root.iter().chain(tree.children.iter()) {
                for file in &dir.files {
                    if let Some(d) = &file.digest {
                        files.push(parse(d)?);
                    }
                }
            }
            self.require(key, &files).await?;
        }
        Ok(data)
    }

    async fn require(&self, key: &Digest, needed: &[Digest]) -> Result<(), Error> {
        let needed: Vec<Digest> = needed
            .iter()
            .copied()
            .filter(|d| !d.is_empty_blob())
            .collect();
        if needed.is_empty() {
            return Ok(());
        }
        let have = self.cas.has_many(&needed).await?;
        if let Some((d, _)) = needed.iter().zip(&have).find(|(_, h)| h.is_none()) {
            return Err(Error::not_found(format!(
                "action result {key} references {d}, which is not in the CAS"
            )));
        }
        Ok(())
    }
}

#[async_trait]
impl Store for CompletenessCheckingStore {
    async fn has_many(&self, keys: &[Digest]) -> Result<Vec<Option<u64>>, Error> {
        let mut out = Vec::with_capacity(keys.len());
        for k in keys {
            out.push(match self.checked(k).await {
                Ok(data) => Some(data.len() as u64),
                Err(e) if e.is_not_found() => None,
                Err(e) => return Err(e),
            });
        }
        Ok(out)
    }

    async fn get(
        &self,
        key: &Digest,
        offset: u64,
        length: Option<u64>,
    ) -> Result<BlobStream, Error> {
        let data = self.checked(key).await?;
        let (start, len) = check_range(key, data.len() as u64, offset, length)?;
        Ok(stream::once(
            data.slice(start as usize..(start + len) as usize),
        ))
    }

    async fn put(&self, key: &Digest, body: BlobStream) -> Result<(), Error> {
        self.backend.put(key, body).await
    }

    fn info(&self) -> StoreInfo {
        StoreInfo::wrapper(
            "completeness_checking",
            vec![
                ("backend", self.backend.info()),
                ("cas_store", self.cas.info()),
            ],
        )
    }

    async fn health(&self) -> Health {
        match self.backend.health().await {
            Health::Ok => self.cas.health().await,
            bad => bad,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::MemoryStore;
    use cairn_core::proto::build::bazel::remote::execution::v2 as re;
    use cairn_core::DigestFunction;
    use std::sync::Arc;

    #[tokio::test]
    async fn result_is_found_only_when_every_blob_is_present() {
        let f = DigestFunction::Sha256;
        let cas: StoreRef = Arc::new(MemoryStore::new(&Default::default()));
        let ac: StoreRef = Arc::new(MemoryStore::new(&Default::default()));
        let store = CompletenessCheckingStore::new(ac, cas.clone());

        let out = f.compute(b"output");
        let inner = f.compute(b"file in tree");
        let tree = re::Tree {
            root: Some(re::Directory {
                files: vec![re::FileNode {
                    name: "f".into(),
                    digest: Some(inner.to_proto()),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            children: vec![],
        };
        let tree_bytes = Bytes::from(tree.encode_to_vec());
        let tree_d = f.compute(&tree_bytes);
        let result = re::ActionResult {
            output_files: vec![re::OutputFile {
                path: "o".into(),
                digest: Some(out.to_proto()),
                ..Default::default()
            }],
            output_directories: vec![re::OutputDirectory {
                path: "d".into(),
                tree_digest: Some(tree_d.to_proto()),
                ..Default::default()
            }],
            stdout_digest: Some(f.empty_digest().to_proto()),
            ..Default::default()
        };
        let action = f.compute(b"action");
        store
            .put_bytes(&action, result.encode_to_vec().into())
            .await
            .unwrap();

        let e = store.get_all(&action, MAX_PROTO).await.unwrap_err();
        assert!(
            e.is_not_found() && e.message.contains("not in the CAS"),
            "{e}"
        );
        cas.put_bytes(&out, "output".into()).await.unwrap();
        cas.put_bytes(&tree_d, tree_bytes).await.unwrap();
        let e = store.get_all(&action, MAX_PROTO).await.unwrap_err();
        assert!(e.message.contains(&inner.hash_hex()), "{e}");
        assert_eq!(store.has(&action).await.unwrap(), None);
        cas.put_bytes(&inner, "file in tree".into()).await.unwrap();
        assert!(store.get_all(&action, MAX_PROTO).await.is_ok());
        assert!(store.has(&action).await.unwrap().is_some());
    }
}
