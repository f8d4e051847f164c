//! Handing freed memory back to the kernel after bulk work.
//!
//! The binary's allocator (mimalloc) keeps freed pages for reuse and returns them lazily, which
//! suits blob buffers that come and go at high rates. After a one-off burst (a filesystem
//! store's index load, whose walk or listing frees tens of MB of temporary vectors and table
//! growth), those pages would stay in the process's RSS. The binary registers how to release
//! them; the library calls [`release_freed`] where such a burst ends.

use std::sync::OnceLock;

static RELEASE: OnceLock<fn()> = OnceLock::new();

/// Registers how to hand freed memory back (once; later calls are ignored).
pub fn set_release_freed(f: fn()) {
    let _ = RELEASE.set(f);
}

/// Hands freed memory back to the kernel, when the binary said how.
pub fn release_freed() {
    if let Some(f) = RELEASE.get() {
        f();
    }
}
