//! A throwaway PKI for TLS tests: a CA, certificates it issues (server and client), and
//! revocation lists, written as PEM files.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    RevokedCertParams, SerialNumber,
};

/// A certificate authority whose files live in `dir`.
pub struct Pki {
    dir: PathBuf,
    issuer: Issuer<'static, KeyPair>,
    /// `ca.crt` under `dir`.
    pub ca: PathBuf,
}

/// A certificate and its key, as files.
#[derive(Clone, Debug)]
pub struct Pair {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Pki {
    /// A new CA named `name`; its certificate is written to `dir/NAME-ca.crt`.
    pub fn new(dir: &Path, name: &str) -> Pki {
        std::fs::create_dir_all(dir).unwrap();
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} test CA"));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).unwrap();
        let ca = dir.join(format!("{name}-ca.crt"));
        std::fs::write(&ca, cert.pem()).unwrap();
        Pki {
            dir: dir.to_path_buf(),
            issuer: Issuer::new(params, key),
            ca,
        }
    }

    /// Issues a certificate for `name` with serial `serial`: a server certificate for
    /// `localhost` and 127.0.0.1 when `server`, else a client certificate. Written to
    /// `dir/NAME.crt` and `dir/NAME.key` (PKCS#8, which Bazel's Netty also reads).
    pub fn issue(&self, name: &str, serial: u64, server: bool) -> Pair {
        let sans = if server {
            vec!["localhost".to_string(), "127.0.0.1".to_string()]
        } else {
            vec![format!("{name}.clients.test")]
        };
        self.issue_for(name, serial, server, sans)
    }

    /// As [`Pki::issue`], for the names `sans`.
    pub fn issue_for(&self, name: &str, serial: u64, server: bool, sans: Vec<String>) -> Pair {
        let mut params = CertificateParams::new(sans).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.serial_number = Some(SerialNumber::from(serial));
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![if server {
            ExtendedKeyUsagePurpose::ServerAuth
        } else {
            ExtendedKeyUsagePurpose::ClientAuth
        }];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let pair = Pair {
            cert: self.dir.join(format!("{name}.crt")),
            key: self.dir.join(format!("{name}.key")),
        };
        // Key first: a reader that sees the new certificate also finds its key.
        write_atomically(&pair.key, key.serialize_pem().as_bytes());
        write_atomically(&pair.cert, cert.pem().as_bytes());
        pair
    }

    /// A CRL of this CA revoking `serials`, written to `dir/NAME.crl`.
    pub fn crl(&self, name: &str, serials: &[u64]) -> PathBuf {
        let now = time::OffsetDateTime::now_utc();
        let params = CertificateRevocationListParams {
            this_update: now - time::Duration::minutes(1),
            next_update: now + time::Duration::days(1),
            crl_number: SerialNumber::from(1u64),
            issuing_distribution_point: None,
            revoked_certs: serials
                .iter()
                .map(|s| RevokedCertParams {
                    serial_number: SerialNumber::from(*s),
                    revocation_time: now - time::Duration::minutes(1),
                    reason_code: None,
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        let crl = params.signed_by(&self.issuer).unwrap();
        let path = self.dir.join(format!("{name}.crl"));
        write_atomically(&path, crl.pem().unwrap().as_bytes());
        path
    }
}

/// Writes through a temporary file and a rename, as cert-manager's atomic writer does.
pub fn write_atomically(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("tmp-write");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// The two Secrets of `deployment-examples/kubernetes/tls/certificate.yaml` as cert-manager
/// writes them (`ca.crt`, `tls.crt`, `tls.key`), under `root`: the scheduler's worker API
/// certificate (for 127.0.0.1 and localhost) and a worker's client certificate, one CA.
/// Returns (scheduler's directory, worker's directory).
pub fn cert_manager_secrets(root: &Path) -> (PathBuf, PathBuf) {
    let pki = Pki::new(&root.join("ca"), "internal");
    let secret = |name: &str, serial: u64, server: bool| {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let pair = pki.issue(name, serial, server);
        std::fs::copy(&pair.cert, dir.join("tls.crt")).unwrap();
        std::fs::copy(&pair.key, dir.join("tls.key")).unwrap();
        std::fs::copy(&pki.ca, dir.join("ca.crt")).unwrap();
        dir
    };
    (
        secret("nativelink-scheduler-worker-api-tls", 1, true),
        secret("nativelink-worker-tls", 2, false),
    )
}

/// The files `deployment-examples/split/` reads from `CAIRN_TLS_DIR`, under `root/tls`: one
/// CA (`ca.crt`), the scheduler's worker API certificate (`scheduler.crt`, `scheduler.key`, for
/// 127.0.0.1 and localhost) and a worker's client certificate (`worker.crt`, `worker.key`).
pub fn split_tls_dir(root: &Path) -> PathBuf {
    let tls = root.join("tls");
    let pki = Pki::new(&tls, "cairn");
    std::fs::copy(&pki.ca, tls.join("ca.crt")).unwrap();
    pki.issue("scheduler", 1, true);
    pki.issue("worker", 2, false);
    tls
}

/// The `tls` block of a worker API listener that admits the workers of [`split_tls_dir`].
pub fn worker_api_tls(tls: &Path) -> String {
    format!(
        r#"{{ cert_file: "{0}/scheduler.crt", key_file: "{0}/scheduler.key", client_ca_file: "{0}/ca.crt" }}"#,
        tls.display()
    )
}
