//! The open-file table: the state of every open inode, and the handles the kernel holds.
//!
//! An inode that is open, or has changes not yet in the bucket, has one [`OpenFile`] here,
//! shared by all its handles; each file or directory handle the kernel holds maps to what it
//! opened. The maps sit behind short synchronous locks, never held across an `.await`: what
//! takes time (an upload, a listing) happens on the `Arc`s handed out, not in the table.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::DirSnapshot;
use super::files::{FileHandle, OpenFile};

/// What a handle opened.
pub(super) enum Handle {
    /// A file, through its shared state.
    File(Arc<FileHandle>),
    /// A directory: the entries listed when it was read from offset 0.
    Dir(Arc<tokio::sync::Mutex<Option<DirSnapshot>>>),
}

/// Open inodes and handles of one mount.
pub(super) struct OpenTable {
    files: Mutex<HashMap<u64, Arc<OpenFile>>>,
    handles: Mutex<HashMap<u64, Handle>>,
    /// Next handle number (0 is not a handle) or other number unique in this run.
    next_id: AtomicU64,
}

impl OpenTable {
    /// An empty table.
    pub(super) fn new() -> OpenTable {
        OpenTable {
            files: Mutex::default(),
            handles: Mutex::default(),
            next_id: AtomicU64::new(1),
        }
    }

    /// The state of open inode `ino`.
    pub(super) fn file(&self, ino: u64) -> Option<Arc<OpenFile>> {
        self.files.lock().unwrap().get(&ino).cloned()
    }

    /// The state of `fresh`'s inode: the one already in the table, or else `fresh`, which
    /// goes in.
    pub(super) fn file_or_insert(&self, fresh: Arc<OpenFile>) -> Arc<OpenFile> {
        self.files
            .lock()
            .unwrap()
            .entry(fresh.ino())
            .or_insert(fresh)
            .clone()
    }

    /// Puts `file` in, in place of any state its inode had (a file just created, one a
    /// previous run left with changes).
    pub(super) fn insert(&self, file: Arc<OpenFile>) {
        self.files.lock().unwrap().insert(file.ino(), file);
    }

    /// Takes `file` out, if it is the state in the table: a retired state's place may have
    /// been taken by a new open since.
    pub(super) fn remove(&self, file: &Arc<OpenFile>) {
        let mut files = self.files.lock().unwrap();
        if files.get(&file.ino()).is_some_and(|f| Arc::ptr_eq(f, file)) {
            files.remove(&file.ino());
        }
    }

    /// The states of all open inodes.
    pub(super) fn files(&self) -> Vec<Arc<OpenFile>> {
        self.files.lock().unwrap().values().cloned().collect()
    }

    /// A number no other call returns in this run.
    pub(super) fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Adds `handle`; returns its number.
    pub(super) fn add_handle(&self, handle: Handle) -> u64 {
        let fh = self.next_id();
        self.handles.lock().unwrap().insert(fh, handle);
        fh
    }

    /// File handle `fh`, if it is one.
    pub(super) fn file_handle(&self, fh: u64) -> Option<Arc<FileHandle>> {
        match self.handles.lock().unwrap().get(&fh) {
            Some(Handle::File(h)) => Some(h.clone()),
            _ => None,
        }
    }

    /// The listing of directory handle `fh`, if it is one.
    pub(super) fn dir_handle(
        &self,
        fh: u64,
    ) -> Option<Arc<tokio::sync::Mutex<Option<DirSnapshot>>>> {
        match self.handles.lock().unwrap().get(&fh) {
            Some(Handle::Dir(d)) => Some(d.clone()),
            _ => None,
        }
    }

    /// Removes handle `fh`; returns what it was.
    pub(super) fn remove_handle(&self, fh: u64) -> Option<Handle> {
        self.handles.lock().unwrap().remove(&fh)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::{EntryDefaults, Inode, Kind, Timestamp};

    fn open_file(ino: u64) -> Arc<OpenFile> {
        let defaults = EntryDefaults {
            uid: 0,
            gid: 0,
            file_perm: 0o644,
            dir_perm: 0o755,
        };
        let mut inode = Inode::new_entry(Some(1), "f", Kind::File, &defaults, Timestamp::now(), 0);
        inode.ino = ino;
        Arc::new(OpenFile::new(inode, Default::default()))
    }

    #[test]
    fn an_inode_has_one_state_and_a_retired_one_never_removes_its_successor() {
        let table = OpenTable::new();
        let first = table.file_or_insert(open_file(5));
        let second = table.file_or_insert(open_file(5));
        assert!(Arc::ptr_eq(&first, &second), "one state per inode");
        table.remove(&first);
        assert!(table.file(5).is_none());
        let successor = table.file_or_insert(open_file(5));
        table.remove(&first);
        assert!(
            table.file(5).is_some_and(|f| Arc::ptr_eq(&f, &successor)),
            "the retired state took out the new one"
        );
        assert_eq!(table.files().len(), 1);
    }

    #[test]
    fn handles_are_numbered_from_one_and_typed() {
        let table = OpenTable::new();
        let dir = table.add_handle(Handle::Dir(Arc::default()));
        assert_eq!(dir, 1);
        assert!(table.dir_handle(dir).is_some());
        assert!(
            table.file_handle(dir).is_none(),
            "a directory is no file handle"
        );
        assert!(table.remove_handle(dir).is_some());
        assert!(table.dir_handle(dir).is_none());
        assert_ne!(table.next_id(), dir);
    }
}
