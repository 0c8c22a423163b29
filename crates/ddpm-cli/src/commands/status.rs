//! `ddpm status --coordinator URL [--watch [SECS]]`: where a run stands, from the
//! coordinator's Status RPC, as a table.

use anyhow::{Context, Result};
use clap::Args;
use ddpm_proto::v1::coordinator_client::CoordinatorClient;
use ddpm_proto::v1::{RunState, StatusRequest, StatusResponse};
use std::fmt::Write as _;
use std::io::Write as _;
use std::time::Duration;

/// Arguments of `ddpm status`.
#[derive(Args, Debug)]
pub struct StatusArgs {
    /// The coordinator, e.g. http://10.0.0.5:50051 (https:// when it serves TLS).
    #[arg(long, value_name = "URL")]
    pub coordinator: String,
    /// Refresh every SECS seconds (default 2) until interrupted, redrawing the screen on a
    /// terminal.
    #[arg(long, value_name = "SECS", num_args = 0..=1, default_missing_value = "2")]
    pub watch: Option<f64>,
    #[command(flatten)]
    pub security: ddpm_auth::ClientArgs,
}

/// Runs `ddpm status`.
pub fn run(a: StatusArgs) -> Result<()> {
    let every = a
        .watch
        .map(|s| {
            Duration::try_from_secs_f64(s)
                .ok()
                .filter(|d| !d.is_zero())
                .with_context(|| format!("--watch {s}: expected seconds > 0"))
        })
        .transpose()?;
    let security = a.security.security()?;
    let endpoint = security
        .endpoint(&a.coordinator)
        .with_context(|| format!("--coordinator {}", a.coordinator))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stdout());
    loop {
        let answer = rt.block_on(async {
            let channel = endpoint
                .connect()
                .await
                .with_context(|| format!("connecting to the coordinator at {}", a.coordinator))?;
            let mut client = CoordinatorClient::new(security.authorize(channel))
                .max_decoding_message_size(ddpm_auth::MAX_RESPONSE_BYTES);
            let status = client
                .status(StatusRequest {})
                .await
                .map_err(|s| {
                    anyhow::anyhow!(
                        "the coordinator at {} answered Status with {:?}: {}",
                        a.coordinator,
                        s.code(),
                        s.message()
                    )
                })?
                .into_inner();
            anyhow::Ok(status)
        });
        let Some(every) = every else {
            print!("{}", render(&answer?, now_millis()));
            return Ok(());
        };
        let text = match answer {
            Ok(s) => render(&s, now_millis()),
            // Watching goes on through a coordinator restart.
            Err(e) => format!("{e:#}\n"),
        };
        let mut out = std::io::stdout().lock();
        if terminal {
            // Clear the screen and go home, then draw.
            write!(out, "\x1b[2J\x1b[H")?;
        }
        write!(out, "{text}")?;
        if !terminal {
            writeln!(out)?;
        }
        out.flush()?;
        drop(out);
        std::thread::sleep(every);
    }
}

fn now_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn state_name(state: i32) -> &'static str {
    match RunState::try_from(state) {
        Ok(RunState::Waiting) => "waiting for workers",
        Ok(RunState::Running) => "running",
        Ok(RunState::Reforming) => "re-forming",
        Ok(RunState::Finished) => "finished",
        Ok(RunState::Failed) => "failed",
        _ => "unknown",
    }
}

/// `ms` milliseconds as "850ms", "12.3s", "4m05s", "2h03m".
fn ago(ms: u64) -> String {
    let s = ms / 1000;
    match ms {
        0..1000 => format!("{ms}ms"),
        1000..60_000 => format!("{:.1}s", ms as f64 / 1000.0),
        60_000..3_600_000 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s / 60) % 60),
    }
}

/// The table: the run, then one line per member.
pub fn render(s: &StatusResponse, now_ms: u64) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "run {}  {}  generation {}  step {}/{}  {:.1} images/s  {} of {} workers",
        s.run_name,
        state_name(s.state),
        s.generation,
        s.step,
        s.total_steps,
        s.images_per_second,
        s.members.len(),
        s.world_size
    );
    let checkpoint = if s.last_checkpoint_step == 0 && s.last_checkpoint_unix_millis == 0 {
        "none yet".to_string()
    } else if s.last_checkpoint_unix_millis == 0 {
        format!(
            "step {} (from before this coordinator)",
            s.last_checkpoint_step
        )
    } else {
        format!(
            "step {}, {} ago",
            s.last_checkpoint_step,
            ago(now_ms.saturating_sub(s.last_checkpoint_unix_millis))
        )
    };
    let fid = match &s.last_eval {
        Some(e) if e.is_mean.is_finite() => format!(
            "FID {:.2} at step {} (IS {:.2} ± {:.2})",
            e.fid, e.step, e.is_mean, e.is_std
        ),
        Some(e) => format!("FID {:.2} at step {}", e.fid, e.step),
        None => "none yet".to_string(),
    };
    let _ = writeln!(out, "last checkpoint: {checkpoint}   last FID: {fid}");
    let rows: Vec<[String; 7]> = s
        .members
        .iter()
        .map(|m| {
            [
                m.rank.to_string(),
                m.host.clone(),
                m.device.clone(),
                m.step.to_string(),
                format!("{:.4}", m.loss),
                format!("{:.1}", m.images_per_second),
                format!("{} ago", ago(m.millis_since_heartbeat)),
            ]
        })
        .collect();
    let header = [
        "RANK",
        "HOST",
        "DEVICE",
        "STEP",
        "LOSS",
        "IMAGES/S",
        "LAST HEARTBEAT",
    ];
    let widths: Vec<usize> = (0..header.len())
        .map(|i| {
            rows.iter()
                .map(|r| r[i].chars().count())
                .chain([header[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: Vec<&str>| {
        let mut l = String::new();
        for (i, c) in cells.iter().enumerate() {
            let _ = write!(l, "{c:<w$}  ", w = widths[i]);
        }
        l.trim_end().to_string()
    };
    let _ = writeln!(out, "{}", line(header.to_vec()));
    for r in &rows {
        let _ = writeln!(out, "{}", line(r.iter().map(String::as_str).collect()));
    }
    if rows.is_empty() {
        let _ = writeln!(out, "(no worker holds a lease)");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use ddpm_proto::v1::{EvalSummary, MemberStatus};

    #[test]
    fn the_table_shows_the_run_every_member_the_checkpoint_and_the_fid() {
        let s = StatusResponse {
            run_name: "church".into(),
            state: RunState::Running as i32,
            world_size: 2,
            generation: 3,
            step: 1200,
            total_steps: 5000,
            last_checkpoint_step: 1000,
            members: vec![
                MemberStatus {
                    rank: 0,
                    host: "gpu-node-a".into(),
                    device: "cuda:0".into(),
                    millis_since_heartbeat: 850,
                    step: 1200,
                    images_per_second: 61.25,
                    loss: 0.04213,
                    ..Default::default()
                },
                MemberStatus {
                    rank: 1,
                    host: "b".into(),
                    device: "cuda:0".into(),
                    millis_since_heartbeat: 12_300,
                    step: 1201,
                    images_per_second: 60.0,
                    loss: 0.05,
                    ..Default::default()
                },
            ],
            protocol_version: 1,
            images_per_second: 121.25,
            last_checkpoint_unix_millis: 1_000_000,
            last_eval: Some(EvalSummary {
                step: 1000,
                fid: 23.456,
                is_mean: 3.21,
                is_std: 0.1,
            }),
        };
        let text = render(&s, 1_000_000 + 245_000);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "run church  running  generation 3  step 1200/5000  121.2 images/s  2 of 2 workers"
        );
        assert_eq!(
            lines[1],
            "last checkpoint: step 1000, 4m05s ago   last FID: FID 23.46 at step 1000 (IS 3.21 ± 0.10)"
        );
        assert_eq!(
            lines[2],
            "RANK  HOST        DEVICE  STEP  LOSS    IMAGES/S  LAST HEARTBEAT"
        );
        assert_eq!(
            lines[3],
            "0     gpu-node-a  cuda:0  1200  0.0421  61.2      850ms ago"
        );
        assert_eq!(
            lines[4],
            "1     b           cuda:0  1201  0.0500  60.0      12.3s ago"
        );
        let empty = render(&StatusResponse::default(), 0);
        assert!(
            empty.contains("last checkpoint: none yet   last FID: none yet")
                && empty.contains("(no worker holds a lease)"),
            "{empty}"
        );
    }
}
