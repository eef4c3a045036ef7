//! The object-store seam: everything s3bridge asks of S3, and nothing more.
//!
//! `fs/` talks to an [`ObjectStore`] trait object so that the filesystem semantics can be
//! unit-tested against [`mem::MemStore`] (with fault injection) and run for real against
//! [`s3::S3Store`]. This module knows keys, bytes and headers; it knows nothing of inodes.

pub mod direct;
pub mod mem;
pub mod s3;

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;

/// Largest object a single PutObject or CopyObject may create (S3's limit: 5 GiB).
pub const MAX_SINGLE_OBJECT: u64 = 5 * 1024 * 1024 * 1024;
/// Smallest size of a multipart part other than the last one (S3's limit: 5 MiB).
pub const MIN_PART_SIZE: u64 = 5 * 1024 * 1024;
/// Largest size of a multipart part (S3's limit: 5 GiB).
pub const MAX_PART_SIZE: u64 = 5 * 1024 * 1024 * 1024;
/// Most parts one multipart upload may have (S3's limit).
pub const MAX_PARTS: u64 = 10_000;
/// Longest key S3 accepts, in bytes of UTF-8.
pub const MAX_KEY_LEN: usize = 1024;

/// User metadata of an object: the `x-amz-meta-*` headers, with the prefix stripped and the
/// name in lower case (that is how S3 returns them).
pub type UserMetadata = BTreeMap<String, String>;

/// What a HEAD (or a completed write) tells about one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    /// Full key of the object.
    pub key: String,
    /// Size in bytes.
    pub size: u64,
    /// Entity tag as the server sent it, quotes included.
    pub etag: String,
    /// Last-Modified as the server sent it.
    pub last_modified: SystemTime,
    /// Content-Type, when the server returned one.
    pub content_type: Option<String>,
    /// `x-amz-meta-*` headers.
    pub metadata: UserMetadata,
}

/// One object in a listing: what ListObjectsV2 returns without a HEAD.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedObject {
    /// Full key.
    pub key: String,
    /// Size in bytes.
    pub size: u64,
    /// Entity tag, quotes included.
    pub etag: String,
    /// Last-Modified.
    pub last_modified: SystemTime,
}

/// One page of a ListObjectsV2 answer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListPage {
    /// Objects directly matched (with a delimiter: those without a further delimiter).
    pub objects: Vec<ListedObject>,
    /// Common prefixes (each ends with the delimiter); only with a delimiter.
    pub prefixes: Vec<String>,
    /// Continuation token for the next page, `None` on the last page.
    pub next_token: Option<String>,
}

/// Headers sent with an object that is written (PUT, copy with REPLACE, multipart create).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WriteHeaders {
    /// Content-Type; `None` lets the server choose (binary/octet-stream).
    pub content_type: Option<String>,
    /// `x-amz-meta-*` headers (names without the prefix).
    pub metadata: UserMetadata,
}

/// What a key must hold for a write to it to go ahead: conditional writes (`If-Match`,
/// `If-None-Match: *`), which catch another client's change in the same request. Servers
/// without conditional writes (Garage) ignore the headers; the filesystem then checks with a
/// HEAD first.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Expect<'a> {
    /// Whatever is there.
    #[default]
    Any,
    /// No object.
    Absent,
    /// The object with this ETag.
    ETag(&'a str),
}

/// One finished part of a multipart upload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompletedPart {
    /// 1-based part number.
    pub number: i32,
    /// ETag the server returned for the part.
    pub etag: String,
}

/// Errors of the object store, each with an explicit errno for the caller of the filesystem.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The key does not exist (404 NoSuchKey / NotFound).
    #[error("object not found: {0}")]
    NotFound(String),
    /// A conditional request failed: the object changed since we read it (412).
    #[error("object changed on the server since it was read (precondition failed): {0}")]
    PreconditionFailed(String),
    /// The bucket does not exist.
    #[error("bucket does not exist: {0}")]
    NoSuchBucket(String),
    /// The credential chain found no credentials, or could not load those it found.
    #[error("no AWS credentials: {0}")]
    NoCredentials(String),
    /// The server refused our credentials or our permissions (403 and friends).
    #[error("access denied by the S3 server: {0}")]
    AccessDenied(String),
    /// The requested byte range is not satisfiable (416).
    #[error("invalid range for {0}")]
    InvalidRange(String),
    /// The server could not be reached, timed out, or kept failing after retries.
    #[error("S3 server unavailable: {0}")]
    Unavailable(String),
    /// Any other error the server returned.
    #[error("S3 error: {0}")]
    Other(String),
    /// The local side of a transfer failed: reading the staging file a part is sent from, or
    /// writing the blocks a GET brought into it. Its errno is the local one (a full cache
    /// disk is ENOSPC, not EIO).
    #[error("local staging file in the cache directory: {0}")]
    Local(#[source] std::io::Error),
}

impl StoreError {
    /// The errno a filesystem caller sees for this error.
    pub fn errno(&self) -> i32 {
        match self {
            StoreError::NotFound(_) => libc::ENOENT,
            StoreError::PreconditionFailed(_) => libc::ESTALE,
            StoreError::AccessDenied(_) | StoreError::NoCredentials(_) => libc::EACCES,
            StoreError::InvalidRange(_) => libc::EINVAL,
            StoreError::NoSuchBucket(_) | StoreError::Unavailable(_) | StoreError::Other(_) => {
                libc::EIO
            }
            StoreError::Local(e) => e.raw_os_error().unwrap_or(libc::EIO),
        }
    }
}

/// Result type of the object store.
pub type StoreResult<T> = Result<T, StoreError>;

/// Everything the filesystem needs from an S3-like object store.
///
/// Implementations retry transient failures themselves and bound every request with a
/// timeout, so a caller either gets an answer or an error in bounded time.
#[async_trait]
pub trait ObjectStore: Send + Sync + 'static {
    /// A store reaching the same bucket over connections of its own, for work that runs on
    /// another tokio runtime: a client's connections are driven by the runtime that opened
    /// them, so a request sent from one runtime over another's connection wakes a thread of
    /// each at every step.
    async fn separate(self: Arc<Self>) -> Arc<dyn ObjectStore>;

    /// HEAD: size, ETag and headers of one object.
    async fn head(&self, key: &str) -> StoreResult<ObjectInfo>;

    /// Ranged GET. `if_match` pins the read to an ETag: a changed object is
    /// [`StoreError::PreconditionFailed`] rather than mixed data. A range past the end is
    /// clipped to the object; an empty result means the range starts at or past the end.
    async fn get_range(
        &self,
        key: &str,
        range: Range<u64>,
        if_match: Option<&str>,
    ) -> StoreResult<Bytes>;

    /// [`Self::get_range`] with the body cut into pieces of `piece` bytes (the last may be
    /// shorter), filled as the body arrives. Callers that keep data in fixed-size blocks use
    /// it to avoid holding (and copying out of) one buffer per request.
    async fn get_range_pieces(
        &self,
        key: &str,
        range: Range<u64>,
        if_match: Option<&str>,
        piece: usize,
    ) -> StoreResult<Vec<Bytes>> {
        let data = self.get_range(key, range, if_match).await?;
        Ok((0..data.len())
            .step_by(piece.max(1))
            .map(|s| data.slice(s..(s + piece.max(1)).min(data.len())))
            .collect())
    }

    /// PutObject of a whole body, if `expect` holds ([`StoreError::PreconditionFailed`]
    /// otherwise, where the server checks); returns the new ETag.
    async fn put(
        &self,
        key: &str,
        body: Bytes,
        headers: &WriteHeaders,
        expect: Expect<'_>,
    ) -> StoreResult<String>;

    /// CopyObject with metadata directive REPLACE (objects up to 5 GiB); returns the new ETag.
    async fn copy(
        &self,
        src_key: &str,
        dst_key: &str,
        src_if_match: Option<&str>,
        headers: &WriteHeaders,
    ) -> StoreResult<String>;

    /// CreateMultipartUpload; returns the upload id.
    async fn create_multipart(&self, key: &str, headers: &WriteHeaders) -> StoreResult<String>;

    /// UploadPart; returns the part's ETag.
    async fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        number: i32,
        body: Bytes,
    ) -> StoreResult<String>;

    /// UploadPartCopy of `range` of `src_key` (server side); returns the part's ETag.
    async fn upload_part_copy(
        &self,
        key: &str,
        upload_id: &str,
        number: i32,
        src_key: &str,
        range: Range<u64>,
        src_if_match: Option<&str>,
    ) -> StoreResult<String>;

    /// CompleteMultipartUpload, if `expect` holds (as for [`Self::put`]); returns the
    /// object's ETag.
    async fn complete_multipart(
        &self,
        key: &str,
        upload_id: &str,
        parts: &[CompletedPart],
        expect: Expect<'_>,
    ) -> StoreResult<String>;

    /// AbortMultipartUpload.
    async fn abort_multipart(&self, key: &str, upload_id: &str) -> StoreResult<()>;

    /// DeleteObject; deleting a missing key succeeds, as in S3.
    async fn delete(&self, key: &str) -> StoreResult<()>;

    /// DeleteObjects of up to 1,000 keys; fails if any key could not be deleted.
    async fn delete_many(&self, keys: &[String]) -> StoreResult<()>;

    /// One page of ListObjectsV2 under `prefix`, grouped by `delimiter` when given.
    async fn list(
        &self,
        prefix: &str,
        delimiter: Option<&str>,
        token: Option<&str>,
        max_keys: Option<i32>,
    ) -> StoreResult<ListPage>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_local_failure_keeps_its_errno() {
        let full = StoreError::Local(std::io::Error::from_raw_os_error(libc::ENOSPC));
        assert_eq!(
            full.errno(),
            libc::ENOSPC,
            "a full cache disk is ENOSPC, not EIO"
        );
        let other = StoreError::Local(std::io::Error::other("no errno"));
        assert_eq!(other.errno(), libc::EIO);
        assert_eq!(StoreError::Other("x".into()).errno(), libc::EIO);
    }
}
