//! Who is in the run: registration with rank assignment, leases kept by heartbeats, and the
//! generation of the ring, and what each rank last reported. Pure state (time is passed in),
//! so every rule is unit-tested without a network; the gRPC service holds one `Membership`
//! behind a lock.

use crate::CoordinatorError;
use ddpm_proto::{Rendezvous, NCCL_UNIQUE_ID_BYTES, PROTOCOL_VERSION};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Where the run stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Fewer than `world_size` workers hold a lease.
    Waiting,
    /// Every rank is present; training runs.
    Running,
    /// Training reached its last step.
    Finished,
}

/// What a worker says when it registers.
#[derive(Debug, Clone)]
pub struct JoinRequest {
    /// Its protocol version.
    pub protocol_version: u32,
    /// The rank asked for (`worker --rank N`), or any.
    pub requested_rank: Option<u32>,
    /// Unique per process; a process that registers again keeps its rank.
    pub member_id: String,
    /// Host name, for operators and errors.
    pub host: String,
    /// Device, e.g. "cuda:0".
    pub device: String,
    /// Its TCP ring listen address.
    pub ring_address: String,
    /// The `ncclUniqueId` it created (NCCL backend; empty otherwise). Rank 0's is handed to
    /// every rank of the generation.
    pub nccl_unique_id: Vec<u8>,
}

/// What a rank reported after a step.
#[derive(Debug, Clone, PartialEq)]
pub struct Progress {
    /// The generation the report was made in.
    pub generation: u64,
    /// Completed updates.
    pub step: u64,
    /// Training loss of the last step.
    pub loss: f64,
    /// Training throughput of this rank.
    pub images_per_second: f64,
    /// Data cursor after the step: epoch.
    pub epoch: u64,
    /// Data cursor after the step: position in the epoch.
    pub position: u64,
}

/// One member holding a rank.
#[derive(Debug, Clone)]
pub struct Member {
    /// From its registration.
    pub join: JoinRequest,
    /// Its rank.
    pub rank: u32,
    /// Last registration, heartbeat or progress report.
    pub last_seen: Instant,
    /// Its last progress report, if any.
    pub progress: Option<Progress>,
}

/// What a successful registration gives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admission {
    /// The rank.
    pub rank: u32,
    /// Ranks in the run.
    pub world_size: u32,
    /// The ring generation the rank belongs to.
    pub generation: u64,
}

/// The members of one run.
#[derive(Debug)]
pub struct Membership {
    world_size: u32,
    lease: Duration,
    nccl: bool,
    generation: u64,
    phase: Phase,
    members: BTreeMap<u32, Member>,
}

impl Membership {
    /// A run of `world_size` ranks whose members must heartbeat within `lease`.
    pub fn new(world_size: u32, lease: Duration) -> Self {
        Self {
            world_size,
            lease,
            nccl: false,
            generation: 1,
            phase: Phase::Waiting,
            members: BTreeMap::new(),
        }
    }

    /// The same run on the NCCL backend: rank 0 must register with its 128-byte
    /// `ncclUniqueId`, which every rank of the generation is handed
    /// ([`Membership::nccl_rendezvous`]).
    pub fn with_nccl(mut self) -> Self {
        self.nccl = true;
        self
    }

    /// Admits a worker. Refused, changing nothing: another protocol version, a finished
    /// run, a rank out of range, a rank held by another live member (the error names the
    /// holder), a full run, or (NCCL backend) rank 0 without a 128-byte `ncclUniqueId`. A
    /// process that registers again (same `member_id`) gets its rank back, and keeps its
    /// last progress report.
    pub fn register(
        &mut self,
        join: JoinRequest,
        now: Instant,
    ) -> Result<Admission, CoordinatorError> {
        if join.protocol_version != PROTOCOL_VERSION {
            return Err(CoordinatorError::Refused(format!(
                "protocol version {} is not supported: this coordinator speaks version {PROTOCOL_VERSION}",
                join.protocol_version
            )));
        }
        if self.phase == Phase::Finished {
            return Err(CoordinatorError::Refused(format!(
                "the run is finished; {} ({}) cannot join it",
                join.member_id, join.host
            )));
        }
        self.expire(now);
        let again = self
            .members
            .values()
            .find(|m| m.join.member_id == join.member_id)
            .map(|m| m.rank);
        let rank = match (join.requested_rank, again) {
            (Some(r), _) if r >= self.world_size => {
                return Err(CoordinatorError::Refused(format!(
                    "rank {r} is out of range: the run has world_size {} (ranks 0..{})",
                    self.world_size,
                    self.world_size - 1
                )))
            }
            (Some(r), _) => {
                if let Some(holder) = self.members.get(&r) {
                    if holder.join.member_id != join.member_id {
                        return Err(CoordinatorError::Refused(format!(
                            "rank {r} is taken by {} on {} (device {}), seen {:.1} s ago",
                            holder.join.member_id,
                            holder.join.host,
                            holder.join.device,
                            now.duration_since(holder.last_seen).as_secs_f64()
                        )));
                    }
                }
                if let Some(old) = again.filter(|&o| o != r) {
                    self.members.remove(&old);
                }
                r
            }
            (None, Some(r)) => r,
            (None, None) => (0..self.world_size)
                .find(|r| !self.members.contains_key(r))
                .ok_or_else(|| {
                    CoordinatorError::Refused(format!(
                        "all {} ranks are taken; {} ({}) cannot join",
                        self.world_size, join.member_id, join.host
                    ))
                })?,
        };
        if self.nccl && rank == 0 && join.nccl_unique_id.len() != NCCL_UNIQUE_ID_BYTES {
            return Err(CoordinatorError::Refused(format!(
                "backend nccl: rank 0 ({} on {}) must register with its ncclUniqueId of \
                 {NCCL_UNIQUE_ID_BYTES} bytes, got {} bytes",
                join.member_id,
                join.host,
                join.nccl_unique_id.len()
            )));
        }
        let progress = self
            .members
            .get(&rank)
            .filter(|m| m.join.member_id == join.member_id)
            .and_then(|m| m.progress.clone());
        self.members.insert(
            rank,
            Member {
                join,
                rank,
                last_seen: now,
                progress,
            },
        );
        if self.members.len() as u32 == self.world_size {
            self.phase = Phase::Running;
        }
        Ok(Admission {
            rank,
            world_size: self.world_size,
            generation: self.generation,
        })
    }

    /// Renews the lease of `rank`; refused for a member that is not (or no longer) the
    /// holder, or a stale generation.
    pub fn heartbeat(
        &mut self,
        rank: u32,
        generation: u64,
        member_id: &str,
        now: Instant,
    ) -> Result<Phase, CoordinatorError> {
        self.expire(now);
        if generation != self.generation {
            return Err(CoordinatorError::Stale(format!(
                "rank {rank} ({member_id}) is in generation {generation}, the ring is in generation {}; register again",
                self.generation
            )));
        }
        match self.members.get_mut(&rank) {
            Some(m) if m.join.member_id == member_id => {
                m.last_seen = now;
                Ok(self.phase)
            }
            Some(m) => Err(CoordinatorError::Stale(format!(
                "rank {rank} is held by {}, not {member_id}",
                m.join.member_id
            ))),
            None => Err(CoordinatorError::Stale(format!(
                "rank {rank} ({member_id}) lost its lease; register again"
            ))),
        }
    }

    /// The member holding `rank` in `generation`, which must be the current one; the error
    /// says what is stale. For requests that carry no member id (work, progress,
    /// checkpoints).
    pub fn holder(&self, rank: u32, generation: u64) -> Result<&Member, CoordinatorError> {
        if generation != self.generation {
            return Err(CoordinatorError::Stale(format!(
                "rank {rank} is in generation {generation}, the ring is in generation {}; register again",
                self.generation
            )));
        }
        self.members.get(&rank).ok_or_else(|| {
            CoordinatorError::Stale(format!(
                "rank {rank} of generation {generation} is not held (its lease ran out?); register again"
            ))
        })
    }

    /// Records the progress report of `rank` (renewing its lease); refused like
    /// [`Membership::holder`] for a stale generation or a rank nobody holds.
    pub fn report(
        &mut self,
        rank: u32,
        progress: Progress,
        now: Instant,
    ) -> Result<Phase, CoordinatorError> {
        self.expire(now);
        self.holder(rank, progress.generation)?;
        let m = self.members.get_mut(&rank).expect("holder checked");
        m.last_seen = now;
        // Reports travel concurrently and may arrive out of order: within a generation a
        // rank's step never goes back, so a late report cannot undo the final one.
        let older = m
            .progress
            .as_ref()
            .is_some_and(|p| p.generation == progress.generation && p.step > progress.step);
        if !older {
            m.progress = Some(progress);
        }
        Ok(self.phase)
    }

    /// Whether every rank of the current generation is present and has reported at least
    /// `total_steps` completed updates in this generation.
    pub fn all_reached(&self, total_steps: u64) -> bool {
        self.members.len() as u32 == self.world_size
            && self.members.values().all(|m| {
                m.progress
                    .as_ref()
                    .is_some_and(|p| p.generation == self.generation && p.step >= total_steps)
            })
    }

    /// Drops members whose lease ran out. If a running ring loses a member, the generation
    /// moves on and the run waits for the rank to be filled again. Returns the dropped
    /// members.
    pub fn expire(&mut self, now: Instant) -> Vec<Member> {
        let lease = self.lease;
        let dead: Vec<u32> = self
            .members
            .values()
            .filter(|m| now.duration_since(m.last_seen) > lease)
            .map(|m| m.rank)
            .collect();
        let dropped: Vec<Member> = dead.iter().filter_map(|r| self.members.remove(r)).collect();
        if !dropped.is_empty() && self.phase == Phase::Running {
            self.generation += 1;
            self.phase = Phase::Waiting;
        }
        dropped
    }

    /// The TCP ring of the current generation, once every rank is present.
    pub fn tcp_rendezvous(&self) -> Option<Rendezvous> {
        (self.phase == Phase::Running).then(|| Rendezvous::Tcp {
            peers: self
                .members
                .values()
                .map(|m| m.join.ring_address.clone())
                .collect(),
        })
    }

    /// The NCCL rendezvous of the current generation (rank 0's `ncclUniqueId`), once every
    /// rank is present. An error when rank 0's id is not 128 bytes (it cannot be: such a
    /// registration is refused on the NCCL backend).
    pub fn nccl_rendezvous(&self) -> Option<Result<Rendezvous, CoordinatorError>> {
        if self.phase != Phase::Running {
            return None;
        }
        let zero = self.members.get(&0)?;
        let id = &zero.join.nccl_unique_id;
        Some(if id.len() == NCCL_UNIQUE_ID_BYTES {
            Ok(Rendezvous::Nccl {
                unique_id: id.clone(),
            })
        } else {
            Err(CoordinatorError::Refused(format!(
                "backend nccl: rank 0 ({} on {}) registered an ncclUniqueId of {} bytes, expected {NCCL_UNIQUE_ID_BYTES}",
                zero.join.member_id,
                zero.join.host,
                id.len()
            )))
        })
    }

    /// Marks the run finished: later registrations are refused.
    pub fn finish(&mut self) {
        self.phase = Phase::Finished;
    }

    /// Where the run stands.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// The current ring generation.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Ranks in the run.
    pub fn world_size(&self) -> u32 {
        self.world_size
    }

    /// How long a member may go without a heartbeat.
    pub fn lease(&self) -> Duration {
        self.lease
    }

    /// The members, by rank.
    pub fn members(&self) -> impl Iterator<Item = &Member> {
        self.members.values()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn join(id: &str, rank: Option<u32>) -> JoinRequest {
        JoinRequest {
            protocol_version: PROTOCOL_VERSION,
            requested_rank: rank,
            member_id: id.into(),
            host: format!("host-{id}"),
            device: "cpu".into(),
            ring_address: format!("{id}:7000"),
            nccl_unique_id: Vec::new(),
        }
    }

    #[test]
    fn ranks_are_assigned_honoured_and_a_duplicate_names_the_holder() {
        let t = Instant::now();
        let mut m = Membership::new(3, Duration::from_secs(10));
        assert_eq!(m.register(join("a", Some(2)), t).unwrap().rank, 2);
        assert_eq!(m.register(join("b", None), t).unwrap().rank, 0);
        let err = m.register(join("c", Some(2)), t).unwrap_err().to_string();
        assert!(err.contains("rank 2 is taken by a on host-a"), "{err}");
        let err = m.register(join("c", Some(3)), t).unwrap_err().to_string();
        assert!(
            err.contains("rank 3 is out of range") && err.contains("world_size 3"),
            "{err}"
        );
        // Nothing changed: still waiting for rank 1.
        assert_eq!(m.phase(), Phase::Waiting);
        assert!(m.tcp_rendezvous().is_none());
        assert_eq!(m.register(join("c", None), t).unwrap().rank, 1);
        assert_eq!(m.phase(), Phase::Running);
        assert_eq!(
            m.tcp_rendezvous(),
            Some(Rendezvous::Tcp {
                peers: vec!["b:7000".into(), "c:7000".into(), "a:7000".into()]
            })
        );
        let err = m.register(join("d", None), t).unwrap_err().to_string();
        assert!(err.contains("all 3 ranks are taken"), "{err}");
        // The same process registering again keeps its rank.
        assert_eq!(m.register(join("a", None), t).unwrap().rank, 2);
    }

    #[test]
    fn another_protocol_version_and_a_finished_run_are_refused() {
        let t = Instant::now();
        let mut m = Membership::new(1, Duration::from_secs(10));
        let mut old = join("a", None);
        old.protocol_version = PROTOCOL_VERSION + 1;
        let err = m.register(old, t).unwrap_err().to_string();
        assert!(
            err.contains(&format!("version {}", PROTOCOL_VERSION + 1)),
            "{err}"
        );
        assert_eq!(m.members().count(), 0);
        m.register(join("a", None), t).unwrap();
        m.finish();
        let err = m.register(join("b", None), t).unwrap_err().to_string();
        assert!(err.contains("finished"), "{err}");
        assert_eq!(m.members().count(), 1);
    }

    #[test]
    fn a_lost_lease_frees_the_rank_and_moves_the_generation_on() {
        let t0 = Instant::now();
        let lease = Duration::from_secs(10);
        let mut m = Membership::new(2, lease);
        m.register(join("a", None), t0).unwrap();
        m.register(join("b", None), t0).unwrap();
        assert_eq!((m.phase(), m.generation()), (Phase::Running, 1));
        let t1 = t0 + Duration::from_secs(8);
        assert_eq!(m.heartbeat(0, 1, "a", t1).unwrap(), Phase::Running);
        // b stops heartbeating; past its lease it is dropped and the ring re-forms.
        let t2 = t0 + Duration::from_secs(12);
        let err = m.heartbeat(0, 1, "a", t2).unwrap_err().to_string();
        assert!(err.contains("generation 2"), "{err}");
        assert_eq!((m.phase(), m.generation()), (Phase::Waiting, 2));
        let err = m.heartbeat(1, 2, "b", t2).unwrap_err().to_string();
        assert!(err.contains("lost its lease"), "{err}");
        // A replacement takes rank 1 in generation 2; a keeps rank 0 by registering again.
        let adm = m.register(join("a", None), t2).unwrap();
        assert_eq!((adm.rank, adm.generation), (0, 2));
        let adm = m.register(join("c", Some(1)), t2).unwrap();
        assert_eq!((adm.rank, adm.generation), (1, 2));
        assert_eq!(m.phase(), Phase::Running);
        // A heartbeat from the old holder of rank 1 is refused, naming the new one.
        let err = m.heartbeat(1, 2, "b", t2).unwrap_err().to_string();
        assert!(err.contains("held by c"), "{err}");
    }

    fn progress(generation: u64, step: u64) -> Progress {
        Progress {
            generation,
            step,
            loss: 0.1,
            images_per_second: 1.0,
            epoch: 0,
            position: step,
        }
    }

    #[test]
    fn reports_are_kept_per_rank_and_the_run_ends_when_every_rank_reached_the_end() {
        let t = Instant::now();
        let mut m = Membership::new(2, Duration::from_secs(10));
        m.register(join("a", None), t).unwrap();
        let err = m.report(1, progress(1, 1), t).unwrap_err().to_string();
        assert!(err.contains("rank 1 of generation 1 is not held"), "{err}");
        m.register(join("b", None), t).unwrap();
        m.report(0, progress(1, 5), t).unwrap();
        assert!(!m.all_reached(5));
        // Registering again keeps the report.
        m.register(join("a", None), t).unwrap();
        assert_eq!(m.holder(0, 1).unwrap().progress, Some(progress(1, 5)));
        let err = m.report(1, progress(3, 5), t).unwrap_err().to_string();
        assert!(err.contains("generation 3"), "{err}");
        m.report(1, progress(1, 5), t).unwrap();
        assert!(m.all_reached(5) && !m.all_reached(6));
        // A report that arrives late (step 4 after step 5) does not take the step back.
        m.report(1, progress(1, 4), t).unwrap();
        assert!(m.all_reached(5));
    }

    #[test]
    fn expiry_returns_the_dropped_members() {
        let t = Instant::now();
        let mut m = Membership::new(2, Duration::from_secs(10));
        m.register(join("a", None), t).unwrap();
        m.register(join("b", None), t).unwrap();
        m.heartbeat(0, 1, "a", t + Duration::from_secs(8)).unwrap();
        assert!(m.expire(t + Duration::from_secs(9)).is_empty());
        let gone = m.expire(t + Duration::from_secs(12));
        let ids: Vec<&str> = gone.iter().map(|g| g.join.member_id.as_str()).collect();
        assert_eq!(ids, ["b"]);
        assert_eq!((m.generation(), m.phase()), (2, Phase::Waiting));
    }

    #[test]
    fn nccl_needs_rank_0s_unique_id() {
        let t = Instant::now();
        let mut m = Membership::new(2, Duration::from_secs(10)).with_nccl();
        let err = m.register(join("a", None), t).unwrap_err().to_string();
        assert!(err.contains("rank 0") && err.contains("128 bytes"), "{err}");
        assert_eq!(m.members().count(), 0);
        // Other ranks need none.
        m.register(join("b", Some(1)), t).unwrap();
        let mut a = join("a", None);
        a.nccl_unique_id = vec![7; NCCL_UNIQUE_ID_BYTES];
        assert_eq!(m.register(a, t).unwrap().rank, 0);
        assert_eq!(
            m.nccl_rendezvous().unwrap().unwrap(),
            Rendezvous::Nccl {
                unique_id: vec![7; NCCL_UNIQUE_ID_BYTES]
            }
        );
    }
}
