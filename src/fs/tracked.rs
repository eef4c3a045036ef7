//! The object store as the filesystem uses it: every request counted (for `s3bridge
//! status`), and multipart uploads recorded in the inode database while they are in flight.
//!
//! Multipart uploads are recorded so that a crash never leaves one behind: the next mount of the same cache directory aborts every
//! upload still recorded (the data is still staged locally and goes up again whole).
//!
//! An interrupted multipart upload is invisible to `ls` but holds its parts' storage in the
//! bucket (and on AWS, bills it) until it is aborted; most buckets have no lifecycle rule
//! that would clean it up. Recording happens in one place, a wrapper around the object store,
//! so that every path that uploads in parts (streaming writes, uploads at close, server-side
//! copies of large files) is covered without knowing about it.

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use bytes::Bytes;
use tracing::{info, warn};

use crate::meta::InodeTable;
use crate::store::{
    CompletedPart, Expect, ListPage, ObjectInfo, ObjectStore, StoreResult, WriteHeaders,
};

/// Requests made to the object store and how many failed (after the store's retries).
#[derive(Debug, Default)]
pub struct RequestCounts {
    /// Requests made.
    pub requests: AtomicU64,
    /// Requests that ended in an error ("not found" included).
    pub errors: AtomicU64,
}

/// An object store whose requests are counted and whose multipart uploads are recorded in
/// the inode database.
pub struct TrackedStore {
    inner: Arc<dyn ObjectStore>,
    meta: Arc<InodeTable>,
    counts: Arc<RequestCounts>,
}

impl TrackedStore {
    /// Wraps `inner`, recording its multipart uploads in `meta` and counting in `counts`.
    pub fn new(
        inner: Arc<dyn ObjectStore>,
        meta: Arc<InodeTable>,
        counts: Arc<RequestCounts>,
    ) -> Self {
        TrackedStore {
            inner,
            meta,
            counts,
        }
    }

    /// Counts a request that ended with `result`.
    fn tally<T>(&self, result: StoreResult<T>) -> StoreResult<T> {
        self.counts.requests.fetch_add(1, Ordering::Relaxed);
        if result.is_err() {
            self.counts.errors.fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    fn forget(&self, upload_id: &str) {
        if let Err(e) = self.meta.forget_upload(upload_id) {
            warn!(
                upload_id,
                "could not forget a finished multipart upload: {e}"
            );
        }
    }
}

/// Aborts `leftover`, the multipart uploads (id, key) a previous run left recorded. Returns
/// how many were aborted; those that cannot be aborted now (the server is down) stay recorded
/// for the next mount.
pub async fn abort_leftover_uploads(
    store: &Arc<dyn ObjectStore>,
    leftover: Vec<(String, String)>,
) -> usize {
    let mut aborted = 0;
    for (upload_id, key) in leftover {
        // Through the recording store: an abort also forgets the record.
        match store.abort_multipart(&key, &upload_id).await {
            Ok(()) => aborted += 1,
            Err(e) => warn!(key, "cannot abort an interrupted multipart upload yet: {e}"),
        }
    }
    if aborted > 0 {
        info!(
            aborted,
            "aborted multipart uploads interrupted by a previous run"
        );
    }
    aborted
}

#[async_trait]
impl ObjectStore for TrackedStore {
    async fn head(&self, key: &str) -> StoreResult<ObjectInfo> {
        self.tally(self.inner.head(key).await)
    }

    async fn get_range(
        &self,
        key: &str,
        range: Range<u64>,
        if_match: Option<&str>,
    ) -> StoreResult<Bytes> {
        self.tally(self.inner.get_range(key, range, if_match).await)
    }

    async fn get_range_pieces(
        &self,
        key: &str,
        range: Range<u64>,
        if_match: Option<&str>,
        piece: usize,
    ) -> StoreResult<Vec<Bytes>> {
        self.tally(
            self.inner
                .get_range_pieces(key, range, if_match, piece)
                .await,
        )
    }

    async fn put(
        &self,
        key: &str,
        body: Bytes,
        headers: &WriteHeaders,
        expect: Expect<'_>,
    ) -> StoreResult<String> {
        self.tally(self.inner.put(key, body, headers, expect).await)
    }

    async fn copy(
        &self,
        src_key: &str,
        dst_key: &str,
        src_if_match: Option<&str>,
        headers: &WriteHeaders,
    ) -> StoreResult<String> {
        self.tally(
            self.inner
                .copy(src_key, dst_key, src_if_match, headers)
                .await,
        )
    }

    async fn create_multipart(&self, key: &str, headers: &WriteHeaders) -> StoreResult<String> {
        let upload_id = self.tally(self.inner.create_multipart(key, headers).await)?;
        if let Err(e) = self.meta.record_upload(&upload_id, key) {
            // Unrecorded, a crash would orphan it: do not use it.
            let _ = self.inner.abort_multipart(key, &upload_id).await;
            return Err(crate::store::StoreError::Other(format!(
                "cannot record a multipart upload in the inode database: {e}"
            )));
        }
        Ok(upload_id)
    }

    async fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        number: i32,
        body: Bytes,
    ) -> StoreResult<String> {
        self.tally(self.inner.upload_part(key, upload_id, number, body).await)
    }

    async fn upload_part_copy(
        &self,
        key: &str,
        upload_id: &str,
        number: i32,
        src_key: &str,
        range: Range<u64>,
        src_if_match: Option<&str>,
    ) -> StoreResult<String> {
        self.tally(
            self.inner
                .upload_part_copy(key, upload_id, number, src_key, range, src_if_match)
                .await,
        )
    }

    async fn complete_multipart(
        &self,
        key: &str,
        upload_id: &str,
        parts: &[CompletedPart],
        expect: Expect<'_>,
    ) -> StoreResult<String> {
        let etag = self.tally(
            self.inner
                .complete_multipart(key, upload_id, parts, expect)
                .await,
        )?;
        self.forget(upload_id);
        Ok(etag)
    }

    async fn abort_multipart(&self, key: &str, upload_id: &str) -> StoreResult<()> {
        match self.tally(self.inner.abort_multipart(key, upload_id).await) {
            // An upload the server no longer knows is as good as aborted.
            Ok(()) | Err(crate::store::StoreError::NotFound(_)) => {
                self.forget(upload_id);
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    async fn delete(&self, key: &str) -> StoreResult<()> {
        self.tally(self.inner.delete(key).await)
    }

    async fn delete_many(&self, keys: &[String]) -> StoreResult<()> {
        self.tally(self.inner.delete_many(keys).await)
    }

    async fn list(
        &self,
        prefix: &str,
        delimiter: Option<&str>,
        token: Option<&str>,
        max_keys: Option<i32>,
    ) -> StoreResult<ListPage> {
        self.tally(self.inner.list(prefix, delimiter, token, max_keys).await)
    }
}
