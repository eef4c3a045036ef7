//! Background uploads: files whose upload failed (or that a previous run left with data not
//! yet in the bucket) are retried with exponential backoff until they succeed.
//!
//! In the default (sync) mode a failed upload is an error from `close()`/`fsync()`, and the
//! data stays staged on local disk; this module is what eventually gets it into the bucket,
//! in this run or the next one.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, Weak};

use futures::StreamExt;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::files::{FileState, OpenFile, Phase};
use super::{Fs, FsResult};
use crate::cache::staging::Staging;
use crate::meta::StagingRecord;

/// How often the retry loop looks for due uploads.
const RETRY_TICK: Duration = Duration::from_secs(1);
/// Longest wait between two attempts for one file.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(60);

impl Fs {
    /// Loads the files a previous run left with data not yet uploaded, so they are served
    /// with their newest contents and uploaded in the background. Returns how many.
    pub fn recover_pending(&self) -> FsResult<usize> {
        let mut recovered = 0;
        for ino in self.meta.dirty_inodes()? {
            let Some(inode) = self.meta.get(ino)? else {
                continue;
            };
            let record = match self.meta.load_staging(ino)? {
                Some(r) => r,
                // Created and never flushed: all of its contents are local.
                None if inode.etag.is_none() => StagingRecord {
                    orig_key: None,
                    orig_etag: None,
                    orig_len: 0,
                    block_size: crate::cache::staging::BLOCK_SIZE,
                    present: Vec::new(),
                },
                None => {
                    // Written but never flushed: nothing was acknowledged; the object stands.
                    let mut clean = inode.clone();
                    clean.dirty = false;
                    self.meta.save(&clean)?;
                    continue;
                }
            };
            let staging = match Staging::reopen(&self.staging_dir, ino, &record, inode.size) {
                Ok(s) => s,
                Err(e) => {
                    warn!(
                        ino,
                        "staged data of a previous run is unreadable, dropped: {e}"
                    );
                    let mut clean = inode.clone();
                    clean.dirty = false;
                    self.meta.save(&clean)?;
                    continue;
                }
            };
            let remote = self.dirs.original_of(&inode)?;
            let file = Arc::new(OpenFile::new(
                inode,
                FileState {
                    staging: Some(staging),
                    // Its only copy: uploaded before anything changes it.
                    phase: Phase::Journaled,
                    remote,
                    retry_at: Some(Instant::now()),
                    retry_delay: Duration::from_secs(1),
                    ..Default::default()
                },
            ));
            self.open.insert(file);
            recovered += 1;
        }
        if recovered > 0 {
            info!(
                recovered,
                "found files with data not yet uploaded; uploading them"
            );
        }
        self.remove_stray_staging();
        Ok(recovered)
    }

    /// Deletes staging files no recovered file owns: those of files unlinked, or uploaded,
    /// just before a crash (their rows are gone or clean). Nothing else is open at start.
    fn remove_stray_staging(&self) {
        let Ok(entries) = std::fs::read_dir(&self.staging_dir) else {
            return;
        };
        let owned: std::collections::HashSet<u64> =
            self.open.files().iter().map(|f| f.ino()).collect();
        for entry in entries.flatten() {
            let name = entry.file_name();
            let ino = name
                .to_str()
                .and_then(|n| n.strip_suffix(".data"))
                .and_then(|n| n.parse::<u64>().ok());
            if ino.is_none_or(|ino| !owned.contains(&ino)) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }

    /// Runs the background uploader until the filesystem is dropped: first aborts the
    /// multipart uploads a previous run left behind, then uploads files as they come due
    /// (queued by a write-back close, or waiting for a retry), woken by the queue, when the
    /// next file comes due, or at the latest every second.
    pub async fn run_background(fs: Weak<Fs>) {
        let Some(due) = fs.upgrade().map(|me| {
            me.dirs.start_background();
            me.uploader.due.clone()
        }) else {
            return;
        };
        if let Some(fs) = fs.upgrade() {
            fs.abort_leftover_uploads().await;
        }
        loop {
            let next = match fs.upgrade() {
                Some(fs) => fs.start_due_uploads().await,
                None => return,
            };
            let now = Instant::now();
            let wait = next.map_or(RETRY_TICK, |t| t.saturating_duration_since(now));
            tokio::select! {
                _ = due.notified() => {}
                _ = tokio::time::sleep(wait.min(RETRY_TICK)) => {}
            }
        }
    }

    /// Aborts the multipart uploads a crash of a previous run interrupted (their files, still
    /// staged, go up again whole). Returns how many were aborted.
    pub async fn abort_leftover_uploads(&self) -> usize {
        let leftover = std::mem::take(&mut *self.uploader.leftover.lock().unwrap());
        super::tracked::abort_leftover_uploads(&self.store, leftover).await
    }

    /// Starts an upload task for every file that is due and not being uploaded, each taking
    /// one of the `--background-uploads` slots. A file someone is changing (a write, its
    /// upload at close) is looked at again on the next round rather than waited for.
    /// Returns when the next file not yet due will be.
    async fn start_due_uploads(self: &Arc<Self>) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        for file in self.pending_files() {
            if file.changes.try_lock().is_err() {
                continue;
            }
            {
                let Ok(st) = file.state.try_lock() else {
                    continue;
                };
                let Some(at) = st
                    .retry_at
                    .filter(|_| st.phase.has_changes() && st.opens == 0)
                else {
                    continue;
                };
                if at > Instant::now() {
                    next = Some(next.map_or(at, |n| n.min(at)));
                    continue;
                }
            }
            let Some(claim) = self.uploader.claim(file.ino()) else {
                continue;
            };
            let Ok(slot) = self.uploader.slots.clone().acquire_owned().await else {
                return next;
            };
            let fs = self.clone();
            tokio::spawn(async move {
                fs.upload_in_background(&file).await;
                drop((claim, slot));
            });
        }
        next
    }

    /// Files with data not in the bucket, or possibly so (the open-file table).
    fn pending_files(&self) -> Vec<Arc<OpenFile>> {
        self.open.files()
    }

    /// Uploads one file; on success a file nobody holds is retired, on failure its next
    /// attempt is scheduled with exponential backoff. Returns whether it is in the bucket.
    async fn upload_in_background(&self, file: &Arc<OpenFile>) -> bool {
        let result = self.sync_file(file).await;
        let mut st = file.state.lock().await;
        match result {
            Ok(()) => {
                if st.opens == 0 && matches!(st.phase, Phase::Clean | Phase::Unlinked) {
                    self.retire(file, &mut st);
                }
                true
            }
            Err(e) => {
                st.retry_delay =
                    (st.retry_delay * 2).clamp(Duration::from_secs(1), MAX_RETRY_DELAY);
                st.retry_at = Some(Instant::now() + st.retry_delay);
                warn!(
                    ino = file.ino(),
                    "upload failed, next attempt in {:?}: {e}", st.retry_delay
                );
                false
            }
        }
    }

    /// Uploads every pending file now, whatever its backoff, `--background-uploads` at a
    /// time (unmount, `s3bridge flush`). Returns how many files still have data that is not
    /// in the bucket.
    pub async fn flush_all(&self) -> usize {
        // Those free to look at first; a busy one (a write or an upload holds it) may have
        // data pending too, and comes last rather than holding up the others.
        let (mut dirty, mut busy) = (Vec::new(), Vec::new());
        for file in self.pending_files() {
            if file.changes.try_lock().is_err() {
                busy.push(file);
                continue;
            }
            match file.state.try_lock() {
                Ok(st) if st.phase.has_changes() => dirty.push(file.clone()),
                Ok(_) => {}
                Err(_) => busy.push(file.clone()),
            }
        }
        dirty.append(&mut busy);
        let uploaded: Vec<bool> = futures::stream::iter(dirty)
            .map(|file| async move { self.upload_in_background(&file).await })
            .buffer_unordered(self.cfg.background_uploads.max(1))
            .collect()
            .await;
        uploaded.into_iter().filter(|ok| !ok).count()
    }

    /// Files and bytes whose upload is pending. Read from the live attributes, which need
    /// no wait for any lock.
    pub fn pending_uploads(&self) -> (usize, u64) {
        self.pending_files()
            .iter()
            .map(|f| f.attrs())
            .filter(|a| a.dirty && a.parent.is_some())
            .fold((0, 0), |(files, bytes), a| (files + 1, bytes + a.size))
    }
}

/// What the background uploader owns: its wake-up, its slots, the files it has upload
/// tasks for, and the multipart uploads a previous run left behind.
#[derive(Debug)]
pub(super) struct UploadQueue {
    /// Wakes the uploader (a write-back close queued a file).
    due: Arc<tokio::sync::Notify>,
    /// Files it may upload at once (`--background-uploads`).
    slots: Arc<tokio::sync::Semaphore>,
    /// How many slots there are.
    size: usize,
    /// Inodes it has an upload task for.
    claimed: Arc<Mutex<HashSet<u64>>>,
    /// Multipart uploads a previous run left in flight (key, upload id), aborted first.
    leftover: Mutex<Vec<(String, String)>>,
}

impl UploadQueue {
    /// A queue of `slots` uploads at once (at least one), which starts by aborting
    /// `leftover`.
    pub(super) fn new(slots: usize, leftover: Vec<(String, String)>) -> UploadQueue {
        let size = slots.max(1);
        UploadQueue {
            due: Arc::new(tokio::sync::Notify::new()),
            slots: Arc::new(tokio::sync::Semaphore::new(size)),
            size,
            claimed: Arc::default(),
            leftover: Mutex::new(leftover),
        }
    }

    /// Tells the uploader a file is due.
    pub(super) fn wake(&self) {
        self.due.notify_one();
    }

    /// Upload tasks running now.
    pub(super) fn in_flight(&self) -> usize {
        self.size.saturating_sub(self.slots.available_permits())
    }

    /// Claims `ino` for an upload task, or `None` if one has it already.
    fn claim(&self, ino: u64) -> Option<UploadClaim> {
        self.claimed
            .lock()
            .unwrap()
            .insert(ino)
            .then(|| UploadClaim {
                claimed: self.claimed.clone(),
                ino,
            })
    }
}

/// The uploader's claim on one file: while it lives, no second upload task of the file is
/// started.
struct UploadClaim {
    claimed: Arc<Mutex<HashSet<u64>>>,
    ino: u64,
}

impl Drop for UploadClaim {
    fn drop(&mut self) {
        self.claimed.lock().unwrap().remove(&self.ino);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_file_has_one_upload_task_at_a_time_and_slots_count_the_tasks() {
        let queue = UploadQueue::new(0, Vec::new());
        let claim = queue.claim(7).expect("free");
        assert!(queue.claim(7).is_none(), "claimed twice");
        assert!(queue.claim(8).is_some(), "another file is free");
        drop(claim);
        assert!(queue.claim(7).is_some(), "free again once the task ends");
        assert_eq!(queue.in_flight(), 0);
        let slot = queue.slots.clone().acquire_owned().await.unwrap();
        assert_eq!(queue.in_flight(), 1, "at least one slot, and it is taken");
        assert!(queue.slots.try_acquire().is_err());
        drop(slot);
        assert_eq!(queue.in_flight(), 0);
    }
}
