//! Hot reload: watch the config, validate the whole new snapshot off the request path, and
//! publish it with one atomic store.
//!
//! The watcher only signals; one reloader task owns every reload (file events, SIGHUP and a
//! slow poll all end up in [`Reloader::reload`], one at a time). A reload reads the file,
//! parses, validates and compiles it, builds the runtime (carrying over state of rules whose
//! definition did not change) and stores it. Requests in flight finish on the runtime they
//! loaded; new requests see the new one. On any error the old runtime stays live, and the
//! error (file, line, column, JSON path) is logged, counted and shown on the admin port until
//! the next good load clears it.
//!
//! Reading and building run on a detached thread of their own, never on the lock that orders
//! reloads: each attempt waits at most [`READ_TIMEOUT`] for it. A read with no answer by then
//! (a file swapped for a FIFO after the regular-file check, a hung network file system, a
//! name lookup that never returns) is abandoned and reported as `stuck` (the admin port's
//! `last_error` names the file, `tidegate_config_read_stuck` is 1); its thread may stay
//! blocked, but only one such thread ever exists: until it returns, later attempts start no
//! new read and report it again. Once it returns, its (stale) result is dropped and the next
//! trigger (or the poll) reads afresh. Shutdown never waits for it.
//!
//! During a change freeze (the live config's `freeze` window), an edit that changes a path
//! the window does not leave editable is refused like an invalid one, naming the frozen
//! path ([`rules::freeze`]); an edit of `freeze` itself always applies and is logged at warn.
//! Start-up is never blocked by a freeze: a (re)start applies what is on disk.
//!
//! The config file's *directory* is watched, not the file: editors save by renaming a new
//! file over the old one, Kubernetes ConfigMaps swap a `..data` symlink, and `cp` truncates
//! then writes. A briefly empty or half-written file fails validation and is simply not
//! applied; the event that completes the write triggers the next attempt.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use notify_debouncer_full::notify::{EventKind, RecursiveMode};
use notify_debouncer_full::{DebounceEventResult, new_debouncer};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};

use super::config::{Progress, READ_TIMEOUT, Sources, human, read_config_traced};
use super::history::History;
use crate::runtime::{Live, Runtime, Secrets};

pub mod plans;
pub mod ramps;
use crate::serve::tls::{CertStore, TlsError};

/// How long the watcher waits for a burst of file events to settle. Short, because an edit
/// should be in force within a quarter of a second; a half-written file costs only one failed
/// attempt, never a wrong config.
const DEBOUNCE: Duration = Duration::from_millis(40);
/// Safety net for missed events (a watcher that died, a network file system): the file's
/// size and modification time are compared this often.
const POLL: Duration = Duration::from_secs(2);

/// A runtime built from a file, with the file's hash, config as written, own files, and
/// ramps compiled from the config as written.
type Built = (
    Runtime,
    u64,
    Arc<rules::Config>,
    Sources,
    Vec<rules::ramp::CompiledRamp>,
);

/// What one reload's blocking half produced (certificates are reported by the thread).
#[derive(Debug)]
struct Job {
    built: Result<Option<Built>, String>,
}

/// A blocking read that gave no answer within the bound and was abandoned.
#[derive(Debug)]
struct Abandoned {
    /// Resolves (or closes) when the thread finally returns.
    rx: oneshot::Receiver<Job>,
    progress: Progress,
    started: Instant,
}

/// What the admin port reports about the live config.
#[derive(Debug, Clone, Serialize)]
pub struct ReloadStatus {
    /// The config file.
    pub file: String,
    /// Increments with every applied config; 1 is the config loaded at start.
    pub generation: u64,
    /// XXH3-64 of the applied file's bytes, hex.
    pub hash: String,
    /// When the live config was applied (Unix milliseconds).
    pub loaded_at_ms: u64,
    /// The last failed attempt's errors, one per line; cleared by the next good load.
    pub last_error: Option<String>,
    /// When that failure happened (Unix milliseconds).
    pub last_error_at_ms: Option<u64>,
    /// Set when the applied file changed bootstrap settings (`server`), which need a restart.
    pub restart_needed: Option<String>,
    /// The last refused TLS certificate/key replacement (the previous pair stays in use);
    /// cleared when a good pair loads.
    pub tls_last_error: Option<String>,
    /// Set while an abandoned read (one that gave no answer within the bound) is still
    /// blocked: what it is stuck on. No new read starts until it returns.
    pub read_stuck: Option<String>,
    /// The live config's change freeze, if it has one.
    pub freeze: Option<FreezeStatus>,
}

/// The live change freeze, as the admin port reports it.
#[derive(Debug, Clone, Serialize)]
pub struct FreezeStatus {
    /// The window as written (name, start, end, editable).
    #[serde(flatten)]
    pub window: rules::model::Freeze,
    /// Whether the window is in force now (a reload may then change only what is editable).
    pub active: bool,
}

/// The result of one reload attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReloadOutcome {
    /// A new config is live.
    Applied,
    /// The file's content is what is already live.
    Unchanged,
    /// The file was refused; the old config stays live.
    Failed,
    /// Reading or building gave no answer within the bound (or an earlier such read is
    /// still blocked); the old config stays live.
    Stuck,
}

/// Owns every reload of one gateway.
#[derive(Debug)]
pub struct Reloader {
    path: PathBuf,
    /// The include directory named at start-up (watched alongside the file).
    include_dir: Option<PathBuf>,
    live: Arc<Live>,
    embedded: Vec<(String, SocketAddr)>,
    /// The bootstrap settings the process started with.
    bootstrap: rules::model::Server,
    /// The live config as written: what a freeze compares an edit with. Written only by
    /// `reload` (under `serial`), with the runtime it was built into.
    config: Mutex<Arc<rules::Config>>,
    /// Written only by `reload` (under `serial`), read by the admin port.
    status: Mutex<ReloadStatus>,
    hash: Mutex<u64>,
    /// One reload at a time.
    serial: tokio::sync::Mutex<()>,
    /// TLS certificate pairs of the listeners, reloaded on the same triggers.
    certs: Vec<Arc<CertStore>>,
    /// The read abandoned after the bound, while its thread has not returned.
    abandoned: Mutex<Option<Abandoned>>,
    /// The admin token the admin port checks, re-read from `server.admin.token_file` on
    /// every reload (a token file is a bootstrap choice; its content rotates).
    admin_token: Option<Arc<ArcSwap<Vec<u8>>>>,
    /// Where applied configs are kept.
    history: Option<History>,
    /// The thread that writes history entries, in the order applied: a write (with its
    /// fsync) never holds the reload lock, so it never delays the next config either.
    history_writer: Option<std::sync::mpsc::Sender<Record>>,
    /// The plans' triggers and the plans in force (see [`plans`]).
    plans: Mutex<plans::PlanControl>,
    /// The ramps and where each is (see [`ramps`]).
    ramps: Mutex<ramps::RampControl>,
    /// Turns at writing the ramps' state file.
    ramp_writes: tokio::sync::Mutex<()>,
    /// The key files read with the live config, for rebuilding it when a trigger switches a
    /// plan (a switch reads no file).
    secrets: Mutex<Secrets>,
}

// === impl Reloader ===

impl Reloader {
    /// The key file of the live `identity.jwt`, if any.
    fn jwks_path(&self) -> Option<PathBuf> {
        let rt = self.live.runtime.load();
        let jwt = rt.snapshot.jwt.as_ref()?;
        Some(
            self.path
                .parent()
                .unwrap_or(Path::new("."))
                .join(&*jwt.jwks_file),
        )
    }

    /// The files the live upstreams' `tls` sections name (CA bundles, client certificates
    /// and keys), resolved against the config file: replacing one is a reload.
    fn upstream_tls_paths(&self) -> Vec<PathBuf> {
        let rt = self.live.runtime.load();
        let base = self.path.parent().unwrap_or(Path::new("."));
        rt.snapshot
            .upstreams
            .iter()
            .filter_map(|u| u.tls.as_ref())
            .flat_map(|t| {
                let identity = t.client_identity.iter().flat_map(|(c, k)| [c, k]);
                t.ca_file.iter().chain(identity)
            })
            .map(|f| base.join(&**f))
            .collect()
    }

    /// A reloader for a gateway started from `path` (content hash `hash`, parsed as
    /// `config`).
    pub fn new(
        path: PathBuf,
        hash: u64,
        live: Arc<Live>,
        embedded: Vec<(String, SocketAddr)>,
        config: rules::Config,
        beside: Beside,
    ) -> Self {
        let Beside {
            include_dir,
            certs,
            admin_token,
            history,
            secrets,
            ramps,
        } = beside;
        live.metrics.config_generation.set(1);
        let history_writer = history.clone().and_then(spawn_history_writer);
        let r = Self {
            status: Mutex::new(ReloadStatus {
                file: path.display().to_string(),
                generation: 1,
                hash: format!("{hash:016x}"),
                loaded_at_ms: unix_ms(SystemTime::now()),
                last_error: None,
                last_error_at_ms: None,
                restart_needed: None,
                tls_last_error: None,
                read_stuck: None,
                freeze: freeze_status(config.freeze.as_ref()),
            }),
            hash: Mutex::new(hash),
            path,
            include_dir,
            live,
            embedded,
            bootstrap: config.server.clone(),
            config: Mutex::new(Arc::new(config)),
            serial: tokio::sync::Mutex::new(()),
            certs,
            abandoned: Mutex::new(None),
            admin_token,
            history,
            history_writer,
            plans: Mutex::default(),
            ramps: Mutex::new(ramps),
            ramp_writes: tokio::sync::Mutex::new(()),
            secrets: Mutex::new(secrets),
        };
        r.export_plans();
        r
    }

    /// Whether an abandoned read has returned since (so a fresh one can start).
    fn abandoned_read_returned(&self) -> bool {
        let mut a = self.abandoned.lock().expect("not poisoned");
        a.as_mut()
            .is_some_and(|a| !matches!(a.rx.try_recv(), Err(oneshot::error::TryRecvError::Empty)))
    }

    /// The history of applied configs, if kept.
    pub fn history(&self) -> Option<&History> {
        self.history.as_ref()
    }

    /// The live config's status.
    pub fn status(&self) -> ReloadStatus {
        let mut st = self.status.lock().expect("not poisoned").clone();
        if let Some(f) = &mut st.freeze {
            f.active = freeze_active(&f.window, SystemTime::now());
        }
        st
    }

    /// Try to apply the file now. `since` is when the triggering event happened (for the
    /// event-to-swap latency metric).
    pub async fn reload(self: &Arc<Self>, trigger: &'static str, since: Instant) -> ReloadOutcome {
        let _one_at_a_time = self.serial.lock().await;
        let built = self.run_job(trigger).await.map(|job| job.built);
        let outcome = match built {
            Ok(Ok(None)) => ReloadOutcome::Unchanged,
            Ok(Ok(Some((runtime, hash, config, sources, ramps)))) => {
                // Breakers new in this config get their state gauge now, not at their first
                // transition.
                runtime.governors.export_states(&self.live.metrics);
                self.live.runtime.store(Arc::new(runtime));
                let old = std::mem::replace(
                    &mut *self.config.lock().expect("not poisoned"),
                    config.clone(),
                );
                if old.freeze != config.freeze {
                    tracing::warn!(
                        old = %describe(old.freeze.as_ref()),
                        new = %describe(config.freeze.as_ref()),
                        trigger,
                        "change freeze edited"
                    );
                }
                self.status.lock().expect("not poisoned").freeze =
                    freeze_status(config.freeze.as_ref());
                self.export_plans();
                let generation = self.mark_applied(hash, &config.server, trigger, since);
                // After the swap, and handed to the writer thread: keeping the record (a
                // synced file write, and a diff against the entry before) never delays this
                // config or the next; the history lists it moments later. Sent under the
                // reload lock, so entries keep the order applied.
                self.record_history(sources, generation, hash, trigger);
                self.ramps_reloaded(ramps).await;
                ReloadOutcome::Applied
            }
            Ok(Err(message)) => {
                let mut st = self.status.lock().expect("not poisoned");
                tracing::error!(file = %st.file, trigger, errors = %message, "config refused; the previous config stays live");
                st.last_error = Some(message);
                st.last_error_at_ms = Some(unix_ms(SystemTime::now()));
                ReloadOutcome::Failed
            }
            Err(JobError::Failed(message)) => {
                let mut st = self.status.lock().expect("not poisoned");
                tracing::error!(file = %st.file, "{message}");
                st.last_error = Some(message);
                st.last_error_at_ms = Some(unix_ms(SystemTime::now()));
                ReloadOutcome::Failed
            }
            Err(JobError::Stuck(message)) => {
                let mut st = self.status.lock().expect("not poisoned");
                tracing::error!(file = %st.file, trigger, error = %message, "config read stuck; the previous config stays live");
                st.last_error = Some(message);
                st.last_error_at_ms = Some(unix_ms(SystemTime::now()));
                ReloadOutcome::Stuck
            }
        };
        let label = match outcome {
            ReloadOutcome::Applied => "applied",
            ReloadOutcome::Unchanged => "unchanged",
            ReloadOutcome::Failed => "failed",
            ReloadOutcome::Stuck => "stuck",
        };
        self.live
            .metrics
            .config_reloads
            .get_or_create(&crate::metrics::OutcomeLabels { outcome: label })
            .inc();
        self.live
            .metrics
            .config_reload_seconds
            .observe(since.elapsed().as_secs_f64());
        outcome
    }

    /// Record a config just made live in the status and metrics; its generation.
    fn mark_applied(
        &self,
        hash: u64,
        server: &rules::model::Server,
        trigger: &str,
        since: Instant,
    ) -> u64 {
        let mut st = self.status.lock().expect("not poisoned");
        *self.hash.lock().expect("not poisoned") = hash;
        st.generation += 1;
        st.hash = format!("{hash:016x}");
        st.loaded_at_ms = unix_ms(SystemTime::now());
        st.last_error = None;
        st.last_error_at_ms = None;
        st.restart_needed = needs_restart(server, &self.bootstrap).then(|| {
            "the `server` section differs from the running one; restart to apply it".to_owned()
        });
        if let Some(why) = &st.restart_needed {
            tracing::warn!(file = %st.file, "{why}");
        }
        self.live
            .metrics
            .config_generation
            .set(st.generation as i64);
        tracing::info!(
            file = %st.file,
            generation = st.generation,
            hash = %st.hash,
            trigger,
            elapsed_ms = since.elapsed().as_secs_f64() * 1e3,
            "config applied"
        );
        st.generation
    }

    /// Queue an applied config for the history. A failure is logged: the config is live
    /// either way.
    fn record_history(&self, sources: Sources, generation: u64, hash: u64, trigger: &str) {
        let Some(tx) = &self.history_writer else {
            return;
        };
        let record = Record {
            sources,
            generation,
            hash,
            trigger: trigger.to_owned(),
        };
        if tx.send(record).is_err() {
            tracing::warn!(
                generation,
                "config history: the writer has stopped; not recorded"
            );
        }
    }

    /// Run the blocking half of a reload (certificates, then read and build) on a thread
    /// of its own and wait for it at most [`READ_TIMEOUT`]. At most one such thread exists:
    /// while an abandoned one is still blocked, no new one starts.
    async fn run_job(self: &Arc<Self>, trigger: &'static str) -> Result<Job, JobError> {
        {
            let mut slot = self.abandoned.lock().expect("not poisoned");
            if let Some(a) = slot.as_mut() {
                match a.rx.try_recv() {
                    Err(oneshot::error::TryRecvError::Empty) => {
                        return Err(JobError::Stuck(format!(
                            "{}: no answer for {} (the read is abandoned; no new read starts until it returns)",
                            a.progress.get(),
                            human(Duration::from_secs(a.started.elapsed().as_secs()))
                        )));
                    }
                    // It returned (or died): its result is stale; read afresh.
                    _ => {
                        *slot = None;
                        self.live.metrics.config_read_stuck.set(0);
                        self.status.lock().expect("not poisoned").read_stuck = None;
                    }
                }
            }
        }
        let progress = Progress::default();
        let started = Instant::now();
        let (tx, mut rx) = oneshot::channel();
        let (this, p) = (self.clone(), progress.clone());
        // The runtime the built upstreams start their health checkers on.
        let tokio_rt = tokio::runtime::Handle::current();
        // A plain thread, not `spawn_blocking`: the runtime's shutdown must never wait for
        // a read that is blocked for good.
        std::thread::Builder::new()
            .name("tidegate-reload".into())
            .spawn(move || {
                let _entered = tokio_rt.enter();
                let certs = this
                    .certs
                    .iter()
                    .map(|c| {
                        p.set(format!(
                            "reloading TLS files {} and {}",
                            c.cert_path, c.key_path
                        ));
                        (c.cert_path.clone(), c.reload())
                    })
                    .collect();
                // Reported at once: a new certificate serves from now on, whatever the
                // rules' build does.
                this.apply_certs(certs, trigger);
                let built = this.build(&p);
                let _ = tx.send(Job { built });
            })
            .map_err(|e| JobError::Failed(format!("cannot start the reload thread: {e}")))?;
        match tokio::time::timeout(READ_TIMEOUT, &mut rx).await {
            Ok(Ok(job)) => Ok(job),
            Ok(Err(_)) => Err(JobError::Failed(
                "reload failed: the reading thread panicked".to_owned(),
            )),
            Err(_) => {
                let message = progress.stuck_message(READ_TIMEOUT);
                self.live.metrics.config_read_stuck.set(1);
                self.status.lock().expect("not poisoned").read_stuck = Some(progress.get());
                *self.abandoned.lock().expect("not poisoned") = Some(Abandoned {
                    rx,
                    progress,
                    started,
                });
                Err(JobError::Stuck(message))
            }
        }
    }

    /// Report listeners' certificate pairs that changed on disk; a refused pair keeps the
    /// previous one serving and is reported on the admin port.
    fn apply_certs(&self, results: Vec<(String, Result<bool, TlsError>)>, trigger: &'static str) {
        for (cert, r) in results {
            match r {
                Ok(false) => {}
                Ok(true) => {
                    tracing::info!(cert = %cert, trigger, "TLS certificate reloaded");
                    self.status.lock().expect("not poisoned").tls_last_error = None;
                }
                Err(e) => {
                    tracing::error!(cert = %cert, trigger, error = %e, "TLS certificate refused; the previous one stays in use");
                    self.status.lock().expect("not poisoned").tls_last_error = Some(e.to_string());
                }
            }
        }
    }

    /// The admin token file, re-read: a new token is swapped in (the old one stops working
    /// at once); an unreadable or unusable one keeps the old, and is reported.
    fn refresh_admin_token(&self, progress: &Progress) {
        let Some(live) = &self.admin_token else {
            return;
        };
        progress.set("reading the admin token file".to_owned());
        let base = self.path.parent();
        match super::config::read_admin_token(&self.bootstrap.admin, base) {
            Ok(Some(t)) if **live.load() != t => {
                live.store(Arc::new(t));
                tracing::info!("admin token replaced from server.admin.token_file");
            }
            Ok(_) => {}
            Err(e) => {
                tracing::error!(error = %e, "server.admin.token_file: keeping the current admin token");
            }
        }
    }

    /// The admin token file, when one is in use.
    fn admin_token_path(&self) -> Option<PathBuf> {
        self.admin_token.as_ref()?;
        let file = self.bootstrap.admin.token_file.as_ref()?;
        Some(self.path.parent().unwrap_or(Path::new(".")).join(file))
    }

    /// Read and build; `Ok(None)` when the content is what is live already.
    fn build(&self, progress: &Progress) -> Result<Option<Built>, String> {
        self.refresh_admin_token(progress);
        let read = read_config_traced(&self.path, progress).map_err(|e| e.to_string())?;
        let (loaded, hash, sources) = (read.loaded, read.hash, read.sources);
        if hash == *self.hash.lock().expect("not poisoned") {
            return Ok(None);
        }
        let lookup = |n: &str| self.embedded.iter().find(|(m, _)| m == n).map(|(_, a)| *a);
        let previous = self.live.runtime.load_full();
        for w in rules::validate::warnings(&loaded.config) {
            tracing::warn!(path = %w.path, "config: {}", w.message);
        }
        // Judged against the live config, at the time of the reload.
        let live_config = self.config.lock().expect("not poisoned").clone();
        rules::freeze::check(
            (&live_config, &previous.snapshot),
            (&loaded.config, &loaded.snapshot),
            SystemTime::now().into(),
        )
        .map_err(|refusal| format!("{}: {refusal}", self.path.display()))?;
        // The plans its triggers have switched on stay on over an edit, and its ramps keep
        // their steps (unless edited).
        let ramps = loaded.snapshot.ramps.clone();
        let snapshot = match self.compile_effective(&loaded.config, &ramps) {
            Ok(Some(effective)) => effective,
            Ok(None) => loaded.snapshot,
            Err(e) => {
                return Err(format!(
                    "{}: with the plans its triggers switched on and the ramps' weights: {e}",
                    self.path.display()
                ));
            }
        };
        let config = Arc::new(loaded.config);
        progress.set(format!(
            "building the rules of {} (resolving upstream names)",
            self.path.display()
        ));
        let secrets = read.secrets.clone();
        let runtime = Runtime::build(
            snapshot,
            read.secrets,
            &lookup,
            Some(&previous),
            &self.live.metrics,
        )
        .map_err(|e| format!("{}: {e}", self.path.display()))?;
        *self.secrets.lock().expect("not poisoned") = secrets;
        Ok(Some((runtime, hash, config, sources, ramps)))
    }
}

/// What a reload reads beside the config file, named at start-up.
#[derive(Debug, Default)]
pub struct Beside {
    /// The include directory (watched alongside the file).
    pub include_dir: Option<PathBuf>,
    /// TLS certificate pairs of the listeners.
    pub certs: Vec<Arc<CertStore>>,
    /// The admin port's token, re-read from `server.admin.token_file`.
    pub admin_token: Option<Arc<ArcSwap<Vec<u8>>>>,
    /// The history of applied configs (`server.data_dir`), if kept.
    pub history: Option<History>,
    /// The key files read with the config at start.
    pub secrets: Secrets,
    /// The ramps, as taken up at start.
    pub ramps: ramps::RampControl,
}

/// Why a reload's blocking half gave no result.
enum JobError {
    /// It failed outright.
    Failed(String),
    /// It gave no answer within the bound, or an abandoned one is still blocked.
    Stuck(String),
}

/// An applied config on its way to the history.
struct Record {
    sources: Sources,
    generation: u64,
    hash: u64,
    trigger: String,
}

/// Start the thread that writes `history`'s entries one at a time, in the order received;
/// it ends when the reloader (the only sender) is dropped.
fn spawn_history_writer(history: History) -> Option<std::sync::mpsc::Sender<Record>> {
    let (tx, rx) = std::sync::mpsc::channel::<Record>();
    let spawned = std::thread::Builder::new()
        .name("tidegate-history".into())
        .spawn(move || {
            for r in rx {
                match history.record(&r.sources, r.generation, r.hash, &r.trigger) {
                    Ok(id) => tracing::debug!(id, r.generation, "config history: recorded"),
                    Err(e) => tracing::warn!("config history: {e}"),
                }
            }
        });
    match spawned {
        Ok(_) => Some(tx),
        Err(e) => {
            tracing::warn!("config history: cannot start its writer ({e}); not kept");
            None
        }
    }
}

/// Run the reloader: file events, SIGHUP and the poll, until shutdown.
pub async fn watch(reloader: Arc<Reloader>, mut shutdown: watch::Receiver<bool>) {
    let (tx, mut rx) = mpsc::channel::<Instant>(16);
    let dir = reloader
        .path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    let file_name = reloader.path.file_name().map(|n| n.to_os_string());
    // Absolute, as the watcher reports absolute paths (a relative `--config` would
    // otherwise leave fragment edits to the poll).
    let include = reloader
        .include_dir
        .clone()
        .map(|d| std::path::absolute(&d).unwrap_or(d));
    let cert_files: Vec<std::ffi::OsString> = reloader
        .certs
        .iter()
        .flat_map(|c| [c.cert_path.clone(), c.key_path.clone()])
        .filter_map(|p| Path::new(&p).file_name().map(|n| n.to_os_string()))
        .collect();
    // The debouncer runs its own thread; it only signals (try_send: a full channel already
    // holds a pending reload, which will read the newest content anyway).
    let watcher = {
        let tx = tx.clone();
        let keys = Arc::clone(&reloader);
        let file_name = file_name.clone();
        let include = include.clone();
        let cert_files = cert_files.clone();
        new_debouncer(DEBOUNCE, None, move |res: DebounceEventResult| match res {
            Ok(events) => {
                let relevant = events.iter().any(|e| {
                    // Our own reads of the file raise access events: ignore them, or every
                    // reload would trigger the next.
                    !matches!(e.kind, EventKind::Access(_))
                        && e.paths.iter().any(|p| {
                            let name = p.file_name();
                            name == file_name.as_deref()
                            // Kubernetes ConfigMap updates swap `..data` and friends.
                            || name.is_some_and(|n| n.to_string_lossy().starts_with(".."))
                            // A listener's certificate or key.
                            || name.is_some_and(|n| cert_files.iter().any(|c| c == n))
                            // The key file of `identity.jwt` (beside the config; elsewhere
                            // the poll finds its edits).
                            || keys.jwks_path().is_some_and(|j| j.file_name() == name)
                            // An upstream's CA bundle, client certificate or key (beside
                            // the config; elsewhere the poll finds its edits).
                            || keys.upstream_tls_paths().iter().any(|f| f.file_name() == name)
                            // The admin token file.
                            || keys.admin_token_path().is_some_and(|t| t.file_name() == name)
                            // A rules fragment in the include directory.
                            || (include.as_deref().is_some_and(|d| p.parent() == Some(d))
                                && p.extension().is_some_and(|x| x == "json"))
                        })
                });
                if relevant {
                    let first = events
                        .iter()
                        .map(|e| e.time)
                        .min()
                        .unwrap_or_else(Instant::now);
                    let _ = tx.try_send(first);
                }
            }
            Err(errors) => {
                for e in errors {
                    tracing::warn!(error = %e, "config watcher error");
                }
            }
        })
    };
    let _watcher = match watcher {
        Ok(mut w) => match w.watch(&dir, RecursiveMode::NonRecursive) {
            Ok(()) => {
                let mut extra: Vec<PathBuf> =
                    reloader.certs.iter().flat_map(|c| c.dirs()).collect();
                extra.sort();
                extra.dedup();
                for d in extra.iter().filter(|d| **d != dir) {
                    if let Err(e) = w.watch(d, RecursiveMode::NonRecursive) {
                        tracing::error!(dir = %d.display(), error = %e, "cannot watch a certificate directory; relying on SIGHUP and polling");
                    }
                }
                if let Some(inc) = &include
                    && let Err(e) = w.watch(inc, RecursiveMode::NonRecursive)
                {
                    tracing::error!(dir = %inc.display(), error = %e, "cannot watch the include directory; relying on SIGHUP and polling");
                }
                Some(w)
            }
            Err(e) => {
                tracing::error!(dir = %dir.display(), error = %e, "cannot watch the config directory; relying on SIGHUP and polling");
                None
            }
        },
        Err(e) => {
            tracing::error!(error = %e, "cannot start the config watcher; relying on SIGHUP and polling");
            None
        }
    };

    #[cfg(unix)]
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    let mut poll = tokio::time::interval(POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // A write between start-up's read and the watcher's registration would otherwise go
    // unseen (and fool the poll's baseline): check once now that we are watching.
    let mut fingerprint = fingerprint_of(&reloader);
    // Every reload is raced against shutdown: a stop never waits for a reload's read (at
    // most `READ_TIMEOUT`), let alone for a blocked one.
    let triggers = async {
        reloader.reload("watch start", Instant::now()).await;
        loop {
            #[cfg(unix)]
            let sighup = async {
                match hup.as_mut() {
                    Some(h) => {
                        h.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            #[cfg(not(unix))]
            let sighup = std::future::pending::<()>();
            tokio::select! {
                Some(since) = rx.recv() => {
                    reloader.reload("file event", since).await;
                    fingerprint = fingerprint_of(&reloader);
                }
                _ = sighup => {
                    reloader.reload("SIGHUP", Instant::now()).await;
                    fingerprint = fingerprint_of(&reloader);
                }
                _ = poll.tick() => {
                    let now = fingerprint_of(&reloader);
                    // A read abandoned as stuck that has returned since: read afresh, as
                    // the edits made meanwhile were never read.
                    if now != fingerprint || reloader.abandoned_read_returned() {
                        fingerprint = now;
                        reloader.reload("poll", Instant::now()).await;
                    }
                }
            }
        }
    };
    tokio::select! {
        _ = triggers => {}
        _ = crate::shutdown::stopped(&mut shutdown) => {}
    }
}

/// Size and modification time of the config file (following symlinks), the key file of
/// `identity.jwt`, the files of the upstreams' `tls`, the listeners' certificates and keys,
/// and every file in the include directory.
fn fingerprint_of(r: &Reloader) -> Vec<(PathBuf, u64, Option<SystemTime>)> {
    let stat = |p: PathBuf| {
        let m = std::fs::metadata(&p).ok();
        let (len, modified) = m.map_or((u64::MAX, None), |m| (m.len(), m.modified().ok()));
        (p, len, modified)
    };
    let mut v = vec![stat(r.path.clone())];
    if let Some(j) = r.jwks_path() {
        v.push(stat(j));
    }
    if let Some(t) = r.admin_token_path() {
        v.push(stat(t));
    }
    v.extend(r.upstream_tls_paths().into_iter().map(stat));
    for c in &r.certs {
        v.push(stat(PathBuf::from(&c.cert_path)));
        v.push(stat(PathBuf::from(&c.key_path)));
    }
    if let Some(dir) = &r.include_dir {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map(|d| d.filter_map(Result::ok).map(|e| e.path()).collect())
            .unwrap_or_default();
        files.sort();
        v.extend(files.into_iter().map(stat));
    }
    v
}

/// The admin port's view of a freeze (`active` as of now).
fn freeze_status(f: Option<&rules::model::Freeze>) -> Option<FreezeStatus> {
    f.map(|f| FreezeStatus {
        window: f.clone(),
        active: freeze_active(f, SystemTime::now()),
    })
}

fn freeze_active(f: &rules::model::Freeze, now: SystemTime) -> bool {
    rules::freeze::Window::of(f).is_ok_and(|w| w.is_active(now.into()))
}

/// A freeze window for the log: `"gala-night" START → END`, or `none`.
fn describe(f: Option<&rules::model::Freeze>) -> String {
    f.and_then(|f| rules::freeze::Window::of(f).ok())
        .map_or_else(|| "none".to_owned(), |w| w.describe())
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Whether `server` differs from the running bootstrap section in a setting that needs a
/// restart: any but `trusted_proxies`, which the rules snapshot carries (a reload applies it).
fn needs_restart(server: &rules::model::Server, running: &rules::model::Server) -> bool {
    let mut s = server.clone();
    s.trusted_proxies.clone_from(&running.trusted_proxies);
    s != *running
}
