//! A fault-injecting HTTP/1.1 proxy to put between Cairn and an emulator. Each client
//! connection carries one request (the proxy asks the backend for `Connection: close` and
//! passes that on), so every request meets its own fate:
//! - forwarded as it is;
//! - answered 500 or 503 by the proxy, or 429 (throttling);
//! - dropped: the connection closes without an answer;
//! - delayed, then forwarded;
//! - cut: forwarded, but the answer is cut off after its first few hundred bytes.
//!
//! `set_failure_percent` sets how many requests meet one of the faults (spread over them in
//! turn); `set_down(true)` makes every connection close at once, as a dead backend would;
//! `set_stalled(true)` makes the proxy read requests and never answer them;
//! `set_stall_bodies(true)` passes on the head of each answer and 100 bytes, then holds it.
//! Request bodies must have a `Content-Length` (object-store clients send one).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Default)]
struct State {
    failure_percent: AtomicU64,
    down: AtomicBool,
    stalled: AtomicBool,
    stall_bodies: AtomicBool,
    requests: AtomicU64,
    faults: AtomicU64,
    /// The access key ids of the requests' AWS signatures (`Credential=ID/...`).
    access_keys: std::sync::Mutex<std::collections::BTreeSet<String>>,
    /// `ID service` of the requests' AWS signatures (`Credential=ID/DATE/REGION/SERVICE/...`).
    signers: std::sync::Mutex<std::collections::BTreeSet<String>>,
    /// The `Action=` of form-encoded POST bodies (STS calls), in order.
    actions: std::sync::Mutex<Vec<String>>,
    /// The tokens of `Authorization: Bearer` headers (GCS, Azure), in order.
    bearers: std::sync::Mutex<Vec<String>>,
}

pub struct FaultProxy {
    pub addr: SocketAddr,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

const FAULTS: [Fault; 6] = [
    Fault::Status(503),
    Fault::Drop,
    Fault::Status(500),
    Fault::Delay,
    Fault::Cut,
    Fault::Status(429),
];

#[derive(Clone, Copy, Debug)]
enum Fault {
    Status(u16),
    Drop,
    Delay,
    Cut,
}

impl FaultProxy {
    /// Listens on a free loopback port and forwards to `backend`.
    pub async fn start(backend: SocketAddr) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State::default());
        let s = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                let s = s.clone();
                tokio::spawn(async move {
                    let _ = serve(client, backend, &s).await;
                });
            }
        });
        FaultProxy { addr, state, task }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set_failure_percent(&self, p: u64) {
        self.state.failure_percent.store(p, Ordering::SeqCst);
    }

    pub fn set_down(&self, down: bool) {
        self.state.down.store(down, Ordering::SeqCst);
    }

    pub fn set_stall_bodies(&self, stall: bool) {
        self.state.stall_bodies.store(stall, Ordering::SeqCst);
    }

    pub fn set_stalled(&self, stalled: bool) {
        self.state.stalled.store(stalled, Ordering::SeqCst);
    }

    /// The access key ids that signed the requests seen (AWS Signature V4), sorted.
    pub fn access_key_ids(&self) -> Vec<String> {
        let keys = self.state.access_keys.lock().unwrap();
        keys.iter().cloned().collect()
    }

    /// `ID service` of the AWS signatures seen (`AKID s3`, `AKID sts`), sorted.
    pub fn signers(&self) -> Vec<String> {
        let signers = self.state.signers.lock().unwrap();
        signers.iter().cloned().collect()
    }

    /// The bearer tokens of the requests seen, in order.
    pub fn bearers(&self) -> Vec<String> {
        self.state.bearers.lock().unwrap().clone()
    }

    /// The actions of the form-encoded calls seen (`AssumeRole`), in order.
    pub fn actions(&self) -> Vec<String> {
        self.state.actions.lock().unwrap().clone()
    }

    /// Requests seen, and how many of them met a fault.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.state.requests.load(Ordering::SeqCst),
            self.state.faults.load(Ordering::SeqCst),
        )
    }
}

/// A deterministic spread: request `n` fails when its scrambled number falls under the
/// percentage.
fn fate(n: u64, percent: u64) -> Option<Fault> {
    let mut x = n.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x ^= x >> 31;
    if x % 100 < percent {
        Some(FAULTS[(x / 100 % FAULTS.len() as u64) as usize])
    } else {
        None
    }
}

/// Reads one HTTP/1.1 request from `conn`: its head (up to and with the blank line; at most
/// 1 MiB) and its body (`Content-Length` bytes). `None` when the connection ends first.
pub async fn read_request(conn: &mut TcpStream) -> std::io::Result<Option<(String, Vec<u8>)>> {
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let head_end = loop {
        let n = conn.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > 1 << 20 {
            return Ok(None);
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let length: usize = header(&head, "content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    while buf.len() < head_end + length {
        let n = conn.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok(Some((head, buf.split_off(head_end))))
}

/// The value of the header `name` (any case) in a request's `head`, trimmed.
pub fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

async fn serve(mut client: TcpStream, backend: SocketAddr, s: &State) -> std::io::Result<()> {
    if s.down.load(Ordering::SeqCst) {
        return Ok(()); // closes at once
    }
    // The request head, then its body.
    let Some((head, body)) = read_request(&mut client).await? else {
        return Ok(());
    };
    let authorization = header(&head, "authorization");
    if let Some(id) = authorization.and_then(|v| {
        Some(
            v.split("Credential=")
                .nth(1)?
                .split('/')
                .next()?
                .to_string(),
        )
    }) {
        s.access_keys.lock().unwrap().insert(id);
    }
    if let Some(token) = authorization.and_then(|v| v.strip_prefix("Bearer ")) {
        s.bearers.lock().unwrap().push(token.to_string());
    }
    if let Some(scope) = authorization.and_then(|v| {
        let fields: Vec<&str> = v.split("Credential=").nth(1)?.split('/').collect();
        Some(format!("{} {}", fields.first()?, fields.get(3)?))
    }) {
        s.signers.lock().unwrap().insert(scope);
    }
    let form = head
        .to_ascii_lowercase()
        .contains("content-type: application/x-www-form-urlencoded");
    if let Some(action) = form
        .then(|| String::from_utf8_lossy(&body).to_string())
        .and_then(|body| {
            body.split('&')
                .find_map(|p| p.strip_prefix("Action=").map(str::to_string))
        })
    {
        s.actions.lock().unwrap().push(action);
    }
    if s.stalled.load(Ordering::SeqCst) {
        // Holds the connection without a word until the client gives up.
        let _ = client.read(&mut [0u8; 1]).await;
        return Ok(());
    }
    let n = s.requests.fetch_add(1, Ordering::SeqCst);
    let fault = fate(n, s.failure_percent.load(Ordering::SeqCst));
    if fault.is_some() {
        s.faults.fetch_add(1, Ordering::SeqCst);
    }
    match fault {
        Some(Fault::Status(code)) => {
            let body = "injected fault";
            let answer = format!(
                "HTTP/1.1 {code} Injected\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            client.write_all(answer.as_bytes()).await?;
            return Ok(());
        }
        Some(Fault::Drop) => return Ok(()),
        Some(Fault::Delay) => tokio::time::sleep(Duration::from_millis(300)).await,
        _ => {}
    }
    // Forward with `Connection: close`, so the answer ends when the backend closes.
    let mut request: Vec<u8> = Vec::with_capacity(head.len() + body.len() + 32);
    for line in head.trim_end_matches("\r\n").split("\r\n") {
        let name = line.split(':').next().unwrap_or("").trim();
        if name.eq_ignore_ascii_case("connection") || name.eq_ignore_ascii_case("keep-alive") {
            continue;
        }
        request.extend_from_slice(line.as_bytes());
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"Connection: close\r\n\r\n");
    request.extend_from_slice(&body);
    let mut up = TcpStream::connect(backend).await?;
    up.write_all(&request).await?;
    // The answer's head gets `Connection: close` too, so the client never reuses this
    // connection; the rest is passed on as it comes.
    let mut answer = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let head_end = loop {
        let n = up.read(&mut chunk).await?;
        if n == 0 {
            return Ok(()); // the backend closed without a whole head: so does the proxy
        }
        answer.extend_from_slice(&chunk[..n]);
        if let Some(i) = answer.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&answer[..head_end - 4]).to_string();
    let mut out = Vec::with_capacity(answer.len() + 32);
    for line in head.split("\r\n") {
        let name = line.split(':').next().unwrap_or("").trim();
        if name.eq_ignore_ascii_case("connection") || name.eq_ignore_ascii_case("keep-alive") {
            continue;
        }
        out.extend_from_slice(line.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"Connection: close\r\n\r\n");
    let cut_at = out.len() + 100;
    out.extend_from_slice(&answer[head_end..]);
    let mut rest = out;
    let mut sent = 0;
    let stall = s.stall_bodies.load(Ordering::SeqCst);
    loop {
        if stall && sent + rest.len() > cut_at {
            client.write_all(&rest[..cut_at - sent]).await?;
            // Holds the rest until the client gives up.
            let _ = client.read(&mut [0u8; 1]).await;
            return Ok(());
        }
        if matches!(fault, Some(Fault::Cut)) && sent + rest.len() > cut_at {
            client.write_all(&rest[..cut_at - sent]).await?;
            return Ok(()); // cut mid-answer
        }
        client.write_all(&rest).await?;
        sent += rest.len();
        let n = up.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        rest = chunk[..n].to_vec();
    }
    client.shutdown().await
}
