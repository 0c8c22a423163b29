//! The protocol of DDPM-RS (proto/ddpm/v1): the generated messages and the `Coordinator`
//! service (client and server), the protocol version, and conversions between the wire
//! rendezvous and the domain's.

#[allow(missing_docs, clippy::all)]
pub mod v1 {
    //! Generated from proto/ddpm/v1/coordinator.proto.
    tonic::include_proto!("ddpm.v1");
}

/// The version of the protocol this build speaks. It changes whenever a message changes
/// meaning; the coordinator refuses any other. Version 2: survivors of a failed generation
/// register again (`failed_generation`) and the response names their ring position
/// (`ring_rank`).
pub const PROTOCOL_VERSION: u32 = 2;

/// Errors converting wire messages.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    /// A message lacks a field it needs, or holds a value out of range.
    #[error("{message}: {reason}")]
    Invalid {
        /// The message.
        message: &'static str,
        /// What is wrong.
        reason: String,
    },
}

/// The refusal of a Register with another protocol version: FAILED_PRECONDITION naming both.
pub fn check_version(theirs: u32) -> Result<(), tonic::Status> {
    if theirs == PROTOCOL_VERSION {
        return Ok(());
    }
    Err(tonic::Status::failed_precondition(format!(
        "protocol version {theirs} is not supported: this coordinator speaks version {PROTOCOL_VERSION}; run the same release of the coordinator and its workers"
    )))
}

/// How the ranks of one generation find each other.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rendezvous {
    /// NCCL: the unique id rank 0 created (128 bytes).
    Nccl {
        /// `ncclUniqueId`.
        unique_id: Vec<u8>,
    },
    /// The CPU ring: every rank's listen address, in rank order.
    Tcp {
        /// "host:port" per rank.
        peers: Vec<String>,
    },
}

/// Size of an `ncclUniqueId`.
pub const NCCL_UNIQUE_ID_BYTES: usize = 128;

impl From<Rendezvous> for v1::Rendezvous {
    fn from(r: Rendezvous) -> Self {
        use v1::rendezvous::Backend;
        let backend = match r {
            Rendezvous::Nccl { unique_id } => Backend::Nccl(v1::NcclRendezvous { unique_id }),
            Rendezvous::Tcp { peers } => Backend::Tcp(v1::TcpRendezvous { peers }),
        };
        v1::Rendezvous {
            backend: Some(backend),
        }
    }
}

impl TryFrom<v1::Rendezvous> for Rendezvous {
    type Error = ProtoError;

    fn try_from(r: v1::Rendezvous) -> Result<Self, ProtoError> {
        use v1::rendezvous::Backend;
        let bad = |reason: String| ProtoError::Invalid {
            message: "Rendezvous",
            reason,
        };
        match r.backend {
            Some(Backend::Nccl(n)) if n.unique_id.len() == NCCL_UNIQUE_ID_BYTES => {
                Ok(Rendezvous::Nccl {
                    unique_id: n.unique_id,
                })
            }
            Some(Backend::Nccl(n)) => Err(bad(format!(
                "an NCCL unique id of {} bytes, expected {NCCL_UNIQUE_ID_BYTES}",
                n.unique_id.len()
            ))),
            Some(Backend::Tcp(t)) if !t.peers.is_empty() => Ok(Rendezvous::Tcp { peers: t.peers }),
            Some(Backend::Tcp(_)) => Err(bad("a TCP ring with no peers".into())),
            None => Err(bad("no backend (expected nccl or tcp)".into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn a_version_mismatch_is_failed_precondition_naming_both() {
        check_version(PROTOCOL_VERSION).unwrap();
        let s = check_version(PROTOCOL_VERSION + 1).unwrap_err();
        assert_eq!(s.code(), tonic::Code::FailedPrecondition);
        assert!(
            s.message()
                .contains(&format!("version {}", PROTOCOL_VERSION + 1))
                && s.message().contains(&format!("version {PROTOCOL_VERSION}")),
            "{}",
            s.message()
        );
    }

    #[test]
    fn rendezvous_round_trip_through_the_wire_and_bad_ones_are_named() {
        for r in [
            Rendezvous::Nccl {
                unique_id: (0..128).map(|i| i as u8).collect(),
            },
            Rendezvous::Tcp {
                peers: vec!["10.0.0.1:7000".into(), "10.0.0.2:7000".into()],
            },
        ] {
            let wire: v1::Rendezvous = r.clone().into();
            let bytes = wire.encode_to_vec();
            let back = v1::Rendezvous::decode(bytes.as_slice()).unwrap();
            assert_eq!(Rendezvous::try_from(back).unwrap(), r);
        }
        let short = v1::Rendezvous::from(Rendezvous::Nccl {
            unique_id: vec![1; 7],
        });
        let err = Rendezvous::try_from(short).unwrap_err().to_string();
        assert!(err.contains("7 bytes") && err.contains("128"), "{err}");
        let err = Rendezvous::try_from(v1::Rendezvous { backend: None })
            .unwrap_err()
            .to_string();
        assert!(err.contains("no backend"), "{err}");
    }

    #[test]
    fn an_optional_rank_distinguishes_zero_from_any() {
        let any = v1::RegisterRequest {
            protocol_version: PROTOCOL_VERSION,
            ..Default::default()
        };
        let zero = v1::RegisterRequest {
            requested_rank: Some(0),
            ..any.clone()
        };
        let decode = |m: &v1::RegisterRequest| {
            v1::RegisterRequest::decode(m.encode_to_vec().as_slice()).unwrap()
        };
        assert_eq!(decode(&any).requested_rank, None);
        assert_eq!(decode(&zero).requested_rank, Some(0));
    }
}
