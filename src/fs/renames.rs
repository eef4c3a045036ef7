//! Completing directory renames a crash interrupted.
//!
//! S3 has no directory rename: moving `a/` to `b/` copies every object under `a/` and then
//! deletes the originals. [`Fs::rename`] journals the move in the inode database before the
//! first copy; if the process dies in the middle, the bucket holds all of `a/` and part of
//! `b/` (or, after the copies, part of `a/` and all of `b/`), and the table still has the
//! directory at its old place. The next mount, before it serves anything, finishes the job:
//! copies what is still under the old prefix (copying again what was copied is harmless),
//! deletes the originals — never one whose copy does not exist — moves the row, and points
//! staged edits of files inside at their objects' new keys.

use tracing::{info, warn};

use super::{Fs, FsResult};
use crate::meta::DirRename;
use crate::store::StoreError;

impl Fs {
    /// Completes the directory renames a previous run left unfinished. Returns how many.
    /// Run before [`Fs::recover_pending`], whose staged files may lie in a moved directory.
    pub async fn resume_dir_renames(&self) -> FsResult<usize> {
        let pending = self.meta.pending_dir_renames()?;
        for (id, rename) in &pending {
            info!(
                from = rename.old_prefix,
                to = rename.new_prefix,
                "completing a directory rename interrupted by a previous run"
            );
            self.finish_dir_rename(rename).await?;
            self.meta.end_dir_rename(*id)?;
        }
        Ok(pending.len())
    }

    async fn finish_dir_rename(&self, r: &DirRename) -> FsResult<()> {
        let objects = self.list_all(&r.old_prefix).await?;
        let copied = self
            .copy_objects(&objects, &r.old_prefix, &r.new_prefix)
            .await
            .map_err(|(e, _)| e)?;
        self.delete_originals(&copied).await?;
        let new_etags = super::namespace::new_etags_of(&copied);
        if let Some(src) = self.meta.get(r.src_ino)?
            && (src.parent != Some(r.new_parent) || src.name != r.new_name)
            && self.meta.get(r.new_parent)?.is_some()
        {
            if let Some(replaced) = self.meta.child(r.new_parent, &r.new_name)? {
                self.meta.unlink(replaced.ino)?;
            }
            self.meta.rename(r.src_ino, r.new_parent, &r.new_name)?;
        }
        // Staged edits whose originals moved: their new ETags, from the copies made now or,
        // for those the interrupted run had copied, from the bucket.
        for (ino, orig_key) in self.meta.staging_under(&r.old_prefix)? {
            let new_key = format!("{}{}", r.new_prefix, &orig_key[r.old_prefix.len()..]);
            let etag = match new_etags.get(&orig_key).cloned() {
                Some(e) => e,
                None => match self.store.head(&new_key).await {
                    Ok(info) => info.etag,
                    Err(StoreError::NotFound(_)) => {
                        warn!(
                            key = new_key,
                            "the original of a staged edit is gone; its unchanged parts cannot be fetched"
                        );
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                },
            };
            self.meta.retarget_staging(ino, &new_key, &etag)?;
        }
        self.retarget_subtree(r.src_ino, &r.old_prefix, &r.new_prefix, &new_etags)
            .await
    }
}
