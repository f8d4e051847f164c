//! Platform property matching: which workers can run which actions.
//!
//! An action's properties are normalised into a [`Shape`] (its `exact` pairs, its `minimum`
//! amounts and its `priority` preferences, each sorted). Every action with the same shape is
//! interchangeable for matching, so the scheduler indexes queues and workers per shape and
//! only ever scans the (few) distinct shapes, never the queue.
//!
//! A worker can *ever* run a shape ([`WorkerCaps::can_run`]) when it offers every exact pair
//! and at least every minimum amount in total; it can run it *now* ([`Capacity::fits`]) when,
//! in addition, it has a free slot and enough of every minimum amount left over.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use crate::config::{PropertyType, SchedulerOptions};

/// An action's platform requirements, normalised.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct Shape {
    /// (name, value) the worker must offer; sorted, no duplicates.
    pub exact: Vec<(String, String)>,
    /// (name, amount) the worker must have free; sorted by name, one entry per name (the
    /// largest amount asked for when a name repeats).
    pub minimum: Vec<(String, u64)>,
    /// (name, value) a worker preferably offers; sorted, no duplicates.
    pub preferred: Vec<(String, String)>,
}

fn parse_amount(value: &str) -> Option<u64> {
    value.trim().parse().ok()
}

impl Shape {
    /// Normalises an action's platform. Fails (with the message for FAILED_PRECONDITION) when
    /// a `minimum` property's value is not an unsigned integer.
    pub fn from_platform(
        platform: &[(String, String)],
        opts: &SchedulerOptions,
    ) -> Result<Shape, String> {
        let mut exact = Vec::new();
        let mut minimum: BTreeMap<String, u64> = BTreeMap::new();
        let mut preferred = Vec::new();
        for (name, value) in platform {
            match opts.property_type(name) {
                PropertyType::Exact => exact.push((name.clone(), value.clone())),
                PropertyType::Minimum => {
                    let need = parse_amount(value).ok_or_else(|| {
                        format!(
                            "platform property \"{name}\" is matched as minimum, but its value \
                             \"{value}\" is not an unsigned integer"
                        )
                    })?;
                    let entry = minimum.entry(name.clone()).or_insert(0);
                    *entry = (*entry).max(need);
                }
                PropertyType::Priority => preferred.push((name.clone(), value.clone())),
                PropertyType::Ignore => {}
            }
        }
        exact.sort();
        exact.dedup();
        preferred.sort();
        preferred.dedup();
        Ok(Shape {
            exact,
            minimum: minimum.into_iter().collect(),
            preferred,
        })
    }
}

/// What a worker offers, parsed once at registration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct WorkerCaps {
    /// Properties matched by value (everything not `minimum`): name -> values offered.
    values: BTreeMap<String, BTreeSet<String>>,
    /// `minimum` properties: name -> total amount.
    totals: BTreeMap<String, u64>,
}

impl WorkerCaps {
    /// Fails (with a reason for the operator) when a `minimum` property is not an unsigned
    /// integer or is given twice.
    pub fn parse(properties: &[(String, String)], opts: &SchedulerOptions) -> Result<Self, String> {
        let mut values: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        let mut totals = BTreeMap::new();
        for (name, value) in properties {
            if opts.property_type(name) == PropertyType::Minimum {
                let amount = parse_amount(value).ok_or_else(|| {
                    format!(
                        "platform property \"{name}\" is matched as minimum, but the worker's \
                         value \"{value}\" is not an unsigned integer"
                    )
                })?;
                if totals.insert(name.clone(), amount).is_some() {
                    return Err(format!(
                        "platform property \"{name}\" is matched as minimum and may be given \
                         only once"
                    ));
                }
            } else {
                values
                    .entry(name.clone())
                    .or_default()
                    .insert(value.clone());
            }
        }
        Ok(WorkerCaps { values, totals })
    }

    fn offers(&self, name: &str, value: &str) -> bool {
        self.values.get(name).is_some_and(|v| v.contains(value))
    }

    fn total(&self, name: &str) -> Option<u64> {
        self.totals.get(name).copied()
    }

    pub fn totals(&self) -> &BTreeMap<String, u64> {
        &self.totals
    }

    /// Whether the worker could run the shape when idle (load is not considered).
    pub fn can_run(&self, shape: &Shape) -> bool {
        shape.exact.iter().all(|(n, v)| self.offers(n, v))
            && shape
                .minimum
                .iter()
                .all(|(n, need)| self.total(n).is_some_and(|t| t >= *need))
    }

    /// How many of the shape's preferred (name, value) pairs the worker does not offer: the
    /// first part of the worker order, so that matching workers come first.
    pub fn mismatches(&self, shape: &Shape) -> u32 {
        let missing = shape
            .preferred
            .iter()
            .filter(|(n, v)| !self.offers(n, v))
            .count();
        u32::try_from(missing).unwrap_or(u32::MAX)
    }
}

/// What a worker has free right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Capacity {
    pub free_slots: u32,
    pub free: BTreeMap<String, u64>,
}

impl Capacity {
    pub fn new(slots: u32, caps: &WorkerCaps) -> Self {
        Capacity {
            free_slots: slots,
            free: caps.totals().clone(),
        }
    }

    /// Whether an action of this shape can start now (the worker must be able to run it).
    pub fn fits(&self, shape: &Shape) -> bool {
        self.free_slots > 0
            && shape
                .minimum
                .iter()
                .all(|(n, need)| self.free.get(n).is_some_and(|f| f >= need))
    }

    /// Takes a slot and the shape's minimum amounts. Call only when [`Capacity::fits`].
    pub fn take(&mut self, shape: &Shape) {
        self.free_slots = self.free_slots.saturating_sub(1);
        for (name, need) in &shape.minimum {
            if let Some(f) = self.free.get_mut(name) {
                *f = f.saturating_sub(*need);
            }
        }
    }

    /// Gives back what [`Capacity::take`] took.
    pub fn give_back(&mut self, shape: &Shape) {
        self.free_slots += 1;
        for (name, need) in &shape.minimum {
            if let Some(f) = self.free.get_mut(name) {
                *f = f.saturating_add(*need);
            }
        }
    }
}

/// Says why no registered worker can run `shape`, naming the first property (name and value)
/// that no worker offers, or the combination when each is offered by some worker but none
/// offers all of them.
pub(crate) fn explain_unsatisfiable(shape: &Shape, workers: &[&WorkerCaps]) -> String {
    for (name, value) in &shape.exact {
        if !workers.iter().any(|w| w.offers(name, value)) {
            return format!("no registered worker offers platform property \"{name}\"=\"{value}\"");
        }
    }
    for (name, need) in &shape.minimum {
        if !workers
            .iter()
            .any(|w| w.total(name).is_some_and(|t| t >= *need))
        {
            let largest = workers.iter().filter_map(|w| w.total(name)).max();
            let mut msg = format!(
                "no registered worker offers platform property \"{name}\" >= {need} (minimum)"
            );
            match largest {
                Some(l) => {
                    let _ = write!(msg, "; the largest offered is {l}");
                }
                None => msg.push_str("; no worker offers it at all"),
            }
            return msg;
        }
    }
    if workers.is_empty() {
        return "no worker is registered".to_string();
    }
    let mut all: Vec<String> = shape
        .exact
        .iter()
        .map(|(n, v)| format!("\"{n}\"=\"{v}\""))
        .collect();
    all.extend(shape.minimum.iter().map(|(n, a)| format!("\"{n}\" >= {a}")));
    format!(
        "no single registered worker offers all of the platform properties {}",
        all.join(", ")
    )
}

/// Why none of `workers` (each a worker's registered properties) could ever run an action of
/// `platform`, or `None` when one could: the rule of the core's unschedulable check, for a
/// driver that keeps its queue elsewhere (shared scheduler state). A platform the core would
/// refuse (a `minimum` value that is not a number) has its reason too; workers whose
/// registration the core would refuse are left out.
pub fn unschedulable(
    platform: &[(String, String)],
    workers: &[Vec<(String, String)>],
    opts: &SchedulerOptions,
) -> Option<String> {
    let shape = match Shape::from_platform(platform, opts) {
        Ok(s) => s,
        Err(why) => return Some(why),
    };
    let caps: Vec<WorkerCaps> = workers
        .iter()
        .filter_map(|w| WorkerCaps::parse(w, opts).ok())
        .collect();
    if caps.iter().any(|c| c.can_run(&shape)) {
        return None;
    }
    let refs: Vec<&WorkerCaps> = caps.iter().collect();
    Some(explain_unsatisfiable(&shape, &refs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unschedulable_names_the_missing_property_or_says_nothing() {
        let o = opts();
        let linux = vec![props(&[("os", "linux"), ("cpu_count", "8")])];
        assert_eq!(unschedulable(&props(&[("os", "linux")]), &linux, &o), None);
        assert_eq!(
            unschedulable(&props(&[("cpu_count", "4"), ("label", "x")]), &linux, &o),
            None
        );
        let why = unschedulable(&props(&[("os", "windows")]), &linux, &o).unwrap();
        assert!(why.contains("\"os\"=\"windows\""), "{why}");
        let why = unschedulable(&props(&[("cpu_count", "16")]), &linux, &o).unwrap();
        assert!(why.contains("the largest offered is 8"), "{why}");
        let why = unschedulable(&props(&[("cpu_count", "many")]), &linux, &o).unwrap();
        assert!(why.contains("not an unsigned integer"), "{why}");
        assert!(
            unschedulable(&props(&[]), &[], &o).is_some(),
            "no worker at all"
        );
        // A worker the core would refuse counts for nothing.
        let bad = vec![props(&[("os", "linux"), ("cpu_count", "x")])];
        assert!(unschedulable(&props(&[("os", "linux")]), &bad, &o).is_some());
    }

    fn opts() -> SchedulerOptions {
        let mut o = SchedulerOptions::default();
        let p = &mut o.supported_platform_properties;
        p.insert("cpu_count".into(), PropertyType::Minimum);
        p.insert("memory_kb".into(), PropertyType::Minimum);
        p.insert("pool".into(), PropertyType::Priority);
        p.insert("label".into(), PropertyType::Ignore);
        p.insert("os".into(), PropertyType::Exact);
        o
    }

    fn props(p: &[(&str, &str)]) -> Vec<(String, String)> {
        p.iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    fn shape(p: &[(&str, &str)]) -> Shape {
        Shape::from_platform(&props(p), &opts()).unwrap()
    }

    fn caps(p: &[(&str, &str)]) -> WorkerCaps {
        WorkerCaps::parse(&props(p), &opts()).unwrap()
    }

    #[test]
    fn exact_needs_the_same_pair_and_unlisted_names_are_exact() {
        let w = caps(&[("os", "linux"), ("arch", "x86_64"), ("arch", "amd64")]);
        assert!(w.can_run(&shape(&[("os", "linux")])));
        assert!(!w.can_run(&shape(&[("os", "windows")])));
        // `arch` is not configured: exact. A worker may offer several values of one name.
        assert!(w.can_run(&shape(&[("arch", "amd64"), ("arch", "x86_64")])));
        assert!(!w.can_run(&shape(&[("arch", "arm64")])));
        assert!(!w.can_run(&shape(&[("gpu", "yes")])));
    }

    #[test]
    fn minimum_compares_numbers_and_is_consumed() {
        let w = caps(&[("cpu_count", "8")]);
        let four = shape(&[("cpu_count", "4")]);
        assert!(w.can_run(&four));
        assert!(w.can_run(&shape(&[("cpu_count", "8")])));
        assert!(!w.can_run(&shape(&[("cpu_count", "9")])));
        assert!(!caps(&[]).can_run(&four), "a worker without the property");
        let mut cap = Capacity::new(10, &w);
        assert!(cap.fits(&four));
        cap.take(&four);
        assert!(cap.fits(&four));
        cap.take(&four);
        assert!(!cap.fits(&four), "8 cpus run two actions of 4, not three");
        cap.give_back(&four);
        assert!(cap.fits(&four));
    }

    #[test]
    fn slots_limit_fits() {
        let w = caps(&[]);
        let s = shape(&[]);
        let mut cap = Capacity::new(1, &w);
        assert!(cap.fits(&s));
        cap.take(&s);
        assert!(!cap.fits(&s));
    }

    #[test]
    fn repeated_minimum_asks_for_the_largest() {
        assert_eq!(
            shape(&[("cpu_count", "2"), ("cpu_count", "6")]).minimum,
            vec![("cpu_count".to_string(), 6)]
        );
    }

    #[test]
    fn non_numeric_minimum_is_refused_with_the_property_named() {
        let err = Shape::from_platform(&props(&[("cpu_count", "lots")]), &opts()).unwrap_err();
        assert!(err.contains("cpu_count") && err.contains("lots"), "{err}");
        let err = WorkerCaps::parse(&props(&[("memory_kb", "1G")]), &opts()).unwrap_err();
        assert!(err.contains("memory_kb"), "{err}");
        let err = WorkerCaps::parse(&props(&[("cpu_count", "1"), ("cpu_count", "2")]), &opts())
            .unwrap_err();
        assert!(err.contains("only once"), "{err}");
    }

    #[test]
    fn priority_does_not_restrict_but_ranks() {
        let s = shape(&[("pool", "fast")]);
        let fast = caps(&[("pool", "fast")]);
        let slow = caps(&[("pool", "slow")]);
        assert!(fast.can_run(&s) && slow.can_run(&s) && caps(&[]).can_run(&s));
        assert_eq!(fast.mismatches(&s), 0);
        assert_eq!(slow.mismatches(&s), 1);
    }

    #[test]
    fn ignore_is_not_considered() {
        let s = shape(&[("label", "whatever")]);
        assert_eq!(s, shape(&[]));
        assert!(caps(&[]).can_run(&s));
    }

    #[test]
    fn explanation_names_the_missing_property() {
        let linux = caps(&[("os", "linux"), ("cpu_count", "8")]);
        let mac = caps(&[("os", "mac"), ("cpu_count", "2")]);
        let workers = [&linux, &mac];
        let msg = explain_unsatisfiable(&shape(&[("os", "windows")]), &workers);
        assert!(msg.contains("\"os\"=\"windows\""), "{msg}");
        let msg = explain_unsatisfiable(&shape(&[("cpu_count", "16")]), &workers);
        assert!(
            msg.contains("\"cpu_count\" >= 16") && msg.contains("8"),
            "{msg}"
        );
        let msg = explain_unsatisfiable(&shape(&[("os", "mac"), ("cpu_count", "8")]), &workers);
        assert!(msg.contains("all of"), "{msg}");
        let msg = explain_unsatisfiable(&shape(&[("os", "linux")]), &[]);
        assert!(msg.contains("\"os\"=\"linux\""), "{msg}");
        assert_eq!(
            explain_unsatisfiable(&shape(&[]), &[]),
            "no worker is registered"
        );
    }
}
