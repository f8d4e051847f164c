//! `cairn check-config`: parse, check every name a service uses, print the resolved trees.

use std::path::Path;
use std::process::ExitCode;

use cairn_config::schedulers::SchedulerBackend;
use cairn_config::stores::StoreSpec;
use cairn_config::{CairnConfig, ConfigError, SchedulerSpec};

pub fn check_config(path: &Path) -> ExitCode {
    let file = path.display().to_string();
    let cfg = match CairnConfig::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = validate(&file, &cfg) {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    print!("{}", describe(&cfg));
    for w in warnings(&cfg) {
        eprintln!("warning: {file}: {w}");
    }
    // What `cairn run` would refuse before it starts anything.
    if let Err(e) = check_parts(&file, &cfg) {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    println!("{file}: ok");
    ExitCode::SUCCESS
}

/// `services.cas[].experimental_chunking`: the average chunk size is within the REAPI's
/// bounds, and the index store exists, is not the CAS itself and is given exactly when the CAS
/// is not a `grpc` store.
fn check_chunking(
    file: &str,
    cfg: &CairnConfig,
    cas_store: &str,
    ch: &cairn_config::servers::CasChunking,
    at: &str,
    store: &dyn Fn(&str, String) -> Result<(), ConfigError>,
) -> Result<(), ConfigError> {
    use cairn_config::servers::CasChunking;
    let avg = ch.avg_chunk_size();
    if !(CasChunking::MIN_AVG_CHUNK_SIZE_BYTES..=CasChunking::MAX_AVG_CHUNK_SIZE_BYTES)
        .contains(&avg)
    {
        return Err(ConfigError::new(
            file,
            format!("{at}.avg_chunk_size_bytes"),
            format!("{avg} is out of range: expected 1024 (1 KiB) to 1048576 (1 MiB)"),
        ));
    }
    let cas_is_grpc = matches!(cfg.stores.get(cas_store), Some(StoreSpec::Grpc(_)));
    match (&ch.index_store, cas_is_grpc) {
        (None, false) => Err(ConfigError::new(
            file,
            format!("{at}.index_store"),
            "missing: name the store that keeps chunk layouts (required unless cas_store is a grpc store)",
        )),
        (Some(_), true) => Err(ConfigError::new(
            file,
            format!("{at}.index_store"),
            format!(
                "cas_store {cas_store:?} is a grpc store, whose server keeps the chunk layouts; remove index_store"
            ),
        )),
        (Some(i), false) if i == cas_store => Err(ConfigError::new(
            file,
            format!("{at}.index_store"),
            format!(
                "{i:?} is the cas_store: layouts written into the CAS would overwrite blobs; name another store"
            ),
        )),
        (Some(i), false) => store(i, format!("{at}.index_store")),
        (None, true) => Ok(()),
    }
}

/// Whether the scheduler at the bottom of `spec` is a `grpc` one.
fn forwards(spec: &SchedulerSpec) -> bool {
    match spec {
        SchedulerSpec::Grpc(_) => true,
        SchedulerSpec::Simple(_) => false,
        SchedulerSpec::CacheLookup(c) => forwards(&c.scheduler),
        SchedulerSpec::PropertyModifier(p) => forwards(&p.scheduler),
        SchedulerSpec::HistoricalResource(h) => forwards(&h.scheduler),
    }
}

/// Every store and scheduler a service names exists.
pub fn validate(file: &str, cfg: &CairnConfig) -> Result<(), ConfigError> {
    let store = |name: &str, at: String| -> Result<(), ConfigError> {
        if cfg.stores.get(name).is_some() {
            return Ok(());
        }
        let known: Vec<&str> = cfg.stores.iter().map(|n| n.name.as_str()).collect();
        Err(ConfigError::new(
            file,
            at,
            format!("no store named {name:?}; stores are: {}", known.join(", ")),
        ))
    };
    let scheduler = |name: &str, at: String| -> Result<(), ConfigError> {
        if cfg.schedulers.get(name).is_some() {
            return Ok(());
        }
        let known: Vec<&str> = cfg.schedulers.iter().map(|n| n.name.as_str()).collect();
        Err(ConfigError::new(
            file,
            at,
            format!(
                "no scheduler named {name:?}; schedulers are: {}",
                known.join(", ")
            ),
        ))
    };
    for named in cfg.stores.iter() {
        check_refs(file, cfg, &named.spec, &format!("stores.{}", named.name))?;
    }
    for named in cfg.schedulers.iter() {
        check_backend(
            file,
            cfg,
            &named.spec,
            &format!("schedulers.{}", named.name),
        )?;
    }
    for (i, s) in cfg.servers.iter().enumerate() {
        let Some(sv) = &s.services else { continue };
        let p = format!("servers[{i}].services");
        for c in sv.cas.iter().flat_map(|m| m.0.iter()) {
            store(
                &c.cas_store,
                format!("{p}.cas.{}.cas_store", c.instance_name),
            )?;
            if let Some(ch) = &c.experimental_chunking {
                let at = format!("{p}.cas.{}.experimental_chunking", c.instance_name);
                check_chunking(file, cfg, &c.cas_store, ch, &at, &store)?;
            }
        }
        for c in sv.ac.iter().flat_map(|m| m.0.iter()) {
            store(&c.ac_store, format!("{p}.ac.{}.ac_store", c.instance_name))?;
        }
        for c in sv.bytestream.iter().flat_map(|b| b.instances()) {
            store(
                &c.cas_store,
                format!("{p}.bytestream.{}.cas_store", c.instance_name),
            )?;
        }
        for c in sv.execution.iter().flat_map(|m| m.0.iter()) {
            store(
                &c.cas_store,
                format!("{p}.execution.{}.cas_store", c.instance_name),
            )?;
            scheduler(
                &c.scheduler,
                format!("{p}.execution.{}.scheduler", c.instance_name),
            )?;
        }
        for c in sv.capabilities.iter().flat_map(|m| m.0.iter()) {
            if let Some(re) = &c.remote_execution {
                scheduler(
                    &re.scheduler,
                    format!(
                        "{p}.capabilities.{}.remote_execution.scheduler",
                        c.instance_name
                    ),
                )?;
            }
        }
        for f in sv.fetch.iter().flat_map(|m| m.0.iter()) {
            store(
                &f.fetch_store,
                format!("{p}.fetch.{}.fetch_store", f.instance_name),
            )?;
        }
        for f in sv.push.iter().flat_map(|m| m.0.iter()) {
            store(
                &f.push_store,
                format!("{p}.push.{}.push_store", f.instance_name),
            )?;
        }
        if let Some(b) = &sv.experimental_bep {
            store(&b.store, format!("{p}.experimental_bep.store"))?;
        }
        if let Some(u) = &sv.web_ui {
            for (key, name) in [
                ("bep_store", &u.bep_store),
                ("cas_store", &u.cas_store),
                ("ac_store", &u.ac_store),
            ] {
                if let Some(n) = name {
                    store(n, format!("{p}.web_ui.{key}"))?;
                }
            }
            for (i, s) in u.schedulers.iter().enumerate() {
                scheduler(s, format!("{p}.web_ui.schedulers[{i}]"))?;
            }
        }
        if let Some(w) = &sv.worker_api {
            scheduler(&w.scheduler, format!("{p}.worker_api.scheduler"))?;
            if cfg.schedulers.get(&w.scheduler).is_some_and(forwards) {
                return Err(ConfigError::new(
                    file,
                    format!("{p}.worker_api.scheduler"),
                    format!(
                        "{:?} is a grpc scheduler, which forwards to another scheduler and has no \
                         workers; serve the worker API where that scheduler runs",
                        w.scheduler
                    ),
                ));
            }
        }
    }
    if let Some(o) = &cfg.experimental_origin_events {
        store(
            &o.publisher.store,
            "experimental_origin_events.publisher.store".into(),
        )?;
    }
    Ok(())
}

/// What the config asks for that works but is a hazard, one message per finding (each starts
/// with its key path): a `dedup` whose index and content share a place, an action cache that
/// shares a store or a place with a CAS. `check-config` prints them; `run` logs them.
pub fn warnings(cfg: &CairnConfig) -> Vec<String> {
    let mut out = Vec::new();
    for named in cfg.stores.iter() {
        out.extend(cairn_store::spec_warnings(
            &named.spec,
            &format!("stores.{}", named.name),
        ));
    }
    let mut cas_stores: Vec<(&str, String)> = Vec::new();
    let mut ac_stores: Vec<(&str, String)> = Vec::new();
    for (i, s) in cfg.servers.iter().enumerate() {
        let Some(sv) = &s.services else { continue };
        let p = format!("servers[{i}].services");
        for c in sv.cas.iter().flat_map(|m| m.0.iter()) {
            cas_stores.push((
                &c.cas_store,
                format!("{p}.cas.{}.cas_store", c.instance_name),
            ));
        }
        for c in sv.ac.iter().flat_map(|m| m.0.iter()) {
            ac_stores.push((&c.ac_store, format!("{p}.ac.{}.ac_store", c.instance_name)));
        }
    }
    out.extend(cas_and_ac_apart(cfg, &cas_stores, &ac_stores));
    out
}

/// An action cache that shares a store, or a place (bucket and prefix, Redis prefix,
/// directory), with a CAS: an action's result is kept under the action's digest, which is also
/// the CAS key of the Action message itself, so each overwrites the other (a CAS read of the
/// Action then fails: its length or hash is wrong). NativeLink 1.6.6's `redis.json5` example
/// has this shape.
fn cas_and_ac_apart(
    cfg: &CairnConfig,
    cas: &[(&str, String)],
    ac: &[(&str, String)],
) -> Vec<String> {
    let mut out = Vec::new();
    for (ac_name, ac_at) in ac {
        let ac_places = cairn_store::places_of(&cfg.stores, ac_name);
        for (cas_name, cas_at) in cas {
            if ac_name == cas_name {
                out.push(format!(
                    "{ac_at}: {ac_name:?} is also a CAS ({cas_at}); an action's result is kept \
                     under the action's digest, which is the Action's own key in the CAS, so \
                     each overwrites the other: give the action cache a store of its own"
                ));
                continue;
            }
            let cas_places = cairn_store::places_of(&cfg.stores, cas_name);
            let shared = ac_places.iter().find_map(|(place, ac_leaf)| {
                let (_, cas_leaf) = cas_places.iter().find(|(p, _)| p == place)?;
                Some((place, ac_leaf, cas_leaf))
            });
            if let Some((place, ac_leaf, cas_leaf)) = shared {
                out.push(format!(
                    "{ac_at}: the action cache {ac_name:?} and the CAS {cas_name:?} ({cas_at}) \
                     both keep entries in {place} ({ac_leaf} and {cas_leaf}); an action's \
                     result and the Action message share a key there and overwrite each \
                     other: give them different key_prefix (or content_path) values, or \
                     different buckets"
                ));
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

/// The checks `cairn run` makes before it builds anything (the same functions): store kinds
/// and `grpc` endpoints, schedulers, listeners (TLS files load, the worker API stands alone,
/// limits), local workers (every key: `workers::check`).
fn check_parts(file: &str, cfg: &CairnConfig) -> anyhow::Result<()> {
    let err = |e: cairn_core::Error| anyhow::anyhow!("{file}: {e}");
    for named in cfg.stores.iter() {
        cairn_store::check_spec(&named.spec, &format!("stores.{}", named.name)).map_err(err)?;
    }
    for named in cfg.schedulers.iter() {
        cairn_server::execution::pipeline::check(
            &named.spec,
            &format!("schedulers.{}", named.name),
        )
        .map_err(err)?;
    }
    for (i, s) in cfg.servers.iter().enumerate() {
        cairn_server::check_listener(i, s, cairn_server::Limits::default()).map_err(err)?;
    }
    for (i, w) in cfg.local_workers().into_iter().enumerate() {
        crate::workers::check(file, i, w, &|name| cfg.stores.get(name).is_some())?;
    }
    Ok(())
}

fn check_refs(
    file: &str,
    cfg: &CairnConfig,
    spec: &StoreSpec,
    at: &str,
) -> Result<(), ConfigError> {
    if let StoreSpec::RefStore(r) = spec {
        if cfg.stores.get(&r.name).is_none() {
            return Err(ConfigError::new(
                file,
                format!("{at}.ref_store.name"),
                format!("no store named {:?}", r.name),
            ));
        }
    }
    for (key, child) in spec.children() {
        check_refs(file, cfg, child, &format!("{at}.{}.{key}", spec.kind()))?;
    }
    Ok(())
}

/// A `simple` scheduler's shared state names a top-level `redis_store`.
fn check_backend(
    file: &str,
    cfg: &CairnConfig,
    spec: &SchedulerSpec,
    at: &str,
) -> Result<(), ConfigError> {
    match spec {
        SchedulerSpec::Simple(s) => {
            let Some(SchedulerBackend::Redis(r)) = &s.experimental_backend else {
                return Ok(());
            };
            let at = format!("{at}.simple.experimental_backend.redis.redis_store");
            match cfg.stores.get(&r.redis_store) {
                Some(StoreSpec::RedisStore(_)) => Ok(()),
                Some(other) => Err(ConfigError::new(
                    file,
                    at,
                    format!(
                        "store {:?} is a {}; shared scheduler state needs a redis_store",
                        r.redis_store,
                        other.kind()
                    ),
                )),
                None => Err(ConfigError::new(
                    file,
                    at,
                    format!("no store named {:?}", r.redis_store),
                )),
            }
        }
        SchedulerSpec::CacheLookup(c) => check_backend(
            file,
            cfg,
            &c.scheduler,
            &format!("{at}.cache_lookup.scheduler"),
        ),
        SchedulerSpec::PropertyModifier(p) => check_backend(
            file,
            cfg,
            &p.scheduler,
            &format!("{at}.property_modifier.scheduler"),
        ),
        SchedulerSpec::HistoricalResource(h) => check_backend(
            file,
            cfg,
            &h.scheduler,
            &format!("{at}.historical_resource.scheduler"),
        ),
        SchedulerSpec::Grpc(_) => Ok(()),
    }
}

/// The resolved store and scheduler trees, indented.
pub fn describe(cfg: &CairnConfig) -> String {
    let mut out = String::from("stores:\n");
    for n in cfg.stores.iter() {
        store_tree(&mut out, &n.name, &n.spec, 1);
    }
    out.push_str("schedulers:\n");
    for n in cfg.schedulers.iter() {
        scheduler_tree(&mut out, &n.name, &n.spec, 1);
    }
    out.push_str("servers:\n");
    for (i, s) in cfg.servers.iter().enumerate() {
        let h = s.listener.http();
        let mut services = Vec::new();
        if let Some(sv) = &s.services {
            for (k, on) in [
                ("cas", sv.cas.is_some()),
                ("ac", sv.ac.is_some()),
                ("bytestream", sv.bytestream.is_some()),
                ("capabilities", sv.capabilities.is_some()),
                ("execution", sv.execution.is_some()),
                ("worker_api", sv.worker_api.is_some()),
                ("health", sv.health.is_some()),
                ("experimental_bep", sv.experimental_bep.is_some()),
                ("web_ui", sv.web_ui.is_some()),
            ] {
                if on {
                    services.push(k);
                }
            }
        }
        out.push_str(&format!(
            "  [{i}] {} on {}{}: {}\n",
            s.name.as_deref().unwrap_or("server"),
            h.socket_address,
            if h.tls.is_some() { " (tls)" } else { "" },
            services.join(", ")
        ));
    }
    out
}

fn store_tree(out: &mut String, label: &str, spec: &StoreSpec, depth: usize) {
    let pad = "  ".repeat(depth);
    let detail = match spec {
        StoreSpec::Memory(m) => policy(m.eviction_policy.as_ref()),
        StoreSpec::Filesystem(f) => format!(
            " content_path={}{}",
            f.content_path,
            policy(f.eviction_policy.as_ref())
        ),
        StoreSpec::Verify(v) => format!(
            " verify_size={} verify_hash={}",
            v.verify_size, v.verify_hash
        ),
        StoreSpec::SizePartitioning(s) => format!(" size={}", s.size.0),
        StoreSpec::RefStore(r) => format!(" -> {}", r.name),
        StoreSpec::ExperimentalCloudObjectStore(c) => format!(
            " provider={} {}={} key_prefix={}",
            c.provider.as_deref().unwrap_or("?"),
            if c.container.is_some() {
                "container"
            } else {
                "bucket"
            },
            c.bucket
                .as_deref()
                .or(c.container.as_deref())
                .unwrap_or("?"),
            c.key_prefix.as_deref().unwrap_or("")
        ),
        StoreSpec::RedisStore(r) => format!(
            " mode={} addresses={} key_prefix={}",
            match r.mode {
                cairn_config::stores::RedisMode::Standard => "standard",
                cairn_config::stores::RedisMode::Sentinel => "sentinel",
                cairn_config::stores::RedisMode::Cluster => "cluster",
            },
            r.addresses
                .iter()
                .map(|a| redact_userinfo(a))
                .collect::<Vec<_>>()
                .join(","),
            r.key_prefix.as_deref().unwrap_or("")
        ),
        _ => String::new(),
    };
    out.push_str(&format!("{pad}{label}: {}{detail}\n", spec.kind()));
    for (key, child) in spec.children() {
        store_tree(out, key, child, depth + 1);
    }
}

/// `redis://user:secret@host` -> `redis://***@host`: passwords stay out of printed trees.
fn redact_userinfo(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}***{}", &url[..s + 3], &url[at..]),
        _ => url.to_string(),
    }
}

fn policy(p: Option<&cairn_config::stores::EvictionPolicy>) -> String {
    match p {
        Some(p) if p.max_bytes.0 > 0 => format!(" max_bytes={}", p.max_bytes.0),
        _ => String::new(),
    }
}

fn scheduler_tree(out: &mut String, label: &str, spec: &SchedulerSpec, depth: usize) {
    let pad = "  ".repeat(depth);
    match spec {
        SchedulerSpec::Simple(s) => out.push_str(&format!(
            "{pad}{label}: simple worker_timeout_s={} max_job_retries={} allocation_strategy={:?}{}\n",
            s.worker_timeout_s.unwrap_or(5),
            s.max_job_retries.unwrap_or(3),
            s.allocation_strategy,
            match &s.experimental_backend {
                Some(SchedulerBackend::Redis(r)) => format!(" backend=redis({})", r.redis_store),
                _ => String::new(),
            }
        )),
        SchedulerSpec::CacheLookup(c) => {
            out.push_str(&format!("{pad}{label}: cache_lookup\n"));
            store_tree(out, "ac_store", &c.ac_store, depth + 1);
            scheduler_tree(out, "scheduler", &c.scheduler, depth + 1);
        }
        SchedulerSpec::PropertyModifier(p) => {
            out.push_str(&format!("{pad}{label}: property_modifier ({} modifications)\n", p.modifications.len()));
            scheduler_tree(out, "scheduler", &p.scheduler, depth + 1);
        }
        SchedulerSpec::HistoricalResource(h) => {
            out.push_str(&format!(
                "{pad}{label}: historical_resource hints_file={}\n",
                h.hints_file
            ));
            scheduler_tree(out, "scheduler", &h.scheduler, depth + 1);
        }
        SchedulerSpec::Grpc(g) => out.push_str(&format!(
            "{pad}{label}: grpc endpoint={}\n",
            g.endpoint.address
        )),
    }
}
