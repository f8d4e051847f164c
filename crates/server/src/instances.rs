//! Instance name -> store routing for one service.

use std::collections::BTreeMap;

use cairn_core::Error;
use cairn_store::{StoreMap, StoreRef};

/// The stores one service serves, by instance name.
#[derive(Clone, Default)]
pub struct Instances<T: Clone = StoreRef> {
    service: &'static str,
    map: BTreeMap<String, T>,
}

impl<T: Clone> Instances<T> {
    pub fn new(service: &'static str) -> Self {
        Instances {
            service,
            map: BTreeMap::new(),
        }
    }

    pub fn insert(&mut self, instance: String, value: T) {
        self.map.insert(instance, value);
    }

    /// The entry for an instance; INVALID_ARGUMENT naming it (and the served ones) otherwise.
    pub fn get(&self, instance: &str) -> Result<&T, Error> {
        self.map.get(instance).ok_or_else(|| {
            let served: Vec<String> = self.map.keys().map(|k| format!("{k:?}")).collect();
            Error::invalid_argument(format!(
                "unknown instance name {instance:?} for {}; this server serves {}",
                self.service,
                if served.is_empty() {
                    "none".to_string()
                } else {
                    served.join(", ")
                }
            ))
        })
    }

    pub fn contains(&self, instance: &str) -> bool {
        self.map.contains_key(instance)
    }

    pub fn values(&self) -> impl Iterator<Item = &T> {
        self.map.values()
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.map.keys()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// Looks a store up by name, for wiring services from config.
pub fn store_named(stores: &StoreMap, name: &str, key_path: &str) -> Result<StoreRef, Error> {
    stores.get(name).cloned().ok_or_else(|| {
        let known: Vec<&str> = stores.keys().map(|s| s.as_str()).collect();
        Error::invalid_argument(format!(
            "{key_path}: no store named {name:?} (stores are: {})",
            known.join(", ")
        ))
    })
}
