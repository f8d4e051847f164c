//! What the tests read out of the kit's files by hand: the rules of a rule file and the data
//! of the ConfigMap from YAML, the selectors and thresholds of a PromQL expression. These files
//! are written in a known shape; the real parsers (promtool, kubernetes-validate, Prometheus)
//! check their syntax.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use crate::files::read;

/// One rule of a rule file.
#[derive(Debug)]
pub struct Rule {
    /// `alert` or `record`.
    pub kind: &'static str,
    pub name: String,
    pub expr: String,
}

fn indent(line: &str) -> usize {
    line.len() - line.trim_start().len()
}

/// The value of `key: value` on `lines[i]`, or of the block scalar (`key: |`) that follows.
fn yaml_value(lines: &[&str], i: usize, key: &str) -> String {
    let line = lines[i];
    let value = line.trim_start().trim_start_matches("- ")[key.len() + 1..].trim();
    if !matches!(value, "|" | "|-" | ">" | ">-") {
        return value.trim_matches('"').trim_matches('\'').to_string();
    }
    let block: Vec<&str> = lines[i + 1..]
        .iter()
        .take_while(|l| l.trim().is_empty() || indent(l) > indent(line))
        .map(|l| l.trim())
        .collect();
    block.join("\n").trim().to_string()
}

pub fn rules(path: &Path) -> Vec<Rule> {
    let text = read(path);
    let lines: Vec<&str> = text.lines().collect();
    let mut rules = Vec::new();
    let mut current: Option<(&'static str, String)> = None;
    for (i, line) in lines.iter().enumerate() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("- alert:") {
            current = Some(("alert", yaml_value(&lines, i, "alert")));
        } else if trimmed.starts_with("- record:") {
            current = Some(("record", yaml_value(&lines, i, "record")));
        } else if trimmed.starts_with("expr:") {
            let (kind, name) = current
                .take()
                .unwrap_or_else(|| panic!("{}:{}: expr without a rule", path.display(), i + 1));
            rules.push(Rule {
                kind,
                name,
                expr: yaml_value(&lines, i, "expr"),
            });
        }
    }
    rules
}

/// The data entries of a ConfigMap manifest: each `  KEY: |` block under `data:`, as the
/// string YAML reads (literal block, clipped: one final newline).
pub fn configmap_data(text: &str) -> BTreeMap<String, String> {
    let lines: Vec<&str> = text.lines().collect();
    let start = lines
        .iter()
        .position(|l| *l == "data:")
        .expect("a `data:` line");
    let mut data = BTreeMap::new();
    let mut i = start + 1;
    while i < lines.len() {
        let line = lines[i];
        if !line.starts_with("  ") || line.starts_with("   ") {
            break;
        }
        let key = line
            .trim()
            .strip_suffix(": |")
            .unwrap_or_else(|| panic!("configmap line {}: expected `KEY: |`", i + 1));
        i += 1;
        let mut body = Vec::new();
        while i < lines.len() && (lines[i].is_empty() || lines[i].starts_with("    ")) {
            body.push(lines[i].get(4..).unwrap_or(""));
            i += 1;
        }
        while body.last() == Some(&"") {
            body.pop();
        }
        data.insert(key.to_string(), body.join("\n") + "\n");
    }
    data
}

/// `expr` without a final top-level comparison with a number (`X > 100` gives `X`), so that
/// the series an alert or a diagnostic query watches can be counted when it is not firing.
pub fn without_threshold(expr: &str) -> &str {
    let bytes = expr.as_bytes();
    let (mut depth, mut quoted, mut last) = (0i32, false, None);
    let is_operator = |b: u8| matches!(b, b'<' | b'>' | b'=' | b'!');
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            b'"' => quoted = !quoted,
            b'(' | b'{' | b'[' if !quoted => depth += 1,
            b')' | b'}' | b']' if !quoted => depth -= 1,
            // The first character of an operator outside parentheses, braces and strings.
            _ if is_operator(b)
                && !quoted
                && depth == 0
                && (i == 0 || !is_operator(bytes[i - 1])) =>
            {
                last = Some(i)
            }
            _ => {}
        }
    }
    match last {
        Some(i) => {
            let rest = expr[i..].trim_start_matches(['<', '>', '=', '!']);
            let number = rest.split('#').next().unwrap_or("").trim();
            if number.parse::<f64>().is_ok() {
                expr[..i].trim()
            } else {
                expr
            }
        }
        None => expr,
    }
}

/// A series selector an expression reads: a metric (or `nativelink:*` recorded) name and its
/// `label="value"` matchers (other matchers are not needed to tell whether it can match).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Selector {
    pub name: String,
    pub equals: Vec<(String, String)>,
}

impl std::fmt::Display for Selector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let equals: Vec<String> = self
            .equals
            .iter()
            .map(|(k, v)| format!("{k}=\"{v}\""))
            .collect();
        write!(f, "{}{{{}}}", self.name, equals.join(","))
    }
}

/// The `nativelink*` and `up` selectors of an expression: identifiers outside label matchers
/// and strings that are not function names, with the matchers that follow them.
pub fn selectors(expr: &str) -> BTreeSet<Selector> {
    let mut found = BTreeSet::new();
    let chars: Vec<char> = expr.chars().collect();
    let (mut i, mut depth_braces, mut quoted) = (0, 0, false);
    while i < chars.len() {
        let c = chars[i];
        if c == '"' {
            quoted = !quoted;
        } else if !quoted && c == '{' {
            depth_braces += 1;
        } else if !quoted && c == '}' {
            depth_braces -= 1;
        } else if !quoted && depth_braces == 0 && (c.is_ascii_alphabetic() || c == '_') {
            let start = i;
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric() || matches!(chars[i], '_' | ':'))
            {
                i += 1;
            }
            let name: String = chars[start..i].iter().collect();
            let rest: String = chars[i..].iter().collect();
            let rest = rest.trim_start();
            let preceded_by_digit = start > 0 && chars[start - 1].is_ascii_digit();
            if rest.starts_with('(')
                || preceded_by_digit
                || !(name.starts_with("nativelink") || name == "up")
            {
                continue;
            }
            let mut equals = Vec::new();
            if let Some(matchers) = rest.strip_prefix('{') {
                let matchers = matchers.split('}').next().unwrap_or("");
                for matcher in matchers.split(',') {
                    if let Some((label, value)) = matcher.split_once('=') {
                        if !value.starts_with('~') && !label.ends_with('!') {
                            equals.push((
                                label.trim().to_string(),
                                value.trim().trim_matches('"').to_string(),
                            ));
                        }
                    }
                }
            }
            found.insert(Selector { name, equals });
            continue;
        }
        i += 1;
    }
    found
}

#[test]
fn helpers_read_thresholds_and_selectors() {
    assert_eq!(
        without_threshold("nativelink_scheduler_queue_length > 100"),
        "nativelink_scheduler_queue_length"
    );
    assert_eq!(
        without_threshold("(1 - nativelink:cache_hit_rate) > 0.5"),
        "(1 - nativelink:cache_hit_rate)"
    );
    assert_eq!(
        without_threshold("nativelink:cache_operation_latency_p95 > 1000  # 1 second"),
        "nativelink:cache_operation_latency_p95"
    );
    assert_eq!(
        without_threshold("up{job=\"nativelink\"} == 0"),
        "up{job=\"nativelink\"}"
    );
    assert_eq!(
        without_threshold("sum(x{a=~\"b|c\"}) / sum(y)"),
        "sum(x{a=~\"b|c\"}) / sum(y)"
    );
    assert_eq!(
        selectors(
            "sum by (le) (rate(nativelink_request_duration_seconds_bucket{service=\"cas\", code=~\"x\"}[5m])) \
             / nativelink:queue_depth"
        )
        .iter()
        .map(Selector::to_string)
        .collect::<Vec<_>>(),
        [
            "nativelink:queue_depth{}",
            "nativelink_request_duration_seconds_bucket{service=\"cas\"}"
        ]
    );
    let data = configmap_data(
        "kind: ConfigMap\ndata:\n  a.json5: |\n    {\n\n      x: 1,\n    }\n  b.json5: |\n    {}\n",
    );
    assert_eq!(data["a.json5"], "{\n\n  x: 1,\n}\n");
    assert_eq!(data["b.json5"], "{}\n");
}
