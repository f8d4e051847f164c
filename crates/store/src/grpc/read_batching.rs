//! `experimental_read_batching`: whole reads of small CAS blobs wait in a bounded queue and
//! go upstream together in `BatchReadBlobs` calls.

use cairn_config::stores::GrpcReadBatching;
use cairn_core::Error;

/// Checks the keys without building anything.
pub fn check(b: &GrpcReadBatching) -> Result<(), Error> {
    let at = "grpc.experimental_read_batching";
    if b.dispatch_slots == 0 {
        return Err(Error::invalid_argument(format!(
            "{at}.dispatch_slots: expected at least 1"
        )));
    }
    if b.max_batch_bytes.0 < b.max_blob_size_bytes.0 {
        return Err(Error::invalid_argument(format!(
            "{at}.max_batch_bytes: {} is less than max_blob_size_bytes ({}): no blob would fit a batch",
            b.max_batch_bytes.0, b.max_blob_size_bytes.0
        )));
    }
    Err(Error::unimplemented(format!(
        "{at}: batched reads are not built yet in this version of Cairn; leave it out"
    )))
}
