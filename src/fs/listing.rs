//! Listing a directory exactly: LIST pages, and the headers they lack read alongside.
//!
//! ListObjectsV2 gives each object's size, ETag and Last-Modified but none of the s3fs
//! headers that carry type, mode, owner and times. A listing shown without them is a guess
//! that changes once the file is opened — a symlink shown as a 5-byte file, `0600 33:33`
//! shown as `0644 root` — and every program that remembers attributes sees a change that
//! never happened. So [`HeaderReader::list`] reads the headers of every object the inode
//! table does not already know in this version, with HEADs started as soon as the LIST page
//! that names the object arrives, while the next page is fetched (the page loop waits only
//! when the HEADs in flight reach the budget).
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

use tokio::sync::{OnceCell, Semaphore};
use tokio::task::JoinSet;
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
/// Listings run on a thread of their own with a single-threaded runtime and connections of
/// their own ([`ObjectStore::separate`]): a HEAD is a few hundred bytes each way, and on the
/// mount's multi-threaded runtime the SDK's request and its connection's task wake each
/// other across threads at every step. Measured here (10,000 HEADs, 64 in flight, Garage on
/// the same 2 cores): 2.3–2.5 s of client CPU on four workers, 1.2 s on one thread, and the
/// listing takes 1.35 s instead of 2.2 s. A listing is handed over whole and hands back its
/// result whole: one wake-up each way.
pub(super) struct HeaderReader {
    store: Arc<dyn ObjectStore>,
    lister: tokio::runtime::Handle,
    /// Stops the listing thread when the reader is dropped.
    _stop: tokio::sync::oneshot::Sender<()>,
    /// The listing thread's store, opened there on first use.
    apart: Arc<OnceCell<Arc<dyn ObjectStore>>>,
    slots: Arc<Semaphore>,
    /// Read the headers of files too, not only of directory markers (off with
    /// `--trust-listings`).
    files: bool,
}

/// Which entry of a listing a header read is for.
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
                // Runs the listings spawned onto it until the reader is dropped.
                let _ = rt.block_on(stopped);
            })?;
        let lister = handle_rx
            .recv()
            .map_err(|_| std::io::Error::other("the listing thread did not start"))??;
        Ok(HeaderReader {
            store,
            lister,
            _stop: stop,
            apart: Arc::new(OnceCell::new()),
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
            apart: self.apart.clone(),
            slots: self.slots.clone(),
            files: self.files,
        };
        self.lister
            .spawn(job.run(req))
            .await
            .map_err(|e| StoreError::Other(format!("listing: {e}")))?
    }
}

/// What a listing on the listing thread needs.
struct ListJob {
    store: Arc<dyn ObjectStore>,
    apart: Arc<OnceCell<Arc<dyn ObjectStore>>>,
    slots: Arc<Semaphore>,
    files: bool,
}

impl ListJob {
    async fn run(self, req: ListRequest) -> StoreResult<ListOutcome> {
        let store = self
            .apart
            .get_or_init(|| self.store.clone().separate())
            .await
            .clone();
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
        let mut reads: JoinSet<(Slot, StoreResult<Headers>)> = JoinSet::new();
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
            for obj in page.objects {
                let version = ObjectVersion::new(&obj.etag, obj.size, obj.last_modified);
                match names::classify_object(&prefix, &obj.key) {
                    Listed::Marker => {
                        // The root's attributes come from the mount options.
                        let news = dir.ino != crate::meta::ROOT_INO
                            && !(dir.headers_known && dir.holds(&version));
                        if news {
                            self.spawn(&store, &mut reads, Slot::Marker, obj.key.clone())
                                .await;
                        }
                        listing.marker = Some((version, Headers::Unread));
                    }
                    Listed::File(name) => {
                        let row = known.get(name);
                        if self.files && needs_headers(row, &version) {
                            let slot = Slot::File(listing.files.len());
                            self.spawn(&store, &mut reads, slot, obj.key.clone()).await;
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
                            let slot = Slot::Dir(listing.dirs.len());
                            self.spawn(&store, &mut reads, slot, p.clone()).await;
                        }
                        listing.dirs.push(ListedDir {
                            name: name.to_string(),
                            marker: Headers::Unread,
                        });
                    }
                    _ => hidden.push(p.clone()),
                }
            }
        }
        while let Some(done) = reads.join_next().await {
            let (slot, result) =
                done.map_err(|e| StoreError::Other(format!("header read: {e}")))?;
            let headers = match result {
                Ok(h) => h,
                // The server is gone: the listing fails as a whole, and what was known of the
                // directory is served until it is back.
                Err(e @ StoreError::Unavailable(_)) => return Err(e),
                // One object refused (permissions, say): shown once its headers can be read.
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
        Ok(ListOutcome { listing, hidden })
    }

    /// Starts reading the headers of `key` once a slot of the budget is free (waiting for it
    /// here keeps the number of reads queued, not only of those in flight, bounded).
    async fn spawn(
        &self,
        store: &Arc<dyn ObjectStore>,
        reads: &mut JoinSet<(Slot, StoreResult<Headers>)>,
        slot: Slot,
        key: String,
    ) {
        let permit = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .expect("the header budget is never closed");
        let store = store.clone();
        reads.spawn(async move {
            let result = read_object(&store, &key).await;
            drop(permit);
            (slot, result)
        });
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
