//! The worker's side of the coordinator protocol: joining a generation (and waiting until
//! its ring is formed), the lease kept by a heartbeat task, and progress reports sent without
//! blocking the training thread. Every call runs on this module's tokio runtime; the training
//! thread only reads the shared stop flag and queues reports.
//!
//! The coordinator may go away and come back (a restart): registration retries with
//! bounded exponential backoff, and heartbeats keep trying, for the connect patience; the
//! restarted coordinator then refuses the old generation and the worker registers again.

use crate::error::{Context, Result, WorkerError};
use ddpm_auth::{AuthChannel, ClientSecurity};
use ddpm_collective::AbortHandle;
use ddpm_proto::v1::coordinator_client::CoordinatorClient;
use ddpm_proto::v1::{
    CheckpointNotice, HeartbeatRequest, ProgressReport, RegisterRequest, RegisterResponse, Role,
    RunState, WorkAssignment, WorkRequest,
};
use ddpm_proto::{Rendezvous, PROTOCOL_VERSION};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Who this worker is, as it registers.
#[derive(Debug, Clone)]
pub struct Identity {
    /// `--rank N`, or any.
    pub requested_rank: Option<u32>,
    /// Host name.
    pub host: String,
    /// Device, e.g. "cpu", "cuda:1".
    pub device: String,
    /// Unique per process.
    pub member_id: String,
    /// This worker's ring address (host:port).
    pub ring_address: String,
    /// A fresh `ncclUniqueId` (128 bytes) for the NCCL backend, or empty
    /// ([`crate::comm::registration_id`]).
    pub nccl_unique_id: Vec<u8>,
}

/// A worker admitted to a generation whose ring is formed.
#[derive(Debug, Clone)]
pub struct Joined {
    /// Its rank slot: names it in every request (`worker --rank N`).
    pub rank: u32,
    /// Its position in the ring: the collective's rank, its rows of every global batch,
    /// and (0) the checkpoint writer.
    pub ring_rank: u32,
    /// Workers in the ring.
    pub world_size: u32,
    /// Ring generation.
    pub generation: u64,
    /// The collective's rendezvous.
    pub rendezvous: Rendezvous,
    /// The resolved config, TOML.
    pub config_toml: String,
    /// Heartbeat at least this often.
    pub lease: Duration,
}

/// Why training must stop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Halt {
    /// The run moved to another generation (or this one cannot go on): register again.
    Reform(String),
    /// The run failed, or the coordinator is gone for good: stop.
    Fatal(String),
}

impl Halt {
    /// The error that ends what was going on (`context` says what): a re-form, or a stop.
    pub fn into_error(self, context: &str) -> WorkerError {
        match self {
            Halt::Reform(why) => WorkerError::Reform(format!("{context}: {why}")),
            Halt::Fatal(why) => WorkerError::Invalid(format!("{context}: {why}")),
        }
    }
}

/// How the registration loop waits.
#[derive(Debug, Clone, Copy)]
pub struct JoinPatience {
    /// How long the coordinator may be unreachable (a restart) before the worker gives up.
    pub coordinator: Duration,
    /// How long to keep asking for a rank another worker holds (a replacement started
    /// before its predecessor's lease ran out).
    pub taken_rank: Duration,
}

/// Status codes after which a call is tried again (the coordinator is restarting, or the
/// network failed).
fn transient(code: tonic::Code) -> bool {
    matches!(
        code,
        tonic::Code::Unavailable
            | tonic::Code::Unknown
            | tonic::Code::DeadlineExceeded
            | tonic::Code::Cancelled
            | tonic::Code::Aborted
    )
}

/// Exponential backoff from 200 ms, doubling, at most 5 s.
#[derive(Debug)]
struct Backoff(Duration);

impl Backoff {
    fn new() -> Self {
        Self(Duration::from_millis(200))
    }

    fn next(&mut self) -> Duration {
        let d = self.0;
        self.0 = (self.0 * 2).min(Duration::from_secs(5));
        d
    }
}

/// A progress report for the reporter task, with where to send the answer when the sender
/// waits for it.
type QueuedReport = (
    ProgressReport,
    Option<tokio::sync::oneshot::Sender<Result<RunState>>>,
);

/// A connection to the coordinator and the tasks that keep this worker's lease.
pub struct CoordinatorLink {
    rt: tokio::runtime::Runtime,
    client: CoordinatorClient<AuthChannel>,
    url: String,
    /// Why training must stop (set by the heartbeat task), if it must.
    stop: Arc<Mutex<Option<Halt>>>,
    /// The heartbeat task of the current generation.
    heartbeat: Option<tokio::task::JoinHandle<()>>,
    /// The generation whose heartbeat task may set `stop` and `finished` (an ended task's
    /// late write is ignored).
    current: Arc<std::sync::atomic::AtomicU64>,
    /// Set when a heartbeat answer says the run is finished.
    finished: Arc<std::sync::atomic::AtomicBool>,
    /// Aborts the collective when the heartbeat task learns the run moved on.
    abort: Arc<Mutex<Option<Arc<dyn AbortHandle>>>>,
    /// Reports go out one at a time, in order, so a late one never lands after the final.
    reports: tokio::sync::mpsc::UnboundedSender<QueuedReport>,
}

/// Every RPC gives up after this long (the coordinator answers from memory).
const RPC_TIMEOUT: Duration = Duration::from_secs(20);

/// Calls `call` until it answers: a transient failure of the RPC in it (the coordinator
/// restarting, a store blip) is tried again with [`Backoff`] (logging `note`) until
/// `patience` has passed; a refusal of the generation becomes [`WorkerError::Reform`].
fn retrying<T>(patience: Duration, note: &str, mut call: impl FnMut() -> Result<T>) -> Result<T> {
    let started = Instant::now();
    let mut backoff = Backoff::new();
    loop {
        match call() {
            Err(WorkerError::Rpc { status, .. })
                if transient(status.code()) && started.elapsed() < patience =>
            {
                let wait = backoff.next();
                tracing::warn!(error = %status.message(), retry_in = ?wait, "{note}");
                std::thread::sleep(wait);
            }
            Err(WorkerError::Rpc { status, what }) => return Err(stale_or(*status, &what)),
            other => return other,
        }
    }
}

/// A refusal of this worker's generation (FAILED_PRECONDITION: the run moved on, or the
/// coordinator restarted) as [`WorkerError::Reform`]; any other status as an RPC error.
fn stale_or(status: tonic::Status, what: &str) -> WorkerError {
    if status.code() == tonic::Code::FailedPrecondition {
        WorkerError::Reform(format!("coordinator {what}: {}", status.message()))
    } else {
        rpc(what)(status)
    }
}

fn rpc(what: &str) -> impl FnOnce(tonic::Status) -> WorkerError + '_ {
    move |status| WorkerError::Rpc {
        what: what.to_string(),
        status: Box::new(status),
    }
}

impl CoordinatorLink {
    /// Connects to `url` (http://host:port, or https:// for TLS), retrying until `patience`
    /// has passed: the coordinator may still be starting. Every call carries the token of
    /// `security`.
    pub fn connect(url: &str, patience: Duration, security: &ClientSecurity) -> Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("worker-rpc")
            .enable_all()
            .build()
            .context("starting the RPC runtime")?;
        let deadline = Instant::now() + patience;
        let endpoint = security
            .endpoint(url)
            .map_err(|e| match e {
                ddpm_auth::AuthError::Url { reason, .. } => {
                    WorkerError::Invalid(format!("--coordinator {url:?}: {reason}"))
                }
                other => other.into(),
            })?
            .connect_timeout(Duration::from_secs(5))
            .timeout(RPC_TIMEOUT)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(20));
        let channel = loop {
            match rt.block_on(endpoint.connect()) {
                Ok(c) => break c,
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!(url, error = %e, "coordinator not reachable yet; retrying");
                    std::thread::sleep(Duration::from_millis(250));
                }
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!("connecting to the coordinator at {url} (tried for {patience:?})")
                    })
                }
            }
        };
        let client = CoordinatorClient::new(security.authorize(channel))
            .max_decoding_message_size(ddpm_auth::MAX_RESPONSE_BYTES);
        let (reports, mut queue) = tokio::sync::mpsc::unbounded_channel::<QueuedReport>();
        let mut reporter = client.clone();
        rt.spawn(async move {
            while let Some((report, answer)) = queue.recv().await {
                let r = reporter.report_progress(report).await;
                match answer {
                    Some(tx) => {
                        let _ = tx.send(r.map_err(rpc("ReportProgress")).map(|ack| {
                            RunState::try_from(ack.into_inner().state)
                                .unwrap_or(RunState::Unspecified)
                        }));
                    }
                    None => {
                        if let Err(s) = r {
                            tracing::warn!(error = %s.message(), "progress report not delivered");
                        }
                    }
                }
            }
        });
        Ok(Self {
            rt,
            client,
            url: url.to_string(),
            stop: Arc::new(Mutex::new(None)),
            heartbeat: None,
            current: Arc::new(std::sync::atomic::AtomicU64::new(0)),
            finished: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            abort: Arc::new(Mutex::new(None)),
            reports,
        })
    }

    /// Registers and waits until the generation's ring is formed (re-registering every
    /// 200 ms, which renews the lease meanwhile), then returns the slot, the ring position,
    /// the rendezvous and the config. `failed_generation` (0: none) tells the coordinator
    /// that this worker's collective of that generation failed. An unreachable coordinator
    /// is retried with backoff for `patience.coordinator`; a rank held by another worker
    /// for `patience.taken_rank`.
    pub fn join(
        &mut self,
        me: &Identity,
        failed_generation: u64,
        patience: JoinPatience,
    ) -> Result<Joined> {
        let request = RegisterRequest {
            protocol_version: PROTOCOL_VERSION,
            role: Role::Worker as i32,
            requested_rank: me.requested_rank,
            host: me.host.clone(),
            device: me.device.clone(),
            member_id: me.member_id.clone(),
            ring_address: me.ring_address.clone(),
            nccl_unique_id: me.nccl_unique_id.clone(),
            failed_generation,
        };
        let mut last_note = Instant::now();
        let mut unreachable: Option<(Instant, Backoff)> = None;
        let mut taken_since: Option<Instant> = None;
        loop {
            let r: RegisterResponse = match self.rt.block_on(self.client.register(request.clone()))
            {
                Ok(r) => r.into_inner(),
                Err(s) if transient(s.code()) => {
                    let (since, backoff) =
                        unreachable.get_or_insert_with(|| (Instant::now(), Backoff::new()));
                    if since.elapsed() > patience.coordinator {
                        return Err(rpc("Register")(s)).with_context(|| {
                            format!(
                                "the coordinator at {} was unreachable for {:?}",
                                self.url,
                                since.elapsed()
                            )
                        });
                    }
                    let wait = backoff.next();
                    tracing::warn!(error = %s.message(), retry_in = ?wait, "the coordinator is unreachable; registering again");
                    std::thread::sleep(wait);
                    continue;
                }
                Err(s) if s.code() == tonic::Code::AlreadyExists => {
                    let since = *taken_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= patience.taken_rank {
                        return Err(rpc("Register")(s));
                    }
                    if last_note.elapsed() > Duration::from_secs(5) || since.elapsed().is_zero() {
                        tracing::info!(error = %s.message(), waited = ?since.elapsed(), "the rank is held; asking again until its holder's lease runs out");
                        last_note = Instant::now();
                    }
                    std::thread::sleep(Duration::from_millis(500));
                    continue;
                }
                Err(s) => return Err(rpc("Register")(s)),
            };
            unreachable = None;
            taken_since = None;
            if let Some(wire) = r.rendezvous {
                let rendezvous = Rendezvous::try_from(wire).map_err(|e| {
                    WorkerError::Invalid(format!("the coordinator's rendezvous: {e}"))
                })?;
                return Ok(Joined {
                    rank: r.rank,
                    ring_rank: r.ring_rank,
                    world_size: r.world_size,
                    generation: r.generation,
                    rendezvous,
                    config_toml: r.config_toml,
                    lease: Duration::from_millis(r.lease_millis.max(300)),
                });
            }
            if last_note.elapsed() > Duration::from_secs(10) {
                tracing::info!(
                    rank = r.rank,
                    generation = r.generation,
                    world_size = r.world_size,
                    "waiting for the ring of the generation to form"
                );
                last_note = Instant::now();
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Starts the heartbeat task of `joined`'s generation (ending the previous one, and
    /// clearing the stop flag): every third of the lease, at most every second, it renews
    /// the lease. A refusal (another generation, a lost lease) asks training to re-form; a
    /// failed run, or a coordinator unreachable for longer than `patience`, stops it.
    pub fn keep_lease(&mut self, joined: &Joined, member_id: &str, patience: Duration) {
        use std::sync::atomic::Ordering;
        if let Some(old) = self.heartbeat.take() {
            old.abort();
        }
        let generation = joined.generation;
        {
            // Under the stop lock, which the old task's halt also takes: once this is done,
            // nothing the old task does changes the new generation's flags.
            let mut stop = self.stop.lock().expect("stop flag");
            self.current.store(generation, Ordering::SeqCst);
            *stop = None;
            *self.abort.lock().expect("abort handle") = None;
            self.finished.store(false, Ordering::SeqCst);
        }
        let mut client = self.client.clone();
        let stop = self.stop.clone();
        let abort = self.abort.clone();
        let current = self.current.clone();
        let still_current = self.current.clone();
        let finished = self.finished.clone();
        // Stops training and interrupts a collective blocked on a peer that is gone; only
        // while this task's generation is the current one.
        let halt = move |why: Halt| {
            let mut stop = stop.lock().expect("stop flag");
            if current.load(Ordering::SeqCst) != generation {
                return;
            }
            *stop = Some(why);
            if let Some(a) = abort.lock().expect("abort handle").as_ref() {
                a.abort();
            }
        };
        let request = HeartbeatRequest {
            rank: joined.rank,
            generation: joined.generation,
            member_id: member_id.to_string(),
        };
        let every = (joined.lease / 3).min(Duration::from_secs(1));
        self.heartbeat = Some(self.rt.spawn(async move {
            let mut last_ok = Instant::now();
            let mut last_warning: Option<Instant> = None;
            loop {
                tokio::time::sleep(every).await;
                match client.heartbeat(request.clone()).await {
                    Ok(r) => {
                        last_ok = Instant::now();
                        let state = r.into_inner().state;
                        if state == RunState::Failed as i32 {
                            halt(Halt::Fatal("the coordinator says the run failed".into()));
                            return;
                        }
                        if state == RunState::Finished as i32
                            && still_current.load(Ordering::SeqCst) == generation
                        {
                            finished.store(true, Ordering::SeqCst);
                        }
                    }
                    Err(s) if s.code() == tonic::Code::FailedPrecondition => {
                        halt(Halt::Reform(format!(
                            "the coordinator refused the heartbeat: {}",
                            s.message()
                        )));
                        return;
                    }
                    Err(s) => {
                        if last_ok.elapsed() > patience {
                            halt(Halt::Fatal(format!(
                                "no heartbeat reached the coordinator for {:?}: {}",
                                last_ok.elapsed(),
                                s.message()
                            )));
                            return;
                        }
                        if last_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(5)) {
                            tracing::warn!(error = %s.message(), "heartbeat failed; training goes on, retrying");
                            last_warning = Some(Instant::now());
                        }
                    }
                }
            }
        }));
    }

    /// From now on, a refused heartbeat also aborts `abort`'s collective, so a rank blocked
    /// on a peer the coordinator has given up on fails at once instead of at the timeout.
    /// If the stop flag is already set, `abort` fires at once.
    pub fn abort_on_stop(&self, abort: Arc<dyn AbortHandle>) {
        let stop = self.stop.lock().expect("stop flag");
        if stop.is_some() {
            abort.abort();
        }
        *self.abort.lock().expect("abort handle") = Some(abort);
    }

    /// After this rank's final report was answered RUNNING (other ranks still to report):
    /// waits until a heartbeat says the run is finished, so that this worker is still there
    /// if the others' reports fail and the run must re-form (it then gets
    /// [`WorkerError::Reform`]). Gives up after `patience`.
    pub fn wait_finished(&self, patience: Duration) -> Result<()> {
        let started = Instant::now();
        loop {
            if self.finished.load(std::sync::atomic::Ordering::SeqCst) {
                return Ok(());
            }
            if let Some(halt) = self.stop_reason() {
                return Err(halt.into_error("waiting for the other ranks' final reports"));
            }
            if started.elapsed() > patience {
                return Err(WorkerError::Invalid(format!(
                    "the run was not finished {patience:?} after this rank's final report"
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Why training must stop, if it must.
    pub fn stop_reason(&self) -> Option<Halt> {
        self.stop.lock().expect("stop flag").clone()
    }

    /// The stretch of training for this rank.
    /// An unreachable coordinator (or an unreadable store) is retried with backoff for
    /// `patience`; a refusal of the generation asks to re-form.
    pub fn next_work(&self, joined: &Joined, patience: Duration) -> Result<WorkAssignment> {
        let mut client = self.client.clone();
        let req = WorkRequest {
            rank: joined.rank,
            generation: joined.generation,
        };
        retrying(
            patience,
            "no work from the coordinator; asking again",
            || {
                self.rt
                    .block_on(client.next_work(req))
                    .map(tonic::Response::into_inner)
                    .map_err(rpc("NextWork"))
            },
        )
    }

    /// Queues a progress report; the training thread does not wait for it.
    pub fn report(&self, report: ProgressReport) {
        let _ = self.reports.send((report, None));
    }

    /// Sends a progress report after every queued one and waits for the answer (the final
    /// report). An unreachable coordinator is retried with backoff for `patience`; a
    /// refusal of the generation asks to re-form.
    pub fn report_and_wait(&self, report: ProgressReport, patience: Duration) -> Result<RunState> {
        let gone = || WorkerError::Invalid("the progress reporter stopped".into());
        let note = "the progress report did not reach the coordinator; sending it again";
        retrying(patience, note, || {
            let (tx, rx) = tokio::sync::oneshot::channel();
            self.reports.send((report, Some(tx))).map_err(|_| gone())?;
            self.rt.block_on(rx).map_err(|_| gone())?
        })
    }

    /// Rank 0: tells the coordinator a checkpoint was committed (without blocking).
    pub fn checkpoint_committed(&self, notice: CheckpointNotice) {
        let mut client = self.client.clone();
        self.rt.spawn(async move {
            if let Err(s) = client.checkpoint_committed(notice).await {
                tracing::warn!(error = %s.message(), "checkpoint notice not delivered");
            }
        });
    }

    /// The coordinator's URL.
    pub fn url(&self) -> &str {
        &self.url
    }
}
