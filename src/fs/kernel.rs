//! Telling the kernel to forget what the mount learned changed outside it.
//!
//! The kernel caches attributes and directory entries for `--metadata-ttl`, and file pages
//! until they are invalidated. When a listing or a probe finds that another client replaced,
//! removed or added an object, waiting for those caches to expire would let a reader see the
//! old size or the old bytes after the mount already knows better (design.md §4). The FUSE
//! adapter implements [`KernelCache`] with FUSE's invalidation notifications; `fs/` only says
//! what to forget.

/// What the kernel should forget.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invalidation {
    /// Attributes and cached pages of an inode (its object was replaced).
    Inode(u64),
    /// Attributes of an inode only (a directory whose clock moved).
    Attributes(u64),
    /// The entry `name` of directory `parent`, positive or negative.
    Entry(u64, String),
}

/// The kernel's caches, as far as the filesystem may ask them to forget.
pub trait KernelCache: Send + Sync + std::fmt::Debug {
    /// Forgets `what`. Must not block on the kernel: it is called while a request that may
    /// hold the same inode's lock in the kernel is being answered.
    fn invalidate(&self, what: Invalidation);
}

/// No kernel (unit tests, and the time before the mount exists).
#[derive(Debug, Default)]
pub struct NoKernel;

impl KernelCache for NoKernel {
    fn invalidate(&self, _: Invalidation) {}
}

/// Remembers every invalidation, for tests.
#[cfg(test)]
#[derive(Debug, Default, Clone)]
pub struct RecordedKernel(pub std::sync::Arc<std::sync::Mutex<Vec<Invalidation>>>);

#[cfg(test)]
impl KernelCache for RecordedKernel {
    fn invalidate(&self, what: Invalidation) {
        self.0.lock().unwrap().push(what);
    }
}
