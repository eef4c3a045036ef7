//! Listing a directory exactly: LIST pages, and the headers they lack read alongside.
//!
//! ListObjectsV2 gives each object's size, ETag and Last-Modified but none of the s3fs
//! headers that carry type, mode, owner and times. A listing shown without them is a guess
//! that changes once the file is opened — a symlink shown as a 5-byte file, `0600 33:33`
//! shown as `0644 root` — and every program that remembers attributes sees a change that
//! never happened. So [`HeaderReader::list`] reads the headers of every object the inode
//! table does not already know in this version, with HEADs started as soon as the LIST page
//! that names the object arrives, while the next page is fetched. Each page is sent on
//! ([`ListEvent`]) as soon as its headers are in, so the table takes it in while the next
//! pages' HEADs run, rather than all 10,000 rows after the last one.
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
use tokio::sync::{OnceCell, Semaphore, mpsc};
use tracing::debug;

use crate::meta::names::{self, Listed};
use crate::meta::{Headers, Inode, Kind, ListedDir, ListedFile, ObjectMeta, ObjectVersion};
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

/// A directory to list: its key prefix, its rows by name, and its own row.
pub(super) struct ListRequest {
    pub prefix: String,
    pub known: HashMap<String, Inode>,
    pub dir: Inode,
}

/// What a listing sends, in order: entries as their pages come in with their headers read,
/// then the end.
pub(super) enum ListEvent {
    /// The entries of one or more pages. A file whose name a later page may show as a
    /// directory too is held back until that page is in, so that both come in one event.
    Entries {
        files: Vec<ListedFile>,
        dirs: Vec<ListedDir>,
    },
    /// The listing is complete.
    End(Box<ListEnd>),
}

/// The end of a complete listing.
pub(super) struct ListEnd {
    /// The directory's own marker object, if the listing showed one, and what reading its
    /// headers gave.
    pub marker: Option<(ObjectVersion, Headers)>,
    /// Keys skipped because they cannot be names.
    pub hidden: Vec<String>,
    /// How many headers were read.
    pub headers_read: usize,
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

    /// Lists the directory `req` names, with the headers of every entry whose row does not
    /// already show it in the listed version, sending what it finds as it comes in. An error
    /// ends the listing; so does dropping the receiver.
    pub fn list(&self, req: ListRequest) -> mpsc::Receiver<StoreResult<ListEvent>> {
        let (events, received) = mpsc::channel(PAGES_AHEAD);
        let job = ListJob {
            store: self.store.clone(),
            thread: self.thread.clone(),
            slots: self.slots.clone(),
            files: self.files,
        };
        self.thread.runtime.spawn(async move {
            if let Err(e) = job.run(req, &events).await {
                let _ = events.send(Err(e)).await;
            }
        });
        received
    }
}

/// Pages with their headers read that may wait for the table to take them in: it writes a
/// page of 1,000 entries in about 10 ms, far sooner than the page's HEADs come back, so
/// the queue is short anyway; the bound only keeps a stalled table from piling them up.
const PAGES_AHEAD: usize = 4;

/// A listing, on the listing thread.
struct ListJob {
    store: Arc<dyn ObjectStore>,
    thread: Arc<Lister>,
    slots: Arc<Semaphore>,
    files: bool,
}

/// A header read queued for a listing's reader ([`read_in_order`]): the key, and where its
/// page collects the answer.
type HeadRequest = (String, Slot, mpsc::UnboundedSender<HeadAnswer>);

/// What a header read gave, for which entry of its page.
type HeadAnswer = (Slot, StoreResult<Headers>);

/// One page, its header reads queued.
struct Fetched {
    files: Vec<ListedFile>,
    dirs: Vec<ListedDir>,
    marker: Option<(ObjectVersion, Headers)>,
    hidden: Vec<String>,
    /// Where the page's header reads answer, and how many there are.
    reads: Option<(mpsc::UnboundedReceiver<HeadAnswer>, usize)>,
    /// The greatest key or prefix of the page, less the directory's prefix: later pages
    /// show only greater ones.
    last: String,
    final_page: bool,
}

/// A task that is cancelled when its handle is dropped (a listing that ends early leaves
/// nothing running).
struct Aborting<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for Aborting<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl ListJob {
    /// Fetches pages (a task of its own, one page ahead) and sends each page's entries once
    /// their headers are read.
    async fn run(
        self,
        req: ListRequest,
        events: &mpsc::Sender<StoreResult<ListEvent>>,
    ) -> StoreResult<()> {
        let store = self.thread.store(&self.store).await;
        let (pages, mut fetched) = mpsc::unbounded_channel();
        let (heads, queued) = mpsc::unbounded_channel();
        let _reading = Aborting(tokio::spawn(read_in_order(
            store.clone(),
            self.slots.clone(),
            queued,
        )));
        let _fetching = Aborting(tokio::spawn(self.fetch(store, req, pages, heads)));
        let mut end = ListEnd {
            marker: None,
            hidden: Vec::new(),
            headers_read: 0,
        };
        // Files held back: a later page may show their name as a directory too.
        let mut held: Vec<ListedFile> = Vec::new();
        loop {
            let Some(page) = fetched.recv().await else {
                return Err(StoreError::Other("listing: the page reader stopped".into()));
            };
            let mut page = page?;
            if let Some((mut answers, count)) = page.reads.take() {
                end.headers_read += count;
                for _ in 0..count {
                    let Some((slot, result)) = answers.recv().await else {
                        return Err(StoreError::Other(
                            "listing: the header reader stopped".into(),
                        ));
                    };
                    let headers = match result {
                        Ok(h) => h,
                        // The server is gone: the listing fails as a whole, and what was
                        // known of the directory is served until it is back.
                        Err(e @ StoreError::Unavailable(_)) => return Err(e),
                        // One object refused (permissions, say): shown once its headers can
                        // be read.
                        Err(e) => {
                            debug!("headers not read: {e}");
                            Headers::Unread
                        }
                    };
                    match slot {
                        Slot::File(i) => page.files[i].headers = headers,
                        Slot::Dir(i) => page.dirs[i].marker = headers,
                        Slot::Marker => {
                            if let Some((_, h)) = page.marker.as_mut() {
                                *h = headers;
                            }
                        }
                    }
                }
            }
            if page.marker.is_some() {
                end.marker = page.marker.take();
            }
            end.hidden.append(&mut page.hidden);
            held.extend(page.files);
            let (files, later) = held
                .into_iter()
                .partition(|f| page.final_page || !may_come_as_dir(&f.name, &page.last));
            held = later;
            let entries = ListEvent::Entries {
                files,
                dirs: page.dirs,
            };
            if events.send(Ok(entries)).await.is_err() {
                return Ok(());
            }
            if page.final_page {
                let _ = events.send(Ok(ListEvent::End(Box::new(end)))).await;
                return Ok(());
            }
        }
    }

    /// Fetches the pages of `req`'s prefix in order, each while the headers of the one
    /// before are read, and sends them with their header reads queued.
    async fn fetch(
        self,
        store: Arc<dyn ObjectStore>,
        req: ListRequest,
        pages: mpsc::UnboundedSender<StoreResult<Fetched>>,
        heads: mpsc::UnboundedSender<HeadRequest>,
    ) {
        let ListRequest { prefix, known, dir } = req;
        let mut next = Some(page(&store, &prefix, None));
        while let Some(fetching) = next.take() {
            let listed = match fetching.await {
                Ok(listed) => listed,
                Err(e) => Err(StoreError::Other(format!("listing: {e}"))),
            };
            let listed = match listed {
                Ok(p) => p,
                Err(e) => {
                    let _ = pages.send(Err(e));
                    return;
                }
            };
            // The next page is asked for while this one's headers are read.
            next = listed
                .next_token
                .clone()
                .map(|t| self::page(&store, &prefix, Some(t)));
            let last = match (listed.objects.last(), listed.prefixes.last()) {
                (Some(o), Some(p)) => o.key.as_str().max(p.as_str()),
                (Some(o), None) => o.key.as_str(),
                (None, Some(p)) => p.as_str(),
                (None, None) => prefix.as_str(),
            }[prefix.len()..]
                .to_string();
            let mut fetched = Fetched {
                files: Vec::new(),
                dirs: Vec::new(),
                marker: None,
                hidden: Vec::new(),
                reads: None,
                last,
                final_page: next.is_none(),
            };
            // The page's header reads, queued as the page is read.
            let (answer, answers) = mpsc::unbounded_channel();
            let mut reads = 0;
            let mut read = |key: String, slot: Slot| {
                reads += 1;
                heads.send((key, slot, answer.clone())).is_ok()
            };
            let mut reader_gone = false;
            for obj in listed.objects {
                let version = ObjectVersion::new(&obj.etag, obj.size, obj.last_modified);
                match names::classify_object(&prefix, &obj.key) {
                    Listed::Marker => {
                        // The root's attributes come from the mount options.
                        let news = dir.ino != crate::meta::ROOT_INO
                            && !(dir.headers_known && dir.holds(&version));
                        if news {
                            reader_gone |= !read(obj.key.clone(), Slot::Marker);
                        }
                        fetched.marker = Some((version, Headers::Unread));
                    }
                    Listed::File(name) => {
                        if self.files && needs_headers(known.get(name), &version) {
                            let slot = Slot::File(fetched.files.len());
                            reader_gone |= !read(obj.key.clone(), slot);
                        }
                        fetched.files.push(ListedFile {
                            name: name.to_string(),
                            version,
                            headers: Headers::Unread,
                        });
                    }
                    _ => fetched.hidden.push(obj.key),
                }
            }
            for p in listed.prefixes {
                match names::classify_prefix(&prefix, &p) {
                    Listed::Dir(name) => {
                        let known_dir = known
                            .get(name)
                            .is_some_and(|r| r.kind == Kind::Dir && r.headers_known);
                        if !known_dir {
                            reader_gone |= !read(p.clone(), Slot::Dir(fetched.dirs.len()));
                        }
                        fetched.dirs.push(ListedDir {
                            name: name.to_string(),
                            marker: Headers::Unread,
                        });
                    }
                    _ => fetched.hidden.push(p),
                }
            }
            if reader_gone {
                return;
            }
            if reads > 0 {
                fetched.reads = Some((answers, reads));
            }
            if pages.send(Ok(fetched)).is_err() {
                return;
            }
        }
    }
}

/// Reads the headers a listing queues, in the order queued — page by page, so that each
/// page is complete as early as it can be and goes into the table while later pages' HEADs
/// run — up to [`HEADS_IN_FLIGHT`] at once, within the mount's budget `slots` (shared
/// with the other listings: each holds at most its own 64 places in that queue).
async fn read_in_order(
    store: Arc<dyn ObjectStore>,
    slots: Arc<Semaphore>,
    mut queued: mpsc::UnboundedReceiver<HeadRequest>,
) {
    futures::stream::poll_fn(|cx| queued.poll_recv(cx))
        .map(|(key, slot, answer)| {
            let (store, slots) = (store.clone(), slots.clone());
            async move {
                let _permit = slots.acquire().await.expect("never closed");
                let _ = answer.send((slot, read_object(&store, &key).await));
            }
        })
        .buffer_unordered(HEADS_IN_FLIGHT)
        .for_each(|()| async {})
        .await
}

/// Whether a later page, whose entries all sort after `last`, may show the file `name` as a
/// directory too (the prefix `name/`); both are relative to the directory's prefix.
fn may_come_as_dir(name: &str, last: &str) -> bool {
    name.bytes().chain(*b"/").cmp(last.bytes()) == std::cmp::Ordering::Greater
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
