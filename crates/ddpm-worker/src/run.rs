//! One worker process from registration to the last step. Per generation: join it, restore
//! the assigned checkpoint, form the collective (the TCP ring, or NCCL: [`crate::comm`]),
//! broadcast ring rank 0's parameters, train, report. When the generation fails (a peer died
//! or hung, or the coordinator moved the run on or restarted), the worker registers again,
//! saying which generation failed, with a fresh `ncclUniqueId` on the NCCL backend, and
//! trains on in the next one from the newest committed checkpoint.

use crate::checkpoints::Checkpoints;
use crate::client::{CoordinatorLink, Halt, Identity, JoinPatience, Joined};
use crate::comm::{self, RegistrationId};
use crate::error::{chain, ensure, Context, Result, WorkerError};
use crate::exchange::{broadcast_from_rank0, GradientExchange};
use crate::train_loop::{self, LogLine, LoopObserver, LoopSetup, Ranks};
use ddpm_collective::{AbortFlag, Collective};
use ddpm_config::Config;
use ddpm_data::epoch::Cursor;
use ddpm_data::samples::SampleSource;
use ddpm_proto::v1::{CheckpointNotice, ProgressReport};
use ddpm_trainer::Trainer;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tch::Device;

/// How a worker process was started.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// `http://host:port` of the coordinator.
    pub coordinator: String,
    /// `--rank N`, or any free rank.
    pub rank: Option<u32>,
    /// Device to train on.
    pub device: Device,
    /// Its name as given (`cpu`, `cuda:1`).
    pub device_name: String,
    /// Where the ring listener binds.
    pub ring_listen: SocketAddr,
    /// Host the other ranks reach this one at (default: the listener's IP).
    pub advertise: Option<String>,
    /// Intra-op CPU threads (overrides `train.threads`).
    pub threads: Option<i64>,
    /// Rank 0's output directory (overrides `run.out_dir`).
    pub out: Option<PathBuf>,
    /// How long to keep trying to reach the coordinator (at start, and when it restarts).
    pub connect_patience: Duration,
    /// How long to keep asking for a `--rank` another worker holds.
    pub taken_rank_patience: Duration,
    /// The token and TLS files to reach the coordinator with.
    pub security: ddpm_auth::ClientSecurity,
    /// Test mode: record each applied step's samples in this directory's data ledger.
    pub ledger: Option<PathBuf>,
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// The resolved config the coordinator handed out, with credential-like store options taken
/// from this process's environment ([`Config::restore_redacted`]).
fn received_config(joined: &Joined, o: &WorkerOptions) -> Result<Config> {
    let mut cfg = Config::parse(&joined.config_toml, "the config from the coordinator")?;
    let env = |v: &str| std::env::var(v).ok();
    cfg.restore_redacted(env)?;
    if let Some(t) = o.threads {
        cfg.train.threads = t;
    }
    Ok(cfg)
}

/// Generations in a row that may fail before a single step before the worker gives up.
pub const MAX_FRUITLESS_GENERATIONS: u32 = 20;

struct Reporter<'a> {
    link: &'a CoordinatorLink,
    joined: &'a Joined,
    checkpoints: Option<&'a Checkpoints>,
    reported_checkpoint: Option<u64>,
    url: String,
    /// The last step: its report is sent after the final checkpoint is committed.
    total: u64,
    /// The last progress report made.
    last: Option<ProgressReport>,
    /// Steps completed in this generation.
    steps: u64,
}

impl Reporter<'_> {
    fn notice_checkpoints(&mut self) {
        let Some(c) = self.checkpoints else { return };
        let Some(step) = c.last_committed() else {
            return;
        };
        if Some(step) != self.reported_checkpoint {
            self.reported_checkpoint = Some(step);
            self.link.checkpoint_committed(CheckpointNotice {
                rank: self.joined.rank,
                generation: self.joined.generation,
                step,
                url: self.url.clone(),
            });
        }
    }
}

fn report_of(joined: &Joined, line: &LogLine) -> ProgressReport {
    ProgressReport {
        rank: joined.rank,
        generation: joined.generation,
        step: line.step,
        loss: line.loss,
        images_per_second: line.images_per_second,
        epoch: line.cursor.epoch,
        position: line.cursor.position,
        data_wait_fraction: line.data_wait_fraction,
        allreduce_seconds: line.allreduce_seconds,
    }
}

impl LoopObserver for Reporter<'_> {
    fn stepped(&mut self, _step: u64) {
        self.steps += 1;
    }

    fn logged(&mut self, line: &LogLine) {
        line.record_gauges(self.joined.rank as usize);
        line.trace();
        let report = report_of(self.joined, line);
        self.last = Some(report);
        if line.step < self.total {
            self.link.report(report);
        }
        self.notice_checkpoints();
    }

    fn stop_reason(&mut self) -> Option<crate::client::Halt> {
        self.link.stop_reason()
    }

    /// The coordinator's copy of this rank's loss becomes the non-finite value too (it
    /// outlives this process, so the NaN-loss alert fires), then the loop stops.
    fn diverged(&mut self, step: u64, loss: f64) {
        // The last report's throughput and cursor, so only the loss changes.
        let mut report = self.last.unwrap_or(ProgressReport {
            rank: self.joined.rank,
            generation: self.joined.generation,
            ..ProgressReport::default()
        });
        report.step = step;
        report.loss = loss;
        if let Err(e) = self.link.report_and_wait(report, Duration::from_secs(10)) {
            tracing::warn!(error = %e, "the non-finite loss was not reported to the coordinator");
        }
    }
}

/// Binds this generation's ring listener and the address the other ranks reach it at.
fn ring_listener(o: &WorkerOptions) -> Result<(TcpListener, String)> {
    let listener = TcpListener::bind(o.ring_listen)
        .with_context(|| format!("binding the ring listener on {}", o.ring_listen))?;
    let bound = listener.local_addr().context("ring listener address")?;
    let address = match &o.advertise {
        Some(host) => format!("{host}:{}", bound.port()),
        None => {
            ensure!(
                !bound.ip().is_unspecified(),
                "--ring-listen {bound}: the other workers cannot reach an unspecified address; give --advertise HOST (this worker's name or IP as they see it)"
            );
            bound.to_string()
        }
    };
    Ok((listener, address))
}

/// The training data, opened once and kept across generations while `data` is unchanged.
#[derive(Default)]
struct DataCache(Option<(ddpm_config::DataConfig, Arc<dyn SampleSource>)>);

impl DataCache {
    fn open(&mut self, data: &ddpm_config::DataConfig) -> Result<Arc<dyn SampleSource>> {
        if let Some((cfg, source)) = &self.0 {
            if cfg == data {
                return Ok(source.clone());
            }
        }
        let source = crate::dataset::open_training_source(data)
            .with_context(|| format!("opening data.source {:?}", data.source))?;
        self.0 = Some((data.clone(), source.clone()));
        Ok(source)
    }
}

/// What a worker keeps from one generation to the next.
#[derive(Default)]
struct Kept {
    /// The training data.
    data: DataCache,
    /// Test mode: one ledger file per process, across its generations.
    ledger: Option<crate::ledger::Ledger>,
}

/// Ring rank 0: waits for the checkpoint uploads in flight and tells the coordinator of the
/// newest committed one.
fn finish_uploads(
    checkpoints: Checkpoints,
    link: &CoordinatorLink,
    joined: &Joined,
) -> ddpm_checkpoint::UploadStats {
    let url = checkpoints.url().to_string();
    let uploads = checkpoints.finish();
    if let Some(step) = uploads.last_committed {
        link.checkpoint_committed(CheckpointNotice {
            rank: joined.rank,
            generation: joined.generation,
            step,
            url,
        });
    }
    uploads
}

/// Runs one worker to the end of the run, through as many generations as it takes.
pub fn run(o: WorkerOptions) -> Result<()> {
    let host = host_name();
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let member_id = format!("{host}:{}:{started}", std::process::id());
    // Bound before the coordinator is reached, so a listen address that cannot work is
    // named at once; later generations bind afresh.
    let mut first_listener = Some(ring_listener(&o)?);
    let mut link = CoordinatorLink::connect(&o.coordinator, o.connect_patience, &o.security)?;
    let patience = JoinPatience {
        coordinator: o.connect_patience,
        taken_rank: o.taken_rank_patience,
    };
    let mut kept = Kept::default();
    let mut failed_generation = 0;
    let mut fruitless = 0;
    // The run's backend, known from the config of the first answer (comm's module docs).
    let mut backend = None;
    loop {
        let (listener, ring_address) = match first_listener.take() {
            Some(bound) => bound,
            None => ring_listener(&o)?,
        };
        let RegistrationId {
            id: nccl_unique_id,
            missing,
        } = comm::registration_id(backend, o.device)?;
        let me = Identity {
            requested_rank: o.rank,
            host: host.clone(),
            device: o.device_name.clone(),
            member_id: member_id.clone(),
            ring_address,
            nccl_unique_id,
        };
        tracing::info!(coordinator = %link.url(), ring = %me.ring_address, failed_generation, "registering");
        let joined = match link.join(&me, failed_generation, patience) {
            Ok(j) => j,
            // The run ended while this worker was away (a replacement, or a survivor of
            // a coordinator restart after the final checkpoint): nothing left to do.
            Err(WorkerError::Rpc { status, .. })
                if status.code() == tonic::Code::FailedPrecondition
                    && status.message().starts_with("the run is finished") =>
            {
                tracing::info!(reason = status.message(), "the run is finished");
                return Ok(());
            }
            Err(e) => return Err(comm::explain_refusal(e, missing)),
        };
        let cfg = received_config(&joined, &o)?;
        backend = Some(cfg.distributed.backend);
        link.keep_lease(&joined, &me.member_id, o.connect_patience);
        let span = tracing::info_span!(
            "worker",
            rank = joined.rank,
            ring_rank = joined.ring_rank,
            generation = joined.generation
        );
        let _guard = span.enter();
        tracing::info!(world_size = joined.world_size, "joined the ring");
        if let (None, Some(dir)) = (&kept.ledger, &o.ledger) {
            kept.ledger = Some(crate::ledger::Ledger::open(
                dir,
                joined.rank,
                &me.member_id,
            )?);
        }
        let mut steps = 0;
        match generation(&o, &link, &joined, cfg, listener, &mut kept, &mut steps) {
            Ok(()) => return Ok(()),
            Err(e) if e.needs_reform() => {
                // A collective aborted because the heartbeat gave up on the coordinator (or
                // the run failed) is no generation to re-form: stop, saying why.
                if let Some(Halt::Fatal(why)) = link.stop_reason() {
                    return Err(WorkerError::Invalid(format!("{why} ({})", chain(&e))));
                }
                fruitless = if steps == 0 { fruitless + 1 } else { 0 };
                if fruitless >= MAX_FRUITLESS_GENERATIONS {
                    return Err(WorkerError::Invalid(format!(
                        "{fruitless} generations in a row failed before a single step; the last: {}",
                        chain(&e)
                    )));
                }
                tracing::warn!(
                    error = %chain(&e),
                    steps,
                    "generation {} cannot go on; registering again for the next one",
                    joined.generation
                );
                failed_generation = joined.generation;
            }
            Err(e) => return Err(e),
        }
    }
}

/// One generation (`cfg`: the config its coordinator handed out): restore, form the ring,
/// train to the end (Ok), or fail; `steps` counts the steps it completed.
fn generation(
    o: &WorkerOptions,
    link: &CoordinatorLink,
    joined: &Joined,
    cfg: Config,
    listener: TcpListener,
    kept: &mut Kept,
    steps: &mut u64,
) -> Result<()> {
    comm::check_backend(&cfg, o.device)?;
    let work = link.next_work(joined, o.connect_patience)?;
    let out = o
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from(&cfg.run.out_dir));
    let mut trainer = Trainer::new(&cfg, o.device)?;
    let rank0 = joined.ring_rank == 0;
    let checkpoints = Checkpoints::open(&cfg, &out)?;
    let mut cursor = Cursor::at(work.epoch, work.position);
    let data = kept.data.open(&cfg.data)?;
    let data_order = data.order().describe();
    if !work.restore_url.is_empty() {
        let r = checkpoints
            .load(Some(work.restore_step))?
            .with_context(|| format!("checkpoint step {} is missing", work.restore_step))?;
        ensure!(
            r.step as u64 == work.start_step
                && (r.cursor.epoch, r.cursor.position) == (work.epoch, work.position),
            "checkpoint step {} holds step {} at epoch {} position {}, the coordinator assigned step {} at epoch {} position {}",
            work.restore_step, r.step, r.cursor.epoch, r.cursor.position, work.start_step, work.epoch, work.position
        );
        ensure!(
            r.data_order == data_order || r.cursor.position == 0,
            "checkpoint step {} is {} samples into epoch {} of data order {:?}, but this worker's dataset gives order {data_order:?}; resuming would repeat and skip samples",
            r.step, r.cursor.position, r.cursor.epoch, r.data_order
        );
        trainer.import_state(&r.blobs, r.step)?;
        cursor = r.cursor;
        tracing::info!(step = r.step, "restored the checkpoint");
    }
    ensure!(
        trainer.global_step() as u64 == work.start_step,
        "the coordinator assigned step {} but no checkpoint was restored (this worker is at step {})",
        work.start_step,
        trainer.global_step()
    );
    if rank0 {
        checkpoints.take_over(work.start_step)?;
    }
    // Formed after this rank's setup (forming waits for the slowest rank, within
    // distributed.collective_timeout_secs), and declared after the trainer and the
    // checkpoints so that on an error it is dropped first: the ring's sockets close and the
    // other ranks fail at once instead of waiting out the collective timeout. (An NCCL
    // communicator is aborted; NCCL reports that to the peers as a remote error where its
    // transport can see it, otherwise they learn it from the coordinator, which this
    // rank's re-registration moves to the next generation.)
    let forming = Arc::new(AbortFlag::default());
    link.abort_on_stop(forming.clone());
    let mut ring = comm::form(joined, listener, &cfg, o.device, &forming)?;
    link.abort_on_stop(ring.abort_handle());
    tracing::info!(backend = ring.backend_name(), "ring formed");
    // Every rank starts from rank 0's parameters and EMA, whatever it initialised or loaded.
    {
        let (flat, ema) = trainer.flat();
        // SAFETY: the trainer's buffers are this (the training) thread's, and no other
        // handle to them is used during the broadcasts.
        unsafe {
            broadcast_from_rank0(&mut ring, &flat.params, "broadcast of the parameters")?;
            broadcast_from_rank0(&mut ring, ema, "broadcast of the EMA weights")?;
        }
    }
    if rank0 && work.steps > 0 {
        checkpoints.prepare(&trainer);
    }
    let mut reporter = Reporter {
        link,
        joined,
        checkpoints: rank0.then_some(&checkpoints),
        reported_checkpoint: None,
        url: checkpoints.url().to_string(),
        total: cfg.train.total_steps as u64,
        last: None,
        steps: 0,
    };
    let trained = train_loop::train(
        &mut trainer,
        LoopSetup {
            cfg: &cfg,
            data,
            cursor,
            data_order,
            out: out.clone(),
            checkpoints: rank0.then_some(&checkpoints),
            ranks: Some(Ranks {
                comm: &mut ring,
                exchange: GradientExchange::new(cfg.distributed.bucket_mb as usize),
            }),
            generation: joined.generation,
            ledger: kept.ledger.as_ref(),
        },
        &mut reporter,
    );
    *steps = reporter.steps;
    let outcome = match trained {
        Ok(outcome) => outcome,
        Err(e) => {
            if rank0 && e.needs_reform() {
                // Commit what is in flight before registering again: the next generation
                // starts from the newest committed checkpoint, which may be this one.
                drop(ring);
                finish_uploads(checkpoints, link, joined);
            }
            return Err(e);
        }
    };
    // Every rank is past the last all-reduce; rank 0 may now wait for its uploads without
    // anyone waiting on it in a collective.
    ring.finish("the end of training")?;
    let last_line = outcome.last.clone();
    if rank0 {
        let url = checkpoints.url().to_string();
        let uploads = finish_uploads(checkpoints, link, joined);
        if let Some(last) = outcome.submitted {
            ensure!(
                uploads.last_committed == Some(last),
                "the final checkpoint (step {last}) was not committed to {url}: {}",
                uploads.last_error.as_deref().unwrap_or("unknown error")
            );
        }
    }
    let step = trainer.global_step() as u64;
    let final_report = ProgressReport {
        rank: joined.rank,
        generation: joined.generation,
        step,
        loss: last_line.as_ref().map_or(0.0, |l| l.loss),
        images_per_second: last_line.as_ref().map_or(0.0, |l| l.images_per_second),
        epoch: outcome.cursor.epoch,
        position: outcome.cursor.position,
        data_wait_fraction: last_line.as_ref().map_or(0.0, |l| l.data_wait_fraction),
        allreduce_seconds: last_line.as_ref().map_or(0.0, |l| l.allreduce_seconds),
    };
    let state = link.report_and_wait(final_report, o.connect_patience)?;
    if state != ddpm_proto::v1::RunState::Finished {
        // Still needed if another rank's final report fails and the run re-forms.
        link.wait_finished(o.connect_patience)?;
    }
    tracing::info!(step, state = ?state, "done");
    Ok(())
}
