//! LSUN as distributed: one LMDB environment per category and split (`data.mdb`,
//! `lock.mdb`), keys 40-character hex ids, values encoded images (WebP in current exports,
//! JPEG in older ones). Opened read-only without a lock file, so it works on read-only
//! mounts and never writes next to the data.

use crate::{DataError, Result};
use heed::types::Bytes;
use heed::{Database, Env, EnvFlags, EnvOpenOptions};
use std::path::{Path, PathBuf};

/// One LSUN entry read out of the environment.
pub struct LsunEntry {
    /// The 40-character hex key.
    pub key: String,
    /// `<dir> key <hex>`: names the entry in errors.
    pub origin: String,
    /// The encoded image.
    pub bytes: Vec<u8>,
}

/// An LSUN LMDB environment, open read-only.
pub struct LsunDb {
    env: Env,
    db: Database<Bytes, Bytes>,
    path: PathBuf,
}

fn lmdb_err(path: &Path, what: &str, e: heed::Error) -> DataError {
    DataError::Format {
        path: path.display().to_string(),
        reason: format!("{what}: {e}"),
    }
}

/// An LSUN key: 40 ASCII hex digits.
fn check_key<'a>(path: &Path, key: &'a [u8]) -> Result<&'a str> {
    std::str::from_utf8(key)
        .ok()
        .filter(|k| k.len() == 40 && k.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or_else(|| DataError::Format {
            path: path.display().to_string(),
            reason: format!(
                "key {:?} is not a 40-character hex id (is this an LSUN export?)",
                String::from_utf8_lossy(key)
            ),
        })
}

impl LsunDb {
    /// Opens the environment in `dir` (the directory holding `data.mdb`).
    pub fn open(dir: &Path) -> Result<Self> {
        let data = dir.join("data.mdb");
        let size = std::fs::metadata(&data)
            .map_err(|e| DataError::Format {
                path: dir.display().to_string(),
                reason: format!("not an LSUN LMDB directory: {} ({e})", data.display()),
            })?
            .len() as usize;
        // The map must cover the file; round up to a generous multiple of the page size.
        let map_size = (size / (1 << 20) + 1) << 20;
        let mut opts = EnvOpenOptions::new();
        opts.map_size(map_size).max_dbs(0);
        // SAFETY: READ_ONLY | NO_LOCK: no lock file is created or used. That is sound as long
        // as nobody writes the environment while we read it, which holds for a dataset
        // export (LSUN is never written after it is published); the docs say so.
        let env = unsafe {
            opts.flags(EnvFlags::READ_ONLY | EnvFlags::NO_LOCK);
            opts.open(dir)
        }
        .map_err(|e| lmdb_err(dir, "opening the LMDB environment read-only", e))?;
        let rtxn = env
            .read_txn()
            .map_err(|e| lmdb_err(dir, "starting a read transaction", e))?;
        let db: Database<Bytes, Bytes> = env
            .open_database(&rtxn, None)
            .map_err(|e| lmdb_err(dir, "opening the main database", e))?
            .ok_or_else(|| DataError::Format {
                path: dir.display().to_string(),
                reason: "the LMDB environment has no main database".into(),
            })?;
        drop(rtxn);
        Ok(Self {
            env,
            db,
            path: dir.to_path_buf(),
        })
    }

    /// Number of entries.
    pub fn len(&self) -> Result<usize> {
        let rtxn = self
            .env
            .read_txn()
            .map_err(|e| lmdb_err(&self.path, "read transaction", e))?;
        Ok(self
            .db
            .len(&rtxn)
            .map_err(|e| lmdb_err(&self.path, "counting entries", e))? as usize)
    }

    /// Whether the database has no entries.
    pub fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }

    /// Calls `f(key, value)` for up to `take` entries in key order, from the `skip`-th on.
    /// Keys must be 40-character hex ids; any other key is an error naming it.
    pub fn for_each_in(
        &self,
        skip: usize,
        take: usize,
        mut f: impl FnMut(&str, &[u8]) -> Result<()>,
    ) -> Result<()> {
        let rtxn = self
            .env
            .read_txn()
            .map_err(|e| lmdb_err(&self.path, "read transaction", e))?;
        let iter = self
            .db
            .iter(&rtxn)
            .map_err(|e| lmdb_err(&self.path, "iterating", e))?;
        for item in iter.skip(skip).take(take) {
            let (key, value) = item.map_err(|e| lmdb_err(&self.path, "reading an entry", e))?;
            f(check_key(&self.path, key)?, value)?;
        }
        Ok(())
    }

    /// [`LsunDb::for_each_in`] over every entry from the `skip`-th on.
    pub fn for_each(&self, skip: usize, f: impl FnMut(&str, &[u8]) -> Result<()>) -> Result<()> {
        self.for_each_in(skip, usize::MAX, f)
    }

    /// One entry, copied out of the read transaction, with the origin that names it in
    /// errors.
    fn entry(&self, key: &str, value: &[u8]) -> LsunEntry {
        LsunEntry {
            key: key.to_string(),
            origin: self.origin(key.as_bytes()),
            bytes: value.to_vec(),
        }
    }

    /// Up to `take` entries with keys after `after`, in key order. Continuing from the last
    /// key costs O(take), where a skip walks from the start.
    pub fn range_after(&self, after: &[u8], take: usize) -> Result<Vec<LsunEntry>> {
        use std::ops::Bound;
        let rtxn = self
            .env
            .read_txn()
            .map_err(|e| lmdb_err(&self.path, "read transaction", e))?;
        let bounds: (Bound<&[u8]>, Bound<&[u8]>) = (Bound::Excluded(after), Bound::Unbounded);
        let iter = self
            .db
            .range(&rtxn, &bounds)
            .map_err(|e| lmdb_err(&self.path, "iterating", e))?;
        let mut out = Vec::with_capacity(take.min(1 << 16));
        for item in iter.take(take) {
            let (key, value) = item.map_err(|e| lmdb_err(&self.path, "reading an entry", e))?;
            out.push(self.entry(check_key(&self.path, key)?, value));
        }
        Ok(out)
    }

    /// Up to `take` entries from the `skip`-th on, in key order.
    pub fn range(&self, skip: usize, take: usize) -> Result<Vec<LsunEntry>> {
        let mut out = Vec::with_capacity(take.min(1 << 16));
        self.for_each_in(skip, take, |key, value| {
            out.push(self.entry(key, value));
            Ok(())
        })?;
        Ok(out)
    }

    /// Every key, in key order (40 bytes each; checked to be hex ids).
    pub fn keys(&self) -> Result<Vec<[u8; 40]>> {
        let mut out = Vec::new();
        self.for_each(0, |key, _| {
            out.push(key.as_bytes().try_into().expect("checked: 40 bytes"));
            Ok(())
        })?;
        Ok(out)
    }

    /// Calls `f` with the value of `key`, read in place from the memory map (no copy).
    pub fn with_value<T>(&self, key: &[u8], f: impl FnOnce(&[u8]) -> T) -> Result<T> {
        let rtxn = self
            .env
            .read_txn()
            .map_err(|e| lmdb_err(&self.path, "read transaction", e))?;
        let value = self
            .db
            .get(&rtxn, key)
            .map_err(|e| lmdb_err(&self.path, "reading an entry", e))?
            .ok_or_else(|| DataError::Format {
                path: self.origin(key),
                reason: "the key is gone (was the environment rewritten while training?)".into(),
            })?;
        Ok(f(value))
    }

    /// `<dir> key <hex>`: how errors name the entry `key`.
    pub fn origin(&self, key: &[u8]) -> String {
        format!(
            "{} key {}",
            self.path.display(),
            String::from_utf8_lossy(key)
        )
    }

    /// The directory of the environment.
    pub fn path(&self) -> &Path {
        &self.path
    }
}
