//! Extended attributes: `user.*` only, stored in s3fs's `x-amz-meta-xattr` header.
//!
//! Other namespaces (security, system, trusted) have no meaning on S3: reading one answers
//! "no such attribute" (cheap, and what the kernel asks on every write for
//! `security.capability`), setting one is not supported.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;

use tracing::instrument;

use super::{Fs, FsError, FsResult};
use crate::meta::Timestamp;

const USER_PREFIX: &str = "user.";

/// Whether attribute `name` can exist here (a `user.*` name); reading any other answers
/// "no such attribute" without looking at the entry.
pub fn is_stored_xattr(name: &OsStr) -> bool {
    user_name(name).is_some()
}

fn user_name(name: &OsStr) -> Option<&str> {
    std::str::from_utf8(name.as_bytes())
        .ok()
        .filter(|n| n.starts_with(USER_PREFIX) && n.len() > USER_PREFIX.len())
}

impl Fs {
    /// The value of attribute `name`.
    #[instrument(level = "debug", skip(self))]
    pub async fn getxattr(&self, ino: u64, name: &OsStr) -> FsResult<Vec<u8>> {
        let Some(name) = user_name(name) else {
            return Err(FsError::NoAttr);
        };
        let inode = self.dirs.ensure_headers(self.dirs.inode(ino)?).await?;
        inode.xattrs.get(name).cloned().ok_or(FsError::NoAttr)
    }

    /// Names of all attributes, each followed by a NUL.
    #[instrument(level = "debug", skip(self))]
    pub async fn listxattr(&self, ino: u64) -> FsResult<Vec<u8>> {
        let inode = self.dirs.ensure_headers(self.dirs.inode(ino)?).await?;
        let mut out = Vec::new();
        for name in inode.xattrs.keys() {
            out.extend_from_slice(name.as_bytes());
            out.push(0);
        }
        Ok(out)
    }

    /// Sets attribute `name`; `flags` may hold XATTR_CREATE or XATTR_REPLACE.
    #[instrument(level = "debug", skip(self, value))]
    pub async fn setxattr(&self, ino: u64, name: &OsStr, value: &[u8], flags: i32) -> FsResult<()> {
        self.check_writable()?;
        let Some(name) = user_name(name) else {
            return Err(FsError::NotSupported(
                "only user.* attributes can be stored in S3",
            ));
        };
        self.dirs.ensure_headers(self.dirs.inode(ino)?).await?;
        self.persist_headers(ino, |inode| {
            let exists = inode.xattrs.contains_key(name);
            if flags & libc::XATTR_CREATE != 0 && exists {
                return Err(FsError::Exists);
            }
            if flags & libc::XATTR_REPLACE != 0 && !exists {
                return Err(FsError::NoAttr);
            }
            inode.xattrs.insert(name.to_string(), value.to_vec());
            self.check_header_size(inode)?;
            inode.ctime = Timestamp::now();
            Ok(())
        })
        .await?;
        Ok(())
    }

    /// Removes attribute `name`.
    #[instrument(level = "debug", skip(self))]
    pub async fn removexattr(&self, ino: u64, name: &OsStr) -> FsResult<()> {
        self.check_writable()?;
        let Some(name) = user_name(name) else {
            return Err(FsError::NoAttr);
        };
        self.dirs.ensure_headers(self.dirs.inode(ino)?).await?;
        self.persist_headers(ino, |inode| {
            if inode.xattrs.remove(name).is_none() {
                return Err(FsError::NoAttr);
            }
            inode.ctime = Timestamp::now();
            Ok(())
        })
        .await?;
        Ok(())
    }
}
