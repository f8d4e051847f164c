//! Blob transfers and config verdicts shared by the tests of NativeLink's keys: ByteStream
//! reads and writes, BatchUpdateBlobs, and what `check-config` and `run` say of a file.

use cairn_core::proto::build::bazel::remote::execution::v2 as re;
use cairn_core::proto::google::bytestream::byte_stream_client::ByteStreamClient;
use cairn_core::proto::google::bytestream::WriteRequest;
use cairn_core::{Digest, DigestFunction};
use re::content_addressable_storage_client::ContentAddressableStorageClient;

use super::Cairn;

/// Uploads through `c` with ByteStream.Write (SHA-256, the function named in the resource).
pub async fn write(c: &Cairn, blob: &[u8], identity: Option<&str>) -> Result<(), tonic::Status> {
    let d = DigestFunction::Sha256.compute(blob);
    let name = format!(
        "uploads/{}/blobs/sha256/{}/{}",
        uuid::Uuid::new_v4(),
        d.hash_hex(),
        d.size()
    );
    let msg = WriteRequest {
        resource_name: name,
        write_offset: 0,
        finish_write: true,
        data: blob.to_vec(),
    };
    let mut req = tonic::Request::new(futures::stream::iter(vec![msg]));
    if let Some(who) = identity {
        req.metadata_mut()
            .insert("x-identity", who.parse().unwrap());
    }
    ByteStreamClient::new(c.channel().await)
        .write(req)
        .await
        .map(|_| ())
}

/// Reads a whole blob through `c` with ByteStream.Read.
pub async fn read(c: &Cairn, instance: &str, d: &Digest) -> Vec<u8> {
    use futures::StreamExt;
    let prefix = if instance.is_empty() {
        String::new()
    } else {
        format!("{instance}/")
    };
    let mut s = ByteStreamClient::new(c.channel().await)
        .max_decoding_message_size(64 << 20)
        .read(cairn_core::proto::google::bytestream::ReadRequest {
            resource_name: format!("{prefix}blobs/{}/{}", d.hash_hex(), d.size()),
            read_offset: 0,
            read_limit: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut got = Vec::new();
    while let Some(m) = s.next().await {
        got.extend_from_slice(&m.unwrap().data);
    }
    got
}

/// Uploads `blob` to `instance` of `c` with BatchUpdateBlobs.
pub async fn batch_put(c: &Cairn, instance: &str, blob: &[u8]) -> Digest {
    let d = DigestFunction::Sha256.compute(blob);
    let r = ContentAddressableStorageClient::new(c.channel().await)
        .max_encoding_message_size(64 << 20)
        .batch_update_blobs(re::BatchUpdateBlobsRequest {
            instance_name: instance.into(),
            requests: vec![re::batch_update_blobs_request::Request {
                digest: Some(d.to_proto()),
                data: blob.to_vec(),
                compressor: 0,
            }],
            digest_function: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.responses[0].status.as_ref().map_or(0, |s| s.code), 0);
    d
}

/// `cairn check-config` and `cairn run` on `text`: both exit codes and their stderr.
pub fn verdicts(text: &str) -> [(bool, String); 2] {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.json5");
    std::fs::write(&path, text).unwrap();
    ["check-config", "run"].map(|cmd| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_cairn"))
            .arg(cmd)
            .arg(&path)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    })
}
