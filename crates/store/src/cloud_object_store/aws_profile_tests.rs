//! The profile reader over files written by the tests: both files, named profiles, role chains,
//! web identity, what is refused, and mangled files.

use super::*;
fn env_of(pairs: Vec<(&'static str, String)>) -> impl Fn(&str) -> Option<String> {
    move |k| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone())
}

fn write(dir: &std::path::Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

#[test]
fn default_and_named_profiles_from_both_files() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join(".aws")).unwrap();
    write(
        &dir.path().join(".aws"),
        "credentials",
        "# keys\n[default]\naws_access_key_id = AKDEFAULT\naws_secret_access_key=s1\n\n\
         [ci]\nAWS_ACCESS_KEY_ID = AKCI\naws_secret_access_key = s2\naws_session_token = t2\n",
    );
    write(
        &dir.path().join(".aws"),
        "config",
        "[default]\nregion = eu-west-1\ns3 =\n  max_concurrent_requests = 20\n\
         [profile ci]\nregion = us-west-2\n",
    );
    let home = dir.path().display().to_string();
    let p = from_environment(&env_of(vec![("HOME", home.clone())]))
        .unwrap()
        .unwrap();
    let Some(Source::Static(c)) = p.source else {
        panic!("static keys expected")
    };
    assert_eq!(
        (c.access_key_id.as_str(), c.secret_access_key.as_str()),
        ("AKDEFAULT", "s1")
    );
    assert_eq!(c.session_token, None);
    assert_eq!(p.region.as_deref(), Some("eu-west-1"));

    let p = from_environment(&env_of(vec![
        ("HOME", home.clone()),
        ("AWS_PROFILE", "ci".into()),
    ]))
    .unwrap()
    .unwrap();
    let Some(Source::Static(c)) = p.source else {
        panic!("static keys expected")
    };
    assert_eq!(c.access_key_id, "AKCI");
    assert_eq!(c.session_token.as_deref(), Some("t2"));
    assert_eq!(p.region.as_deref(), Some("us-west-2"));
    assert!(
        !format!("{c:?}").contains("s2"),
        "the secret is never printed"
    );

    // The environment's own keys win; the profile's settings still apply.
    let p = from_environment(&env_of(vec![
        ("HOME", home),
        ("AWS_ACCESS_KEY_ID", "AKENV".into()),
    ]))
    .unwrap()
    .unwrap();
    assert_eq!(p.source, None);
    assert_eq!(p.region.as_deref(), Some("eu-west-1"));
}

#[test]
fn files_named_by_the_environment_and_what_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let creds = write(
        dir.path(),
        "creds",
        "[default]\naws_access_key_id = AK\n[assume]\nrole_arn = arn:aws:iam::1:role/r\nsource_profile = default\n\
         [sso]\nsso_start_url = https://x.awsapps.com/start\nsso_account_id = 1\n\
         [instance]\nrole_arn = arn:aws:iam::1:role/r\ncredential_source = Ec2InstanceMetadata\n\
         [both]\nrole_arn = arn:aws:iam::1:role/r\ncredential_source = Environment\nsource_profile = default\n\
         [alone]\nrole_arn = arn:aws:iam::1:role/r\n\
         [long]\nrole_arn = arn:aws:iam::1:role/r\nsource_profile = default\nduration_seconds = 60\n\
         [orphan]\nrole_arn = arn:aws:iam::1:role/r\nsource_profile = nowhere\n",
    );
    let env = |profile: Option<&str>| {
        let mut v = vec![
            ("AWS_SHARED_CREDENTIALS_FILE", creds.clone()),
            (
                "AWS_CONFIG_FILE",
                dir.path().join("absent").display().to_string(),
            ),
        ];
        if let Some(p) = profile {
            v.push(("AWS_PROFILE", p.to_string()));
        }
        env_of(v)
    };
    let e = from_environment(&env(None)).unwrap_err();
    assert!(
        e.contains("no aws_secret_access_key") && e.contains("creds"),
        "{e}"
    );
    // The role's source profile is the broken one: the message names it.
    let e = from_environment(&env(Some("assume"))).unwrap_err();
    assert!(
        e.contains("\"default\"") && e.contains("no aws_secret_access_key"),
        "{e}"
    );
    for (profile, says) in [
        ("sso", "sso_start_url` (IAM Identity Center)"),
        (
            "instance",
            "credential_source = Ec2InstanceMetadata is not read",
        ),
        ("both", "both source_profile and credential_source"),
        ("alone", "no source_profile, credential_source"),
        ("long", "duration_seconds \"60\""),
        (
            "orphan",
            "profile \"nowhere\" (the source_profile of profile \"orphan\"): no such profile",
        ),
        ("nope", "AWS_PROFILE \"nope\": no such profile"),
    ] {
        let e = from_environment(&env(Some(profile))).unwrap_err();
        assert!(e.contains(says), "{profile}: {e}");
        assert!(e.contains(&format!("\"{profile}\"")), "{profile}: {e}");
    }
    // No file and no AWS_PROFILE: nothing, and no error.
    let empty = tempfile::tempdir().unwrap();
    let home = empty.path().display().to_string();
    assert_eq!(
        from_environment(&env_of(vec![("HOME", home)])).unwrap(),
        None
    );
}

fn role(p: Option<Profile>) -> AssumeRole {
    match p.and_then(|p| p.source) {
        Some(Source::AssumeRole(r)) => *r,
        other => panic!("not a role: {other:?}"),
    }
}

#[test]
fn roles_chain_through_source_profiles_and_cycles_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let config = write(
        dir.path(),
        "config",
        "[profile base]\naws_access_key_id = AKBASE\naws_secret_access_key = s\n\
         [profile first]\nrole_arn = arn:aws:iam::1:role/first\nsource_profile = base\n\
         role_session_name = cairn\nexternal_id = ext\nduration_seconds = 1800\nregion = eu-west-1\n\
         endpoint_url = http://sts.example\n\
         [profile second]\nrole_arn = arn:aws:iam::1:role/second\nsource_profile = first\n\
         [profile self]\nrole_arn = arn:aws:iam::1:role/self\nsource_profile = self\n\
         aws_access_key_id = AKSELF\naws_secret_access_key = s\n\
         [profile proc]\ncredential_process = echo x\nrole_arn = arn:aws:iam::1:role/ignored\nsource_profile = base\n\
         [profile byproc]\nrole_arn = arn:aws:iam::1:role/p\nsource_profile = procsrc\n\
         [profile procsrc]\ncredential_process = echo x\n\
         [profile a]\nrole_arn = arn:aws:iam::1:role/a\nsource_profile = b\n\
         [profile b]\nrole_arn = arn:aws:iam::1:role/b\nsource_profile = a\n\
         [profile env]\nrole_arn = arn:aws:iam::1:role/env\ncredential_source = Environment\n\
         [profile web]\nrole_arn = arn:aws:iam::1:role/web\nweb_identity_token_file = /var/run/token\n\
         role_session_name = pod\n\
         [profile home]\nrole_arn = arn:aws:iam::1:role/h\nweb_identity_token_file = ~/token\n\
         [profile mfa]\nrole_arn = arn:aws:iam::1:role/m\nsource_profile = base\nmfa_serial = arn:aws:iam::1:mfa/me\n",
    );
    let env = |profile: &str, extra: Vec<(&'static str, String)>| {
        let mut v = vec![
            ("AWS_CONFIG_FILE", config.clone()),
            (
                "AWS_SHARED_CREDENTIALS_FILE",
                dir.path().join("absent").display().to_string(),
            ),
            ("AWS_PROFILE", profile.to_string()),
        ];
        v.extend(extra);
        env_of(v)
    };
    let second = role(from_environment(&env("second", vec![])).unwrap());
    assert_eq!(second.role_arn, "arn:aws:iam::1:role/second");
    assert_eq!(second.session_name, None);
    let Source::AssumeRole(first) = second.source else {
        panic!("second's source is the role first")
    };
    assert_eq!(
        (
            first.role_arn.as_str(),
            first.session_name.as_deref(),
            first.external_id.as_deref(),
            first.duration_seconds,
            first.region.as_deref(),
            first.endpoint_url.as_deref()
        ),
        (
            "arn:aws:iam::1:role/first",
            Some("cairn"),
            Some("ext"),
            Some(1800),
            Some("eu-west-1"),
            Some("http://sts.example")
        )
    );
    assert!(first.from.contains("profile \"first\" in") && first.from.contains("config"));
    assert!(
        matches!(&first.source, Source::Static(c) if c.access_key_id == "AKBASE"),
        "{:?}",
        first.source
    );
    // A role profile that is its own source uses its own keys to assume its role.
    let own = role(from_environment(&env("self", vec![])).unwrap());
    assert!(matches!(&own.source, Source::Static(c) if c.access_key_id == "AKSELF"));
    // A role whose source runs a command.
    let byproc = role(from_environment(&env("byproc", vec![])).unwrap());
    assert!(matches!(&byproc.source, Source::Process { command, .. } if command == "echo x"));
    let e = from_environment(&env("a", vec![])).unwrap_err();
    assert!(
        e.contains("source_profile chain a -> b -> a is a cycle"),
        "{e}"
    );

    // credential_source = Environment: the environment's keys assume the role, even
    // though they are set (otherwise the profile would be useless).
    let keys = vec![
        ("AWS_ACCESS_KEY_ID", "AKENV".to_string()),
        ("AWS_SECRET_ACCESS_KEY", "s".to_string()),
    ];
    let env_role = role(from_environment(&env("env", keys.clone())).unwrap());
    assert!(matches!(&env_role.source, Source::Static(c) if c.access_key_id == "AKENV"));
    let e = from_environment(&env("env", vec![])).unwrap_err();
    assert!(e.contains("credential_source = Environment, but"), "{e}");
    // Another profile with the environment's keys set: the keys, as they are.
    let p = from_environment(&env("second", keys)).unwrap().unwrap();
    assert_eq!(p.source, None);

    let web = from_environment(&env("web", vec![])).unwrap().unwrap();
    let Some(Source::WebIdentity(w)) = web.source else {
        panic!("web identity expected")
    };
    assert_eq!(
        (
            w.token_file.to_str(),
            w.role_arn.as_str(),
            w.session_name.as_deref()
        ),
        (
            Some("/var/run/token"),
            "arn:aws:iam::1:role/web",
            Some("pod")
        )
    );
    let p = from_environment(&env("home", vec![("HOME", "/home/u".into())]))
        .unwrap()
        .unwrap();
    let Some(Source::WebIdentity(w)) = p.source else {
        panic!("web identity expected")
    };
    assert_eq!(w.token_file, PathBuf::from("/home/u/token"));
    let e = from_environment(&env("mfa", vec![])).unwrap_err();
    assert!(
        e.contains("profile \"mfa\"") && e.contains("mfa_serial"),
        "{e}"
    );
    assert_eq!(expand_home("~", Some("/h".as_ref())), PathBuf::from("/h"));
    assert_eq!(
        expand_home("~x/y", Some("/h".as_ref())),
        PathBuf::from("~x/y")
    );
    assert_eq!(expand_home("~/y", None), PathBuf::from("~/y"));
    // A role and a process in the profile named: the role, as in the SDKs.
    let p = from_environment(&env("proc", vec![])).unwrap().unwrap();
    assert!(
        matches!(p.source, Some(Source::AssumeRole(_))),
        "role_arn wins at the top"
    );
}

#[test]
fn the_environments_web_identity_comes_after_the_profile() {
    let dir = tempfile::tempdir().unwrap();
    let config = write(
        dir.path(),
        "config",
        "[default]\nregion = eu-central-1\nendpoint_url = http://local.test\n[profile keys]\naws_access_key_id = AK\naws_secret_access_key = s\n",
    );
    let env = |extra: Vec<(&'static str, String)>| {
        let mut v = vec![
            ("AWS_CONFIG_FILE", config.clone()),
            (
                "AWS_SHARED_CREDENTIALS_FILE",
                dir.path().join("absent").display().to_string(),
            ),
            ("AWS_WEB_IDENTITY_TOKEN_FILE", "/var/run/token".to_string()),
            ("AWS_ROLE_ARN", "arn:aws:iam::1:role/irsa".to_string()),
            ("AWS_ROLE_SESSION_NAME", "pod-1".to_string()),
        ];
        v.extend(extra);
        env_of(v)
    };
    let p = from_environment(&env(vec![])).unwrap().unwrap();
    assert_eq!(p.region.as_deref(), Some("eu-central-1"));
    let Some(Source::WebIdentity(w)) = p.source else {
        panic!("web identity expected")
    };
    assert_eq!(
        (
            w.role_arn.as_str(),
            w.session_name.as_deref(),
            w.endpoint_url.as_deref()
        ),
        (
            "arn:aws:iam::1:role/irsa",
            Some("pod-1"),
            Some("http://local.test")
        )
    );
    let p = from_environment(&env(vec![("AWS_PROFILE", "keys".into())]))
        .unwrap()
        .unwrap();
    assert!(matches!(p.source, Some(Source::Static(_))));
}

/// Mangled files (cut, bytes changed, brackets and `=` thrown in) never panic the reader.
#[test]
fn mangled_files_never_panic() {
    let text = "[default]\naws_access_key_id = AK\naws_secret_access_key = s\n\
                [profile r]\nrole_arn = arn\nsource_profile = default\nduration_seconds = 900\n\
                [profile c]\nrole_arn = arn\nsource_profile = r\n[profile w]\nrole_arn = a\n\
                web_identity_token_file = /t\n[profile e]\nrole_arn = a\ncredential_source = Environment\n";
    let inserts = [
        "[",
        "]",
        "=",
        "\n",
        "profile ",
        " r",
        "source_profile = c\n",
        "\u{e9}",
    ];
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for _ in 0..5_000 {
        let mut t: Vec<char> = text.chars().collect();
        for _ in 0..(next() % 4 + 1) {
            let at = (next() as usize) % (t.len() + 1);
            match next() % 3 {
                0 => t.truncate(at),
                1 if at < t.len() => t[at] = char::from(b' ' + (next() % 95) as u8),
                _ => {
                    let ins = inserts[(next() as usize) % inserts.len()];
                    t.splice(at..at, ins.chars());
                }
            }
        }
        let t: String = t.into_iter().collect();
        let files = Files {
            credentials: (Some(PathBuf::from("/c")), Some(t.clone())),
            config: (Some(PathBuf::from("/f")), Some(t)),
            home: None,
        };
        let keys = Credentials {
            access_key_id: "AK".into(),
            secret_access_key: "s".into(),
            session_token: None,
        };
        for name in ["default", "r", "c", "w", "e"] {
            let _ = resolve_top(&files, name, Some(&keys));
        }
    }
}
