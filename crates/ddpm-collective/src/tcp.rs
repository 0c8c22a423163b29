//! A ring over TCP: rank r sends to rank r+1 and receives from rank r-1 (mod world size).
//!
//! All-reduce is the bandwidth-optimal ring: a reduce-scatter of W-1 steps, then an
//! all-gather of W-1 steps, each rank sending and receiving one W-th of the buffer per step.
//! It is chunked and pipelined: a sender thread writes chunks as soon as the receiving side
//! has reduced them, so sending, receiving and adding overlap, and the sockets stay busy in
//! both directions. Every operation starts with a header (operation, length, sequence
//! number), so ranks that disagree fail with a message instead of exchanging garbage.

use crate::{AbortFlag, AbortHandle, Collective, CollectiveError, ReduceOp, Result};
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

const MAGIC: u32 = 0x4444_5052; // "DDPR"
const VERSION: u32 = 1;
const OP_ALL_REDUCE: u32 = 1;
const OP_BROADCAST: u32 = 2;

/// Settings of a [`TcpRing`].
#[derive(Debug, Clone)]
pub struct RingOptions {
    /// Longest wait for any one read or write of a peer, and for the ring to form.
    pub timeout: Duration,
    /// Elements per pipelined chunk.
    pub chunk_elems: usize,
    /// Identifies one incarnation of the ring (the coordinator's generation): a peer of
    /// another generation is refused.
    pub generation: u64,
    /// Checked while the ring forms: once set, [`TcpRing::connect`] stops waiting for its
    /// peers and fails with [`CollectiveError::Aborted`].
    pub abort: Option<Arc<AbortFlag>>,
    /// How long the next rank's address may refuse connections before forming fails with
    /// [`CollectiveError::Peer`]. `None`: retry until `timeout` (the peer may still be
    /// starting). A caller whose peers listen before they announce their address (the
    /// worker binds its ring socket before it registers) knows that a refusal means the
    /// peer is gone, and can give up after a short grace instead of the timeout.
    pub refused_patience: Option<Duration>,
}

impl Default for RingOptions {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(300),
            chunk_elems: 1 << 18, // 1 MiB of f32
            generation: 0,
            abort: None,
            refused_patience: None,
        }
    }
}

/// A ring of `world` ranks over TCP; see the module docs.
pub struct TcpRing {
    rank: usize,
    world: usize,
    peers: Vec<SocketAddr>,
    /// To rank + 1.
    next: Option<TcpStream>,
    /// From rank - 1.
    prev: Option<TcpStream>,
    options: RingOptions,
    seq: u64,
    abort: Arc<RingAbort>,
    /// Set by the first failed operation: the byte streams are out of step, so every later
    /// operation fails at once (rebuild the ring).
    broken: Option<String>,
}

struct RingAbort {
    aborted: AtomicBool,
    streams: Mutex<Vec<TcpStream>>,
}

impl RingAbort {
    /// Closes both connections: blocked reads and writes here fail at once, and the
    /// neighbours see the connection end instead of waiting out their timeout.
    fn shutdown_streams(&self) {
        for s in self.streams.lock().expect("abort lock").iter() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

impl AbortHandle for RingAbort {
    fn abort(&self) {
        self.aborted.store(true, Ordering::SeqCst);
        self.shutdown_streams();
    }
}

fn handshake(rank: usize, world: usize, generation: u64) -> [u8; 24] {
    let mut h = [0u8; 24];
    h[..4].copy_from_slice(&MAGIC.to_le_bytes());
    h[4..8].copy_from_slice(&VERSION.to_le_bytes());
    h[8..12].copy_from_slice(&(rank as u32).to_le_bytes());
    h[12..16].copy_from_slice(&(world as u32).to_le_bytes());
    h[16..24].copy_from_slice(&generation.to_le_bytes());
    h
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

impl TcpRing {
    /// Joins the ring as `rank`: `listener` is this rank's socket (bound to `peers[rank]`),
    /// `peers` every rank's address. Connects to the next rank (retrying while it starts)
    /// and accepts the previous one, both within `options.timeout`.
    pub fn connect(
        rank: usize,
        listener: TcpListener,
        peers: &[SocketAddr],
        options: RingOptions,
    ) -> Result<Self> {
        let world = peers.len();
        if world == 0 || rank >= world || options.chunk_elems == 0 {
            return Err(CollectiveError::Invalid(format!(
                "rank {rank} of a ring of {world} with chunks of {}",
                options.chunk_elems
            )));
        }
        let abort = Arc::new(RingAbort {
            aborted: AtomicBool::new(false),
            streams: Mutex::new(Vec::new()),
        });
        let mut ring = Self {
            rank,
            world,
            peers: peers.to_vec(),
            next: None,
            prev: None,
            options,
            seq: 0,
            abort,
            broken: None,
        };
        if world == 1 {
            return Ok(ring);
        }
        let deadline = Instant::now() + ring.options.timeout;
        let what = "forming the ring";
        // Connect first: the peer's kernel completes the connection into its listen queue
        // even before it calls accept, so no ordering between ranks is needed.
        let next_rank = (rank + 1) % world;
        let mut refused_since: Option<Instant> = None;
        let mut next = loop {
            ring.check_forming_abort(what)?;
            let left = deadline.saturating_duration_since(Instant::now());
            let attempt = left.clamp(Duration::from_millis(10), Duration::from_secs(1));
            match TcpStream::connect_timeout(&peers[next_rank], attempt) {
                Ok(s) => break s,
                Err(e) => {
                    let now = Instant::now();
                    let refused = e.kind() == ErrorKind::ConnectionRefused;
                    let refused_for = if refused {
                        now - *refused_since.get_or_insert(now)
                    } else {
                        refused_since = None;
                        Duration::ZERO
                    };
                    if refused
                        && ring
                            .options
                            .refused_patience
                            .is_some_and(|p| refused_for >= p)
                    {
                        let why = std::io::Error::new(
                            ErrorKind::ConnectionRefused,
                            format!(
                                "refused for {refused_for:.1?}: nothing listens at the address rank {next_rank} announced, so its process is gone, or it listens elsewhere (check its --ring-listen and --advertise) ({e})"
                            ),
                        );
                        return Err(ring.io_error(what, next_rank, why));
                    }
                    if now >= deadline {
                        return Err(ring.timeout(what, next_rank, ring.options.timeout));
                    }
                    tracing::debug!(peer = next_rank, error = %e, "ring: next rank not up yet");
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        };
        ring.setup(&next);
        next.write_all(&handshake(rank, world, ring.options.generation))
            .map_err(|e| ring.io_error(what, next_rank, e))?;
        let prev_rank = (rank + world - 1) % world;
        listener
            .set_nonblocking(true)
            .map_err(|e| ring.io_error(what, prev_rank, e))?;
        // Accept until the previous rank's handshake arrives: a stray or stale connection
        // (another generation, a port scanner) is dropped and reported only if nothing
        // better comes before the deadline.
        let want = handshake(prev_rank, world, ring.options.generation);
        let mut refused: Option<String> = None;
        let prev = loop {
            ring.check_forming_abort(what)?;
            let stream = match listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    return Err(match refused {
                        Some(reason) => ring.mismatch(what, reason),
                        None => ring.timeout(what, prev_rank, ring.options.timeout),
                    })
                }
                Err(e) => return Err(ring.io_error(what, prev_rank, e)),
            };
            let mut stream = stream;
            match ring.read_handshake(&mut stream, deadline, what)? {
                Ok(h) if h == want => break stream,
                Ok(h) => {
                    let reason = format!(
                        "expected rank {prev_rank} of {world} (generation {}) to connect, got magic {:#x} version {} rank {} of {} (generation {})",
                        ring.options.generation,
                        u32_at(&h, 0),
                        u32_at(&h, 4),
                        u32_at(&h, 8),
                        u32_at(&h, 12),
                        u64_at(&h, 16)
                    );
                    tracing::warn!(rank, %reason, "ring: refused a connection");
                    refused = Some(reason);
                }
                Err(e) => {
                    tracing::warn!(rank, error = %e, "ring: a connection sent no handshake");
                }
            }
        };
        ring.setup(&prev);
        {
            let mut streams = ring.abort.streams.lock().expect("abort lock");
            for s in [&next, &prev] {
                if let Ok(c) = s.try_clone() {
                    streams.push(c);
                }
            }
        }
        ring.next = Some(next);
        ring.prev = Some(prev);
        Ok(ring)
    }

    /// Reads a connecting peer's handshake until `deadline`, in waits of at most a second
    /// so that an abort is seen while a connection sends nothing. The outer error is the
    /// abort; the inner one this connection's failure.
    fn read_handshake(
        &self,
        stream: &mut TcpStream,
        deadline: Instant,
        what: &str,
    ) -> Result<std::io::Result<[u8; 24]>> {
        let mut h = [0u8; 24];
        let mut filled = 0;
        if let Err(e) = stream.set_nonblocking(false) {
            return Ok(Err(e));
        }
        while filled < h.len() {
            self.check_forming_abort(what)?;
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(Err(ErrorKind::TimedOut.into()));
            }
            let wait = left.clamp(Duration::from_millis(10), Duration::from_secs(1));
            if let Err(e) = stream.set_read_timeout(Some(wait)) {
                return Ok(Err(e));
            }
            match stream.read(&mut h[filled..]) {
                Ok(0) => return Ok(Err(ErrorKind::UnexpectedEof.into())),
                Ok(n) => filled += n,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Ok(Err(e)),
            }
        }
        Ok(Ok(h))
    }

    /// Fails with [`CollectiveError::Aborted`] once [`RingOptions::abort`] is set.
    fn check_forming_abort(&self, what: &str) -> Result<()> {
        match &self.options.abort {
            Some(flag) if flag.is_set() => Err(CollectiveError::Aborted {
                collective: what.into(),
                rank: self.rank,
            }),
            _ => Ok(()),
        }
    }

    fn setup(&self, s: &TcpStream) {
        let _ = s.set_nodelay(true);
        let _ = s.set_read_timeout(Some(self.options.timeout));
        let _ = s.set_write_timeout(Some(self.options.timeout));
    }

    fn timeout(&self, what: &str, peer: usize, waited: Duration) -> CollectiveError {
        CollectiveError::Timeout {
            collective: what.into(),
            rank: self.rank,
            peer,
            addr: self.peers[peer].to_string(),
            waited,
        }
    }

    fn mismatch(&self, what: &str, reason: String) -> CollectiveError {
        CollectiveError::Mismatch {
            collective: what.into(),
            rank: self.rank,
            reason,
        }
    }

    /// An I/O error with a peer: a timeout, an abort, or a failed connection.
    fn io_error(&self, what: &str, peer: usize, e: std::io::Error) -> CollectiveError {
        if self.abort.aborted.load(Ordering::SeqCst) {
            return CollectiveError::Aborted {
                collective: what.into(),
                rank: self.rank,
            };
        }
        match e.kind() {
            ErrorKind::WouldBlock | ErrorKind::TimedOut => {
                self.timeout(what, peer, self.options.timeout)
            }
            _ => CollectiveError::Peer {
                collective: what.into(),
                rank: self.rank,
                peer,
                addr: self.peers[peer].to_string(),
                source: e,
            },
        }
    }

    /// Records the first failure and closes both connections, so the neighbours fail now
    /// rather than at their timeout.
    fn fail(&mut self, e: CollectiveError) -> CollectiveError {
        if self.broken.is_none() {
            self.broken = Some(e.to_string());
        }
        self.abort.shutdown_streams();
        e
    }

    fn next_rank(&self) -> usize {
        (self.rank + 1) % self.world
    }

    fn prev_rank(&self) -> usize {
        (self.rank + self.world - 1) % self.world
    }

    /// Sends this operation's header to the next rank and checks the previous rank's.
    fn exchange_header(&mut self, op: u32, len: usize, arg: u64, what: &str) -> Result<()> {
        if self.abort.aborted.load(Ordering::SeqCst) {
            return Err(CollectiveError::Aborted {
                collective: what.into(),
                rank: self.rank,
            });
        }
        if let Some(first) = &self.broken {
            return Err(self.mismatch(
                what,
                format!("the ring was broken by an earlier error ({first}); it must be rebuilt"),
            ));
        }
        self.seq += 1;
        let mut h = [0u8; 28];
        h[..4].copy_from_slice(&op.to_le_bytes());
        h[4..12].copy_from_slice(&(len as u64).to_le_bytes());
        h[12..20].copy_from_slice(&self.seq.to_le_bytes());
        h[20..28].copy_from_slice(&arg.to_le_bytes());
        let (next, prev) = (self.next_rank(), self.prev_rank());
        let r = self.next.as_mut().expect("connected").write_all(&h);
        r.map_err(|e| self.io_error(what, next, e))?;
        let mut got = [0u8; 28];
        let r = self.prev.as_mut().expect("connected").read_exact(&mut got);
        r.map_err(|e| self.io_error(what, prev, e))?;
        if got != h {
            let name = |op| match op {
                OP_ALL_REDUCE => "all_reduce",
                OP_BROADCAST => "broadcast",
                _ => "an unknown operation",
            };
            return Err(self.mismatch(
                what,
                format!(
                    "rank {prev} is at {} of {} elements (operation {}, argument {}), this rank at {} of {len} (operation {}, argument {arg}; the argument is the root of a broadcast, 0 for sum and 1 for average)",
                    name(u32_at(&got, 0)),
                    u64_at(&got, 4),
                    u64_at(&got, 12),
                    u64_at(&got, 20),
                    name(op),
                    self.seq
                ),
            ));
        }
        Ok(())
    }

    fn ring_all_reduce(&mut self, buf: &mut [f32], what: &str) -> Result<()> {
        let (w, r, chunk) = (self.world, self.rank, self.options.chunk_elems);
        let n = buf.len();
        // Segment i is [n*i/w, n*(i+1)/w), cut into chunks: the same table on every rank.
        let mut table: Vec<Vec<Option<&mut [f32]>>> = Vec::with_capacity(w);
        let mut rest = buf;
        for i in 0..w {
            let len = n * (i + 1) / w - n * i / w;
            let (seg, tail) = rest.split_at_mut(len);
            rest = tail;
            table.push(seg.chunks_mut(chunk).map(Some).collect());
        }
        let (next_rank, prev_rank) = (self.next_rank(), self.prev_rank());
        let next = self.next.as_mut().expect("connected");
        let prev = self.prev.as_mut().expect("connected");
        type Chunk<'a> = (usize, usize, &'a mut [f32]);
        let (to_send, send_rx) = mpsc::channel::<Chunk>();
        let (sent_tx, sent) = mpsc::channel::<Chunk>();
        let seg = |k: isize| (k.rem_euclid(w as isize)) as usize;
        let longest = table
            .iter()
            .flatten()
            .map(|c| c.as_ref().map_or(0, |c| c.len()))
            .max();
        let abort = self.abort.clone();
        std::thread::scope(|scope| {
            let sender_abort = abort.clone();
            let sender = scope.spawn(move || -> std::io::Result<()> {
                for (s, k, c) in send_rx {
                    if let Err(e) = next.write_all(bytemuck::cast_slice(c)) {
                        // Unblock our receiver (and the neighbours) now, not at a timeout.
                        sender_abort.shutdown_streams();
                        return Err(e);
                    }
                    if sent_tx.send((s, k, c)).is_err() {
                        break;
                    }
                }
                Ok(())
            });
            let mut recv = || -> std::result::Result<(), std::io::Error> {
                let mut tmp = vec![0f32; longest.unwrap_or(0)];
                // Step 0 of the reduce-scatter sends this rank's own segment as it is.
                let own = r;
                for (k, c) in table[own].iter_mut().enumerate() {
                    let _ = to_send.send((own, k, c.take().expect("owned")));
                }
                // Reduce-scatter: receive segment r-s-1, add, pass it on in the next step.
                for s in 0..w - 1 {
                    let i = seg(r as isize - s as isize - 1);
                    for k in 0..table[i].len() {
                        let c = table[i][k].take().expect("not yet sent");
                        let t = &mut tmp[..c.len()];
                        prev.read_exact(bytemuck::cast_slice_mut(t))?;
                        for (x, y) in c.iter_mut().zip(t.iter()) {
                            *x += *y;
                        }
                        let _ = to_send.send((i, k, c));
                    }
                }
                // All-gather: receive the finished segment r-s, forward all but the last.
                for s in 0..w - 1 {
                    let i = seg(r as isize - s as isize);
                    for k in 0..table[i].len() {
                        while table[i][k].is_none() {
                            match sent.recv() {
                                Ok((si, sk, c)) => table[si][sk] = Some(c),
                                Err(_) => return Err(std::io::Error::other("the sender stopped")),
                            }
                        }
                        let c = table[i][k].take().expect("returned");
                        prev.read_exact(bytemuck::cast_slice_mut(c))?;
                        if s < w - 2 {
                            let _ = to_send.send((i, k, c));
                        }
                    }
                }
                Ok(())
            };
            let received = recv();
            if received.is_err() {
                // The sender may be blocked writing to a neighbour that waits for us.
                abort.shutdown_streams();
            }
            drop(to_send);
            let sent_result = sender.join().expect("the ring sender panicked");
            // The sender's own error explains a receiver that stopped waiting for it.
            match (received, sent_result) {
                (Ok(()), Ok(())) => Ok(()),
                (_, Err(e)) => Err((next_rank, e)),
                (Err(e), Ok(())) => Err((prev_rank, e)),
            }
        })
        .map_err(|(peer, e)| self.io_error(what, peer, e))
    }

    fn chain_broadcast(&mut self, buf: &mut [f32], root: usize, what: &str) -> Result<()> {
        let (next_rank, prev_rank) = (self.next_rank(), self.prev_rank());
        let forward = next_rank != root;
        let chunk = self.options.chunk_elems;
        for c in buf.chunks_mut(chunk) {
            if self.rank != root {
                let r = self
                    .prev
                    .as_mut()
                    .expect("connected")
                    .read_exact(bytemuck::cast_slice_mut(c));
                r.map_err(|e| self.io_error(what, prev_rank, e))?;
            }
            if forward {
                let r = self
                    .next
                    .as_mut()
                    .expect("connected")
                    .write_all(bytemuck::cast_slice(c));
                r.map_err(|e| self.io_error(what, next_rank, e))?;
            }
        }
        Ok(())
    }
}

impl Collective for TcpRing {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce(&mut self, buf: &mut [f32], op: ReduceOp, what: &str) -> Result<()> {
        let what = format!("all_reduce {what}");
        if self.world > 1 {
            let arg = u64::from(op == ReduceOp::Avg);
            let r = self
                .exchange_header(OP_ALL_REDUCE, buf.len(), arg, &what)
                .and_then(|()| self.ring_all_reduce(buf, &what));
            r.map_err(|e| self.fail(e))?;
        }
        if op == ReduceOp::Avg && self.world > 1 {
            let inv = 1.0 / self.world as f32;
            for x in buf.iter_mut() {
                *x *= inv;
            }
        }
        Ok(())
    }

    fn broadcast(&mut self, buf: &mut [f32], root: usize, what: &str) -> Result<()> {
        let what = format!("broadcast {what}");
        if root >= self.world {
            return Err(CollectiveError::Invalid(format!(
                "{what}: root {root} of a world of {}",
                self.world
            )));
        }
        if self.world > 1 {
            let r = self
                .exchange_header(OP_BROADCAST, buf.len(), root as u64, &what)
                .and_then(|()| self.chain_broadcast(buf, root, &what));
            r.map_err(|e| self.fail(e))?;
        }
        Ok(())
    }

    fn barrier(&mut self, what: &str) -> Result<()> {
        let mut one = [0f32; 1];
        self.all_reduce(&mut one, ReduceOp::Sum, &format!("(barrier) {what}"))
    }

    fn abort_handle(&self) -> Arc<dyn AbortHandle> {
        self.abort.clone()
    }
}

impl Drop for TcpRing {
    fn drop(&mut self) {
        // The abort handle may outlive the ring: close the connections now regardless.
        self.abort.shutdown_streams();
    }
}
