//! STS against moto (`AssumeRole`, `AssumeRoleWithWebIdentity`) and against a loopback server
//! that answers what a broken or hostile STS might.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;
use crate::cloud_object_store::aws_process::ProcessCredentials;
use crate::cloud_object_store::tests::Moto;

fn static_source(key: &str) -> AwsCredentialProvider {
    Arc::new(object_store::StaticCredentialProvider::new(AwsCredential {
        key_id: key.into(),
        secret_key: "s".into(),
        token: None,
    }))
}

fn assume(source: AwsCredentialProvider, duration_seconds: Option<u32>) -> Call {
    Call::AssumeRole {
        source,
        role_arn: "arn:aws:iam::123456789012:role/cairn".into(),
        session_name: Some("test".into()),
        external_id: Some("ext-1".into()),
        duration_seconds,
    }
}

fn sts(call: Call, endpoint: String) -> StsCredentials {
    StsCredentials::new(
        call,
        endpoint,
        "us-east-1".into(),
        true,
        "profile \"role\" in /x/config".into(),
    )
    .unwrap()
}

#[test]
fn the_endpoint_is_picked_as_the_sdks_pick_it() {
    let env = |pairs: &'static [(&'static str, &'static str)]| {
        move |k: &str| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    };
    let all = env(&[
        ("AWS_ENDPOINT_URL_STS", "http://sts.local"),
        ("AWS_ENDPOINT_URL", "http://all.local"),
    ]);
    assert_eq!(
        endpoint(&all, Some("http://p"), "eu-west-1"),
        "http://sts.local"
    );
    let general = env(&[("AWS_ENDPOINT_URL", "http://all.local")]);
    assert_eq!(
        endpoint(&general, Some("http://p"), "eu-west-1"),
        "http://all.local"
    );
    let none = env(&[("AWS_ENDPOINT_URL_STS", "")]);
    assert_eq!(endpoint(&none, Some("http://p"), "eu-west-1"), "http://p");
    assert_eq!(
        endpoint(&none, None, "eu-west-1"),
        "https://sts.eu-west-1.amazonaws.com"
    );
    let e = StsCredentials::new(
        assume(static_source("AK"), None),
        "ftp://x".into(),
        "us-east-1".into(),
        true,
        "p".into(),
    )
    .unwrap_err();
    assert!(e.contains("not an http:// or https:// URL"), "{e}");
}

#[test]
fn answers_are_read_and_checked() {
    let ok = br#"<AssumeRoleResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/"><AssumeRoleResult><Credentials><AccessKeyId>ASIA1</AccessKeyId><SecretAccessKey>se+/cr&amp;et</SecretAccessKey><SessionToken>tok=</SessionToken><Expiration>2030-01-02T03:04:05.123Z</Expiration></Credentials></AssumeRoleResult></AssumeRoleResponse>"#;
    let (c, e) = Answer::parse(ok).unwrap().credentials().unwrap();
    assert_eq!(
        (c.key_id.as_str(), c.secret_key.as_str(), c.token.as_deref()),
        ("ASIA1", "se+/cr&et", Some("tok="))
    );
    assert_eq!(e.to_rfc3339(), "2030-01-02T03:04:05.123+00:00");
    for (bad, says) in [
        (&b"not xml"[..], "no XML element"),
        (b"", "no XML element"),
        (b"\xff\xfe<a/>", "not UTF-8"),
        (b"<a><b></a>", "</a>"),
        (
            b"<Credentials><AccessKeyId>A</AccessKeyId></Credentials>",
            "no SecretAccessKey",
        ),
        (
            b"<C><AccessKeyId>A</AccessKeyId><SecretAccessKey>s</SecretAccessKey><SessionToken>t</SessionToken><Expiration>soon</Expiration></C>",
            "not an RFC 3339 time",
        ),
        (
            b"<C><AccessKeyId>A B</AccessKeyId><SecretAccessKey>s</SecretAccessKey><SessionToken>t</SessionToken><Expiration>2030-01-02T03:04:05Z</Expiration></C>",
            "access key id is empty or not visible ASCII",
        ),
    ] {
        let e = Answer::parse(bad)
            .and_then(Answer::credentials)
            .unwrap_err();
        assert!(e.contains(says), "{:?}: {e}", String::from_utf8_lossy(bad));
    }
}

#[tokio::test]
async fn assume_role_on_moto_is_cached_until_near_expiry() {
    let moto = Moto::start().await;
    // 15 minutes: past the 5-minute margin, so kept.
    let p = sts(
        assume(static_source("AKIDSOURCE"), Some(900)),
        moto.endpoint(),
    );
    let c = p.get_credential().await.unwrap();
    assert!(c.key_id.starts_with("ASIA"), "{}", c.key_id);
    assert!(c.token.is_some());
    assert!(Arc::ptr_eq(&c, &p.get_credential().await.unwrap()));
    // 2 minutes: inside the margin, so called again at each use.
    let p = sts(
        assume(static_source("AKIDSOURCE"), Some(120)),
        moto.endpoint(),
    );
    let first = p.get_credential().await.unwrap();
    let second = p.get_credential().await.unwrap();
    assert_ne!(first.key_id, second.key_id);
}

#[tokio::test]
async fn web_identity_on_moto_reads_the_token_file_at_each_call() {
    let moto = Moto::start().await;
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "eyJhbGciOiJSUzI1NiJ9.e30.sig\n").unwrap();
    let p = sts(
        Call::WebIdentity {
            token_file: token.clone(),
            role_arn: "arn:aws:iam::123456789012:role/irsa".into(),
            session_name: None,
            // Inside the refresh margin: every use calls STS, reading the file again.
            duration_seconds: Some(120),
        },
        moto.endpoint(),
    );
    assert!(p.get_credential().await.unwrap().key_id.starts_with("ASIA"));
    std::fs::remove_file(&token).unwrap();
    let e = p.get_credential().await.unwrap_err().to_string();
    assert!(
        e.contains("AssumeRoleWithWebIdentity of role arn:aws:iam::123456789012:role/irsa")
            && e.contains("reading the web identity token file")
            && e.contains("profile \"role\" in /x/config"),
        "{e}"
    );
    std::fs::write(&token, "").unwrap();
    let e = p.get_credential().await.unwrap_err().to_string();
    assert!(e.contains("is empty"), "{e}");
    std::fs::write(&token, vec![b'a'; 100_000]).unwrap();
    let e = p.get_credential().await.unwrap_err().to_string();
    assert!(e.contains("longer than 65536 bytes"), "{e}");
    std::fs::write(&token, "rotated").unwrap();
    assert!(p.get_credential().await.unwrap().key_id.starts_with("ASIA"));
}

#[tokio::test]
async fn a_failing_source_fails_the_call_and_names_both() {
    let moto = Moto::start().await;
    let source = Arc::new(ProcessCredentials::new(
        "echo 'sso token expired' >&2; exit 2".into(),
        "profile \"base\" in /x/config".into(),
    ));
    let p = sts(assume(source, None), moto.endpoint());
    let e = p.get_credential().await.unwrap_err().to_string();
    assert!(
        e.contains("STS AssumeRole of role arn:aws:iam::123456789012:role/cairn")
            && e.contains("the source credentials")
            && e.contains("profile \"base\" in /x/config")
            && e.contains("sso token expired"),
        "{e}"
    );
}

/// A loopback server answering each connection with `answer` (after reading the request);
/// `None`: headers of a 200 and then nothing, never finishing.
async fn hostile(answer: Option<Vec<u8>>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let answer = answer.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                let _ = s.read(&mut buf).await;
                match answer {
                    Some(a) => {
                        let _ = s.write_all(&a).await;
                    }
                    None => {
                        let _ = s
                            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n<A")
                            .await;
                        std::future::pending::<()>().await;
                    }
                }
            });
        }
    });
    format!("http://{addr}")
}

fn http(status: &str, body: &[u8]) -> Vec<u8> {
    let mut a = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    a.extend_from_slice(body);
    a
}

#[tokio::test]
async fn hostile_answers_give_clear_errors() {
    let mut huge = b"<AssumeRoleResponse><Junk>".to_vec();
    huge.resize(1024 * 1024, b'x');
    let refused = br#"<ErrorResponse><Error><Type>Sender</Type><Code>AccessDenied</Code><Message>User is not authorized to perform: sts:AssumeRole</Message></Error></ErrorResponse>"#;
    for (answer, says) in [
        (
            Some(http("200 OK", b"garbage, not xml")),
            "the answer (200 OK) is not STS's XML: no XML element",
        ),
        (
            Some(http("200 OK", &huge)),
            "the answer (200 OK) is longer than 65536 bytes",
        ),
        (
            Some(http("403 Forbidden", refused)),
            "refused (403 Forbidden): AccessDenied: User is not authorized",
        ),
        (
            Some(http("500 Internal Server Error", b"\x00\x01")),
            "refused (500 Internal Server Error)",
        ),
        (
            Some(http("200 OK", b"<R><AccessKeyId>A</AccessKeyId></R>")),
            "the answer has no SecretAccessKey",
        ),
        (Some(b"not http at all\r\n\r\n".to_vec()), "STS AssumeRole"),
        (None, "no answer within 1s"),
    ] {
        let endpoint = hostile(answer).await;
        let mut p = sts(assume(static_source("AKIDSOURCE"), None), endpoint.clone());
        p.limit = Duration::from_secs(1);
        let e = p.get_credential().await.unwrap_err().to_string();
        assert!(
            e.contains(says) && e.contains(&endpoint) && e.contains("profile \"role\""),
            "{says}: {e}"
        );
    }
}

/// Mangled answers (cut short, bytes changed, markup and entities thrown in) never panic the
/// reader, and what it accepts is usable in headers.
#[test]
fn mangled_answers_never_panic() {
    let ok = br#"<AssumeRoleResponse><AssumeRoleResult><Credentials><AccessKeyId>ASIA1</AccessKeyId><SecretAccessKey>s&amp;t</SecretAccessKey><SessionToken>tok</SessionToken><Expiration>2030-01-02T03:04:05Z</Expiration></Credentials></AssumeRoleResult><Error><Code>C</Code><Message>m</Message></Error></AssumeRoleResponse>"#;
    let inserts: [&[u8]; 8] = [
        b"<",
        b">",
        b"&",
        b"&#0;",
        b"&#x110000;",
        b"<!--",
        b"]]>",
        b"\xff",
    ];
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut accepted = 0;
    for _ in 0..20_000 {
        let mut a = ok.to_vec();
        for _ in 0..(next() % 4 + 1) {
            let at = (next() as usize) % (a.len() + 1);
            match next() % 3 {
                0 => a.truncate(at),
                1 if at < a.len() => a[at] = next() as u8,
                _ => {
                    let ins = inserts[(next() as usize) % inserts.len()];
                    a.splice(at..at, ins.iter().copied());
                }
            }
        }
        if let Ok((c, _)) = Answer::parse(&a).and_then(Answer::credentials) {
            accepted += 1;
            header_safe(&c).unwrap();
            http::HeaderValue::from_str(c.token.as_deref().unwrap()).unwrap();
        }
    }
    assert!(accepted > 0, "some mangled answers are still whole");
}
