//! `ddpm`: train, inspect, sample from and convert DDPM models.

mod commands;
mod images;

use anyhow::Result;
use clap::{Parser, Subcommand};

/// Denoising Diffusion Probabilistic Models (Ho, Jain & Abbeel 2020) on libtorch.
#[derive(Parser, Debug)]
#[command(name = "ddpm", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log format on stderr (human, or one JSON object per event).
    #[arg(long, global = true, value_enum, default_value_t = ddpm_telemetry::LogFormat::Human)]
    log_format: ddpm_telemetry::LogFormat,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Train a model in this process (single device) and write weight snapshots.
    Train(commands::train::TrainArgs),
    /// Run a distributed training on this host: the coordinator and N workers as child
    /// processes (logs prefixed with role and rank), all stopped when one fails or on Ctrl-C.
    Launch(commands::launch::LaunchArgs),
    /// Show the U-Net of a config: parameter count and the shape of every block.
    Inspect(commands::inspect::InspectArgs),
    /// Generate images (ancestral sampling, Algorithm 2, or DDIM) and write a PNG grid.
    Sample(commands::sample::SampleArgs),
    /// Progressive generation: the predicted x_0 at evenly spaced steps (the paper's Fig. 6).
    Progressive(commands::sample::ProgressiveArgs),
    /// Interpolate two images in latent space (Sec. 4.4, Fig. 8).
    Interpolate(commands::sample::InterpolateArgs),
    /// Negative log-likelihood in bits/dim (the variational bound over all T terms + prior).
    Nll(commands::nll::NllArgs),
    /// Convert weights between this project's names and diffusers' UNet2DModel.
    Convert(commands::convert::ConvertArgs),
    /// Preprocess a dataset (LSUN LMDB, image folder, CIFAR-10, IDX) once into shards in an
    /// object store; train from it with `data.source = "shards:URL"`.
    Prepare(commands::prepare::PrepareArgs),
    /// Inception statistics (mu, sigma) of an image folder or dataset, as .npz or
    /// .safetensors, for `ddpm fid`.
    FidStats(commands::fid::FidStatsArgs),
    /// FID between two inputs: statistics files, image folders or datasets, in any mix.
    Fid(commands::fid::FidArgs),
    /// Checkpoints in object storage: ls, inspect, verify, export.
    #[command(subcommand)]
    Ckpt(commands::ckpt::CkptCommand),
    /// Where a distributed run stands: the run, its step and throughput, each worker, the
    /// last checkpoint and FID (from the coordinator; --watch refreshes).
    Status(commands::status::StatusArgs),
    /// Check a data ledger (`launch --ledger DIR`): every sample of every completed epoch
    /// consumed exactly once in the surviving history, across failures.
    Ledger(commands::ledger::LedgerArgs),
}

fn main() -> std::process::ExitCode {
    let tuned = ddpm_trainer::malloc::tune_for_training();
    let cli = Cli::parse();
    ddpm_telemetry::init_tracing(cli.log_format);
    if !tuned {
        tracing::debug!(
            "glibc malloc thresholds not set; training may fault its activations in every step"
        );
    }
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let log_format = cli.log_format;
    match cli.command {
        Command::Train(a) => commands::train::run(a),
        Command::Launch(a) => commands::launch::run(a, log_format),
        Command::Inspect(a) => commands::inspect::run(a),
        Command::Sample(a) => commands::sample::run_sample(a),
        Command::Progressive(a) => commands::sample::run_progressive(a),
        Command::Interpolate(a) => commands::sample::run_interpolate(a),
        Command::Nll(a) => commands::nll::run(a),
        Command::Convert(a) => commands::convert::run(a),
        Command::Ckpt(c) => commands::ckpt::run(c),
        Command::Prepare(a) => commands::prepare::run(a),
        Command::FidStats(a) => commands::fid::run_stats(a),
        Command::Fid(a) => commands::fid::run_fid(a),
        Command::Status(a) => commands::status::run(a),
        Command::Ledger(a) => commands::ledger::run(a),
    }
}
