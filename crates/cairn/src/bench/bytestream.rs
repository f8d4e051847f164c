//! The `bytestream` phase: one large blob written with ByteStream.Write, then read back.

use std::time::Instant;

use anyhow::{bail, Context};
use cairn_core::{Digest, DigestFunction};
use futures::StreamExt;

use super::{
    blob_path, fill_pseudo_random, mb_per_s, report, secs, transfer_timeout, wire_client,
    with_timeout, Bench, MAX_MESSAGE,
};

/// Payload of one ByteStream.Write request.
const WRITE_CHUNK: usize = 1 << 20;
/// The pseudo-random pool a bench blob repeats; a multiple of [`WRITE_CHUNK`].
const POOL_BYTES: usize = 64 << 20;

impl Bench {
    /// Writes one big blob with ByteStream.Write, reads it back, reports both rates.
    pub(super) async fn bytestream(&self) -> anyhow::Result<u64> {
        let size = self.blob_size;
        let seed = self.run_id;
        let function = self.function;

        let start = Instant::now();
        let (blob, digest) = tokio::task::spawn_blocking(move || {
            let blob = GeneratedBlob::new(seed, size);
            let digest = blob.digest(function);
            (blob, digest)
        })
        .await?;
        let elapsed = start.elapsed();
        report(
            "bytestream generate+hash:",
            format_args!(
                "{size} bytes in {:.2} s = {:.0} MB/s ({digest})",
                secs(elapsed),
                mb_per_s(size, elapsed)
            ),
        );

        let channel = self.connect().await?;
        let blob_path = blob_path(&digest);
        let upload = format!(
            "{}uploads/{}/blobs/{blob_path}",
            self.resource_prefix(),
            uuid::Uuid::new_v4()
        );
        let chunks = blob.chunks();
        // Every request's data is a slice of the pool: nothing is generated or copied here.
        let body = futures::stream::iter(0..chunks).map(move |index| {
            let resource_name = if index == 0 {
                upload.clone()
            } else {
                String::new()
            };
            blob.write_request(index, resource_name)
        });
        let timeout = transfer_timeout(size);

        let start = Instant::now();
        let response = wire_client::write(channel.clone(), with_timeout(body, timeout))
            .await
            .context("ByteStream.Write")?;
        let elapsed = start.elapsed();
        if response.committed_size != size as i64 {
            bail!(
                "ByteStream.Write of {digest}: committed_size {} instead of {size}",
                response.committed_size
            );
        }
        let write_mb_s = mb_per_s(size, elapsed);
        report(
            "bytestream write:",
            format_args!(
                "{size} bytes in {:.2} s = {write_mb_s:.0} MB/s ({:.2} x sha256)",
                secs(elapsed),
                write_mb_s / self.sha256_mb_s
            ),
        );

        let read = cairn_server::bytestream_wire::ReadRequest {
            resource_name: format!("{}blobs/{blob_path}", self.resource_prefix()),
            read_offset: 0,
            read_limit: 0,
        };
        let start = Instant::now();
        let mut stream = wire_client::read(channel, MAX_MESSAGE, with_timeout(read, timeout))
            .await
            .context("ByteStream.Read")?;
        let mut received = 0u64;
        while let Some(message) = stream.message().await.context("ByteStream.Read")? {
            received += message.data.len() as u64;
        }
        let elapsed = start.elapsed();
        if received != size {
            bail!("ByteStream.Read of {digest}: got {received} bytes instead of {size}");
        }
        let read_mb_s = mb_per_s(size, elapsed);
        report(
            "bytestream read:",
            format_args!(
                "{size} bytes in {:.2} s = {read_mb_s:.0} MB/s ({:.2} x sha256)",
                secs(elapsed),
                read_mb_s / self.sha256_mb_s
            ),
        );
        Ok(0)
    }
}

/// A bench blob: a [`POOL_BYTES`] pseudo-random pool (from a seed) repeated to `size` bytes.
#[derive(Clone)]
struct GeneratedBlob {
    pool: bytes::Bytes,
    size: u64,
}

impl GeneratedBlob {
    fn new(seed: u64, size: u64) -> GeneratedBlob {
        let mut pool = vec![0u8; size.min(POOL_BYTES as u64) as usize];
        fill_pseudo_random(seed, 0, &mut pool);
        GeneratedBlob {
            pool: pool.into(),
            size,
        }
    }

    /// Number of ByteStream.Write requests (at least one, for the empty blob).
    fn chunks(&self) -> u64 {
        self.size.div_ceil(WRITE_CHUNK as u64).max(1)
    }

    /// Bytes `offset..offset + len` of the blob, which never cross the pool's end: the pool is
    /// a multiple of [`WRITE_CHUNK`], or the whole blob.
    fn slice(&self, offset: u64, len: usize) -> bytes::Bytes {
        let at = (offset % self.pool.len().max(1) as u64) as usize;
        self.pool.slice(at..at + len)
    }

    /// Request `index` of [`Self::chunks`].
    fn write_request(
        &self,
        index: u64,
        resource_name: String,
    ) -> cairn_server::bytestream_wire::WriteRequest {
        let offset = index * WRITE_CHUNK as u64;
        let len = (self.size - offset).min(WRITE_CHUNK as u64) as usize;
        cairn_server::bytestream_wire::WriteRequest {
            resource_name,
            write_offset: offset as i64,
            finish_write: index + 1 == self.chunks(),
            data: self.slice(offset, len),
        }
    }

    fn digest(&self, function: DigestFunction) -> Digest {
        let mut hasher = function.hasher();
        let mut offset = 0;
        while offset < self.size {
            let len = (self.size - offset).min(WRITE_CHUNK as u64) as usize;
            hasher.update(&self.slice(offset, len));
            offset += len as u64;
        }
        hasher.finish_with_size(self.size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_requests_cover_the_blob_once() {
        for size in [
            0,
            5,
            2 * WRITE_CHUNK as u64 + 5,
            POOL_BYTES as u64 + WRITE_CHUNK as u64 + 3,
        ] {
            let blob = GeneratedBlob::new(3, size);
            let mut whole = Vec::new();
            for i in 0..blob.chunks() {
                let r = blob.write_request(i, String::new());
                assert_eq!(r.write_offset as u64, whole.len() as u64);
                assert_eq!(r.finish_write, i + 1 == blob.chunks());
                whole.extend_from_slice(&r.data);
            }
            assert_eq!(whole.len() as u64, size);
            // The pool repeats; the blob's head is the seed's stream.
            let head = whole.len().min(POOL_BYTES);
            let mut expected = vec![0u8; head];
            fill_pseudo_random(3, 0, &mut expected);
            assert_eq!(whole[..head], expected[..]);
            assert_eq!(whole[head..], whole[..whole.len() - head]);
            assert_eq!(
                blob.digest(DigestFunction::Sha256),
                DigestFunction::Sha256.compute(&whole)
            );
        }
    }
}
