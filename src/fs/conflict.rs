//! Conflicts: another S3 client changed (or deleted) an object while this mount had changes
//! of it waiting to be uploaded.
//!
//! Overwriting would silently lose the other client's version; dropping ours would lose what
//! a `close()` acknowledged. So both stay: the bucket's version keeps the name, ours is
//! uploaded next to it as `NAME.conflict-YYYYMMDD-HHMMSS.EXT` (the extension kept last, so
//! the copy still opens with the right program), and a warning names both keys.
//!
//! The change is caught in the upload itself where the server supports conditional writes
//! (`If-Match: ETAG` for an object we read, `If-None-Match: *` for a file we created; AWS
//! does, and moto): `--conditional-writes`, on by default for AWS. Elsewhere (Garage ignores
//! those headers) a HEAD compares the ETag just before the upload, which leaves a window of
//! one round trip. A file created by this mount is checked that way only in write-back mode:
//! in sync mode its upload follows the lookup that found the name free within the duration
//! of the write, and a HEAD per new file would cost `cp -r` and `tar x` a round trip each.

use std::time::{SystemTime, UNIX_EPOCH};

use tracing::warn;

use super::files::{FileState, OpenFile, Phase};
use super::{Fs, FsResult, write};
use crate::meta::ROOT_INO;
use crate::store::{Expect, StoreError, WriteHeaders};

/// Piece size when comparing an object with staged contents: one ranged GET each.
const COMPARE_CHUNK: u64 = 8 * 1024 * 1024;

/// Longest name of a conflict copy, in bytes (NAME_MAX).
const MAX_NAME: usize = 255;

/// An extension longer than this is part of the name, not an extension (`a.verylongsuffix`).
const MAX_EXTENSION: usize = 16;

/// The version of a file's object that this mount last saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum KnownVersion {
    /// No object: the file was created here and not uploaded yet.
    Absent,
    /// The object with this ETag.
    ETag(String),
    /// Not known (the file's object is elsewhere): no check.
    Unknown,
}

impl KnownVersion {
    /// The condition an upload carries.
    pub(super) fn expect(&self) -> Expect<'_> {
        match self {
            KnownVersion::Absent => Expect::Absent,
            KnownVersion::ETag(etag) => Expect::ETag(etag),
            KnownVersion::Unknown => Expect::Any,
        }
    }
}

impl Fs {
    /// What `key` held when this mount last read or wrote the file.
    pub(super) fn known_version(&self, st: &FileState, key: &str) -> KnownVersion {
        match &st.remote {
            Some(remote) if remote.key == key => KnownVersion::ETag(remote.etag.clone()),
            Some(_) => KnownVersion::Unknown,
            None => KnownVersion::Absent,
        }
    }

    /// Whether `key` no longer holds what `expect` says, asked with a HEAD on servers that
    /// do not check conditional writes themselves (see the module docs for when).
    pub(super) async fn changed_in_bucket(&self, key: &str, expect: Expect<'_>) -> FsResult<bool> {
        if self.cfg.conditional_writes {
            return Ok(false);
        }
        let found = match expect {
            Expect::Any => return Ok(false),
            Expect::Absent if !self.cfg.write_back => return Ok(false),
            _ => match self.store.head(key).await {
                Ok(info) => Some(info.etag),
                Err(StoreError::NotFound(_)) => None,
                Err(e) => return Err(e.into()),
            },
        };
        Ok(match expect {
            Expect::Absent => found.is_some(),
            Expect::ETag(etag) => found.as_deref() != Some(etag),
            Expect::Any => false,
        })
    }

    /// The bucket does not hold what this mount expected at `key`. If it holds exactly the
    /// staged contents — this mount's own upload, completed just before a crash kept it from
    /// recording so — that object is ours and its ETag is returned. Otherwise the contents go
    /// to a conflict copy ([`Self::save_conflict_copy`]) and `None` is returned.
    ///
    /// The caller holds the file's change lock and its key.
    pub(super) async fn settle_conflict(
        &self,
        file: &OpenFile,
        key: &str,
        headers: &WriteHeaders,
    ) -> FsResult<Option<String>> {
        if let Some(etag) = self.bucket_holds_staged(file, key).await? {
            return Ok(Some(etag));
        }
        self.save_conflict_copy(file, key, headers).await?;
        Ok(None)
    }

    /// The ETag of the object at `key` if it is byte for byte the staged contents (compared
    /// in [`COMPARE_CHUNK`] pieces, stopping at the first difference); `None` otherwise, or
    /// when part of the contents is not local (an edit of a large object).
    async fn bucket_holds_staged(&self, file: &OpenFile, key: &str) -> FsResult<Option<String>> {
        let info = match self.store.head(key).await {
            Ok(info) => info,
            Err(StoreError::NotFound(_)) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let (size, ours) = {
            let mut st = file.state.lock().await;
            let staging = self.staging_of(file, &mut st)?;
            let size = staging.size();
            if info.size != size || !staging.missing_for_read(0..size).is_empty() {
                return Ok(None);
            }
            // Read without the lock: the change lock keeps the contents as they are.
            (size, staging.reader()?)
        };
        for start in (0..size).step_by(COMPARE_CHUNK as usize) {
            let end = (start + COMPARE_CHUNK).min(size);
            let theirs = self
                .store
                .get_range(key, start..end, Some(&info.etag))
                .await?;
            let ours = ours.read(start..end)?;
            if theirs[..] != ours[..] {
                return Ok(None);
            }
        }
        Ok(Some(info.etag))
    }

    /// Uploads the file's contents as the conflict copy of `key`, leaves `key` to the
    /// bucket's version, and makes the file show that version from now on.
    pub(super) async fn save_conflict_copy(
        &self,
        file: &OpenFile,
        key: &str,
        headers: &WriteHeaders,
    ) -> FsResult<()> {
        let copy = conflict_key(key, SystemTime::now());
        let _change = self.dirs.local.begin(&copy);
        warn!(
            key,
            conflict_copy = copy,
            "the object was changed or deleted in the bucket by another client since this mount \
             read it: the bucket's version stays, this mount's version is saved as the \
             conflict copy"
        );
        self.abandon_stream(&mut *file.state.lock().await);
        let dest = write::Destination {
            key: &copy,
            headers,
            expect: Expect::Absent,
        };
        self.upload_staged(file, dest).await?;
        // The name is the other client's now: forget what this mount had, so the next look
        // at it asks the bucket.
        let mut st = file.state.lock().await;
        st.phase = Phase::Clean;
        st.remote = None;
        if st.opens == 0
            && let Some(staging) = st.staging.take()
        {
            let _ = staging.remove();
        }
        let mut attrs = file.attrs();
        attrs.dirty = false;
        attrs.etag = None;
        attrs.last_modified = None;
        attrs.headers_known = false;
        attrs.validated_at = 0;
        self.dirs.save(&attrs)?;
        self.meta.delete_staging(attrs.ino)?;
        drop(st);
        // Not waited for: this holds the file's change lock, and the kernel may be waiting
        // for a request of the file that needs it (a write) before it answers.
        self.dirs
            .view
            .kernel()
            .invalidate(super::kernel::Invalidation::Inode(attrs.ino), None);
        if let Some(parent) = attrs.parent {
            // The copy is a new entry of the directory.
            self.dirs.listing_is_stale(parent.max(ROOT_INO))?;
        }
        Ok(())
    }
}

/// The key of the conflict copy of `key` made at `at`: `dir/NAME.conflict-YYYYMMDD-HHMMSS.EXT`,
/// the name shortened if needed to stay a valid name.
pub fn conflict_key(key: &str, at: SystemTime) -> String {
    let (dir, name) = match key.rfind('/') {
        Some(i) => key.split_at(i + 1),
        None => ("", key),
    };
    let (stem, ext) = match name.rfind('.') {
        Some(i) if i > 0 && name.len() - i <= MAX_EXTENSION => name.split_at(i),
        _ => (name, ""),
    };
    let suffix = format!(".conflict-{}", timestamp(at));
    let mut stem = stem.to_string();
    while stem.len() + suffix.len() + ext.len() > MAX_NAME {
        stem.pop();
    }
    format!("{dir}{stem}{suffix}{ext}")
}

/// `YYYYMMDD-HHMMSS` in UTC.
fn timestamp(at: SystemTime) -> String {
    let secs = at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}{month:02}{day:02}-{:02}{:02}{:02}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn conflict_copies_keep_the_extension_last() {
        // 2026-11-29 13:45:07 UTC.
        let t = at(1_795_959_907);
        assert_eq!(
            conflict_key("docs/report.txt", t),
            "docs/report.conflict-20261129-134507.txt"
        );
        assert_eq!(conflict_key("README", t), "README.conflict-20261129-134507");
        assert_eq!(
            conflict_key("a/.bashrc", t),
            "a/.bashrc.conflict-20261129-134507"
        );
        assert_eq!(
            conflict_key("x.averyveryverylongsuffix", t),
            "x.averyveryverylongsuffix.conflict-20261129-134507"
        );
    }

    #[test]
    fn dates_are_civil_dates() {
        assert_eq!(timestamp(at(0)), "19700101-000000");
        assert_eq!(timestamp(at(951_782_400)), "20000229-000000");
        assert_eq!(timestamp(at(4_107_542_399)), "21000228-235959");
    }

    #[test]
    fn long_names_are_shortened_to_a_valid_name() {
        let name = "n".repeat(250) + ".txt";
        let k = conflict_key(&format!("d/{name}"), at(0));
        let copy = k.strip_prefix("d/").unwrap();
        assert_eq!(copy.len(), MAX_NAME);
        assert!(copy.ends_with(".conflict-19700101-000000.txt"));
    }
}
