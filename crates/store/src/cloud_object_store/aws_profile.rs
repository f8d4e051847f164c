//! The AWS shared configuration files, for the `aws` provider and the S3-compatible ones:
//! `~/.aws/credentials` (or `AWS_SHARED_CREDENTIALS_FILE`) and `~/.aws/config` (or
//! `AWS_CONFIG_FILE`), profile `AWS_PROFILE` (or `default`), read as the AWS SDKs read them,
//! and the environment's web identity (`AWS_WEB_IDENTITY_TOKEN_FILE`, `AWS_ROLE_ARN`).
//!
//! The SDKs' order: the environment's keys (`AWS_ACCESS_KEY_ID`, which `object_store` reads),
//! then the profile, then the environment's web identity, then container and instance
//! metadata (`object_store`). A profile gives its credentials as
//! - static keys (`aws_access_key_id`, `aws_secret_access_key`, `aws_session_token`);
//! - a `credential_process` ([`super::aws_process`]);
//! - a role to assume through STS ([`super::aws_sts`]): `role_arn` with `source_profile`
//!   (another profile's credentials, itself possibly a role: a chain; a cycle is refused),
//!   with `credential_source = Environment` (the environment's keys), or with
//!   `web_identity_token_file`; and `role_session_name`, `external_id`, `duration_seconds`,
//!   `region`, `endpoint_url`.
//!
//! As in the SDKs, a profile that is another's `source_profile` and has static keys gives
//! those keys even when it names a role itself. `sso_*` profiles and the `credential_source`s
//! `Ec2InstanceMetadata` and `EcsContainer` are refused with a message that says so, rather
//! than silently falling through to instance metadata. A missing file or profile is no error
//! unless `AWS_PROFILE` names it.
//!
//! One departure from the SDKs: the environment's keys win over the profile, except when
//! `AWS_PROFILE` names a profile with `credential_source = Environment`, whose role is then
//! assumed with those keys (in the SDKs' default chain such a profile is never reached: with
//! the keys set they are used as they are, and without them it has no source).

use std::collections::BTreeMap;
use std::path::PathBuf;

/// What a profile or the environment gives.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Profile {
    /// How credentials are obtained; `None`: the profile has none (region only).
    pub source: Option<Source>,
    pub region: Option<String>,
    /// The profile's `endpoint_url`: S3's (and STS's) endpoint when no variable names one.
    pub endpoint_url: Option<String>,
    /// `profile "NAME" in FILE`, for messages; empty when no profile was read.
    pub from: String,
}

/// Where credentials come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// Keys written in a profile, or the environment's (`credential_source = Environment`).
    Static(Credentials),
    /// `credential_process`: the command line, and where it was read.
    Process { command: String, from: String },
    /// A role assumed with the credentials of `source` (STS `AssumeRole`).
    AssumeRole(Box<AssumeRole>),
    /// A role assumed with the token of a file (STS `AssumeRoleWithWebIdentity`).
    WebIdentity(WebIdentity),
}

/// The settings of a role profile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssumeRole {
    pub role_arn: String,
    pub session_name: Option<String>,
    pub external_id: Option<String>,
    pub duration_seconds: Option<u32>,
    /// The role profile's `region` and `endpoint_url`, for the STS endpoint.
    pub region: Option<String>,
    pub endpoint_url: Option<String>,
    pub source: Source,
    /// `profile "NAME" in FILE`, for messages.
    pub from: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebIdentity {
    pub token_file: PathBuf,
    pub role_arn: String,
    pub session_name: Option<String>,
    pub duration_seconds: Option<u32>,
    pub region: Option<String>,
    pub endpoint_url: Option<String>,
    /// `profile "NAME" in FILE` or `AWS_WEB_IDENTITY_TOKEN_FILE`, for messages.
    pub from: String,
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

/// Keys of a profile that obtain credentials through AWS IAM Identity Center, which this
/// reader does not.
const SSO: [&str; 3] = ["sso_session", "sso_start_url", "sso_account_id"];

/// The longest `source_profile` chain followed (the SDKs' limits are of this order).
const MAX_CHAIN: usize = 16;

/// The two files, read once.
struct Files {
    credentials: (Option<PathBuf>, Option<String>),
    config: (Option<PathBuf>, Option<String>),
    /// `HOME`, for paths written `~/...`.
    home: Option<PathBuf>,
}

impl Files {
    /// The keys of profile `name` from both files (the credentials file's win), and where
    /// they were read; `None` when neither file has it.
    fn profile(&self, name: &str) -> Option<(BTreeMap<String, String>, String)> {
        // In the config file a profile other than `default` is `[profile NAME]`.
        let config_section = if name == "default" {
            "default".to_string()
        } else {
            format!("profile {name}")
        };
        let found = [
            (&self.config, config_section.as_str()),
            (&self.credentials, name),
        ]
        .into_iter()
        .filter_map(|((path, text), section_name)| {
            let s = section(text.as_deref()?, section_name)?;
            Some((path.as_ref()?.display().to_string(), s))
        })
        .collect::<Vec<_>>();
        if found.is_empty() {
            return None;
        }
        let mut keys = BTreeMap::new();
        let mut from = Vec::new();
        for (path, s) in found {
            from.push(path);
            keys.extend(s);
        }
        Some((keys, format!("profile {name:?} in {}", from.join(" and "))))
    }
}

/// The credentials the environment selects beyond its own keys: the profile's, else the
/// environment's web identity. `None` when the environment has its own keys (and no
/// `credential_source = Environment` profile is named), or nothing applies. `env` looks up a
/// variable.
pub fn from_environment(env: &dyn Fn(&str) -> Option<String>) -> Result<Option<Profile>, String> {
    let set = |k: &str| env(k).filter(|v| !v.is_empty());
    let home = set("HOME").map(PathBuf::from);
    let file = |var: &str, name: &str| {
        set(var)
            .map(|p| expand_home(&p, home.as_deref()))
            .or_else(|| home.as_ref().map(|h| h.join(".aws").join(name)))
    };
    let read = |path: Option<PathBuf>| -> Result<(Option<PathBuf>, Option<String>), String> {
        let Some(path) = path else {
            return Ok((None, None));
        };
        match std::fs::read_to_string(&path) {
            Ok(text) => Ok((Some(path), Some(text))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok((Some(path), None)),
            Err(e) => Err(format!("reading {}: {e}", path.display())),
        }
    };
    let chosen = set("AWS_PROFILE");
    let name = chosen.clone().unwrap_or_else(|| "default".to_string());
    let env_keys = match (set("AWS_ACCESS_KEY_ID"), set("AWS_SECRET_ACCESS_KEY")) {
        (Some(access_key_id), Some(secret_access_key)) => Some(Credentials {
            access_key_id,
            secret_access_key,
            session_token: set("AWS_SESSION_TOKEN"),
        }),
        _ => None,
    };
    if set("AWS_ACCESS_KEY_ID").is_some() {
        // The environment's keys are used as they are, unless the profile AWS_PROFILE names
        // assumes a role with them; the profile's other settings still apply. The files are
        // optional here: what cannot be read is left out.
        let files = Files {
            credentials: read(file("AWS_SHARED_CREDENTIALS_FILE", "credentials"))
                .unwrap_or((None, None)),
            config: read(file("AWS_CONFIG_FILE", "config")).unwrap_or((None, None)),
            home: home.clone(),
        };
        let Some((keys, from)) = files.profile(&name) else {
            return Ok(None);
        };
        let uses_environment = chosen.is_some()
            && keys.contains_key("role_arn")
            && keys
                .get("credential_source")
                .is_some_and(|s| s == "Environment");
        if uses_environment {
            return resolve_top(&files, &name, env_keys.as_ref()).map(Some);
        }
        return Ok(Some(Profile {
            source: None,
            region: text_of(&keys, "region"),
            endpoint_url: text_of(&keys, "endpoint_url"),
            from,
        }));
    }
    let files = Files {
        credentials: read(file("AWS_SHARED_CREDENTIALS_FILE", "credentials"))?,
        config: read(file("AWS_CONFIG_FILE", "config"))?,
        home: home.clone(),
    };
    let mut profile = match files.profile(&name) {
        Some(_) => resolve_top(&files, &name, env_keys.as_ref())?,
        None if chosen.is_some() => {
            return Err(format!(
                "AWS_PROFILE {name:?}: no such profile in {} or {}",
                shown(&files.credentials.0),
                shown(&files.config.0)
            ))
        }
        None => Profile::default(),
    };
    if profile.source.is_none() {
        if let (Some(token_file), Some(role_arn)) =
            (set("AWS_WEB_IDENTITY_TOKEN_FILE"), set("AWS_ROLE_ARN"))
        {
            profile.source = Some(Source::WebIdentity(WebIdentity {
                token_file: expand_home(&token_file, home.as_deref()),
                role_arn,
                session_name: set("AWS_ROLE_SESSION_NAME"),
                duration_seconds: None,
                region: profile.region.clone(),
                endpoint_url: profile.endpoint_url.clone(),
                from: "AWS_WEB_IDENTITY_TOKEN_FILE and AWS_ROLE_ARN".into(),
            }));
        }
    }
    Ok((profile != Profile::default()).then_some(profile))
}

fn resolve_top(
    files: &Files,
    name: &str,
    env_keys: Option<&Credentials>,
) -> Result<Profile, String> {
    let (keys, from) = files.profile(name).unwrap_or_default();
    let mut visited = Vec::new();
    Ok(Profile {
        source: resolve(files, name, &mut visited, env_keys)?,
        region: text_of(&keys, "region"),
        endpoint_url: text_of(&keys, "endpoint_url"),
        from,
    })
}

/// A key's value, when set and not empty.
fn text_of(keys: &BTreeMap<String, String>, key: &str) -> Option<String> {
    keys.get(key).filter(|v| !v.is_empty()).cloned()
}

/// The credentials of profile `name`; `visited` holds the profiles whose `source_profile`
/// led here, first to last.
fn resolve(
    files: &Files,
    name: &str,
    visited: &mut Vec<String>,
    env_keys: Option<&Credentials>,
) -> Result<Option<Source>, String> {
    let Some((keys, from)) = files.profile(name) else {
        let by = visited.last().map_or(String::new(), |v| {
            format!(" (the source_profile of profile {v:?})")
        });
        return Err(format!(
            "profile {name:?}{by}: no such profile in {} or {}",
            shown(&files.credentials.0),
            shown(&files.config.0)
        ));
    };
    let text = |k: &str| keys.get(k).filter(|v| !v.is_empty()).cloned();
    let credentials = static_keys(&keys, &from)?;
    // A source profile's own keys win over its own role (the SDKs' rule), which also lets
    // a role profile name itself as its source.
    if !visited.is_empty() {
        if let Some(c) = credentials.clone() {
            return Ok(Some(Source::Static(c)));
        }
    }
    if visited.iter().any(|v| v == name) {
        let mut chain = visited.clone();
        chain.push(name.to_string());
        return Err(format!(
            "{from}: source_profile chain {} is a cycle",
            chain.join(" -> ")
        ));
    }
    if visited.len() >= MAX_CHAIN {
        return Err(format!(
            "{from}: source_profile chain longer than {MAX_CHAIN} profiles"
        ));
    }
    if let Some(role_arn) = text("role_arn") {
        if keys.contains_key("mfa_serial") {
            return Err(format!(
                "{from} has mfa_serial: its role needs a code typed by a person at each \
                 refresh, which a server cannot give; use a role without MFA"
            ));
        }
        let duration_seconds = match text("duration_seconds") {
            None => None,
            Some(d) => Some(
                d.parse::<u32>()
                    .ok()
                    .filter(|d| (900..=43_200).contains(d))
                    .ok_or_else(|| {
                        format!(
                            "{from}: duration_seconds {d:?} is not a number of seconds from 900 \
                             to 43200"
                        )
                    })?,
            ),
        };
        let session_name = text("role_session_name");
        let region = text("region");
        let endpoint_url = text("endpoint_url");
        if let Some(token_file) = text("web_identity_token_file") {
            return Ok(Some(Source::WebIdentity(WebIdentity {
                token_file: expand_home(&token_file, files.home.as_deref()),
                role_arn,
                session_name,
                duration_seconds,
                region,
                endpoint_url,
                from,
            })));
        }
        let source = match (text("source_profile"), text("credential_source")) {
            (Some(_), Some(_)) => {
                return Err(format!(
                    "{from} has both source_profile and credential_source; keep one"
                ))
            }
            (None, None) => {
                return Err(format!(
                    "{from} has role_arn but no source_profile, credential_source or \
                     web_identity_token_file to assume it with"
                ))
            }
            (Some(source), None) => {
                visited.push(name.to_string());
                match resolve(files, &source, visited, env_keys)? {
                    Some(s) => s,
                    None => {
                        return Err(format!(
                            "profile {source:?} (the source_profile of {from}) has no credentials"
                        ))
                    }
                }
            }
            (None, Some(c)) if c == "Environment" => match env_keys {
                Some(k) => Source::Static(k.clone()),
                None => {
                    return Err(format!(
                        "{from}: credential_source = Environment, but AWS_ACCESS_KEY_ID and \
                         AWS_SECRET_ACCESS_KEY are not both set"
                    ))
                }
            },
            (None, Some(c)) => {
                return Err(format!(
                    "{from}: credential_source = {c} is not read by Cairn (Environment is); \
                     use source_profile, credential_source = Environment, or leave the \
                     profile out so that instance or container metadata is used directly"
                ))
            }
        };
        return Ok(Some(Source::AssumeRole(Box::new(AssumeRole {
            role_arn,
            session_name,
            external_id: text("external_id"),
            duration_seconds,
            region,
            endpoint_url,
            source,
            from,
        }))));
    }
    if let Some(k) = SSO.iter().find(|k| keys.contains_key(**k)) {
        if credentials.is_none() && !keys.contains_key("credential_process") {
            return Err(format!(
                "{from} gets its credentials through `{k}` (IAM Identity Center), which Cairn \
                 does not read; give another profile `credential_process = aws configure \
                 export-credentials --profile {name} --format process` (AWS CLI v2), or use \
                 static keys, a role (role_arn), AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, \
                 web identity or instance metadata"
            ));
        }
    }
    if let Some(c) = credentials {
        return Ok(Some(Source::Static(c)));
    }
    if let Some(command) = keys.get("credential_process") {
        if command.trim().is_empty() {
            return Err(format!("{from}: credential_process is empty"));
        }
        return Ok(Some(Source::Process {
            command: command.clone(),
            from,
        }));
    }
    Ok(None)
}

fn static_keys(keys: &BTreeMap<String, String>, from: &str) -> Result<Option<Credentials>, String> {
    match (
        keys.get("aws_access_key_id"),
        keys.get("aws_secret_access_key"),
    ) {
        (Some(id), Some(secret)) => Ok(Some(Credentials {
            access_key_id: id.clone(),
            secret_access_key: secret.clone(),
            session_token: keys.get("aws_session_token").cloned(),
        })),
        (Some(_), None) => Err(format!(
            "{from} has aws_access_key_id but no aws_secret_access_key"
        )),
        (None, Some(_)) => Err(format!(
            "{from} has aws_secret_access_key but no aws_access_key_id"
        )),
        (None, None) => Ok(None),
    }
}

/// `~/rest` (or `~`) as a path under `home`, as the SDKs read the files' paths.
fn expand_home(path: &str, home: Option<&std::path::Path>) -> PathBuf {
    match (path.strip_prefix('~'), home) {
        (Some(rest), Some(home)) if rest.is_empty() || rest.starts_with('/') => {
            home.join(rest.trim_start_matches('/'))
        }
        _ => PathBuf::from(path),
    }
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
}
