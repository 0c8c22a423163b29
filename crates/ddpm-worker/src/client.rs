//! The worker's side of the coordinator protocol: joining the run (and waiting for every
//! rank), the lease kept by a heartbeat task, and progress reports sent without blocking the
//! training thread. Every call runs on this module's tokio runtime; the training thread only
//! reads the shared stop flag and queues reports.

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
}

/// A worker admitted to a generation whose every rank is present.
#[derive(Debug, Clone)]
pub struct Joined {
    /// Rank.
    pub rank: u32,
    /// World size.
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
    stop: Arc<Mutex<Option<String>>>,
    /// Aborts the collective when the heartbeat task learns the run moved on.
    abort: Arc<Mutex<Option<Arc<dyn AbortHandle>>>>,
    /// Reports go out one at a time, in order, so a late one never lands after the final.
    reports: tokio::sync::mpsc::UnboundedSender<QueuedReport>,
}

/// Every RPC gives up after this long (the coordinator answers from memory).
const RPC_TIMEOUT: Duration = Duration::from_secs(20);

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
            abort: Arc::new(Mutex::new(None)),
            reports,
        })
    }

    /// Registers and waits until every rank of the generation is present (heartbeating
    /// meanwhile), then returns the rank, the rendezvous and the config.
    pub fn join(&mut self, me: &Identity) -> Result<Joined> {
        let request = RegisterRequest {
            protocol_version: PROTOCOL_VERSION,
            role: Role::Worker as i32,
            requested_rank: me.requested_rank,
            host: me.host.clone(),
            device: me.device.clone(),
            member_id: me.member_id.clone(),
            ring_address: me.ring_address.clone(),
            nccl_unique_id: Vec::new(),
        };
        let mut last_note = Instant::now();
        loop {
            let r: RegisterResponse = self
                .rt
                .block_on(self.client.register(request.clone()))
                .map_err(rpc("Register"))?
                .into_inner();
            if let Some(wire) = r.rendezvous {
                let rendezvous = Rendezvous::try_from(wire).map_err(|e| {
                    WorkerError::Invalid(format!("the coordinator's rendezvous: {e}"))
                })?;
                return Ok(Joined {
                    rank: r.rank,
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
                    world_size = r.world_size,
                    "waiting for the other workers to register"
                );
                last_note = Instant::now();
            }
            // Re-registering (same member id, same rank) renews the lease while waiting.
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Starts the heartbeat task: every third of the lease it renews it; a refusal (another
    /// generation, a lost lease) or a failed run sets the stop reason the training loop reads.
    pub fn keep_lease(&self, joined: &Joined, member_id: &str) {
        let mut client = self.client.clone();
        let stop = self.stop.clone();
        let abort = self.abort.clone();
        // Stops training and interrupts a collective blocked on a peer that is gone.
        let halt = move |why: String| {
            *stop.lock().expect("stop flag") = Some(why);
            if let Some(a) = abort.lock().expect("abort handle").as_ref() {
                a.abort();
            }
        };
        let request = HeartbeatRequest {
            rank: joined.rank,
            generation: joined.generation,
            member_id: member_id.to_string(),
        };
        let every = joined.lease / 3;
        let lease = joined.lease;
        self.rt.spawn(async move {
            let mut last_ok = Instant::now();
            loop {
                tokio::time::sleep(every).await;
                match client.heartbeat(request.clone()).await {
                    Ok(r) => {
                        last_ok = Instant::now();
                        if r.into_inner().state == RunState::Failed as i32 {
                            halt("the coordinator says the run failed".into());
                            return;
                        }
                    }
                    Err(s) if s.code() == tonic::Code::FailedPrecondition => {
                        halt(format!(
                            "the coordinator refused the heartbeat: {}",
                            s.message()
                        ));
                        return;
                    }
                    Err(s) => {
                        tracing::warn!(error = %s.message(), "heartbeat failed; retrying");
                        if last_ok.elapsed() > lease {
                            halt(format!(
                                "no heartbeat reached the coordinator for {:?} (the lease): {}",
                                last_ok.elapsed(),
                                s.message()
                            ));
                            return;
                        }
                    }
                }
            }
        });
    }

    /// From now on, a refused heartbeat also aborts `abort`'s collective, so a rank blocked
    /// on a peer the coordinator has given up on fails at once instead of at the timeout.
    pub fn abort_on_stop(&self, abort: Arc<dyn AbortHandle>) {
        *self.abort.lock().expect("abort handle") = Some(abort);
    }

    /// Why training must stop, if the coordinator said so.
    pub fn stop_reason(&self) -> Option<String> {
        self.stop.lock().expect("stop flag").clone()
    }

    /// The stretch of training for this rank.
    pub fn next_work(&mut self, joined: &Joined) -> Result<WorkAssignment> {
        let req = WorkRequest {
            rank: joined.rank,
            generation: joined.generation,
        };
        Ok(self
            .rt
            .block_on(self.client.next_work(req))
            .map_err(rpc("NextWork"))?
            .into_inner())
    }

    /// Queues a progress report; the training thread does not wait for it.
    pub fn report(&self, report: ProgressReport) {
        let _ = self.reports.send((report, None));
    }

    /// Sends a progress report after every queued one and waits for the answer (the final
    /// report).
    pub fn report_and_wait(&self, report: ProgressReport) -> Result<RunState> {
        let gone = || WorkerError::Invalid("the progress reporter stopped".into());
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.reports.send((report, Some(tx))).map_err(|_| gone())?;
        self.rt.block_on(rx).map_err(|_| gone())?
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
