//! Test kit: a network namespace joined to the test's own namespace by one veth pair, for
//! partition tests. The pair carries a private /30 (`10.200-249.x.y`): the host end in the
//! test's namespace, the other end in the new one; nothing is routed beyond the pair, so a
//! process in the namespace reaches only what listens on the host end's address (and its own
//! loopback), and nothing outside the machine reaches it. [`NetNs::cut`] sets the host end
//! down (a partition: packets are dropped, no connection is closed or refused),
//! [`NetNs::heal`] sets it up again.
//!
//! Needs root and `ip` (iproute2, which `scripts/test` installs). Names are unique per test
//! process and namespace (`cairn-PID-N`, links `cnPIDhN`/`cnPIDpN`); the namespace and the
//! links go on drop, on a panic too, and a run that was killed before its drop leaves names
//! whose PID is dead: the next run removes them.
#![allow(dead_code)]

use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

/// One namespace and its veth pair.
pub struct NetNs {
    /// The namespace's name (`ip netns exec NAME ...`).
    pub name: String,
    /// The veth end in the test's namespace.
    host_link: String,
    /// The address of the host end: what the namespace reaches.
    pub host_ip: Ipv4Addr,
    /// The address of the end inside the namespace.
    pub ns_ip: Ipv4Addr,
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Runs `ip ARGS`; panics with its stderr when it fails.
fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run `ip` (iproute2; scripts/test installs it): {e}"));
    assert!(
        out.status.success(),
        "`ip {}` failed ({}): {} (partition tests need root)",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

/// `ip ARGS`, whatever it answers (clean-up).
fn ip_quiet(args: &[&str]) {
    let _ = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Removes the namespaces and links that a killed earlier run of any test left behind.
fn remove_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        let Some((pid, n)) = name
            .strip_prefix("cairn-")
            .and_then(|rest| rest.split_once('-'))
        else {
            continue;
        };
        if pid.parse::<u32>().is_err() || std::path::Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        ip_quiet(&["link", "del", &format!("cn{pid}h{n}")]);
        ip_quiet(&["netns", "del", name]);
    }
}

/// Whether `addr` is already on an interface of this namespace.
fn in_use(addr: Ipv4Addr) -> bool {
    Command::new("ip")
        .args(["-o", "-4", "addr", "show"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(&format!(" {addr}/")))
        .unwrap_or(false)
}

impl NetNs {
    /// A new namespace with its loopback up and a veth pair to this one, both ends up.
    pub fn create() -> NetNs {
        remove_stale();
        let pid = std::process::id();
        let (n, host_ip, ns_ip) = loop {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let base = Ipv4Addr::new(
                10,
                200 + (pid % 50) as u8,
                ((pid / 50) % 256) as u8,
                ((n % 64) * 4) as u8,
            );
            let host_ip = Ipv4Addr::from(u32::from(base) + 1);
            let ns_ip = Ipv4Addr::from(u32::from(base) + 2);
            if !in_use(host_ip) {
                break (n, host_ip, ns_ip);
            }
            assert!(n < 64, "no free /30 for a test namespace");
        };
        let name = format!("cairn-{pid}-{n}");
        let host_link = format!("cn{pid}h{n}");
        let ns_link = format!("cn{pid}p{n}");
        // Built up step by step: whatever was made is removed by the drop if a step fails.
        let ns = NetNs {
            name: name.clone(),
            host_link: host_link.clone(),
            host_ip,
            ns_ip,
        };
        ip(&["netns", "add", &name]);
        ip(&[
            "link", "add", &host_link, "type", "veth", "peer", "name", &ns_link,
        ]);
        ip(&["link", "set", &ns_link, "netns", &name]);
        ip(&["addr", "add", &format!("{host_ip}/30"), "dev", &host_link]);
        ip(&["link", "set", &host_link, "up"]);
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        ip(&[
            "-n",
            &name,
            "addr",
            "add",
            &format!("{ns_ip}/30"),
            "dev",
            &ns_link,
        ]);
        ip(&["-n", &name, "link", "set", &ns_link, "up"]);
        ns
    }

    /// `program` to be run inside the namespace (`ip netns exec NAME program`; `ip` execs it,
    /// so the child's pid is the program's).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// Partitions the namespace from this one: the host end goes down.
    pub fn cut(&self) {
        ip(&["link", "set", &self.host_link, "down"]);
    }

    /// Joins them again.
    pub fn heal(&self) {
        ip(&["link", "set", &self.host_link, "up"]);
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Deleting one end of a veth pair deletes both; the namespace goes once the last
        // process in it exits.
        ip_quiet(&["link", "del", &self.host_link]);
        ip_quiet(&["netns", "del", &self.name]);
    }
}
