//! zstd from clients (batch entries and compressed-blobs streams): any bytes with any declared
//! size decode to exactly that size or fail; nothing inflates past the declared size.
#![no_main]
use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input {
    data: Vec<u8>,
    declared: u64,
    cuts: Vec<u8>,
}

fuzz_target!(|input: Input| {
    if let Ok(out) = cairn_server::zstd_codec::decompress_exact(&input.data, input.declared, &"fuzz") {
        assert_eq!(out.len() as u64, input.declared);
    }
    let Ok(mut decoder) = cairn_server::zstd_codec::StreamDecoder::new() else {
        return;
    };
    let mut rest = &input.data[..];
    for c in input.cuts {
        if rest.is_empty() {
            break;
        }
        let n = (c as usize % rest.len()).max(1);
        if decoder.feed(&rest[..n]).is_err() {
            return;
        }
        rest = &rest[n..];
    }
    let _ = decoder.feed(rest);
});
