//! Cairn's worker pipeline: run one REAPI action from its digest to its `ExecuteResponse`.
//!
//! [`ActionRunner::run`] takes an action digest and goes through the steps of
//! `DESIGN.md`, one module each:
//!
//! 1. load (`spec`, `input_tree`): read the Action, the Command and the input tree from the
//!    CAS and check them. Every missing blob is listed in one FAILED_PRECONDITION with a
//!    `google.rpc.PreconditionFailure`; a malformed action is INVALID_ARGUMENT.
//! 2. `prepare`: a fresh directory under the work root, the input root materialised in it
//!    (copied or reflinked from a local filesystem CAS when there is one, never hardlinked, so
//!    that no action can change a blob), output parents created.
//! 3. `execute`: the command (through the configured entrypoint, if any) in its own process
//!    group, with only the configured variables (`environment`) and the Command's, stdout and
//!    stderr to capped files, killed at its timeout (or at the maximum, when the timeout is
//!    handled externally) or on cancellation; then the side channel file is read.
//! 4. `collect`: outputs hashed and uploaded (files, directories as `Tree`s, symlinks),
//!    stdout and stderr too.
//! 5. `report`: the `ActionResult` written to the action cache and the
//!    `HistoricalExecuteResponse` to the historical store as the strategies say, and the
//!    `ExecuteResponse` returned, its message from the templates (`message`).
//!
//! Guarantees: a failure in any step is a status in the returned `ExecuteResponse`, never a
//! panic or a hang (every wait is bounded by the action's timeout, a drain deadline or the
//! cancellation token); the action's directory is removed afterwards in every case (by
//! [`ActionRunner::run_request`] before it returns, or by the caller of
//! [`ActionRunner::run_keeping_dir`] once it has sent the response). This crate does no
//! networking: a worker-API client drives it.

mod collect;
mod contain;
mod dircache;
mod environment;
mod error;
mod execute;
mod input_tree;
mod launch;
pub mod message;
mod prepare;
mod report;
pub mod session;
mod spec;
mod trampoline;
mod workdir;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use cairn_core::proto::build::bazel::remote::execution::v2 as re;
use cairn_core::{Digest, Error};
use cairn_store::filesystem::FilesystemStore;
use cairn_store::{Store, StoreExt, StoreRef};
use prost::Message;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

pub use cairn_config::workers::{EnvironmentSource, UploadStrategy};
pub use dircache::DirectoryCacheConfig;
pub use error::{
    missing_blobs_detail, ActionError, PreconditionFailure, Violation,
    PRECONDITION_FAILURE_TYPE_URL,
};
pub use launch::Namespaces;
pub use message::MessageTemplate;
pub use report::HistoricalExecuteResponse;

use collect::Outputs;
use execute::{Ending, ExecRequest, Execution};
use input_tree::InputTree;
use spec::{ActionParts, CommandSpec};
pub use workdir::Cleanup;
use workdir::{WorkDir, WorkDirs};

/// Largest Action or Command proto read into memory.
const MAX_PROTO_BYTES: usize = 16 << 20;

/// How a runner runs actions.
#[derive(Debug, Clone)]
pub struct RunnerConfig {
    /// Directory under which each run gets a fresh directory. It belongs to this runner:
    /// [`ActionRunner::clean_work_root`] empties it.
    pub work_root: PathBuf,
    /// Bytes kept of each of stdout and stderr; the rest is read and dropped. Default 64 MiB.
    pub max_output_bytes_stdio: u64,
    /// Most files, directories and symlinks an action may output (those inside output
    /// directories included); past it the action fails with RESOURCE_EXHAUSTED and nothing
    /// is uploaded. Default 1,000,000.
    pub max_output_files: u64,
    /// Most bytes an action's output files may add up to (stdout and stderr apart); past it
    /// the action fails with RESOURCE_EXHAUSTED and nothing is uploaded. Default 64 GiB.
    pub max_output_bytes: u64,
    /// Timeout of an action that sets none. Default 10 minutes (capped by `max_timeout`).
    pub default_timeout: Duration,
    /// Largest timeout an action may ask for (the scheduler's cap); above it the action is
    /// rejected with INVALID_ARGUMENT. Default 1 hour.
    pub max_timeout: Duration,
    /// The command enforces its own timeout (through the entrypoint): the worker kills it only
    /// at `max_timeout`, and accepts an action whose timeout is larger (NativeLink's
    /// `timeout_handled_externally`). Default false.
    pub timeout_handled_externally: bool,
    /// Program and arguments every command is run through: the command's argv is appended.
    /// Default: none (the command's own program runs).
    pub entrypoint: Vec<String>,
    /// Variables set in the command's environment before the Command's own, which win on the
    /// same name. Default: none.
    pub additional_environment: Vec<(String, EnvironmentSource)>,
    /// Which results go to the action cache (when the runner has one). Default `SuccessOnly`.
    pub ac_strategy: UploadStrategy,
    /// Which results' `HistoricalExecuteResponse` go to the historical store (the CAS unless
    /// [`ActionRunner::with_historical_store`]). Default `FailuresOnly`.
    pub historical_strategy: UploadStrategy,
    /// `ExecuteResponse.message` of a successful action whose result was uploaded. Default empty.
    pub success_message: MessageTemplate,
    /// `ExecuteResponse.message` of a failed action whose result was uploaded. Default empty.
    pub failure_message: MessageTemplate,
    /// Name reported in `ExecutedActionMetadata.worker`. Default: empty.
    pub worker_name: String,
    /// Fresh action directories kept made ahead of need, so that a run does not wait for the
    /// file system to make one. They stay in the work root while the runner lives (until
    /// [`ActionRunner::clean_work_root`]). Default 0: each is made when its run starts.
    pub dirs_ahead: usize,
    /// Linux namespaces each command runs in (NativeLink's `use_namespaces` and
    /// `use_mount_namespace`). Default none. Check support with [`probe_namespaces`] first.
    pub namespaces: Namespaces,
    /// Longest the upload of an action's outputs may take (NativeLink's
    /// `max_upload_timeout_s`): past it the run fails with DEADLINE_EXCEEDED as an `Err` of
    /// [`ActionRunner::run_keeping_dir`], so that the scheduler retries the action. Default
    /// 10 minutes.
    pub upload_timeout: Duration,
    /// How long removing an action's directory is retried. Default 30 s, pauses up to 500 ms.
    pub cleanup: Cleanup,
    /// Program and arguments run before each action (NativeLink's
    /// `experimental_precondition_script`); an exit other than 0 fails the run with
    /// RESOURCE_EXHAUSTED as an `Err`, so that the action goes back to the scheduler. Default
    /// none.
    pub precondition: Option<Vec<String>>,
    /// Materialized input roots kept for reuse (NativeLink's `directory_cache`); opened by
    /// [`ActionRunner::open_directory_cache`]. Default none.
    pub directory_cache: Option<DirectoryCacheConfig>,
}

impl RunnerConfig {
    /// The defaults above, with `work_root`.
    pub fn new(work_root: impl Into<PathBuf>) -> RunnerConfig {
        RunnerConfig {
            work_root: work_root.into(),
            max_output_bytes_stdio: 64 << 20,
            max_output_files: 1_000_000,
            max_output_bytes: 64 << 30,
            default_timeout: Duration::from_secs(600),
            max_timeout: Duration::from_secs(3600),
            timeout_handled_externally: false,
            entrypoint: Vec::new(),
            additional_environment: Vec::new(),
            ac_strategy: UploadStrategy::SuccessOnly,
            historical_strategy: UploadStrategy::FailuresOnly,
            success_message: MessageTemplate::default(),
            failure_message: MessageTemplate::default(),
            worker_name: String::new(),
            dirs_ahead: 0,
            namespaces: Namespaces::None,
            upload_timeout: Duration::from_secs(600),
            cleanup: Cleanup::default(),
            precondition: None,
            directory_cache: None,
        }
    }
}

/// Starts `/bin/sh -c 'exit 0'` in `namespaces` and checks that it ran: an error says why
/// this machine cannot (a kernel without user namespaces, `user.max_user_namespaces` at 0, a
/// container without the privilege, a `/proc` that cannot be mounted again).
pub async fn probe_namespaces(namespaces: Namespaces) -> std::io::Result<()> {
    if namespaces == Namespaces::None {
        return Ok(());
    }
    let args = ["-c".to_string(), "exit 0".to_string()];
    let mut child = launch::spawn(launch::Spec {
        program: std::path::Path::new("/bin/sh"),
        args: &args,
        env: &[],
        cwd: std::path::Path::new("/"),
        namespaces,
    })
    .await?;
    child.exited().await?;
    let status = child.terminate().await?;
    if status.success() {
        Ok(())
    } else {
        Err(std::io::Error::other(format!(
            "a command in the namespaces ended with {status}"
        )))
    }
}

/// One action to run.
#[derive(Debug, Clone)]
pub struct RunRequest {
    /// Digest of the `Action` in the CAS; its function is the function of every digest of
    /// the action.
    pub action_digest: Digest,
    /// Never write the result to the action cache (`do_not_cache`). A result is not cached
    /// either when the Action sets `do_not_cache`, or when the command failed.
    pub skip_cache_write: bool,
    /// When the scheduler queued the action, for `ExecutedActionMetadata.queued_timestamp`.
    pub queued_at: Option<SystemTime>,
    /// The platform properties the scheduler matched the action with (after its
    /// `property_modifier`), for `additional_environment`'s `property`; `None`: the Action's
    /// (or its Command's).
    pub platform: Option<Vec<(String, String)>>,
}

/// Runs actions: the stores it reads and writes, and its configuration. Cheap to share
/// (`Arc`); runs are independent and may overlap.
pub struct ActionRunner {
    /// CAS to read inputs from and upload outputs to.
    cas: StoreRef,
    /// Where results are written; `None` never writes one.
    ac: Option<StoreRef>,
    /// Where `HistoricalExecuteResponse`s are written.
    historical: StoreRef,
    /// Local filesystem CAS that inputs are copied from (filled from `cas` as needed).
    local_files: Option<Arc<FilesystemStore>>,
    /// `local_files` is the fast tier of `cas` (a `fast_slow`): a read through `cas` fills it.
    local_is_fast_tier: bool,
    /// The directory cache, once opened.
    dircache: Option<Arc<dircache::DirCache>>,
    dirs: Arc<WorkDirs>,
    cfg: RunnerConfig,
}

/// The directory of a finished run, still to be removed: call [`ActionDir::remove`]. Dropped
/// without it, it is removed on a blocking thread.
pub struct ActionDir(WorkDir);

impl ActionDir {
    /// Deletes the directory and the run's capture files; failures are logged.
    pub async fn remove(self) {
        self.0.remove().await
    }
}

/// Where an action's input root comes from.
enum Inputs {
    /// The directory cache's copy.
    Cached(dircache::Lease),
    /// The tree read from the CAS, to materialize.
    Fresh(InputTree),
}

/// What the steps produced: the result (possibly with an error, for a timeout), and the
/// rendered message template when the result was published.
struct Finished {
    result: re::ActionResult,
    error: Option<ActionError>,
    headline: Option<String>,
}

impl ActionRunner {
    /// `local_files`, when given, is filled from `cas`; when it is the fast tier of `cas`, say
    /// so with [`ActionRunner::with_local_fast_tier`], or a blob fetched for an input is
    /// written to it twice.
    pub fn new(
        cas: StoreRef,
        ac: Option<StoreRef>,
        local_files: Option<Arc<FilesystemStore>>,
        cfg: RunnerConfig,
    ) -> ActionRunner {
        ActionRunner {
            historical: cas.clone(),
            cas,
            ac,
            local_files,
            local_is_fast_tier: false,
            dircache: None,
            dirs: Arc::new(WorkDirs::new(
                cfg.work_root.clone(),
                cfg.dirs_ahead,
                cfg.cleanup,
            )),
            cfg,
        }
    }

    /// `local_files` is the fast tier of `cas` (NativeLink's `cas_fast_slow_store` of a
    /// `fast_slow` with a filesystem fast tier): inputs and outputs go through the whole
    /// store, and a read through it fills the local store.
    pub fn with_local_fast_tier(mut self) -> ActionRunner {
        self.local_is_fast_tier = true;
        self
    }

    /// Opens the directory cache of [`RunnerConfig::directory_cache`], if any: its root is
    /// created, unfinished entries from a crash are deleted and the finished ones indexed.
    pub async fn open_directory_cache(mut self) -> Result<ActionRunner, Error> {
        if let Some(cfg) = self.cfg.directory_cache.clone() {
            self.dircache = Some(dircache::DirCache::open(cfg).await?);
        }
        Ok(self)
    }

    /// Writes `HistoricalExecuteResponse`s to `store` instead of the CAS.
    pub fn with_historical_store(mut self, store: StoreRef) -> ActionRunner {
        self.historical = store;
        self
    }

    pub fn config(&self) -> &RunnerConfig {
        &self.cfg
    }

    /// Runs the action `action_digest`; see [`ActionRunner::run_request`].
    pub async fn run(
        &self,
        action_digest: Digest,
        skip_cache_write: bool,
        cancel: CancellationToken,
    ) -> Result<re::ExecuteResponse, Error> {
        let req = RunRequest {
            action_digest,
            skip_cache_write,
            queued_at: None,
            platform: None,
        };
        self.run_request(req, cancel).await
    }

    /// Runs one action and returns its `ExecuteResponse`, whose status says how it went: OK
    /// (whatever the exit code), FAILED_PRECONDITION (missing blobs, listed in a
    /// PreconditionFailure; or a program that cannot be started), INVALID_ARGUMENT (a
    /// malformed action, or a side channel file not in its format), DEADLINE_EXCEEDED (timed
    /// out, or said so in its side channel file; the result holds stdout and stderr so far),
    /// CANCELLED (`cancel` fired; the process group is killed), or the code of a store or disk
    /// failure. The action's directory is removed before it returns.
    ///
    /// `Err` only when the runner cannot run anything: its work directory cannot be created.
    /// The caller should then give the action back to the scheduler and report itself
    /// unhealthy.
    pub async fn run_request(
        &self,
        req: RunRequest,
        cancel: CancellationToken,
    ) -> Result<re::ExecuteResponse, Error> {
        let (response, dir) = self.run_keeping_dir(req, cancel).await?;
        dir.remove().await;
        Ok(response)
    }

    /// [`ActionRunner::run_request`], except that the action's directory is handed back to be
    /// removed by the caller, so that it can answer first: removing a directory costs a few
    /// journal updates that the client need not wait for. Everything the response names is in
    /// the CAS (and the result in the action cache) before this returns.
    pub async fn run_keeping_dir(
        &self,
        req: RunRequest,
        cancel: CancellationToken,
    ) -> Result<(re::ExecuteResponse, ActionDir), Error> {
        let span = tracing::info_span!("action", digest = %req.action_digest);
        self.run_in_span(req, cancel).instrument(span).await
    }

    async fn run_in_span(
        &self,
        req: RunRequest,
        cancel: CancellationToken,
    ) -> Result<(re::ExecuteResponse, ActionDir), Error> {
        let worker_start = SystemTime::now();
        self.check_precondition(req.platform.as_deref()).await?;
        let dir = self.dirs.take().await?;
        let mut meta = re::ExecutedActionMetadata {
            worker: self.cfg.worker_name.clone(),
            queued_timestamp: req.queued_at.map(report::timestamp),
            worker_start_timestamp: Some(report::timestamp(worker_start)),
            ..Default::default()
        };
        let mut notes = Vec::new();
        let outcome = self.steps(&req, &dir, &cancel, &mut meta, &mut notes).await;
        if let Err(ActionError::UploadTimedOut(limit)) = &outcome {
            // Given back to the scheduler, which retries it (NativeLink's meaning).
            return Err(Error::new(
                cairn_core::Code::DeadlineExceeded,
                format!(
                    "uploading the outputs of {} took longer than {} s (max_upload_timeout_s)",
                    req.action_digest,
                    limit.as_secs()
                ),
            ));
        }
        if let Err(ActionError::Other(e)) = &outcome {
            if e.code == cairn_core::Code::Unavailable {
                // The worker's CAS or action cache could not be reached (a server restarting,
                // say): not the action's fault. Given back to the scheduler, which runs it
                // again (within max_job_retries) rather than failing the client's build.
                return Err(e.clone().context(format!("running {}", req.action_digest)));
            }
        }
        let response = match outcome {
            Ok(Finished {
                result,
                error,
                headline,
            }) => report::response(Some(result), error.as_ref(), headline.as_deref(), &notes),
            Err(e) => report::response(None, Some(&e), None, &notes),
        };
        tracing::debug!(
            status = response.status.as_ref().map_or(0, |s| s.code),
            exit_code = response.result.as_ref().map(|r| r.exit_code),
            "action finished"
        );
        Ok((response, ActionDir(dir)))
    }

    /// Runs the precondition program, if any: OK when it exits with 0, RESOURCE_EXHAUSTED
    /// (with what it printed) otherwise. Its environment is `additional_environment`'s
    /// property, value and from_environment variables; the others are not known yet.
    async fn check_precondition(&self, platform: Option<&[(String, String)]>) -> Result<(), Error> {
        let Some(argv) = &self.cfg.precondition else {
            return Ok(());
        };
        let mut env = Vec::new();
        for (name, source) in &self.cfg.additional_environment {
            let value = match source {
                EnvironmentSource::Property(p) => platform
                    .and_then(|ps| ps.iter().find(|(k, _)| k == p))
                    .map(|(_, v)| v.clone())
                    .unwrap_or_default(),
                EnvironmentSource::Value(v) => v.clone(),
                EnvironmentSource::FromEnvironment => std::env::var(name).unwrap_or_default(),
                _ => continue,
            };
            env.push((name.clone(), value));
        }
        let out = tokio::process::Command::new(&argv[0])
            .args(&argv[1..])
            .env_clear()
            .envs(env)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output()
            .await
            .map_err(|e| {
                Error::resource_exhausted(format!(
                    "the worker's precondition program {:?} could not run: {e}",
                    argv[0]
                ))
            })?;
        if out.status.success() {
            return Ok(());
        }
        let said = String::from_utf8_lossy(&out.stdout);
        let said = said.trim();
        Err(Error::resource_exhausted(format!(
            "the worker's precondition program {:?} exited with {}{}; the action goes back to \
             the scheduler (experimental_precondition_script)",
            argv[0],
            out.status,
            if said.is_empty() {
                String::new()
            } else {
                format!(": {}", said.chars().take(1024).collect::<String>())
            }
        )))
    }

    /// Empties the work root (directories of runs a crash abandoned). Call it before the
    /// first run, never while runs are in progress.
    pub async fn clean_work_root(&self) -> Result<(), Error> {
        self.dirs.forget();
        let root = self.cfg.work_root.clone();
        tokio::task::spawn_blocking(move || {
            let entries = match std::fs::read_dir(&root) {
                Ok(entries) => entries,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(Error::io(format!("reading {}", root.display()), e)),
            };
            for entry in entries.flatten() {
                let path = entry.path();
                let removed = if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    workdir::remove_tree(&path)
                } else {
                    std::fs::remove_file(&path)
                };
                removed.map_err(|e| Error::io(format!("removing {}", path.display()), e))?;
            }
            Ok(())
        })
        .await
        .map_err(|e| Error::internal(format!("work root cleaning task failed: {e}")))?
    }

    async fn steps(
        &self,
        req: &RunRequest,
        dir: &WorkDir,
        cancel: &CancellationToken,
        meta: &mut re::ExecutedActionMetadata,
        notes: &mut Vec<String>,
    ) -> Result<Finished, ActionError> {
        let function = req.action_digest.function();

        meta.input_fetch_start_timestamp = Some(report::timestamp(SystemTime::now()));
        let exec_root = dir.exec_root();
        let fetch = tracing::debug_span!(target: "cairn_worker::steps", "worker.fetch_inputs");
        let (action, command) = until_cancelled(cancel, async {
            let (action, command, inputs) = self.load(req.action_digest).await?;
            match inputs {
                Inputs::Cached(lease) => {
                    let (from, to) = (lease.path.clone(), exec_root.clone());
                    prepare::blocking(move || {
                        dircache::copy_contents(&from, &to)
                            .map(|_| ())
                            .map_err(|e| {
                                ActionError::from(Error::io(
                                    format!("copying the input root from {}", from.display()),
                                    e,
                                ))
                            })
                    })
                    .await?;
                    drop(lease);
                }
                Inputs::Fresh(tree) => {
                    prepare::materialize(
                        &*self.cas,
                        self.local_files.as_ref(),
                        self.local_is_fast_tier,
                        self.dircache.as_ref().map(|c| &c.fetches),
                        &tree,
                        &exec_root,
                    )
                    .await?;
                    drop(tree);
                    if let Some(cache) = &self.dircache {
                        // Before the command can touch it. A failure costs the reuse only.
                        if let Err(e) = cache.insert(action.input_root, exec_root.clone()).await {
                            tracing::warn!(error = %e, "could not keep an input root in the directory cache");
                        }
                    }
                }
            }
            prepare::create_output_parents(&exec_root, &command).await?;
            Ok((action, command))
        })
        .instrument(fetch)
        .await?;
        meta.input_fetch_completed_timestamp = Some(report::timestamp(SystemTime::now()));

        let platform = req
            .platform
            .as_deref()
            .unwrap_or(if action.platform.is_empty() {
                &command.platform
            } else {
                &action.platform
            });
        // The worker's own deadline: the action's, or the maximum when the entrypoint enforces
        // the action's.
        let kill_after = if self.cfg.timeout_handled_externally {
            self.cfg.max_timeout
        } else {
            action.timeout
        };
        let configured = &self.cfg.additional_environment;
        let side_channel = dir.side_channel();
        let facts = environment::RunFacts {
            platform,
            timeout: action.timeout,
            side_channel: &side_channel,
            action_directory: &dir.scratch(),
        };
        let env = environment::prepare(configured, &facts, &command.environment).await?;
        let arguments: Vec<String> = if self.cfg.entrypoint.is_empty() {
            command.arguments.clone()
        } else {
            let mut a = self.cfg.entrypoint.clone();
            a.extend(command.arguments.iter().cloned());
            a
        };
        let exec = execute::execute(
            ExecRequest {
                arguments: &arguments,
                environment: &env,
                cwd: exec_root.join(&command.working_directory),
                stdout: dir.stdout(),
                stderr: dir.stderr(),
                timeout: kill_after,
                stdio_cap: self.cfg.max_output_bytes_stdio,
                namespaces: self.cfg.namespaces,
            },
            cancel,
        )
        .instrument(tracing::debug_span!(
            target: "cairn_worker::steps",
            "worker.run",
            program = arguments.first().map_or("", String::as_str),
        ))
        .await?;
        meta.execution_start_timestamp = Some(report::timestamp(exec.started));
        meta.execution_completed_timestamp = Some(report::timestamp(exec.finished));
        for (name, c) in [("stdout", exec.stdout), ("stderr", exec.stderr)] {
            if c.truncated() {
                notes.push(format!(
                    "{name} was cut to its first {} bytes (the command wrote {})",
                    c.kept, c.written
                ));
            }
        }
        let timed_out = matches!(exec.ending, Ending::TimedOut(_));
        let error = if timed_out {
            Some(ActionError::TimedOut(kill_after))
        } else if environment::wants_side_channel(configured) {
            environment::read_side_channel(&side_channel, action.timeout).await?
        } else {
            None
        };

        meta.output_upload_start_timestamp = Some(report::timestamp(SystemTime::now()));
        let captured = exec.stdout.kept > 0 || exec.stderr.kept > 0;
        let limit = self.cfg.upload_timeout;
        let (outputs, stdout, stderr) = until_cancelled(cancel, async {
            tokio::time::timeout(
                limit,
                self.collect(dir, &command, function, !timed_out, captured),
            )
            .await
            .map_err(|_| ActionError::UploadTimedOut(limit))?
        })
        .instrument(tracing::debug_span!(target: "cairn_worker::steps", "worker.upload_outputs"))
        .await?;
        meta.output_upload_completed_timestamp = Some(report::timestamp(SystemTime::now()));

        let mut result = action_result(&exec, outputs, stdout, stderr);
        meta.worker_completed_timestamp = Some(report::timestamp(SystemTime::now()));
        result.execution_metadata = Some(meta.clone());

        let skip_cache = req.skip_cache_write || action.do_not_cache;
        let targets = report::Targets {
            ac: self.ac.as_deref().filter(|_| !skip_cache),
            historical: &*self.historical,
            cfg: &self.cfg,
        };
        let (headline, failures) = until_cancelled(cancel, async {
            Ok(report::publish(targets, &req.action_digest, &result, error.as_ref()).await)
        })
        .instrument(tracing::debug_span!(target: "cairn_worker::steps", "worker.report"))
        .await?;
        notes.extend(failures);
        Ok(Finished {
            result,
            error,
            headline,
        })
    }

    /// Reads and checks the Action, the Command and the input tree; every missing blob is
    /// reported at once.
    async fn load(
        &self,
        action_digest: Digest,
    ) -> Result<(ActionParts, CommandSpec, Inputs), ActionError> {
        let cas = &*self.cas;
        let Some(action) = fetch_proto::<re::Action>(cas, action_digest, "Action").await? else {
            return Err(ActionError::MissingBlobs(vec![action_digest]));
        };
        // With the timeout handled externally, an action may ask for more than the maximum: it
        // is told its timeout, and killed at the maximum.
        let max = if self.cfg.timeout_handled_externally {
            Duration::MAX
        } else {
            self.cfg.max_timeout
        };
        let parts = spec::check_action(
            action_digest.function(),
            &action,
            self.cfg.default_timeout.min(self.cfg.max_timeout),
            max,
        )?;
        // An input root in the directory cache needs neither its tree nor its blobs.
        if let Some(lease) = self
            .dircache
            .as_ref()
            .and_then(|c| c.lease(&parts.input_root))
        {
            let command = fetch_proto::<re::Command>(cas, parts.command, "Command").await?;
            let command = command.as_ref().map(spec::check_command).transpose()?;
            return match command {
                Some(command) => Ok((parts, command, Inputs::Cached(lease))),
                None => Err(ActionError::MissingBlobs(vec![parts.command])),
            };
        }
        let (command, tree) = tokio::join!(
            fetch_proto::<re::Command>(cas, parts.command, "Command"),
            input_tree::fetch_tree(cas, parts.input_root),
        );
        let (command, mut tree) = (command?, tree?);
        let command = command.as_ref().map(spec::check_command).transpose()?;
        let mut missing = Vec::new();
        if command.is_none() {
            missing.push(parts.command);
        }
        missing.append(&mut tree.missing_dirs);
        let local = self.local_files.as_deref();
        missing.extend(input_tree::find_missing_files(cas, local, &tree.files).await?);
        match command {
            Some(command) if missing.is_empty() => Ok((parts, command, Inputs::Fresh(tree))),
            _ => Err(ActionError::MissingBlobs(missing)),
        }
    }

    /// Hashes and uploads the outputs (only stdout and stderr when `outputs` is false; those
    /// only when `captured` says the command wrote any).
    async fn collect(
        &self,
        dir: &WorkDir,
        command: &CommandSpec,
        function: cairn_core::DigestFunction,
        outputs: bool,
        captured: bool,
    ) -> Result<(Outputs, Option<Digest>, Option<Digest>), ActionError> {
        let exec_root = dir.exec_root();
        let (stdout_path, stderr_path) = (dir.stdout(), dir.stderr());
        let declared = if outputs {
            command.outputs.clone()
        } else {
            vec![]
        };
        if declared.is_empty() && !captured {
            return Ok((Outputs::default(), None, None));
        }
        let directory_blobs = command.directory_blobs;
        let caps = collect::OutputCaps {
            entries: self.cfg.max_output_files,
            bytes: self.cfg.max_output_bytes,
        };
        let (outputs, stdout, stderr) = prepare::blocking(move || {
            let mut outputs =
                collect::scan_outputs(&exec_root, &declared, function, directory_blobs, caps)?;
            let mut stdio = |path: &std::path::Path| -> Result<Option<Digest>, ActionError> {
                Ok(
                    collect::stdio_blob(path, function)?.map(|(digest, source)| {
                        outputs.uploads.push((digest, source));
                        digest
                    }),
                )
            };
            let stdout = stdio(&stdout_path)?;
            let stderr = stdio(&stderr_path)?;
            Ok((outputs, stdout, stderr))
        })
        .await?;
        let mut outputs = outputs;
        collect::upload(&*self.cas, std::mem::take(&mut outputs.uploads)).await?;
        Ok((outputs, stdout, stderr))
    }
}

/// The `ActionResult` of a run (metadata is added by the caller).
fn action_result(
    exec: &Execution,
    outputs: Outputs,
    stdout: Option<Digest>,
    stderr: Option<Digest>,
) -> re::ActionResult {
    let exit_code = match exec.ending {
        Ending::Exited(code) | Ending::TimedOut(code) => code,
    };
    #[allow(deprecated)]
    re::ActionResult {
        output_files: outputs.files,
        output_file_symlinks: outputs.file_symlinks,
        output_symlinks: outputs.symlinks,
        output_directories: outputs.directories,
        output_directory_symlinks: outputs.directory_symlinks,
        exit_code,
        stdout_raw: vec![],
        stdout_digest: stdout.map(|d| d.to_proto()),
        stderr_raw: vec![],
        stderr_digest: stderr.map(|d| d.to_proto()),
        execution_metadata: None,
    }
}

/// A proto read from the CAS; `None` when the CAS does not have it.
async fn fetch_proto<M: Message + Default>(
    cas: &dyn Store,
    digest: Digest,
    what: &str,
) -> Result<Option<M>, ActionError> {
    if digest.is_empty_blob() {
        return Ok(Some(M::default()));
    }
    let bytes = match cas.get_all(&digest, MAX_PROTO_BYTES).await {
        Ok(b) => b,
        Err(e) if e.is_not_found() => return Ok(None),
        Err(e) => return Err(e.context(format!("reading the {what} {digest}")).into()),
    };
    M::decode(bytes).map(Some).map_err(|e| {
        ActionError::invalid(format!(
            "the {what} {digest} is not a valid {what} proto: {e}"
        ))
    })
}

/// `f`, or CANCELLED as soon as `cancel` fires (dropping `f`).
async fn until_cancelled<T>(
    cancel: &CancellationToken,
    f: impl Future<Output = Result<T, ActionError>>,
) -> Result<T, ActionError> {
    tokio::select! {
        biased;
        _ = cancel.cancelled() => Err(ActionError::Cancelled),
        r = f => r,
    }
}

/// `run` must be spawnable: its future is `Send` for any borrow of the runner.
#[allow(dead_code)]
fn assert_run_is_send(runner: Arc<ActionRunner>, digest: Digest) {
    fn send<T: Send>(_: T) {}
    send(async move { runner.run(digest, false, CancellationToken::new()).await });
}

/// For the fuzz targets in `fuzz/`: whether `bytes`, decoded as a REAPI `Command`, passes the
/// worker's checks (and, if it does, that every output path and the working directory it
/// accepted stay inside the input root). Never panics on any input.
#[doc(hidden)]
pub fn fuzz_check_command(bytes: &[u8]) -> bool {
    use prost::Message;
    let Ok(command) =
        cairn_core::proto::build::bazel::remote::execution::v2::Command::decode(bytes)
    else {
        return false;
    };
    spec::check_command(&command).is_ok()
}
