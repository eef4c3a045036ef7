//! In-memory [`ObjectStore`] for unit tests of `fs/`, with fault injection and requests held
//! on their way in (to make operations interleave in a given order).
//!
//! It follows S3's observable rules that the filesystem relies on (keys sorted by byte,
//! delimiter grouping, ETags that name the contents — the same body has the same ETag, so a
//! copy onto itself with new headers keeps it and only Last-Modified tells the versions
//! apart —, multipart parts of at least 5 MiB, `If-Match`), and counts requests so tests can
//! assert that, say, a listing costs no HEAD.
//! It is never used instead of a real S3 server in the end-to-end tests.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;

use super::{
    CompletedPart, Expect, ListPage, ListedObject, MIN_PART_SIZE, ObjectInfo, ObjectStore,
    StoreError, StoreResult, WriteHeaders,
};

/// Kinds of request, for fault injection and request counting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// HeadObject.
    Head,
    /// GetObject.
    Get,
    /// PutObject.
    Put,
    /// CopyObject.
    Copy,
    /// CreateMultipartUpload, CompleteMultipartUpload, AbortMultipartUpload.
    Multipart,
    /// UploadPart and UploadPartCopy.
    UploadPart,
    /// DeleteObject(s).
    Delete,
    /// ListObjectsV2.
    List,
}

#[derive(Debug, Clone)]
struct MemObject {
    data: Bytes,
    etag: String,
    last_modified: SystemTime,
    headers: WriteHeaders,
}

#[derive(Debug, Default)]
struct Upload {
    key: String,
    headers: WriteHeaders,
    parts: BTreeMap<i32, (String, Bytes)>,
}

#[derive(Debug, Default)]
struct State {
    objects: BTreeMap<String, MemObject>,
    uploads: HashMap<String, Upload>,
    faults: HashMap<Op, u32>,
    /// Keys whose HEADs fail with [`StoreError::Unavailable`].
    unreachable_heads: std::collections::HashSet<String>,
    counts: HashMap<Op, u64>,
    bytes_read: u64,
    /// Conditional writes are ignored, as Garage does.
    ignores_conditions: bool,
    /// How far the store's clock (Last-Modified of new writes) is ahead of the real one.
    clock_ahead: std::time::Duration,
    /// The next PUT (by key) or CopyObject (by destination) of each of these waits for its
    /// pause to be resumed.
    paused: HashMap<(Op, String), Arc<Pause>>,
}

/// A request held on its way in, for tests that need operations to interleave in a given
/// order (see [`MemStore::pause`]).
#[derive(Debug)]
pub struct Pause {
    reached: tokio::sync::Semaphore,
    resumed: tokio::sync::Semaphore,
}

impl Pause {
    /// Waits until the request has arrived (it has not taken effect yet).
    pub async fn reached(&self) {
        self.reached.acquire().await.expect("never closed").forget();
    }

    /// Lets the request go ahead.
    pub fn resume(&self) {
        self.resumed.add_permits(1);
    }

    /// Holds the request that arrived here until [`Self::resume`].
    async fn hold(&self) {
        self.reached.add_permits(1);
        self.resumed.acquire().await.expect("never closed").forget();
    }
}

/// An object store held in memory.
#[derive(Debug, Default)]
pub struct MemStore {
    state: Mutex<State>,
    next_id: AtomicU64,
}

impl MemStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Ignores the conditions of writes from now on (a server without conditional writes,
    /// like Garage); by default they are checked, as AWS does.
    pub fn ignore_conditions(&self) {
        self.state.lock().unwrap().ignores_conditions = true;
    }

    /// Makes the next `count` requests of kind `op` fail with [`StoreError::Unavailable`].
    pub fn fail_next(&self, op: Op, count: u32) {
        *self.state.lock().unwrap().faults.entry(op).or_default() += count;
    }

    /// Makes every HEAD of `key` fail with [`StoreError::Unavailable`] from now on.
    pub fn fail_heads_of(&self, key: &str) {
        self.state
            .lock()
            .unwrap()
            .unreachable_heads
            .insert(key.to_string());
    }

    /// Makes the next request `op` (HEAD, PUT, CopyObject or a delete) of `key` (for a copy:
    /// its destination) wait, before it takes effect, until the returned pause is resumed.
    pub fn pause(&self, op: Op, key: &str) -> Arc<Pause> {
        let pause = Arc::new(Pause {
            reached: tokio::sync::Semaphore::new(0),
            resumed: tokio::sync::Semaphore::new(0),
        });
        let mut state = self.state.lock().unwrap();
        state.paused.insert((op, key.to_string()), pause.clone());
        pause
    }

    /// Holds a request `op` of `key` if a pause waits for it.
    async fn maybe_pause(&self, op: Op, key: &str) {
        let paused = self
            .state
            .lock()
            .unwrap()
            .paused
            .remove(&(op, key.to_string()));
        if let Some(pause) = paused {
            pause.hold().await;
        }
    }

    /// Cancels the faults [`Self::fail_next`] injected that have not struck yet.
    pub fn heal(&self) {
        self.state.lock().unwrap().faults.clear();
    }

    /// How many requests of kind `op` were made (failed ones included).
    pub fn count(&self, op: Op) -> u64 {
        self.state
            .lock()
            .unwrap()
            .counts
            .get(&op)
            .copied()
            .unwrap_or(0)
    }

    /// Bytes returned by GETs so far.
    pub fn bytes_read(&self) -> u64 {
        self.state.lock().unwrap().bytes_read
    }

    /// Stores an object directly, as another S3 client would.
    pub fn insert(&self, key: &str, data: &[u8], headers: WriteHeaders) {
        let mut state = self.state.lock().unwrap();
        let last_modified = state.now();
        state.objects.insert(
            key.to_string(),
            MemObject {
                data: Bytes::copy_from_slice(data),
                etag: etag_of(data),
                last_modified,
                headers,
            },
        );
    }

    /// Moves the store's clock `by` ahead: later writes carry a later Last-Modified, as if
    /// that much time had passed (S3 times are whole seconds).
    pub fn advance_clock(&self, by: std::time::Duration) {
        self.state.lock().unwrap().clock_ahead += by;
    }

    /// The body and headers of an object, if present.
    pub fn object(&self, key: &str) -> Option<(Bytes, WriteHeaders)> {
        let state = self.state.lock().unwrap();
        state
            .objects
            .get(key)
            .map(|o| (o.data.clone(), o.headers.clone()))
    }

    /// All keys, sorted.
    pub fn keys(&self) -> Vec<String> {
        self.state.lock().unwrap().objects.keys().cloned().collect()
    }

    /// Number of multipart uploads started and neither completed nor aborted.
    pub fn pending_uploads(&self) -> usize {
        self.state.lock().unwrap().uploads.len()
    }

    /// Counts a request and fails it if a fault is armed for its kind.
    fn enter(&self, op: Op) -> StoreResult<std::sync::MutexGuard<'_, State>> {
        let mut state = self.state.lock().unwrap();
        *state.counts.entry(op).or_default() += 1;
        if let Some(n) = state.faults.get_mut(&op)
            && *n > 0
        {
            *n -= 1;
            return Err(StoreError::Unavailable(format!("injected fault on {op:?}")));
        }
        Ok(state)
    }
}

impl State {
    fn now(&self) -> SystemTime {
        SystemTime::now() + self.clock_ahead
    }
}

/// The ETag of a single-part object with body `data` (S3's is its MD5).
fn etag_of(data: &[u8]) -> String {
    format!("\"{}\"", &blake3::hash(data).to_hex()[..32])
}

/// The upload `upload_id`, which must be one of `key`.
fn upload_of<'a>(state: &'a mut State, upload_id: &str, key: &str) -> StoreResult<&'a mut Upload> {
    state
        .uploads
        .get_mut(upload_id)
        .filter(|u| u.key == key)
        .ok_or_else(|| StoreError::NotFound(format!("upload {upload_id}")))
}

fn check_etag(obj: &MemObject, key: &str, if_match: Option<&str>) -> StoreResult<()> {
    match if_match {
        Some(etag) if etag != obj.etag => Err(StoreError::PreconditionFailed(key.to_string())),
        _ => Ok(()),
    }
}

/// Fails unless `expect` holds for `key` (or the store ignores conditions).
fn check_expect(state: &State, key: &str, expect: Expect<'_>) -> StoreResult<()> {
    let current = state.objects.get(key).map(|o| o.etag.as_str());
    let holds = match expect {
        Expect::Any => true,
        Expect::Absent => current.is_none(),
        Expect::ETag(etag) => current == Some(etag),
    };
    if holds || state.ignores_conditions {
        Ok(())
    } else {
        Err(StoreError::PreconditionFailed(key.to_string()))
    }
}

fn clip(range: Range<u64>, len: usize) -> Range<usize> {
    let len = len as u64;
    let start = range.start.min(len) as usize;
    let end = range.end.min(len).max(start as u64) as usize;
    start..end
}

#[async_trait]
impl ObjectStore for MemStore {
    async fn separate(self: std::sync::Arc<Self>) -> std::sync::Arc<dyn ObjectStore> {
        // No connections: the same store serves any runtime.
        self
    }

    async fn head(&self, key: &str) -> StoreResult<ObjectInfo> {
        self.maybe_pause(Op::Head, key).await;
        let state = self.enter(Op::Head)?;
        if state.unreachable_heads.contains(key) {
            return Err(StoreError::Unavailable(format!(
                "injected fault on HEAD {key}"
            )));
        }
        let obj = state
            .objects
            .get(key)
            .ok_or_else(|| StoreError::NotFound(key.to_string()))?;
        Ok(ObjectInfo {
            key: key.to_string(),
            size: obj.data.len() as u64,
            etag: obj.etag.clone(),
            last_modified: obj.last_modified,
            content_type: obj.headers.content_type.clone(),
            metadata: obj.headers.metadata.clone(),
        })
    }

    async fn get_range(
        &self,
        key: &str,
        range: Range<u64>,
        if_match: Option<&str>,
    ) -> StoreResult<Bytes> {
        let mut state = self.enter(Op::Get)?;
        let obj = state
            .objects
            .get(key)
            .ok_or_else(|| StoreError::NotFound(key.to_string()))?;
        check_etag(obj, key, if_match)?;
        let data = obj.data.slice(clip(range, obj.data.len()));
        state.bytes_read += data.len() as u64;
        Ok(data)
    }

    async fn put(
        &self,
        key: &str,
        body: Bytes,
        headers: &WriteHeaders,
        expect: Expect<'_>,
    ) -> StoreResult<String> {
        self.maybe_pause(Op::Put, key).await;
        let etag = etag_of(&body);
        let mut state = self.enter(Op::Put)?;
        check_expect(&state, key, expect)?;
        let last_modified = state.now();
        state.objects.insert(
            key.to_string(),
            MemObject {
                data: body,
                etag: etag.clone(),
                last_modified,
                headers: headers.clone(),
            },
        );
        Ok(etag)
    }

    async fn copy(
        &self,
        src_key: &str,
        dst_key: &str,
        src_if_match: Option<&str>,
        headers: &WriteHeaders,
    ) -> StoreResult<String> {
        self.maybe_pause(Op::Copy, dst_key).await;
        let mut state = self.enter(Op::Copy)?;
        let last_modified = state.now();
        let src = state
            .objects
            .get(src_key)
            .ok_or_else(|| StoreError::NotFound(src_key.to_string()))?;
        check_etag(src, src_key, src_if_match)?;
        let etag = src.etag.clone();
        let copied = MemObject {
            data: src.data.clone(),
            etag: etag.clone(),
            last_modified,
            headers: headers.clone(),
        };
        state.objects.insert(dst_key.to_string(), copied);
        Ok(etag)
    }

    async fn create_multipart(&self, key: &str, headers: &WriteHeaders) -> StoreResult<String> {
        let id = format!("upload-{}", self.next_id.fetch_add(1, Ordering::Relaxed));
        let mut state = self.enter(Op::Multipart)?;
        state.uploads.insert(
            id.clone(),
            Upload {
                key: key.to_string(),
                headers: headers.clone(),
                parts: BTreeMap::new(),
            },
        );
        Ok(id)
    }

    async fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        number: i32,
        body: Bytes,
    ) -> StoreResult<String> {
        let etag = etag_of(&body);
        let mut state = self.enter(Op::UploadPart)?;
        upload_of(&mut state, upload_id, key)?
            .parts
            .insert(number, (etag.clone(), body));
        Ok(etag)
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
        let mut state = self.enter(Op::UploadPart)?;
        let src = state
            .objects
            .get(src_key)
            .ok_or_else(|| StoreError::NotFound(src_key.to_string()))?;
        check_etag(src, src_key, src_if_match)?;
        if range.end > src.data.len() as u64 || range.start >= range.end {
            return Err(StoreError::InvalidRange(src_key.to_string()));
        }
        let body = src.data.slice(range.start as usize..range.end as usize);
        let etag = etag_of(&body);
        upload_of(&mut state, upload_id, key)?
            .parts
            .insert(number, (etag.clone(), body));
        Ok(etag)
    }

    async fn complete_multipart(
        &self,
        key: &str,
        upload_id: &str,
        parts: &[CompletedPart],
        expect: Expect<'_>,
    ) -> StoreResult<String> {
        let mut state = self.enter(Op::Multipart)?;
        check_expect(&state, key, expect)?;
        let upload = state
            .uploads
            .remove(upload_id)
            .filter(|u| u.key == key)
            .ok_or_else(|| StoreError::NotFound(format!("upload {upload_id}")))?;
        let mut data = Vec::new();
        let mut part_etags = String::new();
        for (i, part) in parts.iter().enumerate() {
            let (part_etag, body) = upload
                .parts
                .get(&part.number)
                .ok_or_else(|| StoreError::Other(format!("part {} missing", part.number)))?;
            if *part_etag != part.etag {
                return Err(StoreError::Other(format!("part {} etag", part.number)));
            }
            if i + 1 < parts.len() && (body.len() as u64) < MIN_PART_SIZE {
                return Err(StoreError::Other(format!("part {} too small", part.number)));
            }
            data.extend_from_slice(body);
            part_etags.push_str(part_etag);
        }
        // As S3's: a hash of the parts' ETags and their number.
        let etag = format!(
            "{}-{}\"",
            etag_of(part_etags.as_bytes()).trim_end_matches('"'),
            parts.len()
        );
        let last_modified = state.now();
        state.objects.insert(
            key.to_string(),
            MemObject {
                data: data.into(),
                etag: etag.clone(),
                last_modified,
                headers: upload.headers,
            },
        );
        Ok(etag)
    }

    async fn abort_multipart(&self, _key: &str, upload_id: &str) -> StoreResult<()> {
        let mut state = self.enter(Op::Multipart)?;
        state.uploads.remove(upload_id);
        Ok(())
    }

    async fn delete(&self, key: &str) -> StoreResult<()> {
        self.maybe_pause(Op::Delete, key).await;
        let mut state = self.enter(Op::Delete)?;
        state.objects.remove(key);
        Ok(())
    }

    async fn delete_many(&self, keys: &[String]) -> StoreResult<()> {
        for key in keys {
            self.maybe_pause(Op::Delete, key).await;
        }
        let mut state = self.enter(Op::Delete)?;
        for key in keys {
            state.objects.remove(key);
        }
        Ok(())
    }

    async fn list(
        &self,
        prefix: &str,
        delimiter: Option<&str>,
        token: Option<&str>,
        max_keys: Option<i32>,
    ) -> StoreResult<ListPage> {
        let state = self.enter(Op::List)?;
        let max = max_keys.unwrap_or(1000).clamp(1, 1000) as usize;
        let mut page = ListPage::default();
        let mut count = 0;
        // Entries (objects and common prefixes) come in key order; the token is the last
        // entry returned, as an opaque string.
        let start = token.unwrap_or("");
        let mut last: Option<String> = None;
        for (key, obj) in state.objects.range(prefix.to_string()..) {
            if !key.starts_with(prefix) {
                break;
            }
            let rest = &key[prefix.len()..];
            let common =
                delimiter.and_then(|d| rest.find(d).map(|i| format!("{prefix}{}{d}", &rest[..i])));
            let name = common.clone().unwrap_or_else(|| key.clone());
            if name.as_str() <= start || last.as_ref() == Some(&name) {
                continue;
            }
            if count == max {
                page.next_token = last;
                break;
            }
            count += 1;
            last = Some(name);
            match common {
                Some(p) => page.prefixes.push(p),
                None => page.objects.push(ListedObject {
                    key: key.clone(),
                    size: obj.data.len() as u64,
                    etag: obj.etag.clone(),
                    last_modified: obj.last_modified,
                }),
            }
        }
        Ok(page)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn list_all(store: &MemStore, prefix: &str, max: i32) -> (Vec<String>, Vec<String>) {
        let (mut objects, mut prefixes, mut token) = (vec![], vec![], None::<String>);
        loop {
            let page = store
                .list(prefix, Some("/"), token.as_deref(), Some(max))
                .await
                .unwrap();
            objects.extend(page.objects.into_iter().map(|o| o.key));
            prefixes.extend(page.prefixes);
            match page.next_token {
                Some(t) => token = Some(t),
                None => return (objects, prefixes),
            }
        }
    }

    #[tokio::test]
    async fn listing_groups_by_delimiter_across_pages() {
        let store = MemStore::new();
        for key in ["a/1", "a/2", "a/b/x", "a/b/y", "a/c/", "a/d", "b"] {
            store.insert(key, b"x", WriteHeaders::default());
        }
        for max in [1, 2, 1000] {
            let (objects, prefixes) = list_all(&store, "a/", max).await;
            assert_eq!(objects, ["a/1", "a/2", "a/d"], "max {max}");
            assert_eq!(prefixes, ["a/b/", "a/c/"], "max {max}");
        }
    }

    #[tokio::test]
    async fn if_match_pins_reads() {
        let store = MemStore::new();
        store.insert("k", b"hello", WriteHeaders::default());
        let etag = store.head("k").await.unwrap().etag;
        let got = store.get_range("k", 1..3, Some(&etag)).await.unwrap();
        assert_eq!(&got[..], b"el");
        store.insert("k", b"world", WriteHeaders::default());
        let err = store.get_range("k", 0..5, Some(&etag)).await.unwrap_err();
        assert!(matches!(err, StoreError::PreconditionFailed(_)));
    }

    #[tokio::test]
    async fn faults_fail_the_next_requests_only() {
        let store = MemStore::new();
        store.fail_next(Op::Put, 1);
        assert!(
            store
                .put(
                    "k",
                    Bytes::from_static(b"1"),
                    &WriteHeaders::default(),
                    Expect::Any
                )
                .await
                .is_err()
        );
        assert!(
            store
                .put(
                    "k",
                    Bytes::from_static(b"1"),
                    &WriteHeaders::default(),
                    Expect::Any
                )
                .await
                .is_ok()
        );
        assert_eq!(store.count(Op::Put), 2);
    }
}
