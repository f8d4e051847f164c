//! Bounded read-only views of the scheduler for the web UI's `/queue` and `/workers`: the
//! driver walks its operations once, in place, counting per platform and per invocation and
//! keeping only the rows of one page (the longest queued first); only those rows are copied
//! out. A page costs O(operations x log(page)) in the driver and O(page) in copies, however
//! many operations wait.

use std::collections::{BinaryHeap, HashMap, HashSet};
use std::time::Duration;

use cairn_core::Digest;

use super::{Driver, OpRow, WorkerRow};

/// Most rows of one platform on one page.
pub const MAX_PAGE_ROWS: usize = 500;
/// Deepest offset a page starts at (the scheduler holds at most
/// [`super::MAX_OPERATIONS`]).
pub const MAX_OFFSET: usize = super::MAX_OPERATIONS;
/// Actions listed per worker on `/workers`.
pub const RUNNING_PER_WORKER: usize = 50;

/// Which page of the queue [`super::SchedulerHandle::queue_summary`] copies out.
#[derive(Debug, Clone)]
pub struct QueueQuery {
    /// Rows of only this platform (its [`platform_key`]); of every platform when `None`.
    pub platform: Option<String>,
    /// Rows skipped per platform (the longest queued first).
    pub offset: usize,
    /// Rows per platform (at most [`MAX_PAGE_ROWS`]).
    pub limit: usize,
    /// Invocations listed (those with the most live operations).
    pub invocations: usize,
}

/// One platform's live operations.
#[derive(Debug, Clone)]
pub struct PlatformQueue {
    pub key: String,
    pub platform: Vec<(String, String)>,
    pub queued: usize,
    pub executing: usize,
    /// The page's rows: queued and executing, the longest queued first.
    pub rows: Vec<OpRow>,
}

/// One invocation's live operations.
#[derive(Debug, Clone)]
pub struct InvocationQueue {
    pub invocation_id: String,
    pub queued: usize,
    pub executing: usize,
    /// How long its longest queued operation has been (last) queued.
    pub oldest: Option<Duration>,
}

/// Counts of every live operation and one page of rows.
#[derive(Debug, Clone, Default)]
pub struct QueueSummary {
    pub queued: usize,
    pub executing: usize,
    /// Every platform with live operations (rows only for the asked one), by key.
    pub platforms: Vec<PlatformQueue>,
    /// The invocations with the most live operations, most first.
    pub invocations: Vec<InvocationQueue>,
    /// Invocations with live operations, listed or not.
    pub invocation_count: usize,
    /// Every connected worker's properties (for the platforms none can run).
    pub worker_properties: Vec<Vec<(String, String)>>,
}

/// One page of workers.
#[derive(Debug, Clone, Default)]
pub struct WorkersPage {
    /// Connected workers in all.
    pub total: usize,
    /// The page, by worker id, each with the actions it runs (at most
    /// [`RUNNING_PER_WORKER`]).
    pub workers: Vec<(WorkerRow, Vec<Digest>)>,
}

/// A platform as one sorted line: `OSFamily=linux, cpu_count=4`.
pub fn platform_key(p: &[(String, String)]) -> String {
    let mut v: Vec<String> = p.iter().map(|(k, v)| format!("{k}={v}")).collect();
    v.sort();
    if v.is_empty() {
        "(no properties)".into()
    } else {
        v.join(", ")
    }
}

#[derive(Default)]
struct Group<'a> {
    queued: usize,
    executing: usize,
    /// The `keep` longest queued: a max-heap on (queued at, op id), so the newest is popped.
    oldest: BinaryHeap<(Duration, &'a str)>,
}

impl Driver {
    /// [`QueueSummary`] of `q` (read only).
    pub(super) fn queue_summary(&self, q: &QueueQuery) -> QueueSummary {
        let now = self.now();
        let offset = q.offset.min(MAX_OFFSET);
        let keep = offset + q.limit.min(MAX_PAGE_ROWS);
        let mut groups: HashMap<&[(String, String)], Group<'_>> = HashMap::new();
        let mut by_inv: HashMap<&str, (usize, usize, Option<Duration>)> = HashMap::new();
        let mut out = QueueSummary::default();
        for v in self.core.operations() {
            let queued = match v.stage {
                cairn_scheduler::Stage::Queued => true,
                cairn_scheduler::Stage::Executing => false,
                cairn_scheduler::Stage::Completed => continue,
            };
            let platform = self
                .core
                .operation_payload(v.op_id)
                .map_or(&[][..], |p| p.platform.as_slice());
            let g = groups.entry(platform).or_default();
            let inv = by_inv.entry(v.invocation_id).or_default();
            if queued {
                g.queued += 1;
                out.queued += 1;
                inv.0 += 1;
            } else {
                g.executing += 1;
                out.executing += 1;
                inv.1 += 1;
            }
            let at = v.queued_at.unwrap_or(v.created_at);
            inv.2 = inv.2.max(Some(now.saturating_sub(at)));
            if keep > 0 {
                g.oldest.push((at, v.op_id.0.as_str()));
                if g.oldest.len() > keep {
                    g.oldest.pop();
                }
            }
        }
        for (platform, g) in groups {
            let key = platform_key(platform);
            let rows = if q.platform.as_ref().is_none_or(|p| *p == key) {
                g.oldest
                    .into_sorted_vec()
                    .into_iter()
                    .skip(offset)
                    .filter_map(|(_, op)| {
                        let op = cairn_scheduler::OperationId(op.to_string());
                        self.op_row(&self.core.operation(&op)?, now)
                    })
                    .collect()
            } else {
                Vec::new()
            };
            out.platforms.push(PlatformQueue {
                key,
                platform: platform.to_vec(),
                queued: g.queued,
                executing: g.executing,
                rows,
            });
        }
        out.platforms.sort_by(|a, b| a.key.cmp(&b.key));
        out.invocation_count = by_inv.len();
        let mut inv: Vec<_> = by_inv.into_iter().collect();
        let n = q.invocations.min(inv.len());
        type Entry<'a> = (&'a str, (usize, usize, Option<Duration>));
        // Most live operations first, then by id.
        let most = |a: &Entry<'_>, b: &Entry<'_>| {
            (b.1 .0 + b.1 .1)
                .cmp(&(a.1 .0 + a.1 .1))
                .then_with(|| a.0.cmp(b.0))
        };
        if n > 0 && n < inv.len() {
            inv.select_nth_unstable_by(n - 1, most);
        }
        inv.truncate(n);
        inv.sort_by(most);
        out.invocations = inv
            .into_iter()
            .map(|(id, (queued, executing, oldest))| InvocationQueue {
                invocation_id: id.to_string(),
                queued,
                executing,
                oldest,
            })
            .collect();
        out.worker_properties = self.core.workers().map(|w| w.properties.to_vec()).collect();
        out
    }

    /// [`WorkersPage`] from `offset`, at most `limit` workers (read only).
    pub(super) fn workers_page(&self, offset: usize, limit: usize) -> WorkersPage {
        let now = self.now();
        let mut all: Vec<_> = self.core.workers().collect();
        all.sort_by(|a, b| a.worker_id.0.cmp(&b.worker_id.0));
        let total = all.len();
        let page: Vec<_> = all
            .into_iter()
            .skip(offset)
            .take(limit.min(MAX_PAGE_ROWS))
            .collect();
        let ids: HashSet<&str> = page.iter().map(|w| w.worker_id.0.as_str()).collect();
        let mut running: HashMap<&str, (Vec<String>, Vec<Digest>)> = HashMap::new();
        if !ids.is_empty() {
            for v in self.core.operations() {
                let Some(w) = v.worker_id.filter(|w| ids.contains(w.0.as_str())) else {
                    continue;
                };
                let r = running.entry(w.0.as_str()).or_default();
                if r.0.len() < RUNNING_PER_WORKER {
                    r.0.push(v.op_id.0.clone());
                    if let Some(d) = self.digests.get(&v.op_id.0) {
                        r.1.push(*d);
                    }
                }
            }
        }
        let workers = page
            .into_iter()
            .map(|w| {
                let (ops, digests) = running.remove(w.worker_id.0.as_str()).unwrap_or_default();
                (
                    WorkerRow {
                        worker_id: w.worker_id.0.clone(),
                        properties: w.properties.to_vec(),
                        total_slots: w.total_slots,
                        busy_slots: w.busy_slots,
                        running: ops,
                        connected_for: now.saturating_sub(w.connected_at),
                        last_keepalive_ago: now.saturating_sub(w.last_seen),
                        draining: w.draining,
                    },
                    digests,
                )
            })
            .collect();
        WorkersPage { total, workers }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{ActionPayload, SchedulerHandle};
    use super::*;
    use cairn_scheduler::{ActionKey, ActionRequest, PropertyType, SchedulerOptions};

    fn props(p: &[(&str, &str)]) -> Vec<(String, String)> {
        p.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    /// 3 one-slot linux workers; 250 operations no worker can run (windows) and 20 linux ones
    /// (3 executing), over 5 invocations.
    async fn scheduler() -> (SchedulerHandle, Vec<Box<dyn std::any::Any + Send>>) {
        let mut opts = SchedulerOptions::default();
        opts.supported_platform_properties
            .insert("OSFamily".into(), PropertyType::Exact);
        opts.unschedulable_grace_period = Duration::from_secs(3600);
        opts.client_action_timeout = Duration::from_secs(3600);
        opts.worker_timeout = Duration::from_secs(3600);
        let handle = SchedulerHandle::spawn(opts, None);
        let mut keep: Vec<Box<dyn std::any::Any + Send>> = Vec::new();
        for w in 0..3 {
            let (tx, rx) = tokio::sync::mpsc::channel(64);
            handle
                .worker_connect(format!("w{w}"), props(&[("OSFamily", "linux")]), 1, tx)
                .await
                .unwrap();
            keep.push(Box::new(rx));
        }
        for n in 0..270 {
            let digest = cairn_core::DigestFunction::Sha256.compute(format!("a{n}").as_bytes());
            let platform = props(&[("OSFamily", if n < 250 { "windows" } else { "linux" })]);
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            handle
                .add(
                    format!("op-{n:03}"),
                    digest,
                    ActionRequest {
                        key: ActionKey(digest.to_string()),
                        cacheable: true,
                        priority: 0,
                        platform: platform.clone(),
                        invocation_id: format!("inv-{}", n % 5),
                        payload: ActionPayload {
                            instance: String::new(),
                            digest,
                            skip_cache_write: false,
                            timeout: None,
                            queued_at_unix_ms: 0,
                            platform,
                            trace_context: vec![],
                        },
                    },
                    tx,
                )
                .await
                .unwrap();
            keep.push(Box::new(rx));
        }
        (handle, keep)
    }

    #[tokio::test]
    async fn the_queue_is_counted_whole_and_copied_one_page_at_a_time() {
        let (handle, _keep) = scheduler().await;
        let query = |platform: Option<&str>, offset, invocations| QueueQuery {
            platform: platform.map(str::to_string),
            offset,
            limit: 100,
            invocations,
        };
        let s = handle.queue_summary(query(None, 0, 2)).await.unwrap();
        assert_eq!((s.queued, s.executing), (267, 3));
        assert_eq!(s.platforms.len(), 2);
        let linux = &s.platforms[0];
        assert_eq!(linux.key, "OSFamily=linux");
        assert_eq!(
            (linux.queued, linux.executing, linux.rows.len()),
            (17, 3, 20)
        );
        let windows = &s.platforms[1];
        assert_eq!((windows.queued, windows.rows.len()), (250, 100));
        assert_eq!(windows.rows[0].op_id, "op-000", "the longest queued first");
        assert_eq!(windows.rows[99].op_id, "op-099");
        assert_eq!((s.invocations.len(), s.invocation_count), (2, 5));
        assert_eq!(s.invocations[0].queued + s.invocations[0].executing, 54);
        assert_eq!(s.worker_properties.len(), 3);

        // One platform's third page; the other is only counted.
        let s = handle
            .queue_summary(query(Some("OSFamily=windows"), 200, 0))
            .await
            .unwrap();
        assert!(s.platforms[0].rows.is_empty());
        let rows = &s.platforms[1].rows;
        assert_eq!(rows.len(), 50);
        assert_eq!(rows[0].op_id, "op-200");
        assert!(s.invocations.is_empty());
        // Past the end: counts, no rows.
        let s = handle
            .queue_summary(query(Some("OSFamily=windows"), usize::MAX, 0))
            .await
            .unwrap();
        assert!(s.platforms[1].rows.is_empty());
        assert_eq!(s.platforms[1].queued, 250);
    }

    #[tokio::test]
    async fn workers_are_paged_by_id_with_what_they_run() {
        let (handle, _keep) = scheduler().await;
        let page = handle.workers_page(1, 1).await.unwrap();
        assert_eq!(page.total, 3);
        assert_eq!(page.workers.len(), 1);
        let (w, running) = &page.workers[0];
        assert_eq!(w.worker_id, "w1");
        assert_eq!((w.busy_slots, running.len(), w.running.len()), (1, 1, 1));
        assert!(handle.workers_page(3, 10).await.unwrap().workers.is_empty());
    }
}
