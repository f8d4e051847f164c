//! `dedup`: placeholder until content-defined chunking lands.
use crate::StoreRef;
use cairn_config::stores::DedupStore as Cfg;
use cairn_core::Error;
pub fn build(_cfg: &Cfg, _index: StoreRef, _content: StoreRef) -> Result<StoreRef, Error> {
    Err(Error::unimplemented("the dedup store is not built yet"))
}
