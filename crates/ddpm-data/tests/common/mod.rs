//! Shared by the dataset tests: LMDB environments written in LSUN's export format.

#![allow(dead_code)]

use heed::types::Bytes;
use heed::{Database, EnvOpenOptions};
use std::path::Path;

/// Writes an LMDB environment like LSUN's export (entries in the main database), then
/// removes its lock file: readers must neither need nor create one.
pub fn write_lmdb(dir: &Path, entries: &[(String, Vec<u8>)]) {
    let env = unsafe { EnvOpenOptions::new().map_size(64 << 20).open(dir).unwrap() };
    let mut wtxn = env.write_txn().unwrap();
    let db: Database<Bytes, Bytes> = env.create_database(&mut wtxn, None).unwrap();
    for (k, v) in entries {
        db.put(&mut wtxn, k.as_bytes(), v).unwrap();
    }
    wtxn.commit().unwrap();
    drop(env);
    std::fs::remove_file(dir.join("lock.mdb")).unwrap();
}
