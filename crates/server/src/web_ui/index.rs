//! What the web UI knows about invocations without reading their events: one small summary
//! per invocation, kept up to date by the Build Event Service as events are stored, bounded by
//! count and age (`services.web_ui.max_invocations`, `max_invocation_age_s`).
//!
//! The events themselves stay in the BEP store (bounded by that store's eviction policy); the
//! invocation page reads them from there. An invocation the index has forgotten is gone from
//! the UI even while some of its events are still stored. One index per BEP store name, shared
//! by every listener of the process ([`index_for`]).
//!
//! The summaries survive a restart: when an invocation starts or ends, the whole index is
//! written to the BEP store under one record ([`persist`]), and a process reads it back
//! before it serves ([`load`]). The record keeps at most [`PERSISTED_ARG_BYTES`] of each
//! command line.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use cairn_proto::bes::v1 as bes;
use cairn_store::{StoreExt, StoreRef};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use super::events;

/// Default `max_invocations`.
pub const DEFAULT_MAX_INVOCATIONS: usize = 1000;
/// Default `max_invocation_age_s`: 7 days.
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);
/// Arguments of a command line kept in a summary, and bytes of each.
const MAX_ARGS: usize = 256;
const MAX_ARG_BYTES: usize = 4096;
/// Bytes of all arguments of one summary.
const MAX_ARGS_TOTAL: usize = 64 << 10;
/// Options Bazel's client adds to every command line (its environment, rc files, terminal):
/// left out of the summary's short form.
pub const CLIENT_OPTIONS: [&str; 14] = [
    "--client_env=",
    "--default_override=",
    "--rc_source=",
    "--startup_time=",
    "--command_wait_time=",
    "--extract_data_time=",
    "--restart_reason=",
    "--binary_path=",
    "--isatty=",
    "--terminal_columns=",
    "--ignore_client_env",
    "--client_cwd=",
    "--override_repository=",
    "--tool_tag=",
];
/// Longest invocation id kept (Bazel's are UUIDs).
pub const MAX_ID_BYTES: usize = 256;

/// How an invocation ended, or that it has not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Status {
    Running,
    Succeeded,
    /// Bazel's exit code name (`BUILD_FAILURE`, `TESTS_FAILED`...) and number.
    Failed(String, i32),
}

impl Status {
    /// The word the list filters on: `running`, `succeeded` or `failed`.
    pub fn word(&self) -> &'static str {
        match self {
            Status::Running => "running",
            Status::Succeeded => "succeeded",
            Status::Failed(..) => "failed",
        }
    }
}

/// One invocation, as far as its events so far tell.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    pub invocation_id: String,
    pub build_id: String,
    /// Unix milliseconds: when Bazel says it started (or when its first event came).
    pub start_ms: i64,
    pub finish_ms: Option<i64>,
    pub command: String,
    pub args: Vec<String>,
    pub status: Status,
    /// The highest sequence number of the tool's stream (its events are 1..=this).
    pub last_seq: i64,
    pub targets: u32,
    pub failed_targets: u32,
    /// When the index first saw it (Unix ms), for retention.
    seen_ms: i64,
    #[serde(skip)]
    order: u64,
}

/// Command-line bytes of one summary in the persisted record.
pub const PERSISTED_ARG_BYTES: usize = 2048;
/// Largest persisted record read back.
const MAX_RECORD_BYTES: usize = 64 << 20;

struct Inner {
    by_id: HashMap<String, Summary>,
    /// Insertion order -> id: the front is the oldest.
    order: BTreeMap<u64, String>,
    next: u64,
    max_count: usize,
    max_age: Option<Duration>,
}

/// The invocations of one BEP store.
pub struct InvocationIndex {
    inner: Mutex<Inner>,
    /// Serialises writes of the persisted record (a snapshot taken later is written later).
    persist: tokio::sync::Mutex<()>,
    loaded: tokio::sync::OnceCell<()>,
}

/// The key of the persisted record in the BEP store.
fn record_key() -> cairn_core::Digest {
    cairn_core::DigestFunction::Sha256.compute(b"cairn-bep-invocation-index-v1")
}

/// Writes the index to `store` (the whole of it, oldest first).
pub async fn persist(index: &InvocationIndex, store: &StoreRef) -> Result<(), cairn_core::Error> {
    let _one_writer = index.persist.lock().await;
    let json = serde_json::to_vec(&index.snapshot())
        .map_err(|e| cairn_core::Error::internal(format!("encoding the invocation index: {e}")))?;
    store
        .put_bytes(&record_key(), json.into())
        .await
        .map_err(|e| e.context("storing the invocation index"))
}

/// Reads the persisted record back into `index`, once per process; a missing or unreadable
/// record leaves the index as it is (logged).
pub async fn load(index: &InvocationIndex, store: &StoreRef) {
    index
        .loaded
        .get_or_init(|| async {
            match store.get_all(&record_key(), MAX_RECORD_BYTES).await {
                Ok(bytes) => match serde_json::from_slice::<Vec<Summary>>(&bytes) {
                    Ok(list) => {
                        let n = list.len();
                        index.restore(list, crate::execution::driver::unix_ms_now());
                        tracing::info!(invocations = n, "web UI: invocation index read back");
                    }
                    Err(e) => tracing::warn!(error = %e, "web UI: the stored invocation index does not decode; starting empty"),
                },
                Err(e) if e.code == cairn_core::Code::NotFound => {}
                Err(e) => tracing::warn!(error = %e, "web UI: reading the stored invocation index failed; starting empty"),
            }
        })
        .await;
}

/// The index of the BEP store named `store` (created on first use).
pub fn index_for(store: &str) -> Arc<InvocationIndex> {
    static ALL: OnceLock<Mutex<HashMap<String, Arc<InvocationIndex>>>> = OnceLock::new();
    ALL.get_or_init(Default::default)
        .lock()
        .entry(store.to_string())
        .or_insert_with(|| {
            Arc::new(InvocationIndex::new(
                DEFAULT_MAX_INVOCATIONS,
                Some(DEFAULT_MAX_AGE),
            ))
        })
        .clone()
}

fn cap(s: &str, n: usize) -> String {
    if s.len() <= n {
        return s.to_string();
    }
    let mut end = n;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

impl InvocationIndex {
    pub fn new(max_count: usize, max_age: Option<Duration>) -> InvocationIndex {
        InvocationIndex {
            inner: Mutex::new(Inner {
                by_id: HashMap::new(),
                order: BTreeMap::new(),
                next: 0,
                max_count: max_count.max(1),
                max_age,
            }),
            persist: tokio::sync::Mutex::new(()),
            loaded: tokio::sync::OnceCell::new(),
        }
    }

    /// Every summary, oldest first, with command lines cut to [`PERSISTED_ARG_BYTES`].
    pub fn snapshot(&self) -> Vec<Summary> {
        let g = self.inner.lock();
        g.order
            .values()
            .filter_map(|id| g.by_id.get(id))
            .map(|s| {
                let mut s = s.clone();
                let mut total = 0;
                s.args.retain(|a| {
                    total += a.len();
                    total <= PERSISTED_ARG_BYTES
                });
                s
            })
            .collect()
    }

    /// Adds summaries read back (oldest first) that the index does not have yet.
    pub fn restore(&self, list: Vec<Summary>, now_ms: i64) {
        let mut g = self.inner.lock();
        for mut s in list {
            if s.invocation_id.is_empty()
                || s.invocation_id.len() > MAX_ID_BYTES
                || g.by_id.contains_key(&s.invocation_id)
            {
                continue;
            }
            s.order = g.next;
            g.next += 1;
            g.order.insert(s.order, s.invocation_id.clone());
            g.by_id.insert(s.invocation_id.clone(), s);
        }
        g.enforce(now_ms);
    }

    /// Sets the retention (the web UI's config); enforced at once.
    pub fn set_retention(&self, max_count: usize, max_age: Option<Duration>, now_ms: i64) {
        let mut g = self.inner.lock();
        g.max_count = max_count.max(1);
        g.max_age = max_age;
        g.enforce(now_ms);
    }

    /// Takes note of one stored event (the BES calls it after the store has it). True when
    /// the event started, began or ended an invocation: the time to [`persist`].
    pub fn record(&self, stream: &bes::StreamId, seq: i64, event: &[u8], now_ms: i64) -> bool {
        // Only Bazel's own stream carries the build's events; lifecycle events add nothing.
        if stream.component != bes::stream_id::BuildComponent::Tool as i32
            || stream.invocation_id.is_empty()
            || stream.invocation_id.len() > MAX_ID_BYTES
        {
            return false;
        }
        let parsed = events::bazel_event(event);
        let mut g = self.inner.lock();
        let mut milestone = false;
        if !g.by_id.contains_key(&stream.invocation_id) {
            milestone = true;
            let order = g.next;
            g.next += 1;
            g.order.insert(order, stream.invocation_id.clone());
            g.by_id.insert(
                stream.invocation_id.clone(),
                Summary {
                    invocation_id: stream.invocation_id.clone(),
                    build_id: stream.build_id.clone(),
                    start_ms: now_ms,
                    finish_ms: None,
                    command: String::new(),
                    args: Vec::new(),
                    status: Status::Running,
                    last_seq: 0,
                    targets: 0,
                    failed_targets: 0,
                    seen_ms: now_ms,
                    order,
                },
            );
            g.enforce(now_ms);
        }
        let Some(s) = g.by_id.get_mut(&stream.invocation_id) else {
            return false;
        };
        s.last_seq = s.last_seq.max(seq);
        let Some(e) = parsed else {
            return milestone;
        };
        milestone |= e.started.is_some() || e.finished.is_some();
        if let Some(st) = e.started {
            if st.start_time_millis > 0 {
                s.start_ms = st.start_time_millis;
            }
            s.command = cap(&st.command, 64);
        }
        if let Some(cl) = e.unstructured_command_line {
            // The short form (what Bazel's client adds left out), bounded in total; the
            // invocation page reads the whole line from the events.
            let mut total = 0;
            s.args = cl
                .args
                .iter()
                .filter(|a| !CLIENT_OPTIONS.iter().any(|o| a.starts_with(o)))
                .take(MAX_ARGS)
                .map(|a| cap(a, MAX_ARG_BYTES))
                .take_while(|a| {
                    total += a.len();
                    total <= MAX_ARGS_TOTAL
                })
                .collect();
        }
        if let Some(c) = e.completed {
            s.targets += 1;
            if !c.success {
                s.failed_targets += 1;
            }
        }
        if let Some(f) = e.finished {
            s.finish_ms = Some(f.finish_time_millis.max(s.start_ms));
            let (name, code) = f
                .exit_code
                .map(|c| (c.name, c.code))
                .unwrap_or_else(|| (String::new(), i32::from(!f.overall_success)));
            s.status = if code == 0 {
                Status::Succeeded
            } else {
                Status::Failed(cap(&name, 64), code)
            };
        }
        milestone
    }

    /// One invocation, unless forgotten.
    pub fn get(&self, id: &str, now_ms: i64) -> Option<Summary> {
        let mut g = self.inner.lock();
        g.enforce(now_ms);
        g.by_id.get(id).cloned()
    }

    /// Newest first: those whose status word is `status` (any when `None`) and whose id,
    /// command or arguments contain `text`; at most `limit`, and how many matched in all.
    pub fn list(
        &self,
        status: Option<&str>,
        text: &str,
        limit: usize,
        now_ms: i64,
    ) -> (Vec<Summary>, usize) {
        let mut g = self.inner.lock();
        g.enforce(now_ms);
        let mut out = Vec::new();
        let mut matched = 0;
        for id in g.order.values().rev() {
            let Some(s) = g.by_id.get(id) else { continue };
            if status.is_some_and(|w| w != s.status.word()) {
                continue;
            }
            if !text.is_empty()
                && !s.invocation_id.contains(text)
                && !s.command.contains(text)
                && !s.args.iter().any(|a| a.contains(text))
            {
                continue;
            }
            matched += 1;
            if out.len() < limit {
                out.push(s.clone());
            }
        }
        (out, matched)
    }

    pub fn len(&self) -> usize {
        self.inner.lock().by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Inner {
    /// Forgets the oldest past `max_count` and every one seen longer than `max_age` ago.
    fn enforce(&mut self, now_ms: i64) {
        let oldest_kept = self
            .max_age
            .map(|a| now_ms.saturating_sub(a.as_millis().min(i64::MAX as u128) as i64));
        while let Some((&order, id)) = self.order.first_key_value() {
            let too_many = self.by_id.len() > self.max_count;
            let too_old = match (oldest_kept, self.by_id.get(id)) {
                (Some(t), Some(s)) => s.seen_ms < t,
                (_, None) => true,
                (None, Some(_)) => false,
            };
            if !too_many && !too_old {
                break;
            }
            let id = id.clone();
            self.order.remove(&order);
            if self.by_id.get(&id).is_some_and(|s| s.order == order) {
                self.by_id.remove(&id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::web_ui::events::{tests::wrap, BuildEvent, BuildFinished, BuildStarted, ExitCode};

    fn tool(id: &str) -> bes::StreamId {
        bes::StreamId {
            build_id: "b".into(),
            invocation_id: id.into(),
            component: bes::stream_id::BuildComponent::Tool as i32,
        }
    }

    #[test]
    fn retention_by_count_and_age() {
        let idx = InvocationIndex::new(3, Some(Duration::from_secs(10)));
        for (i, id) in ["a", "b", "c", "d"].iter().enumerate() {
            idx.record(&tool(id), 1, &[], 1000 * i as i64);
        }
        assert_eq!(idx.len(), 3);
        assert!(idx.get("a", 4000).is_none());
        let (list, n) = idx.list(None, "", 10, 4000);
        assert_eq!(n, 3);
        assert_eq!(list[0].invocation_id, "d");
        // 10 s after "b" was seen, it is forgotten; "d" (seen at 3 s) is kept.
        assert!(idx.get("b", 11_500).is_none());
        assert!(idx.get("d", 11_500).is_some());
        assert!(idx.get("d", 13_500).is_none());
    }

    #[test]
    fn a_snapshot_restores_in_order() {
        let a = InvocationIndex::new(10, None);
        for id in ["a", "b", "c"] {
            assert!(a.record(&tool(id), 1, &[], 1));
        }
        assert!(
            !a.record(&tool("a"), 2, &[], 1),
            "a plain event is no milestone"
        );
        let json = serde_json::to_vec(&a.snapshot()).unwrap();
        let b = InvocationIndex::new(2, None);
        b.restore(serde_json::from_slice(&json).unwrap(), 2);
        let (list, n) = b.list(None, "", 10, 2);
        assert_eq!(n, 2, "retention applies to what is read back");
        assert_eq!(list[0].invocation_id, "c");
        assert_eq!(list[0].last_seq, 1);
        assert_eq!(b.get("a", 2).map(|s| s.last_seq), None);
    }

    #[test]
    fn summary_follows_the_events_and_filters() {
        let idx = InvocationIndex::new(10, None);
        let started = BuildEvent {
            started: Some(BuildStarted {
                start_time_millis: 500,
                command: "test".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        idx.record(&tool("x"), 1, &wrap(&started), 1);
        idx.record(&tool("y"), 1, &wrap(&started), 2);
        let finished = BuildEvent {
            finished: Some(BuildFinished {
                finish_time_millis: 900,
                exit_code: Some(ExitCode {
                    name: "TESTS_FAILED".into(),
                    code: 3,
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        idx.record(&tool("x"), 7, &wrap(&finished), 3);
        let x = idx.get("x", 4).unwrap();
        assert_eq!((x.start_ms, x.finish_ms, x.last_seq), (500, Some(900), 7));
        assert_eq!(x.status, Status::Failed("TESTS_FAILED".into(), 3));
        assert_eq!(idx.list(Some("failed"), "", 10, 4).1, 1);
        assert_eq!(idx.list(Some("running"), "", 10, 4).0[0].invocation_id, "y");
        assert_eq!(idx.list(None, "test", 10, 4).1, 2);
        assert_eq!(idx.list(None, "nothing", 10, 4).1, 0);
        // Lifecycle streams and huge ids are not invocations.
        let mut c = tool("z");
        c.component = bes::stream_id::BuildComponent::Controller as i32;
        idx.record(&c, 1, &[], 5);
        idx.record(&tool(&"q".repeat(10_000)), 1, &[], 5);
        assert_eq!(idx.len(), 2);
    }
}
