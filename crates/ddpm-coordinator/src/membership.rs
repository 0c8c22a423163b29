//! Who is in the run: registration into rank slots, leases kept by heartbeats, the
//! generations of the ring (which members form it, in which order), and what each member
//! last reported. Pure state (time is passed in), so every rule is unit-tested without a
//! network; the gRPC service holds one `Membership` behind a lock.
//!
//! A generation is *waiting* while members register into it and *running* once its ring is
//! formed: at once when `target` (distributed.world_size) members are registered, or with at
//! least `min` of them once the grace period has passed since the generation began. A
//! running ring that loses a member (lease expiry, or a survivor reporting that its
//! collective failed) or gains one (a new worker with a free slot) moves to the next
//! generation, which waits again; every survivor registers again into it.

use crate::CoordinatorError;
use ddpm_proto::{Rendezvous, NCCL_UNIQUE_ID_BYTES, PROTOCOL_VERSION};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Where the run stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The current generation is gathering its members.
    Waiting,
    /// The current generation's ring is formed; training runs.
    Running,
    /// Training reached its last step.
    Finished,
}

/// What a worker says when it registers.
#[derive(Debug, Clone)]
pub struct JoinRequest {
    /// Its protocol version.
    pub protocol_version: u32,
    /// The rank slot asked for (`worker --rank N`), or any.
    pub requested_rank: Option<u32>,
    /// Unique per process; a process that registers again keeps its slot.
    pub member_id: String,
    /// Host name, for operators and errors.
    pub host: String,
    /// Device, e.g. "cuda:0".
    pub device: String,
    /// Its TCP ring listen address.
    pub ring_address: String,
    /// The `ncclUniqueId` it created (NCCL backend; empty otherwise). The id of the ring's
    /// first member is handed to every member of the generation.
    pub nccl_unique_id: Vec<u8>,
    /// The generation whose collective failed on this worker, or 0.
    pub failed_generation: u64,
}

/// What a member reported after a step.
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

/// One member holding a rank slot.
#[derive(Debug, Clone)]
pub struct Member {
    /// From its latest registration.
    pub join: JoinRequest,
    /// Its slot.
    pub rank: u32,
    /// The generation it last registered into.
    pub generation: u64,
    /// Last registration, heartbeat or progress report.
    pub last_seen: Instant,
    /// Its last progress report, if any.
    pub progress: Option<Progress>,
}

/// What a successful registration gives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admission {
    /// The slot.
    pub rank: u32,
    /// Members of the formed ring, or the target while the generation waits.
    pub world_size: u32,
    /// The generation the member belongs to.
    pub generation: u64,
    /// Its position in the formed ring (None while the generation waits).
    pub ring_rank: Option<u32>,
}

/// How many members a generation forms with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sizes {
    /// Forms at once with this many (distributed.world_size).
    pub target: u32,
    /// Forms with at least this many after `grace` (elastic.min_workers).
    pub min: u32,
    /// Rank slots `0..slots` (elastic.max_workers).
    pub slots: u32,
    /// How long a generation with `min..target` members waits for the rest.
    pub grace: Duration,
}

impl Sizes {
    /// A fixed world: every one of `world_size` slots must be filled.
    pub fn fixed(world_size: u32) -> Self {
        Self {
            target: world_size,
            min: world_size,
            slots: world_size,
            grace: Duration::ZERO,
        }
    }
}

/// The members of one run.
#[derive(Debug)]
pub struct Membership {
    sizes: Sizes,
    lease: Duration,
    nccl: bool,
    generation: u64,
    phase: Phase,
    /// When the current generation began waiting (its first registration).
    waiting_since: Option<Instant>,
    /// The formed ring's slots, in ring order (empty while waiting).
    ring: Vec<u32>,
    /// The member id of the last formed ring's rank 0 (its checkpoint writer).
    last_leader: Option<String>,
    members: BTreeMap<u32, Member>,
}

impl Membership {
    /// A run of `world_size` fixed slots whose members must heartbeat within `lease`.
    pub fn new(world_size: u32, lease: Duration) -> Self {
        Self::elastic(Sizes::fixed(world_size), lease)
    }

    /// A run whose generations form as `sizes` says.
    pub fn elastic(sizes: Sizes, lease: Duration) -> Self {
        Self {
            sizes,
            lease,
            nccl: false,
            generation: 1,
            phase: Phase::Waiting,
            waiting_since: None,
            ring: Vec::new(),
            last_leader: None,
            members: BTreeMap::new(),
        }
    }

    /// The same run starting at `generation` (a restarted coordinator continues after the
    /// generations of the one before it, so none of their members can pass for current).
    pub fn starting_at(mut self, generation: u64) -> Self {
        self.generation = generation.max(1);
        self
    }

    /// The same run on the NCCL backend: every worker must register with its 128-byte
    /// `ncclUniqueId`; the ring's first member's is handed to every member
    /// ([`Membership::nccl_rendezvous`]).
    pub fn with_nccl(mut self) -> Self {
        self.nccl = true;
        self
    }

    /// Whether the holder of a slot belongs to the current generation: in the formed ring,
    /// or registered into the waiting generation. A holder that is not is stale (it missed
    /// a re-formation, or died), and a new worker may take its slot.
    fn is_current(&self, m: &Member) -> bool {
        match self.phase {
            Phase::Running | Phase::Finished => self.ring.contains(&m.rank),
            Phase::Waiting => m.generation == self.generation,
        }
    }

    /// Moves a running ring to the next generation, which waits for its members.
    fn reform(&mut self, now: Instant) {
        self.generation += 1;
        self.phase = Phase::Waiting;
        self.ring.clear();
        self.waiting_since = Some(now);
    }

    /// Admits a worker. Refused, changing nothing: another protocol version, a finished
    /// run, a slot out of range, a slot held by a member of the current generation (the
    /// error names the holder), no free slot, or (NCCL backend) no 128-byte `ncclUniqueId`.
    /// A process that registers again (same `member_id`) keeps its slot and its last
    /// progress report. A registration that reports the failure of the running generation,
    /// or a new worker joining a running ring, moves the run to the next generation.
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
        if self.nccl && join.nccl_unique_id.len() != NCCL_UNIQUE_ID_BYTES {
            return Err(CoordinatorError::Refused(format!(
                "backend nccl: {} on {} must register with its ncclUniqueId of \
                 {NCCL_UNIQUE_ID_BYTES} bytes, got {} bytes",
                join.member_id,
                join.host,
                join.nccl_unique_id.len()
            )));
        }
        self.expire(now);
        let again = self
            .members
            .values()
            .find(|m| m.join.member_id == join.member_id)
            .map(|m| m.rank);
        let slots = self.sizes.slots;
        let rank = match (join.requested_rank, again) {
            (Some(r), _) if r >= slots => {
                return Err(CoordinatorError::Refused(format!(
                    "rank {r} is out of range: the run has {slots} rank slots (0..{}; distributed.world_size, or elastic.max_workers)",
                    slots - 1
                )))
            }
            (Some(r), _) => {
                if let Some(holder) = self.members.get(&r) {
                    if holder.join.member_id != join.member_id && self.is_current(holder) {
                        return Err(CoordinatorError::Taken(format!(
                            "rank {r} is taken by {} on {} (device {}), seen {:.1} s ago",
                            holder.join.member_id,
                            holder.join.host,
                            holder.join.device,
                            now.duration_since(holder.last_seen).as_secs_f64()
                        )));
                    }
                }
                r
            }
            (None, Some(r)) => r,
            // Only a free slot: a holder outside the current generation may still be a
            // live survivor about to register again (it keeps its slot); a dead one's
            // slot frees when its lease runs out, or goes to a worker asking for it by
            // number (`--rank`, as a StatefulSet's replacement does).
            (None, None) => (0..slots)
                .find(|r| !self.members.contains_key(r))
                .ok_or_else(|| {
                    CoordinatorError::Taken(format!(
                        "all {slots} ranks are taken; {} ({}) cannot join",
                        join.member_id, join.host
                    ))
                })?,
        };
        // Admitted from here on.
        if let Some(old) = again.filter(|&o| o != rank) {
            self.members.remove(&old);
        }
        let in_ring = self.phase == Phase::Running && self.ring.contains(&rank);
        let same = self
            .members
            .get(&rank)
            .is_some_and(|m| m.join.member_id == join.member_id);
        if self.phase == Phase::Running {
            let failed = in_ring && same && join.failed_generation == self.generation;
            let newcomer = !(in_ring && same);
            if failed || newcomer {
                self.reform(now);
            }
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
                generation: self.generation,
                last_seen: now,
                progress,
            },
        );
        self.waiting_since.get_or_insert(now);
        self.try_form(now);
        Ok(self.admission(rank))
    }

    /// What the holder of `rank` is told.
    fn admission(&self, rank: u32) -> Admission {
        Admission {
            rank,
            world_size: self.world_size(),
            generation: self.generation,
            ring_rank: self.ring_rank(rank),
        }
    }

    /// Forms the waiting generation's ring if it may: at once when at least `target` members
    /// registered into it and no other member holding a lease is still to come (so a
    /// generation of more than `target`, up to `slots`, takes all of them instead of
    /// forming without the last and re-forming for it), else with at least `min` once the
    /// grace period has passed. Members that did not register into it are dropped. Returns
    /// whether it formed.
    pub fn try_form(&mut self, now: Instant) -> bool {
        if self.phase != Phase::Waiting {
            return false;
        }
        let present: Vec<u32> = self
            .members
            .values()
            .filter(|m| m.generation == self.generation)
            .map(|m| m.rank)
            .collect();
        let n = present.len() as u32;
        let everyone = present.len() == self.members.len();
        // The last checkpoint writer commits its upload in flight before it registers
        // again; while it holds its lease, a generation does not form without it (the new
        // writer would race it for the same steps).
        let writer_to_come = self.last_leader.as_ref().is_some_and(|id| {
            self.members
                .values()
                .any(|m| &m.join.member_id == id && m.generation != self.generation)
        });
        let waited = self
            .waiting_since
            .is_some_and(|t| now.saturating_duration_since(t) >= self.sizes.grace);
        let may = (n >= self.sizes.target && everyone)
            || (n >= self.sizes.min && waited && !writer_to_come);
        if n == 0 || !may {
            return false;
        }
        self.members.retain(|r, _| present.contains(r));
        self.last_leader = present
            .first()
            .map(|r| self.members[r].join.member_id.clone());
        self.ring = present;
        self.phase = Phase::Running;
        self.waiting_since = None;
        true
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
        self.members
            .get(&rank)
            .filter(|m| self.phase == Phase::Waiting || self.ring.contains(&m.rank))
            .ok_or_else(|| {
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

    /// Whether the current generation's ring is formed and every member of it has reported
    /// at least `total_steps` completed updates in this generation.
    pub fn all_reached(&self, total_steps: u64) -> bool {
        self.phase != Phase::Waiting
            && !self.ring.is_empty()
            && self.ring.iter().all(|r| {
                self.members.get(r).is_some_and(|m| {
                    m.progress
                        .as_ref()
                        .is_some_and(|p| p.generation == self.generation && p.step >= total_steps)
                })
            })
    }

    /// Drops members whose lease ran out. If a running ring loses a member, the run moves
    /// to the next generation; a waiting one may form once the grace period has passed.
    /// Returns the dropped members.
    pub fn expire(&mut self, now: Instant) -> Vec<Member> {
        let lease = self.lease;
        let dead: Vec<u32> = self
            .members
            .values()
            .filter(|m| now.saturating_duration_since(m.last_seen) > lease)
            .map(|m| m.rank)
            .collect();
        let dropped: Vec<Member> = dead.iter().filter_map(|r| self.members.remove(r)).collect();
        if self.phase == Phase::Running && dropped.iter().any(|m| self.ring.contains(&m.rank)) {
            self.reform(now);
        }
        self.try_form(now);
        dropped
    }

    /// The TCP ring of the current generation, once it is formed: the members' addresses in
    /// ring order.
    pub fn tcp_rendezvous(&self) -> Option<Rendezvous> {
        (self.phase == Phase::Running).then(|| Rendezvous::Tcp {
            peers: self
                .ring
                .iter()
                .map(|r| self.members[r].join.ring_address.clone())
                .collect(),
        })
    }

    /// The NCCL rendezvous of the current generation (its first member's `ncclUniqueId`),
    /// once it is formed. An error when that id is not 128 bytes (it cannot be: such a
    /// registration is refused on the NCCL backend).
    pub fn nccl_rendezvous(&self) -> Option<Result<Rendezvous, CoordinatorError>> {
        if self.phase != Phase::Running {
            return None;
        }
        let first = self.members.get(self.ring.first()?)?;
        let id = &first.join.nccl_unique_id;
        Some(if id.len() == NCCL_UNIQUE_ID_BYTES {
            Ok(Rendezvous::Nccl {
                unique_id: id.clone(),
            })
        } else {
            Err(CoordinatorError::Refused(format!(
                "backend nccl: ring rank 0 ({} on {}) registered an ncclUniqueId of {} bytes, expected {NCCL_UNIQUE_ID_BYTES}",
                first.join.member_id,
                first.join.host,
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

    /// Whether a ring is gathering after an earlier one (of this coordinator or of the one
    /// before it) ended: a generation past the first that has not formed yet.
    pub fn reforming(&self) -> bool {
        self.phase == Phase::Waiting && self.generation > 1
    }

    /// The current ring generation.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Members of the formed ring, or the target size while the generation waits.
    pub fn world_size(&self) -> u32 {
        match self.ring.len() {
            0 => self.sizes.target,
            n => n as u32,
        }
    }

    /// The sizes generations form with.
    pub fn sizes(&self) -> Sizes {
        self.sizes
    }

    /// The position of slot `rank` in the formed ring.
    pub fn ring_rank(&self, rank: u32) -> Option<u32> {
        if self.phase == Phase::Waiting {
            return None;
        }
        self.ring.iter().position(|&r| r == rank).map(|p| p as u32)
    }

    /// The slot at ring position 0 (the checkpoint writer), once the ring is formed.
    pub fn ring_leader(&self) -> Option<u32> {
        (self.phase != Phase::Waiting)
            .then(|| self.ring.first().copied())
            .flatten()
    }

    /// Members registered into the current generation.
    pub fn present(&self) -> usize {
        self.members
            .values()
            .filter(|m| m.generation == self.generation)
            .count()
    }

    /// How long a member may go without a heartbeat.
    pub fn lease(&self) -> Duration {
        self.lease
    }

    /// The members, by slot.
    pub fn members(&self) -> impl Iterator<Item = &Member> {
        self.members.values()
    }
}

#[cfg(test)]
mod tests;
