//! An error-injecting object store wrapper: puts of a named object fail (a writer dying
//! before its manifest), or every put fails once a byte budget is spent (a full disk).

use async_trait::async_trait;
use futures::stream::BoxStream;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, Result,
};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Which writes fail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Nothing fails.
    None,
    /// Writes of objects with this file name fail.
    FailNamed(&'static str),
    /// Writes fail once this many more bytes have been written (ENOSPC).
    Full { budget: u64 },
}

/// The wrapper.
#[derive(Debug)]
pub struct FaultyStore {
    inner: Arc<dyn ObjectStore>,
    fault: Mutex<Fault>,
    written: AtomicU64,
    /// Writes refused so far.
    pub refused: AtomicU64,
}

impl std::fmt::Display for FaultyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FaultyStore({})", self.inner)
    }
}

impl FaultyStore {
    /// Wraps `inner`, failing nothing yet.
    pub fn new(inner: Arc<dyn ObjectStore>) -> Arc<Self> {
        Arc::new(Self {
            inner,
            fault: Mutex::new(Fault::None),
            written: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        })
    }

    /// Sets the fault from now on.
    pub fn set(&self, fault: Fault) {
        self.written.store(0, Ordering::SeqCst);
        *self.fault.lock().unwrap() = fault;
    }

    fn check(&self, location: &Path, bytes: u64) -> Result<()> {
        let refuse = match &*self.fault.lock().unwrap() {
            Fault::None => None,
            Fault::FailNamed(name) => (location.filename() == Some(name))
                .then(|| format!("injected failure writing {location}")),
            Fault::Full { budget } => {
                let used = self.written.fetch_add(bytes, Ordering::SeqCst) + bytes;
                (used > *budget).then(|| "No space left on device (os error 28)".to_string())
            }
        };
        match refuse {
            Some(msg) => {
                self.refused.fetch_add(1, Ordering::SeqCst);
                Err(object_store::Error::Generic {
                    store: "FaultyStore",
                    source: msg.into(),
                })
            }
            None => Ok(()),
        }
    }
}

#[async_trait]
impl ObjectStore for FaultyStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> Result<PutResult> {
        self.check(location, payload.content_length() as u64)?;
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        self.check(location, 0)?;
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        self.inner.get_opts(location, options).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, Result<Path>>,
    ) -> BoxStream<'static, Result<Path>> {
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        self.inner.copy_opts(from, to, options).await
    }
}
