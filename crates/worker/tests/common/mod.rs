//! Test kit for the worker pipeline: memory stores, an `ActionRunner` over a temporary work
//! root, and builders for Directory trees, Commands and Actions.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cairn_core::proto::build::bazel::remote::execution::v2 as re;
use cairn_core::proto::google::protobuf;
use cairn_core::{Digest, DigestFunction};
use cairn_store::filesystem::FilesystemStore;
use cairn_store::memory::MemoryStore;
use cairn_store::{StoreExt, StoreRef};
use cairn_worker::{ActionRunner, RunnerConfig};
use prost::Message;
use tokio_util::sync::CancellationToken;

pub const F: DigestFunction = DigestFunction::Sha256;

pub struct Kit {
    pub tmp: tempfile::TempDir,
    pub cas: Arc<MemoryStore>,
    pub ac: Arc<MemoryStore>,
    pub local: Option<Arc<FilesystemStore>>,
    pub runner: ActionRunner,
}

pub fn config(tmp: &Path) -> RunnerConfig {
    let mut cfg = RunnerConfig::new(tmp.join("work"));
    cfg.default_timeout = Duration::from_secs(60);
    cfg.max_timeout = Duration::from_secs(120);
    cfg.worker_name = "test-worker".into();
    cfg
}

impl Kit {
    /// Memory CAS and AC, no local filesystem CAS.
    pub fn new() -> Kit {
        Kit::with(|_| {})
    }

    pub fn with(tweak: impl FnOnce(&mut RunnerConfig)) -> Kit {
        let tmp = tempfile::tempdir().unwrap();
        let mut cfg = config(tmp.path());
        tweak(&mut cfg);
        let cas = Arc::new(MemoryStore::new(&Default::default()));
        let ac = Arc::new(MemoryStore::new(&Default::default()));
        let runner = ActionRunner::new(
            cas.clone() as StoreRef,
            Some(ac.clone() as StoreRef),
            None,
            cfg,
        );
        Kit {
            tmp,
            cas,
            ac,
            local: None,
            runner,
        }
    }

    /// Memory CAS and AC, and a local filesystem CAS that inputs are hardlinked from.
    pub async fn with_local_cas() -> Kit {
        let tmp = tempfile::tempdir().unwrap();
        let fs_cfg = cairn_config::stores::FilesystemStore {
            content_path: tmp.path().join("local-cas").display().to_string(),
            temp_path: Some(tmp.path().join("local-tmp").display().to_string()),
            eviction_policy: None,
            read_buffer_size: None,
            block_size: None,
            max_concurrent_writes: None,
            evict_page_cache: false,
        };
        let local = Arc::new(FilesystemStore::open(&fs_cfg).await.unwrap());
        let cas = Arc::new(MemoryStore::new(&Default::default()));
        let ac = Arc::new(MemoryStore::new(&Default::default()));
        let runner = ActionRunner::new(
            cas.clone() as StoreRef,
            Some(ac.clone() as StoreRef),
            Some(local.clone()),
            config(tmp.path()),
        );
        Kit {
            tmp,
            cas,
            ac,
            local: Some(local),
            runner,
        }
    }

    pub fn work_root(&self) -> PathBuf {
        self.tmp.path().join("work")
    }

    /// Fails unless no action directory is left in the work root.
    pub fn assert_work_root_empty(&self) {
        let left: Vec<_> = std::fs::read_dir(self.work_root())
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "action directories left behind: {left:?}");
    }

    pub async fn blob(&self, data: impl Into<Bytes>) -> Digest {
        let data = data.into();
        let d = F.compute(&data);
        self.cas.put_bytes(&d, data).await.unwrap();
        d
    }

    pub async fn proto(&self, m: &impl Message) -> Digest {
        self.blob(m.encode_to_vec()).await
    }

    pub async fn read(&self, d: &re::Digest) -> Bytes {
        let d = Digest::from_proto_with(F, d).unwrap();
        self.cas.get_all(&d, usize::MAX).await.unwrap()
    }

    pub async fn read_proto<M: Message + Default>(&self, d: &re::Digest) -> M {
        M::decode(self.read(d).await).unwrap()
    }

    /// Stores the Command, the Action and returns the action digest.
    pub async fn action(&self, command: &re::Command, input_root: Digest) -> Digest {
        self.action_with(command, input_root, |_| {}).await
    }

    pub async fn action_with(
        &self,
        command: &re::Command,
        input_root: Digest,
        tweak: impl FnOnce(&mut re::Action),
    ) -> Digest {
        let command_digest = self.proto(command).await;
        let mut action = re::Action {
            command_digest: Some(command_digest.to_proto()),
            input_root_digest: Some(input_root.to_proto()),
            ..Default::default()
        };
        tweak(&mut action);
        self.proto(&action).await
    }

    pub async fn empty_root(&self) -> Digest {
        self.proto(&re::Directory::default()).await
    }

    pub async fn run(&self, action: Digest) -> re::ExecuteResponse {
        self.runner
            .run(action, false, CancellationToken::new())
            .await
            .unwrap()
    }

    pub async fn cached(&self, action: Digest) -> Option<re::ActionResult> {
        match self.ac.get_all(&action, usize::MAX).await {
            Ok(b) => Some(re::ActionResult::decode(b).unwrap()),
            Err(e) if e.is_not_found() => None,
            Err(e) => panic!("{e}"),
        }
    }
}

pub fn command(args: &[&str]) -> re::Command {
    re::Command {
        arguments: args.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

pub fn sh(script: &str) -> re::Command {
    command(&["/bin/sh", "-c", script])
}

pub fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

pub fn timeout(seconds: i64) -> Option<protobuf::Duration> {
    Some(protobuf::Duration { seconds, nanos: 0 })
}

pub fn file(name: &str, d: Digest, executable: bool) -> re::FileNode {
    re::FileNode {
        name: name.into(),
        digest: Some(d.to_proto()),
        is_executable: executable,
        node_properties: None,
    }
}

pub fn dir(name: &str, d: Digest) -> re::DirectoryNode {
    re::DirectoryNode {
        name: name.into(),
        digest: Some(d.to_proto()),
    }
}

pub fn symlink(name: &str, target: &str) -> re::SymlinkNode {
    re::SymlinkNode {
        name: name.into(),
        target: target.into(),
        node_properties: None,
    }
}

pub fn code(r: &re::ExecuteResponse) -> i32 {
    r.status.as_ref().map_or(0, |s| s.code)
}

pub fn ok(r: &re::ExecuteResponse) -> &re::ActionResult {
    assert_eq!(code(r), 0, "status: {:?}", r.status);
    r.result.as_ref().expect("an OK response has a result")
}

/// Whether `pid` is gone or a zombie (dead, not yet reaped by whoever its parent is now).
pub fn dead(pid: &str) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let state = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .next();
    matches!(state, None | Some("Z"))
}

pub fn pid_in(path: &Path) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .trim()
        .to_string()
}

/// A script whose processes leave the action: one double-forks, one calls setsid (a new
/// session and process group), and each writes its pid to a file under `dir`.
pub fn escaping_script(dir: &Path) -> String {
    let (a, b) = (dir.join("forked.pid"), dir.join("setsid.pid"));
    format!(
        "(sleep 1000 & echo $! > {a}) & \
         setsid sh -c 'sleep 1000 & echo $! > {b}' & \
         wait; while [ ! -s {a} ] || [ ! -s {b} ]; do sleep 0.01; done; echo done",
        a = a.display(),
        b = b.display()
    )
}
