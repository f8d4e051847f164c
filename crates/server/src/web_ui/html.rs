//! The page frame and the few helpers every page uses: escaping, links, durations. Pages are
//! plain server-rendered HTML with inline CSS: no external assets, no scripts.

use std::fmt::Write;
use std::time::Duration;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

/// Escapes text for HTML element content and quoted attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Percent-encodes a path segment or query value.
pub fn url(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// Decodes `application/x-www-form-urlencoded` text (a query string or a form body) into
/// pairs; invalid escapes are kept as they are.
pub fn form_pairs(s: &str) -> Vec<(String, String)> {
    fn decode(s: &str) -> String {
        let b = s.as_bytes();
        let mut out = Vec::with_capacity(b.len());
        let mut i = 0;
        while i < b.len() {
            match b[i] {
                b'+' => out.push(b' '),
                b'%' if i + 2 < b.len() => {
                    match std::str::from_utf8(&b[i + 1..i + 3])
                        .ok()
                        .and_then(|h| u8::from_str_radix(h, 16).ok())
                    {
                        Some(v) => {
                            out.push(v);
                            i += 2;
                        }
                        None => out.push(b'%'),
                    }
                }
                c => out.push(c),
            }
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    }
    s.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (decode(k), decode(v)),
            None => (decode(p), String::new()),
        })
        .collect()
}

/// A link to an invocation's page, or `(none)` for operations sent without one.
pub fn invocation_link(id: &str) -> String {
    if id.is_empty() {
        "<span class=\"muted\">(none)</span>".into()
    } else {
        format!("<a href=\"/invocation/{}\">{}</a>", url(id), esc(id))
    }
}

/// `3.2 s`, `4 min 10 s`, `2 h 5 min`, `3 d 4 h`.
pub fn duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=59 => format!("{:.1} s", d.as_secs_f64()),
        60..=3599 => format!("{} min {} s", s / 60, s % 60),
        3600..=86_399 => format!("{} h {} min", s / 3600, (s % 3600) / 60),
        _ => format!("{} d {} h", s / 86_400, (s % 86_400) / 3600),
    }
}

/// A Unix time in milliseconds as `YYYY-MM-DD HH:MM:SS UTC`.
pub fn utc(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// Bytes as `12.3 MB`.
pub fn bytes(n: u64) -> String {
    match n {
        0..=9_999 => format!("{n} B"),
        10_000..=9_999_999 => format!("{:.1} kB", n as f64 / 1e3),
        10_000_000..=9_999_999_999 => format!("{:.1} MB", n as f64 / 1e6),
        _ => format!("{:.1} GB", n as f64 / 1e9),
    }
}

const CSS: &str = "body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#222;background:#fafafa}\
nav{background:#2d3b45;padding:8px 16px}nav a{color:#fff;margin-right:16px;text-decoration:none;font-weight:600}\
main{padding:12px 16px}h1{font-size:20px;margin:4px 0 12px}h2{font-size:16px;margin:18px 0 6px}\
table{border-collapse:collapse;background:#fff;margin-bottom:8px}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}\
th{background:#eef1f4}pre{background:#fff;border:1px solid #ddd;padding:8px;overflow:auto;max-height:480px;white-space:pre-wrap;word-break:break-all}\
code,pre{font:12px/1.35 ui-monospace,monospace}.ok{color:#17692f;font-weight:600}.bad{color:#b3261e;font-weight:600}\
.run{color:#8a5a00;font-weight:600}.muted{color:#777}form.inline{display:inline}";

/// A whole page: the navigation, `title` and `body` (already HTML).
pub fn page(title: &str, body: &str) -> Response {
    let html = format!(
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{t} - Cairn</title>\
         <meta name=\"viewport\" content=\"width=device-width\"><style>{CSS}</style></head><body>\
         <nav><a href=\"/invocations\">Invocations</a><a href=\"/queue\">Queue</a>\
         <a href=\"/workers\">Workers</a><a href=\"/cache\">Cache</a></nav><main><h1>{t}</h1>{body}</main></body></html>",
        t = esc(title)
    );
    html_response(StatusCode::OK, html)
}

/// An error page: `status` and what went wrong (plain text, escaped here).
pub fn error(status: StatusCode, message: &str) -> Response {
    let mut r = page(
        status.canonical_reason().unwrap_or("Error"),
        &format!("<p class=\"bad\">{}</p>", esc(message)),
    );
    *r.status_mut() = status;
    r
}

fn html_response(status: StatusCode, html: String) -> Response {
    let mut r = (status, html).into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    // Nothing on a page may load or run anything: no scripts, styles only inline.
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'unsafe-inline'; img-src 'self'; form-action 'self'; frame-ancestors 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_and_encodes() {
        assert_eq!(
            esc("<a href=\"x\">&'"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
        assert_eq!(url("a b/<c>"), "a%20b%2F%3Cc%3E");
        assert_eq!(
            form_pairs("status=failed&q=a+b%2Fc&bad=%zz&x"),
            vec![
                ("status".into(), "failed".into()),
                ("q".into(), "a b/c".into()),
                ("bad".into(), "%zz".into()),
                ("x".into(), String::new()),
            ]
        );
        assert_eq!(form_pairs("q=%"), vec![("q".into(), "%".into())]);
        assert_eq!(form_pairs("q=%4"), vec![("q".into(), "%4".into())]);
    }

    #[test]
    fn times() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(1_700_000_000_000), "2023-11-14 22:13:20 UTC");
        assert_eq!(duration(Duration::from_millis(2500)), "2.5 s");
        assert_eq!(duration(Duration::from_secs(3725)), "1 h 2 min");
    }
}
