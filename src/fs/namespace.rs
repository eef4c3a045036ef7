//! Operations on names: create, mkdir, mknod, symlink, readlink, unlink, rmdir, rename, link.
//!
//! Each holds the lock of the directory (or, for rename, both directories) it changes. A
//! directory that exists only implicitly (keys under its prefix, no marker) gets a marker
//! before it can lose its last entry, so empty directories persist as POSIX expects. Renames
//! copy before they delete: at no point is an object gone before its copy exists.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;

use bytes::Bytes;
use futures::stream::{self, StreamExt};
use tracing::{info, instrument, warn};

use super::files::{FileState, OpenFile, Phase};
use super::locks::DirGuard;
use super::{Attr, Caller, Fs, FsError, FsResult, write};
use crate::cache::staging::{Original, Staging};
use crate::meta::names::{self, NameError};
use crate::meta::objects::SYMLINK_MAX;
use crate::meta::{DirRename, Inode, Kind, ROOT_INO, Timestamp, now_ns};
use crate::store::{Expect, ListedObject, StoreError};

/// Copies in flight during a directory rename. A server-side copy costs the server, not our
/// link, and takes tens of milliseconds: 16 at once moves a 1,000-object directory in a few
/// seconds without flooding the server.
const RENAME_CONCURRENCY: usize = 16;

impl Fs {
    /// A row for a new entry created by `caller` in `dir`. In a set-group-ID directory the
    /// group is the directory's, and subdirectories inherit the bit (as on ext4).
    fn new_entry(&self, dir: &Inode, name: &str, kind: Kind, perm: u32, caller: Caller) -> Inode {
        let mut inode = self.dirs.new_inode(dir.ino, name, kind, now_ns());
        inode.perm = perm & 0o7777;
        inode.uid = caller.uid;
        inode.gid = caller.gid;
        if dir.perm & libc::S_ISGID != 0 {
            inode.gid = dir.gid;
            if kind == Kind::Dir {
                inode.perm |= libc::S_ISGID;
            }
        }
        inode.headers_known = true;
        inode
    }

    /// Checks that `name` is free in `dir` (asking the bucket if the table is stale).
    async fn check_free(&self, dir: &Inode, name: &str) -> FsResult<()> {
        if self.dirs.find_child(dir, name).await?.is_some() {
            return Err(FsError::Exists);
        }
        Ok(())
    }

    /// Records a new entry: table, parent times, lookup count.
    fn add_entry(&self, dir: &Inode, inode: &mut Inode) -> FsResult<Attr> {
        self.meta.insert(inode)?;
        self.dirs.touch_dir(dir.ino)?;
        self.dirs.view.not_absent(dir.ino, &inode.name);
        let attr = self.dirs.attr(inode)?;
        self.dirs.view.looked_up(inode.ino);
        Ok(attr)
    }

    /// Locks directory `parent` and checks that `name` is a free, valid name in it.
    async fn name_to_create<'n>(
        &self,
        parent: u64,
        name: &'n OsStr,
    ) -> FsResult<(DirGuard, Inode, &'n str)> {
        self.check_writable()?;
        let name = names::check_name(name)?;
        let guard = self.dirs.locks.lock(parent).await;
        let dir = self.dirs.dir(parent)?;
        self.check_free(&dir, name).await?;
        Ok((guard, dir, name))
    }

    /// Writes the object of a new entry, then records the entry.
    async fn put_entry(&self, dir: &Inode, body: Bytes, mut inode: Inode) -> FsResult<Attr> {
        let ([key], _held) = self
            .keys
            .write(|| -> FsResult<_> {
                let dir = self.dirs.dir(dir.ino)?;
                Ok([self
                    .dirs
                    .child_key(&dir, &inode.name, inode.kind == Kind::Dir)?])
            })
            .await?;
        let key = key.as_str();
        let _change = self.dirs.local.begin(key);
        let etag = self
            .store
            .put(key, body, &self.headers_of(&inode), Expect::Any)
            .await?;
        inode.wrote(etag);
        inode.validated_at = now_ns();
        if inode.kind == Kind::Dir {
            // A new directory is empty: its listing is known.
            inode.listed_at = Some(inode.validated_at);
        }
        self.add_entry(dir, &mut inode)
    }

    /// Creates a directory: a marker object `dir/name/`.
    #[instrument(level = "debug", skip(self))]
    pub async fn mkdir(
        &self,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        caller: Caller,
    ) -> FsResult<Attr> {
        let (_g, dir, name) = self.name_to_create(parent, name).await?;
        let inode = self.new_entry(&dir, name, Kind::Dir, mode & !umask, caller);
        self.put_entry(&dir, Bytes::new(), inode).await
    }

    /// Creates and opens a regular file. Its object is written on the first flush.
    #[instrument(level = "debug", skip(self))]
    pub async fn create(
        &self,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        caller: Caller,
    ) -> FsResult<(Attr, u64)> {
        self.check_writable()?;
        let name = names::check_name(name)?;
        let _g = self.dirs.locks.lock(parent).await;
        let dir = self.dirs.dir(parent)?;
        if let Some(existing) = self.dirs.find_child(&dir, name).await? {
            // Lost a race with another creator: open what is there, as open(2) would.
            if flags & libc::O_EXCL != 0 {
                return Err(FsError::Exists);
            }
            drop(_g);
            let existing = self.dirs.ensure_headers(existing).await?;
            let fh = self.open(existing.ino, flags, caller).await?.fh;
            let attr = self.dirs.attr(&self.dirs.inode(existing.ino)?)?;
            self.dirs.view.looked_up(existing.ino);
            return Ok((attr, fh));
        }
        self.dirs.child_key(&dir, name, false)?;
        let mut inode = self.new_entry(&dir, name, Kind::File, mode & !umask, caller);
        inode.dirty = true;
        let attr = self.add_entry(&dir, &mut inode)?;
        let staging = Staging::create(&self.staging_dir, inode.ino, None, 0)?;
        let file = Arc::new(OpenFile::new(
            inode,
            FileState {
                staging: Some(staging),
                phase: Phase::Dirty,
                opens: 1,
                ..Default::default()
            },
        ));
        self.open.insert(file.clone());
        let writable = flags & libc::O_ACCMODE != libc::O_RDONLY;
        Ok((attr, self.new_file_handle(file, writable, 0)))
    }

    /// Creates a file of any type: regular files become empty objects, the other types
    /// zero-byte objects whose mode carries the type (as s3fs stores them).
    #[instrument(level = "debug", skip(self))]
    pub async fn mknod(
        &self,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        caller: Caller,
    ) -> FsResult<Attr> {
        let kind = match mode & libc::S_IFMT {
            0 => Kind::File,
            bits => Kind::from_mode(bits).ok_or(FsError::Invalid("unknown file type"))?,
        };
        if kind == Kind::Dir {
            return Err(FsError::Invalid("mknod of a directory"));
        }
        let (_g, dir, name) = self.name_to_create(parent, name).await?;
        let mut inode = self.new_entry(&dir, name, kind, mode & !umask, caller);
        if matches!(kind, Kind::CharDev | Kind::BlockDev) {
            inode.rdev = rdev;
        }
        self.put_entry(&dir, Bytes::new(), inode).await
    }

    /// Creates a symlink: an object whose body is the target.
    #[instrument(level = "debug", skip(self))]
    pub async fn symlink(
        &self,
        parent: u64,
        name: &OsStr,
        target: &OsStr,
        caller: Caller,
    ) -> FsResult<Attr> {
        if target.len() > SYMLINK_MAX {
            return Err(NameError::TooLong.into());
        }
        let target = std::str::from_utf8(target.as_bytes()).map_err(|_| NameError::NotUtf8)?;
        let (_g, dir, name) = self.name_to_create(parent, name).await?;
        let mut inode = self.new_entry(&dir, name, Kind::Symlink, 0o777, caller);
        inode.size = target.len() as u64;
        inode.symlink_target = Some(target.to_string());
        let body = Bytes::copy_from_slice(target.as_bytes());
        self.put_entry(&dir, body, inode).await
    }

    /// The target of a symlink (read from the object once, then remembered).
    pub async fn readlink(&self, ino: u64) -> FsResult<Vec<u8>> {
        let inode = self.dirs.inode(ino)?;
        if inode.kind != Kind::Symlink {
            return Err(FsError::Invalid("not a symlink"));
        }
        if let Some(t) = &inode.symlink_target {
            return Ok(t.as_bytes().to_vec());
        }
        let key = self.dirs.key_of(&inode)?;
        let body = self
            .store
            .get_range(&key, 0..inode.size, inode.etag.as_deref())
            .await?;
        let target = String::from_utf8(body.to_vec()).map_err(|_| NameError::NotUtf8)?;
        let mut inode = inode;
        inode.symlink_target = Some(target.clone());
        self.dirs.save(&inode)?;
        Ok(target.into_bytes())
    }

    /// Hard links cannot exist in S3: one object, one key.
    pub fn link(&self) -> FsResult<Attr> {
        info!("link refused: S3 objects have exactly one key, so hard links cannot exist");
        Err(FsError::NotPermitted("hard links cannot exist on S3"))
    }

    /// Gives an implicit directory a marker, so it survives losing its last entry.
    async fn keep_dir_alive(&self, dir: &Inode) -> FsResult<()> {
        if dir.ino == ROOT_INO {
            return Ok(());
        }
        // As the table has it now: a listing since the caller read it may have found the
        // marker gone.
        let dir = self.dirs.ensure_headers(self.dirs.inode(dir.ino)?).await?;
        if dir.etag.is_some() {
            return Ok(());
        }
        let (key, _held) = self.hold_key(&dir).await?;
        let _change = self.dirs.local.begin(&key);
        let etag = self
            .store
            .put(&key, Bytes::new(), &self.headers_of(&dir), Expect::Any)
            .await?;
        Ok(self.meta.set_marker(dir.ino, &etag, now_ns())?)
    }

    /// Copies the contents of `file` to local disk if it is open: its object is about to be
    /// deleted or overwritten, and open handles must keep reading what they opened.
    async fn keep_open_contents(&self, file: &OpenFile) -> FsResult<()> {
        if file.state.lock().await.opens == 0 {
            return Ok(());
        }
        match self
            .lock_with_blocks(file, |s| s.missing_for_read(0..s.size()))
            .await
        {
            // Closed meanwhile: nobody reads it any more.
            Ok(_) | Err(FsError::Stale) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Detaches a non-directory entry from the namespace (after [`Self::keep_open_contents`]).
    /// An open file stays usable through its handles and is never uploaded.
    async fn detach_file(&self, inode: &Inode) -> FsResult<()> {
        if let Some(file) = self.dirs.open_file_of(inode.ino) {
            let _changing = file.changes.lock().await;
            let mut st = file.state.lock().await;
            return self.detach_locked(inode, &file, &mut st);
        }
        self.detach_row(inode)
    }

    /// [`Self::detach_file`] of an entry that is not open.
    fn detach_row(&self, inode: &Inode) -> FsResult<()> {
        self.meta.unlink(inode.ino)?;
        if !self.dirs.is_referenced(inode.ino) {
            self.meta.forget(inode.ino)?;
        }
        Ok(())
    }

    /// [`Self::detach_file`] of an open file whose change lock and content lock are held.
    fn detach_locked(
        &self,
        inode: &Inode,
        file: &Arc<OpenFile>,
        st: &mut FileState,
    ) -> FsResult<()> {
        if st.phase == Phase::Retired {
            // Retired since it was found open: its row is all there is.
            return self.detach_row(inode);
        }
        st.phase = Phase::Unlinked;
        let mut attrs = file.attrs();
        attrs.parent = None;
        attrs.ctime = Timestamp::now();
        file.set_attrs(attrs);
        self.meta.unlink(inode.ino)?;
        if st.opens == 0 {
            self.retire(file, st);
        }
        Ok(())
    }

    /// Locks directory `parent` and finds its entry `name`, for unlink and rmdir.
    async fn entry_to_remove<'n>(
        &self,
        parent: u64,
        name: &'n OsStr,
    ) -> FsResult<(DirGuard, Inode, &'n str, Inode)> {
        self.check_writable()?;
        let name = names::check_name(name)?;
        let guard = self.dirs.locks.lock(parent).await;
        let dir = self.dirs.dir(parent)?;
        let child = self
            .dirs
            .find_child(&dir, name)
            .await?
            .ok_or(FsError::NotFound)?;
        Ok((guard, dir, name, child))
    }

    /// Removes a file, symlink or special file.
    #[instrument(level = "debug", skip(self))]
    pub async fn unlink(&self, parent: u64, name: &OsStr) -> FsResult<()> {
        let (_g, dir, name, child) = self.entry_to_remove(parent, name).await?;
        if child.kind == Kind::Dir {
            return Err(FsError::IsDir);
        }
        self.keep_dir_alive(&dir).await?;
        if let Some(file) = self.dirs.open_file_of(child.ino) {
            self.keep_open_contents(&file).await?;
        }
        let (key, _held) = self.hold_key(&child).await?;
        let _change = self.dirs.local.begin(&key);
        match self.dirs.open_file_of(child.ino) {
            Some(file) => {
                // Under the change lock: an upload in flight finishes first (and its object
                // is deleted here), and none starts before the file is detached. And under
                // the content lock: an open meanwhile would read the object being deleted.
                let _changing = file.changes.lock().await;
                let mut st = file.state.lock().await;
                if file.attrs().etag.is_some() || st.remote.is_some() {
                    self.store.delete(&key).await?;
                }
                self.detach_locked(&child, &file, &mut st)?;
            }
            None => {
                // The row, not `child`: an upload in flight when that was read may have
                // created the object since, and taken the file out of the table.
                let child = self.dirs.inode(child.ino)?;
                if child.etag.is_some() {
                    self.store.delete(&key).await?;
                }
                self.detach_file(&child).await?;
            }
        }
        self.dirs.touch_dir(parent)?;
        self.dirs.view.found_absent(parent, name);
        Ok(())
    }

    /// Fails with ENOTEMPTY unless `dir` has no entry, locally or in the bucket.
    async fn check_empty(&self, dir: &Inode) -> FsResult<()> {
        if self.meta.has_children(dir.ino)? {
            self.dirs.refresh_dir(dir.ino).await?;
            if self.meta.has_children(dir.ino)? {
                return Err(FsError::NotEmpty);
            }
        }
        // Keys the listing hides (odd names) still make the directory non-empty.
        let prefix = self.dirs.key_of(dir)?;
        let page = self.store.list(&prefix, None, None, Some(2)).await?;
        if page.objects.iter().any(|o| o.key != prefix) || !page.prefixes.is_empty() {
            return Err(FsError::NotEmpty);
        }
        Ok(())
    }

    /// Removes an empty directory (and its marker).
    #[instrument(level = "debug", skip(self))]
    pub async fn rmdir(&self, parent: u64, name: &OsStr) -> FsResult<()> {
        let (_g, dir, name, child) = self.entry_to_remove(parent, name).await?;
        if child.kind != Kind::Dir {
            return Err(FsError::NotDir);
        }
        self.check_empty(&child).await?;
        self.keep_dir_alive(&dir).await?;
        let (key, _held) = self.hold_key(&child).await?;
        let _change = self.dirs.local.begin(&key);
        self.store.delete(&key).await?;
        self.meta.unlink(child.ino)?;
        if !self.dirs.is_referenced(child.ino) {
            self.meta.forget(child.ino)?;
        }
        self.dirs.touch_dir(parent)?;
        self.dirs.view.found_absent(parent, name);
        Ok(())
    }

    /// Renames `parent/name` to `newparent/newname`. `flags` may hold RENAME_NOREPLACE;
    /// RENAME_EXCHANGE cannot be done atomically on S3 and is refused.
    #[instrument(level = "debug", skip(self))]
    pub async fn rename(
        &self,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        flags: u32,
    ) -> FsResult<()> {
        self.check_writable()?;
        if flags & libc::RENAME_EXCHANGE != 0 {
            return Err(FsError::Invalid("RENAME_EXCHANGE is not supported on S3"));
        }
        if flags & !libc::RENAME_NOREPLACE != 0 {
            return Err(FsError::Invalid("unknown rename flags"));
        }
        let name = names::check_name(name)?;
        let newname = names::check_name(newname)?;
        let _g = self.dirs.locks.lock_two(parent, newparent).await;
        let src_dir = self.dirs.dir(parent)?;
        let dst_dir = self.dirs.dir(newparent)?;
        let src = self
            .dirs
            .find_child(&src_dir, name)
            .await?
            .ok_or(FsError::NotFound)?;
        let src = self.dirs.ensure_headers(src).await?;
        // An open file's live attributes are newer than its row.
        let src = self.dirs.inode(src.ino)?;
        let dst = self.dirs.find_child(&dst_dir, newname).await?;
        if let Some(d) = &dst {
            if d.ino == src.ino {
                return Ok(());
            }
            if flags & libc::RENAME_NOREPLACE != 0 {
                return Err(FsError::Exists);
            }
            match (src.kind == Kind::Dir, d.kind == Kind::Dir) {
                (true, false) => return Err(FsError::NotDir),
                (false, true) => return Err(FsError::IsDir),
                (true, true) => self.check_empty(d).await?,
                _ => {}
            }
        }
        if src.kind == Kind::Dir && self.is_ancestor(src.ino, newparent)? {
            return Err(FsError::Invalid("cannot move a directory into itself"));
        }
        let is_dir = src.kind == Kind::Dir;
        // A name too long for a key fails before anything changes.
        self.dirs.child_key(&dst_dir, newname, is_dir)?;
        if parent != newparent {
            self.keep_dir_alive(&src_dir).await?;
        }
        // Both keys, held until the rows have the new names: a directory's as a move (writes
        // inside it wait), a file's as a write (a move of a directory around it waits).
        let keys_now = || -> FsResult<_> {
            Ok([
                self.dirs.key_of(&src)?,
                self.dirs
                    .child_key(&self.dirs.dir(newparent)?, newname, is_dir)?,
            ])
        };
        let (mut _moving, mut _writing) = (None, None);
        let [old_key, new_key] = if is_dir {
            let (keys, held) = self.keys.moving(&keys_now).await?;
            _moving = Some(held);
            keys
        } else {
            let (keys, held) = self.keys.write(&keys_now).await?;
            _writing = Some(held);
            keys
        };
        let _changes = if src.kind == Kind::Dir {
            [
                self.dirs.local.begin_subtree(&old_key),
                self.dirs.local.begin_subtree(&new_key),
            ]
        } else {
            [
                self.dirs.local.begin(&old_key),
                self.dirs.local.begin(&new_key),
            ]
        };
        let mut journal = None;
        // A replaced file is held (its change lock) from here until it is detached: an
        // upload of it in flight finishes first, and none starts that would put its contents
        // back under the name the source is taking. Its content lock is held too, once its
        // contents are local: an open meanwhile would read the source's object.
        let replaced = dst
            .as_ref()
            .filter(|d| d.kind != Kind::Dir)
            .and_then(|d| self.dirs.open_file_of(d.ino));
        let _replaced_changing = match &replaced {
            Some(f) => Some(f.changes.lock().await),
            None => None,
        };
        // As it is now that it is held, or known not to be open: an upload in flight when
        // `dst` was read may have created its object since, and taken it out of the table.
        let dst = match &replaced {
            Some(f) => Some(f.attrs()),
            None => dst.map(|d| self.dirs.inode(d.ino)).transpose()?,
        };
        // A moving file is held likewise, until its row has its new name.
        let moving = if src.kind == Kind::Dir {
            None
        } else {
            self.dirs.open_file_of(src.ino)
        };
        let _moving_changing = match &moving {
            Some(f) => Some(f.changes.lock().await),
            None => None,
        };
        let mut replaced_state = None;
        if src.kind == Kind::Dir {
            journal = Some(
                self.rename_dir(&src, dst.as_ref(), (newparent, newname), &new_key)
                    .await?,
            );
        } else {
            if let Some(f) = &replaced {
                self.keep_open_contents(f).await?;
                replaced_state = Some(f.state.lock().await);
            }
            self.rename_file(&src, dst.as_ref(), &new_key, moving.as_deref())
                .await?;
        }
        if let Some(d) = &dst {
            if d.kind == Kind::Dir {
                self.meta.unlink(d.ino)?;
                if !self.dirs.is_referenced(d.ino) {
                    self.meta.forget(d.ino)?;
                }
            } else if let (Some(f), Some(st)) = (&replaced, replaced_state.as_mut()) {
                self.detach_locked(d, f, st)?;
            } else {
                self.detach_file(d).await?;
            }
        }

        self.meta.rename(src.ino, newparent, newname)?;
        if let Some(id) = journal {
            self.meta.end_dir_rename(id)?;
        }
        let mut moved = self.meta.get(src.ino)?.ok_or(FsError::NotFound)?;
        if src.kind == Kind::Dir {
            // A file's new ctime went into its copy's headers (`rename_file`).
            moved.ctime = Timestamp::now();
        }
        if let Some(f) = self.dirs.open_file_of(src.ino) {
            let mut live = f.attrs();
            live.parent = moved.parent;
            live.name = moved.name.clone();
            live.ctime = moved.ctime;
            live.etag = moved.etag.clone();
            live.last_modified = moved.last_modified;
            moved = live;
        }
        self.dirs.save(&moved)?;
        self.dirs.touch_dir(parent)?;
        if newparent != parent {
            self.dirs.touch_dir(newparent)?;
        }
        self.dirs.view.not_absent(newparent, newname);
        self.dirs.view.found_absent(parent, name);
        Ok(())
    }

    fn is_ancestor(&self, ancestor: u64, mut ino: u64) -> FsResult<bool> {
        loop {
            if ino == ancestor {
                return Ok(true);
            }
            match self.meta.get(ino)?.and_then(|i| i.parent) {
                Some(p) => ino = p,
                None => return Ok(false),
            }
        }
    }

    /// Moves a file's object: server-side copy to the new key, then delete of the old one.
    /// `moving`: the source if it is open, whose change lock the caller holds until the row
    /// has moved, so that no upload runs under the old name meanwhile. It is pointed at the
    /// copy before the original is deleted, so that a read then finds the copy.
    async fn rename_file(
        &self,
        src: &Inode,
        dst: Option<&Inode>,
        new_key: &str,
        moving: Option<&OpenFile>,
    ) -> FsResult<()> {
        let old_key = self.dirs.key_of(src)?;
        // An upload that was in flight until the lock was ours (or, if the file was not open
        // by then, until the upload took it out of the table) may have created the object:
        // the live attributes, or the row, say where the contents are now.
        let src = &self.dirs.inode(src.ino)?;
        let mut moved = src.clone();
        moved.ctime = Timestamp::now();
        match &src.etag {
            Some(etag) => {
                let new_etag = write::copy_object(
                    &self.store,
                    &old_key,
                    new_key,
                    src.size,
                    Some(etag),
                    Some(&self.headers_of(&moved)),
                    self.upload_tuning(),
                )
                .await?;
                let now_at = Original {
                    key: new_key.to_string(),
                    etag: new_etag.clone(),
                };
                let before = match moving {
                    Some(f) => Some(self.point_at_copy(f, &mut *f.state.lock().await, &now_at)?),
                    None => None,
                };
                if let Err(e) = self.store.delete(&old_key).await {
                    // The rename failed; the file stays where its row says it is.
                    if let (Some(f), Some(before)) = (moving, before) {
                        self.set_pointers(f, &mut *f.state.lock().await, before)?;
                    }
                    return Err(e.into());
                }
                moved.wrote(new_etag);
                moved.validated_at = now_ns();
            }
            None => {
                // Not uploaded yet: the upload will write the new key. What the name held
                // before must not linger in the bucket meanwhile.
                if dst.is_some_and(|d| d.etag.is_some()) {
                    self.store.delete(new_key).await?;
                }
            }
        }
        self.meta.save(&moved)?;
        Ok(())
    }

    /// Moves a directory: copies every object under its prefix, then deletes the old ones.
    /// The move is journaled first, so that a crash in the middle is completed by the next
    /// mount; the journal entry (its id is returned) ends once the caller has moved the row.
    async fn rename_dir(
        &self,
        src: &Inode,
        dst: Option<&Inode>,
        to: (u64, &str),
        new_prefix: &str,
    ) -> FsResult<i64> {
        let old_prefix = self.dirs.key_of(src)?;
        let journal = self.meta.begin_dir_rename(&DirRename {
            src_ino: src.ino,
            new_parent: to.0,
            new_name: to.1.to_string(),
            old_prefix: old_prefix.clone(),
            new_prefix: new_prefix.to_string(),
        })?;
        let objects = match self.list_all(&old_prefix).await {
            Ok(o) => o,
            Err(e) => {
                self.meta.end_dir_rename(journal)?;
                return Err(e);
            }
        };
        let copied = match self.copy_objects(&objects, &old_prefix, new_prefix).await {
            Ok(c) => c,
            Err((e, partial)) => {
                // The source is untouched; take the partial copy back out of the bucket.
                let partial: Vec<String> = partial.into_iter().map(|(_, new, _)| new).collect();
                for chunk in partial.chunks(1000) {
                    if let Err(e) = self.store.delete_many(chunk).await {
                        warn!(new_prefix, "could not remove a partial directory copy: {e}");
                    }
                }
                warn!(
                    old_prefix,
                    new_prefix, "directory rename failed while copying: {e}"
                );
                self.meta.end_dir_rename(journal)?;
                return Err(e.into());
            }
        };
        // The replaced (empty) directory's marker goes unless the source's took its place.
        if dst.is_some() && !objects.iter().any(|o| o.key == old_prefix) {
            self.store.delete(new_prefix).await?;
        }
        // From here a failure leaves the journal entry: the next mount finishes the move.
        // The entries inside (and the open files among them) are pointed at the copies
        // before the originals go, so that a read or a partial write of an open file never
        // asks for an object that is already deleted.
        let new_etags = new_etags_of(&copied);
        self.retarget_subtree(src.ino, &old_prefix, new_prefix, &new_etags)
            .await?;
        self.delete_originals(&copied).await?;
        Ok(journal)
    }

    /// Deletes the originals of `copied` (old key, new key, new ETag), each of which has its
    /// copy.
    pub(super) async fn delete_originals(
        &self,
        copied: &[(String, String, String)],
    ) -> FsResult<()> {
        let old_keys: Vec<String> = copied.iter().map(|(old, _, _)| old.clone()).collect();
        for chunk in old_keys.chunks(1000) {
            self.store.delete_many(chunk).await?;
        }
        Ok(())
    }

    /// Copies `objects` (all under `old_prefix`) to the same names under `new_prefix`,
    /// concurrently. Returns (old key, new key, new ETag) of each; on failure, the first
    /// error and the copies made.
    pub(super) async fn copy_objects(
        &self,
        objects: &[ListedObject],
        old_prefix: &str,
        new_prefix: &str,
    ) -> Result<Vec<(String, String, String)>, (StoreError, Vec<(String, String, String)>)> {
        let results: Vec<Result<(String, String, String), StoreError>> =
            stream::iter(objects.iter().cloned())
                .map(|obj: ListedObject| async move {
                    let new_key = format!("{new_prefix}{}", &obj.key[old_prefix.len()..]);
                    let etag = write::copy_object(
                        &self.store,
                        &obj.key,
                        &new_key,
                        obj.size,
                        Some(&obj.etag),
                        None,
                        self.upload_tuning(),
                    )
                    .await?;
                    Ok((obj.key, new_key, etag))
                })
                .buffer_unordered(RENAME_CONCURRENCY)
                .collect()
                .await;
        let (copied, failed): (Vec<_>, Vec<_>) = results.into_iter().partition(Result::is_ok);
        let copied: Vec<(String, String, String)> = copied.into_iter().flatten().collect();
        match failed.into_iter().next() {
            Some(Err(e)) => Err((e, copied)),
            _ => Ok(copied),
        }
    }

    /// Gives the entries under a moved directory (`dir`, from `old_prefix` to `new_prefix`)
    /// the ETags of their copies, and open files the keys their originals now have.
    pub(super) async fn retarget_subtree(
        &self,
        dir: u64,
        old_prefix: &str,
        new_prefix: &str,
        new_etags: &HashMap<String, String>,
    ) -> FsResult<()> {
        if let Some(etag) = new_etags.get(old_prefix) {
            // The directory's own marker was copied too.
            self.meta.set_marker(dir, etag, now_ns())?;
        }
        // One transaction for the whole subtree.
        let changed = self
            .meta
            .retarget_subtree(dir, old_prefix, new_etags, now_ns())?;
        for (ino, old_key, etag) in changed {
            // The copy is another object: its Last-Modified comes with the next listing.
            let Some(f) = self.dirs.open_file_of(ino) else {
                continue;
            };
            let now_at = Original {
                key: format!("{new_prefix}{}", &old_key[old_prefix.len()..]),
                etag: etag.clone(),
            };
            self.point_at_copy(&f, &mut *f.state.lock().await, &now_at)?;
            let mut live = f.attrs();
            live.etag = Some(etag);
            live.last_modified = None;
            live.validated_at = now_ns();
            f.set_attrs(live);
        }
        Ok(())
    }

    /// Points open `file` (its content lock `st`) at `copy`, a copy of its object under
    /// another key made by a rename or a move of a directory above it, before the original
    /// is deleted. Returns what it pointed at before.
    fn point_at_copy(
        &self,
        file: &OpenFile,
        st: &mut FileState,
        copy: &Original,
    ) -> FsResult<Pointers> {
        let before = Pointers {
            original: st.staging.as_ref().and_then(|s| s.original().cloned()),
            remote: st.remote.clone(),
        };
        let after = Pointers {
            original: before.original.as_ref().map(|_| copy.clone()),
            remote: before.remote.as_ref().map(|_| copy.clone()),
        };
        self.set_pointers(file, st, after)?;
        Ok(before)
    }

    /// Points open `file` (its content lock `st`) at `to`.
    fn set_pointers(&self, file: &OpenFile, st: &mut FileState, to: Pointers) -> FsResult<()> {
        let journaled = st.phase == Phase::Journaled;
        if let (Some(original), Some(staging)) = (to.original, st.staging.as_mut()) {
            staging.set_original(original);
            if journaled {
                // A crash must find the original where it now is.
                self.meta.save_staging(file.ino(), &staging.record())?;
            }
        }
        if to.remote.is_some() {
            st.remote = to.remote;
        }
        Ok(())
    }

    /// Every object under `prefix` (no delimiter), all pages.
    pub(super) async fn list_all(&self, prefix: &str) -> FsResult<Vec<ListedObject>> {
        let mut all = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = self
                .store
                .list(prefix, None, token.as_deref(), None)
                .await?;
            all.extend(page.objects);
            match page.next_token {
                Some(t) => token = Some(t),
                None => return Ok(all),
            }
        }
    }
}

/// The new ETag of each old key of `copied` (old key, new key, new ETag).
pub(super) fn new_etags_of(copied: &[(String, String, String)]) -> HashMap<String, String> {
    copied
        .iter()
        .map(|(old, _, etag)| (old.clone(), etag.clone()))
        .collect()
}

/// Where an open file's contents are in the bucket: the original its staging file fetches
/// from and the object it reads, each `None` where it has none.
#[derive(Debug)]
struct Pointers {
    original: Option<Original>,
    remote: Option<Original>,
}
