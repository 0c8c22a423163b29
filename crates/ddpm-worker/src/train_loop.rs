//! The training loop shared by `ddpm train` (one process) and every rank of a distributed
//! run: batches from the loader, the step (with the gradient all-reduce when there are
//! several ranks), the log, weight snapshots and checkpoints (rank 0).

use crate::checkpoints::Checkpoints;
use crate::comm::Comm;
use crate::error::{ensure, Context, Result};
use crate::exchange::GradientExchange;
use crate::ledger::{self, Ledger, StepRecord};
use ddpm_config::Config;
use ddpm_data::epoch::Cursor;
use ddpm_data::loader::{Loader, LoaderOptions};
use ddpm_data::samples::SampleSource;
use ddpm_trainer::{save_weights_dir, Trainer};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tch::Tensor;

/// The ranks this loop trains with.
pub struct Ranks<'a> {
    /// The collective over every rank (the TCP ring, or NCCL on the device's buffers).
    pub comm: &'a mut dyn Comm,
    /// Gradient buckets.
    pub exchange: GradientExchange,
}

/// Where one run of the loop starts and what it writes.
pub struct LoopSetup<'a> {
    /// The resolved config.
    pub cfg: &'a Config,
    /// Training samples.
    pub data: Arc<dyn SampleSource>,
    /// The data cursor at `trainer.global_step()`.
    pub cursor: Cursor,
    /// `data.order().describe()`, saved with checkpoints.
    pub data_order: String,
    /// Rank 0's output directory: train_log.jsonl, weight snapshots, final weights.
    pub out: PathBuf,
    /// Rank 0 commits checkpoints here; other ranks pass None.
    pub checkpoints: Option<&'a Checkpoints>,
    /// None for a single process.
    pub ranks: Option<Ranks<'a>>,
    /// The coordinator's generation this loop trains in (0 for a single process); recorded
    /// in the data ledger.
    pub generation: u64,
    /// The data ledger (a test mode): each applied step's samples are recorded in it.
    pub ledger: Option<&'a Ledger>,
}

/// One logged window of training (every `train.log_every` steps and the last).
#[derive(Debug, Clone)]
pub struct LogLine {
    /// Completed steps.
    pub step: u64,
    /// The loss of this step (averaged over every rank's examples).
    pub loss: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Learning rate of the step.
    pub lr: f64,
    /// Images per second of this rank over the window.
    pub images_per_second: f64,
    /// Share of the window this rank's training thread waited for data.
    pub data_wait_fraction: f64,
    /// Seconds in gradient collectives over the window.
    pub allreduce_seconds: f64,
    /// The data cursor after the step.
    pub cursor: Cursor,
}

impl LogLine {
    /// Sets the window's gauges (`ddpm_train_loss`, `ddpm_train_images_per_second`,
    /// `ddpm_train_step`) of `rank` for the Prometheus endpoint.
    pub fn record_gauges(&self, rank: usize) {
        let rank = rank.to_string();
        metrics::gauge!("ddpm_train_loss", "rank" => rank.clone()).set(self.loss);
        metrics::gauge!("ddpm_train_images_per_second", "rank" => rank.clone())
            .set(self.images_per_second);
        metrics::gauge!("ddpm_train_step", "rank" => rank).set(self.step as f64);
    }

    /// Logs the line as a `tracing` event ("progress").
    pub fn trace(&self) {
        tracing::info!(
            step = self.step,
            loss = self.loss,
            grad_norm = self.grad_norm,
            lr = self.lr,
            images_per_second = self.images_per_second,
            data_wait_fraction = self.data_wait_fraction,
            allreduce_seconds = self.allreduce_seconds,
            "progress"
        );
    }
}

/// What the loop did.
#[derive(Debug, Default)]
pub struct LoopOutcome {
    /// The last step handed to the checkpoint uploader.
    pub submitted: Option<u64>,
    /// Training-thread seconds spent handing checkpoints over.
    pub checkpoint_stall: f64,
    /// The cursor after the last step.
    pub cursor: Cursor,
    /// The last logged line.
    pub last: Option<LogLine>,
}

/// Hooks the caller gives the loop.
pub trait LoopObserver {
    /// After every step (`step` completed).
    fn stepped(&mut self, _step: u64) {}
    /// After every logged window.
    fn logged(&mut self, _line: &LogLine) {}
    /// Before every step: `Some(halt)` stops the loop with an error:
    /// [`crate::WorkerError::Reform`] when the coordinator moved the run to another
    /// generation, [`crate::WorkerError::Invalid`] when the run must stop.
    fn stop_reason(&mut self) -> Option<crate::client::Halt> {
        None
    }
    /// The loss of the step after `step` is not finite: the loop stops with an error right
    /// after this call (so that alerts can see the NaN before the process is gone).
    fn diverged(&mut self, _step: u64, _loss: f64) {}
}

/// The HELP text of the loop's histograms and gauges.
fn describe_metrics() {
    metrics::describe_histogram!(
        "ddpm_train_step_seconds",
        metrics::Unit::Seconds,
        "Wall time of one training step on this rank: waiting for data, compute and all-reduce."
    );
    metrics::describe_histogram!(
        "ddpm_allreduce_seconds",
        metrics::Unit::Seconds,
        "Time in the gradient all-reduce of one step on this rank."
    );
    metrics::describe_gauge!(
        "ddpm_train_loss",
        "Training loss of the last logged step, per rank."
    );
    metrics::describe_gauge!(
        "ddpm_train_images_per_second",
        "This rank's images per second over the last logged window."
    );
    metrics::describe_gauge!("ddpm_train_step", "Completed updates, per rank.");
}

/// Whether a step may be applied: its (all-reduced) loss and the gradient buffer's norm are
/// finite (a norm is NaN or infinite exactly when some gradient is).
fn finite_step(trainer: &Trainer, loss: f64) -> bool {
    loss.is_finite() && trainer.gradients().norm().double_value(&[]).is_finite()
}

/// Records a non-finite loss in the loss gauge and tells the observer, before the error.
fn diverged(observer: &mut dyn LoopObserver, rank: usize, step: u64, loss: f64) {
    metrics::gauge!("ddpm_train_loss", "rank" => rank.to_string()).set(loss);
    tracing::error!(loss, "the loss is not finite");
    observer.diverged(step, loss);
}

/// Writes the model and EMA weights and the config into `out` (rank 0).
fn save_weights(trainer: &Trainer, out: &std::path::Path, cfg: &Config) -> Result<()> {
    let (m, _) = trainer.model();
    let (e, _) = trainer.ema_model();
    Ok(save_weights_dir(out, cfg, m, e)?)
}

/// Trains from `trainer.global_step()` to `train.total_steps`.
pub fn train(
    trainer: &mut Trainer,
    setup: LoopSetup<'_>,
    observer: &mut dyn LoopObserver,
) -> Result<LoopOutcome> {
    let LoopSetup {
        cfg,
        data,
        mut cursor,
        data_order,
        out,
        checkpoints,
        mut ranks,
        generation,
        ledger,
    } = setup;
    let total = cfg.train.total_steps as u64;
    let global = cfg.train.batch_size as usize;
    let (world, rank) = ranks
        .as_ref()
        .map_or((1, 0), |r| (r.comm.world_size(), r.comm.rank()));
    let first_row = ddpm_config::rank_rows(global, world, rank).start as u64;
    describe_metrics();
    let rank_label = rank.to_string();
    let mut outcome = LoopOutcome::default();
    let start = trainer.global_step() as u64;
    let lead = rank == 0;
    if start >= total {
        if lead {
            // Nothing to train: the weights of the finished state still go to `out`.
            save_weights(trainer, &out, cfg)?;
        }
        outcome.cursor = cursor;
        return Ok(outcome);
    }
    let mut log = if lead {
        std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
        let path = out.join("train_log.jsonl");
        // Appended to, so a resumed run keeps the history of the steps before it.
        Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .with_context(|| format!("opening {}", path.display()))?,
        )
    } else {
        None
    };
    let data_len = data.len();
    let mut loader = Loader::start(
        data,
        cursor.clone(),
        LoaderOptions::from_config(&cfg.data, cfg.run.seed, global, world, rank),
    )?;
    let mut window_start = Instant::now();
    let mut window_images = 0usize;
    // Examples over every rank.
    let mut window_global = 0u64;
    let mut window_wait = Duration::ZERO;
    let mut window_allreduce = Duration::ZERO;
    let mut done = start;
    // Each rank counts only its own skipped samples, so with several ranks the loader's
    // "every sample is bad" check cannot see a dataset that is bad throughout: global
    // batches that are all empty for a whole epoch's worth of samples stop the run instead.
    // (One process keeps the loader's own check.)
    let mut empty_in_a_row = 0usize;
    let mut nonfinite_in_a_row = 0u64;
    // Samples consumed since the last applied step without being trained on (undecodable, or
    // in a batch whose update was not applied): the ledger records them with the next
    // applied step, so that its data stream has no hole.
    let mut unused: Vec<ledger::Entry> = Vec::new();
    while done < total {
        let step_span = tracing::info_span!("step", rank, step = done + 1);
        let _in_step = step_span.enter();
        let step_start = Instant::now();
        if let Some(halt) = observer.stop_reason() {
            return Err(halt.into_error(&format!("rank {rank} stopped before step {}", done + 1)));
        }
        let b = loader.next_batch()?;
        cursor = b.cursor.clone();
        let examples = b.indices.len();
        // The step's statistics and its examples over every rank; None when the (global)
        // batch had no decodable sample. A step whose loss or gradients are not finite is
        // not applied (Err with the loss); the decision is on all-reduced values, so every
        // rank takes it alike.
        let stepped = match ranks.as_mut() {
            None if examples == 0 => None,
            None => {
                let loss = trainer.compute_gradients(&b.images, 0, examples as u64)?;
                let l = loss.double_value(&[]);
                Some(match finite_step(trainer, l) {
                    true => Ok((trainer.apply_update(loss), examples as u64)),
                    false => Err(l),
                })
            }
            Some(r) => {
                // Every rank joins the all-reduce, also with no examples (it adds zeroes).
                let loss = if examples > 0 {
                    let l = trainer.compute_gradients(&b.images, first_row, global as u64)?;
                    l.double_value(&[])
                } else {
                    let _ = trainer.gradients().zero_();
                    0.0
                };
                let reducing = Instant::now();
                let avg =
                    r.exchange
                        .average(r.comm, &trainer.gradients(), loss, examples, done + 1)?;
                metrics::histogram!("ddpm_allreduce_seconds", "rank" => rank_label.clone())
                    .record(reducing.elapsed().as_secs_f64());
                match (avg.examples > 0, finite_step(trainer, avg.loss)) {
                    (false, _) => None,
                    (true, true) => Some(Ok((
                        trainer.apply_update(Tensor::from(avg.loss as f32)),
                        avg.examples,
                    ))),
                    (true, false) => Some(Err(avg.loss)),
                }
            }
        };
        unused.extend(ledger::entries(&b.skipped));
        let stepped = match stepped {
            Some(Err(loss)) => {
                unused.extend(ledger::entries(&b.draws));
                nonfinite_in_a_row += 1;
                metrics::counter!("ddpm_train_nonfinite_steps_total", "rank" => rank_label.clone())
                    .increment(1);
                let limit = cfg.train.max_consecutive_nonfinite.max(1) as u64;
                if nonfinite_in_a_row >= limit {
                    diverged(observer, rank, done, loss);
                    return Err(crate::WorkerError::Invalid(format!(
                        "step {}: {nonfinite_in_a_row} steps in a row had a non-finite loss or gradients (last loss {loss}) on rank {rank}; stopping (train.max_consecutive_nonfinite = {limit}; lower train.lr?)",
                        done + 1
                    )));
                }
                tracing::warn!(
                    step = done + 1,
                    loss,
                    in_a_row = nonfinite_in_a_row,
                    "the loss or the gradients are not finite: step skipped (no update), batch consumed"
                );
                continue;
            }
            Some(Ok(s)) => {
                nonfinite_in_a_row = 0;
                Some(s)
            }
            None => None,
        };
        // A batch whose every sample was skipped as undecodable (data.on_bad_sample =
        // "skip") is passed over; the cursor moves past it.
        let Some((stats, global_examples)) = stepped else {
            empty_in_a_row += 1;
            ensure!(
                ranks.is_none() || empty_in_a_row * global < data_len,
                "{empty_in_a_row} global batches in a row ({} samples, the dataset has {data_len}) had no decodable sample: the data is unreadable (see the skipped samples above)",
                empty_in_a_row * global
            );
            tracing::warn!(
                epoch = cursor.epoch,
                position = cursor.position,
                "a batch had no decodable sample; taking the next"
            );
            continue;
        };
        empty_in_a_row = 0;
        if let Some(l) = ledger {
            l.record(&StepRecord {
                generation,
                rank: rank as u32,
                world_size: world as u32,
                step: done + 1,
                dataset_len: Some(data_len as u64),
                draws: ledger::entries(&b.draws),
                unused: std::mem::take(&mut unused),
            })?;
        }
        metrics::histogram!("ddpm_train_step_seconds", "rank" => rank_label.clone())
            .record(step_start.elapsed().as_secs_f64());
        window_global += global_examples;
        window_images += examples;
        done += 1;
        observer.stepped(done);
        if done.is_multiple_of(cfg.train.log_every as u64) || done == total {
            let loss = stats.loss.double_value(&[]);
            let window_secs = window_start.elapsed().as_secs_f64();
            let spent = ranks
                .as_ref()
                .map_or(Duration::ZERO, |r| r.exchange.spent());
            let line = LogLine {
                step: done,
                loss,
                grad_norm: stats.grad_norm.double_value(&[]),
                lr: stats.lr,
                images_per_second: window_images as f64 / window_secs,
                data_wait_fraction: (loader.waited() - window_wait).as_secs_f64() / window_secs,
                allreduce_seconds: (spent - window_allreduce).as_secs_f64(),
                cursor: cursor.clone(),
            };
            if !loss.is_finite() {
                diverged(observer, rank, done - 1, loss);
            }
            ensure!(
                loss.is_finite(),
                "step {done}: the loss is {loss}; stopping (lower train.lr?)"
            );
            if let Some(log) = log.as_mut() {
                let json = serde_json::json!({"step": done, "loss": loss, "grad_norm": line.grad_norm,
                    "lr": line.lr, "images_per_second": window_global as f64 / window_secs,
                    "data_wait_fraction": line.data_wait_fraction, "allreduce_seconds": line.allreduce_seconds,
                    "world_size": world, "epoch": cursor.epoch});
                writeln!(log, "{json}").context("writing train_log.jsonl")?;
            }
            observer.logged(&line);
            outcome.last = Some(line);
            window_start = Instant::now();
            window_images = 0;
            window_global = 0;
            window_wait = loader.waited();
            window_allreduce = spent;
        }
        let every = cfg.checkpoint.every_steps as u64;
        if let Some(ck) = checkpoints {
            if (every > 0 && done.is_multiple_of(every)) || done == total {
                // Never checkpoint a diverged state that a resume would then continue from.
                let loss = stats.loss.double_value(&[]);
                if !loss.is_finite() {
                    diverged(observer, rank, done - 1, loss);
                }
                ensure!(
                    loss.is_finite(),
                    "step {done}: the loss is {loss}; not checkpointing this state, stopping (lower train.lr?)"
                );
                outcome.checkpoint_stall += ck.submit(trainer, &cursor, &data_order, cfg, world);
                outcome.submitted = Some(done);
            }
        }
        let snap = cfg.train.snapshot_every as u64;
        if lead && snap > 0 && done.is_multiple_of(snap) && done != total {
            save_weights(trainer, &out, cfg)?;
        }
    }
    // Stop the loader's threads and drop its shard cache before the caller samples or exits.
    drop(loader);
    if lead {
        save_weights(trainer, &out, cfg)?;
        tracing::info!(dir = %out.display(), "wrote ema.safetensors, model.safetensors, config.toml");
    }
    outcome.cursor = cursor;
    Ok(outcome)
}
