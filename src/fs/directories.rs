//! The tree as this mount shows it: lookups, attributes, listings and `readdir`.
//!
//! [`Directories`] owns what the mount knows of the bucket's names — the inode table's rows
//! (shared with the rest of [`super::Fs`]), the listing reader and the kernel's view of them
//! — and brings it up to date when it is stale: a row is trusted for `--metadata-ttl`, then
//! a lookup probes the name (a HEAD and a one-key LIST at once) or lists its directory again,
//! and a `stat` shows the object's own headers from the first look (design.md §4). A listing
//! is applied page by page as its headers are read, and what it finds changed outside this
//! mount reaches the kernel's caches and the open files before the answer does.
//!
//! The operations that change names (create, rename, unlink: `namespace.rs`) and contents
//! (`files.rs`) run on [`super::Fs`] and use this part for the rows, keys and locks of the
//! directories they change.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use tracing::{debug, instrument};

use super::files::{self, OpenFile};
use super::kernel::{Invalidation, KernelView};
use super::locks::LockMap;
use super::open_table::{self, OpenTable};
use super::{Attr, DirEntry, FsError, FsResult, Opened, changes, listing};
use crate::cache::staging::Original;
use crate::config::MetadataTtl;
use crate::meta::names::{self, HiddenKeyLog};
use crate::meta::objects::SYMLINK_MAX;
use crate::meta::{
    Changes, EntryDefaults, Found, Headers, Inode, InodeTable, Kind, ObjectMeta, ObjectVersion,
    ROOT_INO, Timestamp, now_ns,
};
use crate::store::{ObjectStore, StoreError};

/// Directory entries returned per readdir call. The kernel's buffer (4 KiB, a page) takes
/// about a hundred entries; 1,024 leaves room for long pages without copying the whole
/// listing of a 100,000-entry directory on every call.
const READDIR_BATCH: usize = 1024;

/// Directories with fewer entries than one LIST page are listed again, rather than probed,
/// when a lookup in them finds their listing stale.
const RELIST_MAX_ENTRIES: u64 = 1000;

/// Entries prepared per READDIRPLUS request: the kernel's 4 KiB buffer holds about 25 with
/// their attributes, and each one prepared but not sent is wasted work.
const READDIRPLUS_BATCH: usize = 32;

/// What of the mount's configuration the tree's view depends on.
#[derive(Debug, Clone)]
pub(super) struct TreeSettings {
    /// The key prefix the mount shows (empty, or ending in `/`).
    pub(super) prefix: String,
    /// How long a row or listing is trusted before the bucket is asked again.
    pub(super) metadata_ttl: MetadataTtl,
    /// Show a file as its listing describes it until it is opened (`--trust-listings`).
    pub(super) trust_listings: bool,
}

/// Lookups, attributes and listings of the mount's tree (see the module docs).
pub(super) struct Directories {
    cfg: TreeSettings,
    meta: Arc<InodeTable>,
    store: Arc<dyn ObjectStore>,
    defaults: EntryDefaults,
    /// Reads the headers that listings lack, within one budget of requests.
    headers: listing::HeaderReader,
    /// Keys a listing skipped (names no POSIX entry can have), reported once each.
    hidden: HiddenKeyLog,
    /// Open inodes and handles, whose live attributes are newer than their rows.
    open: Arc<OpenTable>,
    /// The lock of each directory whose entries are being changed or listed.
    pub(super) locks: LockMap,
    /// Keys this mount is changing, which listings running meanwhile leave alone.
    pub(super) local: changes::LocalChanges,
    /// What the kernel holds of this mount, and its caches to tell what changed.
    pub(super) view: KernelView,
    /// This part, for listings it runs behind an answer (set by [`Self::start_background`]).
    me: OnceLock<Weak<Directories>>,
    /// The cache directory's lock (`flock`), held by this part rather than by `Fs`: a
    /// listing behind an answer may still write the inode table after the rest of the
    /// filesystem is dropped, and no other mount may open the directory meanwhile.
    _cache_lock: Option<std::fs::File>,
}

impl Directories {
    /// The tree over `meta`, reading the bucket through `store`.
    pub(super) fn new(
        cfg: TreeSettings,
        meta: Arc<InodeTable>,
        store: Arc<dyn ObjectStore>,
        defaults: EntryDefaults,
        open: Arc<OpenTable>,
    ) -> FsResult<Self> {
        let headers = listing::HeaderReader::new(store.clone(), !cfg.trust_listings)?;
        let view = KernelView::new(cfg.metadata_ttl);
        Ok(Directories {
            cfg,
            meta,
            store,
            defaults,
            headers,
            hidden: HiddenKeyLog::default(),
            open,
            locks: LockMap::default(),
            local: changes::LocalChanges::default(),
            view,
            me: OnceLock::new(),
            _cache_lock: None,
        })
    }

    /// Holds `lock`, the cache directory's, for as long as this part lives.
    pub(super) fn holding(self, lock: std::fs::File) -> Self {
        Directories {
            _cache_lock: Some(lock),
            ..self
        }
    }

    /// Lets this part run work behind an answer: a listing a path walk does not wait for,
    /// and the expiry of the kernel's cached entries. Until then that work is done inline
    /// or not at all (unit tests).
    pub(super) fn start_background(self: &Arc<Self>) {
        let _ = self.me.set(Arc::downgrade(self));
    }

    /// Whether what was confirmed at `at` (ns since the epoch) is still within the TTL.
    pub(super) fn fresh(&self, at: i64) -> bool {
        self.cfg.metadata_ttl.is_fresh(at, now_ns())
    }

    /// The current attributes of `ino`: an open file's live state, else the table's row.
    pub(super) fn inode(&self, ino: u64) -> FsResult<Inode> {
        if let Some(f) = self.open_file_of(ino) {
            return Ok(f.attrs());
        }
        self.meta.get(ino)?.ok_or(FsError::NotFound)
    }

    /// Saves `inode` to the table and to the live state of an open file.
    pub(super) fn save(&self, inode: &Inode) -> FsResult<()> {
        self.meta.save(inode)?;
        if let Some(f) = self.open_file_of(inode.ino) {
            f.set_attrs(inode.clone());
        }
        Ok(())
    }

    /// Marks the listing of directory `dir` stale, so the next look lists it again (an entry
    /// appeared in the bucket that the listing does not have).
    pub(super) fn listing_is_stale(&self, dir: u64) -> FsResult<()> {
        self.meta.mark_listing_stale(dir)?;
        // Nor may the kernel serve the entries it cached (not waited for: callers hold locks).
        self.view
            .kernel()
            .invalidate(Invalidation::Inode(dir), None);
        Ok(())
    }

    /// The open state of `ino`, if it is open.
    pub(super) fn open_file_of(&self, ino: u64) -> Option<Arc<OpenFile>> {
        self.open.file(ino)
    }

    /// The current attributes of directory `ino` (ENOTDIR if it is not one).
    pub(super) fn dir(&self, ino: u64) -> FsResult<Inode> {
        let dir = self.inode(ino)?;
        if dir.kind != Kind::Dir {
            return Err(FsError::NotDir);
        }
        Ok(dir)
    }

    /// Key of an entry; directories get their trailing `/` (the root: the prefix itself).
    pub(super) fn key_of(&self, inode: &Inode) -> FsResult<String> {
        let path = self.meta.path(inode.ino)?.ok_or(FsError::NotFound)?;
        Ok(names::key_of(
            &self.cfg.prefix,
            &path,
            inode.kind == Kind::Dir,
        )?)
    }

    /// Key of `name` in directory `dir`, as a file (`dir_marker` false) or directory marker.
    pub(super) fn child_key(&self, dir: &Inode, name: &str, dir_marker: bool) -> FsResult<String> {
        let mut path = self.meta.path(dir.ino)?.ok_or(FsError::NotFound)?;
        path.push(name.to_string());
        Ok(names::key_of(&self.cfg.prefix, &path, dir_marker)?)
    }

    /// The attributes `stat` shows for `inode` (for a directory: its clock is being shown).
    pub(super) fn attr(&self, inode: &Inode) -> FsResult<Attr> {
        if inode.kind == Kind::Dir {
            self.view.show_clock(inode.ino, inode.mtime);
        }
        let nlink = match (inode.kind, inode.parent) {
            (_, None) if inode.ino != ROOT_INO => 0,
            (Kind::Dir, _) => 2 + self.meta.subdir_count(inode.ino)? as u32,
            _ => 1,
        };
        Ok(Attr {
            ino: inode.ino,
            kind: inode.kind,
            perm: inode.perm,
            nlink,
            uid: inode.uid,
            gid: inode.gid,
            size: inode.size,
            blocks: inode.size.div_ceil(512),
            rdev: inode.rdev,
            atime: inode.atime.to_system_time(),
            mtime: inode.mtime.to_system_time(),
            ctime: inode.ctime.to_system_time(),
        })
    }

    /// The kernel dropped `n` references to `ino`. Returns whether it holds none now: the
    /// row may then go ([`Self::forget_row`]), which is SQL and is left to the caller to run
    /// off the request loop. This part only counts, in memory.
    pub(super) fn forget(&self, ino: u64, n: u64) -> bool {
        self.view.forgot(ino, n)
    }

    /// Deletes the row of `ino`, which the kernel forgot, if it is unlinked and not open
    /// (the table keeps the inode numbers of live entries).
    pub(super) fn forget_row(&self, ino: u64) {
        if self.is_referenced(ino) {
            return;
        }
        if let Err(e) = self.meta.forget(ino) {
            debug!(ino, "forget: {e}");
        }
    }

    /// Whether the kernel or an open handle still refers to `ino`.
    pub(super) fn is_referenced(&self, ino: u64) -> bool {
        self.view.holds(ino) || self.open_file_of(ino).is_some()
    }

    /// Looks up `name` in `parent`.
    #[instrument(level = "debug", skip(self))]
    pub(super) async fn lookup(&self, parent: u64, name: &OsStr) -> FsResult<Attr> {
        let name = names::check_name(name)?;
        let dir = self.dir(parent)?;
        let inode = self
            .find_child(&dir, name)
            .await?
            .ok_or(FsError::NotFound)?;
        let inode = self.stat_view(inode).await?;
        // A path walk looks up every directory on its way: a large one is listed again
        // behind the answer rather than before it.
        let wait = inode.kind == Kind::Dir
            && self
                .meta
                .has_fewer_children(inode.ino, RELIST_MAX_ENTRIES)?;
        let inode = self.with_fresh_clock(inode, wait).await?;
        let attr = self.attr(&inode)?;
        self.view.looked_up(inode.ino);
        Ok(attr)
    }

    /// Attributes of `ino`, re-validated against the bucket when stale.
    #[instrument(level = "debug", skip(self))]
    pub(super) async fn getattr(&self, ino: u64) -> FsResult<Attr> {
        let inode = self.inode(ino)?;
        let inode = if inode.ino != ROOT_INO
            && !inode.dirty
            && inode.parent.is_some()
            && !self.fresh(inode.validated_at)
            && self.open_file_of(ino).is_none()
        {
            self.revalidate(inode).await?
        } else {
            inode
        };
        let inode = self.stat_view(inode).await?;
        let inode = self.with_fresh_clock(inode, true).await?;
        self.attr(&inode)
    }

    /// `inode` as `stat` shows it: with the headers of its object (design.md §4: exact from
    /// the first look). Listings read them already; this reads those a listing could not.
    /// With `--trust-listings` a file shows what its listing said until it is opened.
    pub(super) async fn stat_view(&self, inode: Inode) -> FsResult<Inode> {
        if inode.kind == Kind::Dir || !self.cfg.trust_listings {
            self.ensure_headers(inode).await
        } else {
            Ok(inode)
        }
    }

    /// A directory this mount listed before, with its listing brought up to date first if it
    /// is stale: its mtime is how programs notice that its entries changed (Nextcloud
    /// compares `filemtime(dir)` with what it stored, shared/nextcloud.md), so a `stat` of it
    /// must reflect what the bucket holds now, not what it held at the last `ls`. A
    /// directory never listed has nothing to compare against and is left alone. Unless
    /// `wait`, the listing runs in the background and the next `stat` shows its result.
    pub(super) async fn with_fresh_clock(&self, inode: Inode, wait: bool) -> FsResult<Inode> {
        let stale = inode.kind == Kind::Dir
            && inode.listed_at.is_some_and(|t| !self.fresh(t))
            && (inode.parent.is_some() || inode.ino == ROOT_INO);
        if !stale {
            return Ok(inode);
        }
        if !wait && let Some(me) = self.me.get() {
            let (me, dir) = (me.clone(), inode.clone());
            tokio::spawn(async move {
                if let Some(dirs) = me.upgrade()
                    && let Err(e) = dirs.refresh_dir_or_stale(&dir).await
                {
                    debug!(dir = dir.ino, "listing behind a lookup failed: {e}");
                }
            });
            return Ok(inode);
        }
        self.refresh_dir_or_stale(&inode).await?;
        self.inode(inode.ino)
    }

    /// The child `name` of `dir`: from the table while fresh, else asked of the bucket.
    pub(super) async fn find_child(&self, dir: &Inode, name: &str) -> FsResult<Option<Inode>> {
        let row = self.meta.child(dir.ino, name)?;
        if let Some(row) = &row {
            if let Some(open) = self.open_file_of(row.ino) {
                // Its live attributes (size, times of unflushed writes) are newer.
                return Ok(Some(open.attrs()));
            }
            if row.dirty || self.fresh(row.validated_at) {
                return Ok(Some(row.clone()));
            }
        }
        if dir.listed_at.is_some_and(|t| self.fresh(t))
            || (row.is_none() && self.view.known_absent(dir.ino, name))
        {
            return Ok(row);
        }
        if dir.listed_at.is_some() && self.meta.has_fewer_children(dir.ino, RELIST_MAX_ENTRIES)? {
            // A small directory that was listed before: listing it again costs what probing
            // this one name would (one round trip) and answers the next lookups in it for
            // the TTL — `cp -r` or `tar x` into it make one lookup per new file.
            self.refresh_dir_or_stale(dir).await?;
            return Ok(self.meta.child(dir.ino, name)?);
        }
        match self.probe_child(dir, name).await {
            Err(e) if row.is_some() && e.is_unavailable() => {
                debug!(name, "server unreachable: serving the entry as last known");
                Ok(row)
            }
            other => other,
        }
    }

    /// Lists `dir` again if its listing is stale; while the server is unreachable, a
    /// directory listed before is served as last listed (an outage must not make a mount's
    /// known contents vanish), and only one never listed is an error.
    pub(super) async fn refresh_dir_or_stale(&self, dir: &Inode) -> FsResult<()> {
        match self.refresh_dir(dir.ino).await {
            Err(e) if e.is_unavailable() && dir.listed_at.is_some() => {
                debug!(
                    dir = dir.ino,
                    "server unreachable: serving the last listing"
                );
                Ok(())
            }
            other => other,
        }
    }

    /// Asks the bucket whether `name` exists in `dir`: a HEAD of the file key and a one-key
    /// LIST of the directory prefix, concurrently (and the marker's headers when they are
    /// news). A directory wins over a file.
    pub(super) async fn probe_child(&self, dir: &Inode, name: &str) -> FsResult<Option<Inode>> {
        let read = self.local.start_read();
        let dir_key = self.key_of(dir)?;
        let file_key = self.child_key(dir, name, false)?;
        let dir_prefix = format!("{file_key}/");
        let (head, list) = tokio::join!(
            self.store.head(&file_key),
            self.store.list(&dir_prefix, None, None, Some(1))
        );
        let head = match head {
            Ok(info) => Some(info),
            Err(StoreError::NotFound(_)) => None,
            Err(e) => return Err(e.into()),
        };
        let list = list?;
        let is_dir = !list.objects.is_empty() || !list.prefixes.is_empty();
        let headers = if is_dir {
            match list.objects.first().filter(|o| o.key == dir_prefix) {
                None => Headers::Gone,
                Some(o) => {
                    let v = ObjectVersion::new(&o.etag, o.size, o.last_modified);
                    let row = self.meta.child(dir.ino, name)?;
                    let shown =
                        row.is_some_and(|r| r.kind == Kind::Dir && r.headers_known && r.holds(&v));
                    if shown {
                        Headers::Unread
                    } else {
                        self.headers.read(&dir_prefix).await?
                    }
                }
            }
        } else {
            match head {
                Some(info) => {
                    let v = ObjectVersion::new(&info.etag, info.size, info.last_modified);
                    Headers::Read(ObjectMeta::new(v, &info.metadata))
                }
                None => Headers::Gone,
            }
        };
        let found = match &headers {
            _ if is_dir => Found::Dir(&headers),
            Headers::Read(m) => Found::File(&m.version, &headers),
            _ => Found::Absent,
        };
        let row = self
            .apply_found(dir.ino, &dir_key, name, found, &read)
            .await?;
        if row.is_none() {
            self.view.found_absent(dir.ino, name);
        }
        Ok(row)
    }

    /// Records what a probe started with `read` found of `name` in directory `dir_ino`
    /// (key prefix `dir_key`), and tells the kernel what changed.
    pub(super) async fn apply_found(
        &self,
        dir_ino: u64,
        dir_key: &str,
        name: &str,
        found: Found<'_>,
        read: &changes::ReadGuard,
    ) -> FsResult<Option<Inode>> {
        let state = DirView {
            dirs: self,
            dir: dir_ino,
            prefix: dir_key,
            read,
        };
        let (row, changes) =
            self.meta
                .apply_probe(dir_ino, name, found, read.started(), &self.defaults, &state)?;
        self.after_changes(dir_ino, &changes).await;
        // Headers read for the first time reach an open file's live attributes; a new
        // version reaches them through `follow_new_version`, with its contents.
        if let Some(r) = &row
            && !changes.replaced.iter().any(|(ino, _)| *ino == r.ino)
            && let Some(open) = self.open_file_of(r.ino)
            && !open.attrs().dirty
        {
            open.set_attrs(r.clone());
        }
        Ok(row)
    }

    /// Re-reads an entry whose row is stale: HEAD for objects, a probe for directories.
    pub(super) async fn revalidate(&self, inode: Inode) -> FsResult<Inode> {
        let parent = inode.parent.ok_or(FsError::NotFound)?;
        let dir = self.dir(parent)?;
        match self.probe_child(&dir, &inode.name).await {
            Ok(Some(found)) if found.ino == inode.ino => Ok(found),
            // Replaced by an entry of another type, or gone.
            Ok(_) => Err(FsError::NotFound),
            // Unreachable: what we knew stands until the server answers again.
            Err(e) if e.is_unavailable() => Ok(inode),
            Err(e) => Err(e),
        }
    }

    /// A new row with the mount's defaults, to be filled in.
    pub(super) fn new_inode(
        &self,
        parent: u64,
        name: &str,
        kind: Kind,
        validated_at: i64,
    ) -> Inode {
        let now = Timestamp::now();
        Inode::new_entry(Some(parent), name, kind, &self.defaults, now, validated_at)
    }

    /// Makes sure the attributes of `inode` are its object's headers (one HEAD, remembered
    /// per object version). Fails with ENOENT if the object turns out to be gone or to be
    /// something else now.
    pub(super) async fn ensure_headers(&self, inode: Inode) -> FsResult<Inode> {
        if inode.headers_known || inode.dirty || inode.ino == ROOT_INO {
            return Ok(inode);
        }
        let Some(parent) = inode.parent else {
            return Ok(inode);
        };
        let read = self.local.start_read();
        let dir_key = self.key_of(&self.dir(parent)?)?;
        let headers = self.headers.read(&self.key_of(&inode)?).await?;
        let found = match (&headers, inode.kind) {
            (_, Kind::Dir) => Found::Dir(&headers),
            (Headers::Read(m), _) => Found::File(&m.version, &headers),
            _ => Found::Absent,
        };
        match self
            .apply_found(parent, &dir_key, &inode.name, found, &read)
            .await?
        {
            Some(row) if row.ino == inode.ino => Ok(row),
            _ => Err(FsError::NotFound),
        }
    }

    /// Lists `dir` from the bucket unless its listing is fresh. Concurrent callers share one
    /// listing.
    pub(super) async fn refresh_dir(&self, dir_ino: u64) -> FsResult<()> {
        let dir = self.dir(dir_ino)?;
        if dir.listed_at.is_some_and(|t| self.fresh(t)) {
            return Ok(());
        }
        let _listing = self.locks.lock_listing(dir_ino).await;
        let dir = self.dir(dir_ino)?;
        if dir.listed_at.is_some_and(|t| self.fresh(t)) {
            return Ok(());
        }
        let prefix = self.key_of(&dir)?;
        let read = self.local.start_read();
        let timer = std::time::Instant::now();
        // A directory being listed may be large: its rows are read off the worker.
        let known: HashMap<String, Inode> =
            crate::blocking::off_worker(|| self.meta.children(dir_ino))?
                .into_iter()
                .map(|r| (r.name.clone(), r))
                .collect();
        let mut events = self.headers.list(listing::ListRequest {
            prefix: prefix.clone(),
            known,
            dir,
        });
        let state = DirView {
            dirs: self,
            dir: dir_ino,
            prefix: &prefix,
            read: &read,
        };
        // Each page goes into the table as soon as its headers are read, while the next
        // page's are.
        let mut applying = self.meta.begin_listing(dir_ino, read.started())?;
        let mut entries = 0;
        let end = loop {
            let failed: FsError = match events.recv().await {
                Some(Ok(listing::ListEvent::Entries { files, dirs })) => {
                    entries += files.len() + dirs.len();
                    let applied = self.meta.apply_listed(
                        &mut applying,
                        &files,
                        &dirs,
                        &self.defaults,
                        &state,
                    );
                    match applied {
                        Ok(()) => continue,
                        Err(e) => e.into(),
                    }
                }
                Some(Ok(listing::ListEvent::End(end))) => break end,
                Some(Err(e)) => e.into(),
                None => StoreError::Other("the listing thread stopped".into()).into(),
            };
            // What the pages applied so far changed is in the table: the kernel and the
            // directory's clock must learn it now, as the next listing will not find it.
            match self.meta.abandon_listing(applying, &state) {
                Ok(changes) => self.after_changes(dir_ino, &changes).await,
                Err(e) => debug!(dir = dir_ino, "an incomplete listing: {e}"),
            }
            return Err(failed);
        };
        for key in &end.hidden {
            self.hidden.hide(key);
        }
        let changes =
            self.meta
                .finish_listing(applying, end.marker.as_ref(), &self.defaults, &state)?;
        debug!(
            dir = dir_ino,
            entries,
            headers_read = end.headers_read,
            ms = timer.elapsed().as_millis() as u64,
            added = changes.added.len(),
            removed = changes.removed.len(),
            replaced = changes.replaced.len(),
            "listed"
        );
        self.after_changes(dir_ino, &changes).await;
        if let Some(f) = self.open_file_of(dir_ino) {
            f.set_attrs(self.meta.get(dir_ino)?.ok_or(FsError::NotFound)?);
        }
        Ok(())
    }

    /// Acts on changes made outside this mount that a listing or probe of `dir` found: the
    /// kernel forgets what it cached of them (inodes before this returns, see
    /// [`kernel`]), open files that nobody changed here show the new version from their next
    /// open, and a name that appeared is no longer known absent.
    pub(super) async fn after_changes(&self, dir: u64, changes: &Changes) {
        let mut forget = Vec::new();
        for name in &changes.added {
            self.view.not_absent(dir, name);
            forget.push(Invalidation::Entry(dir, name.clone()));
        }
        for (ino, name) in changes.removed.iter().chain(&changes.replaced) {
            debug!(dir, name, ino, "changed outside this mount");
            forget.push(Invalidation::Inode(*ino));
            forget.push(Invalidation::Entry(dir, name.clone()));
            self.follow_new_version(*ino);
        }
        if changes.clock_moved {
            // Its attributes, and the entries the kernel cached of it.
            forget.push(Invalidation::Inode(dir));
        }
        self.view.forget_all(forget).await;
    }

    /// An open file whose object another client replaced: unless it has changes of its
    /// own, its next open reads the new version, and reads through handles opened before
    /// fail with ESTALE rather than mix versions. If its state is busy now, the next holder
    /// of its content lock takes the new version.
    pub(super) fn follow_new_version(&self, ino: u64) {
        let Some(file) = self.open_file_of(ino) else {
            return;
        };
        file.new_version
            .store(true, std::sync::atomic::Ordering::Release);
        if let Ok(mut st) = file.state.try_lock() {
            self.take_new_version(&file, &mut st);
        }
    }

    /// Takes the new version [`Self::follow_new_version`] left for `file`, if any, and the
    /// file has no changes of its own (those settle with the other client's version when
    /// they are uploaded).
    pub(super) fn take_new_version(&self, file: &OpenFile, st: &mut files::FileState) {
        if !file
            .new_version
            .swap(false, std::sync::atomic::Ordering::AcqRel)
        {
            return;
        }
        let Ok(Some(row)) = self.meta.get(file.ino()) else {
            return;
        };
        if st.phase.has_changes() || st.staging.is_some() || row.parent.is_none() {
            return;
        }
        st.remote = self.original_of(&row).ok().flatten();
        st.replaced += 1;
        file.set_attrs(row);
    }

    /// Opens a directory handle.
    ///
    /// The kernel may serve `readdir` from the entries it cached at an earlier open while
    /// this mount would answer with the very same entries: the listing is fresh (no new one
    /// is due) and the directory's clock has not moved since that open. Every change of its
    /// entries moves the clock — through this mount (POSIX) or found by a listing or lookup
    /// (outside changes) — once its value has been shown, and an open shows it. A warm `ls`
    /// of 10,000 entries is then no round trip but the `opendir`, where it was some 300
    /// READDIRPLUS requests (0.08-0.12 s against 0.05-0.08 s here).
    ///
    /// The kernel also serves a handle that is rewound from that cache without asking, so
    /// the cache is dropped whenever the mount learns of a change the kernel did not make
    /// (the clock moved from outside, a listing marked stale) and when the listing's TTL runs
    /// out; offsets are the same for every snapshot of the directory ([`entry_offset`]).
    pub(super) async fn opendir(&self, ino: u64) -> FsResult<Opened> {
        let dir = self.dir(ino)?;
        self.view.show_clock(ino, dir.mtime);
        let clock = (dir.mtime, dir.ctime);
        let keep_cache =
            self.view.entries_opened(ino, clock) && dir.listed_at.is_some_and(|t| self.fresh(t));
        let fh = self
            .open
            .add_handle(open_table::Handle::Dir(Arc::default()));
        Ok(Opened { fh, keep_cache })
    }

    /// Has the kernel drop its cached entries of `dir` once the listing taken at `listed_at`
    /// is older than `--metadata-ttl` (one pending per directory; the next read from offset 0
    /// arms the next one): a handle rewound after that reads a new listing, as a new open
    /// does.
    pub(super) fn expire_cached_entries(&self, dir: u64, listed_at: i64) {
        let (MetadataTtl::For(ttl), Some(me)) = (self.cfg.metadata_ttl, self.me.get()) else {
            return;
        };
        if !self.view.start_entries_expiry(dir) {
            return;
        }
        let age = Duration::from_nanos(now_ns().saturating_sub(listed_at).max(0) as u64);
        let me = me.clone();
        tokio::spawn(async move {
            tokio::time::sleep(ttl.saturating_sub(age)).await;
            if let Some(dirs) = me.upgrade() {
                dirs.view.expire_entries(dir);
            }
        });
    }

    /// Entries of directory `ino` from `offset` on (a batch; call again to continue). The
    /// listing is taken when the handle reads from offset 0, and served from that snapshot.
    #[instrument(level = "debug", skip(self))]
    pub(super) async fn readdir(&self, ino: u64, fh: u64, offset: u64) -> FsResult<Vec<DirEntry>> {
        let batch = self.dir_batch(ino, fh, offset, READDIR_BATCH).await?;
        let mut entries = Vec::with_capacity(batch.len());
        for (mut entry, row) in batch {
            // `d_type` must be right (fuser cannot send DT_UNKNOWN): an object whose headers
            // a listing could not read and that is small enough to be a symlink or special
            // file is read now. Listings normally read them all.
            let unsure = !row.headers_known
                && !self.cfg.trust_listings
                && row.kind == Kind::File
                && row.size <= SYMLINK_MAX as u64;
            if unsure {
                entry.kind = self.ensure_headers(row).await?.kind;
            }
            entries.push(entry);
        }
        Ok(entries)
    }

    /// Entries of an open directory from `offset` with their attributes (READDIRPLUS): one
    /// request answers what would otherwise be a LOOKUP per entry, which is most of the
    /// cost of `ls -l`. The caller reports each entry it passes on with
    /// [`Self::entry_sent`], since the kernel counts them as lookups.
    pub(super) async fn readdirplus(
        &self,
        ino: u64,
        fh: u64,
        offset: u64,
    ) -> FsResult<Vec<(DirEntry, Attr)>> {
        let batch = self.dir_batch(ino, fh, offset, READDIRPLUS_BATCH).await?;
        let views = batch.into_iter().map(|(entry, row)| async move {
            let row = match self.open_file_of(row.ino) {
                Some(open) => open.attrs(),
                None if entry.name == "." || entry.name == ".." => row,
                None => self.stat_view(row).await?,
            };
            Ok::<_, FsError>((entry, self.attr(&row)?))
        });
        futures::stream::iter(views)
            .buffered(16)
            .try_collect()
            .await
    }

    /// [`Self::readdirplus`] answered at once, if it can be without waiting for anything:
    /// the handle's listing is taken (`offset` is past 0) and every entry of the batch shows
    /// what it will show (its headers are known, or are not to be read). `None` otherwise.
    ///
    /// The kernel reads a directory a page (about 25 entries with attributes) per request, so
    /// `ls -l` of 10,000 entries is 400 requests; answered on the FUSE thread they save a
    /// hand-over to a worker each, which was a third of a warm `ls -l` here.
    pub(super) fn readdirplus_now(
        &self,
        fh: u64,
        offset: u64,
    ) -> Option<FsResult<Vec<(DirEntry, Attr)>>> {
        if offset == 0 {
            return None;
        }
        let Some(snapshot) = self.open.dir_handle(fh) else {
            return Some(Err(FsError::BadHandle));
        };
        let snapshot = snapshot.try_lock().ok()?;
        let entries = snapshot.as_ref()?;
        let start = entries_after(entries, offset);
        let end = (start + READDIRPLUS_BATCH).min(entries.len());
        let mut out = Vec::with_capacity(end - start);
        for (entry, row) in &entries[start..end] {
            let row = match self.open_file_of(row.ino) {
                Some(open) => open.attrs(),
                None => row.clone(),
            };
            let shown =
                row.headers_known || row.dirty || row.parent.is_none() || self.cfg.trust_listings;
            // A directory's link count is a read of the inode table, which may open a
            // connection or wait for the disk: not on the FUSE thread.
            if !shown || row.kind == Kind::Dir {
                return None;
            }
            match self.attr(&row) {
                Ok(attr) => out.push((entry.clone(), attr)),
                Err(e) => return Some(Err(e)),
            }
        }
        Some(Ok(out))
    }

    /// Records that the kernel received `entry` from a READDIRPLUS: a lookup of it.
    pub(super) fn entry_sent(&self, entry: &DirEntry) {
        if entry.name != "." && entry.name != ".." {
            self.view.looked_up(entry.ino);
        }
    }

    /// Up to `max` entries of an open directory from `offset`, with their rows. The listing
    /// is taken at offset 0 and kept with the handle, so offsets stay stable while the
    /// directory changes.
    pub(super) async fn dir_batch(
        &self,
        ino: u64,
        fh: u64,
        offset: u64,
        max: usize,
    ) -> FsResult<Vec<(DirEntry, Inode)>> {
        let snapshot = self.open.dir_handle(fh).ok_or(FsError::BadHandle)?;
        let mut snapshot = snapshot.lock().await;
        if offset == 0 || snapshot.is_none() {
            self.refresh_dir_or_stale(&self.dir(ino)?).await?;
            let dir = self.dir(ino)?;
            // What is read from here may fill the kernel's cache of the directory.
            if let Some(listed_at) = dir.listed_at {
                self.expire_cached_entries(ino, listed_at);
            }
            let parent = match dir.parent {
                Some(p) if dir.ino != ROOT_INO => self.inode(p)?,
                _ => dir.clone(),
            };
            let mut entries = vec![
                (
                    DirEntry {
                        ino,
                        next_offset: 1,
                        kind: Kind::Dir,
                        name: ".".into(),
                    },
                    dir.clone(),
                ),
                (
                    DirEntry {
                        ino: parent.ino,
                        next_offset: 2,
                        kind: Kind::Dir,
                        name: "..".into(),
                    },
                    parent,
                ),
            ];
            let mut children = self.meta.children(ino)?;
            children.sort_by_key(|c| c.ino);
            for child in children {
                let entry = DirEntry {
                    ino: child.ino,
                    next_offset: entry_offset(child.ino),
                    kind: child.kind,
                    name: child.name.clone(),
                };
                entries.push((entry, child));
            }
            *snapshot = Some(entries);
        }
        let entries = snapshot.as_ref().expect("filled above");
        let start = entries_after(entries, offset);
        let end = (start + max).min(entries.len());
        Ok(entries[start..end].to_vec())
    }

    /// Closes a directory handle.
    pub(super) fn releasedir(&self, fh: u64) {
        self.open.remove_handle(fh);
    }

    /// Updates a directory's mtime and ctime after this mount changed its entries (kept
    /// locally). Never backwards: a clock moved ahead for an outside change stays ahead.
    pub(super) fn touch_dir(&self, ino: u64) -> FsResult<()> {
        let shown = |mtime: Timestamp| self.view.clock_shown(ino, mtime);
        let row = self.meta.touch_dir(ino, Timestamp::now(), &shown)?;
        if let Some(f) = self.open_file_of(ino) {
            f.set_attrs(row);
        }
        Ok(())
    }

    /// The original object of a file, for reads and partial fetches.
    pub(super) fn original_of(&self, inode: &Inode) -> FsResult<Option<Original>> {
        match &inode.etag {
            Some(etag) if inode.kind == Kind::File => Ok(Some(Original {
                key: self.key_of(inode)?,
                etag: etag.clone(),
            })),
            _ => Ok(None),
        }
    }
}

/// The offset that follows the entry of inode `ino` in a directory: entries come in inode
/// order after `.` (1) and `..` (2), so an offset means the same place in every snapshot of
/// the directory. The kernel's cache of a directory's entries and a handle's own snapshot
/// may then be read one after the other without an entry skipped or repeated (only added and
/// removed entries differ, which POSIX leaves open). Children have inodes above the root's 1.
fn entry_offset(ino: u64) -> u64 {
    ino + 2
}

/// Where reading `entries` (in offset order) continues after `offset`.
fn entries_after(entries: &[(DirEntry, Inode)], offset: u64) -> usize {
    entries.partition_point(|(e, _)| e.next_offset <= offset)
}

/// A directory as a listing or probe of it sees this mount: what it is changing there, and
/// whether its clock was shown.
struct DirView<'a> {
    dirs: &'a Directories,
    dir: u64,
    prefix: &'a str,
    read: &'a changes::ReadGuard,
}

impl crate::meta::inodes::DirState for DirView<'_> {
    fn busy(&self) -> crate::meta::Busy {
        self.dirs.local.busy(self.prefix, self.read)
    }

    fn clock_shown(&self, mtime: Timestamp) -> bool {
        self.dirs.view.clock_shown(self.dir, mtime)
    }
}

#[cfg(test)]
mod tests {
    //! The tree on its own: an inode table in memory, the in-memory store as the bucket that
    //! other clients change, no `Fs` and no mount.

    use super::*;
    use crate::fs::kernel::RecordedKernel;
    use crate::meta::headers::{self, PosixHeaders};
    use crate::store::WriteHeaders;
    use crate::store::mem::MemStore;

    const DEFAULTS: EntryDefaults = EntryDefaults::FOR_TESTS;

    fn tree(mem: &Arc<MemStore>, ttl: Duration) -> (Arc<Directories>, RecordedKernel) {
        let root = Inode {
            ino: ROOT_INO,
            headers_known: true,
            ..Inode::new_entry(None, "", Kind::Dir, &DEFAULTS, Timestamp::now(), 0)
        };
        let cfg = TreeSettings {
            prefix: "pre/".into(),
            metadata_ttl: MetadataTtl::For(ttl),
            trust_listings: false,
        };
        let meta = Arc::new(InodeTable::open_in_memory(&root).unwrap());
        let store: Arc<dyn ObjectStore> = mem.clone();
        let open = Arc::new(OpenTable::new());
        let dirs = Arc::new(Directories::new(cfg, meta, store, DEFAULTS, open).unwrap());
        let kernel = RecordedKernel::default();
        dirs.view.connect(Arc::new(kernel.clone()));
        (dirs, kernel)
    }

    /// Headers as s3fs and this mount write them: a mode and an owner.
    fn owned_by(uid: u32, mode: u32) -> WriteHeaders {
        WriteHeaders {
            content_type: None,
            metadata: headers::encode(&PosixHeaders {
                mode: Some(mode),
                uid: Some(uid),
                ..PosixHeaders::default()
            }),
        }
    }

    async fn names(dirs: &Directories, ino: u64) -> Vec<String> {
        let fh = dirs.opendir(ino).await.unwrap().fh;
        let entries = dirs.readdir(ino, fh, 0).await.unwrap();
        dirs.releasedir(fh);
        // In inode order after `.` and `..`; sorted here to compare.
        let mut names: Vec<String> = entries.into_iter().map(|e| e.name).collect();
        names.sort();
        names
    }

    #[tokio::test]
    async fn a_lookup_shows_what_another_client_put_with_its_headers() {
        let mem = Arc::new(MemStore::new());
        mem.insert(
            "pre/docs/a.txt",
            b"hello",
            owned_by(33, libc::S_IFREG | 0o600),
        );
        let (dirs, _) = tree(&mem, Duration::from_secs(60));
        let docs = dirs.lookup(ROOT_INO, OsStr::new("docs")).await.unwrap();
        assert_eq!(docs.kind, Kind::Dir);
        let a = dirs.lookup(docs.ino, OsStr::new("a.txt")).await.unwrap();
        assert_eq!((a.kind, a.size, a.perm, a.uid), (Kind::File, 5, 0o600, 33));
        let err = dirs
            .lookup(docs.ino, OsStr::new("b.txt"))
            .await
            .unwrap_err();
        assert!(matches!(err, FsError::NotFound), "{err:?}");
    }

    #[tokio::test]
    async fn a_directory_counts_its_subdirectories_as_links() {
        let mem = Arc::new(MemStore::new());
        for key in ["pre/d/x/1", "pre/d/y/2", "pre/d/file"] {
            mem.insert(key, b"1", owned_by(7, libc::S_IFREG | 0o644));
        }
        let (dirs, _) = tree(&mem, Duration::from_secs(60));
        let d = dirs.lookup(ROOT_INO, OsStr::new("d")).await.unwrap();
        assert_eq!(names(&dirs, d.ino).await, [".", "..", "file", "x", "y"]);
        assert_eq!(dirs.getattr(d.ino).await.unwrap().nlink, 4);
    }

    #[tokio::test]
    async fn a_stale_listing_is_taken_again_and_the_kernel_forgets_what_went() {
        let mem = Arc::new(MemStore::new());
        mem.insert("pre/a", b"1", owned_by(7, libc::S_IFREG | 0o644));
        mem.insert("pre/b", b"2", owned_by(7, libc::S_IFREG | 0o644));
        let (dirs, kernel) = tree(&mem, Duration::ZERO);
        assert_eq!(names(&dirs, ROOT_INO).await, [".", "..", "a", "b"]);
        let b = dirs.meta.child(ROOT_INO, "b").unwrap().unwrap();
        mem.delete("pre/b").await.unwrap();
        mem.insert("pre/c", b"3", owned_by(7, libc::S_IFREG | 0o644));
        assert_eq!(names(&dirs, ROOT_INO).await, [".", "..", "a", "c"]);
        let seen = kernel.0.lock().unwrap().clone();
        assert!(seen.contains(&Invalidation::Inode(b.ino)), "{seen:?}");
        assert!(
            seen.contains(&Invalidation::Entry(ROOT_INO, "b".into())),
            "{seen:?}"
        );
    }
}
