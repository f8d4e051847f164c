//! ByteStream resource names.
//!
//! Read:  `[INSTANCE/]blobs/[FUNCTION/]HASH/SIZE[/...]` or
//!        `[INSTANCE/]compressed-blobs/COMPRESSOR/[FUNCTION/]HASH/SIZE[/...]`
//! Write: `[INSTANCE/]uploads/UUID/` followed by either of the above.
//! The instance name may contain slashes; it ends at the first reserved segment.

use cairn_core::{Digest, DigestFunction, Error};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compressor {
    Identity,
    Zstd,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resource {
    pub instance: String,
    /// Upload id, for writes.
    pub upload_id: Option<String>,
    pub compressor: Compressor,
    pub digest: Digest,
}

/// Longest resource name accepted (instance name, upload id, digest and size fit many times
/// over).
pub const MAX_RESOURCE_NAME: usize = 4096;

fn bad(name: &str, why: impl std::fmt::Display) -> Error {
    // A name is echoed only in part: a long one would make the status too large to send.
    let mut end = name.len().min(200);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    let more = if end < name.len() { "..." } else { "" };
    Error::invalid_argument(format!("resource name {:?}{more}: {why}", &name[..end]))
}

/// Parses a resource name; `default_function` applies when the name carries none and the hash
/// length allows more than one (64 hex digits: SHA-256 unless the name says blake3).
pub fn parse(name: &str, write: bool, default_function: DigestFunction) -> Result<Resource, Error> {
    if name.len() > MAX_RESOURCE_NAME {
        return Err(bad(
            name,
            format_args!(
                "{} bytes long, more than the {MAX_RESOURCE_NAME} this server accepts",
                name.len()
            ),
        ));
    }
    let parts: Vec<&str> = name.split('/').collect();
    let reserved = |s: &str| matches!(s, "uploads" | "blobs" | "compressed-blobs");
    let start = parts
        .iter()
        .position(|p| reserved(p))
        .ok_or_else(|| bad(name, if write {
            "expected [INSTANCE/]uploads/UUID/blobs/HASH/SIZE or .../compressed-blobs/zstd/HASH/SIZE"
        } else {
            "expected [INSTANCE/]blobs/HASH/SIZE or [INSTANCE/]compressed-blobs/zstd/HASH/SIZE"
        }))?;
    let instance = parts[..start].join("/");
    let mut i = start;
    let mut upload_id = None;
    if write {
        if parts[i] != "uploads" {
            return Err(bad(
                name,
                "a write's resource name must start with [INSTANCE/]uploads/UUID/",
            ));
        }
        let id = parts
            .get(i + 1)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| bad(name, "missing upload id after uploads/"))?;
        upload_id = Some(id.to_string());
        i += 2;
    } else if parts[i] == "uploads" {
        return Err(bad(
            name,
            "uploads/ names are for writes; read blobs/HASH/SIZE",
        ));
    }
    let compressor = match parts.get(i).copied() {
        Some("blobs") => {
            i += 1;
            Compressor::Identity
        }
        Some("compressed-blobs") => {
            let c = parts.get(i + 1).copied().unwrap_or("");
            i += 2;
            match c {
                "zstd" => Compressor::Zstd,
                "identity" => Compressor::Identity,
                other => {
                    return Err(bad(
                        name,
                        format!(
                            "compressor {other:?} is not supported (supported: zstd, identity)"
                        ),
                    ))
                }
            }
        }
        _ => {
            return Err(bad(
                name,
                "expected blobs/ or compressed-blobs/ after the upload id",
            ))
        }
    };
    let mut function = None;
    if let Some(f) = parts.get(i).and_then(|s| DigestFunction::from_name(s)) {
        function = Some(f);
        i += 1;
    }
    let (Some(hash), Some(size)) = (parts.get(i), parts.get(i + 1)) else {
        return Err(bad(name, "missing HASH/SIZE"));
    };
    let size: i64 = size
        .parse()
        .map_err(|_| bad(name, format!("size {size:?} is not an integer")))?;
    let function = match function {
        Some(f) => f,
        None if hash.len() == default_function.hash_len() * 2 => default_function,
        None => DigestFunction::from_request(0, hash.len()).map_err(|e| bad(name, e.message))?,
    };
    let digest = Digest::parse(function, hash, size).map_err(|e| bad(name, e.message))?;
    Ok(Resource {
        instance,
        upload_id,
        compressor,
        digest,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn parses_every_form() {
        let f = DigestFunction::Sha256;
        let r = parse(&format!("blobs/{H}/0"), false, f).unwrap();
        assert_eq!(
            (r.instance.as_str(), r.compressor),
            ("", Compressor::Identity)
        );
        let r = parse(&format!("a/b/blobs/{H}/0"), false, f).unwrap();
        assert_eq!(r.instance, "a/b");
        let r = parse(&format!("main/compressed-blobs/zstd/{H}/0"), false, f).unwrap();
        assert_eq!(r.compressor, Compressor::Zstd);
        let r = parse(&format!("main/uploads/u-1/blobs/{H}/0/meta"), true, f).unwrap();
        assert_eq!(r.upload_id.as_deref(), Some("u-1"));
        let r = parse(
            &format!("uploads/u/compressed-blobs/zstd/blake3/{H}/0"),
            true,
            f,
        )
        .unwrap();
        assert_eq!(r.digest.function(), DigestFunction::Blake3);
    }

    #[test]
    fn rejects_bad_names_with_reasons() {
        let f = DigestFunction::Sha256;
        for (name, write, why) in [
            (format!("blobs/{H}/-1"), false, "negative"),
            ("blobs/abc/1".to_string(), false, "hex digits"),
            (format!("blobs/{H}"), false, "HASH/SIZE"),
            (
                format!("compressed-blobs/lz4/{H}/0"),
                false,
                "not supported",
            ),
            (format!("blobs/{H}/0"), true, "uploads"),
            (format!("uploads/u/blobs/{H}/0"), false, "for writes"),
            ("nonsense".to_string(), false, "expected"),
            (format!("blobs/{H}/ten"), false, "not an integer"),
        ] {
            let e = parse(&name, write, f).unwrap_err();
            assert!(e.message.contains(why), "{name}: {e}");
        }
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// A segment of an instance name: anything but the reserved words.
        fn segment() -> impl Strategy<Value = String> {
            "[a-zA-Z0-9_.-]{1,10}".prop_filter("not reserved", |s| {
                !matches!(s.as_str(), "uploads" | "blobs" | "compressed-blobs")
            })
        }

        proptest! {
            #[test]
            fn any_name_is_parsed_or_refused_without_panicking(
                name in "[a-z0-9/._-]{0,160}|(blobs|uploads|compressed-blobs|zstd|sha256|blake3|/|[0-9a-f]{64}|[0-9]{1,3}|-1){0,9}",
                write in any::<bool>(),
            ) {
                let _ = parse(&name, write, DigestFunction::Sha256);
            }

            #[test]
            fn any_unicode_name_is_parsed_or_refused_without_panicking(name in any::<String>(), write in any::<bool>()) {
                let _ = parse(&name, write, DigestFunction::Blake3);
            }

            #[test]
            fn well_formed_names_parse_to_their_parts(
                instance in prop::collection::vec(segment(), 0..3),
                upload in prop::option::of("[0-9a-f-]{1,36}"),
                zstd in any::<bool>(),
                named in any::<bool>(),
                function in prop::sample::select(DigestFunction::ALL.to_vec()),
                data in prop::collection::vec(any::<u8>(), 0..64),
                trailing in prop::collection::vec(segment(), 0..2),
            ) {
                let digest = function.compute(&data);
                let mut parts = instance.clone();
                if let Some(id) = &upload {
                    parts.extend(["uploads".to_string(), id.clone()]);
                }
                parts.extend(if zstd {
                    vec!["compressed-blobs".to_string(), "zstd".to_string()]
                } else {
                    vec!["blobs".to_string()]
                });
                // BLAKE3 and SHA-256 hashes have the same length: the name must say BLAKE3.
                if named || function == DigestFunction::Blake3 {
                    parts.push(function.name().to_string());
                }
                parts.extend([digest.hash_hex(), digest.size().to_string()]);
                parts.extend(trailing);
                let name = parts.join("/");
                let parsed = parse(&name, upload.is_some(), DigestFunction::Sha256);
                prop_assert_eq!(
                    parsed.map_err(|e| e.message),
                    Ok(Resource {
                        instance: instance.join("/"),
                        upload_id: upload,
                        compressor: if zstd { Compressor::Zstd } else { Compressor::Identity },
                        digest,
                    }),
                    "{}", name
                );
            }
        }
    }
}
