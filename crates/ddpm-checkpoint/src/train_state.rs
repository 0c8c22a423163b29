//! The `state.json` blob of a training checkpoint: the step and the data cursor a resumed run
//! (one process, or every rank of a distributed one) continues from. Written by the trainer
//! with more keys (seed, RNG scheme, world size); read here by everyone who resumes.

/// The blob of a checkpoint that holds the step and the data cursor.
pub const STATE_BLOB: &str = "state.json";

/// What a resumed run needs from `state.json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrainState {
    /// Completed updates.
    pub step: u64,
    /// Data cursor: the epoch.
    pub epoch: u64,
    /// Data cursor: samples of the epoch already dealt.
    pub position: u64,
    /// The order the cursor walks (`ddpm_data::epoch::Order::describe`); "uniform" for
    /// checkpoints written before the order was recorded.
    pub data_order: String,
}

impl TrainState {
    /// Parses the `state.json` of checkpoint `step`. The error names the key at fault and
    /// what was expected (the caller adds which checkpoint).
    pub fn parse(bytes: &[u8], step: u64) -> Result<Self, String> {
        let v: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| format!("not JSON: {e}"))?;
        let int = |key: &str| {
            v.get(key)
                .and_then(serde_json::Value::as_u64)
                .ok_or_else(|| {
                    format!(
                        "key `{key}`: expected a non-negative integer, got {}",
                        v.get(key).map_or("nothing".to_string(), |x| x.to_string())
                    )
                })
        };
        let state_step = int("step")?;
        if state_step != step {
            return Err(format!(
                "key `step`: {state_step}, but the checkpoint is step-{step}"
            ));
        }
        let data_order = match v.get("data_order") {
            None | Some(serde_json::Value::Null) => "uniform".to_string(),
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(other) => return Err(format!("key `data_order`: expected a string, got {other}")),
        };
        Ok(Self {
            step: state_step,
            epoch: int("epoch")?,
            position: int("position")?,
            data_order,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_read_and_a_bad_one_is_named() {
        let s = TrainState::parse(br#"{"step": 8, "epoch": 1, "position": 7, "seed": 0}"#, 8);
        assert_eq!(
            s.unwrap(),
            TrainState {
                step: 8,
                epoch: 1,
                position: 7,
                data_order: "uniform".into()
            }
        );
        let err = TrainState::parse(br#"{"step": 8, "epoch": 1}"#, 8).unwrap_err();
        assert!(
            err.contains("`position`") && err.contains("nothing"),
            "{err}"
        );
        let err = TrainState::parse(br#"{"step": 9, "epoch": 1, "position": 0}"#, 8).unwrap_err();
        assert!(err.contains("step-8"), "{err}");
        let err = TrainState::parse(
            br#"{"step": 8, "epoch": 1, "position": 0, "data_order": 3}"#,
            8,
        )
        .unwrap_err();
        assert!(err.contains("`data_order`"), "{err}");
    }
}
