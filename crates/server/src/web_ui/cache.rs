//! `/cache` (every configured store as its tree: kind, bytes and entries where the store
//! knows them, reads with their hit rate, evictions, and the requests leaf stores sent to
//! their backends), `/lookup?digest=TEXT&as=VIEW` (the lookup form's target: a digest as
//! `HASH/SIZE`, `HASH-SIZE` or a `blobs/HASH/SIZE` resource name, redirected to its page) and
//! `/cas/HASH-SIZE` (one blob: present or not, its size, downloads, and when it is a
//! Directory or a Tree, rendered as one).
//!
//! The numbers come from the stores' own descriptions ([`cairn_store::StoreInfo`]) and from
//! the process's metrics instruments (a top-level store's reads through every service, the
//! backend counters): nothing parses `/metrics`, and nothing here changes a store.

use std::fmt::Write;
use std::sync::Arc;

use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use cairn_core::proto::build::bazel::remote::execution::v2 as re;
use cairn_core::{Code, Digest};
use cairn_store::{Reads, StoreExt, StoreInfo};
use prost::Message;

use super::actions::{self, no_cas, MAX_INLINE_BYTES, MAX_PROTO_BYTES};
use super::html::{self, esc, page};
use super::WebUi;

/// Deepest store nesting shown (configs nest a few levels; a bound all the same).
const MAX_DEPTH: usize = 32;
/// Longest text the lookup form takes.
const MAX_LOOKUP_TEXT: usize = 400;

/// The lookup form, with `value` in its field.
fn lookup_form(value: &str) -> String {
    format!(
        "<form method=\"get\" action=\"/lookup\"><label>Digest \
         <input name=\"digest\" size=\"80\" value=\"{}\" placeholder=\"HASH/SIZE or HASH-SIZE\"></label> \
         <select name=\"as\"><option value=\"blob\">blob page</option>\
         <option value=\"directory\">as a Directory</option><option value=\"tree\">as a Tree</option>\
         <option value=\"download\">download</option></select> <button>Look up</button></form>",
        esc(value)
    )
}

fn reads_cells(reads: Option<Reads>) -> String {
    match reads {
        None => "<td class=\"muted\">-</td><td class=\"muted\">-</td>".into(),
        Some(r) => format!(
            "<td>{}</td><td>{} / {}{}</td>",
            r.hit_rate()
                .map(|h| format!("{:.1}%", h * 100.0))
                .unwrap_or_else(|| "<span class=\"muted\">no reads</span>".into()),
            r.hits,
            r.misses,
            if r.errors > 0 {
                format!(" <span class=\"bad\">({} errors)</span>", r.errors)
            } else {
                String::new()
            }
        ),
    }
}

fn opt_cell(v: Option<String>) -> String {
    match v {
        Some(v) => format!("<td>{v}</td>"),
        None => "<td class=\"muted\">-</td>".into(),
    }
}

/// One row per node of `info`, depth first; `path` is the node's key path without `stores.`
/// (the `store` label of the backend counters).
fn rows(
    ui: &WebUi,
    name: &str,
    path: &str,
    info: &StoreInfo,
    reads: Option<Reads>,
    depth: usize,
    b: &mut String,
) {
    let size = match info.size_bytes {
        Some(n) => Some(html::bytes(n)),
        None if !info.children.is_empty() && info.total_size_bytes() > 0 => Some(format!(
            "<span class=\"muted\">{} below</span>",
            html::bytes(info.total_size_bytes())
        )),
        None => None,
    };
    let backend = ui
        .metrics
        .as_ref()
        .and_then(|m| m.backend_totals(path))
        .map(|t| {
            format!(
                "{} {}{}{}",
                esc(t.backend),
                t.requests,
                if t.errors > 0 {
                    format!(" <span class=\"bad\">({} failed)</span>", t.errors)
                } else {
                    String::new()
                },
                if t.retries > 0 {
                    format!(", {} retried", t.retries)
                } else {
                    String::new()
                }
            )
        });
    let _ = write!(
        b,
        "<tr><td style=\"padding-left:{}px\">{}</td><td><code>{}</code>{}</td>{}{}{}{}{}</tr>",
        8 + depth * 18,
        esc(name),
        info.kind,
        info.detail
            .as_ref()
            .map(|d| format!(" <span class=\"muted\">{}</span>", esc(d)))
            .unwrap_or_default(),
        opt_cell(size),
        opt_cell(info.entries.map(|n| n.to_string())),
        reads_cells(reads.or(info.reads)),
        opt_cell(info.evictions.map(|n| n.to_string())),
        opt_cell(backend)
    );
    if depth >= MAX_DEPTH {
        return;
    }
    let mut nth = std::collections::HashMap::<&str, usize>::new();
    for (key, child) in &info.children {
        // A shard's stores are a list: `stores[0].store`, `stores[1].store`, ...
        let key = if *key == "stores" {
            let i = nth.entry(key).or_default();
            *i += 1;
            format!("stores[{}].store", *i - 1)
        } else {
            key.to_string()
        };
        let child_path = format!("{path}.{}.{key}", info.kind);
        rows(ui, &key, &child_path, child, None, depth + 1, b);
    }
}

/// `/cache`: the lookup form and every configured store's tree.
pub async fn cache(State(ui): State<Arc<WebUi>>) -> Response {
    let mut b = String::from("<h2>Blob lookup</h2>");
    b.push_str(&lookup_form(""));
    b.push_str(
        "<h2>Stores</h2><p class=\"muted\">Reads are lookups and gets, each key one read: a hit when \
         the store had it. A top-level store counts what every service asked of it; a store inside \
         another counts what reached it. Backend requests are those a leaf store sent to Redis or \
         object storage, retries included.</p>",
    );
    if ui.stores.is_empty() {
        b.push_str("<p class=\"muted\">No stores.</p>");
    } else {
        b.push_str(
            "<table><tr><th>Store</th><th>Kind</th><th>Size</th><th>Entries</th><th>Hit rate</th>\
             <th>Hits / misses</th><th>Evictions</th><th>Backend requests</th></tr>",
        );
        for (name, store) in &ui.stores {
            let mut label = name.clone();
            for (role, n) in &ui.store_roles {
                if n == name {
                    let _ = write!(label, " ({role} of these pages)");
                }
            }
            let reads = ui.metrics.as_ref().and_then(|m| m.cache_reads(name));
            rows(&ui, &label, name, &store.info(), reads, 0, &mut b);
        }
        b.push_str("</table>");
    }
    page("Cache", &b)
}

/// Reads the lookup form's digest text: `HASH/SIZE`, `HASH-SIZE`, or any resource name that
/// ends in `HASH/SIZE` (`blobs/HASH/SIZE`); the hash case-insensitive.
pub fn lookup_digest(text: &str) -> Result<Digest, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("no digest given: enter HASH/SIZE or HASH-SIZE".into());
    }
    if text.len() > MAX_LOOKUP_TEXT {
        return Err(format!(
            "{} characters is not a digest (HASH/SIZE or HASH-SIZE)",
            text.len()
        ));
    }
    let (hash, size) = match text.rsplit_once('/') {
        Some((rest, size)) => (rest.rsplit('/').next().unwrap_or(rest), size),
        None => text
            .rsplit_once('-')
            .ok_or_else(|| format!("{text:?} is not HASH/SIZE or HASH-SIZE"))?,
    };
    let size: i64 = size
        .trim()
        .parse()
        .map_err(|_| format!("{text:?}: the size {size:?} is not a number of bytes"))?;
    let hash = hash.trim().to_ascii_lowercase();
    let function = cairn_core::DigestFunction::from_request(0, hash.len())
        .map_err(|e| format!("{text:?}: {}", e.message))?;
    Digest::parse(function, &hash, size).map_err(|e| e.message)
}

/// `/lookup?digest=TEXT&as=blob|directory|tree|download`: a redirect to the digest's page, or
/// the form again with what is wrong (400).
pub async fn lookup(RawQuery(query): RawQuery) -> Response {
    let (mut text, mut view) = (String::new(), String::from("blob"));
    for (k, v) in html::form_pairs(query.as_deref().unwrap_or("")) {
        match k.as_str() {
            "digest" => text = v,
            "as" => view = v,
            _ => {}
        }
    }
    let bad = |why: &str, text: &str| {
        let mut r = page(
            "Blob lookup",
            &format!(
                "<p class=\"bad\">{}</p>{}",
                esc(why),
                lookup_form(&text.chars().take(MAX_LOOKUP_TEXT).collect::<String>())
            ),
        );
        *r.status_mut() = StatusCode::BAD_REQUEST;
        r
    };
    let d = match lookup_digest(&text) {
        Ok(d) => d,
        Err(why) => return bad(&why, &text),
    };
    let kind = match view.as_str() {
        "blob" => "cas",
        "directory" => "tree",
        "tree" => "output-tree",
        "download" => "blob",
        other => {
            return bad(
                &format!("{other:?} is not a view: blob, directory, tree or download"),
                &text,
            )
        }
    };
    let mut r = StatusCode::SEE_OTHER.into_response();
    if let Ok(v) = HeaderValue::from_str(&format!("/{kind}/{}-{}", d.hash_hex(), d.size())) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r
}

/// What a small blob is, when it is a Directory or a Tree: its bytes decode as one and encode
/// back to the same bytes (a proto decoder skips what it does not know, so decoding alone
/// says little).
enum Shape {
    Directory(re::Directory),
    Tree(re::Tree),
    Other,
}

fn shape(bytes: &bytes::Bytes) -> Shape {
    if let Ok(t) = re::Tree::decode(bytes.clone()) {
        if t.root.is_some() && t.encode_to_vec() == bytes.as_ref() {
            return Shape::Tree(t);
        }
    }
    if let Ok(d) = re::Directory::decode(bytes.clone()) {
        let has_nodes = !(d.files.is_empty() && d.directories.is_empty() && d.symlinks.is_empty());
        if has_nodes && d.encode_to_vec() == bytes.as_ref() {
            return Shape::Directory(d);
        }
    }
    Shape::Other
}

/// `/cas/HASH-SIZE`: one blob of the CAS.
pub async fn blob_page(State(ui): State<Arc<WebUi>>, Path(text): Path<String>) -> Response {
    let d = match actions::parse_digest(&text) {
        Ok(d) => d,
        Err(r) => return *r,
    };
    let Some(cas) = &ui.cas else { return no_cas() };
    let title = format!("Blob {}-{}", d.hash_hex(), d.size());
    let stored = match cas.has(&d).await {
        Ok(Some(n)) => n,
        Ok(None) => {
            return html::error(
                StatusCode::NOT_FOUND,
                &format!("blob {d} is not in the CAS"),
            )
        }
        Err(e) => {
            let status = if e.code == Code::NotFound {
                StatusCode::NOT_FOUND
            } else {
                StatusCode::BAD_GATEWAY
            };
            return html::error(status, &format!("blob {d}: {}", e.message));
        }
    };
    let mut b = String::new();
    let _ = write!(
        b,
        "<table><tr><th>Digest</th><td><code>{}/{}</code></td></tr>\
         <tr><th>Function</th><td>{}</td></tr><tr><th>Size</th><td>{} ({} bytes)</td></tr></table>",
        d.hash_hex(),
        d.size(),
        d.function(),
        html::bytes(d.size()),
        d.size()
    );
    if stored != d.size() {
        let _ = write!(
            b,
            "<p class=\"bad\">The CAS holds {stored} bytes under this digest, not {}: the stored blob is \
             damaged and is not served.</p>",
            d.size()
        );
        let mut r = page(&title, &b);
        *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
        return r;
    }
    let _ = write!(
        b,
        "<p><a href=\"/blob/{p}\">download</a> · <a href=\"/blob/{p}?view=text\">view as text</a> · \
         <a href=\"/tree/{p}\">as a Directory</a> · <a href=\"/output-tree/{p}\">as a Tree</a> · \
         <a href=\"/action/{p}\">as an Action</a></p>",
        p = format_args!("{}-{}", d.hash_hex(), d.size())
    );
    if d.size() == 0 {
        b.push_str("<p class=\"muted\">The empty blob (also the empty Directory).</p>");
        return page(&title, &b);
    }
    let limit = if d.size() <= MAX_PROTO_BYTES {
        d.size()
    } else {
        MAX_INLINE_BYTES
    };
    let head = match cas.get(&d, 0, Some(limit)).await {
        Ok(s) => cairn_core::stream::collect(s, limit as usize).await,
        Err(e) => Err(e),
    };
    let head = match head {
        Ok(h) => h,
        Err(e) => {
            let _ = write!(
                b,
                "<p class=\"bad\">Reading the blob: {}</p>",
                esc(&e.message)
            );
            return page(&title, &b);
        }
    };
    let whole = head.len() as u64 == d.size();
    match if whole { shape(&head) } else { Shape::Other } {
        Shape::Tree(t) => {
            b.push_str("<h2>A Tree (an output directory)</h2>");
            b.push_str(&actions::render_tree(&t, d.function()));
        }
        Shape::Directory(dir) => {
            b.push_str("<h2>A Directory</h2>");
            b.push_str(&actions::render_directory(&dir, d.function()));
        }
        Shape::Other => {
            let shown = &head[..head.len().min(MAX_INLINE_BYTES as usize)];
            match std::str::from_utf8(shown) {
                Ok(t) => {
                    let _ = write!(
                        b,
                        "<h2>Text{}</h2><pre>{}</pre>",
                        if (shown.len() as u64) < d.size() {
                            " (the first part)"
                        } else {
                            ""
                        },
                        esc(t)
                    );
                }
                Err(_) => b.push_str("<p class=\"muted\">Binary content: download it.</p>"),
            }
        }
    }
    page(&title, &b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_takes_the_usual_spellings() {
        let h = "ab".repeat(32);
        for text in [
            format!("{h}/12"),
            format!("{h}-12"),
            format!("  {}/12 ", h.to_uppercase()),
            format!("blobs/{h}/12"),
            format!("inst/blobs/{h}/12"),
        ] {
            let d = lookup_digest(&text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
            assert_eq!((d.hash_hex(), d.size()), (h.clone(), 12), "{text:?}");
        }
        for bad in [
            String::new(),
            "x".into(),
            format!("{h}/-1"),
            format!("{h}/99999999999999999999999"),
            format!("{h}/twelve"),
            format!("{}/1", "g".repeat(64)),
            format!("{}/1", "a".repeat(63)),
            "a".repeat(1000),
        ] {
            assert!(lookup_digest(&bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn directories_and_trees_are_told_apart() {
        let f = cairn_core::DigestFunction::Sha256;
        let dir = re::Directory {
            files: vec![re::FileNode {
                name: "a.txt".into(),
                digest: Some(f.compute(b"a").to_proto()),
                ..Default::default()
            }],
            ..Default::default()
        };
        let tree = re::Tree {
            root: Some(dir.clone()),
            children: vec![],
        };
        assert!(matches!(
            shape(&dir.encode_to_vec().into()),
            Shape::Directory(_)
        ));
        assert!(matches!(
            shape(&tree.encode_to_vec().into()),
            Shape::Tree(_)
        ));
        assert!(matches!(
            shape(&bytes::Bytes::from_static(b"hello world")),
            Shape::Other
        ));
    }
}
