//! The inode database's connections: one writer, a pool of readers, and where each runs.
//!
//! SQLite in WAL mode lets readers go on while the writer commits, so the table keeps one
//! writing connection behind a lock and read-only connections beside it: a `lookup` or a
//! `stat` never waits for a listing's page, a moved folder's rows or a durable commit (with a
//! single connection they did, on the same tokio workers that drive the S3 requests).
//!
//! Where the work runs:
//! - a long write (a listing's page, a moved folder's rows, a `synchronous = FULL` commit:
//!   milliseconds) and a scan (every dirty inode, recorded uploads and renames) run through
//!   [`off_worker`], so the async worker's other tasks move to another thread meanwhile;
//! - a short write (a few rows: tens of microseconds, a WAL append) runs where it is called
//!   when the writer is free, and off the worker when it would wait for the writer. Handing
//!   every write off cost more than it saved: with both cores busy (a 1 GiB `cp` into the
//!   mount and Garage taking it in) each hand-off waits for the new worker thread to be
//!   scheduled, and 4 KiB saves meanwhile went from 21 to 16 a second (close p50 30 → 47 ms,
//!   five runs each);
//! - a point read (one row by key: a few microseconds from pages the OS has cached), and the
//!   rows of one directory, run where they are called: a hand-off costs about 10 µs on an idle
//!   machine and much more on a busy one, and handing off every `readdir` and directory
//!   `stat` halved the saves another user got done while a folder move and a 1 GiB upload ran
//!   (20 and 16 % of the idle rate with inline reads, 9 and 10 % with hand-offs, two runs
//!   each). Callers that may read a large directory (a listing's refresh) hand it off.
//!
//! An in-memory database (unit tests) is private to its connection: there the writer serves
//! reads too.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, TryLockError};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};
use tracing::warn;

use super::{MetaResult, schema};
use crate::blocking::off_worker;

/// Read-only connections kept open between reads. Reads are short, so the number in use at
/// once stays near the number of threads that read (2 tokio workers and a few blocking
/// threads on the test machine); a read that finds none idle opens another (about 0.1 ms).
const IDLE_READERS: usize = 8;

/// How long a statement waits for a lock another connection holds (a checkpoint's, or the
/// writer's of another process that opened the same cache directory) before it fails.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// Writes between two checkpoints of the log into the database file. SQLite's own
/// (`wal_autocheckpoint`, every 1,000 pages) would run inside whichever commit crosses the
/// mark — for a short write, on the async worker — and a checkpoint syncs the database file.
/// A save writes a few rows in 3-6 commits of a page or two each, so 250 writes move about
/// as much as SQLite's default.
const WRITES_PER_CHECKPOINT: u64 = 250;

/// The connections of one inode database.
#[derive(Debug)]
pub(super) struct Connections {
    writer: Mutex<Connection>,
    /// `None` for an in-memory database.
    readers: Option<Readers>,
    /// Writes so far, for [`WRITES_PER_CHECKPOINT`].
    writes: AtomicU64,
}

#[derive(Debug)]
struct Readers {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
}

impl Connections {
    /// Opens (creating if needed) the database at `path` and brings its schema up to date.
    pub(super) fn open(path: &Path) -> MetaResult<Self> {
        let writer = Connection::open(path)?;
        schema::prepare(&writer)?;
        // Checkpoints are run by `after_write`, off the async worker.
        writer.pragma_update(None, "wal_autocheckpoint", 0)?;
        Ok(Connections {
            writer: Mutex::new(writer),
            readers: Some(Readers {
                path: path.to_path_buf(),
                idle: Mutex::new(Vec::new()),
            }),
            writes: AtomicU64::new(0),
        })
    }

    /// A new in-memory database.
    pub(super) fn in_memory() -> MetaResult<Self> {
        let writer = Connection::open_in_memory()?;
        schema::prepare(&writer)?;
        Ok(Connections {
            writer: Mutex::new(writer),
            readers: None,
            writes: AtomicU64::new(0),
        })
    }

    /// Runs `work`, a write of a few rows, on the writing connection: where it is called if
    /// the writer is free, else off the async worker, where it waits for the writer.
    pub(super) fn write<T>(
        &self,
        work: impl FnOnce(&mut Connection) -> MetaResult<T>,
    ) -> MetaResult<T> {
        let result = match self.writer.try_lock() {
            Ok(mut writer) => work(&mut writer),
            Err(TryLockError::WouldBlock) => off_worker(|| work(&mut self.writer.lock().unwrap())),
            Err(TryLockError::Poisoned(e)) => panic!("the inode table's writer panicked: {e}"),
        };
        self.after_write();
        result
    }

    /// Runs `work`, a write of many rows or a durable commit, on the writing connection, off
    /// the async worker.
    pub(super) fn write_long<T>(
        &self,
        work: impl FnOnce(&mut Connection) -> MetaResult<T>,
    ) -> MetaResult<T> {
        let result = off_worker(|| work(&mut self.writer.lock().unwrap()));
        self.after_write();
        result
    }

    /// Every [`WRITES_PER_CHECKPOINT`] writes, copies the log into the database file, off
    /// the async worker. Passive: it never waits for readers, and what it cannot copy yet
    /// goes at the next one.
    fn after_write(&self) {
        let n = self.writes.fetch_add(1, Ordering::Relaxed) + 1;
        if self.readers.is_none() || !n.is_multiple_of(WRITES_PER_CHECKPOINT) {
            return;
        }
        off_worker(|| {
            let writer = self.writer.lock().unwrap();
            if let Err(e) = writer.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
                warn!("could not checkpoint the inode database's log: {e}");
            }
        });
    }

    /// Runs `work`, a read of a few rows by key, on a reading connection, where it is called.
    pub(super) fn read<T>(&self, work: impl FnOnce(&Connection) -> MetaResult<T>) -> MetaResult<T> {
        match &self.readers {
            Some(readers) => readers.with(work),
            None => work(&self.writer.lock().unwrap()),
        }
    }

    /// Runs `work`, a read of many rows, on a reading connection, off the async worker.
    pub(super) fn scan<T>(&self, work: impl FnOnce(&Connection) -> MetaResult<T>) -> MetaResult<T> {
        off_worker(|| self.read(work))
    }
}

impl Readers {
    fn with<T>(&self, work: impl FnOnce(&Connection) -> MetaResult<T>) -> MetaResult<T> {
        let taken = self.idle.lock().unwrap().pop();
        let conn = match taken {
            Some(conn) => conn,
            None => self.open()?,
        };
        let result = work(&conn);
        let mut idle = self.idle.lock().unwrap();
        if idle.len() < IDLE_READERS {
            idle.push(conn);
        }
        result
    }

    fn open(&self) -> MetaResult<Connection> {
        let conn = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        Ok(conn)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use super::*;

    fn count(db: &Connections) -> i64 {
        db.read(|c| Ok(c.query_row("SELECT COUNT(*) FROM t", [], |r| r.get(0))?))
            .unwrap()
    }

    #[test]
    fn reads_go_on_while_the_writer_is_in_a_transaction_and_see_what_it_committed() {
        let dir = tempfile::tempdir().unwrap();
        let db = Connections::open(&dir.path().join("inodes.db")).unwrap();
        db.write(|c| Ok(c.execute_batch("CREATE TABLE t (x INTEGER)")?))
            .unwrap();
        let (inside, writer_inside) = mpsc::channel();
        let (finish, may_finish) = mpsc::channel::<()>();
        std::thread::scope(|s| {
            let db = &db;
            let writer = s.spawn(move || {
                db.write(|c| {
                    let tx = c.transaction()?;
                    tx.execute("INSERT INTO t VALUES (1)", [])?;
                    inside.send(()).unwrap();
                    may_finish.recv().unwrap();
                    Ok(tx.commit()?)
                })
            });
            writer_inside.recv().unwrap();
            // The writer holds its lock and an open transaction: a read neither waits for it
            // nor sees the uncommitted row.
            assert_eq!(count(db), 0);
            finish.send(()).unwrap();
            writer.join().unwrap().unwrap();
        });
        assert_eq!(count(&db), 1);
        assert_eq!(
            db.scan(|c| Ok(c.query_row("SELECT x FROM t", [], |r| r.get::<_, i64>(0))?))
                .unwrap(),
            1
        );
    }

    #[test]
    fn the_log_is_checkpointed_into_the_database_file_every_few_hundred_writes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("inodes.db");
        let db = Connections::open(&path).unwrap();
        db.write(|c| Ok(c.execute_batch("CREATE TABLE t (x BLOB)")?))
            .unwrap();
        let before = std::fs::metadata(&path).unwrap().len();
        for _ in 0..2 * WRITES_PER_CHECKPOINT {
            db.write(|c| Ok(c.execute("INSERT INTO t VALUES (zeroblob(1024))", [])?))
                .unwrap();
        }
        // 500 KiB went in: without a checkpoint all of it would still be in the log.
        let after = std::fs::metadata(&path).unwrap().len();
        assert!(after >= before + 250 * 1024, "{before} -> {after} bytes");
    }

    #[test]
    fn a_reading_connection_cannot_write() {
        let dir = tempfile::tempdir().unwrap();
        let db = Connections::open(&dir.path().join("inodes.db")).unwrap();
        db.write(|c| Ok(c.execute_batch("CREATE TABLE t (x INTEGER)")?))
            .unwrap();
        let wrote = db.read(|c| Ok(c.execute("INSERT INTO t VALUES (1)", [])?));
        assert!(wrote.is_err(), "a reader wrote: {wrote:?}");
        assert_eq!(count(&db), 0);
    }
}
