//! Background uploads: files whose upload failed (or that a previous run left with data not
//! yet in the bucket) are retried with exponential backoff until they succeed.
//!
//! In the default (sync) mode a failed upload is an error from `close()`/`fsync()`, and the
//! data stays staged on local disk; this module is what eventually gets it into the bucket,
//! in this run or the next one.

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::files::{FileState, OpenFile};
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
            let remote = self.original_of(&inode)?;
            let file = Arc::new(OpenFile::new(
                inode,
                FileState {
                    staging: Some(staging),
                    dirty: true,
                    remote,
                    retry_at: Some(Instant::now()),
                    retry_delay: Duration::from_secs(1),
                    ..Default::default()
                },
            ));
            self.open_files.lock().unwrap().insert(ino, file);
            recovered += 1;
        }
        if recovered > 0 {
            info!(
                recovered,
                "found files with data not yet uploaded; uploading them"
            );
        }
        Ok(recovered)
    }

    /// Runs the retry loop until the filesystem is dropped.
    pub async fn run_background(fs: Weak<Fs>) {
        loop {
            tokio::time::sleep(RETRY_TICK).await;
            let Some(fs) = fs.upgrade() else { return };
            fs.retry_due(false).await;
        }
    }

    /// Uploads every pending file now, whatever its backoff (unmount, shutdown). Returns how
    /// many files still have data that is not in the bucket.
    pub async fn flush_all(&self) -> usize {
        self.retry_due(true).await
    }

    async fn retry_due(&self, all: bool) -> usize {
        let files: Vec<Arc<OpenFile>> = self.open_files.lock().unwrap().values().cloned().collect();
        let mut pending = 0;
        for file in files {
            let due = {
                let st = file.state.lock().await;
                st.dirty
                    && !st.unlinked
                    && (all || (st.opens == 0 && st.retry_at.is_some_and(|t| t <= Instant::now())))
            };
            if !due {
                continue;
            }
            let result = self.sync_file(&file).await;
            let mut st = file.state.lock().await;
            match result {
                Ok(()) if st.opens == 0 && !st.closed => self.retire(&file, &mut st),
                Ok(()) => {}
                Err(e) => {
                    pending += 1;
                    st.retry_delay =
                        (st.retry_delay * 2).clamp(Duration::from_secs(1), MAX_RETRY_DELAY);
                    st.retry_at = Some(Instant::now() + st.retry_delay);
                    warn!(
                        ino = file.ino(),
                        "upload still failing, next attempt in {:?}: {e}", st.retry_delay
                    );
                }
            }
        }
        pending
    }
}
