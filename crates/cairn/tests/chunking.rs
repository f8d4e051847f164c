//! Content-defined chunking (`services.cas[].experimental_chunking`): SplitBlob,
//! GetChunkMapping, SpliceBlob and RegisterChunkMapping over a real gRPC connection, the
//! capabilities they are advertised with, and every way a client can get a splice wrong.

mod common;

use std::collections::HashSet;
use std::process::Command;

use cairn_core::proto::build::bazel::remote::execution::v2 as re;
use cairn_core::{Digest, DigestFunction};
use common::{data, Cairn};
use futures::StreamExt;
use re::capabilities_client::CapabilitiesClient;
use re::content_addressable_storage_client::ContentAddressableStorageClient;
use tonic::transport::Channel;
use tonic::Code;

const SHA: DigestFunction = DigestFunction::Sha256;
const AVG: usize = 1024;

/// Instance "" chunks (avg 1 KiB, so min 256 B and max 4 KiB; at most 200 chunks); instance
/// "plain" serves the same CAS without chunking.
const CONFIG: &str = r#"{
  stores: [
    { name: "CAS", verify: { verify_size: true, verify_hash: true, backend: { memory: {} } } },
    { name: "CHUNK_INDEX", memory: {} },
  ],
  servers: [{
    listener: { http: { socket_address: "@ADDR@" } },
    services: {
      cas: [
        { instance_name: "", cas_store: "CAS",
          experimental_chunking: { index_store: "CHUNK_INDEX", avg_chunk_size_bytes: 1024, max_chunk_count: 200 } },
        { instance_name: "plain", cas_store: "CAS" },
      ],
      capabilities: [{ instance_name: "" }, { instance_name: "plain" }],
    },
  }],
}"#;

type Cas = ContentAddressableStorageClient<Channel>;

fn sha(d: &[u8]) -> Digest {
    SHA.compute(d)
}

async fn put(cas: &mut Cas, blobs: &[&[u8]]) {
    let requests = blobs
        .iter()
        .map(|b| re::batch_update_blobs_request::Request {
            digest: Some(sha(b).to_proto()),
            data: b.to_vec(),
            compressor: 0,
        })
        .collect();
    let r = cas
        .batch_update_blobs(re::BatchUpdateBlobsRequest {
            requests,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r
        .responses
        .iter()
        .all(|e| e.status.as_ref().unwrap().code == 0));
}

async fn read(cas: &mut Cas, d: &re::Digest) -> Vec<u8> {
    let r = cas
        .batch_read_blobs(re::BatchReadBlobsRequest {
            digests: vec![d.clone()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let e = &r.responses[0];
    assert_eq!(e.status.as_ref().unwrap().code, 0, "{e:?}");
    e.data.clone()
}

async fn missing(cas: &mut Cas, digests: &[re::Digest]) -> Vec<re::Digest> {
    cas.find_missing_blobs(re::FindMissingBlobsRequest {
        blob_digests: digests.to_vec(),
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .missing_blob_digests
}

async fn split(
    cas: &mut Cas,
    instance: &str,
    d: &Digest,
) -> Result<Vec<re::Digest>, tonic::Status> {
    cas.split_blob(re::SplitBlobRequest {
        instance_name: instance.to_string(),
        blob_digest: Some(d.to_proto()),
        digest_function: SHA.to_proto(),
        chunking_function: re::chunking_function::Value::FastCdc2020 as i32,
    })
    .await
    .map(|r| {
        let r = r.into_inner();
        assert_eq!(
            r.chunking_function,
            re::chunking_function::Value::FastCdc2020 as i32
        );
        r.chunk_digests
    })
}

async fn splice(
    cas: &mut Cas,
    d: &Digest,
    chunks: &[re::Digest],
) -> Result<re::SpliceBlobResponse, tonic::Status> {
    cas.splice_blob(re::SpliceBlobRequest {
        instance_name: String::new(),
        blob_digest: Some(d.to_proto()),
        chunk_digests: chunks.to_vec(),
        digest_function: SHA.to_proto(),
        chunking_function: re::chunking_function::Value::FastCdc2020 as i32,
    })
    .await
    .map(|r| r.into_inner())
}

async fn concat(cas: &mut Cas, chunks: &[re::Digest]) -> Vec<u8> {
    let mut out = Vec::new();
    for c in chunks {
        out.extend(read(cas, c).await);
    }
    out
}

#[tokio::test]
async fn capabilities_advertise_fastcdc_only_where_configured() {
    let dir = tempfile::tempdir().unwrap();
    let server = Cairn::start_with(dir.path(), CONFIG, None);
    let mut caps = CapabilitiesClient::new(server.channel().await);
    let get = |instance: &str| re::GetCapabilitiesRequest {
        instance_name: instance.to_string(),
    };
    let c = caps
        .get_capabilities(get(""))
        .await
        .unwrap()
        .into_inner()
        .cache_capabilities
        .unwrap();
    assert!(c.split_blob_support && c.splice_blob_support);
    let p = c.fast_cdc_2020_params.unwrap();
    assert_eq!((p.avg_chunk_size_bytes, p.seed), (AVG as u64, 0));

    let c = caps
        .get_capabilities(get("plain"))
        .await
        .unwrap()
        .into_inner()
        .cache_capabilities
        .unwrap();
    assert!(!c.split_blob_support && !c.splice_blob_support);
    assert!(c.fast_cdc_2020_params.is_none());

    // The plain instance answers the chunking RPCs with UNIMPLEMENTED, naming the key.
    let mut cas = ContentAddressableStorageClient::new(server.channel().await);
    let blob = data(10_000, 1);
    put(&mut cas, &[&blob]).await;
    let e = split(&mut cas, "plain", &sha(&blob)).await.unwrap_err();
    assert_eq!(e.code(), Code::Unimplemented, "{e:?}");
    assert!(e.message().contains("experimental_chunking"), "{e:?}");
}

#[tokio::test]
async fn split_stores_content_defined_chunks_that_make_the_blob() {
    let dir = tempfile::tempdir().unwrap();
    let server = Cairn::start_with(dir.path(), CONFIG, None);
    let mut cas = ContentAddressableStorageClient::new(server.channel().await);
    let blob = data(150_000, 7);
    let d = sha(&blob);
    put(&mut cas, &[&blob]).await;

    let chunks = split(&mut cas, "", &d).await.unwrap();
    assert!(chunks.len() > 10, "{} chunks", chunks.len());
    let sizes: Vec<i64> = chunks.iter().map(|c| c.size_bytes).collect();
    assert_eq!(sizes.iter().sum::<i64>(), blob.len() as i64);
    for s in &sizes[..sizes.len() - 1] {
        assert!((AVG as i64 / 4..=AVG as i64 * 4).contains(s), "{sizes:?}");
    }
    // Every chunk is in the CAS, and the chunks in order are the blob.
    assert!(missing(&mut cas, &chunks).await.is_empty());
    assert_eq!(concat(&mut cas, &chunks).await, blob);

    // The same answer again (from the kept layout), and from GetChunkMapping.
    assert_eq!(split(&mut cas, "", &d).await.unwrap(), chunks);
    let mut pages = cas
        .get_chunk_mapping(re::GetChunkMappingRequest {
            instance_name: String::new(),
            blob_digest: Some(d.to_proto()),
            digest_function: 0, // inferred from the hash length
            chunking_function: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut mapped = Vec::new();
    while let Some(page) = pages.next().await {
        mapped.extend(page.unwrap().chunk_digests);
    }
    assert_eq!(mapped, chunks);

    // Content-defined: one byte changed in the middle changes one or two chunks, not the
    // ones after it.
    let mut edited = blob.clone();
    edited[75_000] ^= 0xff;
    put(&mut cas, &[&edited]).await;
    let edited_chunks = split(&mut cas, "", &sha(&edited)).await.unwrap();
    let before: HashSet<_> = chunks.iter().map(|c| c.hash.clone()).collect();
    let shared = edited_chunks
        .iter()
        .filter(|c| before.contains(&c.hash))
        .count();
    assert!(
        shared + 3 >= edited_chunks.len(),
        "{shared} of {} chunks shared",
        edited_chunks.len()
    );

    // A blob that is not in the CAS has no split.
    let absent = sha(b"not uploaded");
    let e = split(&mut cas, "", &absent).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
}

#[tokio::test]
async fn a_blob_that_needs_too_many_chunks_is_not_split() {
    let dir = tempfile::tempdir().unwrap();
    let server = Cairn::start_with(dir.path(), CONFIG, None);
    let mut cas = ContentAddressableStorageClient::new(server.channel().await);
    // At least 1 MiB / 4 KiB = 256 chunks, past the limit of 200.
    let blob = data(1 << 20, 3);
    put(&mut cas, &[&blob]).await;
    let e = split(&mut cas, "", &sha(&blob)).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(e.message().contains("max_chunk_count"), "{e:?}");
}

#[tokio::test]
async fn splice_makes_a_blob_from_chunks_and_refuses_every_wrong_splice() {
    let dir = tempfile::tempdir().unwrap();
    let server = Cairn::start_with(dir.path(), CONFIG, None);
    let mut cas = ContentAddressableStorageClient::new(server.channel().await);
    let parts: Vec<Vec<u8>> = (0..5)
        .map(|i| data(3000 + i * 100, 40 + i as u64))
        .collect();
    let refs: Vec<&[u8]> = parts.iter().map(|p| p.as_slice()).collect();
    put(&mut cas, &refs).await;
    let chunk_digests: Vec<re::Digest> = parts.iter().map(|p| sha(p).to_proto()).collect();
    let whole: Vec<u8> = parts.concat();
    let d = sha(&whole);

    // Wrong splices first: each is refused and leaves nothing behind.
    let mut lying = d.to_proto();
    lying.hash = sha(b"something else").hash_hex();
    let e = splice(
        &mut cas,
        &Digest::from_proto(SHA.to_proto(), &lying).unwrap(),
        &chunk_digests,
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(missing(&mut cas, &[lying.clone()]).await.len() == 1);
    let e = split(
        &mut cas,
        "",
        &Digest::from_proto(SHA.to_proto(), &lying).unwrap(),
    )
    .await
    .unwrap_err();
    assert_eq!(
        e.code(),
        Code::NotFound,
        "a refused splice left a layout: {e:?}"
    );

    let e = splice(&mut cas, &d, &chunk_digests[1..]).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("add up"), "{e:?}");

    let mut with_absent = chunk_digests.clone();
    let absent = data(3000, 99);
    with_absent[0] = sha(&absent).to_proto();
    let absent_whole: Vec<u8> = [absent.clone()]
        .into_iter()
        .chain(parts[1..].iter().cloned())
        .collect::<Vec<_>>()
        .concat();
    let e = splice(&mut cas, &sha(&absent_whole), &with_absent)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");

    let too_many = vec![chunk_digests[0].clone(); 201];
    let e = splice(&mut cas, &d, &too_many).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("max_chunk_count"), "{e:?}");

    let e = cas
        .splice_blob(re::SpliceBlobRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");

    assert_eq!(missing(&mut cas, &[d.to_proto()]).await.len(), 1);

    // The right splice stores the blob and its layout.
    let r = splice(&mut cas, &d, &chunk_digests).await.unwrap();
    assert_eq!(r.blob_digest.unwrap(), d.to_proto());
    assert_eq!(read(&mut cas, &d.to_proto()).await, whole);
    assert_eq!(split(&mut cas, "", &d).await.unwrap(), chunk_digests);

    // RegisterChunkMapping: the same, with the chunk list spread over three messages.
    let reordered: Vec<re::Digest> = chunk_digests.iter().rev().cloned().collect();
    let whole2: Vec<u8> = parts.iter().rev().cloned().collect::<Vec<_>>().concat();
    let d2 = sha(&whole2);
    let messages = vec![
        re::RegisterChunkMappingRequest {
            instance_name: String::new(),
            blob_digest: Some(d2.to_proto()),
            chunk_digests: reordered[..2].to_vec(),
            digest_function: SHA.to_proto(),
            chunking_function: re::chunking_function::Value::FastCdc2020 as i32,
        },
        re::RegisterChunkMappingRequest {
            chunk_digests: vec![],
            ..Default::default()
        },
        re::RegisterChunkMappingRequest {
            chunk_digests: reordered[2..].to_vec(),
            ..Default::default()
        },
    ];
    let r = cas
        .register_chunk_mapping(futures::stream::iter(messages))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.blob_digest.unwrap(), d2.to_proto());
    assert_eq!(read(&mut cas, &d2.to_proto()).await, whole2);

    // A layout for a blob already stored is still checked: a wrong one is refused.
    let e = splice(&mut cas, &d2, &chunk_digests).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert_eq!(split(&mut cas, "", &d2).await.unwrap(), reordered);
}

#[test]
fn chunking_config_mistakes_are_errors_with_the_key_path() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            r#"experimental_chunking: { index_store: "CAS" }"#,
            "experimental_chunking.index_store: \"CAS\" is the cas_store",
        ),
        (
            r#"experimental_chunking: {}"#,
            "experimental_chunking.index_store: missing",
        ),
        (
            r#"experimental_chunking: { index_store: "NOPE" }"#,
            "experimental_chunking.index_store: no store named \"NOPE\"",
        ),
        (
            r#"experimental_chunking: { index_store: "INDEX", avg_chunk_size_bytes: 100 }"#,
            "experimental_chunking.avg_chunk_size_bytes: 100 is out of range",
        ),
    ];
    for (block, expected) in cases {
        let f = dir.path().join("c.json5");
        std::fs::write(
            &f,
            format!(
                r#"{{ stores: {{ CAS: {{ memory: {{}} }}, INDEX: {{ memory: {{}} }} }},
                servers: [{{ listener: {{ http: {{ socket_address: "127.0.0.1:0" }} }},
                services: {{ cas: [{{ instance_name: "main", cas_store: "CAS", {block} }}] }} }}] }}"#
            ),
        )
        .unwrap();
        for verb in ["check-config", "run"] {
            let out = Command::new(env!("CARGO_BIN_EXE_cairn"))
                .arg(verb)
                .arg(&f)
                .output()
                .unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{verb} accepted {block}");
            assert!(
                err.contains(&format!("servers[0].services.cas.main.{expected}")),
                "{verb} {block}: {err}"
            );
        }
    }
}
