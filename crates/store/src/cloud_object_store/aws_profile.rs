//! The AWS shared configuration files, for the `aws` provider and the S3-compatible ones:
//! `~/.aws/credentials` (or `AWS_SHARED_CREDENTIALS_FILE`) and `~/.aws/config` (or
//! `AWS_CONFIG_FILE`), profile `AWS_PROFILE` (or `default`), read as the AWS SDKs read them.
//!
//! Used only when the environment has no `AWS_ACCESS_KEY_ID` (the SDKs' order: environment
//! variables, then the profile, then web identity and instance metadata, which
//! `object_store` covers). Static keys are read (`aws_access_key_id`,
//! `aws_secret_access_key`, `aws_session_token`), and the profile's `region`; a
//! `credential_process` is run for its credentials ([`super::aws_process`]). A profile that
//! gets its credentials another way (`role_arn`, `sso_*`, `web_identity_token_file`) is
//! refused with a message that says so, rather than silently falling through to instance
//! metadata. A missing file or profile is no error unless
//! `AWS_PROFILE` names it.

use std::collections::BTreeMap;
use std::path::PathBuf;

/// What a profile gives.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Profile {
    pub credentials: Option<Credentials>,
    /// `credential_process`: the command line, and where it was read.
    pub process: Option<(String, String)>,
    pub region: Option<String>,
}

#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: Option<String>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret or the token.
        f.debug_struct("Credentials")
            .field("access_key_id", &self.access_key_id)
            .finish_non_exhaustive()
    }
}

/// Keys of a profile that obtain credentials in ways this reader does not.
const UNSUPPORTED: [&str; 5] = [
    "role_arn",
    "sso_session",
    "sso_start_url",
    "sso_account_id",
    "web_identity_token_file",
];

/// The profile the environment selects, read from its files; `None` when the environment has
/// its own keys, or no file holds the default profile. `env` looks up a variable.
pub fn from_environment(env: &dyn Fn(&str) -> Option<String>) -> Result<Option<Profile>, String> {
    let set = |k: &str| env(k).filter(|v| !v.is_empty());
    if set("AWS_ACCESS_KEY_ID").is_some() {
        return Ok(None);
    }
    let home = set("HOME").map(PathBuf::from);
    let file = |var: &str, name: &str| {
        set(var)
            .map(PathBuf::from)
            .or_else(|| home.as_ref().map(|h| h.join(".aws").join(name)))
    };
    let credentials_file = file("AWS_SHARED_CREDENTIALS_FILE", "credentials");
    let config_file = file("AWS_CONFIG_FILE", "config");
    let chosen = set("AWS_PROFILE");
    let name = chosen.clone().unwrap_or_else(|| "default".to_string());

    let read = |path: &Option<PathBuf>| -> Result<Option<(PathBuf, String)>, String> {
        let Some(path) = path else { return Ok(None) };
        match std::fs::read_to_string(path) {
            Ok(text) => Ok(Some((path.clone(), text))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("reading {}: {e}", path.display())),
        }
    };
    let from_credentials =
        read(&credentials_file)?.and_then(|(path, text)| section(&text, &name).map(|s| (path, s)));
    // In the config file a profile other than `default` is `[profile NAME]`.
    let config_section = if name == "default" {
        "default".to_string()
    } else {
        format!("profile {name}")
    };
    let from_config = read(&config_file)?
        .and_then(|(path, text)| section(&text, &config_section).map(|s| (path, s)));

    if from_credentials.is_none() && from_config.is_none() {
        return match chosen {
            Some(_) => Err(format!(
                "AWS_PROFILE {name:?}: no such profile in {} or {}",
                shown(&credentials_file),
                shown(&config_file)
            )),
            None => Ok(None),
        };
    }
    // Keys of the credentials file win over those of the config file.
    let mut keys = BTreeMap::new();
    let mut from = Vec::new();
    for (path, s) in [from_config, from_credentials].into_iter().flatten() {
        from.push(path.display().to_string());
        keys.extend(s);
    }
    let from = from.join(" and ");
    let credentials = match (
        keys.get("aws_access_key_id"),
        keys.get("aws_secret_access_key"),
    ) {
        (Some(id), Some(secret)) => Some(Credentials {
            access_key_id: id.clone(),
            secret_access_key: secret.clone(),
            session_token: keys.get("aws_session_token").cloned(),
        }),
        (Some(_), None) => {
            return Err(format!(
                "profile {name:?} in {from} has aws_access_key_id but no aws_secret_access_key"
            ))
        }
        (None, Some(_)) => {
            return Err(format!(
                "profile {name:?} in {from} has aws_secret_access_key but no aws_access_key_id"
            ))
        }
        (None, None) if keys.contains_key("credential_process") => None,
        (None, None) => {
            if let Some(k) = UNSUPPORTED.iter().find(|k| keys.contains_key(**k)) {
                return Err(format!(
                    "profile {name:?} in {from} gets its credentials through `{k}`, which Cairn \
                     does not read; give the profile aws_access_key_id and \
                     aws_secret_access_key, or use AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, \
                     web identity (AWS_WEB_IDENTITY_TOKEN_FILE, AWS_ROLE_ARN) or instance \
                     metadata"
                ));
            }
            None
        }
    };
    let process = match keys.get("credential_process") {
        Some(c) if credentials.is_none() => {
            if c.trim().is_empty() {
                return Err(format!(
                    "profile {name:?} in {from}: credential_process is empty"
                ));
            }
            Some((c.clone(), format!("profile {name:?} in {from}")))
        }
        _ => None,
    };
    Ok(Some(Profile {
        credentials,
        process,
        region: keys.get("region").cloned(),
    }))
}

fn shown(path: &Option<PathBuf>) -> String {
    path.as_ref()
        .map_or("(no HOME)".to_string(), |p| p.display().to_string())
}

/// The `key = value` pairs of section `[name]` of an INI text as the AWS files write it:
/// `#` and `;` comments, names and keys trimmed, keys lowercased; indented lines (the nested
/// settings of a key such as `s3 =`) skipped. `None` when there is no such section.
fn section(text: &str, name: &str) -> Option<BTreeMap<String, String>> {
    let mut found = None;
    let mut current: Option<bool> = None;
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') || trimmed.starts_with(';') {
            continue;
        }
        if let Some(header) = trimmed.strip_prefix('[').and_then(|r| r.split(']').next()) {
            // `[profile  dev]` and `[ dev ]` name the same profile.
            let header = header.split_whitespace().collect::<Vec<_>>().join(" ");
            let is_it = header == name;
            if is_it {
                found.get_or_insert_with(BTreeMap::new);
            }
            current = Some(is_it);
            continue;
        }
        if current != Some(true) || line.starts_with([' ', '\t']) {
            continue;
        }
        if let Some((k, v)) = trimmed.split_once('=') {
            if let Some(map) = found.as_mut() {
                map.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
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
        let c = p.credentials.unwrap();
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
        let c = p.credentials.unwrap();
        assert_eq!(c.access_key_id, "AKCI");
        assert_eq!(c.session_token.as_deref(), Some("t2"));
        assert_eq!(p.region.as_deref(), Some("us-west-2"));
        assert!(
            !format!("{c:?}").contains("s2"),
            "the secret is never printed"
        );

        // The environment's own keys win: the files are not read.
        let none = from_environment(&env_of(vec![
            ("HOME", home),
            ("AWS_ACCESS_KEY_ID", "AKENV".into()),
        ]))
        .unwrap();
        assert_eq!(none, None);
    }

    #[test]
    fn files_named_by_the_environment_and_what_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let creds = write(
            dir.path(),
            "creds",
            "[default]\naws_access_key_id = AK\n[assume]\nrole_arn = arn:aws:iam::1:role/r\nsource_profile = default\n",
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
        let e = from_environment(&env(Some("assume"))).unwrap_err();
        assert!(e.contains("role_arn") && e.contains("\"assume\""), "{e}");
        let e = from_environment(&env(Some("nope"))).unwrap_err();
        assert!(e.contains("AWS_PROFILE \"nope\": no such profile"), "{e}");
        // No file and no AWS_PROFILE: nothing, and no error.
        let empty = tempfile::tempdir().unwrap();
        let home = empty.path().display().to_string();
        assert_eq!(
            from_environment(&env_of(vec![("HOME", home)])).unwrap(),
            None
        );
    }
}
