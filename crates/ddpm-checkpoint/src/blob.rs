//! A blob's bytes as one or more segments, so callers can hand over memory they already own
//! (a safetensors header plus the tensor buffers) without concatenating it first.

use crate::UploadPolicy;
use bytes::Bytes;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload, WriteMultipart};
use sha2::{Digest, Sha256};

/// The contents of one checkpoint object: segments written back to back.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Blob {
    segments: Vec<Bytes>,
}

impl Blob {
    /// A blob made of `segments`, in order.
    pub fn from_segments(segments: Vec<Bytes>) -> Self {
        Self { segments }
    }

    /// The segments.
    pub fn segments(&self) -> &[Bytes] {
        &self.segments
    }

    /// Total size in bytes.
    pub fn len(&self) -> usize {
        self.segments.iter().map(Bytes::len).sum()
    }

    /// Whether the blob has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Lower-case hex sha256 of the whole blob.
    pub fn sha256_hex(&self) -> String {
        let mut h = Sha256::new();
        for s in &self.segments {
            h.update(s);
        }
        h.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The blob as one contiguous buffer (copies unless it has a single segment).
    pub fn to_bytes(&self) -> Bytes {
        match self.segments.as_slice() {
            [] => Bytes::new(),
            [one] => one.clone(),
            many => Bytes::from(many.concat()),
        }
    }
}

impl From<Bytes> for Blob {
    fn from(b: Bytes) -> Self {
        Self { segments: vec![b] }
    }
}

impl From<Vec<u8>> for Blob {
    fn from(b: Vec<u8>) -> Self {
        Bytes::from(b).into()
    }
}

/// Writes `data` to `path`: a single put up to `policy.threshold` bytes, a multipart upload
/// above it (S3 caps a single put at 5 GiB). A failed multipart upload is aborted, so no
/// parts are left behind where the store supports it.
pub async fn put_blob(
    store: &dyn ObjectStore,
    path: &Path,
    data: &Blob,
    policy: &UploadPolicy,
) -> object_store::Result<()> {
    if data.len() <= policy.threshold {
        let payload: PutPayload = data.segments().iter().cloned().collect();
        store.put(path, payload).await?;
        return Ok(());
    }
    let upload = store.put_multipart(path).await?;
    let mut writer = WriteMultipart::new_with_chunk_size(upload, policy.part_size);
    for segment in data.segments() {
        let mut rest = segment.clone();
        while !rest.is_empty() {
            if let Err(e) = writer.wait_for_capacity(policy.concurrency).await {
                let _ = writer.abort().await;
                return Err(e);
            }
            let n = rest.len().min(policy.part_size);
            writer.put(rest.split_to(n));
        }
    }
    writer.finish().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_hash_and_concatenate_like_one_buffer() {
        let whole = Blob::from(b"hello world".to_vec());
        let parts = Blob::from_segments(vec![
            Bytes::from_static(b"hello"),
            Bytes::new(),
            Bytes::from_static(b" world"),
        ]);
        assert_eq!(parts.len(), 11);
        assert_eq!(parts.sha256_hex(), whole.sha256_hex());
        assert_eq!(parts.to_bytes(), whole.to_bytes());
        assert_eq!(whole.sha256_hex(), crate::sha256_hex(b"hello world"));
    }
}
