//! The `historical_resource` scheduler kind: resource hints from a JSON file raise the CPU
//! and memory platform properties of the actions they name before scheduling, so that an
//! action that history says needs 12 GB does not land on a worker with 2.
//!
//! A hint names a `target_id`, an `action_mnemonic` or both (the fields of the client's
//! `RequestMetadata`), and gives `cpu_count` and `memory_kb` (or `memory_mib`). An action
//! takes the hint for its target and mnemonic, else for its target alone, else for its
//! mnemonic alone. Each property becomes the larger of the action's value and the hint's (a
//! value that is not a number is left as it is); an absent one is added.
//!
//! The file is read at start and again every `refresh_interval_s` by a background task; one
//! that is missing or does not parse is logged, and the hints loaded before stay.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::RwLock;
use serde::Deserialize;

/// Largest hints file read.
const MAX_HINTS_FILE: u64 = 64 << 20;

#[derive(Debug, Clone, Deserialize)]
struct Hint {
    #[serde(default)]
    target_id: Option<String>,
    #[serde(default)]
    action_mnemonic: Option<String>,
    #[serde(default)]
    cpu_count: Option<u64>,
    #[serde(default)]
    memory_kb: Option<u64>,
    #[serde(default)]
    memory_mib: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum HintFile {
    List(Vec<Hint>),
    Object { hints: Vec<Hint> },
}

/// (target_id, action_mnemonic), each `None` when the hint does not name it.
type Key = (Option<String>, Option<String>);

/// What a hint raises.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Minimums {
    cpu: Option<u64>,
    memory_kb: Option<u64>,
}

/// The hints of one `historical_resource` scheduler.
pub struct HistoricalHints {
    file: PathBuf,
    cpu_property: String,
    memory_property: String,
    hints: RwLock<Arc<HashMap<Key, Minimums>>>,
}

impl HistoricalHints {
    /// Reads the file once (a failure is logged: no hints until a reload works) and, with a
    /// refresh interval, rereads it in the background for as long as the hints are in use.
    pub async fn start(
        file: PathBuf,
        refresh: Option<Duration>,
        cpu_property: String,
        memory_property: String,
    ) -> Arc<HistoricalHints> {
        let hints = Arc::new(HistoricalHints {
            file,
            cpu_property,
            memory_property,
            hints: RwLock::new(Arc::new(HashMap::new())),
        });
        hints.reload().await;
        if let Some(every) = refresh {
            let weak = Arc::downgrade(&hints);
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                tick.tick().await;
                loop {
                    tick.tick().await;
                    let Some(hints) = weak.upgrade() else { return };
                    hints.reload().await;
                }
            });
        }
        hints
    }

    async fn reload(&self) {
        match self.read().await {
            Ok(map) => {
                tracing::debug!(file = %self.file.display(), hints = map.len(), "historical resource hints loaded");
                *self.hints.write() = Arc::new(map);
            }
            Err(why) => {
                tracing::warn!(file = %self.file.display(), "historical resource hints not (re)loaded, the previous ones stay: {why}")
            }
        }
    }

    async fn read(&self) -> Result<HashMap<Key, Minimums>, String> {
        let meta = tokio::fs::metadata(&self.file)
            .await
            .map_err(|e| e.to_string())?;
        if meta.len() > MAX_HINTS_FILE {
            return Err(format!(
                "{} bytes is more than the {} bytes a hints file may have",
                meta.len(),
                MAX_HINTS_FILE
            ));
        }
        let text = tokio::fs::read(&self.file)
            .await
            .map_err(|e| e.to_string())?;
        let parsed: HintFile = serde_json::from_slice(&text).map_err(|e| e.to_string())?;
        let list = match parsed {
            HintFile::List(l) | HintFile::Object { hints: l } => l,
        };
        let mut map = HashMap::new();
        for h in list {
            let nonempty = |s: Option<String>| s.filter(|s| !s.is_empty());
            let key = (nonempty(h.target_id), nonempty(h.action_mnemonic));
            if key == (None, None) {
                continue;
            }
            let memory_kb = h
                .memory_kb
                .or_else(|| h.memory_mib.map(|m| m.saturating_mul(1024)));
            map.insert(
                key,
                Minimums {
                    cpu: h.cpu_count,
                    memory_kb,
                },
            );
        }
        Ok(map)
    }

    /// Raises `platform` to the hint for this target and mnemonic, if there is one.
    pub fn apply(&self, platform: &mut Vec<(String, String)>, target_id: &str, mnemonic: &str) {
        let hints = self.hints.read().clone();
        if hints.is_empty() {
            return;
        }
        let t = (!target_id.is_empty()).then(|| target_id.to_string());
        let m = (!mnemonic.is_empty()).then(|| mnemonic.to_string());
        let found = [(t.clone(), m.clone()), (t.clone(), None), (None, m.clone())]
            .into_iter()
            .filter(|k| *k != (None, None))
            .find_map(|k| hints.get(&k).copied());
        let Some(min) = found else { return };
        if let Some(cpu) = min.cpu {
            raise(platform, &self.cpu_property, cpu);
        }
        if let Some(kb) = min.memory_kb {
            raise(platform, &self.memory_property, kb);
        }
    }
}

/// Every value of `name` becomes at least `min` (values that are not numbers stay); an
/// absent property is added.
fn raise(platform: &mut Vec<(String, String)>, name: &str, min: u64) {
    let mut seen = false;
    for (n, v) in platform.iter_mut() {
        if n == name {
            seen = true;
            if let Ok(have) = v.trim().parse::<u64>() {
                if have < min {
                    *v = min.to_string();
                }
            }
        }
    }
    if !seen {
        platform.push((name.to_string(), min.to_string()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    #[tokio::test]
    async fn hints_raise_minimums_by_target_and_mnemonic_and_reload() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("hints.json");
        std::fs::write(
            &file,
            r#"{"hints": [
                {"target_id": "//pkg:heavy_test", "action_mnemonic": "TestRunner", "cpu_count": 2, "memory_kb": 12000000},
                {"target_id": "//pkg:heavy_test", "cpu_count": 6},
                {"action_mnemonic": "CppLink", "memory_mib": 4096},
                {"cpu_count": 99}
            ]}"#,
        )
        .unwrap();
        let hints =
            HistoricalHints::start(file.clone(), None, "cpu_count".into(), "memory_kb".into())
                .await;

        // Both named: that hint; the larger value of each property wins.
        let mut platform = p(&[
            ("cpu_count", "8"),
            ("memory_kb", "1000"),
            ("OSFamily", "linux"),
        ]);
        hints.apply(&mut platform, "//pkg:heavy_test", "TestRunner");
        assert_eq!(
            platform,
            p(&[
                ("cpu_count", "8"),
                ("memory_kb", "12000000"),
                ("OSFamily", "linux")
            ])
        );
        // The target alone.
        let mut platform = p(&[("cpu_count", "1")]);
        hints.apply(&mut platform, "//pkg:heavy_test", "Javac");
        assert_eq!(platform, p(&[("cpu_count", "6")]));
        // The mnemonic alone, MiB as KiB, added when absent.
        let mut platform = p(&[]);
        hints.apply(&mut platform, "//other:x", "CppLink");
        assert_eq!(platform, p(&[("memory_kb", "4194304")]));
        // No hint (and a hint naming nothing matches nothing).
        let mut platform = p(&[("cpu_count", "1")]);
        hints.apply(&mut platform, "", "");
        hints.apply(&mut platform, "//other:y", "Genrule");
        assert_eq!(platform, p(&[("cpu_count", "1")]));
        // A value that is not a number stays.
        let mut platform = p(&[("cpu_count", "lots")]);
        hints.apply(&mut platform, "//pkg:heavy_test", "");
        assert_eq!(platform, p(&[("cpu_count", "lots")]));

        // A broken rewrite keeps the hints; a good one replaces them.
        std::fs::write(&file, "{not json").unwrap();
        hints.reload().await;
        let mut platform = p(&[]);
        hints.apply(&mut platform, "//pkg:heavy_test", "");
        assert_eq!(platform, p(&[("cpu_count", "6")]));
        std::fs::write(
            &file,
            r#"[{"target_id": "//pkg:heavy_test", "cpu_count": 3}]"#,
        )
        .unwrap();
        hints.reload().await;
        let mut platform = p(&[]);
        hints.apply(&mut platform, "//pkg:heavy_test", "");
        assert_eq!(platform, p(&[("cpu_count", "3")]));
    }

    #[tokio::test]
    async fn a_missing_file_means_no_hints() {
        let hints = HistoricalHints::start(
            PathBuf::from("/nonexistent/hints.json"),
            Some(Duration::from_secs(30)),
            "cpu".into(),
            "mem".into(),
        )
        .await;
        let mut platform = p(&[("cpu", "1")]);
        hints.apply(&mut platform, "//a:b", "X");
        assert_eq!(platform, p(&[("cpu", "1")]));
    }
}
