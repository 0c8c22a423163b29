//! `ddpm-bench allreduce`: the TCP ring all-reduce between processes on loopback, against
//! the raw loopback TCP bandwidth measured in the same run.
//!
//! The parent starts `--world` copies of this binary (`allreduce-rank`), one per rank. Each
//! round, every rank first does a raw full-duplex exchange of the buffer's bytes with its
//! ring neighbours over plain sockets (what the wire can do), then an all-reduce (Avg) of
//! `--elements` f32 over the ring. Bus bandwidth is the NCCL-tests convention:
//! `bytes * 2 (W - 1) / W / seconds`, the data each rank must move; for the raw exchange,
//! `bytes / seconds` sent (and received) per rank. Rank 0 prints one JSON line.

use anyhow::{Context, Result};
use clap::Args;
use ddpm_collective::tcp::{RingOptions, TcpRing};
use ddpm_collective::{Collective, ReduceOp};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

/// Arguments of `ddpm-bench allreduce`.
#[derive(Args, Debug, Clone)]
pub struct AllReduceArgs {
    /// f32 values per all-reduce (35,746,307: the CIFAR-10 U-Net's gradients).
    #[arg(long, default_value_t = 35_746_307)]
    pub elements: usize,
    /// Processes (ranks).
    #[arg(long, default_value_t = 2)]
    pub world: usize,
    /// Untimed rounds.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Timed rounds.
    #[arg(long, default_value_t = 5)]
    pub iters: usize,
    /// Elements per pipelined chunk.
    #[arg(long, default_value_t = 1 << 18)]
    pub chunk_elems: usize,
}

/// Arguments of one rank (started by `allreduce`).
#[derive(Args, Debug, Clone)]
pub struct RankArgs {
    #[command(flatten)]
    pub common: AllReduceArgs,
    /// This rank.
    #[arg(long)]
    pub rank: usize,
    /// Ring addresses, comma-separated, one per rank.
    #[arg(long, value_delimiter = ',')]
    pub ring: Vec<SocketAddr>,
    /// Raw-exchange addresses, comma-separated, one per rank.
    #[arg(long, value_delimiter = ',')]
    pub raw: Vec<SocketAddr>,
}

/// Free ports, found by binding and releasing them (a port could be taken in between; the
/// rank then fails to bind and says so).
fn free_addrs(n: usize) -> Result<Vec<SocketAddr>> {
    let ls: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<_>>()?;
    Ok(ls
        .iter()
        .map(|l| l.local_addr())
        .collect::<std::io::Result<_>>()?)
}

fn join(addrs: &[SocketAddr]) -> String {
    addrs
        .iter()
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// Starts the ranks and returns rank 0's result.
pub fn run(a: &AllReduceArgs) -> Result<Value> {
    anyhow::ensure!(
        a.world >= 2 && a.iters >= 1,
        "--world >= 2 and --iters >= 1"
    );
    let ring = free_addrs(a.world)?;
    let raw = free_addrs(a.world)?;
    let exe = std::env::current_exe()?;
    let children: Vec<_> = (0..a.world)
        .map(|r| {
            std::process::Command::new(&exe)
                .args(["allreduce-rank", "--rank", &r.to_string()])
                .args(["--ring", &join(&ring), "--raw", &join(&raw)])
                .args([
                    "--elements",
                    &a.elements.to_string(),
                    "--world",
                    &a.world.to_string(),
                ])
                .args([
                    "--warmup",
                    &a.warmup.to_string(),
                    "--iters",
                    &a.iters.to_string(),
                ])
                .args(["--chunk-elems", &a.chunk_elems.to_string()])
                .stdout(std::process::Stdio::piped())
                .spawn()
                .with_context(|| format!("starting rank {r}"))
        })
        .collect::<Result<_>>()?;
    let mut first = None;
    for (r, c) in children.into_iter().enumerate() {
        let out = c.wait_with_output()?;
        anyhow::ensure!(out.status.success(), "rank {r} failed: {}", out.status);
        if r == 0 {
            first = Some(serde_json::from_slice(&out.stdout).context("rank 0's output")?);
        }
    }
    Ok(first.expect("rank 0 ran"))
}

/// Sends `data` to `to` while receiving as many bytes from `from` into `into`.
fn duplex(to: &mut TcpStream, from: &mut TcpStream, data: &[u8], into: &mut [u8]) -> Result<()> {
    std::thread::scope(|s| {
        let w = s.spawn(|| to.write_all(data));
        from.read_exact(into)?;
        w.join().expect("writer panicked")?;
        Ok(())
    })
}

/// One rank: raw exchange and all-reduce, alternating, `warmup + iters` rounds.
pub fn rank(a: &RankArgs) -> Result<Value> {
    let c = &a.common;
    let w = c.world;
    anyhow::ensure!(
        a.ring.len() == w && a.raw.len() == w,
        "one address per rank"
    );
    let ring_listener = TcpListener::bind(a.ring[a.rank])?;
    let raw_listener = TcpListener::bind(a.raw[a.rank])?;
    let opts = RingOptions {
        timeout: Duration::from_secs(120),
        chunk_elems: c.chunk_elems,
        generation: 1,
        ..RingOptions::default()
    };
    let mut ring = TcpRing::connect(a.rank, ring_listener, &a.ring, opts)?;
    // The raw pair: to the next rank, from the previous, as the ring's own sockets are.
    let next = (a.rank + 1) % w;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut to_next = loop {
        match TcpStream::connect(a.raw[next]) {
            Ok(s) => break s,
            Err(e) if Instant::now() > deadline => {
                anyhow::bail!("rank {}: raw connection to {}: {e}", a.rank, a.raw[next])
            }
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    };
    let (mut from_prev, _) = raw_listener.accept()?;
    to_next.set_nodelay(true)?;
    from_prev.set_nodelay(true)?;

    let bytes = c.elements * 4;
    let mut buf: Vec<f32> = (0..c.elements)
        .map(|i| (i % 1000) as f32 + a.rank as f32)
        .collect();
    let send = vec![7u8; bytes];
    let mut recv = vec![0u8; bytes];
    let (mut raw_s, mut ar_s) = (Vec::new(), Vec::new());
    for round in 0..c.warmup + c.iters {
        ring.barrier("round start")?;
        let t0 = Instant::now();
        duplex(&mut to_next, &mut from_prev, &send, &mut recv)?;
        let raw = t0.elapsed().as_secs_f64();
        ring.barrier("between")?;
        let t0 = Instant::now();
        ring.all_reduce(&mut buf, ReduceOp::Avg, &format!("round {round}"))?;
        let ar = t0.elapsed().as_secs_f64();
        if round >= c.warmup {
            raw_s.push(raw);
            ar_s.push(ar);
        }
    }
    let (raw, ar) = (crate::median(&raw_s), crate::median(&ar_s));
    let raw_gbs = bytes as f64 / raw / 1e9;
    let bus_gbs = bytes as f64 * 2.0 * (w - 1) as f64 / w as f64 / ar / 1e9;
    Ok(json!({
        "bench": "allreduce-tcp-ring",
        "rank": a.rank,
        "world": w,
        "elements": c.elements,
        "bytes": bytes,
        "chunk_elems": c.chunk_elems,
        "raw_exchange_seconds": raw_s,
        "allreduce_seconds": ar_s,
        "raw_exchange_gb_per_s_median": raw_gbs,
        "allreduce_bus_gb_per_s_median": bus_gbs,
        "bus_over_raw": bus_gbs / raw_gbs,
    }))
}
