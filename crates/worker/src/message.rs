//! `success_message_template` and `failure_message_template`: the text of
//! `ExecuteResponse.message`, with variables about the action replaced.
//!
//! `{name}` is replaced by the variable `name`; `{{` and `}}` stand for `{` and `}`. The
//! variables are NativeLink's: `digest_function` (lowercase, e.g. `sha256`),
//! `action_digest_hash`, `action_digest_size`, `historical_results_hash` and
//! `historical_results_size` (empty when no `HistoricalExecuteResponse` was uploaded). Any
//! other name, or an unmatched brace, is refused when the template is parsed, so a template
//! that is accepted always renders.

use cairn_core::Digest;

/// The variables a template may use.
pub const VARIABLES: [&str; 5] = [
    "digest_function",
    "action_digest_hash",
    "action_digest_size",
    "historical_results_hash",
    "historical_results_size",
];

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    /// An index into [`VARIABLES`].
    Var(usize),
}

/// A parsed template; the default is empty (renders to nothing).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MessageTemplate(Vec<Part>);

impl MessageTemplate {
    /// Parses `text`; the error says what is wrong and where.
    pub fn parse(text: &str) -> Result<MessageTemplate, String> {
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut rest = text;
        while let Some(i) = rest.find(['{', '}']) {
            literal.push_str(&rest[..i]);
            let tail = &rest[i..];
            if let Some(after) = tail.strip_prefix("{{") {
                literal.push('{');
                rest = after;
            } else if let Some(after) = tail.strip_prefix("}}") {
                literal.push('}');
                rest = after;
            } else if tail.starts_with('}') {
                return Err(format!(
                    "unmatched '}}' at byte {i} (write '}}}}' for a brace)"
                ));
            } else {
                let Some(end) = tail.find('}') else {
                    return Err(format!("unclosed '{{' at byte {i}"));
                };
                let name = &tail[1..end];
                let var = VARIABLES.iter().position(|v| *v == name).ok_or_else(|| {
                    format!(
                        "unknown variable {{{name}}}; the variables are {}",
                        VARIABLES.map(|v| format!("{{{v}}}")).join(", ")
                    )
                })?;
                if !literal.is_empty() {
                    parts.push(Part::Text(std::mem::take(&mut literal)));
                }
                parts.push(Part::Var(var));
                rest = &tail[end + 1..];
            }
        }
        literal.push_str(rest);
        if !literal.is_empty() {
            parts.push(Part::Text(literal));
        }
        Ok(MessageTemplate(parts))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The text for the action `action`, whose `HistoricalExecuteResponse` is `historical`
    /// when one was uploaded.
    pub fn render(&self, action: &Digest, historical: Option<&Digest>) -> String {
        let mut out = String::new();
        for part in &self.0 {
            match part {
                Part::Text(t) => out.push_str(t),
                Part::Var(0) => out.push_str(action.function().name()),
                Part::Var(1) => out.push_str(&action.hash_hex()),
                Part::Var(2) => out.push_str(&action.size().to_string()),
                Part::Var(3) => out.push_str(&historical.map(|d| d.hash_hex()).unwrap_or_default()),
                Part::Var(_) => {
                    out.push_str(&historical.map(|d| d.size().to_string()).unwrap_or_default())
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_core::DigestFunction;

    #[test]
    fn variables_are_replaced_and_braces_escaped() {
        let action = DigestFunction::Sha256.compute(b"action");
        let hist = DigestFunction::Sha256.compute(b"historical!");
        let t = MessageTemplate::parse(
            "https://b/{digest_function}/action/{action_digest_hash}-{action_digest_size}/ \
             {{h}} {historical_results_hash}-{historical_results_size}",
        )
        .unwrap();
        assert_eq!(
            t.render(&action, Some(&hist)),
            format!(
                "https://b/sha256/action/{}-6/ {{h}} {}-11",
                action.hash_hex(),
                hist.hash_hex()
            )
        );
        assert_eq!(
            t.render(&action, None),
            format!("https://b/sha256/action/{}-6/ {{h}} -", action.hash_hex())
        );
        assert!(MessageTemplate::parse("").unwrap().is_empty());
        assert_eq!(
            MessageTemplate::parse("plain")
                .unwrap()
                .render(&action, None),
            "plain"
        );
    }

    #[test]
    fn unknown_variables_and_stray_braces_are_refused() {
        let e = MessageTemplate::parse("x {instance_name}").unwrap_err();
        assert!(e.contains("unknown variable {instance_name}"), "{e}");
        assert!(e.contains("{action_digest_hash}"), "{e}");
        assert!(MessageTemplate::parse("x {digest_function").is_err());
        assert!(MessageTemplate::parse("x }").is_err());
    }
}
