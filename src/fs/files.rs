//! Open files: open, read, write, flush, fsync, release, and attribute changes.
//!
//! An inode that is open (or has data not yet uploaded) has one [`OpenFile`], shared by all
//! its handles. A file that was only read is served by ranged GETs pinned to the ETag seen at
//! open; the first write creates a staging file, and from then on the staging file is the
//! file's contents until the last handle is closed. `flush` (the `close` of a writable handle)
//! and `fsync` upload dirty contents and return only once the object is in the bucket; a
//! failed upload is their error, and the staged data stays for a retry.
//!
//! Two locks guard an open file. The *change lock* is held by whatever changes its contents
//! or where they are in the bucket — a write, a truncate, an upload, a header rewrite, a
//! rename, an unlink — for the whole change, S3 requests included. The *content lock* (its
//! [`FileState`]) is only ever held for bookkeeping, never across a request or a wait, so
//! reads and opens of a file go on while it is uploaded or its blocks are fetched. Locks are
//! taken in the order directory locks, key locks, change lock, content lock.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tracing::{debug, instrument, warn};

use super::open_table::Handle;
use super::read::{ObjectVersion, Reader};
use super::stream::{Stream, StreamContext};
use super::{Attr, Caller, Fs, FsError, FsResult, write};
use crate::cache::staging::{Original, Staging};
use crate::meta::{Inode, Kind, ROOT_INO, Timestamp, now_ns};
use crate::store::{Expect, StoreError};

/// Free space staged writes leave on the cache directory's filesystem (see
/// `Fs::check_local_space`): room for SQLite's log of a few thousand changes and the
/// journal rows of write-back closes, a small share of any disk meant to stage files.
const LOCAL_RESERVE: u64 = 16 * 1024 * 1024;

/// The shared state of an open inode.
#[derive(Debug)]
pub struct OpenFile {
    ino: u64,
    attrs: Mutex<Inode>,
    /// The change lock (see the module docs).
    pub(super) changes: tokio::sync::Mutex<()>,
    /// The content lock.
    pub(super) state: tokio::sync::Mutex<FileState>,
    /// Another client replaced the object, and the state was busy when that was found: the
    /// next holder of the content lock takes the new version ([`Fs::take_new_version`]).
    pub(super) new_version: std::sync::atomic::AtomicBool,
}

/// Contents and bookkeeping of an open inode, behind its content lock.
#[derive(Debug, Default)]
pub(super) struct FileState {
    /// Local copy of the contents, once written (or read while dirty).
    pub staging: Option<Staging>,
    /// Where it stands with its changes.
    pub phase: Phase,
    /// Handles (and internal users) holding the file.
    pub opens: usize,
    /// Object version holding the contents in the bucket, `None` before the first upload.
    pub remote: Option<Original>,
    /// Next background upload attempt of a file nobody has open.
    pub retry_at: Option<Instant>,
    /// Backoff before the attempt after that.
    pub retry_delay: Duration,
    /// The multipart upload fed while the file is written front to back.
    pub stream: Streaming,
    /// mtime given to the last write; an mtime that differs was set explicitly.
    pub last_write: Option<Timestamp>,
    /// How many times another client replaced the object while the file was open here.
    pub replaced: u64,
}

/// Where an open file stands with its changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) enum Phase {
    /// Its contents and headers are those of its object (or, never uploaded, of nothing).
    #[default]
    Clean,
    /// Contents or headers changed and not uploaded yet.
    Dirty,
    /// Changed, and a write-back close acknowledged the change before it was uploaded: the
    /// staging file is its only copy, so it is uploaded before it changes again.
    Journaled,
    /// Unlinked while open: never uploaded, dropped on the last close.
    Unlinked,
    /// Out of the open-file table; a new open makes a new [`OpenFile`].
    Retired,
}

impl Phase {
    /// Whether there are changes to upload.
    pub(super) fn has_changes(self) -> bool {
        matches!(self, Phase::Dirty | Phase::Journaled)
    }
}

/// Where a file stands with its streaming upload ([`super::stream`]).
#[derive(Debug, Default)]
pub(super) enum Streaming {
    /// No stream; one starts when the file qualifies.
    #[default]
    Possible,
    /// Parts go up while the file is written.
    Running(Stream),
    /// A stream was abandoned: none starts before the next upload.
    Stopped,
}

impl Streaming {
    /// Takes the running stream out (to feed or finish it, by the holder of the change lock,
    /// or to abandon it), leaving [`Streaming::Possible`].
    fn take(&mut self) -> Option<Stream> {
        match std::mem::take(self) {
            Streaming::Running(s) => Some(s),
            other => {
                *self = other;
                None
            }
        }
    }
}

impl OpenFile {
    pub(super) fn new(inode: Inode, state: FileState) -> Self {
        OpenFile {
            ino: inode.ino,
            attrs: Mutex::new(inode),
            changes: tokio::sync::Mutex::new(()),
            state: tokio::sync::Mutex::new(state),
            new_version: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The live attributes.
    pub fn attrs(&self) -> Inode {
        self.attrs.lock().unwrap().clone()
    }

    pub(super) fn set_attrs(&self, inode: Inode) {
        *self.attrs.lock().unwrap() = inode;
    }

    pub(super) fn ino(&self) -> u64 {
        self.ino
    }
}

/// An opened file or directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Opened {
    /// The handle.
    pub fh: u64,
    /// The kernel may keep what it cached at earlier opens (`FOPEN_KEEP_CACHE`): a file's
    /// pages, a directory's entries.
    pub keep_cache: bool,
}

/// One open handle of a file.
#[derive(Debug)]
pub(super) struct FileHandle {
    pub file: Arc<OpenFile>,
    reader: tokio::sync::Mutex<Reader>,
    writable: bool,
    /// [`FileState::replaced`] when the handle was opened: reads of a version another
    /// client has replaced since fail with ESTALE rather than mix the two (the next open
    /// reads the new one).
    opened_on: u64,
}

/// A time given to setattr.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeSet {
    /// The current time.
    Now,
    /// This time.
    At(Timestamp),
}

/// Attribute changes of one setattr call; `None` leaves an attribute alone.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SetAttr {
    /// New permissions (type bits ignored).
    pub mode: Option<u32>,
    /// New owner.
    pub uid: Option<u32>,
    /// New group.
    pub gid: Option<u32>,
    /// New size (truncate or extend).
    pub size: Option<u64>,
    /// New access time.
    pub atime: Option<TimeSet>,
    /// New modification time.
    pub mtime: Option<TimeSet>,
}

impl SetAttr {
    fn changes_headers(&self) -> bool {
        self.mode.is_some()
            || self.uid.is_some()
            || self.gid.is_some()
            || self.atime.is_some()
            || self.mtime.is_some()
    }
}

impl Fs {
    fn file_handle(&self, fh: u64) -> FsResult<Arc<FileHandle>> {
        self.open.file_handle(fh).ok_or(FsError::BadHandle)
    }

    /// Takes a reference to the open state of `ino`, creating it (after re-validating a
    /// stale entry) if the inode is not open yet. Pair with [`Self::close_file`].
    pub(super) async fn acquire_file(&self, ino: u64) -> FsResult<Arc<OpenFile>> {
        loop {
            let file = match self.dirs.open_file_of(ino) {
                Some(f) => f,
                None => {
                    let inode = self.meta.get(ino)?.ok_or(FsError::NotFound)?;
                    // Held from reading the row until the entry is in the table: a move of a
                    // directory above the file either ran before (the row has the new key and
                    // ETag) or waits, and then finds this entry to give its new key to.
                    let _held = self.hold_key_if_linked(&inode).await?;
                    let mut inode = self.meta.get(ino)?.ok_or(FsError::NotFound)?;
                    if !inode.dirty && !self.dirs.fresh(inode.validated_at) {
                        inode = self.dirs.revalidate(inode).await?;
                    }
                    let inode = self.dirs.ensure_headers(inode).await?;
                    let remote = self.dirs.original_of(&inode)?;
                    let fresh = Arc::new(OpenFile::new(
                        inode,
                        FileState {
                            remote,
                            ..Default::default()
                        },
                    ));
                    self.open.file_or_insert(fresh)
                }
            };
            let mut st = file.state.lock().await;
            if st.phase == Phase::Retired {
                continue;
            }
            self.dirs.take_new_version(&file, &mut st);
            st.opens += 1;
            drop(st);
            return Ok(file);
        }
    }

    /// Drops a reference taken by [`Self::acquire_file`]. On the last one, a clean file's
    /// staging is deleted; a dirty one is uploaded now or left to the background retry.
    pub(super) async fn close_file(&self, file: &Arc<OpenFile>) {
        let mut st = file.state.lock().await;
        st.opens = st.opens.saturating_sub(1);
        if st.opens > 0 {
            return;
        }
        if st.phase.has_changes() && self.cfg.write_back {
            // The upload is the background uploader's; the data is on local disk.
            match self.journal_locked(file, &mut st) {
                Ok(()) => {
                    // Now that nobody holds it, it is the uploader's.
                    self.uploader.wake();
                    return;
                }
                Err(e) => warn!(
                    ino = file.ino,
                    "cannot make the data durable locally; uploading now: {e}"
                ),
            }
        }
        if st.phase.has_changes() {
            drop(st);
            if let Err(e) = self.sync_file(file).await {
                warn!(
                    ino = file.ino,
                    "upload at close failed; retrying in the background: {e}"
                );
            }
            st = file.state.lock().await;
            if st.opens > 0 || st.phase == Phase::Retired {
                return;
            }
        }
        if st.phase.has_changes() {
            st.retry_at = Some(Instant::now() + Duration::from_secs(1));
            st.retry_delay = Duration::from_secs(2);
            return;
        }
        self.retire(file, &mut st);
    }

    /// Removes a file nobody holds from the open-file table and deletes its staging.
    pub(super) fn retire(&self, file: &Arc<OpenFile>, st: &mut FileState) {
        let uploaded = st.remote.clone().filter(|_| st.phase == Phase::Clean);
        st.phase = Phase::Retired;
        self.abandon_stream(st);
        if let Some(staging) = st.staging.take() {
            let removed = match (uploaded, self.blocks.cache()) {
                (Some(object), Some(cache)) => self.seed_cache(file.ino, staging, object, cache),
                _ => staging.remove(),
            };
            if let Err(e) = removed {
                warn!(ino = file.ino, "could not delete a staging file: {e}");
            }
        }
        if let Err(e) = self.meta.delete_staging(file.ino) {
            warn!(ino = file.ino, "could not drop staging bookkeeping: {e}");
        }
        self.open.remove(file);
        let unlinked = file.attrs().parent.is_none() && file.ino != ROOT_INO;
        if unlinked && !self.dirs.view.holds(file.ino) {
            let _ = self.meta.forget(file.ino);
        }
    }

    /// Hands the staging file of a file just uploaded to the block cache, which copies its
    /// local blocks in the background under the new object's ETag (reading the file back then
    /// needs no GET) and deletes it.
    fn seed_cache(
        &self,
        ino: u64,
        staging: Staging,
        object: Original,
        cache: &Arc<crate::cache::blocks::BlockCache>,
    ) -> std::io::Result<()> {
        let blocks = staging.present_blocks();
        let path = cache.seed_path(&format!("{ino}.{}", self.open.next_id()))?;
        let (data, size) = staging.detach(&path)?;
        let cache = cache.clone();
        tokio::task::spawn_blocking(move || {
            cache.seed(&data, &blocks, size, &object.key, &object.etag);
            let _ = std::fs::remove_file(&path);
        });
        Ok(())
    }

    /// Opens `ino` with `flags` (`O_ACCMODE`, `O_TRUNC`).
    #[instrument(level = "debug", skip(self))]
    pub async fn open(&self, ino: u64, flags: i32, caller: Caller) -> FsResult<Opened> {
        let inode = self.dirs.inode(ino)?;
        match inode.kind {
            Kind::File => {}
            Kind::Dir => return Err(FsError::IsDir),
            _ => return Err(FsError::NotSupported("opening a special file")),
        }
        let writable = flags & libc::O_ACCMODE != libc::O_RDONLY;
        if writable || flags & libc::O_TRUNC != 0 {
            self.check_writable()?;
        }
        let file = self.acquire_file(ino).await?;
        if !inode.headers_known
            && let Err(e) = self.check_opened(&file, flags, caller)
        {
            self.close_file(&file).await;
            return Err(e);
        }
        if flags & libc::O_TRUNC != 0
            && writable
            && let Err(e) = self.truncate_locked(&file, 0).await
        {
            self.close_file(&file).await;
            return Err(e);
        }
        let keep_cache = self.keep_page_cache(&file).await;
        let opened_on = file.state.lock().await.replaced;
        Ok(Opened {
            fh: self.new_file_handle(file, writable, opened_on),
            keep_cache,
        })
    }

    /// Fails with ESTALE if another client replaced the file's object since `h` was opened:
    /// what the handle would read or change is not there any more.
    fn check_current(&self, h: &FileHandle, st: &mut FileState) -> FsResult<()> {
        self.dirs.take_new_version(&h.file, st);
        if st.replaced != h.opened_on {
            return Err(FsError::Stale);
        }
        Ok(())
    }

    /// Checks an open against attributes the kernel did not know when it checked: those of
    /// an object listed but never HEADed get the mount's defaults until it is opened. If the
    /// headers make it something other than a file (an s3fs symlink), the open is ESTALE, so
    /// the kernel looks the name up again and finds what it really is.
    fn check_opened(&self, file: &OpenFile, flags: i32, caller: Caller) -> FsResult<()> {
        let inode = file.attrs();
        if inode.kind != Kind::File {
            return Err(FsError::Stale);
        }
        let mask = match flags & libc::O_ACCMODE {
            libc::O_RDONLY => libc::R_OK,
            libc::O_WRONLY => libc::W_OK,
            _ => libc::R_OK | libc::W_OK,
        };
        self.access(file.ino, mask, caller)
    }

    /// Whether the kernel may keep the pages it cached for `file` at an earlier open: only if
    /// they were read from the very object version that holds the contents now. Otherwise the
    /// kernel drops them at this open, which is how a change made by another client becomes
    /// visible.
    async fn keep_page_cache(&self, file: &OpenFile) -> bool {
        let current = {
            let st = file.state.lock().await;
            match (&st.remote, st.phase.has_changes() || st.staging.is_some()) {
                (Some(o), false) => Some(o.etag.clone()),
                _ => None,
            }
        };
        self.dirs
            .view
            .pages_still_valid(file.ino, current.as_deref())
    }

    pub(super) fn new_file_handle(
        &self,
        file: Arc<OpenFile>,
        writable: bool,
        opened_on: u64,
    ) -> u64 {
        let handle = FileHandle {
            file,
            reader: tokio::sync::Mutex::new(Reader::default()),
            writable,
            opened_on,
        };
        self.open.add_handle(Handle::File(Arc::new(handle)))
    }

    /// Reads up to `size` bytes at `offset`.
    #[instrument(level = "debug", skip(self))]
    pub async fn read(&self, fh: u64, offset: u64, size: u32) -> FsResult<Bytes> {
        let h = self.file_handle(fh)?;
        let mut waited = false;
        loop {
            match self.read_once(&h, offset, size).await {
                // A move of a directory above the file (or a rename of it) points the open
                // file at its copy before it deletes the original: a read that took the old
                // key just before finds it gone, and reads the copy.
                Err(FsError::Store(StoreError::NotFound(gone))) => {
                    let remote = &h.file.state.lock().await.remote;
                    if remote.as_ref().is_none_or(|now| now.key == gone) {
                        return Err(StoreError::NotFound(gone).into());
                    }
                }
                // A change this mount is making (a header rewrite's CopyObject, an upload)
                // may have replaced the version the read asked for: once it is recorded, the
                // read asks for the version it left.
                Err(FsError::Store(StoreError::PreconditionFailed(_))) if !waited => {
                    drop(h.file.changes.lock().await);
                    waited = true;
                }
                Err(e @ FsError::Store(StoreError::PreconditionFailed(_))) => {
                    // Another client replaced the object: this handle keeps failing with
                    // ESTALE rather than mixing versions, and the next open looks at the new
                    // object.
                    if let Some(mut row) = self.meta.get(h.file.ino)? {
                        row.validated_at = 0;
                        self.meta.save(&row)?;
                    }
                    return Err(e);
                }
                other => return other,
            }
        }
    }

    async fn read_once(&self, h: &FileHandle, offset: u64, size: u32) -> FsResult<Bytes> {
        let version = {
            let mut st = h.file.state.lock().await;
            self.dirs.take_new_version(&h.file, &mut st);
            if st.replaced != h.opened_on {
                return Err(FsError::Stale);
            }
            if st.staging.is_some() {
                // Its staging file holds the contents now (and keeps them: a handle is open).
                drop(st);
                let range = offset..offset + size as u64;
                let mut st = self
                    .lock_with_blocks(&h.file, |s| s.missing_for_read(range.clone()))
                    .await?;
                let staging = self.staging_of(&h.file, &mut st)?;
                return Ok(crate::buffers::freeze(staging.read(offset, size as usize)?));
            }
            match &st.remote {
                Some(o) => ObjectVersion {
                    key: o.key.clone(),
                    etag: o.etag.clone(),
                    size: h.file.attrs().size,
                },
                None => return Ok(Bytes::new()),
            }
        };
        let mut reader = h.reader.lock().await;
        Ok(reader
            .read(&self.blocks, &version, offset, size as usize)
            .await?)
    }

    /// Writes `data` at `offset`; returns the bytes written.
    #[instrument(level = "debug", skip(self, data), fields(len = data.len()))]
    pub async fn write(&self, fh: u64, offset: u64, data: &[u8]) -> FsResult<u32> {
        self.check_writable()?;
        let h = self.file_handle(fh)?;
        if !h.writable {
            return Err(FsError::BadHandle);
        }
        let end = offset
            .checked_add(data.len() as u64)
            .filter(|&e| e <= crate::store::MAX_PART_SIZE * crate::store::MAX_PARTS)
            .ok_or(FsError::Invalid(
                "write past the largest object S3 can hold",
            ))?;
        let file = &h.file;
        self.check_local_space(data.len() as u64)?;
        let _changing = self.lock_for_change(file).await?;
        let appended = {
            let mut st = file.state.lock().await;
            self.check_current(&h, &mut st)?;
            // From here on its staging file holds the version this handle opened.
            offset == self.staging_of(file, &mut st)?.size()
        };
        let mut st = self
            .lock_with_blocks(file, |s| s.missing_for_write(offset..end))
            .await?;
        let staging = self.staging_of(file, &mut st)?;
        staging.write(offset, data)?;
        let size = staging.size();
        let now = Timestamp::now();
        self.mark_dirty(file, &mut st, |a| {
            a.size = size;
            a.mtime = now;
            a.ctime = now;
        })?;
        st.last_write = Some(now);
        self.feed_stream(file, st, offset, appended).await;
        Ok(data.len() as u32)
    }

    /// Locks the content of `file` with the blocks `wanted` names present in its staging
    /// file (created, with nothing fetched, if it has none). The GETs run with the lock
    /// released, [`write::BlockFetch`] at a time, so reads and opens of the file go on
    /// meanwhile, and what changed in between is looked at again. A fetch that failed
    /// because the original moved meanwhile (a move of a directory above the file deletes
    /// the old key once the file points at the new one) is made again from the new key.
    ///
    /// ESTALE if the file was retired meanwhile (its last handle closed): its contents are
    /// nobody's to keep, and a new open has a new state.
    pub(super) async fn lock_with_blocks<'a>(
        &self,
        file: &'a OpenFile,
        wanted: impl Fn(&Staging) -> Vec<u64>,
    ) -> FsResult<tokio::sync::MutexGuard<'a, FileState>> {
        let mut st = file.state.lock().await;
        loop {
            if st.phase == Phase::Retired {
                return Err(FsError::Stale);
            }
            let staging = self.staging_of(file, &mut st)?;
            let Some(fetch) = write::BlockFetch::first_of(staging, &wanted(staging)) else {
                return Ok(st);
            };
            drop(st);
            let from = fetch.original().clone();
            let fetched = fetch.run(&self.store, self.blocks.cache()).await;
            st = file.state.lock().await;
            match (fetched, st.staging.as_mut()) {
                (Ok(blocks), Some(staging)) => blocks.fill(staging)?,
                (Ok(_), None) => {}
                (Err(e), staging) => {
                    if staging.is_none_or(|s| s.original() == Some(&from)) {
                        return Err(e.into());
                    }
                }
            }
        }
    }

    /// Fails with ENOSPC unless `incoming` more bytes can be staged while leaving
    /// [`LOCAL_RESERVE`] free on the cache directory's filesystem, so that a file too large
    /// for the disk fails its write cleanly, and the inode database, the journal of what was
    /// acknowledged, and the unlink that frees the space still find room.
    fn check_local_space(&self, incoming: u64) -> FsResult<()> {
        match crate::cache::free_bytes(&self.staging_dir) {
            Ok(free) if free < incoming + LOCAL_RESERVE => {
                Err(FsError::Io(std::io::Error::from_raw_os_error(libc::ENOSPC)))
            }
            _ => Ok(()),
        }
    }

    /// After a write at `offset`, with the change lock held: starts a streaming upload when a
    /// file written front to back from empty passes the multipart threshold, sends the parts
    /// the writer has completed, and abandons the stream when the write went behind what was
    /// sent. The requests go out with the content lock `st` released. Never fails the write:
    /// the staging file has the data whatever happens to the stream.
    async fn feed_stream(
        &self,
        file: &OpenFile,
        mut st: tokio::sync::MutexGuard<'_, FileState>,
        offset: u64,
        appended: bool,
    ) {
        let Some(staging) = st.staging.as_ref() else {
            return;
        };
        let (size, orig_len) = (staging.size(), staging.orig_len());
        let running = match &st.stream {
            Streaming::Running(s) if offset < s.sent_end() => {
                self.abandon_stream(&mut st);
                return;
            }
            Streaming::Running(_) => st.stream.take(),
            Streaming::Stopped => return,
            Streaming::Possible => None,
        };
        let eligible = appended
            && st.phase != Phase::Unlinked
            && orig_len == 0
            && size > self.cfg.multipart_threshold;
        if running.is_none() && !eligible {
            return;
        }
        // Its own handle of the staging file (a dup), only for a write that feeds a stream.
        let reader = st.staging.as_ref().expect("checked above").reader();
        drop(st);
        let mut stream = match running {
            Some(s) => s,
            None => {
                let inode = file.attrs();
                let Ok(key) = self.dirs.key_of(&inode) else {
                    return;
                };
                let headers = self.headers_of(&inode);
                match Stream::start(&self.store, key, &headers, self.cfg.part_size).await {
                    Ok(s) => s,
                    Err(e) => {
                        debug!(ino = file.ino, "no streaming upload: {e}");
                        file.state.lock().await.stream = Streaming::Stopped;
                        return;
                    }
                }
            }
        };
        let sent = match reader {
            Ok(reader) => {
                stream
                    .send_ready(self.stream_context(), &reader, size)
                    .await
            }
            Err(e) => Err(StoreError::Local(e)),
        };
        let mut st = file.state.lock().await;
        match sent {
            Ok(()) => st.stream = Streaming::Running(stream),
            Err(e) => {
                warn!(
                    ino = file.ino,
                    "streaming upload stopped; the file goes up at close instead: {e}"
                );
                stream.abandon(&self.store);
                st.stream = Streaming::Stopped;
            }
        }
    }

    fn stream_context(&self) -> StreamContext<'_> {
        StreamContext {
            store: &self.store,
            budget: &self.buffers,
            concurrency: self.cfg.upload_concurrency,
        }
    }

    /// Drops the file's stream (its upload is aborted); the file goes up the ordinary way.
    pub(super) fn abandon_stream(&self, st: &mut FileState) {
        if let Some(s) = st.stream.take() {
            s.abandon(&self.store);
            st.stream = Streaming::Stopped;
        }
    }

    /// The staging file of an open file, created (empty, nothing fetched) on first use.
    pub(super) fn staging_of<'a>(
        &self,
        file: &OpenFile,
        st: &'a mut FileState,
    ) -> FsResult<&'a mut Staging> {
        if st.staging.is_none() {
            let size = file.attrs().size;
            st.staging = Some(Staging::create(
                &self.staging_dir,
                file.ino,
                st.remote.clone(),
                size,
            )?);
        }
        Ok(st.staging.as_mut().expect("created above"))
    }

    /// Applies `change` to the live attributes and marks the file dirty; the first time, the
    /// row is saved so a listing cannot overwrite the pending change.
    fn mark_dirty(
        &self,
        file: &OpenFile,
        st: &mut FileState,
        change: impl FnOnce(&mut Inode),
    ) -> FsResult<()> {
        let mut attrs = file.attrs.lock().unwrap();
        change(&mut attrs);
        attrs.dirty = true;
        if st.phase == Phase::Clean {
            st.phase = Phase::Dirty;
            self.meta.save(&attrs)?;
        }
        Ok(())
    }

    async fn truncate_locked(&self, file: &Arc<OpenFile>, size: u64) -> FsResult<()> {
        let _changing = self.lock_for_change(file).await?;
        let mut st = file.state.lock().await;
        if size == 0 && st.staging.is_none() {
            // Nothing of the old contents is needed.
            st.staging = Some(Staging::create(&self.staging_dir, file.ino, None, 0)?);
        }
        self.abandon_stream(&mut st);
        let staging = self.staging_of(file, &mut st)?;
        staging.truncate(size)?;
        self.mark_dirty(file, &mut st, |a| {
            a.size = size;
            let now = Timestamp::now();
            a.mtime = now;
            a.ctime = now;
        })
    }

    /// fallocate: S3 has no preallocation, so mode 0 extends the file (zeros) and
    /// FALLOC_FL_KEEP_SIZE succeeds without effect; other modes are not supported.
    pub async fn fallocate(&self, fh: u64, offset: u64, len: u64, mode: i32) -> FsResult<()> {
        self.check_writable()?;
        let h = self.file_handle(fh)?;
        if !h.writable {
            return Err(FsError::BadHandle);
        }
        self.check_current(&h, &mut *h.file.state.lock().await)?;
        match mode {
            0 => {
                let end = offset
                    .checked_add(len)
                    .ok_or(FsError::Invalid("fallocate past the largest file size"))?;
                if end > h.file.attrs().size {
                    self.truncate_locked(&h.file, end).await?;
                }
                Ok(())
            }
            libc::FALLOC_FL_KEEP_SIZE => Ok(()),
            _ => Err(FsError::NotSupported(
                "fallocate modes other than 0 and KEEP_SIZE",
            )),
        }
    }

    /// close(): uploads the file if it has pending changes and returns once they are in the
    /// bucket; in write-back mode, returns once they are durable on local disk. A handle
    /// opened read-only changed nothing, and its close waits for no upload (of changes made
    /// through other handles, which their own closes upload).
    #[instrument(level = "debug", skip(self))]
    pub async fn flush(&self, fh: u64) -> FsResult<()> {
        let h = self.file_handle(fh)?;
        if !h.writable {
            return Ok(());
        }
        if self.cfg.write_back {
            // Not in the middle of a write through another handle: what is journaled is
            // then the staging file's only copy, and must be whole.
            let _changing = h.file.changes.lock().await;
            let mut st = h.file.state.lock().await;
            return self.journal_locked(&h.file, &mut st);
        }
        self.sync_file(&h.file).await
    }

    /// fsync: uploads pending changes and returns once they are in the bucket, in either
    /// mode.
    #[instrument(level = "debug", skip(self))]
    pub async fn fsync(&self, fh: u64) -> FsResult<()> {
        let h = self.file_handle(fh)?;
        self.sync_file(&h.file).await
    }

    /// Write-back close: makes the staged contents and their bookkeeping durable on local
    /// disk (staging file synced, row and staging record committed with a synced log) and
    /// queues the upload. After this returns, a crash cannot lose the data: the next mount
    /// of the cache directory uploads it.
    fn journal_locked(&self, file: &OpenFile, st: &mut FileState) -> FsResult<()> {
        // Journaled and unchanged since (a change uploads it first): nothing more to do.
        if st.phase != Phase::Dirty {
            return Ok(());
        }
        let attrs = file.attrs();
        let staging = self.staging_of(file, st)?;
        // Two disk flushes (the data, the commit): milliseconds, tens of them on a busy
        // disk, which the other tasks of this worker thread do not wait out.
        crate::blocking::off_worker(|| -> FsResult<()> {
            staging.sync()?;
            Ok(self.meta.save_pending(&attrs, &staging.record())?)
        })?;
        st.phase = Phase::Journaled;
        // Not at once: a rename or unlink that follows a close within the delay (a temporary
        // file put into place) is then local only, and the upload writes the final name.
        st.retry_at = Some(Instant::now() + self.cfg.write_back_delay);
        st.retry_delay = Duration::from_secs(1);
        self.uploader.wake();
        Ok(())
    }

    /// Takes the change lock of `file` for a change of its contents. Contents a write-back
    /// close acknowledged are uploaded first: their staging file is their only copy, and a
    /// crash in the middle of the change would otherwise leave neither version whole.
    async fn lock_for_change<'a>(
        &self,
        file: &'a OpenFile,
    ) -> FsResult<tokio::sync::MutexGuard<'a, ()>> {
        loop {
            let changing = file.changes.lock().await;
            if file.state.lock().await.phase != Phase::Journaled {
                return Ok(changing);
            }
            // The upload holds the file's key, which comes before the change lock.
            drop(changing);
            self.sync_file(file).await?;
        }
    }

    /// Holds the key of `file` (`None` once it is unlinked) and then its change lock. A
    /// rename of the file in between has given it another key: that one is held instead.
    pub(super) async fn hold_for_change<'a>(
        &'a self,
        file: &'a OpenFile,
    ) -> FsResult<(
        Option<(String, super::key_locks::WriteGuard<'a>)>,
        tokio::sync::MutexGuard<'a, ()>,
    )> {
        loop {
            let held = self.hold_key_if_linked(&file.attrs()).await?;
            let changing = file.changes.lock().await;
            let key_now = match self.dirs.key_of(&file.attrs()) {
                Ok(key) => Some(key),
                Err(FsError::NotFound) => None,
                Err(e) => return Err(e),
            };
            if held.as_ref().map(|(key, _)| key) == key_now.as_ref() {
                return Ok((held, changing));
            }
        }
    }

    /// Uploads pending changes of `file` and waits for them to be in the bucket.
    pub(super) async fn sync_file(&self, file: &OpenFile) -> FsResult<()> {
        // Its key, held against a move of its directory until the upload is done, and its
        // change lock, against every other change of it; none if it was unlinked.
        let (held, _changing) = self.hold_for_change(file).await?;
        if !file.state.lock().await.phase.has_changes() {
            return Ok(());
        }
        match held {
            Some((key, _held)) => self.upload_changes(file, key).await,
            // Unlinked before its key was held: nothing to upload.
            None => Ok(()),
        }
    }

    /// Uploads `file` to `key`; the caller holds the key ([`Fs::hold_key`]) and the file's
    /// change lock, and the content lock is taken only to plan and to record the upload.
    async fn upload_changes(&self, file: &OpenFile, key: String) -> FsResult<()> {
        let inode = file.attrs();
        let headers = self.headers_of(&inode);
        let (known, last_write) = {
            let st = file.state.lock().await;
            (self.known_version(&st, &key), st.last_write)
        };
        let _change = self.dirs.local.begin(&key);
        debug!(key, ?known, mtime = ?inode.mtime, "uploading");
        let expect = known.expect();
        let changed = self.changed_in_bucket(&key, expect).await?;
        let mut stream = file.state.lock().await.stream.take();
        // What the bucket already holds, when it is exactly our contents (an upload that
        // completed just before a crash): nothing to send.
        let mut adopted = None;
        if changed {
            if let Some(s) = stream.take() {
                s.abandon(&self.store);
            }
            match self.settle_conflict(file, &key, &headers).await? {
                Some(etag) => adopted = Some(etag),
                None => return Ok(()),
            }
        }
        let streamed = match stream {
            Some(s) => match self.finish_stream(file, s, &key, &headers, expect).await {
                Some(Ok(etag)) => Some(etag),
                Some(Err(StoreError::PreconditionFailed(_))) => {
                    match self.settle_conflict(file, &key, &headers).await? {
                        Some(etag) => adopted = Some(etag),
                        None => return Ok(()),
                    }
                    None
                }
                Some(Err(e)) => {
                    warn!(
                        key,
                        "streaming upload failed; uploading the file again: {e}"
                    );
                    None
                }
                None => None,
            },
            None => None,
        };
        let was_streamed = streamed.is_some();
        let result: FsResult<String> = match streamed.or(adopted) {
            Some(etag) => Ok(etag),
            None => {
                let dest = write::Destination {
                    key: &key,
                    headers: &headers,
                    expect,
                };
                self.upload_staged(file, dest).await
            }
        };
        let result = match result {
            Err(FsError::Store(StoreError::PreconditionFailed(_))) => {
                match self.settle_conflict(file, &key, &headers).await? {
                    Some(etag) => Ok(etag),
                    None => return Ok(()),
                }
            }
            other => other,
        };
        let etag = match result {
            Ok(etag) => etag,
            Err(e) => {
                warn!(
                    key,
                    "upload failed; the data stays staged in the cache directory: {e}"
                );
                let mut st = file.state.lock().await;
                let staging = self.staging_of(file, &mut st)?;
                staging.sync()?;
                self.meta.save_staging(file.ino, &staging.record())?;
                self.meta.save(&file.attrs())?;
                return Err(e);
            }
        };
        // Nothing else changes the attributes while the change lock is held.
        let mut attrs = file.attrs();
        attrs.wrote(etag.clone());
        attrs.validated_at = now_ns();
        let times = match was_streamed {
            true => self.after_stream(&mut attrs, last_write).await,
            false => Ok(()),
        };
        let uploaded = Original {
            key,
            etag: attrs.etag.clone().unwrap_or(etag),
        };
        let mut st = file.state.lock().await;
        let staging = self.staging_of(file, &mut st)?;
        let size = staging.size();
        staging.mark_uploaded(uploaded.clone(), size);
        if times.is_err() {
            // Where a crash must find the original from now on.
            self.meta.save_staging(file.ino, &staging.record())?;
        }
        st.remote = Some(uploaded);
        st.stream = Streaming::Possible;
        if let Err(e) = times {
            // The contents are in the bucket, the times set while they were written are
            // not: the file stays dirty, and its next upload carries them.
            warn!(
                ino = file.ino,
                "could not store the times of a streamed file: {e}"
            );
            self.dirs.save(&attrs)?;
            return Err(e);
        }
        st.phase = Phase::Clean;
        st.last_write = None;
        attrs.dirty = false;
        self.dirs.save(&attrs)?;
        self.meta.delete_staging(file.ino)?;
        Ok(())
    }

    /// Uploads the staged contents of `file` (all of them: blocks still remote are fetched
    /// or copied server-side) to `dest`, with the content lock held only to plan it; the
    /// caller holds the change lock. Returns the new ETag.
    pub(super) async fn upload_staged(
        &self,
        file: &OpenFile,
        dest: write::Destination<'_>,
    ) -> FsResult<String> {
        let tuning = self.upload_tuning();
        let plan = {
            let mut st = self
                .lock_with_blocks(file, |s| write::UploadPlan::blocks_to_fetch(s, tuning))
                .await?;
            write::UploadPlan::new(self.staging_of(file, &mut st)?, tuning)?
        };
        Ok(write::upload(&self.store, &plan, dest, tuning, &self.buffers).await?)
    }

    /// Completes the file's `stream` if it still fits the file (same key, same headers but
    /// for times); `None` if it did not (it is abandoned then).
    async fn finish_stream(
        &self,
        file: &OpenFile,
        stream: Stream,
        key: &str,
        headers: &crate::store::WriteHeaders,
        expect: Expect<'_>,
    ) -> Option<crate::store::StoreResult<String>> {
        let fits = {
            let st = file.state.lock().await;
            match st.staging.as_ref() {
                Some(staging) if staging.orig_len() == 0 && stream.is_for(key, headers) => {
                    staging.reader().ok().map(|r| (r, staging.size()))
                }
                _ => None,
            }
        };
        let Some((reader, size)) = fits else {
            stream.abandon(&self.store);
            return None;
        };
        Some(
            stream
                .finish(self.stream_context(), &reader, size, expect)
                .await,
        )
    }

    /// After a streamed upload, which carries no time headers: times set explicitly while
    /// the file was written are written now (one CopyObject onto itself); otherwise the
    /// object's Last-Modified is the file's mtime, as a remount will show it.
    async fn after_stream(&self, attrs: &mut Inode, last_write: Option<Timestamp>) -> FsResult<()> {
        if last_write.is_some_and(|t| t != attrs.mtime) {
            return self.rewrite_headers(attrs).await;
        }
        let key = self.dirs.key_of(attrs)?;
        if let Ok(info) = self.store.head(&key).await {
            let version =
                crate::meta::ObjectVersion::new(&info.etag, info.size, info.last_modified);
            attrs.mtime = version.modified();
            attrs.ctime = attrs.mtime;
            attrs.atime = attrs.mtime;
            attrs.last_modified = Some(version.last_modified);
        }
        Ok(())
    }

    /// Closes a handle (the kernel's release): the last close of a file drops its staging.
    #[instrument(level = "debug", skip(self))]
    pub async fn release(&self, fh: u64) {
        if let Some(Handle::File(h)) = self.open.remove_handle(fh) {
            self.close_file(&h.file).await;
        }
    }

    /// Changes attributes; `fh` is the handle of an ftruncate/futimens, `None` for path calls.
    #[instrument(level = "debug", skip(self))]
    pub async fn setattr(&self, ino: u64, fh: Option<u64>, set: SetAttr) -> FsResult<Attr> {
        self.check_writable()?;
        let inode = self.dirs.inode(ino)?;
        let inode = self.dirs.ensure_headers(inode).await?;
        if let Some(size) = set.size {
            match inode.kind {
                Kind::File => {}
                Kind::Dir => return Err(FsError::IsDir),
                _ => return Err(FsError::Invalid("truncate of a special file")),
            }
            if let Some(fh) = fh {
                let h = self.file_handle(fh)?;
                self.check_current(&h, &mut *h.file.state.lock().await)?;
            }
            let file = self.acquire_file(ino).await?;
            let mut result = self.truncate_locked(&file, size).await;
            if result.is_ok() && fh.is_none() {
                // truncate(2) on a path: done when the object is.
                result = self.sync_file(&file).await;
            }
            self.close_file(&file).await;
            result?;
        }
        if !set.changes_headers() {
            return self.dirs.attr(&self.dirs.inode(ino)?);
        }
        let now = Timestamp::now();
        let resolve = |t: TimeSet| match t {
            TimeSet::Now => now,
            TimeSet::At(t) => t,
        };
        let inode = self
            .persist_headers(ino, |inode| {
                if let Some(mode) = set.mode {
                    inode.perm = mode & 0o7777;
                }
                if let Some(uid) = set.uid {
                    inode.uid = uid;
                }
                if let Some(gid) = set.gid {
                    inode.gid = gid;
                }
                if let Some(t) = set.atime {
                    inode.atime = resolve(t);
                }
                if let Some(t) = set.mtime {
                    inode.mtime = resolve(t);
                }
                inode.ctime = now;
                Ok(())
            })
            .await?;
        self.dirs.attr(&inode)
    }

    /// Changes the attributes of `ino` and saves them to the table and the bucket. A file
    /// with pending data carries them with its upload; otherwise the object is rewritten in place
    /// (CopyObject onto itself, or a new directory marker).
    ///
    /// `change` is applied to the entry's attributes as they are when the change is made —
    /// under the file's lock if it is open, else to its row — never to a copy read before:
    /// an upload that ended in between (write-back) gave the row its ETag, and a write its
    /// size and mtime, which a copy would undo. Returns the attributes saved.
    pub(super) async fn persist_headers(
        &self,
        ino: u64,
        change: impl FnOnce(&mut Inode) -> FsResult<()>,
    ) -> FsResult<Inode> {
        // Until the row is saved: a move of its directory waits, and a listing meanwhile
        // leaves the entry to this change. An unlinked file has no key, and its change
        // stays local.
        if let Some(file) = self.dirs.open_file_of(ino) {
            // And the change lock: an upload of the file in flight ends first, and none
            // starts until the new attributes are where it takes them from.
            let (held, _changing) = self.hold_for_change(&file).await?;
            let _change = held.as_ref().map(|(key, _)| self.dirs.local.begin(key));
            let pending = {
                let st = file.state.lock().await;
                st.phase.has_changes() || st.phase == Phase::Unlinked
            };
            let mut inode = file.attrs();
            change(&mut inode)?;
            if pending {
                file.set_attrs(inode.clone());
                self.meta.save(&inode)?;
                return Ok(inode);
            }
            self.rewrite_headers(&mut inode).await?;
            if let (Some(etag), Some((key, _))) = (&inode.etag, &held) {
                let uploaded = Original {
                    key: key.clone(),
                    etag: etag.clone(),
                };
                let mut st = file.state.lock().await;
                if let Some(staging) = st.staging.as_mut() {
                    staging.mark_uploaded(uploaded.clone(), inode.size);
                }
                st.remote = Some(uploaded);
            }
            self.dirs.save(&inode)?;
            return Ok(inode);
        }
        let held = self.hold_key_if_linked(&self.dirs.inode(ino)?).await?;
        let _change = held.as_ref().map(|(key, _)| self.dirs.local.begin(key));
        // Not open (or no longer: its row is what its last upload left).
        let mut inode = self.meta.get(ino)?.ok_or(FsError::NotFound)?;
        change(&mut inode)?;
        if !inode.dirty {
            self.rewrite_headers(&mut inode).await?;
        }
        self.dirs.save(&inode)?;
        Ok(inode)
    }

    /// Fails with E2BIG when the headers of `inode` exceed the 2 KiB of user metadata S3
    /// accepts (counted as S3 does: names with their `x-amz-meta-` prefix, and values).
    pub(super) fn check_header_size(&self, inode: &Inode) -> FsResult<()> {
        const S3_USER_METADATA_MAX: usize = 2048;
        let size: usize = self
            .headers_of(inode)
            .metadata
            .iter()
            .map(|(k, v)| "x-amz-meta-".len() + k.len() + v.len())
            .sum();
        if size > S3_USER_METADATA_MAX {
            return Err(FsError::TooBig);
        }
        Ok(())
    }

    /// Writes the headers of a clean entry to the bucket.
    async fn rewrite_headers(&self, inode: &mut Inode) -> FsResult<()> {
        self.check_header_size(inode)?;
        let headers = self.headers_of(inode);
        if inode.ino == ROOT_INO {
            // The root's attributes come from the mount options; kept locally.
            return Ok(());
        }
        let key = self.dirs.key_of(inode)?;
        debug!(key, etag = ?inode.etag, mtime = ?inode.mtime, "rewriting headers");
        let etag = match inode.kind {
            Kind::Dir => {
                self.store
                    .put(&key, Bytes::new(), &headers, Expect::Any)
                    .await?
            }
            _ => match inode.etag.clone() {
                Some(etag) => {
                    write::copy_object(
                        &self.store,
                        &key,
                        &key,
                        inode.size,
                        Some(&etag),
                        Some(&headers),
                        self.upload_tuning(),
                    )
                    .await?
                }
                None => return Ok(()),
            },
        };
        inode.wrote(etag);
        inode.validated_at = now_ns();
        Ok(())
    }
}
