//! `fast_slow`: reads try `fast`, then `slow` (filling `fast` with what a whole read brings
//! back); writes go to both, concurrently, from one pass over the body. A put fails when the
//! slow tier's does, or when the fast tier's fails for any reason but room: a fast tier that
//! declines a blob with RESOURCE_EXHAUSTED (a memory tier smaller than the blob) leaves it in
//! the slow tier alone, and the put succeeds.
//!
//! `fast_direction` / `slow_direction`: `both` (default), `get` (the tier is only filled by
//! reads), `update` (only written by puts), `read_only` (neither).
//!
//! `bypass_dedup_threshold_bytes`: a blob at least this large that misses the fast tier
//! streams from the slow tier without filling the fast tier.

use async_trait::async_trait;
use bytes::Bytes;
use cairn_config::stores::FastSlowStore as FastSlowConfig;
use cairn_core::{BlobStream, Digest, Error};
use futures::{SinkExt, StreamExt};
use tokio::sync::mpsc;

use crate::{Health, Store, StoreInfo, StoreRef};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Direction {
    Both,
    Get,
    Update,
    ReadOnly,
}

impl Direction {
    fn parse(s: Option<&str>, key: &str) -> Result<Direction, Error> {
        match s.unwrap_or("both") {
            "both" => Ok(Direction::Both),
            "get" => Ok(Direction::Get),
            "update" => Ok(Direction::Update),
            "read_only" => Ok(Direction::ReadOnly),
            other => Err(Error::invalid_argument(format!(
                "fast_slow.{key}: expected both, get, update or read_only, found {other:?}"
            ))),
        }
    }
    fn written_by_put(self) -> bool {
        matches!(self, Direction::Both | Direction::Update)
    }
    fn filled_by_get(self) -> bool {
        matches!(self, Direction::Both | Direction::Get)
    }
}

pub struct FastSlowStore {
    fast: StoreRef,
    slow: StoreRef,
    fast_dir: Direction,
    slow_dir: Direction,
    /// `bypass_dedup_threshold_bytes` (0: off).
    bypass_at: u64,
}

/// Chunks buffered between the reader and a tier being filled or written.
const TEE_DEPTH: usize = 16;

impl FastSlowStore {
    pub fn new(
        cfg: &FastSlowConfig,
        fast: StoreRef,
        slow: StoreRef,
    ) -> Result<FastSlowStore, Error> {
        Ok(FastSlowStore {
            fast,
            slow,
            fast_dir: Direction::parse(cfg.fast_direction.as_deref(), "fast_direction")?,
            slow_dir: Direction::parse(cfg.slow_direction.as_deref(), "slow_direction")?,
            bypass_at: cfg.bypass_dedup_threshold_bytes.0,
        })
    }
}

/// A body stream fed by a channel.
fn channel_body() -> (mpsc::Sender<Result<Bytes, Error>>, BlobStream) {
    let (tx, rx) = mpsc::channel(TEE_DEPTH);
    (tx, tokio_stream_from(rx))
}

fn tokio_stream_from(mut rx: mpsc::Receiver<Result<Bytes, Error>>) -> BlobStream {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx)).boxed()
}

#[async_trait]
impl Store for FastSlowStore {
    async fn has_many(&self, keys: &[Digest]) -> Result<Vec<Option<u64>>, Error> {
        let mut out = self.fast.has_many(keys).await?;
        let missing: Vec<usize> = (0..keys.len()).filter(|&i| out[i].is_none()).collect();
        if missing.is_empty() {
            return Ok(out);
        }
        let slow_keys: Vec<Digest> = missing.iter().map(|&i| keys[i]).collect();
        let slow = self.slow.has_many(&slow_keys).await?;
        for (i, s) in missing.into_iter().zip(slow) {
            out[i] = s;
        }
        Ok(out)
    }

    async fn get(
        &self,
        key: &Digest,
        offset: u64,
        length: Option<u64>,
    ) -> Result<BlobStream, Error> {
        match self.fast.get(key, offset, length).await {
            Err(e) if e.is_not_found() => {}
            other => return other,
        }
        let whole = offset == 0 && length.is_none_or(|l| l >= key.size());
        let bypass = self.bypass_at > 0 && key.size() >= self.bypass_at;
        if !whole || !self.fast_dir.filled_by_get() || bypass {
            return self.slow.get(key, offset, length).await;
        }
        let mut from_slow = self.slow.get(key, 0, None).await?;
        // Tee: the caller's stream forwards each chunk and feeds the fast tier's put. If the
        // caller stops early, the fill sees the end of its channel as an error and aborts,
        // leaving nothing half-written in the fast tier.
        let (fill_tx, fill_body) = channel_body();
        let fast = self.fast.clone();
        let k = *key;
        tokio::spawn(async move {
            if let Err(e) = fast.put(&k, fill_body).await {
                tracing::debug!(digest = %k, error = %e, "fast_slow: fast tier not filled");
            }
        });
        let (mut out_tx, out_rx) =
            futures::channel::mpsc::channel::<Result<Bytes, Error>>(TEE_DEPTH);
        tokio::spawn(async move {
            let mut fill = Some(fill_tx);
            while let Some(item) = from_slow.next().await {
                let failed = item.is_err();
                if let Some(tx) = &fill {
                    if tx.send(item.clone()).await.is_err() {
                        fill = None;
                    }
                }
                if out_tx.send(item).await.is_err() {
                    // Reader went away: abort the fill too.
                    if let Some(tx) = fill.take() {
                        let _ = tx.send(Err(Error::cancelled("reader went away"))).await;
                    }
                    return;
                }
                if failed {
                    return;
                }
            }
        });
        Ok(out_rx.boxed())
    }

    async fn put(&self, key: &Digest, mut body: BlobStream) -> Result<(), Error> {
        let to_fast = self.fast_dir.written_by_put();
        let to_slow = self.slow_dir.written_by_put();
        match (to_fast, to_slow) {
            (false, false) => return crate::noop::NoopStore.put(key, body).await,
            (true, false) => return self.fast.put(key, body).await,
            (false, true) => return self.slow.put(key, body).await,
            (true, true) => {}
        }
        let (fast_tx, fast_body) = channel_body();
        let (slow_tx, slow_body) = channel_body();
        let feed = async move {
            while let Some(item) = body.next().await {
                let failed = item.is_err();
                // A tier that failed has dropped its receiver; its own error is reported below.
                let _ = fast_tx.send(item.clone()).await;
                let _ = slow_tx.send(item).await;
                if failed {
                    break;
                }
            }
            Ok::<(), Error>(())
        };
        let (_, fast_r, slow_r) = futures::join!(
            feed,
            self.fast.put(key, fast_body),
            self.slow.put(key, slow_body)
        );
        // The slow tier is the durable one: its error wins.
        slow_r.map_err(|e| e.context("slow store"))?;
        match fast_r {
            // A fast tier that declines a blob for room (a memory tier smaller than the blob)
            // is a cache saying no: the blob is stored in the slow tier and reads find it there.
            Err(e) if e.code == cairn_core::Code::ResourceExhausted => {
                tracing::debug!(digest = %key, error = %e, "fast_slow: the fast tier declined the blob; kept in the slow tier");
                Ok(())
            }
            other => other.map_err(|e| e.context("fast store")),
        }
    }

    fn info(&self) -> StoreInfo {
        StoreInfo::wrapper(
            "fast_slow",
            vec![("fast", self.fast.info()), ("slow", self.slow.info())],
        )
    }

    async fn health(&self) -> Health {
        match self.fast.health().await {
            Health::Ok => self.slow.health().await,
            bad => bad,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::MemoryStore;
    use crate::{testutil, StoreExt};
    use cairn_core::DigestFunction;
    use std::sync::Arc;

    fn pair() -> (StoreRef, StoreRef, FastSlowStore) {
        let fast: StoreRef = Arc::new(MemoryStore::new(&Default::default()));
        let slow: StoreRef = Arc::new(MemoryStore::new(&Default::default()));
        let cfg = FastSlowConfig {
            fast: cairn_config::StoreSpec::Noop(Default::default()),
            slow: cairn_config::StoreSpec::Noop(Default::default()),
            fast_direction: None,
            slow_direction: None,
            bypass_dedup_threshold_bytes: Default::default(),
        };
        let s = FastSlowStore::new(&cfg, fast.clone(), slow.clone()).unwrap();
        (fast, slow, s)
    }

    #[tokio::test]
    async fn blobs_at_the_bypass_threshold_are_read_without_filling_the_fast_tier() {
        let (fast, slow, _) = pair();
        let cfg = FastSlowConfig {
            fast: cairn_config::StoreSpec::Noop(Default::default()),
            slow: cairn_config::StoreSpec::Noop(Default::default()),
            fast_direction: None,
            slow_direction: None,
            bypass_dedup_threshold_bytes: cairn_config::ByteSize(1000),
        };
        let s = FastSlowStore::new(&cfg, fast.clone(), slow.clone()).unwrap();
        let big = testutil::data(1000, 1);
        let small = testutil::data(999, 2);
        let (db, ds) = (
            DigestFunction::Sha256.compute(&big),
            DigestFunction::Sha256.compute(&small),
        );
        slow.put_bytes(&db, big.clone()).await.unwrap();
        slow.put_bytes(&ds, small.clone()).await.unwrap();
        assert_eq!(s.get_all(&db, usize::MAX).await.unwrap(), big);
        assert_eq!(s.get_all(&ds, usize::MAX).await.unwrap(), small);
        // The small one's fill runs beside the read; once it is in, the big one's would be.
        for _ in 0..1000 {
            if fast.has(&ds).await.unwrap().is_some() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        assert_eq!(fast.has(&ds).await.unwrap(), Some(999));
        assert_eq!(fast.has(&db).await.unwrap(), None);
    }

    #[tokio::test]
    async fn fast_slow_contract_and_fill() {
        let (fast, slow, s) = pair();
        testutil::check_store_contract(&s).await;
        let data = testutil::data(500_000, 9);
        let d = DigestFunction::Sha256.compute(&data);
        slow.put_bytes(&d, data.clone()).await.unwrap();
        assert_eq!(fast.has(&d).await.unwrap(), None);
        assert_eq!(s.get_all(&d, usize::MAX).await.unwrap(), data);
        // The fill runs beside the read; wait for it by polling the store's state.
        for _ in 0..1000 {
            if fast.has(&d).await.unwrap().is_some() {
                break;
            }
            tokio::task::yield_now().await;
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        assert_eq!(fast.get_all(&d, usize::MAX).await.unwrap(), data);
    }

    #[tokio::test]
    async fn put_writes_both_tiers() {
        let (fast, slow, s) = pair();
        let d = DigestFunction::Sha256.compute(b"both");
        s.put_bytes(&d, "both".into()).await.unwrap();
        assert_eq!(fast.has(&d).await.unwrap(), Some(4));
        assert_eq!(slow.has(&d).await.unwrap(), Some(4));
    }

    #[tokio::test]
    async fn a_blob_larger_than_the_fast_tier_is_kept_in_the_slow_tier() {
        let small_memory = crate::memory::MemoryStore::new(&cairn_config::stores::MemoryStore {
            eviction_policy: Some(cairn_config::stores::EvictionPolicy {
                max_bytes: cairn_config::ByteSize(1000),
                ..Default::default()
            }),
        });
        let fast: StoreRef = Arc::new(small_memory);
        let slow: StoreRef = Arc::new(MemoryStore::new(&Default::default()));
        let cfg = FastSlowConfig {
            fast: cairn_config::StoreSpec::Noop(Default::default()),
            slow: cairn_config::StoreSpec::Noop(Default::default()),
            fast_direction: None,
            slow_direction: None,
            bypass_dedup_threshold_bytes: Default::default(),
        };
        let s = FastSlowStore::new(&cfg, fast.clone(), slow.clone()).unwrap();
        let big = testutil::data(5000, 3);
        let d = DigestFunction::Sha256.compute(&big);
        s.put_bytes(&d, big.clone()).await.unwrap();
        assert_eq!(fast.has(&d).await.unwrap(), None);
        assert_eq!(slow.has(&d).await.unwrap(), Some(5000));
        assert_eq!(s.get_all(&d, usize::MAX).await.unwrap(), big);
    }
}
