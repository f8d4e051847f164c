//! `${VAR}` and `${VAR:-default}` expansion in string values.

/// Expands `${VAR}` and `${VAR:-default}` in `s` from the process environment. `$$` is a
/// literal `$`. An unset variable without a default is an error naming it.
pub fn expand_env(s: &str) -> Result<String, String> {
    expand_with(s, |k| std::env::var(k).ok())
}

pub(crate) fn expand_with(s: &str, get: impl Fn(&str) -> Option<String>) -> Result<String, String> {
    if !s.contains('$') {
        return Ok(s.to_string());
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(stripped) = after.strip_prefix('$') {
            out.push('$');
            rest = stripped;
        } else if let Some(body) = after.strip_prefix('{') {
            let end = body
                .find('}')
                .ok_or_else(|| format!("unclosed `${{` in {s:?}"))?;
            let inner = &body[..end];
            let (name, default) = match inner.find(":-") {
                Some(j) => (&inner[..j], Some(&inner[j + 2..])),
                None => (inner, None),
            };
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(format!("`${{{inner}}}` is not a valid variable reference"));
            }
            match (get(name), default) {
                (Some(v), _) if !v.is_empty() || default.is_none() => out.push_str(&v),
                (_, Some(d)) => out.push_str(d),
                (None, None) => {
                    return Err(format!(
                        "environment variable {name} is not set (write ${{{name}:-default}} to give a default)"
                    ))
                }
                (Some(v), None) => out.push_str(&v),
            }
            rest = &body[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// Expands every string in a JSON value; on error returns the key path and message.
pub(crate) fn expand_value(
    v: &mut serde_json::Value,
    path: &mut Vec<String>,
) -> Result<(), (String, String)> {
    match v {
        serde_json::Value::String(s) => {
            *s = expand_env(s).map_err(|m| (path.join("."), m))?;
        }
        serde_json::Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                path.push(format!("[{i}]"));
                expand_value(item, path)?;
                path.pop();
            }
        }
        serde_json::Value::Object(map) => {
            for (k, item) in map.iter_mut() {
                path.push(k.clone());
                expand_value(item, path)?;
                path.pop();
            }
        }
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::expand_with;

    fn env(k: &str) -> Option<String> {
        match k {
            "HOME" => Some("/home/u".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    #[test]
    fn expands_variables_and_defaults() {
        assert_eq!(expand_with("${HOME}/x", env).unwrap(), "/home/u/x");
        assert_eq!(expand_with("${NOPE:-/tmp}/x", env).unwrap(), "/tmp/x");
        assert_eq!(expand_with("${EMPTY:-d}", env).unwrap(), "d");
        assert_eq!(expand_with("a$$b", env).unwrap(), "a$b");
        assert_eq!(expand_with("cost $5", env).unwrap(), "cost $5");
        let e = expand_with("${NOPE}", env).unwrap_err();
        assert!(e.contains("NOPE is not set"), "{e}");
        assert!(expand_with("${HOME", env).is_err());
    }
}
