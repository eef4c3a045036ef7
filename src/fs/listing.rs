//! Listing a directory exactly: LIST pages, and the headers they lack read alongside.
//!
//! ListObjectsV2 gives each object's size, ETag and Last-Modified but none of the s3fs
//! headers that carry type, mode, owner and times. A listing shown without them is a guess
//! that changes once the file is opened — a symlink shown as a 5-byte file, `0600 33:33`
//! shown as `0644 root` — and every program that remembers attributes sees a change that
//! never happened. So [`HeaderReader::list`] reads the headers of every object the inode
//! table does not already know in this version, with HEADs started as soon as the LIST page
//! that names the object arrives, while the next page is fetched.
//!
//! Numbers behind [`HEADS_IN_FLIGHT`]: a HEAD costs one round trip and almost no transfer,
//! so a listing of 10,000 unknown objects is 10,000 round trips; at 10 ms each (S3 in region,
//! or 5 ms each way through the benches' latency proxy) 64 in flight read them in about
//! 1.6 s, where s3fs's 20 take 5 s. On 127.0.0.1 the server's CPU is the limit well before 64.
//! The bound is shared by all listings of the mount, so ten `ls` at once do not make 640.
//!
//! Objects this mount wrote, and objects whose headers were read before in the same version
//! (ETag, size, Last-Modified; kept in the inode table across remounts), are not read again:
//! a warm listing costs LIST pages only.

use std::collections::HashMap;
use std::sync::Arc;

use futures::StreamExt;
use tokio::sync::{OnceCell, Semaphore};
use tracing::debug;

use crate::meta::names::{self, Listed};
use crate::meta::{
    Headers, Inode, Kind, ListedDir, ListedFile, Listing, ObjectMeta, ObjectVersion,
};
use crate::store::{ListPage, ObjectStore, StoreError, StoreResult};

/// HEAD requests in flight for listings, for the whole mount (see the module docs).
pub const HEADS_IN_FLIGHT: usize = 64;

/// Reads object headers for listings, within one budget of requests in flight.
///
/// Listings run on a thread of their own, with a single-threaded runtime and connections of
/// its own ([`ObjectStore::separate`]): a HEAD is a few hundred bytes each way, and on the
/// mount's multi-threaded runtime a request and its connection's task wake each other across
/// threads at every step (measured with the SDK's HEADs: 2.3–2.5 s of client CPU for 10,000
/// on the mount's workers against 1.2 s on one thread). With HEADs sent past the SDK's
/// pipeline (`store/direct.rs`), 10,000 take ~0.7 s of that thread for a 1.5 s listing here,
/// so one thread keeps the 64 in flight busy with room to spare, and a second one measured no
/// faster (1.56–1.82 s against 1.46–1.56 s): on two cores it only takes the server's.
pub(super) struct HeaderReader {
    store: Arc<dyn ObjectStore>,
    thread: Arc<Lister>,
    slots: Arc<Semaphore>,
    /// Read the headers of files too, not only of directory markers (off with
    /// `--trust-listings`).
    files: bool,
}

/// The listing thread.
struct Lister {
    runtime: tokio::runtime::Handle,
    /// Stops the thread when the reader is dropped.
    _stop: tokio::sync::oneshot::Sender<()>,
    /// The thread's store, opened there on first use.
    store: OnceCell<Arc<dyn ObjectStore>>,
}

impl Lister {
    fn start() -> std::io::Result<Lister> {
        let (handle_tx, handle_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("s3bridge-list".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = handle_tx.send(Err(e));
                        return;
                    }
                };
                let _ = handle_tx.send(Ok(rt.handle().clone()));
                // Runs what is spawned onto it until the reader is dropped.
                let _ = rt.block_on(stopped);
            })?;
        let runtime = handle_rx
            .recv()
            .map_err(|_| std::io::Error::other("a listing thread did not start"))??;
        Ok(Lister {
            runtime,
            _stop: stop,
            store: OnceCell::new(),
        })
    }

    /// This thread's store, separated from `shared` on first use (on this thread).
    async fn store(&self, shared: &Arc<dyn ObjectStore>) -> Arc<dyn ObjectStore> {
        self.store
            .get_or_init(|| shared.clone().separate())
            .await
            .clone()
    }
}

/// Which entry of a listing a header read is for.
#[derive(Clone, Copy)]
enum Slot {
    File(usize),
    Dir(usize),
    Marker,
}

/// A directory to list: its key prefix, its rows by name, its own row, and when the listing
/// started ([`crate::meta::now_ns`]).
pub(super) struct ListRequest {
    pub prefix: String,
    pub known: HashMap<String, Inode>,
    pub dir: Inode,
    pub started_at: i64,
}

/// A listing and the keys it skipped because they cannot be names.
pub(super) struct ListOutcome {
    pub listing: Listing,
    pub hidden: Vec<String>,
}

impl HeaderReader {
    /// A reader over `store`; `files`: whether file headers are read (else only markers').
    pub fn new(store: Arc<dyn ObjectStore>, files: bool) -> std::io::Result<Self> {
        Ok(HeaderReader {
            store,
            thread: Arc::new(Lister::start()?),
            slots: Arc::new(Semaphore::new(HEADS_IN_FLIGHT)),
            files,
        })
    }

    /// The headers of the object `key` as it is now, and for a symlink its target (its body,
    /// read in the same breath so that `ls -l` and `find -L` need no request of their own).
    pub async fn read(&self, key: &str) -> StoreResult<Headers> {
        read_object(&self.store, key).await
    }

    /// The complete listing of the directory `req` names, with the headers of every entry
    /// whose row does not already show it in the listed version.
    pub async fn list(&self, req: ListRequest) -> StoreResult<ListOutcome> {
        let job = ListJob {
            store: self.store.clone(),
            thread: self.thread.clone(),
            slots: self.slots.clone(),
            files: self.files,
        };
        self.thread
            .runtime
            .spawn(job.run(req))
            .await
            .map_err(|e| StoreError::Other(format!("listing: {e}")))?
    }
}

/// A listing, on the listing thread.
struct ListJob {
    store: Arc<dyn ObjectStore>,
    thread: Arc<Lister>,
    slots: Arc<Semaphore>,
    files: bool,
}

/// The header reads of one page, and where their results go.
type Batch = Vec<(Slot, String)>;

impl ListJob {
    async fn run(self, req: ListRequest) -> StoreResult<ListOutcome> {
        let store = self.thread.store(&self.store).await;
        let ListRequest {
            prefix,
            known,
            dir,
            started_at,
        } = req;
        let mut listing = Listing {
            started_at,
            ..Default::default()
        };
        let mut hidden = Vec::new();
        let mut batches = Vec::new();
        let mut next = Some(page(&store, &prefix, None));
        while let Some(fetching) = next.take() {
            let page = fetching
                .await
                .map_err(|e| StoreError::Other(format!("listing: {e}")))??;
            // The next page is asked for while this one's headers are read.
            next = page
                .next_token
                .clone()
                .map(|t| self::page(&store, &prefix, Some(t)));
            let mut batch = Batch::new();
            for obj in page.objects {
                let version = ObjectVersion::new(&obj.etag, obj.size, obj.last_modified);
                match names::classify_object(&prefix, &obj.key) {
                    Listed::Marker => {
                        // The root's attributes come from the mount options.
                        let news = dir.ino != crate::meta::ROOT_INO
                            && !(dir.headers_known && dir.holds(&version));
                        if news {
                            batch.push((Slot::Marker, obj.key.clone()));
                        }
                        listing.marker = Some((version, Headers::Unread));
                    }
                    Listed::File(name) => {
                        if self.files && needs_headers(known.get(name), &version) {
                            batch.push((Slot::File(listing.files.len()), obj.key.clone()));
                        }
                        listing.files.push(ListedFile {
                            name: name.to_string(),
                            version,
                            headers: Headers::Unread,
                        });
                    }
                    _ => hidden.push(obj.key.clone()),
                }
            }
            for p in page.prefixes {
                match names::classify_prefix(&prefix, &p) {
                    Listed::Dir(name) => {
                        let known_dir = known
                            .get(name)
                            .is_some_and(|r| r.kind == Kind::Dir && r.headers_known);
                        if !known_dir {
                            batch.push((Slot::Dir(listing.dirs.len()), p.clone()));
                        }
                        listing.dirs.push(ListedDir {
                            name: name.to_string(),
                            marker: Headers::Unread,
                        });
                    }
                    _ => hidden.push(p.clone()),
                }
            }
            if !batch.is_empty() {
                batches.push(self.read_batch(&store, batch));
            }
        }
        for reading in batches {
            let results = reading
                .await
                .map_err(|e| StoreError::Other(format!("header reads: {e}")))?;
            for (slot, result) in results {
                let headers = match result {
                    Ok(h) => h,
                    // The server is gone: the listing fails as a whole, and what was known of
                    // the directory is served until it is back.
                    Err(e @ StoreError::Unavailable(_)) => return Err(e),
                    // One object refused (permissions, say): shown once its headers can be
                    // read.
                    Err(e) => {
                        debug!(prefix, "headers not read: {e}");
                        Headers::Unread
                    }
                };
                match slot {
                    Slot::File(i) => listing.files[i].headers = headers,
                    Slot::Dir(i) => listing.dirs[i].marker = headers,
                    Slot::Marker => {
                        if let Some((_, h)) = listing.marker.as_mut() {
                            *h = headers;
                        }
                    }
                }
            }
        }
        Ok(ListOutcome { listing, hidden })
    }

    /// Starts the header reads of one page's batch (on the listing thread, whose store is
    /// `store`), within the mount's budget of reads in flight.
    fn read_batch(
        &self,
        store: &Arc<dyn ObjectStore>,
        batch: Batch,
    ) -> tokio::task::JoinHandle<Vec<(Slot, StoreResult<Headers>)>> {
        let (store, slots) = (store.clone(), self.slots.clone());
        tokio::spawn(async move {
            futures::stream::iter(batch)
                .map(|(slot, key)| {
                    let (store, slots) = (store.clone(), slots.clone());
                    async move {
                        let _permit = slots.acquire().await.expect("never closed");
                        (slot, read_object(&store, &key).await)
                    }
                })
                .buffer_unordered(HEADS_IN_FLIGHT)
                .collect()
                .await
        })
    }
}

/// Starts fetching the page of `prefix` after `token`.
fn page(
    store: &Arc<dyn ObjectStore>,
    prefix: &str,
    token: Option<String>,
) -> tokio::task::JoinHandle<StoreResult<ListPage>> {
    let (store, prefix) = (store.clone(), prefix.to_string());
    tokio::spawn(async move { store.list(&prefix, Some("/"), token.as_deref(), None).await })
}

/// Whether the headers of a listed object must be read: unless its row shows this version
/// with its headers, or holds local changes (which are newer than any listing).
fn needs_headers(row: Option<&Inode>, version: &ObjectVersion) -> bool {
    match row {
        Some(r) if r.dirty => false,
        Some(r) => r.kind == Kind::Dir || !r.headers_known || !r.holds(version),
        None => true,
    }
}

/// HEAD of `key` (and the body of a symlink); a missing object is [`Headers::Gone`].
async fn read_object(store: &Arc<dyn ObjectStore>, key: &str) -> StoreResult<Headers> {
    let info = match store.head(key).await {
        Ok(info) => info,
        Err(StoreError::NotFound(_)) => return Ok(Headers::Gone),
        Err(e) => return Err(e),
    };
    let version = ObjectVersion::new(&info.etag, info.size, info.last_modified);
    let mut meta = ObjectMeta::new(version, &info.metadata);
    if meta.kind() == Kind::Symlink {
        match store.get_range(key, 0..info.size, Some(&info.etag)).await {
            Ok(body) => meta.symlink_target = String::from_utf8(body.to_vec()).ok(),
            // Read when it is asked for (readlink), pinned to the version it then has.
            Err(e) => debug!(key, "symlink target not read with its headers: {e}"),
        }
    }
    Ok(Headers::Read(meta))
}
