//! The `property_modifier` scheduler kind: edits an action's platform properties before they
//! reach the scheduler it wraps (e.g. to add `pool=gpu` to every action from one instance,
//! or to drop a property the workers do not know).
//!
//! Pure: the driver applies [`modify_platform`] to [`crate::ActionRequest::platform`] before
//! [`crate::Scheduler::add_operation`]. Modifications apply in order; as in NativeLink,
//! platform properties behave as a map here: `Add` replaces every value of that name, and
//! `Remove` drops every value of it; `Replace` renames matching entries (and their values).

/// One entry of `property_modifier.modifications`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PropertyModification {
    Add {
        name: String,
        value: String,
    },
    Remove(String),
    /// Every value of `name` (only `value` when given) becomes `new_name`, with `new_value`
    /// when given, else its own value.
    Replace {
        name: String,
        value: Option<String>,
        new_name: String,
        new_value: Option<String>,
    },
}

/// Applies `modifications` to `platform`, in order.
pub fn modify_platform(
    platform: &mut Vec<(String, String)>,
    modifications: &[PropertyModification],
) {
    for m in modifications {
        match m {
            PropertyModification::Add { name, value } => {
                platform.retain(|(n, _)| n != name);
                platform.push((name.clone(), value.clone()));
            }
            PropertyModification::Remove(name) => platform.retain(|(n, _)| n != name),
            PropertyModification::Replace {
                name,
                value,
                new_name,
                new_value,
            } => {
                for (n, v) in platform.iter_mut() {
                    if n == name && value.as_ref().is_none_or(|want| want == v) {
                        n.clone_from(new_name);
                        if let Some(nv) = new_value {
                            v.clone_from(nv);
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    fn add(name: &str, value: &str) -> PropertyModification {
        PropertyModification::Add {
            name: name.into(),
            value: value.into(),
        }
    }

    #[test]
    fn add_replaces_and_remove_drops_every_value_of_a_name() {
        let mut platform = p(&[("os", "linux"), ("isa", "x86"), ("isa", "avx2")]);
        modify_platform(
            &mut platform,
            &[add("os", "mac"), PropertyModification::Remove("isa".into())],
        );
        assert_eq!(platform, p(&[("os", "mac")]));
    }

    #[test]
    fn replace_renames_matching_entries_and_keeps_or_sets_their_values() {
        let replace = |name: &str, value: Option<&str>, new_name: &str, new_value: Option<&str>| {
            PropertyModification::Replace {
                name: name.into(),
                value: value.map(Into::into),
                new_name: new_name.into(),
                new_value: new_value.map(Into::into),
            }
        };
        let mut platform = p(&[
            ("container-image", "a"),
            ("container-image", "b"),
            ("os", "linux"),
        ]);
        modify_platform(
            &mut platform,
            &[
                replace("container-image", Some("b"), "image", Some("docker://b")),
                replace("os", None, "OSFamily", None),
                replace("absent", None, "never", Some("x")),
            ],
        );
        assert_eq!(
            platform,
            p(&[
                ("container-image", "a"),
                ("image", "docker://b"),
                ("OSFamily", "linux")
            ])
        );
    }

    #[test]
    fn modifications_apply_in_order() {
        let mut platform = p(&[]);
        modify_platform(
            &mut platform,
            &[
                add("pool", "gpu"),
                PropertyModification::Remove("pool".into()),
                add("pool", "cpu"),
            ],
        );
        assert_eq!(platform, p(&[("pool", "cpu")]));
    }
}
