//! Digests from the wire (a `Digest` message) and from file names: refused or parsed, and a
//! parsed one round-trips.
#![no_main]
use cairn_core::proto::build::bazel::remote::execution::v2 as re;
use cairn_core::Digest;
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    if let Ok(wire) = re::Digest::decode(data) {
        for function in [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, -1, i32::MAX] {
            if let Ok(d) = Digest::from_proto(function, &wire) {
                assert_eq!(d.size() as i64, wire.size_bytes);
                assert_eq!(Digest::from_proto(function, &d.to_proto()).ok(), Some(d));
            }
        }
    }
    if let Ok(name) = std::str::from_utf8(data) {
        if let Some(d) = Digest::from_file_name(name) {
            assert_eq!(d.file_name(), name);
        }
    }
});
