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
#[path = "aws_profile_tests.rs"]
mod tests;
