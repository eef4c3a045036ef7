//! Tables, pragmas and migrations of the inode database.

use rusqlite::Connection;

use super::{MetaError, MetaResult};

/// Schema version written by this build (`PRAGMA user_version`).
const VERSION: i64 = 4;

/// Sets the connection up and brings the schema to [`VERSION`].
///
/// WAL lets readers proceed while the writer commits; `synchronous = NORMAL` in WAL mode loses
/// at most the last transactions on power loss, never consistency, and the inode table can
/// always be rebuilt from the bucket. Dirty-data bookkeeping that must survive a crash is
/// committed with `synchronous = FULL` by its caller.
pub(super) fn prepare(conn: &Connection) -> MetaResult<()> {
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "foreign_keys", "OFF")?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if version > VERSION {
        return Err(MetaError::NewerSchema(version));
    }
    if version < 1 {
        conn.execute_batch(
            "BEGIN;
             CREATE TABLE inodes (
                 ino            INTEGER PRIMARY KEY AUTOINCREMENT,
                 parent         INTEGER,          -- NULL once unlinked
                 name           TEXT NOT NULL,
                 kind           INTEGER NOT NULL, -- S_IFMT bits
                 perm           INTEGER NOT NULL,
                 uid            INTEGER NOT NULL,
                 gid            INTEGER NOT NULL,
                 size           INTEGER NOT NULL,
                 rdev           INTEGER NOT NULL DEFAULT 0,
                 atime_s        INTEGER NOT NULL,
                 atime_ns       INTEGER NOT NULL,
                 mtime_s        INTEGER NOT NULL,
                 mtime_ns       INTEGER NOT NULL,
                 ctime_s        INTEGER NOT NULL,
                 ctime_ns       INTEGER NOT NULL,
                 etag           TEXT,
                 headers_known  INTEGER NOT NULL,
                 symlink_target TEXT,
                 xattrs         TEXT,             -- JSON: name -> base64 value
                 dirty          INTEGER NOT NULL DEFAULT 0,
                 validated_at   INTEGER NOT NULL,
                 listed_at      INTEGER
             );
             CREATE UNIQUE INDEX inodes_by_name ON inodes(parent, name);
             CREATE TABLE staging (
                 ino        INTEGER PRIMARY KEY,
                 orig_key   TEXT,
                 orig_etag  TEXT,
                 orig_len   INTEGER NOT NULL,
                 block_size INTEGER NOT NULL,
                 present    BLOB NOT NULL
             );
             PRAGMA user_version = 1;
             COMMIT;",
        )?;
    }
    if version < 2 {
        // Multipart uploads in flight, so that those a crash interrupts are aborted by the
        // next mount instead of holding storage in the bucket forever.
        conn.execute_batch(
            "BEGIN;
             CREATE TABLE multipart_uploads (
                 upload_id TEXT PRIMARY KEY,
                 key       TEXT NOT NULL
             );
             PRAGMA user_version = 2;
             COMMIT;",
        )?;
    }
    if version < 3 {
        // Directory renames in progress (copy every object, then delete the old ones), so
        // that one a crash interrupts is completed by the next mount.
        conn.execute_batch(
            "BEGIN;
             CREATE TABLE dir_renames (
                 id         INTEGER PRIMARY KEY,
                 src_ino    INTEGER NOT NULL,
                 new_parent INTEGER NOT NULL,
                 new_name   TEXT NOT NULL,
                 old_prefix TEXT NOT NULL,
                 new_prefix TEXT NOT NULL
             );
             PRAGMA user_version = 3;
             COMMIT;",
        )?;
    }
    if version < 4 {
        // The Last-Modified (milliseconds) of the object version a row shows: with the
        // ETag and size it names the version, so headers read once are not read again
        // while it holds, and a CopyObject onto the same key (same ETag) is seen as new.
        conn.execute_batch(
            "BEGIN;
             ALTER TABLE inodes ADD COLUMN last_modified INTEGER;
             PRAGMA user_version = 4;
             COMMIT;",
        )?;
    }
    // The subdirectories of each directory, for its link count (`2 + subdirectories`),
    // which every `stat` of a directory shows: without it the count read every child's row
    // (kind is not in `inodes_by_name`): 13 ms for a 100,000-file folder on this machine,
    // on every `stat` of it, against 0.01 ms with this index. Only directories are in it, so
    // writing a file's row costs nothing more. An index, not a schema change: an older
    // s3bridge opening this database keeps it up to date without knowing of it, so it does
    // not raise the version (which would lock older builds out of their pending uploads).
    conn.execute_batch(&format!(
        "CREATE INDEX IF NOT EXISTS inodes_subdirs ON inodes(parent) WHERE kind = {dir};",
        dir = libc::S_IFDIR
    ))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn has_subdir_index(conn: &Connection) -> bool {
        conn.query_row(
            "SELECT COUNT(*) FROM sqlite_master WHERE type = 'index' AND name = 'inodes_subdirs'",
            [],
            |r| r.get::<_, i64>(0),
        )
        .unwrap()
            == 1
    }

    #[test]
    fn a_database_of_an_earlier_build_gains_the_subdirectory_index_at_its_version() {
        let conn = Connection::open_in_memory().unwrap();
        prepare(&conn).unwrap();
        assert!(has_subdir_index(&conn));
        // As a database written before the index existed.
        conn.execute_batch("DROP INDEX inodes_subdirs").unwrap();
        prepare(&conn).unwrap();
        assert!(has_subdir_index(&conn));
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, VERSION);
    }
}
