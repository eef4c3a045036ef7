//! Blocking work started from async code.
//!
//! The tokio workers drive every S3 request of the mount. A stretch of synchronous work on one
//! of them (an SQLite write, a listing's page, a disk flush) would hold up the other tasks
//! queued on that worker — other users' requests — for as long as it runs.

/// Runs `work`, synchronous work that may take long enough to matter (an SQLite commit: tens
/// of microseconds, a page of 1,000 listed entries or a moved folder's rows: milliseconds to a
/// few hundred, a disk flush: up to seconds on a busy disk), so that the tasks queued on this
/// worker move to another thread meanwhile rather than wait behind it (a save waited out a
/// whole 2,000-file folder move that way).
///
/// The hand-off (`block_in_place`) costs about 10 µs when the machine has a core to spare
/// (measured on the 2-core test machine: 11 µs per call with other tasks queued, against
/// 0.4 µs for a plain yield), and much more when both cores are busy: the new worker thread
/// must wait to be scheduled (handing off every SQL write and every `readdir` halved the saves
/// of one user while others moved and uploaded). Work shorter than a few hundred
/// microseconds — one row by key, a small directory's rows — is better run where it is
/// called. On a
/// thread that is not a worker (a blocking-pool thread, the FUSE loop, a single-threaded
/// runtime in unit tests) it just runs.
pub fn off_worker<T>(work: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(work),
        _ => work(),
    }
}
