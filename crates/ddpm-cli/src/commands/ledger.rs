//! `ddpm ledger DIR`: checks the data ledger a run wrote with `ddpm launch --ledger DIR`
//! (or `worker --ledger DIR`): every sample of every completed epoch consumed exactly once
//! in the surviving history, across failures and restarted generations.

use anyhow::{Context, Result};
use clap::Args;
use std::path::PathBuf;

/// Arguments of `ddpm ledger`.
#[derive(Args, Debug)]
pub struct LedgerArgs {
    /// The ledger directory (every process's `ledger-rank<R>-<member>.jsonl`).
    pub dir: PathBuf,
    /// Samples in an epoch. Default: the length every record carries (they must agree).
    #[arg(long, value_name = "N")]
    pub dataset_len: Option<usize>,
    /// Also fail unless the surviving history ends at step N (e.g. train.total_steps).
    #[arg(long, value_name = "N")]
    pub steps: Option<u64>,
}

/// Runs `ddpm ledger`: prints the report, or fails naming the first violation.
pub fn run(a: LedgerArgs) -> Result<()> {
    let report = ddpm_worker::ledger::check(&a.dir, a.dataset_len)
        .with_context(|| format!("checking the ledger in {}", a.dir.display()))?;
    println!("{report}");
    if let Some(steps) = a.steps {
        anyhow::ensure!(
            report.steps == steps,
            "the ledger's history ends at step {}, expected step {steps} (--steps)",
            report.steps
        );
    }
    Ok(())
}
