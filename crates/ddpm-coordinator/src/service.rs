//! The gRPC `Coordinator` service (ddpm-proto) over the run's [`Membership`] and [`Plan`].
//!
//! Every refusal is FAILED_PRECONDITION with a message naming what is wrong; the membership
//! lock is a `std` mutex that is never held across an `.await`. Metrics go through the
//! `metrics` facade (gauges named `ddpm_*`), logs through `tracing` with one span per RPC.

use crate::membership::{JoinRequest, Member, Membership, Phase, Progress, Sizes};
use crate::plan::Plan;
use crate::CoordinatorError;
use ddpm_checkpoint::CheckpointStore;
use ddpm_config::{rank_rows, CollectiveBackend, Config};
use ddpm_proto::v1::{self, coordinator_server::Coordinator};
use object_store::ObjectStoreExt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tonic::{Request, Response, Status};

/// How often [`CoordinatorService::expire_loop`] looks for lapsed leases.
pub const EXPIRE_EVERY: Duration = Duration::from_millis(250);

/// The largest request the coordinator decodes (every request is a few hundred bytes).
pub const MAX_REQUEST_BYTES: usize = 64 << 10;

/// The longest `host`, `device`, `member_id` or `ring_address` a worker may register with.
pub const MAX_FIELD_BYTES: usize = 256;

/// How long [`CoordinatorService`] keeps the newest evaluation result it read from the
/// store before it lists the store again (for `ddpm status --watch`).
const EVAL_CACHE: Duration = Duration::from_secs(10);

/// The coordinator of one run; cheap to clone (shared state).
#[derive(Clone)]
pub struct CoordinatorService {
    shared: Arc<Shared>,
}

struct Shared {
    run_name: String,
    config_toml: String,
    store_url: String,
    backend: CollectiveBackend,
    batch_size: usize,
    total_steps: u64,
    lease_millis: u64,
    store: CheckpointStore,
    started: Instant,
    state: Mutex<State>,
    /// The plan of a generation (read again from the store when the ring re-forms). Held
    /// across the store read so every rank of a generation gets the same plan.
    plan: tokio::sync::Mutex<(u64, Plan)>,
    finished: tokio::sync::watch::Sender<bool>,
    /// The newest generation written to the store; a generation is written before any
    /// worker is told of it ([`crate::generation`]).
    persisted: tokio::sync::Mutex<u64>,
    /// Where evaluation results are (`<root>/<run>/eval/`), and the newest one read.
    evals: Option<EvalResults>,
}

/// The evaluator's results in the run's store: `<root>/<run>/eval/step-<N>.json`.
struct EvalResults {
    store: std::sync::Arc<dyn object_store::ObjectStore>,
    dir: object_store::path::Path,
    cached: tokio::sync::Mutex<Option<(Instant, Option<v1::EvalSummary>)>>,
}

impl EvalResults {
    /// The newest result, read again at most every [`EVAL_CACHE`]. A store that cannot be
    /// listed or a result that does not parse is logged and reads as none: the status of
    /// a run never fails for its evaluations.
    async fn newest(&self) -> Option<v1::EvalSummary> {
        let mut cached = self.cached.lock().await;
        if let Some((at, last)) = cached.as_ref() {
            if at.elapsed() < EVAL_CACHE {
                return *last;
            }
        }
        let newest = match self.read().await {
            Ok(e) => e,
            Err(e) => {
                tracing::debug!(dir = %self.dir, error = %e, "no evaluation result read");
                None
            }
        };
        *cached = Some((Instant::now(), newest));
        newest
    }

    async fn read(&self) -> Result<Option<v1::EvalSummary>, String> {
        let listed = self
            .store
            .list_with_delimiter(Some(&self.dir))
            .await
            .map_err(|e| e.to_string())?;
        let Some((step, path)) = listed
            .objects
            .iter()
            .filter_map(|o| {
                let name = o.location.filename()?;
                let step = ddpm_checkpoint::parse_step_dir(name.strip_suffix(".json")?)?;
                Some((step, o.location.clone()))
            })
            .max_by_key(|(step, _)| *step)
        else {
            return Ok(None);
        };
        let bytes = self
            .store
            .get(&path)
            .await
            .map_err(|e| e.to_string())?
            .bytes()
            .await
            .map_err(|e| e.to_string())?;
        let v: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| format!("{path}: {e}"))?;
        let num = |k: &str| v.get(k).and_then(serde_json::Value::as_f64);
        let fid = num("fid").ok_or_else(|| format!("{path}: no number \"fid\""))?;
        Ok(Some(v1::EvalSummary {
            step,
            fid,
            is_mean: num("is_mean").unwrap_or(f64::NAN),
            is_std: num("is_std").unwrap_or(f64::NAN),
        }))
    }
}

struct State {
    membership: Membership,
    last_checkpoint_step: u64,
    /// The member id that last held each rank, to count replacements
    /// (`ddpm_worker_restarts_total`).
    last_holder: std::collections::BTreeMap<u32, String>,
    /// Where the plan of the current generation starts (for ranks that did not report yet).
    base_step: u64,
    /// The run's step when last computed (kept while no member is present).
    step: u64,
    /// When the newest checkpoint notice arrived (Unix milliseconds; 0: none yet).
    last_checkpoint_unix_millis: u64,
}

impl State {
    /// The run's step: the least step of the current members (their report in this
    /// generation, else where the generation started).
    fn run_step(&self) -> u64 {
        let generation = self.membership.generation();
        self.membership
            .members()
            .map(|m| match &m.progress {
                Some(p) if p.generation == generation => p.step,
                _ => self.base_step,
            })
            .min()
            .unwrap_or(self.step)
    }
}

/// Where the run stands, as the protocol says it: a generation gathering after an earlier
/// one ended is RUN_STATE_REFORMING.
fn run_state(membership: &Membership) -> v1::RunState {
    match membership.phase() {
        Phase::Waiting if membership.reforming() => v1::RunState::Reforming,
        Phase::Waiting => v1::RunState::Waiting,
        Phase::Running => v1::RunState::Running,
        Phase::Finished => v1::RunState::Finished,
    }
}

/// The HELP text of every gauge the coordinator sets.
fn describe_metrics() {
    for (name, help) in [
        ("ddpm_workers_alive", "Workers holding a lease."),
        (
            "ddpm_generation",
            "The ring generation (moves on when a running ring loses or gains a member, and when the coordinator restarts).",
        ),
        (
            "ddpm_train_step",
            "Completed updates: the least step reported by the current members.",
        ),
        (
            "ddpm_train_loss",
            "Training loss of the last step reported, per rank.",
        ),
        (
            "ddpm_train_images_per_second",
            "Training throughput, per rank.",
        ),
        (
            "ddpm_data_wait_fraction",
            "Share of step time spent waiting for data, per rank.",
        ),
        (
            "ddpm_allreduce_window_seconds",
            "Seconds in gradient all-reduces over the last logged window (train.log_every steps), per rank.",
        ),
        (
            "ddpm_checkpoint_last_step",
            "Step of the newest committed checkpoint.",
        ),
        (
            "ddpm_checkpoint_last_timestamp_seconds",
            "Unix time of the newest checkpoint notice (before the first: when the coordinator started).",
        ),
        (
            "ddpm_checkpoint_every_steps",
            "checkpoint.every_steps of the run (0: only at the end).",
        ),
        (
            "ddpm_train_step_timestamp_seconds",
            "Unix time at which ddpm_train_step last moved (before that: when the coordinator started).",
        ),
        (
            "ddpm_world_size",
            "Workers in the ring of the current generation (the target while it forms).",
        ),
        (
            "ddpm_world_size_target",
            "distributed.world_size: workers a generation forms with at once.",
        ),
        (
            "ddpm_run_finished",
            "1 once every rank reported the last step.",
        ),
        ("ddpm_run_info", "1, labelled with the run's name."),
    ] {
        metrics::describe_gauge!(name, help);
    }
    metrics::describe_counter!(
        "ddpm_worker_restarts_total",
        "A rank taken by another process than the one that held it before, per rank."
    );
    metrics::describe_counter!(
        "ddpm_leases_expired_total",
        "Workers dropped because their lease ran out."
    );
}

/// Seconds since the Unix epoch, for `*_timestamp_seconds` gauges.
fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn set_gauge(name: &'static str, value: f64) {
    metrics::gauge!(name).set(value);
}

fn set_rank_gauge(name: &'static str, rank: u32, value: f64) {
    metrics::gauge!(name, "rank" => rank.to_string()).set(value);
}

impl CoordinatorService {
    /// The coordinator of the run `config` describes. `config` is the resolved one
    /// (`checkpoint.url` set to the root of `store`, see [`crate::plan::open_store`]) and is
    /// handed to every worker; `plan` is where its first generation starts, and
    /// `generation` that generation's number (from [`crate::generation::next`], already
    /// stored).
    pub fn new(config: &Config, store: CheckpointStore, plan: Plan, generation: u64) -> Self {
        let dist = &config.distributed;
        let world = u32::try_from(dist.world_size).unwrap_or(u32::MAX);
        let lease = Duration::from_secs(dist.lease_secs.max(1) as u64);
        let (min, max) = config.elastic_bounds();
        let sizes = Sizes {
            target: world,
            min: u32::try_from(min).unwrap_or(world).min(world),
            slots: u32::try_from(max).unwrap_or(world),
            grace: Duration::from_secs_f64(config.elastic.rendezvous_grace_secs.max(0.0)),
        };
        let mut membership = Membership::elastic(sizes, lease).starting_at(generation);
        if dist.backend == CollectiveBackend::Nccl {
            membership = membership.with_nccl();
        }
        let generation = membership.generation();
        let total_steps = config.train.total_steps.max(0) as u64;
        describe_metrics();
        set_gauge("ddpm_workers_alive", 0.0);
        set_gauge("ddpm_generation", generation as f64);
        set_gauge("ddpm_train_step", plan.start_step as f64);
        set_gauge("ddpm_checkpoint_last_step", plan.restore_step as f64);
        set_gauge("ddpm_checkpoint_last_timestamp_seconds", unix_now());
        set_gauge(
            "ddpm_checkpoint_every_steps",
            config.checkpoint.every_steps.max(0) as f64,
        );
        set_gauge("ddpm_train_step_timestamp_seconds", unix_now());
        set_gauge("ddpm_world_size", f64::from(world));
        set_gauge("ddpm_world_size_target", f64::from(world));
        set_gauge("ddpm_run_finished", 0.0);
        metrics::gauge!("ddpm_run_info", "run" => config.run.name.clone()).set(1.0);
        metrics::counter!("ddpm_leases_expired_total").absolute(0);
        let state = State {
            membership,
            last_checkpoint_step: plan.restore_step,
            last_holder: Default::default(),
            base_step: plan.start_step,
            step: plan.start_step,
            last_checkpoint_unix_millis: 0,
        };
        let evals = match ddpm_checkpoint::open_url_with(
            &config.checkpoint.url,
            &config.checkpoint.options,
        ) {
            Ok((store, prefix)) => Some(EvalResults {
                store,
                dir: prefix.clone().join(config.run.name.as_str()).join("eval"),
                cached: tokio::sync::Mutex::new(None),
            }),
            Err(e) => {
                tracing::warn!(url = %config.checkpoint.url, error = %e, "evaluation results cannot be read from the checkpoint store");
                None
            }
        };
        Self {
            shared: Arc::new(Shared {
                run_name: config.run.name.clone(),
                config_toml: config.to_toml(),
                store_url: config.checkpoint.url.clone(),
                backend: dist.backend,
                batch_size: config.train.batch_size.max(0) as usize,
                total_steps,
                lease_millis: lease.as_millis() as u64,
                store,
                started: Instant::now(),
                state: Mutex::new(state),
                // A restarted coordinator (generation > 1) reads the plan again for its first
                // generation: a survivor's upload may commit after the startup read.
                plan: tokio::sync::Mutex::new((
                    if generation > 1 {
                        generation - 1
                    } else {
                        generation
                    },
                    plan,
                )),
                finished: tokio::sync::watch::channel(false).0,
                persisted: tokio::sync::Mutex::new(generation),
                evals,
            }),
        }
    }

    /// Finishes a run whose final checkpoint is already committed (the plan starts at
    /// `train.total_steps`): a coordinator restarted after the last step, or started again
    /// on a complete run. Workers that register get "the run is finished", which they take
    /// as the end.
    pub fn finish_complete_run(&self) {
        let mut st = self.lock();
        st.membership.finish();
        set_gauge("ddpm_run_finished", 1.0);
        tracing::info!(
            step = st.step,
            "the final checkpoint is committed: the run is finished"
        );
        drop(st);
        self.shared.finished.send_replace(true);
    }

    /// Whether every rank reported the last step.
    pub fn is_finished(&self) -> bool {
        *self.shared.finished.borrow()
    }

    /// Becomes `true` once the run is finished.
    pub fn finished(&self) -> tokio::sync::watch::Receiver<bool> {
        self.shared.finished.subscribe()
    }

    /// Drops members whose lease ran out, every [`EXPIRE_EVERY`], logging each and the new
    /// generation when a running ring lost a member. Runs until dropped.
    pub async fn expire_loop(self) {
        let mut tick = tokio::time::interval(EXPIRE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let generation = {
                let mut st = self.lock();
                self.expire(&mut st, Instant::now());
                st.membership.generation()
            };
            if let Err(e) = self.persist(generation).await {
                tracing::warn!(error = %e, generation, "the generation was not stored; retrying");
            }
        }
    }

    /// Stores `generation` unless a newer one is stored. Every answer that tells a worker
    /// its generation waits for this first, so a restarted coordinator never hands out a
    /// generation a live worker already holds.
    async fn persist(&self, generation: u64) -> Result<(), Status> {
        let mut stored = self.shared.persisted.lock().await;
        if *stored >= generation {
            return Ok(());
        }
        crate::generation::write(&self.shared.store, &self.shared.store_url, generation)
            .await
            .map_err(|e| {
                tracing::warn!(error = %e, generation, "the generation could not be stored");
                Status::from(e)
            })?;
        *stored = generation;
        Ok(())
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent state (every update is one
        // call into Membership), so a poisoned lock is used as is.
        self.shared
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Expires lapsed leases with logs and metrics; every handler calls it first, so every
    /// dropped member is logged once.
    fn expire(&self, st: &mut State, now: Instant) {
        let before = (st.membership.generation(), st.membership.phase());
        let dropped = st.membership.expire(now);
        self.log_changes(st, before);
        if dropped.is_empty() {
            return;
        }
        metrics::counter!("ddpm_leases_expired_total").increment(dropped.len() as u64);
        for m in &dropped {
            tracing::warn!(
                rank = m.rank,
                member_id = %m.join.member_id,
                host = %m.join.host,
                device = %m.join.device,
                lease_secs = st.membership.lease().as_secs_f64(),
                "worker lost its lease; its rank is free"
            );
        }
        self.publish_membership(st);
    }

    /// Logs a move to another generation or the forming of a ring since `before`
    /// (generation, phase), and publishes the membership gauges.
    fn log_changes(&self, st: &State, before: (u64, Phase)) {
        let m = &st.membership;
        let generation = m.generation();
        if generation != before.0 {
            let sizes = m.sizes();
            tracing::warn!(
                generation,
                from = before.0,
                "the ring of generation {} lost or gained a member: generation {generation} waits for its members (at once with {}, with at least {} after {:.1} s), then continues from the newest committed checkpoint",
                before.0,
                sizes.target,
                sizes.min,
                sizes.grace.as_secs_f64()
            );
        }
        if m.phase() == Phase::Running && (before.1 != Phase::Running || generation != before.0) {
            let slots: Vec<u32> = m.members().map(|x| x.rank).collect();
            tracing::info!(
                generation,
                world_size = m.world_size(),
                ?slots,
                "the ring of generation {generation} is formed with {} worker(s)",
                m.world_size()
            );
        }
        if (generation, m.phase()) != before {
            self.publish_membership(st);
        }
    }

    fn publish_membership(&self, st: &State) {
        set_gauge("ddpm_workers_alive", st.membership.members().count() as f64);
        set_gauge("ddpm_generation", st.membership.generation() as f64);
        set_gauge("ddpm_world_size", f64::from(st.membership.world_size()));
    }

    /// The plan of `generation`: the startup plan for the first, else read again from the
    /// store (once per generation; every rank of it gets the same).
    async fn plan_for(&self, generation: u64) -> Result<Plan, CoordinatorError> {
        let mut cached = self.shared.plan.lock().await;
        if cached.0 < generation {
            let plan = Plan::read(&self.shared.store, &self.shared.store_url).await?;
            tracing::info!(
                generation,
                start_step = plan.start_step,
                restore_step = plan.restore_step,
                fresh = plan.is_fresh(),
                "the re-formed ring continues from the newest committed checkpoint"
            );
            {
                let mut st = self.lock();
                st.base_step = plan.start_step;
                // Commits whose notices were refused (sent in a generation that had ended)
                // are counted here.
                if plan.restore_step > st.last_checkpoint_step {
                    st.last_checkpoint_step = plan.restore_step;
                    set_gauge("ddpm_checkpoint_last_step", plan.restore_step as f64);
                }
            }
            *cached = (generation, plan);
        }
        Ok(cached.1.clone())
    }

    /// The one-line summary of a finished run.
    fn summary(&self, st: &State) -> String {
        let losses: Vec<String> = st
            .membership
            .members()
            .filter_map(|m| m.progress.as_ref().map(|p| format!("{:.4}", p.loss)))
            .collect();
        let ips: f64 = st
            .membership
            .members()
            .filter_map(|m| m.progress.as_ref().map(|p| p.images_per_second))
            .sum();
        format!(
            "run {} finished: step {} of {}, {} worker(s), generation {}, last checkpoint step {}, loss per rank [{}], {:.1} images/s, {:.1} s",
            self.shared.run_name,
            st.run_step(),
            self.shared.total_steps,
            st.membership.world_size(),
            st.membership.generation(),
            st.last_checkpoint_step,
            losses.join(", "),
            ips,
            self.shared.started.elapsed().as_secs_f64()
        )
    }
}

#[tonic::async_trait]
impl Coordinator for CoordinatorService {
    /// Admits a worker, or hands an evaluator the config (it joins nothing). The response carries the
    /// rendezvous only once every rank is present; a waiting worker registers again (same
    /// member id, same rank) until it does.
    #[tracing::instrument(name = "register", skip_all, fields(
        member_id = %request.get_ref().member_id,
        host = %request.get_ref().host,
        requested_rank = ?request.get_ref().requested_rank,
        rank = tracing::field::Empty,
    ))]
    async fn register(
        &self,
        request: Request<v1::RegisterRequest>,
    ) -> Result<Response<v1::RegisterResponse>, Status> {
        let r = request.into_inner();
        ddpm_proto::check_version(r.protocol_version)?;
        for (field, value) in [
            ("host", &r.host),
            ("device", &r.device),
            ("member_id", &r.member_id),
            ("ring_address", &r.ring_address),
        ] {
            if value.len() > MAX_FIELD_BYTES {
                return Err(Status::invalid_argument(format!(
                    "RegisterRequest.{field}: {} bytes, expected at most {MAX_FIELD_BYTES}",
                    value.len()
                )));
            }
        }
        match v1::Role::try_from(r.role) {
            Ok(v1::Role::Worker) => {}
            Ok(v1::Role::Evaluator) => {
                // An evaluator only reads checkpoints: it gets the resolved config and the
                // run's shape, holds no rank, and never joins (or changes) the membership.
                tracing::info!(member_id = %r.member_id, host = %r.host, device = %r.device, "evaluator connected");
                let st = self.lock();
                return Ok(Response::new(v1::RegisterResponse {
                    rank: 0,
                    world_size: st.membership.world_size(),
                    generation: st.membership.generation(),
                    rendezvous: None,
                    config_toml: self.shared.config_toml.clone(),
                    lease_millis: self.shared.lease_millis,
                    ring_rank: 0,
                }));
            }
            _ => {
                return Err(Status::invalid_argument(format!(
                    "RegisterRequest.role {}: expected ROLE_WORKER",
                    r.role
                )))
            }
        }
        let join = JoinRequest {
            protocol_version: r.protocol_version,
            requested_rank: r.requested_rank,
            member_id: r.member_id,
            host: r.host,
            device: r.device,
            ring_address: r.ring_address,
            nccl_unique_id: r.nccl_unique_id,
            failed_generation: r.failed_generation,
        };
        let now = Instant::now();
        let (admission, rendezvous) = {
            let mut st = self.lock();
            self.expire(&mut st, now);
            let was = (st.membership.generation(), st.membership.phase());
            if join.failed_generation != 0 {
                tracing::warn!(
                    failed_generation = join.failed_generation,
                    generation = was.0,
                    "the worker's collective failed; it registers again"
                );
            }
            let again = st
                .membership
                .members()
                .any(|m| m.join.member_id == join.member_id);
            let (member_id, host, device) = (
                join.member_id.clone(),
                join.host.clone(),
                join.device.clone(),
            );
            let admission = st.membership.register(join, now).map_err(|e| {
                tracing::warn!(error = %e, "registration refused");
                Status::from(e)
            })?;
            tracing::Span::current().record("rank", admission.rank);
            let before = st.last_holder.insert(admission.rank, member_id.clone());
            if before.is_some_and(|b| b != member_id) {
                metrics::counter!("ddpm_worker_restarts_total", "rank" => admission.rank.to_string())
                .increment(1);
            }
            if !again {
                tracing::info!(
                    rank = admission.rank,
                    member_id,
                    host,
                    device,
                    generation = admission.generation,
                    "worker registered"
                );
            }
            let rendezvous = match self.shared.backend {
                CollectiveBackend::Tcp => st.membership.tcp_rendezvous(),
                CollectiveBackend::Nccl => st.membership.nccl_rendezvous().transpose()?,
            };
            self.log_changes(&st, was);
            self.publish_membership(&st);
            (admission, rendezvous)
        };
        self.persist(admission.generation).await?;
        Ok(Response::new(v1::RegisterResponse {
            rank: admission.rank,
            world_size: admission.world_size,
            generation: admission.generation,
            rendezvous: rendezvous.map(Into::into),
            config_toml: self.shared.config_toml.clone(),
            lease_millis: self.shared.lease_millis,
            ring_rank: admission.ring_rank.unwrap_or(0),
        }))
    }

    /// Renews the lease of the holder of `rank`; a stale generation or a member that lost
    /// its rank is refused (register again).
    #[tracing::instrument(name = "heartbeat", skip_all, fields(
        rank = request.get_ref().rank,
        generation = request.get_ref().generation,
    ))]
    async fn heartbeat(
        &self,
        request: Request<v1::HeartbeatRequest>,
    ) -> Result<Response<v1::HeartbeatResponse>, Status> {
        let r = request.into_inner();
        let now = Instant::now();
        let (state, generation) = {
            let mut st = self.lock();
            self.expire(&mut st, now);
            st.membership
                .heartbeat(r.rank, r.generation, &r.member_id, now)
                .map_err(|e| {
                    tracing::debug!(error = %e, "heartbeat refused");
                    Status::from(e)
                })?;
            (run_state(&st.membership), st.membership.generation())
        };
        self.persist(generation).await?;
        Ok(Response::new(v1::HeartbeatResponse {
            state: state.into(),
            lease_millis: self.shared.lease_millis,
            generation,
        }))
    }

    /// The stretch of training of `rank`: from the generation's plan (the same cursor for
    /// every rank), or, for a rank that already reported in this generation, from its last
    /// report (nothing to restore). `steps` runs to the end of training; 0 means done.
    #[tracing::instrument(name = "next_work", skip_all, fields(
        rank = request.get_ref().rank,
        generation = request.get_ref().generation,
        step = tracing::field::Empty,
    ))]
    async fn next_work(
        &self,
        request: Request<v1::WorkRequest>,
    ) -> Result<Response<v1::WorkAssignment>, Status> {
        let r = request.into_inner();
        let (world, ring_rank, reported) = {
            let now = Instant::now();
            let mut st = self.lock();
            self.expire(&mut st, now);
            let m = &st.membership;
            let holder = m.holder(r.rank, r.generation)?;
            let reported = holder
                .progress
                .clone()
                .filter(|p| p.generation == r.generation);
            let Some(ring_rank) = m.ring_rank(r.rank) else {
                return Err(CoordinatorError::NotNow(format!(
                    "generation {} is not formed yet ({} of {} workers registered); register again until the response carries the rendezvous",
                    m.generation(),
                    m.present(),
                    m.world_size(),
                ))
                .into());
            };
            (m.world_size(), ring_rank, reported)
        };
        let plan = self.plan_for(r.generation).await?;
        let per_rank_batch =
            rank_rows(self.shared.batch_size, world as usize, ring_rank as usize).len() as u32;
        let total = self.shared.total_steps;
        let work = match reported {
            Some(p) => v1::WorkAssignment {
                start_step: p.step,
                steps: total.saturating_sub(p.step),
                epoch: p.epoch,
                position: p.position,
                data_order: plan.data_order,
                per_rank_batch,
                world_size: world,
                restore_url: String::new(),
                restore_step: 0,
            },
            None => v1::WorkAssignment {
                start_step: plan.start_step,
                steps: total.saturating_sub(plan.start_step),
                epoch: plan.epoch,
                position: plan.position,
                data_order: plan.data_order,
                per_rank_batch,
                world_size: world,
                restore_url: plan.restore_url,
                restore_step: plan.restore_step,
            },
        };
        tracing::Span::current().record("step", work.start_step);
        tracing::info!(
            start_step = work.start_step,
            steps = work.steps,
            epoch = work.epoch,
            position = work.position,
            per_rank_batch,
            restore_step = work.restore_step,
            "work assigned"
        );
        Ok(Response::new(work))
    }

    /// Records the progress of `rank` (renewing its lease) and sets its metrics. Once every
    /// rank of the generation reported the last step, the run is finished.
    #[tracing::instrument(name = "report_progress", skip_all, fields(
        rank = request.get_ref().rank,
        generation = request.get_ref().generation,
        step = request.get_ref().step,
    ))]
    async fn report_progress(
        &self,
        request: Request<v1::ProgressReport>,
    ) -> Result<Response<v1::ProgressAck>, Status> {
        let r = request.into_inner();
        let now = Instant::now();
        let mut st = self.lock();
        self.expire(&mut st, now);
        let progress = Progress {
            generation: r.generation,
            step: r.step,
            loss: r.loss,
            images_per_second: r.images_per_second,
            epoch: r.epoch,
            position: r.position,
        };
        st.membership.report(r.rank, progress, now).map_err(|e| {
            tracing::debug!(error = %e, "progress report refused");
            Status::from(e)
        })?;
        set_rank_gauge("ddpm_train_loss", r.rank, r.loss);
        set_rank_gauge("ddpm_train_images_per_second", r.rank, r.images_per_second);
        set_rank_gauge("ddpm_data_wait_fraction", r.rank, r.data_wait_fraction);
        set_rank_gauge("ddpm_allreduce_window_seconds", r.rank, r.allreduce_seconds);
        let step = st.run_step();
        if step != st.step {
            set_gauge("ddpm_train_step_timestamp_seconds", unix_now());
        }
        st.step = step;
        set_gauge("ddpm_train_step", st.step as f64);
        tracing::debug!(
            loss = r.loss,
            images_per_second = r.images_per_second,
            "progress"
        );
        let mut finished_now = false;
        if st.membership.phase() == Phase::Running
            && st.membership.all_reached(self.shared.total_steps)
        {
            st.membership.finish();
            finished_now = true;
            set_gauge("ddpm_run_finished", 1.0);
            tracing::info!("{}", self.summary(&st));
        }
        let state = run_state(&st.membership);
        drop(st);
        if finished_now {
            self.shared.finished.send_replace(true);
        }
        Ok(Response::new(v1::ProgressAck {
            state: state.into(),
        }))
    }

    /// Rank 0 committed a checkpoint: recorded (the newest step) and logged.
    #[tracing::instrument(name = "checkpoint_committed", skip_all, fields(
        rank = request.get_ref().rank,
        generation = request.get_ref().generation,
        step = request.get_ref().step,
    ))]
    async fn checkpoint_committed(
        &self,
        request: Request<v1::CheckpointNotice>,
    ) -> Result<Response<v1::CheckpointAck>, Status> {
        let r = request.into_inner();
        let now = Instant::now();
        let mut st = self.lock();
        self.expire(&mut st, now);
        st.membership.holder(r.rank, r.generation)?;
        if st.membership.ring_rank(r.rank) != Some(0) {
            return Err(CoordinatorError::NotNow(format!(
                "checkpoint notices come from ring rank 0 (rank {:?}); rank {} sent one for step {}",
                st.membership.ring_leader(),
                r.rank,
                r.step
            ))
            .into());
        }
        if r.step > st.last_checkpoint_step || st.last_checkpoint_unix_millis == 0 {
            let now = unix_now();
            set_gauge("ddpm_checkpoint_last_timestamp_seconds", now);
            st.last_checkpoint_unix_millis = (now * 1000.0) as u64;
        }
        st.last_checkpoint_step = st.last_checkpoint_step.max(r.step);
        set_gauge("ddpm_checkpoint_last_step", st.last_checkpoint_step as f64);
        if r.url != self.shared.store_url {
            tracing::warn!(
                url = %r.url,
                expected = %self.shared.store_url,
                "rank 0 committed a checkpoint to another store than the run's"
            );
        }
        tracing::info!(url = %r.url, "checkpoint committed");
        Ok(Response::new(v1::CheckpointAck {}))
    }

    /// The run and every member, for operators (`ddpm status`), with the newest
    /// evaluation result in the store.
    #[tracing::instrument(name = "status", skip_all)]
    async fn status(
        &self,
        _request: Request<v1::StatusRequest>,
    ) -> Result<Response<v1::StatusResponse>, Status> {
        let mut response = self.status_now();
        if let Some(e) = &self.shared.evals {
            response.last_eval = e.newest().await;
        }
        Ok(Response::new(response))
    }
}

impl CoordinatorService {
    /// The run and its members as they are now.
    fn status_now(&self) -> v1::StatusResponse {
        let now = Instant::now();
        let mut st = self.lock();
        self.expire(&mut st, now);
        let member = |m: &Member| v1::MemberStatus {
            rank: m.rank,
            role: v1::Role::Worker.into(),
            host: m.join.host.clone(),
            device: m.join.device.clone(),
            member_id: m.join.member_id.clone(),
            millis_since_heartbeat: now.saturating_duration_since(m.last_seen).as_millis() as u64,
            step: m.progress.as_ref().map_or(0, |p| p.step),
            images_per_second: m.progress.as_ref().map_or(0.0, |p| p.images_per_second),
            loss: m.progress.as_ref().map_or(0.0, |p| p.loss),
        };
        v1::StatusResponse {
            run_name: self.shared.run_name.clone(),
            state: run_state(&st.membership).into(),
            world_size: st.membership.world_size(),
            generation: st.membership.generation(),
            step: st.run_step(),
            total_steps: self.shared.total_steps,
            last_checkpoint_step: st.last_checkpoint_step,
            members: st.membership.members().map(member).collect(),
            protocol_version: ddpm_proto::PROTOCOL_VERSION,
            images_per_second: st
                .membership
                .members()
                .filter_map(|m| m.progress.as_ref().map(|p| p.images_per_second))
                .sum(),
            last_checkpoint_unix_millis: st.last_checkpoint_unix_millis,
            last_eval: None,
        }
    }
}

#[cfg(test)]
mod tests;
