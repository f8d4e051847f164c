//! `evict_page_cache`: keep a filesystem store's blobs out of the page cache with
//! `posix_fadvise(POSIX_FADV_DONTNEED)`. The kernel drops only clean pages, so a written blob
//! is first written back (`sync_file_range`, data only: no journal commit); a read's pages
//! are clean already.

use std::os::fd::AsRawFd;
use std::path::Path;

use cairn_core::Error;

/// Writes `path`'s data back to disk and drops its pages from the page cache.
pub(super) fn write_back_and_drop(path: &Path) -> Result<(), Error> {
    let file = std::fs::File::open(path)
        .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
    let fd = file.as_raw_fd();
    // SAFETY: `fd` is an open descriptor owned by `file` for the duration of both calls.
    let r = unsafe {
        libc::sync_file_range(
            fd,
            0,
            0,
            libc::SYNC_FILE_RANGE_WAIT_BEFORE
                | libc::SYNC_FILE_RANGE_WRITE
                | libc::SYNC_FILE_RANGE_WAIT_AFTER,
        )
    };
    if r != 0 {
        return Err(Error::io(
            format!("writing back {}", path.display()),
            std::io::Error::last_os_error(),
        ));
    }
    drop_pages(&file, 0, 0);
    Ok(())
}

/// Advises the kernel that `len` bytes from `start` (0 and 0: the whole file) are not needed.
/// Advice only: a failure changes nothing but the cache, so it is logged, not returned.
fn drop_pages(file: &std::fs::File, start: u64, len: u64) {
    let (Ok(start), Ok(len)) = (libc::off_t::try_from(start), libc::off_t::try_from(len)) else {
        return;
    };
    // SAFETY: the descriptor is open (owned by `file`); fadvise reads no memory of ours.
    let r = unsafe { libc::posix_fadvise(file.as_raw_fd(), start, len, libc::POSIX_FADV_DONTNEED) };
    if r != 0 {
        tracing::debug!(
            error = r,
            "filesystem store: posix_fadvise(DONTNEED) failed"
        );
    }
}

/// Drops a read's range from the page cache when the read's stream goes away.
pub(super) struct DropOnClose {
    file: std::fs::File,
    start: u64,
    len: u64,
}

impl DropOnClose {
    pub(super) fn new(file: std::fs::File, start: u64, len: u64) -> DropOnClose {
        DropOnClose { file, start, len }
    }
}

impl Drop for DropOnClose {
    fn drop(&mut self) {
        // A zero length would mean "to the end of the file" to fadvise.
        if self.len > 0 {
            drop_pages(&self.file, self.start, self.len);
        }
    }
}
