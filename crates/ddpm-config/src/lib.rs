//! Typed configuration for DDPM-RS.
//!
//! Every TOML key the system understands is a field of [`Config`]. Unknown keys are
//! rejected (with the key's name), missing sections take the defaults documented in
//! `configs/README.md`, and [`Config::validate`] checks every value and names the key at
//! fault. This crate has no tensor or async dependencies so every binary can use it.

mod types;
mod validate;

pub use types::*;

/// The rows of a global batch of `global` examples that rank `rank` of `world` trains on:
/// `global * rank / world .. global * (rank + 1) / world`. The ranks' rows partition the
/// batch, and their sizes differ by at most one when `world` does not divide `global`.
pub fn rank_rows(global: usize, world: usize, rank: usize) -> std::ops::Range<usize> {
    assert!(
        world > 0 && rank < world,
        "rank {rank} of world size {world}"
    );
    global * rank / world..global * (rank + 1) / world
}

use std::path::Path;

/// Errors produced while reading or validating a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}")]
    Read {
        /// The file that was asked for.
        path: String,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// The TOML did not parse or did not match the schema (unknown key, wrong type).
    #[error("invalid config {origin}: {message}")]
    Parse {
        /// File path, or `<string>` when parsed from memory.
        origin: String,
        /// The parser's message, which names the key and the line.
        message: String,
    },
    /// A value parsed but is not allowed.
    #[error("invalid config {origin}: key `{key}`: {reason}")]
    Invalid {
        /// File path, or `<string>`.
        origin: String,
        /// Dotted key, e.g. `model.ch_mult`.
        key: String,
        /// What was expected.
        reason: String,
    },
}

impl Config {
    /// Reads, parses and validates a TOML configuration file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses and validates TOML text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            origin: origin.to_string(),
            message: e.to_string().trim_end().to_string(),
        })?;
        config
            .validate()
            .map_err(|(key, reason)| ConfigError::Invalid {
                origin: origin.to_string(),
                key,
                reason,
            })?;
        Ok(config)
    }

    /// Serialises the resolved configuration (defaults filled in) as TOML, with credentials
    /// redacted ([`Config::redacted`]).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(&self.redacted()).expect("config serialises")
    }

    /// Serialises the resolved configuration as JSON (for manifests), with credentials
    /// redacted.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self.redacted()).expect("config serialises")
    }

    /// A copy whose credential-like store options (keys containing `secret`, `key`, `token`,
    /// `password`, `sas` or `credential`) read `<redacted>`: configs are written into
    /// checkpoints and run directories, credentials must not be.
    pub fn redacted(&self) -> Config {
        let mut c = self.clone();
        for (k, v) in c
            .checkpoint
            .options
            .iter_mut()
            .chain(c.data.options.iter_mut())
        {
            let k = k.to_ascii_lowercase();
            if ["secret", "key", "token", "password", "sas", "credential"]
                .iter()
                .any(|s| k.contains(s))
            {
                *v = "<redacted>".into();
            }
        }
        c
    }

    /// Undoes [`Config::redacted`] for a process that received a redacted config (a worker
    /// or evaluator from the coordinator): every `<redacted>` store option is dropped, so
    /// object_store reads it from the environment variable of the key in capitals, which must
    /// be set; otherwise the error names the key and the variable (`env` looks variables up).
    pub fn restore_redacted(
        &mut self,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<(), ConfigError> {
        for (section, options) in [
            ("checkpoint", &mut self.checkpoint.options),
            ("data", &mut self.data.options),
        ] {
            let redacted: Vec<String> = options
                .iter()
                .filter(|(_, v)| *v == "<redacted>")
                .map(|(k, _)| k.clone())
                .collect();
            for key in redacted {
                let var = key.to_ascii_uppercase();
                if env(&var).is_none() {
                    return Err(ConfigError::Invalid {
                        origin: "received from the coordinator".into(),
                        key: format!("{section}.options.{key}"),
                        reason: format!("the coordinator does not send credential-like options (it redacts them); set {var} in this process's environment"),
                    });
                }
                options.remove(&key);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
