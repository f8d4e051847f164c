//! Digests and digest functions.
//!
//! A [`Digest`] is a hash plus a size, as the REAPI defines it. It is parsed from the wire once
//! (checked hex, length matching the function, non-negative size) and then passed by value: it is
//! `Copy`, holds the raw hash bytes inline and never allocates.

use std::fmt;

use bazel_remote_apis::build::bazel::remote::execution::v2 as re;
use re::digest_function::Value as ProtoFn;
use sha2::Digest as _;

use crate::Error;

/// The hash functions Cairn serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DigestFunction {
    Sha256,
    Blake3,
    Sha1,
    Sha384,
    Sha512,
}

/// `global.default_digest_hash_function` is `blake3`.
static DEFAULT_IS_BLAKE3: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

impl DigestFunction {
    pub const ALL: [DigestFunction; 5] = [
        DigestFunction::Sha256,
        DigestFunction::Blake3,
        DigestFunction::Sha1,
        DigestFunction::Sha384,
        DigestFunction::Sha512,
    ];

    /// Length of the raw hash in bytes.
    pub fn hash_len(self) -> usize {
        match self {
            DigestFunction::Sha256 | DigestFunction::Blake3 => 32,
            DigestFunction::Sha1 => 20,
            DigestFunction::Sha384 => 48,
            DigestFunction::Sha512 => 64,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DigestFunction::Sha256 => "sha256",
            DigestFunction::Blake3 => "blake3",
            DigestFunction::Sha1 => "sha1",
            DigestFunction::Sha384 => "sha384",
            DigestFunction::Sha512 => "sha512",
        }
    }

    pub fn from_name(name: &str) -> Option<DigestFunction> {
        DigestFunction::ALL
            .into_iter()
            .find(|f| f.name().eq_ignore_ascii_case(name))
    }

    pub fn to_proto(self) -> i32 {
        (match self {
            DigestFunction::Sha256 => ProtoFn::Sha256,
            DigestFunction::Blake3 => ProtoFn::Blake3,
            DigestFunction::Sha1 => ProtoFn::Sha1,
            DigestFunction::Sha384 => ProtoFn::Sha384,
            DigestFunction::Sha512 => ProtoFn::Sha512,
        }) as i32
    }

    /// The function a request names, or, when the request leaves the field unset (0), the one
    /// implied by the hash length (64 hex digits mean SHA-256, as REAPI clients before
    /// `digest_function` existed assume).
    pub fn from_request(value: i32, hash_hex_len: usize) -> Result<DigestFunction, Error> {
        match ProtoFn::try_from(value) {
            Ok(ProtoFn::Unknown) => match hash_hex_len {
                64 => Ok(DigestFunction::default_for_64_hex()),
                40 => Ok(DigestFunction::Sha1),
                96 => Ok(DigestFunction::Sha384),
                128 => Ok(DigestFunction::Sha512),
                n => Err(Error::invalid_argument(format!(
                    "hash of {n} hex digits matches no digest function (SHA-256 and BLAKE3 are 64, SHA-1 40, SHA-384 96, SHA-512 128)"
                ))),
            },
            Ok(ProtoFn::Sha256) => Ok(DigestFunction::Sha256),
            Ok(ProtoFn::Blake3) => Ok(DigestFunction::Blake3),
            Ok(ProtoFn::Sha1) => Ok(DigestFunction::Sha1),
            Ok(ProtoFn::Sha384) => Ok(DigestFunction::Sha384),
            Ok(ProtoFn::Sha512) => Ok(DigestFunction::Sha512),
            Ok(other) => Err(Error::invalid_argument(format!(
                "digest function {} is not supported; supported: sha256, blake3, sha1, sha384, sha512",
                other.as_str_name()
            ))),
            Err(_) => Err(Error::invalid_argument(format!(
                "digest function {value} is not a known REAPI DigestFunction value"
            ))),
        }
    }

    /// The function of a 64-hex-digit hash whose request names none: SHA-256 unless
    /// [`DigestFunction::set_default_for_64_hex`] chose BLAKE3 (`global.default_digest_hash_function`).
    pub fn default_for_64_hex() -> DigestFunction {
        if DEFAULT_IS_BLAKE3.load(std::sync::atomic::Ordering::Relaxed) {
            DigestFunction::Blake3
        } else {
            DigestFunction::Sha256
        }
    }

    /// Sets the process-wide default for 64-hex-digit hashes (SHA-256 or BLAKE3; any other
    /// function is ignored), once at start-up.
    pub fn set_default_for_64_hex(f: DigestFunction) {
        DEFAULT_IS_BLAKE3.store(
            f == DigestFunction::Blake3,
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    pub fn hasher(self) -> Hasher {
        match self {
            DigestFunction::Sha256 => Hasher::Sha256(sha2::Sha256::new()),
            DigestFunction::Blake3 => Hasher::Blake3(Box::new(blake3::Hasher::new())),
            DigestFunction::Sha1 => Hasher::Sha1(sha1::Sha1::new()),
            DigestFunction::Sha384 => Hasher::Sha384(sha2::Sha384::new()),
            DigestFunction::Sha512 => Hasher::Sha512(sha2::Sha512::new()),
        }
    }

    /// The digest of `data` under this function.
    pub fn digest_of(self, data: &[u8]) -> Digest {
        let mut h = self.hasher();
        h.update(data);
        h.finish()
    }

    /// The digest of the empty blob, which every CAS always has.
    pub fn empty_digest(self) -> Digest {
        self.digest_of(&[])
    }
}

impl fmt::Display for DigestFunction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A streaming hasher for any [`DigestFunction`]; it also counts the bytes it saw.
pub enum Hasher {
    Sha256(sha2::Sha256),
    Blake3(Box<blake3::Hasher>),
    Sha1(sha1::Sha1),
    Sha384(sha2::Sha384),
    Sha512(sha2::Sha512),
}

impl Hasher {
    pub fn update(&mut self, data: &[u8]) {
        match self {
            Hasher::Sha256(h) => h.update(data),
            Hasher::Blake3(h) => {
                h.update(data);
            }
            Hasher::Sha1(h) => h.update(data),
            Hasher::Sha384(h) => h.update(data),
            Hasher::Sha512(h) => h.update(data),
        }
    }

    /// The hash of everything seen; `size` is the byte count the caller tracked.
    pub fn finish_with_size(self, size: u64) -> Digest {
        let (function, bytes): (DigestFunction, Vec<u8>) = match self {
            Hasher::Sha256(h) => (DigestFunction::Sha256, h.finalize().to_vec()),
            Hasher::Blake3(h) => (DigestFunction::Blake3, h.finalize().as_bytes().to_vec()),
            Hasher::Sha1(h) => (DigestFunction::Sha1, h.finalize().to_vec()),
            Hasher::Sha384(h) => (DigestFunction::Sha384, h.finalize().to_vec()),
            Hasher::Sha512(h) => (DigestFunction::Sha512, h.finalize().to_vec()),
        };
        let mut hash = [0u8; 64];
        hash[..bytes.len()].copy_from_slice(&bytes);
        Digest {
            function,
            hash,
            size,
        }
    }

    fn finish(self) -> Digest {
        // Only used by `digest_of`, which passes the size itself.
        self.finish_with_size(0)
    }
}

/// A content digest: function, raw hash and size in bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    function: DigestFunction,
    hash: [u8; 64],
    size: u64,
}

impl Digest {
    /// Parses a hex hash and a wire size, checking both.
    pub fn parse(function: DigestFunction, hash_hex: &str, size: i64) -> Result<Digest, Error> {
        if size < 0 {
            return Err(Error::invalid_argument(format!(
                "digest {hash_hex}/{size}: size_bytes is negative"
            )));
        }
        let want = function.hash_len() * 2;
        if hash_hex.len() != want {
            return Err(Error::invalid_argument(format!(
                "digest {hash_hex}/{size}: a {function} hash has {want} hex digits, this one has {}",
                hash_hex.len()
            )));
        }
        let mut hash = [0u8; 64];
        hex::decode_to_slice(hash_hex, &mut hash[..function.hash_len()]).map_err(|_| {
            Error::invalid_argument(format!(
                "digest {hash_hex}/{size}: hash is not lowercase hexadecimal"
            ))
        })?;
        if hash_hex.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(Error::invalid_argument(format!(
                "digest {hash_hex}/{size}: hash must be lowercase hexadecimal"
            )));
        }
        Ok(Digest {
            function,
            hash,
            size: size as u64,
        })
    }

    /// Parses a wire digest; the function comes from the request (or the hash length when unset).
    pub fn from_proto(function: i32, d: &re::Digest) -> Result<Digest, Error> {
        let function = DigestFunction::from_request(function, d.hash.len())?;
        Digest::parse(function, &d.hash, d.size_bytes)
    }

    /// Parses a wire digest with an already resolved function.
    pub fn from_proto_with(function: DigestFunction, d: &re::Digest) -> Result<Digest, Error> {
        Digest::parse(function, &d.hash, d.size_bytes)
    }

    pub fn new(function: DigestFunction, hash: &[u8], size: u64) -> Digest {
        let mut h = [0u8; 64];
        let n = hash.len().min(64);
        h[..n].copy_from_slice(&hash[..n]);
        Digest {
            function,
            hash: h,
            size,
        }
    }

    pub fn function(&self) -> DigestFunction {
        self.function
    }

    pub fn hash(&self) -> &[u8] {
        &self.hash[..self.function.hash_len()]
    }

    pub fn hash_hex(&self) -> String {
        hex::encode(self.hash())
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// The same hash with another size (the size of a digest is part of its identity in the CAS;
    /// the AC uses the digest only as a name).
    pub fn with_size(mut self, size: u64) -> Digest {
        self.size = size;
        self
    }

    pub fn to_proto(&self) -> re::Digest {
        re::Digest {
            hash: self.hash_hex(),
            size_bytes: self.size as i64,
        }
    }

    pub fn is_empty_blob(&self) -> bool {
        self.size == 0 && *self == self.function.empty_digest()
    }

    /// A name safe for file systems and object keys: `sha256-<hex>-<size>`.
    pub fn file_name(&self) -> String {
        format!("{}-{}-{}", self.function.name(), self.hash_hex(), self.size)
    }

    /// Inverse of [`Digest::file_name`]: `None` for any name that function would not write
    /// (also `SHA256-...`, upper-case hex or a size with leading zeros, whose file would not be
    /// found again under the digest's own name).
    pub fn from_file_name(name: &str) -> Option<Digest> {
        let mut parts = name.splitn(3, '-');
        let function = DigestFunction::from_name(parts.next()?)?;
        let hash = parts.next()?;
        let size: i64 = parts.next()?.parse().ok()?;
        Digest::parse(function, hash, size)
            .ok()
            .filter(|d| d.file_name() == name)
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.function, self.hash_hex(), self.size)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl DigestFunction {
    /// Hashes `data` and returns its full digest (hash and size).
    pub fn compute(self, data: &[u8]) -> Digest {
        self.digest_of(data).with_size(data.len() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn empty_sha256_matches_the_known_value() {
        assert_eq!(
            DigestFunction::Sha256.empty_digest().hash_hex(),
            EMPTY_SHA256
        );
        assert!(Digest::parse(DigestFunction::Sha256, EMPTY_SHA256, 0)
            .unwrap()
            .is_empty_blob());
    }

    #[test]
    fn parse_rejects_bad_input_with_reasons() {
        let f = DigestFunction::Sha256;
        let e = Digest::parse(f, EMPTY_SHA256, -1).unwrap_err();
        assert!(e.message.contains("negative"), "{e}");
        let e = Digest::parse(f, "abc", 1).unwrap_err();
        assert!(e.message.contains("64 hex digits"), "{e}");
        let e = Digest::parse(f, &"zz".repeat(32), 1).unwrap_err();
        assert!(e.message.contains("hexadecimal"), "{e}");
        let e = Digest::parse(f, &EMPTY_SHA256.to_uppercase(), 0).unwrap_err();
        assert!(e.message.contains("lowercase"), "{e}");
    }

    #[test]
    fn function_from_request_falls_back_to_hash_length() {
        assert_eq!(
            DigestFunction::from_request(0, 64).unwrap(),
            DigestFunction::Sha256
        );
        assert_eq!(
            DigestFunction::from_request(DigestFunction::Blake3.to_proto(), 64).unwrap(),
            DigestFunction::Blake3
        );
        assert!(DigestFunction::from_request(0, 10).is_err());
        assert!(DigestFunction::from_request(999, 64).is_err());
    }

    #[test]
    fn file_name_round_trips() {
        for f in DigestFunction::ALL {
            let d = f.compute(b"hello");
            assert_eq!(Digest::from_file_name(&d.file_name()), Some(d));
        }
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn function() -> impl Strategy<Value = DigestFunction> {
            prop::sample::select(DigestFunction::ALL.to_vec())
        }

        proptest! {
            #[test]
            fn any_hash_and_size_are_parsed_or_refused_without_panicking(
                f in function(),
                hash in "[0-9a-fA-F]{0,130}|\\PC{0,70}",
                size in any::<i64>(),
            ) {
                if let Ok(d) = Digest::parse(f, &hash, size) {
                    prop_assert_eq!(d.hash_hex(), hash.to_ascii_lowercase());
                    prop_assert_eq!(d.size() as i64, size);
                }
            }

            #[test]
            fn any_file_name_is_a_digest_or_none_without_panicking(
                name in "\\PC{0,140}|(sha256|blake3|sha1|-|[0-9a-f]{40}|[0-9a-f]{64}|[0-9]{1,20}){0,5}|(sha256|SHA256)-[0-9a-fA-F]{64}-[0-9]{1,4}",
            ) {
                if let Some(d) = Digest::from_file_name(&name) {
                    prop_assert_eq!(d.file_name(), name);
                }
            }

            #[test]
            fn computed_digests_round_trip(f in function(), data in prop::collection::vec(any::<u8>(), 0..256)) {
                let d = f.compute(&data);
                prop_assert_eq!(d.size(), data.len() as u64);
                prop_assert_eq!(Digest::parse(f, &d.hash_hex(), d.size() as i64).map_err(|e| e.message), Ok(d));
                prop_assert_eq!(Digest::from_file_name(&d.file_name()), Some(d));
                prop_assert_eq!(Digest::from_proto_with(f, &d.to_proto()).map_err(|e| e.message), Ok(d));
                let mut hasher = f.hasher();
                for chunk in data.chunks(7) {
                    hasher.update(chunk);
                }
                prop_assert_eq!(hasher.finish_with_size(data.len() as u64), d);
            }
        }
    }
}
