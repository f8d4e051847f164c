//! Test kit: real Redis processes from Debian's `redis-server`, `redis-sentinel` and
//! `redis-cli` (`scripts/test` installs them), each on a free loopback port with its files in
//! a temporary directory, killed on drop. One server, a master with a replica and three
//! sentinels, or a cluster of three masters with a replica each.
//!
//! Included with `#[path = "common/redis.rs"] mod redis_kit;` by the tests that use it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A free loopback port (see `common::free_addr`).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// Polls `check` every 50 ms until it holds or `limit` passes (then panics with `what`).
pub fn wait_until(what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !check() {
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?}: {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs `redis-cli -p PORT ARGS...` and returns its stdout (empty when it failed).
pub fn cli(port: u16, args: &[&str]) -> String {
    Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stderr(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// One `redis-server` (or `redis-sentinel`) process.
pub struct RedisServer {
    pub port: u16,
    pub dir: PathBuf,
    child: Option<Child>,
    args: Vec<String>,
    sentinel: bool,
}

impl RedisServer {
    /// A standalone server on a free port, data in `dir` (nothing saved to disk).
    pub fn start(dir: &Path) -> RedisServer {
        RedisServer::start_args(dir, free_port(), &[])
    }

    /// A server on `port` with extra arguments (`--replicaof`, `--cluster-enabled`...).
    pub fn start_args(dir: &Path, port: u16, extra: &[&str]) -> RedisServer {
        let dir = dir.join(format!("redis-{port}"));
        std::fs::create_dir_all(&dir).unwrap();
        let mut args: Vec<String> = [
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--dir",
            &dir.display().to_string(),
            "--save",
            "",
            "--appendonly",
            "no",
            "--protected-mode",
            "no",
            "--daemonize",
            "no",
            "--logfile",
            "redis.log",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut s = RedisServer {
            port,
            dir,
            child: None,
            args,
            sentinel: false,
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let program = if self.sentinel {
            "redis-sentinel"
        } else {
            "redis-server"
        };
        let child = Command::new(program)
            .args(&self.args)
            .current_dir(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("start {program} (scripts/test installs it): {e}"));
        self.child = Some(child);
        let port = self.port;
        wait_until(
            &format!("{program} on port {port} answers PING"),
            Duration::from_secs(20),
            || {
                // A server with a password answers NOAUTH: it is up too.
                let out = cli(port, &["PING"]);
                out.trim() == "PONG" || out.contains("NOAUTH")
            },
        );
    }

    /// A `redis-sentinel` on `port` (which the kit pings) with `conf` as its configuration
    /// file (written to its directory, where the sentinel rewrites it).
    pub fn start_sentinel(dir: &Path, port: u16, conf: &str) -> RedisServer {
        let sdir = dir.join(format!("sentinel-{port}"));
        std::fs::create_dir_all(&sdir).unwrap();
        let path = sdir.join("sentinel.conf");
        std::fs::write(
            &path,
            format!(
                "port {port}\nbind 127.0.0.1\nprotected-mode no\ndir {}\nlogfile sentinel.log\n{conf}",
                sdir.display()
            ),
        )
        .unwrap();
        let mut s = RedisServer {
            port,
            dir: sdir,
            child: None,
            args: vec![path.display().to_string()],
            sentinel: true,
        };
        s.spawn();
        s
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// SIGKILL; the port stays reserved for [`RedisServer::restart`].
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the process again on the same port with the same arguments.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    pub fn cli(&self, args: &[&str]) -> String {
        cli(self.port, args)
    }

    /// The `role` this server reports (`master`, `slave`), first line of ROLE.
    pub fn role(&self) -> String {
        self.cli(&["ROLE"])
            .lines()
            .next()
            .unwrap_or_default()
            .to_string()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A master, one replica and three sentinels watching it as `mymaster`, with a 1 s down
/// detection.
pub struct SentinelSet {
    pub master: RedisServer,
    pub replica: RedisServer,
    pub sentinels: Vec<RedisServer>,
}

pub const SENTINEL_SERVICE: &str = "mymaster";

impl SentinelSet {
    pub fn start(dir: &Path) -> SentinelSet {
        let master = RedisServer::start(dir);
        let replica = RedisServer::start_args(
            dir,
            free_port(),
            &["--replicaof", "127.0.0.1", &master.port.to_string()],
        );
        wait_until("the replica is in sync", Duration::from_secs(20), || {
            replica
                .cli(&["INFO", "replication"])
                .contains("master_link_status:up")
        });
        let mut sentinels = Vec::new();
        for _ in 0..3 {
            let port = free_port();
            let sdir = dir.join(format!("sentinel-{port}"));
            std::fs::create_dir_all(&sdir).unwrap();
            let conf = sdir.join("sentinel.conf");
            std::fs::write(
                &conf,
                format!(
                    "port {port}\nbind 127.0.0.1\nprotected-mode no\ndir {}\nlogfile sentinel.log\n\
                     sentinel monitor {SENTINEL_SERVICE} 127.0.0.1 {} 2\n\
                     sentinel down-after-milliseconds {SENTINEL_SERVICE} 1000\n\
                     sentinel failover-timeout {SENTINEL_SERVICE} 5000\n\
                     sentinel parallel-syncs {SENTINEL_SERVICE} 1\n",
                    sdir.display(),
                    master.port
                ),
            )
            .unwrap();
            let mut s = RedisServer {
                port,
                dir: sdir,
                child: None,
                args: vec![conf.display().to_string()],
                sentinel: true,
            };
            s.spawn();
            sentinels.push(s);
        }
        let set = SentinelSet {
            master,
            replica,
            sentinels,
        };
        wait_until(
            "the sentinels see each other and the replica",
            Duration::from_secs(30),
            || {
                set.sentinels.iter().all(|s| {
                    let info = s.cli(&["SENTINEL", "MASTER", SENTINEL_SERVICE]);
                    let lines: Vec<&str> = info.lines().collect();
                    let field = |name: &str| {
                        lines
                            .iter()
                            .position(|l| *l == name)
                            .and_then(|i| lines.get(i + 1))
                            .map(|v| v.to_string())
                            .unwrap_or_default()
                    };
                    field("num-other-sentinels") == "2" && field("num-slaves") == "1"
                })
            },
        );
        set
    }

    /// `redis+sentinel://` URLs of the three sentinels naming the service, as NativeLink
    /// writes them.
    pub fn urls(&self) -> Vec<String> {
        self.sentinels
            .iter()
            .map(|s| {
                format!(
                    "redis+sentinel://127.0.0.1:{}/?sentinelServiceName={SENTINEL_SERVICE}",
                    s.port
                )
            })
            .collect()
    }

    /// The port the sentinels name as master now.
    pub fn master_port(&self) -> Option<u16> {
        let out = self.sentinels[0].cli(&["SENTINEL", "GET-MASTER-ADDR-BY-NAME", SENTINEL_SERVICE]);
        out.lines().nth(1).and_then(|p| p.trim().parse().ok())
    }
}

/// Three masters with a replica each, slots spread by `redis-cli --cluster create`.
pub struct Cluster {
    pub nodes: Vec<RedisServer>,
}

impl Cluster {
    pub fn start(dir: &Path) -> Cluster {
        let nodes: Vec<RedisServer> = (0..6)
            .map(|_| {
                RedisServer::start_args(
                    dir,
                    free_port(),
                    &[
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        "nodes.conf",
                        "--cluster-node-timeout",
                        "1000",
                    ],
                )
            })
            .collect();
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .output()
            .expect("redis-cli --cluster create");
        assert!(
            out.status.success(),
            "redis-cli --cluster create: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let c = Cluster { nodes };
        c.wait_ok();
        c
    }

    /// Waits until every live node says `cluster_state:ok`.
    pub fn wait_ok(&self) {
        wait_until(
            "cluster_state:ok on every node",
            Duration::from_secs(30),
            || {
                self.nodes
                    .iter()
                    .filter(|n| n.child.is_some())
                    .all(|n| n.cli(&["CLUSTER", "INFO"]).contains("cluster_state:ok"))
            },
        );
    }

    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().take(3).map(|n| n.url()).collect()
    }

    /// Indexes of the nodes that are masters now.
    pub fn masters(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&i| self.nodes[i].child.is_some() && self.nodes[i].role() == "master")
            .collect()
    }
}

/// A TCP proxy on a free loopback port in front of `upstream` that breaks connections: each
/// chunk a client sends is, with probability `drop_per_mille / 1000`, answered by closing the
/// connection both ways instead of being forwarded. Runs on the caller's tokio runtime until
/// dropped. Counts the connections it broke.
pub struct FaultyProxy {
    pub port: u16,
    pub broken: std::sync::Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultyProxy {
    pub async fn start(upstream: u16, drop_per_mille: u32) -> FaultyProxy {
        use rand::Rng;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let broken = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counter = broken.clone();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                let counter = counter.clone();
                conns.spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                    else {
                        return;
                    };
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let down = async move {
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            let n = match cr.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => n,
                            };
                            if rand::thread_rng().gen_range(0..1000) < drop_per_mille {
                                counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                return;
                            }
                            if sw.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    };
                    let up = async move {
                        let _ = tokio::io::copy(&mut sr, &mut cw).await;
                    };
                    // Either side ending ends both (dropping the halves closes the sockets).
                    tokio::select! {
                        _ = down => {}
                        _ = up => {}
                    }
                });
            }
        });
        FaultyProxy { port, broken, task }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for FaultyProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
