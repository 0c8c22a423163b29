//! The data ledger, a test mode (`worker --ledger DIR`, `ddpm launch --ledger DIR`): every
//! rank records which samples it consumed at each step, and [`check`] proves from those
//! records that, across failures and restarts, every sample of every completed epoch was
//! consumed exactly once in the surviving history of the run.
//!
//! # What is written
//!
//! Each process appends JSON lines to its own file,
//! `DIR/ledger-rank<R>-<member id>.jsonl` (the member id with every character outside
//! `[A-Za-z0-9._-]` replaced by `_`), so ranks never share a file. One line per step the
//! loop *applied* (step `S` is the update that took the model from step `S - 1` to `S`):
//!
//! ```text
//! {"generation":G,"rank":R,"world_size":W,"step":S,"dataset_len":N,
//!  "draws":[[epoch,position,index],...],"unused":[[epoch,position,index],...]}
//! ```
//!
//! (one line each, keys in any order).
//!
//! `draws` are this rank's rows that were trained on. `unused` (left out when empty) are
//! samples this rank was dealt and consumed since its previous record without training on
//! them: samples skipped as undecodable (`data.on_bad_sample = "skip"`), and every sample of
//! a batch whose update was not applied (a non-finite loss or gradients, or a global batch
//! with no decodable sample). Those batches do not advance the step counter, so they get no
//! line of their own: recording them under the next applied step keeps one line per rank and
//! step, and keeps the data stream contiguous, so that the check can still account for
//! every position. A run that stops before the next applied step loses them with the rest
//! of its unfinished work (the next generation redoes it from a checkpoint).
//!
//! Each line is written with one `write` call on an unbuffered file as soon as the step is
//! applied, before anything else of the step (log, checkpoint). A process killed mid-write
//! leaves a torn last line: the reader ignores it (and counts it), and [`Ledger::open`]
//! cuts it off if the same file is opened again. A rank killed after the all-reduce of a
//! step but before its line is written leaves that step without its record; that is
//! harmless at the end of a generation that a later one redoes, and anywhere else the
//! check reports the missing rank.
//!
//! # What is checked
//!
//! See [`check`].

use crate::error::{Context, Result, WorkerError};
use ddpm_data::epoch::Draw;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

/// A draw as the ledger writes it: `(epoch, position, index)`.
pub type Entry = (u64, u64, u32);

/// `draws` as ledger entries.
pub fn entries(draws: &[Draw]) -> Vec<Entry> {
    draws
        .iter()
        .map(|d| (d.epoch, d.position, d.index))
        .collect()
}

/// One rank's record of one applied step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepRecord {
    /// The coordinator's generation the step was trained in (0 for one process).
    pub generation: u64,
    /// The rank that wrote it.
    pub rank: u32,
    /// The number of ranks in that generation.
    pub world_size: u32,
    /// The step applied (1-based: the model's step counter after it).
    pub step: u64,
    /// Samples in an epoch (`None` only in hand-written ledgers).
    pub dataset_len: Option<u64>,
    /// This rank's rows that were trained on.
    pub draws: Vec<Entry>,
    /// Samples consumed since this rank's previous record without training on them (see the
    /// module docs).
    pub unused: Vec<Entry>,
}

fn json_entries(v: &[Entry]) -> serde_json::Value {
    serde_json::Value::Array(
        v.iter()
            .map(|&(e, p, i)| serde_json::json!([e, p, i]))
            .collect(),
    )
}

impl StepRecord {
    /// The record as one JSON line (without the newline).
    pub fn to_json(&self) -> String {
        let mut o = serde_json::json!({
            "generation": self.generation,
            "rank": self.rank,
            "world_size": self.world_size,
            "step": self.step,
            "draws": json_entries(&self.draws),
        });
        if let Some(n) = self.dataset_len {
            o["dataset_len"] = n.into();
        }
        if !self.unused.is_empty() {
            o["unused"] = json_entries(&self.unused);
        }
        o.to_string()
    }

    /// Parses one line; the error says which field is missing or malformed.
    pub fn parse(line: &str) -> std::result::Result<Self, String> {
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| e.to_string())?;
        let int = |key: &str| -> std::result::Result<u64, String> {
            v.get(key)
                .and_then(|x| x.as_u64())
                .ok_or_else(|| format!("\"{key}\" is missing or not a non-negative integer"))
        };
        let list = |key: &str, required: bool| -> std::result::Result<Vec<Entry>, String> {
            let Some(x) = v.get(key) else {
                return match required {
                    true => Err(format!("\"{key}\" is missing")),
                    false => Ok(Vec::new()),
                };
            };
            let bad = || format!("\"{key}\" must be a list of [epoch, position, index]");
            x.as_array()
                .ok_or_else(bad)?
                .iter()
                .map(|t| match t.as_array().map(|t| t.as_slice()) {
                    Some([e, p, i]) => match (e.as_u64(), p.as_u64(), i.as_u64()) {
                        (Some(e), Some(p), Some(i)) if i <= u32::MAX as u64 => Ok((e, p, i as u32)),
                        _ => Err(bad()),
                    },
                    _ => Err(bad()),
                })
                .collect()
        };
        let small = |key: &str| -> std::result::Result<u32, String> {
            u32::try_from(int(key)?).map_err(|_| format!("\"{key}\" is too large"))
        };
        Ok(Self {
            generation: int("generation")?,
            rank: small("rank")?,
            world_size: small("world_size")?,
            step: int("step")?,
            dataset_len: match v.get("dataset_len") {
                None => None,
                Some(_) => Some(int("dataset_len")?),
            },
            draws: list("draws", true)?,
            unused: list("unused", false)?,
        })
    }
}

/// The ledger file of one process: see the module docs.
#[derive(Debug)]
pub struct Ledger {
    path: PathBuf,
    file: File,
}

/// `member_id` with every character outside `[A-Za-z0-9._-]` replaced by `_`.
fn sanitise(member_id: &str) -> String {
    member_id
        .chars()
        .map(|c| match c {
            'A'..='Z' | 'a'..='z' | '0'..='9' | '.' | '_' | '-' => c,
            _ => '_',
        })
        .collect()
}

impl Ledger {
    /// Creates `dir` if needed and opens `dir/ledger-rank<rank>-<member id>.jsonl` for
    /// appending. A torn last line (from a process killed mid-write that had the same file)
    /// is cut off first, so that every later record starts on a line of its own.
    pub fn open(dir: &Path, rank: u32, member_id: &str) -> Result<Self> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the ledger directory {}", dir.display()))?;
        let path = dir.join(format!("ledger-rank{rank}-{}.jsonl", sanitise(member_id)));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("opening the ledger {}", path.display()))?;
        let old = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        if !old.is_empty() && !old.ends_with(b"\n") {
            let keep = old.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
            file.set_len(keep as u64)
                .with_context(|| format!("cutting the torn last line of {}", path.display()))?;
            tracing::warn!(ledger = %path.display(), "cut off a torn last line");
        }
        Ok(Self { path, file })
    }

    /// The file written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `record` as one line, written at once to the unbuffered file: when this
    /// returns the line is the kernel's, so it survives the process being killed (not a
    /// crash of the machine: there is no fsync).
    pub fn record(&self, record: &StepRecord) -> Result<()> {
        let mut line = record.to_json();
        line.push('\n');
        (&self.file)
            .write_all(line.as_bytes())
            .with_context(|| format!("writing step {} to {}", record.step, self.path.display()))
    }
}

/// What [`check`] found: the ledger is consistent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LedgerReport {
    /// Ledger files read.
    pub files: usize,
    /// Records read (torn lines not counted).
    pub records: usize,
    /// Samples in an epoch.
    pub dataset_len: u64,
    /// Steps in the surviving history (it holds steps 1..=steps).
    pub steps: u64,
    /// Epochs in which every sample was consumed exactly once.
    pub completed_epochs: u64,
    /// Samples of the epoch after the completed ones consumed so far (each at most once).
    pub partial_epoch_samples: u64,
    /// Samples consumed in the surviving history without being trained on (undecodable, or
    /// in a batch whose update was not applied).
    pub unused_samples: u64,
    /// Every generation with a record, ascending.
    pub generations: Vec<u64>,
    /// The generations the surviving history is made of, ascending.
    pub history_generations: Vec<u64>,
    /// Records overridden by a later generation that redid their steps.
    pub discarded_records: usize,
    /// Torn last lines ignored (a process killed while writing).
    pub torn_lines: usize,
}

impl fmt::Display for LedgerReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = |g: &[u64]| {
            g.iter()
                .map(|g| g.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        };
        writeln!(
            f,
            "ledger ok: steps 1..={} with every rank's record, {} completed epoch(s) of {} samples each consumed exactly once, {} sample(s) of the next epoch consumed once",
            self.steps, self.completed_epochs, self.dataset_len, self.partial_epoch_samples
        )?;
        writeln!(
            f,
            "{} record(s) in {} file(s); generations seen: {}; surviving history from generation(s) {}; {} record(s) discarded (redone by a later generation); {} torn last line(s) ignored",
            self.records,
            self.files,
            list(&self.generations),
            list(&self.history_generations),
            self.discarded_records,
            self.torn_lines
        )?;
        write!(
            f,
            "{} sample(s) consumed without training (undecodable, or in a step whose update was not applied)",
            self.unused_samples
        )
    }
}

fn violation(msg: String) -> WorkerError {
    WorkerError::Invalid(format!("data ledger: {msg}"))
}

/// A record and the file it came from.
struct Found {
    record: StepRecord,
    file: String,
    line: usize,
}

/// Reads every `ledger-*.jsonl` of `dir`. Returns the records and the torn last lines.
fn read_dir(dir: &Path) -> Result<(Vec<Found>, usize, usize)> {
    let mut paths = Vec::new();
    for e in std::fs::read_dir(dir)
        .with_context(|| format!("reading the ledger directory {}", dir.display()))?
    {
        let e = e.with_context(|| format!("reading the ledger directory {}", dir.display()))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("ledger-") && name.ends_with(".jsonl") {
            paths.push(e.path());
        }
    }
    paths.sort();
    let (mut out, mut torn) = (Vec::new(), 0);
    for path in &paths {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let text = String::from_utf8_lossy(&bytes);
        let complete = text.ends_with('\n');
        let lines: Vec<&str> = text.split_terminator('\n').collect();
        for (k, line) in lines.iter().enumerate() {
            match StepRecord::parse(line) {
                Ok(record) => out.push(Found {
                    record,
                    file: path.display().to_string(),
                    line: k + 1,
                }),
                // Written in one call, a line ends with its newline; one without is the
                // write a killed process did not finish.
                Err(_) if k + 1 == lines.len() && !complete => torn += 1,
                Err(e) => {
                    return Err(violation(format!(
                        "{} line {}: not a ledger record: {e}",
                        path.display(),
                        k + 1
                    )))
                }
            }
        }
    }
    Ok((out, paths.len(), torn))
}

/// Checks the ledger in `dir` (the files of every process of the run) and reports what it
/// holds; an error names the first violation found.
///
/// `dataset_len` is the number of samples in an epoch; `None` takes it from the records
/// (every record the worker writes carries it), and either way every record must agree.
///
/// 1. Every line parses, except that a torn last line of a file (no newline) is ignored and
///    counted. Each record has `rank < world_size`, `step >= 1`, positions below the
///    dataset's length, and no rank records a step twice in one generation.
/// 2. The surviving history: generations are taken in ascending order, and each one
///    replaces every step from its first recorded step on (a later generation restarts from
///    a checkpoint and redoes the steps after it, so whatever an earlier generation did
///    from there on did not survive, even steps the later one never reached). Whenever each
///    generation gets at least as far as the one before, this is the same as taking each
///    step from the highest generation that recorded it. The replaced records are counted
///    as discarded.
/// 3. The history holds steps 1..=last without a gap (the error names the first missing
///    step). Each step has a record from every rank `0..W-1` of its generation's world size
///    `W` (all its records must agree on `W`; the error names the step, the generation and
///    the missing ranks), and its ranks' samples (`draws` and `unused`) are disjoint.
/// 4. Every completed epoch (every epoch before the last one seen, and the last one if
///    all `dataset_len` of its positions were consumed) holds every index
///    `0..dataset_len` exactly once (the error names the epoch, the first index consumed
///    twice and the steps, and the first index never consumed). No epoch holds an index
///    twice.
/// 5. Read in step order, the samples are the stream of epochs without a hole or a repeat:
///    step 1 starts at epoch 0 position 0, and every step's samples (all ranks', sorted by
///    epoch and position) continue exactly where the previous step's ended, positions
///    running `0..dataset_len` within each epoch.
pub fn check(dir: &Path, dataset_len: Option<usize>) -> Result<LedgerReport> {
    let (reads, files, torn_lines) = read_dir(dir)?;
    if reads.is_empty() {
        return Err(violation(format!(
            "no records in {} ({files} ledger file(s))",
            dir.display()
        )));
    }
    let mut report = LedgerReport {
        files,
        records: reads.len(),
        torn_lines,
        ..LedgerReport::default()
    };
    // The dataset's length: given, or every record's.
    let n = match dataset_len {
        Some(n) => n as u64,
        None => reads
            .iter()
            .find_map(|r| r.record.dataset_len)
            .ok_or_else(|| {
                violation("no record says the dataset's length; give it (--dataset-len)".into())
            })?,
    };
    if n == 0 {
        return Err(violation("the dataset's length is 0".into()));
    }
    report.dataset_len = n;
    for r in &reads {
        let (rec, at) = (&r.record, format!("{} line {}", r.file, r.line));
        if let Some(m) = rec.dataset_len.filter(|&m| m != n) {
            return Err(violation(format!(
                "{at}: the record says the dataset has {m} samples, expected {n}"
            )));
        }
        if rec.rank >= rec.world_size || rec.step == 0 {
            return Err(violation(format!(
                "{at}: rank {} of world size {} at step {} (ranks are 0..world size, steps start at 1)",
                rec.rank, rec.world_size, rec.step
            )));
        }
        if let Some(&(e, p, i)) = rec
            .draws
            .iter()
            .chain(&rec.unused)
            .find(|&&(_, p, i)| p >= n || i as u64 >= n)
        {
            return Err(violation(format!(
                "{at}: step {} has epoch {e} position {p} index {i}, outside a dataset of {n} samples",
                rec.step
            )));
        }
    }
    // generation -> step -> rank -> the record.
    let mut by_gen: BTreeMap<u64, BTreeMap<u64, BTreeMap<u32, &Found>>> = BTreeMap::new();
    for r in &reads {
        let rec = &r.record;
        let ranks = by_gen
            .entry(rec.generation)
            .or_default()
            .entry(rec.step)
            .or_default();
        if let Some(first) = ranks.insert(rec.rank, r) {
            // Two processes in one generation: the generations cannot order their histories.
            let hint = if first.file != r.file {
                " (two processes held the rank in one generation: was the coordinator restarted? its generations must keep counting up for the ledger to tell the histories apart)"
            } else {
                ""
            };
            return Err(violation(format!(
                "rank {} recorded step {} twice in generation {}: {} line {} and {} line {}{hint}",
                rec.rank, rec.step, rec.generation, first.file, first.line, r.file, r.line
            )));
        }
    }
    report.generations = by_gen.keys().copied().collect();
    // The surviving history: step -> generation.
    let mut history: BTreeMap<u64, u64> = BTreeMap::new();
    for (&g, steps) in &by_gen {
        let from = *steps.keys().next().expect("a generation has a step");
        history.retain(|&s, _| s < from);
        history.extend(steps.keys().map(|&s| (s, g)));
    }
    let kept: usize = history.iter().map(|(s, g)| by_gen[g][s].len()).sum();
    report.discarded_records = reads.len() - kept;
    report.history_generations = history
        .values()
        .copied()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let last = *history.keys().next_back().expect("records exist");
    if let Some(missing) = (1..=last).find(|s| !history.contains_key(s)) {
        return Err(violation(format!(
            "step {missing} is missing: no generation recorded it, and the history goes on to step {last}"
        )));
    }
    report.steps = last;
    // Per step: every rank, and all its samples sorted by (epoch, position).
    let mut stream: Vec<(u64, Vec<Entry>)> = Vec::with_capacity(last as usize);
    for (&s, &g) in &history {
        let ranks = &by_gen[&g][&s];
        let world = ranks
            .values()
            .next()
            .expect("a step has a record")
            .record
            .world_size;
        if let Some(r) = ranks.values().find(|r| r.record.world_size != world) {
            return Err(violation(format!(
                "step {s} of generation {g}: rank {} says world size {}, rank {} says {world}",
                r.record.rank,
                r.record.world_size,
                ranks.keys().next().expect("a rank")
            )));
        }
        let missing: Vec<u32> = (0..world).filter(|r| !ranks.contains_key(r)).collect();
        if !missing.is_empty() {
            return Err(violation(format!(
                "step {s} of generation {g}: no record from rank(s) {missing:?} of world size {world}"
            )));
        }
        let mut samples: Vec<(Entry, u32)> = ranks
            .iter()
            .flat_map(|(&rank, r)| {
                r.record
                    .draws
                    .iter()
                    .chain(&r.record.unused)
                    .map(move |&d| (d, rank))
            })
            .collect();
        report.unused_samples += ranks
            .values()
            .map(|r| r.record.unused.len() as u64)
            .sum::<u64>();
        samples.sort_unstable();
        for w in samples.windows(2) {
            let (((e, p, _), a), ((e2, p2, _), b)) = (w[0], w[1]);
            if (e, p) == (e2, p2) {
                return Err(violation(format!(
                    "step {s} of generation {g}: epoch {e} position {p} was dealt to rank {a} and to rank {b}"
                )));
            }
        }
        stream.push((s, samples.into_iter().map(|(d, _)| d).collect()));
    }
    // Every completed epoch holds each index exactly once.
    let last_epoch = stream
        .iter()
        .flat_map(|(_, d)| d.iter().map(|&(e, _, _)| e))
        .max()
        .unwrap_or(0);
    // epoch -> (its positions consumed, index -> the steps that consumed it).
    type Epoch = (BTreeSet<u64>, BTreeMap<u32, Vec<u64>>);
    let mut epochs: BTreeMap<u64, Epoch> = BTreeMap::new();
    for (s, samples) in &stream {
        for &(e, p, i) in samples {
            let (positions, indices) = epochs.entry(e).or_default();
            positions.insert(p);
            indices.entry(i).or_default().push(*s);
        }
    }
    for e in 0..=last_epoch {
        let (positions, indices) = epochs.remove(&e).unwrap_or_default();
        let complete = e < last_epoch || positions.len() as u64 == n;
        let twice = indices.iter().find(|(_, steps)| steps.len() > 1);
        let never = (0..n as u32).find(|i| !indices.contains_key(i));
        match (twice, complete.then_some(never).flatten()) {
            (None, None) => {}
            (twice, never) => {
                let mut what = Vec::new();
                if let Some((i, steps)) = twice {
                    what.push(format!(
                        "index {i} was consumed {} times (steps {})",
                        steps.len(),
                        steps
                            .iter()
                            .map(|s| s.to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ));
                }
                if let Some(i) = never {
                    what.push(format!("index {i} was never consumed"));
                }
                let kind = if complete { "completed " } else { "" };
                return Err(violation(format!(
                    "{kind}epoch {e}: {}",
                    what.join(" and ")
                )));
            }
        }
        if complete {
            report.completed_epochs += 1;
        } else {
            report.partial_epoch_samples = positions.len() as u64;
        }
    }
    // The stream of epochs, in step order, without a hole or a repeat.
    let mut next = (0u64, 0u64);
    for (s, samples) in &stream {
        for &(e, p, i) in samples {
            if (e, p) != next {
                let how = if (e, p) > next { "missing" } else { "repeated" };
                return Err(violation(format!(
                    "step {s} (generation {}): expected epoch {} position {} next, found epoch {e} position {p} (index {i}): samples are {how}",
                    history[s], next.0, next.1
                )));
            }
            next = if p + 1 == n { (e + 1, 0) } else { (e, p + 1) };
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ddpm_data::epoch::{Cursor, Order};

    const N: usize = 10;
    const BATCH: usize = 4;
    const SEED: u64 = 7;

    /// What rank `rank` of `world` records at steps `steps` of `generation`, dealt as the
    /// loader deals them (every rank's cursor at the start of `steps`).
    fn records(
        generation: u64,
        world: u32,
        steps: std::ops::RangeInclusive<u64>,
    ) -> Vec<StepRecord> {
        let order = Order::Uniform(N);
        let mut cursor = Cursor::default();
        let mut out = Vec::new();
        for step in 1..=*steps.end() {
            let global = cursor.next_draws(&order, BATCH, SEED);
            if !steps.contains(&step) {
                continue;
            }
            for rank in 0..world {
                let rows = ddpm_config::rank_rows(BATCH, world as usize, rank as usize);
                out.push(StepRecord {
                    generation,
                    rank,
                    world_size: world,
                    step,
                    dataset_len: Some(N as u64),
                    draws: entries(&global[rows]),
                    unused: Vec::new(),
                });
            }
        }
        out
    }

    /// Writes `records` through [`Ledger`], one file per (generation, rank) as one process
    /// each would.
    fn write(dir: &Path, records: &[StepRecord]) {
        let mut ledgers: BTreeMap<(u64, u32), Ledger> = BTreeMap::new();
        for r in records {
            let l = ledgers.entry((r.generation, r.rank)).or_insert_with(|| {
                Ledger::open(dir, r.rank, &format!("host:{}:{}", r.generation, r.rank)).unwrap()
            });
            l.record(r).unwrap();
        }
    }

    fn checked(records: &[StepRecord]) -> Result<LedgerReport> {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), records);
        check(dir.path(), Some(N))
    }

    fn violation_of(records: &[StepRecord]) -> String {
        match checked(records) {
            Ok(r) => panic!("the check passed: {r}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn a_clean_single_generation_history_passes() {
        // 6 steps of 4 over 10 samples: epochs 0 and 1 complete, 4 of epoch 2.
        let r = checked(&records(1, 2, 1..=6)).unwrap();
        assert_eq!(r.steps, 6);
        assert_eq!(r.completed_epochs, 2);
        assert_eq!(r.partial_epoch_samples, 4);
        assert_eq!(r.records, 12);
        assert_eq!(r.files, 2);
        assert_eq!(r.generations, vec![1]);
        assert_eq!(r.discarded_records, 0);
        assert_eq!((r.torn_lines, r.unused_samples), (0, 0));
        // The length recorded with every line serves when none is given.
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), &records(1, 3, 1..=5));
        let r = check(dir.path(), None).unwrap();
        assert_eq!((r.dataset_len, r.steps, r.completed_epochs), (10, 5, 2));
        let err = check(dir.path(), Some(11)).unwrap_err().to_string();
        assert!(
            err.contains("the dataset has 10 samples, expected 11"),
            "{err}"
        );
    }

    #[test]
    fn a_later_generation_redoing_steps_overrides_the_earlier_ones() {
        // Generation 1 (2 ranks) ran steps 1..=8 and failed; generation 2 (3 ranks)
        // restarted from the checkpoint of step 5 and ran 6..=10.
        let mut all = records(1, 2, 1..=8);
        all.extend(records(2, 3, 6..=10));
        let r = checked(&all).unwrap();
        assert_eq!(r.steps, 10);
        assert_eq!(r.completed_epochs, 4);
        assert_eq!(r.generations, vec![1, 2]);
        assert_eq!(r.history_generations, vec![1, 2]);
        assert_eq!(
            r.discarded_records,
            3 * 2,
            "generation 1's steps 6, 7 and 8"
        );
        assert_eq!(r.records, 16 + 15);
    }

    #[test]
    fn a_generation_that_restarts_earlier_discards_everything_after_its_start() {
        // Generation 2 redid 6..=8 and died; generation 3 restarted from step 5 again and
        // got only to step 6. Steps 7 and 8 of generations 1 and 2 did not survive.
        let mut all = records(1, 2, 1..=8);
        all.extend(records(2, 2, 6..=8));
        all.extend(records(3, 2, 6..=6));
        let r = checked(&all).unwrap();
        assert_eq!(r.steps, 6);
        assert_eq!(r.history_generations, vec![1, 3]);
        assert_eq!(r.discarded_records, 2 * 3 + 2 * 3);
        assert_eq!((r.completed_epochs, r.partial_epoch_samples), (2, 4));
    }

    #[test]
    fn a_sample_consumed_twice_is_named_with_its_epoch_and_steps() {
        let mut all = records(1, 2, 1..=3);
        // Step 2's rank 1 got the sample of step 1's rank 0 instead of its own.
        let dup = all[0].draws[0];
        let (e, p, replaced) = all[3].draws[0];
        all[3].draws[0] = (e, p, dup.2);
        let err = violation_of(&all);
        assert!(
            err.contains(&format!(
                "completed epoch 0: index {} was consumed 2 times (steps 1, 2) and index {replaced} was never consumed",
                dup.2
            )),
            "{err}"
        );
    }

    #[test]
    fn a_sample_never_consumed_is_named() {
        let mut all = records(1, 2, 1..=3);
        // Rank 1 of step 2 lost its last row.
        let (_, _, lost) = all[3].draws.pop().unwrap();
        let err = violation_of(&all);
        assert!(
            err.contains(&format!(
                "completed epoch 0: index {lost} was never consumed"
            )),
            "{err}"
        );
        // In an epoch that is not complete, the hole in the stream is named instead.
        let mut all = records(1, 2, 1..=2);
        all[1].draws.pop();
        let err = violation_of(&all);
        assert!(
            err.contains("step 2 (generation 1): expected epoch 0 position 3 next")
                && err.contains("missing"),
            "{err}"
        );
    }

    #[test]
    fn a_missing_rank_record_is_named() {
        let mut all = records(4, 3, 1..=4);
        all.retain(|r| !(r.step == 3 && r.rank == 1));
        let err = violation_of(&all);
        assert!(
            err.contains("step 3 of generation 4: no record from rank(s) [1] of world size 3"),
            "{err}"
        );
    }

    #[test]
    fn a_gap_in_the_steps_is_named() {
        let mut all = records(1, 2, 1..=6);
        all.retain(|r| r.step != 4);
        let err = violation_of(&all);
        assert!(
            err.contains("step 4 is missing") && err.contains("step 6"),
            "{err}"
        );
        // A restarted generation that starts after a gap does not hide it.
        let mut all = records(1, 2, 1..=3);
        all.extend(records(2, 2, 5..=6));
        let err = violation_of(&all);
        assert!(err.contains("step 4 is missing"), "{err}");
    }

    #[test]
    fn a_torn_last_line_is_ignored_and_counted_but_a_bad_line_elsewhere_fails() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), &records(1, 2, 1..=3));
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        // Rank 1 was killed while writing step 4.
        let torn = records(1, 2, 4..=4)[1].to_json();
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&files[1])
            .unwrap();
        f.write_all(&torn.as_bytes()[..torn.len() / 2]).unwrap();
        let r = check(dir.path(), Some(N)).unwrap();
        assert_eq!((r.steps, r.torn_lines, r.records), (3, 1, 6));
        // Reopened, the file loses the torn line and takes whole records again.
        let l = Ledger::open(dir.path(), 1, "host:1:1").unwrap();
        assert_eq!(l.path(), files[1]);
        let r = check(dir.path(), Some(N)).unwrap();
        assert_eq!((r.torn_lines, r.records), (0, 6));
        // A bad line that is not the last (or ends with a newline) is an error.
        let text = std::fs::read_to_string(&files[0]).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        std::fs::write(
            &files[0],
            format!(
                "{}\n{{\"generation\":1,\n{}\n",
                lines[0],
                lines[1..].join("\n")
            ),
        )
        .unwrap();
        let err = check(dir.path(), Some(N)).unwrap_err().to_string();
        assert!(
            err.contains(&format!(
                "{} line 2: not a ledger record",
                files[0].display()
            )),
            "{err}"
        );
    }

    #[test]
    fn unused_samples_keep_the_stream_whole_and_are_counted() {
        // Step 2's first batch was not applied (non-finite): both ranks carry its samples
        // as unused into the record of the step applied on the next batch.
        let order = Order::Uniform(N);
        let mut cursor = Cursor::default();
        let mut all = Vec::new();
        for (step, batches) in [(1u64, 1usize), (2, 2), (3, 1)] {
            let mut dealt = Vec::new();
            for _ in 0..batches {
                dealt.push(cursor.next_draws(&order, BATCH, SEED));
            }
            for rank in 0..2u32 {
                let rows = ddpm_config::rank_rows(BATCH, 2, rank as usize);
                let (last, before) = dealt.split_last().unwrap();
                all.push(StepRecord {
                    generation: 1,
                    rank,
                    world_size: 2,
                    step,
                    dataset_len: Some(N as u64),
                    draws: entries(&last[rows.clone()]),
                    unused: before
                        .iter()
                        .flat_map(|b| entries(&b[rows.clone()]))
                        .collect(),
                });
            }
        }
        let r = checked(&all).unwrap();
        assert_eq!((r.steps, r.unused_samples), (3, 4));
        assert_eq!((r.completed_epochs, r.partial_epoch_samples), (1, 6));
        // Without them epoch 0 lacks the four samples of the batch not applied.
        for r in &mut all {
            r.unused.clear();
        }
        let err = violation_of(&all);
        assert!(
            err.contains("completed epoch 0: index") && err.contains("never consumed"),
            "{err}"
        );
    }

    #[test]
    fn overlapping_ranks_and_a_rank_recording_a_step_twice_fail() {
        let mut all = records(1, 2, 1..=2);
        all[1].draws[0] = all[0].draws[0];
        let err = violation_of(&all);
        assert!(
            err.contains(
                "step 1 of generation 1: epoch 0 position 0 was dealt to rank 0 and to rank 1"
            ),
            "{err}"
        );
        let mut all = records(1, 2, 1..=2);
        let again = all[2].clone();
        all.push(again);
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), &all[..4]);
        Ledger::open(dir.path(), 0, "other")
            .unwrap()
            .record(&all[4])
            .unwrap();
        let err = check(dir.path(), Some(N)).unwrap_err().to_string();
        assert!(
            err.contains("rank 0 recorded step 2 twice in generation 1")
                && err.contains("was the coordinator restarted?"),
            "{err}"
        );
    }

    #[test]
    fn records_round_trip_and_file_names_are_sanitised() {
        let r = StepRecord {
            generation: 3,
            rank: 1,
            world_size: 2,
            step: 9,
            dataset_len: Some(32),
            draws: vec![(1, 4, 17), (1, 5, 2)],
            unused: vec![(1, 3, 8)],
        };
        let line = r.to_json();
        assert_eq!(StepRecord::parse(&line).unwrap(), r);
        let plain = r#"{"generation":1,"rank":0,"world_size":1,"step":1,"draws":[[0,0,3]]}"#;
        let p = StepRecord::parse(plain).unwrap();
        assert_eq!(
            (p.dataset_len, p.draws, p.unused),
            (None, vec![(0, 0, 3)], vec![])
        );
        let err =
            StepRecord::parse(r#"{"generation":1,"rank":0,"world_size":1,"step":1}"#).unwrap_err();
        assert!(err.contains("\"draws\" is missing"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let l = Ledger::open(&dir.path().join("new"), 2, "pod-1.example:42:17/x").unwrap();
        assert_eq!(
            l.path().file_name().unwrap(),
            "ledger-rank2-pod-1.example_42_17_x.jsonl"
        );
    }
}
