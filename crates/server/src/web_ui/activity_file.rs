//! The activity record ([`super::activity`]) kept in a file, so that an invocation's remote
//! actions are still on its page after the server restarts
//! (`services.web_ui.activity_path`).
//!
//! - Read once, when the first web UI is built and before its listener serves: invocations
//!   past the retention (count, age) are left out. A file that is missing starts an empty
//!   record; one that does not decode (torn, garbage, another version) or is larger than
//!   [`MAX_FILE_BYTES`] is logged and ignored (the next write replaces it), never a failed
//!   start.
//! - Written by one task after changes, at most once per [`WRITE_INTERVAL`], and once more at
//!   shutdown ([`flush`]): the whole record as JSON into a temporary file beside it, synced,
//!   then renamed over it, so that a reader (or a crash) sees the old file or the new one.
//!   A kill loses at most the last interval's calls.
//! - Bounded like the record it copies; failed executions' responses are kept newest first up
//!   to [`MAX_FAILED_BYTES`] in all.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use base64::Engine;
use cairn_core::proto::build::bazel::remote::execution::v2 as re;
use cairn_core::Digest;
use prost::Message;
use serde::{Deserialize, Serialize};

use super::activity::{ActionRecord, Activity, Execution, Invocation};

/// Shortest time between two writes of the file.
pub const WRITE_INTERVAL: Duration = Duration::from_secs(1);
/// Largest file read back at start.
pub const MAX_FILE_BYTES: u64 = 512 << 20;
/// Failed executions' responses written, in encoded bytes (the newest first).
pub const MAX_FAILED_BYTES: usize = 64 << 20;
/// The format written; another is ignored at start.
const VERSION: u32 = 1;

/// The default path: `$CAIRN_DATA/web_ui/activity.json` (`CAIRN_DATA` defaults to
/// `./cairn-data`, the built-in config's data directory).
pub fn default_path() -> PathBuf {
    let data = std::env::var_os("CAIRN_DATA").unwrap_or_else(|| "./cairn-data".into());
    Path::new(&data).join("web_ui").join("activity.json")
}

#[derive(Serialize, Deserialize)]
struct Record {
    version: u32,
    /// Oldest first.
    invocations: Vec<InvocationRecord>,
    /// Oldest first.
    failed: Vec<FailedRecord>,
}

#[derive(Serialize, Deserialize)]
struct InvocationRecord {
    id: String,
    first_ms: i64,
    last_ms: i64,
    not_listed: u64,
    actions: Vec<ActionLine>,
}

#[derive(Serialize, Deserialize)]
struct ActionLine {
    /// [`Digest::file_name`].
    digest: String,
    instance: String,
    first_ms: i64,
    lookup: Option<bool>,
    execution: Option<ExecutionLine>,
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum ExecutionLine {
    CacheHit,
    Queued {
        op_id: String,
    },
    Done {
        op_id: String,
        result: String,
        exit_code: Option<i32>,
        worker: String,
        message: String,
    },
}

#[derive(Serialize, Deserialize)]
struct FailedRecord {
    digest: String,
    /// The ExecuteResponse, protobuf in base64.
    response: String,
}

impl ExecutionLine {
    fn of(e: &Execution) -> ExecutionLine {
        match e {
            Execution::CacheHit => ExecutionLine::CacheHit,
            Execution::Queued { op_id } => ExecutionLine::Queued {
                op_id: op_id.clone(),
            },
            Execution::Done {
                op_id,
                result,
                exit_code,
                worker,
                message,
            } => ExecutionLine::Done {
                op_id: op_id.clone(),
                result: result.to_string(),
                exit_code: *exit_code,
                worker: worker.clone(),
                message: message.clone(),
            },
        }
    }

    fn into_execution(self) -> Execution {
        match self {
            ExecutionLine::CacheHit => Execution::CacheHit,
            ExecutionLine::Queued { op_id } => Execution::Queued { op_id },
            ExecutionLine::Done {
                op_id,
                result,
                exit_code,
                worker,
                message,
            } => Execution::Done {
                op_id,
                // The kinds `execution_completed_count` knows; anything else read back is a
                // failure, never a success.
                result: match result.as_str() {
                    "success" => "success",
                    "timeout" => "timeout",
                    _ => "failure",
                },
                exit_code,
                worker,
                message,
            },
        }
    }
}

/// A copy of the record to write, and the longest the record's lock was held for it: the
/// lock is taken once per invocation (cloning, no encoding), so that the services wait at
/// most for the copy of one invocation, never for the whole record.
fn export(a: &Activity) -> (Record, Duration) {
    let now = crate::execution::driver::unix_ms_now();
    let (_, cutoff) = a.retention(now);
    let mut longest = Duration::ZERO;
    let held = |started: std::time::Instant, longest: &mut Duration| {
        *longest = (*longest).max(started.elapsed());
    };
    let started = std::time::Instant::now();
    let ids: Vec<String> = a.inner.lock().order.values().cloned().collect();
    held(started, &mut longest);
    let mut invocations = Vec::with_capacity(ids.len());
    for id in ids {
        let started = std::time::Instant::now();
        let g = a.inner.lock();
        if let Some(inv) = g.invocations.get(&id).filter(|i| i.last_ms >= cutoff) {
            invocations.push(InvocationRecord {
                id,
                first_ms: inv.first_ms,
                last_ms: inv.last_ms,
                not_listed: inv.not_listed,
                actions: inv
                    .actions
                    .iter()
                    .map(|r| ActionLine {
                        digest: r.digest.file_name(),
                        instance: r.instance.clone(),
                        first_ms: r.first_ms,
                        lookup: r.lookup,
                        execution: r.execution.as_ref().map(ExecutionLine::of),
                    })
                    .collect(),
            });
        }
        drop(g);
        held(started, &mut longest);
    }
    let started = std::time::Instant::now();
    let g = a.inner.lock();
    let failed: Vec<(Digest, Arc<re::ExecuteResponse>)> = g
        .failed_order
        .iter()
        .rev()
        .filter_map(|d| Some((*d, g.failed.get(d)?.clone())))
        .collect();
    drop(g);
    held(started, &mut longest);
    let mut bytes = 0usize;
    let mut kept: Vec<FailedRecord> = failed
        .into_iter()
        .map_while(|(d, resp)| {
            let encoded = resp.encode_to_vec();
            bytes = bytes.saturating_add(encoded.len());
            (bytes <= MAX_FAILED_BYTES).then(|| FailedRecord {
                digest: d.file_name(),
                response: base64::engine::general_purpose::STANDARD.encode(encoded),
            })
        })
        .collect();
    kept.reverse();
    let rec = Record {
        version: VERSION,
        invocations,
        failed: kept,
    };
    (rec, longest)
}

/// Puts what `rec` holds into `a`, within its retention at `now_ms`; an invocation `a`
/// already has is left as it is. Lines that do not parse are skipped. The number of
/// invocations restored.
fn restore(a: &Activity, rec: Record, now_ms: i64) -> usize {
    let (keep, cutoff) = a.retention(now_ms);
    let mut g = a.inner.lock();
    let mut restored = 0;
    let skip = rec.invocations.len().saturating_sub(keep);
    for r in rec.invocations.into_iter().skip(skip) {
        if r.last_ms < cutoff || r.id.is_empty() || g.invocations.contains_key(&r.id) {
            continue;
        }
        let mut inv = Invocation::default();
        (inv.first_ms, inv.last_ms, inv.not_listed) = (r.first_ms, r.last_ms, r.not_listed);
        for line in r.actions {
            let Some(digest) = Digest::from_file_name(&line.digest) else {
                continue;
            };
            if inv.actions.len() >= super::activity::MAX_ACTIONS_PER_INVOCATION {
                inv.not_listed += 1;
                continue;
            }
            // A digest twice (a file not written by this server) keeps its first line.
            inv.push(ActionRecord {
                digest,
                instance: line.instance,
                first_ms: line.first_ms,
                lookup: line.lookup,
                execution: line.execution.map(ExecutionLine::into_execution),
            });
        }
        g.insert(&r.id, inv);
        restored += 1;
    }
    g.prune(keep, cutoff, "");
    for f in rec.failed {
        let Some(digest) = Digest::from_file_name(&f.digest) else {
            continue;
        };
        let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(f.response) else {
            continue;
        };
        let Ok(resp) = re::ExecuteResponse::decode(bytes.as_slice()) else {
            continue;
        };
        if g.failed.insert(digest, Arc::new(resp)).is_none() {
            g.failed_order.push_back(digest);
        }
    }
    while g.failed_order.len() > super::activity::MAX_FAILED_RESULTS {
        if let Some(old) = g.failed_order.pop_front() {
            g.failed.remove(&old);
        }
    }
    restored
}

/// Reads the file at `path`: `Ok(None)` when there is none.
fn read(path: &Path) -> Result<Option<Record>, String> {
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("opening it: {e}")),
    };
    let len = file.metadata().map_err(|e| format!("its size: {e}"))?.len();
    if len > MAX_FILE_BYTES {
        return Err(format!(
            "it is {len} bytes, more than the {MAX_FILE_BYTES} read back"
        ));
    }
    let rec: Record = serde_json::from_reader(std::io::BufReader::new(file))
        .map_err(|e| format!("it does not decode: {e}"))?;
    if rec.version != VERSION {
        return Err(format!(
            "it is version {}, this server reads {VERSION}",
            rec.version
        ));
    }
    Ok(Some(rec))
}

/// Writes `rec` to `path` atomically: a temporary file beside it, synced, renamed over it,
/// and the directory synced.
fn write(path: &Path, rec: &Record) -> std::io::Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty());
    let dir = dir.unwrap_or(Path::new("."));
    let context = |what: &str, e: std::io::Error| {
        std::io::Error::new(e.kind(), format!("{what} {}: {e}", dir.display()))
    };
    std::fs::create_dir_all(dir).map_err(|e| context("creating the directory", e))?;
    let mut tmp = tempfile::Builder::new()
        .prefix(".activity-")
        .suffix(".tmp")
        .tempfile_in(dir)
        .map_err(|e| context("creating a temporary file in", e))?;
    {
        let mut w = std::io::BufWriter::new(tmp.as_file_mut());
        serde_json::to_writer(&mut w, rec)?;
        w.flush()?;
    }
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    std::fs::File::open(dir)?.sync_all()
}

struct Persisted {
    path: PathBuf,
    activity: &'static Activity,
    /// One writer at a time (the task and [`flush`]).
    writing: tokio::sync::Mutex<()>,
}

static PERSISTED: OnceLock<Persisted> = OnceLock::new();

/// Keeps `activity` in the file at `path`: reads it back (once per process) and starts the
/// task that writes it after changes. A second web UI naming another file is logged and
/// shares the first one's.
pub async fn start(activity: &'static Activity, path: PathBuf) {
    if let Some(p) = PERSISTED.get() {
        if p.path != path {
            tracing::warn!(
                path = %path.display(),
                kept = %p.path.display(),
                "web UI: one activity record per process; this activity_path is not used"
            );
        }
        return;
    }
    let read_path = path.clone();
    let loaded = tokio::task::spawn_blocking(move || read(&read_path))
        .await
        .unwrap_or_else(|e| Err(format!("reading it failed: {e}")));
    match loaded {
        Ok(Some(rec)) => {
            let n = restore(activity, rec, crate::execution::driver::unix_ms_now());
            tracing::info!(invocations = n, path = %path.display(), "web UI: activity record read back");
        }
        Ok(None) => {
            tracing::info!(path = %path.display(), "web UI: no activity record yet; starting empty")
        }
        Err(e) => tracing::warn!(
            path = %path.display(),
            "web UI: ignoring the activity record ({e}); starting empty, the next write replaces it"
        ),
    }
    let p = Persisted {
        path,
        activity,
        writing: tokio::sync::Mutex::new(()),
    };
    if PERSISTED.set(p).is_err() {
        return; // another web UI of this process started it meanwhile
    }
    tokio::spawn(async move {
        loop {
            activity.changed.notified().await;
            write_now().await;
            tokio::time::sleep(WRITE_INTERVAL).await;
        }
    });
}

/// Writes the record if it changed since the last write (errors are logged; the next change
/// tries again).
async fn write_now() {
    let Some(p) = PERSISTED.get() else { return };
    let _one = p.writing.lock().await;
    if !p.activity.dirty.swap(false, Ordering::AcqRel) {
        return;
    }
    let activity = p.activity;
    let path = p.path.clone();
    let result = tokio::task::spawn_blocking(move || write(&path, &export(activity).0)).await;
    let err = match result {
        Ok(Ok(())) => return,
        Ok(Err(e)) => e.to_string(),
        Err(e) => e.to_string(),
    };
    p.activity.dirty.store(true, Ordering::Release);
    tracing::warn!(path = %p.path.display(), error = %err, "web UI: writing the activity record failed");
}

/// What one write of the record cost (for `cairn bench web-ui`).
#[derive(Debug, Clone, Copy)]
pub struct WriteCost {
    /// The copy, in all.
    pub copy: Duration,
    /// The longest the record's lock was held at once (what a service call may wait).
    pub longest_hold: Duration,
    /// Encoding and writing the file.
    pub write: Duration,
    pub bytes: u64,
}

/// One write of `a` to `path`, measured.
pub fn measure_write(a: &Activity, path: &Path) -> std::io::Result<WriteCost> {
    let started = std::time::Instant::now();
    let (rec, longest_hold) = export(a);
    let copy = started.elapsed();
    let started = std::time::Instant::now();
    write(path, &rec)?;
    Ok(WriteCost {
        copy,
        longest_hold,
        write: started.elapsed(),
        bytes: std::fs::metadata(path)?.len(),
    })
}

/// Writes what changed since the last write (at shutdown, after the drain).
pub async fn flush() {
    write_now().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_and_torn_files_are_errors_not_panics() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.json");
        assert!(read(&path).unwrap().is_none());
        for bad in [
            &b"\xff\x00garbage"[..],
            b"{\"version\":1,\"invocations\":[{\"id\":\"x\"",
            b"{\"version\":9,\"invocations\":[],\"failed\":[]}",
            b"[]",
        ] {
            std::fs::write(&path, bad).unwrap();
            assert!(read(&path).is_err());
        }
        // One that says it is larger than is read back (sparse: nothing is written or read).
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(MAX_FILE_BYTES + 1).unwrap();
        let err = read(&path).err().expect("too large");
        assert!(err.contains("bytes, more than"), "{err}");
        // A directory where the file should be.
        std::fs::remove_file(&path).unwrap();
        std::fs::create_dir(&path).unwrap();
        assert!(read(&path).is_err());
    }

    #[test]
    fn a_written_record_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("a.json");
        let digest = cairn_core::DigestFunction::Sha256.compute(b"x");
        let rec = Record {
            version: VERSION,
            invocations: vec![InvocationRecord {
                id: "inv".into(),
                first_ms: 1,
                last_ms: 2,
                not_listed: 0,
                actions: vec![ActionLine {
                    digest: digest.file_name(),
                    instance: String::new(),
                    first_ms: 1,
                    lookup: Some(false),
                    execution: Some(ExecutionLine::Done {
                        op_id: "op".into(),
                        result: "weird".into(),
                        exit_code: Some(3),
                        worker: "w".into(),
                        message: String::new(),
                    }),
                }],
            }],
            failed: vec![],
        };
        write(&path, &rec).unwrap();
        let back = read(&path).unwrap().unwrap();
        assert_eq!(back.invocations.len(), 1);
        let e = back.invocations[0].actions[0]
            .execution
            .as_ref()
            .map(|l| ExecutionLine::of(&ExecutionLine::into_execution(clone_line(l))));
        assert!(
            matches!(e, Some(ExecutionLine::Done { ref result, .. }) if result == "failure"),
            "an unknown result reads back as a failure"
        );
    }

    #[test]
    fn restore_keeps_the_retention_and_reopens_queued_operations() {
        let from = Activity::new();
        let to = Activity::new();
        for a in [&from, &to] {
            a.max_invocations.store(2, Ordering::Relaxed);
            a.max_age_ms.store(1_000, Ordering::Relaxed);
        }
        let d = cairn_core::DigestFunction::Sha256.compute(b"a");
        for inv in ["old", "mid", "new"] {
            from.update(inv, "", d, |r| {
                r.execution = Some(Execution::Queued {
                    op_id: format!("op-{inv}"),
                })
            });
        }
        let (mut rec, _) = export(&from);
        assert_eq!(rec.invocations.len(), 2, "the count is kept when written");
        rec.invocations[0].last_ms -= 10_000;
        let now = crate::execution::driver::unix_ms_now();
        assert_eq!(
            restore(&to, rec, now),
            1,
            "the one past the age is left out"
        );
        assert!(to.snapshot("mid", 1).is_none());
        assert_eq!(to.snapshot("new", 1).unwrap().actions, 1);
        assert!(to.inner.lock().open_ops.contains_key("op-new"));
    }

    fn clone_line(l: &ExecutionLine) -> ExecutionLine {
        serde_json::from_value(serde_json::to_value(l).unwrap()).unwrap()
    }
}
