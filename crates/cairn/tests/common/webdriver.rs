//! A WebDriver client for the browser tests: Debian's `chromedriver` (package
//! `chromium-driver`) driving headless Chromium over the W3C WebDriver protocol. The protocol
//! is JSON over HTTP/1.1 on loopback and the tests use a dozen of its calls, so this is a
//! small blocking client over `std::net` rather than a client crate and its async stack.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// The key W3C WebDriver names an element reference with.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";
/// Longest a single WebDriver call may take (a page load included).
const CALL_DEADLINE: Duration = Duration::from_secs(60);

/// A `chromedriver` process on a free loopback port; killed on drop.
pub struct ChromeDriver {
    child: Child,
    port: u16,
}

impl ChromeDriver {
    /// Starts `chromedriver` and returns once it says it listens; panics when it is not
    /// installed (`scripts/test` installs Debian's `chromium-driver`) or does not start
    /// within 30 s.
    pub fn start() -> ChromeDriver {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect(
                "chromedriver is not installed (scripts/test installs Debian's chromium-driver)",
            );
        let stdout = child.stdout.take().unwrap();
        let (ready, on_ready) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.contains("started successfully") {
                    let _ = ready.send(());
                }
            }
        });
        if on_ready.recv_timeout(Duration::from_secs(30)).is_err() {
            let _ = child.kill();
            panic!("chromedriver did not say it started within 30 s");
        }
        ChromeDriver { child, port }
    }

    /// A new headless Chromium session with its profile in `profile`, 1280x1800.
    pub fn session(&self, profile: &Path) -> Session {
        let (status, v) = call(
            self.port,
            "POST",
            "/session",
            Some(json!({
                "capabilities": { "alwaysMatch": {
                    "browserName": "chrome",
                    "goog:chromeOptions": {
                        "binary": super::web_ui_build::chromium_binary(),
                        "args": [
                            "--headless",
                            // Root in CI containers: the sandbox needs user namespaces.
                            "--no-sandbox",
                            "--disable-gpu",
                            "--disable-dev-shm-usage",
                            "--no-first-run",
                            "--window-size=1280,1800",
                            format!("--user-data-dir={}", profile.display()),
                        ],
                    },
                } }
            })),
        );
        assert_eq!(status, 200, "new session: {v}");
        let id = v["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no sessionId in {v}"))
            .to_string();
        Session {
            port: self.port,
            id,
        }
    }
}

impl Drop for ChromeDriver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A page element found by a CSS selector.
#[derive(Debug, Clone)]
pub struct Element(String);

/// One browser session; ended on drop.
pub struct Session {
    port: u16,
    id: String,
}

impl Session {
    fn cmd(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        call(
            self.port,
            method,
            &format!("/session/{}{path}", self.id),
            body,
        )
    }

    fn ok(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let (status, v) = self.cmd(method, path, body);
        assert_eq!(status, 200, "{method} {path}: {v}");
        v["value"].clone()
    }

    /// Loads `url` (returns once the page has loaded).
    pub fn goto(&self, url: &str) {
        self.ok("POST", "/url", Some(json!({ "url": url })));
    }

    pub fn refresh(&self) {
        self.ok("POST", "/refresh", Some(json!({})));
    }

    /// The address of the page shown.
    pub fn url(&self) -> String {
        self.ok("GET", "/url", None)
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// The address of the page shown once it satisfies `arrived` (a click that submits a form
    /// or follows a link may return before the navigation it starts is over), or the last one
    /// after 10 s.
    pub fn url_after_navigation(&self, arrived: impl Fn(&str) -> bool) -> String {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let url = self.url();
            if arrived(&url) || std::time::Instant::now() >= deadline {
                return url;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// The page's DOM, serialised.
    pub fn source(&self) -> String {
        self.ok("GET", "/source", None)
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// The first element `css` selects, or `None`.
    pub fn find(&self, css: &str) -> Option<Element> {
        let (status, v) = self.cmd(
            "POST",
            "/element",
            Some(json!({ "using": "css selector", "value": css })),
        );
        if status == 404 && v["value"]["error"] == "no such element" {
            return None;
        }
        assert_eq!(status, 200, "find {css:?}: {v}");
        Some(Element(
            v["value"][ELEMENT]
                .as_str()
                .unwrap_or_else(|| panic!("no element reference in {v}"))
                .to_string(),
        ))
    }

    pub fn click(&self, e: &Element) {
        self.ok("POST", &format!("/element/{}/click", e.0), Some(json!({})));
    }

    /// Types `text` into `e`.
    pub fn type_text(&self, e: &Element, text: &str) {
        self.ok(
            "POST",
            &format!("/element/{}/value", e.0),
            Some(json!({ "text": text })),
        );
    }

    /// The element's rendered text.
    pub fn text(&self, e: &Element) -> String {
        self.ok("GET", &format!("/element/{}/text", e.0), None)
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// Saves a PNG screenshot of the window at `path`.
    pub fn screenshot(&self, path: &Path) {
        use base64::Engine;
        let b64 = self.ok("GET", "/screenshot", None);
        let png = base64::engine::general_purpose::STANDARD
            .decode(b64.as_str().unwrap_or_default())
            .expect("the screenshot is base64");
        assert!(png.starts_with(b"\x89PNG"), "the screenshot is not a PNG");
        std::fs::write(path, png).unwrap();
    }

    /// Runs `script` in the page (WebDriver's Execute Script; the page's own policy does
    /// not apply to it).
    pub fn execute(&self, script: &str) {
        self.ok(
            "POST",
            "/execute/sync",
            Some(json!({ "script": script, "args": [] })),
        );
    }

    /// Waits, without reloading, until `check` holds on the DOM (a navigation the page
    /// started itself), for at most `within`; the DOM.
    pub fn wait_until(&self, what: &str, within: Duration, check: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + within;
        loop {
            let dom = self.source();
            if check(&dom) {
                return dom;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: not seen within {within:?} on {}:\n{dom}",
                self.url()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Reloads the page until `check` holds on its DOM, for at most `within`; the DOM.
    pub fn reload_until(
        &self,
        what: &str,
        within: Duration,
        check: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = Instant::now() + within;
        loop {
            let dom = self.source();
            if check(&dom) {
                return dom;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: not seen within {within:?} on {}:\n{dom}",
                self.url()
            );
            std::thread::sleep(Duration::from_millis(200));
            self.refresh();
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = call(self.port, "DELETE", &format!("/session/{}", self.id), None);
    }
}

/// One WebDriver request: (HTTP status, JSON body).
fn call(port: u16, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to chromedriver");
    s.set_read_timeout(Some(CALL_DEADLINE)).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    // chromedriver may keep the connection open: read the head, then the body by its
    // Content-Length (or its chunks).
    let mut r = BufReader::new(s);
    let mut head = String::new();
    loop {
        let mut line = String::new();
        let n = r
            .read_line(&mut line)
            .unwrap_or_else(|e| panic!("{method} {path}: no answer from chromedriver: {e}"));
        if n == 0 || line == "\r\n" {
            break;
        }
        head.push_str(&line);
    }
    let lower = head.to_ascii_lowercase();
    let length = lower
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok());
    let mut content = Vec::new();
    if let Some(n) = length {
        content.resize(n, 0);
        r.read_exact(&mut content)
            .unwrap_or_else(|e| panic!("{method} {path}: answer cut short: {e}"));
    } else if lower.contains("transfer-encoding: chunked") {
        loop {
            let mut size = String::new();
            r.read_line(&mut size).unwrap();
            let n = usize::from_str_radix(size.trim().split(';').next().unwrap_or("0"), 16)
                .unwrap_or(0);
            let mut chunk = vec![0; n + 2];
            r.read_exact(&mut chunk).unwrap();
            if n == 0 {
                break;
            }
            content.extend_from_slice(&chunk[..n]);
        }
    } else {
        r.read_to_end(&mut content).unwrap();
    }
    let status: u16 = head[9..12].parse().unwrap();
    let value = serde_json::from_slice(&content).unwrap_or(Value::Null);
    (status, value)
}
