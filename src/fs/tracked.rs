//! The object store as the filesystem uses it: every request counted (for `s3bridge
//! status`), writes of one key spaced apart, and multipart uploads recorded in the inode
//! database while they are in flight.
//!
//! Writes of one key (PUT, copy onto it, multipart completion, delete) are kept at least
//! [`SAME_KEY_WRITE_GAP`] apart. Garage orders the versions of a key by a millisecond
//! timestamp: two writes within the same millisecond may be kept in either order, and
//! `chmod; chown; touch -d` on one file (three CopyObjects onto itself in ~2 ms) lost the last
//! one in a quarter of runs. AWS orders by arrival, so the gap only costs when one key is
//! written twice within 2 ms.
//!
//! Multipart uploads are recorded so that a crash never leaves one behind: the next mount of the same cache directory aborts every
//! upload still recorded (the data is still staged locally and goes up again whole).
//!
//! An interrupted multipart upload is invisible to `ls` but holds its parts' storage in the
//! bucket (and on AWS, bills it) until it is aborted; most buckets have no lifecycle rule
//! that would clean it up. Recording happens in one place, a wrapper around the object store,
//! so that every path that uploads in parts (streaming writes, uploads at close, server-side
//! copies of large files) is covered without knowing about it.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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

/// Least time between two writes of one key (see the module docs).
const SAME_KEY_WRITE_GAP: Duration = Duration::from_millis(2);

/// Keys written recently are remembered up to this many; older ones are forgotten first.
const RECENT_WRITES: usize = 4096;

/// An object store whose requests are counted, whose writes of one key are spaced apart, and
/// whose multipart uploads are recorded in the inode database.
pub struct TrackedStore {
    inner: Arc<dyn ObjectStore>,
    meta: Arc<InodeTable>,
    counts: Arc<RequestCounts>,
    /// When each recently written key was last written.
    last_write: Mutex<HashMap<String, Instant>>,
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
            last_write: Mutex::new(HashMap::new()),
        }
    }

    /// Waits until `key` may be written again, and notes that it is written now.
    async fn space_write(&self, key: &str) {
        let wait = {
            let mut last = self.last_write.lock().unwrap();
            let now = Instant::now();
            let wait = last
                .get(key)
                .map(|t| SAME_KEY_WRITE_GAP.saturating_sub(now - *t))
                .unwrap_or_default();
            if last.len() >= RECENT_WRITES {
                last.retain(|_, t| now - *t < SAME_KEY_WRITE_GAP);
            }
            last.insert(key.to_string(), now + wait);
            wait
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
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
    async fn separate(self: Arc<Self>) -> Arc<dyn ObjectStore> {
        let inner = self.inner.clone().separate().await;
        Arc::new(TrackedStore::new(
            inner,
            self.meta.clone(),
            self.counts.clone(),
        ))
    }

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
        self.space_write(key).await;
        self.tally(self.inner.put(key, body, headers, expect).await)
    }

    async fn copy(
        &self,
        src_key: &str,
        dst_key: &str,
        src_if_match: Option<&str>,
        headers: &WriteHeaders,
    ) -> StoreResult<String> {
        self.space_write(dst_key).await;
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
        self.space_write(key).await;
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
        self.space_write(key).await;
        self.tally(self.inner.delete(key).await)
    }

    async fn delete_many(&self, keys: &[String]) -> StoreResult<()> {
        for key in keys {
            self.space_write(key).await;
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::{EntryDefaults, Inode, Kind, Timestamp};
    use crate::store::mem::MemStore;

    fn tracked() -> TrackedStore {
        let defaults = EntryDefaults {
            uid: 0,
            gid: 0,
            file_perm: 0o644,
            dir_perm: 0o755,
        };
        let root = Inode::new_entry(None, "", Kind::Dir, &defaults, Timestamp::now(), 0);
        TrackedStore::new(
            Arc::new(MemStore::new()),
            Arc::new(InodeTable::open_in_memory(&root).unwrap()),
            Arc::default(),
        )
    }

    #[tokio::test]
    async fn writes_of_one_key_are_spaced_and_counted() {
        let s = tracked();
        let started = Instant::now();
        for _ in 0..3 {
            s.put(
                "k",
                Bytes::from_static(b"x"),
                &WriteHeaders::default(),
                Expect::Any,
            )
            .await
            .unwrap();
        }
        assert!(
            started.elapsed() >= SAME_KEY_WRITE_GAP * 2,
            "{:?}",
            started.elapsed()
        );
        // Other keys do not wait for each other: 200 of them would take 400 ms if they did.
        let started = Instant::now();
        for i in 0..200 {
            s.delete(&format!("other{i}")).await.unwrap();
        }
        assert!(started.elapsed() < SAME_KEY_WRITE_GAP * 150);
        assert_eq!(s.counts.requests.load(Ordering::Relaxed), 203);
        assert!(s.head("missing").await.is_err());
        assert_eq!(s.counts.errors.load(Ordering::Relaxed), 1);
    }
}
