//! How a `redis_store` reaches Redis: one shared multiplexed connection (or a cluster
//! connection), made on first use and made again after a failure, through the mode the config
//! names. `standard` dials the one address; `sentinel` asks the sentinels for the current
//! master each time it connects, so a failover is followed by the next reconnect; `cluster`
//! uses the cluster client, which follows slot moves and promoted replicas itself.
//!
//! Every command goes through [`Connector::run`]: a permit from `max_client_permits`, a
//! deadline of `command_timeout_ms`, and retries with exponential backoff and jitter (the
//! `retry` block) for the errors a reconnect or a wait can cure. Errors name the store.
//!
//! Other Redis users in Cairn (the shared scheduler state) build a [`Connector`] from the
//! same config block, or take the one of a built store ([`super::RedisStore::connector`]),
//! and send their own commands, pipelines and scripts through [`Connector::run`]; the client
//! crate is re-exported as `cairn_store::redis_store::redis` so it stays out of other
//! crates' dependencies.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cairn_config::stores::{RedisMode, RedisStore as RedisConfig};
use cairn_core::{Code, Error};
use parking_lot::Mutex;
use rand::Rng;
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use redis::{
    AsyncConnectionConfig, Client, Cmd, FromRedisValue, IntoConnectionInfo, Pipeline, RedisError,
    RedisFuture, RetryMethod, Value,
};
use tokio::sync::Semaphore;

use crate::backend_metrics::{self, BackendEvent};

/// The `backend` label of this store's metrics.
const BACKEND: &str = "redis_store";

/// NativeLink's defaults.
const DEFAULT_COMMAND_TIMEOUT_MS: u64 = 10_000;
const DEFAULT_CONNECTION_TIMEOUT_MS: u64 = 3_000;
const DEFAULT_HEALTH_CHECK_TIMEOUT_MS: u64 = 4_000;
const DEFAULT_CLIENT_PERMITS: u64 = 500;
const DEFAULT_RETRY_DELAY_S: f64 = 0.1;
/// NativeLink retries a failed command up to 5 attempts in all when `retry` says nothing.
const DEFAULT_MAX_RETRIES: u64 = 4;
/// The longest single backoff wait.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// A live connection of either shape; cheap to clone (both multiplex one socket per node).
#[derive(Clone)]
pub enum Conn {
    Single(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

enum Target {
    Standard(Client),
    /// Behind an async mutex: the client caches which sentinel answered last.
    Sentinel(tokio::sync::Mutex<SentinelClient>),
    Cluster(ClusterClient),
}

/// Retry budget from the `retry` block.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub max_retries: u32,
    pub delay: Duration,
    pub jitter: f64,
}

impl RetryPolicy {
    fn from_config(c: &RedisConfig) -> RetryPolicy {
        let r = c.retry.clone().unwrap_or_default();
        let max_retries = r
            .max_retries
            .filter(|&n| n > 0)
            .unwrap_or(DEFAULT_MAX_RETRIES);
        let delay = r
            .delay
            .filter(|&d| d > 0.0)
            .unwrap_or(DEFAULT_RETRY_DELAY_S);
        RetryPolicy {
            max_retries: max_retries.min(1000) as u32,
            delay: Duration::from_secs_f64(delay.min(60.0)),
            jitter: r.jitter.unwrap_or(0.0).clamp(0.0, 1.0),
        }
    }

    /// The wait before retry number `attempt` (1-based): `delay * 2^(attempt-1)`, spread by
    /// `jitter` around that value, at most [`MAX_BACKOFF`].
    pub fn backoff(&self, attempt: u32) -> Duration {
        let base = self.delay.as_secs_f64() * 2f64.powi(attempt.saturating_sub(1).min(20) as i32);
        let spread = if self.jitter > 0.0 {
            rand::thread_rng().gen_range(1.0 - self.jitter / 2.0..=1.0 + self.jitter / 2.0)
        } else {
            1.0
        };
        Duration::from_secs_f64(base * spread).min(MAX_BACKOFF)
    }
}

/// Counts what the connector did, for metrics and tests.
#[derive(Default)]
pub struct Counters {
    pub retries: AtomicU64,
    pub connects: AtomicU64,
}

pub struct Connector {
    /// The store's key path, for messages.
    pub name: String,
    target: Target,
    conn_config: AsyncConnectionConfig,
    connection_timeout: Duration,
    pub command_timeout: Duration,
    pub health_timeout: Duration,
    pub retry: RetryPolicy,
    permits: Semaphore,
    max_permits: usize,
    /// The current connection and its generation (bumped on each connect).
    slot: Mutex<Option<(u64, Conn)>>,
    generation: AtomicU64,
    /// Serialises connecting, so a burst of failures makes one new connection, not many.
    connecting: tokio::sync::Mutex<()>,
    pub counters: Arc<Counters>,
}

/// What went wrong with one attempt, and whether another may help.
struct Failure {
    error: Error,
    retry: bool,
    reconnect: bool,
}

impl Connector {
    /// Checks the config and builds the clients; connects nothing yet.
    pub fn new(name: &str, c: &RedisConfig) -> Result<Connector, Error> {
        let path = |key: &str| format!("{name}.redis_store.{key}");
        if c.addresses.is_empty() {
            return Err(Error::invalid_argument(format!(
                "{}: at least one redis:// URL is required",
                path("addresses")
            )));
        }
        if c.connection_timeout_s.unwrap_or(0) > 0 && c.connection_timeout_ms.unwrap_or(0) > 0 {
            return Err(Error::invalid_argument(format!(
                "{}: connection_timeout_s and connection_timeout_ms are both set; keep only \
                 connection_timeout_ms",
                path("connection_timeout_s")
            )));
        }
        let connection_timeout_ms = match c.connection_timeout_s.filter(|&s| s > 0) {
            Some(s) => s.saturating_mul(1000),
            None => nonzero(c.connection_timeout_ms, DEFAULT_CONNECTION_TIMEOUT_MS),
        };
        let connection_timeout = Duration::from_millis(connection_timeout_ms);
        let command_timeout =
            Duration::from_millis(nonzero(c.command_timeout_ms, DEFAULT_COMMAND_TIMEOUT_MS));
        let health_timeout = Duration::from_millis(nonzero(
            c.health_check_timeout_ms,
            DEFAULT_HEALTH_CHECK_TIMEOUT_MS,
        ));
        let permits = nonzero(c.max_client_permits, DEFAULT_CLIENT_PERMITS)
            .min(Semaphore::MAX_PERMITS as u64) as usize;
        let bad_url = |i: usize, e: RedisError| {
            Error::invalid_argument(format!(
                "{}[{i}]: not a usable Redis URL: {e}",
                path("addresses")
            ))
        };
        let target = match c.mode {
            RedisMode::Standard => {
                if c.addresses.len() != 1 {
                    return Err(Error::invalid_argument(format!(
                        "{}: mode standard takes exactly one URL (there are {}); list the \
                         sentinels with mode sentinel, or the seed nodes with mode cluster",
                        path("addresses"),
                        c.addresses.len()
                    )));
                }
                let (url, _) = split_url(&c.addresses[0]);
                Target::Standard(Client::open(url).map_err(|e| bad_url(0, e))?)
            }
            RedisMode::Sentinel => {
                let mut infos = Vec::new();
                let mut service = None;
                for (i, a) in c.addresses.iter().enumerate() {
                    let (url, name) = split_url(a);
                    service = service.or(name);
                    infos.push(url.into_connection_info().map_err(|e| bad_url(i, e))?);
                }
                // The master gets the first URL's user, password and database; the sentinels
                // are asked without a database (they have none).
                let master_settings = infos[0].redis_settings().clone();
                for info in &mut infos {
                    let settings = info.redis_settings().clone().set_db(0);
                    *info = info.clone().set_redis_settings(settings);
                }
                let mut node = SentinelNodeConnectionInfo::default()
                    .set_redis_connection_info(master_settings);
                // `rediss://` sentinels: the master is reached over TLS too.
                if matches!(infos[0].addr(), redis::ConnectionAddr::TcpTls { .. }) {
                    node = node.set_tls_mode(redis::TlsMode::Secure);
                }
                let service = service.unwrap_or_else(|| "master".to_string());
                let client =
                    SentinelClient::build(infos, service, Some(node), SentinelServerType::Master)
                        .map_err(|e| bad_url(0, e))?;
                Target::Sentinel(tokio::sync::Mutex::new(client))
            }
            RedisMode::Cluster => {
                let mut nodes = Vec::new();
                for (i, a) in c.addresses.iter().enumerate() {
                    let (url, _) = split_url(a);
                    nodes.push(url.into_connection_info().map_err(|e| bad_url(i, e))?);
                }
                let client = ClusterClient::builder(nodes)
                    .connection_timeout(connection_timeout)
                    .response_timeout(command_timeout)
                    .build()
                    .map_err(|e| bad_url(0, e))?;
                Target::Cluster(client)
            }
        };
        let conn_config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(connection_timeout))
            .set_response_timeout(Some(command_timeout));
        Ok(Connector {
            name: name.to_string(),
            target,
            conn_config,
            connection_timeout,
            command_timeout,
            health_timeout,
            retry: RetryPolicy::from_config(c),
            permits: Semaphore::new(permits),
            max_permits: permits,
            slot: Mutex::new(None),
            generation: AtomicU64::new(0),
            connecting: tokio::sync::Mutex::new(()),
            counters: Arc::new(Counters::default()),
        })
    }

    /// The current connection, connecting first when there is none.
    async fn connection(&self) -> Result<(u64, Conn), Failure> {
        if let Some(c) = self.slot.lock().clone() {
            return Ok(c);
        }
        // Holding this async lock across the connect is its purpose: one connect at a time,
        // bounded by connection_timeout.
        let _gate = self.connecting.lock().await;
        if let Some(c) = self.slot.lock().clone() {
            return Ok(c);
        }
        self.counters.connects.fetch_add(1, Ordering::Relaxed);
        let conn = tokio::time::timeout(self.connection_timeout, self.connect())
            .await
            .map_err(|_| Failure {
                error: Error::unavailable(format!(
                    "connecting took longer than {:?} (connection_timeout_ms)",
                    self.connection_timeout
                )),
                retry: true,
                reconnect: false,
            })?
            .map_err(|e| {
                let timed_out = e.is_timeout();
                let mut f = classify(e);
                if timed_out {
                    f.error = Error::unavailable(format!(
                        "connecting took longer than {:?} (connection_timeout_ms)",
                        self.connection_timeout
                    ));
                }
                f.error = f.error.context("connecting");
                // A refused or failed connect is worth another try after a wait.
                f.retry = f.retry || f.error.code == Code::Unavailable;
                f
            })?;
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        *self.slot.lock() = Some((generation, conn.clone()));
        Ok((generation, conn))
    }

    async fn connect(&self) -> Result<Conn, RedisError> {
        match &self.target {
            Target::Standard(client) => Ok(Conn::Single(
                client
                    .get_multiplexed_async_connection_with_config(&self.conn_config)
                    .await?,
            )),
            Target::Sentinel(sentinel) => {
                let client = sentinel.lock().await.async_get_client().await?;
                Ok(Conn::Single(
                    client
                        .get_multiplexed_async_connection_with_config(&self.conn_config)
                        .await?,
                ))
            }
            Target::Cluster(client) => Ok(Conn::Cluster(client.get_async_connection().await?)),
        }
    }

    /// Drops the connection of `generation`, unless a newer one replaced it already.
    fn invalidate(&self, generation: u64) {
        let mut slot = self.slot.lock();
        if slot.as_ref().is_some_and(|(g, _)| *g == generation) {
            *slot = None;
        }
    }

    /// Runs `op` on a connection with a permit, the command deadline and the retry budget.
    /// `operation` is the metric label (a fixed word: `lookup`, `read`, `write`...); `what`
    /// says what the store was doing, for the error message.
    pub async fn run<T, F>(&self, operation: &'static str, what: &str, op: F) -> Result<T, Error>
    where
        F: Fn(Conn) -> futures::future::BoxFuture<'static, Result<T, RedisError>>,
    {
        // Waiting for a permit is bounded like a command: a store whose every permit is held
        // (a Redis that is down, each holder in its retry budget) answers, it does not queue
        // without end.
        let _permit = match tokio::time::timeout(self.command_timeout, self.permits.acquire()).await
        {
            Ok(Ok(p)) => p,
            Ok(Err(_)) => {
                return Err(Error::unavailable(format!(
                    "redis_store {}: closed",
                    self.name
                )))
            }
            Err(_) => {
                return Err(Error::unavailable(format!(
                    "redis_store {}: {what}: all {} permits (max_client_permits) stayed busy for \
                     {:?} (command_timeout_ms)",
                    self.name, self.max_permits, self.command_timeout
                )))
            }
        };
        let mut attempt = 0u32;
        let mut first: Option<Error> = None;
        loop {
            let started = Instant::now();
            let failure = match self.connection().await {
                Err(f) => f,
                Ok((generation, conn)) => {
                    match tokio::time::timeout(self.command_timeout, op(conn)).await {
                        Ok(Ok(v)) => {
                            self.record(operation, true, started);
                            return Ok(v);
                        }
                        Ok(Err(e)) => {
                            let mut f = classify(e);
                            if f.error.code == Code::DeadlineExceeded {
                                f.error = self.command_deadline_error();
                            }
                            if f.reconnect {
                                self.invalidate(generation);
                            }
                            f
                        }
                        Err(_) => {
                            // The connection may be wedged: make a new one for the next try.
                            self.invalidate(generation);
                            Failure {
                                error: self.command_deadline_error(),
                                retry: true,
                                reconnect: true,
                            }
                        }
                    }
                }
            };
            self.record(operation, false, started);
            if !failure.retry || attempt >= self.retry.max_retries {
                let tries = match (&first, failure.retry) {
                    (_, false) => String::new(),
                    (Some(f), true) if f.message != failure.error.message => format!(
                        " (after {} attempts; the first failed with: {})",
                        attempt + 1,
                        f.message
                    ),
                    _ => format!(" (after {} attempts)", attempt + 1),
                };
                return Err(failure
                    .error
                    .context(format!("redis_store {}: {what}{tries}", self.name)));
            }
            if first.is_none() {
                first = Some(failure.error.clone());
            }
            attempt += 1;
            self.counters.retries.fetch_add(1, Ordering::Relaxed);
            backend_metrics::record(BackendEvent::Retry {
                store: backend_metrics::store_label(&self.name),
                backend: BACKEND,
                operation,
            });
            tracing::debug!(store = %self.name, attempt, error = %failure.error, "redis: retrying");
            tokio::time::sleep(self.retry.backoff(attempt)).await;
        }
    }

    fn record(&self, operation: &'static str, ok: bool, started: Instant) {
        backend_metrics::record(BackendEvent::Request {
            store: backend_metrics::store_label(&self.name),
            backend: BACKEND,
            operation,
            ok,
            seconds: started.elapsed().as_secs_f64(),
        });
    }

    fn command_deadline_error(&self) -> Error {
        Error::new(
            Code::DeadlineExceeded,
            format!(
                "no answer within {:?} (command_timeout_ms)",
                self.command_timeout
            ),
        )
    }

    /// A new pub/sub connection (one per subscriber; not pooled, no retries) within
    /// `connection_timeout_ms`. Standalone and sentinel modes only: a cluster's pub/sub
    /// would need the cluster client's own subscription routing.
    pub async fn pubsub(&self) -> Result<redis::aio::PubSub, Error> {
        let connect = async {
            match &self.target {
                Target::Standard(client) => client.get_async_pubsub().await,
                Target::Sentinel(sentinel) => {
                    let client = sentinel.lock().await.async_get_client().await?;
                    client.get_async_pubsub().await
                }
                Target::Cluster(_) => Err(RedisError::from((
                    redis::ErrorKind::InvalidClientConfig,
                    "pub/sub subscriptions are not supported in cluster mode",
                ))),
            }
        };
        match tokio::time::timeout(self.connection_timeout, connect).await {
            Ok(Ok(p)) => Ok(p),
            Ok(Err(e)) => Err(classify(e)
                .error
                .context(format!("redis_store {}: subscribing", self.name))),
            Err(_) => Err(Error::unavailable(format!(
                "redis_store {}: subscribing: connecting took longer than {:?} (connection_timeout_ms)",
                self.name, self.connection_timeout
            ))),
        }
    }

    /// Whether this connects to a cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self.target, Target::Cluster(_))
    }

    /// One PING within `health_check_timeout_ms`, no retries.
    pub async fn ping(&self) -> Result<(), Error> {
        let started = Instant::now();
        let check = async {
            let (generation, mut conn) = self.connection().await.map_err(|f| f.error)?;
            let r: Result<String, RedisError> = redis::cmd("PING").query_async(&mut conn).await;
            r.map(|_| ()).map_err(|e| {
                let f = classify(e);
                if f.reconnect {
                    self.invalidate(generation);
                }
                f.error
            })
        };
        let r = match tokio::time::timeout(self.health_timeout, check).await {
            Ok(r) => r,
            Err(_) => Err(Error::new(
                Code::DeadlineExceeded,
                format!(
                    "PING got no answer within {:?} (health_check_timeout_ms)",
                    self.health_timeout
                ),
            )),
        };
        self.record("ping", r.is_ok(), started);
        r.map_err(|e| e.context(format!("redis_store {}", self.name)))
    }
}

fn nonzero(v: Option<u64>, default: u64) -> u64 {
    v.filter(|&n| n > 0).unwrap_or(default)
}

/// Splits NativeLink's address form: `redis+sentinel://` is read as `redis://`, and the query
/// (`?sentinelServiceName=NAME`) is taken off and its service name returned.
fn split_url(address: &str) -> (String, Option<String>) {
    let address = match address.strip_prefix("redis+sentinel://") {
        Some(rest) => format!("redis://{rest}"),
        None => address.to_string(),
    };
    match address.split_once('?') {
        None => (address, None),
        Some((url, query)) => {
            let service = query
                .split('&')
                .filter_map(|kv| kv.split_once('='))
                .find(|(k, _)| *k == "sentinelServiceName")
                .map(|(_, v)| v.to_string());
            (url.to_string(), service)
        }
    }
}

/// Maps a client error to a status, and says whether a retry (after a reconnect) may help.
fn classify(e: RedisError) -> Failure {
    use redis::ServerErrorKind as S;
    let text = e.to_string();
    let server_kind = e.kind();
    if e.is_timeout() {
        return Failure {
            error: Error::new(Code::DeadlineExceeded, text),
            retry: true,
            reconnect: true,
        };
    }
    if matches!(
        server_kind,
        redis::ErrorKind::AuthenticationFailed | redis::ErrorKind::Server(S::NoPerm)
    ) {
        // A wrong password or missing ACL permission: no retry will cure it.
        return Failure {
            error: Error::new(Code::PermissionDenied, text),
            retry: false,
            reconnect: true,
        };
    }
    let (code, retry, reconnect) = match e.retry_method() {
        RetryMethod::NoRetry => {
            if text.contains("OOM") {
                (Code::ResourceExhausted, false, false)
            } else if matches!(server_kind, redis::ErrorKind::Server(S::ReadOnly)) {
                // A demoted master (sentinel failover): find the new one.
                (Code::Unavailable, true, true)
            } else {
                (Code::Internal, false, false)
            }
        }
        RetryMethod::Reconnect
        | RetryMethod::ReconnectFromInitialConnections
        | RetryMethod::RefreshSlotsAndRetry => (Code::Unavailable, true, true),
        RetryMethod::RetryImmediately
        | RetryMethod::WaitAndRetry
        | RetryMethod::AskRedirect
        | RetryMethod::MovedRedirect => (Code::Unavailable, true, e.is_io_error()),
        _ => (Code::Unavailable, true, true),
    };
    Failure {
        error: Error::new(code, text),
        retry,
        reconnect,
    }
}

/// Runs one command built by `cmd` (for [`Connector::run`]).
pub fn query<T: FromRedisValue + Send + 'static>(
    cmd: Cmd,
) -> impl Fn(Conn) -> futures::future::BoxFuture<'static, Result<T, RedisError>> {
    move |mut conn| {
        let cmd = cmd.clone();
        Box::pin(async move { cmd.query_async(&mut conn).await })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_in_nativelink_form() {
        assert_eq!(
            split_url("redis+sentinel://:pw@127.0.0.1:26379/3?sentinelServiceName=cache"),
            (
                "redis://:pw@127.0.0.1:26379/3".to_string(),
                Some("cache".to_string())
            )
        );
        assert_eq!(
            split_url("redis://h:1/"),
            ("redis://h:1/".to_string(), None)
        );
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        let p = RetryPolicy {
            max_retries: 10,
            delay: Duration::from_millis(100),
            jitter: 0.0,
        };
        assert_eq!(p.backoff(1), Duration::from_millis(100));
        assert_eq!(p.backoff(3), Duration::from_millis(400));
        assert_eq!(p.backoff(30), MAX_BACKOFF);
        let j = RetryPolicy { jitter: 0.5, ..p };
        for _ in 0..100 {
            let d = j.backoff(2);
            assert!(d >= Duration::from_millis(150) && d <= Duration::from_millis(250));
        }
    }

    #[test]
    fn config_errors_name_the_key() {
        let c = RedisConfig::default();
        let e = Connector::new("stores.R", &c).err().unwrap();
        assert!(e.message.contains("stores.R.redis_store.addresses"), "{e}");
        let c = RedisConfig {
            addresses: vec!["redis://a:1".into(), "redis://b:1".into()],
            ..Default::default()
        };
        let e = Connector::new("stores.R", &c).err().unwrap();
        assert!(e.message.contains("exactly one"), "{e}");
        let c = RedisConfig {
            addresses: vec!["nonsense://x".into()],
            ..Default::default()
        };
        let e = Connector::new("stores.R", &c).err().unwrap();
        assert!(e.message.contains("addresses[0]"), "{e}");
    }
}
