//! The operator's web UI (`services.web_ui`): server-rendered HTML pages on the listener's
//! port, so the listener's TLS and client-certificate settings apply to them.
//!
//! - `/invocations` (newest first, `?status=running|succeeded|failed&q=TEXT`) and
//!   `/invocation/ID` from the stored Build Event Protocol events ([`invocations`]);
//! - `/action/HASH-SIZE`, `/tree/HASH-SIZE` (a Directory), `/output-tree/HASH-SIZE` (a Tree),
//!   `/blob/HASH-SIZE` from the CAS and the action cache ([`actions`]);
//! - `/cache` (every store's tree with sizes, entries, hit rates, evictions and backend
//!   requests), `/lookup` (the blob lookup form) and `/cas/HASH-SIZE` (one blob, a Directory
//!   or Tree rendered as one) ([`cache`]);
//! - `/queue` and `/workers` from the schedulers, and `POST /workers/drain` when
//!   `read_only` is false ([`scheduler`]).
//!
//! Every page is bounded: lists are capped, blobs shown inline are capped (the whole blob is a
//! download), and every identifier from the URL is checked before it reaches a store. Pages
//! never change anything, except the drain button, which is off by default.

pub mod actions;
pub mod activity;
pub mod activity_file;
pub mod cache;
pub mod events;
pub mod html;
pub mod index;
pub mod invocations;
pub mod scheduler;

use std::sync::Arc;
use std::time::Duration;

use axum::routing::{get, post};
use axum::Router;
use cairn_store::StoreRef;

use crate::execution::ExecutionPipeline;
pub use index::{index_for, InvocationIndex};

/// What the pages read from.
pub struct WebUi {
    /// The BEP store and its invocation index.
    pub bep: Option<(StoreRef, Arc<InvocationIndex>)>,
    pub cas: Option<StoreRef>,
    pub ac: Option<StoreRef>,
    pub schedulers: Vec<ExecutionPipeline>,
    /// When false, `/workers` offers a drain button.
    pub read_only: bool,
    /// Every configured store by name, for `/cache`.
    pub stores: Vec<(String, StoreRef)>,
    /// Which of them these pages read: (`CAS`, `AC` or `BEP`, store name).
    pub store_roles: Vec<(&'static str, String)>,
    /// The process's metrics: top-level stores' reads and the backend counters on `/cache`.
    pub metrics: Option<Arc<crate::metrics::Metrics>>,
}

impl WebUi {
    /// The UI of `services.web_ui` (at key path `at`), resolving names with the listener's
    /// lookups; sets the invocation index's retention. `stores` are all the configured stores
    /// (shown on `/cache`).
    pub async fn from_config(
        cfg: &cairn_config::servers::WebUiService,
        at: &str,
        stores: &cairn_store::StoreMap,
        metrics: Arc<crate::metrics::Metrics>,
        store: impl Fn(&str, &str) -> Result<StoreRef, cairn_core::Error>,
        scheduler: impl Fn(&str, String) -> Result<ExecutionPipeline, cairn_core::Error>,
    ) -> Result<WebUi, cairn_core::Error> {
        let bep = match &cfg.bep_store {
            Some(n) => Some((store(n, &format!("{at}.bep_store"))?, index_for(n))),
            None => None,
        };
        let cas = match &cfg.cas_store {
            Some(n) => Some(store(n, &format!("{at}.cas_store"))?),
            None => None,
        };
        let ac = match &cfg.ac_store {
            Some(n) => Some(store(n, &format!("{at}.ac_store"))?),
            None => None,
        };
        let schedulers = cfg
            .schedulers
            .iter()
            .enumerate()
            .map(|(i, n)| scheduler(n, format!("{at}.schedulers[{i}]")))
            .collect::<Result<Vec<_>, _>>()?;
        let ui = WebUi {
            bep,
            cas,
            ac,
            schedulers,
            read_only: cfg.read_only,
            stores: stores.iter().map(|(n, s)| (n.clone(), s.clone())).collect(),
            store_roles: [
                ("CAS", &cfg.cas_store),
                ("AC", &cfg.ac_store),
                ("BEP", &cfg.bep_store),
            ]
            .into_iter()
            .filter_map(|(role, n)| Some((role, n.clone()?)))
            .collect(),
            metrics: Some(metrics),
        };
        if let Some((store, index)) = &ui.bep {
            index::load(index, store).await;
        }
        ui.set_retention(cfg.max_invocations, cfg.max_invocation_age_s);
        let (count, age) = retention(cfg.max_invocations, cfg.max_invocation_age_s);
        let record = activity::enable(count, age);
        match cfg.activity_path.as_deref() {
            Some("") => {}
            Some(path) => activity_file::start(record, path.into()).await,
            None => activity_file::start(record, activity_file::default_path()).await,
        }
        Ok(ui)
    }

    /// Sets the index's retention from the config (`max_invocations`,
    /// `max_invocation_age_s`, 0 meaning no age limit).
    pub fn set_retention(&self, max_count: Option<u64>, max_age_s: Option<u64>) {
        if let Some((_, idx)) = &self.bep {
            let (count, age) = retention(max_count, max_age_s);
            idx.set_retention(count, age, crate::execution::driver::unix_ms_now());
        }
    }
}

/// The retention of `max_invocations` and `max_invocation_age_s` (0: no age limit) with
/// their defaults.
fn retention(max_count: Option<u64>, max_age_s: Option<u64>) -> (usize, Option<Duration>) {
    let age = match max_age_s {
        None => Some(index::DEFAULT_MAX_AGE),
        Some(0) => None,
        Some(s) => Some(Duration::from_secs(s)),
    };
    let count = max_count.map_or(index::DEFAULT_MAX_INVOCATIONS, |c| {
        c.min(usize::MAX as u64) as usize
    });
    (count, age)
}

/// The UI's routes.
pub fn router(ui: Arc<WebUi>) -> Router {
    Router::new()
        .route("/", get(invocations::list))
        .route("/invocations", get(invocations::list))
        .route("/invocation/{id}", get(invocations::show))
        .route("/action/{digest}", get(actions::action))
        .route("/tree/{digest}", get(actions::tree))
        .route("/output-tree/{digest}", get(actions::output_tree))
        .route("/blob/{digest}", get(actions::blob))
        .route("/cache", get(cache::cache))
        .route("/lookup", get(cache::lookup))
        .route("/cas/{digest}", get(cache::blob_page))
        .route("/queue", get(scheduler::queue))
        .route("/workers", get(scheduler::workers))
        .route("/workers/drain", post(scheduler::drain))
        .with_state(ui)
}
