//! `compression`: placeholder until the lz4 framing lands.
use crate::StoreRef;
use cairn_config::stores::CompressionStore as Cfg;
use cairn_core::Error;
pub fn build(_cfg: &Cfg, _backend: StoreRef) -> Result<StoreRef, Error> {
    Err(Error::unimplemented("the compression store is not built yet"))
}
