//! Shared by the checkpoint integration tests: a moto S3 server, a fault-injecting store and
//! the scenarios every backend must pass.

#![allow(dead_code, missing_docs)]

pub mod faulty;
pub mod moto;
pub mod scenarios;
