//! Numbers that may be written as JSON numbers or strings, and byte sizes with units.
//!
//! `"10gb"` is 10,000,000,000 bytes and `"10GiB"` is 10,737,418,240: decimal units (`kb`, `mb`,
//! `gb`, `tb`, `pb`, or just `k`, `m`, `g`, `t`) are powers of 1000, binary units (`kib` ...
//! `pib`) powers of 1024, case-insensitive, with optional spaces and fractions (`"1.5gb"`).

use std::fmt;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

/// A size in bytes, written as a number or a string with a unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, Hash)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub fn get(self) -> u64 {
        self.0
    }
}

/// Parses a size: `"1234"`, `"10gb"`, `"10GiB"`, `"1.5 MB"`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '_'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let num: String = num.chars().filter(|c| *c != '_').collect();
    let unit = unit.trim().to_ascii_lowercase();
    let mult: u64 = match unit.as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "m" | "mb" => 1_000_000,
        "g" | "gb" => 1_000_000_000,
        "t" | "tb" => 1_000_000_000_000,
        "p" | "pb" => 1_000_000_000_000_000,
        "ki" | "kib" => 1 << 10,
        "mi" | "mib" => 1 << 20,
        "gi" | "gib" => 1 << 30,
        "ti" | "tib" => 1 << 40,
        "pi" | "pib" => 1 << 50,
        _ => {
            return Err(format!(
                "expected a size such as 1000000, \"10gb\" or \"10GiB\", found {s:?} (unknown unit {unit:?})"
            ))
        }
    };
    if num.is_empty() {
        return Err(format!(
            "expected a size such as 1000000, \"10gb\" or \"10GiB\", found {s:?}"
        ));
    }
    if let Ok(n) = num.parse::<u64>() {
        return n
            .checked_mul(mult)
            .ok_or_else(|| format!("size {s:?} does not fit in 64 bits"));
    }
    let f: f64 = num.parse().map_err(|_| {
        format!("expected a size such as 1000000, \"10gb\" or \"10GiB\", found {s:?}")
    })?;
    let v = f * mult as f64;
    if !(0.0..1.8e19).contains(&v) {
        return Err(format!("size {s:?} does not fit in 64 bits"));
    }
    Ok(v.round() as u64)
}

struct U64Visitor {
    sizes: bool,
}

impl<'de> Visitor<'de> for U64Visitor {
    type Value = u64;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        if self.sizes {
            f.write_str(
                "a size in bytes: a non-negative integer or a string such as \"10gb\" or \"10GiB\"",
            )
        } else {
            f.write_str("a non-negative integer (or a string holding one)")
        }
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<u64, E> {
        Ok(v)
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<u64, E> {
        u64::try_from(v)
            .map_err(|_| E::custom(format!("expected a non-negative integer, found {v}")))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<u64, E> {
        if v >= 0.0 && v.fract() == 0.0 && v < 1.8e19 {
            Ok(v as u64)
        } else {
            Err(E::custom(format!(
                "expected a non-negative integer, found {v}"
            )))
        }
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<u64, E> {
        if self.sizes {
            parse_size(v).map_err(E::custom)
        } else {
            v.trim()
                .parse()
                .map_err(|_| E::custom(format!("expected a non-negative integer, found {v:?}")))
        }
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(U64Visitor { sizes: true }).map(ByteSize)
    }
}

/// A `u64` written as a number or a string (after `${VAR}` expansion every value may be a string).
pub(crate) fn u64<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    d.deserialize_any(U64Visitor { sizes: false })
}

pub(crate) fn opt_u64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    u64(d).map(Some)
}

/// Seconds (or milliseconds) written as NativeLink writes its `*_s` and `*_ms` fields: a
/// non-negative integer, or a string holding one or a duration such as "30m" or "1h2m3s".
struct DurationVisitor {
    millis: bool,
}

impl<'de> Visitor<'de> for DurationVisitor {
    type Value = u64;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(if self.millis {
            "a number of milliseconds, or a duration such as \"500ms\" or \"2s\""
        } else {
            "a number of seconds, or a duration such as \"30m\" or \"1h2m3s\""
        })
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<u64, E> {
        Ok(v)
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<u64, E> {
        u64::try_from(v).map_err(|_| E::custom(format!("expected a duration, found {v}")))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<u64, E> {
        U64Visitor { sizes: false }.visit_f64(v)
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<u64, E> {
        let v = v.trim();
        if let Ok(n) = v.parse::<u64>() {
            return Ok(n);
        }
        let d = humantime::parse_duration(v).map_err(|e| {
            E::custom(format!(
                "expected a duration such as 30, \"30s\", \"5m\" or \"1h2m3s\", found {v:?} ({e})"
            ))
        })?;
        Ok(if self.millis {
            u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
        } else {
            d.as_secs()
        })
    }
}

/// Seconds: an integer or a duration string (NativeLink's `*_s` fields).
pub(crate) fn secs<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    d.deserialize_any(DurationVisitor { millis: false })
}

pub(crate) fn opt_secs<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    secs(d).map(Some)
}

/// Milliseconds: an integer or a duration string (NativeLink's `*_ms` fields).
pub(crate) fn opt_millis<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    d.deserialize_any(DurationVisitor { millis: true })
        .map(Some)
}

/// A boolean written as `true`/`false` or as a string holding one (after `${VAR}` expansion
/// every value may be a string), as NativeLink's boolean fields take.
pub(crate) fn boolean<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    struct BoolVisitor;
    impl<'de> Visitor<'de> for BoolVisitor {
        type Value = bool;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("true or false (or a string holding one)")
        }
        fn visit_bool<E: de::Error>(self, v: bool) -> Result<bool, E> {
            Ok(v)
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<bool, E> {
            match v.trim().to_ascii_lowercase().as_str() {
                "true" => Ok(true),
                "false" => Ok(false),
                _ => Err(E::custom(format!("expected true or false, found {v:?}"))),
            }
        }
    }
    d.deserialize_any(BoolVisitor)
}

pub(crate) fn opt_boolean<'de, D: Deserializer<'de>>(d: D) -> Result<Option<bool>, D::Error> {
    boolean(d).map(Some)
}

struct F64Visitor;

impl<'de> Visitor<'de> for F64Visitor {
    type Value = f64;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a number (or a string holding one)")
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<f64, E> {
        Ok(v as f64)
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<f64, E> {
        Ok(v as f64)
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<f64, E> {
        Ok(v)
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<f64, E> {
        let v = v.trim();
        if let Ok(n) = v.parse() {
            return Ok(n);
        }
        // A duration ("10s", "1m"), as NativeLink's seconds fields take.
        humantime::parse_duration(v)
            .map(|d| d.as_secs_f64())
            .map_err(|_| E::custom(format!("expected a number or a duration, found {v:?}")))
    }
}

pub(crate) fn opt_f64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    d.deserialize_any(F64Visitor).map(Some)
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn durations_are_seconds_or_humantime_strings() {
        #[derive(serde::Deserialize)]
        struct T {
            #[serde(deserialize_with = "super::secs")]
            s: u64,
            #[serde(deserialize_with = "super::opt_millis")]
            ms: Option<u64>,
        }
        let t = |text: &str| json5::from_str::<T>(text).map(|t| (t.s, t.ms));
        assert_eq!(t(r#"{s: 30, ms: 500}"#).unwrap(), (30, Some(500)));
        assert_eq!(t(r#"{s: "30", ms: "500"}"#).unwrap(), (30, Some(500)));
        assert_eq!(t(r#"{s: "1h2m3s", ms: "2s"}"#).unwrap(), (3723, Some(2000)));
        assert_eq!(t(r#"{s: "30m", ms: "500ms"}"#).unwrap(), (1800, Some(500)));
        let e = t(r#"{s: "soon", ms: 1}"#).unwrap_err().to_string();
        assert!(e.contains("expected a duration"), "{e}");
        assert!(t(r#"{s: -5, ms: 1}"#).is_err());
    }

    #[test]
    fn sizes_follow_decimal_and_binary_units() {
        assert_eq!(parse_size("10gb"), Ok(10_000_000_000));
        assert_eq!(parse_size("10GiB"), Ok(10_737_418_240));
        assert_eq!(parse_size("5GB"), Ok(5_000_000_000));
        assert_eq!(parse_size("100gb"), Ok(100_000_000_000));
        assert_eq!(parse_size("1.5 MB"), Ok(1_500_000));
        assert_eq!(parse_size("42"), Ok(42));
        assert_eq!(parse_size("64KiB"), Ok(65_536));
        assert!(parse_size("ten gb").is_err());
        assert!(parse_size("10 parsecs").is_err());
        assert!(parse_size("99999999999pb").is_err());
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        const UNITS: [(&str, u64); 12] = [
            ("", 1),
            ("b", 1),
            ("kb", 1_000),
            ("KB", 1_000),
            ("mb", 1_000_000),
            ("gb", 1_000_000_000),
            ("GB", 1_000_000_000),
            ("tb", 1_000_000_000_000),
            ("KiB", 1 << 10),
            ("MiB", 1 << 20),
            ("gib", 1 << 30),
            ("TiB", 1 << 40),
        ];

        proptest! {
            #[test]
            fn a_number_with_a_unit_is_that_many_bytes(
                n in 0u64..10_000_000,
                (unit, mult) in prop::sample::select(UNITS.to_vec()),
                space in any::<bool>(),
            ) {
                let text = format!("{n}{}{unit}", if space { " " } else { "" });
                prop_assert_eq!(parse_size(&text), Ok(n * mult), "{}", text);
            }

            #[test]
            fn any_text_is_a_size_or_an_error_without_panicking(s in "\\PC{0,40}|[0-9._ ]{0,30}[a-zA-Z]{0,4}") {
                if let Ok(v) = parse_size(&s) {
                    // Whatever parsed came from digits and a known unit.
                    prop_assert!(s.trim().starts_with(|c: char| c.is_ascii_digit() || c == '.' || c == '_'), "{:?} -> {}", s, v);
                }
            }
        }
    }
}
