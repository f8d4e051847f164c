//! `/queue` (queued and executing operations by platform and by invocation, with ages, and
//! the platforms no connected worker can run with the property that blocks them) and
//! `/workers` (each worker's properties, slots, running operations and last keepalive), from
//! bounded read-only queries of each configured scheduler
//! ([`SchedulerHandle::queue_summary`], [`SchedulerHandle::workers_page`]): counts of every
//! operation and one page of rows, with links to the next and previous pages
//! (`/queue?scheduler=NAME&platform=KEY&offset=N`, `/workers?scheduler=NAME&offset=N`).
//! `POST /workers/drain` drains or undrains a worker through the same scheduler command as the
//! admin API, and only when `services.web_ui.read_only` is false.
//!
//! [`SchedulerHandle::queue_summary`]: crate::execution::SchedulerHandle::queue_summary
//! [`SchedulerHandle::workers_page`]: crate::execution::SchedulerHandle::workers_page

use std::fmt::Write;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};

use super::html::{self, esc, invocation_link, page, url};
use super::WebUi;
use crate::execution::driver::{PlatformQueue, QueueQuery, MAX_OFFSET};

/// Operations listed per platform and page; the rest are counted and paged.
const ROWS_PER_PLATFORM: usize = 100;
/// Invocations listed in the by-invocation table.
const INVOCATION_ROWS: usize = 100;
/// Workers listed per page.
const WORKER_ROWS: usize = 200;

/// The paging parameters of `/queue` and `/workers`.
#[derive(Default)]
struct Paging {
    scheduler: Option<String>,
    platform: Option<String>,
    offset: usize,
}

impl Paging {
    fn parse(query: Option<&str>) -> Paging {
        let mut p = Paging::default();
        for (k, v) in html::form_pairs(query.unwrap_or("")) {
            match k.as_str() {
                "scheduler" => p.scheduler = Some(v),
                "platform" => p.platform = Some(v),
                // A bad offset is the first page; the driver caps a deep one.
                "offset" => p.offset = v.parse::<usize>().unwrap_or(0).min(MAX_OFFSET),
                _ => {}
            }
        }
        p
    }

    /// Whether scheduler `name` is shown.
    fn shows(&self, name: &str) -> bool {
        self.scheduler.as_deref().is_none_or(|s| s == name)
    }
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

/// Whether a worker with `properties` offers one property: the same value, or, for numbers,
/// at least as much.
fn offers(properties: &[(String, String)], name: &str, value: &str) -> bool {
    properties.iter().any(|(n, v)| {
        n == name
            && (v == value
                || matches!((v.parse::<u64>(), value.parse::<u64>()), (Ok(have), Ok(need)) if have >= need))
    })
}

/// Why no connected worker (given by their properties) can run an action with `platform`,
/// or `None` when one can.
fn blocked_by(platform: &[(String, String)], workers: &[Vec<(String, String)>]) -> Option<String> {
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

fn queue_link(scheduler: &str, platform: &str, offset: usize, text: &str) -> String {
    format!(
        "<a href=\"/queue?scheduler={}&amp;platform={}&amp;offset={offset}\">{text}</a>",
        url(scheduler),
        url(platform)
    )
}

/// One platform's heading, blocking property, rows and paging links.
fn platform_section(
    b: &mut String,
    scheduler: &str,
    p: &PlatformQueue,
    workers: &[Vec<(String, String)>],
    offset: usize,
    with_rows: bool,
) {
    let blocked = (p.queued > 0)
        .then(|| blocked_by(&p.platform, workers))
        .flatten();
    let _ = write!(
        b,
        "<h3>Platform <code>{}</code>: {} queued, {} executing</h3>{}",
        esc(&p.key),
        p.queued,
        p.executing,
        blocked
            .map(|why| format!(
                "<p class=\"bad\">No worker can run these actions: {}.</p>",
                esc(&why)
            ))
            .unwrap_or_default()
    );
    let total = p.queued + p.executing;
    if !with_rows {
        let _ = write!(
            b,
            "<p class=\"muted\">{}</p>",
            queue_link(scheduler, &p.key, 0, "show its operations")
        );
        return;
    }
    b.push_str("<table><tr><th>Action</th><th>Stage</th><th>Queued for</th><th>Running for</th><th>Worker</th><th>Invocation</th><th>Priority</th><th>Retries</th></tr>");
    for r in &p.rows {
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
    if total > p.rows.len() {
        let first = offset.min(total);
        if p.rows.is_empty() {
            let _ = write!(
                b,
                "<p class=\"muted\">No operations from {} on: {total} in all. {}</p>",
                offset + 1,
                queue_link(scheduler, &p.key, 0, "first page")
            );
            return;
        }
        let mut links = Vec::new();
        if offset > 0 {
            links.push(queue_link(
                scheduler,
                &p.key,
                offset.saturating_sub(ROWS_PER_PLATFORM),
                "« previous",
            ));
        }
        if offset + p.rows.len() < total {
            links.push(queue_link(
                scheduler,
                &p.key,
                offset + ROWS_PER_PLATFORM,
                "next »",
            ));
        }
        let _ = write!(
            b,
            "<p class=\"muted\">Operations {}-{} of {total}, the longest queued first. {}</p>",
            first + 1,
            first + p.rows.len(),
            links.join(" ")
        );
    }
}

/// `/queue`, `?scheduler=NAME&platform=KEY&offset=N` for one platform's later pages.
pub async fn queue(State(ui): State<Arc<WebUi>>, RawQuery(query): RawQuery) -> Response {
    if ui.schedulers.is_empty() {
        return page(
            "Queue",
            "<p class=\"muted\">services.web_ui.schedulers names no scheduler.</p>",
        );
    }
    let paging = Paging::parse(query.as_deref());
    let mut b = String::new();
    if paging.platform.is_some() {
        b.push_str("<p><a href=\"/queue\">All platforms</a></p>");
    }
    for p in ui.schedulers.iter().filter(|p| paging.shows(&p.name)) {
        let name = &p.name;
        let _ = write!(b, "<h2>Scheduler {}</h2>", esc(name));
        if let Some(shared) = p.shared() {
            b.push_str(&cluster_box(shared).await);
        }
        let Some(handle) = p.local() else {
            b.push_str("<p class=\"bad\">a grpc scheduler: its queue and workers are shown where it forwards to</p>");
            continue;
        };
        let o = match handle
            .queue_summary(QueueQuery {
                platform: paging.platform.clone(),
                offset: if paging.platform.is_some() {
                    paging.offset
                } else {
                    0
                },
                limit: ROWS_PER_PLATFORM,
                invocations: INVOCATION_ROWS,
            })
            .await
        {
            Ok(o) => o,
            Err(e) => {
                let _ = write!(b, "<p class=\"bad\">{}</p>", esc(&e.message));
                continue;
            }
        };
        let _ = write!(
            b,
            "<p>{} queued, {} executing, {} workers.</p>",
            o.queued,
            o.executing,
            o.worker_properties.len()
        );
        for pq in &o.platforms {
            let with_rows = paging.platform.as_ref().is_none_or(|k| *k == pq.key);
            let offset = if with_rows && paging.platform.is_some() {
                paging.offset
            } else {
                0
            };
            platform_section(&mut b, name, pq, &o.worker_properties, offset, with_rows);
        }
        if !o.invocations.is_empty() {
            b.push_str("<h3>By invocation</h3><table><tr><th>Invocation</th><th>Queued</th><th>Executing</th><th>Oldest</th></tr>");
            for i in &o.invocations {
                let _ = write!(
                    b,
                    "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                    invocation_link(&i.invocation_id),
                    i.queued,
                    i.executing,
                    age(i.oldest)
                );
            }
            b.push_str("</table>");
            if o.invocation_count > o.invocations.len() {
                let _ = write!(
                    b,
                    "<p class=\"muted\">and {} more invocations (those with the most operations are shown).</p>",
                    o.invocation_count - o.invocations.len()
                );
            }
        }
    }
    page("Queue", &b)
}

/// `/workers`, `?scheduler=NAME&offset=N` for later pages.
pub async fn workers(State(ui): State<Arc<WebUi>>, RawQuery(query): RawQuery) -> Response {
    if ui.schedulers.is_empty() {
        return page(
            "Workers",
            "<p class=\"muted\">services.web_ui.schedulers names no scheduler.</p>",
        );
    }
    let paging = Paging::parse(query.as_deref());
    let mut b = String::new();
    for p in ui.schedulers.iter().filter(|p| paging.shows(&p.name)) {
        let name = &p.name;
        let _ = write!(b, "<h2>Scheduler {}</h2>", esc(name));
        if let Some(shared) = p.shared() {
            b.push_str(&cluster_box(shared).await);
        }
        let Some(handle) = p.local() else {
            b.push_str("<p class=\"bad\">a grpc scheduler: its queue and workers are shown where it forwards to</p>");
            continue;
        };
        let offset = if paging.scheduler.is_some() {
            paging.offset
        } else {
            0
        };
        let o = match handle.workers_page(offset, WORKER_ROWS).await {
            Ok(o) => o,
            Err(e) => {
                let _ = write!(b, "<p class=\"bad\">{}</p>", esc(&e.message));
                continue;
            }
        };
        if o.total == 0 {
            b.push_str("<p class=\"muted\">No worker is connected.</p>");
            continue;
        }
        b.push_str("<table><tr><th>Worker</th><th>Properties</th><th>Slots</th><th>Running</th><th>Connected for</th><th>Last keepalive</th><th>State</th></tr>");
        for (w, digests) in &o.workers {
            let running: Vec<String> = digests
                .iter()
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
                    esc(name),
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
        if o.total > o.workers.len() {
            let link = |at: usize, text: &str| {
                format!(
                    "<a href=\"/workers?scheduler={}&amp;offset={at}\">{text}</a>",
                    url(name)
                )
            };
            let mut links = Vec::new();
            if offset > 0 {
                links.push(link(offset.saturating_sub(WORKER_ROWS), "« previous"));
            }
            if offset + o.workers.len() < o.total {
                links.push(link(offset + WORKER_ROWS, "next »"));
            }
            let _ = write!(
                b,
                "<p class=\"muted\">Workers {}-{} of {}, by id. {}</p>",
                (offset + 1).min(offset + o.workers.len()),
                offset + o.workers.len(),
                o.total,
                links.join(" ")
            );
        }
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

    fn w(props: &[(&str, &str)]) -> Vec<(String, String)> {
        props
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
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
