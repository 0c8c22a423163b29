//! The child processes of `ddpm launch`: starting them with their output prefixed, reading
//! the coordinator's address, and supervising them (restarting failed ones when allowed).

use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long the coordinator may take to finish after every worker exited successfully.
const COORDINATOR_GRACE: Duration = Duration::from_secs(30);

/// A child process, its name in the logs and the threads copying its output.
pub(super) struct Proc {
    pub(super) name: String,
    pub(super) child: Child,
    status: Option<ExitStatus>,
    pub(super) forwarders: Vec<JoinHandle<()>>,
}

impl Proc {
    /// Whether it has exited (recording the status).
    fn poll(&mut self) -> Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self
                .child
                .try_wait()
                .with_context(|| format!("waiting for {}", self.name))?;
        }
        Ok(self.status)
    }

    /// Kills it if it still runs, reaps it, and waits until its last lines are printed.
    pub(super) fn stop(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            self.status = self.child.wait().ok();
        }
        for f in self.forwarders.drain(..) {
            let _ = f.join();
        }
    }
}

/// The directory holding this executable, where `coordinator` and `worker` are built too.
pub(super) fn sibling(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the ddpm executable")?;
    let path = exe.with_file_name(name);
    anyhow::ensure!(
        path.is_file(),
        "{} not found next to {} (build every binary: cargo build --release --bins)",
        path.display(),
        exe.display()
    );
    Ok(path)
}

/// Copies each line of `from` to stderr, prefixed with `[name]`.
fn forward(name: String, from: impl Read + Send + 'static) -> JoinHandle<()> {
    std::thread::spawn(move || {
        for line in BufReader::new(from).lines() {
            let Ok(line) = line else { break };
            eprintln!("[{name}] {line}");
        }
    })
}

/// Copies a worker's stdout like [`forward`], except its `worker metrics on ADDR` line, which
/// goes to this process's stdout as `worker RANK metrics on ADDR`.
pub(super) fn forward_worker_stdout(
    name: String,
    rank: u32,
    from: impl Read + Send + 'static,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        for line in BufReader::new(from).lines() {
            let Ok(line) = line else { break };
            match line.strip_prefix("worker metrics on ") {
                Some(addr) => {
                    let mut out = std::io::stdout().lock();
                    let _ = writeln!(out, "worker {rank} metrics on {addr}");
                    let _ = out.flush();
                }
                None => eprintln!("[{name}] {line}"),
            }
        }
    })
}

/// Starts `cmd` with its stderr (and stdout unless `keep_stdout`) forwarded; the child is
/// killed if this process dies.
pub(super) fn spawn(name: &str, cmd: &mut Command, keep_stdout: bool) -> Result<Proc> {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: only async-signal-safe calls between fork and exec. PR_SET_PDEATHSIG asks the
    // kernel to kill the child when the launcher dies, so no worker outlives it; if the
    // launcher died before the prctl took effect, the child exits at once.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(move || {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {name} ({cmd:?})"))?;
    let mut forwarders = vec![forward(name.into(), child.stderr.take().expect("piped"))];
    if !keep_stdout {
        forwarders.push(forward(name.into(), child.stdout.take().expect("piped")));
    }
    Ok(Proc {
        name: name.to_string(),
        child,
        status: None,
        forwarders,
    })
}

/// Reads the coordinator's first stdout line, `coordinator listening on ADDR`, and with
/// `metrics` the next, `coordinator metrics on ADDR` (printed on this process's stdout),
/// then forwards the rest. Fails (after printing its last words) if it exits before.
pub(super) fn coordinator_address(p: &mut Proc, metrics: bool) -> Result<String> {
    let stdout = p.child.stdout.take().context("coordinator stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    p.forwarders.push(std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut first = String::new();
        let _ = reader.read_line(&mut first);
        let _ = tx.send(first);
        for line in reader.lines() {
            let Ok(line) = line else { break };
            if metrics && line.starts_with("coordinator metrics on ") {
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "{line}");
                let _ = out.flush();
            } else {
                eprintln!("[coordinator] {line}");
            }
        }
    }));
    let first = rx.recv_timeout(Duration::from_secs(120));
    let addr = first
        .as_deref()
        .ok()
        .and_then(|l| l.trim().strip_prefix("coordinator listening on "))
        .map(str::to_string);
    match addr {
        Some(a) => Ok(a),
        None => {
            p.stop();
            match first {
                Ok(l) if l.is_empty() => bail!(
                    "the coordinator exited ({}) before listening; its log is above",
                    p.status.map_or("unknown status".into(), |s| s.to_string())
                ),
                Ok(l) => bail!("unexpected first line from the coordinator: {l:?}"),
                Err(_) => bail!("the coordinator did not say where it listens within 120 s"),
            }
        }
    }
}

/// What [`supervise`] does when a worker or the coordinator fails.
#[derive(Default)]
pub(super) struct OnFailure<'a> {
    /// Restarts left (in all).
    pub(super) restarts: u32,
    /// Starts process `i` of the supervised list again (same role, rank and address), as a
    /// Kubernetes StatefulSet restarts its pods.
    pub(super) respawn: Option<&'a mut dyn FnMut(usize) -> Result<Proc>>,
    /// Workers that may fail (beyond the restarts) while the run goes on with fewer
    /// (distributed.world_size - elastic.min_workers).
    pub(super) spare_workers: u32,
}

/// Waits for every process; the first failure or Ctrl-C stops the rest, unless `on_failure`
/// allows starting the failed process again (a worker with its rank, the coordinator on its
/// address; while the run is not over) or going on without a failed worker. With `coordinator_first`, `procs[0]`
/// is the coordinator, which gets [`COORDINATOR_GRACE`] to finish once every worker has
/// exited. An evaluator that fails does not stop the training: it is reported, and makes
/// the launch fail at the end.
pub(super) fn supervise(
    procs: &mut [Proc],
    coordinator_first: bool,
    interrupted: &AtomicBool,
    mut on_failure: OnFailure<'_>,
) -> Result<()> {
    let mut workers_done: Option<Instant> = None;
    let mut side_failure: Option<String> = None;
    let mut restarted = 0u32;
    let failure = loop {
        if interrupted.load(Ordering::SeqCst) {
            break Some("interrupted (Ctrl-C)".to_string());
        }
        // Once the coordinator has finished the run, nothing is restarted.
        let over = coordinator_first && procs[0].status.is_some_and(|s| s.success());
        let mut failed = None;
        for (i, p) in procs.iter_mut().enumerate() {
            let was_running = p.status.is_none();
            let Some(s) = p.poll()? else { continue };
            if s.success() || !was_running {
                continue;
            }
            let why = format!("{} exited with {s}", p.name);
            if p.name == "evaluator" {
                eprintln!("[launch] {why}; training goes on without it (its log is above)");
                side_failure.get_or_insert(why);
                continue;
            }
            let left = on_failure.restarts;
            match on_failure.respawn.as_mut().filter(|_| left > 0 && !over) {
                Some(respawn) => {
                    on_failure.restarts -= 1;
                    restarted += 1;
                    eprintln!(
                        "[launch] {why}; starting it again (restart {restarted}, {} left)",
                        left - 1
                    );
                    p.stop();
                    *p = respawn(i)?;
                }
                None if p.name.starts_with("worker") && on_failure.spare_workers > 0 => {
                    on_failure.spare_workers -= 1;
                    eprintln!("[launch] {why}; the run goes on without it (elastic.min_workers)");
                }
                None if failed.is_none() => failed = Some(why),
                None => {}
            }
        }
        if failed.is_some() {
            break failed;
        }
        if procs.iter().all(|p| p.status.is_some()) {
            break None;
        }
        let mut workers = procs.iter().filter(|p| p.name.starts_with("worker"));
        // Only while the coordinator runs: the evaluator may score the final checkpoint
        // for long after the coordinator finished.
        if coordinator_first && procs[0].status.is_none() && workers.all(|p| p.status.is_some()) {
            let since = *workers_done.get_or_insert_with(Instant::now);
            if since.elapsed() > COORDINATOR_GRACE {
                break Some(format!(
                    "every worker exited, but the coordinator did not finish the run within {COORDINATOR_GRACE:?}"
                ));
            }
        } else {
            workers_done = None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    for p in procs.iter_mut() {
        p.stop();
    }
    match failure.or(side_failure) {
        Some(why) => bail!("{why}; stopped the other processes"),
        None => Ok(()),
    }
}
