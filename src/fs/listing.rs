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

use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tracing::debug;

use crate::meta::names::{self, HiddenKeyLog, Listed};
use crate::meta::{
    Headers, Inode, Kind, ListedDir, ListedFile, Listing, ObjectMeta, ObjectVersion,
};
use crate::store::{ObjectStore, StoreError, StoreResult};

/// HEAD requests in flight for listings, for the whole mount (see the module docs).
pub const HEADS_IN_FLIGHT: usize = 64;

/// Reads object headers for listings, within one budget of requests in flight.
pub(super) struct HeaderReader {
    store: Arc<dyn ObjectStore>,
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

impl HeaderReader {
    /// A reader over `store`; `files`: whether file headers are read (else only markers').
    pub fn new(store: Arc<dyn ObjectStore>, files: bool) -> Self {
        HeaderReader {
            store,
            slots: Arc::new(Semaphore::new(HEADS_IN_FLIGHT)),
            files,
        }
    }

    /// The headers of the object `key` as it is now, and for a symlink its target (its body,
    /// read in the same breath so that `ls -l` and `find -L` need no request of their own).
    pub async fn read(&self, key: &str) -> StoreResult<Headers> {
        read_object(&self.store, key).await
    }

    /// The complete listing of the directory with key prefix `prefix`, with the headers of
    /// every entry that `known` (the directory's rows, by name) does not already show in the
    /// listed version. Keys that cannot be names are logged through `hidden` and skipped.
    pub async fn list(
        &self,
        prefix: &str,
        known: &HashMap<String, Inode>,
        dir: &Inode,
        started_at: i64,
        hidden: &HiddenKeyLog,
    ) -> StoreResult<Listing> {
        let mut listing = Listing {
            started_at,
            ..Default::default()
        };
        let mut reads: JoinSet<(Slot, StoreResult<Headers>)> = JoinSet::new();
        let mut next = Some(self.page(prefix, None));
        while let Some(fetching) = next.take() {
            let page = fetching
                .await
                .map_err(|e| StoreError::Other(format!("listing: {e}")))??;
            // The next page is asked for while this one's headers are read.
            next = page.next_token.clone().map(|t| self.page(prefix, Some(t)));
            for obj in page.objects {
                let version = ObjectVersion::new(&obj.etag, obj.size, obj.last_modified);
                match names::classify_object(prefix, &obj.key) {
                    Listed::Marker => {
                        // The root's attributes come from the mount options.
                        let news = dir.ino != crate::meta::ROOT_INO
                            && !(dir.headers_known && dir.holds(&version));
                        if news {
                            self.spawn(&mut reads, Slot::Marker, obj.key.clone()).await;
                        }
                        listing.marker = Some((version, Headers::Unread));
                    }
                    Listed::File(name) => {
                        let row = known.get(name);
                        if self.files && needs_headers(row, &version) {
                            let slot = Slot::File(listing.files.len());
                            self.spawn(&mut reads, slot, obj.key.clone()).await;
                        }
                        listing.files.push(ListedFile {
                            name: name.to_string(),
                            version,
                            headers: Headers::Unread,
                        });
                    }
                    _ => hidden.hide(&obj.key),
                }
            }
            for p in page.prefixes {
                match names::classify_prefix(prefix, &p) {
                    Listed::Dir(name) => {
                        let known_dir = known
                            .get(name)
                            .is_some_and(|r| r.kind == Kind::Dir && r.headers_known);
                        if !known_dir {
                            let slot = Slot::Dir(listing.dirs.len());
                            self.spawn(&mut reads, slot, p.clone()).await;
                        }
                        listing.dirs.push(ListedDir {
                            name: name.to_string(),
                            marker: Headers::Unread,
                        });
                    }
                    _ => hidden.hide(&p),
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
        Ok(listing)
    }

    /// Starts fetching the page of `prefix` after `token`.
    fn page(
        &self,
        prefix: &str,
        token: Option<String>,
    ) -> tokio::task::JoinHandle<StoreResult<crate::store::ListPage>> {
        let (store, prefix) = (self.store.clone(), prefix.to_string());
        tokio::spawn(async move { store.list(&prefix, Some("/"), token.as_deref(), None).await })
    }

    /// Starts reading the headers of `key` once a slot of the budget is free (waiting for it
    /// here keeps the number of reads queued, not only of those in flight, bounded).
    async fn spawn(
        &self,
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
        let store = self.store.clone();
        reads.spawn(async move {
            let result = read_object(&store, &key).await;
            drop(permit);
            (slot, result)
        });
    }
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
