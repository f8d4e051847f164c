//! `additional_environment`: the variables the worker adds to each command's environment, and
//! the side channel file through which a command may report back.
//!
//! The variables come first and the Command's own after them, so a variable the action sets
//! wins (NativeLink's order). Values: a platform property of the action, a literal, the
//! worker's own variable, the action's timeout in milliseconds, the path of the side channel
//! file, or the path of a scratch directory of the action's own. The side channel file and the
//! scratch directory sit beside the action's input root (`<uuid>.side_channel`,
//! `<uuid>.action`) and are removed with it; the scratch directory is made only when a
//! variable names it.
//!
//! The side channel file is read (at most 64 KiB) when the command exits by itself. It may be
//! absent or empty; otherwise it is JSON (JSON5 accepted) with one optional key, `failure`,
//! whose one value, `"timeout"`, turns the action into a timeout: DEADLINE_EXCEEDED, its
//! result kept, as if the worker had killed it.

use std::path::Path;
use std::time::Duration;

use cairn_config::workers::EnvironmentSource;
use cairn_core::Error;
use serde::Deserialize;
use tokio::io::AsyncReadExt;

use crate::error::ActionError;

/// Largest side channel file read.
const SIDE_CHANNEL_MAX: u64 = 64 << 10;

/// What the variables of one run are made from.
pub(crate) struct RunFacts<'a> {
    pub platform: &'a [(String, String)],
    pub timeout: Duration,
    pub side_channel: &'a Path,
    pub action_directory: &'a Path,
}

/// The command's environment: the configured variables, then the Command's.
pub(crate) fn command_environment(
    configured: &[(String, EnvironmentSource)],
    facts: &RunFacts<'_>,
    command: &[(String, String)],
) -> Vec<(String, String)> {
    let mut env = Vec::with_capacity(configured.len() + command.len());
    for (name, source) in configured {
        let value = match source {
            EnvironmentSource::Property(p) => facts
                .platform
                .iter()
                .find(|(n, _)| n == p)
                .map(|(_, v)| v.clone())
                .unwrap_or_default(),
            EnvironmentSource::Value(v) => v.clone(),
            EnvironmentSource::FromEnvironment => std::env::var(name).unwrap_or_default(),
            EnvironmentSource::TimeoutMillis => facts.timeout.as_millis().to_string(),
            EnvironmentSource::SideChannelFile => facts.side_channel.display().to_string(),
            EnvironmentSource::ActionDirectory => facts.action_directory.display().to_string(),
        };
        env.push((name.clone(), value));
    }
    // The launcher keeps the last value of a name given twice.
    env.extend_from_slice(command);
    env
}

/// [`command_environment`], after making the scratch directory when a variable names it.
pub(crate) async fn prepare(
    configured: &[(String, EnvironmentSource)],
    facts: &RunFacts<'_>,
    command: &[(String, String)],
) -> Result<Vec<(String, String)>, ActionError> {
    if wants_action_directory(configured) {
        let scratch = facts.action_directory;
        tokio::fs::create_dir(scratch).await.map_err(|e| {
            Error::io(
                format!("creating the action directory {}", scratch.display()),
                e,
            )
        })?;
    }
    Ok(command_environment(configured, facts, command))
}

/// Whether a variable needs the scratch directory.
pub(crate) fn wants_action_directory(configured: &[(String, EnvironmentSource)]) -> bool {
    configured
        .iter()
        .any(|(_, s)| *s == EnvironmentSource::ActionDirectory)
}

/// Whether a variable names the side channel file.
pub(crate) fn wants_side_channel(configured: &[(String, EnvironmentSource)]) -> bool {
    configured
        .iter()
        .any(|(_, s)| *s == EnvironmentSource::SideChannelFile)
}

#[derive(Deserialize)]
struct SideChannel {
    #[serde(default)]
    failure: Option<Failure>,
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum Failure {
    Timeout,
}

/// What the command reported in the side channel file at `path`: a timeout error, nothing,
/// or INVALID_ARGUMENT when the file is not what the format says.
pub(crate) async fn read_side_channel(
    path: &Path,
    timeout: Duration,
) -> Result<Option<ActionError>, ActionError> {
    let file = match tokio::fs::File::open(path).await {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(format!("opening {}", path.display()), e).into()),
    };
    let mut text = String::new();
    file.take(SIDE_CHANNEL_MAX + 1)
        .read_to_string(&mut text)
        .await
        .map_err(|e| {
            ActionError::invalid(format!(
                "the side channel file {} is not UTF-8 text: {e}",
                path.display()
            ))
        })?;
    if text.len() as u64 > SIDE_CHANNEL_MAX {
        return Err(ActionError::invalid(format!(
            "the side channel file {} is larger than {SIDE_CHANNEL_MAX} bytes",
            path.display()
        )));
    }
    if text.trim().is_empty() {
        return Ok(None);
    }
    let info: SideChannel = json5::from_str(&text).map_err(|e| {
        ActionError::invalid(format!(
            "the side channel file {} is not {{\"failure\": \"timeout\"}} or empty: {e}",
            path.display()
        ))
    })?;
    Ok(info
        .failure
        .map(|Failure::Timeout| ActionError::ReportedTimeout(timeout)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configured_variables_come_first_and_the_command_wins() {
        let configured = vec![
            (
                "CPUS".to_string(),
                EnvironmentSource::Property("cpu_count".into()),
            ),
            (
                "MISSING".to_string(),
                EnvironmentSource::Property("nope".into()),
            ),
            ("MODE".to_string(), EnvironmentSource::Value("fast".into())),
            ("T".to_string(), EnvironmentSource::TimeoutMillis),
            ("SC".to_string(), EnvironmentSource::SideChannelFile),
            ("DIR".to_string(), EnvironmentSource::ActionDirectory),
        ];
        let platform = [("cpu_count".to_string(), "8".to_string())];
        let facts = RunFacts {
            platform: &platform,
            timeout: Duration::from_millis(1500),
            side_channel: Path::new("/w/a.side_channel"),
            action_directory: Path::new("/w/a.action"),
        };
        let command = [("MODE".to_string(), "slow".to_string())];
        let env = command_environment(&configured, &facts, &command);
        let pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(
            pairs,
            [
                ("CPUS", "8"),
                ("MISSING", ""),
                ("MODE", "fast"),
                ("T", "1500"),
                ("SC", "/w/a.side_channel"),
                ("DIR", "/w/a.action"),
                ("MODE", "slow"),
            ]
        );
        assert!(wants_action_directory(&configured));
        assert!(wants_side_channel(&configured));
        assert!(!wants_side_channel(&configured[..3]));
    }

    #[tokio::test]
    async fn side_channel_contents() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("sc");
        let t = Duration::from_secs(3);
        assert!(read_side_channel(&p, t).await.unwrap().is_none(), "absent");
        for empty in ["", "  \n", "{}", "{failure: null}"] {
            std::fs::write(&p, empty).unwrap();
            assert!(
                read_side_channel(&p, t).await.unwrap().is_none(),
                "{empty:?}"
            );
        }
        for timeout in [
            r#"{"failure": "timeout"}"#,
            "{failure: 'timeout', other: 1}",
        ] {
            std::fs::write(&p, timeout).unwrap();
            let e = read_side_channel(&p, t).await.unwrap().unwrap();
            assert_eq!(e.code(), cairn_core::Code::DeadlineExceeded, "{timeout}");
        }
        for bad in [r#"{"failure": "oom"}"#, "not json", "[1]"] {
            std::fs::write(&p, bad).unwrap();
            let e = read_side_channel(&p, t).await.unwrap_err();
            assert_eq!(e.code(), cairn_core::Code::InvalidArgument, "{bad}");
        }
        std::fs::write(&p, vec![b' '; 70 << 10]).unwrap();
        assert!(read_side_channel(&p, t).await.is_err());
    }
}
