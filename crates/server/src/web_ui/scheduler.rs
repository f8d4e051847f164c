//! `/queue` (queued and executing operations by platform and by invocation, with ages, and
//! the platforms no connected worker can run with the property that blocks them) and
//! `/workers` (each worker's properties, slots, running operations and last keepalive), from
//! a read-only copy of each configured scheduler ([`SchedulerHandle::overview`]).
//! `POST /workers/drain` drains or undrains a worker through the same scheduler command as the
//! admin API, and only when `services.web_ui.read_only` is false.
//!
//! [`SchedulerHandle::overview`]: crate::execution::SchedulerHandle::overview

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};

use super::html::{self, esc, invocation_link, page};
use super::WebUi;
use crate::execution::driver::{Overview, WorkerRow};

/// Operations listed per platform; the rest are counted.
const ROWS_PER_PLATFORM: usize = 100;
/// Invocations listed in the by-invocation table.
const INVOCATION_ROWS: usize = 100;

/// Each scheduler's name, its overview, and (shared state) the cluster box.
async fn overviews(ui: &WebUi) -> Vec<(String, Result<Overview, String>, String)> {
    let mut out = Vec::new();
    for p in &ui.schedulers {
        let o = match p.local() {
            Some(h) => h.overview().await.map_err(|e| e.message),
            None => {
                Err("a grpc scheduler: its queue and workers are shown where it forwards to".into())
            }
        };
        let cluster = match p.shared() {
            Some(shared) => cluster_box(shared).await,
            None => String::new(),
        };
        out.push((p.name.clone(), o, cluster));
    }
    out
}

/// For a scheduler whose state is shared in Redis: whose workers and operations the page
/// shows (this replica's), and the whole cluster's counts and replicas from Redis.
async fn cluster_box(shared: &crate::execution::shared::SharedScheduler) -> String {
    let me = shared.replica_id();
    let mut b = format!(
        "<p>Shared state in Redis: the tables below are replica <code>{}</code>'s own workers \
         and the operations they run.</p>",
        esc(me)
    );
    match shared.cluster().await {
        Ok(view) => {
            let workers: u64 = view.replicas.iter().map(|(_, r)| r.workers).sum();
            let _ = write!(
                b,
                "<p>Whole cluster: {} queued, {} executing, {workers} workers on {} replicas.</p>\
                 <table><tr><th>Replica</th><th>Workers</th><th>Slots</th><th>Busy</th><th>Claims</th></tr>",
                view.queued,
                view.executing,
                view.replicas.len()
            );
            for (id, r) in &view.replicas {
                let this = if id == me { " (this replica)" } else { "" };
                let _ = write!(
                    b,
                    "<tr><td><code>{}</code>{this}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                    esc(id),
                    r.workers,
                    r.slots,
                    r.busy,
                    r.claims
                );
            }
            b.push_str("</table>");
        }
        Err(e) => {
            let _ = write!(b, "<p class=\"bad\">{}</p>", esc(&e.message));
        }
    }
    b
}

fn platform_key(p: &[(String, String)]) -> String {
    let mut v: Vec<String> = p.iter().map(|(k, v)| format!("{k}={v}")).collect();
    v.sort();
    if v.is_empty() {
        "(no properties)".into()
    } else {
        v.join(", ")
    }
}

/// Whether a worker offers one property: the same value, or, for numbers, at least as much.
fn offers(w: &WorkerRow, name: &str, value: &str) -> bool {
    w.properties.iter().any(|(n, v)| {
        n == name
            && (v == value
                || matches!((v.parse::<u64>(), value.parse::<u64>()), (Ok(have), Ok(need)) if have >= need))
    })
}

/// Why no connected worker can run an action with `platform`, or `None` when one can.
fn blocked_by(platform: &[(String, String)], workers: &[WorkerRow]) -> Option<String> {
    if workers
        .iter()
        .any(|w| platform.iter().all(|(n, v)| offers(w, n, v)))
    {
        return None;
    }
    if workers.is_empty() {
        return Some("no worker is connected".into());
    }
    for (n, v) in platform {
        if !workers.iter().any(|w| offers(w, n, v)) {
            return Some(format!("no connected worker offers {n}={v}"));
        }
    }
    Some("no single connected worker offers all of these properties".into())
}

fn age(d: Option<Duration>) -> String {
    d.map(html::duration).unwrap_or_default()
}

/// `/queue`.
pub async fn queue(State(ui): State<Arc<WebUi>>) -> Response {
    if ui.schedulers.is_empty() {
        return page(
            "Queue",
            "<p class=\"muted\">services.web_ui.schedulers names no scheduler.</p>",
        );
    }
    let mut b = String::new();
    for (name, o, cluster) in overviews(&ui).await {
        let _ = write!(b, "<h2>Scheduler {}</h2>{cluster}", esc(&name));
        let o = match o {
            Ok(o) => o,
            Err(e) => {
                let _ = write!(b, "<p class=\"bad\">{}</p>", esc(&e));
                continue;
            }
        };
        let live: Vec<_> = o
            .operations
            .iter()
            .filter(|r| r.stage != "completed")
            .collect();
        let queued = live.iter().filter(|r| r.stage == "queued").count();
        let _ = write!(
            b,
            "<p>{queued} queued, {} executing, {} workers.</p>",
            live.len() - queued,
            o.workers.len()
        );
        // By platform.
        let mut by_platform: BTreeMap<String, Vec<_>> = BTreeMap::new();
        for r in &live {
            by_platform
                .entry(platform_key(&r.platform))
                .or_default()
                .push(*r);
        }
        for (platform, mut rows) in by_platform {
            rows.sort_by_key(|r| std::cmp::Reverse(r.queued_for));
            let q = rows.iter().filter(|r| r.stage == "queued").count();
            let blocked = rows
                .iter()
                .find(|r| r.stage == "queued")
                .and_then(|r| blocked_by(&r.platform, &o.workers));
            let _ = write!(
                b,
                "<h3>Platform <code>{}</code>: {q} queued, {} executing</h3>{}",
                esc(&platform),
                rows.len() - q,
                blocked
                    .map(|why| format!(
                        "<p class=\"bad\">No worker can run these actions: {}.</p>",
                        esc(&why)
                    ))
                    .unwrap_or_default()
            );
            b.push_str("<table><tr><th>Action</th><th>Stage</th><th>Queued for</th><th>Running for</th><th>Worker</th><th>Invocation</th><th>Priority</th><th>Retries</th></tr>");
            for r in rows.iter().take(ROWS_PER_PLATFORM) {
                let _ = write!(
                    b,
                    "<tr><td><a href=\"/action/{h}-{s}\"><code>{h8}…-{s}</code></a></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                    r.stage,
                    age(r.queued_for),
                    age(r.executing_for),
                    esc(r.worker.as_deref().unwrap_or("")),
                    invocation_link(&r.invocation_id),
                    r.priority,
                    r.retries,
                    h = r.digest.hash_hex(),
                    h8 = &r.digest.hash_hex()[..12],
                    s = r.digest.size(),
                );
            }
            b.push_str("</table>");
            if rows.len() > ROWS_PER_PLATFORM {
                let _ = write!(
                    b,
                    "<p class=\"muted\">and {} more (the longest queued are shown).</p>",
                    rows.len() - ROWS_PER_PLATFORM
                );
            }
        }
        // By invocation.
        let mut by_inv: HashMap<&str, (usize, usize, Option<Duration>)> = HashMap::new();
        for r in &live {
            let e = by_inv.entry(r.invocation_id.as_str()).or_default();
            if r.stage == "queued" {
                e.0 += 1;
            } else {
                e.1 += 1;
            }
            e.2 = e.2.max(r.queued_for);
        }
        if !by_inv.is_empty() {
            let mut inv: Vec<_> = by_inv.into_iter().collect();
            inv.sort_by_key(|(_, (q, x, _))| std::cmp::Reverse(q + x));
            b.push_str("<h3>By invocation</h3><table><tr><th>Invocation</th><th>Queued</th><th>Executing</th><th>Oldest</th></tr>");
            for (id, (q, x, oldest)) in inv.iter().take(INVOCATION_ROWS) {
                let _ = write!(
                    b,
                    "<tr><td>{}</td><td>{q}</td><td>{x}</td><td>{}</td></tr>",
                    invocation_link(id),
                    age(*oldest)
                );
            }
            b.push_str("</table>");
        }
    }
    page("Queue", &b)
}

/// `/workers`.
pub async fn workers(State(ui): State<Arc<WebUi>>) -> Response {
    if ui.schedulers.is_empty() {
        return page(
            "Workers",
            "<p class=\"muted\">services.web_ui.schedulers names no scheduler.</p>",
        );
    }
    let mut b = String::new();
    for (name, o, cluster) in overviews(&ui).await {
        let _ = write!(b, "<h2>Scheduler {}</h2>{cluster}", esc(&name));
        let mut o = match o {
            Ok(o) => o,
            Err(e) => {
                let _ = write!(b, "<p class=\"bad\">{}</p>", esc(&e));
                continue;
            }
        };
        if o.workers.is_empty() {
            b.push_str("<p class=\"muted\">No worker is connected.</p>");
            continue;
        }
        let digests: HashMap<&str, &cairn_core::Digest> = o
            .operations
            .iter()
            .filter(|r| r.stage == "executing")
            .map(|r| (r.op_id.as_str(), &r.digest))
            .collect();
        o.workers.sort_by(|a, b| a.worker_id.cmp(&b.worker_id));
        b.push_str("<table><tr><th>Worker</th><th>Properties</th><th>Slots</th><th>Running</th><th>Connected for</th><th>Last keepalive</th><th>State</th></tr>");
        for w in &o.workers {
            let running: Vec<String> = w
                .running
                .iter()
                .take(50)
                .filter_map(|op| digests.get(op.as_str()))
                .map(|d| {
                    format!(
                        "<a href=\"/action/{h}-{s}\"><code>{}…</code></a>",
                        &d.hash_hex()[..12],
                        h = d.hash_hex(),
                        s = d.size()
                    )
                })
                .collect();
            let mut props: Vec<String> = w
                .properties
                .iter()
                .map(|(k, v)| format!("{}={}", esc(k), esc(v)))
                .collect();
            props.sort();
            let state = if w.draining { "draining" } else { "serving" };
            let button = if ui.read_only {
                String::new()
            } else {
                format!(
                    " <form class=\"inline\" method=\"post\" action=\"/workers/drain\">\
                     <input type=\"hidden\" name=\"scheduler\" value=\"{}\">\
                     <input type=\"hidden\" name=\"worker\" value=\"{}\">\
                     <input type=\"hidden\" name=\"draining\" value=\"{}\"><button>{}</button></form>",
                    esc(&name),
                    esc(&w.worker_id),
                    if w.draining { 0 } else { 1 },
                    if w.draining { "Undrain" } else { "Drain" }
                )
            };
            let _ = write!(
                b,
                "<tr><td><code>{}</code></td><td>{}</td><td>{}/{} busy</td><td>{}</td><td>{}</td><td>{} ago</td><td>{state}{button}</td></tr>",
                esc(&w.worker_id),
                props.join("<br>"),
                w.busy_slots,
                w.total_slots,
                running.join(" "),
                html::duration(w.connected_for),
                html::duration(w.last_keepalive_ago),
            );
        }
        b.push_str("</table>");
    }
    page("Workers", &b)
}

/// `POST /workers/drain` with the form `scheduler`, `worker`, `draining` (1 or 0).
pub async fn drain(State(ui): State<Arc<WebUi>>, headers: HeaderMap, body: Bytes) -> Response {
    if ui.read_only {
        return html::error(
            StatusCode::FORBIDDEN,
            "the web UI is read-only (services.web_ui.read_only); drain through the admin API or turn read_only off",
        );
    }
    // A form posted from another site is refused (browsers say so in Sec-Fetch-Site).
    if headers
        .get("sec-fetch-site")
        .is_some_and(|v| v.as_bytes() == b"cross-site")
    {
        return html::error(
            StatusCode::FORBIDDEN,
            "a drain request from another site is refused",
        );
    }
    let text = String::from_utf8_lossy(&body[..body.len().min(4096)]).into_owned();
    let mut scheduler = String::new();
    let mut worker = String::new();
    let mut draining = None;
    for (k, v) in html::form_pairs(&text) {
        match k.as_str() {
            "scheduler" => scheduler = v,
            "worker" => worker = v,
            "draining" => draining = Some(v),
            _ => {}
        }
    }
    let draining = match draining.as_deref() {
        Some("1") => true,
        Some("0") => false,
        other => {
            return html::error(
                StatusCode::BAD_REQUEST,
                &format!("draining is {other:?}: expected 1 (drain) or 0 (undrain)"),
            )
        }
    };
    let Some(handle) = ui
        .schedulers
        .iter()
        .find(|p| p.name == scheduler)
        .and_then(|p| p.local())
    else {
        return html::error(
            StatusCode::NOT_FOUND,
            &format!("no scheduler {scheduler:?} with workers is shown by this UI"),
        );
    };
    match handle.set_worker_draining(worker.clone(), draining).await {
        Ok(()) => (
            StatusCode::SEE_OTHER,
            [(header::LOCATION, "/workers")],
            format!("worker {worker} draining={draining}\n"),
        )
            .into_response(),
        Err(e) => html::error(StatusCode::NOT_FOUND, &e.message),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(props: &[(&str, &str)]) -> WorkerRow {
        WorkerRow {
            worker_id: "w".into(),
            properties: props
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect(),
            total_slots: 1,
            busy_slots: 0,
            running: vec![],
            connected_for: Duration::ZERO,
            last_keepalive_ago: Duration::ZERO,
            draining: false,
        }
    }

    #[test]
    fn names_the_blocking_property() {
        let p = |v: &[(&str, &str)]| -> Vec<(String, String)> {
            v.iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect()
        };
        let ws = vec![w(&[("OSFamily", "linux"), ("cpu_count", "8")])];
        assert_eq!(
            blocked_by(&p(&[("OSFamily", "linux"), ("cpu_count", "4")]), &ws),
            None
        );
        assert_eq!(
            blocked_by(&p(&[("OSFamily", "windows")]), &ws).unwrap(),
            "no connected worker offers OSFamily=windows"
        );
        assert_eq!(
            blocked_by(&p(&[("cpu_count", "16")]), &ws).unwrap(),
            "no connected worker offers cpu_count=16"
        );
        assert_eq!(blocked_by(&p(&[]), &[]).unwrap(), "no worker is connected");
    }
}
