//! The setup the browser tests share: a Cairn serving the web UI (its config with `@WPORT@`
//! for a worker API port chosen here), Bazel 4.2.3 on a copy of `bazel-webui-workspace/`
//! with remote execution and the Build Event Service pointed at that Cairn, and a directory
//! for the screenshots under `CARGO_TARGET_TMPDIR`.

use std::path::{Path, PathBuf};

use super::bazel::{self, Bazel};
use super::Cairn;

/// One browser test's Cairn, Bazel client and screenshot directory.
pub struct WebUiBuild {
    pub cairn: Cairn,
    pub bazel: Bazel,
    /// The worker API port (`@WPORT@` in the config).
    pub wport: u16,
    /// `http://ADDR`: the pages' base.
    pub base: String,
    /// Where screenshots go (`CARGO_TARGET_TMPDIR/<shots>`).
    pub shots: PathBuf,
    /// Holds `cairn/`, `bazel/` and whatever else the test puts there.
    pub tmp: tempfile::TempDir,
}

impl WebUiBuild {
    /// Starts Cairn on `config` and prepares Bazel; `None` when Bazel is missing and
    /// `CAIRN_SKIP_BAZEL=1` (the test returns, skipped).
    pub fn start(test: &str, config: &str, shots: &str) -> Option<WebUiBuild> {
        let program = bazel::find_or_skip(test)?;
        let tmp = tempfile::tempdir().unwrap();
        let cairn_dir = tmp.path().join("cairn");
        std::fs::create_dir_all(&cairn_dir).unwrap();
        let wport = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("bind 127.0.0.1:0")
            .port();
        let cairn = Cairn::start_with(
            &cairn_dir,
            &config.replace("@WPORT@", &wport.to_string()),
            None,
        );
        let shots = Path::new(env!("CARGO_TARGET_TMPDIR")).join(shots);
        std::fs::create_dir_all(&shots).unwrap();
        let bazel = Bazel::new(program, &tmp.path().join("bazel"), "bazel-webui-workspace");
        let base = format!("http://{}", cairn.addr);
        Some(WebUiBuild {
            cairn,
            bazel,
            wport,
            base,
            shots,
            tmp,
        })
    }

    /// Bazel's flags for a build that Cairn executes (`OSFamily=linux`) and whose events
    /// it receives, with `--bes_results_url` at the web UI's invocation pages.
    pub fn flags(&self) -> Vec<String> {
        let mut flags = self
            .bazel
            .remote_flags(self.cairn.addr, None, "OSFamily=linux");
        flags.extend([
            format!("--bes_backend=grpc://{}", self.cairn.addr),
            format!("--bes_results_url={}/invocation/", self.base),
            "--bes_timeout=60s".to_string(),
        ]);
        flags
    }

    /// The prefix of the links Bazel prints.
    pub fn link_prefix(&self) -> String {
        format!("{}/invocation/", self.base)
    }

    /// A fresh Chromium profile directory under the test's directory.
    pub fn profile(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }
}

/// Debian's Chromium binary; panics when it is not installed (`scripts/test` installs it).
pub fn chromium_binary() -> &'static str {
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("chromium is not installed (scripts/test installs Debian's chromium)")
}
