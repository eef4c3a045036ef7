//! Telling the kernel to forget what the mount learned changed outside it.
//!
//! The kernel caches attributes and directory entries for `--metadata-ttl`, and file pages
//! until they are invalidated. When a listing or a probe finds that another client replaced,
//! removed or added an object, waiting for those caches to expire would let a reader see the
//! old size or the old bytes after the mount already knows better (design.md §4). The FUSE
//! adapter implements [`KernelCache`] with FUSE's invalidation notifications; `fs/` only says
//! what to forget.
//!
//! Order matters for inodes: the request that brought the news (an open that revalidated its
//! file, a listing) is answered only once the kernel has dropped the old attributes. A read
//! that starts with the old size cached and meets the shorter new object would otherwise be
//! padded with zeros: the kernel corrects its size after a short read only if no attribute
//! change arrived meanwhile. Entries are not waited for: the kernel applies those under the
//! directory's lock, which the request being answered may hold.

use tokio::sync::oneshot;

/// What the kernel should forget.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invalidation {
    /// Attributes and cached pages of an inode (its object was replaced), or of a directory
    /// its cached entries (they changed outside the kernel's view).
    Inode(u64),
    /// The entry `name` of directory `parent`, positive or negative.
    Entry(u64, String),
}

impl Invalidation {
    /// Whether it must be applied before the request that found the change is answered
    /// (see the module docs); entries must not be waited for.
    pub fn is_waited_for(&self) -> bool {
        !matches!(self, Invalidation::Entry(..))
    }
}

/// The kernel's caches, as far as the filesystem may ask them to forget.
pub trait KernelCache: Send + Sync + std::fmt::Debug {
    /// Forgets `what` and, once the kernel has, signals `applied` (if given). Never blocks
    /// the caller on the kernel.
    fn invalidate(&self, what: Invalidation, applied: Option<oneshot::Sender<()>>);
}

/// No kernel (unit tests, and the time before the mount exists).
#[derive(Debug, Default)]
pub struct NoKernel;

impl KernelCache for NoKernel {
    fn invalidate(&self, _: Invalidation, applied: Option<oneshot::Sender<()>>) {
        if let Some(done) = applied {
            let _ = done.send(());
        }
    }
}

/// Remembers every invalidation, for tests.
#[cfg(test)]
#[derive(Debug, Default, Clone)]
pub struct RecordedKernel(pub std::sync::Arc<std::sync::Mutex<Vec<Invalidation>>>);

#[cfg(test)]
impl KernelCache for RecordedKernel {
    fn invalidate(&self, what: Invalidation, applied: Option<oneshot::Sender<()>>) {
        self.0.lock().unwrap().push(what);
        if let Some(done) = applied {
            let _ = done.send(());
        }
    }
}
