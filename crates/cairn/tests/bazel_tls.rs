//! Bazel 4.2.3 as the client of a TLS listener: `grpcs://` with `--tls_certificate` (the CA),
//! and under mTLS with `--tls_client_certificate`/`--tls_client_key`; a Bazel without a
//! client certificate is refused. The certificates are made by the test.
//!
//! Needs `bazel` on PATH (Debian's `bazel-bootstrap`); without it the test fails, unless
//! `CAIRN_SKIP_BAZEL=1` is set.

mod common;

use common::bazel::{self, Bazel};
use common::certs::Pki;
use common::Cairn;

const CONFIG: &str = r#"{
  stores: {
    CAS: { filesystem: { content_path: "@DIR@/cas", temp_path: "@DIR@/tmp", eviction_policy: { max_bytes: "2gb" } } },
    AC: { completeness_checking: { backend: { filesystem: { content_path: "@DIR@/ac", temp_path: "@DIR@/tmp-ac" } }, cas_store: { ref_store: { name: "CAS" } } } },
  },
  servers: [{
    listener: { http: { socket_address: "@ADDR@", tls: @TLS@ } },
    services: {
      cas: [{ instance_name: "", cas_store: "CAS" }],
      ac: [{ instance_name: "", ac_store: "AC" }],
      bytestream: [{ instance_name: "", cas_store: "CAS" }],
      capabilities: [{ instance_name: "" }],
    },
  }],
}"#;

#[test]
fn bazel_uses_cairn_over_tls_and_mtls() {
    let Some(program) = bazel::find_or_skip("bazel_tls") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"), "root");
    let server = pki.issue("server", 10, true);
    let client = pki.issue("bazel-client", 20, false);

    for (mode, tls) in [
        (
            "tls",
            format!(
                r#"{{ cert_file: "{}", key_file: "{}" }}"#,
                server.cert.display(),
                server.key.display()
            ),
        ),
        (
            "mtls",
            format!(
                r#"{{ cert_file: "{}", key_file: "{}", client_ca_file: "{}" }}"#,
                server.cert.display(),
                server.key.display(),
                pki.ca.display()
            ),
        ),
    ] {
        let dir = tmp.path().join(mode);
        let cairn_dir = dir.join("cairn");
        std::fs::create_dir_all(&cairn_dir).unwrap();
        let cairn = Cairn::start_with(&cairn_dir, &CONFIG.replace("@TLS@", &tls), None);
        let bazel = Bazel::new(program.clone(), &dir.join("bazel"), "bazel-workspace");

        let mut flags = bazel.offline_flags();
        flags.push(format!("--remote_cache=grpcs://{}", cairn.addr));
        flags.push(format!("--tls_certificate={}", pki.ca.display()));
        flags.push("--spawn_strategy=local".to_string());
        if mode == "mtls" {
            // Without a client certificate the server refuses the connection.
            let mut refused = flags.clone();
            refused.push("--remote_local_fallback=false".to_string());
            refused.push("//...".to_string());
            let out = bazel.try_run("build", &refused, bazel::COMMAND_DEADLINE);
            let text = out.text();
            assert!(
                !out.status.success() || text.contains("WARNING: Remote Cache"),
                "{mode}: Bazel without a client certificate was served\n{text}"
            );
            bazel.run("clean", &[]);
            flags.push(format!(
                "--tls_client_certificate={}",
                client.cert.display()
            ));
            flags.push(format!("--tls_client_key={}", client.key.display()));
        }
        flags.push("//...".to_string());

        let first = bazel.run("build", &flags);
        let executed = first.all_processes_were("local");
        first.assert_no_remote_cache_warning();
        bazel.run("clean", &[]);
        let second = bazel.run("build", &flags);
        assert_eq!(
            second.all_processes_were("remote cache hit"),
            executed,
            "{mode}: after `bazel clean`, every action should come from Cairn over TLS"
        );
        second.assert_no_remote_cache_warning();
        drop(bazel);
        cairn.kill9();
    }
}
