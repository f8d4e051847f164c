//! Test kit: start the real `cairn` binary on a loopback port and talk to it with tonic.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A running Cairn process; killed on drop.
pub struct Cairn {
    pub child: Child,
    pub addr: SocketAddr,
    pub dir: PathBuf,
    config: PathBuf,
}

impl Cairn {
    /// Starts `cairn run CONFIG` where CONFIG is `config_text` with `@DIR@` replaced by `dir`
    /// and `@ADDR@` by `127.0.0.1:0` (or `addr` when given, for restarts on the same port).
    pub fn start_with(dir: &Path, config_text: &str, addr: Option<SocketAddr>) -> Cairn {
        let listen = addr.map_or("127.0.0.1:0".to_string(), |a| a.to_string());
        let text = config_text
            .replace("@DIR@", &dir.display().to_string())
            .replace("@ADDR@", &listen);
        let config = dir.join("cairn.json5");
        std::fs::write(&config, text).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_cairn"))
            .arg("run")
            .arg(&config)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start cairn");
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let addr = loop {
            let line = lines
                .next()
                .expect("cairn exited before listening")
                .expect("read cairn stdout");
            if let Some(rest) = line.split(" listening on ").nth(1) {
                break rest.trim().parse().expect("address");
            }
        };
        // Keep draining stdout so the child never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Cairn {
            child,
            addr,
            dir: dir.to_path_buf(),
            config,
        }
    }

    /// Starts with the standard test config: memory CAS (verify on) and a completeness
    /// checking AC, instance names "" and "main".
    pub fn start(dir: &Path) -> Cairn {
        Cairn::start_with(dir, MEMORY_CONFIG, None)
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn channel(&self) -> tonic::transport::Channel {
        tonic::transport::Endpoint::from_shared(self.url())
            .unwrap()
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
            .expect("connect to cairn")
    }

    /// SIGTERM, then wait for the exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id() as i32;
        // SAFETY-free: `kill` is an external command here to avoid a libc dependency.
        Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status()
            .unwrap();
        let status = self.child.wait().unwrap();
        std::mem::forget(self);
        status
    }

    /// SIGKILL and reap.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::mem::forget(self);
    }

    pub fn config_path(&self) -> &Path {
        &self.config
    }
}

impl Drop for Cairn {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub const MEMORY_CONFIG: &str = r#"{
  stores: {
    CAS: { memory: { eviction_policy: { max_bytes: "512mb" } } },
    AC: { completeness_checking: { backend: { memory: {} }, cas_store: { ref_store: { name: "CAS" } } } },
  },
  servers: [{
    listener: { http: { socket_address: "@ADDR@" } },
    services: {
      cas: [{ instance_name: "", cas_store: "CAS" }, { instance_name: "main", cas_store: "CAS" }],
      ac: [{ instance_name: "", ac_store: "AC" }, { instance_name: "main", ac_store: "AC" }],
      bytestream: [{ instance_name: "", cas_store: "CAS" }, { instance_name: "main", cas_store: "CAS" }],
      capabilities: [{ instance_name: "" }, { instance_name: "main" }],
      health: {},
    },
  }],
}"#;

pub const FILESYSTEM_CONFIG: &str = r#"{
  stores: {
    CAS: { filesystem: { content_path: "@DIR@/cas", temp_path: "@DIR@/tmp", eviction_policy: { max_bytes: "2gb" } } },
    AC: { completeness_checking: { backend: { filesystem: { content_path: "@DIR@/ac", temp_path: "@DIR@/tmp-ac" } }, cas_store: { ref_store: { name: "CAS" } } } },
  },
  servers: [{
    listener: { http: { socket_address: "@ADDR@" } },
    services: {
      cas: [{ instance_name: "", cas_store: "CAS" }],
      ac: [{ instance_name: "", ac_store: "AC" }],
      bytestream: [{ instance_name: "", cas_store: "CAS" }],
      capabilities: [{ instance_name: "" }],
      health: {},
    },
  }],
}"#;

/// Deterministic pseudo-random bytes.
pub fn data(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
