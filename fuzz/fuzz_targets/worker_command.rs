//! A Command as a worker receives it: checked or refused, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = cairn_worker::fuzz_check_command(data);
});
