//! Inode and directory-entry operations on the SQLite table.
//!
//! Writes go through one connection, reads through others that never wait for it
//! ([`super::connections`]). Most statements are short (an indexed lookup or a single-row
//! update, microseconds); the big write, applying a directory's listing with the headers read
//! for it, runs one transaction per LIST page (about a millisecond per hundred entries, so ten
//! milliseconds for a page of 1,000), never one for a whole listing. No S3 request is ever
//! made inside a transaction.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use rusqlite::{Connection, OptionalExtension, Row, params};

use super::connections::Connections;
use super::{Headers, Inode, Kind, MetaResult, ObjectVersion, ROOT_INO, Timestamp};

/// Owner and permissions for entries whose object carries no POSIX headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryDefaults {
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Permissions of files.
    pub file_perm: u32,
    /// Permissions of directories.
    pub dir_perm: u32,
}

impl EntryDefaults {
    /// The defaults of unit tests: owner 7:8, files 0644, directories 0755.
    #[cfg(test)]
    pub const FOR_TESTS: EntryDefaults = EntryDefaults {
        uid: 7,
        gid: 8,
        file_perm: 0o644,
        dir_perm: 0o755,
    };
}

/// A file seen in a listing, with what reading its headers gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedFile {
    /// Name in the directory.
    pub name: String,
    /// The version the listing shows.
    pub version: ObjectVersion,
    /// Its headers, if they were read with the listing.
    pub headers: Headers,
}

/// A subdirectory seen in a listing (a common prefix), with what reading its marker gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedDir {
    /// Name in the directory.
    pub name: String,
    /// Its marker: read, absent (an implicit directory), or not read.
    pub marker: Headers,
}

/// The complete listing of one directory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Listing {
    /// Files (objects directly under the directory's prefix).
    pub files: Vec<ListedFile>,
    /// Subdirectories (common prefixes).
    pub dirs: Vec<ListedDir>,
    /// The directory's own marker object, if the listing showed one, and what reading its
    /// headers gave.
    pub marker: Option<(ObjectVersion, Headers)>,
    /// When the listing started ([`super::now_ns`]): rows changed after that are newer than
    /// the listing and are left alone.
    pub started_at: i64,
}

impl Listing {
    /// How many headers (files' and markers') were read with the listing.
    pub fn headers_read(&self) -> usize {
        let read = |h: &Headers| !matches!(h, Headers::Unread);
        self.files.iter().filter(|f| read(&f.headers)).count()
            + self.dirs.iter().filter(|d| read(&d.marker)).count()
            + self.marker.iter().filter(|(_, h)| read(h)).count()
    }
}

/// What one name of a directory turned out to be in the bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found<'a> {
    /// An object (file, symlink, special file) of this version, and what reading its
    /// headers gave.
    File(&'a ObjectVersion, &'a Headers),
    /// A directory, and what reading its marker gave.
    Dir(&'a Headers),
    /// Nothing.
    Absent,
}

/// What this mount is changing itself in a directory while a listing or probe of it runs.
/// The listing may have been answered before or after each such change, so it is no
/// evidence about those names: they are left as the mount's own change leaves them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Busy {
    /// Nothing.
    #[default]
    Nothing,
    /// These entries, and the directory's own marker if `marker`.
    Names {
        /// Entry names.
        names: HashSet<String>,
        /// The directory's marker.
        marker: bool,
    },
    /// The whole directory (a move of it or of a directory above it).
    All,
}

impl Busy {
    fn name(&self, name: &str) -> bool {
        match self {
            Busy::Nothing => false,
            Busy::Names { names, .. } => names.contains(name),
            Busy::All => true,
        }
    }

    fn marker(&self) -> bool {
        match self {
            Busy::Nothing => false,
            Busy::Names { marker, .. } => *marker,
            Busy::All => true,
        }
    }
}

/// What the filesystem knows of a directory that the table does not, asked inside the
/// transaction that applies a listing or probe of it (so that nothing it answers can change
/// before the rows do).
pub trait DirState {
    /// What this mount is changing in the directory while the listing or probe ran.
    fn busy(&self) -> Busy;
    /// Whether the directory's mtime `mtime` may have been shown to anyone: only then must
    /// an outside change move it (a change found before anyone looked again is already told
    /// by the last move), so a burst of changes moves it once, not a second each.
    fn clock_shown(&self, mtime: Timestamp) -> bool;
}

/// A directory nobody is changing and whose clock is taken as seen: for tests.
#[cfg(test)]
pub struct Quiet;

#[cfg(test)]
impl DirState for Quiet {
    fn busy(&self) -> Busy {
        Busy::Nothing
    }
    fn clock_shown(&self, _: Timestamp) -> bool {
        true
    }
}

/// Changes made outside this mount that a listing or probe found in one directory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    /// Names that appeared (only counted in a directory listed before: the first listing
    /// of a directory is no news).
    pub added: Vec<String>,
    /// Entries that disappeared: (inode, name).
    pub removed: Vec<(u64, String)>,
    /// Entries whose object is another version now: (inode, name).
    pub replaced: Vec<(u64, String)>,
    /// The directory's mtime and ctime moved forward (entries changed, or a new marker).
    pub clock_moved: bool,
}

impl Changes {
    /// Whether any entry changed.
    pub fn entries_changed(&self) -> bool {
        !(self.added.is_empty() && self.removed.is_empty() && self.replaced.is_empty())
    }
}

/// A listing of one directory being applied page by page ([`InodeTable::begin_listing`]).
#[derive(Debug)]
pub struct ListingApply {
    dir: u64,
    started: i64,
    listed_before: bool,
    /// Names the pages applied so far showed.
    seen: HashSet<String>,
    /// What they changed.
    changes: Changes,
    /// The directory was found moving as a whole: nothing more is applied.
    moving: bool,
}

impl ListingApply {
    fn context<'a>(&self, defaults: &'a EntryDefaults) -> Reconcile<'a> {
        Reconcile {
            dir: self.dir,
            started: self.started,
            now: Timestamp::now(),
            defaults,
            listed_before: self.listed_before,
        }
    }
}

/// What [`reconcile`] needs to know besides the name.
struct Reconcile<'a> {
    dir: u64,
    started: i64,
    now: Timestamp,
    defaults: &'a EntryDefaults,
    listed_before: bool,
}

/// Brings the row of one name of a directory in line with what the bucket holds, recording
/// what changed; returns the row the name has now. Rows with local changes, and rows
/// changed after the listing or probe started, are newer than what it found and are kept.
fn reconcile(
    conn: &Connection,
    ctx: &Reconcile<'_>,
    name: &str,
    found: Found<'_>,
    row: Option<Inode>,
    changes: &mut Changes,
) -> MetaResult<Option<Inode>> {
    if let Some(r) = &row
        && (r.dirty || r.validated_at > ctx.started)
    {
        return Ok(row);
    }
    let found = match found {
        Found::File(_, Headers::Gone) => Found::Absent,
        other => other,
    };
    let replaced_row = |row: Option<Inode>, changes: &mut Changes| -> MetaResult<()> {
        match row {
            Some(old) => {
                detach(conn, old.ino)?;
                changes.replaced.push((old.ino, name.to_string()));
            }
            None if ctx.listed_before => changes.added.push(name.to_string()),
            None => {}
        }
        Ok(())
    };
    // A directory with changes of this mount inside stays until they are in the bucket:
    // detached, their uploads would have no key left to go to.
    if let Some(r) = &row
        && r.kind == Kind::Dir
        && !matches!(found, Found::Dir(_))
        && holds_local_changes(conn, r.ino)?
    {
        return Ok(row);
    }
    match found {
        Found::Absent => {
            if let Some(old) = row {
                detach(conn, old.ino)?;
                changes.removed.push((old.ino, name.to_string()));
            }
            Ok(None)
        }
        Found::Dir(marker) => {
            let (mut r, new) = match row {
                Some(r) if r.kind == Kind::Dir => (r, false),
                other => {
                    replaced_row(other, changes)?;
                    (listed_dir(ctx.dir, name, ctx.defaults, ctx.started), true)
                }
            };
            r.apply_marker(marker, ctx.defaults, ctx.now);
            r.validated_at = ctx.started;
            store_row(conn, &mut r, new)?;
            Ok(Some(r))
        }
        Found::File(listed, headers) => {
            // A HEAD after the listing saw the newer version.
            let version = match headers {
                Headers::Read(m) => &m.version,
                _ => listed,
            };
            // Another type is another inode: the kernel refuses to see a cached inode change
            // its type (it marks it bad, and its users get EIO).
            let same_type = |r: &Inode| match headers {
                Headers::Read(m) => m.kind() == r.kind || !r.headers_known,
                _ => r.kind != Kind::Dir,
            };
            let (mut r, new) = match row {
                Some(r) if r.kind != Kind::Dir && same_type(&r) => (r, false),
                other => {
                    replaced_row(other, changes)?;
                    let mut fresh = listed_dir(ctx.dir, name, ctx.defaults, ctx.started);
                    fresh.kind = Kind::File;
                    fresh.describe_listed_file(version, ctx.defaults);
                    (fresh, true)
                }
            };
            let known = r.headers_known;
            let before = r.clone();
            match headers {
                // What a HEAD says is the object as it is now, even where the version looks
                // the same (headers rewritten within one second keep ETag and, on servers
                // that give whole seconds, Last-Modified).
                Headers::Read(m) => r.describe_file(m, ctx.defaults),
                _ if !r.holds(version) => r.describe_listed_file(version, ctx.defaults),
                _ => {}
            }
            // Shown before with other attributes: another version (the first description of
            // an entry, or of a file listed but never read, is no change).
            let other = if known {
                !r.shows_same(&before)
            } else {
                before.etag.is_some() && !before.holds(version)
            };
            // A listing's Last-Modified may say more than the HEAD's (milliseconds), and
            // that of our own upload is learned only now.
            if r.holds(listed) {
                r.learn_modified(listed);
            }
            r.validated_at = ctx.started;
            store_row(conn, &mut r, new)?;
            if other {
                changes.replaced.push((r.ino, name.to_string()));
            }
            Ok(Some(r))
        }
    }
}

/// Persistent bookkeeping of a staging file (see `cache::staging`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StagingRecord {
    /// Key of the object the staged contents started from.
    pub orig_key: Option<String>,
    /// Its ETag.
    pub orig_etag: Option<String>,
    /// How many leading bytes of that object still belong to the file.
    pub orig_len: u64,
    /// Block size of the presence bitmap.
    pub block_size: u64,
    /// Presence bitmap, one bit per block, little-endian within bytes.
    pub present: Vec<u8>,
}

/// A directory rename in progress: the row of `src_ino` moves to `new_name` in
/// `new_parent`, and every object under `old_prefix` to `new_prefix`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirRename {
    /// The directory being moved.
    pub src_ino: u64,
    /// Its new parent directory.
    pub new_parent: u64,
    /// Its new name.
    pub new_name: String,
    /// Key prefix of the directory before the move (ends with `/`).
    pub old_prefix: String,
    /// Key prefix after the move (ends with `/`).
    pub new_prefix: String,
}

/// The inode table of one mount.
#[derive(Debug)]
pub struct InodeTable {
    db: Connections,
}

/// The number of subdirectories of `?1`, from the partial index `inodes_subdirs` (whose
/// `WHERE kind = S_IFDIR` must appear here literally: 16384).
const SUBDIR_COUNT: &str = "SELECT COUNT(*) FROM inodes WHERE parent = ?1 AND kind = 16384";

const COLUMNS: &str = "ino, parent, name, kind, perm, uid, gid, size, rdev, atime_s, atime_ns, \
     mtime_s, mtime_ns, ctime_s, ctime_ns, etag, headers_known, symlink_target, xattrs, dirty, \
     validated_at, listed_at, last_modified";

fn encode_xattrs(x: &BTreeMap<String, Vec<u8>>) -> Option<String> {
    if x.is_empty() {
        return None;
    }
    let map: serde_json::Map<String, serde_json::Value> = x
        .iter()
        .map(|(k, v)| (k.clone(), serde_json::Value::String(BASE64.encode(v))))
        .collect();
    Some(serde_json::Value::Object(map).to_string())
}

fn decode_xattrs(text: Option<String>) -> BTreeMap<String, Vec<u8>> {
    let Some(text) = text else {
        return BTreeMap::new();
    };
    let Ok(serde_json::Value::Object(map)) = serde_json::from_str(&text) else {
        return BTreeMap::new();
    };
    map.into_iter()
        .filter_map(|(k, v)| Some((k, BASE64.decode(v.as_str()?).ok()?)))
        .collect()
}

fn from_row(r: &Row<'_>) -> rusqlite::Result<Inode> {
    let ts = |s: usize| -> rusqlite::Result<Timestamp> {
        Ok(Timestamp {
            sec: r.get(s)?,
            nsec: r.get(s + 1)?,
        })
    };
    let kind_bits: u32 = r.get(3)?;
    Ok(Inode {
        ino: r.get(0)?,
        parent: r.get(1)?,
        name: r.get(2)?,
        kind: Kind::from_mode(kind_bits).unwrap_or(Kind::File),
        perm: r.get(4)?,
        uid: r.get(5)?,
        gid: r.get(6)?,
        size: r.get::<_, i64>(7)? as u64,
        rdev: r.get(8)?,
        atime: ts(9)?,
        mtime: ts(11)?,
        ctime: ts(13)?,
        etag: r.get(15)?,
        headers_known: r.get(16)?,
        symlink_target: r.get(17)?,
        xattrs: decode_xattrs(r.get(18)?),
        dirty: r.get(19)?,
        validated_at: r.get(20)?,
        listed_at: r.get(21)?,
        last_modified: r.get(22)?,
    })
}

impl InodeTable {
    /// Opens (creating if needed) the database at `path`. The root row takes `root`'s
    /// attributes (they come from the mount options), and entries left unlinked by a previous
    /// run are dropped: no kernel holds them any more.
    pub fn open(path: &Path, root: &Inode) -> MetaResult<Self> {
        Self::with_connections(Connections::open(path)?, root)
    }

    /// An in-memory table, for tests.
    pub fn open_in_memory(root: &Inode) -> MetaResult<Self> {
        Self::with_connections(Connections::in_memory()?, root)
    }

    fn with_connections(db: Connections, root: &Inode) -> MetaResult<Self> {
        db.write(|conn| {
            let exists: bool = conn
                .query_row("SELECT 1 FROM inodes WHERE ino = ?1", [ROOT_INO], |_| {
                    Ok(true)
                })
                .optional()?
                .unwrap_or(false);
            if !exists {
                insert_row(conn, Some(ROOT_INO), root)?;
            }
            let mut root_row = root.clone();
            root_row.ino = ROOT_INO;
            root_row.parent = None;
            root_row.name = String::new();
            if exists {
                // Owner and mode come from this mount's options; the listing timestamps and
                // the times are the root's own and stay what they were (design.md §4:
                // stable across remounts).
                let old = conn.query_row(
                    &format!("SELECT {COLUMNS} FROM inodes WHERE ino = ?1"),
                    [ROOT_INO],
                    from_row,
                )?;
                root_row.listed_at = old.listed_at;
                root_row.validated_at = old.validated_at;
                root_row.atime = old.atime;
                root_row.mtime = old.mtime;
                root_row.ctime = old.ctime;
            }
            update_row(conn, &root_row)?;
            purge_unreachable(conn)
        })?;
        Ok(InodeTable { db })
    }

    /// The entry with inode number `ino`.
    pub fn get(&self, ino: u64) -> MetaResult<Option<Inode>> {
        self.db.read(|conn| {
            let mut stmt =
                conn.prepare_cached(&format!("SELECT {COLUMNS} FROM inodes WHERE ino = ?1"))?;
            Ok(stmt.query_row([ino], from_row).optional()?)
        })
    }

    /// The entry `name` in directory `parent`.
    pub fn child(&self, parent: u64, name: &str) -> MetaResult<Option<Inode>> {
        self.db.read(|conn| child_row(conn, parent, name))
    }

    /// All entries of directory `parent`, sorted by name. Runs where it is called: a folder
    /// of a few hundred entries takes about 0.1 ms, less than handing it off the worker costs
    /// when the machine is busy; a caller that may read a large directory hands it off
    /// itself.
    pub fn children(&self, parent: u64) -> MetaResult<Vec<Inode>> {
        self.db.read(|conn| {
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT {COLUMNS} FROM inodes WHERE parent = ?1 ORDER BY name"
            ))?;
            let rows = stmt.query_map([parent], from_row)?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    /// After a move of directory `dir` from `old_prefix`: gives every entry under it whose
    /// old key is in `new_etags` (old key → its copy's ETag) that ETag, validated `at`, in one
    /// transaction (a 2,000-file folder's rows one statement each took the writer 4,000 times
    /// in a row). Returns the entries changed: inode, old key, new ETag.
    pub fn retarget_subtree(
        &self,
        dir: u64,
        old_prefix: &str,
        new_etags: &std::collections::HashMap<String, String>,
        at: i64,
    ) -> MetaResult<Vec<(u64, String, String)>> {
        self.db.write_long(|conn| {
            let tx = conn.transaction()?;
            let mut changed = Vec::new();
            {
                let mut children =
                    tx.prepare_cached("SELECT ino, name, kind FROM inodes WHERE parent = ?1")?;
                let mut update = tx.prepare_cached(
                    "UPDATE inodes SET etag = ?2, last_modified = NULL, validated_at = ?3
                 WHERE ino = ?1",
                )?;
                let mut pending = vec![(dir, old_prefix.to_string())];
                while let Some((ino, prefix)) = pending.pop() {
                    let rows = children
                        .query_map([ino], |r| {
                            Ok((
                                r.get::<_, u64>(0)?,
                                r.get::<_, String>(1)?,
                                r.get::<_, u32>(2)?,
                            ))
                        })?
                        .collect::<Result<Vec<_>, _>>()?;
                    for (child, name, kind) in rows {
                        let is_dir = Kind::from_mode(kind) == Some(Kind::Dir);
                        let old_key = format!("{prefix}{name}{}", if is_dir { "/" } else { "" });
                        if is_dir {
                            pending.push((child, old_key.clone()));
                        }
                        if let Some(etag) = new_etags.get(&old_key) {
                            update.execute(params![child, etag, at])?;
                            changed.push((child, old_key, etag.clone()));
                        }
                    }
                }
            }
            tx.commit()?;
            Ok(changed)
        })
    }

    /// Whether directory `parent` has any entry.
    pub fn has_children(&self, parent: u64) -> MetaResult<bool> {
        self.db.read(|conn| {
            let mut stmt = conn.prepare_cached("SELECT 1 FROM inodes WHERE parent = ?1 LIMIT 1")?;
            Ok(stmt.exists([parent])?)
        })
    }

    /// Number of subdirectories of `parent` (for `st_nlink`).
    pub fn subdir_count(&self, parent: u64) -> MetaResult<u64> {
        self.db.read(|conn| {
            // The kind is written out, not bound: SQLite uses the partial index
            // `inodes_subdirs` only for a query whose terms name its `WHERE` literally.
            let mut stmt = conn.prepare_cached(SUBDIR_COUNT)?;
            let n: i64 = stmt.query_row(params![parent], |r| r.get(0))?;
            Ok(n as u64)
        })
    }

    /// Whether directory `parent` has fewer than `n` entries. Counts at most `n` index
    /// entries (a 100,000-entry directory's full count took milliseconds), so it is a short
    /// read for the `n` of a listing page.
    pub fn has_fewer_children(&self, parent: u64, n: u64) -> MetaResult<bool> {
        self.db.read(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT COUNT(*) FROM (SELECT 1 FROM inodes WHERE parent = ?1 LIMIT ?2)",
            )?;
            let found: i64 = stmt.query_row(params![parent, n as i64], |r| r.get(0))?;
            Ok((found as u64) < n)
        })
    }

    /// Inserts a new entry and sets `inode.ino` to its new, never reused, number.
    pub fn insert(&self, inode: &mut Inode) -> MetaResult<()> {
        self.db.write(|conn| {
            inode.ino = insert_row(conn, None, inode)?;
            Ok(())
        })
    }

    /// Writes every attribute of `inode` back.
    pub fn save(&self, inode: &Inode) -> MetaResult<()> {
        self.db.write(|conn| update_row(conn, inode))
    }

    /// Moves an entry to `new_parent` under `new_name`.
    pub fn rename(&self, ino: u64, new_parent: u64, new_name: &str) -> MetaResult<()> {
        self.db.write(|conn| {
            conn.execute(
                "UPDATE inodes SET parent = ?2, name = ?3 WHERE ino = ?1",
                params![ino, new_parent, new_name],
            )?;
            Ok(())
        })
    }

    /// Detaches an entry from its directory; the row lives on until [`Self::forget`].
    pub fn unlink(&self, ino: u64) -> MetaResult<()> {
        self.db.write(|conn| {
            conn.execute(
                "UPDATE inodes SET parent = NULL, name = '#' || ino WHERE ino = ?1",
                [ino],
            )?;
            Ok(())
        })
    }

    /// Deletes an unlinked entry (and its staging record) once nothing holds it.
    pub fn forget(&self, ino: u64) -> MetaResult<()> {
        self.db.write(|conn| {
            let n = conn.execute(
                "DELETE FROM inodes WHERE ino = ?1 AND parent IS NULL",
                [ino],
            )?;
            if n > 0 {
                conn.execute("DELETE FROM staging WHERE ino = ?1", [ino])?;
            }
            Ok(())
        })
    }

    /// Names from the root down to `ino`; `None` if it is not reachable from the root.
    pub fn path(&self, ino: u64) -> MetaResult<Option<Vec<String>>> {
        self.db.read(|conn| {
            // One snapshot for the whole walk: a rename committed halfway through would
            // otherwise give a path that never existed.
            let snapshot = conn.unchecked_transaction()?;
            let mut stmt =
                snapshot.prepare_cached("SELECT parent, name FROM inodes WHERE ino = ?1")?;
            let mut names = Vec::new();
            let mut cur = ino;
            while cur != ROOT_INO {
                let row: Option<(Option<u64>, String)> = stmt
                    .query_row([cur], |r| Ok((r.get(0)?, r.get(1)?)))
                    .optional()?;
                match row {
                    Some((Some(parent), name)) if names.len() < 4096 => {
                        names.push(name);
                        cur = parent;
                    }
                    _ => return Ok(None),
                }
            }
            names.reverse();
            Ok(Some(names))
        })
    }

    /// Inodes with local changes not yet in the bucket.
    pub fn dirty_inodes(&self) -> MetaResult<Vec<u64>> {
        self.db.scan(|conn| {
            let mut stmt = conn.prepare_cached("SELECT ino FROM inodes WHERE dirty = 1")?;
            let rows = stmt.query_map([], |r| r.get(0))?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    /// Records that this mount wrote directory `dir`'s marker and got `etag` back, leaving
    /// the rest of its row (which a listing may have just updated) as it is.
    pub fn set_marker(&self, dir: u64, etag: &str, at: i64) -> MetaResult<()> {
        self.db.write(|conn| {
            conn.execute(
                "UPDATE inodes SET etag = ?2, last_modified = NULL, headers_known = 1,
             validated_at = ?3 WHERE ino = ?1",
                params![dir, etag, at],
            )?;
            Ok(())
        })
    }

    /// Moves directory `dir`'s mtime and ctime for a change this mount made to its entries:
    /// to `now`, or, where the clock is already at or past `now` (moved forward for an
    /// outside change), one whole second further if that value may have been seen
    /// (`clock_shown`), so that the change shows and the clock never goes back. Returns the
    /// row.
    pub fn touch_dir(
        &self,
        dir: u64,
        now: Timestamp,
        clock_shown: &dyn Fn(Timestamp) -> bool,
    ) -> MetaResult<Inode> {
        self.db.write(|conn| {
            let tx = conn.transaction()?;
            let mut row = get_row(&tx, dir)?;
            if row.mtime < now {
                row.mtime = now;
            } else if clock_shown(row.mtime) {
                row.mtime = super::objects::advance(row.mtime, now);
            }
            row.ctime = row.ctime.max(row.mtime);
            tx.execute(
                "UPDATE inodes SET mtime_s = ?2, mtime_ns = ?3, ctime_s = ?4, ctime_ns = ?5
             WHERE ino = ?1",
                params![
                    dir,
                    row.mtime.sec,
                    row.mtime.nsec,
                    row.ctime.sec,
                    row.ctime.nsec
                ],
            )?;
            tx.commit()?;
            Ok(row)
        })
    }

    /// Marks the listing of directory `dir` stale, if it was listed: the next look lists it
    /// again.
    pub fn mark_listing_stale(&self, dir: u64) -> MetaResult<()> {
        self.db.write(|conn| {
            conn.execute(
                "UPDATE inodes SET listed_at = 0 WHERE ino = ?1 AND listed_at IS NOT NULL",
                [dir],
            )?;
            Ok(())
        })
    }

    /// Reconciles directory `dir` with a complete listing of its prefix and returns what
    /// changed outside this mount: [`Self::begin_listing`], [`Self::apply_listed`] with all
    /// its entries, [`Self::finish_listing`].
    pub fn apply_listing(
        &self,
        dir: u64,
        listing: &Listing,
        defaults: &EntryDefaults,
        state: &dyn DirState,
    ) -> MetaResult<Changes> {
        let mut applying = self.begin_listing(dir, listing.started_at)?;
        self.apply_listed(
            &mut applying,
            &listing.files,
            &listing.dirs,
            defaults,
            state,
        )?;
        self.finish_listing(applying, listing.marker.as_ref(), defaults, state)
    }

    /// Starts applying a listing of directory `dir` that started at `started`
    /// ([`super::now_ns`]), page by page: each page in a short transaction of its own, so
    /// that other users of the table wait for one page at most, and a page is written while
    /// the headers of the next are read.
    pub fn begin_listing(&self, dir: u64, started: i64) -> MetaResult<ListingApply> {
        self.db.read(|conn| {
            let listed_before = get_row(conn, dir)?.listed_at.is_some();
            Ok(ListingApply {
                dir,
                started,
                listed_before,
                seen: HashSet::new(),
                changes: Changes::default(),
                moving: false,
            })
        })
    }

    /// Reconciles the entries of some pages of a listing, in one transaction. A name listed
    /// both as a file and as a directory must come in one call (the directory wins, design.md
    /// §3), as the listing reader sees to.
    ///
    /// `state` tells, when the transaction runs, what this mount is changing in the directory
    /// itself: those names are left alone (see [`Busy`]). Rows with local changes, rows
    /// changed after the listing started, and directories holding local changes are left
    /// alone too.
    pub fn apply_listed(
        &self,
        applying: &mut ListingApply,
        files: &[ListedFile],
        dirs: &[ListedDir],
        defaults: &EntryDefaults,
        state: &dyn DirState,
    ) -> MetaResult<()> {
        self.db.write_long(|conn| {
            let tx = conn.transaction()?;
            // Asked inside the transaction: nothing it answers can change before the rows do.
            let busy = state.busy();
            if busy == Busy::All || applying.moving {
                // Moving as a whole: the listing may show it half moved. The next look lists
                // it again.
                applying.moving = true;
                return Ok(());
            }
            let ctx = applying.context(defaults);
            let dirs = dirs.iter().map(|d| (&d.name, Found::Dir(&d.marker)));
            let files = files
                .iter()
                .map(|f| (&f.name, Found::File(&f.version, &f.headers)));
            for (name, found) in dirs.chain(files) {
                // Directories come first and win over a file of the same name.
                if !applying.seen.insert(name.clone()) || busy.name(name) {
                    continue;
                }
                let row = child_row(&tx, applying.dir, name)?;
                reconcile(&tx, &ctx, name, found, row, &mut applying.changes)?;
            }
            tx.commit()?;
            Ok(())
        })
    }

    /// Ends a listing whose every page was applied: the names it did not show are gone, the
    /// directory's own marker is `marker`, and if anything changed outside this mount the
    /// directory's mtime and ctime move forward ([`super::objects::advance`]). Returns what
    /// changed.
    pub fn finish_listing(
        &self,
        applying: ListingApply,
        marker: Option<&(ObjectVersion, Headers)>,
        defaults: &EntryDefaults,
        state: &dyn DirState,
    ) -> MetaResult<Changes> {
        self.db.write_long(|conn| {
            let tx = conn.transaction()?;
            let busy = state.busy();
            if busy == Busy::All || applying.moving {
                let changes = settle_abandoned(&tx, applying, state)?;
                tx.commit()?;
                return Ok(changes);
            }
            let ctx = applying.context(defaults);
            let ListingApply {
                dir,
                started,
                seen,
                mut changes,
                ..
            } = applying;
            let unseen: Vec<Inode> = {
                let mut stmt =
                    tx.prepare_cached(&format!("SELECT {COLUMNS} FROM inodes WHERE parent = ?1"))?;
                let rows = stmt.query_map([dir], from_row)?;
                rows.filter(|r| r.as_ref().map_or(true, |i| !seen.contains(&i.name)))
                    .collect::<Result<_, _>>()?
            };
            for row in unseen {
                if !busy.name(&row.name) {
                    let name = row.name.clone();
                    reconcile(&tx, &ctx, &name, Found::Absent, Some(row), &mut changes)?;
                }
            }
            let mut dir_row = get_row(&tx, dir)?;
            let shown = (dir_row.mtime, dir_row.ctime);
            let untouchable = dir_row.validated_at > started;
            if dir != ROOT_INO && !untouchable && !busy.marker() {
                match marker {
                    Some((v, _)) if dir_row.headers_known && dir_row.holds(v) => {
                        dir_row.learn_modified(v)
                    }
                    Some((_, marker)) => dir_row.apply_marker(marker, defaults, ctx.now),
                    None => dir_row.apply_marker(&Headers::Gone, defaults, ctx.now),
                }
            }
            if changes.entries_changed()
                && (dir_row.mtime, dir_row.ctime) == shown
                && state.clock_shown(dir_row.mtime)
            {
                dir_row.advance_clock(ctx.now);
            }
            changes.clock_moved = (dir_row.mtime, dir_row.ctime) != shown;
            dir_row.listed_at = Some(started);
            if !untouchable {
                dir_row.validated_at = started;
            }
            update_row(&tx, &dir_row)?;
            tx.commit()?;
            Ok(changes)
        })
    }

    /// Ends a listing that could not be completed (an error, or the directory found moving
    /// as a whole): what its pages applied stays, and is news like any change — the
    /// directory's clock moves for it, since the next listing finds those rows as they are
    /// and will not report it again. Returns what changed.
    pub fn abandon_listing(
        &self,
        applying: ListingApply,
        state: &dyn DirState,
    ) -> MetaResult<Changes> {
        self.db.write_long(|conn| {
            let tx = conn.transaction()?;
            let changes = settle_abandoned(&tx, applying, state)?;
            tx.commit()?;
            Ok(changes)
        })
    }

    /// Reconciles one name of directory `dir` with what a probe started at `started` found
    /// in the bucket; returns the row the name has now and what changed outside this mount
    /// (the directory's clock moves forward if anything did).
    pub fn apply_probe(
        &self,
        dir: u64,
        name: &str,
        found: Found<'_>,
        started: i64,
        defaults: &EntryDefaults,
        state: &dyn DirState,
    ) -> MetaResult<(Option<Inode>, Changes)> {
        self.db.write(|conn| {
            let tx = conn.transaction()?;
            let row = child_row(&tx, dir, name)?;
            let mut changes = Changes::default();
            if state.busy().name(name) {
                return Ok((row, changes));
            }
            let mut dir_row = get_row(&tx, dir)?;
            let ctx = Reconcile {
                dir,
                started,
                now: Timestamp::now(),
                defaults,
                listed_before: dir_row.listed_at.is_some(),
            };
            let row = reconcile(&tx, &ctx, name, found, row, &mut changes)?;
            tell_changes(&tx, &mut dir_row, &mut changes, state, ctx.now)?;
            tx.commit()?;
            Ok((row, changes))
        })
    }

    /// Stores the staging bookkeeping of `ino`.
    pub fn save_staging(&self, ino: u64, rec: &StagingRecord) -> MetaResult<()> {
        self.db.write(|conn| Ok(save_staging_row(conn, ino, rec)?))
    }

    /// Stores the bookkeeping of a file whose data a close has acknowledged (write-back):
    /// its row (dirty) and its staging record, in one transaction that is on disk when this
    /// returns, so a crash or a power cut after it cannot lose the file.
    pub fn save_pending(&self, inode: &Inode, rec: &StagingRecord) -> MetaResult<()> {
        self.db.write_long(|conn| {
            // In WAL mode FULL syncs the log at commit; NORMAL (the default here) would leave the
            // commit to the next checkpoint.
            conn.pragma_update(None, "synchronous", "FULL")?;
            let result = (|| -> MetaResult<()> {
                let tx = conn.transaction()?;
                update_row(&tx, inode)?;
                save_staging_row(&tx, inode.ino, rec)?;
                Ok(tx.commit()?)
            })();
            conn.pragma_update(None, "synchronous", "NORMAL")?;
            result
        })
    }

    /// Records a multipart upload that was just created.
    pub fn record_upload(&self, upload_id: &str, key: &str) -> MetaResult<()> {
        self.db.write(|conn| {
            conn.execute(
                "INSERT OR REPLACE INTO multipart_uploads (upload_id, key) VALUES (?1, ?2)",
                params![upload_id, key],
            )?;
            Ok(())
        })
    }

    /// Forgets a multipart upload that was completed or aborted.
    pub fn forget_upload(&self, upload_id: &str) -> MetaResult<()> {
        self.db.write(|conn| {
            conn.execute(
                "DELETE FROM multipart_uploads WHERE upload_id = ?1",
                [upload_id],
            )?;
            Ok(())
        })
    }

    /// Multipart uploads recorded and not yet forgotten: (upload id, key).
    pub fn recorded_uploads(&self) -> MetaResult<Vec<(String, String)>> {
        self.db.scan(|conn| {
            let mut stmt = conn.prepare_cached("SELECT upload_id, key FROM multipart_uploads")?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
            Ok(rows.collect::<rusqlite::Result<_>>()?)
        })
    }

    /// Records a directory rename about to start, durably; returns its id.
    pub fn begin_dir_rename(&self, r: &DirRename) -> MetaResult<i64> {
        self.db.write_long(|conn| {
            conn.pragma_update(None, "synchronous", "FULL")?;
            let result = conn.execute(
                "INSERT INTO dir_renames (src_ino, new_parent, new_name, old_prefix, new_prefix)
             VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    r.src_ino,
                    r.new_parent,
                    r.new_name,
                    r.old_prefix,
                    r.new_prefix
                ],
            );
            conn.pragma_update(None, "synchronous", "NORMAL")?;
            result?;
            Ok(conn.last_insert_rowid())
        })
    }

    /// Forgets a directory rename that finished (or was rolled back).
    pub fn end_dir_rename(&self, id: i64) -> MetaResult<()> {
        self.db.write(|conn| {
            conn.execute("DELETE FROM dir_renames WHERE id = ?1", [id])?;
            Ok(())
        })
    }

    /// Directory renames a previous run started and did not finish, oldest first.
    pub fn pending_dir_renames(&self) -> MetaResult<Vec<(i64, DirRename)>> {
        self.db.scan(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT id, src_ino, new_parent, new_name, old_prefix, new_prefix
             FROM dir_renames ORDER BY id",
            )?;
            let rows = stmt.query_map([], |r| {
                Ok((
                    r.get(0)?,
                    DirRename {
                        src_ino: r.get(1)?,
                        new_parent: r.get(2)?,
                        new_name: r.get(3)?,
                        old_prefix: r.get(4)?,
                        new_prefix: r.get(5)?,
                    },
                ))
            })?;
            Ok(rows.collect::<rusqlite::Result<_>>()?)
        })
    }

    /// Staging records whose original lies under `prefix`: (ino, original key).
    pub fn staging_under(&self, prefix: &str) -> MetaResult<Vec<(u64, String)>> {
        self.db.scan(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT ino, orig_key FROM staging
             WHERE orig_key >= ?1 AND substr(orig_key, 1, length(?1)) = ?1",
            )?;
            let rows = stmt.query_map([prefix], |r| Ok((r.get(0)?, r.get(1)?)))?;
            Ok(rows.collect::<rusqlite::Result<_>>()?)
        })
    }

    /// Points the staging record of `ino` at another original (a renamed object).
    pub fn retarget_staging(&self, ino: u64, key: &str, etag: &str) -> MetaResult<()> {
        self.db.write(|conn| {
            conn.execute(
                "UPDATE staging SET orig_key = ?2, orig_etag = ?3 WHERE ino = ?1",
                params![ino, key, etag],
            )?;
            Ok(())
        })
    }

    /// The staging bookkeeping of `ino`, if any.
    pub fn load_staging(&self, ino: u64) -> MetaResult<Option<StagingRecord>> {
        self.db.read(|conn| {
        Ok(conn
            .query_row(
                "SELECT orig_key, orig_etag, orig_len, block_size, present FROM staging WHERE ino = ?1",
                [ino],
                |r| {
                    Ok(StagingRecord {
                        orig_key: r.get(0)?,
                        orig_etag: r.get(1)?,
                        orig_len: r.get::<_, i64>(2)? as u64,
                        block_size: r.get::<_, i64>(3)? as u64,
                        present: r.get(4)?,
                    })
                },
            )
            .optional()?)
        })
    }

    /// Drops the staging bookkeeping of `ino`.
    pub fn delete_staging(&self, ino: u64) -> MetaResult<()> {
        self.db.write(|conn| {
            conn.execute("DELETE FROM staging WHERE ino = ?1", [ino])?;
            Ok(())
        })
    }
}

fn listed_dir(parent: u64, name: &str, d: &EntryDefaults, now: i64) -> Inode {
    let at = Timestamp {
        sec: now.div_euclid(1_000_000_000),
        nsec: now.rem_euclid(1_000_000_000) as u32,
    };
    Inode::new_entry(Some(parent), name, Kind::Dir, d, at, now)
}

fn get_row(conn: &Connection, ino: u64) -> MetaResult<Inode> {
    let mut stmt = conn.prepare_cached(&format!("SELECT {COLUMNS} FROM inodes WHERE ino = ?1"))?;
    Ok(stmt.query_row([ino], from_row)?)
}

fn child_row(conn: &Connection, parent: u64, name: &str) -> MetaResult<Option<Inode>> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM inodes WHERE parent = ?1 AND name = ?2"
    ))?;
    Ok(stmt.query_row(params![parent, name], from_row).optional()?)
}

/// Whether anything below directory `dir` has local changes not yet in the bucket.
fn holds_local_changes(conn: &Connection, dir: u64) -> MetaResult<bool> {
    let mut stmt = conn.prepare_cached(
        "WITH RECURSIVE below(ino) AS (
             SELECT ino FROM inodes WHERE parent = ?1
             UNION ALL
             SELECT i.ino FROM inodes i JOIN below b ON i.parent = b.ino
         )
         SELECT EXISTS (SELECT 1 FROM inodes WHERE dirty = 1 AND ino IN below)",
    )?;
    Ok(stmt.query_row([dir], |r| r.get(0))?)
}

fn detach(conn: &Connection, ino: u64) -> MetaResult<()> {
    conn.execute(
        "UPDATE inodes SET parent = NULL, name = '#' || ino WHERE ino = ?1",
        [ino],
    )?;
    Ok(())
}

/// Moves the clock of directory `dir_row` forward if `changes` changed its entries and its
/// clock may have been shown ([`DirState::clock_shown`]).
fn tell_changes(
    conn: &Connection,
    dir_row: &mut Inode,
    changes: &mut Changes,
    state: &dyn DirState,
    now: Timestamp,
) -> MetaResult<()> {
    if changes.entries_changed() && state.clock_shown(dir_row.mtime) {
        dir_row.advance_clock(now);
        changes.clock_moved = true;
        update_row(conn, dir_row)?;
    }
    Ok(())
}

/// What the applied pages of an incomplete listing changed, with the directory's clock moved
/// for it ([`InodeTable::abandon_listing`]).
fn settle_abandoned(
    conn: &Connection,
    applying: ListingApply,
    state: &dyn DirState,
) -> MetaResult<Changes> {
    let mut changes = applying.changes;
    let mut dir_row = get_row(conn, applying.dir)?;
    tell_changes(conn, &mut dir_row, &mut changes, state, Timestamp::now())?;
    Ok(changes)
}

/// Writes `r`, as a new row (which gives it its inode number) if `new`: one write per
/// entry a listing reconciles, even where it describes the entry for the first time.
fn store_row(conn: &Connection, r: &mut Inode, new: bool) -> MetaResult<()> {
    if new {
        r.ino = insert_row(conn, None, r)?;
        Ok(())
    } else {
        update_row(conn, r)
    }
}

fn insert_row(conn: &Connection, ino: Option<u64>, i: &Inode) -> MetaResult<u64> {
    let sql = format!(
        "INSERT INTO inodes ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, \
         ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21, ?22, ?23)"
    );
    write_row(conn, &sql, ino, i)?;
    Ok(conn.last_insert_rowid() as u64)
}

fn save_staging_row(conn: &Connection, ino: u64, rec: &StagingRecord) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT OR REPLACE INTO staging (ino, orig_key, orig_etag, orig_len, block_size, present)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![
            ino,
            rec.orig_key,
            rec.orig_etag,
            rec.orig_len as i64,
            rec.block_size as i64,
            rec.present
        ],
    )?;
    Ok(())
}

fn update_row(conn: &Connection, i: &Inode) -> MetaResult<()> {
    const SQL: &str = "UPDATE inodes SET parent = ?2, name = ?3, kind = ?4, perm = ?5, uid = ?6,
             gid = ?7, size = ?8, rdev = ?9, atime_s = ?10, atime_ns = ?11, mtime_s = ?12,
             mtime_ns = ?13, ctime_s = ?14, ctime_ns = ?15, etag = ?16, headers_known = ?17,
             symlink_target = ?18, xattrs = ?19, dirty = ?20, validated_at = ?21, listed_at = ?22,
             last_modified = ?23
         WHERE ino = ?1";
    write_row(conn, SQL, Some(i.ino), i)
}

/// Runs `sql` with the row's values bound in [`COLUMNS`] order, `ino` first.
fn write_row(conn: &Connection, sql: &str, ino: Option<u64>, i: &Inode) -> MetaResult<()> {
    let mut stmt = conn.prepare_cached(sql)?;
    stmt.execute(params![
        ino,
        i.parent,
        i.name,
        i.kind.type_bits(),
        i.perm,
        i.uid,
        i.gid,
        i.size as i64,
        i.rdev,
        i.atime.sec,
        i.atime.nsec,
        i.mtime.sec,
        i.mtime.nsec,
        i.ctime.sec,
        i.ctime.nsec,
        i.etag,
        i.headers_known,
        i.symlink_target,
        encode_xattrs(&i.xattrs),
        i.dirty,
        i.validated_at,
        i.listed_at,
        i.last_modified,
    ])?;
    Ok(())
}

/// Drops rows that no kernel can hold after a restart: unlinked rows and everything below
/// them. Their staged data goes too: an unlinked file is never uploaded.
fn purge_unreachable(conn: &Connection) -> MetaResult<()> {
    conn.execute_batch(
        "DELETE FROM inodes WHERE ino IN (
             WITH RECURSIVE reachable(ino) AS (
                 SELECT 1
                 UNION ALL
                 SELECT i.ino FROM inodes i JOIN reachable r ON i.parent = r.ino
             )
             SELECT ino FROM inodes WHERE ino NOT IN (SELECT ino FROM reachable)
         );
         DELETE FROM staging WHERE ino NOT IN (SELECT ino FROM inodes);",
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::{ObjectMeta, now_ns};
    use crate::store::UserMetadata;

    const DEFAULTS: EntryDefaults = EntryDefaults::FOR_TESTS;

    fn root() -> Inode {
        let mut r = listed_dir(0, "", &DEFAULTS, now_ns());
        r.headers_known = true;
        r
    }

    /// A version last modified at `lm` (whole seconds).
    fn version(etag: &str, lm: i64) -> ObjectVersion {
        ObjectVersion {
            etag: etag.into(),
            size: 3,
            last_modified: lm * 1000,
        }
    }

    /// A listed file whose s3fs headers were read with the listing.
    fn file(name: &str, etag: &str) -> ListedFile {
        file_at(name, etag, 100)
    }

    fn file_at(name: &str, etag: &str, lm: i64) -> ListedFile {
        let mut meta = UserMetadata::new();
        meta.insert("mode".into(), (libc::S_IFREG | 0o600).to_string());
        meta.insert("uid".into(), "33".into());
        ListedFile {
            name: name.into(),
            version: version(etag, lm),
            headers: Headers::Read(ObjectMeta::new(version(etag, lm), &meta)),
        }
    }

    fn dir(name: &str) -> ListedDir {
        ListedDir {
            name: name.into(),
            marker: Headers::Gone,
        }
    }

    fn listing(files: Vec<ListedFile>, dirs: Vec<ListedDir>) -> Listing {
        Listing {
            files,
            dirs,
            marker: None,
            started_at: now_ns(),
        }
    }

    struct BusyWith(Busy);

    impl DirState for BusyWith {
        fn busy(&self) -> Busy {
            self.0.clone()
        }
        fn clock_shown(&self, _: Timestamp) -> bool {
            true
        }
    }

    fn apply(t: &InodeTable, l: &Listing) -> Changes {
        t.apply_listing(ROOT_INO, l, &DEFAULTS, &Quiet).unwrap()
    }

    fn new_file(parent: u64, name: &str, validated_at: i64) -> Inode {
        let mut row = listed_dir(parent, name, &DEFAULTS, validated_at);
        row.kind = Kind::File;
        row.describe_listed_file(&version("\"e\"", 100), &DEFAULTS);
        row
    }

    #[test]
    fn fewer_children_counts_only_as_far_as_it_must() {
        let t = InodeTable::open_in_memory(&root()).unwrap();
        apply(
            &t,
            &listing(
                vec![file("a", "e1"), file("b", "e2"), file("c", "e3")],
                vec![],
            ),
        );
        assert!(!t.has_fewer_children(ROOT_INO, 3).unwrap());
        assert!(t.has_fewer_children(ROOT_INO, 4).unwrap());
        assert!(!t.has_fewer_children(ROOT_INO, 1).unwrap());
    }

    #[test]
    fn subdirectories_are_counted_from_their_own_index() {
        assert_eq!(libc::S_IFDIR, 16384, "SUBDIR_COUNT names S_IFDIR literally");
        let t = InodeTable::open_in_memory(&root()).unwrap();
        apply(
            &t,
            &listing(
                vec![file("a", "e1"), file("b", "e2"), file("d1", "e3")],
                vec![dir("d1"), dir("d2")],
            ),
        );
        assert_eq!(t.subdir_count(ROOT_INO).unwrap(), 2);
        let d1 = t.child(ROOT_INO, "d1").unwrap().unwrap();
        assert_eq!(t.subdir_count(d1.ino).unwrap(), 0);
        let plan: String =
            t.db.read(|conn| {
                let sql = format!("EXPLAIN QUERY PLAN {SUBDIR_COUNT}");
                let mut stmt = conn.prepare(&sql)?;
                let rows = stmt.query_map([ROOT_INO], |r| r.get::<_, String>(3))?;
                Ok(rows.collect::<Result<Vec<_>, _>>()?.join("; "))
            })
            .unwrap();
        assert!(plan.contains("inodes_subdirs"), "plan: {plan}");
    }

    #[test]
    fn listing_inserts_updates_and_removes_entries() {
        let t = InodeTable::open_in_memory(&root()).unwrap();
        let mut l = listing(
            vec![file("a", "e1"), file("both", "e2")],
            vec![dir("both"), dir("d")],
        );
        apply(&t, &l);
        let kids = t.children(ROOT_INO).unwrap();
        let names: Vec<_> = kids.iter().map(|k| (k.name.as_str(), k.kind)).collect();
        assert_eq!(
            names,
            [("a", Kind::File), ("both", Kind::Dir), ("d", Kind::Dir)]
        );
        let a = t.child(ROOT_INO, "a").unwrap().unwrap();
        assert_eq!(
            (a.uid, a.perm, a.size),
            (33, 0o600, 3),
            "the headers, not a guess"
        );
        assert!(a.headers_known);

        l.files = vec![file("a", "e9")];
        l.dirs = vec![dir("d")];
        l.started_at = now_ns();
        apply(&t, &l);
        let a2 = t.child(ROOT_INO, "a").unwrap().unwrap();
        assert_eq!(a2.ino, a.ino, "inode numbers are stable");
        assert_eq!(a2.etag.as_deref(), Some("e9"));
        assert!(t.child(ROOT_INO, "both").unwrap().is_none());
        assert!(t.get(ROOT_INO).unwrap().unwrap().listed_at.is_some());
    }

    #[test]
    fn dirty_newer_and_busy_rows_survive_an_older_listing() {
        let t = InodeTable::open_in_memory(&root()).unwrap();
        let started = now_ns();
        let mut dirty = new_file(ROOT_INO, "dirty", started - 10);
        dirty.dirty = true;
        t.insert(&mut dirty).unwrap();
        let mut newer = new_file(ROOT_INO, "newer", started + 10);
        t.insert(&mut newer).unwrap();
        let mut stale = new_file(ROOT_INO, "stale", started - 10);
        t.insert(&mut stale).unwrap();
        let mut busy = new_file(ROOT_INO, "busy", started - 10);
        t.insert(&mut busy).unwrap();
        let mut l = listing(vec![file("ghost", "g")], vec![]);
        l.started_at = started;
        let busy_names = BusyWith(Busy::Names {
            names: ["busy".to_string(), "ghost".to_string()].into(),
            marker: false,
        });
        t.apply_listing(ROOT_INO, &l, &DEFAULTS, &busy_names)
            .unwrap();
        let names: Vec<_> = t
            .children(ROOT_INO)
            .unwrap()
            .into_iter()
            .map(|i| i.name)
            .collect();
        assert_eq!(
            names,
            ["busy", "dirty", "newer"],
            "a name being changed here is neither removed nor added by a listing"
        );
        let all = t
            .apply_listing(ROOT_INO, &l, &DEFAULTS, &BusyWith(Busy::All))
            .unwrap();
        assert_eq!(all, Changes::default());
        assert_eq!(
            t.children(ROOT_INO).unwrap().len(),
            3,
            "a moving directory is left alone"
        );
    }

    #[test]
    fn a_first_listing_is_no_news_and_keeps_the_clock() {
        let t = InodeTable::open_in_memory(&root()).unwrap();
        let before = t.get(ROOT_INO).unwrap().unwrap();
        let changes = apply(&t, &listing(vec![file("a", "e1")], vec![dir("d")]));
        assert_eq!(changes, Changes::default());
        let after = t.get(ROOT_INO).unwrap().unwrap();
        assert_eq!((after.mtime, after.ctime), (before.mtime, before.ctime));
        // Listed again, unchanged: the clock stays.
        let again = apply(&t, &listing(vec![file("a", "e1")], vec![dir("d")]));
        assert_eq!(again, Changes::default());
        assert_eq!(t.get(ROOT_INO).unwrap().unwrap().mtime, before.mtime);
    }

    /// Lists the root with `files` and returns what changed and the root's mtime.
    fn relist(t: &InodeTable, files: Vec<ListedFile>) -> (Changes, Timestamp) {
        let changes = apply(t, &listing(files, vec![]));
        (changes, t.get(ROOT_INO).unwrap().unwrap().mtime)
    }

    #[test]
    fn outside_changes_move_the_clock_a_whole_second_forward() {
        let t = InodeTable::open_in_memory(&root()).unwrap();
        let (_, t0) = relist(&t, vec![file("a", "e1")]);
        let steps: Vec<(&str, Vec<ListedFile>)> = vec![
            ("added", vec![file("a", "e1"), file("b", "e2")]),
            ("removed", vec![file("b", "e2")]),
            ("replaced", vec![file("b", "e3")]),
            ("copied onto itself", vec![file_at("b", "e3", 200)]),
        ];
        let mut last = t0;
        for (what, files) in steps {
            let (changes, mtime) = relist(&t, files);
            assert!(changes.clock_moved, "{what}");
            assert!(changes.entries_changed(), "{what}");
            assert!(mtime.sec > last.sec, "{what}: {mtime:?} after {last:?}");
            let root = t.get(ROOT_INO).unwrap().unwrap();
            assert!(root.ctime.sec > last.sec, "{what}: ctime too");
            last = mtime;
        }
        let (changes, mtime) = relist(&t, vec![file_at("b", "e3", 200)]);
        assert_eq!(changes, Changes::default());
        assert_eq!(mtime, last, "no change, no move");
        let b = t.child(ROOT_INO, "b").unwrap().unwrap();
        assert_eq!(b.last_modified, Some(200_000));
    }

    /// A directory whose clock nobody saw after it first moved.
    struct Unseen(std::cell::Cell<bool>);

    impl DirState for Unseen {
        fn busy(&self) -> Busy {
            Busy::Nothing
        }
        fn clock_shown(&self, _: Timestamp) -> bool {
            !self.0.replace(true)
        }
    }

    #[test]
    fn a_burst_of_changes_nobody_looked_between_moves_the_clock_once() {
        let t = InodeTable::open_in_memory(&root()).unwrap();
        let (_, t0) = relist(&t, vec![file("a", "e1")]);
        let unseen = Unseen(std::cell::Cell::new(false));
        for (i, etag) in ["e2", "e3", "e4", "e5"].iter().enumerate() {
            let l = listing(vec![file("a", etag)], vec![]);
            let changes = t.apply_listing(ROOT_INO, &l, &DEFAULTS, &unseen).unwrap();
            assert!(changes.entries_changed());
            assert_eq!(changes.clock_moved, i == 0);
        }
        let mtime = t.get(ROOT_INO).unwrap().unwrap().mtime;
        assert!(mtime.sec > t0.sec);
        assert!(
            mtime.sec <= Timestamp::now().sec + 1,
            "not one second ahead per change"
        );
    }

    #[test]
    fn a_listing_keeps_a_directory_holding_local_changes_and_gives_a_new_type_a_new_inode() {
        let t = InodeTable::open_in_memory(&root()).unwrap();
        apply(&t, &listing(vec![file("f", "e1")], vec![dir("d")]));
        let d = t.child(ROOT_INO, "d").unwrap().unwrap();
        let mut pending = new_file(d.ino, "new", now_ns());
        pending.dirty = true;
        t.insert(&mut pending).unwrap();
        let f = t.child(ROOT_INO, "f").unwrap().unwrap();
        let mut link = file("f", "e2");
        if let Headers::Read(m) = &mut link.headers {
            m.headers.mode = Some(libc::S_IFLNK | 0o777);
        }
        let changes = apply(&t, &listing(vec![link], vec![]));
        assert_eq!(
            t.child(ROOT_INO, "d").unwrap().map(|r| r.ino),
            Some(d.ino),
            "gone from the bucket, but its new file is not uploaded yet"
        );
        let f2 = t.child(ROOT_INO, "f").unwrap().unwrap();
        assert_eq!(f2.kind, Kind::Symlink);
        assert_ne!(f2.ino, f.ino, "a file turned symlink is another inode");
        assert_eq!(changes.replaced, [(f.ino, "f".to_string())]);
    }

    #[test]
    fn a_probe_moves_the_clock_for_a_name_the_last_listing_lacked() {
        let t = InodeTable::open_in_memory(&root()).unwrap();
        let v = version("\"p\"", 100);
        let headers = Headers::Unread;
        // Before any listing, finding a name is no news.
        let (row, changes) = t
            .apply_probe(
                ROOT_INO,
                "p",
                Found::File(&v, &headers),
                now_ns(),
                &DEFAULTS,
                &Quiet,
            )
            .unwrap();
        assert!(row.is_some());
        assert_eq!(changes, Changes::default());
        let (_, before) = relist(&t, vec![file("p", "\"p\"")]);
        let (_, changes) = t
            .apply_probe(
                ROOT_INO,
                "q",
                Found::File(&v, &headers),
                now_ns(),
                &DEFAULTS,
                &Quiet,
            )
            .unwrap();
        assert_eq!(changes.added, ["q"]);
        let after = t.get(ROOT_INO).unwrap().unwrap().mtime;
        assert!(after.sec > before.sec);
        let (row, changes) = t
            .apply_probe(ROOT_INO, "q", Found::Absent, now_ns(), &DEFAULTS, &Quiet)
            .unwrap();
        assert!(row.is_none());
        assert_eq!(changes.removed.len(), 1);
        assert!(t.get(ROOT_INO).unwrap().unwrap().mtime.sec > after.sec);
    }

    #[test]
    fn headers_read_once_are_kept_while_the_version_holds_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("meta.db");
        let ino = {
            let t = InodeTable::open(&db, &root()).unwrap();
            apply(&t, &listing(vec![file("a", "e1")], vec![]));
            t.child(ROOT_INO, "a").unwrap().unwrap().ino
        };
        let t = InodeTable::open(&db, &root()).unwrap();
        // The same version listed without its headers (a warm listing reads none).
        let unread = ListedFile {
            name: "a".into(),
            version: version("e1", 100),
            headers: Headers::Unread,
        };
        let changes = apply(&t, &listing(vec![unread.clone()], vec![]));
        assert_eq!(changes, Changes::default());
        let a = t.child(ROOT_INO, "a").unwrap().unwrap();
        assert_eq!(
            (a.ino, a.uid, a.perm, a.headers_known),
            (ino, 33, 0o600, true)
        );
        // Another version whose headers were not read: the listing's view, to be read.
        let newer = ListedFile {
            version: version("e2", 100),
            ..unread
        };
        apply(&t, &listing(vec![newer], vec![]));
        let a = t.child(ROOT_INO, "a").unwrap().unwrap();
        assert_eq!((a.uid, a.headers_known), (7, false));
    }

    #[test]
    fn a_remount_keeps_the_roots_times() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("meta.db");
        let first = {
            let t = InodeTable::open(&db, &root()).unwrap();
            apply(&t, &listing(vec![file("a", "e1")], vec![]));
            apply(&t, &listing(vec![], vec![]));
            t.get(ROOT_INO).unwrap().unwrap()
        };
        let mut other_options = root();
        other_options.perm = 0o700;
        other_options.mtime = Timestamp { sec: 1, nsec: 0 };
        let t = InodeTable::open(&db, &other_options).unwrap();
        let again = t.get(ROOT_INO).unwrap().unwrap();
        assert_eq!(again.perm, 0o700, "owner and mode: the options");
        assert_eq!((again.mtime, again.ctime), (first.mtime, first.ctime));
    }

    #[test]
    fn inode_numbers_are_never_reused_and_paths_resolve() {
        let t = InodeTable::open_in_memory(&root()).unwrap();
        let mut d = listed_dir(ROOT_INO, "d", &DEFAULTS, now_ns());
        t.insert(&mut d).unwrap();
        let mut f = new_file(d.ino, "f", now_ns());
        t.insert(&mut f).unwrap();
        assert_eq!(t.path(f.ino).unwrap().unwrap(), ["d", "f"]);
        t.unlink(f.ino).unwrap();
        assert_eq!(t.path(f.ino).unwrap(), None);
        t.forget(f.ino).unwrap();
        let mut g = new_file(d.ino, "f", now_ns());
        t.insert(&mut g).unwrap();
        assert!(g.ino > f.ino);
    }

    #[test]
    fn reopening_keeps_inodes_and_drops_unlinked_rows() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("meta.db");
        let (kept, dropped) = {
            let t = InodeTable::open(&db, &root()).unwrap();
            let mut a = new_file(ROOT_INO, "a", now_ns());
            t.insert(&mut a).unwrap();
            let mut b = new_file(ROOT_INO, "b", now_ns());
            t.insert(&mut b).unwrap();
            t.unlink(b.ino).unwrap();
            (a.ino, b.ino)
        };
        let t = InodeTable::open(&db, &root()).unwrap();
        assert_eq!(t.child(ROOT_INO, "a").unwrap().unwrap().ino, kept);
        assert!(t.get(dropped).unwrap().is_none());
    }
}
