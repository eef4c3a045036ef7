//! Filesystem semantics on top of an object store, independent of FUSE.
//!
//! [`Fs`] answers the questions the kernel asks (lookup, getattr, readdir, read, write,
//! rename, ...) in terms of the inode table ([`crate::meta`]), staging files
//! ([`crate::cache::staging`]) and an [`ObjectStore`]. Every operation is `async` so the FUSE
//! adapter can run many at once, and the locks held across an S3 request are needed only by
//! requests on the same entries: a directory's (while it is changed), a file's change lock
//! (while it is written, uploaded, renamed — its reads and opens do not wait for that), the
//! keys a write holds and the prefixes a directory move holds. It is tested against
//! [`crate::store::mem::MemStore`] without a mount.
//!
//! Locking, from outermost to innermost (never the other way round):
//! 1. directory locks ([`locks::LockMap`]) held by operations that change a directory's
//!    entries — at most two, taken in inode order, only by rename;
//! 2. key locks ([`key_locks::KeyLocks`]): every write of an object holds its key, a
//!    directory rename the prefixes it moves, so that no write computes a key in the middle
//!    of a move of its directory — and nothing outside the moving directory waits for it;
//! 3. the change lock of one open file ([`OpenFile::changes`]), held for the whole of a
//!    change of its contents or of where they are, S3 requests included;
//! 4. its content lock ([`OpenFile::state`]), held for bookkeeping and local disk I/O, and
//!    across a request only while the file's object is removed (unlink, or replaced by a
//!    rename), so that no open reads it meanwhile;
//! 5. short synchronous locks (the inode table's writer, the handle table, the maps of
//!    [`kernel::KernelView`]), never held across `.await`; the table's writer may be held
//!    while [`changes::LocalChanges`]' is taken (a listing asks what this mount is changing
//!    inside its transaction), never the other way round.
//!
//! `Fs` ties together parts that own their state and are tested on their own: the open-file
//! table ([`open_table::OpenTable`]), the background uploader's queue
//! ([`sync::UploadQueue`]), what the kernel holds of the mount ([`kernel::KernelView`]),
//! the keys being written ([`key_locks::KeyLocks`]), what this mount is changing
//! ([`changes::LocalChanges`]) and the listing reader ([`listing::HeaderReader`]).

pub mod budget;
mod changes;
mod conflict;
mod files;
pub mod kernel;
mod key_locks;
mod listing;
mod locks;
mod namespace;
mod open_table;
pub mod read;
mod renames;
pub mod stream;
mod sync;
mod tracked;
pub mod write;
mod xattr;

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use futures::{StreamExt, TryStreamExt};
use tracing::{debug, instrument, warn};

use crate::cache::blocks::{BlockCache, CacheLimits, CacheStats};
use crate::cache::staging::Original;
use crate::config::{Config, MetadataTtl};
use crate::meta::headers::{self, DIR_CONTENT_TYPE, PosixHeaders};
use crate::meta::names::{self, HiddenKeyLog, NameError};
use crate::meta::objects::SYMLINK_MAX;
use crate::meta::{
    Changes, EntryDefaults, Found, Headers, Inode, InodeTable, Kind, MetaError, ObjectMeta,
    ObjectVersion, ROOT_INO, Timestamp, now_ns,
};
use crate::store::{ObjectStore, StoreError, WriteHeaders};

use budget::MemoryBudget;
pub use files::{OpenFile, Opened, SetAttr, TimeSet};
use kernel::{Invalidation, KernelCache, KernelView};
use locks::LockMap;
pub use xattr::is_stored_xattr;

/// Errors of filesystem operations, each with the errno the caller sees.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// ENOENT.
    #[error("no such file or directory")]
    NotFound,
    /// EEXIST.
    #[error("file exists")]
    Exists,
    /// ENOTDIR.
    #[error("not a directory")]
    NotDir,
    /// EISDIR.
    #[error("is a directory")]
    IsDir,
    /// ENOTEMPTY.
    #[error("directory not empty")]
    NotEmpty,
    /// EROFS.
    #[error("the mount is read-only")]
    ReadOnly,
    /// A name that cannot be an S3 key or a POSIX name.
    #[error(transparent)]
    Name(#[from] NameError),
    /// EINVAL.
    #[error("invalid argument: {0}")]
    Invalid(&'static str),
    /// EOPNOTSUPP.
    #[error("not supported: {0}")]
    NotSupported(&'static str),
    /// EPERM.
    #[error("operation not permitted: {0}")]
    NotPermitted(&'static str),
    /// ENODATA: no such extended attribute.
    #[error("no such attribute")]
    NoAttr,
    /// E2BIG: metadata would exceed S3's 2 KiB of user metadata.
    #[error("attributes exceed the 2 KiB S3 allows for user metadata")]
    TooBig,
    /// EACCES.
    #[error("permission denied")]
    Access,
    /// EBADF.
    #[error("bad file handle")]
    BadHandle,
    /// ESTALE: the entry is not what the kernel was told; it should look it up again.
    #[error("stale file handle")]
    Stale,
    /// The object store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The inode table failed.
    #[error(transparent)]
    Meta(#[from] MetaError),
    /// Local I/O (staging files) failed.
    #[error("local I/O error in the cache directory: {0}")]
    Io(#[from] std::io::Error),
}

impl FsError {
    /// The server could not be reached or kept failing (as opposed to answering no).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, FsError::Store(StoreError::Unavailable(_)))
    }

    /// The errno for the caller.
    pub fn errno(&self) -> i32 {
        match self {
            FsError::NotFound => libc::ENOENT,
            FsError::Exists => libc::EEXIST,
            FsError::NotDir => libc::ENOTDIR,
            FsError::IsDir => libc::EISDIR,
            FsError::NotEmpty => libc::ENOTEMPTY,
            FsError::ReadOnly => libc::EROFS,
            FsError::Name(e) => e.errno(),
            FsError::Invalid(_) => libc::EINVAL,
            FsError::NotSupported(_) => libc::EOPNOTSUPP,
            FsError::NotPermitted(_) => libc::EPERM,
            FsError::NoAttr => libc::ENODATA,
            FsError::TooBig => libc::E2BIG,
            FsError::Access => libc::EACCES,
            FsError::BadHandle => libc::EBADF,
            FsError::Stale => libc::ESTALE,
            FsError::Store(e) => e.errno(),
            FsError::Meta(e) => e.errno(),
            FsError::Io(e) => e.raw_os_error().unwrap_or(libc::EIO),
        }
    }
}

/// A snapshot of a mount's activity (`s3bridge status`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Status {
    /// Seconds since the mount started.
    pub uptime_secs: u64,
    /// Files with data not in the bucket yet.
    pub pending_files: usize,
    /// Their bytes.
    pub pending_bytes: u64,
    /// Background uploads running now.
    pub uploads_in_flight: usize,
    /// Bytes in the block cache.
    pub cache_bytes: u64,
    /// Blocks in the block cache.
    pub cache_blocks: u64,
    /// Block reads served by the cache.
    pub cache_hits: u64,
    /// Block reads the cache could not serve.
    pub cache_misses: u64,
    /// Requests made to the bucket.
    pub s3_requests: u64,
    /// Requests that failed (after retries; "not found" included).
    pub s3_errors: u64,
}

impl Status {
    /// Fraction of block reads the cache served, if there were any.
    pub fn cache_hit_rate(&self) -> Option<f64> {
        let total = self.cache_hits + self.cache_misses;
        (total > 0).then(|| self.cache_hits as f64 / total as f64)
    }

    /// As JSON (the control socket's answer, and `s3bridge status --json`).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "uptime_secs": self.uptime_secs,
            "pending_files": self.pending_files,
            "pending_bytes": self.pending_bytes,
            "uploads_in_flight": self.uploads_in_flight,
            "cache_bytes": self.cache_bytes,
            "cache_blocks": self.cache_blocks,
            "cache_hits": self.cache_hits,
            "cache_misses": self.cache_misses,
            "cache_hit_rate": self.cache_hit_rate(),
            "s3_requests": self.s3_requests,
            "s3_errors": self.s3_errors,
        })
    }
}

/// Result of filesystem operations.
pub type FsResult<T> = Result<T, FsError>;

/// Attributes of an entry, as `stat` shows them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attr {
    /// Inode number.
    pub ino: u64,
    /// File type.
    pub kind: Kind,
    /// Permission bits.
    pub perm: u32,
    /// Link count.
    pub nlink: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Size in bytes.
    pub size: u64,
    /// 512-byte blocks.
    pub blocks: u64,
    /// Device number of a device node.
    pub rdev: u32,
    /// Access time.
    pub atime: SystemTime,
    /// Modification time.
    pub mtime: SystemTime,
    /// Status-change time.
    pub ctime: SystemTime,
}

/// Preferred I/O size reported in `st_blksize`: tools that size their buffers by it (cp,
/// stdio) then write in 1 MiB pieces, one cache block each. At 128 KiB, `cp` of 1 GiB made
/// 8,192 FUSE round trips and spent a sixth of the daemon's CPU switching threads.
pub const BLKSIZE: u32 = crate::cache::BLOCK_SIZE as u32;

/// One directory entry as readdir returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    /// Inode number.
    pub ino: u64,
    /// Offset of the next entry (what the kernel passes to continue).
    pub next_offset: u64,
    /// File type.
    pub kind: Kind,
    /// Name.
    pub name: String,
}

/// Filesystem-wide numbers for statfs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatFs {
    /// Total blocks of `bsize`.
    pub blocks: u64,
    /// Free blocks.
    pub bfree: u64,
    /// Blocks available to unprivileged users.
    pub bavail: u64,
    /// Total inodes.
    pub files: u64,
    /// Free inodes.
    pub ffree: u64,
    /// Block size.
    pub bsize: u32,
    /// Longest name.
    pub namelen: u32,
}

/// Who is asking, for ownership of new entries and for access checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
}

/// A directory's entries as listed at offset 0 of a handle, with their rows.
type DirSnapshot = Vec<(DirEntry, Inode)>;

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

/// The filesystem.
pub struct Fs {
    cfg: Config,
    store: Arc<dyn ObjectStore>,
    meta: Arc<InodeTable>,
    staging_dir: PathBuf,
    blocks: Arc<read::BlockSource>,
    buffers: MemoryBudget,
    defaults: EntryDefaults,
    hidden: HiddenKeyLog,
    /// Open inodes and handles.
    open: open_table::OpenTable,
    dir_locks: LockMap,
    /// Keys being written and directories being moved.
    keys: key_locks::KeyLocks,
    /// Keys this mount is changing, which listings running meanwhile leave alone.
    local: changes::LocalChanges,
    /// Reads the headers that listings lack, within one budget of requests.
    headers: listing::HeaderReader,
    /// What the kernel holds of this mount, and its caches to tell what changed.
    view: KernelView,
    /// This filesystem, for work it starts in the background (set by
    /// [`Fs::run_background`]).
    me: std::sync::OnceLock<std::sync::Weak<Fs>>,
    /// The background uploader's queue, slots and leftovers.
    uploader: sync::UploadQueue,
    /// Requests made to the bucket, and errors.
    requests: Arc<tracked::RequestCounts>,
    /// When this filesystem was opened.
    started: std::time::Instant,
    _cache_lock: File,
}

impl std::fmt::Debug for Fs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fs")
            .field("bucket", &self.cfg.bucket)
            .field("prefix", &self.cfg.prefix)
            .finish()
    }
}

impl Fs {
    /// Opens the cache directory (creating it 0700) and its inode table. Fails if another
    /// s3bridge process uses the same cache directory.
    pub fn new(cfg: Config, store: Arc<dyn ObjectStore>) -> FsResult<Self> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&cfg.cache_dir)?;
        if let Ok(md) = std::fs::metadata(&cfg.cache_dir)
            && md.permissions().mode() & 0o077 != 0
        {
            warn!(
                dir = %cfg.cache_dir.display(),
                "the cache directory is open to other users (mode {:o}); it holds staged file \
                 contents: chmod 700 it",
                md.permissions().mode() & 0o777
            );
        }
        let staging_dir = cfg.cache_dir.join("staging");
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&staging_dir)?;
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(cfg.cache_dir.join("lock"))?;
        // SAFETY: flock on an fd we own.
        if unsafe {
            libc::flock(
                std::os::fd::AsRawFd::as_raw_fd(&lock),
                libc::LOCK_EX | libc::LOCK_NB,
            )
        } != 0
        {
            return Err(FsError::Io(std::io::Error::new(
                std::io::ErrorKind::WouldBlock,
                format!(
                    "cache directory {} is in use by another s3bridge mount; give this mount \
                     its own --cache-dir",
                    cfg.cache_dir.display()
                ),
            )));
        }
        let defaults = EntryDefaults {
            uid: cfg.uid,
            gid: cfg.gid,
            file_perm: cfg.file_mode & 0o7777,
            dir_perm: cfg.dir_mode & 0o7777,
        };
        let root = Inode {
            ino: ROOT_INO,
            headers_known: true,
            ..Inode::new_entry(None, "", Kind::Dir, &defaults, Timestamp::now(), 0)
        };
        let db = cfg.cache_dir.join("meta.db");
        let meta = Arc::new(InodeTable::open(&db, &root)?);
        restrict_permissions(&db);
        // Read before any upload of this run can be recorded.
        let uploader = sync::UploadQueue::new(cfg.background_uploads, meta.recorded_uploads()?);
        let requests = Arc::new(tracked::RequestCounts::default());
        let store: Arc<dyn ObjectStore> = Arc::new(tracked::TrackedStore::new(
            store,
            meta.clone(),
            requests.clone(),
        ));
        let headers = listing::HeaderReader::new(store.clone(), !cfg.trust_listings)?;
        let buffers = MemoryBudget::new(cfg.max_buffer_memory);
        let blocks = Arc::new(read::BlockSource::new(
            store.clone(),
            open_block_cache(&cfg)?,
            buffers.clone(),
            read::ReadTuning {
                max_window: cfg.read_ahead_max,
                part_size: cfg.read_part_size,
            },
        ));
        let view = KernelView::new(cfg.metadata_ttl);
        Ok(Fs {
            cfg,
            store,
            meta,
            staging_dir,
            blocks,
            buffers,
            defaults,
            hidden: HiddenKeyLog::default(),
            open: open_table::OpenTable::new(),
            dir_locks: LockMap::default(),
            keys: key_locks::KeyLocks::default(),
            local: changes::LocalChanges::default(),
            headers,
            view,
            me: std::sync::OnceLock::new(),
            uploader,
            requests,
            started: std::time::Instant::now(),
            _cache_lock: lock,
        })
    }

    /// The mount's configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Connects the kernel's caches (the FUSE session's notifications), so that what the
    /// mount learns changed outside is forgotten there too. Set once, when mounted.
    pub fn set_kernel_cache(&self, kernel: Arc<dyn KernelCache>) {
        self.view.connect(kernel);
    }

    /// Counters of the block cache (all zero when it is off).
    pub fn cache_stats(&self) -> CacheStats {
        self.blocks.cache().map(|c| c.stats()).unwrap_or_default()
    }

    /// What `s3bridge status` shows.
    pub fn status(&self) -> Status {
        let (pending_files, pending_bytes) = self.pending_uploads();
        let cache = self.cache_stats();
        Status {
            uptime_secs: self.started.elapsed().as_secs(),
            pending_files,
            pending_bytes,
            uploads_in_flight: self.uploader.in_flight(),
            cache_bytes: cache.bytes,
            cache_blocks: cache.blocks,
            cache_hits: cache.hits,
            cache_misses: cache.misses,
            s3_requests: self.requests.requests.load(Ordering::Relaxed),
            s3_errors: self.requests.errors.load(Ordering::Relaxed),
        }
    }

    fn fresh(&self, at: i64) -> bool {
        self.cfg.metadata_ttl.is_fresh(at, now_ns())
    }

    fn check_writable(&self) -> FsResult<()> {
        if self.cfg.read_only {
            Err(FsError::ReadOnly)
        } else {
            Ok(())
        }
    }

    /// The current attributes of `ino`: an open file's live state, else the table's row.
    fn inode(&self, ino: u64) -> FsResult<Inode> {
        if let Some(f) = self.open_file_of(ino) {
            return Ok(f.attrs());
        }
        self.meta.get(ino)?.ok_or(FsError::NotFound)
    }

    /// Saves `inode` to the table and to the live state of an open file.
    fn save(&self, inode: &Inode) -> FsResult<()> {
        self.meta.save(inode)?;
        if let Some(f) = self.open_file_of(inode.ino) {
            f.set_attrs(inode.clone());
        }
        Ok(())
    }

    /// Marks the listing of directory `dir` stale, so the next look lists it again (an entry
    /// appeared in the bucket that the listing does not have).
    fn listing_is_stale(&self, dir: u64) -> FsResult<()> {
        self.meta.mark_listing_stale(dir)?;
        // Nor may the kernel serve the entries it cached (not waited for: callers hold locks).
        self.view
            .kernel()
            .invalidate(Invalidation::Inode(dir), None);
        Ok(())
    }

    fn open_file_of(&self, ino: u64) -> Option<Arc<OpenFile>> {
        self.open.file(ino)
    }

    fn dir(&self, ino: u64) -> FsResult<Inode> {
        let dir = self.inode(ino)?;
        if dir.kind != Kind::Dir {
            return Err(FsError::NotDir);
        }
        Ok(dir)
    }

    /// Key of an entry; directories get their trailing `/` (the root: the prefix itself).
    fn key_of(&self, inode: &Inode) -> FsResult<String> {
        let path = self.meta.path(inode.ino)?.ok_or(FsError::NotFound)?;
        Ok(names::key_of(
            &self.cfg.prefix,
            &path,
            inode.kind == Kind::Dir,
        )?)
    }

    /// Holds the key of `inode` for writing ([`key_locks`]); returns the key as it is then.
    async fn hold_key(&self, inode: &Inode) -> FsResult<(String, key_locks::WriteGuard<'_>)> {
        let ([key], held) = self
            .keys
            .write(|| -> FsResult<_> { Ok([self.key_of(inode)?]) })
            .await?;
        Ok((key, held))
    }

    /// [`Self::hold_key`], or `None` for an entry that is out of the namespace (unlinked).
    async fn hold_key_if_linked(
        &self,
        inode: &Inode,
    ) -> FsResult<Option<(String, key_locks::WriteGuard<'_>)>> {
        match self.hold_key(inode).await {
            Ok(held) => Ok(Some(held)),
            Err(FsError::NotFound) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Key of `name` in directory `dir`, as a file (`dir_marker` false) or directory marker.
    fn child_key(&self, dir: &Inode, name: &str, dir_marker: bool) -> FsResult<String> {
        let mut path = self.meta.path(dir.ino)?.ok_or(FsError::NotFound)?;
        path.push(name.to_string());
        Ok(names::key_of(&self.cfg.prefix, &path, dir_marker)?)
    }

    /// The attributes `stat` shows for `inode` (for a directory: its clock is being shown).
    fn attr(&self, inode: &Inode) -> FsResult<Attr> {
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
    pub fn forget(&self, ino: u64, n: u64) -> bool {
        self.view.forgot(ino, n)
    }

    /// Deletes the row of `ino`, which the kernel forgot, if it is unlinked and not open
    /// (the table keeps the inode numbers of live entries).
    pub fn forget_row(&self, ino: u64) {
        if self.is_referenced(ino) {
            return;
        }
        if let Err(e) = self.meta.forget(ino) {
            debug!(ino, "forget: {e}");
        }
    }

    fn is_referenced(&self, ino: u64) -> bool {
        self.view.holds(ino) || self.open_file_of(ino).is_some()
    }

    /// Looks up `name` in `parent`.
    #[instrument(level = "debug", skip(self))]
    pub async fn lookup(&self, parent: u64, name: &OsStr) -> FsResult<Attr> {
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
    pub async fn getattr(&self, ino: u64) -> FsResult<Attr> {
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
    async fn stat_view(&self, inode: Inode) -> FsResult<Inode> {
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
    async fn with_fresh_clock(&self, inode: Inode, wait: bool) -> FsResult<Inode> {
        let stale = inode.kind == Kind::Dir
            && inode.listed_at.is_some_and(|t| !self.fresh(t))
            && (inode.parent.is_some() || inode.ino == ROOT_INO);
        if !stale {
            return Ok(inode);
        }
        if !wait && let Some(me) = self.me.get() {
            let (me, dir) = (me.clone(), inode.clone());
            tokio::spawn(async move {
                if let Some(fs) = me.upgrade()
                    && let Err(e) = fs.refresh_dir_or_stale(&dir).await
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
    async fn find_child(&self, dir: &Inode, name: &str) -> FsResult<Option<Inode>> {
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
    async fn refresh_dir_or_stale(&self, dir: &Inode) -> FsResult<()> {
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
    async fn probe_child(&self, dir: &Inode, name: &str) -> FsResult<Option<Inode>> {
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
    async fn apply_found(
        &self,
        dir_ino: u64,
        dir_key: &str,
        name: &str,
        found: Found<'_>,
        read: &changes::ReadGuard,
    ) -> FsResult<Option<Inode>> {
        let state = DirView {
            fs: self,
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
    async fn revalidate(&self, inode: Inode) -> FsResult<Inode> {
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
    fn new_inode(&self, parent: u64, name: &str, kind: Kind, validated_at: i64) -> Inode {
        let now = Timestamp::now();
        Inode::new_entry(Some(parent), name, kind, &self.defaults, now, validated_at)
    }

    /// The POSIX headers describing `inode`.
    fn headers_of(&self, inode: &Inode) -> WriteHeaders {
        let h = PosixHeaders {
            mode: Some(inode.mode()),
            uid: Some(inode.uid),
            gid: Some(inode.gid),
            mtime: Some(inode.mtime),
            ctime: Some(inode.ctime),
            atime: Some(inode.atime),
            rdev: Some(inode.rdev),
            xattrs: inode.xattrs.clone(),
        };
        WriteHeaders {
            content_type: (inode.kind == Kind::Dir).then(|| DIR_CONTENT_TYPE.to_string()),
            metadata: headers::encode(&h),
        }
    }

    /// Makes sure the attributes of `inode` are its object's headers (one HEAD, remembered
    /// per object version). Fails with ENOENT if the object turns out to be gone or to be
    /// something else now.
    async fn ensure_headers(&self, inode: Inode) -> FsResult<Inode> {
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
    async fn refresh_dir(&self, dir_ino: u64) -> FsResult<()> {
        let dir = self.dir(dir_ino)?;
        if dir.listed_at.is_some_and(|t| self.fresh(t)) {
            return Ok(());
        }
        let _listing = self.dir_locks.lock_listing(dir_ino).await;
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
            fs: self,
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
    async fn after_changes(&self, dir: u64, changes: &Changes) {
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
    fn follow_new_version(&self, ino: u64) {
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
    fn take_new_version(&self, file: &OpenFile, st: &mut files::FileState) {
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
    pub async fn opendir(&self, ino: u64) -> FsResult<Opened> {
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
    fn expire_cached_entries(&self, dir: u64, listed_at: i64) {
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
            if let Some(fs) = me.upgrade() {
                fs.view.expire_entries(dir);
            }
        });
    }

    /// Entries of directory `ino` from `offset` on (a batch; call again to continue). The
    /// listing is taken when the handle reads from offset 0, and served from that snapshot.
    #[instrument(level = "debug", skip(self))]
    pub async fn readdir(&self, ino: u64, fh: u64, offset: u64) -> FsResult<Vec<DirEntry>> {
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
    pub async fn readdirplus(
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
    pub fn readdirplus_now(&self, fh: u64, offset: u64) -> Option<FsResult<Vec<(DirEntry, Attr)>>> {
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
            // A directory's link count is a query of the inode table, whose lock a listing
            // being applied may hold: not on the FUSE thread.
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
    pub fn entry_sent(&self, entry: &DirEntry) {
        if entry.name != "." && entry.name != ".." {
            self.view.looked_up(entry.ino);
        }
    }

    /// Up to `max` entries of an open directory from `offset`, with their rows. The listing
    /// is taken at offset 0 and kept with the handle, so offsets stay stable while the
    /// directory changes.
    async fn dir_batch(
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
    pub fn releasedir(&self, fh: u64) {
        self.open.remove_handle(fh);
    }

    /// Filesystem statistics. S3 has no capacity limit: report a large, constant size so
    /// programs that check free space (Nextcloud, installers) proceed.
    pub fn statfs(&self) -> StatFs {
        const PIB: u64 = 1 << 50;
        let bsize = 4096u32;
        StatFs {
            blocks: PIB / bsize as u64,
            bfree: PIB / bsize as u64,
            bavail: PIB / bsize as u64,
            files: 1 << 40,
            ffree: 1 << 40,
            bsize,
            namelen: names::NAME_MAX as u32,
        }
    }

    /// Checks `mask` (R_OK, W_OK, X_OK bits) for `caller` against the mode bits of `ino`.
    pub fn access(&self, ino: u64, mask: i32, caller: Caller) -> FsResult<()> {
        let inode = self.inode(ino)?;
        if mask & libc::W_OK != 0 && self.cfg.read_only {
            return Err(FsError::ReadOnly);
        }
        if caller.uid == 0 {
            // Root may do anything but execute a file nobody can execute.
            if mask & libc::X_OK != 0 && inode.kind != Kind::Dir && inode.perm & 0o111 == 0 {
                return Err(FsError::Access);
            }
            return Ok(());
        }
        let granted = if caller.uid == inode.uid {
            (inode.perm >> 6) & 7
        } else if caller.gid == inode.gid {
            (inode.perm >> 3) & 7
        } else {
            inode.perm & 7
        };
        let wanted = (mask & 7) as u32;
        if granted & wanted == wanted {
            Ok(())
        } else {
            Err(FsError::Access)
        }
    }

    /// Updates a directory's mtime and ctime after this mount changed its entries (kept
    /// locally). Never backwards: a clock moved ahead for an outside change stays ahead.
    fn touch_dir(&self, ino: u64) -> FsResult<()> {
        let shown = |mtime: Timestamp| self.view.clock_shown(ino, mtime);
        let row = self.meta.touch_dir(ino, Timestamp::now(), &shown)?;
        if let Some(f) = self.open_file_of(ino) {
            f.set_attrs(row);
        }
        Ok(())
    }

    /// The original object of a file, for reads and partial fetches.
    fn original_of(&self, inode: &Inode) -> FsResult<Option<Original>> {
        match &inode.etag {
            Some(etag) if inode.kind == Kind::File => Ok(Some(Original {
                key: self.key_of(inode)?,
                etag: etag.clone(),
            })),
            _ => Ok(None),
        }
    }

    fn upload_tuning(&self) -> write::UploadTuning {
        write::UploadTuning {
            multipart_threshold: self.cfg.multipart_threshold,
            part_size: self.cfg.part_size,
            concurrency: self.cfg.upload_concurrency,
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
    fs: &'a Fs,
    dir: u64,
    prefix: &'a str,
    read: &'a changes::ReadGuard,
}

impl crate::meta::inodes::DirState for DirView<'_> {
    fn busy(&self) -> crate::meta::Busy {
        self.fs.local.busy(self.prefix, self.read)
    }

    fn clock_shown(&self, mtime: Timestamp) -> bool {
        self.fs.view.clock_shown(self.dir, mtime)
    }
}

fn restrict_permissions(path: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    for p in [
        path.to_path_buf(),
        PathBuf::from(format!("{}-wal", path.display())),
        PathBuf::from(format!("{}-shm", path.display())),
    ] {
        let _ = std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600));
    }
}

#[cfg(test)]
mod tests;

/// The block cache under `<cache dir>/blocks`, or `None` when `--cache-size` is 0.
fn open_block_cache(cfg: &Config) -> FsResult<Option<Arc<BlockCache>>> {
    if cfg.cache_size == 0 {
        return Ok(None);
    }
    let limits = CacheLimits {
        max_bytes: cfg.cache_size,
        min_free: cfg.cache_min_free,
    };
    Ok(Some(Arc::new(BlockCache::open(
        &cfg.cache_dir.join("blocks"),
        &cfg.bucket,
        limits,
    )?)))
}
