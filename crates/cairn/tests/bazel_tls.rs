//! Bazel 4.2.3 against Cairn over `grpcs://`: server TLS with `--tls_certificate`, mTLS with
//! `--tls_client_certificate`/`--tls_client_key`, a client without a certificate refused, and
//! the server's certificate rotated under the running server and picked up by the next build.
//!
//! Debian's `bazel-bootstrap` has no ALPN in its JDK TLS path: it needs netty-tcnative, whose
//! JNI library is Debian's `libnetty-tcnative-jni` (`scripts/test` installs it). Bazel looks
//! for it as `libnetty_tcnative.so` on its own `java.library.path` (`/usr/share/bazel/`), and
//! Debian names it `libnetty-tcnative.so`; so the test copies it under Bazel's name into a
//! directory of its own (a copy, not a link: the library checks its own file name when it
//! loads) and adds that directory with `--host_jvm_args`, as
//! `docs/operations.md` tells users to. Without it Bazel stops at "Failed to init TLS
//! infrastructure: JDK provider does not support ALPN protocol". The certificates are made by
//! the test (`common::certs`).

mod common;

use common::bazel::{self, Bazel};
use common::certs::{write_atomically, Pki};
use common::Cairn;

fn config(tls: &str) -> String {
    format!(
        r#"{{
  stores: {{
    CAS: {{ memory: {{ eviction_policy: {{ max_bytes: "256mb" }} }} }},
    AC: {{ memory: {{ eviction_policy: {{ max_bytes: "16mb" }} }} }},
  }},
  servers: [{{
    listener: {{ http: {{ socket_address: "@ADDR@", tls: {tls} }} }},
    services: {{
      cas: [{{ instance_name: "", cas_store: "CAS" }}],
      ac: [{{ instance_name: "", ac_store: "AC" }}],
      bytestream: [{{ instance_name: "", cas_store: "CAS" }}],
      capabilities: [{{ instance_name: "" }}],
    }},
  }}],
}}"#
    )
}

#[test]
fn bazel_builds_over_grpcs_with_tls_and_mtls_and_follows_a_rotated_certificate() {
    let Some(program) = bazel::find_or_skip("bazel_tls") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"), "internal");
    let server = pki.issue("server", 10, true);
    let client = pki.issue("bazel-client", 11, false);
    let tls = format!(
        r#"{{ cert_file: "{}", key_file: "{}", client_ca_file: "{}" }}"#,
        server.cert.display(),
        server.key.display(),
        pki.ca.display()
    );
    let cairn_dir = tmp.path().join("cairn");
    std::fs::create_dir(&cairn_dir).unwrap();
    let cairn = Cairn::start_with(&cairn_dir, &config(&tls), None);
    let jni = tmp.path().join("jni");
    std::fs::create_dir(&jni).unwrap();
    let tcnative = std::path::Path::new("/usr/lib/x86_64-linux-gnu/jni/libnetty-tcnative.so");
    assert!(
        tcnative.exists(),
        "{} is missing: install Debian's libnetty-tcnative-jni, as scripts/test does",
        tcnative.display()
    );
    std::fs::copy(tcnative, jni.join("libnetty_tcnative.so")).unwrap();
    let bazel = Bazel::new(program, &tmp.path().join("bazel"), "bazel-workspace")
        .with_startup_args(&[format!(
            "--host_jvm_args=-Djava.library.path=/usr/share/bazel/:{}",
            jni.display()
        )]);
    let cache = format!("grpcs://localhost:{}", cairn.addr.port());
    let flags = |ca: &std::path::Path, identity: bool| {
        let mut f = bazel.offline_flags();
        f.push(format!("--remote_cache={cache}"));
        f.push("--spawn_strategy=local".to_string());
        f.push(format!("--tls_certificate={}", ca.display()));
        if identity {
            f.push(format!(
                "--tls_client_certificate={}",
                client.cert.display()
            ));
            f.push(format!("--tls_client_key={}", client.key.display()));
        }
        f.push("//...".to_string());
        f
    };

    // Without a client certificate the server refuses the connection: Bazel's first call
    // fails and the build stops.
    let refused = bazel.try_run("build", &flags(&pki.ca, false), bazel::COMMAND_DEADLINE);
    assert!(
        !refused.status.success() && refused.stderr.contains("certificate required"),
        "a build without a client certificate was not refused for it:\n{}",
        refused.text()
    );

    // With one (mTLS), the build runs and uploads; after a clean, every action is a hit.
    let first = bazel.run("build", &flags(&pki.ca, true));
    let executed = first.all_processes_were("local");
    first.assert_no_remote_cache_warning();
    bazel.run("clean", &[]);
    let second = bazel.run("build", &flags(&pki.ca, true));
    assert_eq!(second.all_processes_were("remote cache hit"), executed);
    second.assert_no_remote_cache_warning();

    // The server's certificate and key are rotated in place to ones from a new CA: a build
    // that trusts only the new CA works, so the running server picked them up.
    let next = Pki::new(&tmp.path().join("pki-next"), "next");
    let rotated = next.issue("server-next", 20, true);
    write_atomically(&server.key, &std::fs::read(&rotated.key).unwrap());
    write_atomically(&server.cert, &std::fs::read(&rotated.cert).unwrap());
    bazel.run("clean", &[]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        // The reload is noticed on the server's own schedule; until then the old
        // certificate is served and Bazel (trusting only the new CA) cannot connect.
        let third = bazel.try_run("build", &flags(&next.ca, true), bazel::COMMAND_DEADLINE);
        if third.status.success() {
            assert_eq!(third.all_processes_were("remote cache hit"), executed);
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the rotated certificate was never served:\n{}",
            third.text()
        );
        bazel.run("clean", &[]);
    }

    // The report is the real one, downloaded over TLS.
    let report = std::fs::read_to_string(bazel.bin("report.txt")).unwrap();
    assert_eq!(report, "A CACHE THAT REMEMBERS\n23\nhello, cairn\n");
    drop(bazel);
    cairn.kill9();
}
