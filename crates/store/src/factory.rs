//! Builds the config's `stores` into a map from name to store. This and the config enum are
//! the only places that list every store kind.
//!
//! Stores are built in file order; a `ref_store` naming a store that comes later builds that
//! one first, and a cycle of references is an error naming it.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use cairn_config::stores::StoreSpec;
use cairn_config::NamedList;
use cairn_core::Error;

use crate::{
    cloud_object_store, completeness_checking, compression, dedup, existence_cache, fast_slow,
    filesystem, grpc, memory, noop, ontap_existence_cache, redis_store, ref_store, shard,
    size_partitioning, verify, StoreRef,
};

/// Top-level stores by name.
pub type StoreMap = BTreeMap<String, StoreRef>;

/// Builds every named store.
pub async fn build_stores(specs: &NamedList<StoreSpec>) -> Result<StoreMap, Error> {
    Ok(build_store_tree(specs).await?.stores)
}

/// Every store built from a config: the named ones, and every node of their trees by key
/// path (`stores.WORKER_CAS.fast_slow.fast`), with the filesystem stores also by their concrete
/// type (a worker hardlinks inputs out of one).
#[derive(Default, Clone)]
pub struct StoreTree {
    pub stores: StoreMap,
    pub nodes: BTreeMap<String, StoreRef>,
    pub filesystems: BTreeMap<String, Arc<filesystem::FilesystemStore>>,
}

/// What can be checked of a store spec without building it (no file or network I/O but
/// reading TLS files): kinds not built yet, the `grpc` store's endpoints and TLS files.
/// Building calls it first, and `cairn check-config` calls it, so both give the same verdict.
pub fn check_spec(spec: &StoreSpec, path: &str) -> Result<(), Error> {
    match spec {
        StoreSpec::ExperimentalCloudObjectStore(c) => cloud_object_store::check(c, path)?,
        StoreSpec::OntapS3ExistenceCache(c) => ontap_existence_cache::check(c, path)?,
        StoreSpec::ExperimentalMongo(_) => {
            return Err(Error::unimplemented(format!(
            "{path}: store kind `experimental_mongo` parses but is not built yet in this version \
                 of Cairn (there is no MongoDB server to test it against); use redis_store, \
                 experimental_cloud_object_store or filesystem"
        )))
        }
        StoreSpec::Grpc(c) => {
            grpc::check(c).map_err(|e| e.context(path))?;
        }
        StoreSpec::RedisStore(c) => {
            redis_store::RedisStore::new(path, c)?;
        }
        _ => {}
    }
    for (key, child) in spec.children() {
        check_spec(child, &format!("{path}.{}.{key}", spec.kind()))?;
    }
    Ok(())
}

/// What a store spec asks for that works but is a hazard, one message per finding: a `dedup`
/// whose index and content share a place. `cairn check-config` prints them; `cairn run` logs
/// them as warnings at start.
pub fn spec_warnings(spec: &StoreSpec, path: &str) -> Vec<String> {
    let mut out = Vec::new();
    if let StoreSpec::Dedup(d) = spec {
        out.extend(dedup_shared_place(d, path));
    }
    for (key, child) in spec.children() {
        out.extend(spec_warnings(
            child,
            &format!("{path}.{}.{key}", spec.kind()),
        ));
    }
    out
}

/// Where a leaf store keeps its entries, when that place can be shared by two stores of one
/// config: a bucket (or container) and prefix, a Redis deployment and prefix, a directory.
fn namespace(spec: &StoreSpec) -> Option<String> {
    let cloud = |c: &cairn_config::stores::CloudObjectStore, provider: &str| {
        format!(
            "{provider} {} bucket {:?} prefix {:?}",
            [
                &c.endpoint,
                &c.account_name,
                &c.account_id,
                &c.namespace,
                &c.region
            ]
            .iter()
            .filter_map(|v| v.as_deref())
            .collect::<Vec<_>>()
            .join(" "),
            c.bucket.as_deref().or(c.container.as_deref()).unwrap_or(""),
            c.key_prefix.as_deref().unwrap_or("")
        )
    };
    match spec {
        StoreSpec::ExperimentalCloudObjectStore(c) => {
            Some(cloud(c, c.provider.as_deref().unwrap_or("")))
        }
        StoreSpec::OntapS3ExistenceCache(c) => Some(cloud(&c.backend, "ontap")),
        StoreSpec::Filesystem(f) => Some(format!("directory {:?}", f.content_path)),
        StoreSpec::RedisStore(r) => {
            let mut addresses = r.addresses.clone();
            addresses.sort();
            Some(format!(
                "redis {} prefix {:?}",
                addresses.join(","),
                r.key_prefix.as_deref().unwrap_or("")
            ))
        }
        _ => None,
    }
}

/// Every leaf below `spec` with a shareable place: (namespace, key path).
fn namespaces(spec: &StoreSpec, path: &str, out: &mut Vec<(String, String)>) {
    if let Some(ns) = namespace(spec) {
        out.push((ns, format!("{path}.{}", spec.kind())));
    }
    for (key, child) in spec.children() {
        namespaces(child, &format!("{path}.{}.{key}", spec.kind()), out);
    }
}

/// The places of the leaves of named store `name` (following `ref_store`), each with its key
/// path: where a CAS and an action cache must not meet (see `cairn check-config`).
pub fn places_of(stores: &NamedList<StoreSpec>, name: &str) -> Vec<(String, String)> {
    fn walk(
        stores: &NamedList<StoreSpec>,
        spec: &StoreSpec,
        path: &str,
        depth: usize,
        out: &mut Vec<(String, String)>,
    ) {
        if depth > 16 {
            return; // a cycle of refs, refused by the builder with its own message
        }
        if let Some(ns) = namespace(spec) {
            out.push((ns, format!("{path}.{}", spec.kind())));
        }
        if let StoreSpec::RefStore(r) = spec {
            if let Some(target) = stores.get(&r.name) {
                walk(
                    stores,
                    target,
                    &format!("stores.{}", r.name),
                    depth + 1,
                    out,
                );
            }
        }
        for (key, child) in spec.children() {
            if matches!(spec, StoreSpec::CompletenessChecking(_)) && key == "cas_store" {
                continue; // only read, to check that results' outputs exist
            }
            walk(
                stores,
                child,
                &format!("{path}.{}.{key}", spec.kind()),
                depth + 1,
                out,
            );
        }
    }
    let mut out = Vec::new();
    if let Some(spec) = stores.get(name) {
        walk(stores, spec, &format!("stores.{name}"), 0, &mut out);
    }
    out
}

/// A dedup store's index and content sharing a place: the index entry of a blob of one chunk
/// and that chunk have the same key, so each overwrites the other. Reads stay safe (every
/// chunk's hash is checked, so a clobbered one is DATA_LOSS, not wrong bytes), but such blobs
/// are lost. (NativeLink 1.6.6's `ontap_backend.json5` example has this shape.)
fn dedup_shared_place(d: &cairn_config::stores::DedupStore, path: &str) -> Option<String> {
    let (mut index, mut content) = (Vec::new(), Vec::new());
    namespaces(
        &d.index_store,
        &format!("{path}.dedup.index_store"),
        &mut index,
    );
    namespaces(
        &d.content_store,
        &format!("{path}.dedup.content_store"),
        &mut content,
    );
    index.iter().find_map(|(ns, at)| {
        let (_, other) = content.iter().find(|(n, _)| n == ns)?;
        Some(format!(
            "{path}.dedup: index_store and content_store both keep their entries in {ns} \
             ({at} and {other}); a blob of one chunk and its index entry share a key there and \
             overwrite each other, so such blobs are lost (reads fail with DATA_LOSS). Give \
             them different key_prefix (or content_path) values"
        ))
    })
}

/// Builds every named store and records each node.
pub async fn build_store_tree(specs: &NamedList<StoreSpec>) -> Result<StoreTree, Error> {
    for named in specs.iter() {
        check_spec(&named.spec, &format!("stores.{}", named.name))?;
    }
    let mut b = Builder {
        specs,
        built: StoreMap::new(),
        stack: Vec::new(),
        nodes: BTreeMap::new(),
        filesystems: BTreeMap::new(),
    };
    for named in specs.iter() {
        b.build_named(&named.name).await?;
    }
    Ok(StoreTree {
        stores: b.built,
        nodes: b.nodes,
        filesystems: b.filesystems,
    })
}

/// Builds one spec that may refer (`ref_store`) to already built named stores; `path` is its
/// key path for error messages.
pub async fn build_spec(spec: &StoreSpec, named: &StoreMap, path: &str) -> Result<StoreRef, Error> {
    check_spec(spec, path)?;
    let empty = NamedList::default();
    let mut b = Builder {
        specs: &empty,
        built: named.clone(),
        stack: Vec::new(),
        nodes: BTreeMap::new(),
        filesystems: BTreeMap::new(),
    };
    b.build_spec(spec, path.to_string()).await
}

struct Builder<'a> {
    specs: &'a NamedList<StoreSpec>,
    built: StoreMap,
    stack: Vec<String>,
    nodes: BTreeMap<String, StoreRef>,
    filesystems: BTreeMap<String, Arc<filesystem::FilesystemStore>>,
}

type BuildFuture<'b> = Pin<Box<dyn Future<Output = Result<StoreRef, Error>> + Send + 'b>>;

impl<'a> Builder<'a> {
    fn build_named<'b>(&'b mut self, name: &'b str) -> BuildFuture<'b> {
        Box::pin(async move {
            if let Some(s) = self.built.get(name) {
                return Ok(s.clone());
            }
            if self.stack.iter().any(|n| n == name) {
                return Err(Error::invalid_argument(format!(
                    "stores: ref_store cycle: {} -> {name}",
                    self.stack.join(" -> ")
                )));
            }
            let spec = self.specs.get(name).ok_or_else(|| {
                let known: Vec<&str> = self.specs.iter().map(|n| n.name.as_str()).collect();
                Error::invalid_argument(format!(
                    "no store named {name:?} (stores are: {})",
                    known.join(", ")
                ))
            })?;
            self.stack.push(name.to_string());
            let path = format!("stores.{name}");
            let store = self.build_spec(spec, path).await;
            self.stack.pop();
            let store = store?;
            self.built.insert(name.to_string(), store.clone());
            Ok(store)
        })
    }

    fn build_spec<'b>(&'b mut self, spec: &'b StoreSpec, path: String) -> BuildFuture<'b> {
        Box::pin(async move {
            let at = |key: &str| format!("{path}.{}.{key}", spec.kind());
            let store: StoreRef = match spec {
                StoreSpec::Memory(c) => Arc::new(memory::MemoryStore::new(c)),
                StoreSpec::Filesystem(c) => {
                    let fs = Arc::new(
                        filesystem::FilesystemStore::open(c)
                            .await
                            .map_err(|e| e.context(&path))?
                            .named(&format!("{path}.filesystem")),
                    );
                    self.filesystems
                        .insert(format!("{path}.filesystem"), fs.clone());
                    fs
                }
                StoreSpec::FastSlow(c) => {
                    let fast = self.build_spec(&c.fast, at("fast")).await?;
                    let slow = self.build_spec(&c.slow, at("slow")).await?;
                    Arc::new(
                        fast_slow::FastSlowStore::new(c, fast, slow)
                            .map_err(|e| e.context(&path))?,
                    )
                }
                StoreSpec::Verify(c) => {
                    let backend = self.build_spec(&c.backend, at("backend")).await?;
                    Arc::new(verify::VerifyStore::new(c, backend))
                }
                StoreSpec::Compression(c) => {
                    let backend = self.build_spec(&c.backend, at("backend")).await?;
                    compression::build(c, backend).map_err(|e| e.context(&path))?
                }
                StoreSpec::Dedup(c) => {
                    let index = self.build_spec(&c.index_store, at("index_store")).await?;
                    let content = self
                        .build_spec(&c.content_store, at("content_store"))
                        .await?;
                    dedup::build(c, index, content).map_err(|e| e.context(&path))?
                }
                StoreSpec::SizePartitioning(c) => {
                    let lower = self.build_spec(&c.lower_store, at("lower_store")).await?;
                    let upper = self.build_spec(&c.upper_store, at("upper_store")).await?;
                    Arc::new(size_partitioning::SizePartitioningStore::new(
                        c.size.0, lower, upper,
                    ))
                }
                StoreSpec::Shard(c) => {
                    let mut stores = Vec::new();
                    for (i, w) in c.stores.iter().enumerate() {
                        let s = self
                            .build_spec(&w.store, format!("{path}.shard.stores[{i}].store"))
                            .await?;
                        stores.push((s, w.weight.unwrap_or(1)));
                    }
                    shard::build(stores).map_err(|e| e.context(&path))?
                }
                StoreSpec::ExistenceCache(c) => {
                    let backend = self.build_spec(&c.backend, at("backend")).await?;
                    existence_cache::build(c, backend).map_err(|e| e.context(&path))?
                }
                StoreSpec::CompletenessChecking(c) => {
                    let backend = self.build_spec(&c.backend, at("backend")).await?;
                    let cas = self.build_spec(&c.cas_store, at("cas_store")).await?;
                    Arc::new(completeness_checking::CompletenessCheckingStore::new(
                        backend, cas,
                    ))
                }
                StoreSpec::Noop(_) => Arc::new(noop::NoopStore::new()),
                StoreSpec::CacheMetrics(c) => {
                    let backend = self.build_spec(&c.backend, at("backend")).await?;
                    Arc::new(crate::cache_metrics::CacheMetricsStore::new(
                        c.cache_type.clone(),
                        backend,
                    ))
                }
                StoreSpec::RefStore(c) => {
                    let target = self
                        .build_named(&c.name)
                        .await
                        .map_err(|e| e.context(&path))?;
                    Arc::new(ref_store::RefStore::new(c.name.clone(), target))
                }
                StoreSpec::Grpc(c) => {
                    Arc::new(grpc::GrpcStore::new(c).map_err(|e| e.context(&path))?)
                }
                StoreSpec::RedisStore(c) => Arc::new(redis_store::RedisStore::new(&path, c)?),
                StoreSpec::ExperimentalCloudObjectStore(c) => {
                    Arc::new(cloud_object_store::CloudObjectStore::new(c, &path)?)
                }
                StoreSpec::OntapS3ExistenceCache(c) => {
                    Arc::new(ontap_existence_cache::OntapExistenceCache::new(c, &path)?)
                }
                StoreSpec::ExperimentalMongo(_) => {
                    return Err(check_spec(spec, &path).err().unwrap_or_else(|| {
                        Error::internal(format!("{path}: {} is not built", spec.kind()))
                    }))
                }
            };
            let store = crate::traced::wrap(store, &path, spec.kind());
            self.nodes.insert(path.clone(), store.clone());
            Ok(store)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::StoreExt;

    #[test]
    fn a_dedup_whose_index_and_content_share_a_place_is_warned_of() {
        let tree = |index_prefix: &str| {
            format!(
                r#"{{stores: {{CAS: {{dedup: {{
                    index_store: {{fast_slow: {{
                        fast: {{memory: {{}}}},
                        slow: {{redis_store: {{addresses: ["redis://127.0.0.1:1"], key_prefix: "{index_prefix}"}}}},
                    }}}},
                    content_store: {{compression: {{compression_algorithm: {{lz4: {{}}}}, backend:
                        {{redis_store: {{addresses: ["redis://127.0.0.1:1"], key_prefix: "c/"}}}}}}}},
                }}}}}}}}"#
            )
        };
        let cfg = cairn_config::parse_str("t.json5", &tree("c/")).unwrap();
        let spec = &cfg.stores.iter().next().unwrap().spec;
        check_spec(spec, "stores.CAS").unwrap();
        let w = spec_warnings(spec, "stores.CAS");
        assert_eq!(w.len(), 1, "{w:?}");
        let e = &w[0];
        assert!(
            e.contains("stores.CAS.dedup: index_store and content_store both")
                && e.contains("stores.CAS.dedup.index_store.fast_slow.slow.redis_store")
                && e.contains("stores.CAS.dedup.content_store.compression.backend.redis_store"),
            "{e}"
        );
        let cfg = cairn_config::parse_str("t.json5", &tree("i/")).unwrap();
        assert!(spec_warnings(&cfg.stores.iter().next().unwrap().spec, "stores.CAS").is_empty());
    }

    #[tokio::test]
    async fn builds_trees_and_resolves_refs_in_any_order() {
        let cfg = cairn_config::parse_str(
            "t.json5",
            r#"{stores: {
                AC: {ref_store: {name: "CAS"}},
                CAS: {size_partitioning: {size: "1kb", lower_store: {memory: {}}, upper_store: {noop: {}}}},
            }}"#,
        )
        .unwrap();
        let stores = build_stores(&cfg.stores).await.unwrap();
        let d = cairn_core::DigestFunction::Sha256.compute(b"x");
        stores["AC"].put_bytes(&d, "x".into()).await.unwrap();
        assert_eq!(stores["CAS"].has(&d).await.unwrap(), Some(1));
    }

    #[tokio::test]
    async fn cycles_and_unbuilt_kinds_are_clear_errors() {
        let cfg = cairn_config::parse_str(
            "t.json5",
            r#"{stores: {A: {ref_store: {name: "B"}}, B: {ref_store: {name: "A"}}}}"#,
        )
        .unwrap();
        let e = build_stores(&cfg.stores).await.err().unwrap();
        assert!(e.message.contains("cycle"), "{e}");
        let cfg = cairn_config::parse_str(
            "t.json5",
            r#"{stores: {M: {experimental_mongo: {connection_string: "mongodb://127.0.0.1:1"}}}}"#,
        )
        .unwrap();
        let e = build_stores(&cfg.stores).await.err().unwrap();
        assert!(
            e.message.contains("stores.M") && e.message.contains("not built yet"),
            "{e}"
        );
    }
}
