//! `/action/HASH-SIZE` (the Action, its Command, its result from the action cache, the
//! execution timeline and the worker), `/tree/HASH-SIZE` (a Directory, browsable) and
//! `/blob/HASH-SIZE` (any CAS blob, streamed; `?name=` for the file name, `?view=text` to
//! show it in the browser as text). Digests in URLs are checked before a store sees them;
//! protos are read with a size limit, blobs are streamed and never held whole.

use std::fmt::Write;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use cairn_core::proto::build::bazel::remote::execution::v2 as re;
use cairn_core::{Code, Digest, DigestFunction};
use cairn_store::{StoreExt, StoreRef};
use futures::StreamExt;
use prost::Message;

use super::html::{self, esc, page, url};
use super::WebUi;

/// Largest Action, Command, Directory or ActionResult read.
pub(super) const MAX_PROTO_BYTES: u64 = 4 << 20;
/// stdout and stderr shown inline; the whole is a download.
pub(super) const MAX_INLINE_BYTES: u64 = 64 << 10;
/// Longest `HASH-SIZE` accepted (a SHA-512 hash and a 20-digit size fit).
const MAX_DIGEST_TEXT: usize = 160;

/// `HASH-SIZE` as a digest (the function comes from the hash length), or a 400 page.
pub fn parse_digest(text: &str) -> Result<Digest, Box<Response>> {
    let bad = |why: String| Err(Box::new(html::error(StatusCode::BAD_REQUEST, &why)));
    if text.len() > MAX_DIGEST_TEXT {
        return bad(format!(
            "a digest of {} characters: expected HASH-SIZE (at most {MAX_DIGEST_TEXT})",
            text.len()
        ));
    }
    let Some((hash, size)) = text.rsplit_once('-') else {
        return bad(format!("{text:?} is not HASH-SIZE"));
    };
    let Ok(size) = size.parse::<i64>() else {
        return bad(format!(
            "{text:?}: the size {size:?} is not a number of bytes"
        ));
    };
    let function = match DigestFunction::from_request(0, hash.len()) {
        Ok(f) => f,
        Err(e) => return bad(format!("{text:?}: {}", e.message)),
    };
    Digest::parse(function, hash, size).or_else(|e| bad(e.message))
}

pub(super) fn link(kind: &str, d: &Digest) -> String {
    format!(
        "<a href=\"/{kind}/{h}-{s}\"><code>{h}-{s}</code></a>",
        h = d.hash_hex(),
        s = d.size()
    )
}

fn blob_link(d: &Digest, name: &str) -> String {
    format!(
        "<a href=\"/blob/{}-{}?name={}\">{}</a>",
        d.hash_hex(),
        d.size(),
        url(name),
        esc(name)
    )
}

pub(super) fn no_cas() -> Response {
    html::error(
        StatusCode::NOT_FOUND,
        "no CAS to read from: services.web_ui.cas_store is not set",
    )
}

/// Reads and decodes a small proto blob; the error is a whole page.
async fn read_proto<M: Message + Default>(
    store: &StoreRef,
    d: &Digest,
    what: &str,
) -> Result<M, Box<Response>> {
    if d.size() > MAX_PROTO_BYTES {
        return Err(Box::new(html::error(
            StatusCode::BAD_REQUEST,
            &format!(
                "{what} {d}: {} bytes is more than this page reads ({MAX_PROTO_BYTES})",
                d.size()
            ),
        )));
    }
    let bytes = store
        .get_all(d, MAX_PROTO_BYTES as usize)
        .await
        .map_err(|e| {
            let status = if e.code == Code::NotFound {
                StatusCode::NOT_FOUND
            } else {
                StatusCode::BAD_GATEWAY
            };
            Box::new(html::error(status, &format!("{what} {d}: {}", e.message)))
        })?;
    M::decode(bytes).map_err(|e| {
        Box::new(html::error(
            StatusCode::UNPROCESSABLE_ENTITY,
            &format!("{what} {d} is not a {what} message: {e}"),
        ))
    })
}

fn digest_of(d: &Option<re::Digest>, function: DigestFunction) -> Option<Digest> {
    d.as_ref()
        .and_then(|d| Digest::from_proto_with(function, d).ok())
}

/// Standard output or error: inline (capped) from `raw` or the CAS, and a download link.
async fn stdio(cas: &StoreRef, name: &str, raw: &[u8], digest: Option<Digest>, b: &mut String) {
    let _ = write!(b, "<h2>{name}</h2>");
    if !raw.is_empty() {
        let _ = write!(b, "<pre>{}</pre>", esc(&String::from_utf8_lossy(raw)));
        return;
    }
    let Some(d) = digest.filter(|d| d.size() > 0) else {
        b.push_str("<p class=\"muted\">empty</p>");
        return;
    };
    let len = d.size().min(MAX_INLINE_BYTES);
    let mut text = Vec::new();
    match cas.get(&d, 0, Some(len)).await {
        Ok(mut s) => {
            while let Some(Ok(chunk)) = s.next().await {
                text.extend_from_slice(&chunk);
                if text.len() as u64 >= len {
                    break;
                }
            }
            text.truncate(len as usize);
            let _ = write!(
                b,
                "<p>{} ({}){}</p><pre>{}</pre>",
                blob_link(&d, name),
                html::bytes(d.size()),
                if d.size() > len {
                    "; the first part is shown"
                } else {
                    ""
                },
                esc(&String::from_utf8_lossy(&text))
            );
        }
        Err(e) => {
            let _ = write!(
                b,
                "<p class=\"bad\">{}: {}</p>",
                link("blob", &d),
                esc(&e.message)
            );
        }
    }
}

fn ts_ms(t: &Option<cairn_core::proto::google::protobuf::Timestamp>) -> Option<i64> {
    t.as_ref()
        .filter(|t| t.seconds > 0)
        .map(|t| t.seconds * 1000 + i64::from(t.nanos) / 1_000_000)
}

/// The execution metadata as a timeline: each phase, its start relative to queueing and its
/// length, with a bar.
fn timeline(m: &re::ExecutedActionMetadata, b: &mut String) {
    let _ = write!(
        b,
        "<h2>Execution</h2><p>Worker: <code>{}</code></p>",
        esc(&m.worker)
    );
    let phases = [
        ("queued", &m.queued_timestamp, &m.worker_start_timestamp),
        (
            "input fetch",
            &m.input_fetch_start_timestamp,
            &m.input_fetch_completed_timestamp,
        ),
        (
            "execution",
            &m.execution_start_timestamp,
            &m.execution_completed_timestamp,
        ),
        (
            "output upload",
            &m.output_upload_start_timestamp,
            &m.output_upload_completed_timestamp,
        ),
        (
            "on the worker",
            &m.worker_start_timestamp,
            &m.worker_completed_timestamp,
        ),
    ];
    let spans: Vec<(&str, i64, i64)> = phases
        .iter()
        .filter_map(|(n, s, e)| Some((*n, ts_ms(s)?, ts_ms(e)?)))
        .collect();
    let Some(t0) = spans.iter().map(|s| s.1).min() else {
        b.push_str("<p class=\"muted\">No timestamps.</p>");
        return;
    };
    let t1 = spans.iter().map(|s| s.2).max().unwrap_or(t0).max(t0 + 1);
    let total = (t1 - t0) as f64;
    b.push_str("<table><tr><th>Phase</th><th>Start</th><th>Length</th><th style=\"width:400px\">Timeline</th></tr>");
    for (name, s, e) in spans {
        let left = (s - t0) as f64 / total * 100.0;
        let width = ((e - s).max(0) as f64 / total * 100.0).max(0.5);
        let _ = write!(
            b,
            "<tr><td>{name}</td><td>+{} ms</td><td>{} ms</td><td><div style=\"margin-left:{left:.1}%;width:{width:.1}%;background:#4a7bb7;height:10px\"></div></td></tr>",
            s - t0,
            (e - s).max(0)
        );
    }
    b.push_str("</table>");
}

/// `/action/HASH-SIZE`.
// Bazel 4 sends the REAPI 2.0 fields (`output_files`, `output_directories`, the Command's
// `platform`), deprecated since; they are shown beside the new ones.
#[allow(deprecated)]
pub async fn action(State(ui): State<Arc<WebUi>>, Path(text): Path<String>) -> Response {
    let d = match parse_digest(&text) {
        Ok(d) => d,
        Err(r) => return *r,
    };
    let Some(cas) = &ui.cas else { return no_cas() };
    let f = d.function();
    let action: re::Action = match read_proto(cas, &d, "Action").await {
        Ok(a) => a,
        Err(r) => return *r,
    };
    let mut b = String::new();
    let command_digest = digest_of(&action.command_digest, f);
    let input_root = digest_of(&action.input_root_digest, f);
    let _ = write!(
        b,
        "<table><tr><th>Command</th><td>{}</td></tr><tr><th>Input root</th><td>{}</td></tr>\
         <tr><th>Timeout</th><td>{}</td></tr><tr><th>Cacheable</th><td>{}</td></tr></table>",
        command_digest.map(|c| link("blob", &c)).unwrap_or_default(),
        input_root.map(|c| link("tree", &c)).unwrap_or_default(),
        action
            .timeout
            .as_ref()
            .map(|t| format!("{} s", t.seconds))
            .unwrap_or_else(|| "none".into()),
        if action.do_not_cache { "no" } else { "yes" }
    );
    if let Some(cd) = command_digest {
        match read_proto::<re::Command>(cas, &cd, "Command").await {
            Ok(c) => {
                b.push_str("<h2>Arguments</h2><pre>");
                for a in &c.arguments {
                    let _ = writeln!(b, "{}", esc(a));
                }
                b.push_str("</pre><h2>Environment</h2><table>");
                for v in &c.environment_variables {
                    let _ = write!(
                        b,
                        "<tr><th><code>{}</code></th><td><code>{}</code></td></tr>",
                        esc(&v.name),
                        esc(&v.value)
                    );
                }
                let _ = write!(
                    b,
                    "</table><p>Working directory: <code>{}</code></p><h2>Platform</h2><table>",
                    esc(if c.working_directory.is_empty() {
                        "(the input root)"
                    } else {
                        &c.working_directory
                    })
                );
                let platform = action.platform.as_ref().or(c.platform.as_ref());
                for p in platform
                    .map(|p| p.properties.as_slice())
                    .unwrap_or_default()
                {
                    let _ = write!(
                        b,
                        "<tr><th>{}</th><td>{}</td></tr>",
                        esc(&p.name),
                        esc(&p.value)
                    );
                }
                b.push_str("</table>");
                let outputs: Vec<&String> = c
                    .output_paths
                    .iter()
                    .chain(&c.output_files)
                    .chain(&c.output_directories)
                    .collect();
                if !outputs.is_empty() {
                    b.push_str("<h2>Declared outputs</h2><pre>");
                    for o in outputs {
                        let _ = writeln!(b, "{}", esc(o));
                    }
                    b.push_str("</pre>");
                }
            }
            Err(_) => b.push_str("<p class=\"bad\">The Command is not in the CAS.</p>"),
        }
    }
    result_section(&ui, cas, &d, &mut b).await;
    scheduler_section(&ui, &d, &mut b).await;
    page(&format!("Action {}-{}", d.hash_hex(), d.size()), &b)
}

async fn result_section(ui: &WebUi, cas: &StoreRef, d: &Digest, b: &mut String) {
    b.push_str("<h2>Result</h2>");
    let cached = match &ui.ac {
        Some(ac) => match ac.get_all(d, MAX_PROTO_BYTES as usize).await {
            Ok(bytes) => match re::ActionResult::decode(bytes) {
                Ok(r) => Some(r),
                Err(e) => {
                    let _ = write!(
                        b,
                        "<p class=\"bad\">The action cache entry does not decode: {}</p>",
                        esc(&e.to_string())
                    );
                    None
                }
            },
            Err(e) if e.code == Code::NotFound => None,
            Err(e) => {
                let _ = write!(b, "<p class=\"bad\">{}</p>", esc(&e.message));
                None
            }
        },
        None => None,
    };
    if let Some(r) = cached {
        b.push_str("<p class=\"muted\">From the action cache.</p>");
        render_result(cas, d, &r, b).await;
        return;
    }
    // Not cached (failed, timed out, do_not_cache, or not run): what the scheduler saw.
    for p in &ui.schedulers {
        let Some(h) = p.local() else { continue };
        match h.last_outcome(*d).await {
            Ok(Some(Ok(resp))) => {
                let status = resp.status.as_ref().filter(|s| s.code != 0);
                let _ = write!(
                    b,
                    "<p class=\"muted\">Not in the action cache; the last execution scheduler {} still holds.</p>{}",
                    esc(&p.name),
                    status
                        .map(|s| format!(
                            "<p class=\"bad\">Status {}: {}</p>",
                            s.code,
                            esc(&s.message)
                        ))
                        .unwrap_or_default()
                );
                if let Some(r) = &resp.result {
                    render_result(cas, d, r, b).await;
                }
                return;
            }
            Ok(Some(Err(e))) => {
                let _ = write!(
                    b,
                    "<p class=\"bad\">The last execution (scheduler {}) failed: {:?}: {}</p>",
                    esc(&p.name),
                    e.code,
                    esc(&e.message)
                );
                return;
            }
            _ => {}
        }
    }
    if let Some(resp) = super::activity::get().and_then(|a| a.failed_result(d)) {
        let status = resp.status.as_ref().filter(|s| s.code != 0);
        let _ = write!(
            b,
            "<p class=\"muted\">Not in the action cache; the last failed execution this server recorded.</p>{}",
            status
                .map(|s| format!(
                    "<p class=\"bad\">Status {}: {}</p>",
                    s.code,
                    esc(&s.message)
                ))
                .unwrap_or_default()
        );
        if let Some(r) = &resp.result {
            render_result(cas, d, r, b).await;
        }
        return;
    }
    b.push_str("<p class=\"muted\">No result: not in the action cache (never run, failed, or not cacheable) and no scheduler holds a completed execution of it.</p>");
}

async fn render_result(cas: &StoreRef, d: &Digest, r: &re::ActionResult, b: &mut String) {
    let f = d.function();
    let _ = write!(
        b,
        "<p>Exit code: <span class=\"{}\">{}</span></p>",
        if r.exit_code == 0 { "ok" } else { "bad" },
        r.exit_code
    );
    stdio(
        cas,
        "stdout",
        &r.stdout_raw,
        digest_of(&r.stdout_digest, f),
        b,
    )
    .await;
    stdio(
        cas,
        "stderr",
        &r.stderr_raw,
        digest_of(&r.stderr_digest, f),
        b,
    )
    .await;
    if !r.output_files.is_empty() || !r.output_directories.is_empty() {
        b.push_str("<h2>Outputs</h2><table><tr><th>Path</th><th>Size</th><th></th></tr>");
        for o in &r.output_files {
            if let Some(od) = digest_of(&o.digest, f) {
                let name = o.path.rsplit('/').next().unwrap_or(&o.path);
                let _ = write!(
                    b,
                    "<tr><td><code>{}</code></td><td>{}</td><td>{}{}</td></tr>",
                    esc(&o.path),
                    html::bytes(od.size()),
                    blob_link(&od, name),
                    if o.is_executable { " (executable)" } else { "" }
                );
            }
        }
        for o in &r.output_directories {
            if let Some(td) = digest_of(&o.tree_digest, f) {
                let _ = write!(
                    b,
                    "<tr><td><code>{}/</code></td><td>{}</td><td>{} ({})</td></tr>",
                    esc(&o.path),
                    html::bytes(td.size()),
                    link("output-tree", &td),
                    blob_link(&td, "tree.pb")
                );
            }
        }
        b.push_str("</table>");
    }
    if let Some(m) = &r.execution_metadata {
        timeline(m, b);
    }
}

/// What the schedulers still hold about operations of this action.
async fn scheduler_section(ui: &WebUi, d: &Digest, b: &mut String) {
    let mut rows = Vec::new();
    for p in &ui.schedulers {
        let Some(h) = p.local() else { continue };
        if let Ok(ops) = h
            .operations(crate::execution::driver::OpFilter::Action(*d), 100)
            .await
        {
            rows.extend(ops.into_iter().map(|r| (p.name.clone(), r)));
        }
    }
    if rows.is_empty() {
        return;
    }
    b.push_str("<h2>Operations</h2><table><tr><th>Operation</th><th>Scheduler</th><th>Invocation</th><th>Stage</th><th>Result</th><th>Worker</th></tr>");
    for (s, r) in rows.iter().take(100) {
        let _ = write!(
            b,
            "<tr><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td><td>{}{}</td><td>{}</td></tr>",
            esc(&r.op_id),
            esc(s),
            html::invocation_link(&r.invocation_id),
            r.stage,
            r.result.unwrap_or(""),
            r.exit_code.map(|c| format!(" (exit {c})")).unwrap_or_default(),
            esc(r.worker.as_deref().unwrap_or(""))
        );
    }
    b.push_str("</table>");
}

/// `/tree/HASH-SIZE`: one Directory, its subdirectories linked.
pub async fn tree(State(ui): State<Arc<WebUi>>, Path(text): Path<String>) -> Response {
    let d = match parse_digest(&text) {
        Ok(d) => d,
        Err(r) => return *r,
    };
    let Some(cas) = &ui.cas else { return no_cas() };
    let dir: re::Directory = match read_proto(cas, &d, "Directory").await {
        Ok(x) => x,
        Err(r) => return *r,
    };
    page(
        &format!("Directory {}-{}", d.hash_hex(), d.size()),
        &render_directory(&dir, d.function()),
    )
}

/// One Directory as a table: subdirectories (linked to their `/tree` pages), files
/// (downloads) and symlinks.
pub fn render_directory(dir: &re::Directory, f: DigestFunction) -> String {
    let mut b = String::from("<table><tr><th>Name</th><th>Size</th><th>Digest</th></tr>");
    for sub in &dir.directories {
        if let Some(sd) = digest_of(&sub.digest, f) {
            let _ = write!(
                b,
                "<tr><td><a href=\"/tree/{}-{}\">{}/</a></td><td></td><td><code>{}</code></td></tr>",
                sd.hash_hex(),
                sd.size(),
                esc(&sub.name),
                sd.hash_hex()
            );
        }
    }
    for file in &dir.files {
        if let Some(fd) = digest_of(&file.digest, f) {
            let _ = write!(
                b,
                "<tr><td>{}{}</td><td>{}</td><td><code>{}</code></td></tr>",
                blob_link(&fd, &file.name),
                if file.is_executable { " *" } else { "" },
                html::bytes(fd.size()),
                fd.hash_hex()
            );
        }
    }
    for l in &dir.symlinks {
        let _ = write!(
            b,
            "<tr><td>{} → <code>{}</code></td><td></td><td></td></tr>",
            esc(&l.name),
            esc(&l.target)
        );
    }
    b.push_str("</table>");
    b
}

/// Entries listed on one `/output-tree` page.
const MAX_TREE_ENTRIES: usize = 10_000;
/// Nesting shown on one `/output-tree` page.
const MAX_TREE_DEPTH: usize = 64;

/// A `Tree` (an output directory) as nested lists: each directory's subdirectories (found
/// among the tree's children by digest), files (downloads) and symlinks; bounded in entries
/// and depth.
pub fn render_tree(tree: &re::Tree, f: DigestFunction) -> String {
    let children: std::collections::HashMap<Digest, &re::Directory> = tree
        .children
        .iter()
        .map(|c| (f.compute(&c.encode_to_vec()), c))
        .collect();
    let mut out = String::new();
    let mut entries = 0;
    fn walk(
        dir: &re::Directory,
        f: DigestFunction,
        children: &std::collections::HashMap<Digest, &re::Directory>,
        depth: usize,
        entries: &mut usize,
        out: &mut String,
    ) {
        out.push_str("<ul>");
        for sub in &dir.directories {
            *entries += 1;
            if *entries > MAX_TREE_ENTRIES {
                out.push_str("<li class=\"muted\">(more entries are not shown)</li>");
                break;
            }
            let _ = write!(out, "<li>{}/", esc(&sub.name));
            match digest_of(&sub.digest, f).and_then(|d| children.get(&d)) {
                Some(child) if depth < MAX_TREE_DEPTH => {
                    walk(child, f, children, depth + 1, entries, out)
                }
                Some(_) => out.push_str(" <span class=\"muted\">(deeper)</span>"),
                None => out.push_str(" <span class=\"bad\">(not in the tree)</span>"),
            }
            out.push_str("</li>");
        }
        for file in &dir.files {
            *entries += 1;
            if *entries > MAX_TREE_ENTRIES {
                break;
            }
            if let Some(fd) = digest_of(&file.digest, f) {
                let _ = write!(
                    out,
                    "<li>{}{} <span class=\"muted\">{}</span></li>",
                    blob_link(&fd, &file.name),
                    if file.is_executable { " *" } else { "" },
                    html::bytes(fd.size())
                );
            }
        }
        for l in &dir.symlinks {
            let _ = write!(
                out,
                "<li>{} → <code>{}</code></li>",
                esc(&l.name),
                esc(&l.target)
            );
        }
        out.push_str("</ul>");
    }
    match &tree.root {
        Some(root) => walk(root, f, &children, 0, &mut entries, &mut out),
        None => out.push_str("<p class=\"bad\">The tree has no root.</p>"),
    }
    out
}

/// `/output-tree/HASH-SIZE`: a `Tree` blob (an output directory), all of it on one page.
pub async fn output_tree(State(ui): State<Arc<WebUi>>, Path(text): Path<String>) -> Response {
    let d = match parse_digest(&text) {
        Ok(d) => d,
        Err(r) => return *r,
    };
    let Some(cas) = &ui.cas else { return no_cas() };
    let tree: re::Tree = match read_proto(cas, &d, "Tree").await {
        Ok(x) => x,
        Err(r) => return *r,
    };
    page(
        &format!("Output directory {}-{}", d.hash_hex(), d.size()),
        &render_tree(&tree, d.function()),
    )
}

/// Keeps a file name safe for a `Content-Disposition` header.
fn safe_name(name: &str) -> String {
    let s: String = name
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || "._-".contains(*c))
        .take(100)
        .collect();
    let s = s.trim_start_matches('.');
    if s.is_empty() {
        "blob".into()
    } else {
        s.to_string()
    }
}

/// `/blob/HASH-SIZE[?name=FILE][&view=text]`: the blob, streamed from the CAS.
pub async fn blob(
    State(ui): State<Arc<WebUi>>,
    Path(text): Path<String>,
    RawQuery(query): RawQuery,
) -> Response {
    let d = match parse_digest(&text) {
        Ok(d) => d,
        Err(r) => return *r,
    };
    let Some(cas) = &ui.cas else { return no_cas() };
    let mut name = format!("{}-{}", d.hash_hex(), d.size());
    let mut as_text = false;
    for (k, v) in html::form_pairs(query.as_deref().unwrap_or("")) {
        match k.as_str() {
            "name" => name = safe_name(&v),
            "view" => as_text = v == "text",
            _ => {}
        }
    }
    // The store must have it before a 200 goes out.
    match cas.has(&d).await {
        Ok(Some(_)) => {}
        Ok(None) => {
            return html::error(
                StatusCode::NOT_FOUND,
                &format!("blob {d} is not in the CAS"),
            )
        }
        Err(e) => return html::error(StatusCode::BAD_GATEWAY, &format!("blob {d}: {}", e.message)),
    }
    let stream = match cas.get(&d, 0, None).await {
        Ok(s) => s,
        Err(e) => {
            let status = if e.code == Code::NotFound {
                StatusCode::NOT_FOUND
            } else {
                StatusCode::BAD_GATEWAY
            };
            return html::error(status, &format!("blob {d}: {}", e.message));
        }
    };
    let mut r = Body::from_stream(stream).into_response();
    let h = r.headers_mut();
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'none'; sandbox"),
    );
    if let Ok(len) = HeaderValue::from_str(&d.size().to_string()) {
        h.insert(header::CONTENT_LENGTH, len);
    }
    if as_text {
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
    } else {
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{name}\"")) {
            h.insert(header::CONTENT_DISPOSITION, v);
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_in_urls() {
        let h = "a".repeat(64);
        assert_eq!(parse_digest(&format!("{h}-12")).unwrap().size(), 12);
        for bad in [
            String::new(),
            "nodash".into(),
            format!("{h}-x"),
            format!("{h}--1"),
            format!("{}-1", "g".repeat(64)),
            format!("{}-1", "A".repeat(64)),
            format!("{}-1", "a".repeat(63)),
            "a".repeat(10_000),
        ] {
            assert_eq!(
                parse_digest(&bad).unwrap_err().status(),
                StatusCode::BAD_REQUEST,
                "{bad:?}"
            );
        }
        assert_eq!(safe_name("../etc/pa\"ss wd"), "etcpasswd");
        assert_eq!(safe_name("..."), "blob");
    }

    #[test]
    fn trees_render_nested_and_escaped() {
        let f = DigestFunction::Sha256;
        let file = |name: &str| re::FileNode {
            name: name.into(),
            digest: Some(f.compute(b"x").to_proto()),
            ..Default::default()
        };
        let leaf = re::Directory {
            files: vec![file("<deep>.txt")],
            ..Default::default()
        };
        let tree = re::Tree {
            root: Some(re::Directory {
                files: vec![file("top.txt")],
                directories: vec![
                    re::DirectoryNode {
                        name: "sub".into(),
                        digest: Some(f.compute(&leaf.encode_to_vec()).to_proto()),
                    },
                    re::DirectoryNode {
                        name: "gone".into(),
                        digest: Some(f.compute(b"nothing").to_proto()),
                    },
                ],
                ..Default::default()
            }),
            children: vec![leaf],
        };
        let html = render_tree(&tree, f);
        assert!(html.contains("sub/<ul>"), "{html}");
        assert!(html.contains("&lt;deep&gt;.txt"), "{html}");
        assert!(html.contains("top.txt"), "{html}");
        assert!(
            html.contains("gone/ <span class=\"bad\">(not in the tree)"),
            "{html}"
        );
        assert!(!html.contains("<deep>"), "{html}");
    }
}
