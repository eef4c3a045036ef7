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
//! `Fs` ties together parts that own their state and are tested on their own: the tree as
//! the mount shows it — lookups, attributes, listings, `readdir` — ([`directories`], with
//! the listing reader [`listing::HeaderReader`], what the kernel holds of the mount
//! [`kernel::KernelView`] and what this mount is changing [`changes::LocalChanges`]), the
//! open-file table ([`open_table::OpenTable`]), the background uploader's queue
//! ([`sync::UploadQueue`]) and the keys being written ([`key_locks::KeyLocks`]). The
//! operations that change names (`namespace.rs`, `renames.rs`) and contents (`files.rs`,
//! `sync.rs`, `conflict.rs`) are `Fs`'s own.

pub mod budget;
mod changes;
mod conflict;
mod directories;
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

use std::ffi::OsStr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::SystemTime;

use tracing::warn;

use crate::cache::blocks::{BlockCache, CacheLimits, CacheStats};
use crate::config::Config;
use crate::meta::headers::{self, DIR_CONTENT_TYPE, PosixHeaders};
use crate::meta::names::{self, NameError};
use crate::meta::{EntryDefaults, Inode, InodeTable, Kind, MetaError, ROOT_INO, Timestamp};
use crate::store::{ObjectStore, StoreError, WriteHeaders};

use budget::MemoryBudget;
use directories::{Directories, TreeSettings};
pub use files::{OpenFile, Opened, SetAttr, TimeSet};
use kernel::KernelCache;
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

/// The filesystem.
pub struct Fs {
    cfg: Config,
    store: Arc<dyn ObjectStore>,
    meta: Arc<InodeTable>,
    staging_dir: PathBuf,
    blocks: Arc<read::BlockSource>,
    buffers: MemoryBudget,
    /// Open inodes and handles.
    open: Arc<open_table::OpenTable>,
    /// Lookups, attributes and listings of the tree.
    dirs: Arc<Directories>,
    /// Keys being written and directories being moved.
    keys: key_locks::KeyLocks,
    /// The background uploader's queue, slots and leftovers.
    uploader: sync::UploadQueue,
    /// Requests made to the bucket, and errors.
    requests: Arc<tracked::RequestCounts>,
    /// When this filesystem was opened.
    started: std::time::Instant,
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
        let buffers = MemoryBudget::new(cfg.max_buffer_memory);
        crate::buffers::keep_at_most(cfg.max_buffer_memory);
        let blocks = Arc::new(read::BlockSource::new(
            store.clone(),
            open_block_cache(&cfg)?,
            buffers.clone(),
            read::ReadTuning {
                max_window: cfg.read_ahead_max,
                part_size: cfg.read_part_size,
            },
        ));
        let open = Arc::new(open_table::OpenTable::new());
        let tree = TreeSettings {
            prefix: cfg.prefix.clone(),
            metadata_ttl: cfg.metadata_ttl,
            trust_listings: cfg.trust_listings,
        };
        let dirs = Directories::new(tree, meta.clone(), store.clone(), defaults, open.clone())?
            .holding(lock);
        Ok(Fs {
            cfg,
            store,
            meta,
            staging_dir,
            blocks,
            buffers,
            open,
            dirs: Arc::new(dirs),
            keys: key_locks::KeyLocks::default(),
            uploader,
            requests,
            started: std::time::Instant::now(),
        })
    }

    /// The mount's configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Connects the kernel's caches (the FUSE session's notifications), so that what the
    /// mount learns changed outside is forgotten there too. Set once, when mounted.
    pub fn set_kernel_cache(&self, kernel: Arc<dyn KernelCache>) {
        self.dirs.view.connect(kernel);
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

    fn check_writable(&self) -> FsResult<()> {
        if self.cfg.read_only {
            Err(FsError::ReadOnly)
        } else {
            Ok(())
        }
    }

    /// Holds the key of `inode` for writing ([`key_locks`]); returns the key as it is then.
    async fn hold_key(&self, inode: &Inode) -> FsResult<(String, key_locks::WriteGuard<'_>)> {
        let ([key], held) = self
            .keys
            .write(|| -> FsResult<_> { Ok([self.dirs.key_of(inode)?]) })
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

    /// Looks up `name` in `parent`.
    pub async fn lookup(&self, parent: u64, name: &OsStr) -> FsResult<Attr> {
        self.dirs.lookup(parent, name).await
    }

    /// Attributes of `ino`, re-validated against the bucket when stale.
    pub async fn getattr(&self, ino: u64) -> FsResult<Attr> {
        self.dirs.getattr(ino).await
    }

    /// The kernel dropped `n` references to `ino`; whether it holds none now (see
    /// [`Directories::forget`]).
    pub fn forget(&self, ino: u64, n: u64) -> bool {
        self.dirs.forget(ino, n)
    }

    /// Deletes the row of `ino`, which the kernel forgot, if it is unlinked and not open.
    pub fn forget_row(&self, ino: u64) {
        self.dirs.forget_row(ino)
    }

    /// Opens a directory handle (see [`Directories::opendir`]).
    pub async fn opendir(&self, ino: u64) -> FsResult<Opened> {
        self.dirs.opendir(ino).await
    }

    /// Entries of directory `ino` from `offset` on (see [`Directories::readdir`]).
    pub async fn readdir(&self, ino: u64, fh: u64, offset: u64) -> FsResult<Vec<DirEntry>> {
        self.dirs.readdir(ino, fh, offset).await
    }

    /// Entries with their attributes (see [`Directories::readdirplus`]).
    pub async fn readdirplus(
        &self,
        ino: u64,
        fh: u64,
        offset: u64,
    ) -> FsResult<Vec<(DirEntry, Attr)>> {
        self.dirs.readdirplus(ino, fh, offset).await
    }

    /// [`Self::readdirplus`] answered without waiting, if it can be (see
    /// [`Directories::readdirplus_now`]).
    pub fn readdirplus_now(&self, fh: u64, offset: u64) -> Option<FsResult<Vec<(DirEntry, Attr)>>> {
        self.dirs.readdirplus_now(fh, offset)
    }

    /// Records that the kernel received `entry` from a READDIRPLUS: a lookup of it.
    pub fn entry_sent(&self, entry: &DirEntry) {
        self.dirs.entry_sent(entry)
    }

    /// Closes a directory handle.
    pub fn releasedir(&self, fh: u64) {
        self.dirs.releasedir(fh)
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
        let inode = self.dirs.inode(ino)?;
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

    fn upload_tuning(&self) -> write::UploadTuning {
        write::UploadTuning {
            multipart_threshold: self.cfg.multipart_threshold,
            part_size: self.cfg.part_size,
            concurrency: self.cfg.upload_concurrency,
        }
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
