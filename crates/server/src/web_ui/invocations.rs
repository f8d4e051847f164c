//! `/invocations` and `/invocation/ID`: Bazel invocations from their Build Event Protocol
//! events. The list comes from the [`InvocationIndex`](super::InvocationIndex); a page reads
//! the invocation's events from the BEP store (at most [`MAX_EVENTS`], each at most
//! [`MAX_EVENT_BYTES`]) and shows its command line, status, timing, targets, tests with
//! their logs, console output and the remote actions the schedulers ran for it.

use std::fmt::Write;
use std::sync::Arc;

use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::Response;
use cairn_core::DigestFunction;
use cairn_proto::bes::v1 as bes;
use cairn_store::StoreExt;
use futures::StreamExt;
use prost::Message;

use super::activity::{self, Execution};
use super::events::{self, bytestream_digest};
use super::html::{self, esc, page, url};
use super::index::{Status, Summary, MAX_ID_BYTES};
use super::WebUi;
use crate::execution::driver::{unix_ms_now, OpFilter, OpRow};

/// Events read for one page.
pub const MAX_EVENTS: i64 = 100_000;
/// Largest event read.
pub const MAX_EVENT_BYTES: usize = 4 << 20;
/// Console output shown (the end is kept: that is where failures are).
const MAX_CONSOLE_BYTES: usize = 1 << 20;
/// A test log shown inline (its start); the whole log is a download.
const MAX_LOG_BYTES: usize = 64 << 10;
/// Rows of the list page.
const LIST_ROWS: usize = 200;
/// Targets, tests and actions listed on one page.
const MAX_ROWS: usize = 5000;
/// Events read at once.
const READ_CONCURRENCY: usize = 32;

fn status_html(s: &Status) -> String {
    match s {
        Status::Running => "<span class=\"run\">running</span>".into(),
        Status::Succeeded => "<span class=\"ok\">succeeded</span>".into(),
        Status::Failed(name, code) => {
            format!("<span class=\"bad\">failed: {} ({code})</span>", esc(name))
        }
    }
}

fn duration_html(s: &Summary, now_ms: i64) -> String {
    let end = s.finish_ms.unwrap_or(now_ms);
    let d = std::time::Duration::from_millis(end.saturating_sub(s.start_ms).max(0) as u64);
    if s.finish_ms.is_some() {
        html::duration(d)
    } else {
        format!("{} so far", html::duration(d))
    }
}

/// `/invocations?status=&q=`.
pub async fn list(State(ui): State<Arc<WebUi>>, RawQuery(query): RawQuery) -> Response {
    let Some((_, index)) = &ui.bep else {
        return html::error(
            StatusCode::NOT_FOUND,
            "no invocations: services.web_ui.bep_store is not set",
        );
    };
    let mut status = None;
    let mut text = String::new();
    for (k, v) in html::form_pairs(query.as_deref().unwrap_or("")) {
        match k.as_str() {
            "status" if ["running", "succeeded", "failed"].contains(&v.as_str()) => {
                status = Some(v)
            }
            "q" => text = v.chars().take(256).collect(),
            _ => {}
        }
    }
    let now = unix_ms_now();
    let (rows, matched) = index.list(status.as_deref(), &text, LIST_ROWS, now);
    let mut b = String::new();
    let _ = write!(
        b,
        "<form method=\"get\" action=\"/invocations\">Status <select name=\"status\">\
         <option value=\"\">any</option>"
    );
    for s in ["running", "succeeded", "failed"] {
        let sel = if status.as_deref() == Some(s) {
            " selected"
        } else {
            ""
        };
        let _ = write!(b, "<option value=\"{s}\"{sel}>{s}</option>");
    }
    let _ = write!(
        b,
        "</select> Text <input name=\"q\" value=\"{}\" size=\"40\"> <button>Filter</button></form>\
         <p class=\"muted\">{matched} of {} invocations match{}.</p>",
        esc(&text),
        index.len(),
        if matched > rows.len() {
            format!("; the newest {} are shown", rows.len())
        } else {
            String::new()
        }
    );
    b.push_str("<table><tr><th>Started</th><th>Invocation</th><th>Command</th><th>Status</th><th>Duration</th><th>Targets</th><th>Remote actions</th></tr>");
    let record = activity::get();
    for s in &rows {
        let remote = record
            .and_then(|a| a.counts(&s.invocation_id))
            .map(|c| {
                format!(
                    "{}: {} hits, {} misses{}",
                    c.actions,
                    c.cache_hits,
                    c.cache_misses,
                    if c.failed > 0 {
                        format!(", <span class=\"bad\">{} failed</span>", c.failed)
                    } else {
                        String::new()
                    }
                )
            })
            .unwrap_or_default();
        let _ = write!(
            b,
            "<tr><td>{}</td><td><a href=\"/invocation/{}\"><code>{}</code></a></td><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}{}</td><td>{remote}</td></tr>",
            html::utc(s.start_ms),
            url(&s.invocation_id),
            esc(&s.invocation_id),
            esc(&command_text(s, 160)),
            status_html(&s.status),
            duration_html(s, now),
            s.targets,
            if s.failed_targets > 0 {
                format!(" (<span class=\"bad\">{} failed</span>)", s.failed_targets)
            } else {
                String::new()
            }
        );
    }
    b.push_str("</table>");
    page("Invocations", &b)
}

/// The command line as typed, more or less: without what Bazel's client adds; capped.
fn command_text(s: &Summary, max: usize) -> String {
    cap_text(
        if s.args.is_empty() {
            s.command.clone()
        } else {
            s.args.join(" ")
        },
        max,
    )
}

fn cap_text(mut out: String, max: usize) -> String {
    if out.len() > max {
        let mut end = max;
        while !out.is_char_boundary(end) {
            end -= 1;
        }
        out.truncate(end);
        out.push('…');
    }
    out
}

struct TestRow {
    label: String,
    run: i32,
    shard: i32,
    attempt: i32,
    status: &'static str,
    duration_ms: i64,
    cached_locally: bool,
    outputs: Vec<events::File>,
}

/// What the events of one invocation say, beyond its summary.
#[derive(Default)]
struct Details {
    targets: Vec<(String, bool)>,
    tests: Vec<TestRow>,
    /// Failed or reported actions: label, mnemonic, exit code, stderr file.
    actions: Vec<(String, String, i32, bool, Option<events::File>)>,
    console: String,
    console_dropped: usize,
    /// The whole command line, from its event (capped).
    command_line: String,
    events_read: i64,
    events_missing: i64,
}

impl Details {
    fn take(&mut self, e: events::BuildEvent) {
        if let Some(p) = e.progress {
            for part in [p.stderr, p.stdout] {
                self.console.push_str(&part);
            }
            if self.console.len() > MAX_CONSOLE_BYTES {
                let mut cut = self.console.len() - MAX_CONSOLE_BYTES;
                while !self.console.is_char_boundary(cut) {
                    cut += 1;
                }
                self.console_dropped += cut;
                self.console.drain(..cut);
            }
        }
        if let Some(cl) = e.unstructured_command_line {
            self.command_line = cap_text(cl.args.join(" "), MAX_CONSOLE_BYTES);
        }
        let id = e.id.unwrap_or_default();
        if let (Some(c), Some(t)) = (e.completed, id.target_completed) {
            if self.targets.len() < MAX_ROWS {
                self.targets.push((t.label, c.success));
            }
        }
        if let (Some(r), Some(t)) = (e.test_result, id.test_result) {
            if self.tests.len() < MAX_ROWS {
                self.tests.push(TestRow {
                    label: t.label,
                    run: t.run,
                    shard: t.shard,
                    attempt: t.attempt,
                    status: events::test_status(r.status),
                    duration_ms: r.test_attempt_duration_millis,
                    cached_locally: r.cached_locally,
                    outputs: r.test_action_output,
                });
            }
        }
        if let Some(a) = e.action {
            if self.actions.len() < MAX_ROWS {
                let label = id
                    .action_completed
                    .map(|i| {
                        if i.label.is_empty() {
                            a.label.clone()
                        } else {
                            i.label
                        }
                    })
                    .unwrap_or_else(|| a.label.clone());
                self.actions
                    .push((label, a.r#type, a.exit_code, a.success, a.stderr));
            }
        }
    }
}

/// Reads and decodes an invocation's events.
async fn read_details(store: &cairn_store::StoreRef, s: &Summary) -> Details {
    let stream = bes::StreamId {
        build_id: s.build_id.clone(),
        invocation_id: s.invocation_id.clone(),
        component: bes::stream_id::BuildComponent::Tool as i32,
    };
    let mut d = Details::default();
    // The stream's own record of its length, which a summary read back after a restart may
    // be behind.
    let stored_last = match store
        .get_all(&crate::bep::event_key(&stream, None), 16)
        .await
    {
        Ok(b) if b.len() == 8 => i64::from_le_bytes(b[..8].try_into().unwrap_or_default()),
        _ => 0,
    };
    let last = s.last_seq.max(stored_last).clamp(0, MAX_EVENTS);
    let mut reads = futures::stream::iter(1..=last)
        .map(|seq| {
            let key = crate::bep::event_key(&stream, Some(seq));
            async move { store.get_all(&key, MAX_EVENT_BYTES).await }
        })
        .buffered(READ_CONCURRENCY);
    while let Some(r) = reads.next().await {
        let Ok(bytes) = r else {
            d.events_missing += 1;
            continue;
        };
        d.events_read += 1;
        let Ok(ordered) = bes::OrderedBuildEvent::decode(bytes) else {
            continue;
        };
        if let Some(e) = events::bazel_event(&ordered.event) {
            d.take(e);
        }
    }
    d
}

/// Drops terminal escape sequences (`ESC [ ... letter`) from console text.
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        if c == '\r' {
            continue;
        }
        out.push(c);
    }
    out
}

/// A link to a file Bazel reported: its CAS page when it names a CAS blob.
fn file_link(f: &events::File) -> String {
    match bytestream_digest(&f.uri) {
        Some((hash, size)) => format!(
            "<a href=\"/blob/{}-{size}?name={}\">{}</a>",
            url(&hash),
            url(&f.name),
            esc(&f.name)
        ),
        None => format!(
            "{} <span class=\"muted\">{}</span>",
            esc(&f.name),
            esc(&f.uri)
        ),
    }
}

/// The start of a CAS blob named by a `bytestream://` URI, when the CAS has it.
async fn read_log(ui: &WebUi, uri: &str) -> Option<(String, bool)> {
    let (hash, size) = bytestream_digest(uri)?;
    let cas = ui.cas.as_ref()?;
    let function = DigestFunction::from_request(0, hash.len()).ok()?;
    let digest = cairn_core::Digest::parse(function, &hash, i64::try_from(size).ok()?).ok()?;
    let len = (size as usize).min(MAX_LOG_BYTES);
    let mut body = cas.get(&digest, 0, Some(len as u64)).await.ok()?;
    let mut buf = Vec::with_capacity(len);
    while let Some(chunk) = body.next().await {
        buf.extend_from_slice(&chunk.ok()?);
        if buf.len() >= len {
            break;
        }
    }
    buf.truncate(len);
    Some((
        String::from_utf8_lossy(&buf).into_owned(),
        size as usize > len,
    ))
}

/// `/invocation/ID`.
pub async fn show(State(ui): State<Arc<WebUi>>, Path(id): Path<String>) -> Response {
    let Some((store, index)) = &ui.bep else {
        return html::error(
            StatusCode::NOT_FOUND,
            "no invocations: services.web_ui.bep_store is not set",
        );
    };
    if id.len() > MAX_ID_BYTES {
        return html::error(
            StatusCode::BAD_REQUEST,
            &format!(
                "an invocation id of {} bytes is longer than any stored ({MAX_ID_BYTES} at most)",
                id.len()
            ),
        );
    }
    let now = unix_ms_now();
    let Some(s) = index.get(&id, now) else {
        return html::error(
            StatusCode::NOT_FOUND,
            &format!(
                "no invocation {id:?}: it never sent build events here, or it is older than the retention (services.web_ui.max_invocations, max_invocation_age_s)"
            ),
        );
    };
    let d = read_details(store, &s).await;
    let mut b = String::new();
    let _ = write!(
        b,
        "<table><tr><th>Status</th><td>{}</td></tr><tr><th>Command</th><td><code>{}</code>\
         <details><summary>Whole command line</summary><code>{}</code></details></td></tr>\
         <tr><th>Started</th><td>{}</td></tr><tr><th>Duration</th><td>{}</td></tr>\
         <tr><th>Build id</th><td><code>{}</code></td></tr><tr><th>Events</th><td>{}{}</td></tr></table>",
        status_html(&s.status),
        esc(&command_text(&s, 4096)),
        esc(&d.command_line),
        html::utc(s.start_ms),
        duration_html(&s, now),
        esc(&s.build_id),
        d.events_read,
        if d.events_missing > 0 {
            format!(" ({} no longer stored)", d.events_missing)
        } else {
            String::new()
        }
    );

    let failed = d.targets.iter().filter(|t| !t.1).count();
    let _ = write!(
        b,
        "<h2>Targets ({}, {failed} failed)</h2><table><tr><th>Target</th><th>Outcome</th></tr>",
        d.targets.len()
    );
    for (label, ok) in &d.targets {
        let _ = write!(
            b,
            "<tr><td><code>{}</code></td><td>{}</td></tr>",
            esc(label),
            if *ok {
                "<span class=\"ok\">built</span>"
            } else {
                "<span class=\"bad\">failed</span>"
            }
        );
    }
    b.push_str("</table>");

    if !d.tests.is_empty() {
        let _ = write!(b, "<h2>Tests ({})</h2>", d.tests.len());
        for t in &d.tests {
            let class = if t.status == "PASSED" { "ok" } else { "bad" };
            let _ = write!(
                b,
                "<p><code>{}</code> <span class=\"{class}\">{}</span> in {} ms{} \
                 <span class=\"muted\">(run {}, shard {}, attempt {})</span></p>",
                esc(&t.label),
                t.status,
                t.duration_ms,
                if t.cached_locally { ", cached" } else { "" },
                t.run,
                t.shard,
                t.attempt
            );
            let files: Vec<String> = t.outputs.iter().map(file_link).collect();
            if !files.is_empty() {
                let _ = write!(b, "<p>Outputs: {}</p>", files.join(", "));
            }
            if let Some(log) = t.outputs.iter().find(|f| f.name == "test.log") {
                match read_log(&ui, &log.uri).await {
                    Some((text, cut)) => {
                        let _ = write!(
                            b,
                            "<pre>{}{}</pre>",
                            esc(&text),
                            if cut {
                                "\n… (cut; the whole log is the download above)"
                            } else {
                                ""
                            }
                        );
                    }
                    None => b.push_str(
                        "<p class=\"muted\">The log is not in the CAS this UI reads.</p>",
                    ),
                }
            }
        }
    }

    if !d.actions.is_empty() {
        let _ = write!(
            b,
            "<h2>Reported actions ({})</h2><table><tr><th>Target</th><th>Mnemonic</th><th>Exit</th><th>stderr</th></tr>",
            d.actions.len()
        );
        for (label, kind, code, ok, stderr) in &d.actions {
            let _ = write!(
                b,
                "<tr><td><code>{}</code></td><td>{}</td><td class=\"{}\">{code}</td><td>{}</td></tr>",
                esc(label),
                esc(kind),
                if *ok { "ok" } else { "bad" },
                stderr.as_ref().map(file_link).unwrap_or_default()
            );
        }
        b.push_str("</table>");
    }

    remote_actions(&ui, &id, &mut b).await;

    let _ = write!(
        b,
        "<h2>Console output</h2>{}<pre>{}</pre>",
        if d.console_dropped > 0 {
            format!(
                "<p class=\"muted\">The first {} bytes are not shown.</p>",
                d.console_dropped
            )
        } else {
            String::new()
        },
        esc(&strip_ansi(&d.console))
    );
    page(&format!("Invocation {id}"), &b)
}

/// The invocation's remote actions: what this process recorded of its GetActionResult and
/// Execute calls ([`activity`]: cache hits and misses, how executions ended, kept after the
/// scheduler forgets them), with the live stage of what is still queued or running, and any
/// other operation the schedulers hold for it.
async fn remote_actions(ui: &WebUi, id: &str, b: &mut String) {
    let recorded = activity::get().and_then(|a| a.snapshot(id, MAX_ROWS));
    // Only this invocation's operations, from each scheduler.
    let mut live: Vec<(String, OpRow)> = Vec::new();
    for p in &ui.schedulers {
        let Some(h) = p.local() else { continue };
        if let Ok(rows) = h
            .operations(OpFilter::Invocation(id.to_string()), MAX_ROWS)
            .await
        {
            live.extend(rows.into_iter().map(|r| (p.name.clone(), r)));
        }
    }
    let rec = recorded.unwrap_or_default();
    if rec.actions == 0 && live.is_empty() {
        b.push_str("<h2>Remote actions</h2><p class=\"muted\">No remote cache lookup or execution of this invocation reached this server.</p>");
        return;
    }
    let _ = write!(
        b,
        "<h2>Remote actions ({}: {} cache hits, {} cache misses{})</h2>",
        rec.actions,
        rec.cache_hits,
        rec.cache_misses,
        if rec.failed > 0 {
            format!(", <span class=\"bad\">{} failed</span>", rec.failed)
        } else {
            String::new()
        }
    );
    if rec.not_listed > 0 {
        let _ = write!(
            b,
            "<p class=\"muted\">{} more actions were counted but not recorded.</p>",
            rec.not_listed
        );
    }
    b.push_str("<table><tr><th>Action</th><th>Cache</th><th>Execution</th><th>Exit</th><th>Worker</th></tr>");
    let mut shown_ops = std::collections::HashSet::new();
    for r in &rec.rows {
        let cache = match (r.lookup, &r.execution) {
            (_, Some(Execution::CacheHit)) | (Some(true), None) => "<span class=\"ok\">hit</span>",
            (Some(_), _) | (None, Some(_)) => "miss",
            (None, None) => "",
        };
        let (execution, exit, worker) = match &r.execution {
            None => (String::new(), String::new(), String::new()),
            Some(Execution::CacheHit) => {
                ("from the cache".to_string(), String::new(), String::new())
            }
            Some(Execution::Queued { op_id }) => {
                shown_ops.insert(op_id.as_str());
                match live.iter().find(|(_, o)| &o.op_id == op_id) {
                    Some((_, o)) => (
                        o.result.map_or_else(|| o.stage.to_string(), str::to_string),
                        o.exit_code.map(|c| c.to_string()).unwrap_or_default(),
                        o.worker.clone().unwrap_or_default(),
                    ),
                    // Not in this process's scheduler: it runs on another one (a `grpc` or
                    // shared scheduler) or was forgotten by a restart; either way all that is
                    // known is that it had not ended when last seen.
                    None => (
                        "<span class=\"muted\">queued or running when last seen</span>".to_string(),
                        String::new(),
                        String::new(),
                    ),
                }
            }
            Some(Execution::Done {
                op_id,
                result,
                exit_code,
                worker,
                message,
            }) => {
                shown_ops.insert(op_id.as_str());
                (
                    format!(
                        "<span class=\"{}\">{result}</span>{}",
                        if *result == "success" { "ok" } else { "bad" },
                        if message.is_empty() {
                            String::new()
                        } else {
                            format!(": {}", esc(message))
                        }
                    ),
                    exit_code.map(|c| c.to_string()).unwrap_or_default(),
                    worker.clone(),
                )
            }
        };
        let _ = write!(
            b,
            "<tr><td><a href=\"/action/{h}-{s}\"><code>{h}-{s}</code></a></td><td>{cache}</td><td>{execution}</td><td>{exit}</td><td>{}</td></tr>",
            esc(&worker),
            h = r.digest.hash_hex(),
            s = r.digest.size(),
        );
    }
    // Operations the schedulers hold that were not recorded here (sent before a restart of
    // this process's web UI, or through another listener's record).
    for (sched, r) in live
        .iter()
        .filter(|(_, r)| !shown_ops.contains(r.op_id.as_str()))
        .take(MAX_ROWS)
    {
        let _ = write!(
            b,
            "<tr><td><a href=\"/action/{h}-{s}\"><code>{h}-{s}</code></a></td><td></td><td>{} <span class=\"muted\">(scheduler {})</span></td><td>{}</td><td>{}</td></tr>",
            r.result.unwrap_or(r.stage),
            esc(sched),
            r.exit_code.map(|c| c.to_string()).unwrap_or_default(),
            esc(r.worker.as_deref().unwrap_or("")),
            h = r.digest.hash_hex(),
            s = r.digest.size(),
        );
    }
    b.push_str("</table>");
}
