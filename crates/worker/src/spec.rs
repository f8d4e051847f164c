//! The checked form of an Action and its Command: what the other steps may rely on.
//!
//! Nothing here does I/O. [`check_action`] and [`check_command`] turn the wire protos into an
//! [`ActionSpec`] or an INVALID_ARGUMENT naming the offending field: output paths and the
//! working directory are relative and never climb out of the input root, the timeout is within
//! the worker's maximum, the command has a program and well-formed environment variables.

use std::path::{Path, PathBuf};
use std::time::Duration;

use cairn_core::proto::build::bazel::remote::execution::v2 as re;
use cairn_core::proto::google::protobuf;
use cairn_core::{Digest, DigestFunction};

use crate::error::ActionError;

/// What an Action asks for, before its Command is known.
#[derive(Debug, Clone)]
pub(crate) struct ActionParts {
    pub command: Digest,
    pub input_root: Digest,
    /// The effective timeout: the Action's, or the default; never above the maximum.
    pub timeout: Duration,
    /// `Action.do_not_cache`.
    pub do_not_cache: bool,
    /// `Action.platform`'s properties (the Command's when the Action has none; see
    /// [`CommandSpec::platform`]).
    pub platform: Vec<(String, String)>,
}

/// Which kind of entry a declared output must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OutputKind {
    /// From `output_files` (REAPI 2.0): a file or a symlink.
    File,
    /// From `output_directories` (REAPI 2.0): a directory or a symlink.
    Directory,
    /// From `output_paths` (REAPI 2.1): whatever the command left there.
    Any,
}

/// One declared output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DeclaredOutput {
    /// As declared: relative to the working directory; the name reported in the result.
    pub name: String,
    /// Relative to the input root (working directory joined, `.` and empty segments dropped).
    pub path: PathBuf,
    pub kind: OutputKind,
}

/// A checked Command.
#[derive(Debug, Clone)]
pub(crate) struct CommandSpec {
    pub arguments: Vec<String>,
    pub environment: Vec<(String, String)>,
    /// Relative to the input root; empty for the root itself.
    pub working_directory: PathBuf,
    pub outputs: Vec<DeclaredOutput>,
    /// Whether output directories should also be stored as `Directory` blobs and reported by
    /// `root_directory_digest` (`output_directory_format` DIRECTORY_ONLY or TREE_AND_DIRECTORY).
    pub directory_blobs: bool,
    /// `Command.platform`'s properties (deprecated in REAPI 2.2, still sent by older clients).
    pub platform: Vec<(String, String)>,
}

/// Checks an Action's fields. `function` is the action digest's function, which every digest
/// of the action shares.
pub(crate) fn check_action(
    function: DigestFunction,
    action: &re::Action,
    default_timeout: Duration,
    max_timeout: Duration,
) -> Result<ActionParts, ActionError> {
    let digest = |field: &str, d: &Option<re::Digest>| -> Result<Digest, ActionError> {
        let d = d
            .as_ref()
            .ok_or_else(|| ActionError::invalid(format!("Action.{field} is not set")))?;
        Digest::from_proto_with(function, d)
            .map_err(|e| ActionError::invalid(format!("Action.{field}: {}", e.message)))
    };
    Ok(ActionParts {
        command: digest("command_digest", &action.command_digest)?,
        input_root: digest("input_root_digest", &action.input_root_digest)?,
        timeout: effective_timeout(action.timeout.as_ref(), default_timeout, max_timeout)?,
        do_not_cache: action.do_not_cache,
        platform: properties(action.platform.as_ref()),
    })
}

/// The Action's timeout, or the default when it sets none (or zero), capped by `max`. A
/// timeout above `max` is rejected, as the REAPI requires.
pub(crate) fn effective_timeout(
    requested: Option<&protobuf::Duration>,
    default: Duration,
    max: Duration,
) -> Result<Duration, ActionError> {
    let Some(t) = requested else {
        return Ok(default.min(max));
    };
    if t.seconds < 0 || t.nanos < 0 || t.nanos >= 1_000_000_000 {
        return Err(ActionError::invalid(format!(
            "Action.timeout {}s {}ns is not a valid non-negative duration",
            t.seconds, t.nanos
        )));
    }
    let t = Duration::new(t.seconds as u64, t.nanos as u32);
    if t.is_zero() {
        return Ok(default.min(max));
    }
    if t > max {
        return Err(ActionError::invalid(format!(
            "Action.timeout {t:?} is above this worker's maximum of {max:?}"
        )));
    }
    Ok(t)
}

/// Checks a Command.
pub(crate) fn check_command(command: &re::Command) -> Result<CommandSpec, ActionError> {
    if command.arguments.is_empty() || command.arguments[0].is_empty() {
        return Err(ActionError::invalid(
            "Command.arguments is empty: there is no program to run",
        ));
    }
    if let Some(a) = command.arguments.iter().find(|a| a.contains('\0')) {
        return Err(ActionError::invalid(format!(
            "Command.arguments: {a:?} contains a NUL byte"
        )));
    }
    let mut environment = Vec::with_capacity(command.environment_variables.len());
    for v in &command.environment_variables {
        if v.name.is_empty() || v.name.contains(['=', '\0']) || v.value.contains('\0') {
            return Err(ActionError::invalid(format!(
                "Command.environment_variables: {:?}={:?} is not a valid variable",
                v.name, v.value
            )));
        }
        environment.push((v.name.clone(), v.value.clone()));
    }
    let working_directory = working_directory(&command.working_directory)?;

    let mut outputs = Vec::new();
    let mut declare = |field: &str, name: &String, kind: OutputKind| -> Result<(), ActionError> {
        let rel = output_path(field, name, kind != OutputKind::File)?;
        outputs.push(DeclaredOutput {
            name: name.clone(),
            path: working_directory.join(rel),
            kind,
        });
        Ok(())
    };
    // REAPI 2.1: when output_paths is set, output_files and output_directories are ignored.
    if !command.output_paths.is_empty() {
        for p in &command.output_paths {
            declare("output_paths", p, OutputKind::Any)?;
        }
    } else {
        #[allow(deprecated)]
        for p in &command.output_files {
            declare("output_files", p, OutputKind::File)?;
        }
        #[allow(deprecated)]
        for p in &command.output_directories {
            declare("output_directories", p, OutputKind::Directory)?;
        }
    }
    use re::command::OutputDirectoryFormat as Format;
    let directory_blobs = matches!(
        Format::try_from(command.output_directory_format),
        Ok(Format::DirectoryOnly | Format::TreeAndDirectory)
    );
    Ok(CommandSpec {
        arguments: command.arguments.clone(),
        environment,
        working_directory,
        outputs,
        directory_blobs,
        #[allow(deprecated)]
        platform: properties(command.platform.as_ref()),
    })
}

fn properties(platform: Option<&re::Platform>) -> Vec<(String, String)> {
    platform.map_or_else(Vec::new, |p| {
        p.properties
            .iter()
            .map(|p| (p.name.clone(), p.value.clone()))
            .collect()
    })
}

/// A declared output path: relative, without `..`; `.` and empty segments are dropped. The
/// empty path (the working directory itself) is allowed only where `allow_empty`.
fn output_path(field: &str, p: &str, allow_empty: bool) -> Result<PathBuf, ActionError> {
    let bad = |why: &str| {
        ActionError::invalid(format!(
            "Command.{field}: {p:?} {why}; output paths must be relative to the working directory"
        ))
    };
    if p.starts_with('/') {
        return Err(bad("is absolute"));
    }
    if p.contains('\0') {
        return Err(bad("contains a NUL byte"));
    }
    let mut out = PathBuf::new();
    for segment in p.split('/') {
        match segment {
            "" | "." => {}
            ".." => return Err(bad("contains a `..` segment")),
            s => out.push(s),
        }
    }
    if out.as_os_str().is_empty() && !allow_empty {
        return Err(bad("names the working directory itself"));
    }
    Ok(out)
}

/// The working directory, normalised; it must stay inside the input root.
fn working_directory(p: &str) -> Result<PathBuf, ActionError> {
    let bad = |why: &str| {
        ActionError::invalid(format!(
            "Command.working_directory {p:?} {why}; it must be a directory inside the input root"
        ))
    };
    if p.starts_with('/') {
        return Err(bad("is absolute"));
    }
    if p.contains('\0') {
        return Err(bad("contains a NUL byte"));
    }
    let mut out = PathBuf::new();
    for segment in p.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                if !out.pop() {
                    return Err(bad("climbs out of the input root"));
                }
            }
            s => out.push(s),
        }
    }
    Ok(out)
}

/// Checks one name of a Directory entry: a single path segment.
pub(crate) fn check_entry_name(dir: &Path, name: &str) -> Result<(), ActionError> {
    if name.is_empty() || name == "." || name == ".." || name.contains(['/', '\0']) {
        return Err(ActionError::invalid(format!(
            "input directory {:?} has an entry named {name:?}, which is not a single path segment",
            display_rel(dir)
        )));
    }
    Ok(())
}

/// A path relative to the input root, for messages (`.` for the root).
pub(crate) fn display_rel(p: &Path) -> String {
    if p.as_os_str().is_empty() {
        ".".to_string()
    } else {
        p.display().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn command(files: &[&str], dirs: &[&str], paths: &[&str], wd: &str) -> re::Command {
        let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        #[allow(deprecated)]
        re::Command {
            arguments: vec!["/bin/true".into()],
            output_files: s(files),
            output_directories: s(dirs),
            output_paths: s(paths),
            working_directory: wd.into(),
            ..Default::default()
        }
    }

    fn invalid_message(c: re::Command) -> String {
        match check_command(&c) {
            Err(ActionError::InvalidAction(m)) => m,
            other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
        }
    }

    #[test]
    fn output_paths_must_be_relative_without_dotdot() {
        let m = invalid_message(command(&["/etc/passwd"], &[], &[], ""));
        assert!(m.contains("output_files") && m.contains("absolute"), "{m}");
        let m = invalid_message(command(&[], &["a/../../b"], &[], ""));
        assert!(m.contains("output_directories") && m.contains(".."), "{m}");
        let m = invalid_message(command(&[], &[], &["../x"], ""));
        assert!(m.contains("output_paths"), "{m}");
        let m = invalid_message(command(&[""], &[], &[], ""));
        assert!(m.contains("working directory itself"), "{m}");
    }

    #[test]
    fn outputs_are_joined_to_the_working_directory() {
        let spec = check_command(&command(&["out/a.o"], &["gen", ""], &[], "sub/./w")).unwrap();
        let paths: Vec<_> = spec
            .outputs
            .iter()
            .map(|o| (o.name.as_str(), o.path.clone(), o.kind))
            .collect();
        assert_eq!(
            paths,
            [
                ("out/a.o", PathBuf::from("sub/w/out/a.o"), OutputKind::File),
                ("gen", PathBuf::from("sub/w/gen"), OutputKind::Directory),
                ("", PathBuf::from("sub/w"), OutputKind::Directory),
            ]
        );
        // output_paths wins over the deprecated fields.
        let spec = check_command(&command(&["f"], &["d"], &["p"], "")).unwrap();
        assert_eq!(spec.outputs.len(), 1);
        assert_eq!(spec.outputs[0].kind, OutputKind::Any);
    }

    #[test]
    fn working_directory_must_stay_inside_the_input_root() {
        let m = invalid_message(command(&[], &[], &[], "/tmp"));
        assert!(m.contains("absolute"), "{m}");
        let m = invalid_message(command(&[], &[], &[], "a/../.."));
        assert!(m.contains("climbs out"), "{m}");
        let spec = check_command(&command(&[], &[], &[], "a/../b")).unwrap();
        assert_eq!(spec.working_directory, PathBuf::from("b"));
    }

    #[test]
    fn commands_need_a_program_and_sane_variables() {
        let mut c = command(&[], &[], &[], "");
        c.arguments.clear();
        assert!(invalid_message(c).contains("no program"));
        let mut c = command(&[], &[], &[], "");
        c.environment_variables
            .push(re::command::EnvironmentVariable {
                name: "A=B".into(),
                value: "x".into(),
            });
        assert!(invalid_message(c).contains("not a valid variable"));
    }

    #[test]
    fn timeouts_default_cap_and_reject() {
        let d = |s: i64| protobuf::Duration {
            seconds: s,
            nanos: 0,
        };
        let (def, max) = (Duration::from_secs(60), Duration::from_secs(600));
        assert_eq!(effective_timeout(None, def, max).unwrap(), def);
        assert_eq!(effective_timeout(Some(&d(0)), def, max).unwrap(), def);
        assert_eq!(
            effective_timeout(Some(&d(5)), def, max).unwrap(),
            Duration::from_secs(5)
        );
        assert_eq!(
            effective_timeout(None, Duration::from_secs(900), max).unwrap(),
            max
        );
        let e = effective_timeout(Some(&d(601)), def, max).unwrap_err();
        assert!(e.to_string().contains("above"), "{e}");
        assert!(effective_timeout(Some(&d(-1)), def, max).is_err());
    }

    #[test]
    fn entry_names_are_single_segments() {
        for bad in ["", ".", "..", "a/b", "a\0"] {
            assert!(check_entry_name(Path::new("d"), bad).is_err(), "{bad:?}");
        }
        assert!(check_entry_name(Path::new(""), "ok.txt").is_ok());
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;
        use std::path::Component;

        /// Paths made of the segments that matter: names, `.`, `..`, empty ones, a leading `/`.
        fn path() -> impl Strategy<Value = String> {
            prop::collection::vec(
                prop_oneof![
                    "[a-z]{1,3}",
                    Just(".".to_string()),
                    Just("..".to_string()),
                    Just(String::new())
                ],
                0..6,
            )
            .prop_flat_map(|segments| (Just(segments.join("/")), any::<bool>()))
            .prop_map(|(p, absolute)| if absolute { format!("/{p}") } else { p })
        }

        fn strs(v: &[String]) -> Vec<&str> {
            v.iter().map(String::as_str).collect()
        }

        fn inside_the_root(p: &Path) -> bool {
            p.components().all(|c| matches!(c, Component::Normal(_)))
        }

        proptest! {
            #[test]
            fn accepted_outputs_and_working_directories_stay_inside_the_input_root(
                files in prop::collection::vec(path(), 0..3),
                dirs in prop::collection::vec(path(), 0..3),
                paths in prop::collection::vec(path(), 0..3),
                wd in path(),
            ) {
                let c = command(&strs(&files), &strs(&dirs), &strs(&paths), &wd);
                match check_command(&c) {
                    Ok(spec) => {
                        prop_assert!(inside_the_root(&spec.working_directory), "{:?}", spec.working_directory);
                        for o in &spec.outputs {
                            prop_assert!(inside_the_root(&o.path), "{:?} -> {:?}", o.name, o.path);
                            prop_assert!(o.kind != OutputKind::File || o.path != spec.working_directory, "{:?}", o.name);
                        }
                    }
                    Err(ActionError::InvalidAction(m)) => prop_assert!(m.contains("Command."), "{}", m),
                    Err(other) => prop_assert!(false, "unexpected {:?}", other),
                }
            }
        }
    }
}
