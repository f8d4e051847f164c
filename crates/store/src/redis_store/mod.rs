//! `redis_store`: a leaf store whose blobs are Redis string values, under NativeLink's keys
//! (`<key_prefix><hash hex>-<size>`), so that a Redis filled by one reads the same in the
//! other.
//!
//! Guarantees:
//! - **A reader never sees part of a value.** A body of at most one round trip's worth
//!   (`read_chunk_size * max_chunk_uploads_per_update`, 640 KiB by default) is stored with
//!   one SET. A larger upload appends to a temporary key
//!   (`temp-<uuid>-{<key>}`: the braces put it in the final key's cluster slot), each piece
//!   with a script that appends only at the offset it expects, so a piece lost in a failover
//!   leaves a hole that is detected rather than filled with zeros; then one script checks the
//!   length and renames the temporary key onto the final one (a RENAME is atomic). With
//!   `key_ttl_s` the key expires that long after it was completed; a temporary key expires
//!   too (after `key_ttl_s`, or an hour idle without it), so an upload that dies leaves
//!   nothing for long.
//! - **Reads stream** in GETRANGEs of `read_chunk_size`; a value that changes length under a
//!   reader ends the stream with an error, never a short body that looks complete.
//! - **Bounded work**: `max_client_permits` commands in flight at once, `has_many` asks 128
//!   keys per script call, an upload holds `read_chunk_size * max_chunk_uploads_per_update` bytes at most.
//! - A key that holds another type than a string (not written by this store) reads as absent
//!   and is replaced by the next upload under its name.
//! - Errors name the store (`redis_store stores.CAS: ...`); connection failures are
//!   UNAVAILABLE, a command past `command_timeout_ms` is DEADLINE_EXCEEDED, both after the
//!   `retry` budget.

pub mod connection;

pub use redis;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use cairn_config::stores::{RedisMode, RedisStore as RedisConfig};
use cairn_core::{BlobStream, Digest, Error};
use futures::{FutureExt, StreamExt, TryStreamExt};

use crate::{check_range, Health, Store, StoreInfo};
pub use connection::{query, Conn, Connector};

const DEFAULT_READ_CHUNK_SIZE: u64 = 64 * 1024;
const DEFAULT_MAX_CHUNK_UPLOADS_PER_UPDATE: u64 = 10;
/// A temporary key with no `key_ttl_s` expires after this long without a new piece.
const TEMP_KEY_IDLE_TTL_S: u64 = 3600;
/// `has_many` asks this many keys per script call (standard and sentinel modes)...
const HAS_BATCH: usize = 128;
/// ...with this many calls (in cluster mode, of one key each) in flight.
const HAS_CONCURRENCY: usize = 16;

/// The length of each string value in KEYS, -1 for a key that is absent or holds another type
/// (not something this store wrote: treated as absent, and replaced by the next upload).
const SIZES: &str = r"
local out = {}
for i, k in ipairs(KEYS) do
  if redis.call('TYPE', k)['ok'] == 'string' then
    out[i] = redis.call('STRLEN', k)
  else
    out[i] = -1
  end
end
return out
";

/// Appends ARGV[2] to KEYS[1] if its length is ARGV[1]; an already applied piece (a retry
/// after a lost answer) is left alone. Returns the length after, or -1 - length when the
/// value is shorter than the offset (earlier pieces were lost).
const APPEND_AT: &str = r"
local n = redis.call('STRLEN', KEYS[1])
local off = tonumber(ARGV[1])
local len = string.len(ARGV[2])
if n == off then
  n = redis.call('APPEND', KEYS[1], ARGV[2])
elseif n < off + len then
  return -1 - n
end
redis.call('EXPIRE', KEYS[1], ARGV[3])
return n
";

/// Sets KEYS[1] to ARGV[1] with the expiry ARGV[2] (0 for none) and publishes its name to
/// ARGV[3] (empty for none). Returns the length stored.
const SET_WHOLE: &str = r"
local ttl = tonumber(ARGV[2])
if ttl > 0 then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ttl)
else
  redis.call('SET', KEYS[1], ARGV[1])
end
if ARGV[3] ~= '' then
  redis.call('PUBLISH', ARGV[3], KEYS[1])
end
return string.len(ARGV[1])
";

/// Publishes KEYS[1] (the temporary key) as KEYS[2] if it holds exactly ARGV[1] bytes, then
/// sets the final key's expiry (ARGV[2] seconds, 0 for none) and publishes its name to the
/// channel ARGV[3] (empty for none). Returns the length, or -1 - length on a mismatch (the
/// temporary key is then deleted).
const COMMIT: &str = r"
local want = tonumber(ARGV[1])
if want == 0 then
  redis.call('SET', KEYS[2], '')
else
  local n = redis.call('STRLEN', KEYS[1])
  if n ~= want then
    redis.call('DEL', KEYS[1])
    return -1 - n
  end
  redis.call('RENAME', KEYS[1], KEYS[2])
end
local ttl = tonumber(ARGV[2])
if ttl > 0 then
  redis.call('EXPIRE', KEYS[2], ttl)
else
  redis.call('PERSIST', KEYS[2])
end
if ARGV[3] ~= '' then
  redis.call('PUBLISH', ARGV[3], KEYS[2])
end
return want
";

pub struct RedisStore {
    conn: Arc<Connector>,
    key_prefix: String,
    read_chunk_size: usize,
    max_chunk_uploads_per_update: usize,
    key_ttl_s: u64,
    pub_sub_channel: String,
    cluster: bool,
}

impl RedisStore {
    /// Builds the store of config node `name` (its key path); connects on first use, so a
    /// Redis that is down at start-up makes requests fail (and `/status` say so), not the
    /// process.
    pub fn new(name: &str, c: &RedisConfig) -> Result<RedisStore, Error> {
        let conn = Connector::new(name, c)?;
        if c.response_timeout_s.unwrap_or(0) > 0 {
            tracing::warn!(
                store = name,
                "redis_store.response_timeout_s is deprecated and ignored; use command_timeout_ms"
            );
        }
        let key_prefix = c.key_prefix.clone().unwrap_or_default();
        if key_prefix.contains(['{', '}']) {
            return Err(Error::invalid_argument(format!(
                "{name}.redis_store.key_prefix: {key_prefix:?} contains a brace, which would \
                 change which cluster slot keys hash to"
            )));
        }
        let read_chunk_size = c
            .read_chunk_size
            .map(|s| s.get())
            .filter(|&n| n > 0)
            .unwrap_or(DEFAULT_READ_CHUNK_SIZE)
            .min(512 << 20) as usize;
        Ok(RedisStore {
            conn: Arc::new(conn),
            key_prefix,
            read_chunk_size,
            max_chunk_uploads_per_update: c
                .max_chunk_uploads_per_update
                .filter(|&n| n > 0)
                .unwrap_or(DEFAULT_MAX_CHUNK_UPLOADS_PER_UPDATE)
                .min(10_000) as usize,
            key_ttl_s: c.key_ttl_s.unwrap_or(0),
            pub_sub_channel: c.experimental_pub_sub_channel.clone().unwrap_or_default(),
            cluster: c.mode == RedisMode::Cluster,
        })
    }

    /// The Redis key of a digest: `<key_prefix><hash>-<size>`, as NativeLink writes it.
    pub fn key(&self, d: &Digest) -> String {
        format!("{}{}-{}", self.key_prefix, d.hash_hex(), d.size())
    }

    /// The store's connection, for other users of the same Redis (one connection, one set of
    /// permits).
    pub fn connector(&self) -> Arc<Connector> {
        self.conn.clone()
    }

    /// Retries made since start (for tests and metrics).
    pub fn retries(&self) -> u64 {
        self.conn.counters.retries.load(Ordering::Relaxed)
    }

    /// Length of the value at `key`, `None` when absent.
    async fn value_len(&self, key: &str, d: &Digest) -> Result<Option<u64>, Error> {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(SIZES).arg(1).arg(key);
        let lens: Vec<i64> = self
            .conn
            .run("lookup", &format!("looking up {d}"), query(cmd))
            .await?;
        Ok(lens.first().and_then(|&n| u64::try_from(n).ok()))
    }

    /// Writes `body` to a fresh temporary key and publishes it as `key` (see the module doc).
    async fn upload(
        &self,
        d: &Digest,
        key: &str,
        temp: &str,
        body: BlobStream,
    ) -> Result<(), Error> {
        let temp_ttl = if self.key_ttl_s > 0 {
            self.key_ttl_s
        } else {
            TEMP_KEY_IDLE_TTL_S
        };
        let max_piece = self.read_chunk_size;
        let max_batch = self.max_chunk_uploads_per_update;
        let mut body = body;
        let mut offset: u64 = 0;
        let mut batch: Vec<Bytes> = Vec::with_capacity(max_batch);
        loop {
            let next = body.next().await;
            let done = next.is_none();
            if let Some(chunk) = next {
                let mut chunk = chunk?;
                while !chunk.is_empty() {
                    let piece = chunk.split_to(chunk.len().min(max_piece));
                    batch.push(piece);
                    if batch.len() >= max_batch {
                        offset = self.append(d, temp, offset, &batch, temp_ttl).await?;
                        batch.clear();
                    }
                }
            }
            if done {
                break;
            }
        }
        if offset == 0 {
            // The whole body fit in one round trip's worth: one SET, atomic by itself.
            return self.set_whole(d, key, &batch).await;
        }
        if !batch.is_empty() {
            offset = self.append(d, temp, offset, &batch, temp_ttl).await?;
        }
        let mut attempt_committed = false;
        let commit = {
            let mut cmd = redis::cmd("EVAL");
            cmd.arg(COMMIT)
                .arg(2)
                .arg(temp)
                .arg(key)
                .arg(offset)
                .arg(self.key_ttl_s)
                .arg(&self.pub_sub_channel);
            cmd
        };
        let r: i64 = self
            .conn
            .run("publish", &format!("publishing {d}"), query(commit))
            .await?;
        if r == offset as i64 {
            attempt_committed = true;
        } else if r == -1 && offset > 0 {
            // The temporary key is gone: an earlier attempt whose answer was lost may have
            // renamed it already.
            if self.value_len(key, d).await? == Some(offset) {
                attempt_committed = true;
            }
        }
        if attempt_committed {
            return Ok(());
        }
        Err(Error::unavailable(format!(
            "redis_store {}: writing {d}: Redis held {} bytes of the {offset} written when the \
             upload was published (the temporary key was evicted by the memory policy, or lost \
             in a failover); nothing was stored, retry the upload",
            self.conn.name,
            -1 - r
        )))
    }

    /// Publishes a body held whole (at most one round trip's worth of pieces) with one SET.
    async fn set_whole(&self, d: &Digest, key: &str, pieces: &[Bytes]) -> Result<(), Error> {
        let value: Bytes = match pieces {
            [] => Bytes::new(),
            [one] => one.clone(),
            many => {
                let mut v = bytes::BytesMut::with_capacity(many.iter().map(Bytes::len).sum());
                for p in many {
                    v.extend_from_slice(p);
                }
                v.freeze()
            }
        };
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(SET_WHOLE)
            .arg(1)
            .arg(key)
            .arg(value.as_ref())
            .arg(self.key_ttl_s)
            .arg(&self.pub_sub_channel);
        let n: i64 = self
            .conn
            .run("write", &format!("writing {d}"), query(cmd))
            .await?;
        if n != value.len() as i64 {
            return Err(Error::internal(format!(
                "redis_store {}: writing {d}: Redis stored {n} bytes of {}",
                self.conn.name,
                value.len()
            )));
        }
        Ok(())
    }

    /// Appends `pieces` at `offset` in one pipeline; returns the new length.
    async fn append(
        &self,
        d: &Digest,
        temp: &str,
        offset: u64,
        pieces: &[Bytes],
        temp_ttl: u64,
    ) -> Result<u64, Error> {
        let mut p = redis::pipe();
        let mut at = offset;
        for piece in pieces {
            p.cmd("EVAL")
                .arg(APPEND_AT)
                .arg(1)
                .arg(temp)
                .arg(at)
                .arg(piece.as_ref())
                .arg(temp_ttl);
            at += piece.len() as u64;
        }
        let lens: Vec<i64> = self
            .conn
            .run(
                "write",
                &format!("writing {d} at offset {offset}"),
                pipeline(p),
            )
            .await?;
        let mut want = offset;
        for (piece, got) in pieces.iter().zip(&lens) {
            want += piece.len() as u64;
            if *got < 0 {
                return Err(Error::unavailable(format!(
                    "redis_store {}: writing {d}: Redis held {} bytes where {} were written \
                     before (the upload's temporary key was evicted by the memory policy, or \
                     lost in a failover); nothing was stored, retry the upload",
                    self.conn.name,
                    -1 - got,
                    want - piece.len() as u64
                )));
            }
        }
        Ok(want)
    }
}

impl RedisStore {
    /// Sizes of a batch of keys in one pipeline.
    async fn lookup(&self, ds: Vec<Digest>) -> Result<Vec<Option<u64>>, Error> {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(SIZES).arg(ds.len());
        for d in &ds {
            cmd.arg(self.key(d));
        }
        let what = format!("looking up {} keys from {}", ds.len(), ds[0]);
        let r: Vec<i64> = self.conn.run("lookup", &what, query(cmd)).await?;
        if r.len() != ds.len() {
            return Err(Error::internal(format!(
                "redis_store {}: {what}: {} answers for {} keys",
                self.conn.name,
                r.len(),
                ds.len()
            )));
        }
        Ok(ds
            .iter()
            .zip(r)
            .map(|(d, len)| match u64::try_from(len) {
                Ok(len) => Some(len),
                Err(_) => d.is_empty_blob().then_some(0),
            })
            .collect())
    }
}

/// Runs a pipeline (for [`Connector::run`]).
pub fn pipeline<T: redis::FromRedisValue + Send + 'static>(
    p: redis::Pipeline,
) -> impl Fn(connection::Conn) -> futures::future::BoxFuture<'static, Result<T, redis::RedisError>>
{
    move |mut conn| {
        let p = p.clone();
        Box::pin(async move { p.query_async(&mut conn).await })
    }
}

#[async_trait]
impl Store for RedisStore {
    async fn has_many(&self, keys: &[Digest]) -> Result<Vec<Option<u64>>, Error> {
        let batch = if self.cluster { 1 } else { HAS_BATCH };
        let lookups: Vec<_> = keys
            .chunks(batch)
            .map(|ds| self.lookup(ds.to_vec()).boxed())
            .collect();
        let parts: Vec<Vec<Option<u64>>> = futures::stream::iter(lookups)
            .buffered(HAS_CONCURRENCY)
            .try_collect()
            .await?;
        Ok(parts.into_iter().flatten().collect())
    }

    async fn get(
        &self,
        key: &Digest,
        offset: u64,
        length: Option<u64>,
    ) -> Result<BlobStream, Error> {
        if key.is_empty_blob() {
            check_range(key, 0, offset, length)?;
            return Ok(cairn_core::stream::empty());
        }
        let k = self.key(key);
        let size = self.value_len(&k, key).await?.ok_or_else(|| {
            Error::not_found(format!(
                "redis_store {}: {key} is not in the store",
                self.conn.name
            ))
        })?;
        let (start, len) = check_range(key, size, offset, length)?;
        let end = start + len;
        let conn = self.conn.clone();
        let chunk = self.read_chunk_size as u64;
        let digest = *key;
        let stream = futures::stream::try_unfold(start, move |pos| {
            let conn = conn.clone();
            let k = k.clone();
            async move {
                if pos >= end {
                    return Ok(None);
                }
                let last = (pos + chunk).min(end) - 1;
                let mut cmd = redis::cmd("GETRANGE");
                cmd.arg(&k).arg(pos).arg(last);
                let data: Vec<u8> = conn
                    .run("read", &format!("reading {digest} at {pos}"), query(cmd))
                    .await?;
                let want = (last + 1 - pos) as usize;
                if data.len() != want {
                    return Err(Error::unavailable(format!(
                        "redis_store {}: reading {digest}: the value changed or expired during \
                         the read ({} bytes at offset {pos} where {want} were expected)",
                        conn.name,
                        data.len()
                    )));
                }
                Ok(Some((Bytes::from(data), last + 1)))
            }
        });
        Ok(stream.boxed())
    }

    async fn put(&self, key: &Digest, body: BlobStream) -> Result<(), Error> {
        if key.is_empty_blob() {
            // Always present; drain the body so that its errors still count.
            let mut body = body;
            while let Some(c) = body.next().await {
                c?;
            }
            return Ok(());
        }
        let k = self.key(key);
        let temp = format!("temp-{}-{{{k}}}", uuid::Uuid::new_v4());
        let r = self.upload(key, &k, &temp, body).await;
        if r.is_err() {
            // Best effort: the key also expires by itself.
            let mut del = redis::cmd("DEL");
            del.arg(&temp);
            let conn = self.conn.clone();
            tokio::spawn(async move {
                let _ = conn
                    .run("delete", "deleting an aborted upload", query::<i64>(del))
                    .await;
            });
        }
        r
    }

    fn info(&self) -> StoreInfo {
        StoreInfo::leaf("redis_store")
    }

    async fn health(&self) -> Health {
        match self.conn.ping().await {
            Ok(()) => Health::Ok,
            Err(e) => Health::Failed(e.message),
        }
    }

    fn as_any(&self) -> Option<&(dyn std::any::Any + Send + Sync)> {
        Some(self)
    }
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("name", &self.conn.name)
            .finish()
    }
}
