//! The two shapes of named collections: `[{name: "X", KIND: {...}}]` and `{X: {KIND: {...}}}`,
//! and services keyed by instance name: `[{instance_name: "main", ...}]` and `{main: {...}}`.

use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, DeserializeOwned, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

/// Marks an inner key path inside an error message, for `parse_as` to splice into the outer one.
pub(crate) const SPLICE: char = '\u{1}';

/// One named entry of `stores` or `schedulers`.
#[derive(Debug, Clone)]
pub struct Named<T> {
    pub name: String,
    pub spec: T,
}

/// `stores` / `schedulers`: named specs, in file order.
#[derive(Debug, Clone)]
pub struct NamedList<T>(pub Vec<Named<T>>);

impl<T> Default for NamedList<T> {
    fn default() -> Self {
        NamedList(Vec::new())
    }
}

impl<T> NamedList<T> {
    pub fn get(&self, name: &str) -> Option<&T> {
        self.0.iter().find(|n| n.name == name).map(|n| &n.spec)
    }
    pub fn iter(&self) -> impl Iterator<Item = &Named<T>> {
        self.0.iter()
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<'de, T: DeserializeOwned> Deserialize<'de> for NamedList<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<'de, T: DeserializeOwned> Visitor<'de> for V<T> {
            type Value = NamedList<T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(
                    "a list of {name: \"NAME\", KIND: {...}} or a map {NAME: {KIND: {...}}}",
                )
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut out: Vec<Named<T>> = Vec::new();
                while let Some(entry) = seq.next_element::<ListEntry<T>>()? {
                    if out.iter().any(|n| n.name == entry.0.name) {
                        return Err(de::Error::custom(format!(
                            "name {:?} is used twice",
                            entry.0.name
                        )));
                    }
                    out.push(entry.0);
                }
                Ok(NamedList(out))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out: Vec<Named<T>> = Vec::new();
                while let Some(name) = map.next_key::<String>()? {
                    let spec = map.next_value::<T>()?;
                    if out.iter().any(|n| n.name == name) {
                        return Err(de::Error::custom(format!("name {name:?} is used twice")));
                    }
                    out.push(Named { name, spec });
                }
                Ok(NamedList(out))
            }
        }
        d.deserialize_any(V(PhantomData))
    }
}

/// `{name: "X", KIND: {...}}`: the `name` key plus exactly one kind key.
struct ListEntry<T>(Named<T>);

impl<'de, T: DeserializeOwned> Deserialize<'de> for ListEntry<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<'de, T: DeserializeOwned> Visitor<'de> for V<T> {
            type Value = ListEntry<T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object {name: \"NAME\", KIND: {...}}")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut name: Option<String> = None;
                let mut rest = serde_json::Map::new();
                while let Some(key) = map.next_key::<String>()? {
                    if key == "name" {
                        name = Some(map.next_value()?);
                    } else {
                        rest.insert(key, map.next_value::<serde_json::Value>()?);
                    }
                }
                let name = name.ok_or_else(|| de::Error::missing_field("name"))?;
                let spec =
                    serde_path_to_error::deserialize::<_, T>(serde_json::Value::Object(rest))
                        .map_err(|e| {
                            let sub = e.path().to_string();
                            let sub = if sub == "." {
                                String::new()
                            } else {
                                format!(".{sub}")
                            };
                            // Spliced into the outer key path by `parse_as`.
                            de::Error::custom(format!(
                                "{SPLICE}{name}{sub}{SPLICE}{}",
                                e.into_inner()
                            ))
                        })?;
                Ok(ListEntry(Named { name, spec }))
            }
        }
        d.deserialize_map(V(PhantomData))
    }
}

/// A service entry that knows its instance name.
pub trait InstanceEntry {
    fn set_instance_name(&mut self, name: String);
    fn instance_name(&self) -> &str;
}

/// Service configs keyed by instance name, as a list with `instance_name` or a map.
#[derive(Debug, Clone)]
pub struct InstanceMap<T>(pub Vec<T>);

impl<T> Default for InstanceMap<T> {
    fn default() -> Self {
        InstanceMap(Vec::new())
    }
}

impl<T: InstanceEntry> InstanceMap<T> {
    pub fn get(&self, instance: &str) -> Option<&T> {
        self.0.iter().find(|t| t.instance_name() == instance)
    }
}

impl<'de, T: DeserializeOwned + InstanceEntry> Deserialize<'de> for InstanceMap<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<'de, T: DeserializeOwned + InstanceEntry> Visitor<'de> for V<T> {
            type Value = InstanceMap<T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(
                    "a list of {instance_name: \"NAME\", ...} or a map {INSTANCE_NAME: {...}}",
                )
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut out: Vec<T> = Vec::new();
                while let Some(e) = seq.next_element::<T>()? {
                    if out.iter().any(|o| o.instance_name() == e.instance_name()) {
                        return Err(de::Error::custom(format!(
                            "instance name {:?} is configured twice",
                            e.instance_name()
                        )));
                    }
                    out.push(e);
                }
                Ok(InstanceMap(out))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some(name) = map.next_key::<String>()? {
                    let mut e: T = map.next_value()?;
                    e.set_instance_name(name);
                    out.push(e);
                }
                Ok(InstanceMap(out))
            }
        }
        d.deserialize_any(V(PhantomData))
    }
}
