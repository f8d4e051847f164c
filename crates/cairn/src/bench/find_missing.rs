//! The `findmissing` phase: one FindMissingBlobs of `requests` digests that no store holds, sent
//! [`ROUNDS`] times. Every digest is absent, so a store has to ask each of its tiers about each
//! one: the figure is the cost of a cold existence check against the backend (one HEAD per
//! digest on object storage, one lookup per digest on Redis).

use std::time::{Duration, Instant};

use anyhow::bail;
use cairn_core::proto::build::bazel::remote::execution::v2 as re;

use super::{cas_client, report, secs, with_timeout, Bench};

/// Times the same request is sent; the first may pay for connections the later ones reuse.
const ROUNDS: usize = 3;
/// Distinguishes these digests from every other phase's blobs.
const KIND_FIND: u64 = 4;
/// A client gives a request this long (the bench's usual 60 s is too short for a slow backend
/// at 10,000 digests, and a real client would wait as long as its `--remote_timeout`).
const FIND_TIMEOUT: Duration = Duration::from_secs(300);

impl Bench {
    pub(super) async fn find_missing(&self) -> anyhow::Result<u64> {
        let blobs = self.unique_blobs();
        let digests: Vec<re::Digest> = (0..self.requests)
            .map(|i| {
                blobs
                    .make(KIND_FIND, i, self.small_size.min(64))
                    .0
                    .to_proto()
            })
            .collect();
        let mut client = cas_client(self.connect().await?);
        let mut times = Vec::with_capacity(ROUNDS);
        let mut errors = 0;
        for round in 1..=ROUNDS {
            let request = re::FindMissingBlobsRequest {
                instance_name: self.instance.clone(),
                blob_digests: digests.clone(),
                digest_function: self.function.to_proto(),
            };
            let start = Instant::now();
            match client
                .find_missing_blobs(with_timeout(request, FIND_TIMEOUT))
                .await
            {
                Ok(answer) => {
                    let elapsed = start.elapsed();
                    let missing = answer.into_inner().missing_blob_digests.len();
                    if missing != digests.len() {
                        bail!(
                            "round {round}: {missing} of {} absent digests reported missing",
                            digests.len()
                        );
                    }
                    times.push(elapsed);
                }
                Err(status) => {
                    report(
                        &format!("findmissing round {round}:"),
                        format_args!("FAILED after {:.2} s: {status}", secs(start.elapsed())),
                    );
                    errors += 1;
                }
            }
        }
        let list: Vec<String> = times.iter().map(|t| format!("{:.3}", secs(*t))).collect();
        let best = times.iter().min().copied().unwrap_or_default();
        report(
            "findmissing:",
            format_args!(
                "{} absent digests per request, {ROUNDS} rounds: {} s; best {:.0} digests/s",
                digests.len(),
                list.join(", "),
                digests.len() as f64 / best.as_secs_f64().max(1e-9)
            ),
        );
        Ok(errors)
    }
}
