//! ByteStream resource names: any text is parsed or refused, never a panic; an accepted name
//! is bounded and its digest matches the hash and size it spelled.
#![no_main]
use cairn_core::DigestFunction;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(name) = std::str::from_utf8(data) else {
        return;
    };
    for write in [false, true] {
        if let Ok(r) = cairn_server::resource::parse(name, write, DigestFunction::Sha256) {
            assert!(name.len() <= cairn_server::resource::MAX_RESOURCE_NAME);
            assert!(name.contains(&r.digest.hash_hex()));
            assert!(name.contains(&r.digest.size().to_string()));
        }
    }
});
