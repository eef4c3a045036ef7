//! The inode table: what s3bridge knows about every file and directory, kept in SQLite.
//!
//! S3 has keys, not inodes. The kernel wants stable inode numbers, attributes it can cache,
//! and directories it can walk; this module keeps that picture in one SQLite database per
//! mount (in the cache directory), so inode numbers survive a remount and a warm listing costs
//! no request. It is the only code that speaks SQL.

mod connections;
pub mod headers;
pub mod inodes;
pub mod names;
pub mod objects;
mod schema;

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use inodes::{
    Busy, Changes, DirRename, EntryDefaults, Found, InodeTable, ListedDir, ListedFile, Listing,
    ListingApply, StagingRecord,
};
pub use objects::{Headers, ObjectMeta, ObjectVersion};

/// Inode number of the mount's root directory (FUSE's fixed root id).
pub const ROOT_INO: u64 = 1;

/// Errors of the inode table.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    /// SQLite failed (disk full, corrupt database, ...).
    #[error("inode database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The database was written by a newer s3bridge.
    #[error(
        "inode database has schema version {0}, newer than this s3bridge understands; \
         use a newer s3bridge or another --cache-dir"
    )]
    NewerSchema(i64),
}

impl MetaError {
    /// The errno a filesystem caller sees.
    pub fn errno(&self) -> i32 {
        match self {
            MetaError::Sqlite(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::DiskFull =>
            {
                libc::ENOSPC
            }
            _ => libc::EIO,
        }
    }
}

/// Result type of the inode table.
pub type MetaResult<T> = Result<T, MetaError>;

/// File types that can live in a bucket. Everything but regular files and directories is
/// stored the way s3fs stores it: an object whose `x-amz-meta-mode` carries the type bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Regular file: the object's body.
    File,
    /// Directory: a `name/` marker object, or implied by keys under `name/`.
    Dir,
    /// Symbolic link: the object's body is the target.
    Symlink,
    /// Named pipe (no data; the kernel handles it).
    Fifo,
    /// Unix socket (no data).
    Socket,
    /// Character device node.
    CharDev,
    /// Block device node.
    BlockDev,
}

impl Kind {
    /// The `S_IFMT` bits of this kind.
    pub fn type_bits(self) -> u32 {
        match self {
            Kind::File => libc::S_IFREG,
            Kind::Dir => libc::S_IFDIR,
            Kind::Symlink => libc::S_IFLNK,
            Kind::Fifo => libc::S_IFIFO,
            Kind::Socket => libc::S_IFSOCK,
            Kind::CharDev => libc::S_IFCHR,
            Kind::BlockDev => libc::S_IFBLK,
        }
    }

    /// The kind named by the `S_IFMT` bits of `mode`, if any.
    pub fn from_mode(mode: u32) -> Option<Kind> {
        Some(match mode & libc::S_IFMT {
            libc::S_IFREG => Kind::File,
            libc::S_IFDIR => Kind::Dir,
            libc::S_IFLNK => Kind::Symlink,
            libc::S_IFIFO => Kind::Fifo,
            libc::S_IFSOCK => Kind::Socket,
            libc::S_IFCHR => Kind::CharDev,
            libc::S_IFBLK => Kind::BlockDev,
            _ => return None,
        })
    }
}

/// A point in time with nanoseconds, as POSIX timestamps are (may precede 1970).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Timestamp {
    /// Seconds since the epoch.
    pub sec: i64,
    /// Nanoseconds, below 1e9.
    pub nsec: u32,
}

impl Timestamp {
    /// The current time.
    pub fn now() -> Self {
        SystemTime::now().into()
    }

    /// As a `SystemTime`.
    pub fn to_system_time(self) -> SystemTime {
        if self.sec >= 0 {
            UNIX_EPOCH + Duration::new(self.sec as u64, self.nsec)
        } else {
            UNIX_EPOCH - Duration::from_secs(self.sec.unsigned_abs())
                + Duration::from_nanos(self.nsec as u64)
        }
    }
}

impl From<SystemTime> for Timestamp {
    fn from(t: SystemTime) -> Self {
        match t.duration_since(UNIX_EPOCH) {
            Ok(d) => Timestamp {
                sec: d.as_secs() as i64,
                nsec: d.subsec_nanos(),
            },
            Err(e) => {
                let d = e.duration();
                let (sec, nsec) = (d.as_secs() as i64, d.subsec_nanos());
                if nsec == 0 {
                    Timestamp { sec: -sec, nsec: 0 }
                } else {
                    Timestamp {
                        sec: -sec - 1,
                        nsec: 1_000_000_000 - nsec,
                    }
                }
            }
        }
    }
}

/// Everything the table holds about one entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inode {
    /// Inode number, stable for the life of the entry.
    pub ino: u64,
    /// Parent directory; `None` once unlinked (kept while the kernel or a handle holds it).
    pub parent: Option<u64>,
    /// Name in the parent.
    pub name: String,
    /// File type.
    pub kind: Kind,
    /// Permission bits (`07777`).
    pub perm: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Size in bytes (for a symlink: the target's length).
    pub size: u64,
    /// Device number of a device node.
    pub rdev: u32,
    /// Access time.
    pub atime: Timestamp,
    /// Modification time.
    pub mtime: Timestamp,
    /// Status-change time.
    pub ctime: Timestamp,
    /// ETag of the object behind this entry (a directory's marker); `None` when there is none.
    pub etag: Option<String>,
    /// Last-Modified of that object in milliseconds (see
    /// [`objects::ObjectVersion::last_modified`]); `None` when there is no object or this
    /// mount wrote it (then it is learned from the next listing).
    pub last_modified: Option<i64>,
    /// Whether the attributes are those of that object's POSIX headers (read, or written by
    /// us). Until then they are the mount's defaults and the listing's size and time, which
    /// is shown only with `--trust-listings`.
    pub headers_known: bool,
    /// Target of a symlink, once read.
    pub symlink_target: Option<String>,
    /// `user.*` extended attributes.
    pub xattrs: BTreeMap<String, Vec<u8>>,
    /// Local changes not yet in the bucket.
    pub dirty: bool,
    /// When this entry was last confirmed against the bucket (ns since the epoch).
    pub validated_at: i64,
    /// Directories: when the whole directory was last listed (ns since the epoch).
    pub listed_at: Option<i64>,
}

impl Inode {
    /// A new entry `name` of `parent` with the mount's defaults for its kind and all times
    /// `at`; the table assigns `ino` when it is inserted.
    pub fn new_entry(
        parent: Option<u64>,
        name: &str,
        kind: Kind,
        defaults: &EntryDefaults,
        at: Timestamp,
        validated_at: i64,
    ) -> Inode {
        Inode {
            ino: 0,
            parent,
            name: name.to_string(),
            kind,
            perm: if kind == Kind::Dir {
                defaults.dir_perm
            } else {
                defaults.file_perm
            },
            uid: defaults.uid,
            gid: defaults.gid,
            size: 0,
            rdev: 0,
            atime: at,
            mtime: at,
            ctime: at,
            etag: None,
            last_modified: None,
            headers_known: false,
            symlink_target: None,
            xattrs: BTreeMap::new(),
            dirty: false,
            validated_at,
            listed_at: None,
        }
    }

    /// The full `st_mode`: type bits and permissions.
    pub fn mode(&self) -> u32 {
        self.kind.type_bits() | self.perm
    }
}

/// Nanoseconds since the epoch, the unit of `validated_at` and `listed_at`.
pub fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_round_trip_before_and_after_the_epoch() {
        for (sec, nsec) in [
            (0, 0),
            (1, 5),
            (-1, 0),
            (-2, 999_999_999),
            (1_700_000_000, 1),
        ] {
            let t = Timestamp { sec, nsec };
            assert_eq!(Timestamp::from(t.to_system_time()), t);
        }
    }
}
