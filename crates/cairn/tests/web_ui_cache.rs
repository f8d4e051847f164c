//! The web UI's cache page and blob lookup against a real Cairn whose CAS is
//! verify(fast_slow(memory, redis_store)) over Debian's `redis-server`, and whose AC is a
//! `cache_metrics` wrapper over a filesystem store: `/cache` shows each store's tree with
//! kinds, sizes, entries, reads and hit rates, evictions and the Redis requests; `/lookup`
//! redirects a pasted digest to its page; `/cas/HASH-SIZE` renders text, Directory and Tree
//! blobs. Hostile input (garbage digests, sizes past any blob, overflowing sizes, unknown
//! views, missing blobs) gets a clear page with the right status, and the server stays up.

mod common;
#[path = "common/redis.rs"]
mod redis_kit;

use cairn_core::proto::build::bazel::remote::execution::v2 as re;
use cairn_core::{Digest, DigestFunction};
use common::actions::upload_blobs;
use common::{http_get, Cairn};
use prost::Message;
use re::action_cache_client::ActionCacheClient;
use re::content_addressable_storage_client::ContentAddressableStorageClient as CasClient;
use redis_kit::RedisServer;

const SHA: DigestFunction = DigestFunction::Sha256;

const CONFIG: &str = r#"{
  stores: {
    CAS: { verify: { verify_size: true, verify_hash: true, backend: { fast_slow: {
      fast: { memory: { eviction_policy: { max_bytes: 2500 } } },
      slow: { redis_store: { addresses: ["@REDIS@"], key_prefix: "cas:" } } } } } },
    AC: { cache_metrics: { cache_type: "ac_tier", backend: {
      filesystem: { content_path: "@DIR@/ac", temp_path: "@DIR@/ac-tmp" } } } },
    SPARE: { memory: {} },
  },
  servers: [
    { listener: { http: { socket_address: "@ADDR@" } },
      services: {
        cas: [{ instance_name: "", cas_store: "CAS" }],
        ac: [{ instance_name: "", ac_store: "AC" }],
        health: {},
        web_ui: { cas_store: "CAS", ac_store: "AC" },
      } },
  ],
}"#;

/// A GET over a new HTTP/1.1 connection: (status, the whole head, body).
async fn get_with_head(addr: std::net::SocketAddr, path: &str) -> (u16, String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    (
        head[9..12].parse().unwrap(),
        head.to_string(),
        body.to_string(),
    )
}

/// The `/cache` table row whose first cell is `name` (nested rows are indented, so `depth`
/// says which).
fn row<'a>(page: &'a str, name: &str, depth: usize) -> &'a str {
    let start = format!("<tr><td style=\"padding-left:{}px\">{name}", 8 + depth * 18);
    let at = page
        .find(&start)
        .unwrap_or_else(|| panic!("no row {name:?} at depth {depth}: {page}"));
    let rest = &page[at..];
    &rest[..rest.find("</tr>").unwrap()]
}

fn digest_path(d: &Digest) -> String {
    format!("{}-{}", d.hash_hex(), d.size())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_page_shows_every_store_tree_with_its_counters() {
    let dir = tempfile::tempdir().unwrap();
    let redis = RedisServer::start(dir.path());
    let cairn = Cairn::start_with(dir.path(), &CONFIG.replace("@REDIS@", &redis.url()), None);
    let ch = cairn.channel().await;

    // Three blobs of 1000 bytes: the 2500-byte fast tier keeps two and evicts one.
    let blobs: Vec<Vec<u8>> = (0..3u8).map(|i| vec![b'a' + i; 1000]).collect();
    let digests: Vec<Digest> = blobs.iter().map(|b| SHA.compute(b)).collect();
    upload_blobs(ch.clone(), "", blobs).await;
    let absent = SHA.compute(b"never uploaded");
    let missing = CasClient::new(ch.clone())
        .find_missing_blobs(re::FindMissingBlobsRequest {
            instance_name: String::new(),
            blob_digests: digests
                .iter()
                .chain([&absent])
                .map(|d| d.to_proto())
                .collect(),
            digest_function: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(missing.missing_blob_digests, vec![absent.to_proto()]);

    // One action result: read once (a hit), and one read of an action never stored (a miss).
    let result = re::ActionResult {
        exit_code: 0,
        ..Default::default()
    };
    let action = SHA.compute(b"an action");
    let mut ac = ActionCacheClient::new(ch.clone());
    ac.update_action_result(re::UpdateActionResultRequest {
        action_digest: Some(action.to_proto()),
        action_result: Some(result),
        ..Default::default()
    })
    .await
    .unwrap();
    for (d, found) in [(action, true), (SHA.compute(b"no action"), false)] {
        let r = ac
            .get_action_result(re::GetActionResultRequest {
                action_digest: Some(d.to_proto()),
                ..Default::default()
            })
            .await;
        assert_eq!(r.is_ok(), found, "{r:?}");
    }

    let (code, page) = http_get(cairn.addr, "/cache").await;
    assert_eq!(code, 200, "{page}");
    assert!(page.contains("<a href=\"/cache\">Cache</a>"), "{page}");
    assert!(page.contains("action=\"/lookup\""), "{page}");

    // The CAS as configured, nested: verify > fast_slow > memory, redis_store.
    let cas = row(&page, "CAS (CAS of these pages)", 0);
    assert!(cas.contains("<code>verify</code>"), "{cas}");
    // Every service's reads of the top-level store: 3 found, 1 missing in FindMissingBlobs.
    assert!(cas.contains("75.0%") && cas.contains("3 / 1"), "{cas}");
    let below_cas = &page[page.find(cas).unwrap()..];
    assert!(row(below_cas, "backend", 1).contains("<code>fast_slow</code>"));
    let fast = row(below_cas, "fast", 2);
    assert!(fast.contains("<code>memory</code>"), "{fast}");
    assert!(fast.contains("<td>2000 B</td><td>2</td>"), "{fast}");
    assert!(
        fast.contains("<td>1</td>"),
        "one eviction from the fast tier: {fast}"
    );
    let slow = row(below_cas, "slow", 2);
    assert!(slow.contains("<code>redis_store</code>"), "{slow}");
    assert!(slow.contains("redis_store "), "backend requests: {slow}");
    let requests: u64 = slow
        .split("redis_store ")
        .last()
        .unwrap()
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(requests >= 3, "three writes reached Redis at least: {slow}");

    // The AC: a configured cache_metrics wrapper counts what reached it.
    let ac_row = row(&page, "AC (AC of these pages)", 0);
    assert!(ac_row.contains("<code>cache_metrics</code>"), "{ac_row}");
    assert!(ac_row.contains("cache_type ac_tier"), "{ac_row}");
    let fs = row(&page[page.find(ac_row).unwrap()..], "backend", 1);
    assert!(fs.contains("<code>filesystem</code>"), "{fs}");
    assert!(fs.contains("<td>1</td>"), "one entry: {fs}");
    // A store no service uses is listed, without reads.
    let spare = row(&page, "SPARE", 0);
    assert!(spare.contains("<code>memory</code>"), "{spare}");
    drop(redis);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blob_lookup_and_blob_pages_and_hostile_digests() {
    let dir = tempfile::tempdir().unwrap();
    let redis = RedisServer::start(dir.path());
    let cairn = Cairn::start_with(dir.path(), &CONFIG.replace("@REDIS@", &redis.url()), None);
    let ch = cairn.channel().await;

    let text = b"hello <world> & friends\n".to_vec();
    let file = SHA.compute(&text);
    let dir_msg = re::Directory {
        files: vec![re::FileNode {
            name: "greeting<1>.txt".into(),
            digest: Some(file.to_proto()),
            is_executable: false,
            ..Default::default()
        }],
        ..Default::default()
    };
    let tree_msg = re::Tree {
        root: Some(re::Directory {
            directories: vec![re::DirectoryNode {
                name: "sub".into(),
                digest: Some(SHA.compute(&dir_msg.encode_to_vec()).to_proto()),
            }],
            ..Default::default()
        }),
        children: vec![dir_msg.clone()],
    };
    let (dir_bytes, tree_bytes) = (dir_msg.encode_to_vec(), tree_msg.encode_to_vec());
    let (dir_d, tree_d) = (SHA.compute(&dir_bytes), SHA.compute(&tree_bytes));
    let binary = vec![0xffu8, 0xfe, 0x00, 0x01];
    let binary_d = SHA.compute(&binary);
    upload_blobs(
        ch.clone(),
        "",
        vec![text.clone(), dir_bytes, tree_bytes, binary],
    )
    .await;

    // The form's spellings, redirected to the chosen view.
    for (query, location) in [
        (
            format!("digest={}%2F{}", file.hash_hex(), file.size()),
            format!("/cas/{}", digest_path(&file)),
        ),
        (
            format!(
                "digest=+{}-{}+&as=blob",
                file.hash_hex().to_uppercase(),
                file.size()
            ),
            format!("/cas/{}", digest_path(&file)),
        ),
        (
            format!(
                "digest=blobs%2F{}%2F{}&as=directory",
                dir_d.hash_hex(),
                dir_d.size()
            ),
            format!("/tree/{}", digest_path(&dir_d)),
        ),
        (
            format!("digest={}%2F{}&as=tree", tree_d.hash_hex(), tree_d.size()),
            format!("/output-tree/{}", digest_path(&tree_d)),
        ),
        (
            format!("digest={}%2F{}&as=download", file.hash_hex(), file.size()),
            format!("/blob/{}", digest_path(&file)),
        ),
    ] {
        let (code, head, _) = get_with_head(cairn.addr, &format!("/lookup?{query}")).await;
        assert_eq!(code, 303, "{query}: {head}");
        assert!(
            head.to_ascii_lowercase()
                .contains(&format!("location: {location}")),
            "{query}: {head}"
        );
    }

    // A text blob: shown escaped, with its downloads.
    let (code, page) = http_get(cairn.addr, &format!("/cas/{}", digest_path(&file))).await;
    assert_eq!(code, 200, "{page}");
    assert!(page.contains("hello &lt;world&gt; &amp; friends"), "{page}");
    assert!(!page.contains("<world>"), "{page}");
    assert!(
        page.contains(&format!("/blob/{}?view=text", digest_path(&file))),
        "{page}"
    );
    // A Directory and a Tree blob, rendered as such.
    let (code, page) = http_get(cairn.addr, &format!("/cas/{}", digest_path(&dir_d))).await;
    assert_eq!(code, 200, "{page}");
    assert!(page.contains("A Directory"), "{page}");
    assert!(page.contains("greeting&lt;1&gt;.txt"), "{page}");
    let (code, page) = http_get(cairn.addr, &format!("/cas/{}", digest_path(&tree_d))).await;
    assert_eq!(code, 200, "{page}");
    assert!(page.contains("A Tree"), "{page}");
    assert!(page.contains("sub/<ul>"), "{page}");
    assert!(page.contains("greeting&lt;1&gt;.txt"), "{page}");
    let (code, page) = http_get(cairn.addr, &format!("/cas/{}", digest_path(&binary_d))).await;
    assert_eq!(code, 200, "{page}");
    assert!(page.contains("Binary content"), "{page}");

    // Missing blobs, and sizes no blob has: 404 naming the digest.
    let absent = SHA.compute(b"absent");
    let huge = format!("{}-{}", file.hash_hex(), i64::MAX);
    for path in [
        format!("/cas/{}", digest_path(&absent)),
        format!("/cas/{huge}"),
        format!("/blob/{huge}"),
    ] {
        let (code, page) = http_get(cairn.addr, &path).await;
        assert_eq!(code, 404, "{path}: {page}");
        assert!(page.contains("is not in the CAS"), "{path}: {page}");
    }
    // A Directory or Tree larger than a page reads: refused before any read.
    for path in [format!("/tree/{huge}"), format!("/output-tree/{huge}")] {
        let (code, page) = http_get(cairn.addr, &path).await;
        assert_eq!(code, 400, "{path}: {page}");
        assert!(page.contains("more than this page reads"), "{path}: {page}");
    }
    // Garbage in the lookup form: 400 with the form again and what is wrong.
    let h = file.hash_hex();
    for (query, why) in [
        ("".to_string(), "no digest given"),
        ("digest=".to_string(), "no digest given"),
        ("digest=hello".to_string(), "is not HASH/SIZE"),
        (format!("digest={h}%2F-5"), "negative"),
        (
            format!("digest={h}%2F99999999999999999999999"),
            "is not a number of bytes",
        ),
        (format!("digest={}%2F5", "z".repeat(64)), "hexadecimal"),
        (format!("digest={}%2F5", "a".repeat(50)), "hash"),
        (format!("digest={}", "a".repeat(5000)), "is not a digest"),
        (format!("digest={h}%2F5&as=%3Cscript%3E"), "is not a view"),
    ] {
        let (code, page) = http_get(cairn.addr, &format!("/lookup?{query}")).await;
        assert_eq!(code, 400, "{query}: {page}");
        assert!(page.contains(why), "{query}: {why}: {page}");
        assert!(page.contains("action=\"/lookup\""), "{query}: {page}");
        assert!(!page.contains("<script>"), "{query}: {page}");
    }
    for path in ["/cas/nodash", "/cas/%3Cb%3E-1", &format!("/cas/{h}--1")] {
        let (code, page) = http_get(cairn.addr, path).await;
        assert_eq!(code, 400, "{path}: {page}");
    }
    // Still serving.
    let (code, _) = http_get(cairn.addr, "/status").await;
    assert_eq!(code, 200);
    let (code, _) = http_get(cairn.addr, "/cache").await;
    assert_eq!(code, 200);
    drop(redis);
}
